"""VQ-VAE training throughput (tiles/s) of the quick and paper presets' model sizes on this machine.

    .venv/bin/python benchmarks/bench_vqvae.py [--steps-quick 20] [--steps-paper 4] [--threads N] [--device cpu]

Each size trains on random joint images (grey micrograph + one `levels` mask channel) at its preset's tile
size and batch; one warm-up step is not timed. Prints tiles/s, seconds per step and the ratio to the quick
size measured in the same run (ratios survive a busy machine better than absolute numbers).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dualsynth.config import amp_dtype, apply_threads, autocast, resolve_device
from dualsynth.models.vqvae import VQVAE, VQVAEConfig, reconstruction_losses
from dualsynth.training.vqvae import PRESETS, VQVAETrainConfig


def throughput(preset: str, steps: int, device: torch.device, tile: int | None = None) -> dict:
    config = VQVAETrainConfig(**PRESETS[preset])
    side = tile or config.tile or 256
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**config.model.model_dump(), image_channels=1, num_classes=4)).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    x = torch.rand(config.batch_size, model.config.in_channels, side, side, device=device)

    def step() -> None:
        with autocast(device, "auto", training=True):  # as the engine runs training steps
            out = model(x)
        image_mse, mask_mse = reconstruction_losses(x, out.recon, 1)
        loss = image_mse + mask_mse + out.vq_loss.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: k-means init, allocator, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return {
        "preset": preset,
        "tile": side,
        "batch": config.batch_size,
        "params": sum(p.numel() for p in model.parameters()),
        "s_per_step": seconds,
        "tiles_per_s": config.batch_size / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-quick", type=int, default=20)
    parser.add_argument("--steps-paper", type=int, default=4)
    parser.add_argument("--threads", default="auto", help="torch CPU threads: auto (the policy of every command) or N")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args()
    apply_threads(args.threads)
    device = resolve_device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    precision = amp_dtype(device, "auto", training=True)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}, "
          f"training precision {precision or 'float32'}")
    rows = [throughput("quick", args.steps_quick, device), throughput("paper", args.steps_paper, device)]
    base = rows[0]["tiles_per_s"]
    print(f"{'size':<8}{'tile':>6}{'batch':>7}{'params':>10}{'s/step':>9}{'tiles/s':>9}{'vs quick':>10}")
    for r in rows:
        print(
            f"{r['preset']:<8}{r['tile']:>6}{r['batch']:>7}{r['params']:>10,}{r['s_per_step']:>9.3f}"
            f"{r['tiles_per_s']:>9.2f}{r['tiles_per_s'] / base:>10.3f}"
        )


if __name__ == "__main__":
    main()
