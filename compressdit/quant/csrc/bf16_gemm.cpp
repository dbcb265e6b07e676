/* bf16 GEMMs on oneDNN's BRGeMM microkernel (torch's at::native::cpublas::brgemm; see
 * compressdit/quant/cpu_native.py: bf16_linear), for CPUs with AMX-BF16.
 *
 * Why: torch's bf16 linear on CPU goes through oneDNN's matmul primitive, ~20 us of fixed cost a call (primitive
 * lookup, the weight's reorder into AMX's layout, scratchpad), while a zoo layer's GEMM (256 x 128 x 128) is ~3 us of
 * AMX work; and from Python the fp32 -> bf16 cast of the activations and the bf16 -> fp32 cast of the output are two
 * more passes. Here the weight is packed once (cpublas::pack: AMX's VNNI layout, 64 columns a block), and a team of
 * threads each takes its rows (or, for few rows, its column blocks): its activations rounded to bf16 (half to even,
 * float_rows.c's cast) a chunk of rows at a time, one microkernel call per chunk and column block accumulating in
 * fp32 straight into the fp32 output, and the epilogue (row and column scales, bias) on that block while in cache.
 * The output stays fp32: the GEMM's sums are not rounded to bf16.
 *
 * SVDQuant's low-rank branch (a layer's 16-bit up [out, r] @ down [r, in] beside its quantized weight, on the balanced
 * but unquantized activations) runs in the same call, as Nunchaku fuses it on GPUs: each chunk's balanced rows times
 * the packed down factor give the chunk's r-wide hidden rows (fp32 sums), which extend its quantized rows: one product
 * of [t(x) | h] with the weight packed as [W | up]. Two torch linears and the output's extra pass a call otherwise,
 * ~40% of a zoo step. The branch carries the weight's largest directions (half the output's norm), so its up product
 * is a "bf16x3" one: h and U each in two bf16 terms (hi = bf16(v), lo = bf16(v - hi)), hi * HI + lo * HI + hi * LO
 * summed (~16 significant bits); the down product's bf16 rounding averages over the input's width. A layer's error
 * against its exact product then stays near the main product's own bf16 rounding (+17% on a synthetic SVDQuant
 * layer, +33% with a plain bf16 up product), for ~2 us a call. */

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "microkernel.h"
#include "team.h"

extern "C" {
void compressdit_float_to_bf16(const float *x, int64_t n, uint16_t *y, int32_t threads);
float compressdit_grid_tensor_scale(const float *x, const float *smooth, int64_t rows, int64_t cols, float top,
                                    int32_t threads);
void compressdit_divide_rows(const float *x, const float *smooth, const float *inv, int64_t rows, int64_t cols,
                             float *out, int32_t threads);
void compressdit_split_rows_bf16(const float *x, int64_t rows, int64_t cols, uint16_t *out, int64_t ld,
                                 int32_t threads);
void compressdit_grid_rows_bf16(const float *x, int64_t rows, int64_t cols, int64_t group, int32_t rule, float top,
                                int32_t mantissa, int32_t min_exp, float t, float *work, uint16_t *out, int64_t ld,
                                int32_t threads);
void compressdit_hadamard_rows(const float *x, const float *smooth, const int8_t *signs, int64_t rows, int64_t cols,
                               int64_t group, int32_t rule, float top, int32_t mantissa, int32_t min_exp,
                               int64_t repeat, float mult, float *out, uint8_t *codes, float *scales, int32_t threads);
}

namespace {

using compressdit_team::on_team;
using compressdit_microkernel::BLOCK;
using compressdit_microkernel::fp32_vector;

constexpr int64_t CHUNK_BYTES = 1 << 19; /* a chunk of bf16 activation rows: at most this (in L2), 32..256 rows */

bool bf16_brgemm_ready() { return compressdit_microkernel::ready<at::BFloat16>(); }

/* W [out, in] (fp32 or bf16; in even) -> bf16 [blocks, in, 64]: each block of 64 output channels of W^T in AMX's
 * VNNI layout (a last partial block padded with zeros). */
at::Tensor bf16_pack(const at::Tensor &weight) {
    TORCH_CHECK(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0 && weight.size(1) % 2 == 0,
                "bf16_pack: weight must be a non-empty [out, in] matrix with an even in");
    TORCH_CHECK(bf16_brgemm_ready(), "bf16_pack: this CPU has no bf16 BRGeMM microkernel (AMX-BF16)");
    return compressdit_microkernel::pack<at::BFloat16>(weight, at::kBFloat16);
}

/* c[r, j] = c[r, j] * rows[r] * cols[j] + bias[j] over a block (rows x width, leading dimension ld) of the output
 * while it is in cache; absent vectors skipped (the multiplications in that order, as bf16_scale in float_rows.c). */
void epilogue(float *__restrict c, int64_t rows, int64_t width, int64_t ld, const float *__restrict row_scale,
              const float *__restrict col_scale, const float *__restrict bias) {
    if (!row_scale && !col_scale && !bias) return;
    for (int64_t r = 0; r < rows; ++r) {
        float *__restrict o = c + r * ld;
        const float rs = row_scale ? row_scale[r] : 1.0f;
        if (row_scale || col_scale) {
            if (col_scale) {
#pragma omp simd
                for (int64_t j = 0; j < width; ++j) o[j] = o[j] * rs * col_scale[j];
            } else {
#pragma omp simd
                for (int64_t j = 0; j < width; ++j) o[j] = o[j] * rs;
            }
        }
        if (bias) {
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) o[j] = o[j] + bias[j];
        }
    }
}

/* n elements of T, uninitialized (a vector's zeroing is a pass over the chunk a call) */
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
    return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

/* What a block of fp32 rows goes through before it is rounded to bf16 (float_rows.c's passes, bit for bit, on the
 * block's thread): none; the balancing division (`smooth` without `signs`: x / smooth, as torch divides); the dynamic
 * grid quantization of compressdit_fake_quantize_grid (rules 0 and 1: scales from each group alone; rule 2, NVFP4,
 * with the tensor scale t of the whole (balanced) input, computed before the blocks: any block of rows then gives the
 * whole pass's numbers), after the division where there is one; or the balancing division and randomized Hadamard of
 * compressdit_hadamard_rows, with the grid quantization (rules 0 and 1) where group > 0. */
struct RowTransform {
    const float *smooth = nullptr;
    const int8_t *signs = nullptr;
    int64_t group = 0;
    int32_t rule = 0;
    float top = 0.0f;
    int32_t mantissa = 0, min_exp = 0;
    float t = 1.0f;

    bool any() const { return signs || group || smooth; }
    bool divides() const { return smooth && !signs; }
};

/* out[r, n] = (sum_k bf16(t(x)[r, k]) * W[n, k] + (h U^T)[r, n]) * row_scale[r] * col_scale[n] + bias[n], fp32: x
 * [rows, in] contiguous fp32 (transformed by t, then rounded to bf16 here) or bf16 (no transform), packed from
 * bf16_pack of W [out, in] (or, with SVDQuant's branch, of [W | U_hi | U_hi | U_lo], U [out, r] split in two bf16
 * terms), scales and bias optional fp32 vectors; t: smooth / signs / group ... as RowTransform says (none by default);
 * the branch (fp32 x, no rotation, no scales): down = bf16_pack of D [r, in], h = bf16(b(x)) @ bf16(D)^T (fp32
 * sums) on the balanced rows b(x) = x / smooth (x without smooth), its product with U a bf16x3 one (see above);
 * without down, h = 0 (a layer's W alone from its packing with U). */
at::Tensor bf16_linear(const at::Tensor &x, const at::Tensor &packed, int64_t out_features,
                       const c10::optional<at::Tensor> &bias, const c10::optional<at::Tensor> &row_scale,
                       const c10::optional<at::Tensor> &col_scale, int64_t threads,
                       const c10::optional<at::Tensor> &smooth, const c10::optional<at::Tensor> &signs, int64_t group,
                       int64_t rule, double top, int64_t mantissa, int64_t min_exp,
                       const c10::optional<at::Tensor> &down) {
    if (threads <= 0) threads = at::get_num_threads(); /* 0: torch's count when the op runs (what a traced call asks) */
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "bf16_linear: x must be a contiguous fp32 or bf16 matrix");
    const int64_t rows = x.size(0), in_features = x.size(1);
    const int64_t blocks = (out_features + BLOCK - 1) / BLOCK;
    /* the branch's columns beyond x's in [W | U_hi | U_hi | U_lo]: 3 rank (none for a plain W) */
    const int64_t extra = packed.dim() == 3 ? packed.size(1) - in_features : -1, rank = extra / 3;
    const int64_t depth = in_features + extra;
    TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                    packed.size(0) == blocks && extra >= 0 && extra % 3 == 0 && (extra > 0 || !down.has_value()) &&
                    packed.size(2) == BLOCK,
                "bf16_linear: packed must be bf16_pack's [", blocks, ", ", in_features,
                down.has_value() ? " + 3 rank" : " (+ 3 rank)", ", ", BLOCK, "] for x");
    const float *bias_p = fp32_vector(bias, out_features, "bf16_linear: bias");
    const float *rows_p = fp32_vector(row_scale, rows, "bf16_linear: row_scale");
    const float *cols_p = fp32_vector(col_scale, out_features, "bf16_linear: col_scale");
    RowTransform transform;
    transform.smooth = fp32_vector(smooth, in_features, "bf16_linear: smooth");
    TORCH_CHECK(!signs.has_value() || (signs->scalar_type() == at::kChar && signs->is_contiguous() &&
                                       signs->numel() == in_features),
                "bf16_linear: signs must be a contiguous int8 tensor of ", in_features, " elements");
    const int64_t top_rule = signs.has_value() ? 1 : 2;
    TORCH_CHECK(group == 0 || (group > 0 && in_features % group == 0 && rule >= 0 && rule <= top_rule),
                "bf16_linear: a grid needs a group dividing ", in_features, " and rule 0 or 1 (2 without a rotation)");
    transform.signs = signs.has_value() ? signs->data_ptr<int8_t>() : nullptr;
    transform.group = group;
    transform.rule = (int32_t)rule;
    transform.top = (float)top;
    transform.mantissa = (int32_t)mantissa;
    transform.min_exp = (int32_t)min_exp;
    const at::BFloat16 *down_p = nullptr;
    if (down.has_value()) {
        TORCH_CHECK(down->dim() == 3 && down->scalar_type() == at::kBFloat16 && down->is_contiguous() &&
                        down->size(0) == (rank + BLOCK - 1) / BLOCK && down->size(1) == in_features &&
                        down->size(2) == BLOCK,
                    "bf16_linear: down must be bf16_pack's [", (rank + BLOCK - 1) / BLOCK, ", ", in_features, ", ",
                    BLOCK, "] of the [rank, in] factor");
        TORCH_CHECK(!transform.signs, "bf16_linear: the low-rank branch reads unrotated rows");
        TORCH_CHECK(!row_scale.has_value() && !col_scale.has_value(),
                    "bf16_linear: the low-rank branch's sums take no row or channel scales");
        down_p = down->data_ptr<at::BFloat16>();
    }
    at::Tensor out = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
    if (rows == 0) return out;
    const bool fp32_in = x.scalar_type() == at::kFloat;
    TORCH_CHECK(fp32_in || (!transform.any() && !down_p), "bf16_linear: a transform or branch takes fp32 rows");
    if (group && rule == 2) /* NVFP4's tensor scale needs every (balanced) row first */
        transform.t = compressdit_grid_tensor_scale(x.data_ptr<float>(), transform.divides() ? transform.smooth : nullptr,
                                                    rows, in_features, transform.top, (int32_t)threads);
    std::vector<float> inverse(transform.divides() ? in_features : 0); /* 1 / smooth, for the division pass */
    for (int64_t j = 0; j < (int64_t)inverse.size(); ++j) inverse[j] = 1.0f / transform.smooth[j];
    const int64_t chunk_rows = std::clamp<int64_t>(CHUNK_BYTES / (2 * depth) / 32 * 32, 32, 256);
    const at::BFloat16 *weights = packed.data_ptr<at::BFloat16>();
    float *out_p = out.data_ptr<float>();
    /* rows over the team where each thread gets a few chunks of them, else column blocks (adaLN's 16-row layers) */
    const bool by_rows = rows >= 2 * 32 * threads || blocks < threads;
    on_team(by_rows ? rows : blocks, threads, "bf16_linear", [&](int64_t u0, int64_t u1) {
        const int64_t r_begin = by_rows ? u0 : 0, r_end = by_rows ? u1 : rows;
        const int64_t b_begin = by_rows ? 0 : u0, b_end = by_rows ? blocks : u1;
        const int64_t chunk = std::min(chunk_rows, r_end - r_begin);
        /* the chunk's scratch, uninitialized: bf16 rows [t(x) | h]; fp32 rows of the division / rotation; the
         * balanced rows in bf16 and the hidden rows of the branch */
        const auto buffer = scratch<uint16_t>(fp32_in || extra ? chunk * depth : 0);
        const auto work = scratch<float>(transform.any() ? chunk * in_features : 0);
        const auto balanced = scratch<uint16_t>(down_p ? chunk * in_features : 0);
        const auto hidden = scratch<float>(down_p ? chunk * rank : 0);
        if (extra && !down_p) /* U's columns without the branch: h = 0 */
            for (int64_t r = 0; r < chunk; ++r) std::memset(buffer.get() + r * depth + in_features, 0, 2 * extra);
        for (int64_t r0 = r_begin; r0 < r_end; r0 += chunk_rows) {
            const int64_t n_rows = std::min(chunk_rows, r_end - r0);
            const at::BFloat16 *a;
            if (fp32_in) {
                const float *rows_in = x.data_ptr<float>() + r0 * in_features;
                if (transform.divides()) { /* the balanced rows */
                    compressdit_divide_rows(rows_in, transform.smooth, inverse.data(), n_rows, in_features, work.get(),
                                            1);
                    rows_in = work.get();
                }
                if (down_p) { /* the branch's hidden rows h = bf16(b(x)) @ bf16(D)^T, fp32 sums; then as
                               * [h_hi | h_lo | h_hi] beside the rows, against [U_hi | U_hi | U_lo] */
                    compressdit_float_to_bf16(rows_in, n_rows * in_features, balanced.get(), 1);
                    const auto *b_rows = reinterpret_cast<const at::BFloat16 *>(balanced.get());
                    for (int64_t j0 = 0; j0 < rank; j0 += BLOCK)
                        compressdit_microkernel::multiply(n_rows, std::min(BLOCK, rank - j0), in_features, rank,
                                                          b_rows, down_p + j0 * in_features, hidden.get() + j0);
                    compressdit_split_rows_bf16(hidden.get(), n_rows, rank, buffer.get() + in_features, depth, 1);
                }
                if (transform.signs) { /* rotated (and quantized) rows, then rounded */
                    compressdit_hadamard_rows(rows_in, transform.smooth, transform.signs, n_rows, in_features,
                                              transform.group, transform.rule, transform.top, transform.mantissa,
                                              transform.min_exp, 1, 1.0f, work.get(), nullptr, nullptr, 1);
                    compressdit_grid_rows_bf16(work.get(), n_rows, in_features, 0, 0, 0.0f, 0, 0, 1.0f, nullptr,
                                               buffer.get(), depth, 1);
                } else { /* quantized (where there is a grid) and rounded in one pass */
                    compressdit_grid_rows_bf16(rows_in, n_rows, in_features, transform.group, transform.rule,
                                               transform.top, transform.mantissa, transform.min_exp, transform.t,
                                               work.get(), buffer.get(), depth, 1);
                }
                a = reinterpret_cast<const at::BFloat16 *>(buffer.get());
            } else if (rank) { /* bf16 rows beside the zeros of U's columns */
                for (int64_t r = 0; r < n_rows; ++r)
                    std::memcpy(buffer.get() + r * depth, x.data_ptr<at::BFloat16>() + (r0 + r) * in_features,
                                2 * in_features);
                a = reinterpret_cast<const at::BFloat16 *>(buffer.get());
            } else {
                a = x.data_ptr<at::BFloat16>() + r0 * in_features;
            }
            for (int64_t b = b_begin; b < b_end; ++b) {
                const int64_t n0 = b * BLOCK, width = std::min(BLOCK, out_features - n0);
                float *c = out_p + r0 * out_features + n0;
                compressdit_microkernel::multiply(n_rows, width, depth, out_features, a, weights + b * depth * BLOCK, c);
            }
            {
                const int64_t n0 = b_begin * BLOCK, width = std::min(b_end * BLOCK, out_features) - n0;
                epilogue(out_p + r0 * out_features + n0, n_rows, width, out_features, rows_p ? rows_p + r0 : nullptr,
                         cols_p ? cols_p + n0 : nullptr, bias_p ? bias_p + n0 : nullptr);
            }
        }
        compressdit_microkernel::release();
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(compressdit_native, m) {
    m.def("bf16_brgemm_ready() -> bool", &bf16_brgemm_ready);
    m.def("bf16_pack(Tensor weight) -> Tensor");
    m.def("bf16_linear(Tensor x, Tensor packed, int out_features, Tensor? bias, Tensor? row_scale, "
          "Tensor? col_scale, int threads, Tensor? smooth=None, Tensor? signs=None, int group=0, int rule=0, "
          "float top=0., int mantissa=0, int min_exp=0, Tensor? down=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(compressdit_native, CPU, m) {
    m.impl("bf16_pack", &bf16_pack);
    m.impl("bf16_linear", &bf16_linear);
}
