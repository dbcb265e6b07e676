/* Fused CPU passes around compressdit's int8 x int8 GEMMs (see compressdit/quant/cpu_native.py).
 *
 * PyTorch eager runs dynamic activation quantization as ~7 separate passes (abs, amax, clamp, div, div, round,
 * cast) and the dequantization epilogue as 3 more, each a few microseconds of dispatch on the zoo models'
 * 256 x 128 activations: more than the int8 GEMM itself. These loops do the same arithmetic in 2 + 1 passes,
 * bit for bit: s = max(amax |x|, 1e-8f) / 127 (per row or over the tensor), q = round-half-even(x / s), the
 * float divisions in IEEE single precision as torch does them (built without -ffast-math, with
 * -ffp-contract=off). A channel-balancing division x / smooth (the layer's input transform) can be fused in,
 * as the same IEEE division torch does first. Plain C, no torch headers.
 *
 * Threads: every pass is independent per row (a per-tensor amax is an integer max, the same in any order), so
 * the rows are split over `threads` OpenMP threads in contiguous static chunks, the first chunk on the calling
 * thread: the split torch's own at::parallel_for makes, on the same OpenMP runtime (cpu_native.py compiles with
 * -fopenmp only where torch's libgomp is already loaded), so a row stays on the core that touches it next.
 * threads <= 1 (a plain loop: FOR_ROWS), or a build without OpenMP: one thread, the same numbers. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rows.h"

#ifdef _OPENMP
#include <omp.h>
static inline int thread_index(void) { return omp_get_thread_num(); }
#else
static inline int thread_index(void) { return 0; }
#endif

static inline float bits_to_float(uint32_t u) {
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* round half to even for |v| < 2^22 (|x / s| <= 127 here), in the default rounding mode: as torch.round */
static inline float round_even(float v) {
    return (v + 12582912.0f) - 12582912.0f;
}

/* |x / scale| <= 127 and scale >= 1e-8 / 127: the quotient is finite; a subnormal one rounds to code 0 either way */
static void codes_row(const float *restrict x, int64_t n, float scale, int32_t offset, int8_t *restrict q) {
    const float inv = 1.0f / scale;
    for (int64_t j = 0; j < n; ++j)
        q[j] = (int8_t)((int32_t)round_even(div_rn(x[j], scale, inv)) + offset);
}

static float scale_of(uint32_t bits) {
    float m = bits_to_float(bits);
    return (m > 1e-8f || m != m ? m : 1e-8f) / 127.0f; /* clamp_min(1e-8) keeps NaN, as this does */
}

/* One row of x (divided by smooth first when inv is not NULL, into dst) -> max |row| as bits; *source set to the
 * row the codes are made from (x's row, or dst). */
static uint32_t row_absmax(const float *row, const float *smooth, const float *inv, int64_t cols, float *dst,
                           const float **source) {
    if (!inv) {
        *source = row;
        return absmax_bits(row, cols);
    }
    *source = dst;
    return divide_row(row, smooth, inv, cols, dst);
}

/* x [rows, cols] (divided by smooth [cols] first unless NULL) -> q [rows, cols] int8 codes (+ offset: 128 gives
 * oneDNN's uint8 codes), scale [rows] (per token) or [1]; rows split over `threads`. The division goes into a
 * scratch row per thread per token (cache-line apart: no false sharing), into a tensor-sized buffer per tensor.
 * Returns 0, or -1 when out of memory. */
int compressdit_quantize_int8(const float *x, const float *smooth, int64_t rows, int64_t cols, int32_t per_token,
                              int32_t offset, int8_t *q, float *scale, int32_t threads) {
    float *y = NULL, *inv = NULL;
    const int64_t stride = (cols + 31) / 16 * 16; /* floats: a 64-byte multiple, one line of padding */
    if (threads < 1) threads = 1;
    if (smooth) {
        y = malloc(sizeof(float) * (size_t)(per_token ? threads * stride : rows * cols));
        inv = malloc(sizeof(float) * (size_t)cols);
        if (!y || !inv) {
            free(y);
            free(inv);
            return -1;
        }
        for (int64_t j = 0; j < cols; ++j) inv[j] = 1.0f / smooth[j];
    }
    if (per_token) {
        FOR_ROWS(i, rows, {
            const float *row; /* one thread: scratch row 0, whatever team the caller runs in */
            float *scratch = y ? y + (threads > 1 ? thread_index() : 0) * stride : NULL;
            uint32_t m = row_absmax(x + i * cols, smooth, inv, cols, scratch, &row);
            scale[i] = scale_of(m);
            codes_row(row, cols, scale[i], offset, q + i * cols);
        });
    } else {
        uint32_t m = 0;
        FOR_ROWS_MAX(m, i, rows, {
            const float *row;
            uint32_t r = row_absmax(x + i * cols, smooth, inv, cols, y ? y + i * cols : NULL, &row);
            m = r > m ? r : m;
        });
        const float *all = y ? y : x;
        const float s = scale[0] = scale_of(m);
        FOR_ROWS(i, rows, {
            codes_row(all + i * cols, cols, s, offset, q + i * cols);
        });
    }
    free(y);
    free(inv);
    return 0;
}

/* out[i, j] = acc[i, j] * w_scale[j] * a_scale[i or 0] (+ bias[j]): the int32 GEMM's dequantization; out may be
 * acc's own memory (each element is read before it is written). */
void compressdit_dequantize_int32(const int32_t *acc, const float *restrict w_scale, const float *restrict a_scale,
                                  int32_t per_token, const float *restrict bias, int64_t rows, int64_t cols,
                                  float *out, int32_t threads) {
    FOR_ROWS(i, rows, {
        const float a = a_scale[per_token ? i : 0];
        const int32_t *r = acc + i * cols;
        float *o = out + i * cols;
        if (bias)
            for (int64_t j = 0; j < cols; ++j) o[j] = (float)r[j] * w_scale[j] * a + bias[j];
        else
            for (int64_t j = 0; j < cols; ++j) o[j] = (float)r[j] * w_scale[j] * a;
    });
}

/* out[i, j] = acc[i, j] * a_scale[i or 0] (+ bias[j]), in place allowed: for GEMMs that applied w_scale. */
void compressdit_scale_rows(const float *acc, const float *a_scale, int32_t per_token, const float *bias,
                            int64_t rows, int64_t cols, float *out, int32_t threads) {
    FOR_ROWS(i, rows, {
        const float a = a_scale[per_token ? i : 0];
        const float *r = acc + i * cols;
        float *o = out + i * cols;
        if (bias)
            for (int64_t j = 0; j < cols; ++j) o[j] = r[j] * a + bias[j];
        else
            for (int64_t j = 0; j < cols; ++j) o[j] = r[j] * a;
    });
}

/* Fake-quantized int8 activations: out = round(x / s) * s with compressdit_quantize_int8's codes and scales (the
 * codes are exact in fp32, so this is the PyTorch expression's value bit for bit). Returns 0, or -1 when out of
 * memory. */
int compressdit_fake_quantize_int8(const float *x, int64_t rows, int64_t cols, int32_t per_token, float *out,
                                   int32_t threads) {
    int8_t *q = malloc((size_t)(rows * cols));
    float *scale = malloc(sizeof(float) * (size_t)(per_token ? rows : 1));
    int status = q && scale ? compressdit_quantize_int8(x, NULL, rows, cols, per_token, 0, q, scale, threads) : -1;
    if (status == 0) {
        FOR_ROWS(i, rows, {
            const float s = scale[per_token ? i : 0];
            for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = (float)q[i * cols + j] * s;
        });
    }
    free(q);
    free(scale);
    return status;
}

/* compressdit_quantize_int8's codes and scales (no balancing, no offset) laid out per column group: x [rows, cols]
 * -> q [cols / group, rows, group], each group's activation codes contiguous for its own GEMM. */
void compressdit_quantize_int8_groups(const float *x, int64_t rows, int64_t cols, int64_t group, int32_t per_token,
                                      int8_t *q, float *scale, int32_t threads) {
    const int64_t groups = cols / group;
    if (!per_token) {
        uint32_t m = 0;
        FOR_ROWS_MAX(m, i, rows, {
            uint32_t r = absmax_bits(x + i * cols, cols);
            m = r > m ? r : m;
        });
        scale[0] = scale_of(m);
    }
    FOR_ROWS(i, rows, {
        const float *row = x + i * cols;
        const float s = per_token ? (scale[i] = scale_of(absmax_bits(row, cols))) : scale[0];
        for (int64_t g = 0; g < groups; ++g)
            codes_row(row + g * group, group, s, 0, q + (g * rows + i) * group);
    });
}

/* out[i, j] = (sum over g of acc[g, i, j] * w_scale[g, j]) * a_scale[i or 0] (+ bias[j]), the groups added in
 * order: the per-group int32 GEMMs' epilogue (acc [groups, rows, cols], w_scale [groups, cols]). */
void compressdit_dequantize_groups(const int32_t *restrict acc, const float *restrict w_scale,
                                   const float *restrict a_scale, int32_t per_token, const float *restrict bias,
                                   int64_t groups, int64_t rows, int64_t cols, float *restrict out, int32_t threads) {
    FOR_ROWS(i, rows, {
        const float a = a_scale[per_token ? i : 0];
        float *o = out + i * cols;
        const int32_t *r = acc + i * cols;
        for (int64_t j = 0; j < cols; ++j) o[j] = (float)r[j] * w_scale[j];
        for (int64_t g = 1; g < groups; ++g) {
            const int32_t *rg = acc + (g * rows + i) * cols;
            const float *wg = w_scale + g * cols;
            for (int64_t j = 0; j < cols; ++j) o[j] = o[j] + (float)rg[j] * wg[j];
        }
        if (bias)
            for (int64_t j = 0; j < cols; ++j) o[j] = o[j] * a + bias[j];
        else
            for (int64_t j = 0; j < cols; ++j) o[j] = o[j] * a;
    });
}
