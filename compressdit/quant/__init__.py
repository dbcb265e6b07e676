"""Quantization: pure primitives -> quantized modules -> model transforms (imported in that order)."""

from compressdit.quant import formats  # noqa: F401  (registers the shipped formats in format_registry.FORMATS)
