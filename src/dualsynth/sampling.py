"""Sampling z-matrices from a trained prior: the naive and the fast autoregressive sampler.

Both samplers fill the grid in raster order and draw code (i, j) from the prior's distribution at (i, j) by
inverse CDF against one pre-drawn uniform number per position (`draw_noise`). Because the randomness is drawn
up front, and not inside the loop, the two samplers consume exactly the same random numbers, so for the same
seed they return the same z-matrices; only the work per position differs:

- `sample_naive` runs the whole network over the whole grid for each of the H*W positions (what the paper's
  keras sampler does): O((H*W)^2) work.
- `sample_fast` asks the prior for the logits at (i, j) only (`start_sampling` / `begin_row` / `logits_at`
  in `dualsynth.models.prior`): each layer's activation at the new position is computed once, from cached
  activations of earlier positions (for the gated PixelCNN, the vertical stack advances one row per grid row
  and the horizontal stack one position per position). O(H*W) work.

Computing one position at a time changes the order of floating-point sums, so the logits of the two samplers can differ in the last bits;
a sample differs only if a uniform number falls within that rounding error of a CDF step (about 1e-7 per
position in float32), which the tests check does not happen on their grids.

On top of the samplers: `sample_dataset` (the `sample` command: z-matrices -> VQ-VAE decoder -> mask
clean-up -> a dataset folder with raw masks, codes.npz, grid.png, sample.json) and `inspect_synthetic` (the
`inspect` command: phase fractions against the real training set, pixels changed by the clean-up, distinct
z-matrices). The clean-up function is passed in (`clean=`), since `postprocess` comes after this module.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dualsynth.errors import InputError
from dualsynth.io import atomic_path, progress_bar, read_image, save_figure, save_png, write_json
from dualsynth.models.prior import GatedPixelCNN, PixelCNN


def draw_noise(n: int, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """The uniform numbers (n, H, W) in [0, 1) that decide every sampled code (drawn on the CPU, float64)."""
    h, w = shape
    return torch.rand(n, h, w, generator=generator, dtype=torch.float64)


def pick_codes(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Codes (n,) drawn from softmax(logits / temperature) (n, K) by inverse CDF against uniforms `u` (n,).

    Temperature 0 means the most likely code (argmax); below 1 sharpens, above 1 flattens the distribution.
    """
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1)
    # index of the first CDF step above u (a code of probability 0 is never drawn, even for u = 0); the
    # clamp guards against rounding leaving the last step just below u
    return (cdf <= u.to(cdf.device)[:, None]).sum(dim=-1).clamp_(max=logits.shape[-1] - 1)


def _prepare(model, n, shape, generator, cond, noise):
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (H, W) with H, W >= 1, got {tuple(shape)}")
    device = next(model.parameters()).device
    if noise is None:
        noise = draw_noise(n, shape, generator)
    if tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise must have shape {(n, *shape)}, got {tuple(noise.shape)}")
    cond = model.check_cond(None if cond is None else cond.to(device), n)
    return device, noise.to(device), cond


def _positions(shape, stop_after):
    h, w = shape
    total = h * w if stop_after is None else min(stop_after, h * w)
    return h, w, total


@torch.inference_mode()
def sample_naive(
    model: PixelCNN | GatedPixelCNN,
    n: int,
    shape: Sequence[int],
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
    *,
    noise: torch.Tensor | None = None,
    stop_after: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """`n` z-matrices of `shape` (H, W), running the whole prior on the whole grid for every position.

    The reference the fast sampler is tested against. `cond` (n, F) conditions a conditioned prior; `noise`
    replaces the uniforms drawn from `generator`; `stop_after` samples only the first positions in raster
    order (benchmarks time part of a grid and extrapolate). Returns codes (n, H, W), long, on the model's device.
    """
    was_training = model.training
    model.eval()
    device, noise, cond = _prepare(model, n, shape, generator, cond, noise)
    h, w, total = _positions(shape, stop_after)
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    try:
        for p in progress_bar(range(total), enabled=progress, desc="sampling (naive)", unit="pos", leave=False):
            i, j = divmod(p, w)
            logits = model(codes, cond)[:, :, i, j]
            codes[:, i, j] = pick_codes(logits, noise[:, i, j], temperature)
    finally:
        model.train(was_training)
    return codes


@torch.inference_mode()
def sample_fast(
    model: PixelCNN | GatedPixelCNN,
    n: int,
    shape: Sequence[int],
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
    *,
    noise: torch.Tensor | None = None,
    stop_after: int | None = None,
    progress: bool = False,
    threads: int | None = 1,
) -> torch.Tensor:
    """Same contract and, for the same seed, the same samples as `sample_naive`, with far less work.

    Each position's logits come from `model.logits_at`, which computes every layer at that position only,
    from per-layer caches; the one-hot grid is updated in place as codes are drawn. `threads`: torch CPU
    threads while sampling on the CPU (None: leave torch's setting). The work per position is too small to
    split, so 1 is fastest: 5x faster than 2 threads on a busy 2-core machine (benchmarks/bench_sampler.py).
    """
    device = next(model.parameters()).device
    if threads is not None and device.type == "cpu" and threads != torch.get_num_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return sample_fast(model, n, shape, temperature, generator, cond, noise=noise, stop_after=stop_after,
                               progress=progress, threads=None)
        finally:
            torch.set_num_threads(before)
    was_training = model.training
    model.eval()
    device, noise, cond = _prepare(model, n, shape, generator, cond, noise)
    h, w, total = _positions(shape, stop_after)
    dtype = next(model.parameters()).dtype
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    onehot = torch.zeros(n, model.config.num_codes, h, w, dtype=dtype, device=device)
    batch = torch.arange(n, device=device)
    state = model.start_sampling(onehot, cond)
    try:
        for p in progress_bar(range(total), enabled=progress, desc="sampling", unit="pos", leave=False):
            i, j = divmod(p, w)
            if j == 0:
                model.begin_row(state, i)
            logits = model.logits_at(state, i, j)
            picked = pick_codes(logits, noise[:, i, j], temperature)
            codes[:, i, j] = picked
            onehot[batch, picked, i, j] = 1
    finally:
        model.train(was_training)
    return codes


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"naive": sample_naive, "fast": sample_fast}


# --- the `sample` pipeline: z-matrices -> decoded pairs -> a synthetic dataset folder ------------------------

CODES_FILE = "codes.npz"
SUMMARY_FILE = "sample.json"
GRID_FILE = "grid.png"
RAW_MASKS = "raw_masks"


def parse_phase_fractions(text: str | None, num_classes: int) -> np.ndarray | None:
    """`"0.7,0.2,0.1"` -> fractions (C,) that sum to 1 (within 0.02; then renormalised), or None."""
    if text is None:
        return None
    try:
        values = np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        raise InputError("--phase-fractions", f"'{text}' is not a comma-separated list of numbers") from None
    if values.size != num_classes:
        raise InputError("--phase-fractions", f"give {num_classes} fractions (one per class), got {values.size}")
    if (values < 0).any() or not np.isfinite(values).all():
        raise InputError("--phase-fractions", "fractions must be >= 0")
    if abs(values.sum() - 1.0) > 0.02:
        raise InputError("--phase-fractions", f"fractions must sum to 1, they sum to {values.sum():.3f}")
    return (values / values.sum()).astype(np.float32)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of sample `index`: a sample depends on (seed, index) only, not on the batch size."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))


def conditioning_for(index: int, seed: int, fractions: np.ndarray | None, bank: np.ndarray | None) -> np.ndarray | None:
    """Conditioning vector of sample `index`: the asked-for fractions, else a real training tile's, drawn."""
    if fractions is not None:
        return fractions
    if bank is None:
        return None
    pick = int(torch.randint(len(bank), (1,), generator=sample_generator(seed, -1 - index)).item())
    return bank[pick]


def raw_mask_png(decoded_mask: torch.Tensor, num_classes: int, encoding: str) -> np.ndarray:
    """The raw decoded mask as a 16-bit grey image: the `levels` channel as it came out of the decoder (the
    paper's Fig. 10); for `onehot`, the argmax class drawn at its level k/(C-1)."""
    if encoding == "levels":
        values = decoded_mask.reshape(decoded_mask.shape[-2:]).float().clamp(0, 1)
    else:
        values = decoded_mask.argmax(dim=0).float() / (num_classes - 1)
    return (values.numpy() * 65535 + 0.5).astype(np.uint16)


def raw_mask_classes(raw_png: np.ndarray, num_classes: int) -> np.ndarray:
    """Class of every pixel of a raw mask image by nearest level (as `dualsynth.data.split` reads a mask)."""
    scale = float(np.iinfo(raw_png.dtype).max) if np.issubdtype(raw_png.dtype, np.integer) else 1.0
    return np.rint(np.clip(raw_png / scale, 0, 1) * (num_classes - 1)).astype(np.int64)


def sample_dataset(
    prior_dir: str | Path,
    out_dir: str | Path,
    n: int,
    *,
    clean: Callable[..., np.ndarray],
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    phase_fractions: str | None = None,
    min_object_area: int | None = None,
    z_shape: Sequence[int] | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    grid_pairs: int = 8,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Sample `n` z-matrices from a trained prior, decode them with its VQ-VAE and write a dataset folder.

    `clean(decoded_mask, num_classes, encoding, min_object_area)` turns a decoded mask channel into a class
    mask (the CLI passes `dualsynth.postprocess.clean_mask`). The folder has the `prepare` format
    (origin=synthetic, split=train), with the raw decoded masks in raw_masks/ (manifest column `raw_mask`),
    the z-matrices in codes.npz, the pairs of the first samples in grid.png (paper Figs. 10-11) and a summary
    in sample.json. `phase_fractions` ("f0,f1,...") needs a prior trained with phase-fraction conditioning.
    Sample i depends on (`seed`, i) only, not on `batch_size`. `threads`: CPU threads of the sampler.
    """
    from dualsynth.config import resolve_device
    from dualsynth.data import DatasetFolder, DatasetWriter, default_classes, split
    from dualsynth.training.prior import load_prior
    from dualsynth.training.vqvae import decode, load_vqvae

    if n < 1:
        raise InputError("--n", "must be at least 1")
    if batch_size < 1:
        raise InputError("--batch", "must be at least 1")
    if temperature < 0:
        raise InputError("--temperature", "must be >= 0")
    dev = resolve_device(device)
    trained = load_prior(prior_dir, dev)
    model = trained.model
    if phase_fractions is not None and trained.condition != "phase-fractions":
        raise InputError(
            "--phase-fractions",
            f"prior {prior_dir} was trained without conditioning; train one with --condition phase-fractions",
        )
    fractions = parse_phase_fractions(phase_fractions, trained.num_classes)
    vqvae = load_vqvae(trained.vqvae_dir, dev)
    vc = vqvae.config
    shape = tuple(int(s) for s in (z_shape or trained.z_shape))
    data_folder = DatasetFolder(trained.data_dir) if trained.data_dir and Path(trained.data_dir).is_dir() else None
    classes = data_folder.classes if data_folder is not None else default_classes(vc.num_classes)
    bank = trained.cond_bank if trained.condition == "phase-fractions" else None
    c_img = vc.image_channels

    all_codes, all_cond, names, changed, grid = [], [], [], [], []
    seconds = 0.0
    with DatasetWriter(out_dir, classes, overwrite=overwrite) as writer:
        bar = progress_bar(enabled=progress, total=n, desc="sample", unit="pair")
        for start in range(0, n, batch_size):
            index = range(start, min(n, start + batch_size))
            noise = torch.cat([draw_noise(1, shape, sample_generator(seed, i)) for i in index])
            conds = [conditioning_for(i, seed, fractions, bank) for i in index]
            cond = None if conds[0] is None else torch.as_tensor(np.stack(conds), dtype=torch.float32)
            t0 = time.perf_counter()
            codes = sample_fast(model, len(index), shape, temperature, cond=cond, noise=noise, threads=threads).cpu()
            seconds += time.perf_counter() - t0
            joints = decode(vqvae, codes)
            for i, z, joint in zip(index, codes, joints):
                image = np.moveaxis(joint[:c_img].clamp(0, 1).numpy(), 0, -1)
                decoded_mask = joint[c_img:]
                clean_mask = np.asarray(clean(decoded_mask[0] if vc.mask_encoding == "levels" else decoded_mask,
                                              vc.num_classes, vc.mask_encoding, min_object_area))
                raw_png = raw_mask_png(decoded_mask, vc.num_classes, vc.mask_encoding)
                _, raw_classes = split(joint, vc.num_classes, vc.mask_encoding)
                changed.append(float(np.mean(np.asarray(raw_classes) != clean_mask)))
                rec = writer.add(f"synthetic-{i:05d}", image, clean_mask, split="train", source=Path(prior_dir).name,
                                 origin="synthetic")
                save_png(writer.tmp / RAW_MASKS / rec.file, raw_png)
                rec.extra["raw_mask"] = f"{RAW_MASKS}/{rec.file}"
                names.append(rec.file)
                if len(grid) < grid_pairs:
                    grid.append((image, raw_png, clean_mask))
            all_codes.append(codes)
            if cond is not None:
                all_cond.append(cond)
            bar.update(len(index))
        bar.close()
        codes_np = torch.cat(all_codes).numpy().astype(np.int16)
        cond_np = torch.cat(all_cond).numpy() if all_cond else np.zeros((0, 0), dtype=np.float32)
        with atomic_path(writer.tmp / CODES_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, codes=codes_np, cond=cond_np, files=np.asarray(names, dtype=str))
        draw_pairs(writer.tmp / GRID_FILE, grid, classes)
        summary = {
            "prior": str(Path(prior_dir).resolve()),
            "prior_step": trained.step,
            "prior_bits_per_code": trained.bits_per_code,
            "arch": model.config.arch,
            "vqvae": str(trained.vqvae_dir),
            "data": None if trained.data_dir is None else str(trained.data_dir),
            "n": n,
            "seed": seed,
            "temperature": temperature,
            "condition": trained.condition,
            "phase_fractions": None if fractions is None else fractions.tolist(),
            "min_object_area": min_object_area,
            "z_shape": list(shape),
            "tile_shape": [int(s) for s in joints.shape[-2:]],
            "distinct_z_matrices": distinct_count(codes_np),
            "mean_changed_by_cleanup": float(np.mean(changed)),
            "sampling_seconds": seconds,
            "device": str(dev),
        }
        write_json(writer.tmp / SUMMARY_FILE, summary)
    return summary


def distinct_count(codes: np.ndarray) -> int:
    """Number of different z-matrices among (N, h, w)."""
    if len(codes) == 0:
        return 0
    return int(np.unique(codes.reshape(len(codes), -1), axis=0).shape[0])


def draw_pairs(path: Path, pairs: list, classes) -> None:
    """Paper Figs. 10-11: per row a synthetic micrograph, its raw decoded mask and the cleaned mask."""
    if not pairs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualsynth.data import colorize_mask

    fig, axes = plt.subplots(len(pairs), 3, figsize=(7.5, 2.5 * len(pairs)), squeeze=False)
    for row, (image, raw, clean) in zip(axes, pairs):
        row[0].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        row[1].imshow(raw, cmap="gray", vmin=0, vmax=65535)
        row[2].imshow(colorize_mask(clean, classes))
        for ax in row:
            ax.axis("off")
    for ax, title in zip(axes[0], ("synthetic micrograph", "raw decoded mask", "clean mask")):
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(path, fig)


# --- `inspect`: is a synthetic set like the real one? --------------------------------------------------------


def tile_fractions(folder, records) -> np.ndarray:
    """Class fractions (N, C) of each tile's mask."""
    c = folder.num_classes
    rows = [np.bincount(folder.load_mask(r).ravel(), minlength=c)[:c] for r in records]
    counts = np.asarray(rows, dtype=np.float64).reshape(len(rows), c)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def inspect_synthetic(synthetic_dir: str | Path, real_dir: str | Path | None = None) -> dict[str, Any]:
    """Quality report of a synthetic dataset folder; also written to SYNTHETIC/inspect.json.

    Phase fractions (mean and spread over tiles) next to the real training tiles' (`real_dir`, default the
    dataset the prior was trained on); the fraction of mask pixels the clean-up changed (from raw_masks/);
    how many z-matrices are distinct and how many repeat a training z-matrix exactly.
    """
    from dualsynth.data import DatasetFolder

    synthetic_dir = Path(synthetic_dir)
    folder = DatasetFolder(synthetic_dir)
    records = folder.records(origin="synthetic") or folder.records()
    info = {}
    summary_path = synthetic_dir / SUMMARY_FILE
    if summary_path.is_file():
        info = json.loads(summary_path.read_text())
    if real_dir is None and info.get("data"):
        real_dir = info["data"]
    syn = tile_fractions(folder, records)
    report: dict[str, Any] = {"synthetic": str(synthetic_dir), "tiles": len(records), "classes": folder.class_names,
                              "synthetic_fractions": _spread(syn)}
    if real_dir is not None and Path(real_dir).is_dir():
        real = DatasetFolder(real_dir)
        if real.num_classes != folder.num_classes:
            raise InputError(real_dir, f"has {real.num_classes} classes, the synthetic set {folder.num_classes}")
        real_recs = real.records(split="train", origin="real") or real.records(split="train")
        report["real"] = str(real_dir)
        report["real_tiles"] = len(real_recs)
        report["real_fractions"] = _spread(tile_fractions(real, real_recs))
    changed = []
    for rec in records:
        raw_file = rec.extra.get("raw_mask")
        if raw_file:
            raw = raw_mask_classes(read_image(synthetic_dir / raw_file), folder.num_classes)
            changed.append(float(np.mean(raw != folder.load_mask(rec))))
    if changed:
        report["changed_by_cleanup"] = {"mean": float(np.mean(changed)), "max": float(np.max(changed))}
    codes_path = synthetic_dir / CODES_FILE
    if codes_path.is_file():
        with np.load(codes_path) as npz:
            codes = npz["codes"]
        report["z_matrices"] = len(codes)
        report["distinct_z_matrices"] = distinct_count(codes)
        copies = _training_copies(codes, info.get("prior"))
        if copies is not None:
            report["copies_of_training_z_matrices"] = copies
    write_json(synthetic_dir / "inspect.json", report)
    return report


def _spread(fractions: np.ndarray) -> dict[str, list[float]]:
    return {"mean": fractions.mean(axis=0).tolist(), "std": fractions.std(axis=0).tolist()}


def _training_copies(codes: np.ndarray, prior_dir: str | None) -> int | None:
    """How many sampled z-matrices equal a training z-matrix of the prior (memorisation check)."""
    if not prior_dir or not (Path(prior_dir) / CODES_FILE).is_file():
        return None
    with np.load(Path(prior_dir) / CODES_FILE) as npz:
        train = npz["train_codes"]
    if train.shape[1:] != codes.shape[1:]:
        return 0
    seen = {row.tobytes() for row in train.astype(np.int16)}
    return int(sum(row.tobytes() in seen for row in codes.astype(np.int16)))


def format_inspect(report: dict[str, Any]) -> str:
    """The inspect report as a table: per class, synthetic mean ± std next to real mean ± std."""
    names = report["classes"]
    width = max(8, *(len(n) for n in names))
    has_real = "real_fractions" in report
    header = f"{'class':<{width}}  {'synthetic':>15}" + (f"  {'real (train)':>15}" if has_real else "")
    lines = [f"phase fractions over {report['tiles']} synthetic tiles"
             + (f" and {report['real_tiles']} real training tiles" if has_real else "") + " (mean ± std):", header]
    for k, name in enumerate(names):
        s = report["synthetic_fractions"]
        line = f"{name:<{width}}  {s['mean'][k]:>7.3f} ± {s['std'][k]:<5.3f}"
        if has_real:
            r = report["real_fractions"]
            line += f"  {r['mean'][k]:>7.3f} ± {r['std'][k]:<5.3f}"
        lines.append(line)
    if "changed_by_cleanup" in report:
        c = report["changed_by_cleanup"]
        lines.append(f"mask pixels changed by the clean-up: {100 * c['mean']:.2f}% on average (max {100 * c['max']:.2f}%)")
    if "distinct_z_matrices" in report:
        lines.append(f"distinct z-matrices: {report['distinct_z_matrices']} of {report['z_matrices']}")
    if "copies_of_training_z_matrices" in report:
        lines.append(f"exact copies of training z-matrices: {report['copies_of_training_z_matrices']}")
    return "\n".join(lines)
