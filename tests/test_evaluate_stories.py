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
        assert row["crops found"] + len(row["crops missing"]) == 5, row  # Lily twice, Tom once, then both
        assert sum(row["crops per character"].values()) == row["crops found"] > 0, row
        if max(row["crops per character"].values()) >= 2:
            assert np.isfinite(row["IIS"]) and np.isfinite(row["DS"])
    assert any(r["IIS"] is not None for r in rows)
    assert "## Character crops (located the same way in every method's images)" in out
    for row in rows:
        assert f"| {row['method']} | {row['crops found']} of 5 |" in out


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


def test_checks_measure_the_testbed_and_the_papers_claims_by_hand(load_script):
    """Hand-made rows: CSA keeps the single character's colour in 60 %, vanilla in 20 %; in the
    uncoloured pair CSA mixes 3 of 10 two-character scenes, vanilla 1 of 10, isolated 1 of 10
    and the tuned row 0; IIS-toy and colour kept as written below."""
    module = load_script("evaluate_stories")

    def row(story, method, kept, iis, mixed=0):
        return {"story": story, "method": method, "colour kept": kept, "IIS-toy": iis,
                "two-character scenes": 10 if story.endswith("pair") else 0, "mixed two-character scenes": mixed}
    rows = {m: [row("toy_uncoloured_single", m, kept, iis), row("toy_uncoloured_pair", m, kept - 10, iis, mixed)]
            for m, kept, iis, mixed in (("vanilla", 20, 40, 1), ("csa", 60, 50, 3), ("isolated", 70, 52, 1),
                                        ("isolated-tuned", 50, 60, 0))}
    checks = {name: (value, ok(value)) for name, value, ok in module.testbed_checks(rows, ["isolated", "isolated-tuned"])}
    assert checks["testbed: CSA keeps an uncoloured single character's colour ≥ 50 %"] == (60, True)
    assert checks["testbed: vanilla keeps it ≤ 30 % (near chance)"] == (20, True)
    assert checks["motivating failure: CSA mixes the uncoloured pair in ≥ 10 % of two-character scenes"] == (30, True)
    assert checks["motivating failure: CSA mixes it ≥ 2 × as often as vanilla"] == (3, True)
    assert checks["paper's claim (isolated): mixes the uncoloured pair ≤ half as often as CSA"] == (10 - 15, True)
    assert checks["paper's claim (isolated): IIS-toy − CSA ≥ +3 points"] == (2, False)
    assert checks["paper's claim (isolated): colour kept (uncoloured stories) − CSA ≥ 0"] == (10, True)
    assert checks["paper's claim (isolated-tuned): IIS-toy − CSA ≥ +3 points"] == (10, True)
    assert checks["paper's claim (isolated-tuned): colour kept (uncoloured stories) − CSA ≥ 0"] == (-10, False)


def test_the_tuned_row_runs_isolated_with_the_backbones_tuned_switches(tmp_path, load_script, capsys):
    script = load_script("evaluate_stories")
    rows = script.main(["--stories", _story(tmp_path, TOY_STORY), "--seeds", "1", "--methods", "isolated,isolated-tuned",
                        "--steps", "3", "--md", str(tmp_path / "report.md")])
    assert [r["method"] for r in rows] == ["isolated", "isolated-tuned"]
    assert rows[0]["IIS-toy"] != rows[1]["IIS-toy"] or rows[0]["attribute accuracy"] != rows[1]["attribute accuracy"] \
        or rows[0]["TIS-toy"] != rows[1]["TIS-toy"]
    report = (tmp_path / "report.md").read_text()
    assert "Isolated attention ran with the paper's switches." in report
    assert "isolated-tuned ran with the paper's switches except " in report and "variant 'isolation-tuned'" in report


def test_sdxl_run_exports_vistorybench_layout_and_pairs_the_methods(tmp_path, tiny_metric_models, capsys, load_script):
    """``--export``: method/story/shot_XX.png with a prompts.json for every method; the report pairs
    isolated attention with the others by story and seed; metric models are back on the host."""
    script = load_script("evaluate_stories")
    story = _story(tmp_path, SDXL_STORY, "pair.yaml")
    rows = script.main(["--backbone", "sdxl-tiny", "--stories", story, "--seeds", "2", "--methods", "vanilla,isolated",
                        "--steps", "2", "--export", str(tmp_path / "export"), *tiny_metric_models])
    out = capsys.readouterr().out
    for method in ("vanilla", "isolated"):
        for k in (0, 1):
            folder = tmp_path / "export" / method / f"pair_seed{k}"
            assert sorted(p.name for p in folder.iterdir()) == ["prompts.json"] + [f"shot_{i:02d}.png" for i in range(1, 5)]
            record = json.loads((folder / "prompts.json").read_text())
            assert [s["prompt"] for s in record["shots"]] == [s["prompt"] for s in SDXL_STORY["scenes"]]
            assert record["characters"]["Lily"]["id_prompt"] == "a girl with blonde hair"
    assert "## Isolated minus each other method, paired by story and seed" in out
    by = {(r["seed"], r["method"]): r for r in rows}
    tis = [by[(k, "isolated")]["TIS"] - by[(k, "vanilla")]["TIS"] for k in (0, 1)]
    expected = f"{np.mean(tis):+.2f} ± {np.std(tis, ddof=1) / np.sqrt(2):.2f} (2)"
    assert f"| isolated − vanilla | {expected} |" in out


def test_cpu_offload_is_for_sdxl(load_script):
    with pytest.raises(SystemExit):
        load_script("evaluate_stories").parse_args(["--cpu-offload"])
    assert load_script("evaluate_stories").parse_args(["--backbone", "sdxl-tiny", "--cpu-offload"]).cpu_offload
