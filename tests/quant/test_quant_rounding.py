"""``spec.rounding`` (compressdit.quant.rounding): validation, and GPTQ inside QuantLinear with balancing/rotation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.quant.layers import QuantLinear
from compressdit.quant.rotation import rotate
from compressdit.quant.rounding import ROUNDINGS, transformed_hessian
from compressdit.quant.spec import LinearQuantSpec

IN, OUT = 128, 40


def _layer_and_inputs(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT)
    mix = torch.randn(IN, IN) / IN ** 0.5
    x = (torch.randn(512, IN) @ mix + 0.2 * torch.randn(512, IN)) * (1 + 8 * (torch.rand(IN) > 0.95))
    return linear, x


def _error(q: nn.Module, linear: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((q(x) - linear(x)).norm())


@pytest.mark.parametrize("data, message", [
    ({"format": "vq", "w_bits": 2, "rounding": "gptq"}, r"spec\.rounding: format 'vq' supports rounding rtn, not 'gptq'"),
    ({"format": "fp8", "rounding": "gptq"}, r"spec\.rounding: format 'fp8' supports rounding rtn, not 'gptq'"),
    ({"w_bits": 4, "rounding": "adaround"}, r"spec\.rounding: format 'int' supports rounding rtn / gptq, not 'adaround'"),
    ({"w_bits": 4, "rounding": "brecq"}, r"spec\.rounding: 'brecq' is not one of \['rtn', 'gptq', 'adaround'\]"),
    ({"w_bits": 4, "act_order": True}, r"spec\.act_order: only applies to rounding: gptq"),
])
def test_bad_rounding_specs_are_one_line_config_errors(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        LinearQuantSpec.from_dict(data, "spec")
    assert "\n" not in str(info.value)


def test_gptq_spec_round_trips_and_labels():
    spec = LinearQuantSpec.from_dict({"w_bits": 4, "group_size": 32, "rounding": "gptq", "act_order": True}, "spec")
    assert LinearQuantSpec.from_dict(spec.to_dict(), "again") == spec
    assert spec.label == "int W4A16 g32 +gptq +act-order"
    assert LinearQuantSpec().rounding == "rtn" and not ROUNDINGS.get("rtn").needs_hessian
    assert ROUNDINGS.get("gptq").needs_hessian


def test_transformed_hessian_is_the_hessian_of_balanced_rotated_inputs():
    _, x = _layer_and_inputs()
    scale = torch.rand(IN) + 0.5
    signs = (torch.randint(0, 2, (IN,)) * 2 - 1).to(torch.int8)
    moved = rotate(x / scale, signs)
    torch.testing.assert_close(transformed_hessian(x.T @ x, scale, signs), moved.T @ moved, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("extras", [{}, {"balance": 0.5}, {"rotation": "hadamard"},
                                    {"balance": 0.3, "rotation": "hadamard", "w_symmetric": False}])
def test_gptq_layer_beats_rtn_with_balancing_and_rotation_folded_in(extras):
    linear, x = _layer_and_inputs()
    absmax = x.abs().amax(0)
    hessian = 2 * x.T @ x / len(x)
    base = {"w_bits": 3, "group_size": 32, **extras}
    rtn = QuantLinear.from_linear(linear, LinearQuantSpec(**base), input_absmax=absmax)
    gptq = QuantLinear.from_linear(linear, LinearQuantSpec(**base, rounding="gptq"), input_absmax=absmax,
                                   hessian=hessian)
    assert _error(gptq, linear, x) < 0.9 * _error(rtn, linear, x)
    if "rotation" in extras:
        assert torch.equal(gptq.rotation_signs, rtn.rotation_signs)
    if "balance" in extras:
        assert torch.equal(gptq.smooth_scale, rtn.smooth_scale)


def test_gptq_without_a_hessian_says_to_calibrate():
    linear, _ = _layer_and_inputs()
    with pytest.raises(ValueError, match="needs the layer's input Hessian from calibration"):
        QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=4, rounding="gptq"))
