"""The toy story metrics read rendered scenes, whose identities are known, the way they read
generated ones: a character drawn the same in every scene scores ~100, one redrawn does not,
and a character wearing its partner's colour counts as mixed."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from osa_lib.generation import SceneResult, StoryResult
from osa_lib.story import parse_story
from osa_lib.toy.metrics import IDENTITY_DETAILS, toy_story_metrics
from osa_lib.toy import world

STORY = parse_story({
    "characters": [{"name": "Sunny", "word": "square", "id_prompt": "a yellow square"},
                   {"name": "Blu", "word": "triangle", "id_prompt": "a blue triangle"}],
    "scenes": [{"prompt": f"a yellow square and a blue triangle in the {scene}", "characters": ["Sunny", "Blu"],
                "seed": k} for k, scene in enumerate(("meadow", "snow", "beach"))],
}, "test story")


def rendered_result(characters_per_scene) -> StoryResult:
    """A StoryResult whose images are rendered scenes of the given characters, in opposite corners
    (far enough apart that two characters of one colour stay two)."""
    rng = np.random.default_rng(0)
    scenes = []
    for k, (scene, characters) in enumerate(zip(STORY.scenes, characters_per_scene)):
        corners = [(8.0 + k, 8.0), (24.0 - k, 24.0)]  # (row, column) centres, moved a little per scene
        placed = [dataclasses.replace(c, center=corner) for c, corner in zip(characters, corners)]
        image = world.render_scene(scene.prompt.split()[-1], placed, rng).image / 255.0
        scenes.append(SceneResult(k, scene.prompt, scene.characters, scene.seed, image, 0.1))
    return StoryResult("rendered", scenes)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(1)
    sunny = dataclasses.replace(world.sample_character(rng, "square", "yellow"), size=6.0, mark="dot")
    blu = dataclasses.replace(world.sample_character(rng, "triangle", "blue"), size=6.5, mark="none")
    return sunny, blu


def test_same_identity_in_every_scene_scores_near_100(pair):
    metrics = toy_story_metrics(STORY, rendered_result([pair] * 3), details=True)
    assert metrics["IIS-toy"] >= 95, metrics
    assert all(metrics[f"IIS-toy {d}"] >= 90 for d in IDENTITY_DETAILS), metrics
    assert metrics["attribute accuracy"] == 100 and metrics["TIS-toy"] == 100 and metrics["mixing rate"] == 0


def test_redrawn_identity_loses_the_changed_details_only(pair):
    sunny, blu = pair
    redrawn = dataclasses.replace(sunny, size=4.5, mark="none")
    metrics = toy_story_metrics(STORY, rendered_result([pair, (redrawn, blu), pair]), details=True)
    # pairs pool both characters: Sunny's 3 pairs, 2 of them with the redrawn scene, and Blu's 3
    assert metrics["IIS-toy mark"] == pytest.approx(100 * (1 + 3) / 6), metrics
    assert metrics["IIS-toy size"] <= 90, metrics
    assert metrics["IIS-toy hue"] >= 90 and metrics["IIS-toy brightness"] >= 90, metrics
    assert 50 < metrics["IIS-toy"] < 95


def test_a_character_in_its_partners_colour_is_mixing(pair):
    sunny, blu = pair
    blue_square = dataclasses.replace(sunny, colour="blue", hue=blu.hue)
    result = rendered_result([pair, (blue_square, blu), pair])
    metrics = toy_story_metrics(STORY, result)
    assert metrics["mixing rate"] == pytest.approx(100 / 3)
    assert metrics["attribute accuracy"] == pytest.approx(100 * 5 / 6)
    assert "IIS-toy hue" not in metrics  # details only when asked
    counts = toy_story_metrics(STORY, result, details=True)
    assert (counts["mixed scenes"], counts["multi-character scenes"]) == (1, 3)
    assert (counts["mixed two-character scenes"], counts["two-character scenes"]) == (1, 3)
    assert counts["returning drawn"] == 100  # drawn, though in the wrong colour


def test_mixing_and_neglect_rows_and_lambda_zero():
    """One row per multi-character scene; at λ = 0 isolated attention is vanilla, so both
    methods read the same in every row."""
    from osa_lib.backbones import load_backbone
    from osa_lib.experiments import mixing_and_neglect
    from osa_lib.isolation import IsolationConfig
    from osa_lib.story import load_story
    trio = load_story(str(Path(__file__).resolve().parent.parent / "data" / "stories" / "toy_trio.yaml"))
    rows = mixing_and_neglect(load_backbone("toy"), trio, n_seeds=1, config=IsolationConfig(lam=0.0),
                              num_inference_steps=3)
    assert [r["characters"] for r in rows] == [len(s.characters) for s in trio.scenes if len(s.characters) > 1]
    for r in rows:
        assert np.array_equal(r["vanilla image"], r["isolated image"])
        assert r["vanilla mixed"] == r["isolated mixed"]
        assert set(r["vanilla left out"]) <= set(r["names"])


UNCOLOURED = parse_story({
    "characters": [{"name": "Box", "word": "square", "id_prompt": "a square"},
                   {"name": "Tri", "word": "triangle", "id_prompt": "a triangle"}],
    "scenes": [{"prompt": f"a square and a triangle in the {scene}", "characters": ["Box", "Tri"], "seed": k}
               for k, scene in enumerate(("meadow", "snow", "beach"))],
}, "uncoloured test story")


def rendered_uncoloured(characters_per_scene) -> StoryResult:
    rng = np.random.default_rng(0)
    scenes = []
    for k, (scene, characters) in enumerate(zip(UNCOLOURED.scenes, characters_per_scene)):
        placed = [dataclasses.replace(c, center=corner) for c, corner in zip(characters, [(8.0, 8.0), (24.0, 24.0)])]
        image = world.render_scene(scene.prompt.split()[-1], placed, rng).image / 255.0
        scenes.append(SceneResult(k, scene.prompt, scene.characters, scene.seed, image, 0.1))
    return StoryResult("rendered", scenes)


def test_colour_kept_counts_later_appearances_in_the_first_ones_family():
    rng = np.random.default_rng(3)
    box = {c: world.sample_character(rng, "square", c) for c in ("red", "green")}
    tri = world.sample_character(rng, "triangle", "blue")
    # Box: red, green, green -> 0 of 2 later appearances in its first family (a comparison with
    # the previous scene would count 1); Tri: blue throughout -> 2 of 2
    result = rendered_uncoloured([(box["red"], tri), (box["green"], tri), (box["green"], tri)])
    metrics = toy_story_metrics(UNCOLOURED, result)
    assert metrics["colour kept"] == pytest.approx(100 * 2 / 4), metrics
    assert metrics["attribute accuracy"] == 100, metrics  # no colour named: any colour is right
    assert metrics["mixing rate"] == 0, metrics


def test_uncoloured_characters_drawn_in_one_colour_count_as_mixed():
    rng = np.random.default_rng(4)
    box, tri = world.sample_character(rng, "square", "red"), world.sample_character(rng, "triangle", "blue")
    red_tri = dataclasses.replace(tri, colour="red", hue=box.hue)
    metrics = toy_story_metrics(UNCOLOURED, rendered_uncoloured([(box, tri), (box, red_tri), (box, tri)]), details=True)
    assert metrics["mixed scenes"] == 1 and metrics["multi-character scenes"] == 3, metrics
    assert metrics["colour kept"] == pytest.approx(100 * 3 / 4), metrics  # Tri lost its blue once


def test_a_flood_of_colour_is_not_the_character_and_counts_in_the_flood_rate():
    # isolated attention at high w can paint the reference's colour over half the image; before
    # analyzer.MAX_SIZE such a square-ish flood counted as the square, drawn and in its colour
    rng = np.random.default_rng(6)
    box, tri = world.sample_character(rng, "square", "red"), world.sample_character(rng, "triangle", "blue")
    scenes = []
    for k, scene in enumerate(UNCOLOURED.scenes):
        flood = k == 1
        placed = [dataclasses.replace(box, center=(16.0, 16.0), size=12.0)] if flood else \
            [dataclasses.replace(c, center=corner) for c, corner in zip((box, tri), [(8.0, 8.0), (24.0, 24.0)])]
        image = world.render_scene(scene.prompt.split()[-1], placed, np.random.default_rng(k)).image / 255.0
        scenes.append(SceneResult(k, scene.prompt, scene.characters, scene.seed, image, 0.1))
    metrics = toy_story_metrics(UNCOLOURED, StoryResult("rendered", scenes), details=True)
    assert metrics["flood rate"] == pytest.approx(100 / 3), metrics
    assert metrics["attribute accuracy"] == pytest.approx(100 * 4 / 6), metrics  # neither is drawn in the flood
    assert metrics["returning drawn"] == pytest.approx(100 * 2 / 4), metrics  # neither in the flood, both after it
    assert metrics["colour kept"] == 100, metrics  # Box and Tri: 1 of 1 later appearance each
    assert "flood rate" not in toy_story_metrics(UNCOLOURED, StoryResult("rendered", scenes))
