"""Check cells for the notebooks' exercises (docs/teaching.md): each ``check_*`` takes the learner's
answer and what the notebook measured, raises ``AssertionError`` saying why when the answer is
wrong, and returns a sentence saying what was right. Notebooks ship with the answers filled in, so
they run headless; a learner clears an answer and writes their own."""
from __future__ import annotations

import numpy as np

__all__ = ["between_class_variance", "check_otsu", "check_iou", "check_cv", "check_lambda_zero", "check_mark_chance"]


def between_class_variance(values: np.ndarray, threshold: float) -> float:
    """Otsu's objective for one cut: ``w0·w1·(μ0 − μ1)²`` of the values at or below ``threshold``
    (class 0) and above it (class 1); 0 when one class is empty."""
    values = np.asarray(values, float).ravel()
    above = values > threshold
    w1 = above.mean()
    if w1 in (0.0, 1.0):
        return 0.0
    return float((1 - w1) * w1 * (values[~above].mean() - values[above].mean()) ** 2)


def check_otsu(my_threshold: float, a_hat: np.ndarray, library_threshold: float) -> str:
    """Exercise 1 (notebook 02): Otsu's threshold by hand on one map. The learner's cut must split
    the map's pixels at least as well as the library's (the same or a higher between-class variance,
    the quantity Otsu maximises); a cut anywhere between the same two pixels is as good."""
    mine, library = between_class_variance(a_hat, my_threshold), between_class_variance(a_hat, library_threshold)
    kept = int((np.asarray(a_hat) > my_threshold).sum())
    kept_library = int((np.asarray(a_hat) > library_threshold).sum())
    assert mine >= library * (1 - 1e-6), (
        f"Your threshold {my_threshold:.3f} keeps {kept} pixels with between-class variance {mine:.5f}; "
        f"osa_lib's {library_threshold:.3f} keeps {kept_library} with {library:.5f}. Otsu's threshold is the cut "
        f"that maximises w0·w1·(μ0 − μ1)² over every possible cut: try each pixel value as the cut and keep "
        f"the best.")
    return (f"Right: your cut keeps {kept} pixels (osa_lib's keeps {kept_library}), between-class variance "
            f"{mine:.5f} against {library:.5f}.")


def check_iou(my_iou: float, mask: np.ndarray, truth: np.ndarray, reported: float) -> str:
    """Exercise 2 (notebook 02): the IoU of the method's mask with the analyzer's, by hand, against
    the score the notebook reported for that character (``toy.analyzer.mask_iou``)."""
    from ..toy.analyzer import mask_iou
    mask, truth = np.asarray(mask, bool), np.asarray(truth, bool)
    both, either = int((mask & truth).sum()), int((mask | truth).sum())
    assert np.isclose(my_iou, reported, atol=1e-9) and np.isclose(reported, mask_iou(mask, truth)), (
        f"Your IoU {my_iou:.4f}, the notebook's {reported:.4f}. IoU is the number of pixels in both masks "
        f"({both}) divided by the number in either ({either}), on the image-size masks (True/False arrays).")
    return f"Right: {both} pixels in both masks, {either} in either, IoU {reported:.3f}."


def check_cv(my_cvs: list[float], my_winner: str, maps: np.ndarray, words: list[str]) -> str:
    """Exercise 3 (notebook 03): each character's coefficient of variation by hand, and which
    character the paper's lower-CV rule gives the contested pixels. ``maps``: (M, h, w) raw maps."""
    from ..masks import coefficient_of_variation
    import torch
    library = coefficient_of_variation(torch.as_tensor(np.asarray(maps, np.float32))).numpy()  # (M,)
    assert len(my_cvs) == len(words), f"give one CV per character ({len(words)}: {words})"
    for word, mine, theirs in zip(words, my_cvs, library):
        assert np.isclose(mine, theirs, rtol=1e-3), (
            f"CV of {word!r}: yours {mine:.4f}, osa_lib's {theirs:.4f}. CV is the population standard deviation "
            f"of the raw map over its pixels divided by its mean (np.std, not the sample std; not Â, whose "
            f"min-max scaling changes the CV).")
    winner = words[int(np.argmin(library))]
    assert my_winner == winner, (
        f"You named {my_winner!r}, but the paper's rule gives every contested pixel to the character whose map "
        f"has the lower CV: {winner!r} ({min(library):.3f} against {max(library):.3f}).")
    return f"Right: CVs {', '.join(f'{w} {c:.3f}' for w, c in zip(words, library))}; {winner!r} takes the overlap."


def check_lambda_zero(my_prediction: str, sweep: list[dict], vanilla: dict) -> str:
    """Exercise 4 (notebook 05): what does λ = 0 give? ``my_prediction`` is "same as vanilla",
    "better than vanilla" or "worse than vanilla" for IIS-toy and TIS-toy on the single story."""
    choices = ("same as vanilla", "better than vanilla", "worse than vanilla")
    assert my_prediction in choices, f"answer one of {choices}"
    row = next(r for r in sweep if r["λ"] == 0)
    same = all(row[f"{k} (single)"] == vanilla[k] for k in ("IIS-toy", "TIS-toy"))
    gain = row["IIS-toy (single)"] - vanilla["IIS-toy"]
    truth = "same as vanilla" if same else "better than vanilla" if gain > 0 else "worse than vanilla"
    assert my_prediction == truth, (
        f"You predicted {my_prediction!r}; the λ = 0 row reads IIS-toy {row['IIS-toy (single)']:.1f} and TIS-toy "
        f"{row['TIS-toy (single)']:.1f}, vanilla {vanilla['IIS-toy']:.1f} and {vanilla['TIS-toy']:.1f}. "
        f"F = λ·F_iso + (1 − λ)·F_ori at λ = 0 is F_ori: the original branch alone, the unmodified model.")
    return (f"Right: at λ = 0 the merge keeps only the original branch, so the row is vanilla's "
            f"(IIS-toy {vanilla['IIS-toy']:.1f}, TIS-toy {vanilla['TIS-toy']:.1f}) to the last digit.")


def check_mark_chance(my_chance: float, measured_chance: float, n: int) -> str:
    """Exercise 5 (notebook 05): the chance that two independently drawn characters share their inner
    mark (kind and, unless none, tone), against the Monte Carlo estimate over ``n`` pairs (in %)."""
    se = 100 * np.sqrt(my_chance / 100 * (1 - my_chance / 100) / n) if 0 < my_chance < 100 else 0.0
    assert abs(my_chance - measured_chance) <= 3 * max(se, 0.5), (
        f"You said {my_chance:.1f} %, drawing {n} pairs gives {measured_chance:.1f} %. A mark is none, dot or bar "
        f"(1 in 3 each), with a light or dark tone (1 in 2) that counts only when there is a mark: add the "
        f"probabilities that both are none, both dots of one tone, both bars of one tone.")
    return f"Right: {my_chance:.1f} % by hand, {measured_chance:.1f} % from {n} sampled pairs."
