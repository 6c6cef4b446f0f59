"""The study: run planning, a tiny study end to end (CLI), restart skips finished runs, backends, bad input."""

from __future__ import annotations

import json

import pytest
import yaml

from dualsynth.errors import InputError
from dualsynth.io import read_csv
from dualsynth.study import aggregate, load_study_config, plan_runs, run_study
from tests.helpers import run_cli
from tests.test_segmentation import CLASSES, squares_dataset

TINY_SEG = {"preset": "quick", "set": {"epochs": 1, "crop": 24, "batch_size": 4, "model.encoder_depth": 3,
                                       "model.decoder_channels": [16, 8, 8]}}


def write_study(tmp_path, **changes):
    """Datasets and a study.yaml with relative paths: by default two runs (HQ at 0 % and 50 %)."""
    if not (tmp_path / "hq").exists():
        squares_dataset(tmp_path / "hq")
        squares_dataset(tmp_path / "synth", n_train=12, n_val=0, n_test=0, seed=7, origin="synthetic")
    config = {"bases": {"HQ": "hq"}, "synthetic": "synth", "percentages": [0, 50], "seeds": [0],
              "test": {"data": "hq", "split": "test"}, "seg": TINY_SEG, "overlays": 1, **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))  # None: leave the key out
    return path


def test_plan_runs_counts_and_names(tmp_path):
    path = write_study(tmp_path, bases={"HQ": "hq", "LQ": "hq"}, percentages=[0, 50, 100], synthetic_only=[4],
                       seeds=[0, 1])
    config = load_study_config(path)
    runs = plan_runs(config)
    assert len(runs) == 2 * (2 * 3 + 1)
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert "HQ-000pct-seed0" in names and "LQ-100pct-seed1" in names and "synthetic-only-4-seed1" in names
    only = next(r for r in runs if r.synthetic_only)
    assert only.train is None and only.val == str(tmp_path / "hq")  # relative paths resolved to the file
    base = next(r for r in runs if r.percent == 0)
    assert base.synthetic is None


def test_aggregate_mean_and_sample_std():
    rows = [{"run": f"r{i}", "series": "HQ", "percent": 50.0, "synthetic_only": "", "metric": "miou", "class": "",
             "value": v} for i, v in enumerate([0.5, 0.7, 0.9])]
    (point,) = aggregate(rows, "miou")
    assert point.n == 3 and point.mean == pytest.approx(0.7) and point.std == pytest.approx(0.2)


def test_tiny_study_end_to_end_and_restart(tmp_path, capsys):
    path = write_study(tmp_path)
    out = tmp_path / "study"
    code, stdout, err = run_cli(["study", "--config", path, "--out", out], capsys)
    assert code == 0, err
    assert "0 already finished, 2 to do" in err
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["HQ-000pct-seed0", "HQ-050pct-seed0"]
    manifest = json.loads((out / "runs" / "HQ-050pct-seed0" / "manifest.json").read_text())["inputs"]
    assert manifest["tiles"] == {"real_train": 8, "synthetic_train": 4, "val": 4}

    rows = read_csv(out / "results.csv")
    assert len(rows) == 2 * (4 + 2 * len(CLASSES))  # 4 overall metrics, per-class MCIoU and IoU
    per_class = [r for r in rows if r["metric"] == "missing_class_iou" and r["class"]]
    assert {r["class"] for r in per_class} == {c.name for c in CLASSES}
    evaluation = json.loads((out / "runs" / "HQ-000pct-seed0" / "evaluation" / "summary.json").read_text())
    mci = next(r for r in rows if r["run"] == "HQ-000pct-seed0" and r["metric"] == "missing_class_iou" and not r["class"])
    assert float(mci["value"]) == pytest.approx(evaluation["missing_class_iou"], abs=1e-5)
    for name in ("fig15_accuracy.png", "fig16_miou.png", "fig17_missing_class_iou.png",
                 "fig19_missing_class_iou_per_class.png", "summary.csv", "study.yaml"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## Best model per metric" in report and "![Missing Class IoU](fig17_missing_class_iou.png)" in report
    assert "HQ [50 %]" in report and "HQ [0 %]" in report

    stamp = (out / "runs" / "HQ-000pct-seed0" / "checkpoints" / "best.pt").stat().st_mtime_ns
    code, stdout, err = run_cli(["study", "--config", path, "--out", out], capsys)
    assert code == 0, err
    assert "2 already finished, 0 to do" in err and "(2 already finished, 0 trained now)" in stdout
    assert (out / "runs" / "HQ-000pct-seed0" / "checkpoints" / "best.pt").stat().st_mtime_ns == stamp


def test_restart_continues_an_unfinished_run(tmp_path):
    path = write_study(tmp_path, percentages=[0])
    out = tmp_path / "study"
    config = load_study_config(path)
    run_study(config, out, log=lambda _: None, progress=False)
    run = out / "runs" / "HQ-000pct-seed0"
    (run / "evaluation" / "summary.json").unlink()  # as if the study was killed before the evaluation
    lines: list[str] = []
    summary = run_study(config, out, log=lines.append, progress=False)
    assert summary["trained"] == 1 and "1 to do" in lines[0]
    assert len(read_csv(run / "log.csv")) == 1  # training had finished: resumed without another epoch
    assert (run / "evaluation" / "summary.json").is_file()


def test_synthetic_only_series_and_workers(tmp_path):
    path = write_study(tmp_path, percentages=[0], synthetic_only=[6])
    out = tmp_path / "study"
    summary = run_study(load_study_config(path), out, workers=2, log=lambda _: None, progress=False)
    assert summary["trained"] == 2, summary
    manifest = json.loads((out / "runs" / "synthetic-only-6-seed0" / "manifest.json").read_text())["inputs"]
    assert manifest["tiles"] == {"real_train": 0, "synthetic_train": 6, "val": 4}
    rows = read_csv(out / "results.csv")
    assert {r["series"] for r in rows} == {"HQ", "synthetic-only"}


def test_ray_backend(tmp_path):
    ray = pytest.importorskip("ray")
    # one task at a time on both CPUs: a single Ray worker process imports torch once for both runs
    path = write_study(tmp_path, ray_cpus_per_task=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_study(load_study_config(path), tmp_path / "study", backend="ray", log=lambda _: None)
    finally:
        ray.shutdown()
    assert summary["trained"] == 2
    assert len({r["run"] for r in read_csv(tmp_path / "study" / "results.csv")}) == 2


def test_bad_study_input_is_one_line_exit_2(tmp_path, capsys):
    cases = [
        ({"percentage": [0, 50]}, "unknown config key 'percentage'"),
        ({"synthetic": "nowhere"}, "nowhere"),
        ({"seg": {"preset": "quick", "set": {"epoch": 1}}}, "unknown config key 'epoch'"),
        ({"synthetic_only": [99]}, "only 12"),
        ({"test": {"data": "synth", "split": "train"}}, "real tiles only"),
        ({"bases": {"HQ": "hq", "bad name": "hq"}}, "bad name"),
    ]
    write_study(tmp_path)
    for changes, needle in cases:
        path = write_study(tmp_path, **changes)
        code, _, err = run_cli(["study", "--config", path, "--out", tmp_path / "o"], capsys)
        assert code == 2, (changes, err)
        assert err.startswith("error:") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o" / "runs").exists()  # nothing trained before the input was checked
    two = squares_dataset(tmp_path / "two", classes=CLASSES[:2])
    with pytest.raises(InputError, match="classes"):
        run_study(load_study_config(write_study(tmp_path, bases={"HQ": "hq", "TWO": str(two)})), tmp_path / "o")


def test_example_config_and_repeats(tmp_path):
    from pathlib import Path

    example = load_study_config(Path(__file__).resolve().parents[1] / "configs" / "study-example.yaml")
    assert example.percentages == [0, 50, 75, 100, 150, 200, 250, 300] and example.seeds == [0, 1, 2]
    assert len(plan_runs(example)) == 3 * (2 * 8 + 3)
    config = load_study_config(write_study(tmp_path, repeats=3, seeds=None))
    assert config.seeds == [0, 1, 2]


def test_gain_verdict_weighs_the_difference_against_the_seed_spread():
    from dualsynth.study import Point, gain_verdict

    base = Point("A", 0, None, 0.880, 0.002, 3, [])
    assert "within 2" in gain_verdict(base, Point("A", 50, None, 0.882, 0.002, 3, []))
    assert "beyond 2" in gain_verdict(base, Point("A", 50, None, 0.900, 0.002, 3, []))
    assert "no seed spread" in gain_verdict(Point("A", 0, None, 0.88, 0.0, 1, []), Point("A", 50, None, 0.9, 0.0, 1, []))


def test_far_off_synthetic_only_points_do_not_flatten_the_other_series():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualsynth.study.report import Point, _keep_main_series_readable

    fig, ax = plt.subplots()
    main = [Point("A", 0, None, 0.880, 0.002, 3, []), Point("A", 50, None, 0.884, 0.001, 3, [])]
    ax.plot([0, 50, 100], [88.0, 88.4, 56.0])
    _keep_main_series_readable(ax, main + [Point("s-only", None, 160, 0.56, 0.2, 3, [])], [(100.0, 56.0)])
    low, high = ax.get_ylim()
    assert 86 < low < 88 and 88.4 < high < 90
    assert any("56.0" in t.get_text() for t in ax.texts)
    plt.close(fig)


def _children(pid: int) -> set[int]:
    from pathlib import Path

    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found |= {int(p) for p in text.split()}
    return found


def _alive(pid: int) -> bool:
    from pathlib import Path

    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_workers_stop_when_the_study_is_killed_and_a_restart_finishes_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    seg = {"preset": "quick", "set": {**TINY_SEG["set"], "epochs": 40, "early_stop_patience": 100}}
    path = write_study(tmp_path, seg=seg)
    out = tmp_path / "study"
    cmd = [sys.executable, "-c", "from dualsynth.cli import main; main()", "study", "--config", str(path),
           "--out", str(out), "--workers", "2", "--threads", "1"]
    study = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logs = [out / "runs" / name / "log.csv" for name in ("HQ-000pct-seed0", "HQ-050pct-seed0")]
    deadline = time.time() + 120
    while not all(p.exists() for p in logs) and time.time() < deadline:  # both workers are training
        time.sleep(0.2)
    assert all(p.exists() for p in logs), "the workers did not start"
    workers = _children(study.pid)
    assert len(workers) >= 2
    os.kill(study.pid, signal.SIGKILL)  # the study's own process only
    study.wait()
    deadline = time.time() + 15
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "worker processes outlived the killed study"
    assert not all((out / "runs" / n / "evaluation" / "summary.json").exists() for n in ("HQ-000pct-seed0", "HQ-050pct-seed0"))

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-1500:]
    for name in ("HQ-000pct-seed0", "HQ-050pct-seed0"):
        rows = read_csv(out / "runs" / name / "log.csv")
        assert [int(r["epoch"]) for r in rows] == list(range(1, 41))  # resumed, every epoch once
        assert (out / "runs" / name / "evaluation" / "summary.json").is_file()
