/* A whole integer-groups CPU linear in one call (compressdit/quant/cpu_kernels.py: int_groups_linear_cpu, the
 * cpu-int-groups kernel of NVFP4, MXFP4, W4A4 and SVDQuant layers): the activations' balancing division (and NVFP4's
 * tensor scale from it), their codes on the format's grid (float_rows.c), SVDQuant's down product (float_rows.c, as
 * the Python path's cpu_native.times_rows) and the integer GEMM with the branch's up product in its blocks
 * (group_gemm.c). The Python path's calls in the same order with the same arguments: the same numbers, bit for bit.
 *
 * Why: from Python those were three ctypes calls, a dispatcher call, four allocations and their checks, ~20 us a
 * layer (a zoo model's 128 -> 128 layer takes ~120 us in fp32 at 256 rows); here one dispatcher call. */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

extern "C" {
float compressdit_divide_rows(const float *x, const float *smooth, const float *inv, int64_t rows, int64_t cols,
                              float *out, float top, int32_t threads);
float compressdit_grid_tensor_scale(const float *x, const float *smooth, int64_t rows, int64_t cols, float top,
                                    int32_t threads);
void compressdit_grid_codes_rows(const float *x, const float *smooth, const float *inv, int64_t rows, int64_t cols,
                                 int64_t group, int64_t repeat, int32_t rule, float top, int32_t mantissa,
                                 int32_t min_exp, float t, float mult, float *balanced, uint8_t *codes, float *scales,
                                 int32_t threads);
void compressdit_times_rows(const float *b, int64_t rows, int64_t cols, const float *d, int64_t rank, float *h,
                            int32_t threads);
int compressdit_group_gemm(const uint8_t *a, const float *a_scale, const int8_t *w, const int32_t *corr,
                           const float *w_scale, const float *h, int64_t rank, const float *up, const float *bias,
                           int64_t rows, int64_t cols, int64_t k, int64_t group, int64_t flush, int64_t planes,
                           int32_t row_scales, const int8_t *table, int32_t row_major, int32_t offset, float *out,
                           int32_t threads);
}

namespace {

/* a contiguous fp32 CPU tensor of n elements, or none */
const float *fp32_of(const c10::optional<at::Tensor> &t, int64_t n, const char *what) {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, "groups_linear: ", what,
                " must be a contiguous fp32 tensor of ", n, " elements");
    return t->data_ptr<float>();
}

/* (codes(x / smooth) @ W^T) * scales + bias (+ (x / smooth) @ down_t @ up_t), returned with the activation codes and
 * scales [rows, cols / grid_group * repeat] (passed back in as codes_in / scales_in by the next layer reading the same
 * unbalanced x: then only multiplied). x: contiguous fp32 [..., cols], its leading dimensions the rows (the output
 * [..., out_features]: no reshape on either side, ~3 us each from Python); smooth / inv: the balancing divisor and its
 * reciprocal, or none; the grid (grid_group = group * repeat, rule, top, mantissa, min_exp, mult) as
 * cpu_native.grid_codes takes it; packed / corr / w_scale / table / flush / planes as cpu_native.group_gemm; down_t
 * fp32 [cols, r] and up_t [r, padded out] or none; pass_threads: the threads of the division and codes passes,
 * gemm_threads: the GEMM's (each pass splits its rows or blocks as the Python path's do). */
std::tuple<at::Tensor, at::Tensor, at::Tensor> groups_linear(
    const at::Tensor &x, const c10::optional<at::Tensor> &smooth, const c10::optional<at::Tensor> &inv,
    const c10::optional<at::Tensor> &codes_in, const c10::optional<at::Tensor> &scales_in, const at::Tensor &packed,
    const c10::optional<at::Tensor> &corr, const at::Tensor &w_scale, const c10::optional<at::Tensor> &bias,
    const c10::optional<at::Tensor> &down_t, const c10::optional<at::Tensor> &up_t,
    const c10::optional<at::Tensor> &table, int64_t grid_group, int64_t repeat, int64_t rule, double top,
    int64_t mantissa, int64_t min_exp, double mult, int64_t flush, int64_t planes, int64_t out_features,
    int64_t pass_threads, int64_t gemm_threads) {
    TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() > 0,
                "groups_linear: x must be a non-empty contiguous fp32 tensor");
    const int64_t cols = x.size(-1), rows = x.numel() / cols; /* the rows of x's leading dimensions */
    TORCH_CHECK(grid_group > 0 && repeat > 0 && grid_group % repeat == 0 && cols % grid_group == 0,
                "groups_linear: the grid's groups must divide the input's ", cols, " columns");
    TORCH_CHECK(smooth.has_value() == inv.has_value(), "groups_linear: give both smooth and inv, or neither");
    TORCH_CHECK(codes_in.has_value() == scales_in.has_value() && !(codes_in.has_value() && smooth.has_value()),
                "groups_linear: codes made earlier come with their scales, and only for unbalanced rows");
    TORCH_CHECK(down_t.has_value() == up_t.has_value(), "groups_linear: give both branch factors, or neither");
    const float *sm = fp32_of(smooth, cols, "smooth"), *iv = fp32_of(inv, cols, "inv");
    const int64_t scale_cols = cols / grid_group * repeat;
    at::Tensor codes, scales, balanced;
    const int32_t threads = static_cast<int32_t>(pass_threads);
    if (codes_in.has_value()) {
        codes = *codes_in;
        scales = *scales_in;
        TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(0) == rows &&
                        codes.size(1) == cols && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                        scales.size(0) == rows && scales.size(1) == scale_cols,
                    "groups_linear: codes_in / scales_in do not match x and the grid");
    } else { /* cpu_native.grid_codes */
        const float *src = x.data_ptr<float>();
        if (sm) balanced = at::empty_like(x);
        float t = 1.0f;
        if (rule == 2 && sm) { /* NVFP4's tensor scale reads every balanced row: divided first, maxima found then */
            t = compressdit_divide_rows(src, sm, iv, rows, cols, balanced.data_ptr<float>(), static_cast<float>(top),
                                        threads);
            src = balanced.data_ptr<float>();
            sm = iv = nullptr;
        } else if (rule == 2) {
            t = compressdit_grid_tensor_scale(src, nullptr, rows, cols, static_cast<float>(top), threads);
        }
        codes = at::empty({rows, cols}, x.options().dtype(at::kByte));
        scales = at::empty({rows, scale_cols}, x.options());
        compressdit_grid_codes_rows(src, sm, iv, rows, cols, grid_group, repeat, static_cast<int32_t>(rule),
                                    static_cast<float>(top), static_cast<int32_t>(mantissa),
                                    static_cast<int32_t>(min_exp), t, static_cast<float>(mult),
                                    balanced.defined() ? balanced.data_ptr<float>() : nullptr,
                                    codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), threads);
    }
    at::Tensor hidden;
    int64_t rank = 0;
    if (down_t.has_value()) {
        TORCH_CHECK(down_t->dim() == 2 && down_t->size(0) == cols && down_t->scalar_type() == at::kFloat &&
                        down_t->is_contiguous() && up_t->dim() == 2 && up_t->size(0) == down_t->size(1) &&
                        up_t->scalar_type() == at::kFloat && up_t->is_contiguous(),
                    "groups_linear: down_t must be contiguous fp32 [in, r] and up_t [r, out]");
        rank = down_t->size(1);
        hidden = at::empty({rows, rank}, x.options());
        compressdit_times_rows((balanced.defined() ? balanced : x).data_ptr<float>(), rows, cols,
                               down_t->data_ptr<float>(), rank, hidden.data_ptr<float>(), threads);
    }
    TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous(),
                "groups_linear: w_scale must be contiguous fp32");
    const float *ws = w_scale.data_ptr<float>();
    const int32_t row_major = packed.dim() != 2 ? 0 : packed.scalar_type() == at::kChar ? 1 : table.has_value() ? 3 : 2;
    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1); /* x's leading shape, out_features */
    out_shape.push_back(out_features);
    at::Tensor out = at::empty(out_shape, x.options());
    const int failed = compressdit_group_gemm(
        codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), static_cast<const int8_t *>(packed.data_ptr()),
        corr.has_value() ? corr->data_ptr<int32_t>() : nullptr, ws,
        hidden.defined() ? hidden.data_ptr<float>() : nullptr, rank,
        up_t.has_value() ? up_t->data_ptr<float>() : nullptr, fp32_of(bias, out_features, "bias"), rows, out_features,
        cols, cols / scale_cols, flush, planes, 0,
        table.has_value() ? static_cast<const int8_t *>(table->data_ptr()) : nullptr, row_major,
        static_cast<int32_t>(top * mult), out.data_ptr<float>(), static_cast<int32_t>(gemm_threads));
    TORCH_CHECK(!failed, "groups_linear: group_gemm has no path on this CPU for ", planes, " weight plane(s)",
                table.has_value() ? " of nibbles" : row_major ? " stored row-major" : "", " (see group_gemm_isa)");
    return {out, codes, scales};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(compressdit_native, m) {
    m.def("groups_linear(Tensor x, Tensor? smooth, Tensor? inv, Tensor? codes_in, Tensor? scales_in, Tensor packed, "
          "Tensor? corr, Tensor w_scale, Tensor? bias, Tensor? down_t, Tensor? up_t, Tensor? table, int grid_group, "
          "int repeat, int rule, float top, int mantissa, int min_exp, float mult, int flush, int planes, "
          "int out_features, int pass_threads, int gemm_threads) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(compressdit_native, CPU, m) { m.impl("groups_linear", &groups_linear); }
