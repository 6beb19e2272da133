"""Suite-wide settings.

One torch thread: the tests use tiny models, and on a small machine shared with other jobs
(a training run) several OpenMP threads mostly spin-wait, costing far more CPU time than they
save. Set OSA_TEST_THREADS to use more.

The ``tiny`` fixture is shared by every module that runs the method on SDXL's structure.
"""
import os

import pytest
import torch

from osa_lib.backbones import load_backbone

torch.set_num_threads(int(os.environ.get("OSA_TEST_THREADS", "1")))


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised tiny SDXL (no download), built afresh for each test module."""
    return load_backbone("sdxl-tiny", device="cpu")
