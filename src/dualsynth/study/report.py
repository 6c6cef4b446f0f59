"""A study's results, figures and report, from whatever runs have finished.

`collect_results` reads each finished run's evaluation into rows (one per run and metric), `aggregate` groups
them into `Point`s (mean and sample std over the seeds of one configuration), and `write_study_outputs` writes
``results.csv``, ``summary.csv``, the figures like the paper's 15-17 and 19 (`draw_metric_figure`,
`draw_per_class_figure`) and ``report.md`` (`study_report`, with `gain_verdict` weighing each gain against the
seed spread). It only reads the study folder, so it can be run again at any time, also while runs go on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dualsynth.data import DatasetFolder
from dualsynth.errors import InputError
from dualsynth.io import save_figure, write_csv, write_text
from dualsynth.study.config import StudyConfig
from dualsynth.study.plan import EVALUATION, fidelity_dir, is_finished, plan_runs, run_dir

METRICS = {"pixel_accuracy": "accuracy", "miou": "mIoU", "missing_class_iou": "Missing Class IoU"}
FIGURES = {"pixel_accuracy": "fig15_accuracy.png", "miou": "fig16_miou.png", "missing_class_iou": "fig17_missing_class_iou.png"}
PER_CLASS_FIGURE = "fig19_missing_class_iou_per_class.png"


def collect_results(config: StudyConfig, out: str | Path) -> list[dict[str, Any]]:
    """results.csv rows: one per finished run and metric (overall scores, per-class Missing Class IoU and IoU)."""
    import json

    rows: list[dict[str, Any]] = []
    for run in plan_runs(config, out):
        if not is_finished(out, run.name):
            continue
        folder = run_dir(out, run.name)
        s = json.loads((folder / EVALUATION / "summary.json").read_text())
        tiles: dict[str, Any] = {}
        manifest = folder / "manifest.json"
        if manifest.is_file():
            tiles = json.loads(manifest.read_text()).get("inputs", {}).get("tiles", {})
        common = {
            "run": run.name, "series": run.series, "base": run.base or "", "synthetic_set": run.synthetic_set or "",
            "percent": "" if run.percent is None else run.percent,
            "synthetic_only": "" if run.synthetic_only is None else run.synthetic_only,
            "real_tiles": tiles.get("real_train", ""), "synthetic_tiles": tiles.get("synthetic_train", ""),
            "seed": run.seed, "budget": run.budget or "", "images": "" if run.images is None else run.images,
            "draw": "" if run.draw is None else run.draw, "arm": run.arm or "",
        }
        for metric in ("pixel_accuracy", "miou", "mean_image_miou", "missing_class_iou"):
            rows.append({**common, "metric": metric, "class": "", "value": _num(s.get(metric))})
        for metric, key in (("missing_class_iou", "missing_class_iou_per_class"), ("iou", "iou_per_class")):
            for cname, v in (s.get(key) or {}).items():
                rows.append({**common, "metric": metric, "class": cname, "value": _num(v)})
    return rows


def _num(v: Any) -> float:
    return float("nan") if v is None or v == "" else float(v)


@dataclass
class Point:
    """Mean and spread of one metric over the seeds of one configuration."""

    series: str
    percent: float | None
    synthetic_only: int | None
    mean: float
    std: float
    n: int
    runs: list[tuple[str, float]]


def aggregate(rows: list[dict[str, Any]], metric: str, cls: str = "") -> list[Point]:
    """Group rows of one metric (and class) by configuration: mean, sample std over seeds, and the runs."""
    groups: dict[tuple, list[tuple[str, float]]] = {}
    for r in rows:
        if r["metric"] != metric or r["class"] != cls:
            continue
        key = (r["series"], None if r["percent"] == "" else float(r["percent"]),
               None if r["synthetic_only"] == "" else int(r["synthetic_only"]))
        groups.setdefault(key, []).append((r["run"], float(r["value"])))
    points = []
    for (series, pct, n_only), runs in groups.items():
        values = np.array([v for _, v in runs if not math.isnan(v)])
        mean = float(values.mean()) if values.size else float("nan")
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        points.append(Point(series, pct, n_only, mean, std, int(values.size), runs))
    return points


def write_study_outputs(config: StudyConfig, out: str | Path) -> dict[str, Path]:
    """results.csv, summary.csv, the figures and report.md from whatever runs have finished."""
    out = Path(out)
    rows = collect_results(config, out)
    paths = {"results": out / "results.csv", "report": out / "report.md"}
    fields = ["run", "series", "base", "synthetic_set", "percent", "synthetic_only", "real_tiles", "synthetic_tiles",
              "seed", "metric", "class", "value"] + (["budget", "images", "draw", "arm"] if config.label_efficiency else [])
    write_csv(paths["results"], rows, fields)
    if config.label_efficiency:
        from dualsynth.study.efficiency import label_report

        return {**paths, **label_report(config, out)}
    paths["summary"] = out / "summary.csv"
    class_names = list(dict.fromkeys(r["class"] for r in rows if r["class"]))
    summary_rows = []
    for metric, cls in [(m, "") for m in ("pixel_accuracy", "miou", "mean_image_miou", "missing_class_iou")] + \
            [("missing_class_iou", c) for c in class_names] + [("iou", c) for c in class_names]:
        for p in sorted(aggregate(rows, metric, cls), key=_point_order):
            summary_rows.append({"series": p.series, "percent": "" if p.percent is None else p.percent,
                                 "synthetic_only": "" if p.synthetic_only is None else p.synthetic_only,
                                 "metric": metric, "class": cls, "mean": p.mean, "std": p.std, "n": p.n})
    write_csv(paths["summary"], summary_rows, ["series", "percent", "synthetic_only", "metric", "class", "mean", "std", "n"])
    if rows:
        reference_tiles = _reference_tiles(rows, config)
        for metric, name in FIGURES.items():
            paths[metric] = out / name
            draw_metric_figure(paths[metric], rows, metric, reference_tiles)
        if class_names:
            paths["per_class"] = out / PER_CLASS_FIGURE
            draw_per_class_figure(paths["per_class"], rows, class_names, reference_tiles)
    runs = list(dict.fromkeys(r["run"] for r in rows))
    write_text(paths["report"], study_report(config, rows, class_names, paths)
               + "\n".join(trivial_section(out, runs) + [""]) + fidelity_section(config, out))
    return paths


def trivial_runs(out: Path, names: list[str]) -> list[tuple[str, str]]:
    """(run, warning) for every finished run whose test predictions are (almost) one class (metrics.trivial_prediction)."""
    from dualsynth.metrics import trivial_prediction

    found = []
    for name in names:
        path = run_dir(out, name) / EVALUATION / "summary.json"
        if path.is_file():
            warning = trivial_prediction(json.loads(path.read_text()))
            if warning:
                found.append((name, warning))
    return found


def trivial_section(out: Path, names: list[str]) -> list[str]:
    """Report lines naming the runs that learned nothing (empty when there are none)."""
    found = trivial_runs(out, names)
    if not found:
        return []
    head = ["", "## Runs that learned nothing", "",
            f"{len(found)} of {len(names)} finished runs predict (almost) only one class on the test tiles, the "
            "trivial solution; their scores measure the class balance of the test set, not the training data. "
            "Longer training, other crops or normalisation may avoid it (docs/results.md, nasa-ebc).", ""]
    return head + [f"- `{name}`: {warning}" for name, warning in found]


def fidelity_line(path: Path) -> str:
    """The headline of a fidelity.json (`dualsynth.fidelity.fidelity_headline`) on one line."""
    from dualsynth.fidelity import fidelity_headline

    return "; ".join(" ".join(line.split()) for line in fidelity_headline(json.loads(path.read_text())).splitlines())


def fidelity_section(config: StudyConfig, out: Path) -> str:
    """The fidelity headline of each given synthetic set (STUDY/fidelity/NAME/), next to the results above."""
    lines = []
    for name in config.synthetic:
        path = fidelity_dir(out, name) / "fidelity.json"
        if path.is_file():
            lines.append(f"- `{name}`: {fidelity_line(path)} (`fidelity/{name}/fidelity.md`)")
    if not lines:
        return ""
    return "\n".join(["", "## Fidelity of each synthetic set", "",
                      f"`dualsynth fidelity` of each synthetic set against the real tiles of base '{config.val_base}', "
                      "to compare with how much the set helped above:", ""] + lines) + "\n"


def rebuild_report(config: StudyConfig, out: str | Path) -> dict[str, Path]:
    """`dualsynth study --report-only`: results.csv, the report, figures and tables again from the finished runs
    (their evaluations and per-tile files), training nothing; a study stopped before its end gets them too."""
    out = Path(out)
    if not (out / "results.csv").is_file() and not (out / "runs").is_dir():
        raise InputError(out, "no study here (no results.csv, no runs/): run the study first")
    return write_study_outputs(config, out)


def _point_order(p: Point) -> tuple:
    return (p.series.endswith("-only"), p.series, -1 if p.percent is None else p.percent, p.synthetic_only or 0)


def _reference_tiles(rows: list[dict[str, Any]], config: StudyConfig) -> int | None:
    """Real training tiles of the base that validates synthetic-only runs: maps sizes to the % axis, as the
    paper's upper x-axis does (purely synthetic sizes equal the tiles added to the big base)."""
    try:
        n = len(DatasetFolder(config.bases[config.val_base]).records(split="train"))
    except InputError:
        n = 0
    if n:
        return n
    return next((int(r["real_tiles"]) for r in rows if r["real_tiles"] not in ("", None) and int(r["real_tiles"]) > 0), None)


def _base_series(series: str) -> str:
    """The series of a configuration's base model: 'HQ+S1' -> 'HQ' (several synthetic sets), 'HQ' -> 'HQ'."""
    return series.split("+", 1)[0]


def _plot_metric(ax: Any, rows: list[dict[str, Any]], metric: str, cls: str, reference_tiles: int | None,
                 legend: bool = True) -> bool:
    """Draw one metric's series on `ax`; True when an upper axis (synthetic-only sizes) was added."""
    import matplotlib

    points = aggregate(rows, metric, cls)
    series = sorted({p.series for p in points}, key=lambda s: (s.endswith("-only"), s))
    # one colour per base dataset (its base line and every synthetic set added to it), one marker per set
    groups = list(dict.fromkeys(_base_series(s) for s in series))
    sets = list(dict.fromkeys(s.split("+", 1)[1] for s in series if "+" in s))
    colours = matplotlib.colormaps["tab10"]
    markers = "o^vDP*X"
    xs = [p.percent for p in points if p.percent] + [
        100 * p.synthetic_only / reference_tiles for p in points if p.synthetic_only and reference_tiles]
    span = (max(xs) - min(xs)) if len(xs) > 1 else 100.0
    only_xy: list[tuple[float, float]] = []
    for k, name in enumerate(series):
        colour = colours(groups.index(_base_series(name)) % 10)
        mine = sorted((p for p in points if p.series == name), key=_point_order)
        base = [p for p in mine if p.percent == 0]
        if base:
            b = base[0]
            ax.axhline(100 * b.mean, color=colour, ls="--", lw=1.2, label=f"{name} [0 %] (base)")
            if b.n > 1:
                ax.axhspan(100 * (b.mean - b.std), 100 * (b.mean + b.std), color=colour, alpha=0.12, lw=0)
        offset = (k - (len(series) - 1) / 2) * 0.012 * span  # side by side, so error bars do not overlap
        if name.endswith("-only"):
            if not reference_tiles:
                continue
            pts = [p for p in mine if p.synthetic_only]
            x = [100 * p.synthetic_only / reference_tiles + offset for p in pts]
            label = f"{name} (size on top axis)"
            marker, ls = "s", ":"
        else:
            pts = [p for p in mine if p.percent]
            x = [p.percent + offset for p in pts]
            marker = markers[sets.index(name.split("+", 1)[1]) % len(markers)] if "+" in name else "o"
            label, ls = (name if "+" in name else f"{name} + synthetic"), "-"
        if not pts:
            continue
        y = [100 * p.mean for p in pts]
        yerr = [100 * p.std for p in pts] if any(p.n > 1 for p in pts) else None
        ax.errorbar(x, y, yerr=yerr, color=colour, marker=marker, ls=ls, lw=1, capsize=3, label=label)
        if name.endswith("-only"):
            only_xy += list(zip(x, y))
    _keep_main_series_readable(ax, points, only_xy)
    ax.set_xlabel("synthetic data added to the training set (%)")
    percents = sorted({p.percent for p in points if p.percent})
    if percents:
        ax.set_xticks(percents)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="best")
    sizes = sorted({p.synthetic_only for p in points if p.synthetic_only})
    if reference_tiles and sizes:
        top = ax.secondary_xaxis("top", functions=(lambda p: p * reference_tiles / 100.0,
                                                   lambda n: n * 100.0 / reference_tiles))
        top.set_xticks(sizes)
        top.set_xlabel("synthetic-only training tiles", fontsize=8)
        return True
    return False


def _keep_main_series_readable(ax: Any, points: list[Point], only_xy: list[tuple[float, float]]) -> None:
    """Synthetic-only runs can score far below the others and flatten every other series (the paper left such
    points out of its Figs. 15-19). Limit the y-axis to the real + synthetic series and mark the points below
    it with an arrow and their value at the bottom edge."""
    import math

    # a class absent from every test tile of a run has no IoU (NaN): such points are not drawn, nor counted here
    main = [p for p in points if not p.series.endswith("-only") and math.isfinite(p.mean)]
    only_xy = [(x, y) for x, y in only_xy if math.isfinite(y)]
    if not main or not only_xy:
        return
    lo = min(100 * (p.mean - (p.std if math.isfinite(p.std) else 0.0)) for p in main)
    hi = max(100 * (p.mean + (p.std if math.isfinite(p.std) else 0.0)) for p in main)
    pad = max(0.5, 0.25 * (hi - lo))
    if all(lo - 4 * pad <= y <= hi + 4 * pad for _, y in only_xy):
        return
    bottom = lo - pad
    ax.set_ylim(bottom - pad, hi + pad)
    for x, y in only_xy:
        if y < bottom:
            ax.annotate(f"{y:.1f} \u2193 (off scale)", xy=(x, bottom - 0.5 * pad), ha="center", va="center", fontsize=8,
                        color="0.25")


def draw_metric_figure(path: Path, rows: list[dict[str, Any]], metric: str, reference_tiles: int | None) -> None:
    """Paper Figs. 15-17: a metric on the test set against % synthetic data, one series per base dataset,
    the base model (0 %) as a dashed horizontal line, synthetic-only runs on the upper axis; std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    top = _plot_metric(ax, rows, metric, "", reference_tiles)
    ax.set_ylabel(f"{METRICS[metric]} (%)")
    n_seeds = len({r["seed"] for r in rows})
    ax.set_title(f"{METRICS[metric]} on the test set" + (f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else ""),
                 fontsize=10, pad=14 if top else 6)
    save_figure(path, fig)


def draw_per_class_figure(path: Path, rows: list[dict[str, Any]], class_names: list[str], reference_tiles: int | None) -> None:
    """Paper Fig. 19: Missing Class IoU per class against % synthetic data, one panel per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(class_names))
    nrows = math.ceil(len(class_names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4 * nrows), squeeze=False)
    for i, (ax, cname) in enumerate(zip(axes.ravel(), class_names)):
        top = _plot_metric(ax, rows, "missing_class_iou", cname, reference_tiles, legend=i == 0)
        ax.set_ylabel("Missing Class IoU (%)")
        ax.set_title(f"Evaluation of {cname}", fontsize=10, pad=14 if top else 6)
    for ax in axes.ravel()[len(class_names):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(path, fig)


def _config_label(p: Point) -> str:
    if p.synthetic_only is not None:
        return f"{p.series} [{p.synthetic_only} tiles]"
    return f"{p.series} [{p.percent:g} %]"


def _fmt(p: Point | None) -> str:
    if p is None or math.isnan(p.mean):
        return "-"
    return f"{100 * p.mean:.1f} ± {100 * p.std:.1f}" if p.n > 1 else f"{100 * p.mean:.1f}"


def gain_verdict(base: Point, best: Point) -> str:
    """Whether a difference of means stands out from the seed-to-seed spread (two standard errors)."""
    if base.n < 2 or best.n < 2:
        return "One run per configuration: no seed spread to judge the difference by; add seeds (repeats)."
    se = math.sqrt(base.std ** 2 / base.n + best.std ** 2 / best.n)
    diff = best.mean - base.mean
    if se == 0:
        return "The runs of each configuration agree exactly."
    if abs(diff) > 2 * se:
        return f"The difference is {abs(diff) / se:.1f} standard errors of the seed spread (beyond 2: more than seed noise alone)."
    return (f"The difference is {abs(diff) / se:.1f} standard errors of the seed spread (within 2: "
            f"not distinguishable from seed noise).")


def study_report(config: StudyConfig, rows: list[dict[str, Any]], class_names: list[str], paths: dict[str, Path]) -> str:
    """report.md: what was run, a table of every configuration, the best model per metric, the figures."""
    n_runs = len({r["run"] for r in rows})
    planned = len(plan_runs(config))
    lines = ["# Segmentation study", ""]
    lines += [
        "- base datasets: " + ", ".join(f"{k} (`{v}`)" for k, v in config.bases.items()),
        "- synthetic sets: " + (", ".join(f"{k} (`{v}`)" for k, v in config.synthetic.items()) or "none"),
        f"- synthetic data added: {', '.join(f'{p:g} %' for p in config.percentages)}"
        + (f"; synthetic-only sizes: {', '.join(map(str, config.synthetic_only))} (validated on {config.val_base})"
           if config.synthetic_only else ""),
        f"- seeds: {', '.join(map(str, config.seeds))}; U-Net preset `{config.seg.preset}`"
        + (f" with {config.seg.set}" if config.seg.set else ""),
        f"- test set: `{config.test.data}` split `{config.test.split}` (real tiles only)",
        f"- finished runs: {n_runs} of {planned}",
        "",
    ]
    if not rows:
        lines.append("No run has finished yet.")
        return "\n".join(lines) + "\n"
    metrics = ["pixel_accuracy", "miou", "missing_class_iou"]
    table = {m: {(p.series, p.percent, p.synthetic_only): p for p in aggregate(rows, m)} for m in metrics}
    keys = sorted(table["missing_class_iou"].values(), key=_point_order)
    lines += ["## Results on the test set (%)", "",
              "Mean over seeds, ± sample standard deviation where there are repeats.", "",
              "| model | real tiles | synthetic tiles | runs | accuracy | mIoU | Missing Class IoU |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    tiles = {(r["series"], r["run"]): (r["real_tiles"], r["synthetic_tiles"]) for r in rows}
    for p in keys:
        key = (p.series, p.percent, p.synthetic_only)
        real, synth = tiles.get((p.series, p.runs[0][0]), ("", ""))
        lines.append(f"| {_config_label(p)} | {real} | {synth} | {p.n} | {_fmt(table['pixel_accuracy'].get(key))} | "
                     f"{_fmt(table['miou'].get(key))} | {_fmt(table['missing_class_iou'].get(key))} |")
    lines += ["", "## Best model per metric", "",
              "The configuration with the highest mean over seeds, the single run with the highest score, and "
              "the best configuration's change against the base model (0 %) of the same dataset.", "",
              "| metric | best configuration | mean | best single run (any configuration) | best configuration vs. its base model |", "|---|---|---:|---|---:|"]
    for metric, cls, label in [(m, "", METRICS[m]) for m in metrics] + \
            [("missing_class_iou", c, f"Missing Class IoU of {c}") for c in class_names]:
        points = [p for p in aggregate(rows, metric, cls) if not math.isnan(p.mean)]
        if not points:
            continue
        best = max(points, key=lambda p: p.mean)
        run_name, run_value = max((r for p in points for r in p.runs if not math.isnan(r[1])), key=lambda r: r[1])
        base = next((p for p in points if p.series == _base_series(best.series) and p.percent == 0), None)
        delta = "-" if base is None or best is base else f"{100 * (best.mean - base.mean):+.1f} points"
        lines.append(f"| {label} | {_config_label(best)} | {_fmt(best)} | `{run_name}` ({100 * run_value:.1f}) | {delta} |")
    lines += ["", "## Did synthetic data help? (Missing Class IoU)", ""]
    mci = aggregate(rows, "missing_class_iou")
    for series in sorted({p.series for p in mci if not p.series.endswith("-only")}):
        base = next((p for p in mci if p.series == _base_series(series) and p.percent == 0), None)
        added = [p for p in mci if p.series == series and p.percent]
        if base is None or not added:
            continue
        best = max(added, key=lambda p: p.mean)
        better = sum(p.mean > base.mean for p in added)
        lines.append(f"- {series}: base model {_fmt(base)}; best with synthetic data {_config_label(best)} "
                     f"{_fmt(best)} ({100 * (best.mean - base.mean):+.1f} points); {better} of {len(added)} "
                     f"percentages above the base model. {gain_verdict(base, best)}")
    only = [p for p in mci if p.series.endswith("-only")]
    if only:
        best = max(only, key=lambda p: p.mean)
        lines.append(f"- synthetic data only: best {_config_label(best)} {_fmt(best)}.")
    lines += ["", "Caveat: with a fixed number of epochs, a run with more training tiles also takes more optimizer "
              "steps; to tell the synthetic data from the extra steps, compare with a base model trained for as "
              "many steps (e.g. `seg.set.epochs` scaled by 1 + % / 100)."]
    lines += ["", "## Figures", ""]
    for metric in metrics:
        if metric in paths:
            lines += [f"![{METRICS[metric]}]({paths[metric].name})", ""]
    if "per_class" in paths:
        lines += [f"![Missing Class IoU per class]({paths['per_class'].name})", ""]
    lines += ["Per-run files: `runs/NAME/` (training run) and `runs/NAME/evaluation/` (per-image scores, overlays).",
              "All numbers: `results.csv` (one row per run and metric) and `summary.csv` (mean, std, n).", ""]
    return "\n".join(lines)
