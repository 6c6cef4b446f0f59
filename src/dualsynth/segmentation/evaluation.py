"""Scoring segmentations with the paper's metrics (pixel accuracy, mIoU, Missing Class IoU, per class and per
image): a model on a split of a dataset folder (`evaluate`, `evaluate_run`), or folders of mask files
(`evaluate_mask_folders`); the CSV/JSON files, overlays (paper Figs. 18, 21) and the terminal table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from dualsynth.data import ClassInfo, DatasetFolder, colorize_mask
from dualsynth.errors import InputError
from dualsynth.io import progress_bar, save_figure, save_png, to_uint8, write_csv, write_json
from dualsynth.metrics import SegmentationScores, format_scores
from dualsynth.segmentation.data import TileCache, same_size_groups
from dualsynth.segmentation.model import UNetConfig, checkpoint_info, load_segmenter, predict_batch


@dataclass
class EvaluationResult:
    """Scores of a model on a set of tiles: per-image rows, the summary, and a few examples for figures."""

    classes: list[ClassInfo]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    examples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _check_model_fits(model: Any, folder: DatasetFolder) -> None:
    config = getattr(model, "config", None)
    if not isinstance(config, UNetConfig):
        return
    names = [c["name"] for c in config.classes]
    if names != folder.class_names:
        raise InputError(folder.path, f"dataset classes {folder.class_names} differ from the model's {names}")
    if folder.image_channels != config.in_channels:
        raise InputError(folder.path, f"images have {folder.image_channels} channel(s), the model takes {config.in_channels}")


def evaluate(
    model: Any,
    folder: DatasetFolder | str | Path,
    split: str | None = "test",
    *,
    batch_size: int = 4,
    keep_examples: int = 0,
    reference: Literal["truth", "prediction"] = "truth",
    progress: bool = False,
) -> EvaluationResult:
    """Segment every tile of `split` (None: all tiles) and score the predictions against the masks.

    `model`: a U-Net from `load_segmenter`, or any callable from (B, C, H, W) images to (B, K, H, W) logits.
    `reference="prediction"` swaps the roles (the pre-test: the model's prediction is the reference the
    dataset's masks are scored against). `keep_examples` keeps the first N (name, image, truth, prediction).
    """
    folder = folder if isinstance(folder, DatasetFolder) else DatasetFolder(folder)
    _check_model_fits(model, folder)
    records = folder.records(split=split)
    if not records:
        raise InputError(folder.path, f"no tiles in split '{split}' (splits: {', '.join(folder.splits)})")
    scores = SegmentationScores(folder.num_classes, folder.class_names)
    cache = TileCache([(folder, r) for r in records])
    shapes = [cache[i][1].shape for i in range(len(cache))]
    rows: list[dict[str, Any]] = []
    examples = []
    groups = same_size_groups(range(len(cache)), shapes, batch_size)
    for group in progress_bar(groups, enabled=progress, desc="segmenting", unit="batch", leave=False):
        x = torch.from_numpy(np.stack([np.moveaxis(cache[i][0], -1, 0) for i in group])).float()
        preds = predict_batch(model, x)
        for i, pred in zip(group, preds):
            image, truth = cache[i]
            rec = records[i]
            scored, ref = (pred, truth) if reference == "truth" else (truth, pred)
            row = scores.update(scored, ref, name=rec.file)
            rows.append({"file": row.pop("name"), "split": rec.split, "origin": rec.origin, **row})
            if len(examples) < keep_examples:
                examples.append((rec.file, image, truth, pred))
    summary = scores.summary()
    info = {"data": str(folder.path), "split": split, "reference": reference, "tiles": len(records)}
    return EvaluationResult(list(folder.classes), rows, summary, examples, info)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _blank_nan(value: Any) -> Any:
    # nan means "not defined here" (class absent from the image's truth): an empty CSV cell says so plainly
    return "" if isinstance(value, float) and math.isnan(value) else value


def per_class_rows(result: EvaluationResult) -> list[dict[str, Any]]:
    """One row per class: pooled IoU, Missing Class IoU (mean over images showing the class), image count."""
    s = result.summary
    return [
        {
            "class": c.name,
            "iou": s["iou_per_class"][c.name],
            "missing_class_iou": s["missing_class_iou_per_class"][c.name],
            "images_with_class": s["images_with_class"][c.name],
        }
        for c in result.classes
    ]


def write_evaluation(result: EvaluationResult, out: str | Path, overlays: int = 0, title: str = "",
                     figure_name: str = "overlays.png", figure_columns: Sequence[str] = ("image", "true mask", "prediction")) -> dict[str, Path]:
    """Write per_image.csv, per_class.csv, summary.json and, for `overlays` > 0, overlays/NAME.png strips
    (image | true mask | prediction | prediction over the image) plus one figure of the first tiles."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_image": out / "per_image.csv", "per_class": out / "per_class.csv", "summary": out / "summary.json"}
    write_csv(paths["per_image"], [{k: _blank_nan(v) for k, v in r.items()} for r in result.rows])
    write_csv(paths["per_class"], [{k: _blank_nan(v) for k, v in r.items()} for r in per_class_rows(result)])
    if overlays > 0 and result.examples:
        for name, image, truth, pred in result.examples[:overlays]:
            save_png(out / "overlays" / f"{Path(name).stem}.png", overlay_strip(image, truth, pred, result.classes))
        paths["figure"] = out / figure_name
        draw_examples(paths["figure"], result, overlays, title, figure_columns)
    # summary.json is written last: its presence means the evaluation is complete (the study relies on it)
    write_json(paths["summary"], {**result.info, **_nan_to_none(result.summary)})
    return paths


def image_rgb(image: np.ndarray) -> np.ndarray:
    """Float (H, W, C) image in [0, 1] -> RGB uint8 for figures (grey repeated, extra channels dropped)."""
    rgb = to_uint8(image)
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    return np.repeat(rgb[..., :1], 3, axis=-1) if rgb.shape[-1] != 3 else rgb


def overlay(image: np.ndarray, mask: np.ndarray, classes: Sequence[ClassInfo], alpha: float = 0.45) -> np.ndarray:
    """The mask in its classes' colours laid over the micrograph (paper Figs. 18, 21), RGB uint8."""
    base = image_rgb(image).astype(np.float32)
    colours = colorize_mask(mask, classes).astype(np.float32)
    return (base * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8)


def overlay_strip(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, classes: Sequence[ClassInfo]) -> np.ndarray:
    """One row: image | true mask | prediction | prediction over the image, 4 px white gaps."""
    gap = np.full((truth.shape[0], 4, 3), 255, dtype=np.uint8)
    parts = [image_rgb(image), colorize_mask(truth, classes), colorize_mask(pred, classes), overlay(image, pred, classes)]
    out = [parts[0]]
    for p in parts[1:]:
        out += [gap, p]
    return np.concatenate(out, axis=1)


def draw_examples(path: Path, result: EvaluationResult, n: int, title: str = "",
                  columns: Sequence[str] = ("image", "true mask", "prediction")) -> None:
    """A figure of the first n tiles: image, true mask, prediction over the image, with per-tile scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    examples = result.examples[:n]
    rows_by_file = {r["file"]: r for r in result.rows}
    fig, axes = plt.subplots(len(examples), 3, figsize=(7.5, 2.7 * len(examples) + 0.6), squeeze=False)
    for k, (row_axes, (name, image, truth, pred)) in enumerate(zip(axes, examples)):
        r = rows_by_file.get(name, {})
        row_axes[0].imshow(image_rgb(image))
        row_axes[1].imshow(colorize_mask(truth, result.classes), interpolation="nearest")
        row_axes[2].imshow(overlay(image, pred, result.classes), interpolation="nearest")
        scores = (f"acc {100 * r.get('pixel_accuracy', float('nan')):.1f}%  "
                  f"MCIoU {100 * r.get('missing_class_iou', float('nan')):.1f}%")
        titles = [name, "", scores]
        if k == 0:  # column headings on the first row
            titles = [f"{head}\n{t}" if t else head for head, t in zip(columns, titles)]
        for ax, t in zip(row_axes, titles):
            ax.set_title(t, fontsize=8)
            ax.axis("off")
    handles = [Patch(color=np.array(c.color) / 255, label=c.name) for c in result.classes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    save_figure(path, fig)


def format_evaluation(result: EvaluationResult) -> str:
    """The summary as an aligned table for the terminal (percentages)."""
    return format_scores(result.summary, [c.name for c in result.classes])


def evaluate_run(run: str | Path, data: str | Path, out: str | Path, split: str | None = "test", overlays: int = 4,
                 device: str = "auto", progress: bool = True) -> EvaluationResult:
    """`dualsynth evaluate`: score a run's best model on a split of a dataset folder and write the results."""
    model = load_segmenter(run, device)
    result = evaluate(model, data, split, keep_examples=overlays, progress=progress)
    result.info.update(model=str(Path(run)), **checkpoint_info(model))
    write_evaluation(result, out, overlays, title=f"{Path(run).name} on {Path(data).name} ({split or 'all'})")
    return result




def evaluate_mask_folders(pred_dir: str | Path, truth_dir: str | Path, classes: Sequence[ClassInfo]) -> EvaluationResult:
    """Score a folder of predicted mask files against a folder of true ones, paired by file stem (`dualsynth
    evaluate-masks`). Masks are index or colour PNG/TIFF; every file must have its partner and its size."""
    from dualsynth.data import mask_files_by_stem, mask_to_index
    from dualsynth.io import read_image

    preds, truths = mask_files_by_stem(pred_dir), mask_files_by_stem(truth_dir)
    for stem, p in preds.items():
        if stem not in truths:
            raise InputError(p, f"no ground-truth mask with this stem in {truth_dir}")
    for stem, t in truths.items():
        if stem not in preds:
            raise InputError(t, f"no predicted mask with this stem in {pred_dir}")
    scores = SegmentationScores(len(classes), [c.name for c in classes])
    rows = []
    for stem in sorted(preds):
        p = mask_to_index(read_image(preds[stem]), classes, preds[stem])
        t = mask_to_index(read_image(truths[stem]), classes, truths[stem])
        if p.shape != t.shape:
            raise InputError(preds[stem], f"size {p.shape[1]}x{p.shape[0]} differs from the truth's "
                             f"{t.shape[1]}x{t.shape[0]} ({truths[stem]})")
        rows.append({"file": preds[stem].name, "truth": truths[stem].name, **scores.update(p, t, name=stem)})
    info = {"pred": str(pred_dir), "truth": str(truth_dir)}
    return EvaluationResult(list(classes), rows, scores.summary(), [], info)
