"""scripts/evaluate_stories.py: rows per story, seed and method; the same rows from one process and
from two under `accelerate launch`; the SDXL metrics end to end on sdxl-tiny with tiny metric models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "evaluate_stories.py"
TOY_STORY = {"title": "short", "characters": [{"name": "Rosa", "word": "circle", "id_prompt": "a red circle"}],
             "scenes": [{"prompt": "a red circle in the meadow", "characters": ["Rosa"], "seed": 1},
                        {"prompt": "a red circle in the snow", "characters": ["Rosa"], "seed": 2},
                        {"prompt": "a red circle in the night", "characters": ["Rosa"], "seed": 3}]}
SDXL_STORY = {"title": "tiny", "characters": [{"name": "Lily", "word": "girl", "id_prompt": "a girl with blonde hair"},
                                              {"name": "Tom", "word": "boy", "id_prompt": "a boy with black hair"}],
              "scenes": [{"prompt": "a girl reading a book in the park", "characters": ["Lily"], "seed": 1},
                         {"prompt": "a girl on the beach", "characters": ["Lily"], "seed": 2},
                         {"prompt": "a boy with a dog on the beach", "characters": ["Tom"], "seed": 3},
                         {"prompt": "a girl and a boy in the snow", "characters": ["Lily", "Tom"], "seed": 4}]}
ARGS = ["--seeds", "2", "--methods", "vanilla,csa,isolated", "--steps", "3"]


def _story(tmp_path, data, name="story.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k != "seconds per scene"} for r in rows]


def _run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_two_accelerate_processes_give_the_single_process_rows(tmp_path):
    import accelerate  # noqa: F401  a pinned dependency: missing is a failure, not a skip

    story = _story(tmp_path, TOY_STORY)
    one = _run([sys.executable, str(SCRIPT), "--stories", story, *ARGS, "--json", "one.json"], tmp_path)
    # `--cpu --num_processes 2` starts one process in accelerate 1.15 (its simple launcher; several
    # CPU processes need mpirun). torchrun's launcher with no visible GPU gives two CPU processes.
    two = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                str(SCRIPT), "--stories", story, *ARGS, "--json", "two.json"], tmp_path)
    assert "1 process(es)" in one and "2 process(es)" in two
    rows_one = json.loads((tmp_path / "one.json").read_text())["rows"]
    rows_two = json.loads((tmp_path / "two.json").read_text())["rows"]
    assert [(r["story"], r["seed"], r["method"]) for r in rows_one] == \
        [("story", k, m) for k in (0, 1) for m in ("vanilla", "csa", "isolated")]
    assert _without_timing(rows_two) == _without_timing(rows_one)
    for row in rows_one:
        assert {"IIS-toy", "attribute accuracy", "mixing rate", "TIS-toy", "seconds per scene"} <= set(row)


def test_runs_as_one_process_without_accelerate(tmp_path, monkeypatch, capsys, load_script):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # `import accelerate` now fails
    script = load_script("evaluate_stories")
    assert isinstance(script.process_state(), script._SingleProcess)
    rows = script.main(["--stories", _story(tmp_path, TOY_STORY), "--seeds", "1", "--methods", "vanilla,csa",
                        "--steps", "2", "--json", str(tmp_path / "rows.json")])
    assert [r["method"] for r in rows] == ["vanilla", "csa"]
    assert "1 process(es)" in capsys.readouterr().out
    assert json.loads((tmp_path / "rows.json").read_text())["rows"] == rows


def test_unknown_method_is_refused(load_script):
    with pytest.raises(SystemExit):
        load_script("evaluate_stories").parse_args(["--methods", "vanilla,magic"])


@pytest.fixture
def tiny_metric_models(tmp_path, monkeypatch):
    """A tiny CLIP folder, a tiny aesthetic head file and a stand-in DreamSim (as test_sdxl_metrics)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_sdxl_metrics import PROJ, _tiny_clip
    from osa_lib import sdxl_metrics
    from osa_lib.sdxl_metrics import AestheticPredictor

    model, processor = _tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    torch.manual_seed(0)
    torch.save(AestheticPredictor(input_size=PROJ).state_dict(), tmp_path / "aesthetic.pth")

    def preprocess(pil):
        return torch.from_numpy(np.asarray(pil.resize((16, 16)), dtype=np.float32) / 255).permute(2, 0, 1)[None]

    monkeypatch.setattr(sdxl_metrics, "load_dreamsim",
                        lambda device=None, cache_dir=None: (lambda x, y: (x - y).abs().mean().reshape(1), preprocess))
    return ["--clip", str(tmp_path / "clip"), "--aesthetic-weights", str(tmp_path / "aesthetic.pth")]


def test_sdxl_tiny_story_gets_every_metric_with_crops_for_every_method(tmp_path, tiny_metric_models, capsys,
                                                                      load_script):
    rows = load_script("evaluate_stories").main(["--backbone", "sdxl-tiny", "--stories", _story(tmp_path, SDXL_STORY),
                                                 "--seeds", "1", "--methods", "vanilla,csa,isolated", "--steps", "3",
                                                 *tiny_metric_models])
    out = capsys.readouterr().out
    assert "MISSING" not in out
    for name in ("TIS", "IIS", "AQ", "DS"):
        assert f"{name}: higher is better" in out
    assert [r["method"] for r in rows] == ["vanilla", "csa", "isolated"]
    for row in rows:
        assert 0 <= row["TIS"] <= 100 and np.isfinite(row["AQ"])
        assert sum(row["crops per character"].values()) > 0, f"{row['method']}: masks recorded, crops made"
        if max(row["crops per character"].values()) >= 2:
            assert np.isfinite(row["IIS"]) and np.isfinite(row["DS"])
    assert any(r["IIS"] is not None for r in rows)


def test_missing_metric_models_are_named_before_any_generation(tmp_path, monkeypatch, capsys, load_script):
    monkeypatch.setitem(sys.modules, "dreamsim", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = load_script("evaluate_stories")

    def no_generation(*args, **kwargs):
        raise AssertionError("a backbone was loaded although no metric can be computed")

    monkeypatch.setattr(script, "load_backbone", no_generation)
    rows = script.main(["--backbone", "sdxl-tiny", "--stories", _story(tmp_path, SDXL_STORY), "--seeds", "1",
                        "--clip", str(tmp_path / "no-clip")])
    out = capsys.readouterr().out
    assert rows is None
    assert "MISSING: TIS, IIS and AQ need CLIP" in out and "huggingface-cli download" in out
    assert "MISSING: AQ needs the LAION aesthetic predictor" in out and "--aesthetic-weights" in out
    assert "MISSING: DS needs DreamSim" in out and "pip install dreamsim" in out
    assert "stopping before any generation" in out


def test_targets_say_why_a_check_cannot_be_made(capsys, monkeypatch, load_script):
    """Uncoloured stories only: the named-colour checks say no such story was run (not that
    vanilla never mixed), and the colour-kept targets are computed from those stories."""
    from types import SimpleNamespace

    class Row(dict):
        def __missing__(self, key):  # counts and per-detail scores the table also reads
            return 0
    module = load_script("evaluate_stories")
    monkeypatch.setattr(module, "report_bank", lambda *args: None)  # generates a story; not what is tested
    rows = [Row(story=f"toy_uncoloured_{s}", seed=0, method=m, **{**{k: 50.0 for k in module.METRIC_NAMES},
                "seconds per scene": 1.0, "colour kept": 90.0 if m == "isolated" else 20.0})
            for s in ("single", "pair") for m in ("vanilla", "csa", "isolated")]
    module.report_toy(rows, SimpleNamespace(seeds=1, methods=["vanilla", "csa", "isolated"]), None, None)
    table = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert "untestable: no named-colour story was run" in table["named-colour stories, TIS-toy: vanilla − isolated ≤ 3 points"]
    assert "untestable: vanilla never mixed" in table["mixing rate in two-character scenes: isolated / vanilla ≤ 0.5"]
    assert table["colour kept, uncoloured stories: isolated ≥ 85 %"].endswith("| 90.00 | yes |")
