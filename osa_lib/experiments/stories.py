"""What the method does to whole stories, on the toy world: stories generated over seeds (each
generation made once, cached) and scored with the toy metrics, compared across methods, λ values,
ablations and stories. Notebooks and ``scripts/evaluate_stories.py`` call these; nothing here
plots. Metric definitions live in ``osa_lib.toy.metrics``."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..claims import difference_sentence, with_error
from ..generation import generate_story
from ..toy.metrics import IDENTITY_DETAILS, id_colours, is_mixed, read_scene, toy_story_metrics
from ..toy.world import parse_caption

__all__ = ["mixing_and_neglect", "uncoloured_scene_prompts", "mean_and_sem", "StoryScorer", "default_cache_dir", "summary_rows", "summary_means", "lambda_sweep", "ablation_rows", "prompts_vs_attention", "PROMPT_EFFECT_METRICS", "prompt_option_effects", "prompt_option_table", "prompt_option_sentences", "iis_gain", "carry_over", "detail_gains", "colour_kept_rows", "trio_summary", "compare_methods"]


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
            for path in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):  # osa_lib: the code that generates and scores
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
    """``$OSA_CACHE_DIR`` when set (``scripts/run_notebooks.sh`` sets it: notebooks 04 and 05 score the same stories),
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


#: what ``prompt_option_effects`` reports for each change
PROMPT_EFFECT_METRICS = ("IIS-toy", "attribute accuracy", "colour kept", "TIS-toy")


def prompt_option_effects(scorer: StoryScorer, story, methods=("vanilla", "csa", "isolated"),
                          config=None) -> list[dict]:
    """What each of two text changes does, per method, paired over the scorer's seeds.

    The story is first stripped of its characters' descriptions (``Story.without_descriptions``:
    "a red circle in the meadow" -> "a circle in the meadow"; ID prompts keep theirs). Then:

    - "descriptions in the prompts": every method drawn with ``describe=True`` (each scene prompt
      gets its characters' descriptions back, the same text for every method) minus without;
    - "solo-scene isolated cross-attention, off -> on" (isolated only, on the stripped prompts and on the
      described ones): ``solo_cross=True`` (the ID prompt blended in a character's solo first
      scene, METHOD.md's story loop) minus ``solo_cross=False`` (that scene drawn as the model is).

    Args:
        config: isolated attention's switches (default: the backbone's).

    Returns:
        one row per (change, prompts, method): ``{"change", "prompts", "method", "seeds", <metric>:
        mean difference, "<metric> se": its standard error}`` for ``PROMPT_EFFECT_METRICS`` (NaN
        where a metric is undefined on every seed, e.g. colour kept for a character drawn once).
    """
    config = config or scorer.backbone.isolation_config()
    raw = story.without_descriptions()
    described = dataclasses.replace(raw, describe_characters=True)
    no_solo = dataclasses.replace(config, solo_cross=False)

    def paired(change, prompts, method, after, after_config, before, before_config) -> dict:
        differences = [{m: scorer.seed_metrics(after, method, after_config, k)[m]
                        - scorer.seed_metrics(before, method, before_config, k)[m] for m in PROMPT_EFFECT_METRICS}
                       for k in range(scorer.n_seeds)]
        stats = mean_and_sem(differences)
        return {"change": change, "prompts": prompts, "method": method, "seeds": scorer.n_seeds,
                **{m: stats[m][0] for m in PROMPT_EFFECT_METRICS},
                **{f"{m} se": stats[m][1] for m in PROMPT_EFFECT_METRICS}}

    rows = [paired("descriptions in the prompts", "stripped -> described", m, described, config, raw, config)
            for m in methods]
    if "isolated" in methods:
        for label, variant in (("stripped", raw), ("described", described)):
            rows.append(paired("solo-scene isolated cross-attention, off -> on", label, "isolated", variant, config,
                               variant, no_solo))
    return rows


def prompt_option_table(rows: list[dict], digits: int = 1) -> list[dict]:
    """``prompt_option_effects`` rows for display: each metric as "difference ± standard error"."""
    return [{"change": r["change"], "prompts": r["prompts"], "method": r["method"],
             **{m: with_error(r[m], r[f"{m} se"], digits, signed=True) for m in PROMPT_EFFECT_METRICS}} for r in rows]


def prompt_option_sentences(rows: list[dict], metric: str = "IIS-toy") -> list[str]:
    """One sentence per row of ``prompt_option_effects`` on ``metric``, its direction word computed
    from the difference and its standard error (``claims.difference_sentence``)."""
    return [difference_sentence(f"{r['change'].capitalize()} ({r['prompts']}): {r['method']}'s {metric}",
                                (r[metric], r[f"{metric} se"])) + "." for r in rows]


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
