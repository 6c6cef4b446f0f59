"""The PatchGAN adversary of the VQ-VAE decoder: shapes, locality, hinge losses and VQGAN's adaptive weight."""

from __future__ import annotations

import pytest
import torch

from dualsynth.models.discriminator import (
    MAX_ADAPTIVE_WEIGHT,
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    output_side,
)


@pytest.mark.parametrize("side,layers", [(64, 3), (32, 2), (16, 1), (70, 3)])
def test_output_side_predicts_the_patch_map(side, layers):
    torch.manual_seed(0)
    disc = PatchDiscriminator(2, channels=4, layers=layers)
    out = disc(torch.rand(3, 2, side, side))
    assert out.shape == (3, 1, output_side(side, layers), output_side(side, layers))
    assert output_side(16, 3) < 1  # a 16 px tile leaves nothing after 3 halvings: train-vqvae refuses it


def test_each_logit_judges_a_patch_not_the_whole_tile():
    torch.manual_seed(0)
    disc = PatchDiscriminator(1, channels=4, layers=1).eval()
    x = torch.rand(1, 1, 32, 32)
    y = x.clone()
    y[..., 28:, 28:] = 1 - y[..., 28:, 28:]   # change the bottom-right corner only
    a, b = disc(x), disc(y)
    assert not torch.equal(a, b)
    # a 1-layer PatchGAN sees 4 + 3*2 + 3*2 = 16 px: the top-left logits cannot see the corner
    assert torch.equal(a[..., :4, :4], b[..., :4, :4])


def test_hinge_and_generator_loss_known_answers():
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    # real at 0.5 costs 0.5, fake at 0 costs 1: (0.5 + 1) / 2
    assert hinge_d_loss(torch.full((4,), 0.5), torch.zeros(4)).item() == pytest.approx(0.75)
    assert generator_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_clipped_and_detached():
    w = torch.ones(2, 2, requires_grad=True)
    rec = 3 * (w**2).sum() / 2          # gradient 3w: norm 6
    adv = w.sum()                       # gradient 1: norm 2
    weight = adaptive_weight(rec, adv, w)
    assert weight.item() == pytest.approx(6 / (2 + 1e-4)) and not weight.requires_grad
    # both graphs survive for the backward pass that follows
    (rec + weight * adv).backward()
    assert torch.allclose(w.grad, torch.full((2, 2), 3.0 + weight.item()))
    # an adversarial loss that does not move the last layer gets the cap, not infinity
    w2 = torch.ones(3, requires_grad=True)
    assert adaptive_weight((w2**2).sum(), 0 * w2.sum(), w2).item() == MAX_ADAPTIVE_WEIGHT
