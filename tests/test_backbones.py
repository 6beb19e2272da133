"""The backbone interface on the tiny random SDXL (offline): generation, seeding, token lookup, errors."""
import numpy as np
import pytest
import torch

from osa_lib.backbones import BACKBONES, load_backbone
from osa_lib.testing import _TINY_WORDS

STEPS = 2  # enough to exercise the sampler loop; the tiny model's default is 4


def test_generate_shape_and_range(tiny):
    images = tiny.generate(["a girl in the park", "a boy on the beach"], [0, 1], num_inference_steps=STEPS,
                           progress=False)
    c, h, w = tiny.latent_shape
    size = h * tiny.pipe.vae_scale_factor
    assert images.shape == (2, size, size, 3)
    assert images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert np.isfinite(images).all()
    assert images.std() > 0  # not a constant image


def test_seeds_make_generation_reproducible(tiny):
    kwargs = dict(num_inference_steps=STEPS, progress=False)
    first = tiny.generate(["a girl in the park"], [3], **kwargs)
    again = tiny.generate(["a girl in the park"], [3], **kwargs)
    other = tiny.generate(["a girl in the park"], [4], **kwargs)
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_generate_needs_one_seed_per_prompt(tiny):
    with pytest.raises(ValueError, match="one seed per prompt"):
        tiny.generate(["a girl", "a boy"], [0])


def test_initial_latents_depend_only_on_each_seed(tiny):
    batch = tiny.initial_latents([1, 2])
    one, two = tiny.initial_latents([1]), tiny.initial_latents([2])
    assert batch.shape == (2, *tiny.latent_shape)
    assert torch.equal(batch[0], one[0]) and torch.equal(batch[1], two[0])
    assert not torch.equal(one, two)
    # order within the batch does not matter either
    assert torch.equal(tiny.initial_latents([2, 1])[0], two[0])


def test_token_positions_single_token_word(tiny):
    prompt = "a girl reading a book in the park"
    ids = tiny.tokenizer(prompt).input_ids
    positions = tiny.token_positions(prompt, "girl")
    assert len(positions) == 1
    assert tiny.tokenizer.convert_ids_to_tokens([ids[positions[0]]]) == ["girl</w>"]
    # every occurrence is found
    assert len(tiny.token_positions("a girl and a girl", "girl")) == 2


def test_token_positions_multi_token_word(tiny):
    word = "zebra"
    assert word not in _TINY_WORDS  # so the tiny BPE splits it into several tokens
    prompt = "a zebra in the park"
    word_ids = tiny.tokenizer(word, add_special_tokens=False).input_ids
    assert len(word_ids) > 1
    positions = tiny.token_positions(prompt, word)
    ids = tiny.tokenizer(prompt).input_ids
    assert len(positions) == len(word_ids)
    assert positions == list(range(positions[0], positions[0] + len(word_ids)))  # contiguous
    assert [ids[p] for p in positions] == word_ids


def test_token_positions_match_whole_words_only(tiny):
    """A word's tokens that happen to end another word ("a" ends "zebra", "boy" ends "cowboy")
    are not that word: T_m must only hold the character's own tokens."""
    ids = tiny.tokenizer("a zebra").input_ids
    tokens = tiny.tokenizer.convert_ids_to_tokens(ids)
    assert tokens.count("a</w>") == 2  # the article and the last piece of "zebra"
    assert tiny.token_positions("a zebra", "a") == [1]
    assert tiny.token_positions("a boy and a cowboy", "boy") == [2]


def test_token_positions_missing_word_names_it(tiny):
    with pytest.raises(ValueError, match="'dragon'") as info:
        tiny.token_positions("a girl in the park", "dragon")
    assert "a girl in the park" in str(info.value)


def test_unknown_backbone_lists_accepted_names():
    with pytest.raises(ValueError, match="unknown backbone 'sd15'") as info:
        load_backbone("sd15", device="cpu")
    for name in BACKBONES:
        assert repr(name) in str(info.value)


def test_toy_without_model_index_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json") as info:
        load_backbone("toy", model_id=str(tmp_path), device="cpu")
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("model_id", ["/nonexistent/sdxl", "nonexistent-user/nonexistent-sdxl"])
def test_sdxl_missing_model_is_runtime_error(monkeypatch, model_id):
    # never touch the network: a hub-shaped id must fail fast too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="could not load SDXL") as info:
        load_backbone("sdxl", model_id=model_id, device="cpu")
    message = str(info.value)
    assert model_id in message
    assert "local folder" in message and "load_backbone('toy')" in message


# --- bad inputs stop before the U-Net runs (issue 15) -------------------------------------------
@pytest.mark.parametrize("steps", [-1, 0, "4", 2.0, True])
def test_bad_step_count_is_refused_before_the_unet_runs(tiny, steps):
    calls = []
    hook = tiny.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=rf"num_inference_steps={steps!r} is not accepted: .*positive integer"):
            tiny.generate(["a girl in the park"], [0], num_inference_steps=steps, progress=False)
        with pytest.raises(ValueError, match="num_inference_steps"):
            tiny.denoise(tiny.encode(["a girl in the park"]), tiny.initial_latents([0]), steps, progress=False)
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.parametrize("seed", [True, -1, 2 ** 64, 1.0, "7"])
def test_bad_seed_is_refused(tiny, seed):
    with pytest.raises(ValueError, match=r"seed=.* is not accepted: a seed is an integer in \[0, 2\*\*64\)"):
        tiny.initial_latents([seed])
    tiny.initial_latents([2 ** 64 - 1, np.int64(3)])  # the whole range, numpy ints included


def test_subject_word_past_the_text_encoders_length_is_refused(tiny):
    prompt = "a girl " + "in the park " * 30 + "and a cat"  # 'cat' lies past token 77
    assert len(tiny.tokenizer(prompt).input_ids) > 77
    with pytest.raises(ValueError, match=r"word 'cat' is at token \d+ .* reads only tokens 1 to 75 .*first 77 tokens"):
        tiny.token_positions(prompt, "cat")
    assert tiny.token_positions(prompt, "girl") == [2]


def test_toy_prompts_are_normalised_like_sdxls_tokenizer():
    toy = load_backbone("toy", device="cpu")
    plain = "a red circle in the meadow"
    assert toy.token_positions("A Red Circle, in the Meadow.", "Circle") == toy.token_positions(plain, "circle")
    kwargs = dict(num_inference_steps=2, progress=False)
    images = toy.generate([plain, "A Red Circle in the Meadow", "a red circle, in the meadow."], [5, 5, 5], **kwargs)
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    assert not np.array_equal(images[0], toy.generate(["a blue circle in the meadow"], [5], **kwargs)[0])


# --- stock SDXL behaviour (issue 14, item 2) -------------------------------------------------
def _stock(tiny):
    """diffusers' own StableDiffusionXLPipeline over the same tiny components (no watermark)."""
    from diffusers import StableDiffusionXLPipeline
    components = {k: v for k, v in tiny.pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    stock = StableDiffusionXLPipeline(**components, add_watermarker=False,
                                      force_zeros_for_empty_prompt=tiny.pipe.config.force_zeros_for_empty_prompt)
    stock.set_progress_bar_config(disable=True)
    return stock


@pytest.mark.parametrize("negative_prompt", ["", "blurry"])
def test_vanilla_equals_stock_pipeline(tiny, negative_prompt):
    """Same seed, steps, guidance and size: this code's vanilla image is the stock pipeline's,
    including the zero negative embeddings of force_zeros_for_empty_prompt."""
    prompt, seed, guidance = "a girl in the park", 3, 5.0
    latents = tiny.initial_latents([seed])
    ours = tiny.decode(tiny.denoise(tiny.encode([prompt], negative_prompt=negative_prompt), latents,
                                    num_inference_steps=STEPS, guidance_scale=guidance, progress=False))
    size = tiny.latent_shape[1] * tiny.pipe.vae_scale_factor
    stock = _stock(tiny)(prompt, negative_prompt=negative_prompt or None, num_inference_steps=STEPS,
                         guidance_scale=guidance, latents=latents.clone(), height=size, width=size,
                         output_type="np").images
    assert ours.shape == stock.shape
    assert np.abs(ours - stock).max() < 1e-6


def test_empty_negative_prompt_is_zeros_when_the_model_asks(tiny):
    assert tiny.pipe.config.force_zeros_for_empty_prompt
    cond = tiny.encode(["a girl in the park"])
    assert torch.count_nonzero(cond.hidden[0]) == 0 and torch.count_nonzero(cond.added["text_embeds"][0]) == 0
    assert torch.count_nonzero(tiny.encode(["a girl"], negative_prompt="blurry").hidden[0]) > 0


def test_fp16_vae_decodes_in_fp32_and_returns_to_fp16(monkeypatch):
    tiny16 = load_backbone("sdxl-tiny", device="cpu")
    vae = tiny16.pipe.vae.to(torch.float16)
    assert vae.config.force_upcast
    seen = []
    original = type(vae).decode

    def spy(self, z, *args, **kwargs):
        seen.append((z.dtype, self.dtype))
        return original(self, z, *args, **kwargs)
    monkeypatch.setattr(type(vae), "decode", spy)
    images = tiny16.decode(torch.randn(1, *tiny16.latent_shape, dtype=torch.float16))
    assert seen == [(torch.float32, torch.float32)]
    assert vae.dtype == torch.float16 and np.isfinite(images).all()


def test_nan_image_raises_and_says_why(tiny):
    latents = torch.full((1, *tiny.latent_shape), float("nan"))
    from osa_lib.backbones import NonFiniteImageError
    with pytest.raises(NonFiniteImageError, match="fp16 VAE overflowing") as info:
        tiny.decode(latents)
    assert "force_upcast" in str(info.value) and "float32" in str(info.value)
    assert np.isnan(tiny.decode(latents, check_finite=False)).any()


def test_cpu_offload_needs_an_accelerator():
    with pytest.raises(ValueError, match="device='cuda'"):
        load_backbone("sdxl-tiny", device="cpu", cpu_offload=True)


def test_sdxl_random_configs_are_sdxl_base():
    """The written-out configs build SDXL base's layer structure (on the meta device: no memory)."""
    import json

    from diffusers import UNet2DConditionModel

    from osa_lib.attention import find_attention_layers
    from osa_lib.backbones import SDXL_RANDOM_DIR, SDXL_UNET_CONFIG
    config = json.loads((SDXL_RANDOM_DIR / "unet" / "config.json").read_text())
    for key, value in SDXL_UNET_CONFIG.items():
        assert config[key] == (list(value) if isinstance(value, tuple) else value), key
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base U-Net
    up_self = find_attention_layers(unet, kind="self", places=("up",))
    assert len(up_self) == 36  # 3 x 10 blocks at 32², 3 x 2 at 64² (1024² images)


def _toy_folder_with(tmp_path, isolation: str | None):
    """A toy model folder: the shipped model's files linked in, ``isolation.json`` as given."""
    from osa_lib.toy.model import DEFAULT_MODEL_DIR
    folder = tmp_path / "toy"
    folder.mkdir(parents=True)
    for entry in DEFAULT_MODEL_DIR.iterdir():
        if entry.name != "isolation.json":
            (folder / entry.name).symlink_to(entry)
    if isolation is not None:
        (folder / "isolation.json").write_text(isolation)
    return folder


def test_the_paper_switches_are_the_default_and_a_folders_tuned_ones_a_labelled_variant(tmp_path):
    from osa_lib import IsolationConfig, generate_story
    from osa_lib.story import Story, StoryCharacter, StoryScene
    folder = _toy_folder_with(tmp_path, '{"defaults": {"reweight": 8.0, "warmup": 0.0}, "why": "test"}')
    backbone = load_backbone("toy", model_id=str(folder), device="cpu")
    assert backbone.tuned_isolation == {"reweight": 8.0, "warmup": 0.0}
    assert backbone.isolation_config() == IsolationConfig()  # the paper's, whatever the folder tunes
    assert backbone.isolation_config(tuned=True) == IsolationConfig(reweight=8.0, warmup=0.0)
    assert backbone.isolation_config(tuned=True, reweight=0.0, lam=0.5) == IsolationConfig(reweight=0.0, warmup=0.0, lam=0.5)
    plain = load_backbone("toy", model_id=str(_toy_folder_with(tmp_path / "plain", None)), device="cpu")
    assert plain.tuned_isolation == {} and plain.isolation_config() == IsolationConfig()
    with pytest.raises(ValueError, match="no tuned isolation switches"):
        plain.isolation_config(tuned=True)
    # generate_story without a config runs with the paper's switches, not the tuned ones
    story = Story({"Orb": StoryCharacter("Orb", "circle", "a circle")},
                  [StoryScene("a circle in the snow", ["Orb"], 1), StoryScene("a circle in the night", ["Orb"], 2)])

    def run(config):  # the returning scene's image
        return generate_story(backbone, story, "isolated", config=config, num_inference_steps=5, progress=False).scenes[1].image
    assert np.array_equal(run(None), run(IsolationConfig()))
    assert not np.array_equal(run(None), run(backbone.isolation_config(tuned=True)))


@pytest.mark.parametrize("text, problem", [("{not json", "JSONDecodeError"), ('{"why": "no defaults"}', "KeyError"),
                                           ('{"defaults": {"reweigh": 2}}', "TypeError"),
                                           ('{"defaults": {"warmup": 1.5}}', "warmup=1.5")])
def test_bad_isolation_defaults_file_names_itself_and_the_fix(tmp_path, text, problem):
    folder = _toy_folder_with(tmp_path, text)
    with pytest.raises(ValueError, match=problem) as info:
        load_backbone("toy", model_id=str(folder), device="cpu")
    assert str(folder / "isolation.json") in str(info.value) and "delete it" in str(info.value)
