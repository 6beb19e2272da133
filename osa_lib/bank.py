"""The reference bank: keys and values of each character's image tokens, per layer and step.

When a character is drawn for the first time, every up-block self-attention layer stores, at
every denoising step, the keys and values (``K_R``, ``V_R``) of the image tokens inside the
character's mask ``M_m``. Later scenes look the character up by name and attend to them
(isolated self-attention). Only the prompt half of the CFG batch is stored; tokens are kept in
the backbone's dtype (fp16 for SDXL on a GPU).

On disk: one safetensors file; its metadata carries a JSON header (format version, backbone,
latent size, number of steps, characters) so a bank from another backbone or a damaged file is
refused with a clear error. Writes go to a temporary file that is renamed into place.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["ReferenceBank", "BankError", "BANK_FORMAT_VERSION", "estimate_bank_bytes", "SDXL_UNET_CONFIG"]

BANK_FORMAT_VERSION = 1


class BankError(ValueError):
    """A bank that cannot be used here (wrong backbone, wrong steps, damaged file...)."""


@dataclass
class ReferenceBank:
    """Reference tokens ``R_m`` per character name, per (layer, step)."""

    backbone: str
    latent_hw: tuple[int, int]
    num_steps: int
    tokens: dict[str, dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.tokens

    @property
    def characters(self) -> list[str]:
        return list(self.tokens)

    def add(self, name: str, layer: str, step: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store (n, C) keys and values of one character's tokens at one layer and step."""
        if "|" in name:
            raise BankError(f"character name {name!r} may not contain '|'")
        self.tokens.setdefault(name, {})[(layer, int(step))] = (keys.detach().cpu(), values.detach().cpu())

    def get(self, name: str, layer: str, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.tokens.get(name, {}).get((layer, int(step)))

    def nearest_step(self, name: str, step: int) -> int | None:
        """The stored step of ``name`` closest to ``step`` (the earlier one on a tie), or None.

        A bank written with ``IsolationConfig(bank_step_stride=k)`` holds every k-th step only;
        the steps in between reuse the nearest stored one."""
        steps = {s for _, s in self.tokens.get(name, {})}
        if not steps:
            return None
        return min(steps, key=lambda s: (abs(s - int(step)), s))

    def at_step(self, name: str, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (keys, values) of ``name`` at the stored step nearest to ``step``."""
        nearest = self.nearest_step(name, step)
        return {layer: kv for (layer, s), kv in self.tokens.get(name, {}).items() if s == nearest}

    def check_compatible(self, backbone: str, latent_hw: tuple[int, int], num_steps: int) -> None:
        """Raise ``BankError`` if this bank cannot serve a run with these settings."""
        problems = []
        if backbone != self.backbone:
            problems.append(f"it was made with backbone {self.backbone!r}, this run uses {backbone!r}")
        if tuple(latent_hw) != tuple(self.latent_hw):
            problems.append(f"latent size {tuple(self.latent_hw)} != {tuple(latent_hw)}")
        if num_steps != self.num_steps:
            problems.append(f"it has {self.num_steps} denoising steps, this run uses {num_steps}")
        if problems:
            raise BankError("reference bank does not fit this run: " + "; ".join(problems) +
                            ". Regenerate the characters' first scenes with these settings.")

    def nbytes(self, name: str | None = None) -> int:
        """Bytes of stored tokens, for one character or all."""
        names = [name] if name else list(self.tokens)
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for n in names for k, v in self.tokens[n].values())

    # --- disk -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, then rename): an existing bank is replaced only by a
        complete file, and a failed write leaves neither a half-written bank nor a ``.tmp`` behind."""
        from safetensors.torch import save_file
        path = Path(path)
        tensors, index = {}, []
        for name, entries in self.tokens.items():
            for i, ((layer, step), (k, v)) in enumerate(sorted(entries.items())):
                tensors[f"{name}|{i}|k"], tensors[f"{name}|{i}|v"] = k.contiguous(), v.contiguous()
                index.append([name, i, layer, step])
        header = {"format": "osa-lab reference bank", "version": BANK_FORMAT_VERSION, "backbone": self.backbone,
                  "latent_hw": list(self.latent_hw), "num_steps": self.num_steps,
                  "characters": list(self.tokens), "index": index}
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata={"osa_bank": json.dumps(header)})
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. disk full: drop the partial file, keep the old bank
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceBank":
        """Read a bank written by :meth:`save`; damaged or foreign files raise ``BankError``."""
        from safetensors import safe_open
        path = Path(path)
        if not path.exists():
            raise BankError(f"no reference bank at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["osa_bank"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as error:  # noqa: BLE001 - any read failure means the same to the user
            raise BankError(f"cannot read reference bank {path}: {type(error).__name__}: {error}. "
                            f"The file is damaged or not a bank saved by ReferenceBank.save.") from error
        if header.get("version") != BANK_FORMAT_VERSION:
            raise BankError(f"bank {path} has format version {header.get('version')}; "
                            f"this library reads version {BANK_FORMAT_VERSION}")
        bank = cls(header["backbone"], tuple(header["latent_hw"]), int(header["num_steps"]))
        for name, i, layer, step in header["index"]:
            bank.add(name, layer, step, tensors[f"{name}|{i}|k"], tensors[f"{name}|{i}|v"])
        return bank


SDXL_UNET_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (shape-relevant keys)
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)


def estimate_bank_bytes(unet, latent_hw: tuple[int, int], num_steps: int, mask_fraction: float,
                        bytes_per_value: int, warmup: float = 0.0, step_stride: int = 1,
                        layer_stride: int = 1) -> int:
    """Bytes one character's references take, from the layer shapes alone.

    Per up-block self-attention layer and stored step: keys and values (2) of the
    ``mask_fraction · h·w`` tokens inside the mask, each ``inner_dim`` values wide. Use
    ``unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)`` built under ``torch.device("meta")``
    to estimate SDXL at 1024² (latent 128×128) without any weights. ``warmup``, ``step_stride``
    and ``layer_stride`` mirror what ``IsolationConfig`` stores (warm-up steps are not stored).
    """
    from .attention import find_attention_layers
    modules = dict(unet.named_modules())
    total = 0
    for layer in find_attention_layers(unet, kind="self", places=("up",), latent_hw=latent_hw)[::max(1, layer_stride)]:
        attn = modules[layer.name.rsplit(".processor", 1)[0]]
        h, w = layer.resolution(latent_hw)
        total += 2 * int(round(mask_fraction * h * w)) * attn.to_k.out_features * bytes_per_value
    stored_steps = num_steps - math.ceil(warmup * num_steps)
    return total * len(range(0, stored_steps, max(1, step_stride)))
