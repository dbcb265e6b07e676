/* Weight-only int4 x bf16 activations for few rows (compressdit/quant/cpu_native.py: int4_dot; the small-row path of
 * cpu-int4-weight in compressdit/quant/cpu_kernels.py) on CPUs with AVX512-BF16:
 * out[i, n] = sum_g s[g, n] * sum_{k in g} x[i, k] c[n, k] + z[g, n] * sum_{k in g} x[i, k] + bias[n]
 * with the layer's int codes c in [-8, 7], its fp32 group scales s and zero terms z (-zero point * s; 0 symmetric),
 * x rounded to bf16.
 *
 * Why: torch's packed int4 GEMM (_weight_int4pack_mm_for_cpu) decodes each weight with scalar-width work: on a
 * DiT-XL/2 1152 -> 1152 layer it runs no faster than the fp32 GEMV at one row and 1.06x at 16 (Zen 4). Here each
 * weight costs two vector instructions of decoding per 32 (a byte widened to a word, its nibble masked and or-ed into
 * a bf16 exponent in one vpternlogd) and is shared by the rows of a tile in vdpbf16ps (32 products an instruction).
 *
 * Decoding: the bf16 with bits 0x4300 | q (q = c + 8 in [0, 15]) is exactly 128 + q, so sum x (128 + q) = sum x c +
 * 136 sum x; the epilogue takes 136 s sum x back with the zero term: zz = z - 136 s per group and channel, and the
 * group sums of the rows' bf16 values are computed here first. The extra magnitude costs fp32 sums ~2^-16 of relative
 * precision, far below the activations' bf16 rounding (2^-9). vdpbf16ps flushes subnormal bf16 inputs to zero.
 *
 * Weight layout (cpu_kernels.pack_int4_dot): blocks of 16 output channels (cols_p = cols rounded up to 16, zero codes
 * beyond), each [k / 4] chunks of 32 bytes: byte j of chunk t holds, low nibble, q of channel j / 2 at input
 * 4t + j % 2 and, high nibble, at input 4t + 2 + j % 2: widened to 32 words, the low nibbles are vdpbf16ps' operand
 * for inputs (4t, 4t + 1) of the 16 channels (one pair per 32-bit lane), the high ones for (4t + 2, 4t + 3). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__GNUC__)
#define INT4_DOT 1
#include <immintrin.h>

#define DOT_ROWS 6
#define DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline

/* rows [0, R) x channels [c0, c0 + 16) of the product, all groups */
static DOT void dot_tile(const uint16_t *x, int64_t k, const float *xs, int64_t groups, int64_t group,
                         const uint8_t *wb, const float *s, const float *zz, int64_t cols_p, int64_t c0,
                         const float *bias, float *out, int64_t cols, const int rows) {
    __m512 sum[DOT_ROWS];
    for (int r = 0; r < rows; ++r) sum[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi16(0x000f), exponent = _mm512_set1_epi16(0x4300);
    const int64_t chunks = group / 4;
    for (int64_t g = 0; g < groups; ++g) {
        __m512 acc[DOT_ROWS][2]; /* two chains a row: vdpbf16ps' latency, not its throughput, bounds one row */
        for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t t = g * chunks; t < (g + 1) * chunks; ++t) {
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wb + t * 32)));
            const __m512i a = _mm512_ternarylogic_epi32(w, low, exponent, 0xea); /* (w & low) | exponent */
            const __m512i b = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), low, exponent, 0xea);
            for (int r = 0; r < rows; ++r) {
                int32_t p0, p1;
                memcpy(&p0, x + r * k + 4 * t, sizeof p0);
                memcpy(&p1, x + r * k + 4 * t + 2, sizeof p1);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_set1_epi32(p0), (__m512bh)a);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)_mm512_set1_epi32(p1), (__m512bh)b);
            }
        }
        const __m512 sv = _mm512_loadu_ps(s + g * cols_p + c0), zv = _mm512_loadu_ps(zz + g * cols_p + c0);
        for (int r = 0; r < rows; ++r) {
            sum[r] = _mm512_fmadd_ps(_mm512_add_ps(acc[r][0], acc[r][1]), sv, sum[r]);
            sum[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * groups + g]), zv, sum[r]);
        }
    }
    const int64_t left = cols - c0;
    const __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(out + r * cols + c0, m, _mm512_add_ps(sum[r], bv));
}

/* rows [0, rows) x channel blocks [b0, b1) */
static __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void dot_blocks(
    const uint16_t *x, const float *xs, const uint8_t *w, const float *s, const float *zz, const float *bias,
    int64_t rows, int64_t cols, int64_t k, int64_t group, int64_t b0, int64_t b1, float *out) {
    const int64_t groups = k / group, cols_p = (cols + 15) / 16 * 16, panel = (k / 4) * 32;
    for (int64_t b = b0; b < b1; ++b) {
        int64_t r = 0;
        for (; r + DOT_ROWS <= rows; r += DOT_ROWS)
            dot_tile(x + r * k, k, xs + r * groups, groups, group, w + b * panel, s, zz, cols_p, 16 * b, bias,
                     out + r * cols, cols, DOT_ROWS);
        switch (rows - r) {
#define LAST(n) case n: dot_tile(x + r * k, k, xs + r * groups, groups, group, w + b * panel, s, zz, cols_p, 16 * b, \
                                 bias, out + r * cols, cols, n); break;
            LAST(1) LAST(2) LAST(3) LAST(4) LAST(5)
#undef LAST
        default: break;
        }
    }
}

/* xs[i] = the sum of group i's bf16 values (n groups of `group` values, a multiple of 4), in fp32: 16 lanes, then
 * their sum (an order of its own, the same on any number of threads: computed before they split the work) */
static __attribute__((target("avx512f,avx512bw"))) void group_sums(const uint16_t *x, int64_t n, int64_t group,
                                                                    float *xs) {
    for (int64_t i = 0; i < n; ++i) {
        const uint16_t *g = x + i * group;
        __m512 acc = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= group; j += 16) { /* bf16 -> fp32: the bits shifted up */
            const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(g + j)));
            acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
        }
        float total = _mm512_reduce_add_ps(acc);
        for (; j < group; ++j) {
            const uint32_t u = (uint32_t)g[j] << 16;
            float f;
            memcpy(&f, &u, sizeof f);
            total += f;
        }
        xs[i] = total;
    }
}
#endif

/* Whether compressdit_int4_dot runs here: built with AVX-512 (the vector ISA torch runs), on a CPU with AVX512-BF16;
 * asked of the CPU once */
int compressdit_int4_dot_ready(void) {
#ifdef INT4_DOT
    static int ready = -1; /* a race writes the same value */
    if (ready < 0) {
        __builtin_cpu_init();
        ready = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
    }
    return ready;
#else
    return 0;
#endif
}

/* out [rows, cols] fp32 from bf16 rows x [rows, k] (k and group multiples of 4, group dividing k), the weight packed
 * as above (w), s and zz fp32 [k / group, cols_p], bias NULL or [cols]. Channel blocks split over `threads` OpenMP
 * threads (every output computed alone: the same numbers on any number of threads). Returns 1 where not
 * compressdit_int4_dot_ready or out of memory. */
int compressdit_int4_dot(const uint16_t *x, const uint8_t *w, const float *s, const float *zz, const float *bias,
                         int64_t rows, int64_t cols, int64_t k, int64_t group, float *out, int32_t threads) {
#ifdef INT4_DOT
    if (!compressdit_int4_dot_ready()) return 1;
    const int64_t groups = k / group, blocks = (cols + 15) / 16;
    float *xs = (float *)malloc(sizeof(float) * (size_t)(rows * groups > 0 ? rows * groups : 1));
    if (!xs) return 1;
    group_sums(x, rows * groups, group, xs);
    if (threads <= 1 || blocks < 2) {
        dot_blocks(x, xs, w, s, zz, bias, rows, cols, k, group, 0, blocks, out);
    } else {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t b = 0; b < blocks; ++b) dot_blocks(x, xs, w, s, zz, bias, rows, cols, k, group, b, b + 1, out);
    }
    free(xs);
    return 0;
#else
    (void)x; (void)w; (void)s; (void)zz; (void)bias; (void)rows; (void)cols; (void)k; (void)group; (void)out;
    (void)threads;
    return 1;
#endif
}
