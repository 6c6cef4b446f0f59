"""Naive vs fast autoregressive sampling of z-matrices, both priors, 32x32 and 64x64 grids, in one run.

    .venv/bin/python benchmarks/bench_sampler.py [--preset paper|quick] [--n 1] [--naive-positions 128]
                                                  [--threads N] [--device cpu]

The naive sampler runs the whole network over the whole grid for every position, so its time per position is
constant: it is timed on the first `--naive-positions` positions of each grid and extrapolated to the whole
grid (`--naive-positions 0` times whole grids; slow at 64x64). The fast sampler is timed on whole grids. Both
draw from the same uniform numbers, and the table says whether the fast sampler's codes equal the naive ones
on the positions both computed. Wall-clock and process CPU seconds are both shown: on a machine shared with
other jobs the CPU-time ratio is the steadier one. Random weights (sampling cost does not depend on training).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dualsynth.config import resolve_device
from dualsynth.models.prior import build_prior, GatedPixelCNNConfig, PixelCNNConfig
from dualsynth.sampling import draw_noise, sample_fast, sample_naive
from dualsynth.training.prior import PRESETS, PriorTrainConfig

NUM_CODES = 10  # the paper's K


def timed(fn, device: torch.device) -> tuple[object, float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench(arch: str, preset: str, side: int, n: int, naive_positions: int, device: torch.device) -> dict:
    config = PriorTrainConfig(**PRESETS[preset])
    sizes = config.pixelcnn if arch == "pixelcnn" else config.gated
    cls = PixelCNNConfig if arch == "pixelcnn" else GatedPixelCNNConfig
    torch.manual_seed(0)
    model = build_prior(cls(**sizes.model_dump(), num_codes=NUM_CODES)).to(device).eval()
    shape = (side, side)
    noise = draw_noise(n, shape, torch.Generator().manual_seed(1))
    total = side * side
    prefix = total if naive_positions <= 0 else min(naive_positions, total)
    # warm-up (allocator, kernel selection) on a few positions
    sample_naive(model, n, shape, noise=noise, stop_after=2)
    sample_fast(model, n, shape, noise=noise, stop_after=2, threads=None)
    naive, naive_wall, naive_cpu = timed(lambda: sample_naive(model, n, shape, noise=noise, stop_after=prefix), device)
    fast, fast_wall, fast_cpu = timed(lambda: sample_fast(model, n, shape, noise=noise, threads=None), device)
    scale = total / prefix
    same = torch.equal(naive.flatten(1)[:, :prefix], fast.flatten(1)[:, :prefix])
    return {
        "arch": arch,
        "grid": f"{side}x{side}",
        "params": sum(p.numel() for p in model.parameters()),
        "naive_positions": prefix,
        "naive_wall": naive_wall * scale,
        "naive_cpu": naive_cpu * scale,
        "fast_wall": fast_wall,
        "fast_cpu": fast_cpu,
        "same": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="model sizes (paper: the paper preset's PixelCNN)")
    parser.add_argument("--n", type=int, default=1, help="z-matrices sampled at once")
    parser.add_argument("--naive-positions", type=int, default=128, help="positions the naive sampler is timed on (0: all)")
    parser.add_argument("--sides", default="32,64", help="grid sides, comma-separated")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, preset {args.preset} "
          f"sizes, K={NUM_CODES}, {args.n} z-matrix per run")
    header = (f"{'arch':<9} {'grid':>6} {'params':>8} {'naive s/grid':>13} {'(cpu s)':>9} {'fast s/grid':>12} "
              f"{'(cpu s)':>8} {'ratio':>7} {'(cpu)':>7}  same  naive timed on")
    print(header)
    for arch in ("pixelcnn", "gated"):
        for side in (int(s) for s in args.sides.split(",")):
            r = bench(arch, args.preset, side, args.n, args.naive_positions, device)
            extrapolated = r["naive_positions"] < side * side
            print(
                f"{r['arch']:<9} {r['grid']:>6} {r['params']:>8} {r['naive_wall']:>13.2f} {r['naive_cpu']:>9.2f} "
                f"{r['fast_wall']:>12.3f} {r['fast_cpu']:>8.3f} {r['naive_wall'] / r['fast_wall']:>6.1f}x "
                f"{r['naive_cpu'] / max(r['fast_cpu'], 1e-9):>6.1f}x  {'yes' if r['same'] else 'NO ':<4}  "
                + (f"{r['naive_positions']} positions, extrapolated" if extrapolated else "whole grid"),
                flush=True,
            )


if __name__ == "__main__":
    main()
