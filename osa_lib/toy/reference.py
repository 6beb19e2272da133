"""Self-attention that also reads another image's tokens: how the toy model learns to copy
appearance, and what the appearance probe (``osa_lib.toy.probes.appearance``) switches on.

The method's isolated self-attention (docs/method.md, step 4) appends a character's stored reference
keys/values ``K_R``, ``V_R`` to a later scene's self-attention. That only carries the character's
look if the U-Net has learned to copy appearance through self-attention. SDXL learned it from
natural images, full of repeated things; the toy world has no repetition, so its training adds
*reference pairs*: two scenes that share one character with identical unnamed details, where the
second scene's up-block self-attention also sees the first scene's tokens, and its caption often
leaves the shared character's colour out. Copying is then the only way to get that colour right.

``ReferenceSelfAttention`` is that processor: row ``b`` attends to its own tokens plus the tokens
of row ``partner[b]`` inside ``ref_mask[b]``, from the queries inside ``query_mask[b]`` (all of them
when it is None; the method's isolated self-attention lets only a character's own region see its
reference). ``partner[b] = -1`` means its own tokens only, and with no partner in the batch the
output is exactly ``AttnProcessor2_0``'s.

With ``reweight`` w > 0 the partner's columns get the method's re-weighting (docs/method.md step 5,
``+ log(1 + w·Â(i))``), with ``query_weight`` standing in for ``Â``: the share of each query's
place covered by the shared character (1 everywhere when None). Training with it teaches the
copying under the same boost that sampling applies.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers import (LayerInfo, attention_epilogue, attention_prologue, find_attention_layers,
                      installed_processors, merge_heads, split_heads)

__all__ = ["ReferenceState", "ReferenceSelfAttention", "reference_attention", "pooled_token_mask"]


@dataclass
class ReferenceState:
    """What every ``ReferenceSelfAttention`` of one U-Net reads on its next call.

    partner: (B,) long, the row whose tokens row b also sees, or -1.
    ref_mask: (B, H, W) float coverage in [0, 1] at latent size: which of the partner's tokens
        are visible (pooled to each layer's resolution, kept where coverage >= 0.5).
    query_mask: (B, H, W) float coverage at latent size: which queries may see the partner's
        tokens (None: every query).
    active: switch (the probe turns references on for some steps only).
    shares: when a dict, each layer call appends (layer name -> list) the share of attention
        that the rows with a partner give the partner's tokens, averaged over heads and over the
        queries that may look (``query_mask``, or every query): the appearance probe's "why".
    reweight: w of the method's re-weighting on the partner's columns (0: none).
    query_weight: (B, H, W) float coverage at latent size, the stand-in for ``Â`` in
        ``log(1 + w·Â(i))`` (None: 1 for every query).
    """

    partner: torch.Tensor | None = None
    ref_mask: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None
    active: bool = True
    shares: dict | None = None
    reweight: float = 0.0
    query_weight: torch.Tensor | None = None


def pooled_token_mask(ref_mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) coverage -> (B, h*w) bool: tokens of an (h, w) layer at least half covered."""
    pooled = F.adaptive_avg_pool2d(ref_mask[:, None].float(), hw)  # (B, 1, h, w)
    return (pooled >= 0.5).flatten(1)


class ReferenceSelfAttention:
    """A diffusers self-attention (``attn1``) processor with optional partner tokens."""

    def __init__(self, layer: LayerInfo, state: ReferenceState, latent_hw: tuple[int, int]):
        self.layer, self.state, self.hw = layer, state, layer.resolution(latent_hw)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        x, saved = attention_prologue(attn, hidden_states, temb)
        q, k, v = (split_heads(attn, t) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))  # (B, heads, N, d)
        partner = self.state.partner
        if not self.state.active or partner is None or not bool((partner >= 0).any()):
            return attention_epilogue(attn, merge_heads(F.scaled_dot_product_attention(q, k, v)), saved)
        source = partner.clamp(min=0)
        keys = torch.cat([k, k[source]], dim=2)  # (B, heads, 2N, d)
        values = torch.cat([v, v[source]], dim=2)
        seen = pooled_token_mask(self.state.ref_mask, self.hw) & (partner >= 0)[:, None]  # (B, N)
        allowed = torch.cat([torch.ones_like(seen), seen], dim=1)[:, None, :]  # (B, 1, 2N): own tokens always
        if self.state.query_mask is not None:
            asking = pooled_token_mask(self.state.query_mask, self.hw)  # (B, N) queries that may look
            allowed = allowed & torch.cat([torch.ones_like(seen)[:, :, None].expand(-1, -1, seen.shape[1]),
                                           asking[:, :, None].expand(-1, -1, seen.shape[1])], dim=2)  # (B, N, 2N)
        mask = self._reweighted(allowed).to(q.dtype) if self.state.reweight > 0 else allowed  # (B, 1 or N, 2N)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
        if self.state.shares is not None:
            self._record_share(attn, q, keys, mask, partner >= 0)
        return attention_epilogue(attn, merge_heads(out), saved)

    def _reweighted(self, allowed: torch.Tensor) -> torch.Tensor:
        """(B, 1 or N, 2N) bool -> (B, N, 2N) float additive mask: 0 on allowed own columns,
        ``log(1 + w·Â(i))`` on allowed partner columns (docs/method.md step 5), -inf where not allowed."""
        b, n = allowed.shape[0], allowed.shape[2] // 2
        weight = (torch.ones(b, n, device=allowed.device) if self.state.query_weight is None else
                  F.adaptive_avg_pool2d(self.state.query_weight[:, None].float(), self.hw).flatten(1))  # (B, N)
        bias = torch.zeros(b, n, 2 * n, device=allowed.device)
        bias[:, :, n:] = torch.log1p(self.state.reweight * weight)[:, :, None]
        return bias.masked_fill(~allowed.expand(b, n, 2 * n), -math.inf)

    def _record_share(self, attn, q, keys, mask, rows) -> None:
        """Append the mean attention share on partner tokens of the looking queries of ``rows``
        (``mask``: the bool or additive float attention mask the layer used, (B, 1 or N, 2N))."""
        n = q.shape[2]
        logits = (q @ keys.transpose(-1, -2)) * attn.scale  # (B, heads, N, 2N)
        if mask.dtype == torch.bool:
            probs = logits.masked_fill(~mask[:, None].expand_as(logits), float("-inf")).softmax(-1)
        else:
            probs = (logits + mask[:, None]).softmax(-1)
        share = probs[..., n:].sum(-1).mean(1)  # (B, N): mass on the partner's tokens, per query
        looking = (torch.ones_like(share, dtype=torch.bool) if self.state.query_mask is None
                   else pooled_token_mask(self.state.query_mask, self.hw)) & rows[:, None]
        value = float(((share * looking).sum() / looking.sum().clamp(min=1)).detach())
        self.state.shares.setdefault(self.layer.name, []).append(value)


@contextmanager
def reference_attention(unet, latent_hw: tuple[int, int], resolutions: tuple[int, ...] | None = None):
    """Install ``ReferenceSelfAttention`` on the up blocks' self-attention (optionally only at
    some resolutions); yields the shared ``ReferenceState``. Restores the processors on exit."""
    state = ReferenceState()
    layers = find_attention_layers(unet, kind="self", places=("up",), resolutions=resolutions, latent_hw=latent_hw)
    with installed_processors(unet, {l.name: ReferenceSelfAttention(l, state, latent_hw) for l in layers}):
        yield state
