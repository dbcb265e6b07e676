"""FP4DiT on a tiny DiT (compressdit.quant.fp4dit): per-layer format by output error, AdaRound, reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from compressdit.errors import CalibrationError, ConfigError
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.io.sources import ModelSource
from compressdit.models import adapter_for
from compressdit.quant.fp4dit import FP4DiTConfig, output_error
from compressdit.quant.transform import quantized_modules
from compressdit.stages import STAGES
from compressdit.stages.base import PipelineState
from tests.conftest import tiny_dit
from tests.io.test_diffusers_quantizer import _dit_inputs

LOG_LAYER, UNIFORM_LAYER = "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.attn1.to_v"


def _rules(rounding: str = "adaround", a_bits: int = 8, a_format: str = "e4m3") -> list:
    return [{"match": "role:embedder", "spec": None}, {"match": "role:head", "spec": None},
            {"match": "re:.*", "spec": {"format": "e2m1", "w_bits": 4, "group_size": 32, "rounding": rounding,
                                        "a_bits": a_bits, "a_format": a_format}}]


def _model() -> nn.Module:
    """A tiny DiT with one layer of small weights plus one outlier per group of 32 (E3M0's wide range wins) and one
    of uniform weights (E1M2's even grid wins)."""
    model = tiny_dit()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w = model.get_submodule(LOG_LAYER).weight
        w.copy_(torch.randn(w.shape, generator=gen) * 0.003)
        w[:, ::32] = 0.1
        w = model.get_submodule(UNIFORM_LAYER).weight
        w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1) * 0.1)
    return model


def _quantize(model: nn.Module, calibrate: bool = True, **options) -> PipelineState:
    adapter = adapter_for(model)
    source = ModelSource("tiny", Path("."), model, scheduler=adapter.scheduler(model))
    state = PipelineState(source=source, adapter=adapter, model=model, workdir=Path("."), reference_spec="tiny",
                          quiet=True)
    if calibrate:
        STAGES.get("calibrate").run(state, STAGES.get("calibrate").parse({"samples": 4, "steps": 3}, "calibrate"))
    quantize = STAGES.get("quantize")
    config = {"method": "fp4dit", "rules": _rules(), "adaround": {"iters": 20, "batch_size": 2}, **options}
    quantize.run(state, quantize.parse(config, "quantize"))
    return state


@pytest.fixture(scope="module")
def fp4dit_dit(tmp_path_factory):
    model = _model()
    reference = _model()
    state = _quantize(model)
    attach_quantizer(model, state.quant_specs)
    folder = tmp_path_factory.mktemp("fp4dit") / "model"
    model.save_pretrained(folder)
    return folder, model, reference, state


def test_output_error_is_the_measured_relative_layer_output_error():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(200, 16, generator=gen), torch.randn(8, 16, generator=gen)
    w_q = w + 0.1 * torch.randn(8, 16, generator=gen)
    measured = ((x @ (w_q - w).T).square().sum() / (x @ w.T).square().sum()).item()
    assert output_error(w, w_q, 2 * x.T @ x / len(x)) == pytest.approx(measured, rel=1e-4)


def test_each_layer_takes_the_format_with_the_lowest_measured_error(fp4dit_dit):
    _, _, _, state = fp4dit_dit
    specs = state.quant_specs
    assert specs[LOG_LAYER].format == "e3m0" and specs[UNIFORM_LAYER].format == "e1m2"
    table = next(t for t in state.tables if t["title"].startswith("fp4dit:"))
    assert table["header"] == ["module", "role", "e2m1", "e3m0", "e1m2", "chosen"]
    for name, role, *errors, chosen in table["rows"]:
        assert specs[name].format == chosen == ["e2m1", "e3m0", "e1m2"][errors.index(min(errors))]
    note = next(n for n in state.notes if n.startswith("fp4dit formats chosen by layer-output error: "))
    assert "ffn_up: e1m2 x1, e3m0 x1" in note or "ffn_up: e2m1 x1, e3m0 x1" in note or "ffn_up: e3m0 x2" in note
    assert all(s.rounding == "adaround" for s in specs.values())
    assert any(note.startswith("adaround: ") for note in state.notes)


def test_fp4dit_checkpoint_reloads_through_stock_from_pretrained_and_stays_close(fp4dit_dit):
    folder, model, reference, state = fp4dit_dit
    import compressdit  # noqa: F401
    loaded = DiTTransformer2DModel.from_pretrained(folder)
    assert {n: m.spec.format for n, m in quantized_modules(loaded).items()} == \
        {n: s.format for n, s in state.quant_specs.items()}
    with torch.no_grad():
        out, expected = loaded(**_dit_inputs(), return_dict=False)[0], model(**_dit_inputs(), return_dict=False)[0]
        truth = reference(**_dit_inputs(), return_dict=False)[0]
    assert torch.equal(out, expected)
    assert 0 < ((out - truth).norm() / truth.norm()).item() < 0.5


def test_each_layer_takes_the_activation_format_with_the_lowest_measured_error(tmp_path):
    model = _model()
    state = _quantize(model, rules=_rules("rtn", a_bits=6, a_format="e3m2"), a_formats=["e3m2", "e2m3"])
    specs = state.quant_specs
    table = next(t for t in state.tables if t["title"].startswith("fp4dit: relative layer-output error of each "
                                                                  "activation format"))
    assert table["header"] == ["module", "role", "e3m2", "e2m3", "chosen"]
    assert {row[0] for row in table["rows"]} == set(specs)
    for name, role, e3m2, e2m3, chosen in table["rows"]:
        assert 0 < min(e3m2, e2m3) and specs[name].a_format == chosen == ("e3m2" if e3m2 < e2m3 else "e2m3")
        assert specs[name].a_bits == 6
    assert any(n.startswith("fp4dit activation formats chosen by layer-output error: ") for n in state.notes)
    attach_quantizer(model, state.quant_specs)
    model.save_pretrained(tmp_path)
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert {n: m.spec.a_format for n, m in quantized_modules(loaded).items()} == \
        {n: s.a_format for n, s in specs.items()}


def test_fp4dit_without_calibration_is_a_clear_error():
    with pytest.raises(CalibrationError, match="needs a calibrate stage"):
        _quantize(tiny_dit(), calibrate=False)


@pytest.mark.parametrize("bad, message", [({"formats": ["e2m1", "e4m0"]}, "formats: a list of distinct 4-bit FP"),
                                          ({"formats": []}, "formats"), ({"rules": []}, "at least one rule"),
                                          ({"adaround": {"iters": -1}}, "adaround.iters: must be positive"),
                                          ({"a_formats": ["e3m2", "e4m3"]}, "a_formats: a list of distinct"),
                                          ({"search": True}, "unknown key 'search'")])
def test_bad_fp4dit_configs_are_one_line_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message) as info:
        FP4DiTConfig.from_dict({"rules": _rules(), **bad}, "quantize")
    assert "\n" not in str(info.value)
