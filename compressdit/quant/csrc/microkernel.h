/* oneDNN's BRGeMM microkernel as torch exposes it (at::native::cpublas: brgemm, pack, could_pack; what its CPU flash
 * attention uses), shared by int8_linear.cpp (int8 x int8 -> int32) and bf16_gemm.cpp (bf16 x bf16 -> fp32): a
 * weight [out, in] is packed once into blocks of BLOCK output channels in AMX's VNNI layout, and each call multiplies
 * rows by one block. Only where torch's CPUBlas.h declares the microkernel for the type (CPUBLAS_BRGEMM_*): elsewhere
 * ready<T>() is false and the kernels never ask for it. */
#ifndef COMPRESSDIT_MICROKERNEL_H
#define COMPRESSDIT_MICROKERNEL_H

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <type_traits>

namespace compressdit_microkernel {

constexpr int64_t BLOCK = 64; /* output channels a packed block: cpublas::pack's widest layout */

#if defined(CPUBLAS_BRGEMM_BF16BF16F32) || defined(CPUBLAS_BRGEMM_I8I8I32)
#define COMPRESSDIT_MICROKERNEL 1
#endif

/* whether torch declares the microkernel for T (at::BFloat16, int8_t) and this CPU packs for it (AMX) */
template <typename T>
inline bool ready() {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
        return at::native::cpublas::could_pack(at::kBFloat16);
#endif
    } else {
#ifdef CPUBLAS_BRGEMM_I8I8I32
        return at::native::cpublas::could_pack(at::kChar);
#endif
    }
    return false;
}

/* w [out, in] (any dtype, converted to T's) -> [blocks, in, BLOCK] of T: each block of BLOCK output channels of w^T
 * in the microkernel's layout, a last partial block padded with zeros; ready<T>() checked by the caller. */
template <typename T>
at::Tensor pack(const at::Tensor &w, at::ScalarType type) {
    const int64_t out_features = w.size(0), in_features = w.size(1), blocks = (out_features + BLOCK - 1) / BLOCK;
    at::Tensor t = at::zeros({in_features, blocks * BLOCK}, w.options().dtype(type));
    t.narrow(1, 0, out_features).copy_(w.t());
    at::Tensor packed = at::empty({blocks, in_features, BLOCK}, t.options());
#ifdef COMPRESSDIT_MICROKERNEL
    for (int64_t b = 0; b < blocks; ++b)
        at::native::cpublas::pack(in_features, BLOCK, blocks * BLOCK, BLOCK, type, type, t.data_ptr<T>() + b * BLOCK,
                                  packed[b].data_ptr<T>());
#endif
    return packed;
}

/* c[rows, width] (leading dimension ld_c) = a[rows, depth] (contiguous) x one packed block b; Acc: float for bf16,
 * int32_t for int8 */
template <typename T, typename Acc>
inline void multiply(int64_t rows, int64_t width, int64_t depth, int64_t ld_c, const T *a, const T *b, Acc *c) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
        at::native::cpublas::brgemm(rows, width, depth, depth, BLOCK, ld_c, false, a, b, c, true);
        return;
#endif
    } else {
#ifdef CPUBLAS_BRGEMM_I8I8I32
        at::native::cpublas::brgemm(rows, width, depth, depth, BLOCK, ld_c, false, a, b, c, true);
        return;
#endif
    }
    TORCH_CHECK(false, "this torch has no BRGeMM microkernel for the type");
}

/* the thread's AMX state released, after its last multiply of a call */
inline void release() {
#ifdef COMPRESSDIT_MICROKERNEL
    at::native::cpublas::brgemm_release(true);
#endif
}

/* t absent (nullptr), or a contiguous fp32 tensor of `size` elements (what the C loops read through its pointer) */
inline const float *fp32_vector(const c10::optional<at::Tensor> &t, int64_t size, const char *what) {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == size, what,
                " must be a contiguous fp32 tensor of ", size, " elements");
    return t->data_ptr<float>();
}

}  // namespace compressdit_microkernel

#endif
