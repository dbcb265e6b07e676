"""GPTQ rounding (compressdit.quant.gptq) against round-to-nearest on a fixed seed."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant.fp_weights import quantize_weight_fp
from compressdit.quant.gptq import IntColumnQuantizer, gptq_quantize, gptq_quantize_fp, gptq_quantize_int
from compressdit.quant.minifloat import MINIFLOATS
from compressdit.quant.primitives import dequantize_weight, quantize_weight_rtn

OUT, IN, TOKENS = 48, 256, 1024


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Uneven rows; correlated inputs with a few outlier channels, as DiT activations have."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT, IN, generator=gen) * (1 + torch.rand(OUT, 1, generator=gen) * 3)
    mix = torch.randn(IN, IN, generator=gen) / IN ** 0.5
    x = torch.randn(TOKENS, IN, generator=gen) @ mix + 0.3 * torch.randn(TOKENS, IN, generator=gen)
    return weight, x * (1 + 5 * (torch.rand(IN, generator=gen) > 0.95))


def _output_error(x: torch.Tensor, weight: torch.Tensor, q) -> float:
    return float((x @ (weight - dequantize_weight(q.codes, q.scale, q.zero)).T).norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_never_increases_layer_output_error(bits, group_size, symmetric):
    weight, x = _layer()
    hessian = 2 * x.T @ x / len(x)
    rtn = quantize_weight_rtn(weight, bits, group_size, symmetric)
    errors = {}
    for act_order in (False, True):
        q = gptq_quantize_int(weight, hessian, bits, group_size, symmetric, act_order=act_order)
        assert q.codes.dtype == torch.int8 and q.scale.shape == rtn.scale.shape
        assert (q.zero is None) == symmetric
        errors[act_order] = _output_error(x, weight, q)
    assert errors[False] <= _output_error(x, weight, rtn)
    assert errors[True] <= 0.8 * _output_error(x, weight, rtn)  # act-order: the paper's large gain


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weight_range", ["minmax", "mse"])
def test_identity_hessian_gives_round_to_nearest_exactly(group_size, symmetric, weight_range):
    weight, _ = _layer(1)
    q = gptq_quantize_int(weight, 3.0 * torch.eye(IN), 3, group_size, symmetric, weight_range)
    rtn = quantize_weight_rtn(weight, 3, group_size, symmetric, weight_range)
    assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scale, rtn.scale)
    assert (q.zero is None and rtn.zero is None) or torch.equal(q.zero, rtn.zero)


@pytest.mark.parametrize("fmt", ["e2m1", "e3m0", "e1m2"])
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("weight_range", ["minmax", "mse"])
def test_minifloat_gptq_is_rtn_on_an_identity_hessian_and_never_worse_on_real_ones(fmt, group_size, weight_range):
    weight, x = _layer(2)
    element = MINIFLOATS.get(fmt)
    rtn = quantize_weight_fp(weight, element, group_size, weight_range)
    same = gptq_quantize_fp(weight, 3.0 * torch.eye(IN), element, group_size, weight_range)
    assert torch.equal(same.codes, rtn.codes) and torch.equal(same.scale, rtn.scale)
    assert same.codes.dtype == torch.uint8
    hessian = 2 * x.T @ x / len(x)

    def error(q) -> float:
        return float((x @ (weight - q.dequantized()).T).norm())

    assert error(gptq_quantize_fp(weight, hessian, element, group_size, weight_range)) <= error(rtn)
    assert error(gptq_quantize_fp(weight, hessian, element, group_size, weight_range, act_order=True)) \
        <= 0.9 * error(rtn)


def test_dead_columns_are_zeroed_and_the_rest_still_beats_rtn():
    weight, x = _layer(2)
    x[:, :40] = 0  # inputs that never fire during calibration
    hessian = 2 * x.T @ x / len(x)
    q = gptq_quantize_int(weight, hessian, 4, 32, symmetric=False)
    assert torch.isfinite(q.scale).all() and torch.isfinite(q.zero).all()
    assert (dequantize_weight(q.codes, q.scale, q.zero)[:, :32] == 0).all()  # a whole dead group: exactly zero
    assert _output_error(x, weight, q) < _output_error(x, weight, quantize_weight_rtn(weight, 4, 32, False))


def test_static_groups_and_blocks_not_aligned_with_groups():
    weight, x = _layer(3)
    hessian = 2 * x.T @ x / len(x)
    rtn = _output_error(x, weight, quantize_weight_rtn(weight, 4, 64))
    for kwargs in ({"static_groups": True}, {"block_size": 48}, {"block_size": 256}):
        assert _output_error(x, weight, gptq_quantize_int(weight, hessian, 4, 64, **kwargs)) < rtn


def test_generic_quantizer_returns_codes_in_original_column_order():
    weight, x = _layer(4)
    hessian = 2 * x.T @ x / len(x)
    codes, params = gptq_quantize(weight, hessian, IntColumnQuantizer(4), group_size=64, act_order=True)
    assert codes.shape == weight.shape and len(params) == IN // 64
    # codes in range and each dequantized column close to the weight (error spread, not accumulated)
    assert codes.min() >= -8 and codes.max() <= 7
    scale = torch.stack([p[0] for p in params], 1).repeat_interleave(64, 1)
    assert (codes * scale - weight).abs().max() < 4 * scale.max()


@pytest.mark.parametrize("bad, message", [
    ({"hessian": torch.eye(IN - 1)}, "does not match in_features"),
    ({"group_size": 48 + 1}, "not divisible by group_size"),
    ({"hessian": torch.full((IN, IN), float("nan"))}, "NaN or inf"),
    ({"hessian": -torch.eye(IN)}, "not positive definite"),
])
def test_bad_inputs_are_one_line_errors(bad, message):
    weight, _ = _layer()
    kwargs = {"hessian": torch.eye(IN), "group_size": 32, **bad}
    with pytest.raises(ValueError, match=message) as info:
        gptq_quantize_int(weight, kwargs["hessian"], 4, kwargs["group_size"])
    assert "\n" not in str(info.value)


def test_the_caller_s_hessian_is_left_alone_and_damping_touches_the_diagonal_only():
    """The factorisation works on private copies damped in place: the same factor as the textbook
    ``cholesky(cholesky_inverse(cholesky(H + damp * mean(diag H) * I)), upper)``, bit for bit."""
    from compressdit.quant.gptq import DAMP, _upper_inverse_factor

    weight, x = _layer(4)
    x[:, :8] = 0
    hessian = 2 * x.T @ x / len(x)
    before = hessian.clone()
    for act_order in (False, True):
        gptq_quantize_int(weight, hessian, 4, 32, act_order=act_order)
    assert torch.equal(hessian, before)
    spd = hessian + torch.diag((hessian.diagonal() == 0).float())
    textbook = torch.linalg.cholesky(spd + DAMP * spd.diagonal().mean() * torch.eye(IN))
    textbook = torch.linalg.cholesky(torch.cholesky_inverse(textbook), upper=True)
    assert torch.equal(_upper_inverse_factor(lambda: spd.mT.contiguous().mT, DAMP), textbook)


def test_a_hessian_that_needs_more_damping_gets_a_fresh_copy_each_attempt():
    """An indefinite ``H`` whose last pivot fails: each failed attempt leaves its copy factored up to there, so
    every retry must start from a new one; the result is the textbook factor at 100x damping."""
    from compressdit.quant.gptq import DAMP, _upper_inverse_factor

    gen = torch.Generator().manual_seed(3)
    r = torch.randn(64, 64, generator=gen)
    spd = torch.eye(64) + 0.1 * r @ r.T / 64
    spd[-1, :] = spd[:, -1] = 0.0
    spd[-1, -1] = -0.5  # indefinite until the damping (x 1, 10, 100 of DAMP * mean diag ~ 1.1) beats it
    copies = []

    def private():
        copies.append(spd.mT.contiguous().mT)  # column-major
        return copies[-1]

    factor = _upper_inverse_factor(private, DAMP)
    assert len(copies) == 3
    assert not torch.equal(copies[0], spd)  # worked on in place
    damped = spd.clone()
    damped.diagonal().add_((DAMP * 10 ** 2) * damped.diagonal().mean())
    textbook = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert torch.equal(factor, textbook)
    assert factor.stride() == (1, 64) and factor.data_ptr() == copies[-1].data_ptr()  # no second [in, in] buffer
