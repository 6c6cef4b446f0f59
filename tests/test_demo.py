"""`dualsynth demo`, the main job, end to end at a tiny size: every stage, the report, a rerun that skips
finished stages, and a rerun with other settings refused."""

from __future__ import annotations

import json

from dualsynth.cli import main
from dualsynth.io import read_csv

TINY = ["--set", "n=6", "--set", "size=128", "--set", "tile=64", "--set", "vqvae_steps=3", "--set", "prior_steps=3",
        "--set", "seg_epochs=1", "--no-progress"]


def run_cli(args, capsys):
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_runs_every_stage_writes_the_report_and_continues(tmp_path, capsys):
    out = tmp_path / "demo-out"
    # two threads: `sample` draws in two worker processes forked from the demo's server
    code, stdout, err = run_cli(["demo", "--out", out, "--threads", 2, *TINY], capsys)
    assert code == 0, err[-2000:]
    state = json.loads((out / "demo.json").read_text())
    assert list(state["seconds"]) == ["data", "prepare", "vqvae", "prior", "sample", "study"]
    assert (out / "study" / "report.md").is_file() and "report:" in stdout
    runs = {r["run"] for r in read_csv(out / "study" / "results.csv")}
    # HQ and LQ at 0/50/100 % synthetic, and one synthetic-only run
    assert len(runs) == 7 and any(r.startswith("synthetic-only") for r in runs), runs
    synthetic = read_csv(out / "synthetic" / "manifest.csv")
    assert len(synthetic) >= 1

    code, stdout, err = run_cli(["demo", "--out", out, "--threads", 1, *TINY], capsys)
    assert code == 0, err[-2000:]
    assert stdout.count("done before") == 6  # threads change speed, not results: the same demo

    code, _, err = run_cli(["demo", "--out", out, *TINY, "--set", "seg_epochs=2"], capsys)
    assert code == 2 and "other settings" in err and "Traceback" not in err
