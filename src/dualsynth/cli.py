"""The ``dualsynth`` command line: a thin layer over the Python API.

Every command turns bad input (:class:`dualsynth.errors.InputError`, click usage errors) into one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dualsynth import __version__
from dualsynth.errors import InputError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class OrderedGroup(click.Group):
    """Lists commands in pipeline order (the order they are added), not alphabetically."""

    def list_commands(self, ctx):
        return list(self.commands)


@click.group(cls=OrderedGroup, context_settings={**CONTEXT, "terminal_width": 120, "max_content_width": 120})
@click.version_option(__version__, prog_name="dualsynth")
def cli() -> None:
    """dualsynth: synthetic micrograph + mask pairs from a few real ones, and a study of whether they help.

    The pipeline: prepare (or demo-data) -> train-vqvae -> train-prior -> sample -> train-seg / study.
    `dualsynth COMMAND --help` explains each command.
    """


def device_option(f):
    return click.option(
        "--device", default="auto", show_default=True, help="auto (CUDA if available), cpu or cuda."
    )(f)


def threads_option(f):
    return click.option(
        "--threads", default="auto", show_default=True, metavar="auto|N",
        help="CPU threads for torch: auto (the cores this process may use, less those other work keeps busy; "
             "see docs/benchmarks.md) or a number.",
    )(f)


def existing_dir(_ctx, param, value):
    """click callback: the folder must exist (one-line error naming it otherwise)."""
    if value is None:
        return value
    path = Path(value)
    if not path.is_dir():
        raise InputError(path, f"{param.name.replace('_', '-')} folder not found")
    return path


# --- data ---
def _print_summary(summary: dict, out: Path) -> None:
    for path in summary.get("skipped_unpaired", []):
        click.echo(f"warning: {path}: no partner, left out", err=True)
    click.echo(f"wrote {summary['tiles']} tiles from {summary['images']} images to {out}")
    if summary.get("grey_values"):
        values = summary["grey_values"]
        where = (f"written to {out / 'classes.yaml'}" if summary.get("grey_values_in_classes_yaml")
                 else "not recorded in classes.yaml: these values are also class indices")
        click.echo(f"  masks hold grey value{'s' if len(values) > 1 else ''} {', '.join(map(str, values))}: "
                   f"mapped to class{'es 0..' if len(values) > 1 else ' '}{len(values) - 1} ({where})")
    click.echo("  tiles per split: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["tiles_per_split"].items())))
    if summary.get("dropped_tiles"):
        click.echo(f"  dropped {summary['dropped_tiles']} tiles with fewer classes than --min-classes")
    click.echo("  class fractions: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["class_fractions"].items()))


@cli.command(context_settings=CONTEXT)
@click.option("--images", required=True, type=click.Path(), help="Folder of micrographs (and masks named <stem>_mask.<ext> if --masks is not given).")
@click.option("--masks", type=click.Path(), help="Folder of masks, paired with the images by file stem (a _mask suffix is allowed).")
@click.option("--out", required=True, type=click.Path(), help="Dataset folder to write.")
@click.option("--classes", "classes_file", type=click.Path(), help="classes.yaml: class names, their colours in colour masks, optional 'default: true' class.")
@click.option("--num-classes", type=int, help="Number of classes of index masks without classes.yaml (default: largest index + 1, or one class per grey value when the masks hold other values than 0..C-1).")
@click.option("--tile", type=int, help="Cut images into square tiles of this size (px).")
@click.option("--stride", type=int, help="Step between tiles (default: --tile, no overlap).")
@click.option("--min-classes", type=int, default=1, show_default=True, help="Drop tiles showing fewer classes (2 drops matrix-only tiles, as the paper did).")
@click.option("--max-images", type=int, help="Use only the first N image pairs (sorted by name).")
@click.option("--val", "val_fraction", type=float, default=0.2, show_default=True, help="Fraction of source images for validation.")
@click.option("--test", "test_fraction", type=float, default=0.2, show_default=True, help="Fraction of source images for testing.")
@click.option("--splits", "splits_file", type=click.Path(), help="Split file (YAML/JSON: split -> image names) instead of random splits.")
@click.option("--split-set", help="Which set of a split file holding several (e.g. Super1 in the NASA splits.json).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random split.")
@click.option("--quality", default="", help="Mask quality tag written to the manifest (e.g. HQ or LQ).")
@click.option("--channels", type=click.Choice(["auto", "grey", "rgb"]), default="auto", show_default=True, help="Micrograph channels: auto keeps RGB only when R, G, B differ.")
@click.option("--intensity-range", default="auto", show_default=True, help="16-bit images: auto (stretch each image's own range), full (keep values) or LO,HI.")
@click.option("--skip-unpaired", is_flag=True, help="Leave out images without a mask and masks without an image (default: error).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def prepare(images, masks, out, classes_file, num_classes, tile, stride, min_classes, max_images, val_fraction,
            test_fraction, splits_file, split_set, seed, quality, channels, intensity_range, skip_unpaired, overwrite):
    """Build a dataset folder (tiles, index masks, splits, manifest) from micrographs and masks."""
    from dualsynth.data import PrepareOptions, parse_intensity_range
    from dualsynth.data import prepare as prepare_dataset

    opts = PrepareOptions(
        images=Path(images), masks=Path(masks) if masks else None, out=Path(out),
        classes=Path(classes_file) if classes_file else None, tile=tile, stride=stride, min_classes=min_classes,
        max_images=max_images, val_fraction=val_fraction, test_fraction=test_fraction,
        splits=Path(splits_file) if splits_file else None, split_set=split_set, seed=seed, quality=quality,
        channels=channels, intensity_range=parse_intensity_range(intensity_range), num_classes=num_classes,
        overwrite=overwrite, skip_unpaired=skip_unpaired,
    )
    summary = prepare_dataset(opts)
    _print_summary(summary, Path(out))


@cli.command("demo-data", context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(), help="Folder to write; it receives out/hq and out/lq dataset folders.")
@click.option("--n", "n", type=int, default=40, show_default=True, help="Number of micrographs.")
@click.option("--size", type=int, default=128, show_default=True, help="Micrograph size in px (square).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed: the same seed gives byte-identical files.")
@click.option("--grey", is_flag=True, help="Grey micrographs instead of RGB ones like the paper's.")
@click.option("--overwrite", is_flag=True, help="Replace existing output folders.")
def demo_data(out, n, size, seed, grey, overwrite):
    """Procedural multi-phase micrographs with exact (HQ) and degraded (LQ) masks, for trying things out."""
    from dualsynth.demo_data import write_demo_dataset

    summary = write_demo_dataset(Path(out), n=n, size=size, seed=seed, overwrite=overwrite, rgb=not grey)
    click.echo(f"wrote {n} micrographs of {size} px to {summary['hq']} (exact masks) and {summary['lq']} (degraded masks)")
    click.echo("  split: " + ", ".join(f"{k}={v}" for k, v in summary["splits"].items()))
    click.echo("  class fractions: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["class_fractions_hq"].items()))
    click.echo(f"  LQ masks: {100 * summary['lq_wrong_pixel_fraction']:.1f}% of train/val pixels mislabelled")
# --- end data ---

# --- metrics ---
def _refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    if not overwrite:
        for p in paths:
            if p.exists():
                raise InputError(p, "already exists (use --overwrite to replace it)")


@cli.command("evaluate-masks", context_settings=CONTEXT)
@click.option("--pred", "pred_dir", required=True, type=click.Path(), callback=existing_dir, help="Folder of predicted masks (index or colour PNG/TIFF).")
@click.option("--truth", "truth_dir", required=True, type=click.Path(), callback=existing_dir, help="Folder of ground-truth masks, paired with --pred by file stem (a _mask suffix is allowed).")
@click.option("--classes", "classes_file", type=click.Path(), help="classes.yaml: class names (and colours, for colour masks).")
@click.option("--num-classes", type=int, help="Number of classes of index masks, instead of --classes.")
@click.option("--out", required=True, type=click.Path(), help="Folder for per_image.csv, per_class.csv and summary.json.")
@click.option("--overwrite", is_flag=True, help="Replace per_image.csv, per_class.csv and summary.json if they exist.")
def evaluate_masks(pred_dir, truth_dir, classes_file, num_classes, out, overwrite):
    """Score predicted masks against the truth: accuracy, mIoU and the paper's Missing Class IoU.

    Missing Class IoU (paper §4.3.1) averages, per image, the IoU of only the classes present in the ground
    truth; per class it averages over the images that contain the class.
    """
    from dualsynth.data import default_classes, read_classes
    from dualsynth.segmentation.evaluation import evaluate_mask_folders, format_evaluation, write_evaluation

    if (classes_file is None) == (num_classes is None):
        raise click.UsageError("give exactly one of --classes or --num-classes")
    if classes_file is not None:
        classes = read_classes(classes_file)
    else:
        if num_classes < 2:
            raise InputError("--num-classes", f"must be at least 2, got {num_classes}")
        classes = default_classes(num_classes)
    out = Path(out)
    _refuse_overwrite([out / "per_image.csv", out / "per_class.csv", out / "summary.json"], overwrite)
    result = evaluate_mask_folders(pred_dir, truth_dir, classes)
    write_evaluation(result, out)
    click.echo(format_evaluation(result))
    click.echo(f"wrote {out / 'per_image.csv'}, per_class.csv and summary.json")


@cli.command("clean-masks", context_settings=CONTEXT)
@click.option("--in", "in_dir", required=True, type=click.Path(), callback=existing_dir, help="Folder of decoded masks: 8/16-bit grey PNG/TIFF (levels), or C-channel TIFF (onehot).")
@click.option("--out", required=True, type=click.Path(), help="Folder for the clean index-mask PNGs (same stems).")
@click.option("--num-classes", required=True, type=click.IntRange(2, 256), help="Number of classes C (levels: class k at k/(C-1)).")
@click.option("--encoding", type=click.Choice(["levels", "onehot"]), default="levels", show_default=True, help="How the mask was encoded in the joint image.")
@click.option("--min-object-area", type=click.IntRange(min=0), help="Fill objects smaller than this (px); default: 200 px² per 256x256 tile, scaled with tile area.")
@click.option("--connectivity", type=click.IntRange(1, 2), default=1, show_default=True, help="Object pixels connect through 4 (1) or 8 (2) neighbours.")
@click.option("--seed", type=int, default=0, show_default=True, help="k-means seed.")
@click.option("--overwrite", is_flag=True, help="Replace masks that already exist in --out.")
def clean_masks(in_dir, out, num_classes, encoding, min_object_area, connectivity, seed, overwrite):
    """Turn decoded masks into clean index masks: k-means to class levels, then fill small objects (Fig. 11)."""
    from dualsynth.postprocess import clean_mask_folder

    result = clean_mask_folder(in_dir, out, num_classes, encoding, min_object_area, connectivity, seed, overwrite,
                               warn=lambda line: click.echo(line, err=True))
    changed = result["changed"]
    click.echo(f"cleaned {result['masks']} masks into {out}")
    click.echo(f"  pixels changed by the clean-up: mean {100 * sum(changed) / len(changed):.2f} %, max {100 * max(changed):.2f} %")
    click.echo("  class fractions: " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in enumerate(result["class_fractions"])))
# --- end metrics ---

# --- vqvae ---
def run_options(f):
    """The options every trainer on a dataset folder shares, after its own --data, --out and --preset."""
    for option in reversed([
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one config key (repeatable), e.g. --set tile=128 --set model.<key>=VALUE."),
        click.option("--steps", type=int, help="Training updates (same as --set steps=N)."),
        click.option("--seed", type=int, help="Seed of every random choice (same as --set seed=S)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from checkpoints/last.pt; with no config options, uses the run's saved config."),
        threads_option,
        click.option("--no-progress", is_flag=True, help="No progress bar."),
        device_option,
    ]):
        f = option(f)
    return f


def run_config(module, config_cls, out, data, preset, config_file, overrides, steps, seed, resume):
    """(config, dataset) of a trainer's run: preset -> config file -> --set/--steps/--seed, or with --resume and
    no config options the run's saved config and dataset (`module.saved_run_config`)."""
    from dualsynth.config import deep_merge, load_config, parse_overrides

    extra = parse_overrides(list(overrides))
    for key, value in (("steps", steps), ("seed", seed)):
        if value is not None:
            extra = deep_merge(extra, {key: value})
    if resume and not (preset or config_file or extra):
        config, saved_data = module.saved_run_config(out)
        data = data or saved_data
    else:
        config = load_config(config_cls, module.PRESETS, preset, config_file, extra, default_preset="quick")
    if data is None:
        raise InputError("--data", "give the dataset folder to train on")
    return config, data


@cli.command("train-vqvae", context_settings=CONTEXT)
@click.option("--data", type=click.Path(), help="Dataset folder (from prepare or demo-data); trains on its train split. With --resume: default the run's own.")
@click.option("--out", required=True, type=click.Path(), help="Run folder to create (or to continue with --resume).")
@click.option("--preset", type=click.Choice(["quick", "paper"]), help="quick: a few minutes on a 2-core CPU; paper: the paper's Table 4. Default: the config file's preset, else quick.")
@click.option("--config", "config_file", type=click.Path(), help="YAML config (any keys of the preset; see configs/vqvae-*.yaml).")
@run_options
def train_vqvae_cmd(data, out, preset, config_file, overrides, steps, seed, resume, threads, no_progress, device):
    """Train the VQ-VAE on joint micrograph+mask images (writes config, checkpoints, log, figures, report)."""
    from dualsynth.training import vqvae
    from dualsynth.training.vqvae import VQVAETrainConfig, format_report, train_vqvae

    config, data = run_config(vqvae, VQVAETrainConfig, out, data, preset, config_file, overrides, steps, seed, resume)
    summary = train_vqvae(data, out, config, resume=resume, device=device, threads=threads, progress=not no_progress)
    click.echo(f"trained {summary['step']} steps; best reconstruction error {summary['best_error']:.5f} at step {summary['best_step']}")
    if "report" in summary:
        click.echo(format_report(summary["report"]))
    click.echo(f"run folder: {out}")


@cli.command("encode", context_settings=CONTEXT)
@click.option("--vqvae", "run_dir", required=True, type=click.Path(), help="VQ-VAE run folder (from train-vqvae).")
@click.option("--data", required=True, type=click.Path(), help="Dataset folder whose tiles to encode.")
@click.option("--out", required=True, type=click.Path(), help="Folder for <split>.npz (codes, files), figure9.png and encode.json.")
@threads_option
@device_option
def encode_cmd(run_dir, data, out, threads, device):
    """Encode every tile to its z-matrix of codebook indices (and draw the paper's Figure 9)."""
    from dualsynth.config import apply_threads
    from dualsynth.training.vqvae import encode_dataset

    apply_threads(threads)
    info = encode_dataset(run_dir, data, out, device=device)
    shapes = ", ".join(f"{k}: {n} x {'x'.join(map(str, info['z_shape'][k]))}" for k, n in info["tiles"].items())
    click.echo(f"wrote z-matrices ({shapes}) and figure9.png to {out}")


@cli.command("report-vqvae", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--data", type=click.Path(), help="Dataset folder (default: the one the run trained on).")
@click.option("--split", "split_name", default="val", show_default=True, help="Which split's tiles to reconstruct (train if it has none).")
@threads_option
@device_option
def report_vqvae_cmd(run_dir, data, split_name, threads, device):
    """Score a VQ-VAE's reconstructions: image MSE, mask pixel accuracy, mIoU, Missing Class IoU -> RUN/report.json."""
    from dualsynth.config import apply_threads
    from dualsynth.training.vqvae import report_vqvae

    apply_threads(threads)
    report_vqvae(run_dir, data, device=device, split_name=split_name, print_table=True)
# --- end vqvae ---

# --- prior ---
@cli.command("train-prior", context_settings=CONTEXT)
@click.option("--vqvae", "vqvae_dir", type=click.Path(), help="VQ-VAE run folder (from train-vqvae). With --resume: default the run's own.")
@click.option("--out", required=True, type=click.Path(), help="Prior run folder to create (or to continue with --resume).")
@click.option("--arch", type=click.Choice(["pixelcnn", "gated"]), help="pixelcnn: the paper's PixelCNN; gated: gated PixelCNN without blind spot. Default: the preset's (quick: gated, paper: pixelcnn).")
@click.option("--preset", type=click.Choice(["quick", "paper"]), help="quick: minutes on a CPU (gated, 32x32 crops); paper: the paper's PixelCNN on whole z-matrices. Default: the config file's preset, else quick.")
@click.option("--config", "config_file", type=click.Path(), help="YAML config (any keys of the preset; see configs/prior-*.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one config key, e.g. --set gated.num_layers=15 --set crop=null (repeatable).")
@click.option("--condition", type=click.Choice(["none", "phase-fractions"]), help="phase-fractions: condition the prior on each tile's class fractions (enables sample --phase-fractions).")
@click.option("--data", "data_dir", type=click.Path(), help="Dataset to encode (default: the one the VQ-VAE trained on).")
@click.option("--codes", "codes_dir", type=click.Path(), help="Use the z-matrices written by 'dualsynth encode' instead of encoding.")
@click.option("--steps", type=int, help="Training updates (same as --set steps=N).")
@click.option("--seed", type=int, help="Seed of every random choice (same as --set seed=S).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from checkpoints/last.pt; with no config options, uses the run's saved config.")
@threads_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@device_option
def train_prior_cmd(vqvae_dir, out, arch, preset, config_file, overrides, condition, data_dir, codes_dir, steps, seed,
                    resume, threads, no_progress, device):
    """Train the prior (PixelCNN or gated PixelCNN) over the VQ-VAE's z-matrices; keeps the best validation NLL."""
    from dualsynth.config import deep_merge, load_config, parse_overrides, validate_config
    from dualsynth.training.prior import PRESETS, PriorTrainConfig, saved_run_config, train_prior

    extra = parse_overrides(list(overrides))
    for key, value in (("arch", arch), ("condition", condition), ("steps", steps), ("seed", seed)):
        if value is not None:
            extra = deep_merge(extra, {key: value})
    if resume and not (preset or config_file) and (Path(out) / "config.yaml").is_file():
        saved, inputs = saved_run_config(out)
        config = validate_config(PriorTrainConfig, deep_merge(saved.model_dump(mode="json"), extra), "--set")
        vqvae_dir = vqvae_dir or inputs["vqvae"]
        data_dir = data_dir or inputs["data"]
        codes_dir = codes_dir or inputs["codes"]
    else:
        config = load_config(PriorTrainConfig, PRESETS, preset, config_file, extra, default_preset="quick")
    if vqvae_dir is None:
        raise InputError("--vqvae", "give the VQ-VAE run folder whose z-matrices the prior learns")
    summary = train_prior(vqvae_dir, out, config, data_dir=data_dir, codes_dir=codes_dir, resume=resume,
                          device=device, threads=threads, progress=not no_progress)
    click.echo(
        f"trained {summary['step']} steps; best {summary['validated_on']} NLL {summary['best_bits_per_code']:.4f} "
        f"bits per code at step {summary['best_step']} (a prior that knows nothing: "
        f"{summary['uniform_bits_per_code']:.4f}); z-matrices {'x'.join(map(str, summary['z_shape']))}"
    )
    click.echo(f"run folder: {out}")


@cli.command("sample", context_settings=CONTEXT)
@click.option("--prior", "prior_dir", required=True, type=click.Path(), help="Prior run folder (from train-prior).")
@click.option("--n", "n", required=True, type=click.IntRange(min=1), help="Number of synthetic pairs.")
@click.option("--out", required=True, type=click.Path(), help="Dataset folder to write (same format as prepare).")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0), help="Softmax temperature of the prior (0: most likely code).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sample i depends on (seed, i) only.")
@click.option("--batch", "batch_size", default=16, show_default=True, type=click.IntRange(min=1), help="z-matrices sampled at once.")
@click.option("--phase-fractions", help="Class fractions f0,f1,... the tiles should have (needs a prior trained with --condition phase-fractions).")
@click.option("--min-object-area", type=click.IntRange(min=0), help="Clean-up: fill objects smaller than this (px²). Default: 200 px² at 256x256, scaled with tile area.")
@click.option("--size", "z_size", type=click.IntRange(min=1), help="Side of the sampled z-matrices (default: the training tiles'); tiles are this x the VQ-VAE's downsampling.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--workers", default="auto", show_default=True, metavar="auto|N", help="Processes sampling side by side on a CPU, one thread each (auto: one per free core).")
@click.option("--real", type=click.Path(), callback=existing_dir, help="Real dataset folder: afterwards measure the new set against it (dualsynth fidelity), print the headline numbers and write OUT/fidelity/.")
@click.option("--renderer", "renderer_dir", type=click.Path(), help="train-renderer run folder: it draws the micrographs for the clean masks instead of the VQ-VAE (a renderer with model.guide=lowpass refines the VQ-VAE's micrographs).")
@click.option("--texture", "texture_real", default="auto", show_default=True, metavar="auto|none|PATH", help="Texture stage (dualsynth texture; not in the paper): fit the fine texture of a real dataset's train split (OUT/texture.npz) and add it to every micrograph. auto: the dataset the VQ-VAE was trained on (none with --renderer, which draws its own texture); none: the paper's decoded micrographs as they are.")
@click.option("--texture-pool", type=click.IntRange(min=2), help="Texture stage: lowpass average-pool size (default: the VQ-VAE's downsampling).")
@click.option("--keep-high-band", is_flag=True, help="Texture stage: add the texture to the micrograph as it is instead of to its low-pass copy.")
@threads_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@device_option
def sample_cmd(prior_dir, n, out, temperature, seed, batch_size, phase_fractions, min_object_area, z_size, overwrite,
               workers, real, renderer_dir, texture_real, texture_pool, keep_high_band, threads, no_progress, device):
    """Sample synthetic micrograph + mask pairs: prior -> z-matrices -> VQ-VAE decoder -> mask clean-up."""
    from dualsynth.config import apply_threads, parse_threads
    from dualsynth.synthetic import FIDELITY_DIR, check_real_fits, record_fidelity, sample_dataset, texture_source

    apply_threads(threads)
    if real is not None:
        check_real_fits(prior_dir, real)
    # auto: the texture of the VQ-VAE's training tiles, unless a renderer draws the micrographs (and their texture)
    texture_real = None if renderer_dir is not None and texture_real == "auto" else texture_source(prior_dir, texture_real)
    summary = sample_dataset(
        prior_dir, out, n, temperature=temperature, seed=seed, batch_size=batch_size,
        phase_fractions=phase_fractions, min_object_area=min_object_area,
        z_shape=None if z_size is None else (z_size, z_size), device=device, overwrite=overwrite,
        progress=not no_progress, workers=parse_threads(workers), renderer=renderer_dir,
        texture=texture_real, texture_pool=texture_pool, replace_high_band=not keep_high_band,
    )
    h, w = summary["tile_shape"]
    click.echo(
        f"wrote {summary['n']} synthetic pairs ({h}x{w} px) to {out}: {summary['distinct_z_matrices']} distinct "
        f"z-matrices, {100 * summary['mean_changed_by_cleanup']:.2f}% of mask pixels changed by the clean-up, "
        f"{summary['sampling_seconds']:.1f} s with {summary['workers']} process(es); grid.png shows the first pairs"
        + ("; texture fitted on " + summary["texture"]["real"] + " (OUT/texture.json)" if summary["texture"] else "")
    )
    if real is not None:  # the new set against the real one, as `dualsynth fidelity` measures it
        from dualsynth.fidelity import fidelity, fidelity_headline

        report = fidelity(real, out, Path(out) / FIDELITY_DIR, seed=seed, device=device)
        record_fidelity(out, real, report)
        click.echo(fidelity_headline(report))
        click.echo(f"wrote fidelity.json, fidelity.md and fidelity.png to {Path(out) / FIDELITY_DIR}")


@cli.command("inspect", context_settings=CONTEXT)
@click.option("--synthetic", "synthetic_dir", required=True, type=click.Path(), help="Synthetic dataset folder (from sample).")
@click.option("--real", "real_dir", type=click.Path(), help="Real dataset to compare with (default: the prior's training data).")
def inspect_cmd(synthetic_dir, real_dir):
    """Quality of a synthetic set: phase fractions vs real, pixels changed by the clean-up, distinct samples."""
    from dualsynth.synthetic import format_inspect, inspect_synthetic

    report = inspect_synthetic(synthetic_dir, real_dir)
    click.echo(format_inspect(report))
    click.echo(f"wrote {Path(synthetic_dir) / 'inspect.json'}")
# --- end prior ---

# --- renderer ---
@cli.command("train-renderer", context_settings=CONTEXT)
@click.option("--data", type=click.Path(), help="Dataset folder; trains on its train split's (micrograph, mask) pairs, validates on val. With --resume: default the run's own.")
@click.option("--out", required=True, type=click.Path(), help="Run folder to create (or to continue with --resume).")
@click.option("--preset", type=click.Choice(["quick"]), help="quick: a few minutes on a 2-core CPU (the paper has no renderer, so there is no paper preset). Default: the config file's preset, else quick.")
@click.option("--config", "config_file", type=click.Path(), help="YAML config (any keys of the preset; see configs/renderer-quick.yaml).")
@run_options
def train_renderer_cmd(data, out, preset, config_file, overrides, steps, seed, resume, threads, no_progress, device):
    """Train the renderer: a mask-conditioned micrograph generator (U-Net with noise maps, PatchGAN, hinge loss)."""
    from dualsynth.training import renderer
    from dualsynth.training.renderer import RendererTrainConfig, train_renderer

    config, data = run_config(renderer, RendererTrainConfig, out, data, preset, config_file, overrides, steps, seed, resume)
    summary = train_renderer(data, out, config, resume=resume, device=device, threads=threads, progress=not no_progress)
    best = summary["best_score"]
    click.echo(f"trained {summary['step']} steps; best validation score {best:.4f} at step {summary['best_step']} "
               f"(pooled L1 {summary.get('val_l1', float('nan')):.4f}, high-pass energy ratio "
               f"{summary.get('val_hf_ratio', float('nan')):.3f})")
    click.echo(f"run folder: {out} (checkpoints/best.pt, log.csv, monitor.png)")


@cli.command("render", context_settings=CONTEXT)
@click.option("--renderer", "renderer_dir", required=True, type=click.Path(), help="train-renderer run folder.")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Dataset folder whose masks are rendered (a renderer with model.guide=lowpass refines its micrographs).")
@click.option("--out", required=True, type=click.Path(), help="Dataset folder to write (same masks, rendered micrographs, origin synthetic).")
@click.option("--split", help="Render only this split's tiles (default: every tile).")
@click.option("--seed", default=0, show_default=True, type=int, help="Tile n's noise depends on (seed, n) only.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@threads_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@device_option
def render_cmd(renderer_dir, data_dir, out, split, seed, overwrite, threads, no_progress, device):
    """Re-render the micrographs of a dataset folder's masks with a trained renderer (a new dataset folder)."""
    from dualsynth.config import apply_threads
    from dualsynth.synthetic import render_dataset

    apply_threads(threads)
    summary = render_dataset(renderer_dir, data_dir, out, seed=seed, split=split, device=device, overwrite=overwrite,
                             progress=not no_progress)
    cropped = f" ({summary['cropped_tiles']} cropped to the renderer's multiple)" if summary["cropped_tiles"] else ""
    click.echo(f"rendered {summary['tiles']} micrographs{cropped} to {out} in {summary['seconds']:.1f} s; grid.png shows the first")


@cli.command("texture", context_settings=CONTEXT)
@click.option("--real", "real_dir", required=True, type=click.Path(), help="Real dataset folder; the texture is fitted on its train split.")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Dataset folder (e.g. from sample) whose micrographs get the texture.")
@click.option("--out", required=True, type=click.Path(), help="Dataset folder to write (same masks, textured micrographs).")
@click.option("--split", help="Texture only this split's tiles of --data (default: every tile).")
@click.option("--seed", default=0, show_default=True, type=int, help="Tile n's texture depends on (seed, n) only.")
@click.option("--pool", default=4, show_default=True, type=click.IntRange(min=2), help="lowpass average-pool size: the VQ-VAE's downsampling (texture finer than this is fitted and added).")
@click.option("--keep-high-band", is_flag=True, help="Add the texture to the micrograph as it is instead of to its low-pass copy.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@threads_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def texture_cmd(real_dir, data_dir, out, split, seed, pool, keep_high_band, overwrite, threads, no_progress):
    """Add fine texture fitted on real tiles to a dataset's micrographs (the texture stage; not in the paper)."""
    from dualsynth.config import apply_threads
    from dualsynth.synthetic import texture_dataset

    apply_threads(threads)
    summary = texture_dataset(real_dir, data_dir, out, seed=seed, pool=pool, replace_high_band=not keep_high_band,
                              split=split, overwrite=overwrite, progress=not no_progress)
    stds = ", ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in summary["class_std"].items())
    click.echo(f"textured {summary['tiles']} micrographs to {out} in {summary['seconds']:.1f} s; texture std per class: "
               f"{stds}; grid.png shows the first")
# --- end renderer ---

# --- segmentation ---
def _seg_overrides(sets, **options) -> dict:
    """--set pairs plus the dedicated options that were given (None = not given)."""
    from dualsynth.config import deep_merge, parse_overrides

    overrides = parse_overrides(list(sets))
    return deep_merge(overrides, {k: v for k, v in options.items() if v is not None})


def _echo_epoch(row: dict) -> None:
    unit = "step" if "step" in row else "epoch"
    click.echo(f"{unit} {int(row[unit]):>3}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
               f"acc {100 * row['val_accuracy']:.1f}%  mIoU {100 * row['val_miou']:.1f}%  "
               f"MCIoU {100 * row['val_missing_class_iou']:.1f}%  lr {row['lr']:.2g}  ({row['seconds']:.0f} s)", err=True)


@cli.command("train-seg", context_settings=CONTEXT)
@click.option("--train", "train_dir", type=click.Path(), help="Real dataset folder; its train split is trained on.")
@click.option("--val", "val_dir", type=click.Path(), help="Dataset folder whose val split validates (default: --train).")
@click.option("--synthetic", "synthetic_dir", type=click.Path(), help="Synthetic dataset folder (from 'dualsynth sample').")
@click.option("--synthetic-percent", type=float, help="Add round(P/100 x real training tiles) synthetic tiles, drawn by --seed.")
@click.option("--synthetic-only", type=int, help="Train on N synthetic tiles only (validation stays real: --val).")
@click.option("--out", required=True, type=click.Path(), help="Run folder to write.")
@click.option("--preset", type=click.Choice(["quick", "paper"]), help="quick: minutes on a CPU; paper: Table 3 (EfficientNet-B3, 200 epochs). Default quick.")
@click.option("--config", "config_file", type=click.Path(), help="YAML config on top of the preset.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one config key (repeatable), e.g. --set model.encoder=resnet34.")
@click.option("--encoder-weights", help="none, imagenet (the paper's; read from the local Hugging Face or torch cache, never downloaded) or a local encoder state-dict file.")
@click.option("--augment", type=click.Choice(["none", "paper", "copy_paste"]), help="paper: the Albumentations baseline of §5.3 on training tiles; copy_paste: objects of real training tiles pasted into training tiles.")
@click.option("--epochs", type=int, help="Maximum number of epochs.")
@click.option("--steps", type=int, help="Step mode: exactly this many optimizer updates, whatever the training set's size (validation every val_every updates).")
@click.option("--seed", type=int, help="Seed of the model init, the synthetic draw, data order and augmentation.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch (same config).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar (shown only on a terminal).")
@threads_option
@device_option
def train_seg(train_dir, val_dir, synthetic_dir, synthetic_percent, synthetic_only, out, preset, config_file, sets,
              encoder_weights, augment, epochs, steps, seed, resume, progress, threads, device):
    """Train a U-Net (segmentation-models-pytorch) on real tiles, optionally with synthetic pairs added.

    Best checkpoint on the validation score named by `monitor` (default Missing Class IoU), early stopping,
    log.csv, learning_curve.png, and manifest.json listing every tile used.
    """
    from dualsynth.config import deep_merge, load_config, validate_config
    from dualsynth.segmentation import PRESETS, SegTrainConfig, saved_run_config, train_segmentation

    overrides = _seg_overrides(sets, encoder_weights=encoder_weights, augment=augment, epochs=epochs, steps=steps,
                               seed=seed)
    if resume and (Path(out) / "config.yaml").is_file() and preset is None and config_file is None:
        saved, data = saved_run_config(out)
        config = validate_config(SegTrainConfig, deep_merge(saved.model_dump(mode="json"), overrides), "--set")
        train_dir = train_dir or data["train"]
        val_dir = val_dir or data["val"]
        synthetic_dir = synthetic_dir or data["synthetic"]
        synthetic_percent = synthetic_percent if synthetic_percent is not None else data["synthetic_percent"]
        synthetic_only = synthetic_only if synthetic_only is not None else data["synthetic_only"]
    else:
        config = load_config(SegTrainConfig, PRESETS, preset, config_file, overrides, default_preset="quick")
    summary = train_segmentation(
        train_dir, out, config, val=val_dir, synthetic=synthetic_dir, synthetic_percent=synthetic_percent,
        synthetic_only=synthetic_only, resume=resume, device=device, threads=threads, progress=progress,
        on_epoch=_echo_epoch,
    )
    how = "stopped early" if summary["stopped_early"] else "finished" if summary["finished"] else "paused"
    best, unit = summary["best"], summary["unit"]
    click.echo(f"{how} after {summary[f'{unit}s_done']} {unit}s; best validation {summary['monitor']} "
               f"{'-' if best != best else f'{100 * best:.1f} %'} at {unit} {summary[f'best_{unit}']}")
    if summary.get("best_trivial"):
        click.echo(f"warning: on the validation tiles {summary['best_trivial']}; try longer training, larger crops, "
                   "crop_foreground or model.normalize: none")
    click.echo(f"run folder: {out} (checkpoints/best.pt, log.csv, learning_curve.png, manifest.json)")


@cli.command("evaluate", context_settings=CONTEXT)
@click.option("--model", "model_dir", required=True, type=click.Path(), help="train-seg run folder.")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Dataset folder to evaluate on.")
@click.option("--split", default="test", show_default=True, help="Split of --data ('all' for every tile).")
@click.option("--out", required=True, type=click.Path(), help="Folder for per_image.csv, per_class.csv, summary.json, overlays.")
@click.option("--overlays", type=click.IntRange(min=0), default=4, show_default=True, help="Tiles drawn as image / true mask / prediction.")
@threads_option
@device_option
def evaluate_cmd(model_dir, data_dir, split, out, overlays, threads, device):
    """Score a trained U-Net: pixel accuracy, mIoU, Missing Class IoU, per class and per image (Figs. 18, 21)."""
    from dualsynth.config import apply_threads
    from dualsynth.segmentation import evaluate_run, format_evaluation

    apply_threads(threads)
    result = evaluate_run(model_dir, data_dir, out, None if split == "all" else split, overlays, device)
    click.echo(format_evaluation(result))
    click.echo(f"wrote per_image.csv, per_class.csv, summary.json{' and overlays' if overlays else ''} to {out}")


@cli.command("pretest", context_settings=CONTEXT)
@click.option("--model", "model_dir", required=True, type=click.Path(), help="train-seg run folder of a model trained on real data.")
@click.option("--synthetic", "synthetic_dir", required=True, type=click.Path(), help="Synthetic dataset folder.")
@click.option("--out", required=True, type=click.Path(), help="Folder for the scores and pretest.png.")
@click.option("--overlays", type=click.IntRange(min=0), default=4, show_default=True, help="Tiles drawn as synthetic image / synthetic mask / prediction.")
@threads_option
@device_option
def pretest_cmd(model_dir, synthetic_dir, out, overlays, threads, device):
    """The paper's quality pre-test: segment synthetic micrographs with a real-data model, score the synthetic
    masks against its predictions (low scores: the synthetic pairs do not agree; retrain the generator)."""
    from dualsynth.config import apply_threads
    from dualsynth.segmentation import format_evaluation, pretest

    apply_threads(threads)
    result = pretest(model_dir, synthetic_dir, out, overlays, device)
    click.echo(format_evaluation(result))
    click.echo(f"wrote per_image.csv, per_class.csv, summary.json{' and pretest.png' if overlays else ''} to {out}")


@cli.command("study", context_settings=CONTEXT)
@click.option("--config", "config_file", required=True, type=click.Path(), help="Study YAML (bases, synthetic sets, percentages, seeds, test set, seg preset).")
@click.option("--out", required=True, type=click.Path(), help="Study folder (runs/, results.csv, figures, report.md).")
@click.option("--workers", default="auto", show_default=True, metavar="auto|N", help="Trainings side by side on this machine (local backend); auto: see docs/benchmarks.md.")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="local processes, or one Ray task per run.")
@click.option("--address", help="Ray cluster address (default: start a local Ray).")
@click.option("--device", default=None, help="Override the config's device: auto, cpu or cuda.")
@click.option("--threads", default="auto", show_default=True, metavar="auto|N", help="Torch threads per training (auto: the free cores shared by the workers).")
@click.option("--plan", "plan_only", is_flag=True, help="Print every stage the study would run (generator stages per budget and draw, U-Net runs per arm), marking finished ones; run nothing.")
@click.option("--report-only", is_flag=True, help="Rebuild report.md and the figures and tables from results.csv and the runs' per-tile scores; train nothing.")
def study_cmd(config_file, out, workers, backend, address, device, threads, plan_only, report_only):
    """The paper's experiment: U-Nets trained with 0..300 % synthetic data added (and synthetic only), or a
    label-efficiency study (real_images: budgets of labelled images, a generator per budget, arms compared with
    bootstrap intervals), scored on real test tiles; finished stages are skipped when a study is started again."""
    from dualsynth.config import parse_threads
    from dualsynth.study import describe_plan, load_study_config, rebuild_report, run_study

    config = load_study_config(config_file, {"device": device} if device else None)
    if plan_only and report_only:
        raise click.UsageError("give --plan or --report-only, not both")
    if plan_only:
        for line in describe_plan(config, out):
            click.echo(line)
        return
    if report_only:
        paths = rebuild_report(config, out)
        click.echo(f"report: {paths['report']}")
        return
    summary = run_study(config, out, workers=parse_threads(workers), backend=backend, address=address,
                        threads=parse_threads(threads),
                        log=lambda line: click.echo(line, err=True))
    click.echo(f"{summary['runs']} runs ({summary['skipped']} already finished, {summary['trained']} trained now)")
    click.echo(f"report: {summary['report']}")
# --- end segmentation ---

# --- fidelity ---
@cli.command("fidelity", context_settings=CONTEXT)
@click.option("--real", "real_dir", required=True, type=click.Path(), help="Real dataset folder the synthetic set imitates (val+test tiles for the distributions, train tiles for memorisation).")
@click.option("--synthetic", "synthetic_dir", required=True, type=click.Path(), help="Synthetic dataset folder (from sample).")
@click.option("--out", required=True, type=click.Path(), help="Folder for fidelity.json, fidelity.md and fidelity.png.")
@click.option("--model", "model_dir", type=click.Path(), help="train-seg run folder of a real-data U-Net: its encoder gives the KID features, and the pre-test runs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Draws tiles (--max-tiles), pixels and KID subsets.")
@click.option("--max-tiles", type=click.IntRange(min=1), default=500, show_default=True, help="At most this many tiles of each set and role (real held-out, real train, synthetic), drawn by --seed.")
@threads_option
@device_option
def fidelity_cmd(real_dir, synthetic_dir, out, model_dir, seed, max_tiles, threads, device):
    """How far is a synthetic set from the real one: phase fractions and object sizes, intensities per class,
    high-frequency power, two-point correlation, KID, memorisation (and with --model the pre-test)."""
    from dualsynth.config import apply_threads
    from dualsynth.fidelity import fidelity, fidelity_headline

    apply_threads(threads)
    report = fidelity(real_dir, synthetic_dir, out, model_dir, seed=seed, max_tiles=max_tiles, device=device)
    click.echo(fidelity_headline(report))
    click.echo(f"wrote fidelity.json, fidelity.md and fidelity.png to {out}")
# --- end fidelity ---

# --- demo ---
@cli.command(context_settings=CONTEXT)
@click.option("--out", default="demo-out", show_default=True, type=click.Path(), help="Folder for everything the demo writes.")
@click.option("--config", "config_file", type=click.Path(), help="YAML with demo settings (n, size, tile, vqvae_steps, prior_arch, prior_steps, synthetic, percentages, synthetic_only, seg_epochs, seed).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one demo setting, e.g. --set seg_epochs=4 (repeatable).")
@threads_option
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@device_option
def demo(out, config_file, overrides, threads, no_progress, device):
    """The whole pipeline on procedural data with quick settings: demo-data -> prepare -> train-vqvae ->
    train-prior -> sample -> study -> report.md. Re-running continues where it stopped."""
    from dualsynth.config import load_config, parse_overrides
    from dualsynth.demo import DemoConfig, run_demo

    extra = parse_overrides(list(overrides))
    extra["device"] = device
    extra["threads"] = threads
    config = load_config(DemoConfig, {}, None, config_file, extra)
    state = run_demo(Path(out), config, progress=not no_progress, log=click.echo)
    click.echo(f"demo finished in {state['total_seconds'] / 60:.1f} min (stages: "
               + ", ".join(f"{k} {v:.0f} s" for k, v in state["seconds"].items()) + ")")
    click.echo(f"report: {state['report']}")
# --- end demo ---


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    try:
        rv = cli.main(args=argv, prog_name="dualsynth", standalone_mode=False)
    except InputError as exc:
        click.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(2)
    except click.exceptions.NoSuchOption as exc:
        # e.g. a misspelled option: say which, and what was meant when click can tell
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        click.echo(f"error: {' '.join(message.split())}", err=True)
        sys.exit(2)
    except click.exceptions.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "dualsynth"
        click.echo(f"error: {cmd}: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("error: interrupted (checkpoints written so far are intact; continue with --resume)", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
