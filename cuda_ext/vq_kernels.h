// Host launchers of the VQ4DiT vector-quantization kernels (vq_kernels.cu): plain C++, raw pointers,
// sizes and a stream; no torch types, so the kernels build and test without torch.
//
// Weight layout (shared with compressdit/quant/vq_primitives.py): a weight [out, in] is cut into
// sub-vectors of `dim` consecutive input weights per row; row r stores its in / dim codes as one
// little-endian bit stream of `code_bits`-bit codes: code j occupies stream bits [j * b, (j + 1) * b),
// stream bit i is bit i % 8 of byte i / 8. Rows are `code_stride` bytes apart.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace compressdit {

// Element type of activations, codebook, bias and outputs (one type per call).
enum class VqDtype : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

constexpr int kVqMaxGemvRows = 16;          // the fused GEMV keeps this many activation rows in registers
constexpr int kVqMaxDim = 32;               // longest sub-vector the kernels accept
constexpr int kVqMaxCodebookFloats = 8192;  // 2**code_bits * dim floats of shared memory (32 KiB)

// One vector-quantized weight [out_features, in_features] on the device.
struct VqWeight {
  const uint8_t* codes;  // [out_features, code_stride] packed bit streams
  const void* codebook;  // [entries, dim], entries <= 2**code_bits; codes >= entries decode to 0
  int64_t out_features;
  int64_t in_features;   // a multiple of dim
  int64_t code_stride;   // bytes per row, at least ceil(in_features / dim * code_bits / 8)
  int dim;
  int entries;
  int code_bits;         // 1..8
};

// Code j of one packed row, as every kernel reads it (host-callable, for tests).
int vq_code_at(const uint8_t* row, int64_t j, int code_bits);

// Dense weight [out_features, in_features] in `dtype` (the codebook's).
cudaError_t launch_vq_decode(VqDtype dtype, const VqWeight& weight, void* dense, cudaStream_t stream);

// y[rows, out] = x[rows, in] @ W^T (+ bias), fp32 accumulate; rows <= kVqMaxGemvRows.
cudaError_t launch_vq_gemv(VqDtype dtype, const VqWeight& weight, const void* x, const void* bias, void* y,
                           int64_t rows, cudaStream_t stream);

// Same product for any number of rows: shared-memory tiles, the weight tile decoded on the fly.
cudaError_t launch_vq_gemm(VqDtype dtype, const VqWeight& weight, const void* x, const void* bias, void* y,
                           int64_t rows, cudaStream_t stream);

}  // namespace compressdit
