"""Read characters back out of a toy-world image: the ground truth for *generated* images.

A diffusion model trained on :mod:`osa_lib.toy.world` produces images with no labels; this
module recovers, per character, the named attributes (shape, colour family) and the identity
details (hue, brightness, size, inner mark), so generated images can be scored like renders.
It must tolerate blur, noise and slightly-off colours, so every step is a threshold placed
halfway between what the world draws and what it does not, never an exact-colour lookup.

Algorithm (per image, 32x32):

1. **Colour segmentation.** Backgrounds are muted (chroma = max(RGB) - min(RGB) <= 0.37) and
   characters are saturated (chroma >= 0.72), so a pixel is *character-coloured* when its
   chroma is >= ``CHROMA_THRESHOLD`` (0.45: room for desaturated generations, above noisy
   desert sand). Each coloured pixel goes to the colour family with the nearest hue centre
   (circular distance).
2. **Components.** Per family: pixels less than 3 px apart are grouped (a dark bar can cut a
   small triangle in two), gaps of <= 2 rows closed and holes filled (so an inner mark belongs
   to its body); components below ``MIN_AREA`` pixels or with no interior are dropped. Every
   remaining component is a candidate character (world scenes have one per family; generated
   images may have more).
3. **Blurred edges.** Chroma is not linear under blending (blue over orange sand turns grey),
   so each body is grown by the ring pixels that unmix as >= 50 % body colour against the
   local background colour (nearest background pixel in the same row).
4. **Shape template fit.** Every world shape is ``{pixels : g_shape(pixel - center) <= size}``
   for a gauge function ``g`` that is homogeneous in the offset, so for one (shape, centre) a
   single evaluation of ``g`` on the grid gives the template for *all* sizes; a cumulative
   histogram over size bins then yields IoU(size) at once. Search: coarse 1-px centre grid
   around the component centroid, then a 0.25-px grid around each shape's best centre.
   Pixels that belong to *other* characters (dilated by one pixel) are "don't care", so an
   occluded character is not penalised for its hidden part. The best IoU picks the shape and
   is the detection's ``score``; size/centre are the mean over all tied-best fits.
5. **Mark.** Inside the fitted template, near its centre, each pixel is projected on the
   direction body-colour -> white and body-colour -> near-black (the two mark tones); pixels
   more than halfway to the strongest interior contrast (at least ``_MARK_MIN_CONTRAST``) are
   mark pixels. None: < 2 pixels; bar: >= 4 columns wide (the world's bars are >= 5 columns,
   its dots 2-3); otherwise dot. Tone: whichever projection dominates.
6. **Masks.** Filled component, plus mark pixels inside the template (a mark can touch the
   outline, e.g. a bar on a small triangle, so hole filling alone misses it), plus pixels
   enclosed by the union of characters but by none alone (a mark at an occluder's edge),
   given to the topmost character whose template holds them.

Hue is the circular mean of the body's core pixels (>= 2 px inside, marks excluded), value
the median HSV value there (robust to a blurred mark's halo).
``evaluate_analyzer`` validates all of this on freshly rendered scenes (optionally blurred and
noisy); ``python -m osa_lib.toy.analyzer --n 500`` prints the table.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from osa_lib.toy import world

__all__ = [
    "DetectedCharacter", "analyze_image", "match_characters", "mask_iou", "evaluate_analyzer",
    "CHROMA_THRESHOLD", "MIN_AREA", "MIN_SCORE", "MAX_SIZE", "largest_detection",
]

HW = world.IMAGE_SIZE
CHROMA_THRESHOLD = 0.45  # backgrounds <= 0.37, characters >= 0.72 (0.9 * value >= 0.8)
MIN_AREA = 12  # pixels; the smallest visible character in world scenes is ~35 px
MIN_SCORE = 0.6  # a detection whose best shape template fits worse than this is a blob, not that shape
#: a detection larger than any character the world draws (its largest radius plus a pixel of blurred
#: edge) is a flood of colour, not that shape: isolated attention at high w can paint a character's
#: colour over half the image, which a square template still fits (results/history/toy_attn_only_finetune.md)
MAX_SIZE = world.SIZE_RANGE[1] + 1.0
_FAMILIES = tuple(world.COLOURS)
_FAMILY_HUES = np.array([world.COLOURS[f] for f in _FAMILIES], np.float32)  # (5,)
# size thresholds for the template search: a template of size s holds pixels with g <= s
_SIZE_MIN, _SIZE_MAX, _SIZE_STEP = 2.5, 12.0, 0.05
_SIZE_EDGES = np.arange(_SIZE_MIN, _SIZE_MAX + 1e-6, _SIZE_STEP, dtype=np.float32)  # (B,)
_COARSE = np.arange(-5.0, 5.0 + 1e-6, 1.0, dtype=np.float32)  # centre offsets, px
_FINE = np.arange(-0.75, 0.75 + 1e-6, 0.25, dtype=np.float32)
_MARK_MIN_CONTRAST = 0.2  # a mark pixel moved >= this far from the body colour to a tone
_MARK_TONES = {tone: np.array(rgb, np.float32) / 255.0 for tone, rgb in world.MARK_RGB.items()}
_CROSS = ndimage.generate_binary_structure(2, 1)
_SQUARE = np.ones((3, 3), bool)
_VERTICAL = np.ones((3, 1), bool)
_ROWS, _COLS = world._pixel_grid(HW)  # (HW, HW) pixel-centre coordinates, same as the world's


@dataclass
class DetectedCharacter:
    """One character read from an image; attribute names follow :class:`world.Character`."""

    shape: str
    colour: str
    mask: np.ndarray  # (HW, HW) bool, visible pixels (body and mark)
    hue: float  # degrees in [0, 360)
    value: float  # HSV value in [0, 1]
    size: float  # radius in pixels, as in world.shape_mask
    mark: str  # "none" | "dot" | "bar"
    mark_tone: str  # "light" | "dark", "none" when mark == "none"
    center: tuple[float, float]  # (row, col), pixel-centre convention of world.shape_mask
    score: float  # IoU of the best shape template with the visible pixels, 0..1

    def identity(self) -> dict:
        """Identity details in the same layout as ``world.Character.identity()``."""
        return {"hue": self.hue, "value": self.value, "size": self.size,
                "mark": self.mark, "mark_tone": self.mark_tone}


# ----------------------------------------------------------------------------- input, colour
def _as_rgb(image) -> np.ndarray:
    """(HW, HW, 3) float32 in [0, 1]; clear ValueError otherwise (generated images vary)."""
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"analyze_image expects an (H, W, 3) RGB array, got shape {image.shape}; "
                         f"convert CHW tensors with .permute(1, 2, 0)")
    if image.shape[:2] != (HW, HW):
        raise ValueError(f"analyze_image expects a {HW}x{HW} toy-world image, got {image.shape[:2]}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"analyze_image expects uint8 or float in [0, 1], got dtype {image.dtype}")
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise ValueError("analyze_image got non-finite pixel values")
    if image.min() < -0.05 or image.max() > 1.05:
        raise ValueError(f"float image must be in [0, 1] (got range {image.min():.3g}..{image.max():.3g}); "
                         f"map [-1, 1] model outputs with (x + 1) / 2")
    return np.clip(image, 0.0, 1.0)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, chroma and value, each (HW, HW); vectorised colorsys.rgb_to_hsv."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(-1)
    chroma = value - rgb.min(-1)
    c = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(value == r, (g - b) / c, np.where(value == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c))
    return (hue * 60.0) % 360.0, chroma, value


def _hue_distance(a, b):
    """Circular distance in degrees."""
    d = np.abs(np.asarray(a, np.float32) - b) % 360.0
    return np.minimum(d, 360.0 - d)


def _circular_mean(hues: np.ndarray) -> float:
    rad = np.deg2rad(hues)
    return float(np.rad2deg(np.arctan2(np.sin(rad).mean(), np.cos(rad).mean())) % 360.0)


# ----------------------------------------------------------------------------- shape templates
def _gauge(shape: str, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """g with shape_mask(shape, c, s) == (g(pixel - c) <= s); same size convention as the world."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy)
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) / 0.85
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy)) / 1.15
    if shape == "triangle":  # dy <= 0.75 s and |dx| <= (dy + 1.05 s) * 1.15 / 1.8
        return np.maximum(dy / 0.75, (np.abs(dx) * (1.8 / 1.15) - dy) / 1.05)
    raise ValueError(f"unknown shape {shape!r}")


def _template_ious(shape: str, centers: np.ndarray, target: np.ndarray, care: np.ndarray) -> np.ndarray:
    """IoU of every (centre, size-threshold) template with ``target`` over ``care`` pixels.

    centers (C, 2) (row, col); target, care (HW, HW) bool. Returns (C, B) float, B = len(_SIZE_EDGES).
    One gauge evaluation per centre serves all sizes: pixels are binned by the smallest size
    threshold that includes them and a cumulative sum gives the template counts.
    """
    dy = _ROWS.reshape(1, -1) - centers[:, :1]  # (C, P)
    dx = _COLS.reshape(1, -1) - centers[:, 1:]
    g = _gauge(shape, dy, dx)  # (C, P)
    n_bins = len(_SIZE_EDGES)
    idx = np.clip(np.ceil((g - _SIZE_MIN) / _SIZE_STEP - 1e-4), 0, n_bins).astype(np.int64)  # (C, P)
    idx += (np.arange(len(centers)) * (n_bins + 1))[:, None]
    t, c = target.reshape(-1), care.reshape(-1)
    w_inter = np.tile(t & c, len(centers)).astype(np.float32)
    w_care = np.tile(c, len(centers)).astype(np.float32)
    size = len(centers) * (n_bins + 1)
    inter = np.bincount(idx.ravel(), w_inter, size).reshape(len(centers), -1).cumsum(1)[:, :n_bins]
    tsum = np.bincount(idx.ravel(), w_care, size).reshape(len(centers), -1).cumsum(1)[:, :n_bins]
    total = float((t & c).sum())
    return inter / np.maximum(tsum + total - inter, 1.0)  # (C, B)


def _grid(center: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    oy, ox = np.meshgrid(offsets, offsets, indexing="ij")
    return np.stack([center[0] + oy.ravel(), center[1] + ox.ravel()], 1).astype(np.float32)  # (K, 2)


def _fit_shape(target: np.ndarray, care: np.ndarray) -> tuple[str, tuple[float, float], float, float]:
    """Best (shape, centre, size, IoU) for a visible region; coarse-to-fine over centres."""
    rows, cols = np.nonzero(target)
    centroid = np.array([rows.mean() + 0.5, cols.mean() + 0.5], np.float32)
    best = None
    for shape in world.SHAPES:
        coarse = _grid(centroid, _COARSE)
        ious = _template_ious(shape, coarse, target, care)
        start = coarse[np.unravel_index(ious.argmax(), ious.shape)[0]]
        fine = _grid(start, _FINE)
        ious = _template_ious(shape, fine, target, care)
        top = ious.max()
        if best is None or top > best[0] + 1e-9:
            # all tied-best (centre, size) pairs: their mean is a less quantised estimate
            ci, si = np.nonzero(ious >= top - 1e-6)
            center = fine[ci].mean(0)
            # a threshold bin stands for sizes in (edge - step, edge]
            size = float((_SIZE_EDGES[si] - _SIZE_STEP / 2).mean())
            best = (top, shape, (float(center[0]), float(center[1])), size)
    top, shape, center, size = best
    return shape, center, size, float(top)


# ----------------------------------------------------------------------------- marks
def _mark(rgb: np.ndarray, body_rgb: np.ndarray, template: np.ndarray, allowed: np.ndarray,
          center: tuple[float, float], size: float) -> tuple[str, str, np.ndarray]:
    """Classify the inner mark; returns (mark, tone, (HW, HW) bool mark pixels).

    Pixels are scored by how far they moved from the body colour towards each mark tone
    (0 = body, 1 = mark colour), which stays meaningful under blur: a blurred 2x2 dot or a
    1-row bar still keeps >= ~0.6 of its contrast at the centre for sigma <= 0.6.
    """
    window = (np.abs(_ROWS - center[0]) <= 2.5) & (np.abs(_COLS - center[1]) <= 0.55 * size + 2.0)
    region = template & allowed & window  # (HW, HW)
    diff = rgb - body_rgb  # (HW, HW, 3)
    scores = {}
    for tone, tone_rgb in _MARK_TONES.items():
        axis = tone_rgb - body_rgb
        scores[tone] = diff @ axis / max(float(axis @ axis), 1e-6)  # (HW, HW)
    strength = np.maximum(scores["light"], scores["dark"])  # (HW, HW)
    interior = region & ndimage.binary_erosion(template, _CROSS)
    if not interior.any():
        return "none", "none", np.zeros_like(region)
    # halfway to the strongest interior contrast (blur lowers a small mark's peak), but never
    # below _MARK_MIN_CONTRAST so that noise on a plain body does not become a mark
    peak = float(strength[interior].max())
    candidate = region & (strength > max(_MARK_MIN_CONTRAST, 0.5 * min(peak, 1.0)))
    # seed in the template's interior, grow within the template (a bar may touch the outline)
    seed = candidate & interior
    pixels = ndimage.binary_propagation(seed, structure=_SQUARE, mask=candidate)
    if pixels.sum() < 2:
        return "none", "none", np.zeros_like(pixels)
    labels, n = ndimage.label(pixels, _SQUARE)
    if n > 1:  # keep the blob nearest the centre (specks elsewhere are noise)
        dist = [np.hypot(*(np.array(ndimage.center_of_mass(labels == k)) + 0.5 - center))
                for k in range(1, n + 1)]
        pixels = labels == (int(np.argmin(dist)) + 1)
        if pixels.sum() < 2:
            return "none", "none", np.zeros_like(pixels)
    cols = np.nonzero(pixels.any(0))[0]
    width = cols.max() - cols.min() + 1
    mark = "bar" if width >= 4 else "dot"
    tone = "light" if (scores["light"] - scores["dark"])[pixels].mean() > 0 else "dark"
    return mark, tone, pixels


# ----------------------------------------------------------------------------- edges
def _body_rgb(rgb: np.ndarray, own_colour: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """Median colour (3,) of a body's interior: edge pixels are blends, marks are excluded."""
    core = ndimage.binary_erosion(comp, _CROSS) & own_colour
    return np.median(rgb[core if core.sum() >= 3 else comp & own_colour], 0)


def _refine_edges(rgb: np.ndarray, coloured: np.ndarray, family: np.ndarray,
                  parts: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """Grow each body to the pixels that are at least half character colour (blurred edges).

    Chroma is not linear under blending (blue over the orange desert turns grey), so a blurred
    edge fails the chroma test well before it is half background. Here each ring pixel is
    unmixed against the body colour and the *local* background (nearest pixel in the same row
    more than 2 px from any character): alpha = (P - B).(C - B) / |C - B|^2, kept when alpha >= 0.5.
    Returns the refined filled masks (N, HW, HW) bool.
    """
    filled = np.stack([comp for _, comp in parts])  # (N, HW, HW)
    zone = ndimage.binary_dilation(filled.any(0), _SQUARE, iterations=2)  # (HW, HW)
    if zone.all():
        return filled
    # nearest background pixel, strongly preferring the same row: world backgrounds (and the
    # model's) are horizontal bands, and a sky pixel is a bad reference below the horizon
    idx = ndimage.distance_transform_edt(zone, sampling=(16.0, 1.0), return_distances=False,
                                         return_indices=True)
    background = rgb[idx[0], idx[1]]  # (HW, HW, 3)
    out = filled.copy()
    for i, (f, comp) in enumerate(parts):
        body = _body_rgb(rgb, coloured & (family == f), comp)  # (3,)
        axis = body - background  # (HW, HW, 3)
        alpha = ((rgb - background) * axis).sum(-1) / np.maximum((axis * axis).sum(-1), 1e-3)
        others = np.delete(filled, i, 0).any(0) if len(parts) > 1 else np.zeros_like(comp)
        ring = ndimage.binary_dilation(comp, _CROSS, iterations=2) & ~comp \
            & ~ndimage.binary_dilation(others, _CROSS) & ~(coloured & (family != f))
        out[i] = ndimage.binary_fill_holes(comp | (ring & (alpha >= 0.5)))
    return out


# ----------------------------------------------------------------------------- main entry
def analyze_image(image) -> list[DetectedCharacter]:
    """Detect the characters in one toy-world image, (H, W, 3) uint8 or float in [0, 1].

    Returns one :class:`DetectedCharacter` per sufficiently large colour component, ordered by
    colour family then area (largest first); ``[]`` for a background-only image.
    """
    rgb = _as_rgb(image)  # (HW, HW, 3)
    hue, chroma, value = _hsv(rgb)
    coloured = chroma >= CHROMA_THRESHOLD  # (HW, HW)
    family = np.argmin(_hue_distance(hue[..., None], _FAMILY_HUES), -1)  # (HW, HW) in 0..4

    parts = []  # (family index, filled component mask)
    for f in range(len(_FAMILIES)):
        fam = coloured & (family == f)
        if fam.sum() < MIN_AREA:
            continue
        # group pixels less than 3 px apart: a dark bar can cut a small triangle in two
        labels, n = ndimage.label(ndimage.binary_dilation(fam, _SQUARE), _CROSS)
        labels *= fam
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        for k in np.argsort(-sizes[1:]) + 1:
            if sizes[k] < MIN_AREA:
                break
            comp = labels == k
            # close gaps of <= 2 rows (a bar across the body), then fill holes (dot, inner bar)
            gaps = ndimage.binary_closing(comp, _VERTICAL) & ~coloured
            comp = ndimage.binary_fill_holes(comp | gaps)
            # not a body if nothing survives erosion (a blend line between two characters)
            if ndimage.binary_erosion(comp, _CROSS).sum() < 3:
                continue
            parts.append((f, comp))
    if not parts:
        return []

    filled = _refine_edges(rgb, coloured, family, parts)  # (N, HW, HW)
    parts = [(f, comp) for (f, _), comp in zip(parts, filled)]
    fits = []
    for i, (f, comp) in enumerate(parts):
        others = np.delete(filled, i, 0).any(0) if len(parts) > 1 else np.zeros_like(comp)
        care = ~ndimage.binary_dilation(others, _CROSS)
        fits.append(_fit_shape(comp, care | comp))
    templates = np.stack([world.shape_mask(s, c, z) for s, c, z, _ in fits])  # (N, HW, HW)

    masks = filled.copy()  # (N, HW, HW)
    # pixels enclosed by characters together but by none alone: a mark at an occluder's edge
    enclosed = ndimage.binary_fill_holes(filled.any(0)) & ~filled.any(0)
    if enclosed.any() and len(parts) > 1:
        # i is above j when i's visible pixels cover j's template more than the reverse
        cover = np.einsum("ipq,jpq->ij", filled.astype(np.int32), templates.astype(np.int32))
        height = (cover > cover.T).sum(1)  # number of characters each one lies above
        for r, c in zip(*np.nonzero(enclosed)):
            holders = np.nonzero(templates[:, r, c])[0]
            if len(holders):
                masks[holders[np.argmax(height[holders])], r, c] = True

    result = []
    for i, ((f, comp), (shape, center, size, score)) in enumerate(zip(parts, fits)):
        own_colour = coloured & (family == f)
        # hue/value from pixels >= 2 px inside the body: edges are blends with the background
        core = ndimage.binary_erosion(comp, _CROSS, iterations=2) & own_colour
        if core.sum() < 5:
            core = ndimage.binary_erosion(comp, _CROSS) & own_colour
        if core.sum() < 3:
            core = comp & own_colour
        body_rgb = _body_rgb(rgb, own_colour, comp)  # (3,)
        claimed = np.delete(masks, i, 0).any(0) if len(parts) > 1 else np.zeros_like(comp)
        mark, tone, mark_pixels = _mark(rgb, body_rgb, templates[i], ~claimed, center, size)
        # same-family specks inside the template (e.g. a triangle tip cut off by an occluder)
        mask = masks[i] | mark_pixels | (own_colour & templates[i] & ~claimed)
        body = core & ~mark_pixels
        body = body if body.any() else core
        result.append(DetectedCharacter(
            shape=shape, colour=_FAMILIES[f], mask=mask, hue=_circular_mean(hue[body]),
            value=float(np.median(value[body])), size=size, mark=mark, mark_tone=tone,
            center=center, score=score))
    return result


def largest_detection(detected: list[DetectedCharacter], shape: str) -> DetectedCharacter | None:
    """The largest detection of ``shape`` that fits its template at least ``MIN_SCORE`` and is no
    larger than ``MAX_SIZE`` (None: not drawn).

    The one rule every toy measurement uses to decide which detection "is" a named character.
    """
    found = [d for d in detected if d.shape == shape and d.score >= MIN_SCORE and d.size <= MAX_SIZE]
    return max(found, key=lambda d: d.mask.sum()) if found else None


# ----------------------------------------------------------------------------- evaluation
def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def match_characters(detected: list[DetectedCharacter], truth_characters, truth_masks,
                     min_iou: float = 0.1) -> list[tuple[int, int | None]]:
    """Pair each ground-truth character with a detection by maximum total mask IoU.

    Hungarian assignment on the IoU matrix; pairs below ``min_iou`` count as missed. Returns
    ``[(truth index, detection index or None), ...]`` in truth order.
    """
    n_truth = len(truth_characters)
    if not detected or n_truth == 0:
        return [(t, None) for t in range(n_truth)]
    ious = np.array([[mask_iou(truth_masks[t], d.mask) for d in detected] for t in range(n_truth)])
    rows, cols = linear_sum_assignment(-ious)
    pairs = {int(r): int(c) for r, c in zip(rows, cols) if ious[r, c] >= min_iou}
    return [(t, pairs.get(t)) for t in range(n_truth)]


def _degrade(image: np.ndarray, blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Blur + Gaussian noise, a crude stand-in for a generated image's artefacts."""
    out = image.astype(np.float32) / 255.0
    if blur > 0:
        out = ndimage.gaussian_filter(out, (blur, blur, 0))
    if noise > 0:
        out = out + rng.normal(0, noise, out.shape)
    return np.clip(out, 0, 1)


def evaluate_analyzer(n_scenes: int = 500, seed: int = 12345, blur: float = 0.0,
                      noise: float = 0.0) -> dict:
    """Accuracy of :func:`analyze_image` on freshly rendered scenes (seed apart from training).

    Attribute accuracies are over all ground-truth characters (a missed character counts as
    wrong); ``mark_tone`` only over characters that carry a mark. ``mean_iou`` counts missed
    characters as 0. Errors (hue in degrees, size in px, value) are over matched characters.
    ``blur`` (Gaussian sigma, px) and ``noise`` (std in [0, 1] units) degrade the renders.
    """
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng(seed + 1)
    hits = {k: 0 for k in ("shape", "colour", "named", "mark", "mark_tone")}
    n_chars = n_marked = missed = extra = 0
    ious, hue_err, size_err, value_err = [], [], [], []
    start = time.perf_counter()
    for _ in range(n_scenes):
        scene = world.sample_scene(rng)
        image = _degrade(scene.image, blur, noise, noise_rng) if (blur or noise) else scene.image
        detected = analyze_image(image)
        pairs = match_characters(detected, scene.characters, scene.masks)
        extra += len(detected) - sum(d is not None for _, d in pairs)
        for t, d in pairs:
            truth = scene.characters[t]
            n_chars += 1
            n_marked += truth.mark != "none"
            if d is None:
                missed += 1
                ious.append(0.0)
                continue
            det = detected[d]
            ious.append(mask_iou(scene.masks[t], det.mask))
            hits["shape"] += det.shape == truth.shape
            hits["colour"] += det.colour == truth.colour
            hits["named"] += det.shape == truth.shape and det.colour == truth.colour
            hits["mark"] += det.mark == truth.mark
            hits["mark_tone"] += truth.mark != "none" and det.mark_tone == truth.mark_tone
            hue_err.append(float(_hue_distance(det.hue, truth.hue)))
            size_err.append(abs(det.size - truth.size))
            value_err.append(abs(det.value - truth.value))
    accuracy = {k: v / max(n_marked if k == "mark_tone" else n_chars, 1) for k, v in hits.items()}
    mean = lambda x: float(np.mean(x)) if x else float("nan")  # noqa: E731
    return {"n_scenes": n_scenes, "n_characters": n_chars, "seed": seed, "blur": blur,
            "noise": noise, "accuracy": accuracy, "mean_iou": mean(ious), "missed": missed,
            "extra": extra, "mae": {"hue": mean(hue_err), "size": mean(size_err),
                                    "value": mean(value_err)},
            "seconds": time.perf_counter() - start}


def _print_table(r: dict) -> None:
    print(f"analyzer on {r['n_scenes']} rendered scenes ({r['n_characters']} characters, "
          f"seed {r['seed']}, blur {r['blur']}, noise {r['noise']}) in {r['seconds']:.1f} s")
    rows = [(f"acc {k}", f"{v:.3f}") for k, v in r["accuracy"].items()]
    rows += [("mean mask IoU", f"{r['mean_iou']:.3f}"), ("missed", str(r["missed"])),
             ("extra", str(r["extra"]))]
    rows += [(f"MAE {k}", f"{v:.3f}") for k, v in r["mae"].items()]
    for name, val in rows:
        print(f"  {name:<16}{val:>8}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="number of rendered scenes")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--blur", type=float, default=0.0, help="Gaussian blur sigma in px")
    parser.add_argument("--noise", type=float, default=0.0, help="noise std in [0, 1] units")
    args = parser.parse_args()
    _print_table(evaluate_analyzer(args.n, args.seed, args.blur, args.noise))
