"""The neutral view: a toy backbone that learns to copy appearance in no method's own view.

Training pairs come from one story and every reference token is visible to every target token,
with no mask and no bias; the training code reads no character mask for this view and does not
import the isolated method. The appearance probe can show references the same way."""
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from osa_lib.toy import world
from osa_lib.toy.probes import appearance

ROOT = Path(__file__).resolve().parents[1]


def test_a_story_pair_shows_one_to_three_characters_and_one_or_two_of_them_again():
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(60):
        reference, target = world.sample_story_pair(rng, exclude=world.HELD_OUT_TRIPLES)
        cast = {c.shape: c for c in reference.characters}
        assert 1 <= len(reference.characters) <= 3 and 1 <= len(target.characters) <= 2
        assert len(cast) == len(reference.characters) == len({c.colour for c in reference.characters})
        for c in target.characters:  # the same character, identical in every detail but its place
            twin = cast[c.shape]
            assert (c.colour, c.identity()) == (twin.colour, twin.identity())
        assert all((c.colour, c.shape, s.scene) not in world.HELD_OUT_TRIPLES
                   for s in (reference, target) for c in s.characters)
        sizes.add((len(reference.characters), len(target.characters)))
    assert {(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)} <= sizes


def test_neutral_batches_show_every_reference_token_to_every_target_token():
    from osa_lib.toy.train import SceneStream
    stream = SceneStream(8, seed=4, p_empty_caption=0.0, pair_rate=0.5, view="neutral")
    images, captions, partner, ref_mask, query_mask, query_weight = next(iter(stream))
    assert partner.tolist() == [-1, -1, 0, 1, -1, -1, -1, -1]
    assert torch.equal(ref_mask, torch.ones(8, 16, 16)) and torch.equal(query_mask, torch.ones(8, 16, 16))
    assert torch.equal(query_weight, torch.zeros(8, 16, 16))  # no re-weighting stand-in
    rng = np.random.default_rng(4)  # the same draws: story pairs first, references then targets
    pairs = [world.sample_story_pair(rng, exclude=world.HELD_OUT_TRIPLES) for _ in range(2)]
    expected = np.stack([pairs[0][0].image, pairs[1][0].image, pairs[0][1].image, pairs[1][1].image])
    got = ((images[:4].permute(0, 2, 3, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert captions[2] == pairs[0][1].caption


def test_the_neutral_view_refuses_the_methods_options():
    from osa_lib.toy.train import SceneStream, train
    with pytest.raises(ValueError, match="core-area"):
        SceneStream(8, seed=0, pair_rate=0.5, core_area=0.08, view="neutral")
    with pytest.raises(ValueError, match="pair-reweight"):
        train(steps=0, view="neutral", pair_reweight=4.0, out=Path("/nonexistent/never-written"))
    with pytest.raises(ValueError, match="view must be one of"):
        SceneStream(8, seed=0, view="isolated")


def _imported_osa_modules(module: str) -> set[str]:
    """Every ``osa_lib`` module that ``module`` imports, directly or through others, at any level
    of the code (function bodies included), read from the source by the layering test's reader."""
    from test_layering import imports_of
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += list(imports_of(name))
    return seen


def test_the_training_code_does_not_import_the_isolated_method():
    imported = _imported_osa_modules("osa_lib.toy.train")
    assert "osa_lib.toy.reference" in imported  # the reader sees through relative imports
    assert not {m for m in imported if m.split(".")[-1] in ("isolation", "baselines", "generation", "bank")}


def test_the_neutral_probe_shows_every_reference_token(monkeypatch):
    """``sample_with_reference(view="neutral")`` leaves no reference token out, background
    included; the character view shows the character's true mask only."""
    from osa_lib.backbones import load_backbone
    pipe = load_backbone("toy", model_id=str(ROOT / "data" / "toy_model")).pipe
    states, original = [], appearance.reference_attention

    @contextmanager
    def spy(*args, **kwargs):
        with original(*args, **kwargs) as state:
            states.append(state)
            yield state

    monkeypatch.setattr(appearance, "reference_attention", spy)
    references, prompts = appearance.probe_references(2, seed=1)
    for view in ("neutral", "character"):
        appearance.sample_with_reference(pipe, prompts, references, steps=2, view=view)
    neutral, character = (s.ref_mask[2:4] for s in states)  # the prompt half's rows
    assert torch.equal(neutral, torch.ones_like(neutral))
    assert 0 < float(character.mean()) < 0.5
    with pytest.raises(ValueError, match="view must be one of"):
        appearance.sample_with_reference(pipe, prompts, references, steps=2, view="masked")


def test_pair_reads_tell_own_colour_from_swapped():
    """On rendered ground truth: each character in its own colour reads "own"; the two colours
    exchanged read "swapped" for both; a third colour reads "neither"."""
    references, _ = appearance.pair_references(6, seed=2)
    rng = np.random.default_rng(0)
    for reference in references:
        a, b = reference.characters
        assert appearance._pair_read(reference.image, reference) == ["own", "own"]
        exchanged = [replace(a, colour=b.colour, hue=b.hue), replace(b, colour=a.colour, hue=a.hue)]
        assert appearance._pair_read(world.render_scene(reference.scene, exchanged, rng).image, reference) == ["swapped"] * 2
        third = next(c for c in world.COLOURS if c not in (a.colour, b.colour))
        repainted = [replace(a, colour=third, hue=world.COLOURS[third]), b]
        assert appearance._pair_read(world.render_scene(reference.scene, repainted, rng).image, reference) == ["neither", "own"]
