"""GPTQ on a tiny DiT through the calibrate + quantize stages (compressdit.quant.gptq_calibration), saved and
reloaded with stock diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from compressdit.errors import CalibrationError
from compressdit.evaluate.metrics import relative_error
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.io.sources import ModelSource
from compressdit.models import adapter_for
from compressdit.models.sampling import sample
from compressdit.quant.context import QuantContext
from compressdit.quant.gptq_calibration import hessian_rounded_layers
from compressdit.quant.transform import quantized_modules, resolve_plan
from compressdit.stages import STAGES
from compressdit.stages.base import PipelineState
from tests.conftest import tiny_dit
from tests.io.test_diffusers_quantizer import _dit_inputs


def _state(model: nn.Module) -> PipelineState:
    adapter = adapter_for(model)
    source = ModelSource("tiny", Path("."), model, scheduler=adapter.scheduler(model))
    return PipelineState(source=source, adapter=adapter, model=model, workdir=Path("."), reference_spec="tiny",
                         quiet=True)


def _rules(rounding: str) -> list:
    return [{"match": "role:embedder", "spec": None}, {"match": "role:head", "spec": None},
            {"match": "role:attn_qkv", "spec": {"w_bits": 3, "group_size": 32, "w_symmetric": False,
                                                "rounding": rounding}},
            {"match": "re:.*", "spec": {"w_bits": 3, "a_bits": 8, "rounding": rounding}}]


def _run_stages(model: nn.Module, rounding: str, calibrate: bool = True) -> PipelineState:
    state = _state(model)
    if calibrate:
        STAGES.get("calibrate").run(state, STAGES.get("calibrate").parse({"samples": 4, "steps": 3}, "calibrate"))
    quantize = STAGES.get("quantize")
    quantize.run(state, quantize.parse({"method": "rtn", "rules": _rules(rounding)}, "quantize"))
    return state


@torch.no_grad()
def _run(model: nn.Module) -> torch.Tensor:
    return model(**_dit_inputs(), return_dict=False)[0].float()


@pytest.fixture(scope="module")
def gptq_dit(tmp_path_factory):
    model = tiny_dit()
    state = _run_stages(model, "gptq")
    attach_quantizer(model, state.quant_specs)
    folder = tmp_path_factory.mktemp("gptq") / "model"
    model.save_pretrained(folder)
    return folder, model, state


def test_gptq_dit_reloads_through_stock_from_pretrained_with_identical_outputs(gptq_dit):
    folder, model, state = gptq_dit
    assert state.quant_specs and all(s.rounding == "gptq" for s in state.quant_specs.values())
    assert any(note.startswith("gptq: ") for note in state.notes)
    loaded = DiTTransformer2DModel.from_pretrained(folder)
    assert set(quantized_modules(loaded)) == set(state.quant_specs)
    for name, module in quantized_modules(loaded).items():
        assert module.spec == state.quant_specs[name]
    assert torch.equal(_run(loaded), _run(model))


def test_gptq_dit_samples_closer_to_full_precision_than_rtn(gptq_dit):
    """Held-out seed and classes, same sampler: GPTQ's trajectory stays nearer the float model's than RTN's.

    (On inputs unlike any calibration step, e.g. pure noise at t=10, GPTQ's fit to the calibration Hessians of
    the conditioning layers can be worse than RTN: calibrate on the sampler the model is used with.)"""
    def final(model):
        adapter = adapter_for(model)
        return sample(adapter, model, [3, 5, 1, 8], adapter.scheduler(model), steps=3, guidance=4.0, seed=99)

    reference = final(tiny_dit())
    rtn = relative_error(final(_run_stages(tiny_dit(), "rtn").model), reference)
    gptq = relative_error(final(gptq_dit[1]), reference)
    assert 1e-4 < gptq < 0.7 * rtn


def test_chunking_does_not_change_the_result(gptq_dit):
    model = tiny_dit()
    state = _state(model)
    STAGES.get("calibrate").run(state, STAGES.get("calibrate").parse({"samples": 4, "steps": 3}, "calibrate"))
    ctx = QuantContext(adapter=state.adapter, calibration=state.calibration, scheduler=state.source.scheduler,
                       conditions=state.calibration_conditions, quiet=True, calibration_config=state.calibration_config)
    quantize = STAGES.get("quantize").parse({"method": "rtn", "rules": _rules("gptq")}, "quantize")
    plan = resolve_plan(model, state.adapter, quantize.options.rules)
    one_at_a_time = hessian_rounded_layers(model, plan, ctx, budget_bytes=1)
    assert ctx.notes[-1].endswith("s)") and f"({len(one_at_a_time)} sampling passes" in ctx.notes[-1]
    expected = quantized_modules(gptq_dit[1])
    assert set(one_at_a_time) == set(expected)
    for name, module in one_at_a_time.items():
        assert torch.equal(module.weight, expected[name].weight), name
        assert torch.equal(module.weight_scale, expected[name].weight_scale), name


def test_gptq_without_a_calibrate_stage_is_a_calibration_error():
    model = tiny_dit(layers=1)
    with pytest.raises(CalibrationError, match="needs a calibrate stage before quantize"):
        _run_stages(model, "gptq", calibrate=False)
    assert not quantized_modules(model)
    ctx = QuantContext(adapter=adapter_for(model), quiet=True)
    plan = resolve_plan(model, ctx.adapter, STAGES.get("quantize").parse(
        {"method": "rtn", "rules": _rules("gptq")}, "quantize").options.rules)
    with pytest.raises(CalibrationError, match=r"rounding 'gptq' \(.* more layers\) needs calibration inputs"):
        hessian_rounded_layers(model, plan, ctx)
