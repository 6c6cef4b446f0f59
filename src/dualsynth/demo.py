"""The main job: the whole pipeline on procedural demo data with quick settings, ending in a study report.

demo-data -> prepare -> train-vqvae -> train-prior -> sample -> study -> report.md. Every stage writes into
its own folder under ``out``; a stage that finished is skipped when the demo is started again, and a stopped
training resumes from its last checkpoint, so ``dualsynth demo --out DIR`` can always be re-run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from dualsynth.config import StrictModel
from dualsynth.io import read_csv, read_yaml, write_json, write_yaml


class DemoConfig(StrictModel):
    """Sizes of the demo; the defaults finish in about 4-5 minutes on a quiet 2-core CPU (docs/benchmarks.md)."""

    n: int = Field(24, ge=5, description="procedural micrographs (split by image into train/val/test)")
    size: int = Field(256, ge=64, description="micrograph size in px")
    tile: int = Field(128, ge=32, description="prepare cuts micrographs into tiles of this size")
    seed: int = Field(0, ge=0)
    vqvae_steps: int = Field(2500, ge=1, description="VQ-VAE updates (quick preset otherwise)")
    prior_arch: str = Field("gated", description="pixelcnn (the paper's) or gated (no blind spot)")
    prior_steps: int = Field(800, ge=1, description="prior updates (quick preset otherwise)")
    synthetic: int | None = Field(None, ge=1, description="synthetic pairs to sample (default: what the study needs)")
    percentages: list[float] = Field(default_factory=lambda: [0, 50, 100], description="% synthetic added to the real tiles")
    synthetic_only: list[int] | None = Field(None, description="synthetic-only training set sizes (default: as many as the real training tiles)")
    seg_epochs: int = Field(8, ge=1, description="U-Net epochs per run (quick preset otherwise)")
    device: str = "auto"
    threads: int | Literal["auto"] = Field("auto", description="torch CPU threads per process (auto: dualsynth.config.auto_threads)")


STAGES = ("data", "prepare", "vqvae", "prior", "sample", "study")


def run_demo(out: str | Path, config: DemoConfig | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the demo into ``out``; return where everything is, with the wall time of each stage."""
    from dualsynth.config import parse_threads
    from dualsynth.data import PrepareOptions, prepare
    from dualsynth.demo_data import write_demo_dataset
    from dualsynth.synthetic import sample_dataset
    from dualsynth.study import StudyConfig, run_study
    from dualsynth.training.prior import PRESETS as PRIOR_PRESETS
    from dualsynth.training.prior import PriorTrainConfig, train_prior
    from dualsynth.training.vqvae import PRESETS as VQ_PRESETS
    from dualsynth.training.vqvae import VQVAETrainConfig, train_vqvae
    from dualsynth.config import load_config

    config = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "demo.json"
    state: dict[str, Any] = read_yaml(state_path) if state_path.is_file() else {}
    settings = config.model_dump(mode="json", exclude={"threads"})  # threads change speed, not results
    if state.get("config") not in (None, settings):
        from dualsynth.errors import InputError

        raise InputError(out, "holds a demo with other settings; choose a new --out")
    state["config"] = settings
    state.setdefault("seconds", {})
    threads = parse_threads(config.threads)
    from dualsynth.config import wait_for_worker_server
    from dualsynth.study.runner import start_worker_server

    # the worker processes of `sample` and `study` fork from a server whose imports (about 5 s) run beside the
    # data stages, instead of each worker's at the start of those stages
    server = start_worker_server(threads, config.device)

    raw, data, runs = out / "demo-data", out / "data", out / "runs"
    vq_dir, prior_dir, synth_dir, study_dir = runs / "vqvae", runs / "prior", out / "synthetic", out / "study"

    def stage(name: str, fn: Callable[[], None]) -> None:
        if name in state["seconds"]:
            log(f"[{name}] done before ({state['seconds'][name]:.0f} s), skipped")
            return
        log(f"[{name}] ...")
        t0 = time.perf_counter()
        fn()
        state["seconds"][name] = round(time.perf_counter() - t0, 1)
        write_json(state_path, state)
        log(f"[{name}] {state['seconds'][name]:.0f} s")

    def make_data() -> None:
        write_demo_dataset(raw, n=config.n, size=config.size, seed=config.seed, overwrite=True)

    def prepare_tiles() -> None:
        # the demo's micrographs go through `prepare` as a user's would: images + masks folders, tiled,
        # keeping the demo's split by image (its LQ test masks are exact, as the paper tests on HQ only)
        splits: dict[str, list[str]] = {}
        for row in read_csv(raw / "hq" / "manifest.csv"):
            splits.setdefault(row["split"], []).append(row["file"])
        write_yaml(out / "splits.yaml", splits)
        for quality in ("hq", "lq"):
            prepare(PrepareOptions(
                images=raw / quality / "images", masks=raw / quality / "masks", classes=raw / quality / "classes.yaml",
                out=data / quality, tile=config.tile, splits=out / "splits.yaml", seed=config.seed,
                quality=quality.upper(), overwrite=True,
            ), progress=progress)

    def vqvae() -> None:
        cfg = load_config(VQVAETrainConfig, VQ_PRESETS, "quick", None,
                          {"steps": config.vqvae_steps, "seed": config.seed})
        resume = (vq_dir / "config.yaml").is_file()
        train_vqvae(data / "hq", vq_dir, cfg, resume=resume, device=config.device, threads=config.threads,
                    progress=progress)

    def prior() -> None:
        cfg = load_config(PriorTrainConfig, PRIOR_PRESETS, "quick", None,
                          {"arch": config.prior_arch, "steps": config.prior_steps, "seed": config.seed})
        resume = (prior_dir / "config.yaml").is_file()
        train_prior(vq_dir, prior_dir, cfg, resume=resume, device=config.device, threads=config.threads,
                    progress=progress)

    def real_train_tiles() -> int:
        from dualsynth.data import DatasetFolder

        return len(DatasetFolder(data / "hq").records("train"))

    def synthetic_only_sizes() -> list[int]:
        return config.synthetic_only if config.synthetic_only is not None else [real_train_tiles()]

    def sample() -> None:
        import math

        needed = max([math.ceil(max(config.percentages) / 100 * real_train_tiles())] + synthetic_only_sizes())
        # with the real tiles' fine texture, as `dualsynth sample` adds by default (docs/fidelity.md)
        sample_dataset(prior_dir, synth_dir, config.synthetic or needed, seed=config.seed, device=config.device,
                       overwrite=True, progress=progress, workers=threads, texture=data / "hq")

    def study() -> None:
        study_config = StudyConfig.model_validate({
            "bases": {"HQ": str(data / "hq"), "LQ": str(data / "lq")},
            "synthetic": {"synthetic": str(synth_dir)},
            "percentages": config.percentages,
            "synthetic_only": synthetic_only_sizes(),
            "seeds": [config.seed],
            "test": {"data": str(data / "hq"), "split": "test"},
            "seg": {"preset": "quick", "set": {"epochs": config.seg_epochs}},
            "device": config.device,
        })
        write_yaml(out / "study.yaml", study_config.model_dump(mode="json"))
        run_study(study_config, study_dir, workers=None if threads is None else 1, threads=threads,
                  progress=progress, log=log)

    for name, fn in zip(STAGES, (make_data, prepare_tiles, vqvae, prior, sample, study)):
        if name == "vqvae" and server is not None:
            wait_for_worker_server(server)  # done importing before the trainings choose their threads
        stage(name, fn)
    state["report"] = str(study_dir / "report.md")
    state["total_seconds"] = round(sum(state["seconds"].values()), 1)
    write_json(state_path, state)
    return state
