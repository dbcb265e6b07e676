"""A fused CPU execution of one MoE FFN layer (``csrc/moe_ffn.c``), with the PyTorch path as its reference.

At the zoo's sizes (256 tokens, width 128, experts of 64 neurons) the grouped PyTorch path
(:func:`~compressdit.moe.stacked.run_stacked`) spends a large share of a layer on ops that cost more in dispatch than
in arithmetic (top-k, sort, bincount, gathers, bias gather, ``index_add_``), and with two threads each of its
~110-row matmuls is split over both threads, which gains little. Here the layer is one C call: a routing task (router
matmul, top-k, a counting sort into expert groups, each token's grouped rows) runs while another computes the
shared expert (which needs no routing), then every routed expert runs gather -> up projection -> bias -> GELU ->
down projection as one task, largest first, the experts side by side on the threads with each matmul on one thread,
and the tokens add their experts' rows back. Where the GELU cannot be computed here as torch computes it (softmax
gates, another activation, no AVX-512, or a torch thread split that leaves elements to its scalar code), the call is
split in two around torch's activation (and the gates).

Numbers: every matmul is the MKL ``sgemm_`` call that torch's ``mm`` / ``addmm`` makes (found in torch's own
``libtorch_cpu``) on the same rows, every add or multiply is done in the same order (built with
``-ffp-contract=off``), and the fused GELU is torch's AVX-512 kernel's arithmetic with its ``Sleef_tanhf16_u10``, so
the output equals the PyTorch path's bit for bit (tested at one and two threads). MKL may round a matmul of 1-3 rows
differently once torch splits it over two threads; this path never splits one, so where torch's activation is
fused, its output does not depend on the thread count. Top-k ties (two exactly equal logits) go to the lower expert.
The library is plain C compiled on first use with the system compiler, as :mod:`compressdit.quant.cpu_native` builds
its own (same flags, same OpenMP checks); without a compiler, without MKL (a torch built on another BLAS), with
``COMPRESSDIT_NATIVE_CPU=0`` or under ``torch.compile``, :func:`moe_ffn` returns ``None`` and the caller runs the
PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
from pathlib import Path
from typing import Callable

import torch

from compressdit.moe.stacked import StackedExperts
from compressdit.native_build import build_on_torch_threads, compiler_for
from compressdit.quant.cpu_native import _takes

SOURCE = Path(__file__).with_name("csrc") / "moe_ffn.c"
_I64, _I32, _PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
_SIGNATURES = {
    "compressdit_moe_ffn": [_PTR, _PTR, _I32, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR,
                            _PTR, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I32],
}
UP, DOWN = 1, 2  # the phases of compressdit_moe_ffn
#: torch splits an elementwise op over threads from this many elements (``at::internal::GRAIN_SIZE``) ...
TORCH_GRAIN = 32768
#: ... and its AVX-512 float loop takes 32 elements an iteration, leaving the rest of a thread's range to scalar code
TORCH_VECTOR_STEP = 32
#: activations (:data:`compressdit.moe.layers.ACTIVATIONS` names) the C pass computes itself, as torch's AVX-512
#: kernel does: GELU(approximate='tanh')
FUSABLE_ACTIVATIONS = frozenset({"gelu-tanh"})
#: (up weight [h, d], up bias [h] or None, down weight [d_out, h]) of the shared expert
SharedWeights = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]


def _torch_cpu_symbol(name: str) -> int | None:
    """Address of ``name`` exported by torch's ``libtorch_cpu``; ``None`` where it is absent."""
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return ctypes.cast(getattr(torch_cpu, name), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def mkl_sgemm() -> int | None:
    """Address of the MKL ``sgemm_`` torch's CPU matmuls call (exported by ``libtorch_cpu``); ``None`` in a torch
    built on another BLAS."""
    return _torch_cpu_symbol("sgemm_") if "BLAS_INFO=mkl" in torch.__config__.show() else None


@functools.lru_cache(maxsize=None)
def sleef_tanh16() -> int | None:
    """Address of the Sleef ``tanh`` torch's AVX-512 kernels use (``Sleef_tanhf16_u10`` in ``libtorch_cpu``); ``None``
    where torch does not run its AVX-512 kernels here."""
    return _torch_cpu_symbol("Sleef_tanhf16_u10") if torch.backends.cpu.get_cpu_capability() == "AVX512" else None


@functools.lru_cache(maxsize=None)
def native_library() -> ctypes.CDLL | None:
    """The compiled layer, built on first use; ``None`` where disabled, without a C compiler or without MKL. Threaded
    only on torch's own OpenMP runtime (:func:`~compressdit.native_build.build_on_torch_threads`)."""
    if os.environ.get("COMPRESSDIT_NATIVE_CPU", "1") == "0" or compiler_for(SOURCE) is None or mkl_sgemm() is None:
        return None
    lib = build_on_torch_threads("moe_ffn", [SOURCE])  # once per source and flags, in $COMPRESSDIT_CACHE/native
    if lib is None:
        return None
    for name, arguments in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, None
    lib.fused_gelu = bool(lib.compressdit_moe_fused_gelu()) and sleef_tanh16() is not None
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _torch_vectorized_only(numel: int, threads: int) -> bool:
    """Whether torch's elementwise kernel on ``numel`` contiguous floats and ``threads`` threads computes every
    element in its vectorized loop (its ``parallel_for`` split: ``min(threads, ceil(numel / grain))`` equal chunks
    from ``grain`` + 1 elements on): only then does the fused GELU give its bits."""
    chunks = min(threads, -(-numel // TORCH_GRAIN)) if numel > TORCH_GRAIN else 1
    return numel % TORCH_VECTOR_STEP == 0 and -(-numel // chunks) % TORCH_VECTOR_STEP == 0


def moe_ffn(x: torch.Tensor, router: tuple[torch.Tensor, torch.Tensor | None], top_k: int,
            shared: SharedWeights | None, stacked: StackedExperts, bias: torch.Tensor | None,
            activation: Callable[[torch.Tensor], torch.Tensor], activation_name: str,
            gates: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> torch.Tensor | None:
    """The MoE FFN of fp32 tokens ``x`` ``[N, d]`` without autograd: router ``(weight [E, d], bias)``, ``top_k``
    experts per token, the ``shared`` expert (or ``None``), the routed experts as ``stacked``, the output ``bias``,
    the ``activation`` (named ``activation_name``: the C pass computes those in :data:`FUSABLE_ACTIVATIONS` itself), and
    ``gates(probs, chosen)`` (``None``: unit gates). ``None`` where the library is missing or a tensor is not a
    contiguous fp32 CPU one: the caller runs the PyTorch path."""
    lib = None if torch.compiler.is_compiling() else native_library()
    if lib is None or not x.shape[0] or not _takes(x, *router, *(shared or ()), bias):
        return None  # the stacked copies are contiguous and of the experts' dtype, which stackable() checked
    up, down = stacked.up.transpose(1, 2), stacked.down.transpose(1, 2)  # [E, h, d], [E, d_out, h]: the copies
    (tokens, dim), (experts, hidden, _), dim_out = x.shape, up.shape, down.shape[1]
    shared_up, shared_up_bias, shared_down = shared or (None, None, None)
    shared_hidden = 0 if shared_up is None else shared_up.shape[0]
    # chosen, rows, positions, slots [tokens * top_k] each, then counts and order [experts] (moe_ffn.c)
    index = torch.empty(4 * tokens * top_k + 2 * experts, dtype=torch.int64)
    # one float scratch buffer: logits, gathered rows, routed outputs, shared and routed hidden rows, each padded to
    # 64 bytes
    sizes = (tokens * experts, tokens * top_k * dim, tokens * top_k * dim_out, tokens * shared_hidden,
             tokens * top_k * hidden)
    starts = [0, *itertools.accumulate(-(-size // 16) * 16 for size in sizes)]
    scratch, out = torch.empty(starts[-1]), torch.empty(tokens, dim_out)
    logits, xs, ys, shared_h, routed_h = (scratch.data_ptr() + 4 * start for start in starts[:-1])
    sgemm, threads = mkl_sgemm(), torch.get_num_threads()
    fused = (gates is None and activation_name in FUSABLE_ACTIVATIONS and lib.fused_gelu
             and _torch_vectorized_only(sizes[3], threads) and _torch_vectorized_only(sizes[4], threads))
    weights = (router[0].data_ptr(), _ptr(router[1]), experts, top_k, _ptr(shared_up), _ptr(shared_up_bias),
               _ptr(shared_down), shared_hidden, up.data_ptr(), _ptr(stacked.up_bias), down.data_ptr(), hidden,
               _ptr(bias), dim_out)
    if fused:
        lib.compressdit_moe_ffn(sgemm, sleef_tanh16(), UP | DOWN, x.data_ptr(), tokens, dim, *weights, None, logits,
                                index.data_ptr(), xs, ys, shared_h, routed_h, out.data_ptr(), threads)
        return out
    lib.compressdit_moe_ffn(sgemm, None, UP, x.data_ptr(), tokens, dim, *weights, None, logits, index.data_ptr(), xs,
                            ys, shared_h, routed_h, out.data_ptr(), threads)
    # torch's activation, called as the PyTorch path calls it: on the shared and on the routed rows apart (its
    # scalar tail code may round differently, so one call over both could change some bits)
    view = [scratch[start:start + size] for start, size in zip(starts, sizes)]
    shared_act = activation(view[3].view(tokens, shared_hidden))
    routed_act = activation(view[4].view(tokens * top_k, hidden))
    gate_values = None
    if gates is not None:  # the chosen experts, largest logit first as torch.topk gives them
        probs = view[0].view(tokens, experts).softmax(-1)
        gate_values = gates(probs, index[:tokens * top_k].view(tokens, top_k)).contiguous()
    lib.compressdit_moe_ffn(sgemm, None, DOWN, x.data_ptr(), tokens, dim, *weights, _ptr(gate_values), logits,
                            index.data_ptr(), xs, ys, shared_act.data_ptr(), routed_act.data_ptr(), out.data_ptr(),
                            threads)
    return out
