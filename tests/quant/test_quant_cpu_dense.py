"""The small-layer dense kernels (both weights: fp32 and bf16, forced) against the dequantize reference."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant.cpu_dense import (BF16_MIN_WEIGHT, _brgemm_shape, bf16_gemm_pays, decoded_kernel_name,
                                         dense_kernel_name)
from compressdit.quant.kernel_registry import cache_of, set_kernel
from compressdit.quant.layers import QuantLinear
from compressdit.quant.spec import LinearQuantSpec

SPECS = [
    LinearQuantSpec(w_bits=4, group_size=64),
    LinearQuantSpec(w_bits=4, group_size=64, balance=0.3),  # balancing folded into the decoded weight
    LinearQuantSpec(w_bits=3, group_size=32, w_symmetric=False, rotation="hadamard"),  # rotation folded too
    LinearQuantSpec(w_bits=4, group_size=64, balance=0.3, low_rank=4),  # a branch: transform, no folding
    LinearQuantSpec(w_bits=4, a_bits=8, group_size=64, w_symmetric=False, balance=0.5),  # activations: no folding
]
# ||kernel - reference|| / ||reference||: summation order for fp32, bf16 activations / weights / output for bf16
BOUNDS = {"cpu-int-dense-fp32": 2e-6, "cpu-int-dense-bf16": 6e-3}


def _layers(spec: LinearQuantSpec, out_features: int = 48) -> tuple[torch.nn.Linear, QuantLinear]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, out_features)
    return linear, QuantLinear.from_linear(linear, spec, input_absmax=torch.rand(128) * 10 + 0.1)


def _error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


def test_the_machine_and_the_shape_pick_the_dense_kernel():
    small, large = _layers(SPECS[0])[1], _layers(SPECS[0], BF16_MIN_WEIGHT // 128)[1]
    # below BF16_MIN_WEIGHT: fp32 unless AMX's microkernel runs it
    microkernel = _brgemm_shape((48, 128))
    assert small.kernel_name == dense_kernel_name((48, 128))
    assert small.kernel_name == ("cpu-int-dense-bf16" if microkernel else "cpu-int-dense-fp32")
    assert large.kernel_name == dense_kernel_name((BF16_MIN_WEIGHT // 128, 128))
    assert large.kernel_name == ("cpu-int-dense-bf16" if bf16_gemm_pays() or microkernel else "cpu-int-dense-fp32")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
@pytest.mark.parametrize("kernel", sorted(BOUNDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_kernels_match_the_reference(spec, kernel, dtype):
    linear, layer = _layers(spec)
    layer.to(dtype)
    set_kernel(layer, kernel)
    x = (torch.randn(3, 9, 128) * torch.linspace(0.1, 5, 128)).to(dtype)
    with torch.no_grad():
        out, reference = layer(x), layer.reference_forward(x)
        assert cache_of(layer).buffers["folded"] == (spec.a_bits is None and spec.low_rank is None)
        assert out.dtype == dtype and out.shape == reference.shape
        if dtype == torch.float32:
            assert _error(out, reference) <= BOUNDS[kernel]
        else:  # the reference transforms and quantizes in bf16, the kernels in fp32 from the bf16 input: never worse
            exact = linear(x.float())
            assert _error(out, exact) <= _error(reference, exact) * 1.05
        # the kernel's run on an already transformed input (not QuantLinear.forward's path) is still right
        transformed = layer.transform_input(x)
        again = cache_of(layer).kernel.run(layer, transformed, cache_of(layer).buffers)
        assert _error(layer._add_low_rank(again, transformed), out) <= 1e-2


def test_the_thread_count_reselects_the_dense_kernel(fp32_kernels):
    from compressdit.quant.cpu_dense import _bf16_hardware

    shape = (BF16_MIN_WEIGHT // 128, 128)
    _, layer = _layers(SPECS[0], shape[0])
    threads, chosen = torch.get_num_threads(), {}
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            with torch.no_grad():
                layer(torch.randn(4, 128))
            chosen[count] = cache_of(layer).name
            assert chosen[count] == dense_kernel_name(shape) == layer.kernel_name
    finally:
        torch.set_num_threads(threads)
    assert chosen[2] == "cpu-int-dense-fp32"  # two threads: fp32 without the microkernel (AMX too, through torch)
    assert chosen[1] == ("cpu-int-dense-bf16" if _bf16_hardware()[1] else "cpu-int-dense-fp32")


DECODED = {  # the low-bit formats no CPU GEMM reads: weight decoded once, activations as the reference
    "nvfp4": dict(format="nvfp4", w_bits=4, a_bits=4, a_format="nvfp4", a_granularity="per_group"),
    "mxfp4": dict(format="mxfp4", w_bits=4, a_bits=4, a_format="mxfp4", a_granularity="per_group"),
    "mxfp8-weight-only": dict(format="mxfp8", w_bits=8),
    "svdquant-nvfp4": dict(format="nvfp4", w_bits=4, a_bits=4, a_format="nvfp4", a_granularity="per_group",
                           balance=0.5, low_rank=4),
    "fp4-e2m1-a6": dict(format="e2m1", w_bits=4, group_size=32, a_bits=6, a_format="e3m2"),
    "rtn-w4a4-groups": dict(w_bits=4, group_size=16, a_bits=4, a_granularity="per_group", a_group_size=16),
    "int-w4a4-static": dict(w_bits=4, group_size=16, a_bits=4, a_granularity="static"),
}


def _decoded_layer(name: str, out_features: int = 48):
    from compressdit.quant.formats import FORMATS

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, out_features)
    spec = LinearQuantSpec.from_dict(dict(DECODED[name]), "spec")
    FORMATS.get(spec.format).validate_spec(spec, "spec")
    return FORMATS.get(spec.format).quantize(linear, spec, torch.rand(128) * 10 + 0.1)


@pytest.mark.usefixtures("fp32_kernels")
@pytest.mark.parametrize("name", sorted(DECODED))
def test_low_bit_layers_decode_once_and_match_the_reference(name):
    """``cpu-decoded-dense``: the reference's numbers (its own activation quantizer, the layer's low-rank branch
    and balancing) without the per-call decode; an in-place change of the scales is picked up; inputs that need
    gradients get its output too; big layers keep the reference."""
    layer = _decoded_layer(name)
    x = torch.randn(3, 9, 128) * torch.linspace(0.1, 5, 128)
    with torch.no_grad():
        assert layer.kernel_name == "cpu-decoded-dense"
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
        assert cache_of(layer).nbytes() >= 128 * 48 * 4  # the decoded fp32 weight: RAM that inspect reports
        scale = layer.weight_scale  # doubled in place, as load_state_dict writes (E8M0 exponents: one more)
        scale.copy_(scale + 1 if scale.dtype == torch.uint8 else (scale.float() * 2).to(scale.dtype))
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        kernel_out = layer(x)
    x.requires_grad_(True)  # the kernel's output, the reference's gradient (kernel_registry.kernel_with_reference_grad)
    out = layer(x)
    assert torch.equal(out, kernel_out) and out.requires_grad
    from compressdit.quant.cpu_dense import DENSE_MAX_WEIGHT, _bf16_hardware

    # big layers: a bf16 copy where bf16 GEMMs run, else 4-bit codes decoded per call (other widths: the reference)
    four_bit = layer.fp32_decoding() is not None
    big = "cpu-decoded-bf16" if _bf16_hardware()[1] else "cpu-decoded-fp32" if four_bit else "reference"
    assert _decoded_layer(name, out_features=DENSE_MAX_WEIGHT // 128 + 16).kernel_name == big


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_bf16_kernel_is_the_scaled_codes_gemm_within_bf16_rounding(dtype, monkeypatch):
    """``cpu-fp8-bf16`` (chosen where bf16 GEMMs pay): E4M3 codes of activations and weights in a bf16 GEMM, scales
    after; within bf16 output rounding of the fp32 reference, a small share of the FP8 error itself. Its activation
    codes times their scales are the reference's fake-quantized activations bit for bit, on the C pass and on its
    PyTorch path (no library, or under compilation) alike."""
    from compressdit.quant import cpu_native
    from compressdit.quant.cpu_native import fake_quantize_e4m3_rows, quantize_e4m3_bf16
    from compressdit.quant.fp8_layer import FP8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    layer = FP8Linear.from_linear(linear, LinearQuantSpec(format="fp8", w_bits=8, a_bits=8))
    # below BF16_MIN_WEIGHT: fp32 unless AMX's microkernel runs it
    assert layer.kernel_name == ("cpu-fp8-bf16" if _brgemm_shape((48, 128)) else "cpu-fp8-dense")
    wide = FP8Linear.from_linear(torch.nn.Linear(128, BF16_MIN_WEIGHT // 128), layer.spec)
    wide_bf16 = bf16_gemm_pays() or _brgemm_shape((BF16_MIN_WEIGHT // 128, 128))
    assert wide.kernel_name == ("cpu-fp8-bf16" if wide_bf16 else "cpu-fp8-dense")
    layer.to(dtype)
    set_kernel(layer, "cpu-fp8-bf16")
    x = (torch.randn(3, 9, 128) * torch.linspace(0.1, 5, 128)).to(dtype)
    with torch.no_grad():
        out, reference, exact = layer(x), layer.reference_forward(x), linear(x.float())
    assert out.dtype == dtype and out.shape == reference.shape
    assert _error(out, reference) <= (6e-3 if dtype == torch.float32 else 1.2e-2)
    assert _error(out, reference) <= 0.2 * _error(reference, exact)
    rows = x.float().reshape(-1, 128)
    codes, scale = quantize_e4m3_bf16(rows)
    assert codes.dtype == torch.bfloat16 and scale.shape == (rows.shape[0],)
    assert torch.equal(codes.float() * scale[:, None], fake_quantize_e4m3_rows(rows))
    monkeypatch.setattr(cpu_native, "native_library", lambda: None)
    torch_codes, torch_scale = quantize_e4m3_bf16(rows)
    assert torch.equal(torch_codes, codes) and torch.equal(torch_scale, scale)


@pytest.mark.usefixtures("fp32_kernels")
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "rtn-w4a4-groups", "fp4-e2m1-a6", "int-w4a4-static"])
def test_the_prepacked_grid_pass_is_the_general_paths_numbers(name):
    """Contiguous fp32 inputs go straight to the grid pass prepacked with the weight (where the C library exists;
    integer static / per-token scales have their own path: no grid); other inputs take the general path. Both give
    the reference's activations: the same outputs bit for bit on the same values."""
    from compressdit.quant.cpu_native import native_library

    layer = _decoded_layer(name)
    x = torch.randn(3, 9, 128) * torch.linspace(0.1, 5, 128)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, not contiguous
    with torch.no_grad():
        out = layer(x)
        grid = cache_of(layer).buffers["grid"]
        assert (grid is not None) == (native_library() is not None and name != "int-w4a4-static")
        assert not strided.is_contiguous() and torch.equal(layer(strided), out)
        torch.testing.assert_close(out, layer.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(DECODED) + ["lrq-twinlog"])
def test_big_low_bit_layers_run_a_bf16_copy_within_bf16_rounding(name):
    """``cpu-decoded-bf16`` (forced: it runs on any CPU, emulated where bf16 GEMMs are not in hardware): the weight
    decoded once into bf16, the reference's activations rounded to bf16, the bf16 GEMM; within bf16's rounding of the
    reference (relative 6e-3); the twin-log layer on its rotated input."""
    from compressdit.quant.cpu_dense import DENSE_MAX_WEIGHT
    from compressdit.quant.formats import FORMATS

    out_features = DENSE_MAX_WEIGHT // 128 + 16
    if name == "lrq-twinlog":
        torch.manual_seed(0)
        linear = torch.nn.Linear(128, out_features)
        spec = LinearQuantSpec.from_dict(dict(format="twinlog", w_bits=4, a_bits=4, a_granularity="per_group",
                                              a_group_size=16, rotation="hadamard"), "spec")
        FORMATS.get(spec.format).validate_spec(spec, "spec")
        layer = FORMATS.get(spec.format).quantize(linear, spec, torch.rand(128) * 10 + 0.1)
    else:
        linear, layer = None, _decoded_layer(name, out_features=out_features)
    set_kernel(layer, "cpu-decoded-bf16")
    x = torch.randn(2, 9, 128) * torch.linspace(0.1, 5, 128)
    with torch.no_grad():
        out, reference = layer(x), layer.reference_forward(x)
        assert cache_of(layer).buffers["weight"].dtype == torch.bfloat16
        assert cache_of(layer).nbytes() >= 128 * out_features * 2
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert _error(out, reference) <= 6e-3


@pytest.mark.usefixtures("decoded_kernels")
@pytest.mark.parametrize("name", sorted(n for n in DECODED if n != "mxfp8-weight-only") + ["lrq-twinlog"])
def test_big_4_bit_layers_decode_per_call_where_the_cpu_has_no_bf16_gemm(name, monkeypatch):
    """``cpu-decoded-fp32`` (chosen where bf16 GEMMs are emulated, as on AVX2-only CPUs: the reference's per-call
    decode in PyTorch made such a model's step 1.4-3.9x the fp32 one at DiT-XL/2 size): the weight decoded for each call
    by one C pass, nothing decoded kept (the codes stay packed), the reference's numbers up to summation order (its
    activation quantizer, low-rank branch, balancing; a twin-log layer's rotation in the C pass); inputs that need
    gradients decode with the layer's own decoder."""
    from compressdit.quant import cpu_dense
    from compressdit.quant.cpu_dense import DENSE_MAX_WEIGHT
    from compressdit.quant.formats import FORMATS

    monkeypatch.setattr(cpu_dense, "_bf16_hardware", lambda: (False, False))
    out_features = DENSE_MAX_WEIGHT // 128 + 16
    if name == "lrq-twinlog":
        torch.manual_seed(0)
        spec = LinearQuantSpec.from_dict(dict(format="twinlog", w_bits=4, a_bits=4, a_granularity="per_group",
                                              a_group_size=16, rotation="hadamard", balance=0.5), "spec")
        FORMATS.get(spec.format).validate_spec(spec, "spec")
        layer = FORMATS.get(spec.format).quantize(torch.nn.Linear(128, out_features), spec, torch.rand(128) * 10 + 0.1)
    else:
        layer = _decoded_layer(name, out_features=out_features)
    assert layer.kernel_name == "cpu-decoded-fp32" == decoded_kernel_name(layer.spec, (out_features, 128))
    x = torch.randn(3, 9, 128) * torch.linspace(0.1, 5, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
        # the codes (twin-log: a nibble copy and 16 values a row) and scales, not the 4 B a weight of a decoded copy
        assert cache_of(layer).nbytes() < 2 * 128 * out_features
        assert "weight" not in cache_of(layer).buffers
    x.requires_grad_(True)
    torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8", "fp8-weight-only", "vq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_big_fp8_and_vq_layers_decode_per_call_where_the_cpu_has_no_bf16_gemm(fmt, dtype, monkeypatch):
    """FP8 and VQ layers above ``DENSE_MAX_WEIGHT`` on CPUs without bf16 GEMMs keep no fp32 copy of their weight (a
    DiT-XL/2 ``vq-w3`` / ``fp8`` process peaked at 3878 / 4085 MiB against the fp32 model's 3400 that way): each call
    decodes it (one C pass into a reused buffer) for the fp32 GEMM, the numbers of the decoded-once kernels."""
    from compressdit.quant import cpu_dense
    from compressdit.quant.cpu_dense import DENSE_MAX_WEIGHT, fp8_kernel_name
    from compressdit.quant.formats import FORMATS

    monkeypatch.setattr(cpu_dense, "_bf16_hardware", lambda: (False, False))
    fields = {"fp8": dict(format="fp8", w_bits=8, a_bits=8), "fp8-weight-only": dict(format="fp8", w_bits=8),
              "vq": dict(format="vq", w_bits=3, vector_dim=2, codebook_size=64, row_scale=True)}[fmt]
    spec = LinearQuantSpec.from_dict(fields, "spec")
    FORMATS.get(spec.format).validate_spec(spec, "spec")
    out_features = DENSE_MAX_WEIGHT // 128 + 16
    torch.manual_seed(0)
    layer = FORMATS.get(spec.format).quantize(torch.nn.Linear(128, out_features), spec, torch.rand(128) + 0.5).to(dtype)
    expected = "cpu-vq-decoded-fp32" if fmt == "vq" else fp8_kernel_name(spec.a_bits, (out_features, 128))
    assert layer.kernel_name == expected == f"cpu-{'vq' if fmt == 'vq' else 'fp8'}-decoded-fp32"
    x = (torch.randn(3, 9, 128) * torch.linspace(0.1, 5, 128)).to(dtype)
    with torch.no_grad():
        out = layer(x)
        assert cache_of(layer).nbytes() < 2 * 128 * out_features  # the codes, not 4 B a weight
        set_kernel(layer, "cpu-vq-dense" if fmt == "vq" else "cpu-fp8-dense")  # the decoded-once kernel
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    assert out.dtype == dtype


def test_big_layers_take_bf16_gemms_at_any_thread_count_where_the_cpu_has_them(monkeypatch, fp32_kernels):
    """Above DENSE_MAX_WEIGHT a bf16 GEMM pays at one and two threads alike (AMX / AVX512-BF16): FP8 W8A8 runs its
    codes in bf16 there; small layers keep the one-thread rule (bf16_gemm_pays)."""
    from compressdit.quant import cpu_dense
    from compressdit.quant.cpu_dense import DENSE_MAX_WEIGHT, fp8_kernel_name

    big, small = (DENSE_MAX_WEIGHT // 128 + 16, 128), (BF16_MIN_WEIGHT // 128, 128)
    for hardware in (False, True):
        monkeypatch.setattr(cpu_dense, "_bf16_hardware", lambda: (hardware, hardware))
        for threads in (1, 2):
            monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
            # without bf16 GEMMs a big layer decodes its codes per call (no fp32 copy), a small one keeps its copy
            assert fp8_kernel_name(8, big) == ("cpu-fp8-bf16" if hardware else "cpu-fp8-decoded-fp32")
            assert fp8_kernel_name(8, small) == ("cpu-fp8-bf16" if hardware and threads == 1 else "cpu-fp8-dense")
            assert fp8_kernel_name(None, big) == ("cpu-fp8-dense" if hardware else "cpu-fp8-decoded-fp32")


@pytest.mark.usefixtures("fp32_kernels")
def test_twin_log_layers_rotate_their_input_in_one_pass_with_the_references_numbers():
    """A twin-log layer with the randomized Hadamard (balancing too) runs its kernel on the input rotated by the C
    pass: the same output bit for bit as the kernel on the layer's own PyTorch transform, and the reference's within
    summation order."""
    from compressdit.quant.formats import FORMATS

    torch.manual_seed(0)
    spec = LinearQuantSpec.from_dict(dict(format="twinlog", w_bits=4, a_bits=4, a_granularity="per_group",
                                          a_group_size=16, rotation="hadamard", balance=0.5), "spec")
    FORMATS.get(spec.format).validate_spec(spec, "spec")
    layer = FORMATS.get(spec.format).quantize(torch.nn.Linear(128, 48), spec, torch.rand(128) * 10 + 0.1)
    x = torch.randn(3, 9, 128) * torch.linspace(0.1, 5, 128)
    with torch.no_grad():
        out = layer(x)
        cache = cache_of(layer)
        assert layer.kernel_name == "cpu-twinlog-dense" and cache.kernel.run_untransformed is not None
        assert torch.equal(out, cache.kernel.run(layer, layer.transform_input(x), cache.buffers))
        from compressdit.quant.cpu_native import hadamard_rows, native_library

        rotated = hadamard_rows(x, layer.smooth_scale, layer.rotation_signs)  # the layer's own tensors
        assert (rotated is None) == (native_library() is None)
        torch.testing.assert_close(out, layer.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(48, 128), (1024, 512)], ids=["small", "large"])
def test_a_bf16_models_twin_log_layers_rotate_in_the_c_pass(shape, monkeypatch):
    """A bf16 model's twin-log layer with the randomized Hadamard: its rows widened once and balanced, rotated and
    quantized by the C pass (never the layer's PyTorch transform, whose bf16 butterflies cost more than the GEMM), on
    whichever kernel its size picks: no further from the float layer than the reference, which rotates in bf16."""
    from compressdit.quant.cpu_native import native_library
    from compressdit.quant.formats import FORMATS

    torch.manual_seed(0)
    out_features, in_features = shape
    spec = LinearQuantSpec.from_dict(dict(format="twinlog", w_bits=4, a_bits=4, a_granularity="per_group",
                                          a_group_size=16, rotation="hadamard", balance=0.5), "spec")
    linear = torch.nn.Linear(in_features, out_features)
    layer = FORMATS.get(spec.format).quantize(linear, spec, torch.rand(in_features) * 10 + 0.1).to(torch.bfloat16)
    x = (torch.randn(3, 40, in_features) * torch.linspace(0.1, 5, in_features)).bfloat16()
    with torch.no_grad():
        reference, exact = layer.reference_forward(x), linear(x.float())
        if native_library() is not None:  # the C pass must run: the layer's own transform fails the test
            monkeypatch.setattr(layer, "transform_input", lambda _: pytest.fail("the PyTorch transform ran"))
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    assert _error(out, exact) <= _error(reference, exact) * 1.05


@pytest.mark.usefixtures("decoded_kernels")
@pytest.mark.parametrize("name", sorted(DECODED) + ["lrq-twinlog", "rtn-w4a16", "fp8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_small_layers_run_the_bf16_microkernel_where_amx_has_it(name, threads):
    """On CPUs with AMX-BF16 (``_brgemm_shape``) small low-bit layers run bf16 kernels on oneDNN's microkernel at any
    thread count: the weight packed once (no plain copy), the output within bf16's rounding of the reference; 8-bit
    integer weights keep fp32. Elsewhere (and for those) their other kernels run, with no packed copy, within the same
    bound (their own, tighter ones: the tests above)."""
    from compressdit.quant.cpu_dense import fp8_kernel_name
    from compressdit.quant.formats import FORMATS
    from compressdit.quant.fp8_layer import FP8Linear

    torch.manual_seed(0)
    if name == "lrq-twinlog":
        spec = LinearQuantSpec.from_dict(dict(format="twinlog", w_bits=4, a_bits=4, a_granularity="per_group",
                                              a_group_size=16, rotation="hadamard", balance=0.5), "spec")
        FORMATS.get(spec.format).validate_spec(spec, "spec")
        layer = FORMATS.get(spec.format).quantize(torch.nn.Linear(128, 48), spec, torch.rand(128) * 10 + 0.1)
    elif name == "rtn-w4a16":
        layer = _layers(LinearQuantSpec(w_bits=4, group_size=32))[1]
    elif name == "fp8":
        layer = FP8Linear.from_linear(torch.nn.Linear(128, 48), LinearQuantSpec(format="fp8", w_bits=8, a_bits=8))
    else:
        layer = _decoded_layer(name)
    x = torch.randn(3, 9, 128) * torch.linspace(0.1, 5, 128)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)  # the choice may depend on it (bf16_gemm_pays): made and checked under it
        expected = {"rtn-w4a16": dense_kernel_name((48, 128)), "fp8": fp8_kernel_name(8, (48, 128))}.get(
            name, decoded_kernel_name(layer.spec, (48, 128)))
        microkernel = _brgemm_shape((48, 128)) and not (layer.spec.format == "int" and layer.spec.w_bits >= 8)
        assert microkernel <= expected.endswith("bf16")  # without it: fp32, or bf16 at one thread (bf16_gemm_pays)
        with torch.no_grad():
            out, reference = layer(x), layer.reference_forward(x)
        assert cache_of(layer).name == layer.kernel_name == expected
    finally:
        torch.set_num_threads(before)
    buffers = cache_of(layer).buffers
    assert (buffers.get("packed") is not None) == microkernel
    if microkernel:
        assert buffers.get("weight") is None and buffers.get("codes") is None  # the packed weight only
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert _error(out, reference) <= 6e-3


def _svdquant_run(spec: dict, in_features: int, out_features: int, leading: tuple, dtype: torch.dtype,
                  kernel: str | None = None) -> tuple:
    """(linear, its quantized layer in ``dtype``, x, the layer's and the reference's outputs on x, the kernel cache):
    activations with channel ranges 0.1..5, balancing statistics 0.1..10; ``kernel`` forced where given."""
    from compressdit.quant.formats import FORMATS
    from compressdit.quant.kernel_registry import set_kernel

    torch.manual_seed(0)
    spec = LinearQuantSpec.from_dict(spec, "spec")
    FORMATS.get(spec.format).validate_spec(spec, "spec")
    linear = torch.nn.Linear(in_features, out_features)
    layer = FORMATS.get(spec.format).quantize(linear, spec, torch.rand(in_features) * 10 + 0.1).to(dtype)
    if kernel is not None:
        set_kernel(layer, kernel)
    x = (torch.randn(*leading, in_features) * torch.linspace(0.1, 5, in_features)).to(dtype)
    with torch.no_grad():
        return linear, layer, x, layer(x), layer.reference_forward(x), cache_of(layer)


@pytest.mark.parametrize("name", ["svdquant-w4a4", "svdquant-nvfp4", "svdquant-w4a16", "rank-3", "per-token-a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_svdquant_layers_run_their_branch_in_their_kernels_gemm(name, dtype):
    """An SVDQuant layer (balancing, a low-rank branch, dynamic activations on the grid pass or none) runs its branch in
    its kernel's GEMM (``runs_low_rank``): on AMX (``_brgemm_shape``) whole in one op, ``[W | up]`` packed, the branch's
    down product inside, within bf16's rounding of the reference (bf16 inputs: no further from the float layer than
    it); elsewhere as one fp32 GEMM of ``[q(x / s) | h]`` and ``[W | up]``, the reference's numbers up to summation
    order. The kernel's ``run`` on an already balanced input still gives W's part alone. Per-token integer activations
    (not the grid pass), and on the microkernel an odd rank, keep the layer adding its branch itself."""
    from compressdit.quant.kernel_registry import LOW_RANK, runs_low_rank

    specs = {"svdquant-w4a4": dict(w_bits=4, a_bits=4, group_size=64, balance=0.5, low_rank=16,
                                   a_granularity="per_group", a_group_size=64),
             "svdquant-nvfp4": dict(DECODED["svdquant-nvfp4"], low_rank=16),
             "svdquant-w4a16": dict(w_bits=4, group_size=64, balance=0.5, low_rank=16),
             "rank-3": dict(w_bits=4, a_bits=4, group_size=64, balance=0.5, low_rank=3, a_granularity="per_group",
                            a_group_size=64),
             "per-token-a8": dict(w_bits=4, a_bits=8, group_size=64, balance=0.5, low_rank=16)}
    linear, layer, x, out, reference, cache = _svdquant_run(specs[name], 128, 96, (3, 9), dtype)
    with torch.no_grad():
        microkernel = _brgemm_shape((96, 128))
        fused = name != "per-token-a8" and not (microkernel and name == "rank-3")
        assert runs_low_rank(cache) == fused and (cache.buffers.get(LOW_RANK) is not None) == fused
        assert out.dtype == dtype and out.shape == reference.shape
        if dtype == torch.float32:
            assert _error(out, reference) <= (6e-3 if microkernel else 1e-5)
        else:  # the reference balances and quantizes in bf16, the op in fp32 from the bf16 input: never worse
            exact = linear(x.float())
            assert _error(out, exact) <= _error(reference, exact) * 1.05
        transformed = layer.transform_input(x.float())  # balanced in fp32, as the op divides
        again = cache.kernel.run(layer, transformed, cache.buffers).to(dtype)
        assert _error(layer._add_low_rank(again, transformed.to(dtype)), out) <= 1e-2


@pytest.mark.usefixtures("decoded_kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_svdquant_layers_run_their_branch_in_torchs_bf16_gemm(dtype):
    """Above ``DENSE_MAX_WEIGHT`` weights (``cpu-decoded-bf16`` on torch's bf16 linear: chosen on CPUs with bf16
    GEMMs, forced elsewhere), an SVDQuant NVFP4 layer's branch runs in the same GEMM, ``[bf16(q) | h_hi | h_lo | h_hi]``
    times ``[W | U_hi | U_hi | U_lo]`` (where the C passes build): within bf16's rounding of the reference, as the
    layer without its branch."""
    from compressdit.quant.cpu_dense import _bf16_hardware
    from compressdit.quant.cpu_native import native_library
    from compressdit.quant.kernel_registry import runs_low_rank

    forced = None if _bf16_hardware()[1] else "cpu-decoded-bf16"
    linear, layer, x, out, reference, cache = _svdquant_run(dict(DECODED["svdquant-nvfp4"], low_rank=16), 1024, 512,
                                                            (2, 40), dtype, kernel=forced)
    assert cache.name == "cpu-decoded-bf16"
    assert runs_low_rank(cache) == (native_library() is not None)
    if runs_low_rank(cache):
        assert cache.buffers["cat"].shape == (512, 1024 + 3 * 16)
    exact = linear(x.float())
    if dtype == torch.float32:  # a bf16 reference balances and quantizes in bf16, the kernel in fp32
        assert _error(out, reference) <= 6e-3
    assert _error(out, exact) <= _error(reference, exact) * 1.05 + 2e-3
