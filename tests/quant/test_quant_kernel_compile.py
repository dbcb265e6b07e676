"""``torch.compile`` of a quantized tiny DiT: no graph break inside quantized layers, compiled == eager."""

from __future__ import annotations

import copy

import pytest
import torch

from compressdit.models import adapter_for
from compressdit.quant.cpu_dense import dense_kernel_name
from compressdit.quant.kernel_registry import prepack_model
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, quantize_layers, resolve_plan
from tests.conftest import tiny_dit


@pytest.mark.slow
def test_compiled_w8a8_and_w4a16_dit_has_no_graph_break_in_quantized_layers_and_matches_eager():
    """Whole-model compiled == eager up to rounding flips: inductor reorders the float ops between the quantized
    layers (norms, attention, GELU), so an activation on an int8 / bf16 rounding boundary can round the other
    way (seen on an AMX Xeon, not on an EPYC). The quantized layers themselves are bit-exact under compilation
    (checked here on the inputs they saw and in the test below); the model's compiled-vs-eager difference must
    stay far below its quantization error."""
    torch.manual_seed(0)
    model = tiny_dit(layers=1)
    reference = copy.deepcopy(model)
    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None),
             LayerRule("role:ffn_up", LinearQuantSpec(w_bits=4, group_size=32)),
             LayerRule("re:.*", LinearQuantSpec(w_bits=8, a_bits=8, rotation="hadamard"))]
    quantize_layers(model, resolve_plan(model, adapter_for(model), rules))
    kernels = prepack_model(model)  # prepack before compiling: the staleness check is skipped when compiling
    ffn_up = next(n for n, spec in resolve_plan(reference, adapter_for(reference), rules).items()
                  if spec is not None and spec.a_bits is None)
    layer = model.get_submodule(ffn_up)
    assert {"cpu-int8-gemm", dense_kernel_name((layer.out_features, layer.in_features))} <= set(kernels.values())
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10, 700]),
              "class_labels": torch.tensor([1, 7]), "return_dict": False}
    torch._dynamo.reset()
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = (args[0].clone(), out.clone())
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in kernels]
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
        frames = [f.filename for b in explained.break_reasons for f in b.user_stack]
        print("graph breaks:", explained.graph_break_count, [str(b.reason)[:120] for b in explained.break_reasons])
        assert not [f for f in frames if "compressdit" in f], frames  # none inside quantized layers or kernels
        seen.clear()
        eager = model(**inputs)[0]
        for hook in hooks:
            hook.remove()
        for name, (x, out) in seen.items():
            assert torch.equal(torch.compile(model.get_submodule(name), fullgraph=True)(x), out), name
        compiled = torch.compile(model)(**inputs)[0]
        quantization_error = (eager - reference(**inputs)[0]).norm()
    assert len(seen) == len(kernels)
    print("compiled - eager:", (compiled - eager).norm().item(), "eager - float:", quantization_error.item())
    assert (compiled - eager).norm() <= 0.05 * quantization_error, ((compiled - eager).norm(), quantization_error)


@pytest.mark.slow
def test_every_cpu_kernel_compiles_with_fullgraph_and_matches_eager():
    """Big W8A8 (oneDNN's prepacked weight), small W8A8 (torch._int_mm, or AMX's int8 microkernel), dense bf16 W4,
    grouped W4A8, FP8, NVFP4 (decoded weight, fused activation pass: PyTorch ops under compilation, the same numbers;
    on AMX the bf16 microkernel's op, traced through its fake; with AVX512-VNNI the integer GEMM's op), SVDQuant's
    NVFP4 (on AMX the whole layer in that op; with AVX512-VNNI the integer GEMM's, its branch in it)."""
    from compressdit.quant.cpu_dense import decoded_kernel_name, fp8_kernel_name
    from compressdit.quant.cpu_kernels import integer_groups_apply
    from compressdit.quant.formats import FORMATS
    from compressdit.quant.fp8_layer import FP8Linear
    from compressdit.quant.layers import QuantLinear

    NVFP4 = LinearQuantSpec.from_dict(dict(format="nvfp4", w_bits=4, a_bits=4, a_format="nvfp4",
                                           a_granularity="per_group"), "spec")
    FORMATS.get("nvfp4").validate_spec(NVFP4, "spec")
    SVDQUANT = LinearQuantSpec.from_dict(dict(format="nvfp4", w_bits=4, a_bits=4, a_format="nvfp4",
                                              a_granularity="per_group", balance=0.5, low_rank=8), "spec")
    FORMATS.get("nvfp4").validate_spec(SVDQUANT, "spec")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        QuantLinear.from_linear(torch.nn.Linear(256, 1040), LinearQuantSpec(w_bits=8, a_bits=8)),
        QuantLinear.from_linear(torch.nn.Linear(1040, 64), LinearQuantSpec(w_bits=8, a_bits=8)),
        QuantLinear.from_linear(torch.nn.Linear(64, 64), LinearQuantSpec(w_bits=4, group_size=32)),
        QuantLinear.from_linear(torch.nn.Linear(64, 64), LinearQuantSpec(w_bits=4, a_bits=8, group_size=32)),
        FP8Linear.from_linear(torch.nn.Linear(64, 32), LinearQuantSpec(format="fp8", w_bits=8, a_bits=8)),
        FORMATS.get("nvfp4").quantize(torch.nn.Linear(32, 16), NVFP4, None),
        FORMATS.get("nvfp4").quantize(torch.nn.Linear(16, 32), SVDQUANT, torch.rand(16) + 0.5))
    assert list(prepack_model(model).values()) == ["cpu-int8-gemm", "cpu-int8-gemm", dense_kernel_name((64, 64)),
                                                   "cpu-int8-group-gemm", fp8_kernel_name(8, (32, 64)),
                                                   *("cpu-int-groups" if integer_groups_apply(spec, shape) else
                                                     decoded_kernel_name(spec, shape)
                                                     for spec, shape in ((NVFP4, (16, 32)), (SVDQUANT, (32, 16))))]
    torch._dynamo.reset()
    with torch.no_grad():
        for rows in (1, 7):
            x = torch.randn(rows, 256)
            torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-4)


def _big_nvfp4_and_twin_log(out_features: int) -> tuple:
    """(model, specs, big): a big NVFP4 layer 128 -> big (above ``DENSE_MAX_WEIGHT``) and a twin-log one with the
    Hadamard rotation and balancing big -> ``out_features``."""
    from compressdit.quant.cpu_dense import DENSE_MAX_WEIGHT
    from compressdit.quant.formats import FORMATS

    specs = [dict(format="nvfp4", w_bits=4, a_bits=4, a_format="nvfp4", a_granularity="per_group"),
             dict(format="twinlog", w_bits=4, a_bits=4, a_granularity="per_group", a_group_size=16,
                  rotation="hadamard", balance=0.5)]
    specs = [LinearQuantSpec.from_dict(spec, "spec") for spec in specs]
    for spec in specs:
        FORMATS.get(spec.format).validate_spec(spec, "spec")
    torch.manual_seed(0)
    big = DENSE_MAX_WEIGHT // 128 + 16
    model = torch.nn.Sequential(FORMATS.get("nvfp4").quantize(torch.nn.Linear(128, big), specs[0], None),
                                FORMATS.get("twinlog").quantize(torch.nn.Linear(big, out_features), specs[1],
                                                                torch.rand(big) + 0.5))
    return model, specs, big


@pytest.mark.slow
def test_the_bf16_copy_and_the_hadamard_pass_compile_with_fullgraph_and_match_eager():
    """cpu-decoded-bf16 (a big NVFP4 layer, forced: it runs on any CPU) and a twin-log layer whose kernel rotates its
    input in C (on CPUs with AVX512-VNNI and without bf16 GEMMs for it, cpu-twinlog-groups' op on the rotated rows):
    under compilation the PyTorch ops of the same transform, quantizer and casts."""
    from compressdit.quant.cpu_dense import decoded_kernel_name
    from compressdit.quant.cpu_kernels import twinlog_groups_apply
    from compressdit.quant.kernel_registry import set_kernel

    model, specs, big = _big_nvfp4_and_twin_log(out_features=64)
    set_kernel(model[0], "cpu-decoded-bf16")
    prepack_model(model)
    twin_log = "cpu-twinlog-groups" if twinlog_groups_apply(specs[1], (64, big)) else decoded_kernel_name(specs[1],
                                                                                                        (64, big))
    assert [m.kernel_name for m in model] == ["cpu-decoded-bf16", twin_log]
    torch._dynamo.reset()
    with torch.no_grad():
        for rows in (1, 7):
            x = torch.randn(rows, 128)
            torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=2e-2, atol=2e-2)


@pytest.mark.usefixtures("decoded_kernels")
@pytest.mark.slow
def test_per_call_decoding_compiles_with_fullgraph_and_matches_eager(monkeypatch):
    """Where the CPU has no bf16 GEMM: ``cpu-decoded-fp32`` (a big NVFP4 layer, a big twin-log one rotating its input)
    and ``cpu-int4-weight``'s fp32 path (above ``FP32_DECODE_MIN_ROWS`` rows, inside its custom op): under compilation
    the layers' own PyTorch decoders and quantizers (the C passes are eager-only), no graph break, the same numbers."""
    from compressdit.quant import cpu_dense
    from compressdit.quant.cpu_kernels import FP32_DECODE_MIN_ROWS
    from compressdit.quant.layers import QuantLinear

    monkeypatch.setattr(cpu_dense, "_bf16_hardware", lambda: (False, False))
    model, _, big = _big_nvfp4_and_twin_log(out_features=128)
    model.append(QuantLinear.from_linear(torch.nn.Linear(128, big), LinearQuantSpec(w_bits=4, group_size=32)))
    assert list(prepack_model(model).values()) == ["cpu-decoded-fp32", "cpu-decoded-fp32", "cpu-int4-weight"]
    torch._dynamo.reset()
    with torch.no_grad():
        for rows in (1, FP32_DECODE_MIN_ROWS + 8):
            x = torch.randn(rows, 128)
            torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-3, atol=1e-3)


def test_a_bf16_models_kernels_compile_with_fullgraph_and_match_eager():
    """A bf16 model's layers (the kernels take and give bf16 rows in eager mode: the int8 op with a balancing
    divisor, int4 weight-only past the packed GEMM's rows, FP8, a twin-log Hadamard layer) trace without a graph
    break: the traced division / transform and the same ops; compiled outputs equal eager ones up to bf16 rounding."""
    from compressdit.quant.formats import FORMATS
    from compressdit.quant.fp8_layer import FP8Linear
    from compressdit.quant.layers import QuantLinear

    twinlog = LinearQuantSpec.from_dict(dict(format="twinlog", w_bits=4, a_bits=4, a_granularity="per_group",
                                             a_group_size=16, rotation="hadamard", balance=0.5), "spec")
    FORMATS.get("twinlog").validate_spec(twinlog, "spec")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        FORMATS.get("int").quantize(torch.nn.Linear(128, 256), LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5),
                                    torch.rand(128) + 0.5),
        QuantLinear.from_linear(torch.nn.Linear(256, 128), LinearQuantSpec(w_bits=4, group_size=64)),
        FP8Linear.from_linear(torch.nn.Linear(128, 128), LinearQuantSpec(format="fp8", w_bits=8, a_bits=8)),
        FORMATS.get("twinlog").quantize(torch.nn.Linear(128, 64), twinlog, torch.rand(128) + 0.5)).to(torch.bfloat16)
    prepack_model(model)
    torch._dynamo.reset()
    with torch.no_grad():
        x = torch.randn(2, 40, 128).bfloat16()  # 80 rows: past the packed int4 GEMM's 64
        eager, compiled = model(x), torch.compile(model, fullgraph=True)(x)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=5e-2, atol=5e-2)
