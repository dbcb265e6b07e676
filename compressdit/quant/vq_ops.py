"""VQ4DiT vector-quantized weights as ``torch.library`` custom ops, with a PyTorch reference everywhere.

``compressdit::vq_decode`` rebuilds the dense weight from packed codes + a codebook;
``compressdit::vq_linear`` computes ``x @ W^T + b`` from them. Layout: :mod:`compressdit.quant.vq_primitives`.

Every device runs the reference (:func:`unpack_code_bits`, index the codebook, ``F.linear``). On CUDA the
kernels of ``cuda_ext/`` take over when they load: the prebuilt ``compressdit._cuda_ext``
(``COMPRESSDIT_BUILD_CUDA=1 pip install -e .``), else a JIT build on first CUDA use when
``COMPRESSDIT_JIT_CUDA=1``. A failed load warns once and the reference runs.

CUDA strategies, chosen by :func:`vq_strategy` or ``COMPRESSDIT_VQ_STRATEGY``:

- ``fused`` (default): at most 16 rows of ``x`` -> fused GEMV, more -> fused tiled GEMM;
- ``decode_matmul``: decode kernel to a dense weight, then cuBLAS.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from compressdit.quant.vq_primitives import unpack_code_bits

CUDA_SOURCES = Path(__file__).resolve().parents[2] / "cuda_ext"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DECODE_CHUNK_BITS = 1 << 24  # rows unpacked at once: bounds the reference's int64 bit tensor (~128 MiB)


def check_vq_args(codes: torch.Tensor, codebook: torch.Tensor, in_features: int, code_bits: int) -> None:
    """Raise ``ValueError`` naming the mismatch when codes/codebook cannot describe a ``[out, in_features]`` weight."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be uint8 [out, nbytes], got {codes.dtype} {tuple(codes.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be [k, d], got shape {tuple(codebook.shape)}")
    if not 1 <= code_bits <= 8:
        raise ValueError(f"code_bits must be in 1..8, got {code_bits}")
    entries, dim = codebook.shape
    if dim < 1 or in_features % dim:
        raise ValueError(f"in_features {in_features} is not a multiple of the codebook's vector dimension {dim}")
    if entries > 1 << code_bits:
        raise ValueError(f"a codebook of {entries} entries cannot be addressed by {code_bits}-bit codes")
    count = in_features // dim
    if codes.shape[1] * 8 < count * code_bits:
        raise ValueError(f"codes rows hold {codes.shape[1]} bytes, but {count} codes of {code_bits} bits need "
                         f"{(count * code_bits + 7) // 8}; was the weight packed with these in_features/code_bits?")


def vq_decode_reference(codes: torch.Tensor, codebook: torch.Tensor, in_features: int, code_bits: int) -> torch.Tensor:
    """PyTorch reference of :func:`vq_decode` (row chunks keep the unpacked bits small), written into one output (no
    ``torch.cat``: under CPU autocast to bf16 it refuses fp16 codebooks' rows, and it held the weight twice)."""
    count = in_features // codebook.shape[1]
    rows_per_chunk = max(1, _DECODE_CHUNK_BITS // max(1, codes.shape[1] * 8))
    out = codebook.new_empty(codes.shape[0], in_features)
    for start in range(0, codes.shape[0], rows_per_chunk):
        chunk = codes[start:start + rows_per_chunk]
        out[start:start + chunk.shape[0]] = codebook[unpack_code_bits(chunk, code_bits, count)].reshape(-1, in_features)
    return out


def vq_linear_reference(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor],
                        in_features: int, code_bits: int) -> torch.Tensor:
    """PyTorch reference of :func:`vq_linear`: decode, cast to ``x.dtype``, ``F.linear``."""
    weight = vq_decode_reference(codes, codebook, in_features, code_bits).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


@functools.cache
def load_cuda_extension() -> Optional[ModuleType]:
    """The compiled kernels (prebuilt, else JIT when ``COMPRESSDIT_JIT_CUDA=1``), or ``None``; warns once on failure."""
    try:
        from compressdit import _cuda_ext

        return _cuda_ext
    except ModuleNotFoundError as error:
        if error.name != "compressdit._cuda_ext":
            raise
    except ImportError as error:  # built, but against another torch/CUDA
        warnings.warn(f"compressdit._cuda_ext does not import ({error}); rebuild it with "
                      "COMPRESSDIT_BUILD_CUDA=1 pip install -e . -- using the PyTorch reference", stacklevel=2)
    if os.environ.get("COMPRESSDIT_JIT_CUDA") != "1":
        return None
    sources = [CUDA_SOURCES / "vq_kernels.cu", CUDA_SOURCES / "vq_binding.cpp"]
    if not all(path.is_file() for path in sources):
        warnings.warn(f"COMPRESSDIT_JIT_CUDA=1 but the kernel sources are not in {CUDA_SOURCES} (a source checkout "
                      "has them) -- using the PyTorch reference", stacklevel=2)
        return None
    from torch.utils.cpp_extension import load

    try:
        return load(name="compressdit_vq_cuda", sources=[str(path) for path in sources],
                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])
    except (RuntimeError, OSError, ImportError) as error:
        warnings.warn(f"JIT build of the VQ CUDA kernels failed ({error}); check nvcc/CUDA_HOME, or build them with "
                      "COMPRESSDIT_BUILD_CUDA=1 pip install -e . -- using the PyTorch reference", stacklevel=2)
        return None


def cuda_extension_available() -> bool:
    """Whether a GPU is present and the VQ kernels load (may trigger the JIT build)."""
    return torch.cuda.is_available() and load_cuda_extension() is not None


Strategy = Callable[[ModuleType, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], int, int],
                    torch.Tensor]


def _fused(ext: ModuleType, x2d: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor,
           bias: Optional[torch.Tensor], in_features: int, code_bits: int) -> torch.Tensor:
    kernel = ext.vq_gemv if x2d.shape[0] <= ext.max_gemv_rows else ext.vq_gemm
    return kernel(x2d, codes, codebook, bias, code_bits)


def _decode_matmul(ext: ModuleType, x2d: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor,
                   bias: Optional[torch.Tensor], in_features: int, code_bits: int) -> torch.Tensor:
    return F.linear(x2d, ext.vq_decode(codes, codebook, in_features, code_bits), bias)


STRATEGIES: dict[str, Strategy] = {"fused": _fused, "decode_matmul": _decode_matmul}
_strategy_stack: list[str] = []  # innermost vq_strategy() last


def _checked_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"unknown VQ strategy {name!r}; choose one of {sorted(STRATEGIES)} "
                         "(vq_strategy() or COMPRESSDIT_VQ_STRATEGY)")
    return name


def current_strategy() -> str:
    """The CUDA strategy in force: innermost :func:`vq_strategy`, else ``COMPRESSDIT_VQ_STRATEGY``, else ``fused``."""
    if _strategy_stack:
        return _strategy_stack[-1]
    return _checked_strategy(os.environ.get("COMPRESSDIT_VQ_STRATEGY", "fused"))


@contextlib.contextmanager
def vq_strategy(name: str) -> Iterator[None]:
    """Run ``vq_linear`` on CUDA with strategy ``name`` (``fused`` or ``decode_matmul``) inside the block."""
    _strategy_stack.append(_checked_strategy(name))
    try:
        yield
    finally:
        _strategy_stack.pop()


def _kernels_take(ext: ModuleType, codebook: torch.Tensor, code_bits: int) -> bool:
    dim = codebook.shape[1]
    return dim <= ext.max_dim and (1 << code_bits) * dim <= ext.max_codebook_floats


@torch.library.custom_op("compressdit::vq_decode", mutates_args=())
def _vq_decode_op(codes: torch.Tensor, codebook: torch.Tensor, in_features: int, code_bits: int) -> torch.Tensor:
    check_vq_args(codes, codebook, in_features, code_bits)
    return vq_decode_reference(codes, codebook, in_features, code_bits)


@_vq_decode_op.register_kernel("cuda")
def _vq_decode_cuda(codes: torch.Tensor, codebook: torch.Tensor, in_features: int, code_bits: int) -> torch.Tensor:
    check_vq_args(codes, codebook, in_features, code_bits)
    ext = load_cuda_extension()
    if ext is None or codebook.dtype not in KERNEL_DTYPES or not _kernels_take(ext, codebook, code_bits):
        return vq_decode_reference(codes, codebook, in_features, code_bits)
    return ext.vq_decode(codes.contiguous(), codebook.contiguous(), in_features, code_bits)


@_vq_decode_op.register_fake
def _vq_decode_fake(codes: torch.Tensor, codebook: torch.Tensor, in_features: int, code_bits: int) -> torch.Tensor:
    check_vq_args(codes, codebook, in_features, code_bits)
    return codebook.new_empty(codes.shape[0], in_features)


@torch.library.custom_op("compressdit::vq_linear", mutates_args=())
def _vq_linear_op(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor],
                  in_features: int, code_bits: int) -> torch.Tensor:
    _check_linear_args(x, codes, codebook, bias, in_features, code_bits)
    return vq_linear_reference(x, codes, codebook, bias, in_features, code_bits)


@_vq_linear_op.register_kernel("cuda")
def _vq_linear_cuda(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor],
                    in_features: int, code_bits: int) -> torch.Tensor:
    _check_linear_args(x, codes, codebook, bias, in_features, code_bits)
    ext = load_cuda_extension()
    if ext is None or x.dtype not in KERNEL_DTYPES or not _kernels_take(ext, codebook, code_bits):
        return vq_linear_reference(x, codes, codebook, bias, in_features, code_bits)
    x2d = x.reshape(-1, in_features).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    out = STRATEGIES[current_strategy()](ext, x2d, codes.contiguous(), codebook.to(x.dtype).contiguous(), bias,
                                         in_features, code_bits)
    return out.reshape(*x.shape[:-1], codes.shape[0])


@_vq_linear_op.register_fake
def _vq_linear_fake(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor],
                    in_features: int, code_bits: int) -> torch.Tensor:
    _check_linear_args(x, codes, codebook, bias, in_features, code_bits)
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def _vq_linear_setup(ctx, inputs, output) -> None:
    x, codes, codebook, bias, in_features, code_bits = inputs
    ctx.save_for_backward(codes, codebook)
    ctx.in_features, ctx.code_bits, ctx.has_bias = in_features, code_bits, bias is not None


def _vq_linear_backward(ctx, grad_output: torch.Tensor):
    """Gradients for the input and the bias (adapters, distillation through frozen VQ layers)."""
    codes, codebook = ctx.saved_tensors
    weight = vq_decode(codes, codebook, ctx.in_features, ctx.code_bits).to(grad_output.dtype)
    grad_x = grad_output @ weight
    grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, grad_bias, None, None


_vq_linear_op.register_autograd(_vq_linear_backward, setup_context=_vq_linear_setup)


def _check_linear_args(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor],
                       in_features: int, code_bits: int) -> None:
    check_vq_args(codes, codebook, in_features, code_bits)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={in_features}")
    if bias is not None and tuple(bias.shape) != (codes.shape[0],):
        raise ValueError(f"bias must be [{codes.shape[0]}] (one per output feature), got {tuple(bias.shape)}")


def vq_decode(codes: torch.Tensor, codebook: torch.Tensor, in_features: int, code_bits: int) -> torch.Tensor:
    """Dense weight ``[out, in_features]`` (codebook dtype) from codes ``uint8 [out, nbytes]`` + codebook ``[k, d]``."""
    return torch.ops.compressdit.vq_decode(codes, codebook, in_features, code_bits)


def vq_linear(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor],
              in_features: int, code_bits: int) -> torch.Tensor:
    """``x @ W^T + bias`` (``[..., in]`` -> ``[..., out]``, x's dtype) with ``W`` given as codes + codebook.

    Kernels accumulate in fp32; the reference casts the decoded weight to ``x.dtype`` and calls ``F.linear``.
    """
    return torch.ops.compressdit.vq_linear(x, codes, codebook, bias, in_features, code_bits)
