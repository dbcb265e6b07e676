"""GPU ops: every op's reference vs the dequantize ground truth, fake impls, compile; CUDA kernels vs the reference."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from compressdit.quant.gpu_ops import (fp8_linear, fp8_linear_decomposed, gpu_kernel_for, int4_group_size,
                                       int4_linear, int8_linear_decomposed, int8_linear_dyn, kernel_for_spec)
from compressdit.quant.gpu_reference import (fp8_linear_reference, int4_linear_reference, int8_linear_reference,
                                             pack_int4, quantize_fp8_weight, quantize_rows_reference,
                                             tinygemm_scales_and_zeros)
from compressdit.quant.kernels import int8_linear, quantize_activation_int8
from compressdit.quant.layers import QuantLinear
from compressdit.quant.primitives import quantize_weight_rtn
from compressdit.quant.spec import LinearQuantSpec

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DIT_XL_SHAPES = [(1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152)]  # (in, out)


def _int8_weight(out_features: int, in_features: int, device="cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * (1 + torch.rand(out_features, 1, generator=gen) * 3)
    q = quantize_weight_rtn(weight, 8)
    return q.codes.to(device), q.scale.reshape(-1).to(device)


def _x(shape, dtype=torch.float32, device="cpu", seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * torch.linspace(0.1, 5, shape[-1])).to(device=device, dtype=dtype)


def rel_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    return float((out.float() - truth.float()).norm() / truth.float().norm())


# ------------------------------------------------------------------------------------------------ references

def test_int8_reference_is_the_exact_int8_gemm_and_the_quantlinear_reference():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 40), LinearQuantSpec(w_bits=8, a_bits=8))
    x = _x((3, 11, 64))
    out = int8_linear_dyn(x, layer.weight.data, layer.weight_scale, layer.bias)  # CPU: the reference
    torch.testing.assert_close(out, int8_linear(x, layer.weight.data, layer.weight_scale, layer.bias),
                               rtol=1e-4, atol=1e-4)  # int32-exact torch._int_mm
    torch.testing.assert_close(out, layer(x), rtol=1e-4, atol=1e-4)  # fake-quantized x @ dequantized W


def test_int8_row_codes_are_the_existing_activation_quantizer():
    x = _x((20, 96), torch.bfloat16)
    codes, scale = quantize_rows_reference(x, torch.int8)
    expected_codes, expected_scale = quantize_activation_int8(x, "per_token")
    assert torch.equal(codes, expected_codes) and torch.equal(scale, expected_scale)


def test_fp8_codes_round_to_the_nearest_e4m3_value_with_the_row_max_at_448():
    x = _x((17, 80))
    codes, scale = quantize_rows_reference(x, torch.float8_e4m3fn)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (17, 1)
    assert torch.equal(codes.float().abs().amax(-1), torch.full((17,), 448.0))
    error = (codes.float() * scale - x).abs()
    assert (error <= x.abs() * 2 ** -4 + scale * 2 ** -9).all()  # half an e4m3 step (3 mantissa bits), subnormals


def test_fp8_reference_is_close_to_the_float_linear():
    linear = torch.nn.Linear(128, 48)
    weight, scale = quantize_fp8_weight(linear.weight)
    x = _x((4, 9, 128))
    out = fp8_linear(x, weight, scale, linear.bias)
    assert out.shape == (4, 9, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, fp8_linear_reference(x, weight, scale, linear.bias))
    assert rel_error(out, linear(x)) < 0.05  # e4m3 keeps 3 mantissa bits on both operands


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 64])
def test_int4_tinygemm_layout_computes_the_dequantized_linear(symmetric, group_size):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=gen) * (1 + torch.rand(64, 1, generator=gen) * 3)
    q = quantize_weight_rtn(weight, 4, group_size, symmetric)
    bias = torch.randn(64, generator=gen)
    x = _x((3, 5, 256), torch.bfloat16)
    tiny_group = group_size or 128  # per-channel scales repeated over groups of 128
    out = int4_linear(x, pack_int4(q.codes, "cpu"), tinygemm_scales_and_zeros(q.scale, q.zero, tiny_group, 256),
                      tiny_group, bias)
    truth = int4_linear_reference(x.float(), q.codes, q.scale, q.zero, bias)
    assert out.shape == (3, 5, 64) and out.dtype == torch.bfloat16
    assert rel_error(out, truth) < 0.01  # bf16 scales/zeros and output


def test_tinygemm_zero_points_follow_our_asymmetric_convention():
    scale, zero = torch.tensor([[0.5], [2.0]]), torch.tensor([[3.0], [-1.0]])
    packed = tinygemm_scales_and_zeros(scale, zero, 32, 64)
    assert packed.shape == (2, 2, 2) and packed.dtype == torch.bfloat16
    codes = torch.tensor([[-8], [7]]).float()
    ours = (codes - zero) * scale  # c in [-8, 7], w = (c - z) * s
    tiny = (codes + 8 - 8) * packed[0, :, 0:1].float() + packed[0, :, 1:2].float()  # q = c + 8, w = (q - 8) * s + z'
    torch.testing.assert_close(tiny, ours)


def test_int4_packing_refuses_out_of_range_codes_and_widths():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((8, 64), 9, dtype=torch.int8), "cpu")
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int4(torch.zeros(8, 48, dtype=torch.int8), "cpu")


def test_ops_say_what_is_wrong_with_their_arguments():
    weight, scale = _int8_weight(40, 64)
    with pytest.raises(ValueError, match="last dimension must be in_features=64"):
        int8_linear_dyn(torch.randn(2, 63), weight, scale, None)
    with pytest.raises(ValueError, match="bias must be"):
        fp8_linear(torch.randn(2, 64), *quantize_fp8_weight(torch.randn(40, 64)), torch.zeros(3))


@pytest.mark.parametrize("rows", [3, 40])  # <= 16 rows: padded for torch._int_mm
def test_int8_decomposed_form_is_the_exact_int8_gemm(rows):
    """What Inductor gets under torch.compile on CUDA: the same codes and int32 products as the op's reference."""
    weight, scale = _int8_weight(40, 64)
    x, bias = _x((rows, 64)), torch.randn(40)
    out = int8_linear_decomposed(x.reshape(1, rows, 64), weight, scale, bias)
    assert out.shape == (1, rows, 40)
    torch.testing.assert_close(out[0], int8_linear_reference(x, weight, scale, bias), rtol=1e-5, atol=1e-4)


def test_int8_gemm_rows_is_the_exact_int8_gemm_of_given_codes():
    """The opaque GEMM that compiled CUDA graphs call after their traced row quantization."""
    weight, scale = _int8_weight(40, 4608, seed=2)
    x, bias = _x((5, 4608)), torch.randn(40)
    codes, a_scale = quantize_rows_reference(x, torch.int8)
    out = torch.ops.compressdit.int8_gemm_rows(codes, a_scale, weight, scale, bias, torch.float32)
    exact = (codes.long() @ weight.long().t()).double() * a_scale.double() * scale.double() + bias.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(out, int8_linear_reference(x, weight, scale, bias), rtol=1e-4, atol=1e-3)


def test_fp8_decomposed_form_matches_the_reference():
    weight, scale = quantize_fp8_weight(torch.randn(48, 64))
    x, bias = _x((2, 5, 64), torch.bfloat16), torch.randn(48)
    out = fp8_linear_decomposed(x, weight, scale, bias)
    assert out.shape == (2, 5, 48) and out.dtype == torch.bfloat16
    assert rel_error(out, fp8_linear_reference(x, weight, scale, bias)) < 1e-2  # bf16 output of _scaled_mm


def test_ops_stay_opaque_custom_ops_when_compiled_for_cpu():
    """The decomposed forms are for CUDA graphs only: on CPU a compiled graph keeps the custom op."""
    weight, scale = _int8_weight(40, 64)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: int8_linear_dyn(x, weight, scale, None), backend=backend, fullgraph=True)
    x = _x((4, 64))
    torch.testing.assert_close(compiled(x), int8_linear_reference(x, weight, scale, None), rtol=1e-5, atol=1e-4)
    assert "compressdit.int8_linear_dyn" in graphs[0].code and "_int_mm" not in graphs[0].code


# ------------------------------------------------------------------------------------------------ fake impls, compile

def test_fake_impls_give_shapes_and_dtypes_without_computing():
    weight, scale = _int8_weight(40, 64)
    fp8_weight, fp8_scale = quantize_fp8_weight(torch.randn(48, 64))
    sz = tinygemm_scales_and_zeros(torch.ones(32, 1), None, 32, 64)
    packed = pack_int4(torch.zeros(32, 64, dtype=torch.int8), "cpu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 7, 64, dtype=torch.bfloat16))
        for out, n in ((int8_linear_dyn(x, weight, scale, None, "triton"), 40),
                       (fp8_linear(x, fp8_weight, fp8_scale, torch.zeros(48)), 48),
                       (int4_linear(x, packed, sz, 32, None), 32)):
            assert out.shape == (2, 7, n) and out.dtype == torch.bfloat16
            assert type(out).__name__ == "FakeTensor"
    for op in ("int8_linear_dyn", "int8_gemm_rows", "fp8_linear", "int4_linear"):
        torch.library.opcheck(getattr(torch.ops.compressdit, op), _opcheck_args(op), test_utils=("test_faketensor",))


def _opcheck_args(op: str):
    x = torch.randn(3, 64)
    if op == "int8_linear_dyn":
        return (x, *_int8_weight(40, 64), torch.randn(40), "cublas")
    if op == "int8_gemm_rows":
        return (*quantize_rows_reference(x, torch.int8), *_int8_weight(40, 64), torch.randn(40), torch.bfloat16)
    if op == "fp8_linear":
        return (x, *quantize_fp8_weight(torch.randn(48, 64)), None)
    return (x.bfloat16(), pack_int4(torch.zeros(32, 64, dtype=torch.int8), "cpu"),
            tinygemm_scales_and_zeros(torch.ones(32, 1), None, 32, 64), 32, None)


@pytest.mark.parametrize("spec,name", [
    (LinearQuantSpec(w_bits=8, a_bits=8), "int8-cublas"),
    (LinearQuantSpec(format="fp8", w_bits=8, a_bits=8), "fp8-scaled-mm"),
    (LinearQuantSpec(w_bits=4, group_size=64, w_symmetric=False), "int4-tinygemm"),
    (LinearQuantSpec(w_bits=4), "int4-tinygemm"),
])
def test_kernel_contract_prepare_then_call_matches_the_layer(spec, name):
    """The wiring contract on CPU (the ops run their references there): prepare(layer), kernel(x, prepared, bias)."""
    from compressdit.quant.formats import FORMATS

    torch.manual_seed(0)
    layer = FORMATS.get(spec.format).quantize(torch.nn.Linear(256, 64), spec, None)
    kernel = kernel_for_spec(spec, 256, 64, int8_backend="cublas")
    assert kernel is not None and kernel.name == name
    x = _x((2, 9, 256))
    with torch.no_grad():
        out = kernel(x, kernel.prepare(layer), layer.bias)
        truth = layer.reference_forward(x)
    assert out.shape == truth.shape and out.dtype == x.dtype
    assert rel_error(out, truth) < (1e-2 if spec.w_bits == 4 else 1e-5)  # tinygemm: bf16 activations and scales


def test_no_kernel_for_what_the_kernels_do_not_cover():
    assert kernel_for_spec(LinearQuantSpec(w_bits=8, a_bits=8, group_size=64), 256, 64) is None
    assert kernel_for_spec(LinearQuantSpec(w_bits=4, a_bits=8), 256, 64) is None
    assert kernel_for_spec(LinearQuantSpec(format="fp8", w_bits=8, a_bits=8), 256, 64, capability=(8, 0)) is None
    assert kernel_for_spec(LinearQuantSpec(w_bits=8, a_bits=8), 252, 64) is None


def test_no_gpu_kernel_off_cuda():
    spec = LinearQuantSpec(w_bits=8, a_bits=8)
    assert gpu_kernel_for(spec, "cpu", 64, 64) is None
    assert int4_group_size(LinearQuantSpec(w_bits=4), 1152) == 128
    assert int4_group_size(LinearQuantSpec(w_bits=4, group_size=48), 1152) is None


# ------------------------------------------------------------------------------------------------ CUDA

@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("rows", [1, 16, 17, 300])
@pytest.mark.parametrize("in_features,out_features", DIT_XL_SHAPES[:2] + [(64, 40)])
def test_cuda_int8_matches_the_reference(backend, rows, in_features, out_features):
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    weight, scale = _int8_weight(out_features, in_features, "cuda")
    bias = torch.randn(out_features, device="cuda")
    x = _x((rows, in_features), torch.bfloat16, "cuda")
    out = int8_linear_dyn(x, weight, scale, bias, backend)
    truth = int8_linear_reference(x.float(), weight, scale, bias)  # same int8 codes, fp32 output
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    assert rel_error(out, truth) < 4e-3  # bf16 output rounding; int32 accumulation is exact


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("shape", [(1, 1152), (300, 4608), (7, 5000)])
def test_cuda_triton_row_quantizer_is_bit_exact(qdtype, shape):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from compressdit.quant.gpu_triton import quantize_rows

    x = _x(shape, torch.bfloat16, "cuda")
    codes, scale = quantize_rows(x, qdtype)
    expected_codes, expected_scale = quantize_rows_reference(x, qdtype)
    assert torch.equal(scale, expected_scale)
    mismatch = (codes.float() != expected_codes.float()).float().mean().item()
    assert mismatch < 1e-4, f"{mismatch:.2%} of the codes differ"  # ties may round apart under fast division


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("in_features,out_features", DIT_XL_SHAPES[2:] + [(64, 48)])
def test_cuda_fp8_matches_the_reference(rows, with_bias, in_features, out_features):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 _scaled_mm needs compute capability 8.9")
    weight, scale = quantize_fp8_weight(torch.randn(out_features, in_features, device="cuda"))
    bias = torch.randn(out_features, device="cuda") if with_bias else None
    x = _x((rows, in_features), torch.bfloat16, "cuda")
    out = fp8_linear(x, weight, scale, bias)
    truth = fp8_linear_reference(x.float(), weight, scale, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    assert rel_error(out, truth) < 1e-2  # same e4m3 codes; fast accumulation and bf16 output


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("group_size,symmetric", [(None, True), (128, False), (64, True)])
@pytest.mark.parametrize("in_features,out_features", [(1152, 1152), (4608, 1152), (256, 64)])
def test_cuda_int4_tinygemm_matches_the_reference(rows, group_size, symmetric, in_features, out_features):
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features)
    spec = LinearQuantSpec(w_bits=4, group_size=group_size, w_symmetric=symmetric)
    layer = QuantLinear.from_linear(linear, spec).cuda()
    kernel = gpu_kernel_for(spec, "cuda", in_features, out_features)
    assert kernel is not None and kernel.name == "int4-tinygemm"
    x = torch.randn(rows, in_features, generator=gen).to("cuda", torch.bfloat16)
    out = kernel(x, kernel.prepare(layer), layer.bias)
    truth = int4_linear_reference(x.float(), layer.codes(), layer.weight_scale, layer.weight_zero, layer.bias)
    assert out.dtype == torch.bfloat16 and rel_error(out, truth) < 1e-2  # bf16 scales, zeros and output


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("spec,name", [(LinearQuantSpec(w_bits=8, a_bits=8), "int8-"),
                                       (LinearQuantSpec(format="fp8", w_bits=8, a_bits=8), "fp8-scaled-mm")])
def test_cuda_kernels_for_layers_match_the_layers_cpu_reference(spec, name):
    from compressdit.quant.formats import FORMATS

    if spec.format == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 _scaled_mm needs compute capability 8.9")
    layer = FORMATS.get(spec.format).quantize(torch.nn.Linear(1152, 4608), spec, None)
    x = _x((2, 256, 1152)).bfloat16().float()  # the values the GPU path sees
    with torch.no_grad():
        truth = layer(x)  # CPU: reference path
        layer = layer.cuda()
        kernel = gpu_kernel_for(spec, "cuda", 1152, 4608)
        assert kernel is not None and kernel.name.startswith(name)
        out = kernel(x.cuda().bfloat16(), kernel.prepare(layer), layer.bias)
    assert rel_error(out.cpu(), truth) < 1e-2


@pytest.mark.cuda
@CUDA
def test_cuda_compiled_model_equals_eager():
    from compressdit.quant.formats import FORMATS

    specs = [LinearQuantSpec(w_bits=8, a_bits=8), LinearQuantSpec(format="fp8", w_bits=8, a_bits=8),
             LinearQuantSpec(w_bits=4, group_size=128)]
    layers = [FORMATS.get(s.format).quantize(torch.nn.Linear(256, 256, dtype=torch.bfloat16), s, None)
              for s in specs]
    model = torch.nn.Sequential(*layers, torch.nn.GELU()).cuda()
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2 * float(eager.abs().max()))
    assert F.mse_loss(compiled.float(), eager.float()) < 1e-3 * float(eager.float().pow(2).mean())


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("rows", [1, 300, 4096])
def test_cuda_int8_gemm_rows_matches_the_reference(rows):
    weight, scale = _int8_weight(1152, 4608, "cuda")
    codes, a_scale = quantize_rows_reference(_x((rows, 4608), torch.bfloat16, "cuda"), torch.int8)
    bias = torch.randn(1152, device="cuda")
    out = torch.ops.compressdit.int8_gemm_rows(codes, a_scale, weight, scale, bias, torch.bfloat16)
    truth = _int8_gemm_reference_cpu(codes, a_scale, weight, scale, bias)
    assert out.dtype == torch.bfloat16 and rel_error(out.cpu(), truth) < 1e-2  # bf16 output rounding


def _int8_gemm_reference_cpu(codes, a_scale, weight, scale, bias):
    return torch.ops.compressdit.int8_gemm_rows(codes.cpu(), a_scale.cpu(), weight.cpu(), scale.cpu(), bias.cpu(),
                                                torch.float32)


@pytest.mark.cuda
@CUDA
def test_cuda_compiled_graph_holds_the_decomposed_int8_and_fp8_forms():
    """Under torch.compile on CUDA, the row quantization of W8A8 and FP8 traces to ATen ops (Inductor fuses it
    into the producer of x) before an opaque int8 GEMM / ``_scaled_mm``; equal to the eager ops within bf16
    rounding."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    weight, scale = _int8_weight(256, 256, "cuda")
    fp8_weight, fp8_scale = quantize_fp8_weight(torch.randn(256, 256, device="cuda"))
    use_fp8 = torch.cuda.get_device_capability() >= (8, 9)

    def f(x):
        y = int8_linear_dyn(torch.nn.functional.layer_norm(x, (256,)), weight, scale, None)
        return fp8_linear(y, fp8_weight, fp8_scale, None) if use_fp8 else y

    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = f(x)
        traced = torch.compile(f, backend=backend, fullgraph=True)(x)
        inductor = torch.compile(f, fullgraph=True)(x)
    assert "compressdit.int8_gemm_rows" in graphs[0] and "compressdit.int8_linear_dyn" not in graphs[0]
    assert not use_fp8 or ("_scaled_mm" in graphs[0] and "compressdit.fp8_linear" not in graphs[0])
    for out in (traced, inductor):
        assert rel_error(out, eager) < 2e-2


# -- int4: packed GEMM at few rows, dequantize + dense GEMM above INT4_PACKED_MAX_ROWS --------------------------

from compressdit.quant.gpu_reference import (INT4_PACKED_MAX_ROWS, dequantize_nibbles,  # noqa: E402
                                             int4_uses_packed_gemm, pack_nibbles)


def test_int4_dispatch_switches_to_the_dense_path_above_the_row_threshold():
    for device, limit in INT4_PACKED_MAX_ROWS.items():
        assert int4_uses_packed_gemm(1, device) and int4_uses_packed_gemm(limit, device)
        assert not int4_uses_packed_gemm(limit + 1, device) and not int4_uses_packed_gemm(4096, device)
    assert INT4_PACKED_MAX_ROWS["cpu"] < 256 <= INT4_PACKED_MAX_ROWS["cuda"] < 1024  # bench/results/*.md


def _int4_case(symmetric: bool, group_size: int | None):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 256, generator=gen) * (1 + torch.rand(64, 1, generator=gen) * 3)
    q = quantize_weight_rtn(weight, 4, group_size, symmetric)
    tiny_group = group_size or 128
    return q, tiny_group, tinygemm_scales_and_zeros(q.scale, q.zero, tiny_group, 256), torch.randn(64, generator=gen)


@pytest.mark.parametrize("symmetric,group_size", [(True, 64), (False, 32), (True, None)])
def test_int4_nibbles_dequantize_to_the_tinygemm_weight(symmetric, group_size):
    q, tiny_group, sz, _ = _int4_case(symmetric, group_size)
    weight = dequantize_nibbles(pack_nibbles(q.codes), sz[..., 0].t(), sz[..., 1].t(), tiny_group)
    codes = q.codes.float().reshape(64, q.scale.shape[1], -1)  # w = (c - z) * s per group
    zero = 0 if q.zero is None else q.zero.float().unsqueeze(-1)
    truth = ((codes - zero) * q.scale.float().unsqueeze(-1)).reshape(64, 256)
    assert weight.dtype == torch.bfloat16 and weight.shape == (64, 256)
    assert rel_error(weight.float(), truth) < 1e-2  # bf16 scales, zeros and products


@pytest.mark.parametrize("symmetric,group_size", [(True, 64), (False, 32)])
def test_int4_linear_takes_the_dense_path_only_above_the_cpu_threshold(symmetric, group_size):
    q, tiny_group, sz, bias = _int4_case(symmetric, group_size)
    packed, nibbles = pack_int4(q.codes, "cpu"), pack_nibbles(q.codes)
    dense_weight = dequantize_nibbles(nibbles, sz[..., 0].t(), sz[..., 1].t(), tiny_group)
    limit = INT4_PACKED_MAX_ROWS["cpu"]
    for rows in (limit, limit + 1, 3 * limit):
        x = _x((rows, 256), torch.bfloat16)
        out = int4_linear(x, packed, sz, tiny_group, bias, nibbles)
        packed_only = int4_linear(x, packed, sz, tiny_group, bias)
        dense = (F.linear(x, dense_weight) + bias.bfloat16()).to(x.dtype)
        torch.testing.assert_close(out, packed_only if rows <= limit else dense, rtol=0, atol=0)
        assert rel_error(out, int4_linear_reference(x.float(), q.codes, q.scale, q.zero, bias)) < 0.01


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("rows", [16, INT4_PACKED_MAX_ROWS["cuda"] + 1, 1024])
def test_cuda_int4_linear_matches_the_reference_on_both_sides_of_the_threshold(rows):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs compute capability 8.0")
    q, tiny_group, sz, bias = _int4_case(False, 64)
    x = _x((rows, 256), torch.bfloat16)
    out = int4_linear(x.cuda(), pack_int4(q.codes, "cuda"), sz.cuda(), tiny_group, bias.cuda(),
                      pack_nibbles(q.codes).cuda())
    truth = int4_linear_reference(x.float(), q.codes, q.scale, q.zero, bias)
    assert out.shape == (rows, 64) and out.dtype == torch.bfloat16
    assert rel_error(out.cpu(), truth) < 0.01
