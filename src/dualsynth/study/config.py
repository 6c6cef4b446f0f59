"""The study config: which U-Nets to train and what to test them on.

`StudyConfig` (with its parts `TestSet` and `SegSettings`) is what a study YAML holds; `load_study_config` reads
and validates one, `resolve_paths` joins relative paths to the file's folder, and `seg_config_dict` turns the
``seg:`` section into the train-seg config every run of the study uses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from dualsynth.config import StrictModel, deep_merge, load_config, validate_config
from dualsynth.errors import InputError
from dualsynth.io import read_yaml

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")  # base and synthetic set names (they become run folder names)
ARMS = ("real", "augment", "copy_paste", "synthetic", "synthetic_only")
# the train-seg overrides of the arms that change how the real tiles are used
ARM_SEG_OVERRIDES: dict[str, dict[str, Any]] = {"augment": {"augment": "paper"}, "copy_paste": {"augment": "copy_paste"}}


class TestSet(StrictModel):
    """The real test tiles every run is scored on (paper: the same SHQ test set for all 46 models)."""

    data: Path = Field(description="dataset folder")
    split: str = Field("test", description="split of that folder")


class SegSettings(StrictModel):
    """How each U-Net is trained: a train-seg preset, optionally a config file, and key=value overrides."""

    preset: str = Field("quick", description="train-seg preset (quick or paper)")
    config: Path | None = Field(None, description="a train-seg config file (YAML)")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides, e.g. {epochs: 5, model.encoder: resnet18}")


class StageSettings(StrictModel):
    """One generator training stage (VQ-VAE or prior): a preset, optionally a config file, and overrides."""

    preset: str | None = Field(None, description="preset of this stage (default: the generator's preset)")
    config: Path | None = Field(None, description="a config file of this stage (YAML, as for train-vqvae/train-prior)")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides, e.g. {steps: 2000, model.hidden: 32}")


class SampleSettings(StrictModel):
    """The sampling stage (`dualsynth sample`, clean-up included) of each generator."""

    count: int | None = Field(None, ge=1, description="pairs to sample (default: what the study needs: the largest "
                              "percentage of the budget's real tiles, and the synthetic-only sizes)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (1: the prior's distribution)")
    batch_size: int = Field(16, ge=1, description="z-matrices sampled per batch")
    min_object_area: int | None = Field(None, ge=0, description="clean-up: fill objects smaller than this (px); "
                                        "default: 200 px² per 256x256 tile, scaled with tile area")
    texture: bool = Field(True, description="add the budget's real fine texture to the sampled micrographs "
                          "(`sample --texture` with the budget's own tiles, as `sample` does by default; see "
                          "`dualsynth texture`); false: the paper's decoded micrographs")


class GeneratorSettings(StrictModel):
    """How each budget's generator is trained: VQ-VAE -> prior -> sample (+ clean-up) -> fidelity."""

    preset: str = Field("quick", description="preset of the VQ-VAE and prior stages unless a stage names its own")
    vqvae: StageSettings = Field(default_factory=StageSettings, description="the VQ-VAE stage")
    prior: StageSettings = Field(default_factory=StageSettings, description="the prior stage")
    sample: SampleSettings = Field(default_factory=SampleSettings, description="the sampling stage")
    seed: int = Field(0, ge=0, description="seed of the generator's training and sampling")
    fidelity: bool = Field(True, description="measure each synthetic set against its budget's real tiles "
                           "(`dualsynth fidelity`; the report shows the headline next to the results)")
    fidelity_max_tiles: int | None = Field(500, ge=1, description="tiles per set the fidelity measures use at most")


Budget = Union[int, Literal["all"]]


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
    real_images: list[Budget] | None = Field(
        None, description="label-efficiency study: budgets of labelled training source images (numbers, or 'all'); "
        "each budget is a nested subset of every base's training images, with its own generator")
    subset_seeds: list[int] = Field(default_factory=lambda: [0], description="draws of the images of each budget "
                                    "(one subset per seed; 'all' needs no draw)")
    generator: GeneratorSettings = Field(default_factory=GeneratorSettings,
                                         description="the generator trained on each budget (with real_images)")
    arms: list[Literal["real", "augment", "copy_paste", "synthetic", "synthetic_only"]] = Field(
        default_factory=lambda: list(ARMS), description="what each budget's U-Nets train on (with real_images): "
        "real, augment (the paper's augmentation), copy_paste, synthetic (each percentage > 0), synthetic_only")
    compare: list[str] | None = Field(
        None, description="two models of the Figure 20-style comparison, as arm labels (real, augment, copy_paste, "
        "synthetic-P, synthetic_only; default: real and the best synthetic arm)")
    compare_budget: Budget | None = Field(None, description="budget of that comparison (default: the smallest)")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples of each interval")
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

    @field_validator("real_images")
    @classmethod
    def _budgets(cls, v: list[Any] | None) -> list[Any] | None:
        if v is None:
            return v
        if not v or any(isinstance(b, int) and b < 1 for b in v) or len(set(v)) != len(v):
            raise ValueError("real_images must be a non-empty list of distinct numbers >= 1 (or 'all')")
        return sorted(v, key=lambda b: (b == "all", 0 if b == "all" else b))

    @field_validator("subset_seeds")
    @classmethod
    def _subset_seeds(cls, v: list[int]) -> list[int]:
        if not v or any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("subset_seeds must be a non-empty list of distinct numbers >= 0")
        return v

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("arms are listed twice")
        if "real" not in v:
            raise ValueError("arms: 'real' is needed (every arm is compared with real only)")
        return [a for a in ARMS if a in v]

    @model_validator(mode="after")
    def _consistent(self) -> "StudyConfig":
        if not self.bases:
            raise ValueError("bases: name at least one base dataset")
        if self.real_images is not None:
            return self._label_efficiency_consistent()
        given = self.model_fields_set
        for key in ("subset_seeds", "generator", "arms", "compare", "compare_budget"):
            if key in given:
                raise ValueError(f"{key}: only for a label-efficiency study; add real_images: [2, 4, all]")
        needs_synthetic = self.synthetic_only or any(p > 0 for p in self.percentages)
        if needs_synthetic and not self.synthetic:
            raise ValueError("synthetic: percentages above 0 and synthetic_only need a synthetic set")
        if self.synthetic_only_val is not None and self.synthetic_only_val not in self.bases:
            raise ValueError(f"synthetic_only_val: '{self.synthetic_only_val}' is not one of the bases")
        if not self.percentages and not self.synthetic_only:
            raise ValueError("percentages and synthetic_only are both empty: nothing to run")
        return self

    def _label_efficiency_consistent(self) -> "StudyConfig":
        if self.synthetic:
            raise ValueError("synthetic: with real_images each budget trains its own generator (write generator: "
                             "{preset: quick}); to add an already trained synthetic set, leave out real_images")
        if "synthetic" in self.arms and not any(p > 0 for p in self.percentages):
            raise ValueError("percentages: the synthetic arm needs a percentage above 0")
        if self.synthetic_only_val is not None and self.synthetic_only_val not in self.bases:
            raise ValueError(f"synthetic_only_val: '{self.synthetic_only_val}' is not one of the bases")
        if self.compare is not None and len(self.compare) != 2:
            raise ValueError("compare: name two models, e.g. [real, synthetic-100]")
        if self.compare_budget is not None and self.compare_budget not in self.real_images:
            raise ValueError(f"compare_budget: {self.compare_budget} is not one of real_images")
        return self

    @property
    def label_efficiency(self) -> bool:
        """A label-efficiency study (real_images given): budgets, generators per budget, arms."""
        return self.real_images is not None

    @property
    def synthetic_percentages(self) -> list[float]:
        """The synthetic arm's percentages (0 % is the real arm)."""
        return [p for p in self.percentages if p > 0] if "synthetic" in self.arms else []

    @property
    def needs_generators(self) -> bool:
        return bool(self.synthetic_percentages) or "synthetic_only" in self.arms

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
    for stage in ("vqvae", "prior"):
        if getattr(config.generator, stage).config is not None:
            data["generator"][stage]["config"] = fix(getattr(config.generator, stage).config)
    for key in ("subset_seeds", "generator", "arms", "compare", "compare_budget"):  # defaults stay unset (old-style studies reject them)
        if key not in config.model_fields_set:
            data.pop(key)
    return StudyConfig.model_validate(data)


def nested_overrides(flat: dict[str, Any]) -> dict[str, Any]:
    """A ``set:`` mapping as nested overrides: dotted keys (model.encoder: resnet18) and nested mappings
    (model: {encoder: resnet18}) both work."""
    overrides: dict[str, Any] = {}
    for key, value in flat.items():
        nested: dict[str, Any] = {}
        node = nested
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        overrides = deep_merge(overrides, nested)
    return overrides


def seg_config_dict(config: StudyConfig) -> dict[str, Any]:
    """The resolved train-seg config of every run (seed set per run), validated now so typos fail early."""
    from dualsynth.segmentation import PRESETS, SegTrainConfig

    overrides = nested_overrides(config.seg.set)
    try:
        seg = load_config(SegTrainConfig, PRESETS, config.seg.preset, config.seg.config, overrides)
    except InputError as exc:
        if exc.path in ("config", "--preset"):  # the problem is in the study file's seg: section
            raise InputError("study config 'seg'", exc.problem) from None
        raise
    return seg.model_dump(mode="json")
