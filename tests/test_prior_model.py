"""The priors: causality and receptive fields (by gradients), conditioning, checkpoints, the sampler hooks."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from dualsynth.models.prior import (
    GatedPixelCNN,
    GatedPixelCNNConfig,
    MaskedConv2d,
    PixelCNN,
    PixelCNNConfig,
    _Prior,
    build_prior,
    prior_from_checkpoint,
)


def receptive_field(model, shape, i, j, cond=None):
    """Boolean (H, W): the input positions whose value changes the logits at (i, j) (non-zero gradient)."""
    model = model.double()
    k = model.config.num_codes
    gen = torch.Generator().manual_seed(1000 * i + j)
    # continuous random input rather than one-hot: every input position then carries a generic value
    x = torch.rand(1, k, *shape, generator=gen, dtype=torch.float64, requires_grad=True)
    out = model.forward_onehot(x, None if cond is None else cond.double())
    (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x)
    return grad.abs().sum(dim=(0, 1)) > 0


def before(shape, i, j):
    """Boolean (H, W): positions strictly before (i, j) in raster order."""
    h, w = shape
    index = torch.arange(h * w).view(h, w)
    return index < i * w + j


def reach_box(shape, i, j, r):
    """Boolean (H, W): rows i-r..i, columns j-r..j+r (the rectangle a reach of r allows)."""
    rows = torch.arange(shape[0])[:, None]
    cols = torch.arange(shape[1])[None, :]
    return (rows >= i - r) & (rows <= i) & (cols >= j - r) & (cols <= j + r)


EDGE_AND_INNER = [(0, 0), (0, 1), (0, 7), (1, 0), (3, 4), (4, 7), (7, 0), (7, 7), (5, 2)]


def gated(**kw):
    base = dict(num_codes=3, hidden=4, skip=6, num_layers=5, first_kernel=7, kernel=3)
    return GatedPixelCNN(GatedPixelCNNConfig(**{**base, **kw}))


def pixelcnn(**kw):
    base = dict(num_codes=3, hidden=16, num_residual_blocks=2, num_output_layers=1)
    return PixelCNN(PixelCNNConfig(**{**base, **kw}))


def test_gated_receptive_field_is_exactly_every_earlier_position():
    torch.manual_seed(0)
    model = gated()  # reach 3 + 4*1 = 7 covers the whole 8x8 grid
    assert model.receptive_reach().up >= 7
    for i in range(8):
        for j in range(8):
            field = receptive_field(model, (8, 8), i, j)
            assert torch.equal(field, before((8, 8), i, j)), (i, j)


def test_gated_receptive_field_with_conditioning_and_wide_kernels():
    torch.manual_seed(1)
    model = gated(num_layers=3, first_kernel=3, kernel=5, cond_dim=2)  # reach 1 + 2*2 = 5
    cond = torch.tensor([[0.3, 0.7]])
    for i, j in [(0, 0), (0, 5), (5, 0), (5, 5), (2, 3)]:
        assert torch.equal(receptive_field(model, (6, 6), i, j, cond), before((6, 6), i, j)), (i, j)


def test_gated_receptive_field_matches_its_declared_reach():
    torch.manual_seed(2)
    model = gated(num_layers=2, first_kernel=3, kernel=3)  # reach 2: a band, smaller than the grid
    r = model.receptive_reach().up
    assert r == 2
    for i, j in [(0, 0), (4, 4), (8, 8), (8, 0), (3, 8), (1, 6)]:
        expected = before((9, 9), i, j) & reach_box((9, 9), i, j, r)
        assert torch.equal(receptive_field(model, (9, 9), i, j), expected), (i, j)


def test_pixelcnn_sees_only_earlier_positions_and_has_a_blind_spot():
    torch.manual_seed(3)
    model = pixelcnn()
    r = model.receptive_reach().up
    assert r == 3 + 2  # 7x7 mask A, then one row/column per 3x3 mask-B residual block
    shape = (12, 12)
    for i, j in [(0, 0), (0, 11), (11, 0), (11, 11), (6, 6), (1, 10), (3, 0)]:
        field = receptive_field(model, shape, i, j)
        assert not field[i, j], "an output must not see its own code"
        assert not (field & ~before(shape, i, j)).any(), (i, j)
        assert not (field & ~reach_box(shape, i, j, r)).any(), (i, j)
        # the first layer's 7x7 mask-A neighbourhood reaches the output through the residual path
        assert field[before(shape, i, j) & reach_box(shape, i, j, 3)].all(), (i, j)
    # the blind spot: (i-1, j+4) comes before (i, j) and lies within reach, yet no path leads to it
    field = receptive_field(model, shape, 6, 6)
    assert before(shape, 6, 6)[5, 10] and reach_box(shape, 6, 6, r)[5, 10]
    assert not field[5, 10]


def test_masks_hide_the_centre_only_for_type_a():
    a = MaskedConv2d("A", 1, 1, 3).mask[0, 0]
    b = MaskedConv2d("B", 1, 1, 3).mask[0, 0]
    assert a.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert b.tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("make", [pixelcnn, gated])
def test_forward_shapes_and_conditioning(make):
    torch.manual_seed(4)
    model = make(cond_dim=3)
    codes = torch.randint(0, 3, (2, 5, 7))
    cond_a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    cond_b = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    logits = model(codes, cond_a)
    assert logits.shape == (2, 3, 5, 7)
    # conditioning changes the prediction even at the first position, where no code is known yet
    assert not torch.allclose(logits[:, :, 0, 0], model(codes, cond_b)[:, :, 0, 0])
    with pytest.raises(ValueError, match="conditioning"):
        model(codes)
    with pytest.raises(ValueError, match="code indices"):
        model(torch.full((1, 4, 4), 3))


def test_unconditioned_prior_refuses_a_vector():
    with pytest.raises(ValueError, match="without conditioning"):
        pixelcnn()(torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 2))


@pytest.mark.parametrize("make", [pixelcnn, gated])
def test_checkpoint_round_trip(make, tmp_path):
    torch.manual_seed(5)
    model = make(cond_dim=2).eval()
    codes = torch.randint(0, 3, (2, 6, 6))
    cond = torch.rand(2, 2)
    torch.save(model.checkpoint(), tmp_path / "prior.pt")
    again = prior_from_checkpoint(tmp_path / "prior.pt").eval()
    assert type(again) is type(model) and again.config == model.config
    assert torch.equal(again(codes, cond), model(codes, cond))
    assert type(type(model).from_checkpoint(model.checkpoint())) is type(model)
    other = GatedPixelCNN if isinstance(model, PixelCNN) else PixelCNN
    with pytest.raises(ValueError, match="not a"):
        other.from_checkpoint(model.checkpoint())


def test_configs_are_strict():
    with pytest.raises(ValidationError):
        PixelCNNConfig(num_codes=4, hiden=3)  # typo
    with pytest.raises(ValidationError):
        GatedPixelCNNConfig(num_codes=4, kernel=4)  # even kernels have no centre
    assert isinstance(build_prior({"arch": "gated", "num_codes": 4}), GatedPixelCNN)
    assert isinstance(build_prior({"arch": "pixelcnn", "num_codes": 4}), PixelCNN)
    with pytest.raises(ValidationError):
        build_prior({"arch": "transformer", "num_codes": 4})


@pytest.mark.parametrize("make", [pixelcnn, gated])
@pytest.mark.parametrize("use_default", [False, True], ids=["cached", "crop"])
def test_logits_at_matches_the_full_network(make, use_default):
    """The sampler hooks give the full network's logits at every position, in raster order.

    The grid holds *all* codes, future ones included: a cache that read a future position would differ.
    `crop` checks the generic receptive-field crop every prior inherits.
    """
    torch.manual_seed(6)
    model = make(cond_dim=2).eval()
    codes = torch.randint(0, 3, (3, 7, 9))
    cond = torch.rand(3, 2)
    with torch.no_grad():
        full = model(codes, cond)
        state = model.start_sampling(model.one_hot(codes), cond)
        for i in range(7):
            model.begin_row(state, i)
            for j in range(9):
                at = _Prior.logits_at(model, state, i, j) if use_default else model.logits_at(state, i, j)
                torch.testing.assert_close(at, full[:, :, i, j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["plain", "channels_last"])
def test_gate_is_tanh_times_sigmoid_in_either_memory_layout(layout):
    """`_gate([2a, b])` is tanh(a) * sigmoid(b) in either memory layout, with the same gradients, and a
    channels-last input gives a channels-last output."""
    from dualsynth.models.prior import _gate

    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    x.requires_grad_(True)
    ref_x = x.detach().clone().contiguous().requires_grad_(True)
    a, b = ref_x.chunk(2, dim=1)
    ref = torch.tanh(a) * torch.sigmoid(b)
    doubled = torch.cat([2 * x[:, :4], x[:, 4:]], dim=1)
    if layout == "channels_last":
        doubled = doubled.contiguous(memory_format=torch.channels_last)
    out = _gate(doubled)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def reference_gated_forward(model: GatedPixelCNN, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """The gated PixelCNN written out plainly from its parameters: tanh * sigmoid gates, every convolution
    with its own weights, one skip convolution per layer (no folding, no stacking)."""
    import torch.nn.functional as F

    def gate(pre):
        a, b = pre.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    v = h = x
    skips = 0.0
    for layer in model.layers:
        k2 = layer.k2
        v_bias = h_bias = 0.0
        if cond is not None:
            v_bias, h_bias = layer.cond(cond)[:, :, None, None].chunk(2, dim=1)
        pre_v = layer.vertical(F.pad(v, (k2, k2, k2, 0)))[:, :, : v.shape[-2]]
        v_to_h = layer.vertical_to_horizontal(pre_v)
        v = gate(pre_v + v_bias)
        pre_h = layer.horizontal(F.pad(h, (k2, 0, 0, 0)))[..., : h.shape[-1]]
        gated_h = gate(pre_h + v_to_h + h_bias)
        out = layer.horizontal_out(gated_h)
        h = out if layer.first else h + out
        skips = skips + layer.skip(gated_h)
    return model.head(skips)


@pytest.mark.parametrize("cond_dim", [0, 3])
def test_gated_forward_equals_the_plainly_written_network(cond_dim):
    """Folding the gate's factor 2 into the weights and stacking the skip convolutions leave the function
    as written in the gated PixelCNN paper: the same logits and gradients as the plain reference, and the
    state dict holds only the parameters (checkpoints from before the folding load)."""
    torch.manual_seed(0)
    model = gated(cond_dim=cond_dim, hidden=6).double()
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64)
    cond = torch.rand(2, cond_dim, dtype=torch.float64) if cond_dim else None
    out = model.forward_onehot(x, cond)
    ref = reference_gated_forward(model, x, cond)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(ref)
    # (the last layer's horizontal output feeds nothing: no gradient for it in either)
    grads = torch.autograd.grad((out * weights).sum(), list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(model.parameters()), allow_unused=True)
    assert [g is None for g in grads] == [r is None for r in ref_grads]
    for g, r in zip(grads, ref_grads):
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    assert not any("gate_scale" in key for key in model.state_dict())
