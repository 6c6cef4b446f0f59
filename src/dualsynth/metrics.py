"""Segmentation metrics: confusion matrices, accuracy, IoU, mIoU and the paper's Missing Class IoU.

A functional core in the style of segmentation-models-pytorch and MONAI: every score is a few lines over a
confusion matrix, so accuracy, IoU and Missing Class IoU agree by construction. `SegmentationScores` is the
stateful accumulator for loops over a test set.

Conventions: masks are integer arrays of class indices `0..C-1` (numpy arrays or torch tensors); a confusion
matrix `cm` is `(C, C)` int64 with rows = ground truth and columns = prediction, so `cm[t, p]` counts pixels
of true class `t` predicted as `p`.

Missing Class IoU (paper §4.3.1, Eq. 1, Fig. 14): for one image, the mean IoU over the classes present in the
ground truth. A class predicted but absent from the truth is left out of the mean, yet its pixels still count
as false negatives of the true class they cover.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = [
    "as_mask",
    "confusion_matrix",
    "pixel_accuracy",
    "iou_per_class",
    "mean_iou",
    "image_miou",
    "missing_class_iou_per_class",
    "missing_class_iou",
    "missing_class_iou_from_cm",
    "SegmentationScores",
]


def as_mask(x: Any) -> np.ndarray:
    """Return `x` (numpy array, torch tensor or nested sequence) as an int64 numpy array.

    Torch is not imported here: tensors are recognised by their `detach` method, so metrics stay usable
    (and fast to import) without it.
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ValueError("mask holds non-integer values")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"mask has non-numeric dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def confusion_matrix(pred: Any, target: Any, num_classes: int) -> np.ndarray:
    """Confusion matrix `(C, C)` int64 of one mask pair or a batch: rows = truth, columns = prediction.

    `pred` and `target` must have the same shape and values in `0..num_classes-1` (ValueError otherwise).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    p, t = as_mask(pred), as_mask(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    for name, a in (("prediction", p), ("truth", t)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(
                f"{name} has values in [{a.min()}, {a.max()}], expected 0..{num_classes - 1}"
            )
    # one bincount over t*C+p fills the whole matrix in a single pass
    flat = t.ravel() * num_classes + p.ravel()
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def pixel_accuracy(cm: np.ndarray) -> float:
    """Fraction of pixels whose predicted class equals the true class (nan for an empty matrix)."""
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def _tp_union(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    # union = TP + FP + FN = (column sum) + (row sum) - TP
    return tp, cm.sum(axis=0) + cm.sum(axis=1) - tp


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class, float64 `(C,)`; nan for classes absent from truth and prediction."""
    tp, union = _tp_union(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """mIoU: mean IoU over the classes present in truth or prediction (nan when there are none).

    Given a pooled confusion matrix this is the dataset mIoU; given one image's matrix it is that image's mIoU.
    """
    return _nanmean(iou_per_class(cm))


def image_miou(pred: Any, target: Any, num_classes: int) -> float:
    """mIoU of one image: mean IoU over the classes present in its truth or its prediction."""
    return mean_iou(confusion_matrix(pred, target, num_classes))


def _missing_class_iou_per_class_from_cm(cm: np.ndarray) -> np.ndarray:
    tp, union = _tp_union(cm)
    present = np.asarray(cm).sum(axis=1) > 0  # class occurs in the ground truth
    # present => union >= row sum > 0, so the division is safe where it is kept
    return np.where(present, tp / np.where(union > 0, union, 1), np.nan)


def missing_class_iou_from_cm(cm: np.ndarray) -> float:
    """Missing Class IoU of one image's confusion matrix: mean IoU over classes present in the truth."""
    return _nanmean(_missing_class_iou_per_class_from_cm(cm))


def missing_class_iou_per_class(pred: Any, target: Any, num_classes: int) -> np.ndarray:
    """Per-class IoU of one image, `(C,)` float64, with nan for every class absent from the ground truth.

    Pixels predicted as an absent class still count as false negatives of the true class, so the IoU of the
    classes that are kept is the ordinary IoU.
    """
    return _missing_class_iou_per_class_from_cm(confusion_matrix(pred, target, num_classes))


def missing_class_iou(pred: Any, target: Any, num_classes: int) -> float:
    """The paper's Missing Class IoU of one image (2-D integer masks): mean IoU over the truth's classes.

    Figure 14 of the paper: yellow IoU 1, blue 1/2, background 32/34, green (predicted, absent from truth)
    left out, so the score is (1 + 1/2 + 32/34) / 3.
    """
    return missing_class_iou_from_cm(confusion_matrix(pred, target, num_classes))


def _nanmean(a: np.ndarray) -> float:
    """Mean ignoring nan; nan (without numpy's RuntimeWarning) when every entry is nan."""
    return float(_nanmean_columns(np.asarray(a, dtype=np.float64).reshape(-1, 1))[0])


def _nanmean_columns(a: np.ndarray) -> np.ndarray:
    """Column means ignoring nan; nan where a column is all nan (without numpy's RuntimeWarning)."""
    valid = ~np.isnan(a)
    n = valid.sum(axis=0)
    s = np.where(valid, a, 0.0).sum(axis=0)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


class SegmentationScores:
    """Accumulates (prediction, truth) pairs image by image and reduces to the paper's scores.

    Example::

        scores = SegmentationScores(num_classes=3, class_names=["matrix", "a", "b"])
        for name, pred, truth in pairs:
            scores.update(pred, truth, name=name)
        scores.summary()   # accuracy, dataset mIoU, mean image mIoU, Missing Class IoU, per-class values
        scores.rows()      # one dict per image, for a CSV

    Reductions:
      - `pixel_accuracy`, `miou`, `iou_per_class`: from the confusion matrix pooled over all images;
      - `mean_image_miou`: per-image mIoU averaged over images;
      - `missing_class_iou`: per-image Missing Class IoU averaged over images;
      - `missing_class_iou_per_class[c]`: mean over the images whose truth contains c of that image's IoU of c.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is None:
            class_names = [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self._names: list[str] = []
        self._cms: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._cms)

    def update(self, pred: Any, target: Any, name: str | None = None) -> dict[str, Any]:
        """Add one image (2-D masks, or any equal shapes counted as one image); return its CSV row."""
        cm = confusion_matrix(pred, target, self.num_classes)
        self.confusion += cm
        self._cms.append(cm)
        self._names.append(name if name is not None else str(len(self._names)))
        return self._row(self._names[-1], cm)

    def _row(self, name: str, cm: np.ndarray) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": name,
            "pixels": int(cm.sum()),
            "pixel_accuracy": pixel_accuracy(cm),
            "miou": mean_iou(cm),
            "missing_class_iou": missing_class_iou_from_cm(cm),
        }
        # per-class IoU of this image, nan (empty CSV cell) when the class is not in its truth
        for cname, v in zip(self.class_names, _missing_class_iou_per_class_from_cm(cm)):
            row[f"iou_{cname}"] = float(v)
        return row

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image: name, pixels, pixel_accuracy, miou, missing_class_iou, iou_<class>..."""
        return [self._row(n, cm) for n, cm in zip(self._names, self._cms)]

    def summary(self) -> dict[str, Any]:
        """Reduced scores over every image seen (floats; nan where undefined, e.g. no images)."""
        n = len(self._cms)
        if n:
            per_image_mci = np.array([missing_class_iou_from_cm(cm) for cm in self._cms])
            per_image_miou = np.array([mean_iou(cm) for cm in self._cms])
            per_class = np.stack([_missing_class_iou_per_class_from_cm(cm) for cm in self._cms])
            mci_per_class = _nanmean_columns(per_class)
            images_with_class = (~np.isnan(per_class)).sum(axis=0)
        else:
            per_image_mci = per_image_miou = np.array([np.nan])
            mci_per_class = np.full(self.num_classes, np.nan)
            images_with_class = np.zeros(self.num_classes, dtype=np.int64)
        iou = iou_per_class(self.confusion)
        return {
            "num_images": n,
            "pixels": int(self.confusion.sum()),
            "pixel_accuracy": pixel_accuracy(self.confusion),
            "miou": mean_iou(self.confusion),
            "mean_image_miou": _nanmean(per_image_miou),
            "missing_class_iou": _nanmean(per_image_mci),
            "iou_per_class": {c: float(v) for c, v in zip(self.class_names, iou)},
            "missing_class_iou_per_class": {c: float(v) for c, v in zip(self.class_names, mci_per_class)},
            "images_with_class": {c: int(v) for c, v in zip(self.class_names, images_with_class)},
            # pooled pixel shares: what the model predicts against what the truth holds (trivial_prediction)
            "predicted_fraction": {c: float(v) for c, v in zip(self.class_names, _shares(self.confusion.sum(axis=0)))},
            "true_fraction": {c: float(v) for c, v in zip(self.class_names, _shares(self.confusion.sum(axis=1)))},
        }


TRIVIAL_SHARE = 0.995


def _shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else np.full(len(counts), np.nan)


def trivial_prediction(summary: dict[str, Any], share: float = TRIVIAL_SHARE) -> str | None:
    """One line when a model predicts (almost) only one class while the truth holds others: the trivial solution
    a U-Net can settle in on imbalanced data (e.g. all background), which a Missing Class IoU near the class's
    share hides. None otherwise, and for summaries written before these shares were recorded."""
    pred, true = summary.get("predicted_fraction"), summary.get("true_fraction")
    if not pred or not true:
        return None
    name = max(pred, key=lambda c: -1.0 if pred[c] is None else pred[c])
    p, t = pred[name], true.get(name)
    if p is None or t is None or p < share or t >= share:
        return None
    return (f"the model predicts '{name}' for {100 * p:.1f} % of the pixels (truth: {100 * t:.1f} %): it has "
            "learned none of the other classes (the trivial solution)")


def format_scores(summary: dict[str, Any], class_names: Sequence[str]) -> str:
    """A `SegmentationScores.summary()` as an aligned terminal table (percentages; '-' where undefined)."""

    def pct(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    width = max(12, *(len(name) for name in class_names))
    lines = [f"{summary['num_images']} images, {summary['pixels']} pixels",
             f"{'class':<{width}}  {'IoU %':>7}  {'Missing Class IoU %':>19}  {'images':>6}"]
    for name in class_names:
        lines.append(f"{name:<{width}}  {pct(summary['iou_per_class'][name]):>7}  "
                     f"{pct(summary['missing_class_iou_per_class'][name]):>19}  {summary['images_with_class'][name]:>6}")
    lines += [f"pixel accuracy      {pct(summary['pixel_accuracy']):>6} %",
              f"mIoU (dataset)      {pct(summary['miou']):>6} %",
              f"mIoU (per image)    {pct(summary['mean_image_miou']):>6} %",
              f"Missing Class IoU   {pct(summary['missing_class_iou']):>6} %"]
    trivial = trivial_prediction(summary)
    if trivial:
        lines.append(f"warning: {trivial}")
    return "\n".join(lines)
