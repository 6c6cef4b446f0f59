"""The command line: help, and one-line errors with exit code 2 on bad input to `prepare`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualsynth.cli import cli
from tests.helpers import run_cli


def _pair(folder: Path, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{stem}.png")
    Image.fromarray(mask).save(folder / f"{stem}_mask.png")


def _good(folder: Path, n: int = 3) -> Path:
    for i in range(n):
        _pair(folder, f"im{i}", np.full((16, 16), 100, np.uint8), np.eye(16, dtype=np.uint8))
    return folder


def test_help_lists_every_command_and_each_has_help(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for name in cli.commands:
        assert name in out
        code, sub, _ = run_cli([name, "--help"], capsys)
        assert code == 0 and "Usage: dualsynth" in sub


def test_prepare_writes_a_dataset(tmp_path, capsys):
    code, out, err = run_cli(["prepare", "--images", str(_good(tmp_path / "in")), "--out", str(tmp_path / "ds")], capsys)
    assert code == 0, err
    assert "wrote 3 tiles" in out
    assert (tmp_path / "ds" / "manifest.csv").is_file()


def test_prepare_says_in_one_line_how_grey_masks_became_classes(tmp_path, capsys):
    src = tmp_path / "in"
    for i, values in enumerate([(0, 128, 255), (255, 0)]):
        mask = np.zeros((32, 32), np.uint8)
        for k, v in enumerate(values):
            mask[:, k * 32 // len(values):] = v
        _pair(src, f"im{i}", np.full((32, 32), 90, np.uint8), mask)
    code, out, err = run_cli(["prepare", "--images", src, "--out", tmp_path / "ds"], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if "grey values" in line]
    assert lines == [f"  masks hold grey values 0, 128, 255: mapped to classes 0..2 (written to {tmp_path / 'ds' / 'classes.yaml'})"]
    assert "value: 128" in (tmp_path / "ds" / "classes.yaml").read_text()
    # the dataset's index masks still score against its own classes.yaml, as the README shows
    masks = tmp_path / "ds" / "masks"
    code, out, err = run_cli(["evaluate-masks", "--pred", masks, "--truth", masks, "--classes", tmp_path / "ds" / "classes.yaml",
                              "--out", tmp_path / "scores"], capsys)
    assert code == 0, err
    assert "pixel accuracy       100.0 %" in out


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "case",
    ["missing_mask", "size_mismatch", "unknown_colour", "value_too_big", "corrupt", "empty_file", "empty_folder",
     "tile_too_big", "classes_typo", "misspelled_option", "missing_folder", "too_many_grey_values"],
)
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path, capsys):
    src = tmp_path / "in"
    args = ["prepare", "--images", str(src), "--out", str(tmp_path / "ds")]
    needles: tuple[str, ...]
    if case == "missing_mask":
        _good(src)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(src / "lonely.png")
        needles = ("lonely.png", "no mask")
    elif case == "size_mismatch":
        _pair(src, "a", np.zeros((16, 16), np.uint8), np.zeros((8, 16), np.uint8))
        needles = ("a_mask.png", "differs from image size")
    elif case == "unknown_colour":
        rgb = np.zeros((16, 16, 3), np.uint8)
        rgb[3, 4] = (9, 99, 199)
        _pair(src, "a", np.zeros((16, 16), np.uint8), rgb)
        (tmp_path / "classes.yaml").write_text("classes:\n  - {name: m, color: [0, 0, 0]}\n  - {name: p, color: [255, 0, 0]}\n")
        args += ["--classes", str(tmp_path / "classes.yaml")]
        needles = ("a_mask.png", "(9, 99, 199)", "not in classes.yaml")
    elif case == "value_too_big":
        _pair(src, "a", np.zeros((16, 16), np.uint8), np.full((16, 16), 5, np.uint8))
        args += ["--num-classes", "3"]
        needles = ("a_mask.png", "mask value 5 >= number of classes 3")
    elif case == "corrupt":
        _good(src, 1)
        (src / "im0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        needles = ("im0.png", "cannot read image")
    elif case == "empty_file":
        _good(src, 1)
        (src / "im0_mask.png").write_bytes(b"")
        needles = ("im0_mask.png", "empty file")
    elif case == "empty_folder":
        src.mkdir()
        needles = (str(src), "no images found")
    elif case == "tile_too_big":
        _good(src, 1)
        args += ["--tile", "64"]
        needles = ("im0.png", "tile 64 px is larger than the image")
    elif case == "classes_typo":
        _good(src, 1)
        (tmp_path / "classes.yaml").write_text("classes:\n  - {name: m, colour: [0, 0, 0]}\n  - {name: p}\n")
        args += ["--classes", str(tmp_path / "classes.yaml")]
        needles = ("classes.yaml", "unknown key 'colour'")
    elif case == "misspelled_option":
        _good(src, 1)
        args += ["--tiel", "8"]
        needles = ("--tiel",)
    elif case == "too_many_grey_values":
        _good(src, 1)
        _pair(src, "a", np.zeros((16, 16), np.uint8), np.arange(256, dtype=np.uint8).reshape(16, 16))
        needles = ("a_mask.png", "more than 32 distinct grey values", "not index masks", "classes.yaml")
    else:  # missing_folder
        needles = (str(src), "not found")
    code, _, err = run_cli(args, capsys)
    _assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "ds").exists()  # nothing half-written
