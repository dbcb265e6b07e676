"""Weight formats: how each builds empty modules (loading), quantizes float ones and checks a layer fits."""

from __future__ import annotations

import dataclasses

from torch import nn

from compressdit.errors import ConfigError
from compressdit.quant.activations import check_activation_fits
from compressdit.quant.format_registry import FORMATS, LinearFormat
from compressdit.quant.fp_layer import (FP_ROUNDINGS, FP_WEIGHT_FORMATS, MinifloatLinear, fp_weight_fits,
                                       validate_fp_weight_spec)
from compressdit.quant.fp8_layer import FP8Linear, fp8_fits, validate_fp8_spec
from compressdit.quant.layers import QuantLinear
from compressdit.quant.mx_layer import BLOCK_CODECS, BlockFPLinear
from compressdit.quant.spec import LinearQuantSpec, reject_unused_fields
from compressdit.quant.twinlog_layer import TWINLOG_FORMAT
from compressdit.quant.vq_layer import VQLinear, code_bits


def _validate_int(spec: LinearQuantSpec, where: str) -> None:
    if spec.vector_dim is not None or spec.codebook_size is not None or spec.row_scale:
        raise ConfigError(f"{where}: vector_dim / codebook_size / row_scale belong to format 'vq', not "
                          f"{spec.format!r}")
    if (spec.w_bits, spec.a_bits) == (8, 8) and spec.a_format != "int" and spec.a_granularity != "per_group":
        raise ConfigError(f"{where}.a_format: int W8A8 runs int8 activation kernels; {spec.a_format!r} activations "
                          "per token/tensor go with format 'fp8' (E4M3) or a per_group granularity")


def _validate_fp8(spec: LinearQuantSpec, where: str) -> None:
    validate_fp8_spec(spec, where)
    if spec.a_format != "int" or spec.a_group_size is not None:
        raise ConfigError(f"{where}: format 'fp8' quantizes activations to E4M3 per token itself; leave a_format "
                          "and a_group_size unset")


def _int_fits(name: str, linear: nn.Linear, spec: LinearQuantSpec) -> None:
    if spec.group_size and linear.in_features % spec.group_size:
        raise ConfigError(f"{name}: in_features {linear.in_features} is not divisible by "
                          f"group_size {spec.group_size}; pick a divisor or null")
    _check_low_rank_fits(name, linear, spec)
    per_byte = 4 if spec.w_bits == 2 else 2 if spec.w_bits <= 4 else 1
    if linear.in_features % per_byte:
        raise ConfigError(f"{name}: in_features {linear.in_features} cannot be packed {per_byte} codes per byte")
    check_activation_fits(name, linear, spec)


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
            or spec.rotation != "none" or spec.low_rank is not None:
        raise ConfigError(f"{where}: format 'vq' is weight-only: a_bits, group_size, balance, rotation and "
                          "low_rank must be unset")


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


def _validate_block_fp(spec: LinearQuantSpec, where: str) -> None:
    """NVFP4 / MXFP4 / MXFP8: the element width and block are the format's; fills ``group_size`` when null."""
    codec = BLOCK_CODECS.get(spec.format)
    _validate_int(spec, where)
    if spec.w_bits != codec.w_bits:
        raise ConfigError(f"{where}.w_bits: format {spec.format!r} stores {codec.w_bits}-bit "
                          f"E{codec.element.exponent_bits}M{codec.element.mantissa_bits} weights; set w_bits: "
                          f"{codec.w_bits} (got {spec.w_bits})")
    spec.group_size = codec.block if spec.group_size is None else spec.group_size
    if spec.group_size != codec.block:
        raise ConfigError(f"{where}.group_size: format {spec.format!r} scales blocks of {codec.block} weights; set "
                          f"group_size: {codec.block} (got {spec.group_size})")
    reject_unused_fields(spec, where, ("w_symmetric: false", "w_range: mse", "rotation", "a_granularity: static"),
                         "takes block absmax scales and dynamic activations (balance and low_rank apply)")


def _check_low_rank_fits(name: str, linear: nn.Linear, spec: LinearQuantSpec) -> None:
    if spec.low_rank is not None and spec.low_rank > min(linear.in_features, linear.out_features):
        raise ConfigError(f"{name}: low_rank {spec.low_rank} is larger than the layer "
                          f"({linear.in_features} -> {linear.out_features}); use at most "
                          f"{min(linear.in_features, linear.out_features)}")


def _block_fp_fits(name: str, linear: nn.Linear, spec: LinearQuantSpec) -> None:
    if linear.in_features % spec.group_size:
        raise ConfigError(f"{name}: in_features {linear.in_features} is not divisible by the {spec.format} block "
                          f"of {spec.group_size}; keep this layer in another format (or full precision)")
    _check_low_rank_fits(name, linear, spec)
    check_activation_fits(name, linear, spec)


def clamp_codebook(spec: LinearQuantSpec, linear: nn.Linear) -> LinearQuantSpec:
    """The paper caps k at a quarter of the layer's sub-vectors (largest power of two below)."""
    vectors = linear.out_features * linear.in_features // spec.vector_dim
    k = spec.codebook_size
    while k > 2 and k * 4 > vectors:
        k //= 2
    return spec if k == spec.codebook_size else dataclasses.replace(spec, codebook_size=k)


FORMATS.add("int", LinearFormat(QuantLinear, QuantLinear.from_linear, _validate_int, _int_fits, ("rtn", "gptq")))
FORMATS.add("vq", LinearFormat(VQLinear, VQLinear.from_linear, _validate_vq, _vq_fits))
FORMATS.add("fp8", LinearFormat(FP8Linear, FP8Linear.from_linear, _validate_fp8, fp8_fits))
for _name in FP_WEIGHT_FORMATS:
    FORMATS.add(_name, LinearFormat(MinifloatLinear, MinifloatLinear.from_linear, validate_fp_weight_spec,
                                    fp_weight_fits, FP_ROUNDINGS))
for _name in BLOCK_CODECS:
    FORMATS.add(_name, LinearFormat(BlockFPLinear, BlockFPLinear.from_linear, _validate_block_fp, _block_fp_fits))
FORMATS.add("twinlog", TWINLOG_FORMAT)
