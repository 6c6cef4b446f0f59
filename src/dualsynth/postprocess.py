"""Mask clean-up for decoded synthetic masks (paper §4.2, Figure 11).

A decoded mask is not an index map: at boundaries the VQ-VAE decoder produces values between the class levels.
The paper groups the pixels with k-means (one cluster per class), then removes objects smaller than 200 px²
(256 px tiles) and fills them with the neighbouring class. Here:

1. `levels_to_classes`: k-means on the mask channel, each cluster mapped to the class whose level `k/(C-1)` is
   nearest to the cluster centre (cluster order from k-means is arbitrary, so it is never used);
   for `onehot` masks the argmax over the class channels replaces k-means.
2. `remove_small_objects`: every connected component smaller than `min_object_area` takes the majority class
   of the pixels bordering it; a component that borders nothing (the whole tile) keeps its class.

`clean_mask` chains the two.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = [
    "PAPER_MIN_OBJECT_AREA",
    "PAPER_TILE_SIZE",
    "default_min_object_area",
    "nearest_level_classes",
    "levels_to_classes",
    "remove_small_objects",
    "clean_mask",
    "changed_fraction",
]

PAPER_MIN_OBJECT_AREA = 200  # px², objects below this were removed in the paper...
PAPER_TILE_SIZE = 256  # ...whose tiles were 256 x 256 px
KMEANS_MAX_POINTS = 4096  # k-means on more distinct values than this fits a histogram of the values instead


def default_min_object_area(tile_h: int, tile_w: int) -> int:
    """The paper's 200 px² for 256 x 256 tiles, scaled with the tile area.

    Rounded up, so that "area < result" is the same test as "area < 200 * scale" for integer areas
    (64 x 64 tiles: 12.5 -> 13, i.e. objects of up to 12 px are removed).
    """
    if tile_h < 1 or tile_w < 1:
        raise ValueError(f"tile size must be positive, got {tile_h} x {tile_w}")
    return max(1, math.ceil(PAPER_MIN_OBJECT_AREA * tile_h * tile_w / PAPER_TILE_SIZE**2))


def _index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int32)


def nearest_level_classes(levels: Any, num_classes: int) -> np.ndarray:
    """Class index of the nearest level `k/(C-1)` for every value (the `levels` encoding read directly)."""
    v = np.asarray(levels, dtype=np.float64)
    if num_classes == 1:
        return np.zeros(v.shape, dtype=_index_dtype(num_classes))
    k = np.rint(np.clip(v, 0.0, 1.0) * (num_classes - 1))
    return k.astype(_index_dtype(num_classes))


def _as_float_channel(decoded: Any) -> np.ndarray:
    if hasattr(decoded, "detach"):  # torch tensor, without importing torch
        decoded = decoded.detach().cpu().numpy()
    a = np.asarray(decoded, dtype=np.float64)
    if a.size and not np.all(np.isfinite(a)):
        raise ValueError("decoded mask holds nan or inf")
    return a


def levels_to_classes(decoded: Any, num_classes: int, seed: int = 0) -> np.ndarray:
    """k-means on the values of a `levels` mask channel `(H, W)`; each cluster -> class of its nearest level.

    One cluster per class (fewer when the channel holds fewer distinct values). k-means runs on the distinct
    values weighted by their counts (the same objective as on all pixels, much faster for 8-bit data), or,
    beyond `KMEANS_MAX_POINTS` distinct values (float or 16-bit channels), on a histogram of that many bins;
    every pixel then goes to its nearest centre. `seed` fixes k-means' initialisation.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    a = _as_float_channel(decoded)
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    if a.ndim != 2:
        raise ValueError(f"levels mask must be (H, W), got shape {a.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if a.size == 0:
        return np.zeros(a.shape, dtype=_index_dtype(num_classes))
    values, inverse, counts = np.unique(a.ravel(), return_inverse=True, return_counts=True)
    n_clusters = min(num_classes, values.size)
    if n_clusters == values.size:
        # every distinct value is its own cluster: k-means would only reproduce them
        centres = values
    else:
        points, weights = values, counts
        if values.size > KMEANS_MAX_POINTS:
            # float channels have a distinct value per pixel: fit on the weighted means of fine histogram bins
            # (centres move by far less than a bin), then give every pixel its nearest centre below
            edges = np.linspace(values[0], values[-1], KMEANS_MAX_POINTS + 1)
            bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, KMEANS_MAX_POINTS - 1)
            weights = np.bincount(bins, weights=counts, minlength=KMEANS_MAX_POINTS)
            sums = np.bincount(bins, weights=values * counts, minlength=KMEANS_MAX_POINTS)
            used = weights > 0
            points, weights = sums[used] / weights[used], weights[used]
        km = KMeans(n_clusters=n_clusters, random_state=seed, n_init=3)
        # one thread: a few thousand 1-D points gain nothing from OpenMP, and on a busy machine its
        # threads made this step 100x slower (1 s instead of 10 ms)
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            # values closer than float precision collapse into fewer clusters; harmless, centres still map
            warnings.simplefilter("ignore", ConvergenceWarning)
            km.fit(points.reshape(-1, 1), sample_weight=weights)
        centres = km.cluster_centers_[:, 0]
    # nearest centre of each value: the midpoints between sorted centres split the line into clusters
    order = np.argsort(centres, kind="stable")
    sorted_centres = centres[order]
    cluster_of_value = order[np.searchsorted((sorted_centres[1:] + sorted_centres[:-1]) / 2, values)]
    class_of_cluster = nearest_level_classes(centres, num_classes)
    return class_of_cluster[cluster_of_value][inverse.reshape(-1)].reshape(a.shape)


def _argmax_classes(decoded: Any, num_classes: int) -> np.ndarray:
    a = _as_float_channel(decoded)
    if a.ndim != 3 or a.shape[0] != num_classes:
        raise ValueError(f"onehot mask must be ({num_classes}, H, W), got shape {a.shape}")
    return np.argmax(a, axis=0).astype(_index_dtype(num_classes))


def _neighbour_pairs(comp: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """(component id, flat index of a bordering pixel) for every adjacency between different components."""
    h, w = comp.shape
    flat = np.arange(h * w).reshape(h, w)
    offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 2 else [])
    ids, pix = [], []
    for dy, dx in offsets:
        # pair each pixel with its neighbour at (dy, dx); both directions of the adjacency are recorded
        a = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
        b = (slice(dy, h), slice(max(0, dx), w + min(0, dx)))
        ca, cb = comp[a], comp[b]
        diff = ca != cb
        ids += [ca[diff], cb[diff]]
        pix += [flat[b][diff], flat[a][diff]]
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ids).astype(np.int64), np.concatenate(pix).astype(np.int64)


def remove_small_objects(mask: Any, min_object_area: int, connectivity: int = 1) -> np.ndarray:
    """Fill every connected component of fewer than `min_object_area` pixels with its surrounding class.

    The surrounding class is the majority label of the pixels bordering the component (ties go to the lower
    class index); its pixels then join that class. Filling repeats until no small component is left: each
    pass labels the components, walks the small ones from the smallest up and fills each one unless a
    neighbour was filled earlier in the same pass (then it waits for the next pass, when it is judged with
    its merged neighbours). So a small object nested in another small object is absorbed by it first, and the
    merged object is judged by its own size. A component that borders nothing (one class over the whole tile)
    keeps its label.
    `connectivity`: 1 = 4-neighbourhood (skimage's `remove_small_objects` default), 2 = 8-neighbourhood.
    """
    from skimage.measure import label

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    if m.dtype.kind not in "iu":
        raise ValueError(f"mask must hold integer class indices, got {m.dtype}")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity}")
    m = m.copy()
    if m.size == 0 or min_object_area <= 1:
        return m
    while True:
        flat_mask = m.reshape(-1)
        # background=-1: every class, class 0 included, is labelled as regions of equal value
        comp = label(m.astype(np.int64), background=-1, connectivity=connectivity)
        flat_comp = comp.reshape(-1)
        n = int(comp.max())
        area = np.bincount(flat_comp, minlength=n + 1)
        small = area < min_object_area
        small[0] = False
        ids, pix = _neighbour_pairs(comp, connectivity)
        keep = small[ids]
        if not keep.any():
            return m
        # count each bordering pixel once per component
        key = np.unique(ids[keep] * m.size + pix[keep])
        ids, pix = key // m.size, key % m.size
        chosen = _fill_order(ids, flat_comp[pix], small, area)
        votes = np.zeros((n + 1, int(m.max()) + 1), dtype=np.int64)
        np.add.at(votes, (ids, flat_mask[pix]), 1)
        lut = np.zeros(n + 1, dtype=m.dtype)
        lut[flat_comp] = flat_mask
        lut[chosen] = np.argmax(votes[chosen], axis=1)
        m = lut[comp]


def _fill_order(ids: np.ndarray, neighbour: np.ndarray, small: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Small components to fill in this pass: smallest first, none adjacent to another chosen one.

    Fills of non-adjacent components cannot change each other's borders, so filling them together gives the
    same result as filling them one by one.
    """
    candidates = np.unique(ids)
    order = candidates[np.lexsort((candidates, area[candidates]))]
    both_small = small[neighbour]
    a, b = ids[both_small], neighbour[both_small]
    if a.size == 0:  # no two small components touch: fill them all
        return order
    idx = np.argsort(a, kind="stable")
    a, b = a[idx], b[idx]
    starts = np.searchsorted(a, order, side="left")
    ends = np.searchsorted(a, order, side="right")
    blocked = np.zeros(small.size, dtype=bool)
    chosen = []
    for c, s, e in zip(order.tolist(), starts.tolist(), ends.tolist()):
        if not blocked[c]:
            chosen.append(c)
            blocked[b[s:e]] = True
    return np.asarray(chosen, dtype=np.int64)


def clean_mask(
    decoded: Any,
    num_classes: int,
    encoding: str = "levels",
    min_object_area: int | None = 200,
    seed: int = 0,
    connectivity: int = 1,
) -> np.ndarray:
    """Decoded mask -> clean class-index mask `(H, W)` (uint8 for up to 256 classes), as in the paper's Fig. 11.

    decoded: `levels`: the `(H, W)` float mask channel (class k near `k/(C-1)`); `onehot`: `(C, H, W)` scores.
    min_object_area: components smaller than this are filled from their surroundings; `None` scales the
        paper's 200 px² at 256 x 256 with the tile area (`default_min_object_area`); 0 keeps every object.
    seed: k-means initialisation, so the same input always gives the same mask.
    """
    if encoding == "levels":
        classes = levels_to_classes(decoded, num_classes, seed=seed)
    elif encoding == "onehot":
        classes = _argmax_classes(decoded, num_classes)
    else:
        raise ValueError(f"encoding must be 'levels' or 'onehot', got {encoding!r}")
    if min_object_area is None:
        min_object_area = default_min_object_area(*classes.shape)
    return remove_small_objects(classes, min_object_area, connectivity=connectivity)


def changed_fraction(raw_levels_mask: Any, clean: Any, num_classes: int | None = None) -> float:
    """Fraction of pixels whose class the clean-up changed.

    raw_levels_mask: the raw decoded mask, either already as class indices (integer array) or as the float
    `levels` channel, read by nearest level (then `num_classes` is required).
    """
    raw = _as_float_channel(raw_levels_mask) if np.asarray(raw_levels_mask).dtype.kind == "f" else None
    if raw is not None:
        if num_classes is None:
            raise ValueError("num_classes is needed to read a float levels mask")
        raw_classes = nearest_level_classes(raw, num_classes).astype(np.int64)
    else:
        raw_classes = np.asarray(raw_levels_mask).astype(np.int64)
    c = np.asarray(clean).astype(np.int64)
    if raw_classes.shape != c.shape:
        raise ValueError(f"raw mask shape {raw_classes.shape} differs from clean mask shape {c.shape}")
    return float(np.mean(raw_classes != c)) if c.size else 0.0


# --- folders of decoded masks (`dualsynth clean-masks`) ----------------------------------------------------


def decoded_mask_to_float(array: Any, path: Any, num_classes: int, encoding: str) -> np.ndarray:
    """A decoded-mask image file's array as floats in [0, 1]: `(H, W)` for levels, `(C, H, W)` for onehot."""
    from dualsynth.errors import InputError

    a = np.asarray(array)
    if a.dtype == np.uint8:
        a = a.astype(np.float64) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float64) / 65535.0
    elif a.dtype.kind == "f":
        a = a.astype(np.float64)
    else:
        raise InputError(path, f"decoded mask of type {a.dtype} is not supported (8- or 16-bit grey, or float TIFF)")
    if encoding == "levels":
        if a.ndim == 3 and a.shape[2] in (3, 4) and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]):
            a = a[..., 0]  # grey stored as RGB
        if a.ndim != 2:
            raise InputError(path, f"levels mask must be a single grey channel, got shape {a.shape}")
        return a
    if a.ndim == 3 and a.shape[0] == num_classes and a.shape[2] != num_classes:
        return a  # stored channels first (C, H, W)
    if a.ndim != 3 or a.shape[2] != num_classes:
        raise InputError(path, f"onehot mask must have {num_classes} channels, got shape {a.shape}")
    return np.moveaxis(a, -1, 0)


def clean_mask_folder(
    in_dir: Any,
    out_dir: Any,
    num_classes: int,
    encoding: str = "levels",
    min_object_area: int | None = None,
    connectivity: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    warn: Any = None,
) -> dict[str, Any]:
    """Clean every decoded mask file of `in_dir` into an index-mask PNG of the same stem in `out_dir`.

    Everything is cleaned before anything is written, so a bad file leaves no half-written folder; existing
    outputs are replaced only with `overwrite`. `warn(line)` receives a warning for files that look like class
    indices rather than decoded grey levels. Returns the count, the fraction of pixels each clean-up changed
    (against reading each pixel by its nearest level or argmax) and the class fractions.
    """
    from pathlib import Path

    from dualsynth.errors import InputError
    from dualsynth.io import IMAGE_SUFFIXES, read_image, save_png

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    files = [p for p in sorted(in_dir.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InputError(in_dir, "no mask files found (.png, .tif, .jpg, .bmp)")
    targets: dict[str, Path] = {}
    for p in files:
        if p.stem in targets:
            raise InputError(p, f"two files for the stem '{p.stem}' ({targets[p.stem].name})")
        targets[p.stem] = p
    if not overwrite:
        for stem in targets:
            if (out_dir / f"{stem}.png").exists():
                raise InputError(out_dir / f"{stem}.png", "already exists (use --overwrite to replace it)")
    cleaned, changed = [], []
    for p in files:
        array = read_image(p)
        if warn is not None and encoding == "levels" and array.dtype.kind in "iu" and 0 < array.max() < num_classes:
            warn(f"warning: {p}: values 0..{int(array.max())} look like class indices; clean-masks expects "
                 f"decoded grey levels (class k at k/(C-1) of the full 8/16-bit range)")
        decoded = decoded_mask_to_float(array, p, num_classes, encoding)
        clean = clean_mask(decoded, num_classes, encoding=encoding, min_object_area=min_object_area,
                           seed=seed, connectivity=connectivity)
        raw = nearest_level_classes(decoded, num_classes) if encoding == "levels" else np.argmax(decoded, axis=0)
        cleaned.append((out_dir / f"{p.stem}.png", clean))
        changed.append(changed_fraction(raw, clean))
    for path, clean in cleaned:
        save_png(path, clean.astype(np.uint8))
    counts = np.bincount(np.concatenate([c.ravel() for _, c in cleaned]), minlength=num_classes)
    return {"masks": len(cleaned), "changed": changed, "class_fractions": (counts / counts.sum()).tolist()}
