"""Tests for osa_lib.masks: torch Otsu against scikit-image, and the mask pipeline on known cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.exposure import histogram
from skimage.filters import threshold_otsu

from osa_lib.masks import (
    OVERLAP_RULES,
    aggregate_maps,
    coefficient_of_variation,
    normalize_maps,
    otsu_masks,
    otsu_threshold,
    reliability,
    resize_masks,
    resolve_overlaps,
    subject_masks,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The maps here are tiny: extra intra-op threads only wait for cores on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sk_variance(image: np.ndarray, nbins: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """skimage's histogram and between-class variance per split, in float64."""
    counts, centers = histogram(image.reshape(-1), nbins, source_range="image")
    counts, c = counts.astype(np.float64), centers.astype(np.float64)
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * c) / w1
    m2 = (np.cumsum((counts * c)[::-1]) / w2[::-1])[::-1]
    return w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2, centers


def _assert_matches_skimage(maps: torch.Tensor, nbins: int = 256, min_exact: float = 0.98) -> None:
    """Every threshold within one bin width of skimage's, or skimage's pick is a float32 near-tie.

    skimage sums the class statistics in float32; where two splits have between-class variance
    equal to ~1e-7 relative, it can land on either. Ours must then be the exact (float64) best.
    """
    ours = otsu_threshold(maps, nbins)
    assert ours.shape == maps.shape[:-2]
    flat_maps = maps.reshape(-1, *maps.shape[-2:]).numpy()
    flat_ours = ours.reshape(-1).numpy()
    exact, mask_diff, pixels = 0, 0, 0
    for img, t in zip(flat_maps, flat_ours):
        s = threshold_otsu(img, nbins=nbins)
        width = (img.max() - img.min()) / nbins
        exact += int(t == s)
        if abs(t - s) > width * (1 + 1e-5):
            var, centers = _sk_variance(img, nbins)
            j_sk, j_ours = np.argmin(abs(centers - s)), np.argmin(abs(centers - t))
            assert (var.max() - var[j_sk]) / var.max() < 1e-6, "differs from skimage beyond a near-tie"
            assert var[j_ours] == var.max(), "torch Otsu is not at the maximum between-class variance"
        mask_diff += int(((img > t) != (img > s)).sum())
        pixels += img.size
    assert exact / len(flat_ours) >= min_exact
    assert mask_diff / pixels < 1e-3


# ---------------------------------------------------------------------------------------------
# Otsu against scikit-image
# ---------------------------------------------------------------------------------------------


def test_otsu_uniform_maps_match_skimage():
    _assert_matches_skimage(torch.rand(200, 32, 32, generator=_gen(0)))


def test_otsu_normalised_maps_match_skimage_exactly():
    # min 0 / max 1 maps take the exact floor(x * nbins) fast path
    maps = normalize_maps(torch.rand(200, 24, 40, generator=_gen(1)) ** 3)
    assert bool((otsu_threshold(maps) == torch.tensor([threshold_otsu(m) for m in maps.numpy()])).all())


def test_otsu_bimodal_maps_match_skimage():
    g = _gen(2)
    lo = torch.randn(300, 16, 32, generator=g) * 0.1
    hi = torch.randn(300, 16, 32, generator=g) * 0.2 + 1.0
    maps = torch.cat([lo, hi], dim=1)  # (300, 32, 32)
    _assert_matches_skimage(maps)
    thr = otsu_threshold(maps)
    assert bool(((thr > 0.2) & (thr < 0.8)).all())  # a threshold between the modes
    _assert_matches_skimage(normalize_maps(maps))


@pytest.mark.parametrize("shape", [(17, 23), (3, 64, 8), (2, 3, 31, 19), (2, 1, 2, 9, 9)])
def test_otsu_any_leading_dims_and_sizes(shape):
    maps = torch.rand(*shape, generator=_gen(3)) ** 2
    _assert_matches_skimage(maps, min_exact=0.9)
    _assert_matches_skimage(normalize_maps(maps), min_exact=0.9)


def test_otsu_float64_and_other_nbins():
    maps = torch.rand(40, 20, 20, generator=_gen(4), dtype=torch.float64)
    _assert_matches_skimage(maps)
    _assert_matches_skimage(maps, nbins=64)
    _assert_matches_skimage(normalize_maps(maps), nbins=100)  # not a power of two: general path


def test_otsu_masks_are_strictly_above_threshold():
    A = torch.rand(2, 3, 16, 16, generator=_gen(5))
    M, thr = otsu_masks(A)
    A_hat = normalize_maps(A)
    assert M.dtype == torch.bool and M.shape == A.shape and thr.shape == (2, 3)
    assert torch.equal(M, A_hat > thr[..., None, None])
    ref = torch.tensor([[threshold_otsu(m) for m in row] for row in A_hat.numpy()])
    assert torch.equal(thr, ref)


def test_otsu_rejects_nan():
    maps = torch.rand(2, 8, 8)
    maps[1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        otsu_threshold(maps)


# ---------------------------------------------------------------------------------------------
# Constant maps
# ---------------------------------------------------------------------------------------------


def test_constant_map_no_nan_and_flagged():
    A = torch.rand(1, 3, 16, 16, generator=_gen(6))
    A[0, 1] = 0.0  # subject token got no attention
    A[0, 2] = 0.37  # constant, non-zero
    # like skimage, a constant map's threshold is the constant
    assert otsu_threshold(A[0, 2]).item() == pytest.approx(threshold_otsu(A[0, 2].numpy()))
    A_hat = normalize_maps(A)
    assert torch.isfinite(A_hat).all() and (A_hat[0, 1:] == 0).all()
    M, thr = otsu_masks(A)
    assert torch.isfinite(thr).all() and not M[0, 1:].any()
    ok, reasons = reliability(M, A)
    assert ok.tolist() == [[True, False, False]]
    assert reasons[0][0] == ""
    assert reasons[0][1] == "mask empty (0.0% of pixels): map has no contrast"

    out = subject_masks([A])
    for t in (out.A_hat, out.thresholds, out.cv):
        assert torch.isfinite(t).all()
    assert out.ok.tolist() == [[True, False, False]]
    assert "no contrast" in out.reasons[0][2]


def test_reliability_near_empty_and_near_full():
    M = torch.zeros(1, 3, 10, 10, dtype=torch.bool)
    M[0, 0, :5] = True  # 50 %: fine
    M[0, 1, 0, 0] = True  # 1 %  < 2 %
    M[0, 2] = True  # 100 %
    ok, reasons = reliability(M, min_fraction=0.02, max_fraction=0.9)
    assert ok.tolist() == [[True, False, False]]
    assert reasons[0][1].startswith("mask nearly empty (1.0% of pixels")
    assert reasons[0][2].startswith("mask nearly full (100.0% of pixels")


# ---------------------------------------------------------------------------------------------
# Aggregation over layers and steps
# ---------------------------------------------------------------------------------------------


def test_aggregate_upsamples_to_largest_and_averages():
    g = _gen(7)
    maps = [torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 16, 16, generator=g)]
    out = aggregate_maps(maps)
    assert out.shape == (2, 3, 32, 32)
    # bilinear upsampling keeps a constant map constant, so averaging constants is exact
    consts = [torch.full((1, 2, s, s), v) for s, v in [(8, 1.0), (16, 2.0), (32, 6.0)]]
    assert torch.allclose(aggregate_maps(consts), torch.full((1, 2, 32, 32), 3.0))
    # one resolution: plain mean; fp16 input comes back as float32
    same = [torch.rand(1, 2, 4, 4, generator=g).half() for _ in range(3)]
    agg = aggregate_maps(same)
    assert agg.dtype == torch.float32
    assert torch.allclose(agg, torch.stack(same).float().mean(0))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="empty list"):
        aggregate_maps([])
    with pytest.raises(ValueError, match=r"\(B, M\)"):
        aggregate_maps([torch.rand(2, 3, 8, 8), torch.rand(2, 4, 16, 16)])
    with pytest.raises(ValueError, match="must be"):
        aggregate_maps([torch.rand(3, 8, 8)])


def test_resize_masks_is_nearest_when_enlarging_and_a_majority_when_shrinking():
    g = _gen(8)
    masks = torch.rand(2, 3, 4, 4, generator=g) > 0.5
    up = resize_masks(masks, (16, 16))
    nearest = F.interpolate(masks.float(), size=(16, 16), mode="nearest") > 0.5
    assert up.dtype == torch.bool and torch.equal(up, nearest)
    block = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    block[..., :2, :2] = True  # 4 of 4 pixels: kept
    block[..., 2, 2] = True  # 1 of 4 pixels: dropped
    assert resize_masks(block, (2, 2))[0, 0].tolist() == [[True, False], [False, False]]
    assert torch.equal(resize_masks(masks, (4, 4)), masks)


# ---------------------------------------------------------------------------------------------
# Overlaps
# ---------------------------------------------------------------------------------------------


def _two_characters() -> tuple[torch.Tensor, torch.Tensor]:
    """Character 0: a smooth map spread over the image (low CV). Character 1: speckle (high CV).

    Both masks claim the centre block; each also owns a block of its own.
    """
    H = W = 16
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    smooth = 1.0 + 0.1 * torch.cos(xx / 3.0) * torch.cos(yy / 3.0)  # (H, W) CV ~ 0.05
    speckle = torch.full((H, W), 0.01)
    speckle[::3, ::4] = 1.0  # a few hot pixels: CV > 2
    A = torch.stack([smooth, speckle])[None]  # (1, 2, H, W)
    masks = torch.zeros(1, 2, H, W, dtype=torch.bool)
    masks[0, 0, 4:12, 0:12] = True
    masks[0, 1, 4:12, 4:16] = True  # overlap: rows 4..11, cols 4..11
    return masks, A


def test_coefficient_of_variation():
    masks, A = _two_characters()
    cv = coefficient_of_variation(A)
    ref = [m.std() / m.mean() for m in A[0].numpy()]
    assert np.allclose(cv[0].numpy(), ref, rtol=1e-5)
    assert cv[0, 0] < 0.1 < 2.0 < cv[0, 1]
    assert coefficient_of_variation(torch.zeros(1, 1, 4, 4)).item() == 0.0  # no NaN


@pytest.mark.parametrize("rule,winner", [("lower_cv", 0), ("higher_cv", 1)])
def test_resolve_overlaps_cv_rules(rule, winner):
    masks, A = _two_characters()
    out = resolve_overlaps(masks, A, rule)
    both = masks[0, 0] & masks[0, 1]
    assert out[0, winner][both].all() and not out[0, 1 - winner][both].any()
    # pixels with a single claimant keep it
    assert torch.equal(out[0, 0] & ~both, masks[0, 0] & ~both)
    assert torch.equal(out[0, 1] & ~both, masks[0, 1] & ~both)


def test_resolve_overlaps_argmax_is_per_pixel():
    W = 10
    ramp = torch.linspace(0, 1, W).expand(6, W)  # (6, W) rises left to right
    A = torch.stack([ramp, ramp.flip(-1)])[None]  # (1, 2, 6, W): char 1 rises right to left
    masks = torch.ones(1, 2, 6, W, dtype=torch.bool)
    out = resolve_overlaps(masks, A, "argmax")
    assert out[0, 0, :, W // 2 :].all() and not out[0, 0, :, : W // 2].any()
    assert out[0, 1, :, : W // 2].all() and not out[0, 1, :, W // 2 :].any()


@pytest.mark.parametrize("rule", OVERLAP_RULES)
def test_resolve_overlaps_disjoint_subsets(rule):
    g = _gen(9)
    A = torch.rand(3, 4, 12, 12, generator=g)
    masks = torch.rand(3, 4, 12, 12, generator=g) > 0.4
    out = resolve_overlaps(masks, A, rule)
    assert out.dtype == torch.bool and out.shape == masks.shape
    assert (out.sum(1) <= 1).all()  # pairwise disjoint
    assert not (out & ~masks).any()  # subsets of the input
    assert torch.equal(out.any(1), masks.any(1))  # every claimed pixel still has an owner


def test_resolve_overlaps_unknown_rule():
    masks, A = _two_characters()
    with pytest.raises(ValueError, match="lower_cv, higher_cv, argmax"):
        resolve_overlaps(masks, A, "lowest_cv")


# ---------------------------------------------------------------------------------------------
# All together
# ---------------------------------------------------------------------------------------------


def _blob(H: int, W: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    return torch.exp(-(((yy / H - cy) ** 2 + (xx / W - cx) ** 2) / (2 * r**2)))


def test_subject_masks_two_characters():
    # character 0 on the left, 1 on the right, seen by a 16x16 and a 32x32 layer
    layers = [
        torch.stack([_blob(s, s, 0.5, 0.3, 0.12), _blob(s, s, 0.5, 0.7, 0.12)])[None] for s in (16, 32)
    ]  # each (1, 2, s, s)
    out = subject_masks(layers)
    assert out.masks.shape == out.raw_masks.shape == out.A_hat.shape == (1, 2, 32, 32)
    assert out.thresholds.shape == out.cv.shape == out.ok.shape == (1, 2)
    assert out.ok.all() and out.reasons == [["", ""]]
    assert (out.masks.sum(1) <= 1).all()
    assert out.A_hat.min() >= 0 and out.A_hat.max() <= 1
    left, right = out.masks[0, 0], out.masks[0, 1]
    assert left[:, :12].any() and not left[:, 20:].any()
    assert right[:, 20:].any() and not right[:, :12].any()
    # an already aggregated tensor (e.g. AttentionStore.mask_maps()) is accepted too
    again = subject_masks(aggregate_maps(layers))
    assert torch.equal(again.masks, out.masks)


def test_subject_masks_unreliable_character_takes_no_pixels():
    A = torch.stack([_blob(16, 16, 0.5, 0.5, 0.15), torch.ones(16, 16)])[None]  # (1, 2, 16, 16)
    A[0, 1, 0, 0] = 0.0  # char 1: nearly constant high map -> near-full mask, lowest CV
    out = subject_masks([A], rule="lower_cv")
    assert out.ok.tolist() == [[True, False]]
    assert out.reasons[0][1].startswith("mask nearly full")
    assert not out.masks[0, 1].any()
    assert torch.equal(out.masks[0, 0], out.raw_masks[0, 0])  # nothing stolen by char 1


def test_rule_verdict_counts_only_differences_beyond_noise():
    from osa_lib.experiments import rule_verdict
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 50)
    noise = lambda: rng.normal(0, 0.05, 50)  # noqa: E731
    clear = {"lower_cv": base + 0.1, "higher_cv": base + noise(), "argmax": base + noise()}
    assert rule_verdict(clear).startswith("wins")
    tied = {"lower_cv": base + noise(), "higher_cv": base + noise(), "argmax": base - 0.2}
    assert rule_verdict(tied).startswith("ties")
    behind = {"lower_cv": base, "higher_cv": base + 0.1, "argmax": base - 0.2}
    assert rule_verdict(behind).startswith("loses (to higher_cv)")
    assert rule_verdict({"lower_cv": [0.5], "argmax": [0.4]}).startswith("cannot be judged")


def test_cv_rule_ranks_the_raw_maps_not_the_normalised_ones():
    """CV is not shift-invariant: a small blob on a high floor has a low raw CV and a high CV once
    min-max normalised. The paper ranks the maps themselves, so that character wins the overlap."""
    A = torch.zeros(1, 2, 8, 8)
    A[0, 0] = 10.0
    A[0, 0, :2, :2] = 11.0  # character 0: small blob on a floor of 10 (raw CV ~ 0.02, normalised ~ 3.9)
    A[0, 1, :4] = 1.0  # character 1: top half, zero elsewhere (CV 1 either way)
    cv = coefficient_of_variation(A)
    assert cv[0, 0] < cv[0, 1] and coefficient_of_variation(normalize_maps(A))[0, 0] > cv[0, 1]
    out = subject_masks(A, rule="lower_cv")
    blob = torch.zeros(8, 8, dtype=torch.bool)
    blob[:2, :2] = True
    top = torch.zeros(8, 8, dtype=torch.bool)
    top[:4] = True
    assert torch.equal(out.masks[0, 0], blob)  # the lower raw CV wins the contested pixels
    assert torch.equal(out.masks[0, 1], top & ~blob)
    assert torch.equal(subject_masks(A, rule="higher_cv").masks[0, 1], top)


def test_subject_masks_keep_pixels_strictly_above_the_threshold():
    """M_m = Â_m > t, as skimage's ``image > threshold_otsu(image)``: a pixel at the threshold is out."""
    A = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    A[0, 0, :4] = 1.0
    A[0, 0, 4, 0] = 1 / 512  # exactly the centre of the first of 256 bins
    out = subject_masks(A)
    assert out.thresholds[0, 0].item() == threshold_otsu(A[0, 0].numpy()) == 1 / 512
    assert not out.raw_masks[0, 0, 4, 0] and out.raw_masks[0, 0, :4].all()
    assert out.raw_masks.sum() == 32


def test_area_cap_keeps_the_highest_pixels_of_an_otsu_mask():
    from osa_lib.masks import top_fraction
    # hand-written: a 4x4 map, values 0..15; the top 25 % are the 4 highest, ties at the cut kept
    A = torch.arange(16.0).view(1, 1, 4, 4)
    assert top_fraction(A, 0.25)[0, 0].flatten().tolist() == [False] * 12 + [True] * 4
    assert top_fraction(A, 0.2)[0, 0].sum() == 4  # ceil(0.2 * 16) = 4
    tied = torch.tensor([[5.0, 5.0, 5.0, 1.0]]).view(1, 1, 2, 2)
    assert top_fraction(tied, 0.25)[0, 0].sum() == 3  # the 1st highest ties with two more
    # a broad blob whose Otsu mask holds about half the image; the cap keeps its 10 % core
    blob = _blob(16, 16, 0.52, 0.47, 0.35)[None, None]  # (1, 1, 16, 16), off the grid: no ties
    whole, capped = subject_masks([blob]), subject_masks([blob], area_cap=0.1)
    assert whole.masks.float().mean() > 0.3
    assert capped.masks.sum() == math.ceil(0.1 * 256)
    assert (capped.masks <= whole.masks).all()  # inside Otsu's mask
    core = blob[0, 0] >= blob[0, 0].flatten().topk(26).values[-1]
    assert torch.equal(capped.masks[0, 0], core)
    # a cap above the Otsu mask's size changes nothing
    assert torch.equal(subject_masks([blob], area_cap=0.95).masks, whole.masks)


def test_strongest_region_keeps_the_4_connected_region_with_the_most_a_hat():
    from osa_lib.masks import strongest_region
    # hand-written 5x5 mask of three 4-connected regions (a diagonal touch does not join them):
    #   row 0: X X . . .     region a: 2 pixels at Â 0.9 (mass 1.8)
    #   row 1: . . X . .     region b: 1 pixel, diagonal to a, Â 0.1
    #   rows 3-4, cols 3-4   region c: 4 pixels at Â 0.3 (mass 1.2): the largest, not the strongest
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[0, 0:2] = mask[1, 2] = mask[3:5, 3:5] = True
    A_hat = torch.full((5, 5), 0.1)
    A_hat[0, 0:2], A_hat[3:5, 3:5], A_hat[2, 2] = 0.9, 0.3, 1.0  # (2, 2) is outside the mask
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[0, 0:2] = True
    # batched: (B=2, M=2); the second character has only region c, the second image an empty mask
    masks = torch.stack([torch.stack([mask, mask & (A_hat == 0.3)]), torch.zeros(2, 5, 5, dtype=torch.bool)])
    out = strongest_region(masks, A_hat.expand(2, 2, 5, 5))
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(out[0, 1], mask & (A_hat == 0.3))  # one region: kept whole
    assert not out[1].any()  # nothing to keep stays empty
    # a U-shaped region whose arms join only at the bottom row is one region
    u = torch.zeros(4, 4, dtype=torch.bool)
    u[:, 0] = u[:, 3] = u[3, :] = True
    assert torch.equal(strongest_region(u[None, None], torch.rand(1, 1, 4, 4))[0, 0], u)


def test_one_region_is_off_by_default_and_keeps_one_patch_of_each_mask():
    from osa_lib import IsolationConfig
    assert IsolationConfig().one_region is False  # the paper: every region of Otsu's mask
    with pytest.raises(ValueError, match="one_region"):
        IsolationConfig(one_region=1)
    # two separate blobs, the right one brighter: Otsu keeps both, one_region the brighter only
    A = _blob(16, 16, 0.3, 0.25, 0.12) * 0.7 + _blob(16, 16, 0.3, 0.75, 0.12)
    both, one = subject_masks([A[None, None]]), subject_masks([A[None, None]], one_region=True)
    assert both.masks[0, 0, :, :8].any() and both.masks[0, 0, :, 8:].any()
    assert not one.masks[0, 0, :, :8].any() and torch.equal(one.masks[0, 0, :, 8:], both.masks[0, 0, :, 8:])


def test_area_cap_is_validated_and_bounds_every_mask_of_a_story():
    from osa_lib import IsolationConfig, generate_story, load_backbone
    from osa_lib.story import Story, StoryCharacter, StoryScene
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mask_area_cap"):
            IsolationConfig(mask_area_cap=bad)
    assert IsolationConfig().mask_area_cap is None  # the paper: Otsu's mask whole
    story = Story({"Orb": StoryCharacter("Orb", "circle", "a circle")},
                  [StoryScene("a circle in the snow", ["Orb"], 1), StoryScene("a circle in the night", ["Orb"], 2)])
    backbone = load_backbone("toy", device="cpu")
    seen = {}
    for cap in (None, 0.05):
        result = generate_story(backbone, story, "isolated", config=IsolationConfig(mask_area_cap=cap, warmup=0.0),
                                num_inference_steps=4, progress=False)
        seen[cap] = [float(np.mean(s.masks)) for s in result.scenes]  # each scene's last masks, 8x8
    assert max(seen[None]) > 0.1  # Otsu alone keeps more than the cap
    assert 0 < max(seen[0.05]) <= math.ceil(0.05 * 64) / 64


def test_otsu_accepts_maps_that_are_not_contiguous():
    """A recorded step's maps can be a transposed view (``AttentionStore.record_attention``)."""
    from osa_lib.masks import normalize_maps, otsu_threshold
    maps = normalize_maps(torch.rand(1, 8, 8, 2).permute(0, 3, 1, 2))  # (1, 2, 8, 8), characters innermost
    assert not maps.is_contiguous()
    assert torch.equal(otsu_threshold(maps), otsu_threshold(maps.contiguous()))
