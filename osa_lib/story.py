"""Stories: a YAML file format and its validation (generation: ``osa_lib.generation``).

A story file (see ``data/stories/``)::

    title: Rosa goes travelling
    characters:
      - name: Rosa            # key in the reference bank
        word: circle          # the word that names her in scene prompts (subject tokens T_m)
        id_prompt: a red circle
        seed: 7               # optional: seed of the scene that introduces her
    scenes:
      - prompt: a red circle in the meadow
        characters: [Rosa]
        seed: 1
    describe_characters: false  # optional: put each character's description into its scenes

The rule-based path (this module) always works: scene prompts are used as written, ID prompts
come from the file and subject tokens are found by ``Backbone.token_positions``.

With ``describe_characters: true`` every method draws each scene from its described prompt
(``Story.with_descriptions``): the first occurrence of a character's word is replaced by its
description, the ID prompt without its article ("a girl reading" with the ID prompt "girl: blonde
hair, black dress" becomes "a girl, blonde hair, black dress, reading"). StoryDiffusion's app does
the same with ``[Name]`` tags (``process_original_prompt`` in its ``utils/gradio_utils.py``), so
vanilla, Consistent Self-Attention and isolated attention all read the same words; without it a
character's look reaches only isolated attention, through its ID prompt. Every problem
is reported before any generation starts, naming the file, the scene and the field.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .bank import BankError, check_name
from .config import check_seed

__all__ = ["StoryError", "StoryCharacter", "StoryScene", "Story", "load_story", "parse_story", "seed_problem",
           "check_prompts", "describe_story", "description", "described_prompt", "undescribed_prompt"]


class StoryError(ValueError):
    """A story file or story object that cannot be generated, with where and why."""


@dataclass
class StoryCharacter:
    name: str
    word: str
    id_prompt: str
    seed: int | None = None

    @property
    def description(self) -> str:
        """The words that describe this character in a scene prompt (``description``)."""
        return description(self.id_prompt, self.word)


@dataclass
class StoryScene:
    prompt: str
    characters: list[str]
    seed: int


@dataclass
class Story:
    characters: dict[str, StoryCharacter]
    scenes: list[StoryScene]
    title: str = ""
    source: str = "<story>"
    #: draw every scene from its described prompt (``with_descriptions``), for every method
    describe_characters: bool = False

    def with_seed_offset(self, offset: int) -> "Story":
        """The same story with every scene and character seed shifted (for multi-seed evaluation)."""
        chars = {n: dataclasses.replace(c, seed=None if c.seed is None else c.seed + offset)
                 for n, c in self.characters.items()}
        scenes = [dataclasses.replace(s, seed=s.seed + offset) for s in self.scenes]
        return dataclasses.replace(self, characters=chars, scenes=scenes)

    def with_descriptions(self) -> "Story":
        """The story whose scene prompts carry their characters' descriptions (``described_prompt``);
        its ``describe_characters`` is False, since the prompts now hold them."""
        scenes = [dataclasses.replace(s, prompt=described_prompt(s.prompt, [self.characters[n] for n in s.characters]))
                  for s in self.scenes]
        return dataclasses.replace(self, scenes=scenes, describe_characters=False)

    def without_descriptions(self) -> "Story":
        """The story whose scene prompts name each character by its word alone (``undescribed_prompt``):
        the uncoloured form of a story whose prompts repeat the ID prompts, for measuring the option."""
        scenes = [dataclasses.replace(s, prompt=undescribed_prompt(s.prompt, [self.characters[n] for n in s.characters]))
                  for s in self.scenes]
        return dataclasses.replace(self, scenes=scenes, describe_characters=False)

    def scene_seed(self, index: int, known: tuple[str, ...] | list[str] = ()) -> int:
        """The scene's seed, or the seed of a character it introduces if that one has a seed.

        Args:
            known: characters drawn before this story began (a loaded bank's), so a continued
                story does not "introduce" them again and keeps the uninterrupted run's seeds.
        """
        scene = self.scenes[index]
        seen = set(known) | {n for s in self.scenes[:index] for n in s.characters}
        for name in scene.characters:
            if name not in seen and self.characters[name].seed is not None:
                return self.characters[name].seed
        return scene.seed


def _word_in(word: str, prompt: str) -> bool:
    return _find_words(word, prompt) is not None


def _find_words(words: str, prompt: str) -> re.Match | None:
    """The first whole-word, case-insensitive occurrence of ``words`` in ``prompt`` (spaces match any run of spaces)."""
    pattern = r"\s+".join(re.escape(w) for w in words.lower().split())
    return re.search(rf"(?<!\w){pattern}(?!\w)", prompt.lower())


_ARTICLES = ("a", "an", "the")


def description(id_prompt: str, word: str) -> str:
    """A character's description for a scene prompt: its ID prompt without a leading article, a
    colon after the word read as a comma ("girl: blonde hair, black dress" -> "girl, blonde hair,
    black dress"; "a red circle" -> "red circle")."""
    words = id_prompt.strip().split()
    if len(words) > 1 and words[0].lower() in _ARTICLES:
        words = words[1:]
    text = " ".join(words)
    match = _find_words(word, text)
    if match is not None and text[match.end():match.end() + 1] == ":":
        text = text[:match.end()] + "," + text[match.end() + 1:]
    return text


def described_prompt(prompt: str, characters: list[StoryCharacter]) -> str:
    """``prompt`` with each character's first word replaced by its description, as StoryDiffusion
    replaces ``[Name]`` tags: unchanged for a character whose description it already holds. A
    description holding a comma is closed by one when the prompt goes on, so what follows does
    not read as one more detail ("a girl, blonde hair, black dress, reading a book")."""
    for c in characters:
        text = c.description
        if _find_words(text, prompt) is not None:
            continue
        match = _find_words(c.word, prompt)
        if match is None:
            raise StoryError(f"character {c.name!r}: its word {c.word!r} is not in the scene prompt {prompt!r}, "
                             f"so its description has nowhere to go")
        rest = prompt[match.end():]
        if "," in text and rest.strip() and not rest.lstrip()[0] in ",.;:":
            text += ","
        prompt = prompt[:match.start()] + text + rest
    return prompt


def undescribed_prompt(prompt: str, characters: list[StoryCharacter]) -> str:
    """``prompt`` with each character's description (its first occurrence) replaced by its word:
    the inverse of ``described_prompt`` ("a red circle in the meadow" -> "a circle in the meadow")."""
    for c in characters:
        match = _find_words(c.description, prompt)
        if match is not None:
            rest = prompt[match.end():]
            if "," in c.description and rest.startswith(","):
                rest = rest[1:]
            prompt = prompt[:match.start()] + c.word + rest
    return prompt


def seed_problem(seed) -> str | None:
    """What is wrong with a seed (e.g. `seed: true`, YAML's boolean, or one past 2**64), or None."""
    try:
        check_seed(seed)
    except ValueError as error:
        return str(error).replace("seed=", "", 1)
    return None


def parse_story(data, source: str = "<story>") -> Story:
    """Validate a story given as a dict (parsed YAML) and build a ``Story``."""
    def fail(where: str, message: str):
        raise StoryError(f"{source}: {where}: {message}")

    if not isinstance(data, dict):
        fail("top level", "a story is a mapping with 'characters' and 'scenes'")
    for key in ("characters", "scenes"):
        if key not in data:
            fail("top level", f"missing field '{key}'")
    if not isinstance(data["characters"], list) or not data["characters"]:
        fail("field 'characters'", "must be a non-empty list of {name, word, id_prompt}")
    if not isinstance(data["scenes"], list) or not data["scenes"]:
        fail("field 'scenes'", "the scene list is empty; a story needs at least one scene")
    describe = data.get("describe_characters", False)
    if not isinstance(describe, bool):
        fail("field 'describe_characters'", f"{describe!r} must be true or false (true: every method draws each "
                                            f"scene with its characters' descriptions in its prompt)")
    characters: dict[str, StoryCharacter] = {}
    words: dict[str, str] = {}
    for i, c in enumerate(data["characters"]):
        where = f"character {i + 1}"
        if not isinstance(c, dict):
            fail(where, "must be a mapping with name, word, id_prompt")
        for key in ("name", "word", "id_prompt"):
            if not isinstance(c.get(key), str) or not c[key].strip():
                fail(f"{where}, field '{key}'", "missing or not a non-empty string")
        name, word = c["name"].strip(), c["word"].strip().lower()
        try:
            check_name(name)
        except BankError as error:
            fail(f"{where}, field 'name'", str(error))
        if name in characters:
            fail(f"{where}, field 'name'", f"character {name!r} is defined twice")
        if word in words:
            fail(f"{where}, field 'word'", f"characters {words[word]!r} and {name!r} share the word {word!r}; "
                                           f"each character needs its own word")
        if not _word_in(word, c["id_prompt"]):
            fail(f"{where}, field 'id_prompt'", f"ID prompt {c['id_prompt']!r} does not contain the word {word!r}")
        seed = c.get("seed")
        if seed is not None and seed_problem(seed):
            fail(f"{where}, field 'seed'", seed_problem(seed))
        words[word] = name
        characters[name] = StoryCharacter(name, word, c["id_prompt"].strip(), seed)
    if describe:  # another character's word inside a description would become part of its T_m
        for name, c in characters.items():
            for other in characters.values():
                if other.name != name and _word_in(other.word, c.description):
                    fail(f"character {name!r}, field 'id_prompt'", f"its description {c.description!r} holds the word "
                                                                   f"{other.word!r} of {other.name!r}, so with "
                                                                   f"describe_characters both would be read as "
                                                                   f"{other.name!r}; reword one of them")
    scenes = []
    for i, s in enumerate(data["scenes"]):
        where = f"scene {i + 1}"
        if not isinstance(s, dict):
            fail(where, "must be a mapping with prompt, characters, seed")
        if not isinstance(s.get("prompt"), str) or not s["prompt"].strip():
            fail(f"{where}, field 'prompt'", "missing or empty")
        names = s.get("characters", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            fail(f"{where}, field 'characters'", "must be a list of character names")
        for name in names:
            if name not in characters:
                fail(f"{where}, field 'characters'", f"unknown character {name!r}; the story defines {list(characters)}")
            if not _word_in(characters[name].word, s["prompt"]):
                fail(f"{where}, field 'prompt'", f"character {name!r} is named by the word {characters[name].word!r}, "
                                                 f"which is missing from the scene prompt {s['prompt']!r}")
        if len(set(names)) != len(names):
            fail(f"{where}, field 'characters'", "a character is listed twice")
        if "seed" not in s:
            fail(f"{where}, field 'seed'", "missing; give every scene an integer seed in [0, 2**64), e.g. 'seed: 1'")
        if seed_problem(s["seed"]):
            fail(f"{where}, field 'seed'", seed_problem(s["seed"]))
        scenes.append(StoryScene(s["prompt"].strip(), list(names), s["seed"]))
    return Story(characters, scenes, str(data.get("title", "")), source, describe)


def load_story(path: str | Path) -> Story:
    """Read and validate a YAML story file."""
    path = Path(path)
    if not path.exists():
        raise StoryError(f"{path}: no such story file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise StoryError(f"{path}: not valid YAML: {error}") from error
    return parse_story(data, str(path))


def check_prompts(backbone, story: Story) -> None:
    """Raise ``StoryError`` naming the scene or character whose prompt the backbone cannot read."""
    for i, scene in enumerate(story.scenes):
        try:
            backbone.validate_prompt(scene.prompt)
            for name in scene.characters:
                backbone.token_positions(scene.prompt, story.characters[name].word)
        except ValueError as error:
            raise StoryError(f"{story.source}: scene {i + 1}, field 'prompt': {error}") from error
    for name, c in story.characters.items():
        try:
            backbone.validate_prompt(c.id_prompt, id_prompt=True)
        except ValueError as error:
            raise StoryError(f"{story.source}: character {name!r}, field 'id_prompt': {error}") from error


def describe_story(backbone, story: Story) -> list[dict]:
    """What the rule-based path derives per scene: prompt (described, when the story asks for its
    characters' descriptions), characters, subject tokens, new/returning."""
    if story.describe_characters:
        story = story.with_descriptions()
    check_prompts(backbone, story)
    seen, rows = set(), []
    for i, scene in enumerate(story.scenes):
        cells = []
        for name in scene.characters:
            c = story.characters[name]
            cells.append(f"{name} ('{c.word}' at {backbone.token_positions(scene.prompt, c.word)}, "
                         f"{'returning' if name in seen else 'new'}; ID: '{c.id_prompt}')")
        seen.update(scene.characters)
        rows.append({"scene": i + 1, "prompt": scene.prompt, "seed": story.scene_seed(i), "characters": "; ".join(cells)})
    return rows
