"""Running a study: each planned run trained with `train-seg` and evaluated on the test set.

`run_study` checks every input first (`check_inputs`), skips finished runs, and trains the others one after
another, side by side in worker processes (``workers``), or as Ray tasks (``backend="ray"``), which
spreads a study over a cluster whose nodes see the same file system. `run_one` trains and evaluates one run; an
unfinished run resumes from its last epoch. At the end `run_study` writes the results, figures and report
(`dualsynth.study.report.write_study_outputs`).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Literal

from dualsynth.data import DatasetFolder
from dualsynth.errors import InputError
from dualsynth.io import write_yaml
from dualsynth.config import deep_merge
from dualsynth.study.config import StudyConfig, nested_overrides, seg_config_dict
from dualsynth.study.plan import (
    EVALUATION,
    StudyRun,
    fidelity_dir,
    generator_stages,
    generator_stages_done,
    is_finished,
    plan_budgets,
    plan_label_runs,
    plan_runs,
    run_dir,
)
from dualsynth.study.budgets import label_seg_config
from dualsynth.study.report import write_study_outputs


def arm_seg_config(seg_config: dict[str, Any], seg_set: dict[str, Any]) -> dict[str, Any]:
    """The train-seg config of one arm: the study's, with the arm's overrides (e.g. augment: paper)."""
    return deep_merge(seg_config, nested_overrides(seg_set)) if seg_set else seg_config


def check_inputs(config: StudyConfig, runs: list[StudyRun]) -> None:
    """Open every dataset and resolve every run's tiles before training anything, so bad input (a missing
    folder, mismatched classes, too few synthetic tiles, a synthetic test set) fails at once."""
    check_test_set(config)
    _check_runs(runs)


def run_one(job: dict[str, Any], seg_config: dict[str, Any], test: dict[str, Any], out: str, device: str,
            overlays: int, threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Train and evaluate one study run (a top-level function, so worker processes and Ray can call it).

    Returns ``{"name", "seconds", "skipped"}``, or ``{"name", "error"}`` when the run failed: the error travels
    as text because exceptions with extra arguments do not always survive pickling between processes.
    """
    from dualsynth.config import apply_threads
    from dualsynth.segmentation import SegTrainConfig, evaluate_run, train_segmentation

    threads = apply_threads(threads)
    name = job["name"]
    if is_finished(out, name):
        return {"name": name, "seconds": 0.0, "skipped": True}
    t0 = time.perf_counter()
    try:
        folder = run_dir(out, name)
        config = SegTrainConfig.model_validate({**arm_seg_config(seg_config, job.get("seg_set") or {}), "seed": job["seed"]})
        train_segmentation(
            job["train"], folder, config, val=job["val"], synthetic=job["synthetic"],
            synthetic_percent=job["percent"] if job["synthetic_only"] is None else None,
            synthetic_only=job["synthetic_only"], resume=(folder / "config.yaml").is_file(), device=device,
            threads=threads, progress=progress,
        )
        evaluate_run(folder, test["data"], folder / EVALUATION, test["split"], overlays, device, progress=progress)
    except InputError as exc:
        return {"name": name, "error": exc.one_line()}
    except Exception as exc:  # reported with the run's name; the other runs go on
        return {"name": name, "error": f"{type(exc).__name__}: {exc}"}
    return {"name": name, "seconds": time.perf_counter() - t0, "skipped": False}


def run_study(
    config: StudyConfig,
    out: str | Path,
    workers: int | None = None,
    backend: Literal["local", "ray"] = "local",
    address: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or continue) a study into `out` and write its results, figures and report; return a summary.

    `workers` > 1 runs that many trainings side by side in worker processes (`dualsynth.config.worker_context`,
    started here so that their imports overlap the checks); None chooses (`study_workers`:
    one per free core on a CPU, one on a GPU). Each worker gets `threads` torch threads, None: the free cores
    shared by the workers (`dualsynth.config.auto_threads`).
    `backend="ray"` submits each run as a Ray task (to the cluster at `address`, or a local
    Ray started here); every node must see `out` and the datasets at the same paths.
    """
    if workers is not None and workers < 1:
        raise InputError("--workers", f"must be at least 1, got {workers}")
    if backend not in ("local", "ray"):
        raise InputError("--backend", f"unknown backend '{backend}' (local or ray)")
    out = Path(out)
    if backend == "local":
        start_worker_server(workers, config.device)  # the workers' imports run beside the checks and fidelity
    if config.label_efficiency:
        return _run_label_study(config, out, workers, backend, address, threads, progress, log)
    seg_config = seg_config_dict(config)
    runs = plan_runs(config)
    check_inputs(config, runs)
    from dualsynth.config import resolve_device

    resolve_device(config.device)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "study.yaml", {**config.model_dump(mode="json"), "resolved_seg_config": seg_config})
    measure_synthetic_sets(config, out, log)
    return _train_runs(config, out, runs, seg_config, workers, backend, address, threads, progress, log)


def measure_synthetic_sets(config: StudyConfig, out: Path, log: Callable[[str], None] = print) -> None:
    """`dualsynth fidelity` of each given synthetic set against the base that validates synthetic-only runs,
    into STUDY/fidelity/NAME/ (once; the report shows each set's headline next to its results)."""
    from dualsynth.fidelity import fidelity

    for name, path in config.synthetic.items():
        target = fidelity_dir(out, name)
        if (target / "fidelity.json").is_file():
            continue
        log(f"study: fidelity of synthetic set '{name}' against base '{config.val_base}'")
        fidelity(config.bases[config.val_base], path, target, device=config.device)


def _train_runs(config: StudyConfig, out: Path, runs: list[StudyRun], seg_config: dict[str, Any], workers: int | None,
                backend: str, address: str | None, threads: int | None, progress: bool,
                log: Callable[[str], None], t0: float | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate the unfinished runs, then write the results, figures and report; return a summary."""
    todo = [r for r in runs if not is_finished(out, r.name)]
    log(f"study: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to do")
    test = config.test.model_dump(mode="json")
    args = (seg_config, test, str(out), config.device, config.overlays)
    t0 = time.perf_counter() if t0 is None else t0
    results: list[dict[str, Any]] = []

    def report(i: int, res: dict[str, Any]) -> None:
        results.append(res)
        if "error" in res:
            log(f"[{i}/{len(todo)}] {res['name']}: FAILED: {res['error']}")
        else:
            log(f"[{i}/{len(todo)}] {res['name']}: done in {res['seconds']:.0f} s" + _score_note(out, res["name"]))

    jobs = [asdict(r) for r in todo]
    if workers is None:
        workers = study_workers(len(jobs), config.device)
    tail = 0
    if workers > 1:
        # largest training sets first: side by side, the last runs then end close together (fewer idle workers)
        costs = [training_tiles(job) for job in jobs]
        order = sorted(range(len(jobs)), key=lambda i: costs[i], reverse=True)
        jobs, costs = [jobs[i] for i in order], [costs[i] for i in order]
        tail = tail_runs(costs, workers)
    if jobs and backend == "local":
        log(f"study: {min(workers, len(jobs))} worker(s) side by side"
            + (f", the last {tail} run(s) then with the cores of the others" if tail else ""))
    if not jobs:
        pass
    elif backend == "ray":
        _run_ray(run_one, jobs, args, address, config, report)
    elif workers == 1:
        for i, job in enumerate(jobs, 1):
            report(i, run_one(job, *args, threads=threads, progress=progress))
    else:
        _run_processes(run_one, jobs, args, workers, threads, report, tail=tail)

    paths = write_study_outputs(config, out)
    failed = [r for r in results if "error" in r]
    summary = {"runs": len(runs), "trained": len(results) - len(failed), "failed": len(failed),
               "skipped": len(runs) - len(todo), "seconds": time.perf_counter() - t0, **(extra or {}),
               **{k: str(v) for k, v in paths.items()}}
    if failed:
        raise InputError(out, f"{len(failed)} of {len(todo)} runs failed (first: {failed[0]['name']}: "
                         f"{failed[0]['error']}); start the study again to retry them")
    return summary


def check_test_set(config: StudyConfig) -> None:
    """The test set is real tiles only and every base has its classes and channels."""
    from dualsynth.segmentation import check_compatible

    test = DatasetFolder(config.test.data)
    records = test.records(split=config.test.split)
    if not records:
        raise InputError(test.path, f"test set has no '{config.test.split}' tiles (splits: {', '.join(test.splits)})")
    fake = [r.file for r in records if r.origin != "real"]
    if fake:
        raise InputError(test.path, f"the test set must be real tiles only; '{fake[0]}' is {records[0].origin}")
    for name, path in config.bases.items():
        check_compatible(test, DatasetFolder(path), f"base '{name}'")


def check_arm_configs(config: StudyConfig, seg_config: dict[str, Any]) -> None:
    """Every arm's train-seg config validates (e.g. copy_paste needs a train-seg that has it)."""
    from dualsynth.config import validate_config
    from dualsynth.segmentation import SegTrainConfig
    from dualsynth.study.config import ARM_SEG_OVERRIDES

    for arm in config.arms:
        if arm in ARM_SEG_OVERRIDES:
            validate_config(SegTrainConfig, arm_seg_config(seg_config, ARM_SEG_OVERRIDES[arm]),
                            source=f"study config 'arms' ({arm})")


def _check_runs(runs: list[StudyRun]) -> None:
    from dualsynth.segmentation import select_training_data

    for run in runs:
        select_training_data(run.train, run.val, run.synthetic, run.percent if run.synthetic_only is None else None,
                             run.synthetic_only, run.seed)


def _run_label_study(config: StudyConfig, out: Path, workers: int | None, backend: str, address: str | None,
                     threads: int | None, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """A label-efficiency study: budget folders, then each budget's generator, then every arm's U-Nets."""
    from dualsynth.config import resolve_device
    from dualsynth.study.budgets import check_generator_settings, check_generator_unchanged, write_budget_dataset

    t0 = time.perf_counter()
    budgets = plan_budgets(config, out)
    runs = plan_label_runs(config, budgets)
    seg_config, matching = label_seg_config(config, budgets)
    check_arm_configs(config, seg_config)
    if config.needs_generators:
        check_generator_settings(config.generator)
    check_test_set(config)
    resolve_device(config.device)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "study.yaml", {**config.model_dump(mode="json"), "resolved_seg_config": seg_config,
                                    "training": matching})
    for b in budgets:
        write_budget_dataset(b)
    _check_runs([r for r in runs if r.synthetic is None])
    generators = [b for b in budgets if b.sample_count]
    for b in generators:
        check_generator_unchanged(b, config.generator)
    stages = generator_stages(config)
    todo = [b for b in generators if set(stages) - set(generator_stages_done(b.generator))]
    log(f"study: {len(generators)} generators, {len(generators) - len(todo)} already finished, {len(todo)} to do")
    results: list[dict[str, Any]] = []

    def report(i: int, res: dict[str, Any]) -> None:
        results.append(res)
        if "error" in res:
            log(f"[generator {i}/{len(todo)}] {res['name']}: FAILED: {res['error']}")
        else:
            log(f"[generator {i}/{len(todo)}] {res['name']}: {', '.join(res['ran']) or 'nothing'} done in "
                f"{res['seconds']:.0f} s")

    from dualsynth.study.budgets import run_generator

    jobs = [asdict(b) for b in todo]
    args = (config.generator.model_dump(mode="json"), config.device)
    gen_workers = min(len(jobs), workers if workers is not None else study_workers(len(jobs), config.device))
    for job in jobs:
        log(f"generator {job['name']}: training on {len(job['sources'])} images ({job['tiles']} tiles)")
    if jobs and backend == "ray":
        _run_ray(run_generator, jobs, args, address, config, report, stages=stages)
    elif gen_workers > 1:
        log(f"study: {gen_workers} generators side by side")
        _run_processes(run_generator, jobs, args, gen_workers, threads, report, stages=stages)
    else:
        for i, job in enumerate(jobs, 1):
            report(i, run_generator(job, *args, threads=threads, progress=progress, stages=stages))
    failed = [r for r in results if "error" in r]
    if failed:
        raise InputError(out, f"{len(failed)} of {len(todo)} generators failed (first: {failed[0]['name']}: "
                         f"{failed[0]['error']}); start the study again to retry them")
    _check_runs([r for r in runs if r.synthetic is not None])
    return _train_runs(config, out, runs, seg_config, workers, backend, address, threads, progress, log, t0,
                       {"generators": len(generators), "generators_trained": len(results)})


def _score_note(out: Path, name: str) -> str:
    path = run_dir(out, name) / EVALUATION / "summary.json"
    try:
        import json

        s = json.loads(path.read_text())
        return f", test Missing Class IoU {100 * s['missing_class_iou']:.1f} %"
    except Exception:
        return ""


def training_tiles(job: dict[str, Any]) -> int:
    """How many tiles a study run trains on (its cost per epoch): real tiles plus synthetic ones."""
    from dualsynth.data import DatasetFolder
    from dualsynth.segmentation import synthetic_count

    if job["synthetic_only"] is not None:
        return int(job["synthetic_only"])
    real = len(DatasetFolder(job["train"]).records(split="train"))
    return real + synthetic_count(job["percent"] or 0, real)


def study_workers(jobs: int, device: str = "auto") -> int:
    """How many trainings run side by side by default: one per free core on a CPU (small U-Nets gain more from
    running side by side than from sharing threads; docs/benchmarks.md), one on a GPU."""
    from dualsynth.config import auto_threads, resolve_device

    if resolve_device(device).type != "cpu":
        return 1
    return max(1, min(jobs, auto_threads()))


def start_worker_server(workers: int | None, device: str = "auto"):
    """Start the fork server of the worker processes now (`dualsynth.config.worker_context`), so that its
    imports overlap what this process does first, if `workers` (None: `study_workers`' choice for this
    device) means more than one process; return its context, or None."""
    from dualsynth.config import STUDY_WORKER_MODULES, worker_context

    if (workers or study_workers(2, device)) > 1:
        return worker_context(STUDY_WORKER_MODULES)
    return None


# how much faster one training runs on k times the threads, at the least (U-Net steps with 2 threads against 1:
# 1.86x in bf16, 1.57x in fp32 on a quiet 2-core machine; docs/benchmarks.md)
THREAD_SPEEDUP_PER_DOUBLING = 1.5


def list_schedule(costs: list[float], workers: int) -> float:
    """When the last of `costs` ends if each, in order, starts on the first free one of `workers`."""
    free = [0.0] * max(1, workers)
    for cost in costs:
        i = free.index(min(free))
        free[i] += cost
    return max(free)


def tail_runs(costs: list[float], workers: int) -> int:
    """How many of the last runs (`costs` sorted largest first) to hold back until the others are done, then
    train side by side with the threads of all the workers shared among them.

    With n runs on w workers, n mod w runs are left over for a last round in which the other workers would sit
    idle. They are held back when the schedule predicts it ends sooner that way: every run given k times the
    threads is taken as only THREAD_SPEEDUP_PER_DOUBLING ** log2(k) faster. 0: no run held back. The choice
    depends on the runs alone, never on timing, so a study on the same machine trains the same way each time.
    """
    import math

    tail = len(costs) % workers if workers > 1 else 0
    if tail == 0 or tail == len(costs):
        return 0
    speedup = THREAD_SPEEDUP_PER_DOUBLING ** math.log2(workers / tail)
    held = list_schedule(costs[:-tail], workers) + max(costs[-tail:]) / speedup
    return tail if held < list_schedule(costs, workers) else 0


def _run_processes(fn: Callable, jobs: list[dict], args: tuple, workers: int, threads: int | None, report: Callable,
                   tail: int = 0, **kwargs: Any) -> None:
    """Each job as `fn(job, *args, threads, False, **kwargs)` in a pool of `workers` processes that end
    with this one (a study run or a generator). The last `tail` jobs start once all the others are done, with
    the threads of all workers shared among them (`tail_runs`)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from dualsynth.config import (STUDY_WORKER_MODULES, auto_threads, wait_for_worker_server, worker_context,
                                  worker_initializer)

    context = worker_context(STUDY_WORKER_MODULES)
    wait_for_worker_server(context)
    threads = threads or auto_threads(workers)
    rounds = [(jobs[: len(jobs) - tail], threads)]
    if tail:
        rounds.append((jobs[len(jobs) - tail :], max(1, threads * workers // tail)))
    i = 0
    initializer, initargs = worker_initializer()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                             initializer=initializer, initargs=initargs) as pool:
        for round_jobs, round_threads in rounds:
            futures = [pool.submit(fn, job, *args, round_threads, False, **kwargs) for job in round_jobs]
            for fut in as_completed(futures):
                i += 1
                report(i, fut.result())


def _run_ray(fn: Callable, jobs: list[dict], args: tuple, address: str | None, config: StudyConfig, report: Callable,
             **kwargs: Any) -> None:
    """Each job as a Ray task running `fn(job, *args, threads, False, **kwargs)` (a study run or a generator)."""
    try:
        import ray
    except ImportError:
        raise InputError("--backend", "ray is not installed (pip install 'dualsynth[ray]')") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as exc:
            raise InputError("--address", f"cannot connect to Ray ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    task = ray.remote(num_cpus=config.ray_cpus_per_task, num_gpus=config.ray_gpus_per_task)(fn)
    pending = [task.remote(job, *args, config.ray_cpus_per_task, False, **kwargs) for job in jobs]
    i = 0
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i += 1
        report(i, ray.get(done[0]))
