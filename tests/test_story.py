"""Story files (parsing, validation, errors that say where) and the scene-by-scene generator."""
import glob
from pathlib import Path

import numpy as np
import pytest
import yaml

from osa_lib.backbones import load_backbone
from osa_lib.testing import _TINY_WORDS
from osa_lib.bank import BankError, ReferenceBank
from osa_lib.isolation import IsolationConfig
from osa_lib.generation import METHODS, generate_story
from osa_lib.story import (Story, StoryCharacter, StoryError, described_prompt, load_story, parse_story,
                           undescribed_prompt)

STORY_DIR = Path(__file__).resolve().parent.parent / "data" / "stories"
STORY_FILES = sorted(glob.glob(str(STORY_DIR / "*.yaml")))
STEPS = 3

VALID = {
    "title": "Lily and Tom",
    "characters": [
        {"name": "Lily", "word": "girl", "id_prompt": "a girl with blonde hair", "seed": 7},
        {"name": "Tom", "word": "boy", "id_prompt": "a boy with black hair"},
    ],
    "scenes": [
        {"prompt": "a girl reading a book in the park", "characters": ["Lily"], "seed": 1},
        {"prompt": "a boy with a dog on the beach", "characters": ["Tom"], "seed": 2},
        {"prompt": "a girl and a boy in the snow", "characters": ["Lily", "Tom"], "seed": 3},
    ],
}


def story_dict(**changes):
    data = yaml.safe_load(yaml.safe_dump(VALID))  # deep copy
    data.update(changes)
    return data


def write(tmp_path, data, name="story.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# --- files and validation ----------------------------------------------------------------------
def test_story_files_exist():
    assert len(STORY_FILES) >= 3, f"expected the shipped stories in {STORY_DIR}"


@pytest.mark.parametrize("path", STORY_FILES, ids=lambda p: Path(p).name)
def test_every_shipped_story_parses(path):
    story = load_story(path)
    raw = yaml.safe_load(Path(path).read_text())
    assert story.source == path
    assert len(story.scenes) == len(raw["scenes"]) > 0
    assert set(story.characters) == {c["name"] for c in raw["characters"]}
    for scene in story.scenes:
        assert set(scene.characters) <= set(story.characters) and isinstance(scene.seed, int)
    # every character appears in some scene
    assert {n for s in story.scenes for n in s.characters} == set(story.characters)


def test_valid_story_round_trip(tmp_path):
    story = load_story(write(tmp_path, VALID))
    assert story.title == "Lily and Tom"
    assert story.characters["Lily"].seed == 7 and story.characters["Tom"].seed is None
    assert [s.seed for s in story.scenes] == [1, 2, 3]
    assert story.scenes[2].characters == ["Lily", "Tom"]


def expect_error(tmp_path, data, *fragments):
    path = write(tmp_path, data)
    with pytest.raises(StoryError) as info:
        load_story(path)
    message = str(info.value)
    assert str(path) in message, message  # the file
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_unknown_character_in_scene(tmp_path):
    data = story_dict()
    data["scenes"][1]["characters"] = ["Tom", "Rex"]
    expect_error(tmp_path, data, "scene 2", "field 'characters'", "unknown character 'Rex'", "'Lily'")


def test_character_word_missing_from_scene_prompt(tmp_path):
    data = story_dict()
    data["scenes"][2]["prompt"] = "a girl and her friend in the snow"
    expect_error(tmp_path, data, "scene 3", "field 'prompt'", "'Tom'", "'boy'")


def test_word_inside_another_word_does_not_count(tmp_path):
    data = story_dict()
    data["scenes"][1]["prompt"] = "a cowboy with a dog on the beach"
    expect_error(tmp_path, data, "scene 2", "field 'prompt'", "'boy'")


def test_two_characters_share_a_word(tmp_path):
    data = story_dict()
    data["characters"][1]["word"] = "girl"
    data["characters"][1]["id_prompt"] = "a girl with black hair"
    expect_error(tmp_path, data, "character 2", "field 'word'", "'Lily'", "'Tom'", "'girl'")


def test_empty_scene_list(tmp_path):
    expect_error(tmp_path, story_dict(scenes=[]), "field 'scenes'", "empty")


def test_malformed_yaml(tmp_path):
    expect_error(tmp_path, "characters: [name: Lily\nscenes: {{{\n", "not valid YAML")


def test_missing_seed(tmp_path):
    data = story_dict()
    del data["scenes"][1]["seed"]
    expect_error(tmp_path, data, "scene 2", "field 'seed'")


def test_id_prompt_without_word(tmp_path):
    data = story_dict()
    data["characters"][0]["id_prompt"] = "blonde hair, black dress"
    expect_error(tmp_path, data, "character 1", "field 'id_prompt'", "'girl'")


def test_other_structural_errors(tmp_path):
    expect_error(tmp_path, "- just\n- a list\n", "top level")
    expect_error(tmp_path, {"scenes": VALID["scenes"]}, "missing field 'characters'")
    data = story_dict()
    data["scenes"][0]["characters"] = ["Lily", "Lily"]
    expect_error(tmp_path, data, "scene 1", "listed twice")
    data = story_dict()
    data["characters"][1]["name"] = "Lily"
    data["characters"][1]["word"] = "boy"
    expect_error(tmp_path, data, "character 2", "defined twice")


def test_missing_file():
    with pytest.raises(StoryError, match="no such story file"):
        load_story("/nonexistent/story.yaml")


def test_with_seed_offset():
    story = parse_story(story_dict())
    shifted = story.with_seed_offset(100)
    assert [s.seed for s in shifted.scenes] == [101, 102, 103]
    assert shifted.characters["Lily"].seed == 107 and shifted.characters["Tom"].seed is None
    assert [s.seed for s in story.scenes] == [1, 2, 3] and story.characters["Lily"].seed == 7  # unchanged
    assert [s.prompt for s in shifted.scenes] == [s.prompt for s in story.scenes]
    assert [shifted.scene_seed(i) for i in range(3)] == [107, 102, 103]


def test_scene_seed_prefers_introduced_characters_seed():
    story = parse_story(story_dict())
    assert [story.scene_seed(i) for i in range(3)] == [7, 2, 3]
    # Lily already drawn before this story (a loaded bank): scene 1 does not introduce her
    assert story.scene_seed(0, known=["Lily"]) == 1
    later = Story(story.characters, story.scenes[2:])
    assert later.scene_seed(0) == 7 and later.scene_seed(0, known=["Lily", "Tom"]) == 3


# --- generation on the tiny SDXL -----------------------------------------------------------------
@pytest.fixture(scope="module")
def story():
    assert all(w in _TINY_WORDS for s in VALID["scenes"] for w in s["prompt"].split())
    return parse_story(story_dict(), "tiny-story")


@pytest.fixture(scope="module")
def isolated(tiny, story):
    return generate_story(tiny, story, "isolated", num_inference_steps=STEPS, progress=False)


@pytest.fixture(scope="module")
def vanilla(tiny, story):
    return generate_story(tiny, story, "vanilla", num_inference_steps=STEPS, progress=False)


def test_isolated_story_fills_bank(tiny, isolated):
    assert isolated.method == "isolated" and len(isolated.scenes) == 3
    bank = isolated.bank
    assert sorted(bank.characters) == ["Lily", "Tom"]
    assert bank.nbytes("Lily") > 0 and bank.nbytes("Tom") > 0
    bank.check_compatible("sdxl-tiny", tuple(tiny.latent_shape[1:]), STEPS)
    assert [s.seed for s in isolated.scenes] == [7, 2, 3]
    for scene in isolated.scenes:
        assert scene.image.shape == (32, 32, 3) and scene.seconds > 0


def test_continued_story_with_loaded_bank_matches_uninterrupted_run(tmp_path, tiny, story, isolated, vanilla):
    path = isolated.bank.save(tmp_path / "bank.safetensors")
    loaded = ReferenceBank.load(path)
    nbytes = loaded.nbytes()
    later = Story(story.characters, story.scenes[2:], story.title, "continued")
    continued = generate_story(tiny, later, "isolated", bank=loaded, num_inference_steps=STEPS, progress=False)
    assert continued.bank is loaded
    assert continued.scenes[0].seed == isolated.scenes[2].seed == 3  # Lily is not introduced here
    assert loaded.nbytes() == nbytes  # returning characters are read from the bank, not written
    assert np.array_equal(continued.images[0], isolated.images[2])
    assert np.abs(continued.images[0] - vanilla.images[2]).max() > 1e-4  # and isolation did act


def test_newcomer_in_continued_story_is_added_to_loaded_bank(tmp_path, tiny, story):
    """Lily's first scene, saved; later Lily returns and Tom is new: Tom is written, Lily is not."""
    part1 = Story({"Lily": story.characters["Lily"]}, story.scenes[:1], source="part 1")
    first = generate_story(tiny, part1, "isolated", num_inference_steps=STEPS, progress=False)
    bank = ReferenceBank.load(first.bank.save(tmp_path / "lily.safetensors"))
    lily_bytes = bank.nbytes("Lily")
    part2 = Story(story.characters, story.scenes[2:], source="part 2")
    generate_story(tiny, part2, "isolated", bank=bank, num_inference_steps=STEPS, progress=False)
    assert sorted(bank.characters) == ["Lily", "Tom"]
    assert bank.nbytes("Lily") == lily_bytes and bank.nbytes("Tom") > 0


def test_incompatible_bank_is_refused(tiny, story):
    bank = ReferenceBank("sdxl-tiny", tuple(tiny.latent_shape[1:]), STEPS + 1)
    with pytest.raises(BankError, match="denoising steps"):
        generate_story(tiny, story, "isolated", bank=bank, num_inference_steps=STEPS, progress=False)


def test_unknown_method(tiny, story):
    with pytest.raises(StoryError, match="unknown method 'magic'") as info:
        generate_story(tiny, story, "magic")
    assert all(repr(m) in str(info.value) for m in METHODS)


def test_prompt_problems_are_story_errors_before_generation(tiny):
    story = parse_story(story_dict())
    story.scenes[0].prompt = "a boy in the park"  # bypasses parse-time checks
    with pytest.raises(StoryError, match="scene 1, field 'prompt'.*'girl'"):
        generate_story(tiny, story, "vanilla", num_inference_steps=STEPS, progress=False)


def test_csa_one_image_per_scene_and_differs_from_vanilla(tiny, story, vanilla):
    """Lily's and Tom's first scenes are each its character's only reference image: a batch of
    one, which has no other image to share tokens with (StoryDiffusion's own behaviour), so they
    equal vanilla up to rounding; the two-character scene reads both references and differs."""
    result = generate_story(tiny, story, "csa", num_inference_steps=STEPS, progress=False)
    assert result.method == "csa" and result.bank is None
    assert len(result.images) == len(story.scenes)
    assert [s.seed for s in result.scenes] == [s.seed for s in vanilla.scenes]
    for ours, theirs in zip(result.images, vanilla.images):
        assert ours.shape == theirs.shape
    assert np.allclose(result.images[0], vanilla.images[0], atol=1e-5)
    assert np.abs(result.images[2] - vanilla.images[2]).max() > 1e-4


def test_vanilla_story_matches_backbone_generate(tiny, story, vanilla):
    assert vanilla.bank is None
    direct = tiny.generate([story.scenes[1].prompt], [2], num_inference_steps=STEPS, progress=False)[0]
    assert np.array_equal(vanilla.images[1], direct)


def test_llm_rewrite_output_goes_through_the_same_validation():
    """The optional rewrite step: whatever the model returns is validated like a story file."""
    from osa_lib.llm import rewrite_with_llm
    story = parse_story({"characters": [{"name": "Lily", "word": "girl", "id_prompt": "a girl"}],
                         "scenes": [{"prompt": "she reads in the park, a girl", "characters": ["Lily"], "seed": 1}]})

    def good(request, **kwargs):
        assert "girl" in request and "she reads" in request
        return [{"generated_text": " a girl reading a book in the park\nmore text"}]

    rewritten = rewrite_with_llm(story, "stub", generator=good)
    assert rewritten.scenes[0].prompt == "a girl reading a book in the park"
    assert rewritten.scenes[0].seed == 1 and "rewritten by stub" in rewritten.source

    def drops_the_word(request, **kwargs):
        return [{"generated_text": "someone reading in the park"}]

    with pytest.raises(StoryError, match="scene 1, field 'prompt'.*'girl'"):
        rewrite_with_llm(story, "stub", generator=drops_the_word)


# --- every bad input stopped before the U-Net runs (issue 15) -----------------------------------
@pytest.mark.parametrize("where, value, message", [
    ("scene", True, r"scene 1, field 'seed': True is not accepted: a seed is an integer in \[0, 2\*\*64\)"),
    ("scene", 2 ** 64, r"scene 1, field 'seed': 18446744073709551616 is not accepted"),
    ("scene", -1, r"scene 1, field 'seed': -1 is not accepted"),
    ("character", True, r"character 1, field 'seed': True is not accepted"),
    ("character", 1.5, r"character 1, field 'seed': 1.5 is not accepted"),
])
def test_bad_seeds_are_refused(tmp_path, where, value, message):
    data = story_dict()
    (data["scenes"] if where == "scene" else data["characters"])[0]["seed"] = value
    with pytest.raises(StoryError, match=message):
        load_story(write(tmp_path, data))


def test_seed_true_in_yaml_is_refused(tmp_path):
    text = yaml.safe_dump(story_dict()).replace("seed: 1\n", "seed: true\n")
    with pytest.raises(StoryError, match="field 'seed': True is not accepted"):
        load_story(write(tmp_path, text))


@pytest.mark.parametrize("name", ["Lily|2", "Li\nly"])
def test_character_names_the_bank_cannot_hold_are_refused(tmp_path, name):
    data = story_dict()
    data["characters"][0]["name"] = name
    data["scenes"][0]["characters"], data["scenes"][2]["characters"] = [name], [name, "Tom"]
    with pytest.raises(StoryError, match=r"character 1, field 'name': character name .* may not contain"):
        parse_story(data, "names")


@pytest.fixture
def unet_calls(tiny):
    calls = []
    hook = tiny.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    hook.remove()


def test_subject_word_past_token_77_is_refused_before_generation(tiny, unet_calls):
    data = story_dict()
    data["scenes"][1]["prompt"] = "a dog " + "in the park " * 30 + "and a boy"
    with pytest.raises(StoryError, match=r"scene 2, field 'prompt': word 'boy' is at token \d+ .* first 77 tokens"):
        generate_story(tiny, parse_story(data), "isolated", num_inference_steps=STEPS, progress=False)
    assert unet_calls == []


@pytest.mark.parametrize("steps", [-1, 0, "4"])
def test_bad_step_counts_are_refused_before_generation(tiny, story, unet_calls, steps):
    for method in METHODS:
        with pytest.raises(ValueError, match=rf"num_inference_steps={steps!r} is not accepted"):
            generate_story(tiny, story, method, num_inference_steps=steps, progress=False)
    assert unet_calls == []


def test_bad_config_is_refused_before_any_scene_runs(tiny, unet_calls):
    data = story_dict()
    data["scenes"].insert(0, {"prompt": "a book in the park", "characters": [], "seed": 9})  # a vanilla scene first
    story = parse_story(data)
    with pytest.raises(ValueError, match=r"mask_resolution=5 is not a map height"):
        generate_story(tiny, story, "isolated", IsolationConfig(mask_resolution=5), num_inference_steps=STEPS,
                       progress=False)
    config = IsolationConfig()
    config.overlap_rule = "bogus"  # changed after it was made
    with pytest.raises(ValueError, match="overlap_rule='bogus' is unknown"):
        generate_story(tiny, story, "isolated", config, num_inference_steps=STEPS, progress=False)
    assert unet_calls == []


def test_bank_holds_identities_and_a_different_character_is_refused(tiny, story, isolated, unet_calls):
    assert isolated.bank.identities["Lily"] == {"id_prompt": "a girl with blonde hair", "word": "girl"}
    data = story_dict()
    data["characters"][0]["id_prompt"] = "a girl with black hair"
    other = parse_story(data, "other Lily")
    with pytest.raises(BankError, match="'Lily' in the reference bank was drawn as id_prompt 'a girl with blonde "
                                        "hair', word 'girl'; the story defines id_prompt 'a girl with black hair'"):
        generate_story(tiny, other, "isolated", bank=isolated.bank, num_inference_steps=STEPS, progress=False)
    assert unet_calls == []


def test_toy_story_behaves_like_its_normalised_form():
    toy = load_backbone("toy", device="cpu")
    plain = {"characters": [{"name": "Rosa", "word": "circle", "id_prompt": "a red circle"},
                            {"name": "Bo", "word": "square", "id_prompt": "a blue square"}],
             "scenes": [{"prompt": "a red circle in the meadow", "characters": ["Rosa"], "seed": 1},
                        {"prompt": "a red circle and a blue square in the snow", "characters": ["Rosa", "Bo"],
                         "seed": 2}]}
    styled = yaml.safe_load(yaml.safe_dump(plain))
    styled["characters"][0]["id_prompt"] = "A Red Circle."
    styled["scenes"][0]["prompt"] = "A Red Circle in the Meadow"
    styled["scenes"][1]["prompt"] = "a red circle, and a Blue Square, in the snow."
    runs = [generate_story(toy, parse_story(d), "isolated", num_inference_steps=2, progress=False)
            for d in (plain, styled)]
    for ours, theirs in zip(*(r.images for r in runs)):
        assert np.array_equal(ours, theirs)
    assert not np.array_equal(runs[0].images[0], runs[0].images[1])


def test_seed_offset_past_the_range_is_refused_before_generation(tiny, story, unet_calls):
    with pytest.raises(StoryError, match=r"scene 1, seed: 18446744073709551622 is not accepted"):
        generate_story(tiny, story.with_seed_offset(2 ** 64 - 1), "vanilla", num_inference_steps=STEPS, progress=False)
    assert unet_calls == []


# --- the same text for every method: descriptions in the scene prompts --------------------------
def test_descriptions_go_where_the_word_is():
    girl = StoryCharacter("Lily", "girl", "girl: blonde hair, black dress")
    boy = StoryCharacter("Tom", "boy", "a boy with black hair")
    circle = StoryCharacter("Rosa", "circle", "a red circle")
    assert girl.description == "girl, blonde hair, black dress"
    assert boy.description == "boy with black hair" and circle.description == "red circle"
    assert described_prompt("a girl reading a book in the park", [girl]) == \
        "a girl, blonde hair, black dress, reading a book in the park"
    assert described_prompt("a girl and a boy in the snow", [girl, boy]) == \
        "a girl, blonde hair, black dress, and a boy with black hair in the snow"
    assert described_prompt("in the park, a girl", [girl]) == "in the park, a girl, blonde hair, black dress"
    assert described_prompt("a circle in the meadow", [circle]) == "a red circle in the meadow"
    assert described_prompt("a red circle in the meadow", [circle]) == "a red circle in the meadow"  # already there
    assert undescribed_prompt("a red circle and a blue square in the snow", [circle]) == \
        "a circle and a blue square in the snow"
    with pytest.raises(StoryError, match="'Tom': its word 'boy' is not in the scene prompt"):
        described_prompt("a girl in the park", [boy])


@pytest.mark.parametrize("path", STORY_FILES, ids=lambda p: Path(p).stem)
def test_shipped_stories_describe_their_characters_only_on_sdxl(path):
    """SDXL stories put descriptions in for every method; toy stories do not (their uncoloured
    stories test what a method copies), and stripping then describing gives the story back."""
    story = load_story(path)
    assert story.describe_characters == Path(path).stem.startswith("sdxl_")
    described = story.with_descriptions()
    for scene, drawn in zip(story.scenes, described.scenes):
        for name in scene.characters:
            assert story.characters[name].description.lower() in drawn.prompt.lower()
    if not story.describe_characters:
        assert [s.prompt for s in story.without_descriptions().with_descriptions().scenes] == \
            [s.prompt for s in described.scenes]


def test_describe_characters_must_be_a_boolean(tmp_path):
    assert parse_story(story_dict()).describe_characters is False
    assert parse_story(story_dict(describe_characters=True)).describe_characters is True
    with pytest.raises(StoryError, match="field 'describe_characters': 'yes please' must be true or false"):
        parse_story(story_dict(describe_characters="yes please"), "bad")
    assert parse_story(story_dict(describe_characters=True)).with_seed_offset(5).describe_characters


def _encoded_prompts(backbone, story, method, monkeypatch, **kwargs) -> list[str]:
    """Every scene prompt ``method`` hands to ``backbone.encode``, sorted (CSA batches scenes)."""
    seen = []
    encode = backbone.encode

    def recording(prompts, *args, **kw):
        seen.extend(prompts)
        return encode(prompts, *args, **kw)

    monkeypatch.setattr(backbone, "encode", recording)
    generate_story(backbone, story, method, progress=False, **kwargs)
    monkeypatch.undo()
    return sorted(seen)


@pytest.mark.parametrize("describe", [True, False])
def test_every_method_encodes_the_same_prompts_on_tiny_sdxl(tiny, monkeypatch, describe):
    story = parse_story(story_dict())
    expected = sorted(s.prompt for s in (story.with_descriptions() if describe else story).scenes)
    assert (expected != sorted(s.prompt for s in story.scenes)) == describe
    for method in METHODS:
        assert _encoded_prompts(tiny, story, method, monkeypatch, num_inference_steps=2,
                                describe=describe) == expected, method


@pytest.fixture(scope="module")
def toy():
    return load_backbone("toy", device="cpu")


def test_every_method_encodes_the_same_described_prompts_on_the_toy(toy, monkeypatch):
    """A named-colour toy story stripped of its colours, drawn with the description option: every
    method reads the colour words again, the same prompts."""
    story = load_story(STORY_DIR / "toy_newcomer.yaml").without_descriptions()
    assert "red" not in story.scenes[0].prompt
    expected = sorted(s.prompt for s in load_story(STORY_DIR / "toy_newcomer.yaml").scenes)
    for method in METHODS:
        assert _encoded_prompts(toy, story, method, monkeypatch, num_inference_steps=2, describe=True) == expected


def test_the_stories_setting_is_the_default_and_results_carry_the_drawn_prompts(tiny):
    story = parse_story(story_dict(describe_characters=True))
    result = generate_story(tiny, story, "vanilla", num_inference_steps=2, progress=False)
    assert [s.prompt for s in result.scenes] == [s.prompt for s in story.with_descriptions().scenes]
    plain = generate_story(tiny, story, "vanilla", num_inference_steps=2, progress=False, describe=False)
    assert [s.prompt for s in plain.scenes] == [s.prompt for s in story.scenes]
    with pytest.raises(StoryError, match="describe=1 must be True, False or None"):
        generate_story(tiny, story, "vanilla", describe=1)


def test_a_bank_drawn_by_other_weights_is_refused_before_the_unet_runs(toy):
    """The base toy model and the shipped backbone (its fine-tuned up-block self-attention) share a
    name, shapes and scheduler; only the weights tell their banks apart."""
    base = load_backbone("toy", model_id=str(Path(__file__).resolve().parents[1] / "data" / "toy_model"), device="cpu")
    story = load_story(STORY_DIR / "toy_single_journey.yaml")
    first = Story(story.characters, story.scenes[:1], source="first scene")
    bank = generate_story(base, first, "isolated", num_inference_steps=2, progress=False).bank
    calls = []
    hook = toy.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(BankError, match=r"other U-Net weights \(model_dir \S*toy_model, fingerprint \w+\) than "
                                            r"this run's \(model_dir \S*toy_model, finetune \S*toy_finetune\S*, fingerprint"):
            generate_story(toy, story, "isolated", bank=bank, num_inference_steps=2, progress=False)
    finally:
        hook.remove()
    assert calls == []
    generate_story(base, story, "isolated", bank=bank, num_inference_steps=2, progress=False)  # its own weights: fine


def test_subject_word_in_the_end_tokens_slot_is_refused_before_generation(tiny, unet_calls):
    """Token 76 holds the end token once a prompt is cut to 77: a word there is never read."""
    at = {m: "a " + "the " * m + "boy" for m in (73, 74)}  # start token, 'a', m × 'the', 'boy' at m + 2
    assert tiny.token_positions(at[73], "boy") == [75]
    data = story_dict()
    data["scenes"][1]["prompt"] = at[74]
    with pytest.raises(StoryError, match=r"scene 2, field 'prompt': word 'boy' is at token 76 .* reads only "
                                         r"tokens 1 to 75 .* end token, which replaces token 76"):
        generate_story(tiny, parse_story(data), "isolated", num_inference_steps=STEPS, progress=False)
    assert unet_calls == []
    twice = "a boy " + "the " * 73 + "boy"  # the second 'boy' is at 76: only the first is T_m
    assert tiny.token_positions(twice, "boy") == [2]


def test_a_description_may_not_hold_another_characters_word():
    data = story_dict(describe_characters=True)
    data["characters"][1]["id_prompt"] = "a boy with a girl hat"
    with pytest.raises(StoryError, match="character 'Tom', field 'id_prompt': its description 'boy with a girl hat' "
                                         "holds the word 'girl' of 'Lily'"):
        parse_story(data, "bad")
    data["describe_characters"] = False  # without descriptions in the scene prompts it does no harm
    parse_story(data, "fine")


def test_the_sdxl_story_set_covers_singles_pairs_newcomers_and_similar_characters():
    stories = {Path(p).stem: load_story(p) for p in STORY_FILES if Path(p).stem.startswith("sdxl_")}
    assert 8 <= len(stories) <= 10
    assert all(4 <= len(s.scenes) <= 6 for s in stories.values())
    sizes = [len(s.characters) for s in stories.values()]
    assert sizes.count(1) >= 2 and sizes.count(2) >= 4
    newcomer = [n for n, s in stories.items()
                if any(any(c not in {x for prev in s.scenes[:i] for x in prev.characters} for c in scene.characters)
                       and any(c in {x for prev in s.scenes[:i] for x in prev.characters} for c in scene.characters)
                       for i, scene in enumerate(s.scenes))]
    assert newcomer, "a story where a new character is drawn beside a returning one"
    assert "girl" in {c.word for c in stories["sdxl_two_girls"].characters.values()}
