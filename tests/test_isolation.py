"""The extended block: λ = 0 is the unmodified model, isolation changes only scenes with returning
characters, and the masking / re-weighting semantics of isolated self-attention (METHOD.md 3)."""
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from osa_lib.attention import LayerInfo, split_heads
from osa_lib.bank import ReferenceBank
from osa_lib.isolation import (IsolatedSelfAttention, IsolationConfig, IsolationController, SceneCharacter,
                                isolated_attention)
from osa_lib.masks import SubjectMasks
from osa_lib.generation import generate_story
from osa_lib.story import parse_story

STEPS = 3  # warm-up ceil(0.2 * 3) = 1 step, then two isolated steps

@pytest.fixture(scope="module")
def story(two_characters):
    return parse_story(two_characters, "isolation-test")


@pytest.fixture(scope="module")
def vanilla(tiny, story):
    return generate_story(tiny, story, "vanilla", num_inference_steps=STEPS, progress=False)


@pytest.fixture(scope="module")
def isolated(tiny, story):
    return generate_story(tiny, story, "isolated", num_inference_steps=STEPS, progress=False)


# --- end to end on the tiny SDXL ---------------------------------------------------------------
def test_lambda_zero_is_the_unmodified_model(tiny, story, vanilla):
    result = generate_story(tiny, story, "isolated", IsolationConfig(lam=0), num_inference_steps=STEPS,
                            progress=False)
    # the isolated machinery really ran: masks were made and the bank was filled
    assert sorted(result.bank.characters) == ["Lily", "Tom"]
    assert all(s.masks is not None for s in result.scenes)
    for ours, theirs in zip(result.images, vanilla.images):
        assert np.array_equal(ours, theirs)


def test_a_solo_first_scene_gets_its_id_prompt_and_nothing_else(tiny, story, isolated, vanilla):
    """A character's first scene, alone: no references, but isolated cross-attention blends its ID
    prompt in (METHOD.md's story loop); without that (``solo_cross=False``) the model as is."""
    first_lily, first_tom, together = isolated.images
    assert np.abs(first_lily - vanilla.images[0]).max() > 1e-4
    assert np.abs(first_tom - vanilla.images[1]).max() > 1e-4
    no_solo = generate_story(tiny, story, "isolated", IsolationConfig(solo_cross=False), num_inference_steps=STEPS,
                             progress=False)
    assert np.array_equal(no_solo.images[0], vanilla.images[0])
    assert np.array_equal(no_solo.images[1], vanilla.images[1])
    no_self = generate_story(tiny, story, "isolated", IsolationConfig(isolated_self=False), num_inference_steps=STEPS,
                             progress=False)
    assert np.array_equal(no_self.images[0], first_lily)  # nothing to read: self-attention is off there anyway
    # both return: the isolated branch acts
    assert np.abs(together - vanilla.images[2]).max() > 1e-4
    masks = isolated.scenes[2].masks
    assert masks.shape[0] == 2 and masks.dtype == bool
    assert not (masks[0] & masks[1]).any()  # M_m are disjoint


def test_first_scenes_fill_the_bank_only_for_up_self_attention(tiny, isolated):
    bank = isolated.bank
    assert sorted(bank.characters) == ["Lily", "Tom"]
    layers = {layer for entries in bank.tokens.values() for layer, _ in entries}
    assert layers and all(l.startswith("up_blocks.") and l.endswith("attn1.processor") for l in layers)
    steps = {step for entries in bank.tokens.values() for _, step in entries}
    assert steps <= set(range(1, STEPS))  # masks exist from the end of step 0 on
    modules = dict(tiny.unet.named_modules())
    for entries in bank.tokens.values():
        for (layer, _), (k, v) in entries.items():
            attn1 = modules[layer.rsplit(".processor", 1)[0]]
            assert k.shape == v.shape and k.shape[1] == attn1.to_k.out_features  # (n_m, C) of that layer
            assert 0 < k.shape[0] < 16 * 16  # some, not all, of the image tokens


def test_returning_character_missing_from_bank_is_named():
    bank = ReferenceBank("sdxl-tiny", (4, 4), 2)
    bank.add("Lily", "L", 1, torch.zeros(1, 8), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="'Rosa' is not in the reference bank"):
        IsolationController([SceneCharacter("Lily", [1], is_new=False), SceneCharacter("Rosa", [2], is_new=False)],
                            (4, 4), 2, bank=bank)
    with pytest.raises(ValueError, match=r"\['Rosa'\] are returning but no reference bank"):
        IsolationController([SceneCharacter("Rosa", [2], is_new=False)], (4, 4), 2, bank=None)
    with pytest.raises(ValueError, match="at least one character"):
        IsolationController([], (4, 4), 2)


# --- the masking semantics, with a hand-built controller ---------------------------------------
HW = (4, 4)  # N = 16 image tokens
N, C, HEADS = 16, 8, 2
LAYER = LayerInfo("up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", "up", 0, "self", 1)
IN_A, IN_B, BACKGROUND = slice(0, 4), slice(4, 8), slice(8, 16)  # M_A, M_B, neither


def make_masks(a_hat_a: torch.Tensor | None = None) -> SubjectMasks:
    masks = torch.zeros(1, 2, N, dtype=torch.bool)
    masks[0, 0, IN_A] = True
    masks[0, 1, IN_B] = True
    a_hat = torch.zeros(1, 2, N)
    a_hat[0, 0, IN_A] = 1.0 if a_hat_a is None else a_hat_a
    a_hat[0, 1, IN_B] = 0.5
    masks, a_hat = masks.view(1, 2, *HW), a_hat.view(1, 2, *HW)
    return SubjectMasks(masks=masks, raw_masks=masks.clone(), A_hat=a_hat, thresholds=torch.zeros(1, 2),
                        cv=torch.ones(1, 2), ok=torch.ones(1, 2, dtype=torch.bool), reasons=[["", ""]])


def make_controller(bank, reweight=1.0, lam=1.1, a_hat_a=None, characters=None):
    characters = characters or [SceneCharacter("A", [1], is_new=False), SceneCharacter("B", [2], is_new=False)]
    ctrl = IsolationController(characters, HW, num_steps=2, bank=bank, write_bank=False,
                               config=IsolationConfig(lam=lam, reweight=reweight))
    ctrl.masks, ctrl.step = make_masks(a_hat_a), 1  # as if step 0 had made these masks
    return ctrl


def make_bank(v_a=None, v_b=None, k_a=None, k_b=None) -> ReferenceBank:
    g = torch.Generator().manual_seed(1)
    bank = ReferenceBank("sdxl-tiny", HW, 2)
    bank.add("A", LAYER.name, 1, torch.randn(3, C, generator=g) if k_a is None else k_a,
             torch.randn(3, C, generator=g) if v_a is None else v_a)
    bank.add("B", LAYER.name, 1, torch.randn(5, C, generator=g) if k_b is None else k_b,
             torch.randn(5, C, generator=g) if v_b is None else v_b)
    return bank


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS)


@pytest.fixture(scope="module")
def qkv():
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(N, C, generator=g) for _ in range(3))  # (N, C) each


def isolated_output(attn, ctrl, q, k, v) -> torch.Tensor:
    """F_iso (heads, N, d) through the processor's own code path."""
    return IsolatedSelfAttention(LAYER, ctrl)._isolated(attn, q, k, v)


def reference_rows(attn, q, k, v, rows, k_r=None, v_r=None, bias=None) -> torch.Tensor:
    """Softmax attention of the query rows over [K_x ; K_R] written out by hand: (heads, n, d)."""
    keys = k if k_r is None else torch.cat([k, k_r])
    values = v if v_r is None else torch.cat([v, v_r])
    qh, kh, vh = (split_heads(attn, t[None])[0] for t in (q[rows], keys, values))
    logits = qh @ kh.transpose(-1, -2) / (C // HEADS) ** 0.5  # (heads, n, N + n_R)
    if bias is not None:
        logits[..., N:] += bias[:, None]  # bias per query row, on the reference columns
    return logits.softmax(-1) @ vh


def test_masks_at_matches_hand_built_masks():
    ctrl = make_controller(make_bank())
    masks, a_hat = ctrl.masks_at(LAYER)
    assert masks.shape == a_hat.shape == (2, N) and masks.dtype == torch.bool
    assert masks[0, IN_A].all() and not masks[0, IN_B].any() and not masks[:, BACKGROUND].any()


def test_queries_in_m_a_ignore_r_b(attn, qkv):
    q, k, v = qkv
    base = isolated_output(attn, make_controller(make_bank()), q, k, v)
    g = torch.Generator().manual_seed(3)
    changed = isolated_output(attn, make_controller(make_bank(v_b=1e4 * torch.randn(5, C, generator=g),
                                                              k_b=10 * torch.randn(5, C, generator=g))), q, k, v)
    assert torch.equal(base[:, IN_A], changed[:, IN_A])  # R_B's keys and values never reach M_A
    assert torch.equal(base[:, BACKGROUND], changed[:, BACKGROUND])
    assert (base[:, IN_B] - changed[:, IN_B]).abs().max() > 1  # ...but they do reach M_B


def test_queries_in_m_a_attend_own_image_and_r_a(attn, qkv):
    q, k, v = qkv
    bank = make_bank()
    out = isolated_output(attn, make_controller(bank, reweight=0.0), q, k, v)
    k_a, v_a = bank.get("A", LAYER.name, 1)
    expected = reference_rows(attn, q, k, v, IN_A, k_a, v_a)  # w = 0: no bias
    assert torch.allclose(out[:, IN_A], expected, atol=1e-5)
    # and with re-weighting, the bias is log(1 + w·Â_A(i)) on the R_A columns
    out = isolated_output(attn, make_controller(bank, reweight=2.0), q, k, v)
    expected = reference_rows(attn, q, k, v, IN_A, k_a, v_a, bias=torch.full((4,), float(np.log1p(2.0))))
    assert torch.allclose(out[:, IN_A], expected, atol=1e-5)


def test_background_queries_ignore_all_references(attn, qkv):
    q, k, v = qkv
    out = isolated_output(attn, make_controller(make_bank()), q, k, v)
    expected = reference_rows(attn, q, k, v, BACKGROUND)  # own image only
    assert torch.allclose(out[:, BACKGROUND], expected, atol=1e-5)
    huge = make_bank(v_a=1e4 * torch.ones(3, C), v_b=-1e4 * torch.ones(5, C))
    assert torch.equal(isolated_output(attn, make_controller(huge), q, k, v)[:, BACKGROUND], out[:, BACKGROUND])


def test_reweighting_increases_mass_on_own_reference(attn, qkv):
    q, k, _ = qkv
    # V_x = 0 and V_R_A = 1: every output channel of an M_A query is its attention mass on R_A
    bank = make_bank(v_a=torch.ones(3, C))
    a_hat_a = torch.tensor([1.0, 0.6, 0.0, 0.0])  # Â_A of the four M_A queries
    zeros = torch.zeros(N, C)
    mass = {w: isolated_output(attn, make_controller(bank, reweight=w, a_hat_a=a_hat_a), q, k, zeros)[:, IN_A, 0]
            for w in (0.0, 1.0, 4.0)}  # (heads, 4)
    assert ((mass[0.0] > 0) & (mass[0.0] < 1)).all()
    assert (mass[1.0][:, :2] > mass[0.0][:, :2] + 1e-4).all()  # w > 0 amplifies R_A where Â_A > 0
    assert (mass[4.0][:, :2] > mass[1.0][:, :2] + 1e-4).all()  # monotone in w
    assert (mass[1.0][:, 0] > mass[0.0][:, 0]).all()
    assert torch.allclose(mass[1.0][:, 2:], mass[0.0][:, 2:], atol=1e-6)  # Â_A = 0: no change


def test_no_references_gives_no_isolated_branch(attn, qkv):
    q, k, v = qkv
    new = [SceneCharacter("A", [1], is_new=True), SceneCharacter("B", [2], is_new=True)]
    ctrl = make_controller(ReferenceBank("sdxl-tiny", HW, 2), characters=new)
    assert isolated_output(attn, ctrl, q, k, v) is None


def test_processor_merges_with_lambda_and_leaves_negative_half(attn):
    """F = λ·F_iso + (1 − λ)·F_ori on the prompt half; the negative half runs as pretrained."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, N, C, generator=g)  # [negative; prompt]
    bank = make_bank()
    ori = AttnProcessor2_0()(attn, hidden)
    with torch.no_grad():
        full = IsolatedSelfAttention(LAYER, make_controller(bank, lam=1.0))(attn, hidden)
        merged = IsolatedSelfAttention(LAYER, make_controller(bank, lam=1.1))(attn, hidden)
        off = IsolatedSelfAttention(LAYER, make_controller(bank, lam=0.0))(attn, hidden)
    assert torch.equal(off, ori)
    assert torch.allclose(full[0], ori[0], atol=1e-6) and torch.allclose(merged[0], ori[0], atol=1e-6)
    assert (full[1] - ori[1]).abs().max() > 1e-3
    assert torch.allclose(merged[1], 1.1 * full[1] - 0.1 * ori[1], atol=1e-5)  # to_out is affine


def test_new_character_tokens_written_to_bank(attn):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, N, C, generator=g)
    bank = ReferenceBank("sdxl-tiny", HW, 2)
    chars = [SceneCharacter("A", [1], is_new=True), SceneCharacter("B", [2], is_new=True)]
    ctrl = make_controller(bank, characters=chars)
    ctrl.write_bank = True
    with torch.no_grad():
        out = IsolatedSelfAttention(LAYER, ctrl)(attn, hidden)
        assert torch.allclose(out, AttnProcessor2_0()(attn, hidden), atol=1e-6)  # new characters: no change
        ctrl.flush_bank()  # writes stay on the device until the step ends (one copy per step)
        k_a, v_a = bank.get("A", LAYER.name, 1)
        assert torch.equal(k_a, attn.to_k(hidden[1])[IN_A])  # prompt half, tokens of M_A only
        assert torch.equal(v_a, attn.to_v(hidden[1])[IN_A])
        k_b, _ = bank.get("B", LAYER.name, 1)
        assert torch.equal(k_b, attn.to_k(hidden[1])[IN_B])


@pytest.mark.parametrize("bank_device", ["cpu", "cpu:0"])
def test_bank_writes_reach_a_bank_on_another_device_in_one_copy(attn, bank_device, monkeypatch):
    """A bank on the queries' device takes the written tensors as they are; one on another device
    ("cpu:0" compares unequal to "cpu", so the CPU can take that path) gets them through a single
    concatenated copy per step. Both store the same tokens."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, N, C, generator=g)
    bank = ReferenceBank("sdxl-tiny", HW, 2)
    bank.device = torch.device(bank_device)  # set directly: the constructor would make "cpu:0" "cpu"
    ctrl = make_controller(bank, characters=[SceneCharacter("A", [1], is_new=True),
                                             SceneCharacter("B", [2], is_new=True)])
    ctrl.write_bank = True
    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: cats.append(1) or real_cat(*a, **k))
    with torch.no_grad():
        IsolatedSelfAttention(LAYER, ctrl)(attn, hidden)
        cats.clear()
        ctrl.flush_bank()
        assert len(cats) == (0 if bank_device == "cpu" else 1)
        assert torch.equal(bank.get("A", LAYER.name, 1)[0], attn.to_k(hidden[1])[IN_A])
        assert torch.equal(bank.get("B", LAYER.name, 1)[1], attn.to_v(hidden[1])[IN_B])


# --- bad inputs stop before the U-Net runs (issue 15) -------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("overlap_rule", "bogus", r"overlap_rule='bogus' is unknown; choose one of \['lower_cv'"),
    ("warmup", 1.5, r"warmup=1.5 is not accepted: it must be a finite number in \[0.0, 1.0\)"),
    ("warmup", -0.1, r"warmup=-0.1"),
    ("end", 0.0, r"end=0.0 is not accepted: it must be a finite number in \(0.0, 1.0\]"),
    ("end", 1.2, r"end=1.2 is not accepted"),
    ("end", 0.2, r"end=0.2 must be above warmup=0.2"),
    ("lam", float("nan"), r"lam=nan is not accepted"),
    ("lam", 1e6, r"lam=1000000.0 is not accepted: .* in \[0.0, 3.0\]"),
    ("lam", "1.1", r"lam='1.1' is not accepted"),
    ("reweight", -100, r"reweight=-100 is not accepted"),
    ("beta", 1.5, r"beta=1.5 is not accepted"),
    ("mask_resolution", 0, r"mask_resolution=0 must be None"),
    ("isolated_self", "yes", r"isolated_self='yes' must be True or False"),
    ("bank_step_stride", 0, r"bank_step_stride=0 must be a positive integer"),
    ("bank_step_stride", 2.0, r"bank_step_stride=2.0 must be a positive integer"),
    ("bank_layer_stride", -1, r"bank_layer_stride=-1 must be a positive integer"),
    ("bank_layer_stride", True, r"bank_layer_stride=True must be a positive integer"),
])
def test_bad_config_is_refused_where_it_is_made(field, value, message):
    with pytest.raises(ValueError, match=message):
        IsolationConfig(**{field: value})


def test_min_fraction_above_max_fraction_is_refused():
    with pytest.raises(ValueError, match=r"min_fraction=0.5 must be below max_fraction=0.2"):
        IsolationConfig(min_fraction=0.5, max_fraction=0.2)
    config = IsolationConfig()
    config.min_fraction = 0.95  # changed after it was made: the controller checks again
    with pytest.raises(ValueError, match="min_fraction=0.95"):
        IsolationController([SceneCharacter("A", [1])], HW, 2, config)


def count_unet_calls(unet):
    calls = []
    return calls, unet.register_forward_pre_hook(lambda *_: calls.append(1))


def test_mask_resolution_the_unet_lacks_is_refused_before_the_unet_runs(tiny):
    latent_hw = tuple(tiny.latent_shape[1:])
    controller = IsolationController([SceneCharacter("A", [2])], latent_hw, 2, IsolationConfig(mask_resolution=5))
    calls, hook = count_unet_calls(tiny.unet)
    try:
        with pytest.raises(ValueError, match=r"mask_resolution=5 is not a map height .* it has \[4, 8\]"):
            with isolated_attention(tiny.unet, controller):
                tiny.denoise(tiny.encode(["a girl in the park"]), tiny.initial_latents([0]), 2,
                             callback=controller.step_callback, progress=False)
    finally:
        hook.remove()
    assert calls == []
    with isolated_attention(tiny.unet, IsolationController([SceneCharacter("A", [2])], latent_hw, 2,
                                                           IsolationConfig(mask_resolution=4))):
        pass  # a height the U-Net has is accepted


def test_batch_of_two_prompts_is_refused(tiny):
    controller = IsolationController([SceneCharacter("A", [2])], tuple(tiny.latent_shape[1:]), 2)
    with pytest.raises(ValueError, match="one prompt per U-Net call; this call has 2 prompts"):
        with isolated_attention(tiny.unet, controller):
            tiny.denoise(tiny.encode(["a girl in the park", "a girl on the beach"]), tiny.initial_latents([0, 1]),
                         2, callback=controller.step_callback, progress=False)


@pytest.mark.parametrize("steps", [1, 2])
def test_unet_run_without_the_step_callback_is_an_error(tiny, steps):
    controller = IsolationController([SceneCharacter("A", [2])], tuple(tiny.latent_shape[1:]), steps)
    with pytest.raises(RuntimeError, match="without the controller's step callback"):
        with isolated_attention(tiny.unet, controller):
            tiny.generate(["a girl in the park"], [0], num_inference_steps=steps, progress=False)
    assert not any(type(p).__name__.startswith("Isolated") for p in tiny.unet.attn_processors.values())


# --- what the bank stores: no warm-up steps, every k-th step, every k-th layer (issue 14) ----------
@pytest.mark.parametrize("step_stride, layer_stride", [(1, 1), (2, 1), (1, 2), (3, 2)])
def test_bank_stores_the_read_steps_and_layers_its_strides_keep(tiny, two_characters, step_stride, layer_stride):
    from osa_lib.attention import find_attention_layers
    steps = 6  # warm-up ceil(0.2 * 6) = 2 steps: never read, so never stored
    one_scene = parse_story({**two_characters, "scenes": two_characters["scenes"][:1]}, "bank-strides")
    config = IsolationConfig(bank_step_stride=step_stride, bank_layer_stride=layer_stride)
    bank = generate_story(tiny, one_scene, "isolated", config, num_inference_steps=steps, progress=False).bank
    up_self = [l.name for l in find_attention_layers(tiny.unet, kind="self", places=("up",))]
    assert len(up_self) > 2
    stored = bank.tokens["Lily"]
    assert {s for _, s in stored} == set(range(2, steps, step_stride))
    assert {l for l, _ in stored} == set(up_self[::layer_stride])
    assert len(stored) == len(range(2, steps, step_stride)) * len(up_self[::layer_stride])


@pytest.mark.parametrize("mask_resolution, recorded", [(None, 4), (8, 8)])
def test_isolated_scene_records_maps_only_where_they_make_the_masks(tiny, mask_resolution, recorded):
    """Maps are recorded at the mask resolution only (default the smallest up-block one, 4 here)."""
    latent_hw = tuple(tiny.latent_shape[1:])
    controller = IsolationController([SceneCharacter("A", [2])], latent_hw, 2,
                                     IsolationConfig(mask_resolution=mask_resolution))
    with isolated_attention(tiny.unet, controller):
        tiny.denoise(tiny.encode(["a girl in the park"]), tiny.initial_latents([0]), 2,
                     callback=controller.step_callback, progress=False)
    assert {l.resolution(latent_hw)[0] for l in controller.store.layers} == {recorded}
    assert controller.masks.masks.shape[-1] == recorded
