"""The report of a label-efficiency study, rebuilt from ``results.csv`` and the runs' per-tile scores.

`label_report` reads the study folder only (``results.csv``, ``runs/NAME/evaluation/per_image.csv``, each
generator's ``fidelity/fidelity.json``, the two compared models' checkpoints) and writes:

- ``label_efficiency.png``: test Missing Class IoU against the number of labelled images, one line per arm,
  with bootstrap 95 % intervals; ``per_image_miou.png``: the same for the per-image mIoU;
- ``differences.csv``: every arm against real only at the same budget, paired by test tile and (draw, seed):
  mean difference, 95 % interval and verdict for Missing Class IoU, per-image mIoU and accuracy;
- ``labels_saved.csv``: every arm at a budget against real only at the next larger budget (the headline);
- ``fig20_comparison.png``: two models' predictions on the same test images (the paper's Figure 20);
- ``report.md``, the entry point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dualsynth.data import DatasetFolder
from dualsynth.errors import InputError
from dualsynth.io import read_csv, save_figure, write_csv
from dualsynth.study.config import StudyConfig
from dualsynth.study.plan import EVALUATION, plan_budgets, run_dir
from dualsynth.study.stats import STAT_METRICS, Interval, TileScores, bootstrap, resampling_groups

EFFICIENCY_FIGURE = "label_efficiency.png"
MIOU_FIGURE = "per_image_miou.png"
COMPARISON_FIGURE = "fig20_comparison.png"


@dataclass
class Run:
    name: str
    base: str
    budget: str
    images: int
    draw: int | None
    arm: str
    seed: int

    @property
    def unit(self) -> tuple[int | None, int]:
        return (self.draw, self.seed)


class Evidence:
    """The finished runs of a study folder and their per-tile test scores (read once, on demand)."""

    def __init__(self, config: StudyConfig, out: Path, rows: list[dict[str, str]]):
        self.config, self.out = config, out
        self.runs: dict[str, Run] = {}
        for r in rows:
            if r["run"] not in self.runs and r.get("arm"):
                self.runs[r["run"]] = Run(r["run"], r["base"], r["budget"], int(r["images"]),
                                          None if r["draw"] == "" else int(r["draw"]), r["arm"], int(r["seed"]))
        test = DatasetFolder(config.test.data)
        records = sorted(test.records(split=config.test.split), key=lambda rec: rec.file)
        self.files = [rec.file for rec in records]
        self.groups, self.resampling = resampling_groups([rec.source for rec in records])
        self._scores: dict[tuple[str, str], TileScores] = {}

    def scores(self, run: str, metric: str) -> TileScores:
        if (run, metric) not in self._scores:
            rows = read_csv(run_dir(self.out, run) / EVALUATION / "per_image.csv")
            self._scores[(run, metric)] = TileScores.from_rows(rows, self.files, metric)
        return self._scores[(run, metric)]

    def select(self, base: str, budget: str, arm: str) -> dict[tuple[int | None, int], Run]:
        return {r.unit: r for r in self.runs.values() if (r.base, r.budget, r.arm) == (base, budget, arm)}

    def level(self, base: str, budget: str, arm: str, metric: str) -> Interval:
        runs = sorted(self.select(base, budget, arm).values(), key=lambda r: (r.draw or 0, r.seed))
        return bootstrap([self.scores(r.name, metric) for r in runs], None, self.groups, self.config.bootstrap)

    def difference(self, a: dict, b: dict, metric: str) -> Interval:
        """Runs `a` minus runs `b` ({unit: Run}), paired by unit; a unit of `a` whose draw `b` lacks (the 'all'
        budget has one) is paired with `b`'s run of the same seed."""
        pairs = []
        for unit, run in sorted(a.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
            other = b.get(unit) or b.get((None, unit[1]))
            if other is not None:
                pairs.append((run, other))
        return bootstrap([self.scores(x.name, metric) for x, _ in pairs],
                         [self.scores(y.name, metric) for _, y in pairs], self.groups, self.config.bootstrap)


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.1f}"


def _signed(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:+.1f}"


def _interval(iv: Interval, signed: bool = False) -> str:
    f = _signed if signed else _pct
    return f"{f(iv.mean)} [{f(iv.low)}, {f(iv.high)}]"


def budget_order(config: StudyConfig, out: Path) -> dict[str, list[tuple[str, int]]]:
    """Per base: its budgets ('2', ..., 'all') with their image counts, smallest first."""
    order: dict[str, list[tuple[str, int]]] = {}
    for b in plan_budgets(config, out):
        if (b.budget, b.images) not in order.setdefault(b.base, []):
            order[b.base].append((b.budget, b.images))
    return order


def label_report(config: StudyConfig, out: str | Path) -> dict[str, Path]:
    """Every label-efficiency output from results.csv and the per-tile files; returns the paths written."""
    from dualsynth.study.budgets import label_seg_config

    out = Path(out)
    matching = label_seg_config(config, plan_budgets(config, out))[1]
    rows = read_csv(out / "results.csv")
    ev = Evidence(config, out, rows)
    budgets = budget_order(config, out)
    from dualsynth.study.plan import arm_labels

    arms = [a for a in arm_labels(config) if any(r.arm == a for r in ev.runs.values())]
    paths: dict[str, Path] = {"report": out / "report.md", "differences": out / "differences.csv",
                              "labels_saved": out / "labels_saved.csv"}
    levels = {(base, budget, arm, m): ev.level(base, budget, arm, m) for base in budgets for budget, _ in budgets[base]
              for arm in arms for m in STAT_METRICS if ev.select(base, budget, arm)}
    diffs: list[dict[str, Any]] = []
    for base, blist in budgets.items():
        for budget, images in blist:
            real = ev.select(base, budget, "real")
            for arm in arms:
                if arm == "real" or not real or not ev.select(base, budget, arm):
                    continue
                for m in STAT_METRICS:
                    iv = ev.difference(ev.select(base, budget, arm), real, m)
                    diffs.append({"base": base, "budget": budget, "images": images, "arm": arm, "metric": m,
                                  "difference": iv.mean, "low": iv.low, "high": iv.high, "verdict": iv.verdict,
                                  "units": iv.units})
    write_csv(paths["differences"], diffs, ["base", "budget", "images", "arm", "metric", "difference", "low", "high",
                                            "verdict", "units"])
    saved: list[dict[str, Any]] = []
    for base, blist in budgets.items():
        for (budget, images), (nxt, nxt_images) in zip(blist, blist[1:]):
            target = ev.select(base, nxt, "real")
            rows_here: list[dict[str, Any]] = []
            for arm in arms:  # real first: the control (do more labels help real only at all?)
                if not target or not ev.select(base, budget, arm):
                    continue
                iv = ev.difference(ev.select(base, budget, arm), target, "missing_class_iou")
                rows_here.append({"base": base, "budget": budget, "images": images, "arm": arm, "next_budget": nxt,
                                  "next_images": nxt_images, "difference": iv.mean, "low": iv.low, "high": iv.high,
                                  "matches": bool(iv.units and iv.high >= 0), "units": iv.units})
            control = next((r["matches"] for r in rows_here if r["arm"] == "real"), None)
            saved += [{**r, "real_matches_too": control} for r in rows_here]
    write_csv(paths["labels_saved"], saved, ["base", "budget", "images", "arm", "next_budget", "next_images",
                                             "difference", "low", "high", "matches", "real_matches_too", "units"])
    if levels:
        for metric, name in (("missing_class_iou", EFFICIENCY_FIGURE), ("mean_image_miou", MIOU_FIGURE)):
            paths[metric] = out / name
            draw_efficiency_figure(paths[metric], budgets, arms, levels, metric)
    pair = comparison_pair(config, ev, budgets, levels)
    comparison_note = ""
    if pair is not None:
        figure = out / COMPARISON_FIGURE
        try:
            draw_comparison(figure, config, ev, *pair)
        except InputError as exc:  # a compared run's checkpoint was deleted (U-Net checkpoints are large)
            comparison_note = (f"not redrawn by this build ({exc.one_line()}); "
                               + ("the figure is the one drawn before." if figure.is_file() else "no figure."))
        if figure.is_file():
            paths["comparison"] = figure
    from dualsynth.io import write_text

    write_text(paths["report"], _report_md(config, out, ev, budgets, arms, levels, diffs, saved, paths, pair, matching,
                                           comparison_note))
    return paths


def draw_efficiency_figure(path: Path, budgets: dict, arms: list[str], levels: dict, metric: str) -> None:
    """A metric on the test set against the number of labelled images, one line per arm, 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.5), squeeze=False)
    colours = matplotlib.colormaps["tab10"]
    for ax, (base, blist) in zip(axes[0], budgets.items()):
        for k, arm in enumerate(arms):
            pts = [(images, levels[(base, budget, arm, metric)]) for budget, images in blist
                   if (base, budget, arm, metric) in levels]
            if not pts:
                continue
            x = np.array([p[0] for p in pts], float) * (1 + 0.015 * (k - (len(arms) - 1) / 2))  # side by side
            y = np.array([100 * p[1].mean for p in pts])
            err = np.array([[100 * (p[1].mean - p[1].low) for p in pts], [100 * (p[1].high - p[1].mean) for p in pts]])
            ax.errorbar(x, y, yerr=np.nan_to_num(err), color=colours(k % 10), marker="o", capsize=3, lw=1.2,
                        ls="--" if arm == "real" else "-", label=arm)
        ticks = [images for _, images in blist]
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{n}" + (" (all)" if b == "all" else "") for b, n in blist])
        ax.minorticks_off()
        ax.set_xlabel("labelled training images")
        ax.set_ylabel(f"{STAT_METRICS[metric]} (%)")
        ax.set_title(f"{base}: test {STAT_METRICS[metric]} (mean, bootstrap 95 % interval)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(path, fig)


def comparison_pair(config: StudyConfig, ev: Evidence, budgets: dict, levels: dict) -> tuple[Run, Run] | None:
    """The two runs of the Figure 20 comparison: `compare` (default real and the best synthetic arm by test
    Missing Class IoU) at `compare_budget` (default the smallest), first base, first draw and seed both have."""
    base = next(iter(budgets))
    blist = budgets[base]
    budget = str(config.compare_budget) if config.compare_budget is not None else blist[0][0]
    if config.compare is not None:
        names = list(config.compare)
    else:
        synthetic = [(levels[k].mean, k[2]) for k in levels
                     if k[:2] == (base, budget) and k[3] == "missing_class_iou" and k[2].startswith("synthetic")
                     and not math.isnan(levels[k].mean)]
        if not synthetic:
            return None
        names = ["real", max(synthetic)[1]]
    a, b = ev.select(base, budget, names[0]), ev.select(base, budget, names[1])
    common = sorted(set(a) & set(b), key=lambda u: (u[0] or 0, u[1]))
    return (a[common[0]], b[common[0]]) if common else None


def draw_comparison(path: Path, config: StudyConfig, ev: Evidence, a: Run, b: Run, n: int = 3) -> None:
    """The paper's Figure 20: test tiles where two models differ most (per-image Missing Class IoU); by column
    the micrograph, its true mask and each model's prediction with its per-image scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.patches import Patch

    from dualsynth.data import colorize_mask
    from dualsynth.segmentation.evaluation import image_rgb
    from dualsynth.segmentation.model import load_segmenter, predict_batch

    rows = {run.name: {r["file"]: r for r in read_csv(run_dir(ev.out, run.name) / EVALUATION / "per_image.csv")}
            for run in (a, b)}

    def mci(run: Run, f: str) -> float:
        v = rows[run.name][f]["missing_class_iou"]
        return float(v) if v != "" else float("nan")

    gaps = sorted(ev.files, key=lambda f: (-abs(np.nan_to_num(mci(b, f) - mci(a, f))), f))[:n]
    test = DatasetFolder(config.test.data)
    records = {rec.file: rec for rec in test.records(split=config.test.split)}
    models = [load_segmenter(run_dir(ev.out, run.name), "cpu") for run in (a, b)]
    fig, axes = plt.subplots(len(gaps), 4, figsize=(10, 2.7 * len(gaps) + 0.8), squeeze=False)
    for row_axes, f in zip(axes, gaps):
        image, truth = test.load_image(records[f]), test.load_mask(records[f])
        x = torch.from_numpy(np.moveaxis(image, -1, 0)[None]).float()
        preds = [predict_batch(m, x)[0] for m in models]
        row_axes[0].imshow(image_rgb(image))
        row_axes[0].set_title(f, fontsize=8)
        row_axes[1].imshow(colorize_mask(truth, test.classes), interpolation="nearest")
        row_axes[1].set_title("true mask", fontsize=8)
        for ax, run, pred in zip(row_axes[2:], (a, b), preds):
            r = rows[run.name][f]
            ax.imshow(colorize_mask(pred, test.classes), interpolation="nearest")
            ax.set_title(f"{run.arm}: MCIoU {_pct(mci(run, f))} %  mIoU {_pct(float(r['miou'] or 'nan'))} %", fontsize=8)
        for ax in row_axes:
            ax.axis("off")
    handles = [Patch(color=np.array(c.color) / 255, label=c.name) for c in test.classes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"{a.name} vs {b.name}: the test tiles where they differ most", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    save_figure(path, fig)


def _fidelity_lines(config: StudyConfig, out: Path) -> list[str]:
    from dualsynth.study.report import fidelity_line

    lines = []
    for b in plan_budgets(config, out):
        path = Path(b.generator) / "fidelity" / "fidelity.json"
        if b.sample_count and path.is_file():
            head = fidelity_line(path)
            lines.append(f"- `{b.name}` ({b.images} images, {b.sample_count} pairs sampled): {head}")
    return lines


def _report_md(config: StudyConfig, out: Path, ev: Evidence, budgets: dict, arms: list[str], levels: dict,
               diffs: list[dict], saved: list[dict], paths: dict[str, Path], pair: tuple[Run, Run] | None,
               matching: str, comparison_note: str = "") -> str:
    n_runs = len(ev.runs)
    from dualsynth.study.plan import plan_runs

    planned = len(plan_runs(config, out))
    lines = ["# Label-efficiency study", "",
             "How many labelled micrographs do synthetic pairs save? Every budget's generator and U-Nets train on "
             "that budget's images only; every U-Net is scored on the same real test tiles.", "",
             "- bases: " + ", ".join(f"{k} (`{v}`)" for k, v in config.bases.items()),
             "- labelled training images: " + ", ".join(str(b) for b in config.real_images or [])
             + f"; image draws (subset_seeds): {', '.join(map(str, config.subset_seeds))}",
             f"- arms: {', '.join(arms)}; U-Net seeds: {', '.join(map(str, config.seeds))}; U-Net preset "
             f"`{config.seg.preset}`" + (f" with {config.seg.set}" if config.seg.set else ""),
             f"- test set: `{config.test.data}` split `{config.test.split}` (real tiles only, {len(ev.files)} tiles)",
             f"- finished runs: {n_runs} of {planned}"]
    if matching:
        lines.append(f"- {matching}")
    lines += [f"- intervals: bootstrap 95 % ({config.bootstrap} resamples) over {ev.resampling} and over the "
              "(image draw, seed) pairs; paired: both models of a difference are scored on the same resampled "
              "tiles and seeds.", ""]
    if not ev.runs:
        return "\n".join(lines + ["No run has finished yet.", ""])
    lines += ["## Labels saved", "", _headline(saved), ""]
    lines += ["Each arm at a budget against real only at the next larger budget (test Missing Class IoU, "
              "points; it matches when the 95 % interval of the difference contains or exceeds 0). The `real` row "
              "is the control: where real only also matches real only with more images, more labels did not "
              "measurably help, and a match of the other arms there shows no saving:", "",
              "| base | arm | images | vs real only with | difference [95 % interval] | matches |", "|---|---|---:|---:|---|---|"]
    for s in saved:
        iv = Interval(s["difference"], s["low"], s["high"], s["units"])
        lines.append(f"| {s['base']} | {s['arm']} | {s['images']} | {s['next_images']} | {_interval(iv, True)} | "
                     f"{'yes' if s['matches'] else 'no'} |")
    lines += ["", "## Test scores (%)", "", "Mean over (image draw, seed) pairs with its bootstrap 95 % interval.", "",
              "| base | images | arm | runs | Missing Class IoU | mIoU (per image) | accuracy |", "|---|---:|---|---:|---|---|---|"]
    for base, blist in budgets.items():
        for budget, images in blist:
            for arm in arms:
                key = (base, budget, arm)
                if key + ("missing_class_iou",) not in levels:
                    continue
                cells = [_interval(levels[key + (m,)]) for m in STAT_METRICS]
                lines.append(f"| {base} | {images}{' (all)' if budget == 'all' else ''} | {arm} | "
                             f"{levels[key + ('missing_class_iou',)].units} | " + " | ".join(cells) + " |")
    from dualsynth.study.report import trivial_section

    lines += trivial_section(out, sorted(ev.runs))
    lines += ["", "## Each arm against real only at the same budget", "",
              "Mean difference in points, paired by test tile and (image draw, seed), with its bootstrap 95 % "
              "interval; the verdict reads the interval only (above 0: helps, below 0: hurts, else no evidence).", "",
              "| base | images | arm | Missing Class IoU | verdict | mIoU (per image) | verdict | accuracy | verdict |",
              "|---|---:|---|---|---|---|---|---|---|"]
    by_key: dict[tuple, dict[str, dict]] = {}
    for d in diffs:
        by_key.setdefault((d["base"], d["images"], d["arm"]), {})[d["metric"]] = d
    for (base, images, arm), ms in by_key.items():
        cells = []
        for m in STAT_METRICS:
            d = ms[m]
            cells += [_interval(Interval(d["difference"], d["low"], d["high"], d["units"]), True), d["verdict"]]
        lines.append(f"| {base} | {images} | {arm} | " + " | ".join(cells) + " |")
    if len(config.subset_seeds) > 1:
        lines += ["", "## Effect of the image draw", "", "Real-only test Missing Class IoU (%) per draw of the "
                  "budget's images (mean over U-Net seeds):", "", "| base | images | " +
                  " | ".join(f"draw {d}" for d in config.subset_seeds) + " |", "|---|---:|" + "---:|" * len(config.subset_seeds)]
        for base, blist in budgets.items():
            for budget, images in blist:
                if budget == "all":
                    continue
                runs = ev.select(base, budget, "real")
                cells = []
                for d in config.subset_seeds:
                    vals = [ev.scores(r.name, "missing_class_iou").score() for u, r in runs.items() if u[0] == d]
                    cells.append(_pct(float(np.mean(vals))) if vals else "-")
                lines.append(f"| {base} | {images} | " + " | ".join(cells) + " |")
    fid = _fidelity_lines(config, out)
    if fid:
        lines += ["", "## Fidelity of each synthetic set", "",
                  "`dualsynth fidelity` of each budget's synthetic set against that budget's real tiles "
                  "(generators/NAME/fidelity/fidelity.md), to compare with the arms' results above:", ""] + fid
    lines += ["", "## Figures", ""]
    if "missing_class_iou" in paths:
        lines += [f"![label efficiency]({EFFICIENCY_FIGURE})", "",
                  f"![per-image mIoU]({MIOU_FIGURE})", "",
                  "The per-image mIoU averages each test tile's mIoU: stray pixels of a class a tile lacks count "
                  "against it, which the pooled mIoU hides.", ""]
    if pair is not None:
        if "comparison" in paths:
            lines += [f"![{pair[0].arm} vs {pair[1].arm}]({COMPARISON_FIGURE})", ""]
        lines += [f"Figure 20-style: `{pair[0].name}` against `{pair[1].name}` on the test tiles where their "
                  "per-image Missing Class IoU differs most (config keys `compare`, `compare_budget`)"
                  + (f"; {comparison_note}" if comparison_note else "."), ""]
    lines += ["Files: `results.csv` (one row per run and metric), `differences.csv`, `labels_saved.csv`, "
              "`budgets/NAME/` (each budget's dataset), `generators/NAME/` (its VQ-VAE, prior, synthetic set, "
              "fidelity), `runs/NAME/` (U-Nets; `evaluation/per_image.csv` holds the per-tile scores).", ""]
    return "\n".join(lines)


def _headline(saved: list[dict]) -> str:
    """'labels saved': the smallest budget at which real + synthetic matches real only at the next budget while
    real only at that budget does not (the control: otherwise more labels did not help and nothing was saved)."""
    if not saved or not any(s["arm"].startswith("synthetic-") for s in saved):
        return "**Labels saved: not measured** (needs the real and synthetic arms at two or more budgets)."
    matched = sorted((s for s in saved if s["arm"].startswith("synthetic-") and s["matches"]),
                     key=lambda s: (s["images"], -s["difference"]))
    hits = [s for s in matched if s.get("real_matches_too") is False]
    if hits:
        s = hits[0]
        return (f"**Labels saved: {s['next_images'] - s['images']}** ({s['base']}): with {s['images']} labelled "
                f"images, real + synthetic ({s['arm']}) matches real only with {s['next_images']} images: difference "
                f"{_signed(s['difference'])} points, 95 % interval [{_signed(s['low'])}, {_signed(s['high'])}], "
                f"while real only with {s['images']} images does not.")
    controlled = [s for s in matched if s.get("real_matches_too")]
    if not controlled and matched:  # real only has not finished at that budget (a partial study)
        return ("**Labels saved: not measured yet**: real + synthetic matches real only at the next budget, but "
                "real only at the smaller budget (the control) has not finished.")
    if controlled:
        s = controlled[0]
        c = next(r for r in saved if r["arm"] == "real" and r["base"] == s["base"] and r["budget"] == s["budget"])
        return (f"**Labels saved: not shown** ({s['base']}). Real + synthetic ({s['arm']}) with {s['images']} images "
                f"matches real only with {s['next_images']} images ({_signed(s['difference'])} points, "
                f"[{_signed(s['low'])}, {_signed(s['high'])}]), but so does real only with {s['images']} images "
                f"({_signed(c['difference'])}, [{_signed(c['low'])}, {_signed(c['high'])}]): more labels did not "
                "measurably help here, so matching them shows no saving.")
    return ("**Labels saved: none.** At no budget did real + synthetic tiles match real only at the next "
            "larger budget (the 95 % interval of the difference lies below 0 everywhere).")
