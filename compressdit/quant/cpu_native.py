"""Fused CPU passes around the GEMMs of :mod:`compressdit.quant.cpu_kernels` and :mod:`.cpu_dense`, with PyTorch
fallbacks.

Dynamic symmetric int8 activation quantization (``s = max(amax|x|, 1e-8) / 127`` per token or per tensor,
``q = round(x / s)``) costs PyTorch eager ~7 passes and the dequantization epilogue 3 more; on the zoo models'
256 x 128 activations each pass is mostly dispatch, and together they cost more than the int8 GEMM.
``csrc/int8_rows.c`` does the same arithmetic bit for bit in one fused loop each (also per column group for
``cpu-int8-group-gemm``, and fake-quantized for the fp32 dense kernel); ``csrc/float_rows.c`` the bf16 casts
around ``cpu-int-dense-bf16``'s GEMM and ``cpu-fp8-dense``'s per-token E4M3 rounding (tested against these
functions' PyTorch path). Two GEMMs of our own join them in the same library: ``csrc/group_gemm.c``
(:func:`group_gemm`: integer codes with scales per group on both operands, AVX512-VNNI or AVX2; 16-bit weights as two
byte planes; :func:`hadamard_group_gemm` with twin-log's rotation and activation codes in the same call) and
``csrc/int4_dot.c`` (:func:`int4_dot`: weight-only int4 x bf16 rows on AVX512-BF16). All are plain C compiled once
per machine into one library with the system C compiler (``cc``, ~30 s on a 2-core EPYC:
:mod:`compressdit.native_build`) into ``$COMPRESSDIT_CACHE/native`` and called through ``ctypes``; without a
compiler, or with ``COMPRESSDIT_NATIVE_CPU=0``, the PyTorch path runs (same numbers, slower; the GEMMs' kernels are
then not chosen).

Threads: a pass over at least ``PARALLEL_MIN_ELEMENTS`` elements splits its rows over ``torch.get_num_threads()``
OpenMP threads, in the contiguous chunks torch's own ``parallel_for`` makes, on torch's own OpenMP runtime: the
library is built with ``-fopenmp`` only where torch runs on OpenMP and the ``libgomp.so.1`` it loaded is the one
the build links (checked after loading, else the single-threaded build loads: never a second thread pool). Every
row is computed alone, so the numbers do not depend on the thread count.

C++ torch ops (:func:`native_ops`, built with ``c++`` and torch's headers): ``csrc/int8_linear.cpp`` runs a whole
W8A8 layer per call on a team of torch's threads, ``csrc/groups_linear.cpp`` a whole ``cpu-int-groups`` layer
(activation codes, SVDQuant's down product, :func:`group_gemm`) per call, and on CPUs with AMX both the first
(:func:`int8_brgemm`: int8 codes) and ``csrc/bf16_gemm.cpp`` (:func:`bf16_linear`: bf16 weights, fp32 sums and
epilogue) multiply on oneDNN's BRGeMM microkernel as torch exposes it (``at::native::cpublas::brgemm``; its flash
attention's), the weight packed once into AMX's layout, without the ~10-20 us a call of torch's int8 / bf16 matmul
primitives on small layers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

import torch

from compressdit.native_build import (build_library, build_on_torch_threads, compile_flags, compiler_for,
                                      torch_op_flags)
from compressdit.quant.duquant import RotationSteps

SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("int8_rows.c", "float_rows.c", "group_gemm.c", "int4_dot.c"))
#: included by the sources (their objects' digests read them: :mod:`compressdit.native_build`)
HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in ("rows.h", "transpose.h"))
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_I64, _I32, _PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
#: argument and result types of the library's functions (``None``: returns nothing); each takes its thread count last
_SIGNATURES = {
    "compressdit_quantize_int8": ([_PTR, _PTR, _I64, _I64, _I32, _I32, _PTR, _PTR, _I32], ctypes.c_int),
    "compressdit_dequantize_int32": ([_PTR, _PTR, _PTR, _I32, _PTR, _I64, _I64, _PTR, _I32], None),
    "compressdit_scale_rows": ([_PTR, _PTR, _I32, _PTR, _I64, _I64, _PTR, _I32], None),
    "compressdit_fake_quantize_int8": ([_PTR, _I64, _I64, _I32, _PTR, _I32], ctypes.c_int),
    "compressdit_quantize_int8_groups": ([_PTR, _I64, _I64, _I64, _I32, _PTR, _PTR, _I32], None),
    "compressdit_dequantize_groups": ([_PTR, _PTR, _PTR, _I32, _PTR, _I64, _I64, _I64, _PTR, _I32], None),
    "compressdit_float_to_bf16": ([_PTR, _I64, _PTR, _I32], None),
    "compressdit_encode_nibble_codes": ([_PTR, _I64, _PTR, _I32, _PTR, _I32], None),
    "compressdit_bf16_to_float": ([_PTR, _PTR, _I64, _I64, _PTR, _I32], None),
    "compressdit_quantize_e4m3_bf16": ([_PTR, _I64, _I64, _PTR, _PTR, _I32], None),
    "compressdit_bf16_scale": ([_PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _I32], None),
    "compressdit_fake_quantize_grid": ([_PTR, _I64, _I64, _I64, _I32, ctypes.c_float, _I32, _I32, _PTR, _I32],
                                       None),
    "compressdit_gelu_tanh": ([_PTR, _I64, _PTR, _I32], None),
    "compressdit_gelu_tanh_bf16": ([_PTR, _I64, _PTR, _I32], None),
    "compressdit_hadamard_rows": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _I32, ctypes.c_float, _I32, _I32, _I64,
                                   ctypes.c_float, _PTR, _PTR, _PTR, _I32],
                                  None),
    "compressdit_hadamard_layer_new": ([_PTR, _PTR, _I64, _I64, _I32, ctypes.c_float, _I32, _I32], _PTR),
    "compressdit_hadamard_layer_rows": ([_PTR, _PTR, _I64, _PTR, _I32], None),
    "compressdit_duquant_layer_new": ([_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _I32, ctypes.c_float, _I32,
                                       _I32], _PTR),
    "compressdit_duquant_layer_rows": ([_PTR, _PTR, _I64, _PTR, _I32], ctypes.c_int),
    "compressdit_layer_free": ([_PTR], None),
    "compressdit_grid_tensor_scale": ([_PTR, _PTR, _I64, _I64, ctypes.c_float, _I32], ctypes.c_float),
    "compressdit_divide_rows": ([_PTR, _PTR, _PTR, _I64, _I64, _PTR, ctypes.c_float, _I32], ctypes.c_float),
    "compressdit_times_rows": ([_PTR, _I64, _I64, _PTR, _I64, _PTR, _I32], None),
    "compressdit_balance_grid_rows": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _I32, ctypes.c_float, _I32, _I32,
                                       ctypes.c_float, _PTR, _PTR, _I64, _I32], None),
    "compressdit_grid_rows_bf16": ([_PTR, _I64, _I64, _I64, _I32, ctypes.c_float, _I32, _I32, ctypes.c_float, _PTR,
                                    _PTR, _I64, _I32], None),
    "compressdit_split_rows_bf16": ([_PTR, _I64, _I64, _PTR, _I64, _I32], None),
    "compressdit_dequantize_nibbles_bf16": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _I32], None),
    "compressdit_dequantize_nibbles_f32": ([_PTR, _PTR, _I32, _PTR, _PTR, _I64, _I64, _I64, _PTR, _I32], None),
    "compressdit_dequantize_bytes_f32": ([_PTR, _PTR, _PTR, _I64, _I64, _PTR, _I32], None),
    "compressdit_vq_decode_f32": ([_PTR, _I64, _I32, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I32], None),
    "compressdit_quantize_e4m3_bf16_rows": ([_PTR, _I64, _I64, _PTR, _PTR, _I32], None),
    "compressdit_bf16_scale_bf16": ([_PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _I32], None),
    "compressdit_grid_codes_rows": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I32, ctypes.c_float, _I32, _I32,
                                     ctypes.c_float, ctypes.c_float, _PTR, _PTR, _PTR, _I32], None),
    "compressdit_group_gemm_ready": ([], ctypes.c_int),
    "compressdit_hadamard_group_gemm": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I32, ctypes.c_float, _I32, _I32,
                                         ctypes.c_float, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _I32],
                                        ctypes.c_int),
    "compressdit_int4_dot_ready": ([], ctypes.c_int),
    "compressdit_int4_dot": ([_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I32, _PTR, _I32],
                             ctypes.c_int),
    "compressdit_group_gemm": ([_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64,
                                _I64, _I32, _PTR, _I32, _I32, _PTR, _I32], ctypes.c_int),
}
#: elements from which a pass runs on torch's intra-op threads (below, one thread; see ``threads_for``). On the
#: 2-core EPYC of bench/results/e2e_speed_cpu.md: 256 x 128 quantization 12.4 -> 10.7 us, the E4M3 pass 13.1 -> 10.1
#: us on two threads; 16 x 128 passes lose ~1 us to a second thread. In a zoo step, 2^12, 2^14 and 2^15 + 1 measured
#: within noise: the row split matters more than the threshold (see cpu_kernels.SERIAL_GEMM_WORK)
PARALLEL_MIN_ELEMENTS = 1 << 14


@functools.lru_cache(maxsize=None)
def native_library() -> ctypes.CDLL | None:
    """The compiled fused loops, built on first use; ``None`` where disabled or no C compiler works. Threaded
    (``lib.openmp``) on torch's own OpenMP runtime only (:func:`~compressdit.native_build.build_on_torch_threads`)."""
    if os.environ.get("COMPRESSDIT_NATIVE_CPU", "1") == "0" or compiler_for(SOURCES[0]) is None or not all(
            source.exists() for source in SOURCES + HEADERS):
        return None
    lib = build_on_torch_threads("cpu_rows", list(SOURCES))
    if lib is None:
        return None
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    return lib


OP_SOURCES = tuple(Path(__file__).with_name("csrc") / name
                   for name in ("int8_linear.cpp", "bf16_gemm.cpp", "groups_linear.cpp")) + SOURCES
OP_HEADERS = (*HEADERS, *(Path(__file__).with_name("csrc") / name for name in ("team.h", "microkernel.h")))
#: multiply-adds from which the fused op of OP_SOURCES splits a layer's rows over torch's threads (one team); below,
#: one thread does it all (cpu_kernels.INT8_GEMM_SERIAL_WORK's measurements). The same op for FP8's fp32 GEMMs (per-token
#: E4M3 rows and at::addmm per block on the team, or on torch's threads) measured slower in the zoo models' steps than
#: the Python path (dit-fmnist fp8 at two threads 1.14-1.15x float against 1.11x): not built
TEAM_MIN_WORK = 1 << 21
#: the same for :func:`group_gemm`, whose channel blocks split with little overhead: DiT-XL/2's 1152 -> 1152 W8A8 at
#: one row, two threads, 23 us against 32 on one (Zen 4; 128-wide layers at 16 rows no faster split finer)
GROUP_GEMM_TEAM_MIN_WORK = 1 << 19


@functools.lru_cache(maxsize=None)
def native_ops() -> bool:
    """Whether ``torch.ops.compressdit_native`` (``csrc/int8_linear.cpp`` ..., built with the system C++ compiler on
    first use: ~25 s more, the C objects being :func:`native_library`'s) is loaded; False where :func:`native_library`
    is off or unavailable, or no C++ compiler builds it (the Python path of the same numbers runs). Threaded on torch's
    OpenMP runtime only, as :func:`native_library`."""
    if native_library() is None or compiler_for(OP_SOURCES[0]) is None or not all(
            path.exists() for path in OP_SOURCES + OP_HEADERS):
        return False
    if hasattr(torch.ops.compressdit_native, "int8_group_linear"):  # loaded already (e.g. from another cache folder):
        return True  # a second copy would register the ops twice, which aborts the process
    cxx_flags, libraries = torch_op_flags()
    lib = build_library("cpu_ops", list(OP_SOURCES), compile_flags(native_library().openmp), cxx_flags, libraries)
    return lib is not None and hasattr(torch.ops.compressdit_native, "int8_group_linear")


def _microkernels_allowed(capability: str) -> bool:
    """The CPU has ``capability`` (``amx_bf16``, ``amx_int8``) and ``COMPRESSDIT_CPU_MICROKERNELS`` is not ``0`` (which
    keeps the fp32 / ``torch._int_mm`` kernels: the reference's numbers up to summation order, no bf16 rounding)."""
    if os.environ.get("COMPRESSDIT_CPU_MICROKERNELS", "1") == "0":
        return False
    return bool(torch._C._cpu._get_cpu_capability().get(capability, False))


@functools.lru_cache(maxsize=None)
def bf16_brgemm() -> bool:
    """Whether bf16 GEMMs run on oneDNN's BRGeMM microkernel here (``csrc/bf16_gemm.cpp``'s :func:`bf16_linear`):
    CPUs with AMX-BF16, where torch has the microkernel and :func:`native_ops` built (not with
    ``COMPRESSDIT_CPU_MICROKERNELS=0``, read once per process)."""
    if not _microkernels_allowed("amx_bf16") or not native_ops():
        return False
    if not torch.ops.compressdit_native.bf16_brgemm_ready():
        return False
    # torch.compile traces the op as one opaque node
    torch.library.register_fake("compressdit_native::bf16_linear")(_bf16_linear_fake)
    return True


def _bf16_linear_fake(x, packed, out_features, bias, row_scale, col_scale, threads, *transform):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def int8_brgemm() -> bool:
    """Whether ``csrc/int8_linear.cpp``'s op runs its int8 GEMMs on oneDNN's BRGeMM microkernel here (codes packed
    by :func:`int8_pack`): CPUs with AMX-INT8, where torch has the microkernel and :func:`native_ops` built (not with
    ``COMPRESSDIT_CPU_MICROKERNELS=0``; the numbers are the same either way)."""
    if not _microkernels_allowed("amx_int8") or not native_ops():
        return False
    return bool(torch.ops.compressdit_native.int8_brgemm_ready())


def int8_pack(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[out, in]`` (``in`` a multiple of 4) packed for the int8 op's microkernel (AMX's layout, 64
    output channels a block); where :func:`int8_brgemm`."""
    return torch.ops.compressdit_native.int8_pack(codes.detach().contiguous())


def bf16_pack(weight: torch.Tensor) -> torch.Tensor:
    """A weight ``[out, in]`` (fp32 or bf16, ``in`` even) rounded to bf16 and packed for :func:`bf16_linear` (AMX's
    layout, 64 output channels a block); where :func:`bf16_brgemm`."""
    return torch.ops.compressdit_native.bf16_pack(weight.detach())


def bf16_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                row_scale: torch.Tensor | None = None, col_scale: torch.Tensor | None = None,
                transform: tuple = (), down: torch.Tensor | None = None) -> torch.Tensor:
    """``(bf16(t(x)) @ W^T) * row_scale[:, None] * col_scale + bias`` in fp32 for contiguous fp32 or bf16 rows ``x``
    ``[rows, in]`` and ``packed`` = :func:`bf16_pack` (W); the scales and bias optional contiguous fp32 vectors. One
    call: the activations rounded to bf16 (half to even) and the epilogue inside the GEMM's blocks, the sums in fp32
    (not rounded to bf16); rows (or, for few, column blocks) over torch's threads from ``TEAM_MIN_WORK``
    multiply-adds. ``transform`` (fp32 ``x`` only): ``(smooth, signs, group, rule, top, mantissa, min_exp)``, what
    each thread's rows go through first, bit for bit as :func:`hadamard_rows` (``signs`` given; ``smooth`` optional)
    or as ``x / smooth`` (``smooth`` without ``signs``) then :func:`fake_quantize_grid` (``group`` > 0), then rounded.
    ``down`` (fp32 ``x``, no scales, no ``signs``): :func:`bf16_pack` of SVDQuant's down factor ``D`` ``[r, in]``, with
    ``packed`` that of ``[W | U_hi | U_hi | U_lo]`` (``U`` ``[out, r]`` in two bf16 terms): ``h @ U^T`` with
    ``h = bf16(x / smooth) @ bf16(D)^T`` (fp32 sums) is added to the output in the same product, a bf16x3 one (``h``
    and ``U`` in two bf16 terms each: ~16 significant bits)."""
    threads = 0 if x.shape[0] * x.shape[1] * out_features > TEAM_MIN_WORK else 1  # 0: torch's count, read by the op
    if down is not None and not transform:
        transform = (None, None, 0, 0, 0.0, 0, 0)
    return torch.ops.compressdit_native.bf16_linear(x, packed, out_features, bias, row_scale, col_scale, threads,
                                                    *transform, *(() if down is None else (down,)))


def threads_for(elements: int) -> int:
    """The threads a pass over ``elements`` elements runs on: torch's intra-op count from
    ``PARALLEL_MIN_ELEMENTS`` on, else one."""
    return torch.get_num_threads() if elements >= PARALLEL_MIN_ELEMENTS else 1


def times_rows(b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``b @ d`` for fp32 rows ``b`` [rows, cols] and ``d`` [cols, rank] (SVDQuant's down product on balanced rows):
    each output the sum over the columns in order, a fused multiply-add a term (``csrc/float_rows.c``, ~2x faster
    than torch.mm's MKL call at rank 16; the C++ op's same function); ``torch.mm`` without the library."""
    lib = native_library()
    if lib is None or b.dim() != 2 or d.dim() != 2 or not _takes(b, d) or b.shape[1] != d.shape[0]:
        return torch.mm(b, d)
    rows, cols = b.shape
    h = torch.empty(rows, d.shape[1])
    lib.compressdit_times_rows(b.data_ptr(), rows, cols, d.data_ptr(), d.shape[1], h.data_ptr(), threads_for(b.numel()))
    return h


def _takes(*tensors: torch.Tensor | None) -> bool:
    """Every tensor a contiguous fp32 CPU tensor (or ``None``): what the C loops read."""
    for t in tensors:  # a loop, not all() over a generator: this runs several times per layer call
        if t is not None and not (t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()):
            return False
    return True


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _lib_for(*tensors: torch.Tensor | None) -> ctypes.CDLL | None:
    return None if torch.compiler.is_compiling() or not _takes(*tensors) else native_library()


_UNSHARED = threading.local()


@contextlib.contextmanager
def rows_unshared():
    """Within: :func:`keep_rows` keeps nothing and :func:`kept_rows` finds nothing. For op impls that a compiled graph
    calls: its tensors' version counters do not move when inductor's kernels write them, and it hands one tensor object
    to several intermediates in turn (its buffer reuse), so rows kept on one would be read for another (stale codes:
    wrong outputs, and reads past a smaller tensor's end)."""
    previous = getattr(_UNSHARED, "on", False)
    _UNSHARED.on = True
    try:
        yield
    finally:
        _UNSHARED.on = previous


def _sharing_off(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or getattr(_UNSHARED, "on", False) or x.is_inference()


def kept_rows(x: torch.Tensor, kind: tuple) -> Any:
    """What :func:`keep_rows` kept on ``x`` for ``kind``, while ``x`` is unchanged since; ``None`` otherwise."""
    if _sharing_off(x):
        return None
    kept = getattr(x, "_compressdit_rows", None)
    return kept[2] if kept is not None and kept[0] == kind and kept[1] == x._version else None


def keep_rows(x: torch.Tensor, kind: tuple, value: Any) -> None:
    """Keep ``value``, the quantized rows of a layer's input ``x`` (``kind`` says how they were quantized), on ``x``
    itself for the next layer that reads the same tensor the same way: the query, key and value projections of an
    attention (and a FLUX single-stream block's MLP) quantize one input, with dynamic scales and no per-layer transform
    the same numbers each time. Kept while ``x`` lives and is not written to (its version counter); never for
    inference-mode tensors (no version counter), under ``torch.compile`` or within :func:`rows_unshared` (an op impl a
    compiled graph runs). Readers only read it."""
    if not _sharing_off(x):
        x._compressdit_rows = (kind, x._version, value)


def shared_rows(x: torch.Tensor, kind: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, the quantized rows of ``x``, or what an earlier layer kept of them (:func:`keep_rows`)."""
    kept = kept_rows(x, kind)
    if kept is None:
        kept = compute()
        keep_rows(x, kind, kept)
    return kept


def quantize_rows_int8(x: torch.Tensor, per_token: bool, offset: int = 0,
                       smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` ``[rows, cols]`` (divided by ``smooth`` ``[cols]`` first, as the layer's balancing does) ->
    int8 codes ``round(x / s)`` (+ ``offset``: 128 gives oneDNN's uint8 codes, returned as ``uint8``) and the
    fp32 scales ``s = max(amax|x|, 1e-8) / 127``, ``[rows, 1]`` (per token) or ``[1, 1]``."""
    lib = None if torch.compiler.is_compiling() or not _takes(x, smooth) else native_library()
    rows, cols = x.shape
    if lib is not None:
        q = torch.empty(rows, cols, dtype=torch.uint8 if offset else torch.int8)
        scale = torch.empty(rows if per_token else 1, 1)
        if not lib.compressdit_quantize_int8(x.data_ptr(), _ptr(smooth), rows, cols, per_token, offset,
                                             q.data_ptr(), scale.data_ptr(), threads_for(rows * cols)):
            return q, scale
    if smooth is not None:
        x = x / smooth
    magnitude = x.abs()
    scale = magnitude.amax(-1, keepdim=True) if per_token else magnitude.amax().reshape(1, 1)
    scale = scale.clamp_min_(1e-8).div_(127)
    q = (x / scale).round_().to(torch.int8)  # |x / s| <= 127
    return (q.view(torch.uint8).add_(offset) if offset else q), scale


def fake_quantize_rows_int8(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """fp32 ``x`` ``[rows, cols]`` -> ``round(x / s) * s`` with :func:`quantize_rows_int8`'s scales: dynamic
    symmetric int8 activations fake-quantized, in one C call (PyTorch ops without the library)."""
    lib = _lib_for(x)
    if lib is not None and x.dim() == 2:
        out = torch.empty_like(x)
        if not lib.compressdit_fake_quantize_int8(x.data_ptr(), x.shape[0], x.shape[1], per_token, out.data_ptr(),
                                                  threads_for(x.numel())):
            return out
    magnitude = x.abs()
    scale = (magnitude.amax(-1, keepdim=True) if per_token else magnitude.amax()).clamp_min_(1e-8).div_(127)
    return (x / scale).round_().mul_(scale)


def quantize_rows_int8_groups(x: torch.Tensor, per_token: bool, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows_int8`'s codes of fp32 ``x`` ``[rows, cols]`` laid out per column group,
    ``[cols / group, rows, group]`` (each group's codes contiguous, for one GEMM per group), and its scales."""
    lib = _lib_for(x)
    if lib is None:
        q, scale = quantize_rows_int8(x, per_token)
        return q.view(x.shape[0], -1, group).transpose(0, 1).contiguous(), scale
    rows, cols = x.shape
    q, scale = torch.empty(cols // group, rows, group, dtype=torch.int8), torch.empty(rows if per_token else 1, 1)
    lib.compressdit_quantize_int8_groups(x.data_ptr(), rows, cols, group, per_token, q.data_ptr(), scale.data_ptr(),
                                         threads_for(rows * cols))
    return q, scale


def dequantize_groups(acc: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``(sum_g acc[g] * w_scale[g]) * a_scale (+ bias)`` in fp32, the groups added in order: int32 ``acc``
    ``[groups, rows, cols]``, ``w_scale`` ``[groups, cols]``, ``a_scale`` ``[rows, 1]`` or ``[1, 1]``."""
    lib = _lib_for(w_scale, a_scale, bias)
    if lib is None or not acc.is_contiguous():
        out = acc[0].float().mul_(w_scale[0])
        for g in range(1, acc.shape[0]):
            out.addcmul_(acc[g], w_scale[g])
        return out.mul_(a_scale) if bias is None else torch.addcmul(bias, out, a_scale)
    groups, rows, cols = acc.shape
    out = torch.empty(rows, cols)
    lib.compressdit_dequantize_groups(acc.data_ptr(), w_scale.data_ptr(), a_scale.data_ptr(), a_scale.shape[0] > 1,
                                      _ptr(bias), groups, rows, cols, out.data_ptr(), threads_for(acc.numel()))
    return out


def dequantize_int32_(acc: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``acc * w_scale * a_scale (+ bias)`` in fp32: int32 ``acc`` ``[rows, cols]``, ``w_scale`` ``[cols]``,
    ``a_scale`` ``[rows, 1]`` or ``[1, 1]``, ``bias`` ``[cols]`` or ``None``. The C loop writes the fp32 result
    over ``acc``'s own memory (returned as its fp32 view): pass an accumulator nothing else reads."""
    lib = None if torch.compiler.is_compiling() or not _takes(w_scale, a_scale, bias) else native_library()
    if lib is None or acc.dtype is not torch.int32 or not acc.is_contiguous() or acc.dim() != 2:
        out = acc.float().mul_(w_scale)
        return out.mul_(a_scale) if bias is None else torch.addcmul(bias, out, a_scale)
    rows, cols = acc.shape
    pointer = acc.data_ptr()
    lib.compressdit_dequantize_int32(pointer, w_scale.data_ptr(), a_scale.data_ptr(), a_scale.shape[0] > 1,
                                     _ptr(bias), rows, cols, pointer, threads_for(rows * cols))
    return acc.view(torch.float32)


def scale_rows_(acc: torch.Tensor, a_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``acc * a_scale (+ bias)`` for fp32 ``acc`` (a GEMM that applied the weight scales), in place."""
    lib = None if torch.compiler.is_compiling() or not _takes(acc, a_scale, bias) else native_library()
    if lib is None:
        return acc.mul_(a_scale) if bias is None else torch.addcmul(bias, acc, a_scale)
    lib.compressdit_scale_rows(acc.data_ptr(), a_scale.data_ptr(), a_scale.shape[0] > 1, _ptr(bias), acc.shape[0],
                               acc.shape[1], acc.data_ptr(), threads_for(acc.numel()))
    return acc


# --- the dense float kernels' passes (csrc/float_rows.c) ---------------------------------------------------

def float_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x.to(torch.bfloat16)`` (round half to even; NaN as torch's vectorized cast) in one pass."""
    lib = _lib_for(x)
    if lib is None:
        return x.to(torch.bfloat16)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    lib.compressdit_float_to_bf16(x.data_ptr(), x.numel(), out.data_ptr(), threads_for(x.numel()))
    return out


def encode_nibble_codes(x: torch.Tensor, bounds: torch.Tensor, sign_bit: int) -> torch.Tensor | None:
    """``Minifloat.encode`` of a finite fp32 ``x`` in a 4-bit format (``bounds``: its 7 tie-adjusted midpoints, fp32,
    ascending; ``sign_bit``: its sign's bit) as uint8 codes of ``x``'s shape, in one C pass; ``None`` without the
    library (or for another layout: the caller's PyTorch path, whose codes these are)."""
    lib = _lib_for(x, bounds)
    if lib is None or bounds.numel() != 7:
        return None
    out = torch.empty(x.shape, dtype=torch.uint8)
    lib.compressdit_encode_nibble_codes(x.data_ptr(), x.numel(), bounds.data_ptr(), sign_bit, out.data_ptr(),
                                        threads_for(x.numel()))
    return out


def bf16_to_float(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y.float() (+ bias)`` for a 2-D bf16 ``y`` ``[rows, cols]`` and an fp32 ``bias`` ``[cols]``, one pass."""
    lib = _lib_for(bias)
    if lib is None or y.dtype is not torch.bfloat16 or not y.is_contiguous() or y.dim() != 2:
        out = y.float()
        return out if bias is None else out.add_(bias)
    out = torch.empty(y.shape, dtype=torch.float32)
    lib.compressdit_bf16_to_float(y.data_ptr(), _ptr(bias), y.shape[0], y.shape[1], out.data_ptr(),
                                  threads_for(y.numel()))
    return out


def round_to_e4m3(q: torch.Tensor) -> torch.Tensor:
    """fp32 ``q`` (within +-448) rounded to its nearest E4M3 value, ties to even: ``q.to(float8_e4m3fn).float()``
    bit for bit (tested), in fp32 arithmetic: CPUs convert to and from float8 one element at a time (~8x slower)."""
    bits = q.view(torch.int32)  # normal range: round the 23-bit mantissa to 3 bits, carrying into the exponent
    normal = ((bits >> 20) & 1).add_(bits).add_(0x7FFFF).bitwise_and_(-(1 << 20)).view(torch.float32)
    subnormal = (q * 512).round_().div_(512)  # below 2^-6: a fixed step of 2^-9
    return torch.where(q.abs() < 2.0 ** -6, subnormal, normal)


def fake_quantize_e4m3_rows(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token E4M3 activations of an fp32 ``x`` (rows along its last dimension), fake-quantized as the FP8
    reference does them: ``s = max(amax|x|, 1e-8) / 448`` per row, ``e4m3(clamp(x / s, -448, 448)) * s``; one
    pass per row in C (the grid pass of :func:`fake_quantize_grid` on E4M3's grid)."""
    out = None if x.dim() == 0 else fake_quantize_grid(x, x.shape[-1], 0, E4M3_MAX, 3, -6)
    if out is None:
        codes, scale = _e4m3_codes(x)
        return codes.mul_(scale)
    return out


def _e4m3_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token E4M3 passes in PyTorch: the E4M3 values of ``clamp(x / s, -448, 448)`` (fp32) and the row scales
    ``s = max(amax|x|, 1e-8) / 448`` (``[..., 1]``)."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min_(1e-8).div_(E4M3_MAX)
    return round_to_e4m3((x / scale).clamp_(-E4M3_MAX, E4M3_MAX)), scale


def fake_quantize_grid(x: torch.Tensor, group: int, rule: int, top: float, mantissa: int,
                       min_exp: int) -> torch.Tensor | None:
    """Dynamic per-group fake quantization of an fp32 ``x`` (rows along its last dimension, ``group`` dividing it)
    onto an integer or minifloat grid, one C pass (``compressdit_fake_quantize_grid`` in csrc/float_rows.c says
    the ``rule`` of the scales: 0 absmax / top, 1 MX power of two, 2 NVFP4); ``None`` without the library (the
    caller runs the PyTorch quantizer, whose numbers these are)."""
    lib = _lib_for(x)
    if lib is None or x.dim() == 0 or x.numel() == 0 or x.shape[-1] % group:
        return None
    out = torch.empty_like(x)
    lib.compressdit_fake_quantize_grid(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], group, rule, top,
                                       mantissa, min_exp, out.data_ptr(), threads_for(x.numel()))
    return out


def branch_rows(x: torch.Tensor, smooth: torch.Tensor | None, inv: torch.Tensor | None, down_t: torch.Tensor,
                grid: tuple | None, split: bool) -> torch.Tensor | None:
    """SVDQuant's GEMM input for a layer whose weight is laid out ``[W | U]`` (fp32) or ``[W | U_hi | U_hi | U_lo]``
    (bf16, ``split``): for contiguous fp32 rows ``x`` ``[rows, in]``, the balanced rows ``b = x / smooth`` (bit for bit
    as torch's division, from ``inv = 1 / smooth``; ``smooth`` None: ``b = x``) quantized by :func:`fake_quantize_grid`'s
    pass (``grid`` its ``(group, rule, top, mantissa, min_exp)``, NVFP4's tensor scale over ``b``; ``None``: ``b``
    itself), and beside them the branch's hidden rows ``h = b @ down_t`` (``down_t`` fp32 ``[in, r]``, fp32 sums):
    fp32 ``[rows, in + r]`` = ``[q | h]``, or with ``split`` bf16 ``[rows, in + 3r]`` = ``[bf16(q) | h_hi | h_lo |
    h_hi]`` (``h`` in two bf16 terms: the bf16x3 product of :func:`bf16_linear`'s branch). One C pass for the division
    and quantization, one GEMM for ``h``; ``None`` without the library or under ``torch.compile``."""
    lib = _lib_for(x, smooth, inv, down_t)
    if lib is None or x.dim() != 2 or (grid is not None and x.shape[1] % grid[0]):
        return None
    rows, cols = x.shape
    rank = down_t.shape[1]
    group, rule, top, mantissa, min_exp = grid or (0, 0, 0.0, 0, 0)
    threads = threads_for(x.numel())
    t = lib.compressdit_grid_tensor_scale(x.data_ptr(), _ptr(smooth), rows, cols, top, threads) if rule == 2 else 1.0
    balanced = x if smooth is None else torch.empty_like(x)
    if not split:
        out = torch.empty(rows, cols + rank)
        lib.compressdit_balance_grid_rows(x.data_ptr(), _ptr(smooth), _ptr(inv), rows, cols, group, rule, top,
                                          mantissa, min_exp, t, balanced.data_ptr(), out.data_ptr(), cols + rank,
                                          threads)
        torch.mm(balanced, down_t, out=out[:, cols:])
        return out
    if smooth is not None:  # the division alone: h reads it before its quantization
        lib.compressdit_divide_rows(x.data_ptr(), smooth.data_ptr(), inv.data_ptr(), rows, cols, balanced.data_ptr(),
                                    top, threads)
    hidden = torch.mm(balanced, down_t)
    out = torch.empty(rows, cols + 3 * rank, dtype=torch.bfloat16)
    work = (torch.empty_like(x) if smooth is None else balanced) if group else x  # the grid values (fp32) if any
    lib.compressdit_grid_rows_bf16(balanced.data_ptr(), rows, cols, group, rule, top, mantissa, min_exp, t,
                                   work.data_ptr(), out.data_ptr(), cols + 3 * rank, threads)
    lib.compressdit_split_rows_bf16(hidden.data_ptr(), rows, rank, out.data_ptr() + 2 * cols, cols + 3 * rank,
                                    threads_for(hidden.numel()))
    return out


def grid_rows_bf16_(x: torch.Tensor, group: int, rule: int, top: float, mantissa: int,
                    min_exp: int) -> torch.Tensor | None:
    """:func:`fake_quantize_grid` of a contiguous fp32 ``x`` ``[rows, cols]`` rounded to bf16, in one pass that uses
    ``x`` as its work memory (overwritten with the fp32 grid values): the bf16 GEMM input of a bf16 model's rows
    widened into ``x``. ``None`` without the library or under ``torch.compile``."""
    lib = _lib_for(x)
    if lib is None or x.dim() != 2 or x.shape[1] % group:
        return None
    rows, cols = x.shape
    threads = threads_for(x.numel())
    t = lib.compressdit_grid_tensor_scale(x.data_ptr(), None, rows, cols, top, threads) if rule == 2 else 1.0
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    lib.compressdit_grid_rows_bf16(x.data_ptr(), rows, cols, group, rule, top, mantissa, min_exp, t, x.data_ptr(),
                                   out.data_ptr(), cols, threads)
    return out


@functools.lru_cache(maxsize=None)
def group_gemm_isa() -> str | None:
    """The path :func:`group_gemm` runs here: ``"avx512-vnni"`` (the library built with AVX-512, the vector ISA torch
    runs, on a CPU with AVX512-VNNI), ``"avx2"`` (byte multiply-adds into 16-bit pairs, then 32-bit sums), or
    ``None`` (no library, or neither)."""
    lib = native_library()
    return None if lib is None else {2: "avx512-vnni", 1: "avx2"}.get(lib.compressdit_group_gemm_ready())


@functools.lru_cache(maxsize=None)
def int4_dot_ready() -> bool:
    """Whether :func:`int4_dot` runs here: the library built with AVX-512 (the vector ISA torch runs) on a CPU with
    AVX512-BF16 (Zen 4, Cooper Lake and AMX Xeons)."""
    lib = native_library()
    return lib is not None and bool(lib.compressdit_int4_dot_ready())


def int4_dot(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zz: torch.Tensor, bias: torch.Tensor | None,
             out_features: int, group: int) -> torch.Tensor | None:
    """Weight-only int4 for few rows (csrc/int4_dot.c): contiguous bf16 rows ``x`` ``[rows, in]`` times the codes
    packed by ``cpu_kernels.pack_int4_dot`` (``packed``) with their fp32 group scales and zero terms (``scale``, ``zz``:
    ``[in / group, out]`` padded to 16 channels), or times a layer's stored offset nibbles ``[out_features, in / 2]``
    (``packed`` of two dimensions) with ``scale`` and ``zz`` ``[out_features, in / group]`` (``cpu_kernels
    .stored_int4_dot``: from 5 rows each block of 16 channels packed when its turn comes, the same numbers bit for
    bit; up to 4 rows each channel's row read in place, the same sums in another order), plus ``bias`` (fp32 or None):
    fp32 ``[rows, out_features]``;
    where :func:`int4_dot_ready` (``None`` without the library: the caller's other paths run). Channel blocks over
    torch's threads from ``TEAM_MIN_WORK`` multiply-adds."""
    lib = native_library()
    if lib is None:
        return None
    rows, cols = x.shape
    out = torch.empty(rows, out_features)
    threads = torch.get_num_threads() if rows * cols * out_features > TEAM_MIN_WORK else 1
    row_major = packed.dim() == 2
    if row_major and (packed.dtype is not torch.uint8 or tuple(packed.shape) != (out_features, cols // 2)
                      or not packed.is_contiguous() or tuple(scale.shape) != (out_features, cols // group)
                      or zz.shape != scale.shape):
        raise ValueError(f"int4_dot: stored nibbles must be contiguous uint8 [{out_features}, {cols // 2}] with scales "
                         f"[{out_features}, {cols // group}], got {packed.dtype} {tuple(packed.shape)} and "
                         f"{tuple(scale.shape)}")
    if lib.compressdit_int4_dot(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), zz.data_ptr(), _ptr(bias), rows,
                                out_features, cols, group, int(row_major), out.data_ptr(), threads):
        raise RuntimeError("int4_dot: no AVX512-BF16 path on this CPU (see int4_dot_ready)")
    return out


def group_gemm_ready() -> bool:
    """Whether :func:`group_gemm` runs here (:func:`group_gemm_isa`)."""
    return group_gemm_isa() is not None


def grid_codes(x: torch.Tensor, smooth: torch.Tensor | None, inv: torch.Tensor | None, grid: tuple, repeat: int,
               mult: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The integer GEMM's activations (:func:`group_gemm`): contiguous fp32 rows ``x`` ``[rows, cols]`` divided by
    ``smooth`` (``inv = 1 / smooth``; ``None``: not balanced) and quantized as :func:`fake_quantize_grid` (``grid``
    its ``(group, rule, top, mantissa, min_exp)``; NVFP4's tensor scale over the balanced rows), as ``(codes, scales,
    balanced)``: uint8 codes ``value * mult + top * mult`` (``mult`` a power of two making the grid's values
    integers), fp32 scales ``s / mult`` ``[rows, cols / group * repeat]`` (each group's ``repeat`` times: the GEMM's
    narrower groups) and the balanced fp32 rows (``None`` without ``smooth``: ``x`` itself, not kept here, as what
    :func:`keep_rows` keeps on ``x`` must not hold ``x``). ``None`` without the library or under ``torch.compile``."""
    lib = _lib_for(x, smooth, inv)
    group, rule, top, mantissa, min_exp = grid
    if lib is None or x.dim() != 2 or x.shape[1] % group:
        return None
    rows, cols = x.shape
    threads = threads_for(x.numel())
    balanced = None if smooth is None else torch.empty_like(x)
    t = 1.0
    if rule == 2 and smooth is not None:  # NVFP4's tensor scale reads every balanced row first: divided once, its
        # maxima found as it writes them
        t = lib.compressdit_divide_rows(x.data_ptr(), smooth.data_ptr(), inv.data_ptr(), rows, cols,
                                        balanced.data_ptr(), top, threads)
        x, smooth, inv = balanced, None, None
    elif rule == 2:
        t = lib.compressdit_grid_tensor_scale(x.data_ptr(), None, rows, cols, top, threads)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales = torch.empty(rows, cols // group * repeat)
    lib.compressdit_grid_codes_rows(x.data_ptr(), _ptr(smooth), _ptr(inv), rows, cols, group, repeat, rule, top,
                                    mantissa, min_exp, t, mult, _ptr(balanced), codes.data_ptr(),
                                    scales.data_ptr(), threads)
    return codes, scales, balanced


def group_gemm(codes: torch.Tensor, scales: torch.Tensor, packed: torch.Tensor, corr: torch.Tensor | None,
               w_scale: torch.Tensor, bias: torch.Tensor | None, out_features: int, hidden: torch.Tensor | None = None,
               up: torch.Tensor | None = None, flush: int = 1, planes: int = 1,
               row_group: int | None = None, table: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor | None:
    """``out[i, n] = sum_g (sum_{k in g} codes[i, k] * w[n, k]) * scales[i, g] * w_scale[g, n] + bias[n]`` (fp32
    ``[rows, out_features]``, the inner sums exact in int32) from :func:`grid_codes`' codes and scales and a weight
    packed by ``cpu_kernels.pack_weight`` (``packed``, ``corr``, ``w_scale``: see csrc/group_gemm.c), plus ``hidden @
    up`` where given (SVDQuant's branch: fp32 ``[rows, r]`` and ``[r, out]`` padded like ``w_scale``) in the same
    blocks; where :func:`group_gemm_ready`. ``flush``: on the AVX2 path, how many quads of inputs are summed in 16 bits
    before widening (``flush * 2 * max code * max |weight code| < 2^15``: see ``cpu_kernels.pack_weight``), or 0
    (the AVX2 path, ``row_group`` given): ``codes`` are signed int8 activation codes (``|code| <= 127``, no offset:
    ``corr`` zeros), each product exact whatever the byte weights (W8A8 / W4A8 without VNNI).
    ``planes=2``: 16-bit weights as two byte planes (``cpu_kernels.pack_planes``; the AVX512-VNNI path only).
    ``row_group``: the weight's groups of inputs where ``scales`` holds one scale a row (``[rows, 1]``: int8
    activations per token), applied after the groups as :func:`dequantize_groups` does (``(sum_g acc_g * w_scale[g])
    * scales[i] + bias``, its numbers). ``table``: the weight is 4-bit indices, two a byte, whose codes are
    ``table[index]`` (int8 ``[16]``; ``cpu_kernels.pack_weight(..., nibbles=True)``; one weight plane). A 2-D
    ``packed`` is the weight as the layer stores it: int8 codes ``[out, in]``, uint8 offset nibbles ``[out, in / 2]``
    (``cpu_kernels.pack_weight(..., stored=...)``) or, with ``table``, uint8 nibbles whose codes are
    ``table[nibble]`` (``cpu_kernels.stored_nibble_weight``): the AVX512-VNNI path, and on the AVX2 path byte codes
    with signed activation codes (``flush=0``, one group) and nibbles through a table; no copy kept; with such a
    weight ``corr`` may be None: each pair of channel blocks' corrections computed as it is packed (``-offset`` times
    the codes' group sums, ``offset`` the activation codes' offset, an integer), the same values. Rows (or column blocks)
    over torch's threads from ``GROUP_GEMM_TEAM_MIN_WORK`` multiply-adds. ``None`` without the library."""
    lib = native_library()
    if lib is None:
        return None
    rows, cols = codes.shape
    group = cols // scales.shape[1] if row_group is None else row_group
    out = torch.empty(rows, out_features)
    threads = torch.get_num_threads() if rows * cols * out_features > GROUP_GEMM_TEAM_MIN_WORK else 1
    rank = 0 if hidden is None else hidden.shape[1]
    row_major = 0 if packed.dim() != 2 else 1 if packed.dtype is torch.int8 else 2 if table is None else 3
    if lib.compressdit_group_gemm(codes.data_ptr(), scales.data_ptr(), packed.data_ptr(), _ptr(corr),
                                  w_scale.data_ptr(), _ptr(hidden), rank, _ptr(up), _ptr(bias), rows, out_features,
                                  cols, group, flush, planes, row_group is not None, _ptr(table), row_major,
                                  int(offset), out.data_ptr(), threads):
        layout = " of nibbles" if table is not None else " stored row-major" if row_major else ""
        raise RuntimeError(f"group_gemm: no path on this CPU for {planes} weight plane(s){layout} (see group_gemm_isa)")
    return out


_SCRATCH = threading.local()


def _scratch(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """This thread's reused buffer ``key`` of ``dtype`` as a tensor of ``shape`` (grown as needed; its view for each
    shape made once: slicing and viewing a tensor per call cost ~6 us, twice ``empty_like``)."""
    buffer, views = getattr(_SCRATCH, key, (None, None))
    view = None if views is None else views.get(shape)
    if view is None:
        elements = math.prod(shape)
        if buffer is None or buffer.numel() < elements:
            buffer, views = torch.empty(elements, dtype=dtype), {}
            setattr(_SCRATCH, key, (buffer, views))
        if len(views) >= 64:  # shapes come and go (batch, tokens): keep a few
            views.clear()
        view = views[shape] = buffer[:elements].view(shape)
    return view


def _scratch_weight(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's reused ``[rows, cols]`` buffer of ``dtype`` for a weight decoded per call (:func:`_scratch`)."""
    return _scratch(f"weight_{dtype}", (rows, cols), dtype)


def decode_f32(decoding: tuple) -> torch.Tensor | None:
    """A layer's fp32 weight from its ``fp32_decoding()`` (``QuantizedLinear.fp32_decoding``: the packed codes and the
    tables the format decodes them with), in one C pass into this thread's reused buffer (valid until this thread's next
    call: an fp32 GEMM reads it at once; not where autograd may keep it), bit for bit the layer's own decoder:

    - ``("nibbles", nibbles, lut, scale, zero)``: 4-bit codes two per byte (``uint8 [rows, cols / 2]``, even column
      low), each worth ``lut[code]`` (fp32 ``[16]``, or ``[rows, 16]``: a table per row), then ``(value - zero) *
      scale`` per group (fp32 ``[rows, groups]``, groups from their width; ``None``: left out);
    - ``("bytes", codes, lut, row_scale)``: 8-bit codes ``uint8 [rows, cols]`` worth ``lut[code]`` (fp32 ``[256]``),
      times fp32 ``row_scale [rows]`` (or ``None``);
    - ``("vq", codes, bits, codebook, row_scale, cols)``: each row's ``bits``-bit codeword indices packed least
      significant bit first (``uint8 [rows, nbytes]``), codewords fp32 ``[2^bits, dim]`` (every index one: a smaller
      codebook takes the layer's decoder), times ``row_scale`` (or ``None``).

    ``None`` without the library, under ``torch.compile`` or for tensors the pass does not take."""
    lib = None if torch.compiler.is_compiling() else native_library()
    kind, codes, *rest = decoding
    if lib is None or codes.dtype is not torch.uint8 or not codes.is_contiguous() or codes.dim() != 2:
        return None
    rows = codes.shape[0]
    if kind == "nibbles":
        lut, scale, zero = rest
        cols = 2 * codes.shape[1]
        per_group = scale if scale is not None else zero
        groups = 1 if per_group is None else per_group.shape[1]
        if (not _takes(lut, scale, zero) or lut.shape not in ((16,), (rows, 16)) or cols % groups
                or (cols // groups) % 2 or any(t is not None and tuple(t.shape) != (rows, groups) for t in (scale, zero))):
            return None
        out = _scratch_weight(rows, cols, torch.float32)
        lib.compressdit_dequantize_nibbles_f32(codes.data_ptr(), lut.data_ptr(), int(lut.dim() == 2), _ptr(scale),
                                               _ptr(zero), rows, cols, cols // groups, out.data_ptr(),
                                               threads_for(rows * cols))
        return out
    if kind == "bytes":
        lut, row_scale = rest
        if not _takes(lut, row_scale) or lut.shape != (256,) or (row_scale is not None and row_scale.shape != (rows,)):
            return None
        out = _scratch_weight(rows, codes.shape[1], torch.float32)
        lib.compressdit_dequantize_bytes_f32(codes.data_ptr(), lut.data_ptr(), _ptr(row_scale), rows, codes.shape[1],
                                             out.data_ptr(), threads_for(codes.numel()))
        return out
    if kind == "vq":
        bits, codebook, row_scale, cols = rest
        if (not _takes(codebook, row_scale) or codebook.dim() != 2 or not 1 <= bits <= 24 or cols % codebook.shape[1]
                or codes.shape[1] * 8 < cols // codebook.shape[1] * bits or codebook.shape[0] != 1 << bits
                or (row_scale is not None and row_scale.shape != (rows,))):
            return None
        out = _scratch_weight(rows, cols, torch.float32)
        lib.compressdit_vq_decode_f32(codes.data_ptr(), codes.shape[1], bits, codebook.data_ptr(), codebook.shape[1],
                                      _ptr(row_scale), rows, cols, out.data_ptr(), threads_for(rows * cols))
        return out
    return None


def dequantize_nibbles_bf16(nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                            group: int) -> torch.Tensor | None:
    """:func:`~compressdit.quant.gpu_reference.dequantize_nibbles`' bf16 weight ``[rows, 2 * nibbles.shape[1]]``, bit
    for bit, in one C pass over the rows on torch's threads, written into this thread's reused buffer (a large layer's
    decoded weight is a fresh allocation otherwise, whose page faults cost as much as the decoding): valid until this
    thread's next call. ``None`` without the library or under ``torch.compile``."""
    lib = None if torch.compiler.is_compiling() else native_library()
    if (lib is None or nibbles.dtype is not torch.uint8 or not nibbles.is_contiguous() or scale.dtype is not
            torch.bfloat16 or not scale.is_contiguous() or (zero is not None and (zero.dtype is not torch.bfloat16
                                                                                  or not zero.is_contiguous()))):
        return None
    rows, cols = nibbles.shape[0], 2 * nibbles.shape[1]
    out = _scratch_weight(rows, cols, torch.bfloat16)
    lib.compressdit_dequantize_nibbles_bf16(nibbles.data_ptr(), scale.data_ptr(), _ptr(zero), rows, cols, group,
                                            out.data_ptr(), threads_for(rows * cols))
    return out


def quantize_e4m3_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token E4M3 codes of an fp32 (or bf16, read widened) ``x`` ``[rows, cols]`` as bf16 (exact) and the fp32
    row scales ``[rows]``: :func:`fake_quantize_e4m3_rows` is ``codes * scale``. One C pass; PyTorch ops (the same
    numbers) without the library or under ``torch.compile``."""
    bf16 = x.dtype is torch.bfloat16 and x.is_contiguous() and x.is_cpu
    lib = None if torch.compiler.is_compiling() else native_library() if bf16 else _lib_for(x)
    if lib is None or x.dim() != 2:
        codes, scale = _e4m3_codes(x.float())
        return codes.to(torch.bfloat16), scale.squeeze(-1)
    codes, scale = torch.empty(x.shape, dtype=torch.bfloat16), torch.empty(x.shape[0], dtype=torch.float32)
    quantize = lib.compressdit_quantize_e4m3_bf16_rows if bf16 else lib.compressdit_quantize_e4m3_bf16
    quantize(x.data_ptr(), x.shape[0], x.shape[1], codes.data_ptr(), scale.data_ptr(), threads_for(x.numel()))
    return codes, scale


def bf16_scale(y: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
               bias: torch.Tensor | None, bf16_out: bool = False) -> torch.Tensor:
    """``y.float() * row_scale[:, None] * col_scale (+ bias)`` for a 2-D bf16 ``y`` in one pass (PyTorch without the
    library: the same operations in the same order); ``bf16_out``: rounded to bf16, written over ``y``."""
    lib = _lib_for(row_scale, col_scale, bias)
    if lib is None or y.dtype is not torch.bfloat16 or not y.is_contiguous() or y.dim() != 2:
        out = y.float().mul_(row_scale[:, None]).mul_(col_scale)
        out = out if bias is None else out.add_(bias)
        return out.to(torch.bfloat16) if bf16_out else out
    if bf16_out:
        lib.compressdit_bf16_scale_bf16(y.data_ptr(), row_scale.data_ptr(), col_scale.data_ptr(), _ptr(bias),
                                        y.shape[0], y.shape[1], y.data_ptr(), threads_for(y.numel()))
        return y
    out = torch.empty(y.shape, dtype=torch.float32)
    lib.compressdit_bf16_scale(y.data_ptr(), row_scale.data_ptr(), col_scale.data_ptr(), _ptr(bias), y.shape[0],
                               y.shape[1], out.data_ptr(), threads_for(y.numel()))
    return out


def gelu_tanh(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` of an fp32 or bf16 CPU tensor in one C pass (``compressdit_gelu_tanh``:
    within a few ulp of the exact function, where torch's own ``1 + tanh`` loses precision for negative ``x``; bf16:
    that value rounded to bf16 once); PyTorch for other tensors, without the library, under ``torch.compile``, or
    where gradients must flow. ``inplace``: the C pass writes over ``x`` (a temporary nothing else reads; a large
    fresh output costs its page faults: 38 MB of bf16 activations ~10 ms)."""
    bf16 = x.dtype is torch.bfloat16 and x.is_cpu and x.is_contiguous()
    lib = None if torch.compiler.is_compiling() else native_library() if bf16 else _lib_for(x)
    if lib is None or (x.requires_grad and torch.is_grad_enabled()):
        return torch.nn.functional.gelu(x, approximate="tanh")
    out = x if inplace else torch.empty_like(x)
    run = lib.compressdit_gelu_tanh_bf16 if bf16 else lib.compressdit_gelu_tanh
    run(x.data_ptr(), x.numel(), out.data_ptr(), threads_for(x.numel()))
    return out


def hadamard_takes(x: torch.Tensor, smooth: torch.Tensor | None, signs: torch.Tensor, grid: tuple | None) -> bool:
    """Whether the C Hadamard pass (:func:`hadamard_rows`, or fused in :func:`bf16_linear`) takes these tensors: a
    non-empty ``x`` with no gradient to keep, and the layer's tensors for its width (:func:`_hadamard_layer_takes`)."""
    cols = x.shape[-1] if x.dim() else 0
    return not (x.numel() == 0 or (x.requires_grad and torch.is_grad_enabled())) \
        and _hadamard_layer_takes(smooth, signs, grid, cols)


def _hadamard_layer_takes(smooth: torch.Tensor | None, signs: torch.Tensor, grid: tuple | None, cols: int) -> bool:
    """int8 contiguous ``signs`` and a divisor ``smooth`` (if any) of width ``cols`` (not 0), a grid (if any) of rules
    0 / 1 whose group divides it."""
    return not (cols == 0 or signs.dtype != torch.int8 or not signs.is_contiguous() or signs.nelement() != cols
                or (smooth is not None and smooth.nelement() != cols)  # nelement: a layer's QuantState has numel 0
                or (grid is not None and (grid[1] not in (0, 1) or cols % grid[0])))


def hadamard_rows_pass(smooth: torch.Tensor | None, signs: torch.Tensor,
                       grid: tuple | None) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """:func:`hadamard_rows` for one layer's tensors, checked and prepared here once
    (``compressdit_hadamard_layer_new``: their addresses, the grid and the divisors' reciprocals in C): ``run(x)``, the
    same bits, for a contiguous fp32 CPU ``x`` of ``signs``' width with at least one row and no gradient to keep (the
    caller checks the gradient), into this thread's reused buffer (:func:`_rows_pass`), else ``None``; ``None`` for
    the whole where :func:`hadamard_rows` would never take these tensors, without the library or under
    ``torch.compile``. Holds its own aliases of the tensors."""
    cols = signs.nelement()
    lib = _lib_for(smooth)
    if lib is None or not _hadamard_layer_takes(smooth, signs, grid, cols):
        return None
    smooth, signs = (None if smooth is None else smooth.detach()), signs.detach()
    layer = lib.compressdit_hadamard_layer_new(_ptr(smooth), signs.data_ptr(), cols, *(grid or (0, 0, 0.0, 0, 0)))
    call = lib.compressdit_hadamard_layer_rows

    def fill(x: torch.Tensor, out: torch.Tensor, elements: int) -> bool:
        call(layer, x.data_ptr(), elements // cols, out.data_ptr(), threads_for(elements))
        return True

    return _rows_pass(cols, fill, (smooth, signs), lib, layer)


def _rows_pass(cols: int, fill: Callable[[torch.Tensor, torch.Tensor, int], bool], keep: tuple,
               lib: ctypes.CDLL, layer: int | None) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """``run(x)`` of a layer's C pass over rows of width ``cols``: for a contiguous fp32 CPU ``x`` of that width with
    at least one row, ``fill(x, out, x.numel())`` writes the rows into ``out``, this thread's reused buffer (valid
    until this thread's next pass: a GEMM reads the rows at once; a 4608-wide layer's 256 rows in a fresh tensor cost
    ~90 us of page faults a call, ~6% of the pass), and returns ``out`` (False: it could not, ``None``), else
    ``None``. ``keep``: the tensors whose addresses the C ``layer`` (from a ``compressdit_*_layer_new``; ``None``:
    its allocation failed, and so does this) holds, kept alive with ``run``, which frees ``layer`` when it goes."""
    if layer is None:
        return None

    def run(x: torch.Tensor, _keep=keep) -> torch.Tensor | None:
        if x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous() or not x.dim() \
                or x.shape[-1] != cols:
            return None
        elements = x.numel()
        if not elements:
            return None
        out = _scratch_rows(x)
        return out if fill(x, out, elements) else None

    weakref.finalize(run, lib.compressdit_layer_free, layer)
    return run


def _scratch_rows(x: torch.Tensor) -> torch.Tensor:
    """This thread's reused fp32 buffer of ``x``'s shape for a pass's rows (:func:`_scratch`), or a new tensor where
    ``x`` lies in that buffer."""
    buffer = getattr(_SCRATCH, "rows", (None,))[0]
    start = x.data_ptr()
    if buffer is not None and buffer.data_ptr() <= start < buffer.data_ptr() + 4 * buffer.numel():
        return torch.empty_like(x)
    return _scratch("rows", x.shape, torch.float32)


def duquant_rows_pass(smooth: torch.Tensor | None, steps: RotationSteps,
                      grid: tuple | None) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """DuQuant's balancing and outlier rotation ``steps.apply(x / smooth)`` for one layer's tensors, then with
    ``grid`` (:func:`fake_quantize_grid`'s ``(group, rule, top, mantissa, min_exp)``, rules 0 and 1) its quantization,
    in one C pass per row (``compressdit_duquant_layer_rows``), bit for bit: ``run(x)`` for a contiguous fp32 CPU
    ``x`` of the rotation's width with at least one row and no gradient to keep (the caller checks the gradient), into
    this thread's reused buffer (:func:`_rows_pass`), else ``None``; ``None`` for the whole where the pass never takes
    these tensors, without the library or under ``torch.compile``. Checked and prepared here once
    (``compressdit_duquant_layer_new``); holds its own copies of the tensors."""
    cols = steps.perm.shape[0]
    lib = _lib_for(smooth)
    if (lib is None or cols == 0 or (smooth is not None and smooth.nelement() != cols)
            or (grid is not None and (grid[1] not in (0, 1) or cols % grid[0]))):
        return None
    smooth = None if smooth is None else smooth.detach()
    counts, tops = steps.counts.to(torch.int32).contiguous(), steps.tops.to(torch.int32).contiguous()
    signs, perm = steps.signs.float().contiguous(), steps.perm.long().contiguous()
    layer = lib.compressdit_duquant_layer_new(_ptr(smooth), cols, steps.block, counts.data_ptr(), tops.data_ptr(),
                                              signs.data_ptr(), perm.data_ptr(), *(grid or (0, 0, 0.0, 0, 0)))
    call = lib.compressdit_duquant_layer_rows

    def fill(x: torch.Tensor, out: torch.Tensor, elements: int) -> bool:  # (the C pass returns nonzero unfinished)
        return not call(layer, x.data_ptr(), elements // cols, out.data_ptr(), threads_for(elements))

    return _rows_pass(cols, fill, (smooth, counts, tops, signs, perm), lib, layer)


def hadamard_rows(x: torch.Tensor, smooth: torch.Tensor | None, signs: torch.Tensor,
                  grid: tuple | None = None) -> torch.Tensor | None:
    """``rotate(x / smooth, signs)`` (:mod:`compressdit.quant.rotation`: the randomized block Hadamard after the
    balancing division) of a contiguous fp32 CPU ``x`` in one C pass per row, bit for bit, and then, with ``grid``
    (:func:`fake_quantize_grid`'s ``(group, rule, top, mantissa, min_exp)``, rules 0 and 1), its quantization in the
    same pass; ``None`` without the library, under ``torch.compile``, where gradients must flow, or for inputs the
    pass does not take (the caller runs the PyTorch functions, whose numbers these are)."""
    lib = _lib_for(x, smooth)
    if lib is None or not hadamard_takes(x, smooth, signs, grid):
        return None
    cols = x.shape[-1]
    out = torch.empty_like(x)
    lib.compressdit_hadamard_rows(x.data_ptr(), _ptr(smooth), signs.data_ptr(), x.numel() // cols, cols,
                                  *(grid or (0, 0, 0.0, 0, 0)), 1, 1.0, out.data_ptr(), None, None,
                                  threads_for(x.numel()))
    return out


def hadamard_group_gemm(x: torch.Tensor, smooth: torch.Tensor | None, signs: torch.Tensor, grid: tuple, repeat: int,
                        mult: float, packed: torch.Tensor, corr: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None, out_features: int, planes: int = 1) -> torch.Tensor | None:
    """:func:`hadamard_codes` of contiguous fp32 rows ``x`` ``[rows, in]`` then :func:`group_gemm` on them, in one C
    call (csrc/group_gemm.c: each thread codes and multiplies its own rows): the same numbers, fp32 ``[rows,
    out_features]``; ``None`` where :func:`hadamard_codes` would be. Raises where :func:`group_gemm` would."""
    lib = _lib_for(x, smooth)
    if lib is None or x.dim() != 2 or not hadamard_takes(x, smooth, signs, grid):
        return None
    rows, cols = x.shape
    out = torch.empty(rows, out_features)
    threads = torch.get_num_threads() if rows * cols * out_features > TEAM_MIN_WORK else 1
    if lib.compressdit_hadamard_group_gemm(x.data_ptr(), _ptr(smooth), signs.data_ptr(), rows, cols, grid[0], repeat,
                                           *grid[1:], mult, packed.data_ptr(), corr.data_ptr(), w_scale.data_ptr(),
                                           _ptr(bias), out_features, planes, None, out.data_ptr(), threads):
        raise RuntimeError(f"hadamard_group_gemm: no path on this CPU for {planes} weight plane(s), or out of memory")
    return out


def hadamard_codes(x: torch.Tensor, smooth: torch.Tensor | None, signs: torch.Tensor, grid: tuple, repeat: int,
                   mult: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`hadamard_rows` of contiguous fp32 rows ``x`` ``[rows, cols]`` quantized onto ``grid`` (rules 0 and 1) as
    :func:`grid_codes`' ``(codes, scales)`` (the integer GEMM's activations), in the same pass per row; ``None`` where
    :func:`hadamard_rows` would be."""
    lib = _lib_for(x, smooth)
    if lib is None or x.dim() != 2 or not hadamard_takes(x, smooth, signs, grid):
        return None
    rows, cols = x.shape
    group = grid[0]
    rotated = torch.empty_like(x)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales = torch.empty(rows, cols // group * repeat)
    lib.compressdit_hadamard_rows(x.data_ptr(), _ptr(smooth), signs.data_ptr(), rows, cols, *grid, repeat, mult,
                                  rotated.data_ptr(), codes.data_ptr(), scales.data_ptr(), threads_for(x.numel()))
    return codes, scales
