"""Where isolated attention's extra time per scene goes on a GPU (issue 14): the full-size random
SDXL at 1024², fp16, a scene whose two characters return, timed (warm, synchronised) under
variants that switch parts of the method off one at a time. Prints a table; writes it to
``<out>/isolated_overhead.md``.

    python scripts/research/isolated_overhead.py --out "$OUT"
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from osa_lib import IsolationConfig, generate_story, load_backbone
from osa_lib.isolation import IsolationController
from osa_lib.story import parse_story

STORY = {"characters": [{"name": "Lily", "word": "girl", "id_prompt": "a girl with blonde hair and a red dress"},
                        {"name": "Tom", "word": "boy", "id_prompt": "a boy with black hair"}],
         "scenes": [{"prompt": "a girl with blonde hair in the park", "characters": ["Lily"], "seed": 0},
                    {"prompt": "a boy with black hair on the beach", "characters": ["Tom"], "seed": 1},
                    {"prompt": "a girl and a boy in the snow", "characters": ["Lily", "Tom"], "seed": 2}]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="gpu_out")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (bf16)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    backbone = load_backbone("sdxl-random", device=args.device, dtype=torch.float16 if cuda else torch.bfloat16)
    backbone.latent_shape = (backbone.latent_shape[0], args.size // 8, args.size // 8)
    decode = backbone.decode
    backbone.decode = lambda latents, check_finite=True: decode(latents, check_finite=False)  # random weights
    story = parse_story(STORY, "overhead")
    bank = generate_story(backbone, story, "isolated", num_inference_steps=args.steps, progress=False).bank
    last = dataclasses.replace(story, scenes=story.scenes[-1:])
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    variants = [("vanilla", "vanilla", {}, None, False),
                ("vanilla + maps recorded", "vanilla", {}, None, True),
                ("isolated (default)", "isolated", {}, None, False),
                ("isolated, self-attention branch off", "isolated", {"isolated_self": False}, None, False),
                ("isolated, cross-attention branch off", "isolated", {"isolated_cross": False}, None, False),
                ("isolated, both branches off (maps, masks only)", "isolated",
                 {"isolated_self": False, "isolated_cross": False}, None, False),
                ("isolated, SDPA without cuDNN", "isolated", {}, no_cudnn, False),
                ("vanilla, SDPA without cuDNN", "vanilla", {}, no_cudnn, False)]
    step_times: list[float] = []
    original = IsolationController.step_callback

    def timed(self, *a, **k):  # synchronised per-step timestamps (only for the per-step line)
        sync()
        step_times.append(time.perf_counter())
        return original(self, *a, **k)

    rows = []
    for label, method, options, backends, record in variants:
        seconds = []
        for _ in range(3):  # the first run builds kernels/plans for new shapes; report the later ones
            with sdpa_kernel(backends) if backends else nullcontext():
                sync()
                t0 = time.perf_counter()
                generate_story(backbone, last, method, config=IsolationConfig(**options),
                               bank=bank if method == "isolated" else None, num_inference_steps=args.steps,
                               record_masks=record, progress=False)
                sync()
                seconds.append(time.perf_counter() - t0)
        rows.append((label, seconds))
        print(f"{label}: " + ", ".join(f"{s:.3f}" for s in seconds) + " s", flush=True)
    IsolationController.step_callback = timed
    generate_story(backbone, last, "isolated", bank=bank, num_inference_steps=args.steps, progress=False)
    IsolationController.step_callback = original
    per_step = [1000 * (b - a) for a, b in zip(step_times, step_times[1:])]
    base = min(rows[0][1][1:])
    lines = [f"# Isolated attention's time on {torch.cuda.get_device_name(0) if cuda else 'CPU'}, sdxl-random {backbone.dtype} {args.size}², "
             f"{args.steps} steps, one scene with two returning characters", "",
             "| variant | runs (s) | best warm run / vanilla |", "|---|---|---|"]
    lines += [f"| {label} | {', '.join(f'{s:.3f}' for s in sec)} | {min(sec[1:]) / base:.3f} |" for label, sec in rows]
    lines += ["", "Per-step ms of a synchronised isolated run (step 1 onward): "
              + ", ".join(f"{t:.0f}" for t in per_step)]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "isolated_overhead.md").write_text(text)


if __name__ == "__main__":
    main()
