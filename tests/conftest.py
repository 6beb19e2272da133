"""Suite-wide settings.

One torch thread: the tests use tiny models, and on a small machine shared with other jobs
(a training run) several OpenMP threads mostly spin-wait, costing far more CPU time than they
save. Set OSA_TEST_THREADS to use more.

The ``tiny`` fixture is shared by every module that runs the method on SDXL's structure, and
``two_characters`` is the story (as a dict) they draw on it: each character alone, then together.
``load_script`` imports one of ``scripts/*.py`` or ``scripts/research/*.py`` (not a package) by name.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from osa_lib.backbones import load_backbone

torch.set_num_threads(int(os.environ.get("OSA_TEST_THREADS", "1")))


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised tiny SDXL (no download), built afresh for each test module."""
    return load_backbone("sdxl-tiny", device="cpu")


TWO_CHARACTERS = {
    "characters": [{"name": "Lily", "word": "girl", "id_prompt": "a girl with blonde hair"},
                   {"name": "Tom", "word": "boy", "id_prompt": "a boy with black hair"}],
    "scenes": [{"prompt": "a girl reading a book in the park", "characters": ["Lily"], "seed": 1},
               {"prompt": "a boy with a dog on the beach", "characters": ["Tom"], "seed": 2},
               {"prompt": "a girl and a boy in the snow", "characters": ["Lily", "Tom"], "seed": 3}],
}


@pytest.fixture(scope="session")
def two_characters() -> dict:
    """The two-character story as a story-file dict; tests build new dicts from it, never change it."""
    return TWO_CHARACTERS


@pytest.fixture(scope="session")
def load_script():
    """``load_script("tune_isolation")``: a fresh import of ``scripts/tune_isolation.py``, or of
    ``scripts/research/tune_isolation.py`` for research tooling."""
    def load(name: str):
        scripts = Path(__file__).resolve().parents[1] / "scripts"
        path = next(p for p in (scripts / f"{name}.py", scripts / "research" / f"{name}.py") if p.exists())
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
