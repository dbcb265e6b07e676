"""Writing a compressed model: its structure manifest into ``quantization_config``, its float tensors in a dtype.

Both write through :class:`~compressdit.io.diffusers_quantizer.CompressditConfig`, so this module sits above the
quantizer backend, which itself rebuilds pruned shapes on load with :mod:`compressdit.io.structure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressdit.io.diffusers_quantizer import CompressditConfig, attach_quantizer
from compressdit.io.structure import structure_of
from compressdit.quant.transform import quantized_modules


def record_structure(model: nn.Module) -> dict[str, Any]:
    """Write the model's width manifest into its ``quantization_config`` (keeping quantized modules' specs).

    Stock ``save_pretrained`` then saves it and ``from_pretrained`` (after ``import compressdit``) rebuilds
    the pruned shapes. Returns the whole ``structure``.
    """
    previous = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    previous = previous if isinstance(previous, CompressditConfig) else CompressditConfig()
    structure = {**previous.structure, **structure_of(model)}
    attach_quantizer(model, previous.specs(), structure)
    return structure


def save_in_dtype(model, folder: Path, dtype) -> None:
    """``save_pretrained`` with full-precision tensors in ``dtype`` (e.g. the source's fp16; exact for
    weights that came from it). Packed codes and fp32 scales of quantized layers are never cast."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if isinstance(config, CompressditConfig):  # config.json says what the float tensors are stored in
        config.record_float_dtype(dtype)
    quantized = {f"{n}.{t}" for n, m in quantized_modules(model).items() for t in m.quantized_tensors}
    tensors = [(name, t) for name, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_floating_point() and name not in quantized]
    original = {name: t.data for name, t in tensors}
    if dtype is not None and dtype != torch.float32:
        for _, t in tensors:
            t.data = t.data.to(dtype)
    try:
        model.save_pretrained(folder)
    finally:
        for name, t in tensors:
            t.data = original[name]
