"""The study config: which U-Nets to train and what to test them on.

`StudyConfig` (with its parts `TestSet` and `SegSettings`) is what a study YAML holds; `load_study_config` reads
and validates one, `resolve_paths` joins relative paths to the file's folder, and `seg_config_dict` turns the
``seg:`` section into the train-seg config every run of the study uses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from dualsynth.config import StrictModel, deep_merge, load_config, validate_config
from dualsynth.errors import InputError
from dualsynth.io import read_yaml

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")  # base and synthetic set names (they become run folder names)


class TestSet(StrictModel):
    """The real test tiles every run is scored on (paper: the same SHQ test set for all 46 models)."""

    data: Path = Field(description="dataset folder")
    split: str = Field("test", description="split of that folder")


class SegSettings(StrictModel):
    """How each U-Net is trained: a train-seg preset, optionally a config file, and key=value overrides."""

    preset: str = Field("quick", description="train-seg preset (quick or paper)")
    config: Path | None = Field(None, description="a train-seg config file (YAML)")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides, e.g. {epochs: 5, model.encoder: resnet18}")


class StudyConfig(StrictModel):
    """A study: which U-Nets to train and what to test them on (paths relative to the config file)."""

    bases: dict[str, Path] = Field(description="base dataset name -> dataset folder (its train and val splits)")
    synthetic: dict[str, Path] = Field(default_factory=dict, description="synthetic set name -> dataset folder")
    percentages: list[float] = Field(
        default_factory=lambda: [0, 50, 75, 100, 150, 200, 250, 300],
        description="synthetic tiles added, in % of each base's real training tiles (0: the base model)",
    )
    synthetic_only: list[int] = Field(default_factory=list, description="sizes of synthetic-only training sets")
    synthetic_only_val: str | None = Field(
        None, description="base whose val split validates synthetic-only runs (default: the first base)"
    )
    seeds: list[int] = Field(default_factory=lambda: [0], description="one run per seed (repeats)")
    repeats: int | None = Field(None, ge=1, description="shorthand for seeds 0..repeats-1")
    test: TestSet
    seg: SegSettings = Field(default_factory=SegSettings)
    device: str = Field("auto", description="auto, cpu or cuda")
    overlays: int = Field(2, ge=0, description="overlay figures per run evaluation")
    ray_cpus_per_task: int = Field(1, ge=1, description="CPUs Ray reserves for each run (its torch threads)")
    ray_gpus_per_task: float = Field(0, ge=0, description="GPUs Ray reserves for each run")

    @field_validator("synthetic", mode="before")
    @classmethod
    def _one_synthetic_set(cls, v: Any) -> Any:
        # a single path is the common case: call that set 'synthetic'
        return {"synthetic": v} if isinstance(v, (str, Path)) else v

    @field_validator("bases", "synthetic")
    @classmethod
    def _names(cls, v: dict[str, Path]) -> dict[str, Path]:
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(f"name '{name}' may use only letters, digits, '_', '.' and '-'")
        return v

    @field_validator("percentages")
    @classmethod
    def _percentages(cls, v: list[float]) -> list[float]:
        if any(p < 0 for p in v):
            raise ValueError("percentages must be >= 0")
        return sorted(set(v))

    @field_validator("synthetic_only")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError("synthetic-only sizes must be >= 1")
        return sorted(set(v))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("seeds must be a non-empty list of distinct numbers >= 0")
        return v

    @model_validator(mode="before")
    @classmethod
    def _repeats_to_seeds(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("repeats") is not None:
            if "seeds" in data:
                raise ValueError("give seeds or repeats, not both")
            if isinstance(data["repeats"], int) and data["repeats"] >= 1:
                data = {**data, "seeds": list(range(data["repeats"]))}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "StudyConfig":
        if not self.bases:
            raise ValueError("bases: name at least one base dataset")
        needs_synthetic = self.synthetic_only or any(p > 0 for p in self.percentages)
        if needs_synthetic and not self.synthetic:
            raise ValueError("synthetic: percentages above 0 and synthetic_only need a synthetic set")
        if self.synthetic_only_val is not None and self.synthetic_only_val not in self.bases:
            raise ValueError(f"synthetic_only_val: '{self.synthetic_only_val}' is not one of the bases")
        if not self.percentages and not self.synthetic_only:
            raise ValueError("percentages and synthetic_only are both empty: nothing to run")
        return self

    @property
    def val_base(self) -> str:
        return self.synthetic_only_val or next(iter(self.bases))


def load_study_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read and validate a study YAML; relative paths are taken relative to the file's folder."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(path, "study config must be a mapping of key: value")
    if overrides:
        data = deep_merge(data, overrides)
    config = validate_config(StudyConfig, data, source=path)
    return resolve_paths(config, path.parent)


def resolve_paths(config: StudyConfig, root: str | Path) -> StudyConfig:
    """The config with every relative dataset/config path joined to `root` (the config file's folder)."""
    root = Path(root)

    def fix(p: Path) -> Path:
        return p if p.is_absolute() else root / p

    data = config.model_dump()
    data.pop("repeats")  # already expanded into seeds
    data["bases"] = {k: fix(v) for k, v in config.bases.items()}
    data["synthetic"] = {k: fix(v) for k, v in config.synthetic.items()}
    data["test"]["data"] = fix(config.test.data)
    if config.seg.config is not None:
        data["seg"]["config"] = fix(config.seg.config)
    return StudyConfig.model_validate(data)


def seg_config_dict(config: StudyConfig) -> dict[str, Any]:
    """The resolved train-seg config of every run (seed set per run), validated now so typos fail early."""
    from dualsynth.segmentation import PRESETS, SegTrainConfig

    overrides: dict[str, Any] = {}
    for key, value in config.seg.set.items():
        # dotted keys (model.encoder: resnet18) and nested mappings (model: {encoder: resnet18}) both work
        nested: dict[str, Any] = {}
        node = nested
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        overrides = deep_merge(overrides, nested)
    try:
        seg = load_config(SegTrainConfig, PRESETS, config.seg.preset, config.seg.config, overrides)
    except InputError as exc:
        if exc.path in ("config", "--preset"):  # the problem is in the study file's seg: section
            raise InputError("study config 'seg'", exc.problem) from None
        raise
    return seg.model_dump(mode="json")
