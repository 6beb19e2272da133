"""Locating characters in finished images the same way for every method (``osa_lib.locate``)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from osa_lib.backbones import load_backbone
from osa_lib.generation import METHODS, generate_story
from osa_lib.locate import box_iou, locate_characters, owlv2_detector
from osa_lib.sdxl_metrics import MissingWeightsError, mask_box
from osa_lib.story import load_story
from osa_lib.toy.metrics import read_scene

STORY = Path(__file__).resolve().parents[1] / "data" / "stories" / "toy_two_contrasting.yaml"


@pytest.fixture(scope="module")
def toy():
    return load_backbone("toy", device="cpu")


@pytest.fixture(scope="module")
def drawn(toy):
    story = load_story(STORY)
    return story, {m: generate_story(toy, story, m, progress=False) for m in METHODS}


def test_neutral_boxes_match_the_analyzers_on_two_character_scenes_for_every_method(toy, drawn):
    """Each method's final images, located by one unmodified U-Net pass: the boxes overlap the
    analyzer's boxes of the drawn characters by IoU ≥ 0.6 on average, for every method."""
    story, results = drawn
    for method, result in results.items():
        ious = []
        for scene, drawn_scene in zip(story.scenes, result.scenes):
            assert len(scene.characters) == 2
            truth = read_scene(story, scene, drawn_scene.image)
            located = locate_characters(toy, drawn_scene.image, drawn_scene.prompt,
                                        [story.characters[n].word for n in scene.characters])
            for name, box in zip(scene.characters, located.boxes):
                if truth[name] is not None:  # a character the model did not draw has no true box
                    ious.append(0.0 if box is None else box_iou(box, mask_box(truth[name].mask, (32, 32))))
        assert len(ious) >= 5, (method, ious)
        assert np.mean(ious) >= 0.6, (method, np.round(ious, 2))


def test_locating_reads_the_image_not_the_method(toy, drawn):
    """The same image and prompt give the same boxes, and the U-Net's processors are left as they were."""
    story, results = drawn
    scene = results["isolated"].scenes[0]
    words = [story.characters[n].word for n in scene.characters]
    before = dict(toy.unet.attn_processors)
    first = locate_characters(toy, scene.image, scene.prompt, words)
    assert locate_characters(toy, scene.image.copy(), scene.prompt, words).boxes == first.boxes
    assert dict(toy.unet.attn_processors) == before
    assert first.found == sum(b is not None for b in first.boxes)
    assert len(first.reasons) == 2 and all(r == "" for r, b in zip(first.reasons, first.boxes) if b)


def test_encode_pixels_inverts_decode(toy, tiny):
    latents = torch.randn(1, *toy.latent_shape).clamp(-1, 1)
    assert torch.allclose(toy.encode_pixels(toy.decode_pixels(latents)), latents, atol=1e-6)
    assert tiny.encode_pixels(torch.rand(1, 3, 32, 32)).shape == (1, *tiny.latent_shape)


def test_a_detector_replaces_the_unet_and_must_answer_every_word(toy, drawn):
    story, results = drawn
    scene = results["vanilla"].scenes[0]
    located = locate_characters(toy, scene.image, scene.prompt, ["square", "triangle"],
                                detector=lambda image, words: [(1, 2, 10, 12), None])
    assert located.boxes == [(1, 2, 10, 12), None] and located.found == 1
    assert located.reasons == ["", "the detector found nothing"]
    with pytest.raises(ValueError, match="the detector returned 1 boxes for 2 words"):
        locate_characters(toy, scene.image, scene.prompt, ["square", "triangle"], detector=lambda i, w: [None])
    with pytest.raises(ValueError, match=r"strengths=\(1.5,\) must be one or more numbers in \(0, 1\)"):
        locate_characters(toy, scene.image, scene.prompt, ["square"], strengths=(1.5,))


def test_owlv2_without_weights_says_how_to_get_them(tmp_path):
    with pytest.raises(MissingWeightsError, match="OWLv2 weights .* are not on this machine.*huggingface-cli download"):
        owlv2_detector(str(tmp_path / "no-owlv2"))
