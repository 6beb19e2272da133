"""SDXL metrics on a tiny random CLIP (offline): shapes, ranges, crops, clear errors when weights are missing."""
import sys

import numpy as np
import pytest
import torch

from osa_lib.backbones import build_tiny_clip_tokenizer
from osa_lib.sdxl_metrics import (AestheticPredictor, ClipScorer, MissingWeightsError, crop_character, mask_box,
                                  dreamsim_similarity, identity_similarity, square_crop, story_metrics)

PROJ = 16  # tiny CLIP's embedding size D


def _tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_tiny_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJ))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine waiting threads make them 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scorer(one_thread):
    model, processor = _tiny_clip()
    return ClipScorer(device="cpu", model=model, processor=processor)


def _images(n, seed=0, size=40):
    return list(np.random.default_rng(seed).random((n, size, size + 8, 3), dtype=np.float32))


def test_embeddings_are_unit_norm_with_shape_b_d(scorer):
    img = scorer.image_embeddings(_images(3))
    txt = scorer.text_embeddings(["a girl in the park", "a boy", "a cat on the beach"])
    assert img.shape == (3, PROJ) and txt.shape == (3, PROJ)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_uint8_and_float_images_embed_alike(scorer):
    floats = _images(2)
    uint8 = [np.round(x * 255).astype(np.uint8) for x in floats]
    assert torch.allclose(scorer.image_embeddings(floats), scorer.image_embeddings(uint8), atol=1e-5)


def test_float_images_outside_0_1_are_rejected(scorer):
    with pytest.raises(ValueError, match="pass uint8"):
        scorer.image_embeddings([np.full((32, 32, 3), 200.0)])


def test_text_image_similarity_is_a_clip_score_in_0_100(scorer):
    tis = scorer.text_image_similarity(_images(3), ["a girl", "a boy", "a cat"])
    assert tis.shape == (3,)
    assert np.all((tis >= 0) & (tis <= 100))
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.text_image_similarity(_images(2), ["a girl"])


def test_identical_crops_have_identity_similarity_100(scorer):
    crop = _images(1)[0]
    iis = identity_similarity(scorer, {"girl": [crop, crop.copy(), crop.copy()], "boy": [crop]})  # boy skipped
    assert iis == pytest.approx(100.0, abs=1e-3)
    different = identity_similarity(scorer, {"girl": _images(3, seed=1)})
    assert np.isfinite(different) and different <= 100 + 1e-3


def test_identity_similarity_needs_a_character_with_two_crops(scorer):
    with pytest.raises(ValueError, match="2 or more crops"):
        identity_similarity(scorer, {"girl": _images(1), "boy": []})


def test_crop_character_upsamples_a_low_res_mask_and_adds_margin():
    image = np.arange(64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 4:6] = True  # image rows 16:32, cols 32:48 after 8x nearest upsampling
    assert mask_box(mask, (64, 64)) == (16, 32, 32, 48)
    assert np.array_equal(crop_character(image, mask, margin=0.0), image[16:32, 32:48])
    assert np.array_equal(crop_character(image, torch.from_numpy(mask), margin=0.25), image[12:36, 28:52])


def test_crops_are_square_and_padded_with_the_mean_colour_past_the_border():
    image = np.arange(64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)
    mean = image.reshape(-1, 3).mean(0)
    tall = square_crop(image, (8, 30, 40, 38), margin=0.0)  # 32 rows, 8 columns: a tall character
    assert tall.shape == (32, 32, 3)
    assert np.array_equal(tall, image[8:40, 18:50])  # widened around its centre column 34
    edge = square_crop(image, (0, 56, 16, 64), margin=0.0)  # 16 × 8 at the right border
    assert edge.shape == (16, 16, 3)
    assert np.array_equal(edge[:, :12], image[0:16, 52:64]) and np.allclose(edge[:, 12:], mean)
    assert crop_character(image, np.ones((8, 8), bool), margin=0.5).shape == (128, 128, 3)  # never shrunk to fit
    with pytest.raises(ValueError, match=r"box \(4, 4, 4, 9\) is empty"):
        square_crop(image, (4, 4, 4, 9))


def test_crop_character_rejects_an_empty_mask():
    with pytest.raises(ValueError, match="empty mask"):
        crop_character(np.zeros((16, 16, 3)), np.zeros((4, 4), bool))


def test_aesthetic_predictor_loads_from_file_and_scores(scorer, tmp_path):
    torch.manual_seed(0)
    head = AestheticPredictor(input_size=PROJ)
    torch.save(head.state_dict(), tmp_path / "aesthetic.pth")  # keys layers.0 ... layers.7, as the original
    loaded = AestheticPredictor.from_file(tmp_path / "aesthetic.pth", scorer)
    scores = loaded.score(_images(3))
    assert scores.shape == (3,) and np.isfinite(scores).all()
    with torch.no_grad():
        expected = head.eval()(scorer.image_embeddings(_images(3))).numpy()
    assert np.allclose(scores, expected, atol=1e-5)

    from safetensors.torch import save_file
    save_file(head.state_dict(), str(tmp_path / "aesthetic.safetensors"))
    assert np.allclose(AestheticPredictor.from_file(tmp_path / "aesthetic.safetensors", scorer).score(_images(3)),
                       scores, atol=1e-5)


def test_aesthetic_predictor_rejects_a_clip_of_another_size(scorer, tmp_path):
    torch.save(AestheticPredictor(input_size=8).state_dict(), tmp_path / "aesthetic.pth")
    with pytest.raises(ValueError, match="8-d CLIP embeddings"):
        AestheticPredictor.from_file(tmp_path / "aesthetic.pth", scorer)


def test_missing_aesthetic_weights_say_where_to_get_them(scorer, tmp_path):
    with pytest.raises(MissingWeightsError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        AestheticPredictor.from_file(tmp_path / "nope.pth", scorer)


def test_clip_scorer_loads_a_local_folder(scorer, tmp_path):
    scorer.model.save_pretrained(tmp_path)
    scorer.processor.save_pretrained(tmp_path)
    loaded = ClipScorer(str(tmp_path), device="cpu")
    assert torch.allclose(loaded.image_embeddings(_images(2)), scorer.image_embeddings(_images(2)), atol=1e-5)


def test_missing_clip_weights_raise_missing_weights_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="openai/clip-vit-large-patch14"):
        ClipScorer("/nonexistent/clip", device="cpu")
    with pytest.raises(MissingWeightsError, match="pass its folder"):
        ClipScorer(str(tmp_path), device="cpu")  # an existing but empty folder


def test_dreamsim_missing_raises_missing_weights_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dreamsim", None)  # `import dreamsim` now fails even if installed
    with pytest.raises(MissingWeightsError, match="pip install dreamsim"):
        dreamsim_similarity(_images(1), _images(1, seed=1), device="cpu")


def test_dreamsim_similarity_is_100_times_one_minus_distance():
    def preprocess(pil):  # stands in for DreamSim's resize-to-224 transform
        return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # (1, 3, H, W)

    def model(x, y):  # a distance: 0 for identical images
        return (x - y).abs().mean().reshape(1)

    a = _images(2)
    ds = dreamsim_similarity(a, [a[0], _images(1, seed=5)[0]], device="cpu", model=model, preprocess=preprocess)
    assert ds.shape == (2,)
    assert ds[0] == pytest.approx(100.0) and ds[1] < 100


def test_story_metrics_reports_what_it_did_not_compute(scorer, tmp_path):
    images = _images(2)
    out = story_metrics(images, ["a girl", "a girl and a boy"], {"girl": images}, scorer)
    assert set(out) == {"TIS", "IIS", "note"}
    assert 0 <= out["TIS"] <= 100 and np.isfinite(out["IIS"])
    assert "AQ not computed" in out["note"] and "DS" in out["note"]

    torch.save(AestheticPredictor(input_size=PROJ).state_dict(), tmp_path / "a.pth")
    head = AestheticPredictor.from_file(tmp_path / "a.pth", scorer)
    out = story_metrics(images, ["a girl", "a boy"], {"girl": images[:1]}, scorer, aesthetic=head)
    assert set(out) == {"TIS", "AQ", "note"} and "IIS not computed" in out["note"]


# --- each metric against its formula, written out by hand ---------------------------------------
class _TableScorer(ClipScorer):
    """A ClipScorer whose embeddings are a known table: image k is the image filled with k / 10,
    prompt k is ``PROMPTS[k]``; the random tiny CLIP gives every pair a negative cosine, which the
    CLIP score clamps to 0, so it cannot show which prompt an image was paired with."""

    PROMPTS = ["a girl in the park", "a boy on the beach", "a cat in the snow", "a dog with a book"]

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.img = torch.nn.functional.normalize(torch.rand(4, PROJ, generator=g) + 0.2, dim=-1)
        self.txt = torch.nn.functional.normalize(torch.rand(4, PROJ, generator=g) + 0.2, dim=-1)
        self.txt[3] = -self.img[3]  # one pair with a negative cosine: its CLIP score is 0

    def image_embeddings(self, images):
        return self.img[[int(round(float(np.asarray(x)[0, 0, 0]) * 10)) for x in images]]

    def text_embeddings(self, prompts):
        return self.txt[[self.PROMPTS.index(p) for p in prompts]]


def test_tis_pairs_each_image_with_its_own_prompt(scorer):
    table = _TableScorer()
    images = [np.full((8, 8, 3), k / 10, dtype=np.float32) for k in range(4)]
    prompts = table.PROMPTS
    expected = [100 * max(float(table.img[i] @ table.txt[i]), 0.0) for i in range(4)]  # pair i only
    assert np.allclose(table.text_image_similarity(images, prompts), expected, atol=1e-4)
    assert expected[3] == 0 and min(expected[:3]) > 50
    order = [2, 0, 3, 1]
    shuffled = table.text_image_similarity([images[k] for k in order], [prompts[k] for k in order])
    assert np.allclose(shuffled, [expected[k] for k in order], atol=1e-4)
    # the real (tiny) CLIP: the same formula through its own embeddings
    real_images = _images(4, seed=3)
    img, txt = scorer.image_embeddings(real_images), scorer.text_embeddings(prompts)
    assert np.allclose(scorer.text_image_similarity(real_images, prompts),
                       [100 * max(float(img[i] @ txt[i]), 0.0) for i in range(4)], atol=1e-4)


def test_iis_uses_each_pair_of_different_crops_once(scorer):
    from itertools import combinations

    girl, boy = _images(4, seed=7), _images(2, seed=8)
    iis = identity_similarity(scorer, {"girl": girl, "boy": boy, "cat": _images(1, seed=9)})  # cat: no pair
    per_character = []
    for crops in (girl, boy):
        emb = scorer.image_embeddings(crops)
        pairs = [100 * float(emb[i] @ emb[j]) for i, j in combinations(range(len(crops)), 2)]
        assert len(pairs) == len(crops) * (len(crops) - 1) // 2
        per_character.append(np.mean(pairs))
    assert iis == pytest.approx(np.mean(per_character), abs=1e-4)  # each character weighs the same


def test_dreamsim_similarity_is_exactly_100_times_one_minus_distance():
    def preprocess(pil):
        return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None]

    def model(x, y):
        return (x - y).abs().mean().reshape(1)

    a, b = _images(3, seed=1), _images(3, seed=2)
    ds = dreamsim_similarity(a, b, device="cpu", model=model, preprocess=preprocess)
    d = [float(model(preprocess(_pil(x)), preprocess(_pil(y)))) for x, y in zip(a, b)]
    assert np.allclose(ds, [100 * (1 - v) for v in d], atol=1e-4)


def _pil(image):
    from PIL import Image
    return Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))


def test_crop_margin_follows_the_boxs_longer_side():
    image = np.arange(64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)
    mask = np.zeros((64, 64), bool)
    mask[12:36, 20:44] = True  # 24 × 24
    assert np.array_equal(crop_character(image, mask, margin=0.25), image[6:42, 14:50])  # 6 more on each side
