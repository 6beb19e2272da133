"""Finding a U-Net's attention layers and installing processors: the one leaf every processor builds on.

- ``find_attention_layers`` is the only code that reads diffusers' layer names
  (``up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor``: place "up", block 1,
  ``attn1`` self- / ``attn2`` cross-attention) and turns them into ``LayerInfo`` records;
- ``installed_processors`` swaps processors in and always restores the originals;
- ``attention_prologue`` / ``attention_epilogue`` / ``split_heads`` / ``merge_heads`` /
  ``project_context`` are the pieces of diffusers' ``AttnProcessor2_0`` that the processors of
  ``attention``, ``isolation``, ``baselines`` and ``toy.reference`` share.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["LayerInfo", "find_attention_layers", "installed_processors", "attention_prologue", "attention_epilogue",
           "split_heads", "merge_heads", "project_context"]

_NAME = re.compile(r"^(down|mid|up)_blocks?\.?(\d*).*\.(attn1|attn2)\.processor$")


@dataclass(frozen=True)
class LayerInfo:
    """Where an attention layer sits: place, block, kind and its feature-map scale."""

    name: str  # key in unet.attn_processors
    place: str  # "down" | "mid" | "up"
    block: int
    kind: str  # "self" | "cross"
    downscale: int  # feature map = latent size // downscale

    def resolution(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] // self.downscale, latent_hw[1] // self.downscale

    def label(self, latent_hw: tuple[int, int]) -> str:
        """A short name, unique within a U-Net, for figures: place and block, the attention module
        (``a``) and transformer block (``t``) inside it when there are several, and the map size,
        e.g. ``"up1 a0 8×8"``."""
        parts = [f"{self.place}{self.block}"]
        attention = re.search(r"attentions\.(\d+)", self.name)
        block = re.search(r"transformer_blocks\.(\d+)", self.name)
        if attention:
            parts.append(f"a{attention.group(1)}")
        if block and block.group(1) != "0":
            parts.append(f"t{block.group(1)}")
        h, w = self.resolution(latent_hw)
        return " ".join(parts) + f" {h}×{w}"


def find_attention_layers(unet, kind: str | None = None, places: tuple[str, ...] | None = None,
                          resolutions: tuple[int, ...] | None = None, latent_hw: tuple[int, int] | None = None,
                          ) -> list[LayerInfo]:
    """Attention layers of a ``UNet2DConditionModel`` matching the filters.

    Args:
        kind: "self" or "cross" (None: both).
        places: subset of ("down", "mid", "up") (None: all).
        resolutions: feature-map heights to keep, e.g. (16,), needs ``latent_hw``.

    Raises:
        ValueError: when nothing matches, listing what exists.
    """
    n_down = len(unet.down_blocks)
    n_up = len(unet.up_blocks)
    found = []
    for name in unet.attn_processors:
        match = _NAME.match(name)
        if not match:
            continue
        place, block, attn = match.group(1), int(match.group(2) or 0), match.group(3)
        downscale = {"down": 2 ** block, "mid": 2 ** (n_down - 1), "up": 2 ** (n_up - 1 - block)}[place]
        found.append(LayerInfo(name, place, block, "self" if attn == "attn1" else "cross", downscale))
    if latent_hw is None:
        latent_hw = (unet.config.sample_size,) * 2
    chosen = [layer for layer in found
              if (kind is None or layer.kind == kind) and (places is None or layer.place in places)
              and (resolutions is None or layer.resolution(latent_hw)[0] in resolutions)]
    if not chosen:
        available = sorted({(l.place, l.kind, l.resolution(latent_hw)[0]) for l in found})
        raise ValueError(f"no attention layer matches kind={kind!r}, places={places!r}, "
                         f"resolutions={resolutions!r}; this U-Net has (place, kind, resolution): {available}")
    return chosen


@contextmanager
def installed_processors(unet, processors: dict):
    """Install ``processors`` (name -> processor) on top of the current ones; restore on exit.

    ``set_attn_processor`` consumes the dict it is given, so it always receives a copy.
    """
    original = dict(unet.attn_processors)
    unknown = set(processors) - set(original)
    if unknown:
        raise KeyError(f"not attention processors of this U-Net: {sorted(unknown)[:3]}...")
    merged = dict(original)
    merged.update(processors)
    unet.set_attn_processor(dict(merged))
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))


# --- the pieces of diffusers' AttnProcessor2_0, reusable by every processor here -----------
def attention_prologue(attn, hidden_states, temb=None):
    """Spatial/group norm and (B, C, H, W) -> (B, N, C) as diffusers does; returns state to undo it."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape4d = hidden_states.shape if hidden_states.ndim == 4 else None
    if shape4d is not None:
        b, c, h, w = shape4d
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, (residual, shape4d)


def attention_epilogue(attn, out, saved):
    """Output projection, reshape back, residual and rescale (diffusers' order)."""
    residual, shape4d = saved
    out = attn.to_out[1](attn.to_out[0](out))
    if shape4d is not None:
        out = out.transpose(-1, -2).reshape(shape4d)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def split_heads(attn, x: torch.Tensor) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d)."""
    b, n, inner = x.shape
    return x.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def project_context(attn, encoder_hidden_states):
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    return encoder_hidden_states
