"""Which tiles a U-Net run trains and validates on, and its training batches.

Real training tiles (the train split of a dataset folder), synthetic pairs added as a percentage of them
(paper §4.2.1, Table 5) or alone (Table 6), real validation tiles; decoded tiles cached in memory; random
crops, flips/rotations, the paper's §5.3 Albumentations baseline and copy-paste of real objects, all drawn from
(seed, epoch or step, tile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dualsynth.data import ClassInfo, DatasetFolder, TileRecord, random_dihedral
from dualsynth.errors import InputError
from dualsynth.io import to_uint8


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

    def majority_class(self, num_classes: int) -> int:
        """The class with the most pixels over every tile (ties: the lowest index)."""
        counts = sum(np.bincount(self[i][1].ravel(), minlength=num_classes) for i in range(len(self)))
        return int(np.argmax(counts))


def paper_augmentation(channels: int):
    """The §5.3 baseline: CLAHE, brightness/contrast, gamma, sharpen, blurs, Gauss noise, hue/saturation
    (Albumentations, grouped as in the smp example notebook the paper adapted). Grey images skip the colour op."""
    import os

    # Albumentations asks PyPI for its latest version when imported; nothing here may touch the network
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
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


class CopyPaste:
    """Copy-paste augmentation: objects of a real training tile pasted, with their mask, into a training tile.

    With probability `prob` a receiving tile gets a paste: a class is chosen among those that are a minority
    class of some real training tile (not the tile's most frequent class), with probability inversely
    proportional to its pixel frequency over the real training tiles (rare classes are pasted most); then a
    donor among the real tiles where that class is a minority (not the receiver itself when there is another),
    a random non-empty subset of that class's connected objects in the donor (8-connected), a random
    flip/rotation of the donor, and a random shift that keeps the objects inside the receiver where they fit.
    The objects' image pixels and mask labels replace the receiver's. Donors are the first `n_real` tiles of the
    cache (the real ones; synthetic tiles follow them in a run's cache), so only real labels are ever pasted.
    """

    def __init__(self, cache: TileCache, n_real: int, num_classes: int, prob: float = 0.5):
        from skimage.measure import label

        if n_real < 1:
            raise InputError("augment", "copy_paste pastes objects of real training tiles; this run has none")
        self.cache, self.prob, self._label = cache, float(prob), label
        counts = np.stack([np.bincount(cache[i][1].ravel(), minlength=num_classes)[:num_classes]
                           for i in range(n_real)])
        self.frequency = counts.sum(0) / max(counts.sum(), 1)
        majority = counts.argmax(1)
        # donors[c]: real tiles in which class c is present and is not the most frequent class
        self.donors = {c: [i for i in range(n_real) if counts[i, c] > 0 and majority[i] != c]
                       for c in range(num_classes)}
        self.classes = np.array([c for c in range(num_classes) if self.donors[c]], dtype=np.int64)
        weights = 1.0 / self.frequency[self.classes] if len(self.classes) else np.zeros(0)
        self.class_p = weights / weights.sum() if len(self.classes) else weights

    def __call__(self, index: int, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image, mask) of tile `index` with pasted objects, and the boolean map of pasted pixels."""
        pasted = np.zeros(mask.shape, dtype=bool)
        if not len(self.classes) or rng.random() >= self.prob:
            return image, mask, pasted
        cls = int(rng.choice(self.classes, p=self.class_p))
        donors = [d for d in self.donors[cls] if d != index] or self.donors[cls]
        donor_image, donor_mask = self.cache[int(donors[int(rng.integers(len(donors)))])]
        donor_image, donor_mask = random_dihedral(rng, donor_image, donor_mask, axes=(0, 1))
        objects, n = self._label(donor_mask == cls, connectivity=2, return_num=True)
        chosen = rng.permutation(n)[: int(rng.integers(1, n + 1))] + 1
        ys, xs = np.nonzero(np.isin(objects, chosen))
        dy = _shift(rng, int(ys.min()), int(ys.max()), mask.shape[0])
        dx = _shift(rng, int(xs.min()), int(xs.max()), mask.shape[1])
        ty, tx = ys + dy, xs + dx
        inside = (ty >= 0) & (ty < mask.shape[0]) & (tx >= 0) & (tx < mask.shape[1])
        ys, xs, ty, tx = ys[inside], xs[inside], ty[inside], tx[inside]
        image, mask = image.copy(), mask.copy()
        image[ty, tx] = donor_image[ys, xs]
        mask[ty, tx] = donor_mask[ys, xs]
        pasted[ty, tx] = True
        return image, mask, pasted


def _shift(rng: np.random.Generator, low: int, high: int, size: int) -> int:
    """A random offset that moves [low, high] inside [0, size) when it fits (else it covers the whole range)."""
    a, b = -low, size - 1 - high
    return int(rng.integers(min(a, b), max(a, b) + 1))


def _foreground_crop(rng: np.random.Generator, mask: np.ndarray, crop: int, probability: float,
                     majority: int) -> tuple[int, int] | None:
    """With `probability`, the corner of a crop centred (as far as the tile allows) on a random pixel whose class
    is not `majority`; None otherwise or when the tile has no such pixel."""
    if rng.random() >= probability:
        return None
    ys, xs = np.nonzero(mask != majority)
    if not len(ys):
        return None
    k = int(rng.integers(len(ys)))
    y = min(max(int(ys[k]) - crop // 2, 0), mask.shape[0] - crop)
    x = min(max(int(xs[k]) - crop // 2, 0), mask.shape[1] - crop)
    return y, x


def tile_batch(
    cache: TileCache, indices: Sequence[int], crop: int | None, flips: bool, augmenter: Any, seed: int, epoch: int,
    copy_paste: CopyPaste | None = None, foreground: tuple[float, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of these tile indices: random crop, copy-paste, flips/rotations, photometric augmentation.

    Randomness comes from (seed, epoch, tile index) (in step mode `epoch` is the step), so a batch does not
    depend on what ran before it. Copy-paste draws from its own generator, so crops and flips are those of the
    same batch without it. `foreground` = (probability, majority class): that share of the crops is centred on a
    random pixel of another class (its own generator too; tiles without such pixels get a uniform crop).
    """
    images, masks = [], []
    for i in indices:
        image, mask = cache[int(i)]
        rng = np.random.default_rng([int(seed), int(epoch), int(i)])
        if crop is not None:
            y = int(rng.integers(0, mask.shape[0] - crop + 1))
            x = int(rng.integers(0, mask.shape[1] - crop + 1))
            if foreground is not None:
                y, x = _foreground_crop(np.random.default_rng([int(seed), int(epoch), int(i), 3]), mask, crop,
                                        *foreground) or (y, x)
            image, mask = image[y : y + crop, x : x + crop], mask[y : y + crop, x : x + crop]
        if copy_paste is not None:
            image, mask, _ = copy_paste(int(i), image, mask, np.random.default_rng([int(seed), int(epoch), int(i), 2]))
        if flips:
            image, mask = random_dihedral(rng, image, mask, axes=(0, 1))
        if augmenter is not None:
            image = augment_image(augmenter, np.ascontiguousarray(image), int(rng.integers(0, 2**31 - 1)))
        images.append(np.moveaxis(image, -1, 0))
        masks.append(mask)
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise InputError("crop", f"training tiles differ in size ({sorted(shapes)[:2]}); set crop to train on crops")
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).float(), torch.from_numpy(np.ascontiguousarray(np.stack(masks))).long()


def same_size_groups(indices: Sequence[int], shapes: Sequence[tuple[int, int]], size: int) -> list[list[int]]:
    """Consecutive indices grouped into batches of at most `size` tiles of equal shape."""
    groups: list[list[int]] = []
    for i in indices:
        if groups and len(groups[-1]) < size and shapes[groups[-1][0]] == shapes[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


