"""U-Net segmentation: training (paper Table 3), evaluation with the paper's metrics, and the quality pre-test.

`train_segmentation` trains a segmentation-models-pytorch U-Net on the train split of a real dataset folder,
optionally with synthetic pairs added (`synthetic_percent`, paper §4.2.1 Table 5) or on synthetic pairs only
(`synthetic_only`, Table 6); validation always uses real tiles. It writes a run folder (config.yaml,
checkpoints/best.pt and last.pt, log.csv, learning_curve.png, manifest.json listing every file used).
Everything random (model init, which synthetic tiles are drawn, data order, crops, flips, augmentation) is a
function of the seed and the epoch, so a run stopped after epoch k and resumed ends with the same weights as
one that was never stopped.

`evaluate` scores a model on a split of a dataset folder (pixel accuracy, mIoU, Missing Class IoU, per class);
`pretest` is the paper's quality pre-test (§3.3, Fig. 12): a model trained on real data segments the
synthetic micrographs, and the synthetic masks are scored against its predictions.

Python API: `load_segmenter(run, device)`, `predict(model, image)`, `evaluate(model, folder, split)`,
`write_evaluation(result, out, overlays)`, `pretest(run, synthetic, out)`.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from dualsynth.config import StrictModel, autocast, grad_scaler, resolve_device, validate_config
from dualsynth.data import ClassInfo, DatasetFolder, TileRecord, colorize_mask
from dualsynth.errors import InputError
from dualsynth.io import progress_bar, read_csv, save_figure, save_png, to_uint8, write_csv, write_json
from dualsynth.metrics import SegmentationScores
from dualsynth.runs import RunFolder, capture_rng_state

KIND = "segmentation"
MONITORS = ("missing_class_iou", "miou")


# --- configuration ------------------------------------------------------------------------------------------


class UNetArchitecture(StrictModel):
    """The U-Net of segmentation-models-pytorch: encoder (backbone) name, depth and decoder widths."""

    encoder: str = Field("efficientnet-b3", description="smp encoder name (paper: EfficientNet-B3)")
    encoder_depth: int = Field(5, ge=3, le=5, description="number of encoder stages (downsampling by 2 each)")
    decoder_channels: list[int] = Field(
        default_factory=lambda: [256, 128, 64, 32, 16], description="decoder widths, one per encoder stage"
    )
    normalize: Literal["none", "per_image"] = Field(
        "none", description="per_image: each tile's channels scaled to zero mean and unit variance before the U-Net"
    )

    @model_validator(mode="after")
    def _depth_matches_decoder(self) -> "UNetArchitecture":
        if len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(
                f"decoder_channels has {len(self.decoder_channels)} entries, encoder_depth is {self.encoder_depth}"
            )
        return self


class SegTrainConfig(StrictModel):
    """Everything `train-seg` reads from a preset, a config file or `--set key=value`."""

    preset: str | None = Field(None, description="name of the preset this config started from")
    model: UNetArchitecture = Field(default_factory=UNetArchitecture)
    encoder_weights: str = Field(
        "none", description="none, imagenet (smp download; the paper's Table 3) or a local encoder state-dict file"
    )
    crop: int | None = Field(
        None, ge=8, description="train on random square crops of this side (at most the tile size); None: whole tiles"
    )
    flips: bool = Field(False, description="random flips and 90-degree rotations of training tiles")
    augment: Literal["none", "paper"] = Field("none", description="paper: the Albumentations baseline of §5.3")
    batch_size: int = Field(2, ge=1, description="training tiles per update (paper: 2)")
    val_batch_size: int = Field(1, ge=1, description="validation tiles per forward pass (paper: 1)")
    epochs: int = Field(200, ge=1, description="maximum number of epochs (paper: 200)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (paper: 0.001)")
    loss: Literal["dice_focal", "cross_entropy"] = Field("dice_focal", description="paper: dice + focal")
    monitor: Literal["missing_class_iou", "miou"] = Field(
        "missing_class_iou",
        description="validation score that picks best.pt and drives ReduceLROnPlateau and early stopping",
    )
    lr_patience: int = Field(5, ge=1, description="epochs without improvement before the lr is reduced (paper: 5)")
    lr_factor: float = Field(0.1, gt=0, lt=1, description="lr multiplier on a plateau (Keras default 0.1)")
    min_lr: float = Field(1e-6, ge=0, description="the lr is never reduced below this")
    early_stop_patience: int = Field(15, ge=1, description="epochs without improvement before stopping (paper: 15)")
    seed: int = Field(0, ge=0, description="seed of every random choice in the run")

    @field_validator("encoder_weights")
    @classmethod
    def _weights_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be none, imagenet or a file path")
        return v


PRESETS: dict[str, dict[str, Any]] = {
    # Table 3 of the paper: EfficientNet-B3 U-Net, whole 256 px tiles, batch 2/1, Adam 1e-3, dice + focal,
    # ReduceLROnPlateau(5) and EarlyStopping(15) on the validation IoU, up to 200 epochs
    "paper": {
        "model": {"encoder": "efficientnet-b3", "encoder_depth": 5, "decoder_channels": [256, 128, 64, 32, 16]},
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


# --- the model ----------------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """What rebuilds a trained U-Net: architecture, input channels, classes (names and display colours)."""

    encoder: str
    encoder_depth: int
    decoder_channels: list[int]
    in_channels: int
    classes: list[dict[str, Any]]
    normalize: str = "none"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_infos(self) -> list[ClassInfo]:
        return [ClassInfo(c["name"], tuple(c["color"])) for c in self.classes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder, "encoder_depth": self.encoder_depth,
            "decoder_channels": list(self.decoder_channels), "in_channels": self.in_channels,
            "classes": [dict(c) for c in self.classes], "normalize": self.normalize,
        }


class UNet(torch.nn.Module):
    """An smp U-Net that knows its config and takes tiles of any size.

    smp's U-Net needs sides divisible by 2**encoder_depth; `forward` pads the input (reflecting the border)
    and crops the logits back, so 100 px tiles work as well as 128 px ones.
    """

    def __init__(self, config: UNetConfig, encoder_weights: str | None = None):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.config = config
        weights: Any = encoder_weights
        if weights is not None and config.encoder.startswith("tu-"):
            weights = True  # timm-universal encoders take a flag; the variant is part of the name
        try:
            self.net = smp.Unet(
                encoder_name=config.encoder,
                encoder_depth=config.encoder_depth,
                encoder_weights=weights,
                decoder_channels=list(config.decoder_channels),
                in_channels=config.in_channels,
                classes=config.num_classes,
            )
        except KeyError as exc:
            if "weights" in str(exc):
                raise
            raise InputError("model.encoder", f"unknown encoder '{config.encoder}' (see the encoder list of "
                             "segmentation-models-pytorch)") from None
        except (RuntimeError, ValueError) as exc:
            if "timm" in str(exc).lower() or "unknown model" in str(exc).lower():
                raise InputError("model.encoder", f"'{config.encoder}' is not an encoder smp can build") from None
            raise

    @property
    def multiple(self) -> int:
        return 2 ** self.config.encoder_depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.normalize == "per_image":
            # micrographs differ in brightness and contrast from image to image more than within one
            mean = x.mean(dim=(-2, -1), keepdim=True)
            std = x.std(dim=(-2, -1), keepdim=True)
            x = (x - mean) / std.clamp_min(1e-3)  # flat tiles stay finite
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
        return self.net(x)[..., :h, :w]

    def checkpoint(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "model": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> "UNet":
        model = cls(UNetConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        return model


def build_unet(arch: UNetArchitecture, in_channels: int, classes: Sequence[ClassInfo], encoder_weights: str = "none") -> UNet:
    """A fresh U-Net for `in_channels` image channels and these classes, its encoder initialised from
    `encoder_weights`: `none` (random), `imagenet` (smp's download; needs the internet once) or a file."""
    config = UNetConfig(arch.encoder, arch.encoder_depth, list(arch.decoder_channels), int(in_channels),
                        [ClassInfo(c.name, c.color).to_dict() for c in classes], arch.normalize)
    if encoder_weights == "none":
        return UNet(config)
    if encoder_weights == "imagenet":
        try:
            return UNet(config, encoder_weights="imagenet")
        except InputError:
            raise
        except KeyError as exc:
            raise InputError("--encoder-weights", f"no ImageNet weights for '{arch.encoder}' ({exc})") from None
        except Exception as exc:  # network errors come in many types (requests, huggingface_hub, OSError)
            raise InputError("--encoder-weights", f"could not load ImageNet weights for '{arch.encoder}' "
                             f"({type(exc).__name__}; no internet? give a local file instead)") from None
    model = UNet(config)
    load_encoder_weights(model, encoder_weights)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors`, `.pt` or `.pth` file; a checkpoint that wraps it under `model` or
    `state_dict` is unwrapped, and `net.encoder.` / `encoder.` key prefixes are removed (whole U-Nets)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "encoder weights file not found (use none, imagenet or a file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"cannot read encoder weights ({type(exc).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "not a state dict (a mapping of parameter names to tensors)")
    for prefix in ("net.encoder.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return state


def load_encoder_weights(model: UNet, path: str | Path) -> None:
    """Initialise the model's encoder from a local state-dict file.

    The file may hold weights for the model's own input channels, or 3-channel (ImageNet-style) weights: those
    are adapted to the model's channels the way smp adapts its own pretrained weights (`set_in_channels`), so
    a file saved from any smp encoder of the same name works for grey and RGB data alike.
    """
    import segmentation_models_pytorch as smp

    state = read_state_dict(path)
    encoder = model.net.encoder
    own = encoder.state_dict()
    if _same_shapes(state, own):
        encoder.load_state_dict(state)
        return
    c = model.config
    if c.in_channels != 3:
        rgb = smp.encoders.get_encoder(c.encoder, in_channels=3, depth=c.encoder_depth, weights=None)
        if _same_shapes(state, rgb.state_dict()):
            rgb.load_state_dict(state)
            rgb.set_in_channels(c.in_channels, pretrained=True)
            encoder.load_state_dict(rgb.state_dict())
            return
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    detail = f"missing '{missing[0]}'" if missing else f"shape of '{wrong[0]}' differs" if wrong else "extra keys"
    raise InputError(path, f"weights do not fit the '{c.encoder}' encoder with depth {c.encoder_depth} ({detail})")


def _same_shapes(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> bool:
    return set(state) == set(own) and all(state[k].shape == own[k].shape for k in own)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- which tiles a run trains on ----------------------------------------------------------------------------


def synthetic_count(percent: float, n_real: int) -> int:
    """Synthetic tiles added for `percent` % of `n_real` real training tiles: round(P/100 x n), halves up
    (the paper: SHQ [50 %] adds 8 synthetic tiles to 16 real ones)."""
    if percent < 0:
        raise InputError("--synthetic-percent", f"must be >= 0, got {percent}")
    return int(math.floor(percent / 100.0 * n_real + 0.5))


def draw_synthetic(records: Sequence[TileRecord], n: int, seed: int, source: str | Path = "--synthetic") -> list[TileRecord]:
    """`n` synthetic tiles drawn without replacement by a seeded permutation.

    The draw for n is a prefix of the draw for any larger n with the same seed, so in a study the 50 % set
    is contained in the 100 % set and percentages differ only by the tiles added.
    """
    if n > len(records):
        raise InputError(source, f"asks for {n} synthetic tiles, the synthetic set has only {len(records)}")
    order = np.random.default_rng([int(seed), 7]).permutation(len(records))
    return [records[int(i)] for i in order[:n]]


def synthetic_records(folder: DatasetFolder) -> list[TileRecord]:
    """The tiles of a synthetic set that may be trained on: its train split if it has one, else every tile."""
    train = folder.records(split="train")
    return list(train) if train else list(folder.records())


def check_compatible(reference: DatasetFolder, other: DatasetFolder, role: str) -> None:
    """Both dataset folders must have the same classes (names, in order) and image channels."""
    if reference.class_names != other.class_names:
        raise InputError(other.path, f"{role} classes {other.class_names} differ from {reference.class_names} "
                         f"of {reference.path}")
    if reference.image_channels != other.image_channels:
        raise InputError(other.path, f"{role} images have {other.image_channels} channel(s), "
                         f"{reference.path} has {reference.image_channels}")


@dataclass
class TrainingData:
    """The tiles of one run: real training tiles, synthetic tiles, validation tiles."""

    classes: list[ClassInfo]
    in_channels: int
    real: list[tuple[DatasetFolder, TileRecord]] = field(default_factory=list)
    synthetic: list[tuple[DatasetFolder, TileRecord]] = field(default_factory=list)
    val: list[tuple[DatasetFolder, TileRecord]] = field(default_factory=list)

    @property
    def train(self) -> list[tuple[DatasetFolder, TileRecord]]:
        return self.real + self.synthetic

    def manifest(self) -> dict[str, Any]:
        def files(items):
            return [f"{folder.path / 'images' / rec.file}" for folder, rec in items]

        return {
            "tiles": {"real_train": len(self.real), "synthetic_train": len(self.synthetic), "val": len(self.val)},
            "real_train_files": files(self.real),
            "synthetic_train_files": files(self.synthetic),
            "val_files": files(self.val),
        }


def select_training_data(
    train: str | Path | None,
    val: str | Path | None = None,
    synthetic: str | Path | None = None,
    synthetic_percent: float | None = None,
    synthetic_only: int | None = None,
    seed: int = 0,
) -> TrainingData:
    """Resolve a run's tiles: real train split of `train`, val split of `val` (default: `train`), plus
    `synthetic_percent` % synthetic tiles, or `synthetic_only` synthetic tiles and no real ones."""
    if synthetic_percent is not None and synthetic_only is not None:
        raise InputError("--synthetic-only", "give either --synthetic-percent or --synthetic-only, not both")
    wants_synthetic = synthetic_only is not None or (synthetic_percent is not None and synthetic_percent > 0)
    if wants_synthetic and synthetic is None:
        raise InputError("--synthetic", "needed with --synthetic-percent or --synthetic-only")
    if synthetic is not None and synthetic_percent is None and synthetic_only is None:
        raise InputError("--synthetic", "say how much to use with --synthetic-percent P or --synthetic-only N")
    if synthetic_only is not None and synthetic_only < 1:
        raise InputError("--synthetic-only", f"must be at least 1, got {synthetic_only}")
    if train is None and synthetic_only is None:
        raise InputError("--train", "a real training dataset is needed (or --synthetic-only N with --val)")
    val = val if val is not None else train
    if val is None:
        raise InputError("--val", "synthetic-only training needs a real validation dataset (--val)")

    train_folder = DatasetFolder(train) if train is not None else None
    val_folder = DatasetFolder(val) if train is None or Path(val) != Path(train) else train_folder
    assert val_folder is not None
    reference = train_folder or val_folder
    if val_folder is not reference:
        check_compatible(reference, val_folder, "validation")
    data = TrainingData(classes=list(reference.classes), in_channels=reference.image_channels)
    if train_folder is not None and synthetic_only is None:
        real = train_folder.records(split="train")
        if not real:
            raise InputError(train_folder.path, "dataset has no 'train' tiles")
        data.real = [(train_folder, r) for r in real]
    val_recs = val_folder.records(split="val")
    if not val_recs:
        raise InputError(val_folder.path, "dataset has no 'val' tiles to validate on")
    data.val = [(val_folder, r) for r in val_recs]
    if wants_synthetic:
        synth_folder = DatasetFolder(synthetic)  # type: ignore[arg-type]
        check_compatible(reference, synth_folder, "synthetic")
        pool = synthetic_records(synth_folder)
        n = synthetic_only if synthetic_only is not None else synthetic_count(float(synthetic_percent), len(data.real))
        data.synthetic = [(synth_folder, r) for r in draw_synthetic(pool, n, seed, synth_folder.path)]
    return data


# --- batches ------------------------------------------------------------------------------------------------


class TileCache:
    """Decoded (image (H, W, C) float32, mask (H, W) int64) pairs, loaded once (datasets here are small)."""

    def __init__(self, items: Sequence[tuple[DatasetFolder, TileRecord]]):
        self.items = list(items)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._arrays:
            folder, rec = self.items[i]
            image, mask = folder.load_image(rec), folder.load_mask(rec)
            if image.shape[:2] != mask.shape:
                raise InputError(folder.image_path(rec), f"image {image.shape[:2]} and mask {mask.shape} differ in size")
            self._arrays[i] = (image, mask)
        return self._arrays[i]

    def smallest_side(self) -> int:
        return min(min(self[i][1].shape) for i in range(len(self)))


def paper_augmentation(channels: int):
    """The §5.3 baseline: CLAHE, brightness/contrast, gamma, sharpen, blurs, Gauss noise, hue/saturation
    (Albumentations, grouped as in the smp example notebook the paper adapted). Grey images skip the colour op."""
    import albumentations as A

    colour = [A.HueSaturationValue(p=1)] if channels == 3 else []
    return A.Compose([
        A.OneOf([A.CLAHE(p=1), A.RandomBrightnessContrast(p=1), A.RandomGamma(p=1)], p=0.9),
        A.OneOf([A.Sharpen(p=1), A.Blur(blur_limit=3, p=1), A.MotionBlur(blur_limit=3, p=1),
                 A.GaussianBlur(p=1)], p=0.9),
        A.OneOf([A.RandomBrightnessContrast(p=1), *colour], p=0.9),
        A.GaussNoise(p=0.2),
    ])


def augment_image(augmenter: Any, image: np.ndarray, seed: int) -> np.ndarray:
    """Photometric augmentation of a float (H, W, C) image; Albumentations works on 8-bit images, so the
    tile goes through uint8 (16-bit precision is kept only for un-augmented tiles)."""
    augmenter.set_random_seed(seed)
    out = augmenter(image=to_uint8(image))["image"]
    out = np.asarray(out, dtype=np.float32).reshape(image.shape) / 255.0
    return out


def make_batch(
    cache: TileCache, indices: Sequence[int], crop: int | None, flips: bool, augmenter: Any, seed: int, epoch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of these tile indices: random crop, flips/rotations, photometric augmentation.

    Randomness comes from (seed, epoch, tile index), so a batch does not depend on what ran before it.
    """
    images, masks = [], []
    for i in indices:
        image, mask = cache[int(i)]
        rng = np.random.default_rng([int(seed), int(epoch), int(i)])
        if crop is not None:
            y = int(rng.integers(0, mask.shape[0] - crop + 1))
            x = int(rng.integers(0, mask.shape[1] - crop + 1))
            image, mask = image[y : y + crop, x : x + crop], mask[y : y + crop, x : x + crop]
        if flips:
            # micrographs have no preferred orientation: the 8 flips/rotations are free extra data
            k, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
            if image.shape[0] != image.shape[1]:
                k = 2 * (k % 2)
            image, mask = np.rot90(image, k, axes=(0, 1)), np.rot90(mask, k, axes=(0, 1))
            if flip:
                image, mask = image[:, ::-1], mask[:, ::-1]
        if augmenter is not None:
            image = augment_image(augmenter, np.ascontiguousarray(image), int(rng.integers(0, 2**31 - 1)))
        images.append(np.moveaxis(image, -1, 0))
        masks.append(mask)
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise InputError("crop", f"training tiles differ in size ({sorted(shapes)[:2]}); set crop to train on crops")
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).float(), torch.from_numpy(np.ascontiguousarray(np.stack(masks))).long()


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches: a seeded permutation of the n tiles cut into batches (the last may be smaller)."""
    order = np.random.default_rng([int(seed), int(epoch), 1]).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _same_size_groups(indices: Sequence[int], shapes: Sequence[tuple[int, int]], size: int) -> list[list[int]]:
    """Consecutive indices grouped into batches of at most `size` tiles of equal shape."""
    groups: list[list[int]] = []
    for i in indices:
        if groups and len(groups[-1]) < size and shapes[groups[-1][0]] == shapes[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


# --- training -----------------------------------------------------------------------------------------------


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
        for group in _same_size_groups(range(len(cache)), shapes, batch_size):
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
            "val_missing_class_iou": s["missing_class_iou"]}


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


def _improved(value: float, best: float) -> bool:
    return not math.isnan(value) and (math.isnan(best) or value > best)


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
    stop_after: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train a U-Net into the run folder `out`; return a summary (epochs done, best epoch and score).

    `train`/`val`: dataset folders (train split of `train`, val split of `val`, default `train`). `synthetic`
    with `synthetic_percent` adds round(P/100 x real tiles) synthetic pairs; `synthetic_only` trains on that many
    synthetic pairs alone. `resume` continues `out` from checkpoints/last.pt (same config required).
    `stop_after` ends this call after that many epochs, as if the run had been killed there (for tests).
    `on_epoch` receives each log row.
    """
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
    if weights not in ("none", "imagenet") and not Path(weights).is_file():
        raise InputError(weights, "encoder weights file not found (use none, imagenet or a file)")
    train_cache, val_cache = TileCache(data.train), TileCache(data.val)
    crop = None if config.crop is None else min(config.crop, train_cache.smallest_side())
    augmenter = paper_augmentation(data.in_channels) if config.augment == "paper" else None
    class_names = [c.name for c in data.classes]
    inputs = {**{k: run_config[k] for k in ("train", "val", "synthetic", "synthetic_percent", "synthetic_only")},
              "encoder_weights": weights, "crop_used": crop, **data.manifest()}
    if weights not in ("none", "imagenet"):
        inputs["encoder_weights_sha256"] = file_sha256(weights)

    state: dict[str, Any] = {"epoch": 0, "best": float("nan"), "best_epoch": 0, "bad_epochs": 0,
                             "lr_wait": 0, "lr": config.lr, "stopped": False}
    resuming = resume and RunFolder(out).has_checkpoint("last")
    torch.manual_seed(config.seed)
    # the model is built before the run folder exists, so a failed weights download leaves nothing behind
    model = build_unet(config.model, data.in_channels, data.classes, "none" if resuming else weights).to(dev)
    run = RunFolder.create(out, run_config, kind=KIND, resume=resume)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = grad_scaler(dev)
    if resuming:
        ckpt = run.load_checkpoint("last", map_location=dev)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        state.update(ckpt["train_state"])
        run.truncate_log("epoch", state["epoch"])
    elif resume:
        run.truncate_log("epoch", 0)
    run.write_manifest(inputs)

    loss_fn = make_loss(config.loss)

    def save_last() -> None:
        run.save_checkpoint("last", {**model.checkpoint(), "optimizer": optimizer.state_dict(),
                                     "scaler": scaler.state_dict(), "train_state": dict(state),
                                     "rng": capture_rng_state(), "run_config": run_config})

    done = state["stopped"] or state["epoch"] >= config.epochs
    end = config.epochs if stop_after is None else min(config.epochs, state["epoch"] + stop_after)
    monitor_key = f"val_{config.monitor}"
    while not done and state["epoch"] < end:
        epoch = state["epoch"] + 1
        t0 = time.perf_counter()
        torch.manual_seed(_epoch_seed(config.seed, epoch))  # dropout/drop-path draws, so resume replays them
        for group in optimizer.param_groups:
            group["lr"] = state["lr"]
        model.train()
        batches = epoch_batches(len(train_cache), config.batch_size, config.seed, epoch)
        losses: list[float] = []
        bar = progress_bar(batches, enabled=progress, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False)
        for idx in bar:
            x, y = make_batch(train_cache, idx, crop, config.flips, augmenter, config.seed, epoch)
            x, y = x.to(dev), y.to(dev)
            with autocast(dev):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        scores = validate(model, val_cache, loss_fn, config.val_batch_size, dev, class_names)
        value = scores[monitor_key]
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), **scores, "lr": state["lr"],
               "seconds": time.perf_counter() - t0}
        state["epoch"] = epoch
        if _improved(value, state["best"]):
            state.update(best=value, best_epoch=epoch, bad_epochs=0, lr_wait=0)
            run.save_checkpoint("best", {**model.checkpoint(), "epoch": epoch, config.monitor: value})
        else:
            # Keras' ReduceLROnPlateau and EarlyStopping (the paper's callbacks), on the monitored score
            state["bad_epochs"] += 1
            state["lr_wait"] += 1
            if state["lr_wait"] >= config.lr_patience:
                state["lr"] = max(state["lr"] * config.lr_factor, config.min_lr)
                state["lr_wait"] = 0
            if state["bad_epochs"] >= config.early_stop_patience:
                state["stopped"] = True
        run.log(row)
        save_last()
        draw_learning_curve(run.path, config.monitor)
        if on_epoch is not None:
            on_epoch(row)
        done = state["stopped"] or epoch >= config.epochs

    finished = state["stopped"] or state["epoch"] >= config.epochs
    summary = {"run": str(run.path), "epochs_done": state["epoch"], "finished": finished,
               "stopped_early": state["stopped"], "best_epoch": state["best_epoch"],
               "monitor": config.monitor, "best": state["best"]}
    run.write_manifest(inputs, device=str(dev), **{k: v for k, v in summary.items() if k != "run"})
    return summary


def draw_learning_curve(run_dir: str | Path, monitor: str = "missing_class_iou") -> None:
    """learning_curve.png: train/val loss, and validation accuracy, mIoU, Missing Class IoU per epoch."""
    path = Path(run_dir) / RunFolder.LOG
    if not path.exists():
        return
    rows = read_csv(path)
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]

    def col(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, col("train_loss"), marker=".", label="train")
    ax1.plot(epochs, col("val_loss"), marker=".", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for key, label in (("val_accuracy", "accuracy"), ("val_miou", "mIoU"), ("val_missing_class_iou", "Missing Class IoU")):
        ax2.plot(epochs, [100 * v for v in col(key)], marker=".", label=label + (" (monitored)" if key == f"val_{monitor}" else ""))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation score (%)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle("U-Net training")
    save_figure(Path(run_dir) / "learning_curve.png", fig)


def saved_run_config(run_dir: str | Path) -> tuple[SegTrainConfig, dict[str, Any]]:
    """The training config and data arguments a run was started with (from RUN/config.yaml), for `--resume`."""
    run = RunFolder.open(run_dir, kind=KIND)
    saved = dict(run.config)
    for key in ("kind", "device"):
        saved.pop(key, None)
    data = {k: saved.pop(k, None) for k in ("train", "val", "synthetic", "synthetic_percent", "synthetic_only")}
    return validate_config(SegTrainConfig, saved, run.path / RunFolder.CONFIG), data


# --- inference ----------------------------------------------------------------------------------------------


def load_segmenter(run: str | Path, device: str | torch.device = "auto", checkpoint: str = "best") -> UNet:
    """The trained U-Net of a run folder (its `best` checkpoint, else `last`), in eval mode on `device`."""
    folder = RunFolder.open(run, kind=KIND)
    dev = resolve_device(device) if isinstance(device, str) else device
    ckpt = folder.load_trained(checkpoint, map_location=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = UNet.from_checkpoint(ckpt)
    model.checkpoint_epoch = ckpt.get("epoch")  # type: ignore[attr-defined]
    return model.to(dev).eval()


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def predict_batch(model: Any, images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float images -> (B, H, W) int64 class masks (argmax of the model's logits)."""
    dev = _model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad(), autocast(dev):
            logits = model(images.to(dev))
    finally:
        if was_training:
            model.train()
    return logits.argmax(1).cpu().numpy().astype(np.int64)


def predict(model: Any, image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Segment one micrograph: float (H, W) / (H, W, C) array in [0, 1] or (C, H, W) tensor -> (H, W) mask."""
    if isinstance(image, torch.Tensor):
        x = image.float()
        if x.ndim == 2:
            x = x[None]
    else:
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 2:
            array = array[:, :, None]
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0)))
    return predict_batch(model, x[None])[0]


# --- evaluation ---------------------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """Scores of a model on a set of tiles: per-image rows, the summary, and a few examples for figures."""

    classes: list[ClassInfo]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    examples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _check_model_fits(model: Any, folder: DatasetFolder) -> None:
    config = getattr(model, "config", None)
    if not isinstance(config, UNetConfig):
        return
    names = [c["name"] for c in config.classes]
    if names != folder.class_names:
        raise InputError(folder.path, f"dataset classes {folder.class_names} differ from the model's {names}")
    if folder.image_channels != config.in_channels:
        raise InputError(folder.path, f"images have {folder.image_channels} channel(s), the model takes {config.in_channels}")


def evaluate(
    model: Any,
    folder: DatasetFolder | str | Path,
    split: str | None = "test",
    *,
    batch_size: int = 4,
    keep_examples: int = 0,
    reference: Literal["truth", "prediction"] = "truth",
    progress: bool = False,
) -> EvaluationResult:
    """Segment every tile of `split` (None: all tiles) and score the predictions against the masks.

    `model`: a U-Net from `load_segmenter`, or any callable from (B, C, H, W) images to (B, K, H, W) logits.
    `reference="prediction"` swaps the roles (the pre-test: the model's prediction is the reference the
    dataset's masks are scored against). `keep_examples` keeps the first N (name, image, truth, prediction).
    """
    folder = folder if isinstance(folder, DatasetFolder) else DatasetFolder(folder)
    _check_model_fits(model, folder)
    records = folder.records(split=split)
    if not records:
        raise InputError(folder.path, f"no tiles in split '{split}' (splits: {', '.join(folder.splits)})")
    scores = SegmentationScores(folder.num_classes, folder.class_names)
    cache = TileCache([(folder, r) for r in records])
    shapes = [cache[i][1].shape for i in range(len(cache))]
    rows: list[dict[str, Any]] = []
    examples = []
    groups = _same_size_groups(range(len(cache)), shapes, batch_size)
    for group in progress_bar(groups, enabled=progress, desc="segmenting", unit="batch", leave=False):
        x = torch.from_numpy(np.stack([np.moveaxis(cache[i][0], -1, 0) for i in group])).float()
        preds = predict_batch(model, x)
        for i, pred in zip(group, preds):
            image, truth = cache[i]
            rec = records[i]
            scored, ref = (pred, truth) if reference == "truth" else (truth, pred)
            row = scores.update(scored, ref, name=rec.file)
            rows.append({"file": row.pop("name"), "split": rec.split, "origin": rec.origin, **row})
            if len(examples) < keep_examples:
                examples.append((rec.file, image, truth, pred))
    summary = scores.summary()
    info = {"data": str(folder.path), "split": split, "reference": reference, "tiles": len(records)}
    return EvaluationResult(list(folder.classes), rows, summary, examples, info)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _blank_nan(value: Any) -> Any:
    # nan means "not defined here" (class absent from the image's truth): an empty CSV cell says so plainly
    return "" if isinstance(value, float) and math.isnan(value) else value


def per_class_rows(result: EvaluationResult) -> list[dict[str, Any]]:
    """One row per class: pooled IoU, Missing Class IoU (mean over images showing the class), image count."""
    s = result.summary
    return [
        {
            "class": c.name,
            "iou": s["iou_per_class"][c.name],
            "missing_class_iou": s["missing_class_iou_per_class"][c.name],
            "images_with_class": s["images_with_class"][c.name],
        }
        for c in result.classes
    ]


def write_evaluation(result: EvaluationResult, out: str | Path, overlays: int = 0, title: str = "",
                     figure_name: str = "overlays.png", figure_columns: Sequence[str] = ("image", "true mask", "prediction")) -> dict[str, Path]:
    """Write per_image.csv, per_class.csv, summary.json and, for `overlays` > 0, overlays/NAME.png strips
    (image | true mask | prediction | prediction over the image) plus one figure of the first tiles."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_image": out / "per_image.csv", "per_class": out / "per_class.csv", "summary": out / "summary.json"}
    write_csv(paths["per_image"], [{k: _blank_nan(v) for k, v in r.items()} for r in result.rows])
    write_csv(paths["per_class"], [{k: _blank_nan(v) for k, v in r.items()} for r in per_class_rows(result)])
    if overlays > 0 and result.examples:
        for name, image, truth, pred in result.examples[:overlays]:
            save_png(out / "overlays" / f"{Path(name).stem}.png", overlay_strip(image, truth, pred, result.classes))
        paths["figure"] = out / figure_name
        draw_examples(paths["figure"], result, overlays, title, figure_columns)
    # summary.json is written last: its presence means the evaluation is complete (the study relies on it)
    write_json(paths["summary"], {**result.info, **_nan_to_none(result.summary)})
    return paths


def image_rgb(image: np.ndarray) -> np.ndarray:
    """Float (H, W, C) image in [0, 1] -> RGB uint8 for figures (grey repeated, extra channels dropped)."""
    rgb = to_uint8(image)
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    return np.repeat(rgb[..., :1], 3, axis=-1) if rgb.shape[-1] != 3 else rgb


def overlay(image: np.ndarray, mask: np.ndarray, classes: Sequence[ClassInfo], alpha: float = 0.45) -> np.ndarray:
    """The mask in its classes' colours laid over the micrograph (paper Figs. 18, 21), RGB uint8."""
    base = image_rgb(image).astype(np.float32)
    colours = colorize_mask(mask, classes).astype(np.float32)
    return (base * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8)


def overlay_strip(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, classes: Sequence[ClassInfo]) -> np.ndarray:
    """One row: image | true mask | prediction | prediction over the image, 4 px white gaps."""
    gap = np.full((truth.shape[0], 4, 3), 255, dtype=np.uint8)
    parts = [image_rgb(image), colorize_mask(truth, classes), colorize_mask(pred, classes), overlay(image, pred, classes)]
    out = [parts[0]]
    for p in parts[1:]:
        out += [gap, p]
    return np.concatenate(out, axis=1)


def draw_examples(path: Path, result: EvaluationResult, n: int, title: str = "",
                  columns: Sequence[str] = ("image", "true mask", "prediction")) -> None:
    """A figure of the first n tiles: image, true mask, prediction over the image, with per-tile scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    examples = result.examples[:n]
    rows_by_file = {r["file"]: r for r in result.rows}
    fig, axes = plt.subplots(len(examples), 3, figsize=(7.5, 2.7 * len(examples) + 0.6), squeeze=False)
    for k, (row_axes, (name, image, truth, pred)) in enumerate(zip(axes, examples)):
        r = rows_by_file.get(name, {})
        row_axes[0].imshow(image_rgb(image))
        row_axes[1].imshow(colorize_mask(truth, result.classes), interpolation="nearest")
        row_axes[2].imshow(overlay(image, pred, result.classes), interpolation="nearest")
        scores = (f"acc {100 * r.get('pixel_accuracy', float('nan')):.1f}%  "
                  f"MCIoU {100 * r.get('missing_class_iou', float('nan')):.1f}%")
        titles = [name, "", scores]
        if k == 0:  # column headings on the first row
            titles = [f"{head}\n{t}" if t else head for head, t in zip(columns, titles)]
        for ax, t in zip(row_axes, titles):
            ax.set_title(t, fontsize=8)
            ax.axis("off")
    handles = [Patch(color=np.array(c.color) / 255, label=c.name) for c in result.classes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    save_figure(path, fig)


def format_evaluation(result: EvaluationResult) -> str:
    """The summary as an aligned table for the terminal (percentages)."""
    s = result.summary

    def pct(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    width = max(12, *(len(c.name) for c in result.classes))
    lines = [f"{s['num_images']} images, {s['pixels']} pixels",
             f"{'class':<{width}}  {'IoU %':>7}  {'Missing Class IoU %':>19}  {'images':>6}"]
    for c in result.classes:
        lines.append(f"{c.name:<{width}}  {pct(s['iou_per_class'][c.name]):>7}  "
                     f"{pct(s['missing_class_iou_per_class'][c.name]):>19}  {s['images_with_class'][c.name]:>6}")
    lines += [f"pixel accuracy      {pct(s['pixel_accuracy']):>6} %",
              f"mIoU (dataset)      {pct(s['miou']):>6} %",
              f"mIoU (per image)    {pct(s['mean_image_miou']):>6} %",
              f"Missing Class IoU   {pct(s['missing_class_iou']):>6} %"]
    return "\n".join(lines)


def evaluate_run(run: str | Path, data: str | Path, out: str | Path, split: str | None = "test", overlays: int = 4,
                 device: str = "auto", progress: bool = True) -> EvaluationResult:
    """`dualsynth evaluate`: score a run's best model on a split of a dataset folder and write the results."""
    model = load_segmenter(run, device)
    result = evaluate(model, data, split, keep_examples=overlays, progress=progress)
    result.info.update(model=str(Path(run)), checkpoint_epoch=getattr(model, "checkpoint_epoch", None))
    write_evaluation(result, out, overlays, title=f"{Path(run).name} on {Path(data).name} ({split or 'all'})")
    return result


def pretest(run: str | Path, synthetic: str | Path, out: str | Path, overlays: int = 4, device: str = "auto",
            progress: bool = True) -> EvaluationResult:
    """The paper's quality pre-test (§3.3, Fig. 12) of a synthetic set.

    A model trained on real data segments every synthetic micrograph; its prediction is the reference and
    the synthetic mask is scored against it, so a high Missing Class IoU means the synthetic mask says what a
    real-data model sees in the synthetic image. Writes the evaluation files and pretest.png (synthetic
    image / synthetic mask / prediction).
    """
    model = load_segmenter(run, device)
    result = evaluate(model, synthetic, None, keep_examples=max(overlays, 0), reference="prediction", progress=progress)
    result.info.update(model=str(Path(run)), checkpoint_epoch=getattr(model, "checkpoint_epoch", None),
                       note="the model's prediction is the reference; the synthetic masks are scored against it")
    write_evaluation(result, out, overlays, title=f"pre-test of {Path(synthetic).name} with {Path(run).name}",
                     figure_name="pretest.png", figure_columns=("synthetic image", "synthetic mask", "prediction"))
    return result
