// VQ4DiT vector-quantization kernels: decode, fused GEMV (few activation rows), fused tiled GEMM.
// Pure CUDA C++ (no torch headers): `nvcc -c -std=c++17 vq_kernels.cu` builds it on its own.
// Layout and launcher contracts: vq_kernels.h. All products accumulate in fp32.
#include "vq_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace compressdit {
namespace {

constexpr int kDecodeThreads = 256;
constexpr int64_t kDecodeMaxBlocks = 1 << 20;  // grid-stride beyond this

constexpr int kGemvWarps = 8;
constexpr int kGemvRowsPerWarp = 2;                             // output rows per warp
constexpr int kGemvOutputsPerBlock = kGemvWarps * kGemvRowsPerWarp;
constexpr int kGemvChunkCols = 256;                             // x columns staged per step (whole sub-vectors)

constexpr int kTile = 64;                                       // GEMM: rows and output columns per block
constexpr int kTileK = 16;                                      // GEMM: reduction depth per step
constexpr int kGemmThreads = 256;                               // 16 x 16 threads, 4 x 4 outputs each
constexpr int kGemmMaxGridY = 65535;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Code j of a packed row. A code spans at most two bytes; when it spans two, the second still holds
// bits of this code, so it lies inside the row: no read past the row's last byte.
__host__ __device__ __forceinline__ int extract_code(const uint8_t* row, int64_t j, int bits) {
  const int64_t first_bit = j * bits;
  const uint8_t* byte = row + (first_bit >> 3);
  const int shift = static_cast<int>(first_bit & 7);
  unsigned int window = byte[0];
  if (shift + bits > 8) window |= static_cast<unsigned int>(byte[1]) << 8;
  return static_cast<int>((window >> shift) & ((1u << bits) - 1u));
}

// Codebook as fp32 in shared memory, zero-padded to 2**code_bits entries (every code stays in bounds).
template <typename T>
__device__ void load_codebook(const VqWeight& w, float* codebook) {
  const T* source = static_cast<const T*>(w.codebook);
  const int total = (1 << w.code_bits) * w.dim;
  const int valid = w.entries * w.dim;
  for (int i = threadIdx.x; i < total; i += blockDim.x) codebook[i] = i < valid ? to_float(source[i]) : 0.f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One thread per sub-vector: dense[row, j * dim + e] = codebook[code(row, j), e].
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) vq_decode_kernel(VqWeight w, T* __restrict__ dense) {
  const T* codebook = static_cast<const T*>(w.codebook);
  const int64_t count = w.in_features / w.dim;
  const int64_t total = w.out_features * count;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t row = i / count;
    const int64_t j = i - row * count;
    const int code = extract_code(w.codes + row * w.code_stride, j, w.code_bits);
    T* out = dense + row * w.in_features + j * w.dim;
    for (int e = 0; e < w.dim; ++e) out[e] = code < w.entries ? codebook[code * w.dim + e] : from_float<T>(0.f);
  }
}

// Fused GEMV: each warp owns kGemvRowsPerWarp output features; x is staged chunk by chunk in shared
// memory; lanes stride over sub-vectors, then a warp reduction. Shared memory (dynamic):
// codebook [2**bits * dim] then x chunk [rows, chunk_vecs * dim], all fp32.
template <typename T, int kMaxRows>
__global__ void __launch_bounds__(kGemvWarps * 32)
    vq_gemv_kernel(VqWeight w, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int rows,
                   int chunk_vecs) {
  extern __shared__ float gemv_smem[];
  float* codebook = gemv_smem;
  float* x_chunk = gemv_smem + (1 << w.code_bits) * w.dim;
  const int chunk_cols = chunk_vecs * w.dim;
  load_codebook<T>(w, codebook);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t first_out = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * kGemvRowsPerWarp;
  const int64_t in_features = w.in_features;
  const int64_t count = in_features / w.dim;
  float acc[kGemvRowsPerWarp][kMaxRows] = {};

  for (int64_t v0 = 0; v0 < count; v0 += chunk_vecs) {
    const int vecs = count - v0 < chunk_vecs ? static_cast<int>(count - v0) : chunk_vecs;
    const int cols = vecs * w.dim;
    __syncthreads();  // the previous chunk is consumed (first time: the codebook is loaded)
    for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
      const int m = i / cols;
      const int c = i - m * cols;
      x_chunk[m * chunk_cols + c] = to_float(x[m * in_features + v0 * w.dim + c]);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kGemvRowsPerWarp; ++r) {
      const int64_t out = first_out + r;
      if (out >= w.out_features) continue;
      const uint8_t* row_codes = w.codes + out * w.code_stride;
      for (int j = lane; j < vecs; j += 32) {
        const float* wv = codebook + extract_code(row_codes, v0 + j, w.code_bits) * w.dim;
        const float* xv = x_chunk + j * w.dim;
        for (int e = 0; e < w.dim; ++e) {
          const float we = wv[e];
#pragma unroll
          for (int m = 0; m < kMaxRows; ++m)
            if (m < rows) acc[r][m] += we * xv[m * chunk_cols + e];
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kGemvRowsPerWarp; ++r) {
    const int64_t out = first_out + r;
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      if (m >= rows) break;  // uniform across the block: every lane takes part in the shuffles
      const float total = warp_sum(acc[r][m]);
      if (lane == 0 && out < w.out_features)
        y[m * w.out_features + out] = from_float<T>(total + (bias ? to_float(bias[out]) : 0.f));
    }
  }
}

// Fused tiled GEMM: a block computes y[64 rows, 64 outputs]; per K step it stages x[64, 16] and the
// decoded weight tile W[64, 16] (codes + shared-memory codebook) in shared memory, transposed so
// that a thread's 4 x 4 outputs (strided by 16) read conflict-free. Dynamic shared memory: codebook.
template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
    vq_gemm_kernel(VqWeight w, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int64_t rows) {
  extern __shared__ float gemm_codebook[];
  __shared__ float x_tile[kTileK][kTile + 1];
  __shared__ float w_tile[kTileK][kTile + 1];
  load_codebook<T>(w, gemm_codebook);

  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t out0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t in_features = w.in_features;
  const int64_t out_features = w.out_features;
  float acc[4][4] = {};

  for (int64_t k0 = 0; k0 < in_features; k0 += kTileK) {
    __syncthreads();  // the previous tiles are consumed (first time: the codebook is loaded)
    for (int i = threadIdx.x; i < kTile * kTileK; i += kGemmThreads) {
      const int t = i / kTileK;
      const int kk = i % kTileK;
      const int64_t k = k0 + kk;
      const bool k_in = k < in_features;
      x_tile[kk][t] = k_in && row0 + t < rows ? to_float(x[(row0 + t) * in_features + k]) : 0.f;
      float weight = 0.f;
      if (k_in && out0 + t < out_features) {
        const int64_t vec = k / w.dim;
        const int code = extract_code(w.codes + (out0 + t) * w.code_stride, vec, w.code_bits);
        weight = gemm_codebook[code * w.dim + static_cast<int>(k - vec * w.dim)];
      }
      w_tile[kk][t] = weight;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = x_tile[kk][ty + 16 * i];
        b[i] = w_tile[kk][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t out = out0 + tx + 16 * j;
      if (row < rows && out < out_features)
        y[row * out_features + out] = from_float<T>(acc[i][j] + (bias ? to_float(bias[out]) : 0.f));
    }
  }
}

// Calls launch(T{}) with T the element type of `dtype`, then reports the launch status.
template <typename Launch>
cudaError_t dispatch(VqDtype dtype, Launch&& launch) {
  switch (dtype) {
    case VqDtype::kHalf: launch(__half{}); break;
    case VqDtype::kBFloat16: launch(__nv_bfloat16{}); break;
    case VqDtype::kFloat: launch(float{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

size_t codebook_bytes(const VqWeight& w) { return sizeof(float) * (static_cast<size_t>(1) << w.code_bits) * w.dim; }

template <typename T>
void gemv_typed(const VqWeight& w, const T* x, const T* bias, T* y, int rows, cudaStream_t stream) {
  const int chunk_vecs = kGemvChunkCols / w.dim > 0 ? kGemvChunkCols / w.dim : 1;
  const size_t smem = codebook_bytes(w) + sizeof(float) * static_cast<size_t>(rows) * chunk_vecs * w.dim;
  const dim3 grid(static_cast<unsigned int>((w.out_features + kGemvOutputsPerBlock - 1) / kGemvOutputsPerBlock));
  auto run = [&](auto kernel) { kernel<<<grid, kGemvWarps * 32, smem, stream>>>(w, x, bias, y, rows, chunk_vecs); };
  if (rows <= 1) run(vq_gemv_kernel<T, 1>);
  else if (rows <= 2) run(vq_gemv_kernel<T, 2>);
  else if (rows <= 4) run(vq_gemv_kernel<T, 4>);
  else if (rows <= 8) run(vq_gemv_kernel<T, 8>);
  else run(vq_gemv_kernel<T, kVqMaxGemvRows>);
}

template <typename T>
void gemm_typed(const VqWeight& w, const T* x, const T* bias, T* y, int64_t rows, cudaStream_t stream) {
  const unsigned int out_tiles = static_cast<unsigned int>((w.out_features + kTile - 1) / kTile);
  const int64_t rows_per_launch = static_cast<int64_t>(kGemmMaxGridY) * kTile;
  for (int64_t first = 0; first < rows; first += rows_per_launch) {
    const int64_t part = rows - first < rows_per_launch ? rows - first : rows_per_launch;
    const dim3 grid(out_tiles, static_cast<unsigned int>((part + kTile - 1) / kTile));
    vq_gemm_kernel<T><<<grid, kGemmThreads, codebook_bytes(w), stream>>>(
        w, x + first * w.in_features, bias, y + first * w.out_features, part);
  }
}

bool valid_weight(const VqWeight& w) {
  return w.code_bits >= 1 && w.code_bits <= 8 && w.dim >= 1 && w.dim <= kVqMaxDim && w.entries >= 0 &&
         w.entries <= (1 << w.code_bits) && (1 << w.code_bits) * w.dim <= kVqMaxCodebookFloats &&
         w.in_features % w.dim == 0 && w.code_stride * 8 >= w.in_features / w.dim * w.code_bits;
}

}  // namespace

int vq_code_at(const uint8_t* row, int64_t j, int code_bits) { return extract_code(row, j, code_bits); }

cudaError_t launch_vq_decode(VqDtype dtype, const VqWeight& weight, void* dense, cudaStream_t stream) {
  if (!valid_weight(weight)) return cudaErrorInvalidValue;
  const int64_t total = weight.out_features * (weight.in_features / weight.dim);
  if (total == 0) return cudaSuccess;
  int64_t blocks = (total + kDecodeThreads - 1) / kDecodeThreads;
  if (blocks > kDecodeMaxBlocks) blocks = kDecodeMaxBlocks;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned int grid = static_cast<unsigned int>(blocks);
    vq_decode_kernel<T><<<grid, kDecodeThreads, 0, stream>>>(weight, static_cast<T*>(dense));
  });
}

cudaError_t launch_vq_gemv(VqDtype dtype, const VqWeight& weight, const void* x, const void* bias, void* y,
                           int64_t rows, cudaStream_t stream) {
  if (!valid_weight(weight) || rows < 0 || rows > kVqMaxGemvRows) return cudaErrorInvalidValue;
  if (rows == 0 || weight.out_features == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    gemv_typed<T>(weight, static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y),
                  static_cast<int>(rows), stream);
  });
}

cudaError_t launch_vq_gemm(VqDtype dtype, const VqWeight& weight, const void* x, const void* bias, void* y,
                           int64_t rows, cudaStream_t stream) {
  if (!valid_weight(weight) || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0 || weight.out_features == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    gemm_typed<T>(weight, static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y), rows, stream);
  });
}

}  // namespace compressdit
