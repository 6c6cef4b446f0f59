"""`dualsynth fidelity`: known answers on small procedural data (two disjoint draws of the demo generator, a
Gaussian-blurred copy, a copy of the training tiles), the measures' own known answers, the CLI and its errors."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dualsynth.data import DatasetFolder, DatasetWriter
from dualsynth.demo_data import write_demo_dataset
from dualsynth.fidelity import (
    TwoPoint,
    fidelity_headline,
    high_frequency_ratio,
    kid,
    mean_spectrum,
    measure_fidelity,
    power_spectrum,
)
from tests.helpers import run_cli

SIZE = 48  # 24 RGB tiles of 48 px per draw: about 10 held-out real tiles, 14 train tiles


def _copy(src: DatasetFolder, out: Path, split: str | None = None, blur: float = 0.0) -> Path:
    """The tiles of `src` (one split, or all) as a synthetic set, images optionally Gaussian-blurred."""
    with DatasetWriter(out, src.classes) as w:
        for rec in src.records(split):
            image = src.load_image(rec)
            if blur:
                image = ndimage.gaussian_filter(image, (blur, blur, 0))
            w.add(rec.file, image, src.load_mask(rec), "train", rec.source, origin="synthetic")
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    write_demo_dataset(root / "a", n=24, size=SIZE, seed=0)
    write_demo_dataset(root / "b", n=24, size=SIZE, seed=1)  # a second, disjoint draw
    real = DatasetFolder(root / "a" / "hq")
    paths = {"root": root, "real": real.path, "draw": root / "b" / "hq",
             "blur": _copy(real, root / "blur", blur=1.5), "copy": _copy(real, root / "copy", split="train")}
    reports = {k: measure_fidelity(paths["real"], paths[k], seed=0).report for k in ("draw", "blur", "copy")}
    return paths, reports


# --- known answers on procedural data -----------------------------------------------------------------------


def test_a_second_draw_scores_as_alike(sets):
    _, reports = sets
    r = reports["draw"]
    assert r["tiles"]["real_reference_is_held_out"] and r["tiles"]["real_reference_splits"] == ["test", "val"]
    assert 0.8 <= r["high_frequency_power_ratio"] <= 1.25
    assert r["intensity"]["mean_wasserstein1"] < 0.015
    assert all(v["wasserstein1"] < 0.03 for v in r["intensity"]["per_class"].values())
    assert r["two_point_correlation"]["mean_abs_difference"] < 0.02
    assert r["phase_fractions"]["max_abs_difference"] < 0.05
    fd = r["feature_distance"]
    assert fd["extractor"] == "texture"
    assert abs(fd["kid"]) < 1.0 and abs(fd["kid"]) < 3 * fd["kid_std"]


def test_a_blurred_copy_loses_high_frequencies_and_is_far_in_feature_space(sets):
    _, reports = sets
    draw, blur = reports["draw"], reports["blur"]
    assert blur["high_frequency_power_ratio"] < 0.5
    assert blur["high_frequency_power_ratio"] < 0.5 * draw["high_frequency_power_ratio"]
    d, b = draw["feature_distance"], blur["feature_distance"]
    # the default extractor separates blur from a fresh draw by more than both spreads, several times over
    assert b["kid"] - d["kid"] > 3 * (b["kid_std"] + d["kid_std"])
    assert blur["intensity"]["mean_wasserstein1"] > draw["intensity"]["mean_wasserstein1"]


def test_copies_of_training_tiles_are_flagged_as_memorised(sets):
    _, reports = sets
    copy, draw = reports["copy"]["memorisation"], reports["draw"]["memorisation"]
    assert copy["near_copy_fraction"] >= 0.95 and copy["synthetic_nearest"]["min"] == pytest.approx(0, abs=1e-6)
    assert copy["threshold"] > 0
    # about 10 reference distances: the 1st percentile is near their minimum, so a fresh draw is flagged at
    # about 1/11 by chance; it must stay there, far from the copy
    assert draw["near_copy_fraction"] <= 0.15
    assert draw["reference_distances"] == reports["draw"]["tiles"]["real_reference"]


def test_real_set_without_held_out_tiles_uses_all_tiles_and_train_against_itself(sets):
    paths, _ = sets
    # the copy set holds only train tiles: reference = all its tiles, memorisation within train
    r = measure_fidelity(paths["copy"], paths["draw"], seed=0, max_tiles=8).report
    assert not r["tiles"]["real_reference_is_held_out"]
    assert r["tiles"]["real_reference"] == r["tiles"]["real_train"] == 8
    assert "other train tile" in r["memorisation"]["reference"]
    assert r["memorisation"]["reference_distances"] == 8


def test_tiles_of_another_size_are_cropped_to_the_common_side(sets):
    paths, _ = sets
    write_demo_dataset(paths["root"] / "small", n=6, size=32, seed=3)
    r = measure_fidelity(paths["real"], paths["root"] / "small" / "hq", seed=0, max_tiles=5).report
    assert r["tiles"]["common_side"] == 32 and r["tiles"]["synthetic"] == 5
    assert len(r["power_spectrum"]["real"]) == 32 // 2 + 1
    assert r["two_point_correlation"]["r"] == list(range(32 // 4 + 1))
    assert len(r["memorisation"]["synthetic_nearest"]["values"]) == 5


# --- the measures' own known answers ------------------------------------------------------------------------


def test_two_point_correlation_of_independent_pixels():
    rng = np.random.default_rng(0)
    tp = TwoPoint(64)
    masks = [rng.random((64, 64)) < 0.3 for _ in range(8)]
    s2 = np.mean([tp(m) for m in masks], axis=0)
    p = np.mean([m.mean() for m in masks])
    assert len(s2) == 17
    assert s2[0] == pytest.approx(p, abs=1e-9)  # S2(0) is the class fraction
    assert np.all(np.abs(s2[1:] - p**2) < 0.01)  # independent pixels: the fraction squared


def test_two_point_correlation_is_not_periodic():
    # class pixels in the first and the last column: periodically they would touch, in the tile they do not
    m = np.zeros((16, 16), bool)
    m[:, 0] = m[:, 15] = True
    tp = TwoPoint(16)
    assert tp(m)[0] == pytest.approx(2 / 16)
    s2 = tp._autocorrelation(m.astype(float)) / tp.pairs  # indexed [dy + rmax, dx + rmax]
    assert s2[tp.rmax, tp.rmax + 1] == pytest.approx(0.0, abs=1e-9)  # offset (0, 1): no wrap-around pairs
    assert s2[tp.rmax + 1, tp.rmax] == pytest.approx(2 / 16)  # offset (1, 0): each column with itself


def test_power_spectrum_of_white_noise_is_flat_and_blur_removes_high_frequencies():
    rng = np.random.default_rng(1)
    noise = [rng.normal(0, 0.1, (64, 64)) for _ in range(16)]
    spec = mean_spectrum(noise)
    assert len(spec) == 33
    assert np.all(np.abs(spec[2:] / 0.01 - 1) < 0.25)  # variance 0.01 at every radius
    assert high_frequency_ratio(spec, spec) == 1.0
    blurred = mean_spectrum([ndimage.gaussian_filter(n, 1.0) for n in noise])
    assert high_frequency_ratio(spec, blurred) < 0.05
    assert power_spectrum(np.full((32, 32), 0.5)).max() == 0  # a flat tile has no power


def test_kid_is_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same, shifted = kid(x, y, seed=0), kid(x, y + 1.0, seed=0)
    assert abs(same["kid"]) < 0.1 and same["subset_size"] == 100
    assert shifted["kid"] > 10 * (same["kid_std"] + abs(same["kid"]))


# --- the command line ---------------------------------------------------------------------------------------


def test_cli_writes_json_markdown_and_figure(sets, capsys, tmp_path):
    paths, _ = sets
    out = tmp_path / "fid"
    code, stdout, err = run_cli(["fidelity", "--real", paths["real"], "--synthetic", paths["draw"], "--out", out,
                                 "--seed", "0", "--threads", "1"], capsys)
    assert code == 0, err
    assert "HF power ratio" in stdout and "KID" in stdout and "fidelity.json" in stdout
    report = json.loads((out / "fidelity.json").read_text())
    for key in ("phase_fractions", "intensity", "high_frequency_power_ratio", "power_spectrum",
                "two_point_correlation", "feature_distance", "memorisation", "pretest", "headline"):
        assert key in report
    assert report["pretest"] is None
    assert len(report["power_spectrum"]["synthetic"]) == SIZE // 2 + 1
    assert set(report["two_point_correlation"]["per_class"]) == set(report["classes"])
    md = (out / "fidelity.md").read_text()
    assert "High-frequency power ratio" in md and "## What the measures mean" in md and "| eta |" in md
    assert md.count("better") >= 6
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    headline = fidelity_headline(report)
    assert 1 <= len(headline.splitlines()) <= 2 and "near-copies" in headline


def test_class_or_channel_mismatch_is_one_line_naming_the_folder(sets, capsys, tmp_path):
    paths, _ = sets
    real = DatasetFolder(paths["real"])
    three = tmp_path / "three_classes"
    with DatasetWriter(three, real.classes[:3]) as w:
        rec = real.records()[0]
        w.add("t", real.load_image(rec), np.minimum(real.load_mask(rec), 2), "train", "t", origin="synthetic")
    write_demo_dataset(tmp_path / "grey", n=3, size=32, seed=5, rgb=False)
    for synthetic, needle in ((three, "classes"), (tmp_path / "grey" / "hq", "channel")):
        out = tmp_path / f"out_{Path(synthetic).name}"
        code, _, err = run_cli(["fidelity", "--real", paths["real"], "--synthetic", synthetic, "--out", out], capsys)
        assert code == 2
        assert err.startswith("error:") and err.count("\n") == 1 and str(synthetic) in err and needle in err, err
        assert not out.exists()
    code, _, err = run_cli(["fidelity", "--real", paths["real"], "--synthetic", tmp_path / "nope",
                            "--out", tmp_path / "o"], capsys)
    assert code == 2 and "nope" in err and err.count("\n") == 1


def test_with_a_model_the_encoder_gives_the_features_and_the_pretest_runs(sets, capsys, tmp_path):
    from dualsynth.config import load_config
    from dualsynth.segmentation import PRESETS, SegTrainConfig, train_segmentation

    paths, _ = sets
    tiny = {"model": {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}, "crop": 32,
            "batch_size": 4, "val_batch_size": 4, "epochs": 1}
    train_segmentation(paths["real"], tmp_path / "unet", load_config(SegTrainConfig, PRESETS, "quick", overrides=tiny),
                       progress=False)
    out = tmp_path / "fid"
    code, stdout, err = run_cli(["fidelity", "--real", paths["real"], "--synthetic", paths["blur"], "--out", out,
                                 "--model", tmp_path / "unet", "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads((out / "fidelity.json").read_text())
    assert report["feature_distance"]["extractor"] == "unet-encoder"
    assert report["feature_distance"]["dimensions"] > 8 and report["feature_distance"]["kid"] is not None
    assert 0 <= report["pretest"]["missing_class_iou"] <= 1 and report["pretest"]["tiles"] == 24
    assert "pre-test Missing Class IoU" in stdout
    # a model whose image channels differ from the real set's is refused with one line naming the run
    write_demo_dataset(tmp_path / "grey", n=3, size=32, seed=5, rgb=False)
    grey = tmp_path / "grey" / "hq"
    code, _, err = run_cli(["fidelity", "--real", grey, "--synthetic", grey, "--out", tmp_path / "o",
                            "--model", tmp_path / "unet", "--device", "cpu"], capsys)
    assert code == 2 and str(tmp_path / "unet") in err and err.count("\n") == 1, err


def test_module_contract_fidelity_imports_only_its_left_and_only_modules_to_its_right_import_it():
    src = Path(__file__).resolve().parents[1] / "src" / "dualsynth"
    allowed = {"data", "metrics", "segmentation", "io", "config", "errors"}
    tree = ast.parse((src / "fidelity.py").read_text())
    used = {n.module.split(".")[1] for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("dualsynth.")}
    assert used <= allowed, used - allowed
    importers = [p.relative_to(src).as_posix() for p in src.rglob("*.py")
                 if p.name != "fidelity.py" and "dualsynth.fidelity" in p.read_text()]
    # to its right: the study (each budget's synthetic set is measured, the report shows it) and the CLI
    assert "cli.py" in importers and all(p == "cli.py" or p.startswith("study/") for p in importers), importers


def test_featureless_tiles_are_not_near_copies_but_shifted_copies_in_brightness_are():
    """Distances compare standardised crops: a flat grey tile with faint noise (raw RMS distance to every real
    tile below the real-to-real distances) is no near-copy; a train tile made brighter and of lower contrast is."""
    from dualsynth.fidelity import memorisation_report

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]

    def tile(i):  # structured tiles of varied contrast: blobs at random places on a mid-grey background
        cy, cx = rng.uniform(4, 28, (2, 3))
        img = 0.5 + rng.uniform(0.05, 0.3) * sum(np.exp(-((yy - a) ** 2 + (xx - b) ** 2) / 6.0) for a, b in zip(cy, cx))
        return (img + rng.normal(0, 0.01, img.shape)).ravel()
    train, held = np.array([tile(i) for i in range(40)]), np.array([tile(i) for i in range(20)])
    flat = train.mean() + rng.normal(0, 0.005, (10, 32 * 32))
    raw_flat = np.sqrt(((flat[:, None] - train[None]) ** 2).mean(-1)).min(1)
    raw_real = np.sqrt(((held[:, None] - train[None]) ** 2).mean(-1)).min(1)
    assert raw_flat.max() < np.percentile(raw_real, 1)  # on raw pixels every flat tile would be a "copy"
    assert memorisation_report(train, held, flat)["near_copy_fraction"] == 0
    constant = np.full((3, 32 * 32), 0.6)  # no structure at all (a constant or fully clipped crop): no copy either
    assert memorisation_report(train, held, constant)["near_copy_fraction"] == 0
    shifted = 0.2 + 0.6 * train[:10]
    assert memorisation_report(train, held, shifted)["near_copy_fraction"] == 1
