"""The INT8 GEMM path computes what the dequantize-then-matmul reference computes."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant.kernels import int8_linear, quantize_activation_int8
from compressdit.quant.layers import QuantLinear
from compressdit.quant.spec import LinearQuantSpec


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_int8_linear_matches_the_reference_path(granularity):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 40)
    layer = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=8, a_bits=8, a_granularity=granularity))
    x = torch.randn(3, 11, 64) * torch.linspace(0.1, 5, 64)
    reference = layer(x)  # CPU: fake-quantized activations, dequantized weight
    fast = int8_linear(x, layer.weight.data, layer.weight_scale, layer.bias, granularity)
    assert fast.shape == reference.shape
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


def test_int8_activation_codes_round_trip_within_half_a_step():
    x = torch.randn(20, 32)
    codes, scale = quantize_activation_int8(x, "per_token")
    assert codes.dtype == torch.int8 and scale.shape == (20, 1)
    assert ((codes.float() * scale - x).abs() <= scale / 2 + 1e-6).all()
    assert (codes.abs().amax(-1) == 127).all()


# -- the kernel registry and the CPU kernels ---------------------------------------------------------------------

import copy  # noqa: E402

from compressdit.quant.kernel_registry import (KERNELS, REFERENCE, cache_of, kernel_summary,  # noqa: E402
                                               prepack_model, select_kernel, set_kernel)
from compressdit.quant.cpu_dense import _bf16_hardware, decoded_kernel_name, dense_kernel_name  # noqa: E402
from compressdit.quant import cpu_kernels  # noqa: E402
from compressdit.quant.cpu_kernels import int8_group_gemm_isa, vnni_int8_gemm  # noqa: E402
from compressdit.quant.cpu_native import group_gemm_isa  # noqa: E402
from compressdit.quant.vq_layer import VQLinear  # noqa: E402

DENSE = dense_kernel_name((96, 256))  # the small weight-only layers below: fp32 (bf16 from BF16_MIN_WEIGHT, or on AMX)
DENSE_BOUND = (6e-3, 0.2) if DENSE == "cpu-int-dense-bf16" else (1e-5, 0.01)  # bf16 rounding / summation order


def _small_decoded(spec: LinearQuantSpec) -> tuple:
    """The kernel and bounds of a small layer of a format no int kernel reads: fp32 (summation order), or bf16 on AMX's
    microkernel (bf16 rounding)."""
    kernel = decoded_kernel_name(spec, (96, 256))
    return (kernel, 6e-3, 0.2) if kernel == "cpu-decoded-bf16" else (kernel, 1e-5, 0.01)



# big layers no int4 / int8 kernel reads: decoded once into bf16 on CPUs with bf16 GEMMs, else the reference
BIG_DECODED = ("cpu-decoded-bf16", 6e-3, 0.2) if _bf16_hardware()[1] else ("cpu-decoded-fp32", 1e-5, 0.01)

# big W4A8 layers: without AMX group_gemm's tiles at any size (AVX512-VNNI or AVX2; their codes as int8), on AMX too
# big for an int8 copy: the packed int4 GEMM on fake-quantized activations
BIG_W4A8 = (("cpu-int8-gemm", 1e-5, 0.01), ("cpu-int8-group-gemm", 1e-5, 0.01)) if int8_group_gemm_isa() else (
    ("cpu-int4-weight", 6e-3, 0.2),) * 2

# spec, kernel, bound on ||kernel - reference|| / ||reference||, on that error / the quantization error, and
# out_features (x 256 in_features): 96 is a small layer, BIG one above DENSE_MAX_WEIGHT / INT8_GEMM_SMALL_WEIGHT
BIG = 1040
CPU_CASES = [
    (LinearQuantSpec(w_bits=8, a_bits=8), "cpu-int8-gemm", 1e-5, 0.01, 96),  # same int8 codes: summation order
    (LinearQuantSpec(w_bits=8, a_bits=8), "cpu-int8-gemm", 1e-5, 0.01, BIG),  # group_gemm / AMX microkernel
    (LinearQuantSpec(w_bits=8, a_bits=8, a_granularity="per_tensor"), "cpu-int8-gemm", 1e-5, 0.01, 96),
    (LinearQuantSpec(w_bits=8, a_bits=8, a_granularity="per_tensor"), "cpu-int8-gemm", 1e-5, 0.01, BIG),
    (LinearQuantSpec(w_bits=8, a_bits=8, rotation="hadamard"), "cpu-int8-gemm", 1e-5, 0.01, 96),
    (LinearQuantSpec(w_bits=4, a_bits=8), "cpu-int8-gemm", 1e-5, 0.01, 96),  # W4A8 per channel: codes as int8
    (LinearQuantSpec(w_bits=4, a_bits=8), *BIG_W4A8[0], BIG),
    (LinearQuantSpec(w_bits=4, group_size=64), "cpu-int4-weight", 6e-3, 0.2, BIG),  # bf16 activations, output
    (LinearQuantSpec(w_bits=4, group_size=32, w_symmetric=False), "cpu-int4-weight", 6e-3, 0.2, BIG),
    (LinearQuantSpec(w_bits=4), "cpu-int4-weight", 6e-3, 0.2, BIG),
    (LinearQuantSpec(w_bits=3, group_size=128), "cpu-int4-weight", 6e-3, 0.2, BIG),
    (LinearQuantSpec(w_bits=4, a_bits=8, group_size=128), *BIG_W4A8[1], BIG),
    (LinearQuantSpec(w_bits=4, group_size=64), DENSE, *DENSE_BOUND, 96),  # decoded once
    (LinearQuantSpec(w_bits=2, group_size=32, w_symmetric=False), DENSE, *DENSE_BOUND, 96),
    (LinearQuantSpec(w_bits=4, group_size=16), *_small_decoded(LinearQuantSpec(w_bits=4, group_size=16)), 96),
    (LinearQuantSpec(w_bits=4, group_size=16), *BIG_DECODED, BIG),  # ... the fp32 copy only where it is small
    (LinearQuantSpec(w_bits=4, a_bits=8, group_size=64), "cpu-int8-group-gemm", 1e-5, 0.01, 96),
    (LinearQuantSpec(w_bits=4, a_bits=8, group_size=64, a_granularity="per_tensor"), "cpu-int8-group-gemm", 1e-5,
     0.01, 96),
    (LinearQuantSpec(w_bits=4, a_bits=8, group_size=64, w_symmetric=False), DENSE, *DENSE_BOUND, 96),
    # bf16 rounding is not small next to 8-bit weights: stated in cpu_kernels' docstring
    (LinearQuantSpec(w_bits=8), "cpu-int8-weight", 6e-3, 1.0, BIG),
    (LinearQuantSpec(w_bits=8), "cpu-int-dense-fp32", 1e-5, 0.01, 96),  # small: decoded once, fp32 at any threads
    (LinearQuantSpec(w_bits=8, group_size=64), "cpu-decoded-dense", 1e-5, 0.01, 96),  # no grouped int8 kernel; fp32
]


def _layer(spec, in_features=256, out_features=96, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(out_features, 1) * 3 + 0.2)
    return linear, QuantLinear.from_linear(linear, spec)


@pytest.mark.parametrize("spec,kernel,bound,share,out_features", CPU_CASES,
                         ids=lambda v: getattr(v, "label", str(v)))
@pytest.mark.parametrize("rows", [1, 21])
def test_cpu_kernel_matches_the_reference_within_its_bound(spec, kernel, bound, share, out_features, rows):
    linear, layer = _layer(spec, out_features=out_features)
    assert layer.kernel_name == kernel
    x = torch.randn(rows, 1, 256) * torch.linspace(0.1, 4, 256)
    with torch.no_grad():
        out, reference, exact = layer(x), layer.reference_forward(x), linear(x)
    assert out.shape == reference.shape == (rows, 1, out_features)
    error = ((out - reference).norm() / reference.norm()).item()
    assert error <= bound
    assert error <= share * ((reference - exact).norm() / exact.norm()).item()


def test_small_and_big_layers_pick_their_kernels_by_weight_count():
    from compressdit.quant.cpu_dense import DENSE_MAX_WEIGHT
    from compressdit.quant.cpu_kernels import INT8_GEMM_SMALL_WEIGHT
    from compressdit.quant.cpu_native import int8_brgemm

    cpu = torch.device("cpu")
    w4, w4a8 = LinearQuantSpec(w_bits=4, group_size=64), LinearQuantSpec(w_bits=4, a_bits=8)
    assert select_kernel(w4, cpu, (DENSE_MAX_WEIGHT // 256, 256)) == dense_kernel_name((DENSE_MAX_WEIGHT // 256, 256))
    assert select_kernel(w4, cpu, (DENSE_MAX_WEIGHT // 256 + 16, 256)) == "cpu-int4-weight"
    assert select_kernel(w4a8, cpu, (INT8_GEMM_SMALL_WEIGHT // 256, 256)) == "cpu-int8-gemm"
    assert select_kernel(w4a8, cpu, (INT8_GEMM_SMALL_WEIGHT // 256 + 16, 256)) == BIG_W4A8[0][0]
    assert select_kernel(LinearQuantSpec(w_bits=8, a_bits=8), cpu, (4096, 4096)) == "cpu-int8-gemm"
    small, big = _layer(LinearQuantSpec(w_bits=8, a_bits=8))[1], _layer(LinearQuantSpec(w_bits=8, a_bits=8),
                                                                        out_features=BIG)[1]
    with torch.no_grad():
        small(torch.randn(2, 256)), big(torch.randn(2, 256))
    assert cache_of(small).buffers["packed"] is None  # torch._int_mm on the layer's own codes: no copy
    assert cache_of(small).buffers["codes"].data_ptr() == small.weight.data_ptr()
    microkernel = cache_of(small).buffers["microkernel"]  # AMX-INT8: the codes packed for oneDNN's microkernel
    assert (microkernel is not None) == int8_brgemm()
    isa = int8_group_gemm_isa()  # elsewhere group_gemm (AVX512-VNNI, or AVX2's signed activation codes), on the
    for layer in (small, big):  # layer's own codes
        gemm = cache_of(layer).buffers["gemm_packed"]
        assert (gemm is not None) == (isa is not None)
        assert gemm is None or gemm.data_ptr() == layer.weight.data_ptr()
    copies = 1 if microkernel is None else 1 + microkernel.numel() / small.weight.numel()
    assert cache_of(small).nbytes() < small.weight.numel() * copies + 4096  # the codes are not counted twice
    # a packed copy (1 byte per weight) only for AMX's microkernel, or else oneDNN's GEMM where its sums are exact
    # (VNNI); none on group_gemm (scales and corrections: 8 bytes a channel)
    assert (cache_of(big).buffers["microkernel"] is not None) == int8_brgemm()
    assert (cache_of(big).buffers["packed"] is not None) == (isa is None and not int8_brgemm()
                                                              and cpu_kernels.onednn_u8s8_exact())
    if isa is not None:
        assert cache_of(big).nbytes() < 16 * big.out_features + 4096


@pytest.mark.parametrize("spec", [LinearQuantSpec(w_bits=4, a_bits=8), LinearQuantSpec(w_bits=4, a_bits=8, group_size=64),
                                  LinearQuantSpec(w_bits=4, group_size=16, a_bits=4, a_granularity="per_group",
                                                  a_group_size=16)], ids=["w4a8", "w4a8-g64", "w4a4-g16"])
def test_four_bit_weights_on_group_gemm_keep_no_copy_or_half_a_byte(spec):
    """Where 4-bit layers of any size run group_gemm (W4A8: without AMX; W4A4: cpu-int-groups; AVX512-VNNI or AVX2),
    on AVX512-VNNI they keep no copy of their codes (the layer's nibbles read as stored, through the 16-entry
    table where given): only the groups' scales and corrections, 8 bytes a group of a channel (W4A4: the scales
    alone, the GEMM computing the corrections; so on AVX2 too); W4A8 on AVX2 packs its codes as nibbles: the
    prepacked copy is half a byte a weight besides those; never an unpacked copy; elsewhere no table."""
    from compressdit.quant.cpu_kernels import integer_groups_apply

    on_group_gemm = int8_group_gemm_isa() is not None if spec.a_bits == 8 else integer_groups_apply(spec, (BIG, 256))
    _, layer = _layer(spec, out_features=BIG)
    with torch.no_grad():
        layer(torch.randn(3, 256))
    buffers = cache_of(layer).buffers
    table = buffers.get("gemm_table", buffers.get("table"))
    if not on_group_gemm:
        assert table is None and layer.kernel_name != "cpu-int-groups"
        return
    packed = buffers.get("gemm_packed", buffers.get("packed"))
    if spec.a_bits == 8 and spec.group_size is None and vnni_int8_gemm():  # one group: the layer's own nibbles
        assert packed.data_ptr() == layer.weight.data_ptr() and table is None
        assert buffers.get("codes") is None and buffers.get("codes_t") is None
        assert cache_of(layer).nbytes() < 16 * BIG + 4096  # a channel's fp32 scale and int32 correction
        return
    assert buffers.get("codes") is None and buffers.get("codes_t") is None and table.shape == (16,)
    group = spec.group_size or 256  # a group's fp32 scale and int32 correction a channel
    if spec.a_bits == 4:  # cpu-int-groups: the stored nibbles, the corrections computed in the GEMM, only the scales
        assert packed.data_ptr() == layer.weight.data_ptr()  # kept (AVX512-VNNI and AVX2)
        assert buffers["corr"] is None and cache_of(layer).nbytes() < BIG * 256 * (4 / group + 0.05)
    elif group_gemm_isa() == "avx512-vnni":
        assert packed.data_ptr() == layer.weight.data_ptr()
        assert cache_of(layer).nbytes() < BIG * 256 * (8 / group + 0.05)
    else:
        assert packed.dtype == torch.uint8 and packed.numel() == -(-BIG // 32) * 32 * 256 // 2
        assert cache_of(layer).nbytes() < BIG * 256 * (0.5 + 8 / group + 0.05)


def test_dense_kernels_fake_quantize_activations_as_the_reference():
    from compressdit.quant.cpu_dense import fake_quantize_input
    from compressdit.quant.primitives import fake_quantize_activation

    x = torch.randn(5, 7, 64) * torch.linspace(0.01, 9, 64)
    x[0, 0] = 0  # an all-zero token: the scale's floor
    for bits, granularity, scale in ((8, "per_token", None), (4, "per_tensor", None),
                                     (8, "static", torch.tensor(0.02))):
        assert torch.equal(fake_quantize_input(x.clone(), bits, granularity, scale),
                           fake_quantize_activation(x, bits, granularity, scale))


def test_fp8_layers_decode_once_on_cpu_and_match_the_reference():
    from compressdit.quant.cpu_dense import fp8_kernel_name
    from compressdit.quant.fp8_layer import FP8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    for a_bits in (8, None):
        layer = FP8Linear.from_linear(linear, LinearQuantSpec(format="fp8", w_bits=8, a_bits=a_bits))
        assert layer.kernel_name == fp8_kernel_name(a_bits, (48, 64))
        set_kernel(layer, "cpu-fp8-dense")  # the exact one (cpu-fp8-bf16: tests/quant/test_quant_cpu_dense.py)
        x = torch.randn(3, 5, 64)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


_INT8_GEMMS = [(LinearQuantSpec(w_bits=8, a_bits=8), shape) for shape in ((96, 256), (BIG, 200))] + [
    (LinearQuantSpec(w_bits=8, a_bits=8, a_granularity="per_tensor"), (BIG, 200)),  # 200: past whole 64-byte blocks
    (LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5), (BIG, 200)),
    (LinearQuantSpec(w_bits=4, a_bits=8, group_size=64), (96, 256)),  # cpu-int8-group-gemm
    # more than 16 codes: no nibbles (6 bits per channel refused to run here before: "63 distinct weight codes")
    (LinearQuantSpec(w_bits=6, a_bits=8), (96, 256)), (LinearQuantSpec(w_bits=5, a_bits=8, group_size=64), (96, 256)),
    (LinearQuantSpec(w_bits=3, a_bits=8), (96, 256)),
    (LinearQuantSpec(w_bits=4, a_bits=8, group_size=32, a_granularity="per_tensor"), (72, 96))]


@pytest.mark.parametrize("spec, shape", _INT8_GEMMS, ids=lambda v: getattr(v, "label", str(v)))
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_activations_on_group_gemm_are_the_torch_paths_bit_for_bit(spec, shape, threads, monkeypatch):
    """On AVX512-VNNI CPUs without AMX's microkernel every row count of cpu-int8-gemm and cpu-int8-group-gemm runs
    group_gemm's VNNI tiles (the activation codes + 128 against the codes, 128 * each channel's sums taken back, the
    groups' sums times their weight scales added up, then times the row's scale): the same int32 sums and
    dequantization as torch._int_mm's and oneDNN's paths (the same layer prepacked without that path), so the same
    outputs bit for bit (bf16 rows too; with a divisor the reference's bf16 division first; grouped weights at up to 4
    rows, each channel's row multiplied in place, up to fp32 summation order); no other copy of the weight kept;
    elsewhere nothing is packed for it."""
    from compressdit.quant import cpu_kernels, cpu_native
    from compressdit.quant.kernel_registry import cache_of

    out_features, in_features = shape
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features)
    layer = QuantLinear.from_linear(linear, spec, input_absmax=torch.rand(in_features) * 4 + 0.1)
    before = copy.deepcopy(layer)
    monkeypatch.setattr(cpu_native, "GROUP_GEMM_TEAM_MIN_WORK", 0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            layer(torch.randn(1, in_features))
            b = cache_of(layer).buffers
            assert layer.kernel_name == ("cpu-int8-gemm" if spec.group_size is None else "cpu-int8-group-gemm")
            if b["gemm_packed"] is None:
                assert not cpu_kernels.vnni_int8_gemm()
                return
            assert b.get("packed") is None  # no oneDNN copy besides
            assert spec.w_bits == 8 or b.get("codes_t", b["codes"]) is None  # nor unpacked 4-bit codes
            with monkeypatch.context() as patch:  # the paths before: torch._int_mm's C++ op / oneDNN, same codes
                patch.setattr(cpu_kernels, "group_gemm_isa", lambda: None)
                if not cpu_kernels.onednn_u8s8_exact():  # its 16-bit pairs saturate here: torch._int_mm only
                    patch.setattr(cpu_kernels, "INT8_GEMM_SMALL_WEIGHT", 1 << 40)
                before(torch.randn(1, in_features))
            assert cache_of(before).buffers["gemm_packed"] is None and before.kernel_name == layer.kernel_name
            for rows in (1, 3, 7, 16, 61):  # whole tiles of 6 rows and a tail
                for x in (torch.randn(rows, in_features) * 3, (torch.randn(2, rows, in_features) * 3).bfloat16()):
                    out, expected = layer(x), before(x)
                    assert out.dtype == x.dtype
                    if spec.group_size is not None and x.numel() <= 4 * in_features:  # lane-wise group sums
                        torch.testing.assert_close(out.float(), expected.float(), atol=1e-5 * float(
                            expected.abs().max()), rtol=1e-5 if x.dtype == torch.float32 else 8e-3)
                    else:
                        assert torch.equal(out, expected), (rows, x.dtype)
            if spec.group_size is None:
                assert cpu_kernels._int8_gemm_run_activated(layer, torch.randn(4, in_features), b, "gelu-tanh") is None
    finally:
        torch.set_num_threads(previous)


def test_w8a8_kernel_is_exact_at_the_int16_saturation_corner():
    """u8 x s8 pairs of 255 * 127 overflow int16 in AVX2 vpmaddubsw; the result must still be exact."""
    linear, layer = _layer(LinearQuantSpec(w_bits=8, a_bits=8), in_features=128, out_features=32)
    with torch.no_grad():
        layer.weight.data.fill_(127)
        layer.weight.data[1::2] = -128
        x = torch.ones(4, 128)
        x[1] = -1
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4_kernel_is_the_reference_with_bf16_inputs_and_scales_up_to_its_bf16_output(symmetric):
    """The kernel's numerics exactly, few rows: on CPUs with AVX512-BF16 ``int4_dot`` (activations rounded to bf16, fp32
    scales and sums: the reference on the rounded activations up to fp32 summation), elsewhere the packed int4 GEMM
    (activations and group scales rounded to bf16, product rounded to bf16)."""
    from compressdit.quant.cpu_dense import bf16_hardware
    from compressdit.quant.cpu_native import int4_dot_ready
    from compressdit.quant.kernel_registry import cache_of

    linear, layer = _layer(LinearQuantSpec(w_bits=4, group_size=32, w_symmetric=symmetric), out_features=BIG)
    assert layer.kernel_name == "cpu-int4-weight"
    layer.bias = None  # added in fp32 after the bf16 product: its cancellation would only hide rounding
    x = torch.randn(5, 256)
    with torch.no_grad():
        out = layer(x)
        dot = cache_of(layer).buffers["dot_packed"] is not None
        assert dot == (int4_dot_ready() and bf16_hardware())
        assert dot == (cache_of(layer).buffers["packed"] is None)  # no copy for the packed GEMM beside it
        if dot:  # the kernel reads the layer's stored nibbles: no packed copy of the weight
            assert cache_of(layer).buffers["dot_packed"].data_ptr() == layer.weight.data_ptr()
        if dot:
            reference = layer.reference_forward(x.bfloat16().float())
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
            return
        layer.weight_scale.copy_(layer.weight_scale.bfloat16().float())
        reference = layer.reference_forward(x.bfloat16().float())
    assert ((out - reference).abs() <= reference.abs() * 2 ** -8 + 1e-3).all()


@pytest.mark.parametrize("amx", [False, True])
def test_int4_dot_takes_its_rows_and_no_more(amx, monkeypatch):
    """Up to ``INT4_DOT_MAX_ROWS`` rows (on AMX CPUs the packed GEMM's 64: above them the bf16 decode's GEMM runs on
    AMX tiles), never beyond; where it does not run (no AVX512-BF16) never at all."""
    from compressdit.quant import cpu_kernels
    from compressdit.quant.cpu_dense import bf16_hardware
    from compressdit.quant.cpu_native import int4_dot_ready
    from compressdit.quant.gpu_reference import INT4_PACKED_MAX_ROWS

    monkeypatch.setattr(cpu_kernels, "amx_bf16", lambda: amx)
    _, layer = _layer(LinearQuantSpec(w_bits=4, group_size=64), out_features=BIG)
    calls = []
    real = cpu_kernels.int4_dot
    monkeypatch.setattr(cpu_kernels, "int4_dot", lambda *a: (calls.append(a[0].shape[0]), real(*a))[1])
    limit = INT4_PACKED_MAX_ROWS["cpu"] if amx else cpu_kernels.INT4_DOT_MAX_ROWS
    with torch.no_grad():
        for rows in (1, limit, limit + 1):
            x = torch.randn(rows, 256)
            torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=2e-2, atol=2e-2)
    assert calls == ([1, limit] if int4_dot_ready() and bf16_hardware() else [])


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 13, 256])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["packed", "stored"])
@pytest.mark.parametrize("shape", [(40, 128, 32), (24, 352, 32), (33, 384, 128), (17, 136, 8)])
def test_the_int4_dot_kernel_is_the_sum_of_its_groups(rows, threads, layout, shape):
    """``int4_dot`` against float64 sums of the bf16 activations times the decoded weight (scales and zero terms per
    group, padded channels, every row tile; the stored nibbles' channel dot at 1-4 rows: groups of 32 two a chunk of
    64 inputs, a last half chunk, groups of 128 over two chunks), equal on 1 and 2 threads; refused where the CPU has
    no path."""
    from compressdit.quant.cpu_kernels import pack_int4_dot, stored_int4_dot
    from compressdit.quant.cpu_native import int4_dot, int4_dot_ready, native_library
    from compressdit.quant.gpu_reference import pack_nibbles

    gen = torch.Generator().manual_seed(rows)
    out_features, in_features, group = shape
    codes = torch.randint(-8, 8, (out_features, in_features), generator=gen, dtype=torch.int8)
    scale = torch.rand(out_features, in_features // group, generator=gen) + 0.01
    zero = torch.randn(out_features, in_features // group, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    b = pack_int4_dot(codes, scale, zero, group)
    padded = -(-out_features // 16) * 16
    assert b["dot_packed"].numel() == padded * in_features // 2  # 0.5 byte a weight, channels padded to 16
    if layout == "stored":
        b = stored_int4_dot(pack_nibbles(codes), scale, zero, group)
        if b["dot_packed"] is None:  # not where int4_dot runs: the same operands, to see them refused
            b = {"dot_packed": pack_nibbles(codes), "dot_scale": scale, "dot_zz": zero - 136 * scale}
        assert b["dot_packed"].shape == (out_features, in_features // 2)  # the layer's stored weight, no padding
    if not int4_dot_ready():  # no path: refused; no library: None (the layer's other paths run)
        if native_library() is None:
            assert int4_dot(x, b["dot_packed"], b["dot_scale"], b["dot_zz"], bias, out_features, group) is None
            return
        with pytest.raises(RuntimeError):
            int4_dot(x, b["dot_packed"], b["dot_scale"], b["dot_zz"], bias, out_features, group)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = int4_dot(x, b["dot_packed"], b["dot_scale"], b["dot_zz"], bias, out_features, group)
        torch.set_num_threads(3 - threads)
        assert torch.equal(out, int4_dot(x, b["dot_packed"], b["dot_scale"], b["dot_zz"], bias, out_features, group))
    finally:
        torch.set_num_threads(previous)
    weight = codes.double() * scale.double().repeat_interleave(group, 1) + zero.double().repeat_interleave(group, 1)
    truth = x.double() @ weight.t() + bias.double()
    # fp32 sums of x (128 + q) taken back by 136 s sum x (the decoding's offset): their magnitude bounds the rounding
    formed = x.double().abs() @ (136 * scale.double() + zero.double().abs()).repeat_interleave(group, 1).t()
    assert ((out.double() - truth).abs() <= 2 ** -20 * formed + 1e-6 * truth.abs()).all()


@pytest.mark.parametrize("shape", [(40, 128, 32), (17, 136, 8), (33, 1156, 4), (16, 12, 4), (48, 1088, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threads", [1, 2])
def test_stored_int4_nibbles_from_five_rows_are_the_packed_tiles_bit_for_bit(shape, threads):
    """From 5 rows ``int4_dot`` on a layer's stored offset nibbles packs each block of 16 channels (a 16 x 16
    transpose of 4-byte groups, a nibble swap in each word) and runs the tiles of the packed layout: the same outputs
    bit for bit, on channels that fill no block (17, 33), inputs that fill no transpose (136, 1156, 12: masked, a last
    odd chunk) and every tile remainder; channels past the last: none written. Up to 4 rows (groups of 32 or
    multiples of 64) the channel dot reads the rows in place: within fp32 summation of the packed tiles' outputs.
    Where the CPU has no such path: no operands for the layers (their other paths run), stored nibbles refused."""
    from compressdit.quant.cpu_kernels import pack_int4_dot, stored_int4_dot
    from compressdit.quant.cpu_native import int4_dot, int4_dot_ready, native_library
    from compressdit.quant.gpu_reference import pack_nibbles

    out_features, in_features, group = shape
    gen = torch.Generator().manual_seed(out_features + in_features)
    codes = torch.randint(-8, 8, (out_features, in_features), generator=gen, dtype=torch.int8)
    codes[0], codes[-1, ::3] = 7, -8
    scale = torch.rand(out_features, in_features // group, generator=gen) + 0.01
    zero = torch.randn(out_features, in_features // group, generator=gen)
    packed = pack_int4_dot(codes, scale, zero, group)
    stored = stored_int4_dot(pack_nibbles(codes), scale, zero, group)
    if not int4_dot_ready():
        assert stored == {"dot_packed": None, "dot_scale": None, "dot_zz": None}
        x = torch.randn(5, in_features, generator=gen).bfloat16()
        if native_library() is None:
            assert int4_dot(x, pack_nibbles(codes), scale, zero, None, out_features, group) is None
        else:
            with pytest.raises(RuntimeError, match="no AVX512-BF16 path"):
                int4_dot(x, pack_nibbles(codes), scale, zero, None, out_features, group)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 37):
            x = torch.randn(rows, in_features, generator=gen).bfloat16()
            for bias in (torch.randn(out_features, generator=gen), None):
                outs = [int4_dot(x, b["dot_packed"], b["dot_scale"], b["dot_zz"], bias, out_features, group)
                        for b in (packed, stored)]
                if rows >= 5 or not (group == 32 or group % 64 == 0):
                    assert torch.equal(*outs), (rows, bias is None)
                else:
                    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5 * float(outs[0].abs().max()))
    finally:
        torch.set_num_threads(previous)
    x = torch.zeros(1, in_features).bfloat16()
    for nibbles, scales in ((stored["dot_packed"], packed["dot_scale"]), (stored["dot_packed"].view(torch.int8),
                                                                          stored["dot_scale"])):
        with pytest.raises(ValueError, match="stored nibbles"):  # the packed layout's scales: refused, never garbage
            int4_dot(x, nibbles, scales, scales, None, out_features, group)


@pytest.mark.usefixtures("decoded_kernels")
@pytest.mark.parametrize("spec", [LinearQuantSpec(w_bits=4, group_size=64), LinearQuantSpec(w_bits=3, group_size=32,
                                                                                             w_symmetric=False),
                                  LinearQuantSpec(w_bits=4, a_bits=4, group_size=64, a_granularity="per_group",
                                                  a_group_size=64)], ids=lambda s: s.label)
def test_w4_kernel_decodes_an_fp32_weight_for_many_rows_without_bf16_gemms(spec, monkeypatch):
    """Where the CPU has no bf16 GEMM (emulated: 4-5x an fp32 one at DiT sizes), ``cpu-int4-weight`` decodes the
    reference's own fp32 weight for calls of more than ``FP32_DECODE_MIN_ROWS`` rows (one C pass into a reused
    buffer) and runs an fp32 GEMM on the unrounded activations: the reference's numbers up to summation order; fewer
    rows keep the packed int4 GEMM (bf16 activations); with bf16 GEMMs nothing of the fp32 path is prepacked."""
    from compressdit.quant import cpu_dense
    from compressdit.quant.cpu_kernels import FP32_DECODE_MIN_ROWS
    from compressdit.quant.kernel_registry import cache_of

    for hardware in (True, False):
        monkeypatch.setattr(cpu_dense, "_bf16_hardware", lambda: (hardware, hardware))
        _, layer = _layer(spec, out_features=BIG)
        assert layer.kernel_name == "cpu-int4-weight"
        many, few = torch.randn(FP32_DECODE_MIN_ROWS + 1, 256), torch.randn(3, 256)
        with torch.no_grad():
            out, reference = layer(many), layer.reference_forward(many)
            assert (cache_of(layer).buffers["scale32"] is None) == hardware
            if not hardware:
                torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
            few_out, few_reference = layer(few), layer.reference_forward(few)
        error = ((few_out - few_reference).norm() / few_reference.norm()).item()
        assert 1e-6 < error <= 6e-3  # the packed GEMM's bf16 rounding: not the fp32 path
        many.requires_grad_(True)  # autograd may keep the weight: no reused buffer (the bf16 dequantize path)
        assert layer(many).shape == reference.shape


def test_large_row_counts_use_the_dequantize_path_exactly():
    from compressdit.quant.cpu_kernels import INT8_MAX_ROWS

    _, layer = _layer(LinearQuantSpec(w_bits=8))
    x = torch.randn(INT8_MAX_ROWS + 1, 256)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.reference_forward(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bf16", [False, True])
def test_vq_layer_decodes_once_on_cpu(bf16, dtype, monkeypatch):
    """``cpu-vq-dense`` (fp32: the reference's numbers) or, where bf16 GEMMs pay (``bf16_layer``; forced here on any
    CPU: emulated without bf16 hardware), ``cpu-vq-bf16``: within bf16 rounding, half the RAM."""
    from compressdit.quant import cpu_dense, cpu_kernels
    from compressdit.quant.formats import FORMATS

    monkeypatch.setattr(cpu_kernels, "bf16_layer", lambda shape: bf16)
    monkeypatch.setattr(cpu_dense, "bf16_brgemm", lambda: bf16 and cpu_native_brgemm())
    spec = LinearQuantSpec(format="vq", w_bits=3)
    FORMATS.get("vq").validate_spec(spec, "t")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = VQLinear.from_linear(linear, spec).to(dtype)
    assert layer.kernel_name == ("cpu-vq-bf16" if bf16 else "cpu-vq-dense")
    x = torch.randn(6, 64).to(dtype)
    with torch.no_grad():
        out, reference = layer(x), layer.reference_forward(x)
    assert out.dtype == dtype and out.shape == reference.shape
    if bf16 or dtype == torch.bfloat16:
        assert ((out.float() - reference.float()).norm() / reference.float().norm()).item() <= 1.2e-2
        assert cache_of(layer).nbytes() >= 64 * 32 * 2
    else:
        torch.testing.assert_close(out, reference)
        assert cache_of(layer).nbytes() >= 64 * 32 * 4  # the dense weight's RAM, reported by inspect


def cpu_native_brgemm() -> bool:
    from compressdit.quant.cpu_native import bf16_brgemm

    return bf16_brgemm()


def test_int8_weight_kernel_takes_misaligned_codes_and_inputs():
    """Codes memory-mapped from a checkpoint and bf16 inputs that are views sit at any address; torch's int8 weight
    GEMM needs aligned operands (it crashed the process on these before the kernel copied them aligned)."""
    linear, layer = _layer(LinearQuantSpec(w_bits=8), out_features=BIG)
    codes = layer.weight.data
    storage = torch.empty(codes.numel() + 64, dtype=codes.dtype)
    storage[3:3 + codes.numel()] = codes.reshape(-1)
    layer.weight.data = storage[3:3 + codes.numel()].view(codes.shape)  # as an mmap at offset 3 would give
    assert layer.weight.data_ptr() % 16 and layer.kernel_name == "cpu-int8-weight"
    x = (torch.randn(21 * 256 + 8) * 2).to(torch.bfloat16)[5:5 + 21 * 256].view(21, 256)
    assert x.data_ptr() % 32
    with torch.no_grad():
        torch.testing.assert_close(layer(x).float(), layer.reference_forward(x).float(), atol=0.05, rtol=0.02)


def test_kernel_choice_is_per_layer_and_by_device():
    cpu = torch.device("cpu")
    assert select_kernel(LinearQuantSpec(w_bits=8, a_bits=8), cpu, (96, 256)) == "cpu-int8-gemm"
    assert select_kernel(LinearQuantSpec(w_bits=4, group_size=64), cpu, (BIG, 256)) == "cpu-int4-weight"
    assert select_kernel(LinearQuantSpec(w_bits=4, group_size=16), cpu, (BIG, 256)) == BIG_DECODED[0]
    for name in ("cpu-int8-gemm", "cpu-int4-weight", "cpu-int8-weight", "cpu-vq-dense", "cpu-vq-bf16", "cpu-int-dense-bf16",
                 "cpu-int-dense-fp32", "cpu-fp8-dense", "cpu-int8-group-gemm"):
        assert not KERNELS.get(name).applies(LinearQuantSpec(w_bits=8, a_bits=8), torch.device("meta"), (96, 256))
    model = torch.nn.Sequential(_layer(LinearQuantSpec(w_bits=8, a_bits=8))[1],
                                _layer(LinearQuantSpec(w_bits=4, group_size=32), 96, 256)[1])
    assert prepack_model(model) == {"0": "cpu-int8-gemm", "1": DENSE}
    set_kernel(model, REFERENCE)
    assert [m.kernel_name for m in model] == [REFERENCE, REFERENCE]
    x = torch.randn(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[1].reference_forward(model[0].reference_forward(x)))


@pytest.mark.parametrize("spec", [LinearQuantSpec(w_bits=8, a_bits=8), LinearQuantSpec(w_bits=4, group_size=64)],
                         ids=lambda s: s.label)
def test_prepacked_buffers_are_never_saved_and_follow_loads_and_moves(spec):
    _, layer = _layer(spec, seed=0)
    keys = set(layer.state_dict())
    x = torch.randn(4, 256)
    with torch.no_grad():
        layer(x)
        assert cache_of(layer).buffers and set(layer.state_dict()) == keys
        _, other = _layer(spec, seed=1)
        layer.load_state_dict(other.state_dict())  # in-place copies: the prepacked weight is stale
        torch.testing.assert_close(layer(x), other(x))
        layer.to("cpu", torch.float32)
        assert not cache_of(layer).buffers  # dropped by _apply, rebuilt on the next forward
        torch.testing.assert_close(layer(x), other(x))
        clone = copy.deepcopy(layer)
        assert not cache_of(clone).buffers
        torch.testing.assert_close(clone(x), other(x))


def test_inputs_that_need_gradients_take_the_reference_path():
    _, layer = _layer(LinearQuantSpec(w_bits=8, a_bits=8))
    x = torch.randn(4, 256, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_saved_and_reloaded_model_gives_the_same_kernel_outputs(tmp_path):
    from diffusers import DiTTransformer2DModel

    from compressdit.io.diffusers_quantizer import attach_quantizer
    from compressdit.models import adapter_for
    from compressdit.quant.transform import LayerRule, quantize_layers, quantized_modules, resolve_plan
    from tests.conftest import tiny_dit

    model = tiny_dit(layers=1)
    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None),
             LayerRule("role:ffn_up", LinearQuantSpec(w_bits=4, group_size=32)),
             LayerRule("re:.*", LinearQuantSpec(w_bits=8, a_bits=8))]
    plan = resolve_plan(model, adapter_for(model), rules)
    quantize_layers(model, plan)
    attach_quantizer(model, {n: s for n, s in plan.items() if s is not None})
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10, 700]),
              "class_labels": torch.tensor([1, 7])}
    with torch.no_grad():
        before = model(**inputs, return_dict=False)[0]
        model.save_pretrained(tmp_path)
        loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
        kernels = {m.kernel_name for m in quantized_modules(loaded).values()}
        assert kernels == {"cpu-int8-gemm", DENSE}
        torch.testing.assert_close(loaded(**inputs, return_dict=False)[0], before)
    assert not any("packed" in key for key in loaded.state_dict())
    assert kernel_summary(loaded) == ", ".join(sorted([f"{DENSE} x1", "cpu-int8-gemm x6"]))


def test_inspect_names_each_layers_kernel(tmp_path):
    from compressdit.inspect import inspect_checkpoint

    test_saved_and_reloaded_model_gives_the_same_kernel_outputs(tmp_path)
    rows = {row["module"]: row for row in inspect_checkpoint(str(tmp_path))["modules"]}
    assert {row["kernel"] for row in rows.values()} == {"float", "cpu-int8-gemm", DENSE}
    assert all(row["runtime_bytes"] > 0 for row in rows.values() if row["kernel"].startswith("cpu-"))


@pytest.mark.parametrize("spec", [case[0] for case in CPU_CASES if case[1] == "cpu-int4-weight"],
                         ids=lambda v: v.label)
def test_cpu_int4_kernel_keeps_its_bound_above_the_packed_row_threshold(spec):
    from compressdit.quant.gpu_reference import INT4_PACKED_MAX_ROWS

    linear, layer = _layer(spec, out_features=BIG)
    assert layer.kernel_name == "cpu-int4-weight"
    x = torch.randn(2, INT4_PACKED_MAX_ROWS["cpu"] + 5, 256) * torch.linspace(0.1, 4, 256)  # dense bf16 path
    with torch.no_grad():
        out, reference, exact = layer(x), layer.reference_forward(x), linear(x)
    error = ((out - reference).norm() / reference.norm()).item()
    assert error <= 6e-3  # the bound of CPU_CASES
    assert error <= 0.2 * ((reference - exact).norm() / exact.norm()).item()


def test_e4m3_rounding_in_fp32_equals_the_float8_cast_bit_for_bit():
    from compressdit.quant.cpu_native import round_to_e4m3

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2  # ties: to even
    torch.manual_seed(0)
    q = torch.cat([grid, mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1]),
                   (torch.rand(200_000) * 2 - 1) * 448, torch.randn(200_000) * 0.01, torch.randn(50_000) * 1e-4])
    assert torch.equal(round_to_e4m3(q.clone()), q.to(torch.float8_e4m3fn).float())


def test_ops_run_by_a_compiled_graph_share_no_activation_codes():
    """An eager W8A8 call keeps its input's codes on the input for the next layer reading it (query, key, value); the
    same op run through the dispatcher (what a compiled graph calls) keeps nothing and reads nothing kept: inductor
    writes its buffers without moving their version counters and reuses one tensor object for several intermediates,
    so codes kept on one would be read for another."""
    from compressdit.quant.cpu_kernels import int8_gemm_linear_cpu
    from compressdit.quant.kernel_registry import cache_of

    _, layer = _layer(LinearQuantSpec(w_bits=8, a_bits=8))
    x = torch.randn(5, 256)
    with torch.no_grad():
        expected = layer(x)
        assert getattr(x, "_compressdit_rows", None) is not None  # eager: kept for the next reader
        b = cache_of(layer).buffers
        args = (None, b["codes_t"], b["packed"], b["w_scale"], b["w_zero"], b["bias"], b["per_token"], 96,
                b["microkernel"])
        fresh = x.clone()
        torch.testing.assert_close(int8_gemm_linear_cpu.op(fresh, *args), expected)
        assert getattr(fresh, "_compressdit_rows", None) is None  # the graph's op keeps nothing
        kind, version, _ = x._compressdit_rows  # wrong codes planted as if kept: the graph's op must not read them
        x._compressdit_rows = (kind, version, (torch.zeros(5, 256, dtype=torch.int8), torch.ones(5, 1)))
        torch.testing.assert_close(int8_gemm_linear_cpu.op(x, *args), expected)
