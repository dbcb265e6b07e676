"""A tanh GELU fed by a quantized layer runs natively: its class swapped, the model's outputs, state dict, hooks and
reload unchanged; a float layer put back restores the stock class."""

from __future__ import annotations

import copy
import tempfile

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.activations import GELU
from torch import nn

from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.models import adapter_for
from compressdit.quant.native_gelu import NativeGELU, NativeTorchGELU, swap_activation
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, dequantize_layers, quantize_layers, resolve_plan
from tests.conftest import native_ops_built, tiny_dit, tiny_flux

W8A8 = LinearQuantSpec(w_bits=8, a_bits=8)


def _quantize(model: nn.Module, rules: list[LayerRule]) -> dict:
    plan = resolve_plan(model, adapter_for(model), rules)
    quantize_layers(model, plan)
    return {n: s for n, s in plan.items() if s is not None}


def _gelus(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (GELU, nn.GELU))}


def _stock(model: nn.Module) -> nn.Module:
    stock = copy.deepcopy(model)
    for module in stock.modules():
        swap_activation(module, native=False)
    return stock


@torch.no_grad()
def test_quantized_ffn_up_projections_get_the_native_gelu_and_give_the_same_outputs():
    model = tiny_dit()
    keys = set(model.state_dict())
    _quantize(model, [LayerRule("re:transformer_blocks\\.0\\.ff\\.net\\.0\\.proj", W8A8)])
    assert _gelus(model) == {"transformer_blocks.0.ff.net.0": NativeGELU, "transformer_blocks.1.ff.net.0": GELU}
    assert set(model.state_dict()) == keys | {"transformer_blocks.0.ff.net.0.proj.weight_scale"}
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10, 700]),
              "class_labels": torch.tensor([1, 7])}
    out, stock = model(**inputs).sample, _stock(model)
    assert _gelus(stock)["transformer_blocks.0.ff.net.0"] is GELU
    torch.testing.assert_close(out, stock(**inputs).sample, rtol=1e-5, atol=1e-6)
    seen = []  # hooks on the projection and on the GELU module still run
    act = model.transformer_blocks[0].ff.net[0]
    act.proj.register_forward_hook(lambda m, i, o: seen.append("proj"))
    act.register_forward_hook(lambda m, i, o: seen.append("gelu"))
    model(**inputs)
    assert seen == ["proj", "gelu"]
    dequantize_layers(model)
    assert set(_gelus(model).values()) == {GELU}


@torch.no_grad()
def test_erf_gelus_and_float_projections_stay_stock():
    module = GELU(16, 32, approximate="none")
    swap_activation(module, native=True)
    assert type(module) is GELU
    model = tiny_dit()
    _quantize(model, [LayerRule("role:attn_qkv", W8A8)])
    assert set(_gelus(model).values()) == {GELU}


@torch.no_grad()
def test_flux_parallel_mlp_activations_run_natively_and_reload_so():
    model = tiny_flux(double=1, single=2, heads=2, text_dim=24, pooled_dim=16)
    specs = _quantize(model, [LayerRule("re:single_transformer_blocks\\.0\\.proj_mlp", W8A8),
                              LayerRule("re:transformer_blocks\\.0\\.ff\\.net\\.0\\.proj", W8A8)])
    gelus = _gelus(model)
    assert gelus["single_transformer_blocks.0.act_mlp"] is NativeTorchGELU
    assert gelus["single_transformer_blocks.1.act_mlp"] is nn.GELU
    assert gelus["transformer_blocks.0.ff.net.0"] is NativeGELU and gelus["transformer_blocks.0.ff_context.net.0"] is GELU
    x = torch.randn(3, 5, model.single_transformer_blocks[0].proj_mlp.in_features)
    act = model.single_transformer_blocks[0].act_mlp
    torch.testing.assert_close(act(x), nn.functional.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
    assert act(x.double()).dtype == torch.float64  # other dtypes: torch's GELU

    attach_quantizer(model, specs)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = FluxTransformer2DModel.from_pretrained(folder)
    assert _gelus(loaded) == gelus


@torch.no_grad()
def test_the_gelu_runs_in_the_int8_kernels_epilogue_where_it_can(monkeypatch):
    """A W8A8 ``proj`` (balanced or rotated) with no hooks: the GELU in the fused op's epilogue where that op runs
    the layer (not where group_gemm's VNNI tiles do: the C GELU pass after them), the numbers of the projection then
    the C GELU pass exactly; a forward hook on ``proj`` takes the plain path (the hook sees ``proj``'s own output)."""
    from compressdit.quant.cpu_native import gelu_tanh
    from compressdit.quant.kernel_registry import cache_of

    built, activations = native_ops_built(), []
    if built:
        op = torch.ops.compressdit_native.int8_linear
        monkeypatch.setattr(torch.ops.compressdit_native, "int8_linear",
                            lambda *a: (activations.append(a[9]), op(*a))[1])  # its `activation` argument
    torch.manual_seed(5)
    x = torch.randn(2, 40, 32) * torch.linspace(0.2, 3, 32)
    for spec in (W8A8, LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5), LinearQuantSpec(w_bits=8, a_bits=8,
                                                                                         rotation="hadamard")):
        module = GELU(32, 64, approximate="tanh")
        stats = {"act.proj": x.abs().amax((0, 1))} if spec.balance else None
        model = nn.Sequential()
        model.add_module("act", module)
        quantize_layers(model, {"act.proj": spec}, stats)
        assert type(module) is NativeGELU
        activations.clear()
        fused = module(x)
        on_op = built and cache_of(module.proj).buffers["gemm_packed"] is None
        assert activations == ([1] if on_op else [])  # else no fused path: the pass after proj
        assert (module.proj.forward_activated(x, "gelu-tanh") is None) is not on_op
        assert torch.equal(fused, gelu_tanh(module.proj(x)))
        seen = []
        handle = module.proj.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        plain = module(x)
        handle.remove()
        assert activations[-1:] == ([0] if on_op else []) and len(seen) == 1 and torch.equal(plain, fused)
        if built and not on_op:  # the fused op on the same codes (its path on other CPUs): the same numbers
            cache_of(module.proj).buffers.update(gemm_packed=None, gemm_corr=None, gemm_scale=None)
            activations.clear()
            assert torch.equal(module(x), fused) and activations == [1]


@torch.no_grad()
def test_bf16_models_get_the_native_gelu_in_place_and_a_hooked_projection_keeps_its_output():
    """In a bf16 model the native GELU runs too (the fp32 function rounded to bf16 once: within one bf16 ulp of the
    exact value wherever that is not below 1e-30, where torch's bf16 GELU is up to thousands of ulp off), writing over
    the projection's fresh output; a forward hook on the projection takes the stock path, so what the hook holds is
    the projection's output, not the GELU's."""
    from compressdit.quant.cpu_native import gelu_tanh, native_library

    torch.manual_seed(0)
    x = (torch.randn(1 << 16) * 4).bfloat16()
    exact = x.double() * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (x.double() + 0.044715 * x.double() ** 3))
    ulps = (gelu_tanh(x).view(torch.int16).int() - exact.bfloat16().view(torch.int16).int()).abs()
    if native_library() is not None:
        assert ulps[exact.abs() > 1e-30].max() <= 1
    model = tiny_dit()
    _quantize(model, [LayerRule("re:transformer_blocks\\.0\\.ff\\.net\\.0\\.proj", W8A8)])
    model = model.to(torch.bfloat16)
    act = model.transformer_blocks[0].ff.net[0]
    assert type(act) is NativeGELU
    h = torch.randn(2, 16, act.proj.in_features).bfloat16()
    plain = act(h)
    torch.testing.assert_close(plain, torch.nn.functional.gelu(act.proj(h), approximate="tanh"), rtol=1e-2, atol=1e-2)
    held = []
    act.proj.register_forward_hook(lambda m, i, o: held.append(o))
    assert torch.equal(act(h), plain)
    assert torch.equal(held[0], act.proj(h))  # not overwritten by the GELU
