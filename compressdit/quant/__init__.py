"""Quantization: pure primitives -> quantized modules -> model transforms (imported in that order)."""
