"""Activation formats: dynamic fake quantization of a layer's input, one registered handler per ``a_format``.

``a_format`` picks the element format; ``a_granularity`` where the (dynamic) scale comes from: ``per_token``
(each row's absmax), ``per_group`` (each run of ``a_group_size`` inputs within a row), ``per_tensor``, or
``static`` (a calibrated scale; integers only). The scale maps the absmax onto the format's largest value:
``2^(b-1) - 1`` for ``int``, the format's maximum for a minifloat (fp32 scales, as FP4DiT). The block formats
carry their own scales: ``nvfp4`` (blocks of 16: E4M3 scales under an fp32 tensor scale) and ``mxfp4`` /
``mxfp8`` (blocks of 32, E8M0 scales), so they need ``a_granularity: per_group`` with their block. YAML::

    a_bits: 4
    a_format: e2m1            # int (default), e2m1, e3m0, e1m2, e2m3, e3m2, e4m3, e5m2, nvfp4, mxfp4, mxfp8
    a_granularity: per_group
    a_group_size: 32          # 16 / 32 / 64 ...; must divide the layer's input width

Every path rounds with a straight-through gradient, so adapters can be trained through quantized inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.quant.minifloat import MINIFLOATS, Minifloat
from compressdit.quant.mx_primitives import (E2M1, E4M3, MX_BLOCK, NVFP4_BLOCK, mx_fake_quantize,
                                             nvfp4_fake_quantize)
from compressdit.quant.primitives import fake_quantize_activation, int_range
from compressdit.registry import Registry


@dataclass(frozen=True)
class Grid:
    """A dynamic quantizer as data, for the fused CPU pass that reproduces it (``cpu_native.fake_quantize_grid``):
    the scale ``rule`` (0: group absmax / ``top``; 1: MX power of two; 2: NVFP4 E4M3 block scale under a tensor
    scale), the largest value ``top``, and the grid: ``mantissa`` bits per binade, binades floored at ``min_exp``
    (integers: 30 and 30, a step of 1)."""

    rule: int
    top: float
    mantissa: int
    min_exp: int


@dataclass(frozen=True)
class ActivationFormat:
    """``quantize(x, spec, static_scale)`` -> fake-quantized ``x``; ``bits`` None accepts any ``a_bits``;
    ``block`` is the fixed group of a block format (None: the spec's granularity decides); ``grid(spec)`` the same
    quantizer as :class:`Grid` data where one fused pass reproduces it (None: no such pass)."""

    quantize: Callable[[torch.Tensor, object, torch.Tensor | None], torch.Tensor]
    bits: int | None = None
    block: int | None = None
    grid: Callable[[object], Grid | None] = lambda spec: None


ACTIVATION_FORMATS: Registry[ActivationFormat] = Registry("activation format")


def _rows(x: torch.Tensor, spec) -> torch.Tensor:
    """``x`` as ``[rows, groups, size]``: the groups the dynamic scales are taken over."""
    if spec.a_granularity == "per_tensor":
        return x.reshape(1, 1, -1)
    size = spec.a_group_size if spec.a_granularity == "per_group" else x.shape[-1]
    if x.shape[-1] % size:
        raise ValueError(f"input width {x.shape[-1]} is not divisible by a_group_size {size}")
    return x.reshape(-1, x.shape[-1] // size, size)


def _scaled_round(x: torch.Tensor, spec, top: float, rounder: Callable[[torch.Tensor], torch.Tensor]):
    """Scale each group's absmax onto ``top``, round with ``rounder`` (straight-through), scale back."""
    groups = _rows(x.float(), spec)
    scale = groups.detach().abs().amax(-1, keepdim=True).clamp_min(1e-8) / top
    q = groups / scale
    q = q + (rounder(q) - q).detach()
    return (q * scale).reshape(x.shape).to(x.dtype)


def _int(x: torch.Tensor, spec, static_scale: torch.Tensor | None) -> torch.Tensor:
    if spec.a_granularity != "per_group":  # the historical path, bit for bit
        return fake_quantize_activation(x, spec.a_bits, spec.a_granularity, static_scale)
    qmin, qmax = int_range(spec.a_bits)
    return _scaled_round(x, spec, qmax, lambda q: torch.round(q).clamp(qmin, qmax))


def _minifloat(element: Minifloat):
    def quantize(x: torch.Tensor, spec, static_scale: torch.Tensor | None) -> torch.Tensor:
        return _scaled_round(x, spec, element.max_value, element.round)
    return quantize


def element_grid(element: Minifloat, rule: int = 0) -> Grid:
    """The :class:`Grid` of ``element``'s values under scale ``rule`` (NVFP4's weights round the same way: mx_layer)."""
    return Grid(rule, element.max_value, element.mantissa_bits, element.min_normal_exponent)


def _row_grid(make: Callable[[object], Grid]) -> Callable[[object], Grid | None]:
    """A per-token / per-group quantizer's grid (per tensor and static scales have none)."""
    return lambda spec: make(spec) if spec.a_granularity in ("per_token", "per_group") else None


ACTIVATION_FORMATS.add("int", ActivationFormat(  # per token: cpu_dense.fake_quantize_input's own few passes
    _int, grid=lambda spec: Grid(0, int_range(spec.a_bits)[1], 30, 30) if spec.a_granularity == "per_group" else None))
for _name, _element in MINIFLOATS.items():
    ACTIVATION_FORMATS.add(_name, ActivationFormat(_minifloat(_element), bits=_element.bits,
                                                   grid=_row_grid(lambda spec, e=_element: element_grid(e))))
ACTIVATION_FORMATS.add("nvfp4", ActivationFormat(lambda x, spec, s: nvfp4_fake_quantize(x), 4, NVFP4_BLOCK,
                                                 lambda spec: element_grid(E2M1, rule=2)))
ACTIVATION_FORMATS.add("mxfp4", ActivationFormat(lambda x, spec, s: mx_fake_quantize(x, E2M1), 4, MX_BLOCK,
                                                 lambda spec: element_grid(E2M1, rule=1)))
ACTIVATION_FORMATS.add("mxfp8", ActivationFormat(lambda x, spec, s: mx_fake_quantize(x, E4M3), 8, MX_BLOCK,
                                                 lambda spec: element_grid(E4M3, rule=1)))


def activation_grid(spec) -> Grid | None:
    """The :class:`Grid` of ``spec``'s activation quantizer, or None (no activations quantized, or no fused pass)."""
    return None if spec.a_bits is None else ACTIVATION_FORMATS.get(spec.a_format).grid(spec)


def quantize_input(x: torch.Tensor, spec, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` fake-quantized as ``spec`` says (``a_bits`` None: unchanged)."""
    if spec.a_bits is None:
        return x
    return ACTIVATION_FORMATS.get(spec.a_format).quantize(x, spec, static_scale)


def validate_activation_spec(spec, where: str) -> None:
    """One-line :class:`ConfigError` for an activation setting the formats cannot run; fills a block format's
    ``a_group_size`` when left null."""
    if spec.a_format not in ACTIVATION_FORMATS:
        raise ConfigError(f"{where}.a_format: unknown activation format {spec.a_format!r}; known: "
                          f"{', '.join(ACTIVATION_FORMATS)}")
    fmt = ACTIVATION_FORMATS.get(spec.a_format)
    if spec.a_bits is None:
        if spec.a_format != "int" or spec.a_group_size is not None or spec.a_granularity == "per_group":
            raise ConfigError(f"{where}: a_format / a_group_size / per_group quantize activations; set a_bits "
                              "or leave them at their defaults")
        return
    if fmt.bits is not None and spec.a_bits != fmt.bits:
        raise ConfigError(f"{where}.a_bits: a_format {spec.a_format!r} has {fmt.bits} bits, got a_bits "
                          f"{spec.a_bits}")
    if spec.a_granularity == "static" and spec.a_format != "int":
        raise ConfigError(f"{where}: static activation scales are integer-only; use a_granularity per_token "
                          f"or per_group with a_format {spec.a_format!r}")
    if fmt.block is not None and spec.a_granularity != "per_group":
        raise ConfigError(f"{where}: a_format {spec.a_format!r} scales blocks of {fmt.block} inputs; set "
                          f"a_granularity: per_group (a_group_size: {fmt.block})")
    if spec.a_granularity == "per_group":
        if fmt.block is not None and spec.a_group_size is None:
            spec.a_group_size = fmt.block
        if spec.a_group_size is None:
            raise ConfigError(f"{where}: a_granularity per_group needs a_group_size (e.g. 16, 32 or 64)")
        if spec.a_group_size <= 0 or (fmt.block is not None and spec.a_group_size != fmt.block):
            need = f"{fmt.block} for a_format {spec.a_format!r}" if fmt.block else "positive"
            raise ConfigError(f"{where}.a_group_size: must be {need}, got {spec.a_group_size}")
    elif spec.a_group_size is not None:
        raise ConfigError(f"{where}.a_group_size: only used with a_granularity per_group "
                          f"(got {spec.a_granularity!r})")


def check_activation_fits(name: str, linear: nn.Linear, spec) -> None:
    """The activation groups must tile the layer's input width."""
    if spec.a_bits is not None and spec.a_group_size and linear.in_features % spec.a_group_size:
        raise ConfigError(f"{name}: in_features {linear.in_features} is not divisible by a_group_size "
                          f"{spec.a_group_size}; pick a divisor")
