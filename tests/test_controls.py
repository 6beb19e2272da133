"""``osa_lib.controls``: the story strip's cache gives exactly what ``generate_story`` draws for the
whole story, and a change of λ or w redraws only the scenes that read the bank."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from osa_lib import load_backbone, load_story
from osa_lib.controls import StoryStrip, intro_scenes
from osa_lib.generation import generate_story

STORY = Path(__file__).resolve().parents[1] / "data" / "stories" / "toy_uncoloured_pair.yaml"
STEPS = 4


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("toy")


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_intro_scenes_counts_the_opening_scenes_of_new_characters():
    story = load_story(STORY)
    assert intro_scenes(story) == 2  # Box alone, Tri alone; then they meet
    assert intro_scenes(dataclasses.replace(story, scenes=story.scenes[2:])) == 1
    assert intro_scenes(dataclasses.replace(story, scenes=story.scenes[:2])) == 2


def test_strip_equals_the_whole_story_and_caches_what_a_change_does_not_touch(backbone):
    story = load_story(STORY)
    strip = StoryStrip(backbone, story, num_inference_steps=STEPS)
    config = backbone.isolation_config()
    first = strip.isolated(config)
    assert same(first, generate_story(backbone, story, "isolated", config=config, num_inference_steps=STEPS,
                                      progress=False).images)
    assert strip.generated_scenes == 5
    stronger = dataclasses.replace(config, reweight=config.reweight + 1)
    changed = strip.isolated(stronger)
    assert strip.generated_scenes == 5 + 3, "w redraws only the three scenes that read the bank"
    assert same(changed, generate_story(backbone, story, "isolated", config=stronger, num_inference_steps=STEPS,
                                        progress=False).images)
    assert not same(changed, first), "w changes the returning scenes"
    assert same(strip.isolated(config), first) and strip.generated_scenes == 8, "a setting seen before is kept"
    lower = dataclasses.replace(config, lam=0.5)  # a lone newcomer blends its ID prompt (Eq. 6): λ reaches it too
    assert same(strip.isolated(lower), generate_story(backbone, story, "isolated", config=lower,
                                                      num_inference_steps=STEPS, progress=False).images)
    assert strip.generated_scenes == 8 + 5, "λ redraws every scene"
    later = dataclasses.replace(config, warmup=0.5)
    assert same(strip.isolated(later), generate_story(backbone, story, "isolated", config=later,
                                                      num_inference_steps=STEPS, progress=False).images)
    assert strip.generated_scenes == 18, "warm-up changes what the bank stores: the whole story"


def test_lambda_zero_is_the_unmodified_model(backbone):
    story = load_story(STORY)
    strip = StoryStrip(backbone, story, num_inference_steps=STEPS)
    off = dataclasses.replace(backbone.isolation_config(), lam=0.0)
    assert same(strip.isolated(off), strip.vanilla())


def test_strip_shows_scenes_drawn_before_as_they_are(backbone):
    story = load_story(STORY)
    config = backbone.isolation_config()
    drawn = generate_story(backbone, story, "isolated", config=config, num_inference_steps=STEPS, progress=False).images
    vanilla = generate_story(backbone, story, "vanilla", num_inference_steps=STEPS, progress=False).images
    strip = StoryStrip(backbone, story, num_inference_steps=STEPS, vanilla=vanilla, drawn=[(config, drawn)])
    assert same(strip.isolated(config), drawn) and same(strip.vanilla(), vanilla) and strip.generated_scenes == 0
    lower = dataclasses.replace(config, lam=0.4)
    assert same(strip.isolated(lower), generate_story(backbone, story, "isolated", config=lower,
                                                      num_inference_steps=STEPS, progress=False).images)
