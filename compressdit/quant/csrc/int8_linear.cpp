/* A whole W8A8 CPU linear in one call (see compressdit/quant/cpu_native.py: int8_linear): the dynamic int8
 * activation codes (int8_rows.c's compressdit_quantize_int8), torch's int8 x int8 -> int32 GEMM (at::_int_mm, the
 * op the Python path calls) and the fp32 epilogue (compressdit_dequantize_int32), the same numbers as the Python path
 * bit for bit.
 *
 * Why: from Python each of those is a separate call (ctypes, the dispatcher, two allocations, thread-count changes:
 * ~10 us a zoo layer), and on two threads each is its own parallel region, whose rows the next one reads from the
 * other core. Here a team of `threads` OpenMP threads (torch's runtime: cpu_native.py builds with -fopenmp only where
 * torch runs on the libgomp it links) each quantizes its contiguous block of rows, multiplies that block and scales
 * it: one fork and join a layer, a block's rows never leave their core. Inside the team, at::_int_mm runs on its
 * calling thread (ATen and oneDNN do not nest parallel regions). Per-tensor scales need every row first: the codes
 * are then made by one threaded pass before the team. Codes made earlier for the same input (the query, key and
 * value projections share them) can be passed in: the team only multiplies and scales. int8_group_linear does the
 * same for weights in column groups (cpu-int8-group-gemm: one at::_int_mm, or microkernel call, per group a block).
 * int8_linear can also
 * put its output through the tanh GELU in the same block (float_rows.c's pass; quant/native_gelu.py asks for it).
 * On CPUs with AMX-INT8, int8_linear takes the codes packed once (int8_pack) and runs oneDNN's BRGeMM microkernel
 * (torch's at::native::cpublas::brgemm) instead of at::_int_mm: the same int32 sums, without _int_mm's per-call
 * primitive lookup and weight reorder (256 x 128 -> 128 at one thread: 5.5 us against 19.2). */

#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <tuple>

#include "microkernel.h"
#include "team.h"

extern "C" {
int compressdit_quantize_int8(const float *x, const float *smooth, int64_t rows, int64_t cols, int32_t per_token,
                              int32_t offset, int8_t *q, float *scale, int32_t threads);
void compressdit_dequantize_int32(const int32_t *acc, const float *w_scale, const float *a_scale, int32_t per_token,
                                  const float *bias, int64_t rows, int64_t cols, float *out, int32_t threads);
void compressdit_gelu_tanh(const float *x, int64_t n, float *y, int32_t threads);
void compressdit_bf16_to_float(const uint16_t *y, const float *bias, int64_t rows, int64_t cols, float *out,
                               int32_t threads);
void compressdit_float_to_bf16(const float *x, int64_t n, uint16_t *y, int32_t threads);
void compressdit_quantize_int8_groups(const float *x, int64_t rows, int64_t cols, int64_t group, int32_t per_token,
                                      int8_t *q, float *scale, int32_t threads);
void compressdit_dequantize_groups(const int32_t *acc, const float *w_scale, const float *a_scale, int32_t per_token,
                                   const float *bias, int64_t groups, int64_t rows, int64_t cols, float *out,
                                   int32_t threads);
}

namespace {

using compressdit_team::on_team;

using compressdit_microkernel::BLOCK;
using compressdit_microkernel::fp32_vector;

constexpr int64_t GELU_TANH = 1; /* int8_linear's `activation`: 0 none, 1 the tanh GELU of float_rows.c */

bool int8_brgemm_ready() { return compressdit_microkernel::ready<int8_t>(); }

/* int8 codes [out, in] (in a multiple of 4) -> int8 [blocks, in, 64]: each block of 64 output channels of the codes'
 * transpose in AMX's VNNI layout (a last partial block padded with zeros), for int8_linear's microkernel path. */
at::Tensor int8_pack(const at::Tensor &codes) {
    TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.size(0) > 0 && codes.size(1) > 0 &&
                    codes.size(1) % 4 == 0,
                "int8_pack: codes must be a non-empty int8 [out, in] matrix with in a multiple of 4");
    TORCH_CHECK(int8_brgemm_ready(), "int8_pack: this CPU has no int8 BRGeMM microkernel (AMX-INT8)");
    return compressdit_microkernel::pack<int8_t>(codes, at::kChar);
}

/* rows a microkernel chunk: quantized, multiplied by every column block and scaled while in cache (the whole block
 * of rows at once streamed its codes once per 64 output channels: a DiT-XL/2 MLP layer's 4096 x 1152 -> 4608 took
 * longer than oneDNN's GEMM) */
constexpr int64_t CHUNK_ROWS = 128;

/* rows [r0, r1) of the layer, CHUNK_ROWS at a time on the microkernel (at once on at::_int_mm): codes (unless made
 * already; bf16 rows widened exactly into a scratch first), their int32 GEMM (the microkernel on `packed` where
 * given) into a scratch, the epilogue into out's rows (bf16 out: rounded to nearest even from the fp32 values) */
void rows_block(const at::Tensor &x, const float *smooth, const at::Tensor &codes_t, const int8_t *packed,
                const float *w_scale, const float *bias, bool per_token, bool quantize, int64_t activation,
                at::Tensor &q, at::Tensor &scale, at::Tensor &out, int64_t r0, int64_t r1) {
    const int64_t cols = x.size(1), out_features = codes_t.size(1);
    const bool bf16_in = x.scalar_type() == at::kBFloat16, bf16_out = out.scalar_type() == at::kBFloat16;
    const int64_t chunk = packed ? CHUNK_ROWS : r1 - r0;
    const int64_t scratch_rows = std::min(chunk, r1 - r0);
    at::Tensor acc = at::empty({scratch_rows, out_features}, x.options().dtype(at::kInt));
    /* bf16 rows: one row at a time widened (and balanced) into these, then quantized, all in L1 / L2 */
    at::Tensor widened = bf16_in && quantize ? at::empty({cols}, x.options().dtype(at::kFloat)) : at::Tensor();
    at::Tensor rounded = bf16_in && quantize && smooth ? at::empty({cols}, x.options()) : at::Tensor();
    int32_t *sums = acc.data_ptr<int32_t>();
    for (int64_t c0 = r0; c0 < r1; c0 += chunk) {
        const int64_t rows = std::min(chunk, r1 - c0);
        float *a_scale = scale.data_ptr<float>() + (per_token ? c0 : 0);
        if (quantize && !bf16_in &&
            compressdit_quantize_int8(x.data_ptr<float>() + c0 * cols, smooth, rows, cols, 1, 0,
                                      q.data_ptr<int8_t>() + c0 * cols, a_scale, 1))
            throw std::runtime_error("out of memory");
        for (int64_t i = 0; quantize && bf16_in && i < rows; ++i) {
            float *w = widened.data_ptr<float>();
            compressdit_bf16_to_float(reinterpret_cast<const uint16_t *>(x.data_ptr<at::BFloat16>()) + (c0 + i) * cols,
                                      nullptr, 1, cols, w, 1);
            if (smooth) { /* torch's bf16 division: the fp32 quotient (IEEE), rounded to bf16 */
                for (int64_t j = 0; j < cols; ++j) w[j] = w[j] / smooth[j];
                uint16_t *r = reinterpret_cast<uint16_t *>(rounded.data_ptr<at::BFloat16>());
                compressdit_float_to_bf16(w, cols, r, 1);
                compressdit_bf16_to_float(r, nullptr, 1, cols, w, 1);
            }
            if (compressdit_quantize_int8(w, nullptr, 1, cols, 1, 0, q.data_ptr<int8_t>() + (c0 + i) * cols,
                                          a_scale + i, 1))
                throw std::runtime_error("out of memory");
        }
        if (packed) { /* the same int32 sums on oneDNN's microkernel (AMX-INT8), one call per block of 64 channels */
            const int64_t blocks = (out_features + BLOCK - 1) / BLOCK;
            for (int64_t b = 0; b < blocks; ++b)
                compressdit_microkernel::multiply(rows, std::min(BLOCK, out_features - b * BLOCK), cols, out_features,
                                                  q.data_ptr<int8_t>() + c0 * cols, packed + b * cols * BLOCK,
                                                  sums + b * BLOCK);
        } else {
            at::Tensor block = acc.narrow(0, 0, rows);
            at::_int_mm_out(block, q.narrow(0, c0, rows), codes_t);
        }
        /* a row at a time (in L1 however wide): fp32 out, into its row; bf16 out, the fp32 values in place of the
         * sums, then rounded into its row */
        for (int64_t i = 0; i < rows; ++i) {
            int32_t *row_sums = sums + i * out_features;
            float *values = bf16_out ? reinterpret_cast<float *>(row_sums)
                                     : out.data_ptr<float>() + (c0 + i) * out_features;
            compressdit_dequantize_int32(row_sums, w_scale, a_scale + (per_token ? i : 0), per_token, bias, 1,
                                         out_features, values, 1);
            if (activation == GELU_TANH) compressdit_gelu_tanh(values, out_features, values, 1);
            if (bf16_out)
                compressdit_float_to_bf16(
                    values, out_features,
                    reinterpret_cast<uint16_t *>(out.data_ptr<at::BFloat16>()) + (c0 + i) * out_features, 1);
        }
    }
    if (packed) compressdit_microkernel::release();
}

/* (x / smooth) @ W^T + bias with dynamic int8 activations, W = codes * w_scale: x fp32 or bf16 [rows, in] contiguous
 * (bf16 rows are widened exactly, so their codes are those of x.float(); with smooth, whose values must then be bf16
 * ones, divided as torch divides bf16 tensors: the fp32 quotient rounded to bf16), codes_t the int8
 * [out, in] codes' transposed view, w_scale fp32 [out], bias fp32 [out]; q / scale: codes [rows, in] and scales
 * [rows, 1] or [1, 1] of x made earlier, or none; activation 1: the output through the tanh GELU
 * (compressdit_gelu_tanh) in the same block, while it is in cache; packed: int8_pack of the codes (the microkernel
 * runs), or none (at::_int_mm). Returns (out [rows, out] in x's dtype: the fp32 result, rounded to nearest even for
 * bf16 as .to(torch.bfloat16) rounds, q, scale). */
std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_linear(const at::Tensor &x, const c10::optional<at::Tensor> &smooth,
                                                           const at::Tensor &codes_t, const at::Tensor &w_scale,
                                                           const c10::optional<at::Tensor> &bias, bool per_token,
                                                           int64_t threads, const c10::optional<at::Tensor> &codes,
                                                           const c10::optional<at::Tensor> &scales,
                                                           int64_t activation,
                                                           const c10::optional<at::Tensor> &packed) {
    TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                    x.is_contiguous() && x.size(0) > 0,
                "int8_linear: x must be a non-empty contiguous fp32 or bf16 matrix");
    TORCH_CHECK(codes_t.dim() == 2 && codes_t.scalar_type() == at::kChar && codes_t.size(0) == x.size(1),
                "int8_linear: codes_t must be int8 [in, out]");
    const int64_t rows = x.size(0), out_features = codes_t.size(1);
    fp32_vector(smooth, x.size(1), "int8_linear: smooth");
    fp32_vector(w_scale, out_features, "int8_linear: w_scale");
    fp32_vector(bias, out_features, "int8_linear: bias");
    TORCH_CHECK(codes.has_value() == scales.has_value(), "int8_linear: give both codes and scales, or neither");
    TORCH_CHECK(activation == 0 || activation == GELU_TANH, "int8_linear: unknown activation ", activation);
    const bool quantize = !codes.has_value();
    const int64_t blocks = (out_features + BLOCK - 1) / BLOCK;
    TORCH_CHECK(!packed.has_value() || (packed->scalar_type() == at::kChar && packed->is_contiguous() &&
                                        packed->dim() == 3 && packed->size(0) == blocks &&
                                        packed->size(1) == x.size(1) && packed->size(2) == BLOCK),
                "int8_linear: packed must be int8_pack's [", blocks, ", ", x.size(1), ", ", BLOCK, "] for the codes");
    const int8_t *packed_p = packed.has_value() ? packed->data_ptr<int8_t>() : nullptr;
    at::Tensor q = quantize ? at::empty({rows, x.size(1)}, x.options().dtype(at::kChar)) : *codes;
    at::Tensor scale = quantize ? at::empty({per_token ? rows : 1, 1}, x.options().dtype(at::kFloat)) : *scales;
    at::Tensor out = at::empty({rows, out_features}, x.options());
    const float *smooth_p = smooth.has_value() ? smooth->data_ptr<float>() : nullptr;
    const float *bias_p = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    const float *w_scale_p = w_scale.data_ptr<float>();
    bool block_quantizes = quantize;
    if (quantize && !per_token) { /* the tensor's scale needs every row: one threaded pass first */
        at::Tensor x32 = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
        const float *divisor = smooth_p;
        if (x.scalar_type() == at::kBFloat16 && smooth_p) { /* torch's bf16 division, as the blocks do it */
            x32 = x32.div(*smooth).to(at::kBFloat16).to(at::kFloat);
            divisor = nullptr;
        }
        TORCH_CHECK(!compressdit_quantize_int8(x32.data_ptr<float>(), divisor, rows, x.size(1), 0, 0,
                                               q.data_ptr<int8_t>(), scale.data_ptr<float>(), (int32_t)threads),
                    "int8_linear: out of memory");
        block_quantizes = false;
    }
    on_team(rows, threads, "int8_linear", [&](int64_t r0, int64_t r1) {
        rows_block(x, smooth_p, codes_t, packed_p, w_scale_p, bias_p, per_token, block_quantizes, activation, q, scale,
                   out, r0, r1);
    });
    return {out, q, scale};
}

/* Grouped weights (codes int8 [groups, out, group], w_scale fp32 [groups, out]) x dynamic int8 activations: per
 * block of rows its codes per column group ([groups, block rows, group]; per-tensor scales: made for all rows first),
 * one at::_int_mm per group into the block's int32 sums [groups, block rows, out], one fused epilogue adding each
 * group's sums times its scales in fp32 (compressdit_dequantize_groups): cpu-int8-group-gemm's numbers, bit for bit.
 * Returns out [rows, out] fp32. */
at::Tensor int8_group_linear(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &w_scale,
                             const c10::optional<at::Tensor> &bias, bool per_token, int64_t threads,
                             const c10::optional<at::Tensor> &packed) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(0) > 0,
                "int8_group_linear: x must be a non-empty contiguous fp32 matrix");
    TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kChar && codes.is_contiguous() &&
                    codes.size(0) * codes.size(2) == x.size(1),
                "int8_group_linear: codes must be contiguous int8 [groups, out, group]");
    const int64_t rows = x.size(0), cols = x.size(1), groups = codes.size(0), out_features = codes.size(1),
                  group = codes.size(2);
    fp32_vector(w_scale, groups * out_features, "int8_group_linear: w_scale");
    fp32_vector(bias, out_features, "int8_group_linear: bias");
    const int64_t blocks = (out_features + BLOCK - 1) / BLOCK;
    TORCH_CHECK(!packed.has_value() || (packed->scalar_type() == at::kChar && packed->is_contiguous() &&
                                        packed->dim() == 4 && packed->size(0) == groups &&
                                        packed->size(1) == blocks && packed->size(2) == group &&
                                        packed->size(3) == BLOCK),
                "int8_group_linear: packed must be int8_pack's [", blocks, ", ", group, ", ", BLOCK, "] per group");
    const int8_t *packed_p = packed.has_value() ? packed->data_ptr<int8_t>() : nullptr;
    at::Tensor out = at::empty({rows, out_features}, x.options());
    at::Tensor scale = at::empty({per_token ? rows : 1}, x.options());
    at::Tensor all_codes; /* per-tensor: every row's codes, [groups, rows, group] */
    if (!per_token) {
        all_codes = at::empty({groups, rows, group}, x.options().dtype(at::kChar));
        compressdit_quantize_int8_groups(x.data_ptr<float>(), rows, cols, group, 0, all_codes.data_ptr<int8_t>(),
                                         scale.data_ptr<float>(), (int32_t)threads);
    }
    const float *bias_p = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    auto block = [&](int64_t r0, int64_t r1) {
        const int64_t n = r1 - r0;
        float *a_scale = scale.data_ptr<float>() + (per_token ? r0 : 0);
        at::Tensor q;
        if (per_token) {
            q = at::empty({groups, n, group}, x.options().dtype(at::kChar));
            compressdit_quantize_int8_groups(x.data_ptr<float>() + r0 * cols, n, cols, group, 1, q.data_ptr<int8_t>(),
                                             a_scale, 1);
        }
        at::Tensor acc = at::empty({groups, n, out_features}, x.options().dtype(at::kInt));
        for (int64_t g = 0; g < groups; ++g) {
            at::Tensor sums = acc.select(0, g);
            at::Tensor a = per_token ? q.select(0, g) : all_codes.select(0, g).narrow(0, r0, n);
            if (packed_p) { /* the same int32 sums on oneDNN's microkernel (AMX-INT8) */
                for (int64_t b = 0; b < blocks; ++b)
                    compressdit_microkernel::multiply(n, std::min(BLOCK, out_features - b * BLOCK), group,
                                                      out_features, a.data_ptr<int8_t>(),
                                                      packed_p + (g * blocks + b) * group * BLOCK,
                                                      sums.data_ptr<int32_t>() + b * BLOCK);
            } else {
                at::_int_mm_out(sums, a, codes.select(0, g).t());
            }
        }
        if (packed_p) compressdit_microkernel::release();
        compressdit_dequantize_groups(acc.data_ptr<int32_t>(), w_scale.data_ptr<float>(), a_scale, per_token, bias_p,
                                      groups, n, out_features, out.data_ptr<float>() + r0 * out_features, 1);
    };
    on_team(rows, threads, "int8_group_linear", block);
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(compressdit_native, m) {
    m.def("int8_linear(Tensor x, Tensor? smooth, Tensor codes_t, Tensor w_scale, Tensor? bias, bool per_token, "
          "int threads, Tensor? codes, Tensor? scales, int activation=0, Tensor? packed=None) "
          "-> (Tensor, Tensor, Tensor)");
    m.def("int8_brgemm_ready() -> bool", &int8_brgemm_ready);
    m.def("int8_pack(Tensor codes) -> Tensor");
    m.def("int8_group_linear(Tensor x, Tensor codes, Tensor w_scale, Tensor? bias, bool per_token, int threads, "
          "Tensor? packed=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(compressdit_native, CPU, m) {
    m.impl("int8_linear", &int8_linear);
    m.impl("int8_pack", &int8_pack);
    m.impl("int8_group_linear", &int8_group_linear);
}
