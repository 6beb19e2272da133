"""How long a change of one of notebook 04's live controls takes to redraw the story strip.

Builds the strip of the notebook's story as the notebook does (``osa_lib.controls.StoryStrip``),
draws the first state, then changes each control once (λ, w, warm-up, the overlap rule) and times
the redraw: the new isolated row and the figure rendered to PNG, as the notebook's image. Prints
wall-clock and CPU seconds per change against the 5-second target; not a test (the machine's load
moves wall-clock times).

    .venv/bin/python scripts/bench_controls.py [--steps 25] [--threads 2] [--story data/stories/toy_uncoloured_pair.yaml]
    .venv/bin/python scripts/bench_controls.py --threads 1 --md results/bench_controls.md   # kept with its provenance

Torch's threads matter more than cores here: the toy U-Net is small, so a second thread that has to
wait for a busy core (another process on it) makes every step slower, not faster.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

TARGET_SECONDS = 5.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--story", default=str(Path(__file__).resolve().parents[1] / "data/stories/toy_uncoloured_pair.yaml"))
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (notebook 04's full run: 25)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default 2 cores)")
    parser.add_argument("--md", help="also write the table to this Markdown file (results/ style, with provenance)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import matplotlib
    matplotlib.use("Agg")
    from osa_lib import load_backbone, load_story
    from osa_lib.controls import StoryStrip
    from osa_lib.figures import figure_png

    backbone = load_backbone("toy")
    story = load_story(args.story)
    config = backbone.isolation_config()
    strip = StoryStrip(backbone, story, num_inference_steps=args.steps)
    changes = [("first state", {}), ("λ", {"lam": 0.5 if config.lam != 0.5 else 1.0}),
               ("w", {"reweight": 0.0 if config.reweight else 1.0}),
               ("warm-up", {"warmup": 0.3 if config.warmup != 0.3 else 0.1}),
               ("overlap rule", {"overlap_rule": "argmax" if config.overlap_rule != "argmax" else "lower_cv"}),
               ("λ back to the first value", {})]
    setting = (f"story {Path(args.story).name} ({len(story.scenes)} scenes, {strip.intro} opening), {args.steps} steps, "
               f"{args.threads} torch threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    print(setting)
    print(f"{'change':<28}{'wall s':>8}{'CPU s':>8}{'scenes drawn':>14}  target ≤ {TARGET_SECONDS:g} s")
    rows = []
    current = config
    for label, change in changes:
        current = dataclasses.replace(current, **change) if change else (config if label.startswith("λ back") else current)
        drawn, wall, cpu = strip.generated_scenes, time.perf_counter(), time.process_time()
        figure_png(strip.figure(current))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        verdict = "" if label == "first state" else ("met" if wall <= TARGET_SECONDS else "NOT met")
        print(f"{label:<28}{wall:>8.2f}{cpu:>8.2f}{strip.generated_scenes - drawn:>14}  {verdict}")
        rows.append({"change": label, "wall s": wall, "CPU s": cpu, "scenes drawn": strip.generated_scenes - drawn,
                     f"≤ {TARGET_SECONDS:g} s": verdict or "(first drawing)"})
    if args.md:
        from osa_lib.records import command_line, markdown_table, write_results
        write_results(args.md, "How fast notebook 04's live controls redraw the story strip",
                      setting + ".\n\n" + markdown_table(rows), command_line("python scripts/bench_controls.py", argv))


if __name__ == "__main__":
    main()
