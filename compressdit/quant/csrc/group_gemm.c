/* An integer GEMM with scales per group of the reduction (compressdit/quant/cpu_native.py: group_gemm; the kernel
 * cpu-int-groups of compressdit/quant/cpu_kernels.py) for 4-bit weights x low-bit activations with scales per group
 * of inputs (W4A4 g16 / g64, NVFP4): out[i, n] = sum_g (sum_{k in g} a[i, k] w[n, k]) * a_scale[i, g] * w_scale[g, n]
 * + bias[n] (+ SVDQuant's h @ up), the inner sums exact in int32, on AVX512-VNNI (vpdpbusd: 64 unsigned x signed
 * byte products an instruction) or AVX2 (vpmaddubsw + vpmaddwd, see tile16). With one activation scale a row
 * (row_scales: W8A8 and W4A8's int8 activations per token, cpu-int8-gemm and cpu-int8-group-gemm; on AVX2 as signed
 * codes, tile16's signed_a) the
 * sums dequantize as compressdit_dequantize_groups: (sum_g acc_g * w_scale[g, n]) * a_scale[i] + bias[n], each
 * product and sum rounded in turn: the same numbers as those kernels' torch._int_mm paths.
 *
 * Why: no GEMM of torch's reads per-group scales on both operands; the fp32 GEMM of the decoded weight on the
 * fake-quantized activations (the kernels before) multiplies 16 values per instruction, vpdpbusd 64, and a group's
 * int32 sums need three more instructions (convert, scale product, fused add) per 16 outputs: 256 -> 128 rows x 128
 * columns at one thread 31.6 us at g16 and 27.9 at g64 against 88 us of torch's fp32 GEMM (Zen 4 EPYC).
 *
 * Operands: activation codes a (uint8 [rows, k]: the grid's integer value plus an offset, grid_code_groups of
 * float_rows.c); weight codes (int8) packed in blocks of 16 output channels, [cols_p / 16, k / 4, 16, 4] (vpdpbusd's
 * layout: four consecutive inputs of one channel in one 32-bit lane), cols_p = cols rounded up to 32 (zero codes);
 * corr [groups, cols_p] = -offset * the channel's sum of weight codes in the group (the activations' offset taken
 * back: the int32 accumulators start from it); w_scale [groups, cols_p]; a_scale [rows, groups].
 *
 * Row-major weights (row_major: W8A8's byte codes [cols, k] or W4A8's offset nibbles [cols, k / 2] as the layer
 * stores them, one group; AVX512-VNNI; on AVX2 byte codes with signed activation codes: each block of 16 channels
 * packed per call by pack_block_avx2, up to AVX2_DOT_ROWS rows a thread multiplied in place by dot_rows_avx2,
 * DiT-XL/2's shapes, weights read from memory, 1.02-1.05x the packed copy's time at 256 rows, 1.2-1.9x at 1-16, Zen 3;
 * and NVFP4's / W4A4's nibbles through their table (row_major 3), each block decoded, packed and its corrections
 * summed per call by nibble_block_avx2 (always: no in-place path), 0.83-1.06x the packed copy's time at 256 rows,
 * 0.96-1.25x at 1-16, bench/results/group_gemm_stored_cpu_zen3_avx2.md): no packed copy is kept.
 * On AVX512-VNNI, with at least DOT_ROWS rows a thread, each pair of
 * blocks is packed when its turn comes (a 16 x 16 transpose of 4-byte quads per 64 inputs of 16 channels: DiT-XL/2's
 * layers 3-5% slower than prepacked at 256 rows, 10-15% at 64, one thread, weights read from memory); with fewer,
 * dot_tile multiplies 64 consecutive inputs of a row and of a channel in place (up to 4 rows one channel at a time,
 * more 4 channels in step; with the weights in cache within 2-7% of the prepacked GEMM, 24% at 4 rows; read from
 * memory, 0.95-1.1x its time at 1-2 rows, 1.3-1.7x at 4, 1.4-1.5x at 16: 4 rows' streams in step draw less bandwidth
 * than one). The same int32 sums and epilogue: the same numbers.
 * Stored nibbles in groups (row_major 3: NVFP4's E2M1 nibbles or W4A8 g64's offset nibbles through their 16-entry
 * table, vpshufb while packing): each pair packed per call as above (given no corr, its corrections too: dpbusd of
 * the packed quads against ones, per group times -offset: no [groups, cols_p] int32 array kept, a quarter byte a
 * weight at NVFP4's groups of 16); with one activation scale a row, groups of a
 * multiple of 64 and up to GROUP_DOT_ROWS rows a thread, dot_tile_groups multiplies each channel's row in place, its
 * groups' int32 sums converted and scaled lane-wise (fp32 summation order: not the tiles' numbers bit for bit).
 * DiT-XL/2 shapes, one thread, weights read from memory, against the packed copy (bench/group_gemm_stored.py):
 * NVFP4 (corrections computed) 1.00-1.05x its time at 256-1024 rows, 1.2-1.5x at 16, 1.5-2.4x at 1-4 (packed per
 * call); W4A8 g64 0.98-1.05x at 256-1024, 1.3-1.8x at 16, 1.5-2.6x at 1-4 rows (in place).
 *
 * 16-bit weights (planes = 2, AVX512-VNNI only: twin-log's per-row tables of real values: cpu_kernels.pack_planes):
 * each weight q = 256 * hi + lo with signed bytes hi and lo, packed as byte weights of twice the inputs, each
 * group's hi quads then its lo quads; corr and w_scale [2 * groups, cols_p] (corr: -offset * each plane's sums,
 * w_scale: the scale in the hi row). A group's int32 sum is (corr_hi + sum a * hi) * 256 + corr_lo +
 * sum a * lo: the hi plane's products, one shift, the lo plane's; twice the products of byte weights, one epilogue. */

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

#if (defined(__AVX2__) || defined(__AVX512F__)) && defined(__GNUC__)
#define GROUP_GEMM 1
#include <immintrin.h>

#define TILE_ROWS 6 /* AVX-512's tile; row blocks of whole tiles (AVX2's of 2 rows divide it; of 4 a block of 6 ends in
                     * a tile of 2) */
#define AVX2_ROWS 2
#define AVX2_SIGNED_ROWS 4 /* signed activation codes: more rows a tile, each weight block's abs shared by them */
#define AVX2_WHOLE_ROWS 4 /* tile16_whole's */
#define AVX2_MAX_ROWS 4
#define AVX2_DOT_ROWS 4 /* row-major byte codes: at most this many rows a thread multiplied in place, more packed */

#define AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

/* the end of a tile: the rows' fp32 sums (sum) times their scale (row_scales), plus the low-rank branch and the bias,
 * stored */
static AVX2 void finish16(__m256 sum[AVX2_MAX_ROWS][2], const float *a_scale, const float *h, int64_t rank,
                          const float *up, int64_t cols_p, const float *bias, float *out, int64_t cols, int64_t c0,
                          const int rows, const int row_scales) {
    for (int r = 0; r < rows && row_scales; ++r) {
        const __m256 sa = _mm256_set1_ps(a_scale[r]);
        sum[r][0] = _mm256_mul_ps(sum[r][0], sa);
        sum[r][1] = _mm256_mul_ps(sum[r][1], sa);
    }
    for (int64_t j = 0; j < rank; ++j) { /* the low-rank branch: h [rows, rank] times up [rank, cols_p] */
        const __m256 u0 = _mm256_loadu_ps(up + j * cols_p + c0), u1 = _mm256_loadu_ps(up + j * cols_p + c0 + 8);
        for (int r = 0; r < rows; ++r) {
            const __m256 hv = _mm256_set1_ps(h[r * rank + j]);
            sum[r][0] = _mm256_fmadd_ps(hv, u0, sum[r][0]);
            sum[r][1] = _mm256_fmadd_ps(hv, u1, sum[r][1]);
            /* in registers: with 4 rows GCC kept some of the sums on the stack, each rank's FMA then waiting on the
             * last one's store (a tenth of a 128 -> 512 GEMM's time) */
            __asm__("" : "+x"(sum[r][0]), "+x"(sum[r][1]));
        }
    }
    /* a whole block stored directly; the last, partial one through a buffer (a memcpy of variable length is a
     * `rep movs`, ~30 cycles each: as much as a tile's products at K = 128 when it was done for every block) */
    const int64_t left = cols - c0 < 16 ? cols - c0 : 16;
    float b[16] = {0};
    if (bias && left < 16) memcpy(b, bias + c0, sizeof(float) * (size_t)left);
    const __m256 bias0 = !bias ? _mm256_setzero_ps() : left < 16 ? _mm256_loadu_ps(b) : _mm256_loadu_ps(bias + c0);
    const __m256 bias1 = !bias ? _mm256_setzero_ps() : left < 16 ? _mm256_loadu_ps(b + 8)
                                                                  : _mm256_loadu_ps(bias + c0 + 8);
    for (int r = 0; r < rows; ++r) {
        const __m256 o0 = _mm256_add_ps(sum[r][0], bias0), o1 = _mm256_add_ps(sum[r][1], bias1);
        if (left == 16) {
            _mm256_storeu_ps(out + r * cols + c0, o0);
            _mm256_storeu_ps(out + r * cols + c0 + 8, o1);
        } else {
            float o[16];
            _mm256_storeu_ps(o, o0);
            _mm256_storeu_ps(o + 8, o1);
            memcpy(out + r * cols + c0, o, sizeof(float) * (size_t)left);
        }
    }
}

/* AVX2 (no VNNI): rows [0, R) x output channels [c0, c0 + 16) (one block of 16), all groups. vpmaddubsw multiplies
 * unsigned by signed bytes into pairs of 16-bit sums, added up in 16 bits for `flush` quads of inputs at a time (the
 * caller's bound: flush * 2 * max activation code * max |weight code| < 2^15, so nothing saturates), then vpmaddwd
 * widens them into the 32-bit sums: two instructions per 32 products, where the widening each time took three.
 * signed_a (W8A8's int8 activation codes, |code| <= 127, against byte weight codes in [-128, 127]: no flush bound
 * holds, 2 * 255 * 127 > 2^15, where oneDNN's u8s8 GEMM without VNNI saturates its 16-bit pairs): each product as
 * |w| (unsigned, <= 128) times the activation with w's sign (vpsignb; zero where w is zero), a pair at most
 * 2 * 128 * 127 < 2^15, widened at once: four instructions per 32 products, exact. */
static AVX2 void tile16(const uint8_t *a, int64_t k, const float *a_scale, int64_t groups, int64_t group,
                        const int8_t *wb, const int32_t *corr, int64_t corr_stride, const float *w_scale,
                        int64_t cols_p, const float *h,
                        int64_t rank, const float *up, const float *bias, float *out, int64_t cols, int64_t c0,
                        int64_t flush, const int rows, const int row_scales, const int signed_a) {
    __m256 sum[AVX2_MAX_ROWS][2];
    for (int r = 0; r < rows; ++r) sum[r][0] = sum[r][1] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t quads = group / 4;
    for (int64_t g = 0; g < groups; ++g) {
        const __m256i start0 = _mm256_loadu_si256((const __m256i *)(corr + g * corr_stride));
        const __m256i start1 = _mm256_loadu_si256((const __m256i *)(corr + g * corr_stride + 8));
        __m256i acc[AVX2_SIGNED_ROWS][2];
        for (int r = 0; r < rows; ++r) {
            acc[r][0] = start0;
            acc[r][1] = start1;
        }
        for (int64_t q = g * quads; signed_a && q < (g + 1) * quads; ++q) { /* byte x byte: see above */
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wb + q * 64));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wb + q * 64 + 32));
            const __m256i m0 = _mm256_abs_epi8(w0), m1 = _mm256_abs_epi8(w1);
            for (int r = 0; r < rows; ++r) {
                int32_t four;
                memcpy(&four, a + r * k + 4 * q, sizeof four);
                const __m256i x = _mm256_set1_epi32(four);
                acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(m0, _mm256_sign_epi8(x, w0)), ones));
                acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(m1, _mm256_sign_epi8(x, w1)), ones));
            }
        }
        for (int64_t q0 = g * quads; !signed_a && q0 < (g + 1) * quads; q0 += flush) {
            const int64_t q1 = q0 + flush < (g + 1) * quads ? q0 + flush : (g + 1) * quads;
            __m256i pair[AVX2_SIGNED_ROWS][2];
            for (int r = 0; r < rows; ++r) pair[r][0] = pair[r][1] = _mm256_setzero_si256();
            for (int64_t q = q0; q < q1; ++q) {
                const __m256i b0 = _mm256_loadu_si256((const __m256i *)(wb + q * 64));
                const __m256i b1 = _mm256_loadu_si256((const __m256i *)(wb + q * 64 + 32));
                for (int r = 0; r < rows; ++r) {
                    int32_t four;
                    memcpy(&four, a + r * k + 4 * q, sizeof four);
                    const __m256i x = _mm256_set1_epi32(four);
                    pair[r][0] = _mm256_add_epi16(pair[r][0], _mm256_maddubs_epi16(x, b0));
                    pair[r][1] = _mm256_add_epi16(pair[r][1], _mm256_maddubs_epi16(x, b1));
                }
            }
            for (int r = 0; r < rows; ++r) {
                acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(pair[r][0], ones));
                acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(pair[r][1], ones));
            }
        }
        const __m256 s0 = _mm256_loadu_ps(w_scale + g * cols_p + c0);
        const __m256 s1 = _mm256_loadu_ps(w_scale + g * cols_p + c0 + 8);
        for (int r = 0; r < rows; ++r) {
            if (row_scales) { /* as the AVX-512 tile */
                sum[r][0] = _mm256_add_ps(sum[r][0], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][0]), s0));
                sum[r][1] = _mm256_add_ps(sum[r][1], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][1]), s1));
            } else {
                const __m256 sa = _mm256_set1_ps(a_scale[r * groups + g]);
                sum[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), _mm256_mul_ps(s0, sa), sum[r][0]);
                sum[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), _mm256_mul_ps(s1, sa), sum[r][1]);
            }
        }
    }
    finish16(sum, a_scale, h, rank, up, cols_p, bias, out, cols, c0, rows, row_scales);
}

/* tile16 for unsigned activation codes whose groups are summed whole in 16 bits (flush >= group / 4: NVFP4's, MXFP4's,
 * W4A4's groups of 16 / 32 / 64; `group` a constant): tiles of more rows, each block of weights loaded once for them.
 * In the quad loop only the rows' 16-bit pair sums, the block and the broadcast activations live in registers (2 *
 * rows + 3); each group's widened sums are added to the rows' fp32 sums in memory (the sums of tile16's tiles of 4
 * rows in registers left GCC spilling the pair sums instead). The same operations on the same values as tile16: its
 * outputs bit for bit. */
static AVX2 void tile16_whole(const uint8_t *a, int64_t k, const float *a_scale, int64_t groups, const int64_t group,
                              const int8_t *wb, const int32_t *corr, int64_t corr_stride, const float *w_scale,
                              int64_t cols_p,
                              const float *h, int64_t rank, const float *up, const float *bias, float *out,
                              int64_t cols, int64_t c0, const int rows, const int row_scales) {
    float sums[AVX2_WHOLE_ROWS][16] __attribute__((aligned(32))) = {{0}};
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t quads = group / 4;
    for (int64_t g = 0; g < groups; ++g) {
        __m256i pair[AVX2_WHOLE_ROWS][2];
        for (int r = 0; r < rows; ++r) pair[r][0] = pair[r][1] = _mm256_setzero_si256();
        const int8_t *wg = wb + g * quads * 64;
        const uint8_t *row[AVX2_WHOLE_ROWS]; /* a pointer a row, the quads at constant offsets from it (with offsets
                                                 * r * k + 4 * q, GCC kept one a row and quad on the stack) */
        for (int r = 0; r < rows; ++r) row[r] = a + r * k + g * group;
#pragma GCC unroll 16
        for (int64_t q = 0; q < quads; ++q) {
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)(wg + q * 64));
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)(wg + q * 64 + 32));
            for (int r = 0; r < rows; ++r) {
                int32_t four;
                memcpy(&four, row[r] + 4 * q, sizeof four);
                const __m256i x = _mm256_set1_epi32(four);
                pair[r][0] = _mm256_add_epi16(pair[r][0], _mm256_maddubs_epi16(x, b0));
                pair[r][1] = _mm256_add_epi16(pair[r][1], _mm256_maddubs_epi16(x, b1));
                /* the sums in order: unrolled, GCC re-associated them into trees of all the quads' products,
                 * held on the stack */
                __asm__("" : "+x"(pair[r][0]), "+x"(pair[r][1]));
            }
        }
        const __m256i start0 = _mm256_loadu_si256((const __m256i *)(corr + g * corr_stride));
        const __m256i start1 = _mm256_loadu_si256((const __m256i *)(corr + g * corr_stride + 8));
        const __m256 s0 = _mm256_loadu_ps(w_scale + g * cols_p + c0);
        const __m256 s1 = _mm256_loadu_ps(w_scale + g * cols_p + c0 + 8);
        for (int r = 0; r < rows; ++r) {
            const __m256 f0 = _mm256_cvtepi32_ps(_mm256_add_epi32(start0, _mm256_madd_epi16(pair[r][0], ones)));
            const __m256 f1 = _mm256_cvtepi32_ps(_mm256_add_epi32(start1, _mm256_madd_epi16(pair[r][1], ones)));
            const __m256 t0 = _mm256_load_ps(sums[r]), t1 = _mm256_load_ps(sums[r] + 8);
            if (row_scales) {
                _mm256_store_ps(sums[r], _mm256_add_ps(t0, _mm256_mul_ps(f0, s0)));
                _mm256_store_ps(sums[r] + 8, _mm256_add_ps(t1, _mm256_mul_ps(f1, s1)));
            } else {
                const __m256 sa = _mm256_set1_ps(a_scale[r * groups + g]);
                _mm256_store_ps(sums[r], _mm256_fmadd_ps(f0, _mm256_mul_ps(s0, sa), t0));
                _mm256_store_ps(sums[r] + 8, _mm256_fmadd_ps(f1, _mm256_mul_ps(s1, sa), t1));
            }
        }
    }
    __m256 sum[AVX2_MAX_ROWS][2];
    for (int r = 0; r < rows; ++r) {
        sum[r][0] = _mm256_load_ps(sums[r]);
        sum[r][1] = _mm256_load_ps(sums[r] + 8);
    }
    finish16(sum, a_scale, h, rank, up, cols_p, bias, out, cols, c0, rows, row_scales);
}

/* block b's byte codes (k / 4 quads of 64 bytes) from a pair's nibbles (the low ones for the pair's first block, the
 * high ones for its second) looked up in the 16-byte table: into `codes`, the layout tile16 reads */
static AVX2 void decode_block(const int8_t *pair, int64_t quads, int high, const int8_t *table, int8_t *codes) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m128i shift = _mm_cvtsi32_si128(high ? 4 : 0);
    for (int64_t q = 0; q < 2 * quads; ++q) {
        const __m256i n = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(pair + q * 32)), shift);
        _mm256_storeu_si256((__m256i *)(codes + q * 32), _mm256_shuffle_epi8(lut, _mm256_and_si256(n, low)));
    }
}

/* block c0 .. c0 + 15 of row-major byte codes w [cols, k] (zeros past the last channel) in the layout tile16 reads
 * (quad q: channels c0 .. c0 + 7's four bytes, then c0 + 8 .. c0 + 15's) into `codes`: 8 channels x 8 quads at a time
 * as an 8 x 8 transpose of dwords, the last k % 32 inputs a dword at a time */
static AVX2 void pack_block_avx2(const int8_t *w, int64_t cols, int64_t k, int64_t c0, int8_t *codes) {
    const int64_t quads = k / 4;
    for (int half = 0; half < 2; ++half) {
        const int64_t first = c0 + 8 * half;
        const int64_t n = cols - first < 8 ? (cols - first > 0 ? cols - first : 0) : 8;
        int8_t *dst = codes + 32 * half;
        int64_t q = 0;
        for (; n == 8 && q + 8 <= quads; q += 8) {
            __m256i r[8], t[8];
            for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_si256((const __m256i *)(w + (first + c) * k + 4 * q));
            for (int c = 0; c < 8; c += 2) { /* dwords of channels c, c + 1 interleaved */
                t[c] = _mm256_unpacklo_epi32(r[c], r[c + 1]);
                t[c + 1] = _mm256_unpackhi_epi32(r[c], r[c + 1]);
            }
            for (int c = 0; c < 8; c += 4) { /* then pairs of channels: each lane 4 channels' dword */
                r[c] = _mm256_unpacklo_epi64(t[c], t[c + 2]);
                r[c + 1] = _mm256_unpackhi_epi64(t[c], t[c + 2]);
                r[c + 2] = _mm256_unpacklo_epi64(t[c + 1], t[c + 3]);
                r[c + 3] = _mm256_unpackhi_epi64(t[c + 1], t[c + 3]);
            }
            /* r[e] (e < 4), lane L: channels 0-3's dword 4 L + e; r[4 + e] channels 4-7's */
            for (int e = 0; e < 4; ++e) {
                _mm256_storeu_si256((__m256i *)(dst + (q + e) * 64), _mm256_permute2x128_si256(r[e], r[4 + e], 0x20));
                _mm256_storeu_si256((__m256i *)(dst + (q + 4 + e) * 64),
                                    _mm256_permute2x128_si256(r[e], r[4 + e], 0x31));
            }
        }
        for (; q < quads; ++q)
            for (int c = 0; c < 8; ++c) {
                int32_t four = 0;
                if (c < n) memcpy(&four, w + (first + c) * k + 4 * q, sizeof four);
                memcpy(dst + q * 64 + 4 * c, &four, sizeof four);
            }
    }
}

/* block c0 .. c0 + 15 of stored nibbles w [cols, k / 2] (each byte's low nibble the even input) whose codes are
 * table[nibble]: the channels' codes decoded row by row into `rows` (16 x k bytes; zeros past the last channel), then
 * packed by pack_block_avx2 into `codes`; where corr is not NULL each group's corrections, -offset times the sum of
 * its codes ([groups][16] int32, summed from the packed quads: vpmaddubsw of ones, vpmaddwd), the values
 * cpu_kernels.pack_weight gives */
static AVX2 void nibble_block_avx2(const uint8_t *w, int64_t cols, int64_t k, int64_t c0, const int8_t *table,
                                   int64_t group, int32_t offset, int8_t *rows, int8_t *codes, int32_t *corr) {
    const __m128i lut = _mm_loadu_si128((const __m128i *)table), low = _mm_set1_epi8(0x0f);
    const int64_t half = k / 2;
    for (int64_t c = 0; c < 16; ++c) {
        int8_t *dst = rows + c * k;
        if (c0 + c >= cols) {
            memset(dst, 0, (size_t)k);
            continue;
        }
        const uint8_t *src = w + (c0 + c) * half;
        int64_t i = 0;
        for (; i + 16 <= half; i += 16) { /* 16 bytes -> 32 codes, each byte's low nibble first */
            const __m128i v = _mm_loadu_si128((const __m128i *)(src + i));
            const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(v, low));
            const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), low));
            _mm_storeu_si128((__m128i *)(dst + 2 * i), _mm_unpacklo_epi8(lo, hi));
            _mm_storeu_si128((__m128i *)(dst + 2 * i + 16), _mm_unpackhi_epi8(lo, hi));
        }
        for (; i < half; ++i) {
            dst[2 * i] = table[src[i] & 15];
            dst[2 * i + 1] = table[src[i] >> 4];
        }
    }
    pack_block_avx2(rows, 16, k, 0, codes);
    if (!corr)
        return;
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1), times = _mm256_set1_epi32(-offset);
    const int64_t quads = group / 4;
    for (int64_t g = 0; g < k / group; ++g)
        for (int h = 0; h < 2; ++h) { /* channels 8 h .. 8 h + 7 */
            __m256i sum = _mm256_setzero_si256();
            for (int64_t q = g * quads; q < (g + 1) * quads; ++q)
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(
                    ones8, _mm256_loadu_si256((const __m256i *)(codes + q * 64 + 32 * h))), ones16));
            _mm256_storeu_si256((__m256i *)(corr + g * 16 + 8 * h), _mm256_mullo_epi32(sum, times));
        }
}

/* signed activation codes (int8, one scale a row, one group) times row-major byte codes w [cols, k], multiplied in
 * place: `rows` rows (at most 4) from x times `n` channels (1 or 2) from c, both constants (with a run-time n the
 * accumulators lived on the stack: 2x the packed tiles' time at 4 rows), each 32 inputs of a channel loaded once for
 * the rows (tile16's signed products: |w| times the code with w's sign), the last k % 32 inputs one at a time; each
 * output (sum * w_scale[c]) * a_scale[r] + bias[c] in fp32: the tiles' operations, their numbers. */
static AVX2 void dot_pair_avx2(const int8_t *x, const float *a_scale, const int8_t *w, const float *w_scale,
                               const float *bias, int64_t c, int64_t cols, int64_t k, float *out, const int rows,
                               const int n) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t steps = k / 32;
    const int8_t *w0 = w + c * k, *w1 = w + (c + n - 1) * k;
    __m256i acc[4][2];
    for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t s = 0; s < steps; ++s) {
        const __m256i wv0 = _mm256_loadu_si256((const __m256i *)(w0 + 32 * s));
        const __m256i wv1 = _mm256_loadu_si256((const __m256i *)(w1 + 32 * s));
        const __m256i m0 = _mm256_abs_epi8(wv0), m1 = _mm256_abs_epi8(wv1);
        for (int r = 0; r < rows; ++r) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(x + r * k + 32 * s));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(m0, _mm256_sign_epi8(v, wv0)),
                                                                      ones));
            if (n == 2)
                acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(m1, _mm256_sign_epi8(v, wv1)), ones));
        }
    }
    for (int r = 0; r < rows; ++r) {
        /* the two channels' 8 lanes summed in registers */
        const __m256i pairs = _mm256_hadd_epi32(acc[r][0], acc[r][1]); /* lane L: c0 01 23, c1 01 23 */
        const __m256i quads = _mm256_hadd_epi32(pairs, pairs);            /* lane L: c0, c1, c0, c1 */
        const __m128i both = _mm_add_epi32(_mm256_castsi256_si128(quads), _mm256_extracti128_si256(quads, 1));
        const int32_t sums[2] = {_mm_cvtsi128_si32(both), _mm_extract_epi32(both, 1)};
        for (int j = 0; j < n; ++j) {
            int32_t sum = sums[j];
            const int8_t *wc = j ? w1 : w0;
            for (int64_t e = 32 * steps; e < k; ++e) sum += (int32_t)x[r * k + e] * (int32_t)wc[e];
            const float t = (0.0f + (float)sum * w_scale[c + j]) * a_scale[r];
            out[r * cols + c + j] = t + (bias ? bias[c + j] : 0.0f);
        }
    }
}

/* channels [c0, c1) of dot_pair_avx2, two at a time */
static AVX2 void dot_tile_avx2(const int8_t *x, const float *a_scale, const int8_t *w, const float *w_scale,
                               const float *bias, int64_t c0, int64_t c1, int64_t cols, int64_t k, float *out,
                               const int rows) {
    int64_t c = c0;
    for (; c + 2 <= c1; c += 2) dot_pair_avx2(x, a_scale, w, w_scale, bias, c, cols, k, out, rows, 2);
    if (c < c1)
        dot_pair_avx2(x, a_scale, w, w_scale, bias, c, cols, k, out, rows, 1);
}

/* rows [r0, r1) x channels [c0, c1) of dot_tile_avx2, in tiles of up to 4 rows: for few rows, where packing each
 * block would cost more than the products (the weight read once either way) */
static AVX2 void dot_rows_avx2(const uint8_t *a, const float *a_scale, const int8_t *w, const float *w_scale,
                               const float *bias, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t cols,
                               int64_t k, float *out) {
    for (int64_t r = r0; r < r1; r += 4) {
#define DOT_TILE(n) dot_tile_avx2((const int8_t *)a + r * k, a_scale + r, w, w_scale, bias, c0, c1, cols, k, \
                                  out + r * cols, n)
        if (r1 - r >= 4)
            DOT_TILE(4);
        else if (r1 - r == 3)
            DOT_TILE(3);
        else if (r1 - r == 2)
            DOT_TILE(2);
        else
            DOT_TILE(1);
#undef DOT_TILE
    }
}

/* rows [r, r1) of one block of 16 channels (c0) in tiles of n rows (AVX2_ROWS, or AVX2_SIGNED_ROWS for signed
 * activation codes), the tail in one smaller tile; always inlined, n constant: only tiles of at most n rows are
 * compiled, and a constant group / flush unrolls their quad loops */
static AVX2 void tiles16(const uint8_t *a, int64_t k, const float *a_scale, int64_t stride, int64_t groups,
                         int64_t group, const int8_t *wb, const int32_t *corr, int64_t corr_stride,
                         const float *w_scale, int64_t cols_p,
                         const float *h, int64_t rank, const float *up, const float *bias, float *out, int64_t cols,
                         int64_t c0, int64_t flush, int64_t r, int64_t r1, const int n, const int row_scales,
                         const int signed_a, const int whole) {
#define TILE16(rows)                                                                                                  \
    do {                                                                                                              \
        if (whole)                                                                                                    \
            tile16_whole(a + r * k, k, a_scale + r * stride, groups, group, wb, corr, corr_stride, w_scale, cols_p,   \
                         h + r * rank,                                                                                \
                         rank, up, bias, out + r * cols, cols, c0, rows, row_scales);                                 \
        else                                                                                                          \
            tile16(a + r * k, k, a_scale + r * stride, groups, group, wb, corr, corr_stride, w_scale, cols_p,         \
                   h + r * rank, rank, up, bias, out + r * cols, cols, c0, flush, rows, row_scales, signed_a);        \
    } while (0)
    for (; r + n <= r1; r += n) TILE16(n);
    if (n > 3 && r1 - r == 3)
        TILE16(3);
    else if (n > 2 && r1 - r == 2)
        TILE16(2);
    else if (r1 - r == 1)
        TILE16(1);
#undef TILE16
}

/* rows [r0, r1) x channel pairs [p0, p1) on AVX2: each block of 16 channels in turn, the rows in tiles of 2 (signed
 * activation codes, groups summed whole: 4); row-major byte codes (row_major) packed, nibble weights (table not NULL)
 * decoded a block at a time into `scratch` (k * 16 bytes), which the rows then read. Groups of 16 / 32 / 64 summed
 * in 16 bits whole (NVFP4's, MXFP4's, W4A4's) take tiles
 * compiled for their width: their quad loops unrolled (DiT-XL/2 and zoo shapes 11-21% faster at groups of 16, Zen 3;
 * the same sums: one flush a group either way). */
static AVX2 void rows_avx2(const uint8_t *a, const float *a_scale, const int8_t *w, const int32_t *corr,
                           const float *w_scale, const float *h, int64_t rank, const float *up, const float *bias,
                           int64_t r0, int64_t r1, int64_t p0, int64_t p1, int64_t cols, int64_t k, int64_t group,
                           int64_t flush, const int row_scales, const int8_t *table, int8_t *scratch, float *out,
                           const int signed_a, const int row_major, const int32_t offset) {
    const int64_t groups = k / group, cols_p = (cols + 31) / 32 * 32, panel = (k / 4) * 64;
    const int64_t stride = row_scales ? 1 : groups; /* a_scale's entries a row */
    for (int64_t b = 2 * p0; b < 2 * p1 && 16 * b < cols; ++b) {
        const int8_t *wb = w + b * panel;
        const int32_t *cb = corr ? corr + 16 * b : NULL; /* the block's corrections, rows corr_stride apart */
        int64_t corr_stride = cols_p;
        if (row_major == 3) { /* the block of the stored nibbles decoded, packed (and its corrections summed) here */
            int32_t *sums = corr ? NULL : (int32_t *)(scratch + 32 * k);
            nibble_block_avx2((const uint8_t *)w, cols, k, 16 * b, table, group, offset, scratch + 16 * k, scratch,
                              sums);
            wb = scratch;
            if (sums) {
                cb = sums;
                corr_stride = 16;
            }
        } else if (row_major) { /* the block of the weight as stored, packed here */
            pack_block_avx2(w, cols, k, 16 * b, scratch);
            wb = scratch;
        } else if (table) {
            decode_block(w + (b / 2) * panel, k / 4, (int)(b % 2), table, scratch);
            wb = scratch;
        }
#define TILES16(width, fl, n, sgn, whole) tiles16(a, k, a_scale, stride, groups, width, wb, cb, corr_stride, w_scale,  \
                                                  cols_p, h, rank, up, bias, out, cols, 16 * b, fl, r0, r1, n,          \
                                                  row_scales, sgn, whole)
        if (signed_a)
            TILES16(group, 1, AVX2_SIGNED_ROWS, 1, 0);
        else if (group == 16 && flush >= 4)
            TILES16(16, 4, AVX2_WHOLE_ROWS, 0, 1);
        else if (group == 32 && flush >= 8)
            TILES16(32, 8, AVX2_WHOLE_ROWS, 0, 1);
        else if (group == 64 && flush >= 16)
            TILES16(64, 16, AVX2_WHOLE_ROWS, 0, 1);
        else
            TILES16(group, flush, AVX2_ROWS, 0, 0);
#undef TILES16
    }
}

/* rows_avx2 compiled for each scale layout, and for signed activation codes (flush 0; one scale a row) */
static __attribute__((target("avx2,fma"))) void block_avx2(
    const uint8_t *a, const float *a_scale, const int8_t *w, const int32_t *corr, const float *w_scale,
    const float *h, int64_t rank, const float *up, const float *bias, int64_t r0, int64_t r1, int64_t p0, int64_t p1,
    int64_t cols, int64_t k, int64_t group, int64_t flush, int row_scales, const int8_t *table, int8_t *scratch,
    float *out, int row_major, int32_t offset) {
    if (row_major == 1 && r1 - r0 <= AVX2_DOT_ROWS) /* (the entry's check: signed codes, one scale a row, one group) */
        dot_rows_avx2(a, a_scale, w, w_scale, bias, r0, r1, 32 * p0, 32 * p1 < cols ? 32 * p1 : cols, cols, k, out);
    else if (!flush) /* signed codes: packed byte codes or nibbles, or row-major byte codes (row_major 1) */
        rows_avx2(a, a_scale, w, corr, w_scale, h, rank, up, bias, r0, r1, p0, p1, cols, k, group, 1, 1, table,
                  scratch, out, 1, row_major, 0);
    else if (row_scales)
        rows_avx2(a, a_scale, w, corr, w_scale, h, rank, up, bias, r0, r1, p0, p1, cols, k, group, flush, 1, table,
                  scratch, out, 0, row_major, offset);
    else
        rows_avx2(a, a_scale, w, corr, w_scale, h, rank, up, bias, r0, r1, p0, p1, cols, k, group, flush, 0, table,
                  scratch, out, 0, row_major, offset);
}
#endif

#if defined(__AVX512F__) && defined(__GNUC__)
#define GROUP_GEMM_512 1

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline
/* acc += x (unsigned bytes) . w (signed bytes), in place: GCC 12's intrinsic (_mm512_dpbusd_epi32) copies the
 * accumulators about (moves and stack spills in the loops of tile and dot_tile); the instruction itself does not */
#define DPBUSD(acc, x, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w))
/* row-major weights: fewer rows than this a thread run dot_tile, more pack each pair once for the tiles */
#define DOT_ROWS 24
/* grouped row-major nibbles: up to this many rows a thread dot_tile_groups (one thread, weights read from memory:
 * at 4 rows 1.6-2.7x the packed copy's time against 1.8-3.3x packed per call, at 8 rows 2.3-2.5x against 1.5-2.5x) */
#define GROUP_DOT_ROWS 4

/* rows [0, R) x output channels [c0, c0 + 32) of the product (two blocks of 16), all groups; corr: the pair's
 * corrections (its first channel's in row 0), rows corr_stride apart */
static VNNI void tile(const uint8_t *a, int64_t k, const float *a_scale, int64_t groups, int64_t group,
                      const int8_t *w0, const int8_t *w1, const int32_t *corr, int64_t corr_stride,
                      const float *w_scale, int64_t cols_p, const float *h, int64_t rank, const float *up,
                      const float *bias, float *out, int64_t cols, int64_t c0, const int rows, const int planes,
                      const int row_scales, const __m512i lut, const int nibbles) {
    __m512 sum[6][2];
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int r = 0; r < rows; ++r) sum[r][0] = sum[r][1] = _mm512_setzero_ps();
    const int64_t quads = group / 4;
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t row = planes * g; /* the group's (first plane's) row of corr and w_scale */
        const __m512i start0 = _mm512_loadu_si512(corr + row * corr_stride);
        const __m512i start1 = _mm512_loadu_si512(corr + row * corr_stride + 16);
        __m512i acc[6][2];
        for (int r = 0; r < rows; ++r) {
            acc[r][0] = start0;
            acc[r][1] = start1;
        }
        for (int plane = 0; plane < planes; ++plane) {
            if (plane) { /* the hi plane's sums times 256, the lo plane's correction */
                const __m512i lo0 = _mm512_loadu_si512(corr + (row + 1) * corr_stride);
                const __m512i lo1 = _mm512_loadu_si512(corr + (row + 1) * corr_stride + 16);
                for (int r = 0; r < rows; ++r) {
                    acc[r][0] = _mm512_add_epi32(_mm512_slli_epi32(acc[r][0], 8), lo0);
                    acc[r][1] = _mm512_add_epi32(_mm512_slli_epi32(acc[r][1], 8), lo1);
                }
            }
            const int8_t *v0 = w0 + (row + plane) * quads * 64, *v1 = w1 + (row + plane) * quads * 64;
            for (int64_t q = 0; q < quads; ++q) {
                __m512i b0, b1;
                if (nibbles) { /* one load of both blocks' 4-bit indices, each looked up in the 16-byte table */
                    const __m512i n = _mm512_loadu_si512(v0 + q * 64);
                    b0 = _mm512_shuffle_epi8(lut, _mm512_and_si512(n, low));
                    b1 = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(n, 4), low));
                } else {
                    b0 = _mm512_loadu_si512(v0 + q * 64);
                    b1 = _mm512_loadu_si512(v1 + q * 64);
                }
                for (int r = 0; r < rows; ++r) {
                    int32_t four;
                    memcpy(&four, a + r * k + 4 * (g * quads + q), sizeof four);
                    const __m512i x = _mm512_set1_epi32(four);
                    DPBUSD(acc[r][0], x, b0);
                    DPBUSD(acc[r][1], x, b1);
                }
            }
        }
        const __m512 s0 = _mm512_loadu_ps(w_scale + row * cols_p + c0);
        const __m512 s1 = _mm512_loadu_ps(w_scale + row * cols_p + c0 + 16);
        for (int r = 0; r < rows; ++r) {
            if (row_scales) { /* the sums times w_scale added up, then times the row's scale: dequantize_groups */
                sum[r][0] = _mm512_add_ps(sum[r][0], _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][0]), s0));
                sum[r][1] = _mm512_add_ps(sum[r][1], _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][1]), s1));
            } else {
                const __m512 sa = _mm512_set1_ps(a_scale[r * groups + g]);
                sum[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][0]), _mm512_mul_ps(s0, sa), sum[r][0]);
                sum[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][1]), _mm512_mul_ps(s1, sa), sum[r][1]);
            }
        }
    }
    for (int r = 0; r < rows && row_scales; ++r) {
        const __m512 sa = _mm512_set1_ps(a_scale[r]);
        sum[r][0] = _mm512_mul_ps(sum[r][0], sa);
        sum[r][1] = _mm512_mul_ps(sum[r][1], sa);
    }
    for (int64_t j = 0; j < rank; ++j) { /* the low-rank branch: h [rows, rank] times up [rank, cols_p] */
        const __m512 u0 = _mm512_loadu_ps(up + j * cols_p + c0), u1 = _mm512_loadu_ps(up + j * cols_p + c0 + 16);
        for (int r = 0; r < rows; ++r) {
            const __m512 hv = _mm512_set1_ps(h[r * rank + j]);
            sum[r][0] = _mm512_fmadd_ps(hv, u0, sum[r][0]);
            sum[r][1] = _mm512_fmadd_ps(hv, u1, sum[r][1]);
        }
    }
    const int64_t left = cols - c0;
    const __mmask16 m0 = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    const __mmask16 m1 = left >= 32   ? (__mmask16)0xffff
                         : left <= 16 ? (__mmask16)0
                                      : (__mmask16)((1u << (left - 16)) - 1u);
    const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(m0, bias + c0) : _mm512_setzero_ps();
    const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(m1, bias + c0 + 16) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
        _mm512_mask_storeu_ps(out + r * cols + c0, m0, _mm512_add_ps(sum[r][0], bias0));
        _mm512_mask_storeu_ps(out + r * cols + c0 + 16, m1, _mm512_add_ps(sum[r][1], bias1));
    }
}

/* 32 nibbles (each byte's low nibble the even input) as the 64 bytes 0-15 of their inputs in order */
static VNNI __m512i nibble_bytes(const __m256i v) {
    const __m512i x = _mm512_cvtepu8_epi16(v); /* 16-bit word j: byte j */
    const __m512i lo = _mm512_and_si512(x, _mm512_set1_epi16(0x000f)); /* input 2j in the word's low byte */
    const __m512i hi = _mm512_and_si512(_mm512_slli_epi16(x, 4), _mm512_set1_epi16(0x0f00)); /* 2j + 1: high */
    return _mm512_or_si512(lo, hi);
}

/* 32 offset nibbles (code + 8) as the 64 byte codes of their inputs in order */
static VNNI __m512i nibble_codes(const __m256i v) {
    return _mm512_sub_epi8(nibble_bytes(v), _mm512_set1_epi8(8));
}

/* 64 byte codes of row-major weights from byte `i` (a multiple of 4) of the row at w (byte codes, or offset nibbles:
 * from byte i / 2 there) */
static VNNI __m512i row_codes(const int8_t *w, int64_t i, const int nibbles) {
    return nibbles ? nibble_codes(_mm256_loadu_si256((const __m256i *)(w + i / 2)))
                   : _mm512_loadu_si512(w + i);
}

/* the first `n` (< 64, a multiple of 4) of them, the rest zero codes (nothing read past them) */
static VNNI __m512i row_codes_masked(const int8_t *w, int64_t i, int64_t n, const int nibbles) {
    const __mmask64 m = (__mmask64)((1ull << n) - 1ull);
    if (!nibbles) return _mm512_maskz_loadu_epi8(m, w + i);
    const __m256i v = _mm256_maskz_loadu_epi8((__mmask32)((1ull << (n / 2)) - 1ull), w + i / 2);
    return _mm512_maskz_mov_epi8(m, nibble_codes(v));
}

/* 64 byte codes of row-major weights as pack_block reads them (`layout` 0: byte codes, 1: offset nibbles, 2: nibbles
 * whose codes are lut[nibble]), from byte `i` of the row at w; the _masked form: the first `n`, the rest zero codes */
static VNNI __m512i stored_codes(const int8_t *w, int64_t i, const int layout, const __m512i lut) {
    return layout == 2 ? _mm512_shuffle_epi8(lut, nibble_bytes(_mm256_loadu_si256((const __m256i *)(w + i / 2))))
                       : row_codes(w, i, layout);
}

static VNNI __m512i stored_codes_masked(const int8_t *w, int64_t i, int64_t n, const int layout, const __m512i lut) {
    if (layout != 2) return row_codes_masked(w, i, n, layout);
    const __m256i v = _mm256_maskz_loadu_epi8((__mmask32)((1ull << (n / 2)) - 1ull), w + i / 2);
    return _mm512_maskz_mov_epi8((__mmask64)((1ull << n) - 1ull), _mm512_shuffle_epi8(lut, nibble_bytes(v)));
}

/* quads j0 .. j0 + n of a block (r: transposed, each vector one quad of 16 channels) into dst, and with `corr` the
 * channels' code sums per group (`per_group` quads) into `sum`, each group's times -offset into its corr row (32
 * apart) */
static VNNI void store_quads(const __m512i *r, int64_t j0, int64_t n, int8_t *dst, int32_t *corr, int64_t per_group,
                             const __m512i neg_offset, __m512i *sum) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t j = 0; j < n; ++j) {
        _mm512_storeu_si512(dst + (j0 + j) * 64, r[j]);
        if (!corr) continue;
        DPBUSD(*sum, ones, r[j]);
        if ((j0 + j + 1) % per_group == 0) {
            _mm512_storeu_si512(corr + ((j0 + j + 1) / per_group - 1) * 32, _mm512_mullo_epi32(*sum, neg_offset));
            *sum = _mm512_setzero_si512();
        }
    }
}

/* output channels [c0, c0 + 16) of row-major weights w (`layout` 0: byte codes [cols, k]; 1: offset nibbles
 * [cols, k / 2]; 2: nibbles [cols, k / 2] looked up in lut, the table broadcast to each 128-bit lane) in the tiles'
 * block layout [k / 4, 16, 4] of byte codes (what cpu_kernels.pack_weight stores), into dst; channels past `cols`
 * zero codes, as that padding. With `corr` (not NULL): the block's corrections too, -offset times each channel's sum
 * of codes per group of `group` inputs, [k / group] rows 32 apart (pack_weight's corr, computed here) */
static VNNI void pack_block(const int8_t *w, int64_t cols, int64_t k, int64_t c0, int8_t *dst, const int layout,
                            const __m512i lut, int32_t *corr, int64_t group, int32_t offset) {
    const int64_t quads = k / 4, stride = layout ? k / 2 : k;
    const __m512i neg_offset = _mm512_set1_epi32(-offset);
    __m512i sum = _mm512_setzero_si512();
    int64_t q = 0;
    for (; q + 16 <= quads; q += 16) { /* 16 quads of 16 channels: one transpose */
        __m512i r[16];
        for (int c = 0; c < 16; ++c)
            r[c] = c0 + c < cols ? stored_codes(w + (c0 + c) * stride, 4 * q, layout, lut) : _mm512_setzero_si512();
        transpose16(r);
        store_quads(r, q, 16, dst, corr, group / 4, neg_offset, &sum);
    }
    if (q < quads) { /* the last quads (fewer than 16), masked */
        __m512i r[16];
        for (int c = 0; c < 16; ++c)
            r[c] = c0 + c < cols ? stored_codes_masked(w + (c0 + c) * stride, 4 * q, 4 * (quads - q), layout, lut)
                                 : _mm512_setzero_si512();
        transpose16(r);
        store_quads(r, q, quads - q, dst, corr, group / 4, neg_offset, &sum);
    }
}

/* one channel's stored row (wc: byte codes, or offset nibbles) times `rows` (1-4) activation rows x0.. (k bytes each):
 * row r's 16 partial int32 sums into *t<r>. 4 / rows accumulators a row take alternate 64-input chunks (dpbusd's
 * latency hidden with few rows). */
static VNNI void channel_dot(const int8_t *wc, const uint8_t *x0, const uint8_t *x1, const uint8_t *x2,
                             const uint8_t *x3, int64_t k, const int rows, const int nibbles, __m512i *t0, __m512i *t1,
                             __m512i *t2, __m512i *t3) {
    const int splits = rows == 1 ? 4 : rows == 2 ? 2 : 1;
    /* a<r><j>: row r, chunks j mod splits; named (an array of them GCC kept in memory) */
    __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a20 = a00, a30 = a00;
    /* 64 inputs from byte `at` of the row: rows 0-3 into A0-A3 (those past `rows` untouched) */
#define CHUNK(at, WLOAD, XLOAD, A0, A1, A2, A3)       \
    {                                                 \
        const __m512i v = WLOAD(at);                  \
        DPBUSD(A0, XLOAD(x0, at), v);                 \
        if (rows > 1) DPBUSD(A1, XLOAD(x1, at), v);   \
        if (rows > 2) DPBUSD(A2, XLOAD(x2, at), v);   \
        if (rows > 3) DPBUSD(A3, XLOAD(x3, at), v);   \
    }
#define W(at) row_codes(wc, at, nibbles)
#define X(x, at) _mm512_loadu_si512((x) + (at))
    int64_t i = 0;
    for (; i + 64 * splits <= k; i += 64 * splits) {
        if (rows == 1) {
            CHUNK(i, W, X, a00, a10, a20, a30) CHUNK(i + 64, W, X, a01, a10, a20, a30)
            CHUNK(i + 128, W, X, a02, a10, a20, a30) CHUNK(i + 192, W, X, a03, a10, a20, a30)
        } else if (rows == 2) {
            CHUNK(i, W, X, a00, a10, a20, a30) CHUNK(i + 64, W, X, a01, a11, a20, a30)
        } else {
            CHUNK(i, W, X, a00, a10, a20, a30)
        }
    }
    for (; i + 64 <= k; i += 64) CHUNK(i, W, X, a00, a10, a20, a30)
#undef X
#undef W
    if (i < k) { /* the last k - i (< 64) inputs, masked */
        const __mmask64 m = (__mmask64)((1ull << (k - i)) - 1ull);
#define W(at) row_codes_masked(wc, at, k - i, nibbles)
#define X(x, at) _mm512_maskz_loadu_epi8(m, (x) + (at))
        CHUNK(i, W, X, a00, a10, a20, a30)
#undef X
#undef W
    }
#undef CHUNK
    *t0 = _mm512_add_epi32(_mm512_add_epi32(a00, a01), _mm512_add_epi32(a02, a03));
    *t1 = _mm512_add_epi32(a10, a11);
    *t2 = a20;
    *t3 = a30;
}

/* the mask of the channels [c0, c0 + 4) below `cols` */
static VNNI __mmask16 quartet_mask(int64_t cols, int64_t c0) {
    return (__mmask16)((1u << (cols - c0 < 4 ? (int)(cols - c0) : 4)) - 1u);
}

/* the in-place dot products' last step: v (lane 4 r + c: row r and channel c0 + c, before the row's scale) times row
 * r's scale, plus the channel's bias, stored for rows [0, rows) and the channels below `cols` */
static VNNI void store_quartet(const __m512 v, const float *a_scale, const float *bias, float *out, int64_t cols,
                               int64_t c0, const int rows) {
    const __mmask16 cm = quartet_mask(cols, c0);
    const __m512 bias4 = _mm512_broadcast_f32x4(bias ? _mm_maskz_loadu_ps((__mmask8)cm, bias + c0) : _mm_setzero_ps());
    const __m512 rows4 = _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                                               _mm512_castps128_ps512(_mm_maskz_loadu_ps(
                                                   (__mmask8)((1u << rows) - 1u), a_scale)));
    float o[16];
    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_mul_ps(v, rows4), bias4));
    for (int r = 0; r < rows; ++r) /* (a memcpy of the channels' floats was a library call a row) */
        _mm_mask_storeu_ps(out + r * cols + c0, (__mmask8)cm, _mm_loadu_ps(o + 4 * r));
}

/* Row-major weights (byte codes or offset nibbles) with one group and one activation scale a row, rows [0, R)
 * (R <= 4) x channels [c0, c0 + 4): vpdpbusd on 64 consecutive inputs of a row and of a channel (no packing), each
 * product's 16 partial sums added up at the end in one 16 -> 1 tree, then the tiles' epilogue in the same order
 * ((0 + (corr + sum) * w_scale) * a_scale + bias): the same numbers. For few rows, where packing each pair per call
 * would cost more than the products. */
static VNNI void dot_tile(const uint8_t *a, int64_t k, const float *a_scale, const int8_t *w, const int32_t *corr,
                          const float *w_scale, const float *bias, float *out, int64_t cols, int64_t c0,
                          const int rows, const int nibbles, const int sequential) {
    /* channels past `cols` read the last one's codes again (their sums are not stored) */
    const int64_t stride = nibbles ? k / 2 : k;
    const int8_t *w0 = w + c0 * stride, *w1 = w + (c0 + 1 < cols ? c0 + 1 : cols - 1) * stride;
    const int8_t *w2 = w + (c0 + 2 < cols ? c0 + 2 : cols - 1) * stride;
    const int8_t *w3 = w + (c0 + 3 < cols ? c0 + 3 : cols - 1) * stride;
    const uint8_t *x0 = a, *x1 = a + (rows > 1) * k, *x2 = a + 2 * (rows > 2) * k, *x3 = a + 3 * (rows > 3) * k;
    __m512i s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33; /* s<r><c> */
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 =
        _mm512_setzero_si512();
    if (sequential || rows <= 2) { /* one channel after the other: its row one sequential stream of memory (the
                                    * weights' bandwidth, cold, against 2/3 of it for 4 rows read in step) */
        channel_dot(w0, x0, x1, x2, x3, k, rows, nibbles, &s00, &s10, &s20, &s30);
        channel_dot(w1, x0, x1, x2, x3, k, rows, nibbles, &s01, &s11, &s21, &s31);
        channel_dot(w2, x0, x1, x2, x3, k, rows, nibbles, &s02, &s12, &s22, &s32);
        channel_dot(w3, x0, x1, x2, x3, k, rows, nibbles, &s03, &s13, &s23, &s33);
    } else { /* the 4 channels in step: each activation load serves 4 products (fewer loads than products) */
#define ROW(r, x)           \
    DPBUSD(s##r##0, x, v0); \
    DPBUSD(s##r##1, x, v1); \
    DPBUSD(s##r##2, x, v2); \
    DPBUSD(s##r##3, x, v3);
#define STEP(XLOAD, WLOAD)                                                             \
    {                                                                                  \
        const __m512i v0 = WLOAD(w0), v1 = WLOAD(w1), v2 = WLOAD(w2), v3 = WLOAD(w3);  \
        const __m512i y0 = XLOAD(x0), y1 = XLOAD(x1), y2 = XLOAD(x2);                  \
        ROW(0, y0) ROW(1, y1) ROW(2, y2)                                               \
        if (rows > 3) { const __m512i y3 = XLOAD(x3); ROW(3, y3) }                     \
    }
        int64_t i = 0;
        for (; i + 64 <= k; i += 64) {
#define X(p) _mm512_loadu_si512((p) + i)
#define W(p) row_codes(p, i, nibbles)
            STEP(X, W)
#undef W
#undef X
        }
        if (i < k) { /* the last k - i (< 64) inputs, masked */
            const __mmask64 m = (__mmask64)((1ull << (k - i)) - 1ull);
#define X(p) _mm512_maskz_loadu_epi8(m, (p) + i)
#define W(p) row_codes_masked(p, i, k - i, nibbles)
            STEP(X, W)
#undef W
#undef X
        }
#undef STEP
#undef ROW
    }
    /* 16 -> 1: p lanes 0-1 hold one accumulator's halves added, lanes 2-3 the next one's; q_c lane r the four partial
     * sums of row r and channel c0 + c (accumulator s<r><c>); then within the lanes: lane 4 r + c of the sums */
#define PAIR(u, v) _mm512_add_epi32(_mm512_shuffle_i64x2(u, v, 0x44), _mm512_shuffle_i64x2(u, v, 0xee))
#define QUAD(u, v) _mm512_add_epi32(_mm512_shuffle_i32x4(u, v, 0x88), _mm512_shuffle_i32x4(u, v, 0xdd))
    const __m512i q0 = QUAD(PAIR(s00, s10), PAIR(s20, s30)), q1 = QUAD(PAIR(s01, s11), PAIR(s21, s31));
    const __m512i q2 = QUAD(PAIR(s02, s12), PAIR(s22, s32)), q3 = QUAD(PAIR(s03, s13), PAIR(s23, s33));
#undef PAIR
#undef QUAD
    const __m512i h01 = _mm512_add_epi32(_mm512_unpacklo_epi32(q0, q1), _mm512_unpackhi_epi32(q0, q1));
    const __m512i h23 = _mm512_add_epi32(_mm512_unpacklo_epi32(q2, q3), _mm512_unpackhi_epi32(q2, q3));
    const __m512i sums = _mm512_add_epi32(_mm512_unpacklo_epi64(h01, h23), _mm512_unpackhi_epi64(h01, h23));
    /* the epilogue on all 16: channel terms repeated in each row's lanes, each row's scale in its four */
    const __mmask8 cm = (__mmask8)quartet_mask(cols, c0);
    const __m512i corr4 = _mm512_broadcast_i32x4(_mm_maskz_loadu_epi32(cm, corr + c0));
    const __m512 scale4 = _mm512_broadcast_f32x4(_mm_maskz_loadu_ps(cm, w_scale + c0));
    store_quartet(_mm512_add_ps(_mm512_setzero_ps(), _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(corr4, sums)),
                                                                   scale4)),
                  a_scale, bias, out, cols, c0, rows);
}

/* one channel's stored nibbles through `lut` (pack_block's layout 2) in groups of `group` inputs (a multiple of 64)
 * times `rows` (1-4) activation rows x0..: per group the int32 sums of its chunks (lane 0 starting from the group's
 * correction corr[g * cols_p]), converted lane-wise and times the group's scale w_scale[g * cols_p] into row r's 16
 * fp32 lane sums *f<r>; with one row two sums alternate by group (the fused add's latency) */
static VNNI void channel_dot_groups(const int8_t *wc, const uint8_t *x0, const uint8_t *x1, const uint8_t *x2,
                                    const uint8_t *x3, int64_t k, int64_t group, const int32_t *corr,
                                    const float *w_scale, int64_t cols_p, const int rows, const __m512i lut,
                                    __m512 *f0, __m512 *f1, __m512 *f2, __m512 *f3) {
    __m512 s0 = _mm512_setzero_ps(), s0b = s0, s1 = s0, s2 = s0, s3 = s0;
    for (int64_t g = 0, i0 = 0; i0 < k; ++g, i0 += group) {
        const __m512i start = _mm512_castsi128_si512(_mm_cvtsi32_si128(corr[g * cols_p]));
        __m512i a0 = start, a1 = start, a2 = start, a3 = start;
        for (int64_t i = i0; i < i0 + group; i += 64) {
            const __m512i v = stored_codes(wc, i, 2, lut);
            DPBUSD(a0, _mm512_loadu_si512(x0 + i), v);
            if (rows > 1) DPBUSD(a1, _mm512_loadu_si512(x1 + i), v);
            if (rows > 2) DPBUSD(a2, _mm512_loadu_si512(x2 + i), v);
            if (rows > 3) DPBUSD(a3, _mm512_loadu_si512(x3 + i), v);
        }
        const __m512 scale = _mm512_set1_ps(w_scale[g * cols_p]);
        if (rows == 1 && (g & 1))
            s0b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), scale, s0b);
        else
            s0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), scale, s0);
        if (rows > 1) s1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), scale, s1);
        if (rows > 2) s2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2), scale, s2);
        if (rows > 3) s3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a3), scale, s3);
    }
    *f0 = _mm512_add_ps(s0, s0b);
    *f1 = s1;
    *f2 = s2;
    *f3 = s3;
}

/* dot_tile for weights in groups (a multiple of 64 inputs, one activation scale a row): rows [0, R) (R <= 4) x
 * channels [c0, c0 + 4), each channel's stored row read in place (channel_dot_groups), each (row, channel)'s 16 fp32
 * lane sums added up in one 16 -> 1 tree, times the row's scale, plus the bias. The tiles' numbers up to fp32
 * summation order (they convert each group's whole sum): for few rows, where packing each pair per call would cost
 * several times the products. */
static VNNI void dot_tile_groups(const uint8_t *a, int64_t k, int64_t group, const float *a_scale, const int8_t *w,
                                 const int32_t *corr, const float *w_scale, int64_t cols_p, const float *bias,
                                 float *out, int64_t cols, int64_t c0, const int rows, const __m512i lut) {
    const uint8_t *x0 = a, *x1 = a + (rows > 1) * k, *x2 = a + 2 * (rows > 2) * k, *x3 = a + 3 * (rows > 3) * k;
    __m512 s[4][4]; /* s[r][c] */
    for (int c = 0; c < 4; ++c) {
        const int64_t n = c0 + c < cols ? c0 + c : cols - 1; /* past `cols`: the last channel again, not stored */
        channel_dot_groups(w + n * (k / 2), x0, x1, x2, x3, k, group, corr + n, w_scale + n, cols_p, rows, lut,
                           &s[0][c], &s[1][c], &s[2][c], &s[3][c]);
    }
    for (int r = rows; r < 4; ++r)
        for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
    /* 16 -> 1 as dot_tile's tree: lane 4 r + c of `sums` the sum of s[r][c] */
#define PAIR(u, v) _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x44), _mm512_shuffle_f32x4(u, v, 0xee))
#define QUAD(u, v) _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x88), _mm512_shuffle_f32x4(u, v, 0xdd))
    __m512 q[4];
    for (int c = 0; c < 4; ++c) q[c] = QUAD(PAIR(s[0][c], s[1][c]), PAIR(s[2][c], s[3][c]));
#undef PAIR
#undef QUAD
    const __m512 h01 = _mm512_add_ps(_mm512_unpacklo_ps(q[0], q[1]), _mm512_unpackhi_ps(q[0], q[1]));
    const __m512 h23 = _mm512_add_ps(_mm512_unpacklo_ps(q[2], q[3]), _mm512_unpackhi_ps(q[2], q[3]));
    const __m512d d01 = _mm512_castps_pd(h01), d23 = _mm512_castps_pd(h23);
    store_quartet(_mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                                _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23))),
                  a_scale, bias, out, cols, c0, rows);
}

/* dot_tile over rows [r0, r1) x channel pairs [p0, p1): up to 4 rows one channel at a time (the weights read once,
 * as one stream: they come from memory), more 4 channels in step (each 4-channel group's rows stay in cache for the
 * next tile of rows; a tile of 1-2 rows at the end one channel at a time) */
static VNNI void rows_dot(const uint8_t *a, const float *a_scale, const int8_t *w, const int32_t *corr,
                          const float *w_scale, const float *bias, int64_t r0, int64_t r1, int64_t p0, int64_t p1,
                          int64_t cols, int64_t k, float *out, const int nibbles) {
    const int64_t c1 = 32 * p1 < cols ? 32 * p1 : cols;
    for (int64_t c = 32 * p0; c < c1; c += 4) {
        int64_t r = r0;
#define TILE(n, seq) dot_tile(a + r * k, k, a_scale + r, w, corr, w_scale, bias, out + r * cols, cols, c, n, nibbles, \
                              seq)
#define LAST(n, seq) case n: TILE(n, seq); break;
        if (r1 - r0 <= 4) {
            switch (r1 - r0) {
                LAST(1, 1) LAST(2, 1) LAST(3, 1) LAST(4, 1)
            default: break;
            }
            continue;
        }
        for (; r + 4 <= r1; r += 4) TILE(4, 0);
        switch (r1 - r) {
            LAST(1, 1) LAST(2, 1) LAST(3, 0)
        default: break;
        }
#undef LAST
#undef TILE
    }
}

/* rows_dot compiled for each row-major layout (byte codes, offset nibbles), in a function of its own (inlined into
 * block_vnni's other paths, its accumulators were spilled) */
static __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), noinline)) void rows_dot_any(
    const uint8_t *a, const float *a_scale, const int8_t *w, const int32_t *corr, const float *w_scale,
    const float *bias, int64_t r0, int64_t r1, int64_t p0, int64_t p1, int64_t cols, int64_t k, float *out,
    int nibbles) {
    if (nibbles)
        rows_dot(a, a_scale, w, corr, w_scale, bias, r0, r1, p0, p1, cols, k, out, 1);
    else
        rows_dot(a, a_scale, w, corr, w_scale, bias, r0, r1, p0, p1, cols, k, out, 0);
}

/* dot_tile_groups over rows [r0, r1) x channel pairs [p0, p1) of stored nibbles through `table`, 4 channels x up to
 * 4 rows at a time, in a function of its own as rows_dot_any */
static __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), noinline)) void rows_dot_groups(
    const uint8_t *a, const float *a_scale, const int8_t *w, const int32_t *corr, const float *w_scale,
    const float *bias, int64_t r0, int64_t r1, int64_t p0, int64_t p1, int64_t cols, int64_t k, int64_t group,
    float *out, const int8_t *table) {
    const int64_t c1 = 32 * p1 < cols ? 32 * p1 : cols, cols_p = (cols + 31) / 32 * 32;
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)table));
    for (int64_t c = 32 * p0; c < c1; c += 4)
        for (int64_t r = r0; r < r1; r += 4) {
#define TILE(n) dot_tile_groups(a + r * k, k, group, a_scale + r, w, corr, w_scale, cols_p, bias, out + r * cols, \
                                cols, c, n, lut)
            switch (r1 - r < 4 ? (int)(r1 - r) : 4) {
            case 1: TILE(1); break;
            case 2: TILE(2); break;
            case 3: TILE(3); break;
            default: TILE(4); break;
            }
#undef TILE
        }
}

/* rows [r0, r1) x channel pairs [p0, p1) (32 channels each): each pair's weights (k x 32 bytes a plane, k x 16 as
 * nibbles) stay in cache while the rows stream past them in tiles of TILE_ROWS; `row_major` (1: byte codes [cols, k],
 * 2: offset nibbles [cols, k / 2], 3: nibbles [cols, k / 2] through `table`, as stored): each pair packed into
 * `scratch` (k x 32 bytes) first, and with `corr` NULL its corrections beside (after the k x 32 bytes: [k / group, 32]
 * int32, -offset times the codes' group sums) */
static VNNI void rows_vnni(const uint8_t *a, const float *a_scale, const int8_t *w, const int32_t *corr,
                           const float *w_scale, const float *h, int64_t rank, const float *up, const float *bias,
                           int64_t r0, int64_t r1, int64_t p0, int64_t p1, int64_t cols, int64_t k, int64_t group,
                           float *out, const int planes, const int row_scales, const int8_t *table,
                           const int nibbles, const int row_major, int8_t *scratch, int32_t offset) {
    const int64_t groups = k / group, cols_p = (cols + 31) / 32 * 32, panel = planes * (k / 4) * 64;
    const int64_t stride = row_scales ? 1 : groups; /* a_scale's entries a row */
    const __m512i lut = nibbles || row_major == 3 ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)table))
                                                  : _mm512_setzero_si512();
    int32_t *own = row_major && !corr ? (int32_t *)(scratch + 2 * panel) : NULL; /* the pairs' corrections */
    for (int64_t p = p0; p < p1; ++p) {
        const int8_t *w0 = w + (nibbles ? 1 : 2) * p * panel, *w1 = w0 + panel;
        if (row_major) { /* the pair's two blocks packed here, read by every row tile below */
            pack_block(w, cols, k, 32 * p, scratch, row_major - 1, lut, own, group, offset);
            pack_block(w, cols, k, 32 * p + 16, scratch + panel, row_major - 1, lut, own ? own + 16 : NULL, group,
                       offset);
            w0 = scratch;
            w1 = scratch + panel;
        }
        const int32_t *pc = own ? own : corr + 32 * p; /* the pair's corrections, rows pc_stride apart */
        const int64_t pc_stride = own ? 32 : cols_p;
        int64_t r = r0;
        for (; r + TILE_ROWS <= r1; r += TILE_ROWS)
            tile(a + r * k, k, a_scale + r * stride, groups, group, w0, w1, pc, pc_stride, w_scale, cols_p,
                 h + r * rank, rank, up, bias, out + r * cols, cols, 32 * p, TILE_ROWS, planes, row_scales, lut,
                 nibbles);
        switch (r1 - r) {
#define LAST(n) case n: tile(a + r * k, k, a_scale + r * stride, groups, group, w0, w1, pc, pc_stride, w_scale, \
                             cols_p, h + r * rank, rank, up, bias, out + r * cols, cols, 32 * p, n, planes, \
                             row_scales, lut, nibbles); break;
            LAST(1) LAST(2) LAST(3) LAST(4) LAST(5)
#undef LAST
        default: break;
        }
    }
}

/* rows_vnni compiled for each weight layout (byte codes, two byte planes, nibbles through `table`, row-major byte
 * codes, offset nibbles or nibbles through `table`) and scale layout (constants in the tiles' loops) */
static __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void block_vnni(
    const uint8_t *a, const float *a_scale, const int8_t *w, const int32_t *corr, const float *w_scale,
    const float *h, int64_t rank, const float *up, const float *bias, int64_t r0, int64_t r1, int64_t p0, int64_t p1,
    int64_t cols, int64_t k, int64_t group, float *out, int planes, int row_scales, const int8_t *table,
    int row_major, int8_t *scratch, int32_t offset) {
#define ROWS(planes, row_scales, nibbles, row_major) \
    rows_vnni(a, a_scale, w, corr, w_scale, h, rank, up, bias, r0, r1, p0, p1, cols, k, group, out, planes, \
              row_scales, table, nibbles, row_major, scratch, offset)
    if (planes == 2)
        ROWS(2, 0, 0, 0);
    else if (row_major == 3 && corr && r1 - r0 <= GROUP_DOT_ROWS && row_scales && !rank && group % 64 == 0)
        rows_dot_groups(a, a_scale, w, corr, w_scale, bias, r0, r1, p0, p1, cols, k, group, out, table);
    else if (row_major == 3)
        row_scales ? ROWS(1, 1, 0, 3) : ROWS(1, 0, 0, 3);
    else if (table)
        row_scales ? ROWS(1, 1, 1, 0) : ROWS(1, 0, 1, 0);
    else if (row_major && corr && r1 - r0 < DOT_ROWS && row_scales && group == k && !rank)
        rows_dot_any(a, a_scale, w, corr, w_scale, bias, r0, r1, p0, p1, cols, k, out, row_major == 2);
    else if (row_major == 2)
        row_scales ? ROWS(1, 1, 0, 2) : ROWS(1, 0, 0, 2);
    else if (row_major)
        row_scales ? ROWS(1, 1, 0, 1) : ROWS(1, 0, 0, 1);
    else
        row_scales ? ROWS(1, 1, 0, 0) : ROWS(1, 0, 0, 0);
#undef ROWS
}
#endif

/* The path compressdit_group_gemm runs here: 2 AVX512-VNNI (built with AVX-512, the vector ISA torch runs, on a CPU
 * with AVX512-VNNI), 1 AVX2 (built with AVX2 or AVX-512, a CPU with AVX2 and FMA), 0 none */
static int group_gemm_path(void) {
#ifdef GROUP_GEMM
    __builtin_cpu_init();
#ifdef GROUP_GEMM_512
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) return 2;
#endif
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#else
    return 0;
#endif
}

/* group_gemm_path, asked of the CPU once (every GEMM call reads it) */
int compressdit_group_gemm_ready(void) {
    static int path = -1; /* a race writes the same value */
    if (path < 0) path = group_gemm_path();
    return path;
}

#ifdef GROUP_GEMM
static void block(int isa, const uint8_t *a, const float *a_scale, const int8_t *w, const int32_t *corr,
                  const float *w_scale, const float *h, int64_t rank, const float *up, const float *bias, int64_t r0,
                  int64_t r1, int64_t p0, int64_t p1, int64_t cols, int64_t k, int64_t group, int64_t flush,
                  int planes, int row_scales, const int8_t *table, int row_major, int8_t *scratch, int32_t offset,
                  float *out) {
#ifdef GROUP_GEMM_512
    if (isa == 2) {
        block_vnni(a, a_scale, w, corr, w_scale, h, rank, up, bias, r0, r1, p0, p1, cols, k, group, out, planes,
                   row_scales, table, row_major, scratch, offset);
        return;
    }
#endif
    (void)planes; /* 1 here: the entry refuses 2 weight planes without VNNI */
    (void)isa;
    /* (row_major 0; 1 with signed codes; 3 with offset ones: the entry's check) */
    block_avx2(a, a_scale, w, corr, w_scale, h, rank, up, bias, r0, r1, p0, p1, cols, k, group, flush, row_scales,
               table, scratch, out, row_major, offset);
}
#endif

/* out [rows, cols] fp32 (see the top of this file; k and group multiples of 4, group dividing k; bias NULL or
 * [cols]), plus h @ up where rank > 0 (SVDQuant's branch: h fp32 [rows, rank], up fp32 [rank, cols_p]); `flush`:
 * the AVX2 path's quads of inputs summed in 16 bits (see tile16; >= 1), or 0 (the AVX2 path, one scale a row): `a`
 * holds signed activation codes (int8, |code| <= 127, no offset: corr zeros), each product exact (tile16's
 * signed_a); `planes`: 1 (byte weights) or 2 (16-bit
 * weights, AVX512-VNNI only); `row_scales`: a_scale [rows], one a row, applied after the groups (see the top of
 * this file; byte weights only), else [rows, groups]; `table`: NULL, or the weights are 4-bit indices two a byte
 * (one plane: w [cols_p / 32, k / 4, 64], each byte's low nibble the first block of 16 channels' index and its high
 * nibble the second's) whose codes are table[index] (16 signed bytes: vpshufb's lookup; AVX512-VNNI in the tiles'
 * registers, AVX2 a block at a time into a buffer of each thread's); `row_major` (one plane; AVX512-VNNI, or on
 * AVX2 1 with signed codes, one scale a row and one group, or 3 with offset codes): w is
 * the weight as a checkpoint stores it, 1: byte codes [cols, k], 2: offset nibbles [cols, k / 2] (code + 8, each
 * byte's low nibble the even input), 3: nibbles [cols, k / 2] whose codes are table[nibble] (NVFP4's E2M1 elements;
 * `table` given only here), each pair of blocks (AVX2: each block) packed when its turn comes into a buffer of each
 * thread's (k x 32 bytes), or (1-2, one group) few rows multiplied in place (AVX2: up to AVX2_DOT_ROWS a thread,
 * dot_rows_avx2): no packed copy of the weight is kept, the same numbers.
 * Rows split over
 * `threads` OpenMP threads in contiguous blocks of whole tiles where there are enough, else the channel pairs (for
 * row-major weights the pairs wherever there are two a thread: each pair packed once, not by every thread; DiT-XL/2's
 * NVFP4 6912 x 1152 at 512 rows on 2 threads 1.28x the packed copy's time split by rows, 0.95x by pairs): every
 * output computed alone, the same numbers on any number of threads (a row split gives each thread whole tiles, more
 * rows than dot_tile_groups takes: it runs on the calls of at most that many rows, whatever the thread count).
 * `corr` NULL (row-major weights only): each pair's corrections computed while it is packed, -`offset` (the
 * activation codes' offset, an integer) times its codes' group sums, into the thread's buffer ([k / group, 32] int32
 * after the pair): the same values, no [groups, cols_p] array kept (NVFP4's groups of 16: a quarter byte a weight);
 * calls of few rows then pack too (the in-place dot products read a given corr).
 * Returns 1 where not
 * compressdit_group_gemm_ready, for 2 planes or row-major weights not its AVX512-VNNI path, for corr NULL without
 * row-major weights, for flush 0 not on its AVX2 path or without row scales, or out of memory (the buffers). */
int compressdit_group_gemm(const uint8_t *a, const float *a_scale, const int8_t *w, const int32_t *corr,
                           const float *w_scale, const float *h, int64_t rank, const float *up, const float *bias,
                           int64_t rows, int64_t cols, int64_t k, int64_t group, int64_t flush, int64_t planes,
                           int32_t row_scales, const int8_t *table, int32_t row_major, int32_t offset, float *out,
                           int32_t threads) {
#ifdef GROUP_GEMM
    const int isa = compressdit_group_gemm_ready();
    if (!isa || planes < 1 || planes > 2 || (planes == 2 && (isa != 2 || row_scales)) || (table && planes != 1) ||
        (row_major && (planes != 1 || row_major > 3 || (row_major == 3) != (table != NULL))) ||
        (row_major && isa == 1 && !(row_major == 1 && !flush && group == k && !rank && corr) &&
         !(row_major == 3 && flush)) ||
        (!corr && !row_major) || flush < 0 || (!flush && (isa != 1 || !row_scales)))
        return 1;
    const int64_t pairs = (cols + 31) / 32;
    /* a thread's buffer: AVX2's decoded block of nibbles (k x 16), or a row-major pair packed (k x 32) and, without
     * corr, its corrections ([k / group, 32] int32) */
    const int64_t per_thread = row_major ? k * 32 + (corr ? 0 : (k / group) * 32 * (int64_t)sizeof(int32_t)) : k * 16;
    int8_t *scratch = NULL;
    if (((table && isa == 1) || row_major) &&
        !(scratch = (int8_t *)malloc((size_t)(per_thread * (threads > 1 ? threads : 1)))))
        return 1;
    if (threads <= 1 || rows * pairs < 2) {
        block(isa, a, a_scale, w, corr, w_scale, h, rank, up, bias, 0, rows, 0, pairs, cols, k, group, flush,
              (int)planes, row_scales, table, row_major, scratch, offset, out);
        free(scratch);
        return 0;
    }
    const int64_t tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
    if (tiles >= 2 * (int64_t)threads && !(row_major && pairs >= 2 * (int64_t)threads)) {
        const int64_t per = (tiles + threads - 1) / threads;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t t = 0; t < threads; ++t) {
            const int64_t r0 = t * per * TILE_ROWS, r1 = (t + 1) * per * TILE_ROWS;
            if (r0 < rows)
                block(isa, a, a_scale, w, corr, w_scale, h, rank, up, bias, r0, r1 < rows ? r1 : rows, 0, pairs, cols,
                      k, group, flush, (int)planes, row_scales, table, row_major,
                      scratch ? scratch + t * per_thread : NULL, offset, out);
        }
    } else {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t p = 0; p < pairs; ++p)
            block(isa, a, a_scale, w, corr, w_scale, h, rank, up, bias, 0, rows, p, p + 1, cols, k, group, flush,
                  (int)planes, row_scales, table, row_major, scratch ? scratch + THREAD_ID * per_thread : NULL, offset,
                  out);
    }
    free(scratch);
    return 0;
#else
    (void)a; (void)a_scale; (void)w; (void)corr; (void)w_scale; (void)h; (void)rank; (void)up; (void)bias;
    (void)rows; (void)cols; (void)k; (void)group; (void)flush; (void)planes; (void)row_scales; (void)table;
    (void)row_major; (void)offset; (void)out; (void)threads;
    return 1;
#endif
}

/* float_rows.c: the randomized Hadamard of each row, then its grid values as byte codes (codes not NULL) */
void compressdit_hadamard_rows(const float *x, const float *smooth, const int8_t *signs, int64_t rows, int64_t cols,
                               int64_t group, int32_t rule, float top, int32_t mantissa, int32_t min_exp,
                               int64_t repeat, float mult, float *out, uint8_t *codes, float *scales, int32_t threads);

#ifdef GROUP_GEMM
/* rows [r0, r1) of x: balanced, rotated and coded (compressdit_hadamard_rows, one thread), then multiplied, the channel
 * pairs split over `threads` OpenMP threads (one: all of them here); 1 where out of memory */
static int rotated_block(int isa, const float *x, const float *smooth, const int8_t *signs, int64_t r0, int64_t r1,
                         int64_t k, int64_t group, int64_t repeat, int32_t rule, float top, int32_t mantissa,
                         int32_t min_exp, float mult, const int8_t *w, const int32_t *corr, const float *w_scale,
                         const float *bias, int64_t cols, int64_t planes, const int8_t *table, float *out,
                         int32_t threads) {
    const int64_t n = r1 - r0, narrow = group / repeat, pairs = (cols + 31) / 32;
    float *work = (float *)malloc(sizeof(float) * (size_t)(n * k));
    uint8_t *codes = (uint8_t *)malloc((size_t)(n * k));
    float *scales = (float *)malloc(sizeof(float) * (size_t)(n * (k / narrow)));
    const int ok = work && codes && scales;
    if (ok) {
        compressdit_hadamard_rows(x + r0 * k, smooth, signs, n, k, group, rule, top, mantissa, min_exp, repeat, mult,
                                  work, codes, scales, 1);
        if (threads <= 1 || pairs < 2) {
            block(isa, codes, scales, w, corr, w_scale, NULL, 0, NULL, bias, 0, n, 0, pairs, cols, k, narrow, 1,
                  (int)planes, 0, table, 0, NULL, 0, out + r0 * cols);
        } else {
#pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t p = 0; p < pairs; ++p)
                block(isa, codes, scales, w, corr, w_scale, NULL, 0, NULL, bias, 0, n, p, p + 1, cols, k, narrow, 1,
                      (int)planes, 0, table, 0, NULL, 0, out + r0 * cols);
        }
    }
    free(work);
    free(codes);
    free(scales);
    return !ok;
}
#endif

/* compressdit_hadamard_rows' codes of x [rows, k] (balancing by smooth, may be NULL; the +-1 signs; the grid's
 * groups of `group` inputs, rules 0 / 1, each scale `repeat` times for the GEMM's narrower groups of group / repeat)
 * times the weight packed for compressdit_group_gemm (`planes` 1 or 2; `table`: its nibbles' codes, or NULL), plus bias: out [rows, cols] fp32, the same
 * numbers as the two calls. Each of `threads` OpenMP threads codes and multiplies its own block of whole tiles of rows
 * (the codes stay in its cache; one parallel region); with too few rows for that, the rows are coded once and the
 * channel pairs split. Returns 1 where compressdit_group_gemm would, or out of memory. */
int compressdit_hadamard_group_gemm(const float *x, const float *smooth, const int8_t *signs, int64_t rows, int64_t k,
                                    int64_t group, int64_t repeat, int32_t rule, float top, int32_t mantissa,
                                    int32_t min_exp, float mult, const int8_t *w, const int32_t *corr,
                                    const float *w_scale, const float *bias, int64_t cols, int64_t planes,
                                    const int8_t *table, float *out, int32_t threads) {
#ifdef GROUP_GEMM
    const int isa = compressdit_group_gemm_ready();
    if (!isa || planes < 1 || planes > 2 || (planes == 2 && isa != 2) || (table && (isa != 2 || planes != 1)))
        return 1;
    const int64_t tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
    if (threads <= 1 || tiles < 2 * (int64_t)threads)
        return rotated_block(isa, x, smooth, signs, 0, rows, k, group, repeat, rule, top, mantissa, min_exp, mult, w,
                             corr, w_scale, bias, cols, planes, table, out, threads);
    const int64_t per = (tiles + threads - 1) / threads;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed)
    for (int64_t t = 0; t < threads; ++t) {
        const int64_t r0 = t * per * TILE_ROWS, r1 = (t + 1) * per * TILE_ROWS;
        if (r0 < rows)
            failed |= rotated_block(isa, x, smooth, signs, r0, r1 < rows ? r1 : rows, k, group, repeat, rule, top,
                                    mantissa, min_exp, mult, w, corr, w_scale, bias, cols, planes, table, out, 1);
    }
    return failed;
#else
    (void)x; (void)smooth; (void)signs; (void)rows; (void)k; (void)group; (void)repeat; (void)rule; (void)top;
    (void)mantissa; (void)min_exp; (void)mult; (void)w; (void)corr; (void)w_scale; (void)bias; (void)cols;
    (void)planes; (void)table; (void)out; (void)threads;
    return 1;
#endif
}

