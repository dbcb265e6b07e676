"""Scale-aware AdaRound for minifloat weights (compressdit.quant.adaround)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.quant.adaround import (GAMMA, ZETA, AdaRoundSettings, SoftRoundedLinear, reconstruct_block,
                                        relative_error, swapped)
from compressdit.quant.fp_weights import quantize_weight_fp
from compressdit.quant.minifloat import MINIFLOATS
from compressdit.quant.spec import LinearQuantSpec


def _spec(fmt: str = "e2m1", **extra) -> LinearQuantSpec:
    return LinearQuantSpec.from_dict({"format": fmt, "w_bits": 4, "group_size": 32, "rounding": "adaround",
                                      **extra}, "spec")


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.mul_(1 + torch.rand(48, 1) * 4)
    return linear


def _inputs(seed: int = 1, calls: int = 8) -> list[torch.Tensor]:
    """Correlated inputs with uneven channels, as in a DiT; one distribution, ``seed`` draws from it."""
    mix = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) / 8 + torch.eye(64)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 64, generator=gen) @ mix * torch.linspace(0.2, 3, 64) for _ in range(calls)]


@pytest.mark.parametrize("fmt", ["e2m1", "e3m0", "e1m2"])
def test_soft_weight_starts_at_the_float_weight_and_hard_at_round_to_nearest(fmt):
    linear = _linear()
    soft = SoftRoundedLinear(linear, _spec(fmt))
    torch.testing.assert_close(soft.weight(), linear.weight.detach(), rtol=1e-4, atol=1e-5)
    soft.mode = "hard"
    rtn = quantize_weight_fp(linear.weight.detach(), MINIFLOATS.get(fmt), 32).dequantized()
    assert (soft.weight() == rtn).float().mean() > 0.99  # differ only on exact ties (round half to even)
    assert torch.equal(soft.hard_quantized().dequantized(), soft.weight())


def test_scale_aware_gradient_does_not_depend_on_the_bin_width():
    """E2M1 bins are 0.5 wide near zero and 1 wide at 3..4: d w_soft / d V is s * h'(0) in both."""
    linear = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.3, 3.4, 6.0]]))  # scale 1; 6.0 sits on the grid (no choice)
    soft = SoftRoundedLinear(linear, LinearQuantSpec.from_dict({"format": "e2m1", "w_bits": 4}, "spec"))
    assert soft.width.tolist() == [[0.5, 1.0, 0.0]]
    with torch.no_grad():
        soft.v.zero_()
    soft.weight().sum().backward()
    slope = 0.25 * (ZETA - GAMMA)  # sigmoid'(0) = 1/4, scale 1
    torch.testing.assert_close(soft.v.grad, torch.tensor([[slope, slope, 0.0]]))


@pytest.mark.parametrize("fmt, a_format, a_bits, bound", [("e2m1", "e4m3", 8, 0.93), ("e3m0", None, None, 0.98),
                                                         ("e1m2", "e3m2", 6, 0.9)])
def test_adaround_lowers_layer_output_error_below_round_to_nearest(fmt, a_format, a_bits, bound):
    """Fixed seed; E3M0's coarse grid (bins double each step) leaves AdaRound least room."""
    linear = _linear()
    extra = {} if a_bits is None else {"a_bits": a_bits, "a_format": a_format}
    block = nn.Sequential(linear)
    calls = [((x,), {}) for x in _inputs()]
    with torch.no_grad():
        targets = [block(x) for (x,), _ in calls]
    settings = AdaRoundSettings(iters=300, seed=0)
    codes, stats = reconstruct_block(block, {"0": _spec(fmt, **extra)}, calls, targets, settings)
    assert block[0] is linear and linear.weight.requires_grad  # restored, trainable flag kept
    assert stats["kept"] and stats["adaround_error"] < bound * stats["rtn_error"]
    # measured independently on held-out inputs: the learned rounding generalises
    held_out = _inputs(seed=7)
    rtn = quantize_weight_fp(linear.weight.detach(), MINIFLOATS.get(fmt), 32).dequantized()
    errors = {name: sum(relative_error(x @ w.T, x @ linear.weight.detach().T) for x in held_out).item()
              for name, w in (("rtn", rtn), ("adaround", codes["0"].dequantized()))}
    assert errors["adaround"] < errors["rtn"]


def test_round_to_nearest_is_kept_where_the_learned_rounding_is_worse():
    linear = _linear()
    block = nn.Sequential(linear)
    calls = [((x,), {}) for x in _inputs(calls=2)]
    with torch.no_grad():
        targets = [block(x) for (x,), _ in calls]
    settings = AdaRoundSettings(iters=3, lr=50.0, warmup=0.0, reg_weight=0.0, seed=0)  # steps far past the optimum
    codes, stats = reconstruct_block(block, {"0": _spec()}, calls, targets, settings)
    assert not stats["kept"] and stats["adaround_error"] > stats["rtn_error"]
    rtn = quantize_weight_fp(linear.weight.detach(), MINIFLOATS.get("e2m1"), 32)
    assert torch.equal(codes["0"].codes, rtn.codes)


def test_swapped_restores_modules_and_trainable_flags_after_an_error():
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    original = block[0]
    with pytest.raises(RuntimeError, match="boom"):
        with swapped(block, {"0": nn.Identity()}):
            assert isinstance(block[0], nn.Identity) and not any(p.requires_grad for p in block.parameters())
            raise RuntimeError("boom")
    assert block[0] is original and original.weight.requires_grad


@pytest.mark.parametrize("bad, message", [({"iters": 0}, "iters: must be positive"),
                                          ({"warmup": 1.0}, "warmup"), ({"reg_weight": -1}, "reg_weight"),
                                          ({"steps": 3}, "unknown key 'steps'")])
def test_bad_settings_are_one_line_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message) as info:
        AdaRoundSettings.from_dict(bad, "quantize.adaround")
    assert "\n" not in str(info.value)
