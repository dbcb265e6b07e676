"""Checkpoint summaries (``compressdit inspect``) and dequantized export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressdit.errors import UnsupportedModelError
from compressdit.io.checkpoint import atomic_output, copy_pipeline_parts, folder_bytes
from compressdit.io.diffusers_quantizer import STRUCTURE_KEYS
from compressdit.io.sources import TRANSFORMER_SUBFOLDER, load_source, resolve_path
from compressdit.models import adapter_for
from compressdit.quant.kernel_registry import refresh


def _module_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return sum(t.nelement() * t.element_size() for t in tensors)


def inspect_checkpoint(model: str) -> dict:
    """Per-linear scheme, bytes (weights + scales + bias) against a bf16 copy of the same layer, and the kernel
    the layer runs on this machine's CPU with the RAM its prepacked buffers take (e.g. a decoded VQ weight)."""
    source = load_source(model)
    transformer = source.transformer
    adapter = adapter_for(transformer)
    rows = []
    for name, module in adapter.linear_layers(transformer).items():
        spec = getattr(module, "spec", None)
        bf16 = (module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)) * 2
        size = _module_bytes(module)
        cache = refresh(module) if spec else None
        rows.append({"module": name, "role": adapter.role_of(name), "scheme": spec.label if spec else "full precision",
                     "bytes": size, "bf16_bytes": bf16, "ratio_vs_bf16": bf16 / size if size else 0.0,
                     "kernel": cache.name if cache else "float", "runtime_bytes": cache.nbytes() if cache else 0})
    parameters = int(transformer.num_parameters())
    return {"class": type(transformer).__name__, "folder": str(source.folder),
            "linear_modules": len(rows), "quantized_modules": sum(r["scheme"] != "full precision" for r in rows),
            "parameters": parameters, "bytes_on_disk": folder_bytes(source.transformer_folder),
            "bf16_bytes": parameters * 2, "modules": rows}


@torch.no_grad()
def export_dequantized(model: str, out: Path, overwrite: bool = False) -> Path:
    """Write a plain diffusers folder (float weights, no ``quantization_config``); a width-pruned, MoE or MoB
    model has no stock shapes for one and is refused."""
    source = load_source(model)
    transformer = source.transformer
    if getattr(transformer, "hf_quantizer", None) is not None:
        transformer.dequantize()
    kept = getattr(transformer.config, "quantization_config", None)
    if kept is not None:  # dequantize() kept the structure manifest: stock diffusers cannot build these shapes
        kinds = ", ".join(k for k in STRUCTURE_KEYS if getattr(kept, "structure", {}).get(k))
        raise UnsupportedModelError(f"{model} has non-stock layers ({kinds} in quantization_config.structure): no "
                                    "plain diffusers folder can hold them; load it with stock from_pretrained "
                                    "after `import compressdit`")
    folder = resolve_path(model)
    with atomic_output(out, overwrite=overwrite, keep=(model,)) as tmp:
        target = tmp / TRANSFORMER_SUBFOLDER if source.is_pipeline else tmp
        if source.is_pipeline:
            copy_pipeline_parts(folder, tmp)
        transformer.save_pretrained(target)
    return Path(out)
