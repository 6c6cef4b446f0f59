"""`prepare` on the real NASA SEM datasets in ../shared (skipped where they are absent, as on a user's machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dualsynth.data import DatasetFolder
from dualsynth.io import read_image
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets is not present"),
]


def test_nasa_super_colour_overlays_match_the_upstream_index_masks(tmp_path, capsys):
    src = SHARED / "nasa-super"
    code, out, err = run_cli(
        ["prepare", "--images", src / "images", "--masks", src / "masks", "--classes",
         ROOT / "configs/classes/nasa-super.yaml", "--out", tmp_path / "super"], capsys)
    assert code == 0, err
    ds = DatasetFolder(tmp_path / "super")
    assert ds.class_names == ["matrix", "secondary", "tertiary"]
    assert len(ds.records()) == 23
    for rec in ds.records():
        reference = read_image(src / "masks_index" / f"{Path(rec.source).stem}_mask.png")
        assert np.array_equal(ds.load_mask(rec), reference), rec.source
    # the two 16-bit micrographs stay 16-bit
    assert sum(read_image(ds.image_path(r)).dtype == np.uint16 for r in ds.records()) == 2
    fractions = ds.class_fractions()
    assert 0.40 < fractions[0] < 0.56 and 0.40 < fractions[1] < 0.56 and 0.01 < fractions[2] < 0.05


def test_nasa_ebc_tiles_with_split_file_and_unpaired_masks(tmp_path, capsys):
    src = SHARED / "nasa-ebc"
    args = ["prepare", "--images", src / "images", "--masks", src / "masks", "--classes",
            ROOT / "configs/classes/nasa-ebc.yaml", "--splits", src / "splits.json", "--split-set", "EBC1",
            "--tile", "256", "--out", tmp_path / "ebc"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "mask has no matching image" in err  # two upstream images are missing
    code, out, err = run_cli(args + ["--skip-unpaired"], capsys)
    assert code == 0, err
    ds = DatasetFolder(tmp_path / "ebc")
    assert {s: len(ds.records(s)) for s in ds.splits} == {"train": 16 * 16, "val": 3 * 16, "test": 3 * 16}
    fractions = ds.class_fractions()
    assert 0.75 < fractions[0] < 0.88 and 0.12 < fractions[1] < 0.25 and 0.0 < fractions[2] < 0.01


def test_quick_vqvae_reconstructs_nasa_super_masks(tmp_path, capsys):
    """Issue 3's aim: the quick preset on nasa-super tiles recovers validation masks with accuracy >= 0.90."""
    import json

    src = SHARED / "nasa-super"
    code, _, err = run_cli(
        ["prepare", "--images", src / "images", "--masks", src / "masks", "--classes",
         ROOT / "configs/classes/nasa-super.yaml", "--splits", src / "splits.json", "--split-set", "Super1",
         "--tile", "128", "--out", tmp_path / "super"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["train-vqvae", "--data", tmp_path / "super", "--out", tmp_path / "vq", "--preset", "quick",
                              "--threads", "1", "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "vq" / "report.json").read_text())
    assert report["mask_pixel_accuracy"] >= 0.90
    assert report["codes_in_use"] >= 8
