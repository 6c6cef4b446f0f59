"""Autoregressive priors over VQ-VAE z-matrices (the paper's section 4.2 and its outlook in section 7).

Two architectures, one interface (`forward(codes (B, H, W) long, cond (B, F) | None) -> logits (B, K, H, W)`):

- `PixelCNN`, the paper's prior. The paper gives no architecture details; ours is built like the keras.io
  VQ-VAE example's PixelCNN (our choice, not cited by the paper): one-hot codes -> 7x7
  mask-A convolution -> residual blocks with 3x3 mask-B convolutions -> 1x1 mask-B layers -> logits over the K
  codes. Stacked masked convolutions leave a *blind spot* (positions up and to the right that no output ever
  sees); the paper's section 7 reports this prior failing on layered microstructures, and its conclusion
  points to PixelCNN variants without the blind spot.
- `GatedPixelCNN` (van den Oord et al. 2016, "Conditional image generation with PixelCNN decoders"): a
  vertical stack (rows above) and a horizontal stack (the current row, to the left) with gated
  tanh * sigmoid units, residual and skip connections, and no blind spot. An optional vector (here the
  phase fractions of a tile) is projected and added inside every gate.

Both models also offer what the fast sampler in `dualsynth.sampling` needs: `receptive_reach()` (how far up,
left and right an output position looks) and `start_sampling` / `begin_row` / `logits_at`, which compute the
logits at one position from cached activations of earlier positions, each layer at the new position only.

Public surface: `PixelCNNConfig`, `GatedPixelCNNConfig` (and their `...Architecture` sizes), `PriorConfig`,
`PixelCNN`, `GatedPixelCNN`, `Reach`, `SamplingState`, `MaskedConv2d`, `build_prior`, `prior_from_checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


class PixelCNNArchitecture(StrictModel):
    """Sizes of the PixelCNN; defaults are those of the keras.io VQ-VAE example's PixelCNN (our choice)."""

    hidden: int = Field(128, ge=2, description="channels of the trunk (keras example: 128)")
    num_residual_blocks: int = Field(2, ge=0, description="1x1 -> 3x3 mask-B -> 1x1 residual blocks (keras: 2)")
    num_output_layers: int = Field(2, ge=0, description="1x1 mask-B layers before the logits (keras: 2)")
    first_kernel: int = Field(7, ge=3, description="size of the first, mask-A convolution (keras: 7)")
    kernel: int = Field(3, ge=1, description="size of the mask-B convolution in each residual block (keras: 3)")

    _odd_kernels = field_validator("first_kernel", "kernel")(_odd)


class GatedPixelCNNArchitecture(StrictModel):
    """Sizes of the gated PixelCNN (vertical and horizontal stacks, no blind spot)."""

    hidden: int = Field(64, ge=1, description="channels of each stack")
    num_layers: int = Field(12, ge=1, description="gated layers; the first is the causal (mask-A-like) one")
    first_kernel: int = Field(7, ge=3, description="width of the first layer's kernels")
    kernel: int = Field(3, ge=1, description="width of the later layers' kernels")
    skip: int = Field(128, ge=1, description="channels of the skip connections and the output head")

    _odd_kernels = field_validator("first_kernel", "kernel")(_odd)


class PixelCNNConfig(PixelCNNArchitecture):
    """Everything needed to rebuild a `PixelCNN`: its sizes plus what it reads from the VQ-VAE and data."""

    arch: Literal["pixelcnn"] = "pixelcnn"
    num_codes: int = Field(ge=2, description="K, the VQ-VAE's codebook size (paper: 10)")
    cond_dim: int = Field(0, ge=0, description="length of the conditioning vector (0: unconditioned)")


class GatedPixelCNNConfig(GatedPixelCNNArchitecture):
    """Everything needed to rebuild a `GatedPixelCNN`: its sizes plus what it reads from the VQ-VAE and data."""

    arch: Literal["gated"] = "gated"
    num_codes: int = Field(ge=2, description="K, the VQ-VAE's codebook size")
    cond_dim: int = Field(0, ge=0, description="length of the conditioning vector (0: unconditioned)")


PriorConfig = Annotated[Union[PixelCNNConfig, GatedPixelCNNConfig], Field(discriminator="arch")]
_PRIOR_CONFIG = TypeAdapter(PriorConfig)


@dataclass
class SamplingState:
    """What a prior keeps while the fast sampler fills a grid.

    `x` (n, K, H, W) is the one-hot grid of codes drawn so far (the sampler writes each new code into it);
    `cond` the conditioning (n, F) or None; `cache` holds the prior's own per-layer activations.
    """

    x: torch.Tensor
    cond: torch.Tensor | None
    cache: dict[str, Any] = field(default_factory=dict)


def _window(buf: torch.Tensor, i: int, j: int, up: int, left: int, right: int) -> torch.Tensor:
    """`buf[:, :, i-up : i+1, j-left : j+right+1]`, zero-filled where it leaves the grid (= zero padding)."""
    h, w = buf.shape[-2:]
    r0, c0, c1 = i - up, j - left, j + right + 1
    win = buf[:, :, max(0, r0) : i + 1, max(0, c0) : min(w, c1)]
    pad = (max(0, -c0), max(0, c1 - w), max(0, -r0), 0)
    return F.pad(win, pad) if any(pad) else win


class _Prior(nn.Module):
    """What both priors share: input checks, one-hot input, checkpoints, and the sampler interface."""

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
        return F.one_hot(codes, k).permute(0, 3, 1, 2).to(self._dtype())

    def check_cond(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """`cond` validated against the config's `cond_dim` (a clear error for a missing or extra vector)."""
        f = self.config.cond_dim
        if f == 0:
            if cond is not None:
                raise ValueError("this prior was built without conditioning (cond_dim=0); pass cond=None")
            return None
        if cond is None or tuple(cond.shape) != (batch, f):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"this prior needs a conditioning vector of shape ({batch}, {f}), got {got}")
        return cond.to(self._dtype())

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward_onehot(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """One-hot (or any real-valued) input (B, K, H, W) -> logits (B, K, H, W)."""
        raise NotImplementedError

    def receptive_reach(self) -> Reach:
        """Rows up and columns left/right that the logits at one position can depend on."""
        raise NotImplementedError

    # -- the fast sampler's interface ------------------------------------------------------------------------
    def start_sampling(self, x: torch.Tensor, cond: torch.Tensor | None) -> SamplingState:
        """State for filling the one-hot grid `x` (n, K, H, W) in raster order; see `logits_at`."""
        return SamplingState(x, cond)

    def begin_row(self, state: SamplingState, i: int) -> None:
        """Called once before the first position of row `i`, when every row above it is final."""

    def logits_at(self, state: SamplingState, i: int, j: int) -> torch.Tensor:
        """Logits (n, K) at (i, j), given that every earlier position of `state.x` holds its code.

        Called for every position in raster order. This default runs the network on the crop of the grid
        that covers the position's receptive field: the crop's zero padding only corrupts activations that
        (i, j) never reads, so the value equals the full network's. The priors below override it with
        per-layer caches that compute each activation once.
        """
        reach = self.receptive_reach()
        top, left = max(0, i - reach.up), max(0, j - reach.left)
        crop = state.x[:, :, top : i + 1, left : j + reach.right + 1]
        return self.forward_onehot(crop, state.cond)[:, :, i - top, j - left]

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
    """Convolution whose kernel sees only positions before the centre in raster order ("same" zero padding).

    Mask `A` also hides the centre (first layer: the output must not see its own input); mask `B` keeps it
    (later layers: the centre then holds features of earlier positions only).
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

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def at(self, window: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The output at one position from its window (n, C, k//2 + 1, k): the rows down to the centre's.

        Rows below the centre are all masked, so they are left out of the window. `weight` may be a
        precomputed `masked_weight()` (the sampler computes it once, not at every position).
        """
        weight = self.masked_weight() if weight is None else weight
        return F.conv2d(window, weight[:, :, : self.kernel_size[0] // 2 + 1], self.bias)


class _PixelResidualBlock(nn.Module):
    """1x1 conv -> 3x3 mask-B conv (half the channels) -> 1x1 conv, each ReLU, plus input (as the keras example)."""

    def __init__(self, channels: int, kernel: int, cond_dim: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels, 1)
        self.masked = MaskedConv2d("B", channels, channels // 2, kernel)
        self.expand = nn.Conv2d(channels // 2, channels, 1)
        self.cond = nn.Linear(cond_dim, channels // 2) if cond_dim else None

    def cond_bias(self, cond: torch.Tensor | None) -> torch.Tensor | float:
        return 0.0 if self.cond is None else self.cond(cond)[:, :, None, None]

    def finish(self, x: torch.Tensor, masked: torch.Tensor, bias) -> torch.Tensor:
        """The block's output from its input and its masked convolution's output."""
        return x + F.relu(self.expand(F.relu(masked + bias)))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.finish(x, self.masked(F.relu(self.reduce(x))), self.cond_bias(cond))


class PixelCNN(_Prior):
    """The paper's PixelCNN prior (layers as the keras.io VQ-VAE example's), with optional vector conditioning.

    With `cond_dim=0` this is the example's network exactly; otherwise the conditioning vector is projected
    and added before the first layer's and each residual block's masked-convolution activation.
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

    def _first_bias(self, cond: torch.Tensor | None) -> torch.Tensor | float:
        return 0.0 if self.first_cond is None else self.first_cond(cond)[:, :, None, None]

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.output_layers:
            h = F.relu(layer(h))
        return self.head(h)

    def forward_onehot(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = F.relu(self.first(x) + self._first_bias(cond))
        for block in self.blocks:
            h = block(h, cond)
        return self._tail(h)

    def receptive_reach(self) -> Reach:
        c = self.config
        r = c.first_kernel // 2 + c.num_residual_blocks * (c.kernel // 2)
        return Reach(r, r, r)

    def start_sampling(self, x: torch.Tensor, cond: torch.Tensor | None) -> SamplingState:
        n, _, h, w = x.shape
        state = SamplingState(x, cond)
        state.cache.update(
            first=(self.first.masked_weight(), self._first_bias(cond)),
            blocks=[(blk.masked.masked_weight(), blk.cond_bias(cond)) for blk in self.blocks],
            # each block's masked-convolution input over the grid, filled one position at a time
            inputs=[x.new_zeros(n, self.config.hidden, h, w) for _ in self.blocks],
        )
        return state

    def logits_at(self, state: SamplingState, i: int, j: int) -> torch.Tensor:
        """Every layer's activation at (i, j) only, from cached activations of earlier positions."""
        k0, k = self.config.first_kernel // 2, self.config.kernel // 2
        weight, bias = state.cache["first"]
        h = F.relu(self.first.at(_window(state.x, i, j, k0, k0, k0), weight) + bias)
        for block, (weight, bias), grid in zip(self.blocks, state.cache["blocks"], state.cache["inputs"]):
            grid[:, :, i, j] = F.relu(block.reduce(h))[:, :, 0, 0]
            h = block.finish(h, block.masked.at(_window(grid, i, j, k, k, k), weight), bias)
        return self._tail(h)[:, :, 0, 0]


# --- Gated PixelCNN -----------------------------------------------------------------------------------------


def _gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) for the gate input [a, b] (split on channels), given x = [2a, b].

    tanh(a) is written as 2 sigmoid(2a) - 1: the same function, and on CPUs torch's sigmoid kernel is several
    times faster than its tanh. The layers fold the factor 2 into the weights that produce the first half, so
    one sigmoid runs over the whole of x. Training convolutions on a CPU return channels-last tensors, where a
    channel half is a strided view; the result is made channels-last again for the next convolution.
    """
    a, b = torch.sigmoid(x).chunk(2, dim=1)
    out = (2 * a - 1) * b
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _plus(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias


class _Weights(NamedTuple):
    """A gated layer's convolution weights as its forward pass uses them (see `GatedLayer.gate_weights`)."""

    vertical: tuple[torch.Tensor, torch.Tensor]
    horizontal: tuple[torch.Tensor, torch.Tensor]
    to_horizontal: tuple[torch.Tensor, torch.Tensor]


class GatedLayer(nn.Module):
    """One gated layer: vertical stack (rows above), horizontal stack (row so far), vertical -> horizontal.

    Causality comes from kernel shapes and one-sided padding rather than masks. The first layer's vertical
    kernel covers the `kernel // 2` rows *above* (not the current row) and its horizontal kernel the columns
    strictly left; later layers also cover the current row/column, which by then holds only earlier
    positions' features. So the vertical features at row i depend on rows < i alone and feed the horizontal
    stack at row i without a shift: the receptive field is the whole rectangle above plus the row to the
    left, with no blind spot.

    Every gate input is computed with its tanh half doubled (`_gate`): the factor 2 is folded into the
    weights of the convolutions that produce it (`gate_weights`), not applied to the activations. Scaling by
    2 is exact in floating point, so the layer computes the same values as with the factor applied to the
    activations, with one pass less over its largest tensors; the parameters are unchanged.
    """

    def __init__(self, in_channels: int, hidden: int, kernel: int, first: bool, skip: int, cond_dim: int):
        super().__init__()
        self.first = first
        self.k2 = kernel // 2
        # rows (vertical) or columns (horizontal) that one output reads: the current one too, unless first
        self.depth = self.k2 if first else self.k2 + 1
        self.vertical = nn.Conv2d(in_channels, 2 * hidden, (self.depth, kernel))
        self.horizontal = nn.Conv2d(in_channels, 2 * hidden, (1, self.depth))
        self.vertical_to_horizontal = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.horizontal_out = nn.Conv2d(hidden, hidden, 1)
        self.skip = nn.Conv2d(hidden, skip, 1)
        self.cond = nn.Linear(cond_dim, 4 * hidden) if cond_dim else None
        # (2, ..., 2, 1, ..., 1) over the gate channels; not saved with the weights
        self.register_buffer("gate_scale", torch.tensor([2.0] * hidden + [1.0] * hidden), persistent=False)

    def gate_weights(self) -> _Weights:
        """The vertical and horizontal convolutions with their outputs' tanh half doubled, and the vertical ->
        horizontal 1x1 convolution reading the doubled vertical output and writing a doubled contribution."""
        s = self.gate_scale
        out = s[:, None, None, None]
        return _Weights(
            (self.vertical.weight * out, self.vertical.bias * s),
            (self.horizontal.weight * out, self.horizontal.bias * s),
            (self.vertical_to_horizontal.weight * out / s[None, :, None, None], self.vertical_to_horizontal.bias * s),
        )

    def cond_bias(self, cond: torch.Tensor | None) -> tuple[Any, Any]:
        """(vertical, horizontal) gate biases from the conditioning vector, shaped to broadcast and scaled as
        the gate inputs (`gate_weights`); (None, None) without conditioning."""
        if self.cond is None:
            return None, None
        bias = self.cond(cond)[:, :, None, None]
        v, h = bias.chunk(2, dim=1)
        s = self.gate_scale[None, :, None, None].to(bias.dtype)
        return v * s, h * s

    def vertical_step(self, v: torch.Tensor, v_bias, weights: _Weights) -> tuple[torch.Tensor, torch.Tensor]:
        """Vertical input (B, C, H, W) -> (next vertical input, contribution to the horizontal stack)."""
        rows = v.shape[-2]
        # pad k2 rows on top, keep the first H output rows: output row i reads rows i-k2 .. i (.. i-1 if first)
        pre = F.conv2d(F.pad(v, (self.k2, self.k2, self.k2, 0)), *weights.vertical)[:, :, :rows]
        return _gate(_plus(pre, v_bias)), F.conv2d(pre, *weights.to_horizontal)

    def horizontal_step(self, h: torch.Tensor, v_to_h: torch.Tensor, h_bias, weights: _Weights):
        """Horizontal input and the vertical contribution -> (next horizontal input, gated activation); the
        layer's skip output is `self.skip(gated)`, which the whole network applies for all layers at once."""
        cols = h.shape[-1]
        pre = F.conv2d(F.pad(h, (self.k2, 0, 0, 0)), *weights.horizontal)[..., :cols]
        return self._horizontal_out(pre, h, v_to_h, h_bias)

    def _horizontal_out(self, pre, h, v_to_h, h_bias):
        gated = _gate(_plus(pre + v_to_h, h_bias))
        out = self.horizontal_out(gated)
        # the first layer's input is the current position's own code: adding it back would leak it
        return (out if self.first else h + out), gated

    # one row / one position at a time, for the fast sampler
    def vertical_row(self, above: torch.Tensor, v_bias, weights: _Weights) -> tuple[torch.Tensor, torch.Tensor]:
        """`vertical_step` for the newest row only, from the `depth` input rows it reads (B, C, depth, W)."""
        pre = F.conv2d(F.pad(above, (self.k2, self.k2, 0, 0)), *weights.vertical)
        return _gate(_plus(pre, v_bias)), F.conv2d(pre, *weights.to_horizontal)

    def horizontal_at(self, left: torch.Tensor, h: torch.Tensor | None, v_to_h: torch.Tensor, h_bias,
                      weights: _Weights):
        """`horizontal_step` at the newest position only, from the `depth` input columns it reads
        (B, C, 1, depth); `h` is the input at that position (the residual), unused by the first layer."""
        h, gated = self._horizontal_out(F.conv2d(left, *weights.horizontal), h, v_to_h, h_bias)
        return h, self.skip(gated)


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
        v, h, gated = x, x, []
        for layer in self.layers:
            v_bias, h_bias = layer.cond_bias(cond)
            weights = layer.gate_weights()
            v, v_to_h = layer.vertical_step(v, v_bias, weights)
            h, g = layer.horizontal_step(h, v_to_h, h_bias, weights)
            gated.append(g)
        # sum over layers of skip_l(gated_l), as one 1x1 convolution over the stacked gated activations: the same
        # sum, in one large operation instead of one small one per layer (faster on a CPU)
        weight = torch.cat([layer.skip.weight for layer in self.layers], dim=1)
        bias = torch.stack([layer.skip.bias for layer in self.layers]).sum(0)
        return self.head(F.conv2d(torch.cat(gated, dim=1), weight, bias))

    def receptive_reach(self) -> Reach:
        c = self.config
        r = c.first_kernel // 2 + (c.num_layers - 1) * (c.kernel // 2)
        return Reach(r, r, r)

    def start_sampling(self, x: torch.Tensor, cond: torch.Tensor | None) -> SamplingState:
        n, _, _, w = x.shape
        hidden = self.config.hidden
        state = SamplingState(x, cond)
        state.cache.update(
            bias=[layer.cond_bias(cond) for layer in self.layers],
            weights=[layer.gate_weights() for layer in self.layers],
            # per layer: its vertical output on the last rows the next layer reads (grows to `depth` rows)
            vertical=[x.new_zeros(n, hidden, 0, w) for _ in self.layers],
            # per layer: its vertical -> horizontal contribution on the current row
            to_horizontal=[None] * len(self.layers),
            # per layer: its horizontal output on the current row, filled left to right
            horizontal=[x.new_zeros(n, hidden, 1, w) for _ in self.layers],
        )
        return state

    def begin_row(self, state: SamplingState, i: int) -> None:
        """Vertical stack for row i (it reads rows < i only), one new row per layer."""
        cache, w = state.cache, state.x.shape[-1]
        above = _window(state.x, i - 1, 0, self.layers[0].depth - 1, 0, w - 1)
        for n, layer in enumerate(self.layers):
            v, cache["to_horizontal"][n] = layer.vertical_row(above, cache["bias"][n][0], cache["weights"][n])
            if n + 1 < len(self.layers):
                depth = self.layers[n + 1].depth
                cache["vertical"][n] = rows = torch.cat([cache["vertical"][n], v], dim=2)[:, :, -depth:]
                above = F.pad(rows, (0, 0, depth - rows.shape[2], 0))

    def logits_at(self, state: SamplingState, i: int, j: int) -> torch.Tensor:
        """Horizontal stack at (i, j) only, one new position per layer, plus the head."""
        cache = state.cache
        left = _window(state.x[:, :, i : i + 1], 0, j - 1, 0, self.layers[0].depth - 1, 0)
        h, skips = None, 0.0
        for n, layer in enumerate(self.layers):
            h, s = layer.horizontal_at(left, h, cache["to_horizontal"][n][..., j : j + 1], cache["bias"][n][1],
                                       cache["weights"][n])
            skips = skips + s
            if n + 1 < len(self.layers):
                row = cache["horizontal"][n]
                row[:, :, :, j] = h[:, :, :, 0]
                left = _window(row, 0, j, 0, self.layers[n + 1].depth - 1, 0)
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
