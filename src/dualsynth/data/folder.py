"""Classes (names, display colours, grey values) and the dataset folder: reading it (`DatasetFolder`) and
writing it atomically (`DatasetWriter`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dualsynth.errors import InputError
from dualsynth.io import read_csv, read_image, read_yaml, save_png, write_csv, write_yaml

MANIFEST_FIELDS = ["file", "split", "source", "tile_y", "tile_x", "origin", "quality"]

# distinct display colours for index masks that come without a classes.yaml
DEFAULT_PALETTE = [
    (0, 0, 0), (255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (128, 0, 255), (128, 128, 128), (128, 64, 0), (255, 255, 255),
]



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


