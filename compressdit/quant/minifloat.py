"""Minifloat ExMy codecs: round to nearest even with saturation, encode to bit codes, decode. Pure functions.

A code is ``sign << (E + M) | exponent << M | mantissa`` (an unsigned integer; ``uint8`` storage). Exponent
field 0 holds the subnormals ``m / 2^M * 2^(1 - bias)``; the others ``(1 + m / 2^M) * 2^(e - bias)``. The
formats follow the OCP Microscaling (MX) v1.0 element types and ModelOpt: E2M1 / E2M3 / E3M2 have no inf nor
NaN (every code is a number); E4M3 is ``float8_e4m3fn`` (no inf, only ``S.1111.111`` is NaN, max 448); E5M2
is IEEE-like (exponent 31 is inf/NaN, max 57344). E3M0 and E1M2 (FP4DiT's weight formats) use the same rules
with bias ``2^(E-1) - 1``. Values beyond the largest finite one saturate to it (never inf).

Ties go to the even multiple of the ulp (``torch.round``): for E2M1, 0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4 (ModelOpt's thresholds); for E3M0, whose ulp at 2^e is 2^e, a tie
``1.5 * 2^e`` goes up to ``2^(e+1)``.

Example::

    >>> MINIFLOATS.get("e2m1").round(torch.tensor([0.3, 2.6, 7.0]))
    tensor([0.5000, 3.0000, 6.0000])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressdit.quant.cpu_native import encode_nibble_codes
from compressdit.quant.primitives import all_finite
from compressdit.registry import Registry


@dataclass(frozen=True)
class Minifloat:
    """A sign + ``exponent_bits`` + ``mantissa_bits`` float format (see the module docstring)."""

    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_value: float
    _table: torch.Tensor = field(init=False, repr=False, compare=False)
    _boundaries: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_table", self._build_table())
        object.__setattr__(self, "_boundaries", self._build_boundaries())

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    def _magnitude(self, code: int) -> float:
        exponent, mantissa = code >> self.mantissa_bits, code & ((1 << self.mantissa_bits) - 1)
        fraction = mantissa / (1 << self.mantissa_bits)
        if exponent == 0:
            return fraction * 2.0 ** self.min_normal_exponent
        return (1 + fraction) * 2.0 ** (exponent - self.bias)

    def _build_table(self) -> torch.Tensor:
        """Value of every code; codes above ``max_value`` (inf / NaN encodings) decode to NaN."""
        half = 1 << (self.exponent_bits + self.mantissa_bits)
        magnitudes = [self._magnitude(c) for c in range(half)]
        magnitudes = [m if m <= self.max_value else float("nan") for m in magnitudes]
        return torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.float32)

    def _build_boundaries(self) -> torch.Tensor:
        """The midpoints between consecutive finite magnitudes (codes 0, 1, 2, ... in order), each one fp32 step
        lower where :meth:`round` sends that tie up (to the even code), so that ``torch.bucketize`` of a magnitude
        (ties to the lower bucket) is its code. The midpoints of these few-bit values are exact in fp32."""
        values = self.values()
        midpoints = (values[:-1] + values[1:]) / 2
        up = self.round(midpoints) == values[1:]
        return torch.where(up, torch.nextafter(midpoints, torch.tensor(-torch.inf)), midpoints)

    def values(self) -> torch.Tensor:
        """Every finite non-negative value, ascending (E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6)."""
        table = self._table[: len(self._table) // 2]
        return table[~table.isnan()]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (already scaled) rounded to the nearest value of the format, ties to even, saturating; fp32."""
        x = x.float()
        magnitude = x.abs().clamp(max=self.max_value)
        _, exponent = torch.frexp(magnitude)  # magnitude = f * 2^exponent, f in [0.5, 1)
        exponent = (exponent - 1).clamp(min=self.min_normal_exponent)
        ulp = torch.exp2((exponent - self.mantissa_bits).float())
        rounded = (torch.round(magnitude / ulp) * ulp).clamp(max=self.max_value)
        return torch.copysign(rounded, x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (``uint8``) of ``x`` rounded as :meth:`round`; the sign bit is set for negative inputs."""
        if not all_finite(x):
            raise ValueError(f"cannot encode NaN or inf as E{self.exponent_bits}M{self.mantissa_bits}")
        # finite magnitudes ascend with their codes: the code is the number of tie-adjusted midpoints a magnitude
        # passes (past the last one it saturates to the largest), where rounding then taking the value apart took a
        # dozen passes. 4-bit formats (7 midpoints) count them, 3x faster than a binary search; wider ones search.
        if len(self._boundaries) == 7 and x.device.type == "cpu":  # 4-bit: one C pass, the same codes
            fast = encode_nibble_codes(x.float().contiguous(), self._boundaries, self.exponent_bits + self.mantissa_bits)
            if fast is not None:
                return fast
        magnitude = x.float().abs()
        if len(self._boundaries) < 16:
            code = torch.zeros(magnitude.shape, dtype=torch.uint8, device=x.device)
            for boundary in self._boundaries.tolist():  # exact: fp32 values compared in fp32
                code += magnitude > boundary
        else:
            code = torch.bucketize(magnitude, self._boundaries.to(x.device), out_int32=True).to(torch.uint8)
        return code | ((x < 0).to(torch.uint8) << (self.exponent_bits + self.mantissa_bits))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """fp32 values of ``codes`` (any integer dtype)."""
        return self._table.to(codes.device)[codes.long()]


MINIFLOATS: Registry[Minifloat] = Registry("minifloat format")

# name: (E, M, max); bias 2^(E-1) - 1. Maxima: top exponent all values (OCP FP4/FP6, E3M0, E1M2); E4M3 loses its
# top code to NaN (448 = 1.75 * 2^8); E5M2 keeps exponent 31 for inf/NaN (57344 = 1.75 * 2^15).
for _name, (_e, _m, _max) in {"e2m1": (2, 1, 6.0), "e3m0": (3, 0, 16.0), "e1m2": (1, 2, 3.5),
                              "e2m3": (2, 3, 7.5), "e3m2": (3, 2, 28.0),
                              "e4m3": (4, 3, 448.0), "e5m2": (5, 2, 57344.0)}.items():
    MINIFLOATS.add(_name, Minifloat(_e, _m, 2 ** (_e - 1) - 1, _max))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[..., 2n]`` -> ``uint8 [..., n]``, element ``2i`` in the low nibble (ModelOpt's order)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack {codes.shape[-1]} 4-bit codes two per byte (odd count)")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``uint8 [..., n]`` -> codes ``uint8 [..., 2n]``."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
