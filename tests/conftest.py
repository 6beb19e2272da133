"""Suite-wide settings.

One torch thread: the tests use tiny models, and on a small machine shared with other jobs
(a training run) several OpenMP threads mostly spin-wait, costing far more CPU time than they
save. Set OSA_TEST_THREADS to use more.
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("OSA_TEST_THREADS", "1")))
