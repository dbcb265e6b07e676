"""Vector-quantized linear: per-layer codebook (fp16) and packed codeword indices (VQ4DiT storage)."""

from __future__ import annotations

import torch
from torch import nn

from compressdit.quant.layers import PackedParameter, QuantizedLinear, QuantState
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.vq_ops import vq_decode, vq_linear
from compressdit.quant.vq_primitives import (kmeans, nearest_codewords, pack_code_bits, packed_code_bytes,
                                             to_subvectors, unpack_code_bits)

CODEBOOK_DTYPE = torch.float16


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """Each output row's RMS, rounded to the stored fp16 (a zero row gets 1)."""
    rms = weight.float().pow(2).mean(1).sqrt()
    return torch.where(rms > 0, rms, torch.ones_like(rms)).to(CODEBOOK_DTYPE).float()


def code_bits(spec: LinearQuantSpec) -> int:
    """Bits of one codeword index (``log2(codebook_size)``)."""
    return (spec.codebook_size - 1).bit_length()


class VQLinear(QuantizedLinear):
    """``nn.Linear`` whose weight is ``codebook[codes]``: sub-vectors of ``vector_dim`` input weights per row.

    ``weight`` holds each row's codes as a packed bit stream (``uint8``; one byte per code for k=256);
    the forward path is the ``compressdit::vq_linear`` op (fused CUDA kernel or PyTorch reference). With
    ``spec.row_scale`` the weight is ``row_scale[:, None] * codebook[codes]`` (the scale applied to the output).
    """

    quantized_tensors = ("weight", "codebook", "bias")  # the bias is calibrated: saved as is (fp32)

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LinearQuantSpec,
                 device=None, dtype=None) -> None:
        self._init_shape(in_features, out_features, spec)
        self.code_bits = code_bits(spec)
        nbytes = packed_code_bytes(in_features // spec.vector_dim, self.code_bits)
        self.weight = PackedParameter.empty((out_features, nbytes), torch.uint8, out_features, in_features, device)
        self.codebook = QuantState(torch.zeros(spec.codebook_size, spec.vector_dim, dtype=CODEBOOK_DTYPE,
                                               device=device))
        if spec.row_scale:
            self.row_scale = QuantState(torch.ones(out_features, dtype=CODEBOOK_DTYPE, device=device))
            self.quantized_tensors = ("weight", "codebook", "row_scale", "bias")
        else:
            self.row_scale = None
        # fp32 whatever the model dtype: calibration trains the bias, and it is saved as trained
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=torch.float32),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearQuantSpec, input_absmax: torch.Tensor | None = None,
                    seed: int = 0) -> "VQLinear":
        """k-means codebook of the layer's sub-vectors, then each sub-vector's nearest codeword."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        weight = linear.weight.detach().float()
        scale = row_scales(weight) if spec.row_scale else None
        vectors = to_subvectors(weight if scale is None else weight / scale[:, None], spec.vector_dim)
        codebook = kmeans(vectors, spec.codebook_size, seed=seed).to(CODEBOOK_DTYPE)
        codes = nearest_codewords(vectors, codebook.float())[0].reshape(linear.out_features, -1)
        module.load_codes(codes, codebook, scale)
        if module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def load_codes(self, codes: torch.Tensor, codebook: torch.Tensor, row_scale: torch.Tensor | None = None) -> None:
        """Set codeword indices ``[out, in / vector_dim]``, the codebook ``[k, vector_dim]`` and, for a
        ``row_scale`` spec, the per-row scales ``[out]``."""
        if (row_scale is None) != (self.row_scale is None):
            raise ValueError(f"row_scale must be given exactly when the spec has row_scale ({self.spec.row_scale})")
        self.weight.data = pack_code_bits(codes, self.code_bits).to(self.weight.device)
        self.codebook.copy_(codebook.to(CODEBOOK_DTYPE))
        if row_scale is not None:
            self.row_scale.copy_(row_scale.to(CODEBOOK_DTYPE))

    def codes(self) -> torch.Tensor:
        return unpack_code_bits(self.weight.data, self.code_bits, self.in_features // self.spec.vector_dim)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        weight = vq_decode(self.weight, self.codebook, self.in_features, self.code_bits)
        if self.row_scale is not None:  # in fp32: an fp16 product would round once more
            return (weight.float() * self.row_scale.float()[:, None]).to(dtype)
        return weight.to(dtype)

    def fp32_decoding(self) -> tuple | None:
        """The packed codeword indices, their width, the codebook and row scales in fp32 (exact widenings)."""
        return ("vq", self.weight.data, self.code_bits, self.codebook.float().contiguous(),
                None if self.row_scale is None else self.row_scale.float().contiguous(), self.in_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ``compressdit::vq_linear`` op (CUDA kernels or the PyTorch reference)."""
        if self.row_scale is None:
            return vq_linear(x, self.weight, self.codebook, self.bias, self.in_features, self.code_bits)
        out = vq_linear(x, self.weight, self.codebook, None, self.in_features, self.code_bits)
        out = out * self.row_scale.to(out.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)
