"""CUDA kernels of quantized linears in the registry (see :mod:`compressdit.quant.kernel_registry`).

Each wraps a :mod:`compressdit.quant.gpu_ops` kernel (``kernel_for_spec``: one ``torch.library`` custom op
call, so ``torch.compile`` keeps it as one node) and is chosen for layers on a CUDA device:

- ``cuda-w8a8-int8``: ``int`` W8A8, symmetric per-channel weights, dynamic per-token int8 activations
  (K and N multiples of 8): Triton fused quantize + GEMM, or ``torch._int_mm`` (cuBLASLt); the backend is
  ``COMPRESSDIT_INT8_BACKEND`` (``triton`` | ``cublas``), default ``triton`` where importable. Per-tensor
  activations run :func:`compressdit.quant.kernels.int8_linear` (``torch._int_mm``, more than 16 rows).
- ``cuda-fp8``: format ``fp8`` with ``a_bits: 8`` on compute capability 8.9+ (``torch._scaled_mm``,
  row-wise scales; K and N multiples of 16).
- ``cuda-int4-weight``: ``int`` W4A16 (groups of 32..256 or per channel) via tinygemm
  (``aten._weight_int4pack_mm``, bf16 activations), compute capability 8.0+, up to
  ``INT4_PACKED_MAX_ROWS["cuda"]`` rows per call; above, the weight is dequantized into bf16 for the call and
  multiplied by cuBLAS (tinygemm is a small-batch kernel: see :mod:`compressdit.quant.gpu_reference`).

The choice is device-free given a compute capability (:func:`cuda_kernel_name`); :func:`cuda_capability`
is the only place that asks the device. Prepacked buffers (int4: the tinygemm layout; int8/fp8: views of
the saved tensors) are built on the layer's device on its first forward after a load or ``.to("cuda")``
(or by :func:`~compressdit.quant.kernel_registry.prepack_model`), never saved.
"""

from __future__ import annotations

import torch

from compressdit.quant.gpu_ops import kernel_for_spec
from compressdit.quant.kernel_registry import KERNELS, Kernel
from compressdit.quant.kernels import int8_linear

GPU_OPS_NAMES = {"int8-": "cuda-w8a8-int8", "fp8-": "cuda-fp8", "int4-": "cuda-int4-weight"}


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA ``device``; ``None`` for other devices or without a usable CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _per_tensor_w8a8(spec, shape: tuple[int, int]) -> bool:
    out_features, in_features = shape
    return (spec.format == "int" and (spec.w_bits, spec.a_bits) == (8, 8) and spec.group_size is None
            and spec.w_symmetric and spec.a_granularity == "per_tensor"
            and in_features % 8 == 0 and out_features % 8 == 0)


def cuda_kernel_name(spec, shape: tuple[int, int], capability: tuple[int, int]) -> str | None:
    """The registered CUDA kernel for ``spec`` and ``(out_features, in_features)`` on a GPU of ``capability``."""
    if _per_tensor_w8a8(spec, shape):
        return "cuda-w8a8-int8"
    kernel = kernel_for_spec(spec, shape[1], shape[0], capability)
    if kernel is None:
        return None
    return next(name for prefix, name in GPU_OPS_NAMES.items() if kernel.name.startswith(prefix))


def _applies(name: str):
    def applies(spec, device: torch.device, shape: tuple[int, int]) -> bool:
        capability = cuda_capability(torch.device(device))
        return capability is not None and cuda_kernel_name(spec, shape, capability) == name
    return applies


def _prepack(layer) -> dict:
    if _per_tensor_w8a8(layer.spec, (layer.out_features, layer.in_features)):
        return {"kernel": None, "prepared": {}}
    capability = cuda_capability(layer.weight.device) or (9, 0)
    kernel = kernel_for_spec(layer.spec, layer.in_features, layer.out_features, capability)
    prepared = {name: t.detach() if isinstance(t, torch.Tensor) else t for name, t in kernel.prepare(layer).items()}
    return {"kernel": kernel, "prepared": prepared}  # plain tensors (views of the saved ones for int8 / fp8)


def _run(layer, x: torch.Tensor, b: dict) -> torch.Tensor:
    kernel = b["kernel"]
    if kernel is not None:
        return kernel(x, b["prepared"], layer.bias)
    if x.numel() // max(1, x.shape[-1]) <= 16:  # torch._int_mm needs more than 16 rows
        return layer.reference_linear(x)
    return int8_linear(x, layer.weight, layer.weight_scale, layer.bias, "per_tensor")


KERNELS.add("cuda-w8a8-int8", Kernel(
    _applies("cuda-w8a8-int8"), _prepack, _run, priority=20,
    description="int8 x int8 GEMM, dynamic per-token int8 activations (Triton fused or cuBLAS _int_mm: "
                "COMPRESSDIT_INT8_BACKEND=triton|cublas)"))
KERNELS.add("cuda-fp8", Kernel(
    _applies("cuda-fp8"), _prepack, _run, priority=20,
    description="E4M3 x E4M3 torch._scaled_mm, row-wise scales (compute capability 8.9+)"))
KERNELS.add("cuda-int4-weight", Kernel(
    _applies("cuda-int4-weight"), _prepack, _run, priority=20,
    description="tinygemm aten._weight_int4pack_mm (bf16 activations, bf16 group scales and zeros) at few rows, "
                "else dequantize to bf16 + cuBLAS"))
