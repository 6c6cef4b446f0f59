"""VQ-VAE training runs: the loss falls, resume equals an uninterrupted run, encode/report outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dualsynth.data import ClassInfo, DatasetFolder, DatasetWriter, join_pair, joint_to_pairs
from dualsynth.engine import scheduled_lr, step_batch
from dualsynth.errors import InputError
from dualsynth.io import read_csv
from dualsynth.models.vqvae import decode, encode, load_vqvae, reconstruct
from dualsynth.training.vqvae import (
    PRESETS,
    VQVAETrainConfig,
    encode_dataset,
    joint_batch,
    report_vqvae,
    train_vqvae,
)

CLASSES = [ClassInfo("matrix", (0, 0, 0)), ClassInfo("a", (255, 0, 0)), ClassInfo("b", (0, 255, 0))]


def blob_tile(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A matrix with a few discs of two phases; grey level follows the phase, plus noise."""
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(4):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(3, size // 4))]
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, 3)
    image = np.array([0.3, 0.6, 0.85], dtype=np.float32)[mask] + rng.normal(0, 0.03, (size, size))
    return np.clip(image, 0, 1).astype(np.float32), mask


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tiny"
    rng = np.random.default_rng(0)
    with DatasetWriter(out, CLASSES) as writer:
        for i in range(8):
            image, mask = blob_tile(rng, 32)
            split = "val" if i >= 6 else "train"
            writer.add(f"t{i}", image, mask, split=split, source=f"s{i}")
    return out


def tiny_config(**kw) -> VQVAETrainConfig:
    base = dict(
        model=dict(hidden=8, res_hidden=4, res_layers=1, embedding_dim=4, num_embeddings=6, dead_code_steps=5),
        tile=16, batch_size=4, steps=6, lr=3e-3, log_every=2, monitor_every=3, checkpoint_every=3,
    )
    base.update(kw)
    return VQVAETrainConfig(**base)


def test_presets_validate_and_follow_the_paper():
    paper = VQVAETrainConfig(**PRESETS["paper"])
    assert (paper.model.embedding_dim, paper.model.num_embeddings, paper.batch_size, paper.steps) == (64, 10, 8, 50_000)
    assert paper.tile is None
    quick = VQVAETrainConfig(**PRESETS["quick"])
    assert quick.model.num_embeddings == 10 and quick.steps < paper.steps


@pytest.mark.parametrize("name", ["quick", "paper"])
def test_config_files_spell_out_their_presets(name):
    from pathlib import Path

    from dualsynth.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"vqvae-{name}.yaml"
    assert load_config(VQVAETrainConfig, PRESETS, None, path) == load_config(VQVAETrainConfig, PRESETS, name)


def test_batches_are_a_function_of_seed_and_step():
    a = step_batch(10, 4, seed=3, step=7)
    assert np.array_equal(a, step_batch(10, 4, seed=3, step=7))
    assert not np.array_equal(a, step_batch(10, 4, seed=4, step=7))
    # one epoch (steps 0..4 of batch 2 over 10 tiles) visits every tile once
    epoch = np.concatenate([step_batch(10, 2, 0, s) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(10))
    tiles = torch.rand(10, 2, 12, 12)
    x = joint_batch(tiles, a, tile=8, augment=True, seed=3, step=7)
    assert x.shape == (4, 2, 8, 8)
    assert torch.equal(x, joint_batch(tiles, a, tile=8, augment=True, seed=3, step=7))


def test_cosine_learning_rate_ends_at_five_percent():
    config = tiny_config(steps=11, lr=1.0, lr_schedule="cosine")
    assert scheduled_lr(config.lr, config.lr_schedule, 0, config.steps) == pytest.approx(1.0)
    assert scheduled_lr(config.lr, config.lr_schedule, 5, config.steps) == pytest.approx(0.05 + 0.95 * 0.5)
    assert scheduled_lr(config.lr, config.lr_schedule, 10, config.steps) == pytest.approx(0.05)
    constant = tiny_config(lr=0.3)
    assert scheduled_lr(constant.lr, constant.lr_schedule, 7, constant.steps) == 0.3


def test_training_lowers_the_loss_and_writes_the_run(dataset, tmp_path):
    run = tmp_path / "run"
    summary = train_vqvae(dataset, run, tiny_config(steps=40, log_every=5, monitor_every=20, checkpoint_every=20), device="cpu", progress=False)
    rows = read_csv(run / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(5, 41, 5))
    assert {"loss", "recon_error", "image_mse", "mask_mse", "perplexity", "codes_in_use"} <= set(rows[0])
    assert float(rows[-1]["recon_error"]) < 0.7 * float(rows[0]["recon_error"])
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    for name in ("config.yaml", "checkpoints/best.pt", "checkpoints/last.pt", "manifest.json", "monitor.png",
                 "recon_error.png", "report.json", "monitor/input.png", "monitor/step_0000020.png"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["split"] == "val" and report["tiles"] == 2
    assert 0 <= report["mask_pixel_accuracy"] <= 1 and 1 <= report["codes_in_use"] <= 6
    assert summary["report"]["mask_pixel_accuracy"] == report["mask_pixel_accuracy"]
    best = torch.load(run / "checkpoints/best.pt", weights_only=False)
    assert best["recon_error"] == pytest.approx(min(float(r["recon_error"]) for r in rows), rel=1e-4)


def test_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    config = tiny_config(steps=8, checkpoint_every=4, lr_schedule="cosine")
    train_vqvae(dataset, tmp_path / "straight", config, device="cpu", progress=False)
    # stopped after 5 updates (between checkpoints, like a kill would be), then resumed to the end
    train_vqvae(dataset, tmp_path / "resumed", config, device="cpu", progress=False, stop_after=5)
    assert torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=False)["train_state"]["step"] == 5
    train_vqvae(dataset, tmp_path / "resumed", config, device="cpu", progress=False, resume=True)
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    log_a, log_b = read_csv(tmp_path / "straight/log.csv"), read_csv(tmp_path / "resumed/log.csv")
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_resume_refuses_a_different_config_and_new_runs_refuse_a_full_folder(dataset, tmp_path):
    train_vqvae(dataset, tmp_path / "run", tiny_config(steps=2), device="cpu", progress=False)
    with pytest.raises(InputError, match="not empty"):
        train_vqvae(dataset, tmp_path / "run", tiny_config(steps=2), device="cpu", progress=False)
    with pytest.raises(InputError, match="different config"):
        train_vqvae(dataset, tmp_path / "run", tiny_config(steps=2, lr=1e-2), device="cpu", progress=False, resume=True)


def test_bad_crop_sizes_are_input_errors(dataset, tmp_path):
    with pytest.raises(InputError, match="smaller than the crop"):
        train_vqvae(dataset, tmp_path / "a", tiny_config(tile=64), device="cpu", progress=False)
    with pytest.raises(InputError, match="multiple of downsample"):
        train_vqvae(dataset, tmp_path / "b", tiny_config(tile=18), device="cpu", progress=False)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    train_vqvae(dataset, run, tiny_config(steps=4, mask_encoding="onehot"), device="cpu", progress=False)
    return run


def test_python_api_round_trip(trained, dataset):
    model = load_vqvae(trained, "cpu")
    assert not model.training and model.config.mask_encoding == "onehot" and model.config.num_classes == 3
    folder = DatasetFolder(dataset)
    rec = folder.records("val")[0]
    joint = join_pair(folder.load_image(rec), folder.load_mask(rec), 3, "onehot")
    codes = encode(model, joint)
    assert codes.shape == (8, 8) and codes.dtype == torch.long
    assert torch.equal(encode(model, joint[None])[0], codes)
    out = decode(model, codes)
    assert out.shape == joint.shape
    assert torch.allclose(reconstruct(model, joint), out)
    (image, mask), = joint_to_pairs(out[None], model.config.num_classes, model.config.mask_encoding)
    assert image.shape == (32, 32, 1) and mask.shape == (32, 32)
    assert 0 <= image.min() and image.max() <= 1 and set(np.unique(mask)) <= {0, 1, 2}


def test_encode_dataset_writes_z_matrices_per_split(trained, dataset, tmp_path):
    info = encode_dataset(trained, dataset, tmp_path / "z", device="cpu")
    assert info["tiles"] == {"train": 6, "val": 2}
    train = np.load(tmp_path / "z/train.npz")
    assert train["codes"].shape == (6, 8, 8) and list(train["files"]) == [f"t{i}.png" for i in range(6)]
    model = load_vqvae(trained, "cpu")
    folder = DatasetFolder(dataset)
    rec = folder.records("train")[2]
    joint = join_pair(folder.load_image(rec), folder.load_mask(rec), 3, "onehot")
    assert np.array_equal(train["codes"][2], encode(model, joint).numpy())
    assert (tmp_path / "z/figure9.png").is_file() and (tmp_path / "z/encode.json").is_file()


def test_report_scores_the_reconstructed_masks(trained, dataset, capsys):
    report = report_vqvae(trained, device="cpu")  # dataset read from the run's config
    assert report["tiles"] == 2 and report["split"] == "val"
    # recompute the pixel accuracy by hand from the API
    model = load_vqvae(trained, "cpu")
    folder = DatasetFolder(dataset)
    correct = total = 0
    for rec in folder.records("val"):
        true_mask = folder.load_mask(rec)
        joint = join_pair(folder.load_image(rec), true_mask, 3, "onehot")
        (_, mask), = joint_to_pairs(reconstruct(model, joint)[None], model.config.num_classes, model.config.mask_encoding)
        correct += int((mask == true_mask).sum())
        total += true_mask.size
    assert report["mask_pixel_accuracy"] == pytest.approx(correct / total)
    assert "Missing Class IoU" in capsys.readouterr().out


def test_cli_train_resume_encode_report(dataset, tmp_path, capsys):
    from tests.helpers import run_cli

    run = tmp_path / "run"
    tiny = ["--set", "model.hidden=8", "--set", "model.res_hidden=4", "--set", "model.res_layers=1",
            "--set", "model.embedding_dim=4", "--set", "tile=16", "--set", "batch_size=2",
            "--set", "log_every=2", "--set", "monitor_every=2", "--set", "checkpoint_every=2"]
    code, out, err = run_cli(["train-vqvae", "--data", dataset, "--out", run, "--steps", 2, "--seed", 1,
                              "--device", "cpu", "--threads", 1, "--no-progress", *tiny], capsys)
    assert code == 0, err
    assert "mask pixel accuracy" in out and (run / "report.json").is_file()
    # --resume alone continues with the run's saved config and dataset (nothing left to do here)
    code, out, err = run_cli(["train-vqvae", "--out", run, "--resume", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "trained 2 steps" in out
    code, out, err = run_cli(["encode", "--vqvae", run, "--data", dataset, "--out", tmp_path / "z", "--device", "cpu"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "z/val.npz")["codes"].shape == (2, 8, 8)
    code, out, err = run_cli(["report-vqvae", run, "--split", "train", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "6 (train)" in out
    # bad input: one line on stderr, exit code 2
    code, out, err = run_cli(["train-vqvae", "--data", tmp_path / "missing", "--out", tmp_path / "r2"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    code, out, err = run_cli(["train-vqvae", "--data", dataset, "--out", tmp_path / "r3", "--set", "model.K=3"], capsys)
    assert code == 2 and "unknown config key 'model.K'" in err
    code, out, err = run_cli(["report-vqvae", tmp_path], capsys)
    assert code == 2 and "not a run folder" in err


def test_paper_preset_is_table_4_with_our_additions_off():
    from dualsynth.config import load_config

    config = load_config(VQVAETrainConfig, PRESETS, "paper")
    m = config.model
    assert (m.embedding_dim, m.num_embeddings, m.downsample, config.batch_size, config.steps) == (64, 10, 4, 8, 50_000)
    assert config.tile is None and not config.augment and config.lr_schedule == "constant"
    assert not m.kmeans_init and m.dead_code_steps == 0
    assert m.ema and m.decay == 0.99 and m.commitment_cost == 0.25 and config.lr == 3e-4   # Sonnet's example


# --- sharper-generator options ------------------------------------------------------------------------------


def test_paper_preset_keeps_the_papers_losses_and_no_adversary():
    from dualsynth.config import load_config

    for name in ("paper", "quick"):
        config = load_config(VQVAETrainConfig, PRESETS, name)
        assert (config.image_loss, config.focal_frequency_weight, config.mask_loss) == ("mse", 0.0, "mse"), name
        assert config.mask_class_weights == "none" and config.adversarial_weight == 0 and not config.adversarial
    # the mask encoding: the paper's one grey channel; quick one channel per class (it keeps rare classes)
    assert load_config(VQVAETrainConfig, PRESETS, "paper").mask_encoding == "levels"
    assert load_config(VQVAETrainConfig, PRESETS, "quick").mask_encoding == "onehot"


def test_loss_options_that_do_not_fit_are_config_errors(dataset, tmp_path):
    from dualsynth.config import load_config

    with pytest.raises(InputError, match="needs mask_encoding onehot"):
        load_config(VQVAETrainConfig, PRESETS, "paper", overrides={"mask_loss": "cross_entropy"})
    with pytest.raises(InputError, match="needs mask_loss cross_entropy"):
        load_config(VQVAETrainConfig, PRESETS, "quick", overrides={"mask_encoding": "onehot",
                                                                     "mask_class_weights": "balanced"})
    with pytest.raises(InputError, match="discriminator.sees"):
        load_config(VQVAETrainConfig, PRESETS, "quick", overrides={"discriminator": {"sees": "mask"}})
    # 16 px crops leave nothing for a 3-layer PatchGAN
    with pytest.raises(InputError, match="discriminator.layers"):
        train_vqvae(dataset, tmp_path / "r", tiny_config(adversarial_weight=0.5), device="cpu", progress=False)


def test_balanced_class_weights_known_answer():
    from dualsynth.training.vqvae import balanced_class_weights

    masks = [np.array([[0, 0], [0, 1]]), np.array([[0, 0], [0, 0]])]   # 7 pixels of class 0, 1 of class 1, 0 of 2
    w = balanced_class_weights(masks, 3)
    assert w.tolist() == pytest.approx([8 / (3 * 7), 8 / 3, 0.0])
    # every class present carries the same total weight
    assert w[0] * 7 == pytest.approx(w[1] * 1)


def test_l1_and_focal_frequency_training_logs_its_terms(dataset, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(steps=30, log_every=5, monitor_every=30, checkpoint_every=30, image_loss="l1",
                         focal_frequency_weight=1.0)
    train_vqvae(dataset, run, config, device="cpu", progress=False)
    rows = read_csv(run / "log.csv")
    assert {"image_l1", "ffl", "image_mse", "mask_mse"} <= set(rows[0]) and "mask_ce" not in rows[0]
    assert float(rows[-1]["image_l1"]) < float(rows[0]["image_l1"])
    assert float(rows[-1]["ffl"]) < float(rows[0]["ffl"])
    # l1 on micrographs of ~0.03 noise: the MSE logged is the true MSE, below the L1 term
    assert all(float(r["image_mse"]) < float(r["image_l1"]) for r in rows)


def test_onehot_cross_entropy_trains_with_balanced_weights_and_samples_masks(dataset, tmp_path):
    from dualsynth.training.vqvae import balanced_class_weights

    plain = tiny_config(steps=50, log_every=10, monitor_every=50, checkpoint_every=50, mask_encoding="onehot",
                        mask_loss="cross_entropy")
    train_vqvae(dataset, tmp_path / "plain", plain, device="cpu", progress=False)
    rows = read_csv(tmp_path / "plain" / "log.csv")
    assert "mask_ce" in rows[0] and "image_l1" not in rows[0]
    assert float(rows[-1]["mask_ce"]) < 0.8 * float(rows[0]["mask_ce"])
    # balanced weights (a few steps: with them a uniform guess no longer pays, so the loss falls more slowly)
    run = tmp_path / "run"
    config = tiny_config(steps=4, mask_encoding="onehot", mask_loss="cross_entropy", mask_class_weights="balanced")
    summary = train_vqvae(dataset, run, config, device="cpu", progress=False)
    # the weights in the manifest are those of the training tiles' masks
    folder = DatasetFolder(dataset)
    expected = balanced_class_weights([folder.load_mask(r) for r in folder.records("train")], 3)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["inputs"]["mask_class_weights"] == pytest.approx(expected.tolist(), rel=1e-5)
    model = load_vqvae(run, "cpu")
    assert model.config.mask_logits
    rec = folder.records("val")[0]
    joint = join_pair(folder.load_image(rec), folder.load_mask(rec), 3, "onehot")
    out = reconstruct(model, joint)
    # decode gives class probabilities; the mask split from it is a class-index map the report scores
    assert torch.allclose(out[1:].sum(0), torch.ones(32, 32), atol=1e-5)
    (_, mask), = joint_to_pairs(out[None], 3, "onehot")
    assert set(np.unique(mask)) <= {0, 1, 2}
    assert 0 <= summary["report"]["mask_pixel_accuracy"] <= 1


def adversarial_config(**kw) -> VQVAETrainConfig:
    base = dict(steps=8, checkpoint_every=3, log_every=2, adversarial_weight=0.5, adversarial_start=3,
                discriminator=dict(channels=4, layers=2), lr_schedule="cosine")
    base.update(kw)
    return tiny_config(**base)


def test_adversarial_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    config = adversarial_config()
    train_vqvae(dataset, tmp_path / "straight", config, device="cpu", progress=False)
    # stopped after 5 updates, after the adversary started and between checkpoints, then resumed to the end
    train_vqvae(dataset, tmp_path / "resumed", config, device="cpu", progress=False, stop_after=5)
    train_vqvae(dataset, tmp_path / "resumed", config, device="cpu", progress=False, resume=True)
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=False)
    assert set(a["optimizers"]) == {"main", "disc"} and set(a["modules"]) == {"disc"}
    for part in ("model", "disc"):
        sa, sb = (a["model"], b["model"]) if part == "model" else (a["modules"]["disc"], b["modules"]["disc"])
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (part, key)
    def logged(run):  # every column but the wall-clock throughput
        return [{k: v for k, v in r.items() if k != "tiles_per_s"} for r in read_csv(tmp_path / run / "log.csv")]

    assert logged("straight") == logged("resumed")
    rows = read_csv(tmp_path / "straight/log.csv")
    assert {"g_adv", "adv_weight", "d_loss", "d_real", "d_fake"} <= set(rows[0])
    # before adversarial_start (steps 0-2: the rows of steps 2) nothing adversarial happens; after, it does
    assert float(rows[0]["d_loss"]) == 0 and float(rows[0]["adv_weight"]) == 0
    assert float(rows[-1]["d_loss"]) > 0 and float(rows[-1]["adv_weight"]) > 0
    # best.pt rebuilds the VQ-VAE alone
    assert set(torch.load(tmp_path / "straight/checkpoints/best.pt", weights_only=False)["model"]) == set(a["model"])


def test_an_adversary_that_never_starts_changes_nothing(dataset, tmp_path):
    train_vqvae(dataset, tmp_path / "plain", tiny_config(steps=4, lr_schedule="cosine"), device="cpu", progress=False)
    train_vqvae(dataset, tmp_path / "late", adversarial_config(steps=4, adversarial_start=4), device="cpu",
                progress=False)
    a = torch.load(tmp_path / "plain/checkpoints/last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "late/checkpoints/last.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_adversary_on_the_joint_image_trains(dataset, tmp_path):
    config = adversarial_config(steps=4, adversarial_start=0, mask_encoding="onehot", mask_loss="cross_entropy",
                                discriminator=dict(channels=4, layers=2, sees="joint", lr=1e-3))
    train_vqvae(dataset, tmp_path / "run", config, device="cpu", progress=False)
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)
    first = next(k for k in ckpt["modules"]["disc"] if k.endswith("original"))
    assert ckpt["modules"]["disc"][first].shape[1] == 4     # 1 micrograph + 3 mask channels
    assert ckpt["optimizers"]["disc"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.05)  # cosine end


def test_deterministic_key_turns_on_deterministic_kernels_and_changes_no_cpu_result(dataset, tmp_path):
    # on a GPU, atomics-based kernels made two identical paper-preset runs differ (docs/benchmarks.md); the key
    # switches torch to deterministic kernels. On a CPU the weights are the same either way.
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        train_vqvae(dataset, tmp_path / "plain", tiny_config(steps=4), device="cpu", progress=False)
        assert not torch.are_deterministic_algorithms_enabled()
        train_vqvae(dataset, tmp_path / "det", tiny_config(steps=4, deterministic=True), device="cpu", progress=False)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)
    a = torch.load(tmp_path / "plain/checkpoints/last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "det/checkpoints/last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "deterministic: true" in (tmp_path / "det" / "config.yaml").read_text()
