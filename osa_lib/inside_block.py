"""Inside the extended block: one transformer block of one scene at one denoising step, captured
so that a reader can recompute each equation by hand and compare it with what the library did.

``open_block`` draws a story up to a scene with returning characters (``generate_story`` with
isolated attention) and, while that scene's U-Net runs, records at one step what one up-block
transformer block's two processors saw and returned (the prompt half of the CFG batch):

- self-attention (attn1): its input ``X``, so that ``q, k, v = W_q X, W_k X, W_v X``; the
  references ``R_m`` (``K_R``, ``V_R``) it read from the bank; its output (after ``to_out``);
- cross-attention (attn2): its input, the scene prompt's context (``Y_S``'s keys and values),
  each character's ID-prompt context (``Y_m``) and its output;
- the masks ``M_m`` and normalised maps ``Â_m`` both processors read at this step (made from the
  running mean of ``A_m`` over the steps before), and the switches (λ, w, β).

It also keeps, for each character's first scene, which pixels the bank stored at every
(layer, step): the mask used at that step, at the layer's resolution. Nothing here plots
(``osa_lib.block_figures`` draws); nothing here recomputes the method (the notebook and the tests
do it by hand from these records and compare).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import IsolationConfig
from .generation import generate_story
from .isolation import IsolationController
from .layers import LayerInfo, attention_prologue, find_attention_layers, installed_processors
from .masks import resize_masks
from .story import Story, StoryError

__all__ = ["AttentionCall", "BlockCapture", "open_block", "stored_pixels", "bank_counts"]


@dataclass
class AttentionCall:
    """One processor call at the captured step, prompt half only.

    Attributes:
        layer: where the layer sits.
        attn: the diffusers ``Attention`` module (its ``to_q``, ``to_k``, ``to_v``, ``to_out``, heads).
        x: (N, C) the hidden states it received (after diffusers' norms; the block's ``norm1``/``norm2``
            ran before the call).
        context: (T, D) the scene prompt's encoder states (cross-attention), None for self-attention.
        out: (N, C) what the library's processor returned (after ``to_out``).
        masks: (M, N) bool ``M_m`` at this layer's resolution.
        a_hat: (M, N) ``Â_m`` at this layer's resolution (0 for a character whose map was unreliable).
    """

    layer: LayerInfo
    attn: object
    x: torch.Tensor
    context: torch.Tensor | None
    out: torch.Tensor
    masks: torch.Tensor
    a_hat: torch.Tensor


@dataclass
class BlockCapture:
    """What one transformer block saw and returned at one step of one scene (``open_block``).

    Attributes:
        scene: index of the captured scene; ``prompt`` its prompt, ``image`` its final image.
        names: the scene's characters, in its order (m = 0, 1, ...).
        step, num_steps: the captured denoising step (0-based) out of ``num_steps``.
        config: the switches the scene ran with (λ = ``config.lam``, w = ``config.reweight``).
        self_call, cross_call: the block's attn1 and attn2 calls.
        references: name -> (K_R, V_R) each (R_m, C), what the bank gave this layer at this step,
            for the returning characters whose mask is not empty (those the library attends to).
        id_contexts: name -> (T, D) the character's ID-prompt encoder states (for ``Y_m``).
        a_hat_maps: (M, h, w) ``Â_m`` at the mask resolution; ``mask_maps`` (M, h, w) bool ``M_m``;
            ``cv``: (M,) coefficient of variation of each aggregated map (the overlap rule's key).
        first_scenes: name -> index of the scene that introduced it; ``images`` every scene's image.
        stored: name -> {(layer name, step): (R,) long} the pixel indices of the layer's grid whose
            keys and values the bank stored (``stored_pixels``).
    """

    scene: int
    prompt: str
    image: np.ndarray
    names: list[str]
    step: int
    num_steps: int
    config: IsolationConfig
    self_call: AttentionCall
    cross_call: AttentionCall
    hw: tuple[int, int]  # the captured layer's feature map; N = h·w image tokens
    references: dict[str, tuple[torch.Tensor, torch.Tensor]]
    id_contexts: dict[str, torch.Tensor]
    a_hat_maps: torch.Tensor
    mask_maps: torch.Tensor
    cv: torch.Tensor
    first_scenes: dict[str, int]
    images: list[np.ndarray]
    stored: dict[str, dict[tuple[str, int], torch.Tensor]] = field(default_factory=dict)
    bank: object = None
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)  # up-block self-attention layer -> (h, w)
    labels: dict[str, str] = field(default_factory=dict)  # up-block self-attention layer -> "up1 a0 8×8"

    @property
    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (N, C) of the original branch's self-attention: ``W_q X``, ``W_k X``, ``W_v X``."""
        attn, x = self.self_call.attn, self.self_call.x
        with torch.no_grad():
            return attn.to_q(x), attn.to_k(x), attn.to_v(x)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(L, heads·d) -> (heads, L, d), the per-head view attention works in."""
        h = self.self_call.attn.heads
        return t.view(t.shape[0], h, t.shape[1] // h).transpose(0, 1)

    @property
    def scale(self) -> float:
        """1/√d, the attention's logit scale."""
        return float(self.self_call.attn.scale)

    def pixel(self, name: str) -> int:
        """The image token (index into N) inside ``name``'s mask with the highest ``Â_m``."""
        m = self.names.index(name)
        masks, a_hat = self.self_call.masks[m], self.self_call.a_hat[m]
        if not masks.any():
            raise ValueError(f"{name!r} has an empty mask at step {self.step}; pick another character or step")
        return int(torch.where(masks, a_hat, torch.full_like(a_hat, -1.0)).argmax())


class _Recorder:
    """Runs a library processor unchanged; at ``step`` keeps its prompt-half input and output."""

    def __init__(self, inner, layer: LayerInfo, controller: IsolationController, step: int, sink: dict):
        self.inner, self.layer, self.ctrl, self.step, self.sink = inner, layer, controller, step, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        step = self.ctrl.step  # the library's processors do not move it
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if step == self.step and self.ctrl.masks is not None:
            half = hidden_states.shape[0] // 2  # [negative; prompt]
            x, _ = attention_prologue(attn, hidden_states[half:], temb)
            masks, a_hat = self.ctrl.masks_at(self.layer, device="cpu")
            context = None if encoder_hidden_states is None else encoder_hidden_states[half].detach().clone()
            self.sink[self.layer.kind] = AttentionCall(self.layer, attn, x[0].detach().clone(), context,
                                                       out[half].detach().clone(), masks.clone(), a_hat.clone())
            sm = self.ctrl.masks
            self.sink["maps"] = (sm.A_hat[0].clone(), sm.masks[0].clone(), sm.cv[0].clone())
        return out


@contextmanager
def _recording(unet, layers: list[LayerInfo], controller: IsolationController, step: int, sink: dict):
    """Wrap the processors now installed on ``layers`` (the library's) with recorders."""
    current = unet.attn_processors
    with installed_processors(unet, {l.name: _Recorder(current[l.name], l, controller, step, sink) for l in layers}):
        yield


def _block_layers(unet, latent_hw, block: int) -> tuple[LayerInfo, LayerInfo]:
    """(attn1, attn2) of the ``block``-th up-block transformer block (Python indexing)."""
    layers = find_attention_layers(unet, places=("up",), latent_hw=latent_hw)
    selfs = [l for l in layers if l.kind == "self"]
    if not -len(selfs) <= block < len(selfs):
        raise ValueError(f"block={block} is out of range: this U-Net has {len(selfs)} up-block transformer blocks "
                         f"(0..{len(selfs) - 1}, or -1 for the last)")
    attn1 = selfs[block]
    attn2 = next(l for l in layers if l.kind == "cross" and l.name == attn1.name.replace(".attn1.", ".attn2."))
    return attn1, attn2


def stored_pixels(mask_history: list[torch.Tensor], m: int, layer: LayerInfo, latent_hw, step: int) -> torch.Tensor:
    """(R,) indices of the pixels of ``layer``'s grid whose keys and values a first scene stored for
    character ``m`` at ``step``: the mask used at that step (made after step ``step - 1``, so
    ``mask_history[step - 1]``) at the layer's resolution."""
    masks = resize_masks(mask_history[step - 1][None].cpu(), layer.resolution(latent_hw))[0]  # (M, h, w)
    return masks[m].flatten().nonzero().squeeze(1)


def bank_counts(bank, name: str) -> dict[str, dict[int, int]]:
    """{layer name: {step: tokens stored}} of one character: what the bank holds per layer and step."""
    counts: dict[str, dict[int, int]] = {}
    for (layer, step), (k, _) in sorted(bank.tokens.get(name, {}).items()):
        counts.setdefault(layer, {})[step] = int(k.shape[0])
    return counts


def open_block(backbone, story: Story, scene: int, config: IsolationConfig | None = None, block: int = -1,
               step: int | None = None, num_inference_steps: int | None = None) -> BlockCapture:
    """Draw ``story`` up to ``scene`` with isolated attention and capture one block at one step.

    Args:
        scene: index of a scene with at least one returning character (its references are read).
        config: the switches (default ``backbone.isolation_config()``).
        block: which up-block transformer block (Python index; -1: the last, the largest map).
        step: the denoising step to capture (0-based); default the middle of the steps the isolated
            branch runs in (after warm-up, and never step 0, which has no masks yet).
        num_inference_steps: default the backbone's.

    Raises:
        StoryError / ValueError: before anything runs, for a scene without a returning character, a
            block out of range or a step where the isolated branch does not run.
    """
    config = config or backbone.isolation_config()
    steps = num_inference_steps or backbone.default_steps
    if not 0 <= scene < len(story.scenes):
        raise StoryError(f"scene={scene} is out of range: the story has {len(story.scenes)} scenes (0-based)")
    seen = {n for s in story.scenes[:scene] for n in s.characters}
    if not seen & set(story.scenes[scene].characters):
        raise StoryError(f"scene {scene} ({story.scenes[scene].prompt!r}) has no returning character, so no "
                         f"reference is read; choose a scene whose characters appeared before")
    first = max(1, math.ceil(config.warmup * steps))
    last = math.ceil(config.end * steps) - 1
    step = (first + last) // 2 if step is None else step
    if not first <= step <= last:
        raise ValueError(f"step={step} is outside the steps the isolated branch runs in with these switches "
                         f"({first}..{last} of {steps}); pick one of them")
    latent_hw = tuple(backbone.latent_shape[1:])
    layers = _block_layers(backbone.unet, latent_hw, block)
    for layer in layers:
        attn = dict(backbone.unet.named_modules())[layer.name.rsplit(".processor", 1)[0]]
        if attn.residual_connection or attn.rescale_output_factor != 1 or attn.group_norm is not None \
                or attn.spatial_norm is not None:
            raise ValueError(f"{layer.name}: the by-hand view assumes out = to_out(attention), as in "
                             f"diffusers' transformer blocks; this layer adds a residual, a rescale or a norm")
    sink, controllers = {}, {}

    def hook(i, controller):
        controllers[i] = controller
        return _recording(backbone.unet, list(layers), controller, step, sink) if i == scene else None

    prefix = Story(story.characters, story.scenes[:scene + 1], story.title, story.source)
    result = generate_story(backbone, prefix, "isolated", config=config, num_inference_steps=steps,
                            progress=False, scene_hook=hook)
    if "self" not in sink:
        raise RuntimeError(f"step {step} of scene {scene} was not captured: no masks were made by then")
    names = list(story.scenes[scene].characters)
    ctrl = controllers[scene]
    present = sink["self"].masks.any(dim=1).tolist()
    references = {}
    for m, name in enumerate(names):
        if name in seen and present[m]:
            k, v = result.bank.at_step(name, step)[layers[0].name]
            references[name] = (k.float().cpu(), v.float().cpu())
    id_contexts = {c.name: c.id_embedding.float().cpu() for c in ctrl.characters}
    first_scenes = {n: next(i for i, s in enumerate(story.scenes) if n in s.characters) for n in story.characters
                    if n in seen | set(names)}
    stored = {}
    by_layer = {l.name: l for l in find_attention_layers(backbone.unet, kind="self", places=("up",), latent_hw=latent_hw)}
    for name, i in first_scenes.items():
        history, m = controllers[i].mask_history, story.scenes[i].characters.index(name)
        stored[name] = {(layer, s): stored_pixels(history, m, by_layer[layer], latent_hw, s)
                        for (layer, s) in result.bank.tokens.get(name, {})}
    a_hat_maps, mask_maps, cv = sink["maps"]
    return BlockCapture(scene, story.scenes[scene].prompt, result.images[scene], names, step, steps, config,
                        sink["self"], sink["cross"], layers[0].resolution(latent_hw), references, id_contexts,
                        a_hat_maps, mask_maps, cv,
                        first_scenes, result.images, stored, result.bank,
                        {name: layer.resolution(latent_hw) for name, layer in by_layer.items()},
                        {name: layer.label(latent_hw) for name, layer in by_layer.items()})
