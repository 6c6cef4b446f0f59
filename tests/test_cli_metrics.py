"""`dualsynth evaluate-masks` and `dualsynth clean-masks`: outputs on good input, one-line errors on bad."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dualsynth.cli import cli
from tests.helpers import run_cli

CLASSES_YAML = """classes:
  - {name: background, color: [0, 0, 0]}
  - {name: yellow, color: [255, 255, 0]}
  - {name: blue, color: [0, 0, 255]}
  - {name: green, color: [0, 255, 0]}
"""


def figure14():
    truth = np.zeros((6, 6), dtype=np.uint8)
    truth[0, 5] = 1
    truth[3, 2] = 2
    pred = truth.copy()
    pred[3, 3] = 2
    pred[5, 0] = 3
    return pred, truth


def _eval_folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    pred_dir.mkdir()
    truth_dir.mkdir()
    pred, truth = figure14()
    Image.fromarray(pred).save(pred_dir / "a.png")
    Image.fromarray(truth).save(truth_dir / "a_mask.png")  # a _mask suffix still pairs with "a"
    Image.fromarray(truth).save(pred_dir / "b.png")
    Image.fromarray(truth).save(truth_dir / "b.png")
    classes = tmp_path / "classes.yaml"
    classes.write_text(CLASSES_YAML)
    return pred_dir, truth_dir, classes


def test_evaluate_masks_writes_csv_and_json(tmp_path, capsys):
    pred_dir, truth_dir, classes = _eval_folders(tmp_path)
    out = tmp_path / "scores"
    code, stdout, err = run_cli(["evaluate-masks", "--pred", pred_dir, "--truth", truth_dir, "--classes", classes,
                                 "--out", out], capsys)
    assert code == 0, err
    fig14 = (1 + 1 / 2 + 32 / 34) / 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 2
    assert summary["missing_class_iou"] == pytest.approx((fig14 + 1.0) / 2)
    assert summary["missing_class_iou_per_class"]["green"] is None  # in no image's truth
    assert summary["missing_class_iou_per_class"]["blue"] == pytest.approx((0.5 + 1.0) / 2)
    assert summary["iou_per_class"]["green"] == 0.0
    with open(out / "per_image.csv", newline="") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"a", "b"}
    assert float(rows["a"]["missing_class_iou"]) == pytest.approx(fig14, rel=1e-5)
    assert rows["a"]["iou_green"] == "" and rows["a"]["truth"] == "a_mask.png"
    assert "Missing Class IoU" in stdout and "green" in stdout
    # a second run refuses to overwrite, and replaces with --overwrite
    code, _, err = run_cli(["evaluate-masks", "--pred", pred_dir, "--truth", truth_dir, "--classes", classes,
                            "--out", out], capsys)
    assert code == 2 and "--overwrite" in err
    code, _, _ = run_cli(["evaluate-masks", "--pred", pred_dir, "--truth", truth_dir, "--num-classes", 4,
                          "--out", out, "--overwrite"], capsys)
    assert code == 0


def test_evaluate_masks_through_click_runner(tmp_path):
    pred_dir, truth_dir, classes = _eval_folders(tmp_path)
    result = CliRunner().invoke(cli, ["evaluate-masks", "--pred", str(pred_dir), "--truth", str(truth_dir),
                                      "--classes", str(classes), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "pixel accuracy" in result.output


@pytest.mark.parametrize("problem", ["unpaired-pred", "unpaired-truth", "size", "value", "corrupt", "empty"])
def test_evaluate_masks_bad_input(tmp_path, capsys, problem):
    pred_dir, truth_dir, classes = _eval_folders(tmp_path)
    expected_file = {
        "unpaired-pred": pred_dir / "c.png", "unpaired-truth": truth_dir / "c.png", "size": pred_dir / "b.png",
        "value": pred_dir / "b.png", "corrupt": truth_dir / "b.png", "empty": pred_dir,
    }[problem]
    if problem.startswith("unpaired"):
        Image.fromarray(np.zeros((6, 6), np.uint8)).save(expected_file)
    elif problem == "size":
        Image.fromarray(np.zeros((5, 6), np.uint8)).save(expected_file)
    elif problem == "value":
        Image.fromarray(np.full((6, 6), 4, np.uint8)).save(expected_file)
    elif problem == "corrupt":
        expected_file.write_bytes(b"not a png")
    else:
        for p in pred_dir.iterdir():
            p.unlink()
    out = tmp_path / "scores"
    code, _, err = run_cli(["evaluate-masks", "--pred", pred_dir, "--truth", truth_dir, "--classes", classes,
                            "--out", out], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(expected_file) in err
    assert not out.exists()  # nothing half-written


def test_evaluate_masks_needs_classes_or_count(tmp_path, capsys):
    pred_dir, truth_dir, _ = _eval_folders(tmp_path)
    code, _, err = run_cli(["evaluate-masks", "--pred", pred_dir, "--truth", truth_dir, "--out", tmp_path / "o"],
                           capsys)
    assert code == 2 and "--classes" in err and err.count("\n") == 1


def _decoded(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Two decoded 8- and 16-bit levels masks (3 classes) with a small island and in-between values."""
    folder = tmp_path / "raw"
    folder.mkdir()
    truth = np.zeros((32, 32), dtype=np.uint8)
    truth[:, 16:] = 2
    truth[20:, :10] = 1
    rng = np.random.default_rng(0)
    levels = np.clip(truth / 2 + rng.normal(0, 0.03, truth.shape), 0, 1)
    levels[4:6, 4:6] = 0.55  # 4 px island of class 1 in class 0
    Image.fromarray((levels * 255).round().astype(np.uint8)).save(folder / "t8.png")
    Image.fromarray((levels * 65535).round().astype(np.uint16)).save(folder / "t16.png")
    return folder, truth


def test_clean_masks_writes_index_pngs(tmp_path, capsys):
    folder, truth = _decoded(tmp_path)
    out = tmp_path / "clean"
    code, stdout, err = run_cli(["clean-masks", "--in", folder, "--out", out, "--num-classes", 3,
                                 "--min-object-area", 10], capsys)
    assert code == 0, err
    for name in ("t8.png", "t16.png"):
        mask = np.asarray(Image.open(out / name))
        assert mask.dtype == np.uint8 and np.array_equal(mask, truth)
    assert "cleaned 2 masks" in stdout and "changed" in stdout
    code, _, err = run_cli(["clean-masks", "--in", folder, "--out", out, "--num-classes", 3], capsys)
    assert code == 2 and "--overwrite" in err


@pytest.mark.parametrize("problem", ["rgb", "corrupt", "classes"])
def test_clean_masks_bad_input(tmp_path, capsys, problem):
    folder, _ = _decoded(tmp_path)
    bad = folder / "t8.png"
    args = ["clean-masks", "--in", folder, "--out", tmp_path / "clean", "--num-classes", 3]
    if problem == "rgb":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(bad)
    elif problem == "corrupt":
        bad.write_bytes(b"\x89PNG broken")
    else:
        args[-1] = 1
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    if problem != "classes":
        assert str(bad) in err
    assert not (tmp_path / "clean").exists()


def test_clean_masks_warns_on_index_masks(tmp_path, capsys):
    folder = tmp_path / "idx"
    folder.mkdir()
    Image.fromarray(np.eye(8, dtype=np.uint8) * 2).save(folder / "m.png")  # class indices, not grey levels
    code, _, err = run_cli(["clean-masks", "--in", folder, "--out", tmp_path / "o", "--num-classes", 3], capsys)
    assert code == 0 and "look like class indices" in err and str(folder / "m.png") in err
