"""Configs (pydantic, typo-proof), presets, and the compute device.

A config is resolved in three layers, later ones winning: the named preset, a YAML file the user keeps with
their results, then single ``key=value`` overrides from the command line. Unknown keys are errors, so a typo
in a config file is reported instead of silently ignored.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dualsynth.errors import InputError
from dualsynth.io import read_yaml

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


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


@contextlib.contextmanager
def autocast(device) -> Iterator[None]:
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        yield


def grad_scaler(device):
    """A GradScaler that is active only for fp16 autocast on CUDA (bf16 and CPU need none)."""
    import torch

    enabled = getattr(device, "type", str(device)) == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=enabled)
