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
 * for inputs (4t, 4t + 1) of the 16 channels (one pair per 32-bit lane), the high ones for (4t + 2, 4t + 3).
 *
 * Or the layer's stored weight itself (row_major, what cpu-int4-weight passes: no packed copy kept, 0.5 byte a
 * weight in all): its offset nibbles [cols, k / 2], byte j of a channel's row holding q at input 2j (low nibble) and
 * 2j + 1 (high), with s and zz [cols, k / group] (each channel's contiguous). From 5 rows each block of 16 channels
 * is packed into the layout above when its turn comes, into a buffer of the thread's (k * 8 bytes, the block's scales
 * after it), and multiplied by the same tiles: the same numbers bit for bit. Packing: 16 channels' 4-byte groups (8
 * inputs) transposed so that lane c holds channel c's, a nibble swap within each 16-bit word (q0 q1 q2 q3 -> q0 q2
 * q1 q3: the byte pairs of a chunk), the low words chunk 2d, the high words chunk 2d + 1. Up to 4 rows, the channel
 * dot below (each channel's row read in place). DiT-XL/2 shapes, W4 g64, one thread, Zen 4, against the packed copy:
 * weights read from memory 1.0-1.4x its time at 1-4 rows, 1.15-1.35x at 16, 1.0-1.1x at 64; in cache 1.1-1.25x at 1
 * row (groups of 32: 1.3-1.45x), 1.45-2.2x at 2-4 (the group scales applied lane-wise: 3 vector operations a row and
 * chunk where the tiles take 2; at 4608 inputs 4 split rows leave L1), 1.15-1.2x at 16 (the transpose), ~1.05x at 64
 * and above. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "transpose.h"
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#else
#define THREAD_ID 0
#endif

#if defined(__AVX512F__) && defined(__GNUC__)
#define INT4_DOT 1
#include <immintrin.h>

#define DOT_ROWS 6
#define DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline

/* rows [0, R) x channels [c0, c0 + 16) of the product, all groups; the block's scales and zero terms of group g at
 * s and zz + g * sstride */
static DOT void dot_tile(const uint16_t *x, int64_t k, const float *xs, int64_t groups, int64_t group,
                         const uint8_t *wb, const float *s, const float *zz, int64_t sstride, int64_t c0,
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
        const __m512 sv = _mm512_loadu_ps(s + g * sstride), zv = _mm512_loadu_ps(zz + g * sstride);
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

/* 16 dwords of 16 channels' stored nibbles (r[c]: channel c's; 8 inputs a dword) as chunks 2d, 2d + 1 of the
 * packed layout for d < n (n <= 16), chunk 2d + 1 only while below `chunks` */
static DOT void store_chunks(__m512i r[16], int64_t n, int64_t chunks, uint8_t *dst) {
    transpose16(r);
    const __m512i mid = _mm512_set1_epi32(0x00f000f0);
    for (int64_t d = 0; d < n; ++d) { /* nibbles 1 and 2 of each word swapped by two xors */
        const __m512i t = _mm512_and_si512(_mm512_xor_si512(_mm512_srli_epi32(r[d], 4), r[d]), mid);
        const __m512i u = _mm512_xor_si512(r[d], _mm512_or_si512(t, _mm512_slli_epi32(t, 4)));
        _mm256_storeu_si256((__m256i *)(dst + 64 * d), _mm512_cvtepi32_epi16(u));
        if (2 * d + 1 < chunks)
            _mm256_storeu_si256((__m256i *)(dst + 64 * d + 32), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    }
}

/* channels [c0, c0 + 16) of the stored nibbles w [cols, k / 2] in the packed layout, into dst ((k / 4) x 32 bytes);
 * channels past `cols` zero bytes, as pack_int4_dot's padding (their outputs are never stored) */
static DOT void pack_stored(const uint8_t *w, int64_t cols, int64_t k, int64_t c0, uint8_t *dst) {
    const int64_t bytes = k / 2, chunks = k / 4;
    int64_t i = 0;
    for (; i + 64 <= bytes; i += 64) { /* 128 inputs of 16 channels: one transpose */
        __m512i r[16];
        for (int c = 0; c < 16; ++c) { /* the next block fetched ahead: the hardware follows few of 16 streams */
            _mm_prefetch((const char *)(w + (c0 + 16 + c) * bytes + i), _MM_HINT_T0);
            r[c] = c0 + c < cols ? _mm512_loadu_si512(w + (c0 + c) * bytes + i) : _mm512_setzero_si512();
        }
        store_chunks(r, 16, 32, dst + i * 16);
    }
    if (i < bytes) { /* the last bytes (fewer than 64, even), masked */
        const __mmask64 m = (__mmask64)((1ull << (bytes - i)) - 1ull);
        __m512i r[16];
        for (int c = 0; c < 16; ++c)
            r[c] = c0 + c < cols ? _mm512_maskz_loadu_epi8(m, w + (c0 + c) * bytes + i) : _mm512_setzero_si512();
        store_chunks(r, (bytes - i + 3) / 4, chunks - i / 2, dst + i * 16);
    }
}

/* Few rows on stored weights: each channel's row read once, in order (a single memory stream; the 16-row transpose
 * above reads 16 at a time, 2-4x slower from memory at 1-4 rows), the inputs in the lanes: a channel's 32 stored bytes
 * (64 inputs) widened to words and decoded as above. Word j holds inputs 2j (low nibble) and 2j + 1 (high), so lane
 * l's two words give inputs (4l, 4l + 2) from their low nibbles and (4l + 1, 4l + 3) from their high ones: the rows
 * are split into that order first (split_rows). Each group's lane sums are scaled lane-wise (groups of 32: two a
 * chunk, the lanes' halves), the zero terms added lane-wise, 16 channels' lane vectors summed by one tree, then the
 * bias: the same sums in another order (not bit for bit the tiles'). Groups of 32 or multiples of 64. */
#define CHANNEL_ROWS 4 /* calls of up to this many rows take the channel dot (at 8 and 16 the transpose wins) */
#define PREFETCH_AHEAD 2048 /* bytes of the stream fetched ahead (1024-4096 alike) */

/* rows of x (k bf16 values each) in the channel dot's order, xp (`stride` words a row, 64 per chunk of 64 inputs):
 * pairs (x[4l], x[4l + 2]) of the chunk's l < 16, then pairs (x[4l + 1], x[4l + 3]); inputs past k zero */
static __attribute__((target("avx512f,avx512bw"))) void split_rows(const uint16_t *x, int64_t rows, int64_t k,
                                                                    int64_t stride, uint16_t *xp) {
    uint16_t ia[32], ib[32];
    for (int l = 0; l < 16; ++l) {
        ia[2 * l] = (uint16_t)(4 * l), ia[2 * l + 1] = (uint16_t)(4 * l + 2);
        ib[2 * l] = (uint16_t)(4 * l + 1), ib[2 * l + 1] = (uint16_t)(4 * l + 3);
    }
    const __m512i pa = _mm512_loadu_si512(ia), pb = _mm512_loadu_si512(ib);
    for (int64_t i = 0; i < rows; ++i, x += k, xp += stride) {
        for (int64_t m = 0; 64 * m < k; ++m) {
            const int64_t left = k - 64 * m;
            const __mmask32 m0 = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1u);
            const __mmask32 m1 = left >= 64 ? (__mmask32)0xffffffffu
                                 : left > 32 ? (__mmask32)((1u << (left - 32)) - 1u) : (__mmask32)0;
            const __m512i lo = _mm512_maskz_loadu_epi16(m0, x + 64 * m);
            const __m512i hi = _mm512_maskz_loadu_epi16(m1, x + 64 * m + 32);
            _mm512_storeu_si512(xp + 64 * m, _mm512_permutex2var_epi16(lo, pa, hi));
            _mm512_storeu_si512(xp + 64 * m + 32, _mm512_permutex2var_epi16(lo, pb, hi));
        }
    }
}

/* chunk m (64 inputs) of a channel's stored row wn times `rows` split rows (xp, `stride` words apart), added to acc[r];
 * `left` (< 32) of its bytes read, the rest zero codes (times zero inputs), where it is the row's last half chunk */
static DOT void chunk_dot(const uint8_t *wn, const uint16_t *xp, int64_t stride, int64_t m, const int rows,
                          const int64_t left, __m512 *acc) {
    const __m512i low = _mm512_set1_epi16(0x000f), exponent = _mm512_set1_epi16(0x4300);
    const __m256i raw = left ? _mm256_maskz_loadu_epi8((__mmask32)((1u << left) - 1u), wn + 32 * m)
                             : _mm256_loadu_si256((const __m256i *)(wn + 32 * m));
    _mm_prefetch((const char *)(wn + 32 * m + PREFETCH_AHEAD), _MM_HINT_T0);
    const __m512i w = _mm512_cvtepu8_epi16(raw);
    const __m512i a = _mm512_ternarylogic_epi32(w, low, exponent, 0xea); /* (w & low) | exponent */
    const __m512i b = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), low, exponent, 0xea);
    for (int r = 0; r < rows; ++r) { /* the rows' operand last: the instruction's memory operand (products commute) */
        const uint16_t *xr = xp + r * stride + 64 * m;
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)a, (__m512bh)_mm512_loadu_si512(xr));
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)b, (__m512bh)_mm512_loadu_si512(xr + 32));
    }
}

/* a chunk's two scales of groups of 32 (s[0] in lanes 0-7, s[1] in 8-15) */
static DOT __m512 pair_scales(const float *s) {
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)s))));
}

/* sum[r] += acc[r] * sv; acc[r] = 0 */
static DOT void scale_into(const int rows, const __m512 sv, __m512 *acc, __m512 *sum) {
    for (int r = 0; r < rows; ++r) {
        sum[r] = _mm512_fmadd_ps(acc[r], sv, sum[r]);
        acc[r] = _mm512_setzero_ps();
    }
}

/* one channel's stored row wn (k / 2 bytes) times `rows` (1-4) split rows (xp, `stride` words apart): row r's lane
 * sums, each group's scaled by the channel's scale (s[g]), plus the zero terms zz[g] times the rows' group sums
 * (xs, `groups` a row), into res[r]. Even and odd chunks accumulate apart (two chains: vdpbf16ps' latency bounds few
 * rows) into two totals; a loop for each group size (32: two groups a chunk, the lanes' halves; 64: one; more: a
 * group's chunks, then its scale), so that no chunk tests its group. */
static DOT void channel_rows(const uint8_t *wn, const uint16_t *xp, int64_t stride, int64_t k, int64_t group,
                             const float *s, const float *zz, const float *xs, const int rows, __m512 *res) {
    const int64_t full = k / 64, groups = k / group;
    __m512 sum0[CHANNEL_ROWS], sum1[CHANNEL_ROWS], acc0[CHANNEL_ROWS], acc1[CHANNEL_ROWS];
    for (int r = 0; r < rows; ++r) sum0[r] = sum1[r] = acc0[r] = acc1[r] = _mm512_setzero_ps();
    if (group == 32) { /* the chunk's two scales: lanes 0-7 and 8-15 */
        int64_t m = 0;
        for (; m + 2 <= full; m += 2) {
            chunk_dot(wn, xp, stride, m, rows, 0, acc0);
            scale_into(rows, pair_scales(s + 2 * m), acc0, sum0);
            chunk_dot(wn, xp, stride, m + 1, rows, 0, acc1);
            scale_into(rows, pair_scales(s + 2 * m + 2), acc1, sum1);
        }
        if (m < full) {
            chunk_dot(wn, xp, stride, m, rows, 0, acc0);
            scale_into(rows, pair_scales(s + 2 * m), acc0, sum0);
            ++m;
        }
        if (64 * m < k) { /* the last 32 inputs: lanes 0-7, the rest zero inputs */
            chunk_dot(wn, xp, stride, m, rows, 16, acc0);
            scale_into(rows, _mm512_set1_ps(s[2 * m]), acc0, sum0);
        }
    } else if (group == 64) {
        int64_t m = 0;
        for (; m + 2 <= full; m += 2) {
            chunk_dot(wn, xp, stride, m, rows, 0, acc0);
            scale_into(rows, _mm512_set1_ps(s[m]), acc0, sum0);
            chunk_dot(wn, xp, stride, m + 1, rows, 0, acc1);
            scale_into(rows, _mm512_set1_ps(s[m + 1]), acc1, sum1);
        }
        if (m < full) {
            chunk_dot(wn, xp, stride, m, rows, 0, acc0);
            scale_into(rows, _mm512_set1_ps(s[m]), acc0, sum0);
        }
    } else { /* multiples of 64 */
        const int64_t per = group / 64;
        for (int64_t g = 0; g < groups; ++g) {
            int64_t m = g * per;
            for (; m + 2 <= (g + 1) * per; m += 2) {
                chunk_dot(wn, xp, stride, m, rows, 0, acc0);
                chunk_dot(wn, xp, stride, m + 1, rows, 0, acc1);
            }
            if (m < (g + 1) * per) chunk_dot(wn, xp, stride, m, rows, 0, acc0);
            const __m512 sv = _mm512_set1_ps(s[g]);
            scale_into(rows, sv, acc0, sum0);
            scale_into(rows, sv, acc1, sum1);
        }
    }
    for (int64_t i = 0; i < groups; i += 16) { /* the zero terms, 16 groups at a time */
        const __mmask16 m = groups - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (groups - i)) - 1u);
        const __m512 zv = _mm512_maskz_loadu_ps(m, zz + i);
        for (int r = 0; r < rows; ++r)
            sum0[r] = _mm512_fmadd_ps(zv, _mm512_maskz_loadu_ps(m, xs + r * groups + i), sum0[r]);
    }
    for (int r = 0; r < rows; ++r) res[r] = _mm512_add_ps(sum0[r], sum1[r]);
}

/* lane i of the result: the sum of v[i]'s lanes */
static DOT __m512 sum16(const __m512 v[16]) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; ++i) /* per 128-bit lane: v2i's pairs (0 + 2, 1 + 3) interleaved with v2i+1's */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int j = 0; j < 4; ++j) { /* per 128-bit lane: the lane's sums of v4j .. v4j+3 */
        const __m512d x = _mm512_castps_pd(a[2 * j]), y = _mm512_castps_pd(a[2 * j + 1]);
        b[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xee));
    const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xdd));
}

/* rows (at most CHANNEL_ROWS) x channels [c0, c0 + 16) on the stored nibbles w, the rows split (xp, `stride` words
 * each); s and zz [cols, groups] */
static DOT void channel_block(const uint8_t *w, const uint16_t *xp, int64_t stride, const float *xs, int64_t groups,
                              int64_t group, const float *s, const float *zz, int64_t c0, const float *bias,
                              float *out, int64_t cols, int64_t k, const int rows) {
    const int64_t left = cols - c0;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
    __m512 v[CHANNEL_ROWS][16];
    for (int c = 0; c < 16; ++c) {
        __m512 res[CHANNEL_ROWS];
        for (int r = 0; r < CHANNEL_ROWS; ++r) res[r] = _mm512_setzero_ps(); /* channels past `cols` */
        const int64_t ch = c0 + c;
        if (ch < cols) {
            const uint8_t *wn = w + ch * (k / 2);
            const float *sc = s + ch * groups, *zc = zz + ch * groups;
            if (rows == 4) channel_rows(wn, xp, stride, k, group, sc, zc, xs, 4, res);
            else if (rows == 3) channel_rows(wn, xp, stride, k, group, sc, zc, xs, 3, res);
            else if (rows == 2) channel_rows(wn, xp, stride, k, group, sc, zc, xs, 2, res);
            else channel_rows(wn, xp, stride, k, group, sc, zc, xs, 1, res);
        }
        for (int r = 0; r < rows; ++r) v[r][c] = res[r];
    }
    for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(out + r * cols + c0, mask, _mm512_add_ps(sum16(v[r]), bv));
}

/* rows [0, rows) x channel blocks [b0, b1); stored weights (w the layer's nibbles, s and zz [cols, groups]): with
 * split rows (xp) the channel dot, else packed block by block into `scratch` (the block's scales and zero terms
 * after its weights, [groups, 16]); else w packed (s and zz [groups, cols_p]) */
static __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void dot_blocks(
    const uint16_t *x, const float *xs, const uint8_t *w, const float *s, const float *zz, const float *bias,
    int64_t rows, int64_t cols, int64_t k, int64_t group, int64_t b0, int64_t b1, const uint16_t *xp,
    uint8_t *scratch, float *out) {
    const int64_t groups = k / group, cols_p = (cols + 15) / 16 * 16, panel = (k / 4) * 32;
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = 16 * b;
        if (xp) {
            channel_block(w, xp, (k + 63) / 64 * 64, xs, groups, group, s, zz, c0, bias, out, cols, k, (int)rows);
            continue;
        }
        const uint8_t *wb = w + b * panel;
        const float *sb = s + c0, *zb = zz + c0;
        int64_t sstride = cols_p;
        if (scratch) {
            float *ss = (float *)(scratch + panel), *zs = ss + groups * 16;
            pack_stored(w, cols, k, c0, scratch);
            for (int64_t c = 0; c < 16; ++c)
                for (int64_t g = 0; g < groups; ++g) {
                    ss[g * 16 + c] = c0 + c < cols ? s[(c0 + c) * groups + g] : 0.0f;
                    zs[g * 16 + c] = c0 + c < cols ? zz[(c0 + c) * groups + g] : 0.0f;
                }
            wb = scratch, sb = ss, zb = zs, sstride = 16;
        }
        int64_t r = 0;
        for (; r + DOT_ROWS <= rows; r += DOT_ROWS)
            dot_tile(x + r * k, k, xs + r * groups, groups, group, wb, sb, zb, sstride, c0, bias, out + r * cols, cols,
                     DOT_ROWS);
        switch (rows - r) {
#define LAST(n) case n: dot_tile(x + r * k, k, xs + r * groups, groups, group, wb, sb, zb, sstride, c0, bias, \
                                 out + r * cols, cols, n); break;
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
 * as above (w; row_major: the stored nibbles [cols, k / 2]), s and zz fp32 [k / group, cols_p], bias NULL or [cols].
 * Channel blocks split over `threads` OpenMP threads (every output computed alone: the same numbers on any number of
 * threads). Returns 1 where not compressdit_int4_dot_ready or out of memory. */
int compressdit_int4_dot(const uint16_t *x, const uint8_t *w, const float *s, const float *zz, const float *bias,
                         int64_t rows, int64_t cols, int64_t k, int64_t group, int32_t row_major, float *out,
                         int32_t threads) {
#ifdef INT4_DOT
    if (!compressdit_int4_dot_ready()) return 1;
    const int64_t groups = k / group, blocks = (cols + 15) / 16, panel = (k / 4) * 32, stride = (k + 63) / 64 * 64;
    const int team = threads > 1 && blocks > 1 ? threads : 1;
    const int channel = row_major && rows <= CHANNEL_ROWS && (group == 32 || group % 64 == 0);
    float *xs = (float *)malloc(sizeof(float) * (size_t)(rows * groups > 0 ? rows * groups : 1));
    const int64_t per_thread = panel + 2 * groups * 16 * (int64_t)sizeof(float); /* a block packed, its scales */
    uint8_t *scratch = row_major && !channel ? (uint8_t *)malloc((size_t)(per_thread * team)) : NULL;
    uint16_t *xp = channel ? (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(rows * stride > 0 ? rows * stride : 1))
                           : NULL;
    if (!xs || (row_major && !channel && !scratch) || (channel && !xp)) {
        free(xs);
        free(scratch);
        free(xp);
        return 1;
    }
    group_sums(x, rows * groups, group, xs);
    if (channel) split_rows(x, rows, k, stride, xp);
    if (team == 1) {
        dot_blocks(x, xs, w, s, zz, bias, rows, cols, k, group, 0, blocks, xp, scratch, out);
    } else {
#pragma omp parallel for schedule(static) num_threads(team)
        for (int64_t b = 0; b < blocks; ++b)
            dot_blocks(x, xs, w, s, zz, bias, rows, cols, k, group, b, b + 1, xp,
                       scratch ? scratch + THREAD_ID * per_thread : NULL, out);
    }
    free(xs);
    free(scratch);
    free(xp);
    return 0;
#else
    (void)x; (void)w; (void)s; (void)zz; (void)bias; (void)rows; (void)cols; (void)k; (void)group; (void)row_major;
    (void)out; (void)threads;
    return 1;
#endif
}
