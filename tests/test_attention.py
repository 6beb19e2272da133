"""Layer finding, processor install/restore and the cross-attention store, on the tiny random SDXL."""
import pytest
import torch
import torch.nn.functional as F

from osa_lib.attention import (AttentionStore, CrossAttentionRecorder, LayerInfo, capture_attention,
                               find_attention_layers, installed_processors)

STEPS = 2
PROMPTS = ["a girl reading a book in the park", "a boy with a dog on the beach"]


@pytest.fixture(scope="module")
def cond(tiny):
    return tiny.encode(PROMPTS)


@pytest.fixture(scope="module")
def token_groups(tiny):
    """Two groups per prompt: the character's word and a second word."""
    return [[tiny.token_positions(PROMPTS[0], "girl"), tiny.token_positions(PROMPTS[0], "park")],
            [tiny.token_positions(PROMPTS[1], "boy"), tiny.token_positions(PROMPTS[1], "beach")]]


@pytest.fixture(scope="module")
def plain_latents(tiny, cond):
    return tiny.denoise(cond, tiny.initial_latents([0, 1]), num_inference_steps=STEPS, progress=False)


@pytest.fixture(scope="module")
def recorded(tiny, cond, token_groups):
    """Latents of a run with every cross-attention layer recorded, and its store (keep_steps)."""
    store = AttentionStore(token_groups, tiny.latent_shape[1:], keep_steps=True)
    with capture_attention(tiny.unet, store):
        latents = tiny.denoise(cond, tiny.initial_latents([0, 1]), num_inference_steps=STEPS,
                               callback=store.step_callback, progress=False)
    return latents, store


def test_capture_attention_leaves_images_bit_identical(tiny, plain_latents, recorded):
    latents, store = recorded
    assert store.layers, "nothing was recorded"
    assert torch.equal(latents, plain_latents)
    assert (tiny.decode(latents) == tiny.decode(plain_latents)).all()


def test_recorded_layers_and_map_shapes(tiny, recorded):
    _, store = recorded
    cross = find_attention_layers(tiny.unet, kind="cross")
    assert set(store.layers) == set(cross)  # every cross-attention layer, no self-attention layer
    for layer, maps in store.average_maps().items():
        assert maps.shape == (2, 2, *layer.resolution(store.latent_hw))
        assert (maps >= 0).all() and (maps <= 1).all()  # means of probabilities


def _processors(unet):
    return dict(unet.attn_processors)


def test_processors_restored_after_context(tiny, token_groups):
    before = _processors(tiny.unet)
    store = AttentionStore(token_groups, tiny.latent_shape[1:])
    with capture_attention(tiny.unet, store, places=("up",)):
        inside = _processors(tiny.unet)
        up_cross = {l.name for l in find_attention_layers(tiny.unet, kind="cross", places=("up",))}
        assert all(isinstance(inside[n], CrossAttentionRecorder) for n in up_cross)
        assert all(inside[n] is before[n] for n in inside if n not in up_cross)
    after = _processors(tiny.unet)
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)


def test_processors_restored_after_exception(tiny, token_groups):
    before = _processors(tiny.unet)
    store = AttentionStore(token_groups, tiny.latent_shape[1:])
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(tiny.unet, store):
            assert any(isinstance(p, CrossAttentionRecorder) for p in tiny.unet.attn_processors.values())
            raise RuntimeError("boom")
    after = _processors(tiny.unet)
    assert all(after[n] is before[n] for n in before)
    assert not any(isinstance(p, CrossAttentionRecorder) for p in after.values())


def test_installed_processors_rejects_unknown_names_and_changes_nothing(tiny):
    before = _processors(tiny.unet)
    with pytest.raises(KeyError, match="not attention processors"):
        with installed_processors(tiny.unet, {"up_blocks.9.attn1.processor": object()}):
            pass
    assert all(tiny.unet.attn_processors[n] is p for n, p in before.items())


def test_find_attention_layers_filters(tiny):
    up_self = find_attention_layers(tiny.unet, kind="self", places=("up",))
    assert up_self and all(l.kind == "self" and l.place == "up" for l in up_self)
    assert all(n.endswith("attn1.processor") for n in (l.name for l in up_self))
    at8 = find_attention_layers(tiny.unet, resolutions=(8,), latent_hw=(16, 16))
    assert at8 and all(l.resolution((16, 16)) == (8, 8) for l in at8)
    everything = find_attention_layers(tiny.unet)
    assert len(everything) == len(tiny.unet.attn_processors)


def test_find_attention_layers_no_match_lists_what_exists(tiny):
    with pytest.raises(ValueError, match="no attention layer matches") as info:
        find_attention_layers(tiny.unet, kind="cross", places=("up",), resolutions=(3,))
    message = str(info.value)
    assert "('up', 'cross', 8)" in message and "('down', 'self', 8)" in message


def test_running_mean_is_mean_of_per_step_maps(recorded):
    _, store = recorded
    assert sorted(store.per_step) == list(range(STEPS))
    for layer, mean in store.average_maps().items():
        steps = torch.stack([store.per_step[s][layer] for s in range(STEPS)])
        assert torch.allclose(mean, steps.mean(0), atol=1e-7)
        assert not torch.equal(steps[0], steps[1])  # the steps really differ
    one_step = store.maps(places=("up",), step=0)
    assert one_step and all(torch.equal(m, store.per_step[0][l]) for l, m in one_step.items())


def test_maps_for_unkept_step_raise(recorded):
    _, store = recorded
    with pytest.raises(ValueError, match="keep_steps"):
        store.maps(step=STEPS + 5)


def test_aggregate_at_largest_resolution(recorded):
    _, store = recorded
    up = store.aggregate(places=("up",))
    assert up.shape == (2, 2, 8, 8)  # up layers are 4x4 and 8x8 on the 16x16 latent
    maps = store.maps(places=("up",))
    expected = torch.stack([F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False)
                            if m.shape[-1] != 8 else m for m in maps.values()]).mean(0)
    assert torch.allclose(up, expected)
    assert store.aggregate(places=("up",), resolution=4).shape == (2, 2, 4, 4)
    with pytest.raises(ValueError, match="no recorded maps"):
        store.aggregate(places=("up",), resolution=16)


def test_mask_maps_use_the_smallest_up_resolution(recorded):
    """Masks are made at one resolution (METHOD.md), by default the smallest up-block one."""
    _, store = recorded
    assert store.mask_resolution() == 4
    assert torch.equal(store.mask_maps(), store.aggregate(places=("up",), resolution=4))
    assert store.mask_maps().shape == (2, 2, 4, 4)
    with pytest.raises(ValueError, match="no recorded maps"):
        store.mask_resolution(places=("nowhere",))


def test_group_maps_average_heads_and_tokens():
    layer = LayerInfo("x", "up", 0, "cross", 1)
    store = AttentionStore([[[1, 2], [3]]], latent_hw=(2, 2))
    probs = torch.rand(1, 3, 4, 5).softmax(-1)  # (B, heads, N, T)
    maps = store.group_maps(layer, probs)  # (B, M, h, w)
    assert maps.shape == (1, 2, 2, 2)
    assert torch.allclose(maps[0, 0].flatten(), probs[0, :, :, [1, 2]].mean(dim=(0, 2)))
    assert torch.allclose(maps[0, 1].flatten(), probs[0, :, :, 3].mean(0))
    # a group holding every token averages a distribution: 1 / T everywhere
    whole = AttentionStore([[list(range(5))]], latent_hw=(2, 2)).group_maps(layer, probs)
    assert torch.allclose(whole, torch.full_like(whole, 1 / 5))


def test_empty_token_group_is_value_error():
    with pytest.raises(ValueError, match="token group 1 of prompt 0 is empty"):
        AttentionStore([[[1], []]], latent_hw=(4, 4))
    with pytest.raises(ValueError, match="empty"):
        AttentionStore([], latent_hw=(4, 4))
    with pytest.raises(ValueError, match="same number"):
        AttentionStore([[[1]], [[1], [2]]], latent_hw=(4, 4))


def test_layer_labels_are_unique_and_readable():
    from osa_lib.layers import LayerInfo
    a = LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", "up", 1, "cross", 2)
    b = LayerInfo("up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor", "up", 1, "cross", 2)
    c = LayerInfo("up_blocks.1.attentions.1.transformer_blocks.3.attn2.processor", "up", 1, "cross", 2)
    assert [l.label((16, 16)) for l in (a, b, c)] == ["up1 a0 8×8", "up1 a1 8×8", "up1 a1 t3 8×8"]
