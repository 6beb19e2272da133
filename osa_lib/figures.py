"""Figure helpers shared by the notebooks: image grids, map overlays, saving PNGs atomically."""
from __future__ import annotations

import os
from pathlib import Path


import numpy as np

__all__ = ["figures_dir", "save_figure", "image_grid", "overlay"]

MASK_COLOURS = np.array([[1.0, 0.2, 0.2], [0.2, 0.5, 1.0], [0.2, 0.9, 0.3], [1.0, 0.8, 0.1]])


def figures_dir() -> Path:
    """``$OSA_FIGURES_DIR`` if set (tests use a temporary folder), else ``<repo>/figures``."""
    folder = Path(os.environ.get("OSA_FIGURES_DIR", Path(__file__).resolve().parents[1] / "figures"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
