// Torch glue for the VQ4DiT kernels (vq_kernels.cu): argument checks, device guard, current stream,
// dtype dispatch. Called by compressdit/quant/vq_ops.py, which keeps the PyTorch reference as fallback.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "vq_kernels.h"

namespace {

using compressdit::VqDtype;
using compressdit::VqWeight;

VqDtype kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return VqDtype::kHalf;
    case at::kBFloat16: return VqDtype::kBFloat16;
    case at::kFloat: return VqDtype::kFloat;
    default:
      TORCH_CHECK(false, "VQ kernels take float16, bfloat16 or float32; ", name, " is ", t.scalar_type(),
                  ". Cast it, or call compressdit.quant.vq_ops, which falls back to the PyTorch reference.");
  }
}

void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, kernel, " failed: ", cudaGetErrorString(status));
}

VqWeight checked_weight(const at::Tensor& codes, const at::Tensor& codebook, int64_t in_features, int64_t code_bits) {
  TORCH_CHECK(codes.is_cuda() && codebook.device() == codes.device(),
              "codes and codebook must be on the same CUDA device, got ", codes.device(), " and ", codebook.device());
  TORCH_CHECK(codes.scalar_type() == at::kByte, "codes must be uint8 packed bit streams, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2 && codebook.dim() == 2, "codes must be [out, nbytes] and codebook [k, d], got ",
              codes.sizes(), " and ", codebook.sizes());
  TORCH_CHECK(codes.is_contiguous() && codebook.is_contiguous(), "codes and codebook must be contiguous");
  TORCH_CHECK(code_bits >= 1 && code_bits <= 8, "code_bits must be in 1..8, got ", code_bits);
  const int64_t entries = codebook.size(0);
  const int64_t dim = codebook.size(1);
  TORCH_CHECK(dim >= 1 && dim <= compressdit::kVqMaxDim, "the kernels take sub-vectors of 1..",
              compressdit::kVqMaxDim, " weights, the codebook has d=", dim);
  TORCH_CHECK(entries <= (int64_t{1} << code_bits), "a codebook of ", entries, " entries needs more than ", code_bits,
              "-bit codes");
  TORCH_CHECK((int64_t{1} << code_bits) * dim <= compressdit::kVqMaxCodebookFloats, "2**", code_bits, " x ", dim,
              " codebook floats exceed the ", compressdit::kVqMaxCodebookFloats, " held in shared memory");
  TORCH_CHECK(in_features >= 0 && in_features % dim == 0, "in_features ", in_features,
              " is not a multiple of the vector dimension ", dim);
  const int64_t needed = (in_features / dim * code_bits + 7) / 8;
  TORCH_CHECK(codes.size(1) >= needed, "each codes row holds ", codes.size(1), " bytes; ", in_features / dim,
              " codes of ", code_bits, " bits need ", needed);
  return VqWeight{codes.data_ptr<uint8_t>(), codebook.data_ptr(), codes.size(0), in_features, codes.size(1),
                  static_cast<int>(dim), static_cast<int>(entries), static_cast<int>(code_bits)};
}

at::Tensor vq_decode(const at::Tensor& codes, const at::Tensor& codebook, int64_t in_features, int64_t code_bits) {
  const VqWeight weight = checked_weight(codes, codebook, in_features, code_bits);
  const VqDtype dtype = kernel_dtype(codebook, "codebook");
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor dense = at::empty({codes.size(0), in_features}, codebook.options());
  check_launch(compressdit::launch_vq_decode(dtype, weight, dense.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "vq_decode");
  return dense;
}

using LinearLauncher = cudaError_t (*)(VqDtype, const VqWeight&, const void*, const void*, void*, int64_t,
                                       cudaStream_t);

// y [rows, out] = x [rows, in] @ W^T (+ bias); x, codebook and bias share one dtype.
at::Tensor vq_linear_with(LinearLauncher launch, const char* kernel, const at::Tensor& x, const at::Tensor& codes,
                          const at::Tensor& codebook, const std::optional<at::Tensor>& bias, int64_t code_bits) {
  TORCH_CHECK(x.is_cuda() && x.device() == codes.device(), "x must be on the device of the codes (",
              codes.device(), "), got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), kernel, " takes a contiguous 2D x [rows, in], got ", x.sizes());
  TORCH_CHECK(codebook.scalar_type() == x.scalar_type(), "codebook dtype ", codebook.scalar_type(),
              " differs from x dtype ", x.scalar_type(), "; cast the codebook to x's dtype");
  const VqWeight weight = checked_weight(codes, codebook, x.size(1), code_bits);
  const VqDtype dtype = kernel_dtype(x, "x");
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->is_contiguous(),
                "bias must be a contiguous ", x.scalar_type(), " tensor on ", x.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == codes.size(0), "bias must be [", codes.size(0), "], got ",
                bias->sizes());
    bias_ptr = bias->data_ptr();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), codes.size(0)}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(launch(dtype, weight, x.data_ptr(), bias_ptr, y.data_ptr(), x.size(0), stream), kernel);
  return y;
}

at::Tensor vq_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                   const std::optional<at::Tensor>& bias, int64_t code_bits) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= compressdit::kVqMaxGemvRows, "vq_gemv takes at most ",
              compressdit::kVqMaxGemvRows, " rows, got x of shape ", x.sizes(), "; use vq_gemm");
  return vq_linear_with(compressdit::launch_vq_gemv, "vq_gemv", x, codes, codebook, bias, code_bits);
}

at::Tensor vq_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                   const std::optional<at::Tensor>& bias, int64_t code_bits) {
  return vq_linear_with(compressdit::launch_vq_gemm, "vq_gemm", x, codes, codebook, bias, code_bits);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "VQ4DiT vector-quantization CUDA kernels (see cuda_ext/README.md)";
  m.def("vq_decode", &vq_decode, "Dense weight [out, in_features] from packed codes and a codebook",
        py::arg("codes"), py::arg("codebook"), py::arg("in_features"), py::arg("code_bits"));
  m.def("vq_gemv", &vq_gemv, "Fused x @ W^T (+ bias) for at most max_gemv_rows rows of x", py::arg("x"),
        py::arg("codes"), py::arg("codebook"), py::arg("bias"), py::arg("code_bits"));
  m.def("vq_gemm", &vq_gemm, "Fused tiled x @ W^T (+ bias) for any number of rows", py::arg("x"), py::arg("codes"),
        py::arg("codebook"), py::arg("bias"), py::arg("code_bits"));
  m.attr("max_gemv_rows") = compressdit::kVqMaxGemvRows;
  m.attr("max_dim") = compressdit::kVqMaxDim;
  m.attr("max_codebook_floats") = compressdit::kVqMaxCodebookFloats;
}
