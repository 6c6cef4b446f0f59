"""The runs a study config describes, and where each one lives on disk.

`plan_runs` expands a `StudyConfig` into one `StudyRun` per U-Net (base x percentage x synthetic set, and the
synthetic-only sizes, for every seed). Run ``NAME`` is a `train-seg` run folder ``STUDY/runs/NAME`` (`run_dir`)
with its test-set evaluation in ``STUDY/runs/NAME/evaluation``; it counts as finished when that evaluation's
``summary.json`` exists (`is_finished`). The runner and the report both read the study folder through these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dualsynth.study.config import ARM_SEG_OVERRIDES, StudyConfig

EVALUATION = "evaluation"  # a run's evaluation subfolder
GENERATOR_STAGES = ("vqvae", "prior", "sample", "fidelity")


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
    # label-efficiency studies: the budget (`BudgetPlan.name`), its size, the draw, the arm, train-seg overrides
    budget_name: str | None = None
    budget: str | None = None
    images: int | None = None
    draw: int | None = None
    arm: str | None = None
    seg_set: dict[str, Any] = field(default_factory=dict)


@dataclass
class BudgetPlan:
    """One budget of one base and image draw: its training source images, dataset folder and generator."""

    name: str  # HQ-2img-d0, HQ-all
    base: str
    base_path: str
    budget: str  # '2' or 'all'
    draw: int | None  # None for 'all'
    sources: list[str]
    tiles: int  # real training tiles of those images
    dataset: str  # STUDY/budgets/NAME: the chosen train tiles + the base's val split
    generator: str  # STUDY/generators/NAME: vqvae/, prior/, synthetic/, fidelity/
    sample_count: int  # synthetic pairs its generator samples (0: no generator needed)

    @property
    def images(self) -> int:
        return len(self.sources)

    @property
    def synthetic(self) -> str:
        return str(Path(self.generator) / "synthetic")


def _pct_label(p: float) -> str:
    return f"{int(p):03d}" if float(p).is_integer() else f"{p:07.3f}".rstrip("0")


def choose_sources(sources: list[str], n: int, draw: int) -> list[str]:
    """The `n` source images of budget n in draw `draw`: the first n of a seeded permutation of the sorted
    names, so the images of a smaller budget are among those of every larger one (nested subsets)."""
    names = sorted(set(sources))
    order = np.random.default_rng([int(draw), 11]).permutation(len(names))
    return sorted(names[int(i)] for i in order[:n])


def plan_budgets(config: StudyConfig, out: str | Path) -> list[BudgetPlan]:
    """Every budget x image draw of every base of a label-efficiency study (reads the bases' manifests)."""
    from dualsynth.data import DatasetFolder
    from dualsynth.errors import InputError
    from dualsynth.segmentation.data import synthetic_count

    assert config.real_images is not None
    plans: list[BudgetPlan] = []
    for base, path in config.bases.items():
        folder = DatasetFolder(path)
        train = folder.records(split="train")
        if not train:
            raise InputError(folder.path, "base dataset has no 'train' tiles")
        sources = sorted({r.source for r in train})
        for budget in config.real_images:
            if budget != "all" and budget > len(sources):
                raise InputError(folder.path, f"real_images: budget {budget} is more than the {len(sources)} training "
                                 f"source images of base '{base}'")
            draws: list[int | None] = [None] if budget == "all" else list(config.subset_seeds)
            for draw in draws:
                chosen = sources if draw is None else choose_sources(sources, int(budget), draw)
                name = f"{base}-all" if budget == "all" else f"{base}-{budget}img-d{draw}"
                tiles = sum(r.source in set(chosen) for r in train)
                need = 0
                if config.needs_generators:
                    sizes = (config.synthetic_only or [tiles]) if "synthetic_only" in config.arms else []
                    pct = max(config.synthetic_percentages, default=0)
                    need = max([synthetic_count(pct, tiles)] + list(sizes))
                    count = config.generator.sample.count
                    if count is not None and count < need:
                        raise InputError("study config 'generator.sample.count'",
                                         f"{count} pairs, but budget '{name}' needs {need} (the largest synthetic "
                                         "percentage of its real tiles, and the synthetic-only sizes)")
                    need = count or need
                plans.append(BudgetPlan(name, base, str(path), str(budget), draw, chosen, tiles,
                                        str(Path(out) / "budgets" / name), str(Path(out) / "generators" / name), need))
    return plans


def arm_labels(config: StudyConfig) -> list[str]:
    """The arm labels of a label-efficiency study's runs: real, augment, copy_paste, synthetic-P, synthetic_only."""
    labels = [a for a in ("real", "augment", "copy_paste") if a in config.arms]
    labels += [f"synthetic-{p:g}" for p in config.synthetic_percentages]
    if "synthetic_only" in config.arms:
        labels += [f"synthetic_only-{n}" for n in config.synthetic_only] if config.synthetic_only else ["synthetic_only"]
    return labels


def plan_label_runs(config: StudyConfig, budgets: list[BudgetPlan]) -> list[StudyRun]:
    """The U-Net runs of a label-efficiency study: every arm of every budget and draw, seed by seed."""
    runs: list[StudyRun] = []
    for seed in config.seeds:
        for b in budgets:
            common = dict(seed=seed, budget_name=b.name, budget=b.budget, images=b.images, draw=b.draw, base=b.base)
            for arm in arm_labels(config):
                name = f"{b.name}-{arm}-seed{seed}"
                if arm.startswith("synthetic_only"):
                    n = int(arm.split("-")[1]) if "-" in arm else b.tiles
                    val = str(config.bases[config.synthetic_only_val]) if config.synthetic_only_val else b.dataset
                    runs.append(StudyRun(name=name, series=arm, synthetic_set=b.name, percent=None, synthetic_only=n,
                                         train=None, val=val, synthetic=b.synthetic, arm=arm, **common))
                elif arm.startswith("synthetic-"):
                    runs.append(StudyRun(name=name, series=arm, synthetic_set=b.name, percent=float(arm.split("-")[1]),
                                         synthetic_only=None, train=b.dataset, val=b.dataset, synthetic=b.synthetic,
                                         arm=arm, **common))
                else:
                    runs.append(StudyRun(name=name, series=arm, synthetic_set=None, percent=0.0, synthetic_only=None,
                                         train=b.dataset, val=b.dataset, synthetic=None, arm=arm,
                                         seg_set=dict(ARM_SEG_OVERRIDES.get(arm, {})), **common))
    return runs


def generator_stages_done(generator: str | Path) -> dict[str, float]:
    """The finished stages of a generator folder and their seconds (GENERATOR/stages.json)."""
    path = Path(generator) / "stages.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def generator_stages(config: StudyConfig) -> tuple[str, ...]:
    return GENERATOR_STAGES if config.generator.fidelity else GENERATOR_STAGES[:-1]


def plan_runs(config: StudyConfig, out: str | Path | None = None) -> list[StudyRun]:
    """Every U-Net run of the study. A label-efficiency study's runs train on budget folders inside the study
    folder `out` (`plan_budgets`)."""
    if config.label_efficiency:
        if out is None:
            raise ValueError("a label-efficiency study's runs live in its study folder: give out")
        return plan_label_runs(config, plan_budgets(config, out))
    return plan_fixed_runs(config)


def plan_fixed_runs(config: StudyConfig) -> list[StudyRun]:
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


def fidelity_dir(out: str | Path, synthetic_set: str) -> Path:
    """Where a fixed-set study keeps `dualsynth fidelity` of one of its given synthetic sets."""
    return Path(out) / "fidelity" / synthetic_set


def is_finished(out: str | Path, name: str) -> bool:
    return (run_dir(out, name) / EVALUATION / "summary.json").is_file()


def describe_plan(config: StudyConfig, out: str | Path) -> list[str]:
    """Every stage the study would run, in order, each marked [done] or [todo] (`dualsynth study --plan`)."""
    lines: list[str] = []

    def mark(done: bool) -> str:
        return "[done]" if done else "[todo]"

    if config.label_efficiency:
        budgets = plan_budgets(config, out)
        lines.append("budget datasets (train tiles of the chosen images + the base's val split):")
        for b in budgets:
            lines.append(f"  {mark((Path(b.dataset) / 'budget.yaml').is_file())} {b.name}: {b.images} images, "
                         f"{b.tiles} tiles ({', '.join(b.sources)})")
        if config.needs_generators:
            lines.append("generator stages (per budget and image draw):")
            for b in budgets:
                done = generator_stages_done(b.generator)
                for stage in generator_stages(config):
                    what = f" ({b.sample_count} pairs)" if stage == "sample" else ""
                    lines.append(f"  {mark(stage in done)} {b.name}: {stage}{what}")
        runs = plan_label_runs(config, budgets)
    else:
        runs = plan_fixed_runs(config)
    lines.append("U-Net runs (train + evaluate on the test set):")
    for r in runs:
        lines.append(f"  {mark(is_finished(out, r.name))} {r.name}")
    n_done = sum(is_finished(out, r.name) for r in runs)
    lines.append(f"{len(runs)} U-Net runs, {n_done} finished")
    return lines
