"""PatchGAN discriminator and the adversarial losses of VQGAN (Esser et al. 2021), for a sharper VQ-VAE decoder.

The discriminator is pix2pix's PatchGAN (Isola et al. 2017), the one VQGAN uses: 4x4 convolutions, `layers`
of them with stride 2 (channels doubling from `channels`, at most 8x), then one with stride 1 and a 1-channel
4x4 output, so each output logit judges one overlapping patch of the input (70 px receptive field for 3
layers). Where VQGAN puts batch norm after each inner convolution, this one has spectral normalisation on every
convolution and no norm layer: with batches of 8 small crops on a CPU, batch statistics are noisy and differ
between the real and the reconstructed batch (each goes through separately), and spectral norm keeps the
critic Lipschitz without them.

Losses (VQGAN's): the discriminator's hinge loss 0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake))); the
generator's -mean D(fake); and the adaptive weight ||grad_last(reconstruction)|| / (||grad_last(adversarial)||
+ 1e-4), the gradient norms at the decoder's last layer, clipped to [0, 1e4] and detached, which scales the
adversarial term to the size of the reconstruction term whatever their units.

Public surface: `DiscriminatorConfig`, `PatchDiscriminator`, `hinge_d_loss`, `generator_loss`,
`adaptive_weight`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from dualsynth.config import StrictModel

MAX_ADAPTIVE_WEIGHT = 1e4


class DiscriminatorConfig(StrictModel):
    """The adversary of the VQ-VAE decoder (train-vqvae's `discriminator:` block)."""

    channels: int = Field(32, ge=1, description="channels of the first convolution, doubling per layer (at most 8x)")
    layers: int = Field(3, ge=1, le=6, description="stride-2 convolutions (3: 70 px receptive field, as pix2pix)")
    lr: float | None = Field(None, gt=0, description="Adam learning rate of the discriminator (None: the VQ-VAE's lr)")
    sees: Literal["image", "joint"] = Field(
        "image", description="image: the micrograph channels only; joint: the micrograph and the mask channels"
    )


def output_side(side: int, layers: int) -> int:
    """Side of the patch-logit map for an input of `side` px (stride-2 4x4 convolutions with padding 1 halve
    the side, each of the two stride-1 4x4 convolutions takes one off)."""
    for _ in range(layers):
        side = (side + 2 - 4) // 2 + 1
    return side - 2


class PatchDiscriminator(nn.Module):
    """PatchGAN: (B, in_channels, H, W) -> patch logits (B, 1, h, w); see the module docstring."""

    def __init__(self, in_channels: int, channels: int = 32, layers: int = 3):
        super().__init__()
        widths = [in_channels] + [channels * min(2**k, 8) for k in range(layers + 1)]
        blocks: list[nn.Module] = []
        for k in range(layers + 1):
            stride = 2 if k < layers else 1
            blocks += [spectral_norm(nn.Conv2d(widths[k], widths[k + 1], 4, stride=stride, padding=1)),
                       nn.LeakyReLU(0.2)]
        blocks.append(spectral_norm(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1)))
        self.net = nn.Sequential(*blocks)
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # centred on 0 like the VQ-VAE's input
        return self.net(x - 0.5)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 (mean relu(1 - real) + mean relu(1 + fake)); 0 once real logits are >= 1
    and fake ones <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss: -mean D(fake) (VQGAN's hinge generator loss)."""
    return -logits_fake.float().mean()


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d reconstruction / d last_layer|| / (||d adversarial / d last_layer|| + 1e-4), clipped to [0, 1e4] and
    detached (VQGAN's balance of the two terms). Both losses keep their graphs for the backward pass."""
    g_rec = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    weight = g_rec.float().norm() / (g_adv.float().norm() + 1e-4)
    return weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()
