"""Character masks ``M_m`` from cross-attention maps ``A_m`` (docs/method.md, steps 1-3).

The extended block needs, for every character ``m`` in a scene, a binary mask ``M_m`` saying
which image tokens belong to that character, and a normalised activation ``Â_m`` in [0, 1]
used to re-weight attention to its reference tokens. Both come from the original branch's
cross-attention probabilities, so no segmentation model is involved:

1. ``aggregate_maps``  - average ``A_m`` over the up-block layers, upsampled to the largest one.
2. (``attention.AttentionStore`` averages the maps over the denoising steps taken so far, since
   early steps are noisy; this module receives that running mean.)
3. ``normalize_maps``  - min-max each map to [0, 1]: this is ``Â_m``.
4. ``otsu_threshold``  - Otsu's threshold per map, batched; agrees with
   ``skimage.filters.threshold_otsu`` (the reference implementation).
5. ``resolve_overlaps``- a pixel claimed by several characters goes to one of them
   (paper: the map with the lower coefficient of variation wins).
6. ``reliability``     - empty / near-full masks and constant maps are flagged, so the caller can
   fall back to the original branch for that character and log why.

``subject_masks`` composes all of these. Every function is pure and batched: tensors in,
tensors out, no model, no global state. Shapes use ``B`` images, ``M`` characters and an
``H x W`` latent grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import OVERLAP_RULES

__all__ = [
    "OVERLAP_RULES",
    "SubjectMasks",
    "aggregate_maps",
    "coefficient_of_variation",
    "normalize_maps",
    "otsu_masks",
    "otsu_threshold",
    "reliability",
    "resize_masks",
    "resolve_overlaps",
    "strongest_region",
    "subject_masks",
    "top_fraction",
]

def _as_float(x: Tensor) -> Tensor:
    """Upcast to at least float32: attention probabilities are small and fp16 loses them."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)


def _check_maps(A: Tensor, name: str = "A") -> None:
    if A.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., H, W); got shape {tuple(A.shape)}")


# ---------------------------------------------------------------------------------------------
# 1. Aggregation over layers, and changing a mask's resolution
# ---------------------------------------------------------------------------------------------


def aggregate_maps(maps: list[Tensor]) -> Tensor:
    """Average per-layer cross-attention maps ``A_m`` at the largest resolution.

    Up-block layers see the image at different resolutions (e.g. 32x32 and 64x64 for SDXL at
    1024^2); averaging them after bilinear upsampling uses the coarse layers' cleaner layout and
    the fine layers' detail.

    Args:
        maps (list[Tensor]): one tensor per layer, each ``(B, M, h_l, w_l)`` with the same
            ``B`` (images) and ``M`` (characters). Already averaged over heads and subject tokens.

    Returns:
        Tensor: ``(B, M, H, W)`` with ``H = max h_l``, ``W = max w_l``; float32 (or float64 if
        given), because bilinear averaging in fp16 loses the small probability values.

    Raises:
        ValueError: if ``maps`` is empty, a map is not 4-D, or ``B``/``M`` differ between layers.
    """
    if len(maps) == 0:
        raise ValueError(
            "aggregate_maps got an empty list: record at least one cross-attention layer "
            "(are any up-block attn2 layers hooked?)"
        )
    for i, a in enumerate(maps):
        if a.dim() != 4:
            raise ValueError(
                f"maps[{i}] must be (B, M, h, w); got shape {tuple(a.shape)}. "
                "Reshape the N image tokens to (h, w) and put characters on dim 1."
            )
    B, M = maps[0].shape[:2]
    for i, a in enumerate(maps):
        if a.shape[:2] != (B, M):
            raise ValueError(
                f"maps[{i}] has (B, M) = {tuple(a.shape[:2])} but maps[0] has {(B, M)}: "
                "all layers must cover the same images and the same characters."
            )
    H = max(a.shape[-2] for a in maps)
    W = max(a.shape[-1] for a in maps)
    total = None
    for a in maps:
        a = _as_float(a)  # (B, M, h_l, w_l)
        if a.shape[-2:] != (H, W):
            a = F.interpolate(a, size=(H, W), mode="bilinear", align_corners=False)  # (B, M, H, W)
        total = a if total is None else total + a
    return total / len(maps)  # (B, M, H, W)


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Binary masks ``(B, M, h, w)`` -> ``(B, M, *size)`` bool, each output pixel set when most of
    the input pixels under it are: nearest neighbour when enlarging by an integer factor, a
    majority vote when shrinking. The one way masks change resolution in this library."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.bool()
    return F.interpolate(masks.float(), size=tuple(size), mode="area") > 0.5


# ---------------------------------------------------------------------------------------------
# 2. Normalisation and Otsu thresholding
# ---------------------------------------------------------------------------------------------


def normalize_maps(A: Tensor, eps: float = 1e-8) -> Tensor:
    """Min-max normalise each map to [0, 1]: ``Â_m = (A_m - min) / (max - min)``.

    ``Â_m`` is both the input to Otsu and the re-weighting factor of isolated self-attention.
    A map with no contrast (``max - min <= eps``, e.g. all zeros because the subject token got
    no attention) becomes all zeros instead of NaN; its Otsu mask is then empty and
    :func:`reliability` flags it. Non-constant maps have min exactly 0 and max exactly 1,
    which lets :func:`otsu_threshold` bin them with a single multiply.

    Args:
        A (Tensor): ``(..., H, W)`` maps; normalised over the last two dims.
        eps (float): absolute range at or below which a map counts as constant.

    Returns:
        Tensor: same shape as ``A``, values in [0, 1], float32 or float64.
    """
    _check_maps(A)
    A = _as_float(A)
    lo = A.amin(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    hi = A.amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    rng = hi - lo  # (..., 1, 1)
    # Dividing by inf sends a constant map to exactly 0 without a separate masking pass.
    rng = torch.where(rng <= eps, torch.full_like(rng, float("inf")), rng)
    return (A - lo).div_(rng)  # (..., H, W)


def _otsu_from_counts(counts: Tensor, centers: Tensor, P: int) -> Tensor:
    """Index of the Otsu bin from histograms ``counts (N, nbins)`` and ``centers (N|1, nbins)``.

    skimage's between-class variance for a split after bin ``i`` is
    ``w1 * w2 * (mu1 - mu2)^2`` with ``w1 = sum_{<=i} n``, ``s1 = sum_{<=i} n * c``,
    ``w2 = P - w1`` and total ``S``; it simplifies to ``(P * s1 - S * w1)^2 / (w1 * w2)``, which
    needs one cumsum per quantity and few ops on these small tensors. Summed in float64: the
    float32 sums skimage uses only add rounding noise.
    """
    w1 = counts.cumsum(1, dtype=torch.float64)  # (N, nbins)
    s1 = (counts * centers.to(torch.float64)).cumsum(1)  # (N, nbins)
    S = s1[:, -1:]  # (N, 1)
    w1, s1 = w1[:, :-1], s1[:, :-1]  # (N, nbins-1): splits after bins 0 .. nbins-2
    var12 = (P * s1 - S * w1).square_() / (w1 * (P - w1)).clamp_min_(1.0)  # (N, nbins-1)
    return var12.argmax(dim=1, keepdim=True)  # (N, 1) first maximum, like np.argmax


def otsu_threshold(maps: Tensor, nbins: int = 256) -> Tensor:
    """Otsu's threshold of every map, batched over any leading dims.

    Otsu picks the threshold that maximises the between-class variance of the map's histogram.
    This reproduces ``skimage.filters.threshold_otsu(image, nbins)`` (the reference
    implementation) for float maps: ``nbins`` equal-width bins spanning [min, max] of each map, edges
    built like ``np.linspace`` in the map's dtype, numpy's rule that the last bin includes the
    right edge, and the threshold returned as a bin *centre*. So the histograms are identical
    to skimage's; the class statistics are summed in float64 where skimage uses float32, so on
    near-ties (bimodal maps with an almost empty gap) the two may pick different bins of
    practically equal between-class variance.

    Maps already normalised to [0, 1] (min 0, max 1, as :func:`normalize_maps` returns) with a
    power-of-two ``nbins`` take an exact fast path: their edges are ``k / nbins`` exactly, so a
    pixel's bin is ``floor(x * nbins)``.

    Constant maps return the constant, as skimage does; ``map > threshold`` is then empty.
    Integer inputs are binned as floats (skimage gives integers one bin per value instead).

    Args:
        maps (Tensor): ``(..., H, W)``; each of the last-two-dims maps gets its own threshold.
        nbins (int): histogram bins, 256 like skimage.

    Returns:
        Tensor: thresholds of shape ``maps.shape[:-2]``, in the maps' float dtype.

    Raises:
        ValueError: on non-finite values (skimage raises too), empty maps, or ``nbins < 2``.
    """
    _check_maps(maps, "maps")
    if nbins < 2:
        raise ValueError(f"nbins must be >= 2, got {nbins}")
    lead = maps.shape[:-2]
    P = maps.shape[-2] * maps.shape[-1]
    if P == 0:
        raise ValueError(f"maps have no pixels: shape {tuple(maps.shape)}")
    x = _as_float(maps).reshape(-1, P)  # (N, P)
    N = x.shape[0]
    if N == 0:
        return x.new_zeros(lead)
    lo = x.amin(dim=1)  # (N,)  NaN propagates into lo/hi, so checking them checks every pixel
    hi = x.amax(dim=1)  # (N,)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("otsu_threshold got NaN or inf values; check the attention maps upstream")
    const = lo == hi  # (N,)
    rows = torch.arange(N, device=x.device)[:, None]  # (N, 1)

    unit = (nbins & (nbins - 1)) == 0 and bool(((lo == 0) & ((hi == 1) | const)).all())
    if unit:
        # Edges k / nbins are exact in binary floating point, and so is x * nbins.
        idx = (x * nbins).to(torch.int32)  # (N, P) in [0, nbins]; nbins only for x == 1
        idx += (rows * (nbins + 1)).to(torch.int32)  # row offsets for one flat bincount
        counts = torch.bincount(idx.reshape(-1), minlength=N * (nbins + 1)).view(N, nbins + 1)  # idx keeps x's strides
        counts[:, nbins - 1] += counts[:, nbins]  # numpy: the last bin includes the right edge
        counts = counts[:, :nbins]  # (N, nbins)
        k = torch.arange(nbins, dtype=x.dtype, device=x.device)
        centers = ((2 * k + 1) / (2 * nbins))[None, :]  # (1, nbins)  exact, = skimage's centres
        thr = centers[0][_otsu_from_counts(counts, centers, P).squeeze(1)]  # (N,)
    else:
        # numpy widens an empty range to [v - 0.5, v + 0.5]; it only avoids 0/0 here.
        first = torch.where(const, lo - 0.5, lo)[:, None]  # (N, 1)
        last = torch.where(const, hi + 0.5, hi)[:, None]  # (N, 1)
        # Edges exactly as np.linspace(first, last, nbins + 1, dtype=x.dtype).
        k = torch.arange(nbins + 1, dtype=x.dtype, device=x.device)  # (nbins+1,)
        edges = k * ((last - first) / nbins) + first  # (N, nbins+1)
        edges[:, -1:] = last
        centers = (edges[:, :-1] + edges[:, 1:]) / 2.0  # (N, nbins)
        # numpy's bin index: an arithmetic guess, then a +-1 correction against the edges.
        idx = ((x - first) / (last - first) * nbins).long().clamp_(0, nbins - 1)  # (N, P)
        idx -= (x < edges.gather(1, idx)).long()
        idx += ((x >= edges.gather(1, idx + 1)) & (idx != nbins - 1)).long()
        idx.clamp_(0, nbins - 1)
        counts = torch.bincount((idx + rows * nbins).reshape(-1), minlength=N * nbins).view(N, nbins)
        thr = centers.gather(1, _otsu_from_counts(counts, centers, P)).squeeze(1)  # (N,)
    thr = torch.where(const, lo, thr)  # skimage: a constant image's threshold is its value
    return thr.reshape(lead)


def otsu_masks(A: Tensor, nbins: int = 256, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Binary masks ``M_m = Â_m > otsu(Â_m)`` from maps ``A_m``.

    Args:
        A (Tensor): ``(..., H, W)`` maps, raw or already normalised.
        nbins (int): Otsu histogram bins.
        eps (float): constant-map tolerance of :func:`normalize_maps`.

    Returns:
        tuple[Tensor, Tensor]: ``M_m`` bool ``(..., H, W)`` (strictly above the threshold, like
        skimage's ``image > thresh``) and the thresholds ``(...)`` on the normalised scale.
        Constant maps give an empty mask and threshold 0.
    """
    A_hat = normalize_maps(A, eps)  # (..., H, W)
    thr = otsu_threshold(A_hat, nbins)  # (...)
    M = A_hat > thr[..., None, None]  # (..., H, W)
    return M, thr


# ---------------------------------------------------------------------------------------------
# 3. Overlaps
# ---------------------------------------------------------------------------------------------


def coefficient_of_variation(A: Tensor, eps: float = 1e-8) -> Tensor:
    """``CV = std / mean`` of each map over its pixels (population std).

    The paper's overlap rule ranks characters by it, reading a high CV as a noisy map
    ("noisier maps segment irrelevant regions"). Note what CV measures: it is high when the
    mass sits in few pixels relative to the mean - scattered speckle, but also a clean small
    blob on a dark background (a 0/1 blob covering a fraction p has CV = sqrt((1 - p) / p)) -
    and low for smooth, spread-out maps. So "lower CV wins" also favours the character whose
    map covers more area; notebook 03 measures the rule against alternatives.
    Compute it on non-negative maps (raw attention probabilities): CV is scale- but not
    shift-invariant, so min-max normalised maps give different values.

    Args:
        A (Tensor): ``(..., H, W)``.
        eps (float): floor on ``|mean|`` so an all-zero map gives 0, not NaN.

    Returns:
        Tensor: ``(...)``.
    """
    _check_maps(A)
    A = _as_float(A)
    mean = A.mean(dim=(-2, -1))  # (...)
    std = A.std(dim=(-2, -1), unbiased=False)  # (...)
    return std / mean.abs().clamp_min(eps)


def resolve_overlaps(masks: Tensor, A: Tensor, rule: str = "lower_cv", eps: float = 1e-8) -> Tensor:
    """Give each pixel claimed by several characters to exactly one of them.

    Isolated attention needs disjoint masks: a token inside ``M_m`` and ``M_j`` would attend to
    two characters' references and bleed their features. Rules (the paper's and two
    alternatives, measured in notebook 03):

    - ``"lower_cv"`` (paper): the character whose whole map has the lower coefficient of
      variation wins every contested pixel.
    - ``"higher_cv"``: the opposite priority.
    - ``"argmax"``: per pixel, the claimant with the highest normalised activation ``Â_m``.

    Ties go to the lower character index. Unclaimed pixels stay background.

    Args:
        masks (Tensor): bool ``(B, M, H, W)`` Otsu masks ``M_m``.
        A (Tensor): ``(B, M, H, W)`` maps the masks came from (raw, non-negative maps for the CV
            rules; ``"argmax"`` normalises them itself).
        rule (str): one of :data:`OVERLAP_RULES`.
        eps (float): passed to :func:`coefficient_of_variation` / :func:`normalize_maps`.

    Returns:
        Tensor: bool ``(B, M, H, W)``, pairwise disjoint along ``M``, each a subset of ``masks``.
    """
    if rule not in OVERLAP_RULES:
        raise ValueError(f"unknown overlap rule {rule!r}; accepted rules: {', '.join(OVERLAP_RULES)}")
    if masks.dim() != 4 or masks.shape != A.shape:
        raise ValueError(
            f"masks and A must both be (B, M, H, W) with the same shape; got {tuple(masks.shape)} "
            f"and {tuple(A.shape)}"
        )
    masks = masks.bool()
    if rule == "argmax":
        score = normalize_maps(A, eps)  # (B, M, H, W)
    else:
        cv = coefficient_of_variation(A, eps)  # (B, M)
        prio = -cv if rule == "lower_cv" else cv  # (B, M) higher wins
        score = prio[..., None, None].expand(A.shape)  # (B, M, H, W)
    score = score.masked_fill(~masks, float("-inf"))  # non-claimants never win
    winner = score.argmax(dim=1, keepdim=True)  # (B, 1, H, W) first max on ties
    chars = torch.arange(masks.shape[1], device=masks.device)[None, :, None, None]  # (1, M, 1, 1)
    return masks & (chars == winner)  # (B, M, H, W)


# ---------------------------------------------------------------------------------------------
# 4. Reliability
# ---------------------------------------------------------------------------------------------


def reliability(
    masks: Tensor,
    A: Tensor | None = None,
    min_fraction: float = 0.01,
    max_fraction: float = 0.9,
    eps: float = 1e-8,
) -> tuple[Tensor, list[list[str]]]:
    """Flag masks the isolated branch should not trust, with a reason a person can read.

    The method: a map whose Otsu mask is empty or covers nearly the whole image is unreliable;
    the caller falls back to the original branch for that character and logs the reason.

    Args:
        masks (Tensor): bool ``(B, M, H, W)``.
        A (Tensor | None): the maps ``(B, M, H, W)``, raw or normalised; if given, a constant
            map (range ``<= eps``) is named as the cause of its empty mask.
        min_fraction (float): masks covering less than this fraction of pixels are unreliable.
        max_fraction (float): masks covering more than this fraction are unreliable.
        eps (float): constant-map tolerance, as in :func:`normalize_maps`.

    Returns:
        tuple[Tensor, list[list[str]]]: ``ok`` bool ``(B, M)`` and ``reasons[b][m]``, an empty
        string where ``ok`` is True, e.g. ``"mask empty (0.0% of pixels): map has no contrast"``.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must be (B, M, H, W); got shape {tuple(masks.shape)}")
    frac = masks.float().mean(dim=(-2, -1))  # (B, M)
    if A is not None:
        A = _as_float(A)
        rng = A.amax(dim=(-2, -1)) - A.amin(dim=(-2, -1))  # (B, M)
        constant = rng <= eps
    else:
        constant = torch.zeros_like(frac, dtype=torch.bool)
    empty = frac == 0
    small = frac < min_fraction
    large = frac > max_fraction
    ok = ~(constant | small | large)  # (B, M)

    reasons: list[list[str]] = []
    for b, (fr, co, em, sm, la) in enumerate(
        zip(frac.tolist(), constant.tolist(), empty.tolist(), small.tolist(), large.tolist())
    ):
        row = []
        for f, c, e, s, l in zip(fr, co, em, sm, la):
            pct = f"{100 * f:.1f}% of pixels"
            if e:
                r = f"mask empty ({pct})"
            elif s:
                r = f"mask nearly empty ({pct} < min_fraction {100 * min_fraction:.1f}%)"
            elif l:
                r = f"mask nearly full ({pct} > max_fraction {100 * max_fraction:.1f}%)"
            else:
                r = ""
            if c:
                r = (r or f"mask {pct}") + ": map has no contrast"
            row.append(r)
        reasons.append(row)
    return ok, reasons


# ---------------------------------------------------------------------------------------------
# 5. All together
# ---------------------------------------------------------------------------------------------


@dataclass
class SubjectMasks:
    """Result of :func:`subject_masks`; all tensors are ``(B, M, ...)``.

    Attributes:
        masks: bool ``(B, M, H, W)`` final ``M_m``: disjoint, and all-False where ``ok`` is False.
        raw_masks: bool ``(B, M, H, W)`` Otsu masks before overlap resolution (for diagnostics
            and for comparing overlap rules).
        A_hat: ``(B, M, H, W)`` normalised maps ``Â_m`` in [0, 1], the re-weighting factor.
        thresholds: ``(B, M)`` Otsu thresholds on the ``Â_m`` scale.
        cv: ``(B, M)`` coefficient of variation of the aggregated (un-normalised) maps.
        ok: bool ``(B, M)``; False means "fall back to the original branch for this character".
        reasons: ``reasons[b][m]``, empty where ``ok``; log these.
    """

    masks: Tensor
    raw_masks: Tensor
    A_hat: Tensor
    thresholds: Tensor
    cv: Tensor
    ok: Tensor
    reasons: list[list[str]]


def top_fraction(A_hat: Tensor, fraction: float) -> Tensor:
    """bool ``(B, M, H, W)``: each map's ``ceil(fraction·H·W)`` highest pixels (ties at the cut kept)."""
    flat = A_hat.flatten(-2)  # (B, M, N)
    k = max(1, math.ceil(fraction * flat.shape[-1]))
    cut = flat.topk(k, dim=-1).values[..., -1:]  # (B, M, 1): the k-th highest value
    return (flat >= cut).view_as(A_hat)


def strongest_region(masks: Tensor, A_hat: Tensor) -> Tensor:
    """bool ``(B, M, H, W)``: of each mask's 4-connected regions, the one with the most ``Â_m``.

    A character is one object; in a small model's first steps the maps are diffuse and Otsu's
    mask falls apart into several patches, and copying the reference into each of them draws the
    character more than once (``results/history/toy_attn_only_finetune.md``, "Ninth look"). Not in the paper.

    Regions are found by propagating the largest pixel index through each mask's 4-neighbours
    until it settles (at most one pass per pixel of the longest path inside a region).
    """
    H, W = masks.shape[-2:]
    index = torch.arange(1, H * W + 1, dtype=torch.float32, device=masks.device).view(H, W)
    labels = torch.where(masks, index, torch.zeros(())).float()  # (B, M, H, W); 0 outside
    while True:
        padded = F.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack([labels, padded[..., :-2, 1:-1], padded[..., 2:, 1:-1],
                                  padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]]).amax(dim=0)
        spread = torch.where(masks, neighbours, torch.zeros(()))  # a region's largest index, spreading
        if torch.equal(spread, labels):
            break
        labels = spread
    flat, weight = labels.flatten(-2).long(), _as_float(A_hat).flatten(-2)  # (B, M, N)
    mass = torch.zeros(*flat.shape[:-1], H * W + 1, device=masks.device).scatter_add_(-1, flat, weight)
    mass[..., 0] = -1.0  # the background is never a region
    best = mass.argmax(dim=-1, keepdim=True)  # (B, M, 1): label of the region with the most Â
    return ((flat == best) & masks.flatten(-2)).view_as(masks)


def subject_masks(
    layer_maps: list[Tensor] | Tensor,
    rule: str = "lower_cv",
    nbins: int = 256,
    min_fraction: float = 0.01,
    max_fraction: float = 0.9,
    eps: float = 1e-8,
    area_cap: float | None = None,
    one_region: bool = False,
) -> SubjectMasks:
    """Masks ``M_m`` and normalised maps ``Â_m`` for one step, from the recorded ``A_m``.

    aggregate over layers -> normalise -> Otsu -> (area cap) -> (one region) -> reliability -> resolve overlaps
    among the reliable characters -> re-check. Unreliable characters are dropped *before* overlap
    resolution, because they fall back to the original branch and must not take pixels from a
    reliable character; a character left with (nearly) no pixels after resolution is flagged too.

    Args:
        layer_maps (list[Tensor] | Tensor): per-layer ``(B, M, h_l, w_l)`` maps, or an already
            aggregated ``(B, M, H, W)`` tensor (e.g. ``AttentionStore.mask_maps()``).
        rule (str): overlap rule, one of :data:`OVERLAP_RULES`; ``"lower_cv"`` is the paper's.
        nbins (int): Otsu histogram bins.
        min_fraction (float): see :func:`reliability`.
        max_fraction (float): see :func:`reliability`.
        eps (float): constant-map tolerance.
        area_cap (float | None): keep in an Otsu mask at most this fraction of the image's pixels,
            those with the highest ``Â_m`` (ties kept); None: Otsu's mask whole, as the paper. Not
            in the paper: see ``IsolationConfig.mask_area_cap``.
        one_region (bool): keep only each mask's region with the most ``Â_m``
            (:func:`strongest_region`); False: every region, as the paper.

    Returns:
        SubjectMasks: masks, raw_masks, A_hat, thresholds, cv, ok, reasons.
    """
    A = aggregate_maps(layer_maps) if isinstance(layer_maps, (list, tuple)) else _as_float(layer_maps)
    if A.dim() != 4:
        raise ValueError(f"aggregated maps must be (B, M, H, W); got shape {tuple(A.shape)}")
    A_hat = normalize_maps(A, eps)  # (B, M, H, W)
    thr = otsu_threshold(A_hat, nbins)  # (B, M)
    raw = A_hat > thr[..., None, None]  # (B, M, H, W)
    if area_cap is not None:
        raw = raw & top_fraction(A_hat, area_cap)
    if one_region:
        raw = strongest_region(raw, A_hat)
    cv = coefficient_of_variation(A, eps)  # (B, M)

    ok, reasons = reliability(raw, A, min_fraction, max_fraction, eps)
    kept = raw & ok[..., None, None]  # unreliable characters claim nothing
    resolved = resolve_overlaps(kept, A, rule, eps)  # (B, M, H, W)
    ok2, reasons2 = reliability(resolved, None, min_fraction, 1.0, eps)
    for b, (row_ok, row) in enumerate(zip(ok.tolist(), reasons2)):
        for m, (was_ok, r) in enumerate(zip(row_ok, row)):
            if was_ok and r:
                reasons[b][m] = f"{r} after overlap resolution ({rule})"
    ok = ok & ok2
    masks = resolved & ok[..., None, None]
    return SubjectMasks(masks, raw, A_hat, thr, cv, ok, reasons)
