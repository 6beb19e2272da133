"""Figure helpers shared by the notebooks: image grids, map overlays, saving PNGs atomically (the claims and
results writers live in ``records``; they are re-exported here)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .records import claims_dir, command_line, markdown_table, record_claims, results_header, write_results

__all__ = ["markdown_table", "figures_dir", "claims_dir", "record_claims", "save_figure", "image_grid", "overlay", "plot_word_maps", "plot_map_grid", "plot_otsu",
           "comic_strip", "wrap_caption", "plot_iou_over_steps", "plot_iou_histogram", "failure_grid", "plot_binding",
           "rule_boxplot", "rule_example", "plot_lambda_sweep", "plot_identity_details", "mixing_grid", "draw_layer_map",
           "map_explorer", "results_header", "write_results", "command_line", "save_gif", "plot_measures", "plot_colour_kept",
           "figure_png", "live_figure"]

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


def save_gif(frames, name: str, scale: int = 4, ms_per_frame: int = 250) -> Path:
    """Save frames (F, H, W, 3) in [0, 1] as an animated, looping ``<figures_dir>/<name>.gif``,
    each pixel drawn as a ``scale``×``scale`` block, via a temporary file and a rename."""
    from PIL import Image
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 1:
        raise ValueError(f"save_gif expects frames of shape (F, H, W, 3), got {frames.shape}")
    pixels = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8).repeat(scale, 1).repeat(scale, 2)
    images = [Image.fromarray(f) for f in pixels]
    path = figures_dir() / f"{name}.gif"
    tmp = path.with_name(path.stem + ".tmp.gif")
    images[0].save(tmp, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    os.replace(tmp, path)
    return path


def plot_measures(rows: list[dict], metrics: list[str], group: str = "method", title: str = "",
                  units: dict[str, str] | None = None):
    """One panel per measure: a bar per ``row[group]`` at ``row[metric] = (mean, sem, n)``, with the
    standard error as an error bar; returns the figure."""
    import matplotlib.pyplot as plt
    units = units or {}
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.1 * len(metrics), 2.4), squeeze=False)
    labels = [r[group] for r in rows]
    for ax, metric in zip(axes[0], metrics):
        means = [r[metric][0] for r in rows]
        sems = [0 if r[metric][1] is None or r[metric][1] != r[metric][1] else r[metric][1] for r in rows]
        ax.bar(range(len(rows)), means, yerr=sems, capsize=3, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=8)
        ax.set_ylabel(units.get(metric, "%"), fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def image_grid(images, titles=None, ncols: int | None = None, size: float = 1.6, suptitle: str | None = None,
               cmap: str | None = None, legend: dict | None = None):
    """A grid of images (each (H, W, 3) in [0, 1] or (H, W) maps); returns the figure.

    Args:
        legend: name -> RGB colour, drawn as a legend under the grid (e.g. the characters' mask colours).
    """
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
    if legend:
        from matplotlib.patches import Patch
        fig.legend(handles=[Patch(color=c, label=n) for n, c in legend.items()], loc="lower center", ncol=len(legend),
                   fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    return fig


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5, colours=None) -> np.ndarray:
    """Colour each mask (M, H, W) over an image (H, W, 3) in [0, 1], upsampling masks as needed.

    Args:
        colours: one RGB colour per mask (default ``MASK_COLOURS`` in order); pass each character's
            own colour so that it keeps it from panel to panel.
    """
    image = np.asarray(image, dtype=np.float32).copy()
    for m, mask in enumerate(np.asarray(masks)):
        if mask.shape != image.shape[:2]:
            reps = image.shape[0] // mask.shape[0]
            mask = np.kron(mask, np.ones((reps, reps))) > 0.5
        colour = MASK_COLOURS[m % len(MASK_COLOURS)] if colours is None else colours[m]
        image[mask] = (1 - alpha) * image[mask] + alpha * np.asarray(colour)
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


def plot_map_grid(maps, row_labels: list[str], col_labels: list[str], title: str = "", size: float = 1.1,
                  colorbar_label: str = "attention"):
    """A grid of maps, ``maps[r][c]`` each (h, w) of any size, one colour scale per row (its colour
    bar at the row's end), so the columns of a row compare."""
    import matplotlib.pyplot as plt
    rows, cols = len(maps), len(maps[0])
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.6, size * rows + 0.4), squeeze=False)
    for r in range(rows):
        row = [np.asarray(m, dtype=float) for m in maps[r]]
        lo, hi = min(float(m.min()) for m in row), max(float(m.max()) for m in row)
        for c in range(cols):
            ax = axes[r, c]
            im = ax.imshow(row[c], cmap="magma", interpolation="nearest", vmin=lo, vmax=hi)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(col_labels[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")
        bar = fig.colorbar(im, ax=list(axes[r]), fraction=0.03, pad=0.02)
        bar.ax.tick_params(labelsize=6), bar.set_label(colorbar_label, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_otsu(a_hat: np.ndarray, threshold: float, mask: np.ndarray, truth: np.ndarray | None, image: np.ndarray,
              word: str, iou: float | None):
    """Map -> histogram with the Otsu threshold -> mask, beside the image and the analyzer's mask."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 5, figsize=(11, 2.5), gridspec_kw={"width_ratios": [1, 1.2, 1.6, 1, 1]})
    axes[0].imshow(image, interpolation="nearest"); axes[0].set_title("generated image", fontsize=8)
    shown = axes[1].imshow(a_hat, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    axes[1].set_title(f"Â for {word!r}", fontsize=8)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    axes[2].hist(a_hat.ravel(), bins=32, range=(0, 1), color="0.4")
    axes[2].axvline(threshold, color="crimson", lw=2, label=f"Otsu t = {threshold:.2f}")
    axes[2].set_xlabel("Â (normalised attention)", fontsize=7), axes[2].set_ylabel("pixels of the map", fontsize=7)
    axes[2].legend(fontsize=7), axes[2].set_title("histogram of Â", fontsize=8), axes[2].tick_params(labelsize=7)
    axes[3].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[3].set_title("mask: Â > t (white)", fontsize=8)
    if truth is not None:
        axes[4].imshow(truth, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[4].set_title("analyzer's mask" + (f"\nIoU {iou:.2f}" if iou is not None else "\n(not drawn)"), fontsize=8)
    for ax in (axes[0], axes[1], axes[3], axes[4]):
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"From map to mask: Otsu's threshold on the map of {word!r}", fontsize=9)
    fig.tight_layout()
    return fig


def wrap_caption(text: str, width_inches: float, fontsize: float = 6) -> str:
    """``text`` broken into lines that fit a column ``width_inches`` wide at ``fontsize`` points
    (an average character is about 0.55 em wide), so neighbouring titles do not overlap."""
    import textwrap
    chars = max(8, int(width_inches * 72 / (0.55 * fontsize)))
    return textwrap.fill(text, width=chars)


def comic_strip(rows: dict[str, list[np.ndarray]], captions: list[str], size: float = 1.6, title: str = "",
                notes: dict[str, list[str]] | None = None):
    """Rows of scene images (method name -> images), scene prompts as column titles.

    Args:
        notes: row name -> one short text per panel, written under it (e.g. "Box kept · Tri lost").
    """
    import matplotlib.pyplot as plt
    names = list(rows)
    cols = len(captions)
    lines = max(wrap_caption(c, size).count("\n") + 1 for c in captions)
    fig, axes = plt.subplots(len(names), cols, figsize=(size * cols + 0.8, size * len(names) + 0.4 + 0.12 * lines),
                             squeeze=False)
    for r, name in enumerate(names):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(rows[name][c], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:  # wrapped to the column: matplotlib's wrap=True wraps at the figure's edge only
                ax.set_title(wrap_caption(captions[c], size), fontsize=6)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if notes and name in notes:
                note = notes[name][c]
                ax.set_xlabel(wrap_caption(note, size), fontsize=5.5,
                              color="crimson" if "lost" in note else ("darkgreen" if "kept" in note else "0.3"))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# --- Figures the notebooks draw (notebooks hold no logic) ------------------------------------------

def plot_iou_over_steps(curve: dict):
    """``experiments.iou_over_steps``: mean IoU per step ± standard error over the drawn characters,
    one step's map vs the running mean."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 2.8))
    steps = np.array(curve["steps"]) + 1
    ax.errorbar(steps, curve["single_step"], yerr=curve.get("single_step_se"), fmt="o-", capsize=2,
                label="this step's map only")
    ax.errorbar(steps, curve["running_mean"], yerr=curve.get("running_mean_se"), fmt="s-", capsize=2,
                label="running mean over steps (method)")
    ax.set_xlabel("denoising step"), ax.set_ylabel("mean mask IoU vs analyzer (± s.e.)")
    ax.legend(fontsize=8), ax.grid(alpha=0.3)
    ax.set_title("Masks from one step's map vs from the running mean", fontsize=9)
    return fig


def plot_iou_histogram(records: list[dict], target: float = 0.5):
    """Histogram of the drawn characters' mask IoUs with the target line."""
    import matplotlib.pyplot as plt
    ious = [r["iou"] for r in records if r["iou"] is not None]
    fig, ax = plt.subplots(figsize=(4.5, 2.5))
    ax.hist(ious, bins=np.linspace(0, 1, 21), color="steelblue")
    ax.axvline(target, color="crimson", ls="--", label=f"target {target}")
    ax.set_xlabel("mask IoU against the analyzer"), ax.set_ylabel("characters"), ax.legend(fontsize=8)
    ax.set_title(f"Mask IoU of the {len(ious)} drawn characters", fontsize=9)
    return fig


def failure_grid(images: np.ndarray, records: list[dict]):
    """The worst-scored masks of drawn characters (``experiments.worst_scored``): per record, the
    image with the method's mask in red, then the analyzer's mask of the same character in blue."""
    panels, titles = [], []
    for r in records:
        panels += [overlay(images[r["image"]], r["mask"][None]), _overlay_as(images[r["image"]], r["truth_mask"], 1)]
        titles += [f"{r['word']!r}: method's mask\nIoU {r['iou']:.2f}" + (f" ({r['reason']})" if r["reason"] else ""),
                   f"{r['word']!r}: analyzer's mask"]
    return image_grid(panels, titles, ncols=4, size=2.0,
                      suptitle=f"The {len(records)} lowest-IoU masks of drawn characters (red: mask used, blue: truth)")


def _overlay_as(image: np.ndarray, mask: np.ndarray, colour_index: int) -> np.ndarray:
    """``overlay`` of one mask in the colour ``MASK_COLOURS[colour_index]``."""
    masks = np.zeros((colour_index + 1, *np.asarray(mask).shape), bool)
    masks[colour_index] = mask
    return overlay(image, masks)


def plot_binding(table: list[dict]):
    """``experiments.binding_table``: own share per layer group, shape and colour words side by side,
    each bar with its standard error over scenes."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    labels = sorted({row["layers"] for row in table})
    for k, word in enumerate(("shape", "colour")):
        rows = {row["layers"]: row for row in table if row["word"] == word}
        errors = [rows[l].get("own share SE", float("nan")) for l in labels]
        ax.bar(np.arange(len(labels)) + 0.38 * k, [rows[l]["own share"] for l in labels], width=0.38,
               yerr=[0 if e != e else e for e in errors], capsize=3, label=f"{word} word (mean ± SE)")
    ax.axhline(0.5, color="k", ls=":", lw=1, label="no binding (0.5)")
    ax.set_xticks(np.arange(len(labels)) + 0.19, labels, fontsize=8), ax.set_ylim(0, 1), ax.set_ylabel("own share")
    ax.set_xlabel("cross-attention layers (place, feature-map size)", fontsize=8)
    ax.set_title("Does a word's attention land on its own character? (rendered scenes)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_colour_kept(kept: dict[str, tuple[float, float]], chance: float | None = None, title: str = ""):
    """Colour kept (%) per method: mean with its standard error, and the chance line when known."""
    import matplotlib.pyplot as plt
    names = {"vanilla": "vanilla", "csa": "CSA", "isolated": "isolated (paper's)"}
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    means = [kept[m][0] for m in kept]
    errors = [0 if kept[m][1] != kept[m][1] else kept[m][1] for m in kept]
    ax.bar(range(len(kept)), means, yerr=errors, capsize=4, color="steelblue", label="mean ± standard error")
    if chance is not None:
        ax.axhline(chance, color="k", ls=":", lw=1, label=f"chance ({chance:.0f} %)")
    ax.set_xticks(range(len(kept)), [names.get(m, m) for m in kept], fontsize=8)
    ax.set_ylim(0, 100), ax.set_ylabel("colour kept (%)"), ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def rule_boxplot(per_rule: dict[str, list[float]]):
    """Per-scene IoU of each overlap rule."""
    import matplotlib.pyplot as plt
    names = {"lower_cv": "lower CV\n(paper)", "higher_cv": "higher CV", "argmax": "argmax Â"}
    fig, ax = plt.subplots(figsize=(4.5, 2.6))
    ax.boxplot(list(per_rule.values()), showmeans=True)
    ax.set_xticks(range(1, len(per_rule) + 1), [names.get(r, r) for r in per_rule])
    ax.set_ylabel("mean IoU of the two masks"), ax.grid(alpha=0.3, axis="y")
    ax.set_xlabel("overlap rule (triangle: mean)", fontsize=8)
    ax.set_title(f"Overlap rules on {len(next(iter(per_rule.values())))} overlapping scenes", fontsize=9)
    return fig


def rule_example(image: np.ndarray, prompt: str, masks: dict[str, np.ndarray], words: list[str],
                 ious: dict[str, list[float | None]] | None = None):
    """One scene, then its masks under each overlap rule (``experiments.rule_masks``), each character
    in the same colour in every panel and keyed by a legend; ``ious`` (``experiments.rule_ious``)
    puts each rule's per-character IoU in its title."""
    from matplotlib.patches import Patch
    names = {"lower_cv": "lower CV (paper)", "higher_cv": "higher CV", "argmax": "argmax Â"}
    panels = [image] + [overlay(image, m) for m in masks.values()]
    titles = [prompt.replace(" and ", "\nand ")]
    for rule in masks:
        score = "" if ious is None else "\nIoU " + ", ".join(f"{w} " + ("n/a" if v is None else f"{v:.2f}")
                                                          for w, v in zip(words, ious[rule]))
        titles.append(names.get(rule, rule) + score)
    fig = image_grid(panels, titles, size=2.0, suptitle="One overlapping scene: each rule's masks")
    fig.legend(handles=[Patch(color=MASK_COLOURS[m % len(MASK_COLOURS)], label=f"mask of the {w}") for m, w in enumerate(words)],
               loc="lower center", ncol=len(words), fontsize=7, bbox_to_anchor=(0.5, -0.06))
    return fig


def plot_lambda_sweep(sweep: list[dict], errors: list[dict] | None = None, paper_lam: float = 1.1):
    """``experiments.lambda_sweep``: every metric against λ with its standard error over seeds
    (``experiments.lambda_sweep_errors``), the paper's λ dotted, the legend beside the axes."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    lams = [r["λ"] for r in sweep]
    for key in sweep[0]:
        if key != "λ":
            err = None if errors is None else [e[key] for e in errors]
            ax.errorbar(lams, [r[key] for r in sweep], yerr=err, fmt="o-", capsize=3, label=key)
    ax.axvline(paper_lam, color="0.6", ls=":", label=f"paper's λ = {paper_lam:g}")
    ax.axvline(0, color="0.8", ls="-", lw=4, alpha=0.5, label="λ = 0: unmodified model")
    ax.set_xlabel("λ (merge weight of the isolated branch)"), ax.set_ylabel("% (mean ± standard error over seeds)")
    ax.set_title("Isolated attention (the paper's method) against λ", fontsize=9), ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_identity_details(carry: list[dict], details=("hue", "brightness", "size", "mark"), chance: dict | None = None,
                          errors: list[dict] | None = None):
    """``experiments.carry_over``: IIS-toy per detail, one panel per story, one bar per method with
    its standard error over seeds (``experiments.carry_over_errors``), and each detail's chance
    level (``experiments.identity_chance``) as a short black line."""
    import matplotlib.pyplot as plt
    labels = {"isolated": "isolated (the paper's method)", "csa": "Consistent Self-Attention", "vanilla": "vanilla"}
    colours = {"vanilla": "0.6", "csa": "tab:orange", "isolated": "tab:blue"}
    stories = list(dict.fromkeys(r["story"] for r in carry))
    fig, axes = plt.subplots(1, len(stories), figsize=(4 * len(stories) + 1.5, 2.8), sharey=True, squeeze=False)
    for ax, label in zip(axes[0], stories):
        rows = [r for r in carry if r["story"] == label]
        errs = [None] * len(rows) if errors is None else [e for e in errors if e["story"] == label]
        for k, (r, e) in enumerate(zip(rows, errs)):
            ax.bar(np.arange(len(details)) + 0.27 * (k - 1), [r[d] for d in details], 0.27,
                   yerr=None if e is None else [e[d] for d in details], capsize=2,
                   label=labels.get(r["method"], r["method"]), color=colours.get(r["method"]))
        if chance is not None:
            for i, d in enumerate(details):
                ax.hlines(chance[d], i - 0.45, i + 0.45, color="k", lw=1.5, label="chance" if i == 0 else None)
        ax.set_xticks(range(len(details)), details), ax.set_title(f"{label} story", fontsize=9), ax.grid(axis="y", alpha=0.3)
        ax.set_xlabel("identity detail")
    axes[0, 0].set_ylabel("IIS-toy per detail (%, ± s.e.)")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Which identity details carry over from a character's first scene", fontsize=9)
    fig.tight_layout()
    return fig


def mixing_grid(rows: list[dict], colours=("red", "blue", "green")):
    """Per mixed scene of ``experiments.mixing_and_neglect``: vanilla's image, isolated's, its masks."""
    panels = [p for r in rows for p in (r["vanilla image"], r["isolated image"], overlay(r["isolated image"], r["isolated masks"]))]
    titles = [t for r in rows for t in (f"vanilla (left out: {', '.join(r['vanilla left out']) or 'none'})", "isolated: mixed",
                                       "masks: " + ", ".join(f"{n} {c}" for n, c in zip(r["names"], colours)))]
    return image_grid(panels, titles, ncols=3, size=2.2,
                      suptitle="Three-character scenes isolated attention mixed, beside vanilla from the same noise")


def draw_layer_map(store, labels: list[str], words: list[str], layer_index: int = 0, step: int = 0, word: str | None = None):
    """One layer's map of one word at one step (``store`` kept per step), with its colour bar."""
    import matplotlib.pyplot as plt
    word = word or words[0]
    layer = list(store.average_maps())[layer_index]
    amap = store.per_step[step][layer][0, words.index(word)].numpy()  # (h, w)
    fig, ax = plt.subplots(figsize=(3.0, 2.6))
    im = ax.imshow(amap, cmap="magma")
    fig.colorbar(im, ax=ax, fraction=0.046, label="attention")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"{labels[layer_index]}, step {step + 1}, {word!r}", fontsize=8)
    return fig


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed (it is not drawn a second time)."""
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def live_figure(draw, controls: dict, description: str = ""):
    """Show ``controls`` (name -> ipywidget) and below them ``draw(**values)`` (a figure) as a PNG
    image; each change of a control redraws the image in place (a display id).

    The image is an ordinary output, so executed and static copies of a notebook show the first
    state, where a widget's own output shows only its text form (``interactive(children=...)``);
    the controls' text form there says what they are. Returns the image's display handle.
    """
    import ipywidgets as widgets
    from IPython.display import Image, display

    def image():
        return Image(data=figure_png(draw(**{name: w.value for name, w in controls.items()})), format="png")

    box = widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap"))
    bundle = box._repr_mimebundle_()
    bundle = bundle[0] if isinstance(bundle, tuple) else bundle
    bundle["text/plain"] = f"[controls: {', '.join(controls)}; in JupyterLab they redraw the image below] {description}".strip()
    display(bundle, raw=True)
    handle = display(image(), display_id=True)

    def redraw(_change):
        handle.update(image())
    for control in controls.values():
        control.observe(redraw, names="value")
    return handle


def map_explorer(store, labels: list[str], words: list[str], steps: int):
    """Sliders for layer, step and word over ``draw_layer_map``; the first state is an image output,
    so executed and static copies show it (``controls.live_figure``)."""
    import ipywidgets as widgets
    controls = {"layer_index": widgets.IntSlider(0, 0, len(labels) - 1, description="layer"),
                "step": widgets.IntSlider(0, 0, steps - 1, description="step"),
                "word": widgets.Dropdown(options=words, value=words[0], description="word")}
    return live_figure(lambda **values: draw_layer_map(store, labels, words, **values), controls,
                       description="cross-attention map explorer")


