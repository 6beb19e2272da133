"""The extended transformer block of Object Isolated Attention, as diffusers processors.

Installed on the **up** blocks only (down and mid blocks run as pretrained). Each transformer
block keeps its original branch and gains an isolated one; they are merged at the attention
outputs, ``F = λ·F_iso + (1 − λ)·F_ori`` (METHOD.md "Merge", a (choice)). Because ``to_out`` is
affine and the weights sum to one, merging before or after the output projection is the same.

- ``IsolatedSelfAttention`` (attn1): keys/values ``[K_x ; K_R1 ; … ; K_RM]``; a query inside
  ``M_m`` sees its own image and ``R_m`` only, a background query its own image only; the logits
  towards ``R_m`` get ``+ log(1 + w·Â_m(i))`` (re-weighting, (choice) ``w = 1``). It also writes
  the tokens inside each *new* character's mask into the reference bank.
- ``IsolatedCrossAttention`` (attn2): records ``A_m`` for the masks, then runs cross-attention once
  per character with its ID prompt and blends (Eq. 6)
  ``Y = (1 − Σ_m M_m) ⊙ Y_S + Σ_m M_m ⊙ (β·Y_m + (1 − β)·Y_S)``.

The isolated branch acts on the prompt half of the CFG batch (the negative half runs as
pretrained) and starts after a warm-up (first 20 % of steps, (choice)) while maps accumulate.
Masks used at step t come from the running mean of maps over steps 0..t-1.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import (AttentionStore, LayerInfo, attention_epilogue, attention_prologue, find_attention_layers,
                        installed_processors, merge_heads, project_context, recorded_cross_attention, split_heads)
from .bank import ReferenceBank
from .masks import subject_masks

__all__ = ["IsolationConfig", "SceneCharacter", "IsolationController", "IsolatedSelfAttention",
           "IsolatedCrossAttention", "isolated_attention"]

log = logging.getLogger("osa_lib.isolation")


@dataclass
class IsolationConfig:
    """Every switch of the method; defaults are METHOD.md's.

    Args:
        lam: λ in ``F = λ·F_iso + (1 − λ)·F_ori``; 0 gives the unmodified model exactly.
        reweight: w in ``log(1 + w·Â_m(i))``; 0 turns re-weighting off (the paper's "Re = ×").
        beta: β, the share of the ID-prompt features inside a character's mask.
        warmup: fraction of denoising steps before the isolated branch starts.
        isolated_self / isolated_cross: switch each half of the branch for ablations.
        overlap_rule: "lower_cv" (paper), "higher_cv" or "argmax".
        mask_resolution: feature-map height of the up-block layers whose maps make the masks
            (None: the smallest one, ``AttentionStore.mask_resolution``).
        min_fraction / max_fraction: masks outside these pixel fractions are unreliable.
    """

    lam: float = 1.1
    reweight: float = 1.0
    beta: float = 1.0
    warmup: float = 0.2
    isolated_self: bool = True
    isolated_cross: bool = True
    overlap_rule: str = "lower_cv"
    mask_resolution: int | None = None
    min_fraction: float = 0.01
    max_fraction: float = 0.9


@dataclass
class SceneCharacter:
    """A character present in the scene being generated.

    Args:
        name: key in the reference bank.
        tokens: positions ``T_m`` of its word in the scene prompt.
        id_embedding: (T, D) hidden states of its ID prompt (for isolated cross-attention).
        is_new: True when this scene is its first: its tokens are written to the bank.
    """

    name: str
    tokens: list[int]
    id_embedding: torch.Tensor | None = None
    is_new: bool = True


@dataclass
class IsolationController:
    """Shared state of one scene's run: maps, masks, bank, step; read by the processors."""

    characters: list[SceneCharacter]
    latent_hw: tuple[int, int]
    num_steps: int
    config: IsolationConfig = field(default_factory=IsolationConfig)
    bank: ReferenceBank | None = None
    write_bank: bool = True

    def __post_init__(self):
        if not self.characters:
            raise ValueError("a scene needs at least one character for isolated attention")
        self.store = AttentionStore([[c.tokens for c in self.characters]], self.latent_hw)
        self.step = 0
        self.masks = None  # SubjectMasks of the previous step
        self.mask_history: list[torch.Tensor] = []
        self.messages: list[str] = []
        self.warmup_steps = math.ceil(self.config.warmup * self.num_steps)
        returning = [c.name for c in self.characters if not c.is_new]
        if returning and self.bank is None:
            raise ValueError(f"characters {returning} are returning but no reference bank was given")
        for name in returning:
            if name not in self.bank:
                raise ValueError(f"character {name!r} is not in the reference bank (it has {self.bank.characters}); "
                                 f"generate its first scene first or load the bank that holds it")

    # --- step bookkeeping -----------------------------------------------------------------
    def step_callback(self, step_index: int, timestep=None, latents=None) -> None:
        """End of a denoising step: update the masks from the running mean of the maps."""
        self.store.step_callback(step_index)
        self.step = step_index + 1
        if not self.store.layers:
            return
        maps = self.store.maps(places=("up",), resolution=self.mask_resolution)
        self.masks = subject_masks(list(maps.values()), rule=self.config.overlap_rule,
                                   min_fraction=self.config.min_fraction, max_fraction=self.config.max_fraction)
        self.mask_history.append(self.masks.masks[0].clone())
        if self.step >= self.warmup_steps:
            for m, reason in enumerate(self.masks.reasons[0]):
                if reason:
                    msg = (f"step {self.step}: {self.characters[m].name}: {reason}; "
                           f"original branch used for this character")
                    self.messages.append(msg)
                    log.info(msg)

    @property
    def mask_resolution(self) -> int:
        if self.config.mask_resolution is not None:
            return self.config.mask_resolution
        return self.store.mask_resolution()

    @property
    def isolating(self) -> bool:
        """True once warm-up is over and masks exist."""
        return self.masks is not None and self.step >= self.warmup_steps and self.config.lam != 0

    def masks_at(self, layer: LayerInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """M_m (M, N) bool and Â_m (M, N) at the layer's resolution, for prompt 0."""
        h, w = layer.resolution(self.latent_hw)
        masks = self.masks.masks[0].float()[None]  # (1, M, H, W)
        a_hat = self.masks.A_hat[0][None] * self.masks.ok[0][None, :, None, None]
        if masks.shape[-2:] != (h, w):
            masks = F.interpolate(masks, size=(h, w), mode="area") > 0.5
            a_hat = F.interpolate(a_hat, size=(h, w), mode="area")
        return masks[0].flatten(1).bool(), a_hat[0].flatten(1)


class IsolatedSelfAttention:
    """Self-attention of an up-block transformer block with the isolated branch (METHOD.md 3)."""

    def __init__(self, layer: LayerInfo, controller: IsolationController):
        self.layer, self.ctrl = layer, controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        x, saved = attention_prologue(attn, hidden_states, temb)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (2B, N, C)
        out = F.scaled_dot_product_attention(split_heads(attn, q), split_heads(attn, k), split_heads(attn, v))
        ctrl = self.ctrl
        if ctrl.masks is not None:
            masks, a_hat = ctrl.masks_at(self.layer)  # (M, N)
            half = q.shape[0] // 2
            if ctrl.write_bank and ctrl.bank is not None:
                for m, c in enumerate(ctrl.characters):
                    if c.is_new and masks[m].any():
                        ctrl.bank.add(c.name, self.layer.name, ctrl.step, k[half, masks[m]], v[half, masks[m]])
            if ctrl.isolating and ctrl.config.isolated_self:
                f_iso = self._isolated(attn, q[half], k[half], v[half], masks, a_hat)
                if f_iso is not None:
                    lam = ctrl.config.lam
                    out[half] = lam * f_iso + (1 - lam) * out[half]  # F = λ·F_iso + (1 − λ)·F_ori
        return attention_epilogue(attn, merge_heads(out), saved)

    def _isolated(self, attn, q, k, v, masks, a_hat):
        """q, k, v (N, C) of one image -> F_iso (heads, N, d), or None without references."""
        ctrl = self.ctrl
        keys, values, bias_columns = [k], [v], []
        n = q.shape[0]
        for m, c in enumerate(ctrl.characters):
            ref = None if c.is_new else ctrl.bank.get(c.name, self.layer.name, ctrl.step)
            if ref is None or not masks[m].any():
                continue
            k_r, v_r = (t.to(q.device, q.dtype) for t in ref)  # (n_m, C)
            # a query inside M_m may attend R_m, re-weighted by log(1 + w·Â_m(i)); others may not.
            allowed = torch.where(masks[m], torch.log1p(ctrl.config.reweight * a_hat[m]),
                                  torch.full_like(a_hat[m], float("-inf")))  # (N,)
            keys.append(k_r), values.append(v_r)
            bias_columns.append(allowed[:, None].expand(n, k_r.shape[0]).to(q.dtype))
        if not bias_columns:
            return None
        bias = torch.cat([torch.zeros(n, n, dtype=q.dtype, device=q.device)] + bias_columns, dim=1)  # (N, N + ΣR)
        K, V = torch.cat(keys)[None], torch.cat(values)[None]  # (1, N + ΣR, C)
        f_iso = F.scaled_dot_product_attention(split_heads(attn, q[None]), split_heads(attn, K),
                                               split_heads(attn, V), attn_mask=bias[None, None])
        return f_iso[0]  # (heads, N, d)


class IsolatedCrossAttention:
    """Cross-attention of an up-block transformer block: records A_m, blends ID prompts (Eq. 6)."""

    def __init__(self, layer: LayerInfo, controller: IsolationController):
        self.layer, self.ctrl = layer, controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctrl = self.ctrl
        # F_ori exactly as AttnProcessor2_0 computes it (so λ = 0 is bit-identical to the model)
        q, out, saved = recorded_cross_attention(attn, hidden_states, encoder_hidden_states, temb,
                                                 ctrl.store, self.layer)
        half = q.shape[0] // 2  # [negative; prompt]
        y_s = out[half:]  # (B, heads, N, d): global features Y_S
        if ctrl.isolating and ctrl.config.isolated_cross:
            y_s0 = y_s[0].clone()
            masks, _ = ctrl.masks_at(self.layer)  # (M, N)
            y_blend = y_s0.clone()
            beta, lam = ctrl.config.beta, ctrl.config.lam
            for m, c in enumerate(ctrl.characters):
                if c.id_embedding is None or not masks[m].any():
                    continue
                id_context = project_context(attn, c.id_embedding[None].to(q.device, q.dtype))
                y_m = F.scaled_dot_product_attention(
                    q[half:half + 1], split_heads(attn, attn.to_k(id_context)),
                    split_heads(attn, attn.to_v(id_context)))[0]  # (heads, N, d)
                inside = masks[m][None, :, None]
                # Eq. 6: inside M_m the features come from the character's own ID prompt
                y_blend = torch.where(inside, beta * y_m + (1 - beta) * y_s0, y_blend)
            out[half] = lam * y_blend + (1 - lam) * y_s0  # F = λ·F_iso + (1 − λ)·F_ori
        return attention_epilogue(attn, merge_heads(out), saved)


@contextmanager
def isolated_attention(unet, controller: IsolationController):
    """Install the extended block on every up-block transformer block while open."""
    layers = find_attention_layers(unet, places=("up",), latent_hw=controller.latent_hw)
    processors = {l.name: (IsolatedSelfAttention if l.kind == "self" else IsolatedCrossAttention)(l, controller)
                  for l in layers}
    with installed_processors(unet, processors):
        yield controller
