"""Figures of one captured block (``osa_lib.inside_block.BlockCapture``): the maps and masks, one
pixel's attention rows, Eq. 6, the λ merge and the bank. Each character keeps one colour
(``character_colours``) in every panel and legend."""
from __future__ import annotations

import numpy as np
import torch

from .figures import MASK_COLOURS

__all__ = ["character_colours", "plot_block_maps", "plot_attention_rows", "pca_rgb", "plot_eq6", "plot_merge",
           "plot_bank"]


def character_colours(names) -> dict[str, np.ndarray]:
    """One RGB colour per character name, in the order given (the story's): the same in every figure."""
    return {name: MASK_COLOURS[i % len(MASK_COLOURS)] for i, name in enumerate(names)}


def _legend(fig, colours: dict, extra=()):
    from matplotlib.patches import Patch
    handles = [Patch(color=c, label=n) for n, c in colours.items()] + list(extra)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, -0.06))


def _paint(image: np.ndarray, masks: dict[str, np.ndarray], colours: dict, alpha: float = 0.5) -> np.ndarray:
    """``image`` (H, W, 3) with each named mask (h, w) bool painted in its character's colour."""
    out = np.asarray(image, dtype=np.float32).copy()
    for name, mask in masks.items():
        mask = np.asarray(mask)
        if mask.shape != out.shape[:2]:
            mask = np.kron(mask, np.ones((out.shape[0] // mask.shape[0], out.shape[1] // mask.shape[1]))) > 0.5
        out[mask] = (1 - alpha) * out[mask] + alpha * colours[name]
    return out


def _mark(ax, index: int, hw, image_size: int | None = None):
    """A cross on token ``index`` of an (h, w) grid (in image pixels when ``image_size`` is given)."""
    r, c = divmod(index, hw[1])
    s = 1 if image_size is None else image_size / hw[0]
    ax.plot((c + 0.5) * s - 0.5, (r + 0.5) * s - 0.5, "x", color="cyan", ms=8, mew=2)


def plot_block_maps(cap, colours: dict, pixel: int | None = None):
    """The scene, each character's Â_m (with its CV) and the masks M_m used at the captured step."""
    import matplotlib.pyplot as plt
    n = len(cap.names)
    fig, axes = plt.subplots(1, n + 2, figsize=(2.3 * (n + 2), 2.6))
    axes[0].imshow(cap.image), axes[0].set_title(f"scene {cap.scene + 1} (final image)", fontsize=8)
    for ax, m, name in zip(axes[1:], range(n), cap.names):
        im = ax.imshow(cap.a_hat_maps[m].numpy(), cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"Â for {name!r}, step {cap.step}\nCV {float(cap.cv[m]):.2f}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, label="Â_m")
    masks = {name: cap.mask_maps[m].numpy() for m, name in enumerate(cap.names)}
    axes[-1].imshow(_paint(cap.image * 0 + 0.85, masks, colours, alpha=0.9))
    axes[-1].set_title(f"M_m at step {cap.step}\n({cap.mask_maps.shape[-1]}×{cap.mask_maps.shape[-1]})", fontsize=8)
    if pixel is not None:
        _mark(axes[-1], pixel, cap.hw, cap.image.shape[0])
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    _legend(fig, {n: colours[n] for n in cap.names})
    fig.suptitle(f"{cap.prompt!r}: the maps and masks the block reads", fontsize=9)
    fig.tight_layout()
    return fig


def plot_attention_rows(cap, rows: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]], pixel: int, colours: dict):
    """One pixel's attention row, one figure row per variant: over the image's own tokens (an
    (h, w) map), then over each reference R_m painted at the pixels of the first scene it was
    stored from. ``rows``: label -> (own (N,), {name: (R_m,)}), each averaged over heads."""
    import matplotlib.pyplot as plt
    names = list(cap.references)
    fig, axes = plt.subplots(len(rows), 1 + len(names), figsize=(2.8 * (1 + len(names)), 2.5 * len(rows)), squeeze=False)
    h, w = cap.hw
    for r, (label, (own, refs)) in enumerate(rows.items()):
        total = float(own.sum()) + sum(float(v.sum()) for v in refs.values())
        ax = axes[r, 0]
        im = ax.imshow(own.view(h, w).numpy(), cmap="viridis")
        _mark(ax, pixel, cap.hw)
        fig.colorbar(im, ax=ax, fraction=0.046, label="attention weight")
        ax.set_title(f"{label}\nown image: {float(own.sum()) / total:.0%} of the row", fontsize=8)
        ax.set_ylabel("row (y)", fontsize=7), ax.set_xlabel("column (x)", fontsize=7)
        for c, name in enumerate(names, start=1):
            ax = axes[r, c]
            first = cap.images[cap.first_scenes[name]]
            grid = np.full(h * w, np.nan)
            stored = cap.stored[name][(cap.self_call.layer.name, _bank_step(cap, name))]
            weights = refs.get(name)
            if not refs:  # the original branch: no references in its keys
                ax.axis("off")
                ax.text(0.5, 0.5, f"R for {name!r}:\nnot among this\nbranch's keys", ha="center", va="center", fontsize=8)
                continue
            if weights is not None:
                grid[stored.numpy()] = weights.numpy()
            ax.imshow(first, alpha=0.35, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
            im = ax.imshow(grid.reshape(h, w), cmap="viridis", alpha=0.9)
            fig.colorbar(im, ax=ax, fraction=0.046, label="attention weight")
            share = 0.0 if weights is None else float(weights.sum()) / total
            masked = " (masked: −∞)" if share == 0 else ""
            ax.set_title(f"R for {name!r} ({len(stored)} tokens,\nscene {cap.first_scenes[name] + 1}): {share:.0%} of the row{masked}",
                         fontsize=8, color=colours[name] * 0.7)
            ax.set_xlabel("column (x)", fontsize=7)
    for ax in axes.flat:
        ax.tick_params(labelsize=6)
    fig.suptitle(f"one pixel's self-attention row (cyan cross), {cap.hw[0]}×{cap.hw[1]} layer, step {cap.step}", fontsize=9)
    fig.tight_layout()
    return fig


def _bank_step(cap, name: str) -> int:
    """The stored step the bank gave at the captured step (the nearest one)."""
    return cap.bank.nearest_step(name, cap.step)


def pca_rgb(features: list[torch.Tensor]) -> list[np.ndarray]:
    """Features (N, C) each -> (N, 3) colours in [0, 1]: their first three principal components,
    fitted on all of them together, so equal colours mean equal features across panels."""
    stacked = torch.cat(features).detach().double()  # (ΣN, C)
    centred = stacked - stacked.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    proj = centred @ v[:3].T  # (ΣN, 3)
    lo, hi = proj.min(0).values, proj.max(0).values
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).numpy()
    return np.split(rgb, np.cumsum([f.shape[0] for f in features])[:-1])


def plot_eq6(cap, y_s: torch.Tensor, y_m: dict[str, torch.Tensor], y: torch.Tensor, colours: dict):
    """Eq. 6 as pictures: Y_S, each Y_m and the blend Y (features (N, C) shown by their shared
    principal components), and which source each pixel takes."""
    import matplotlib.pyplot as plt
    h, w = cap.hw
    panels = [("Y_S: scene prompt", y_s)] + [(f"Y_m: ID prompt of {n!r}", t) for n, t in y_m.items()] + [("Y (Eq. 6)", y)]
    rgbs = pca_rgb([t for _, t in panels])
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.2 * (len(panels) + 1), 2.5))
    for ax, (label, _), rgb in zip(axes, panels, rgbs):
        ax.imshow(rgb.reshape(h, w, 3)), ax.set_title(label, fontsize=8)
    source = np.full((h, w, 3), 0.85)
    for m, name in enumerate(cap.names):
        source[cap.cross_call.masks[m].view(h, w).numpy()] = colours[name]
    axes[-1].imshow(source), axes[-1].set_title("source of Y per pixel", fontsize=8)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    from matplotlib.patches import Patch
    _legend(fig, {n: colours[n] for n in cap.names}, [Patch(color=(0.85,) * 3, label="background: Y_S")])
    fig.suptitle(f"cross-attention outputs, first 3 principal components as RGB ({h}×{w} layer, step {cap.step})", fontsize=9)
    fig.tight_layout()
    return fig


def plot_merge(cap, f_ori: torch.Tensor, f_iso: torch.Tensor, pixel: int, lams=(0.0, 0.5, 1.0, 1.1, 1.5, 2.0)):
    """The λ merge: how far the isolated branch moves each pixel (‖F_iso − F_ori‖), and the chosen
    pixel's feature along F = λ·F_iso + (1 − λ)·F_ori (two principal components of the block's
    features), λ = 0 at F_ori, 1 at F_iso, beyond 1 extrapolated."""
    import matplotlib.pyplot as plt
    h, w = cap.hw
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.9))
    im = axes[0].imshow((f_iso - f_ori).norm(dim=1).view(h, w).numpy(), cmap="magma")
    _mark(axes[0], pixel, cap.hw)
    fig.colorbar(im, ax=axes[0], fraction=0.046, label="‖F_iso − F_ori‖")
    axes[0].set_title("change the isolated branch makes, per pixel", fontsize=8)
    axes[0].set_xlabel("column (x)", fontsize=7), axes[0].set_ylabel("row (y)", fontsize=7)
    f_ori, f_iso = f_ori.detach(), f_iso.detach()
    centred = torch.cat([f_ori, f_iso]).double()
    mean = centred.mean(0)
    _, _, v = torch.linalg.svd(centred - mean, full_matrices=False)
    line = torch.stack([lam * f_iso[pixel] + (1 - lam) * f_ori[pixel] for lam in lams]).double()
    xy = ((line - mean) @ v[:2].T).numpy()
    axes[1].plot(xy[:, 0], xy[:, 1], "-", color="0.6")
    for (x, y), lam in zip(xy, lams):
        axes[1].plot(x, y, "o", color="crimson" if lam == cap.config.lam else "0.2")
        axes[1].annotate(f"λ={lam:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[1].set_xlabel("principal component 1", fontsize=8), axes[1].set_ylabel("principal component 2", fontsize=8)
    axes[1].set_title(f"the pixel's F for each λ (red: λ = {cap.config.lam:g}, this run)", fontsize=8)
    fig.suptitle("the merge F = λ·F_iso + (1 − λ)·F_ori (self-attention output)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_bank(cap, colours: dict, layers: dict[str, str], step: int | None = None):
    """Per character (rows) and up-block self-attention layer (columns): its first scene with the
    pixels whose keys and values the bank stored at ``step`` (default: the one the captured step read).

    Args:
        layers: layer name -> a short label ("up1 8×8").
    """
    import matplotlib.pyplot as plt
    names = list(cap.stored)
    fig, axes = plt.subplots(len(names), len(layers), figsize=(2.2 * len(layers), 2.3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        s = _bank_step(cap, name) if step is None else step
        first = cap.images[cap.first_scenes[name]]
        for c, (layer, label) in enumerate(layers.items()):
            ax = axes[r, c]
            pixels = cap.stored[name].get((layer, s))
            n = 0 if pixels is None else len(pixels)
            grid_hw = cap.grids[layer]
            mask = np.zeros(grid_hw[0] * grid_hw[1], bool)
            if pixels is not None:
                mask[pixels.numpy()] = True
            ax.imshow(_paint(first, {name: mask.reshape(grid_hw)}, colours, alpha=0.6))
            ax.set_title(f"{name!r} · {label}\nstep {s}: {n} tokens", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    _legend(fig, {n: colours[n] for n in names})
    fig.suptitle("what the bank stored: keys and values of these pixels (first scene of each character)", fontsize=9)
    fig.tight_layout()
    return fig
