"""The renderer (mask -> micrograph): network shapes, seeded noise, training runs and resume, `render`, the
`train-renderer` and `render` commands, and `sample --renderer`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dualsynth.data import ClassInfo, DatasetFolder, DatasetWriter
from dualsynth.errors import InputError
from dualsynth.io import read_csv
from dualsynth.models.renderer import (
    PatchDiscriminator,
    Renderer,
    RendererConfig,
    load_renderer,
    lowpass,
    onehot_masks,
    render,
)
from dualsynth.training.renderer import PRESETS, RendererTrainConfig, high_pass_energy, train_renderer
from tests.helpers import run_cli

CLASSES = [ClassInfo("matrix", (0, 0, 0)), ClassInfo("a", (255, 0, 0)), ClassInfo("b", (0, 255, 0))]
LEVELS = np.array([0.2, 0.5, 0.8], dtype=np.float32)


def blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(4):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(4, size // 3))]
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, 3)
    return mask


def write_pairs(out: Path, n: int = 8, size: int = 32, noise: float = 0.0, rgb: bool = False, seed: int = 0,
                flip: bool = False) -> Path:
    """Tiles whose micrograph is a constant grey level per class (plus optional white noise); the last 2 are val.
    `flip`: tile i uses the levels reversed (1 - LEVELS) when i is odd, so a class's brightness is ambiguous from
    the mask alone (as in real SEM sets whose phase brightness varies from image to image)."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(out, CLASSES) as writer:
        for i in range(n):
            mask = blob_mask(rng, size)
            levels = 1 - LEVELS if flip and i % 2 else LEVELS
            image = np.clip(levels[mask] + rng.normal(0, noise, mask.shape), 0, 1).astype(np.float32)
            if rgb:
                image = np.stack([image, 1 - image, image], axis=-1)
            writer.add(f"t{i}", image, mask, split="val" if i >= n - 2 else "train", source=f"s{i}")
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "levels")


def tiny(**kw) -> RendererTrainConfig:
    base = dict(model=dict(width=8, depth=2, disc_width=8, disc_layers=2), tile=16, batch_size=4, steps=6, lr=2e-3,
                lr_disc=2e-3, log_every=2, val_every=3, checkpoint_every=3, val_tiles=2)
    base.update(kw)
    return RendererTrainConfig(**base)


def test_quick_preset_validates_and_there_is_no_paper_preset():
    quick = RendererTrainConfig(**PRESETS["quick"])
    assert quick.tile % 2**quick.model.depth == 0 and quick.steps >= 1000
    assert set(PRESETS) == {"quick"}


def test_config_file_spells_out_the_quick_preset():
    from dualsynth.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "renderer-quick.yaml"
    assert load_config(RendererTrainConfig, PRESETS, None, path) == load_config(RendererTrainConfig, PRESETS, "quick")


@pytest.mark.parametrize("channels", [1, 3])
def test_generator_and_discriminator_shapes(channels):
    config = RendererConfig(width=8, depth=3, disc_width=8, disc_layers=2, image_channels=channels, num_classes=4)
    gen, disc = Renderer(config), PatchDiscriminator(config)
    onehot = onehot_masks(torch.randint(0, 4, (2, 32, 48)), 4)
    assert onehot.shape == (2, 4, 32, 48) and torch.equal(onehot.sum(1), torch.ones(2, 32, 48))
    image = gen(onehot)
    assert image.shape == (2, channels, 32, 48) 
    scores, features = disc(image, onehot)
    assert scores.shape == (2, 1, 8, 12) and len(features) == 3
    assert [n.shape for n in gen.draw_noise(2, 32, 48)] == [(2, 1, 32 >> k, 48 >> k) for k in range(4)]
    with pytest.raises(ValueError, match="multiple of 8"):
        gen(onehot_masks(torch.zeros(1, 20, 32, dtype=torch.long), 4))


@pytest.mark.parametrize("channels", [1, 3])
def test_guided_networks_take_the_low_pass_micrograph(channels):
    config = RendererConfig(width=8, depth=2, disc_width=8, disc_layers=2, image_channels=channels, num_classes=3,
                            guide="lowpass", guide_pool=4)
    gen, disc = Renderer(config), PatchDiscriminator(config)
    assert config.guide_channels == channels and gen.stem.in_channels == 3 + channels + 1
    onehot = onehot_masks(torch.randint(0, 3, (2, 16, 24)), 3)
    guide = lowpass(torch.rand(2, channels, 16, 24), 4)
    image = gen(onehot, guide=guide)
    assert image.shape == (2, channels, 16, 24)
    scores, _ = disc(image, onehot, guide)
    assert scores.shape == (2, 1, 4, 6)
    # the guide changes the output: it is an input, not ignored
    assert (gen(onehot, gen.draw_noise(2, 16, 24, torch.Generator().manual_seed(0)), guide)
            - gen(onehot, gen.draw_noise(2, 16, 24, torch.Generator().manual_seed(0)), 1 - guide)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs a guide"):
        gen(onehot)
    with pytest.raises(ValueError, match="needs a guide"):
        gen(onehot, guide=guide[:, :1].repeat(1, channels + 1, 1, 1))
    with pytest.raises(ValueError, match="has no guide"):
        Renderer(RendererConfig(width=8, depth=2, image_channels=channels, num_classes=3))(onehot, guide=guide)
    # render: guides (H, W) or (H, W, C) micrographs, one per mask; required here, refused without a guide
    masks = [np.zeros((16, 16), np.uint8), np.ones((16, 24), np.uint8)]
    guides = [np.full((16, 16, channels), 0.3, np.float32), np.full((16, 24, channels), 0.7, np.float32)]
    out = render(gen, masks, seed=1, guides=guides)
    assert [o.shape for o in out] == [(16, 16, channels), (16, 24, channels)]
    assert np.array_equal(render(gen, masks[1], seed=1, indices=[1], guides=guides[1])[0], out[1])
    with pytest.raises(ValueError, match="pass guides"):
        render(gen, masks, seed=1)
    with pytest.raises(ValueError, match="does not fit"):
        render(gen, masks, seed=1, guides=guides[::-1])
    with pytest.raises(ValueError, match="2 masks but 1 guides"):
        render(gen, masks, seed=1, guides=guides[:1])
    with pytest.raises(ValueError, match="without a guide"):
        render(Renderer(RendererConfig(width=8, depth=2, image_channels=channels, num_classes=3)), masks, guides=guides)


def test_lowpass_known_answers():
    # constant 4x4 blocks average to themselves; bilinear upsampling leaves the block centres' plateau
    blocks = torch.kron(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.ones(4, 4))[None, None]
    low = lowpass(blocks, 4)
    assert low.shape == blocks.shape and float(low.mean()) == pytest.approx(0.5, abs=1e-6)
    assert float(low[0, 0, 0, 0]) == pytest.approx(0.0) and float(low[0, 0, 0, 7]) == pytest.approx(1.0)
    # a checkerboard finer than the pool is erased; pool 1 keeps everything; odd sizes keep their shape
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2).float()[None, None]
    assert torch.allclose(lowpass(checker, 4), torch.full_like(checker, 0.5))
    assert torch.equal(lowpass(checker, 1), checker)
    assert lowpass(torch.rand(1, 3, 10, 13), 4).shape == (1, 3, 10, 13)


def test_configs_without_guide_keys_still_load(tmp_path):
    """Checkpoints and config files from before `guide` existed load as guide: none."""
    old = Renderer(RendererConfig(width=8, depth=2, image_channels=1, num_classes=3)).checkpoint()
    for key in ("guide", "guide_pool"):
        del old["config"][key]
    model = Renderer.from_checkpoint(old)
    assert model.config.guide == "none" and model.config.guide_channels == 0
    assert RendererTrainConfig(model=dict(width=8)).model.guide == "none"


def test_render_is_a_function_of_mask_seed_and_index_and_the_noise_matters():
    torch.manual_seed(0)
    model = Renderer(RendererConfig(width=8, depth=2, image_channels=1, num_classes=3)).eval()
    masks = [blob_mask(np.random.default_rng(i), 16) for i in range(3)]
    a = render(model, masks, seed=4)
    assert len(a) == 3 and a[0].shape == (16, 16, 1) and a[0].dtype == np.float32
    # same seed: the same micrographs; mask n draws its noise from (seed, n) only, so another batch gives them
    # too (up to float rounding: a convolution may sum in another order for another batch size)
    assert all(np.array_equal(x, y) for x, y in zip(a, render(model, masks, seed=4)))
    assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(a, render(model, masks, seed=4, batch_size=2)))
    assert np.allclose(render(model, masks[2], seed=4, indices=[2])[0], a[2], atol=1e-5)
    # another seed or index: other noise, so another micrograph for the same mask
    assert np.abs(render(model, masks, seed=5)[0] - a[0]).max() > 1e-3
    assert np.abs(render(model, masks[0], seed=4, indices=[1])[0] - a[0]).max() > 1e-3
    # without noise maps the renderer is deterministic: the difference above came from the noise
    torch.manual_seed(0)
    plain = Renderer(RendererConfig(width=8, depth=2, noise=False, image_channels=1, num_classes=3)).eval()
    assert np.array_equal(render(plain, masks, seed=4)[0], render(plain, masks, seed=5)[0])
    with pytest.raises(ValueError, match="0..2"):
        render(model, np.full((16, 16), 3))


def test_high_pass_energy_known_answers():
    assert high_pass_energy(torch.full((1, 1, 8, 8), 0.3)) == pytest.approx(0.0)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2
    # inside, a checkerboard pixel differs from its 3x3 mean (4 or 5 of 9 alike) by 4/9 or 5/9
    energy = high_pass_energy(checker.float()[None, None])
    assert 0.15 < energy < 0.31


def test_training_writes_the_run_and_keeps_the_best_validation_score(dataset, tmp_path):
    run = tmp_path / "run"
    summary = train_renderer(dataset, run, tiny(), device="cpu", progress=False)
    for name in ("config.yaml", "checkpoints/best.pt", "checkpoints/last.pt", "log.csv", "manifest.json", "monitor.png"):
        assert (run / name).is_file(), name
    rows = read_csv(run / "log.csv")
    # a row every log_every (2) steps and at every validation (val_every 3), whether or not they coincide
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]
    assert [int(r["step"]) for r in rows if r["val_score"]] == [3, 6]
    assert {"g_loss", "l1", "d_loss", "g_adv", "val_score", "val_l1", "val_hf_ratio"} <= set(rows[-1])
    scores = [float(r["val_score"]) for r in rows if r["val_score"]]
    best = torch.load(run / "checkpoints/best.pt", weights_only=False)
    assert best["val_score"] == pytest.approx(min(scores), abs=1e-5) == pytest.approx(summary["best_score"], abs=1e-5)  # log.csv: 6 significant digits
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["inputs"]["train_tiles"] == 6 and manifest["inputs"]["validated_on"] == "val"
    model = load_renderer(run)
    assert model.config.num_classes == 3 and model.config.image_channels == 1 and not model.training


@pytest.mark.parametrize("guide", ["none", "lowpass"])
def test_resume_equals_an_uninterrupted_run(dataset, tmp_path, guide):
    config = tiny(steps=8, checkpoint_every=4, lr_schedule="cosine", fm_weight=1.0,
                  model=dict(width=8, depth=2, disc_width=8, disc_layers=2, guide=guide))
    train_renderer(dataset, tmp_path / "straight", config, device="cpu", progress=False)
    train_renderer(dataset, tmp_path / "resumed", config, device="cpu", progress=False, stop_after=5)
    train_renderer(dataset, tmp_path / "resumed", config, device="cpu", progress=False, resume=True)
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["modules"]["discriminator"]:
        assert torch.equal(a["modules"]["discriminator"][key], b["modules"]["discriminator"][key]), key
    log_a, log_b = read_csv(tmp_path / "straight/log.csv"), read_csv(tmp_path / "resumed/log.csv")
    assert [(r["step"], r["g_loss"], r["val_score"]) for r in log_a] == [(r["step"], r["g_loss"], r["val_score"]) for r in log_b]


def test_bad_sizes_are_input_errors(dataset, tmp_path):
    with pytest.raises(InputError, match="multiple of 2\\*\\*model.depth"):
        train_renderer(dataset, tmp_path / "a", tiny(tile=18), device="cpu", progress=False)
    with pytest.raises(InputError, match="smaller than the crop"):
        train_renderer(dataset, tmp_path / "b", tiny(tile=64), device="cpu", progress=False)
    with pytest.raises(InputError, match="l1_pool"):
        train_renderer(dataset, tmp_path / "c", tiny(l1_pool=3), device="cpu", progress=False)


def test_known_answer_constant_intensity_per_class(dataset, tmp_path):
    """Each class has one grey level: after a short training the rendered levels per class approach them."""
    config = tiny(steps=250, tile=32, l1_pool=1, log_every=50, val_every=250, checkpoint_every=250, lr=1e-3,
                  lr_disc=1e-3)
    train_renderer(dataset, tmp_path / "run", config, device="cpu", progress=False)
    model = load_renderer(tmp_path / "run")
    folder = DatasetFolder(dataset)
    masks = [folder.load_mask(r) for r in folder.records("val")]
    images = render(model, masks, seed=1)
    for k, level in enumerate(LEVELS):
        rendered = np.concatenate([im[..., 0][m == k] for im, m in zip(images, masks)])
        assert abs(float(np.median(rendered)) - level) < 0.04, (k, float(np.median(rendered)))


def test_known_answer_guide_tells_each_tiles_brightness(tmp_path):
    """Odd tiles have the class levels reversed: from the mask alone the brightness of classes 0 and 2 is
    ambiguous, so the unguided renderer draws about the mean (0.5) for both; the guided one reads it from the
    low-pass micrograph and follows each tile's levels."""
    data = write_pairs(tmp_path / "flip", n=10, flip=True)
    folder = DatasetFolder(data)
    val = folder.records("val")  # t8 (levels as given) and t9 (reversed)
    masks, images = [folder.load_mask(r) for r in val], [folder.load_image(r) for r in val]
    medians = {}
    for guide in ("none", "lowpass"):
        config = tiny(steps=250, tile=32, l1_pool=1, log_every=50, val_every=250, checkpoint_every=250, lr=1e-3,
                      lr_disc=1e-3, model=dict(width=8, depth=2, disc_width=8, disc_layers=2, guide=guide))
        train_renderer(data, tmp_path / guide, config, device="cpu", progress=False)
        model = load_renderer(tmp_path / guide)
        out = render(model, masks, seed=1, guides=images if guide == "lowpass" else None)
        medians[guide] = [[float(np.median(o[..., 0][m == k])) for k in (0, 2)] for o, m in zip(out, masks)]
    expected = [[LEVELS[0], LEVELS[2]], [1 - LEVELS[0], 1 - LEVELS[2]]]
    assert np.abs(np.subtract(medians["lowpass"], expected)).max() < 0.1, medians["lowpass"]
    # unguided: both tiles get (nearly) the same levels, so at least one tile misses its own by far
    assert np.abs(np.subtract(medians["none"], expected)).max() > 0.2, medians["none"]


TINY_SETS = ["--set", "model.width=8", "--set", "model.depth=2", "--set", "model.disc_width=8",
             "--set", "model.disc_layers=2", "--set", "tile=16", "--set", "batch_size=2", "--set", "log_every=2",
             "--set", "val_every=2", "--set", "checkpoint_every=2", "--set", "val_tiles=2"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The project's procedural demo data: RGB micrographs, 4 classes."""
    from dualsynth.demo_data import write_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    write_demo_dataset(out, n=5, size=32, seed=0)
    return out / "hq"


def test_cli_train_renderer_resume_and_render(demo, dataset, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(["train-renderer", "--data", demo, "--out", run, "--steps", 2, "--seed", 1,
                              "--device", "cpu", "--threads", 1, "--no-progress", *TINY_SETS], capsys)
    assert code == 0, err
    assert "trained 2 steps" in out and (run / "checkpoints/best.pt").is_file()
    assert load_renderer(run).config.image_channels == 3
    # --resume alone continues with the run's saved config and dataset (nothing left to do here)
    code, out, err = run_cli(["train-renderer", "--out", run, "--resume", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "trained 2 steps" in out

    code, out, err = run_cli(["render", "--renderer", run, "--data", demo, "--out", tmp_path / "r", "--seed", 3,
                              "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    real, rendered = DatasetFolder(demo), DatasetFolder(tmp_path / "r")
    assert len(rendered.records()) == len(real.records()) and rendered.class_names == real.class_names
    model = load_renderer(run)
    for n, (a, b) in enumerate(zip(real.records(), rendered.records())):
        assert (a.file, a.split, a.source) == (b.file, b.split, b.source) and b.origin == "synthetic"
        assert np.array_equal(real.load_mask(a), rendered.load_mask(b))
        image = rendered.load_image(b)
        assert image.shape == (32, 32, 3) and b.extra["cropped"] == "0"
        expected = render(model, real.load_mask(a), seed=3, indices=[n])[0]
        assert np.abs(image - expected).max() <= 1 / 255 + 1e-6
    assert (tmp_path / "r/grid.png").is_file() and json.loads((tmp_path / "r/render.json").read_text())["tiles"] == 5

    # bad input: one line on stderr, exit code 2
    code, _, err = run_cli(["render", "--renderer", run, "--data", dataset, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "trained on 4 classes, the masks have 3" in err and err.count("\n") == 1
    code, _, err = run_cli(["render", "--renderer", tmp_path / "missing", "--data", demo, "--out", tmp_path / "y"], capsys)
    assert code == 2 and "not a run folder" in err and err.count("\n") == 1
    code, _, err = run_cli(["train-renderer", "--data", demo, "--out", tmp_path / "z", "--preset", "paper"], capsys)
    assert code == 2 and err.count("\n") == 1
    code, _, err = run_cli(["train-renderer", "--data", demo, "--out", tmp_path / "z", "--set", "model.K=3"], capsys)
    assert code == 2 and "unknown config key 'model.K'" in err


def test_cli_render_with_a_guided_renderer_refines_the_datasets_micrographs(demo, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train-renderer", "--data", demo, "--out", run, "--steps", 2, "--device", "cpu",
                            "--threads", 1, "--no-progress", *TINY_SETS, "--set", "model.guide=lowpass"], capsys)
    assert code == 0, err
    model = load_renderer(run)
    assert model.config.guide == "lowpass" and model.config.guide_pool == 4
    code, _, err = run_cli(["render", "--renderer", run, "--data", demo, "--out", tmp_path / "r", "--seed", 3,
                            "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    real, rendered = DatasetFolder(demo), DatasetFolder(tmp_path / "r")
    for n, (a, b) in enumerate(zip(real.records(), rendered.records())):
        guide = real.load_image(a)
        expected = render(model, real.load_mask(a), seed=3, indices=[n], guides=guide)[0]
        assert np.abs(rendered.load_image(b) - expected).max() <= 1 / 255 + 1e-6
    # another guide gives another micrograph for the same mask, seed and index
    assert np.abs(render(model, real.load_mask(a), seed=3, indices=[n], guides=1 - guide)[0] - expected).max() > 1e-3
    # a guided renderer of RGB micrographs cannot refine grey ones: one line, exit code 2
    grey = write_pairs(tmp_path / "grey", n=4)
    rgb = write_pairs(tmp_path / "rgb", n=4, rgb=True)
    code, _, err = run_cli(["train-renderer", "--data", rgb, "--out", tmp_path / "rgb-run", "--steps", 1, "--device",
                            "cpu", "--no-progress", *TINY_SETS, "--set", "model.guide=lowpass"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["render", "--renderer", tmp_path / "rgb-run", "--data", grey, "--out", tmp_path / "x",
                            "--device", "cpu"], capsys)
    assert code == 2 and "refines 3-channel micrographs, the guides have 1" in err and err.count("\n") == 1


def test_sample_with_a_renderer_draws_the_micrographs_for_the_clean_masks(dataset, tmp_path, capsys):
    from dualsynth.training.prior import PriorTrainConfig, train_prior
    from dualsynth.training.vqvae import VQVAETrainConfig, train_vqvae

    vq, prior, rend = tmp_path / "vq", tmp_path / "prior", tmp_path / "rend"
    train_vqvae(dataset, vq, VQVAETrainConfig(
        model=dict(hidden=8, res_hidden=4, res_layers=1, embedding_dim=4, num_embeddings=6, dead_code_steps=0),
        tile=16, batch_size=4, steps=10, log_every=5, monitor_every=10, checkpoint_every=10), device="cpu", progress=False)
    train_prior(vq, prior, PriorTrainConfig(arch="gated", gated=dict(hidden=8, num_layers=3, skip=8), crop=4,
                                            batch_size=4, steps=5, eval_every=5, checkpoint_every=5),
                device="cpu", progress=False)
    train_renderer(dataset, rend, tiny(steps=2), device="cpu", progress=False)
    guided = tmp_path / "guided"
    train_renderer(dataset, guided, tiny(steps=2, model=dict(width=8, depth=2, disc_width=8, disc_layers=2,
                                                             guide="lowpass")), device="cpu", progress=False)
    args = ["sample", "--prior", prior, "--n", 3, "--seed", 2, "--min-object-area", 4, "--workers", 1,
            "--device", "cpu", "--no-progress"]
    code, _, err = run_cli([*args, "--out", tmp_path / "plain", "--texture", "none"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*args, "--out", tmp_path / "rendered", "--renderer", rend], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "rendered/sample.json").read_text())["texture"] is None  # auto: the renderer draws it
    plain, rendered = DatasetFolder(tmp_path / "plain"), DatasetFolder(tmp_path / "rendered")
    model = load_renderer(rend)
    changed = 0
    for i, (a, b) in enumerate(zip(plain.records(), rendered.records())):
        mask = rendered.load_mask(b)
        assert np.array_equal(plain.load_mask(a), mask)  # the renderer changes the micrographs only
        expected = render(model, mask, seed=2, indices=[i])[0]
        assert np.abs(rendered.load_image(b) - expected).max() <= 1 / 255 + 1e-6
        changed += np.abs(rendered.load_image(b) - plain.load_image(a)).max() > 0.05
    assert changed == 3
    assert json.loads((tmp_path / "rendered/sample.json").read_text())["renderer"] == str(rend.resolve())
    # a guided renderer refines the VQ-VAE's micrograph (without a guide `render` would raise): its output is the
    # rendering with that micrograph as guide (saved in `plain` as 8-bit, so up to the guide's rounding)
    code, _, err = run_cli([*args, "--out", tmp_path / "refined", "--renderer", guided], capsys)
    assert code == 0, err
    refined, model = DatasetFolder(tmp_path / "refined"), load_renderer(guided)
    for i, (a, b) in enumerate(zip(plain.records(), refined.records())):
        mask = refined.load_mask(b)
        assert np.array_equal(plain.load_mask(a), mask)
        expected = render(model, mask, seed=2, indices=[i], guides=plain.load_image(a))[0]
        assert np.abs(refined.load_image(b) - expected).max() <= 1 / 255 + 1e-3
    # a missing renderer run: one line, exit code 2
    code, _, err = run_cli([*args, "--out", tmp_path / "bad", "--renderer", tmp_path / "missing"], capsys)
    assert code == 2 and "not a run folder" in err
