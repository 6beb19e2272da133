"""Does a word's cross-attention land on *its own* character? A teacher-forced probe.

    python -m osa_lib.toy.probes.binding                      # the shipped model
    python -m osa_lib.toy.probes.binding --model /path/to/dir

Rendered two-character scenes (characters apart, both colours named) are noised to a few
timesteps and run through the U-Net once each, with the project's cross-attention capture. The
image is the *true* one, so the probe separates "the maps do not bind words to objects" from
"the model drew something else". Per layer and word kind (shape word, colour word) it prints:

- **own share**: of a word's attention mass that falls on the two characters, the fraction on
  its own character (0.5 = the word does not tell the two apart; 1 = perfect binding);
- **IoU**: each character's Otsu mask (the method's masks, lower-CV overlap rule) against its
  ground-truth mask.

Nothing here trains anything; it only reads the model.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ...attention import AttentionStore, capture_attention
from ...masks import resize_masks, subject_masks
from .. import world
from ..model import ToyPipeline, images_to_latents, LATENT_SIZE

__all__ = ["own_object_share", "binding_scores", "main"]


def own_object_share(A: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per character, the share of its map's mass on the characters that lands on its own one.

    Args:
        A: maps (B, 2, h, w), non-negative.
        truth: ground-truth masks (B, 2, H, W), bool or {0, 1}; pooled to (h, w) as coverage.
    Returns:
        (B, 2) in [0, 1]; 0.5 when a map weighs both characters alike.
    """
    if A.shape[1] != 2 or truth.shape[:2] != A.shape[:2]:
        raise ValueError(f"need maps and masks for exactly two characters; got {tuple(A.shape)} and {tuple(truth.shape)}")
    cover = F.adaptive_avg_pool2d(truth.float(), A.shape[-2:])  # (B, 2, h, w)
    own = (A * cover).sum((-1, -2))
    other = (A * cover.flip(1)).sum((-1, -2))
    return own / (own + other).clamp(min=1e-12)


def _mask_iou(maps: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU (B, M) of the method's Otsu masks from ``maps`` with ``truth`` (B, M, H, W)."""
    masks = resize_masks(subject_masks(maps, rule="lower_cv").masks, truth.shape[-2:])  # (B, M, H, W)
    truth = truth.bool()
    return (masks & truth).sum((-1, -2)) / (masks | truth).sum((-1, -2)).clamp(min=1)


@torch.no_grad()
def binding_scores(pipe: ToyPipeline, n_scenes: int = 64, timesteps=(200, 500, 800), seed: int = 123) -> list[dict]:
    """One row per (word kind, timestep, place, resolution): mean own share and mean IoU, and each
    scene's value (averaged over its two characters; the same scenes in every row, in order), from
    which ``experiments.binding_table`` takes standard errors over scenes."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, n_characters=2, relation="apart", p_drop_colour=0.0)
              for _ in range(n_scenes)]
    ids = pipe.tokenize([s.caption for s in scenes], validate=False)
    tokens = [pipe.tokenizer.convert_ids_to_tokens(row) for row in ids]
    kinds = ("shape", "colour")
    # groups (shape 1, shape 2, colour 1, colour 2) per scene: one U-Net pass per t serves both kinds
    token_groups = [[[tokens[b].index(getattr(c, kind))] for kind in kinds for c in s.characters]
                    for b, s in enumerate(scenes)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    x0 = images_to_latents(images)  # (B, 12, 16, 16)
    truth = torch.from_numpy(np.stack([s.masks for s in scenes]))  # (B, 2, 32, 32)
    cond = pipe.embed_ids(ids)
    uncond = pipe.embed_ids(pipe.tokenize([""] * n_scenes, validate=False))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    rows = []
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + t))
        xt = noise_scheduler.add_noise(x0, noise, torch.tensor([t]))
        store = AttentionStore(token_groups, (LATENT_SIZE, LATENT_SIZE))
        with capture_attention(pipe.unet, store):
            pipe.unet(torch.cat([xt, xt]), t, torch.cat([uncond, cond]))
        for k, kind in enumerate(kinds):
            for place, res in sorted({(l.place, l.resolution(store.latent_hw)[0]) for l in store.layers}):
                A = store.aggregate((place,), res)[:, 2 * k:2 * k + 2]  # (B, 2, res, res)
                own, iou = own_object_share(A, truth).mean(1), _mask_iou(A, truth).float().mean(1)  # (B,), (B,)
                rows.append({"word": kind, "t": t, "place": place, "resolution": res,
                             "own_share": own.mean().item(), "iou": iou.mean().item(),
                             "own_share_scenes": own.tolist(), "iou_scenes": iou.tolist()})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="toy pipeline folder (default: the shipped backbone, data/toy_model with data/toy_finetune)")
    parser.add_argument("--scenes", type=int, default=64)
    args = parser.parse_args(argv)
    from ...backbones import load_backbone
    pipe = load_backbone("toy", model_id=args.model, device="cpu").pipe
    print("| word | t | layers | own share | Otsu IoU |\n|---|---|---|---|---|")
    for r in binding_scores(pipe, args.scenes):
        print(f"| {r['word']} | {r['t']} | {r['place']} {r['resolution']}x{r['resolution']} | "
              f"{r['own_share']:.2f} | {r['iou']:.2f} |")


if __name__ == "__main__":
    main()
