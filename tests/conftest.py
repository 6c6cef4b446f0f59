"""Test-wide settings: the tiny models in the tests are fastest on one CPU thread (CI machines have 2 cores)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# `--threads auto` (every command's default) resolves to this count in the tests
os.environ.setdefault("DUALSYNTH_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test, restored afterwards (a command run with --threads must not leak into the next
    test): on a shared 2-core machine a second thread only adds OpenMP spinning, up to 10x in these tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
