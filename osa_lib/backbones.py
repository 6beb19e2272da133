"""One interface over the two backbones: the toy model (default) and SDXL.

``load_backbone("toy")`` loads the project's own trained model: ``data/toy_model`` with the committed
fine-tune of its up blocks' self-attention (``data/toy_finetune``, ``osa_lib.toy.delta``); other
variants by name (``variant="base"``: without the fine-tune; ``osa_lib.toy.delta.TOY_VARIANTS`` says
how each was trained). The method runs with the paper's switches on every backbone; switches tuned
for a model are a labelled variant (``isolation_config(tuned=True)``);
``load_backbone("sdxl", model_id=..., device=..., dtype=...)`` loads a real
``StableDiffusionXLPipeline`` from the Hugging Face hub or a local folder;
``load_backbone("sdxl-tiny")`` builds tiny, randomly initialised SDXL components from configs
(as diffusers' own tests do) with a tokenizer made from local files, for offline tests;
``load_backbone("sdxl-random")`` builds the full-size SDXL architecture (configs written out in
``data/sdxl_random``) with random weights, for structure and performance checks.

SDXL runs as the stock ``StableDiffusionXLPipeline`` does: an empty negative prompt becomes zero
embeddings when the model's ``force_zeros_for_empty_prompt`` asks for it, an fp16 VAE whose
``config.force_upcast`` is set decodes in fp32, fp16 weights are fetched as ``variant="fp16"``.

One small class per kind of model: ``ToyBackbone`` and ``SDXLBackbone`` (real, tiny and random
SDXL share it) differ only in how they read prompts and decode latents; ``load_backbone`` looks the
name up in a registry of loaders (``_LOADERS``). Every backbone exposes the same small surface: ``encode`` (prompts -> conditioning with the
classifier-free-guidance batch ``[uncond; cond]``), ``encode_text`` (hidden states only, for ID
prompts), ``token_positions`` (where a word sits in a prompt), ``unet``, ``scheduler``,
``initial_latents`` / ``noise`` (one seed per image), ``timesteps`` (what the sampler visits), ``denoise`` (the loop, with a per-step callback and
``cross_attention_kwargs``) and ``decode`` (latents -> images).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from .config import SEED_RANGE, IsolationConfig, check_seed, check_steps, read_isolation_defaults
from .testing import (SDXL_RANDOM_DIR, SDXL_UNET_CONFIG, build_random_sdxl_pipeline, build_tiny_clip_tokenizer,
                      build_tiny_sdxl_pipeline)
from .toy.model import DEFAULT_GUIDANCE, DEFAULT_MODEL_DIR, DEFAULT_STEPS, LATENT_CHANNELS, LATENT_SIZE, ToyPipeline
from .toy.model import images_to_latents as toy_images_to_latents
from .toy.model import latents_to_images as toy_latents_to_images
from .toy.delta import DEFAULT_TOY_VARIANT, TOY_VARIANTS, load_toy_variant
from .toy.world import normalise_prompt, parse_caption

__all__ = ["Backbone", "ToyBackbone", "SDXLBackbone", "Conditioning", "load_backbone", "BACKBONES", "build_tiny_sdxl_pipeline",
           "build_tiny_clip_tokenizer", "build_random_sdxl_pipeline", "NonFiniteImageError", "SDXL_RANDOM_DIR", "SDXL_UNET_CONFIG",
           "check_steps", "check_seed", "SEED_RANGE", "read_isolation_defaults"]


class NonFiniteImageError(FloatingPointError):
    """A decoded image holds NaN or inf values (the usual cause: an fp16 VAE overflowing)."""


@dataclass
class Conditioning:
    """Text conditioning for one U-Net call with classifier-free guidance.

    ``hidden`` is ``(2B, T, D)``: the first B rows are the unconditional (negative) prompt,
    the last B the prompts, the batch layout every processor in this library relies on.
    ``added`` holds SDXL's extra conditioning (``text_embeds`` (2B, P), ``time_ids`` (2B, 6)).
    """

    hidden: torch.Tensor
    added: dict | None = None

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0] // 2


@dataclass
class Backbone:
    """A text-to-image diffusion model seen through the interface the method needs."""

    name: str
    pipe: object
    latent_shape: tuple[int, int, int]  # (C, h, w) of one latent
    device: torch.device
    dtype: torch.dtype
    default_steps: int = 25
    default_guidance: float = 4.0
    info: dict = field(default_factory=dict)
    #: ``IsolationConfig`` fields tuned for these weights (the toy: its fine-tune's or folder's
    #: ``isolation.json``; SDXL: none): a labelled variant, never the default
    tuned_isolation: dict = field(default_factory=dict)

    #: the images can be read back exactly (the toy world's analyzer and its metrics); SDXL's cannot
    has_ground_truth: ClassVar[bool] = False

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def bank_device(self) -> torch.device:
        """Where a new reference bank keeps its tokens: the generating device (no host/device
        copies in the denoising loop), or the CPU when the models are offloaded to save memory."""
        return torch.device("cpu") if self.info.get("cpu_offload") else torch.device(self.device)

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def isolation_config(self, tuned: bool = False, **overrides) -> IsolationConfig:
        """The method's switches: the paper's (``IsolationConfig()``), or with ``tuned`` the ones
        tuned for this model (``tuned_isolation``), then ``overrides``."""
        if tuned and not self.tuned_isolation:
            raise ValueError(f"this {self.name} backbone has no tuned isolation switches; use the paper's "
                             f"(tuned=False)")
        return IsolationConfig(**{**(self.tuned_isolation if tuned else {}), **overrides})

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    # --- text: what differs between kinds (ToyBackbone, SDXLBackbone) ---------------------
    def validate_prompt(self, prompt: str, id_prompt: bool = False) -> None:
        """Raise a clear error for a prompt this backbone cannot read (default: every prompt is read).

        ID prompts ("a red circle") name one character and no scene.
        """

    def tokenizer_text(self, text: str) -> str:
        """``text`` as the pipeline's tokenizer sees it (default: unchanged)."""
        return text

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Hidden states (B, T, D) of prompts, as the U-Net's cross-attention sees them."""
        raise NotImplementedError

    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        """Conditioning for the CFG batch ``[negative; prompts]``."""
        raise NotImplementedError

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) float in [0, 1], not yet checked for NaN."""
        raise NotImplementedError

    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float in [0, 1] -> latents (B, C, h, w): the inverse of ``decode_pixels``
        (to re-noise a finished image, ``osa_lib.locate``)."""
        raise NotImplementedError

    def token_positions(self, prompt: str, word: str) -> list[int]:
        """Indices of the token(s) of ``word`` in the tokenised ``prompt`` (all occurrences).

        Raises:
            ValueError: if the word is not in the prompt, naming the prompt's words.
        """
        tokenizer = self.tokenizer
        prompt, word = self.tokenizer_text(prompt), self.tokenizer_text(word)
        encoding = tokenizer(prompt)
        prompt_ids = encoding.input_ids
        word_ids = tokenizer(word.strip(), add_special_tokens=False).input_ids
        if not word_ids:
            raise ValueError(f"{word!r} is empty after tokenisation")
        n = len(word_ids)
        # which prompt word each token belongs to (None: special token). A BPE word's last piece
        # can equal a whole word ("cowboy" -> ... "boy</w>"), so a match must start and end at
        # word boundaries or T_m picks up pieces of other words.
        try:
            word_of = encoding.word_ids()  # (T,)
        except (ValueError, AttributeError):  # slow tokenizers have no word ids
            word_of = None

        def whole_words(i: int) -> bool:
            if word_of is None:
                return True
            starts = i == 0 or word_of[i - 1] != word_of[i]
            ends = i + n == len(word_of) or word_of[i + n] != word_of[i + n - 1]
            return starts and ends

        starts = [i for i in range(len(prompt_ids) - n + 1) if prompt_ids[i:i + n] == word_ids and whole_words(i)]
        if not starts:
            raise ValueError(f"word {word!r} does not occur in prompt {prompt!r}; its words are "
                             f"{prompt.split()}. Put the character's word in the scene prompt.")
        # the text encoder reads the start token, model_max_length - 2 tokens and the end token:
        # a token past the last real one (the end token's slot after truncation) is never read
        last = tokenizer.model_max_length - 2
        kept = [i for i in starts if i + n - 1 <= last]
        if not kept:
            raise ValueError(f"word {word!r} is at token {starts[0]} of prompt {prompt!r}, but the text encoder "
                             f"reads only tokens 1 to {last} (the first {tokenizer.model_max_length} tokens hold "
                             f"the start token, {last} words' tokens and the end token, which replaces token "
                             f"{last + 1} when the prompt is cut). Shorten the prompt or name the character earlier.")
        return [i + k for i in kept for k in range(n)]

    # --- sampling ---------------------------------------------------------------------
    def noise(self, seeds: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """(B, C, h, w) initial noise and, per seed, the CPU generator that drew it: ``denoise``
        draws an ancestral or SDE sampler's noise from it next (as diffusers' pipelines use one
        generator for both), so an image depends only on its own seed, never on the global RNG."""
        generators = [torch.Generator("cpu").manual_seed(check_seed(s)) for s in seeds]
        noise = [torch.randn(self.latent_shape, generator=g) for g in generators]
        return torch.stack(noise).to(self.device, self.dtype), generators

    def initial_latents(self, seeds: list[int]) -> torch.Tensor:
        """(B, C, h, w) noise, one CPU generator per seed, so a scene's noise depends only on its seed."""
        return self.noise(seeds)[0]

    def timesteps(self, num_inference_steps: int | None = None) -> torch.Tensor:
        """The timesteps the sampler visits for ``num_inference_steps`` steps, one U-Net call each: as
        many as the steps for a first-order sampler (Euler, DDIM), about twice as many for a
        second-order one (Heun, KDPM2). Step windows (warm-up, end, the bank's steps) count these."""
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(check_steps(num_inference_steps, self.default_steps), device="cpu")
        return scheduler.timesteps

    def unet_calls(self, num_inference_steps: int | None = None) -> int:
        """How many U-Net calls (timesteps) ``denoise`` makes for ``num_inference_steps`` steps."""
        return len(self.timesteps(num_inference_steps))

    def denoise(self, cond: Conditioning, latents: torch.Tensor, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, callback: Callable | None = None,
                cross_attention_kwargs: dict | None = None, progress: bool = True,
                generator: list[torch.Generator] | None = None) -> torch.Tensor:
        """Run the sampler from ``latents`` (B, C, h, w); returns the final latents.

        Args:
            callback: called as ``callback(call_index, timestep, latents)`` after every U-Net call
                (``unet_calls`` of them: two per step for a second-order sampler); processors can
                read the step through shared state they own.
            cross_attention_kwargs: passed to every attention processor.
            generator: one CPU generator per image (``noise``'s), from which a sampler that draws
                noise at every step (ancestral, SDE) draws it. None: one seeded 0 per image, so a
                run never reads the global RNG.
        """
        steps = check_steps(num_inference_steps, self.default_steps)
        guidance = self.default_guidance if guidance_scale is None else guidance_scale
        scheduler = copy.deepcopy(self.scheduler)  # samplers keep state; never share one
        scheduler.set_timesteps(steps, device=self.device)
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            if generator is None:
                generator = [torch.Generator("cpu").manual_seed(0) for _ in range(latents.shape[0])]
            if len(generator) != latents.shape[0]:
                raise ValueError(f"{len(generator)} generators for {latents.shape[0]} images; give one per image "
                                 f"(Backbone.noise(seeds) returns them)")
            step_kwargs["generator"] = generator
        latents = latents * scheduler.init_noise_sigma
        with torch.no_grad():
            for i, t in enumerate(tqdm(scheduler.timesteps, desc=f"{self.name} sampling", disable=not progress,
                                       leave=False)):
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                eps = self.unet(model_input, t, encoder_hidden_states=cond.hidden,
                                added_cond_kwargs=cond.added, cross_attention_kwargs=cross_attention_kwargs).sample
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)  # classifier-free guidance
                latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
                if callback is not None:
                    callback(i, t, latents)
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, check_finite: bool = True) -> np.ndarray:
        """Latents -> images (B, H, W, 3) float in [0, 1].

        Raises:
            NonFiniteImageError: if an image holds NaN/inf (``check_finite=False`` returns it).
        """
        images = self.decode_pixels(latents)
        if check_finite and not torch.isfinite(images).all():
            bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
            raise NonFiniteImageError(
                f"decoded image(s) {bad} of {len(images)} contain NaN/inf ({self.name}, VAE dtype "
                f"{getattr(getattr(self.pipe, 'vae', None), 'dtype', None)}, latents dtype {latents.dtype}). "
                f"The usual cause is an fp16 VAE overflowing: load in float32, keep the VAE config's "
                f"force_upcast=True (decodes in fp32), or use an fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix). "
                f"NaNs already in the latents come from the U-Net (fp16 overflow: try bfloat16 or float32).")
        return images.permute(0, 2, 3, 1).cpu().numpy()

    def generate(self, prompts: list[str], seeds: list[int], **kwargs) -> np.ndarray:
        """Vanilla text-to-image: one image (H, W, 3) per prompt and seed."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        check_steps(kwargs.get("num_inference_steps"), self.default_steps)  # before encoding anything
        latents, generators = self.noise(seeds)
        latents = self.denoise(self.encode(list(prompts)), latents, generator=generators, **kwargs)
        return self.decode(latents)


@dataclass
class ToyBackbone(Backbone):
    """The project's toy model (``osa_lib.toy.model.ToyPipeline``): a small grammar, one text encoder."""

    has_ground_truth: ClassVar[bool] = True

    def validate_prompt(self, prompt: str, id_prompt: bool = False) -> None:
        parse_caption(prompt, id_prompt=id_prompt)  # raises ValueError naming what the grammar expects

    def tokenizer_text(self, text: str) -> str:
        return normalise_prompt(text)  # the toy pipeline reads prompts lower case, without commas

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.pipe.encode_prompt(prompts).to(self.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        for p in prompts:
            self.validate_prompt(p)
        hidden = self.pipe.encode_prompt([negative_prompt] * len(prompts) + list(prompts))
        return Conditioning(hidden.to(self.dtype))

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        return toy_latents_to_images(latents.float())

    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return toy_images_to_latents(images.float() * 2 - 1).to(self.device, self.dtype)  # lossless


@dataclass
class SDXLBackbone(Backbone):
    """A ``StableDiffusionXLPipeline`` (real, tiny or random weights), run as the stock pipeline runs."""

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        embeds, *_ = self.pipe.encode_prompt(prompts, device=self.device, do_classifier_free_guidance=False)
        return embeds.to(self.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        # as the stock pipeline: an empty negative prompt is passed as None, so models with
        # force_zeros_for_empty_prompt (SDXL base) get zero embeddings, the others encode ""
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompts, device=self.device, do_classifier_free_guidance=True,
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None)
        size = (self.latent_shape[1] * self.pipe.vae_scale_factor,) * 2
        projection_dim = self.pipe.text_encoder_2.config.projection_dim
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=self.dtype,
                                               text_encoder_projection_dim=projection_dim)
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]).to(self.dtype),
                 "time_ids": time_ids.to(self.device).repeat(2 * len(prompts), 1)}
        return Conditioning(torch.cat([uncond, cond]).to(self.dtype), added)

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """As the stock pipeline decodes: an fp16 VAE with ``config.force_upcast`` decodes in fp32
        (SDXL's VAE overflows in fp16), then returns to fp16."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
        dtype = next(iter(vae.post_quant_conv.parameters())).dtype
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        try:
            images = vae.decode(latents.to(dtype)).sample
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        return (images.float() / 2 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize

    @torch.no_grad()
    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE's posterior mean, scaled as the pipeline scales latents (fp32 for an fp16 VAE
        with ``force_upcast``, as ``decode_pixels``)."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            dtype = next(iter(vae.encoder.parameters())).dtype
            latents = vae.encode((images * 2 - 1).to(vae.device, dtype)).latent_dist.mean
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = (latents - mean) * vae.config.scaling_factor / std
        else:
            latents = latents * vae.config.scaling_factor
        return latents.to(self.device, self.dtype)


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _place(pipe, device: torch.device, cpu_offload: bool) -> None:
    """Move an SDXL pipeline to ``device``, or offload whole models to the CPU between uses
    (diffusers' ``enable_model_cpu_offload``: the U-Net alone is on the GPU while it runs, so
    SDXL fits 12–16 GB cards; needs ``accelerate``)."""
    if cpu_offload:
        if device.type == "cpu":
            raise ValueError("cpu_offload=True offloads to the CPU from an accelerator; give device='cuda'")
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)


def _load_toy(model_id, device, dtype, cpu_offload, variant=None) -> Backbone:
    if model_id and variant:
        raise ValueError(f"give the toy backbone a model_id (a folder) or a variant ({list(TOY_VARIANTS)}), not both")
    if model_id:  # a pipeline folder as it is, with its own isolation.json if it has one
        folder = Path(model_id)
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(
                f"no toy model at {folder} (model_index.json missing). The trained model ships in "
                f"data/toy_model; retrain it with `python -m osa_lib.toy.train` or pass model_id=<folder>.")
        pipe, tuned, info = ToyPipeline.from_pretrained(folder), read_isolation_defaults(folder), {"model_dir": str(folder)}
    else:  # a named variant: data/toy_model with (or without) a committed fine-tune
        variant = variant or DEFAULT_TOY_VARIANT
        pipe, tuned, note = load_toy_variant(variant)
        info = {"model_dir": str(DEFAULT_MODEL_DIR), "variant": variant, "variant_note": note}
        if TOY_VARIANTS[variant][0] is not None:
            info["finetune"] = str(TOY_VARIANTS[variant][0])
    pipe.set_progress_bar_config(disable=True)
    dtype = dtype or torch.float32
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return ToyBackbone("toy", pipe, (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), device, dtype,
                       default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE, info=info,
                       tuned_isolation=tuned)


def _sdxl_backbone(name: str, pipe, device, dtype, default_steps: int = 30, **info) -> SDXLBackbone:
    pipe.set_progress_bar_config(disable=True)
    h = pipe.unet.config.sample_size
    return SDXLBackbone(name, pipe, (pipe.unet.config.in_channels, h, h), device, dtype,
                        default_steps=default_steps, default_guidance=5.0, info=info)


def _load_sdxl(model_id, device, dtype, cpu_offload) -> Backbone:
    from diffusers import StableDiffusionXLPipeline
    model_id = model_id or "stabilityai/stable-diffusion-xl-base-1.0"
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    local = Path(model_id).exists()
    # fp16 weights as the fp16 variant (half the download); a folder without that variant
    # falls back to its full-precision files, cast on load
    variants = ["fp16", None] if dtype == torch.float16 else [None]
    for variant in variants:
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                model_id, dtype=dtype, use_safetensors=True, local_files_only=local, variant=variant)
            break
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            if variant is not None and "variant" in str(error).lower():
                continue
            raise RuntimeError(
                f"could not load SDXL from {model_id!r} ({type(error).__name__}: {error}). Pass a local "
                f"folder with the diffusers layout, or a hub id on a machine with hub access and enough "
                f"disk (~7 GB with dtype=torch.float16, the fp16 variant; ~14 GB in float32). The toy "
                f"backbone needs neither: load_backbone('toy').") from error
    _place(pipe, device, cpu_offload)
    return _sdxl_backbone("sdxl", pipe, device, dtype, model_id=model_id)


def _load_sdxl_random(model_id, device, dtype, cpu_offload) -> Backbone:
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    pipe = build_random_sdxl_pipeline(device=device if not cpu_offload else "cpu", dtype=dtype)
    if cpu_offload:
        _place(pipe, device, cpu_offload)
    return _sdxl_backbone("sdxl-random", pipe, device, dtype, random_weights=True, configs=str(SDXL_RANDOM_DIR))


def _load_sdxl_tiny(model_id, device, dtype, cpu_offload) -> Backbone:
    dtype = dtype or torch.float32
    pipe = build_tiny_sdxl_pipeline()
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    _place(pipe, device, cpu_offload)
    return _sdxl_backbone("sdxl-tiny", pipe, device, dtype, default_steps=4, random_weights=True)


#: name -> loader(model_id, device, dtype, cpu_offload); one entry per kind of backbone
_LOADERS = {"toy": _load_toy, "sdxl": _load_sdxl, "sdxl-tiny": _load_sdxl_tiny, "sdxl-random": _load_sdxl_random}
BACKBONES = tuple(_LOADERS)


def load_backbone(name: str = "toy", model_id: str | None = None, device: str | None = None,
                  dtype: torch.dtype | None = None, cpu_offload: bool = False, variant: str | None = None) -> Backbone:
    """Load a backbone by name.

    Args:
        name: "toy" (default, the shipped toy model), "sdxl" (real SDXL through diffusers),
            "sdxl-tiny" (random tiny SDXL for offline tests) or "sdxl-random" (the full-size
            SDXL architecture with random weights, for structure and performance checks).
        model_id: toy: a pipeline folder, loaded as it is (default: ``data/toy_model`` with the
            fine-tune in ``data/toy_finetune``); sdxl: a hub id or a local
            folder (default ``stabilityai/stable-diffusion-xl-base-1.0``).
        variant: toy only, instead of ``model_id``: a named toy backbone from
            ``osa_lib.toy.delta.TOY_VARIANTS`` ("isolation-tuned", the default, or "base").
        device: "cpu", "cuda", ...; default: CUDA when available.
        dtype: default float32 (float16 for sdxl and sdxl-random on CUDA).
        cpu_offload: SDXL backbones: ``enable_model_cpu_offload`` instead of moving the whole
            pipeline to ``device`` (for 12–16 GB cards; slower).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
    if variant is not None and name != "toy":
        raise ValueError(f"variant= names a toy backbone ({list(TOY_VARIANTS)}); the {name} backbone has none")
    extra = {"variant": variant} if name == "toy" else {}
    backbone = _LOADERS[name](model_id, _resolve_device(device), dtype, cpu_offload, **extra)
    backbone.info["cpu_offload"] = bool(cpu_offload)
    return backbone
