"""Figure helpers shared by the notebooks: image grids, map overlays, saving PNGs atomically."""
from __future__ import annotations

import os
from pathlib import Path


import numpy as np

__all__ = ["markdown_table", "figures_dir", "claims_dir", "record_claims", "save_figure", "image_grid", "overlay", "plot_word_maps", "plot_map_grid", "plot_otsu",
           "comic_strip"]

MASK_COLOURS = np.array([[1.0, 0.2, 0.2], [0.2, 0.5, 1.0], [0.2, 0.9, 0.3], [1.0, 0.8, 0.1]])


def figures_dir() -> Path:
    """``$OSA_FIGURES_DIR`` if set (tests use a temporary folder), else ``<repo>/figures``."""
    folder = Path(os.environ.get("OSA_FIGURES_DIR", Path(__file__).resolve().parents[1] / "figures"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def claims_dir() -> Path:
    """``$OSA_CLAIMS_DIR`` if set (tests and ``scripts/run_notebooks.py`` set it to where the executed
    notebooks go), else ``<repo>/build/notebooks``."""
    folder = Path(os.environ.get("OSA_CLAIMS_DIR", Path(__file__).resolve().parents[1] / "build" / "notebooks"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _plain(value):
    """numpy / torch scalars and arrays -> JSON values; NaN -> None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars / arrays
        return _plain(value.tolist())
    if isinstance(value, float) and value != value:
        return None
    return value


def record_claims(name: str, claims: dict) -> Path:
    """Write a notebook's key numbers to ``<claims_dir>/<name>.claims.json`` (temporary file, then rename),
    so ``tests/test_notebooks.py`` can assert what the notebook prints.

    Args:
        name: the notebook's stem, e.g. ``"02_otsu_masks"``.
        claims: JSON-able values (numpy / torch numbers and arrays are converted; NaN becomes null).
    """
    import json
    path = claims_dir() / f"{name}.claims.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_plain(claims), indent=1, allow_nan=False))
    os.replace(tmp, path)
    return path


def save_figure(fig, name: str, dpi: int = 130) -> Path:
    """Save ``fig`` as ``<figures_dir>/<name>.png`` via a temporary file and a rename."""
    path = figures_dir() / f"{name}.png"
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def image_grid(images, titles=None, ncols: int | None = None, size: float = 1.6, suptitle: str | None = None,
               cmap: str | None = None):
    """A grid of images (each (H, W, 3) in [0, 1] or (H, W) maps); returns the figure."""
    import matplotlib.pyplot as plt
    images = list(images)
    ncols = ncols or len(images)
    nrows = int(np.ceil(len(images) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.3 if suptitle else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(np.asarray(image), cmap=cmap, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Colour each mask (M, H, W) over an image (H, W, 3) in [0, 1], upsampling masks as needed."""
    image = np.asarray(image, dtype=np.float32).copy()
    for m, mask in enumerate(np.asarray(masks)):
        if mask.shape != image.shape[:2]:
            reps = image.shape[0] // mask.shape[0]
            mask = np.kron(mask, np.ones((reps, reps))) > 0.5
        image[mask] = (1 - alpha) * image[mask] + alpha * MASK_COLOURS[m % len(MASK_COLOURS)]
    return image


def plot_word_maps(image: np.ndarray, maps: np.ndarray, words: list[str], title: str = ""):
    """The image, then one heat map per word (maps (W, h, w)), each over a faint copy of the image."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.7 * (len(words) + 1), 2.0))
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("image", fontsize=8)
    for ax, word, amap in zip(axes[1:], words, maps):
        ax.imshow(image, interpolation="nearest", alpha=0.35)
        ax.imshow(amap, cmap="magma", alpha=0.75, extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5),
                  interpolation="bilinear")
        ax.set_title(repr(word), fontsize=8)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_map_grid(maps, row_labels: list[str], col_labels: list[str], title: str = "", size: float = 1.1):
    """A grid of maps, ``maps[r][c]`` each (h, w) of any size and normalised on its own."""
    import matplotlib.pyplot as plt
    rows, cols = len(maps), len(maps[0])
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.0, size * rows + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(np.asarray(maps[r][c]), cmap="magma", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(col_labels[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_otsu(a_hat: np.ndarray, threshold: float, mask: np.ndarray, truth: np.ndarray | None, image: np.ndarray,
              word: str, iou: float | None):
    """Map -> histogram with the Otsu threshold -> mask, beside the image and the analyzer's mask."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 5, figsize=(10, 2.1), gridspec_kw={"width_ratios": [1, 1, 1.6, 1, 1]})
    axes[0].imshow(image, interpolation="nearest"); axes[0].set_title("image", fontsize=8)
    axes[1].imshow(a_hat, cmap="magma", interpolation="nearest"); axes[1].set_title(f"Â for {word!r}", fontsize=8)
    axes[2].hist(a_hat.ravel(), bins=32, color="0.4")
    axes[2].axvline(threshold, color="crimson", lw=2, label=f"Otsu t = {threshold:.2f}")
    axes[2].legend(fontsize=7), axes[2].set_title("histogram of Â", fontsize=8), axes[2].tick_params(labelsize=7)
    axes[3].imshow(mask, cmap="gray", interpolation="nearest"); axes[3].set_title("mask Â > t", fontsize=8)
    if truth is not None:
        axes[4].imshow(truth, cmap="gray", interpolation="nearest")
    axes[4].set_title("analyzer mask" + (f"\nIoU {iou:.2f}" if iou is not None else "\n(not drawn)"), fontsize=8)
    for ax in (axes[0], axes[1], axes[3], axes[4]):
        ax.axis("off")
    fig.tight_layout()
    return fig


def comic_strip(rows: dict[str, list[np.ndarray]], captions: list[str], size: float = 1.6, title: str = ""):
    """Rows of scene images (method name -> images), scene prompts as column titles."""
    import matplotlib.pyplot as plt
    names = list(rows)
    cols = len(captions)
    fig, axes = plt.subplots(len(names), cols, figsize=(size * cols + 0.8, size * len(names) + 0.6), squeeze=False)
    for r, name in enumerate(names):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(rows[name][c], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(captions[c], fontsize=6, wrap=True)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def markdown_table(rows: list[dict], digits: int = 2) -> str:
    """A list of dicts as a Markdown table (notebooks show it with ``display(Markdown(...))``)."""
    if not rows:
        return "*(no rows)*"
    keys = list(rows[0])
    def cell(v):
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.{digits}f}"
        return "n/a" if v is None else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
