"""Teach diffusers' LoRA loaders the logical shape of compressdit's packed weights.

``FluxPipeline.load_lora_weights`` (and the loaders that reuse FLUX's mixin) first compares each linear's weight
shape with the LoRA's, to widen layers for Control LoRAs. The comparison reads ``weight.shape`` for every class
but bitsandbytes' ``Params4bit`` and ``GGUFParameter`` (special-cased by class name; there is no hook for a third
backend), so a layer whose codes are packed several to a byte (int4, int2, VQ) looks narrower than its LoRA and
diffusers tries to widen it, which fails with torch's "Only Tensors of floating point ... can require gradients".

``import compressdit`` therefore registers two small wrappers, as it registers its quantizer in diffusers' auto
mappings (no public plugin hook exists for either): the shape calculation runs inside
:func:`~compressdit.quant.layers.logical_weight_shapes`, so packed weights report ``[out, in]`` there and only
there; and a compressdit layer that a Control LoRA really widens is dequantized first (as diffusers does for
bitsandbytes and GGUF layers; the widened layer is a float ``nn.Linear``, as for them). Every other class goes to
diffusers' own code unchanged. Registration is idempotent and tested against the pinned diffusers range.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from diffusers.loaders import lora_pipeline

from compressdit.quant.layers import QuantizedLinear, logical_weight_shapes

_ORIGINAL = "__compressdit_original__"
_SHAPE_METHOD = "_calculate_module_shape"
_DEQUANTIZE_FUNCTION = "_maybe_dequantize_weight_for_expanded_lora"


def _with_logical_shapes(original: Callable) -> Callable:
    @functools.wraps(original)
    def calculate_module_shape(*args, **kwargs) -> torch.Size:
        with logical_weight_shapes():
            return original(*args, **kwargs)

    setattr(calculate_module_shape, _ORIGINAL, original)
    return calculate_module_shape


def _dequantizing_compressdit_layers(original: Callable) -> Callable:
    @functools.wraps(original)
    def dequantize_weight_for_expanded_lora(model, module) -> torch.Tensor:
        if isinstance(module, QuantizedLinear):
            return module.effective_weight(module.compute_dtype)
        return original(model, module)

    setattr(dequantize_weight_for_expanded_lora, _ORIGINAL, original)
    return dequantize_weight_for_expanded_lora


def register_lora_support() -> None:
    """Wrap the shape calculation of every loader mixin that defines one, and the widening's dequantization."""
    for owner in vars(lora_pipeline).values():
        method = vars(owner).get(_SHAPE_METHOD) if isinstance(owner, type) else None
        if isinstance(method, staticmethod) and not hasattr(method.__func__, _ORIGINAL):
            setattr(owner, _SHAPE_METHOD, staticmethod(_with_logical_shapes(method.__func__)))
    dequantize = getattr(lora_pipeline, _DEQUANTIZE_FUNCTION, None)
    if dequantize is not None and not hasattr(dequantize, _ORIGINAL):
        setattr(lora_pipeline, _DEQUANTIZE_FUNCTION, _dequantizing_compressdit_layers(dequantize))
