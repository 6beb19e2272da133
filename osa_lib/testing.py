"""SDXL without the hub, for offline tests: tiny random SDXL and the full-size architecture with random weights.

``build_tiny_sdxl_pipeline`` builds an SDXL-shaped pipeline with tiny random weights (same classes
and code paths as SDXL; ``load_backbone("sdxl-tiny")``); ``build_random_sdxl_pipeline`` the full
SDXL architecture from the configs in ``data/sdxl_random`` (``load_backbone("sdxl-random")``);
``build_tiny_clip_tokenizer`` the small byte-level CLIP tokenizer both use. ``SDXL_UNET_CONFIG``
holds SDXL base 1.0's shape-relevant U-Net keys, for building it on the meta device.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .shipped import DATA_DIR

__all__ = ["build_tiny_sdxl_pipeline", "build_tiny_clip_tokenizer", "build_random_sdxl_pipeline", "SDXL_UNET_CONFIG",
           "SDXL_RANDOM_DIR"]

SDXL_UNET_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (shape-relevant keys)
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
SDXL_RANDOM_DIR = DATA_DIR / "sdxl_random"


# --- tiny SDXL, for offline tests -----------------------------------------------------------
_TINY_WORDS = ("a", "girl", "boy", "with", "blonde", "black", "hair", "dress", "red", "in", "the",
               "park", "and", "cat", "dog", "reading", "book", "on", "beach", "snow")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable unicode character per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def build_tiny_clip_tokenizer():
    """A real ``CLIPTokenizer`` over a small byte-level BPE vocabulary built here, offline.

    Every byte is a token, and each word of a short list is merged into one token, so prompts
    tokenise like CLIP's (a word may be one token or several).
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in _byte_symbols():
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:  # merge each word left to right into one token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current = current + piece
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_sdxl_pipeline(seed: int = 0):
    """SDXL-shaped pipeline with tiny random weights: same classes and code paths as SDXL."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32, norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, sample_size=32)
    text_config = dict(bos_token_id=0, eos_token_id=1, hidden_size=16, intermediate_size=37, num_attention_heads=4,
                       num_hidden_layers=2, pad_token_id=1, hidden_act="gelu", projection_dim=32)
    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer()
    text_config["vocab_size"] = len(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def build_random_sdxl_pipeline(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                               config_dir: str | Path | None = None):
    """The full-size SDXL architecture with random weights, from the configs in ``data/sdxl_random``.

    Parameters are created directly on ``device`` in ``dtype`` (about 7 GB in fp16/bf16: U-Net
    2.6 B, text encoders 0.8 B parameters), nothing is downloaded. The tokenizers are the tiny
    local ones of ``sdxl-tiny``, so both text encoders take its vocabulary size and EOS id; every
    other shape is SDXL base 1.0's (see ``data/sdxl_random/README.md``).
    """
    import json

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(config_dir) if config_dir else SDXL_RANDOM_DIR
    config = {part: json.loads((folder / part / "config.json").read_text())
              for part in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")}
    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer()
    for part in ("text_encoder", "text_encoder_2"):
        config[part].update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters made in dtype: no float32 copy of 3.5 B weights
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(config["unet"])
            vae = AutoencoderKL.from_config(config["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"]))
    finally:
        torch.set_default_dtype(previous)
    scheduler = EulerDiscreteScheduler.from_config(config["scheduler"])
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    return pipe.to(device=device, dtype=dtype)
