"""Toy-world measures of a flip-book (``osa_lib.video``), read by the analyzer from its frames.

Frame 0 is the reference: every measure compares a character's later frames with it, or each
frame with the next. A character "is" the largest detection of its shape
(``analyzer.largest_detection``, the rule every toy measurement uses).

- **drawn** (%): (character, frame) pairs where the character is found at all.
- **colour kept** (%): of a character's later frames where it is drawn (and drawn in frame 0),
  the share in frame 0's colour family.
- **identity constancy** (%): the mean of IIS-toy's four identity terms (hue, brightness, size,
  mark; ``metrics.identity_terms``) between each later frame and frame 0, ×100; ``hue``, ``size``
  and ``mark`` are three of those terms on their own.
- **mixed** (%): later frames of a multi-character prompt in which a character is drawn in the
  colour of another (``metrics.is_mixed``): the other's named colour, or for an uncoloured one,
  the colour it was drawn in frame 0.
- **motion error** (image px): how far a character's mask centroid moved from frame 0 against
  how far its noise was moved (``pixel_offsets``), as the length of the difference; **motion
  followed** (%): the share of those within ``tolerance`` pixels (default: one latent pixel).
- **flicker** (% of full scale): the mean absolute change of the pixels inside a character from
  frame k to frame k + 1, after moving frame k + 1 back by the shift it was given (so motion
  that follows the shift is not flicker); channels averaged, pixels that leave the frame dropped.
  Every consecutive pair counts: with a shift under one latent pixel per frame some neighbours
  start from the same noise, and every method draws those identically (no change), which scales
  all methods' flicker down alike (half a pixel per frame over 8 frames: 3 of the 7 pairs).

NaN where there is nothing to count (a character never drawn in frame 0; one character, for
"mixed").
"""
from __future__ import annotations

import numpy as np

from .analyzer import analyze_image, largest_detection
from .metrics import identity_terms, is_mixed

__all__ = ["FLIPBOOK_METRICS", "flipbook_metrics", "mask_centroid", "motion_compensated_change"]

FLIPBOOK_METRICS = ("drawn", "colour kept", "identity constancy", "hue", "size", "mark", "mixed",
                    "motion error", "motion followed", "flicker")


def mask_centroid(mask: np.ndarray) -> np.ndarray:
    """(2,) mean (row, column) of a boolean mask's pixels."""
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean(), cols.mean()])


def motion_compensated_change(before: np.ndarray, after: np.ndarray, mask: np.ndarray, move) -> float:
    """Mean |after[p + move] − before[p]| over the pixels p of ``mask`` (channels averaged) whose
    moved position is inside the frame; NaN when none is. ``before``, ``after``: (H, W, 3) in [0, 1]."""
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    to_rows, to_cols = rows + int(move[0]), cols + int(move[1])
    inside = (to_rows >= 0) & (to_rows < h) & (to_cols >= 0) & (to_cols < w)
    if not inside.any():
        return float("nan")
    a = before[rows[inside], cols[inside]]  # (n, 3)
    b = after[to_rows[inside], to_cols[inside]]
    return float(np.abs(b - a).mean())


def _mean(values) -> float:
    return 100 * float(np.mean(values)) if len(values) else float("nan")


def flipbook_metrics(frames: np.ndarray, shapes: list[str], id_colours: list[str | None],
                     pixel_offsets: np.ndarray, tolerance: float | None = None) -> dict:
    """The measures of the module docstring for one flip-book.

    Args:
        frames: (F, H, W, 3) float in [0, 1].
        shapes: each character's shape word.
        id_colours: each character's named colour (None when its prompt names none).
        pixel_offsets: (F, 2) how far each frame's noise was moved (rows, columns), image pixels.
        tolerance: motion error, in image pixels, still counted as followed (default: one latent
            pixel, ``pixel_offsets``' step; 2 when the offsets never move).

    Returns:
        ``FLIPBOOK_METRICS`` (percentages, the motion error in pixels), ``"per character"``:
        {shape: {"colour kept", "identity constancy", "drawn"}}, and the counts behind them.
    """
    frames = np.asarray(frames, np.float32)
    offsets = np.asarray(pixel_offsets, np.float64)
    if tolerance is None:
        steps = np.abs(np.diff(offsets, axis=0))
        tolerance = float(steps[steps > 0].min()) if (steps > 0).any() else 2.0
    found = [{s: largest_detection(analyze_image(f), s) for s in shapes} for f in frames]  # per frame
    first = found[0]
    reference_colour = {s: c or (first[s].colour if first[s] is not None else None) for s, c in zip(shapes, id_colours)}
    kept, terms, errors, flicker, mixed, per_character = [], [], [], [], [], {}
    for s in shapes:
        mine_kept, mine_terms = [], []
        for k in range(1, len(frames)):
            d, d0 = found[k][s], first[s]
            if d is None or d0 is None:
                continue
            mine_kept.append(d.colour == d0.colour)
            mine_terms.append(identity_terms(d, d0))
            moved = mask_centroid(d.mask) - mask_centroid(d0.mask)
            errors.append(float(np.linalg.norm(moved - offsets[k])))
        for k in range(len(frames) - 1):
            d = found[k][s]
            if d is not None:
                change = motion_compensated_change(frames[k], frames[k + 1], d.mask, offsets[k + 1] - offsets[k])
                if not np.isnan(change):
                    flicker.append(change)
        kept += mine_kept
        terms += mine_terms
        per_character[s] = {"drawn": _mean([f[s] is not None for f in found]), "colour kept": _mean(mine_kept),
                            "identity constancy": _mean([np.mean(list(t.values())) for t in mine_terms])}
    if len(shapes) > 1:
        mixed = [is_mixed(found[k], reference_colour) for k in range(1, len(frames))]
    return {"drawn": _mean([f[s] is not None for f in found for s in shapes]),
            "colour kept": _mean(kept),
            "identity constancy": _mean([np.mean(list(t.values())) for t in terms]),
            "hue": _mean([t["hue"] for t in terms]), "size": _mean([t["size"] for t in terms]),
            "mark": _mean([t["mark"] for t in terms]),
            "mixed": _mean(mixed),
            "motion error": float(np.mean(errors)) if errors else float("nan"),
            "motion followed": _mean([e <= tolerance for e in errors]),
            "flicker": _mean(flicker),
            "per character": per_character, "frames": len(frames), "compared": len(terms),
            "mixed frames": int(sum(mixed)), "multi-character frames": len(mixed)}
