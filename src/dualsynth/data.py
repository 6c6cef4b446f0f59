"""Dataset folders: preparing them from a user's images and masks, reading them, and the joint image.

A dataset folder (written by ``prepare``, ``demo-data`` and ``sample``) holds::

    images/NAME.png   micrograph, 8- or 16-bit, grey or RGB
    masks/NAME.png    uint8 class-index map
    classes.yaml      class names and display colours, in class order (+ source grey values)
    manifest.csv      file, split, source, tile_y, tile_x, origin, quality (+ extra columns)

The joint image of the paper (micrograph channels plus a mask channel) is built by :func:`join` and taken
apart by :func:`split`.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dualsynth.errors import InputError
from dualsynth.io import IMAGE_SUFFIXES, progress_bar, read_csv, read_image, read_yaml, save_png, write_csv, write_yaml

# tifffile logs harmless "shaped series" complaints about ImageJ-style metadata at ERROR level; the pixels read fine
logging.getLogger("tifffile").setLevel(logging.CRITICAL)

MANIFEST_FIELDS = ["file", "split", "source", "tile_y", "tile_x", "origin", "quality"]
MASK_ENCODINGS = ("levels", "onehot")
# grey masks without classes.yaml holding more distinct values than this (over the dataset) are not index masks
MAX_GREY_VALUES = 32

# distinct display colours for index masks that come without a classes.yaml
DEFAULT_PALETTE = [
    (0, 0, 0), (255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (128, 0, 255), (128, 128, 128), (128, 64, 0), (255, 255, 255),
]


# --- the joint image ----------------------------------------------------------------------------------------


def mask_levels(num_classes: int):
    """The grey level of each class in the ``levels`` encoding: class k at k/(C-1)."""
    import torch

    if num_classes < 2:
        raise ValueError("a mask needs at least 2 classes")
    return torch.arange(num_classes, dtype=torch.float32) / (num_classes - 1)


def mask_channels(num_classes: int, encoding: str = "levels") -> int:
    if encoding not in MASK_ENCODINGS:
        raise ValueError(f"unknown mask encoding '{encoding}' ({', '.join(MASK_ENCODINGS)})")
    return 1 if encoding == "levels" else num_classes


def join_pair(image, mask, num_classes: int, encoding: str = "levels"):
    """Micrograph + class mask -> the joint float tensor of image channels and mask channel(s).

    ``image``: ``(C, H, W)`` / ``(B, C, H, W)`` tensor or ``(H, W)`` / ``(H, W, C)`` numpy array in [0, 1].
    ``mask``: ``(H, W)`` / ``(B, H, W)`` integer class indices. ``levels`` adds one channel with class k at
    ``k/(C-1)`` (the paper's grey mask); ``onehot`` adds ``C`` channels.
    """
    import torch

    image = _image_tensor(image)
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).long()
    batched = image.dim() == 4
    if mask.dim() != image.dim() - 1 or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} do not match")
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= num_classes):
        raise ValueError(f"mask values must lie in 0..{num_classes - 1}")
    channel_dim = 1 if batched else 0
    if encoding == "levels":
        levels = mask_levels(num_classes).to(image.device)
        mask_part = levels[mask].unsqueeze(channel_dim)
    elif encoding == "onehot":
        mask_part = torch.nn.functional.one_hot(mask, num_classes).to(image.dtype)
        mask_part = mask_part.permute(0, 3, 1, 2) if batched else mask_part.permute(2, 0, 1)
    else:
        raise ValueError(f"unknown mask encoding '{encoding}' ({', '.join(MASK_ENCODINGS)})")
    return torch.cat([image, mask_part.to(image.dtype)], dim=channel_dim)


def split_joint(joint, num_classes: int, encoding: str = "levels"):
    """The joint tensor -> ``(image, mask)``: image channels as they are, mask by nearest level or argmax."""
    import torch

    joint = torch.as_tensor(joint)
    batched = joint.dim() == 4
    channel_dim = 1 if batched else 0
    n_mask = mask_channels(num_classes, encoding)
    n_image = joint.shape[channel_dim] - n_mask
    if n_image < 1:
        raise ValueError(f"joint tensor with {joint.shape[channel_dim]} channels has no image channels")
    image, mask_part = torch.split(joint, [n_image, n_mask], dim=channel_dim)
    if encoding == "levels":
        levels = mask_levels(num_classes).to(joint.device)
        values = mask_part.squeeze(channel_dim).float()
        mask = (values.unsqueeze(-1) - levels).abs().argmin(dim=-1)
    else:
        mask = mask_part.argmax(dim=channel_dim)
    return image, mask


def joint_to_pairs(joint, num_classes: int, encoding: str = "levels") -> list[tuple[np.ndarray, np.ndarray]]:
    """Joint images (B, C, H, W) -> [(image (H, W, C_img) float32 clipped to [0, 1], mask (H, W) int)]."""
    import torch

    out = []
    for x in torch.as_tensor(joint):
        image, mask = split_joint(x, num_classes, encoding)
        image = np.moveaxis(np.asarray(image.detach().cpu(), dtype=np.float32), 0, -1)
        out.append((np.clip(image, 0.0, 1.0), np.asarray(mask)))
    return out


def dihedral(x, k: int, flip: bool, axes: tuple[int, int] = (-2, -1)):
    """`x` (numpy array or torch tensor) rotated k times by 90 degrees in the plane of `axes`, then mirrored
    along the second of them if `flip`: one of the 8 symmetries of a square."""
    import torch

    if isinstance(x, torch.Tensor):
        x = torch.rot90(x, k, dims=axes) if k else x
        return torch.flip(x, dims=(axes[1],)) if flip else x
    x = np.rot90(x, k, axes=axes) if k else x
    return np.flip(x, axis=axes[1]) if flip else x


def random_dihedral(rng: np.random.Generator, *arrays, axes: tuple[int, int] = (-2, -1)) -> tuple:
    """The same random flip/rotation applied to every array (image and mask alike), drawn from `rng`.

    Micrographs have no preferred orientation, so the 8 symmetries of a square are free extra data;
    non-square arrays only take the rotations that keep their shape (0 and 180 degrees).
    """
    k, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
    first = arrays[0]
    if first.shape[axes[0]] != first.shape[axes[1]]:
        k = 2 * (k % 2)
    return tuple(dihedral(a, k, flip, axes) for a in arrays)


def _image_tensor(image):
    import torch

    if isinstance(image, torch.Tensor):
        return image.float()
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        array = np.moveaxis(array, -1, 0)
    return torch.from_numpy(np.ascontiguousarray(array))


# --- classes ------------------------------------------------------------------------------------------------


@dataclass
class ClassInfo:
    """One class: its name, its colour (in input colour masks, and for display), optional grey value."""

    name: str
    color: tuple[int, int, int]
    default: bool = False
    value: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "color": [int(c) for c in self.color]}
        if self.default:
            out["default"] = True
        if self.value is not None:
            out["value"] = int(self.value)
        return out


def read_classes(path: str | Path) -> list[ClassInfo]:
    """Read a ``classes.yaml``: ``classes: [{name, color: [r, g, b], default?: true, value?: int}, ...]``."""
    path = Path(path)
    data = read_yaml(path)
    items = data.get("classes") if isinstance(data, dict) else data
    if isinstance(data, dict):
        unknown = set(data) - {"classes"}
        if unknown:
            raise InputError(path, f"unknown key '{sorted(unknown)[0]}' (expected 'classes')")
    if not isinstance(items, list) or len(items) < 2:
        raise InputError(path, "needs a 'classes' list with at least 2 classes")
    classes: list[ClassInfo] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item:
            raise InputError(path, f"class {i} needs a 'name'")
        unknown = set(item) - {"name", "color", "default", "value"}
        if unknown:
            raise InputError(path, f"class '{item['name']}': unknown key '{sorted(unknown)[0]}'")
        color = item.get("color", DEFAULT_PALETTE[i % len(DEFAULT_PALETTE)])
        if isinstance(color, str):
            color = _parse_hex(path, color)
        if not (isinstance(color, (list, tuple)) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise InputError(path, f"class '{item['name']}': color must be [r, g, b] with 0..255 integers")
        classes.append(ClassInfo(str(item["name"]), tuple(color), bool(item.get("default", False)), item.get("value")))
    if sum(c.default for c in classes) > 1:
        raise InputError(path, "only one class may be 'default: true'")
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise InputError(path, "class names must be unique")
    colors = [c.color for c in classes]
    if len(set(colors)) != len(colors):
        raise InputError(path, "class colours must be unique")
    return classes


def _parse_hex(path: Path, text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"#?([0-9a-fA-F]{6})", text.strip())
    if not m:
        raise InputError(path, f"colour '{text}' is not #rrggbb")
    h = m.group(1)
    return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))


def write_classes(path: str | Path, classes: Sequence[ClassInfo]) -> None:
    """Write a dataset folder's ``classes.yaml``: names, colours and the grey ``value`` each class had in the
    source masks. The folder's masks hold class indices, so values are left out when one of them is the index
    of another class (an index mask could then be read through the values by mistake)."""
    keep_values = not _values_clash(classes)
    write_yaml(path, {"classes": [ClassInfo(c.name, c.color, value=c.value if keep_values else None).to_dict()
                                  for c in classes]})


def _values_clash(classes: Sequence[ClassInfo]) -> bool:
    """True when a class's grey ``value`` is the index of another class."""
    return any(c.value is not None and 0 <= c.value < len(classes) and c.value != i for i, c in enumerate(classes))


def default_classes(num_classes: int) -> list[ClassInfo]:
    """``class0``, ``class1``... in the palette's colours, then in further distinct colours (a dataset folder's
    classes.yaml needs unique colours)."""
    colors = list(DEFAULT_PALETTE[:num_classes])
    k = 0
    while len(colors) < num_classes:
        n = (k * 2654435761 + 0x5A5A5A) % (1 << 24)  # an odd multiplier visits every 24-bit colour once
        k += 1
        color = (n >> 16, (n >> 8) & 255, n & 255)
        if color not in colors:
            colors.append(color)
    return [ClassInfo(f"class{i}", color) for i, color in enumerate(colors)]


def colorize_mask(mask: np.ndarray, classes: Sequence[ClassInfo]) -> np.ndarray:
    """Index mask -> RGB uint8 image in the classes' colours (for figures)."""
    palette = np.array([c.color for c in classes], dtype=np.uint8)
    return palette[np.clip(np.asarray(mask), 0, len(classes) - 1)]


# --- reading a dataset folder -------------------------------------------------------------------------------


@dataclass
class TileRecord:
    """One row of a dataset folder's manifest."""

    file: str
    split: str
    source: str
    tile_y: int = 0
    tile_x: int = 0
    origin: str = "real"
    quality: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        row = {k: getattr(self, k) for k in MANIFEST_FIELDS}
        row.update(self.extra)
        return row


class DatasetFolder:
    """A dataset folder on disk (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(self.path, "dataset folder not found")
        for part in ("images", "masks", "classes.yaml", "manifest.csv"):
            if not (self.path / part).exists():
                raise InputError(self.path, f"not a dataset folder (no {part}); create one with 'dualsynth prepare'")
        self.classes = read_classes(self.path / "classes.yaml")
        rows = read_csv(self.path / "manifest.csv")
        missing = [k for k in ("file", "split") if rows and k not in rows[0]]
        if missing:
            raise InputError(self.path / "manifest.csv", f"missing column '{missing[0]}'")
        self._records = [
            TileRecord(
                file=r["file"], split=r.get("split", ""), source=r.get("source", r["file"]),
                tile_y=int(r.get("tile_y") or 0), tile_x=int(r.get("tile_x") or 0),
                origin=r.get("origin") or "real", quality=r.get("quality") or "",
                extra={k: v for k, v in r.items() if k not in MANIFEST_FIELDS},
            )
            for r in rows
        ]
        if not self._records:
            raise InputError(self.path / "manifest.csv", "the dataset has no tiles")
        self._channels: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def splits(self) -> list[str]:
        return sorted({r.split for r in self._records})

    def records(self, split: str | Sequence[str] | None = None, origin: str | None = None) -> list[TileRecord]:
        splits = [split] if isinstance(split, str) else split
        return [
            r for r in self._records
            if (splits is None or r.split in splits) and (origin is None or r.origin == origin)
        ]

    def image_path(self, rec: TileRecord) -> Path:
        return self.path / "images" / rec.file

    def mask_path(self, rec: TileRecord) -> Path:
        return self.path / "masks" / rec.file

    def load_image(self, rec: TileRecord) -> np.ndarray:
        """The micrograph as float32 ``(H, W, C)`` in [0, 1]."""
        return image_to_float(read_image(self.image_path(rec)), self.image_path(rec))

    def load_mask(self, rec: TileRecord) -> np.ndarray:
        path = self.mask_path(rec)
        mask = read_image(path)
        if mask.ndim != 2:
            raise InputError(path, "mask in a dataset folder must be a single-channel index map")
        if mask.max() >= self.num_classes:
            raise InputError(path, f"mask value {int(mask.max())} >= number of classes {self.num_classes}")
        return mask.astype(np.int64)

    @property
    def image_channels(self) -> int:
        if self._channels is None:
            self._channels = self.load_image(self._records[0]).shape[-1]
        return self._channels

    def class_fractions(self, split: str | None = None) -> np.ndarray:
        """Pixel fraction of each class over the tiles of ``split`` (all tiles if None)."""
        counts = np.zeros(self.num_classes, dtype=np.float64)
        for rec in self.records(split):
            counts += np.bincount(self.load_mask(rec).ravel(), minlength=self.num_classes)[: self.num_classes]
        return counts / max(counts.sum(), 1)


def image_to_float(array: np.ndarray, path: str | Path = "image") -> np.ndarray:
    """Stored micrograph -> float32 ``(H, W, C)`` in [0, 1], scaled by its dtype's range."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if np.issubdtype(array.dtype, np.integer):
        scale = float(np.iinfo(array.dtype).max) if array.dtype in (np.uint8, np.uint16) else float(max(array.max(), 1))
        out = array.astype(np.float32) / scale
    else:
        out = array.astype(np.float32)
        if out.min() < 0 or out.max() > 1:
            raise InputError(path, "float image values must lie in [0, 1]")
    return out


class DatasetWriter:
    """Writes a dataset folder in a hidden temporary folder and moves it into place on success.

    Use as a context manager. Nothing in an existing folder is touched unless ``overwrite``; an error inside
    the ``with`` block removes the temporary folder and leaves the target as it was.
    """

    def __init__(self, out: str | Path, classes: Sequence[ClassInfo], overwrite: bool = False):
        self.out = Path(out)
        self.classes = list(classes)
        self.overwrite = overwrite
        if self.out.exists() and not self.out.is_dir():
            raise InputError(self.out, "exists and is not a folder")
        if self.out.exists() and any(self.out.iterdir()) and not overwrite:
            raise InputError(self.out, "output folder is not empty (use --overwrite to replace it)")
        self.records: list[TileRecord] = []
        self._names: set[str] = set()
        self.tmp: Path | None = None

    def __enter__(self) -> "DatasetWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
        (self.tmp / "images").mkdir()
        (self.tmp / "masks").mkdir()
        return self

    def unique_name(self, stem: str, suffix: str = ".png") -> str:
        base = safe_stem(stem)
        name, k = f"{base}{suffix}", 1
        while name in self._names:
            name, k = f"{base}-{k}{suffix}", k + 1
        self._names.add(name)
        return name

    def add(self, name: str, image: np.ndarray, mask: np.ndarray, split: str, source: str, tile_y: int = 0,
            tile_x: int = 0, origin: str = "real", quality: str = "", extra: dict[str, Any] | None = None,
            extra_files: dict[str, np.ndarray] | None = None) -> TileRecord:
        """Add one tile. ``image``: uint8/uint16 as stored, or float in [0, 1] (written as 8-bit).

        ``extra_files``: ``{subfolder: array}`` written as ``subfolder/NAME`` (e.g. raw decoded masks).
        """
        assert self.tmp is not None, "use DatasetWriter as a context manager"
        file = self.unique_name(Path(name).stem)
        image = np.asarray(image)
        if np.issubdtype(image.dtype, np.floating):
            image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{name}: image {image.shape[:2]} and mask {mask.shape} differ in size")
        if mask.size and (mask.min() < 0 or mask.max() >= len(self.classes)):
            raise ValueError(f"{name}: mask values outside 0..{len(self.classes) - 1}")
        save_png(self.tmp / "images" / file, image)
        save_png(self.tmp / "masks" / file, mask.astype(np.uint8))
        row_extra = {k: str(v) for k, v in (extra or {}).items()}
        for sub, array in (extra_files or {}).items():
            (self.tmp / sub).mkdir(exist_ok=True)
            save_png(self.tmp / sub / file, np.asarray(array))
            row_extra.setdefault(sub, f"{sub}/{file}")
        rec = TileRecord(file, split, source, int(tile_y), int(tile_x), origin, quality, row_extra)
        self.records.append(rec)
        return rec

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if not self.records:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise InputError(self.out, "no tiles to write (all were filtered out?)")
        write_classes(self.tmp / "classes.yaml", self.classes)
        extra_keys: list[str] = []
        for rec in self.records:
            extra_keys.extend(k for k in rec.extra if k not in extra_keys)
        write_csv(self.tmp / "manifest.csv", [r.to_row() for r in self.records], MANIFEST_FIELDS + extra_keys)
        if self.out.exists():
            trash = self.out.with_name(f".{self.out.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            self.out.rename(trash)
            self.tmp.rename(self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.tmp.rename(self.out)


def safe_stem(stem: str) -> str:
    """File-name-safe version of an odd source name (spaces, '#', parentheses...)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")
    return cleaned or "image"


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
