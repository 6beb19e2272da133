import numpy as np
import pytest
import torch

from osa_lib.toy.probes.binding import _mask_iou, binding_scores, own_object_share
from osa_lib.toy.model import build_toy_pipeline


def _two_squares():
    truth = torch.zeros(1, 2, 32, 32, dtype=torch.bool)
    truth[0, 0, 4:12, 4:12] = True
    truth[0, 1, 20:28, 20:28] = True
    return truth


def test_own_share_is_one_for_bound_maps_half_for_shared_maps_zero_for_swapped():
    truth = _two_squares()
    bound = torch.nn.functional.adaptive_avg_pool2d(truth.float(), (8, 8))  # (1, 2, 8, 8)
    assert torch.allclose(own_object_share(bound, truth), torch.ones(1, 2))
    assert torch.allclose(own_object_share(bound.flip(1), truth), torch.zeros(1, 2))
    shared = bound.sum(1, keepdim=True).expand(1, 2, 8, 8)  # both words light both objects
    assert torch.allclose(own_object_share(shared, truth), torch.full((1, 2), 0.5))


def test_mask_iou_of_bound_maps_is_one_and_of_swapped_maps_zero():
    truth = _two_squares()
    bound = torch.nn.functional.adaptive_avg_pool2d(truth.float(), (8, 8))  # (1, 2, 8, 8): each map on its square
    assert torch.allclose(_mask_iou(bound, truth).float(), torch.ones(1, 2))
    assert torch.allclose(_mask_iou(bound.flip(1), truth).float(), torch.zeros(1, 2))
    # by hand: a map on the left half of the first square cuts an 8x4 mask; IoU with the 8x8 square = 32 / 64
    half = bound.clone()
    half[0, 0] = 0
    half[0, 0, 1:3, 1:2] = 1.0  # 8x8 map cell (1..2, 1) covers image pixels rows 4..11, columns 4..7
    assert _mask_iou(half, truth)[0, 0].item() == pytest.approx(0.5)
    # a mask spilling past the square: map cells (1..2, 1..3) = pixels rows 4..11, columns 4..15 -> 64 / 96
    wide = bound.clone()
    wide[0, 0] = 0
    wide[0, 0, 1:3, 1:4] = 1.0
    assert _mask_iou(wide, truth)[0, 0].item() == pytest.approx(64 / 96)


def test_own_share_needs_two_characters():
    with pytest.raises(ValueError, match="two characters"):
        own_object_share(torch.ones(1, 3, 8, 8), torch.ones(1, 3, 32, 32))


def test_binding_scores_read_every_cross_attention_layer_of_an_untrained_model():
    rows = binding_scores(build_toy_pipeline(seed=0, text_layers=0, text_blocks="all"), n_scenes=4, timesteps=(500,))
    assert {(r["word"], r["place"], r["resolution"]) for r in rows} == {
        (w, p, r) for w in ("shape", "colour") for p, r in (("down", 16), ("down", 8), ("mid", 4), ("up", 8), ("up", 16))}
    assert all(0.0 <= r["own_share"] <= 1.0 and 0.0 <= r["iou"] <= 1.0 for r in rows)
    # each row keeps its scenes' values, whose mean is the row's
    assert all(len(r["own_share_scenes"]) == len(r["iou_scenes"]) == 4 for r in rows)
    assert all(abs(np.mean(r["own_share_scenes"]) - r["own_share"]) < 1e-6 and abs(np.mean(r["iou_scenes"]) - r["iou"]) < 1e-6
               for r in rows)
