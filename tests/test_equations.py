"""Each equation of METHOD.md against a reference written out by hand, on tiny random tensors.

These tests call the diffusers processors directly (as diffusers' own processor tests do) and
compare every output element with the formula, so a bug that keeps shapes and ranges right but
gets the maths wrong fails here. ``scripts/mutation_check.py`` plants such bugs and checks that
this suite catches each one.

- Eq. 6 (isolated cross-attention): two characters with distinct ID embeddings, β ∈ {0, 0.5, 1},
  λ ∈ {1, 1.1}: inside ``M_m`` ``λ·(β·Y_m + (1 − β)·Y_S) + (1 − λ)·Y_S`` with ``Y_m`` from the
  character's *own* ID prompt, outside ``Y_S``; the negative half runs as pretrained.
- Isolated self-attention, the whole processor: logits ``Q·Kᵀ/√d`` over ``[K_x ; K_R1 ; K_R2]``,
  masked per region, ``+ log(1 + w·Â_m(i))`` on a character's own reference columns, merged with λ.
- The bank tokens used at step t are the ones written at step t for that layer; references padded
  to a fixed width leave the output unchanged.
- Warm-up over several steps: latents equal vanilla's exactly until it ends, differ after.
- The recorded maps ``A_m`` come from the prompt half of the CFG batch.
- CSA: rate 0 is vanilla; the share of the other image's tokens it samples matches the rate.
"""
import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from osa_lib.attention import AttentionStore, CrossAttentionRecorder, LayerInfo
from osa_lib.bank import ReferenceBank
from osa_lib.isolation import (IsolatedCrossAttention, IsolatedSelfAttention, IsolationConfig, IsolationController,
                               SceneCharacter, isolated_attention)
from osa_lib.masks import SubjectMasks
from osa_lib.generation import generate_story
from osa_lib.story import parse_story

HW = (4, 4)
N = 16  # image tokens
C, HEADS = 8, 2  # query dim, heads (d = 4)
D, T = 6, 5  # text width, text tokens
IN_A, IN_B, BACKGROUND = slice(0, 4), slice(4, 9), slice(9, 16)
SELF = LayerInfo("up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", "up", 0, "self", 1)
CROSS = LayerInfo("up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", "up", 0, "cross", 1)
OTHER_SELF = LayerInfo("up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor", "up", 0, "self", 1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def hand_masks(a_hat_a=None, a_hat_b=None) -> SubjectMasks:
    """M_A = tokens 0..3, M_B = tokens 4..8, the rest background; Â given per region."""
    masks = torch.zeros(1, 2, N, dtype=torch.bool)
    masks[0, 0, IN_A], masks[0, 1, IN_B] = True, True
    a_hat = torch.zeros(1, 2, N)
    a_hat[0, 0, IN_A] = torch.tensor([1.0, 0.7, 0.3, 0.0]) if a_hat_a is None else a_hat_a
    a_hat[0, 1, IN_B] = torch.tensor([0.2, 0.9, 1.0, 0.5, 0.05]) if a_hat_b is None else a_hat_b
    masks, a_hat = masks.view(1, 2, *HW), a_hat.view(1, 2, *HW)
    return SubjectMasks(masks=masks, raw_masks=masks.clone(), A_hat=a_hat, thresholds=torch.zeros(1, 2),
                        cv=torch.ones(1, 2), ok=torch.ones(1, 2, dtype=torch.bool), reasons=[["", ""]])


def controller(characters, config, bank=None, step=1, num_steps=4, masks=None):
    ctrl = IsolationController(characters, HW, num_steps=num_steps, config=config, bank=bank, write_bank=False)
    ctrl.masks, ctrl.step = masks or hand_masks(), step  # as if steps 0..step-1 had made these masks
    return ctrl


def heads(x):
    """(n, C) -> (heads, n, d)."""
    return x.view(x.shape[0], HEADS, C // HEADS).transpose(0, 1)


def unheads(x):
    """(heads, n, d) -> (n, C)."""
    return x.transpose(0, 1).reshape(x.shape[1], C)


def softmax_attention(q, k, v, bias=None):
    """Hand-written multi-head attention: q (n, C), k/v (m, C), bias (n, m) added to the logits."""
    logits = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(C // HEADS)  # (heads, n, m)
    if bias is not None:
        logits = logits + bias
    return unheads(logits.softmax(-1) @ heads(v))  # (n, C)


def out_proj(attn, y):
    return attn.to_out[0](y)


# --- Eq. 6: isolated cross-attention ------------------------------------------------------------
@pytest.fixture(scope="module")
def cross_attn():
    torch.manual_seed(0)
    return Attention(query_dim=C, cross_attention_dim=D, heads=HEADS, dim_head=C // HEADS).eval()


@pytest.fixture(scope="module")
def cross_inputs():
    g = gen(11)
    hidden = torch.randn(2, N, C, generator=g)  # [negative; prompt]
    context = torch.randn(2, T, D, generator=g)  # negative and prompt contexts differ
    id_a, id_b = 3 * torch.randn(4, D, generator=g), 3 * torch.randn(3, D, generator=g)  # distinct ID prompts
    return hidden, context, id_a, id_b


@pytest.mark.parametrize("lam", [1.0, 1.1])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_eq6_isolated_cross_attention_against_hand_reference(cross_attn, cross_inputs, beta, lam):
    attn = cross_attn
    hidden, context, id_a, id_b = cross_inputs
    chars = [SceneCharacter("A", [1], id_a, is_new=False), SceneCharacter("B", [2, 3], id_b, is_new=False)]
    bank = ReferenceBank("t", HW, 4)
    bank.add("A", "x", 1, torch.zeros(1, C), torch.zeros(1, C)), bank.add("B", "x", 1, torch.zeros(1, C), torch.zeros(1, C))
    ctrl = controller(chars, IsolationConfig(lam=lam, beta=beta, warmup=0.0), bank)
    with torch.no_grad():
        out = IsolatedCrossAttention(CROSS, ctrl)(attn, hidden, encoder_hidden_states=context)
        x = hidden[1]
        q = attn.to_q(x)
        y_s = softmax_attention(q, attn.to_k(context[1]), attn.to_v(context[1]))  # (N, C) global features
        y_a = softmax_attention(q, attn.to_k(id_a), attn.to_v(id_a))  # Y_A from A's own ID prompt
        y_b = softmax_attention(q, attn.to_k(id_b), attn.to_v(id_b))
        y_iso = y_s.clone()  # outside every mask: Y_S
        y_iso[IN_A] = beta * y_a[IN_A] + (1 - beta) * y_s[IN_A]  # Eq. 6 with the β mix inside M_A
        y_iso[IN_B] = beta * y_b[IN_B] + (1 - beta) * y_s[IN_B]
        expected = out_proj(attn, lam * y_iso + (1 - lam) * y_s)  # F = λ·F_iso + (1 − λ)·F_ori
        negative = out_proj(attn, softmax_attention(attn.to_q(hidden[0]), attn.to_k(context[0]), attn.to_v(context[0])))
    assert torch.allclose(out[1], expected, atol=1e-5)
    assert torch.allclose(out[0], negative, atol=1e-5)  # the negative half runs as pretrained
    assert torch.allclose(out[1, BACKGROUND], out_proj(attn, y_s)[BACKGROUND], atol=1e-5)
    if beta > 0:  # the ID prompts really differ inside the masks (so the test can tell them apart)
        assert (y_a[IN_B] - y_b[IN_B]).abs().max() > 1e-2 and (y_a[IN_A] - y_s[IN_A]).abs().max() > 1e-2


def test_eq6_lambda_zero_and_before_warmup_is_plain_cross_attention(cross_attn, cross_inputs):
    attn = cross_attn
    hidden, context, id_a, id_b = cross_inputs
    chars = [SceneCharacter("A", [1], id_a), SceneCharacter("B", [2], id_b)]
    plain = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=context)
    with torch.no_grad():
        for config, step in ((IsolationConfig(lam=0.0, warmup=0.0), 1), (IsolationConfig(warmup=0.5), 1)):
            ctrl = controller(chars, config, step=step)  # warm-up 0.5 of 4 steps = 2 steps > step 1
            assert torch.equal(IsolatedCrossAttention(CROSS, ctrl)(attn, hidden, encoder_hidden_states=context), plain)


# --- isolated self-attention, the whole processor -------------------------------------------------
@pytest.fixture(scope="module")
def self_attn():
    torch.manual_seed(1)
    return Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS).eval()


def stepped_bank(steps=(1, 2, 3), layers=(SELF, OTHER_SELF)) -> ReferenceBank:
    """Different reference tokens for every (character, layer, step): an off-by-one cannot pass."""
    bank = ReferenceBank("t", HW, 4)
    g = gen(21)
    for layer in layers:
        for step in steps:
            bank.add("A", layer.name, step, 2 * torch.randn(3, C, generator=g), 2 * torch.randn(3, C, generator=g))
            bank.add("B", layer.name, step, 2 * torch.randn(2, C, generator=g), 2 * torch.randn(2, C, generator=g))
    return bank


def self_reference(attn, hidden, bank, layer, step, lam, w, masks: SubjectMasks):
    """Isolated self-attention written out: prompt half (N, C) after to_out."""
    x = hidden[1]
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    m_a, m_b = masks.masks[0, 0].flatten(), masks.masks[0, 1].flatten()
    a_hat_a, a_hat_b = masks.A_hat[0, 0].flatten(), masks.A_hat[0, 1].flatten()
    k_a, v_a = bank.get("A", layer.name, step)
    k_b, v_b = bank.get("B", layer.name, step)
    keys, values = torch.cat([k, k_a, k_b]), torch.cat([v, v_a, v_b])  # [K_x ; K_RA ; K_RB]
    bias = torch.full((N, N + 5), float("-inf"))
    bias[:, :N] = 0.0  # every query sees its own image
    for i in range(N):
        if m_a[i]:
            bias[i, N:N + 3] = math.log(1 + w * float(a_hat_a[i]))  # re-weighting towards R_A
        if m_b[i]:
            bias[i, N + 3:] = math.log(1 + w * float(a_hat_b[i]))
    f_iso = softmax_attention(q, keys, values, bias)
    f_ori = softmax_attention(q, k, v)
    return out_proj(attn, lam * f_iso + (1 - lam) * f_ori)


@pytest.mark.parametrize("lam,w", [(1.0, 0.0), (1.0, 2.0), (1.1, 1.0), (0.6, 3.0)])
def test_isolated_self_attention_against_hand_reference(self_attn, lam, w):
    attn = self_attn
    hidden = torch.randn(2, N, C, generator=gen(31))
    bank = stepped_bank()
    chars = [SceneCharacter("A", [1], is_new=False), SceneCharacter("B", [2], is_new=False)]
    ctrl = controller(chars, IsolationConfig(lam=lam, reweight=w, warmup=0.0), bank, step=2)
    with torch.no_grad():
        out = IsolatedSelfAttention(SELF, ctrl)(attn, hidden)
        expected = self_reference(attn, hidden, bank, SELF, 2, lam, w, ctrl.masks)
        plain = AttnProcessor2_0()(attn, hidden)
    assert torch.allclose(out[1], expected, atol=1e-5)
    assert torch.allclose(out[0], plain[0], atol=1e-6)  # negative half as pretrained
    assert (out[1] - plain[1]).abs().max() > 1e-3


def test_isolated_keys_keep_one_width_through_a_scene_and_the_padding_gets_no_weight(self_attn, monkeypatch):
    """A character's references are padded to its widest stored step, rounded up to 16, so the
    attention's key length is the same at every step (a GPU plans its kernels once per shape);
    the zero keys added get -inf, so the output equals the unpadded attention."""
    attn, hidden = self_attn, torch.randn(2, N, C, generator=gen(33))
    bank, g = ReferenceBank("t", HW, 4), gen(22)
    for step, n in ((1, 3), (2, 17), (3, 5)):  # 17 tokens at most: width 32
        bank.add("A", SELF.name, step, 2 * torch.randn(n, C, generator=g), 2 * torch.randn(n, C, generator=g))
    widths, real_sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            widths.append(k.shape[-2])
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    chars = [SceneCharacter("A", [1], is_new=False)]
    for step in (1, 2, 3):
        outs = []
        for exact in (False, True):
            ctrl = controller(chars, IsolationConfig(lam=1.0, reweight=2.0, warmup=0.0), bank, step=step)
            if exact:  # no padding: each step's own width
                monkeypatch.setattr(ctrl, "reference_width", lambda name, layer: bank.get(name, layer, step)[0].shape[0])
            with torch.no_grad():
                outs.append(IsolatedSelfAttention(SELF, ctrl)(attn, hidden))
        assert torch.allclose(outs[0], outs[1], atol=1e-6), f"step {step}: the padding changed the output"
    assert widths[0::2] == [N + 32] * 3, widths  # padded: one width
    assert widths[1::2] == [N + 3, N + 17, N + 5], widths  # the unpadded runs saw the stored counts


@pytest.mark.parametrize("step", [1, 2, 3])
def test_bank_tokens_used_at_step_t_are_those_written_at_step_t_for_that_layer(self_attn, step):
    attn = self_attn
    hidden = torch.randn(2, N, C, generator=gen(32))
    bank = stepped_bank()
    chars = [SceneCharacter("A", [1], is_new=False), SceneCharacter("B", [2], is_new=False)]
    for layer in (SELF, OTHER_SELF):
        ctrl = controller(chars, IsolationConfig(lam=1.0, reweight=1.0, warmup=0.0), bank, step=step)
        with torch.no_grad():
            out = IsolatedSelfAttention(layer, ctrl)(attn, hidden)
            expected = self_reference(attn, hidden, bank, layer, step, 1.0, 1.0, ctrl.masks)
            other_step = self_reference(attn, hidden, bank, layer, 1 + step % 3, 1.0, 1.0, ctrl.masks)
        assert torch.allclose(out[1], expected, atol=1e-5), f"layer {layer.name}, step {step}"
        assert (expected - other_step).abs().max() > 1e-3  # the steps' tokens really differ


def test_bank_is_written_under_the_current_step_and_layer(self_attn):
    attn = self_attn
    hidden = torch.randn(2, N, C, generator=gen(33))
    bank = ReferenceBank("t", HW, 4)
    chars = [SceneCharacter("A", [1], is_new=True), SceneCharacter("B", [2], is_new=True)]
    ctrl = controller(chars, IsolationConfig(warmup=0.0), bank, step=3)
    ctrl.write_bank = True
    with torch.no_grad():
        IsolatedSelfAttention(OTHER_SELF, ctrl)(attn, hidden)
        ctrl.flush_bank()  # writes stay on the device until the step ends (one copy per step)
        assert set(bank.tokens["A"]) == {(OTHER_SELF.name, 3)} and set(bank.tokens["B"]) == {(OTHER_SELF.name, 3)}
        k_a, v_a = bank.get("A", OTHER_SELF.name, 3)
        assert torch.equal(k_a, attn.to_k(hidden[1])[IN_A]) and torch.equal(v_a, attn.to_v(hidden[1])[IN_A])
        k_b, v_b = bank.get("B", OTHER_SELF.name, 3)
        assert torch.equal(k_b, attn.to_k(hidden[1])[IN_B]) and torch.equal(v_b, attn.to_v(hidden[1])[IN_B])


# --- the recorded maps come from the prompt half ----------------------------------------------------
def test_recorded_maps_are_the_prompt_halfs_softmax(cross_attn):
    attn = cross_attn
    g = gen(41)
    hidden = torch.randn(2, N, C, generator=g)  # [negative; prompt]
    context = torch.randn(2, T, D, generator=g)  # different negative and prompt contexts
    store = AttentionStore([[[1], [2, 4]]], HW)
    with torch.no_grad():
        out = CrossAttentionRecorder(CROSS, store)(attn, hidden, encoder_hidden_states=context)
        assert torch.equal(out, AttnProcessor2_0()(attn, hidden, encoder_hidden_states=context))
        q, k = heads(attn.to_q(hidden[1])), heads(attn.to_k(context[1]))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(C // HEADS)).softmax(-1)  # (heads, N, T), by hand
        expected = torch.stack([probs[:, :, 1].mean(0), probs[:, :, [2, 4]].mean(dim=(0, 2))]).view(1, 2, *HW)
        q_neg, k_neg = heads(attn.to_q(hidden[0])), heads(attn.to_k(context[0]))
        negative = (q_neg @ k_neg.transpose(-1, -2) / math.sqrt(C // HEADS)).softmax(-1)[:, :, 1].mean(0)
    maps = store.average_maps()[CROSS]
    assert maps.shape == (1, 2, *HW)
    assert torch.allclose(maps, expected, atol=1e-6)
    assert (negative.view(HW) - expected[0, 0]).abs().max() > 1e-3  # the halves really differ


# --- warm-up over several steps, end to end on the tiny SDXL ----------------------------------------
WARMUP_STEPS = 8
def per_step_latents(tiny, prompt, seed, steps, ctrl=None):
    seen = []

    def callback(i, t, latents):
        if ctrl is not None:
            ctrl.step_callback(i, t, latents)
        seen.append(latents.clone())

    cond, noise = tiny.encode([prompt]), tiny.initial_latents([seed])
    if ctrl is None:
        tiny.denoise(cond, noise, num_inference_steps=steps, callback=callback, progress=False)
    else:
        with isolated_attention(tiny.unet, ctrl):
            tiny.denoise(cond, noise, num_inference_steps=steps, callback=callback, progress=False)
    return seen


def test_warmup_spans_several_steps_then_isolation_acts(tiny, two_characters):
    story = parse_story(two_characters, "warm-up")
    first = generate_story(tiny, parse_story({**two_characters, "scenes": two_characters["scenes"][:2]}, "first scenes"),
                           "isolated", num_inference_steps=WARMUP_STEPS, progress=False)  # fills the bank
    scene = story.scenes[2]
    chars = [SceneCharacter(n, tiny.token_positions(scene.prompt, story.characters[n].word),
                            tiny.encode_text([story.characters[n].id_prompt])[0], is_new=False) for n in scene.characters]
    for warmup, expected_steps in ((0.25, 2), (0.3, 3), (0.45, 4)):  # ceil: 2.4 -> 3 steps, 3.6 -> 4
        ctrl = IsolationController(chars, tuple(tiny.latent_shape[1:]), WARMUP_STEPS, IsolationConfig(warmup=warmup),
                                   first.bank, write_bank=False)
        assert ctrl.warmup_steps == expected_steps == math.ceil(warmup * WARMUP_STEPS)
        vanilla = per_step_latents(tiny, scene.prompt, scene.seed, WARMUP_STEPS)
        ours = per_step_latents(tiny, scene.prompt, scene.seed, WARMUP_STEPS, ctrl)
        for i in range(expected_steps):  # steps 0 .. warm-up-1 run as pretrained
            assert torch.equal(ours[i], vanilla[i]), f"warm-up {warmup}: step {i} differs from vanilla"
        assert (ours[expected_steps] - vanilla[expected_steps]).abs().max() > 1e-6, \
            f"warm-up {warmup}: isolation did not start at step {expected_steps}"
        assert (ours[-1] - vanilla[-1]).abs().max() > 1e-4


def test_end_stops_isolation_after_its_step_and_the_bank_keeps_only_the_steps_between(tiny, two_characters):
    story = parse_story(two_characters, "end")
    first_two = parse_story({**two_characters, "scenes": two_characters["scenes"][:2]}, "first scenes")
    window = IsolationConfig(warmup=0.25, end=0.5, bank_step_stride=1)  # 8 steps: isolated at steps 2 and 3
    first = generate_story(tiny, first_two, "isolated", config=window, num_inference_steps=WARMUP_STEPS, progress=False)
    assert {s for name in first.bank.characters for (_, s) in first.bank.tokens[name]} == {2, 3}
    scene = story.scenes[2]
    chars = [SceneCharacter(n, tiny.token_positions(scene.prompt, story.characters[n].word),
                            tiny.encode_text([story.characters[n].id_prompt])[0], is_new=False) for n in scene.characters]
    for end, expected_end in ((0.5, 4), (0.55, 5), (0.75, 6)):  # ceil: 4.4 -> 5 steps, 6 exactly -> 6
        runs = {}
        for stop in (end, 1.0):
            ctrl = IsolationController(chars, tuple(tiny.latent_shape[1:]), WARMUP_STEPS,
                                       IsolationConfig(warmup=0.0, end=stop), first.bank, write_bank=False)
            runs[stop] = per_step_latents(tiny, scene.prompt, scene.seed, WARMUP_STEPS, ctrl)
        assert ctrl.end_steps == WARMUP_STEPS and math.ceil(end * WARMUP_STEPS) == expected_end
        for i in range(expected_end):  # steps 0 .. end-1 as isolated to the last step
            assert torch.equal(runs[end][i], runs[1.0][i]), f"end {end}: step {i} differs before the end"
        assert (runs[end][expected_end] - runs[1.0][expected_end]).abs().max() > 1e-6, \
            f"end {end}: isolation did not stop at step {expected_end}"


# --- CSA (StoryDiffusion's Consistent Self-Attention) -----------------------------------------------
def test_csa_at_rate_zero_is_vanilla(tiny, two_characters):
    story = parse_story(two_characters, "csa")
    vanilla = generate_story(tiny, story, "vanilla", num_inference_steps=3, progress=False)
    csa = generate_story(tiny, story, "csa", num_inference_steps=3, csa_rate=0.0, progress=False)
    for ours, theirs in zip(csa.images, vanilla.images):
        assert np.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("rate", [0.25, 0.5, 1.0])
def test_csa_sampled_share_matches_rate(rate):
    """With all queries zero, attention is uniform over the keys an image sees. A reference batch of
    three images: image 0's values are 0, images 1 and 2's are 1, so image 0's output is s / (n + s)
    for s tokens sampled from the other two images' 2n; the share s / 2n must match the rate.
    Skips off, so every step after step 0 (plain self-attention) pairs."""
    from osa_lib.baselines import ConsistentSelfAttention, CSAConfig, CSAController

    n = 64
    attn = Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS).eval()
    with torch.no_grad():
        attn.to_q.weight.zero_()
        attn.to_v.weight.copy_(torch.eye(C))
        attn.to_out[0].weight.copy_(torch.eye(C)), attn.to_out[0].bias.zero_()
    hidden = torch.ones(6, n, C)  # [negative 0, 1, 2; prompt 0, 1, 2]
    hidden[0] = hidden[3] = 0.0
    layer = LayerInfo("up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", "up", 0, "self", 1)
    config = CSAConfig.with_rate(rate, skip_early=0.0, skip_late=0.0)
    controller = CSAController([layer], (8, 8), config, seed=0, write_keys=[0, 1, 2])
    processor = ConsistentSelfAttention(layer, controller)
    shares = []
    with torch.no_grad():
        for step in range(9):  # one layer: every call is a step
            o = processor(attn, hidden)[3].mean()  # prompt image 0
            if step == 0:
                assert o == 0, "step 0 is plain self-attention: image 0 sees only its own zeros"
                continue
            shares.append(float(o / (1 - o)) / 2 if o < 1 else float("inf"))  # o = s / (n + s)
    assert abs(np.mean(shares) - rate) < 0.05, shares
