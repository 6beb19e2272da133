"""The toy analyzer is the ground truth for generated images, so it is validated on renders."""
import numpy as np
import pytest

from osa_lib.toy import world
from osa_lib.toy.analyzer import (DetectedCharacter, analyze_image, evaluate_analyzer,
                                  mask_iou, match_characters)
from osa_lib.toy import analyzer


def test_rendered_scenes_meet_acceptance_targets():
    r = evaluate_analyzer(n_scenes=80, seed=2024)
    acc = r["accuracy"]
    assert acc["shape"] >= 0.97 and acc["colour"] >= 0.97 and acc["named"] >= 0.97, r
    assert r["mean_iou"] >= 0.9, r
    assert acc["mark"] >= 0.9 and acc["mark_tone"] >= 0.9, r  # identity details, regression guard
    assert r["missed"] == 0 and r["extra"] <= 1, r
    assert r["mae"]["hue"] < 2.0 and r["mae"]["size"] < 0.5 and r["mae"]["value"] < 0.03, r


def test_blurred_noisy_scenes_still_read():
    # a crude stand-in for a generated image: blur sigma 0.6 px and noise std 0.02
    r = evaluate_analyzer(n_scenes=40, seed=77, blur=0.6, noise=0.02)
    assert r["accuracy"]["named"] >= 0.9, r
    assert r["mean_iou"] >= 0.85, r
    assert r["missed"] <= 1, r


def test_single_character_identity_and_float_input():
    rng = np.random.default_rng(3)
    scene = world.sample_scene(rng, n_characters=1)
    truth = scene.characters[0]
    for image in (scene.image, scene.image.astype(np.float32) / 255.0):
        (det,) = analyze_image(image)
        assert isinstance(det, DetectedCharacter)
        assert (det.shape, det.colour, det.mark) == (truth.shape, truth.colour, truth.mark)
        assert det.identity().keys() == truth.identity().keys()
        assert abs(det.size - truth.size) < 0.5 and abs(det.value - truth.value) < 0.02
        assert min(abs(det.hue - truth.hue), 360 - abs(det.hue - truth.hue)) < 2.0
        assert np.hypot(det.center[0] - truth.center[0], det.center[1] - truth.center[1]) < 0.75
        assert det.mask.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE) and det.mask.dtype == bool
        assert 0.9 <= det.score <= 1.0


@pytest.mark.parametrize("scene", world.SCENES)
def test_background_only_gives_nothing(scene):
    image = world.render_scene(scene, [], np.random.default_rng(0)).image
    assert analyze_image(image) == []
    assert analyze_image(image.astype(np.float64) / 255.0) == []


@pytest.mark.parametrize("bad, message", [
    (np.zeros((32, 32)), r"\(H, W, 3\)"),
    (np.zeros((3, 32, 32), np.float32), r"\(H, W, 3\)"),
    (np.zeros((64, 64, 3), np.uint8), "32x32"),
    (np.zeros((32, 32, 3), np.int64), "dtype"),
    (np.full((32, 32, 3), 2.0), r"\[0, 1\]"),
])
def test_bad_input_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        analyze_image(bad)


def test_gauge_matches_world_shape_mask():
    # the template search relies on shape_mask(s, c, z) == (gauge(pixel - c) <= z)
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = world.SHAPES[rng.integers(len(world.SHAPES))]
        center, size = rng.uniform(8, 24, 2), rng.uniform(4, 9)
        g = analyzer._gauge(shape, analyzer._ROWS - np.float32(center[0]),
                            analyzer._COLS - np.float32(center[1]))
        mismatch = (world.shape_mask(shape, tuple(center), size) != (g <= size)).sum()
        assert mismatch <= 1  # float rounding exactly on the boundary


def test_match_and_iou():
    a = np.zeros((32, 32), bool); a[:8, :8] = True
    b = np.zeros((32, 32), bool); b[4:12, :8] = True
    assert mask_iou(a, b) == pytest.approx(32 / 96)
    assert mask_iou(np.zeros_like(a), np.zeros_like(a)) == 0.0
    rng = np.random.default_rng(5)
    scene = world.sample_scene(rng, n_characters=2, relation="apart")
    detected = analyze_image(scene.image)
    pairs = match_characters(detected, scene.characters, scene.masks)
    assert [t for t, _ in pairs] == [0, 1] and all(d is not None for _, d in pairs)
    assert sorted(d for _, d in pairs) == [0, 1]
    assert match_characters([], scene.characters, scene.masks) == [(0, None), (1, None)]


def test_union_iou_ignores_which_mask_is_whose():
    """Swapped masks score 0 per character but 1 together; an undrawn character drops its image."""
    from osa_lib.toy.probes.evaluate import _union_iou
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[:4], b[4:] = True, True
    swapped = [{"image": 0, "mask": b, "truth_mask": a}, {"image": 0, "mask": a, "truth_mask": b}]
    half = [{"image": 1, "mask": a, "truth_mask": a}, {"image": 1, "mask": a, "truth_mask": b}]
    undrawn = [{"image": 2, "mask": a, "truth_mask": None}, {"image": 2, "mask": b, "truth_mask": b}]
    assert _union_iou(swapped) == {"mean": 1.0, "n_images": 1}
    assert _union_iou(swapped + half + undrawn) == {"mean": 0.75, "n_images": 2}


def test_largest_detection_refuses_a_flood_bigger_than_any_world_character():
    # isolated attention at high w can paint a character's colour over half the image; a square
    # template still fits it, so without a size limit such a flood counted as "the square, drawn"
    from dataclasses import replace
    rng = np.random.default_rng(5)
    largest = replace(world.sample_character(rng, "square", "blue"), size=world.SIZE_RANGE[1], mark="none",
                      mark_tone="none", center=(16.0, 16.0))
    flood = replace(largest, size=12.0)  # 23x23 px of blue: half the image
    read = {}
    for name, c in (("largest", largest), ("flood", flood)):
        image = world.render_scene("meadow", [c], np.random.default_rng(0)).image
        (det,) = analyze_image(image)
        assert det.shape == "square" and det.score >= analyzer.MIN_SCORE  # the template fits both
        read[name] = analyzer.largest_detection([det], "square")
    assert read["largest"] is not None and abs(read["largest"].size - world.SIZE_RANGE[1]) < 0.5
    assert read["flood"] is None
