"""Samplers: the fast one returns exactly the naive one's samples; draws follow the prior's distribution."""

from __future__ import annotations

import math

import pytest
import torch

from dualsynth.models.prior import GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig
from dualsynth.sampling import draw_noise, pick_codes, sample_fast, sample_naive


def make(arch, cond_dim=0, seed=0):
    torch.manual_seed(seed)
    if arch == "pixelcnn":
        return PixelCNN(PixelCNNConfig(num_codes=4, hidden=8, num_residual_blocks=2, num_output_layers=1, cond_dim=cond_dim))
    return GatedPixelCNN(GatedPixelCNNConfig(num_codes=4, hidden=6, skip=8, num_layers=3, cond_dim=cond_dim))


def sharpen(model, scale=4.0):
    """Scale the head so that samples depend strongly on the context (a random init is nearly uniform)."""
    head = model.head if isinstance(model, PixelCNN) else model.head[-1]
    with torch.no_grad():
        head.weight.mul_(scale)
    return model


@pytest.mark.parametrize("arch", ["pixelcnn", "gated"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_fast_sampler_gives_exactly_the_naive_samples(arch, temperature):
    model = sharpen(make(arch, cond_dim=3))
    cond = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    naive = sample_naive(model, 3, (8, 8), temperature, torch.Generator().manual_seed(11), cond)
    fast = sample_fast(model, 3, (8, 8), temperature, torch.Generator().manual_seed(11), cond)
    assert naive.shape == (3, 8, 8) and naive.dtype == torch.long
    assert torch.equal(naive, fast)
    if temperature > 0:
        # not a degenerate grid: the samples use several codes and differ between samples
        assert len(naive.unique()) > 1 and not torch.equal(naive[0], naive[1])


@pytest.mark.parametrize("arch", ["pixelcnn", "gated"])
def test_fast_sampler_matches_on_a_non_square_unconditioned_grid(arch):
    model = sharpen(make(arch, seed=1))
    a = sample_naive(model, 2, (5, 11), generator=torch.Generator().manual_seed(3))
    b = sample_fast(model, 2, (5, 11), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_same_seed_same_samples_other_seed_other_samples():
    model = make("gated")
    a = sample_fast(model, 2, (6, 6), generator=torch.Generator().manual_seed(5))
    b = sample_fast(model, 2, (6, 6), generator=torch.Generator().manual_seed(5))
    c = sample_fast(model, 2, (6, 6), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pick_codes_inverse_cdf_known_answers():
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3])).expand(6, 3)
    u = torch.tensor([0.0, 0.1, 0.19, 0.21, 0.69, 0.71], dtype=torch.float64)
    assert pick_codes(logits, u).tolist() == [0, 0, 0, 1, 1, 2]
    assert pick_codes(logits, u, temperature=0).tolist() == [1] * 6
    # temperature -> 0 sharpens towards the most likely code
    assert pick_codes(logits[1:], u[1:], temperature=0.01).tolist() == [1] * 5
    # a code of probability 0 is never drawn, not even by u = 0
    impossible = torch.tensor([[-math.inf, 0.0, 0.0]])
    assert pick_codes(impossible, torch.zeros(1, dtype=torch.float64)).tolist() == [1]
    with pytest.raises(ValueError):
        pick_codes(logits, u, temperature=-1)


def test_samples_follow_the_prior_distribution():
    """A prior that ignores its context (all weights zero, head bias = log p) must be sampled with p."""
    model = make("pixelcnn")
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.head.bias.copy_(p.log())
    codes = sample_fast(model, 16, (16, 16), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(codes.flatten(), minlength=4).double() / codes.numel()
    # 4096 draws: a binomial standard error of at most sqrt(0.25/4096) ~ 0.008; allow 4 of them
    assert torch.allclose(freq, p.double(), atol=4 * math.sqrt(0.25 / codes.numel()))
    # temperature 2 flattens: p^(1/2) renormalised
    codes = sample_fast(model, 16, (16, 16), temperature=2.0, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(codes.flatten(), minlength=4).double() / codes.numel()
    flat = p.double().sqrt() / p.double().sqrt().sum()
    assert torch.allclose(freq, flat, atol=4 * math.sqrt(0.25 / codes.numel()))


def test_noise_is_the_only_randomness_and_stop_after_fills_a_prefix():
    model = make("gated")
    noise = draw_noise(2, (4, 5), torch.Generator().manual_seed(9))
    full = sample_fast(model, 2, (4, 5), noise=noise)
    part = sample_naive(model, 2, (4, 5), noise=noise, stop_after=7)
    assert torch.equal(part.flatten(1)[:, :7], full.flatten(1)[:, :7])
    assert (part.flatten(1)[:, 7:] == 0).all()
    with pytest.raises(ValueError, match="noise"):
        sample_fast(model, 3, (4, 5), noise=noise)


def test_conditioning_is_checked_and_steers_samples():
    """A PixelCNN whose only path is cond[1] -> logit of code 3: uniform for (1, 0), almost all 3 for (0, 1)."""
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(num_codes=4, hidden=4, num_residual_blocks=1, num_output_layers=0, cond_dim=2))
    with pytest.raises(ValueError, match="conditioning"):
        sample_fast(model, 2, (4, 4))
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.first_cond.weight[0, 1] = 1.0
        model.head.weight[3, 0, 0, 0] = 10.0
    gen = torch.Generator().manual_seed(2)
    plain = sample_fast(model, 8, (6, 6), cond=torch.tensor([[1.0, 0.0]] * 8), generator=gen)
    rich = sample_fast(model, 8, (6, 6), cond=torch.tensor([[0.0, 1.0]] * 8), generator=gen)
    assert 0.15 < (plain == 3).float().mean() < 0.35
    assert (rich == 3).float().mean() > 0.99
