"""Every method on the same stories, backbone and seeds, one row per story, seed and method.

    python scripts/evaluate_stories.py                            # toy stories, 20 seeds (the README's numbers)
    python scripts/evaluate_stories.py --seeds 4 --methods vanilla,csa --json rows.json
    python scripts/evaluate_stories.py --backbone sdxl --model-id /models/sdxl \\
        --clip /models/clip-vit-large-patch14 --aesthetic-weights sac+logos+ava1-l14-linearMSE.pth \\
        --stories data/stories/sdxl_girl_and_boy.yaml --seeds 4
    accelerate launch --multi_gpu --num_processes 4 scripts/evaluate_stories.py ...   # stories x seeds split over GPUs
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 scripts/evaluate_stories.py ...  # over CPU processes

SDXL runs: ``--cpu-offload`` for 12-16 GB cards (the metric models come to the GPU only to score,
after each story is drawn); ``--export DIR`` writes every image in ViStoryBench's layout
(``DIR/<method>/<story>/shot_XX.png`` and a ``prompts.json``); the report pairs isolated attention
with each other method by story and seed (mean difference ± standard error).

Seed k of a story shifts every scene seed by k * 1000 (``Story.with_seed_offset``). Under
``accelerate launch`` the (story, seed) jobs are split over the processes with
``PartialState().split_between_processes``, each process loads the backbone on its own device,
and the main process gathers the rows into one table; without accelerate installed it runs as
one process. The rows do not depend on how the jobs were split. Note: accelerate 1.15's
``accelerate launch --cpu --num_processes 2`` starts ONE process unless MPI (``mpirun``) is set up
(its simple launcher); several CPU processes come from ``--multi_gpu`` (torchrun) on a machine
without a visible GPU, where this script asks for the CPU backend (gloo).

Isolated attention runs with the paper's switches ("isolated"); "isolated-tuned" is the same method
with the switches tuned for the backbone's weights (``Backbone.tuned_isolation``), a labelled row,
run only on a backbone that has them. Every method gets the same stories, text and seeds.

Toy backbone (exact metrics read by the toy analyzer, ``osa_lib.toy.metrics``): IIS-toy (higher is
better), attribute accuracy (higher), mixing rate (lower), TIS-toy (higher), seconds per scene
(lower); then the testbed's and the paper's claims as checks, paired IIS-toy differences,
IIS-toy per identity detail, mixed-scene counts and the reference-bank size.

SDXL backbones (``osa_lib.sdxl_metrics``): TIS (CLIP score, higher is better), IIS (CLIP image
cosine of the same character's crops across scenes, %, higher), AQ (LAION aesthetic predictor,
1-10, higher) and DS (DreamSim similarity of the same character's crops across scenes, %,
100·(1 − distance), higher). Crops are square, around boxes found the same way in every method's
final images (``osa_lib.locate``: each image re-noised to one timestep, one pass of the unmodified
U-Net with its scene prompt, Otsu on the cross-attention maps; or OWLv2 with ``--detector``), and
the report counts the crops found per method and names the scenes where one was not. Which metric models
are missing, and how to get them, is said before any generation; the metrics that can be
computed are, the others are left empty (the script stops if none can be).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]

from osa_lib import IsolationConfig, generate_story, load_backbone, load_story
from osa_lib.figures import markdown_table
from osa_lib.generation import METHODS
from osa_lib.toy.metrics import IDENTITY_DETAILS, METRIC_NAMES, toy_story_metrics

SEED_STRIDE = 1000
TUNED = "isolated-tuned"  # isolated attention with the backbone's tuned switches, a labelled row
LABELS = tuple(METHODS) + (TUNED,)
SDXL_METRICS = {"TIS": "higher is better", "IIS": "higher is better", "AQ": "higher is better",
                "DS": "higher is better (a similarity: 100·(1 − DreamSim distance))"}
TOY_DIRECTIONS = {"IIS-toy": "higher is better", "attribute accuracy": "higher is better",
                  "mixing rate": "lower is better", "TIS-toy": "higher is better", "seconds per scene": "lower is better"}


# --- processes: accelerate when installed, one process otherwise -------------------------------
class _SingleProcess:
    """Stands in for ``accelerate.PartialState`` when accelerate is not installed."""

    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def split_between_processes(self, items):
        from contextlib import nullcontext
        return nullcontext(items)


def process_state():
    """accelerate's ``PartialState``; on a machine without a GPU it is told so (``cpu=True``), which
    is what lets processes started by ``accelerate launch --multi_gpu`` meet over gloo on CPUs."""
    try:
        from accelerate import PartialState
    except ImportError:
        return _SingleProcess()
    return PartialState(cpu=not torch.cuda.is_available())


def gather_rows(state, rows: list[dict]) -> list[dict]:
    if state.num_processes == 1:
        return rows
    from accelerate.utils import gather_object
    return gather_object(rows)


def end_processes(state) -> None:
    """Under several processes: wait until the main one has written its report, then take the
    process group down in every process. A process that exits with gloo's group still up can abort
    on its way out ("terminate called without an active exception", seen on a busy 2-core machine)."""
    if state.num_processes > 1:
        state.wait_for_everyone()
        torch.distributed.destroy_process_group()


# --- metric models (SDXL) -------------------------------------------------------------------
def sdxl_metric_models(args, device) -> tuple[dict, list[str]]:
    """Load what exists of CLIP, the aesthetic head and DreamSim; say what is missing and how to get it."""
    from osa_lib.sdxl_metrics import (AESTHETIC_WEIGHTS, CLIP_MODEL_ID, AestheticPredictor, ClipScorer,
                                      MissingWeightsError, load_dreamsim)
    models, missing = {}, []
    try:
        models["clip"] = ClipScorer(args.clip or CLIP_MODEL_ID, device=device)
    except MissingWeightsError as error:
        missing.append(f"TIS, IIS and AQ need CLIP: {error}")
    if args.aesthetic_weights is None:
        missing.append(f"AQ needs the LAION aesthetic predictor head: download {AESTHETIC_WEIGHTS} from "
                       "https://github.com/christophschuhmann/improved-aesthetic-predictor and pass --aesthetic-weights PATH")
    elif "clip" in models:
        try:
            models["aesthetic"] = AestheticPredictor.from_file(args.aesthetic_weights, models["clip"])
        except (MissingWeightsError, ValueError) as error:
            missing.append(f"AQ: {error}")
    try:
        models["dreamsim"] = load_dreamsim(device, args.dreamsim_cache)
    except MissingWeightsError as error:
        missing.append(f"DS needs DreamSim: {error}")
    if args.detector and models:
        from osa_lib.locate import owlv2_detector
        try:
            models["detector"] = owlv2_detector(args.detector, device)
        except MissingWeightsError as error:
            missing.append(f"crops are located by the U-Net instead of OWLv2: {error}")
    return models, missing


def character_crops(backbone, story, result, detector=None) -> tuple[dict[str, list[np.ndarray]], list[str]]:
    """Each character's square crop in every scene it is in, located the same way for every method
    (``osa_lib.locate.locate_characters``: one unmodified U-Net pass on the re-noised final image,
    or ``detector``), and one line per crop not found, saying where and why."""
    from osa_lib.locate import locate_characters
    from osa_lib.sdxl_metrics import square_crop
    crops, missing = {n: [] for n in story.characters}, []
    for scene in result.scenes:
        if not scene.characters:
            continue
        words = [story.characters[n].word for n in scene.characters]
        located = locate_characters(backbone, scene.image, scene.prompt, words, detector=detector)
        for name, box, reason in zip(scene.characters, located.boxes, located.reasons):
            if box is None:
                missing.append(f"scene {scene.index + 1}, {name}: {reason or 'not found'}")
            else:
                crops[name].append(square_crop(scene.image, box))
    return crops, missing


def sdxl_row_metrics(backbone, story, result, models: dict) -> dict:
    """TIS, IIS, AQ, DS of one generated story (None where a model is missing or nothing to compare),
    with the crops found and expected and which were not found."""
    from osa_lib.sdxl_metrics import dreamsim_similarity, identity_similarity
    crops, missing = character_crops(backbone, story, result, models.get("detector"))
    row = {k: None for k in SDXL_METRICS}
    if "clip" in models:
        clip = models["clip"]
        row["TIS"] = float(clip.text_image_similarity(result.images, [s.prompt for s in result.scenes]).mean())
        try:
            row["IIS"] = identity_similarity(clip, crops)
        except ValueError:
            pass  # no character with two crops: IIS undefined for this story and seed
        if "aesthetic" in models:
            row["AQ"] = float(models["aesthetic"].score(result.images).mean())
    if "dreamsim" in models:
        model, preprocess = models["dreamsim"]
        per_character = []
        for character_crops_ in crops.values():
            pairs = [(a, b) for i, a in enumerate(character_crops_) for b in character_crops_[i + 1:]]
            if pairs:
                ds = dreamsim_similarity([a for a, _ in pairs], [b for _, b in pairs], device=clip_device(models),
                                         model=model, preprocess=preprocess)
                per_character.append(float(ds.mean()))
        row["DS"] = float(np.mean(per_character)) if per_character else None
    row["crops per character"] = {n: len(c) for n, c in crops.items()}
    row["crops found"], row["crops missing"] = sum(len(c) for c in crops.values()), missing
    return row


def clip_device(models):
    return models["clip"].device if "clip" in models else None


@contextlib.contextmanager
def scoring_on(models: dict, device):
    """The metric models on ``device`` while open, back on the host after: they are loaded on the
    host and take the GPU's memory only while they score, never while a story is drawn."""
    def place(where):
        where = torch.device(where)
        if "clip" in models:
            models["clip"].model.to(where)
            models["clip"].device = where
        if "aesthetic" in models:
            models["aesthetic"].to(where)
        if "dreamsim" in models and hasattr(models["dreamsim"][0], "to"):
            models["dreamsim"][0].to(where)
    place(device)
    try:
        yield models
    finally:
        place("cpu")


# --- one job: one story, one seed, every method -----------------------------------------------
def run_job(backbone, path: str, k: int, methods: list[str], steps: int | None, config, models: dict | None,
            export: str | None = None, seeds: int = 1, device="cpu") -> list[dict]:
    """Every method on one story and seed: generated first, then scored (SDXL: the metric models
    come to ``device`` only for the scoring); with ``export``, each image is also written out."""
    story = load_story(path).with_seed_offset(k * SEED_STRIDE)
    results = {m: generate_story(backbone, story, "isolated" if m == TUNED else m, num_inference_steps=steps,
                                 config=backbone.isolation_config(tuned=True) if m == TUNED else config, progress=False)
               for m in methods}
    if export:
        export_vistorybench(export, story_id(path, k, seeds), story, results)
    rows = []
    with (scoring_on(models, device) if models else contextlib.nullcontext()):
        for method, result in results.items():
            if models is None:
                metrics = toy_story_metrics(story, result, details=True)
            else:
                metrics = {**sdxl_row_metrics(backbone, story, result, models),
                           "seconds per scene": float(np.mean([s.seconds for s in result.scenes]))}
            rows.append({"story": Path(path).stem, "seed": k, "method": method, **metrics})
    return rows


def story_id(path: str, k: int, seeds: int) -> str:
    """A story's folder name in an export: its file's stem, with the seed when there are several."""
    return Path(path).stem if seeds == 1 else f"{Path(path).stem}_seed{k}"


def export_vistorybench(folder: str, story_name: str, story, results: dict) -> None:
    """Write each method's images as ``<folder>/<method>/<story>/shot_XX.png`` (ViStoryBench's
    layout) and the story's shots, prompts and characters to ``<folder>/<method>/<story>/prompts.json``,
    so the run can be scored with that benchmark's tools. Every file is written to a temporary
    name and renamed into place."""
    import os

    from PIL import Image
    for method, result in results.items():
        out = Path(folder) / method / story_name
        out.mkdir(parents=True, exist_ok=True)
        shots = []
        for i, scene in enumerate(result.scenes, start=1):
            name = f"shot_{i:02d}.png"
            tmp = out / f".{name}.tmp"
            Image.fromarray(np.round(np.clip(scene.image, 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG")
            os.replace(tmp, out / name)
            shots.append({"index": i, "image": name, "prompt": scene.prompt, "characters": scene.characters,
                          "seed": scene.seed})
        record = {"story": story_name, "title": story.title, "method": method,
                  "characters": {n: {"word": c.word, "id_prompt": c.id_prompt} for n, c in story.characters.items()},
                  "shots": shots}
        tmp = out / ".prompts.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out / "prompts.json")


def _json_ready(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="toy", help="toy (default), sdxl or sdxl-tiny (load_backbone names)")
    parser.add_argument("--model-id", default=None, help="backbone weights: a local folder or hub id")
    parser.add_argument("--variant", default=None,
                        help="toy only, instead of --model-id: a named toy backbone (isolation-tuned, base, neutral)")
    parser.add_argument("--stories", nargs="+", default=None, metavar="FILE",
                        help="story files (default: data/stories/toy_*.yaml for the toy, sdxl_*.yaml otherwise)")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per story")
    parser.add_argument("--methods", default=",".join(LABELS),
                        help=f"comma-separated, from {','.join(LABELS)} ({TUNED} only where the backbone has tuned switches)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the backbone's)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the rows (one per story, seed, method) here")
    parser.add_argument("--md", default=None, metavar="OUT",
                        help="also write the report as Markdown with the command, commit and machine (results/...)")
    parser.add_argument("--clip", default=None, help="SDXL metrics: local folder of CLIP ViT-L/14")
    parser.add_argument("--aesthetic-weights", default=None, help="SDXL metrics: the LAION aesthetic head (.pth)")
    parser.add_argument("--dreamsim-cache", default=None, help="SDXL metrics: DreamSim's cache folder")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="SDXL on a 12-16 GB card: each model on the GPU only while it runs (load_backbone's "
                             "cpu_offload; reference banks on the host)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="also write every image as DIR/<method>/<story>/shot_XX.png with a prompts.json "
                             "(ViStoryBench's layout)")
    parser.add_argument("--detector", default=None, metavar="OWLV2_DIR",
                        help="SDXL crops: locate characters with OWLv2 from this local folder instead of the U-Net")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in LABELS]
    if unknown or not args.methods:
        parser.error(f"unknown method(s) {unknown}; choose from {list(LABELS)}")
    if args.cpu_offload and args.backbone == "toy":
        parser.error("--cpu-offload is for the SDXL backbones (the toy model is small and runs on the CPU)")
    if args.stories is None:
        pattern = "toy_*.yaml" if args.backbone == "toy" else "sdxl_*.yaml"
        args.stories = sorted(str(p) for p in (ROOT / "data" / "stories").glob(pattern))
    return args


def main(argv=None) -> list[dict] | None:
    args = parse_args(argv)
    state = process_state()
    say = print if state.is_main_process else (lambda *a, **k: None)
    for path in args.stories:
        load_story(path)  # every story file is checked before anything is generated
    models = None
    if args.backbone != "toy":
        models, missing = sdxl_metric_models(args, "cpu")  # on the device only while scoring (scoring_on)
        say("## Metric models\n")
        for name, direction in SDXL_METRICS.items():
            say(f"- {name}: {direction}")
        for line in missing:
            say(f"- MISSING: {line}")
        if not models:
            say("\nNo metric model is available, so nothing can be measured; stopping before any generation.")
            return None
        say(f"\nComputing {', '.join(k for k in SDXL_METRICS if _computable(k, models))}; "
            f"the other columns stay empty.\n" if missing else "")
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, model_id=args.model_id, device=str(state.device),
                             cpu_offload=args.cpu_offload, variant=args.variant)
    config = backbone.isolation_config()
    if TUNED in args.methods and not backbone.tuned_isolation:
        args.methods = [m for m in args.methods if m != TUNED]
        say(f"({TUNED} left out: this backbone has no tuned switches; isolated runs with the paper's)\n")
    jobs = [(path, k) for path in args.stories for k in range(args.seeds)]
    started = time.perf_counter()
    rows = []
    with state.split_between_processes(jobs) as mine:
        # progress on stderr (the report goes to stdout); one bar per process, labelled by its index
        for path, k in tqdm(mine, desc=f"stories x seeds (process {state.process_index})", unit="job"):
            rows += run_job(backbone, path, k, args.methods, args.steps, config, models, args.export, args.seeds,
                            state.device)
    rows = gather_rows(state, rows)
    try:
        if state.is_main_process:
            return report(args, argv, state, backbone, config, models, rows, len(jobs), started)
        return None
    finally:
        end_processes(state)


def report(args, argv, state, backbone, config, models, rows, n_jobs, started) -> list[dict]:
    """The main process's part: sort the gathered rows, print and write the report and the rows."""
    order = {p: i for i, p in enumerate(Path(p).stem for p in args.stories)}
    rows.sort(key=lambda r: (order[r["story"]], r["seed"], args.methods.index(r["method"])))
    rows = [_json_ready(r) for r in rows]
    print(f"{n_jobs} story seeds x {len(args.methods)} methods on {args.backbone}, "
          f"{state.num_processes} process(es), {time.perf_counter() - started:.0f} s\n")
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        if models is None:
            report_toy(rows, args, backbone, config)
        else:
            report_sdxl(rows, args)
    print(text.getvalue(), end="")
    if args.md:
        from osa_lib.figures import command_line, write_results
        command = command_line("python scripts/evaluate_stories.py", argv)
        write_results(args.md, f"Story metrics on the {args.backbone} backbone",
                      f"{n_jobs} story seeds x {len(args.methods)} methods, {state.num_processes} process(es), "
                      f"{time.perf_counter() - started:.0f} s. {_backbone_line(backbone, config, args.methods)}\n\n"
                      + text.getvalue(), command)
        print(f"\nreport written to {args.md}")
    if args.json:
        Path(args.json).write_text(json.dumps({"backbone": args.backbone, "methods": args.methods,
                                               "seeds": args.seeds, "rows": rows}, indent=1))
        print(f"\nrows written to {args.json}")
    return rows


def _computable(metric, models):
    return {"TIS": "clip" in models, "IIS": "clip" in models, "AQ": "aesthetic" in models,
            "DS": "dreamsim" in models}[metric]


def _mean_sem(values):
    values = np.array([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], float)
    if not len(values):
        return float("nan"), float("nan")
    sem = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(sem)


def _per_story_table(rows, metrics, methods):
    table = []
    for story in dict.fromkeys(r["story"] for r in rows):
        for method in methods:
            chosen = [r for r in rows if r["story"] == story and r["method"] == method]
            cells = {}
            for key in metrics:
                m, s = _mean_sem([r.get(key) for r in chosen])
                cells[key] = f"{m:.3f}" if key == "seconds per scene" else f"{m:.1f} ± {s:.1f}"
            table.append({"story": story, "method": method, **cells})
    return table


def paired_differences(rows, metrics, methods, reference: str = "isolated") -> list[dict]:
    """Per other method: ``reference`` minus it on each metric, over the (story, seed) pairs where
    both have a number, as "mean ± standard error (n pairs)"."""
    if reference not in methods:
        return []
    by = {(r["story"], r["seed"], r["method"]): r for r in rows}
    table = []
    for other in [m for m in methods if m != reference]:
        cells = {"difference": f"{reference} − {other}"}
        for key in metrics:
            d = [by[(s, k, reference)][key] - by[(s, k, other)][key] for (s, k, m) in by if m == reference
                 and (s, k, other) in by and by[(s, k, reference)].get(key) is not None
                 and by[(s, k, other)].get(key) is not None]
            mean, sem = _mean_sem(d)
            cells[key] = f"{mean:+.2f} ± {sem:.2f} ({len(d)})" if d else ""
        table.append(cells)
    return table


def report_sdxl(rows, args) -> None:
    keys = list(SDXL_METRICS) + ["seconds per scene"]
    print(f"## Per story ({args.seeds} seeds each; mean ± standard error; empty = not computed)\n")
    print(markdown_table(_per_story_table(rows, keys, args.methods)))
    paired = paired_differences(rows, list(SDXL_METRICS), args.methods)
    if paired:
        print("\n## Isolated minus each other method, paired by story and seed (mean ± standard error)\n")
        print(markdown_table(paired))
    print("\n## Character crops (located the same way in every method's images)\n")
    crops = []
    for method in args.methods:
        chosen = [r for r in rows if r["method"] == method]
        found = sum(r["crops found"] for r in chosen)
        missing = [f"{r['story']} seed {r['seed']}: {m}" for r in chosen for m in r["crops missing"]]
        crops.append({"method": method, "crops found": f"{found} of {found + len(missing)}",
                      "not found": "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")})
    print(markdown_table(crops))
    print("\nDirections: " + "; ".join(f"{k} {d}" for k, d in SDXL_METRICS.items()) + "; seconds per scene lower is better.")


def _differences(config: IsolationConfig) -> str:
    """The fields of ``config`` that differ from the paper's switches, or say there are none."""
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != f.default}
    return ("the paper's switches except " + ", ".join(f"{k}={v!r}" for k, v in changed.items())
            if changed else "the paper's switches")


def _backbone_line(backbone, config, methods) -> str:
    """Which weights ran (with how they were trained, for a named toy variant) and which switches."""
    variant = backbone.info.get("variant")
    line = (f"Backbone: the toy variant {variant!r}: {backbone.info['variant_note']}. " if variant else "")
    line += f"Isolated attention ran with {_differences(config)}."
    if TUNED in methods:
        line += f" {TUNED} ran with {_differences(backbone.isolation_config(tuned=True))} (tuned for these weights)."
    return line


def _two_character_mixing(rows: list[dict], story_suffix: str = "") -> float:
    """% of the two-character scenes (of every story, or of the stories ending in ``story_suffix``)
    in which a character is drawn in the colour another character of the scene is drawn in."""
    chosen = [r for r in rows if r["story"].endswith(story_suffix)]
    scenes = sum(r["two-character scenes"] for r in chosen)
    return 100 * sum(r["mixed two-character scenes"] for r in chosen) / scenes if scenes else float("nan")


def testbed_checks(pooled: dict[str, list[dict]], isolated: list[str]) -> list[tuple]:
    """(name, measured, test) rows. First whether the toy is a fair testbed: CSA carries an
    uncoloured character's colour (≥ 50 % of later appearances, vanilla ≤ 30 %) and shows the
    paper's motivating failure (mixes the uncoloured pair in ≥ 10 % of two-character scenes and
    at least twice as often as vanilla). Then the paper's claims for each isolated row: mixing at
    most half of CSA's, IIS-toy ≥ CSA's + 3 points, colour kept ≥ CSA's."""
    def kept(method, story="toy_uncoloured_single"):
        return _mean_sem([r["colour kept"] for r in pooled[method] if r["story"] == story])[0]

    def iis(method):
        return _mean_sem([r["IIS-toy"] for r in pooled[method]])[0]

    def pair_mixing(method):
        return _two_character_mixing(pooled[method], "uncoloured_pair")

    uncoloured = lambda m: _mean_sem([r["colour kept"] for r in pooled[m] if "uncoloured" in r["story"]])[0]  # noqa: E731
    checks = [("testbed: CSA keeps an uncoloured single character's colour ≥ 50 %", kept("csa"), lambda x: x >= 50),
              ("testbed: vanilla keeps it ≤ 30 % (near chance)", kept("vanilla"), lambda x: x <= 30),
              ("motivating failure: CSA mixes the uncoloured pair in ≥ 10 % of two-character scenes",
               pair_mixing("csa"), lambda x: x >= 10),
              ("motivating failure: CSA mixes it ≥ 2 × as often as vanilla",
               pair_mixing("csa") / pair_mixing("vanilla") if pair_mixing("vanilla") else
               (float("inf") if pair_mixing("csa") else float("nan")), lambda x: x >= 2)]
    for m in isolated:
        checks += [(f"paper's claim ({m}): mixes the uncoloured pair ≤ half as often as CSA",
                    pair_mixing(m) - pair_mixing("csa") / 2 if pair_mixing("csa") else float("nan"), lambda x: x <= 0),
                   (f"paper's claim ({m}): IIS-toy − CSA ≥ +3 points", iis(m) - iis("csa"), lambda x: x >= 3),
                   (f"paper's claim ({m}): colour kept (uncoloured stories) − CSA ≥ 0", uncoloured(m) - uncoloured("csa"),
                    lambda x: x >= 0)]
    return checks


def report_toy(rows, args, backbone, config) -> None:
    keys = list(METRIC_NAMES) + ["seconds per scene"]
    print(f"## Per story ({args.seeds} seeds each; mean ± standard error)\n")
    print(markdown_table(_per_story_table(rows, keys, args.methods)))
    print("\nDirections: " + "; ".join(f"{k} {d}" for k, d in TOY_DIRECTIONS.items()) + ".")
    pooled = {m: [r for r in rows if r["method"] == m] for m in args.methods}

    def mean(method, key):
        return _mean_sem([r[key] for r in pooled[method]])[0]

    def count(method, key):
        return sum(r[key] for r in pooled[method])

    def two_character_mixing(method):
        return _two_character_mixing(pooled[method])

    v, c, i = "vanilla", "csa", "isolated"
    if v in pooled and c in pooled:
        print("\n## Checks (pooled over seeds; a fair testbed first, then the paper's claims)\n")
        print(markdown_table([{"check": name, "measured": round(value, 2),
                               "met": "untestable" if np.isnan(value) else "yes" if ok(value) else "NO"}
                              for name, value, ok in testbed_checks(pooled, [m for m in (i, TUNED) if m in pooled])]))
    for label, other in [(a, b) for a in (i, TUNED) for b in args.methods if a in pooled and b != a and b != i]:
        d = np.array([a["IIS-toy"] - b["IIS-toy"] for a, b in zip(pooled[label], pooled[other])
                      if a["IIS-toy"] is not None and b["IIS-toy"] is not None])  # same (story, seed) order
        if len(d) > 1:
            print(f"IIS-toy, {label} − {other}, paired over {len(d)} story seeds: "
                  f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f} (mean ± standard error)")
    for method in pooled:
        print(f"{method}: " + ", ".join(f"{k} {mean(method, k):.1f}" for k in METRIC_NAMES))
    print("\n## Which identity details carry over (IIS-toy per detail, pooled; 100 = the same in every scene)\n")
    print(markdown_table([{"method": m, **{d: f"{mean(m, f'IIS-toy {d}'):.1f}" for d in IDENTITY_DETAILS}}
                          for m in pooled]))
    print("\n## Mixed scenes, pooled over stories and seeds\n")
    print(markdown_table([{"method": m,
                           "two-character scenes": f"{count(m, 'mixed two-character scenes')} of "
                                                   f"{count(m, 'two-character scenes')} ({two_character_mixing(m):.1f} %)",
                           "three-character scenes": f"{count(m, 'mixed scenes') - count(m, 'mixed two-character scenes')} of "
                                                     f"{count(m, 'multi-character scenes') - count(m, 'two-character scenes')}"}
                          for m in pooled]))
    if i in pooled:
        report_bank(args, backbone, config)


def report_bank(args, backbone, config) -> None:
    from diffusers import UNet2DConditionModel
    from osa_lib.backbones import SDXL_UNET_CONFIG
    from osa_lib.bank import estimate_bank_bytes
    story = load_story(args.stories[0])
    result = generate_story(backbone, story, "isolated", config=config, num_inference_steps=args.steps, progress=False)
    print("\n## Reference bank\n")
    for name in result.bank.characters:
        print(f"toy, {name}: {result.bank.nbytes(name):,} bytes ({args.steps or backbone.default_steps} steps, float32)")
    with torch.device("meta"):
        sdxl_unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    sdxl = IsolationConfig()  # what SDXL runs with: METHOD.md's defaults (the toy may set its own)
    for fraction in (0.1, 0.25):  # the bank SDXL writes: warm-up not stored, every k-th step and layer
        estimate = estimate_bank_bytes(sdxl_unet, (128, 128), 50, fraction, 2, warmup=sdxl.warmup,
                                       step_stride=sdxl.bank_step_stride, layer_stride=sdxl.bank_layer_stride)
        print(f"SDXL 1024² estimate, one character covering {fraction:.0%} of the image, 50 steps, fp16, "
              f"every {sdxl.bank_step_stride} step(s) after warm-up stored: {estimate / 1e9:.2f} GB (from the layer shapes)")


if __name__ == "__main__":
    main()
