"""How far is a synthetic set from the real tiles it imitates? (`dualsynth fidelity`)

Compares a synthetic dataset folder with a real one, measure by measure, real against synthetic:

- ``phase_fractions``: pixel fraction of each class (mean and std over tiles), and the sizes of the objects
  of each class (4-connected components, ``skimage.measure.label``): median and quartiles, in pixels.
- ``intensity``: per class, the distribution of micrograph intensities (grey, or the mean of the RGB
  channels) under that class's pixels, and the Wasserstein-1 distance between real and synthetic
  (``scipy.stats.wasserstein_distance`` on [0, 1] intensities; at most `MAX_PIXELS` pixels per class and
  set, drawn by the seed).
- ``high_frequency_power_ratio``: the radially averaged power spectrum of the grey micrographs (each tile's
  mean subtracted, a 2-D Hann window against edge leakage, normalised so white noise of variance s^2 has a
  flat spectrum s^2), averaged over tiles; the ratio of synthetic to real power summed over the upper half of
  the frequency band (radius > half Nyquist, i.e. frequencies 0.25-0.5 cycles/pixel). 1 is the same; blur
  drives it towards 0, noise or ringing above 1.
- ``two_point_correlation``: per class, S2(r), the probability that two pixels r apart both belong to the
  class, radially averaged over the offsets with round(|r|) = r, for r = 0..side/4. Computed with a
  zero-padded FFT and divided by the number of pixel pairs that lie inside the tile at each offset (no
  periodic wrap-around: tiles are not periodic). S2(0) is the class fraction; for r beyond the object size
  S2 falls to the fraction squared. Reported: the curves, the mean absolute difference per class and overall.
- ``feature_distance``: KID, the unbiased MMD^2 between real and synthetic tiles with the polynomial kernel
  k(x, y) = (x.y/d + 1)^3 of Binkowski et al. (2018), on the whole sets; its spread is the std of the same
  estimate over `KID_SUBSETS` random subsets of half the smaller set. Features: with a model, the U-Net's
  encoder (its deepest feature map, globally average pooled, on the input the U-Net sees); without, the
  default `texture_features` (no downloaded weights): intensity quantiles, the log power in frequency bands
  and gradient-magnitude quantiles at two scales, each standardised by the real tiles' mean and std.
- ``memorisation``: for each synthetic tile, the RMS distance of its micrograph to the nearest real train
  tile (both standardised to zero mean and unit std, so that a featureless grey tile is not "near" every
  real tile), against the real-to-real nearest-neighbour distances (each real held-out tile to the train tiles,
  or, without held-out tiles, each train tile to the other train tiles). A synthetic tile nearer than the
  1st percentile of the real-to-real distances is a near-copy. Only exact-position copies are caught (a
  shifted or flipped copy is not).
- ``pretest`` (with a model): the paper's pre-test: the real-data U-Net segments every synthetic micrograph,
  its prediction is the reference the synthetic masks are scored against; its Missing Class IoU.

Which tiles: the distributions use the real set's held-out tiles (splits ``val`` and ``test``) where it has
them, else all its tiles; memorisation uses its ``train`` split. At most ``max_tiles`` tiles of each set
and role, drawn by the seed. Tiles may differ in size between the sets: the per-pixel measures (phase
fractions, object sizes, intensities) use whole tiles; the spectra, two-point curves, features and
memorisation distances use the centred square crop of the common side (the smallest tile side of both
sets). Tiles are cropped, never resized, because resizing changes the pixel scale these measures compare.

Writes ``OUT/fidelity.json`` (every number, full curves and spectra), ``OUT/fidelity.md`` (the headline
numbers with what each means) and ``OUT/fidelity.png`` (examples, spectra, intensity histograms, S2 curves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dualsynth.data import ClassInfo, DatasetFolder, TileRecord, colorize_mask
from dualsynth.errors import InputError
from dualsynth.io import save_figure, write_json, write_text
from dualsynth.segmentation.data import check_compatible

DEFAULT_MAX_TILES = 500
MAX_PIXELS = 100_000  # per class and set, for the intensity distributions
HIST_BINS = 64  # intensity histograms in the JSON and the figure
KID_SUBSETS = 100
NEAR_COPY_PERCENTILE = 1.0
HELD_OUT_SPLITS = ("val", "test")
EXAMPLES = 3  # example tiles per set in the figure


# --- tiles --------------------------------------------------------------------------------------------------


@dataclass
class Tiles:
    """Decoded tiles of one set and role: images float32 (H, W, C) in [0, 1], masks int (H, W)."""

    role: str
    records: list[TileRecord]
    images: list[np.ndarray]
    masks: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.images)

    def grey(self, i: int) -> np.ndarray:
        return self.images[i].mean(axis=-1)


def _draw(records: Sequence[TileRecord], max_tiles: int | None, seed: int, salt: int) -> list[TileRecord]:
    records = list(records)
    if max_tiles is None or len(records) <= max_tiles:
        return records
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(salt,)))
    return [records[i] for i in sorted(rng.choice(len(records), max_tiles, replace=False))]


def _load(folder: DatasetFolder, records: Sequence[TileRecord], role: str) -> Tiles:
    return Tiles(role, list(records), [folder.load_image(r) for r in records], [folder.load_mask(r) for r in records])


def centre_crop(array: np.ndarray, side: int) -> np.ndarray:
    """The centred ``side`` x ``side`` crop of an (H, W, ...) array."""
    h, w = array.shape[:2]
    y, x = (h - side) // 2, (w - side) // 2
    return array[y : y + side, x : x + side]


# --- phase fractions and object sizes -----------------------------------------------------------------------


def tile_fractions(masks: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(N, C): pixel fraction of each class in each mask."""
    return np.array([np.bincount(m.ravel(), minlength=num_classes)[:num_classes] / m.size for m in masks])


def object_sizes(masks: Sequence[np.ndarray], cls: int) -> np.ndarray:
    """Pixel areas of all 4-connected objects of class ``cls`` in the masks."""
    from skimage.measure import label

    sizes = []
    for m in masks:
        lab = label(m == cls, connectivity=1)
        if lab.max():
            sizes.append(np.bincount(lab.ravel())[1:])
    return np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)


def _size_summary(sizes: np.ndarray, tiles: int) -> dict[str, Any]:
    if not len(sizes):
        return {"objects": 0, "objects_per_tile": 0.0, "q25": None, "median": None, "q75": None}
    q25, med, q75 = np.percentile(sizes, [25, 50, 75])
    return {"objects": int(len(sizes)), "objects_per_tile": len(sizes) / max(tiles, 1), "q25": float(q25),
            "median": float(med), "q75": float(q75)}


def phase_fraction_report(real: Tiles, synthetic: Tiles, classes: Sequence[ClassInfo]) -> dict[str, Any]:
    fr, fs = tile_fractions(real.masks, len(classes)), tile_fractions(synthetic.masks, len(classes))
    per_class, sizes = {}, {}
    for k, c in enumerate(classes):
        per_class[c.name] = {"real_mean": float(fr[:, k].mean()), "real_std": float(fr[:, k].std()),
                             "synthetic_mean": float(fs[:, k].mean()), "synthetic_std": float(fs[:, k].std()),
                             "difference": float(fs[:, k].mean() - fr[:, k].mean())}
        r, s = _size_summary(object_sizes(real.masks, k), len(real)), _size_summary(object_sizes(synthetic.masks, k), len(synthetic))
        ratio = s["median"] / r["median"] if r["median"] and s["median"] is not None else None
        sizes[c.name] = {"real": r, "synthetic": s, "median_ratio": ratio}
    return {"per_class": per_class,
            "max_abs_difference": float(np.max(np.abs(fs.mean(0) - fr.mean(0)))),
            "object_sizes": sizes, "object_connectivity": "4-connected (skimage.measure.label, connectivity=1)"}


# --- intensities --------------------------------------------------------------------------------------------


def class_intensities(tiles: Tiles, cls: int, seed: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Grey intensities (mean over channels) under the pixels of class ``cls``; at most ``max_pixels``, drawn
    without replacement by ``seed`` when there are more."""
    values = [tiles.grey(i)[tiles.masks[i] == cls] for i in range(len(tiles))]
    values = np.concatenate(values) if values else np.zeros(0, np.float32)
    if len(values) > max_pixels:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(100 + cls,)))
        values = values[np.sort(rng.choice(len(values), max_pixels, replace=False))]
    return values.astype(np.float64)


def intensity_report(real: Tiles, synthetic: Tiles, classes: Sequence[ClassInfo], seed: int) -> dict[str, Any]:
    from scipy.stats import wasserstein_distance

    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    per_class, hists = {}, {}
    for k, c in enumerate(classes):
        vr, vs = class_intensities(real, k, seed), class_intensities(synthetic, k, seed + 1)
        w1 = float(wasserstein_distance(vr, vs)) if len(vr) and len(vs) else None
        per_class[c.name] = {"wasserstein1": w1, "real": _value_summary(vr), "synthetic": _value_summary(vs)}
        hists[c.name] = {"real": _density(vr, edges), "synthetic": _density(vs, edges)}
    w = [v["wasserstein1"] for v in per_class.values() if v["wasserstein1"] is not None]
    return {"per_class": per_class, "mean_wasserstein1": float(np.mean(w)) if w else None,
            "max_pixels_per_class": MAX_PIXELS, "histogram_edges": edges.tolist(), "histograms": hists}


def _value_summary(v: np.ndarray) -> dict[str, Any]:
    if not len(v):
        return {"pixels": 0, "mean": None, "q25": None, "median": None, "q75": None}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"pixels": int(len(v)), "mean": float(v.mean()), "q25": float(q25), "median": float(med), "q75": float(q75)}


def _density(v: np.ndarray, edges: np.ndarray) -> list[float]:
    if not len(v):
        return [0.0] * (len(edges) - 1)
    return np.histogram(v, bins=edges, density=True)[0].tolist()


# --- power spectra ------------------------------------------------------------------------------------------


def radial_bins(side: int) -> np.ndarray:
    """(side, side) integer frequency radius of each FFT coefficient: round(|(fy, fx)| * side)."""
    f = np.fft.fftfreq(side) * side
    return np.rint(np.hypot(f[:, None], f[None, :])).astype(np.int64)


def power_spectrum(grey: np.ndarray) -> np.ndarray:
    """Radially averaged power spectrum of one square grey tile, radius 0..side/2 (Nyquist).

    The tile's mean is subtracted and a 2-D Hann window applied; power is |FFT|^2 / sum(window^2), so white
    noise of variance s^2 gives s^2 at every radius. Entry r is the mean over coefficients with round radius r.
    """
    side = grey.shape[0]
    window = np.outer(np.hanning(side), np.hanning(side))
    x = (grey - grey.mean()) * window
    power = np.abs(np.fft.fft2(x)) ** 2 / (window**2).sum()
    r = radial_bins(side)
    nyquist = side // 2
    keep = r <= nyquist
    sums = np.bincount(r[keep], weights=power[keep], minlength=nyquist + 1)
    counts = np.bincount(r[keep], minlength=nyquist + 1)
    return sums / np.maximum(counts, 1)


def mean_spectrum(greys: Sequence[np.ndarray]) -> np.ndarray:
    return np.mean([power_spectrum(g) for g in greys], axis=0)


def high_frequency_ratio(spectrum_real: np.ndarray, spectrum_synthetic: np.ndarray) -> float:
    """Synthetic over real power summed over radius > half Nyquist (spectra from `power_spectrum`)."""
    nyquist = len(spectrum_real) - 1
    band = np.arange(len(spectrum_real)) > nyquist / 2
    real = float(spectrum_real[band].sum())
    return float(spectrum_synthetic[band].sum()) / real if real > 0 else float("nan")


# --- two-point correlation ----------------------------------------------------------------------------------


class TwoPoint:
    """S2(r) of square masks of one side, r = 0..rmax, by zero-padded FFT normalised by the pair count."""

    def __init__(self, side: int, rmax: int | None = None):
        from scipy import fft

        self.side = side
        self.rmax = side // 4 if rmax is None else rmax
        self.shape = (fft.next_fast_len(side + self.rmax),) * 2  # padding >= rmax: no wrap for |offset| <= rmax
        d = np.arange(-self.rmax, self.rmax + 1)
        self.dy, self.dx = np.meshgrid(d, d, indexing="ij")
        radius = np.rint(np.hypot(self.dy, self.dx)).astype(np.int64)
        self.keep = radius <= self.rmax
        self.radius = radius[self.keep]
        self.counts_per_r = np.bincount(self.radius, minlength=self.rmax + 1)
        self.pairs = self._autocorrelation(np.ones((side, side)))  # pixel pairs inside the tile per offset

    def _autocorrelation(self, x: np.ndarray) -> np.ndarray:
        from scipy import fft

        f = fft.rfft2(x, s=self.shape)
        full = fft.irfft2(f * np.conj(f), s=self.shape)
        return full[self.dy % self.shape[0], self.dx % self.shape[1]]

    def __call__(self, indicator: np.ndarray) -> np.ndarray:
        """S2(r) of one boolean (side, side) map, r = 0..rmax."""
        s2 = self._autocorrelation(indicator.astype(np.float64)) / self.pairs
        return np.bincount(self.radius, weights=s2[self.keep], minlength=self.rmax + 1) / self.counts_per_r


def two_point_report(real_masks: Sequence[np.ndarray], synthetic_masks: Sequence[np.ndarray],
                     classes: Sequence[ClassInfo], side: int) -> dict[str, Any]:
    tp = TwoPoint(side)
    per_class = {}
    for k, c in enumerate(classes):
        r = np.mean([tp(m == k) for m in real_masks], axis=0)
        s = np.mean([tp(m == k) for m in synthetic_masks], axis=0)
        per_class[c.name] = {"real": r.tolist(), "synthetic": s.tolist(),
                             "mean_abs_difference": float(np.mean(np.abs(r - s)))}
    return {"r": list(range(tp.rmax + 1)), "per_class": per_class,
            "mean_abs_difference": float(np.mean([v["mean_abs_difference"] for v in per_class.values()])),
            "method": "zero-padded FFT, each offset divided by the number of pixel pairs inside the tile "
                      "(not periodic); radially averaged over offsets with round(|r|) = r; mean over tiles",
            "side": side}


# --- features and KID ---------------------------------------------------------------------------------------

QUANTILES = np.linspace(0.05, 0.95, 10)
GRADIENT_QUANTILES = np.array([0.1, 0.3, 0.5, 0.7, 0.9])


def band_edges(side: int, bands: int = 8) -> np.ndarray:
    """Radius edges of up to ``bands`` log-spaced frequency bands from radius 1 to Nyquist."""
    return np.unique(np.rint(np.geomspace(1, side // 2 + 1, bands + 1)).astype(int))


def texture_features(grey: np.ndarray) -> dict[str, np.ndarray]:
    """The default features of one square grey tile, in three blocks (see `feature_blocks`)."""
    from scipy import ndimage

    spectrum = power_spectrum(grey)
    edges = band_edges(grey.shape[0])
    bands = np.array([spectrum[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    grads = []
    for image in (grey, _pool2(grey)):
        g = np.hypot(ndimage.sobel(image, axis=0), ndimage.sobel(image, axis=1))
        grads.append(np.quantile(g, GRADIENT_QUANTILES))
    return {"intensity_quantiles": np.quantile(grey, QUANTILES),
            "log_band_power": np.log10(bands + 1e-12),
            "gradient_quantiles": np.log10(np.concatenate(grads) + 1e-6)}


def _pool2(x: np.ndarray) -> np.ndarray:
    h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
    return x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def texture_feature_matrix(greys: Sequence[np.ndarray]) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """(N, d) raw texture features of square grey tiles and the (name, length) of each block."""
    feats = [texture_features(g) for g in greys]
    blocks = [(name, len(v)) for name, v in feats[0].items()]
    return np.array([np.concatenate(list(f.values())) for f in feats]), blocks


def standardise(real: np.ndarray, synthetic: np.ndarray, blocks: Sequence[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets in units of the real features' spread, z = (x - real mean) / real std (each std
    floored at a tenth of its block's median std, so a feature that never varies in the real set cannot
    explode), then compressed beyond one std as sign(z) log(1 + |z|): a feature hundreds of stds off (a blurred
    set's fine-scale power) counts as clearly off without letting the cubic kernel reach 1e8."""
    mean, std = real.mean(0), real.std(0)
    start = 0
    for _name, n in blocks:
        part = std[start : start + n]
        floor = max(0.1 * float(np.median(part)), 1e-6)
        std[start : start + n] = np.maximum(part, floor)
        start += n

    def squash(z: np.ndarray) -> np.ndarray:
        return np.sign(z) * np.log1p(np.abs(z))

    return squash((real - mean) / std), squash((synthetic - mean) / std)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the KID kernel k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(x: np.ndarray, y: np.ndarray, seed: int, subsets: int = KID_SUBSETS) -> dict[str, Any]:
    """KID of two feature sets: the unbiased MMD^2 over the whole sets, and its std over ``subsets`` random
    subsets of half the smaller set (at most 1000) drawn without replacement by ``seed``."""
    if len(x) < 2 or len(y) < 2:
        return {"kid": None, "kid_std": None, "subset_size": 0, "subsets": 0,
                "note": "needs at least 2 tiles in each set"}
    m = min(1000, max(2, min(len(x), len(y)) // 2))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    values = [mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
              for _ in range(subsets)]
    return {"kid": mmd2_unbiased(x, y), "kid_std": float(np.std(values)), "kid_subset_mean": float(np.mean(values)),
            "subset_size": m, "subsets": subsets}


def encoder_features(model: Any, images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, channels) features of a U-Net from `dualsynth.segmentation.load_segmenter`: its encoder's deepest
    feature map, globally average pooled, on the input the U-Net itself sees (its per-image normalisation and
    padding to a multiple of 2^depth)."""
    import torch

    from dualsynth.config import autocast

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))[None].float().to(device)
            if model.config.normalize == "per_image":
                x = (x - x.mean(dim=(-2, -1), keepdim=True)) / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
            h, w = x.shape[-2:]
            ph, pw = (-h) % model.multiple, (-w) % model.multiple
            if ph or pw:
                x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
            with autocast(device):
                deepest = model.net.encoder(x)[-1]
            out.append(deepest.float().mean(dim=(-2, -1))[0].cpu().numpy())
    return np.array(out, dtype=np.float64)


# --- memorisation -------------------------------------------------------------------------------------------


def nearest_distances(queries: np.ndarray, references: np.ndarray, exclude_self: bool = False,
                      chunk: int = 256) -> np.ndarray:
    """RMS distance of each row of ``queries`` (N, P) to its nearest row of ``references`` (M, P);
    ``exclude_self``: queries are the references, and a row is not its own neighbour."""
    ref_sq = (references**2).sum(1)
    out = np.empty(len(queries))
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        d2 = (q**2).sum(1)[:, None] + ref_sq[None, :] - 2 * q @ references.T
        if exclude_self:
            idx = np.arange(start, start + len(q))
            d2[np.arange(len(q)), idx] = np.inf
        out[start : start + len(q)] = np.min(d2, axis=1)
    return np.sqrt(np.maximum(out, 0) / queries.shape[1])


def standardise_rows(rows: np.ndarray) -> np.ndarray:
    """Each row (a flattened crop) at zero mean and unit standard deviation: distances then compare structure,
    not brightness, and a featureless tile (flat grey, or flat grey with noise) is far from every real tile
    instead of near all of them (on raw pixels a flat tile at the mean grey is nearer every real tile than real
    tiles are to each other, and would count as a near-copy)."""
    rows = np.asarray(rows, dtype=np.float32)
    centred = rows - rows.mean(axis=1, keepdims=True)
    return centred / np.maximum(centred.std(axis=1, keepdims=True), 1e-6)


def flat_rows(rows: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """Rows without structure (std below `floor`, e.g. a constant or fully clipped crop): standardised they are
    the zero vector, at distance 1 from every real crop, nearer than uncorrelated real crops are to each other."""
    return np.asarray(rows, dtype=np.float32).std(axis=1) < floor


def memorisation_report(train: np.ndarray, held_out: np.ndarray | None, synthetic: np.ndarray) -> dict[str, Any]:
    """Rows: flattened micrograph crops. Near-copies: synthetic tiles nearer to a train tile than the
    `NEAR_COPY_PERCENTILE` percentile of the real-to-real nearest distances (rows standardised first)."""
    if len(train) < 1 or ((held_out is None or not len(held_out)) and len(train) < 2):
        return {"near_copy_fraction": None, "note": "needs a real train split (and held-out tiles or 2+ train tiles)"}
    flat = flat_rows(synthetic)  # a crop without structure is nobody's copy
    train, synthetic = standardise_rows(train), standardise_rows(synthetic)
    held_out = None if held_out is None else standardise_rows(held_out)
    if held_out is not None and len(held_out):
        ref = nearest_distances(held_out, train)
        reference = "each real held-out tile to its nearest real train tile"
    else:
        ref = nearest_distances(train, train, exclude_self=True)
        reference = "each real train tile to its nearest other train tile"
    syn = nearest_distances(synthetic, train)
    syn[flat] = np.inf
    threshold = float(np.percentile(ref, NEAR_COPY_PERCENTILE))
    return {"near_copy_fraction": float(np.mean(syn < threshold)), "near_copies": int(np.sum(syn < threshold)),
            "threshold": threshold, "percentile": NEAR_COPY_PERCENTILE, "reference": reference,
            "reference_distances": int(len(ref)),
            "note": "with few reference distances the percentile is close to their minimum, so a fresh draw of the "
                    "real distribution is flagged at about 1/(reference_distances + 1) of its tiles",
            "distance": "RMS difference of the micrographs (all channels) on the common centred crop, each crop "
                        "standardised to zero mean and unit standard deviation",
            "synthetic_nearest": {"median": float(np.median(syn)), "min": float(syn.min()), "values": syn.tolist()},
            "real_nearest": {"median": float(np.median(ref)), "min": float(ref.min()), "values": ref.tolist()},
            "train_tiles": int(len(train))}


# --- the whole comparison -----------------------------------------------------------------------------------


@dataclass
class FidelityResult:
    """The report (what fidelity.json holds) and the example tiles the figure shows."""

    report: dict[str, Any]
    classes: list[ClassInfo]
    examples: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)


def _check_model(model: Any, real: DatasetFolder, run: str | Path) -> None:
    config = getattr(model, "config", None)
    names = [c["name"] for c in config.classes]
    if names != real.class_names:
        raise InputError(run, f"the model's classes {names} differ from {real.class_names} of {real.path}")
    if config.in_channels != real.image_channels:
        raise InputError(run, f"the model takes {config.in_channels} image channel(s), {real.path} has {real.image_channels}")


def measure_fidelity(real: str | Path, synthetic: str | Path, model: str | Path | None = None, *, seed: int = 0,
                     max_tiles: int | None = DEFAULT_MAX_TILES, device: str = "auto") -> FidelityResult:
    """Every measure of the module docstring, real against synthetic (nothing written)."""
    real_folder, syn_folder = DatasetFolder(real), DatasetFolder(synthetic)
    check_compatible(real_folder, syn_folder, "synthetic")
    classes = list(real_folder.classes)
    held_records = real_folder.records(split=list(HELD_OUT_SPLITS))
    ref_records = held_records or real_folder.records()
    train_records = real_folder.records(split="train")
    ref = _load(real_folder, _draw(ref_records, max_tiles, seed, 1), "real")
    train = _load(real_folder, _draw(train_records, max_tiles, seed, 2), "real train")
    syn = _load(syn_folder, _draw(syn_folder.records(), max_tiles, seed, 3), "synthetic")
    side = min(min(a.shape[:2]) for t in (ref, train, syn) for a in t.images)

    def crops(t: Tiles) -> list[np.ndarray]:
        return [centre_crop(a, side) for a in t.images]

    ref_crops, syn_crops = crops(ref), crops(syn)
    ref_grey, syn_grey = [c.mean(-1) for c in ref_crops], [c.mean(-1) for c in syn_crops]

    report: dict[str, Any] = {
        "real": str(real_folder.path), "synthetic": str(syn_folder.path), "seed": seed, "max_tiles": max_tiles,
        "classes": real_folder.class_names, "image_channels": real_folder.image_channels,
        "tiles": {"real_reference": len(ref),
                  "real_reference_splits": sorted({r.split for r in ref.records}),
                  "real_reference_is_held_out": bool(held_records),
                  "real_train": len(train), "synthetic": len(syn), "common_side": side},
    }
    report["phase_fractions"] = phase_fraction_report(ref, syn, classes)
    report["intensity"] = intensity_report(ref, syn, classes, seed)

    spec_r, spec_s = mean_spectrum(ref_grey), mean_spectrum(syn_grey)
    report["high_frequency_power_ratio"] = high_frequency_ratio(spec_r, spec_s)
    report["power_spectrum"] = {
        "frequency": (np.arange(len(spec_r)) / side).tolist(), "real": spec_r.tolist(), "synthetic": spec_s.tolist(),
        "units": "cycles/pixel; power per pixel of the mean-subtracted, Hann-windowed grey tile",
        "high_band": "frequency > 0.25 cycles/pixel (radius > half Nyquist)", "side": side}

    report["two_point_correlation"] = two_point_report([centre_crop(m, side) for m in ref.masks],
                                                        [centre_crop(m, side) for m in syn.masks], classes, side)

    if model is not None:
        from dualsynth.segmentation import evaluate, load_segmenter

        net = load_segmenter(model, device)
        _check_model(net, real_folder, model)
        fr, fs = encoder_features(net, ref_crops), encoder_features(net, syn_crops)
        extractor = {"extractor": "unet-encoder", "model": str(model),
                     "description": "the U-Net encoder's deepest feature map, globally average pooled (raw)"}
    else:
        raw_r, blocks = texture_feature_matrix(ref_grey)
        raw_s, _ = texture_feature_matrix(syn_grey)
        fr, fs = standardise(raw_r, raw_s, blocks)
        extractor = {"extractor": "texture",
                     "description": "intensity quantiles, log power in log-spaced frequency bands, log gradient-"
                                    "magnitude quantiles at scales 1 and 2; standardised by the real tiles",
                     "blocks": {name: n for name, n in blocks}}
    report["feature_distance"] = {**extractor, "dimensions": int(fr.shape[1]), **kid(fr, fs, seed),
                                  "kernel": "(x.y/d + 1)^3, unbiased MMD^2"}

    held_flat = np.array([c.ravel() for c in ref_crops]) if held_records else None
    report["memorisation"] = memorisation_report(
        np.array([c.ravel() for c in crops(train)]) if len(train) else np.zeros((0, 1)),
        held_flat, np.array([c.ravel() for c in syn_crops]))

    if model is not None:
        result = evaluate(net, syn_folder, None, reference="prediction")
        s = result.summary
        report["pretest"] = {"missing_class_iou": s.get("missing_class_iou"), "miou": s.get("miou"),
                             "pixel_accuracy": s.get("pixel_accuracy"),
                             "missing_class_iou_per_class": s.get("missing_class_iou_per_class"),
                             "tiles": result.info["tiles"], "model": str(model),
                             "note": "the model's prediction is the reference the synthetic masks are scored against"}
    else:
        report["pretest"] = None
    report["headline"] = _headline_numbers(report)
    examples = {"real": list(zip(ref.images, ref.masks))[:EXAMPLES], "synthetic": list(zip(syn.images, syn.masks))[:EXAMPLES]}
    return FidelityResult(report, classes, examples)


def _headline_numbers(report: dict[str, Any]) -> dict[str, Any]:
    fd, mem, pt = report["feature_distance"], report["memorisation"], report.get("pretest")
    return {"phase_fraction_max_abs_difference": report["phase_fractions"]["max_abs_difference"],
            "intensity_mean_wasserstein1": report["intensity"]["mean_wasserstein1"],
            "high_frequency_power_ratio": report["high_frequency_power_ratio"],
            "two_point_mean_abs_difference": report["two_point_correlation"]["mean_abs_difference"],
            "kid": fd["kid"], "kid_std": fd["kid_std"], "feature_extractor": fd["extractor"],
            "near_copy_fraction": mem.get("near_copy_fraction"),
            "pretest_missing_class_iou": pt["missing_class_iou"] if pt else None}


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and value != value) else format(value, spec)


def fidelity_headline(report: dict[str, Any]) -> str:
    """One or two lines with the headline numbers of a fidelity report (the dict `fidelity` returns or
    fidelity.json holds)."""
    h = report["headline"] if "headline" in report else _headline_numbers(report)
    line1 = (f"fidelity: HF power ratio {_fmt(h['high_frequency_power_ratio'], '.2f')} (1 = same), "
             f"KID {_fmt(h['kid'], '.4f')} ± {_fmt(h['kid_std'], '.4f')} ({h['feature_extractor']} features), "
             f"intensity W1 {_fmt(h['intensity_mean_wasserstein1'], '.4f')}, "
             f"two-point diff {_fmt(h['two_point_mean_abs_difference'], '.4f')}")
    copies = h["near_copy_fraction"]
    line2 = (f"          phase fractions max diff {_fmt(100 * h['phase_fraction_max_abs_difference'], '.1f')} pp, "
             f"near-copies {_fmt(None if copies is None else 100 * copies, '.1f')} %")
    if h.get("pretest_missing_class_iou") is not None:
        line2 += f", pre-test Missing Class IoU {100 * h['pretest_missing_class_iou']:.1f} %"
    return line1 + "\n" + line2


# --- writing ------------------------------------------------------------------------------------------------

MEANINGS = [
    ("Phase fractions, largest difference", "phase_fraction_max_abs_difference",
     "The largest difference, over classes, between the mean pixel fraction of a class in real and synthetic "
     "tiles; lower is better (0: every phase as common as in the real tiles)."),
    ("Intensity W1 (mean over classes)", "intensity_mean_wasserstein1",
     "The Wasserstein-1 distance between the real and synthetic grey-level distributions under each class's "
     "pixels, averaged over classes, in units of the [0, 1] intensity range; lower is better (0: same)."),
    ("High-frequency power ratio", "high_frequency_power_ratio",
     "Synthetic over real spectral power above half the Nyquist frequency (fine detail, edges, noise); 1 is "
     "best, below 1 means blurred synthetic micrographs, above 1 extra noise or ringing."),
    ("Two-point correlation difference", "two_point_mean_abs_difference",
     "The mean absolute difference between real and synthetic S2(r) curves (probability that two pixels r "
     "apart both belong to a class), averaged over classes; lower is better (0: same phase arrangement)."),
    ("KID", "kid",
     "Kernel Inception-style distance (unbiased MMD^2) between real and synthetic tiles in feature space; "
     "lower is better, about 0 for the same distribution (it can be slightly negative), compare with its std."),
    ("Near-copy fraction", "near_copy_fraction",
     "The share of synthetic tiles closer to a real training tile than almost any real tile is (1st "
     "percentile of real-to-real nearest distances); lower is better (near 0: no memorised training tiles)."),
    ("Pre-test Missing Class IoU", "pretest_missing_class_iou",
     "The real-data U-Net's segmentation of the synthetic micrographs scored against the synthetic masks "
     "(paper §3.3); higher is better (the synthetic masks say what a real-data model sees)."),
]


def format_markdown(report: dict[str, Any]) -> str:
    h, t = report["headline"], report["tiles"]
    fd = report["feature_distance"]
    lines = [f"# Fidelity of `{report['synthetic']}` against `{report['real']}`", "",
             f"Real reference: {t['real_reference']} tiles ({', '.join(t['real_reference_splits'])}"
             f"{'' if t['real_reference_is_held_out'] else ', no held-out split'}); real train: {t['real_train']} "
             f"tiles; synthetic: {t['synthetic']} tiles; common crop {t['common_side']} px; seed {report['seed']}.", "",
             "| measure | value | better |", "|---|---|---|"]
    better = {"high_frequency_power_ratio": "near 1", "pretest_missing_class_iou": "higher"}
    for name, key, _ in MEANINGS:
        value = h.get(key)
        if key == "pretest_missing_class_iou" and value is None:
            continue
        if key == "kid":
            text = f"{_fmt(value, '.4f')} ± {_fmt(h['kid_std'], '.4f')} ({fd['extractor']} features, d = {fd['dimensions']})"
        elif key == "near_copy_fraction":
            mem = report["memorisation"]
            text = (f"{_fmt(value, '.3f')} (threshold {_fmt(mem.get('threshold'), '.4f')})" if value is not None
                    else f"- ({mem.get('note', '')})")
        else:
            text = _fmt(value, ".4f")
        lines.append(f"| {name} | {text} | {better.get(key, 'lower')} |")
    lines += ["", "## What the measures mean", ""]
    lines += [f"- **{name}**: {meaning}" for name, key, meaning in MEANINGS
              if key != "pretest_missing_class_iou" or h.get(key) is not None]
    lines += ["", "## Per class", "",
              "| class | fraction real | fraction synthetic | object size real (median, q25-q75 px) | "
              "object size synthetic | intensity W1 | S2 difference |", "|---|---|---|---|---|---|---|"]
    for name in report["classes"]:
        pf = report["phase_fractions"]["per_class"][name]
        sz = report["phase_fractions"]["object_sizes"][name]
        w1 = report["intensity"]["per_class"][name]["wasserstein1"]
        s2 = report["two_point_correlation"]["per_class"][name]["mean_abs_difference"]
        lines.append(f"| {name} | {pf['real_mean']:.3f} ± {pf['real_std']:.3f} | {pf['synthetic_mean']:.3f} ± "
                     f"{pf['synthetic_std']:.3f} | {_size_text(sz['real'])} | {_size_text(sz['synthetic'])} | "
                     f"{_fmt(w1, '.4f')} | {s2:.4f} |")
    lines += ["", "Every number, the full spectra and S2 curves: `fidelity.json`; the figure: `fidelity.png`.", ""]
    return "\n".join(lines)


def _size_text(s: dict[str, Any]) -> str:
    if not s["objects"]:
        return "no objects"
    return f"{s['median']:.0f} ({s['q25']:.0f}-{s['q75']:.0f}), {s['objects']} objects"


def _line_colour(c: ClassInfo) -> tuple[float, float, float]:
    rgb = np.array(c.color, dtype=float) / 255
    return tuple(rgb * 0.7) if rgb.mean() > 0.85 else tuple(rgb)  # white lines would not show


def draw_figure(path: str | Path, result: FidelityResult) -> None:
    """fidelity.png: example tiles with masks (real | synthetic), spectra, intensity histograms, S2 curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualsynth.segmentation.evaluation import image_rgb

    report, classes = result.report, result.classes
    cols = 2 * EXAMPLES
    fig = plt.figure(figsize=(13, 8.6))
    grid = fig.add_gridspec(3, cols, height_ratios=[1, 1, 1.5])
    for j, (role, offset) in enumerate((("real", 0), ("synthetic", EXAMPLES))):
        for i, (image, mask) in enumerate(result.examples.get(role, [])):
            ax = fig.add_subplot(grid[0, offset + i])
            ax.imshow(image_rgb(image))
            ax.set_title(f"{role} {i + 1}", fontsize=9)
            ax.axis("off")
            ax = fig.add_subplot(grid[1, offset + i])
            ax.imshow(colorize_mask(mask, classes), interpolation="nearest")
            ax.axis("off")
    third = cols // 3
    ax = fig.add_subplot(grid[2, 0:third])
    ps = report["power_spectrum"]
    f = np.array(ps["frequency"])
    ax.semilogy(f[1:], np.array(ps["real"])[1:], label="real", color="k")
    ax.semilogy(f[1:], np.array(ps["synthetic"])[1:], label="synthetic", color="tab:red", ls="--")
    ax.axvspan(0.25, 0.5, color="0.9", zorder=0)
    ax.set_xlabel("frequency (cycles/pixel)")
    ax.set_ylabel("power")
    ax.set_title(f"power spectrum; HF ratio {_fmt(report['high_frequency_power_ratio'], '.2f')}", fontsize=9)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[2, third : 2 * third])
    edges = np.array(report["intensity"]["histogram_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    for c in classes:
        hist = report["intensity"]["histograms"][c.name]
        ax.plot(centres, hist["real"], color=_line_colour(c), label=f"{c.name}")
        ax.plot(centres, hist["synthetic"], color=_line_colour(c), ls="--")
    ax.set_xlabel("intensity (solid real, dashed synthetic)")
    ax.set_ylabel("density")
    ax.set_title(f"intensity per class; mean W1 {_fmt(report['intensity']['mean_wasserstein1'], '.4f')}", fontsize=9)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[2, 2 * third :])
    tp = report["two_point_correlation"]
    for c in classes:
        curves = tp["per_class"][c.name]
        ax.plot(tp["r"], curves["real"], color=_line_colour(c), label=c.name)
        ax.plot(tp["r"], curves["synthetic"], color=_line_colour(c), ls="--")
    ax.set_xlabel("r (px; solid real, dashed synthetic)")
    ax.set_ylabel("S2(r)")
    ax.set_title(f"two-point correlation; mean |diff| {tp['mean_abs_difference']:.4f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(fidelity_headline(report), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(path, fig)


def write_fidelity(result: FidelityResult, out: str | Path) -> dict[str, Path]:
    """Write fidelity.json, fidelity.md and fidelity.png into ``out`` (atomically, each replaced if present)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "fidelity.json", "md": out / "fidelity.md", "png": out / "fidelity.png"}
    draw_figure(paths["png"], result)
    write_text(paths["md"], format_markdown(result.report))
    write_json(paths["json"], result.report)
    return paths


def fidelity(real: str | Path, synthetic: str | Path, out: str | Path, model: str | Path | None = None, *,
             seed: int = 0, max_tiles: int | None = DEFAULT_MAX_TILES, device: str = "auto") -> dict[str, Any]:
    """`dualsynth fidelity`: measure a synthetic set against the real one and write OUT/fidelity.{json,md,png}.
    Returns the report (what fidelity.json holds)."""
    result = measure_fidelity(real, synthetic, model, seed=seed, max_tiles=max_tiles, device=device)
    write_fidelity(result, out)
    return result.report
