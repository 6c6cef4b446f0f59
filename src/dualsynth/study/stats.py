"""Paired bootstrap intervals of a study's differences, from the runs' per-tile test scores.

Every U-Net of a study is scored on the same test tiles; each run's ``evaluation/per_image.csv`` holds one row
per tile. A set's score is a ratio of sums over its tiles, so it can be recomputed exactly for any resample:

- Missing Class IoU: the mean over tiles of the tile's Missing Class IoU (tiles where it is undefined left out),
  which is `SegmentationScores.summary()['missing_class_iou']`;
- mean image mIoU: the same over the tiles' mIoU (`mean_image_miou`; the pooled mIoU needs the confusion matrices);
- pixel accuracy: the pixel-weighted mean of the tiles' accuracies, which is the pooled accuracy.

`paired_difference` compares two arms run with the same seeds (units: (draw, seed) pairs): the point estimate
is the mean over units of (score of A - score of B), and the bootstrap resamples the test set's source
micrographs (all tiles of a drawn micrograph; tiles themselves where the test set has fewer than
`MIN_SOURCES`) and, independently, the units, the same draw for both arms. The verdict reads the 95 %
interval only: above 0 "helps", below 0 "hurts", else "no evidence".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MIN_SOURCES = 8  # resample source micrographs when the test set has at least this many
STAT_METRICS = {"missing_class_iou": "Missing Class IoU", "mean_image_miou": "mIoU (per image)",
                "pixel_accuracy": "accuracy"}


@dataclass
class TileScores:
    """One run's per-tile scores, aligned to the study's test tiles: numerator and denominator per tile."""

    num: np.ndarray  # (T,)
    den: np.ndarray  # (T,)

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, str]], files: Sequence[str], metric: str) -> "TileScores":
        by_file = {r["file"]: r for r in rows}
        missing = [f for f in files if f not in by_file]
        if missing:
            raise ValueError(f"per-tile scores lack test tile '{missing[0]}'")
        column = "miou" if metric == "mean_image_miou" else metric
        values = np.array([_float(by_file[f][column]) for f in files])
        if metric == "pixel_accuracy":
            weights = np.array([_float(by_file[f]["pixels"]) for f in files])
        else:
            weights = np.ones(len(files))
        valid = ~np.isnan(values)
        return cls(np.where(valid, values * weights, 0.0), np.where(valid, weights, 0.0))

    def score(self) -> float:
        return float(self.num.sum() / self.den.sum()) if self.den.sum() > 0 else float("nan")


def _float(v: str | float | None) -> float:
    return float("nan") if v is None or v == "" else float(v)


@dataclass
class Interval:
    """A mean (or mean difference) with its bootstrap 95 % interval."""

    mean: float
    low: float
    high: float
    units: int  # (draw, seed) pairs

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)


def verdict(low: float, high: float) -> str:
    """From the 95 % interval only: 'helps' above 0, 'hurts' below 0, else 'no evidence'."""
    if math.isnan(low) or math.isnan(high):
        return "no evidence"
    if low > 0:
        return "helps"
    if high < 0:
        return "hurts"
    return "no evidence"


def resampling_groups(sources: Sequence[str]) -> tuple[np.ndarray, str]:
    """Group index of each test tile for the bootstrap: its source micrograph when there are at least
    MIN_SOURCES of them, else the tile itself; and a phrase saying which."""
    names = sorted(set(sources))
    if len(names) >= MIN_SOURCES:
        index = {n: i for i, n in enumerate(names)}
        return np.array([index[s] for s in sources]), f"the {len(names)} source micrographs of the test set"
    return np.arange(len(sources)), (f"the {len(sources)} test tiles (the test set has only {len(names)} source "
                                     f"micrograph{'s' if len(names) != 1 else ''}, fewer than {MIN_SOURCES})")


def _ratio(weights: np.ndarray, runs: Sequence[TileScores]) -> np.ndarray:
    """(B, U) scores of each unit's run under each row of tile weights (B, T)."""
    num = np.stack([r.num for r in runs], axis=1)  # (T, U)
    den = np.stack([r.den for r in runs], axis=1)
    top, bottom = weights @ num, weights @ den
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)


def bootstrap(a: Sequence[TileScores], b: Sequence[TileScores] | None, groups: np.ndarray, resamples: int = 2000,
              seed: int = 0) -> Interval:
    """Mean over units of score(a) - score(b) (b None: of score(a)) with a 95 % percentile interval; unit u of
    `a` is paired with unit u of `b` (same draw and seed), both scored on the same resampled tiles."""
    if not a:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    if b is not None and len(a) != len(b):
        raise ValueError("paired runs: both arms need the same units")
    rng = np.random.default_rng(seed)
    n_groups = int(groups.max()) + 1
    member = np.zeros((n_groups, len(groups)))
    member[groups, np.arange(len(groups))] = 1.0
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=resamples)  # (B, G)
    weights = np.vstack([np.ones((1, n_groups)), counts]) @ member  # row 0: the original test set
    units = rng.multinomial(len(a), np.full(len(a), 1.0 / len(a)), size=resamples)  # (B, U)
    units = np.vstack([np.ones((1, len(a))), units])
    diff = _ratio(weights, a) - (_ratio(weights, b) if b is not None else 0.0)
    stat = np.nansum(diff * units, axis=1) / np.maximum((units * ~np.isnan(diff)).sum(axis=1), 1)
    low, high = np.nanpercentile(stat[1:], [2.5, 97.5]) if np.isfinite(stat[1:]).any() else (np.nan, np.nan)
    return Interval(float(stat[0]), float(low), float(high), len(a))
