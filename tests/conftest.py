"""Test-wide settings: the tiny models in the tests are fastest on one CPU thread (CI machines have 2 cores)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
