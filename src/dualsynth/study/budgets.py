"""A label-efficiency study's budgets: their dataset folders and their generators.

Each budget (`dualsynth.study.plan.BudgetPlan`: a base, a number of labelled source images, an image draw) is
realised as its own small dataset folder ``STUDY/budgets/NAME`` (`write_budget_dataset`): every tile of the
chosen training source images plus the base's val split, written atomically and reused when it exists with the
same images. It is the base of the budget's generator and of its U-Nets, so nothing trains on an image outside
the budget.

`run_generator` trains the budget's generator in ``STUDY/generators/NAME``: VQ-VAE -> prior -> sample (with the
clean-up `sample` does) -> fidelity against the budget's real tiles. Each finished stage is recorded in
``stages.json`` and skipped when the study starts again; an interrupted VQ-VAE or prior continues from its last
checkpoint. It is a top-level function, so Ray can run it as a task.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from dualsynth.data import DatasetFolder
from dualsynth.data.folder import MANIFEST_FIELDS, write_classes
from dualsynth.errors import InputError
from dualsynth.io import read_yaml, write_csv, write_json, write_yaml
from dualsynth.study.config import GeneratorSettings, StageSettings, StudyConfig, seg_config_dict
from dualsynth.study.plan import BudgetPlan, generator_stages_done

BUDGET_FILE = "budget.yaml"  # in a budget folder: the base and the source images it holds


def _budget_record(plan: BudgetPlan) -> dict[str, Any]:
    return {"base": str(Path(plan.base_path).resolve()), "budget": plan.budget, "draw": plan.draw,
            "sources": list(plan.sources)}


def write_budget_dataset(plan: BudgetPlan) -> Path:
    """The budget's dataset folder: the chosen training images' tiles (all of them) + the base's val split.

    Reused when it exists and holds the same images of the same base; one that holds others is an error (the
    study folder belongs to another config). Written into a temporary folder and renamed, so a killed study
    never leaves half a dataset.
    """
    out = Path(plan.dataset)
    record = _budget_record(plan)
    if (out / BUDGET_FILE).is_file():
        if read_yaml(out / BUDGET_FILE) != record:
            raise InputError(out, "holds a budget with other images or another base; use a new study folder")
        return out
    base = DatasetFolder(plan.base_path)
    chosen = set(plan.sources)
    records = [r for r in base.records(split="train") if r.source in chosen] + list(base.records(split="val"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for rec in records:  # files as stored (16-bit stays 16-bit)
            shutil.copy2(base.image_path(rec), tmp / "images" / Path(base.image_path(rec)).name)
            shutil.copy2(base.mask_path(rec), tmp / "masks" / Path(base.mask_path(rec)).name)
        write_classes(tmp / "classes.yaml", base.classes)
        write_csv(tmp / "manifest.csv", [{k: getattr(r, k) for k in MANIFEST_FIELDS} for r in records], MANIFEST_FIELDS)
        write_yaml(tmp / BUDGET_FILE, record)
        DatasetFolder(tmp)  # the folder reads back by the dataset conventions
        shutil.rmtree(out, ignore_errors=True)  # a folder without budget.yaml is a leftover
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def label_seg_config(config: StudyConfig, budgets: list[BudgetPlan]) -> tuple[dict[str, Any], str]:
    """The U-Net config of a label-efficiency study and a sentence on how its runs are matched.

    Step-matched training is the default: without `seg.steps` every run takes as many optimizer steps as the
    real-only run of the largest budget takes in the preset's epochs (epochs x updates per epoch);
    `seg.set.steps: null` asks for epoch-based runs (the report then says that more tiles meant more steps).
    """
    import math

    seg = seg_config_dict(config)
    explicit_epochs = "steps" in config.seg.set and config.seg.set["steps"] is None  # seg.set.steps: null
    if explicit_epochs:
        return seg, ("Epoch-based training: a run with more training tiles also takes more optimizer steps, so "
                     "part of a gain from synthetic tiles may be the extra steps.")
    if seg.get("steps"):
        return seg, f"Step-matched training: every U-Net takes {seg['steps']} optimizer steps (`seg.steps`)."
    tiles = max(b.tiles for b in budgets)
    steps = seg["epochs"] * math.ceil(tiles / seg["batch_size"])
    seg = {**seg, "steps": steps}
    return seg, (f"Step-matched training: `seg.steps` was not given, so every U-Net takes {steps} optimizer steps "
                 f"(the {seg['epochs']} epochs of the largest budget's {tiles} real tiles in batches of "
                 f"{seg['batch_size']}).")


def stage_config(cls: type, presets: dict[str, Any], stage: StageSettings, generator: GeneratorSettings,
                 extra: dict[str, Any], where: str) -> Any:
    """A generator stage's training config: its preset (default: the generator's), config file, overrides."""
    from dualsynth.config import load_config
    from dualsynth.study.config import nested_overrides

    overrides = {"seed": generator.seed, **extra}
    overrides.update(nested_overrides(stage.set))
    try:
        return load_config(cls, presets, stage.preset or (None if stage.config else generator.preset), stage.config,
                           overrides, default_preset=generator.preset)
    except InputError as exc:
        if exc.path in ("config", "--preset", "--set"):
            raise InputError(f"study config '{where}'", exc.problem) from None
        raise


def check_generator_settings(generator: GeneratorSettings) -> None:
    """Validate the VQ-VAE and prior configs now, so a typo fails before anything trains."""
    from dualsynth.training.prior import PRESETS as PRIOR_PRESETS
    from dualsynth.training.prior import PriorTrainConfig
    from dualsynth.training.vqvae import PRESETS as VQ_PRESETS
    from dualsynth.training.vqvae import VQVAETrainConfig

    stage_config(VQVAETrainConfig, VQ_PRESETS, generator.vqvae, generator, {}, "generator.vqvae")
    stage_config(PriorTrainConfig, PRIOR_PRESETS, generator.prior, generator, {}, "generator.prior")


def run_generator(job: dict[str, Any], generator: dict[str, Any], device: str, threads: int | None = None,
                  progress: bool = False, stages: tuple[str, ...] = ("vqvae", "prior", "sample", "fidelity"),
                  stop_after: dict[str, int] | None = None) -> dict[str, Any]:
    """Train (or continue) one budget's generator; `job` is a `BudgetPlan` as a dict. Returns ``{"name",
    "seconds", "ran": [stages]}`` or ``{"name", "error"}`` (text: it travels between processes).
    `stop_after` ({stage: updates}) ends a training stage early, as if killed (for tests)."""
    from dualsynth.config import apply_threads

    settings = GeneratorSettings.model_validate(generator)
    threads = apply_threads(threads)
    plan = BudgetPlan(**job)
    folder = Path(plan.generator)
    t0 = time.perf_counter()
    ran: list[str] = []
    try:
        for stage in stages:
            done = generator_stages_done(folder)
            if stage in done:
                continue
            s0 = time.perf_counter()
            _run_stage(stage, plan, settings, folder, device, threads, progress, (stop_after or {}).get(stage))
            if stop_after and stage in stop_after:
                return {"name": plan.name, "seconds": time.perf_counter() - t0, "ran": ran, "stopped": stage}
            write_json(folder / "stages.json", {**generator_stages_done(folder), stage: round(time.perf_counter() - s0, 1)})
            ran.append(stage)
    except InputError as exc:
        return {"name": plan.name, "error": exc.one_line()}
    except Exception as exc:  # reported with the generator's name; the study stops before its U-Nets
        return {"name": plan.name, "error": f"{type(exc).__name__}: {exc}"}
    return {"name": plan.name, "seconds": time.perf_counter() - t0, "ran": ran}


def check_generator_unchanged(plan: BudgetPlan, generator: GeneratorSettings) -> None:
    """Record the settings a generator folder is made with (GENERATOR/generator.yaml); refuse to continue one
    made with other settings, whose finished stages would otherwise be reused silently."""
    folder = Path(plan.generator)
    settings = {"generator": generator.model_dump(mode="json"), "sample_count": plan.sample_count,
                "dataset": plan.dataset}
    path = folder / "generator.yaml"
    if path.is_file():
        if read_yaml(path) != json.loads(json.dumps(settings)):
            raise InputError(path, "this generator was made with other settings (generator section, sample count or "
                                   "budget); use a new study folder, or delete the generator folder to retrain it")
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_yaml(path, settings)


def _run_stage(stage: str, plan: BudgetPlan, settings: GeneratorSettings, folder: Path, device: str, threads: int,
               progress: bool, stop_after: int | None) -> None:
    if stage == "vqvae":
        from dualsynth.training.vqvae import PRESETS, VQVAETrainConfig, train_vqvae

        cfg = stage_config(VQVAETrainConfig, PRESETS, settings.vqvae, settings, {}, "generator.vqvae")
        run = folder / "vqvae"
        train_vqvae(plan.dataset, run, cfg, resume=(run / "config.yaml").is_file(), device=device, threads=threads,
                    stop_after=stop_after, progress=progress)
    elif stage == "prior":
        from dualsynth.training.prior import PRESETS, PriorTrainConfig, train_prior

        cfg = stage_config(PriorTrainConfig, PRESETS, settings.prior, settings, {}, "generator.prior")
        run = folder / "prior"
        train_prior(folder / "vqvae", run, cfg, resume=(run / "config.yaml").is_file(), device=device, threads=threads,
                    stop_after=stop_after, progress=progress)
    elif stage == "sample":
        from dualsynth.synthetic import sample_dataset

        s = settings.sample
        sample_dataset(folder / "prior", folder / "synthetic", plan.sample_count, temperature=s.temperature,
                       seed=settings.seed, batch_size=s.batch_size, min_object_area=s.min_object_area, device=device,
                       overwrite=True, progress=progress, workers=1, texture=plan.dataset if s.texture else None)
    elif stage == "fidelity":
        from dualsynth.fidelity import fidelity

        fidelity(plan.dataset, folder / "synthetic", folder / "fidelity", seed=settings.seed,
                 max_tiles=settings.fidelity_max_tiles, device=device)
    else:  # pragma: no cover - the stage names are fixed
        raise ValueError(stage)
