"""Training a U-Net (paper Table 3) on the one training engine (`dualsynth.engine.Engine`).

`train_segmentation` trains on the train split of a real dataset folder, optionally with synthetic pairs added
(`synthetic_percent`) or on synthetic pairs only (`synthetic_only`); validation always uses real tiles. It
writes a run folder (config.yaml, checkpoints/best.pt and last.pt, log.csv, learning_curve.png,
manifest.json listing every file used). Everything random is a function of the seed and the epoch (or step), so
a run stopped after epoch k and resumed ends with the same weights as one that was never stopped.

Two ways to count training, both on the same engine: by epochs (`epochs`, the paper's; one engine iteration is
an epoch, validated at its end), or by optimizer updates (`steps`: one engine iteration is an update, so a run
takes exactly that many whatever the size of its training set; validation, the plateau schedule and best.pt
every `val_every` updates, and no early stopping unless asked for).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from dualsynth.config import TrainingConfig, amp_dtype, apply_threads, autocast, resolve_device
from dualsynth.engine import Engine, adam, Plateau, epoch_batches, step_batch
from dualsynth.io import progress_bar, read_csv, save_figure
from dualsynth.metrics import SegmentationScores, trivial_prediction
from dualsynth.runs import RunFolder
from dualsynth.segmentation.data import (
    CopyPaste,
    TileCache,
    paper_augmentation,
    same_size_groups,
    select_training_data,
    tile_batch,
)
from dualsynth.segmentation.model import KIND, UNetArchitecture, build_unet, check_encoder_weights, file_sha256

MONITORS = ("missing_class_iou", "miou")


class SegTrainConfig(TrainingConfig):
    """Everything `train-seg` reads from a preset, a config file or `--set key=value`."""

    model: UNetArchitecture = Field(default_factory=UNetArchitecture)
    encoder_weights: str = Field(
        "none", description="none, imagenet (the paper's Table 3; from the local cache, never downloaded) or a local "
        "encoder state-dict file"
    )
    crop: int | None = Field(
        None, ge=8, description="train on random square crops of this side (at most the tile size); None: whole tiles"
    )
    crop_foreground: float = Field(
        0.0, ge=0, le=1, description="with crop: probability that a crop is centred on a random pixel of a class other "
        "than the training set's most common one (nnU-Net's foreground oversampling, 0.33 there; against the "
        "all-background trivial solution on imbalanced sets); 0: every crop uniformly placed"
    )
    flips: bool = Field(False, description="random flips and 90-degree rotations of training tiles")
    augment: Literal["none", "paper", "copy_paste"] = Field(
        "none", description="paper: the Albumentations baseline of §5.3; copy_paste: objects of real training tiles "
        "pasted with their mask into training tiles (see copy_paste_prob)"
    )
    copy_paste_prob: float = Field(
        0.5, ge=0, le=1, description="with augment copy_paste: probability that a training tile receives pasted objects"
    )
    batch_size: int = Field(2, ge=1, description="training tiles per update (paper: 2)")
    val_batch_size: int = Field(1, ge=1, description="validation tiles per forward pass (paper: 1)")
    epochs: int = Field(200, ge=1, description="maximum number of epochs (paper: 200); unused when steps is set")
    steps: int | None = Field(
        None, ge=1, description="step mode: exactly this many optimizer updates whatever the training set's size "
        "(batches from seeded passes over the tiles); null: epoch mode (epochs)"
    )
    val_every: int | None = Field(
        None, ge=1, description="step mode: validate (best.pt, lr plateau, early stopping, log row) every this many "
        "updates and after the last; null: max(1, steps // 10). Only with steps"
    )
    early_stop: bool | Literal["auto"] = Field(
        "auto", description="early stopping after early_stop_patience validations without improvement: true, "
        "false, or auto (on in epoch mode, off in step mode so that every run takes its full steps)"
    )
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (paper: 0.001)")
    loss: Literal["dice_focal", "cross_entropy"] = Field("dice_focal", description="paper: dice + focal")
    monitor: Literal["missing_class_iou", "miou"] = Field(
        "missing_class_iou",
        description="validation score that picks best.pt and drives ReduceLROnPlateau and early stopping",
    )
    lr_patience: int = Field(
        5, ge=1, description="validations (epochs, or val_every steps) without improvement before the lr is reduced "
        "(paper: 5)"
    )
    lr_factor: float = Field(0.1, gt=0, lt=1, description="lr multiplier on a plateau (Keras default 0.1)")
    min_lr: float = Field(1e-6, ge=0, description="the lr is never reduced below this")
    early_stop_patience: int = Field(
        15, ge=1, description="validations (epochs, or val_every steps) without improvement before stopping, where "
        "early_stop is on (paper: 15)"
    )
    checkpoint_seconds: float = Field(
        30.0, ge=0, description="checkpoints/last.pt at an epoch's end (step mode: a validation) only when this many "
        "seconds have passed since the previous one, and best.pt with it (both always at the end and on Ctrl-C); "
        "a killed run repeats at most this much work. 0: after every epoch or validation"
    )

    @field_validator("encoder_weights")
    @classmethod
    def _weights_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be none, imagenet or a file path")
        return v

    @model_validator(mode="after")
    def _val_every_needs_steps(self) -> "SegTrainConfig":
        if self.val_every is not None and self.steps is None:
            raise ValueError("val_every applies in step mode only: set steps too, or val_every to null")
        return self

    @property
    def unit(self) -> Literal["step", "epoch"]:
        """What one engine iteration is: an optimizer update (step mode) or an epoch."""
        return "epoch" if self.steps is None else "step"

    @property
    def validation_interval(self) -> int:
        """Updates between validations in step mode (val_every, default a tenth of the steps)."""
        return self.val_every if self.val_every is not None else max(1, (self.steps or 0) // 10)

    @property
    def stops_early(self) -> bool:
        """Whether early stopping is on: early_stop, where auto is on in epoch mode and off in step mode."""
        return self.steps is None if self.early_stop == "auto" else bool(self.early_stop)


PRESETS: dict[str, dict[str, Any]] = {
    # Table 3 of the paper: EfficientNet-B3 U-Net from ImageNet weights, whole 256 px tiles, batch 2/1, Adam 1e-3,
    # dice + focal, ReduceLROnPlateau(5) and EarlyStopping(15) on the validation IoU score, up to 200 epochs
    "paper": {
        "model": {"encoder": "efficientnet-b3", "encoder_depth": 5, "decoder_channels": [256, 128, 64, 32, 16],
                  "normalize": "none"},
        "encoder_weights": "imagenet",
        "monitor": "miou",
        "augment": "none",
        "loss": "dice_focal",
        "crop": None,
        "flips": False,
        "batch_size": 2,
        "val_batch_size": 1,
        "epochs": 200,
        "lr": 1e-3,
        "lr_patience": 5,
        "early_stop_patience": 15,
    },
    # about 3 minutes on a 2-core CPU for 160 tiles of 128 px: ResNet-18 with 4 stages, a narrow decoder,
    # 96 px random crops with flips, batch 8, 30 epochs, the paper's plateau/stopping patience. Per-image
    # normalisation: on nasa-super it steadied validation and raised test Missing Class IoU from 85 to 88 %
    "quick": {
        "model": {"encoder": "resnet18", "encoder_depth": 4, "decoder_channels": [64, 32, 16, 8],
                  "normalize": "per_image"},
        "crop": 96,
        "flips": True,
        "batch_size": 8,
        "val_batch_size": 8,
        "epochs": 30,
        "lr": 1e-3,
        "lr_patience": 5,
        "early_stop_patience": 15,
    },
}


def make_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """dice + focal (the paper's compound 'dice-focal (categorical)' loss) or plain cross-entropy."""
    if name == "cross_entropy":
        return torch.nn.CrossEntropyLoss()
    import segmentation_models_pytorch as smp

    dice = smp.losses.DiceLoss(mode="multiclass", from_logits=True)
    focal = smp.losses.FocalLoss(mode="multiclass")

    def dice_focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # the losses' soft counts lose too much in fp16
        return dice(logits, target) + focal(logits, target)

    return dice_focal


def validate(model: torch.nn.Module, cache: TileCache, loss_fn: Callable, batch_size: int, device: torch.device,
             class_names: Sequence[str]) -> dict[str, float]:
    """Validation loss and scores (pixel accuracy, dataset mIoU, Missing Class IoU) over the cached tiles."""
    scores = SegmentationScores(len(class_names), list(class_names))
    shapes = [cache[i][1].shape for i in range(len(cache))]
    total_loss, tiles = 0.0, 0
    model.eval()
    with torch.no_grad():
        for group in same_size_groups(range(len(cache)), shapes, batch_size):
            x = torch.from_numpy(np.stack([np.moveaxis(cache[i][0], -1, 0) for i in group])).float().to(device)
            y = torch.from_numpy(np.stack([cache[i][1] for i in group])).long().to(device)
            with autocast(device):
                logits = model(x)
            total_loss += float(loss_fn(logits.float(), y)) * len(group)
            tiles += len(group)
            for pred, truth in zip(logits.argmax(1).cpu().numpy(), y.cpu().numpy()):
                scores.update(pred, truth)
    s = scores.summary()
    return {"val_loss": total_loss / max(tiles, 1), "val_accuracy": s["pixel_accuracy"], "val_miou": s["miou"],
            "val_missing_class_iou": s["missing_class_iou"], "trivial": trivial_prediction(s)}


def train_segmentation(
    train: str | Path | None,
    out: str | Path,
    config: SegTrainConfig,
    *,
    val: str | Path | None = None,
    synthetic: str | Path | None = None,
    synthetic_percent: float | None = None,
    synthetic_only: int | None = None,
    resume: bool = False,
    device: str = "auto",
    threads: str | int | None = "auto",
    stop_after: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train a U-Net into the run folder `out`; return a summary: ``unit`` (epoch or step), iterations done
(``epochs_done`` or ``steps_done``), the best one (``best_epoch`` or ``best_step``) and its score.

    `train`/`val`: dataset folders (train split of `train`, val split of `val`, default `train`). `synthetic`
    with `synthetic_percent` adds round(P/100 x real tiles) synthetic pairs; `synthetic_only` trains on that many
    synthetic pairs alone. `resume` continues `out` from checkpoints/last.pt (same config required).
    `threads`: torch CPU threads (`auto`: `dualsynth.config.auto_threads`). `stop_after` ends this call after
    that many epochs (steps in step mode), as if the run had been killed there (for tests). `on_epoch` receives
    each log row (one per epoch, or per validation in step mode).
    """
    apply_threads(threads)
    dev = resolve_device(device)
    data = select_training_data(train, val, synthetic, synthetic_percent, synthetic_only, config.seed)
    run_config = {
        "train": None if train is None else str(Path(train)),
        "val": str(Path(val if val is not None else train)),  # type: ignore[arg-type]
        "synthetic": None if synthetic is None else str(Path(synthetic)),
        "synthetic_percent": synthetic_percent,
        "synthetic_only": synthetic_only,
        **config.model_dump(mode="json"),
        "device": device,
    }
    weights = config.encoder_weights
    resuming = resume and RunFolder(out).has_checkpoint("last")
    if not resuming:
        check_encoder_weights(weights, config.model.encoder)
    train_cache, val_cache = TileCache(data.train), TileCache(data.val)
    crop = None if config.crop is None else min(config.crop, train_cache.smallest_side())
    foreground = ((config.crop_foreground, train_cache.majority_class(len(data.classes)))
                  if crop is not None and config.crop_foreground > 0 else None)
    augmenter = paper_augmentation(data.in_channels) if config.augment == "paper" else None
    # donors are the real tiles only (they come first in the cache): synthetic labels are never pasted
    copy_paste = (CopyPaste(train_cache, len(data.real), len(data.classes), config.copy_paste_prob)
                  if config.augment == "copy_paste" else None)
    class_names = [c.name for c in data.classes]
    inputs = {**{k: run_config[k] for k in ("train", "val", "synthetic", "synthetic_percent", "synthetic_only")},
              "encoder_weights": weights, "crop_used": crop, **data.manifest()}
    if weights not in ("none", "imagenet"):
        inputs["encoder_weights_sha256"] = file_sha256(weights)

    torch.manual_seed(config.seed)
    # the model is built before the run folder exists, so weights that fail to load leave nothing behind
    model = build_unet(config.model, data.in_channels, data.classes, "none" if resuming else weights).to(dev)
    # in mixed precision the convolutions run faster on channels-last tensors (1.2x per U-Net step in bf16 on
    # the development CPU, docs/benchmarks.md); the weights are the same numbers, only their memory layout differs
    layout = torch.channels_last if amp_dtype(dev, config.precision, training=True) else torch.contiguous_format
    model = model.to(memory_format=layout)
    run = RunFolder.create(out, run_config, kind=KIND, resume=resume, defaults=type(config)().model_dump(mode="json"))
    unit, stepped = config.unit, config.steps is not None
    engine = Engine(
        run, dev, models={"unet": model}, optimizers={"main": adam(model.parameters(), config.lr)},
        seed=config.seed, total=config.steps if stepped else config.epochs, unit=unit, first=0 if stepped else 1,
        state={"lr": config.lr}, run_config=run_config, precision=config.precision, deterministic=config.deterministic,
    )
    if resume:
        engine.resume()
    run.write_manifest(inputs)
    loss_fn = make_loss(config.loss)
    plateau = Plateau(config.lr_patience, config.lr_factor, config.min_lr,
                      config.early_stop_patience if config.stops_early else None)
    monitor_key = f"val_{config.monitor}"
    every = config.validation_interval

    def update(idx: np.ndarray, key: int) -> float:
        """One optimizer update on the tiles `idx`; `key` (the epoch, or the step) seeds their augmentation."""
        x, y = tile_batch(train_cache, idx, crop, config.flips, augmenter, config.seed, key, copy_paste, foreground)
        x, y = x.to(dev, memory_format=layout), y.to(dev)
        with engine.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        engine.optimize(loss)
        return float(loss.detach())

    def epoch_fn(epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        engine.set_lr(engine.state["lr"])
        batches = epoch_batches(len(train_cache), config.batch_size, config.seed, epoch)
        losses: list[float] = []
        bar = progress_bar(batches, enabled=progress, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False)
        for idx in bar:
            losses.append(update(idx, epoch))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        scores = validate(model, val_cache, loss_fn, config.val_batch_size, dev, class_names)
        return {"epoch": epoch, "train_loss": float(np.mean(losses)), **scores, "lr": engine.state["lr"],
                "seconds": time.perf_counter() - t0}

    def step_fn(step: int) -> dict[str, Any] | None:
        """Update `step` (0-based); after every `val_every`-th update and the last, the validation row."""
        t0 = time.perf_counter()
        engine.set_lr(engine.state["lr"])
        idx = step_batch(len(train_cache), config.batch_size, config.seed, step)
        engine.accumulate({"train_loss": update(idx, step), "seconds": time.perf_counter() - t0}, items=len(idx))
        done = step + 1
        if done % every and done != config.steps:
            return None
        window = (done - 1) % every + 1  # updates since the previous validation
        t1 = time.perf_counter()
        means = engine.window_means()
        scores = validate(model, val_cache, loss_fn, config.val_batch_size, dev, class_names)
        return {"step": done, "train_loss": means["train_loss"], **scores, "lr": engine.state["lr"],
                "seconds": means["seconds"] * window + time.perf_counter() - t1}

    def after(number: int, row: dict[str, Any] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        value, trivial = row[monitor_key], row.pop("trivial")  # the warning line is not a log.csv column
        improved = engine.keep_if_best(value, "max", **{config.monitor: value})
        if improved:  # in the checkpointed state: a resumed run still knows whether its best.pt is trivial
            engine.state["best_trivial"] = trivial
        plateau.update(engine, improved)
        engine.log(row)
        if on_epoch is not None:
            on_epoch(row)
        return {config.monitor: f"{100 * value:.1f}"}

    # last.pt (and best.pt) at an epoch's end or a validation, at most every checkpoint_seconds, and at the end of
    # the call: a U-Net checkpoint (about 70 MB for the quick preset) can cost more than a small epoch
    # step mode: an iteration is one update, checkpointed at validations, with a progress bar over the steps;
    # epoch mode: an iteration is one epoch (its own bar inside), checkpointed at its end
    fn, checkpoint_every, step_bar = (step_fn, every, progress) if stepped else (epoch_fn, 1, False)
    engine.run_loop(fn, after, checkpoint_every=checkpoint_every, checkpoint_seconds=config.checkpoint_seconds,
                    stop_after=stop_after, progress=step_bar, desc="U-Net")
    draw_learning_curve(run.path, config.monitor)  # once per call, not per epoch: a figure costs a fraction of an epoch

    best = engine.state["best"]
    summary = {"run": str(run.path), "unit": unit, f"{unit}s_done": engine.done, "finished": engine.finished,
               "stopped_early": bool(engine.state["stopped"]), f"best_{unit}": engine.state["best_at"],
               "monitor": config.monitor, "best": best, "best_trivial": engine.state.get("best_trivial")}
    run.write_manifest(inputs, device=str(dev), precision=engine.amp_name, threads=torch.get_num_threads(), **{k: v for k, v in summary.items() if k != "run"})
    return summary


def draw_learning_curve(run_dir: str | Path, monitor: str = "missing_class_iou") -> None:
    """learning_curve.png: train/val loss, and validation accuracy, mIoU, Missing Class IoU per epoch (or per
    validation, against the step, in step mode)."""
    path = Path(run_dir) / RunFolder.LOG
    if not path.exists():
        return
    rows = read_csv(path)
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "step" if "step" in rows[0] else "epoch"
    epochs = [int(r[unit]) for r in rows]

    def col(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, col("train_loss"), marker=".", label="train")
    ax1.plot(epochs, col("val_loss"), marker=".", label="validation")
    ax1.set_xlabel(unit)
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for key, label in (("val_accuracy", "accuracy"), ("val_miou", "mIoU"), ("val_missing_class_iou", "Missing Class IoU")):
        ax2.plot(epochs, [100 * v for v in col(key)], marker=".", label=label + (" (monitored)" if key == f"val_{monitor}" else ""))
    ax2.set_xlabel(unit)
    ax2.set_ylabel("validation score (%)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle("U-Net training")
    save_figure(Path(run_dir) / "learning_curve.png", fig)


def saved_run_config(run_dir: str | Path) -> tuple[SegTrainConfig, dict[str, Any]]:
    """The training config and data arguments a run was started with (from RUN/config.yaml), for `--resume`."""
    return RunFolder.open(run_dir, kind=KIND).saved_config(
        SegTrainConfig, ("train", "val", "synthetic", "synthetic_percent", "synthetic_only"))
