"""File input/output with atomic writes.

Every file dualsynth writes goes through :func:`atomic_path`: the content is written to a temporary file in the
same folder and renamed over the target, so a killed run never leaves a half-written checkpoint or image.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import yaml

from dualsynth.errors import InputError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write strict JSON: NaN and infinities (e.g. the IoU of an absent class) become null."""
    write_text(path, json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def write_yaml(path: str | Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(_plain(obj), sort_keys=False))


def _plain(obj: Any) -> Any:
    """Turn numpy scalars, tuples and paths into types YAML writes plainly."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise InputError(path, f"not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a text file") from None


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], fieldnames: list[str] | None = None) -> None:
    rows = list(rows)
    if fieldnames is None:
        fieldnames = []
        for row in rows:
            fieldnames.extend(k for k in row if k not in fieldnames)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k, "")) for k in fieldnames})
    write_text(path, buf.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, np.floating):
        return f"{float(value):.6g}"
    return value


def read_csv(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def append_csv_row(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one row to a CSV log, rewriting it atomically (logs are small; this keeps them whole)."""
    path = Path(path)
    rows = read_csv(path) if path.exists() else []
    rows.append({k: _csv_value(v) for k, v in row.items()})
    write_csv(path, rows)


# --- images -------------------------------------------------------------------------------------------------


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as stored: ``(H, W)`` or ``(H, W, C)``, dtype kept (uint8, uint16, float...).

    TIFF goes through tifffile (16-bit kept), 16-bit colour PNG through pypng, everything else through Pillow. Unreadable, empty or corrupt
    files raise :class:`InputError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        elif suffix == ".png" and _png_is_16bit_colour(path):
            import png  # Pillow reads 16-bit RGB(A) PNGs as 8-bit; pypng keeps the 16 bits

            width, height, rows, info = png.Reader(filename=str(path)).asDirect()
            array = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, info["planes"])
        else:
            from PIL import Image

            with Image.open(path) as img:
                img.load()
                if img.mode == "P":
                    # palette images: class-index masks are stored this way by many labelling tools
                    array = np.asarray(img)
                elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                    array = np.asarray(img).astype(np.uint16 if img.mode.startswith("I;16") else np.int32)
                else:
                    array = np.asarray(img)
    except InputError:
        raise
    except Exception as exc:  # any decoder failure means the file is not a readable image
        raise InputError(path, f"cannot read image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None
    array = np.asarray(array)
    # some TIFFs store (1, H, W) or (C, H, W) planar; bring channels last when unambiguous
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or array.size == 0:
        raise InputError(path, f"unsupported image shape {tuple(array.shape)}")
    return array


def _png_is_16bit_colour(path: Path) -> bool:
    """Whether a PNG holds 16-bit RGB or RGBA pixels (colour types 2 and 6 at bit depth 16), from its header."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16 and head[25] in (2, 6)


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 or uint16 array (grey ``(H, W)`` or ``(H, W, 3|4)``) as PNG, atomically."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype == np.uint16:
        if array.ndim != 2:
            # Pillow writes 16-bit grey but not 16-bit RGB(A) PNG; pypng writes every PNG colour type
            import png

            h, w, c = array.shape
            if c not in (3, 4):
                raise TypeError(f"save_png takes (H, W), (H, W, 3) or (H, W, 4) arrays, got {array.shape}")
            writer = png.Writer(width=w, height=h, greyscale=False, alpha=c == 4, bitdepth=16)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                writer.write(fh, array.reshape(h, w * c))
            return
        img = Image.fromarray(array)
    elif array.dtype == np.uint8:
        img = Image.fromarray(array)
    else:
        raise TypeError(f"save_png takes uint8 or uint16 arrays, got {array.dtype}")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_figure(path: str | Path, fig: Any, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8 for display."""
    return (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --- torch checkpoints --------------------------------------------------------------------------------------


def save_torch(path: str | Path, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path, map_location: Any = "cpu") -> Any:
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise InputError(path, f"cannot read checkpoint ({type(exc).__name__})") from None


# --- progress -----------------------------------------------------------------------------------------------


def progress_bar(iterable: Any = None, enabled: bool = True, **kwargs: Any):
    """A tqdm progress bar on stderr, shown only on a terminal (logs and pipes stay clean)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
