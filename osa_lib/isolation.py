"""The extended transformer block of Object Isolated Attention, as diffusers processors.

Installed on the **up** blocks only (down and mid blocks run as pretrained). Each transformer
block keeps its original branch and gains an isolated one; they are merged at the attention
outputs, ``F = λ·F_iso + (1 − λ)·F_ori`` (docs/method.md, step 7, a choice the paper leaves open). Because ``to_out`` is
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionStore, recorded_cross_attention
from .bank import ReferenceBank
from .config import LAM_RANGE, IsolationConfig, parse_isolation_defaults, read_isolation_defaults
from .layers import (LayerInfo, attention_epilogue, attention_prologue, find_attention_layers, installed_processors,
                     merge_heads, project_context, split_heads)
from .masks import resize_masks, subject_masks
from .transfer import move_together, to_device

__all__ = ["IsolationConfig", "LAM_RANGE", "SceneCharacter", "IsolationController", "IsolatedSelfAttention",
           "IsolatedCrossAttention", "isolated_attention", "check_mask_resolution", "read_isolation_defaults",
           "parse_isolation_defaults"]

log = logging.getLogger("osa_lib.isolation")

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


class IsolationController:
    """Shared state of one scene's run: maps, masks, bank, step; read by the processors.

    Args:
        characters: the scene's characters (at least one).
        latent_hw: latent height and width.
        num_steps: U-Net calls of the run, one per sampler timestep (``Backbone.unet_calls``: twice
            the denoising steps for a second-order sampler); warm-up and end are fractions of them,
            so they cover the same share of sampling whatever the sampler.
        config: the method's switches (``IsolationConfig()``).
        bank: references of returning characters; new characters' references are written to it.
        write_bank: False to read the bank without writing (tests, ablations).
    """

    def __init__(self, characters: list[SceneCharacter], latent_hw: tuple[int, int], num_steps: int,
                 config: IsolationConfig | None = None, bank: ReferenceBank | None = None, write_bank: bool = True):
        self.characters, self.latent_hw, self.num_steps = characters, tuple(latent_hw), num_steps
        self.config = config if config is not None else IsolationConfig()
        self.bank, self.write_bank = bank, write_bank
        self._check()
        # maps and masks: the store averages A_m over steps and counts the steps (``step``)
        self.store = AttentionStore([[c.tokens for c in self.characters]], self.latent_hw)
        self.masks = None  # SubjectMasks of the previous step
        self.mask_history: list[torch.Tensor] = []
        self.messages: list[str] = []
        self.warmup_steps = math.ceil(self.config.warmup * self.num_steps)
        self.end_steps = math.ceil(self.config.end * self.num_steps)  # the branch runs in [warmup_steps, end_steps)
        # layer calls: which ran this step, and the device state they read
        self.ran_layers: set[str] = set()  # layers run since the last step_callback
        self.device: torch.device | None = None  # the queries' device and dtype, seen in the first layer call
        self.dtype: torch.dtype | None = None
        self._state: _StepState | None = None
        self.state_builds = 0  # how many per-step states were built (once per step, not per layer)
        # bank writes: queued on the device during a step, moved at its end
        self.bank_layers: set[str] | None = None  # layers that write references (None: all)
        self.resolutions: set[tuple[int, int]] | None = None  # up-block layers' (h, w), set when installed
        self._pending: list[tuple[str, str, int, torch.Tensor, torch.Tensor]] = []
        self._id_kv: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # ID prompts' K, V per layer
        self._widths: dict[tuple[str, str], int] = {}  # (character, layer) -> its references' fixed width
        self._zeros: dict[tuple, torch.Tensor] = {}  # (C, device, dtype) -> zero keys/values for padding

    def _check(self) -> None:
        """Refuse a controller that could only run the unmodified model or fail halfway."""
        if not self.characters:
            raise ValueError("a scene needs at least one character for isolated attention")
        self.config.validate()  # a config changed after it was made
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps!r} must be a positive integer")
        returning = [c.name for c in self.characters if not c.is_new]
        if returning and self.bank is None:
            raise ValueError(f"characters {returning} are returning but no reference bank was given")
        for name in returning:
            if name not in self.bank:
                raise ValueError(f"character {name!r} is not in the reference bank (it has {self.bank.characters}); "
                                 f"generate its first scene first or load the bank that holds it")

    @property
    def step(self) -> int:
        """Denoising steps finished so far (the store's counter: one step counter per run)."""
        return self.store.step

    @step.setter
    def step(self, value: int) -> None:
        self.store.step = value

    # --- step bookkeeping -----------------------------------------------------------------
    def step_callback(self, step_index: int, timestep=None, latents=None) -> None:
        """End of a denoising step: move this step's bank writes to the bank (one copy), update
        the masks from the running mean of the maps, and prepare the next step's device state
        (masks, Â, biases, references), so that no layer call copies or synchronises."""
        self.flush_bank()
        self.ran_layers.clear()
        self.store.step_callback(step_index)  # advances self.step to step_index + 1
        if not self.store.layers:
            return
        # the maps come to the host in one copy; Otsu and the checks run there (a few hundred tiny
        # operators, each a kernel launch and some a synchronisation on a GPU)
        maps = self.store.maps(places=("up",), resolution=self.mask_resolution, device="cpu")
        self.masks = subject_masks(list(maps.values()), rule=self.config.overlap_rule,
                                   min_fraction=self.config.min_fraction, max_fraction=self.config.max_fraction,
                                   area_cap=self.config.mask_area_cap, one_region=self.config.one_region)
        self.mask_history.append(self.masks.masks[0].clone())
        if self.in_window:
            for m, reason in enumerate(self.masks.reasons[0]):
                if reason:
                    msg = (f"step {self.step}: {self.characters[m].name}: {reason}; "
                           f"original branch used for this character")
                    self.messages.append(msg)
                    log.info(msg)
        if self.device is not None and self.step < self.num_steps:
            self.step_state(self.device, self.dtype)  # built here, outside the layer calls

    @property
    def mask_resolution(self) -> int:
        if self.config.mask_resolution is not None:
            return self.config.mask_resolution
        return self.store.mask_resolution()

    @property
    def in_window(self) -> bool:
        """The current step lies in [warm-up, end): the steps the isolated branch runs and stores."""
        return self.warmup_steps <= self.step < self.end_steps

    @property
    def isolating(self) -> bool:
        """True in the window of steps, when masks exist."""
        return self.masks is not None and self.in_window and self.config.lam != 0

    def enter_layer(self, layer: LayerInfo, batch: int) -> None:
        """Called by each processor: refuse what the method cannot do instead of running vanilla.

        Args:
            batch: prompts in this U-Net call (half the CFG batch).
        """
        if batch != 1:
            raise ValueError(f"isolated attention generates one prompt per U-Net call; this call has {batch} "
                             f"prompts (CFG batch {2 * batch}). Generate the scenes one at a time, as "
                             f"generate_story does.")
        if layer.name in self.ran_layers:
            raise RuntimeError(
                f"the U-Net ran again at step {self.step} without the controller's step callback, so its masks "
                f"never update and the run would be the unmodified model. Inside isolated_attention call "
                f"backbone.denoise(..., callback=controller.step_callback), not backbone.generate.")
        self.ran_layers.add(layer.name)

    # --- per-step device state: built once per step (and resolution), read by every layer ----
    def step_state(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> "_StepState":
        """The current step's state on ``device``/``dtype``; rebuilt only when the step, the
        masks, the device or the dtype changed. The step callback builds it, so layer calls only
        read it (a hand-driven controller builds it in its first layer call)."""
        device = torch.device(device) if device is not None else self.masks.masks.device
        dtype = dtype or torch.float32
        key = (self.step, id(self.masks), device, dtype)
        if self._state is None or self._state.key != key:
            self._state = _StepState(self, key, device, dtype)
            self.state_builds += 1
        return self._state

    def _see(self, q: torch.Tensor) -> "_StepState":
        """Called by the processors: remember the queries' device and dtype, return the state."""
        self.device, self.dtype = q.device, q.dtype
        return self.step_state(q.device, q.dtype)

    def masks_at(self, layer: LayerInfo, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """M_m (M, N) bool and Â_m (M, N) at the layer's resolution, for prompt 0, on ``device``
        in ``dtype`` (default: the masks' device, float32); cached per step and resolution."""
        return self.step_state(device, dtype).at(layer.resolution(self.latent_hw))[:2]

    # --- bank writes: kept on the device during a step, moved in one copy at its end -------
    def writes_bank(self, layer: LayerInfo) -> bool:
        """Does this layer store a new character's references at the current step?"""
        if not (self.write_bank and self.bank is not None and self.in_window):
            return False  # steps outside [warmup, end) are never read (the isolated branch does not run)
        if (self.step - self.warmup_steps) % max(1, self.config.bank_step_stride):
            return False
        return self.bank_layers is None or layer.name in self.bank_layers

    def queue_reference(self, name: str, layer: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._pending.append((name, layer, self.step, keys, values))

    def flush_bank(self) -> None:
        """Hand this step's queued references to the bank: as they are when the bank lives on
        their device, otherwise in one device-to-host copy."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        moved = move_together([t for *_, k, v in pending for t in (k, v)], self.bank.device)
        for i, (name, layer, step, _, _) in enumerate(pending):
            self.bank.add(name, layer, step, moved[2 * i], moved[2 * i + 1])

    def reference_width(self, name: str, layer: str) -> int:
        """The most tokens ``name`` has at ``layer`` over the bank's stored steps, rounded up to a
        multiple of 16: its references are padded to this width at every step, so the isolated
        attention's key length stays the same through a scene (a GPU's attention kernels plan
        once per shape, and the memory-efficient kernel copies a mask whose width is not a
        multiple of 16) and the padding costs no operator per layer."""
        key = (name, layer)
        if key not in self._widths:
            most = max((k.shape[0] for (l, _), (k, _) in self.bank.tokens.get(name, {}).items() if l == layer), default=0)
            self._widths[key] = -(-most // 16) * 16
        return self._widths[key]

    def zeros(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, C) zeros on ``like``'s device and dtype, cut from one cached buffer."""
        key = (like.shape[-1], like.device, like.dtype)
        if key not in self._zeros or self._zeros[key].shape[0] < n:
            self._zeros[key] = like.new_zeros(max(n, 64), like.shape[-1])
        return self._zeros[key][:n]

    def id_keys_values(self, attn, layer: LayerInfo, m: int, state: "_StepState"):
        """K, V (1, heads, T, d) of character m's ID prompt in this cross-attention layer; the
        same at every step, so projected once per scene and layer."""
        key = (layer.name, m, state.device, state.dtype)
        if key not in self._id_kv:
            context = project_context(attn, state.id_context[m])  # (1, T, D)
            self._id_kv[key] = (split_heads(attn, attn.to_k(context)), split_heads(attn, attn.to_v(context)))
        return self._id_kv[key]


class _StepState:
    """Masks, Â, attention biases, bank references and ID contexts of one step, on one device.

    Everything that needs a host/device copy or a synchronisation (``.tolist()``, ``nonzero``)
    happens here, once per step and resolution; the processors only index into it.
    """

    def __init__(self, ctrl: IsolationController, key, device: torch.device, dtype: torch.dtype):
        self.ctrl, self.key, self.device, self.dtype = ctrl, key, device, dtype
        self._at: dict[tuple[int, int], tuple] = {}
        self._bias: dict[tuple, torch.Tensor] = {}
        reads = ctrl.isolating and ctrl.config.isolated_self
        self.references = self._references() if reads else {}  # layer name -> [(m, K_R, V_R)]
        self.id_context = [None if c.id_embedding is None else c.id_embedding[None].to(device, dtype)
                           for c in ctrl.characters]  # (1, T, D) each
        resolutions = ctrl.resolutions or {l.resolution(ctrl.latent_hw) for l in ctrl.store.layers if l.place == "up"}
        for hw in sorted(resolutions):
            self.at(hw)  # every up-block resolution now, not in a layer call

    def at(self, hw: tuple[int, int]):
        """(M_m (M, N) bool, Â_m (M, N), present: list[bool], indices: list[(n_m,) long]) at ``hw``."""
        if hw not in self._at:
            sm = self.ctrl.masks
            # made on the host, where the masks are, then copied (asynchronously to a GPU)
            masks = resize_masks(sm.masks[0][None], hw)[0].flatten(1)  # (M, N) at this layer's resolution
            a_hat = sm.A_hat[0][None] * sm.ok[0][None, :, None, None]
            if a_hat.shape[-2:] != hw:
                a_hat = F.interpolate(a_hat, size=hw, mode="area")
            present = masks.any(dim=1).tolist()
            indices = [to_device(m.nonzero().squeeze(1), self.device) for m in masks]  # (n_m,) tokens in M_m
            masks, a_hat = to_device(masks, self.device), to_device(a_hat[0].flatten(1), self.device, self.dtype)
            self._at[hw] = (masks, a_hat, present, indices)
        return self._at[hw]

    def bias(self, hw: tuple[int, int], lengths: tuple[tuple[int, int], ...], pad: int = 0) -> torch.Tensor:
        """Additive mask (N, N + ΣR + pad) for isolated self-attention: 0 on the image's own keys;
        on R_m's columns ``log(1 + w·Â_m(i))`` for queries i in M_m and -inf for every other
        query; -inf on the ``pad`` zero keys that keep the width fixed (they get no weight)."""
        key = (hw, lengths, pad)
        if key not in self._bias:
            masks, a_hat, _, _ = self.at(hw)
            n = masks.shape[1]
            columns = [torch.zeros(n, n, dtype=self.dtype, device=self.device)]
            for m, n_r in lengths:
                allowed = torch.where(masks[m], torch.log1p(self.ctrl.config.reweight * a_hat[m]),
                                      torch.full_like(a_hat[m], float("-inf")))  # (N,)
                columns.append(allowed[:, None].expand(n, n_r))
            columns.append(torch.full((n, pad), float("-inf"), dtype=self.dtype, device=self.device))
            self._bias[key] = torch.cat(columns, dim=1)  # (N, N + ΣR + pad)
        return self._bias[key]

    def _references(self) -> dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]:
        """Every returning character's K_R, V_R of this step for every layer, moved in one copy
        (the nearest stored step when the bank keeps every k-th step only)."""
        ctrl, found = self.ctrl, []
        if ctrl.bank is None:
            return {}
        for m, c in enumerate(ctrl.characters):
            if c.is_new or c.name not in ctrl.bank:
                continue
            for layer, (k, v) in ctrl.bank.at_step(c.name, ctrl.step).items():
                found.append((layer, m, k, v))
        if not found:
            return {}
        moved = move_together([t for *_, k, v in found for t in (k, v)], self.device, self.dtype)  # one copy at most
        refs = {}
        for i, (layer, m, _, _) in enumerate(found):
            refs.setdefault(layer, []).append((m, moved[2 * i], moved[2 * i + 1]))
        return refs


class IsolatedSelfAttention:
    """Self-attention of an up-block transformer block with the isolated branch (docs/method.md, steps 4-5)."""

    def __init__(self, layer: LayerInfo, controller: IsolationController):
        self.layer, self.ctrl = layer, controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        x, saved = attention_prologue(attn, hidden_states, temb)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (2B, N, C)
        self.ctrl.enter_layer(self.layer, q.shape[0] // 2)
        out = F.scaled_dot_product_attention(split_heads(attn, q), split_heads(attn, k), split_heads(attn, v))
        ctrl = self.ctrl
        ctrl.device, ctrl.dtype = q.device, q.dtype  # so the step callback can prepare the next step here
        half = q.shape[0] // 2  # [negative; prompt]
        if ctrl.masks is not None:
            state = ctrl._see(q)  # this step's masks and references on q's device (built once per step)
            if ctrl.writes_bank(self.layer):
                self._write_references(state, k[half], v[half])
            if ctrl.isolating and ctrl.config.isolated_self:
                f_iso = self._isolated(attn, q[half], k[half], v[half])
                if f_iso is not None:
                    out[half].lerp_(f_iso, ctrl.config.lam)  # F = λ·F_iso + (1 − λ)·F_ori = lerp(F_ori, F_iso, λ)
        return attention_epilogue(attn, merge_heads(out), saved)

    def _write_references(self, state: "_StepState", k, v) -> None:
        """Queue for the bank the keys and values (N, C) of the tokens inside each new character's M_m."""
        ctrl = self.ctrl
        _, _, present, indices = state.at(self.layer.resolution(ctrl.latent_hw))
        for m, c in enumerate(ctrl.characters):
            if c.is_new and present[m]:
                ctrl.queue_reference(c.name, self.layer.name, k.index_select(0, indices[m]),
                                     v.index_select(0, indices[m]))

    def _isolated(self, attn, q, k, v):
        """q, k, v (N, C) of one image -> F_iso (heads, N, d), or None without references.

        Keys/values ``[K_x ; K_R1 ; … ; K_RM ; 0]`` with the additive mask of ``_StepState.bias``
        (the zeros pad the references to the scene's fixed width, -inf in the mask); references,
        masks and bias come from the step's state on q's device."""
        ctrl = self.ctrl
        state = ctrl._see(q)
        hw = self.layer.resolution(ctrl.latent_hw)
        present = state.at(hw)[2]
        refs = [(m, k_r, v_r) for m, k_r, v_r in state.references.get(self.layer.name, ()) if present[m]]
        if not refs:
            return None
        names = [ctrl.characters[m].name for m, _, _ in refs]
        pad = sum(ctrl.reference_width(name, self.layer.name) for name in names) - sum(k_r.shape[0] for _, k_r, _ in refs)
        bias = state.bias(hw, tuple((m, k_r.shape[0]) for m, k_r, _ in refs), pad)  # (N, N + ΣR + pad)
        zeros = ctrl.zeros(pad, k)  # (pad, C)
        K = torch.cat([k] + [k_r for _, k_r, _ in refs] + [zeros])[None]  # (1, N + ΣR + pad, C)
        V = torch.cat([v] + [v_r for _, _, v_r in refs] + [zeros])[None]
        f_iso = F.scaled_dot_product_attention(split_heads(attn, q[None]), split_heads(attn, K),
                                               split_heads(attn, V), attn_mask=bias[None, None])
        return f_iso[0]  # (heads, N, d)


class IsolatedCrossAttention:
    """Cross-attention of an up-block transformer block: records A_m (when its maps make the
    masks, ``record``), blends ID prompts (Eq. 6)."""

    def __init__(self, layer: LayerInfo, controller: IsolationController, record: bool = True):
        self.layer, self.ctrl, self.record = layer, controller, record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctrl = self.ctrl
        ctrl.enter_layer(self.layer, hidden_states.shape[0] // 2)
        # F_ori exactly as AttnProcessor2_0 computes it (so λ = 0 is bit-identical to the model)
        q, out, saved = recorded_cross_attention(attn, hidden_states, encoder_hidden_states, temb,
                                                 ctrl.store if self.record else None, self.layer)
        half = q.shape[0] // 2  # [negative; prompt]
        if ctrl.isolating and ctrl.config.isolated_cross:
            y_s = out[half]  # (heads, N, d): the prompt's global features Y_S (= F_ori), a view of out
            state = ctrl._see(q)
            masks, _, present, _ = state.at(self.layer.resolution(ctrl.latent_hw))  # (M, N) on q's device
            y_blend, beta = y_s, ctrl.config.beta
            for m, c in enumerate(ctrl.characters):
                if state.id_context[m] is None or not present[m]:
                    continue
                y_m = F.scaled_dot_product_attention(
                    q[half:half + 1], *ctrl.id_keys_values(attn, self.layer, m, state))[0]  # (heads, N, d)
                inside = masks[m][None, :, None]
                # Eq. 6: inside M_m, β·Y_m + (1 − β)·Y_S, the character's own ID prompt (lerp(Y_S, Y_m, β))
                y_blend = torch.where(inside, torch.lerp(y_s, y_m, beta), y_blend)
            y_s.lerp_(y_blend, ctrl.config.lam)  # F = λ·F_iso + (1 − λ)·F_ori, in place in out
        return attention_epilogue(attn, merge_heads(out), saved)


def check_mask_resolution(unet, latent_hw: tuple[int, int], config: IsolationConfig) -> list[LayerInfo]:
    """Raise ``ValueError`` if ``config.mask_resolution`` is not the height of one of this U-Net's
    up-block cross-attention maps (listing those it has); returns the up-block layers."""
    layers = find_attention_layers(unet, places=("up",), latent_hw=latent_hw)
    heights = sorted({l.resolution(latent_hw)[0] for l in layers if l.kind == "cross"})
    if config.mask_resolution is not None and config.mask_resolution not in heights:
        raise ValueError(f"IsolationConfig.mask_resolution={config.mask_resolution!r} is not a map height of this "
                         f"U-Net's up-block cross-attention at latent size {tuple(latent_hw)}; it has {heights}. "
                         f"Pick one of them or None (the smallest).")
    return layers


@contextmanager
def isolated_attention(unet, controller: IsolationController):
    """Install the extended block on every up-block transformer block while open.

    Raises:
        ValueError: before any U-Net call, if ``config.mask_resolution`` is not the height of an
            up-block cross-attention map of this U-Net (the list of heights it has is given).
        RuntimeError: on leaving, if the U-Net ran without ``controller.step_callback`` after it.
    """
    layers = check_mask_resolution(unet, controller.latent_hw, controller.config)
    # maps are recorded only where they make the masks: at mask_resolution (default the smallest)
    height = controller.config.mask_resolution or min(l.resolution(controller.latent_hw)[0]
                                                      for l in layers if l.kind == "cross")
    processors = {l.name: IsolatedSelfAttention(l, controller) if l.kind == "self" else
                  IsolatedCrossAttention(l, controller, record=l.resolution(controller.latent_hw)[0] == height)
                  for l in layers}
    controller.resolutions = {l.resolution(controller.latent_hw) for l in layers}
    stride = max(1, controller.config.bank_layer_stride)
    if stride > 1:
        controller.bank_layers = {l.name for l in [l for l in layers if l.kind == "self"][::stride]}
    with installed_processors(unet, processors):
        yield controller
    controller.flush_bank()
    if controller.ran_layers:
        raise RuntimeError("the U-Net ran inside isolated_attention without the controller's step callback "
                           "afterwards, so isolation never acted. Call backbone.denoise(..., "
                           "callback=controller.step_callback), not backbone.generate.")
