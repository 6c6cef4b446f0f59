"""The texture stage: fine texture fitted on real tiles, added to synthetic micrographs (`dualsynth texture`,
`sample --texture`). Not in the paper.

The VQ-VAE draws each tile's low frequencies (brightness, phase contrast, shapes) well but cannot represent
what is finer than its downsampling: its micrographs are too smooth. This stage models exactly that part of the
real tiles as a stationary Gaussian random field with a per-class amplitude:

- residual: ``r = image - lowpass(image)``, where ``lowpass`` (`dualsynth.models.renderer.lowpass`) average-pools
  by ``pool`` (the VQ-VAE's downsampling) and upsamples back bilinearly: what a code of the VQ-VAE cannot hold.
- `fit_texture` (on a dataset's train split), per channel:
  * the source spectrum: the mean 2-D power spectrum of ``r`` (centred square crop of the smallest tile side,
    2-D Hann window; pixels within ``pool`` px of a phase boundary set to 0, since there the residual is the
    smeared step between phases, not texture; divided by the window-weighted share of pixels kept), divided by ``G``, the residual operator's own response to white noise (the mean
    residual spectrum of unit white noise; ``G`` is clamped below at `G_FLOOR` where it vanishes, near zero
    frequency), and normalised to mean 1 (unit variance). A field with this spectrum whose residual is
    taken again has the real residual spectrum.
  * the class amplitudes: the std of ``r`` over the pixels of each class (mask eroded by ``pool`` px, so
    that the steps between phases, which the lowpass smears, do not count as texture) divided by the gain
    of the residual operator on a unit field of the source spectrum (measured on `GAIN_DRAWS` draws). For
    white noise of std ``s`` on flat phases this gives back ``s``.
  * ``channel_correlation``: the mean correlation of the residuals between channels (RGB tiles of a grey
    SEM image: about 1), used to correlate the channels' noise.
- `add_texture(image, mask, model, rng)`: white Gaussian noise (per channel, mixed with a common draw by
  ``channel_correlation``) filtered in the Fourier domain by ``sqrt(spectrum)`` (the spectrum read at the
  nearest frequency when the image's sides differ from the fitted side), normalised to unit std, multiplied
  per pixel by its class's amplitude and added to ``lowpass(image)`` (``replace_high_band``, default: the
  result's fine texture is entirely the fitted one) or to the image; clipped to [0, 1].

A model is saved as ``NAME.npz`` (arrays) + ``NAME.json`` (settings, class names, per-class amplitudes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from dualsynth.data import DatasetFolder
from dualsynth.errors import InputError
from dualsynth.io import atomic_path, write_json
from dualsynth.models.renderer import lowpass

G_FLOOR = 0.1  # the residual operator's white-noise response is clamped below at this when dividing by it
GAIN_DRAWS = 8  # unit fields drawn to measure the residual operator's gain on the source spectrum
MIN_CLASS_PIXELS = 256  # with fewer interior pixels over all tiles, a class's amplitude uses all its pixels
TEXTURE_FILE = "texture.npz"


@dataclass
class TextureModel:
    """Fitted texture: ``spectrum`` (C, S, S) unit-mean source power spectra (unshifted FFT order),
    ``class_std`` (K, C) per-class amplitudes, ``channel_correlation`` in [0, 1], the lowpass ``pool``."""

    spectrum: np.ndarray
    class_std: np.ndarray
    pool: int
    class_names: list[str]
    channel_correlation: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.spectrum.shape[0])

    @property
    def side(self) -> int:
        return int(self.spectrum.shape[-1])

    def save(self, path: str | Path) -> None:
        """``path`` (.npz: spectrum, class_std) and the same name with .json (everything else)."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, spectrum=self.spectrum.astype(np.float32), class_std=self.class_std.astype(np.float32))
        write_json(path.with_suffix(".json"), {
            "pool": self.pool, "classes": self.class_names, "channel_correlation": self.channel_correlation,
            "side": self.side, "channels": self.channels,
            "class_std": {n: self.class_std[k].tolist() for k, n in enumerate(self.class_names)}, **self.info})

    @classmethod
    def load(cls, path: str | Path) -> "TextureModel":
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise InputError(path, f"texture model not found (needs {path.name} and {meta_path.name})")
        meta = json.loads(meta_path.read_text())
        with np.load(path) as npz:
            spectrum, class_std = npz["spectrum"].astype(np.float64), npz["class_std"].astype(np.float64)
        known = {"pool", "classes", "channel_correlation", "side", "channels", "class_std"}
        return cls(spectrum, class_std, int(meta["pool"]), list(meta["classes"]), float(meta["channel_correlation"]),
                   {k: v for k, v in meta.items() if k not in known})


# --- the residual and spectra -------------------------------------------------------------------------------


def lowpass_image(image: np.ndarray, pool: int) -> np.ndarray:
    """`dualsynth.models.renderer.lowpass` of one (H, W, C) float image."""
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(image, dtype=np.float32), -1, 0)))[None]
    return np.moveaxis(lowpass(x, pool)[0].numpy(), 0, -1)


def residual(image: np.ndarray, pool: int) -> np.ndarray:
    """``image - lowpass(image)``: the part of an (H, W, C) image finer than a ``pool`` x ``pool`` code."""
    image = np.asarray(image, dtype=np.float32)
    return image - lowpass_image(image, pool)


def _crop(array: np.ndarray, side: int) -> np.ndarray:
    h, w = array.shape[:2]
    y, x = (h - side) // 2, (w - side) // 2
    return array[y : y + side, x : x + side]


def spectrum_2d(field2d: np.ndarray) -> np.ndarray:
    """2-D power spectrum (unshifted) of a square field: mean removed, Hann window, |FFT|^2 / sum(window^2)
    (white noise of variance s^2: s^2 everywhere, the normalisation of the fidelity report's `power_spectrum`)."""
    side = field2d.shape[0]
    window = np.outer(np.hanning(side), np.hanning(side))
    return np.abs(np.fft.fft2((field2d - field2d.mean()) * window)) ** 2 / (window**2).sum()


def white_response(side: int, pool: int, draws: int = 16, seed: int = 0) -> np.ndarray:
    """G: mean 2-D residual spectrum of unit white noise on (side, side) tiles (the residual operator's gain)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((draws, side, side, 1)).astype(np.float32)
    return np.mean([spectrum_2d(residual(n, pool)[..., 0]) for n in noise], axis=0)


def _filter_field(white: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
    """White noise (H, W) filtered by ``amplitude`` (H, W, unshifted FFT order), normalised to unit std."""
    f = np.real(np.fft.ifft2(np.fft.fft2(white) * amplitude))
    f = f - f.mean()
    s = f.std()
    return f / s if s > 0 else f


def resample_spectrum(spectrum: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A (S, S) unshifted spectrum read at the frequencies of an (H, W) FFT grid (nearest frequency bin)."""
    side = spectrum.shape[-1]
    h, w = int(shape[0]), int(shape[1])
    if (h, w) == spectrum.shape[-2:]:
        return spectrum
    iy = np.rint(np.fft.fftfreq(h) * side).astype(np.int64) % side
    ix = np.rint(np.fft.fftfreq(w) * side).astype(np.int64) % side
    return spectrum[..., iy[:, None], ix[None, :]]


def texture_field(shape: Sequence[int], model: TextureModel, rng: np.random.Generator) -> np.ndarray:
    """(H, W, C) unit-std fields with the model's source spectra, channels correlated by the model."""
    h, w = int(shape[0]), int(shape[1])
    c = model.channels
    rho = float(np.clip(model.channel_correlation, 0.0, 1.0))
    common = rng.standard_normal((h, w))
    own = rng.standard_normal((c, h, w))
    spectrum = resample_spectrum(model.spectrum, (h, w))
    out = np.empty((h, w, c), dtype=np.float64)
    for ch in range(c):
        white = np.sqrt(rho) * common + np.sqrt(1.0 - rho) * own[ch] if c > 1 else own[ch]
        out[..., ch] = _filter_field(white, np.sqrt(spectrum[ch]))
    return out


def residual_gain(model: TextureModel, draws: int = GAIN_DRAWS, seed: int = 0) -> np.ndarray:
    """(C,) std of the residual of unit fields drawn from the model (how much of a field `residual` keeps)."""
    rng = np.random.default_rng(seed)
    gains = [residual(texture_field((model.side, model.side), model, rng).astype(np.float32), model.pool).std(axis=(0, 1))
             for _ in range(draws)]
    return np.mean(gains, axis=0)


# --- fitting ------------------------------------------------------------------------------------------------


def interior(mask: np.ndarray, pool: int) -> np.ndarray:
    """Boolean (H, W): pixels more than ``pool`` px from a pixel of another class (the lowpass smears a step
    between phases over ``pool`` px on either side; there the residual is the step, not texture)."""
    out = np.zeros(mask.shape, dtype=bool)
    for cls in np.unique(mask):
        out |= ndimage.binary_erosion(mask == cls, iterations=pool, border_value=1)
    return out


def fit_texture(folder: DatasetFolder | str | Path, split: str | None = "train", pool: int = 4) -> TextureModel:
    """Fit the texture model on the tiles of ``split`` (None: all) of a dataset folder (module docstring)."""
    folder = folder if isinstance(folder, DatasetFolder) else DatasetFolder(folder)
    if pool < 2:
        raise InputError("--pool", "must be at least 2")
    records = folder.records(split=split)
    if not records:
        raise InputError(folder.path, f"dataset has no '{split}' tiles to fit the texture on")
    images = [folder.load_image(r) for r in records]
    masks = [folder.load_mask(r) for r in records]
    side = min(min(a.shape[:2]) for a in images)
    if side < 4 * pool:
        raise InputError(folder.path, f"tiles of {side} px are too small for a texture with pool {pool}")
    c, k = images[0].shape[-1], folder.num_classes
    window = np.outer(np.hanning(side), np.hanning(side))
    spec, weight = np.zeros((c, side, side)), 0.0
    sums = {True: (np.zeros((k, c)), np.zeros(k)), False: (np.zeros((k, c)), np.zeros(k))}  # eroded?, all
    corr = []
    for image, mask in zip(images, masks):
        r = residual(image, pool).astype(np.float64)
        inside = interior(mask, pool)
        crop, crop_in = _crop(r, side), _crop(inside, side)
        for ch in range(c):
            spec[ch] += spectrum_2d(np.where(crop_in, crop[..., ch] - crop[..., ch][crop_in].mean()
                                             if crop_in.any() else 0.0, 0.0))
        weight += float((crop_in * window**2).sum() / (window**2).sum())
        for eroded, sel_all in ((True, inside), (False, np.ones_like(inside))):
            sq, cnt = sums[eroded]
            for cls in np.unique(mask):
                v = r[sel_all & (mask == cls)]
                if not len(v):
                    continue
                sq[cls] += ((v - v.mean(axis=0)) ** 2).sum(axis=0)
                cnt[cls] += len(v)
        if c > 1:
            cc = np.corrcoef(r[inside].reshape(-1, c).T) if inside.sum() > 1 else np.full((c, c), np.nan)
            if np.isfinite(cc).all():
                corr.append(cc[np.triu_indices(c, 1)].mean())
    if weight <= 0:
        raise InputError(folder.path, f"no tile has pixels more than {pool} px from a phase boundary")
    spec /= weight
    g = np.maximum(white_response(side, pool), G_FLOOR)
    source = spec / g[None]
    source /= np.maximum(source.mean(axis=(1, 2), keepdims=True), 1e-20)
    use_eroded = sums[True][1] >= MIN_CLASS_PIXELS
    sq_sum = np.where(use_eroded[:, None], sums[True][0], sums[False][0])
    count = np.where(use_eroded, sums[True][1], sums[False][1])
    residual_std = np.sqrt(sq_sum / np.maximum(count, 1)[:, None])
    model = TextureModel(source, residual_std, pool, folder.class_names,
                         float(np.clip(np.mean(corr), 0, 1)) if corr else 1.0)
    gain = residual_gain(model)
    model.class_std = residual_std / np.maximum(gain, 1e-6)[None]
    model.info = {"data": str(folder.path), "split": split, "tiles": len(images),
                  "residual_std": {n: residual_std[i].tolist() for i, n in enumerate(folder.class_names)},
                  "class_pixels": {n: int(count[i]) for i, n in enumerate(folder.class_names)},
                  "class_pixels_eroded": {n: bool(use_eroded[i]) for i, n in enumerate(folder.class_names)},
                  "residual_gain": gain.tolist()}
    return model


# --- adding texture -----------------------------------------------------------------------------------------


def texture_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of tile ``index``: a function of (seed, index) only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def add_texture(image: np.ndarray, mask: np.ndarray, model: TextureModel, rng: np.random.Generator,
                replace_high_band: bool = True) -> np.ndarray:
    """``image`` (H, W, C) float in [0, 1] with the model's texture added (module docstring); float32."""
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask)
    if image.shape[-1] != model.channels:
        raise ValueError(f"image has {image.shape[-1]} channels, the texture model {model.channels}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    base = lowpass_image(image, model.pool) if replace_high_band else image
    amplitude = model.class_std[np.clip(mask, 0, len(model.class_std) - 1)]  # (H, W, C)
    out = base + texture_field(image.shape[:2], model, rng) * amplitude
    return np.clip(out, 0, 1).astype(np.float32)
