"""Pick a toy model's own isolated-attention switches on validation seeds, not on the evaluation's.

METHOD.md marks the re-weighting strength ``w`` (``log(1 + w·Â)``), the 20 % warm-up and the bank's
step stride as choices. On a small model the attention a character's queries pay its reference is
modest, so ``w`` decides how much of the reference reaches them. This script runs isolated
attention on the uncoloured stories (``data/stories/toy_uncoloured_*.yaml``) with each candidate
config and vanilla beside it, all on the same seeds, and prints colour kept (the share of later
appearances in the first appearance's colour family) with IIS-toy, attribute accuracy and the
two uncoloured characters' mixing. The seeds are the stories' own shifted by 500,000 + k·1,000,
never the 0..19,000 offsets that ``scripts/evaluate_stories.py`` reports on. The config with the
highest colour kept wins; the winner goes, by hand, into the model folder's ``isolation.json``.

    python scripts/tune_isolation.py --model runs/new --seeds 6 --md results/toy_isolation_tuning.md
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from osa_lib import IsolationConfig, load_backbone, load_story  # noqa: E402
from osa_lib.experiments import StoryScorer, mean_and_sem  # noqa: E402

VALIDATION_OFFSET = 500_000  # scripts/evaluate_stories.py shifts by k * 1000, k < its --seeds
STORIES = ("toy_uncoloured_single", "toy_uncoloured_pair", "toy_uncoloured_newcomer")
METHOD_DEFAULTS = "METHOD.md (w 1, warm-up 20 %, every 3rd step)"
COLUMNS = ("colour kept", "IIS-toy", "attribute accuracy", "mixing rate", "flood rate")


def weight_candidates(weights: list[float]) -> dict:
    """METHOD.md's defaults, then each ``w`` with no warm-up and every step stored (``--weights``)."""
    return {METHOD_DEFAULTS: {},
            **{f"w {w:g}, no warm-up, every step": dict(reweight=w, warmup=0.0, bank_step_stride=1) for w in weights}}


#: name -> IsolationConfig fields; METHOD.md's defaults first
CANDIDATES = {METHOD_DEFAULTS: {}, "w 16, warm-up 20 %, every 3rd step": dict(reweight=16.0),
              **weight_candidates([1.0, 4.0, 8.0, 16.0, 32.0])}


def parse_configs(text: str) -> dict:
    """``--configs``: ``;``-separated candidates, each ``field=value,...`` of ``IsolationConfig``.

    >>> parse_configs("reweight=16,warmup=0,lam=0.5; reweight=4")
    {'reweight=16, warmup=0, lam=0.5': {'reweight': 16.0, 'warmup': 0.0, 'lam': 0.5}, 'reweight=4': {'reweight': 4.0}}
    """
    fields = {f.name: f.type for f in dataclasses.fields(IsolationConfig)}
    candidates = {}
    for spec in filter(None, (part.strip() for part in text.split(";"))):
        config, items = {}, [item.strip() for item in spec.split(",")]
        for item in items:
            name, sep, value = (piece.strip() for piece in item.partition("="))
            if not sep or name not in fields:
                raise SystemExit(f"--configs: {item!r} is not field=value with a field of IsolationConfig "
                                 f"({', '.join(fields)}); e.g. --configs 'reweight=16,warmup=0,lam=0.5'")
            kind = fields[name] if isinstance(fields[name], str) else fields[name].__name__
            config[name] = (value.lower() in ("1", "true", "yes") if kind == "bool"
                            else None if value.lower() == "none"
                            else int(value) if kind.startswith("int") else value if kind == "str" else float(value))
        IsolationConfig(**config)  # a value out of range fails here, before anything runs
        candidates[", ".join(items)] = config
    return candidates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="toy pipeline folder (default data/toy_model)")
    parser.add_argument("--seeds", type=int, default=6, help="validation seeds per story")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the backbone's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=lambda text: [float(w) for w in text.split(",")], default=None,
                        help="comma-separated w values to try with no warm-up and every step, instead of "
                             "the built-in candidates (METHOD.md's defaults always run too), e.g. 16,64,128")
    parser.add_argument("--configs", type=parse_configs, default=None,
                        help="';'-separated IsolationConfig candidates, each 'field=value,...', tried after "
                             "--weights' (or instead of the built-in ones), e.g. 'reweight=16,warmup=0,lam=0.5'")
    parser.add_argument("--md", default=None, help="also write the table here, with the command, commit and machine")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    backbone = load_backbone("toy", model_id=args.model)
    root = Path(__file__).resolve().parents[1] / "data" / "stories"
    stories = [load_story(root / f"{name}.yaml").with_seed_offset(VALIDATION_OFFSET) for name in STORIES]
    scorer = StoryScorer(backbone, args.seeds, **({} if args.steps is None else {"num_inference_steps": args.steps}))
    runs = {"vanilla": ("vanilla", None)}
    candidates = CANDIDATES if args.weights is None and args.configs is None else \
        {**weight_candidates(args.weights or []), **(args.configs or {})}
    runs.update({name: ("isolated", IsolationConfig(**fields)) for name, fields in candidates.items()})
    lines = []

    def say(text: str) -> None:  # printed as it comes, and kept for --md
        print(text, flush=True)
        lines.append(text)

    say(f"{len(STORIES)} uncoloured stories x {args.seeds} validation seeds, every run on the same seeds; "
        "mean ± standard error over story seeds (mixing: the pair story's meetings only).\n")
    say("| run | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS))
    best = None
    for name, (method, config) in runs.items():
        rows = [scorer.seed_metrics(story, method, config, k) for story in stories for k in range(args.seeds)]
        stats = mean_and_sem([{c: r[c] for c in COLUMNS} for r in rows])
        say(f"| {name} | " + " | ".join(f"{stats[c][0]:.1f} ± {stats[c][1]:.1f}" for c in COLUMNS) + " |")
        kept = stats["colour kept"][0]
        kept = -1.0 if kept != kept else kept  # NaN: no later appearance was drawn
        if method == "isolated" and (best is None or kept > best[1]):
            best = (name, kept)
    say(f"\nHighest colour kept: **{best[0]}** ({best[1]:.1f} %). The model being tuned runs with "
        f"{backbone.isolation_defaults or 'METHOD.md defaults'} now; {time.perf_counter() - started:.0f} s.")
    if args.md:
        from osa_lib.figures import write_results
        write_results(args.md, "Isolated attention's switches for a toy model, on validation seeds", "\n".join(lines),
                      "python scripts/tune_isolation.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
