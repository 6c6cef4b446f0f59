"""The paper's experiment (§4.2.1, §5, Tables 5 and 6, Figures 15-17 and 19): does adding synthetic pairs help?

A study config lists base datasets (real tiles, e.g. HQ and LQ masks), one or more synthetic sets, the
percentages of synthetic tiles to add, synthetic-only sizes, the seeds (repeats) and the real test set. Each
combination is one U-Net run in ``STUDY/runs/NAME`` (a `train-seg` run folder) with its evaluation on the test
set in ``STUDY/runs/NAME/evaluation``. A run counts as finished when ``evaluation/summary.json`` exists, so a
study stopped and started again skips finished runs and resumes the unfinished ones from their last epoch.

Runs go one after another, side by side in worker processes (``workers``), or as Ray tasks (``backend="ray"``),
which spreads a study over a cluster whose nodes see the same file system. Outputs: ``results.csv`` (one row per
run and metric), ``summary.csv`` (mean, std over seeds), figures like the paper's 15-17 and 19, ``report.md``.

The modules, each importing only from those above it:

- `config`: `StudyConfig` (with `TestSet`, `SegSettings`), `load_study_config`, `resolve_paths`,
  `seg_config_dict` (the train-seg config of every run).
- `plan`: `StudyRun`, `plan_runs` (every run of a config), `run_dir` and `is_finished` (the study folder).
- `report`: `collect_results`, `aggregate` / `Point`, the figures, `gain_verdict`, `study_report`, and
  `write_study_outputs`, which writes them all from whatever runs have finished.
- `runner`: `check_inputs`, `run_one`, `run_study` and the worker-process and Ray backends; it calls
  `write_study_outputs` at the end.

Python API (re-exported here): `load_study_config(path)`, `plan_runs(config)`,
`run_study(config, out, workers, backend)`, `write_study_outputs(config, out)`.
"""

from dualsynth.study.config import (
    NAME_RE,
    SegSettings,
    StudyConfig,
    TestSet,
    load_study_config,
    resolve_paths,
    seg_config_dict,
)
from dualsynth.study.plan import (
    EVALUATION,
    BudgetPlan,
    StudyRun,
    choose_sources,
    describe_plan,
    is_finished,
    plan_budgets,
    plan_runs,
    run_dir,
)
from dualsynth.study.report import (
    FIGURES,
    METRICS,
    PER_CLASS_FIGURE,
    Point,
    aggregate,
    collect_results,
    draw_metric_figure,
    draw_per_class_figure,
    gain_verdict,
    rebuild_report,
    study_report,
    write_study_outputs,
)
from dualsynth.study.runner import check_inputs, run_one, run_study

__all__ = [
    "BudgetPlan", "choose_sources", "describe_plan", "plan_budgets", "rebuild_report",
    "EVALUATION", "FIGURES", "METRICS", "NAME_RE", "PER_CLASS_FIGURE", "Point", "SegSettings", "StudyConfig",
    "StudyRun", "TestSet", "aggregate", "check_inputs", "collect_results", "draw_metric_figure",
    "draw_per_class_figure", "gain_verdict", "is_finished", "load_study_config", "plan_runs", "resolve_paths",
    "run_dir", "run_one", "run_study", "seg_config_dict", "study_report", "write_study_outputs",
]
