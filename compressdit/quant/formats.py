"""Weight formats: how each builds empty modules (loading), quantizes float ones and checks a layer fits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.quant.fp8_layer import FP8Linear, fp8_fits, validate_fp8_spec
from compressdit.quant.layers import QuantLinear
from compressdit.quant.rounding import ROUNDINGS
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.vq_layer import VQLinear, code_bits
from compressdit.registry import Registry


@dataclass(frozen=True)
class LinearFormat:
    module_class: type[nn.Module]
    quantize: Callable[[nn.Linear, LinearQuantSpec, torch.Tensor | None], nn.Module]
    validate_spec: Callable[[LinearQuantSpec, str], None]
    check_fits: Callable[[str, nn.Linear, LinearQuantSpec], None]
    roundings: tuple[str, ...] = ("rtn",)  # spec.rounding values; other than rtn, ``quantize`` takes ``hessian=``

    def empty(self, linear: nn.Linear, spec: LinearQuantSpec) -> nn.Module:
        return self.module_class(linear.in_features, linear.out_features, linear.bias is not None, spec,
                                 device=linear.weight.device, dtype=linear.weight.dtype)


FORMATS: Registry[LinearFormat] = Registry("format")


def _validate_int(spec: LinearQuantSpec, where: str) -> None:
    if spec.vector_dim is not None or spec.codebook_size is not None or spec.row_scale:
        raise ConfigError(f"{where}: vector_dim / codebook_size / row_scale belong to format 'vq', not "
                          f"{spec.format!r}")


def _int_fits(name: str, linear: nn.Linear, spec: LinearQuantSpec) -> None:
    if spec.group_size and linear.in_features % spec.group_size:
        raise ConfigError(f"{name}: in_features {linear.in_features} is not divisible by "
                          f"group_size {spec.group_size}; pick a divisor or null")
    per_byte = 4 if spec.w_bits == 2 else 2 if spec.w_bits <= 4 else 1
    if linear.in_features % per_byte:
        raise ConfigError(f"{name}: in_features {linear.in_features} cannot be packed {per_byte} codes per byte")


# The paper's settings: 2 bits = 4 weights per 8-bit index, 3 bits = 2 weights per 6-bit index.
VQ_DEFAULTS = {2: (4, 256), 3: (2, 64)}


def _validate_vq(spec: LinearQuantSpec, where: str) -> None:
    if spec.vector_dim is None or spec.codebook_size is None:
        if spec.w_bits not in VQ_DEFAULTS:
            raise ConfigError(f"{where}: format 'vq' with w_bits {spec.w_bits} needs vector_dim and codebook_size "
                              f"(defaults exist for w_bits {sorted(VQ_DEFAULTS)})")
        default_dim, default_size = VQ_DEFAULTS[spec.w_bits]
        spec.vector_dim = spec.vector_dim if spec.vector_dim is not None else default_dim
        spec.codebook_size = spec.codebook_size if spec.codebook_size is not None else default_size
    if not 1 <= spec.vector_dim <= 16:
        raise ConfigError(f"{where}.vector_dim: {spec.vector_dim} is out of range [1, 16]")
    k = spec.codebook_size
    if not 2 <= k <= 256 or k & (k - 1):
        raise ConfigError(f"{where}.codebook_size: {k} must be a power of two in [2, 256]")
    if spec.a_bits is not None or spec.group_size is not None or spec.balance is not None \
            or spec.rotation != "none":
        raise ConfigError(f"{where}: format 'vq' is weight-only: a_bits, group_size, balance and rotation "
                          "must be unset")


def _vq_fits(name: str, linear: nn.Linear, spec: LinearQuantSpec) -> None:
    if linear.in_features % spec.vector_dim:
        raise ConfigError(f"{name}: in_features {linear.in_features} is not divisible by vector_dim "
                          f"{spec.vector_dim}")
    count = linear.in_features // spec.vector_dim
    if (count * code_bits(spec)) % 8:
        raise ConfigError(f"{name}: {count} codes of {code_bits(spec)} bits per row do not fill whole bytes")
    if count * linear.out_features < spec.codebook_size:
        raise ConfigError(f"{name}: {count * linear.out_features} sub-vectors are fewer than "
                          f"codebook_size {spec.codebook_size}")


def clamp_codebook(spec: LinearQuantSpec, linear: nn.Linear) -> LinearQuantSpec:
    """The paper caps k at a quarter of the layer's sub-vectors (largest power of two below)."""
    vectors = linear.out_features * linear.in_features // spec.vector_dim
    k = spec.codebook_size
    while k > 2 and k * 4 > vectors:
        k //= 2
    return spec if k == spec.codebook_size else dataclasses.replace(spec, codebook_size=k)


FORMATS.add("int", LinearFormat(QuantLinear, QuantLinear.from_linear, _validate_int, _int_fits, tuple(ROUNDINGS)))
FORMATS.add("vq", LinearFormat(VQLinear, VQLinear.from_linear, _validate_vq, _vq_fits))
FORMATS.add("fp8", LinearFormat(FP8Linear, FP8Linear.from_linear, validate_fp8_spec, fp8_fits))
