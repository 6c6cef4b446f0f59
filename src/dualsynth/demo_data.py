"""Procedural multi-phase microstructures: the data the tests and the demo use instead of real micrographs.

A sample imitates the paper's Fe14Nd2B bright-field patches (Section 3.1, Figure 3) closely enough for the
pipeline to have something real-looking to learn: a grainy matrix and three dispersed phases of low contrast,
in the class proportions of the paper's Table 2, with blurred boundaries, noise and uneven illumination. Each
sample comes with its exact mask and a degraded one that makes the mistakes the paper's low-quality (LQ)
labels make: wrong object boundaries, over-segmentation, and whole objects given the wrong phase.

Feature sizes are relative to the tile, so a 64 px tile looks like a 256 px tile zoomed out and still shows
every phase; this keeps the tests and the CPU demo small.

:func:`generate_microstructure` is the pure generator; :func:`write_demo_dataset` writes two dataset folders
(``hq`` and ``lq``) with :class:`dualsynth.data.DatasetWriter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from dualsynth.errors import InputError

CLASS_NAMES: tuple[str, ...] = ("matrix", "oxide", "nd_rich", "eta")
# display colours, one clearly different hue per phase (the paper's grey levels are hard to tell apart)
CLASS_COLORS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (220, 60, 50), (70, 200, 70), (50, 100, 230))
# the paper's Table 2 (test dataset class proportions), in CLASS_NAMES order
TABLE2_FRACTIONS: tuple[float, ...] = (0.788, 0.080, 0.056, 0.076)

MATRIX, OXIDE, ND_RICH, ETA = range(4)

# A minor phase is missing from this share of tiles, so some tiles lack a class (what Missing Class IoU is for).
_P_ABSENT = 0.08
# Per-tile spread of a minor phase's fraction (sigma of a mean-one log-normal factor).
_FRACTION_SPREAD = 0.3
# Mean grey level of each phase: close together (the paper's "low contrast with each other").
_GREY = np.array([0.52, 0.64, 0.70, 0.44], dtype=np.float32)
# Per-phase RGB tint (multiplies the grey level) for rgb=True; near-neutral, like a bright-field micrograph.
_TINT = np.array(
    [[1.00, 0.96, 0.88], [0.94, 0.97, 1.04], [1.02, 1.00, 0.94], [0.97, 0.93, 0.98]], dtype=np.float32
)


@dataclass(frozen=True)
class DemoSample:
    """One procedural micrograph with its exact (HQ) and degraded (LQ) mask.

    ``image``: float32 ``(H, W)`` or ``(H, W, 3)`` in [0, 1]; ``mask`` and ``mask_lq``: uint8 ``(H, W)`` class
    indices in :data:`CLASS_NAMES` order.
    """

    image: np.ndarray
    mask: np.ndarray
    mask_lq: np.ndarray


def generate_microstructure(size: int, rng: np.random.Generator, rgb: bool = False) -> DemoSample:
    """Draw one ``size`` x ``size`` multi-phase microstructure from ``rng``.

    Class fractions vary per tile around the paper's Table 2 (matrix ~79 %, oxide 8 %, Nd-rich 5.6 %,
    eta 7.6 %); a minor phase is absent from about one tile in twelve. The same ``rng`` state gives the same
    sample.
    """
    if size < 16:
        raise InputError("--size", f"tile size must be at least 16 px, got {size}")
    grains = _voronoi(size, n_cells=int(rng.integers(14, 24)), rng=rng, k=3)
    targets = _tile_fractions(rng)
    mask = _paint_phases(size, grains, targets, rng)
    image = _render(mask, grains, rng, rgb)
    mask_lq = degrade_mask(mask, rng)
    return DemoSample(image=image, mask=mask, mask_lq=mask_lq)


# --- geometry ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Voronoi:
    label: np.ndarray  # (H, W) int: nearest seed
    dist: np.ndarray  # (H, W, k) distances to the k nearest seeds, ascending


def _voronoi(size: int, n_cells: int, rng: np.random.Generator, k: int) -> _Voronoi:
    """Voronoi tessellation of the tile; seeds also fall outside it so edge cells are not artificially big."""
    margin = 0.15 * size
    seeds = rng.uniform(-margin, size + margin, size=(int(n_cells * (1 + 2 * 0.15) ** 2), 2))
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
    dist, idx = cKDTree(seeds).query(pixels, k=list(range(1, k + 1)))  # list: always (N, k)
    return _Voronoi(label=idx[:, 0].reshape(size, size), dist=dist.reshape(size, size, k).astype(np.float32))


def _smooth_noise(size: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-variance noise with features about ``scale`` px across (drawn coarse, then upsampled)."""
    coarse = max(2, int(np.ceil(size / scale)) + 3)
    field = ndimage.zoom(rng.standard_normal((coarse, coarse)), size / (coarse - 3), order=3)
    offset = (field.shape[0] - size) // 2
    field = field[offset : offset + size, offset : offset + size]
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def _tile_fractions(rng: np.random.Generator) -> np.ndarray:
    """Target fraction of each minor phase in this tile: Table 2 on average, varying from tile to tile."""
    base = np.asarray(TABLE2_FRACTIONS[1:])
    factor = np.exp(rng.normal(-0.5 * _FRACTION_SPREAD**2, _FRACTION_SPREAD, size=base.shape))
    present = rng.random(base.shape) >= _P_ABSENT
    # dividing by the presence rate keeps the dataset mean at Table 2 although some tiles lack the phase
    return np.where(present, base * factor / (1 - _P_ABSENT), 0.0)


def _take_lowest(score: np.ndarray, free: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of all pixels with the lowest ``score`` among the ``free`` ones."""
    count = int(round(fraction * score.size))
    count = min(count, int(free.sum()))
    if count <= 0:
        return np.zeros(score.shape, dtype=bool)
    masked = np.where(free, score, np.inf).ravel()
    chosen = np.zeros(score.size, dtype=bool)
    chosen[np.argpartition(masked, count - 1)[:count]] = True
    return chosen.reshape(score.shape)


def _paint_phases(size: int, grains: _Voronoi, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class-index mask: blocky eta, Nd-rich along grain boundaries and triple junctions, round oxide."""
    mask = np.zeros((size, size), dtype=np.uint8)

    # eta: whole cells of a finer tessellation, so the blocks are angular polygons
    if targets[ETA - 1] > 0:
        cells = _voronoi(size, n_cells=int(rng.integers(50, 90)), rng=rng, k=1)
        # a one-pixel gap between neighbouring blocks keeps them separate objects, as in real eta grains
        gap = ndimage.grey_dilation(cells.label, size=3) != ndimage.grey_erosion(cells.label, size=3)
        areas = np.bincount(cells.label[~gap], minlength=cells.label.max() + 1)
        order = rng.permutation(np.flatnonzero(areas))
        taken = order[: int(np.searchsorted(np.cumsum(areas[order]), targets[ETA - 1] * size * size)) + 1]
        mask[np.isin(cells.label, taken) & ~gap] = ETA

    # Nd-rich: grain-boundary films thickening into triple-junction pockets, broken up by smooth noise
    if targets[ND_RICH - 1] > 0:
        d = grains.dist
        boundary = (d[..., 1] - d[..., 0]) + 0.5 * (d[..., 2] - d[..., 0])
        score = boundary / size - 0.04 * _smooth_noise(size, size / 6, rng)
        mask[_take_lowest(score, mask == MATRIX, targets[ND_RICH - 1])] = ND_RICH

    # oxide: roundish particles of different sizes with slightly rough outlines
    if targets[OXIDE - 1] > 0:
        n = int(rng.integers(5, 12))
        centres = rng.uniform(0, size, size=(n, 2))
        radii = rng.uniform(0.6, 1.4, size=n)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        rel = np.hypot(yy[..., None] - centres[:, 0], xx[..., None] - centres[:, 1]) / radii
        score = rel.min(axis=-1) / size + 0.006 * _smooth_noise(size, size / 24, rng)
        mask[_take_lowest(score, mask == MATRIX, targets[OXIDE - 1])] = OXIDE
    return mask


# --- rendering --------------------------------------------------------------------------------------------


def _render(mask: np.ndarray, grains: _Voronoi, rng: np.random.Generator, rgb: bool) -> np.ndarray:
    """Micrograph for ``mask``: grain shading and boundaries, per-object grey jitter, blur, light, noise."""
    size = mask.shape[0]
    grey = _GREY[mask].copy()

    # matrix grains differ a little in grey level and meet at thin dark boundaries
    grain_shift = rng.normal(0.0, 0.025, size=grains.label.max() + 1).astype(np.float32)
    matrix = mask == MATRIX
    grey[matrix] += grain_shift[grains.label[matrix]]
    width = max(0.6, size / 256.0)
    grain_boundary = np.clip(1.0 - (grains.dist[..., 1] - grains.dist[..., 0]) / (2 * width), 0.0, 1.0)
    grey -= 0.10 * grain_boundary * matrix

    # each dispersed object has its own shade, and a faint texture inside
    objects, count = ndimage.label(mask != MATRIX)
    grey += np.concatenate([[0.0], rng.normal(0.0, 0.02, size=count)]).astype(np.float32)[objects]
    grey += 0.015 * _smooth_noise(size, size / 40, rng)

    if rgb:
        image = grey[..., None] * _TINT[mask]
    else:
        image = grey[..., None]

    image = ndimage.gaussian_filter(image, sigma=(max(0.7, 1.2 * size / 256.0),) * 2 + (0,))

    # uneven illumination: a gentle linear gradient in a random direction
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0.0, 0.12)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    image *= (1.0 + strength * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]

    # shot noise (photon counting) then read-out noise
    photons = 600.0
    image = rng.poisson(np.clip(image, 0, None) * photons).astype(np.float32) / photons
    image += rng.normal(0.0, 0.02, size=image.shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return image if rgb else image[..., 0]


# --- degraded (LQ) masks ----------------------------------------------------------------------------------


def degrade_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A low-quality copy of ``mask`` with the paper's LQ label errors (Section 3.1).

    Each object's boundary moves out or in by 1-2 px, a few spurious blobs of a phase appear in the matrix
    (over-segmentation, mostly near object edges), and about one object in twelve gets another phase's label.
    """
    size = mask.shape[0]
    scale = max(1, int(round(size / 128)))  # errors of 1-2 px at 128 px, proportionally more on bigger tiles
    out = mask.copy()
    for cls in range(1, len(CLASS_NAMES)):
        objects, count = ndimage.label(mask == cls)
        if count == 0:
            continue
        # per object: -2..+2 px of erosion (negative) or dilation (positive), 0 left as it is
        move = rng.choice(np.array([-2, -1, 0, 1, 2]) * scale, size=count + 1, p=[0.07, 0.23, 0.4, 0.23, 0.07])
        # nearest object for every pixel, so dilation knows whose boundary it is growing
        _, (iy, ix) = ndimage.distance_transform_edt(objects == 0, return_indices=True)
        owner_move = move[objects[iy, ix]]
        inside_depth = ndimage.distance_transform_edt(objects > 0)
        outside_depth = ndimage.distance_transform_edt(objects == 0)
        grow = (objects == 0) & (outside_depth <= owner_move) & (out == MATRIX)
        shrink = (objects > 0) & (inside_depth <= -owner_move)
        out[grow] = cls
        out[shrink] = MATRIX

    # over-segmentation: small blobs of a minor phase where the matrix meets an object or has a dark spot
    near_edge = ndimage.binary_dilation(mask != MATRIX, iterations=3 * scale) & (mask == MATRIX)
    noise = _smooth_noise(size, max(2.0, size / 40), rng)
    spurious = (noise > 2.9) | ((noise > 2.0) & near_edge)
    spurious &= out == MATRIX
    blobs, count = ndimage.label(spurious)
    if count:
        phase = rng.integers(1, len(CLASS_NAMES), size=count + 1).astype(np.uint8)
        out[spurious] = phase[blobs[spurious]]

    # mislabelled objects: a whole blob given another minor phase's label
    objects, count = ndimage.label(out != MATRIX)
    if count:
        flip = rng.random(count + 1) < 0.08
        flip[0] = False
        shift = rng.integers(1, len(CLASS_NAMES) - 1, size=count + 1)
        target = flip[objects]
        # cycling within 1..C-1 by a nonzero shift always picks a different minor phase
        out[target] = ((out[target] - 1 + shift[objects[target]]) % (len(CLASS_NAMES) - 1) + 1).astype(np.uint8)
    return out


# --- dataset folders --------------------------------------------------------------------------------------


def demo_classes():
    """The demo's classes (:class:`dualsynth.data.ClassInfo`) in class-index order."""
    from dualsynth.data import ClassInfo

    return [ClassInfo(name, color) for name, color in zip(CLASS_NAMES, CLASS_COLORS)]


def write_demo_dataset(out: Path, n: int, size: int, seed: int, overwrite: bool = False,
                       val_fraction: float = 0.2, test_fraction: float = 0.2, rgb: bool = True) -> dict:
    """Write ``n`` procedural micrographs as two dataset folders, ``out/hq`` and ``out/lq``.

    Both folders hold the same images and the same train/val/test split (by image, drawn from ``seed``).
    ``hq`` has the exact masks (quality ``HQ``); ``lq`` has degraded masks (quality ``LQ``) in train and val
    but the exact masks (quality ``HQ``) in test, because the paper scores every model on HQ test masks only.
    ``rgb``: RGB micrographs like the paper's (grey if False). The same arguments give byte-identical files;
    sample ``i`` depends only on ``seed`` and ``i``, not on ``n``. Returns a summary (paths, split sizes,
    class fractions, share of train/val pixels whose LQ label is wrong).
    """
    from dualsynth.data import DatasetWriter, assign_splits

    out = Path(out)
    if n < 1:
        raise InputError("--n", f"needs at least 1 image, got {n}")
    if size < 16:
        raise InputError("--size", f"tile size must be at least 16 px, got {size}")
    names = [f"demo_{i:0{max(4, len(str(n - 1)))}d}" for i in range(n)]
    splits = assign_splits(names, val_fraction, test_fraction, seed)
    classes = demo_classes()
    num_classes = len(classes)
    counts_hq = np.zeros(num_classes, dtype=np.int64)
    counts_lq = np.zeros(num_classes, dtype=np.int64)
    wrong = labelled = 0
    # both writers open before anything is drawn: a refused folder fails fast, and an error rolls back both
    with DatasetWriter(out / "hq", classes, overwrite=overwrite) as hq, \
            DatasetWriter(out / "lq", classes, overwrite=overwrite) as lq:
        for i, name in enumerate(names):
            # the i-th child of the seed's SeedSequence: the same sample whatever n is
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
            sample = generate_microstructure(size, rng, rgb=rgb)
            split = splits[name]
            exact_test = split == "test"
            mask_lq = sample.mask if exact_test else sample.mask_lq
            hq.add(name, sample.image, sample.mask, split, source=name, quality="HQ")
            lq.add(name, sample.image, mask_lq, split, source=name, quality="HQ" if exact_test else "LQ")
            counts_hq += np.bincount(sample.mask.ravel(), minlength=num_classes)
            counts_lq += np.bincount(mask_lq.ravel(), minlength=num_classes)
            if not exact_test:
                wrong += int((sample.mask_lq != sample.mask).sum())
                labelled += sample.mask.size
    return {
        "hq": str(out / "hq"),
        "lq": str(out / "lq"),
        "n": n,
        "size": size,
        "seed": seed,
        "rgb": rgb,
        "splits": {s: sum(v == s for v in splits.values()) for s in ("train", "val", "test")},
        "class_fractions_hq": {c.name: float(f) for c, f in zip(classes, counts_hq / counts_hq.sum())},
        "class_fractions_lq": {c.name: float(f) for c, f in zip(classes, counts_lq / counts_lq.sum())},
        "lq_wrong_pixel_fraction": wrong / labelled if labelled else 0.0,
    }
