"""The fused C passes of the CPU int8 GEMMs compute the PyTorch reference's numbers (codes and scales bit for bit)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess

import pytest
import torch

from compressdit import native_build
from compressdit.quant import cpu_native
from compressdit.quant.cpu_native import dequantize_int32_, native_library, quantize_rows_int8, scale_rows_
from compressdit.quant.layers import QuantLinear
from compressdit.quant.primitives import fake_quantize_activation
from compressdit.quant.spec import LinearQuantSpec
from tests.conftest import native_ops_built, torch_threads


def _activations(rows: int = 37, cols: int = 96) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(rows, cols) * torch.logspace(-3, 2, cols)
    x[0] = 0  # an all-zero token: the scale's floor
    x[1, :5] = torch.tensor([1e-41, -3e-39, 2.5, -2.5, 0.5])  # subnormals; exact ties of x / s
    x[2] *= 1e-30  # tiny quotients x / smooth: the exact division runs for that row
    return x


def test_the_library_builds_where_a_c_compiler_exists():
    wanted = os.environ.get("COMPRESSDIT_NATIVE_CPU", "1") != "0"
    assert (native_library() is not None) == (wanted and shutil.which(os.environ.get("CC", "cc")) is not None)


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("offset", [0, 128])
@pytest.mark.parametrize("smoothed", [False, True])
def test_codes_and_scales_equal_the_torch_path_and_the_reference(per_token, offset, smoothed, monkeypatch):
    x = _activations()
    smooth = (torch.rand(x.shape[1]) * 8 + 0.05) if smoothed else None
    if smoothed:
        smooth[3] = float.fromhex("0x1.fffffep+0")  # all-ones mantissa: the hardest reciprocal
    q, scale = quantize_rows_int8(x, per_token, offset, smooth)
    monkeypatch.setattr(cpu_native, "native_library", lambda: None)
    q_torch, scale_torch = quantize_rows_int8(x, per_token, offset, smooth)
    assert q.dtype == q_torch.dtype == (torch.uint8 if offset else torch.int8)
    assert torch.equal(q, q_torch) and torch.equal(scale, scale_torch)
    codes = (q.int() - offset).float()
    divided = x if smooth is None else x / smooth
    expected = fake_quantize_activation(divided, 8, "per_token" if per_token else "per_tensor")
    assert torch.equal(codes * scale, expected)


def test_the_epilogues_equal_the_torch_path_up_to_rounding():
    torch.manual_seed(0)
    acc = torch.randint(-2 ** 20, 2 ** 20, (9, 40), dtype=torch.int32)
    w_scale, bias = torch.rand(40) / 100, torch.randn(40)
    for a_scale in (torch.rand(9, 1), torch.rand(1, 1)):
        expected = torch.addcmul(bias, acc.float() * w_scale, a_scale)
        torch.testing.assert_close(dequantize_int32_(acc.clone(), w_scale, a_scale, bias), expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(dequantize_int32_(acc.clone(), w_scale, a_scale, None), expected - bias, rtol=1e-5,
                                   atol=1e-5)
        scaled = acc.float() * w_scale
        torch.testing.assert_close(scale_rows_(scaled.clone(), a_scale, bias), expected, rtol=1e-6, atol=0)


def _balanced_layer(spec: LinearQuantSpec, in_features: int = 64, out_features: int = 48):
    torch.manual_seed(1)
    linear = torch.nn.Linear(in_features, out_features)
    layer = QuantLinear.from_linear(linear, spec, input_absmax=torch.rand(in_features) * 10 + 0.1)
    return linear, layer


@pytest.mark.parametrize("spec", [
    LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5),  # the division fused into the quantization
    LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5, a_granularity="per_tensor"),
    LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5, rotation="hadamard"),  # the layer transforms first
    LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5, low_rank=4),  # the branch needs the transformed input
], ids=lambda s: s.label)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_balanced_w8a8_layers_match_the_reference(spec, dtype):
    linear, layer = _balanced_layer(spec)
    layer.to(dtype)
    assert layer.kernel_name == "cpu-int8-gemm"
    x = (torch.randn(3, 7, 64) * torch.linspace(0.1, 5, 64)).to(dtype)
    with torch.no_grad():
        out, reference, exact = layer(x), layer.reference_forward(x), linear(x.float())
    assert out.dtype == reference.dtype == dtype

    def error(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    if dtype == torch.float32:  # the same codes: fp32 summation order only
        assert error(out, reference) <= 1e-5
    else:  # the reference quantizes and multiplies in bf16, the kernel in fp32 from the bf16 input: never worse
        assert error(out, exact) <= error(reference, exact) * 1.05
    if dtype == torch.bfloat16 and spec.rotation in (None, "none") and spec.low_rank is None:
        from compressdit.quant.kernel_registry import cache_of

        cache = cache_of(layer)  # the balancing division inside the kernel is the reference's bf16 one, bit for bit
        with torch.no_grad():
            again = cache.kernel.run(layer, layer.transform_input(x), cache.buffers)
        assert torch.equal(out.view(torch.int16), again.view(torch.int16))


def test_without_the_library_layers_give_the_same_outputs(monkeypatch):
    _, layer = _balanced_layer(LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5))
    x = torch.randn(4, 9, 64)
    with torch.no_grad():
        native = layer(x)
        monkeypatch.setattr(cpu_native, "native_library", lambda: None)
        monkeypatch.setattr("compressdit.quant.cpu_kernels.native_ops", lambda: False)
        torch.testing.assert_close(layer(x), native, rtol=1e-6, atol=1e-6)


def test_small_group_gemms_run_on_one_thread_and_restore_the_count():
    _, layer = _balanced_layer(LinearQuantSpec(w_bits=4, a_bits=8, group_size=32))
    assert layer.kernel_name == "cpu-int8-group-gemm"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            layer(torch.randn(5, 64))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def _float_edge_cases() -> torch.Tensor:
    torch.manual_seed(2)
    bf16_ties = (torch.arange(1, 40, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)  # halfway: to even
    specials = torch.tensor([0.0, -0.0, 1e-40, -3e-39, float("inf"), -float("inf"), float("nan"), 3.4e38, -1.5e-45])
    return torch.cat([torch.randn(997) * torch.logspace(-6, 6, 997), bf16_ties, -bf16_ties, specials])


def test_the_bf16_casts_equal_torch_bit_for_bit(monkeypatch):
    from compressdit.quant.cpu_native import bf16_to_float, float_to_bf16

    x = _float_edge_cases()
    assert native_library() is None or torch.equal(float_to_bf16(x).view(torch.int16), x.bfloat16().view(torch.int16))
    y, bias = torch.randn(13, 77).bfloat16(), torch.randn(77)
    assert torch.equal(bf16_to_float(y, bias), y.float() + bias) and torch.equal(bf16_to_float(y, None), y.float())
    monkeypatch.setattr(cpu_native, "native_library", lambda: None)
    assert torch.equal(float_to_bf16(x).view(torch.int16), x.bfloat16().view(torch.int16))
    assert torch.equal(bf16_to_float(y, bias), y.float() + bias)


def _fp8_rows() -> torch.Tensor:
    torch.manual_seed(3)
    x = torch.randn(64, 96) * torch.logspace(-4, 3, 96)
    x[0] = 0  # the scale's floor
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # every non-negative E4M3 value
    x[1, :95] = ((grid[1:] + grid[:-1]) / 2)[:95]  # ties (with amax 448 below: s = 1 exactly)
    x[1, 95] = 448
    x[2, :95], x[2, 95] = -grid[:95] * 0.999, 448  # near the grid, subnormals included
    x[3, :95], x[3, 95] = torch.nextafter(x[1, :95], torch.zeros(())), 448  # just below the ties
    x[4, 7] = 1e-41  # a subnormal input
    x[5] *= 1e-12  # a row whose amax is below the 1e-8 floor
    x[6, 3] = float("nan")  # NaN spreads to its row, as in the reference
    x[7, 5] = float("inf")  # an infinite scale: that row divides the plain way
    x[8] *= 2.0 ** -100  # tiny rows: the fast division's residual may underflow, the codes are zeros either way
    x[9] = x[9] * 1e-30 + torch.where(torch.arange(96) == 0, 1e-8, 0.0)  # mostly tiny below the 1e-8 floor
    return x


def test_e4m3_fake_quantization_equals_the_reference_bit_for_bit(monkeypatch):
    from compressdit.quant.cpu_native import fake_quantize_e4m3_rows
    from compressdit.quant.gpu_reference import _fake_quantized_rows

    x = _fp8_rows()
    expected = _fake_quantized_rows(x, torch.float8_e4m3fn)
    assert expected[6].isnan().all() and expected[0].eq(0).all()
    torch.testing.assert_close(fake_quantize_e4m3_rows(x), expected, rtol=0, atol=0, equal_nan=True)
    monkeypatch.setattr(cpu_native, "native_library", lambda: None)
    torch.testing.assert_close(fake_quantize_e4m3_rows(x), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("per_token", [True, False])
def test_grouped_codes_and_their_epilogue_equal_the_torch_path(per_token, monkeypatch):
    from compressdit.quant.cpu_dense import fake_quantize_input
    from compressdit.quant.cpu_native import dequantize_groups, fake_quantize_rows_int8, quantize_rows_int8_groups

    x = _activations(cols=128)
    q, scale = quantize_rows_int8_groups(x, per_token, 32)
    fake = fake_quantize_rows_int8(x, per_token)
    torch.manual_seed(4)
    acc = torch.randint(-2 ** 18, 2 ** 18, (4, 37, 24), dtype=torch.int32)
    w_scale, bias = torch.rand(4, 24) / 100, torch.randn(24)
    out = dequantize_groups(acc, w_scale, scale, bias)
    monkeypatch.setattr(cpu_native, "native_library", lambda: None)
    q_torch, scale_torch = quantize_rows_int8_groups(x, per_token, 32)
    assert q.shape == (4, 37, 32) and torch.equal(q, q_torch) and torch.equal(scale, scale_torch)
    assert torch.equal(q.transpose(0, 1).reshape(37, 128), quantize_rows_int8(x, per_token)[0])
    assert torch.equal(fake, fake_quantize_input(x.clone(), 8, "per_token" if per_token else "per_tensor", None))
    assert torch.equal(fake_quantize_rows_int8(x, per_token), fake)
    # the same sums up to fp32 rounding (a few ulps of the largest group term, where groups cancel)
    torch.testing.assert_close(out, dequantize_groups(acc, w_scale, scale, bias), rtol=1e-6,
                               atol=out.abs().max().item() * 2 ** -20)


def _every_pass(x: torch.Tensor) -> list[torch.Tensor]:
    """Each C pass's outputs on ``x`` (per token and per tensor, with and without balancing)."""
    from compressdit.quant.cpu_native import (bf16_to_float, dequantize_groups, fake_quantize_e4m3_rows,
                                              fake_quantize_rows_int8, float_to_bf16, quantize_rows_int8_groups)

    rows, cols = x.shape
    torch.manual_seed(5)
    smooth = torch.rand(cols) * 8 + 0.05
    acc = torch.randint(-2 ** 18, 2 ** 18, (rows, 24), dtype=torch.int32)
    group_acc = torch.randint(-2 ** 18, 2 ** 18, (cols // 32, rows, 24), dtype=torch.int32)
    w_scale, a_scale, bias = torch.rand(24) / 100, torch.rand(rows, 1), torch.randn(24)
    outputs = [*quantize_rows_int8(x, True, 0, smooth), *quantize_rows_int8(x, False, 128, smooth),
               *quantize_rows_int8(x, True), fake_quantize_rows_int8(x, True), fake_quantize_rows_int8(x, False),
               *quantize_rows_int8_groups(x, True, 32), *quantize_rows_int8_groups(x, False, 32),
               dequantize_int32_(acc.clone(), w_scale, a_scale, bias), scale_rows_(acc.float(), a_scale, None),
               dequantize_groups(group_acc, torch.rand(cols // 32, 24), a_scale, bias),
               float_to_bf16(x).view(torch.int16), bf16_to_float(x.bfloat16(), torch.randn(cols)),
               fake_quantize_e4m3_rows(x), fake_quantize_e4m3_rows(x.view(rows, 2, cols // 2)),
               cpu_native.gelu_tanh(x * 1e-2)]
    return outputs


@pytest.mark.parametrize("rows, threads", [(37, 3), (5, 4), (64, 2)])
def test_rows_split_over_threads_give_the_one_thread_numbers(rows, threads, monkeypatch):
    """Every pass split over torch's threads (row counts that do not divide evenly, fewer rows than threads) equals
    its one-thread run bit for bit; without the library, the PyTorch path gives the same numbers."""
    x = _activations(rows=rows, cols=128)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        monkeypatch.setattr(cpu_native, "PARALLEL_MIN_ELEMENTS", 1 << 62)  # every pass on one thread
        serial = _every_pass(x)
        monkeypatch.setattr(cpu_native, "PARALLEL_MIN_ELEMENTS", 1)  # every pass on `threads` threads
        assert cpu_native.threads_for(rows) == threads
        split = _every_pass(x)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(serial, split, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    monkeypatch.setattr(cpu_native, "native_library", lambda: None)
    for a, b in zip(serial[:4] + serial[6:10], _every_pass(x)[:4] + _every_pass(x)[6:10], strict=True):
        assert torch.equal(a, b)  # the codes and scales (the epilogues agree up to rounding, tested above)


def test_the_library_never_brings_a_second_openmp_runtime(monkeypatch):
    """Threaded only on torch's own libgomp (one runtime mapped); a build without OpenMP gives the same numbers."""
    lib = native_library()
    runtimes = native_build.openmp_runtimes()
    assert len(runtimes) <= 1
    if lib is None:  # no C compiler (or disabled: the first test checks that is the only way): the PyTorch path
        assert shutil.which(os.environ.get("CC", "cc")) is None or os.environ.get("COMPRESSDIT_NATIVE_CPU") == "0"
        return
    assert not lib.openmp or native_build.torch_runs_libgomp()
    x = _activations(rows=37, cols=128)
    expected = _every_pass(x)
    monkeypatch.setattr(native_build, "torch_runs_libgomp", lambda: False)
    cpu_native.native_library.cache_clear()
    try:
        assert not native_library().openmp
        for a, b in zip(expected, _every_pass(x), strict=True):
            assert torch.equal(a, b)
    finally:
        cpu_native.native_library.cache_clear()


def test_the_library_is_threaded_wherever_the_compiler_takes_openmp(tmp_path):
    """Where torch runs libgomp and the C compiler builds an OpenMP source, the library is its threaded build. A
    compile error only that build meets (a pragma naming a variable the function does not declare) sent it to the
    one-thread build without a word: every pass single-threaded, W8A8 on dit-fmnist at two threads 0.90-0.93 ->
    1.05-1.08x the float step."""
    lib = native_library()
    if lib is None:  # no C compiler (or disabled: the first test checks that is the only way)
        return
    if not native_build.torch_runs_libgomp():  # torch not on libgomp: the one-thread build is the right one
        assert not lib.openmp
        return
    probe = tmp_path / "probe.c"
    probe.write_text("int probe(int n) {\n    int s = 0;\n#pragma omp parallel for reduction(max : s)\n"
                     "    for (int i = 0; i < n; ++i) s = s > i ? s : i;\n    return s;\n}\n")
    compiled = subprocess.run([native_build.compiler_for(probe), *native_build.compile_flags(True), "-c", str(probe),
                               "-o", str(tmp_path / "probe.o")], capture_output=True).returncode == 0
    assert lib.openmp == compiled


GRID_SPECS = {  # every activation quantizer the fused grid pass reproduces
    "int4-g16": dict(w_bits=4, a_bits=4, a_granularity="per_group", a_group_size=16),
    "int6-g64": dict(w_bits=4, a_bits=6, a_granularity="per_group", a_group_size=64),
    "e4m3-token": dict(w_bits=4, a_bits=8, a_format="e4m3"),
    "e3m2-token": dict(w_bits=4, a_bits=6, a_format="e3m2"),
    "e2m3-g32": dict(w_bits=4, a_bits=6, a_format="e2m3", a_granularity="per_group", a_group_size=32),
    "e2m1-g16": dict(w_bits=4, a_bits=4, a_format="e2m1", a_granularity="per_group", a_group_size=16),
    "e5m2-token": dict(w_bits=4, a_bits=8, a_format="e5m2"),
    "nvfp4": dict(w_bits=4, a_bits=4, a_format="nvfp4", a_granularity="per_group"),
    "mxfp4": dict(w_bits=4, a_bits=4, a_format="mxfp4", a_granularity="per_group"),
    "mxfp8": dict(w_bits=8, a_bits=8, a_format="mxfp8", a_granularity="per_group"),
}


@pytest.mark.parametrize("name", sorted(GRID_SPECS))
@pytest.mark.parametrize("parallel", [False, True])
def test_grid_pass_is_the_activation_quantizer_bit_for_bit(name, parallel, monkeypatch):
    """The kernels' activation quantizer (the fused grid pass where the library is built) against the PyTorch
    quantizer it replaces (activations.py), on rows with outliers, all-zero groups, exact ties and values of very
    different scales; its rows split over two threads or not."""
    from types import SimpleNamespace

    from compressdit.quant.activations import activation_grid, quantize_input, validate_activation_spec
    from compressdit.quant.cpu_dense import quantize_layer_input
    from compressdit.quant.cpu_native import fake_quantize_grid

    spec = LinearQuantSpec.from_dict(dict(GRID_SPECS[name]), "spec")
    validate_activation_spec(spec, "spec")
    torch.manual_seed(0)
    x = torch.randn(37, 128) * torch.logspace(-6, 3, 128)
    x[3, :64] = 0  # zero groups: the scale's floor (NVFP4: 1, MX: 2^-127)
    x[5] = torch.arange(128) * 0.25 - 16  # exact ties on the grid after scaling
    x[7, 9] = 1e30  # an outlier
    x[9] = torch.randn(128) * 1e-31  # quotients near 2^-104 and below 2^-126: under the reciprocal's exact range
    x[9, ::16] = 1e3
    x[17] = torch.randn(128) * 1e-39  # subnormal inputs (MX: a subnormal amax / top, the scale's frexp branch)
    x[19, :32] = torch.randn(32) * 1e-37  # a normal amax, a subnormal amax / top
    if spec.a_format in ("int", "e4m3", "e3m2", "e2m3", "e2m1", "e5m2"):  # absmax scales: inf / NaN ones divide
        x[11, 3], x[13, 70], x[15, 100] = float("inf"), float("nan"), -float("inf")  # (MX / NVFP4 differ there)
    monkeypatch.setattr(cpu_native, "PARALLEL_MIN_ELEMENTS", 1 if parallel else 1 << 62)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = quantize_layer_input(SimpleNamespace(spec=spec), x)
    finally:
        torch.set_num_threads(before)
    expected = quantize_input(x, spec)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    grid, group = activation_grid(spec), spec.a_group_size if spec.a_granularity == "per_group" else 128
    fused = fake_quantize_grid(x, group, grid.rule, grid.top, grid.mantissa, grid.min_exp)
    assert (fused is None) == (native_library() is None)  # the C pass ran wherever the library exists


def _gelu_tanh_exact(x: torch.Tensor) -> torch.Tensor:
    """x (1 + tanh(u)) / 2 in float64 as x sigmoid(2u): the tanh form's 1 + tanh(u) cancels to 0 for x < -8."""
    x = x.double()
    return x * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))


def test_the_tanh_gelu_is_within_a_few_ulp_of_the_exact_function():
    """Near 0 within 8 ulp (torch's own tanh GELU: ~100 ulp, its 1 + tanh(u) cancelling for negative x); everywhere
    within the rounding of u itself (a relative ~1e-5 at |u| ~ 88, beyond which the exponent is clamped: the output
    is below 1e-37 |x| there); inf / NaN kept."""
    from compressdit.quant.cpu_native import gelu_tanh

    torch.manual_seed(0)
    x = torch.cat([torch.linspace(-30, 30, 120_001), torch.randn(4096) * 3, torch.randn(64) * 1e-20,
                   torch.tensor([0.0, -0.0, 1e-40, -1e-40, 200.0, -200.0])])
    exact, ours = _gelu_tanh_exact(x), gelu_tanh(x)
    if native_library() is None:  # no C pass built: torch's GELU, its numbers exactly
        assert torch.equal(ours, torch.nn.functional.gelu(x, approximate="tanh"))
        return
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    error, ulp = (ours.double() - exact).abs(), torch.finfo(torch.float32).eps * exact.abs()
    near = x.abs() < 3
    assert (error[near] <= 8 * ulp[near] + 1e-44).all()
    assert (error <= 1.6e-5 * exact.abs() + 1e-36 * x.abs() + 1e-44).all()
    special = gelu_tanh(torch.tensor([float("inf"), float("nan"), 0.0]))
    assert special[0] == float("inf") and special[1].isnan() and special[2] == 0


def test_the_tanh_gelu_falls_back_to_torch_off_its_path():
    """Gradients, other dtypes and non-contiguous tensors run torch's GELU (a backward exists; same numbers)."""
    from compressdit.quant.cpu_native import gelu_tanh

    x = torch.randn(8, 16, requires_grad=True)
    y = gelu_tanh(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None
    for t in (torch.randn(8, 16, dtype=torch.float64), torch.randn(16, 8).t(), torch.randn(4, 4).bfloat16()):
        assert torch.equal(gelu_tanh(t), torch.nn.functional.gelu(t, approximate="tanh"))


def test_shared_rows_are_computed_once_per_tensor_version_and_kind():
    from compressdit.quant.cpu_native import shared_rows

    x, runs = torch.randn(4, 8), []

    def compute():
        runs.append(1)
        return x * 2

    first = shared_rows(x, ("int8", True, 0), compute)
    assert shared_rows(x, ("int8", True, 0), compute) is first and len(runs) == 1
    shared_rows(x, ("int8", False, 0), compute)  # another kind
    assert len(runs) == 2
    x.add_(1)  # written to: its version moved on
    assert torch.equal(shared_rows(x, ("int8", False, 0), compute), x * 2) and len(runs) == 3
    with torch.inference_mode():
        y = torch.randn(4, 8)
    shared_rows(y, ("e4m3",), compute)
    shared_rows(y, ("e4m3",), compute)
    assert len(runs) == 5  # no version counter: never shared


@pytest.mark.usefixtures("fp32_kernels")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("spec", [LinearQuantSpec(w_bits=8, a_bits=8),
                                  LinearQuantSpec(w_bits=8, a_bits=8, a_granularity="per_tensor"),
                                  LinearQuantSpec(format="fp8", w_bits=8, a_bits=8),
                                  LinearQuantSpec(w_bits=4, group_size=16, a_bits=4, a_granularity="per_group",
                                                  a_group_size=16)])
def test_layers_reading_one_input_quantize_it_once_and_give_the_reference(spec, fused, monkeypatch):
    """Query / key / value projections on one input: the activation codes are computed by the first and read by the
    others (through the fused C++ op or the Python path), and each layer's output is its own reference's."""
    from compressdit.quant import cpu_kernels
    from compressdit.quant.formats import FORMATS

    fused = fused and native_ops_built()  # without the op library, its Python path (the other parameter's case)
    monkeypatch.setattr(cpu_kernels, "native_ops", lambda: fused)
    torch.manual_seed(3)
    layers = [FORMATS.get(spec.format).quantize(torch.nn.Linear(64, n), spec, None) for n in (32, 48, 64)]
    x = torch.randn(2, 9, 64) * torch.linspace(0.2, 4, 64)
    calls, depth = [], [0]

    def counted(real):  # one count per quantization, however many of these functions it goes through
        def call(*args, **kwargs):
            if not depth[0]:
                calls.append(1)
            depth[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                depth[0] -= 1
        return call

    for name in ("quantize_rows_int8", "fake_quantize_e4m3_rows", "quantize_layer_input", "fake_quantize_grid"):
        for module in ("compressdit.quant.cpu_kernels", "compressdit.quant.cpu_dense"):
            real = getattr(__import__(module, fromlist=[name]), name, None)
            if real is not None:
                monkeypatch.setattr(f"{module}.{name}", counted(real))
    if fused:  # count the calls that are given no codes made earlier
        op = torch.ops.compressdit_native.int8_linear
        monkeypatch.setattr(torch.ops.compressdit_native, "int8_linear",
                            lambda *a: (a[7] is None and calls.append(1), op(*a))[1])
    with torch.no_grad():
        outs = [layer(x) for layer in layers]
        assert len(calls) == 1
        for layer, out in zip(layers, outs):
            torch.testing.assert_close(out, layer.reference_forward(x), rtol=1e-5, atol=1e-5)
        x.mul_(2)  # the input written to: quantized again
        torch.testing.assert_close(layers[0](x), layers[0].reference_forward(x), rtol=1e-5, atol=1e-5)
        assert len(calls) == 2


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("smoothed", [False, True])
@pytest.mark.parametrize("rows, threads", [(37, 2), (37, 1), (1, 2), (3, 4)])
def test_the_fused_int8_op_equals_the_python_path_bit_for_bit(per_token, smoothed, rows, threads, monkeypatch):
    """csrc/int8_linear.cpp (codes, torch._int_mm and the epilogue per block of rows on a team of threads) gives
    the Python path's numbers exactly, on any thread count, and takes codes made earlier."""
    from compressdit.quant import cpu_kernels

    built = native_ops_built()
    monkeypatch.setattr(cpu_kernels, "INT8_GEMM_SERIAL_WORK", 0)  # every GEMM on torch's threads / the team
    monkeypatch.setattr(cpu_kernels, "TEAM_MIN_WORK", 0)
    x = _activations(rows=max(rows, 3), cols=96)[:rows]
    torch.manual_seed(1)
    codes = torch.randint(-127, 128, (40, 96), dtype=torch.int8)
    w_scale, bias = torch.rand(40) / 50, torch.randn(40)
    smooth = torch.rand(96) * 4 + 0.1 if smoothed else None
    reference_q, reference_scale = quantize_rows_int8(x, per_token, smooth=smooth)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        monkeypatch.setattr(cpu_kernels, "native_ops", lambda: False)
        expected = cpu_kernels.int8_gemm_linear_cpu(x, smooth, codes.t(), None, w_scale, None, bias, per_token, 40)
        if built:
            monkeypatch.setattr(cpu_kernels, "native_ops", lambda: True)
            fused = cpu_kernels.int8_gemm_linear_cpu(x, smooth, codes.t(), None, w_scale, None, bias, per_token, 40)
            out, q, scale = torch.ops.compressdit_native.int8_linear(x, smooth, codes.t(), w_scale, None, per_token,
                                                                     threads, None, None)
            again, _, _ = torch.ops.compressdit_native.int8_linear(x, smooth, codes.t(), w_scale, None, per_token,
                                                                   threads, q, scale)
    finally:
        torch.set_num_threads(before)
    dequantized = (reference_q.float() * reference_scale) @ (codes.float() * w_scale[:, None]).t() + bias
    torch.testing.assert_close(expected, dequantized, rtol=1e-4, atol=1e-4)  # the reference's math, summed otherwise
    if built:
        assert torch.equal(fused, expected)
        assert torch.equal(out, again) and q.dtype == torch.int8 and scale.shape == (rows if per_token else 1, 1)
        assert torch.equal(q, reference_q) and torch.equal(scale, reference_scale)


def test_the_fused_int8_op_rejects_what_it_cannot_read():
    if not native_ops_built():  # nothing registered that could read anything
        assert not hasattr(torch.ops.compressdit_native, "int8_linear")
        return
    codes = torch.zeros(8, 16, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        torch.ops.compressdit_native.int8_linear(torch.zeros(4, 8, dtype=torch.float64), None, codes, torch.ones(16),
                                                 None, True, 1, None, None)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.compressdit_native.int8_linear(torch.zeros(4, 9), None, codes, torch.ones(16), None, True, 1, None,
                                                 None)
    with pytest.raises(RuntimeError, match="w_scale must be a contiguous fp32 tensor of 16"):
        torch.ops.compressdit_native.int8_linear(torch.zeros(4, 8), None, codes, torch.ones(15), None, True, 1, None,
                                                 None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.compressdit_native.int8_group_linear(torch.zeros(4, 8), torch.zeros(2, 16, 4, dtype=torch.int8),
                                                       torch.ones(2, 16), torch.ones(3), True, 1)


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("rows, threads", [(37, 2), (37, 1), (1, 2), (3, 4)])
def test_the_fused_group_op_equals_the_python_path_bit_for_bit(per_token, rows, threads, monkeypatch):
    """``int8_group_linear`` (codes per group, one torch._int_mm per group and the group epilogue per block of rows on
    a team of threads) gives cpu-int8-group-gemm's Python numbers exactly on any thread count."""
    from compressdit.quant import cpu_kernels

    built = native_ops_built()
    monkeypatch.setattr(cpu_kernels, "TEAM_MIN_WORK", 0)
    x = _activations(rows=max(rows, 3), cols=96)[:rows]
    torch.manual_seed(2)
    codes = torch.randint(-8, 8, (3, 40, 32), dtype=torch.int8)
    w_scale, bias = torch.rand(3, 40) / 50, torch.randn(40)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        monkeypatch.setattr(cpu_kernels, "native_ops", lambda: False)
        expected = cpu_kernels.int8_group_gemm_linear_cpu(x, codes, w_scale, bias, per_token, 40)
        if built:
            monkeypatch.setattr(cpu_kernels, "native_ops", lambda: True)
            fused = cpu_kernels.int8_group_gemm_linear_cpu(x, codes, w_scale, bias, per_token, 40)
    finally:
        torch.set_num_threads(before)
    q, scale = quantize_rows_int8(x, per_token)  # the Python path: the reference's math
    weight = (codes.float() * w_scale[..., None]).transpose(0, 1).reshape(40, 96)
    torch.testing.assert_close(expected, (q.float() * scale) @ weight.t() + bias, rtol=1e-4, atol=1e-4)
    if built:
        assert torch.equal(fused, expected)


def test_without_a_cxx_compiler_the_python_path_runs(monkeypatch, tmp_path):
    """No C++ compiler (or one that fails): no op library, and W8A8 / grouped layers give the same outputs."""
    from compressdit.quant import cpu_kernels

    torch.manual_seed(4)
    layers = [QuantLinear.from_linear(torch.nn.Linear(64, 48), spec) for spec in
              (LinearQuantSpec(w_bits=8, a_bits=8), LinearQuantSpec(w_bits=4, a_bits=8, group_size=32))]
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        before = [layer(x) for layer in layers]
    cpu_native.native_ops.cache_clear()
    try:
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        assert cpu_native.native_ops() is False
        monkeypatch.setattr(cpu_kernels, "native_ops", cpu_native.native_ops)
        with torch.no_grad():
            for layer, out in zip(layers, before):
                torch.testing.assert_close(layer(x), out, rtol=1e-6, atol=1e-6)
    finally:
        cpu_native.native_ops.cache_clear()


def test_the_op_library_loads_once_per_process(tmp_path):
    """A second ``native_ops()`` after its cache is cleared, from another cache folder (so another build of the same
    ops), keeps the loaded ops: loading a second copy would register them twice and abort the process."""
    import subprocess
    import sys

    script = ("import os, torch\n"
              "from compressdit.quant import cpu_native\n"
              "first = cpu_native.native_ops()\n"
              "cpu_native.native_ops.cache_clear()\n"
              f"os.environ['COMPRESSDIT_CACHE'] = {str(tmp_path)!r}\n"
              "print(first, cpu_native.native_ops())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.split()
    assert second == first


@pytest.mark.parametrize("cols", [128, 1152, 256, 512, 96, 8])
@pytest.mark.parametrize("parallel", [False, True])
def test_the_hadamard_pass_is_balancing_and_rotate_bit_for_bit(cols, parallel, monkeypatch):
    """csrc/float_rows.c's randomized block Hadamard (after the balancing division) against rotation.rotate's
    butterflies: the same bits on every width (blocks of 128 / 128 / 256 / 512 / 32 / 8), with and without a divisor,
    on rows of very different scales, zeros, subnormals, inf and NaN; its rows split over two threads or not. With a
    grid, LRQ's int4 in groups of 16 included (on AVX2, widths of 128 multiples take hadamard_grid_row)."""
    from compressdit.quant.cpu_native import fake_quantize_grid, hadamard_rows
    from compressdit.quant.rotation import random_signs, rotate

    torch.manual_seed(0)
    x = torch.randn(37, cols) * torch.logspace(-3, 3, cols)
    x[3], x[5, :4], x[6, 7] = 0, float("inf"), float("nan")
    x[8] *= 1e-36  # tiny, subnormal and huge values: outside the fast reciprocal divisions' range, the plain ones run
    x[9, :3] = torch.tensor([1e-41, -3e-39, 1e-45])
    x[10] *= 1e32
    smooth, signs = torch.rand(cols) + 0.3, random_signs(cols, 0)
    monkeypatch.setattr(cpu_native, "PARALLEL_MIN_ELEMENTS", 1 if parallel else 1 << 62)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        outs = hadamard_rows(x, smooth, signs), hadamard_rows(x, None, signs)
    finally:
        torch.set_num_threads(before)
    if native_library() is None:
        assert outs == (None, None)
        return
    for out, expected in zip(outs, (rotate(x / smooth, signs), rotate(x, signs))):
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    grids = [(8, 0, 7.0, 30, 30), (8, 1, 6.0, 1, 0), (cols, 0, 448.0, 3, -6)]  # int4, MX E2M1, E4M3 per token
    for grid in [*grids, *([(16, 0, 7.0, 30, 30), (16, 0, 127.0, 30, 30)] * (cols % 16 == 0))]:  # int4 / int8 g16
        for divisor in (smooth, None):  # rotation and quantization in one pass
            fused = hadamard_rows(x, divisor, signs, grid)
            balanced = x if divisor is None else x / divisor
            torch.testing.assert_close(fused, fake_quantize_grid(rotate(balanced, signs), *grid), rtol=0, atol=0,
                                       equal_nan=True)
    assert hadamard_rows(x, smooth, signs, (8, 2, 6.0, 1, 0)) is None  # NVFP4's tensor scale needs every row first
    strided = x.t().contiguous().t()  # the same values, not contiguous: the caller's PyTorch path runs
    assert not strided.is_contiguous() and hadamard_rows(strided, None, signs) is None


@pytest.mark.parametrize("cols", [128, 1152, 512, 96, 8])
@pytest.mark.parametrize("parallel", [False, True])
def test_the_duquant_pass_is_its_steps_bit_for_bit(cols, parallel, monkeypatch):
    """csrc/float_rows.c's DuQuant rotation (after the balancing division) against ``RotationSteps.apply``: the same
    bits on every width (blocks of 128 / 128 / 128 / 32 / 8, several steps a block or none), with and without a
    divisor, on rows of very different scales, zeros, subnormals, inf and NaN; its rows split over two threads or not;
    with a grid in the same pass, LRQ's int4 / int8 in groups of 16 included (on AVX2, widths of 128 multiples take
    grid16_values, rows out of its range the plain grid)."""
    from compressdit.quant.cpu_native import duquant_rows_pass, fake_quantize_grid
    from compressdit.quant.duquant import fit_outlier_rotation

    torch.manual_seed(0)
    absmax = torch.rand(cols) + 0.5
    absmax[torch.randperm(cols)[:4]] *= 60  # outliers: the greedy steps have something to spread
    steps = fit_outlier_rotation(absmax).steps()
    assert steps.counts.max() >= 1  # a block takes a step
    x = torch.randn(37, cols) * torch.logspace(-3, 3, cols)
    x[3], x[5, :4], x[6, 7] = 0, float("inf"), float("nan")
    x[8] *= 1e-36
    x[9, :3] = torch.tensor([1e-41, -3e-39, 1e-45])
    x[10] *= 1e32
    smooth = torch.rand(cols) + 0.3
    monkeypatch.setattr(cpu_native, "PARALLEL_MIN_ELEMENTS", 1 if parallel else 1 << 62)
    grids = [None, (8, 0, 7.0, 30, 30), (8, 1, 6.0, 1, 0), (cols, 0, 448.0, 3, -6)]  # int4, MX E2M1, E4M3 per token
    grids += [(16, 0, 7.0, 30, 30), (16, 0, 127.0, 30, 30)] * (cols % 16 == 0)  # int4 / int8 g16
    with torch_threads(2):
        for divisor in (smooth, None):
            rotated = steps.apply(x if divisor is None else x / divisor)
            for grid in grids:
                run = duquant_rows_pass(divisor, steps, grid)
                if native_library() is None:
                    assert run is None
                    return
                expected = rotated if grid is None else fake_quantize_grid(rotated, *grid)
                torch.testing.assert_close(run(x), expected, rtol=0, atol=0, equal_nan=True)
    run = duquant_rows_pass(smooth, steps, None)
    strided = x.t().contiguous().t()  # the same values, not contiguous: the caller's PyTorch path runs
    assert run(strided) is None and run(x.double()) is None and run(x[:, :-1].contiguous()) is None
    assert run(x[:0]) is None and run(x.reshape(1, 37, cols)).shape == (1, 37, cols)
    assert duquant_rows_pass(smooth, steps, (8, 2, 6.0, 1, 0)) is None  # NVFP4's tensor scale needs every row first
    assert duquant_rows_pass(smooth[:-1], steps, None) is None


@pytest.mark.parametrize("cols", [128, 1152, 96])
def test_a_layers_prepared_passes_are_the_plain_ones_into_a_reused_buffer(cols, monkeypatch):
    """``hadamard_rows_pass`` / ``duquant_rows_pass``: the layer prepared once in C (its addresses, grid, divisors),
    then each call the plain pass's bits (``hadamard_rows``; ``RotationSteps.apply`` and the grid), on one and two
    threads; the rows go to this thread's reused buffer (two calls, one buffer; an input inside that buffer gets a new
    tensor, so a pass of a pass is still right); another thread has its own buffer."""
    import threading

    from compressdit.quant.cpu_native import duquant_rows_pass, fake_quantize_grid, hadamard_rows, hadamard_rows_pass
    from compressdit.quant.duquant import fit_outlier_rotation

    torch.manual_seed(0)
    x = torch.randn(40, cols) * torch.logspace(-2, 2, cols)
    x[3], x[5, :2], x[6, 7] = 0, float("inf"), float("nan")
    smooth, signs = torch.rand(cols) + 0.3, (torch.randint(0, 2, (cols,)) * 2 - 1).to(torch.int8)
    absmax = torch.rand(cols) + 0.5
    absmax[:3] *= 50
    steps = fit_outlier_rotation(absmax).steps()
    for grid in (None, (16, 0, 7.0, 30, 30), (8, 1, 6.0, 1, 0)):
        if grid is not None and cols % grid[0]:
            continue
        hadamard, duquant = hadamard_rows_pass(smooth, signs, grid), duquant_rows_pass(smooth, steps, grid)
        if native_library() is None:
            assert hadamard is None and duquant is None
            return
        rotated = steps.apply(x / smooth)
        for parallel in (False, True):
            monkeypatch.setattr(cpu_native, "PARALLEL_MIN_ELEMENTS", 1 if parallel else 1 << 62)
            with torch_threads(2):
                torch.testing.assert_close(hadamard(x), hadamard_rows(x, smooth, signs, grid), rtol=0, atol=0,
                                           equal_nan=True)
                expected = rotated if grid is None else fake_quantize_grid(rotated, *grid)
                torch.testing.assert_close(duquant(x), expected, rtol=0, atol=0, equal_nan=True)
    def same(a, b):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

    first, second = hadamard(x).clone(), hadamard(x * 2)
    assert hadamard(x).data_ptr() == second.data_ptr()  # one buffer, written over by each call
    same(second, first)
    again = hadamard(hadamard(x))  # its input lies in the buffer: a new tensor for the rows
    assert again.data_ptr() != hadamard(x).data_ptr()
    same(again, hadamard(first))
    twice = duquant(duquant(x))  # DuQuant's pass cannot write over its input
    same(twice, duquant(duquant(x).clone()))
    other = []
    thread = threading.Thread(target=lambda: other.append(hadamard(x)))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != hadamard(x).data_ptr()
    same(other[0], first)


@pytest.mark.parametrize("cols", [128, 96])
@pytest.mark.parametrize("parallel", [False, True])
def test_the_hadamard_pass_writes_integer_codes_of_the_same_values(cols, parallel, monkeypatch):
    """``hadamard_codes`` (cpu-twinlog-groups' activations): the rotated rows' grid values as byte codes and scales
    per group (each ``repeat`` times) whose products are the fused pass's values bit for bit; NaN groups NaN."""
    from compressdit.quant.cpu_native import hadamard_codes, hadamard_rows
    from compressdit.quant.rotation import random_signs

    torch.manual_seed(0)
    x = torch.randn(37, cols) * torch.logspace(-3, 3, cols)
    x[3], x[6, 7] = 0, float("nan")
    x[9, :3] = torch.tensor([1e-41, -3e-39, 1e-45])
    smooth, signs = torch.rand(cols) + 0.3, random_signs(cols, 0)
    monkeypatch.setattr(cpu_native, "PARALLEL_MIN_ELEMENTS", 1 if parallel else 1 << 62)
    for grid, mult, repeat in (((16, 0, 7.0, 30, 30), 1.0, 1), ((32, 1, 6.0, 1, 0), 2.0, 2)):  # int4; MX E2M1 (x2)
        got = hadamard_codes(x, smooth, signs, grid, repeat, mult)
        if native_library() is None:
            assert got is None
            return
        codes, scales = got
        values = (codes.float() - grid[2] * mult) * scales.repeat_interleave(grid[0] // repeat, dim=1)
        truth = hadamard_rows(x, smooth, signs, grid)
        nan_groups = truth.isnan().view(37, -1, grid[0]).any(-1, keepdim=True).expand(-1, -1, grid[0])
        assert torch.equal(values.isnan(), nan_groups.reshape(37, cols))
        assert torch.equal(values[~values.isnan()], truth[~values.isnan()])


def _microkernel_runs(kind: str) -> bool:
    """Whether the ``kind`` ("bf16" / "int8") microkernel runs here. Where it does not (no AMX, no C++ op library),
    checks what happens instead: a small layer's kernel keeps no copy packed for it and gives the reference's output."""
    if cpu_native.bf16_brgemm() if kind == "bf16" else cpu_native.int8_brgemm():
        return True
    from compressdit.quant.kernel_registry import cache_of

    torch.manual_seed(0)
    spec = LinearQuantSpec(w_bits=4, group_size=32) if kind == "bf16" else LinearQuantSpec(w_bits=8, a_bits=8)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 48), spec)
    x = torch.randn(5, 128)
    with torch.no_grad():
        out, reference = layer(x), layer.reference_forward(x)
    assert cache_of(layer).buffers.get("packed" if kind == "bf16" else "microkernel") is None
    assert ((out - reference).norm() / reference.norm()).item() <= 6e-3
    return False


def _bf16_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the bf16 microkernel computes, in fp64: bf16 activations and weights, exact products and sums."""
    return x.to(torch.bfloat16).double() @ weight.to(torch.bfloat16).double().t()


@pytest.mark.parametrize("rows, out_features, in_features", [(300, 200, 96), (16, 770, 128), (1, 64, 8), (5, 10, 2)])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_bf16_microkernel_is_the_bf16_product_with_fp32_sums(rows, out_features, in_features, threads):
    """``bf16_linear`` (csrc/bf16_gemm.cpp; AMX-BF16 only): bf16(x) @ bf16(W)^T summed in fp32, the row and channel
    scales and the bias after, on any split over the team (rows, or column blocks for few rows), partial blocks of
    64 channels included; fp32 and bf16 inputs alike; the output fp32 (not rounded to bf16)."""
    if not _microkernel_runs("bf16"):
        return
    torch.manual_seed(0)
    x, weight = torch.randn(rows, in_features) * 3, torch.randn(out_features, in_features)
    bias, row_scale, col_scale = torch.randn(out_features), torch.rand(rows) + 0.5, torch.rand(out_features) + 0.5
    packed = cpu_native.bf16_pack(weight)
    assert packed.dtype == torch.bfloat16 and packed.shape == ((out_features + 63) // 64, in_features, 64)
    product = _bf16_product(x, weight)
    tolerance = 1e-5 * product.abs().max().item() + 1e-6  # fp32 sums of exact products, in another order
    for source in (x, x.to(torch.bfloat16)):
        for scales in (False, True):
            out = torch.ops.compressdit_native.bf16_linear(source, packed, out_features, bias,
                                                           row_scale if scales else None,
                                                           col_scale if scales else None, threads)
            expected = product * row_scale.double()[:, None] * col_scale.double() if scales else product
            assert out.dtype == torch.float32 and out.shape == (rows, out_features)
            assert (out.double() - (expected + bias.double())).abs().max().item() <= 2 * tolerance
    no_bias = cpu_native.bf16_linear(x, packed, out_features)
    assert (no_bias.double() - product).abs().max().item() <= tolerance


def test_the_bf16_microkernel_rejects_what_it_cannot_read():
    if not _microkernel_runs("bf16"):
        return
    with pytest.raises(RuntimeError, match="even in"):
        cpu_native.bf16_pack(torch.zeros(8, 15))
    packed = cpu_native.bf16_pack(torch.zeros(8, 16))
    with pytest.raises(RuntimeError, match="bf16_pack's"):
        cpu_native.bf16_linear(torch.zeros(4, 32), packed, 8)
    with pytest.raises(RuntimeError, match="contiguous fp32 or bf16"):
        cpu_native.bf16_linear(torch.zeros(4, 16, dtype=torch.float64), packed, 8)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_native.bf16_linear(torch.zeros(4, 16), packed, 8, torch.zeros(9))


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("rows, threads", [(37, 2), (37, 1), (1, 2), (300, 2)])
@pytest.mark.parametrize("activation", [0, 1])
def test_the_int8_microkernel_gives_the_fused_ops_numbers_bit_for_bit(per_token, rows, threads, activation):
    """int8_linear on codes packed by ``int8_pack`` (oneDNN's microkernel, AMX-INT8 only) makes the same int32 sums
    as ``torch._int_mm``: the same outputs, codes and scales bit for bit, a partial block of 64 channels included."""
    if not _microkernel_runs("int8"):
        return
    x = _activations(rows=max(rows, 3), cols=96)[:rows]
    torch.manual_seed(1)
    codes = torch.randint(-127, 128, (100, 96), dtype=torch.int8)
    w_scale, bias = torch.rand(100) / 50, torch.randn(100)
    packed = cpu_native.int8_pack(codes)
    assert packed.shape == (2, 96, 64) and packed.dtype == torch.int8
    op = torch.ops.compressdit_native.int8_linear
    expected = op(x, None, codes.t(), w_scale, bias, per_token, threads, None, None, activation)
    out = op(x, None, codes.t(), w_scale, bias, per_token, threads, None, None, activation, packed)
    for a, b in zip(out, expected):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="int8_pack's"):
        op(x, None, codes.t(), w_scale, bias, per_token, threads, None, None, activation, packed[:1])
    with pytest.raises(RuntimeError, match="multiple of 4"):
        cpu_native.int8_pack(codes[:, :90])


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("rows, threads", [(300, 2), (37, 1), (1, 2)])
@pytest.mark.parametrize("activation", [0, 1])
@pytest.mark.parametrize("microkernel", [False, True], ids=["int_mm", "microkernel"])
def test_the_int8_op_takes_bf16_rows_as_their_fp32_widening(per_token, rows, threads, activation, microkernel):
    """bf16 rows go into int8_linear as they are (a bf16 model's W8A8 layers: no fp32 copy of the input or output):
    widened exactly, so the codes and scales are those of ``x.float()``, and the output is the fp32 path's rounded to
    bf16 (to nearest even, as ``.to(torch.bfloat16)``), on ``torch._int_mm`` and on the microkernel (chunks of 128
    rows: 300 rows on two threads cross a chunk). With a balancing divisor (its bf16 values) the rows are divided as
    torch divides a bf16 tensor: the op equals itself on ``x / smooth`` computed by torch."""
    if not native_ops_built():
        return
    if microkernel and not _microkernel_runs("int8"):
        return
    x = _activations(rows=max(rows, 3), cols=96)[:rows].bfloat16().contiguous()
    torch.manual_seed(1)
    codes = torch.randint(-127, 128, (100, 96), dtype=torch.int8)
    w_scale, bias = torch.rand(100) / 50, torch.randn(100)
    packed = cpu_native.int8_pack(codes) if microkernel else None
    op = torch.ops.compressdit_native.int8_linear
    out, q, scale = op(x, None, codes.t(), w_scale, bias, per_token, threads, None, None, activation, packed)
    expected, q32, scale32 = op(x.float(), None, codes.t(), w_scale, bias, per_token, threads, None, None, activation,
                                packed)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 100)
    assert torch.equal(q, q32) and torch.equal(scale, scale32)
    assert torch.equal(out.view(torch.int16), expected.to(torch.bfloat16).view(torch.int16))
    smooth = (torch.rand(96) + 0.5).bfloat16().float()  # a divisor's bf16 values: rows divided as torch divides
    smooth[:3] = torch.tensor([1e-3, 3.0, 1e4]).bfloat16().float()
    out, q, scale = op(x, smooth, codes.t(), w_scale, bias, per_token, threads, None, None, activation, packed)
    balanced = (x / smooth.bfloat16()).contiguous()
    expected, q_b, scale_b = op(balanced, None, codes.t(), w_scale, bias, per_token, threads, None, None, activation,
                                packed)
    assert torch.equal(q, q_b) and torch.equal(scale, scale_b)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("rows, threads", [(300, 2), (300, 1), (16, 2), (3, 1)])
@pytest.mark.parametrize("grid, rotated", [((16, 0, 7.0, 30, 30), False), ((32, 1, 6.0, 1, 0), False),
                                           ((16, 2, 6.0, 1, 0), False), (None, True), ((16, 0, 7.0, 30, 30), True),
                                           ((32, 1, 6.0, 1, 0), True), ((16, 2, 6.0, 1, 0), True)],
                         ids=["int4-g16", "mxfp4", "nvfp4", "rotation", "rotation-int4-g16", "rotation-mxfp4",
                              "rotation-nvfp4"])
def test_the_bf16_microkernel_transforms_its_rows_as_the_passes_do(rows, threads, grid, rotated):
    """``bf16_linear``'s fused transform (each thread's rows balanced and rotated as :func:`hadamard_rows`, quantized as
    :func:`fake_quantize_grid`; NVFP4's tensor scale from every row first) gives the op's numbers on the separate
    passes' rows bit for bit, on rows split over the team or column blocks; it refuses what the passes would not."""
    if not _microkernel_runs("bf16"):
        return
    torch.manual_seed(0)
    x = _activations(rows=max(rows, 3), cols=128)[:rows].contiguous()
    smooth, signs = torch.rand(128) + 0.5, (torch.randint(0, 2, (128,)) * 2 - 1).to(torch.int8)
    packed, bias = cpu_native.bf16_pack(torch.randn(100, 128)), torch.randn(100)
    op = torch.ops.compressdit_native.bf16_linear
    if rotated and grid is not None and grid[1] == 2:  # NVFP4 after a rotation: not a per-block pass
        with pytest.raises(RuntimeError, match="rule 0 or 1"):
            op(x, packed, 100, bias, None, None, threads, smooth, signs, *grid)
        return
    rows_in = cpu_native.hadamard_rows(x, smooth, signs, grid) if rotated else cpu_native.fake_quantize_grid(x, *grid)
    expected = op(rows_in, packed, 100, bias, None, None, threads)
    transform = (smooth, signs) if rotated else (None, None)
    out = op(x, packed, 100, bias, None, None, threads, *transform, *(grid or (0, 0, 0.0, 0, 0)))
    assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="fp32 rows"):
        op(x.to(torch.bfloat16), packed, 100, bias, None, None, threads, *transform, *(grid or (16, 0, 7.0, 30, 30)))


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("rows, threads", [(37, 2), (37, 1), (1, 2), (300, 2)])
def test_the_grouped_int8_op_on_the_microkernel_gives_its_numbers_bit_for_bit(per_token, rows, threads):
    """int8_group_linear with each group's codes packed by ``int8_pack`` (AMX-INT8 only) makes the same int32 sums
    per group as ``torch._int_mm``: the same output bit for bit, a partial block of 64 channels included."""
    if not _microkernel_runs("int8"):
        return
    x = _activations(rows=max(rows, 3), cols=128)[:rows]
    torch.manual_seed(2)
    codes = torch.randint(-7, 8, (4, 100, 32), dtype=torch.int8)  # [groups, out, group]
    w_scale, bias = torch.rand(4, 100) / 50, torch.randn(100)
    packed = torch.stack([cpu_native.int8_pack(group) for group in codes])
    op = torch.ops.compressdit_native.int8_group_linear
    expected = op(x, codes, w_scale, bias, per_token, threads)
    assert torch.equal(op(x, codes, w_scale, bias, per_token, threads, packed), expected)
    with pytest.raises(RuntimeError, match="int8_pack's"):
        op(x, codes, w_scale, bias, per_token, threads, packed[:, :1])


def test_the_microkernels_can_be_switched_off_from_the_environment():
    """``COMPRESSDIT_CPU_MICROKERNELS=0`` (read once per process) keeps the fp32 / torch._int_mm kernels on AMX too."""
    import subprocess
    import sys

    code = ("from compressdit.quant import cpu_native as c; from compressdit.quant.cpu_dense import decoded_kernel_name;"
            "from compressdit.quant.spec import LinearQuantSpec as S;"
            "print(c.bf16_brgemm(), c.int8_brgemm(), decoded_kernel_name(S(w_bits=4, group_size=16, a_bits=4, "
            "a_granularity='per_group', a_group_size=16), (48, 128)))")
    env = {**os.environ, "COMPRESSDIT_CPU_MICROKERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "cpu-decoded-dense"]


@pytest.mark.parametrize("rows, threads", [(300, 2), (300, 1), (16, 2), (3, 1)])
@pytest.mark.parametrize("grid", [None, (16, 0, 7.0, 30, 30), (32, 1, 6.0, 1, 0), (16, 2, 6.0, 1, 0)],
                         ids=["none", "int4-g16", "mxfp4", "nvfp4"])
def test_the_bf16_microkernel_balances_its_rows_as_torch_divides(rows, threads, grid):
    """``smooth`` without a rotation: each thread's rows divided as ``x / smooth`` (the fast reciprocal division where
    it is exact, quotients out of its range and zeros included), then quantized (NVFP4's tensor scale from every
    balanced row first) and rounded: bit for bit the op on the separate passes' rows."""
    if not _microkernel_runs("bf16"):
        return
    torch.manual_seed(0)
    x = _activations(rows=max(rows, 3), cols=128)[:rows].contiguous()
    x[0, :4] = torch.tensor([0.0, 1e-38, 1e31, -1e-30])  # zero, tiny and huge quotients: the plain division
    smooth = torch.rand(128) + 0.5
    smooth[:4] = torch.tensor([2.0, 1e-3, 0.5, 1e6])
    packed, bias = cpu_native.bf16_pack(torch.randn(100, 128)), torch.randn(100)
    op = torch.ops.compressdit_native.bf16_linear
    balanced = x / smooth
    rows_in = balanced if grid is None else cpu_native.fake_quantize_grid(balanced, *grid)
    expected = op(rows_in, packed, 100, bias, None, None, threads)
    out = op(x, packed, 100, bias, None, None, threads, smooth, None, *(grid or (0, 0, 0.0, 0, 0)))
    assert torch.equal(out, expected)


def _svdquant_product(x, smooth, grid, weight, down, up, bias):
    """What the op computes with SVDQuant's branch, in fp64: the quantized balanced rows times W on bf16 operands, plus
    the hidden rows (the balanced rows times D on bf16 operands) times U exactly (the op's bf16x3 product: ~16 bits)."""
    balanced = x / smooth if smooth is not None else x
    rows = balanced if grid is None else cpu_native.fake_quantize_grid(balanced.contiguous(), *grid)
    hidden = _bf16_product(balanced, down)
    return (_bf16_product(rows, weight) + hidden @ up.double().t() + bias.double(),
            hidden.abs().max().item() * up.abs().max().item() * up.shape[1])


def _packed_with_branch(weight, up):
    from compressdit.quant.cpu_dense import _bf16_terms

    up_hi, up_lo = _bf16_terms(up)
    return cpu_native.bf16_pack(torch.cat([weight, up_hi, up_hi, up_lo], dim=1))


@pytest.mark.parametrize("rows, threads", [(300, 2), (300, 1), (16, 2), (3, 1)])
@pytest.mark.parametrize("grid, smoothed, rank", [((64, 0, 7.0, 30, 30), True, 16), ((16, 2, 6.0, 1, 0), True, 16),
                                                  (None, True, 16), ((16, 2, 6.0, 1, 0), False, 80)],
                         ids=["int4-g64", "nvfp4", "weight-only", "nvfp4-rank80-unbalanced"])
def test_the_bf16_microkernel_runs_svdquants_branch_in_its_product(rows, threads, grid, smoothed, rank):
    """``down`` with ``[W | U_hi | U_hi | U_lo]`` packed: the branch's hidden rows (the balanced, unquantized rows in
    bf16 times the down factor, fp32 sums) extend the quantized rows, in two bf16 terms, of one product: the branch's
    up product to ~16 bits, on any split over the team (ranks above one block of 64 included); without ``down`` the
    same packing gives W's product alone (h = 0), for fp32 and bf16 rows."""
    if not _microkernel_runs("bf16"):
        return
    torch.manual_seed(0)
    x = _activations(rows=max(rows, 3), cols=128)[:rows].contiguous()
    weight, down, up = torch.randn(100, 128), torch.randn(rank, 128) / 4, torch.randn(100, rank) / 4
    smooth, bias = (torch.rand(128) + 0.5) if smoothed else None, torch.randn(100)
    packed = _packed_with_branch(weight, up)
    assert packed.shape == (2, 128 + 3 * rank, 64)
    transform = (smooth, None, *(grid or (0, 0, 0.0, 0, 0)))
    expected, branch_bound = _svdquant_product(x, smooth, grid, weight, down, up, bias)
    out = cpu_native.bf16_linear(x, packed, 100, bias, transform=transform, down=cpu_native.bf16_pack(down))
    tolerance = 1e-5 * expected.abs().max().item() + 2 ** -15 * branch_bound  # fp32 sums; the bf16x3 product
    assert out.shape == (rows, 100) and (out.double() - expected).abs().max().item() <= tolerance
    op = torch.ops.compressdit_native.bf16_linear
    for source in (x, x.to(torch.bfloat16)):  # W alone: the branch's columns meet zeros
        alone = op(source, packed, 100, bias, None, None, threads)
        plain = op(source, cpu_native.bf16_pack(weight), 100, bias, None, None, threads)
        assert (alone - plain).abs().max().item() <= 1e-6 * plain.abs().max().item()  # fp32 sums tiled otherwise


def test_the_bf16_microkernels_branch_refuses_what_it_cannot_read():
    if not _microkernel_runs("bf16"):
        return
    x, weight, up = torch.randn(5, 32), torch.randn(8, 32), torch.randn(8, 4)
    packed, down = _packed_with_branch(weight, up), cpu_native.bf16_pack(torch.randn(4, 32))
    op = torch.ops.compressdit_native.bf16_linear
    with pytest.raises(RuntimeError, match="bf16_pack's"):  # a plain W cannot take a branch
        cpu_native.bf16_linear(x, cpu_native.bf16_pack(weight), 8, down=down)
    with pytest.raises(RuntimeError, match="3 rank"):  # U not in its two terms
        cpu_native.bf16_linear(x, cpu_native.bf16_pack(torch.cat([weight, up], dim=1)), 8, down=down)
    with pytest.raises(RuntimeError, match="down must be"):
        cpu_native.bf16_linear(x, packed, 8, down=cpu_native.bf16_pack(torch.randn(4, 16)))
    with pytest.raises(RuntimeError, match="unrotated"):
        op(x, packed, 8, None, None, None, 1, None, torch.ones(32, dtype=torch.int8), 0, 0, 0.0, 0, 0, down)
    with pytest.raises(RuntimeError, match="no row or channel scales"):
        cpu_native.bf16_linear(x, packed, 8, row_scale=torch.ones(5), down=down)
    with pytest.raises(RuntimeError, match="fp32 rows"):
        cpu_native.bf16_linear(x.to(torch.bfloat16), packed, 8, down=down)


@pytest.mark.parametrize("rows, threads", [(300, 2), (300, 1), (3, 1)])
@pytest.mark.parametrize("grid, smoothed", [((64, 0, 7.0, 30, 30), True), ((16, 2, 6.0, 1, 0), True),
                                            ((32, 1, 6.0, 1, 0), True), (None, True), ((16, 2, 6.0, 1, 0), False)],
                         ids=["int4-g64", "nvfp4", "mxfp4", "weight-only", "nvfp4-unbalanced"])
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "bf16x3"])
def test_svdquant_rows_for_torchs_gemm_are_the_separate_passes_bit_for_bit(rows, threads, grid, smoothed, split,
                                                                           monkeypatch):
    """``branch_rows`` (an SVDQuant layer's GEMM input without the microkernel): ``[q(x / s) | h]`` in fp32, or
    ``[bf16(q) | h_hi | h_lo | h_hi]``, where ``x / s`` is torch's division bit for bit (zero, tiny and huge quotients
    included), ``q`` the grid pass on it (NVFP4's tensor scale over the balanced rows) and ``h`` its down product; on
    any number of threads. ``None`` without the library (the kernel then builds the same rows from PyTorch ops)."""
    torch.manual_seed(0)
    x = _activations(rows=max(rows, 3), cols=128)[:rows].contiguous()
    x[0, :4] = torch.tensor([0.0, 1e-38, 1e31, -1e-30])
    smooth = torch.rand(128) + 0.5 if smoothed else None
    if smoothed:
        smooth[:4] = torch.tensor([2.0, 1e-3, 0.5, 1e6])
    inv = None if smooth is None else torch.ones_like(smooth).div_(smooth)
    down_t = torch.randn(128, 16) / 4
    monkeypatch.setattr(cpu_native, "PARALLEL_MIN_ELEMENTS", 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = cpu_native.branch_rows(x, smooth, inv, down_t, grid, split)
    finally:
        torch.set_num_threads(before)
    if native_library() is None:
        assert out is None
        return
    balanced = x if smooth is None else x / smooth
    quantized = balanced if grid is None else cpu_native.fake_quantize_grid(balanced, *grid)
    hidden = balanced @ down_t
    if not split:
        assert out.shape == (rows, 128 + 16) and out.dtype == torch.float32
        assert torch.equal(out[:, :128], quantized)
        torch.testing.assert_close(out[:, 128:], hidden, rtol=1e-6, atol=1e-6 * hidden.abs().max().item())
        return
    assert out.shape == (rows, 128 + 48) and out.dtype == torch.bfloat16
    assert torch.equal(out[:, :128], quantized.to(torch.bfloat16))
    hi, lo = out[:, 128:144].float(), out[:, 144:160].float()
    assert torch.equal(out[:, 160:176], out[:, 128:144])
    torch.testing.assert_close(hi, hidden, rtol=2 ** -8, atol=0)  # hi = bf16(h), lo = bf16(h - hi): ~16 bits in all
    torch.testing.assert_close(hi.double() + lo.double(), hidden.double(), rtol=2 ** -15,
                               atol=1e-6 * hidden.abs().max().item())


@pytest.mark.parametrize("with_zero", [False, True])
def test_int4_weights_decode_in_one_pass_bit_for_bit_into_a_reused_buffer(with_zero):
    """``dequantize_nibbles_bf16``: ``dequantize_nibbles``' bf16 weight bit for bit (codes 0..15, scales of every
    magnitude, zero points), on two threads, into one buffer per thread reused by the next call; torch's bf16 GEMM on
    that buffer then gives each layer's own product (no weight cached by its address between calls)."""
    from compressdit.quant.gpu_reference import dequantize_nibbles

    torch.manual_seed(0)
    nibbles = torch.randint(0, 256, (96, 64), dtype=torch.uint8)
    scale = (torch.randn(96, 4) * torch.logspace(-20, 20, 4)).bfloat16()
    zero = torch.randn(96, 4).bfloat16() if with_zero else None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = cpu_native.dequantize_nibbles_bf16(nibbles, scale, zero, 32)
    finally:
        torch.set_num_threads(before)
    if native_library() is None:
        assert out is None
        return
    expected = dequantize_nibbles(nibbles, scale, zero, 32)
    assert out.shape == (96, 128) and torch.equal(out.view(torch.int16), expected.view(torch.int16))
    x = torch.randn(300, 128).bfloat16()
    first = torch.nn.functional.linear(x, out)
    other = cpu_native.dequantize_nibbles_bf16(nibbles.flip(0).contiguous(), scale, zero, 32)
    assert other.data_ptr() == out.data_ptr()  # the same buffer, new contents
    second = torch.nn.functional.linear(x, other)
    assert torch.equal(first, torch.nn.functional.linear(x, expected))
    assert torch.equal(second, torch.nn.functional.linear(x, dequantize_nibbles(nibbles.flip(0), scale, zero, 32)))


def _decodable_layers() -> dict:
    """One 2 x 64-wide layer of each format that decodes in one C pass (``fp32_decoding``), scales of many
    magnitudes."""
    from compressdit.quant.formats import FORMATS
    from compressdit.quant.spec import LinearQuantSpec

    specs = {"int-w4-g32-zero": dict(w_bits=4, group_size=32, w_symmetric=False),
             "int-w3-channel": dict(w_bits=3), "int-w2-g16": dict(w_bits=2, group_size=16),
             "nvfp4": dict(format="nvfp4", w_bits=4), "mxfp4": dict(format="mxfp4", w_bits=4),
             "e2m1-g32": dict(format="e2m1", w_bits=4, group_size=32),
             "twinlog-w4": dict(format="twinlog", w_bits=4), "twinlog-w3": dict(format="twinlog", w_bits=3),
             "fp8": dict(format="fp8", w_bits=8, a_bits=8),
             "vq-6-bit-pairs": dict(format="vq", w_bits=3, vector_dim=2, codebook_size=64, row_scale=True),
             "vq-4-bit-pairs": dict(format="vq", w_bits=2, vector_dim=2, codebook_size=16),
             "vq-8-bit-quads": dict(format="vq", w_bits=2, vector_dim=4, codebook_size=256)}
    layers = {}
    for name, fields in specs.items():
        torch.manual_seed(0)
        linear = torch.nn.Linear(64, 40)
        with torch.no_grad():
            linear.weight.mul_(torch.logspace(-3, 3, 40)[:, None])
        spec = LinearQuantSpec.from_dict(fields, "spec")
        FORMATS.get(spec.format).validate_spec(spec, "spec")
        layers[name] = FORMATS.get(spec.format).quantize(linear, spec, torch.rand(64) + 0.5)
    layers["fp8-widened"] = copy.deepcopy(layers["fp8"]).to(torch.bfloat16)  # module.to: E4M3 values in bf16
    # 88 columns: the AVX2 table lookups take 32 a turn, the last 24 the scalar loop (first: the largest weight, whose
    # buffer the others reuse)
    spec = LinearQuantSpec.from_dict(specs["twinlog-w4"], "spec")
    wide = FORMATS.get("twinlog").quantize(torch.nn.Linear(88, 40), spec, torch.rand(88) + 0.5)
    return {"twinlog-w4-88-wide": wide, **layers}


def test_every_formats_weight_decodes_in_one_pass_bit_for_bit():
    """``decode_f32`` of each layer's ``fp32_decoding``: its own fp32 weight bit for bit (integers with and without
    zero points at 2-4 bits, NVFP4 / MXFP4 blocks, a 4-bit minifloat and twin-log's table per row; FP8 codes with
    channel scales; VQ codeword indices of 4, 6 and 8 bits, with and without row scales), on two threads; into one
    reused buffer; what the pass does not take gives ``None``."""
    before = torch.get_num_threads()
    decoded = {}
    try:
        torch.set_num_threads(2)
        for name, layer in _decodable_layers().items():
            out = cpu_native.decode_f32(layer.fp32_decoding())
            if native_library() is None:
                assert out is None
                return
            # the weight in the space the kernel's input arrives in: before the input transform where the layer has one
            decoder = getattr(layer, "dequantized_weight", layer.effective_weight)
            expected = decoder(torch.float32)
            assert torch.equal(out, expected), name
            decoded[name] = out
    finally:
        torch.set_num_threads(before)
    assert len({t.data_ptr() for t in decoded.values()}) == 1  # one buffer per thread, reused
    nibbles = torch.zeros(4, 8, dtype=torch.uint8)
    assert cpu_native.decode_f32(("nibbles", nibbles, torch.zeros(15), None, None)) is None  # not a 16-value table
    assert cpu_native.decode_f32(("nibbles", nibbles, torch.zeros(16), torch.ones(4, 3), None)) is None  # 16 / 3
    assert cpu_native.decode_f32(("nibbles", nibbles.int(), torch.zeros(16), None, None)) is None
    assert cpu_native.decode_f32(("bytes", nibbles, torch.zeros(255), None)) is None
    assert cpu_native.decode_f32(("vq", nibbles, 6, torch.zeros(48, 2), None, 16)) is None  # indices past 48
    assert cpu_native.decode_f32(("vq", nibbles, 6, torch.zeros(64, 2), None, 32)) is None  # 16 x 6 bits > 8 bytes


def test_fp8_passes_take_and_give_a_bf16_models_rows_bit_for_bit():
    """The FP8 kernel's passes on a bf16 model's rows: E4M3 codes and scales of bf16 rows read widened are those of
    ``x.float()``; the scaled output written over the GEMM's bf16 output is the fp32 epilogue's rounded to bf16."""
    x = _activations(rows=37, cols=96).bfloat16()
    codes, scale = cpu_native.quantize_e4m3_bf16(x)
    codes32, scale32 = cpu_native.quantize_e4m3_bf16(x.float())
    assert torch.equal(codes.view(torch.int16), codes32.view(torch.int16)) and torch.equal(scale, scale32)
    torch.manual_seed(2)
    y = torch.randn(37, 50).bfloat16()
    rows, cols, bias = torch.rand(37) * 1e-3, torch.rand(50), torch.randn(50)
    expected = cpu_native.bf16_scale(y, rows, cols, bias).to(torch.bfloat16)
    out = cpu_native.bf16_scale(y.clone(), rows, cols, bias, bf16_out=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("grid", [(16, 0, 7.0, 30, 30), (32, 1, 6.0, 1, 0), (16, 2, 6.0, 1, 0)],
                         ids=["int4-g16", "mxfp4", "nvfp4"])
def test_the_grid_pass_rounds_a_bf16_models_rows_in_one_pass(grid):
    """``grid_rows_bf16_``: the grid pass's values (NVFP4's tensor scale over every row) rounded to bf16, bit for bit,
    its input used as work memory."""
    x = _activations(rows=37, cols=96)
    expected = cpu_native.fake_quantize_grid(x, *grid)
    out = cpu_native.grid_rows_bf16_(x.clone(), *grid)
    if native_library() is None:
        assert out is None and expected is None
        return
    assert torch.equal(out.view(torch.int16), expected.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 300])
def test_the_down_product_is_the_same_fused_sums_on_every_path(rows, gemm_threads):
    """``times_rows`` (SVDQuant's down product): b @ d to fp32 rounding, and each output the same in-order sum of fused
    multiply-adds whichever path computes it (4 rows x 16 ranks, 8 ranks, the scalar tail) and on any thread count."""
    from compressdit.quant.cpu_native import times_rows

    gen = torch.Generator().manual_seed(rows)
    b, d = torch.randn(rows, 136, generator=gen), torch.randn(136, 29, generator=gen)
    h = times_rows(b, d)
    torch.testing.assert_close(h, (b.double() @ d.double()).float(), rtol=1e-5, atol=1e-4)
    if native_library() is None:  # torch.mm: nothing more to compare
        return
    for cols in (slice(0, 8), slice(16, 24), slice(24, 29), slice(3, 11)):  # 16 + 8 + 5 ranks; then unaligned
        assert torch.equal(times_rows(b, d[:, cols].contiguous()), h[:, cols])
    gemm_threads(2)
    assert torch.equal(times_rows(b, d), h)
