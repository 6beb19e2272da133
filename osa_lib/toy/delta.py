"""A fine-tune of the toy model stored as the tensors it changed, so an unfinished run can be
committed in well under a megabyte and continued later.

    python -m osa_lib.toy.delta save runs/finetune/tuned --base data/toy_model --out data/toy_finetune/up_self_attention.safetensors
    python -m osa_lib.toy.delta apply data/toy_finetune/up_self_attention.safetensors --base data/toy_model --out runs/finetune/start

A fine-tune of the up blocks' self-attention only (``train --train-only up-self-attention``)
changes 107 k of 3.8 M parameters: 0.4 MB in fp32, against 16 MB for the model folder. The file
holds those tensors exactly (fp32), a fingerprint of the base weights, and the run's
``training.json``; ``apply`` refuses a base with another fingerprint, since the tensors only make
sense on top of the weights they were trained with.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import parse_isolation_defaults
from .model import DEFAULT_MODEL_DIR, ToyPipeline

__all__ = ["weights_fingerprint", "save_delta", "with_delta", "apply_delta", "load_toy_variant",
           "TOY_VARIANTS", "DEFAULT_TOY_VARIANT", "SHIPPED_DELTA",
           "SHIPPED_ISOLATION", "main"]

PARTS = ("unet", "text_encoder")
FINETUNE_DIR = DEFAULT_MODEL_DIR.parent / "toy_finetune"
#: the fine-tune the shipped toy backbone puts on top of ``data/toy_model``, and its tuned switches
SHIPPED_DELTA = FINETUNE_DIR / "up_self_attention.safetensors"
SHIPPED_ISOLATION = FINETUNE_DIR / "isolation.json"
NEUTRAL_DELTA = DEFAULT_MODEL_DIR.parent / "toy_finetune_neutral" / "up_self_attention.safetensors"


def _state(pipe: ToyPipeline) -> dict[str, torch.Tensor]:
    """Every tensor of the trained parts, named "<part>.<tensor name>"."""
    return {f"{part}.{name}": tensor for part in PARTS for name, tensor in getattr(pipe, part).state_dict().items()}


def weights_fingerprint(pipe: ToyPipeline) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_state(pipe).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_delta(model_dir: Path, base_dir: Path, out: Path, note: str = "", atol: float = 0.0) -> list[str]:
    """Write to ``out`` (atomically) the tensors of ``model_dir`` that differ from ``base_dir``'s
    by more than ``atol`` anywhere; returns their names. Both folders must hold the same
    architecture. ``atol`` > 0 drops rounding drift: runs before the EMA fix of 2026-11-27 averaged
    frozen tensors with themselves, which moved them by up to 3e-6."""
    from .train import TRAINING_RECORD  # here, not at the top: loading a backbone never loads the training loop

    model, base = ToyPipeline.from_pretrained(model_dir), ToyPipeline.from_pretrained(base_dir)
    tuned, original = _state(model), _state(base)
    if tuned.keys() != original.keys() or any(tuned[k].shape != original[k].shape for k in tuned):
        raise ValueError(f"{model_dir} and {base_dir} are different architectures: a delta needs the model "
                         "folder a fine-tune started from as --base")
    changed = {k: v.contiguous() for k, v in tuned.items()
               if not torch.equal(v, original[k]) and float((v - original[k]).abs().max()) > atol}
    record = Path(model_dir) / TRAINING_RECORD
    metadata = {"base_fingerprint": weights_fingerprint(base), "base": str(base_dir), "note": note, "atol": str(atol),
                "training": record.read_text() if record.exists() else "{}"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(changed, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return sorted(changed)


def _read_delta(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError, ValueError) as error:
        raise ValueError(f"cannot read the fine-tune delta {path}: {error}. Write it with "
                         "`python -m osa_lib.toy.delta save` (a safetensors file)") from error
    if "base_fingerprint" not in metadata:
        raise ValueError(f"{path} is a safetensors file but not a fine-tune delta (no base fingerprint); "
                         "write it with `python -m osa_lib.toy.delta save`")
    return tensors, metadata


def with_delta(delta: Path, base_dir: Path) -> tuple[ToyPipeline, dict[str, str]]:
    """The pipeline of ``base_dir`` with the tensors of ``delta`` put in, in memory, and the delta's
    metadata (the base's fingerprint, the run's ``training.json``, its note)."""
    tensors, metadata = _read_delta(Path(delta))
    pipe = ToyPipeline.from_pretrained(base_dir)
    if weights_fingerprint(pipe) != metadata["base_fingerprint"]:
        raise ValueError(f"{delta} was trained on top of other weights than {base_dir} (it names "
                         f"{metadata.get('base', '?')!r}); give that folder, at the version the delta was saved from, as --base")
    state = _state(pipe)
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise ValueError(f"{delta} holds tensors {base_dir} lacks: {unknown[:3]}")
    for part in PARTS:
        prefix = part + "."
        own = getattr(pipe, part).state_dict()
        own.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        getattr(pipe, part).load_state_dict(own)
    return pipe, metadata


def apply_delta(delta: Path, base_dir: Path, out: Path, isolation: Path | None = None) -> ToyPipeline:
    """``with_delta(delta, base_dir)`` written to ``out`` (atomically: a temp folder, then a rename)
    with the run's ``training.json``, and with ``isolation`` (an ``isolation.json`` of the switches
    tuned for this fine-tune) when given."""
    from .train import TRAINING_RECORD, swap_in_folder  # here, not at the top: loading a backbone never loads the training loop

    if isolation is not None:
        parse_isolation_defaults(isolation)  # refused before anything is written, as load_backbone would
    pipe, metadata = with_delta(delta, base_dir)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp)
    (tmp / TRAINING_RECORD).write_text(metadata.get("training", "{}"))
    if isolation is not None:
        shutil.copyfile(isolation, tmp / "isolation.json")
    swap_in_folder(tmp, out)
    return pipe


#: The toy backbones ``load_backbone("toy", variant=...)`` knows: the fine-tune put into
#: ``data/toy_model`` (None: the base alone), the switches tuned for it (None: none), and what a
#: reader must know about how it was trained: which method's view, if any, it learned to copy in.
TOY_VARIANTS = {
    "isolation-tuned": (SHIPPED_DELTA, SHIPPED_ISOLATION,
                        "data/toy_model with a fine-tune of its up-block self-attention trained with 80 % of its "
                        "reference pairs in isolated attention's own view (the pixels of each character nearest its "
                        "centre, 8 % of the image, see the other scene's character there, with the w = 4 "
                        "re-weighting): it copies appearance mainly when shown a reference that way, so comparisons "
                        "with other methods on it favour isolated attention"),
    "base": (None, None, "data/toy_model alone, trained on single scenes and never shown a reference: no method "
                         "can carry appearance from scene to scene on it"),
    "neutral": (NEUTRAL_DELTA, None,
                "data/toy_model with a fine-tune of its up-block self-attention trained in no method's view: pairs of "
                "scenes from one story, every reference token visible to every target token, no mask and no "
                "re-weighting; it copies appearance only weakly (data/toy_finetune_neutral/README.md), so it is "
                "not the default"),
}
DEFAULT_TOY_VARIANT = "isolation-tuned"


def load_toy_variant(variant: str = DEFAULT_TOY_VARIANT) -> tuple[ToyPipeline, dict, str]:
    """The toy backbone ``variant`` (``TOY_VARIANTS``): its pipeline, the isolation switches tuned
    for it (``IsolationConfig`` fields; {} when none) and its note."""
    if variant not in TOY_VARIANTS:
        raise ValueError(f"unknown toy variant {variant!r}; choose one of {list(TOY_VARIANTS)}")
    delta, isolation, note = TOY_VARIANTS[variant]
    if delta is None:
        return ToyPipeline.from_pretrained(DEFAULT_MODEL_DIR), {}, note
    missing = [str(p) for p in (delta, isolation) if p is not None and not p.exists()]
    if missing:
        raise FileNotFoundError(f"the toy variant {variant!r} is data/toy_model plus the fine-tune in {delta.parent}, "
                                f"but {', '.join(missing)} is missing. Restore it (`git checkout -- {delta.parent}`), "
                                f"or load the model without the fine-tune: variant='base'.")
    return with_delta(delta, DEFAULT_MODEL_DIR)[0], parse_isolation_defaults(isolation) if isolation else {}, note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="store the tensors a fine-tune changed")
    save.add_argument("model", type=Path, help="the fine-tuned pipeline folder")
    save.add_argument("--base", type=Path, required=True, help="the folder it was fine-tuned from")
    save.add_argument("--out", type=Path, required=True, help="a .safetensors file")
    save.add_argument("--note", default="", help="the recipe, kept in the file's metadata")
    save.add_argument("--atol", type=float, default=0.0,
                      help="treat tensors that moved by at most this much as unchanged (rounding drift)")
    apply = commands.add_parser("apply", help="rebuild a fine-tuned pipeline folder")
    apply.add_argument("delta", type=Path)
    apply.add_argument("--base", type=Path, required=True)
    apply.add_argument("--out", type=Path, required=True)
    apply.add_argument("--isolation", type=Path, default=None,
                       help="an isolation.json of the switches tuned for this fine-tune, copied into --out")
    args = parser.parse_args(argv)
    if args.command == "save":
        names = save_delta(args.model, args.base, args.out, args.note, args.atol)
        print(f"wrote {args.out}: {len(names)} tensors, {args.out.stat().st_size / 1e6:.2f} MB")
    else:
        apply_delta(args.delta, args.base, args.out, args.isolation)
        print(f"wrote {args.out} = {args.base} + {args.delta}")


if __name__ == "__main__":
    main()
