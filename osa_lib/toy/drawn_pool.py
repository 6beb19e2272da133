"""The model's own drawings of uncoloured characters, as references for training pairs.

    python -m osa_lib.toy.drawn_pool --model DIR --n 4000 --out runs/drawn_pool.npz
    python -m osa_lib.toy.train ... --drawn-pool runs/drawn_pool.npz --drawn-share 0.5

An uncoloured story's bank holds the first scene as the model drew it from a prompt without a
colour ("a circle in the snow"), and fine-tunes of the up-block self-attention copied such references far less than the
rendered ones they were trained on (probe, ``--references drawn-uncoloured``: 49-52 % against
70-79 %; ``results/history/toy_attn_only_finetune.md``). This pool puts that case into training: each
entry is a drawing of a one-character uncoloured caption, its character read back by the analyzer
(``drawn_references``). ``world.sample_pair(reference=...)`` then renders a target
with the character as read (shape, colour family, exact hue, brightness, size, mark), so a pair
asks the model to copy what it drew.

The file is an ``.npz`` (images, masks, captions, scene words and the characters as JSON), written
atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import world
from .analyzer import analyze_image, largest_detection
from .model import DEFAULT_MODEL_DIR, DEFAULT_STEPS, ToyPipeline

__all__ = ["drawn_references", "draw_pool", "save_pool", "load_pool", "main"]

POOL_KEYS = ("images", "masks", "captions", "scenes", "characters")


def drawn_references(pipe: ToyPipeline, references: list[world.Scene], seed: int = 0, colour_named: bool = True,
                     steps: int = DEFAULT_STEPS) -> list[world.Scene | None]:
    """The model's own drawings of ``references``' characters, as a story's bank would hold them:
    each caption sampled (without its colour word when not ``colour_named``), then the named shape
    read back by the analyzer, whose colour family, details and mask become the reference's truth.
    None where the shape is not drawn."""
    captions = [r.caption if colour_named else world.make_caption(r.scene, r.characters, [False]) for r in references]
    images = pipe(captions, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed + 7919))  # (B, 32, 32, 3)
    drawn = []
    for image, caption, reference in zip(images, captions, references):
        d = largest_detection(analyze_image(image), reference.characters[0].shape)
        if d is None:
            drawn.append(None)
            continue
        character = world.Character(shape=d.shape, colour=d.colour, hue=d.hue, value=d.value, size=d.size,
                                    mark=d.mark, mark_tone=d.mark_tone, center=d.center)
        drawn.append(world.Scene(reference.scene, [character], caption, reference.relation,
                                 image=np.round(image * 255).astype(np.uint8), masks=d.mask[None]))
    return drawn


def draw_pool(pipe: ToyPipeline, n: int, seed: int = 0, batch_size: int = 64, progress=None) -> list[world.Scene]:
    """Draw ``n`` one-character uncoloured captions (held-out triples excluded) and keep the
    drawings whose character the analyzer finds (about 60-75 %)."""
    rng = np.random.default_rng(seed)
    pool = []
    for start in range(0, n, batch_size):
        rendered = [world.sample_scene(rng, n_characters=1, exclude=world.HELD_OUT_TRIPLES)  # colour word dropped when drawn
                    for _ in range(min(batch_size, n - start))]
        pool += [d for d in drawn_references(pipe, rendered, seed + start, colour_named=False) if d is not None]
        if progress is not None:
            progress(len(rendered))
    return pool


def save_pool(pool: list[world.Scene], path: Path | str) -> None:
    """Write ``pool`` to ``path`` (.npz) through a temporary file, so no half-written pool is left."""
    path = Path(path)
    if not pool:
        raise ValueError("the pool is empty: the model drew none of its characters; nothing written")
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, images=np.stack([s.image for s in pool]),  # (N, 32, 32, 3) uint8
                        masks=np.stack([s.masks[0] for s in pool]),  # (N, 32, 32) bool
                        captions=np.array([s.caption for s in pool]), scenes=np.array([s.scene for s in pool]),
                        characters=np.array(json.dumps([asdict(s.characters[0]) for s in pool])))
    os.replace(tmp, path)


def load_pool(path: Path | str) -> list[world.Scene]:
    """The pool at ``path`` as one-character ``world.Scene``s; a clear error for a file that is not one."""
    hint = f"write one with python -m osa_lib.toy.drawn_pool --model DIR --out {path}"
    try:
        with np.load(path) as data:  # allow_pickle stays False: a pool holds no objects
            arrays = {k: data[k] for k in POOL_KEYS if k in data.files}
    except (OSError, EOFError, ValueError) as error:  # missing, truncated or not an .npz at all
        raise ValueError(f"cannot read drawn pool {path}: {error}; {hint}") from error
    missing = [k for k in POOL_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path} is not a drawn pool (no {missing}); {hint}")
    characters = json.loads(str(arrays["characters"]))
    return [world.Scene(str(scene), [world.Character(**{**c, "center": tuple(c["center"])})], str(caption), "apart",
                        image=image, masks=mask[None], show_colour=[False])
            for image, mask, caption, scene, c in zip(arrays["images"], arrays["masks"], arrays["captions"],
                                                      arrays["scenes"], characters)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="toy pipeline folder: the model being fine-tuned (default data/toy_model, the base without its fine-tune)")
    parser.add_argument("--n", type=int, default=4000, help="captions to draw (about 60-75 %% are kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="the pool file (.npz)")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    pipe = ToyPipeline.from_pretrained(args.model or DEFAULT_MODEL_DIR).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    started = time.time()
    with tqdm(total=args.n, desc="draw uncoloured references") as bar:
        pool = draw_pool(pipe, args.n, args.seed, args.batch_size, progress=bar.update)
    save_pool(pool, args.out)
    print(f"{len(pool)} of {args.n} drawings kept (the analyzer found their character), "
          f"{time.time() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
