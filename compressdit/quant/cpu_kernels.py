"""CPU kernels of quantized linears (see :mod:`compressdit.quant.kernel_registry`).

- ``cpu-int8-gemm``: W8A8 (int8 per-channel symmetric weights, dynamic symmetric int8 activations per token
  or per tensor) as a real int8 x int8 -> int32 GEMM: ``torch._int_mm`` on the layer's own int8 codes (no
  copy) for weights of up to ``INT8_GEMM_SMALL_WEIGHT`` elements at every row count and for one row at any
  size, else oneDNN's prepacked u8s8 GEMM (codes + 128, zero point 128) where its sums are exact
  (:func:`onednn_u8s8_exact`), ``torch._int_mm`` where not. The activation codes are exactly the
  reference's (``round(x / s)``, ``s = absmax / 127`` per token); the per-token and per-channel scales and the
  bias are applied to the fp32 output, so outputs equal the reference up to fp32 summation order. The activation
  quantization (with a balancing division fused in: the kernel's ``run_untransformed``) and the epilogue are
  one fused C pass each (:mod:`.cpu_native`; PyTorch ops without a C compiler), and GEMMs of up to
  ``INT8_GEMM_SERIAL_WORK`` multiply-adds run on one thread whatever torch's thread count. Where the C++ op library
  builds (:func:`~compressdit.quant.cpu_native.native_ops`), the ``torch._int_mm`` path is one call of
  ``torch.ops.compressdit_native.int8_linear`` (the same numbers: each of torch's threads quantizes, multiplies and
  scales its own rows; bf16 rows, a bf16 model's, go in and come out bf16 without fp32 copies: widened exactly,
  the output the fp32 result rounded to nearest even), and layers reading one input without balancing share its
  codes. On CPUs with AMX-INT8 every layer runs that op on oneDNN's BRGeMM microkernel (codes packed once, rows in
  chunks of 128), the large ones too: DiT-XL/2's 4096 x 1152 -> 4608 at one thread 23.9 ms on bf16 rows against
  54.0 ms through oneDNN's prepacked GEMM and fp32 copies and 31.8 ms for torch's bf16 linear. Elsewhere on
  AVX512-VNNI CPUs (:func:`vnni_int8_gemm`) every layer and row count runs ``cpu-int-groups``' GEMM with one group
  (:func:`~compressdit.quant.cpu_native.group_gemm`: the activation codes + 128 against the codes packed once,
  ``vpdpbusd``; the same numbers), faster than all of those and than fbgemm's dynamic int8 linear on DiT-XL/2's
  shapes (``bench/results/layer_w8a8_cpu.md``). On AVX2 CPUs without VNNI (:func:`int8_group_gemm_isa`) every layer
  and row count runs group_gemm's AVX2 tiles on signed activation codes (each product ``|w|`` times the code with
  ``w``'s sign: exact 16-bit pairs; 8-bit codes read as the layer stores them, each block of 16 channels packed per
  call and up to 4 rows a thread multiplied in place, no second copy: DiT-XL/2's shapes with the weights read from
  memory 1.02-1.05x a packed copy's time at 256 rows, 1.2-1.9x it at 1-16 rows, still 2-3x faster than fp32 there,
  ``bench/results/group_gemm_stored_cpu_zen3_avx2.md``): there oneDNN's u8s8 GEMM saturates its 16-bit pair sums
  and ``torch._int_mm`` takes 24-40x the fp32 GEMM's time. W4A8 (and other narrower) per-channel symmetric weights of up to
  ``INT8_GEMM_SMALL_WEIGHT`` elements (any size on that path) run the same GEMM, elsewhere on their codes unpacked
  to int8 (1 byte per weight at run time), on that path on their 4-bit codes packed two a byte and looked up in a
  16-entry table in the tiles (``vpshufb``; half a byte per weight, the same numbers and speed).
- ``cpu-int8-group-gemm``: the same with weights in groups (symmetric, e.g. W4A8 g64), layers of up to
  ``INT8_GEMM_SMALL_WEIGHT`` weights (any size on the VNNI path): the codes unpacked to int8 (1 byte per weight;
  on the VNNI path 2-3 bit codes packed two a byte, 4-bit ones the layer's own nibbles read as stored: no copy),
  the activation codes quantized per group in one C pass, one ``torch._int_mm`` per group (on one thread up to
  ``SERIAL_GEMM_WORK`` multiply-adds), one fused epilogue adding each group's int32 sums times its scales in fp32
  (one call of the C++ op ``int8_group_linear`` where it builds); on the VNNI path ``group_gemm``'s tiles, the
  groups' sums scaled in registers (the same numbers; calls of up to 4 rows multiply each channel's stored row in
  place, the same up to fp32 summation order).
- ``cpu-int-groups``: 4-bit weights (symmetric int, NVFP4, MXFP4, 4-bit minifloats) x dynamic activations with
  scales per group of inputs on an integer or 4-bit minifloat grid (W4A4 g16 / g64, NVFP4, SVDQuant's residual):
  both operands as integer codes (each grid value times a power of two: E2M1's halves x 2), one integer GEMM
  (``csrc/group_gemm.c``: AVX512-VNNI's ``vpdpbusd``, or AVX2's byte multiply-adds for groups of at least
  ``AVX2_MIN_GROUP``) with int32 sums per group and both groups' scales, the bias and SVDQuant's branch in its
  epilogue, the weight's 4-bit codes looked up in a 16-entry table of their integer values (the layer's stored
  nibbles, each pair of 16-channel blocks (AVX2: each block) packed through the table when its turn comes, its
  corrections for the activations' offset computed from the packed codes there: no copy, only the groups' fp32 scales
  kept; on AVX2 until 2026-12-07 a copy packed two a byte and the corrections, ~0.75 byte a weight at g16, beside
  the nibbles); the activation codes from
  one C pass, bit for bit the fake quantization's values once scaled, so the
  outputs are the reference's up to fp32 summation order. Not on AMX CPUs (their bf16 microkernel kernels, measured
  there, stay). DiT-XL/2 shapes at one thread on a Zen 4 EPYC: 2.3-9.7x fp32 (``bench/results/layer_lowbit_cpu.md``).
- ``cpu-twinlog-groups``: twin-log (LRQ) weights, whose per-row tables of real values no byte holds, in the same GEMM
  as 16-bit integers per output channel (:func:`pack_planes`: within half a step of ``max |w| / PLANE_MAX`` of each
  weight, far finer than a bf16 copy's rounding) split into two byte planes, x the rotated activations' byte codes
  (balancing, the randomized Hadamard and the codes in one C pass per row, then the GEMM on each thread's rows: one C
  call, :func:`~.cpu_native.hadamard_group_gemm`). On AVX512-VNNI (the AVX2 path would pay twice its byte products
  for no gain even at one plane on groups of 16), on layers no bf16 GEMM takes: on DiT-XL/2 shapes a bf16 copy's GEMM
  is faster at the token counts of a DiT (M >= 256: 1.8-2.2x fp32 against 1.6-1.8x), the integer GEMM at M <= 16
  (``bench/results/layer_lowbit_cpu.md``); on the zoo's 256 x 128 -> 768 the integer GEMM takes 0.77x fp32's time.
- ``cpu-int4-weight``: weight-only (or fake-quantized activations) int codes of 2-4 bits, groups of
  32/64/128/256 or per channel, via ``_weight_int4pack_mm_for_cpu``: activations are rounded to bf16
  (its fast path) and so are the group scales and the product; the bias is added in fp32. Up to
  ``INT4_PACKED_MAX_ROWS["cpu"]`` rows per call; above, the weight is dequantized per call into bf16 (from
  a nibble copy of the codes, 0.5 byte per weight) for a dense bf16 GEMM, which beats the packed GEMM there
  (1.5-2.2x fp32 against 0.6-1.05x at M = 256..1024 on DiT-XL/2 shapes, one thread, AVX512-BF16 EPYC). On CPUs
  without bf16 GEMMs (AVX2-only: there the bf16 GEMM is emulated and the packed kernel vectorizes no better, a
  DiT-XL/2 w4a16 step took 5x the fp32 one) calls of more than ``FP32_DECODE_MIN_ROWS`` rows decode the reference's
  own fp32 weight (one C pass into a reused buffer) for an fp32 GEMM on the unrounded activations (0.98x fp32).
  Layers of up to ``DENSE_MAX_WEIGHT`` weights run ``cpu-int-dense-fp32`` / ``-bf16`` instead (:mod:`.cpu_dense`).
  On CPUs with AVX512-BF16 up to :func:`int4_dot_max_rows` rows run :func:`~.cpu_native.int4_dot` on the layer's
  stored nibbles (:func:`stored_int4_dot`: no packed copy, 0.5 byte a weight in all).
- ``cpu-int8-weight``: weight-only int codes of 5-8 bits per channel (symmetric) via
  ``_weight_int8pack_mm`` on bf16 activations (per-channel scales applied in fp32 afterwards); above
  ``INT8_MAX_ROWS`` rows the dequantize reference (cheap for int8 codes) + fp32 GEMM is faster. bf16 rounding
  is about half the W8 quantization error here (measured in the tests), not negligible.
- ``cpu-vq-decoded-fp32``: VQ layers above ``DENSE_MAX_WEIGHT`` on CPUs without bf16 GEMMs: no decoded copy; each
  call decodes the codeword indices in one C pass into a reused buffer (:func:`~compressdit.quant.cpu_dense.per_call`)
  for the fp32 GEMM (a DiT-XL/2 ``vq-w3`` process peaked at 3878 MiB with the copy, above fp32's 3400; 1573 now).
- ``cpu-vq-dense``: VQ weights decoded once at prepack into a dense fp32 weight (costs 4 bytes per
  weight of RAM at run time; the checkpoint stays VQ), then a plain float matmul; ``cpu-vq-bf16`` the same in bf16
  where bf16 GEMMs pay (:func:`~compressdit.quant.cpu_dense.bf16_layer`: on AMX every layer, small ones on oneDNN's
  microkernel): 2 bytes per weight, within bf16 rounding of the reference.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from compressdit.quant.activations import activation_grid
from compressdit.quant.gpu_reference import INT4_PACKED_MAX_ROWS, dequantize_nibbles, int4_uses_packed_gemm
from compressdit.quant.kernel_registry import KERNELS, LOW_RANK, Kernel, prepacked_bias
from compressdit.quant.op_library import define_op
from compressdit.quant.cpu_dense import (DENSE_MAX_WEIGHT, amx_bf16, bf16_hardware, bf16_layer, bf16_rows_gemm,
                                         bf16_weights, effective_fp32, fast_int_path, fp32_linear_direct, hadamard_bf16,
                                         input_grid, low_bit_bf16, per_call, per_call_prepack, per_call_shape,
                                         quantize_layer_input, smooth_divisor, transformed_input)
from compressdit.quant.cpu_native import (decode_f32, dequantize_groups, dequantize_int32_, dequantize_nibbles_bf16,
                                          float_to_bf16, grid_codes, group_gemm, group_gemm_isa, group_gemm_ready,
                                          hadamard_group_gemm, int4_dot, int4_dot_ready, int8_brgemm, int8_pack,
                                          quantize_rows_int8, keep_rows, kept_rows, native_ops, rows_unshared,
                                          quantize_rows_int8_groups, scale_rows_, shared_rows, threads_for, times_rows,
                                          GROUP_GEMM_TEAM_MIN_WORK, TEAM_MIN_WORK)
from compressdit.quant.fp_layer import FP_WEIGHT_FORMATS
from compressdit.quant.minifloat import MINIFLOATS
from compressdit.quant.mx_layer import BLOCK_CODECS

INT4_GROUPS = (32, 64, 128, 256)
#: above this many rows a layer of ``cpu-int4-weight`` on a CPU without bf16 GEMMs decodes its fp32 weight for the
#: call (:func:`int4_weight_linear_cpu`). 1152 -> 4608, group 64, one thread, torch's kernels held to AVX2 on the
#: Xeon of bench/results: the packed int4 GEMM 0.46 / 3.45 / 14.6 ms at 1 / 16 / 64 rows, the fp32 GEMM 0.68 / 2.58 /
#: 6.96 ms plus ~1.1 ms of decoding.
FP32_DECODE_MIN_ROWS = 32
INT8_MAX_ROWS = 64   # above: dequantize + fp32 GEMM beats _weight_int8pack_mm (bench/layer_kernels.py)
# in_features * out_features up to which torch._int_mm (no prepacked copy) beats oneDNN's prepacked GEMM at every
# row count (1.5-2x on the zoo models' 128..640-wide layers, 1 thread); above, it wins at one row only
INT8_GEMM_SMALL_WEIGHT = 1 << 18


# rows * in * out up to which a kernel's int8 GEMMs run on one thread whatever torch's thread count (set by changing
# the number of intra-op threads around them, 0.2 us; other Python threads' ops may see 1 meanwhile). Measured on the
# 2-core EPYC VM of bench/results/e2e_speed_cpu.md, where what decides is which core holds the data: a 2-thread op
# reading rows that one thread wrote (or the reverse) pays for moving half of them between the cores. So a GEMM runs
# on the threads its C passes (cpu_native.threads_for: rows split as torch splits them) run on:
# - ``cpu-int8-gemm`` (one GEMM, K = in_features): 16-row layers (adaLN, 16 x 128 x 768 = 2^20.6) lose 4-6 us a
#   call to a second thread; 256 x 128 x 128 on (2^22) gains.
# - ``cpu-int8-group-gemm`` (one torch._int_mm per group, K = the group size): the same rule. Serial GEMMs between
#   two-thread C passes took 134-471 us a layer against 76-230 us all on two threads (zoo shapes, 256 rows), and the
#   dit-fmnist rtn-w4a8 step 1.28x float against 1.12-1.14x (2^21 or 0). Serial GEMMs were best only while the C
#   passes ran on one thread too (the former 2^26 rule, 1.20x).
SERIAL_GEMM_WORK = 1 << 21
INT8_GEMM_SERIAL_WORK = 1 << 21


def _like_input(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A GEMM's fp32 output ``[rows, out]`` in ``x``'s dtype and leading shape (a no-op ``.to()`` costs ~1 us of
    dispatch: skipped for fp32)."""
    if x.dtype is not torch.float32:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def _serial_threads(work: int, limit: int) -> int:
    """Drop torch to one intra-op thread where ``work`` (multiply-adds) is at most ``limit``; returns
    the thread count to restore afterwards (0: nothing changed)."""
    threads = torch.get_num_threads()
    if threads == 1 or work > limit:
        return 0
    torch.set_num_threads(1)
    return threads


# Low-level ``torch.library`` registration (:func:`define_op`; the ``torch.library.custom_op`` wrapper costs ~17 us
# per call). Even so, the dispatcher's round trip into a Python impl costs ~10 us per call, a tenth of a zoo model's
# layer: eager calls run the impl directly, and only tracing (torch.compile) sees the op.
def _define(schema: str):
    """Register the decorated function as the CPU impl of ``compressdit::<schema>``; returns a callable that
    runs the op under ``torch.compile`` and the impl itself in eager mode."""
    name = schema.split("(", 1)[0]

    def decorate(impl):
        def graph_impl(*args):  # what a compiled graph runs: no activation codes shared between its tensors
            with rows_unshared():
                return impl(*args)

        # MkldnnCPU: oneDNN's prepacked weight is an mkldnn tensor
        op = define_op(schema, {"CPU": graph_impl, "MkldnnCPU": graph_impl})

        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else impl(*args)

        call.op, call.__doc__, call.__name__ = op, impl.__doc__, name
        return call

    return decorate


# --- int8 activations x int8 (or narrower, per-channel) weights: an int32-accumulating GEMM ------------------

@_define("int8_gemm_linear_cpu(Tensor x, Tensor? smooth, Tensor? codes_t, Tensor? packed, Tensor w_scale, Tensor w_zero, "
         "Tensor? bias, bool per_token, int out_features, Tensor? microkernel=None, Tensor? gemm_packed=None, "
         "Tensor? gemm_corr=None, Tensor? gemm_scale=None, Tensor? gemm_table=None) -> Tensor")
def int8_gemm_linear_cpu(x: torch.Tensor, smooth: Optional[torch.Tensor], codes_t: Optional[torch.Tensor],
                         packed: Optional[torch.Tensor], w_scale: torch.Tensor, w_zero: torch.Tensor,
                         bias: Optional[torch.Tensor], per_token: bool, out_features: int,
                         microkernel: Optional[torch.Tensor] = None, gemm_packed: Optional[torch.Tensor] = None,
                         gemm_corr: Optional[torch.Tensor] = None, gemm_scale: Optional[torch.Tensor] = None,
                         gemm_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x / smooth) @ W^T + b`` with dynamic symmetric int8 activations (per token or tensor), W = codes *
    w_scale; ``smooth``: the layer's balancing divisor, fused into the quantization, or None (bf16 ``x``: only where
    the C++ op runs, with the divisor's bf16 values, which it divides by as torch divides bf16 tensors).

    ``codes_t``: the int8 ``[out, in]`` codes' transposed view; ``packed``: oneDNN's prepacked copy, or None where
    ``torch._int_mm`` runs at every row count (see :func:`_int8_gemm_prepack`). One row always runs ``torch._int_mm``.
    ``microkernel``: the codes packed by :func:`~compressdit.quant.cpu_native.int8_pack` (AMX-INT8), which the fused
    op then multiplies on oneDNN's BRGeMM microkernel instead of ``torch._int_mm`` (the same int32 sums).
    ``gemm_packed`` / ``gemm_corr`` / ``gemm_scale`` / ``gemm_table``: :func:`pack_weight`'s tensors (one group of
    all inputs, activation codes + 128; 8-bit codes and 4-bit nibbles as the layer stores them, 2-3 bit codes packed
    as nibbles through ``gemm_table``), which every row count then multiplies on
    :func:`~compressdit.quant.cpu_native.group_gemm` (AVX512-VNNI without the microkernel: the same int32 sums and
    dequantization; fp32 ``x``, or bf16 without a divisor); ``codes_t`` is then None for narrower weights (no
    unpacked copy kept).
    """
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    rows, in_features = x2.shape
    if gemm_packed is not None and rows and (x2.dtype is torch.float32 or smooth is None):
        out = _on_group_gemm(x, x2, smooth, per_token, gemm_packed, gemm_corr, gemm_scale, gemm_table, bias,
                             out_features, in_features)
        if out is not None:
            return out
    if codes_t is None:
        raise RuntimeError("cpu-int8-gemm: this layer's codes were packed for compressdit's native library, which is "
                           "not loaded now (set the layer's kernel again to repack them)")
    int_mm = packed is None or (rows == 1 and in_features >= 8)  # _int_mm is wrong at K = 1
    if int_mm and rows and native_ops():  # bf16 rows as they are (the op widens them exactly, returns bf16)
        if x2.dtype is torch.bfloat16:
            x2 = x2.contiguous()
        elif x2.dtype is not torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        return _like_input(_fused_int8_linear(x, x2, smooth, codes_t, w_scale, bias, per_token,
                                              microkernel=microkernel), x)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    if int_mm:
        q, a_scale = _codes(x, x2, per_token, 0, smooth)  # the reference's codes and scales, exactly
        threads = _serial_threads(rows * in_features * out_features, INT8_GEMM_SERIAL_WORK)
        try:
            acc = torch._int_mm(q, codes_t)
        finally:
            if threads:
                torch.set_num_threads(threads)
        out = dequantize_int32_(acc, w_scale, a_scale, bias)
    else:  # oneDNN takes uint8 activations fast (int8 ones run a slow path): codes + 128, zero point 128
        q, a_scale = _codes(x, x2, per_token, 128, smooth)
        acc = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, packed, w_scale, w_zero, None, 1.0, 0, torch.float32,
                                                 "none", [], "")
        out = scale_rows_(acc, a_scale, bias)
    return _like_input(out, x)


def _fused_int8_linear(x: torch.Tensor, x2: torch.Tensor, smooth: Optional[torch.Tensor], codes_t: torch.Tensor,
                       w_scale: torch.Tensor, bias: Optional[torch.Tensor], per_token: bool,
                       activation: int = 0, microkernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``torch._int_mm`` path in one C++ call (``csrc/int8_linear.cpp``: the same numbers), on torch's threads
    above ``TEAM_MIN_WORK`` multiply-adds, each thread's rows quantized, multiplied and scaled on it; the
    activation codes of ``x`` shared with the other layers that read it (without a balancing divisor)."""
    rows, in_features = x2.shape
    threads = torch.get_num_threads() if rows * in_features * codes_t.shape[1] > TEAM_MIN_WORK else 1
    kind = ("int8", per_token, 0)
    kept = kept_rows(x, kind) if smooth is None else None
    out, q, scale = torch.ops.compressdit_native.int8_linear(x2, smooth, codes_t, w_scale, bias, per_token, threads,
                                                             *(kept or (None, None)), activation, microkernel)
    if smooth is None and kept is None:
        keep_rows(x, kind, (q, scale))
    return out


def _on_group_gemm(x: torch.Tensor, x2: torch.Tensor, smooth: Optional[torch.Tensor], per_token: bool,
                   packed: torch.Tensor, corr: torch.Tensor, w_scale: torch.Tensor, table: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], out_features: int, group: int) -> torch.Tensor | None:
    """``x`` (rows ``x2``: fp32, or bf16 widened exactly here) times int8 weight codes packed by :func:`pack_weight`
    (groups of ``group`` inputs, activation codes + 128; nibbles through ``table`` where not None) on
    :func:`~compressdit.quant.cpu_native.group_gemm` with one activation scale a row (:func:`_codes`', shared as
    there); ``None`` without the library."""
    if x2.dtype is not torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    signed = int8_group_gemm_isa() == "avx2"  # AVX2: the signed codes, each product exact (flush 0)
    q, a_scale = _codes(x, x2, per_token, 0 if signed else 128, smooth)
    if not per_token:
        a_scale = a_scale.expand(x2.shape[0], 1).contiguous()
    out = group_gemm(q, a_scale, packed, corr, w_scale, bias, out_features, flush=0 if signed else 1,
                     row_group=group, table=table)
    return None if out is None else _like_input(out, x)


def _gemm_buffers(gemm: dict | None) -> dict:
    """:func:`pack_weight`'s tensors as a kernel's ``gemm_packed`` / ``gemm_corr`` / ``gemm_scale`` / ``gemm_table``
    buffers (all None without)."""
    return {f"gemm_{key}": None if gemm is None else gemm[name]
            for key, name in (("packed", "packed"), ("corr", "corr"), ("scale", "w_scale"), ("table", "table"))}


def _codes(x: torch.Tensor, x2: torch.Tensor, per_token: bool, offset: int,
           smooth: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows_int8` of ``x2`` (``x``'s fp32 rows); without a balancing divisor, shared with the other
    layers that read ``x`` (:func:`shared_rows`)."""
    if smooth is not None:
        return quantize_rows_int8(x2, per_token, offset, smooth)
    return shared_rows(x, ("int8", per_token, offset), lambda: quantize_rows_int8(x2, per_token, offset))


@torch.library.register_fake("compressdit::int8_gemm_linear_cpu")
def _(x, smooth, codes_t, packed, w_scale, w_zero, bias, per_token, out_features, microkernel=None, gemm_packed=None,
      gemm_corr=None, gemm_scale=None, gemm_table=None):
    return x.new_empty(*x.shape[:-1], out_features)


def int8_group_gemm_isa() -> str | None:
    """The :func:`~compressdit.quant.cpu_native.group_gemm` path int8-activation layers (``cpu-int8-gemm``,
    ``cpu-int8-group-gemm``) run on here, at any size and row count, or None (AMX-INT8: oneDNN's microkernel; no
    library):

    - ``"avx512-vnni"``: activation codes + 128 (``vpdpbusd``), the layer's stored codes / nibbles read as they are;
      DiT-XL/2's W4A8 g64 layers 3.0-4.5x fp32 at M >= 256 against 1.7-2.2x for the packed int4 GEMM (Zen 4).
    - ``"avx2"`` (no VNNI): signed activation codes, each product exact (``|w| * (x with w's sign)``: group_gemm's
      ``flush=0``), the codes packed once at load (4-bit ones two a byte). Without VNNI oneDNN's u8s8 GEMM saturates
      its 16-bit pair sums (DiT-size W8A8 layers 13-19% off) and ``torch._int_mm`` takes 24-40x the fp32 GEMM's time
      (Zen 3 EPYC, one thread); this path 1.4-1.9x faster than fp32 at 256-1024 rows on DiT-XL/2's shapes
      (0.8-0.9x the time of fbgemm's dynamic int8 linear, whose activations have 7 bits)."""
    return None if int8_brgemm() else group_gemm_isa()


@functools.lru_cache(maxsize=None)
def onednn_u8s8_exact() -> bool:
    """Whether oneDNN's prepacked u8s8 GEMM gives exact int32 sums here: with VNNI (``vpdpbusd``) or AMX. Without, it
    multiplies by ``vpmaddubsw``, whose 16-bit pair sums saturate for 8-bit activations (a 1152 -> 4608 layer's outputs
    13-19% off on a Zen 3 EPYC): ``torch._int_mm`` runs there instead where group_gemm does not."""
    return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())


def vnni_int8_gemm() -> bool:
    """Whether int8-activation layers run on :func:`~compressdit.quant.cpu_native.group_gemm`'s VNNI tiles here
    (:func:`int8_group_gemm_isa`), reading the layer's stored codes without a copy."""
    return int8_group_gemm_isa() == "avx512-vnni"


def _int8_gemm_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    out_features, in_features = shape
    narrow_fits = (spec.w_bits == 8 or out_features * in_features <= INT8_GEMM_SMALL_WEIGHT
                   or (in_features % 4 == 0 and int8_group_gemm_isa() is not None))
    return (device.type == "cpu" and spec.format == "int" and spec.a_bits == 8 and narrow_fits
            and spec.group_size is None and spec.w_symmetric and spec.a_granularity in ("per_token", "per_tensor")
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack"))


def _int8_gemm_prepack(layer) -> dict:
    bits = layer.spec.w_bits  # 2-3 bits: packed as nibbles, no more
    isa = int8_group_gemm_isa() if layer.in_features % 4 == 0 else None
    on_gemm = isa is not None
    # int8 [out, in]: the layer's own weight for 8 bits, an unpacked copy below (4 bits on group_gemm's VNNI path:
    # none, the corrections summed from the stored nibbles)
    codes = None if isa == "avx512-vnni" and bits == 4 else layer.codes()
    small = layer.out_features * layer.in_features <= INT8_GEMM_SMALL_WEIGHT and layer.in_features >= 8
    # on AMX-INT8 every layer: oneDNN's microkernel on codes packed once (int8_linear.cpp), large ones too (DiT-XL/2's
    # 4096 x 1152 -> 4608 at one thread: 33.5 ms against 42.6 for oneDNN's prepacked GEMM and its passes; bf16 rows
    # 29.1 ms against 54.0 through fp32 copies, and torch's bf16 linear 33.2)
    microkernel = int8_pack(codes) if layer.in_features % 4 == 0 and layer.in_features >= 8 and int8_brgemm() else None
    # the balancing division fuses into the quantization pass where it is the whole input transform
    smooth = None if layer.smooth_scale is None or layer.rotation_signs is not None else layer.smooth_scale.detach()
    # elsewhere on AVX512-VNNI every row count on group_gemm's VNNI tiles (cpu-int-groups' GEMM, one group): faster
    # than oneDNN's prepacked GEMM, torch._int_mm and fbgemm's dynamic int8 linear at every shape measured
    # (bench/results/layer_w8a8_cpu.md). 8-bit codes and 4-bit nibbles are read as the layer stores them (each block of
    # channels packed per call, few rows multiplied in place): no second copy of the weight (W8A8: half its bytes)
    scale = layer.weight_scale.reshape(-1, 1).float()
    if not on_gemm:
        gemm = None
    elif isa == "avx2":  # signed activation codes (no offset); 5-8 bit byte codes read as they are (each block of 16
        # channels packed per call, up to 4 rows a thread multiplied in place: no second copy), 4 bits and less packed
        # once as nibbles (half a byte a weight)
        gemm = pack_weight(codes, scale, layer.in_features, 0.0, nibbles=bits <= 4, stored=codes if bits > 4 else None)
    elif bits == 4:  # offset nibbles as stored (row_major 2, no table: the in-place dot path of few rows takes it)
        gemm = {**stored_nibble_weight(layer.offset_nibbles(), OFFSET_NIBBLE_CODES, scale, layer.in_features, 128.0),
                "table": None}
    else:  # 2-3 bits: nibbles through a table (packed); 5-8 bits: byte codes read as they are (at 5-7 bits the
        # unpacked copy is that weight: 1 byte a weight, more than 16 codes fit no nibble)
        gemm = pack_weight(codes, scale, layer.in_features, 128.0, nibbles=bits < 4, stored=None if bits < 4 else codes)
    narrow = gemm is not None and bits < 8  # no unpacked copy kept besides the packed one
    return {"codes": None if narrow else codes, "codes_t": None if narrow else codes.t(),
            "packed": None if small or microkernel is not None or gemm is not None or not onednn_u8s8_exact() else
            torch.ops.onednn.qlinear_prepack(codes.contiguous(), None),
            "microkernel": microkernel, **_gemm_buffers(gemm),
            "w_scale": layer.weight_scale.reshape(-1).float().contiguous(),
            "w_zero": torch.zeros(layer.out_features, dtype=torch.long),
            "bias": prepacked_bias(layer),
            "smooth": None if smooth is None else smooth.float().contiguous(),
            "smooth_bf16": None if smooth is None else smooth.to(torch.bfloat16).float().contiguous(),
            "transform": layer.smooth_scale is not None or layer.rotation_signs is not None,
            "per_token": layer.spec.a_granularity == "per_token"}


def _int8_gemm_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    return int8_gemm_linear_cpu(x, None, b["codes_t"], b["packed"], b["w_scale"], b["w_zero"], b["bias"],
                                b["per_token"], layer.out_features, b["microkernel"], b["gemm_packed"], b["gemm_corr"],
                                b["gemm_scale"], b["gemm_table"])


def _int8_gemm_run_untransformed(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    smooth = b["smooth"]
    if (x.dtype is torch.bfloat16 and smooth is not None and b["packed"] is None and b["gemm_packed"] is None
            and not torch.compiler.is_compiling() and native_ops()):  # (compiled: the traced division below)
        smooth = b["smooth_bf16"]  # the C++ op divides bf16 rows as the reference does: no bf16 copy of x / s
    elif b["transform"] and (smooth is None or x.dtype != torch.float32):  # bf16 x: the reference divides in bf16
        x, smooth = layer.transform_input(x), None
    return int8_gemm_linear_cpu(x, smooth, b["codes_t"], b["packed"], b["w_scale"], b["w_zero"], b["bias"],
                                b["per_token"], layer.out_features, b["microkernel"], b["gemm_packed"], b["gemm_corr"],
                                b["gemm_scale"], b["gemm_table"])


#: activations the fused op applies in its epilogue (csrc/int8_linear.cpp's codes)
FUSED_ACTIVATIONS = {"gelu-tanh": 1}


def _int8_gemm_run_activated(layer, x: torch.Tensor, b: dict, activation: str) -> torch.Tensor | None:
    """``run_untransformed`` with ``activation`` in the fused op's epilogue (each block of rows activated while in
    cache: :func:`compressdit.quant.cpu_native.gelu_tanh`'s numbers); ``None`` where that op does not run (oneDNN's
    prepacked layers, group_gemm's, other dtypes, ``torch.compile``, no C++ op library)."""
    code = FUSED_ACTIVATIONS.get(activation)
    if (code is None or b["packed"] is not None or b["gemm_packed"] is not None or x.dtype is not torch.float32
            or not x.is_contiguous() or x.numel() == 0 or torch.compiler.is_compiling() or not native_ops()):
        return None
    smooth = b["smooth"]
    if b["transform"] and smooth is None:  # a rotation: the layer's own transform first
        x = layer.transform_input(x)
    return _like_input(_fused_int8_linear(x, x.reshape(-1, x.shape[-1]), smooth, b["codes_t"], b["w_scale"],
                                          b["bias"], b["per_token"], code, b["microkernel"]), x)


@_define("int8_group_gemm_linear_cpu(Tensor x, Tensor? codes, Tensor w_scale, Tensor? bias, bool per_token, "
         "int out_features, Tensor? microkernel=None, Tensor? gemm_packed=None, Tensor? gemm_corr=None, "
         "Tensor? gemm_scale=None, Tensor? gemm_table=None) -> Tensor")
def int8_group_gemm_linear_cpu(x: torch.Tensor, codes: Optional[torch.Tensor], w_scale: torch.Tensor,
                               bias: Optional[torch.Tensor], per_token: bool, out_features: int,
                               microkernel: Optional[torch.Tensor] = None, gemm_packed: Optional[torch.Tensor] = None,
                               gemm_corr: Optional[torch.Tensor] = None, gemm_scale: Optional[torch.Tensor] = None,
                               gemm_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped weights (``codes`` int8 ``[groups, out, group]``, ``w_scale`` ``[groups, out]``) x dynamic int8
    activations: the codes quantized per group in one C pass, one ``torch._int_mm`` per group into one int32
    buffer, one fused epilogue (each group's sums scaled by its scales and added, then per row). ``microkernel``: each
    group's codes packed by :func:`~compressdit.quant.cpu_native.int8_pack` (AMX-INT8): the fused op's GEMMs then run
    on oneDNN's microkernel (the same int32 sums). ``gemm_packed`` / ``gemm_corr`` / ``gemm_scale`` / ``gemm_table``:
    the codes packed by :func:`pack_weight` (activation codes + 128; nibbles through the table), multiplied on
    :func:`~compressdit.quant.cpu_native.group_gemm` (AVX512-VNNI without the microkernel: the same numbers);
    ``codes`` is then None (no unpacked copy kept)."""
    groups = w_scale.shape[0]
    size = x.shape[-1] // groups
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    if gemm_packed is not None and x2.shape[0]:
        out = _on_group_gemm(x, x2, None, per_token, gemm_packed, gemm_corr, gemm_scale, gemm_table, bias,
                             out_features, size)
        if out is not None:
            return out
    if codes is None:
        raise RuntimeError("cpu-int8-group-gemm: this layer's codes were packed for compressdit's native library, "
                           "which is not loaded now (set the layer's kernel again to repack them)")
    if x2.shape[0] and native_ops():  # the same in one C++ call, each thread's rows on it (csrc/int8_linear.cpp)
        threads = torch.get_num_threads() if x2.numel() * out_features > TEAM_MIN_WORK else 1
        return _like_input(torch.ops.compressdit_native.int8_group_linear(x2, codes, w_scale, bias, per_token,
                                                                          threads, microkernel), x)
    q, a_scale = quantize_rows_int8_groups(x2, per_token, size)
    acc = torch.empty(groups, x2.shape[0], out_features, dtype=torch.int32)
    threads = _serial_threads(x2.numel() * out_features, SERIAL_GEMM_WORK)
    try:
        for g in range(groups):
            torch._int_mm(q[g], codes[g].t(), out=acc[g])
    finally:
        if threads:
            torch.set_num_threads(threads)
    return _like_input(dequantize_groups(acc, w_scale, a_scale, bias), x)


@torch.library.register_fake("compressdit::int8_group_gemm_linear_cpu")
def _(x, codes, w_scale, bias, per_token, out_features, microkernel=None, gemm_packed=None, gemm_corr=None,
      gemm_scale=None, gemm_table=None):
    return x.new_empty(*x.shape[:-1], out_features)


def _int8_group_gemm_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    out_features, in_features = shape
    return (device.type == "cpu" and spec.format == "int" and spec.a_bits == 8 and spec.group_size is not None
            and spec.group_size >= 8 and in_features % spec.group_size == 0 and spec.w_symmetric
            and (out_features * in_features <= INT8_GEMM_SMALL_WEIGHT
                 or (spec.group_size % 4 == 0 and int8_group_gemm_isa() is not None))
            and spec.a_granularity in ("per_token", "per_tensor"))


def _int8_group_gemm_prepack(layer) -> dict:
    size, bits = layer.spec.group_size, layer.spec.w_bits
    microkernel = gemm = codes = None
    if size % 4 == 0 and int8_brgemm():  # AMX-INT8: each group's codes packed for oneDNN's microkernel
        codes = layer.codes()  # int8 [out, in], an unpacked copy of narrower codes
        microkernel = torch.stack([int8_pack(group_codes) for group_codes in _codes_per_group(codes, size)])
    elif size % 4 == 0 and vnni_int8_gemm() and bits == 4:  # group_gemm's tiles, the groups' sums scaled in them,
        # on the stored offset nibbles (each pair of channel blocks packed per call through ``nibble - 8``): no copy
        gemm = stored_nibble_weight(layer.offset_nibbles(), OFFSET_NIBBLE_CODES, layer.weight_scale.float(), size,
                                    128.0)
    elif size % 4 == 0 and vnni_int8_gemm():  # 2-3 bits: their nibbles packed (a stored copy would be one too)
        gemm = pack_weight(layer.codes(), layer.weight_scale.float(), size, 128.0, nibbles=bits < 4)
    elif size % 4 == 0 and int8_group_gemm_isa() == "avx2":  # signed activation codes, the codes packed once
        gemm = pack_weight(layer.codes(), layer.weight_scale.float(), size, 0.0, nibbles=bits <= 4)
    else:
        codes = layer.codes()
    # on group_gemm the op reads only its group count from w_scale: the packed scales ([groups, out] padded), no copy
    return {"codes": None if gemm is not None else _codes_per_group(codes, size),
            "w_scale": gemm["w_scale"] if gemm is not None else layer.weight_scale.float().t().contiguous(),
            "bias": prepacked_bias(layer), "microkernel": microkernel, **_gemm_buffers(gemm)}


def _codes_per_group(codes: torch.Tensor, size: int) -> torch.Tensor:
    """int8 ``[out, in]`` codes as ``[in / size, out, size]`` (each group's codes contiguous)."""
    return codes.view(codes.shape[0], -1, size).transpose(0, 1).contiguous()


def _int8_group_gemm_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    return int8_group_gemm_linear_cpu(x, b["codes"], b["w_scale"], b["bias"], layer.spec.a_granularity == "per_token",
                                      layer.out_features, b["microkernel"], b["gemm_packed"], b["gemm_corr"],
                                      b["gemm_scale"], b["gemm_table"])


# --- weight-only int4 (tinygemm layout for CPU) -------------------------------------------------------------

#: rows up to which ``cpu-int4-weight`` runs :func:`~compressdit.quant.cpu_native.int4_dot` where it runs (AVX512-BF16).
#: DiT-XL/2 shapes, one thread, Zen 4 EPYC, W4 g64 (``bench/results/layer_kernels_cpu.md``): 1.8-7.3x fp32 at one row
#: where the packed int4 GEMM ran 1.0-3.3x, 2.3-4.0x at 16 (1.1-1.9x); against the bf16 decode + GEMM above:
#: 2.0-2.3x fp32 against 1.8-1.9x at 128 rows, 2.0-2.1x against 1.9-2.0x at 256, 1.9-2.1x against 2.0-2.1x at 1024
INT4_DOT_MAX_ROWS = 256


def int4_dot_max_rows() -> int:
    """``INT4_DOT_MAX_ROWS``, or on AMX CPUs the packed int4 GEMM's rows (``INT4_PACKED_MAX_ROWS["cpu"]``): there
    the bf16 decode's GEMM above them runs on AMX tiles (not timed against ``int4_dot`` on those CPUs: the split of
    before)."""
    return INT4_PACKED_MAX_ROWS["cpu"] if amx_bf16() else INT4_DOT_MAX_ROWS


def pack_int4_dot(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> dict:
    """Signed int codes ``[out, in]`` in [-8, 7] with fp32 scales ``[out, in / g]`` and zero terms (``-zero point *
    scale``, or ``None``) in the layout :func:`~compressdit.quant.cpu_native.int4_dot`'s tiles read
    (csrc/int4_dot.c): ``dot_packed`` (blocks of 16 output channels, chunks of 4 inputs as 32 bytes of nibbles),
    ``dot_scale`` and ``dot_zz`` (``zero - 136 * scale``: the decoding's offset taken back) ``[in / group, out]``,
    padded to 16 channels; ``g`` a multiple of ``group``. The layers' kernel keeps no such copy (:func:`stored_int4_dot`
    packs each block of their stored nibbles when its turn comes); this is the layout that packing produces."""
    out_features, in_features = codes.shape
    padded = -(-out_features // 16) * 16
    q = torch.zeros(padded, in_features, dtype=torch.uint8)
    q[:out_features] = (codes.to(torch.int16) + 8).to(torch.uint8)
    chunks = q.view(padded // 16, 16, in_features // 4, 2, 2)  # [block, channel, chunk, half, kk]
    low, high = chunks[:, :, :, 0, :], chunks[:, :, :, 1, :]   # inputs 4t + kk and 4t + 2 + kk
    packed = (low | (high << 4)).permute(0, 2, 1, 3).reshape(padded // 16, in_features // 4, 32).contiguous()
    repeat = in_features // group // scale.shape[1]
    full_scale = torch.zeros(padded, in_features // group)
    full_scale[:out_features] = scale.float().repeat_interleave(repeat, dim=1)
    full_zero = torch.zeros_like(full_scale)
    if zero is not None:
        full_zero[:out_features] = zero.float().repeat_interleave(repeat, dim=1)
    return {"dot_packed": packed, "dot_scale": full_scale.t().contiguous(),
            "dot_zz": (full_zero - 136 * full_scale).t().contiguous()}


@_define("int4_weight_linear_cpu(Tensor x, Tensor? packed, Tensor? scales_zeros, Tensor nibbles, Tensor scale, "
         "Tensor? zero, int group_size, Tensor? bias, int out_features, Tensor? values32, Tensor? scale32, "
         "Tensor? zero32, Tensor? dot_packed, Tensor? dot_scale, Tensor? dot_zz) -> Tensor")
def int4_weight_linear_cpu(x: torch.Tensor, packed: Optional[torch.Tensor], scales_zeros: Optional[torch.Tensor],
                           nibbles: torch.Tensor,
                           scale: torch.Tensor, zero: Optional[torch.Tensor], group_size: int,
                           bias: Optional[torch.Tensor], out_features: int, values32: Optional[torch.Tensor] = None,
                           scale32: Optional[torch.Tensor] = None, zero32: Optional[torch.Tensor] = None,
                           dot_packed: Optional[torch.Tensor] = None, dot_scale: Optional[torch.Tensor] = None,
                           dot_zz: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + b`` with W = (q - 8) * scale + zero per group, activations in bf16.

    With ``dot_packed`` / ``dot_scale`` / ``dot_zz`` (:func:`stored_int4_dot`: the layer's nibbles and its scales,
    where :func:`~compressdit.quant.cpu_native.int4_dot_ready`) up to :func:`int4_dot_max_rows` rows: that kernel (fp32
    scales, the bias added in fp32, the output rounded once to a bf16 ``x``'s dtype; then ``packed`` is None). Else
    up to ``INT4_PACKED_MAX_ROWS["cpu"]`` rows: the packed int4 GEMM; above: W dequantized into bf16 for this
    call (``nibbles``: codes + 8 two per byte, ``scale``/``zero``: bf16 ``[out, in / group]``), a dense GEMM.
    With ``values32`` / ``scale32`` / ``zero32`` (the layer's ``fp32_decoding()``: each nibble's value, the fp32 scales
    and zero points; prepacked on CPUs without bf16 GEMMs, where a bf16 GEMM is emulated) an fp32 ``x`` of more than
    ``FP32_DECODE_MIN_ROWS`` rows instead multiplies the reference's own fp32 weight, decoded for this call (:func:`~compressdit.quant.cpu_native.decode_f32`), in an fp32
    GEMM: activations unrounded, the reference's numbers up to summation order.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if dot_packed is not None and 0 < rows <= int4_dot_max_rows():
        x2 = x.reshape(rows, x.shape[-1])
        x2 = x2.contiguous() if x2.dtype is torch.bfloat16 else float_to_bf16(x2.float().contiguous())
        out = int4_dot(x2, dot_packed, dot_scale, dot_zz, bias, out_features, group_size)
        if out is not None:
            return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
    if (values32 is not None and x.dtype is torch.float32 and rows > FP32_DECODE_MIN_ROWS
            and not (torch.is_grad_enabled() and x.requires_grad)):  # autograd would keep the reused buffer
        weight = decode_f32(("nibbles", nibbles, values32, scale32, zero32))
        if weight is not None:
            return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    bf16 = x.dtype is torch.bfloat16  # a bf16 model's: its bias (bf16 values) added in bf16, the output kept bf16
    bf16_bias = None if bias is None or not bf16 else bias.to(torch.bfloat16)
    if packed is not None and int4_uses_packed_gemm(x2.shape[0], "cpu"):
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_zeros)
        out = out.add_(bf16_bias) if bf16_bias is not None else out  # (an fp32 bias in place: ~14 ms a big layer)
    else:
        # one C pass into a reused buffer, where autograd keeps no reference to the weight
        weight = None if torch.is_grad_enabled() and x2.requires_grad else dequantize_nibbles_bf16(
            nibbles, scale, zero, group_size)
        weight = dequantize_nibbles(nibbles, scale, zero, group_size) if weight is None else weight
        out = F.linear(x2, weight, bf16_bias)  # a bf16 model's bias inside the GEMM: torch's bf16 linear
    if not bf16:
        out = out.float() if bias is None else out.float().add_(bias)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


@torch.library.register_fake("compressdit::int4_weight_linear_cpu")
def _(x, packed, scales_zeros, nibbles, scale, zero, group_size, bias, out_features, values32=None, scale32=None,
      zero32=None, dot_packed=None, dot_scale=None, dot_zz=None):
    return x.new_empty(*x.shape[:-1], out_features)


def _int4_group(spec, in_features: int) -> int | None:
    if spec.group_size is not None:
        return spec.group_size if spec.group_size in INT4_GROUPS else None
    return next((g for g in reversed(INT4_GROUPS[:3]) if in_features % g == 0), None)


def _int4_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    out_features, in_features = shape
    group = _int4_group(spec, in_features)
    return (device.type == "cpu" and spec.format == "int" and spec.w_bits <= 4 and group is not None
            and in_features % group == 0 and out_features % 16 == 0)


def _int4_prepack(layer) -> dict:
    group = _int4_group(layer.spec, layer.in_features)
    scale = layer.weight_scale.float()
    zero = torch.zeros_like(scale) if layer.weight_zero is None else -layer.weight_zero.float() * scale
    repeat = layer.in_features // group // scale.shape[1]        # per-channel: one scale for every group
    scale, zero = (t.repeat_interleave(repeat, dim=1) if repeat != 1 else t for t in (scale, zero))
    nibbles = layer.offset_nibbles()  # the stored weight at 4 bits (at 2-3 bits a packed copy)
    dot = stored_int4_dot(nibbles, scale, zero, group)
    return {"packed": None if dot["dot_packed"] is not None else torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                (layer.codes().to(torch.int32) + 8).contiguous(), 1),  # codes [-8, 7] -> [0, 15]
            "scales_zeros": None if dot["dot_packed"] is not None else torch.stack([scale.t(), zero.t()], -1).to(
                torch.bfloat16).contiguous(),
            "nibbles": nibbles,
            "scale": scale.to(torch.bfloat16).contiguous(),
            "zero": None if layer.weight_zero is None else zero.to(torch.bfloat16).contiguous(),
            "group": group, "bias": prepacked_bias(layer), **_fp32_decode_scales(layer), **dot}


def stored_int4_dot(nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> dict:
    """:func:`~compressdit.quant.cpu_native.int4_dot`'s operands for a layer's offset nibbles ``[out, in / 2]`` (the
    stored weight itself: no packed copy; each block of 16 channels is packed when its turn comes, or with up to 4
    rows read channel by channel in place) and its fp32 scales and zero terms ``[out, in / group]``: ``dot_scale``
    and ``dot_zz`` (``zero - 136 * scale``) in that layout; ``None``s where that kernel does not run (no AVX512-BF16,
    or groups not a multiple of 4)."""
    if not (int4_dot_ready() and bf16_hardware()) or group % 4:
        return {"dot_packed": None, "dot_scale": None, "dot_zz": None}
    return {"dot_packed": nibbles, "dot_scale": scale.float().contiguous(),
            "dot_zz": (zero.float() - 136 * scale.float()).contiguous()}


def _fp32_decode_scales(layer) -> dict:
    """``values32`` / ``scale32`` / ``zero32``: the layer's ``fp32_decoding()`` tables (its nibbles are the prepacked
    ``nibbles``) where its many-row calls decode the weight into fp32 (:func:`int4_weight_linear_cpu`): CPUs without
    bf16 GEMMs, where the bf16 path's GEMM is emulated (DiT-XL/2 with ``ATEN_CPU_CAPABILITY=avx2``: w4a16 5x the fp32
    model's step); ``None`` elsewhere."""
    if bf16_hardware():
        return {"values32": None, "scale32": None, "zero32": None}
    _, _, values, scale, zero = layer.fp32_decoding()
    return {"values32": values, "scale32": scale, "zero32": zero}


def _fake_quantize_input(layer, x: torch.Tensor) -> torch.Tensor:
    return quantize_layer_input(layer, x)


def _int4_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    return int4_weight_linear_cpu(_fake_quantize_input(layer, x), b["packed"], b["scales_zeros"], b["nibbles"],
                                  b["scale"], b["zero"], b["group"], b["bias"], layer.out_features, b["values32"],
                                  b["scale32"], b["zero32"], b["dot_packed"], b["dot_scale"], b["dot_zz"])


# --- weight-only int8 per channel ------------------------------------------------------------------------

@_define("int8_weight_linear_cpu(Tensor x, Tensor codes, Tensor ones, Tensor w_scale, Tensor? bias) -> Tensor")
def int8_weight_linear_cpu(x: torch.Tensor, codes: torch.Tensor, ones: torch.Tensor, w_scale: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ W^T + b`` with W = codes * scale per output channel, bf16 activations, scales applied in fp32."""
    x2 = aligned(x.reshape(-1, x.shape[-1]).to(torch.bfloat16))
    out = torch._weight_int8pack_mm(x2, codes, ones).float() * w_scale
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*x.shape[:-1], codes.shape[0])


@torch.library.register_fake("compressdit::int8_weight_linear_cpu")
def _(x, codes, ones, w_scale, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def _int8_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return (device.type == "cpu" and spec.format == "int" and spec.w_bits > 4 and spec.group_size is None
            and spec.w_symmetric)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at a 64-byte aligned address (a copy where not). ``_weight_int8pack_mm`` reads its operands
    with aligned vector loads and crashes the process (SIGSEGV, torch 2.13 on AVX-512) on an activation off 32 bytes
    or a weight off 16: a checkpoint's codes memory-mapped by safetensors sit at any offset, a bf16 input may be a
    view into a larger tensor."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _int8_prepack(layer) -> dict:
    return {"codes": aligned(layer.codes()), "ones": torch.ones(layer.out_features, dtype=torch.bfloat16),
            "w_scale": layer.weight_scale.reshape(-1).float(),
            "bias": prepacked_bias(layer)}


def _int8_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    if _rows(x) > INT8_MAX_ROWS:
        return layer.reference_linear(x)
    return int8_weight_linear_cpu(_fake_quantize_input(layer, x), b["codes"], b["ones"], b["w_scale"], b["bias"])


# --- VQ: decode once -------------------------------------------------------------------------------------

def _vq_prepack(layer) -> dict:
    return {"weight": layer.effective_weight(torch.float32),
            "bias": prepacked_bias(layer)}


def _vq_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    bias = None if b["bias"] is None else b["bias"].to(x.dtype)
    return F.linear(x, b["weight"].to(x.dtype), bias)


def _vq_bf16_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    return device.type == "cpu" and spec.format == "vq" and bf16_layer(shape)


def _vq_bf16_prepack(layer) -> dict:
    return {**bf16_weights(layer.effective_weight(torch.float32)), "bias": prepacked_bias(layer)}


def _vq_bf16_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    return bf16_rows_gemm(layer, x, b).to(x.dtype)


# --- low-bit activations x 4-bit weights, scales per group of inputs on both: an integer GEMM (AVX512-VNNI, AVX2) ---

def integer_multiplier(values: torch.Tensor) -> float | None:
    """The smallest power of two (up to 2^9) that makes every one of ``values`` an integer of magnitude at most 127
    (signed bytes), or ``None``."""
    for shift in range(10):
        scaled = values.double() * 2.0 ** shift
        if bool(torch.isfinite(scaled).all()) and torch.equal(scaled, scaled.round()):
            return 2.0 ** shift if float(scaled.abs().max()) <= 127 else None
    return None


def grid_multiplier(grid) -> float | None:
    """The power of two making every value of an activation :class:`~compressdit.quant.activations.Grid` an integer
    (its finest step is 2^(min_exp - mantissa); integers: 1), where the grid then spans at most +-127 (unsigned bytes
    with an offset of ``top * mult``); ``None`` otherwise."""
    integer = grid.mantissa == 30 and grid.min_exp == 30
    if not integer and not 0 <= grid.mantissa - grid.min_exp <= 9:
        return None
    mult = 1.0 if integer else 2.0 ** (grid.mantissa - grid.min_exp)
    offset = grid.top * mult
    return mult if offset <= 127 and offset == int(offset) else None


@functools.lru_cache(maxsize=None)
def _weight_values(fmt: str, w_bits: int, symmetric: bool) -> torch.Tensor | None:
    """The 16 values a 4-bit weight code of ``fmt`` stands for before its group scale (``fp32_decoding``'s table),
    where the layer stores packed nibbles and no zero point; ``None`` otherwise."""
    codes = torch.arange(16, dtype=torch.uint8)
    if fmt == "int":
        return torch.arange(16, dtype=torch.float32) - 8 if w_bits <= 4 and symmetric else None
    if fmt in FP_WEIGHT_FORMATS:
        return MINIFLOATS.get(fmt).decode(codes).float()
    if fmt in BLOCK_CODECS and BLOCK_CODECS.get(fmt).packed:
        return BLOCK_CODECS.get(fmt).element.decode(codes).float()
    return None


def _gemm_groups(spec, in_features: int) -> tuple[int, int] | None:
    """``(group, repeat)``: the GEMM's group (the narrower of the weight's and the activations' groups, the wider a
    multiple of it) and how many of them one activation group spans; ``None`` where they do not nest or the GEMM
    cannot take them (groups of a multiple of 4 inputs)."""
    w_group = spec.group_size or in_features
    a_group = spec.a_group_size if spec.a_granularity == "per_group" else in_features
    group, wide = min(w_group, a_group), max(w_group, a_group)
    if group % 4 or wide % group or in_features % wide:
        return None
    return group, a_group // group


#: the narrowest GEMM group the AVX2 path takes: per group of 16 inputs and 16 outputs a row costs it ~20
#: instructions of byte products and ~11 of epilogue (widen, convert, scale, add) against 32 fp32 FMAs. Measured with
#: AVX2 code paths on a Zen 4 EPYC (one thread): DiT-XL/2 GEMMs at M >= 512 g16 1.3-1.7x fp32 (g64 2.1x), and
#: per guided step of DiT-XL/2 (4 blocks, batch 1) `nvfp4` / `rtn-w4a4` 1.37x / 1.44x faster than fp32 on this path
#: against 0.93x / 0.95x decoded (`cpu-decoded-fp32`); on the zoo models (K = 128) g16 even with decoded (0.91-1.06
#: against 0.95-1.16 / 2 threads, noisy). Groups of 4 and 8 stay decoded.
AVX2_MIN_GROUP = 16


def integer_groups_apply(spec, shape: tuple[int, int]) -> bool:
    """Whether a CPU layer of ``spec`` and ``shape`` (out, in) runs ``cpu-int-groups`` on this machine now."""
    return _groups_applies(spec, torch.device("cpu"), shape)


def _groups_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    if device.type != "cpu" or spec.a_bits is None or spec.rotation != "none" or fast_int_path(spec):
        return False
    values, grid = _weight_values(spec.format, spec.w_bits, spec.w_symmetric), activation_grid(spec)
    w_mult = None if values is None else integer_multiplier(values)
    a_mult = None if grid is None else grid_multiplier(grid)
    groups = _gemm_groups(spec, shape[1])
    if w_mult is None or a_mult is None or groups is None:
        return False
    if group_gemm_isa() == "avx2" and groups[0] < AVX2_MIN_GROUP:
        return False
    pair = _pair_bound(grid.top * a_mult, float(values.abs().max()) * w_mult)
    return pair <= 32767 and not amx_bf16() and group_gemm_ready()


def _pair_bound(a_offset: float, w_max: float) -> float:
    """The largest 16-bit pair sum of AVX2's byte products (``vpmaddubsw``): two activation codes (up to ``2 *
    a_offset``) times two weight codes (up to ``w_max``); it must fit in 16 bits (4-bit weights: far below)."""
    return 2 * (2 * a_offset) * w_max


def pack_weight(codes: torch.Tensor, scale: torch.Tensor, group: int, offset: float, nibbles: bool = False,
                stored: torch.Tensor | None = None) -> dict:
    """int8 weight codes ``[out, in]`` and their fp32 scales ``[out, in / g]`` (groups of ``g``, a multiple of the
    GEMM's ``group``) in :func:`~compressdit.quant.cpu_native.group_gemm`'s layout (csrc/group_gemm.c): ``packed``
    (blocks of 16 output channels, four inputs of a channel together), ``corr`` (``-offset`` times each channel's
    sum of codes per group: the activation codes' offset taken back) and ``w_scale`` ``[groups, out]``, the output
    channels padded to a multiple of 32 with zero codes; ``table`` None. ``nibbles`` (codes of at most 16 distinct
    values, see :func:`nibble_table`): ``packed`` holds each code's index in ``table`` (int8 ``[16]``),
    two a byte (half a byte a weight): each pair of blocks' bytes, the first block's index in the low nibble.
    ``stored`` (the AVX512-VNNI path): the layer's own weight tensor, which the GEMM then reads as it is (no packed
    copy; a block of channels packed per call, or few rows multiplied in place) as ``packed``: ``codes`` themselves
    (int8 ``[out, in]``) or their offset nibbles (uint8 ``[out, in / 2]``, ``code + 8``, each byte's low nibble the
    even input: ``QuantLinear.offset_nibbles``). Nibbles through a table as stored: :func:`stored_nibble_weight`."""
    out_features, in_features = codes.shape
    if stored is not None:
        nibble_shape = stored.dtype is torch.uint8 and stored.shape == (out_features, in_features // 2)
        if nibbles or not (nibble_shape or (stored.dtype is torch.int8 and stored.shape == codes.shape)):
            raise ValueError(f"pack_weight: a stored weight is the int8 codes {tuple(codes.shape)} or their uint8 "
                             f"offset nibbles, not {stored.dtype} {tuple(stored.shape)}"
                             f"{' (and no nibble table)' if nibbles else ''}")
    groups = in_features // group
    sums = codes.reshape(out_features, groups, group).sum(-1, dtype=torch.int32)  # at most 127 * in
    corr, w_scale = _group_terms(sums, scale, offset, groups)
    table = None
    if stored is not None:
        return {"packed": stored.contiguous(), "corr": corr, "w_scale": w_scale, "table": None}
    padded = corr.shape[1]
    full = torch.zeros(padded, in_features, dtype=torch.int8)
    full[:out_features] = codes
    if nibbles:
        table, index = nibble_table(full)
        full = index.view(torch.int8)
    packed = full.view(padded // 16, 16, in_features // 4, 4).permute(0, 2, 1, 3).contiguous()
    if nibbles:
        pairs = packed.view(torch.uint8).view(padded // 32, 2, in_features // 4, 64)
        packed = (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()
    return {"packed": packed, "corr": corr, "w_scale": w_scale, "table": table}


def _group_terms(sums: torch.Tensor | None, scale: torch.Tensor, offset: float,
                 groups: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``corr`` and ``w_scale`` (``[groups, out]``, the channels padded to a multiple of 32) of the weight codes'
    int32 sums per GEMM group ``[out, groups]`` (None: ``corr`` None) and their fp32 scales ``[out, groups /
    repeat]``."""
    out_features = scale.shape[0]
    padded = -(-out_features // 32) * 32
    corr = None
    if sums is not None:
        corr = torch.zeros(groups, padded, dtype=torch.int32)
        corr[:, :out_features] = (-offset * sums).t().int()
    w_scale = torch.zeros(groups, padded)
    w_scale[:, :out_features] = scale.float().repeat_interleave(groups // scale.shape[1], dim=1).t()
    return corr, w_scale


#: offset nibbles' codes (``code + 8`` stored): ``nibble - 8``
OFFSET_NIBBLE_CODES = torch.arange(-8, 8, dtype=torch.int8)


def stored_nibble_weight(nibbles: torch.Tensor, table: torch.Tensor, scale: torch.Tensor, group: int,
                         offset: float, corr: bool = True) -> dict:
    """A layer's stored 4-bit weight (uint8 ``[out, in / 2]``, each byte's low nibble the even input) whose integer
    codes are ``table[nibble]`` (int8 ``[16]``: the format's values times their multiplier; offset nibbles' ``i - 8``)
    for :func:`~compressdit.quant.cpu_native.group_gemm`'s row-major path (AVX512-VNNI): ``packed`` the layer's
    own tensor (no copy: each pair of channel blocks packed through the table when its turn comes), ``corr`` and
    ``w_scale`` as :func:`pack_weight` gives them, the codes' group sums read through a 256-entry table of each
    byte's two codes (no unpacked copy of the codes); ``corr=False``: ``corr`` None, the GEMM computing each pair's
    corrections as it packs it (its calls of few rows then pack too: the in-place dot products need them given)."""
    out_features, half = nibbles.shape
    if nibbles.dtype is not torch.uint8 or table.dtype is not torch.int8 or table.shape != (16,) or half % (group // 2):
        raise ValueError(f"stored_nibble_weight: uint8 nibbles [out, in / 2] with in a multiple of {group} and an "
                         f"int8 table [16], not {nibbles.dtype} {tuple(nibbles.shape)} and {table.dtype} "
                         f"{tuple(table.shape)}")
    groups, sums = half * 2 // group, None
    if corr:
        byte = torch.arange(256)
        pair_sums = (table[byte & 15].int() + table[byte >> 4].int()).contiguous()
        sums = torch.index_select(pair_sums, 0, nibbles.reshape(-1).int())  # int32 indices: 4x faster than int64
        sums = sums.view(out_features, groups, group // 2).sum(-1, dtype=torch.int32)
    corrections, w_scale = _group_terms(sums, scale, offset, groups)
    return {"packed": nibbles.contiguous(), "corr": corrections, "w_scale": w_scale, "table": table.contiguous()}


def nibble_table(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``codes`` of at most 16 distinct values as ``(table, index)``: the values in order (int8 ``[16]``, zeros
    after the last) and each code's place in it (uint8, ``codes``' shape). Raises for more than 16 values."""
    counts = torch.bincount(codes.reshape(-1).int() + 128, minlength=256)
    present = counts.nonzero().flatten()
    if present.numel() > 16:
        raise ValueError(f"pack_weight: {present.numel()} distinct weight codes do not fit 4-bit indices")
    table = torch.zeros(16, dtype=torch.int8)
    table[:present.numel()] = (present - 128).to(torch.int8)
    places = torch.zeros(256, dtype=torch.uint8)
    places[present] = torch.arange(present.numel(), dtype=torch.uint8)
    return table, places[codes.int() + 128]


def _groups_prepack(layer) -> dict:
    spec = layer.spec
    kind, nibbles, values, scale, zero = layer.fp32_decoding()
    if kind != "nibbles" or zero is not None or values.dim() != 1:
        raise ValueError(f"cpu-int-groups: {type(layer).__name__} decodes {kind!r} codes with a zero point or tables "
                         "per row")
    w_mult = integer_multiplier(values)
    _, rule, top, mantissa, min_exp = input_grid(layer)
    mult = grid_multiplier(activation_grid(spec))
    group, repeat = _gemm_groups(spec, layer.in_features)
    table = (values * w_mult).round().to(torch.int8)
    smooth = smooth_divisor(layer)
    # the stored nibbles through the format's table: no packed copy, the corrections computed as each pair (AVX2: each
    # block) is packed (no [groups, out] int32 array: a quarter byte a weight at g16)
    weight = stored_nibble_weight(nibbles, table, scale / w_mult, group, top * mult, corr=False)
    down, up = getattr(layer, "low_rank_down", None), getattr(layer, "low_rank_up", None)
    up_t = None
    if up is not None:  # [r, out] padded as the weight's columns: added in the GEMM's blocks
        up_t = torch.zeros(up.shape[1], weight["w_scale"].shape[1])
        up_t[:, :layer.out_features] = up.detach().float().t()
    pair = _pair_bound(top * mult, max(1, int(table.abs().max())))  # AVX2: pairs summed in 16 bits, flush quads
    return {**weight, "bias": prepacked_bias(layer), "smooth": smooth, "inv": None if smooth is None else 1.0 / smooth,
            LOW_RANK: None if down is None else down.detach().float().t().contiguous(), "up_t": up_t,
            "settings": (group, repeat, rule, top, mantissa, min_exp, mult, max(1, int(32767 // pair)))}


@_define("int_groups_linear_cpu(Tensor x, Tensor? smooth, Tensor? inv, Tensor packed, Tensor? corr, Tensor w_scale, "
         "Tensor? bias, Tensor? down_t, Tensor? up_t, int group, int repeat, int rule, float top, int mantissa, "
         "int min_exp, float mult, int flush, int planes, int out_features, Tensor? table=None) -> Tensor")
def int_groups_linear_cpu(x: torch.Tensor, smooth: Optional[torch.Tensor], inv: Optional[torch.Tensor],
                         packed: torch.Tensor, corr: Optional[torch.Tensor], w_scale: torch.Tensor,
                         bias: Optional[torch.Tensor], down_t: Optional[torch.Tensor], up_t: Optional[torch.Tensor],
                         group: int, repeat: int,
                         rule: int, top: float, mantissa: int, min_exp: int, mult: float, flush: int, planes: int,
                         out_features: int, table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``q(x / smooth) @ W^T + b (+ (x / smooth) @ down_t @ up_t)``: the activations quantized per group onto their
    grid (``rule`` ... ``min_exp``, the fake quantization's, bit for bit) as integer codes (``grid_codes``), the
    weight's integer codes (:func:`pack_weight`; ``table``: as nibbles through it; ``planes=2``: 16-bit ones,
    :func:`pack_planes`; the layer's stored nibbles, :func:`stored_nibble_weight`, with ``corr`` None: the GEMM computes
    the corrections from the codes and the activations' offset ``top * mult``), one integer GEMM with both groups'
    scales in its epilogue (``group_gemm``);
    ``smooth`` / ``inv``: the balancing divisor and its reciprocal, or None; ``down_t`` / ``up_t``: SVDQuant's
    branch on the balanced rows, or None. Unbalanced rows' codes are shared with the other layers reading ``x``.
    Where :func:`~compressdit.quant.cpu_native.native_ops` builds, the same calls run in one C++ op
    (``csrc/groups_linear.cpp``: ~10 us less per call than three ctypes calls, torch.mm and four allocations), on
    ``x``'s own shape (its reshape and the output's cost ~3 us each)."""
    grid = (group * repeat, rule, top, mantissa, min_exp)
    if native_ops() and x.numel():  # the same calls in one C++ op (csrc/groups_linear.cpp), on x's own shape
        fp32 = x.dtype is torch.float32
        xf = x if fp32 and x.is_contiguous() else x.float().contiguous()
        elements = x.numel()
        kind = ("codes", grid, repeat, mult)
        kept = kept_rows(x, kind) if smooth is None else None
        gemm_threads = torch.get_num_threads() if elements * out_features > GROUP_GEMM_TEAM_MIN_WORK else 1
        out, codes, scales = torch.ops.compressdit_native.groups_linear(
            xf, smooth, inv, *(kept[:2] if kept else (None, None)), packed, corr, w_scale, bias, down_t, up_t, table,
            group * repeat, repeat, rule, top, mantissa, min_exp, mult, flush, planes, out_features,
            threads_for(elements), gemm_threads)
        if smooth is None and kept is None:
            keep_rows(x, kind, (codes, scales, None))
        return out if fp32 else out.to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype is not torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()

    def compute():
        return grid_codes(x2, smooth, inv, grid, repeat, mult)

    if smooth is None:  # the same codes for every layer reading x unbalanced
        codes, scales, balanced = shared_rows(x, ("codes", grid, repeat, mult), compute)
    else:
        codes, scales, balanced = compute()
    hidden = None if down_t is None else times_rows(x2 if balanced is None else balanced, down_t)
    out = group_gemm(codes, scales, packed, corr, w_scale, bias, out_features, hidden, up_t, flush, planes,
                     table=table, offset=int(top * mult))
    return _like_input(out, x)


@torch.library.register_fake("compressdit::int_groups_linear_cpu")
def _(x, smooth, inv, packed, corr, w_scale, bias, down_t, up_t, group, repeat, rule, top, mantissa, min_exp, mult,
      flush, planes, out_features, table=None):
    return x.new_empty(*x.shape[:-1], out_features)


def _groups_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    """On the transformed (balanced) input: no divisor, no branch (the layer adds it)."""
    return int_groups_linear_cpu(x, None, None, b["packed"], b["corr"], b["w_scale"], b["bias"], None, None,
                                *b["settings"], 1, layer.out_features, b["table"])


def _groups_run_untransformed(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    return int_groups_linear_cpu(x, b["smooth"], b["inv"], b["packed"], b["corr"], b["w_scale"], b["bias"],
                                b[LOW_RANK], b["up_t"], *b["settings"], 1, layer.out_features, b["table"])


# --- twin-log weights x low-bit activations: 16-bit weights in the same integer GEMM (AVX512-VNNI) ------------------

#: the largest 16-bit weight code: q = 256 * hi + lo with |hi| <= 127 and lo in [-128, 127] (signed bytes both)
PLANE_MAX = 32639


def _plane_sums_fit(group: int, offset: float) -> bool:
    """Whether a GEMM group's int32 sum of 16-bit weights cannot overflow: activation codes up to ``2 * offset``,
    the hi plane's sum (from its correction ``-offset * sum hi``) shifted by 8 bits, then the lo plane's."""
    hi = 3 * offset * group * 127
    return 256 * hi + 3 * offset * group * 128 < 2 ** 31


def pack_planes(weight: torch.Tensor, group: int, offset: float) -> dict:
    """An fp32 weight ``[out, in]`` of arbitrary values (twin-log's decoded tables) as 16-bit integers per output
    channel, ``q = round(w / s)`` with ``s = max |w| / PLANE_MAX`` of the channel (each weight within ``s / 2``: a
    channel's largest weight to 1.5e-5 of itself, where a bf16 copy rounds each weight to 2^-9 of itself), split
    into signed bytes ``q = 256 * hi + lo`` and packed by :func:`pack_weight` as weights of twice the inputs: each
    GEMM group's hi codes, then its lo codes (csrc/group_gemm.c, ``planes = 2``). A channel with a non-finite weight
    gets the scale NaN (its outputs NaN, as the reference's)."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    finite = torch.isfinite(w).all(1, keepdim=True)
    absmax = torch.where(finite, w.abs(), torch.zeros_like(w)).amax(1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / PLANE_MAX, torch.ones_like(absmax))
    q = torch.where(finite, w / scale, torch.zeros_like(w)).round().to(torch.int32).clamp_(-PLANE_MAX, PLANE_MAX)
    lo = torch.remainder(q + 128, 256) - 128
    hi = torch.div(q - lo, 256, rounding_mode="floor")
    groups = in_features // group
    planes = torch.stack([hi.view(out_features, groups, group), lo.view(out_features, groups, group)], 2)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return pack_weight(planes.reshape(out_features, 2 * in_features).to(torch.int8), scale, group, offset)


def _twinlog_groups_applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
    if device.type != "cpu" or spec.format != "twinlog" or spec.w_bits > 4 or spec.a_bits is None:
        return False
    grid = activation_grid(spec)
    mult = None if grid is None else grid_multiplier(grid)
    groups = _gemm_groups(spec, shape[1])
    return (mult is not None and groups is not None and _plane_sums_fit(groups[0], grid.top * mult)
            and not low_bit_bf16(spec, shape) and group_gemm_ready() and group_gemm_isa() == "avx512-vnni")


def twinlog_groups_apply(spec, shape: tuple[int, int]) -> bool:
    """Whether a CPU twin-log layer of ``spec`` and ``shape`` (out, in) runs ``cpu-twinlog-groups`` on this machine
    now: where its activations' grid takes byte codes, on AVX512-VNNI, on layers no bf16 GEMM takes
    (``cpu_dense.low_bit_bf16``: where bf16 GEMMs pay, the bf16 copy's GEMM is faster on DiT-XL/2 shapes at DiT
    token counts, ``bench/results/layer_lowbit_cpu.md``; AMX CPUs keep their microkernel on every layer)."""
    return _twinlog_groups_applies(spec, torch.device("cpu"), shape)


def _twinlog_groups_prepack(layer) -> dict:
    _, rule, top, mantissa, min_exp = input_grid(layer)
    mult = grid_multiplier(activation_grid(layer.spec))
    group, repeat = _gemm_groups(layer.spec, layer.in_features)
    return {**pack_planes(layer.dequantized_weight(torch.float32), group, top * mult), "bias": prepacked_bias(layer),
            "smooth": smooth_divisor(layer), "settings": (group, repeat, rule, top, mantissa, min_exp, mult)}


def _twinlog_groups_run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    """On the transformed (balanced, rotated) input."""
    return int_groups_linear_cpu(x, None, None, b["packed"], b["corr"], b["w_scale"], b["bias"], None, None,
                                *b["settings"], 1, 2, layer.out_features)


def _twinlog_groups_run_untransformed(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    """With the Hadamard rotation, eager: balancing, rotation and the activation codes in one C pass per row, then the
    GEMM, in one C call (each thread its own rows; a bf16 model's rows widened first: its PyTorch butterflies in bf16
    cost more than the GEMM); else the layer's transform (:func:`~compressdit.quant.cpu_dense.transformed_input`),
    then the op."""
    if (hadamard_bf16(layer, x) or x.dtype is torch.float32) and layer.spec.rotation == "hadamard":
        group, repeat, rule, top, mantissa, min_exp, mult = b["settings"]
        rows = x.reshape(-1, x.shape[-1])
        rows = rows if rows.dtype is torch.float32 and rows.is_contiguous() else rows.float().contiguous()
        out = None if torch.compiler.is_compiling() else hadamard_group_gemm(
            rows, b["smooth"], layer.rotation_signs, (group * repeat, rule, top, mantissa, min_exp), repeat, mult,
            b["packed"], b["corr"], b["w_scale"], b["bias"], layer.out_features, planes=2)
        if out is not None:
            return _like_input(out, x)
    return _twinlog_groups_run(layer, transformed_input(layer, x), b)


KERNELS.add("cpu-int8-gemm", Kernel(
    _int8_gemm_applies, _int8_gemm_prepack, _int8_gemm_run, priority=20,
    run_untransformed=_int8_gemm_run_untransformed, run_activated=_int8_gemm_run_activated,
    description=f"int8 x int8 -> int32 GEMM on the spec's dynamic symmetric activation codes (W8A8; W4A8 per "
                f"channel up to {INT8_GEMM_SMALL_WEIGHT} weights, any size on group_gemm, as int8): without AMX "
                "group_gemm (AVX512-VNNI: vpdpbusd tiles on the stored codes; AVX2: signed codes, exact vpmaddubsw "
                "products, 8-bit codes as stored, 4-bit ones packed once); on AMX-INT8 oneDNN's microkernel on codes packed once; else "
                f"torch._int_mm up to {INT8_GEMM_SMALL_WEIGHT} weights or at one row, else oneDNN's prepacked u8s8 "
                "GEMM where its sums are exact (VNNI), torch._int_mm where not"))
KERNELS.add("cpu-int8-group-gemm", Kernel(
    _int8_group_gemm_applies, _int8_group_gemm_prepack, _int8_group_gemm_run, priority=20,
    description=f"layers of up to {INT8_GEMM_SMALL_WEIGHT} weights (any size on group_gemm), symmetric int weights "
                "in groups x the spec's dynamic int8 activation codes: without AMX group_gemm's tiles, the groups' "
                "scales in them (AVX512-VNNI: the stored nibbles, half a byte a weight; AVX2: signed codes, 4-bit "
                "ones packed two a byte); else one torch._int_mm (on AMX-INT8 oneDNN's microkernel) per group "
                "(as int8, 1 byte per weight), scales in fp32"))
KERNELS.add("cpu-int-groups", Kernel(
    _groups_applies, _groups_prepack, _groups_run, priority=16, run_untransformed=_groups_run_untransformed,
    description="4-bit weights (int, NVFP4, MXFP4, 4-bit minifloats) x dynamic activations on an integer grid or a "
                "minifloat one of at most 127 steps (E2M1, E2M3) with scales per group of inputs or per token "
                "(W4A4 g16 / g64, NVFP4, FP4 x FP6), on CPUs without AMX: "
                "AVX512-VNNI's vpdpbusd (or AVX2's byte multiply-adds): "
                "the activations' grid values as byte codes (one C pass, balancing fused), one integer GEMM on the "
                "weight's stored codes (half a byte per weight; int32 sums per group, "
                "both groups' scales, the bias "
                "and an SVDQuant branch's up product in the epilogue); on AVX2 for groups of >= 16 inputs; the "
                "passes, the branch's down product and the GEMM in one C++ op where it builds"))
KERNELS.add("cpu-twinlog-groups", Kernel(
    _twinlog_groups_applies, _twinlog_groups_prepack, _twinlog_groups_run, priority=16,
    run_untransformed=_twinlog_groups_run_untransformed,
    description="twin-log weights (LRQ-DiT, 2-4 bits) x dynamic activations on an integer grid of at most 127 steps "
                "(int4 per group of 16: lrq-w4a4 / lrq-w3a4), on CPUs with AVX512-VNNI and without AMX: the decoded "
                "weight as 16-bit integers per channel (within 1.5e-5 of each channel's largest weight; 2 bytes per "
                "weight), the rotated activations' grid values as byte codes, cpu-int-groups' GEMM on two byte planes "
                "of the weight (int32 sums per group, both scales and the bias in its epilogue)"))
KERNELS.add("cpu-int4-weight", Kernel(
    _int4_applies, _int4_prepack, _int4_run, priority=10,
    description=f"_weight_int4pack_mm_for_cpu (bf16 activations, bf16 group scales) up to "
                f"{INT4_PACKED_MAX_ROWS['cpu']} rows, else dequantize to bf16 + bf16 GEMM"))
KERNELS.add("cpu-int8-weight", Kernel(
    _int8_applies, _int8_prepack, _int8_run, priority=10,
    description=f"_weight_int8pack_mm (bf16 activations) up to {INT8_MAX_ROWS} rows, else dequantize"))
KERNELS.add("cpu-vq-bf16", Kernel(
    _vq_bf16_applies, _vq_bf16_prepack, _vq_bf16_run, priority=11,
    description="VQ weight decoded once at load into bf16 where bf16 GEMMs pay (cpu_dense.bf16_layer: AMX's "
                "microkernel on small layers, torch's bf16 linear on big ones; 2 bytes per weight of RAM), bf16 "
                "activations, fp32 sums and bias"))
KERNELS.add("cpu-vq-decoded-fp32", Kernel(
    lambda spec, device, shape: device.type == "cpu" and spec.format == "vq" and per_call_shape(shape),
    per_call_prepack, per_call(_vq_run, effective_fp32), priority=10,
    description=f"VQ layers of more than {DENSE_MAX_WEIGHT} weights on CPUs without bf16 GEMMs: the weight decoded for "
                "each call by one C pass into a reused buffer (no fp32 copy kept: the codes stay packed), fp32 GEMM"))
KERNELS.add("cpu-vq-dense", Kernel(
    lambda spec, device, shape: device.type == "cpu" and spec.format == "vq" and not per_call_shape(shape),
    _vq_prepack, _vq_run, priority=10, direct=fp32_linear_direct,
    description="VQ weight decoded once at load into a dense fp32 weight (4 bytes per weight of RAM)"))
