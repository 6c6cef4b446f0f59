"""Prior training step: three forms of the gated PixelCNN's gate, interleaved in one process.

    .venv/bin/python benchmarks/bench_prior_gate.py [--threads 2] [--rounds 5] [--steps 30] [--preset quick]

All three compute tanh(a) * sigmoid(b) of the gate input [a, b], with tanh(a) = 2 sigmoid(2a) - 1:
"halves": a sigmoid on each channel half, the factor 2 applied to the activations (as before 2527b8f);
"scaled": one sigmoid over the whole channels-last tensor after multiplying it by (2, .., 2, 1, .., 1)
(2527b8f); "folded": the factor 2 folded into the convolution weights that produce the gate input, so one
sigmoid and no multiply (what `models.prior` does now). Each round times `--steps` bf16 training steps
(batch 16, 32x32 crops, K=10, random weights) of each form, in process CPU time (steadier than wall time on a
shared machine), and prints the per-round ratios to "halves". The forms give the same values
(tests/test_prior_model.py checks the folded one against a reference written with tanh).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dualsynth.models.prior as prior_module
from dualsynth.config import autocast, resolve_device
from dualsynth.engine import adam
from dualsynth.training.prior import PRESETS, PriorTrainConfig, model_config

FOLDED_GATE, FOLDED_WEIGHTS = prior_module._gate, prior_module.GatedLayer.gate_weights


def plain_weights(layer: prior_module.GatedLayer) -> prior_module._Weights:
    """The convolutions as they are: the gate inputs come out with their tanh half not doubled."""
    return prior_module._Weights(*((c.weight, c.bias) for c in (layer.vertical, layer.horizontal,
                                                               layer.vertical_to_horizontal)))


def halves(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return (2 * torch.sigmoid(2 * a) - 1) * torch.sigmoid(b)


def scaled(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[1] // 2
    scale = x.new_ones(1, 2 * half, 1, 1)
    scale[:, :half] = 2
    a, b = torch.sigmoid(x * scale).chunk(2, dim=1)
    return ((2 * a - 1) * b).contiguous(memory_format=torch.channels_last)


FORMS = {"halves": (halves, plain_weights), "scaled": (scaled, plain_weights), "folded": (FOLDED_GATE, FOLDED_WEIGHTS)}


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
    torch.manual_seed(0)
    model = prior_module.build_prior(model_config(cfg, 10, 3))
    opt = adam(model.parameters(), 1e-3)  # fused, as the engine trains
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
    ms: dict[str, list[float]] = {name: [] for name in FORMS}
    for _ in range(args.rounds):
        for name, (gate, weights) in FORMS.items():
            prior_module._gate, prior_module.GatedLayer.gate_weights = gate, weights
            t0 = time.process_time()
            for _ in range(args.steps):
                step()
            ms[name].append(1000 * (time.process_time() - t0) / args.steps)
    prior_module._gate, prior_module.GatedLayer.gate_weights = FOLDED_GATE, FOLDED_WEIGHTS
    print(f"torch threads {args.threads}, preset {args.preset} gated prior, bf16, batch 16 of 32x32, CPU ms per step")
    for name, values in ms.items():
        print(f"{name:7s} " + " ".join(f"{v:6.1f}" for v in values) + f"   median {statistics.median(values):6.1f}")
    for name in ("scaled", "folded"):
        ratios = [x / h for x, h in zip(ms[name], ms["halves"])]
        print(f"{name} / halves per round: " + " ".join(f"{r:.2f}" for r in ratios)
              + f"   median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
