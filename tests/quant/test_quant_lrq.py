"""LRQ-DiT on a tiny DiT through the calibrate + quantize stages: ARS choices from J, the output-error search,
every rotated layer's function preserved, strict config errors."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from compressdit.errors import CalibrationError, ConfigError
from compressdit.io.sources import ModelSource
from compressdit.models import adapter_for
from compressdit.quant.activations import quantize_input
from compressdit.quant.lrq import activation_fluctuation
from compressdit.quant.lrq_ars import RotationErrorRecorder, capture_rotation_errors, prepare_candidates
from compressdit.quant.spec import LinearQuantSpec
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
    return float_model, state.model, _quantize(state, ars={"select": "fluctuation", "threshold": threshold}), threshold


def test_fluctuation_is_the_largest_per_step_rms():
    meansq = torch.tensor([[1.0, 3.0], [4.0, 12.0]])  # RMS 1.414 then 2.828
    assert activation_fluctuation(meansq) == pytest.approx(8.0 ** 0.5)


def test_ars_picks_duquant_from_the_threshold_on(lrq_dit):
    _, model, state, threshold = lrq_dit
    table = next(t for t in state.tables if t["title"].startswith("lrq"))
    assert table["rows"] and {row[2] for row in table["rows"]} <= {"hadamard", "duquant"}
    for name, j, rotation, _, _, error in table["rows"]:
        j_exact = activation_fluctuation(state.calibration.meansq[name])
        assert j == pytest.approx(j_exact, abs=1e-4)
        assert rotation == ("duquant" if j_exact >= threshold else "hadamard")
        assert quantized_modules(model)[name].spec.rotation == rotation
        assert 0 <= error < 0.2
    assert {row[2] for row in table["rows"]} == {"hadamard", "duquant"}  # the tiny model has both kinds


@pytest.fixture(scope="module")
def lrq_by_error():
    return _quantize(_calibrated(tiny_dit()), search="weight")  # ARS by error replays the calibration alone


def test_ars_by_error_picks_the_candidate_with_the_lower_measured_error(lrq_by_error):
    table = next(t for t in lrq_by_error.tables if t["title"].startswith("lrq"))
    assert table["header"][2:5] == ["rotation", "hadamard share", "duquant share"]
    for name, _, rotation, hadamard, duquant, error in table["rows"]:
        assert hadamard + duquant == pytest.approx(1.0, abs=1e-3) and 0 < hadamard < 1
        assert rotation == ("hadamard" if hadamard <= duquant else "duquant"), name
        assert quantized_modules(lrq_by_error.model)[name].spec.rotation == rotation
    assert "ARS by error" in " ".join(lrq_by_error.notes)


def test_ars_error_is_the_output_error_of_the_quantized_rotated_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8))
    spec = LinearQuantSpec.from_dict({"format": "twinlog", "w_bits": 4, "a_bits": 4, "balance": 0.5,
                                      "a_granularity": "per_group", "a_group_size": 16}, "spec")
    x = torch.randn(20, 32) * (torch.rand(32) * 5)
    recorder = RotationErrorRecorder()
    prepare_candidates(recorder, model[0], "0", spec, x.abs().amax(0), 16)
    with capture_rotation_errors(model, ["0"], recorder):
        model(x)
    assert model[0]._forward_pre_hooks == {}  # removed on exit
    for label in ("hadamard", "duquant"):
        layer = TwinLogLinear.from_linear(model[0], dataclasses.replace(spec, rotation=label), x.abs().amax(0),
                                          steps=16)
        rotated = layer.transform_input(x)
        folded = layer.rotate(model[0].weight.detach() * layer.smooth_scale)
        quantized = quantize_input(rotated, spec)
        expected = float(((quantized - rotated) @ folded.T).pow(2).sum())
        assert recorder.errors["0"][label] == pytest.approx(expected, rel=1e-4)
    assert recorder.best("0") == min(recorder.errors["0"], key=recorder.errors["0"].get)


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
    ({"ars": {"select": "j"}}, "select"),
    ({"ars": {"steps": 512}}, "at most 256"),
])
def test_bad_configs_are_one_line_errors(options, message):
    quantize = STAGES.get("quantize")
    with pytest.raises(ConfigError, match=message) as info:
        quantize.parse({"method": "lrq", "rules": RULES, **options}, "quantize")
    assert "\n" not in str(info.value)
