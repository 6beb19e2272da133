"""Overhead of recording cross-attention versus plain sampling on the toy backbone, one run.

    python scripts/research/bench_capture.py

Prints the best-of-N wall time of the same generation (same prompts, seeds, steps) without and
with ``capture_attention`` on every cross-attention layer, their ratio (target <= 1.25), and the
peak memory the store holds (it keeps a running mean, so it does not grow with steps).
"""
from __future__ import annotations

import time


from osa_lib import AttentionStore, capture_attention, load_backbone


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    backbone = load_backbone("toy")
    prompts = ["a red circle and a blue square in the snow"] * 8
    seeds = list(range(8))
    cond, latents = backbone.encode(prompts), backbone.initial_latents(seeds)
    groups = [[backbone.token_positions(p, "circle"), backbone.token_positions(p, "square")] for p in prompts]

    def plain():
        backbone.denoise(cond, latents, progress=False)

    store = AttentionStore(groups, backbone.latent_shape[1:])

    def captured():
        store.reset()
        with capture_attention(backbone.unet, store):
            backbone.denoise(cond, latents, callback=store.step_callback, progress=False)

    plain(), captured()  # warm up
    t_plain, t_capture = [], []
    for _ in range(3):  # interleave so machine load affects both alike
        t_plain.append(best_of(plain, 2)), t_capture.append(best_of(captured, 2))
    stored = sum(t.numel() * t.element_size() for t in store._sums.values())
    print(f"plain sampling (8 images, {backbone.default_steps} steps): {min(t_plain):.3f} s")
    print(f"with capture on every cross-attention layer:          {min(t_capture):.3f} s")
    print(f"time ratio capture / plain: {min(t_capture) / min(t_plain):.3f}  (target <= 1.25)")
    print(f"store memory: {stored:,} bytes for {len(store._sums)} layers (running mean; independent of steps)")


if __name__ == "__main__":
    main()
