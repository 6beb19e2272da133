"""Generating a story scene by scene, with one short function per method.

- ``vanilla``: the unmodified model, one scene at a time;
- ``csa``: StoryDiffusion's Consistent Self-Attention (``osa_lib.baselines``): reference scenes
  in one batch, then the others reading their bank;
- ``isolated``: the paper's Object Isolated Attention (``osa_lib.isolation``), filling a
  ``ReferenceBank`` with each character's first scene.

``generate_story`` checks the story against the backbone once, then hands a ``_Run`` to the
method's function.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .attention import AttentionStore, capture_attention
from .bank import ReferenceBank, drawn_with
from .baselines import CSABank, CSAConfig, CSAController, consistent_self_attention, csa_layers, reference_scenes
from .config import check_steps
from .isolation import (IsolationConfig, IsolationController, SceneCharacter, check_mask_resolution,
                        isolated_attention)
from .masks import subject_masks
from .story import Story, StoryError, check_prompts, seed_problem

__all__ = ["METHODS", "SceneResult", "StoryResult", "generate_story"]

METHODS = ("vanilla", "csa", "isolated")


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
    #: bytes of the method's bank (isolated: ``ReferenceBank``, CSA: ``CSABank``) kept on the
    #: generating device at the end of the story; 0 when there is none or it is on the host
    device_bank_bytes: int = 0

    @property
    def images(self) -> list[np.ndarray]:
        return [s.image for s in self.scenes]


@dataclass
class _Run:
    """What every method needs, checked once by ``generate_story``."""

    backbone: object
    story: Story
    seeds: list[int]  # one per scene (``Story.scene_seed``)
    sampler: dict  # keyword arguments of ``Backbone.denoise``
    config: IsolationConfig
    record_masks: bool
    progress: bool
    latents: torch.Tensor | None = None  # (S, C, h, w) each scene's starting noise; None: from its seed
    scene_hook: Callable | None = None

    @property
    def unet_calls(self) -> int:
        """U-Net calls per scene (the sampler's timesteps): what the method's step windows count."""
        return self.backbone.unet_calls(self.sampler["num_inference_steps"])

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.backbone.latent_shape[1:])

    def noise(self, indices: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """(B, C, h, w) starting noise of these scenes (the given latents, or each scene's seed's)
        and each scene's seeded generator, which an ancestral or SDE sampler draws from next."""
        noise, generators = self.backbone.noise([self.seeds[i] for i in indices])
        if self.latents is not None:
            noise = self.latents[indices].to(self.backbone.device, self.backbone.dtype)
        return noise, generators

    def scenes(self, desc: str):
        """Scene indices, with a progress bar when asked for."""
        return tqdm(range(len(self.story.scenes)), desc=desc, disable=not self.progress)

    def result(self, i: int, image: np.ndarray, seconds: float, masks=None, messages=()) -> SceneResult:
        scene = self.story.scenes[i]
        return SceneResult(i, scene.prompt, scene.characters, self.seeds[i], image, seconds, masks, list(messages))


def generate_story(backbone, story: Story, method: str = "isolated", config: IsolationConfig | None = None,
                   bank: ReferenceBank | None = None, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None, csa_rate: float | None = None,
                   csa_config: CSAConfig | None = None, record_masks: bool = False,
                   progress: bool = True, initial_latents: torch.Tensor | None = None,
                   scene_hook: Callable | None = None, describe: bool | None = None) -> StoryResult:
    """Generate a story scene by scene.

    Args:
        method: "isolated" (the paper), "vanilla" (unmodified model) or "csa" (StoryDiffusion's
            Consistent Self-Attention: reference scenes in one batch, then the others reading
            their bank; see ``osa_lib.baselines``).
        config: the method's switches (default ``backbone.isolation_config()``: the paper's
            values; ``isolation_config(tuned=True)`` for a model's tuned ones); for vanilla and CSA its
            mask settings make the recorded masks.
        bank: a reference bank to continue from (characters in it are "returning"); a new one
            is made when None. It is filled in place and returned in the result.
        csa_rate: CSA's token sampling rate at every resolution (shorthand for ``csa_config``).
        csa_config: CSA's switches (``CSAConfig()``: StoryDiffusion's defaults).
        record_masks: vanilla and CSA: also record the up-block cross-attention maps and keep
            each scene's masks, made as isolated attention makes them (for IIS crops). Isolated
            scenes always keep theirs. The images are the same either way.
        scene_hook: isolated only: called as ``scene_hook(i, controller)`` before scene ``i``'s
            U-Net runs; a context manager it returns stays open while it runs (``osa_lib.inside_block``
            records one layer's inputs and outputs with it). None: nothing is called.
        describe: put each character's description into its scene prompts, for every method
            (``Story.with_descriptions``); None (default): as the story says
            (``describe_characters``). The results' prompts are the ones drawn.
    """
    if method not in METHODS:
        raise StoryError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if describe is not None and not isinstance(describe, bool):
        raise StoryError(f"describe={describe!r} must be True, False or None (the story's describe_characters)")
    if story.describe_characters if describe is None else describe:
        story = story.with_descriptions()
    check_prompts(backbone, story)
    steps = check_steps(num_inference_steps, backbone.default_steps)
    known = bank.characters if bank is not None else []  # a continued story: these are not introduced here
    seeds = [story.scene_seed(i, known) for i in range(len(story.scenes))]
    for i, seed in enumerate(seeds):  # a seed offset can push a valid seed out of range
        if seed_problem(seed):
            raise StoryError(f"{story.source}: scene {i + 1}, seed: {seed_problem(seed)}")
    config = config or backbone.isolation_config()
    config.validate()  # a config changed after it was made
    _check_initial_latents(initial_latents, len(story.scenes), backbone.latent_shape)
    run = _Run(backbone, story, seeds, dict(num_inference_steps=steps, guidance_scale=guidance_scale, progress=False),
               config, record_masks, progress, initial_latents, scene_hook)
    if method == "vanilla":
        return _generate_vanilla(run)
    if method == "csa":
        if csa_config is None:
            csa_config = CSAConfig() if csa_rate is None else CSAConfig.with_rate(csa_rate)
        return _generate_csa(run, csa_config)
    return _generate_isolated(run, bank)


def _check_initial_latents(latents, n_scenes: int, latent_shape) -> None:
    """Refuse starting noise that does not fit the story and backbone, before any generation."""
    if latents is None:
        return
    expected = (n_scenes, *latent_shape)
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise StoryError(f"initial_latents must be a tensor of shape {expected} (one latent per scene), got {shape}; "
                         f"pass None to start every scene from its seed's noise")
    if not torch.isfinite(latents).all():
        raise StoryError("initial_latents holds NaN or inf; the sampler would return NaN images")


def _generate_vanilla(run: _Run) -> StoryResult:
    """The unmodified model, one scene per U-Net batch."""
    return StoryResult("vanilla", [_plain_scene(run, i) for i in run.scenes("vanilla story")])


def _generate_isolated(run: _Run, bank: ReferenceBank | None) -> StoryResult:
    """Object Isolated Attention: each scene reads its returning characters' references from
    ``bank`` and writes its new characters' references into it."""
    steps = run.sampler["num_inference_steps"]
    check_mask_resolution(run.backbone.unet, run.latent_hw, run.config)
    drawn = drawn_with(run.backbone, steps)
    if bank is None:
        bank = ReferenceBank(run.backbone.name, run.latent_hw, steps, device=run.backbone.bank_device, drawn=drawn)
    else:
        bank.check_compatible(run.backbone.name, run.latent_hw, steps, drawn)
        for name, c in run.story.characters.items():
            bank.check_identity(name, c.id_prompt, c.word)
    results = [_isolated_scene(run, i, bank) if run.story.scenes[i].characters else _plain_scene(run, i)
               for i in run.scenes("isolated story")]
    on_device = bank.device.type == torch.device(run.backbone.device).type != "cpu"
    return StoryResult("isolated", results, bank, bank.nbytes() if on_device else 0)


def _generate_csa(run: _Run, csa: CSAConfig) -> StoryResult:
    """StoryDiffusion's order: each character's reference scenes together in one batch (write
    mode, filling the bank), then every other scene on its own, reading the bank entries of its
    characters' references (``process_generation`` in its SDXL app)."""
    story = run.story
    refs = reference_scenes(story, csa.id_length)
    layers = csa_layers(run.backbone.unet)
    bank, results = CSABank(device=run.backbone.bank_device), {}
    batches = []
    for name in story.characters:  # one write batch per character, scenes not drawn yet
        batch = [i for i in refs[name] if all(i not in b for b in batches)]
        if batch:
            batches.append(batch)
    written = {i for b in batches for i in b}
    batches += [[i] for i in range(len(story.scenes)) if i not in written]
    for batch in tqdm(batches, desc="csa story", disable=not run.progress):
        started = time.perf_counter()
        seed = run.seeds[batch[0]]
        if batch[0] in written:
            controller = CSAController(layers, run.latent_hw, csa, seed, write_keys=batch, bank=bank)
        else:
            keys = list(dict.fromkeys(k for n in story.scenes[batch[0]].characters for k in refs[n]))
            controller = CSAController(layers, run.latent_hw, csa, seed, read_keys=keys, bank=bank)
        images, masks = _generate_batch(run, batch, csa=controller)
        per_scene = (time.perf_counter() - started) / len(batch)
        for i, image, mask in zip(batch, images, masks):
            results[i] = run.result(i, image, per_scene, mask)
    device = torch.device(run.backbone.device)
    on_device = sum(t.numel() * t.element_size() for steps in bank.entries.values() for layers in steps.values()
                    for t in layers.values() if t.device.type == device.type != "cpu")
    return StoryResult("csa", [results[i] for i in range(len(story.scenes))], None, on_device)


def _plain_scene(run: _Run, i: int) -> SceneResult:
    """Scene ``i`` from the unmodified model (its masks recorded with ``record_masks``)."""
    started = time.perf_counter()
    images, masks = _generate_batch(run, [i])
    return run.result(i, images[0], time.perf_counter() - started, masks[0])


def _isolated_scene(run: _Run, i: int, bank: ReferenceBank) -> SceneResult:
    """Scene ``i`` under isolated attention; its new characters' identities go into ``bank``."""
    backbone, story, scene = run.backbone, run.story, run.story.scenes[i]
    started = time.perf_counter()
    characters = [SceneCharacter(name, backbone.token_positions(scene.prompt, story.characters[name].word),
                                 backbone.encode_text([story.characters[name].id_prompt])[0],
                                 is_new=name not in bank)
                  for name in scene.characters]
    config = run.config
    if all(c.is_new for c in characters):  # first scene of everyone: no references yet; the ID prompts
        solo_off = len(characters) == 1 and not config.solo_cross  # blend in (Eq. 6), even alone
        config = dataclasses.replace(config, isolated_self=False, isolated_cross=config.isolated_cross and not solo_off)
    controller = IsolationController(characters, run.latent_hw, run.unet_calls, config, bank)
    hook = run.scene_hook(i, controller) if run.scene_hook is not None else None
    noise, generators = run.noise([i])
    with isolated_attention(backbone.unet, controller), hook if hook is not None else nullcontext():
        latents = backbone.denoise(backbone.encode([scene.prompt]), noise, callback=controller.step_callback,
                                   generator=generators, **run.sampler)
    for c in characters:
        if c.is_new:
            bank.set_identity(c.name, story.characters[c.name].id_prompt, story.characters[c.name].word)
    image = backbone.decode(latents)[0]
    masks = controller.masks.masks[0].cpu().numpy() if controller.masks is not None else None
    return run.result(i, image, time.perf_counter() - started, masks, controller.messages)


def _generate_batch(run: _Run, indices: list[int], csa: CSAController | None = None):
    """Images (and, with ``record_masks``, each scene's masks) of scenes generated together in one
    batch, vanilla or under CSA. Recording the cross-attention maps does not change the images."""
    backbone, story = run.backbone, run.story
    scenes = [story.scenes[i] for i in indices]
    groups = [[backbone.token_positions(s.prompt, story.characters[n].word) for n in s.characters] for s in scenes]
    counts = [len(g) for g in groups]
    record = run.record_masks and max(counts) > 0
    with ExitStack() as stack:
        callback = None
        if record:  # scenes of a batch may name different numbers of characters: pad, then slice
            width = max(counts)
            padded = [g + [g[-1] if g else [0]] * (width - len(g)) for g in groups]
            store = AttentionStore(padded, run.latent_hw)
            stack.enter_context(capture_attention(backbone.unet, store, places=("up",)))
            callback = store.step_callback
        if csa is not None:
            stack.enter_context(consistent_self_attention(backbone.unet, csa))
        noise, generators = run.noise(indices)
        latents = backbone.denoise(backbone.encode([s.prompt for s in scenes]), noise, callback=callback,
                                   generator=generators, **run.sampler)
    images = backbone.decode(latents)
    masks = _recorded_masks(store, counts, run.config) if record else [None] * len(scenes)
    return images, masks


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
                              min_fraction=config.min_fraction, max_fraction=config.max_fraction,
                              area_cap=config.mask_area_cap, one_region=config.one_region)
        out.append(masks.masks[0].cpu().numpy())  # maps stay on the U-Net's device
    return out
