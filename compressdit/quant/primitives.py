"""Pure integer quantization primitives: scales, round-to-nearest, bit packing. No modules here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def int_range(bits: int) -> tuple[int, int]:
    """Signed integer range used for every ``bits``: [-2^(b-1), 2^(b-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class IntQuantized:
    """Signed integer codes with per-row (or per-group) scales and optional zero points."""

    codes: torch.Tensor          # int8 values in int_range(bits), shape [rows, cols]
    scale: torch.Tensor          # fp32 [rows, groups]
    zero: torch.Tensor | None    # fp32 [rows, groups] in the integer domain, None when symmetric
    bits: int
    group_size: int | None

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero, dtype)


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    rows, cols = weight.shape
    if group_size is None:
        return weight.reshape(rows, 1, cols)
    if cols % group_size:
        raise ValueError(f"in_features {cols} is not divisible by group_size {group_size}")
    return weight.reshape(rows, cols // group_size, group_size)


def _round_grouped(w: torch.Tensor, bits: int, symmetric: bool, shrink: torch.Tensor | float = 1.0):
    """Codes, scale and zero point of grouped weights ``[rows, groups, size]`` with the range shrunk by ``shrink``."""
    qmin, qmax = int_range(bits)
    if symmetric:
        scale = w.abs().amax(-1).clamp_min(1e-8) * shrink / qmax
        return torch.round(w / scale.unsqueeze(-1)).clamp(qmin, qmax), scale, None
    w_min, w_max = w.amin(-1).clamp(max=0) * shrink, w.amax(-1).clamp(min=0) * shrink
    scale = (w_max - w_min).clamp_min(1e-8) / (qmax - qmin)
    zero = torch.round(qmin - w_min / scale)
    return torch.round(w / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(qmin, qmax), scale, zero


MSE_CHUNK = 1 << 20  # weights per slice of groups the range search evaluates at once (4 MiB of fp32)


def _mse_shrink(w: torch.Tensor, bits: int, symmetric: bool, candidates: int = 20, lowest: float = 0.5):
    """Per-group range shrink factor in ``[lowest, 1]`` that minimises the weight's quantization MSE.

    Groups are searched a cache-sized slice at a time into one reused buffer (in-place ops); every candidate's
    codes and error are the same float operations as :func:`_round_grouped`, so the choices are too."""
    qmin, qmax = int_range(bits)
    flat = w.reshape(-1, w.shape[-1])
    best = torch.ones(flat.shape[0], device=w.device)
    factors = torch.linspace(1.0, lowest, candidates).tolist()
    step = max(1, MSE_CHUNK // flat.shape[1])
    buffer = torch.empty(min(step, flat.shape[0]), flat.shape[1], dtype=flat.dtype, device=w.device)
    for start in range(0, flat.shape[0], step):
        part, chosen = flat[start:start + step], best[start:start + step]
        q = buffer[:part.shape[0]]
        if symmetric:
            top = part.abs().amax(-1).clamp_min(1e-8)
        else:
            low, high = part.amin(-1).clamp(max=0), part.amax(-1).clamp(min=0)
        best_error = torch.full(chosen.shape, float("inf"), device=w.device)
        for factor in factors:
            if symmetric:  # _round_grouped's scale and codes
                scale = top * factor / qmax
                torch.div(part, scale.unsqueeze(-1), out=q).round_().clamp_(qmin, qmax)
            else:
                w_min, w_max = low * factor, high * factor
                scale = (w_max - w_min).clamp_min(1e-8) / (qmax - qmin)
                zero = torch.round(qmin - w_min / scale).unsqueeze(-1)
                torch.div(part, scale.unsqueeze(-1), out=q).add_(zero).round_().clamp_(qmin, qmax).sub_(zero)
            error = q.mul_(scale.unsqueeze(-1)).sub_(part).pow_(2).sum(-1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            chosen.copy_(torch.where(better, factor, chosen))
    return best.reshape(w.shape[:-1])


def all_finite(x: torch.Tensor) -> bool:
    """No NaN nor inf in ``x``: one reduction (``aminmax`` carries a NaN or an inf into its result), where
    ``torch.isfinite(x).all()`` first writes a bool per element (20-40x slower on a large weight, one thread)."""
    if x.numel() == 0 or not x.is_floating_point():
        return True
    if x.element_size() == 1:  # float8: no aminmax kernel
        return bool(torch.isfinite(x.float()).all())
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def quantize_weight_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None,
                        symmetric: bool = True, weight_range: str = "minmax") -> IntQuantized:
    """Round-to-nearest per output row (or per group of ``group_size`` inputs).

    ``weight_range="minmax"`` maps each group's min/max onto the integer range; ``"mse"`` first
    shrinks that range by the factor (grid over [0.5, 1]) minimising the group's squared error.
    """
    check_bits(bits, "weight bits")
    if not all_finite(weight):
        raise ValueError("weight contains NaN or inf")
    w = _grouped(weight.detach().float(), group_size)
    shrink = _mse_shrink(w, bits, symmetric) if weight_range == "mse" else 1.0
    codes, scale, zero = _round_grouped(w, bits, symmetric, shrink)
    return IntQuantized(codes.reshape(weight.shape).to(torch.int8), scale, zero, bits, group_size)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_weight_rtn`; groups are inferred from ``scale``'s shape."""
    rows, cols = codes.shape
    groups = scale.shape[1]
    q = codes.float().reshape(rows, groups, cols // groups)
    if zero is not None:
        q = q - zero.unsqueeze(-1)
    return (q * scale.unsqueeze(-1)).reshape(rows, cols).to(dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes: 5-8 bits stay int8; 3-4 bits go two per uint8; 2 bits four per uint8."""
    check_bits(bits)
    if bits > 4:
        return codes.to(torch.int8)
    per_byte = 4 if bits == 2 else 2
    width = 8 // per_byte
    rows, cols = codes.shape
    if cols % per_byte:
        raise ValueError(f"cannot pack {cols} columns {per_byte} per byte")
    unsigned = (codes.to(torch.int16) - int_range(bits)[0]).to(torch.uint8).reshape(rows, cols // per_byte, per_byte)
    packed = torch.zeros(rows, cols // per_byte, dtype=torch.uint8, device=codes.device)
    for i in range(per_byte):
        packed |= unsigned[..., i] << (width * i)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`, returning int8 codes of shape ``[rows, cols]``."""
    check_bits(bits)
    if bits > 4:
        return packed
    per_byte = 4 if bits == 2 else 2
    width = 8 // per_byte
    mask = (1 << width) - 1
    parts = [(packed >> (width * i)) & mask for i in range(per_byte)]
    unsigned = torch.stack(parts, dim=-1).reshape(packed.shape[0], cols)
    return (unsigned.to(torch.int16) + int_range(bits)[0]).to(torch.int8)


def packed_shape(rows: int, cols: int, bits: int) -> tuple[tuple[int, int], torch.dtype]:
    """Storage shape and dtype of packed codes for a ``[rows, cols]`` weight."""
    if bits > 4:
        return (rows, cols), torch.int8
    per_byte = 4 if bits == 2 else 2
    return (rows, cols // per_byte), torch.uint8


def fake_quantize_activation(x: torch.Tensor, bits: int, granularity: str,
                             static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric activation quantize-dequantize: dynamic per token / per tensor, or a static scale."""
    check_bits(bits, "activation bits")  # bits=1 would divide by qmax=0 and silently return NaN
    qmin, qmax = int_range(bits)
    if static_scale is not None:
        scale = static_scale.to(x.dtype)
    elif granularity == "per_token":
        scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
    else:
        scale = x.detach().abs().amax().clamp_min(1e-8) / qmax
    # straight-through rounding keeps gradients flowing to inputs (e.g. for adapters in training)
    q = x / scale
    if static_scale is not None:  # only a static scale really saturates: no gradient there
        q = torch.clamp(q, qmin, qmax)
    # dynamic scales: each token's max lands on qmax up to float error; clamping there would zero its gradient
    q = q + (torch.round(q).clamp(qmin, qmax) - q).detach()
    return q * scale
