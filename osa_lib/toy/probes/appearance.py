"""Does appearance travel through the up blocks' self-attention? A probe, in about a minute.

    python -m osa_lib.toy.probes.appearance                   # the shipped model
    python -m osa_lib.toy.probes.appearance --model DIR --samples 64
    python -m osa_lib.toy.probes.appearance --model DIR --quick --references drawn-uncoloured

The method's isolated self-attention carries a character's look from its first scene into later
ones only if the U-Net copies appearance from the keys/values it is shown. This probe asks that
directly, without masks or a bank: each sample draws an *uncoloured* prompt ("a circle in the
snow") while the up-block self-attention of its prompt half also sees the tokens of a reference
image, a rendered character of the same shape in a known colour, noised to the same timestep
(teacher-forced, like ``osa_lib.toy.probes.binding``) and run in the same U-Net batch. Only the tokens
inside the reference character's true mask are visible, as in the bank.

Per setting (which up-block layers see the reference, during which share of the steps) it reports
how often the drawn character takes the reference's colour family, its mark (kind and tone), and
its size (within 1 px). "none" shows no reference: the model's own rate of drawing that colour,
i.e. chance. Every setting uses the same noise and references, so rows are paired.

``--references drawn`` / ``drawn-uncoloured`` shows the model's own drawings of the references
(``drawn_references``) instead of rendered scenes: what a story's bank holds. An uncoloured story's
first scene is drawn from a prompt without a colour, and on the fine-tunes of the up-block
self-attention such references were copied far less than rendered or colour-named ones
(``results/history/toy_attn_only_finetune.md``, fifth run). ``--reference-captions colour-named`` /
``uncoloured`` shows the same references with their caption rewritten, the colour word of what they
show put in or left out, to tell the image's part from the caption's.

``--view neutral`` shows *every* token of the reference, background included, to every token of
the target, with no mask and no bias: the extended attention that ConsiStory, StoryDiffusion's
Consistent Self-Attention and reference-only pipelines use, owned by no method. A backbone that
copies only in one method's view (``--view character``, the mask above) makes a comparison
between methods partly a property of its weights. ``--pairs`` adds the two-character question in
the neutral view: with a two-character reference, does each character of an uncoloured
two-character prompt take its own colour, the other's (swapped) or neither?

``reference_benefit`` (``--benefit``) asks why: on training-style reference pairs
(``world.sample_pair``), the denoising loss of the targets with and without their reference
visible, per timestep. A model that copies through self-attention has a lower loss with it.
``reference_share`` (``--share``) asks one step further: how much of their attention the shared
character's queries give the reference's tokens at all, per layer and timestep.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from contextlib import nullcontext

import numpy as np
import torch

from .. import world
from ...records import command_line, write_results
from ..analyzer import analyze_image, largest_detection
from ..drawn_pool import drawn_references
from ..model import DEFAULT_GUIDANCE, DEFAULT_STEPS, LATENT_CHANNELS, LATENT_SIZE, ToyPipeline, images_to_latents, latents_to_images
from ..reference import reference_attention

__all__ = ["PROBE_SETTINGS", "PROBE_VIEWS", "pair_references", "pair_scores", "REFERENCE_KINDS", "REFERENCE_CAPTIONS", "recaption", "probe_references", "drawn_references", "sample_with_reference",
           "appearance_scores", "format_table", "format_pair_table", "reference_benefit", "reference_share", "main"]

# (name, up-block resolutions that see the reference (None: all, (): none), share of steps (from, to))
PROBE_SETTINGS = (
    ("none", (), (0.0, 1.0)),
    ("up, all steps", None, (0.0, 1.0)),
    ("up 8x8 only", (8,), (0.0, 1.0)),
    ("up 16x16 only", (16,), (0.0, 1.0)),
    ("up, first 20 % of steps", None, (0.0, 0.2)),
    ("up, after a 20 % warm-up", None, (0.2, 1.0)),
    ("up, last half", None, (0.5, 1.0)),
)


#: which reference tokens a target sees: the reference character's true mask (as a bank stores a
#: character), or every token of the reference image, no mask, no bias (no method's own view)
PROBE_VIEWS = ("character", "neutral")


def probe_references(n: int, seed: int = 0) -> tuple[list[world.Scene], list[str]]:
    """``n`` rendered one-character references (colour named) and, per reference, an uncoloured
    target prompt of the same shape in another scene."""
    rng = np.random.default_rng(seed)
    references, prompts = [], []
    for _ in range(n):
        reference = world.sample_scene(rng, n_characters=1, p_drop_colour=0.0)
        shape = reference.characters[0].shape
        scene = str(rng.choice([s for s in world.SCENES if s != reference.scene]))
        references.append(reference)
        prompts.append(f"a {shape} in the {scene}")
    return references, prompts


#: what the probe shows as references: rendered scenes (as training does), or the model's own
#: drawings of them from their captions, with the colour named or, as a story's uncoloured first
#: scene gives it, without
REFERENCE_KINDS = ("rendered", "drawn", "drawn-uncoloured")
#: the caption a reference's tokens are computed with: the one it was made from, or rewritten with
#: the colour family it shows named, or with no colour word
REFERENCE_CAPTIONS = ("kept", "colour-named", "uncoloured")


def recaption(reference: world.Scene, captions: str) -> world.Scene:
    """``reference`` with its caption as ``captions`` (``REFERENCE_CAPTIONS``) asks."""
    if captions not in REFERENCE_CAPTIONS:
        raise ValueError(f"captions must be one of {REFERENCE_CAPTIONS}, got {captions!r}")
    if captions == "kept":
        return reference
    caption = world.make_caption(reference.scene, reference.characters, [captions == "colour-named"])
    return dataclasses.replace(reference, caption=caption)


@torch.no_grad()
def sample_with_reference(pipe: ToyPipeline, prompts: list[str], references: list[world.Scene], seed: int = 0,
                          resolutions: tuple[int, ...] | None = None, step_range: tuple[float, float] = (0.0, 1.0),
                          steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                          view: str = "character") -> np.ndarray:
    """Images (B, 32, 32, 3) in [0, 1]: ``prompts`` sampled with classifier-free guidance while the
    prompt half's up-block self-attention (at ``resolutions``; () for none) also sees each
    reference's tokens during the steps in ``step_range`` (shares of the run): its first
    character's tokens (``view="character"``) or all of them (``"neutral"``).

    No re-weighting here: without masks every query, background included, would get the boost,
    and on a model trained with ``--pair-reweight 16`` that left nothing drawn (0 of 48)."""
    if view not in PROBE_VIEWS:
        raise ValueError(f"view must be one of {PROBE_VIEWS}, got {view!r}")
    b, device = len(prompts), pipe.unet.device
    x = torch.randn((b, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), generator=torch.Generator().manual_seed(seed))
    ref_x0 = images_to_latents(torch.from_numpy(np.stack([r.image for r in references])).permute(0, 3, 1, 2).float() / 127.5 - 1)
    ref_noise = torch.randn(ref_x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    if view == "neutral":
        ref_masks = torch.ones(b, LATENT_SIZE, LATENT_SIZE)  # every reference token, background included
    else:
        ref_masks = torch.nn.functional.avg_pool2d(torch.from_numpy(np.stack([r.masks[0] for r in references])).float()[:, None], 2)[:, 0]
    context = torch.cat([pipe.encode_prompt([""] * b), pipe.encode_prompt(prompts),
                         pipe.encode_prompt([r.caption for r in references])])  # (3B, T, D)
    partner = torch.full((3 * b,), -1, dtype=torch.long)
    partner[b:2 * b] = torch.arange(2 * b, 3 * b)  # prompt half sees the references' rows
    ref_mask = torch.zeros(3 * b, LATENT_SIZE, LATENT_SIZE)
    ref_mask[b:2 * b] = ref_masks
    x, ref_x0, ref_noise, partner, ref_mask = (t.to(device) for t in (x, ref_x0, ref_noise, partner, ref_mask))
    pipe.scheduler.set_timesteps(steps)
    with reference_attention(pipe.unet, (LATENT_SIZE, LATENT_SIZE), resolutions) if resolutions != () else nullcontext() as state:
        for i, t in enumerate(pipe.scheduler.timesteps):
            if state is not None:
                state.partner, state.ref_mask = partner, ref_mask
                state.active = step_range[0] <= i / steps < step_range[1]
            ref_t = pipe.scheduler.add_noise(ref_x0, ref_noise, t.reshape(1))
            out = pipe.unet(torch.cat([x, x, ref_t]), t, context).sample
            out_u, out_c = out[:b], out[b:2 * b]
            x = pipe.scheduler.step(out_u + guidance * (out_c - out_u), t, x).prev_sample
    return latents_to_images(x).permute(0, 2, 3, 1).cpu().numpy()


def _read(image: np.ndarray, reference: world.Character) -> dict:
    """What a sample took from its reference: colour family, mark, size (None if not drawn)."""
    d = largest_detection(analyze_image(image), reference.shape)
    if d is None:
        return {"drawn": False}
    return {"drawn": True, "colour": d.colour == reference.colour, "drawn colour": d.colour,
            "mark": d.mark == reference.mark and (d.mark == "none" or d.mark_tone == reference.mark_tone),
            "size": abs(d.size - reference.size) <= 1.0}


def _colour_chance(drawn_colours: list, reference_colours: list[str]) -> float:
    """How often a drawing would take its reference's colour family if the two were independent,
    for these samples: the product of the drawn samples' colour frequencies and their references'
    (a model that draws yellow half the time, shown references that are yellow a third of the time,
    matches about 1 in 3 by chance, not 1 in 5). NaN when nothing was drawn."""
    pairs = [(d, r) for d, r in zip(drawn_colours, reference_colours) if d is not None]
    if not pairs:
        return float("nan")
    families = {d for d, _ in pairs} | {r for _, r in pairs}
    return float(sum(np.mean([d == f for d, _ in pairs]) * np.mean([r == f for _, r in pairs]) for f in families))


def appearance_scores(pipe: ToyPipeline, n_samples: int = 48, seed: int = 0, settings=PROBE_SETTINGS,
                      steps: int = DEFAULT_STEPS, references: str = "rendered", captions: str = "kept",
                      view: str = "character") -> list[dict]:
    """One row per setting: share of drawn samples that took the reference's colour family, mark
    and size, the share drawn at all, the count, and ``colour chance`` (``_colour_chance``: the
    colour share these samples would reach if drawing ignored the reference). ``references``
    (``REFERENCE_KINDS``): drawn ones keep only the samples whose reference was drawn, so ``n`` may
    be below ``n_samples``.
    ``captions`` (``REFERENCE_CAPTIONS``): the caption each reference's tokens are computed with."""
    if references not in REFERENCE_KINDS:
        raise ValueError(f"references must be one of {REFERENCE_KINDS}, got {references!r}")
    scenes, prompts = probe_references(n_samples, seed)
    if references != "rendered":
        drawn = drawn_references(pipe, scenes, seed, colour_named=references == "drawn", steps=steps)
        scenes, prompts = [d for d in drawn if d is not None], [p for d, p in zip(drawn, prompts) if d is not None]
    scenes = [recaption(scene, captions) for scene in scenes]
    if not scenes:
        nan = float("nan")
        return [{"setting": name, "colour": nan, "mark": nan, "size": nan, "drawn": nan, "n": 0, "colour chance": nan}
                for name, *_ in settings]
    rows = []
    for name, resolutions, step_range in settings:
        images = sample_with_reference(pipe, prompts, scenes, seed, resolutions, step_range, steps, view=view)
        reads = [_read(img, r.characters[0]) for img, r in zip(images, scenes)]
        drawn = [r for r in reads if r["drawn"]]
        share = {k: float(np.mean([r[k] for r in drawn])) if drawn else float("nan") for k in ("colour", "mark", "size")}
        rows.append({"setting": name, **share, "drawn": len(drawn) / len(reads), "n": len(reads),
                     "colour chance": _colour_chance([r.get("drawn colour") for r in reads],
                                                     [s.characters[0].colour for s in scenes])})
    return rows


def pair_references(n: int, seed: int = 0) -> tuple[list[world.Scene], list[str]]:
    """``n`` rendered two-character references (distinct shapes and colours, both named, apart)
    and, per reference, an uncoloured prompt naming both shapes, in random order, in another scene."""
    rng = np.random.default_rng(seed)
    references, prompts = [], []
    for _ in range(n):
        reference = world.sample_scene(rng, n_characters=2, relation="apart", p_drop_colour=0.0)
        shapes = [c.shape for c in reference.characters]
        if rng.random() < 0.5:
            shapes.reverse()
        scene = str(rng.choice([s for s in world.SCENES if s != reference.scene]))
        references.append(reference)
        prompts.append(f"a {shapes[0]} and a {shapes[1]} in the {scene}")
    return references, prompts


def _pair_read(image: np.ndarray, reference: world.Scene) -> list[str]:
    """Per reference character drawn in ``image`` (found by its shape): "own" when it has its
    reference colour family, "swapped" when it has the other character's, else "neither"."""
    detections = analyze_image(image)
    reads = []
    for k, character in enumerate(reference.characters):
        d = largest_detection(detections, character.shape)
        if d is not None:
            other = reference.characters[1 - k].colour
            reads.append("own" if d.colour == character.colour else "swapped" if d.colour == other else "neither")
    return reads


def pair_scores(pipe: ToyPipeline, n_samples: int = 48, seed: int = 0, steps: int = DEFAULT_STEPS) -> list[dict]:
    """The two-character question in the neutral view: rows "none" (no reference) and "up, all
    steps, neutral" (every reference token visible): shares of the drawn characters that took
    their own reference colour family, the other character's (swapped) or neither; "drawn" the
    share of characters drawn at all; n the characters asked for."""
    scenes, prompts = pair_references(n_samples, seed)
    rows = []
    for name, resolutions in (("none", ()), ("up, all steps, neutral", None)):
        images = sample_with_reference(pipe, prompts, scenes, seed, resolutions, steps=steps, view="neutral")
        reads = [r for img, scene in zip(images, scenes) for r in _pair_read(img, scene)]
        share = {k: reads.count(k) / len(reads) if reads else float("nan") for k in ("own", "swapped", "neither")}
        rows.append({"setting": name, **share, "drawn": len(reads) / (2 * len(scenes)), "n": 2 * len(scenes)})
    return rows


def format_pair_table(rows: list[dict]) -> str:
    lines = ["| reference seen by | own colour | swapped | neither | drawn | n characters |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['own']:.0%} | {r['swapped']:.0%} | {r['neither']:.0%} | {r['drawn']:.0%} | {r['n']} |"
              for r in rows]
    return "\n".join(lines)


def _pair_batch(pipe: ToyPipeline, n_pairs: int, seed: int):
    """One training-style batch of ``n_pairs`` reference pairs (references first, then targets),
    every caption kept and only the shared character visible and looking: latents (2P, 12, 16, 16)
    and text embeddings on the U-Net's device; partner (2P,), ref_mask, query_mask and query_weight
    (2P, 16, 16) on the CPU."""
    from ..train import SceneStream
    images, captions, partner, ref_mask, query_mask, query_weight = next(iter(SceneStream(
        2 * n_pairs, seed, p_empty_caption=0.0, pair_rate=1.0, whole_share=0.0)))
    device = pipe.unet.device
    text = pipe.embed_ids(pipe.tokenize(captions, validate=False).to(device))
    return images_to_latents(images).to(device), text, partner, ref_mask, query_mask, query_weight


@torch.no_grad()
def reference_benefit(pipe: ToyPipeline, n_pairs: int = 64, timesteps=(300, 600, 900), seed: int = 0) -> list[dict]:
    """Per timestep, the mean v-prediction loss of pair targets without and with their reference's
    shared-character tokens visible to every target query (teacher-forced, as in training)."""
    x0, text, partner, ref_mask, _, _ = _pair_batch(pipe, n_pairs, seed)
    device = pipe.unet.device
    targets = slice(n_pairs, 2 * n_pairs)
    rows = []
    with reference_attention(pipe.unet, (LATENT_SIZE, LATENT_SIZE)) as state:
        state.ref_mask = ref_mask.to(device)
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + t)).to(device)
            tt = torch.full((len(x0),), t, device=device)
            noisy, target = pipe.scheduler.add_noise(x0, noise, tt), pipe.scheduler.get_velocity(x0, noise, tt)
            loss = {}
            for label, rows_partner in (("without", torch.full_like(partner, -1)), ("with", partner)):
                state.partner = rows_partner.to(device)
                error = (pipe.unet(noisy, tt, text).sample - target) ** 2  # (B, 12, 16, 16)
                loss[label] = error[targets].mean().item()
            rows.append({"t": t, "loss without reference": loss["without"], "loss with reference": loss["with"]})
    return rows


@torch.no_grad()
def reference_share(pipe: ToyPipeline, n_pairs: int = 32, timesteps=(300, 600, 900), seed: int = 0,
                    reweight: float = 0.0) -> list[dict]:
    """Per timestep and up-block self-attention layer: the share of attention that the queries on
    a pair target's shared character (``SceneStream``'s query mask) give the reference's tokens
    (teacher-forced, as in ``reference_benefit``). Copying needs much of it; a model that keeps
    attending to its own tokens cannot take the reference's look, whatever the reference holds.
    With ``reweight`` w the reference's columns get ``log(1 + w·Â)``, ``Â`` the character's coverage."""
    x0, text, partner, ref_mask, query_mask, query_weight = _pair_batch(pipe, n_pairs, seed)
    device = pipe.unet.device
    rows = []
    with reference_attention(pipe.unet, (LATENT_SIZE, LATENT_SIZE)) as state:
        state.partner, state.ref_mask, state.query_mask = partner.to(device), ref_mask.to(device), query_mask.to(device)
        state.reweight, state.query_weight = reweight, query_weight.to(device)
        for t in timesteps:
            state.shares = {}
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + t)).to(device)
            tt = torch.full((len(x0),), t, device=device)
            pipe.unet(pipe.scheduler.add_noise(x0, noise, tt), tt, text)
            rows += [{"t": t, "layer": name, "share": values[0]} for name, values in state.shares.items()]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| reference seen by | colour family taken | mark taken | size within 1 px | drawn | n |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['colour']:.0%} | {r['mark']:.0%} | {r['size']:.0%} | {r['drawn']:.0%} | {r['n']} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="toy pipeline folder (default: the shipped backbone, data/toy_model with data/toy_finetune)")
    parser.add_argument("--variant", default=None,
                        help="instead of --model: a named toy backbone (isolation-tuned, base, neutral)")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="only the 'none' and 'up, all steps' rows")
    parser.add_argument("--references", choices=REFERENCE_KINDS, default="rendered",
                        help="rendered scenes (as training shows them), or the model's drawings of them from their "
                             "captions: 'drawn-uncoloured' is what an uncoloured story's bank holds")
    parser.add_argument("--reference-captions", choices=REFERENCE_CAPTIONS, default="kept",
                        help="the caption a reference's tokens are computed with: its own, or rewritten with the "
                             "colour it shows named, or without a colour word")
    parser.add_argument("--view", choices=PROBE_VIEWS, default="character",
                        help="the reference character's tokens only (character), or every token of the reference, "
                             "no mask, no bias (neutral: no method's own view)")
    parser.add_argument("--pairs", action="store_true",
                        help="also two-character references in the neutral view: own colour, swapped or neither")
    parser.add_argument("--benefit", action="store_true", help="also the loss with and without the reference")
    parser.add_argument("--share", action="store_true",
                        help="also the share of attention the shared character's queries give the reference")
    parser.add_argument("--reweight", type=float, default=0.0,
                        help="with --share: w of the method's re-weighting log(1 + w·Â) on the reference's tokens, "
                             "Â the shared character's coverage (0: none), for a model trained with --pair-reweight")
    parser.add_argument("--md", default=None, help="also write the tables here, with the command, commit and machine")
    args = parser.parse_args(argv)
    from ...backbones import load_backbone
    pipe = load_backbone("toy", model_id=args.model, device=args.device, variant=args.variant).pipe  # progress bars off
    started = time.time()
    settings = PROBE_SETTINGS[:2] if args.quick else PROBE_SETTINGS
    lines = [f"References: {args.references}, captions {args.reference_captions}, view {args.view}.\n",
             format_table(appearance_scores(pipe, args.samples, args.seed, settings, references=args.references,
                                            captions=args.reference_captions, view=args.view))]
    if args.pairs:
        lines += ["\nTwo-character references, uncoloured two-character prompts, neutral view:\n",
                  format_pair_table(pair_scores(pipe, args.samples, args.seed))]
    if args.benefit:
        lines.append("\n| t | loss without reference | loss with reference |\n|---|---|---|")
        lines += [f"| {r['t']} | {r['loss without reference']:.4f} | {r['loss with reference']:.4f} |"
                  for r in reference_benefit(pipe, seed=args.seed)]
    if args.share:
        shares = reference_share(pipe, seed=args.seed, reweight=args.reweight)
        layers = list(dict.fromkeys(r["layer"] for r in shares))
        lines.append("\n| t | " + " | ".join(f"share on reference, {l}" for l in layers) + " |\n|---|" + "---|" * len(layers))
        for t in dict.fromkeys(r["t"] for r in shares):
            lines.append(f"| {t} | " + " | ".join(f"{r['share']:.0%}" for l in layers for r in shares
                                                   if r["t"] == t and r["layer"] == l) + " |")
    lines.append(f"\n({args.samples} samples per setting, {time.time() - started:.0f} s)")
    print("\n".join(lines))
    if args.md:
        command = command_line("python -m osa_lib.toy.probes.appearance", argv)
        write_results(args.md, "Does appearance travel through self-attention? (toy probe)", "\n".join(lines), command)


if __name__ == "__main__":
    main()
