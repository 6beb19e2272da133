"""Isolated attention keeps its work on the queries' device: no host/device copy and no
synchronisation inside an attention layer's call (issue 14, item 1), checked on the CPU.

Every up-block processor call of a real isolated scene (two returning characters, the toy model)
runs under a watch that fails on
- a synchronising op (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``; ``aten.nonzero``:
  boolean-mask indexing), or a call of ``Tensor.cpu/.tolist/.item/.numpy``;
- a copy to another device (``_to_copy``/``copy_`` whose source and target devices differ);
- a tensor created on a device other than the queries'. The call runs with the default device
  set to "meta", so a tensor made without an explicit device (``torch.zeros(n)``,
  ``torch.tensor(list)``) lands on "meta" and is caught, although query and state are on the CPU.
The per-step work (masks, Â, biases, bank references in, bank writes out) happens in the step
callback, once per step.
"""
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from osa_lib import load_backbone
from osa_lib.isolation import IsolatedCrossAttention, IsolatedSelfAttention, IsolationConfig
from osa_lib.generation import generate_story
from osa_lib.story import parse_story

STEPS = 5
STORY = {"characters": [{"name": "Rosa", "word": "circle", "id_prompt": "a red circle"},
                        {"name": "Tom", "word": "square", "id_prompt": "a blue square"}],
         "scenes": [{"prompt": "a red circle in the meadow", "characters": ["Rosa"], "seed": 1},
                    {"prompt": "a blue square in the snow", "characters": ["Tom"], "seed": 2},
                    {"prompt": "a red circle and a blue square in the meadow", "characters": ["Rosa", "Tom"],
                     "seed": 3}]}
SYNC_OPS = {"_local_scalar_dense", "nonzero", "item"}
HOST_METHODS = ("cpu", "tolist", "item", "numpy")


class _Watch(TorchDispatchMode):
    def __init__(self, device):
        super().__init__()
        self.device, self.problems = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            self.problems.append(f"synchronising op {func}")
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device") or src.device
            if torch.device(dst) != src.device:
                self.problems.append(f"{func} from {src.device} to {dst}")
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.problems.append(f"{func} made a tensor on {t.device}, queries on {self.device}")
        return out


@contextmanager
def _no_host_methods(problems):
    saved = {m: getattr(torch.Tensor, m) for m in HOST_METHODS}

    def forbid(method):
        def wrapped(self, *a, **k):
            problems.append(f"Tensor.{method}() in a layer call")
            return saved[method](self, *a, **k)
        return wrapped
    for m in HOST_METHODS:
        setattr(torch.Tensor, m, forbid(m))
    try:
        yield
    finally:
        for m, f in saved.items():
            setattr(torch.Tensor, m, f)


@pytest.fixture(scope="module")
def toy():
    return load_backbone("toy", device="cpu")


def test_no_copies_or_syncs_inside_isolated_layer_calls(toy, monkeypatch):
    story = parse_story(STORY)
    calls = {"watched": 0, "isolating": 0}
    problems: list[str] = []
    originals = {cls: cls.__call__ for cls in (IsolatedSelfAttention, IsolatedCrossAttention)}

    def watched(cls):
        def call(self, attn, hidden_states, *args, **kwargs):
            if self.ctrl.masks is None:  # step 0: nothing isolated yet, no state to read
                return originals[cls](self, attn, hidden_states, *args, **kwargs)
            calls["watched"] += 1
            calls["isolating"] += self.ctrl.isolating
            watch = _Watch(hidden_states.device)
            with watch, torch.device("meta"), _no_host_methods(problems):
                out = originals[cls](self, attn, hidden_states, *args, **kwargs)
            problems.extend(watch.problems)
            return out
        return call
    for cls in originals:
        monkeypatch.setattr(cls, "__call__", watched(cls))
    result = generate_story(toy, story, "isolated", config=IsolationConfig(warmup=0.2),
                            num_inference_steps=STEPS, progress=False)
    assert calls["watched"] > 0 and calls["isolating"] > 0, "the isolated branch never ran"
    assert not problems, f"{len(problems)} problems, first ones: {sorted(set(problems))[:5]}"
    assert result.bank.characters == ["Rosa", "Tom"]


def test_step_state_built_once_per_step_not_per_layer(toy, monkeypatch):
    """The masks/Â/bias/reference state is built once per step, however many layers read it."""
    from osa_lib import isolation
    built = []
    original = isolation.IsolationController.step_state

    def counting(self, *args, **kwargs):
        before = self.state_builds
        state = original(self, *args, **kwargs)
        if self.state_builds != before:
            built.append((id(self), self.step))
        return state
    monkeypatch.setattr(isolation.IsolationController, "step_state", counting)
    generate_story(toy, parse_story(STORY), "isolated", num_inference_steps=STEPS, progress=False)
    per_step = {}
    for step in built:
        per_step[step] = per_step.get(step, 0) + 1
    assert built and max(per_step.values()) == 1, per_step
