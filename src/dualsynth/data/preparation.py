"""`prepare`: a dataset folder from a user's folder of micrographs and masks (pairing by name, colour, grey and
index masks, 8/16-bit images, tiling, splits by source image).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dualsynth.data.folder import (
    ClassInfo,
    DatasetWriter,
    _values_clash,
    default_classes,
    read_classes,
)
from dualsynth.errors import InputError
from dualsynth.io import IMAGE_SUFFIXES, progress_bar, read_image, read_yaml

# tifffile logs harmless "shaped series" complaints about ImageJ-style metadata at ERROR level; the pixels read fine
logging.getLogger("tifffile").setLevel(logging.CRITICAL)

# grey masks without classes.yaml holding more distinct values than this (over the dataset) are not index masks
MAX_GREY_VALUES = 32


# --- prepare: from a user's folder of images and masks ------------------------------------------------------


@dataclass
class Pair:
    image: Path
    mask: Path

    @property
    def name(self) -> str:
        return self.image.name


MASK_SUFFIX_RE = re.compile(r"[_-](mask|label|labels|annot|gt)$", re.IGNORECASE)


def mask_files_by_stem(folder: str | Path) -> dict[str, Path]:
    """Image files of a folder keyed by stem (a `_mask`-like suffix dropped); two files for one stem is an error."""
    folder = Path(folder)
    files: dict[str, Path] = {}
    for p in _image_files(folder):
        stem = MASK_SUFFIX_RE.sub("", p.stem)
        if stem in files:
            raise InputError(p, f"two files for the stem '{stem}' ({files[stem].name})")
        files[stem] = p
    if not files:
        raise InputError(folder, "no mask files found (.png, .tif, .jpg, .bmp)")
    return files


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def find_pairs(images: str | Path, masks: str | Path | None = None, skip_unpaired: bool = False,
               skipped: list[Path] | None = None) -> list[Pair]:
    """Pair micrographs with masks.

    One folder: masks are named ``<stem>_mask.<ext>``. Two folders: paired by stem, where a mask stem may
    carry a ``_mask`` suffix. Unpaired images or masks are errors naming the file.
    """
    images = Path(images)
    if not images.is_dir():
        raise InputError(images, "images folder not found")
    if masks is None:
        files = _image_files(images)
        mask_files = [p for p in files if MASK_SUFFIX_RE.search(p.stem)]
        image_files = [p for p in files if p not in mask_files]
    else:
        masks = Path(masks)
        if not masks.is_dir():
            raise InputError(masks, "masks folder not found")
        image_files = _image_files(images)
        mask_files = _image_files(masks)
    if not image_files:
        raise InputError(images, "no images found (.tif, .png, .jpg, .bmp)")
    if not mask_files:
        raise InputError(masks or images, "no masks found" + (" (name them <stem>_mask.<ext>)" if masks is None else ""))
    by_stem: dict[str, Path] = {}
    for m in mask_files:
        stem = MASK_SUFFIX_RE.sub("", m.stem) if masks is None or MASK_SUFFIX_RE.search(m.stem) else m.stem
        if stem in by_stem:
            raise InputError(m, f"two masks for the same image stem '{stem}' ({by_stem[stem].name})")
        by_stem[stem] = m
    pairs = []
    for img in image_files:
        mask = by_stem.pop(img.stem, None)
        if mask is None and skip_unpaired:
            if skipped is not None:
                skipped.append(img)
            continue
        if mask is None:
            raise InputError(img, "no mask for this image" + (" (expected <stem>_mask.<ext>)" if masks is None else " in the masks folder"))
        pairs.append(Pair(img, mask))
    if by_stem and skip_unpaired:
        if skipped is not None:
            skipped.extend(sorted(by_stem.values()))
    elif by_stem:
        orphan = sorted(by_stem.values())[0]
        raise InputError(orphan, "mask has no matching image")
    return pairs


def mask_to_index(mask: np.ndarray, classes: Sequence[ClassInfo] | None, path: str | Path) -> np.ndarray:
    """A mask as stored -> uint8 class indices.

    Index maps (one channel) are used as they are, or through the classes' ``value`` when given. A one-channel
    mask whose values are all class indices, some of them no listed ``value``, is an index map too (the masks
    of a dataset folder next to its ``classes.yaml``), unless a class is the ``default`` or a value is the
    index of another class. Colour masks (RGB/RGBA) are mapped by the classes' colours; the ``default`` class
    takes every other colour, and without one an unlisted colour is an error.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 4:
        mask = mask[:, :, :3]
    if mask.ndim == 3 and mask.shape[2] == 3 and (mask[:, :, 0] == mask[:, :, 1]).all() and (mask[:, :, 1] == mask[:, :, 2]).all():
        if classes is None or not any(_is_colour(c.color) for c in classes):
            mask = mask[:, :, 0]  # an index map stored as grey RGB
    if mask.ndim == 2:
        if np.issubdtype(mask.dtype, np.floating):
            if not np.all(mask == np.round(mask)):
                raise InputError(path, "mask has non-integer values; masks must hold class indices or colours")
        values = mask.astype(np.int64)
        if classes is not None and any(c.value is not None for c in classes):
            if _is_index_map(values, classes):
                return values.astype(np.uint8)
            return _map_values(values, classes, path)
        if values.min() < 0:
            raise InputError(path, "mask has negative values")
        if classes is not None and values.max() >= len(classes):
            raise InputError(path, f"mask value {int(values.max())} >= number of classes {len(classes)}")
        if values.max() > 255:
            raise InputError(path, f"mask value {int(values.max())} is not a class index (a 16-bit image, not a mask?)")
        return values.astype(np.uint8)
    if mask.ndim != 3 or mask.shape[2] != 3:
        raise InputError(path, f"mask has unsupported shape {mask.shape}")
    if classes is None:
        raise InputError(path, "colour mask needs --classes classes.yaml (class names and colours)")
    if mask.dtype == np.uint16:
        mask = np.round(mask.astype(np.float64) / 257.0).astype(np.uint8)  # 16-bit colours -> 8-bit nominal
    elif mask.dtype != np.uint8:
        raise InputError(path, f"colour mask of type {mask.dtype} is not supported")
    code = (mask[..., 0].astype(np.int64) << 16) | (mask[..., 1].astype(np.int64) << 8) | mask[..., 2]
    out = np.full(code.shape, -1, dtype=np.int64)
    for index, c in enumerate(classes):
        out[code == ((c.color[0] << 16) | (c.color[1] << 8) | c.color[2])] = index
    unknown = out < 0
    if unknown.any():
        default = [i for i, c in enumerate(classes) if c.default]
        if default:
            out[unknown] = default[0]
        else:
            ys, xs = np.nonzero(unknown)
            r, g, b = mask[ys[0], xs[0]]
            n = len(np.unique(code[unknown]))
            raise InputError(path, f"mask colour ({r}, {g}, {b}) at pixel (y={ys[0]}, x={xs[0]}) is not in classes.yaml"
                             f" ({n} unknown colour{'s' if n > 1 else ''}; add them or mark one class 'default: true')")
    return out.astype(np.uint8)


def _is_colour(color: Sequence[int]) -> bool:
    return not (color[0] == color[1] == color[2])


def _is_index_map(values: np.ndarray, classes: Sequence[ClassInfo]) -> bool:
    """An index mask given with classes that list grey values: see :func:`mask_to_index`."""
    if values.size == 0 or any(c.default for c in classes) or _values_clash(classes):
        return False
    distinct = np.unique(values)
    listed = [c.value for c in classes if c.value is not None]
    return bool(distinct[0] >= 0 and distinct[-1] < len(classes) and not np.isin(distinct, listed).all())


def _map_values(values: np.ndarray, classes: Sequence[ClassInfo], path: str | Path) -> np.ndarray:
    out = np.full(values.shape, -1, dtype=np.int64)
    for index, c in enumerate(classes):
        if c.value is not None:
            out[values == c.value] = index
    unknown = out < 0
    if unknown.any():
        default = [i for i, c in enumerate(classes) if c.default]
        if not default:
            v = int(values[unknown][0])
            raise InputError(path, f"mask value {v} is not a 'value' in classes.yaml")
        out[unknown] = default[0]
    return out.astype(np.uint8)


def normalise_image(array: np.ndarray, path: str | Path, channels: str = "auto",
                    intensity_range: tuple[float, float] | str = "auto") -> np.ndarray:
    """A micrograph as stored -> uint8 or uint16 ``(H, W)`` grey or ``(H, W, 3)`` RGB, ready to write.

    8-bit images keep their values. 16-bit images stay 16-bit and are stretched from their actual range
    (``auto``), kept as they are (``full``) or stretched from a given ``(lo, hi)``: never truncated to 8 bits.
    ``channels``: ``auto`` (grey when R=G=B), ``grey`` or ``rgb``.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]  # alpha carries no micrograph information
    if array.ndim == 3 and array.shape[2] == 2:
        array = array[:, :, 0]  # grey + alpha
    if array.ndim == 3 and array.shape[2] != 3:
        raise InputError(path, f"image has {array.shape[2]} channels (expected 1, 3 or 4)")
    is_grey = array.ndim == 2 or ((array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all())
    if channels == "grey" or (channels == "auto" and is_grey):
        if array.ndim == 3:
            array = array[..., 0] if is_grey else (array.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(array.dtype)
    elif channels == "rgb" and array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.dtype == np.uint8:
        if isinstance(intensity_range, tuple):
            return _stretch(array, intensity_range, np.uint8)
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16 or np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
        if intensity_range == "full":
            if array.dtype == np.uint16:
                return array
            if np.issubdtype(array.dtype, np.floating):
                return _stretch(array, (0.0, 1.0), np.uint16)
            info = np.iinfo(array.dtype)
            return _stretch(array, (float(info.min), float(info.max)), np.uint16)
        if intensity_range == "auto":
            lo, hi = float(np.min(array)), float(np.max(array))
            if hi <= lo:
                raise InputError(path, "image is constant (no contrast to keep)")
            return _stretch(array, (lo, hi), np.uint16)
        return _stretch(array, intensity_range, np.uint16)
    raise InputError(path, f"unsupported image type {array.dtype}")


def _stretch(array: np.ndarray, rng: tuple[float, float], dtype) -> np.ndarray:
    lo, hi = rng
    top = float(np.iinfo(dtype).max)
    scaled = (array.astype(np.float64) - lo) / max(hi - lo, 1e-12)
    return (np.clip(scaled, 0, 1) * top + 0.5).astype(dtype)


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every ``stride`` px, plus one flush with the far edge so all pixels are covered."""
    if tile > length:
        raise ValueError("tile larger than image")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def read_split_file(path: str | Path, split_set: str | None = None) -> dict[str, str]:
    """Split file -> ``{image stem: split}``.

    Accepts ``{split: [names...]}`` (YAML or JSON), or the NASA benchmark style ``{set: {split: [...]}}``
    together with ``split_set``. Names may be file names or stems; ``*_annot`` lists are ignored.
    """
    path = Path(path)
    data = read_yaml(path)  # JSON is YAML
    if not isinstance(data, dict) or not data:
        raise InputError(path, "split file must map split names to lists of image names")
    if all(isinstance(v, dict) for v in data.values()):
        if split_set is None:
            raise InputError(path, f"split file holds several split sets; choose one with --split-set ({', '.join(data)})")
        if split_set not in data:
            raise InputError(path, f"no split set '{split_set}' (choose from {', '.join(data)})")
        data = data[split_set]
    out: dict[str, str] = {}
    for split_name, names in data.items():
        if split_name.endswith("_annot"):
            continue
        if not isinstance(names, list):
            raise InputError(path, f"split '{split_name}' must be a list of image names")
        for name in names:
            stem = Path(str(name)).stem
            if stem in out and out[stem] != split_name:
                raise InputError(path, f"image '{name}' is in two splits ({out[stem]}, {split_name})")
            out[stem] = split_name
    return out


def assign_splits(sources: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Random split of source images (not tiles) into train/val/test; every split non-empty when possible."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError("--val/--test", "fractions must be >= 0 and add up to less than 1")
    order = list(sources)
    np.random.default_rng(seed).shuffle(order)
    n = len(order)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
    n_test = min(n_test, max(n - 1, 0))
    n_val = min(n_val, max(n - 1 - n_test, 0))
    out = {}
    for i, s in enumerate(order):
        out[s] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


@dataclass
class PrepareOptions:
    images: Path
    out: Path
    masks: Path | None = None
    classes: Path | None = None
    tile: int | None = None
    stride: int | None = None
    min_classes: int = 1
    max_images: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    splits: Path | None = None
    split_set: str | None = None
    seed: int = 0
    quality: str = ""
    channels: str = "auto"
    intensity_range: tuple[float, float] | str = "auto"
    num_classes: int | None = None
    overwrite: bool = False
    skip_unpaired: bool = False


def prepare(opts: PrepareOptions, progress: bool = True) -> dict[str, Any]:
    """Build a dataset folder from a folder of micrographs and masks. Returns a summary (counts, fractions).

    Grey masks without classes (no classes.yaml, no ``num_classes``) that do not hold the class indices
    0..C-1 have their distinct values, over the whole dataset, mapped to classes 0..C-1 in increasing order;
    the classes record them as ``value`` and the summary's ``grey_values`` lists them. More than
    ``MAX_GREY_VALUES`` distinct values is an error (not index masks).
    """
    skipped: list[Path] = []
    pairs = find_pairs(opts.images, opts.masks, opts.skip_unpaired, skipped)
    if not pairs:
        raise InputError(opts.images, "no image has a mask")
    classes = read_classes(opts.classes) if opts.classes is not None else None
    if opts.splits is not None:
        split_of = read_split_file(opts.splits, opts.split_set)
        unknown = [n for n in split_of if n not in {p.image.stem for p in pairs}]
        pairs = [p for p in pairs if p.image.stem in split_of]
        if not pairs:
            raise InputError(opts.splits, "no image of the folder is named in the split file")
        if unknown and len(unknown) == len(split_of):
            raise InputError(opts.splits, f"image '{unknown[0]}' named in the split file is not in the folder")
    else:
        split_of = None
    if opts.max_images is not None:
        if opts.max_images < 1:
            raise InputError("--max-images", "must be at least 1")
        pairs = pairs[: opts.max_images]
    if opts.tile is not None and opts.tile < 8:
        raise InputError("--tile", "tiles must be at least 8 px")
    stride = opts.stride or opts.tile
    if opts.stride is not None and opts.tile is None:
        raise InputError("--stride", "needs --tile")
    if stride is not None and stride < 1:
        raise InputError("--stride", "must be at least 1")
    if split_of is None:
        split_of = assign_splits([p.image.stem for p in pairs], opts.val_fraction, opts.test_fraction, opts.seed)

    # first pass: read and check everything, so bad input fails before anything is written
    loaded = []
    want_rgb = False
    max_index = 0
    collect_values = classes is None and opts.num_classes is None
    seen = np.zeros(256, dtype=bool)  # grey values met so far (mask_to_index returns uint8)
    for pair in progress_bar(pairs, enabled=progress, desc="reading", leave=False):
        image = read_image(pair.image)
        mask_raw = read_image(pair.mask)
        if image.shape[:2] != mask_raw.shape[:2]:
            raise InputError(pair.mask, f"mask size {mask_raw.shape[1]}x{mask_raw.shape[0]} differs from image size {image.shape[1]}x{image.shape[0]}")
        mask = mask_to_index(mask_raw, classes, pair.mask)
        if opts.num_classes is not None and mask.max() >= opts.num_classes:
            raise InputError(pair.mask, f"mask value {int(mask.max())} >= number of classes {opts.num_classes}")
        max_index = max(max_index, int(mask.max()))
        if collect_values:
            seen[np.unique(mask)] = True
            if seen.sum() > MAX_GREY_VALUES:
                raise InputError(pair.mask, f"masks hold more than {MAX_GREY_VALUES} distinct grey values (this one "
                                 "included): not index masks; give classes and their values in a classes.yaml (--classes)")
        if opts.tile is not None and (opts.tile > image.shape[0] or opts.tile > image.shape[1]):
            raise InputError(pair.image, f"tile {opts.tile} px is larger than the image ({image.shape[1]}x{image.shape[0]})")
        if opts.channels == "rgb" or (opts.channels == "auto" and image.ndim == 3 and image.shape[2] >= 3 and not (
                (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())):
            want_rgb = True
        loaded.append((pair, image, mask))
    channels = "rgb" if want_rgb else "grey"
    grey_values = np.flatnonzero(seen).tolist()
    remap = collect_values and grey_values != list(range(len(grey_values)))
    if remap:
        lut = np.zeros(256, dtype=np.uint8)
        lut[grey_values] = np.arange(len(grey_values))
        loaded = [(pair, image, lut[mask]) for pair, image, mask in loaded]
        classes = default_classes(max(len(grey_values), 2))
        for c, v in zip(classes, grey_values):
            c.value = v
    elif classes is None:
        classes = default_classes(opts.num_classes or max(max_index + 1, 2))

    counts = np.zeros(len(classes), dtype=np.int64)
    per_split: dict[str, int] = {}
    dropped = 0
    with DatasetWriter(opts.out, classes, overwrite=opts.overwrite) as writer:
        for pair, image, mask in progress_bar(loaded, enabled=progress, desc="tiling"):
            image = normalise_image(image, pair.image, channels, opts.intensity_range)
            split_name = split_of[pair.image.stem]
            h, w = mask.shape
            if opts.tile is None:
                origins = [(0, 0)]
                size_y, size_x = h, w
            else:
                origins = [(y, x) for y in tile_origins(h, opts.tile, stride) for x in tile_origins(w, opts.tile, stride)]
                size_y = size_x = opts.tile
            for y, x in origins:
                tile_mask = mask[y : y + size_y, x : x + size_x]
                if len(np.unique(tile_mask)) < opts.min_classes:
                    dropped += 1
                    continue
                name = pair.image.stem if opts.tile is None else f"{pair.image.stem}_y{y}_x{x}"
                writer.add(name, image[y : y + size_y, x : x + size_x], tile_mask, split_name, pair.image.name,
                           y, x, "real", opts.quality)
                counts += np.bincount(tile_mask.ravel(), minlength=len(classes))[: len(classes)]
                per_split[split_name] = per_split.get(split_name, 0) + 1
    fractions = counts / max(counts.sum(), 1)
    return {
        "images": len(loaded),
        "skipped_unpaired": [str(p) for p in skipped],
        "tiles": sum(per_split.values()),
        "tiles_per_split": per_split,
        "dropped_tiles": dropped,
        "bit_depth": 16 if any(img.dtype != np.uint8 for _, img, _ in loaded) else 8,
        "channels": 3 if want_rgb else 1,
        "class_fractions": {c.name: float(f) for c, f in zip(classes, fractions)},
        # grey values mapped to classes 0..C-1 (empty when the masks held class indices or classes were given)
        "grey_values": grey_values if remap else [],
        "grey_values_in_classes_yaml": remap and not _values_clash(classes),
    }


def parse_intensity_range(text: str | None) -> tuple[float, float] | str:
    if text is None or text in ("auto", "full"):
        return text or "auto"
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError("--intensity-range", f"'{text}' is not auto, full or LO,HI") from None
    if hi <= lo:
        raise InputError("--intensity-range", "HI must be larger than LO")
    return (lo, hi)

