"""Where the files the project ships live: the models in ``data/`` of a clone, or the copy a wheel carries.

``pip install .`` (not editable) copies ``data/toy_model``, ``data/toy_finetune`` and
``data/sdxl_random`` into the package as ``osa_lib/_data`` (``setup.py``); an editable install
or a clone reads ``data/`` beside ``osa_lib/``. ``DATA_DIR`` is the first of the two that holds
the toy model.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "PACKAGED_DATA_DIR", "CHECKOUT_DATA_DIR"]

PACKAGED_DATA_DIR = Path(__file__).resolve().parent / "_data"  # in an installed wheel
CHECKOUT_DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # in a clone (editable install)
DATA_DIR = PACKAGED_DATA_DIR if (PACKAGED_DATA_DIR / "toy_model" / "model_index.json").exists() else CHECKOUT_DATA_DIR
