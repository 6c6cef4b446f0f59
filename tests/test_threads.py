"""The `--threads auto` policy, its override, and mixed precision by device."""

from __future__ import annotations

import pytest
import torch

from dualsynth import config
from dualsynth.config import amp_dtype, apply_threads, auto_threads, busy_cores, parse_threads, usable_cores
from dualsynth.errors import InputError
from tests.helpers import run_cli


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv("DUALSYNTH_THREADS", raising=False)


@pytest.mark.parametrize("cores,busy,workers,expected", [
    (2, 0.0, 1, 2),    # a quiet 2-core machine: both cores
    (2, 0.3, 1, 2),    # a little background work does not cost a thread
    (2, 1.0, 1, 1),    # one core busy with other work
    (2, 2.5, 1, 1),    # all busy: one thread, never zero
    (2, 0.0, 2, 1),    # two workers share the two cores
    (16, 3.0, 2, 6),   # 13 free cores for 2 workers
    (1, 0.0, 4, 1),
])
def test_auto_threads_gives_the_free_cores_to_the_workers(no_override, cores, busy, workers, expected):
    assert auto_threads(workers, cores=cores, busy=busy) == expected


def test_environment_variable_fixes_the_count(monkeypatch):
    monkeypatch.setenv("DUALSYNTH_THREADS", "3")
    assert auto_threads(cores=16, busy=0) == 3
    assert apply_threads("auto") == 3 and torch.get_num_threads() == 3
    assert apply_threads(2) == 2 and torch.get_num_threads() == 2   # an explicit count wins
    monkeypatch.setenv("DUALSYNTH_THREADS", "auto")
    assert auto_threads(cores=4, busy=0) == 4


def test_machine_readings_are_sane(no_override):
    assert usable_cores() >= 1
    assert 0 <= busy_cores(interval=0.05) <= (__import__("os").cpu_count() or 1) + 1e-6
    assert 1 <= auto_threads() <= usable_cores()


def test_parse_threads():
    assert parse_threads("auto") is None and parse_threads(None) is None and parse_threads("AUTO") is None
    assert parse_threads("4") == 4 and parse_threads(2) == 2
    for bad in ("0", "-1", "many", "1.5"):
        with pytest.raises(InputError):
            parse_threads(bad)


def test_bad_threads_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["train-vqvae", "--data", tmp_path, "--out", tmp_path / "run", "--threads", "lots"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--threads" in err and "lots" in err


def test_mixed_precision_by_device_and_setting(monkeypatch):
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "fp32", training=True) is None
    assert amp_dtype(cpu, "bf16", training=True) == torch.bfloat16
    assert amp_dtype(cpu, "bf16", training=False) is None          # inference on a CPU stays fp32
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: True)
    assert amp_dtype(cpu, "auto", training=True) == torch.bfloat16
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: False)
    assert amp_dtype(cpu, "auto", training=True) is None             # emulated bf16 would be slower
