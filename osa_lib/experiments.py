"""Runs that the notebooks and scripts share: generate with captured maps, score masks against
the toy analyzer, compare overlap rules, compare methods on a story. Notebooks call these and
draw; nothing here plots. Metric definitions live in ``osa_lib.toy.metrics`` (toy world) and
``osa_lib.sdxl_metrics`` (SDXL)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .attention import AttentionStore, capture_attention
from .generation import generate_story
from .masks import OVERLAP_RULES, resize_masks, subject_masks
from .toy.analyzer import analyze_image, largest_detection, mask_iou
from .toy.metrics import id_colours, is_mixed, read_scene, toy_story_metrics

__all__ = ["CapturedRun", "generate_with_maps", "upsample_masks", "character_masks_vs_truth",
           "mask_iou_records", "overlap_rule_table", "rule_verdict", "layer_table", "iou_over_steps",
           "mixing_and_neglect", "compare_methods"]


@dataclass
class CapturedRun:
    """Images and the attention store of one batched generation."""

    prompts: list[str]
    words: list[list[str]]
    seeds: list[int]
    images: np.ndarray  # (B, H, W, 3) in [0, 1]
    store: AttentionStore


def generate_with_maps(backbone, prompts: list[str], words: list[list[str]], seeds: list[int],
                       keep_steps: bool = False, places=("down", "mid", "up"), **kwargs) -> CapturedRun:
    """Generate one image per prompt while recording the cross-attention maps of ``words``.

    Args:
        words: ``words[b]`` = the words whose maps to record in prompt b (same count for all b).
    """
    groups = [[backbone.token_positions(p, w) for w in ws] for p, ws in zip(prompts, words)]
    store = AttentionStore(groups, backbone.latent_shape[1:], keep_steps=keep_steps)
    with capture_attention(backbone.unet, store, places=places):
        latents = backbone.denoise(backbone.encode(prompts), backbone.initial_latents(seeds),
                                   callback=store.step_callback, **kwargs)
    return CapturedRun(list(prompts), [list(w) for w in words], list(seeds), backbone.decode(latents), store)


def upsample_masks(masks: torch.Tensor, size: int) -> np.ndarray:
    """(B, M, h, w) bool -> (B, M, size, size) bool numpy at image size (``masks.resize_masks``)."""
    return resize_masks(masks, (size, size)).cpu().numpy()


def character_masks_vs_truth(image: np.ndarray, shapes: list[str], masks: np.ndarray) -> list[dict]:
    """IoU of each character's mask (M, H, W) with the analyzer's mask of the same shape.

    A character the analyzer cannot find in the image gets ``iou=None`` (not 0): the mask
    cannot be judged when the model did not draw the character.
    """
    detected = analyze_image(image)
    rows = []
    for m, shape in enumerate(shapes):
        truth = largest_detection(detected, shape)
        rows.append({"shape": shape, "iou": None if truth is None else mask_iou(masks[m], truth.mask),
                     "truth_mask": None if truth is None else truth.mask})
    return rows


def mask_iou_records(run: CapturedRun, rule: str = "lower_cv", resolution: int | None = None,
                     step: int | None = None) -> list[dict]:
    """Per (image, character): Otsu-mask IoU against the analyzer, for toy runs whose words are shapes."""
    resolution = resolution or run.store.mask_resolution()
    A = run.store.aggregate(places=("up",), resolution=resolution, step=step)  # (B, M, h, w)
    result = subject_masks(A, rule=rule)
    masks = upsample_masks(result.masks, run.images.shape[1])
    records = []
    for b in range(len(run.prompts)):
        for m, row in enumerate(character_masks_vs_truth(run.images[b], run.words[b], masks[b])):
            records.append({"image": b, "character": m, "word": row["shape"], "iou": row["iou"],
                            "ok": bool(result.ok[b, m]), "reason": result.reasons[b][m],
                            "mask": masks[b, m], "truth_mask": row["truth_mask"]})
    return records


def overlap_rule_table(run: CapturedRun, rules=OVERLAP_RULES, only_overlapping: bool = True) -> dict:
    """Mean IoU against the analyzer per overlap rule, on images where the raw Otsu masks overlap.

    Returns ``{"n_images": int, "rules": {rule: {"mean_iou", "per_image"}}, "images": [...]}``.
    """
    A = run.store.mask_maps()  # (B, M, h, w)
    base = subject_masks(A, rule=rules[0])
    overlapping = (base.raw_masks.sum(1) > 1).flatten(1).any(1)  # (B,)
    chosen = [b for b in range(len(run.prompts)) if overlapping[b] or not only_overlapping]
    table = {"n_images": len(chosen), "images": chosen, "rules": {}}
    for rule in rules:
        masks = upsample_masks(subject_masks(A, rule=rule).masks, run.images.shape[1])
        per_image = []
        for b in chosen:
            ious = [r["iou"] for r in character_masks_vs_truth(run.images[b], run.words[b], masks[b])]
            if all(i is not None for i in ious):  # both characters drawn: the rule can be judged
                per_image.append(float(np.mean(ious)))
            else:
                per_image.append(None)
        valid = [v for v in per_image if v is not None]
        table["rules"][rule] = {"mean_iou": float(np.mean(valid)) if valid else float("nan"),
                                "per_image": per_image, "n_scored": len(valid)}
    return table


def rule_verdict(per_rule: dict[str, list[float]], reference: str = "lower_cv", z: float = 2.0) -> str:
    """Does ``reference`` beat every other rule on paired per-scene IoUs, beyond noise?

    For each other rule the paired difference ``d = IoU_reference - IoU_rule`` over the same scenes
    gives a mean and a standard error; a difference counts only when ``|mean| > z * se``. So the
    verdict is "wins" (ahead of all), "loses" (behind one) or "ties" (otherwise), with the numbers.
    """
    ref = np.asarray(per_rule[reference], float)  # (scenes,)
    if len(ref) < 2:
        return f"cannot be judged on {len(ref)} scene(s)"
    parts, ahead, behind = [], [], []
    for rule, values in per_rule.items():
        if rule == reference:
            continue
        d = ref - np.asarray(values, float)  # (scenes,) paired differences
        mean, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
        (ahead if mean > z * se else behind if mean < -z * se else []).append(rule)
        parts.append(f"{mean:+.3f} ± {se:.3f} vs {rule}")
    verdict = "wins" if len(ahead) == len(parts) else f"loses (to {', '.join(behind)})" if behind else "ties"
    return f"{verdict} ({'; '.join(parts)}; mean paired IoU difference ± standard error, {len(ref)} scenes)"


def layer_table(run: CapturedRun, image_index: int = 0) -> list[dict]:
    """Per recorded layer: place, block, resolution and (toy) each word's Otsu-mask IoU vs the analyzer."""
    rows = []
    size = run.images.shape[1]
    for layer, maps in run.store.average_maps().items():
        result = subject_masks(maps[image_index:image_index + 1])
        masks = upsample_masks(result.masks, size)[0]
        row = {"layer": layer.name.replace(".processor", ""), "place": layer.place, "block": layer.block,
               "resolution": layer.resolution(run.store.latent_hw)[0]}
        for m, r in enumerate(character_masks_vs_truth(run.images[image_index], run.words[image_index], masks)):
            row[f"IoU {r['shape']!r}"] = None if r["iou"] is None else round(r["iou"], 2)
        rows.append(row)
    return rows


def iou_over_steps(run: CapturedRun, rule: str = "lower_cv") -> dict:
    """Mean IoU vs the analyzer at every step, for masks from that step's maps alone and from the
    running mean of maps over steps 0..t (the method's choice). Needs ``keep_steps=True``."""
    steps = sorted(run.store.per_step)
    single, running, total = [], [], None
    for t in steps:
        A_t = run.store.mask_maps(step=t)  # (B, M, h, w)
        total = A_t if total is None else total + A_t
        for series, A in ((single, A_t), (running, total / (t + 1))):
            masks = upsample_masks(subject_masks(A, rule=rule).masks, run.images.shape[1])
            ious = [r["iou"] for b in range(len(run.prompts))
                    for r in character_masks_vs_truth(run.images[b], run.words[b], masks[b]) if r["iou"] is not None]
            series.append(float(np.mean(ious)) if ious else float("nan"))
    return {"steps": steps, "single_step": single, "running_mean": running}


def mixing_and_neglect(backbone, story, n_seeds: int, config=None, seed_stride: int = 1000, **kwargs) -> list[dict]:
    """Per multi-character scene and story seed: which characters vanilla left out, and whether
    vanilla and isolated attention mixed colours.

    Both methods start each scene from the same noise, so vanilla's image shows what the model
    draws there without the method. Rows carry both images and isolated attention's masks.
    """
    id_colour = id_colours(story)
    rows = []
    for k in range(n_seeds):
        shifted = story.with_seed_offset(k * seed_stride)
        results = {m: generate_story(backbone, shifted, m, config=config, progress=False, **kwargs)
                   for m in ("vanilla", "isolated")}
        for index, scene in enumerate(shifted.scenes):
            if len(scene.characters) < 2:
                continue
            found = {m: read_scene(shifted, scene, r.scenes[index].image) for m, r in results.items()}
            rows.append({"seed offset": k * seed_stride, "scene": index + 1, "characters": len(scene.characters),
                         "names": list(scene.characters),
                         "vanilla left out": [n for n, d in found["vanilla"].items() if d is None],
                         "vanilla mixed": is_mixed(found["vanilla"], id_colour),
                         "isolated mixed": is_mixed(found["isolated"], id_colour),
                         "vanilla image": results["vanilla"].scenes[index].image,
                         "isolated image": results["isolated"].scenes[index].image,
                         "isolated masks": results["isolated"].scenes[index].masks})
    return rows


def compare_methods(backbone, story, methods=("vanilla", "csa", "isolated"), n_seeds: int = 20,
                    config=None, seed_stride: int = 1000, progress: bool = True, details: bool = False,
                    **kwargs) -> dict:
    """Every method on the same backbone and the same seeds (the story shifted by k·stride).

    Returns ``{method: {metric: (mean, standard error), ...}}`` and, under ``"runs"``, the raw
    per-seed metrics. ``details`` adds IIS-toy per identity detail (see ``toy_story_metrics``).
    """
    runs = {m: [] for m in methods}
    for k in tqdm(range(n_seeds), desc="seeds", disable=not progress):
        shifted = story.with_seed_offset(k * seed_stride)
        for method in methods:
            result = generate_story(backbone, shifted, method, config=config, progress=False, **kwargs)
            runs[method].append(toy_story_metrics(shifted, result, details))
    summary = {}
    for method, rows in runs.items():
        summary[method] = {}
        for key in rows[0]:
            values = np.array([r[key] for r in rows], float)
            values = values[~np.isnan(values)]
            sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
            summary[method][key] = (float(values.mean()) if len(values) else float("nan"), sem)
    summary["runs"] = runs
    return summary
