"""VQ custom ops: reference decode vs the bit layout, linear vs F.linear, op registration, CUDA kernels."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from compressdit.quant import vq_ops
from compressdit.quant.vq_ops import vq_decode, vq_decode_reference, vq_linear, vq_linear_reference, vq_strategy
from compressdit.quant.vq_primitives import pack_code_bits

# (code_bits, d) of the VQ4DiT configs: 2 bits/weight and 3 bits/weight
CONFIGS = [(8, 4), (6, 2)]
DIT_XL_SHAPES = [(1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152)]  # (in, out)
FLUX_SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]


def random_vq_weight(out_features: int, in_features: int, code_bits: int, dim: int, dtype=torch.float16,
                     device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed bytes (every bit pattern is a valid row of codes) and a full 2**code_bits codebook."""
    generator = torch.Generator().manual_seed(seed)
    nbytes = (in_features // dim * code_bits + 7) // 8
    codes = torch.randint(0, 256, (out_features, nbytes), dtype=torch.uint8, generator=generator)
    codebook = torch.randn(1 << code_bits, dim, generator=generator) * 0.05
    return codes.to(device), codebook.to(device=device, dtype=dtype)


def naive_decode(codes: torch.Tensor, codebook: torch.Tensor, in_features: int, code_bits: int) -> torch.Tensor:
    """Bit by bit: code j = stream bits [j*b, (j+1)*b), stream bit i = bit i % 8 of byte i // 8."""
    dim = codebook.shape[1]
    rows = codes.tolist()
    weight = torch.empty(len(rows), in_features, dtype=codebook.dtype)
    for r, row in enumerate(rows):
        for j in range(in_features // dim):
            code = sum(((row[(j * code_bits + t) // 8] >> ((j * code_bits + t) % 8)) & 1) << t
                       for t in range(code_bits))
            weight[r, j * dim:(j + 1) * dim] = codebook[code]
    return weight


@pytest.mark.parametrize("code_bits", [8, 6, 4, 3, 2])
@pytest.mark.parametrize("dim", [1, 2, 4, 8])
def test_reference_decode_follows_the_bit_layout(code_bits, dim):
    codes, codebook = random_vq_weight(5, 16 * dim, code_bits, dim, seed=code_bits * 10 + dim)
    expected = naive_decode(codes, codebook, 16 * dim, code_bits)
    assert torch.equal(vq_decode(codes, codebook, 16 * dim, code_bits), expected)


def test_decode_ignores_the_padding_bits_of_a_row():
    codes, codebook = random_vq_weight(3, 5 * 2, 3, 2)  # 5 codes x 3 bits = 15 bits in 2 bytes
    assert codes.shape == (3, 2)
    assert torch.equal(vq_decode(codes, codebook, 10, 3), naive_decode(codes, codebook, 10, 3))


@pytest.mark.parametrize("code_bits", [8, 6, 3])
def test_decode_inverts_pack_code_bits(code_bits):
    indices = torch.randint(0, 1 << code_bits, (7, 24))
    codebook = torch.randn(1 << code_bits, 4)
    decoded = vq_decode(pack_code_bits(indices, code_bits), codebook, 96, code_bits)
    assert torch.equal(decoded, codebook[indices].reshape(7, 96))


def test_reference_decode_chunks_rows(monkeypatch):
    codes, codebook = random_vq_weight(9, 32, 6, 2)
    whole = vq_decode_reference(codes, codebook, 32, 6)
    monkeypatch.setattr(vq_ops, "_DECODE_CHUNK_BITS", 8 * codes.shape[1] * 2)  # two rows per chunk
    assert torch.equal(vq_decode_reference(codes, codebook, 32, 6), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_shape", [(7, 64), (2, 5, 64)])
@pytest.mark.parametrize("code_bits,dim", CONFIGS)
def test_vq_linear_equals_f_linear_with_the_decoded_weight(dtype, with_bias, x_shape, code_bits, dim):
    codes, codebook = random_vq_weight(24, 64, code_bits, dim)
    bias = torch.randn(24) if with_bias else None  # fp32 bias, like VQLinear's
    x = torch.randn(x_shape, dtype=dtype)
    out = vq_linear(x, codes, codebook, bias, 64, code_bits)
    weight = naive_decode(codes, codebook, 64, code_bits).to(dtype)
    expected = F.linear(x, weight, None if bias is None else bias.to(dtype))
    assert out.dtype == dtype and out.shape == (*x_shape[:-1], 24)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("call, message", [
    (lambda c, cb: vq_decode(c, cb, 30, 8), "not a multiple"),
    (lambda c, cb: vq_decode(c, cb, 64, 8), "bytes"),
    (lambda c, cb: vq_decode(c.int(), cb, 32, 8), "uint8"),
    (lambda c, cb: vq_decode(c, cb, 32, 7), "cannot be addressed"),
    (lambda c, cb: vq_linear(torch.randn(2, 31), c, cb, None, 32, 8), "last dimension"),
    (lambda c, cb: vq_linear(torch.randn(2, 32), c, cb, torch.zeros(3), 32, 8), "bias"),
])
def test_bad_arguments_say_what_is_wrong(call, message):
    codes, codebook = random_vq_weight(4, 32, 8, 4)
    with pytest.raises(ValueError, match=message):
        call(codes, codebook)


def test_opcheck_passes_for_both_ops():
    codes, codebook = random_vq_weight(6, 16, 6, 2)
    torch.library.opcheck(torch.ops.compressdit.vq_decode.default, (codes, codebook, 16, 6))
    for bias in (None, torch.randn(6)):
        torch.library.opcheck(torch.ops.compressdit.vq_linear.default,
                              (torch.randn(3, 16), codes, codebook.float(), bias, 16, 6))


def test_fake_and_meta_tensors_get_the_right_shapes():
    codes, codebook = random_vq_weight(6, 16, 6, 2)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (x, codes, codebook)]
        out = vq_linear(fakes[0], fakes[1], fakes[2], None, 16, 6)
        weight = vq_decode(fakes[1], fakes[2], 16, 6)
    assert (out.shape, out.dtype) == ((2, 3, 6), torch.bfloat16)
    assert (weight.shape, weight.dtype) == ((6, 16), torch.float16)
    meta = [t.to("meta") for t in (x, codes, codebook)]
    out = vq_linear(meta[0], meta[1], meta[2], torch.zeros(6, device="meta"), 16, 6)
    assert out.device.type == "meta" and out.shape == (2, 3, 6)
    assert vq_decode(meta[1], meta[2], 16, 6).shape == (6, 16)


def test_torch_compile_traces_the_op_in_one_graph():
    codes, codebook = random_vq_weight(6, 16, 8, 4)
    compiled = torch.compile(lambda x: vq_linear(x, codes, codebook, None, 16, 8) * 2, backend="aot_eager",
                             fullgraph=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(compiled(x), vq_linear_reference(x, codes, codebook, None, 16, 8) * 2)


def test_unknown_strategy_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="decode_matmul"):
        with vq_strategy("cublas"):
            pass
    monkeypatch.setenv("COMPRESSDIT_VQ_STRATEGY", "decode_matmul")
    assert vq_ops.current_strategy() == "decode_matmul"
    with vq_strategy("fused"):
        assert vq_ops.current_strategy() == "fused"


# ----------------------------------------------------------------------------------------------- CUDA kernels

@pytest.fixture(scope="module")
def cuda_kernels():
    """The compiled kernels (JIT-built here if not prebuilt); skips with the reason when they do not load."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESSDIT_JIT_CUDA", os.environ.get("COMPRESSDIT_JIT_CUDA", "1"))
        vq_ops.load_cuda_extension.cache_clear()
        available = vq_ops.cuda_extension_available()
    if not available:
        pytest.skip("the VQ CUDA extension does not load (see the warning; build with COMPRESSDIT_BUILD_CUDA=1)")
    return vq_ops.load_cuda_extension()


def fp32_truth(x, codes, codebook, bias, in_features, code_bits):
    weight = vq_decode_reference(codes, codebook, in_features, code_bits).float()
    return F.linear(x.float(), weight, None if bias is None else bias.float())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["fused", "decode_matmul"])
@pytest.mark.parametrize("rows", [1, 16, 256])
@pytest.mark.parametrize("code_bits,dim", CONFIGS)
@pytest.mark.parametrize("in_features,out_features", DIT_XL_SHAPES + FLUX_SHAPES)
def test_cuda_kernels_match_the_reference(cuda_kernels, strategy, rows, code_bits, dim, in_features, out_features):
    codes, codebook = random_vq_weight(out_features, in_features, code_bits, dim, device="cuda")
    bias = torch.randn(out_features, device="cuda")
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.float16)
    with vq_strategy(strategy):
        out = vq_linear(x, codes, codebook, bias, in_features, code_bits)
    truth = fp32_truth(x, codes, codebook, bias, in_features, code_bits)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), truth, rtol=1e-2, atol=1e-2 * float(truth.abs().max()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("code_bits", range(1, 9))
@pytest.mark.parametrize("dim", [1, 3, 4, 8])
def test_cuda_decode_is_exact_for_every_code_width(cuda_kernels, code_bits, dim):
    in_features = dim * 40 + dim * (code_bits % 3)  # code counts that end mid-byte too
    codes, codebook = random_vq_weight(37, in_features, code_bits, dim, device="cuda")
    expected = vq_decode_reference(codes, codebook, in_features, code_bits)
    assert torch.equal(cuda_kernels.vq_decode(codes, codebook, in_features, code_bits), expected)
    assert torch.equal(vq_decode(codes, codebook, in_features, code_bits), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 130])
@pytest.mark.parametrize("code_bits,dim", CONFIGS + [(3, 1), (5, 8)])
def test_cuda_kernels_cover_dtypes_odd_sizes_and_3d_inputs(cuda_kernels, dtype, rows, code_bits, dim):
    in_features, out_features = dim * 72, 70
    codes, codebook = random_vq_weight(out_features, in_features, code_bits, dim, device="cuda")
    x = torch.randn(1, rows, in_features, device="cuda", dtype=dtype)
    for bias in (None, torch.randn(out_features, device="cuda", dtype=dtype)):
        out = vq_linear(x, codes, codebook, bias, in_features, code_bits)
        truth = fp32_truth(x, codes, codebook, bias, in_features, code_bits)
        assert out.dtype == dtype and out.shape == (1, rows, out_features)
        torch.testing.assert_close(out.float(), truth, rtol=2e-2, atol=2e-2 * float(truth.abs().max()))
