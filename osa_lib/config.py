"""Configuration: every switch of the method and the checks on what a caller passes in.

A leaf (it imports nothing from ``osa_lib``), so that stories, backbones and model folders can
check their inputs without loading the method:
- ``IsolationConfig`` (every switch, the paper's defaults) and ``LAM_RANGE``;
- ``read_isolation_defaults`` / ``parse_isolation_defaults``: a model folder's ``isolation.json``;
- ``check_seed`` / ``check_steps``: seeds and step counts, refused rather than converted;
- ``OVERLAP_RULES``: the accepted values of the overlap switch (``masks.resolve_overlaps``).
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IsolationConfig", "LAM_RANGE", "OVERLAP_RULES", "read_isolation_defaults", "parse_isolation_defaults",
           "check_seed", "check_steps", "SEED_RANGE"]

#: Accepted values of ``rule`` in :func:`masks.resolve_overlaps`; ``"lower_cv"`` is the paper's.
OVERLAP_RULES: tuple[str, ...] = ("lower_cv", "higher_cv", "argmax")

#: Accepted λ. 0 is the unmodified model, 1 the isolated branch alone, the paper's 1.1 pushes a
#: little past it (notebook 05 sweeps 0..2); negative λ only pushes away from isolation. Far outside this range ``λ·F_iso + (1 − λ)·F_ori`` extrapolates so hard that
#: the decoded image clips (λ = 1e6 saturated 40 % of the pixels), so such values are refused.
LAM_RANGE = (0.0, 3.0)


@dataclass
class IsolationConfig:
    """Every switch of the method; defaults are the paper's (docs/method.md).

    Args:
        lam: λ in ``F = λ·F_iso + (1 − λ)·F_ori``; 0 gives the unmodified model exactly.
        reweight: w in ``log(1 + w·Â_m(i))``; 0 turns re-weighting off (the paper's "Re = ×").
        beta: β, the share of the ID-prompt features inside a character's mask.
        warmup: fraction of denoising steps before the isolated branch starts.
        end: fraction of denoising steps after which it stops (the original branch alone, as in
            the warm-up); 1 (default, the paper): it runs to the last step. Not in the paper: a
            model that learned to copy its references only at high noise has never seen them at low
            noise; on one such fine-tune, stopping the branch after the first third of the steps
            won back part of the named-colour attribute accuracy isolation cost (docs/history.md).
            Only the steps in [warmup, end) are stored in the bank.
        isolated_self / isolated_cross: switch each half of the branch for ablations.
        solo_cross: isolated cross-attention also in a scene that introduces one character alone
            (METHOD.md's story loop: it needs no reference, only the ID prompt). False (an
            ablation): that scene runs the original branch alone, so the character's description
            reaches it only through the scene prompt.
        overlap_rule: "lower_cv" (paper), "higher_cv" or "argmax".
        mask_resolution: feature-map height of the up-block layers whose maps make the masks
            (None: the smallest one, ``AttentionStore.mask_resolution``).
        min_fraction / max_fraction: masks outside these pixel fractions are unreliable.
        mask_area_cap: keep at most this fraction of the image's pixels in a character's mask,
            those of highest ``Â_m``; None (default): the whole mask, as the paper. Not in the paper:
            on a small model the early steps' maps are diffuse, Otsu keeps half the image, and
            copying the reference there paints its colour over it, which feeds the next step's map
            (a flood, ``results/history/toy_attn_only_finetune.md``); a cap near the largest share of the
            image a character covers keeps the copying every step in a region of plausible size.
        one_region: keep only the 4-connected region of each mask with the most ``Â_m``
            (``masks.strongest_region``). Not in the paper: a small model's first masks fall apart
            into patches, and copying the reference into each draws the character twice. False
            (default): every region, as the paper.
        bank_step_stride: write a new character's references at every k-th step after warm-up
            only; a later scene reads the nearest stored step (``ReferenceBank.nearest_step``).
            Warm-up steps are never stored: nothing reads them. Default 3, a deviation from the
            paper (which keeps every step) for memory: SDXL at 1024², 50 steps, fp16 needs
            0.77 GB per character at 25 % coverage instead of 2.2 GB, at no measurable cost in
            IIS-toy (+0.41 ± 0.30 points against every step, paired over 24 story seeds,
            ``results/bank_options.md``). 1 keeps every step.
        bank_layer_stride: write references in every k-th up-block self-attention layer only; the
            others run without references for that character. 1 (default): every layer.

    Raises:
        ValueError: when made (and again when a controller uses it) for a value outside its range,
            naming the field, the value, what is accepted and the fix.
    """

    lam: float = 1.1
    reweight: float = 1.0
    beta: float = 1.0
    warmup: float = 0.2
    end: float = 1.0
    isolated_self: bool = True
    isolated_cross: bool = True
    solo_cross: bool = True
    overlap_rule: str = "lower_cv"
    mask_resolution: int | None = None
    min_fraction: float = 0.01
    max_fraction: float = 0.9
    mask_area_cap: float | None = None
    one_region: bool = False
    bank_step_stride: int = 3
    bank_layer_stride: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field; called on construction, ``dataclasses.replace`` and by the controller."""
        def number(name: str, low: float, high: float, low_open=False, high_open=False, fix=""):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
            if not ok:
                accepted = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                raise ValueError(f"IsolationConfig.{name}={value!r} is not accepted: it must be a finite number "
                                 f"in {accepted}. {fix}".strip())

        number("lam", *LAM_RANGE, fix="0 is the unmodified model, the paper uses 1.1.")
        number("reweight", 0.0, math.inf, high_open=True, fix="0 turns re-weighting off, the paper uses 1.")
        number("beta", 0.0, 1.0, fix="It is the share of the ID prompt's features inside a mask.")
        number("warmup", 0.0, 1.0, high_open=True, fix="It is a fraction of the steps; 1 or more would never "
                                                       "isolate (use lam=0 for the unmodified model).")
        number("end", 0.0, 1.0, low_open=True, fix="It is a fraction of the steps; 1 (the paper) runs the "
                                                  "isolated branch to the last step.")
        if self.end <= self.warmup:
            raise ValueError(f"IsolationConfig.end={self.end!r} must be above warmup={self.warmup!r}: the isolated "
                             f"branch runs in the steps between them, so it would never run (use lam=0 for the "
                             f"unmodified model).")
        number("min_fraction", 0.0, 1.0, high_open=True)
        number("max_fraction", 0.0, 1.0, low_open=True)
        if self.mask_area_cap is not None:
            number("mask_area_cap", 0.0, 1.0, low_open=True, fix="None keeps Otsu's mask whole (the paper).")
        if self.min_fraction >= self.max_fraction:
            raise ValueError(f"IsolationConfig.min_fraction={self.min_fraction!r} must be below "
                             f"max_fraction={self.max_fraction!r}; otherwise every mask is refused and the "
                             f"run is silently the unmodified model. Swap or widen them (defaults 0.01, 0.9).")
        if self.overlap_rule not in OVERLAP_RULES:
            raise ValueError(f"IsolationConfig.overlap_rule={self.overlap_rule!r} is unknown; "
                             f"choose one of {list(OVERLAP_RULES)} ('lower_cv' is the paper's).")
        for name in ("isolated_self", "isolated_cross", "solo_cross", "one_region"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"IsolationConfig.{name}={getattr(self, name)!r} must be True or False")
        r = self.mask_resolution
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
            raise ValueError(f"IsolationConfig.mask_resolution={r!r} must be None (the smallest up-block "
                             f"map) or a positive integer feature-map height that the backbone has")
        for name in ("bank_step_stride", "bank_layer_stride"):
            k = getattr(self, name)
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"IsolationConfig.{name}={k!r} must be a positive integer "
                                 f"(1, the default, keeps every {name.split('_')[1]}; k keeps every k-th)")


def read_isolation_defaults(folder: Path) -> dict:
    """The ``IsolationConfig`` fields a model folder's ``isolation.json`` sets (``{"defaults":
    {field: value}, "why": "..."}``; none without the file), checked as ``IsolationConfig`` checks them."""
    path = Path(folder) / "isolation.json"
    return parse_isolation_defaults(path) if path.exists() else {}


def parse_isolation_defaults(path: Path) -> dict:
    """The ``defaults`` of an ``isolation.json`` file, checked as ``IsolationConfig`` checks them."""
    try:
        defaults = json.loads(Path(path).read_text())["defaults"]
        IsolationConfig(**defaults)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a valid isolation defaults file ({type(error).__name__}: {error}). It "
                         f"must read {{\"defaults\": {{<IsolationConfig field>: <value>, ...}}, \"why\": \"...\"}}; "
                         f"fix it, or delete it to use the paper's defaults.") from None
    return dict(defaults)


SEED_RANGE = (0, 2 ** 64)  # what torch.Generator.manual_seed takes without wrapping around


def check_steps(num_inference_steps, default: int) -> int:
    """The number of denoising steps to run: ``default`` for None, else a positive int (not a bool)."""
    if num_inference_steps is None:
        return default
    if not isinstance(num_inference_steps, numbers.Integral) or isinstance(num_inference_steps, bool) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} is not accepted: it must be a positive "
                         f"integer such as {default} (or None for the backbone's default, {default}).")
    return int(num_inference_steps)


def check_seed(seed, where: str = "seed") -> int:
    """A seed as an int in ``SEED_RANGE``; bools, floats and strings are refused, not converted."""
    low, high = SEED_RANGE
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not low <= seed < high:
        raise ValueError(f"{where}={seed!r} is not accepted: a seed is an integer in [0, 2**64), e.g. 7.")
    return int(seed)
