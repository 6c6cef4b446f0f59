"""VQ-VAE on joint micrograph+mask images (the paper's section 4.1).

The encoder and decoder follow DeepMind Sonnet's VQ-VAE example, which the paper adapted: the input is the
joint image (micrograph channels followed by mask channels, see `dualsynth.data.join`) and the decoder returns
an image of the same shape. The vector quantizer is written here rather than taken from a library so that each
of its parts (straight-through estimator, EMA codebook, k-means initialisation, dead-code restart) is a few
lines that the tests check one by one.

Public surface: `VQVAEConfig`, `VQVAE`, `VQVAEOutput`, `VectorQuantizer`, `kmeans`, the training losses
`reconstruction_losses` (MSE or L1 on the micrograph, MSE or cross-entropy on the mask) and
`focal_frequency_loss`, and the inference API: `load_vqvae(run_dir, device)`, `encode(model, joint)`, `decode(model, codes)`,
`reconstruct(model, joint)` (batched, eval mode, mixed precision on CUDA; results on the CPU). The joint output
splits into micrograph and mask with `dualsynth.data.split_joint` / `joint_to_pairs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dualsynth.config import StrictModel, autocast, resolve_device
from dualsynth.runs import RunFolder

MaskEncoding = Literal["levels", "onehot"]


class VQVAEArchitecture(StrictModel):
    """Network and quantizer sizes; the part of the config that a preset or the user chooses."""

    hidden: int = Field(128, ge=2, description="channels of the encoder/decoder trunk (Sonnet: 128)")
    res_hidden: int = Field(32, ge=1, description="channels inside each residual block (Sonnet: 32)")
    res_layers: int = Field(2, ge=0, description="residual blocks in encoder and decoder (Sonnet: 2)")
    embedding_dim: int = Field(64, ge=1, description="D, length of each codebook vector (paper: 64)")
    num_embeddings: int = Field(10, ge=2, description="K, number of codebook vectors (paper: 10)")
    downsample: Literal[4, 8] = Field(4, description="tile side / z-matrix side (paper: 4, 256 px -> 64x64)")
    commitment_cost: float = Field(0.25, ge=0, description="beta, weight of the commitment loss")
    ema: bool = Field(True, description="update the codebook by exponential moving averages, not by gradients")
    decay: float = Field(0.99, gt=0, lt=1, description="EMA decay of cluster sizes and sums")
    epsilon: float = Field(1e-5, gt=0, description="Laplace smoothing of the EMA cluster sizes")
    kmeans_init: bool = Field(True, description="initialise the codebook by k-means on the first batch")
    kmeans_iters: int = Field(10, ge=0, description="Lloyd iterations of that k-means")
    dead_code_steps: int = Field(
        100, ge=0, description="re-seed a code unused for this many training steps (0: never)"
    )


class VQVAEConfig(VQVAEArchitecture):
    """Everything needed to rebuild a VQVAE: its architecture plus what it reads from the dataset."""

    image_channels: int = Field(1, ge=1, description="micrograph channels (1 grey, 3 RGB)")
    num_classes: int = Field(2, ge=2, description="mask classes, background included")
    mask_encoding: MaskEncoding = Field("levels", description="levels: 1 mask channel; onehot: C channels")
    mask_logits: bool = Field(
        False, description="the onehot mask channels are class logits (trained with cross-entropy); decode returns "
        "their softmax, so every consumer sees class probabilities in [0, 1]"
    )

    @property
    def mask_channels(self) -> int:
        return 1 if self.mask_encoding == "levels" else self.num_classes

    @property
    def in_channels(self) -> int:
        """Channels of the joint image (and of the reconstruction)."""
        return self.image_channels + self.mask_channels


@dataclass
class VQVAEOutput:
    """What `VQVAE.forward` returns; `recon` has the input's shape, `codes` is the z-matrix (B, h, w)."""

    recon: torch.Tensor
    vq_loss: torch.Tensor
    codes: torch.Tensor
    perplexity: torch.Tensor
    codes_in_use: torch.Tensor


def kmeans(x: torch.Tensor, k: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the rows of `x` (N, D) into `k` centroids: k-means++ seeding, then `iters` Lloyd steps.

    Returns (centroids (k, D), counts (k,)). Randomness comes from torch's global generator, so a caller that
    seeds it gets the same centroids. With fewer distinct points than `k`, the spare centroids repeat points.
    """
    x = x.float()
    n = x.shape[0]
    first = torch.randint(n, (1,), device=x.device)
    centroids = [x[first[0]]]
    closest = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        # k-means++: far points are likely seeds, so the codes start on distinct data clusters
        total = closest.sum()
        if total <= 0:
            idx = torch.randint(n, (1,), device=x.device)[0]
        else:
            idx = torch.multinomial(closest / total, 1)[0]
        centroids.append(x[idx])
        closest = torch.minimum(closest, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        # an empty cluster keeps its centroid instead of collapsing to the origin
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None].float(), c)
    counts = torch.bincount(torch.cdist(x, c).argmin(1), minlength=k)
    return c, counts


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer with straight-through gradients (van den Oord et al. 2017).

    With `ema=True` the codebook follows exponential moving averages of the encoder outputs assigned to each
    code (Laplace-smoothed cluster sizes, as in Sonnet's VectorQuantizerEMA) and only the commitment loss
    reaches the encoder; with `ema=False` the codebook loss ||sg(z) - e||^2 trains it by gradient. In training
    mode the first call may initialise the codebook by k-means and every call may restart dead codes.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_steps: int = 100,
    ):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.ema = ema
        self.decay = decay
        self.epsilon = epsilon
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.dead_code_steps = dead_code_steps
        bound = 1.0 / num_embeddings
        self.embedding = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim).uniform_(-bound, bound), requires_grad=not ema
        )
        self.register_buffer("ema_cluster_size", torch.ones(num_embeddings))
        self.register_buffer("ema_embed_sum", self.embedding.detach().clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("steps_unused", torch.zeros(num_embeddings, dtype=torch.long))

    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook vector for each row of `flat` (N, D)."""
        e = self.embedding.float()
        dist = (flat**2).sum(1, keepdim=True) - 2 * flat @ e.t() + (e**2).sum(1)[None, :]
        return dist.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for a z-matrix (B, h, w) -> (B, D, h, w)."""
        return F.embedding(codes, self.embedding).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _set_codes(self, index: torch.Tensor, vectors: torch.Tensor, sizes: torch.Tensor) -> None:
        self.embedding.data[index] = vectors
        self.ema_cluster_size[index] = sizes
        self.ema_embed_sum[index] = vectors * sizes[:, None]
        self.steps_unused[index] = 0

    @torch.no_grad()
    def _init_kmeans(self, flat: torch.Tensor) -> None:
        centroids, counts = kmeans(flat, self.num_embeddings, self.kmeans_iters)
        # sizes >= 1 keep an unused code where k-means put it instead of shrinking it towards zero
        all_codes = torch.arange(self.num_embeddings, device=flat.device)
        self._set_codes(all_codes, centroids, counts.float().clamp(min=1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, codes, flat)
        self.ema_cluster_size.mul_(self.decay).add_(counts.float(), alpha=1 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.embedding.data.copy_(self.ema_embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_code_steps <= 0:
            return
        dead = torch.nonzero(self.steps_unused >= self.dead_code_steps).flatten()
        if dead.numel() == 0:
            return
        pick = torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)
        self._set_codes(dead, flat[pick], torch.ones(dead.numel(), device=flat.device))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize encoder outputs `z` (B, D, h, w).

        Returns (quantized with straight-through gradient (B, D, h, w), vq loss, codes (B, h, w),
        perplexity, codes in use); the last two describe this batch.
        """
        b, d, h, w = z.shape
        # distances and EMA sums in float32: under fp16 autocast near codes become indistinguishable
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            if self.training and not bool(self.initialized):
                self._init_kmeans(flat.detach())
            codes = self.assign(flat.detach())
            counts = torch.bincount(codes, minlength=self.num_embeddings)
            quantized = F.embedding(codes, self.embedding).view(b, h, w, d).permute(0, 3, 1, 2)
            commitment = F.mse_loss(z, quantized.detach())
            if self.ema:
                vq_loss = self.commitment_cost * commitment
            else:
                vq_loss = F.mse_loss(quantized, z.detach()) + self.commitment_cost * commitment
            if self.training:
                if self.ema:
                    self._ema_update(flat.detach(), codes, counts)
                self._restart_dead_codes(flat.detach(), counts)
            probs = counts.float() / codes.numel()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            codes_in_use = (counts > 0).sum()
            quantized = z + (quantized - z).detach()
        return quantized, vq_loss, codes.view(b, h, w), perplexity, codes_in_use


class ResidualStack(nn.Module):
    """Sonnet's residual stack: `layers` x (ReLU, 3x3 conv, ReLU, 1x1 conv) added to the input, final ReLU."""

    def __init__(self, channels: int, res_hidden: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, res_hidden, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(res_hidden, channels, 1),
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class Encoder(nn.Module):
    """Strided 4x4 convolutions (2 for downsampling 4, 3 for 8), a 3x3 conv and a residual stack."""

    def __init__(self, in_channels: int, hidden: int, res_hidden: int, res_layers: int, downsample: int):
        super().__init__()
        half = max(hidden // 2, 1)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, half, 4, stride=2, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(half, hidden, 4, stride=2, padding=1), nn.ReLU()]
        if downsample == 8:
            layers += [nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(hidden, hidden, 3, padding=1), ResidualStack(hidden, res_hidden, res_layers)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of `Encoder`: 3x3 conv, residual stack, strided 4x4 transposed convolutions."""

    def __init__(
        self, embedding_dim: int, out_channels: int, hidden: int, res_hidden: int, res_layers: int, downsample: int
    ):
        super().__init__()
        half = max(hidden // 2, 1)
        layers: list[nn.Module] = [
            nn.Conv2d(embedding_dim, hidden, 3, padding=1),
            ResidualStack(hidden, res_hidden, res_layers),
        ]
        if downsample == 8:
            layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU()]
        layers += [nn.ConvTranspose2d(hidden, half, 4, stride=2, padding=1), nn.ReLU()]
        layers += [nn.ConvTranspose2d(half, out_channels, 4, stride=2, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VQVAE(nn.Module):
    """VQ-VAE over joint images (B, C_img + C_mask, H, W) in [0, 1]; H and W divisible by `downsample`.

    `forward` trains (reconstruction, VQ loss, codes and codebook usage); `encode` maps joint images to
    z-matrices of code indices (B, H/downsample, W/downsample); `decode` maps z-matrices back to joint images,
    which is what the prior's samples go through. `encode`, `decode` and `reconstruct` never change the codebook.
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.hidden, c.res_hidden, c.res_layers, c.downsample)
        self.pre_quantization = nn.Conv2d(c.hidden, c.embedding_dim, 1)
        self.quantizer = VectorQuantizer(
            c.num_embeddings,
            c.embedding_dim,
            commitment_cost=c.commitment_cost,
            ema=c.ema,
            decay=c.decay,
            epsilon=c.epsilon,
            kmeans_init=c.kmeans_init,
            kmeans_iters=c.kmeans_iters,
            dead_code_steps=c.dead_code_steps,
        )
        self.decoder = Decoder(c.embedding_dim, c.in_channels, c.hidden, c.res_hidden, c.res_layers, c.downsample)

    def _check(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"expected joint images (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % c.downsample or x.shape[3] % c.downsample:
            raise ValueError(f"height and width must be multiples of {c.downsample}, got {tuple(x.shape[2:])}")

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output before quantization, z_e(x) (B, D, h, w)."""
        self._check(x)
        # centring on 0 is what Sonnet's example feeds the network ([-0.5, 0.5]); the decoder undoes it
        return self.pre_quantization(self.encoder(x - 0.5))

    def decode_quantized(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized) + 0.5

    def output(self, recon: torch.Tensor) -> torch.Tensor:
        """The decoder's raw output -> the joint image consumers see: with `mask_logits`, the mask channels'
        softmax (class probabilities); otherwise unchanged. `forward` returns the raw output (the losses need
        the logits); `decode` and `reconstruct` return this."""
        if not self.config.mask_logits:
            return recon
        c = self.config.image_channels
        return torch.cat([recon[:, :c], torch.softmax(recon[:, c:].float(), dim=1).to(recon.dtype)], dim=1)

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Training pass: `recon` is the decoder's raw output (mask logits with `mask_logits`, see `output`)."""
        quantized, vq_loss, codes, perplexity, in_use = self.quantizer(self.encode_continuous(x))
        return VQVAEOutput(self.decode_quantized(quantized), vq_loss, codes, perplexity, in_use)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Joint images (B, C, H, W) -> z-matrices (B, H/downsample, W/downsample) of code indices (long)."""
        z = self.encode_continuous(x).float()
        b, d, h, w = z.shape
        return self.quantizer.assign(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """z-matrices (B, h, w) of code indices -> joint images (B, C, h*downsample, w*downsample)."""
        codes = codes.long()
        if codes.ndim != 3:
            raise ValueError(f"expected z-matrices (B, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.num_embeddings):
            raise ValueError(f"code indices must lie in 0..{self.config.num_embeddings - 1}")
        return self.output(self.decode_quantized(self.quantizer.lookup(codes)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): the joint image as the VQ-VAE sees it."""
        return self.decode(self.encode(x))

    def checkpoint(self) -> dict:
        """A dict that `from_checkpoint` turns back into this model (config + weights + codebook state)."""
        return {"config": self.config.model_dump(), "model": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, source: str | Path | dict, map_location: str | torch.device = "cpu") -> VQVAE:
        """Rebuild a model from a checkpoint dict or file holding `config` and `model` (its state dict)."""
        ckpt = source if isinstance(source, dict) else torch.load(source, map_location=map_location, weights_only=False)
        config = ckpt["config"]
        model = cls(config if isinstance(config, VQVAEConfig) else VQVAEConfig.model_validate(config))
        model.load_state_dict(ckpt["model"])
        return model


ImageLoss = Literal["mse", "l1"]
MaskLoss = Literal["mse", "cross_entropy"]


def reconstruction_losses(
    x: torch.Tensor,
    recon: torch.Tensor,
    image_channels: int,
    image_loss: ImageLoss = "mse",
    mask_loss: MaskLoss = "mse",
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image term, mask term) between a joint batch `x` and the decoder's raw output, split at `image_channels`.

    image_loss: `mse` (the paper) or `l1` (mean absolute error) on the micrograph channels. mask_loss: `mse`
    on the mask channel(s) (the paper), or `cross_entropy` for onehot masks: the mask channels of `recon` are
    class logits, the target class is the argmax of `x`'s one-hot channels, and `class_weights` (C,) weight
    each target class (`torch.nn.functional.cross_entropy`'s weighted mean).
    """
    recon = recon.float()
    pred_image, true_image = recon[:, :image_channels], x[:, :image_channels]
    if image_loss == "mse":
        image_term = F.mse_loss(pred_image, true_image)
    elif image_loss == "l1":
        image_term = F.l1_loss(pred_image, true_image)
    else:
        raise ValueError(f"image_loss must be 'mse' or 'l1', got {image_loss!r}")
    if mask_loss == "mse":
        mask_term = F.mse_loss(recon[:, image_channels:], x[:, image_channels:])
    elif mask_loss == "cross_entropy":
        if x.shape[1] - image_channels < 2:
            raise ValueError("cross_entropy needs onehot mask channels (one per class)")
        target = x[:, image_channels:].argmax(dim=1)
        weight = None if class_weights is None else class_weights.to(recon.device, torch.float32)
        mask_term = F.cross_entropy(recon[:, image_channels:], target, weight=weight)
    else:
        raise ValueError(f"mask_loss must be 'mse' or 'cross_entropy', got {mask_loss!r}")
    return image_term, mask_term


def focal_frequency_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Focal frequency loss (Jiang et al., ICCV 2021) between image batches (B, C, H, W).

    Both are taken to the frequency domain by an orthonormal 2-D FFT per channel; the distance at each
    frequency is |F(pred) - F(target)|^2, weighted by |F(pred) - F(target)|^alpha scaled to a maximum of 1 per
    image and channel and detached (the "focal" part: frequencies reproduced worst count most, and the weight
    itself gets no gradient); the loss is the mean over frequencies, channels and images. With `alpha` = 0 it
    is the MSE (Parseval); a constant intensity offset c costs c^2 (only the zero frequency differs).
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        diff = torch.fft.fft2(pred.float(), norm="ortho") - torch.fft.fft2(target.float(), norm="ortho")
        distance = diff.real**2 + diff.imag**2
        weight = distance.detach().sqrt() ** alpha
        peak = weight.amax(dim=(-2, -1), keepdim=True)
        weight = torch.where(peak > 0, weight / peak.clamp(min=1e-12), torch.zeros_like(weight))
        return (weight * distance).mean()


# --- inference API ------------------------------------------------------------------------------------------

RUN_KIND = "vqvae"


def load_vqvae(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str = "best") -> VQVAE:
    """The trained VQ-VAE of a run folder (its `best` checkpoint, else `last`), in eval mode on `device`."""
    run = RunFolder.open(run_dir, kind=RUN_KIND)
    device = resolve_device(device) if isinstance(device, str) else device
    model = VQVAE.from_checkpoint(run.load_trained(checkpoint, map_location=device))
    return model.to(device).eval()


def _batched(model: VQVAE, x: torch.Tensor, fn: Callable, batch_size: int, single: bool) -> torch.Tensor:
    """Run `fn` over `x` in eval mode, batch by batch on the model's device; `single` adds/removes a batch axis."""
    if single:
        x = x[None]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device):
            parts = [fn(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    out = torch.cat(parts) if parts else torch.empty(0)
    return out[0] if single else out


def encode(model: VQVAE, joint: torch.Tensor | np.ndarray, batch_size: int = 16) -> torch.Tensor:
    """Joint images (B, C, H, W) or (C, H, W) -> z-matrices (B, h, w) or (h, w), long, on the CPU."""
    joint = torch.as_tensor(joint).float()
    return _batched(model, joint, model.encode, batch_size, single=joint.ndim == 3)


def decode(model: VQVAE, codes: torch.Tensor | np.ndarray, batch_size: int = 16) -> torch.Tensor:
    """z-matrices (B, h, w) or (h, w) -> joint images (B, C, H, W) or (C, H, W), float32 on the CPU.

    Values are the decoder's raw output (roughly [0, 1]); `dualsynth.data.joint_to_pairs` turns them into
    images and masks.
    """
    codes = torch.as_tensor(codes).long()
    return _batched(model, codes, lambda c: model.decode(c).float(), batch_size, single=codes.ndim == 2)


def reconstruct(model: VQVAE, joint: torch.Tensor | np.ndarray, batch_size: int = 16) -> torch.Tensor:
    """decode(encode(joint)): joint images as the VQ-VAE reproduces them, float32 on the CPU."""
    joint = torch.as_tensor(joint).float()
    return _batched(model, joint, lambda x: model.reconstruct(x).float(), batch_size, single=joint.ndim == 3)
