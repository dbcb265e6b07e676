"""Tests for ViDiT-Q: channel balancing and Hadamard rotation folded into QuantLinear, metric-decoupled mixed
precision (compressdit.quant.mixed_precision), the ``viditq`` method, its recipes and its checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file
from torch import nn

from compressdit.errors import CalibrationError, CheckpointError, ConfigError
from compressdit.evaluate.metrics import relative_error
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.io.sources import ModelSource
from compressdit.models import adapter_for
from compressdit.models.dit import DiTAdapter
from compressdit.quant.context import QuantContext
from compressdit.quant.layers import QuantLinear
from compressdit.quant.mixed_precision import (CONDITION_ROLES, MixedPrecisionConfig, Sensitivity, allocate_bits,
                                               measure_sensitivity, mixed_precision_plan, stored_bits)
from compressdit.quant.rotation import balancing_scale, random_signs, rotate
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, quantized_modules, resolve_plan
from compressdit.recipe import load_recipe
from compressdit.stages import STAGES
from compressdit.stages.base import PipelineState
from tests.conftest import tiny_dit
from tests.io.test_diffusers_quantizer import _dit_inputs

IN, OUT = 64, 32
WEIGHTS = "diffusion_pytorch_model.safetensors"
OUTLIER_CHANNELS = [3, 17, 40]


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT)
    with torch.no_grad():
        linear.bias.normal_()
    return linear


def _outlier_inputs(seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Tokens whose few outlier channels are 40x the rest (what adaLN modulation produces in DiTs)."""
    x = torch.randn(4, 16, IN, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x[..., OUTLIER_CHANNELS] *= 40
    return x


def _absmax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().reshape(-1, x.shape[-1]).amax(0).float()


# -- balancing + rotation math ---------------------------------------------------------------------------------------

def test_balancing_and_rotation_preserve_the_function_before_quantization():
    linear = _linear()
    x = _outlier_inputs(dtype=torch.float64)
    absmax = _absmax(x)
    spec = LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5, rotation="hadamard")
    q = QuantLinear.from_linear(linear, spec, absmax, rotation_seed=3)
    s = balancing_scale(absmax, linear.weight, 0.5)
    signs = random_signs(IN, 3)
    assert torch.equal(q.smooth_scale, s) and q.smooth_scale.dtype == torch.float32
    assert torch.equal(q.rotation_signs, signs) and q.rotation_signs.dtype == torch.int8
    folded = rotate(linear.weight.detach().double() * s.double(), signs)  # (W * s) R, not quantized
    weight = linear.weight.detach().double()
    bias = linear.bias.detach().double()
    x_t = q.transform_input(x)
    assert not torch.allclose(x_t, x, atol=1.0)  # the transform really changes the activations
    out = x_t @ folded.T + bias
    assert torch.allclose(out, x @ weight.T + bias, atol=1e-5, rtol=0)
    # the quantized codes approximate exactly that folded weight
    assert relative_error(q.dequantized_weight(torch.float64), folded) < 1e-2
    # balancing flattened the activations' outlier channels
    ratio = lambda a: float(a.max() / a.min())  # noqa: E731
    assert ratio(_absmax(x / s.double())) < ratio(absmax) / 4  # migration 0.5: about the square root


def test_to_float_linear_maps_the_folded_weight_back_to_the_original_input_space():
    linear = _linear()
    x = _outlier_inputs()
    q = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5, rotation="hadamard"),
                                _absmax(x))
    float_linear = q.to_float_linear()
    assert type(float_linear) is nn.Linear
    with torch.no_grad():
        ref = linear(x)
        assert relative_error(float_linear(x), ref) < 5e-3
        assert relative_error(float_linear.weight, linear.weight) < 1e-2
        # the raw (balanced, rotated) codes are in another basis: using them directly would be wrong
        assert relative_error(q.dequantized_weight(), linear.weight) > 0.5
        # and the quantized module itself agrees with its float twin up to activation rounding
        assert relative_error(q(x), float_linear(x)) < 1e-2


def test_balancing_lowers_w8a8_error_with_activation_outliers():
    linear = _linear()
    x = _outlier_inputs()
    with torch.no_grad():
        ref = linear(x)
        plain = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=8, a_bits=8))
        balanced = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5), _absmax(x))
        err_plain, err_balanced = relative_error(plain(x), ref), relative_error(balanced(x), ref)
    assert err_balanced < 0.5 * err_plain, (err_balanced, err_plain)


def test_hadamard_lowers_w4_error_on_a_weight_with_heavy_outliers():
    linear = _linear()
    with torch.no_grad():  # two input columns 30x larger: every row's 4-bit scale is set by them
        linear.weight.mul_(0.1)
        linear.weight[:, [5, 33]] *= 30
    x = torch.randn(4, 16, IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = linear(x)
        plain = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=4))
        rotated = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=4, rotation="hadamard"))
        err_plain, err_rotated = relative_error(plain(x), ref), relative_error(rotated(x), ref)
    assert err_rotated < 0.6 * err_plain, (err_rotated, err_plain)


def test_balancing_without_statistics_is_refused():
    with pytest.raises(ValueError, match="calibrat"):
        QuantLinear.from_linear(_linear(), LinearQuantSpec(w_bits=8, balance=0.5))


def test_rotation_needs_an_even_width():
    with pytest.raises(ValueError, match="even"):
        QuantLinear(9, 4, True, LinearQuantSpec(w_bits=8, rotation="hadamard"))


# -- allocate_bits ---------------------------------------------------------------------------------------------------

def _sens(name: str, params: int, normalised: float) -> Sensitivity:
    return Sensitivity(name, "image", params, damage=normalised, normalised=normalised)


# damage per parameter: a 7.8e-2, b 6.3e-2, c 2.9e-2, d 7.8e-3; by total damage c comes first.
# 1024 parameters in all, so budgets of k/256 extra bits are exact in floating point.
SENS = [_sens("c", 512, 15.0), _sens("a", 128, 10.0), _sens("d", 256, 2.0), _sens("b", 128, 8.0)]
TOTAL = sum(s.params for s in SENS)


def _average(bits: dict[str, int], sens=SENS) -> float:
    return sum(bits[s.name] * s.params for s in sens) / sum(s.params for s in sens)


@pytest.mark.parametrize("budget", [4.0, 4.3, 4.5, 4.7, 5.0, 5.5, 6.0, 7.0, 7.9, 8.0])
def test_allocate_bits_stays_within_the_budget_and_spends_what_fits(budget):
    bits = allocate_bits(SENS, 4, 8, budget)
    assert set(bits) == {s.name for s in SENS} and set(bits.values()) <= {4, 8}
    assert _average(bits) <= budget + 1e-12
    left = budget * TOTAL - _average(bits) * TOTAL
    for s in SENS:  # greedy is maximal: no layer still at low bits would have fitted in what is left
        if bits[s.name] == 4:
            assert s.params * 4 > left + 1e-9, (s.name, left)


def test_allocate_bits_promotes_the_most_damaging_per_parameter_first():
    def promoted(params_at_high: int) -> set[str]:
        bits = allocate_bits(SENS, 4, 8, 4.0 + 4 * params_at_high / TOTAL)
        return {name for name, b in bits.items() if b == 8}

    assert promoted(0) == set()
    assert promoted(128) == {"a"}
    assert promoted(256) == {"a", "b"}
    assert promoted(384) == {"a", "b"}  # neither 'c' nor 'd' fits in the 128 left
    # room for 512: 'a' and 'b' first, then 'c' no longer fits and the rest goes to 'd', the next that does;
    # ranking by total damage would have picked 'c' alone
    assert promoted(512) == {"a", "b", "d"}
    assert promoted(768) == {"a", "b", "c"}
    assert promoted(1024) == {"a", "b", "c", "d"}


def test_allocate_bits_budget_at_low_promotes_none_and_at_high_promotes_all():
    assert set(allocate_bits(SENS, 4, 8, 4.0).values()) == {4}
    assert set(allocate_bits(SENS, 4, 8, 8.0).values()) == {8}
    assert set(allocate_bits(SENS, 3, 6, 3.0).values()) == {3}
    assert set(allocate_bits(SENS, 3, 6, 6.0).values()) == {6}


def _stored_bytes(module: nn.Module) -> int:
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return sum(t.untyped_storage().nbytes() for name, t in tensors.items() if t is not None and name != "bias")


@pytest.mark.parametrize("options, expected", [({"w_bits": 4, "group_size": 64}, 4 + 32 / 64),
                                               ({"w_bits": 4}, 4 + 32 / 128),
                                               ({"w_bits": 8, "balance": 0.2}, 8 + 32 / 128 + 32 / 32),
                                               ({"w_bits": 4, "group_size": 64, "w_symmetric": False}, 5.0)])
def test_stored_bits_counts_every_stored_tensor_but_the_bias(options, expected):
    linear = nn.Linear(128, 32)
    spec = LinearQuantSpec(a_bits=8, **options)
    spec.validate("spec")
    assert stored_bits(linear, spec) == pytest.approx(expected)
    quantized = QuantLinear.from_linear(linear, spec, input_absmax=torch.ones(128))
    assert 8 * _stored_bytes(quantized) / (128 * 32) == pytest.approx(expected)


def test_allocate_bits_with_stored_costs_spends_the_budget_on_what_is_stored():
    overhead = {s.name: (4.5, 8.5) for s in SENS}  # a uniform overhead of 0.5 bits shifts the budget
    for budget in (4.5, 4.75, 5.0, 6.5, 8.5):
        assert allocate_bits(SENS, 4, 8, budget, overhead) == allocate_bits(SENS, 4, 8, budget - 0.5)
    uneven = {**overhead, "a": (4.5, 16.5)}  # 'a' now costs 12 extra bits per weight, 'b' still 4
    bits = allocate_bits(SENS, 4, 8, 4.5 + 4 * 128 / TOTAL, uneven)
    assert {n for n, b in bits.items() if b == 8} == {"b"}


def test_a_budget_below_the_low_precision_storage_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"W4 alone stores 4.500 bits per weight with scales counted, over the "
                                          r"budget avg_weight_bits 4.4") as info:
        allocate_bits(SENS, 4, 8, 4.4, {s.name: (4.5, 8.5) for s in SENS})
    assert "\n" not in str(info.value)


# -- mixed precision on a tiny DiT -----------------------------------------------------------------------------------

MP_RULES = [LayerRule("role:embedder", None), LayerRule("role:head", None),
            LayerRule("re:.*", LinearQuantSpec(w_bits=4, a_bits=8, rotation="hadamard"))]
PROBE = MixedPrecisionConfig(avg_weight_bits=4.5, high_bits=8, probe_samples=2, probe_steps=2)


def _ctx(model: nn.Module, adapter=None, conditions=(0, 1, 2, 3)) -> QuantContext:
    adapter = adapter or adapter_for(model)
    return QuantContext(adapter=adapter, scheduler=adapter.scheduler(model), conditions=list(conditions), quiet=True)


@torch.no_grad()
def _run(model: nn.Module) -> torch.Tensor:
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in _dit_inputs().items()}
    return model(**inputs, return_dict=False)[0].float()


@pytest.fixture(scope="module")
def mp_result():
    model = tiny_dit(layers=1)
    ctx = _ctx(model)
    plan = resolve_plan(model, ctx.adapter, MP_RULES)
    return model, plan, mixed_precision_plan(model, plan, ctx, PROBE), ctx


def test_mixed_precision_plan_meets_the_budget_with_two_precisions(mp_result):
    model, plan, out, ctx = mp_result
    assert set(out) == set(plan)
    for name, spec in plan.items():
        if spec is None:
            assert out[name] is None
        else:  # only w_bits changes
            assert out[name].w_bits in (4, 8)
            assert LinearQuantSpec(**{**out[name].to_dict(), "w_bits": 4}) == spec
    active = {n: s for n, s in out.items() if s is not None}
    params = {n: model.get_submodule(n).weight.numel() for n in active}
    average = sum(active[n].w_bits * params[n] for n in active) / sum(params.values())
    assert average <= PROBE.avg_weight_bits
    assert {s.w_bits for s in active.values()} == {4, 8}  # the budget buys some W8 layers, not all
    assert all(type(m) is not QuantLinear for m in model.modules())  # planning quantized nothing


def test_mixed_precision_plan_reports_table_note_and_figure(mp_result):
    model, plan, out, ctx = mp_result
    (table,) = ctx.tables
    assert table["header"] == ["module", "group", "params", "damage", "normalised", "w bits"]
    rows = {row[0]: row for row in table["rows"]}
    assert set(rows) == {n for n, s in plan.items() if s is not None}
    for name, row in rows.items():
        assert row[5] == out[name].w_bits and row[3] >= 0
        expected = "condition" if ctx.adapter.role_of(name) == "adaln" else "image"
        assert row[1] == expected, (name, row)
    assert {row[1] for row in rows.values()} == {"condition", "image"}
    (note,) = ctx.notes
    assert "average weight bits" in note and "budget 4.5" in note
    (path,) = ctx.figures.values()
    assert Path(path).is_file() and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mixed_precision_with_a_stored_budget_counts_scales():
    model = tiny_dit(layers=1)
    ctx = _ctx(model)
    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None),
             LayerRule("re:.*", LinearQuantSpec(w_bits=4, a_bits=8, group_size=32))]
    plan = resolve_plan(model, ctx.adapter, rules)
    config = MixedPrecisionConfig(avg_weight_bits=5.5, high_bits=8, probe_samples=2, probe_steps=2, budget="stored")
    out = {n: s for n, s in mixed_precision_plan(model, plan, ctx, config).items() if s is not None}
    weights = {n: model.get_submodule(n).weight.numel() for n in out}
    stored = sum(stored_bits(model.get_submodule(n), s) * weights[n] for n, s in out.items()) / sum(weights.values())
    codes = sum(s.w_bits * weights[n] for n, s in out.items()) / sum(weights.values())
    assert {s.w_bits for s in out.values()} == {4, 8} and stored <= 5.5 and codes < stored
    assert f"{codes:.3f}, {stored:.3f} with scales counted (budget 5.5, stored)" in ctx.notes[0]
    asymmetric = {n: None if s is None else LinearQuantSpec(w_bits=4, a_bits=8, group_size=32, w_symmetric=False)
                  for n, s in plan.items()}  # fp32 scale and zero point per 32 weights: 6 bits before any W8
    with pytest.raises(ConfigError, match="W4 alone stores 6.000 bits per weight"):
        mixed_precision_plan(model, asymmetric, _ctx(model), config)


class _CrossDiTAdapter(DiTAdapter):
    """A DiT adapter that calls self-attention's k/v projections cross-attention (DiT has none of its own)."""

    roles = {"cross_kv": (r"transformer_blocks\.\d+\.attn1\.to_[kv]",), **DiTAdapter.roles}


def test_sensitivity_groups_follow_the_roles():
    assert {"adaln", "cross_q", "cross_kv", "cross_out"} <= CONDITION_ROLES
    assert not {"attn_qkv", "attn_out", "ffn_up", "ffn_down"} & CONDITION_ROLES
    model = tiny_dit(layers=1)
    adapter = _CrossDiTAdapter()
    names = ["transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_q",
             "transformer_blocks.0.norm1.linear", "transformer_blocks.0.ff.net.2"]
    plan = {n: LinearQuantSpec(w_bits=4) for n in names}
    config = MixedPrecisionConfig(probe_samples=1, probe_steps=1)
    groups = {s.name: s.group for s in measure_sensitivity(model, plan, _ctx(model, adapter), config)}
    assert groups == {"transformer_blocks.0.attn1.to_k": "condition", "transformer_blocks.0.attn1.to_q": "image",
                      "transformer_blocks.0.norm1.linear": "condition", "transformer_blocks.0.ff.net.2": "image"}


def test_measure_sensitivity_restores_the_float_model():
    model = tiny_dit(layers=1)
    before_out = _run(model)
    before_modules = {n: (type(m), id(m)) for n, m in model.named_modules()}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _ctx(model)
    plan = {n: s for n, s in resolve_plan(model, ctx.adapter, MP_RULES).items() if s is not None}
    results = measure_sensitivity(model, plan, ctx, MixedPrecisionConfig(probe_samples=1, probe_steps=2))
    assert [s.name for s in results] == list(plan)
    assert all(s.damage > 0 for s in results)  # each layer really was quantized while measured
    assert {n: (type(m), id(m)) for n, m in model.named_modules()} == before_modules
    after_state = model.state_dict()
    assert set(after_state) == set(before_state)
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    assert torch.equal(_run(model), before_out)


def test_mixed_precision_needs_a_single_low_precision():
    model = tiny_dit(layers=1)
    ctx = _ctx(model)
    plan = resolve_plan(model, ctx.adapter, [
        LayerRule("role:embedder", None), LayerRule("role:head", None),
        LayerRule("role:ffn_up", LinearQuantSpec(w_bits=3)), LayerRule("re:.*", LinearQuantSpec(w_bits=4))])
    with pytest.raises(ConfigError, match=r"one low weight precision.*\[3, 4\]"):
        mixed_precision_plan(model, plan, ctx, PROBE)
    assert not ctx.tables and not ctx.notes


def test_mixed_precision_without_calibration_conditions_is_a_config_error():
    model = tiny_dit(layers=1)
    ctx = _ctx(model, conditions=())
    plan = resolve_plan(model, ctx.adapter, MP_RULES)
    with pytest.raises(ConfigError, match="calibration conditions"):
        mixed_precision_plan(model, plan, ctx, PROBE)


# -- the shipped recipe end to end, through a stock diffusers checkpoint ---------------------------------------------

def _state(model: nn.Module) -> PipelineState:
    adapter = adapter_for(model)
    source = ModelSource("tiny", Path("."), model, scheduler=adapter.scheduler(model))
    return PipelineState(source=source, adapter=adapter, model=model, workdir=Path("."), reference_spec="tiny",
                         quiet=True)


@pytest.fixture(scope="module")
def w4a8_checkpoint(tmp_path_factory):
    """tiny DiT through recipes/w4a8.yaml (calibrate + viditq with mixed precision, GPTQ rounding) with channel
    balancing and the Hadamard rotation switched on (the shipped recipe leaves them off) and the budget counted in
    code bits (on 64-wide layers the fp32 scales alone nearly fill a 4.5-bit stored budget), saved with stock
    diffusers."""
    recipe = load_recipe("w4a8")
    model = tiny_dit()
    state = _state(model)
    for stage in recipe.stages:
        if stage.name == "calibrate":
            stage.config.samples, stage.config.steps = 4, 2
        if stage.name == "quantize":
            assert stage.config.method == "viditq"
            mixed = stage.config.options.mixed_precision
            mixed.probe_samples, mixed.probe_steps, mixed.budget = 2, 2, "codes"
            stage.config.options.rules[-1].spec.rotation = "hadamard"
            stage.config.options.rules[-1].spec.balance = 0.2
        if stage.name != "evaluate":
            STAGES.get(stage.name).run(state, stage.config)
    attach_quantizer(model, state.quant_specs)
    folder = tmp_path_factory.mktemp("viditq") / "model"
    model.save_pretrained(folder)
    return folder, _run(model), state


def test_w4a8_recipe_quantizes_with_balancing_rotation_and_mixed_precision(w4a8_checkpoint):
    folder, output, state = w4a8_checkpoint
    specs = state.quant_specs
    assert specs and all(s.balance == 0.2 and s.rotation == "hadamard" and s.a_bits == 8 and s.w_range == "mse"
                         and s.rounding == "gptq" for s in specs.values())
    assert {s.w_bits for s in specs.values()} == {4, 8}
    assert state.tables and state.notes and state.figures
    assert torch.isfinite(output).all()
    assert relative_error(output, _run(tiny_dit())) > 1e-4  # really quantized


def test_w4a8_checkpoint_reloads_bit_identically_in_stock_diffusers(w4a8_checkpoint):
    folder, expected, state = w4a8_checkpoint
    tensors = load_file(str(folder / WEIGHTS))
    for name in state.quant_specs:
        assert tensors[f"{name}.smooth_scale"].dtype == torch.float32, name
        assert tensors[f"{name}.rotation_signs"].dtype == torch.int8, name
        assert set(tensors[f"{name}.rotation_signs"].tolist()) == {-1, 1}
    loaded = DiTTransformer2DModel.from_pretrained(folder)
    modules = quantized_modules(loaded)
    assert set(modules) == set(state.quant_specs)
    for name, module in modules.items():
        assert module.spec == state.quant_specs[name]
        assert torch.equal(module.smooth_scale, tensors[f"{name}.smooth_scale"])
        assert torch.equal(module.rotation_signs, tensors[f"{name}.rotation_signs"])
    assert torch.equal(_run(loaded), expected)


def test_w4a8_checkpoint_bfloat16_load_keeps_balancing_scales_fp32(w4a8_checkpoint):
    folder, expected, state = w4a8_checkpoint
    reference = quantized_modules(DiTTransformer2DModel.from_pretrained(folder))
    model = DiTTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    for name, module in quantized_modules(model).items():
        assert module.smooth_scale.dtype == torch.float32, name
        assert torch.equal(module.smooth_scale, reference[name].smooth_scale), name
        assert module.rotation_signs.dtype == torch.int8 and module.weight_scale.dtype == torch.float32
        assert module.bias.dtype == torch.bfloat16
    out = _run(model)
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) < 0.1


def test_config_without_rotation_but_tensors_with_signs_is_a_checkpoint_error(w4a8_checkpoint, tmp_path):
    folder = tmp_path / "mismatch"
    shutil.copytree(w4a8_checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    name = "transformer_blocks.1.attn1.to_v"
    assert config["quantization_config"]["modules"][name]["rotation"] == "hadamard"
    config["quantization_config"]["modules"][name]["rotation"] = "none"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.attn1\.to_v\.rotation_signs"):
        DiTTransformer2DModel.from_pretrained(folder)


# -- spec and stage validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("balance", [-0.1, 1.01, 2.0])
def test_balance_out_of_range_is_a_config_error(balance):
    with pytest.raises(ConfigError, match=r"spec\.balance: migration strength must be in \[0, 1\]"):
        LinearQuantSpec.from_dict({"w_bits": 8, "balance": balance}, "spec")


@pytest.mark.parametrize("balance", [0.0, 0.5, 1.0, None])
def test_balance_in_range_is_accepted(balance):
    assert LinearQuantSpec.from_dict({"w_bits": 8, "balance": balance}, "spec").balance == balance


def test_rotation_with_a_static_activation_scale_is_a_config_error():
    with pytest.raises(ConfigError, match="static activation scale"):
        LinearQuantSpec.from_dict({"w_bits": 8, "a_bits": 8, "rotation": "hadamard", "a_granularity": "static"},
                                  "spec")
    with pytest.raises(ConfigError, match="'rotate' is not"):
        LinearQuantSpec.from_dict({"w_bits": 8, "rotation": "rotate"}, "spec")
    spec = LinearQuantSpec.from_dict({"w_bits": 8, "a_bits": 8, "rotation": "hadamard"}, "spec")
    assert spec.label.endswith("+hadamard")


@pytest.mark.parametrize("options", [
    {"rules": [{"match": "re:.*", "spec": {"w_bits": 8, "a_bits": 8, "balance": 0.5}}]},
    {"rules": [{"match": "re:.*", "spec": {"w_bits": 4, "rotation": "hadamard"}}],
     "mixed_precision": {"avg_weight_bits": 5.0}},
])
def test_viditq_without_a_calibrate_stage_is_a_calibration_error(options):
    model = tiny_dit(layers=1)
    state = _state(model)
    config = STAGES.get("quantize").parse({"method": "viditq", **options}, "quantize")
    with pytest.raises(CalibrationError, match="needs a calibrate stage before quantize"):
        STAGES.get("quantize").run(state, config)
    assert not quantized_modules(model) and not state.quant_specs


def test_viditq_without_balancing_or_mixed_precision_needs_no_calibration():
    model = tiny_dit(layers=1)
    state = _state(model)
    rules = [{"match": "role:embedder", "spec": None},
             {"match": "re:.*", "spec": {"w_bits": 4, "group_size": 32, "w_range": "mse", "rotation": "hadamard"}}]
    STAGES.get("quantize").run(state, STAGES.get("quantize").parse({"method": "viditq", "rules": rules}, "quantize"))
    assert state.quant_specs and all(s.w_range == "mse" for s in state.quant_specs.values())
