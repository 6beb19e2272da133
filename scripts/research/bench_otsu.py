"""Benchmark: batched torch Otsu (osa_lib.masks.otsu_masks) vs a Python loop of skimage.

Both run on the CPU, on the same maps, timed in the same process, interleaved; each figure is
the best of ``--repeats`` runs (best-of filters out interruptions by other processes). torch is limited to
``--threads`` threads (default 1): skimage's loop is single-threaded, and on a shared machine
extra torch threads mostly wait for a core.

    python scripts/research/bench_otsu.py                 # 64 maps of 64x64, as SDXL's largest up-block grid
    python scripts/research/bench_otsu.py --maps 256 --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from skimage.filters import threshold_otsu

from osa_lib.masks import otsu_masks, otsu_threshold


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds, in seconds.

    The functions are interleaved round by round, so a burst of load from another process
    hits all of them alike instead of skewing whichever happened to run during it.
    """
    for fn in fns.values():  # warm-up
        fn()
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=64, help="number of maps")
    parser.add_argument("--size", type=int, default=64, help="maps are size x size")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs; the best is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(args.seed)
    # attention-like maps: a soft blob per map plus noise, so Otsu has something to find
    n, s = args.maps, args.size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    centres = torch.rand(n, 2, generator=g)
    blob = torch.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 0.02)
    A = (blob + 0.3 * torch.rand(n, s, s, generator=g)).contiguous()  # (n, s, s)
    A_np = A.numpy()

    t = best_of(
        {
            "torch": lambda: otsu_masks(A),
            "sk": lambda: [threshold_otsu(m) for m in A_np],
            "sk_masks": lambda: [m > threshold_otsu(m) for m in A_np],
        },
        args.repeats,
    )
    t_torch, t_sk, t_sk_masks = t["torch"], t["sk"], t["sk_masks"]

    ours = otsu_threshold(A).numpy()
    ref = np.array([threshold_otsu(m) for m in A_np])
    width = (A_np.max(axis=(1, 2)) - A_np.min(axis=(1, 2))) / 256

    print(f"{n} maps of {s}x{s}, float32, CPU, torch {torch.__version__} threads={args.threads}, "
          f"best of {args.repeats}")
    print(f"  torch otsu_masks (normalise + Otsu + masks, batched): {t_torch * 1e3:8.3f} ms")
    print(f"  skimage threshold_otsu, Python loop:                 {t_sk * 1e3:8.3f} ms")
    print(f"  skimage loop incl. masks (m > threshold_otsu(m)):    {t_sk_masks * 1e3:8.3f} ms")
    print(f"  speed-up (skimage thresholds / torch masks):         {t_sk / t_torch:8.1f}x")
    print(f"  thresholds identical to skimage: {np.mean(ours == ref):.1%}, "
          f"max difference {np.max(np.abs(ours - ref) / width):.2f} bin widths")


if __name__ == "__main__":
    main()
