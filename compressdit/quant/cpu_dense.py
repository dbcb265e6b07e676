"""CPU kernels that decode a quantized weight once at prepack and run a dense GEMM per call (mostly small layers).

On layers of up to ``DENSE_MAX_WEIGHT`` weights (the zoo models' 128..640-wide linears) the per-call decode
of the packed codes (``cpu-int4-weight`` above ``INT4_PACKED_MAX_ROWS`` rows) and the packed int4 GEMM cost
more than the GEMM itself, so these layers keep a decoded copy of their weight at run time and say so in
their kernel name:

- ``cpu-int-dense-fp32`` / ``cpu-int-dense-bf16`` (AVX512-BF16 at one thread, layers of at least ``BF16_MIN_WEIGHT``
  weights: :func:`bf16_gemm_pays`): the
  small layers ``cpu-int4-weight`` applies to (2-4 bits; 8-bit weights per channel, ``cpu-int8-weight``'s, always
  in fp32: their error is as small as bf16's rounding) decoded once into fp32 (4 bytes per weight of RAM at
  run time, at most ``4 * DENSE_MAX_WEIGHT`` bytes per layer) or bf16 (2 bytes; the checkpoint stays packed).
  Weight-only layers without a low-rank branch fold their balancing / rotation into that weight
  (``effective_weight``) and run on the raw input: the fp32 kernel is then ``F.linear`` exactly as the float
  layer (the reference's numbers up to summation order). The bf16 kernel rounds activations to bf16 and the
  product back (one C pass each, :mod:`.cpu_native`), the bias added in fp32; dynamic
  quantized activations (W4A8 with groups) enter its GEMM as their integer codes (exact in bf16), the product
  scaled per row after. The fp32 kernel fake-quantizes activations as the reference does.
- ``cpu-fp8-dense``: FP8 (E4M3) weights decoded once into fp32 (4 bytes per weight at run time), the
  reference's per-token E4M3 activations (one fused C pass, bit for bit), an fp32 GEMM: the reference's numbers
  without its per-call decode. ``cpu-fp8-decoded-fp32``: the same on layers above ``DENSE_MAX_WEIGHT`` on CPUs
  without bf16 GEMMs with the weight decoded for each call (:func:`per_call`; DiT-XL/2 ``fp8`` peak RSS 4085 -> 1614
  MiB, fp32 3400).
- ``cpu-decoded-dense`` (lowest priority: where no faster kernel applies): the small layers of the low-bit formats
  whose codes no CPU GEMM reads (NVFP4 / MXFP4 / MXFP8 blocks, 4-bit minifloats, integer weights with per-group or
  sub-8-bit activations: ``rtn-w4a4``, ``nvfp4``, ``fp4-w4a8``, ...): the residual weight decoded once into fp32,
  the activations quantized by the reference's own quantizer, an fp32 GEMM (the layer adds its low-rank branch).
- ``cpu-decoded-bf16``: the same formats (and twin-log) on layers *above* ``DENSE_MAX_WEIGHT``, on CPUs with bf16
  GEMMs: the weight decoded once into bf16 (2 bytes per weight beside the packed one), the reference's activations
  rounded to bf16, a bf16 GEMM (AMX: 6-8x an fp32 GEMM at DiT-XL/2 sizes), instead of the reference's per-call
  decode; FP8 W8A8 layers of that size take ``cpu-fp8-bf16`` at any thread count (:func:`bf16_layer`).
- ``cpu-decoded-fp32``: those formats' layers above ``DENSE_MAX_WEIGHT`` with 4-bit codes (int, twin-log, NVFP4 /
  MXFP4, 4-bit minifloats) on CPUs without bf16 GEMMs (AVX2-only CPUs: there a bf16 GEMM is emulated, 4-5x an fp32
  one): no decoded copy kept; each call decodes the weight in one C pass from the packed codes with the format's own
  table (``fp32_decoding``: value of each code, per-group scale and zero point; bit for bit its decoder) into a
  reused per-thread buffer (4-bit codes on AVX2 32 at a time by table lookups in registers: 0.3-0.45 ns a weight on a
  Zen 3, 0.9 a lookup at a time; ~1.5-2.5 ms for a DiT-XL/2 MLP layer against its ~50 ms GEMM at 256 rows), then
  the fp32 GEMM on the reference's quantized activations. The reference decoded in PyTorch per call: DiT-XL/2 steps
  with torch held to AVX2 took 1.4x (``rtn-w4a4``) to 3.9x (LRQ) the fp32 step, now 1.04-1.09x.
- Twin-log layers with the randomized Hadamard rotation get their balancing, rotation and activation grid in one C
  pass (``run_untransformed``: :func:`~compressdit.quant.cpu_native.hadamard_rows`), those with DuQuant's in another
  that applies the rotation as its few greedy steps rather than the reference's dense blocks (the same rotation up to
  fp32 rounding; a zoo layer's 256 x 128 input 405 -> 224 us at one thread, a 512 -> 128 one 2.6 -> 0.7 ms); both
  prepared once per prepack (:func:`rotated_rows`).

On CPUs with AMX-BF16 (:func:`_brgemm_shape`) the bf16 kernels also take every small layer, at any thread count:
``cpu-int-dense-bf16`` (2-4 bit weights), ``cpu-fp8-bf16`` and ``cpu-decoded-bf16`` (the low-bit formats and
twin-log, except 8-bit integer weights) keep their weight packed once for oneDNN's BRGeMM microkernel and run one C++
op a call (:func:`~compressdit.quant.cpu_native.bf16_linear`: activations rounded to bf16 inside it, fp32 sums, the
scales and bias in its epilogue): torch's bf16 linear costs ~20 us a call on these sizes, the microkernel ~3-15.
That op also runs the dynamic grid quantization (:func:`_fused_grid`) and twin-log's balancing + Hadamard on each
thread's rows before rounding them, bit for bit as the separate passes (no fp32 copy of the quantized input; these
layers share no quantized rows with their neighbours). SVDQuant layers (a low-rank branch beside the quantized weight)
run whole in it (:func:`_with_branch`): the balancing division, the branch's down product on the balanced rows, their
quantization, and one GEMM of both with ``[W | up]`` (two torch linears and a pass over the output otherwise: 1.25-1.59x
the float model's step at two threads, now 0.95-1.09x; the up product a bf16x3 one). Without the microkernel (other
CPUs, layers above ``DENSE_MAX_WEIGHT``) the branch still joins the GEMM (:func:`_branch_layout`): one C pass balances
and quantizes the rows into a buffer whose last columns get the down product, times ``[W | up]`` in torch's fp32 GEMM
(or bf16, the up product bf16x3): the separate up GEMM (K = r, torch's slowest shape: ~50 us of a zoo layer's ~110 at
two threads) and torch's division are gone (zoo steps at two threads on the Xeon with the microkernels off and oneDNN
held below AMX: svdquant-w4a4 1.41-1.69x -> 1.23-1.37x float, svdquant-nvfp4 1.43-1.68x -> 1.30-1.48x).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from compressdit.quant.kernel_registry import KERNELS, LOW_RANK, Kernel, prepacked_bias
from compressdit.quant.activations import activation_grid, quantize_input
from compressdit.quant.cpu_native import (bf16_brgemm, bf16_linear, bf16_pack, bf16_scale, bf16_to_float,
                                          branch_rows, decode_f32, duquant_rows_pass, fake_quantize_e4m3_rows,
                                          fake_quantize_grid, fake_quantize_rows_int8, float_to_bf16, grid_rows_bf16_,
                                          hadamard_rows, hadamard_rows_pass, hadamard_takes, native_library,
                                          quantize_e4m3_bf16, shared_rows)
from compressdit.quant.fp_layer import FP_WEIGHT_FORMATS
from compressdit.quant.mx_layer import BLOCK_CODECS
from compressdit.quant.primitives import int_range

DENSE_MAX_WEIGHT = 1 << 18  # in_features * out_features: 512 KiB of bf16 per layer at most


def fake_quantize_input(x: torch.Tensor, bits: int | None, granularity: str,
                        static_scale: torch.Tensor | None) -> torch.Tensor:
    """:func:`~compressdit.quant.primitives.fake_quantize_activation`'s values without its gradient path.

    Fewer passes (in place, no straight-through term, whose forward value is the rounded code exactly);
    for inference kernels only.
    """
    if bits is None:
        return x
    qmin, qmax = int_range(bits)
    if static_scale is not None:
        scale = static_scale.to(x.dtype)
        return (x / scale).clamp_(qmin, qmax).round_().mul_(scale)
    magnitude = x.abs()
    scale = magnitude.amax(-1, keepdim=True) if granularity == "per_token" else magnitude.amax()
    scale = scale.clamp_min_(1e-8).div_(qmax)
    return (x / scale).round_().mul_(scale)  # |x / scale| <= qmax: no clamp needed


def fast_int_path(spec) -> bool:
    """Integer activations per token / per tensor / static: :func:`fake_quantize_input`'s few passes apply."""
    return spec.a_format == "int" and spec.a_granularity in ("per_token", "per_tensor", "static")


def quantize_layer_input(layer, x: torch.Tensor) -> torch.Tensor:
    """``x`` fake-quantized as ``layer.spec`` says: the fast integer path where it applies, else one fused C pass
    (:func:`~compressdit.quant.cpu_native.fake_quantize_grid`: per-group integers, minifloats, NVFP4 / MX blocks, on
    contiguous fp32 rows), else the activation format's own quantizer: the same numbers on every path."""
    spec = layer.spec
    if spec.a_bits is None:
        return x
    if fast_int_path(spec):  # a static scale only on integer layers that calibrated one
        static = getattr(layer, "input_scale", None) if spec.a_granularity == "static" else None
        return fake_quantize_input(x, spec.a_bits, spec.a_granularity, static)
    grid = activation_grid(spec)
    if grid is not None:
        group = spec.a_group_size if spec.a_granularity == "per_group" else x.shape[-1]
        out = fake_quantize_grid(x, group, grid.rule, grid.top, grid.mantissa, grid.min_exp)
        if out is not None:
            return out
    return quantize_input(x, spec)  # integer static scales took the fast path: only dynamic ones come here


def _small(shape: tuple[int, int]) -> bool:
    return shape[0] * shape[1] <= DENSE_MAX_WEIGHT


@functools.lru_cache(maxsize=None)
def _bf16_hardware() -> tuple[bool, bool]:
    """(AMX-BF16, AVX512-BF16) on this CPU, where torch's own kernels run AVX-512 (``ATEN_CPU_CAPABILITY=avx2`` on
    such a CPU keeps the fp32 paths, as on an AVX2-only CPU: ``bench/e2e_speed.py --emulate avx2``)."""
    capability = torch._C._cpu._get_cpu_capability()
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return (avx512 and bool(capability.get("amx_bf16", False)),
            avx512 and bool(capability.get("avx512_bf16", False)))


def bf16_hardware() -> bool:
    """Whether this CPU runs bf16 GEMMs in hardware (AVX512-BF16; AMX parts have it too) with torch's AVX-512 kernels:
    elsewhere a bf16 GEMM is emulated, slower than fp32."""
    return _bf16_hardware()[1]


def amx_bf16() -> bool:
    """Whether this CPU has AMX-BF16 with torch's AVX-512 kernels (Intel Xeon 4th generation on)."""
    return _bf16_hardware()[0]


#: the smallest weight (in_features * out_features) a bf16 GEMM pays on, where it pays at all. Intel Xeon with
#: AMX-BF16 (bench/results/e2e_speed_cpu_xeon.md), one thread, 256 tokens, each layer timed alone: 128 -> 128
#: (2^14 weights) 86 us in bf16 with its two casts against 64 us in fp32; 128 -> 512 and 512 -> 128 (2^16) 131 and
#: 145 us against 229 and 244 us.
BF16_MIN_WEIGHT = 1 << 16


def bf16_gemm_pays() -> bool:
    """Whether bf16 GEMMs (on layers of at least ``BF16_MIN_WEIGHT`` weights) pay on this machine now: CPUs with
    AVX512-BF16 (Zen 4; Intel's AMX-BF16 parts have it too) at one intra-op thread. Measured, time per guided step
    against float: on the Zen 4 EPYC of ``bench/results/e2e_speed_cpu.md`` (no AMX) the zoo models' weight-only
    steps took 0.88-0.97x float on one thread in bf16 but 1.05-1.27x on two, against 1.02-1.05x for the fp32
    weight on both; on the Intel Xeon with AMX of ``bench/results/e2e_speed_cpu_xeon.md`` at two threads
    dit-fmnist's ``w4a16`` 1.29x in bf16 against 1.07x in fp32 (``fp8``: 1.37x against 1.20x), flux-fmnist's 1.10x
    against 1.06x: AMX does not change the two-thread verdict. Without bf16 hardware the bf16 GEMM is emulated:
    fp32. The thread count is part of every layer's prepack key, so changing it re-selects."""
    return _bf16_hardware()[1] and torch.get_num_threads() == 1


def _brgemm_shape(shape: tuple[int, int]) -> bool:
    """Whether a layer of ``shape`` (out, in) runs :func:`~compressdit.quant.cpu_native.bf16_linear` (oneDNN's
    BRGeMM microkernel on AMX, the weight packed once): the small layers (up to ``DENSE_MAX_WEIGHT`` weights, an even
    ``in``) where :func:`~compressdit.quant.cpu_native.bf16_brgemm`. Intel Xeon with AMX, 2 threads, each layer alone
    with its fp32 -> bf16 rounding and bias: 256 x 128 -> 128 12.8 us against 37.6 in fp32 (and 40.6 through torch's
    bf16 linear and two casts: oneDNN's matmul primitive costs ~20 us a call), 128 -> 512 30.9 against 104.8, 512 ->
    128 30.6 against 102.8, 16 x 128 -> 768 6.9 against 23.5; bigger layers keep torch's bf16 linear (its blocking wins
    from DiT-XL/2's sizes: 4096 x 4608 -> 1152 21.8 ms against the microkernel's 27.7)."""
    return shape[0] * shape[1] <= DENSE_MAX_WEIGHT and shape[1] % 2 == 0 and bf16_brgemm()


def bf16_layer(shape: tuple[int, int]) -> bool:
    """Whether a layer of ``shape`` (out, in) runs its GEMM in bf16 on this machine now: every small layer where
    :func:`_brgemm_shape`, else from ``BF16_MIN_WEIGHT`` weights where :func:`bf16_gemm_pays`, and above
    ``DENSE_MAX_WEIGHT`` on any CPU with bf16 GEMMs at any thread count (a DiT-XL/2 MLP layer, 512 tokens, Intel Xeon
    with AMX: 3.8 / 2.2 ms in bf16 against 29.7 / 12.6 ms in fp32 at 1 / 2 threads)."""
    size = shape[0] * shape[1]
    return ((size >= BF16_MIN_WEIGHT and bf16_gemm_pays()) or (size > DENSE_MAX_WEIGHT and _bf16_hardware()[1])
            or _brgemm_shape(shape))


def bf16_weights(weight: torch.Tensor, layer=None) -> dict:
    """A bf16 kernel's copy of its decoded ``weight`` ``[out, in]``: packed for the microkernel where
    :func:`_brgemm_shape` (``"packed"``; ``"weight"`` None), else plain bf16 for torch's linear. With ``layer`` and its
    low-rank branch in the same GEMM (:func:`_branch_prepack`, :func:`_branch_layout`), the branch's tensors too
    (``LOW_RANK``)."""
    if not _brgemm_shape(tuple(weight.shape)):
        branch = None if layer is None else _branch_layout(layer, weight, torch.bfloat16)
        return branch or {"weight": weight.to(torch.bfloat16).contiguous(), "packed": None, LOW_RANK: None}
    branch = None if layer is None else _branch_prepack(layer, weight)
    return branch or {"weight": None, "packed": bf16_pack(weight), LOW_RANK: None}


def fp32_weights(weight: torch.Tensor, layer=None) -> dict:
    """An fp32 kernel's decoded ``weight`` ``[out, in]`` (``"weight"``, contiguous), with ``layer``'s low-rank branch
    in the same GEMM where :func:`_branch_layout` lays it out."""
    branch = None if layer is None else _branch_layout(layer, weight, torch.float32)
    return branch or {"weight": weight.contiguous(), "packed": None, LOW_RANK: None}


def low_bit_bf16(spec, shape: tuple[int, int]) -> bool:
    """Whether a low-bit layer (:func:`_decoded_format`, twin-log) runs in bf16: above ``DENSE_MAX_WEIGHT`` on CPUs
    with bf16 GEMMs, and small ones on the microkernel (:func:`_brgemm_shape`) unless they keep 8-bit integer weights
    (whose own error is as small as bf16's rounding of the activations, as ``cpu-int8-weight``'s)."""
    if not _small(shape):
        return _bf16_hardware()[1]
    return _brgemm_shape(shape) and not (spec.format == "int" and spec.w_bits >= 8)


def _dense_applies(bf16: bool):
    """The small layers of ``cpu-int4-weight``'s specs, in bf16 or fp32 as :func:`bf16_gemm_pays` says, and of
    ``cpu-int8-weight``'s (8-bit weights per channel) in fp32 at every thread count: bf16's rounding of the
    activations would be as large as the 8-bit weights' own error (other specs keep their kernel or the reference)."""
    def applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
        if not _small(shape):
            return False
        if KERNELS.get("cpu-int4-weight").applies(spec, device, shape):
            return bf16_layer(shape) == bf16
        return not bf16 and KERNELS.get("cpu-int8-weight").applies(spec, device, shape)

    return applies


def dense_kernel_name(shape: tuple[int, int]) -> str:
    """The kernel a small layer of ``shape`` (out, in) and of ``cpu-int4-weight``'s specs runs on this machine now
    (8-bit ones: ``cpu-int-dense-fp32``)."""
    return "cpu-int-dense-bf16" if bf16_layer(shape) else "cpu-int-dense-fp32"


def decoded_kernel_name(spec, shape: tuple[int, int]) -> str:
    """The kernel a layer of a low-bit format no CPU GEMM reads (NVFP4 / MX / minifloats / integers with per-group or
    sub-8-bit activations, twin-log) and of ``shape`` (out, in) runs on this machine now."""
    if low_bit_bf16(spec, shape):
        return "cpu-decoded-bf16"
    if not _small(shape):
        return "cpu-decoded-fp32" if _per_call_applies(spec, torch.device("cpu"), shape) else "reference"
    return "cpu-twinlog-dense" if spec.format == "twinlog" else "cpu-decoded-dense"


def fp8_kernel_name(a_bits: int | None, shape: tuple[int, int]) -> str:
    """The kernel an FP8 layer of ``shape`` (out, in) runs on this machine now: ``cpu-fp8-bf16`` for W8A8 where bf16
    GEMMs pay, else ``cpu-fp8-dense``, or ``cpu-fp8-decoded-fp32`` for big layers on CPUs without bf16 GEMMs."""
    if a_bits == 8 and bf16_layer(shape):
        return "cpu-fp8-bf16"
    return "cpu-fp8-decoded-fp32" if per_call_shape(shape) else "cpu-fp8-dense"


def per_call_shape(shape: tuple[int, int]) -> bool:
    """Layers above ``DENSE_MAX_WEIGHT`` on CPUs without bf16 GEMMs: there a kernel decodes the weight for each call
    (:func:`per_call`) rather than keep a decoded fp32 copy (4 bytes a weight: a DiT-XL/2 ``vq-w3`` or ``fp8`` process
    peaked above the fp32 model's) or multiply in an emulated bf16 GEMM."""
    return not _small(shape) and not bf16_hardware()


def _per_call_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    """:func:`per_call_shape` layers of the formats whose 4-bit codes decode with one table (``fp32_decoding``:
    int, twin-log, NVFP4 / MX blocks, 4-bit minifloats), where ``cpu-decoded-bf16`` cannot run."""
    fmt = spec.format
    four_bit = ((fmt in ("int", "twinlog") and spec.w_bits <= 4) or fmt in FP_WEIGHT_FORMATS
                or (fmt in BLOCK_CODECS and BLOCK_CODECS.get(fmt).packed))
    return device.type == "cpu" and four_bit and shape[1] % 2 == 0 and per_call_shape(shape)


def per_call_prepack(layer) -> dict:
    """A :func:`per_call` kernel's buffers: the layer's ``fp32_decoding()`` and its fp32 bias."""
    return {"decoding": layer.fp32_decoding(), "bias": prepacked_bias(layer)}


def _per_call_grid_prepack(layer) -> dict:
    """:func:`per_call_prepack` with the activation grid pass, sharing kind and balancing divisor of the layer, and
    its rotation's C pass (:func:`rotated_rows`)."""
    grid = input_grid(layer)
    return {**per_call_prepack(layer), "grid": grid, "kind": _input_kind(layer.spec), "smooth": smooth_divisor(layer),
            "rotated_rows": rotated_rows(layer, grid)}


def per_call(run, decode):
    """A kernel ``run`` on the weight decoded for this call (``"weight"``; the prepacked ``"decoding"``: the layer's
    ``fp32_decoding()``): by one C pass into the thread's reused buffer (:func:`~compressdit.quant.cpu_native
    .decode_f32`), or by ``decode(layer)`` (the layer's own fp32 decoder) where that pass does not run (autograd could
    keep the buffer, no library, compiling)."""
    def run_decoded(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
        weight = None if torch.is_grad_enabled() and x.requires_grad else decode_f32(b["decoding"])
        return run(layer, x, {**b, "weight": decode(layer) if weight is None else weight})

    return run_decoded


def _dequantized_fp32(layer) -> torch.Tensor:
    return layer.dequantized_weight(torch.float32)


def effective_fp32(layer) -> torch.Tensor:
    return layer.effective_weight(torch.float32)


def _folds(layer) -> bool:
    """Weight-only layers without a low-rank branch: the input transform (balancing, rotation) folds into the
    decoded weight (``effective_weight``), so the kernel runs on the untransformed input."""
    return layer.spec.a_bits is None and layer.spec.low_rank is None


def _dense_prepack(dtype: torch.dtype):
    def prepack(layer) -> dict:
        weight = layer.effective_weight(torch.float32) if _folds(layer) else layer.dequantized_weight(torch.float32)
        spec = layer.spec
        weights = bf16_weights(weight, layer) if dtype is torch.bfloat16 else fp32_weights(weight, layer)
        return {**weights, "smooth": smooth_divisor(layer), "folded": _folds(layer),
                "int8_rows": spec.a_bits == 8 and spec.a_format == "int" and spec.a_granularity in ("per_token",
                                                                                                  "per_tensor"),
                "grid": input_grid(layer),
                "bias": prepacked_bias(layer)}

    return prepack


def _takes_fp32(x: torch.Tensor) -> bool:
    return x.dtype is torch.float32 and x.is_contiguous()


def _contiguous_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if _takes_fp32(x) else x.float().contiguous()


def _branch_fuses(layer) -> bool:
    """Whether ``layer``'s SVDQuant branch can run in its kernel's GEMM: it has one, no rotation (the branch reads the
    balanced, unrotated input) and its activations are unquantized or dynamic on the grid pass (:func:`input_grid`),
    with the C passes built."""
    return (getattr(layer, "low_rank_up", None) is not None and getattr(layer, "rotation_signs", None) is None
            and native_library() is not None and (layer.spec.a_bits is None or input_grid(layer) is not None))


def _branch_prepack(layer, weight: torch.Tensor) -> dict | None:
    """SVDQuant's branch of ``layer`` for the microkernel's op beside its decoded ``weight`` (:func:`bf16_weights`)
    where :func:`_branch_fuses` and the branch's rank is even: ``LOW_RANK`` the packed down factor, ``"packed"``
    ``[weight | U_hi | U_hi | U_lo]`` (the up factor in two bf16 terms for the op's bf16x3 product); else ``None``."""
    if not _branch_fuses(layer) or layer.low_rank_up.shape[1] % 2:
        return None
    up_hi, up_lo = _bf16_terms(layer.low_rank_up)
    return {"weight": None, "packed": bf16_pack(torch.cat([weight, up_hi, up_hi, up_lo], dim=1)),
            LOW_RANK: bf16_pack(layer.low_rank_down.float())}


def _branch_layout(layer, weight: torch.Tensor, dtype: torch.dtype) -> dict | None:
    """SVDQuant's branch of ``layer`` in torch's GEMM (no microkernel) where :func:`_branch_fuses`: ``"cat"`` the
    weight ``[W | U]`` (fp32) or ``[W | U_hi | U_hi | U_lo]`` (bf16: the bf16x3 up product) that
    :func:`~compressdit.quant.cpu_native.branch_rows`' rows multiply, ``"weight"`` its ``W`` columns (a view: what
    ``run`` multiplies on transformed inputs), ``LOW_RANK`` the down factor transposed (fp32 ``[in, r]``),
    ``"inv"`` the balancing divisor's reciprocals (the C division's operand); else ``None``. The separate branch costs
    two more GEMMs whose K = r is torch's worst case (the up product summed into a 256 x 512 output: ~50 us at two
    threads on the Xeon of bench/results/e2e_speed_cpu_xeon.md, against ~10 us for r more columns of one GEMM)."""
    if not _branch_fuses(layer):
        return None
    up = layer.low_rank_up.detach().float()
    if dtype is torch.float32:
        terms = [up]
    else:
        up_hi, up_lo = _bf16_terms(up)
        terms = [up_hi, up_hi, up_lo]
    cat = torch.cat([weight.float(), *terms], dim=1).to(dtype).contiguous()
    smooth = smooth_divisor(layer)
    return {"weight": cat[:, :layer.in_features], "cat": cat, "packed": None,
            LOW_RANK: layer.low_rank_down.detach().float().t().contiguous(),
            "inv": None if smooth is None else torch.ones_like(smooth).div_(smooth)}


def smooth_divisor(layer) -> torch.Tensor | None:
    """The layer's balancing divisor as the op reads it (contiguous fp32), or ``None`` without balancing."""
    smooth = getattr(layer, "smooth_scale", None)
    return None if smooth is None else smooth.detach().float().contiguous()


def _bf16_terms(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` as two bf16 terms ``(hi, lo)``, ``hi = bf16(t)``, ``lo = bf16(t - hi)`` (in fp32): ~16 significant
    bits, an operand of the op's bf16x3 product."""
    t = t.detach().float()
    hi = t.to(torch.bfloat16).float()
    return hi, (t - hi).to(torch.bfloat16).float()


def _branch_rows_torch(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    """:func:`~compressdit.quant.cpu_native.branch_rows`' rows from PyTorch ops (under ``torch.compile``): the
    reference's balancing, quantizer and down product, in the layout of ``b["cat"]``."""
    balanced = layer.transform_input(x)
    hidden = balanced @ b[LOW_RANK]
    quantized = quantize_layer_input(layer, balanced)
    if b["cat"].dtype is torch.float32:
        return torch.cat([quantized, hidden], dim=1)
    hi, lo = _bf16_terms(hidden)
    return torch.cat([quantized, hi, lo, hi], dim=1).to(torch.bfloat16)


def _with_branch(run_untransformed):
    """``run_untransformed`` of a kernel, for a layer whose branch it laid out beside its weight (``LOW_RANK``) the
    whole layer in one GEMM: on the microkernel one op (balancing, the quantization of the balanced rows, the branch's
    down product, one GEMM of both with ``[W | up]`` and the bias), else :func:`~compressdit.quant.cpu_native
    .branch_rows`' rows (one C pass and the down product) times ``b["cat"]`` in torch's fp32 or bf16 GEMM (rows of
    another dtype or layout made contiguous fp32 first)."""
    def whole(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
        if b[LOW_RANK] is None:
            return run_untransformed(layer, x, b)
        x2 = _contiguous_fp32(x.reshape(-1, x.shape[-1]))
        if b["packed"] is not None:
            out = bf16_linear(x2, b["packed"], layer.out_features, b["bias"],
                              transform=(b["smooth"], None, *(b["grid"] or (0, 0, 0.0, 0, 0))), down=b[LOW_RANK])
        else:
            fp32 = b["cat"].dtype is torch.float32
            rows = branch_rows(x2, b["smooth"], b["inv"], b[LOW_RANK], b["grid"], split=not fp32)
            rows = _branch_rows_torch(layer, x2, b) if rows is None else rows
            out = F.linear(rows, b["cat"], b["bias"]) if fp32 else bf16_to_float(F.linear(rows, b["cat"]), b["bias"])
        return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)

    return whole


def _dense_kernel(linear):
    """``run`` and ``run_untransformed`` of a dense kernel from ``linear(layer, x, buffers)`` on the GEMM's input
    space: a folded weight takes the raw input; on an already transformed input (``run``, which
    ``QuantLinear.forward`` does not call for such layers) it cannot apply, and the reference runs."""
    def run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
        return layer.reference_linear(x) if b["folded"] else linear(layer, x, b)

    def run_untransformed(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
        return linear(layer, x if b["folded"] else layer.transform_input(x), b)

    return {"run": run, "run_untransformed": _with_branch(run_untransformed)}


def _dense_bf16_linear(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    spec = layer.spec
    x2 = x.reshape(-1, x.shape[-1])
    if spec.a_bits is not None and layer.input_scale is None and fast_int_path(spec):
        # dynamic integer codes (exact in bf16) times W, then each row by its scale: fewer passes than x * s
        magnitude = x2.abs()
        scale = magnitude.amax(-1, keepdim=True) if spec.a_granularity == "per_token" else magnitude.amax()
        scale = scale.clamp_min_(1e-8).div_(int_range(spec.a_bits)[1])
        codes = (x2 / scale).round_()
        if b["packed"] is not None:  # the codes (exact in bf16) on the microkernel, each row's scale in its epilogue
            codes = codes.contiguous() if codes.dtype is torch.bfloat16 else _contiguous_fp32(codes)
            rows = scale.float().expand(x2.shape[0], 1).reshape(-1).contiguous()
            out = bf16_linear(codes, b["packed"], layer.out_features, b["bias"], rows)
        else:
            out = F.linear(codes.to(torch.bfloat16), b["weight"]).float()
            out = out.mul_(scale) if b["bias"] is None else torch.addcmul(b["bias"], out, scale)
    else:  # the casts around the bf16 GEMM in one C pass each
        out = bf16_rows_gemm(layer, _quantized_rows(layer, x2, b), b)
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _quantized_rows(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    """:func:`quantize_layer_input` of ``x``: by the prepacked grid pass where ``b`` has one and ``x`` is contiguous
    fp32, or bf16 (widened exactly first: the quantization then runs in fp32, where the reference's runs in bf16
    arithmetic, ~15 passes over the activations of a DiT-XL/2 layer; the rounded values differ from it by bf16's
    rounding of the scales, no further from the float layer)."""
    if b["grid"] is not None and x.dtype is torch.bfloat16 and not torch.compiler.is_compiling():
        x = x.float()
    rows = None if b["grid"] is None or not _takes_fp32(x) else fake_quantize_grid(x, *b["grid"])
    return quantize_layer_input(layer, x) if rows is None else rows


def _dense_fp32_linear(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    spec = layer.spec
    if spec.a_bits is None and x.dtype is torch.float32:  # exactly nn.Linear's call
        return F.linear(x, b["weight"], b["bias"])
    x2 = _contiguous_fp32(x.reshape(-1, x.shape[-1]))
    if b["int8_rows"] and layer.input_scale is None:  # dynamic int8 activations: one fused C pass
        x2 = fake_quantize_rows_int8(x2, spec.a_granularity == "per_token")
    else:
        x2 = _quantized_rows(layer, x2, b)
    return F.linear(x2, b["weight"], b["bias"]).to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def fp32_linear_direct(layer, b: dict):
    """The direct run (:attr:`~compressdit.quant.kernel_registry.Kernel.direct`) of a kernel whose whole layer on an
    fp32 input is ``F.linear`` with its prepacked fp32 ``"weight"`` and ``"bias"`` (weight-only: balancing and
    rotation folded into the weight): ``nn.Linear``'s own call."""
    weight, bias = b["weight"], b["bias"]

    def run(layer, x: torch.Tensor) -> torch.Tensor | None:
        return F.linear(x, weight, bias) if x.dtype is torch.float32 else None

    return run


def _dense_fp32_direct(layer, b: dict):
    """``cpu-int-dense-fp32``'s direct run for weight-only layers (``"folded"``: no activation quantization, no
    low-rank branch; :func:`fp32_linear_direct`), else ``None``."""
    return fp32_linear_direct(layer, b) if b["folded"] else None


def _fp8_dense_direct(layer, b: dict):
    """``cpu-fp8-dense``'s direct run on a contiguous fp32 input: :func:`_e4m3_rows` (per-token E4M3 rows, kept for
    the other layers reading it), the fp32 GEMM."""
    weight, bias = b["weight"], b["bias"]

    def run(layer, x: torch.Tensor) -> torch.Tensor | None:
        if x.dtype is not torch.float32 or not x.is_contiguous():
            return None
        return F.linear(_e4m3_rows(layer, x), weight, bias)

    return run


def _decoded_fp32_prepack(decode):
    """``prepack`` keeping ``decode(layer)`` (an fp32 weight in the space the kernel's input arrives in) and an fp32
    bias."""
    def prepack(layer) -> dict:
        return {"weight": decode(layer).contiguous(),
                "bias": prepacked_bias(layer)}

    return prepack


def _fp32_gemm(quantize_rows, any_rank: bool = False):
    """``run``: the input's rows as contiguous fp32, ``quantize_rows(layer, rows)`` (the reference's activation
    quantizer), the prepacked weight's fp32 GEMM, back to the input's dtype and shape. ``any_rank``: the quantizer
    takes a contiguous fp32 input of any rank (rows along the last dimension), which then skips the reshapes and the
    cast (3 of the few us of Python a zoo layer spends around its GEMM)."""
    def run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
        if any_rank and x.dtype is torch.float32 and x.is_contiguous():
            return F.linear(quantize_rows(layer, x), b["weight"], b["bias"])
        x2 = quantize_rows(layer, _contiguous_fp32(x.reshape(-1, x.shape[-1])))
        return F.linear(x2, b["weight"], b["bias"]).to(x.dtype).reshape(*x.shape[:-1], layer.out_features)

    return run


def input_grid(layer) -> tuple | None:
    """``(group, rule, top, mantissa, min_exp)``: the arguments of the fused grid pass that quantizes ``layer``'s
    input as its spec says (dynamic scales per group or per token, not the fast integer path), or ``None`` (also
    without the C library). Prepacked with the weight, not rebuilt from the spec per call
    (:func:`quantize_layer_input`'s Python, ~3 us a call in a zoo step)."""
    spec = layer.spec
    if spec.a_bits is None or fast_int_path(spec) or native_library() is None:
        return None
    grid = activation_grid(spec)
    if grid is None:
        return None
    group = spec.a_group_size if spec.a_granularity == "per_group" else layer.in_features
    return group, grid.rule, grid.top, grid.mantissa, grid.min_exp


def rotated_rows(layer, grid: tuple | None):
    """For a twin-log layer with the randomized Hadamard or DuQuant's rotation and a grid pass (:func:`input_grid`):
    its balancing, rotation and activation quantization in one C pass, prepared once (``run(x)``: the quantized rows in
    this thread's reused buffer, for a GEMM to read at once, or ``None`` for inputs it does not take); else ``None``.
    The Hadamard's :func:`~compressdit.quant.cpu_native.hadamard_rows_pass` gives the reference's bits; DuQuant's
    :func:`~compressdit.quant.cpu_native.duquant_rows_pass` applies the rotation as its few greedy steps, not the
    reference's dense blocks: the same ``T`` up to fp32 rounding, so the rows may differ from the reference's where a
    value sits on a rounding boundary of the grid (a zoo layer's 256 x 128 input took a dense 128 x 128 GEMM per call
    for its rotation, as long as the layer's own GEMM; a DiT-XL/2-width one 4.9 ms at one thread for 256 rows)."""
    if grid is None or layer.spec.format != "twinlog":
        return None
    if layer.spec.rotation == "hadamard":
        return hadamard_rows_pass(smooth_divisor(layer), layer.rotation_signs, grid)
    if layer.spec.rotation == "duquant":
        return duquant_rows_pass(smooth_divisor(layer), layer.rotation_steps(), grid)
    return None


def _grid_prepack(decode):
    """The fp32 weight ``decode(layer)`` (with the layer's low-rank branch beside it: :func:`fp32_weights`), the fp32
    bias, the layer's grid pass (:func:`input_grid`), sharing kind and balancing divisor, its rotation's C pass
    (:func:`rotated_rows`)."""
    def prepack(layer) -> dict:
        grid = input_grid(layer)
        return {**fp32_weights(decode(layer), layer), "bias": prepacked_bias(layer), "grid": grid,
                "kind": _input_kind(layer.spec), "smooth": smooth_divisor(layer),
                "rotated_rows": rotated_rows(layer, grid)}

    return prepack


def _grid_gemm(quantize_rows, shared: bool):
    """:func:`_fp32_gemm` (``any_rank`` where ``shared``) whose contiguous fp32 inputs go straight to the prepacked
    grid pass (:func:`_quantized_rows`; kept for the other layers reading the input where ``shared``), the numbers of
    ``quantize_rows``, which runs on other inputs and where the layer has no grid."""
    general = _fp32_gemm(quantize_rows, any_rank=shared)

    def run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
        if b["grid"] is None or not _takes_fp32(x):
            return general(layer, x, b)
        if shared:  # a grid means dynamic scales: the spec's activation fields say it all (b["kind"])
            rows = shared_rows(x, b["kind"], lambda: _quantized_rows(layer, x, b))
        else:
            rows = _quantized_rows(layer, x, b)
        return F.linear(rows, b["weight"], b["bias"])

    return run


def _fp8_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return device.type == "cpu" and spec.format == "fp8"


def _fp8_dense_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return _fp8_applies(spec, device, shape) and not per_call_shape(shape)


def _fp8_per_call_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return _fp8_applies(spec, device, shape) and per_call_shape(shape)


def _e4m3_rows(layer, x: torch.Tensor) -> torch.Tensor:
    """quantize_rows_reference's scale, clamp and E4M3 rounding per row of ``x`` (any rank), one fused pass (A8);
    unchanged otherwise."""
    if layer.spec.a_bits != 8:
        return x
    return shared_rows(x, ("e4m3",), lambda: fake_quantize_e4m3_rows(x))


def _fp8_bf16_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return _fp8_applies(spec, device, shape) and spec.a_bits == 8 and bf16_layer(shape)


def _fp8_bf16_prepack(layer) -> dict:
    codes = bf16_weights(layer.weight.data.float())  # E4M3 values: exact in bf16
    return {"codes": codes["weight"], "packed": codes["packed"],
            "scale": layer.weight_scale.detach().float().reshape(-1).contiguous(),
            "bias": prepacked_bias(layer)}


def _fp8_bf16_linear(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    """E4M3 activation codes x E4M3 weight codes in a bf16 GEMM (products exact, fp32 sums, the output rounded to
    bf16), then the per-token and per-channel scales and the bias in fp32: ``torch._scaled_mm``'s computation."""
    x2 = x.reshape(-1, x.shape[-1])
    bf16 = x.dtype is torch.bfloat16  # a bf16 model's rows: read as they are, the output written in bf16
    codes, row_scale = quantize_e4m3_bf16(x2.contiguous() if bf16 else _contiguous_fp32(x2))
    if b["packed"] is not None:  # the microkernel, both scales and the bias in its epilogue (fp32 sums kept)
        out = bf16_linear(codes, b["packed"], layer.out_features, b["bias"], row_scale, b["scale"])
    else:
        out = bf16_scale(F.linear(codes, b["codes"]), row_scale, b["scale"], b["bias"], bf16_out=bf16)
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _hadamard_layer(layer, x: torch.Tensor) -> bool:
    return layer.spec.format == "twinlog" and layer.spec.rotation == "hadamard" and _takes_fp32(x)


def hadamard_bf16(layer, x: torch.Tensor) -> bool:
    return (layer.spec.format == "twinlog" and layer.spec.rotation == "hadamard" and x.dtype is torch.bfloat16
            and not torch.compiler.is_compiling())


def transformed_input(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer.transform_input(x)``: for a twin-log layer with the randomized Hadamard rotation on contiguous fp32
    rows, balancing and rotation in one C pass (:func:`~compressdit.quant.cpu_native.hadamard_rows`, bit for bit:
    torch's butterflies cost ~290 us a call on a zoo layer's 256 x 128 input, the pass ~22 at one thread)."""
    if _hadamard_layer(layer, x):
        out = hadamard_rows(x, layer.smooth_scale, layer.rotation_signs)
        if out is not None:
            return out
    return layer.transform_input(x)


def _on_transformed(run, gemm=None):
    """``run_untransformed`` of a kernel whose ``run`` takes the transformed input; with ``gemm(layer, rows, b)``
    (the kernel's GEMM on quantized rows), a twin-log layer with the Hadamard or DuQuant's rotation and a prepacked grid
    pass has its input balanced, rotated and quantized in one C pass (:func:`rotated_rows`)."""
    def run_untransformed(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
        if (gemm is not None and _hadamard_layer(layer, x) and _fused_grid(b, x, rotated=True)
                and hadamard_takes(x, layer.smooth_scale, layer.rotation_signs, b["grid"])):
            out = bf16_linear(x.reshape(-1, x.shape[-1]), b["packed"], layer.out_features, b["bias"],
                              transform=(b["smooth"], layer.rotation_signs, *b["grid"]))
            return out.reshape(*x.shape[:-1], layer.out_features)
        rows_of = b.get("rotated_rows") if gemm is not None and not torch.compiler.is_compiling() else None
        if rows_of is not None and x.dtype is torch.float32:
            rows = rows_of(x)
            if rows is not None:
                return gemm(layer, rows, b)
        if rows_of is not None and x.dtype is torch.bfloat16:
            # a bf16 model's rows widened once, then the same C pass (in fp32, where the reference rotates in bf16
            # arithmetic: torch's butterflies on a DiT-XL/2 layer's rows made an LRQ step 4.4x the bf16 model's)
            rows = rows_of(x.reshape(-1, x.shape[-1]).float())
            if rows is not None:
                if b.get("packed") is not None or b["weight"].dtype is torch.bfloat16:
                    rows = float_to_bf16(rows)
                return gemm(layer, rows, b).to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
        return run(layer, transformed_input(layer, x), b)

    return run_untransformed


def _fp32_rows_gemm(layer, rows: torch.Tensor, b: dict) -> torch.Tensor:
    return F.linear(rows, b["weight"], b["bias"])


def _twinlog_dense_direct(layer, b: dict):
    """``cpu-twinlog-dense``'s direct run (:attr:`~compressdit.quant.kernel_registry.Kernel.direct`) for a layer with
    the randomized Hadamard or DuQuant's rotation and a grid pass: the C pass (balancing, rotation, grid) and the fp32
    GEMM, nothing else per call; ``None`` for other layers (no rotation, no grid)."""
    rows_of = b["rotated_rows"]
    if rows_of is None or b.get("packed") is not None:
        return None
    weight, bias = b["weight"], b["bias"]

    def run(layer, x: torch.Tensor) -> torch.Tensor | None:
        rows = rows_of(x)
        return None if rows is None else F.linear(rows, weight, bias)

    return run


def _twinlog_dense_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return device.type == "cpu" and spec.format == "twinlog" and _small(shape) and not low_bit_bf16(spec, shape)


KERNELS.add("cpu-int-dense-bf16", Kernel(
    _dense_applies(bf16=True), prepack=_dense_prepack(torch.bfloat16), priority=15, **_dense_kernel(_dense_bf16_linear),
    description=f"layers of up to {DENSE_MAX_WEIGHT} weights: int codes decoded once into a dense bf16 weight "
                "(2 bytes per weight of RAM; weight-only: balancing/rotation folded in), bf16 activations, bf16 "
                "GEMM, fp32 bias; on AMX at any thread count, the weight packed for oneDNN's microkernel (an "
                "SVDQuant branch in the same GEMM)"))
KERNELS.add("cpu-int-dense-fp32", Kernel(
    _dense_applies(bf16=False), prepack=_dense_prepack(torch.float32), priority=15, **_dense_kernel(_dense_fp32_linear),
    direct=_dense_fp32_direct,
    description=f"layers of up to {DENSE_MAX_WEIGHT} weights: int codes decoded once into a dense fp32 weight "
                "(4 bytes per weight of RAM; weight-only: balancing/rotation folded in), the reference's fp32 GEMM"))
KERNELS.add("cpu-fp8-dense", Kernel(
    _fp8_dense_applies, _decoded_fp32_prepack(effective_fp32),
    _fp32_gemm(_e4m3_rows, any_rank=True), priority=10, direct=_fp8_dense_direct,
    description="E4M3 weight decoded once into a dense fp32 weight (4 bytes per weight of RAM), per-token E4M3 "
                "activations as the reference, fp32 GEMM"))
KERNELS.add("cpu-fp8-decoded-fp32", Kernel(
    _fp8_per_call_applies, per_call_prepack,
    per_call(_fp32_gemm(_e4m3_rows, any_rank=True), effective_fp32), priority=10,
    description=f"layers of more than {DENSE_MAX_WEIGHT} weights on CPUs without bf16 GEMMs: the E4M3 weight decoded "
                "for each call by one C pass into a reused buffer (no fp32 copy kept), per-token E4M3 activations as "
                "the reference, fp32 GEMM"))
KERNELS.add("cpu-fp8-bf16", Kernel(
    _fp8_bf16_applies, _fp8_bf16_prepack, _fp8_bf16_linear, priority=11,
    description="W8A8 FP8 where bf16 GEMMs pay (AVX512-BF16 at one thread, layers of at least "
                f"{BF16_MIN_WEIGHT} weights; above {DENSE_MAX_WEIGHT} at any thread count; on AMX every layer, "
                "small ones on oneDNN's microkernel with fp32 sums): E4M3 weight codes in bf16 "
                "(2 bytes per weight of RAM), per-token E4M3 activation codes in one C pass, bf16 GEMM, row and "
                "channel scales and bias in fp32 in one C pass"))
KERNELS.add("cpu-twinlog-dense", Kernel(
    _twinlog_dense_applies, _grid_prepack(_dequantized_fp32),
    _grid_gemm(quantize_layer_input, shared=False), priority=10,  # on the rotated input
    run_untransformed=_on_transformed(_grid_gemm(quantize_layer_input, shared=False), _fp32_rows_gemm),
    direct=_twinlog_dense_direct,
    description=f"twin-log layers of up to {DENSE_MAX_WEIGHT} weights: log2 codes decoded once into a dense fp32 "
                "weight in the rotated space (4 bytes per weight of RAM), the input rotated and quantized as the "
                "reference, fp32 GEMM"))


def _transform_then(run):
    """``run_untransformed`` of a kernel whose ``run`` takes the transformed input and has no fused transform."""
    def run_untransformed(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
        return run(layer, layer.transform_input(x), b)

    return run_untransformed


def _decoded_format(spec) -> bool:
    """Formats whose layers decode their weight (``dequantized_weight``) for the decoded kernels."""
    return spec.format == "int" or spec.format in BLOCK_CODECS or spec.format in FP_WEIGHT_FORMATS


def _decoded_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return device.type == "cpu" and _small(shape) and _decoded_format(spec) and not low_bit_bf16(spec, shape)


def _decoded_bf16_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return (device.type == "cpu" and (_decoded_format(spec) or spec.format == "twinlog")
            and low_bit_bf16(spec, shape))


def _decoded_bf16_prepack(layer) -> dict:
    grid = input_grid(layer)
    return {**bf16_weights(layer.dequantized_weight(torch.float32), layer), "smooth": smooth_divisor(layer),
            "grid": grid, "bias": prepacked_bias(layer), "rotated_rows": rotated_rows(layer, grid)}


def bf16_rows_gemm(layer, rows: torch.Tensor, b: dict) -> torch.Tensor:
    """Quantized fp32 ``rows`` rounded to bf16, the bf16 GEMM (fp32 sums), the fp32 bias, in ``rows``' leading shape:
    on the microkernel in one call where the weight is packed (the output not rounded to bf16), else torch's bf16
    linear between two C passes (the output rounded to bf16, then widened with the bias). bf16 ``rows`` (a bf16
    model's) go into torch's bf16 linear as they are, with the bias, and come out bf16: the reference's own
    computation, without the four passes of an fp32 round trip (a DiT-XL/2 batch-8 step of a bf16 model spent a fifth
    of its time in them)."""
    rows2 = rows.reshape(-1, rows.shape[-1])
    if b["packed"] is not None:  # bf16 rows as they are (a bf16 model's), else contiguous fp32
        packed_rows = rows2 if rows2.dtype is torch.bfloat16 and rows2.is_contiguous() else _contiguous_fp32(rows2)
        out = bf16_linear(packed_rows, b["packed"], layer.out_features, b["bias"])
    elif rows2.dtype is torch.bfloat16:
        out = F.linear(rows2, b["weight"], None if b["bias"] is None else b["bias"].to(torch.bfloat16))
    else:
        out = bf16_to_float(F.linear(float_to_bf16(_contiguous_fp32(rows2)), b["weight"]), b["bias"])
    return out.reshape(*rows.shape[:-1], layer.out_features)


def _fused_grid(b: dict, x: torch.Tensor, rotated: bool = False) -> bool:
    """Whether the microkernel's op quantizes ``x``'s rows itself (its blocks through the prepacked grid pass, bit for
    bit; NVFP4's tensor scale from every row first): a packed weight, contiguous fp32 rows, a grid (after a rotation:
    one whose scales come from each group alone, not NVFP4's), eager mode (compiled, the separate passes' PyTorch
    path runs)."""
    return (b.get("packed") is not None and b["grid"] is not None and b["grid"][1] in ((0, 1) if rotated else (0, 1, 2))
            and _takes_fp32(x) and not torch.compiler.is_compiling())


def _decoded_bf16_linear(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    """On the transformed input: activations quantized as the reference (the prepacked grid pass where there is one:
    inside the microkernel's op where :func:`_fused_grid`), then :func:`bf16_rows_gemm`."""
    x2 = x.reshape(-1, x.shape[-1])
    if _fused_grid(b, x2):
        out = bf16_linear(x2, b["packed"], layer.out_features, b["bias"], transform=(None, None, *b["grid"]))
    else:
        rows = None
        if x.dtype is torch.bfloat16 and b["grid"] is not None:  # widened, quantized, rounded in one pass
            rows = grid_rows_bf16_(x2.float(), *b["grid"])
        if rows is None:
            rows = _quantized_rows(layer, x2, b)
            if x.dtype is torch.bfloat16 and rows.dtype is torch.float32:  # rounded once: the GEMM's bf16 rows
                rows = float_to_bf16(rows.contiguous())
        out = bf16_rows_gemm(layer, rows, b)
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _input_kind(spec) -> tuple:
    """What the quantized rows of an input are kept under for the other layers reading it (:func:`shared_rows`):
    with dynamic scales, the activation fields of the spec say it all."""
    return ("input", spec.a_bits, spec.a_format, spec.a_granularity, spec.a_group_size)


def _shared_layer_input(layer, x: torch.Tensor) -> torch.Tensor:
    """:func:`quantize_layer_input`, shared with the other layers that read ``x`` and quantize it the same way."""
    spec = layer.spec
    if spec.a_bits is None or getattr(layer, "input_scale", None) is not None:
        return quantize_layer_input(layer, x)
    return shared_rows(x, _input_kind(spec), lambda: quantize_layer_input(layer, x))


KERNELS.add("cpu-decoded-dense", Kernel(
    _decoded_applies, _grid_prepack(_dequantized_fp32),
    _grid_gemm(_shared_layer_input, shared=True), priority=5,
    run_untransformed=_with_branch(_transform_then(_grid_gemm(_shared_layer_input, shared=True))),
    description=f"low-bit layers of up to {DENSE_MAX_WEIGHT} weights no faster kernel runs (NVFP4/MX blocks, "
                "4-bit minifloats, int with per-group or sub-8-bit activations): the residual weight decoded once "
                "into fp32 (4 bytes per weight of RAM), activations quantized as the reference, fp32 GEMM"))
KERNELS.add("cpu-decoded-fp32", Kernel(
    _per_call_applies, _per_call_grid_prepack, per_call(_grid_gemm(_shared_layer_input, shared=True), _dequantized_fp32),
    priority=4, run_untransformed=per_call(_on_transformed(_grid_gemm(_shared_layer_input, shared=True),
                                                           _fp32_rows_gemm), _dequantized_fp32),
    description=f"layers of more than {DENSE_MAX_WEIGHT} weights with 4-bit codes (int, twin-log, NVFP4/MX blocks, "
                "4-bit minifloats) on CPUs without bf16 GEMMs, where no faster kernel runs: the weight decoded for each "
                "call by one C pass into a reused buffer (the codes stay packed: no copy of the weight at run time; "
                "~0.3-0.45 ns a weight on AVX2), activations quantized as the reference, fp32 GEMM"))
KERNELS.add("cpu-decoded-bf16", Kernel(
    _decoded_bf16_applies, _decoded_bf16_prepack, _decoded_bf16_linear, priority=5,
    run_untransformed=_with_branch(_on_transformed(_decoded_bf16_linear, bf16_rows_gemm)),
    description=f"layers of more than {DENSE_MAX_WEIGHT} weights no faster kernel runs (NVFP4/MX blocks, minifloats, "
                "twin-log, int with per-group or sub-8-bit activations), on CPUs with bf16 GEMMs (AVX512-BF16 / AMX), "
                "and smaller ones but 8-bit int weights on AMX (packed for oneDNN's microkernel, fp32 sums): "
                "the residual weight decoded once into bf16 (2 bytes per weight of RAM beside the packed weight), "
                "activations quantized as the reference and rounded to bf16, bf16 GEMM, fp32 bias; on the "
                "microkernel an SVDQuant branch runs in the same GEMM"))
