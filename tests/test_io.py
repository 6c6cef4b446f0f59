"""Atomic writes and strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualsynth.io import atomic_path, write_json


def test_atomic_path_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_write_json_is_strict_json(tmp_path):
    write_json(tmp_path / "s.json", {"iou": [1.0, float("nan")], "x": np.float32(np.inf), "n": np.int64(3)})
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"iou": [1.0, None], "x": None, "n": 3}
