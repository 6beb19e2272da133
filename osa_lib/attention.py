"""Recording cross-attention (finding layers and installing processors live in ``layers``).

As in DAAM and prompt-to-prompt, finding the layers (``layers.find_attention_layers``),
installing processors (``layers.installed_processors``) and recording are separate concerns:
- ``AttentionStore`` + ``CrossAttentionRecorder`` keep, per layer, a running mean over denoising
  steps of each character's map ``A_m`` (mean over heads and the character's tokens ``T_m``),
  for the prompt half of the classifier-free-guidance batch only.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .layers import (LayerInfo, attention_epilogue, attention_prologue, find_attention_layers, installed_processors,
                     merge_heads, project_context, split_heads)
from .masks import aggregate_maps
from .transfer import move_together

__all__ = ["LayerInfo", "find_attention_layers", "installed_processors", "AttentionStore",
           "CrossAttentionRecorder", "capture_attention", "attention_prologue", "attention_epilogue",
           "split_heads", "merge_heads", "project_context", "recorded_cross_attention"]


class AttentionStore:
    """Running means over denoising steps of per-character cross-attention maps, per layer.

    Args:
        token_groups: ``token_groups[b][m]`` = token indices ``T_m`` of character (or word) m in
            prompt b. Every prompt has the same number of groups M.
        latent_hw: latent height and width, to shape each layer's N tokens into (h, w).
        keep_steps: also keep every step's maps (for time-lapse figures); memory then grows
            with the number of steps.
    """

    def __init__(self, token_groups: list[list[list[int]]], latent_hw: tuple[int, int], keep_steps: bool = False):
        if not token_groups or not token_groups[0]:
            raise ValueError("token_groups is empty: give at least one group of token indices per prompt")
        if len({len(groups) for groups in token_groups}) != 1:
            raise ValueError("every prompt needs the same number of token groups")
        for b, groups in enumerate(token_groups):
            for m, group in enumerate(groups):
                if not group:
                    raise ValueError(f"token group {m} of prompt {b} is empty; the word was not found in the prompt")
        self.token_groups = token_groups
        self._weights: dict[tuple, torch.Tensor] = {}  # (T, device, dtype) -> (B, M, T), see token_weights
        self.latent_hw = tuple(latent_hw)
        self.keep_steps = keep_steps
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self._sums: dict[LayerInfo, torch.Tensor] = {}
        self._counts: dict[LayerInfo, int] = {}
        self.per_step: dict[int, dict[LayerInfo, torch.Tensor]] = {}

    @property
    def n_groups(self) -> int:
        return len(self.token_groups[0])

    def token_weights(self, n_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(B, M, T): ``1 / |T_m|`` on the tokens of T_m, 0 elsewhere, so ``weights @ per_token``
        averages each group's tokens in one matrix product. Made once per run (one host-to-device
        copy, at the first recorded layer), then reused by every layer and step."""
        key = (n_tokens, device, dtype)
        if key not in self._weights:
            weights = torch.zeros(len(self.token_groups), self.n_groups, n_tokens)
            for b, groups in enumerate(self.token_groups):
                for m, group in enumerate(groups):
                    tokens = sorted(set(int(t) for t in group))
                    weights[b, m, tokens] = 1.0 / len(tokens)
            self._weights[key] = weights.to(device, dtype)
        return self._weights[key]

    def token_values(self, n_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, T, M8): ``token_weights`` transposed, as attention values, with zero columns up
        to a multiple of 8 (fused attention kernels want aligned value widths). Attention with
        these values returns ``probs @ weights^T``: each group's map, for every head at once."""
        key = ("values", n_tokens, device, dtype)
        if key not in self._weights:
            weights = self.token_weights(n_tokens, device, dtype).transpose(1, 2)  # (B, T, M)
            width = -(-self.n_groups // 8) * 8
            self._weights[key] = F.pad(weights, (0, width - self.n_groups))[:, None].contiguous()  # (B, 1, T, M8)
        return self._weights[key]

    def group_maps(self, layer: LayerInfo, probs: torch.Tensor) -> torch.Tensor:
        """probs (B, heads, N, T) of the prompt half -> A (B, M, h, w): mean over heads and T_m."""
        h, w = layer.resolution(self.latent_hw)
        per_token = probs.mean(dim=1)  # (B, N, T)
        maps = self.token_weights(probs.shape[-1], probs.device, probs.dtype) @ per_token.transpose(1, 2)  # (B, M, N)
        return maps.reshape(maps.shape[0], self.n_groups, h, w).float()

    def record(self, layer: LayerInfo, probs: torch.Tensor) -> torch.Tensor:
        """Fold one layer's maps, from its probabilities (B, heads, N, T), into the running sums;
        they stay on the probabilities' device (no copy to the CPU inside the denoising loop)."""
        return self._fold(layer, self.group_maps(layer, probs).detach())

    def record_attention(self, layer: LayerInfo, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """``record`` from the prompt half's queries (B, heads, N, d) and keys (B, heads, T, d),
        in three operators: attention whose values are ``token_values`` gives every head's group
        maps ``softmax(q k^T · scale) @ weights^T`` without materialising the probabilities, then
        the mean over heads and the running sum (a GPU run is bound by its host's operator count)."""
        b, _, n, _ = q.shape
        h, w = layer.resolution(self.latent_hw)
        values = self.token_values(k.shape[-2], q.device, q.dtype).expand(b, q.shape[1], -1, -1)  # (B, heads, T, M8)
        per_head = F.scaled_dot_product_attention(q, k, values, scale=scale)  # (B, heads, N, M8)
        maps = per_head.mean(dim=1)[..., :self.n_groups].transpose(1, 2).view(b, self.n_groups, h, w)  # (B, M, h, w)
        return self._fold(layer, maps.detach())

    def _fold(self, layer: LayerInfo, maps: torch.Tensor) -> torch.Tensor:
        """Add maps (B, M, h, w) to the layer's float32 running sum (the sum is made on first use)."""
        if layer in self._sums:
            self._sums[layer] += maps
            self._counts[layer] += 1
        else:
            self._sums[layer] = maps.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            self._counts[layer] = 1
        if self.keep_steps:
            self.per_step.setdefault(self.step, {})[layer] = maps.float()
        return maps

    def step_callback(self, step_index: int, timestep=None, latents=None) -> None:
        """Pass to ``Backbone.denoise(callback=...)``: marks the end of a denoising step."""
        self.step = step_index + 1

    @property
    def layers(self) -> list[LayerInfo]:
        return list(self._sums)

    def maps(self, places: tuple[str, ...] = ("up",), resolution: int | None = None,
             step: int | None = None, device: torch.device | str | None = None) -> dict[LayerInfo, torch.Tensor]:
        """Per-layer maps (B, M, h, w): the running mean so far, or one step's maps; on ``device``
        (default: where they were recorded), moved in one copy (``transfer.move_together``)."""
        source = self._sums if step is None else self.per_step.get(step, {})
        if step is not None and not source:
            raise ValueError(f"no maps kept for step {step}; use keep_steps=True and a step < {self.step}")
        chosen = [l for l in source if l.place in places
                  and (resolution is None or l.resolution(self.latent_hw)[0] == resolution)]
        if not chosen:
            have = sorted({(l.place, l.resolution(self.latent_hw)[0]) for l in source})
            raise ValueError(f"no recorded maps for places={places}, resolution={resolution}; recorded: {have}")
        tensors = [source[l] for l in chosen]
        if device is not None:
            tensors = move_together(tensors, device)
        if step is None:
            tensors = [t / self._counts[l] for l, t in zip(chosen, tensors)]  # sums -> running means
        return dict(zip(chosen, tensors))

    def average_maps(self) -> dict[LayerInfo, torch.Tensor]:
        """Running mean over all recorded steps, per layer."""
        return {layer: self._sums[layer] / self._counts[layer] for layer in self._sums}

    def mask_resolution(self, places: tuple[str, ...] = ("up",)) -> int:
        """The one resolution masks are made at by default: the smallest recorded feature map of
        ``places`` (toy 8x8, SDXL 32x32 at 1024²). Its maps mark whole objects, while the largest
        up-block layers' maps trace edges (README, "Which layers make the masks")."""
        sizes = {l.resolution(self.latent_hw)[0] for l in self.layers if l.place in places}
        if not sizes:
            raise ValueError(f"no recorded maps for places={places}; recorded: {sorted({l.place for l in self.layers})}")
        return min(sizes)

    def mask_maps(self, places: tuple[str, ...] = ("up",), step: int | None = None) -> torch.Tensor:
        """A_m (B, M, h, w) averaged over the layers at ``mask_resolution``: the method's aggregation
        "over the up-block layers at one resolution" (docs/method.md, step 1)."""
        return self.aggregate(places, self.mask_resolution(places), step)

    def aggregate(self, places: tuple[str, ...] = ("up",), resolution: int | None = None,
                  step: int | None = None) -> torch.Tensor:
        """A_m averaged over the chosen layers, each upsampled to the largest: (B, M, H, W)
        (``masks.aggregate_maps``)."""
        return aggregate_maps(list(self.maps(places, resolution, step).values()))


class CrossAttentionRecorder:
    """Cross-attention processor that records ``A_m`` into a store and otherwise computes exactly
    what ``AttnProcessor2_0`` computes: the output comes from ``F.scaled_dot_product_attention``
    (bit-identical to the unmodified model); the probabilities are materialised separately, for
    the prompt half of the CFG batch only, just to be recorded."""

    def __init__(self, layer: LayerInfo, store: AttentionStore):
        self.layer, self.store = layer, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        _, out, saved = recorded_cross_attention(attn, hidden_states, encoder_hidden_states, temb,
                                                 self.store, self.layer)
        return attention_epilogue(attn, merge_heads(out), saved)


def recorded_cross_attention(attn, hidden_states, encoder_hidden_states, temb, store: AttentionStore | None,
                             layer: LayerInfo):
    """Cross-attention output exactly as ``AttnProcessor2_0`` computes it, and ``A_m`` recorded
    (not when ``store`` is None).

    Returns q (2B, heads, N, d), the output (2B, heads, N, d) before ``to_out``, and the state
    ``attention_epilogue`` needs.
    """
    x, saved = attention_prologue(attn, hidden_states, temb)
    context = project_context(attn, encoder_hidden_states)
    q, k, v = (split_heads(attn, t) for t in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
    half = q.shape[0] // 2  # [negative; prompt]
    out = F.scaled_dot_product_attention(q, k, v)  # (2B, heads, N, d)
    if store is not None:  # A_m of softmax(q k^T · scale), the prompt half only
        store.record_attention(layer, q[half:], k[half:], attn.scale)
    return q, out, saved


@contextmanager
def capture_attention(unet, store: AttentionStore, places: tuple[str, ...] = ("down", "mid", "up"),
                      resolutions: tuple[int, ...] | None = None):
    """Record cross-attention maps of the matching layers while the context is open.

    Example::

        store = AttentionStore(token_groups, backbone.latent_shape[1:])
        with capture_attention(backbone.unet, store, places=("up",)):
            backbone.denoise(cond, latents, callback=store.step_callback)
        A = store.mask_maps()  # (B, M, h, w) at the smallest up-block resolution
    """
    layers = find_attention_layers(unet, kind="cross", places=places, resolutions=resolutions,
                                   latent_hw=store.latent_hw)
    with installed_processors(unet, {l.name: CrossAttentionRecorder(l, store) for l in layers}):
        yield store
