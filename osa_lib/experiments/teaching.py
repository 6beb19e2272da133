"""Sentences, chance levels and comparisons the teaching notebooks print (02, 03, 05): every
direction word ("higher", "more often", "better") is computed here from the numbers it describes,
never written into a notebook by hand, and differences count only beyond their standard error."""
from __future__ import annotations

import dataclasses

import numpy as np

from ..config import OVERLAP_RULES
from ..toy.analyzer import analyze_image
from ..toy.metrics import IDENTITY_DETAILS
from ..claims import compare, direction, paired_difference, with_error
from .maps import CapturedRun, character_masks_vs_truth, rule_masks
from .stories import StoryScorer

__all__ = ["averaging_verdict", "worst_scored", "scored_overlapping", "rule_ious", "identity_chance",
           "switch_variants", "lambda_sweep_errors", "with_errors", "lambda_differences", "lambda_verdict", "trio_verdict",
           "probe_chance", "pair_probe_verdict", "seed_difference", "carry_over_errors"]


def averaging_verdict(curve: dict, z: float = 2.0) -> dict:
    """What ``iou_over_steps`` shows about averaging maps over steps: at how many steps the running
    mean's masks score above or below that step's map alone, and how the last step's pair compares,
    a gap counting only beyond ``z`` standard errors of the difference (the two errors combined)."""
    single, running = np.asarray(curve["single_step"], float), np.asarray(curve["running_mean"], float)  # (T,)
    later = slice(1, None)  # step 0 is the same map either way
    above, below = int((running[later] > single[later]).sum()), int((running[later] < single[later]).sum())
    last_single, last_running = float(single[-1]), float(running[-1])
    se_single = float(curve.get("single_step_se", [float("nan")])[-1])
    se_running = float(curve.get("running_mean_se", [float("nan")])[-1])
    tol = z * float(np.sqrt(np.nansum([se_single ** 2, se_running ** 2])))
    word = compare(last_running, last_single, ("better than", "worse than", "within noise of"), tol=tol)
    sentence = (f"After the first step the running mean's masks score above the single step's at {above} of "
                f"{len(single) - 1} steps and below at {below}; at the last step the running mean (IoU "
                f"{last_running:.3f} ± {se_running:.3f}, what the method uses) is {word} the last step's map alone "
                f"({last_single:.3f} ± {se_single:.3f}).")
    if below > above and word != "better than":
        sentence += (" On these scenes averaging does not help: a single later step locates the characters as well "
                     "or better.")
    return {"steps_running_above": above, "steps_running_below": below, "last_running_mean": last_running,
            "last_single_step": last_single, "last_step_tolerance": tol, "last_step_word": word, "sentence": sentence}


def worst_scored(records: list[dict], k: int = 4) -> list[dict]:
    """The ``k`` drawn characters of ``mask_iou_records`` whose masks scored the lowest IoU (the
    characters the model did not draw are counted by ``mask_iou_summary``, not shown here)."""
    return sorted((r for r in records if r["iou"] is not None), key=lambda r: r["iou"])[:k]


def scored_overlapping(runs: list[CapturedRun], tables: list[dict], rule: str = "lower_cv") -> tuple[CapturedRun, int]:
    """The run and image index of the first overlapping scene whose characters were all drawn (the
    scenes ``pooled_rule_scores`` scores), so a figure of it names only characters it shows."""
    for run, table in zip(runs, tables):
        for b, value in zip(table["images"], table["rules"][rule]["per_image"]):
            if value is not None:
                return run, b
    raise ValueError("no overlapping scene has both characters drawn; generate more scenes (n_scenes)")


def rule_ious(run: CapturedRun, index: int, rules=OVERLAP_RULES) -> dict[str, list[float | None]]:
    """Per overlap rule, the IoU of each character's mask of image ``index`` against the analyzer."""
    found = analyze_image(run.images[index])
    return {rule: [r["iou"] for r in character_masks_vs_truth(run.images[index], run.words[index], masks, found)]
            for rule, masks in rule_masks(run, index, rules).items()}


def identity_chance(n: int = 4000, seed: int = 0) -> dict[str, float]:
    """IIS-toy per identity detail (%) of two characters of one shape and colour family whose
    unnamed details are drawn independently from the world's ranges (``world.sample_character``):
    the level a method that carries nothing over scores when the prompt names the colour. Monte
    Carlo over ``n`` pairs; "IIS-toy" is the mean of the details."""
    from ..toy import world
    from ..toy.metrics import identity_terms
    rng = np.random.default_rng(seed)
    terms = [identity_terms(world.sample_character(rng, "circle", "red"), world.sample_character(rng, "circle", "red"))
             for _ in range(n)]
    chance = {d: 100 * float(np.mean([t[d] for t in terms])) for d in IDENTITY_DETAILS}
    return {**chance, "IIS-toy": float(np.mean(list(chance.values())))}


def switch_variants(backbone) -> dict[str, object]:
    """The backbone's default switches first, then the other set, each labelled: the paper's
    (``IsolationConfig()``) and, when the model has them, the switches tuned for it
    (``backbone.tuned_isolation``, or ``isolation_defaults`` on backbones that call it so), so every
    table says which it shows."""
    from ..config import IsolationConfig
    paper, own = IsolationConfig(), backbone.isolation_config()
    tuned_fields = getattr(backbone, "tuned_isolation", None) or getattr(backbone, "isolation_defaults", None) or {}
    if own != paper:  # the model runs its tuned switches by default
        tuned_fields = {f.name: getattr(own, f.name) for f in dataclasses.fields(own)
                        if getattr(own, f.name) != getattr(paper, f.name)}
    if not tuned_fields:
        return {"paper's switches": paper}
    tuned = IsolationConfig(**tuned_fields)
    label = "switches tuned for this model (" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in tuned_fields.items()) + ")"
    return {label: own, "paper's switches": paper} if own != paper else {"paper's switches": paper, label: tuned}


def lambda_sweep_errors(scorer: StoryScorer, single, pair, lams) -> list[dict]:
    """``lambda_sweep``'s rows as standard errors over the seeds (same keys, same generations)."""
    configs = {lam: scorer.backbone.isolation_config(lam=lam) for lam in lams}
    def sem(story, lam, keys, suffix):
        summary = scorer.summary(story, methods=("isolated",), config=configs[lam])["isolated"]
        return {f"{k} ({suffix})": summary[k][1] for k in keys}
    return [{"λ": lam, **sem(single, lam, ("IIS-toy", "TIS-toy"), "single"),
             **sem(pair, lam, ("mixing rate", "attribute accuracy"), "pair")} for lam in lams]


def with_errors(rows: list[dict], errors: list[dict], digits: int = 1) -> list[dict]:
    """Rows of means and rows of standard errors (same keys) as "mean ± se" strings for a table."""
    return [{k: (with_error(v, e[k], digits) if k != "λ" and isinstance(v, float) else v) for k, v in r.items()}
            for r, e in zip(rows, errors)]


def lambda_differences(scorer: StoryScorer, single, paper_lam: float = 1.1) -> dict[str, tuple[float, float, int]]:
    """IIS-toy and TIS-toy on ``single`` at the paper's λ minus at λ = 0 (the unmodified model),
    paired by seed (``seed_difference``): the same noise on both sides, so the seeds' shared part
    cancels, which the two rows' separate standard errors would not show."""
    at = lambda lam: ("isolated", scorer.backbone.isolation_config(lam=lam))  # noqa: E731
    return {metric: seed_difference(scorer, single, at(paper_lam), at(0.0), metric) for metric in ("IIS-toy", "TIS-toy")}


def lambda_verdict(sweep: list[dict], differences: dict, paper_lam: float = 1.1, z: float = 2.0) -> str:
    """How identity and text fidelity on the single story move from λ = 0 (the unmodified model)
    to the paper's λ, in words computed from ``lambda_differences`` (a change counts only beyond
    ``z`` standard errors of the paired difference); and which swept λ has the highest identity."""
    lams = [r["λ"] for r in sweep]
    if 0 not in lams or paper_lam not in lams:
        return f"the sweep needs λ = 0 and λ = {paper_lam:g} to compare them"
    parts = []
    for name in ("IIS-toy", "TIS-toy"):
        d, se = differences[name][:2]
        numbers = f"({d:+.1f} ± {se:.1f} points, paired over seeds)"
        word = direction(d, se, z, "higher", "lower", "")
        parts.append(f"{name} is {word} at λ = {paper_lam:g} than at λ = 0 {numbers}" if word
                     else f"{name} at λ = {paper_lam:g} is within noise of λ = 0 {numbers}")
    best = max(sweep, key=lambda r: r["IIS-toy (single)"])
    return "; ".join(parts) + f"; the highest IIS-toy of the sweep is at λ = {best['λ']:g}."


def trio_verdict(counts: dict, z: float = 2.0) -> str:
    """``trio_summary``'s mixing counts in a sentence whose direction word is computed: a gap counts
    only beyond ``z`` standard errors of the difference of the two shares,
    sqrt((p_iso (1 − p_iso) + p_van (1 − p_van)) / n) (the same n scenes for both)."""
    n, iso, van = counts["three-character scenes"], counts["isolated mixed"], counts["vanilla mixed"]
    p_iso, p_van = (iso / n, van / n) if n else (float("nan"), float("nan"))
    se = float(np.sqrt((p_iso * (1 - p_iso) + p_van * (1 - p_van)) / n)) if n else float("nan")
    word = compare(p_iso, p_van, ("more often than", "less often than", "not distinguishably more or less often than"),
                   tol=z * se)
    sentence = (f"Isolated attention mixed {iso} of {n} three-character scenes, vanilla {van} (difference "
                f"{100 * (p_iso - p_van):+.0f} ± {100 * se:.0f} points): isolated mixes {word} vanilla here, counting "
                f"only beyond two standard errors.")
    left_out = counts.get("isolated mixed where vanilla left one out")
    if iso and left_out is not None:
        where = ("Every one of them" if left_out == iso else f"{left_out} of them")
        sentence += (f" {where} is a scene where vanilla, from the same noise, left a character out (vanilla left one "
                     f"out in {counts.get('vanilla leaves one out', '?')} of {n}): "
                     + ("mixing comes where the model does not fit three characters." if left_out == iso else
                        "the rest happen where vanilla drew all three."))
    return sentence


def probe_chance(probe: list[dict]) -> dict:
    """The appearance probe's "none" row against chance: its colour share, its binomial standard
    error, the uniform chance (1 in the number of colour families) and the chance for these very
    samples (``colour chance``: the drawn colours' and the references' frequencies multiplied, what a
    drawing independent of its reference matches), each with how many standard errors apart."""
    from ..toy.world import COLOURS
    none = next(r for r in probe if r["setting"] == "none")
    n = int(round(none["drawn"] * none["n"]))
    p = none["colour"]
    se = float(np.sqrt(p * (1 - p) / n)) if n else float("nan")
    uniform = 1 / len(COLOURS)
    sample = none.get("colour chance", float("nan"))
    z_uniform = (p - uniform) / se if se else float("nan")
    z_sample = (p - sample) / se if se and sample == sample else float("nan")
    def apart(z):
        if z != z:
            return "not comparable with"
        return "within noise of" if abs(z) <= 2 else f"{abs(z):.1f} standard errors {'above' if z > 0 else 'below'}"
    sentence = (f"With no reference the model drew the reference's colour family in {p:.0%} of {n} drawn samples "
                f"(± {se:.0%}): {apart(z_uniform)} the uniform 1 in {len(COLOURS)} ({uniform:.0%}), and "
                f"{apart(z_sample)} the chance for these samples ({sample:.0%}: how often the colours this model draws "
                f"for uncoloured prompts meet these references' colours).")
    return {"none": p, "drawn": n, "se": se, "uniform": uniform, "sample_chance": sample,
            "z_uniform": z_uniform, "z_sample": z_sample, "sentence": sentence}


def pair_probe_verdict(rows: list[dict], z: float = 2.0) -> dict:
    """``toy.probes.appearance.pair_scores``'s reference row in words: does a drawn character take
    its own reference colour more often than the other character's? The difference of the two
    shares comes from one multinomial sample, so its standard error is
    sqrt((p_own + p_swapped − (p_own − p_swapped)²) / n), n the characters drawn."""
    row = next(r for r in rows if r["setting"] != "none")
    n = int(round(row["drawn"] * row["n"]))
    own, swapped = row["own"], row["swapped"]
    d = own - swapped
    se = float(np.sqrt(max(own + swapped - d ** 2, 0.0) / n)) if n else float("nan")
    word = compare(d, 0.0, ("more often than", "less often than", "not distinguishably more often than"), tol=z * se)
    none = next((r for r in rows if r["setting"] == "none"), None)
    baseline = "" if none is None else f" (with no reference: {none['own']:.0%} and {none['swapped']:.0%})"
    sentence = (f"Shown a two-character reference with every token visible, a drawn character took its own colour "
                f"family in {own:.0%} of {n} and the other character's in {swapped:.0%}{baseline}; the difference, "
                f"{d:+.0%} ± {se:.0%}, says it takes its own colour {word} the other's, counting only beyond two "
                f"standard errors.")
    return {"own": own, "swapped": swapped, "drawn": n, "difference": d, "se": se, "word": word, "sentence": sentence}


def seed_difference(scorer: StoryScorer, story, a: tuple, b: tuple, metric: str = "IIS-toy") -> tuple[float, float, int]:
    """``claims.paired_difference`` of ``metric`` under ``a`` and under ``b`` over the scorer's seeds,
    paired by seed (the same noise); ``a`` and ``b`` are ``(method, config)`` (config None: the
    backbone's own switches). Returns (mean, standard error, seeds measured under both)."""
    under_a, under_b = ([scorer.seed_metrics(story, *which, k)[metric] for k in range(scorer.n_seeds)] for which in (a, b))
    return paired_difference(under_a, under_b)


def carry_over_errors(scorer: StoryScorer, stories: dict, methods=("vanilla", "csa", "isolated")) -> list[dict]:
    """``stories.carry_over``'s rows as standard errors over the seeds (same keys, same generations)."""
    return [{"story": label, "method": method, **{d: summary[f"IIS-toy {d}"][1] for d in IDENTITY_DETAILS}}
            for label, story in stories.items()
            for method, summary in scorer.summary(story, methods=methods, details=True).items()]
