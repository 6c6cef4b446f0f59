"""Training, encoding and reporting for the VQ-VAE (the paper's section 4.1, Figures 7-9).

`train_vqvae` trains on a dataset folder's train split and writes a run folder (config.yaml, checkpoints/best.pt
and last.pt, log.csv, monitor.png, recon_error.png, report.json, manifest.json). Beside the paper's MSE loss it
offers L1 and a focal frequency loss on the micrograph, cross-entropy (optionally class-balanced) on onehot
masks, and a PatchGAN adversary on the decoder as in VQGAN (`dualsynth.models.discriminator`; a second model
and optimizer, "disc", on the same engine). Everything random in a run
(model init, data order, crops, flips, k-means init, dead-code restarts) is a function of the seed and the step,
so a run stopped at step k and resumed gives the same weights as one that was never stopped.

The loop itself is `dualsynth.engine.Engine`; this module contributes the VQ-VAE's step, log row, best
rule and figures. Loading and running a trained VQ-VAE (`load_vqvae`, `encode`, `decode`, `reconstruct`) lives
next to the model in `dualsynth.models.vqvae`.

Python API: `VQVAETrainConfig`, `PRESETS`, `train_vqvae(data_dir, out_dir, config)`,
`report_vqvae(run_dir, data_dir)`, `encode_dataset(run_dir, data_dir, out_dir)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from dualsynth.config import TrainingConfig, apply_threads, resolve_device
from dualsynth.data import (
    ClassInfo,
    DatasetFolder,
    colorize_mask,
    join_pair,
    joint_to_pairs,
    random_dihedral,
    split_joint,
)
from dualsynth.engine import Engine, adam, scheduled_lr, step_batch
from dualsynth.errors import InputError
from dualsynth.io import atomic_path, read_csv, save_figure, save_png, to_uint8, write_json
from dualsynth.metrics import SegmentationScores
from dualsynth.models.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    output_side,
)
from dualsynth.models.vqvae import (
    RUN_KIND as KIND,
    VQVAE,
    VQVAEArchitecture,
    VQVAEConfig,
    decode,
    encode,
    focal_frequency_loss,
    load_vqvae,
    reconstruct,
    reconstruction_losses,
)
from dualsynth.runs import RunFolder


class VQVAETrainConfig(TrainingConfig):
    """Everything `train-vqvae` reads from a preset, a config file or `--set key=value`."""

    model: VQVAEArchitecture = Field(default_factory=VQVAEArchitecture)
    mask_encoding: Literal["levels", "onehot"] = Field(
        "levels", description="levels: one mask channel, class k at k/(C-1) (paper); onehot: C channels"
    )
    mask_weight: float = Field(1.0, ge=0, description="weight of the mask-channel term in the loss")
    image_loss: Literal["mse", "l1"] = Field(
        "mse", description="loss on the micrograph channels: mse (paper) or l1 (mean absolute error)"
    )
    focal_frequency_weight: float = Field(
        0.0, ge=0, description="weight of the focal frequency loss (Jiang et al. 2021) on the micrograph channels "
        "(0: off)"
    )
    mask_loss: Literal["mse", "cross_entropy"] = Field(
        "mse", description="loss on the mask channels: mse (paper), or cross_entropy over the C onehot channels as "
        "class logits (needs mask_encoding onehot; samples take the argmax)"
    )
    mask_class_weights: Literal["none", "balanced"] = Field(
        "none", description="class weights of the mask cross-entropy: none, or balanced (total pixels / (C x class "
        "pixels) over the training tiles, so rare classes count as much as common ones)"
    )
    adversarial_weight: float = Field(
        0.0, ge=0, description="weight of the PatchGAN hinge loss on the decoder, times VQGAN's adaptive weight (0: off)"
    )
    adversarial_start: int = Field(
        1000, ge=0, description="update from which the discriminator trains and the adversarial loss counts"
    )
    discriminator: DiscriminatorConfig = Field(
        default_factory=DiscriminatorConfig, description="the adversary (used when adversarial_weight > 0)"
    )
    tile: int | None = Field(
        None, ge=8, description="train on random square crops of this side (None: whole dataset tiles)"
    )
    augment: bool = Field(True, description="random flips and 90-degree rotations of training tiles")
    batch_size: int = Field(8, ge=1, description="tiles per update (paper: 8)")
    steps: int = Field(50_000, ge=1, description="training updates (paper: 50,000)")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate (Sonnet's example: 3e-4)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant (Sonnet, paper) or cosine decay to 5% of lr at the last step"
    )
    log_every: int = Field(100, ge=1, description="steps per log.csv row (window means); best.pt is checked here")
    monitor_every: int = Field(1000, ge=1, description="steps per monitoring figure (paper Figs. 7 and 8)")
    checkpoint_every: int = Field(1000, ge=1, description="steps per checkpoints/last.pt")

    @model_validator(mode="after")
    def _mask_loss_fits_the_encoding(self) -> "VQVAETrainConfig":
        if self.mask_loss == "cross_entropy" and self.mask_encoding != "onehot":
            raise ValueError("mask_loss cross_entropy needs mask_encoding onehot (one logit channel per class)")
        if self.mask_class_weights != "none" and self.mask_loss != "cross_entropy":
            raise ValueError("mask_class_weights needs mask_loss cross_entropy")
        return self

    @property
    def adversarial(self) -> bool:
        return self.adversarial_weight > 0


PRESETS: dict[str, dict[str, Any]] = {
    # the paper's Table 4: 256x256 tiles, batch 8, D=64, K=10, 50,000 updates; the rest is Sonnet's example
    # (widths, EMA codebook with decay 0.99, commitment 0.25, Adam 3e-4, no augmentation). Our additions are
    # off: no k-means codebook start, no dead-code restart, no flips. README lists what still differs.
    "paper": {
        "model": {"hidden": 128, "res_hidden": 32, "res_layers": 2, "embedding_dim": 64, "num_embeddings": 10,
                  "kmeans_init": False, "dead_code_steps": 0},
        "mask_encoding": "levels",
        "mask_weight": 1.0,
        "augment": False,
        "lr_schedule": "constant",
        "tile": None,
        "batch_size": 8,
        "steps": 50_000,
        "lr": 3e-4,
        "log_every": 100,
        "monitor_every": 1000,
        "checkpoint_every": 1000,
    },
    # about 2-4 minutes on a busy 2-core CPU with --threads 1 (measured on the NASA superalloy tiles: mask pixel
    # accuracy 0.988 on validation tiles): narrower trunk, 64 px crops, many cheap steps. At equal time, more
    # steps on small crops beat larger crops (128 px) and a wider trunk (hidden 128).
    # One mask channel per class (onehot): on nasa-super it raised the reconstruction IoU of the rare tertiary
    # class from 0.836 to 0.856 and U-Nets trained on its synthetic pairs alone from 40 to about 72 % test
    # Missing Class IoU (docs/fidelity.md); on the demo data the rarest class's IoU went from 0.61 to 0.81.
    "quick": {
        "model": {"hidden": 64, "res_hidden": 32, "res_layers": 2, "embedding_dim": 64, "num_embeddings": 10},
        "mask_encoding": "onehot",
        "tile": 64,
        "batch_size": 8,
        "steps": 4000,
        "lr": 1e-3,
        "log_every": 50,
        "monitor_every": 500,
        "checkpoint_every": 500,
    },
}


def saved_run_config(run_dir: str | Path) -> tuple[VQVAETrainConfig, Path | None]:
    """The training config and dataset a run was started with (from RUN/config.yaml), for `--resume`."""
    config, inputs = RunFolder.open(run_dir, kind=KIND).saved_config(VQVAETrainConfig, ("data",))
    return config, Path(inputs["data"]) if inputs["data"] else None


# --- data ---------------------------------------------------------------------------------------------------


def load_joint_tiles(folder: DatasetFolder, records: Sequence[Any], encoding: str) -> list[torch.Tensor]:
    """Joint images (C_img + C_mask, H, W) float32 of the given records, in record order."""
    return [
        torch.as_tensor(join_pair(folder.load_image(rec), folder.load_mask(rec), folder.num_classes, encoding)).float()
        for rec in records
    ]


def crop_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Trim the bottom and right edges of (..., H, W) so H and W are multiples of `multiple`."""
    h, w = x.shape[-2] // multiple * multiple, x.shape[-1] // multiple * multiple
    return x[..., :h, :w]


def joint_batch(
    tiles: torch.Tensor | Sequence[torch.Tensor], indices: np.ndarray, tile: int | None, augment: bool, seed: int, step: int
) -> torch.Tensor:
    """The batch of update `step`: random crops of side `tile` (or whole tiles), random flips/rotations."""
    rng = np.random.default_rng([seed, step, 1])
    out = []
    for i in indices:
        x = tiles[int(i)]
        if tile is not None:
            top = int(rng.integers(0, x.shape[-2] - tile + 1))
            left = int(rng.integers(0, x.shape[-1] - tile + 1))
            x = x[:, top : top + tile, left : left + tile]
        if augment:
            (x,) = random_dihedral(rng, x)
        out.append(x)
    return torch.stack(out).contiguous()


# --- training -----------------------------------------------------------------------------------------------


def _resolved_model_config(config: VQVAETrainConfig, folder: DatasetFolder) -> VQVAEConfig:
    return VQVAEConfig(
        **config.model.model_dump(),
        image_channels=folder.image_channels,
        num_classes=folder.num_classes,
        mask_encoding=config.mask_encoding,
        mask_logits=config.mask_loss == "cross_entropy",
    )


def balanced_class_weights(masks: Sequence[np.ndarray] | Sequence[torch.Tensor], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights over the pixels of `masks` (class indices): total / (C x count of class
    k), so every class present carries the same total weight; 0 for a class with no pixels."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for m in masks:
        counts += np.bincount(np.asarray(m).ravel(), minlength=num_classes)[:num_classes]
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


def _split_records(folder: DatasetFolder) -> tuple[list, list]:
    train = list(folder.records(split="train"))
    if not train:
        raise InputError(folder.path, "dataset has no 'train' tiles")
    val = list(folder.records(split="val"))
    return train, val


def _stack_same_size(tiles: list[torch.Tensor], what: str, path: Any) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tiles}
    if len(shapes) > 1:
        raise InputError(path, f"{what} tiles differ in size ({sorted(shapes)[:3]}...); set 'tile' to crop them")
    return torch.stack(tiles)


def train_vqvae(
    data_dir: str | Path,
    out_dir: str | Path,
    config: VQVAETrainConfig,
    *,
    resume: bool = False,
    device: str = "auto",
    threads: str | int | None = "auto",
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a VQ-VAE on the train split of `data_dir` into the run folder `out_dir`; return a summary.

    `resume` continues `out_dir` from checkpoints/last.pt (same config required). `threads`: torch CPU threads
    (`auto`: `dualsynth.config.auto_threads`). `stop_after` ends this call after that many updates, as if the
    run had been killed there (for tests); the checkpoint is still written.
    """
    apply_threads(threads)
    dev = resolve_device(device)
    folder = DatasetFolder(data_dir)
    model_config = _resolved_model_config(config, folder)
    run_config = {"data": str(Path(data_dir)), **config.model_dump(mode="json"), "device": device}
    run = RunFolder.create(out_dir, run_config, kind=KIND, resume=resume, defaults=type(config)().model_dump(mode="json"))

    train_recs, val_recs = _split_records(folder)
    train_tiles = load_joint_tiles(folder, train_recs, config.mask_encoding)
    if config.tile is None:
        train_tiles = crop_to_multiple(_stack_same_size(train_tiles, "train", data_dir), model_config.downsample)
        if min(train_tiles.shape[-2:]) < model_config.downsample:
            raise InputError(data_dir, "tiles are smaller than the model's downsampling factor")
    else:
        if config.tile % model_config.downsample:
            raise InputError("tile", f"{config.tile} is not a multiple of downsample={model_config.downsample}")
        smallest = min(min(t.shape[-2:]) for t in train_tiles)
        if smallest < config.tile:
            raise InputError(data_dir, f"train tiles ({smallest} px) are smaller than the crop tile={config.tile}")
    monitor_rec, monitor_joint = _monitor_tile(folder, val_recs or train_recs, config, model_config)

    torch.manual_seed(config.seed)
    model = VQVAE(model_config).to(dev)
    c_img = model_config.image_channels
    class_weights = None
    if config.mask_class_weights == "balanced":
        class_weights = balanced_class_weights([t[c_img:].argmax(0) for t in train_tiles], folder.num_classes).to(dev)
    models: dict[str, torch.nn.Module] = {"vqvae": model}
    optimizers = {"main": adam(model.parameters(), config.lr)}
    disc = None
    if config.adversarial:
        dc = config.discriminator
        side = config.tile if config.tile is not None else min(train_tiles.shape[-2:])
        if output_side(side, dc.layers) < 1:
            raise InputError("discriminator.layers", f"{dc.layers} stride-2 layers leave nothing of {side} px tiles; "
                             "use fewer layers or a larger tile")
        disc = PatchDiscriminator(c_img if dc.sees == "image" else model_config.in_channels, dc.channels,
                                  dc.layers).to(dev)
        models["disc"] = disc
        # VQGAN's Adam betas for the adversary; the VQ-VAE keeps the paper's optimizer
        optimizers["disc"] = adam(disc.parameters(), dc.lr or config.lr, betas=(0.5, 0.9))
    engine = Engine(
        run, dev, models=models, optimizers=optimizers,
        seed=config.seed, total=config.steps, unit="step", state={"history": []}, run_config=run_config,
        precision=config.precision, deterministic=config.deterministic,
    )
    if resume:
        engine.resume()
    inputs = {"data": str(Path(data_dir)), "train_tiles": len(train_recs), "val_tiles": len(val_recs)}
    if class_weights is not None:
        inputs["mask_class_weights"] = [round(float(w), 6) for w in class_weights.cpu()]
    run.write_manifest(inputs)

    def disc_view(joint: torch.Tensor) -> torch.Tensor:
        return joint[:, :c_img] if config.discriminator.sees == "image" else joint

    plain_mse = config.image_loss == "mse" and config.mask_loss == "mse" and not model_config.mask_logits

    def update(step: int) -> None:
        idx = step_batch(len(train_tiles), config.batch_size, config.seed, step)
        x = joint_batch(train_tiles, idx, config.tile, config.augment, config.seed, step).to(dev)
        with engine.autocast():
            out = model(x)
        image_term, mask_term = reconstruction_losses(x, out.recon, c_img, config.image_loss, config.mask_loss,
                                                      class_weights)
        rec = image_term
        values: dict[str, float] = {}
        if config.focal_frequency_weight > 0:
            ffl = focal_frequency_loss(out.recon[:, :c_img], x[:, :c_img])
            rec = rec + config.focal_frequency_weight * ffl
            values["ffl"] = ffl.item()
        loss = rec + config.mask_weight * mask_term + out.vq_loss.float()
        adversary_on = disc is not None and step >= config.adversarial_start
        if disc is not None:
            g_adv = weight = torch.zeros(())
            if adversary_on:
                with engine.autocast():
                    g_adv = generator_loss(disc(disc_view(model.output(out.recon))))
                last = model.decoder.net[-1].weight
                weight = config.adversarial_weight * adaptive_weight(rec, g_adv, last)
                loss = loss + weight * g_adv
            values.update(g_adv=g_adv.item(), adv_weight=weight.item())
        lr = scheduled_lr(config.lr, config.lr_schedule, step, config.steps)
        engine.set_lr(lr, "main")
        engine.optimize(loss, "main")
        if disc is not None:
            d_loss = real_logit = fake_logit = torch.zeros(())
            if adversary_on:
                with engine.autocast():
                    logits_real = disc(disc_view(x))
                    logits_fake = disc(disc_view(model.output(out.recon.detach())))
                d_loss = hinge_d_loss(logits_real, logits_fake)
                real_logit, fake_logit = logits_real.detach().float().mean(), logits_fake.detach().float().mean()
                d_lr = config.discriminator.lr or config.lr
                engine.set_lr(scheduled_lr(d_lr, config.lr_schedule, step, config.steps), "disc")
                engine.optimize(d_loss, "disc")
            values.update(d_loss=d_loss.item(), d_real=real_logit.item(), d_fake=fake_logit.item())
        with torch.no_grad():
            # MSEs of what decoding returns (mask probabilities for cross-entropy), whatever the training loss
            if plain_mse:  # then they are the loss terms already computed
                image_mse, mask_mse = image_term.detach(), mask_term.detach()
            else:
                image_mse, mask_mse = reconstruction_losses(x, model.output(out.recon.detach()).float(), c_img)
            # the MSE over all channels, as the channel-weighted mean of the two
            recon_error = ((c_img * image_mse + (x.shape[1] - c_img) * mask_mse) / x.shape[1]).item()
        if config.image_loss != "mse":
            values["image_l1"] = image_term.item()
        if config.mask_loss != "mse":
            values["mask_ce"] = mask_term.item()
        engine.accumulate({
            "loss": loss.item(), "recon_error": recon_error, "image_mse": image_mse.item(),
            "mask_mse": mask_mse.item(), "vq_loss": out.vq_loss.item(), "perplexity": out.perplexity.item(),
            "codes_in_use": float(out.codes_in_use), **values,
        }, items=x.shape[0])

    def after(step: int, _: Any) -> dict[str, Any] | None:
        step += 1  # updates done
        shown = None
        if step % config.log_every == 0 or step == config.steps:
            row = {"step": step, **engine.window_means(), "tiles_per_s": engine.throughput()}
            engine.log(row)
            # the paper's rule: keep the weights with the lowest reconstruction error on training data
            engine.keep_if_best(row["recon_error"], "min", recon_error=row["recon_error"])
            shown = {"loss": f"{row['loss']:.4f}", "err": f"{row['recon_error']:.4f}",
                     "ppl": f"{row['perplexity']:.2f}", "codes": int(row["codes_in_use"])}
        if step % config.monitor_every == 0 or step == config.steps:
            _monitor(run, model, monitor_rec, monitor_joint, folder, engine.state, step)
        return shown

    engine.run_loop(update, after, checkpoint_every=config.checkpoint_every, stop_after=stop_after,
                    progress=progress, desc="train-vqvae")
    # the figures once per call, from the snapshots and the log (drawing them at every monitoring step cost
    # more than the steps between two of them on a small CPU run)
    draw_monitor_figure(run.path, dict(engine.state["history"]), monitor_rec.file)
    draw_error_curve(run.path)

    summary: dict[str, Any] = {"step": engine.done, "best_step": engine.state["best_at"],
                               "best_error": engine.state["best"]}
    if engine.finished:
        summary["report"] = report_vqvae(run.path, data_dir, device=str(dev), print_table=False)
    run.write_manifest(inputs, device=str(dev), precision=engine.amp_name, threads=torch.get_num_threads(), steps_done=engine.done,
                       best_step=engine.state["best_at"])
    return summary


def _as_hwc(image: torch.Tensor) -> np.ndarray:
    return np.moveaxis(np.asarray(image.detach().cpu(), dtype=np.float32), 0, -1)


# --- monitoring figures (paper Figs. 7 and 8) ---------------------------------------------------------------


def _monitor_tile(folder: DatasetFolder, records: Sequence[Any], config: VQVAETrainConfig, model_config: VQVAEConfig):
    """The fixed validation tile the monitoring figure shows: the first one, cropped to at most 256 px."""
    rec = records[0]
    joint = load_joint_tiles(folder, [rec], config.mask_encoding)[0]
    joint = crop_to_multiple(joint[:, :256, :256], model_config.downsample)
    return rec, joint


def _image_rgb(image: np.ndarray) -> np.ndarray:
    """Float image (H, W) or (H, W, C) in [0, 1] -> RGB uint8 for figures."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    rgb = to_uint8(image)
    return np.repeat(rgb[..., None], 3, axis=-1) if rgb.ndim == 2 else rgb[..., :3]


def joint_panel(joint: torch.Tensor, classes: Sequence[ClassInfo], encoding: str) -> np.ndarray:
    """Micrograph above its mask (split by nearest level / argmax), one uint8 RGB array."""
    image, mask = split_joint(joint.float(), len(classes), encoding)
    image = np.clip(_as_hwc(image), 0, 1)
    gap = np.full((4, image.shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([_image_rgb(image), gap, colorize_mask(np.asarray(mask), classes)], axis=0)


def _monitor(run: RunFolder, model: VQVAE, rec: Any, joint: torch.Tensor, folder, state: dict, step: int) -> None:
    c = model.config
    recon = reconstruct(model, joint)
    error = float(torch.mean((recon - joint) ** 2))
    monitor_dir = run.path / "monitor"
    if not (monitor_dir / "input.png").exists():
        save_png(monitor_dir / "input.png", joint_panel(joint, folder.classes, c.mask_encoding))
    save_png(monitor_dir / f"step_{step:07d}.png", joint_panel(recon, folder.classes, c.mask_encoding))
    # the validation tile's own error, kept in the training state so a resumed run titles its figure alike
    state["history"] = [h for h in state["history"] if h[0] < step] + [(step, error)]


def draw_monitor_figure(run_dir: Path, errors: dict[int, float], tile_name: str = "") -> None:
    """monitor.png (paper Fig. 7): the validation tile, then its reconstruction at up to 3 monitored steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    monitor_dir = Path(run_dir) / "monitor"
    snaps = sorted(monitor_dir.glob("step_*.png"))
    if not snaps or not (monitor_dir / "input.png").exists():
        return
    picks = [snaps[0], snaps[len(snaps) // 2], snaps[-1]] if len(snaps) >= 3 else snaps
    picks = list(dict.fromkeys(picks))
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(2.6 * (len(picks) + 1), 5.4))
    panels = [("input" + (f"\n{tile_name}" if tile_name else ""), monitor_dir / "input.png")]
    for p in picks:
        step = int(p.stem.split("_")[1])
        err = errors.get(step)
        panels.append((f"step {step}" + (f"\nrecon. error {err:.4f}" if err is not None else ""), p))
    for ax, (title, path) in zip(np.atleast_1d(axes), panels):
        with Image.open(path) as img:
            ax.imshow(np.asarray(img))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("VQ-VAE monitoring: micrograph (top) and mask (bottom)", fontsize=10)
    save_figure(Path(run_dir) / "monitor.png", fig)


def _log_rows(run_dir: Path) -> list[dict[str, str]]:
    path = Path(run_dir) / RunFolder.LOG
    return read_csv(path) if path.exists() else []


def draw_error_curve(run_dir: Path) -> None:
    """recon_error.png (paper Fig. 8): training reconstruction error against step."""
    rows = _log_rows(run_dir)
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [float(r["step"]) for r in rows]
    errors = [float(r["recon_error"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, errors, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("reconstruction error (MSE)")
    ax.set_title("VQ-VAE reconstruction error on training batches")
    ax.grid(alpha=0.3)
    save_figure(Path(run_dir) / "recon_error.png", fig)


# --- report -------------------------------------------------------------------------------------------------


def _default_data(run: RunFolder) -> Path:
    data = run.config.get("data")
    if not data:
        raise InputError(run.path, "run does not name its dataset; give --data")
    return Path(data)


def report_vqvae(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    device: str = "auto",
    split_name: str = "val",
    print_table: bool = True,
) -> dict[str, Any]:
    """Score the run's reconstructions of the `split_name` tiles (train if it has none) -> RUN/report.json.

    Image MSE on the micrograph channels; the mask recovered by `split` scored against the true mask with
    pixel accuracy, mIoU and Missing Class IoU (`dualsynth.metrics.SegmentationScores`).
    """
    run = RunFolder.open(run_dir, kind=KIND)
    data_dir = Path(data_dir) if data_dir is not None else _default_data(run)
    dev = resolve_device(device)
    model = load_vqvae(run.path, dev)
    c = model.config
    folder = DatasetFolder(data_dir)
    if folder.num_classes != c.num_classes or folder.image_channels != c.image_channels:
        raise InputError(
            data_dir,
            f"dataset has {folder.image_channels} image channel(s) and {folder.num_classes} classes; "
            f"the VQ-VAE was trained on {c.image_channels} and {c.num_classes}",
        )
    records = list(folder.records(split=split_name))
    used = split_name
    if not records:
        records, used = list(folder.records(split="train")), "train"
    scores = SegmentationScores(folder.num_classes, list(folder.class_names))
    image_se, image_n, codes_seen = 0.0, 0, set()
    for rec in records:
        joint = crop_to_multiple(load_joint_tiles(folder, [rec], c.mask_encoding)[0], c.downsample)
        codes = encode(model, joint)
        codes_seen.update(torch.unique(codes).tolist())
        recon = decode(model, codes)
        (image, mask), = joint_to_pairs(recon[None], c.num_classes, c.mask_encoding)
        true_image, true_mask = split_joint(joint, c.num_classes, c.mask_encoding)
        true_image = _as_hwc(true_image)
        image_se += float(((image - true_image) ** 2).sum())
        image_n += image.size
        scores.update(mask, np.asarray(true_mask), name=rec.file)
    summary = scores.summary()
    report = {
        "run": str(run.path),
        "data": str(data_dir),
        "split": used,
        "tiles": len(records),
        "image_mse": image_se / max(image_n, 1),
        "mask_pixel_accuracy": summary["pixel_accuracy"],
        "mask_miou": summary["miou"],
        "mask_missing_class_iou": summary["missing_class_iou"],
        "mask_iou_per_class": summary["iou_per_class"],
        "codes_in_use": len(codes_seen),
        "num_embeddings": c.num_embeddings,
        "per_tile": scores.rows(),
    }
    write_json(run.path / "report.json", report)
    if print_table:
        print(format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a small aligned table for the terminal."""
    rows = [
        ("tiles", f"{report['tiles']} ({report['split']})"),
        ("image MSE", f"{report['image_mse']:.5f}"),
        ("mask pixel accuracy", f"{report['mask_pixel_accuracy']:.4f}"),
        ("mask mIoU", f"{report['mask_miou']:.4f}"),
        ("mask Missing Class IoU", f"{report['mask_missing_class_iou']:.4f}"),
        ("codes in use", f"{report['codes_in_use']} of {report['num_embeddings']}"),
    ]
    rows += [(f"  IoU {name}", f"{v:.4f}") for name, v in report["mask_iou_per_class"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- encode (paper Fig. 9) ----------------------------------------------------------------------------------


def encode_dataset(
    run_dir: str | Path, data_dir: str | Path, out_dir: str | Path, device: str = "auto", figure_tiles: int = 4
) -> dict[str, Any]:
    """Write the z-matrices of every tile: OUT/<split>.npz with `codes` (N, h, w) int16 and `files` (N,),
    plus OUT/figure9.png (micrograph, mask, z-matrix coloured by code) and OUT/encode.json."""
    dev = resolve_device(device)
    model = load_vqvae(run_dir, dev)
    c = model.config
    folder = DatasetFolder(data_dir)
    if folder.num_classes != c.num_classes or folder.image_channels != c.image_channels:
        raise InputError(data_dir, "dataset's image channels or classes differ from the VQ-VAE's")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = list(folder.records())
    splits = list(dict.fromkeys((r.split or "train") for r in records))
    counts: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    figure_items = []
    for split_name in splits:
        recs = [r for r in records if (r.split or "train") == split_name]
        all_codes, names = [], []
        for i in range(0, len(recs), 16):
            chunk = recs[i : i + 16]
            joints = [crop_to_multiple(j, c.downsample) for j in load_joint_tiles(folder, chunk, c.mask_encoding)]
            batch = _stack_same_size(joints, split_name, data_dir)
            codes = encode(model, batch)
            all_codes.append(codes)
            names += [r.file for r in chunk]
            for rec, joint, z in zip(chunk, joints, codes):
                if len(figure_items) < figure_tiles:
                    figure_items.append((rec, joint, z))
        stacked = _stack_same_size(list(torch.cat(all_codes)), split_name, data_dir).numpy().astype(np.int16)
        with atomic_path(out_dir / f"{split_name}.npz") as tmp:
            np.savez_compressed(tmp, codes=stacked, files=np.asarray(names))
        counts[split_name] = len(names)
        shapes[split_name] = list(stacked.shape[1:])
    draw_z_matrices(out_dir / "figure9.png", figure_items, folder, c)
    info = {
        "vqvae": str(Path(run_dir)),
        "data": str(Path(data_dir)),
        "num_embeddings": c.num_embeddings,
        "downsample": c.downsample,
        "tiles": counts,
        "z_shape": shapes,
    }
    write_json(out_dir / "encode.json", info)
    return info


def draw_z_matrices(path: Path, items: list, folder: DatasetFolder, c: VQVAEConfig) -> None:
    """Paper Fig. 9: per row a micrograph, its mask, and its z-matrix with one colour per codebook index."""
    if not items:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = matplotlib.colormaps["tab10" if c.num_embeddings <= 10 else "tab20" if c.num_embeddings <= 20 else "viridis"]
    fig, axes = plt.subplots(len(items), 3, figsize=(8, 2.7 * len(items)), squeeze=False)
    for row, (rec, joint, z) in zip(axes, items):
        image, mask = split_joint(joint, c.num_classes, c.mask_encoding)
        row[0].imshow(_image_rgb(_as_hwc(image)))
        row[1].imshow(colorize_mask(np.asarray(mask), folder.classes))
        shown = row[2].imshow(np.asarray(z), cmap=cmap, vmin=-0.5, vmax=c.num_embeddings - 0.5, interpolation="nearest")
        row[0].set_title(rec.file, fontsize=8)
        for ax in row:
            ax.axis("off")
    axes[0][1].set_title("mask", fontsize=9)
    axes[0][2].set_title(f"z-matrix ({c.num_embeddings} codes)", fontsize=9)
    fig.colorbar(shown, ax=axes[:, 2].tolist(), ticks=range(c.num_embeddings), shrink=0.8, label="code")
    save_figure(path, fig)
