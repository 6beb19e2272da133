"""``osa_lib.inside_block``: what one block saw and returned at one step, checked against the
method's equations written out by hand here (isolated self-attention with the mask and
``log(1 + w·Â)``, Eq. 6, the λ merge) and against the bank's stored pixels.

One captured scene on the shipped toy backbone (6 steps), shared by the tests."""
import dataclasses

import pytest
import torch

from osa_lib import load_backbone, load_story
from osa_lib.inside_block import bank_counts, open_block
from osa_lib.story import StoryError

STORY = "data/stories/toy_uncoloured_pair.yaml"
STEPS = 6


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("toy")


@pytest.fixture(scope="module")
def story():
    from pathlib import Path
    return load_story(Path(__file__).resolve().parents[1] / STORY)


@pytest.fixture(scope="module")
def capture(backbone, story):
    return open_block(backbone, story, scene=2, num_inference_steps=STEPS)


def heads(attn, t):
    """(L, heads·d) -> (heads, L, d)."""
    return t.view(t.shape[0], attn.heads, -1).transpose(0, 1)


def merged(t):
    """(heads, N, d) -> (N, heads·d)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def self_attention_by_hand(cap, w, lam):
    """F = λ·F_iso + (1 − λ)·F_ori for the block's self-attention, from its input, weights and references."""
    attn, x = cap.self_call.attn, cap.self_call.x
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (N, C)
    n = x.shape[0]
    f_ori = torch.softmax(heads(attn, q) @ heads(attn, k).mT * attn.scale, -1) @ heads(attn, v)  # (h, N, d)
    keys, values, bias = [k], [v], [torch.zeros(n, n)]
    for m, name in enumerate(cap.names):
        if name not in cap.references:
            continue
        k_r, v_r = cap.references[name]
        inside, a_hat = cap.self_call.masks[m], cap.self_call.a_hat[m]
        column = torch.full((n,), float("-inf"))
        column[inside] = torch.log(1 + w * a_hat[inside])
        keys.append(k_r), values.append(v_r), bias.append(column[:, None].repeat(1, k_r.shape[0]))
    K, V, B = torch.cat(keys), torch.cat(values), torch.cat(bias, dim=1)
    f_iso = torch.softmax(heads(attn, q) @ heads(attn, K).mT * attn.scale + B, -1) @ heads(attn, V)
    return attn.to_out[0](merged(lam * f_iso + (1 - lam) * f_ori))


def cross_attention_by_hand(cap, lam, beta):
    """Eq. 6 inside each mask, then the λ merge, for the block's cross-attention."""
    attn, x = cap.cross_call.attn, cap.cross_call.x
    q = heads(attn, attn.to_q(x))

    def attend(context):
        return torch.softmax(q @ heads(attn, attn.to_k(context)).mT * attn.scale, -1) @ heads(attn, attn.to_v(context))

    y_s = attend(cap.cross_call.context)
    y = y_s.clone()
    for m, name in enumerate(cap.names):
        inside = cap.cross_call.masks[m]
        y[:, inside] = beta * attend(cap.id_contexts[name])[:, inside] + (1 - beta) * y_s[:, inside]
    return attn.to_out[0](merged(lam * y + (1 - lam) * y_s))


def test_capture_is_the_scene_the_story_draws(capture, backbone, story):
    from osa_lib.generation import generate_story
    whole = generate_story(backbone, story, "isolated", num_inference_steps=STEPS, progress=False)
    assert (capture.image == whole.images[2]).all(), "recording changed nothing in the image"
    assert capture.names == ["Box", "Tri"] and capture.first_scenes == {"Box": 0, "Tri": 1}
    assert set(capture.references) <= {"Box", "Tri"} and capture.references, "a returning character was read"


def test_self_attention_matches_the_equation_by_hand(capture):
    with torch.no_grad():
        out = self_attention_by_hand(capture, capture.config.reweight, capture.config.lam)
    assert torch.allclose(out, capture.self_call.out, atol=1e-5), (out - capture.self_call.out).abs().max()
    # the check can fail: without the re-weighting, or with another λ, the hand result differs
    with torch.no_grad():
        assert not torch.allclose(self_attention_by_hand(capture, 0.0, capture.config.lam), capture.self_call.out, atol=1e-5)
        assert not torch.allclose(self_attention_by_hand(capture, capture.config.reweight, 1.0), capture.self_call.out, atol=1e-5)


def test_cross_attention_matches_eq6_by_hand(capture):
    with torch.no_grad():
        out = cross_attention_by_hand(capture, capture.config.lam, capture.config.beta)
        assert torch.allclose(out, capture.cross_call.out, atol=1e-5), (out - capture.cross_call.out).abs().max()
        assert not torch.allclose(cross_attention_by_hand(capture, 0.0, 1.0), capture.cross_call.out, atol=1e-5)


def test_bank_holds_the_mask_pixels_of_each_first_scene(capture):
    for name, stored in capture.stored.items():
        counts = bank_counts(capture.bank, name)
        assert stored and sum(len(steps) for steps in counts.values()) == len(stored)
        for (layer, step), pixels in stored.items():
            assert counts[layer][step] == len(pixels) > 0, (name, layer, step)
    steps = sorted({s for (_, s) in capture.stored["Box"]})
    stride = capture.config.bank_step_stride
    assert all(s >= 1 for s in steps) and all(b - a == stride for a, b in zip(steps, steps[1:])), steps


def test_pixel_is_inside_its_mask(capture):
    for name in capture.references:
        m = capture.names.index(name)
        assert capture.self_call.masks[m, capture.pixel(name)]


def test_bad_requests_fail_before_running(backbone, story):
    with pytest.raises(StoryError, match="no returning character"):
        open_block(backbone, story, scene=0, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="block=7 is out of range"):
        open_block(backbone, story, scene=2, block=7, num_inference_steps=STEPS)
    late = dataclasses.replace(backbone.isolation_config(), warmup=0.5)
    with pytest.raises(ValueError, match="step=1 is outside"):
        open_block(backbone, story, scene=2, config=late, step=1, num_inference_steps=STEPS)
