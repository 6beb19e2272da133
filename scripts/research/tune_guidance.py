"""Pick the toy model's classifier-free guidance scale on validation prompts, not on the test set.

The validation prompts are fresh captions from the training distribution (random scenes whose
colour x shape x scene triples are *not* held out), so the held-out prompts that
``python -m osa_lib.toy.probes.evaluate`` reports on play no part in the choice. For every scale the
script generates the same prompts with the same seeds and prints how often the analyzer finds
what the prompt names; the scale with the best mean of the single- and two-character rates wins.

    python scripts/research/tune_guidance.py                       # scales 1 1.25 1.5 2 2.5 3 4
    python scripts/research/tune_guidance.py --scales 1 2 3 --prompts 16 --steps 50
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from osa_lib.backbones import load_backbone
from osa_lib.toy import world
from osa_lib.toy.metrics import check_prompt


def validation_prompts(n_characters: int, count: int, seed: int) -> list[str]:
    """Training-distribution captions naming every character's colour, with this many characters."""
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, n_characters=n_characters, p_drop_colour=0.0,
                               exclude=world.HELD_OUT_TRIPLES).caption for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="toy pipeline folder (default: the shipped backbone, data/toy_model with data/toy_finetune)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0])
    parser.add_argument("--prompts", type=int, default=32, help="prompts per character count")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the backbone's)")
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--md", default=None, help="also write the table here, with the command, commit and machine")
    args = parser.parse_args()
    lines = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    torch.set_num_threads(args.threads)
    backbone = load_backbone("toy", model_id=args.model)
    prompts = {n: validation_prompts(n, args.prompts, args.seed + n) for n in (1, 2)}
    say(f"{args.prompts} validation prompts per character count, one seed each, "
          f"{args.steps or backbone.default_steps} steps; rates are all-named-facts-right (shape, colour, scene)")
    say("\n| guidance | one character | two characters | mean |")
    say("|---|---|---|---|")
    best = None
    for scale in args.scales:
        rates = []
        for n, batch in prompts.items():
            seeds = [args.seed * 1000 + i for i in range(len(batch))]
            images = backbone.generate(batch, seeds, guidance_scale=scale,
                                       num_inference_steps=args.steps, progress=False)
            rates.append(float(np.mean([check_prompt(im, p)["all_ok"] for im, p in zip(images, batch)])))
        mean = float(np.mean(rates))
        say(f"| {scale:g} | {100 * rates[0]:.1f} % | {100 * rates[1]:.1f} % | {100 * mean:.1f} % |")
        if best is None or mean > best[1]:
            best = (scale, mean)
    say(f"\nbest guidance scale on validation prompts: {best[0]:g} (the toy backbone uses "
        f"{backbone.default_guidance:g})")
    if args.md:
        from osa_lib.figures import command_line, write_results
        write_results(args.md, "Toy guidance scale on validation prompts", "\n".join(lines),
                      command_line("python scripts/research/tune_guidance.py"))


if __name__ == "__main__":
    main()
