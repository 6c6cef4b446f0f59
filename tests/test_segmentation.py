"""U-Net training, evaluation and pre-test: loss falls, synthetic draws, resume, encoder weights, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dualsynth.config import load_config
from dualsynth.data import ClassInfo, DatasetFolder, DatasetWriter
from dualsynth.errors import InputError
from dualsynth.io import read_csv
from dualsynth.segmentation import (
    PRESETS,
    CopyPaste,
    SegTrainConfig,
    build_unet,
    draw_synthetic,
    evaluate,
    load_segmenter,
    tile_batch,
    paper_augmentation,
    predict,
    select_training_data,
    synthetic_count,
    train_segmentation,
    TileCache,
    UNetArchitecture,
    write_evaluation,
)
from tests.helpers import run_cli

CLASSES = [ClassInfo("background", (0, 0, 0)), ClassInfo("square", (255, 0, 0)), ClassInfo("disc", (0, 255, 0))]
# a tiny U-Net: the test data are 32 px tiles of squares and discs
TINY = {"model": {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}, "crop": 24,
        "batch_size": 4, "val_batch_size": 4, "epochs": 2}
TINY_SET = ["--set", "model.encoder_depth=3", "--set", "model.decoder_channels=[16,8,8]", "--set", "crop=24",
            "--set", "batch_size=4"]


def squares_dataset(out, n_train=8, n_val=4, n_test=4, size=32, seed=0, channels=1, classes=CLASSES,
                    origin="real", noise=0.05, split_names=("train", "val", "test")):
    """Bright squares and grey discs on a dark background; the grey level says the class (plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with DatasetWriter(out, classes) as w:
        for split, n in zip(split_names, (n_train, n_val, n_test)):
            for i in range(n):
                mask = np.zeros((size, size), np.uint8)
                y, x = rng.integers(0, size - 12, 2)
                s = int(rng.integers(6, 12))
                mask[y : y + s, x : x + s] = 1
                cy, cx = rng.integers(5, size - 5, 2)
                mask[(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = len(classes) - 1
                image = mask.astype(np.float32) / (len(classes) - 1) * 0.8 + 0.1
                image = np.clip(image + rng.normal(0, noise, mask.shape), 0, 1).astype(np.float32)
                if channels == 3:
                    image = np.stack([image, image * 0.9, image * 0.8], axis=-1)
                w.add(f"{split}{i}", image, mask, split, source=f"{split}{i}", origin=origin)
    return out


def tiny_config(**changes) -> SegTrainConfig:
    return load_config(SegTrainConfig, PRESETS, "quick", overrides={**TINY, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One CLI training run with 50 % synthetic data, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("seg")
    real = squares_dataset(root / "real")
    synth = squares_dataset(root / "synth", n_train=10, n_val=0, n_test=0, seed=9, origin="synthetic")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from dualsynth.cli import main

        with pytest.raises(SystemExit) as exc:
            main(["train-seg", "--train", str(real), "--synthetic", str(synth), "--synthetic-percent", "50",
                  "--out", str(root / "run"), "--epochs", "4", "--seed", "3", "--no-progress", *TINY_SET])
        assert exc.value.code in (0, None)
    finally:
        torch.set_num_threads(before)
    return root


# --- which tiles a run uses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("percent,n_real,expected", [(50, 16, 8), (75, 16, 12), (300, 16, 48), (50, 5, 3),
                                                     (75, 5, 4), (0, 16, 0), (100, 48, 48), (250, 5, 13)])
def test_synthetic_count_rounds_half_up(percent, n_real, expected):
    assert synthetic_count(percent, n_real) == expected


def test_synthetic_draw_is_seeded_nested_and_bounded(tmp_path):
    folder = DatasetFolder(squares_dataset(tmp_path / "s", n_train=20, n_val=0, n_test=0, origin="synthetic"))
    records = folder.records()
    a = [r.file for r in draw_synthetic(records, 10, seed=1)]
    assert a == [r.file for r in draw_synthetic(records, 10, seed=1)]
    assert len(set(a)) == 10
    assert a != [r.file for r in draw_synthetic(records, 10, seed=2)]
    # a smaller percentage's draw is contained in a larger one's (same seed)
    assert [r.file for r in draw_synthetic(records, 4, seed=1)] == a[:4]
    with pytest.raises(InputError, match="only 20"):
        draw_synthetic(records, 21, seed=1)


def test_select_training_data_counts(tmp_path):
    real = squares_dataset(tmp_path / "real", n_train=6)
    synth = squares_dataset(tmp_path / "synth", n_train=12, n_val=0, n_test=0, origin="synthetic")
    data = select_training_data(real, None, synth, synthetic_percent=150, seed=0)
    assert (len(data.real), len(data.synthetic), len(data.val)) == (6, 9, 4)
    assert all(rec.origin == "synthetic" for _, rec in data.synthetic)
    only = select_training_data(None, real, synth, synthetic_only=5, seed=0)
    assert (len(only.real), len(only.synthetic), len(only.val)) == (0, 5, 4)


def test_manifest_lists_exactly_the_files_used(trained):
    manifest = json.loads((trained / "run" / "manifest.json").read_text())["inputs"]
    real = DatasetFolder(trained / "real")
    assert manifest["tiles"] == {"real_train": 8, "synthetic_train": 4, "val": 4}
    assert manifest["real_train_files"] == [str(real.path / "images" / r.file) for r in real.records("train")]
    assert manifest["val_files"] == [str(real.path / "images" / r.file) for r in real.records("val")]
    synth = DatasetFolder(trained / "synth")
    expected = [str(synth.path / "images" / r.file) for r in draw_synthetic(synth.records(), 4, seed=3)]
    assert manifest["synthetic_train_files"] == expected
    assert all(Path(p).is_file() for p in manifest["synthetic_train_files"])


# --- training -----------------------------------------------------------------------------------------------


def test_train_seg_writes_run_and_loss_falls(trained):
    run = trained / "run"
    for name in ("config.yaml", "log.csv", "learning_curve.png", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    rows = read_csv(run / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) >= {"train_loss", "val_loss", "val_accuracy", "val_miou", "val_missing_class_iou", "lr"}
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    scores = [float(r["val_missing_class_iou"]) for r in rows]
    assert best["epoch"] == 1 + int(np.argmax(scores))


def test_resume_equals_uninterrupted(tmp_path):
    real = squares_dataset(tmp_path / "real")
    config = tiny_config(epochs=3, flips=True, augment="paper", crop_foreground=0.5)
    train_segmentation(real, tmp_path / "a", config, progress=False)
    train_segmentation(real, tmp_path / "b", config, progress=False, stop_after=1)
    assert len(read_csv(tmp_path / "b" / "log.csv")) == 1
    summary = train_segmentation(real, tmp_path / "b", config, progress=False, resume=True)
    assert summary["epochs_done"] == 3 and summary["finished"]
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_csv(tmp_path / "a" / "log.csv")) == strip(read_csv(tmp_path / "b" / "log.csv"))


def test_resume_with_a_different_config_is_refused(tmp_path):
    real = squares_dataset(tmp_path / "real")
    train_segmentation(real, tmp_path / "r", tiny_config(epochs=1), progress=False)
    with pytest.raises(InputError, match="different config"):
        train_segmentation(real, tmp_path / "r", tiny_config(epochs=1, lr=0.01), progress=False, resume=True)


def test_early_stopping_and_plateau(tmp_path):
    real = squares_dataset(tmp_path / "real", n_train=4)
    # lr 0 keeps the weights: the score never improves after epoch 1
    config = tiny_config(epochs=10, lr=1e-12, lr_patience=1, early_stop_patience=3, lr_factor=0.5, min_lr=0)
    summary = train_segmentation(real, tmp_path / "r", config, progress=False)
    assert summary["stopped_early"] and summary["epochs_done"] == 4 and summary["best_epoch"] == 1
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "r" / "log.csv")]
    assert lrs == pytest.approx([1e-12, 1e-12, 5e-13, 2.5e-13])


def test_grey_and_rgb_inputs_set_the_unet_channels(tmp_path):
    rgb = squares_dataset(tmp_path / "rgb", channels=3)
    data = select_training_data(rgb, seed=0)
    assert data.in_channels == 3
    model = build_unet(UNetArchitecture(**TINY["model"]), data.in_channels, data.classes)
    assert model.net.encoder.conv1.in_channels == 3
    grey = select_training_data(squares_dataset(tmp_path / "grey"), seed=0)
    assert build_unet(UNetArchitecture(**TINY["model"]), grey.in_channels, grey.classes).net.encoder.conv1.in_channels == 1


@pytest.mark.parametrize("channels", [1, 3])
def test_paper_augmentation_is_seeded_and_keeps_masks(tmp_path, channels):
    folder = DatasetFolder(squares_dataset(tmp_path / "d", channels=channels))
    cache = TileCache([(folder, r) for r in folder.records("train")])
    aug = paper_augmentation(channels)
    x1, y1 = tile_batch(cache, [0, 1, 2], 24, True, aug, seed=0, epoch=1)
    x2, y2 = tile_batch(cache, [0, 1, 2], 24, True, aug, seed=0, epoch=1)
    assert x1.shape == (3, channels, 24, 24) and y1.shape == (3, 24, 24)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    plain, y0 = tile_batch(cache, [0, 1, 2], 24, True, None, seed=0, epoch=1)
    assert torch.equal(y0, y1)  # photometric only: the masks are untouched
    assert not torch.equal(plain, x1)
    assert float(x1.min()) >= 0 and float(x1.max()) <= 1


# --- step mode ----------------------------------------------------------------------------------------------


def adam_updates(run: Path) -> int:
    """Optimizer updates a run took (Adam counts them per parameter)."""
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["optimizers"]["main"]["state"]
    return int(next(iter(state.values()))["step"])


def test_step_mode_takes_exactly_n_updates_whatever_the_set_size(tmp_path):
    config = tiny_config(steps=5, val_every=2)
    for n_train in (4, 12):  # one and three batches per pass
        real = squares_dataset(tmp_path / f"real{n_train}", n_train=n_train)
        summary = train_segmentation(real, tmp_path / f"r{n_train}", config, progress=False)
        assert summary["unit"] == "step" and summary["steps_done"] == 5 and summary["finished"]
        assert adam_updates(tmp_path / f"r{n_train}") == 5
        rows = read_csv(tmp_path / f"r{n_train}" / "log.csv")
        assert [int(r["step"]) for r in rows] == [2, 4, 5]  # every val_every steps, and after the last
        assert "epoch" not in rows[0] and (tmp_path / f"r{n_train}" / "learning_curve.png").is_file()
        best = torch.load(tmp_path / f"r{n_train}" / "checkpoints" / "best.pt", weights_only=False)
        scores = [float(r["val_missing_class_iou"]) for r in rows]
        assert best["step"] == summary["best_step"] == int(rows[int(np.argmax(scores))]["step"])
    # epoch mode, by contrast, takes ceil(n / batch) updates per epoch
    summary = train_segmentation(tmp_path / "real12", tmp_path / "e", tiny_config(epochs=2), progress=False)
    assert summary["epochs_done"] == 2 and adam_updates(tmp_path / "e") == 6


def test_val_every_default_and_early_stop_switch():
    assert tiny_config(steps=25).validation_interval == 2 and tiny_config(steps=5).validation_interval == 1
    assert tiny_config(steps=25, val_every=7).validation_interval == 7
    assert tiny_config().stops_early and not tiny_config(steps=5).stops_early  # auto
    assert tiny_config(steps=5, early_stop=True).stops_early and not tiny_config(early_stop=False).stops_early
    with pytest.raises(InputError, match="val_every"):
        tiny_config(val_every=3)


def test_step_mode_plateau_counts_validations_and_early_stop_is_off_by_default(tmp_path):
    real = squares_dataset(tmp_path / "real", n_train=4)
    # lr ~0 keeps the weights: the score never improves after the first validation
    base = dict(steps=4, val_every=1, lr=1e-12, lr_patience=1, lr_factor=0.5, min_lr=0, early_stop_patience=2)
    summary = train_segmentation(real, tmp_path / "a", tiny_config(**base), progress=False)
    assert summary["steps_done"] == 4 and not summary["stopped_early"] and summary["best_step"] == 1
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "a" / "log.csv")]
    assert lrs == pytest.approx([1e-12, 1e-12, 5e-13, 2.5e-13])
    summary = train_segmentation(real, tmp_path / "b", tiny_config(**base, early_stop=True), progress=False)
    assert summary["stopped_early"] and summary["steps_done"] == 3


def test_step_mode_resume_equals_uninterrupted(tmp_path):
    real = squares_dataset(tmp_path / "real", n_train=6)
    config = tiny_config(steps=5, val_every=2, flips=True, augment="copy_paste", copy_paste_prob=0.7)
    train_segmentation(real, tmp_path / "a", config, progress=False)
    train_segmentation(real, tmp_path / "b", config, progress=False, stop_after=3)  # between two validations
    assert [int(r["step"]) for r in read_csv(tmp_path / "b" / "log.csv")] == [2]
    summary = train_segmentation(real, tmp_path / "b", config, progress=False, resume=True)
    assert summary["steps_done"] == 5 and summary["finished"]
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["train_state"] == b["train_state"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_csv(tmp_path / "a" / "log.csv")) == strip(read_csv(tmp_path / "b" / "log.csv"))


def test_train_seg_cli_step_mode(tmp_path, capsys):
    real = squares_dataset(tmp_path / "real", n_train=4)
    code, out, err = run_cli(["train-seg", "--train", real, "--out", tmp_path / "run", "--set", "steps=3",
                              "--set", "val_every=2", "--augment", "copy_paste", "--no-progress", *TINY_SET], capsys)
    assert code == 0, err
    assert "finished after 3 steps" in out and "step   2" in err
    assert [int(r["step"]) for r in read_csv(tmp_path / "run" / "log.csv")] == [2, 3]
    code, out, err = run_cli(["train-seg", "--train", real, "--out", tmp_path / "run2", "--steps", "2",
                              "--no-progress", *TINY_SET], capsys)
    assert code == 0 and "finished after 2 steps" in out, err


# --- copy-paste augmentation ---------------------------------------------------------------------------------


def copy_paste_tiles(channels: int, size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tile 0: background with a large class-1 square, two small class-2 squares and pixel values that are
    unique (each says where it came from); tile 1: background only, constant image; tile 2: class 1 majority."""
    values = (np.arange(size * size, dtype=np.float32).reshape(size, size) + 1) / (size * size + 1)
    donor_mask = np.zeros((size, size), np.int64)
    donor_mask[2:8, 2:8] = 1
    donor_mask[10:12, 10:12] = 2
    donor_mask[12:14, 2:4] = 2
    plain_mask = np.zeros((size, size), np.int64)
    full_mask = np.ones((size, size), np.int64)
    full_mask[:2, :2] = 0
    tiles = [(values, donor_mask), (np.zeros((size, size), np.float32), plain_mask),
             (np.full((size, size), 0.5, np.float32), full_mask)]
    return [(np.repeat(im[..., None], channels, -1), m) for im, m in tiles]


@pytest.mark.parametrize("channels", [1, 3])
def test_copy_paste_pastes_donor_objects_with_their_labels(channels):
    tiles = copy_paste_tiles(channels)
    cp = CopyPaste(tiles, n_real=3, num_classes=3, prob=1.0)
    # class 2 is a minority of tile 0, class 1 of tile 0, class 0 of tile 2: all three can be pasted
    assert cp.donors == {0: [2], 1: [0], 2: [0]}
    counts = sum(np.bincount(m.ravel(), minlength=3) for _, m in tiles)
    expected = (counts.sum() / counts) / (counts.sum() / counts).sum()
    assert cp.class_p == pytest.approx(expected)
    donor_image, donor_mask = tiles[0]
    where = {round(float(v), 7): (y, x) for (y, x), v in np.ndenumerate(donor_image[..., 0])}
    pasted_classes = []
    for seed in range(100):
        image, mask = tiles[1]
        new_image, new_mask, pasted = cp(1, image, mask, np.random.default_rng(seed))
        assert pasted.any() and new_mask.min() >= 0 and new_mask.max() <= 2
        assert np.array_equal(new_image[~pasted], image[~pasted]) and np.array_equal(new_mask[~pasted], mask[~pasted])
        assert np.array_equal(image, tiles[1][0]) and np.array_equal(mask, tiles[1][1])  # inputs not modified
        if new_image[pasted].max() == 0.5:  # background of tile 2 (class 0 is its minority)
            assert (new_mask[pasted] == 0).all()
            pasted_classes.append(0)
            continue
        assert np.array_equal(new_image[pasted][:, 0], new_image[pasted][:, -1])  # all channels pasted
        targets = np.argwhere(pasted)  # the same row order as new_image[pasted]
        sources = np.array([where[round(float(v), 7)] for v in new_image[pasted][:, 0]])  # donor pixel of each
        labels = donor_mask[sources[:, 0], sources[:, 1]]
        assert np.array_equal(new_mask[pasted], labels) and len(set(labels)) == 1  # one class, with its labels
        assert set(labels) != {0}  # never the donor's majority class
        pasted_classes.append(int(labels[0]))
        # the objects moved rigidly (one flip/rotation and one shift): distances between pasted pixels are kept
        distance = lambda p: ((p[:, None] - p[None]) ** 2).sum(-1)  # noqa: E731
        assert np.array_equal(distance(sources), distance(targets))
    # the rarest class (2: 8 of 768 pixels) is drawn with probability 0.95
    assert 85 <= pasted_classes.count(2) < 100


def test_copy_paste_probability_zero_and_seeded_batches(tmp_path):
    folder = DatasetFolder(squares_dataset(tmp_path / "d", n_train=6))
    cache = TileCache([(folder, r) for r in folder.records("train")])
    plain = tile_batch(cache, [0, 1, 2, 3], 24, True, None, seed=0, epoch=1)
    never = CopyPaste(cache, n_real=6, num_classes=3, prob=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, tile_batch(cache, [0, 1, 2, 3], 24, True, None, 0, 1, never)))
    always = CopyPaste(cache, n_real=6, num_classes=3, prob=1.0)
    x1, y1 = tile_batch(cache, [0, 1, 2, 3], 24, True, None, seed=0, epoch=1, copy_paste=always)
    x2, y2 = tile_batch(cache, [0, 1, 2, 3], 24, True, None, seed=0, epoch=1, copy_paste=always)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(y1, plain[1])  # objects were pasted
    x3, y3 = tile_batch(cache, [0, 1, 2, 3], 24, True, None, seed=0, epoch=2, copy_paste=always)
    assert not torch.equal(y3, y1)
    assert int(y1.min()) >= 0 and int(y1.max()) <= 2


def test_copy_paste_donors_are_real_tiles_only(tmp_path):
    tiles = copy_paste_tiles(1)
    # the tile with class 1 and 2 objects comes last, as a synthetic tile does in a run's cache
    cache = [tiles[1], tiles[2], tiles[0]]
    cp = CopyPaste(cache, n_real=2, num_classes=3, prob=1.0)
    assert cp.donors == {0: [1], 1: [], 2: []} and list(cp.classes) == [0]
    for seed in range(10):
        image, mask, pasted = cp(2, *cache[2], np.random.default_rng(seed))
        assert pasted.any() and (image[pasted] == 0.5).all() and (mask[pasted] == 0).all()
    with pytest.raises(InputError, match="copy_paste"):
        CopyPaste(cache, n_real=0, num_classes=3)


# --- encoder weights ----------------------------------------------------------------------------------------


def test_encoder_weights_from_a_local_file(tmp_path):
    import segmentation_models_pytorch as smp

    arch = UNetArchitecture(**TINY["model"])
    torch.manual_seed(123)
    own = smp.encoders.get_encoder("resnet18", in_channels=1, depth=3, weights=None)
    torch.save(own.state_dict(), tmp_path / "grey.pt")
    model = build_unet(arch, 1, CLASSES, str(tmp_path / "grey.pt"))
    for key, value in own.state_dict().items():
        assert torch.equal(model.net.encoder.state_dict()[key], value), key

    # ImageNet-style 3-channel weights are adapted to grey input as smp adapts its own: summed over channels
    rgb = smp.encoders.get_encoder("resnet18", in_channels=3, depth=3, weights=None)
    torch.save({"state_dict": rgb.state_dict()}, tmp_path / "rgb.pth")
    model = build_unet(arch, 1, CLASSES, str(tmp_path / "rgb.pth"))
    assert torch.equal(model.net.encoder.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.net.encoder.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)


def test_encoder_weights_that_do_not_fit_are_refused(tmp_path):
    import segmentation_models_pytorch as smp

    other = smp.encoders.get_encoder("resnet34", in_channels=1, depth=3, weights=None)
    torch.save(other.state_dict(), tmp_path / "r34.pt")
    with pytest.raises(InputError, match="do not fit"):
        build_unet(UNetArchitecture(**TINY["model"]), 1, CLASSES, str(tmp_path / "r34.pt"))


def test_train_seg_records_encoder_weights_file(tmp_path, capsys):
    import segmentation_models_pytorch as smp

    real = squares_dataset(tmp_path / "real")
    torch.save(smp.encoders.get_encoder("resnet18", in_channels=1, depth=3).state_dict(), tmp_path / "enc.pt")
    code, _, err = run_cli(["train-seg", "--train", real, "--out", tmp_path / "run", "--epochs", "1",
                            "--encoder-weights", tmp_path / "enc.pt", "--no-progress", *TINY_SET], capsys)
    assert code == 0, err
    inputs = json.loads((tmp_path / "run" / "manifest.json").read_text())["inputs"]
    assert inputs["encoder_weights"] == str(tmp_path / "enc.pt") and len(inputs["encoder_weights_sha256"]) == 64


# --- evaluation ---------------------------------------------------------------------------------------------


class GreyLevelModel(torch.nn.Module):
    """A perfect predictor for noise-free squares data: the class is the nearest grey level."""

    def forward(self, x):
        levels = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
        return -(x[:, :1] - levels).abs()


def test_evaluate_scores_a_perfect_predictor_one(tmp_path):
    data = squares_dataset(tmp_path / "d", noise=0.0)
    result = evaluate(GreyLevelModel(), data, "test", keep_examples=2)
    s = result.summary
    assert s["num_images"] == 4
    assert s["pixel_accuracy"] == 1.0 and s["miou"] == 1.0 and s["missing_class_iou"] == 1.0
    assert all(v == 1.0 for v in s["missing_class_iou_per_class"].values())
    paths = write_evaluation(result, tmp_path / "ev", overlays=2)
    rows = read_csv(paths["per_image"])
    assert len(rows) == 4 and all(float(r["missing_class_iou"]) == 1.0 for r in rows)
    assert {"iou_background", "iou_square", "iou_disc"} <= set(rows[0])
    assert [r["class"] for r in read_csv(paths["per_class"])] == ["background", "square", "disc"]
    assert json.loads(paths["summary"].read_text())["missing_class_iou"] == 1.0
    assert len(list((tmp_path / "ev" / "overlays").glob("*.png"))) == 2 and paths["figure"].is_file()


def test_evaluate_scores_a_wrong_predictor_below_one(tmp_path):
    data = squares_dataset(tmp_path / "d", noise=0.0)

    class Background(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, *x.shape[2:])
            out[:, 0] = 1
            return out

    s = evaluate(Background(), data, "test").summary
    assert s["missing_class_iou_per_class"]["square"] == 0.0
    assert 0 < s["missing_class_iou"] < 1 / 3 + 1e-9  # background IoU < 1, the other two present classes 0


def test_predict_any_tile_size(trained):
    model = load_segmenter(trained / "run", "cpu")
    mask = predict(model, np.random.default_rng(0).random((30, 27), dtype=np.float32))
    assert mask.shape == (30, 27) and mask.dtype == np.int64 and mask.max() < 3


def test_evaluate_and_pretest_cli(trained, capsys):
    code, out, err = run_cli(["evaluate", "--model", trained / "run", "--data", trained / "real",
                              "--out", trained / "ev", "--overlays", "2"], capsys)
    assert code == 0, err
    assert "Missing Class IoU" in out
    ev = trained / "ev"
    assert len(read_csv(ev / "per_image.csv")) == 4
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["split"] == "test" and 0 <= summary["missing_class_iou"] <= 1
    assert (ev / "overlays.png").is_file() and len(list((ev / "overlays").glob("*.png"))) == 2

    code, out, err = run_cli(["pretest", "--model", trained / "run", "--synthetic", trained / "synth",
                              "--out", trained / "pt", "--overlays", "2"], capsys)
    assert code == 0, err
    assert (trained / "pt" / "pretest.png").is_file()
    assert len(read_csv(trained / "pt" / "per_image.csv")) == 10  # every synthetic tile
    assert json.loads((trained / "pt" / "summary.json").read_text())["reference"] == "prediction"


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    real = squares_dataset(tmp_path / "real")
    two = squares_dataset(tmp_path / "two", classes=CLASSES[:2], origin="synthetic")
    base = ["train-seg", "--train", real, "--epochs", "1", *TINY_SET]
    cases = [
        (["--synthetic", tmp_path / "missing", "--synthetic-percent", "50", "--out", tmp_path / "o1"], "missing"),
        (["--synthetic", two, "--synthetic-percent", "50", "--out", tmp_path / "o2"], "classes"),
        (["--synthetic-percent", "50", "--out", tmp_path / "o3"], "--synthetic"),
        (["--set", "epoch=3", "--out", tmp_path / "o4"], "unknown config key 'epoch'"),
        (["--synthetic", real, "--synthetic-only", "99", "--out", tmp_path / "o5"], "only 8"),
        (["--encoder-weights", tmp_path / "nope.pt", "--out", tmp_path / "o6"], "nope.pt"),
        (["--set", "val_every=3", "--out", tmp_path / "o7"], "val_every applies in step mode only"),
        (["--synthetic", real, "--synthetic-only", "4", "--val", real, "--set", "augment=copy_paste",
          "--out", tmp_path / "o8"], "copy_paste"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(base + extra, capsys)
        assert code == 2, (extra, err)
        assert err.startswith("error:") and err.count("\n") == 1 and needle in err, err
    code, _, err = run_cli(["evaluate", "--model", tmp_path / "norun", "--data", real, "--out", tmp_path / "e"], capsys)
    assert code == 2 and "not a run folder" in err


def test_config_files_equal_the_presets():
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("quick", "paper"):
        assert load_config(SegTrainConfig, PRESETS, config_file=root / f"seg-{name}.yaml") == \
            load_config(SegTrainConfig, PRESETS, name)


def test_per_image_normalisation_ignores_brightness_and_contrast():
    torch.manual_seed(0)
    model = build_unet(UNetArchitecture(**TINY["model"], normalize="per_image"), 1, CLASSES).eval()
    x = torch.rand(2, 1, 32, 32) * 0.3 + 0.2
    with torch.no_grad():
        a, b = model(x), model(0.5 * x + 0.3)
    assert torch.allclose(a, b, atol=1e-4)


# --- the paper preset and its ImageNet weights --------------------------------------------------------------


def test_paper_preset_is_table_3():
    config = load_config(SegTrainConfig, PRESETS, "paper")
    assert config.model.encoder == "efficientnet-b3" and config.encoder_weights == "imagenet"
    assert (config.batch_size, config.val_batch_size, config.epochs, config.lr) == (2, 1, 200, 1e-3)
    assert config.loss == "dice_focal" and config.monitor == "miou"  # "the IoU score"
    assert (config.lr_patience, config.early_stop_patience, config.crop, config.flips) == (5, 15, None, False)
    assert config.augment == "none" and config.model.normalize == "none"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """Empty Hugging Face and torch caches: nothing may be downloaded, so `imagenet` must come from them."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch"))
    yield tmp_path / "hf"
    torch.hub.set_dir(before)


def test_imagenet_weights_are_read_from_the_local_cache_only(hub_cache, tmp_path):
    import segmentation_models_pytorch as smp
    from safetensors.torch import save_file

    arch = UNetArchitecture(**TINY["model"])
    with pytest.raises(InputError, match="not in the local cache.*hf download smp-hub/resnet18.imagenet"):
        build_unet(arch, 3, CLASSES, "imagenet")
    # lay the file where smp's own download would have put it
    settings = smp.encoders.encoders["resnet18"]["pretrained_settings"]["imagenet"]
    snapshot = hub_cache / "models--smp-hub--resnet18.imagenet" / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    torch.manual_seed(7)
    reference = smp.encoders.get_encoder("resnet18", in_channels=3, depth=5, weights=None)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    rgb = build_unet(arch, 3, CLASSES, "imagenet")
    assert torch.equal(rgb.net.encoder.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    grey = build_unet(arch, 1, CLASSES, "imagenet")  # adapted to grey input as smp adapts its own weights
    assert torch.equal(grey.net.encoder.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))


def test_paper_preset_without_cached_weights_is_one_line_and_writes_nothing(hub_cache, tmp_path, capsys):
    real = squares_dataset(tmp_path / "real")
    code, _, err = run_cli(["train-seg", "--train", real, "--out", tmp_path / "run", "--preset", "paper",
                            "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "ImageNet weights for 'efficientnet-b3'" in err and "hf download" in err
    assert not (tmp_path / "run").exists()


def test_the_paper_augmentation_does_not_touch_the_network():
    # albumentations checks PyPI for a newer version on import unless told not to (seen on a machine without DNS)
    import subprocess
    import sys

    code = ("import os, urllib.request\n"
            "os.environ.pop('NO_ALBUMENTATIONS_UPDATE', None)\n"
            "calls = []\n"
            "def spy(self, *a, **k):\n"
            "    calls.append(a)\n"
            "    raise OSError('network blocked')\n"
            "urllib.request.OpenerDirector.open = spy\n"
            "from dualsynth.segmentation.data import paper_augmentation\n"
            "paper_augmentation(1)\n"
            "import time; time.sleep(0.5)\n"
            "print(len(calls))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.strip() == "0", out.stderr[-800:]


def test_foreground_crops_are_centred_on_minority_pixels_and_off_by_default(tmp_path):
    from dualsynth.segmentation.data import TileCache

    # 64 px tiles, background everywhere but one 4x4 object in a corner: uniform 16 px crops rarely see it
    with DatasetWriter(tmp_path / "d", CLASSES[:2]) as writer:
        for n in range(4):
            mask = np.zeros((64, 64), np.uint8)
            mask[2:6, 55:59] = 1
            writer.add(f"t{n}", np.random.default_rng(n).random((64, 64)).astype(np.float32), mask, "train", f"s{n}")
    folder = DatasetFolder(tmp_path / "d")
    cache = TileCache([(folder, r) for r in folder.records(split="train")])
    assert cache.majority_class(2) == 0
    steps = range(25)
    uniform = [tile_batch(cache, [0, 1, 2, 3], 16, False, None, seed=0, epoch=e)[1] for e in steps]
    always = [tile_batch(cache, [0, 1, 2, 3], 16, False, None, seed=0, epoch=e, foreground=(1.0, 0))[1] for e in steps]
    half = [tile_batch(cache, [0, 1, 2, 3], 16, False, None, seed=0, epoch=e, foreground=(0.5, 0))[1] for e in steps]

    def hit_rate(batches):
        return float(np.mean([bool((m == 1).any()) for b in batches for m in b.numpy()]))

    assert hit_rate(always) == 1.0  # every crop holds the object, centred as far as the tile edge allows
    assert hit_rate(uniform) < 0.2 and 0.3 < hit_rate(half) < 0.8
    # probability 0 is the uniform crop, bit for bit (old runs keep their batches)
    zero = [tile_batch(cache, [0, 1, 2, 3], 16, False, None, seed=0, epoch=e, foreground=(0.0, 0))[1] for e in steps]
    assert all(torch.equal(a, b) for a, b in zip(zero, uniform))


class _Constant(torch.nn.Module):
    """A 'U-Net' that calls every pixel class 0."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.classes, *x.shape[2:])
        logits[:, 0] = 1.0
        return logits + 0 * self.dummy


def test_validation_names_the_trivial_solution_and_train_seg_warns(tmp_path, capsys, monkeypatch):
    from dualsynth.segmentation import training as seg_training
    from dualsynth.segmentation.training import make_loss, validate

    real = squares_dataset(tmp_path / "real")
    folder = DatasetFolder(real)
    cache = TileCache([(folder, r) for r in folder.records(split="val")])
    names = [c.name for c in CLASSES]
    scores = validate(_Constant(3), cache, make_loss("cross_entropy"), 4, torch.device("cpu"), names)
    assert scores["trivial"].startswith("the model predicts 'background' for 100.0 % of the pixels")
    # the warning of the best validation reaches the command line (forced here: a tiny U-Net is rarely trivial)
    monkeypatch.setattr(seg_training, "trivial_prediction", lambda s: "the model predicts 'background' (forced)")
    code, out, err = run_cli(["train-seg", "--train", real, "--out", tmp_path / "run", "--steps", "2", *TINY_SET], capsys)
    assert code == 0, err
    assert "warning: on the validation tiles the model predicts 'background' (forced); try longer training" in out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["best_trivial"] == "the model predicts 'background' (forced)"
