"""A fused CPU execution of one MoE FFN layer (``csrc/moe_ffn.c``), with the PyTorch path as its reference.

At the zoo's sizes (256 tokens, width 128, experts of 64 neurons) the grouped PyTorch path
(:func:`~compressdit.moe.stacked.run_stacked`) spends a large share of a layer on routing ops that each cost more in
dispatch than in arithmetic (softmax-free top-k, sort, bincount, gather, bias gather, ``index_add_``: ~10 ops), and
with two threads each of its ~110-row matmuls is split over both threads, which gains little. Here the layer is
three calls: a C routing pass (router matmul, top-k, a counting sort into expert groups, each token's grouped rows),
the up projections of every expert with the gather, torch's activation (on the shared and on the routed hidden rows,
as the PyTorch path calls it), and the down
projections with the gated scatter-add back. With several threads the experts run side by side, each matmul on
one thread, largest first.

Numbers: every matmul is the MKL ``sgemm_`` call that torch's ``mm`` / ``addmm`` makes (found in torch's own
``libtorch_cpu``), on the same rows, and every add or multiply is done in the same order, so the output equals the
PyTorch path's at one thread bit for bit (tested). MKL's own result for a matmul of 1-3 rows can change when torch
splits it over two threads; this path never splits one, so its output does not depend on the thread count, and
equals the two-thread PyTorch path up to that MKL rounding. Top-k ties (two exactly equal logits) go to the lower
expert. The library is plain C compiled on first use with the system compiler, as :mod:`compressdit.quant.cpu_native`
builds its own (same flags, same OpenMP checks); without a compiler, without MKL (a torch built on another BLAS),
with ``COMPRESSDIT_NATIVE_CPU=0`` or under ``torch.compile``, :func:`moe_ffn` returns ``None`` and the caller runs
the PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

from compressdit.cache import default_cache_dir
from compressdit.moe.stacked import StackedExperts
from compressdit.quant.cpu_native import _flags, _openmp_runtimes, _takes, _torch_runs_libgomp

SOURCE = Path(__file__).with_name("csrc") / "moe_ffn.c"
_I64, _I32, _PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
_SIGNATURES = {
    "compressdit_moe_route": [_PTR, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "compressdit_moe_up": [_PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR,
                           _PTR, _PTR, _I32],
    "compressdit_moe_down": [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64,
                             _I64, _PTR, _PTR, _PTR, _I32],
}
#: (up weight [h, d], up bias [h] or None, down weight [d_out, h]) of the shared expert
SharedWeights = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]


@functools.lru_cache(maxsize=None)
def mkl_sgemm() -> int | None:
    """Address of the MKL ``sgemm_`` torch's CPU matmuls call (exported by ``libtorch_cpu``); ``None`` in a torch
    built on another BLAS."""
    if "BLAS_INFO=mkl" not in torch.__config__.show():
        return None
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return ctypes.cast(torch_cpu.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _build(compiler: str, flags: list[str]) -> ctypes.CDLL | None:
    """The library built with ``flags`` (once per source and flags, in ``$COMPRESSDIT_CACHE/native``), loaded."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = default_cache_dir() / "native" / f"moe_ffn-{digest}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # concurrent builds: the last rename wins
                built = Path(tmp) / target.name
                if subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True,
                                  timeout=120).returncode:
                    return None
                os.replace(built, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=None)
def native_library() -> ctypes.CDLL | None:
    """The compiled layer, built on first use; ``None`` where disabled, without a C compiler or without MKL. Threaded
    only on torch's own OpenMP runtime (:func:`compressdit.quant.cpu_native.native_library`'s rule)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if os.environ.get("COMPRESSDIT_NATIVE_CPU", "1") == "0" or compiler is None or mkl_sgemm() is None:
        return None
    openmp = _torch_runs_libgomp()
    lib = _build(compiler, _flags(True)) if openmp else None
    if lib is None or len(_openmp_runtimes()) > 1:
        openmp, lib = False, _build(compiler, _flags(False))
    if lib is None:
        return None
    for name, arguments in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, None
    lib.openmp = openmp
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def moe_ffn(x: torch.Tensor, router: tuple[torch.Tensor, torch.Tensor | None], top_k: int,
            shared: SharedWeights | None, stacked: StackedExperts, bias: torch.Tensor | None,
            activation: Callable[[torch.Tensor], torch.Tensor],
            gates: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> torch.Tensor | None:
    """The MoE FFN of fp32 tokens ``x`` ``[N, d]`` without autograd: router ``(weight [E, d], bias)``, ``top_k``
    experts per token, the ``shared`` expert (or ``None``), the routed experts as ``stacked``, the output ``bias``,
    the ``activation``, and ``gates(probs, chosen)`` (``None``: unit gates). ``None`` where the library is missing
    or a tensor is not a contiguous fp32 CPU one: the caller runs the PyTorch path."""
    up, down = stacked.up.transpose(1, 2), stacked.down.transpose(1, 2)  # [E, h, d], [E, d_out, h]: the copies
    lib = None if torch.compiler.is_compiling() else native_library()
    if lib is None or not x.shape[0] or not _takes(x, *router, *(shared or ()), up, stacked.up_bias, down, bias):
        return None
    (tokens, dim), (experts, hidden, _), dim_out = x.shape, up.shape, down.shape[1]
    shared_up, shared_up_bias, shared_down = shared or (None, None, None)
    shared_hidden = 0 if shared_up is None else shared_up.shape[0]
    index = torch.empty(4 * tokens * top_k + 2 * (experts + 1), dtype=torch.int64)
    chosen, rows, positions, slots = index[:4 * tokens * top_k].view(4, tokens, top_k).unbind()
    counts, order = index[4 * tokens * top_k:].view(2, experts + 1).unbind()
    logits = torch.empty(tokens, experts)
    sgemm, threads = mkl_sgemm(), torch.get_num_threads()
    lib.compressdit_moe_route(sgemm, x.data_ptr(), tokens, dim, router[0].data_ptr(), _ptr(router[1]), experts,
                              top_k, logits.data_ptr(), chosen.data_ptr(), counts.data_ptr(), rows.data_ptr(),
                              positions.data_ptr(), slots.data_ptr())
    rows_out = torch.empty(tokens * top_k * max(dim, dim_out))  # the gathered inputs, later the routed outputs
    shared_h, routed_h = torch.empty(tokens, shared_hidden), torch.empty(tokens * top_k, hidden)
    lib.compressdit_moe_up(sgemm, x.data_ptr(), tokens, dim, experts, counts.data_ptr(), rows.data_ptr(),
                           _ptr(shared_up), _ptr(shared_up_bias), shared_hidden, up.data_ptr(), _ptr(stacked.up_bias),
                           hidden, rows_out.data_ptr(), shared_h.data_ptr(), routed_h.data_ptr(), order.data_ptr(),
                           threads)
    # the PyTorch path's two activation calls on the same shapes: torch's vectorized loop leaves a tail of up to 31
    # elements to its scalar code, whose tanh may round differently, so one call over both would change some bits
    shared_h = None if shared_up is None else activation(shared_h)
    routed_h = activation(routed_h)
    gate_values = None if gates is None else gates(logits.softmax(-1), chosen).contiguous()
    out = torch.empty(tokens, dim_out)
    lib.compressdit_moe_down(sgemm, tokens, experts, top_k, counts.data_ptr(), positions.data_ptr(),
                             slots.data_ptr(), _ptr(gate_values), _ptr(shared_h), _ptr(shared_down), shared_hidden,
                             _ptr(bias), routed_h.data_ptr(), down.data_ptr(), hidden,
                             dim_out, rows_out.data_ptr(), out.data_ptr(), order.data_ptr(), threads)
    return out
