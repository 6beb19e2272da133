"""Stories: a YAML file format, its validation, and the scene-by-scene generator.

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

The rule-based path (this module) always works: scene prompts are used as written, ID prompts
come from the file and subject tokens are found by ``Backbone.token_positions``. Every problem
is reported before any generation starts, naming the file, the scene and the field.
"""
from __future__ import annotations

import dataclasses
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from .attention import AttentionStore, capture_attention
from .backbones import check_seed, check_steps
from .bank import BankError, ReferenceBank, check_name
from .baselines import CSABank, CSAConfig, CSAController, consistent_self_attention, csa_layers, reference_scenes
from .isolation import (IsolationConfig, IsolationController, SceneCharacter, check_mask_resolution,
                        isolated_attention)
from .masks import subject_masks

__all__ = ["StoryError", "StoryCharacter", "StoryScene", "Story", "load_story", "parse_story", "SceneResult",
           "StoryResult", "generate_story", "describe_story", "rewrite_with_llm", "METHODS"]

METHODS = ("vanilla", "csa", "isolated")


class StoryError(ValueError):
    """A story file or story object that cannot be generated, with where and why."""


@dataclass
class StoryCharacter:
    name: str
    word: str
    id_prompt: str
    seed: int | None = None


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

    def with_seed_offset(self, offset: int) -> "Story":
        """The same story with every scene and character seed shifted (for multi-seed evaluation)."""
        chars = {n: dataclasses.replace(c, seed=None if c.seed is None else c.seed + offset)
                 for n, c in self.characters.items()}
        scenes = [dataclasses.replace(s, seed=s.seed + offset) for s in self.scenes]
        return Story(chars, scenes, self.title, self.source)

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
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", prompt.lower()) is not None


def _seed_problem(seed) -> str | None:
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
        if seed is not None and _seed_problem(seed):
            fail(f"{where}, field 'seed'", _seed_problem(seed))
        words[word] = name
        characters[name] = StoryCharacter(name, word, c["id_prompt"].strip(), seed)
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
        if _seed_problem(s["seed"]):
            fail(f"{where}, field 'seed'", _seed_problem(s["seed"]))
        scenes.append(StoryScene(s["prompt"].strip(), list(names), s["seed"]))
    return Story(characters, scenes, str(data.get("title", "")), source)


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


@dataclass
class SceneResult:
    index: int
    prompt: str
    characters: list[str]
    seed: int
    image: np.ndarray  # (H, W, 3) float in [0, 1]
    seconds: float
    masks: np.ndarray | None = None  # (M, h, w) bool, the masks of the last step (vanilla/CSA: record_masks)
    messages: list[str] = field(default_factory=list)


@dataclass
class StoryResult:
    method: str
    scenes: list[SceneResult]
    bank: ReferenceBank | None = None

    @property
    def images(self) -> list[np.ndarray]:
        return [s.image for s in self.scenes]


def _check_prompts(backbone, story: Story) -> None:
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


def _recorded_masks(store: AttentionStore, counts: list[int], config: IsolationConfig) -> list[np.ndarray | None]:
    """The masks isolated attention would have made from these maps: the running mean over all
    steps at the mask resolution, Otsu, reliability and the overlap rule (``subject_masks``)."""
    resolution = config.mask_resolution or store.mask_resolution()
    maps = list(store.maps(places=("up",), resolution=resolution).values())  # (B, M, h, w) per layer
    out = []
    for b, m in enumerate(counts):
        if m == 0:
            out.append(None)
            continue
        masks = subject_masks([a[b:b + 1, :m] for a in maps], rule=config.overlap_rule,
                              min_fraction=config.min_fraction, max_fraction=config.max_fraction)
        out.append(masks.masks[0].cpu().numpy())  # maps stay on the U-Net's device
    return out


def _generate_batch(backbone, story: Story, indices: list[int], seeds: list[int], kwargs: dict,
                    record_masks: bool, config: IsolationConfig, csa: CSAController | None = None):
    """Images (and, with ``record_masks``, each scene's masks) of scenes generated together in one
    batch, vanilla or under CSA. Recording the cross-attention maps does not change the images."""
    scenes = [story.scenes[i] for i in indices]
    groups = [[backbone.token_positions(s.prompt, story.characters[n].word) for n in s.characters] for s in scenes]
    counts = [len(g) for g in groups]
    record = record_masks and max(counts) > 0
    with ExitStack() as stack:
        callback = None
        if record:  # scenes of a batch may name different numbers of characters: pad, then slice
            width = max(counts)
            padded = [g + [g[-1] if g else [0]] * (width - len(g)) for g in groups]
            store = AttentionStore(padded, tuple(backbone.latent_shape[1:]))
            stack.enter_context(capture_attention(backbone.unet, store, places=("up",)))
            callback = store.step_callback
        if csa is not None:
            stack.enter_context(consistent_self_attention(backbone.unet, csa))
        latents = backbone.denoise(backbone.encode([s.prompt for s in scenes]), backbone.initial_latents(seeds),
                                   callback=callback, **kwargs)
    images = backbone.decode(latents)
    masks = _recorded_masks(store, counts, config) if record else [None] * len(scenes)
    return images, masks


def generate_story(backbone, story: Story, method: str = "isolated", config: IsolationConfig | None = None,
                   bank: ReferenceBank | None = None, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None, csa_rate: float | None = None,
                   csa_config: CSAConfig | None = None, record_masks: bool = False,
                   progress: bool = True) -> StoryResult:
    """Generate a story scene by scene.

    Args:
        method: "isolated" (the paper), "vanilla" (unmodified model) or "csa" (StoryDiffusion's
            Consistent Self-Attention: reference scenes in one batch, then the others reading
            their bank; see ``osa_lib.baselines``).
        config: the method's switches (``IsolationConfig()`` defaults); for vanilla and CSA its
            mask settings make the recorded masks.
        bank: a reference bank to continue from (characters in it are "returning"); a new one
            is made when None. It is filled in place and returned in the result.
        csa_rate: CSA's token sampling rate at every resolution (shorthand for ``csa_config``).
        csa_config: CSA's switches (``CSAConfig()``: StoryDiffusion's defaults).
        record_masks: vanilla and CSA: also record the up-block cross-attention maps and keep
            each scene's masks, made as isolated attention makes them (for IIS crops). Isolated
            scenes always keep theirs. The images are the same either way.
    """
    if method not in METHODS:
        raise StoryError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    _check_prompts(backbone, story)
    steps = check_steps(num_inference_steps, backbone.default_steps)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance_scale, progress=False)
    known = bank.characters if bank is not None else []  # a continued story: these are not introduced here
    seeds = [story.scene_seed(i, known) for i in range(len(story.scenes))]
    for i, seed in enumerate(seeds):  # a seed offset can push a valid seed out of range
        if _seed_problem(seed):
            raise StoryError(f"{story.source}: scene {i + 1}, seed: {_seed_problem(seed)}")
    config = config or IsolationConfig()
    config.validate()  # a config changed after it was made
    if method == "csa":
        if csa_config is None:
            csa_config = CSAConfig() if csa_rate is None else CSAConfig.with_rate(csa_rate)
        return _generate_csa(backbone, story, seeds, kwargs, csa_config, record_masks, config, progress)
    latent_hw = tuple(backbone.latent_shape[1:])
    if method == "isolated":
        check_mask_resolution(backbone.unet, latent_hw, config)
        if bank is None:
            bank = ReferenceBank(backbone.name, latent_hw, steps)
        else:
            bank.check_compatible(backbone.name, latent_hw, steps)
            for name, c in story.characters.items():
                bank.check_identity(name, c.id_prompt, c.word)
    results = []
    for i, scene in enumerate(tqdm(story.scenes, desc=f"{method} story", disable=not progress)):
        started = time.perf_counter()
        if method == "vanilla" or not scene.characters:
            images, masks = _generate_batch(backbone, story, [i], [seeds[i]], kwargs, record_masks, config)
            results.append(SceneResult(i, scene.prompt, scene.characters, seeds[i], images[0],
                                       time.perf_counter() - started, masks[0]))
            continue
        characters = [SceneCharacter(name, backbone.token_positions(scene.prompt, story.characters[name].word),
                                     backbone.encode_text([story.characters[name].id_prompt])[0],
                                     is_new=name not in bank)
                      for name in scene.characters]
        scene_config = config
        if all(c.is_new for c in characters):  # first scene of everyone: no references yet
            scene_config = dataclasses.replace(config, isolated_self=False,
                                               isolated_cross=config.isolated_cross and len(characters) > 1)
        controller = IsolationController(characters, latent_hw, steps, scene_config, bank)
        with isolated_attention(backbone.unet, controller):
            latents = backbone.denoise(backbone.encode([scene.prompt]), backbone.initial_latents([seeds[i]]),
                                       callback=controller.step_callback, **kwargs)
        for c in characters:
            if c.is_new:
                bank.set_identity(c.name, story.characters[c.name].id_prompt, story.characters[c.name].word)
        image = backbone.decode(latents)[0]
        masks = controller.masks.masks[0].cpu().numpy() if controller.masks is not None else None
        results.append(SceneResult(i, scene.prompt, scene.characters, seeds[i], image,
                                   time.perf_counter() - started, masks, controller.messages))
    return StoryResult(method, results, bank if method == "isolated" else None)


def _generate_csa(backbone, story: Story, seeds: list[int], kwargs: dict, csa: CSAConfig, record_masks: bool,
                  config: IsolationConfig, progress: bool) -> StoryResult:
    """StoryDiffusion's order: each character's reference scenes together in one batch (write
    mode, filling the bank), then every other scene on its own, reading the bank entries of its
    characters' references (``process_generation`` in its SDXL app)."""
    refs = reference_scenes(story, csa.id_length)
    layers = csa_layers(backbone.unet)
    latent_hw = tuple(backbone.latent_shape[1:])
    bank, results = CSABank(), {}
    batches = []
    for name in story.characters:  # one write batch per character, scenes not drawn yet
        batch = [i for i in refs[name] if all(i not in b for b in batches)]
        if batch:
            batches.append(batch)
    written = {i for b in batches for i in b}
    batches += [[i] for i in range(len(story.scenes)) if i not in written]
    for batch in tqdm(batches, desc="csa story", disable=not progress):
        started = time.perf_counter()
        if batch[0] in written:
            controller = CSAController(layers, latent_hw, csa, seeds[batch[0]], write_keys=batch, bank=bank)
        else:
            scene = story.scenes[batch[0]]
            keys = list(dict.fromkeys(k for n in scene.characters for k in refs[n]))
            controller = CSAController(layers, latent_hw, csa, seeds[batch[0]], read_keys=keys, bank=bank)
        images, masks = _generate_batch(backbone, story, batch, [seeds[i] for i in batch], kwargs, record_masks,
                                        config, csa=controller)
        per_scene = (time.perf_counter() - started) / len(batch)
        for i, image, mask in zip(batch, images, masks):
            s = story.scenes[i]
            results[i] = SceneResult(i, s.prompt, s.characters, seeds[i], image, per_scene, mask)
    return StoryResult("csa", [results[i] for i in range(len(story.scenes))])


def describe_story(backbone, story: Story) -> list[dict]:
    """What the rule-based path derives per scene: prompt, characters, subject tokens, new/returning."""
    _check_prompts(backbone, story)
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


LLM_INSTRUCTION = ("Rewrite this scene description as one short image prompt. Name every character with "
                   "exactly its word ({words}). Remove pronouns. Scene: {prompt}\nPrompt:")


def rewrite_with_llm(story: Story, model: str, max_new_tokens: int = 40, generator=None) -> Story:
    """Optional: let a local text-generation model rewrite each scene prompt (the paper uses an LLM
    to disambiguate stories). Off by default; the rule-based path never needs it.

    The rewritten story goes through the same validation as a story file, so a rewrite that drops
    a character's word, or that the backbone cannot read, is an error naming the scene.

    Args:
        model: a local folder or model id of a ``transformers`` causal LM (nothing is downloaded
            on machines without hub access), or a ready ``transformers`` text-generation pipeline.
    """
    if generator is None:
        from transformers import pipeline
        try:
            generator = pipeline("text-generation", model=model)
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise StoryError(f"cannot load the rewrite model {model!r} ({type(error).__name__}: {error}); "
                             f"pass a local folder of a transformers causal LM, or skip the rewrite") from error
    data = {"title": story.title, "characters": [dataclasses.asdict(c) for c in story.characters.values()],
            "scenes": []}
    for scene in story.scenes:
        words = ", ".join(story.characters[n].word for n in scene.characters) or "none"
        request = LLM_INSTRUCTION.format(words=words, prompt=scene.prompt)
        text = generator(request, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)[0]["generated_text"]
        rewritten = text.strip().splitlines()[0].strip() if text.strip() else ""
        data["scenes"].append({"prompt": rewritten, "characters": list(scene.characters), "seed": scene.seed})
    for c in data["characters"]:
        if c["seed"] is None:
            del c["seed"]
    return parse_story(data, f"{story.source} (rewritten by {model})")
