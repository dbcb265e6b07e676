"""The registry of weight formats (``int``, ``vq``, ``fp8``, ...): filled by :mod:`compressdit.quant.formats`.

Kept apart from the formats themselves so that the layer spec can look a format up without importing the
quantized layers (which import the spec): ``import compressdit.quant`` registers every shipped format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from compressdit.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compressdit.quant.spec import LinearQuantSpec


@dataclass(frozen=True)
class LinearFormat:
    """How a format builds empty modules (loading), quantizes float ones, validates a spec (filling the
    format's defaults) and checks that a layer fits."""

    module_class: type[nn.Module]
    quantize: Callable[[nn.Linear, LinearQuantSpec, torch.Tensor | None], nn.Module]
    validate_spec: Callable[[LinearQuantSpec, str], None]
    check_fits: Callable[[str, nn.Linear, LinearQuantSpec], None]
    roundings: tuple[str, ...] = ("rtn",)  # spec.rounding values; other than rtn, ``quantize`` takes ``hessian=``
    rotations: tuple[str, ...] = ("none", "hadamard")  # spec.rotation values the format's modules apply

    def empty(self, linear: nn.Linear, spec: LinearQuantSpec) -> nn.Module:
        return self.module_class(linear.in_features, linear.out_features, linear.bias is not None, spec,
                                 device=linear.weight.device, dtype=linear.weight.dtype)


FORMATS: Registry[LinearFormat] = Registry("format")
