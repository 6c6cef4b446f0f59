"""Configs (pydantic, typo-proof), presets, and the compute device.

A config is resolved in three layers, later ones winning: the named preset, a YAML file the user keeps with
their results, then single ``key=value`` overrides from the command line. Unknown keys are errors, so a typo
in a config file is reported instead of silently ignored.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dualsynth.errors import InputError
from dualsynth.io import read_yaml

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TrainingConfig(StrictModel):
    """The keys every trainer's config has (train-vqvae, train-prior, train-renderer, train-seg)."""

    preset: str | None = Field(None, description="name of the preset this config started from")
    seed: int = Field(0, ge=0, description="seed of every random choice in the run")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="mixed precision of training steps: auto (CUDA bf16/fp16; bf16 on CPUs that have it in "
        "hardware), fp32, or bf16"
    )
    deterministic: bool = Field(
        False, description="deterministic kernels: on CUDA a rerun or a resume then gives the same weights to the "
        "last bit (slower; CPU runs are deterministic anyway)"
    )


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["model.num_codes=16", "lr=1e-3"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError("--set", f"'{pair}' is not key=value")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(
    cls: type[M],
    presets: Mapping[str, Mapping[str, Any]],
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    default_preset: str | None = None,
) -> M:
    """Resolve preset -> config file -> overrides into a validated ``cls`` instance.

    A config file may name its own ``preset:``; a preset given on the command line wins over it, and
    ``default_preset`` applies when neither names one.
    """
    data: dict[str, Any] = {}
    file_data: dict[str, Any] = {}
    if config_file is not None:
        loaded = read_yaml(config_file)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError(config_file, "config must be a mapping of key: value")
        file_data = dict(loaded)
    file_preset = file_data.pop("preset", None)
    name = preset or file_preset or default_preset
    if name is not None:
        if name not in presets:
            raise InputError(config_file if preset is None else "--preset", f"unknown preset '{name}' (choose from {', '.join(presets)})")
        data = deep_merge(data, presets[name])
        data["preset"] = name
    data = deep_merge(data, file_data)
    if overrides:
        data = deep_merge(data, overrides)
    return validate_config(cls, data, source=config_file or ("--set" if overrides else "config"))


def validate_config(cls: type[M], data: Mapping[str, Any], source: str | Path = "config") -> M:
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problem = f"unknown config key '{where}'"
        else:
            problem = f"config key '{where}': {err['msg']}"
        more = len(exc.errors()) - 1
        if more:
            problem += f" (and {more} more)"
        raise InputError(source, problem) from None


# --- device -------------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto"):
    """``auto`` -> CUDA when available, else CPU. ``cuda`` without a GPU is an input error."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device", "CUDA was asked for but no GPU is available (use --device cpu or auto)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise InputError("--device", f"unknown device '{name}' (auto, cpu or cuda)")


Precision = Literal["auto", "fp32", "bf16"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX): there bf16 mixed precision speeds up
    training (1.4-1.9x for the quick models, docs/benchmarks.md); elsewhere it is emulated and slower."""
    import torch

    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return native and bool(torch.backends.mkldnn.is_available())


def amp_dtype(device, precision: str = "auto", training: bool = False):
    """The mixed-precision dtype for `device`, or None for plain fp32.

    CUDA: bf16 where supported, else fp16 (`auto` and `bf16`). CPU: bf16 for training when asked for
    (`bf16`), or by `auto` where the CPU has it in hardware; inference on a CPU stays fp32.
    """
    import torch

    if precision == "fp32":
        return None
    if getattr(device, "type", str(device)) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if training and (precision == "bf16" or (precision == "auto" and cpu_has_native_bf16())):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device, precision: str = "auto", training: bool = False) -> Iterator[None]:
    """Mixed precision where `amp_dtype` gives a dtype (CUDA; CPU training with native bf16); else nothing."""
    import torch

    dtype = amp_dtype(device, precision, training)
    if dtype is None:
        yield
        return
    with torch.autocast(getattr(device, "type", str(device)), dtype=dtype):
        yield


def grad_scaler(device):
    """A GradScaler that is active only for fp16 autocast on CUDA (bf16 and CPU need none)."""
    import torch

    enabled = getattr(device, "type", str(device)) == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=enabled)


# --- CPU threads --------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def busy_cores(interval: float = 0.3) -> float:
    """How many cores other work keeps busy now: non-idle CPU time over `interval` seconds (/proc/stat, Linux)
    less this process's own (its thread pools may still spin after earlier work), else the 1-minute load
    average. Measured while this process waits, so its own earlier work does not count, as it would in the
    load average."""
    import os
    import time

    def busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as fh:
                fields = [float(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal, in seconds

    def own_seconds() -> float:
        t = os.times()
        return t.user + t.system

    first, own0, t0 = busy_seconds(), own_seconds(), time.perf_counter()
    if first is not None:
        time.sleep(interval)
        second, own1, t1 = busy_seconds(), own_seconds(), time.perf_counter()
        if second is not None:
            # /proc/stat counts in clock ticks (10 ms), so short intervals can overshoot: clamp to the cores
            busy = max(0.0, (second - first) - (own1 - own0)) / max(t1 - t0, 1e-6)
            return min(busy, float(os.cpu_count() or 1))
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def auto_threads(workers: int = 1, cores: int | None = None, busy: float | None = None) -> int:
    """The thread policy behind ``--threads auto``: torch threads per worker process.

    The cores this process may use, less those other work keeps busy (`busy_cores`), shared by `workers`
    processes; at least 1. The environment variable DUALSYNTH_THREADS, when set, fixes the count instead. Measured on 2-core machines (docs/benchmarks.md): on a quiet machine 2 threads
    train the quick VQ-VAE 1.5-1.7x faster than 1, on a machine whose cores are busy 1 thread is up to 8x
    faster than 2 (threads that wait for a busy core stall every parallel region).
    """
    import os

    fixed = os.environ.get("DUALSYNTH_THREADS", "").strip()
    if fixed and fixed.lower() != "auto":
        n = parse_threads(fixed)
        return max(1, n // max(1, workers)) if n else 1
    cores = usable_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    free = max(1, int(round(cores - min(busy, cores))))
    return max(1, free // max(1, workers))


def parse_threads(value: str | int | None) -> int | None:
    """``--threads`` as given: ``auto``/None -> None (the policy decides), else a positive count."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError("--threads", f"'{value}' is neither 'auto' nor a number of threads") from None
    if n < 1:
        raise InputError("--threads", f"must be at least 1 (or auto), got {n}")
    return n


def apply_threads(threads: str | int | None = "auto", workers: int = 1) -> int:
    """Set torch's CPU threads: a count, or ``auto`` (`auto_threads`). Returns the count set."""
    import torch

    n = parse_threads(threads)
    n = auto_threads(workers) if n is None else n
    torch.set_num_threads(n)
    return n


# what a study's worker processes import: U-Nets (segmentation_models_pytorch alone takes about 5 s to
# import on a 2-core machine), generators and sampling
STUDY_WORKER_MODULES = ("dualsynth.study.runner", "dualsynth.segmentation", "segmentation_models_pytorch",
                        "dualsynth.study.budgets", "dualsynth.synthetic")
_worker_server = {"started": False}


def worker_context(preload: Sequence[str] = ()):
    """The multiprocessing context of every pool of worker processes (`study`, `sample`).

    Where the platform has one (Linux, macOS), a fork server: a process started from here that imports
    `preload` (torch and the modules the workers run) once, then forks every worker from that ready state, so a
    worker starts in milliseconds instead of spending 3-5 s importing torch and its libraries. The first call
    starts the server (its imports run in the background while this process goes on) and fixes what it
    preloads; later calls reuse it. Elsewhere: spawn. Never a fork of this process itself: a forked child
    would inherit torch's thread pools and locks in whatever state they are in; the server runs no torch work.
    Pools started with this context pass `init_worker` as their initializer.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if not _worker_server["started"]:
        from multiprocessing import forkserver

        ctx.set_forkserver_preload(["torch", *preload])
        forkserver.ensure_running()
        _worker_server["started"] = True
    return ctx


def _nothing() -> None:
    pass


def wait_for_worker_server(ctx) -> None:
    """Return once the fork server behind `ctx` (`worker_context`) has done its imports: a worker that does
    nothing forks from it and ends. Called before thread counts are chosen from how busy the cores are, which
    the server's imports would otherwise count as other work."""
    if ctx.get_start_method() == "forkserver":
        process = ctx.Process(target=_nothing)
        process.start()
        process.join()


def worker_initializer() -> tuple[Callable[..., None], tuple]:
    """(initializer, initargs) for a pool from `worker_context`: the worker takes this process's working folder
    and environment as they are now (a fork server holds those of when it started), then `exit_with_parent`."""
    import os

    return init_worker, (os.getcwd(), dict(os.environ), os.getpid())


def init_worker(cwd: str, environ: dict[str, str], parent: int) -> None:
    import os

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    exit_with_parent(parent=parent)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, killed and not yet reaped, does not)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:  # no /proc (macOS)
        return True


def exit_with_parent(poll_seconds: float = 0.5, parent: int | None = None) -> None:
    """In a worker process: end it as soon as the process that started it is gone.

    A study or `sample` killed with `kill -9` cannot stop its workers itself; re-parented, they would train on and write the
    same run folders as a restarted study. A daemon thread watches the pid of `parent` (default: this process's
    parent; a fork server's workers are given the pid of the process that asked for them, since the server
    lives on while they do) and ends the worker.
    """
    import os
    import threading
    import time

    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while process_alive(parent):
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
