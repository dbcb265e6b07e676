"""Per-layer activation format by calibration error (compressdit.quant.activation_choice)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressdit.calibration.stats import input_hooks
from compressdit.errors import ConfigError
from compressdit.quant.activation_choice import ActivationErrorRecorder, validate_activation_candidates
from compressdit.quant.activations import quantize_input
from compressdit.quant.spec import LinearQuantSpec


def _spec(fmt: str) -> LinearQuantSpec:
    spec = LinearQuantSpec(format="e2m1", w_bits=4, a_bits=6, a_format=fmt)
    spec.validate("spec")
    return spec


def _errors(x: torch.Tensor, formats: list[str]) -> tuple[list[float], torch.Tensor]:
    linear = nn.Linear(x.shape[-1], 8).requires_grad_(False)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(linear)
    with input_hooks(model, ["0"], ActivationErrorRecorder({"0": [_spec(f) for f in formats]})) as recorder:
        model(x[:50])
        model(x[50:])
    return recorder.relative("0"), linear.weight


def test_recorder_accumulates_the_relative_layer_output_error_over_calls():
    x = torch.randn(2, 60, 32, generator=torch.Generator().manual_seed(0)).reshape(120, 32)
    errors, weight = _errors(x, ["e3m2", "e2m3", "int"])
    for error, fmt in zip(errors, ["e3m2", "e2m3", "int"]):
        expected = ((quantize_input(x, _spec(fmt)) - x) @ weight.T).square().sum() / (x @ weight.T).square().sum()
        assert error == pytest.approx(expected.item(), rel=1e-5)
    assert all(e > 0 for e in errors)


def test_mantissa_wins_on_even_inputs_and_exponent_on_heavy_tailed_ones():
    gen = torch.Generator().manual_seed(0)
    even = torch.rand(100, 64, generator=gen) * 2 - 1
    tailed = torch.randn(100, 64, generator=gen) * torch.exp(3 * torch.randn(100, 64, generator=gen))
    even_errors, _ = _errors(even, ["e3m2", "e2m3"])
    tailed_errors, _ = _errors(tailed, ["e3m2", "e2m3"])
    assert even_errors[1] < even_errors[0]
    assert tailed_errors[0] < tailed_errors[1]


@pytest.mark.parametrize("bad", [["e3m2", "e4m3"], ["e3m2", "e3m2"], ["e3m2", "nvfp4"], ["e3m2", "e9m9"]])
def test_bad_candidate_lists_are_one_line_config_errors(bad):
    with pytest.raises(ConfigError, match="distinct activation element formats of one width") as info:
        validate_activation_candidates(bad, "quantize.a_formats")
    assert "\n" not in str(info.value)


def test_int_fits_any_width():
    validate_activation_candidates(["e3m2", "e2m3", "int"], "quantize.a_formats")
