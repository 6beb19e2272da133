"""The toy text-to-image model: a pixel-space diffusers pipeline trained on the toy world.

Components, all standard Hugging Face classes so that the method's code paths are the same
as for SDXL:
- ``tokenizer``: a word-level ``PreTrainedTokenizerFast`` built locally from the world's
  vocabulary (no download), one token per word plus ``<bos>``/``<eos>``/``<pad>``.
- ``text_encoder``: a small ``CLIPTextModel`` (causal, like SDXL's encoders), trained from
  scratch; its ``last_hidden_state`` conditions the U-Net.
- ``unet``: a ``UNet2DConditionModel`` on a 12x16x16 "latent": the 3x32x32 image rearranged by
  a fixed, lossless space-to-depth (``pixel_unshuffle``) - the toy's stand-in for SDXL's VAE,
  which makes CPU training about 3x faster. Cross-attention at 16x16 and 8x8 in the down, mid
  and up blocks.
- ``scheduler``: ``DDIMScheduler`` for sampling, v-prediction with "trailing" timesteps so
  sampling starts at the last training step (training uses DDPM noise with the same betas).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from ..shipped import DATA_DIR
from .world import IMAGE_SIZE, VOCABULARY, normalise_prompt, parse_caption

__all__ = ["ToyPipeline", "build_tokenizer", "build_toy_pipeline", "images_to_latents",
           "latents_to_images", "MAX_TOKENS", "TEXT_BLOCKS", "DEFAULT_MODEL_DIR", "DEFAULT_GUIDANCE",
           "DEFAULT_STEPS"]

MAX_TOKENS = 16  # longest caption (3 characters) is 14 words + <bos> + <eos>
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
LATENT_CHANNELS, LATENT_SIZE = 12, IMAGE_SIZE // 2
DEFAULT_MODEL_DIR = DATA_DIR / "toy_model"  # data/toy_model in a clone, or the copy an installed wheel carries
# Classifier-free guidance scale, picked by scripts/research/tune_guidance.py on validation prompts from the
# training distribution (not the held-out test prompts): on the 12,590-step weights 1.5 beat
# 1, 1.25, 2, 2.5, 3 and 4 there (README, "Guidance scale").
DEFAULT_GUIDANCE = 1.5
DEFAULT_STEPS = 25  # DDIM steps, used by ToyPipeline and load_backbone("toy")


def images_to_latents(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) in [-1, 1] -> (B, 12, 16, 16): lossless space-to-depth."""
    return torch.nn.functional.pixel_unshuffle(images, 2)


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """(B, 12, 16, 16) -> (B, 3, 32, 32) in [0, 1]; the toy's "VAE decode"."""
    return (torch.nn.functional.pixel_shuffle(latents, 2).clamp(-1, 1) + 1) / 2


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the toy vocabulary, built from nothing but the word list."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + VOCABULARY)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=MAX_TOKENS)


TEXT_BLOCKS = ("all", "up")


def build_toy_pipeline(seed: int = 0, text_layers: int = 1, text_blocks: str = "up", heads: int = 4,
                       text_dim: int = 128, phrase_wise: bool = True, levels: int = 3) -> "ToyPipeline":
    """A freshly initialised (untrained) toy pipeline; ``osa_lib.toy.train`` trains it. The
    defaults are the shipped model's architecture (1-layer phrase-wise text encoder, text in the
    up blocks only); the README's "Which layers make the masks" says why.

    ``text_layers`` = transformer layers of the text encoder. With 0, each token's embedding is
    its word plus its position and nothing else: no token can carry the whole caption.
    ``text_blocks`` = which U-Net blocks see the text: "all" (cross-attention in down, mid and
    up blocks) or "up" (only the up blocks, where the method reads its masks; the down and mid
    blocks then have no cross-attention, and the mid block is a single ResNet block).
    ``heads`` = attention heads of every U-Net transformer block (the weights' shapes do not
    depend on it, so a fine-tune may change it).
    ``text_dim`` = width of the text embeddings (the U-Net's ``cross_attention_dim``). A narrow
    one is an information bottleneck: a token cannot carry much more than its own word, and an
    average over many tokens cannot hold every character's words at once.
    ``phrase_wise`` = encode each phrase of a caption on its own (see ``ToyPipeline.embed_ids``).
    ``levels`` = U-Net resolutions: 3 (16, 8 and 4) or 2 (16 and 8). Without the 4x4 level a 3x3
    convolution no longer sees nearly the whole image at once, so coordinating distant pixels
    (two scenes' copies of one character) is left to self-attention."""
    if levels not in (2, 3):
        raise ValueError(f"levels must be 2 or 3, got {levels!r}")
    if text_blocks not in TEXT_BLOCKS:
        raise ValueError(f"text_blocks must be one of {TEXT_BLOCKS}, got {text_blocks!r}")
    text_down = text_blocks == "all"
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
        num_hidden_layers=text_layers, num_attention_heads=max(1, min(4, text_dim // 8)),
        max_position_embeddings=MAX_TOKENS, pad_token_id=0,
        bos_token_id=1, eos_token_id=2))
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        layers_per_block=1, block_out_channels=(64, 96, 128)[:levels],
        down_block_types=(("CrossAttnDownBlock2D",) * 2 if text_down else ("DownBlock2D",) * 2) + ("DownBlock2D",) * (levels - 2),
        mid_block_type="UNetMidBlock2DCrossAttn" if text_down else "UNetMidBlock2D",
        up_block_types=("UpBlock2D",) * (levels - 2) + ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=heads, norm_num_groups=16)  # diffusers: = heads
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, prediction_type="v_prediction",
                              timestep_spacing="trailing")
    return ToyPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                       phrase_wise=phrase_wise)


class ToyPipeline(DiffusionPipeline):
    """Text-to-image in pixel space for the toy world, with classifier-free guidance."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler, phrase_wise: bool = False):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(phrase_wise=phrase_wise)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings (B, T, text_dim) of token ids (B, T), with gradients (training uses it).

        With ``phrase_wise`` each phrase is encoded as a sequence of its own, with positions from
        0: "<bos> a red circle | and a blue square | in the snow | <eos> | <pad> | ...". A
        character's tokens then carry its own words and nothing else, and no token's position
        says which character it belongs to - the structured text encoding of Feng et al. 2023
        ("StructureDiffusion"), which encodes noun phrases apart to help attribute binding."""
        if not self.config.phrase_wise:
            return self.text_encoder(ids).last_hidden_state
        starts = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<bos>", "and", "in", "<eos>", "<pad>")}
        batch, length = ids.shape
        segment_of = np.zeros((batch, length), np.int64)  # which phrase each token belongs to
        offset_in = np.zeros((batch, length), np.int64)  # and its position inside that phrase
        gather = []  # per phrase: flat indices into ids
        for b, row in enumerate(ids.tolist()):
            first = 0
            for i in range(1, length + 1):
                if i == length or row[i] in starts:
                    segment_of[b, first:i], offset_in[b, first:i] = len(gather), np.arange(i - first)
                    gather.append(b * length + np.arange(first, i))
                    first = i
        width = max(len(g) for g in gather)
        index = np.full((len(gather), width), -1, np.int64)  # (S, width), -1 = right padding
        for k, g in enumerate(gather):
            index[k, :len(g)] = g
        index = torch.from_numpy(index).to(ids.device)
        pieces = torch.where(index >= 0, ids.flatten()[index.clamp(min=0)], 0)  # (S, width), <pad> = 0
        hidden = self.text_encoder(pieces).last_hidden_state  # (S, width, D); causal, so padding is unseen
        return hidden[torch.from_numpy(segment_of).to(ids.device), torch.from_numpy(offset_in).to(ids.device)]  # (B, T, D)

    def tokenize(self, prompts: list[str], validate: bool = True) -> torch.Tensor:
        """Token ids (B, MAX_TOKENS) of the normalised prompts (``normalise_prompt``: case, commas and a
        final full stop do not change the ids); every non-empty prompt is checked against the grammar."""
        prompts = [normalise_prompt(p) for p in prompts]
        if validate:
            for p in prompts:
                if p:
                    parse_caption(p, id_prompt=len(p.split()) <= 3 and " in " not in f" {p} ")
        return self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, MAX_TOKENS, text_dim)."""
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return self.embed_ids(ids)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, generator: torch.Generator | None = None,
                 output_type: str = "np"):
        """Sample images; returns (B, H, W, 3) float in [0, 1] (``output_type="np"``) or a tensor."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt([""] * len(prompts))
        device = self.unet.device
        x = torch.randn((len(prompts), LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), generator=generator,
                        device="cpu").to(device)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            out_u, out_c = self.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
            guided = out_u + guidance_scale * (out_c - out_u)  # v (or epsilon, per scheduler config)
            x = self.scheduler.step(guided, t, x).prev_sample
        images = latents_to_images(x)
        return images.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else images
