"""Tests for compressdit.quant.primitives: RTN quantization, bit packing, activation fake-quant."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant import primitives
from compressdit.quant.primitives import (MAX_BITS, MIN_BITS, _mse_shrink, _round_grouped, check_bits,
                                          dequantize_weight, fake_quantize_activation, int_range, pack_codes,
                                          packed_shape, quantize_weight_rtn, unpack_codes)

ALL_BITS = list(range(MIN_BITS, MAX_BITS + 1))


def _uneven_weight(rows: int = 12, cols: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows with very different magnitudes and a few outliers, so per-row/group scales really differ."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-2, 1, rows).unsqueeze(1)
    w[0, 3] = 25.0
    w[1] = w[1].abs()          # all positive row: asymmetric zero point at the range's edge
    w[2] = -w[2].abs()         # all negative row
    return w


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_unpack_round_trip_every_bit_width(bits):
    qmin, qmax = int_range(bits)
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(qmin, qmax + 1, (6, 32), generator=gen, dtype=torch.int64).to(torch.int8)
    codes[0, :2] = torch.tensor([qmin, qmax], dtype=torch.int8)  # the range's ends must survive
    packed = pack_codes(codes, bits)
    shape, dtype = packed_shape(6, 32, bits)
    assert tuple(packed.shape) == shape and packed.dtype == dtype
    if bits <= 2:
        assert packed.shape == (6, 8) and packed.dtype == torch.uint8
    elif bits <= 4:
        assert packed.shape == (6, 16) and packed.dtype == torch.uint8
    else:
        assert packed.shape == (6, 32) and packed.dtype == torch.int8
    unpacked = unpack_codes(packed, bits, 32)
    assert unpacked.dtype == torch.int8
    assert torch.equal(unpacked, codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_rejects_columns_that_do_not_fill_bytes(bits):
    codes = torch.zeros(2, 6 if bits == 2 else 5, dtype=torch.int8)
    with pytest.raises(ValueError, match="cannot pack"):
        pack_codes(codes, bits)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [None, 16], ids=["per_channel", "g16"])
def test_quantize_dequantize_error_is_at_most_half_a_step(bits, symmetric, group_size):
    w = _uneven_weight()
    q = quantize_weight_rtn(w, bits, group_size, symmetric)
    groups = 1 if group_size is None else w.shape[1] // group_size
    qmin, qmax = int_range(bits)
    assert q.codes.dtype == torch.int8 and q.codes.shape == w.shape
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    assert q.scale.dtype == torch.float32 and q.scale.shape == (w.shape[0], groups)
    assert (q.zero is None) == symmetric
    if not symmetric:
        assert q.zero.shape == (w.shape[0], groups)
    deq = dequantize_weight(q.codes, q.scale, q.zero)
    step = q.scale.repeat_interleave(w.shape[1] // groups, dim=1)
    err = (deq - w).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all(), f"max error/step {float((err / step).max()):.4f}"
    # grouping must matter: a 25.0 outlier only coarsens its own group's step
    if group_size is not None:
        assert q.scale[0, 0] > 4 * q.scale[0, 1]


def test_dequantize_respects_requested_dtype():
    q = quantize_weight_rtn(_uneven_weight(), 8)
    assert dequantize_weight(q.codes, q.scale, q.zero, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4, True, 4.0, "8"])
def test_bits_out_of_range_raise(bits):
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        check_bits(bits)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        quantize_weight_rtn(_uneven_weight(), bits)


@pytest.mark.parametrize("bits", [1, 9])
def test_packing_and_activation_quant_reject_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        pack_codes(torch.zeros(2, 8, dtype=torch.int8), bits)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        unpack_codes(torch.zeros(2, 8, dtype=torch.uint8), bits, 8)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):  # bits=1 used to divide by qmax=0 and return NaN
        fake_quantize_activation(torch.randn(2, 8), bits, "per_token")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_raise(bad):
    w = _uneven_weight()
    w[3, 7] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight_rtn(w, 8)


def test_group_size_must_divide_columns():
    with pytest.raises(ValueError, match="not divisible by group_size 24"):
        quantize_weight_rtn(_uneven_weight(), 4, group_size=24)


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_activation_maps_each_tokens_max_to_qmax(bits):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=gen) * torch.logspace(-3, 2, 5).reshape(1, 5, 1)  # wildly uneven tokens
    out = fake_quantize_activation(x, bits, "per_token")
    qmax = int_range(bits)[1]
    scale = x.abs().amax(-1, keepdim=True) / qmax
    q = out / scale
    assert torch.allclose(q, q.round(), atol=1e-3), "outputs are not integer multiples of the token's step"
    assert torch.allclose(q.abs().amax(-1), torch.full((3, 5), float(qmax)), atol=1e-3)
    # each token's largest entry is reproduced (up to float rounding), so no token is crushed by another's range
    idx = x.abs().argmax(-1, keepdim=True)
    assert torch.allclose(out.gather(-1, idx), x.gather(-1, idx), rtol=1e-5)
    assert ((out - x).abs() <= scale / 2 * (1 + 1e-4)).all()


def test_per_tensor_and_static_activation_scales():
    x = torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.2, -0.3]])
    out = fake_quantize_activation(x, 8, "per_tensor")
    step = 2.0 / 127
    assert torch.allclose(out / step, (out / step).round(), atol=1e-4)
    assert float(out.abs().max()) == pytest.approx(2.0)
    # a static scale saturates values outside its range at qmin / qmax steps
    out = fake_quantize_activation(torch.tensor([0.5, 3.0, -2.0]), 8, "static", static_scale=torch.tensor(0.01))
    assert float(out[1]) == pytest.approx(1.27)          # 3.0 saturates at qmax = 127
    assert float(out[2]) == pytest.approx(-1.28)         # -2.0 saturates at qmin = -128
    assert float(out[0]) == pytest.approx(0.5)


def test_activation_fake_quant_passes_gradients_straight_through():
    x = (torch.randn(4, 16, generator=torch.Generator().manual_seed(2)) * 3).requires_grad_()
    out = fake_quantize_activation(x, 4, "per_token")
    assert not torch.equal(out.detach(), x.detach())  # it really rounds
    (out * torch.arange(16.0)).sum().backward()
    assert torch.allclose(x.grad, torch.arange(16.0).expand(4, 16), atol=1e-5)
    # with a static scale, saturated entries get no gradient, the others pass it unchanged
    x2 = torch.tensor([0.5, 5.0, -5.0, -0.25], requires_grad=True)
    fake_quantize_activation(x2, 8, "static", static_scale=torch.tensor(0.01)).sum().backward()
    assert torch.equal(x2.grad, torch.tensor([1.0, 0.0, 0.0, 1.0]))


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_dynamic_scale_never_zeroes_the_gradient_of_the_max_entry(granularity):
    # x / scale of a token's max can round to qmax + 1 ulp; a clamp there used to drop its gradient
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = fake_quantize_activation(x, 8, granularity)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert int(out.detach().div(x.detach().abs().amax(-1 if granularity == "per_token" else None, keepdim=True)
                                / 127).round().abs().max()) == 127


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, None, True), (3, 16, False), (8, None, True)])
def test_mse_range_never_loses_to_minmax_and_wins_on_gaussian_weights(bits, group_size, symmetric):
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(bits))
    errors = {}
    for weight_range in ("minmax", "mse"):
        q = quantize_weight_rtn(weight, bits, group_size, symmetric, weight_range=weight_range)
        errors[weight_range] = (dequantize_weight(q.codes, q.scale, q.zero) - weight).pow(2).sum(1)
    assert (errors["mse"] <= errors["minmax"] + 1e-6).all()  # per row: the grid contains minmax itself
    if bits < 8:
        assert errors["mse"].sum() < 0.9 * errors["minmax"].sum()


def _reference_mse_shrink(w: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """The range search as first written: every candidate quantizes the whole weight through ``_round_grouped``."""
    best_error, best = torch.full(w.shape[:-1], float("inf")), torch.ones(w.shape[:-1])
    for factor in torch.linspace(1.0, 0.5, 20).tolist():
        codes, scale, zero = _round_grouped(w, bits, symmetric, factor)
        q = codes - zero.unsqueeze(-1) if zero is not None else codes
        error = (q * scale.unsqueeze(-1) - w).pow(2).sum(-1)
        better = error < best_error
        best_error, best = torch.where(better, error, best_error), torch.where(better, factor, best)
    return best


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (3, False), (8, True)])
def test_sliced_mse_search_chooses_exactly_as_the_whole_weight_search(monkeypatch, bits, symmetric):
    """Slices of groups (a ragged last one included) pick bit-identical factors, ties (constant, zero and
    two-valued groups, where several candidates give equal errors) included."""
    gen = torch.Generator().manual_seed(bits)
    w = _uneven_weight(24, 96, seed=bits).reshape(24, 6, 16).clone()
    w[3, 0] = 0.0                      # all-zero group: every candidate's error is 0
    w[4, 1] = 0.7                      # constant group
    w[5, 2] = torch.tensor([0.5, -0.5]).repeat(8)  # two values: shrinks below the max clamp them equally
    w[6] = torch.randint(-3, 4, (6, 16), generator=gen).float() * 0.25  # on an integer grid
    monkeypatch.setattr(primitives, "MSE_CHUNK", 16 * 7)  # 7 groups a slice: 144 groups -> 20 full + 1 ragged
    assert torch.equal(_mse_shrink(w, bits, symmetric), _reference_mse_shrink(w, bits, symmetric))
    monkeypatch.setattr(primitives, "MSE_CHUNK", 1 << 20)  # one slice
    assert torch.equal(_mse_shrink(w, bits, symmetric), _reference_mse_shrink(w, bits, symmetric))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_all_finite_finds_any_nan_or_inf(dtype):
    x = torch.randn(64, 48).to(dtype)
    assert primitives.all_finite(x) and primitives.all_finite(x[:0]) and primitives.all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        if dtype == torch.float8_e4m3fn and bad != bad:
            y = x.clone().view(torch.uint8)
            y[3, 7] = 0x7F  # e4m3fn's NaN (it has no inf)
            y = y.view(dtype)
        elif dtype == torch.float8_e4m3fn:
            continue
        else:
            y = x.clone()
            y[3, 7] = bad
        assert not primitives.all_finite(y), (dtype, bad)
