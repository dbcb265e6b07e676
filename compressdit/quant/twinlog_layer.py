"""Twin-log linears (format ``twinlog``, LRQ-DiT): packed signed log codes + per-row parameters, with an optional
channel balancing and an input rotation (randomized Hadamard or DuQuant's outlier rotation) folded in.

Checkpoint tensors of a layer ``L`` (all saved as stored, never cast to the model's dtype):

===========================  ====================================  =============================================
tensor                       dtype / shape                         meaning
===========================  ====================================  =============================================
``L.weight``                 uint8 ``[out, in/2]`` (w_bits 3-4)    signed codes, packed as the ``int`` format's
``L.weight_scale``           fp32 ``[out, 2]``                     log2 step per row, positive / negative side
``L.weight_zero``            fp32 ``[out, 2]``                     log2 of each side's smallest magnitude (+ eta)
``L.weight_eta``             fp32 ``[out, 1]``                     offset eta of the log per row
``L.smooth_scale``           fp32 ``[in]`` (``balance``)           activations divided by it, weights multiplied
``L.rotation_signs``         int8 ``[in]`` (``hadamard``)          randomized block Hadamard
``L.rotation_first_steps``   int16 ``[in/B, 256]``                 DuQuant ``R1 P R2`` (``rotation: duquant``):
``L.rotation_perm``          int16 ``[in]`` (int32 past 32767)     block rotations as greedy step codes
``L.rotation_second_steps``  int16 ``[in/B, 256]``                 (-1 padded), ``P`` as an index vector
===========================  ====================================  =============================================

The DuQuant blocks are rebuilt from their step codes at the first forward after a load (elementwise ops and
seeded sign draws: bit for bit what quantization computed) and cached, never saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.errors import ConfigError
from compressdit.quant.activations import check_activation_fits, quantize_input
from compressdit.quant.duquant import (DEFAULT_STEPS, OutlierRotation, OutlierRotationCodes, RotationSteps,
                                      duquant_block, fit_outlier_rotation, perm_dtype)
from compressdit.quant.format_registry import LinearFormat
from compressdit.quant.gpu_reference import pack_nibbles
from compressdit.quant.kernel_registry import kernel_cache, run_cached, version_of
from compressdit.quant.layers import PackedParameter, QuantizedLinear, QuantState
from compressdit.quant.primitives import pack_codes, packed_shape, unpack_codes
from compressdit.quant.rotation import fwht, hadamard_block, random_signs, rotate
from compressdit.quant.spec import LinearQuantSpec, reject_unused_fields
from compressdit.quant.twinlog import twinlog_dequantize, twinlog_quantize
from compressdit.registry import Registry


@dataclass(frozen=True)
class InputRotation:
    """An orthogonal ``T`` on a layer's input: ``empty(in)`` -> its stored tensors, ``fit(in, absmax, steps)`` ->
    their values, ``prepare(states)`` -> what the runtime uses (rebuilt from the stored tensors, cached by the
    layer), ``apply(x, prepared)`` = ``x T``, ``invert(w, prepared)`` = ``w T^T``."""

    empty: Callable[[int], dict[str, torch.Tensor]]
    fit: Callable[[int, torch.Tensor | None, int], dict[str, torch.Tensor]]
    prepare: Callable[[dict], Any]
    apply: Callable[[torch.Tensor, Any], torch.Tensor]
    invert: Callable[[torch.Tensor, Any], torch.Tensor]


INPUT_ROTATIONS: Registry[InputRotation] = Registry("input rotation")


def _duquant_empty(width: int) -> dict[str, torch.Tensor]:
    blocks = width // duquant_block(width)
    steps = torch.full((blocks, DEFAULT_STEPS), -1, dtype=torch.int16)
    return {"rotation_first_steps": steps, "rotation_perm": torch.arange(width, dtype=perm_dtype(width)),
            "rotation_second_steps": steps.clone()}


def _duquant_fit(width: int, absmax: torch.Tensor | None, steps: int) -> dict[str, torch.Tensor]:
    if absmax is None:
        raise ValueError("rotation 'duquant' is fitted to calibrated input absmax: run a calibrate stage first")
    if not 0 < steps <= DEFAULT_STEPS:
        raise ValueError(f"duquant steps must be in 1..{DEFAULT_STEPS} (the stored length), got {steps}")
    r = fit_outlier_rotation(absmax, steps=steps)
    pad = lambda codes: F.pad(codes, (0, DEFAULT_STEPS - steps), value=-1)  # noqa: E731
    return {"rotation_first_steps": pad(r.first), "rotation_perm": r.perm, "rotation_second_steps": pad(r.second)}


def _duquant_prepare(states: dict) -> OutlierRotation:
    codes = OutlierRotationCodes(states["rotation_first_steps"], states["rotation_perm"],
                                 states["rotation_second_steps"])
    r, device = codes.rotation(), states["rotation_perm"].device
    return OutlierRotation(r.first.to(device), r.perm.to(device), r.second.to(device)).with_dense()


INPUT_ROTATIONS.add("none", InputRotation(lambda width: {}, lambda width, absmax, steps: {}, lambda s: None,
                                          lambda x, r: x, lambda w, r: w))
INPUT_ROTATIONS.add("hadamard", InputRotation(
    lambda width: {"rotation_signs": torch.ones(width, dtype=torch.int8)},
    lambda width, absmax, steps: {"rotation_signs": random_signs(width, 0)},
    lambda s: s["rotation_signs"],
    rotate,
    lambda w, signs: fwht(w, hadamard_block(w.shape[-1])) * signs.to(w.dtype)))
INPUT_ROTATIONS.add("duquant", InputRotation(_duquant_empty, _duquant_fit, _duquant_prepare,
                                             lambda x, r: r.apply(x), lambda w, r: r.invert(w)))


class TwinLogLinear(QuantizedLinear):
    """``nn.Linear`` with twin-log weights (``format: twinlog``); activations as the spec's ``a_format``.

    YAML (``recipes/lrq-w4a4.yaml``, method ``lrq`` picks each layer's rotation)::

        - {match: "re:.*", spec: {format: twinlog, w_bits: 4, a_bits: 4, a_granularity: per_group,
                                  a_group_size: 64, balance: 0.5}}
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LinearQuantSpec,
                 device=None, dtype=None) -> None:
        self._init_shape(in_features, out_features, spec)
        shape, storage = packed_shape(out_features, in_features, spec.w_bits)
        self.weight = PackedParameter.empty(shape, storage, out_features, in_features, device)
        self.weight_scale = QuantState(torch.ones(out_features, 2, device=device))
        self.weight_zero = QuantState(torch.zeros(out_features, 2, device=device))
        self.weight_eta = QuantState(torch.zeros(out_features, 1, device=device))
        names = ["weight", "weight_scale", "weight_zero", "weight_eta"]
        self.smooth_scale = QuantState(torch.ones(in_features, device=device)) if spec.balance is not None else None
        names += ["smooth_scale"] if self.smooth_scale is not None else []
        self.rotation_names = tuple(INPUT_ROTATIONS.get(spec.rotation).empty(in_features))
        for name, value in INPUT_ROTATIONS.get(spec.rotation).empty(in_features).items():
            setattr(self, name, QuantState(value.to(device)))
        self.quantized_tensors = (*names, *self.rotation_names)
        self._init_bias(bias, device, dtype)

    @property
    def rotation_states(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.rotation_names}

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearQuantSpec, input_absmax: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None, steps: int = DEFAULT_STEPS) -> "TwinLogLinear":
        """Quantize a float ``linear``: balancing (needs ``input_absmax``), the spec's rotation (``duquant`` is
        fitted to the balanced absmax), then TLQ with its clipping searched on the output error under
        ``hessian`` (``2 X^T X / n`` of the layer's calibration inputs, original input space) when given."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        weight = linear.weight.detach().float()
        absmax = None if input_absmax is None else input_absmax.to(weight.device).float()
        weight, absmax = module.fold_balancing(weight, absmax)
        for name, value in INPUT_ROTATIONS.get(spec.rotation).fit(linear.in_features, absmax, steps).items():
            getattr(module, name).data = value.to(weight.device)
        weight = module.rotate(weight)
        if hessian is not None:  # H of the inputs the quantized weight sees: T^T diag(1/s) H diag(1/s) T
            h = hessian.to(weight.device).float()
            if module.smooth_scale is not None:
                h = h / module.smooth_scale[:, None] / module.smooth_scale[None, :]
            hessian = module.rotate(module.rotate(h).T.contiguous())
        q = twinlog_quantize(weight, spec.w_bits, hessian)
        module.load_codes(q.codes, q.delta, q.low, q.eta)
        if module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def prepared_rotation(self) -> Any:
        """The rotation's runtime form (DuQuant's dense blocks), rebuilt from the stored tensors when they change
        (a load, a device move); never saved."""
        states = self.rotation_states
        if torch.compiler.is_compiling():  # no cache to key on data pointers: the rebuild is traced
            return INPUT_ROTATIONS.get(self.spec.rotation).prepare(states)
        key = tuple((t.data_ptr(), version_of(t), t.device) for t in states.values())
        cached = self.__dict__.get("_prepared_rotation")
        if cached is None or cached[0] != key:
            cached = (key, INPUT_ROTATIONS.get(self.spec.rotation).prepare(states))
            self.__dict__["_prepared_rotation"] = cached
        return cached[1]

    def rotation_steps(self) -> RotationSteps | None:
        """DuQuant's rotation as its steps (the form of the CPU kernels' C pass), ``None`` for other rotations."""
        if self.spec.rotation != "duquant":
            return None
        return OutlierRotationCodes(self.rotation_first_steps, self.rotation_perm, self.rotation_second_steps).steps()

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x T`` along the last dim (the rotation only; no balancing)."""
        return INPUT_ROTATIONS.get(self.spec.rotation).apply(x, self.prepared_rotation())

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_scale is not None:
            x = x / self.smooth_scale.to(x.dtype)
        return self.rotate(x)

    def load_codes(self, codes: torch.Tensor, delta: torch.Tensor, low: torch.Tensor, eta: torch.Tensor) -> None:
        self.weight.data = pack_codes(codes, self.spec.w_bits).to(self.weight.device)
        self.weight_scale.copy_(delta)
        self.weight_zero.copy_(low)
        self.weight_eta.copy_(eta)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.weight.data, self.spec.w_bits, self.in_features)

    def fp32_decoding(self) -> tuple | None:
        """Codes of up to 4 bits: offset nibbles (``code + 8``, a packed copy) and each row's 16 magnitudes with their
        signs (:func:`~compressdit.quant.twinlog.twinlog_dequantize` of every code), no scale."""
        if self.spec.w_bits > 4:
            return None
        table = (torch.arange(16, dtype=torch.int32) - 8).expand(self.out_features, 16)
        values = twinlog_dequantize(table, self.weight_scale, self.weight_zero, self.weight_eta)
        return "nibbles", pack_nibbles(self.codes()), values.float().contiguous(), None, None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in the rotated (and balanced) input space, decoded from the stored codes."""
        return twinlog_dequantize(self.codes(), self.weight_scale, self.weight_zero, self.weight_eta, dtype)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        weight = INPUT_ROTATIONS.get(self.spec.rotation).invert(self.dequantized_weight(), self.prepared_rotation())
        if self.smooth_scale is not None:
            weight = weight / self.smooth_scale
        return weight.to(dtype)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The registered kernel on the transformed input where one applies (``cpu-twinlog-dense``), else the
        reference."""
        cache = kernel_cache(self, x)
        if cache is None:
            return self.reference_forward(x)
        if cache.kernel.run_untransformed is not None:  # the kernel transforms the input itself
            return run_cached(self, cache, x, untransformed=True)
        return run_cached(self, cache, self.transform_input(x))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform the input, fake-quantize it, matmul with the decoded weight (in ``x``'s dtype)."""
        x = quantize_input(self.transform_input(x), self.spec)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


def _validate(spec: LinearQuantSpec, where: str) -> None:
    reject_unused_fields(spec, where, ("group_size", "w_symmetric: false", "w_range: mse", "low_rank",
                                       "vector_dim / codebook_size / row_scale", "a_granularity: static"),
                         "has per-row log parameters chosen by its own search and dynamic activations")
    if spec.w_bits > 4:
        raise ConfigError(f"{where}.w_bits: format 'twinlog' is a low-bit format (2-4 bits), got {spec.w_bits}")


def _fits(name: str, linear: nn.Linear, spec: LinearQuantSpec) -> None:
    per_byte = 4 if spec.w_bits == 2 else 2
    if linear.in_features % per_byte:
        raise ConfigError(f"{name}: in_features {linear.in_features} cannot be packed {per_byte} codes per byte")
    if spec.rotation != "none" and hadamard_block(linear.in_features) < 2:
        raise ConfigError(f"{name}: rotation {spec.rotation!r} needs an even in_features, got {linear.in_features}")
    check_activation_fits(name, linear, spec)


TWINLOG_FORMAT = LinearFormat(TwinLogLinear, TwinLogLinear.from_linear, _validate, _fits,
                              rotations=tuple(INPUT_ROTATIONS))
