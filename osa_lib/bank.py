"""The reference bank: keys and values of each character's image tokens, per layer and step.

When a character is drawn for the first time, every up-block self-attention layer stores, at
the stored denoising steps (every 3rd after warm-up by default, ``IsolationConfig.bank_step_stride``),
the keys and values (``K_R``, ``V_R``) of the image tokens inside the character's mask ``M_m``.
Later scenes look the character up by name and attend to them (isolated self-attention). Only
the prompt half of the CFG batch is stored; tokens are kept in the backbone's dtype (fp16 for
SDXL on a GPU) and on the bank's ``device``: the generating device by default, so a story on a
GPU never copies references between host and device
(``Backbone.bank_device``; the CPU when the backbone offloads its models to fit a small card).

A bank knows what drew it (``drawn_with``): a fingerprint of the U-Net's weights
(``weights_fingerprint``: its config and a sample of every up-block self-attention layer's key and
value projections, the weights that made the stored tokens) and the scheduler with its timesteps.
A bank drawn with other weights (a fine-tune, another checkpoint) or another sampling schedule
holds keys and values those weights never produce at those noise levels; it is refused before
the U-Net runs (``check_compatible``), naming both.

On disk: one safetensors file; its metadata carries a JSON header (format version, backbone,
latent size, number of steps, what drew it, characters with their ID prompts and words, a sha256
of the tensor data) so a bank from another backbone, an altered or a damaged file is refused with
a clear error. Writes go to a temporary ``.<name>.tmp`` file that is renamed into place.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .layers import find_attention_layers
from .transfer import concrete_device

__all__ = ["ReferenceBank", "BankError", "BANK_FORMAT_VERSION", "check_name", "estimate_bank_bytes",
           "weights_fingerprint", "drawn_with"]

BANK_FORMAT_VERSION = 3  # 3: the weights' fingerprint and the scheduler; 2: sha256, ID prompts and words
_SAMPLES_PER_TENSOR = 1024  # values of each hashed weight, evenly spaced


def weights_fingerprint(unet) -> str:
    """A short hash of a U-Net's weights: its config and, for every up-block self-attention layer,
    1024 evenly spaced values of its key and value projections (the weights that make a bank's
    tokens), rounded to float16 so the same checkpoint loaded in fp32 or fp16 agrees. Reading a
    few thousand values per layer, it costs milliseconds even for SDXL on a GPU."""
    digest = hashlib.sha256(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    modules = dict(unet.named_modules())
    for layer in find_attention_layers(unet, kind="self", places=("up",)):
        attn = modules[layer.name.rsplit(".processor", 1)[0]]
        for part in ("to_k", "to_v"):
            weight = getattr(attn, part).weight.detach().reshape(-1)  # (out·in,)
            picks = torch.linspace(0, weight.numel() - 1, min(_SAMPLES_PER_TENSOR, weight.numel()),
                                   device=weight.device).long()
            sample = weight.index_select(0, picks).to("cpu", torch.float16)
            digest.update(f"{layer.name}.{part}|{tuple(weight.shape)}|".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def drawn_with(backbone, num_steps: int) -> dict:
    """What a bank drawn on ``backbone`` with ``num_steps`` steps records about its making:
    ``{"weights": {"fingerprint", "source"}, "scheduler": {"name", "timesteps"}}``."""
    info = getattr(backbone, "info", {})
    source = ", ".join(f"{key} {info[key]}" for key in ("model_id", "model_dir", "finetune") if info.get(key))
    scheduler = copy.deepcopy(backbone.scheduler)
    scheduler.set_timesteps(num_steps, device="cpu")
    return {"weights": {"fingerprint": weights_fingerprint(backbone.unet), "source": source or backbone.name},
            "scheduler": {"name": type(scheduler).__name__,
                          "timesteps": [round(float(t), 4) for t in scheduler.timesteps]}}


class BankError(ValueError):
    """A bank that cannot be used here (wrong backbone, wrong steps, damaged file...)."""


def check_name(name) -> str:
    """A character name the bank's keys (``name|i|k``) can hold: a non-empty string without ``|``
    or control characters. Returns it; raises ``BankError`` saying what is wrong."""
    if not isinstance(name, str) or not name.strip():
        raise BankError(f"character name {name!r} must be a non-empty string")
    bad = sorted({c for c in name if c == "|" or unicodedata.category(c) == "Cc"})
    if bad:
        raise BankError(f"character name {name!r} may not contain {bad} (the bank's keys are 'name|i|k'); "
                        f"rename the character, e.g. {''.join(c for c in name if c not in bad)!r}")
    return name


@dataclass
class ReferenceBank:
    """Reference tokens ``R_m`` per character name, per (layer, step), kept on ``device``."""

    backbone: str
    latent_hw: tuple[int, int]
    num_steps: int
    tokens: dict[str, dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    identities: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"id_prompt", "word"}
    device: torch.device = torch.device("cpu")
    #: what drew the tokens (``drawn_with``); None for a bank not drawn by a backbone (not checked)
    drawn: dict | None = None

    def __post_init__(self):
        self.device = concrete_device(self.device)

    def to(self, device) -> "ReferenceBank":
        """Move every stored token to ``device`` (in place); later ``add`` calls store there too."""
        self.device = concrete_device(device)
        self.tokens = {name: {key: (k.to(self.device), v.to(self.device)) for key, (k, v) in entries.items()}
                       for name, entries in self.tokens.items()}
        return self

    def __contains__(self, name: str) -> bool:
        return name in self.tokens

    @property
    def characters(self) -> list[str]:
        return list(self.tokens)

    def add(self, name: str, layer: str, step: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store (n, C) keys and values of one character's tokens at one layer and step (on ``device``)."""
        check_name(name)
        self.tokens.setdefault(name, {})[(layer, int(step))] = (keys.detach().to(self.device),
                                                                values.detach().to(self.device))

    def get(self, name: str, layer: str, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.tokens.get(name, {}).get((layer, int(step)))

    def set_identity(self, name: str, id_prompt: str, word: str) -> None:
        """Record who ``name`` is, so a story continued from this bank can be checked against it."""
        self.identities[check_name(name)] = {"id_prompt": id_prompt, "word": word}

    def check_identity(self, name: str, id_prompt: str, word: str) -> None:
        """Raise ``BankError`` if the bank's ``name`` was drawn from another ID prompt or word."""
        held = self.identities.get(name)
        if held is not None and (held["id_prompt"], held["word"]) != (id_prompt, word):
            raise BankError(f"character {name!r} in the reference bank was drawn as id_prompt {held['id_prompt']!r}, "
                            f"word {held['word']!r}; the story defines id_prompt {id_prompt!r}, word {word!r}. "
                            f"Use the story the bank was made with, rename the character, or start a new bank.")

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

    def check_compatible(self, backbone: str, latent_hw: tuple[int, int], num_steps: int,
                         drawn: dict | None = None) -> None:
        """Raise ``BankError`` if this bank cannot serve a run with these settings.

        Args:
            drawn: the run's ``drawn_with(backbone, num_steps)``; its weights and scheduler are
                compared with the bank's when both are known.
        """
        problems = []
        if backbone != self.backbone:
            problems.append(f"it was made with backbone {self.backbone!r}, this run uses {backbone!r}")
        if tuple(latent_hw) != tuple(self.latent_hw):
            problems.append(f"latent size {tuple(self.latent_hw)} != {tuple(latent_hw)}")
        if num_steps != self.num_steps:
            problems.append(f"it has {self.num_steps} denoising steps, this run uses {num_steps}")
        if drawn is not None and self.drawn is not None:
            ours, theirs = self.drawn["weights"], drawn["weights"]
            if ours["fingerprint"] != theirs["fingerprint"]:
                problems.append(f"it was drawn with other U-Net weights ({ours['source']}, fingerprint "
                                f"{ours['fingerprint']}) than this run's ({theirs['source']}, fingerprint "
                                f"{theirs['fingerprint']})")
            ours, theirs = self.drawn["scheduler"], drawn["scheduler"]
            if ours["name"] != theirs["name"]:
                problems.append(f"it was drawn with the scheduler {ours['name']}, this run uses {theirs['name']}")
            elif ours["timesteps"] != theirs["timesteps"]:
                problems.append(f"its {ours['name']} timesteps {_short(ours['timesteps'])} differ from this run's "
                                f"{_short(theirs['timesteps'])} (another timestep spacing or offset)")
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
        """Write atomically: the data goes to ``.<name>.tmp`` beside ``path``, then is renamed into
        place, so an existing bank is replaced only by a complete file. A failed write removes the
        temporary file; one left by a killed save is removed when the next save starts."""
        from safetensors.torch import save_file
        path = Path(path)
        if not path.parent.is_dir():
            raise BankError(f"cannot save the reference bank to {path}: the folder {path.parent} does not exist. "
                            f"Create it first (mkdir -p {path.parent}) or choose another path.")
        tensors, index = {}, []
        for name, entries in self.tokens.items():
            for i, ((layer, step), (k, v)) in enumerate(sorted(entries.items())):
                tensors[f"{name}|{i}|k"], tensors[f"{name}|{i}|v"] = k.contiguous().cpu(), v.contiguous().cpu()
                index.append([name, i, layer, step])
        header = {"format": "osa-lab reference bank", "version": BANK_FORMAT_VERSION, "backbone": self.backbone,
                  "latent_hw": list(self.latent_hw), "num_steps": self.num_steps, "drawn": self.drawn,
                  "characters": list(self.tokens), "identities": self.identities, "index": index,
                  "sha256": _digest(tensors)}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)  # left behind by a save that was killed
        try:
            save_file(tensors, str(tmp), metadata={"osa_bank": json.dumps(header)})
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. disk full: drop the partial file, keep the old bank
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "ReferenceBank":
        """Read a bank written by :meth:`save` onto ``device``; damaged, altered or foreign files
        raise ``BankError``."""
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
        _check_header(header, tensors, path)
        bank = cls(header["backbone"], tuple(header["latent_hw"]), header["num_steps"],
                   identities={n: dict(i) for n, i in header["identities"].items()}, device=device,
                   drawn=header["drawn"])
        for name, i, layer, step in header["index"]:
            bank.add(name, layer, step, tensors[f"{name}|{i}|k"], tensors[f"{name}|{i}|v"])
        return bank


def _short(values: list) -> str:
    return str(values) if len(values) <= 6 else f"[{values[0]}, {values[1]}, {values[2]}, ..., {values[-1]}]"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_header(header, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Raise ``BankError`` naming the first header field that is missing, mistyped or inconsistent."""
    def fail(message: str):
        raise BankError(f"reference bank {path}: {message}. The file was altered or damaged; "
                        f"regenerate the bank by drawing the characters' first scenes again.")

    if not isinstance(header, dict):
        fail("its header is not a JSON object")
    version = header.get("version")
    if version != BANK_FORMAT_VERSION:
        older = isinstance(version, int) and version < BANK_FORMAT_VERSION
        raise BankError(f"bank {path} has format version {version!r}; this library reads version "
                        f"{BANK_FORMAT_VERSION}" + (" (older files do not say which weights drew them). "
                                                    "Regenerate the bank by drawing the characters' first "
                                                    "scenes again." if older else "."))
    drawn = header.get("drawn")
    if drawn is not None and not (
            isinstance(drawn, dict) and isinstance(drawn.get("weights"), dict) and isinstance(drawn.get("scheduler"), dict)
            and all(isinstance(drawn["weights"].get(k), str) for k in ("fingerprint", "source"))
            and isinstance(drawn["scheduler"].get("name"), str) and isinstance(drawn["scheduler"].get("timesteps"), list)):
        fail(f"header field 'drawn' is {drawn!r}, expected null or {{'weights': {{'fingerprint': str, 'source': str}}, "
             f"'scheduler': {{'name': str, 'timesteps': list}}}}")
    types = {"backbone": str, "latent_hw": list, "num_steps": int, "characters": list, "identities": dict,
             "index": list, "sha256": str}
    for key, kind in types.items():
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            fail(f"header field {key!r} is {header.get(key)!r}, expected a {kind.__name__}")
    if len(header["latent_hw"]) != 2 or not all(isinstance(x, int) and x > 0 for x in header["latent_hw"]):
        fail(f"header field 'latent_hw' is {header['latent_hw']!r}, expected two positive integers")
    if header["num_steps"] < 1:
        fail(f"header field 'num_steps' is {header['num_steps']!r}, expected a positive integer")
    for name, identity in header["identities"].items():
        if not isinstance(identity, dict) or not all(isinstance(identity.get(k), str) for k in ("id_prompt", "word")):
            fail(f"header field 'identities' has {identity!r} for {name!r}, expected {{'id_prompt': str, 'word': str}}")
    for entry in header["index"]:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and isinstance(entry[2], str) and isinstance(entry[3], int)):
            fail(f"header field 'index' has the entry {entry!r}, expected [name, i, layer, step]")
        for part in "kv":
            if f"{entry[0]}|{entry[1]}|{part}" not in tensors:
                fail(f"header names the tensor {entry[0]}|{entry[1]}|{part!r}, which the file does not hold")
    if {e[0] for e in header["index"]} != set(header["characters"]):
        fail(f"header field 'characters' {header['characters']} does not match the stored tokens")
    if _digest(tensors) != header["sha256"]:
        fail("its tensor data does not match the sha256 checksum in its header")


def estimate_bank_bytes(unet, latent_hw: tuple[int, int], num_steps: int, mask_fraction: float,
                        bytes_per_value: int, warmup: float = 0.0, step_stride: int = 1,
                        layer_stride: int = 1) -> int:
    """Bytes one character's references take, from the layer shapes alone.

    Per up-block self-attention layer and stored step: keys and values (2) of the
    ``mask_fraction · h·w`` tokens inside the mask, each ``inner_dim`` values wide. Use
    ``unet = UNet2DConditionModel(**testing.SDXL_UNET_CONFIG)`` built under ``torch.device("meta")``
    to estimate SDXL at 1024² (latent 128×128) without any weights. ``warmup``, ``step_stride``
    and ``layer_stride`` mirror what ``IsolationConfig`` stores (warm-up steps are not stored).
    """
    modules = dict(unet.named_modules())
    total = 0
    for layer in find_attention_layers(unet, kind="self", places=("up",), latent_hw=latent_hw)[::max(1, layer_stride)]:
        attn = modules[layer.name.rsplit(".processor", 1)[0]]
        h, w = layer.resolution(latent_hw)
        total += 2 * int(round(mask_fraction * h * w)) * attn.to_k.out_features * bytes_per_value
    stored_steps = num_steps - math.ceil(warmup * num_steps)
    return total * len(range(0, stored_steps, max(1, step_stride)))
