"""Threads, workers and precision for the quick models on this machine: what `--threads auto` should choose.

    .venv/bin/python benchmarks/bench_threads.py [--steps 15]

For the quick sizes of the three trained models (VQ-VAE: 8 tiles of 64 px; gated prior: 16 z-matrices of
32x32; U-Net: 8 crops of 96 px) it times training steps with 1 thread and with every usable core, in fp32 and
in bf16 mixed precision (where the CPU has bf16 in hardware), and prints steps/s with the ratio to 1 thread
fp32 measured in the same run. Then the study's question: two U-Net trainings one after the other with every
core, or side by side in two processes with one thread each. It prints what the policy
(`dualsynth.config.auto_threads`) chooses here and how busy the cores were when it started.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import torch

from dualsynth.config import auto_threads, busy_cores, cpu_has_native_bf16, usable_cores


def _models():
    from dualsynth.models.prior import GatedPixelCNN, GatedPixelCNNConfig
    from dualsynth.models.vqvae import VQVAE, VQVAEConfig
    from dualsynth.segmentation.model import UNet, UNetConfig

    x_vq = torch.rand(8, 4, 64, 64)
    z = torch.randint(0, 10, (16, 32, 32))
    x_seg, y_seg = torch.rand(8, 3, 96, 96), torch.randint(0, 4, (8, 96, 96))
    classes = [{"name": str(i), "color": [i, i, i]} for i in range(4)]
    return {
        "vqvae": (lambda: VQVAE(VQVAEConfig(hidden=64, embedding_dim=64, num_embeddings=10, image_channels=3,
                                            num_classes=4)), x_vq,
                  lambda m, out: ((out.recon.float() - x_vq) ** 2).mean() + out.vq_loss.float()),
        "prior": (lambda: GatedPixelCNN(GatedPixelCNNConfig(hidden=32, num_layers=8, skip=64, num_codes=10)), z,
                  lambda m, out: torch.nn.functional.cross_entropy(out.float(), z)),
        "unet": (lambda: UNet(UNetConfig("resnet18", 4, [64, 32, 16, 8], 3, classes, "per_image")), x_seg,
                 lambda m, out: torch.nn.functional.cross_entropy(out.float(), y_seg)),
    }


def steps_per_second(name: str, threads: int, bf16: bool, steps: int) -> float:
    torch.set_num_threads(threads)
    make, x, loss_fn = _models()[name]
    torch.manual_seed(0)
    model = make().train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = loss_fn(model, out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0)


def _unet_job(args: tuple) -> float:
    threads, bf16, steps = args
    return steps_per_second("unet", threads, bf16, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    cores = usable_cores()
    busy = busy_cores(interval=1.0)
    bf16_options = [False, True] if cpu_has_native_bf16() else [False]
    print(f"torch {torch.__version__}, {cores} usable cores, {busy:.2f} busy at start, native bf16: "
          f"{cpu_has_native_bf16()}; --threads auto chooses {auto_threads(busy=busy)} thread(s), "
          f"{auto_threads(2, busy=busy)} per worker for 2 workers")
    print(f"{'model':<7}{'threads':>8}{'precision':>10}{'steps/s':>9}{'vs 1 thread fp32':>18}")
    thread_options = sorted({1, cores})
    for name in ("vqvae", "prior", "unet"):
        base = None
        for bf16 in bf16_options:
            for threads in thread_options:
                rate = steps_per_second(name, threads, bf16, args.steps)
                base = base or rate
                print(f"{name:<7}{threads:>8}{'bf16' if bf16 else 'fp32':>10}{rate:>9.2f}{rate / base:>18.2f}")
    if cores >= 2:
        bf16 = bf16_options[-1]
        t0 = time.perf_counter()
        for _ in range(2):
            steps_per_second("unet", cores, bf16, args.steps)
        sequential = time.perf_counter() - t0
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            pool.map(_unet_job, [(1, bf16, 1)] * 2)  # start-up (imports) is not what we time
            t0 = time.perf_counter()
            pool.map(_unet_job, [(max(1, cores // 2), bf16, args.steps)] * 2)
            side_by_side = time.perf_counter() - t0
        print(f"two U-Net trainings ({'bf16' if bf16 else 'fp32'}): one after the other with {cores} threads "
              f"{sequential:.1f} s; side by side, {max(1, cores // 2)} thread(s) each, {side_by_side:.1f} s "
              f"({sequential / side_by_side:.2f}x)")


if __name__ == "__main__":
    main()
