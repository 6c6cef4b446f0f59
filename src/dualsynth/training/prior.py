"""Training the prior over z-matrices (the paper's section 4.2): `train-prior` and loading a trained prior.

`train_prior` encodes the dataset's train and val tiles with a trained VQ-VAE (or reads `encode`'s output),
stores the z-matrices in the run folder (RUN/codes.npz, so a resumed run trains on exactly the same data), and
fits a `PixelCNN` or `GatedPixelCNN` by cross-entropy. The checkpoint with the lowest validation negative
log-likelihood, in bits per code, is kept as checkpoints/best.pt. Everything random (model init, batch order,
crop positions) is a function of the seed and the step, so a run stopped at step k and resumed gives the same
weights as one that was never stopped.

With `condition: phase-fractions` every training z-matrix is paired with the class fractions of its real mask
(over the crop it is trained on), which the prior takes as its conditioning vector; `sample
--phase-fractions` then asks for tiles with chosen fractions.

The loop itself is `dualsynth.engine.Engine`; this module contributes the prior's step, validation and
checkpoint fields.

Python API: `PriorTrainConfig`, `PRESETS`, `train_prior(vqvae_dir, out_dir, config)`,
`load_prior(run_dir, device) -> TrainedPrior`, `bits_per_code(model, codes, cond)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from dualsynth.config import TrainingConfig, apply_threads, autocast, resolve_device
from dualsynth.data import DatasetFolder, dihedral, join_pair
from dualsynth.engine import Engine, adam, scheduled_lr, step_batch
from dualsynth.errors import InputError
from dualsynth.io import atomic_path, read_yaml
from dualsynth.models.prior import (
    GatedPixelCNNArchitecture,
    GatedPixelCNNConfig,
    PixelCNNArchitecture,
    PixelCNNConfig,
    build_prior,
    prior_from_checkpoint,
)
from dualsynth.models.vqvae import encode, load_vqvae
from dualsynth.runs import RunFolder
from dualsynth.training.vqvae import crop_to_multiple

KIND = "prior"
CODES_FILE = "codes.npz"


class PriorTrainConfig(TrainingConfig):
    """Everything `train-prior` reads from a preset, a config file or `--set key=value`."""

    arch: Literal["pixelcnn", "gated"] = Field("gated", description="pixelcnn: the paper's; gated: no blind spot")
    pixelcnn: PixelCNNArchitecture = Field(default_factory=PixelCNNArchitecture)
    gated: GatedPixelCNNArchitecture = Field(default_factory=GatedPixelCNNArchitecture)
    condition: Literal["none", "phase-fractions"] = Field(
        "none", description="phase-fractions: condition on each tile's class fractions (from its real mask)"
    )
    augment: Literal["none", "hflip", "dihedral"] = Field(
        "hflip",
        description="encode each training tile also mirrored (hflip) or in all 8 flips/rotations (dihedral); "
        "hflip keeps the up/down order of layered microstructures",
    )
    crop: int | None = Field(
        None, ge=2, description="train on random square crops of the z-matrices of this side (None: whole)"
    )
    batch_size: int = Field(16, ge=1, description="z-matrices per update")
    steps: int = Field(2000, ge=1, description="training updates")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="cosine: decay to 5% of lr at the end")
    eval_every: int = Field(100, ge=1, description="steps per validation (log.csv row; best.pt is checked here)")
    checkpoint_every: int = Field(100, ge=1, description="steps per checkpoints/last.pt")


PRESETS: dict[str, dict[str, Any]] = {
    # minutes on a busy 2-core CPU: narrower networks, 32x32 crops of the z-matrices
    "quick": {
        "pixelcnn": {"hidden": 64, "num_residual_blocks": 2, "num_output_layers": 2},
        "gated": {"hidden": 32, "num_layers": 8, "skip": 64},
        "crop": 32,
        "batch_size": 16,
        "steps": 1500,
        "lr": 2e-3,
        "eval_every": 100,
        "checkpoint_every": 100,
    },
    # the paper's prior: a PixelCNN (van den Oord et al. 2016) on whole z-matrices, no augmentation, constant
    # learning rate. The paper gives no sizes or training settings for it; these (128 channels, 2 residual
    # blocks, 2 output layers, Adam 3e-4, 20,000 updates of 16 z-matrices) are ours, listed in README.
    "paper": {
        "arch": "pixelcnn",
        "pixelcnn": {"hidden": 128, "num_residual_blocks": 2, "num_output_layers": 2},
        "gated": {"hidden": 64, "num_layers": 12, "skip": 128},
        "augment": "none",
        "crop": None,
        "batch_size": 16,
        "steps": 20_000,
        "lr": 3e-4,
        "lr_schedule": "constant",
        "eval_every": 500,
        "checkpoint_every": 500,
    },
}


def saved_run_config(run_dir: str | Path) -> tuple[PriorTrainConfig, dict[str, Any]]:
    """The training config and inputs (vqvae, data, codes) a prior run was started with, for `--resume`."""
    return RunFolder.open(run_dir, kind=KIND).saved_config(PriorTrainConfig, ("vqvae", "data", "codes"))


# --- the training data: z-matrices and their class fractions ------------------------------------------------


@dataclass
class EncodedTiles:
    """z-matrices of a split: `codes` (N, h, w) long; `cells` (N, C, h, w) float32, the class fractions of
    the mask pixels under each code (None when the masks were not read); `files` the tiles they came from."""

    codes: torch.Tensor
    cells: torch.Tensor | None
    files: list[str]

    def __len__(self) -> int:
        return self.codes.shape[0]

    def fractions(self) -> torch.Tensor | None:
        """Class fractions of each whole tile (N, C)."""
        return None if self.cells is None else self.cells.mean(dim=(-2, -1))


def cell_fractions(mask: torch.Tensor, num_classes: int, downsample: int) -> torch.Tensor:
    """Class fractions (C, h, w) of the mask pixels under each code of a (H, W) mask (H, W multiples of d)."""
    onehot = F.one_hot(mask.long(), num_classes).permute(2, 0, 1).float()
    return F.avg_pool2d(onehot[None], downsample)[0]


def _transforms(augment: str, square: bool) -> list[tuple[int, bool]]:
    if augment == "none":
        return [(0, False)]
    if augment == "hflip":
        return [(0, False), (0, True)]
    return [(k, f) for k in ((0, 1, 2, 3) if square else (0, 2)) for f in (False, True)]


def encode_tiles(vqvae, folder: DatasetFolder, records: Sequence[Any], augment: str = "none", batch_size: int = 16) -> EncodedTiles:
    """Encode the records' joint images (and their mirrored/rotated copies, per `augment`) to z-matrices.

    The copies are made on the images before encoding: a z-matrix flipped after encoding is not the code of
    the flipped image, since each code vector describes an oriented patch.
    """
    c = vqvae.config
    codes, cells, files = [], [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        joints, masks = [], []
        for rec in chunk:
            image, mask = folder.load_image(rec), folder.load_mask(rec)
            joint = crop_to_multiple(torch.as_tensor(join_pair(image, mask, c.num_classes, c.mask_encoding)).float(), c.downsample)
            mask = crop_to_multiple(torch.as_tensor(mask), c.downsample)
            for k, flip in _transforms(augment, joint.shape[-1] == joint.shape[-2]):
                joints.append(dihedral(joint, k, flip))
                masks.append(dihedral(mask, k, flip))
                files.append(rec.file)
        if len({tuple(j.shape) for j in joints}) > 1:
            raise InputError(folder.path, "tiles differ in size; prepare the dataset with one --tile size")
        codes.append(encode(vqvae, torch.stack(joints), batch_size=batch_size))
        cells += [cell_fractions(m, c.num_classes, c.downsample) for m in masks]
    if not codes:
        return EncodedTiles(torch.zeros(0, 1, 1, dtype=torch.long), None, [])
    all_codes = torch.cat(codes)
    if len({tuple(z.shape) for z in all_codes}) > 1:
        raise InputError(folder.path, "tiles differ in size; prepare the dataset with one --tile size")
    return EncodedTiles(all_codes.long(), torch.stack(cells), files)


def read_encoded_folder(codes_dir: str | Path, split: str, num_classes: int | None, downsample: int | None) -> EncodedTiles:
    """z-matrices written by `dualsynth encode` (CODES/<split>.npz); with `num_classes`, the class fractions
    under each code from the masks of the dataset named in CODES/encode.json (when it names one)."""
    codes_dir = Path(codes_dir)
    path = codes_dir / f"{split}.npz"
    if not path.is_file():
        if split == "train":
            raise InputError(codes_dir, "no train.npz: not the output of 'dualsynth encode'")
        return EncodedTiles(torch.zeros(0, 1, 1, dtype=torch.long), None, [])
    with np.load(path) as npz:
        codes = torch.from_numpy(npz["codes"].astype(np.int64))
        files = [str(f) for f in npz["files"]]
    cells = None
    info_path = codes_dir / "encode.json"
    if num_classes is not None and info_path.is_file():
        folder = DatasetFolder(json.loads(info_path.read_text())["data"])
        by_file = {r.file: r for r in folder.records()}
        cells = torch.stack([
            cell_fractions(crop_to_multiple(torch.as_tensor(folder.load_mask(by_file[f])), downsample), num_classes, downsample)
            for f in files
        ])
    return EncodedTiles(codes, cells, files)


def save_encoded(path: Path, train: EncodedTiles, val: EncodedTiles) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, part in (("train", train), ("val", val)):
        arrays[f"{name}_codes"] = part.codes.numpy().astype(np.int16)
        arrays[f"{name}_files"] = np.asarray(part.files, dtype=str)
        if part.cells is not None:
            arrays[f"{name}_cells"] = part.cells.numpy().astype(np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def load_encoded(path: Path) -> tuple[EncodedTiles, EncodedTiles]:
    if not path.is_file():
        raise InputError(path, "the run's z-matrices are missing; start a new run")
    with np.load(path) as npz:
        parts = []
        for name in ("train", "val"):
            cells = npz[f"{name}_cells"] if f"{name}_cells" in npz else None
            parts.append(EncodedTiles(
                torch.from_numpy(npz[f"{name}_codes"].astype(np.int64)),
                None if cells is None else torch.from_numpy(cells),
                [str(f) for f in npz[f"{name}_files"]],
            ))
    return parts[0], parts[1]


# --- batches, loss, learning rate ---------------------------------------------------------------------------


def code_batch(data: EncodedTiles, indices: np.ndarray, crop: int | None, seed: int, step: int, conditioned: bool):
    """Codes (B, c, c) of update `step`: random crops (or whole z-matrices), and their class fractions."""
    rng = np.random.default_rng([seed, step, 2])
    h, w = data.codes.shape[-2:]
    ch, cw = (h, w) if crop is None else (min(crop, h), min(crop, w))
    codes, cond = [], []
    for i in indices:
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        codes.append(data.codes[int(i), top : top + ch, left : left + cw])
        if conditioned:
            cond.append(data.cells[int(i), :, top : top + ch, left : left + cw].mean(dim=(-2, -1)))
    return torch.stack(codes), (torch.stack(cond) if conditioned else None)


def nll_bits(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of `codes` under `logits`, in bits per code."""
    return F.cross_entropy(logits.float(), codes) / math.log(2)


@torch.no_grad()
def bits_per_code(model, codes: torch.Tensor, cond: torch.Tensor | None = None, batch_size: int = 32) -> float:
    """Validation NLL of z-matrices (N, h, w) in bits per code (log2 K for a prior that knows nothing)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, codes.shape[0], batch_size):
            z = codes[i : i + batch_size].to(device)
            c = None if cond is None else cond[i : i + batch_size].to(device)
            with autocast(device):
                logits = model(z, c)
            total += nll_bits(logits, z).item() * z.numel()
            count += z.numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)


# --- training -----------------------------------------------------------------------------------------------


def model_config(config: PriorTrainConfig, num_codes: int, num_classes: int):
    cond_dim = num_classes if config.condition == "phase-fractions" else 0
    if config.arch == "pixelcnn":
        return PixelCNNConfig(**config.pixelcnn.model_dump(), num_codes=num_codes, cond_dim=cond_dim)
    return GatedPixelCNNConfig(**config.gated.model_dump(), num_codes=num_codes, cond_dim=cond_dim)


def _vqvae_data(vqvae_dir: Path) -> Path | None:
    cfg = read_yaml(Path(vqvae_dir) / RunFolder.CONFIG) or {}
    return Path(cfg["data"]) if cfg.get("data") else None


def _prepare_data(config: PriorTrainConfig, vqvae, data_dir: Path | None, codes_dir: Path | None):
    """(train, val) z-matrices with the class fractions under every code (kept even when unconditioned:
    `sample` draws conditioning from them and `inspect` compares synthetic sets with them)."""
    c = vqvae.config
    if codes_dir is not None:
        if config.augment != "none":
            raise InputError("--codes", "encode's z-matrices cannot be augmented; add --set augment=none or use --data")
        train = read_encoded_folder(codes_dir, "train", c.num_classes, c.downsample)
        return train, read_encoded_folder(codes_dir, "val", c.num_classes, c.downsample)
    if data_dir is None:
        raise InputError("--data", "the VQ-VAE run names no dataset; give --data or --codes")
    folder = DatasetFolder(data_dir)
    if folder.num_classes != c.num_classes or folder.image_channels != c.image_channels:
        raise InputError(data_dir, "dataset's image channels or classes differ from the VQ-VAE's")
    train_recs, val_recs = folder.records(split="train"), folder.records(split="val")
    if not train_recs:
        raise InputError(data_dir, "dataset has no 'train' tiles")
    return encode_tiles(vqvae, folder, train_recs, config.augment), encode_tiles(vqvae, folder, val_recs, "none")


def train_prior(
    vqvae_dir: str | Path,
    out_dir: str | Path,
    config: PriorTrainConfig,
    *,
    data_dir: str | Path | None = None,
    codes_dir: str | Path | None = None,
    resume: bool = False,
    device: str = "auto",
    threads: str | int | None = "auto",
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a prior on the z-matrices of the VQ-VAE run `vqvae_dir`'s dataset into the run folder `out_dir`.

    Data: the dataset the VQ-VAE trained on (its config.yaml `data`), or `data_dir`, encoded with the VQ-VAE;
    or `codes_dir`, the output of `dualsynth encode`. `resume` continues from checkpoints/last.pt with the
    run's stored z-matrices. `stop_after` ends this call after that many updates, as if killed (for tests).
    Returns a summary: steps done, best step, best validation bits per code.
    """
    apply_threads(threads)
    dev = resolve_device(device)
    vqvae_dir = Path(vqvae_dir).resolve()
    vqvae = load_vqvae(vqvae_dir, dev)
    data_dir = Path(data_dir).resolve() if data_dir is not None else _vqvae_data(vqvae_dir)
    if codes_dir is not None:
        codes_dir = Path(codes_dir).resolve()
    run_config = {
        "vqvae": str(vqvae_dir),
        "data": None if data_dir is None else str(data_dir),
        "codes": None if codes_dir is None else str(codes_dir),
        **config.model_dump(mode="json"),
        "device": device,
    }
    run = RunFolder.create(out_dir, run_config, kind=KIND, resume=resume, defaults=type(config)().model_dump(mode="json"))
    codes_path = run.path / CODES_FILE
    if resume and codes_path.is_file():
        train, val = load_encoded(codes_path)
    else:
        train, val = _prepare_data(config, vqvae, data_dir, codes_dir)
        save_encoded(codes_path, train, val)
    conditioned = config.condition == "phase-fractions"
    if conditioned and train.cells is None:
        raise InputError(out_dir, "phase-fraction conditioning needs the masks of the training tiles")
    num_classes = vqvae.config.num_classes
    mcfg = model_config(config, vqvae.config.num_embeddings, num_classes)

    torch.manual_seed(config.seed)
    model = build_prior(mcfg).to(dev)
    val_codes, val_cond = (val.codes, val.fractions()) if len(val) else (train.codes, train.fractions())
    val_name = "val" if len(val) else "train"
    extra = {
        "vqvae": str(vqvae_dir),
        "data": None if data_dir is None else str(data_dir),
        "condition": config.condition,
        "z_shape": list(train.codes.shape[-2:]),
        "num_classes": num_classes,
        # the class fractions of the real training tiles: `sample` draws conditioning vectors from them
        "cond_bank": None if train.cells is None else _unique_fractions(train).numpy(),
    }
    engine = Engine(
        run, dev, models={"prior": model}, optimizers={"main": adam(model.parameters(), config.lr)},
        seed=config.seed, total=config.steps, unit="step", checkpoint_extra=lambda: extra, run_config=run_config,
        precision=config.precision, deterministic=config.deterministic,
    )
    if resume:
        engine.resume()
    inputs = {"vqvae": str(vqvae_dir), "data": run_config["data"], "codes": run_config["codes"],
              "train_z_matrices": len(train), "val_z_matrices": len(val)}
    run.write_manifest(inputs)

    def update(step: int) -> None:
        idx = step_batch(len(train), config.batch_size, config.seed, step)
        z, cond = code_batch(train, idx, config.crop, config.seed, step, conditioned)
        z = z.to(dev)
        cond = None if cond is None else cond.to(dev)
        engine.set_lr(scheduled_lr(config.lr, config.lr_schedule, step, config.steps))
        with engine.autocast():
            logits = model(z, cond)
        loss = nll_bits(logits, z)
        engine.optimize(loss)
        engine.accumulate({"train_bits_per_code": loss.item()}, items=z.numel())

    def after(step: int, _: Any) -> dict[str, Any] | None:
        step += 1  # updates done
        if step % config.eval_every and step != config.steps:
            return None
        bits = bits_per_code(model, val_codes, val_cond if conditioned else None)
        row = {"step": step, **engine.window_means(), f"{val_name}_bits_per_code": bits,
               "lr": scheduled_lr(config.lr, config.lr_schedule, step - 1, config.steps),
               "codes_per_s": engine.throughput()}
        engine.log(row)
        engine.keep_if_best(bits, "min", bits_per_code=bits)
        return {"train": f"{row['train_bits_per_code']:.3f}", val_name: f"{bits:.3f}",
                "best": f"{engine.state['best']:.3f}"}

    engine.run_loop(update, after, checkpoint_every=config.checkpoint_every, stop_after=stop_after,
                    progress=progress, desc="train-prior")

    summary = {
        "step": engine.done,
        "best_step": engine.state["best_at"],
        "best_bits_per_code": engine.state["best"],
        "validated_on": val_name,
        "uniform_bits_per_code": math.log2(vqvae.config.num_embeddings),
        "train_z_matrices": len(train),
        "z_shape": list(train.codes.shape[-2:]),
    }
    run.write_manifest(inputs, device=str(dev), precision=engine.amp_name, threads=torch.get_num_threads(), steps_done=engine.done, best_step=engine.state["best_at"],
                       best_bits_per_code=engine.state["best"])
    return summary


def _unique_fractions(train: EncodedTiles) -> torch.Tensor:
    """Tile class fractions, one row per original tile (augmented copies share their tile's fractions)."""
    seen: dict[str, torch.Tensor] = {}
    for name, row in zip(train.files, train.fractions()):
        seen.setdefault(name, row)
    return torch.stack(list(seen.values()))



# --- loading a trained prior --------------------------------------------------------------------------------


@dataclass
class TrainedPrior:
    """A prior run's model and what sampling needs from the run: the VQ-VAE, the dataset, the grid size."""

    model: Any
    vqvae_dir: Path
    data_dir: Path | None
    condition: str
    z_shape: tuple[int, int]
    cond_bank: np.ndarray | None
    num_classes: int
    step: int
    bits_per_code: float | None


def load_prior(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str = "best") -> TrainedPrior:
    """The trained prior of a run folder (its `best` checkpoint, else `last`), in eval mode on `device`."""
    run = RunFolder.open(run_dir, kind=KIND)
    device = resolve_device(device) if isinstance(device, str) else device
    ckpt = run.load_trained(checkpoint, map_location=device)
    model = prior_from_checkpoint(ckpt).to(device).eval()
    bank = ckpt.get("cond_bank")
    return TrainedPrior(
        model=model,
        vqvae_dir=Path(ckpt["vqvae"]),
        data_dir=Path(ckpt["data"]) if ckpt.get("data") else None,
        condition=ckpt.get("condition", "none"),
        z_shape=tuple(ckpt["z_shape"]),
        cond_bank=None if bank is None else np.asarray(bank, dtype=np.float32),
        num_classes=int(ckpt["num_classes"]),
        step=int(ckpt.get("step", ckpt.get("train_state", {}).get("step", 0))),
        bits_per_code=ckpt.get("bits_per_code"),
    )
