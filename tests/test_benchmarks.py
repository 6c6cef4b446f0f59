"""The benchmark scripts run (their figures are measured, never asserted): the GPU script on its CPU path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_paper_presets_script_trains_resumes_and_reports_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_paper_presets.py"), "--out", str(tmp_path),
                           "--tiny", "--device", "cpu", "--deterministic"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_paper_presets.json").read_text())
    assert [r["stage"] for r in rows] == ["vqvae", "prior", "unet"]
    for r in rows:
        # on a CPU a stopped-and-resumed run ends with exactly the weights of a straight one
        assert r["max_weight_difference"] == 0.0 and r["rerun_max_weight_difference"] == 0.0
        assert r["items_per_s"] > 0 and r["precision"]
