"""The texture stage (`dualsynth.texture`, `dualsynth texture`, `sample --texture`): known answers on tiles made of
flat phases plus white noise, round trips, determinism and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dualsynth.data import ClassInfo, DatasetFolder, DatasetWriter
from dualsynth.errors import InputError
from dualsynth.fidelity import high_frequency_ratio, mean_spectrum
from dualsynth.synthetic import texture_dataset
from dualsynth.texture import TextureModel, add_texture, fit_texture, interior, residual, texture_rng

from .helpers import run_cli

CLASSES = [ClassInfo("matrix", (0, 0, 0)), ClassInfo("a", (255, 0, 0)), ClassInfo("b", (0, 255, 0))]
NOISE = np.array([0.03, 0.06, 0.09])  # white-noise std of each class
LEVELS = np.array([0.35, 0.5, 0.65])  # flat grey level of each class


def phase_tiles(rng: np.random.Generator, n: int, size: int = 64, channels: int = 1):
    """(flat image, noisy image, mask): three bands of phases (stripes, alternately across and down), each a flat
    grey level plus white noise of its class's std (the same noise in every channel)."""
    out = []
    for i in range(n):
        mask = np.zeros((size, size), dtype=np.uint8)
        e = np.sort(rng.choice(np.arange(10, size - 10), 2, replace=False))
        view = mask if i % 2 else mask.T
        view[e[0] :] = 1
        view[e[1] :] = 2
        flat = np.repeat(LEVELS[mask][..., None], channels, -1).astype(np.float32)
        noisy = flat + (rng.standard_normal((size, size)) * NOISE[mask])[..., None]
        out.append((flat, np.clip(noisy, 0, 1).astype(np.float32), mask))
    return out


def write_tiles(path, tiles, which: int, split: str = "train"):
    with DatasetWriter(path, CLASSES) as writer:
        for i, t in enumerate(tiles):
            writer.add(f"t{i}", t[which], t[2], split=split, source=f"s{i}")
    return path


@pytest.fixture(scope="module")
def tiles():
    return phase_tiles(np.random.default_rng(0), 12)


@pytest.fixture(scope="module")
def real(tiles, tmp_path_factory):
    return write_tiles(tmp_path_factory.mktemp("real") / "noisy", tiles, 1)


@pytest.fixture(scope="module")
def model(real):
    return fit_texture(DatasetFolder(real), "train", pool=4)


def test_fitted_class_amplitudes_are_the_white_noise_stds(model):
    assert model.class_std.shape == (3, 1) and model.pool == 4 and model.side == 64
    np.testing.assert_allclose(model.class_std[:, 0], NOISE, rtol=0.1)
    # the residual alone keeps less than the noise (that is what the gain correction undoes)
    assert all(r[0] < s for r, s in zip(model.info["residual_std"].values(), NOISE))
    # the source spectrum of white noise is flat (unit mean), apart from the clamped lowest frequencies
    assert model.spectrum.mean() == pytest.approx(1.0)
    assert np.median(model.spectrum) == pytest.approx(1.0, rel=0.15)


def test_textured_flat_tiles_carry_the_fitted_texture(tiles, model, tmp_path):
    textured = [(None, add_texture(flat, mask, model, texture_rng(3, i)), mask) for i, (flat, _, mask) in enumerate(tiles)]
    refit = fit_texture(DatasetFolder(write_tiles(tmp_path / "textured", textured, 1)))
    np.testing.assert_allclose(refit.class_std[:, 0], NOISE, rtol=0.1)
    # per class, the residual std of the textured tiles is that of the real noisy tiles
    for cls in range(3):
        def rstd(images):
            return np.concatenate([residual(im, 4)[(interior(m, 4) & (m == cls))] for im, m in images]).std()
        real_std = rstd([(t[1], t[2]) for t in tiles])
        assert rstd([(t[1], t[2]) for t in textured]) == pytest.approx(real_std, rel=0.1)


def test_texture_restores_the_high_frequencies_of_a_blurred_copy(tiles, model):
    real = [t[1][..., 0] for t in tiles]
    blurred = [ndimage.gaussian_filter(g, 1.5) for g in real]
    spectrum = mean_spectrum(real)
    assert high_frequency_ratio(spectrum, mean_spectrum(blurred)) < 0.05
    textured = [add_texture(b[..., None], t[2], model, texture_rng(0, i))[..., 0] for i, (b, t) in enumerate(zip(blurred, tiles))]
    assert 0.8 <= high_frequency_ratio(spectrum, mean_spectrum(textured)) <= 1.25
    # the low frequencies stay: each tile's mean grey level moves by less than one noise std / 10
    assert max(abs(a.mean() - b.mean()) for a, b in zip(textured, blurred)) < 0.01


def test_add_texture_is_deterministic_per_seed_and_keeps_range_and_channels(tiles, model):
    flat, _, mask = tiles[0]
    a = add_texture(flat, mask, model, texture_rng(7, 2))
    assert np.array_equal(a, add_texture(flat, mask, model, texture_rng(7, 2)))
    assert not np.array_equal(a, add_texture(flat, mask, model, texture_rng(7, 3)))
    assert not np.array_equal(a, add_texture(flat, mask, model, texture_rng(8, 2)))
    assert a.dtype == np.float32 and a.shape == flat.shape and a.min() >= 0 and a.max() <= 1
    # a tile larger than the fitted side gets the same texture amplitude (the spectrum read at its frequencies)
    big_flat, big_mask = np.full((96, 80, 1), 0.5, np.float32), np.zeros((96, 80), np.uint8)
    big = add_texture(big_flat, big_mask, model, texture_rng(0, 0))
    assert big.shape == (96, 80, 1) and big.std() == pytest.approx(NOISE[0], rel=0.1)
    # keeping the high band adds the texture to the image as it is
    kept = add_texture(tiles[0][1], mask, model, texture_rng(7, 2), replace_high_band=False)
    assert kept.std() > a.std()
    with pytest.raises(ValueError, match="channels"):
        add_texture(np.repeat(flat, 3, -1), mask, model, texture_rng(0, 0))


def test_rgb_texture_of_grey_noise_stays_grey(tmp_path):
    rgb = phase_tiles(np.random.default_rng(1), 8, size=48, channels=3)
    m = fit_texture(DatasetFolder(write_tiles(tmp_path / "rgb", rgb, 1)))
    assert m.channels == 3 and m.channel_correlation > 0.95
    np.testing.assert_allclose(m.class_std, np.repeat(NOISE[:, None], 3, 1), rtol=0.1)
    out = add_texture(rgb[0][0], rgb[0][2], m, texture_rng(0, 0))
    assert np.abs(out[..., 0] - out[..., 2]).max() < 0.02 < out[..., 0].std()


def test_save_load_round_trip(model, tmp_path):
    model.save(tmp_path / "texture.npz")
    meta = json.loads((tmp_path / "texture.json").read_text())
    assert meta["pool"] == 4 and meta["classes"] == ["matrix", "a", "b"] and meta["tiles"] == 12
    back = TextureModel.load(tmp_path / "texture.npz")
    np.testing.assert_allclose(back.spectrum, model.spectrum, rtol=1e-6)
    np.testing.assert_allclose(back.class_std, model.class_std, rtol=1e-6)
    assert (back.pool, back.class_names, back.channel_correlation) == (model.pool, model.class_names, model.channel_correlation)
    flat, _, mask = phase_tiles(np.random.default_rng(2), 1)[0]
    np.testing.assert_allclose(add_texture(flat, mask, back, texture_rng(0, 0)),
                               add_texture(flat, mask, model, texture_rng(0, 0)), atol=1e-5)
    with pytest.raises(InputError, match="texture model not found"):
        TextureModel.load(tmp_path / "missing.npz")


def test_fit_refuses_bad_input(real, tmp_path):
    with pytest.raises(InputError, match="no 'val' tiles"):
        fit_texture(DatasetFolder(real), "val")
    with pytest.raises(InputError, match="pool"):
        fit_texture(DatasetFolder(real), pool=1)


def test_cli_texture_writes_a_textured_dataset(tiles, real, tmp_path, capsys):
    data = write_tiles(tmp_path / "flat", [(t[0], t[0], t[2]) for t in tiles[:4]], 1, split="val")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["texture", "--real", real, "--data", data, "--out", out, "--seed", 1, "--no-progress"], capsys)
    assert code == 0, err
    assert "textured 4 micrographs" in stdout
    folder, source = DatasetFolder(out), DatasetFolder(data)
    assert [r.file for r in folder.records()] == [r.file for r in source.records()]
    assert {r.split for r in folder.records()} == {"val"}
    for rec in folder.records():
        assert np.array_equal(folder.load_mask(rec), source.load_mask(rec))
        assert residual(folder.load_image(rec), 4).std() > residual(source.load_image(rec), 4).std() + 0.02
    assert (out / "texture.npz").is_file() and (out / "grid.png").is_file()
    run = json.loads((out / "texture_run.json").read_text())
    assert run["seed"] == 1 and run["tiles"] == 4 and run["replace_high_band"] is True
    # the same seed gives the same files; tile n's texture depends on (seed, n) only
    again = texture_dataset(real, data, tmp_path / "again", seed=1, progress=False)
    assert again["class_std"] == run["class_std"]
    for rec in folder.records():
        assert (out / "images" / rec.file).read_bytes() == (tmp_path / "again" / "images" / rec.file).read_bytes()
    # bad input: one line, exit 2
    two = tmp_path / "two"
    with DatasetWriter(two, CLASSES[:2]) as writer:
        writer.add("x", np.zeros((32, 32), np.float32), np.zeros((32, 32), np.uint8), split="train", source="x")
    for args, message in ((["--real", two, "--data", data], "2 classes"),
                          (["--real", real, "--data", tmp_path / "missing"], "does not exist"),
                          (["--real", tmp_path / "missing", "--data", data], "does not exist"),
                          (["--real", real, "--data", data], "not empty")):
        code, _, err = run_cli(["texture", *args, "--out", out, "--no-progress"], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    rgb = write_tiles(tmp_path / "rgb", phase_tiles(np.random.default_rng(1), 2, size=32, channels=3), 1)
    code, _, err = run_cli(["texture", "--real", rgb, "--data", data, "--out", tmp_path / "no", "--no-progress"], capsys)
    assert code == 2 and "image channel" in err


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A tiny VQ-VAE + prior trained on flat-phase tiles with noise (a few seconds)."""
    from dualsynth.training.prior import PriorTrainConfig, train_prior
    from dualsynth.training.vqvae import VQVAETrainConfig, train_vqvae

    root = tmp_path_factory.mktemp("gen")
    data = write_tiles(root / "data", phase_tiles(np.random.default_rng(4), 8, size=32), 1)
    vq = VQVAETrainConfig(model=dict(hidden=8, res_hidden=4, res_layers=1, embedding_dim=4, num_embeddings=6,
                                     dead_code_steps=0), tile=16, batch_size=4, steps=10, log_every=5,
                          monitor_every=10, checkpoint_every=10)
    train_vqvae(data, root / "vq", vq, device="cpu", progress=False)
    pc = PriorTrainConfig(arch="gated", gated=dict(hidden=8, num_layers=2, skip=8), crop=4, batch_size=4, steps=5,
                          eval_every=5, checkpoint_every=5)
    train_prior(root / "vq", root / "prior", pc, device="cpu", progress=False)
    return root / "prior", data


def test_cli_sample_with_texture(prior, real, tmp_path, capsys):
    run, data = prior
    args = ["sample", "--prior", run, "--n", "3", "--seed", "2", "--no-progress", "--device", "cpu", "--workers", "1"]
    code, stdout, err = run_cli([*args, "--out", tmp_path / "plain", "--texture", "none"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "plain" / "sample.json").read_text())["texture"] is None
    code, stdout, err = run_cli([*args, "--out", tmp_path / "tex", "--texture", real, "--batch", "2"], capsys)
    assert code == 0, err
    assert "texture fitted on" in stdout
    summary = json.loads((tmp_path / "tex" / "sample.json").read_text())
    assert summary["texture"]["pool"] == 4 and summary["texture"]["replace_high_band"] is True
    model = TextureModel.load(tmp_path / "tex" / "texture.npz")
    plain, tex = DatasetFolder(tmp_path / "plain"), DatasetFolder(tmp_path / "tex")
    for i, rec in enumerate(plain.records()):
        # the same masks; micrograph i is the plain one with texture from (seed, i), whatever the batches
        assert np.array_equal(plain.load_mask(rec), tex.load_mask(rec))
        expected = add_texture(plain.load_image(rec), plain.load_mask(rec), model, texture_rng(2, i))
        assert np.abs(tex.load_image(rec) - expected).max() <= 1 / 255 + 1e-6
    # a single sample drawn alone (index 0) is sample 0 of the set
    code, _, err = run_cli([*args[:4], "1", *args[5:], "--out", tmp_path / "one", "--texture", real], capsys)
    assert code == 0, err
    one = DatasetFolder(tmp_path / "one")
    assert (tmp_path / "one" / "images" / one.records()[0].file).read_bytes() == \
        (tmp_path / "tex" / "images" / tex.records()[0].file).read_bytes()
    # the default (--texture auto) fits on the dataset the VQ-VAE was trained on
    code, stdout, err = run_cli([*args, "--out", tmp_path / "auto"], capsys)
    assert code == 0, err
    code, stdout, err = run_cli([*args, "--out", tmp_path / "explicit", "--texture", data], capsys)
    assert code == 0, err
    auto = DatasetFolder(tmp_path / "auto")
    assert Path(json.loads((tmp_path / "auto" / "sample.json").read_text())["texture"]["real"]) == Path(data).resolve()
    for rec in auto.records():
        assert (tmp_path / "auto" / "images" / rec.file).read_bytes() == (tmp_path / "explicit" / "images" / rec.file).read_bytes()
    # ... and says so in one line when that dataset is gone
    import shutil

    moved = shutil.move(str(data), str(Path(data).with_name("moved")))
    try:
        code, _, err = run_cli([*args, "--out", tmp_path / "gone"], capsys)
        assert code == 2 and "--texture auto" in err and len(err.strip().splitlines()) == 1
    finally:
        shutil.move(moved, str(data))
    # a real set that does not fit: one line, exit 2, nothing written
    rgb = write_tiles(tmp_path / "rgb", phase_tiles(np.random.default_rng(1), 2, size=32, channels=3), 1)
    code, _, err = run_cli([*args, "--out", tmp_path / "no", "--texture", rgb], capsys)
    assert code == 2 and "image channel" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()
