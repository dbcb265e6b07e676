"""``cpu-int-groups``: low-bit activations in groups as integer codes (bit for bit the fake quantization's values) times
4-bit weight codes in one integer GEMM (AVX512-VNNI), the reference's numbers up to summation order; and
``cpu-twinlog-groups``: twin-log weights as 16-bit integers (two byte planes) in the same GEMM, the reference's numbers
within half a step of each channel's 16-bit grid."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant import cpu_kernels, cpu_native
from compressdit.quant.activations import Grid, activation_grid, quantize_input
from compressdit.quant.cpu_kernels import (AVX2_MIN_GROUP, OFFSET_NIBBLE_CODES, PLANE_MAX, grid_multiplier,
                                           integer_groups_apply, integer_multiplier, nibble_table, pack_planes,
                                           pack_weight, stored_nibble_weight, twinlog_groups_apply)
from compressdit.quant.cpu_native import grid_codes, group_gemm, group_gemm_isa, native_library
from compressdit.quant.formats import FORMATS
from compressdit.quant.kernel_registry import kernel_summary, set_kernel
from compressdit.quant.minifloat import unpack_nibbles
from compressdit.quant.spec import LinearQuantSpec
from tests.conftest import fresh_cache, native_ops_built

SPECS = {
    "rtn-w4a4": dict(w_bits=4, group_size=16, a_bits=4, a_granularity="per_group", a_group_size=16),
    "svdquant-w4a4": dict(w_bits=4, group_size=64, a_bits=4, a_granularity="per_group", a_group_size=64,
                          balance=0.5, low_rank=8),
    "nvfp4": dict(format="nvfp4", w_bits=4, a_bits=4, a_format="nvfp4", a_granularity="per_group"),
    "svdquant-nvfp4": dict(format="nvfp4", w_bits=4, a_bits=4, a_format="nvfp4", a_granularity="per_group",
                           balance=0.5, low_rank=8),
    "mxfp4": dict(format="mxfp4", w_bits=4, a_bits=4, a_format="mxfp4", a_granularity="per_group"),
    "w4g64-a4g16": dict(w_bits=4, group_size=64, a_bits=4, a_granularity="per_group", a_group_size=16),
    "w4g16-a4g64": dict(w_bits=4, group_size=16, a_bits=4, a_granularity="per_group", a_group_size=64),
    "w3g32-a6g32": dict(w_bits=3, group_size=32, a_bits=6, a_granularity="per_group", a_group_size=32),
    "e2m1-per-token-e2m1": dict(format="e2m1", w_bits=4, group_size=32, a_bits=4, a_format="e2m1"),
    "e1m2-per-token-e2m3": dict(format="e1m2", w_bits=4, group_size=64, a_bits=6, a_format="e2m3"),  # fp4-w4a6's
}


def _gemm_path() -> str | None:
    """The integer GEMM's path here (``group_gemm_isa``), asserted present wherever it must be: the C library built
    (a C compiler: test_the_library_builds_where_a_c_compiler_exists) and torch running AVX2 or AVX-512 code (x86-64).
    Elsewhere ``None``: the tests then check that the kernel is never chosen and the layers keep their reference."""
    must = native_library() is not None and torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))
    assert (group_gemm_isa() is not None) == must, group_gemm_isa()
    return group_gemm_isa()


def _spec(name: str) -> LinearQuantSpec:
    spec = LinearQuantSpec.from_dict(dict(SPECS[name]), "spec")
    FORMATS.get(spec.format).validate_spec(spec, "spec")
    return spec


def _inputs(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * (1 + 20 * (torch.rand(cols, generator=gen) > 0.9))
    if rows > 2:
        x[0] = 0  # an all-zero row: the scale's floor
        x[1, :4] = torch.tensor([1e-41, -3e-39, 2.5, -2.5])  # subnormals, ties
    return x


def _layer(name: str, out_features: int, in_features: int, seed: int = 0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    spec = _spec(name)
    return FORMATS.get(spec.format).quantize(linear, spec, _inputs(64, in_features, seed).abs().amax(0) + 0.1)


@pytest.fixture
def integer_gemm(monkeypatch):
    """cpu-int-groups wherever the CPU runs it (on AMX CPUs the bf16 microkernel kernels are chosen by default)."""
    monkeypatch.setattr(cpu_kernels, "amx_bf16", lambda: False)


@pytest.mark.parametrize("name", ["rtn-w4a4", "nvfp4", "mxfp4", "w3g32-a6g32", "e2m1-per-token-e2m1",
                                  "e1m2-per-token-e2m3"])
@pytest.mark.parametrize("smoothed", [False, True])
@pytest.mark.parametrize("cols, magnitude", [(128, 1.0), (512, 1.0), (512, 1e-30)])
def test_grid_codes_times_their_scales_are_the_fake_quantized_values_bit_for_bit(name, smoothed, cols, magnitude):
    """Rows of 128 and 512 (on AVX2 eight groups at a time, balanced rows too); a NaN or an inf (neither under NVFP4's
    tensor scale from 512 columns: every group would be NaN) takes the scalar code; tiny inputs: the scales' floor
    (NVFP4's scales stay normal: below ~1e-36 ``s / mult`` would be subnormal and lose bits, the codes times their
    scales then not the reference's values)."""
    spec = _spec(name)
    grid = activation_grid(spec)
    mult = grid_multiplier(grid)
    group = spec.a_group_size if spec.a_granularity == "per_group" else cols
    x = _inputs(37, cols) * magnitude
    x[2:4] *= torch.tensor([[3e-4], [3e-5]])  # NVFP4: block scales in E4M3's subnormals, and below them
    if grid.rule != 2 or cols == 128:  # (NVFP4: a NaN makes the tensor scale NaN, every group NaN)
        x[5, 7] = float("nan")  # its group: NaN scales, as the reference's values
    if grid.rule != 2:
        x[9, 100] = float("inf")
    smooth = torch.rand(cols) * 4 + 0.05 if smoothed else None
    repeat = 2 if group % 8 == 0 else 1  # the GEMM's narrower groups: each scale written twice
    result = grid_codes(x, smooth, None if smooth is None else 1 / smooth,
                        (group, grid.rule, grid.top, grid.mantissa, grid.min_exp), repeat, mult)
    if native_library() is None:  # no C compiler: no codes (and no cpu-int-groups, test_what_the_integer_gemm_...)
        assert result is None
        return
    codes, scales, balanced = result
    b = x if smooth is None else x / smooth
    if smoothed:
        torch.testing.assert_close(balanced, b, rtol=0, atol=0, equal_nan=True)
    else:
        assert balanced is None  # x itself: what is kept on x must not hold x
    assert codes.dtype == torch.uint8 and scales.shape == (37, cols // group * repeat)
    values = (codes.float() - grid.top * mult) * scales.repeat_interleave(group // repeat, dim=1)
    truth = quantize_input(b, spec)
    # no code stands for NaN: the group of the NaN is NaN (its row's outputs are NaN, as the reference's)
    nan_groups = truth.isnan().view(37, -1, group).any(-1, keepdim=True).expand(-1, -1, group).reshape(37, cols)
    assert torch.equal(values.isnan(), nan_groups)
    assert torch.equal(values[~nan_groups], truth[~nan_groups])
    assert int(codes.max()) <= 2 * grid.top * mult


def test_multipliers_make_the_tables_integers_or_refuse():
    assert integer_multiplier(torch.arange(16.0) - 8) == 1
    assert integer_multiplier(torch.tensor([0.0, 0.5, 1.5, -6.0])) == 2
    assert integer_multiplier(torch.tensor([0.0, 0.1])) is None  # no power of two up to 2^9 makes it an integer
    assert integer_multiplier(torch.tensor([0.0, 200.0])) is None  # not a signed byte
    assert grid_multiplier(activation_grid(_spec("rtn-w4a4"))) == 1
    assert grid_multiplier(activation_grid(_spec("nvfp4"))) == 2  # E2M1: steps of 0.5
    assert grid_multiplier(Grid(rule=0, top=448.0, mantissa=3, min_exp=-6)) is None  # E4M3: 448 * 2^9 is no byte
    assert grid_multiplier(activation_grid(_spec("e1m2-per-token-e2m3"))) == 8  # E2M3: steps of 1/8, top 7.5


def _gemm_cases(test):
    """The integer GEMM's cases: rows 1 .. 37 (every tail of AVX-512's 6-row tiles), GEMM groups 4 .. 64, 1 and 2
    threads; the test takes ``rows, group, threads``."""
    for mark in (pytest.mark.parametrize("rows", [1, 5, 6, 37]), pytest.mark.parametrize("group", [4, 16, 32, 64]),
                 pytest.mark.parametrize("threads", [1, 2])):
        test = mark(test)
    return test


def _activation_codes(gen: torch.Generator, rows: int, in_features: int, group: int) -> tuple:
    """Byte codes of an int4 grid (offset 8) and their scales per group, as grid_codes gives them."""
    codes = torch.randint(0, 16, (rows, in_features), generator=gen, dtype=torch.uint8)
    return codes, torch.rand(rows, in_features // group, generator=gen) + 0.01


@_gemm_cases
@pytest.mark.parametrize("row_scales", [False, True])
def test_the_integer_gemm_is_the_sum_of_its_groups(rows, group, threads, row_scales):
    """Scales per group of a row, or one a row (``row_group``: applied after the weight's groups), on offset
    activation codes: every tile (AVX2's groups of 16 / 32 / 64 summed whole in 16 bits, the others flushed)."""
    gen = torch.Generator().manual_seed(rows + group)
    out_features, in_features, offset = 40, 128, 8
    weight = torch.randint(-8, 8, (out_features, in_features), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(out_features, in_features // group, generator=gen) + 0.01
    codes, a_scale = _activation_codes(gen, rows, in_features, in_features if row_scales else group)
    bias = torch.randn(out_features, generator=gen)
    b = pack_weight(weight, w_scale, group, offset)
    if _gemm_path() is None:
        with pytest.raises((RuntimeError, AttributeError)):  # no path (or no library): never garbage
            group_gemm(codes, a_scale, b["packed"], b["corr"], b["w_scale"], bias, out_features)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = group_gemm(codes, a_scale, b["packed"], b["corr"], b["w_scale"], bias, out_features,
                         flush=32767 // (2 * 15 * 8), **({"row_group": group} if row_scales else {}))
    finally:
        torch.set_num_threads(previous)
    products = torch.einsum("rgk,ogk->rog", (codes.double() - offset).view(rows, -1, group),
                            weight.double().view(out_features, -1, group))
    truth = (products * a_scale.double()[:, None] * w_scale.double()[None]).sum(-1) if not row_scales else \
        (products * w_scale.double()[None]).sum(-1) * a_scale.double()
    truth = truth + bias.double()
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-4)  # fp32 sums of the groups' products


@_gemm_cases
@pytest.mark.parametrize("row_scales", [False, True])
def test_nibble_weights_are_the_byte_weights_bit_for_bit(rows, group, threads, row_scales, monkeypatch):
    """4-bit indices two a byte through a 16-entry table (half the bytes): the same outputs as the byte codes, on
    channels that fill no whole block of 32 (72) and on E2M1-like tables of uneven values."""
    gen = torch.Generator().manual_seed(rows + group)
    out_features, in_features = 72, 128
    values = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12], dtype=torch.int8)
    weight = values[torch.randint(0, 15, (out_features, in_features), generator=gen)]
    w_scale = torch.rand(out_features, in_features // group, generator=gen) + 0.01
    codes, a_scale = _activation_codes(gen, rows, in_features, in_features if row_scales else group)
    bias = torch.randn(out_features, generator=gen)
    nibbles = pack_weight(weight, w_scale, group, 8.0, nibbles=True)
    assert nibbles["packed"].dtype == torch.uint8 and nibbles["packed"].numel() == 96 * in_features // 2
    assert torch.equal(nibbles["table"][:15], values.sort().values)
    byte = pack_weight(weight, w_scale, group, 8.0)
    pairs = byte["packed"].view(-1, 2, in_features // 4, 64)  # each byte's nibbles: the pair's two blocks' codes
    table = nibbles["table"]
    assert torch.equal(table[(nibbles["packed"] & 15).long()], pairs[:, 0])
    assert torch.equal(table[(nibbles["packed"] >> 4).long()], pairs[:, 1])
    assert torch.equal(nibbles["corr"], byte["corr"]) and torch.equal(nibbles["w_scale"], byte["w_scale"])
    if _gemm_path() is None:
        with pytest.raises((RuntimeError, AttributeError)):  # no path (or no library): never garbage
            group_gemm(codes, a_scale, nibbles["packed"], nibbles["corr"], nibbles["w_scale"], bias, out_features,
                       table=table)
        return
    monkeypatch.setattr(cpu_native, "GROUP_GEMM_TEAM_MIN_WORK", 0)  # threads even on this small GEMM
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one_scale = {"row_group": group} if row_scales else {}
        outs = [group_gemm(codes, a_scale, b["packed"], b["corr"], b["w_scale"], bias, out_features,
                           table=b["table"], **one_scale) for b in (byte, nibbles)]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(*outs)


def _rows_around_the_tiles(gen, in_features: int, most: int, scales: int):
    """``(rows, codes, a_scale)`` at every row count around the row-major paths (the 4-row dot products, the tiles of
    6, 24 rows a thread): activation codes up to ``most`` (the last row all ``most``), ``scales`` scales a row."""
    for rows in (1, 2, 3, 4, 5, 6, 7, 13, 23, 24, 25, 37):
        codes = torch.randint(0, most + 1, (rows, in_features), generator=gen, dtype=torch.uint8)
        codes[-1] = most
        yield rows, codes, torch.rand(rows, scales, generator=gen) + 0.01


@pytest.mark.parametrize("shape", [(72, 128), (7, 68), (33, 1156), (64, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("threads", [1, 2])
def test_stored_weights_are_the_packed_blocks_bit_for_bit(shape, bits, threads, gemm_threads):
    """W8A8's int8 codes and W4A8's offset nibbles read as the layer stores them (``pack_weight(..., stored=...)``: no
    packed copy; a pair of blocks packed per call, or under 24 rows multiplied in place, 64 inputs a lane-wise
    product): the same outputs as the prepacked blocks, on every row count around those paths' tiles, channels that
    fill no block (7, 33) and inputs that fill no 64 (68, 1156, 4); without a bias too. Not on AVX2: refused, never
    garbage."""
    from compressdit.quant.gpu_reference import pack_nibbles

    out_features, in_features = shape
    gen = torch.Generator().manual_seed(out_features + in_features + bits)
    top = 2 ** (bits - 1)
    weight = torch.randint(-top, top, (out_features, in_features), generator=gen, dtype=torch.int8)
    weight[0], weight[-1, ::3] = top - 1, -top  # the extreme sums
    stored = weight if bits == 8 else pack_nibbles(weight)
    w_scale = torch.rand(out_features, 1, generator=gen) + 0.01
    blocks = pack_weight(weight, w_scale, in_features, 128.0)
    in_place = pack_weight(weight, w_scale, in_features, 128.0, stored=stored)
    assert in_place["packed"].data_ptr() == stored.data_ptr()  # the layer's tensor itself
    assert torch.equal(in_place["corr"], blocks["corr"]) and torch.equal(in_place["w_scale"], blocks["w_scale"])
    if _gemm_path() != "avx512-vnni":
        if _gemm_path() is not None:
            with pytest.raises(RuntimeError, match="row-major"):
                group_gemm(torch.zeros(2, in_features, dtype=torch.uint8), torch.ones(2, 1), in_place["packed"],
                           in_place["corr"], in_place["w_scale"], None, out_features, row_group=in_features)
        return
    gemm_threads(threads)
    for rows, codes, a_scale in _rows_around_the_tiles(gen, in_features, 255, 1):
        for bias in (torch.randn(out_features, generator=gen), None):
            outs = [group_gemm(codes, a_scale, b["packed"], b["corr"], b["w_scale"], bias, out_features,
                               row_group=in_features) for b in (blocks, in_place)]
            assert torch.equal(*outs), (rows, bias is None)


E2M1_CODES = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.int8)  # x2


@pytest.mark.parametrize("shape", [(72, 128, 16), (7, 64, 32), (33, 1156, 4), (40, 4, 4), (72, 256, 64),
                                   (33, 384, 128), (7, 64, 64)], ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
@pytest.mark.parametrize("table", [E2M1_CODES, OFFSET_NIBBLE_CODES], ids=["e2m1", "offset"])
@pytest.mark.parametrize("row_scales", [False, True])
@pytest.mark.parametrize("with_corr", [True, False], ids=["corr", "corr-in-the-gemm"])
@pytest.mark.parametrize("threads", [1, 2])
def test_stored_nibbles_through_a_table_are_the_packed_nibbles_bit_for_bit(shape, table, row_scales, with_corr,
                                                                           threads, gemm_threads):
    """NVFP4's stored E2M1 nibbles and grouped W4A8's offset nibbles read as the layer stores them through the
    format's table (:func:`stored_nibble_weight`: no packed copy, each pair of blocks packed per call): the same
    corrections and scales as :func:`pack_weight` of their codes, and the same outputs as its packed nibbles on
    every row count around the tiles, channels that fill no block (7, 33), inputs that fill no 64 (68 ... 1156, 4),
    groups of 4 to 128, with scales per group and per row, without a bias too; with one scale a row, groups of 64 or
    more and under 24 rows each channel's row is multiplied in place (its groups' sums scaled lane-wise: the same up
    to fp32 summation order); without ``corr`` (``corr=False``: each pair's corrections computed as it is packed, from
    the activations' offset) the packed nibbles' outputs bit for bit at every row count. On AVX2 each block of 16
    channels decoded, packed (and its corrections summed) per call: bit for bit at every row count."""
    out_features, in_features, group = shape
    gen = torch.Generator().manual_seed(out_features + in_features + group)
    nibbles = torch.randint(0, 256, (out_features, in_features // 2), generator=gen, dtype=torch.uint8)
    top, bottom = int(table.argmax()), int(table.argmin())
    nibbles[0], nibbles[-1, ::3] = top | top << 4, bottom | bottom << 4  # the extreme sums
    codes = table[unpack_nibbles(nibbles).long()]
    w_scale = torch.rand(out_features, in_features // group, generator=gen) + 0.01
    offset = 128.0 if row_scales else 8.0
    packed = pack_weight(codes, w_scale, group, offset, nibbles=True)
    stored = stored_nibble_weight(nibbles, table, w_scale, group, offset, corr=with_corr)
    assert stored["packed"].data_ptr() == nibbles.data_ptr()  # the layer's tensor itself
    assert torch.equal(stored["w_scale"], packed["w_scale"])
    assert torch.equal(stored["corr"], packed["corr"]) if with_corr else stored["corr"] is None

    def gemm(b, codes, a_scale, bias):
        return group_gemm(codes, a_scale, b["packed"], b["corr"], b["w_scale"], bias, out_features, table=b["table"],
                          offset=int(offset), **({"row_group": group} if row_scales else {}))

    most = 255 if row_scales else 16
    if _gemm_path() is None:
        return
    gemm_threads(threads)
    scales = 1 if row_scales else in_features // group
    for rows, codes, a_scale in _rows_around_the_tiles(gen, in_features, most, scales):
        for bias in (torch.randn(out_features, generator=gen), None):
            outs = [gemm(b, codes, a_scale, bias) for b in (packed, stored)]
            if row_scales and group % 64 == 0 and with_corr and _gemm_path() == "avx512-vnni":  # (up to 4 rows:
                # lane-wise)
                torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5 * float(outs[0].abs().max()))
            else:
                assert torch.equal(*outs), (rows, bias is None)


def test_stored_nibble_weight_refuses_other_layouts():
    nibbles = torch.zeros(32, 32, dtype=torch.uint8)
    for args in ((nibbles.view(torch.int8), OFFSET_NIBBLE_CODES), (nibbles, OFFSET_NIBBLE_CODES.int()),
                 (nibbles, OFFSET_NIBBLE_CODES[:8]), (nibbles[:, :30], OFFSET_NIBBLE_CODES)):
        with pytest.raises(ValueError, match="stored_nibble_weight"):
            stored_nibble_weight(*args, torch.ones(32, 4), 16, 8.0)


def test_a_stored_weight_is_the_codes_or_their_nibbles():
    codes = torch.zeros(32, 64, dtype=torch.int8)
    for stored, nibbles in ((codes, True), (codes.t(), False), (torch.zeros(32, 64, dtype=torch.uint8), False),
                            (codes.float(), False)):
        with pytest.raises(ValueError, match="stored weight"):
            pack_weight(codes, torch.ones(32, 1), 64, 128.0, nibbles=nibbles, stored=stored)


def test_nibble_table_refuses_more_than_sixteen_codes():
    table, index = nibble_table(torch.tensor([[5, -3], [5, 7]], dtype=torch.int8))
    assert table.tolist() == [-3, 5, 7] + [0] * 13 and index.tolist() == [[1, 0], [1, 2]]
    with pytest.raises(ValueError, match="17 distinct"):
        nibble_table(torch.arange(-8, 9, dtype=torch.int8).view(1, -1))


@pytest.mark.usefixtures("integer_gemm")
@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("shape", [(128, 128), (40, 64), (300, 256)])
def test_layers_on_the_integer_gemm_are_their_reference(name, shape):
    out_features, in_features = shape
    spec = _spec(name)
    group = min(spec.group_size or in_features, spec.a_group_size or in_features)
    path = _gemm_path()
    chosen = path == "avx512-vnni" or (path == "avx2" and group >= AVX2_MIN_GROUP)
    layer = _layer(name, out_features, in_features)
    assert (kernel_summary(layer) == "cpu-int-groups x1") == chosen, kernel_summary(layer)
    if path is not None:
        set_kernel(layer, "cpu-int-groups")  # AVX2's narrower groups too: the path's numbers
    x = _inputs(37, in_features).view(37, 1, in_features)
    with torch.no_grad():
        out, reference = layer(x), layer.reference_forward(x)
    scale = reference.abs().max()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * scale)


def _on_one_and_two_threads(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` on one thread, asserted equal bit for bit to it on two (each output computed alone)."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer(x)
        torch.set_num_threads(2)
        two = layer(x)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)
    return one


@pytest.mark.usefixtures("integer_gemm")
def test_threads_and_bf16_inputs():
    layer = _layer("svdquant-nvfp4", 96, 128)
    path = _gemm_path()
    if path is not None:
        set_kernel(layer, "cpu-int-groups")
    x = _inputs(50, 128)
    with torch.no_grad():
        _on_one_and_two_threads(layer, x)
        if path is None:  # the other kernels' bf16 arithmetic: tests/quant/test_quant_cpu_dense.py
            return
        half = layer(x.bfloat16())  # widened exactly, quantized in fp32
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), layer.reference_forward(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


@pytest.mark.usefixtures("integer_gemm")
@pytest.mark.parametrize("fused", [False, True])
def test_layers_reading_one_input_quantize_it_once(fused, monkeypatch):
    """On the Python path (grid_codes called once) and in the C++ op (its codes kept once)."""
    fused = fused and native_ops_built()
    monkeypatch.setattr(cpu_kernels, "native_ops", lambda: fused)
    layers = [_layer("rtn-w4a4", n, 64, seed=n) for n in (32, 48, 64)]
    once = int(_gemm_path() is not None)  # without the path no layer makes codes
    for layer in layers[:once * 3]:
        set_kernel(layer, "cpu-int-groups")
    x = _inputs(9, 64)
    calls = []
    name = "keep_rows" if fused else "grid_codes"
    real = getattr(cpu_kernels, name)
    monkeypatch.setattr(cpu_kernels, name, lambda *a: (calls.append(1), real(*a))[1])
    with torch.no_grad():
        outs = [layer(x) for layer in layers]
        assert len(calls) == once
        for layer, out in zip(layers, outs):
            torch.testing.assert_close(out, layer.reference_forward(x), rtol=1e-5, atol=1e-4)
        x.mul_(2)  # written to: quantized again
        torch.testing.assert_close(layers[0](x), layers[0].reference_forward(x), rtol=1e-5, atol=1e-4)
    assert len(calls) == 2 * once
    if once:
        assert x._compressdit_rows[2][2] is None  # the rows kept on x do not hold x (no reference cycle)


@pytest.mark.usefixtures("integer_gemm")
@pytest.mark.parametrize("name", ["rtn-w4a4", "nvfp4", "svdquant-nvfp4", "svdquant-w4a4", "mxfp4", "w3g32-a6g32"])
@pytest.mark.parametrize("rows, threads", [(37, 1), (37, 2), (1, 1), (300, 2)])
def test_the_fused_groups_op_equals_the_python_path_bit_for_bit(name, rows, threads, monkeypatch):
    """csrc/groups_linear.cpp (division, codes, branch and GEMM in one call) gives the Python path's numbers exactly,
    on any thread count, on fp32 and bf16 rows, balanced or not, with or without SVDQuant's branch, on rows in a 3-D
    input (the op reads x's shape). Without the integer GEMM the layer keeps another kernel, without the op library
    both runs take the Python path: equal too."""
    built = native_ops_built()
    layer = _layer(name, 96, 128)
    if _gemm_path() is not None:
        set_kernel(layer, "cpu-int-groups")
    x = _inputs(max(rows, 3), 128)[:rows].contiguous()
    before = torch.get_num_threads()
    outs = {}
    try:
        torch.set_num_threads(threads)
        for fused in (False, True):
            monkeypatch.setattr(cpu_kernels, "native_ops", lambda: fused and built)
            with torch.no_grad():
                outs[fused] = (layer(x.clone()), layer(x.clone().bfloat16()), layer(x.clone().view(1, rows, 128)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False], strict=True))
    assert outs[True][2].shape == (1, rows, 96) and torch.equal(outs[True][2][0], outs[True][0])  # rows in x's shape
    torch.testing.assert_close(outs[True][0], layer.reference_forward(x), rtol=1e-5,
                               atol=1e-5 * float(outs[True][0].abs().max()))


def test_the_fused_groups_op_rejects_what_it_cannot_read():
    if not native_ops_built():  # nothing registered that could read anything
        assert not hasattr(torch.ops.compressdit_native, "groups_linear")
        return
    op = torch.ops.compressdit_native.groups_linear
    x = torch.randn(4, 64)
    packed, w_scale = torch.zeros(8, 32, dtype=torch.uint8), torch.ones(4, 8)
    table = torch.arange(16, dtype=torch.int8) - 8
    grid = (16, 1, 0, 7.0, 30, 30, 1.0, 1, 1, 8, 1, 1)
    with pytest.raises(RuntimeError, match="divide"):
        op(x[:, :60].contiguous(), None, None, None, None, packed, None, w_scale, None, None, None, table, *grid)
    with pytest.raises(RuntimeError, match="fp32"):
        op(x.double(), None, None, None, None, packed, None, w_scale, None, None, None, table, *grid)
    with pytest.raises(RuntimeError, match="smooth and inv"):
        op(x, torch.ones(64), None, None, None, packed, None, w_scale, None, None, None, table, *grid)
    with pytest.raises(RuntimeError, match="codes made earlier"):
        op(x, None, None, torch.zeros(4, 64, dtype=torch.uint8), None, packed, None, w_scale, None, None, None, table,
           *grid)
    with pytest.raises(RuntimeError, match="branch factors"):
        op(x, None, None, None, None, packed, None, w_scale, None, torch.zeros(64, 2), None, table, *grid)


@pytest.mark.usefixtures("integer_gemm")
@pytest.mark.parametrize("change", [dict(rotation="hadamard"), dict(w_symmetric=False),
                                    dict(format="twinlog", group_size=None), dict(a_group_size=24),
                                    dict(a_granularity="per_token", a_group_size=None)])
def test_what_the_integer_gemm_does_not_take(change):
    spec = LinearQuantSpec.from_dict({**SPECS["rtn-w4a4"], **change}, "spec")
    assert not integer_groups_apply(spec, (64, 96))  # per-token int activations: cpu-int8-gemm's fast path
    assert integer_groups_apply(_spec("svdquant-w4a4"), (64, 128)) == (_gemm_path() is not None)


_AVX2_CHECK = """
import torch
from compressdit.quant.cpu_kernels import (AVX2_MIN_GROUP, OFFSET_NIBBLE_CODES, pack_planes, pack_weight,
                                           stored_nibble_weight, twinlog_groups_apply)
from compressdit.quant.cpu_native import group_gemm, group_gemm_isa
from compressdit.quant.formats import FORMATS
from compressdit.quant.kernel_registry import kernel_summary, set_kernel
from compressdit.quant.spec import LinearQuantSpec
from tests.conftest import native_ops_built
assert group_gemm_isa() == "avx2", group_gemm_isa()
twin_log = LinearQuantSpec.from_dict(dict(format="twinlog", w_bits=4, a_bits=4, a_granularity="per_group",
                                          a_group_size=32), "spec")
assert not twinlog_groups_apply(twin_log, (40, 128))  # 16-bit weights: AVX512-VNNI only
b = pack_planes(torch.randn(40, 128), 32, 8.0)
try:
    group_gemm(torch.zeros(3, 128, dtype=torch.uint8), torch.ones(3, 4), b["packed"], b["corr"], b["w_scale"], None,
               40, planes=2)
    raise AssertionError("two weight planes ran on AVX2")
except RuntimeError:
    pass
ones = torch.ones(40, 128, dtype=torch.int8)
w8 = pack_weight(ones, torch.ones(40, 1), 128, 128.0, stored=ones)
try:  # W8A8's row-major codes with offset activation codes: AVX512-VNNI only (AVX2 reads them with signed codes)
    group_gemm(torch.zeros(3, 128, dtype=torch.uint8), torch.ones(3, 1), w8["packed"], w8["corr"], w8["w_scale"], None,
               40, row_group=128)
    raise AssertionError("row-major weights ran on AVX2 with offset codes")
except RuntimeError:
    pass
nibbles = torch.randint(0, 256, (40, 64), dtype=torch.uint8)  # stored nibbles through their table: each block
n4 = stored_nibble_weight(nibbles, OFFSET_NIBBLE_CODES, torch.ones(40, 8), 16, 8.0, corr=False)  # packed per call
p4 = pack_weight(OFFSET_NIBBLE_CODES[torch.stack([nibbles & 15, nibbles >> 4], -1).reshape(40, 128).long()],
                 torch.ones(40, 8), 16, 8.0, nibbles=True)
codes = torch.randint(0, 17, (7, 128), dtype=torch.uint8)
assert torch.equal(*(group_gemm(codes, torch.ones(7, 8), b["packed"], b["corr"], b["w_scale"], None, 40, flush=4,
                                table=b["table"], offset=8) for b in (n4, p4)))
torch.manual_seed(0)
for fields in ({fields}):
    spec = LinearQuantSpec.from_dict(dict(fields), "spec")
    FORMATS.get(spec.format).validate_spec(spec, "spec")
    x = torch.randn(37, 128) * (1 + 20 * (torch.rand(128) > 0.9))
    layer = FORMATS.get(spec.format).quantize(torch.nn.Linear(128, 40), spec, x.abs().amax(0) + 0.1)
    chosen = kernel_summary(layer)
    wide = min(spec.group_size, spec.a_group_size) >= AVX2_MIN_GROUP
    assert (chosen == "cpu-int-groups x1") == wide, (chosen, spec.label)
    set_kernel(layer, "cpu-int-groups")  # narrower groups too: the path's numbers
    with torch.no_grad():
        out, reference = layer(x), layer.reference_forward(x)
    assert kernel_summary(layer) == "cpu-int-groups x1"
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
from compressdit.quant.kernel_registry import cache_of
for fields in (dict(w_bits=8, a_bits=8), dict(w_bits=8, a_bits=8, a_granularity="per_tensor", balance=0.5),
               dict(w_bits=4, a_bits=8), dict(w_bits=4, a_bits=8, group_size=64)):  # int8 activations: signed codes
    spec = LinearQuantSpec.from_dict(fields, "spec")
    x = torch.randn(37, 128) * (1 + 20 * (torch.rand(128) > 0.9))
    layer = FORMATS.get("int").quantize(torch.nn.Linear(128, 40), spec, x.abs().amax(0) + 0.1)
    with torch.no_grad():
        out, reference = layer(x), layer.reference_forward(x)
    assert cache_of(layer).buffers["gemm_packed"] is not None, spec.label  # group_gemm's AVX2 path, at any size
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
print("ok")
"""


def test_the_avx2_path_is_the_reference_too(tmp_path):
    """As on an AVX2-only CPU (torch's kernels and the library built for AVX2, ``ATEN_CPU_CAPABILITY=avx2``): the
    byte multiply-adds of vpmaddubsw / vpmaddwd instead of vpdpbusd, on every spec kind (groups, branch, NVFP4);
    chosen for GEMM groups of at least ``AVX2_MIN_GROUP`` inputs; int8 activations (W8A8, W4A8) as signed codes."""
    import os
    import subprocess
    import sys

    if _gemm_path() is None:  # no x86-64 vector path here at all (asserted by _gemm_path)
        return
    fields = ", ".join(repr(SPECS[n]) for n in ("rtn-w4a4", "svdquant-w4a4", "nvfp4", "svdquant-nvfp4", "mxfp4"))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "COMPRESSDIT_CACHE": str(fresh_cache(tmp_path / "cache"))}
    run = subprocess.run([sys.executable, "-c", _AVX2_CHECK.format(fields=fields)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@pytest.mark.parametrize("shape", [(72, 128), (7, 68), (33, 1156)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["packed", "nibbles", "stored"])
@pytest.mark.parametrize("threads", [1, 2])
def test_signed_activation_codes_are_exact_at_the_extremes(shape, layout, threads, gemm_threads):
    """W8A8 / W4A8 on AVX2 (``flush=0``): int8 activation codes (|code| <= 127) against byte codes down to -128, each
    product |w| x (the code with w's sign), so no 16-bit pair saturates where an unsigned code times 127 twice would
    (oneDNN's u8s8 GEMM without VNNI): the exact int32 sums, then times the channel's and the row's scale, plus the
    bias, as torch computes them in fp32, bit for bit; at every row count around the 4-row tiles, the in-place dot
    products of up to 4 rows a thread and 6-row blocks; the weight packed, as nibbles, or as stored (byte codes
    row-major, each block of 16 channels packed per call: ``pack_weight(..., stored=...)``). Elsewhere (AVX512-VNNI,
    whose codes carry an offset) refused, never garbage."""
    out_features, in_features = shape
    nibbles = layout == "nibbles"
    gen = torch.Generator().manual_seed(out_features + in_features)
    low, high = (-8, 8) if nibbles else (-128, 128)
    weight = torch.randint(low, high, (out_features, in_features), generator=gen, dtype=torch.int8)
    weight[0], weight[-1, ::2] = low, high - 1  # a channel of the most negative code, one of alternating extremes
    w_scale = torch.rand(out_features, 1, generator=gen) + 0.01
    bias = torch.randn(out_features, generator=gen)
    b = pack_weight(weight, w_scale, in_features, 0.0, nibbles=nibbles, stored=weight if layout == "stored" else None)
    assert (b["packed"].data_ptr() == weight.data_ptr()) == (layout == "stored")  # no copy
    assert not b["corr"].any()  # no offset to take back
    one = torch.ones(1, in_features, dtype=torch.int8)
    if _gemm_path() != "avx2":
        with pytest.raises((RuntimeError, AttributeError)):
            group_gemm(one, torch.ones(1, 1), b["packed"], b["corr"], b["w_scale"], bias, out_features, flush=0,
                       row_group=in_features, table=b["table"])
        return
    gemm_threads(threads)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 13, 24, 25):
        codes = torch.randint(-127, 128, (rows, in_features), generator=gen, dtype=torch.int8)
        codes[-1] = -127 if rows % 2 else 127  # every pair at its bound against the extreme channels
        a_scale = torch.rand(rows, 1, generator=gen) + 0.01
        with_bias = bias if rows % 3 else None
        out = group_gemm(codes, a_scale, b["packed"], b["corr"], b["w_scale"], with_bias, out_features, flush=0,
                         row_group=in_features, table=b["table"])
        sums = (codes.long() @ weight.long().t()).float()  # exact: |sum| < 2^24 here
        expected = sums * w_scale.t() * a_scale + (0.0 if with_bias is None else with_bias)
        assert torch.equal(out, expected), rows


# --- cpu-twinlog-groups -------------------------------------------------------------------------------------------

TWIN_LOG = dict(format="twinlog", w_bits=4, a_bits=4, a_granularity="per_group", a_group_size=16, balance=0.5)


def _twin_log_layer(out_features: int, in_features: int, rotation: str = "hadamard", seed: int = 0, **fields):
    torch.manual_seed(seed)
    spec = LinearQuantSpec.from_dict({**TWIN_LOG, "rotation": rotation, **fields}, "spec")
    FORMATS.get(spec.format).validate_spec(spec, "spec")
    absmax = _inputs(64, in_features, seed).abs().amax(0) + 0.1
    return FORMATS.get(spec.format).quantize(torch.nn.Linear(in_features, out_features), spec, absmax)


def _plane_bound(layer, x: torch.Tensor) -> torch.Tensor:
    """Per output, what the 16-bit weights may move it: |q(transformed x)| summed against half of each channel's
    step (max |w| / PLANE_MAX), plus fp32 summation slack."""
    with torch.no_grad():
        rows = quantize_input(layer.transform_input(x.float()), layer.spec).reshape(-1, layer.in_features)
        weight = layer.dequantized_weight()
        step = weight.abs().amax(1) / PLANE_MAX
        exact = rows.double() @ weight.double().t()
    return (rows.abs().sum(1, keepdim=True) * step / 2).double() + 1e-5 * exact.abs().max()


@_gemm_cases
def test_sixteen_bit_weights_are_their_weight_within_half_a_step(rows, group, threads):
    gen = torch.Generator().manual_seed(rows + group)
    out_features, in_features, offset = 40, 128, 8
    weight = torch.randn(out_features, in_features, generator=gen) * torch.logspace(-3, 1, out_features)[:, None]
    weight[3] = 0  # an all-zero channel: scale 1, codes 0
    codes, a_scale = _activation_codes(gen, rows, in_features, group)
    bias = torch.randn(out_features, generator=gen)
    b = pack_planes(weight, group, offset)
    assert b["packed"].dtype == torch.int8 and b["packed"].numel() == 2 * 64 * in_features  # 2 bytes a weight
    if _gemm_path() != "avx512-vnni":
        with pytest.raises((RuntimeError, AttributeError)):  # AVX2 (or no path, no library): refused, never garbage
            group_gemm(codes, a_scale, b["packed"], b["corr"], b["w_scale"], bias, out_features, planes=2)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = group_gemm(codes, a_scale, b["packed"], b["corr"], b["w_scale"], bias, out_features, planes=2)
    finally:
        torch.set_num_threads(previous)
    values = (codes.double() - offset) * a_scale.double().repeat_interleave(group, 1)
    truth = values @ weight.double().t() + bias.double()
    step = weight.abs().amax(1).double() / PLANE_MAX
    bound = values.abs().sum(1, keepdim=True) * step / 2 + 1e-5 * truth.abs().max()
    assert ((out.double() - truth).abs() <= bound).all(), ((out.double() - truth).abs() / bound).max()
    assert torch.equal(out[:, 3], bias[3].expand(rows))


@pytest.mark.parametrize("rows", [3, 50])
@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_rotated_gemm_in_one_call_is_the_two_calls(rows, planes, threads, monkeypatch):
    """``hadamard_group_gemm`` (each thread codes and multiplies its own rows; with few rows, rows coded once and the
    channels split) is ``hadamard_codes`` then ``group_gemm`` bit for bit, NaN rows included."""
    from compressdit.quant import cpu_native
    from compressdit.quant.cpu_native import hadamard_codes, hadamard_group_gemm
    from compressdit.quant.rotation import random_signs

    gen = torch.Generator().manual_seed(rows)
    out_features, in_features, group = 72, 128, 16
    x = torch.randn(rows, in_features, generator=gen) * torch.logspace(-2, 2, in_features)
    x[1, 5] = float("nan")
    smooth, signs = torch.rand(in_features, generator=gen) + 0.3, random_signs(in_features, 0)
    weight = torch.randn(out_features, in_features, generator=gen)
    b = (pack_planes(weight, group, 8.0) if planes == 2 else
         pack_weight(torch.randint(-8, 8, (out_features, in_features), generator=gen, dtype=torch.int8),
                     torch.rand(out_features, in_features // group, generator=gen), group, 8.0))
    grid = (2 * group, 0, 7.0, 30, 30)  # int4 in groups of 32, each scale twice: the GEMM's groups of 16
    args = (b["packed"], b["corr"], b["w_scale"], torch.randn(out_features, generator=gen), out_features)
    runs = planes == 1 and _gemm_path() is not None or _gemm_path() == "avx512-vnni"
    monkeypatch.setattr(cpu_native, "TEAM_MIN_WORK", 0)  # threads even on this small GEMM
    monkeypatch.setattr(cpu_native, "GROUP_GEMM_TEAM_MIN_WORK", 0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if not runs:
            with pytest.raises((RuntimeError, AttributeError)):
                hadamard_group_gemm(x, smooth, signs, grid, 2, 1.0, *args, planes=planes)
            return
        one = hadamard_group_gemm(x, smooth, signs, grid, 2, 1.0, *args, planes=planes)
        two = group_gemm(*hadamard_codes(x, smooth, signs, grid, 2, 1.0), *args, planes=planes)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one.isnan(), two.isnan()) and bool(one[1].isnan().all())
    assert torch.equal(one.nan_to_num(), two.nan_to_num())


def test_a_channel_with_a_non_finite_weight_gives_nan_outputs():
    weight = torch.randn(32, 64)
    weight[5, 7] = float("inf")
    weight[9, 0] = float("nan")
    b = pack_planes(weight, 16, 8.0)
    assert torch.isnan(b["w_scale"][:, [5, 9]]).all() and torch.isfinite(b["w_scale"][:, :5]).all()
    if _gemm_path() == "avx512-vnni":
        out = group_gemm(torch.full((2, 64), 9, dtype=torch.uint8), torch.ones(2, 4), b["packed"], b["corr"],
                         b["w_scale"], None, 32, planes=2)
        assert torch.isnan(out[:, [5, 9]]).all() and torch.isfinite(out[:, :5]).all()


@pytest.mark.usefixtures("integer_gemm")
@pytest.mark.parametrize("rotation", ["hadamard", "duquant", "none"])
@pytest.mark.parametrize("w_bits", [3, 4])
@pytest.mark.parametrize("shape", [(128, 128), (40, 64), (300, 256)])
def test_twin_log_layers_on_the_integer_gemm_are_their_reference(rotation, w_bits, shape):
    out_features, in_features = shape
    layer = _twin_log_layer(out_features, in_features, rotation, w_bits=w_bits)
    chosen = _gemm_path() == "avx512-vnni"
    assert (kernel_summary(layer) == "cpu-twinlog-groups x1") == chosen, kernel_summary(layer)
    x = _inputs(37, in_features).view(37, 1, in_features)
    with torch.no_grad():
        out, reference = layer(x), layer.reference_forward(x)
    error = (out - reference).reshape(37, out_features).abs().double()
    assert (error <= _plane_bound(layer, x)).all()
    # the kernel's own numbers, not the reference's; DuQuant's C pass rotates by the greedy steps, the reference by
    # their dense blocks: the same rotation up to fp32 rounding
    assert (error.max() > 0) == (chosen or rotation == "duquant")


@pytest.mark.usefixtures("integer_gemm")
def test_twin_log_threads_bf16_rows_and_the_layers_own_transform():
    layer = _twin_log_layer(96, 128)
    x = _inputs(50, 128)
    with torch.no_grad():
        one = _on_one_and_two_threads(layer, x)
        half = layer(x.bfloat16())  # widened once, rotated by the C pass in fp32
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), layer.reference_forward(x.bfloat16().float()), rtol=2e-2, atol=2e-2)
        compiled = torch.compile(layer, fullgraph=True)  # the op on rows the layer's PyTorch transform rotated
        torch._dynamo.reset()
        torch.testing.assert_close(compiled(x), one, rtol=1e-5, atol=1e-5 * float(one.abs().max()))


@pytest.mark.usefixtures("integer_gemm")
@pytest.mark.parametrize("fields", [dict(a_bits=8, a_granularity="per_token", a_group_size=None),
                                    dict(a_format="e4m3", a_bits=8, a_group_size=16), dict(a_group_size=None,
                                                                                          a_granularity="per_tensor")])
def test_what_the_twin_log_gemm_does_not_take(fields):
    """Per-token int8 over 1152 inputs (a group's int32 sum of 16-bit weights could overflow), E4M3 activations (too
    fine a grid for bytes), per-tensor activations: the decoded kernels."""
    spec = LinearQuantSpec.from_dict({**TWIN_LOG, "rotation": "hadamard", **fields}, "spec")
    assert not twinlog_groups_apply(spec, (64, 1152))
    assert twinlog_groups_apply(LinearQuantSpec.from_dict({**TWIN_LOG, "rotation": "hadamard"}, "spec"),
                                (64, 1152)) == (_gemm_path() == "avx512-vnni")
