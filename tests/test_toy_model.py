"""The toy text-to-image model: the shipped weights load and sample deterministically, the
tokenizer is built locally, training runs and resumes."""
import numpy as np
import pytest
import torch

from osa_lib import load_backbone
from osa_lib.toy.model import MAX_TOKENS, build_tokenizer
from osa_lib.toy.world import ToyGrammarError


@pytest.fixture(scope="module")
def toy():
    return load_backbone("toy", device="cpu")


def test_tokenizer_is_word_level_and_local():
    tok = build_tokenizer()
    ids = tok("a red circle in the snow", padding="max_length", max_length=MAX_TOKENS).input_ids
    assert len(ids) == MAX_TOKENS and ids[0] == tok.bos_token_id and ids[7] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:7]) == ["a", "red", "circle", "in", "the", "snow"]


def test_shipped_model_samples_deterministically(toy):
    a = toy.generate(["a red circle in the snow", "a blue square in the meadow"], [1, 2], num_inference_steps=8, progress=False)
    b = toy.generate(["a red circle in the snow", "a blue square in the meadow"], [1, 2], num_inference_steps=8, progress=False)
    assert a.shape == (2, 32, 32, 3) and np.array_equal(a, b)
    c = toy.generate(["a red circle in the snow"], [3], num_inference_steps=8, progress=False)
    assert not np.array_equal(a[0], c[0])


def _family_share(images, colour):
    """Share of strongly coloured pixels whose hue is in the named colour family."""
    from skimage.color import rgb2hsv
    from osa_lib.toy.world import COLOURS
    hsv = rgb2hsv(images.reshape(-1, 32, 3))
    vivid = (hsv[..., 1] > 0.5) & (hsv[..., 2] > 0.4)
    gap = np.abs((hsv[..., 0] * 360 - COLOURS[colour] + 180) % 360 - 180)
    return float((vivid & (gap < 25)).sum() / max(vivid.sum(), 1))


def test_shipped_model_responds_to_colour_and_scene_words(toy):
    """A floor, not the quality targets (those are measured by osa_lib.toy.probes.evaluate and reported
    in the README): the trained text conditioning moves colour and background the right way,
    which an untrained model does not do."""
    seeds = [10, 11, 12, 13]
    red_snow = toy.generate(["a red circle in the snow"] * 4, seeds, progress=False)
    blue_night = toy.generate(["a blue circle in the night"] * 4, seeds, progress=False)
    assert _family_share(red_snow, "red") > _family_share(blue_night, "red")
    assert _family_share(blue_night, "blue") > _family_share(red_snow, "blue")
    assert red_snow[:, 26:].mean() > blue_night[:, 26:].mean() + 0.2, "snow ground is brighter than night ground"


def test_unknown_word_is_a_clear_error(toy):
    with pytest.raises(ToyGrammarError, match="unknown word"):
        toy.encode(["a red dragon in the snow"])
    with pytest.raises(ValueError, match="does not occur"):
        toy.token_positions("a red circle in the snow", "square")


def test_training_runs_and_resumes(tmp_path):
    from osa_lib.toy.train import train
    out = tmp_path / "model"
    stats = train(steps=2, batch_size=4, out=out, save_every=1, log_every=1, seed=0)
    assert (out / "model_index.json").exists() and np.isfinite(stats["loss"])
    state = torch.load(tmp_path / "model_ckpt" / "state.pt", weights_only=False)
    assert state["step"] == 2
    train(steps=3, batch_size=4, out=out, save_every=1, log_every=1, seed=0)
    assert torch.load(tmp_path / "model_ckpt" / "state.pt", weights_only=False)["step"] == 3
    # a later session without the (ignored) checkpoint warm-starts from the exported weights
    import json, shutil
    shutil.rmtree(tmp_path / "model_ckpt")
    assert json.loads((out / "training.json").read_text())["step"] == 3
    train(steps=4, batch_size=4, out=out, save_every=1, log_every=1, seed=0)
    record = json.loads((out / "training.json").read_text())
    assert record["step"] == 4 and record["resumes"] == 2, "each start draws a new data stream"
    reloaded = load_backbone("toy", model_id=str(out), device="cpu")
    assert reloaded.generate(["a red circle in the snow"], [0], num_inference_steps=2, progress=False).shape == (1, 32, 32, 3)


def test_fine_tune_start_keeps_unet_and_embeddings_and_drops_text_layers(tmp_path):
    """--init-from with --text-layers 0: the new pipeline starts from the source's U-Net and token
    and position embeddings; the source's transformer layers are dropped, not silently kept."""
    from osa_lib.toy.model import build_toy_pipeline
    from osa_lib.toy.train import train
    source = build_toy_pipeline(seed=3, text_layers=1)
    source.save_pretrained(tmp_path / "source")
    out = tmp_path / "model"
    train(steps=0, batch_size=2, out=out, seed=0, text_layers=0, init_from=tmp_path / "source")
    tuned = load_backbone("toy", model_id=str(out), device="cpu").pipe
    assert tuned.text_encoder.config.num_hidden_layers == 0
    assert not any(".layers." in k for k in tuned.text_encoder.state_dict())
    embed = "embeddings.token_embedding.weight"
    assert torch.equal(tuned.text_encoder.state_dict()[embed], source.text_encoder.state_dict()[embed])
    for k, v in source.unet.state_dict().items():
        assert torch.equal(tuned.unet.state_dict()[k], v), k


def test_up_only_text_model_has_cross_attention_in_up_blocks_only(tmp_path):
    """text_blocks="up": the method's capture finds cross-attention only in the up blocks; a
    fine-tune start from an all-blocks model copies every tensor the two share (up blocks and
    ResNets) and drops the down- and mid-block attention."""
    from osa_lib.attention import find_attention_layers
    from osa_lib.toy.model import build_toy_pipeline
    from osa_lib.toy.train import train
    with pytest.raises(ValueError, match="text_blocks"):
        build_toy_pipeline(text_blocks="down")
    source = build_toy_pipeline(seed=3, text_layers=0, text_blocks="all")
    source.save_pretrained(tmp_path / "source")
    out = tmp_path / "model"
    train(steps=0, batch_size=2, out=out, seed=0, text_layers=0, text_blocks="up", init_from=tmp_path / "source")
    tuned = load_backbone("toy", model_id=str(out), device="cpu")
    places = {l.place for l in find_attention_layers(tuned.unet, kind="cross", latent_hw=(16, 16))}
    assert places == {"up"}
    up_keys = [k for k in tuned.unet.state_dict() if k.startswith("up_blocks")]
    assert up_keys and all(torch.equal(tuned.unet.state_dict()[k], source.unet.state_dict()[k]) for k in up_keys)
    assert tuned.generate(["a red circle and a blue square in the snow"], [0], num_inference_steps=2,
                          progress=False).shape == (1, 32, 32, 3)


def test_denoising_loss_targets_and_min_snr_weighting():
    """v-prediction regresses the scheduler's velocity; Min-SNR weights each sample by
    min(SNR, gamma) / (SNR + 1) and leaves the plain MSE when switched off."""
    from diffusers import DDPMScheduler
    from osa_lib.toy.train import _denoising_loss
    g = torch.Generator().manual_seed(0)
    latents, noise, pred = (torch.randn(3, 12, 16, 16, generator=g) for _ in range(3))
    t = torch.tensor([10, 500, 990])
    v_sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    eps_sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    v = v_sched.get_velocity(latents, noise, t)
    per_sample = ((pred - v) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(_denoising_loss(pred, latents, noise, t, v_sched, None), per_sample.mean())
    snr = v_sched.alphas_cumprod[t] / (1 - v_sched.alphas_cumprod[t])
    weights = snr.clamp(max=5.0) / (snr + 1)
    assert weights[0] < weights[1] <= 1 and weights[0] < 0.1, "low-noise steps are down-weighted"
    assert torch.allclose(_denoising_loss(pred, latents, noise, t, v_sched, 5.0), (per_sample * weights).mean())
    assert torch.allclose(_denoising_loss(noise, latents, noise, t, eps_sched, 5.0), torch.tensor(0.0))


def test_pair_targets_keep_full_weight_at_high_noise():
    """Reference-pair targets (``plain_rows``) are weighted 1, the other rows by Min-SNR."""
    from diffusers import DDPMScheduler
    from osa_lib.toy.train import _denoising_loss
    g = torch.Generator().manual_seed(1)
    latents, noise, pred = (torch.randn(3, 12, 16, 16, generator=g) for _ in range(3))
    t = torch.tensor([10, 500, 900])
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    per_sample = ((pred - sched.get_velocity(latents, noise, t)) ** 2).mean(dim=(1, 2, 3))
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    weights = snr.clamp(max=5.0) / (snr + 1)
    assert weights[2] < 0.05, "Min-SNR nearly ignores t = 900 for v"
    plain = torch.tensor([False, False, True])
    expected = (per_sample * torch.tensor([weights[0], weights[1], 1.0])).mean()
    assert torch.allclose(_denoising_loss(pred, latents, noise, t, sched, 5.0, plain), expected)


def test_pair_timesteps_noise_each_reference_like_its_target():
    """"same": a reference row gets its target's timestep (as a story's bank holds the first
    scene at the step being denoised); targets are drawn from [pair_min_t, T); other rows stay
    uniform. "independent" draws the references' own timesteps."""
    from osa_lib.toy.train import _timesteps
    torch.manual_seed(0)
    partner = torch.cat([torch.full((4,), -1), torch.arange(4), torch.full((56,), -1)])  # targets 4..7 of 0..3
    seen_low = False
    for _ in range(50):
        t = _timesteps(partner, 1000, "same", pair_min_t=700)
        assert torch.equal(t[:4], t[4:8]) and bool((t[4:8] >= 700).all()) and bool((t < 1000).all())
        seen_low |= bool((t[8:] < 700).any())
    assert seen_low, "rows outside pairs keep the whole range"
    differs = [not torch.equal(*_timesteps(partner, 1000, "independent", 700)[[0, 4]].split(1)) for _ in range(20)]
    assert any(differs)


def test_train_only_up_self_attention_changes_nothing_else(tmp_path):
    """--train-only up-self-attention: after training steps, only the up blocks' attn1 and norm1
    tensors differ from the starting weights; the text encoder and every other U-Net tensor are
    bit-identical in the exported EMA weights too (averaging a frozen tensor with itself drifts
    by rounding, which made a fine-tune's delta hold every tensor)."""
    from osa_lib.toy.model import build_toy_pipeline
    from osa_lib.toy.train import _trained_parameters, train
    source = build_toy_pipeline(seed=3)
    source.save_pretrained(tmp_path / "source")
    out = tmp_path / "model"
    train(steps=3, batch_size=8, out=out, seed=0, init_from=tmp_path / "source", pair_rate=0.5,
          train_only="up-self-attention", lr=1e-2, log_every=1)
    tuned = load_backbone("toy", model_id=str(out), device="cpu").pipe
    changed = {k for k, v in source.unet.state_dict().items() if not torch.equal(tuned.unet.state_dict()[k], v)}
    assert changed and all(k.startswith("up_blocks.") and (".attn1." in k or ".norm1." in k) for k in changed), changed
    for k, v in source.text_encoder.state_dict().items():
        assert torch.equal(tuned.text_encoder.state_dict()[k], v), k
    assert len(_trained_parameters(build_toy_pipeline(seed=0), "up-self-attention")) == 28  # 4 layers x 7 tensors
    with pytest.raises(ValueError, match="train_only"):
        _trained_parameters(build_toy_pipeline(seed=0), "everything")


def test_preservation_loss_is_the_mse_to_the_frozen_model_on_rows_without_a_reference(tmp_path):
    """--preserve: rows that see no reference are pulled towards the starting model's prediction,
    unweighted; rows with a reference are left out; and it needs the starting model."""
    from osa_lib.toy.model import build_toy_pipeline
    from osa_lib.toy.train import _preservation_loss, train
    teacher = build_toy_pipeline(seed=3)
    noisy = torch.randn(4, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 50, 500, 999])
    ids = teacher.tokenize(["a red circle in the snow", "a blue square", "", "a green diamond in the desert"])
    with torch.no_grad():
        own = teacher.unet(noisy, t, teacher.embed_ids(ids)).sample  # (4, 12, 16, 16)
    rows = torch.tensor([True, False, True, True])
    assert float(_preservation_loss(teacher, own, noisy, t, ids, rows)) == pytest.approx(0.0, abs=1e-10)  # 3 rows batch: rounding only
    moved = own.clone()
    moved[1] += 5.0  # a row with a reference: free to move
    moved[3] += 0.5
    assert float(_preservation_loss(teacher, moved, noisy, t, ids, rows)) == pytest.approx(0.25 / 3, rel=1e-5)
    assert float(_preservation_loss(teacher, moved, noisy, t, ids, torch.zeros(4, dtype=torch.bool))) == 0.0
    teacher.save_pretrained(tmp_path / "source")
    train(steps=2, batch_size=8, out=tmp_path / "model", seed=0, init_from=tmp_path / "source", pair_rate=0.5,
          train_only="up-self-attention", preserve=1.0, pair_reweight=16.0, log_every=1)
    with pytest.raises(ValueError, match="--init-from"):
        train(steps=1, batch_size=8, out=tmp_path / "other", preserve=1.0)


def test_preserve_from_holds_rows_at_the_named_model_not_at_the_start(tmp_path, monkeypatch):
    """A fine-tune continued from a rebuilt delta keeps the original model as its teacher."""
    from osa_lib.toy import train as training
    from osa_lib.toy.delta import weights_fingerprint
    from osa_lib.toy.model import build_toy_pipeline
    build_toy_pipeline(seed=3).save_pretrained(tmp_path / "start")
    original = build_toy_pipeline(seed=4)
    original.save_pretrained(tmp_path / "original")
    teachers = []
    monkeypatch.setattr(training, "_preservation_loss",
                        lambda teacher, prediction, *rest: teachers.append(weights_fingerprint(teacher)) or prediction.sum() * 0)
    training.train(steps=1, batch_size=8, out=tmp_path / "model", init_from=tmp_path / "start", pair_rate=0.5,
                   train_only="up-self-attention", preserve=1.0, preserve_from=tmp_path / "original")
    assert teachers == [weights_fingerprint(original)]


def test_guidance_is_tuned_on_validation_prompts_never_on_held_out_ones(toy, load_script):
    from osa_lib.toy import world
    from osa_lib.toy.model import DEFAULT_GUIDANCE
    tune = load_script("tune_guidance")
    for n in (1, 2):
        for prompt in tune.validation_prompts(n, 40, seed=n):
            parsed = world.parse_caption(prompt)
            chars, scene = parsed["characters"], parsed["scene"]
            assert len(chars) == n and all(c["colour"] for c in chars), prompt
            assert not any((c["colour"], c["shape"], scene) in world.HELD_OUT_TRIPLES for c in chars), prompt
    assert toy.default_guidance == DEFAULT_GUIDANCE


def test_shift_captions_moves_whole_captions_right_within_the_window():
    """Training-time caption shift: every caption keeps its tokens in order, moves right by at
    most max_shift slots with <pad> in front, never past the window; max_shift=0 changes nothing."""
    from osa_lib.toy.model import build_toy_pipeline
    from osa_lib.toy.train import shift_captions
    pipe = build_toy_pipeline(text_layers=0)
    ids = pipe.tokenize(["a red circle in the snow", "a red circle and a blue square and a green triangle in the night", ""])
    assert torch.equal(shift_captions(ids, 0), ids)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        shifted = shift_captions(ids, 3)
        for row, new in zip(ids, shifted):
            n = int((row != 0).sum())
            start = int((new != 0).nonzero()[0])
            seen.add(start)
            assert 0 <= start <= 3 and torch.equal(new[start:start + n], row[:n]) and int((new != 0).sum()) == n
        assert torch.equal(shifted[1], ids[1]), "a caption that fills the window cannot move"
    assert seen == {0, 1, 2, 3}


def test_heads_sets_every_unet_attention_to_that_many_heads():
    from osa_lib.toy.model import build_toy_pipeline
    unet = build_toy_pipeline(text_layers=0, text_blocks="up", heads=1).unet
    attentions = [m for n, m in unet.named_modules() if n.endswith(("attn1", "attn2"))]
    assert attentions and all(a.heads == 1 for a in attentions)


def test_text_dim_sets_the_text_width_and_the_unets_cross_attention_width():
    from osa_lib.toy.model import build_toy_pipeline
    pipe = build_toy_pipeline(text_layers=1, text_blocks="up", heads=1, text_dim=8)
    assert pipe.unet.config.cross_attention_dim == 8
    assert pipe.encode_prompt(["a red circle in the snow"]).shape == (1, MAX_TOKENS, 8)
    assert build_toy_pipeline(text_layers=0).text_encoder.config.hidden_size == 128, "default unchanged"


def test_phrase_wise_encoding_keeps_each_characters_tokens_to_its_own_phrase(tmp_path):
    """phrase_wise: a character's token states depend on its own phrase only (changing the other
    character changes nothing), equal the phrase encoded alone, and the flag survives a save."""
    from osa_lib.toy.model import ToyPipeline, build_toy_pipeline
    pipe = build_toy_pipeline(text_layers=1, phrase_wise=True)
    one, two = pipe.encode_prompt(["a red circle and a blue square in the snow",
                                   "a red circle and a green diamond in the snow"])
    assert torch.allclose(one[:4], two[:4]) and torch.allclose(one[8:], two[8:]), "phrase 1, scene, eos, pads"
    assert not torch.allclose(one[4:8], two[4:8])
    alone = pipe.text_encoder(pipe.tokenize(["a red circle"])[:, :4]).last_hidden_state[0]
    assert torch.allclose(one[:4], alone, atol=1e-6)
    pipe.save_pretrained(tmp_path / "p")
    assert ToyPipeline.from_pretrained(tmp_path / "p").config.phrase_wise is True
    plain = build_toy_pipeline(text_layers=1, phrase_wise=False)
    a, b = plain.encode_prompt(["a red circle and a blue square in the snow", "a red circle and a green diamond in the snow"])
    assert not torch.allclose(a[8:], b[8:]), "the plain causal encoder lets later tokens see every phrase"


def test_a_phrase_wise_up_only_model_trains_saves_and_samples(tmp_path):
    from osa_lib.toy.train import train
    out = tmp_path / "model"
    train(steps=2, batch_size=2, out=out, seed=0, text_layers=1, text_blocks="up", phrase_wise=True, save_every=1)
    backbone = load_backbone("toy", model_id=str(out), device="cpu")
    assert backbone.pipe.config.phrase_wise is True
    assert backbone.generate(["a red circle and a blue square in the snow"], [0], num_inference_steps=2,
                             progress=False).shape == (1, 32, 32, 3)


def test_continuing_a_run_with_other_architecture_flags_is_a_clear_error(tmp_path):
    from osa_lib.toy.train import train
    out = tmp_path / "model"
    flags = dict(batch_size=2, out=out, seed=0, text_layers=1, text_blocks="up", save_every=1)
    train(steps=1, phrase_wise=True, **flags)
    # neither phrase-wise encoding nor the head count changes a tensor shape
    with pytest.raises(ValueError, match="phrase_wise: saved True, flags ask False"):
        train(steps=2, phrase_wise=False, **flags)
    with pytest.raises(ValueError, match="attention_head_dim: saved 4, flags ask 1"):
        train(steps=2, phrase_wise=True, heads=1, **flags)
    train(steps=2, phrase_wise=True, **flags)  # the same flags continue it
    assert torch.load(tmp_path / "model_ckpt" / "state.pt", weights_only=False)["step"] == 2


def test_uncoloured_drawing_is_measured_on_the_single_prompts_and_seeds_without_their_colour(monkeypatch):
    """issue 13's drawing target: uncoloured prompts are the held-out single-character prompts
    with the colour word dropped, on the same seeds, and the report sets the two rates side by side."""
    from osa_lib.toy import world
    from osa_lib.toy.probes import evaluate
    calls = []

    def fake_batched(backbone, prompts, seeds, batch_size, **kwargs):
        calls.append((list(prompts), list(seeds)))
        return np.zeros((len(prompts), 32, 32, 3))

    monkeypatch.setattr(evaluate, "_batched", fake_batched)
    monkeypatch.setattr(evaluate, "generate_with_maps", lambda *a, **k: None)
    monkeypatch.setattr(evaluate, "mask_iou_records", lambda run: [])
    result = evaluate.evaluate_model(None, seeds_per_prompt=2, n_two=2, no_colour_seeds=1, progress=False)
    (singles, single_seeds), (uncoloured, uncoloured_seeds) = calls[0], calls[2]
    assert uncoloured_seeds == single_seeds and len(uncoloured) == len(singles) == 2 * len(world.HELD_OUT_TRIPLES)
    for coloured, plain in zip(singles, uncoloured):
        colour = world.parse_caption(coloured)["characters"][0]["colour"]
        assert plain == coloured.replace(f" {colour} ", " ") and world.parse_caption(plain)["characters"][0]["colour"] is None
    assert result["uncoloured"] == {"n_images": len(uncoloured), "character_found": 0.0}  # blank images: nothing drawn
    assert "colour word dropped: named shape drawn" in evaluate.format_report(
        {**result, "mask_iou": {"mean": 0.5, "n_scored": 1, "n_characters": 1},
         "mask_iou_single": {"mean": 0.5, "n_scored": 1, "n_characters": 1}})
