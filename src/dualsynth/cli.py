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


@click.group(cls=OrderedGroup, context_settings=CONTEXT)
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
    click.echo("  tiles per split: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["tiles_per_split"].items())))
    if summary.get("dropped_tiles"):
        click.echo(f"  dropped {summary['dropped_tiles']} tiles with fewer classes than --min-classes")
    click.echo("  class fractions: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["class_fractions"].items()))


@cli.command(context_settings=CONTEXT)
@click.option("--images", required=True, type=click.Path(), help="Folder of micrographs (and masks named <stem>_mask.<ext> if --masks is not given).")
@click.option("--masks", type=click.Path(), help="Folder of masks, paired with the images by file stem (a _mask suffix is allowed).")
@click.option("--out", required=True, type=click.Path(), help="Dataset folder to write.")
@click.option("--classes", "classes_file", type=click.Path(), help="classes.yaml: class names, their colours in colour masks, optional 'default: true' class.")
@click.option("--num-classes", type=int, help="Number of classes of index masks without classes.yaml (default: largest index + 1).")
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
# --- end data ---

# --- metrics ---
# --- end metrics ---

# --- vqvae ---
# --- end vqvae ---

# --- prior ---
# --- end prior ---

# --- segmentation ---
# --- end segmentation ---

# --- demo ---
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
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted (checkpoints written so far are intact; use --resume)", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
