"""Reference-bank options (issue 14, item 5): bytes per character against the IIS-toy they cost,
on the toy stories, every option on the same seeds in one run.

    python scripts/research/bench_bank_options.py --seeds 6

Options: every step after warm-up (the paper; warm-up steps are never read, so not storing them is
bit-identical), every k-th step after warm-up with the nearest stored step reused (k = 3 is the
default), and every 2nd up-block self-attention layer. Prints IIS-toy (mean ± standard error over
story seeds, and paired differences to every step) and the toy bank's bytes per character, plus
the SDXL 1024², 50-step, fp16 estimate at 25 % coverage. Writes results/bank_options.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]

from osa_lib import IsolationConfig, generate_story, load_backbone, load_story
from osa_lib.backbones import SDXL_UNET_CONFIG
from osa_lib.bank import estimate_bank_bytes
from osa_lib.figures import markdown_table, write_results
from osa_lib.toy.metrics import toy_story_metrics

BASE = "every step (the paper; warm-up not stored)"
OPTIONS = {BASE: {"bank_step_stride": 1}, "every 2nd step": {"bank_step_stride": 2},
           "every 3rd step (default)": {"bank_step_stride": 3},
           "every 2nd layer": {"bank_step_stride": 1, "bank_layer_stride": 2}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--stories", nargs="*", default=sorted(str(p) for p in (ROOT / "data" / "stories").glob("toy_*.yaml")))
    parser.add_argument("--out", default=str(ROOT / "results" / "bank_options.md"))
    args = parser.parse_args()
    backbone = load_backbone("toy", device="cpu")
    iis = {name: [] for name in OPTIONS}
    nbytes = {name: [] for name in OPTIONS}
    started = time.perf_counter()
    for path in args.stories:
        story = load_story(path)
        for k in range(args.seeds):
            shifted = story.with_seed_offset(k * 1000)
            for name, options in OPTIONS.items():
                result = generate_story(backbone, shifted, "isolated", config=IsolationConfig(**options), progress=False)
                iis[name].append(toy_story_metrics(shifted, result)["IIS-toy"])
                nbytes[name] += [result.bank.nbytes(c) for c in result.bank.characters]
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    base = np.array(iis[BASE], float)
    rows = []
    for name, options in OPTIONS.items():
        values = np.array(iis[name], float)
        ok = ~np.isnan(values) & ~np.isnan(base)
        d = values[ok] - base[ok]
        estimate = estimate_bank_bytes(sdxl, (128, 128), 50, 0.25, 2, warmup=0.2,
                                       step_stride=options.get("bank_step_stride", 1),
                                       layer_stride=options.get("bank_layer_stride", 1))
        rows.append({"option": name, "IIS-toy": f"{np.nanmean(values):.2f} ± {np.nanstd(values, ddof=1) / np.sqrt(ok.sum()):.2f}",
                     "Δ vs every step (paired)": f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f}" if len(d) > 1 else "",
                     "toy bank bytes / character": f"{np.mean(nbytes[name]):,.0f}",
                     "SDXL 1024² 50 steps fp16 at 25 % (GB)": f"{estimate / 1e9:.2f}"})
    before = estimate_bank_bytes(sdxl, (128, 128), 50, 0.25, 2, warmup=1 / 50)
    body = (f"{len(args.stories)} stories x {args.seeds} seeds (story seeds = {len(base)}), isolated "
            f"attention, default IsolationConfig otherwise; {time.perf_counter() - started:.0f} s.\n\n"
            + markdown_table(rows) +
            f"\n\nBefore issue 14 the bank also stored the warm-up steps 1..{int(np.ceil(0.2 * 50)) - 1} "
            f"(never read): SDXL estimate {before / 1e9:.2f} GB at 25 % coverage.\n")
    print(body)
    write_results(args.out, "Reference-bank options on the toy stories", body,
                  "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))


if __name__ == "__main__":
    main()
