"""The one training loop of dualsynth: every trainer (VQ-VAE, prior, U-Net) runs on this `Engine`.

A trainer contributes only what is its own: the function that runs one iteration (an update for the VQ-VAE
and the prior, an epoch for the U-Net), what it logs, what it validates and which extra fields its
checkpoints carry. The engine owns everything around that, written once:

- iteration by step or by epoch, with the torch seed of iteration i set from (seed, i) before it runs, so
  dropout-like draws replay after a resume;
- resume from ``checkpoints/last.pt``: weights, optimizers, grad scalers and the training state (including
  running log windows and best scores), so a resumed run is bit-identical to one that never stopped;
- ``last``/``best`` checkpoints (atomic), ``stop_after`` for tests;
- autocast (bf16/fp16 on CUDA, bf16 on CPUs that have it in hardware) and a GradScaler per optimizer where
  the precision needs one (fp16 on CUDA);
- Ctrl-C between iterations (the one under way finishes and is checkpointed), the progress bar, windowed log
  rows, the thread policy (`dualsynth.config.apply_threads`);
- small handlers that trainers share: learning-rate schedules as pure functions of the step, and the
  paper's ReduceLROnPlateau and EarlyStopping on a monitored score.

Several models and optimizers fit one engine (e.g. a generator and a discriminator): ``models`` and
``optimizers`` are dicts, the first model is the one ``best.pt`` rebuilds, and `optimize` takes the name of
the optimizer to step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping

import numpy as np
import torch

from dualsynth.config import amp_dtype, autocast, grad_scaler
from dualsynth.errors import InputError
from dualsynth.io import progress_bar
from dualsynth.runs import RunFolder


def iteration_seed(seed: int, iteration: int) -> int:
    """The torch seed of one iteration: a function of the run's seed and the iteration number only."""
    return (int(seed) * 1_000_003 + int(iteration)) % (2**63 - 1)


def scheduled_lr(lr: float, schedule: Literal["constant", "cosine"], step: int, steps: int) -> float:
    """Learning rate of update `step` (0-based): constant, or cosine decay to 5 % of `lr` at the last step.

    A pure function of the step, so resuming needs no scheduler state.
    """
    if schedule == "constant":
        return lr
    progress = min(step / max(steps - 1, 1), 1.0)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_batch(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Item indices of update `step`: consecutive slices of one seeded permutation of the n items per epoch."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = positions // n, positions % n
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out


def adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Adam as every trainer uses it: the fused implementation (one kernel for all parameters; on a CPU 4x
    faster per step than the loop over tensors, 45 -> 11 ms for the quick U-Net) where torch has it.
    `betas`: GANs use (0.5, 0.999)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # torch without a fused Adam for this device
        return torch.optim.Adam(params, lr=lr, betas=betas)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches: a seeded permutation of the n items cut into batches (the last may be smaller)."""
    order = np.random.default_rng([int(seed), int(epoch), 1]).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """While active, a first Ctrl-C (SIGINT) only sets a flag that the loop checks between iterations; a second
    one raises KeyboardInterrupt at once. Outside the main thread (where signals cannot be caught), or where
    SIGINT is ignored, nothing changes."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield lambda: False  # a process that ignores SIGINT (nohup, background jobs) keeps ignoring it
        return
    hits: list[int] = []

    def handler(signum, frame):  # noqa: ARG001 - the signal module's signature
        if hits:
            raise KeyboardInterrupt
        hits.append(signum)

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def improved(value: float, best: float, mode: Literal["min", "max"]) -> bool:
    """Whether `value` beats `best` (nan never beats anything; anything beats a nan best)."""
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if mode == "min" else value > best


@dataclass
class Plateau:
    """Keras' ReduceLROnPlateau and EarlyStopping (the paper's callbacks), kept in the engine's state."""

    lr_patience: int
    lr_factor: float
    min_lr: float
    stop_patience: int | None

    def update(self, engine: "Engine", was_improved: bool) -> None:
        s = engine.state
        if was_improved:
            s["bad"], s["lr_wait"] = 0, 0
            return
        s["bad"] = s.get("bad", 0) + 1
        s["lr_wait"] = s.get("lr_wait", 0) + 1
        if s["lr_wait"] >= self.lr_patience:
            s["lr"] = max(s["lr"] * self.lr_factor, self.min_lr)
            s["lr_wait"] = 0
        if self.stop_patience is not None and s["bad"] >= self.stop_patience:
            s["stopped"] = True


def use_deterministic_kernels(device: torch.device) -> None:
    """Only deterministic kernels from here on in this process (CUDA's atomics-based ones, e.g. in scatter/index
    adds, otherwise make two identical runs differ; cuBLAS needs a fixed workspace for it). Ops that have no
    deterministic kernel warn instead of failing."""
    import os

    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


class Engine:
    """One training loop: see the module docstring.

    ``unit`` names the iteration (``step`` or ``epoch``); the number of finished iterations lives in
    ``state[unit]`` and is the key of log.csv rows. Iteration i (0-based) is numbered ``i + first`` when it is
    handed to the trainer: ``first=0`` for steps, 1 for epochs (epoch 1 is the first epoch).
    """

    def __init__(
        self,
        run: RunFolder,
        device: torch.device,
        *,
        models: Mapping[str, torch.nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        seed: int,
        total: int,
        unit: Literal["step", "epoch"] = "step",
        first: int = 0,
        state: Mapping[str, Any] | None = None,
        checkpoint_extra: Callable[[], Mapping[str, Any]] | None = None,
        run_config: Mapping[str, Any] | None = None,
        precision: str = "auto",
        deterministic: bool = False,
    ):
        self.run = run
        self.device = device
        self.models = dict(models)
        self.optimizers = dict(optimizers)
        self.scalers = {name: grad_scaler(device) for name in self.optimizers}
        self.seed = int(seed)
        self.total = int(total)
        self.unit = unit
        self.first = int(first)
        self.state: dict[str, Any] = {unit: 0, "stopped": False, "best": math.nan, "best_at": 0,
                                      "window": {}, **dict(state or {})}
        self.checkpoint_extra = checkpoint_extra or (lambda: {})
        self.run_config = dict(run_config or {})
        self.precision = precision
        if deterministic:
            use_deterministic_kernels(device)
        self.items_seen = 0
        self._t0 = time.perf_counter()
        # best.pt held in memory until the next last.pt (run_loop with checkpoint_seconds > 0)
        self._defer_best = False
        self._pending_best: dict[str, Any] | None = None

    # -- the model that best.pt rebuilds ------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return next(iter(self.models.values()))

    @property
    def amp_name(self) -> str:
        """The precision training steps run in here: bfloat16, float16 or float32 (for the manifest)."""
        dtype = amp_dtype(self.device, self.precision, training=True)
        return "float32" if dtype is None else str(dtype).replace("torch.", "")

    @property
    def done(self) -> int:
        """Finished iterations."""
        return int(self.state[self.unit])

    @property
    def finished(self) -> bool:
        return bool(self.state["stopped"]) or self.done >= self.total

    # -- resume -------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from checkpoints/last.pt when there is one (log rows past it are dropped); True if so."""
        if not self.run.has_checkpoint("last"):
            self.run.truncate_log(self.unit, 0)
            return False
        ckpt = self.run.load_checkpoint("last", map_location=self.device)
        if "optimizers" not in ckpt or "train_state" not in ckpt:
            raise InputError(self.run.checkpoint_path("last"), "written by an older dualsynth without the training "
                             "engine; it cannot be resumed, start a new run folder")
        modules = ckpt.get("modules", {})
        for name, model in self.models.items():
            model.load_state_dict(ckpt["model"] if name == next(iter(self.models)) else modules[name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
            if name in ckpt.get("scalers", {}):
                self.scalers[name].load_state_dict(ckpt["scalers"][name])
        self.state.update(ckpt["train_state"])
        self.run.truncate_log(self.unit, self.done)
        return True

    # -- inside an iteration ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision for the training step (`dualsynth.config.amp_dtype`): on CUDA bf16 or fp16, on a CPU
        bf16 where it has it in hardware (precision `auto`), none with precision `fp32`."""
        with autocast(self.device, self.precision, training=True):
            yield

    def set_lr(self, lr: float, optimizer: str | None = None) -> None:
        for name, opt in self.optimizers.items():
            if optimizer is None or name == optimizer:
                for group in opt.param_groups:
                    group["lr"] = lr

    def optimize(self, loss: torch.Tensor, optimizer: str = "main") -> None:
        """One update of `optimizer` from `loss`: zero grads, (scaled) backward, step, scaler update."""
        opt, scaler = self.optimizers[optimizer], self.scalers[optimizer]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def accumulate(self, values: Mapping[str, float], items: int = 0) -> None:
        """Add one iteration's values to the running log window (kept in the state, so resumes keep it)."""
        window = self.state["window"]
        window["n"] = window.get("n", 0) + 1
        for key, value in values.items():
            window[key] = window.get(key, 0.0) + float(value)
        self.items_seen += items

    def window_means(self) -> dict[str, float]:
        """Means of the values accumulated since the last call, and the window reset."""
        window = self.state["window"]
        n = max(window.pop("n", 0), 1)
        means = {k: v / n for k, v in window.items()}
        self.state["window"] = {}
        return means

    def throughput(self) -> float:
        """Items (tiles, codes) per second of wall time in this call."""
        return self.items_seen / max(time.perf_counter() - self._t0, 1e-9)

    def log(self, row: Mapping[str, Any]) -> None:
        self.run.log(row)

    # -- checkpoints --------------------------------------------------------------------------------------
    def _model_checkpoint(self) -> dict[str, Any]:
        model = self.model
        return model.checkpoint() if hasattr(model, "checkpoint") else {"model": model.state_dict()}

    def save_last(self) -> None:
        """Write checkpoints/last.pt, after any best.pt still held in memory (so the best.pt on disk is never
        older than the state last.pt resumes from)."""
        self.flush_best()
        names = list(self.models)
        self.run.save_checkpoint("last", {
            **self._model_checkpoint(),
            **self.checkpoint_extra(),
            "modules": {n: self.models[n].state_dict() for n in names[1:]},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "scalers": {n: s.state_dict() for n, s in self.scalers.items()},
            "train_state": self.state,
            "run_config": self.run_config,
        })

    def keep_if_best(self, value: float, mode: Literal["min", "max"], **fields: Any) -> bool:
        """Save checkpoints/best.pt when `value` beats the best so far; True if it did."""
        if not improved(value, self.state["best"], mode):
            return False
        iteration = self.done
        self.state["best"], self.state["best_at"] = value, iteration
        best = {**self._model_checkpoint(), **self.checkpoint_extra(), self.unit: iteration, **fields}
        if self._defer_best:  # a copy: training goes on changing the live weights
            self._pending_best = copy.deepcopy(best)
        else:
            self.run.save_checkpoint("best", best)
        return True

    def flush_best(self) -> None:
        """Write a best.pt held in memory (see `run_loop`'s checkpoint_seconds)."""
        if self._pending_best is not None:
            self.run.save_checkpoint("best", self._pending_best)
            self._pending_best = None

    # -- the loop -----------------------------------------------------------------------------------------
    def run_loop(
        self,
        iteration: Callable[[int], Any],
        after: Callable[[int, Any], Mapping[str, Any] | None] | None = None,
        *,
        checkpoint_every: int = 1,
        checkpoint_seconds: float = 0.0,
        stop_after: int | None = None,
        progress: bool = True,
        desc: str = "",
    ) -> None:
        """Run iterations until `total` (or early stopping, or `stop_after` more iterations).

        `iteration(i)` runs iteration number i (``i = done + first``) and returns anything; `after(i, out)`
        then does the trainer's logging and validation and may return values for the progress bar. The
        engine writes last.pt every `checkpoint_every` iterations and at the end of this call. Ctrl-C finishes
        the iteration under way, writes last.pt and raises KeyboardInterrupt, so the checkpoint never holds
        half an iteration (half an epoch's updates under the previous epoch's count would break resuming); a
        second Ctrl-C stops at once, leaving the previous checkpoint.

        `checkpoint_seconds` > 0 skips a due last.pt until that many seconds have passed since the previous
        one (the end of the call, the end of training and Ctrl-C still write it), and holds best.pt in memory
        until the next last.pt: for iterations that take less time than writing a large checkpoint (a U-Net
        epoch of a few tiles). A resumed run is still bit-identical; a killed one repeats at most that many
        seconds of work.
        """
        end = self.total if stop_after is None else min(self.total, self.done + stop_after)
        self._defer_best = checkpoint_seconds > 0
        saved_at = time.monotonic()
        bar = progress_bar(enabled=progress, total=self.total, initial=self.done, desc=desc, unit=self.unit)
        for model in self.models.values():
            model.train()
        with _deferred_interrupt() as interrupted:
            try:
                while not self.finished and self.done < end:
                    number = self.done + self.first
                    torch.manual_seed(iteration_seed(self.seed, number))
                    out = iteration(number)
                    self.state[self.unit] = self.done + 1
                    shown = after(number, out) if after is not None else None
                    for model in self.models.values():
                        model.train()
                    due = self.done % checkpoint_every == 0 and time.monotonic() - saved_at >= checkpoint_seconds
                    if due or self.done == end or self.finished or interrupted():
                        self.save_last()
                        saved_at = time.monotonic()
                    if shown:
                        bar.set_postfix(**shown)
                    bar.update(1)
                    if interrupted():
                        raise KeyboardInterrupt
            finally:
                bar.close()
                self._defer_best, self._pending_best = False, None  # written by save_last, or lost with last.pt
