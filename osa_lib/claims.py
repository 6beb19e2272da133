"""Sentences a notebook prints, made from the numbers it measured: comparison and direction words,
paired differences with their standard errors, per-scene "kept / lost" marks, and the paper's
tables beside the toy's numbers. Notebooks record the numbers (``records.record_claims``) and the
tests assert the sentences from them, so no direction is written by hand, and a difference counts
only beyond its standard error."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["compare", "direction", "paired_difference", "difference_sentence", "with_error", "colour_marks",
           "PAPER_TABLES", "paper_beside_toy", "paper_vs_toy"]

#: The paper's Tables I and II (SDXL at 1024², its test stories): its method, StoryDiffusion where the
#: paper gives it (TIS: 1.56 under the method), and IIS without the re-weighting (Table II, about 69 %).
PAPER_TABLES = {"TIS": 28.91, "TIS StoryDiffusion": 28.91 - 1.56, "IIS": 70.28, "IIS StoryDiffusion": 64.87,
                "AQ": 6.52, "DS": 49.63, "IIS without re-weighting": 69.0}


def compare(a: float, b: float, words=("higher than", "lower than", "equal to"), tol: float = 0.0) -> str:
    """The word that says how ``a`` stands to ``b``: ``words[0]`` when ``a > b + tol``, ``words[1]``
    when ``a < b - tol``, else ``words[2]`` (NaN on either side: "not comparable with")."""
    if a != a or b != b:
        return "not comparable with"
    return words[0] if a > b + tol else words[1] if a < b - tol else words[2]


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
    """``more`` / ``less`` when a difference is more than ``z`` standard errors from 0, else ``same``
    (also when it could not be measured)."""
    if not (math.isfinite(mean) and math.isfinite(sem)):
        return same
    return compare(mean, 0.0, (more, less, same), tol=z * sem)


def with_error(mean: float, se: float, digits: int = 1, signed: bool = False) -> str:
    """A table cell "mean ± se" ("n/a" for a NaN mean, no "± …" for a NaN error); ``signed`` writes
    the mean's sign, for differences."""
    if mean != mean:
        return "n/a"
    return f"{mean:{'+' if signed else ''}.{digits}f}" + ("" if se != se else f" ± {se:.{digits}f}")


def difference_sentence(name: str, difference: tuple, words=("higher", "lower"), z: float = 2.0) -> str:
    """"<name> is higher/lower (d ± se)" when a paired difference ``(mean, se[, n])`` is beyond ``z``
    standard errors, else "<name> is within noise (d ± se)"; one seed (no standard error) says so."""
    d, se = difference[:2]
    if d != d:
        return f"{name} is not measured in this run"
    numbers = f"({d:+.1f} ± {se:.1f} points)" if se == se else f"({d:+.1f} points, one seed: no standard error)"
    if se != se:
        return f"{name} cannot be judged {numbers}"
    word = direction(d, se, z, *words, same="")
    return f"{name} is {word} {numbers}" if word else f"{name} is within noise {numbers}"


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
            ("IIS", "IIS-toy (%)", "IIS-toy", "in spirit: same character across scenes, but unnamed details "
                                                   "(hue, brightness, size, mark), not an image embedding"),
            ("AQ", "—", None, "no toy measure (no aesthetic predictor for the toy world)"),
            ("DS", "—", None, "no toy measure (no DreamSim for the toy world)")]
    table = []
    for paper_key, toy_name, key, comparable in rows:
        table.append({"metric (paper)": paper_key + (" (%)" if paper_key in ("IIS", "DS") else ""),
                      "paper's method": fmt(PAPER_TABLES[paper_key]),
                      "StoryDiffusion (paper)": fmt(PAPER_TABLES.get(paper_key + " StoryDiffusion")),
                      "toy measure": toy_name,
                      "isolated (toy)": fmt(toy.get("isolated", {}).get(key)) if key else "—",
                      "CSA (toy)": fmt(toy.get("csa", {}).get(key)) if key else "—",
                      "vanilla (toy)": fmt(toy.get("vanilla", {}).get(key)) if key else "—",
                      "comparable?": comparable})
    return table


def paper_vs_toy(toy: dict[str, tuple[float, float]]) -> list[dict]:
    """Rows setting the paper's Tables I and II beside the toy's measurements, each saying what can
    be compared and what cannot.

    Args:
        toy: ``(mean, standard error[, n])`` in points under "IIS gain over CSA", "IIS gain over vanilla",
            "w=0 IIS change" (paired differences, ``paired_difference``) and "TIS" (TIS-toy, %).
    """
    def cell(key):
        mean, se = toy.get(key, (float("nan"), float("nan")))[:2]
        if mean != mean:
            return "not measured"
        error = f" ± {se:.1f}" if se == se else " (one seed)"
        return (f"{mean:.1f}" if key == "TIS" else f"{mean:+.1f}") + error
    gain = PAPER_TABLES["IIS"] - PAPER_TABLES["IIS StoryDiffusion"]
    return [
        {"quantity": "identity: the method minus StoryDiffusion (IIS, points)", "paper (SDXL, Table I)": f"+{gain:.2f}",
         "toy": cell("IIS gain over CSA"),
         "comparable?": "the sign: both set the method against Consistent Self-Attention on the same stories; not "
                        "the size (IIS-toy compares exact identity details, IIS compares image embeddings)"},
        {"quantity": "identity: the method minus the unmodified model (points)", "paper (SDXL, Table I)": "not reported",
         "toy": cell("IIS gain over vanilla"), "comparable?": "no paper number"},
        {"quantity": "identity: without re-weighting minus with (points)",
         "paper (SDXL, Table I)": f"about {PAPER_TABLES['IIS without re-weighting'] - PAPER_TABLES['IIS']:+.1f} (Table II)",
         "toy": cell("w=0 IIS change"), "comparable?": "the sign; the paper does not state its w"},
        {"quantity": "text fidelity", "paper (SDXL, Table I)": f"TIS {PAPER_TABLES['TIS']}", "toy": cell("TIS"),
         "comparable?": "no: a CLIP score ×100 against the share of prompt facts the analyzer finds (TIS-toy, %)"},
        {"quantity": "aesthetics, DreamSim", "paper (SDXL, Table I)": f"AQ {PAPER_TABLES['AQ']}, DS {PAPER_TABLES['DS']} %",
         "toy": "no toy counterpart", "comparable?": "no"},
    ]
