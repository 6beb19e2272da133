"""Operators and synchronisations per denoising step, per method, on the full-size SDXL
architecture (random weights): a CPU-measurable stand-in for the host time that bounds
isolated attention on a GPU (issue 14: "the GPU waits for the host").

On an H200 vanilla SDXL at 1024² is already bound by its host (2.2 s of host time against 1.4 s
of GPU time per scene), so each extra operator a step dispatches costs host time (a kernel
launch) whatever its size. This script counts, with a ``TorchDispatchMode``, every aten operator
and every synchronising one (``.item()``, ``.tolist()``, ``nonzero``, boolean indexing) of one
scene whose two characters return, per denoising step, split into the work done inside the
attention processors' calls and the rest (U-Net, scheduler, step callback).

    python scripts/research/count_ops.py                 # CPU, bf16, 256², 6 steps: about 3 minutes
    python scripts/research/count_ops.py --out results   # also writes results/op_counts.md

The counts do not depend on the device; their host time per operator does.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]

from osa_lib import IsolationConfig, generate_story, load_backbone
from osa_lib.isolation import IsolationController
from osa_lib.story import parse_story

STORY = {"characters": [{"name": "Lily", "word": "girl", "id_prompt": "a girl with blonde hair and a red dress"},
                        {"name": "Tom", "word": "boy", "id_prompt": "a boy with black hair"}],
         "scenes": [{"prompt": "a girl with blonde hair in the park", "characters": ["Lily"], "seed": 0},
                    {"prompt": "a boy with black hair on the beach", "characters": ["Tom"], "seed": 1},
                    {"prompt": "a girl and a boy in the snow", "characters": ["Lily", "Tom"], "seed": 2}]}
SYNCHRONISING = {"_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero"}
FREE = {"detach", "view", "_unsafe_view", "alias", "t", "transpose", "expand", "unsqueeze", "squeeze", "select",
        "slice", "permute", "as_strided", "_reshape_alias", "split", "unbind", "lift_fresh"}  # no kernel


class OpCounter(TorchDispatchMode):
    """Counts aten operators that launch work (views excluded) and synchronising ones,
    attributed to "attention" while an attention processor runs and "other" otherwise.

    ``F.scaled_dot_product_attention`` counts as one operator: on a GPU one fused kernel runs it
    (flash, memory-efficient or cuDNN), while the CPU may take the math path, whose matmuls and
    softmax would otherwise be counted one by one."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.where = Counter(), Counter(), "other"
        self.names: Counter = Counter()
        self.in_sdpa = False

    def sdpa(self, real):
        def fused(*args, **kwargs):
            if self.in_sdpa:
                return real(*args, **kwargs)
            self.ops[self.where] += 1
            self.names[(self.where, "scaled_dot_product_attention")] += 1
            self.in_sdpa = True
            try:
                return real(*args, **kwargs)
            finally:
                self.in_sdpa = False
        return fused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if self.in_sdpa:
            return func(*args, **(kwargs or {}))
        if name in SYNCHRONISING:
            self.syncs[self.where] += 1
        if name not in FREE:
            self.ops[self.where] += 1
            self.names[(self.where, name)] += 1
        return func(*args, **(kwargs or {}))


def attributed(counter: OpCounter, where: str, fn):
    """``fn``, with the operators it dispatches counted under ``where``."""
    def call(*args, **kwargs):
        before, counter.where = counter.where, where
        try:
            return fn(*args, **kwargs)
        finally:
            counter.where = before
    return call


class _Counted:
    """An attention processor wrapped so the counter knows when an attention layer runs."""
    _counted = True

    def __init__(self, inner, counter: OpCounter):
        self.inner, self._call = inner, attributed(counter, "attention", inner)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def count(backbone, story, method: str, steps: int, bank, config: IsolationConfig):
    counter = OpCounter()
    original_set = backbone.unet.set_attn_processor

    def set_wrapped(processors):  # every processor installed during the run is wrapped
        return original_set({k: (p if getattr(p, "_counted", False) else _Counted(p, counter))
                             for k, p in processors.items()})
    backbone.unet.set_attn_processor = set_wrapped
    backbone.unet.set_attn_processor(dict(backbone.unet.attn_processors))  # vanilla's own processors too
    original_callback = IsolationController.step_callback
    IsolationController.step_callback = attributed(counter, "step callback", original_callback)
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = counter.sdpa(real_sdpa)
    try:
        with counter:
            generate_story(backbone, story, method, config=config, bank=bank, num_inference_steps=steps,
                           progress=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
        IsolationController.step_callback = original_callback
        backbone.unet.set_attn_processor = original_set
        original_set({k: getattr(p, "inner", p) for k, p in backbone.unet.attn_processors.items()})
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--backbone", default="sdxl-random", help="sdxl-random (full size) or sdxl-tiny")
    parser.add_argument("--top", type=int, default=12, help="most frequent operators to list per method")
    parser.add_argument("--out", default=None, help="folder for op_counts.md")
    args = parser.parse_args()
    backbone = load_backbone(args.backbone, device="cpu", dtype=torch.bfloat16)
    backbone.latent_shape = (backbone.latent_shape[0], args.size // 8, args.size // 8)
    decode = backbone.decode
    backbone.decode = lambda latents, check_finite=True: decode(latents, check_finite=False)  # random weights
    story = parse_story(STORY, "count_ops")
    config = IsolationConfig()
    bank = generate_story(backbone, story, "isolated", config=config, num_inference_steps=args.steps,
                          progress=False).bank
    last = dataclasses.replace(story, scenes=story.scenes[-1:])
    variants = [("vanilla", "vanilla", config), ("csa", "csa", config), ("isolated", "isolated", config),
                ("isolated, both branches off", "isolated",
                 dataclasses.replace(config, isolated_self=False, isolated_cross=False))]
    lines = [f"# Operators per denoising step: {args.backbone}, {args.size}², {args.steps} steps, bf16 on the CPU",
             "", "One scene with two returning characters (METHOD.md's defaults). Views are not counted.", "",
             "| method | ops / step in attention calls | in the step callback | elsewhere | all / step | × vanilla | "
             "synchronisations / step |", "|---|---|---|---|---|---|---|"]
    tops = []
    base = None
    for label, method, cfg in variants:
        c = count(backbone, last, method, args.steps, bank if method == "isolated" else None, cfg)
        per = {k: v / args.steps for k, v in c.ops.items()}
        total = sum(per.values())
        base = base or total
        lines.append(f"| {label} | {per.get('attention', 0):.0f} | {per.get('step callback', 0):.0f} | "
                     f"{per.get('other', 0):.0f} | {total:.0f} | "
                     f"{total / base:.2f} | {sum(c.syncs.values()) / args.steps:.1f} |")
        top = ", ".join(f"{w[0]}:{w[1]} {n / args.steps:.1f}" for w, n in c.names.most_common(args.top))
        top += "; syncs where: " + ", ".join(f"{w} {n / args.steps:.1f}" for w, n in c.syncs.items())
        tops.append(f"- {label}: {top}")
        print(lines[-1], flush=True)
    text = "\n".join(lines + ["", "Most frequent operators per step (where:name count):"] + tops) + "\n"
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "op_counts.md").write_text(text)


if __name__ == "__main__":
    main()
