"""Runs that the notebooks and scripts share: generate with captured maps, score masks against
the toy analyzer, compare overlap rules, compare methods on a story. Notebooks call these and
draw; nothing here plots. Metric definitions live in ``osa_lib.toy.metrics`` (toy world) and
``osa_lib.sdxl_metrics`` (SDXL)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .attention import AttentionStore, capture_attention
from .generation import generate_story
from .masks import OVERLAP_RULES, resize_masks, subject_masks
from .toy.analyzer import analyze_image, largest_detection, mask_iou
from .toy.metrics import IDENTITY_DETAILS, id_colours, is_mixed, read_scene, toy_story_metrics
from .toy.world import parse_caption

__all__ = ["CapturedRun", "generate_with_maps", "upsample_masks", "character_masks_vs_truth",
           "mask_iou_records", "overlap_rule_table", "rule_verdict", "layer_table", "iou_over_steps",
           "mixing_and_neglect", "content_words", "mask_layer_iou", "mask_iou_summary", "lowest_iou",
           "BINDING_OWN_SHARE", "binding_table", "binding_verdict", "overlap_rule_runs", "pooled_rule_scores",
           "rule_rows", "first_overlapping", "rule_masks", "uncoloured_scene_prompts", "mean_and_sem", "StoryScorer", "default_cache_dir",
           "summary_rows", "summary_means", "lambda_sweep", "ablation_rows", "prompts_vs_attention", "iis_gain",
           "carry_over", "detail_gains", "colour_kept_rows", "trio_summary", "compare_methods"]


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
    running mean of maps over steps 0..t (the method's choice). Needs ``keep_steps=True``."""
    steps = sorted(run.store.per_step)
    found = [analyze_image(image) for image in run.images]  # the analyzer once per image, not once per step
    single, running, total = [], [], None
    for t in steps:
        A_t = run.store.mask_maps(step=t)  # (B, M, h, w)
        total = A_t if total is None else total + A_t
        for series, A in ((single, A_t), (running, total / (t + 1))):
            masks = upsample_masks(subject_masks(A, rule=rule).masks, run.images.shape[1])
            ious = [r["iou"] for b in range(len(run.prompts))
                    for r in character_masks_vs_truth(run.images[b], run.words[b], masks[b], found[b])
                    if r["iou"] is not None]
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


# --- What the notebooks tabulate (issue 16: notebooks hold no logic) -------------------------------

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
"""Own share under which a word's maps do not tell two characters apart (``toy.binding``). With own
share s the other character receives (1 - s) / s of the mass the word's own one does: under 0.6
that is more than two thirds, so no threshold over the map keeps one character and drops the
other. 0.5 is no binding at all; the shipped model's up-block shape words sit near it."""


def binding_table(probe: list[dict]) -> list[dict]:
    """``toy.binding.binding_scores`` rows averaged over timesteps: one row per (layers, word kind)."""
    groups: dict[tuple, list[dict]] = {}
    for r in probe:
        groups.setdefault((r["place"], r["resolution"], r["word"]), []).append(r)
    return [{"layers": f"{place} {res}×{res}", "word": word,
             "own share": float(np.mean([r["own_share"] for r in rows])), "Otsu IoU": float(np.mean([r["iou"] for r in rows]))}
            for (place, res, word), rows in sorted(groups.items())]


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


# --- Stories over seeds, each generation made once -------------------------------------------------

def uncoloured_scene_prompts(story):
    """The toy story with every colour word taken out of its scene prompts, read through the toy
    grammar ("a red circle and a blue square in the snow" -> "a circle and a square in the snow");
    ID prompts keep theirs. Works for any toy story; a prompt outside the grammar raises
    ``ToyGrammarError`` naming it."""
    scenes = []
    for scene in story.scenes:
        parsed = parse_caption(scene.prompt)
        prompt = "a " + " and a ".join(c["shape"] for c in parsed["characters"]) + f" in the {parsed['scene']}"
        scenes.append(dataclasses.replace(scene, prompt=prompt))
    return dataclasses.replace(story, scenes=scenes)


def mean_and_sem(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Per key of per-seed metric dicts: (mean, standard error) over the seeds where it is a number."""
    out = {}
    for key in rows[0]:
        values = np.array([r[key] for r in rows], float)
        values = values[~np.isnan(values)]
        sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
        out[key] = (float(values.mean()) if len(values) else float("nan"), sem)
    return out


class StoryScorer:
    """Stories generated over seeds (the story shifted by k·``seed_stride``, as ``compare_methods``)
    and scored with the toy metrics, each (story, method, config, seed) generated and read by the
    analyzer once, however many tables ask for it.

    Vanilla and CSA images do not depend on ``IsolationConfig`` (it only makes recorded masks,
    which the scorer does not ask for), so they are shared between configs; isolated runs are
    keyed by their config. ``generations`` counts the stories actually generated.
    """

    BASIC = ("IIS-toy", "colour kept", "attribute accuracy", "mixing rate", "TIS-toy", "seconds per scene")

    def __init__(self, backbone, n_seeds: int, seed_stride: int = 1000, cache_dir=None, **generate_kwargs):
        """Args:
            cache_dir: also keep each seed's metrics on disk here, so a second notebook (or run)
                asking for the same story, method, config and seed reads them instead of generating.
                Entries are keyed by the U-Net's weights and the library's source as well, so a
                changed model or code never reads an old entry. None (default): memory only.
        """
        self.backbone, self.n_seeds, self.seed_stride = backbone, n_seeds, seed_stride
        self.generate_kwargs = generate_kwargs
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._results: dict[tuple, object] = {}
        self._metrics: dict[tuple, dict] = {}
        self._fingerprint: str | None = None
        self.generations = 0

    def _cache_file(self, key: tuple):
        """Where seed metrics of ``key`` live on disk: a hash of the key, the weights and the source."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for p in self.backbone.unet.parameters():  # the weights (SDXL: a few seconds, once)
                digest.update(p.detach().cpu().numpy().tobytes())
            for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):  # the code that generates and scores
                digest.update(path.read_bytes())
            self._fingerprint = digest.hexdigest()
        name = hashlib.sha256(repr((self._fingerprint, self.backbone.name, key, self.seed_stride,
                                    sorted(self.generate_kwargs.items()))).encode()).hexdigest()[:32]
        return self.cache_dir / f"{name}.json"

    def _key(self, story, method: str, config, k: int) -> tuple:
        return (repr(story), method, repr(config or self.backbone.isolation_config()) if method == "isolated" else None, k)

    def result(self, story, method: str, config=None, k: int = 0):
        """The ``StoryResult`` of ``method`` on the story shifted by ``k`` seed strides."""
        key = self._key(story, method, config, k)
        if key not in self._results:
            self._results[key] = generate_story(self.backbone, story.with_seed_offset(k * self.seed_stride), method,
                                                config=config, progress=False, **self.generate_kwargs)
            self.generations += 1
        return self._results[key]

    def seed_metrics(self, story, method: str, config=None, k: int = 0) -> dict:
        """``toy_story_metrics`` (with details) of one seed."""
        key = self._key(story, method, config, k)
        if key in self._metrics:
            return self._metrics[key]
        path = None if self.cache_dir is None else self._cache_file(key)
        if path is not None and path.is_file():
            self._metrics[key] = {k_: float("nan") if v is None else v for k_, v in json.loads(path.read_text()).items()}
            return self._metrics[key]
        shifted = story.with_seed_offset(k * self.seed_stride)
        self._metrics[key] = toy_story_metrics(shifted, self.result(story, method, config, k), details=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")  # two notebooks may write at once
            tmp.write_text(json.dumps({k_: None if v != v else v for k_, v in self._metrics[key].items()}))
            os.replace(tmp, path)
        return self._metrics[key]

    def summary(self, story, methods=("vanilla", "csa", "isolated"), config=None, details: bool = False) -> dict:
        """``{method: {metric: (mean, standard error)}}`` over the seeds (``compare_methods``'s shape)."""
        out = {}
        for method in methods:
            rows = [self.seed_metrics(story, method, config, k) for k in range(self.n_seeds)]
            if not details:
                rows = [{key: r[key] for key in self.BASIC} for r in rows]
            out[method] = mean_and_sem(rows)
        return out

    def score(self, story, config=None, methods=("isolated",), details: bool = False) -> dict[str, dict[str, float]]:
        """``{method: {metric: mean over seeds}}``."""
        return {m: {k: v[0] for k, v in s.items()} for m, s in self.summary(story, methods, config, details).items()}


def default_cache_dir():
    """``$OSA_CACHE_DIR`` when set (the main job sets it: notebooks 04 and 05 score the same stories),
    else None: no disk cache, as in the tests."""
    return os.environ.get("OSA_CACHE_DIR") or None


def summary_rows(summaries: dict[str, dict], methods=("vanilla", "csa", "isolated")) -> list[dict]:
    """One row per (story, method) of ``{story: summary}``: each metric as "mean ± standard error"."""
    return [{"story": Path(story).stem, "method": m, **{k: f"{v[0]:.1f} ± {v[1]:.1f}" for k, v in summary[m].items()}}
            for story, summary in summaries.items() for m in methods]


def summary_means(summaries: dict[str, dict], methods=("vanilla", "csa", "isolated")) -> dict[str, dict[str, float]]:
    """``{"<story> / <method>": {metric: mean}}``: the numbers behind ``summary_rows``."""
    return {f"{Path(story).stem} / {m}": {k: v[0] for k, v in summary[m].items()}
            for story, summary in summaries.items() for m in methods}


def _pick(metrics: dict, keys, suffix: str) -> dict:
    return {f"{k} ({suffix})": metrics[k] for k in keys}


def lambda_sweep(scorer: StoryScorer, single, pair, lams) -> list[dict]:
    """Isolated attention at each λ: identity and text fidelity on ``single``, mixing and attributes on ``pair``."""
    configs = {lam: scorer.backbone.isolation_config(lam=lam) for lam in lams}  # the model's own switches otherwise
    return [{"λ": lam, **_pick(scorer.score(single, configs[lam])["isolated"], ("IIS-toy", "TIS-toy"), "single"),
             **_pick(scorer.score(pair, configs[lam])["isolated"], ("mixing rate", "attribute accuracy"), "pair")}
            for lam in lams]


def ablation_rows(scorer: StoryScorer, single, pair, variants: dict) -> list[dict]:
    """Per named ``IsolationConfig``: identity on ``single``, identity and mixing on ``pair``."""
    return [{"variant": name, **_pick(scorer.score(single, cfg)["isolated"], ("IIS-toy",), "single"),
             **_pick(scorer.score(pair, cfg)["isolated"], ("IIS-toy", "mixing rate"), "pair")}
            for name, cfg in variants.items()]


def prompts_vs_attention(scorer: StoryScorer, story) -> list[dict]:
    """Vanilla and isolated on the story as written ("refined prompts") and with the colour words
    taken out of its scene prompts ("raw prompts", ``uncoloured_scene_prompts``)."""
    rows = []
    for label, variant in (("refined prompts", story), ("raw prompts", uncoloured_scene_prompts(story))):
        for method, metrics in scorer.score(variant, methods=("vanilla", "isolated")).items():
            rows.append({"prompts": label, "method": method, **{k: v for k, v in metrics.items() if k != "mixing rate"}})
    return rows


def iis_gain(rows: list[dict]) -> dict[str, float]:
    """Per prompt variant of ``prompts_vs_attention``: isolated's IIS-toy minus vanilla's."""
    by = {(r["prompts"], r["method"]): r["IIS-toy"] for r in rows}
    return {label: by[(label, "isolated")] - by[(label, "vanilla")] for label in dict.fromkeys(r["prompts"] for r in rows)}


def carry_over(scorer: StoryScorer, stories: dict, methods=("vanilla", "csa", "isolated")) -> list[dict]:
    """IIS-toy per identity detail (hue, brightness, size, mark) per story and method."""
    return [{"story": label, "method": method, **{d: metrics[f"IIS-toy {d}"] for d in IDENTITY_DETAILS}}
            for label, story in stories.items()
            for method, metrics in scorer.score(story, methods=methods, details=True).items()]


def detail_gains(carry: list[dict]) -> dict[str, dict[str, float]]:
    """Per story of ``carry_over``: isolated minus vanilla per identity detail."""
    by = {(r["story"], r["method"]): r for r in carry}
    return {story: {d: by[(story, "isolated")][d] - by[(story, "vanilla")][d] for d in IDENTITY_DETAILS}
            for story in dict.fromkeys(r["story"] for r in carry)}


def colour_kept_rows(scorer: StoryScorer, stories: dict, methods=("vanilla", "csa", "isolated")) -> list[dict]:
    """Colour kept, IIS-toy and mixing rate per story and method."""
    return [{"story": label, "method": method, **{k: metrics[k] for k in ("colour kept", "IIS-toy", "mixing rate")}}
            for label, story in stories.items() for method, metrics in scorer.score(story, methods=methods).items()]


def trio_summary(scenes: list[dict]) -> dict:
    """Counts over ``mixing_and_neglect``'s three-character scenes."""
    three = [r for r in scenes if r["characters"] == 3]
    mixed = [r for r in three if r["isolated mixed"]]
    return {"three-character scenes": len(three), "vanilla leaves one out": sum(bool(r["vanilla left out"]) for r in three),
            "vanilla mixed": sum(r["vanilla mixed"] for r in three), "isolated mixed": len(mixed),
            "isolated mixed where vanilla left one out": sum(bool(r["vanilla left out"]) for r in mixed)}


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
    summary = {method: mean_and_sem(rows) for method, rows in runs.items()}
    summary["runs"] = runs
    return summary
