"""The run folder: the unit a user keeps (resolved config, checkpoints, log, manifest, figures).

A run is created once; ``--resume`` reopens it, checks that the resolved config is the same one the run was
started with, and continues from ``checkpoints/last.pt``. All writes are atomic.
"""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import Any, Mapping


from dualsynth import __version__
from dualsynth.errors import InputError
from dualsynth.io import append_csv_row, load_torch, read_yaml, save_torch, write_json, write_yaml


class RunFolder:
    """A training run's folder.

    Use :meth:`create` for a new run (refuses a folder that already holds a run unless ``resume``), then
    :meth:`log`, :meth:`save_checkpoint`, :meth:`write_manifest`.
    """

    CONFIG = "config.yaml"
    LOG = "log.csv"
    MANIFEST = "manifest.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: Mapping[str, Any], kind: str, resume: bool = False,
               defaults: Mapping[str, Any] | None = None) -> "RunFolder":
        """Start a run of ``kind`` (e.g. ``vqvae``) in ``path``, or reopen it when ``resume``.

        `defaults`: the config class's default values. A run started by an older version has no entry for a key
        added since; it resumes when the new config gives that key its default (the behaviour the key was added
        with), and is refused when it gives another value."""
        run = cls(path)
        config = {"kind": kind, **dict(config)}
        existing = run.path / cls.CONFIG
        if resume:
            if not existing.is_file():
                raise InputError(run.path, "nothing to resume: no config.yaml in this folder")
            saved = read_yaml(existing) or {}
            if saved.get("kind") != kind:
                raise InputError(existing, f"this is a '{saved.get('kind')}' run, not a '{kind}' run")
            if not _same_config(_comparable(saved), _comparable(config), defaults or {}):
                raise InputError(existing, "resume with a different config; start a new run folder instead")
            return run
        if existing.exists() or (run.path.exists() and any(run.path.iterdir())):
            raise InputError(run.path, "folder is not empty; use --resume to continue or choose a new --out")
        run.path.mkdir(parents=True, exist_ok=True)
        run.checkpoints.mkdir(exist_ok=True)
        write_yaml(existing, config)
        return run

    @classmethod
    def open(cls, path: str | Path, kind: str | None = None) -> "RunFolder":
        """Open a finished or running run for reading (rebuilding its model, reporting)."""
        run = cls(path)
        cfg_path = run.path / cls.CONFIG
        if not cfg_path.is_file():
            raise InputError(run.path, "not a run folder (no config.yaml)")
        if kind is not None:
            saved = read_yaml(cfg_path) or {}
            if saved.get("kind") != kind:
                raise InputError(cfg_path, f"expected a '{kind}' run, found '{saved.get('kind')}'")
        return run

    @property
    def config(self) -> dict[str, Any]:
        return read_yaml(self.path / self.CONFIG) or {}

    def saved_config(self, cls: type, inputs: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
        """The training config (validated as ``cls``) and the named inputs (dataset paths and the like) the
        run was started with, from its config.yaml: what ``--resume`` continues with."""
        from dualsynth.config import validate_config

        saved = dict(self.config)
        found = {k: saved.pop(k, None) for k in inputs}
        for key in ("kind", "device", "threads"):
            saved.pop(key, None)
        return validate_config(cls, saved, self.path / self.CONFIG), found

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> Path:
        return self.checkpoints / f"{name}.pt"

    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).is_file()

    def save_checkpoint(self, name: str, state: Mapping[str, Any]) -> Path:
        path = self.checkpoint_path(name)
        save_torch(path, dict(state))
        return path

    def load_checkpoint(self, name: str, map_location: Any = "cpu") -> dict[str, Any]:
        return load_torch(self.checkpoint_path(name), map_location=map_location)

    def load_trained(self, checkpoint: str = "best", map_location: Any = "cpu") -> dict[str, Any]:
        """The checkpoint a trained model is rebuilt from: ``checkpoint`` (normally ``best``), else ``last``."""
        name = checkpoint if self.has_checkpoint(checkpoint) else "last"
        if not self.has_checkpoint(name):
            raise InputError(self.path, "run has no checkpoint yet (checkpoints/best.pt or last.pt)")
        return self.load_checkpoint(name, map_location=map_location)

    # -- logs ------------------------------------------------------------------------------------------------
    def log(self, row: Mapping[str, Any]) -> None:
        append_csv_row(self.path / self.LOG, row)

    def truncate_log(self, key: str, last: int | float) -> None:
        """On resume, drop log rows written after the checkpoint we resume from (they will be redone)."""
        from dualsynth.io import read_csv, write_csv

        path = self.path / self.LOG
        if not path.exists():
            return
        rows = [r for r in read_csv(path) if float(r[key]) <= last]
        write_csv(path, rows)

    def write_manifest(self, inputs: Mapping[str, Any], outputs: list[str] | None = None, **extra: Any) -> None:
        """List what the run read and wrote (every file under the run folder unless ``outputs`` is given)."""
        if outputs is None:
            outputs = sorted(
                str(p.relative_to(self.path))
                for p in self.path.rglob("*")
                if p.is_file() and not p.name.startswith(".") and p.name != self.MANIFEST
            )
        write_json(
            self.path / self.MANIFEST,
            {
                "dualsynth": __version__,
                "written": _dt.datetime.now().isoformat(timespec="seconds"),
                "python": platform.python_version(),
                "inputs": dict(inputs),
                "outputs": outputs,
                **extra,
            },
        )


def _same_config(saved: Any, new: Any, defaults: Any) -> bool:
    """Whether `new` is the config `saved` was started with; keys missing from `saved` must hold their default."""
    if not isinstance(saved, Mapping) or not isinstance(new, Mapping):
        return saved == new
    defaults = defaults if isinstance(defaults, Mapping) else {}
    if set(saved) - set(new):
        return False
    missing = object()
    for key, value in new.items():
        default = defaults.get(key, missing)
        if key in saved:
            if not _same_config(saved[key], value, {} if default is missing else default):
                return False
        elif default is missing or not _same_config(default, value, {}):
            return False
    return True


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """Config minus the keys that may legitimately differ between a run and its resumption."""
    skip = {"device", "resume", "threads"}
    return {k: v for k, v in config.items() if k not in skip}
