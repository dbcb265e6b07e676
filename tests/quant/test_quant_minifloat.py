"""Minifloat codecs against hand-written value tables, ties, saturation and torch's float8 dtypes."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant.minifloat import MINIFLOATS, pack_nibbles, unpack_nibbles

# Every non-negative finite value, written out by hand from the format definitions.
HAND_VALUES = {
    "e2m1": [0, 0.5, 1, 1.5, 2, 3, 4, 6],
    "e3m0": [0, 0.25, 0.5, 1, 2, 4, 8, 16],
    "e1m2": [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5],
    "e2m3": [0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,
             2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5],
    "e3m2": [0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 0.875, 1, 1.25, 1.5, 1.75,
             2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28],
}


@pytest.mark.parametrize("name", sorted(HAND_VALUES))
def test_every_representable_value_matches_the_hand_table(name):
    fmt = MINIFLOATS.get(name)
    assert fmt.values().tolist() == HAND_VALUES[name]
    values = torch.tensor(HAND_VALUES[name], dtype=torch.float32)
    both = torch.cat([values, -values[1:]])
    assert torch.equal(fmt.round(both), both)  # representable values are fixed points
    assert torch.equal(fmt.decode(fmt.encode(both)), both)


def test_e2m1_codes_are_sign_exponent_mantissa():
    fmt = MINIFLOATS.get("e2m1")
    x = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6])
    assert fmt.encode(x).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15]
    assert fmt.decode(torch.arange(16)).tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6]


@pytest.mark.parametrize("name, ties, expected", [
    ("e2m1", [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], [0, 1, 1, 2, 2, 4, 4]),  # ModelOpt's thresholds
    ("e2m1", [0.26, 0.74, 2.51, 4.99, 5.01], [0.5, 0.5, 3, 4, 6]),
    ("e3m0", [0.125, 0.375, 0.75, 1.5, 3, 12], [0, 0.5, 1, 2, 4, 16]),  # ulp 2^e: 1.5 * 2^e rounds up
    ("e1m2", [0.25, 0.75, 3.25], [0, 1, 3]),
    ("e2m3", [0.0625, 0.1875, 7.25], [0, 0.25, 7]),
    ("e3m2", [0.03125, 0.09375, 26.0], [0, 0.125, 24]),
])
def test_ties_round_to_even(name, ties, expected):
    fmt = MINIFLOATS.get(name)
    x = torch.tensor(ties)
    assert fmt.round(x).tolist() == expected
    assert fmt.round(-x).tolist() == [-v for v in expected]


@pytest.mark.parametrize("name", sorted(MINIFLOATS))
def test_values_beyond_the_maximum_saturate(name):
    fmt = MINIFLOATS.get(name)
    big = torch.tensor([fmt.max_value * 1.01, fmt.max_value * 1e3, 1e30])
    assert fmt.round(big).tolist() == [fmt.max_value] * 3
    assert fmt.decode(fmt.encode(-big)).tolist() == [-fmt.max_value] * 3


def test_maxima_and_bit_widths():
    expected = {"e2m1": (4, 6), "e3m0": (4, 16), "e1m2": (4, 3.5), "e2m3": (6, 7.5), "e3m2": (6, 28),
                "e4m3": (8, 448), "e5m2": (8, 57344)}
    assert {name: (MINIFLOATS.get(name).bits, MINIFLOATS.get(name).max_value) for name in expected} == expected


@pytest.mark.parametrize("name, dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_codecs_match_torch_float8_bit_for_bit(name, dtype):
    fmt = MINIFLOATS.get(name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen) * torch.exp2(torch.randint(-20, 17, (20000,), generator=gen).float())
    x = x.clamp(-fmt.max_value, fmt.max_value)
    codes = fmt.encode(x)
    assert torch.equal(codes, x.to(dtype).view(torch.uint8))
    assert torch.equal(fmt.round(x), x.to(dtype).float())
    finite = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite_codes = torch.arange(256)[finite.isfinite()]
    assert torch.equal(fmt.decode(finite_codes), finite[finite.isfinite()])
    assert fmt.values().max().item() == torch.finfo(dtype).max


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(MINIFLOATS))
def test_encode_is_round_taken_apart(name, dtype):
    """``encode`` (a binary search over tie-adjusted midpoints) gives the code of ``round``'s value, sign bit from
    ``x < 0``: at every value, every midpoint and one step either side of it, both signs, saturating beyond the
    maximum, tiny values, inputs in every float dtype."""
    fmt = MINIFLOATS.get(name)
    values = fmt.values()
    midpoints = (values[:-1] + values[1:]) / 2
    up, down = torch.tensor(torch.inf), torch.tensor(-torch.inf)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([values, midpoints, torch.nextafter(midpoints, up), torch.nextafter(midpoints, down),
                   torch.randn(20000, generator=gen) * fmt.max_value / 3, torch.randn(20000, generator=gen) * values[1],
                   torch.tensor([fmt.max_value * 10, 1e-30, 0.0])])
    x = torch.cat([x, -x]).to(dtype)
    x = x[torch.isfinite(x)]
    codes = fmt.encode(x)
    expected = fmt.round(x).abs()
    assert torch.equal(fmt.decode(codes & ((1 << (fmt.bits - 1)) - 1)), expected)
    assert torch.equal(codes >> (fmt.bits - 1), (x < 0).to(torch.uint8))


@pytest.mark.parametrize("name", ["e2m1", "e3m0", "e1m2"])
def test_four_bit_codes_from_one_c_pass_are_the_pytorch_codes(name, monkeypatch):
    """4-bit formats encode in one C pass (``encode_nibble_codes``; ~20 PyTorch passes before): the PyTorch path's
    codes at every value, midpoint and one step either side, +-0, saturation, random values; 2-D."""
    from compressdit.quant import minifloat
    from compressdit.quant.cpu_native import encode_nibble_codes, native_library

    fmt = MINIFLOATS.get(name)
    values = fmt.values()
    midpoints = (values[:-1] + values[1:]) / 2
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([values, midpoints, torch.nextafter(midpoints, torch.tensor(torch.inf)),
                   torch.nextafter(midpoints, torch.tensor(-torch.inf)), torch.tensor([0.0, fmt.max_value * 1e3]),
                   torch.randn(3993, generator=gen) * fmt.max_value / 2])
    x = torch.cat([x, -x]).view(-1, 16)
    fast = encode_nibble_codes(x, fmt._boundaries, fmt.bits - 1)
    if native_library() is None:
        assert fast is None
        return
    monkeypatch.setattr(minifloat, "encode_nibble_codes", lambda *args: None)
    slow = fmt.encode(x)
    assert fast.shape == x.shape and fast.dtype == torch.uint8 and torch.equal(fast, slow)
    assert int(fast[x == -0.0].max()) == 0  # -0: no sign bit, as x < 0


def test_encode_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        MINIFLOATS.get("e2m1").encode(torch.tensor([1.0, float("nan")]))


def test_nibble_packing_puts_even_elements_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_nibbles(packed), codes)
    with pytest.raises(ValueError, match="odd"):
        pack_nibbles(torch.zeros(2, 3))
