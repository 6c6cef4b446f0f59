"""The renderer: a mask-conditioned micrograph generator (the two-stage generator's second stage).

The paper's VQ-VAE draws micrograph and mask jointly from a handful of codes, so its micrographs carry the mean
texture of each patch and none of the noise of a real SEM image. The renderer takes a class mask (from the
prior and VQ-VAE, or a real one) and draws the micrograph with a network made for it: a pix2pix-style U-Net
over the one-hot mask (Isola et al. 2017) with StyleGAN-style per-pixel noise maps added at every decoder scale
(Karras et al. 2019), so that two draws for one mask differ in their noise and fine texture, not in their
phases. It is trained against a conditional PatchGAN discriminator (`PatchDiscriminator`, hinge loss) by
`dualsynth.training.renderer`.

With `guide: lowpass` both networks also receive a low-pass copy of the micrograph (`lowpass`: average-pooled
by `guide_pool` and upsampled back): in training the real micrograph's, at render time the micrograph to refine
(the VQ-VAE's decoded one, or a dataset's). In real SEM sets the brightness of a phase varies from image to
image, so from the mask alone it is ambiguous and an unguided renderer draws the mean; the guide carries each
tile's brightness and phase contrast, and the renderer adds the texture.

Public surface: `RendererArchitecture`, `RendererConfig`, `Renderer`, `PatchDiscriminator`, `lowpass`, and the
inference API `load_renderer(run_dir, device)` and `render(renderer, masks, seed, guides=...)` (sample i of a
call draws its noise from (seed, i) only, so a micrograph depends on its mask, guide, the seed and its index,
not on the batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dualsynth.config import StrictModel, autocast, resolve_device
from dualsynth.runs import RunFolder

RUN_KIND = "renderer"


class RendererArchitecture(StrictModel):
    """Network sizes of the generator and its discriminator; what a preset or the user chooses."""

    width: int = Field(32, ge=4, description="channels of the generator's first level; doubled per level, capped at 4x")
    depth: int = Field(3, ge=1, le=6, description="down-sampling levels of the U-Net (tiles and crops must be multiples of 2**depth)")
    noise: bool = Field(True, description="add per-pixel noise maps at every decoder scale (off: a deterministic pix2pix U-Net)")
    noise_init: float = Field(0.1, ge=0, description="initial strength of each injected noise map (learned per channel)")
    disc_width: int = Field(32, ge=4, description="channels of the discriminator's first layer; doubled per layer, capped at 4x")
    disc_layers: int = Field(3, ge=1, le=5, description="stride-2 layers of the PatchGAN discriminator (receptive field 16 px at 2, 34 at 3)")
    guide: Literal["none", "lowpass"] = Field(
        "none", description="none: the mask alone; lowpass: generator and discriminator also see a low-pass copy of "
        "the micrograph (average-pooled by guide_pool, upsampled bilinearly), so the renderer refines the texture of "
        "a coarse micrograph (the VQ-VAE's) instead of guessing each phase's brightness from the mask"
    )
    guide_pool: int = Field(4, ge=1, description="average-pooling factor of the low-pass guide (4: the VQ-VAE's downsampling)")


class RendererConfig(RendererArchitecture):
    """Everything needed to rebuild a Renderer: its architecture plus what it reads from the dataset."""

    image_channels: int = Field(1, ge=1, description="micrograph channels (1 grey, 3 RGB)")
    num_classes: int = Field(2, ge=2, description="mask classes, background included")

    @property
    def guide_channels(self) -> int:
        """Input channels the guide adds to the generator and the discriminator (0 without a guide)."""
        return self.image_channels if self.guide != "none" else 0

    @property
    def multiple(self) -> int:
        """Tile sides must be multiples of this."""
        return 2**self.depth


def lowpass(images: torch.Tensor, pool: int) -> torch.Tensor:
    """The low-pass guide of micrographs (B, C, H, W): average-pooled by `pool` (partial windows at the bottom
    and right edges average what they cover) and upsampled back to (H, W) bilinearly."""
    if pool <= 1:
        return images
    small = F.avg_pool2d(images, pool, ceil_mode=True)
    return F.interpolate(small, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, padding_mode="reflect")


class NoiseInjection(nn.Module):
    """x + s * noise, with a learned strength s per channel and one noise map (B, 1, H, W) for all channels."""

    def __init__(self, channels: int, init: float):
        super().__init__()
        self.strength = nn.Parameter(torch.full((1, channels, 1, 1), float(init)))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return x if noise is None else x + self.strength * noise.to(x.dtype)


class Renderer(nn.Module):
    """U-Net from a one-hot mask (B, C, H, W) and noise maps to a micrograph (B, C_img, H, W), about [0, 1].

    Encoder: per level two 3x3 convolutions, then a stride-2 convolution. Decoder: nearest up-sampling, a 3x3
    convolution, the encoder's skip concatenated, two 3x3 convolutions with the level's noise map injected
    between them. The input also receives a noise channel. Leaky ReLU 0.2, no normalisation (an instance norm
    would erase a tile of one class), a linear output (a sigmoid or tanh that saturates stops the L1 gradient: one
    seed of a test trained into all-black tiles that way); `render` clips it to [0, 1].
    """

    def __init__(self, config: RendererConfig):
        super().__init__()
        self.config = c = config
        widths = [min(c.width * 2**i, 4 * c.width) for i in range(c.depth + 1)]
        self.widths = widths
        self.stem = _conv(c.num_classes + c.guide_channels + (1 if c.noise else 0), widths[0])
        self.enc = nn.ModuleList(nn.Sequential(_conv(widths[i], widths[i]), nn.LeakyReLU(0.2),
                                               _conv(widths[i], widths[i]), nn.LeakyReLU(0.2))
                                 for i in range(c.depth))
        self.down = nn.ModuleList(_conv(widths[i], widths[i + 1], 4, 2) for i in range(c.depth))
        self.bottom = nn.Sequential(_conv(widths[-1], widths[-1]), nn.LeakyReLU(0.2))
        self.up = nn.ModuleList(_conv(widths[i + 1], widths[i]) for i in range(c.depth))
        self.dec_a = nn.ModuleList(_conv(2 * widths[i], widths[i]) for i in range(c.depth))
        self.dec_b = nn.ModuleList(_conv(widths[i], widths[i]) for i in range(c.depth))
        self.noise_in = nn.ModuleList(NoiseInjection(widths[i], c.noise_init) for i in range(c.depth + 1))
        self.head = nn.Conv2d(widths[0], c.image_channels, 1)
        nn.init.constant_(self.head.bias, 0.5)  # start at mid grey

    def noise_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Shapes of the noise maps for a (height, width) tile: the input's, then one per decoder level, finest first."""
        if not self.config.noise:
            return []
        return [(batch, 1, height >> k, width >> k) for k in range(self.config.depth + 1)]

    def draw_noise(self, batch: int, height: int, width: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Standard normal noise maps (on the CPU, from `generator` or torch's global one)."""
        return [torch.randn(s, generator=generator) for s in self.noise_shapes(batch, height, width)]

    def forward(self, onehot: torch.Tensor, noise: Sequence[torch.Tensor] | None = None,
                guide: torch.Tensor | None = None) -> torch.Tensor:
        """`guide`: the low-pass micrographs (B, C_img, H, W) (`lowpass`), required with `guide: lowpass`."""
        c = self.config
        b, _, h, w = onehot.shape
        if h % c.multiple or w % c.multiple:
            raise ValueError(f"tile {h}x{w} is not a multiple of {c.multiple} (2**depth)")
        onehot = _with_guide(onehot, guide, c)
        if c.noise and noise is None:
            noise = self.draw_noise(b, h, w)
        noise = [n.to(onehot.device) for n in noise] if c.noise else [None] * (c.depth + 1)
        x = onehot if not c.noise else torch.cat([onehot, noise[0].to(onehot.dtype)], dim=1)
        x = F.leaky_relu(self.stem(x), 0.2)
        skips = []
        for enc, down in zip(self.enc, self.down):
            x = enc(x)
            skips.append(x)
            x = F.leaky_relu(down(x), 0.2)
        x = self.noise_in[-1](self.bottom(x), noise[-1])
        for i in reversed(range(c.depth)):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = F.leaky_relu(self.up[i](x), 0.2)
            x = F.leaky_relu(self.dec_a[i](torch.cat([x, skips[i]], dim=1)), 0.2)
            x = self.noise_in[i](x, noise[i])
            x = F.leaky_relu(self.dec_b[i](x), 0.2)
        return self.head(x)

    def checkpoint(self) -> dict:
        """A dict that `from_checkpoint` turns back into this model (config + weights)."""
        return {"config": self.config.model_dump(), "model": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "Renderer":
        model = cls(RendererConfig.model_validate(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        return model


def _with_guide(onehot: torch.Tensor, guide: torch.Tensor | None, c: RendererConfig) -> torch.Tensor:
    """The conditioning input: the one-hot mask, then the guide's channels when the config has a guide."""
    if not c.guide_channels:
        if guide is not None:
            raise ValueError("this renderer has no guide (guide: none), but a guide was given")
        return onehot
    expected = (onehot.shape[0], c.guide_channels, *onehot.shape[-2:])
    if guide is None or tuple(guide.shape) != expected:
        got = "none" if guide is None else tuple(guide.shape)
        raise ValueError(f"renderer with guide: {c.guide} needs a guide of shape {expected}, got {got}")
    return torch.cat([onehot, guide.to(device=onehot.device, dtype=onehot.dtype)], dim=1)


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN (pix2pix): micrograph and one-hot mask in, a map of real/fake scores out.

    `disc_layers` stride-2 4x4 convolutions, one stride-1 4x4 convolution and a 3x3 convolution to one channel,
    spectral normalisation on every layer (the usual companion of the hinge loss, as in SPADE). `forward`
    returns (scores, features of every hidden layer) so that the trainer can add a feature-matching loss.
    """

    def __init__(self, config: RendererConfig):
        super().__init__()
        c = config
        sn = nn.utils.parametrizations.spectral_norm
        widths = [min(c.disc_width * 2**i, 4 * c.disc_width) for i in range(c.disc_layers + 1)]
        self.config = c
        cin = c.image_channels + c.num_classes + c.guide_channels
        layers = []
        for i in range(c.disc_layers):
            layers.append(sn(nn.Conv2d(cin, widths[i], 4, 2, 1)))
            cin = widths[i]
        layers.append(sn(nn.Conv2d(cin, widths[-1], 3, 1, 1)))
        self.layers = nn.ModuleList(layers)
        self.out = sn(nn.Conv2d(widths[-1], 1, 3, 1, 1))

    def forward(self, image: torch.Tensor, onehot: torch.Tensor,
                guide: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = torch.cat([image, _with_guide(onehot, guide, self.config).to(image.dtype)], dim=1)
        features = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2)
            features.append(x)
        return self.out(x), features


def onehot_masks(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class masks (B, H, W) -> float one-hot (B, C, H, W)."""
    return F.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2).float()


# --- inference ----------------------------------------------------------------------------------------------


def load_renderer(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str = "best") -> Renderer:
    """The trained renderer of a run folder (its `best` checkpoint, else `last`), in eval mode on `device`."""
    run = RunFolder.open(run_dir, kind=RUN_KIND)
    device = resolve_device(device) if isinstance(device, str) else device
    model = Renderer.from_checkpoint(run.load_trained(checkpoint, map_location=device))
    return model.to(device).eval()


def noise_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of the noise of micrograph `index` drawn with `seed` (a function of both only)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def render(renderer: Renderer, masks: np.ndarray | torch.Tensor | Sequence[np.ndarray], seed: int = 0,
           indices: Sequence[int] | None = None, guides: np.ndarray | Sequence[np.ndarray] | None = None,
           batch_size: int = 16) -> list[np.ndarray]:
    """Micrographs for class masks: [(H, W, C_img) float32 in [0, 1]], one per mask.

    `masks`: one (H, W) mask, a stack (N, H, W) or a list of masks (sizes may differ; each side must be a
    multiple of 2**depth). Mask n draws its noise from (seed, indices[n]) only (default index n), so the same
    mask, seed and index give the same micrograph whatever the batch. Masks with values outside
    0..num_classes-1 raise ValueError.
    `guides` (required by a renderer with a guide, refused by one without): the micrographs to refine, one per
    mask, (H, W) or (H, W, C_img) in [0, 1] (a single one with a single mask); they are low-passed here
    (`lowpass` by `guide_pool`), as in training.
    """
    c = renderer.config
    single = isinstance(masks, (np.ndarray, torch.Tensor)) and np.ndim(masks) == 2
    if single:
        masks = [masks]
    masks = [torch.as_tensor(np.asarray(m)).long() for m in masks]
    guide_list = _guide_tensors(c, masks, guides, single)
    indices = list(range(len(masks))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(indices)} indices")
    for m in masks:
        if m.numel() and (int(m.min()) < 0 or int(m.max()) >= c.num_classes):
            raise ValueError(f"mask values must lie in 0..{c.num_classes - 1} (the renderer has {c.num_classes} classes)")
    device = next(renderer.parameters()).device
    out: list[np.ndarray | None] = [None] * len(masks)
    # same-size masks go through together; noise is drawn per mask, so grouping does not change the result
    by_shape: dict[tuple, list[int]] = {}
    for n, m in enumerate(masks):
        by_shape.setdefault(tuple(m.shape), []).append(n)
    was_training = renderer.training
    renderer.eval()
    try:
        with torch.no_grad(), autocast(device):
            for (h, w), members in by_shape.items():
                for start in range(0, len(members), batch_size):
                    chunk = members[start : start + batch_size]
                    noises = [renderer.draw_noise(1, h, w, noise_generator(seed, indices[n])) for n in chunk]
                    noise = [torch.cat(level) for level in zip(*noises)]
                    onehot = onehot_masks(torch.stack([masks[n] for n in chunk]), c.num_classes).to(device)
                    guide = None
                    if guide_list is not None:
                        guide = lowpass(torch.stack([guide_list[n] for n in chunk]).to(device), c.guide_pool)
                    images = renderer(onehot, noise, guide).float().clamp(0, 1).cpu().numpy()
                    for n, image in zip(chunk, images):
                        out[n] = np.moveaxis(image, 0, -1)
    finally:
        renderer.train(was_training)
    return out  # type: ignore[return-value]


def _guide_tensors(c: RendererConfig, masks: list[torch.Tensor], guides, single: bool) -> list[torch.Tensor] | None:
    """`render`'s guides as float (C_img, H, W) tensors, checked against the config and the masks."""
    if not c.guide_channels:
        if guides is not None:
            raise ValueError("this renderer was trained without a guide (guide: none); do not pass guides")
        return None
    if guides is None:
        raise ValueError(f"this renderer was trained with guide: {c.guide}; pass guides (the micrographs to refine)")
    if isinstance(guides, (np.ndarray, torch.Tensor)) and (np.ndim(guides) == 2 or (single and np.ndim(guides) == 3)):
        guides = [guides]
    guides = [np.asarray(g, dtype=np.float32) for g in guides]
    if len(guides) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(guides)} guides")
    out = []
    for g, m in zip(guides, masks):
        g = g[..., None] if g.ndim == 2 else g
        if g.shape != (*m.shape, c.image_channels):
            raise ValueError(f"guide of shape {g.shape} does not fit a {tuple(m.shape)} mask and "
                             f"{c.image_channels} image channel(s)")
        out.append(torch.from_numpy(np.moveaxis(g, -1, 0).copy()))
    return out
