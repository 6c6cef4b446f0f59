"""The runs a study config describes, and where each one lives on disk.

`plan_runs` expands a `StudyConfig` into one `StudyRun` per U-Net (base x percentage x synthetic set, and the
synthetic-only sizes, for every seed). Run ``NAME`` is a `train-seg` run folder ``STUDY/runs/NAME`` (`run_dir`)
with its test-set evaluation in ``STUDY/runs/NAME/evaluation``; it counts as finished when that evaluation's
``summary.json`` exists (`is_finished`). The runner and the report both read the study folder through these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dualsynth.study.config import StudyConfig

EVALUATION = "evaluation"  # a run's evaluation subfolder


@dataclass
class StudyRun:
    """One U-Net of the study."""

    name: str
    series: str  # what the figures group by: the base (+ synthetic set), or '<synthetic>-only'
    base: str | None
    synthetic_set: str | None
    percent: float | None
    synthetic_only: int | None
    seed: int
    train: str | None
    val: str
    synthetic: str | None


def _pct_label(p: float) -> str:
    return f"{int(p):03d}" if float(p).is_integer() else f"{p:07.3f}".rstrip("0")


def plan_runs(config: StudyConfig) -> list[StudyRun]:
    """Every run of the study, seed by seed (so a partial study holds whole sweeps), with readable names:
    ``HQ-050pct-seed0``, ``HQ-000pct-seed0`` (the base model), ``synthetic-only-24-seed0``."""
    several = len(config.synthetic) > 1
    runs: list[StudyRun] = []
    for seed in config.seeds:
        for base, path in config.bases.items():
            for p in config.percentages:
                sets = [None] if p == 0 else list(config.synthetic)
                for s in sets:
                    series = base if not several or s is None else f"{base}+{s}"
                    label = base if s is None or not several else f"{base}-{s}"
                    runs.append(StudyRun(
                        name=f"{label}-{_pct_label(p)}pct-seed{seed}", series=series, base=base, synthetic_set=s,
                        percent=float(p), synthetic_only=None, seed=seed, train=str(path), val=str(path),
                        synthetic=None if s is None else str(config.synthetic[s]),
                    ))
        for s, spath in config.synthetic.items():
            for n in config.synthetic_only:
                runs.append(StudyRun(
                    name=f"{s}-only-{n}-seed{seed}", series=f"{s}-only", base=None, synthetic_set=s, percent=None,
                    synthetic_only=n, seed=seed, train=None, val=str(config.bases[config.val_base]), synthetic=str(spath),
                ))
    return runs


def run_dir(out: str | Path, name: str) -> Path:
    return Path(out) / "runs" / name


def is_finished(out: str | Path, name: str) -> bool:
    return (run_dir(out, name) / EVALUATION / "summary.json").is_file()
