"""Prior training step: the gated PixelCNN's gate in its two forms, interleaved in one process.

    .venv/bin/python benchmarks/bench_prior_gate.py [--threads 2] [--rounds 5] [--steps 30] [--preset quick]

"halves": tanh(a) * sigmoid(b) computed on the two channel halves of the gate input (as sampling does);
"whole": one sigmoid over the whole channels-last tensor (what `models.prior._gate` does in training). Each
round times `--steps` bf16 training steps (batch 16, 32x32 crops, K=10, random weights) of each form, in
process CPU time (steadier than wall time on a shared machine), and prints the per-round ratio whole / halves.
The two forms are the same function (tests/test_prior_model.py checks values and gradients).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dualsynth.models.prior as prior_module
from dualsynth.config import autocast, resolve_device
from dualsynth.training.prior import PRESETS, PriorTrainConfig, model_config


def halves(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return (2 * torch.sigmoid(2 * a) - 1) * torch.sigmoid(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device("cpu")
    cfg = PriorTrainConfig.model_validate({**PRESETS[args.preset], "arch": "gated"})
    forms = {"halves": halves, "whole": prior_module._gate}
    torch.manual_seed(0)
    model = prior_module.build_prior(model_config(cfg, 10, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    z = torch.randint(0, 10, (16, 32, 32))

    def step() -> float:
        with autocast(device, "bf16", training=True):
            logits = model(z, None)
        loss = torch.nn.functional.cross_entropy(logits.float(), z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(3):
        step()
    ms: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, gate in forms.items():
            prior_module._gate = gate
            t0 = time.process_time()
            for _ in range(args.steps):
                step()
            ms[name].append(1000 * (time.process_time() - t0) / args.steps)
    prior_module._gate = forms["whole"]
    print(f"torch threads {args.threads}, preset {args.preset} gated prior, bf16, batch 16 of 32x32, CPU ms per step")
    for name, values in ms.items():
        print(f"{name:7s} " + " ".join(f"{v:6.1f}" for v in values) + f"   median {statistics.median(values):6.1f}")
    ratios = [w / h for w, h in zip(ms["whole"], ms["halves"])]
    print("whole / halves per round: " + " ".join(f"{r:.2f}" for r in ratios) + f"   median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
