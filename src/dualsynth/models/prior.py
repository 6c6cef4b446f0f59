"""Autoregressive priors over VQ-VAE z-matrices (the paper's section 4.2 and its outlook in section 7).

Two architectures, one interface (`forward(codes (B, H, W) long, cond (B, F) | None) -> logits (B, K, H, W)`):

- `PixelCNN`, the paper's prior, built as in the keras.io VQ-VAE example it adapted: one-hot codes -> 7x7
  mask-A convolution -> residual blocks with 3x3 mask-B convolutions -> 1x1 mask-B layers -> logits over the K
  codes. Stacked masked convolutions leave a *blind spot* (positions up and to the right that no output ever
  sees); the paper's section 7 blames its failure on layered microstructures on exactly this.
- `GatedPixelCNN` (van den Oord et al. 2016, "Conditional image generation with PixelCNN decoders"): a
  vertical stack (rows above) and a horizontal stack (the current row, to the left) with gated
  tanh * sigmoid units, residual and skip connections, and no blind spot. An optional vector (here the
  phase fractions of a tile) is projected and added inside every gate.

Both models also offer what the fast sampler in `dualsynth.sampling` needs: `receptive_reach()` (how far up,
left and right an output position looks) and `begin_row` / `logits_at`, which compute the logits at one
position from only the part of the grid that can influence it. The default `logits_at` runs the network on a
crop of the grid that covers the position's receptive field; in exact arithmetic that gives the full network's
value, because zero padding at a crop border only corrupts activations that the position never reads.

Public surface: `PixelCNNConfig`, `GatedPixelCNNConfig`, `PriorConfig`, `PixelCNN`, `GatedPixelCNN`,
`Reach`, `MaskedConv2d`, `build_prior`, `prior_from_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union

import torch
import torch.nn.functional as F
from pydantic import Field, TypeAdapter, field_validator
from torch import nn

from dualsynth.config import StrictModel


class Reach(NamedTuple):
    """How far the receptive field of one output position extends: rows up, columns left and right."""

    up: int
    left: int
    right: int


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("kernel sizes must be odd")
    return value


class PixelCNNConfig(StrictModel):
    """The paper's PixelCNN (keras.io VQ-VAE example); defaults are that example's sizes."""

    arch: Literal["pixelcnn"] = "pixelcnn"
    num_codes: int = Field(ge=2, description="K, the VQ-VAE's codebook size (paper: 10)")
    hidden: int = Field(128, ge=2, description="channels of the trunk (keras example: 128)")
    num_residual_blocks: int = Field(2, ge=0, description="1x1 -> 3x3 mask-B -> 1x1 residual blocks (keras: 2)")
    num_output_layers: int = Field(2, ge=0, description="1x1 mask-B layers before the logits (keras: 2)")
    first_kernel: int = Field(7, ge=3, description="size of the first, mask-A convolution (keras: 7)")
    kernel: int = Field(3, ge=1, description="size of the mask-B convolution in each residual block (keras: 3)")
    cond_dim: int = Field(0, ge=0, description="length of the conditioning vector (0: unconditioned)")

    _odd_kernels = field_validator("first_kernel", "kernel")(_odd)


class GatedPixelCNNConfig(StrictModel):
    """Gated PixelCNN with vertical and horizontal stacks (no blind spot)."""

    arch: Literal["gated"] = "gated"
    num_codes: int = Field(ge=2, description="K, the VQ-VAE's codebook size")
    hidden: int = Field(64, ge=1, description="channels of each stack")
    num_layers: int = Field(12, ge=1, description="gated layers; the first is the causal (mask-A) one")
    first_kernel: int = Field(7, ge=3, description="width of the first layer's kernels")
    kernel: int = Field(3, ge=1, description="width of the later layers' kernels")
    skip: int = Field(128, ge=1, description="channels of the skip connections and the output head")
    cond_dim: int = Field(0, ge=0, description="length of the conditioning vector (0: unconditioned)")

    _odd_kernels = field_validator("first_kernel", "kernel")(_odd)


PriorConfig = Annotated[Union[PixelCNNConfig, GatedPixelCNNConfig], Field(discriminator="arch")]
_PRIOR_CONFIG = TypeAdapter(PriorConfig)


class _Prior(nn.Module):
    """What both priors share: input checks, one-hot input, checkpoints, and the crop-based `logits_at`."""

    config: Any

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """z-matrices (B, H, W) of code indices (+ conditioning (B, F)) -> logits (B, K, H, W).

        The logits at (i, j) depend only on codes before (i, j) in raster order, so they give
        p(z_ij | z_<ij) and the cross-entropy against `codes` is the model's negative log-likelihood.
        """
        return self.forward_onehot(self.one_hot(codes), self.check_cond(cond, codes.shape[0]))

    def one_hot(self, codes: torch.Tensor) -> torch.Tensor:
        k = self.config.num_codes
        if codes.ndim != 3:
            raise ValueError(f"expected z-matrices (B, H, W), got {tuple(codes.shape)}")
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise ValueError(f"code indices must lie in 0..{k - 1}")
        dtype = next(self.parameters()).dtype
        return F.one_hot(codes, k).permute(0, 3, 1, 2).to(dtype)

    def check_cond(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        f = self.config.cond_dim
        if f == 0:
            if cond is not None:
                raise ValueError("this prior was built without conditioning (cond_dim=0); pass cond=None")
            return None
        if cond is None or cond.shape != (batch, f):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"this prior needs a conditioning vector of shape ({batch}, {f}), got {got}")
        return cond.to(next(self.parameters()).dtype)

    def forward_onehot(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """One-hot (or any real-valued) input (B, K, H, W) -> logits (B, K, H, W)."""
        raise NotImplementedError

    def receptive_reach(self) -> Reach:
        raise NotImplementedError

    # -- what the fast sampler calls -------------------------------------------------------------------------
    def begin_row(self, x: torch.Tensor, cond: torch.Tensor | None, i: int) -> Any:
        """Work shared by every position of row `i` once rows above it are final; passed to `logits_at`."""
        return None

    def logits_at(self, x: torch.Tensor, cond: torch.Tensor | None, i: int, j: int, row: Any = None) -> torch.Tensor:
        """Logits (B, K) at position (i, j) of the one-hot grid `x`, from the receptive field's crop only.

        Rows below `i` are never read, and neither is anything right of `j` in row `i`; the crop's top and
        side borders lie at least one receptive-field reach away, so their zero padding cannot reach (i, j).
        """
        reach = self.receptive_reach()
        top = max(0, i - reach.up)
        left = max(0, j - reach.left)
        right = min(x.shape[-1], j + reach.right + 1)
        crop = x[:, :, top : i + 1, left:right]
        return self.forward_onehot(crop, cond)[:, :, i - top, j - left]

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """A dict that `prior_from_checkpoint` / `from_checkpoint` turns back into this model."""
        return {"config": self.config.model_dump(), "model": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, source: str | Path | dict, map_location: str | torch.device = "cpu") -> "_Prior":
        """Rebuild a prior from a checkpoint dict or file holding `config` and `model` (its state dict)."""
        model = prior_from_checkpoint(source, map_location)
        if cls is not _Prior and not isinstance(model, cls):
            raise ValueError(f"checkpoint holds a {type(model).__name__}, not a {cls.__name__}")
        return model


# --- PixelCNN (the paper's) ---------------------------------------------------------------------------------


class MaskedConv2d(nn.Conv2d):
    """Convolution whose kernel sees only positions before the centre in raster order.

    Mask `A` also hides the centre (first layer: the output must not see its own input); mask `B` keeps it
    (later layers: the centre then holds features of earlier positions only). "same" zero padding.
    """

    def __init__(self, mask_type: Literal["A", "B"], in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        if mask_type not in ("A", "B"):
            raise ValueError("mask_type must be 'A' or 'B'")
        c = kernel_size // 2
        mask = torch.zeros(kernel_size, kernel_size)
        mask[:c, :] = 1
        mask[c, : c + (mask_type == "B")] = 1
        self.register_buffer("mask", mask[None, None], persistent=False)
        self.mask_type = mask_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class _PixelResidualBlock(nn.Module):
    """keras example: 1x1 conv -> 3x3 mask-B conv (half the channels) -> 1x1 conv, each ReLU, plus input."""

    def __init__(self, channels: int, kernel: int, cond_dim: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels, 1)
        self.masked = MaskedConv2d("B", channels, channels // 2, kernel)
        self.expand = nn.Conv2d(channels // 2, channels, 1)
        self.cond = nn.Linear(cond_dim, channels // 2) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = self.masked(F.relu(self.reduce(x)))
        if self.cond is not None:
            h = h + self.cond(cond)[:, :, None, None]
        return x + F.relu(self.expand(F.relu(h)))


class PixelCNN(_Prior):
    """The paper's PixelCNN prior (keras.io VQ-VAE example), with optional vector conditioning.

    With `cond_dim=0` this is the example's network exactly; otherwise the conditioning vector is projected
    and added before the first layer's and each residual block's activation.
    """

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        self.config = c = config
        self.first = MaskedConv2d("A", c.num_codes, c.hidden, c.first_kernel)
        self.first_cond = nn.Linear(c.cond_dim, c.hidden) if c.cond_dim else None
        self.blocks = nn.ModuleList(
            _PixelResidualBlock(c.hidden, c.kernel, c.cond_dim) for _ in range(c.num_residual_blocks)
        )
        # a 1x1 mask-B kernel is its centre only, i.e. a plain 1x1 convolution
        self.output_layers = nn.ModuleList(MaskedConv2d("B", c.hidden, c.hidden, 1) for _ in range(c.num_output_layers))
        self.head = nn.Conv2d(c.hidden, c.num_codes, 1)

    def forward_onehot(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = self.first(x)
        if self.first_cond is not None:
            h = h + self.first_cond(cond)[:, :, None, None]
        h = F.relu(h)
        for block in self.blocks:
            h = block(h, cond)
        for layer in self.output_layers:
            h = F.relu(layer(h))
        return self.head(h)

    def receptive_reach(self) -> Reach:
        c = self.config
        r = c.first_kernel // 2 + c.num_residual_blocks * (c.kernel // 2)
        return Reach(r, r, r)


# --- Gated PixelCNN -----------------------------------------------------------------------------------------


def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer: vertical stack (rows above), horizontal stack (row so far), vertical -> horizontal.

    Causality comes from the kernel shapes and one-sided padding rather than masks. The first layer's
    vertical kernel covers the `first_kernel // 2` rows *above* (not the current row) and its horizontal
    kernel the columns strictly left; later layers also cover the current row/column, which by then holds
    only earlier positions' features. So the vertical features at row i depend on rows < i alone and can feed
    the horizontal stack at row i without a shift: the receptive field is the full rectangle above plus the
    row to the left, with no blind spot.
    """

    def __init__(self, in_channels: int, hidden: int, kernel: int, first: bool, skip: int, cond_dim: int):
        super().__init__()
        self.first = first
        self.k2 = kernel // 2
        depth = self.k2 if first else self.k2 + 1
        self.vertical = nn.Conv2d(in_channels, 2 * hidden, (depth, kernel))
        self.horizontal = nn.Conv2d(in_channels, 2 * hidden, (1, depth))
        self.vertical_to_horizontal = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.horizontal_out = nn.Conv2d(hidden, hidden, 1)
        self.skip = nn.Conv2d(hidden, skip, 1)
        self.cond = nn.Linear(cond_dim, 4 * hidden) if cond_dim else None

    def cond_bias(self, cond: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(vertical, horizontal) gate biases from the conditioning vector, shaped to broadcast."""
        if self.cond is None:
            return 0.0, 0.0
        v, h = self.cond(cond)[:, :, None, None].chunk(2, dim=1)
        return v, h

    def vertical_step(self, v: torch.Tensor, v_bias) -> tuple[torch.Tensor, torch.Tensor]:
        """Vertical stack input (B, C, H, W) -> (next layer's vertical input, contribution to horizontal)."""
        rows = v.shape[-2]
        # pad k2 rows on top only, then keep the first H output rows: row i sees rows i-k2 .. i (i-1 if first)
        pre = self.vertical(F.pad(v, (self.k2, self.k2, self.k2, 0)))[:, :, :rows]
        return _gate(pre + v_bias), self.vertical_to_horizontal(pre)

    def horizontal_step(self, h: torch.Tensor, v_to_h: torch.Tensor, h_bias) -> tuple[torch.Tensor, torch.Tensor]:
        """Horizontal stack input and the vertical contribution -> (next horizontal input, skip output)."""
        cols = h.shape[-1]
        pre = self.horizontal(F.pad(h, (self.k2, 0, 0, 0)))[..., :cols]
        gated = _gate(pre + v_to_h + h_bias)
        out = self.horizontal_out(gated)
        # the first layer's input is the current position's own code: adding it back would leak it
        return (out if self.first else h + out), self.skip(gated)


class GatedPixelCNN(_Prior):
    """Gated PixelCNN prior (van den Oord et al. 2016) over z-matrices, optionally conditioned on a vector."""

    def __init__(self, config: GatedPixelCNNConfig):
        super().__init__()
        self.config = c = config
        self.layers = nn.ModuleList(
            GatedLayer(
                c.num_codes if n == 0 else c.hidden,
                c.hidden,
                c.first_kernel if n == 0 else c.kernel,
                first=n == 0,
                skip=c.skip,
                cond_dim=c.cond_dim,
            )
            for n in range(c.num_layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c.skip, c.skip, 1), nn.ReLU(), nn.Conv2d(c.skip, c.num_codes, 1))

    def forward_onehot(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        v, h, skips = x, x, 0.0
        for layer in self.layers:
            v_bias, h_bias = layer.cond_bias(cond)
            v, v_to_h = layer.vertical_step(v, v_bias)
            h, s = layer.horizontal_step(h, v_to_h, h_bias)
            skips = skips + s
        return self.head(skips)

    def receptive_reach(self) -> Reach:
        c = self.config
        r = c.first_kernel // 2 + (c.num_layers - 1) * (c.kernel // 2)
        return Reach(r, r, r)

    def begin_row(self, x: torch.Tensor, cond: torch.Tensor | None, i: int) -> list[tuple[torch.Tensor, Any]]:
        """Run the vertical stack for row `i` (it reads rows < i only) on the rows within reach above it.

        Returns, per layer, the vertical -> horizontal contribution at row i (B, 2*hidden, W) and the
        horizontal gate bias; `logits_at` then runs only the horizontal stack along the row.
        """
        top = max(0, i - self.receptive_reach().up)
        v = x[:, :, top : i + 1]
        row = []
        for layer in self.layers:
            v_bias, h_bias = layer.cond_bias(cond)
            v, v_to_h = layer.vertical_step(v, v_bias)
            row.append((v_to_h[:, :, -1:], h_bias))
        return row

    def logits_at(self, x: torch.Tensor, cond: torch.Tensor | None, i: int, j: int, row: Any = None) -> torch.Tensor:
        if row is None:
            row = self.begin_row(x, cond, i)
        left = max(0, j - self.receptive_reach().left)
        h = x[:, :, i : i + 1, left : j + 1]
        skips = 0.0
        for layer, (v_to_h, h_bias) in zip(self.layers, row):
            h, s = layer.horizontal_step(h, v_to_h[..., left : j + 1], h_bias)
            # only the newest column's skip reaches the head; earlier ones belong to earlier positions
            skips = skips + s[..., -1:]
        return self.head(skips)[:, :, 0, 0]


# --- building and loading -----------------------------------------------------------------------------------


def build_prior(config: PixelCNNConfig | GatedPixelCNNConfig | dict) -> PixelCNN | GatedPixelCNN:
    """A fresh prior from its config (a config object or a dict with `arch`)."""
    if isinstance(config, dict):
        config = _PRIOR_CONFIG.validate_python(config)
    if isinstance(config, PixelCNNConfig):
        return PixelCNN(config)
    if isinstance(config, GatedPixelCNNConfig):
        return GatedPixelCNN(config)
    raise TypeError(f"not a prior config: {type(config).__name__}")


def prior_from_checkpoint(source: str | Path | dict, map_location: str | torch.device = "cpu") -> PixelCNN | GatedPixelCNN:
    """Rebuild either prior from a checkpoint dict or file holding `config` and `model`."""
    ckpt = source if isinstance(source, dict) else torch.load(source, map_location=map_location, weights_only=False)
    model = build_prior(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model
