"""Baselines on the same backbone and seeds: vanilla (no processors, see ``Backbone.generate``)
and StoryDiffusion's Consistent Self-Attention (CSA).

CSA (Zhou et al., 2024), training-free: the scenes of one batch are generated together and, in
every self-attention layer, each image's queries also attend to a random sample of the other
images' tokens (keys and values), which pulls the characters' looks together.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .attention import (attention_epilogue, attention_prologue, find_attention_layers, installed_processors,
                        merge_heads, split_heads)

__all__ = ["ConsistentSelfAttention", "consistent_self_attention"]


class ConsistentSelfAttention:
    """Self-attention where image b attends to its own tokens plus a random ``rate`` share of the
    tokens of the other images of its CFG half."""

    def __init__(self, rate: float = 0.5, seed: int = 0):
        if not 0 <= rate <= 1:
            raise ValueError(f"CSA sampling rate must be in [0, 1], got {rate}")
        self.rate = rate
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        x, saved = attention_prologue(attn, hidden_states, temb)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (2B, N, C)
        batch, n, _ = q.shape
        half = batch // 2
        outputs = []
        for start in (0, half):  # negative half, prompt half: never mix the two
            for b in range(start, start + half):
                others = [i for i in range(start, start + half) if i != b]
                keys, values = [k[b]], [v[b]]
                if others and self.rate > 0:
                    pool_k, pool_v = torch.cat([k[i] for i in others]), torch.cat([v[i] for i in others])
                    n_keep = int(round(self.rate * pool_k.shape[0]))
                    keep = torch.randperm(pool_k.shape[0], generator=self.generator)[:n_keep].to(k.device)
                    keys.append(pool_k[keep]), values.append(pool_v[keep])
                K, V = torch.cat(keys)[None], torch.cat(values)[None]  # (1, N + sampled, C)
                outputs.append(F.scaled_dot_product_attention(
                    split_heads(attn, q[b:b + 1]), split_heads(attn, K), split_heads(attn, V)))
        out = torch.cat(outputs)  # (2B, heads, N, d)
        return attention_epilogue(attn, merge_heads(out), saved)


@contextmanager
def consistent_self_attention(unet, rate: float = 0.5, seed: int = 0):
    """Install CSA on every self-attention layer (down, mid and up) while open."""
    layers = find_attention_layers(unet, kind="self")
    processor = ConsistentSelfAttention(rate, seed)
    with installed_processors(unet, {l.name: processor for l in layers}):
        yield processor
