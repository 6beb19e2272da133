"""Reference self-attention (how the toy model is taught to copy appearance, and what the
appearance probe switches on), the reference pairs it trains on, and the probe itself."""
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from osa_lib.attention import LayerInfo
from osa_lib.toy import world
from osa_lib.toy.probes.appearance import appearance_scores
from osa_lib.toy.model import ToyPipeline
from osa_lib.toy.reference import ReferenceSelfAttention, ReferenceState

HW, N, C, HEADS = (4, 4), 16, 8, 2
LAYER = LayerInfo("up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", "up", 0, "self", 1)


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS).eval()


def by_hand(attn, x, keys_from, allowed, bias=None):
    """Row b's output: softmax over its own tokens and the partner's (columns where allowed), with
    ``bias`` (B, N, 2N) added to the logits first when given."""
    q = attn.to_q(x).view(3, N, HEADS, -1).transpose(1, 2)  # (B, heads, N, d)
    k = attn.to_k(x).view(3, N, HEADS, -1).transpose(1, 2)
    v = attn.to_v(x).view(3, N, HEADS, -1).transpose(1, 2)
    rows = []
    for b in range(3):
        keys = torch.cat([k[b], k[keys_from[b]]], dim=1)  # (heads, 2N, d)
        values = torch.cat([v[b], v[keys_from[b]]], dim=1)
        logits = q[b] @ keys.transpose(-1, -2) / (C // HEADS) ** 0.5  # (heads, N, 2N)
        if bias is not None:
            logits = logits + bias[b]
        logits = logits.masked_fill(~allowed[b], float("-inf"))
        rows.append((logits.softmax(-1) @ values).transpose(0, 1).reshape(N, C))
    return attn.to_out[0](torch.stack(rows))


def test_without_partners_it_is_the_stock_processor(attn):
    x = torch.randn(3, N, C, generator=torch.Generator().manual_seed(1))
    state = ReferenceState(partner=torch.tensor([-1, -1, -1]), ref_mask=torch.ones(3, 4, 4))
    assert torch.equal(ReferenceSelfAttention(LAYER, state, HW)(attn, x), AttnProcessor2_0()(attn, x))


def test_partner_tokens_inside_the_masks_only(attn):
    x = torch.randn(3, N, C, generator=torch.Generator().manual_seed(2))
    ref_mask = torch.zeros(3, 4, 4)
    ref_mask[1, :2] = 1.0  # row 1 sees the top half of row 2's tokens
    query_mask = torch.zeros(3, 4, 4)
    query_mask[1, :, :2] = 1.0  # from its left half only
    state = ReferenceState(partner=torch.tensor([-1, 2, -1]), ref_mask=ref_mask, query_mask=query_mask)
    out = ReferenceSelfAttention(LAYER, state, HW)(attn, x)
    allowed = torch.zeros(3, N, 2 * N, dtype=torch.bool)
    allowed[:, :, :N] = True
    seen = ref_mask[1].flatten().bool()  # (N,)
    asking = query_mask[1].flatten().bool()
    allowed[1, :, N:] = asking[:, None] & seen[None, :]
    expected = by_hand(attn, x, [0, 2, 2], allowed)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[1], AttnProcessor2_0()(attn, x)[1])  # the partner changed row 1


def test_reweighting_adds_log_1_plus_w_a_hat_on_partner_columns_only(attn):
    """With ``reweight`` w, a looking query i's logits on the partner's visible tokens get
    ``+ log(1 + w·Â(i))`` (METHOD.md step 3), ``Â`` being ``query_weight`` pooled to the layer;
    its own tokens get nothing, and the share it records is the reweighted softmax's."""
    x = torch.randn(3, N, C, generator=torch.Generator().manual_seed(4))
    ref_mask = torch.zeros(3, 4, 4)
    ref_mask[1, 1:] = 1.0
    query_weight = torch.zeros(3, 4, 4)
    query_weight[1, :, 1] = 1.0
    query_weight[1, :, 2] = 0.25  # a soft edge, as Â has
    state = ReferenceState(partner=torch.tensor([-1, 2, -1]), ref_mask=ref_mask, reweight=8.0,
                           query_weight=query_weight, shares={})
    out = ReferenceSelfAttention(LAYER, state, HW)(attn, x)
    allowed = torch.zeros(3, N, 2 * N, dtype=torch.bool)
    allowed[:, :, :N] = True
    allowed[1, :, N:] = ref_mask[1].flatten().bool()[None, :]
    bias = torch.zeros(3, N, 2 * N)
    bias[:, :, N:] = torch.log(1 + 8.0 * query_weight.flatten(1))[:, :, None]
    torch.testing.assert_close(out, by_hand(attn, x, [0, 2, 2], allowed, bias), rtol=1e-5, atol=1e-6)
    plain = ReferenceSelfAttention(LAYER, ReferenceState(partner=torch.tensor([-1, 2, -1]), ref_mask=ref_mask, shares={}), HW)
    plain(attn, x)
    assert state.shares[LAYER.name][0] > plain.state.shares[LAYER.name][0]  # the boost moves attention to the partner
    torch.testing.assert_close(out[[0, 2]], AttnProcessor2_0()(attn, x)[[0, 2]])  # rows without a partner untouched


def test_share_on_partner_tokens_is_the_softmax_mass_of_the_looking_queries(attn):
    """``ReferenceState.shares`` records, for the rows with a partner, the attention mass on the
    partner's tokens averaged over heads and over the queries inside ``query_mask``."""
    x = torch.randn(3, N, C, generator=torch.Generator().manual_seed(3))
    ref_mask = torch.zeros(3, 4, 4)
    ref_mask[1, 1:3] = 1.0
    query_mask = torch.zeros(3, 4, 4)
    query_mask[1, 2:] = 1.0  # the bottom half of row 1 looks
    state = ReferenceState(partner=torch.tensor([-1, 2, -1]), ref_mask=ref_mask, query_mask=query_mask, shares={})
    ReferenceSelfAttention(LAYER, state, HW)(attn, x)
    q = attn.to_q(x[1]).view(N, HEADS, -1).transpose(0, 1)  # (heads, N, d)
    k_own = attn.to_k(x[1]).view(N, HEADS, -1).transpose(0, 1)
    k_ref = attn.to_k(x[2]).view(N, HEADS, -1).transpose(0, 1)[:, ref_mask[1].flatten().bool()]
    logits = torch.cat([q @ k_own.transpose(-1, -2), q @ k_ref.transpose(-1, -2)], -1) / (C // HEADS) ** 0.5
    share = logits.softmax(-1)[..., N:].sum(-1).mean(0)  # (N,)
    expected = share[query_mask[1].flatten().bool()].mean().detach()
    assert state.shares[LAYER.name] == [pytest.approx(float(expected), rel=1e-5)]
    assert 0 < expected < 1


def test_a_pair_shares_one_character_in_every_detail_but_its_place():
    rng = np.random.default_rng(0)
    for _ in range(20):
        reference, target, i_ref, i_tgt = world.sample_pair(rng, exclude=world.HELD_OUT_TRIPLES)
        a, b = reference.characters[i_ref], target.characters[i_tgt]
        assert a.identity() == b.identity() and (a.shape, a.colour) == (b.shape, b.colour)
        others = [c for k, c in enumerate(target.characters) if k != i_tgt]
        assert all(c.shape != a.shape and c.colour != a.colour for c in others)
        assert target.masks[i_tgt].any()


def test_training_batches_give_each_pair_target_its_own_character_as_a_hat():
    """``SceneStream``'s query weight (the stand-in for ``Â`` when training with re-weighting) is
    each pair target's shared character's coverage at latent size, and zero in every other row."""
    from osa_lib.toy.train import SceneStream
    stream = SceneStream(8, seed=3, p_empty_caption=0.0, pair_rate=0.5)
    images, _, partner, _, _, query_weight = next(iter(stream))
    assert query_weight.shape == (8, 16, 16) and partner.tolist()[:4] == [-1, -1, 0, 1]
    assert torch.equal(query_weight[partner < 0], torch.zeros(6, 16, 16))
    rng = np.random.default_rng(3)  # the same draws as the stream: its pairs come first
    for k in range(2):
        _, target, _, i_tgt = world.sample_pair(rng, exclude=world.HELD_OUT_TRIPLES)
        expected = torch.nn.functional.avg_pool2d(torch.from_numpy(target.masks[i_tgt]).float()[None, None], 2)[0, 0]
        torch.testing.assert_close(query_weight[2 + k], expected)


def test_core_region_keeps_the_pixels_nearest_the_centre_up_to_the_area():
    """A 3x3 block centred at (3, 3) of a 10x10 image: 5 % of the image keeps the centre and its four
    edge neighbours (distance 1; the corners are at sqrt 2); a mask smaller than the area stays whole."""
    from osa_lib.toy.train import core_region
    block = np.zeros((10, 10), dtype=bool)
    block[2:5, 2:5] = True
    plus = np.zeros_like(block)
    plus[3, 2:5] = plus[2:5, 3] = True
    np.testing.assert_array_equal(core_region(block, 0.05), plus)
    np.testing.assert_array_equal(core_region(block, 0.09), block)
    np.testing.assert_array_equal(core_region(block, 0.5), block)
    assert core_region(block, 0.01).sum() == 1 and core_region(block, 0.01)[3, 3]


def test_training_pairs_with_a_core_area_show_only_the_characters_cores():
    """``SceneStream(core_area=a)`` with no whole pairs: each target's visible reference tokens and
    its looking queries are the two characters' cores (at latent size), inside their masks; without
    it, the whole reference character and the target grown by a pixel, as before."""
    from osa_lib.toy.train import SceneStream, core_region
    from osa_lib.toy.world import _dilate
    pool = lambda m: torch.nn.functional.avg_pool2d(torch.from_numpy(m).float()[None, None], 2)[0, 0]
    for core_area in (0.08, None):
        stream = SceneStream(8, seed=5, p_empty_caption=0.0, pair_rate=0.5, whole_share=0.0, core_area=core_area)
        _, _, partner, ref_mask, query_mask, _ = next(iter(stream))
        rng = np.random.default_rng(5)  # the stream's draws: its pairs first, then two whole-share draws each
        for k in range(2):
            reference, target, i_ref, i_tgt = world.sample_pair(rng, exclude=world.HELD_OUT_TRIPLES)
            if core_area is None:
                seen, looking = reference.masks[i_ref], _dilate(target.masks[i_tgt])
            else:
                seen, looking = core_region(reference.masks[i_ref], core_area), core_region(target.masks[i_tgt], core_area)
                assert seen.sum() <= core_area * seen.size and looking.sum() < target.masks[i_tgt].sum()
            torch.testing.assert_close(ref_mask[2 + k], pool(seen))
            torch.testing.assert_close(query_mask[2 + k], pool(looking))
    with pytest.raises(ValueError, match="core_area"):
        SceneStream(8, seed=0, pair_rate=0.5, core_area=0.0)


def test_probe_rows_are_shares_and_no_reference_is_the_paired_baseline():
    pipe = ToyPipeline.from_pretrained(world.__file__.rsplit("/osa_lib/", 1)[0] + "/data/toy_model")
    settings = (("none", (), (0.0, 1.0)), ("up, all steps", None, (0.0, 1.0)))
    rows = appearance_scores(pipe, n_samples=4, settings=settings, steps=3)
    assert [r["setting"] for r in rows] == ["none", "up, all steps"]
    for r in rows:
        assert r["n"] == 4 and 0 <= r["drawn"] <= 1
        assert all(np.isnan(r[k]) or 0 <= r[k] <= 1 for k in ("colour", "mark", "size"))


def test_reference_share_reports_every_up_block_self_attention_at_every_timestep():
    """``reference_share`` on the shipped model: one share per (timestep, up-block attn1), each a
    fraction strictly inside (0, 1) (the references are visible, and the own tokens always are)."""
    from osa_lib.toy.probes.appearance import reference_share
    pipe = ToyPipeline.from_pretrained(world.__file__.rsplit("/osa_lib/", 1)[0] + "/data/toy_model")
    rows = reference_share(pipe, n_pairs=4, timesteps=(300, 900))
    layers = {r["layer"] for r in rows}
    assert len(layers) == 4 and all(".attn1." in l and l.startswith("up_blocks.") for l in layers)
    assert [r["t"] for r in rows] == [300] * 4 + [900] * 4
    assert all(0 < r["share"] < 1 for r in rows)


def test_reference_share_with_reweighting_moves_attention_to_the_reference():
    """``reference_share(reweight=w)`` applies the method's boost with the character's true coverage
    as ``Â``: every layer's share rises above the unboosted one on the same batch."""
    from osa_lib.toy.probes.appearance import reference_share
    pipe = ToyPipeline.from_pretrained(world.__file__.rsplit("/osa_lib/", 1)[0] + "/data/toy_model")
    plain = reference_share(pipe, n_pairs=4, timesteps=(900,))
    boosted = reference_share(pipe, n_pairs=4, timesteps=(900,), reweight=16.0)
    assert [r["layer"] for r in boosted] == [r["layer"] for r in plain]
    assert all(b["share"] > p["share"] for b, p in zip(boosted, plain))


def test_drawn_references_are_the_models_drawings_read_back_by_the_analyzer():
    """``drawn_references``: each reference is the model's drawing of its caption (without the colour
    word for an uncoloured story's first scene), its truth the analyzer's reading of that drawing;
    the probe on drawn references keeps only the samples whose reference was drawn."""
    from osa_lib.toy.analyzer import analyze_image, largest_detection
    from osa_lib.toy.probes.appearance import drawn_references, probe_references
    pipe = ToyPipeline.from_pretrained(world.__file__.rsplit("/osa_lib/", 1)[0] + "/data/toy_model")
    pipe.set_progress_bar_config(disable=True)
    rendered, _ = probe_references(6, seed=0)
    for colour_named in (True, False):
        drawn = drawn_references(pipe, rendered, seed=0, colour_named=colour_named)
        assert len(drawn) == 6 and any(d is not None for d in drawn)
        for d, r in zip(drawn, rendered):
            if d is None:
                continue
            named = [w for w in d.caption.split() if w in world.COLOURS]
            assert named == ([r.characters[0].colour] if colour_named else []), d.caption
            read = largest_detection(analyze_image(d.image), r.characters[0].shape)
            assert read is not None and (read.colour, read.mark) == (d.characters[0].colour, d.characters[0].mark)
            assert d.masks.shape == (1, 32, 32) and np.array_equal(d.masks[0], read.mask)
            assert not np.array_equal(d.image, r.image), "a drawing, not the rendered scene"
    settings = (("none", (), (0.0, 1.0)),)
    drawn = drawn_references(pipe, rendered, seed=0, colour_named=False)
    rows = appearance_scores(pipe, n_samples=6, settings=settings, references="drawn-uncoloured")
    assert rows[0]["n"] == sum(d is not None for d in drawn)
    with pytest.raises(ValueError, match="references must be one of"):
        appearance_scores(pipe, n_samples=2, settings=settings, references="painted")


def test_reference_captions_rewrite_only_the_colour_word_the_reference_shows(monkeypatch):
    """``--reference-captions``: the references' tokens are computed with their caption as made,
    with the colour family each one shows named, or with no colour word; the images stay."""
    from osa_lib.toy.probes import appearance
    pipe = ToyPipeline.from_pretrained(world.__file__.rsplit("/osa_lib/", 1)[0] + "/data/toy_model")
    pipe.set_progress_bar_config(disable=True)
    shown = {}
    real = appearance.sample_with_reference
    def spy(pipe, prompts, references, *args, **kwargs):
        shown["references"] = references
        return real(pipe, prompts, references, *args, **kwargs)
    monkeypatch.setattr(appearance, "sample_with_reference", spy)
    rendered, _ = appearance.probe_references(4, seed=0)
    settings = (("none", (), (0.0, 1.0)),)
    for kind, captions in (("rendered", "uncoloured"), ("drawn-uncoloured", "colour-named"), ("rendered", "kept")):
        appearance.appearance_scores(pipe, n_samples=4, settings=settings, references=kind, captions=captions)
        for ref in shown["references"]:
            named = [w for w in ref.caption.split() if w in world.COLOURS]
            assert named == {"uncoloured": [], "colour-named": [ref.characters[0].colour],
                             "kept": [ref.characters[0].colour]}[captions], ref.caption
            assert ref.characters[0].shape in ref.caption and ref.scene in ref.caption
        if kind == "rendered":
            assert all(np.array_equal(a.image, b.image) for a, b in zip(shown["references"], rendered))
    with pytest.raises(ValueError, match="captions must be one of"):
        appearance.recaption(rendered[0], "bold")
