"""Sampling z-matrices from a trained prior: the naive and the fast autoregressive sampler.

Both samplers fill the grid in raster order and draw code (i, j) from the prior's distribution at (i, j) by
inverse CDF against one pre-drawn uniform number per position (`draw_noise`). Because the randomness is drawn
up front, and not inside the loop, the two samplers consume exactly the same random numbers, so for the same
seed they return the same z-matrices; only the work per position differs:

- `sample_naive` runs the whole network over the whole grid for each of the H*W positions (what the paper's
  sampler in §4.2 describes): O((H*W)^2) work.
- `sample_fast` asks the prior for the logits at (i, j) only (`start_sampling` / `begin_row` / `logits_at`
  in `dualsynth.models.prior`): each layer's activation at the new position is computed once, from cached
  activations of earlier positions (for the gated PixelCNN, the vertical stack advances one row per grid row
  and the horizontal stack one position per position). O(H*W) work.

Computing one position at a time changes the order of floating-point sums, so the logits of the two samplers can differ in the last bits;
a sample differs only if a uniform number falls within that rounding error of a CDF step (about 1e-7 per
position in float32), which the tests check does not happen on their grids.

Writing synthetic sets from these samples (decoder, mask clean-up, dataset folder) is `dualsynth.synthetic`,
after `dualsynth.postprocess` in the pipeline.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dualsynth.io import progress_bar
from dualsynth.models.prior import GatedPixelCNN, PixelCNN


def draw_noise(n: int, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """The uniform numbers (n, H, W) in [0, 1) that decide every sampled code (drawn on the CPU, float64)."""
    h, w = shape
    return torch.rand(n, h, w, generator=generator, dtype=torch.float64)


def pick_codes(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Codes (n,) drawn from softmax(logits / temperature) (n, K) by inverse CDF against uniforms `u` (n,).

    Temperature 0 means the most likely code (argmax); below 1 sharpens, above 1 flattens the distribution.
    """
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1)
    # index of the first CDF step above u (a code of probability 0 is never drawn, even for u = 0); the
    # clamp guards against rounding leaving the last step just below u
    return (cdf <= u.to(cdf.device)[:, None]).sum(dim=-1).clamp_(max=logits.shape[-1] - 1)


def _prepare(model, n, shape, generator, cond, noise):
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (H, W) with H, W >= 1, got {tuple(shape)}")
    device = next(model.parameters()).device
    if noise is None:
        noise = draw_noise(n, shape, generator)
    if tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise must have shape {(n, *shape)}, got {tuple(noise.shape)}")
    cond = model.check_cond(None if cond is None else cond.to(device), n)
    return device, noise.to(device), cond


def _positions(shape, stop_after):
    h, w = shape
    total = h * w if stop_after is None else min(stop_after, h * w)
    return h, w, total


@torch.inference_mode()
def sample_naive(
    model: PixelCNN | GatedPixelCNN,
    n: int,
    shape: Sequence[int],
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
    *,
    noise: torch.Tensor | None = None,
    stop_after: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """`n` z-matrices of `shape` (H, W), running the whole prior on the whole grid for every position.

    The reference the fast sampler is tested against. `cond` (n, F) conditions a conditioned prior; `noise`
    replaces the uniforms drawn from `generator`; `stop_after` samples only the first positions in raster
    order (benchmarks time part of a grid and extrapolate). Returns codes (n, H, W), long, on the model's device.
    """
    was_training = model.training
    model.eval()
    device, noise, cond = _prepare(model, n, shape, generator, cond, noise)
    h, w, total = _positions(shape, stop_after)
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    try:
        for p in progress_bar(range(total), enabled=progress, desc="sampling (naive)", unit="pos", leave=False):
            i, j = divmod(p, w)
            logits = model(codes, cond)[:, :, i, j]
            codes[:, i, j] = pick_codes(logits, noise[:, i, j], temperature)
    finally:
        model.train(was_training)
    return codes


@torch.inference_mode()
def sample_fast(
    model: PixelCNN | GatedPixelCNN,
    n: int,
    shape: Sequence[int],
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
    *,
    noise: torch.Tensor | None = None,
    stop_after: int | None = None,
    progress: bool = False,
    threads: int | None = 1,
) -> torch.Tensor:
    """Same contract and, for the same seed, the same samples as `sample_naive`, with far less work.

    Each position's logits come from `model.logits_at`, which computes every layer at that position only,
    from per-layer caches; the one-hot grid is updated in place as codes are drawn. `threads`: torch CPU
    threads while sampling on the CPU (None: leave torch's setting). The work per position is too small to
    split, so 1 is fastest: 5x faster than 2 threads on a busy 2-core machine (benchmarks/bench_sampler.py).
    """
    device = next(model.parameters()).device
    if threads is not None and device.type == "cpu" and threads != torch.get_num_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return sample_fast(model, n, shape, temperature, generator, cond, noise=noise, stop_after=stop_after,
                               progress=progress, threads=None)
        finally:
            torch.set_num_threads(before)
    was_training = model.training
    model.eval()
    device, noise, cond = _prepare(model, n, shape, generator, cond, noise)
    h, w, total = _positions(shape, stop_after)
    dtype = next(model.parameters()).dtype
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    onehot = torch.zeros(n, model.config.num_codes, h, w, dtype=dtype, device=device)
    batch = torch.arange(n, device=device)
    state = model.start_sampling(onehot, cond)
    try:
        for p in progress_bar(range(total), enabled=progress, desc="sampling", unit="pos", leave=False):
            i, j = divmod(p, w)
            if j == 0:
                model.begin_row(state, i)
            logits = model.logits_at(state, i, j)
            picked = pick_codes(logits, noise[:, i, j], temperature)
            codes[:, i, j] = picked
            onehot[batch, picked, i, j] = 1
    finally:
        model.train(was_training)
    return codes
