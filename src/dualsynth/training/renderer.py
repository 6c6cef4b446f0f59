"""Training the renderer (the two-stage generator's mask -> micrograph stage) on a dataset's real pairs.

The paper has no renderer: its micrographs come out of the VQ-VAE together with the masks. This trainer fits
`dualsynth.models.renderer.Renderer` to the real (micrograph, mask) pairs of a dataset folder's train split,
as random crops, against a conditional PatchGAN discriminator:

- discriminator: hinge loss, relu(1 - D(real)) + relu(1 + D(fake));
- generator: `adv_weight` x (-D(fake)) + `l1_weight` x L1 between the micrographs average-pooled by `l1_pool`
  + `fm_weight` x L1 between the discriminator's features of real and rendered tiles (pix2pixHD). The L1 term
  is taken on pooled images so that it fixes each phase's brightness and shading but leaves the pixel-scale
  noise and texture to the discriminator (a pixel-wise L1 rewards the mean and so the blur this stage exists
  to remove; `l1_pool: 1` gives it back).

With `model.guide: lowpass` the generator and the discriminator also get `lowpass(real, model.guide_pool)`,
the real crop average-pooled and upsampled back (what a VQ-VAE reconstruction knows of it), and validation
renders with the real validation micrographs as guides.

Validation (`val_every` steps) renders the validation tiles' masks with fixed noise and scores the result:
`val_l1` (pooled L1 to the real micrographs) + `val_hf_weight` x |log2(high-pass energy ratio)|, where the
ratio is the rendered over the real tiles' energy of image minus its 3x3 box blur (1: same fine texture, blur
drives it to 0). The lowest score is kept in checkpoints/best.pt. Everything random (init, data order, crops,
flips, training noise) is a function of the seed and the step, so a resumed run equals one never stopped.

Python API: `RendererTrainConfig`, `PRESETS`, `train_renderer(data_dir, out_dir, config)`, `saved_run_config`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from dualsynth.config import TrainingConfig, apply_threads, resolve_device
from dualsynth.data import DatasetFolder, colorize_mask
from dualsynth.engine import Engine, adam, scheduled_lr, step_batch
from dualsynth.errors import InputError
from dualsynth.io import save_figure, to_uint8
from dualsynth.models.renderer import (
    RUN_KIND as KIND,
    PatchDiscriminator,
    Renderer,
    RendererArchitecture,
    RendererConfig,
    load_renderer,
    lowpass,
    onehot_masks,
    render,
)
from dualsynth.runs import RunFolder
from dualsynth.training.vqvae import crop_to_multiple, joint_batch


class RendererTrainConfig(TrainingConfig):
    """Everything `train-renderer` reads from a preset, a config file or `--set key=value`."""

    model: RendererArchitecture = Field(default_factory=RendererArchitecture)
    tile: int = Field(64, ge=8, description="side of the random square training crops (a multiple of 2**model.depth)")
    augment: bool = Field(True, description="random flips and 90-degree rotations of training crops")
    batch_size: int = Field(8, ge=1, description="crops per update")
    steps: int = Field(2000, ge=1, description="training updates (one discriminator and one generator step each)")
    lr: float = Field(2e-4, gt=0, description="Adam learning rate of the generator (betas 0.5, 0.999 as in pix2pix)")
    lr_disc: float = Field(2e-4, gt=0, description="Adam learning rate of the discriminator")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant, or cosine decay to 5% of both learning rates at the last step"
    )
    l1_weight: float = Field(10.0, ge=0, description="weight of the L1 loss between pooled rendered and real micrographs")
    l1_pool: int = Field(4, ge=1, description="average-pool both micrographs by this factor before the L1 loss (1: pixel-wise, pix2pix)")
    adv_weight: float = Field(1.0, ge=0, description="weight of the adversarial (hinge) loss of the generator (0: no discriminator)")
    fm_weight: float = Field(0.0, ge=0, description="weight of the discriminator feature-matching L1 loss (pix2pixHD)")
    val_tiles: int = Field(16, ge=1, description="at most this many validation tiles are rendered at each validation")
    val_hf_weight: float = Field(0.02, ge=0, description="weight of |log2(high-pass energy ratio)| in the validation score")
    log_every: int = Field(50, ge=1, description="steps per log.csv row (window means)")
    val_every: int = Field(250, ge=1, description="steps per validation (and best.pt check)")
    checkpoint_every: int = Field(500, ge=1, description="steps per checkpoints/last.pt")


PRESETS: dict[str, dict[str, Any]] = {
    # The paper has no renderer (its micrographs come from the VQ-VAE), so there is no `paper` preset.
    # quick: a few minutes on one core of a 2-core CPU (README: measured on the demo data). At 64 px crops the
    # full-resolution convolutions dominate the cost: width 16 and batch 4 take a third of width 24 and batch 8.
    "quick": {
        "model": {"width": 16, "depth": 3, "noise": True, "disc_width": 16, "disc_layers": 3, "guide": "none",
                  "guide_pool": 4},
        "tile": 64,
        "batch_size": 4,
        "steps": 2000,
        "lr": 2e-4,
        "lr_disc": 2e-4,
        "l1_weight": 10.0,
        "l1_pool": 4,
        "adv_weight": 1.0,
        "fm_weight": 0.0,
        "log_every": 50,
        "val_every": 250,
        "checkpoint_every": 500,
    },
}


def saved_run_config(run_dir: str | Path) -> tuple[RendererTrainConfig, Path | None]:
    """The training config and dataset a run was started with (from RUN/config.yaml), for `--resume`."""
    config, inputs = RunFolder.open(run_dir, kind=KIND).saved_config(RendererTrainConfig, ("data",))
    return config, Path(inputs["data"]) if inputs["data"] else None


# --- data ---------------------------------------------------------------------------------------------------


def load_pairs(folder: DatasetFolder, records: Sequence[Any]) -> list[torch.Tensor]:
    """(C_img + 1, H, W) float tensors: the micrograph channels, then the class index as a float channel."""
    return [torch.cat([torch.from_numpy(np.moveaxis(folder.load_image(r), -1, 0).copy()),
                       torch.from_numpy(folder.load_mask(r)).float()[None]]) for r in records]


def split_pairs(x: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of `load_pairs` tensors -> (micrographs (B, C_img, H, W), one-hot masks (B, C, H, W))."""
    return x[:, :-1], onehot_masks(x[:, -1].round().long(), num_classes)


def high_pass_energy(images: torch.Tensor) -> float:
    """Mean squared difference between images (B, C, H, W) and their 3x3 box blur: the fine-texture energy."""
    images = images.float()
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return float(((images - blurred) ** 2).mean())


def guide_of(model: Renderer, image: np.ndarray | torch.Tensor) -> np.ndarray | None:
    """What `render` takes as the guide of a real micrograph ((C, H, W) tensor or (H, W, C) array): the
    micrograph itself as (H, W, C) when the renderer has a guide, else None."""
    if not model.config.guide_channels:
        return None
    return np.moveaxis(image.numpy(), 0, -1) if isinstance(image, torch.Tensor) else image


def validation_scores(model: Renderer, pairs: Sequence[torch.Tensor], config: RendererTrainConfig) -> dict[str, float]:
    """Render the masks of `pairs` with noise seed `config.seed` and score them against the real micrographs:
    val_l1 (pooled L1), val_hf_ratio (high-pass energy, rendered / real) and val_score (the best.pt rule)."""
    l1, real_energy, fake_energy = 0.0, 0.0, 0.0
    for n, pair in enumerate(pairs):
        real = pair[:-1][None]
        mask = pair[-1].round().long()
        fake = torch.from_numpy(np.moveaxis(render(model, mask, config.seed, indices=[n],
                                                   guides=guide_of(model, real[0]))[0], -1, 0))[None]
        l1 += float(F.l1_loss(F.avg_pool2d(fake, config.l1_pool), F.avg_pool2d(real, config.l1_pool)))
        real_energy += high_pass_energy(real)
        fake_energy += high_pass_energy(fake)
    ratio = fake_energy / real_energy if real_energy > 0 else float("nan")
    l1 /= max(len(pairs), 1)
    hf_term = abs(float(np.log2(max(ratio, 1e-6)))) if ratio == ratio else 0.0
    return {"val_l1": l1, "val_hf_ratio": ratio, "val_score": l1 + config.val_hf_weight * hf_term}


# --- training -----------------------------------------------------------------------------------------------


def _records(folder: DatasetFolder) -> tuple[list, list]:
    train = list(folder.records(split="train"))
    if not train:
        raise InputError(folder.path, "dataset has no 'train' tiles")
    return train, list(folder.records(split="val")) or train


def train_renderer(
    data_dir: str | Path,
    out_dir: str | Path,
    config: RendererTrainConfig,
    *,
    resume: bool = False,
    device: str = "auto",
    threads: str | int | None = "auto",
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a renderer on the train split of `data_dir` into the run folder `out_dir`; return a summary.

    Validates on the `val` split (the train split when there is none). `resume` continues `out_dir` from
    checkpoints/last.pt (same config required). `stop_after` ends this call after that many updates, as if
    the run had been killed there (for tests); the checkpoint is still written.
    """
    apply_threads(threads)
    dev = resolve_device(device)
    folder = DatasetFolder(data_dir)
    model_config = RendererConfig(**config.model.model_dump(), image_channels=folder.image_channels,
                                  num_classes=folder.num_classes)
    if config.tile % model_config.multiple:
        raise InputError("tile", f"{config.tile} is not a multiple of 2**model.depth = {model_config.multiple}")
    if config.tile % config.l1_pool:
        raise InputError("l1_pool", f"tile={config.tile} is not a multiple of l1_pool={config.l1_pool}")
    run_config = {"data": str(Path(data_dir)), **config.model_dump(mode="json"), "device": device}
    run = RunFolder.create(out_dir, run_config, kind=KIND, resume=resume)

    train_recs, val_recs = _records(folder)
    train_pairs = load_pairs(folder, train_recs)
    smallest = min(min(t.shape[-2:]) for t in train_pairs)
    if smallest < config.tile:
        raise InputError(data_dir, f"train tiles ({smallest} px) are smaller than the crop tile={config.tile}")
    val_pairs = [crop_to_multiple(p, math.lcm(model_config.multiple, config.l1_pool))
                 for p in load_pairs(folder, val_recs[: config.val_tiles])]

    torch.manual_seed(config.seed)
    generator = Renderer(model_config).to(dev)
    disc = PatchDiscriminator(model_config).to(dev)
    engine = Engine(
        run, dev, models={"renderer": generator, "discriminator": disc},
        optimizers={"main": adam(generator.parameters(), config.lr, betas=(0.5, 0.999)),
                    "disc": adam(disc.parameters(), config.lr_disc, betas=(0.5, 0.999))},
        seed=config.seed, total=config.steps, unit="step", run_config=run_config, precision=config.precision,
        deterministic=config.deterministic,
    )
    if resume:
        engine.resume()
    inputs = {"data": str(Path(data_dir)), "train_tiles": len(train_recs), "val_tiles": len(val_pairs),
              "validated_on": "val" if folder.records(split="val") else "train"}
    run.write_manifest(inputs)
    pool = config.l1_pool

    def update(step: int) -> None:
        idx = step_batch(len(train_pairs), config.batch_size, config.seed, step)
        real, onehot = split_pairs(joint_batch(train_pairs, idx, config.tile, config.augment, config.seed, step), folder.num_classes)
        real, onehot = real.to(dev), onehot.to(dev)
        noise = generator.draw_noise(real.shape[0], *real.shape[-2:])  # torch's global stream, seeded per step
        guide = lowpass(real, model_config.guide_pool) if model_config.guide_channels else None
        for name, lr in (("main", config.lr), ("disc", config.lr_disc)):
            engine.set_lr(scheduled_lr(lr, config.lr_schedule, step, config.steps), name)
        values: dict[str, float] = {}
        with engine.autocast():
            fake = generator(onehot, noise, guide)
        if config.adv_weight > 0:
            with engine.autocast():
                real_score, real_features = disc(real, onehot, guide)
                fake_score, _ = disc(fake.detach(), onehot, guide)
            d_loss = F.relu(1 - real_score.float()).mean() + F.relu(1 + fake_score.float()).mean()
            engine.optimize(d_loss, "disc")
            values.update(d_loss=d_loss.item(), d_real=real_score.float().mean().item(),
                          d_fake=fake_score.float().mean().item())
        l1 = F.l1_loss(F.avg_pool2d(fake.float(), pool), F.avg_pool2d(real, pool))
        loss = config.l1_weight * l1
        if config.adv_weight > 0:
            disc.requires_grad_(False)
            with engine.autocast():
                score, features = disc(fake, onehot, guide)
            disc.requires_grad_(True)
            adv = -score.float().mean()
            loss = loss + config.adv_weight * adv
            values["g_adv"] = adv.item()
            if config.fm_weight > 0:
                fm = sum(F.l1_loss(f.float(), r.detach().float()) for f, r in zip(features, real_features))
                loss = loss + config.fm_weight * fm
                values["g_fm"] = fm.item()
        engine.optimize(loss, "main")
        values.update(g_loss=loss.item(), l1=l1.item())
        engine.accumulate(values, items=real.shape[0])

    def after(step: int, _: Any) -> dict[str, Any] | None:
        step += 1  # updates done
        shown = None
        validate = step % config.val_every == 0 or step == config.steps
        if step % config.log_every == 0 or validate:
            row: dict[str, Any] = {"step": step, **engine.window_means(), "tiles_per_s": engine.throughput()}
            if validate:
                row.update(validation_scores(generator, val_pairs, config))
                engine.keep_if_best(row["val_score"], "min", **{k: row[k] for k in ("val_score", "val_l1", "val_hf_ratio")})
            engine.log(row)
            shown = {"l1": f"{row['l1']:.4f}"}
            if "val_score" in row:
                shown.update(val=f"{row['val_score']:.4f}", hf=f"{row['val_hf_ratio']:.2f}")
        return shown

    engine.run_loop(update, after, checkpoint_every=config.checkpoint_every, stop_after=stop_after,
                    progress=progress, desc="train-renderer")
    summary: dict[str, Any] = {"step": engine.done, "best_step": engine.state["best_at"],
                               "best_score": engine.state["best"]}
    if run.has_checkpoint("best"):
        best = run.load_checkpoint("best")
        summary.update({k: best[k] for k in ("val_l1", "val_hf_ratio") if k in best})
        draw_monitor_figure(run.path / "monitor.png", load_renderer(run.path, dev), folder, val_recs[:4], config.seed,
                            f"step {best['step']}")
    run.write_manifest(inputs, device=str(dev), precision=engine.amp_name, threads=torch.get_num_threads(),
                       steps_done=engine.done, best_step=engine.state["best_at"])
    return summary


# --- monitoring ---------------------------------------------------------------------------------------------


def _rgb(image: np.ndarray) -> np.ndarray:
    image = to_uint8(np.clip(image, 0, 1))
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def draw_monitor_figure(path: Path, model: Renderer, folder: DatasetFolder, records: Sequence[Any], seed: int,
                        title: str = "") -> None:
    """monitor.png: per validation tile (at most 256 px) the real micrograph, its mask, and two renderings of
    that mask with different noise (seed and seed + 1); a guided renderer refines the real micrograph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for n, rec in enumerate(records):
        m = model.config.multiple
        image = folder.load_image(rec)[:256, :256]
        mask = folder.load_mask(rec)[:256, :256]
        h, w = mask.shape[0] // m * m, mask.shape[1] // m * m
        image, mask = image[:h, :w], mask[:h, :w]
        rendered = [render(model, mask, s, indices=[n], guides=guide_of(model, image))[0] for s in (seed, seed + 1)]
        rows.append((rec.file, image, mask, rendered))
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for ax_row, (name, image, mask, rendered) in zip(axes, rows):
        panels = [_rgb(image), colorize_mask(mask, folder.classes), _rgb(rendered[0]), _rgb(rendered[1])]
        for ax, panel in zip(ax_row, panels):
            ax.imshow(panel, interpolation="nearest")
            ax.axis("off")
        ax_row[0].set_title(name, fontsize=8)
    for ax, text in zip(axes[0][1:], ("mask", f"rendered (seed {seed})", f"rendered (seed {seed + 1})")):
        ax.set_title(text, fontsize=9)
    fig.suptitle(f"renderer on validation masks: real | mask | two renderings ({title})", fontsize=10)
    save_figure(path, fig)
