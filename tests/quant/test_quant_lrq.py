"""LRQ-DiT on a tiny DiT through the calibrate + quantize stages: ARS choices from J, the output-error search,
every rotated layer's function preserved, strict config errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from compressdit.errors import CalibrationError, ConfigError
from compressdit.io.sources import ModelSource
from compressdit.models import adapter_for
from compressdit.quant.lrq import activation_fluctuation
from compressdit.quant.transform import quantized_modules
from compressdit.quant.twinlog_layer import TwinLogLinear
from compressdit.stages import STAGES
from compressdit.stages.base import PipelineState
from tests.conftest import tiny_dit
from tests.io.test_diffusers_quantizer import _dit_inputs


def _state(model: nn.Module) -> PipelineState:
    adapter = adapter_for(model)
    source = ModelSource("tiny", Path("."), model, scheduler=adapter.scheduler(model))
    return PipelineState(source=source, adapter=adapter, model=model, workdir=Path("."), reference_spec="tiny",
                         quiet=True)


RULES = [{"match": "role:embedder", "spec": None}, {"match": "role:head", "spec": None},
         {"match": "re:.*", "spec": {"format": "twinlog", "w_bits": 4, "a_bits": 8, "balance": 0.5}}]


def _calibrated(model: nn.Module) -> PipelineState:
    state = _state(model)
    STAGES.get("calibrate").run(state, STAGES.get("calibrate").parse({"samples": 4, "steps": 3}, "calibrate"))
    return state


def _quantize(state: PipelineState, **options) -> PipelineState:
    quantize = STAGES.get("quantize")
    quantize.run(state, quantize.parse({"method": "lrq", "rules": RULES, **options}, "quantize"))
    return state


@pytest.fixture(scope="module")
def lrq_dit():
    float_model = tiny_dit()
    state = _calibrated(copy.deepcopy(float_model))
    j = sorted(activation_fluctuation(m) for n, m in state.calibration.meansq.items()
               if n.startswith("transformer_blocks"))
    threshold = j[len(j) // 2]  # the median: the tiny model gets both rotations
    return float_model, state.model, _quantize(state, ars={"threshold": threshold}), threshold


def test_fluctuation_is_the_largest_per_step_rms():
    meansq = torch.tensor([[1.0, 3.0], [4.0, 12.0]])  # RMS 1.414 then 2.828
    assert activation_fluctuation(meansq) == pytest.approx(8.0 ** 0.5)


def test_ars_picks_duquant_from_the_threshold_on(lrq_dit):
    _, model, state, threshold = lrq_dit
    table = next(t for t in state.tables if t["title"].startswith("lrq"))
    assert table["rows"] and {row[2] for row in table["rows"]} <= {"hadamard", "duquant"}
    for name, j, rotation, error in table["rows"]:
        j_exact = activation_fluctuation(state.calibration.meansq[name])
        assert j == pytest.approx(j_exact, abs=1e-4)
        assert rotation == ("duquant" if j_exact >= threshold else "hadamard")
        assert quantized_modules(model)[name].spec.rotation == rotation
        assert 0 <= error < 0.2
    assert {row[2] for row in table["rows"]} == {"hadamard", "duquant"}  # the tiny model has both kinds


def test_every_rotated_layer_preserves_its_function_before_quantization(lrq_dit):
    float_model, model, _, _ = lrq_dit
    for name, layer in quantized_modules(model).items():
        assert isinstance(layer, TwinLogLinear)
        linear = float_model.get_submodule(name)
        x_in = torch.randn(6, 5, linear.in_features) * 3
        folded = layer.rotate(linear.weight.detach() * layer.smooth_scale)
        out = nn.functional.linear(layer.transform_input(x_in), folded, linear.bias)
        assert torch.allclose(out, linear(x_in), atol=1e-4, rtol=1e-4), name


def test_quantized_model_tracks_the_float_model(lrq_dit):
    float_model, model, _, _ = lrq_dit
    with torch.no_grad():
        ref = float_model(**_dit_inputs(), return_dict=False)[0]
        out = model(**_dit_inputs(), return_dict=False)[0]
    assert float((out - ref).norm() / ref.norm()) < 0.3


def test_needs_a_calibrate_stage():
    with pytest.raises(CalibrationError, match="calibrate"):
        _quantize(_state(tiny_dit()))


@pytest.mark.parametrize("options,message", [
    ({"rules": [{"match": "re:.*", "spec": {"format": "twinlog", "w_bits": 4, "rotation": "hadamard"}}]},
     "ARS picks each twinlog layer's rotation"),
    ({"ars": {"threshold": -1}}, "threshold: must be positive"),
    ({"search": "hessian"}, "search"),
    ({"rules": []}, "at least one rule"),
    ({"ars": {"thresh": 1}}, "unknown key 'thresh'"),
])
def test_bad_configs_are_one_line_errors(options, message):
    quantize = STAGES.get("quantize")
    with pytest.raises(ConfigError, match=message) as info:
        quantize.parse({"method": "lrq", "rules": RULES, **options}, "quantize")
    assert "\n" not in str(info.value)
