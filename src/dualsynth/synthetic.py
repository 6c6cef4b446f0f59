"""Synthetic sets: sampling new micrograph + mask pairs into a dataset folder, and inspecting them.

`sample_dataset` (the `sample` command): z-matrices from a trained prior (`dualsynth.sampling.sample_fast`)
-> the VQ-VAE decoder -> micrograph and mask split -> mask clean-up (`dualsynth.postprocess.clean_mask`) -> a
dataset folder with raw masks, codes.npz, grid.png (paper Figs. 10-11) and sample.json. On a CPU the z-matrices
are sampled by several processes side by side (sample i depends on (seed, i) only, so the split does not
change the result). `inspect_synthetic` (the `inspect` command): phase fractions against the real training
set, pixels changed by the clean-up, distinct z-matrices and copies of training z-matrices.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dualsynth.engine import iteration_seed
from dualsynth.errors import InputError
from dualsynth.runs import RunFolder
from dualsynth.io import atomic_path, progress_bar, read_image, save_figure, save_png, write_json
from dualsynth.models.renderer import load_renderer, render
from dualsynth.postprocess import clean_mask
from dualsynth.sampling import draw_noise, sample_fast
from dualsynth.texture import TEXTURE_FILE, add_texture, texture_rng


CODES_FILE = "codes.npz"
SUMMARY_FILE = "sample.json"
GRID_FILE = "grid.png"
RAW_MASKS = "raw_masks"
FIDELITY_DIR = "fidelity"


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
    return torch.Generator().manual_seed(iteration_seed(seed, index))


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


def sample_codes(prior_dir: str | Path, indices: Sequence[int], shape: Sequence[int], seed: int, temperature: float,
                 fractions: np.ndarray | None, device: str = "cpu", threads: int | None = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z-matrices (and conditioning vectors) of the samples `indices`: sample i depends on (seed, i) only, so
    any split of the indices over processes or batches gives the same samples."""
    from dualsynth.config import resolve_device
    from dualsynth.training.prior import load_prior

    dev = resolve_device(device)
    trained = load_prior(prior_dir, dev)
    bank = trained.cond_bank if trained.condition == "phase-fractions" else None
    noise = torch.cat([draw_noise(1, shape, sample_generator(seed, i)) for i in indices])
    conds = [conditioning_for(i, seed, fractions, bank) for i in indices]
    cond = None if conds[0] is None else torch.as_tensor(np.stack(conds), dtype=torch.float32)
    codes = sample_fast(trained.model, len(indices), tuple(shape), temperature, cond=cond, noise=noise, threads=threads)
    return codes.cpu(), cond


def _sample_chunk(args: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    return sample_codes(*args)


def sample_workers(device: Any, n_batches: int) -> int:
    """Processes that sample side by side: one per usable free core on a CPU (each with one thread, since the
    work per position is too small to split across threads), one on a GPU."""
    from dualsynth.config import auto_threads

    if getattr(device, "type", str(device)) != "cpu":
        return 1
    return max(1, min(auto_threads(), n_batches))


def sample_dataset(
    prior_dir: str | Path,
    out_dir: str | Path,
    n: int,
    *,
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
    workers: int | None = None,
    renderer: str | Path | None = None,
    texture: str | Path | None = None,
    texture_pool: int | None = None,
    replace_high_band: bool = True,
) -> dict[str, Any]:
    """Sample `n` z-matrices from a trained prior, decode them with its VQ-VAE and write a dataset folder.

    Each decoded mask is cleaned up by `dualsynth.postprocess.clean_mask` (k-means to the class levels, small
    objects filled from their neighbours). The folder has the `prepare` format (origin=synthetic, split=train),
    with the raw decoded masks in raw_masks/ (manifest column `raw_mask`), the z-matrices in codes.npz, the
    pairs of the first samples in grid.png (paper Figs. 10-11) and a summary in sample.json.
    `phase_fractions` ("f0,f1,...") needs a prior trained with phase-fraction conditioning. Sample i depends on
    (`seed`, i) only, not on `batch_size` or `workers` (processes sampling side by side on a CPU; None: one per
    free core). `renderer` (a `train-renderer` run): the clean masks are rendered into micrographs by it
    (`dualsynth.models.renderer.render`, noise from (`seed`, i)) instead of taking the VQ-VAE's micrograph channels.
    `texture` (a real dataset folder): the texture stage (`dualsynth.texture`) is fitted on its train split (saved
    as OUT/texture.npz + .json; lowpass pool `texture_pool`, default the VQ-VAE's downsampling) and added to every micrograph, noise from (`seed`, i) (`texture_rng`).
    """
    from dualsynth.config import resolve_device
    from dualsynth.data import DatasetFolder, DatasetWriter, default_classes, split_joint
    from dualsynth.models.vqvae import decode, load_vqvae
    from dualsynth.training.prior import load_prior

    if n < 1:
        raise InputError("--n", "must be at least 1")
    if batch_size < 1:
        raise InputError("--batch", "must be at least 1")
    if temperature < 0:
        raise InputError("--temperature", "must be >= 0")
    dev = resolve_device(device)
    trained = load_prior(prior_dir, dev)
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
    c_img = vc.image_channels
    rend = None if renderer is None else load_checked_renderer(renderer, vc.num_classes, [s * vc.downsample for s in shape], dev,
                                                                 c_img)
    tex = None if texture is None else fit_checked_texture(texture, vc.num_classes, c_img,
                                                                    texture_pool or vc.downsample)
    batches = [list(range(start, min(n, start + batch_size))) for start in range(0, n, batch_size)]
    workers = sample_workers(dev, len(batches)) if workers is None else max(1, int(workers))
    jobs = [(str(prior_dir), idx, shape, seed, temperature, fractions, str(dev), 1 if dev.type == "cpu" else None)
            for idx in batches]

    all_codes, all_cond, names, changed, grid = [], [], [], [], []
    t0 = time.perf_counter()
    with DatasetWriter(out_dir, classes, overwrite=overwrite) as writer, _pool(workers) as pool:
        bar = progress_bar(enabled=progress, total=n, desc="sample", unit="pair")
        # imap: results in job order, each as soon as it and those before it are done
        results = pool.imap(_sample_chunk, jobs) if pool is not None else map(_sample_chunk, jobs)
        for index, (codes, cond) in zip(batches, results):
            joints = decode(vqvae, codes)
            for i, z, joint in zip(index, codes, joints):
                image = np.moveaxis(joint[:c_img].clamp(0, 1).numpy(), 0, -1)
                decoded_mask = joint[c_img:]
                clean = np.asarray(clean_mask(decoded_mask[0] if vc.mask_encoding == "levels" else decoded_mask,
                                              vc.num_classes, vc.mask_encoding, min_object_area))
                if rend is not None:
                    image = render(rend, clean, seed, indices=[i], guides=image if rend.config.guide_channels else None)[0]
                if tex is not None:
                    image = add_texture(image, clean, tex, texture_rng(seed, i), replace_high_band)
                raw_png = raw_mask_png(decoded_mask, vc.num_classes, vc.mask_encoding)
                _, raw_classes = split_joint(joint, vc.num_classes, vc.mask_encoding)
                changed.append(float(np.mean(np.asarray(raw_classes) != clean)))
                rec = writer.add(f"synthetic-{i:05d}", image, clean, split="train", source=Path(prior_dir).name,
                                 origin="synthetic")
                save_png(writer.tmp / RAW_MASKS / rec.file, raw_png)
                rec.extra["raw_mask"] = f"{RAW_MASKS}/{rec.file}"
                names.append(rec.file)
                if len(grid) < grid_pairs:
                    grid.append((image, raw_png, clean))
            all_codes.append(codes)
            if cond is not None:
                all_cond.append(cond)
            bar.update(len(index))
        bar.close()
        seconds = time.perf_counter() - t0
        codes_np = torch.cat(all_codes).numpy().astype(np.int16)
        cond_np = torch.cat(all_cond).numpy() if all_cond else np.zeros((0, 0), dtype=np.float32)
        with atomic_path(writer.tmp / CODES_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, codes=codes_np, cond=cond_np, files=np.asarray(names, dtype=str))
        draw_pairs(writer.tmp / GRID_FILE, grid, classes)
        summary = {
            "prior": str(Path(prior_dir).resolve()),
            "prior_step": trained.step,
            "prior_bits_per_code": trained.bits_per_code,
            "arch": trained.model.config.arch,
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
            "workers": workers,
            "device": str(dev),
            "renderer": None if renderer is None else str(Path(renderer).resolve()),
            "texture": None if tex is None else {"real": str(Path(texture).resolve()), "pool": tex.pool,
                                                  "replace_high_band": replace_high_band, "file": TEXTURE_FILE},
        }
        if tex is not None:
            tex.save(writer.tmp / TEXTURE_FILE)
        write_json(writer.tmp / SUMMARY_FILE, summary)
    return summary


def check_real_fits(prior_dir: str | Path, real: str | Path) -> None:
    """Refuse a real dataset folder whose classes or image channels differ from what the prior's generator makes
    (`sample --real` checks this before sampling, so a wrong folder costs nothing)."""
    from dualsynth.models.vqvae import load_vqvae
    from dualsynth.training.prior import load_prior

    vc = load_vqvae(load_prior(prior_dir, "cpu").vqvae_dir, "cpu").config
    open_fitting_real(real, vc.num_classes, vc.image_channels, "the generator makes")


def open_fitting_real(real: str | Path, num_classes: int, image_channels: int, what: str):
    """The real dataset folder ``real``, or an InputError naming it when it is missing or its classes or image
    channels are not ``num_classes`` and ``image_channels`` (``what``: whose they are, for the message)."""
    from dualsynth.data import DatasetFolder

    if not Path(real).is_dir():
        raise InputError(real, "real dataset folder does not exist")
    folder = DatasetFolder(real)
    if (folder.num_classes, folder.image_channels) != (num_classes, image_channels):
        raise InputError(real, f"has {folder.num_classes} classes and {folder.image_channels} image channel(s); "
                         f"{what} {num_classes} and {image_channels}")
    return folder


def record_fidelity(out_dir: str | Path, real: str | Path, report: dict[str, Any]) -> dict[str, Any]:
    """Add the headline numbers of a fidelity report of the set in `out_dir` to its sample.json; return them."""
    path = Path(out_dir) / SUMMARY_FILE
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary["fidelity"] = {"real": str(real), **report["headline"]}
    write_json(path, summary)
    return summary["fidelity"]


@contextlib.contextmanager
def _pool(workers: int):
    """A pool of `workers` processes (`dualsynth.config.worker_context`; None for one: the work runs here)."""
    if workers <= 1:
        yield None
        return
    from dualsynth.config import worker_context, worker_initializer

    initializer, initargs = worker_initializer()
    with worker_context(["dualsynth.synthetic"]).Pool(workers, initializer=initializer, initargs=initargs) as pool:
        yield pool


def distinct_count(codes: np.ndarray) -> int:
    """Number of different z-matrices among (N, h, w)."""
    if len(codes) == 0:
        return 0
    return int(np.unique(codes.reshape(len(codes), -1), axis=0).shape[0])


def draw_pairs(path: Path, pairs: list, classes) -> None:
    """Paper Figs. 10-11: per row a synthetic micrograph, its raw decoded mask and the cleaned mask."""
    from dualsynth.data import colorize_mask

    rows = [(image, raw[..., None] / 65535.0, colorize_mask(clean, classes)) for image, raw, clean in pairs]
    draw_rows(path, rows, ("synthetic micrograph", "raw decoded mask", "clean mask"))


def draw_rows(path: Path, rows: list, titles: Sequence[str]) -> None:
    """A grid of panels, one row per item: float images (H, W, C) in [0, 1] in grey or colour, or uint8 RGB."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(titles), figsize=(2.5 * len(titles), 2.5 * len(rows)), squeeze=False)
    for row, panels in zip(axes, rows):
        for ax, panel in zip(row, panels):
            panel = np.asarray(panel)
            if panel.dtype == np.uint8:
                ax.imshow(panel)
            else:
                ax.imshow(panel[..., 0] if panel.shape[-1] == 1 else panel, cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
    for ax, title in zip(axes[0], titles):
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


# --- the renderer: micrographs drawn for masks (the two-stage generator) -------------------------------------

RENDER_SUMMARY = "render.json"


def load_checked_renderer(renderer_dir: str | Path, num_classes: int, tile_shape: Sequence[int] | None, device: Any,
                          guide_channels: int | None = None):
    """The renderer of a `train-renderer` run, checked against the masks it is to draw for: the same number of
    classes, (when known) tile sides that are multiples of its 2**depth and, for a renderer with a guide, guide
    micrographs of `guide_channels` channels (its image channels); InputError naming the run otherwise."""
    rend = load_renderer(renderer_dir, device)
    rc = rend.config
    if rc.num_classes != num_classes:
        raise InputError(renderer_dir, f"renderer was trained on {rc.num_classes} classes, the masks have {num_classes}")
    if rc.guide_channels and guide_channels != rc.image_channels:
        raise InputError(renderer_dir, f"renderer with guide: {rc.guide} refines {rc.image_channels}-channel "
                         f"micrographs, the guides have {guide_channels}")
    if tile_shape is not None and any(int(s) % rc.multiple for s in tile_shape):
        raise InputError(renderer_dir, f"tiles of {'x'.join(map(str, tile_shape))} px are not multiples of the "
                         f"renderer's 2**depth = {rc.multiple}")
    return rend


def render_dataset(
    renderer_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    split: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    grid_pairs: int = 8,
) -> dict[str, Any]:
    """Re-render the micrographs of a dataset folder's masks with a trained renderer into a new dataset folder.

    Every tile of `split` (all tiles if None) keeps its mask, name, split, source and position; its micrograph
    is drawn by the renderer with noise from (`seed`, tile number), and its origin becomes `synthetic`. A renderer
    with a guide (`model.guide: lowpass`) refines the folder's own micrographs (a plain `sample`, or real tiles). Masks
    whose sides are not multiples of the renderer's 2**depth are cropped at the bottom and right (the manifest
    says so in the column `cropped`, 0 or 1). Writes OUT/grid.png (real micrograph, mask, rendered micrograph) and
    OUT/render.json.
    """
    from dualsynth.config import resolve_device
    from dualsynth.data import DatasetFolder, DatasetWriter, colorize_mask

    dev = resolve_device(device)
    folder = DatasetFolder(data_dir)
    rend = load_checked_renderer(renderer_dir, folder.num_classes, None, dev, folder.image_channels)
    records = folder.records(split=split)
    if not records:
        raise InputError(data_dir, f"dataset has no '{split}' tiles")
    m = rend.config.multiple
    cropped = 0
    grid = []
    t0 = time.perf_counter()
    with DatasetWriter(out_dir, folder.classes, overwrite=overwrite) as writer:
        bar = progress_bar(enabled=progress, total=len(records), desc="render", unit="tile")
        for n, rec in enumerate(records):
            mask = folder.load_mask(rec)
            h, w = mask.shape[0] // m * m, mask.shape[1] // m * m
            if h == 0 or w == 0:
                raise InputError(folder.mask_path(rec), f"mask is smaller than the renderer's 2**depth = {m} px")
            was_cropped = (h, w) != mask.shape
            cropped += was_cropped
            mask = mask[:h, :w]
            guide = folder.load_image(rec)[:h, :w] if rend.config.guide_channels else None
            image = render(rend, mask, seed, indices=[n], guides=guide)[0]
            writer.add(Path(rec.file).stem, image, mask, split=rec.split, source=rec.source, tile_y=rec.tile_y,
                       tile_x=rec.tile_x, origin="synthetic", quality=rec.quality, extra={"cropped": int(was_cropped)})
            if len(grid) < grid_pairs:
                grid.append((folder.load_image(rec)[:h, :w], image, colorize_mask(mask, folder.classes)))
            bar.update(1)
        bar.close()
        draw_rows(writer.tmp / GRID_FILE, grid, ("real micrograph", "rendered micrograph", "mask"))
        summary = {
            "renderer": str(Path(renderer_dir).resolve()),
            "data": str(Path(data_dir).resolve()),
            "split": split,
            "tiles": len(records),
            "cropped_tiles": int(cropped),
            "seed": seed,
            "image_channels": rend.config.image_channels,
            "seconds": time.perf_counter() - t0,
            "device": str(dev),
        }
        write_json(writer.tmp / RENDER_SUMMARY, summary)
    return summary


# --- the texture stage: fitted fine texture added to a dataset's micrographs ---------------------------------

TEXTURE_RUN_SUMMARY = "texture_run.json"


def texture_source(prior_dir: str | Path, texture: str | Path | None) -> Path | None:
    """The real dataset `sample --texture` fits on: ``auto`` is the one the prior's VQ-VAE was trained on (an
    error when it is gone: the texture would silently be missing), ``none`` (or None) none, else the path."""
    if texture is None or str(texture) == "none":
        return None
    if str(texture) != "auto":
        return Path(texture)
    config = RunFolder.open(prior_dir).config
    data = config.get("data")
    if not data:
        raise InputError(prior_dir, "--texture auto: the prior names no training dataset (trained from --codes); "
                                    "give --texture PATH or --texture none")
    if not Path(data).is_dir():
        raise InputError(data, "--texture auto: the VQ-VAE's training dataset is not there any more; "
                               "give --texture PATH (the real dataset) or --texture none")
    return Path(data)


def fit_checked_texture(real: str | Path, num_classes: int, image_channels: int, pool: int = 4):
    """`dualsynth.texture.fit_texture` on the train split of ``real``, after checking that the folder exists and
    has ``num_classes`` classes and ``image_channels`` channels (InputError naming it otherwise)."""
    from dualsynth.texture import fit_texture

    folder = open_fitting_real(real, num_classes, image_channels, "the synthetic micrographs have")
    return fit_texture(folder, "train", pool)


def texture_dataset(real: str | Path, data: str | Path, out: str | Path, *, seed: int = 0, pool: int = 4,
                    replace_high_band: bool = True, split: str | None = None, overwrite: bool = False,
                    progress: bool = True, grid_pairs: int = 8) -> dict[str, Any]:
    """Fit the texture (`dualsynth.texture`) on ``real``'s train split and write ``out``: every tile of ``data``
    (of ``split``; None: all) keeps its mask, name, split, source, position and origin; its micrograph gets
    texture with noise from (``seed``, tile number). Writes OUT/texture.npz + OUT/texture.json (the model),
    OUT/grid.png (micrograph, textured micrograph, mask) and OUT/texture_run.json."""
    from dualsynth.data import DatasetFolder, DatasetWriter, colorize_mask
    if not Path(data).is_dir():
        raise InputError(data, "dataset folder does not exist")
    folder = DatasetFolder(data)
    records = folder.records(split=split)
    if not records:
        raise InputError(data, f"dataset has no '{split}' tiles")
    t0 = time.perf_counter()
    model = fit_checked_texture(real, folder.num_classes, folder.image_channels, pool)
    grid = []
    with DatasetWriter(out, folder.classes, overwrite=overwrite) as writer:
        bar = progress_bar(enabled=progress, total=len(records), desc="texture", unit="tile")
        for n, rec in enumerate(records):
            before, mask = folder.load_image(rec), folder.load_mask(rec)
            image = add_texture(before, mask, model, texture_rng(seed, n), replace_high_band)
            extra = {k: v for k, v in rec.extra.items() if k != "raw_mask"}  # raw_masks/ is not copied
            writer.add(Path(rec.file).stem, image, mask, split=rec.split, source=rec.source, tile_y=rec.tile_y,
                       tile_x=rec.tile_x, origin=rec.origin, quality=rec.quality, extra=extra)
            if len(grid) < grid_pairs:
                grid.append((before, image, colorize_mask(mask, folder.classes)))
            bar.update(1)
        bar.close()
        model.save(writer.tmp / TEXTURE_FILE)
        draw_rows(writer.tmp / GRID_FILE, grid, ("micrograph", "textured micrograph", "mask"))
        summary = {"real": str(Path(real).resolve()), "data": str(Path(data).resolve()), "split": split,
                   "tiles": len(records), "seed": seed, "pool": pool, "replace_high_band": replace_high_band,
                   "class_std": {nm: model.class_std[k].tolist() for k, nm in enumerate(model.class_names)},
                   "seconds": time.perf_counter() - t0}
        write_json(writer.tmp / TEXTURE_RUN_SUMMARY, summary)
    return summary
