"""The toy world: deterministic rendering, ground truth that matches the pixels, the grammar."""
import numpy as np
import pytest

from osa_lib.toy import world
from osa_lib.toy.world import ToyGrammarError, parse_caption, sample_scene


def test_same_seed_same_scene_and_rules_hold():
    a, b = sample_scene(np.random.default_rng(7)), sample_scene(np.random.default_rng(7))
    assert a.caption == b.caption and np.array_equal(a.image, b.image)
    rng = np.random.default_rng(0)
    for _ in range(60):
        s = sample_scene(rng)
        shapes = [c.shape for c in s.characters]
        colours = [c.colour for c in s.characters]
        assert len(set(shapes)) == len(shapes) and len(set(colours)) == len(colours)
        assert s.masks.shape == (len(s.characters), 32, 32)
        assert not (s.masks.sum(0) > 1).any(), "visible masks are disjoint"
        assert parse_caption(s.caption)["scene"] == s.scene


def test_mask_pixels_carry_the_character_colour():
    scene = sample_scene(np.random.default_rng(3), n_characters=2, relation="overlapping")
    for c, mask in zip(scene.characters, scene.masks):
        body = scene.image[mask].astype(int)
        share = np.mean(np.abs(body - np.array(c.rgb)).sum(1) < 30)
        assert share > 0.6, "most visible pixels are the body colour (the rest is the mark)"


@pytest.mark.parametrize("relation", world.RELATIONS)
def test_relations(relation):
    rng = np.random.default_rng(11)
    for _ in range(5):
        s = sample_scene(rng, n_characters=2, relation=relation)
        bodies = [world.shape_mask(c.shape, c.center, c.size) for c in s.characters]
        overlap = (bodies[0] & bodies[1]).sum()
        if relation == "overlapping":
            assert overlap > 0
        else:
            assert overlap == 0


def test_held_out_triples_are_never_sampled_when_excluded():
    rng = np.random.default_rng(5)
    for _ in range(200):
        s = sample_scene(rng, exclude=world.HELD_OUT_TRIPLES)
        assert not any((c.colour, c.shape, s.scene) in world.HELD_OUT_TRIPLES for c in s.characters)


def test_grammar_errors_name_the_problem():
    with pytest.raises(ToyGrammarError, match="unknown word.*'dragon'"):
        parse_caption("a red dragon in the snow")
    with pytest.raises(ToyGrammarError, match="in the <scene>"):
        parse_caption("a red circle")
    with pytest.raises(ToyGrammarError, match="names a shape twice"):
        parse_caption("a red circle and a blue circle in the snow")
    with pytest.raises(ToyGrammarError, match="cannot read character"):
        parse_caption("a red and a circle in the snow")
    assert parse_caption("a red circle", id_prompt=True)["characters"] == [{"shape": "circle", "colour": "red"}]
    with pytest.raises(ToyGrammarError, match="ID prompt"):
        parse_caption("a red circle in the snow", id_prompt=True)


def test_normalise_prompt_reads_text_like_sdxls_tokenizer():
    from osa_lib.toy.world import normalise_prompt
    assert normalise_prompt("A Red Circle, in the  Snow.") == "a red circle in the snow"
    assert parse_caption("A Red Circle, in the Snow.") == parse_caption("a red circle in the snow")
    with pytest.raises(ToyGrammarError, match="unknown word"):
        parse_caption("a red circle in the snow!")  # other punctuation is still refused, by name
