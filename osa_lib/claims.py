"""Sentences a notebook prints, made from the numbers it measured: paired differences with their
standard errors and the direction word they support, per-scene "kept / lost" marks, and the
paper's tables beside the toy's numbers. Notebooks record the numbers (``figures.record_claims``)
and the tests assert the sentences from them, so no direction is written by hand."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["paired_difference", "direction", "colour_marks", "PAPER_TABLE_I", "PAPER_TABLE_II", "paper_beside_toy"]

#: The paper's Table I (SDXL, 1024²): its method and StoryDiffusion where the paper gives both.
PAPER_TABLE_I = {"TIS": {"paper's method": 28.91, "StoryDiffusion": 28.91 - 1.56},
                 "IIS (%)": {"paper's method": 70.28, "StoryDiffusion": 64.87},
                 "AQ": {"paper's method": 6.52, "StoryDiffusion": None},
                 "DS (%)": {"paper's method": 49.63, "StoryDiffusion": None}}
#: The paper's Table II (ablation): IIS without the re-weighting (about 69 %) against the full method.
PAPER_TABLE_II = {"IIS (%)": {"full method": 70.28, "without re-weighting": 69.0}}


def paired_difference(a, b) -> tuple[float, float, int]:
    """Mean and standard error of ``a − b`` over the pairs where both were measured (not NaN), and
    how many pairs that is. NaN mean with fewer than one pair; NaN error with fewer than two."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan"), float("nan"), 0
    sem = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), sem, int(len(d))


def direction(mean: float, sem: float, z: float = 2.0, more: str = "higher than", less: str = "lower than",
              same: str = "not distinguishable from") -> str:
    """``more`` / ``less`` when the difference is more than ``z`` standard errors from 0, else ``same``
    (also when it could not be measured)."""
    if not (math.isfinite(mean) and math.isfinite(sem)) or abs(mean) <= z * sem:
        return same
    return more if mean > 0 else less


def colour_marks(story, result) -> list[str]:
    """Per scene, each character's colour family against its first drawn appearance: "first",
    "kept", "lost" or "not drawn" (the analyzer reads the image), e.g. "Box kept · Tri lost"."""
    from .toy.metrics import read_scene
    first: dict[str, str] = {}
    marks = []
    for scene, res in zip(story.scenes, result.scenes):
        found, words = read_scene(story, scene, res.image), []
        for name, d in found.items():
            if d is None:
                words.append(f"{name} not drawn")
            elif name not in first:
                first[name] = d.colour
                words.append(f"{name} first")
            else:
                words.append(f"{name} {'kept' if d.colour == first[name] else 'lost'}")
        marks.append(" · ".join(words))
    return marks


def paper_beside_toy(toy: dict[str, dict[str, float]]) -> list[dict]:
    """The paper's Table I and II beside the toy's numbers, one row per metric.

    Args:
        toy: ``{method: {metric: mean}}`` on the toy (methods "isolated", "csa", "vanilla").
    """
    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.2f}"

    rows = [("TIS", "TIS-toy (%)", "TIS-toy", "no: CLIP score ×100 against facts the analyzer checks"),
            ("IIS (%)", "IIS-toy (%)", "IIS-toy", "in spirit: same character across scenes, but unnamed details "
                                                   "(hue, brightness, size, mark), not an image embedding"),
            ("AQ", "—", None, "no toy measure (no aesthetic predictor for the toy world)"),
            ("DS (%)", "—", None, "no toy measure (no DreamSim for the toy world)")]
    table = []
    for paper_key, toy_name, key, comparable in rows:
        table.append({"metric (paper)": paper_key,
                      "paper's method": fmt(PAPER_TABLE_I[paper_key]["paper's method"]),
                      "StoryDiffusion (paper)": fmt(PAPER_TABLE_I[paper_key]["StoryDiffusion"]),
                      "toy measure": toy_name,
                      "isolated (toy)": fmt(toy.get("isolated", {}).get(key)) if key else "—",
                      "CSA (toy)": fmt(toy.get("csa", {}).get(key)) if key else "—",
                      "vanilla (toy)": fmt(toy.get("vanilla", {}).get(key)) if key else "—",
                      "comparable?": comparable})
    return table
