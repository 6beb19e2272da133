"""The backbone interface on the tiny random SDXL (offline): generation, seeding, token lookup, errors."""
import numpy as np
import pytest
import torch

from osa_lib.backbones import BACKBONES, _TINY_WORDS, load_backbone

STEPS = 2  # enough to exercise the sampler loop; the tiny model's default is 4


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("sdxl-tiny", device="cpu")


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
    with pytest.raises(ValueError, match=r"word 'cat' is at token \d+ .* reads only the first 77 tokens"):
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
