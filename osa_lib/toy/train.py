"""Train the toy text-to-image model on freshly rendered toy-world scenes.

    python -m osa_lib.toy.train --max-minutes 85                  # CPU: continues data/toy_model
    python -m osa_lib.toy.train --out runs/new --device cuda --steps 20000  # a new model, on a GPU

Resumable: the full training state (weights, EMA weights, optimiser, step, data seed) is
written to ``--ckpt-dir`` every ``--save-every`` steps and picked up on the next start. The
EMA weights are exported as a diffusers pipeline to ``--out`` at every checkpoint, so a run
cut short still leaves a usable model. Held-out (colour, shape, scene) triples are never
rendered for training (see ``world.HELD_OUT_TRIPLES``).

The loss is the plain denoising loss on images and captions; nothing supervises attention.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from .drawn_pool import load_pool
from .model import DEFAULT_MODEL_DIR, LATENT_SIZE, TEXT_BLOCKS, ToyPipeline, build_toy_pipeline, images_to_latents
from .reference import reference_attention
from .world import HELD_OUT_TRIPLES, _dilate, sample_pair, sample_scene, sample_story_pair

__all__ = ["VIEWS", "SceneStream", "core_region", "shift_captions", "train", "main"]

TRAINING_RECORD = "training.json"
# How a reference pair's target sees its reference. "character": the shared character's tokens
# (or, a share of the time, the whole reference), optionally as isolated attention shows them
# (cores, re-weighting). "neutral": every token of the reference to every token of the target,
# no mask and no bias: the extended attention of ConsiStory, StoryDiffusion and reference-only
# pipelines, owned by no method, with pairs from one story (``world.sample_story_pair``).
VIEWS = ("character", "neutral")


class SceneStream(torch.utils.data.IterableDataset):
    """Endless batches from the renderer: images (B, 3, 32, 32) in [-1, 1], captions, and the
    reference pairs of ``world.sample_pair`` (``osa_lib.toy.reference``).

    With ``pair_rate`` > 0, the first ``P = round(pair_rate * B / 2)`` rows are references and the
    next ``P`` their targets: ``partner`` (B,) gives each target its reference row (-1 elsewhere)
    and ``ref_mask`` (B, 16, 16) the reference tokens it may see, at latent size: the shared
    character's pixels or, a share ``whole_share`` of the time, the whole reference image (so the
    model must also find the matching character by itself); ``query_mask`` (B, 16, 16) the target's
    pixels that may look, as the method's isolated self-attention allows: the shared character's
    region (grown by one pixel) or, a share ``whole_share`` of the time, every pixel; and
    ``query_weight`` (B, 16, 16) the target character's own coverage, the stand-in for the method's
    ``Â`` when training with its re-weighting (zero outside pair targets).

    With a ``drawn_pool`` (``osa_lib.toy.drawn_pool``), a share ``drawn_share`` of the pairs take
    their reference from it: the model's own drawing of an uncoloured caption, what an uncoloured
    story's bank holds, with a target rendered from the character as the analyzer read it.

    With ``core_area`` (a share of the image), the pairs that are not "whole" show the method's
    view instead of the whole character: only the reference's core (its pixels nearest its centre,
    at most that share of the image) and only the target's core may look, as isolated attention
    does with masks capped by ``IsolationConfig.mask_area_cap``.

    With ``view="neutral"`` the pairs are two scenes of one story (``world.sample_story_pair``:
    a reference with 1-3 characters, a target with 1-2 of them) and every reference token is
    visible to every target token: ``ref_mask`` and ``query_mask`` are all ones and
    ``query_weight`` zero, whatever the other options; no mask of any character is read."""

    def __init__(self, batch_size: int, seed: int, p_empty_caption: float = 0.1, pair_rate: float = 0.0,
                 whole_share: float = 0.5, drawn_pool: list | None = None, drawn_share: float = 0.0,
                 core_area: float | None = None, view: str = "character"):
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        if view == "neutral" and (core_area is not None or drawn_share > 0):
            raise ValueError("the neutral view shows whole references from one story: it takes no --core-area "
                             "and no drawn pool (drop those options, or use --view character)")
        self.view = view
        self.batch_size, self.seed, self.p_empty_caption = batch_size, seed, p_empty_caption
        self.pairs, self.whole_share = int(round(pair_rate * batch_size / 2)), whole_share
        if core_area is not None and not 0 < core_area <= 1:
            raise ValueError(f"core_area must be a share of the image in (0, 1], got {core_area}")
        self.core_area = core_area
        if drawn_share > 0 and not drawn_pool:
            raise ValueError("drawn_share > 0 needs a drawn pool (--drawn-pool FILE, written by osa_lib.toy.drawn_pool)")
        self.drawn_pool, self.drawn_share = drawn_pool or [], drawn_share

    def _reference(self, rng: np.random.Generator):
        """A drawn reference from the pool (a share ``drawn_share`` of the time), else None (rendered)."""
        if self.drawn_share > 0 and rng.random() < self.drawn_share:
            return self.drawn_pool[int(rng.integers(len(self.drawn_pool)))]
        return None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng(self.seed + (info.id * 7919 if info else 0))
        while True:
            if self.view == "neutral":
                yield self._neutral_batch(rng)
                continue
            pairs = [sample_pair(rng, exclude=HELD_OUT_TRIPLES, reference=self._reference(rng)) for _ in range(self.pairs)]
            plain = [sample_scene(rng, exclude=HELD_OUT_TRIPLES) for _ in range(self.batch_size - 2 * self.pairs)]
            scenes = [p[0] for p in pairs] + [p[1] for p in pairs] + plain
            images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2)
            captions = ["" if rng.random() < self.p_empty_caption else s.caption for s in scenes]
            partner = torch.full((len(scenes),), -1, dtype=torch.long)
            partner[self.pairs:2 * self.pairs] = torch.arange(self.pairs)
            ref_mask, query_mask = torch.zeros(len(scenes), 32, 32), torch.ones(len(scenes), 32, 32)
            query_weight = torch.zeros(len(scenes), 32, 32)
            for k, (reference, target, i_ref, i_tgt) in enumerate(pairs):
                query_weight[self.pairs + k] = torch.from_numpy(target.masks[i_tgt]).float()
                whole = rng.random() < self.whole_share
                if self.core_area:  # the method's view: capped masks
                    seen, looking = (core_region(m, self.core_area) for m in (reference.masks[i_ref], target.masks[i_tgt]))
                else:
                    seen, looking = reference.masks[i_ref], _dilate(target.masks[i_tgt])
                ref_mask[self.pairs + k] = 1.0 if whole else torch.from_numpy(seen).float()
                if rng.random() >= self.whole_share:
                    query_mask[self.pairs + k] = torch.from_numpy(looking).float()
            pooled = (F.avg_pool2d(m[:, None], 2)[:, 0] for m in (ref_mask, query_mask, query_weight))
            yield (images.float() / 127.5 - 1.0, captions, partner, *pooled)

    def _neutral_batch(self, rng: np.random.Generator):
        """One batch of the neutral view: story pairs first (references, then their targets),
        plain scenes after; every reference token visible to every target token."""
        pairs = [sample_story_pair(rng, exclude=HELD_OUT_TRIPLES) for _ in range(self.pairs)]
        plain = [sample_scene(rng, exclude=HELD_OUT_TRIPLES) for _ in range(self.batch_size - 2 * self.pairs)]
        scenes = [p[0] for p in pairs] + [p[1] for p in pairs] + plain
        images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2)  # (B, 3, 32, 32)
        captions = ["" if rng.random() < self.p_empty_caption else s.caption for s in scenes]
        partner = torch.full((len(scenes),), -1, dtype=torch.long)
        partner[self.pairs:2 * self.pairs] = torch.arange(self.pairs)
        size = (len(scenes), LATENT_SIZE, LATENT_SIZE)
        return images.float() / 127.5 - 1.0, captions, partner, torch.ones(size), torch.ones(size), torch.zeros(size)


def core_region(mask: np.ndarray, area: float) -> np.ndarray:
    """(H, W) bool mask -> (H, W) bool: its pixels nearest its centroid, at most ``area`` of the
    image (all of them when the mask is smaller): the training stand-in for a mask capped by
    ``IsolationConfig.mask_area_cap``, which keeps the pixels where ``Â`` is highest."""
    ys, xs = np.nonzero(mask)
    keep = int(area * mask.size)
    if len(ys) <= keep:
        return mask.astype(bool)
    distance = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
    nearest = np.argsort(distance, kind="stable")[:keep]
    core = np.zeros(mask.shape, dtype=bool)
    core[ys[nearest], xs[nearest]] = True
    return core


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _export(pipe: ToyPipeline, ema_state: dict, out: Path, step: int = 0, elapsed: float = 0.0,
            resumes: int = 0) -> None:
    """Write the EMA weights as a diffusers pipeline folder, atomically (temp dir + rename), with
    ``training.json`` (step, minutes, resumes) so a later run can warm-start from the committed
    weights on fresh data."""
    export = copy.deepcopy(pipe)
    export.unet.load_state_dict(ema_state["unet"])
    export.text_encoder.load_state_dict(ema_state["text_encoder"])
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    export.save_pretrained(tmp)
    (tmp / TRAINING_RECORD).write_text(json.dumps({"step": step, "minutes": round(elapsed / 60, 1),
                                                       "resumes": resumes}))
    swap_in_folder(tmp, out)


def swap_in_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``; an existing ``out`` stays whole until the new one
    is in place (renamed to ``.old``, removed last)."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _weights_copy(pipe: ToyPipeline) -> dict:
    """Detached copies of the trained weights, the starting point of their EMA."""
    return {"unet": copy.deepcopy(pipe.unet.state_dict()), "text_encoder": copy.deepcopy(pipe.text_encoder.state_dict())}


def train(steps: int = 100_000, max_minutes: float | None = None, batch_size: int = 64, lr: float = 4e-4,
          ema_decay: float = 0.995, out: Path = DEFAULT_MODEL_DIR, ckpt_dir: Path | None = None,
          save_every: int = 250, device: str = "cpu", seed: int = 0, log_every: int = 50,
          snr_gamma: float | None = 5.0, text_layers: int = 1, init_from: Path | None = None,
          text_blocks: str = "up", heads: int = 4, max_shift: int = 0,
          text_dim: int = 128, phrase_wise: bool = True, levels: int = 3, pair_rate: float = 0.0,
          workers: int = 1, whole_share: float = 0.5, pair_timesteps: str = "same", pair_min_t: int = 0,
          pair_plain_loss: bool = True, train_only: str = "all", pair_reweight: float = 0.0,
          preserve: float = 0.0, preserve_from: Path | None = None, drawn_pool: Path | None = None,
          drawn_share: float = 0.0, core_area: float | None = None, view: str = "character") -> dict:
    """Train (or resume) and return the last logged statistics."""
    if view == "neutral" and pair_reweight > 0:
        raise ValueError("the neutral view adds no bias to any reference token: drop --pair-reweight "
                         "(the re-weighting belongs to isolated attention's view, --view character)")
    ckpt_dir = Path(ckpt_dir or Path(out).with_name(Path(out).name + "_ckpt"))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "state.pt"
    pipe = build_toy_pipeline(seed, text_layers=text_layers, text_blocks=text_blocks, heads=heads,
                              text_dim=text_dim, phrase_wise=phrase_wise, levels=levels)
    pipe.to(device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    params = _trained_parameters(pipe, train_only)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ema = _weights_copy(pipe)
    step, data_seed, elapsed_before = 0, seed, 0.0
    record_path = Path(out) / TRAINING_RECORD
    # the run being continued, if any: loaded once, for the architecture check and a warm start
    resumable_export = ckpt_path.exists() and (Path(out) / "model_index.json").exists()
    saved = ToyPipeline.from_pretrained(out) if record_path.exists() or resumable_export else None
    if saved is not None:
        _refuse_other_architecture(pipe, saved, out)
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        pipe.unet.load_state_dict(state["unet"]); pipe.text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"]); ema = state["ema"]
        step, elapsed_before = state["step"], state.get("elapsed", 0.0)
        data_seed = seed + 1000 * state["resumes"] + 1
        resumes = state["resumes"] + 1
        print(f"resumed from {ckpt_path} at step {step}")
    elif record_path.exists():
        # warm start from committed weights: the EMA weights seed both copies; Adam starts afresh
        record = json.loads(record_path.read_text())
        pipe.unet.load_state_dict(saved.unet.state_dict())
        pipe.text_encoder.load_state_dict(saved.text_encoder.state_dict())
        ema = _weights_copy(pipe)
        step, elapsed_before, resumes = record["step"], record["minutes"] * 60, record.get("resumes", 0) + 1
        data_seed = seed + 1000 * resumes + 1
        print(f"warm start from the exported weights in {out} at step {step} (new optimiser state)")
    elif init_from is not None:
        # fine-tune start from another pipeline: every tensor whose name and shape this pipeline
        # shares is copied; the others (layers this architecture lacks or adds) are reported
        source = ToyPipeline.from_pretrained(init_from)
        for name in ("unet", "text_encoder"):
            dropped, fresh = _load_matching(getattr(pipe, name), getattr(source, name))
            print(f"initialised {name} from {init_from}: dropped {dropped} tensors, {fresh} new ones start random")
        ema, resumes = _weights_copy(pipe), 0
    else:
        resumes = 0
    if init_from is not None and step > 0:
        print(f"--init-from {init_from} ignored: continuing the run above")
    teacher_dir = preserve_from or init_from
    if preserve > 0 and teacher_dir is None:
        raise ValueError("--preserve keeps the model close to the one it fine-tunes: give that model with --init-from "
                         "(or the model to stay close to with --preserve-from)")
    # frozen: what rows without a reference should still predict (the model being fine-tuned, or
    # the one a resumed fine-tune first started from, so drift does not add up over restarts)
    teacher = ToyPipeline.from_pretrained(teacher_dir).to(device) if preserve > 0 else None
    pool = load_pool(drawn_pool) if drawn_pool is not None else None
    stream = SceneStream(batch_size, data_seed, pair_rate=pair_rate, whole_share=whole_share, drawn_pool=pool,
                         drawn_share=drawn_share, core_area=core_area, view=view)
    loader = torch.utils.data.DataLoader(stream, batch_size=None,
                                         num_workers=workers, prefetch_factor=4, persistent_workers=True,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    torch.manual_seed(seed + step)
    started, stats, running = time.time(), {}, []
    bar = tqdm(total=steps, initial=step, desc="train toy model", dynamic_ncols=True)
    # up-block self-attention may read a partner row's tokens (reference pairs; none when pair_rate = 0)
    with reference_attention(pipe.unet, (LATENT_SIZE, LATENT_SIZE)) as reference_state:
        reference_state.reweight = pair_reweight
        for images, captions, partner, ref_mask, query_mask, query_weight in loader:
            if step >= steps or (max_minutes and time.time() - started > max_minutes * 60):
                break
            images = images.to(device)
            partner = partner.to(device)  # (B,) each pair target's reference row, -1 elsewhere
            reference_state.partner, reference_state.ref_mask = partner, ref_mask.to(device)
            reference_state.query_mask, reference_state.query_weight = query_mask.to(device), query_weight.to(device)
            latents = images_to_latents(images)  # (B, 12, 16, 16)
            noise = torch.randn_like(latents)
            t = _timesteps(partner, noise_scheduler.config.num_train_timesteps, pair_timesteps, pair_min_t)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            ids = shift_captions(pipe.tokenize(captions, validate=False), max_shift).to(device)
            text = pipe.embed_ids(ids)  # (B, 16, text_dim)
            plain_rows = (partner >= 0) if pair_plain_loss else None
            prediction = pipe.unet(noisy, t, text).sample  # (B, 12, 16, 16)
            loss = _denoising_loss(prediction, latents, noise, t, noise_scheduler, snr_gamma, plain_rows)
            if teacher is not None:
                loss = loss + preserve * _preservation_loss(teacher, prediction, noisy, t, ids, partner < 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            warmup = min(1.0, (step + 1) / 200)
            for g in opt.param_groups:
                g["lr"] = lr * warmup
            opt.step()
            step += 1
            decay = min(ema_decay, (1 + step) / (10 + step))
            _ema_update(ema, pipe, decay)
            running.append(loss.item())
            bar.update(1)
            if step % log_every == 0:
                stats = {"step": step, "loss": float(np.mean(running)), "minutes": (time.time() - started) / 60}
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
                print(f"step {step} loss {stats['loss']:.4f} elapsed {stats['minutes']:.1f} min", flush=True)
                running = []
            if step % save_every == 0:
                _checkpoint(pipe, opt, ema, step, resumes, elapsed_before + time.time() - started, ckpt_path, out)
    _checkpoint(pipe, opt, ema, step, resumes, elapsed_before + time.time() - started, ckpt_path, out)
    bar.close()
    return stats


@torch.no_grad()
def _ema_update(ema: dict, pipe: ToyPipeline, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for every floating-point tensor that learns;
    frozen parameters are left as they are (averaging one with itself drifts by rounding)."""
    for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        state = module.state_dict()
        frozen = {k for k, p in module.named_parameters() if not p.requires_grad}
        floats = [k for k, v in state.items() if v.dtype.is_floating_point and k not in frozen]
        averaged = [ema[name][k] for k in floats]
        if averaged:  # a part may be frozen whole
            torch._foreach_mul_(averaged, decay)
            torch._foreach_add_(averaged, [state[k].detach() for k in floats], alpha=1 - decay)
        for k, v in state.items():
            if not v.dtype.is_floating_point:
                ema[name][k].copy_(v)


def shift_captions(ids: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Move each caption (B, T) right by a random 0..max_shift slots, padding in front, as far as
    the caption still fits. A word's position then no longer tells which character it belongs
    to, so the U-Net cannot fetch "the first character's words" by position alone; sampling
    uses shift 0, a layout seen in training."""
    if max_shift <= 0:
        return ids
    shifted = torch.zeros_like(ids)  # <pad> = 0
    for b, row in enumerate(ids):
        length = int((row != 0).sum())
        s = int(torch.randint(0, min(max_shift, ids.shape[1] - length) + 1, ()))
        shifted[b, s:s + length] = row[:length]
    return shifted


def _architecture(pipe: ToyPipeline) -> dict:
    """The settings that define a toy pipeline's architecture, comparable between a freshly built
    pipeline and a saved one (private keys, dtypes and list-versus-tuple differences dropped)."""
    text_config = pipe.text_encoder.config.to_dict()
    settings = {**{f"unet.{k}": v for k, v in pipe.unet.config.items() if not k.startswith("_")},
                **{f"text_encoder.{k}": v for k, v in text_config.items()
                   if not k.startswith("_") and k not in ("dtype", "torch_dtype", "architectures", "transformers_version")},
                "phrase_wise": bool(pipe.config.get("phrase_wise", False))}
    return json.loads(json.dumps(settings, default=str))


def _refuse_other_architecture(requested: ToyPipeline, saved: ToyPipeline, out: Path) -> None:
    """Continuing a run with other architecture flags would load weights into the wrong model
    (a head count or phrase-wise encoding changes no tensor shape, so nothing else would notice)."""
    asked, have = _architecture(requested), _architecture(saved)
    differ = [f"{k}: saved {have.get(k)!r}, flags ask {asked.get(k)!r}"
              for k in sorted(set(asked) | set(have)) if asked.get(k) != have.get(k)]
    if differ:
        raise ValueError(f"{out} holds a run whose architecture differs from these flags ("
                         + "; ".join(differ) + "). Pass the flags it was trained with (--text-layers, "
                         "--text-blocks, --heads, --text-dim, --phrase-wise) to continue it, "
                         "or choose a new --out to start a new run.")


def _load_matching(target: torch.nn.Module, source: torch.nn.Module) -> tuple[int, int]:
    """Copy the tensors of ``source`` whose name and shape ``target`` shares; returns
    (source tensors dropped, target tensors left at their initialisation)."""
    own, theirs = target.state_dict(), source.state_dict()
    shared = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    target.load_state_dict(shared, strict=False)
    return len(theirs) - len(shared), len(own) - len(shared)


TRAIN_ONLY = ("all", "up-self-attention")


def _trained_parameters(pipe: ToyPipeline, train_only: str = "all") -> list[torch.nn.Parameter]:
    """The parameters the optimiser updates; the others are frozen (``requires_grad`` off).
    "up-self-attention": only the up blocks' self-attention (``attn1``: its norm, q, k, v and
    output projections), where the method's references enter - a test of whether that layer alone
    can learn to copy appearance, with everything that draws frozen."""
    if train_only == "all":
        return list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    if train_only != "up-self-attention":
        raise ValueError(f"train_only must be one of {TRAIN_ONLY}, got {train_only!r}")
    for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()):
        p.requires_grad_(False)
    chosen = [p for name, p in pipe.unet.named_parameters()
              if name.startswith("up_blocks.") and (".attn1." in name or ".norm1." in name) and ".transformer_blocks." in name]
    for p in chosen:
        p.requires_grad_(True)
    return chosen


def _timesteps(partner: torch.Tensor, num_train_timesteps: int, pair_timesteps: str = "same",
               pair_min_t: int = 0) -> torch.Tensor:
    """(B,) training timesteps, uniform per row, except in reference pairs: a target's timestep is
    drawn from [pair_min_t, T) (where its colour is still undecided), and with ``"same"`` its
    reference is noised to that timestep too, as the bank of a story holds the first scene's
    keys/values at the step being denoised (and as the appearance probe shows them)."""
    b, device = len(partner), partner.device
    t = torch.randint(0, num_train_timesteps, (b,), device=device)
    targets = partner >= 0
    if bool(targets.any()):
        t[targets] = torch.randint(pair_min_t, num_train_timesteps, (int(targets.sum()),), device=device)
        if pair_timesteps == "same":
            t[partner[targets]] = t[targets]
    return t


def _denoising_loss(prediction, latents, noise, t, noise_scheduler, snr_gamma: float | None,
                    plain_rows: torch.Tensor | None = None) -> torch.Tensor:
    """MSE against the scheduler's target (epsilon or v), with Min-SNR-gamma weighting
    (Hang et al. 2023) when ``snr_gamma`` is set: w(t) = min(SNR, gamma) / SNR for epsilon and
    min(SNR, gamma) / (SNR + 1) for v, so easy low-noise steps stop dominating the gradient.
    Rows in ``plain_rows`` (B,) bool keep weight 1: reference-pair targets, whose colour is decided
    at high noise, where Min-SNR's weight for v falls to about SNR (0.02 at t = 900)."""
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, t) if v_prediction else noise
    per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if not snr_gamma:
        return per_sample.mean()
    alpha_bar = noise_scheduler.alphas_cumprod.to(t.device)[t]
    snr = alpha_bar / (1 - alpha_bar)  # (B,)
    denominator = snr + 1 if v_prediction else snr
    weight = snr.clamp(max=snr_gamma) / denominator  # (B,)
    if plain_rows is not None:
        weight = torch.where(plain_rows, torch.ones_like(weight), weight)
    return (per_sample * weight).mean()


@torch.no_grad()
def _teacher_prediction(teacher: ToyPipeline, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return teacher.unet(noisy, t, teacher.embed_ids(ids)).sample


def _preservation_loss(teacher: ToyPipeline, prediction: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                       ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean squared distance, unweighted at every timestep, between the fine-tuned prediction
    (B, 12, 16, 16) and the frozen starting model's on the rows ``rows`` (B,) bool that see no
    reference: ordinary drawing, where a fine-tune should change nothing. Min-SNR barely weighs
    the high-noise steps where composition is decided, so without this term pair targets alone
    steer them there."""
    if not bool(rows.any()):
        return prediction.new_zeros(())
    return F.mse_loss(prediction[rows], _teacher_prediction(teacher, noisy[rows], t[rows], ids[rows]))


def _checkpoint(pipe, opt, ema, step, resumes, elapsed, ckpt_path: Path, out: Path) -> None:
    _save_atomic({"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict(),
                  "opt": opt.state_dict(), "ema": ema, "step": step, "resumes": resumes,
                  "elapsed": elapsed}, ckpt_path)
    _export(pipe, ema, Path(out), step, elapsed, resumes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000, help="stop after this many optimiser steps")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this much wall time")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="pipeline folder to write")
    parser.add_argument("--ckpt-dir", type=Path, default=None, help="default: <out>_ckpt")
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting; 0 turns it off")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is faster when other work shares the cores)")
    parser.add_argument("--text-layers", type=int, default=1, help="transformer layers of a new text encoder")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start a new run from this pipeline's U-Net and text embeddings")
    parser.add_argument("--text-blocks", choices=TEXT_BLOCKS, default="up",
                        help="U-Net blocks with cross-attention in a new model: all, or up only")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per U-Net transformer block")
    parser.add_argument("--text-dim", type=int, default=128, help="width of a new text encoder's embeddings")
    parser.add_argument("--phrase-wise", action=argparse.BooleanOptionalAction, default=True,
                        help="encode each phrase of a caption on its own (--no-phrase-wise: the whole caption at once)")
    parser.add_argument("--levels", type=int, choices=(2, 3), default=3,
                        help="U-Net resolutions of a new model: 3 (16, 8, 4) or 2 (16, 8: no 4x4 level)")
    parser.add_argument("--pair-rate", type=float, default=0.0,
                        help="share of each batch in reference pairs (osa_lib.toy.reference); 0 = none")
    parser.add_argument("--whole-share", type=float, default=0.5,
                        help="share of reference pairs where the whole reference is visible, and (apart) where every target pixel may look")
    parser.add_argument("--pair-timesteps", choices=("same", "independent"), default="same",
                        help="noise a pair's reference to its target's timestep (same), or draw its own")
    parser.add_argument("--pair-min-t", type=int, default=0, help="pair targets' timesteps are drawn from [this, T)")
    parser.add_argument("--pair-reweight", type=float, default=0.0,
                        help="w of the method's re-weighting log(1 + w·Â) on a pair target's reference columns, "
                             "Â = the target character's coverage (0: none); train with the w that sampling will use")
    parser.add_argument("--preserve", type=float, default=0.0,
                        help="weight of a term keeping rows without a reference at the --init-from model's "
                             "prediction, at every timestep (0: none): copying learned, drawing kept")
    parser.add_argument("--preserve-from", type=Path, default=None,
                        help="the model --preserve holds rows without a reference at (default: --init-from); "
                             "give the original model when continuing a fine-tune rebuilt with osa_lib.toy.delta")
    parser.add_argument("--drawn-pool", type=Path, default=None,
                        help="the model's own drawings of uncoloured captions (python -m osa_lib.toy.drawn_pool), "
                             "references for a share --drawn-share of the pairs")
    parser.add_argument("--drawn-share", type=float, default=0.0,
                        help="share of reference pairs whose reference comes from --drawn-pool")
    parser.add_argument("--core-area", type=float, default=None,
                        help="pairs that are not whole show only each character's core, at most this share of the image "
                             "(the method's view with mask_area_cap; default: the whole character)")
    parser.add_argument("--pair-plain-loss", action=argparse.BooleanOptionalAction, default=True,
                        help="pair targets' loss without Min-SNR weighting (which nearly ignores high noise)")
    parser.add_argument("--train-only", choices=TRAIN_ONLY, default="all",
                        help="which parameters learn: all, or only the up blocks' self-attention")
    parser.add_argument("--workers", type=int, default=1, help="data loader processes rendering scenes")
    parser.add_argument("--max-shift", type=int, default=0, help="shift captions right by up to this many slots")
    parser.add_argument("--view", choices=VIEWS, default="character",
                        help="how a pair's target sees its reference: the shared character (character) or every "
                             "token of a reference from the same story, no mask, no bias (neutral)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train(steps=args.steps, max_minutes=args.max_minutes, batch_size=args.batch_size, lr=args.lr,
          ema_decay=args.ema_decay, out=args.out, ckpt_dir=args.ckpt_dir, save_every=args.save_every,
          device=args.device, seed=args.seed, log_every=args.log_every,
          snr_gamma=args.snr_gamma, text_layers=args.text_layers, init_from=args.init_from,
          text_blocks=args.text_blocks, heads=args.heads, max_shift=args.max_shift,
          text_dim=args.text_dim, phrase_wise=args.phrase_wise, levels=args.levels,
          pair_rate=args.pair_rate, workers=args.workers, whole_share=args.whole_share,
          pair_timesteps=args.pair_timesteps, pair_min_t=args.pair_min_t, pair_plain_loss=args.pair_plain_loss,
          pair_reweight=args.pair_reweight, train_only=args.train_only, preserve=args.preserve,
          preserve_from=args.preserve_from, drawn_pool=args.drawn_pool, drawn_share=args.drawn_share,
          core_area=args.core_area, view=args.view)


if __name__ == "__main__":
    main()
