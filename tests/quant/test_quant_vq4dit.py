"""Tests for VQ4DiT: soft candidate assignment (compressdit.quant.vq_calibration) and the ``vq4dit`` method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from compressdit.errors import ConfigError
from compressdit.evaluate.metrics import relative_error
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.io.sources import ModelSource
from compressdit.models import adapter_for
from compressdit.quant.context import QuantContext
from compressdit.quant.methods import METHODS
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import quantized_modules
from compressdit.quant.vq4dit import VQ4DiTConfig
from compressdit.quant.vq_calibration import SoftVQLinear, block_output_loss, record_block_outputs
from compressdit.quant.vq_layer import VQLinear
from compressdit.recipe import load_recipe
from compressdit.stages import STAGES
from compressdit.stages.base import PipelineState
from tests.conftest import tiny_dit

SPEC = LinearQuantSpec.from_dict({"format": "vq", "w_bits": 2, "codebook_size": 16}, "spec")


def _soft(candidates: int = 2, spec: LinearQuantSpec = SPEC) -> tuple[nn.Linear, SoftVQLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    return linear, SoftVQLinear(linear, spec, candidates, seed=0, kmeans_iterations=50)


def test_initial_logits_favour_the_nearest_candidate():
    _, soft = _soft(candidates=3)
    p = soft.probabilities()
    assert soft.candidates.shape == (24, 8, 3)
    assert (p[..., 0] >= p[..., 1]).all() and (p[..., 1] >= p[..., 2]).all()
    assert torch.allclose(soft.logits[..., -1], torch.zeros(24, 8))  # log(d_n / d_n)


@pytest.mark.parametrize("row_scale", [False, True])
def test_hard_codes_of_one_hot_logits_reproduce_the_soft_weight(row_scale: bool):
    spec = LinearQuantSpec.from_dict({"format": "vq", "w_bits": 2, "codebook_size": 16, "row_scale": row_scale}, "s")
    linear, soft = _soft(spec=spec)
    assert (soft.row_scale is not None) == row_scale and 0 < soft.kmeans_error < 1
    with torch.no_grad():
        pick = torch.randint(0, 2, soft.logits.shape[:2], generator=torch.Generator().manual_seed(0))
        soft.logits.copy_(torch.nn.functional.one_hot(pick, 2) * 60.0 - 30.0)
    module = soft.to_vq_linear()
    assert isinstance(module, VQLinear) and (module.row_scale is not None) == row_scale
    assert torch.allclose(module.effective_weight(), soft.soft_weight().detach(), atol=1e-6)
    assert float(soft.confidence_regularizer().detach()) < 1e-10


def test_frozen_assignments_get_no_gradient():
    _, soft = _soft()
    with torch.no_grad():
        soft.logits[:12] = torch.tensor([20.0, 0.0])  # confident rows
        soft.logits[12:] = torch.tensor([0.5, 0.0])   # undecided rows
    assert soft.update_freezing(0.99) == pytest.approx(0.5)
    soft(torch.randn(4, 32)).pow(2).sum().backward()
    soft.mask_frozen_gradients()
    assert (soft.logits.grad[:12] == 0).all() and (soft.logits.grad[12:] != 0).any()


def test_block_output_loss_is_relative_and_zero_when_equal():
    a = [torch.randn(2, 10), torch.randn(2, 5) * 100]
    assert float(block_output_loss(a, a)) == 0
    noisy = [t * 1.1 for t in a]
    assert float(block_output_loss(noisy, a)) == pytest.approx(0.01, rel=1e-4)


def test_block_hooks_record_tuple_outputs_and_are_removed():
    block = nn.Linear(3, 3)
    wrapper = nn.Sequential(block)
    with record_block_outputs([block]) as outputs:
        wrapper(torch.randn(2, 3))
    assert outputs[0].shape == (2, 3) and not block._forward_hooks


def _ctx(model: nn.Module) -> QuantContext:
    adapter = adapter_for(model)
    return QuantContext(adapter=adapter, scheduler=adapter.scheduler(model), conditions=list(range(10)), quiet=True)


def _config(**kw) -> VQ4DiTConfig:
    data = {"rules": [{"match": "role:embedder", "spec": None}, {"match": "role:head", "spec": None},
                      {"match": "re:.*", "spec": {"format": "vq", "w_bits": 2, "codebook_size": 16}}],
            "iterations": 4, "steps": 3, "batch": 2, "kmeans_iterations": 30, **kw}
    return VQ4DiTConfig.from_dict(data, "quantize")


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(4, 4, 8, 8, generator=gen), "timestep": torch.tensor([50, 300, 600, 900]),
            "class_labels": torch.tensor([0, 3, 5, 1000])}


@torch.no_grad()
def _out(model):
    return model(**_inputs(), return_dict=False)[0]


@pytest.fixture(scope="module")
def calibrated():
    reference = _out(tiny_dit())
    kmeans_only, calibrated_model = tiny_dit(), tiny_dit()
    handler = METHODS.get("vq4dit")
    handler.apply(kmeans_only, _config(iterations=0), _ctx(kmeans_only))
    ctx = _ctx(calibrated_model)
    specs = handler.apply(calibrated_model, _config(iterations=6, steps=4, lr_logits=0.2, lr_codebook=1e-3), ctx)
    return reference, kmeans_only, calibrated_model, specs, ctx


def test_vq4dit_replaces_planned_layers_and_reports(calibrated):
    reference, kmeans_only, model, specs, ctx = calibrated
    modules = quantized_modules(model)
    assert set(modules) == set(specs) and all(isinstance(m, VQLinear) for m in modules.values())
    assert not any(isinstance(m, SoftVQLinear) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert any("k-means of" in n for n in ctx.notes) and "VQ4DiT calibration loss" in ctx.figures
    assert ctx.tables[0]["rows"] and len(ctx.tables[0]["rows"]) == len(specs)


def test_calibration_brings_outputs_closer_to_full_precision_than_kmeans_alone(calibrated):
    reference, kmeans_only, model, _, _ = calibrated
    assert relative_error(_out(model), reference) < relative_error(_out(kmeans_only), reference)


def test_vq4dit_is_deterministic_for_a_seed():
    a, b = tiny_dit(), tiny_dit()
    config = _config(iterations=1, steps=2)
    METHODS.get("vq4dit").apply(a, config, _ctx(a))
    METHODS.get("vq4dit").apply(b, config, _ctx(b))
    assert torch.equal(_out(a), _out(b))


def test_vq4dit_rules_must_use_the_vq_format():
    with pytest.raises(ConfigError, match="format 'vq'"):
        VQ4DiTConfig.from_dict({"rules": [{"match": "re:.*", "spec": {"w_bits": 4}}]}, "quantize")
    with pytest.raises(ConfigError, match="iterations: must be >= 0"):
        _config(iterations=-1)
    with pytest.raises(ConfigError, match="unknown key"):
        VQ4DiTConfig.from_dict({"rules": [], "codebooks": 3}, "quantize")


@pytest.mark.parametrize("name, bits", [("vq-w2", 2.0), ("vq-w3", 3.0)])
def test_vq_recipes_run_on_a_tiny_dit_and_reload_in_stock_diffusers(name, bits, tmp_path):
    recipe = load_recipe(name)
    model = tiny_dit()
    adapter = adapter_for(model)
    state = PipelineState(source=ModelSource("tiny", Path("."), model, scheduler=adapter.scheduler(model)),
                          adapter=adapter, model=model, workdir=Path("."), reference_spec="tiny", quiet=True)
    for stage in recipe.stages:
        if stage.name == "calibrate":
            stage.config.samples, stage.config.steps = 4, 2
        if stage.name == "quantize":
            stage.config.options.iterations, stage.config.options.steps = 1, 2
        if stage.name != "evaluate":
            STAGES.get(stage.name).run(state, stage.config)
    assert state.quant_specs and {s.bits_per_weight for s in state.quant_specs.values()} == {bits}
    attach_quantizer(model, state.quant_specs)
    model.save_pretrained(tmp_path)
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(_out(loaded), _out(model))


def test_calibrated_bias_survives_a_16_bit_checkpoint_exactly(tmp_path):
    """Full-precision tensors are saved in the source's 16-bit dtype; the calibrated bias must not be."""
    from compressdit.io.save import save_in_dtype

    model = tiny_dit()
    for p in model.parameters():  # weights as if they came from an fp16 checkpoint
        p.data = p.data.half().float()
    specs = METHODS.get("vq4dit").apply(model, _config(iterations=1, steps=2, lr_bias=1e-2), _ctx(model))
    attach_quantizer(model, specs)
    save_in_dtype(model, tmp_path, torch.float16)
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.float32)
    name = next(iter(specs))
    assert quantized_modules(loaded)[name].bias.dtype == torch.float32
    assert isinstance(quantized_modules(loaded)[name].bias, nn.Parameter)
    assert torch.equal(_out(loaded), _out(model))
