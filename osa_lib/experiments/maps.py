"""What the attention maps show, on the toy world: generate with captured maps, score the masks
against the toy analyzer's ground truth, compare overlap rules, tabulate layers, steps and word
binding. Notebooks call these and draw; nothing here plots. Metric definitions live in
``osa_lib.toy.metrics`` (toy world) and ``osa_lib.sdxl_metrics`` (SDXL)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..attention import AttentionStore, capture_attention
from ..masks import OVERLAP_RULES, resize_masks, subject_masks
from ..claims import with_error
from ..toy.analyzer import analyze_image, largest_detection, mask_iou

__all__ = ["CapturedRun", "generate_with_maps", "upsample_masks", "character_masks_vs_truth",
           "mask_iou_records", "overlap_rule_table", "rule_verdict", "layer_table", "iou_over_steps", "content_words",
           "mask_layer_iou", "mask_iou_summary", "lowest_iou", "BINDING_OWN_SHARE", "binding_rows", "binding_table",
           "binding_verdict", "rendered_vs_generated",
           "overlap_rule_runs", "pooled_rule_scores", "rule_rows", "first_overlapping", "rule_masks"]


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


def character_masks_vs_truth(image: np.ndarray, shapes: list[str], masks: np.ndarray,
                             detected: list | None = None) -> list[dict]:
    """IoU of each character's mask (M, H, W) with the analyzer's mask of the same shape.

    A character the analyzer cannot find in the image gets ``iou=None`` (not 0): the mask
    cannot be judged when the model did not draw the character.

    Args:
        detected: ``analyze_image(image)`` when already read (scoring many masks of one image).
    """
    detected = analyze_image(image) if detected is None else detected
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
    found = {b: analyze_image(run.images[b]) for b in chosen}  # the analyzer once per image, for every rule
    for rule in rules:
        masks = upsample_masks(subject_masks(A, rule=rule).masks, run.images.shape[1])
        per_image = []
        for b in chosen:
            ious = [r["iou"] for r in character_masks_vs_truth(run.images[b], run.words[b], masks[b], found[b])]
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
    found = analyze_image(run.images[image_index])  # the analyzer once, for every layer
    for layer, maps in run.store.average_maps().items():
        result = subject_masks(maps[image_index:image_index + 1])
        masks = upsample_masks(result.masks, size)[0]
        row = {"layer": layer.name.replace(".processor", ""), "place": layer.place, "block": layer.block,
               "resolution": layer.resolution(run.store.latent_hw)[0]}
        for m, r in enumerate(character_masks_vs_truth(run.images[image_index], run.words[image_index], masks, found)):
            row[f"IoU {r['shape']!r}"] = None if r["iou"] is None else round(r["iou"], 2)
        rows.append(row)
    return rows


def iou_over_steps(run: CapturedRun, rule: str = "lower_cv") -> dict:
    """Mean IoU vs the analyzer at every step, for masks from that step's maps alone and from the
    running mean of maps over steps 0..t (the method's choice), each with its standard error over
    the drawn characters (keys ``*_se``). Needs ``keep_steps=True``."""
    steps = sorted(run.store.per_step)
    found = [analyze_image(image) for image in run.images]  # the analyzer once per image, not once per step
    curve = {"steps": steps, "single_step": [], "running_mean": [], "single_step_se": [], "running_mean_se": []}
    total = None
    for t in steps:
        A_t = run.store.mask_maps(step=t)  # (B, M, h, w)
        total = A_t if total is None else total + A_t
        for series, A in (("single_step", A_t), ("running_mean", total / (t + 1))):
            masks = upsample_masks(subject_masks(A, rule=rule).masks, run.images.shape[1])
            ious = np.array([r["iou"] for b in range(len(run.prompts))
                             for r in character_masks_vs_truth(run.images[b], run.words[b], masks[b], found[b])
                             if r["iou"] is not None], float)  # (drawn characters,)
            curve[series].append(float(ious.mean()) if len(ious) else float("nan"))
            se = float(ious.std(ddof=1) / np.sqrt(len(ious))) if len(ious) > 1 else float("nan")
            curve[f"{series}_se"].append(se)
    return curve


# --- What the notebooks tabulate (notebooks hold no logic) -------------------------------------------

def content_words(prompt: str, function_words=("a", "and", "in", "the")) -> list[str]:
    """The words of a prompt whose maps are worth drawing: all but the toy grammar's function words."""
    return [w for w in prompt.split() if w.lower() not in function_words]


def mask_layer_iou(run: CapturedRun, words: list[str]) -> dict[str, list[float | None]]:
    """Per word, the Otsu-mask IoU of every layer at the mask resolution (``layer_table``'s rows at
    ``store.mask_resolution()``); None where the analyzer found no such shape."""
    resolution = run.store.mask_resolution()
    rows = [r for r in layer_table(run) if r["resolution"] == resolution]
    return {w: [r[f"IoU {w!r}"] for r in rows] for w in words}


def mask_iou_summary(records: list[dict], target: float = 0.5) -> dict:
    """Mean and median IoU of the drawn characters of ``mask_iou_records`` and the share at or over
    ``target``. A character the model did not draw (``iou`` None) is counted, never scored."""
    ious = np.array([r["iou"] for r in records if r["iou"] is not None], float)  # (drawn,)
    nan = float("nan")
    return {"characters": len(records), "drawn (scored)": len(ious),
            "mean IoU": float(ious.mean()) if len(ious) else nan,
            "median IoU": float(np.median(ious)) if len(ious) else nan,
            f"IoU >= {target}": float((ious >= target).mean()) if len(ious) else nan, "target mean": target}


def lowest_iou(records: list[dict], k: int = 4) -> list[dict]:
    """The ``k`` worst records of ``mask_iou_records``, characters the model did not draw first."""
    return sorted(records, key=lambda r: -1.0 if r["iou"] is None else r["iou"])[:k]


BINDING_OWN_SHARE = 0.6
"""Own share under which a word's maps do not tell two characters apart (``toy.probes.binding``). With own
share s the other character receives (1 - s) / s of the mass the word's own one does: under 0.6
that is more than two thirds, so no threshold over the map keeps one character and drops the
other. 0.5 is no binding at all; the shipped model's up-block shape words sit near it."""


def binding_table(probe: list[dict]) -> list[dict]:
    """``toy.probes.binding.binding_scores`` rows averaged over timesteps: one row per (layers, word
    kind), with standard errors over scenes (each scene's value averaged over the timesteps first,
    since every timestep reads the same scenes). Rows without per-scene values get NaN errors."""
    groups: dict[tuple, list[dict]] = {}
    for r in probe:
        groups.setdefault((r["place"], r["resolution"], r["word"]), []).append(r)

    def mean_and_error(rows, key):
        mean = float(np.mean([r[key] for r in rows]))
        if not all(f"{key}_scenes" in r for r in rows):
            return mean, float("nan")
        per_scene = np.mean([r[f"{key}_scenes"] for r in rows], axis=0)  # (scenes,)
        return mean, float(per_scene.std(ddof=1) / np.sqrt(len(per_scene))) if len(per_scene) > 1 else float("nan")

    table = []
    for (place, res, word), rows in sorted(groups.items()):
        (share, share_se), (iou, iou_se) = mean_and_error(rows, "own_share"), mean_and_error(rows, "iou")
        table.append({"layers": f"{place} {res}×{res}", "place": place, "resolution": res, "word": word,
                      "own share": share, "own share SE": share_se,
                      "Otsu IoU": iou, "Otsu IoU SE": iou_se})
    return table


def binding_rows(table: list[dict], digits: int = 2) -> list[dict]:
    """``binding_table`` for display: each value as "mean ± standard error"."""
    return [{"layers": r["layers"], "word": r["word"], "own share": with_error(r["own share"], r["own share SE"], digits),
             "Otsu IoU": with_error(r["Otsu IoU"], r["Otsu IoU SE"], digits)} for r in table]


def rendered_vs_generated(table: list[dict], generated_iou: float) -> dict:
    """Why two-character masks miss, as an account: the Otsu IoU of shape words' maps in the up
    layers the masks come from (the smallest up resolution) on *rendered* scenes, where the drawing
    is exactly right (``binding_table``), against the mean IoU on generated scenes. What the
    rendered scenes miss is the maps' own loss; the gap between the two is what the drawings add."""
    smallest = min(r["resolution"] for r in table if r["place"] == "up")
    row = next(r for r in table if r["word"] == "shape" and r["place"] == "up" and r["resolution"] == smallest)
    rendered, se = row["Otsu IoU"], row["Otsu IoU SE"]
    sentence = (f"On rendered scenes, drawn exactly right, the masks from the {row['layers']} maps reach IoU "
                f"{rendered:.2f} ± {se:.2f}; on the generated scenes above, {generated_iou:.2f}. Of the IoU the masks miss "
                f"on generated scenes ({1 - generated_iou:.2f}), {1 - rendered:.2f} is missed even on perfect drawings "
                f"(the maps' own coarseness) and {rendered - generated_iou:+.2f} comes with the drawings.")
    return {"rendered": rendered, "rendered_se": se, "generated": generated_iou, "sentence": sentence}


def binding_verdict(probe: list[dict], threshold: float = BINDING_OWN_SHARE) -> tuple[float, str]:
    """Own share of shape words in the up-block layers the masks come from (the smallest up
    resolution), and whether the maps tell the characters apart (``BINDING_OWN_SHARE``)."""
    smallest = min(r["resolution"] for r in probe if r["place"] == "up")
    share = float(np.mean([r["own_share"] for r in probe
                           if r["place"] == "up" and r["word"] == "shape" and r["resolution"] == smallest]))
    if share < threshold:
        return share, "so the mask maps do not tell the two characters apart: the overlap rule has nothing to split them by"
    return share, "so the mask maps do tell the characters apart"


def overlap_rule_runs(backbone, prompts: list[str], words: list[list[str]], first_seed: int, batch_size: int = 32,
                      **kwargs) -> tuple[list[CapturedRun], list[dict]]:
    """``generate_with_maps`` in batches of ``batch_size`` (seeds ``first_seed + i``) and each batch's
    ``overlap_rule_table``; a batch's maps are dropped from memory only with its run."""
    runs, tables = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = slice(i, i + batch_size)
        run = generate_with_maps(backbone, prompts[chunk], words[chunk],
                                 list(range(first_seed + i, first_seed + i + len(prompts[chunk]))), **kwargs)
        runs.append(run)
        tables.append(overlap_rule_table(run))
    return runs, tables


def pooled_rule_scores(tables: list[dict], rules=OVERLAP_RULES) -> dict[str, list[float]]:
    """Per rule, the per-scene IoUs of all ``overlap_rule_table``s, scenes where a character was not
    drawn left out (the same scenes for every rule, in the same order: paired)."""
    return {rule: [v for t in tables for v in t["rules"][rule]["per_image"] if v is not None] for rule in rules}


def rule_rows(per_rule: dict[str, list[float]]) -> list[dict]:
    """One row per overlap rule: scenes scored, mean and standard deviation of the IoU."""
    nan = float("nan")
    return [{"rule": rule, "scenes scored": len(v), "mean IoU": float(np.mean(v)) if v else nan,
             "std": float(np.std(v)) if v else nan} for rule, v in per_rule.items()]


def first_overlapping(runs: list[CapturedRun], tables: list[dict]) -> tuple[CapturedRun, int]:
    """The run and image index of the first scene with overlapping masks (else the first scene)."""
    for run, table in zip(runs, tables):
        if table["images"]:
            return run, table["images"][0]
    return runs[0], 0


def rule_masks(run: CapturedRun, index: int, rules=OVERLAP_RULES) -> dict[str, np.ndarray]:
    """Image ``index``'s masks (M, H, W) under each overlap rule, at image size."""
    A = run.store.mask_maps()[index:index + 1]  # (1, M, h, w)
    return {rule: upsample_masks(subject_masks(A, rule=rule).masks, run.images.shape[1])[0] for rule in rules}
