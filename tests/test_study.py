"""The study: run planning, a tiny study end to end (CLI), restart skips finished runs, backends, bad input."""

from __future__ import annotations

import json
from pathlib import Path

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
    # the synthetic set's fidelity against the base, measured once, its headline in the report
    fid = json.loads((out / "fidelity" / "synthetic" / "fidelity.json").read_text())
    assert fid["headline"]["high_frequency_power_ratio"] > 0
    assert "## Fidelity of each synthetic set" in report and "- `synthetic`: fidelity: HF power ratio" in report
    fid_stamp = (out / "fidelity" / "synthetic" / "fidelity.json").stat().st_mtime_ns

    stamp = (out / "runs" / "HQ-000pct-seed0" / "checkpoints" / "best.pt").stat().st_mtime_ns
    code, stdout, err = run_cli(["study", "--config", path, "--out", out], capsys)
    assert code == 0, err
    assert "2 already finished, 0 to do" in err and "(2 already finished, 0 trained now)" in stdout
    assert (out / "runs" / "HQ-000pct-seed0" / "checkpoints" / "best.pt").stat().st_mtime_ns == stamp
    assert (out / "fidelity" / "synthetic" / "fidelity.json").stat().st_mtime_ns == fid_stamp


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


def test_list_schedule_and_held_back_tail_runs():
    from dualsynth.study.runner import THREAD_SPEEDUP_PER_DOUBLING, list_schedule, tail_runs

    assert list_schedule([3, 3, 2, 2, 1], 2) == 6  # 3+2+1 on one worker, 3+2 on the other
    assert list_schedule([5], 4) == 5 and list_schedule([], 2) == 0
    assert THREAD_SPEEDUP_PER_DOUBLING == 1.5
    # the demo's seven runs on two workers: three pairs, then the last one alone on both cores
    assert tail_runs([112, 112, 84, 84, 56, 56, 56], 2) == 1  # 252 + 56 / 1.5 < 308
    assert tail_runs([6, 6, 6], 2) == 1  # 6 + 4 < 12
    assert tail_runs([12, 9, 6], 2) == 0  # 12 + 6 / 1.5 = 16 > 15: better started at once on one thread
    assert tail_runs([4, 4, 4, 4], 2) == 0  # nothing left over
    assert tail_runs([4, 4, 4, 4, 4], 4) == 1  # one left over gets four workers' threads: 2.25x
    assert tail_runs([4, 4, 4, 4, 4, 4], 4) == 2  # 4 + 4 / 1.5 < 8
    assert tail_runs([4, 4], 1) == 0 and tail_runs([4], 2) == 0


def test_a_run_left_over_trains_alone_with_the_threads_of_both_workers(tmp_path):
    path = write_study(tmp_path, percentages=[0], seeds=[0, 1, 2])
    out = tmp_path / "study"
    lines: list[str] = []
    summary = run_study(load_study_config(path), out, workers=2, threads=1, log=lines.append, progress=False)
    assert summary["trained"] == 3, summary
    assert "study: 2 worker(s) side by side, the last 1 run(s) then with the cores of the others" in lines
    threads = {name: json.loads((out / "runs" / name / "manifest.json").read_text())["threads"]
               for name in ("HQ-000pct-seed0", "HQ-000pct-seed1", "HQ-000pct-seed2")}
    assert threads == {"HQ-000pct-seed0": 1, "HQ-000pct-seed1": 1, "HQ-000pct-seed2": 2}, threads


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

    configs = Path(__file__).resolve().parents[1] / "configs"
    label = load_study_config(configs / "study-example.yaml")
    assert label.label_efficiency and label.real_images == [2, 4, "all"] and label.seg.set == {"steps": 400}
    assert label.arms == ["real", "augment", "copy_paste", "synthetic", "synthetic_only"]
    assert label.synthetic_percentages == [100, 200] and label.bases["HQ"] == configs / "../demo-out/data/hq"
    example = load_study_config(configs / "study-fixed-example.yaml")
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

    # a class missing from some runs' test tiles has no IoU there (NaN): the limits come from the others
    fig, ax = plt.subplots()
    nan = float("nan")
    ax.plot([0, 50, 100], [88.0, 88.4, 56.0])
    _keep_main_series_readable(ax, [Point("A", 100, None, nan, nan, 3, []), *main,
                                    Point("s-only", None, 160, 0.56, 0.2, 3, [])], [(150.0, nan), (100.0, 56.0)])
    low, high = ax.get_ylim()
    assert 86 < low < 88 and 88.4 < high < 90
    plt.close(fig)


def _children(pid: int, deep: bool = True) -> set[int]:
    """The processes below `pid` (`deep`: all of them; the workers are children of a fork server, itself a
    child of the study), else its children only."""
    from pathlib import Path

    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        for child in map(int, text.split()):
            found |= {child} | (_children(child) if deep else set())
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
    # the two workers fork from a server process the study started: grandchildren of the study
    assert len(workers - _children(study.pid, deep=False)) >= 2, "the workers are not among the study's descendants"
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


# --- label-efficiency studies ---------------------------------------------------------------------------------

TINY_GENERATOR = {
    "preset": "quick",
    "vqvae": {"set": {"model": {"hidden": 8, "res_hidden": 4, "res_layers": 1, "embedding_dim": 4, "num_embeddings": 6,
                                "dead_code_steps": 0}, "tile": 16, "batch_size": 4, "steps": 20, "log_every": 10,
                      "monitor_every": 20, "checkpoint_every": 10}},
    "prior": {"set": {"arch": "gated", "gated": {"hidden": 8, "num_layers": 3, "skip": 8}, "crop": 4, "batch_size": 4,
                      "steps": 10, "eval_every": 5, "checkpoint_every": 5}},
    "sample": {"texture": True},  # the real fine texture of each budget's own tiles (dualsynth texture)
}


def demo_tiles(root):
    """The project's procedural demo micrographs cut into 4 tiles each by `prepare` (split by image: 8 train,
    2 val, 2 test micrographs), so a budget of n images holds 4n tiles."""
    from dualsynth.data import PrepareOptions, prepare
    from dualsynth.demo_data import write_demo_dataset
    from dualsynth.io import write_yaml

    if not (root / "hq").exists():
        write_demo_dataset(root / "raw", n=12, size=64, seed=0, overwrite=True)
        splits: dict[str, list[str]] = {}
        for row in read_csv(root / "raw" / "hq" / "manifest.csv"):
            splits.setdefault(row["split"], []).append(row["file"])
        write_yaml(root / "splits.yaml", splits)
        prepare(PrepareOptions(images=root / "raw/hq/images", masks=root / "raw/hq/masks", out=root / "hq", tile=32,
                               classes=root / "raw/hq/classes.yaml", splits=root / "splits.yaml"), progress=False)
    return root / "hq"


def write_label_study(root, **changes):
    demo_tiles(root)
    config = {"bases": {"HQ": "hq"}, "real_images": [2, "all"], "generator": TINY_GENERATOR,
              "arms": ["real", "augment", "copy_paste", "synthetic", "synthetic_only"], "percentages": [0, 100], "seeds": [0],
              "test": {"data": "hq", "split": "test"}, "seg": TINY_SEG, "overlays": 0, "bootstrap": 500, **changes}
    path = root / "label.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    return path


def test_tiny_label_efficiency_study(tmp_path, capsys):
    """A tiny label-efficiency study run once (budgets 2 and all, a generator per budget, five arms, one seed),
    then checked, planned, rebuilt with --report-only and restarted (one test: the study runs once, also when
    the tests are spread over processes)."""
    study = _run_label_study(tmp_path)
    _check_label_study(study)
    _check_plan_report_only_and_restart(study, capsys)
    _check_bootstrap_point_estimate(study)


def _run_label_study(root):
    path = write_label_study(root)
    out = root / "study"
    lines: list[str] = []
    summary = run_study(load_study_config(path), out, workers=1, threads=1, progress=False, log=lines.append)
    return root, path, out, summary, "\n".join(lines)


def _check_label_study(label_study):
    root, path, out, summary, log = label_study
    assert "2 generators, 0 already finished, 2 to do" in log
    assert summary["runs"] == 10 and summary["trained"] == 10 and summary["generators_trained"] == 2
    # the budget folder holds every tile of its 2 chosen images and the base's val split, nothing else
    from dualsynth.data import DatasetFolder

    budget = DatasetFolder(out / "budgets" / "HQ-2img-d0")
    train = budget.records(split="train")
    assert len({r.source for r in train}) == 2 and len(train) == 8
    assert len(budget.records(split="val")) == len(DatasetFolder(root / "hq").records(split="val"))
    assert not budget.records(split="test")
    assert len(DatasetFolder(out / "budgets" / "HQ-all").records(split="train")) == 32
    # each budget's synthetic micrographs carry the texture fitted on that budget's tiles only
    for name in ("HQ-2img-d0", "HQ-all"):
        sample = json.loads((out / "generators" / name / "synthetic" / "sample.json").read_text())
        assert Path(sample["texture"]["real"]) == (out / "budgets" / name).resolve()
    for g in ("HQ-2img-d0", "HQ-all"):
        stages = json.loads((out / "generators" / g / "stages.json").read_text())
        assert list(stages) == ["vqvae", "prior", "sample", "fidelity"]
        assert (out / "generators" / g / "fidelity" / "fidelity.json").is_file()
    # the generator of budget 2 samples what its arms need: 100 % of 8 tiles, synthetic-only 8 tiles
    assert len(DatasetFolder(out / "generators" / "HQ-2img-d0" / "synthetic").records()) == 8
    manifest = json.loads((out / "runs" / "HQ-2img-d0-synthetic-100-seed0" / "manifest.json").read_text())["inputs"]
    assert manifest["tiles"] == {"real_train": 8, "synthetic_train": 8, "val": 8}
    assert all("/generators/HQ-2img-d0/synthetic/" in f for f in manifest["synthetic_train_files"])
    augment = yaml.safe_load((out / "runs" / "HQ-2img-d0-augment-seed0" / "config.yaml").read_text())
    assert augment["augment"] == "paper" and augment["train"].endswith("budgets/HQ-2img-d0")
    copy_paste = yaml.safe_load((out / "runs" / "HQ-all-copy_paste-seed0" / "config.yaml").read_text())
    assert copy_paste["augment"] == "copy_paste"
    # step-matched by default: no seg steps given, so every run takes the 1 epoch of the largest budget's
    # 32 tiles in batches of 4 = 8 updates, the 8-tile and the 16-tile runs alike
    for name in ("HQ-2img-d0-real-seed0", "HQ-2img-d0-synthetic-100-seed0", "HQ-all-synthetic-100-seed0"):
        run_config = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        assert run_config["steps"] == 8, name

    rows = read_csv(out / "results.csv")
    assert {r["arm"] for r in rows} == {"real", "augment", "copy_paste", "synthetic-100", "synthetic_only"}
    assert {(r["budget"], r["images"]) for r in rows} == {("2", "2"), ("all", "8")}
    diffs = read_csv(out / "differences.csv")
    assert len(diffs) == 2 * 4 * 3  # budgets x arms other than real x metrics
    assert all(d["verdict"] in ("helps", "no evidence", "hurts") for d in diffs)
    for d in diffs:  # the verdict follows the interval
        low, high = float(d["low"]), float(d["high"])
        assert d["verdict"] == ("helps" if low > 0 else "hurts" if high < 0 else "no evidence")
    saved = read_csv(out / "labels_saved.csv")
    assert {(s["arm"], s["images"], s["next_images"]) for s in saved} == {("real", "2", "8"),
        ("augment", "2", "8"), ("copy_paste", "2", "8"), ("synthetic-100", "2", "8"), ("synthetic_only", "2", "8")}
    control = next(s for s in saved if s["arm"] == "real")  # the control row: real only against more real labels
    assert all(s["real_matches_too"] == control["matches"] for s in saved)
    report = (out / "report.md").read_text()
    assert "`seg.steps` was not given, so every U-Net takes 8 optimizer steps" in report
    assert "**Labels saved: " in report and "## Each arm against real only at the same budget" in report
    assert "the 8 test tiles (the test set has only 2 source micrographs" in report
    assert "`HQ-2img-d0` (2 images, 8 pairs sampled): fidelity: HF power ratio" in report
    for name in ("label_efficiency.png", "per_image_miou.png", "fig20_comparison.png"):
        assert (out / name).is_file() and f"]({name})" in report


def _check_plan_report_only_and_restart(label_study, capsys):
    root, path, out, _, _ = label_study
    code, stdout, _ = run_cli(["study", "--config", path, "--out", out, "--plan"], capsys)
    assert code == 0
    assert "[done] HQ-2img-d0: vqvae" in stdout and "[done] HQ-all: fidelity" in stdout
    assert "[done] HQ-all-synthetic_only-seed0" in stdout and "[todo]" not in stdout
    assert "10 U-Net runs, 10 finished" in stdout

    report, diffs = (out / "report.md").read_text(), (out / "differences.csv").read_text()
    results = (out / "results.csv").read_text()
    (out / "report.md").unlink()
    (out / "label_efficiency.png").unlink()
    (out / "results.csv").unlink()  # as after a study stopped before its end wrote it: rebuilt from the runs
    code, stdout, err = run_cli(["study", "--config", path, "--out", out, "--report-only"], capsys)
    assert code == 0, err
    assert (out / "report.md").read_text() == report and (out / "differences.csv").read_text() == diffs
    assert (out / "results.csv").read_text() == results
    assert (out / "label_efficiency.png").is_file()

    stamp = (out / "generators" / "HQ-all" / "synthetic" / "manifest.csv").stat().st_mtime_ns
    code, stdout, err = run_cli(["study", "--config", path, "--out", out, "--threads", "1"], capsys)
    assert code == 0, err
    assert "2 generators, 2 already finished, 0 to do" in err and "(10 already finished, 0 trained now)" in stdout
    assert (out / "generators" / "HQ-all" / "synthetic" / "manifest.csv").stat().st_mtime_ns == stamp
    # a plan of a larger study marks what is new
    bigger = write_label_study(root, seeds=[0, 1])
    code, stdout, _ = run_cli(["study", "--config", bigger, "--out", out, "--plan"], capsys)
    assert "[todo] HQ-2img-d0-real-seed1" in stdout and "[done] HQ-2img-d0-real-seed0" in stdout
    assert not (out / "runs" / "HQ-2img-d0-real-seed1").exists()  # --plan ran nothing
    # U-Net checkpoints are large and users delete them: the report is still rebuilt, the comparison figure kept
    import shutil

    for folder in (out / "runs").glob("*/checkpoints"):
        shutil.rmtree(folder)
    code, stdout, err = run_cli(["study", "--config", path, "--out", out, "--report-only"], capsys)
    assert code == 0, err
    report = (out / "report.md").read_text()
    assert "not redrawn by this build" in report and "the figure is the one drawn before" in report
    assert "](fig20_comparison.png)" in report and (out / "fig20_comparison.png").is_file()


def _check_bootstrap_point_estimate(label_study):
    """The bootstrap's point estimate is the evaluation's own summary value (per-tile rows reproduce it)."""
    from dualsynth.study.stats import TileScores, bootstrap, resampling_groups

    root, path, out, _, _ = label_study
    evaluation = out / "runs" / "HQ-2img-d0-real-seed0" / "evaluation"
    summary = json.loads((evaluation / "summary.json").read_text())
    rows = read_csv(evaluation / "per_image.csv")
    files = sorted(r["file"] for r in rows)
    groups, _ = resampling_groups(files)
    for metric in ("missing_class_iou", "mean_image_miou", "pixel_accuracy"):
        iv = bootstrap([TileScores.from_rows(rows, files, metric)], None, groups, 200)
        assert iv.mean == pytest.approx(summary[metric], abs=1e-5), metric
        assert iv.low <= iv.mean <= iv.high


def _scores(values):
    import numpy as np

    from dualsynth.study.stats import TileScores

    v = np.asarray(values, float)
    return TileScores(np.nan_to_num(v), (~np.isnan(v)).astype(float))


def _saved(arm, images, nxt, low, high, control):
    return {"base": "HQ", "budget": str(images), "images": images, "arm": arm, "next_budget": str(nxt),
            "next_images": nxt, "difference": (low + high) / 2, "low": low, "high": high, "matches": high >= 0,
            "units": 8, "real_matches_too": control}


def test_labels_saved_headline_needs_the_real_only_control_to_fail():
    from dualsynth.study.efficiency import _headline

    # budget 2: real only is clearly below real only at 4, synthetic matches it -> 2 labels saved
    rows = [_saved("real", 2, 4, -6.0, -2.0, False), _saved("synthetic-100", 2, 4, -1.0, 3.0, False)]
    assert _headline(rows).startswith("**Labels saved: 2** (HQ): with 2 labelled images")
    # real only with 2 images already matches real only with 4: more labels did not help, nothing is saved
    rows = [_saved("real", 2, 4, -1.0, 3.0, True), _saved("synthetic-100", 2, 4, 1.0, 8.0, True)]
    head = _headline(rows)
    assert head.startswith("**Labels saved: not shown** (HQ)") and "so does real only with 2 images" in head
    # the first budget's control matches, the next one's fails and synthetic matches there: 12 saved from 4
    rows += [_saved("real", 4, 16, -9.0, -3.0, False), _saved("synthetic-100", 4, 16, -2.0, 1.0, False)]
    assert _headline(rows).startswith("**Labels saved: 12** (HQ): with 4 labelled images")
    # synthetic below real only with more labels everywhere
    rows = [_saved("real", 2, 4, -6.0, -2.0, False), _saved("synthetic-100", 2, 4, -5.0, -1.0, False)]
    assert _headline(rows).startswith("**Labels saved: none.**")
    assert _headline([_saved("real", 2, 4, -6.0, -2.0, False)]).startswith("**Labels saved: not measured**")
    # a partial study: real only at budget 2 has not finished, so there is no control row yet
    assert _headline([_saved("synthetic-100", 2, 4, -1.0, 3.0, None)]).startswith("**Labels saved: not measured yet**")


def test_bootstrap_known_answers():
    import numpy as np

    from dualsynth.study.stats import bootstrap, resampling_groups, verdict

    rng = np.random.default_rng(0)
    groups, how = resampling_groups([f"s{i // 2}" for i in range(20)])  # 10 sources: resample micrographs
    assert groups.max() == 9 and "10 source micrographs" in how
    tiles, how = resampling_groups(["a", "a", "b"])
    assert list(tiles) == [0, 1, 2] and "3 test tiles" in how
    arms = [_scores(rng.uniform(0.3, 0.9, 20)) for _ in range(3)]  # three seeds
    same = bootstrap(arms, arms, groups, 500)
    assert same.mean == 0 and same.low <= 0 <= same.high and same.verdict == "no evidence"
    shifted = [_scores(a.num + 0.05) for a in arms]
    up = bootstrap(shifted, arms, groups, 500)
    assert up.mean == pytest.approx(0.05) and up.low == pytest.approx(0.05) and up.verdict == "helps"
    assert bootstrap(arms, shifted, groups, 500).verdict == "hurts"
    noisy = [_scores(a.num + rng.normal(0, 0.2, 20)) for a in arms]
    wide = bootstrap(noisy, arms, groups, 500)
    assert wide.low < wide.mean < wide.high
    # a tile where the score is undefined (nan) is left out, as the evaluation's nanmean does
    assert bootstrap([_scores([0.2, np.nan, 0.4])], None, np.arange(3), 100).mean == pytest.approx(0.3)
    assert verdict(0.01, 0.2) == "helps" and verdict(-0.2, -0.01) == "hurts" and verdict(-0.1, 0.1) == "no evidence"


def test_budgets_are_nested_subsets_of_whole_images(tmp_path):
    from dualsynth.study import choose_sources, load_study_config, plan_budgets

    names = [f"img{i}" for i in range(10)]
    for draw in (0, 1, 2):
        chosen = [set(choose_sources(names, n, draw)) for n in range(1, 11)]
        assert all(len(c) == n for n, c in enumerate(chosen, 1))
        assert all(small <= big for small, big in zip(chosen, chosen[1:]))
    assert choose_sources(names, 3, 0) != choose_sources(names, 3, 1)
    config = load_study_config(write_label_study(tmp_path, real_images=[1, 2, 4, "all"], subset_seeds=[0, 1]))
    budgets = plan_budgets(config, tmp_path / "out")
    assert [b.name for b in budgets] == ["HQ-1img-d0", "HQ-1img-d1", "HQ-2img-d0", "HQ-2img-d1", "HQ-4img-d0",
                                         "HQ-4img-d1", "HQ-all"]
    assert all(b.tiles == 4 * b.images for b in budgets)  # all 4 tiles of each chosen image
    for d in (0, 1):
        mine = [set(b.sources) for b in budgets if b.draw == d] + [set(budgets[-1].sources)]
        assert all(small <= big for small, big in zip(mine, mine[1:]))


ISSUE_EXAMPLE = """\
bases: {HQ: data/hq}
real_images: [2, all]                 # budgets of labelled source images
generator: {preset: quick}            # VQ-VAE + prior + sampling per budget and seed (or a section per stage)
arms: [real, augment, copy_paste, synthetic, synthetic_only]
percentages: [0, 100]                 # for the synthetic arm
seeds: [0, 1]
test: {data: data/hq, split: test}
seg: {preset: quick, set: {steps: 20}}   # step-matched: every U-Net run takes 20 optimizer steps
"""


def test_the_issues_example_config_is_accepted_as_written(tmp_path, capsys):
    demo_tiles(tmp_path / "data")
    path = tmp_path / "study.yaml"
    path.write_text(ISSUE_EXAMPLE)
    config = load_study_config(path)
    assert config.real_images == [2, "all"] and config.subset_seeds == [0] and config.generator.preset == "quick"
    assert config.synthetic_percentages == [100]
    runs = plan_runs(config, tmp_path / "out")
    assert len(runs) == 2 * 2 * 5  # seeds x budgets x (real, augment, copy_paste, synthetic-100, synthetic_only)
    assert {r.arm for r in runs} == {"real", "augment", "copy_paste", "synthetic-100", "synthetic_only"}
    assert next(r for r in runs if r.arm == "copy_paste").seg_set == {"augment": "copy_paste"}
    from dualsynth.study.budgets import label_seg_config
    from dualsynth.study.plan import plan_budgets

    seg, note = label_seg_config(config, plan_budgets(config, tmp_path / "out"))
    assert seg["steps"] == 20 and "every U-Net takes 20 optimizer steps" in note
    epochs = load_study_config(path, {"seg": {"set": {"steps": None, "epochs": 3}}})
    seg, note = label_seg_config(epochs, plan_budgets(epochs, tmp_path / "out"))
    assert seg["steps"] is None and seg["epochs"] == 3 and note.startswith("Epoch-based training")
    code, stdout, err = run_cli(["study", "--config", path, "--out", tmp_path / "out", "--plan"], capsys)
    assert code == 0, err
    assert "[todo] HQ-2img-d0: vqvae" in stdout and "[todo] HQ-all: sample (32 pairs)" in stdout
    assert "20 U-Net runs, 0 finished" in stdout


def test_label_study_config_errors_are_one_line(tmp_path, capsys):
    write_label_study(tmp_path)
    squares_dataset(tmp_path / "synth", n_train=12, n_val=0, n_test=0, seed=7, origin="synthetic")
    cases = [
        ({"synthetic": "synth"}, "write generator: {preset: quick}"),
        ({"real_images": [2, 99]}, "budget 99 is more than the 8 training source images"),
        ({"real_images": [2, 2]}, "distinct"),
        ({"arms": ["augment", "synthetic"]}, "'real' is needed"),
        ({"arms": ["real", "cutmix"]}, "arms"),
        ({"percentages": [0]}, "the synthetic arm needs a percentage above 0"),
        ({"generator": {"vqvae": {"set": {"stepz": 3}}}}, "unknown config key 'stepz'"),
        ({"compare": ["real"]}, "name two models"),
        ({"real_images": None, "synthetic": "synth", "arms": ["real"]}, "only for a label-efficiency study"),
        # fewer pairs than the arms need: refused before any generator trains
        ({"generator": {**TINY_GENERATOR, "sample": {"count": 3}}}, "needs 8"),
    ]
    for changes, needle in cases:
        path = write_label_study(tmp_path, **changes)
        code, _, err = run_cli(["study", "--config", path, "--out", tmp_path / "o"], capsys)
        assert code == 2, (changes, err)
        assert err.startswith("error:") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o" / "runs").exists()


def test_old_style_keys_still_run_a_fixed_synthetic_set(tmp_path):
    # today's `synthetic` folder and `synthetic_only` sizes, without real_images: the study of a given set
    config = load_study_config(write_study(tmp_path, percentages=[0, 50], synthetic_only=[4]))
    assert not config.label_efficiency and config.synthetic_only == [4]
    assert [r.name for r in plan_runs(config)] == ["HQ-000pct-seed0", "HQ-050pct-seed0", "synthetic-only-4-seed0"]


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_study_killed_during_a_generator_stage_resumes_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    generator = {**TINY_GENERATOR, "fidelity": False,
                 "vqvae": {"set": {**TINY_GENERATOR["vqvae"]["set"], "steps": 150, "checkpoint_every": 10}}}
    path = write_label_study(tmp_path, generator=generator, arms=["real", "synthetic_only"])
    out = tmp_path / "study"
    cmd = [sys.executable, "-c", "from dualsynth.cli import main; main()", "study", "--config", str(path),
           "--out", str(out), "--workers", "1", "--threads", "1"]
    study = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "generators" / "HQ-all" / "vqvae" / "checkpoints" / "last.pt"
    deadline = time.time() + 180
    while not last.exists() and time.time() < deadline and study.poll() is None:  # the 2nd generator is training
        time.sleep(0.1)
    assert last.exists(), "the second generator did not start"
    os.kill(study.pid, signal.SIGKILL)
    study.wait()
    first = out / "generators" / "HQ-2img-d0"
    assert json.loads((first / "stages.json").read_text()).keys() == {"vqvae", "prior", "sample"}
    assert not (out / "generators" / "HQ-all" / "stages.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (first / "vqvae" / "checkpoints" / "last.pt", first / "synthetic" / "manifest.csv")}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-1500:]
    assert "2 generators, 1 already finished, 1 to do" in again.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the finished generator was not redone
    steps = [int(r["step"]) for r in read_csv(out / "generators" / "HQ-all" / "vqvae" / "log.csv")]
    assert steps == list(range(10, 151, 10))  # resumed from its last checkpoint: every logged step once
    assert len(read_csv(out / "results.csv")) > 0 and (out / "report.md").is_file()
    # the finished generators are not silently reused under other generator settings
    assert write_label_study(tmp_path, generator={**generator, "sample": {"temperature": 0.5}},
                             arms=["real", "synthetic_only"]) == path  # the same config file, rewritten
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "made with other settings" in again.stderr, again.stderr[-1500:]
    assert again.stderr.strip().count("\n") == 0


def test_generators_train_side_by_side_with_the_same_result_as_one_after_another(tmp_path):
    import hashlib

    generator = {**TINY_GENERATOR, "fidelity": False}
    digests = []
    for workers in (1, 2):
        root = tmp_path / f"w{workers}"
        path = write_label_study(root, generator=generator, arms=["real", "synthetic_only"])
        lines: list[str] = []
        run_study(load_study_config(path), root / "study", workers=workers, threads=1, progress=False, log=lines.append)
        assert ("study: 2 generators side by side" in lines) == (workers == 2), lines
        digests.append({p.relative_to(root / "study").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted((root / "study" / "generators").glob("*/synthetic/images/*"))})
    assert len(digests[0]) == 8 + 32 and digests[0] == digests[1]  # budget 2 (8 pairs) and all (32 pairs)


def test_report_names_runs_that_learned_nothing(tmp_path):
    from dualsynth.study.report import trivial_section

    def summary(name, pred):
        folder = tmp_path / "runs" / name / "evaluation"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({
            "predicted_fraction": {"background": pred, "oxide": 1 - pred}, "true_fraction": {"background": 0.8, "oxide": 0.2}}))

    summary("HQ-all-real-seed0", 0.999)  # all background but for stray pixels
    summary("HQ-all-real-seed1", 0.85)
    (tmp_path / "runs" / "HQ-all-real-seed2").mkdir()  # unfinished: no evaluation
    lines = trivial_section(tmp_path, ["HQ-all-real-seed0", "HQ-all-real-seed1", "HQ-all-real-seed2"])
    assert lines[1] == "## Runs that learned nothing" and "1 of 3 finished runs" in lines[3]
    assert lines[-1].startswith("- `HQ-all-real-seed0`: the model predicts 'background' for 99.9 % of the pixels (truth: 80.0 %)")
    assert trivial_section(tmp_path, ["HQ-all-real-seed1"]) == []


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("study-*.yaml")))
def test_every_shipped_study_config_loads(name):
    """The study configs docs/results.md reproduces from validate (keys, arms, seg overrides)."""
    config = load_study_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert config.seeds and config.test.split == "test"
    if name == "study-nasa-ebc-learning.yaml":
        assert config.seg.set == {"steps": 1500, "crop": 160, "model.normalize": "none"}
        assert config.arms == ["real", "synthetic", "synthetic_only"]
