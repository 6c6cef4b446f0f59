"""The `paper` preset of every trainer on a GPU: a few hundred steps with mixed precision, one resume, throughput.

    python benchmarks/gpu_paper_presets.py --out /tmp/gpu-check [--steps 300] [--device cuda] [--deterministic]
    python benchmarks/gpu_paper_presets.py --out /tmp/cpu-smoke --tiny --device cpu     # the same path, tiny

For each trainer (VQ-VAE Table 4, PixelCNN prior, U-Net Table 3) it trains the paper preset three times on
procedural 256 px tiles (the paper's size): straight through, straight again (the control), and stopped halfway
and resumed. It prints the precision the steps ran in (from the run's manifest), the throughput of the straight
run (tiles, z-matrices or image tiles per second), and the largest weight difference of the rerun and of the
resumed run against the straight one. On a CPU both are 0. On a GPU, atomics-based kernels can make even the
rerun differ (the VQ-VAE's EMA codebook sums did on an H100); then the resume difference means nothing, and
`--deterministic` (the trainers' `deterministic: true`) shows whether resume itself is exact. The U-Net uses
`encoder_weights: none` unless --encoder-weights is given, since nothing may be downloaded (the paper started
from ImageNet weights). At the defaults it takes about a minute on one H100.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dualsynth.config import load_config
from dualsynth.data import PrepareOptions, prepare
from dualsynth.demo_data import write_demo_dataset
from dualsynth.runs import RunFolder
from dualsynth.segmentation import PRESETS as SEG_PRESETS, SegTrainConfig, train_segmentation
from dualsynth.training import prior as prior_training, vqvae as vqvae_training


def max_weight_difference(a: Path, b: Path) -> float:
    sa, sb = RunFolder(a).load_checkpoint("last")["model"], RunFolder(b).load_checkpoint("last")["model"]
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].is_floating_point())


def timed_twice(name: str, out: Path, train, total: int) -> dict:
    """train(folder, resume, stop_after) straight, straight again (the control: do two identical runs agree?),
    then stopped at total // 2 and resumed."""
    t0 = time.perf_counter()
    train(out / f"{name}-straight", False, None)
    seconds = time.perf_counter() - t0
    train(out / f"{name}-rerun", False, None)
    train(out / f"{name}-resumed", False, max(1, total // 2))
    train(out / f"{name}-resumed", True, None)
    manifest = json.loads((out / f"{name}-straight" / "manifest.json").read_text())
    return {"stage": name, "seconds": seconds, "precision": manifest.get("precision"),
            "rerun_max_weight_difference": max_weight_difference(out / f"{name}-straight", out / f"{name}-rerun"),
            "max_weight_difference": max_weight_difference(out / f"{name}-straight", out / f"{name}-resumed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=300, help="VQ-VAE and prior updates (U-Net: 2 epochs)")
    parser.add_argument("--tiny", action="store_true", help="a few steps on 64 px tiles: a smoke test of the path")
    parser.add_argument("--encoder-weights", default="none")
    parser.add_argument("--deterministic", action="store_true", help="the trainers' `deterministic: true`")
    args = parser.parse_args()
    out = args.out
    size, tile, n = (64, 64, 6) if args.tiny else (512, 256, 12)
    steps = 4 if args.tiny else args.steps
    write_demo_dataset(out / "raw", n=n, size=size, seed=0, overwrite=True)
    data = out / "data"
    prepare(PrepareOptions(images=out / "raw" / "hq" / "images", masks=out / "raw" / "hq" / "masks",
                           classes=out / "raw" / "hq" / "classes.yaml", out=data, tile=tile, overwrite=True),
            progress=False)
    device = args.device
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))

    vq = load_config(vqvae_training.VQVAETrainConfig, vqvae_training.PRESETS, "paper",
                     overrides={"steps": steps, "log_every": max(1, steps // 4), "monitor_every": steps,
                                "checkpoint_every": steps, "deterministic": args.deterministic})
    rows = [timed_twice("vqvae", out, lambda f, r, s: vqvae_training.train_vqvae(
        data, f, vq, resume=r, device=device, stop_after=s, progress=False), steps)]
    rows[-1]["items_per_s"] = steps * vq.batch_size / rows[-1]["seconds"]

    pr = load_config(prior_training.PriorTrainConfig, prior_training.PRESETS, "paper",
                     overrides={"steps": steps, "eval_every": max(1, steps // 4), "checkpoint_every": steps,
                                "deterministic": args.deterministic})
    rows.append(timed_twice("prior", out, lambda f, r, s: prior_training.train_prior(
        out / "vqvae-straight", f, pr, resume=r, device=device, stop_after=s, progress=False), steps))
    rows[-1]["items_per_s"] = steps * pr.batch_size / rows[-1]["seconds"]

    seg = load_config(SegTrainConfig, SEG_PRESETS, "paper", overrides={"epochs": 2, "encoder_weights": args.encoder_weights,
                                                               "deterministic": args.deterministic})
    rows.append(timed_twice("unet", out, lambda f, r, s: train_segmentation(
        data, f, seg, resume=r, device=device, stop_after=s, progress=False), 2))
    train_tiles = len(json.loads((out / "unet-straight" / "manifest.json").read_text())["inputs"]["real_train_files"])
    rows[-1]["items_per_s"] = 2 * train_tiles / rows[-1]["seconds"]

    # items: joint tiles (VQ-VAE), z-matrices (prior), image tiles (U-Net)
    print(f"{'stage':<7}{'precision':>11}{'seconds':>9}{'items/s':>9}{'rerun max |dw|':>16}{'resume max |dw|':>17}"
          f"  (deterministic: {args.deterministic})")
    for r in rows:
        print(f"{r['stage']:<7}{str(r['precision']):>11}{r['seconds']:>9.1f}{r['items_per_s']:>9.1f}"
              f"{r['rerun_max_weight_difference']:>16.2e}{r['max_weight_difference']:>17.2e}")
    (out / "gpu_paper_presets.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
