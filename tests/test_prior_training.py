"""Prior training runs, `sample` and `inspect`, on a tiny dataset with a tiny VQ-VAE."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dualsynth.config import load_config
from dualsynth.data import ClassInfo, DatasetFolder, DatasetWriter
from dualsynth.errors import InputError
from dualsynth.io import read_csv, read_image
from dualsynth.engine import scheduled_lr
from dualsynth.synthetic import (
    inspect_synthetic,
    parse_phase_fractions,
    raw_mask_classes,
    raw_mask_png,
    sample_dataset,
)
from dualsynth.training.prior import (
    PRESETS,
    PriorTrainConfig,
    cell_fractions,
    code_batch,
    load_prior,
    train_prior,
)
from dualsynth.training.vqvae import VQVAETrainConfig, encode_dataset, train_vqvae

from .helpers import run_cli


def _lr(config, step):
    return scheduled_lr(config.lr, config.lr_schedule, step, config.steps)



CLASSES = [ClassInfo("matrix", (0, 0, 0)), ClassInfo("a", (255, 0, 0)), ClassInfo("b", (0, 255, 0))]


def stripe_tile(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal layers of the three phases (a layered microstructure), grey level by phase, plus noise."""
    mask = np.zeros((size, size), dtype=np.uint8)
    edges = np.sort(rng.integers(2, size - 2, 2))
    mask[edges[0] :] = 1
    mask[edges[1] :] = 2
    image = np.array([0.2, 0.55, 0.9], dtype=np.float32)[mask] + rng.normal(0, 0.02, (size, size))
    return np.clip(image, 0, 1).astype(np.float32), mask


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "layers"
    rng = np.random.default_rng(0)
    with DatasetWriter(out, CLASSES) as writer:
        for i in range(10):
            image, mask = stripe_tile(rng, 32)
            writer.add(f"t{i}", image, mask, split="val" if i >= 8 else "train", source=f"s{i}")
    return out


@pytest.fixture(scope="module")
def vqvae(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "vq"
    config = VQVAETrainConfig(
        model=dict(hidden=8, res_hidden=4, res_layers=1, embedding_dim=4, num_embeddings=6, dead_code_steps=0),
        tile=16, batch_size=4, steps=30, lr=3e-3, log_every=10, monitor_every=30, checkpoint_every=30,
    )
    train_vqvae(dataset, run, config, device="cpu", progress=False)
    return run


def tiny(**kw) -> PriorTrainConfig:
    base = dict(
        arch="gated", gated=dict(hidden=8, num_layers=3, skip=8), pixelcnn=dict(hidden=8, num_residual_blocks=1, num_output_layers=1),
        crop=4, batch_size=4, steps=20, lr=3e-3, eval_every=5, checkpoint_every=5,
    )
    base.update(kw)
    return PriorTrainConfig(**base)


@pytest.fixture(scope="module")
def prior(vqvae, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "prior"
    summary = train_prior(vqvae, run, tiny(condition="phase-fractions", steps=40, crop=None, lr=1e-2), device="cpu", progress=False)
    return run, summary


def test_presets_validate():
    for name, preset in PRESETS.items():
        config = PriorTrainConfig(**preset)
        assert config.steps > 0, name
    # the paper preset's PixelCNN is the keras example's network
    assert PriorTrainConfig(**PRESETS["paper"]).pixelcnn.model_dump() == {
        "hidden": 128, "num_residual_blocks": 2, "num_output_layers": 2, "first_kernel": 7, "kernel": 3,
    }


@pytest.mark.parametrize("name", ["quick", "paper"])
def test_config_files_spell_out_their_presets(name):
    from pathlib import Path

    from dualsynth.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"prior-{name}.yaml"
    from_file = load_config(PriorTrainConfig, PRESETS, None, path)
    assert from_file == PriorTrainConfig(**PRESETS[name], preset=name)


def test_cell_fractions_and_conditioned_batches():
    mask = torch.tensor([[0, 0, 1, 2], [0, 0, 1, 1], [2, 2, 0, 0], [2, 2, 0, 1]])
    cells = cell_fractions(mask, 3, 2)
    assert cells.shape == (3, 2, 2)
    assert cells[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert cells[:, 0, 1].tolist() == [0.0, 0.75, 0.25]
    assert torch.allclose(cells.sum(0), torch.ones(2, 2))
    from dualsynth.training.prior import EncodedTiles

    data = EncodedTiles(torch.arange(2 * 4 * 4).view(2, 4, 4) % 5, torch.rand(2, 3, 4, 4), ["a", "b"])
    z, cond = code_batch(data, np.array([1, 0, 1]), 2, seed=0, step=3, conditioned=True)
    z2, cond2 = code_batch(data, np.array([1, 0, 1]), 2, seed=0, step=3, conditioned=True)
    assert z.shape == (3, 2, 2) and cond.shape == (3, 3)
    assert torch.equal(z, z2) and torch.equal(cond, cond2)
    # the conditioning is the mean class fraction over exactly the cropped cells
    for k in range(3):
        hits = [(t, l) for t in range(3) for l in range(3) if torch.equal(data.codes[[1, 0, 1][k], t : t + 2, l : l + 2], z[k])]
        assert any(torch.allclose(data.cells[[1, 0, 1][k], :, t : t + 2, l : l + 2].mean((-2, -1)), cond[k]) for t, l in hits)
    assert _lr(tiny(lr_schedule="cosine"), 0) == pytest.approx(3e-3)
    assert _lr(tiny(lr_schedule="cosine", steps=20), 19) == pytest.approx(3e-3 * 0.05)


def test_training_learns_and_writes_the_run(prior, vqvae):
    run, summary = prior
    assert summary["step"] == 40 and summary["validated_on"] == "val"
    # layered tiles are easy to predict: far below log2(K) bits per code
    assert summary["best_bits_per_code"] < 0.8 * summary["uniform_bits_per_code"]
    rows = read_csv(run / "log.csv")
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert float(rows[-1]["train_bits_per_code"]) < float(rows[0]["train_bits_per_code"])
    best = min(float(r["val_bits_per_code"]) for r in rows)
    assert summary["best_bits_per_code"] == pytest.approx(best, rel=1e-4)
    for part in ("config.yaml", "checkpoints/best.pt", "checkpoints/last.pt", "manifest.json", "codes.npz"):
        assert (run / part).is_file(), part
    trained = load_prior(run)
    assert trained.condition == "phase-fractions" and trained.model.config.cond_dim == 3
    assert trained.z_shape == (8, 8) and trained.vqvae_dir == vqvae.resolve()
    # hflip augmentation: every one of the 8 training tiles is encoded twice; the bank keeps one row per tile
    with np.load(run / "codes.npz") as npz:
        assert npz["train_codes"].shape == (16, 8, 8) and npz["val_codes"].shape == (2, 8, 8)
    assert trained.cond_bank.shape == (8, 3) and np.allclose(trained.cond_bank.sum(1), 1)


def test_resume_equals_an_uninterrupted_run(vqvae, tmp_path):
    config = tiny(arch="pixelcnn", steps=10)
    train_prior(vqvae, tmp_path / "a", config, device="cpu", progress=False)
    train_prior(vqvae, tmp_path / "b", config, device="cpu", progress=False, stop_after=5)
    train_prior(vqvae, tmp_path / "b", config, device="cpu", progress=False, resume=True)
    a = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_csv(tmp_path / "a/log.csv") [-1]["val_bits_per_code"] == read_csv(tmp_path / "b/log.csv")[-1]["val_bits_per_code"]
    with pytest.raises(InputError, match="different config"):
        train_prior(vqvae, tmp_path / "b", tiny(arch="pixelcnn", steps=11), device="cpu", progress=False, resume=True)
    with pytest.raises(InputError, match="not empty"):
        train_prior(vqvae, tmp_path / "a", config, device="cpu", progress=False)


def test_training_from_encode_output(vqvae, dataset, tmp_path):
    encode_dataset(vqvae, dataset, tmp_path / "codes", device="cpu")
    summary = train_prior(vqvae, tmp_path / "p", tiny(augment="none", steps=5, condition="phase-fractions"),
                          codes_dir=tmp_path / "codes", device="cpu", progress=False)
    assert summary["train_z_matrices"] == 8 and summary["z_shape"] == [8, 8]
    with pytest.raises(InputError, match="augment"):
        train_prior(vqvae, tmp_path / "q", tiny(steps=5), codes_dir=tmp_path / "codes", device="cpu", progress=False)


def test_sample_writes_a_dataset_folder_and_inspect_reports(prior, dataset, tmp_path):
    run, _ = prior
    out = tmp_path / "syn"
    summary = sample_dataset(run, out, 5, seed=3, batch_size=2, min_object_area=4, progress=False)
    folder = DatasetFolder(out)
    recs = folder.records()
    assert len(recs) == 5 and {r.origin for r in recs} == {"synthetic"} and {r.split for r in recs} == {"train"}
    assert folder.class_names == ["matrix", "a", "b"]
    for rec in recs:
        assert folder.load_image(rec).shape == (32, 32, 1)
        assert (out / rec.extra["raw_mask"]).is_file()
    with np.load(out / "codes.npz") as npz:
        assert npz["codes"].shape == (5, 8, 8) and npz["cond"].shape == (5, 3)
    assert (out / "grid.png").is_file() and summary["distinct_z_matrices"] == 5
    # a sample depends on (seed, index) only: another batch size gives the same z-matrices
    again = sample_dataset(run, tmp_path / "syn2", 3, seed=3, batch_size=3, min_object_area=4, progress=False)
    with np.load(out / "codes.npz") as a, np.load(tmp_path / "syn2" / "codes.npz") as b:
        assert np.array_equal(a["codes"][:3], b["codes"])
    assert again["n"] == 3

    report = inspect_synthetic(out)
    assert report["tiles"] == 5 and report["real_tiles"] == 8 and report["distinct_z_matrices"] == 5
    real = np.mean([np.bincount(np.asarray(read_image(dataset / "masks" / f"t{i}.png")).ravel(), minlength=3) / 1024
                    for i in range(8)], axis=0)
    assert np.allclose(report["real_fractions"]["mean"], real)
    assert 0 <= report["changed_by_cleanup"]["mean"] <= report["changed_by_cleanup"]["max"] <= 1
    assert report["changed_by_cleanup"]["mean"] == pytest.approx(summary["mean_changed_by_cleanup"], abs=1e-9)
    assert json.loads((out / "inspect.json").read_text())["tiles"] == 5


def test_phase_fractions_steer_a_conditioned_prior(prior, tmp_path):
    run, _ = prior
    summary = sample_dataset(run, tmp_path / "rich", 2, phase_fractions="0.1,0.1,0.8",
                             min_object_area=0, progress=False)
    assert summary["phase_fractions"] == pytest.approx([0.1, 0.1, 0.8])
    with np.load(tmp_path / "rich" / "codes.npz") as npz:
        assert np.allclose(npz["cond"], [[0.1, 0.1, 0.8]] * 2)


def test_phase_fractions_need_a_conditioned_prior_and_valid_values(vqvae, tmp_path):
    train_prior(vqvae, tmp_path / "plain", tiny(steps=2), device="cpu", progress=False)
    with pytest.raises(InputError, match="without conditioning"):
        sample_dataset(tmp_path / "plain", tmp_path / "x", 1, phase_fractions="0.5,0.5,0")
    with pytest.raises(InputError, match="3 fractions"):
        parse_phase_fractions("0.5,0.5", 3)
    with pytest.raises(InputError, match="sum to 1"):
        parse_phase_fractions("0.5,0.5,0.5", 3)
    with pytest.raises(InputError, match="numbers"):
        parse_phase_fractions("a,b,c", 3)
    assert parse_phase_fractions("0.5,0.5,0.005", 3).sum() == pytest.approx(1.0)


def test_raw_masks_round_trip_by_nearest_level():
    decoded = torch.tensor([[[0.0, 0.24, 0.26, 0.74, 0.76, 1.2]]])
    classes = raw_mask_classes(raw_mask_png(decoded, 3, "levels"), 3)
    assert classes.tolist() == [[0, 0, 1, 1, 2, 2]]
    onehot = torch.tensor([[[0.9, 0.1]], [[0.05, 0.2]], [[0.05, 0.7]]])
    assert raw_mask_classes(raw_mask_png(onehot, 3, "onehot"), 3).tolist() == [[0, 2]]


def test_cli_train_sample_inspect(vqvae, tmp_path, capsys):
    out = tmp_path / "cli-prior"
    code, stdout, err = run_cli(["train-prior", "--vqvae", vqvae, "--out", out, "--arch", "pixelcnn", "--steps", "5",
                                 "--set", "pixelcnn.hidden=8", "--set", "crop=4", "--set", "eval_every=5",
                                 "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    assert "bits per code" in stdout and math.isfinite(float(stdout.split("NLL ")[1].split()[0]))
    # --resume alone reuses the run's config and inputs (a finished run has nothing left to do)
    code, stdout, err = run_cli(["train-prior", "--out", out, "--resume", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "trained 5 steps" in stdout and int(read_csv(out / "log.csv")[-1]["step"]) == 5
    code, _, err = run_cli(["train-prior", "--out", out, "--resume", "--steps", "6", "--no-progress"], capsys)
    assert code == 2 and "different config" in err
    code, stdout, err = run_cli(["sample", "--prior", out, "--n", "2", "--out", tmp_path / "s", "--no-progress"], capsys)
    assert code == 0, err
    assert "wrote 2 synthetic pairs" in stdout
    code, stdout, err = run_cli(["inspect", "--synthetic", tmp_path / "s"], capsys)
    assert code == 0, err
    assert "distinct z-matrices: " in stdout and "matrix" in stdout
    code, _, err = run_cli(["sample", "--prior", out, "--n", "1", "--out", tmp_path / "t", "--phase-fractions", "1,0,0"], capsys)
    assert code == 2 and err.startswith("error: --phase-fractions") and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["train-prior", "--vqvae", tmp_path / "nothing", "--out", tmp_path / "u"], capsys)
    assert code == 2 and "error:" in err and len(err.strip().splitlines()) == 1


def test_paper_preset_trains_the_papers_pixelcnn():
    config = load_config(PriorTrainConfig, PRESETS, "paper")
    assert config.arch == "pixelcnn" and config.augment == "none" and config.crop is None
    assert config.lr_schedule == "constant"
    assert load_config(PriorTrainConfig, PRESETS, "quick").arch == "gated"


def test_sampling_processes_give_the_same_pairs_as_one(prior, tmp_path):
    run, _ = prior
    one = sample_dataset(run, tmp_path / "one", 4, seed=5, batch_size=1, min_object_area=4, progress=False, workers=1)
    two = sample_dataset(run, tmp_path / "two", 4, seed=5, batch_size=1, min_object_area=4, progress=False, workers=2)
    assert (one["workers"], two["workers"]) == (1, 2)
    with np.load(tmp_path / "one" / "codes.npz") as a, np.load(tmp_path / "two" / "codes.npz") as b:
        assert np.array_equal(a["codes"], b["codes"])
    for rec in DatasetFolder(tmp_path / "one").records():
        for sub in ("images", "masks"):
            assert (tmp_path / "one" / sub / rec.file).read_bytes() == (tmp_path / "two" / sub / rec.file).read_bytes()


def test_cli_sample_with_real_measures_fidelity(prior, dataset, tmp_path, capsys):
    run, _ = prior
    out = tmp_path / "syn"
    code, stdout, err = run_cli(["sample", "--prior", run, "--n", "4", "--out", out, "--real", dataset,
                                 "--seed", "2", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "fidelity: HF power ratio" in stdout and "near-copies" in stdout
    report = json.loads((out / "fidelity" / "fidelity.json").read_text())
    assert report["tiles"]["synthetic"] == 4 and report["real"] == str(dataset)
    assert (out / "fidelity" / "fidelity.md").is_file() and (out / "fidelity" / "fidelity.png").is_file()
    # the same numbers in sample.json, and the synthetic folder is still a dataset folder of 4 pairs
    summary = json.loads((out / "sample.json").read_text())
    assert summary["fidelity"]["high_frequency_power_ratio"] == pytest.approx(report["high_frequency_power_ratio"])
    assert f"HF power ratio {report['high_frequency_power_ratio']:.2f}" in stdout
    assert len(DatasetFolder(out).records()) == 4
    # a real set that does not fit the generator is refused before sampling, in one line
    other = tmp_path / "two-class"
    with DatasetWriter(other, CLASSES[:2]) as writer:
        writer.add("x", np.zeros((32, 32), np.float32), np.zeros((32, 32), np.uint8), split="train", source="x")
    code, _, err = run_cli(["sample", "--prior", run, "--n", "1", "--out", tmp_path / "no", "--real", other,
                            "--no-progress"], capsys)
    assert code == 2 and "2 classes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()
    code, _, err = run_cli(["sample", "--prior", run, "--n", "1", "--out", tmp_path / "no", "--real",
                            tmp_path / "missing", "--no-progress"], capsys)
    assert code == 2 and "real folder not found" in err
