"""Measure the shipped toy model with the analyzer, on prompts held out from training.

    python -m osa_lib.toy.probes.evaluate                # full run, prints the README table
    python -m osa_lib.toy.probes.evaluate --seeds 4      # quicker

Held-out prompts use (colour, shape, scene) triples never rendered in training
(``world.HELD_OUT_TRIPLES``), so the model must compose words it has only seen apart.
Five measurements, each with the project's target:
1. single-character prompts: named shape, colour and scene right (target >= 90 %);
2. two-character prompts: both characters present with their named attributes (>= 70 %);
3. a prompt that names no colour: distinct colour families over 16 seeds (>= 4);
4. cross-attention concentration: IoU of each character word's Otsu mask with the analyzer's
   mask, on two-character scenes (target: a mean >= 0.5); as diagnostics, the
   same IoU on single-character scenes, and the two masks together against both characters
   together (do the maps find the objects, even when they do not tell them apart?);
5. the single-character prompts with their colour word dropped ("a circle in the snow"): how
   often the named shape is drawn at all, against the coloured prompts on the same seeds
   (target: within 5 points), since stories with uncoloured ID prompts rest on them.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from tqdm import tqdm

from ...backbones import load_backbone
from ...experiments.maps import generate_with_maps, mask_iou_records
from .. import world
from ...records import command_line, write_results
from ..analyzer import analyze_image, mask_iou
from ..metrics import check_prompt

__all__ = ["held_out_prompts", "evaluate_model", "format_report", "main"]



def held_out_prompts(n_two: int = 24, seed: int = 0) -> tuple[list[str], list[str]]:
    """Single-character prompts for every held-out triple, and two-character prompts that each
    contain one held-out triple."""
    rng = np.random.default_rng(seed)
    held = sorted(world.HELD_OUT_TRIPLES)
    singles = [f"a {c} {s} in the {sc}" for c, s, sc in held]
    twos = []
    for i in range(n_two):
        c1, s1, sc = held[i % len(held)]
        c2 = str(rng.choice([c for c in world.COLOURS if c != c1]))
        s2 = str(rng.choice([s for s in world.SHAPES if s != s1]))
        first, second = (f"{c1} {s1}", f"{c2} {s2}") if rng.random() < 0.5 else (f"{c2} {s2}", f"{c1} {s1}")
        twos.append(f"a {first} and a {second} in the {sc}")
    return singles, twos


def _batched(backbone, prompts, seeds, batch_size, **kwargs):
    images = []
    for i in range(0, len(prompts), batch_size):
        images.append(backbone.generate(prompts[i:i + batch_size], seeds[i:i + batch_size], **kwargs))
    return np.concatenate(images)


def evaluate_model(backbone, seeds_per_prompt: int = 8, n_two: int = 24, no_colour_seeds: int = 16,
                   batch_size: int = 32, seed: int = 10_000, progress: bool = True) -> dict:
    """All five measurements; returns a dict of rates and counts (see the module docstring)."""
    singles, twos = held_out_prompts(n_two)
    out = {}
    # 1 + 2: named attributes on held-out prompts
    for label, prompts in (("single", singles), ("two", twos)):
        all_prompts = [p for p in prompts for _ in range(seeds_per_prompt)]
        seeds = [seed + i for i in range(len(all_prompts))]
        images = _batched(backbone, all_prompts, seeds, batch_size, progress=progress)
        checks = [check_prompt(im, p) for im, p in zip(images, all_prompts)]
        chars = [r for c in checks for r in c["characters"]]
        out[label] = {"n_images": len(checks), "all_ok": float(np.mean([c["all_ok"] for c in checks])),
                      "scene_ok": float(np.mean([c["scene_ok"] for c in checks])),
                      "character_ok": float(np.mean([r["ok"] for r in chars])),
                      "character_found": float(np.mean([r["found"] for r in chars]))}
        if label == "two":
            out[label]["both_ok"] = float(np.mean([all(r["ok"] for r in c["characters"]) for c in checks]))
    # 5: the same single-character prompts and seeds without their colour word
    uncoloured = [f"a {s} in the {sc}" for _, s, sc in sorted(world.HELD_OUT_TRIPLES)]
    all_prompts = [p for p in uncoloured for _ in range(seeds_per_prompt)]
    images = _batched(backbone, all_prompts, [seed + i for i in range(len(all_prompts))], batch_size, progress=progress)
    out["uncoloured"] = {"n_images": len(all_prompts), "character_found": float(np.mean(
        [r["found"] for im, p in zip(images, all_prompts) for r in check_prompt(im, p)["characters"]]))}
    # 3: colour diversity when no colour is named
    diversity = {}
    for shape in world.SHAPES:
        prompt = f"a {shape} in the {world.SCENES[world.SHAPES.index(shape)]}"
        images = _batched(backbone, [prompt] * no_colour_seeds, [seed + 500 + i for i in range(no_colour_seeds)],
                          batch_size, progress=progress)
        colours = {d.colour for im in images for d in analyze_image(im) if d.shape == shape}
        diversity[prompt] = sorted(colours)
    out["no_colour"] = {"prompts": diversity, "min_distinct": min(len(v) for v in diversity.values())}
    # 4: cross-attention concentration: two-character scenes (the target), and as diagnostics
    # single-character scenes and the two masks together against both characters together
    for label, prompts, offset in (("mask_iou", twos, 900), ("mask_iou_single", singles * 2, 700)):
        records = []
        for i in tqdm(range(0, len(prompts), batch_size // 2), desc=label, disable=not progress):
            chunk = prompts[i:i + batch_size // 2]
            words = [[c["shape"] for c in world.parse_caption(p)["characters"]] for p in chunk]
            run = generate_with_maps(backbone, chunk, words, [seed + offset + i + k for k in range(len(chunk))],
                                     places=("up",), progress=False)
            records += [{**r, "image": i + r["image"]} for r in mask_iou_records(run)]  # index over all prompts
        ious = [r["iou"] for r in records if r["iou"] is not None]
        out[label] = {"mean": float(np.mean(ious)) if ious else float("nan"), "n_scored": len(ious),
                      "n_characters": len(records)}
        if label == "mask_iou":
            out["mask_iou_union"] = _union_iou(records)
    return out


def _union_iou(records: list[dict]) -> dict:
    """Mean over images with every character drawn: IoU of the union of the characters' masks
    with the union of their analyzer masks. High while per-character IoU is low means the
    maps find the objects but not which object a word names."""
    by_image: dict[int, list[dict]] = {}
    for r in records:
        by_image.setdefault(r["image"], []).append(r)
    ious = [mask_iou(np.any([r["mask"] for r in rows], 0), np.any([r["truth_mask"] for r in rows], 0))
            for rows in by_image.values() if all(r["truth_mask"] is not None for r in rows)]
    return {"mean": float(np.mean(ious)) if ious else float("nan"), "n_images": len(ious)}


def format_report(r: dict) -> str:
    """The README table of ``evaluate_model``'s result."""
    return "\n".join([
        "| measurement (held-out prompts) | result | target |",
        "|---|---|---|",
        f"| single character: shape, colour and scene right | {100 * r['single']['all_ok']:.1f} % "
        f"({r['single']['n_images']} images) | >= 90 % |",
        f"| two characters: both present with named attributes | {100 * r['two']['both_ok']:.1f} % "
        f"({r['two']['n_images']} images; scene right {100 * r['two']['scene_ok']:.0f} %) | >= 70 % |",
        f"| no colour named: distinct colours over 16 seeds (min over 4 prompts) | "
        f"{r['no_colour']['min_distinct']} | >= 4 |",
        f"| Otsu mask IoU vs analyzer, two-character scenes | {r['mask_iou']['mean']:.2f} "
        f"({r['mask_iou']['n_scored']} of {r['mask_iou']['n_characters']} characters drawn) | >= 0.5 |",
        f"| (diagnostic) both masks together vs both characters together, same scenes | "
        f"{r['mask_iou_union']['mean']:.2f} ({r['mask_iou_union']['n_images']} images) | - |",
        f"| (diagnostic) Otsu mask IoU, single-character scenes | {r['mask_iou_single']['mean']:.2f} "
        f"({r['mask_iou_single']['n_scored']} of {r['mask_iou_single']['n_characters']} drawn) | - |",
        f"| colour word dropped: named shape drawn, against the coloured prompts on the same seeds | "
        f"{100 * r['uncoloured']['character_found']:.1f} % vs {100 * r['single']['character_found']:.1f} % "
        f"({r['uncoloured']['n_images']} images each) | within 5 points |",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="toy pipeline folder (default: the shipped backbone, data/toy_model with data/toy_finetune)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per held-out prompt")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    parser.add_argument("--md", default=None, help="also write the table here, with the command, commit and machine")
    args = parser.parse_args(argv)
    backbone = load_backbone("toy", model_id=args.model)
    result = evaluate_model(backbone, seeds_per_prompt=args.seeds)
    print(format_report(result))
    if args.md:
        command = command_line("python -m osa_lib.toy.probes.evaluate", argv)
        write_results(args.md, "Toy model quality on held-out prompts", format_report(result), command)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
