"""The paper's experiment over % synthetic data (being split into modules; everything lives in `runner` for now)."""

from dualsynth.study.config import NAME_RE, SegSettings, StudyConfig, TestSet, load_study_config, resolve_paths, seg_config_dict
from dualsynth.study.plan import EVALUATION, StudyRun, is_finished, plan_runs, run_dir
from dualsynth.study.runner import (
    FIGURES,
    METRICS,
    PER_CLASS_FIGURE,
    Point,
    aggregate,
    check_inputs,
    collect_results,
    draw_metric_figure,
    draw_per_class_figure,
    gain_verdict,
    run_one,
    run_study,
    study_report,
    write_study_outputs,
)

__all__ = [
    "EVALUATION", "FIGURES", "METRICS", "NAME_RE", "PER_CLASS_FIGURE", "Point", "SegSettings", "StudyConfig",
    "StudyRun", "TestSet", "aggregate", "check_inputs", "collect_results", "draw_metric_figure",
    "draw_per_class_figure", "gain_verdict", "is_finished", "load_study_config", "plan_runs", "resolve_paths",
    "run_dir", "run_one", "run_study", "seg_config_dict", "study_report", "write_study_outputs",
]
