"""Baselines on the same backbone and seeds: vanilla (no processors, see ``Backbone.generate``)
and StoryDiffusion's Consistent Self-Attention (CSA).

CSA (Zhou et al., 2024, "StoryDiffusion"), training-free, as its published SDXL code does it:
``gradio_app_sdxl_specific_id_low_vram.py`` (``SpatialAttnProcessor2_0``, ``process_generation``)
and ``utils/gradio_utils.py`` (``cal_attn_indice_xl_effcient_memory``, ``process_original_prompt``)
of github.com/HVision-NKU/StoryDiffusion:

- Only the self-attention (``attn1``) of the **up** blocks is replaced; down and mid blocks and
  every cross-attention run as pretrained.
- **Token sample.** Once per denoising step (not per layer), each image of the batch draws a
  Bernoulli mask over its tokens, per resolution: rate ``sa32`` at the smallest up-block
  resolution (SDXL at 1024²: 32×32), ``sa64`` at the others (64×64). Every layer of that step
  uses the same sample.
- **Paired attention.** An image's queries attend to its own tokens plus the sampled tokens of
  the *other* images of the batch (or of the bank), concatenated as extra keys/values. The
  two classifier-free-guidance halves never mix.
- **Skips.** Step 0 runs plain self-attention; at each later step every layer call falls back to
  plain self-attention with probability 0.3 before step 20 and 0.1 from step 20 on.
- **Reference images and the bank.** For each character, its first ``id_length`` scenes where it
  is alone are its reference images; they are generated together in one batch ("write" mode),
  and every layer writes each image's sampled tokens (its input hidden states, both CFG halves)
  to a bank, per step. Every other scene is generated on its own ("read" mode) and attends to
  its own tokens plus the bank entries of the same step of every character in it.

Deviations from that code (each on purpose):
- Randomness comes from a ``torch.Generator`` on the CPU seeded from the scene's seed (the first
  scene of a reference batch), not from the global ``random``/``torch`` state, so a story is
  deterministic given its seeds and the same on every device. Indices move to the device once
  per step.
- Every scene has its own seed (the story file's, as for the other methods), where StoryDiffusion
  reseeds one seed for every call; the comparison is on the same seeds for every method.
- "sa32"/"sa64" are named after SDXL's 32×32 / 64×64 maps; on another U-Net (the toy: 8×8 and
  16×16) ``sa32`` applies at the smallest up-block resolution and ``sa64`` at the others.
- StoryDiffusion refuses a story in which a character has fewer than ``id_length`` scenes alone.
  Here a character uses the solo scenes it has (at most ``id_length``); one that is never alone
  uses the first scene it appears in, which is then generated in write mode (it reads no bank)
  and serves as the reference of every character in it. A scene that is the reference of
  several characters is generated once and read once.
- The bank stays on the device it was computed on (as the app's), or on the host under
  ``cpu_offload``, and is dropped after the story (the app can save it to disk; ``ReferenceBank``
  is the isolated method's bank, not this one).
- A call whose images draw no extra tokens (rate 0, or an empty bank entry) runs the batched
  plain attention, bit-identical to diffusers' ``AttnProcessor2_0`` (rate 0 = vanilla exactly).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .layers import (LayerInfo, attention_epilogue, attention_prologue, find_attention_layers,
                     installed_processors, merge_heads, split_heads)
from .transfer import concrete_device, move_together, to_device

__all__ = ["CSAConfig", "CSABank", "CSAController", "ConsistentSelfAttention", "consistent_self_attention",
           "reference_scenes"]


@dataclass
class CSAConfig:
    """StoryDiffusion's switches; defaults are its app's defaults.

    Args:
        sa32: token sampling rate at the smallest up-block resolution (SDXL 1024²: 32×32).
        sa64: token sampling rate at the other up-block resolutions (SDXL 1024²: 64×64).
        id_length: reference images per character (the app's slider: 2 by default, 2-4).
        skip_early / skip_late: probability that a layer call runs plain self-attention, before /
            from ``skip_switch_step`` on (StoryDiffusion: 0.3 / 0.1, switch at step 20).
    """

    sa32: float = 0.5
    sa64: float = 0.5
    id_length: int = 2
    skip_early: float = 0.3
    skip_late: float = 0.1
    skip_switch_step: int = 20

    def __post_init__(self):
        for name in ("sa32", "sa64", "skip_early", "skip_late"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"CSA {name} must be in [0, 1], got {value}")
        if self.id_length < 1:
            raise ValueError(f"CSA id_length must be at least 1, got {self.id_length}")

    @classmethod
    def with_rate(cls, rate: float, **kwargs) -> "CSAConfig":
        """One sampling rate at every resolution."""
        return cls(sa32=rate, sa64=rate, **kwargs)


@dataclass
class CSABank:
    """Sampled input tokens of reference images: ``entries[key][step][layer name]`` (2, n, C),
    both CFG halves: StoryDiffusion's later scenes attend to the bank in both halves (the negative
    prompt's queries to the references' negative-prompt tokens), so neither can be dropped. ``key``
    is the reference scene's index in the story.

    Args:
        device: where the tokens are kept: None (default) where they were computed; the CPU under
            ``cpu_offload`` (``Backbone.bank_device``), so that the bank, which grows with every
            layer and step, does not hold the small card's memory; each read copies one layer's
            entries to the reading device.
    """

    entries: dict = field(default_factory=dict)
    device: torch.device | None = None

    def write(self, key, step: int, layer: str, tokens: torch.Tensor) -> None:
        if self.device is not None:
            tokens = to_device(tokens, self.device)
        self.entries.setdefault(key, {}).setdefault(step, {})[layer] = tokens

    def read(self, keys, step: int, layer: str, device=None) -> list[torch.Tensor]:
        """The entries of ``keys`` at this step and layer, on ``device`` (one copy for all of them)."""
        tokens = [self.entries[k][step][layer] for k in keys]
        return tokens if device is None else move_together(tokens, concrete_device(device))

    def nbytes(self, key=None) -> int:
        keys = self.entries if key is None else [key]
        return sum(t.numel() * t.element_size() for k in keys for s in self.entries[k].values() for t in s.values())


class CSAController:
    """Shared state of one generation call: the step, the step's token sample, the skip draws.

    Like StoryDiffusion, the step advances after every installed layer has been called once
    (one U-Net call per step: the CFG batch is one call), so no callback is needed.

    Args:
        layers: the layers CSA is installed on.
        latent_hw: latent (h, w), for each layer's token count.
        config: ``CSAConfig``.
        seed: seeds the CPU generator of every random draw.
        write_keys: write mode: the bank key of each image of the batch (reference scenes).
        read_keys: read mode: the bank keys this (single) scene attends to.
        bank: the ``CSABank`` written or read.
    """

    def __init__(self, layers: list[LayerInfo], latent_hw: tuple[int, int], config: CSAConfig, seed: int,
                 write_keys: list | None = None, read_keys: list | None = None, bank: CSABank | None = None):
        if (write_keys is None) == (read_keys is None):
            raise ValueError("give either write_keys (reference batch) or read_keys (a later scene)")
        self.layers, self.latent_hw, self.config = layers, tuple(latent_hw), config
        self.write_keys, self.read_keys = write_keys, read_keys
        self.bank = bank if bank is not None else CSABank()
        self.generator = torch.Generator("cpu").manual_seed(int(seed))
        sizes = sorted({layer.resolution(self.latent_hw) for layer in layers})
        self.rates = {hw: (config.sa32 if hw == sizes[0] else config.sa64) for hw in sizes}
        self.step, self.calls = 0, 0
        self.indices: dict[tuple[int, int], list[torch.Tensor]] = {}  # this step's sample, per resolution
        self.history: list[dict] = []  # per step: {"indices": {hw: [cpu index per image]}, "paired": [bool per call]}

    @property
    def writing(self) -> bool:
        return self.write_keys is not None

    def step_indices(self, hw: tuple[int, int], device) -> list[torch.Tensor]:
        """This step's sampled token indices at resolution ``hw``, one tensor per image of the batch
        (drawn at the step's first call, on the CPU, and moved to ``device`` once)."""
        if self.calls == 0 and not self.indices:
            drawn = {}
            for size, rate in self.rates.items():  # cal_attn_indice_xl_effcient_memory
                keep = torch.rand((len(self.write_keys or [None]), size[0] * size[1]), generator=self.generator) < rate
                drawn[size] = [row.nonzero(as_tuple=True)[0] for row in keep]
            self.history.append({"indices": drawn, "paired": []})
            self.indices = {size: [i.to(device) for i in rows] for size, rows in drawn.items()}
        return self.indices[hw]

    def paired(self) -> bool:
        """Whether this layer call uses paired attention (False: plain self-attention)."""
        if self.step < 1:
            use = False
        else:
            p = self.config.skip_early if self.step < self.config.skip_switch_step else self.config.skip_late
            use = bool(torch.rand((), generator=self.generator) >= p)  # StoryDiffusion: random() > rand_num
        self.history[-1]["paired"].append(use)
        return use

    def layer_done(self) -> None:
        self.calls += 1
        if self.calls == len(self.layers):
            self.calls, self.step, self.indices = 0, self.step + 1, {}


def _plain(attn, q, k, v):
    return F.scaled_dot_product_attention(split_heads(attn, q), split_heads(attn, k), split_heads(attn, v))


class ConsistentSelfAttention:
    """StoryDiffusion's ``SpatialAttnProcessor2_0`` for one up-block ``attn1`` layer."""

    def __init__(self, layer: LayerInfo, controller: CSAController):
        self.layer, self.controller = layer, controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctl = self.controller
        x, saved = attention_prologue(attn, hidden_states, temb)  # (2B, N, C) = [negative; prompt]
        hw = self.layer.resolution(ctl.latent_hw)
        indices = ctl.step_indices(hw, x.device)  # (n_b,) per image
        n_img = x.shape[0] // 2
        x2 = x.view(2, n_img, *x.shape[1:])  # (2, B, N, C): both CFG halves of each image
        sampled = None
        if ctl.writing:
            if len(ctl.write_keys) != n_img:
                raise ValueError(f"CSA expected a batch of {len(ctl.write_keys)} reference images, got {n_img}")
            sampled = [x2[:, b, indices[b]] for b in range(n_img)]  # (2, n_b, C) each
            for key, tokens in zip(ctl.write_keys, sampled):
                ctl.bank.write(key, ctl.step, self.layer.name, tokens)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (2B, N, C)
        if ctl.writing:
            extra = [[sampled[j] for j in range(n_img) if j != b] for b in range(n_img)]
        else:
            extra = [ctl.bank.read(ctl.read_keys, ctl.step, self.layer.name, x.device)] * n_img
        extra = [torch.cat(e, dim=1) if e else None for e in extra]  # (2, n_extra, C) per image
        if not ctl.paired() or all(e is None or e.shape[1] == 0 for e in extra):
            out = _plain(attn, q, k, v)  # (2B, heads, N, d), exactly AttnProcessor2_0
        else:
            q2, k2, v2 = (t.view(2, n_img, *t.shape[1:]) for t in (q, k, v))
            out = torch.empty(2, n_img, attn.heads, x.shape[1], q.shape[-1] // attn.heads, dtype=q.dtype,
                              device=q.device)
            for b in range(n_img):
                keys, values = k2[:, b], v2[:, b]  # (2, N, C)
                if extra[b] is not None and extra[b].shape[1]:
                    keys = torch.cat([attn.to_k(extra[b]), keys], dim=1)  # (2, n_extra + N, C)
                    values = torch.cat([attn.to_v(extra[b]), values], dim=1)
                out[:, b] = _plain(attn, q2[:, b], keys, values)
            out = out.view(2 * n_img, *out.shape[2:])
        ctl.layer_done()
        return attention_epilogue(attn, merge_heads(out), saved)


def csa_layers(unet) -> list[LayerInfo]:
    """The layers CSA replaces: self-attention of the up blocks."""
    return find_attention_layers(unet, kind="self", places=("up",))


@contextmanager
def consistent_self_attention(unet, controller: CSAController):
    """Install CSA on every up-block self-attention layer while open (restored on exit)."""
    with installed_processors(unet, {l.name: ConsistentSelfAttention(l, controller) for l in controller.layers}):
        yield controller


def reference_scenes(story, id_length: int = 2) -> dict[str, list[int]]:
    """Each character's reference scenes (indices), as ``process_original_prompt`` picks them: its
    first ``id_length`` scenes where it is alone; a character never alone: its first scene (a
    deviation, see the module docstring)."""
    refs = {}
    for name in story.characters:
        alone = [i for i, s in enumerate(story.scenes) if s.characters == [name]]
        present = [i for i, s in enumerate(story.scenes) if name in s.characters]
        refs[name] = alone[:id_length] if alone else present[:1]
    return refs
