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


@pytest.mark.parametrize("shape,dtype", [((5, 7), np.uint8), ((5, 7), np.uint16), ((5, 7, 3), np.uint8),
                                         ((5, 7, 3), np.uint16), ((5, 7, 4), np.uint16)])
def test_png_round_trip_keeps_values_and_depth(tmp_path, shape, dtype):
    from dualsynth.io import read_image, save_png

    array = (np.random.default_rng(1).random(shape) * np.iinfo(dtype).max).astype(dtype)
    save_png(tmp_path / "a.png", array)
    back = read_image(tmp_path / "a.png")
    assert back.dtype == dtype and np.array_equal(back, array)


def test_prepare_keeps_16_bit_rgb_micrographs(tmp_path):
    import tifffile

    from dualsynth.data import DatasetFolder, PrepareOptions, prepare
    from dualsynth.io import read_image, save_png

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        image = (rng.random((16, 16, 3)) * 65535).astype(np.uint16)
        tifffile.imwrite(tmp_path / "images" / f"m{i}.tif", image)
        save_png(tmp_path / "masks" / f"m{i}.png", (rng.random((16, 16)) > 0.5).astype(np.uint8))
    prepare(PrepareOptions(images=tmp_path / "images", masks=tmp_path / "masks", out=tmp_path / "data",
                           intensity_range="full", val_fraction=0.0, test_fraction=0.0), progress=False)
    folder = DatasetFolder(tmp_path / "data")
    rec = folder.records()[0]
    stored = read_image(folder.image_path(rec))
    assert stored.dtype == np.uint16 and stored.shape == (16, 16, 3)
    assert np.array_equal(stored, tifffile.imread(tmp_path / "images" / rec.source))
    assert folder.image_channels == 3
