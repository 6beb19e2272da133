"""A flip-book: one prompt drawn over N frames whose starting noise moves a little each frame.

The paper proposes its module for consistent video. There is no video model here, but
Text2Video-Zero (Khachatryan et al., ICCV 2023, github.com/Picsart-AI-Research/Text2Video-Zero)
makes video from an image model without training, in two moves, and this module follows both:

- **Motion dynamics** (``text_to_video_pipeline.py``: ``create_motion_field``,
  ``warp_latents_independently``; diffusers' ``TextToVideoZeroPipeline``: ``create_motion_field``,
  ``warp_single_latent``): frame k's latent is frame 0's translated by ``k·δ``, sampled with
  ``grid_sample(mode="nearest", padding_mode="reflection")``. Here ``frame_offsets`` rounds
  ``k·δ`` to whole latent pixels (what nearest sampling does) and ``translate_latent`` moves the
  latent by index arithmetic with the same reflection at the border.
- **Cross-frame attention** (``utils.py``: ``CrossFrameAttnProcessor``; diffusers:
  ``CrossFrameAttnProcessor2_0``): all frames run in one batch and every frame's self-attention
  takes the keys and values of the first frame of its classifier-free-guidance half
  (``CrossFrameAttention``). The cross-attention is unchanged.

Deviations, each on purpose:

- **The starting noise moves, not a partly denoised latent.** Text2Video-Zero denoises frame 0
  for a few steps (to ``t0``: 5 of 50 DDIM steps by default), translates that latent, adds noise
  back to ``t1`` (3 steps' worth) and denoises every frame from there. Here frame k starts from
  frame 0's initial noise translated by ``k·δ`` (its ``t0 = t1 = T`` case), so that every method
  runs one ordinary sampler from its own starting latent and isolated attention runs through the
  story code unchanged. Whether the drawing follows the noise is measured ("motion followed").
- **Shift in latent pixels.** Text2Video-Zero's ``motion_field_strength`` (12) is in pixels of a
  512² image whose latent is 64²: 1.5 latent pixels per frame. The toy's latent is 16×16 (its
  32×32 image folded 2×2 into channels), so one latent pixel is 2 image pixels, 6 % of the frame;
  ``shift`` is given in latent pixels per frame and may be fractional (0.5: one latent pixel every
  other frame).
- **Up blocks only.** Text2Video-Zero installs its processor on every attention layer; here it
  goes on the up blocks' self-attention, where isolated attention and CSA act. On the toy this
  is the same thing: its U-Net has attention in the up blocks only.

The third method, ``isolated``, is the paper's story machinery run on the frames
(``generate_story`` on a story whose scenes are the frames, each starting from its moved noise):
frame 0 introduces every character and fills the reference bank; every later frame reads it with
isolated self-attention (masks, re-weighting), isolated cross-attention (Eq. 6) and the merge λ.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .config import IsolationConfig, check_seed, check_steps
from .generation import generate_story
from .layers import (attention_epilogue, attention_prologue, find_attention_layers, installed_processors,
                     merge_heads, split_heads)
from .story import Story, StoryError, parse_story
from .toy import world
from .toy.flipbook import flipbook_metrics

__all__ = ["VIDEO_METHODS", "MIN_FRAMES", "MAX_FRAMES", "MAX_TRAVEL", "FlipbookError", "Flipbook", "frame_offsets",
           "translate_latent", "moving_latents", "first_frame", "CrossFrameAttention", "cross_frame_attention",
           "plan_flipbook", "draw_flipbook", "score_flipbook", "compare_flipbooks", "flipbook_summary",
           "paired_differences", "TABLE_METRICS", "format_rows", "mean_sem", "backbone_scale",
           "LOWER_IS_BETTER", "verdict", "flipbook_answer"]

VIDEO_METHODS = ("vanilla", "cross-frame", "isolated")
MIN_FRAMES, MAX_FRAMES = 2, 32
#: the farthest the noise may travel over a clip, per axis, as a share of the latent's side. On the
#: toy: 4 latent pixels = 8 image pixels, which takes the largest character the world draws
#: (radius 8) from the centre of the 32-pixel frame to its edge and no further.
MAX_TRAVEL = 0.25


class FlipbookError(ValueError):
    """A flip-book that cannot be drawn, with what is wrong and what is accepted."""


# --- motion: Text2Video-Zero's translation, on whole latent pixels ---------------------------
def frame_offsets(n_frames: int, shift: tuple[float, float]) -> np.ndarray:
    """(F, 2) int: frame k's offset (rows, columns) in latent pixels, ``k·shift`` rounded half up
    (nearest sampling); frame 0's is (0, 0)."""
    k = np.arange(n_frames, dtype=np.float64)[:, None]  # (F, 1)
    return np.floor(k * np.asarray(shift, np.float64)[None] + 0.5).astype(np.int64)  # (F, 2)


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Indices folded into [0, n) by mirroring at the border (-1 -> 0, n -> n - 1), as
    ``grid_sample(padding_mode="reflection", align_corners=False)`` does."""
    index = index % (2 * n)
    return torch.where(index < n, index, 2 * n - 1 - index)


def translate_latent(latent: torch.Tensor, offset) -> torch.Tensor:
    """``latent`` (..., h, w) moved by ``offset`` = (rows, columns) latent pixels (content at (i, j)
    goes to (i + rows, j + columns)); the uncovered border is the mirror image of what is next to
    it."""
    h, w = latent.shape[-2:]
    dy, dx = (int(o) for o in offset)
    rows = _reflect(torch.arange(h) - dy, h).to(latent.device)  # (h,) source row of each row
    cols = _reflect(torch.arange(w) - dx, w).to(latent.device)  # (w,)
    return latent[..., rows[:, None], cols[None, :]]


def moving_latents(latent: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
    """(C, h, w) starting noise -> (F, C, h, w), frame k moved by ``offsets[k]``."""
    return torch.stack([translate_latent(latent, o) for o in offsets])


# --- cross-frame attention: Text2Video-Zero's processor, on diffusers' pieces ----------------
def first_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(G·F, N, C), G groups of F frames ([negative frames; prompt frames] under CFG) -> the same
    shape with every frame replaced by the first frame of its group."""
    groups = x.shape[0] // frames
    return x.view(groups, frames, *x.shape[1:])[:, :1].expand(-1, frames, -1, -1).reshape(x.shape)


class CrossFrameAttention:
    """Self-attention in which every frame's queries attend to the first frame's keys and values
    (Text2Video-Zero's ``CrossFrameAttnProcessor``, unmasked). With ``enabled=False`` it is
    diffusers' ``AttnProcessor2_0``.

    Args:
        frames: frames per group; the U-Net's batch is G groups of ``frames`` images, frame 0 first.
    """

    def __init__(self, frames: int, enabled: bool = True):
        self.frames, self.enabled = frames, enabled

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        x, saved = attention_prologue(attn, hidden_states, temb)  # (G·F, N, C)
        if x.shape[0] % self.frames:
            raise ValueError(f"cross-frame attention expects groups of {self.frames} frames; the batch has "
                             f"{x.shape[0]} images")
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (G·F, N, C)
        if self.enabled:
            k, v = first_frame(k, self.frames), first_frame(v, self.frames)
        out = F.scaled_dot_product_attention(split_heads(attn, q), split_heads(attn, k), split_heads(attn, v))
        return attention_epilogue(attn, merge_heads(out), saved)


@contextmanager
def cross_frame_attention(unet, frames: int, enabled: bool = True):
    """Install ``CrossFrameAttention`` on every up-block self-attention layer while open."""
    layers = find_attention_layers(unet, kind="self", places=("up",))
    with installed_processors(unet, {l.name: CrossFrameAttention(frames, enabled) for l in layers}):
        yield


# --- the flip-book ----------------------------------------------------------------------------
@dataclass
class Flipbook:
    method: str
    prompt: str
    characters: list[str]  # the words that name them in the prompt
    id_prompts: dict[str, str]
    frames: np.ndarray  # (F, H, W, 3) float in [0, 1]
    offsets: np.ndarray  # (F, 2) int, each frame's noise offset (rows, columns) in latent pixels
    scale: int  # image pixels per latent pixel
    seed: int
    seconds: float  # wall clock of all frames
    messages: list[str] = field(default_factory=list)  # isolated attention's fallbacks

    @property
    def pixel_offsets(self) -> np.ndarray:
        """(F, 2) each frame's offset in image pixels."""
        return self.offsets * self.scale

    @property
    def seconds_per_frame(self) -> float:
        return self.seconds / len(self.frames)


@dataclass
class _Plan:
    story: Story
    offsets: np.ndarray
    steps: int


def _id_prompts(backbone, prompt: str, characters: list[str] | None, id_prompts: dict | None):
    """The character words and their ID prompts: given, or read from a toy prompt's grammar
    ("a red circle and a square in the snow" -> circle: "a red circle", square: "a square")."""
    if id_prompts is not None:
        return list(characters or id_prompts), dict(id_prompts)
    if not backbone.has_ground_truth:
        raise FlipbookError(f"backbone {backbone.name!r} has no toy grammar to read ID prompts from; pass "
                            f"id_prompts={{word: 'a description of the character'}}")
    parsed = world.parse_caption(prompt)["characters"]
    described = {c["shape"]: " ".join(["a", c["colour"], c["shape"]] if c["colour"] else ["a", c["shape"]])
                 for c in parsed}
    words = list(characters) if characters is not None else list(described)
    return words, {w: described.get(w, f"a {w}") for w in words}


def plan_flipbook(backbone, prompt: str, method: str = "isolated", n_frames: int = 8,
                  shift: tuple[float, float] = (0.0, 0.5), seed: int = 0, characters: list[str] | None = None,
                  id_prompts: dict[str, str] | None = None, num_inference_steps: int | None = None) -> _Plan:
    """Check everything ``draw_flipbook`` needs, before any U-Net call; ``FlipbookError`` names
    the problem and the fix."""
    if method not in VIDEO_METHODS:
        raise FlipbookError(f"unknown method {method!r}; choose one of {list(VIDEO_METHODS)}")
    if not isinstance(n_frames, int) or isinstance(n_frames, bool) or not MIN_FRAMES <= n_frames <= MAX_FRAMES:
        raise FlipbookError(f"n_frames={n_frames!r}: a flip-book needs a whole number of frames from {MIN_FRAMES} "
                            f"(one move) to {MAX_FRAMES}; 8-16 show the motion")
    try:
        dy, dx = (float(s) for s in shift)
    except (TypeError, ValueError):
        raise FlipbookError(f"shift={shift!r} must be two numbers (rows, columns), in latent pixels per frame") from None
    if not (math.isfinite(dy) and math.isfinite(dx)):
        raise FlipbookError(f"shift={shift!r} must be finite")
    h, w = backbone.latent_shape[1:]
    offsets = frame_offsets(n_frames, (dy, dx))
    travel = np.abs(offsets).max(0)  # (2,) the last frame's, in latent pixels
    limit = (int(MAX_TRAVEL * h), int(MAX_TRAVEL * w))
    if travel[0] > limit[0] or travel[1] > limit[1]:
        scale = backbone_scale(backbone)
        raise FlipbookError(
            f"shift={tuple(shift)!r} over {n_frames} frames moves the noise by {tuple(int(t) for t in travel)} latent "
            f"pixels ({tuple(int(t) * scale for t in travel)} image pixels), which pushes the picture out of the frame; "
            f"at most {limit} latent pixels (rows, columns) are accepted. Use a shift of at most "
            f"{limit[0] / (n_frames - 1):.3g} rows and {limit[1] / (n_frames - 1):.3g} columns per frame, or fewer frames.")
    try:
        check_seed(seed)
        steps = check_steps(num_inference_steps, backbone.default_steps)
        backbone.validate_prompt(prompt)
    except ValueError as error:
        raise FlipbookError(str(error)) from None
    words, ids = _id_prompts(backbone, prompt, characters, id_prompts)
    if not words:
        raise FlipbookError(f"prompt {prompt!r} names no character; a flip-book needs one or more")
    for word in words:
        try:
            backbone.token_positions(prompt, word)
        except ValueError:
            raise FlipbookError(f"character word {word!r} is missing from the prompt {prompt!r}; name each character "
                                f"in the prompt (its words: {backbone.tokenizer_text(prompt).split()})") from None
    scene = {"prompt": prompt, "characters": words, "seed": seed}
    try:
        story = parse_story({"title": prompt, "characters": [{"name": w, "word": w, "id_prompt": ids[w]} for w in words],
                             "scenes": [scene] * n_frames}, source="<flip-book>")
    except StoryError as error:
        raise FlipbookError(str(error)) from None
    return _Plan(story, offsets, steps)


def backbone_scale(backbone) -> int:
    """Image pixels per latent pixel: the toy folds 2×2 pixels into channels, SDXL's VAE 8×8."""
    return world.IMAGE_SIZE // backbone.latent_shape[1] if backbone.has_ground_truth else 8


def draw_flipbook(backbone, prompt: str, method: str = "isolated", n_frames: int = 8,
                  shift: tuple[float, float] = (0.0, 0.5), seed: int = 0, characters: list[str] | None = None,
                  id_prompts: dict[str, str] | None = None, config: IsolationConfig | None = None,
                  num_inference_steps: int | None = None, guidance_scale: float | None = None,
                  progress: bool = False) -> Flipbook:
    """Draw ``prompt`` as ``n_frames`` frames whose starting noise moves by ``shift`` per frame.

    Args:
        method: "vanilla" (each frame on its own), "cross-frame" (Text2Video-Zero: every frame's
            up-block self-attention attends to the first frame's keys and values) or "isolated"
            (frame 0 is each character's reference; later frames run the story machinery).
        shift: (rows, columns) latent pixels per frame; frame k's noise moves by ``k·shift``,
            rounded to whole pixels. The whole clip may travel at most ``MAX_TRAVEL`` of the side.
        seed: the seed of frame 0's noise (every frame's, moved).
        characters: the words naming the characters (default: every shape a toy prompt names).
        id_prompts: word -> ID prompt (default on the toy: the prompt's own phrase, "a red circle").
        config: isolated attention's switches (default: the backbone's).

    Raises:
        FlipbookError: before any U-Net call, for an unknown method, too few or too many frames, a
            shift that leaves the frame, a character word missing from the prompt, a bad prompt,
            seed or step count.
    """
    plan = plan_flipbook(backbone, prompt, method, n_frames, shift, seed, characters, id_prompts, num_inference_steps)
    noise = moving_latents(backbone.initial_latents([seed])[0], plan.offsets)  # (F, C, h, w)
    started = time.perf_counter()
    if method == "cross-frame":
        with cross_frame_attention(backbone.unet, n_frames):
            latents = backbone.denoise(backbone.encode([prompt] * n_frames), noise, plan.steps, guidance_scale,
                                       progress=progress)
        frames, messages = backbone.decode(latents), []
    else:
        result = generate_story(backbone, plan.story, method, config=config, num_inference_steps=plan.steps,
                                guidance_scale=guidance_scale, progress=progress, initial_latents=noise)
        frames = np.stack(result.images)
        messages = [f"frame {s.index}: {m}" for s in result.scenes for m in s.messages]
    seconds = time.perf_counter() - started
    words = list(plan.story.characters)
    return Flipbook(method, prompt, words, {w: c.id_prompt for w, c in plan.story.characters.items()}, frames,
                    plan.offsets, backbone_scale(backbone), seed, seconds, messages)


# --- measuring it -----------------------------------------------------------------------------
def score_flipbook(book: Flipbook) -> dict:
    """The toy measures of one flip-book (``osa_lib.toy.flipbook.flipbook_metrics``) and its time per frame."""
    colours = {w: world.parse_caption(p, id_prompt=True)["characters"][0]["colour"] for w, p in book.id_prompts.items()}
    metrics = flipbook_metrics(book.frames, book.characters, [colours[w] for w in book.characters], book.pixel_offsets)
    metrics["seconds per frame"] = book.seconds_per_frame
    return metrics


def compare_flipbooks(backbone, prompts: list[str], n_seeds: int, methods=VIDEO_METHODS, n_frames: int = 8,
                      shift: tuple[float, float] = (0.0, 0.5), seed_stride: int = 1000, keep: int = 0,
                      progress: bool = True, **kwargs) -> tuple[list[dict], dict]:
    """Every method on every prompt with the same seeds (``k * seed_stride``), scored.

    Every flip-book is checked before the first one is drawn.

    Returns:
        rows: one per (prompt, seed, method): its measures (``score_flipbook``);
        books: ``(prompt, seed index, method) -> Flipbook`` for the first ``keep`` seeds.
    """
    from tqdm import tqdm
    jobs = [(p, k, m) for p in prompts for k in range(n_seeds) for m in methods]
    for p, k, m in jobs:
        plan_flipbook(backbone, p, m, n_frames, shift, k * seed_stride, num_inference_steps=kwargs.get("num_inference_steps"))
    rows, books = [], {}
    for p, k, m in tqdm(jobs, desc="flip-books", disable=not progress):
        book = draw_flipbook(backbone, p, m, n_frames, shift, k * seed_stride, **kwargs)
        rows.append({"prompt": p, "seed": k * seed_stride, "method": m, **score_flipbook(book),
                     "fallbacks": len(book.messages)})
        if k < keep:
            books[(p, k, m)] = book
    return rows, books


def mean_sem(values) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan"), 0
    sem = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(np.mean(values)), sem, len(values)


def flipbook_summary(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Mean ± standard error over seeds, one row per (prompt, method): ``{metric: (mean, sem, n)}``."""
    keys = list(dict.fromkeys((r["prompt"], r["method"]) for r in rows))
    return [{"prompt": p, "method": m, **{name: mean_sem([r[name] for r in rows if (r["prompt"], r["method"]) == (p, m)])
                                          for name in metrics}} for p, m in keys]


def paired_differences(rows: list[dict], metrics: list[str], pairs=(("isolated", "cross-frame"),
                                                                    ("isolated", "vanilla"),
                                                                    ("cross-frame", "vanilla"))) -> list[dict]:
    """Per prompt and pair of methods (a, b): a − b on the same seeds, mean ± standard error over the
    seeds where both are measured: ``{metric: (mean, sem, n)}``."""
    by = {(r["prompt"], r["seed"], r["method"]): r for r in rows}
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    out = []
    for p in prompts:
        for a, b in pairs:
            if not any((p, s, a) in by and (p, s, b) in by for s in seeds):
                continue
            row = {"prompt": p, "pair": f"{a} − {b}"}
            for name in metrics:
                row[name] = mean_sem([by[p, s, a][name] - by[p, s, b][name] for s in seeds
                                       if (p, s, a) in by and (p, s, b) in by])
            out.append(row)
    return out


#: the measures a flip-book table shows, in order (``score_flipbook``'s keys)
TABLE_METRICS = ("drawn", "colour kept", "identity constancy", "hue", "size", "mark", "mixed", "motion error",
                 "motion followed", "flicker", "seconds per frame")


def format_rows(rows: list[dict], metrics=TABLE_METRICS, digits: int = 1) -> list[dict]:
    """Rows of ``flipbook_summary``/``paired_differences`` with each ``(mean, sem, n)`` as text
    "mean ± sem" (for ``markdown_table``); seconds with three digits."""
    def cell(name, value):
        mean, sem, n = value
        if n == 0:
            return "–"
        d = 3 if name == "seconds per frame" else digits
        return f"{mean:.{d}f}" + ("" if math.isnan(sem) else f" ± {sem:.{d}f}")
    return [{k: (cell(k, v) if k in metrics else v) for k, v in r.items() if k in metrics or not isinstance(v, tuple)}
            for r in rows]


#: measures where less is better; for the others more is
LOWER_IS_BETTER = ("mixed", "motion error", "flicker", "seconds per frame")


def verdict(name: str, difference: tuple[float, float, int]) -> str:
    """A paired difference (a − b: mean, sem, n) in words: "better", "worse" (beyond two standard
    errors, in the measure's direction) or "no clear difference"."""
    mean, sem, n = difference
    if n < 2 or math.isnan(sem) or abs(mean) <= 2 * sem:
        return "no clear difference"
    return "better" if (mean < 0) == (name in LOWER_IS_BETTER) else "worse"


def flipbook_answer(summary: list[dict], differences: list[dict], named: str, uncoloured: str) -> list[str]:
    """The open question's answer as measured: sentences formatted from ``flipbook_summary`` and
    ``paired_differences`` rows of a prompt whose characters' colours are named and one whose are not."""
    mean = {(r["prompt"], r["method"]): r for r in summary}
    diff = {(r["prompt"], r["pair"]): r for r in differences}

    def three(prompt, name, digits=0):
        return ", ".join(f"{label} {mean[prompt, m][name][0]:.{digits}f}" for m, label in
                         (("isolated", "isolated"), ("cross-frame", "cross-frame"), ("vanilla", "vanilla (independent frames)")))

    def paired(prompt, name, pair="isolated − cross-frame"):
        d = diff[prompt, pair][name]
        return f"{pair} {d[0]:+.1f} ± {d[1]:.1f} over {d[2]} seeds: {verdict(name, d)}"

    seeds = diff[named, "isolated − cross-frame"]["mixed"][2]
    sentences = [
        f"Named colours, mixing (% of later frames with a character in the other's colour): {three(named, 'mixed')} "
        f"({paired(named, 'mixed')}).",
        f"Uncoloured characters, colour kept (% of later frames in frame 0's colour family, among the characters "
        f"drawn): {three(uncoloured, 'colour kept')} ({paired(uncoloured, 'colour kept')}); drawn at all (%): "
        f"{three(uncoloured, 'drawn')}.",
        f"Uncoloured characters, mixing: {three(uncoloured, 'mixed')} ({paired(uncoloured, 'mixed')}).",
        f"Identity constancy against frame 0 (%), named colours: {three(named, 'identity constancy')} "
        f"({paired(named, 'identity constancy')}); uncoloured: {three(uncoloured, 'identity constancy')} "
        f"({paired(uncoloured, 'identity constancy')}).",
    ]
    not_better = [f"{name} ({paired(p, name)}, {label})" for p, label in ((named, "named"), (uncoloured, "uncoloured"))
                  for name in ("mixed", "colour kept", "identity constancy", "motion followed", "flicker")
                  if seeds and verdict(name, diff[p, "isolated − cross-frame"][name]) != "better"]
    sentences.append("Where isolated attention does not beat cross-frame attention: "
                     + ("; ".join(not_better) if not_better else "nowhere among these measures") + ".")
    sentences.append(
        f"Motion followed (% of later frames within one latent pixel of the moved noise), named colours: "
        f"{three(named, 'motion followed')}; flicker inside the characters (% of full scale): {three(named, 'flicker', 1)}.")
    iso, cross = mean[named, "isolated"]["seconds per frame"][0], mean[named, "cross-frame"]["seconds per frame"][0]
    sentences.append(f"Time per frame: isolated {iso:.2f} s, cross-frame {cross:.2f} s ({iso / cross:.2f}×; cross-frame "
                     f"draws all frames in one batch, isolated one frame at a time).")
    return sentences
