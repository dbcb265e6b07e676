/* Fused CPU passes around compressdit's dense float GEMMs (see compressdit/quant/cpu_native.py).
 *
 * The small-layer kernels of compressdit/quant/cpu_dense.py run one GEMM on a decoded weight; around it PyTorch
 * eager spent more time than in the GEMM: the fp32 -> bf16 cast of the activations and the bf16 -> fp32 cast and
 * bias of the output (each an intra-op parallel pass that wakes the second thread for 32k elements), and for the
 * low-bit activation formats the per-token / per-group rounding (E4M3 for FP8: abs, amax, clamp, div, div, clamp,
 * 6 integer ops, where, mul: ~14 passes; NVFP4 / MX blocks and minifloats more). These
 * loops do the same arithmetic in one pass each, bit for bit (tested against the PyTorch path): IEEE single
 * precision divisions as torch does them (no -ffast-math, -ffp-contract=off), round half to even. Plain C,
 * no torch headers; rows (elements for the flat cast) split over `threads` OpenMP threads in contiguous static
 * chunks, as in int8_rows.c (each element computed alone: the same numbers on any number of threads). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rows.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

static inline uint32_t float_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

static inline float bits_float(uint32_t u) {
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* fp32 -> bf16, round half to even, as torch's vectorized cast: NaN -> 0xffff, subnormals kept. */
static inline uint16_t to_bf16(float v) {
    uint32_t u = float_bits(v);
    if (v != v) return 0xffffu;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* tinygemm's int4 weight (q - 8) * scale + zero as bf16 [rows, cols] from its nibbles (uint8 [rows, cols / 2], code + 8,
 * even column low) and bf16 scale / zero ([rows, cols / group]; zero NULL: none), in one pass, the arithmetic of
 * gpu_reference.dequantize_nibbles: each bf16 operation an fp32 one rounded to bf16 (q * scale is exact in fp32). */
void compressdit_dequantize_nibbles_bf16(const uint8_t *nibbles, const uint16_t *scale, const uint16_t *zero,
                                         int64_t rows, int64_t cols, int64_t group, uint16_t *out, int32_t threads) {
    const int64_t groups = cols / group;
    FOR_ROWS(i, rows, {
        const uint8_t *n = nibbles + i * (cols / 2);
        uint16_t *o = out + i * cols;
        for (int64_t g = 0; g < groups; ++g) {
            const float s = bits_float((uint32_t)scale[i * groups + g] << 16);
            const float z = zero ? bits_float((uint32_t)zero[i * groups + g] << 16) : 0.0f;
            const uint8_t *ng = n + g * group / 2;
            uint16_t *og = o + g * group;
            if (zero) {
                for (int64_t j = 0; j < group / 2; ++j) {
                    const float lo = bits_float((uint32_t)to_bf16((float)((int)(ng[j] & 15) - 8) * s) << 16);
                    const float hi = bits_float((uint32_t)to_bf16((float)((int)(ng[j] >> 4) - 8) * s) << 16);
                    og[2 * j] = to_bf16(lo + z);
                    og[2 * j + 1] = to_bf16(hi + z);
                }
            } else {
                for (int64_t j = 0; j < group / 2; ++j) {
                    og[2 * j] = to_bf16((float)((int)(ng[j] & 15) - 8) * s);
                    og[2 * j + 1] = to_bf16((float)((int)(ng[j] >> 4) - 8) * s);
                }
            }
        }
    });
}

/* o[j] = table[c_j] for the `cols` (even) nibbles c of a row (even column low): on AVX2 32 at a time, the 16 values in
 * two registers (vpermps on each, the half chosen by the code's bit 3), ~0.9 ns a weight scalar on a Zen 3 */
static void nibble_values(const uint8_t *restrict n, const float *restrict table, int64_t cols, float *restrict o) {
    int64_t j = 0;
#if defined(__AVX2__)
    const __m256 low_half = _mm256_loadu_ps(table), high_half = _mm256_loadu_ps(table + 8);
    const __m128i mask = _mm_set1_epi8(15);
    for (; j + 32 <= cols; j += 32) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(n + j / 2));
        const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi); /* codes in order */
        const __m128i parts[4] = {first, _mm_srli_si128(first, 8), second, _mm_srli_si128(second, 8)};
        for (int k = 0; k < 4; ++k) {
            const __m256i code = _mm256_cvtepu8_epi32(parts[k]);
            const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)); /* bit 3 as the sign */
            _mm256_storeu_ps(o + j + 8 * k, _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_half, code),
                                                             _mm256_permutevar8x32_ps(high_half, code), high));
        }
    }
#endif
    for (; j + 1 < cols; j += 2) {
        o[j] = table[n[j / 2] & 15];
        o[j + 1] = table[n[j / 2] >> 4];
    }
}

/* A 4-bit-coded weight decoded into fp32 [rows, cols]: per element its code's value v = lut[c] (c the nibble: uint8
 * [rows, cols / 2], even column low; lut 16 values, or 16 per row where lut_per_row), then (v - zero) * scale per group
 * of `group` columns (zero, scale fp32 [rows, cols / group]; either NULL: left out). The decoders of the formats this
 * serves, bit for bit: integers ((q - zero) * scale, lut = q), minifloats and NVFP4 / MX blocks (value * the group's
 * fp32 scale), twin-log (its 16 magnitudes per row, no scale). One pass over the rows: a big layer's weight decoded per
 * call for an fp32 GEMM on CPUs where no low-precision GEMM pays. */
void compressdit_dequantize_nibbles_f32(const uint8_t *nibbles, const float *lut, int32_t lut_per_row,
                                        const float *scale, const float *zero, int64_t rows, int64_t cols,
                                        int64_t group, float *out, int32_t threads) {
    const int64_t groups = cols / group;
    FOR_ROWS(i, rows, {
        float *o = out + i * cols;
        nibble_values(nibbles + i * (cols / 2), lut + (lut_per_row ? 16 * i : 0), cols, o);
        for (int64_t g = 0; g < groups; ++g) {
            float *restrict og = o + g * group;
            if (zero) {
                const float z = zero[i * groups + g];
                for (int64_t j = 0; j < group; ++j) og[j] = og[j] - z;
            }
            if (scale) {
                const float sc = scale[i * groups + g];
                for (int64_t j = 0; j < group; ++j) og[j] = og[j] * sc;
            }
        }
    });
}

/* An 8-bit-coded weight decoded into fp32 [rows, cols]: lut[code] (256 values), times row_scale[i] where given: FP8
 * (E4M3 codes' values times the channel scale: FP8Linear.effective_weight bit for bit). */
void compressdit_dequantize_bytes_f32(const uint8_t *codes, const float *lut, const float *row_scale, int64_t rows,
                                      int64_t cols, float *out, int32_t threads) {
    FOR_ROWS(i, rows, {
        const uint8_t *restrict c = codes + i * cols;
        float *restrict o = out + i * cols;
        if (row_scale) {
            const float s = row_scale[i];
            for (int64_t j = 0; j < cols; ++j) o[j] = lut[c[j]] * s;
        } else {
            for (int64_t j = 0; j < cols; ++j) o[j] = lut[c[j]];
        }
    });
}

/* the `bits`-bit code at bit p of a row's stream (nbytes bytes), no byte past the row read; fast: 8 bytes readable */
static inline uint32_t stream_code(const uint8_t *c, int64_t nbytes, int64_t p, uint32_t mask, int fast) {
    uint64_t word = 0; /* 8 bytes from the one holding bit p (little-endian: the stream's order) */
    const int64_t first = p >> 3;
    if (fast) {
        memcpy(&word, c + first, 8);
    } else {
        for (int64_t b = 0; first + b < nbytes; ++b) word |= (uint64_t)c[first + b] << (8 * b);
    }
    return (uint32_t)(word >> (p & 7)) & mask;
}

/* one row of compressdit_vq_decode_f32; always inlined with a constant dim (2, 4) */
static inline __attribute__((always_inline)) void vq_row(const uint8_t *c, int64_t nbytes, int32_t bits,
                                                         uint32_t mask, const float *codebook, int64_t dim, float s,
                                                         int64_t cols, float *restrict o) {
    const int64_t count = cols / dim;
    int64_t fast = count; /* codes whose 8 bytes lie in the row */
    while (fast > 0 && ((fast - 1) * bits >> 3) + 8 > nbytes) --fast;
    for (int64_t v = 0; v < count; ++v) {
        const float *w = codebook + (int64_t)stream_code(c, nbytes, v * bits, mask, v < fast) * dim;
        for (int64_t k = 0; k < dim; ++k) o[v * dim + k] = w[k] * s; /* s = 1 without row scales: exact */
    }
}

/* A vector-quantized weight decoded into fp32 [rows, cols]: each row's codes are a bit stream of `bits`-bit indices
 * (least significant bit first within each byte and code, `nbytes` bytes a row: vq_primitives.pack_code_bits), each
 * index a codeword of `dim` fp32 values (codebook [2^bits, dim]) for `dim` consecutive weights, times row_scale[i]
 * where given (VQLinear.effective_weight bit for bit). Bits <= 24: a code lies in the 8 bytes from its first one. */
void compressdit_vq_decode_f32(const uint8_t *codes, int64_t nbytes, int32_t bits, const float *codebook, int64_t dim,
                               const float *row_scale, int64_t rows, int64_t cols, float *out, int32_t threads) {
    const uint32_t mask = (1u << bits) - 1u;
    FOR_ROWS(i, rows, {
        const uint8_t *c = codes + i * nbytes;
        const float s = row_scale ? row_scale[i] : 1.0f;
        switch (dim) {
        case 2: vq_row(c, nbytes, bits, mask, codebook, 2, s, cols, out + i * cols); break;
        case 4: vq_row(c, nbytes, bits, mask, codebook, 4, s, cols, out + i * cols); break;
        default: vq_row(c, nbytes, bits, mask, codebook, dim, s, cols, out + i * cols); break;
        }
    });
}

/* out[i] = the code of x[i] in a 4-bit minifloat format (already scaled; finite: callers check), as
 * Minifloat.encode: how many of the format's 7 tie-adjusted midpoints `bounds` (ascending) |x[i]| exceeds, the sign
 * bit (1 << sign_bit) set where x[i] < 0 (not for -0); n elements, one pass where PyTorch took ~20. */
void compressdit_encode_nibble_codes(const float *restrict x, int64_t n, const float *restrict bounds, int32_t sign_bit,
                                     uint8_t *restrict out, int32_t threads) {
    const float b0 = bounds[0], b1 = bounds[1], b2 = bounds[2], b3 = bounds[3], b4 = bounds[4], b5 = bounds[5],
                b6 = bounds[6];
    FOR_ROWS(i, n, {
        const float v = x[i], m = v < 0 ? -v : v;
        out[i] = (uint8_t)((m > b0) + (m > b1) + (m > b2) + (m > b3) + (m > b4) + (m > b5) + (m > b6) +
                           ((v < 0) << sign_bit));
    });
}

/* y[i] = bf16(x[i]) for n elements. */
void compressdit_float_to_bf16(const float *restrict x, int64_t n, uint16_t *restrict y, int32_t threads) {
    FOR_ROWS(i, n, { y[i] = to_bf16(x[i]); });
}

/* out[i, j] = float(y[i, j]) (+ bias[j]): a bf16 GEMM's output widened (exactly) and its fp32 bias added. */
void compressdit_bf16_to_float(const uint16_t *restrict y, const float *restrict bias, int64_t rows, int64_t cols,
                               float *restrict out, int32_t threads) {
    FOR_ROWS(i, rows, {
        const uint16_t *r = y + i * cols;
        float *o = out + i * cols;
        if (bias)
            for (int64_t j = 0; j < cols; ++j) o[j] = bits_float((uint32_t)r[j] << 16) + bias[j];
        else
            for (int64_t j = 0; j < cols; ++j) o[j] = bits_float((uint32_t)r[j] << 16);
    });
}

/* a (a magnitude, or NaN) rounded to the grid whose step is 2^(k - mantissa) in the binade [2^k, 2^(k+1)), k
 * floored at min_exp, ties to even: the rounding of Minifloat.round for an ExMy format (mantissa = M, min_exp = its
 * smallest normal exponent), and of torch.round for integers (mantissa = min_exp = 30: a step of 1 below 2^23).
 * Adding and subtracting M = 1.5 * 2^(k - mantissa + 23), whose ulp is that step, rounds a to it in the FPU's
 * round-to-nearest-even (a carry into the next binade included). */
static inline float round_grid(float a, int32_t mantissa, int32_t min_exp) {
    int32_t e = (int32_t)(float_bits(a) >> 23); /* biased exponent (NaN: 255; its result stays NaN) */
    const int32_t floor = min_exp + 127;
    e = e < floor ? floor : e;
    const float m = bits_float(((uint32_t)(e + 23 - mantissa) << 23) | 0x400000u);
    return (a + m) - m;
}

/* q clamped to +-top and rounded to the grid (round_grid), its sign kept */
static inline float grid_value(float q, float top, int32_t mantissa, int32_t min_exp) {
    const float a = __builtin_fabsf(q);
    float g = round_grid(a > top ? top : a, mantissa, min_exp);
    g = g > top ? top : g;
    return __builtin_copysignf(g, q);
}

/* grid_value on the integer grid (mantissa = min_exp = 30, top < 2^22): there round_grid's binade is always its floor
 * (|q| is clamped to top first; a NaN stays NaN), so its rounding constant is 1.5 * 2^23 for every value: the same
 * numbers without the exponent arithmetic (a third of the vector instructions of the loop) */
static inline float grid_value_int(float q, float top) {
    const float a = __builtin_fabsf(q);
    float g = ((a > top ? top : a) + 12582912.0f) - 12582912.0f;
    g = g > top ? top : g;
    return __builtin_copysignf(g, q);
}

/* Whether x / s may be computed as div_rn(x, s, 1 / s) before grid_value: s normal and finite. Quotients below
 * div_rn's exact range (|q| < 2^-100) round to a signed 0 on every grid here (the finest step is 2^-9), as the
 * division's would; s = inf or NaN (an inf or NaN in the row) takes the division (0 * inf is NaN). */
static inline int divides_fast(float s) {
    return s >= 1.17549435e-38f && s <= 3.40282347e38f;
}

/* The scale of a group of absolute maximum amax under `rule` (see compressdit_fake_quantize_grid). MX's
 * 2^ceil(log2(amax / top)) from the bits of a normal ratio (its exponent, plus one unless the mantissa is 0: what
 * frexp gives, without the library call); frexp for the rest (0, subnormal, inf, NaN). */
static inline float grid_scale(float amax, int32_t rule, float top, float t) {
    if (rule == 0) return (amax > 1e-8f || amax != amax ? amax : 1e-8f) / top;
    if (rule == 1) {
        const float ratio = amax / top;
        const uint32_t u = float_bits(ratio), biased = u >> 23;
        int e = 0;
        if (biased > 0 && biased < 255) { /* ratio >= 0: amax is a magnitude */
            e = (int)biased - 127 + ((u & 0x7fffffu) != 0);
        } else {
            const float f = __builtin_frexpf(ratio, &e);
            e = f == 0.5f ? e - 1 : e;
            e = ratio > 0.0f ? e : -127;
        }
        e = e < -127 ? -127 : (e > 127 ? 127 : e);
        return __builtin_ldexpf(1.0f, e);
    }
    const float d = amax / (top * t);
    const float a = d > 448.0f ? 448.0f : d;
    float b = round_grid(a, 3, -6);
    b = b > 448.0f ? 448.0f : b;
    return (b > 0.0f ? b : 1.0f) * t;
}

/* groups handled together by grid_groups: their maxima, then their scales and reciprocals (vector divisions over
 * the groups instead of two scalar ones per group), then their values */
#define GRID_BATCH 64

/* the scales s (grid_scale) of n <= GRID_BATCH consecutive groups and their reciprocals inv; each group's absmax
 * bits (absmax_bits: NaN above inf) into amax */
static inline __attribute__((always_inline)) void grid_group_scales(const float *x, int64_t n, int64_t group,
                                                                    int32_t rule, float top, float t, float *s,
                                                                    float *inv, uint32_t *amax) {
    for (int64_t b = 0; b < n; ++b) amax[b] = absmax_bits(x + b * group, group);
    if (rule == 0) { /* inlined by hand: the loop then vectorizes */
        for (int64_t b = 0; b < n; ++b) {
            const float a = bits_float(amax[b]);
            s[b] = (a > 1e-8f || a != a ? a : 1e-8f) / top;
        }
    } else if (rule == 2) { /* grid_scale's NVFP4 rule inlined by hand, as rule 0: a vector loop */
        const float tt = top * t;
        for (int64_t b = 0; b < n; ++b) {
            const float d = bits_float(amax[b]) / tt;
            float e = round_grid(d > 448.0f ? 448.0f : d, 3, -6);
            e = e > 448.0f ? 448.0f : e;
            s[b] = (e > 0.0f ? e : 1.0f) * t;
        }
    } else { /* MX: the vector loop for normal ratios (their exponent from the bits), grid_scale for the rest */
        int odd = 0;
        for (int64_t b = 0; b < n; ++b) {
            const uint32_t u = float_bits(bits_float(amax[b]) / top), biased = u >> 23;
            odd |= biased - 1u >= 254u; /* 0 (zero, subnormal) or 255 (inf, NaN): amax is non-negative */
            int32_t e = (int32_t)biased - 127 + ((u & 0x7fffffu) != 0);
            e = e > 127 ? 127 : e; /* >= -126 for a normal ratio */
            s[b] = bits_float((uint32_t)(e + 127) << 23);
        }
        if (odd)
            for (int64_t b = 0; b < n; ++b)
                if ((float_bits(bits_float(amax[b]) / top) >> 23) - 1u >= 254u)
                    s[b] = grid_scale(bits_float(amax[b]), rule, top, t);
    }
    for (int64_t b = 0; b < n; ++b) inv[b] = 1.0f / s[b];
}

/* n <= GRID_BATCH consecutive groups of `group` values: always inlined with a constant group (16, 32, 64) and
 * `integer` (the grid is the integers: grid_value_int), so that each group's loops are straight vector code */
static inline __attribute__((always_inline)) void grid_groups(const float *x, float *out, int64_t n,
                                                              int64_t group, int32_t rule, float top, int32_t mantissa,
                                                              int32_t min_exp, float t, int integer) {
    float s[GRID_BATCH], inv[GRID_BATCH];
    uint32_t amax[GRID_BATCH];
    grid_group_scales(x, n, group, rule, top, t, s, inv, amax);
    for (int64_t b = 0; b < n; ++b) {
        const float *r = x + b * group;
        float *o = out + b * group;
        const float sb = s[b], ib = inv[b];
        if (integer && divides_fast(sb)) {
            for (int64_t j = 0; j < group; ++j) o[j] = grid_value_int(div_rn(r[j], sb, ib), top) * sb;
        } else if (divides_fast(sb)) {
            for (int64_t j = 0; j < group; ++j) o[j] = grid_value(div_rn(r[j], sb, ib), top, mantissa, min_exp) * sb;
        } else {
            for (int64_t j = 0; j < group; ++j) o[j] = grid_value(r[j] / sb, top, mantissa, min_exp) * sb;
        }
    }
}

/* whether a grid is the integers up to top, where grid_value_int is grid_value */
static inline int integer_grid(float top, int32_t mantissa, int32_t min_exp) {
    return mantissa == 30 && min_exp == 30 && top < 4194304.0f;
}

/* grid_groups with its loops specialized for groups of 16, 32 and 64, on the integer grid or any other */
static void grid_batch(const float *x, float *out, int64_t n, int64_t group, int32_t rule, float top, int32_t mantissa,
                       int32_t min_exp, float t) {
    const int integer = integer_grid(top, mantissa, min_exp);
#define GRID_GROUPS(width)                                                                   \
    (integer ? grid_groups(x, out, n, width, rule, top, mantissa, min_exp, t, 1)             \
             : grid_groups(x, out, n, width, rule, top, mantissa, min_exp, t, 0))
    switch (group) {
    case 16: GRID_GROUPS(16); break;
    case 32: GRID_GROUPS(32); break;
    case 64: GRID_GROUPS(64); break;
    default: GRID_GROUPS(group); break;
    }
#undef GRID_GROUPS
}

#define CODE_CHUNK 64

/* m integral values in [0, 255] as bytes. GCC converts `(uint8_t)(int32_t)v[j]` a value at a time (vcvttss2si,
 * vpinsrb, spills: most of grid_code_groups' 1.5-2.5 ns an element at AVX2); 16 at a time here: two converts, two
 * packs (their lanes interleaved: a0-3 b0-3 a4-7 b4-7), one dword shuffle back into order. */
static inline __attribute__((always_inline)) void code_bytes(const float *v, uint8_t *c, int64_t m) {
    int64_t j = 0;
#if defined(__AVX2__)
    for (; j + 16 <= m; j += 16) {
        const __m256i p = _mm256_packus_epi32(_mm256_cvttps_epi32(_mm256_loadu_ps(v + j)),
                                              _mm256_cvttps_epi32(_mm256_loadu_ps(v + j + 8)));
        const __m128i q = _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        _mm_storeu_si128((__m128i *)(c + j), _mm_shuffle_epi32(q, _MM_SHUFFLE(3, 1, 2, 0)));
    }
#endif
    for (; j < m; ++j) c[j] = (uint8_t)(int32_t)v[j];
}

/* grid_groups' values as integer codes for an integer GEMM (group_gemm.c): each value v * s written as the byte
 * v * mult + top * mult (mult a power of two making every grid value an integer, top * mult <= 127: unsigned codes)
 * and each group's scale as s / mult, `repeat` times (the GEMM's groups may be narrower than these). A group with a
 * NaN value (a NaN, or an inf under a scale it overflows) gets the scale NaN: no code stands for NaN, and the outputs
 * of its row are then NaN, as the reference's are. */
static inline __attribute__((always_inline)) void grid_code_groups(const float *x, uint8_t *codes, float *scales,
                                                                   int64_t n, int64_t group, int64_t repeat,
                                                                   int32_t rule, float top, int32_t mantissa,
                                                                   int32_t min_exp, float t, float mult, int integer) {
    float s[GRID_BATCH], inv[GRID_BATCH];
    uint32_t amax[GRID_BATCH];
    grid_group_scales(x, n, group, rule, top, t, s, inv, amax);
    const float offset = top * mult;
    for (int64_t b = 0; b < n; ++b) {
        const float *r = x + b * group;
        uint8_t *c = codes + b * group;
        const float sb = s[b], ib = inv[b];
        /* NaN in the group, or (MX) an inf: its scale 2^0 would clamp the inf to the grid's end, where the reference's
         * element rounding gives NaN; NaN scales make the rows' outputs NaN, as the reference's matmul does */
        int nan = amax[b] > 0x7f800000u || (rule == 1 && amax[b] == 0x7f800000u);
        if (!nan && divides_fast(sb)) { /* no NaN can arise: straight vector code, in float chunks then bytes */
            for (int64_t j0 = 0; j0 < group; j0 += CODE_CHUNK) {
                const int64_t m = group - j0 < CODE_CHUNK ? group - j0 : CODE_CHUNK;
                float v[CODE_CHUNK];
                if (integer) {
                    for (int64_t j = 0; j < m; ++j)
                        v[j] = grid_value_int(div_rn(r[j0 + j], sb, ib), top) * mult + offset;
                } else {
                    for (int64_t j = 0; j < m; ++j)
                        v[j] = grid_value(div_rn(r[j0 + j], sb, ib), top, mantissa, min_exp) * mult + offset;
                }
                code_bytes(v, c + j0, m);
            }
        } else if (!nan && sb == sb && sb <= 3.40282347e38f) { /* a subnormal scale (MX's 2^-127): the division */
            for (int64_t j = 0; j < group; ++j) {
                const float v = grid_value(r[j] / sb, top, mantissa, min_exp) * mult + offset;
                nan |= v != v;
                c[j] = (uint8_t)(int32_t)(v == v ? v : offset);
            }
        } else {
            nan = 1;
        }
        if (nan) memset(c, (int)offset, (size_t)group);
        const float scale = nan ? __builtin_nanf("") : sb / mult;
        for (int64_t k = 0; k < repeat; ++k) scales[b * repeat + k] = scale;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* lane k of the result: the unsigned max of m[k]'s 8 lanes (eight groups' maxima at once: three rounds of
 * interleaving maxima instead of a horizontal reduction a group) */
static inline __m256i max_lanes8(const __m256i *m) {
    __m256i a[4], b[2];
    for (int k = 0; k < 4; ++k) /* per 128-bit half: pairs of lanes of m[2k] and m[2k + 1] */
        a[k] = _mm256_max_epu32(_mm256_unpacklo_epi32(m[2 * k], m[2 * k + 1]),
                                _mm256_unpackhi_epi32(m[2 * k], m[2 * k + 1]));
    for (int k = 0; k < 2; ++k)
        b[k] = _mm256_max_epu32(_mm256_unpacklo_epi64(a[2 * k], a[2 * k + 1]),
                                _mm256_unpackhi_epi64(a[2 * k], a[2 * k + 1]));
    return _mm256_max_epu32(_mm256_permute2x128_si256(b[0], b[1], 0x20), _mm256_permute2x128_si256(b[0], b[1], 0x31));
}

/* grid_code_groups (rules 0 and 2) of 8 consecutive groups of `group` values (a multiple of 16; always inlined
 * with a constant one) in AVX2 vectors, the same operations in the same order, so the same numbers: the groups'
 * maxima reduced together (max_lanes8), their scales and reciprocals in one vector, each value's division
 * (div_rn), grid rounding (round_grid; `integer`: its constant 1.5 * 2^23, grid_value_int), clamp, sign, code and
 * byte. Returns 0, writing nothing, where a group holds an inf or NaN or a scale is not divides_fast: the caller's
 * scalar code then handles those 8 groups (NaN scales and offset codes). */
static inline __attribute__((always_inline)) int grid_codes8_avx2(const float *x, uint8_t *codes, float *scales,
                                                                  int64_t group, int64_t repeat, int32_t rule,
                                                                  float top, int32_t mantissa, int32_t min_exp,
                                                                  float t, float mult, int integer) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
    __m256i m[8];
    for (int k = 0; k < 8; ++k) {
        const float *r = x + k * group;
        __m256i a = _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(r)), abs_mask);
        for (int64_t j = 8; j < group; j += 8)
            a = _mm256_max_epu32(a, _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(r + j)), abs_mask));
        m[k] = a;
    }
    const __m256i amax = max_lanes8(m);
    if (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(amax, _mm256_set1_epi32(0x7f7fffff)))))
        return 0; /* an inf or NaN: no bit pattern of a finite |x| is above FLT_MAX's */
    const __m256 a = _mm256_castsi256_ps(amax);
    __m256 s;
    if (rule == 0) {
        s = _mm256_div_ps(_mm256_max_ps(a, _mm256_set1_ps(1e-8f)), _mm256_set1_ps(top));
    } else { /* NVFP4: e4m3(amax / (top * t)) (0 -> 1) * t, round_grid(., 3, -6) */
        const __m256 d = _mm256_min_ps(_mm256_div_ps(a, _mm256_set1_ps(top * t)), _mm256_set1_ps(448.0f));
        const __m256i e = _mm256_max_epi32(_mm256_srli_epi32(_mm256_castps_si256(d), 23), _mm256_set1_epi32(121));
        const __m256 k = _mm256_castsi256_ps(_mm256_or_si256(
            _mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(20)), 23), _mm256_set1_epi32(0x400000)));
        const __m256 g = _mm256_min_ps(_mm256_sub_ps(_mm256_add_ps(d, k), k), _mm256_set1_ps(448.0f));
        s = _mm256_mul_ps(_mm256_blendv_ps(_mm256_set1_ps(1.0f), g, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GT_OQ)),
                          _mm256_set1_ps(t));
    }
    const int normal = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(s, _mm256_set1_ps(1.17549435e-38f), _CMP_GE_OQ),
                                                        _mm256_cmp_ps(s, _mm256_set1_ps(3.40282347e38f), _CMP_LE_OQ)));
    if (normal != 0xff) return 0;
    float sv[8], iv[8], ov[8];
    _mm256_storeu_ps(sv, s);
    _mm256_storeu_ps(iv, _mm256_div_ps(_mm256_set1_ps(1.0f), s));
    _mm256_storeu_ps(ov, _mm256_div_ps(s, _mm256_set1_ps(mult)));
    const __m256 vtop = _mm256_set1_ps(top), vmult = _mm256_set1_ps(mult), voffset = _mm256_set1_ps(top * mult);
    const __m256 sign = _mm256_set1_ps(-0.0f), half_ulp = _mm256_set1_ps(12582912.0f);
    const __m256i floor = _mm256_set1_epi32(min_exp + 127), shift = _mm256_set1_epi32(23 - mantissa),
                  mid = _mm256_set1_epi32(0x400000);
    for (int k = 0; k < 8; ++k) {
        const float *r = x + k * group;
        const __m256 sb = _mm256_set1_ps(sv[k]), ib = _mm256_set1_ps(iv[k]);
        __m256i c[2];
        for (int64_t j = 0; j < group; j += 8) {
            const __m256 v = _mm256_loadu_ps(r + j);
            const __m256 q0 = _mm256_mul_ps(v, ib);
            const __m256 q = _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, sb, v), ib, q0);
            const __m256 mag = _mm256_min_ps(_mm256_andnot_ps(sign, q), vtop);
            __m256 kk = half_ulp;
            if (!integer) {
                const __m256i e = _mm256_max_epi32(_mm256_srli_epi32(_mm256_castps_si256(mag), 23), floor);
                kk = _mm256_castsi256_ps(_mm256_or_si256(_mm256_slli_epi32(_mm256_add_epi32(e, shift), 23), mid));
            }
            const __m256 g = _mm256_min_ps(_mm256_sub_ps(_mm256_add_ps(mag, kk), kk), vtop);
            const __m256 value = _mm256_add_ps(_mm256_mul_ps(_mm256_or_ps(g, _mm256_and_ps(q, sign)), vmult), voffset);
            c[(j / 8) & 1] = _mm256_cvttps_epi32(value);
            if ((j / 8) & 1) { /* 16 codes: the packs of code_bytes */
                const __m256i p = _mm256_packus_epi32(c[0], c[1]);
                const __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
                _mm_storeu_si128((__m128i *)(codes + k * group + j - 8), _mm_shuffle_epi32(b, _MM_SHUFFLE(3, 1, 2, 0)));
            }
        }
        for (int64_t i = 0; i < repeat; ++i) scales[k * repeat + i] = ov[k];
    }
    return 1;
}
#endif

/* grid_code_groups with its loops specialized for groups of 16, 32 and 64 */
static void grid_code_batch_scalar(const float *x, uint8_t *codes, float *scales, int64_t n, int64_t group,
                                   int64_t repeat, int32_t rule, float top, int32_t mantissa, int32_t min_exp, float t,
                                   float mult) {
    const int integer = integer_grid(top, mantissa, min_exp);
#define CODE_GROUPS(width)                                                                                         \
    (integer ? grid_code_groups(x, codes, scales, n, width, repeat, rule, top, mantissa, min_exp, t, mult, 1)      \
             : grid_code_groups(x, codes, scales, n, width, repeat, rule, top, mantissa, min_exp, t, mult, 0))
    switch (group) {
    case 16: CODE_GROUPS(16); break;
    case 32: CODE_GROUPS(32); break;
    case 64: CODE_GROUPS(64); break;
    default: CODE_GROUPS(group); break;
    }
#undef CODE_GROUPS
}

/* grid_code_groups of n groups; on AVX2, rules 0 and 2 with groups of 16, 32 or 64 eight groups at a time
 * (grid_codes8_avx2) */
static void grid_code_batch(const float *x, uint8_t *codes, float *scales, int64_t n, int64_t group, int64_t repeat,
                            int32_t rule, float top, int32_t mantissa, int32_t min_exp, float t, float mult) {
#if defined(__AVX2__) && defined(__FMA__)
    if (rule != 1 && (group == 16 || group == 32 || group == 64)) { /* 8 groups at a time in vectors */
        const int integer = integer_grid(top, mantissa, min_exp);
        int64_t b = 0;
#define CODES8(width)                                                                                              \
    (integer ? grid_codes8_avx2(x + b * width, codes + b * width, scales + b * repeat, width, repeat, rule, top,    \
                                mantissa, min_exp, t, mult, 1)                                                     \
             : grid_codes8_avx2(x + b * width, codes + b * width, scales + b * repeat, width, repeat, rule, top,    \
                                mantissa, min_exp, t, mult, 0))
        for (; b + 8 <= n; b += 8) {
            const int done = group == 16 ? CODES8(16) : group == 32 ? CODES8(32) : CODES8(64);
            if (!done) /* an inf, NaN or extreme scale among them: the scalar code */
                grid_code_batch_scalar(x + b * group, codes + b * group, scales + b * repeat, 8, group, repeat, rule,
                                       top, mantissa, min_exp, t, mult);
        }
#undef CODES8
        if (b < n)
            grid_code_batch_scalar(x + b * group, codes + b * group, scales + b * repeat, n - b, group, repeat, rule,
                                   top, mantissa, min_exp, t, mult);
        return;
    }
#endif
    grid_code_batch_scalar(x, codes, scales, n, group, repeat, rule, top, mantissa, min_exp, t, mult);
}

float compressdit_grid_tensor_scale(const float *x, const float *smooth, int64_t rows, int64_t cols, float top,
                                    int32_t threads);
void compressdit_fake_quantize_grid_with(const float *x, int64_t rows, int64_t cols, int64_t group, int32_t rule,
                                         float top, int32_t mantissa, int32_t min_exp, float t, float *out,
                                         int32_t threads);

/* Dynamic fake quantization onto a grid (round_grid), per group of `group` values of each row (group divides
 * cols), as compressdit/quant/activations.py does it in PyTorch, bit for bit:
 *   rule 0 (int and minifloat formats): s = max(amax, 1e-8) / top;
 *   rule 1 (MX): s = 2^clamp(ceil(log2(amax / top)), -127, 127), 2^-127 where amax / top is not > 0;
 *   rule 2 (NVFP4): s = e4m3(amax / (top * t)) (0 -> 1) * t with the tensor scale t = amax(all x) / (top * 448),
 *                   1 for an all-zero x;
 * then q = x / s, out = copysign(min(round_grid(min(|q|, top)), top), q) * s. out may be x's own memory.
 * Groups in batches of GRID_BATCH split over the threads (each group computed alone: the same numbers on any
 * number of threads). */
void compressdit_fake_quantize_grid(const float *x, int64_t rows, int64_t cols, int64_t group, int32_t rule, float top,
                                    int32_t mantissa, int32_t min_exp, float *out, int32_t threads) {
    const float t = rule == 2 ? compressdit_grid_tensor_scale(x, NULL, rows, cols, top, threads) : 1.0f;
    compressdit_fake_quantize_grid_with(x, rows, cols, group, rule, top, mantissa, min_exp, t, out, threads);
}

/* NVFP4's tensor scale from the bit pattern m of an input's absmax (absmax_bits): amax / (top * 448), 1 for 0 */
static float tensor_scale_of(uint32_t m, float top) {
    const float all = bits_float(m);
    return all > 0.0f ? all / (top * 448.0f) : 1.0f;
}

/* out[i, j] = x[i, j] / smooth[j] (divide_row; out may not be x) with inv[j] = 1 / smooth[j]; returns NVFP4's tensor
 * scale of out (compressdit_grid_tensor_scale's, for `top`; from the maxima divide_row finds: no second pass) */
float compressdit_divide_rows(const float *x, const float *smooth, const float *inv, int64_t rows, int64_t cols,
                              float *out, float top, int32_t threads) {
    uint32_t m = 0;
    FOR_ROWS_MAX(m, i, rows, {
        const uint32_t r = divide_row(x + i * cols, smooth, inv, cols, out + i * cols);
        m = r > m ? r : m;
    });
    return tensor_scale_of(m, top);
}

static void split_row(const float *restrict r, int64_t n, uint16_t *restrict hi, uint16_t *restrict lo,
                      uint16_t *restrict again) {
    for (int64_t j = 0; j < n; ++j) {
        const uint16_t h = to_bf16(r[j]);
        hi[j] = h;
        again[j] = h;
        lo[j] = to_bf16(r[j] - bits_float((uint32_t)h << 16));
    }
}

/* Each row of x as two bf16 terms, hi = bf16(x) and lo = bf16(x - hi) (x - hi is exact in fp32), written as
 * [hi | lo | hi] (3 cols values) into rows of out `ld` apart: the operand layout of a "bf16x3" product, whose three
 * bf16 products hi * HI + lo * HI + hi * LO against [HI | HI | LO] are x * X to ~16 significant bits. */
void compressdit_split_rows_bf16(const float *x, int64_t rows, int64_t cols, uint16_t *out, int64_t ld,
                                 int32_t threads) {
    FOR_ROWS(i, rows, { split_row(x + i * cols, cols, out + i * ld, out + i * ld + cols, out + i * ld + 2 * cols); });
}

/* max |x[j] / smooth[j]| as its bit pattern (divide_row's, nothing written); the plain division throughout where inv
 * (1 / smooth) is NULL */
static uint32_t balanced_absmax_bits(const float *restrict x, const float *restrict smooth, const float *restrict inv,
                                     int64_t n) {
    uint32_t m = 0;
    if (inv) {
        int bad = 0;
        for (int64_t j = 0; j < n; ++j) {
            const uint32_t u = abs_bits(div_rn(x[j], smooth[j], inv[j]));
            bad |= !div_in_range(u, x[j]);
            m = u > m ? u : m;
        }
        if (!bad) return m;
        m = 0;
    }
    for (int64_t j = 0; j < n; ++j) {
        const uint32_t u = abs_bits(x[j] / smooth[j]);
        m = u > m ? u : m;
    }
    return m;
}

/* 1 / smooth[j] into a new array (free it), or NULL when out of memory */
static float *reciprocals(const float *smooth, int64_t n) {
    float *inv = (float *)malloc(sizeof(float) * (n > 0 ? n : 1));
    if (inv)
        for (int64_t j = 0; j < n; ++j) inv[j] = 1.0f / smooth[j];
    return inv;
}

/* NVFP4's tensor scale of x (rule 2 above), or of the balanced x / smooth (smooth not NULL; divided as torch does):
 * amax(all) / (top * 448), 1 for an all-zero input. */
float compressdit_grid_tensor_scale(const float *x, const float *smooth, int64_t rows, int64_t cols, float top,
                                    int32_t threads) {
    float *inv = smooth ? reciprocals(smooth, cols) : NULL; /* NULL also when out of memory: the plain division */
    uint32_t m = 0;
    FOR_ROWS_MAX(m, i, rows, {
        const uint32_t r = smooth ? balanced_absmax_bits(x + i * cols, smooth, inv, cols) : absmax_bits(x + i * cols, cols);
        m = r > m ? r : m;
    });
    free(inv);
    return tensor_scale_of(m, top);
}

/* compressdit_fake_quantize_grid with the tensor scale t given (rule 2: compressdit_grid_tensor_scale of the whole
 * input; ignored by rules 0 and 1): any block of rows then gives the whole pass's numbers. */
void compressdit_fake_quantize_grid_with(const float *x, int64_t rows, int64_t cols, int64_t group, int32_t rule,
                                         float top, int32_t mantissa, int32_t min_exp, float t, float *out,
                                         int32_t threads) {
    const int64_t groups = rows * (cols / group);
    FOR_ROWS(i, (groups + GRID_BATCH - 1) / GRID_BATCH, {
        const int64_t first = i * GRID_BATCH;
        const int64_t n = groups - first < GRID_BATCH ? groups - first : GRID_BATCH;
        grid_batch(x + first * group, out + first * group, n, group, rule, top, mantissa, min_exp, t);
    });
}

/* SVDQuant's fp32 GEMM input, the quantized part: per row, b = x / smooth (divide_row, from inv = 1 / smooth, into
 * `balanced`, the rows the branch's down product reads; smooth NULL: b = x, nothing written there), then
 * compressdit_fake_quantize_grid_with's values of b (group > 0; tensor scale t) or b itself (group 0) into the rows of
 * out, `ld` elements apart (the GEMM's input holds the branch's hidden rows beside). The same numbers as the
 * separate division and grid pass, on any number of threads (each group computed alone). */
void compressdit_balance_grid_rows(const float *x, const float *smooth, const float *inv, int64_t rows, int64_t cols,
                                   int64_t group, int32_t rule, float top, int32_t mantissa, int32_t min_exp, float t,
                                   float *balanced, float *out, int64_t ld, int32_t threads) {
    const int64_t groups = group ? cols / group : 0;
    FOR_ROWS(i, rows, {
        const float *r = x + i * cols;
        float *o = out + i * ld;
        if (smooth) {
            divide_row(r, smooth, inv, cols, balanced + i * cols);
            r = balanced + i * cols;
        }
        if (!group) memcpy(o, r, sizeof(float) * cols);
        for (int64_t g = 0; g < groups; g += GRID_BATCH) {
            const int64_t n = groups - g < GRID_BATCH ? groups - g : GRID_BATCH;
            grid_batch(r + g * group, o + g * group, n, group, rule, top, mantissa, min_exp, t);
        }
    });
}

/* The integer GEMM's input (group_gemm.c): per row, b = x / smooth (divide_row into `balanced`, which the SVDQuant
 * branch reads; smooth NULL: b = x), then compressdit_fake_quantize_grid_with's values of b (groups of `group`,
 * tensor scale t) as grid_code_groups' codes (rows of `cols` bytes) and scales (rows of cols / group * repeat). The
 * codes times the scales are the fake-quantized values exactly. */
void compressdit_grid_codes_rows(const float *x, const float *smooth, const float *inv, int64_t rows, int64_t cols,
                                 int64_t group, int64_t repeat, int32_t rule, float top, int32_t mantissa,
                                 int32_t min_exp, float t, float mult, float *balanced, uint8_t *codes, float *scales,
                                 int32_t threads) {
    const int64_t groups = cols / group;
    if (!smooth) { /* groups in batches of GRID_BATCH across rows, as compressdit_fake_quantize_grid_with */
        const int64_t all = rows * groups;
        FOR_ROWS(i, (all + GRID_BATCH - 1) / GRID_BATCH, {
            const int64_t first = i * GRID_BATCH;
            const int64_t n = all - first < GRID_BATCH ? all - first : GRID_BATCH;
            grid_code_batch(x + first * group, codes + first * group, scales + first * repeat, n, group, repeat, rule,
                            top, mantissa, min_exp, t, mult);
        });
        return;
    }
    FOR_ROWS(i, rows, {
        float *r = balanced + i * cols;
        divide_row(x + i * cols, smooth, inv, cols, r);
        for (int64_t g = 0; g < groups; g += GRID_BATCH) {
            const int64_t n = groups - g < GRID_BATCH ? groups - g : GRID_BATCH;
            grid_code_batch(r + g * group, codes + i * cols + g * group, scales + (i * groups + g) * repeat, n, group,
                            repeat, rule, top, mantissa, min_exp, t, mult);
        }
    });
}

/* elements [e0, e1) of rows of `cols` fp32 values rounded to bf16 (to_bf16) into rows of out `ld` elements apart */
static void rows_to_bf16(const float *x, int64_t e0, int64_t e1, int64_t cols, uint16_t *out, int64_t ld) {
    int64_t row = e0 / cols, column = e0 % cols;
    while (e0 < e1) {
        const int64_t n = cols - column < e1 - e0 ? cols - column : e1 - e0;
        const float *r = x + e0;
        uint16_t *o = out + row * ld + column;
        for (int64_t j = 0; j < n; ++j) o[j] = to_bf16(r[j]);
        e0 += n;
        ++row;
        column = 0;
    }
}

/* compressdit_fake_quantize_grid_with's values of x's rows (group > 0; tensor scale t; fp32 into `work`, rows x cols,
 * which may be x), or x itself (group 0), rounded to bf16 (to_bf16) into the rows of out, `ld` elements apart (a bf16
 * GEMM's input, which may hold more columns): each batch of groups rounded while in cache. */
void compressdit_grid_rows_bf16(const float *x, int64_t rows, int64_t cols, int64_t group, int32_t rule, float top,
                                int32_t mantissa, int32_t min_exp, float t, float *work, uint16_t *out, int64_t ld,
                                int32_t threads) {
    if (!group) {
        FOR_ROWS(i, rows, { rows_to_bf16(x, i * cols, (i + 1) * cols, cols, out, ld); });
        return;
    }
    const int64_t groups = rows * (cols / group); /* batched over rows, as compressdit_fake_quantize_grid_with */
    FOR_ROWS(i, (groups + GRID_BATCH - 1) / GRID_BATCH, {
        const int64_t first = i * GRID_BATCH;
        const int64_t n = groups - first < GRID_BATCH ? groups - first : GRID_BATCH;
        grid_batch(x + first * group, work + first * group, n, group, rule, top, mantissa, min_exp, t);
        rows_to_bf16(work, first * group, (first + n) * group, cols, out, ld);
    });
}

/* element j of fp32 rows x, or of bf16 ones widened exactly (bf16: a constant where this is inlined) */
static inline __attribute__((always_inline)) float element(const void *x, int bf16, int64_t j) {
    return bf16 ? bits_float((uint32_t)((const uint16_t *)x)[j] << 16) : ((const float *)x)[j];
}

/* Per-token E4M3 activations as codes for a bf16 GEMM: per row s = max(amax |x|, 1e-8) / 448 into scale[row], and
 * codes = e4m3(clamp(x / s, -448, 448)) as bf16 (exact: an E4M3 value has 4 significant bits), the rounding of
 * compressdit_fake_quantize_grid's rule 0 on E4M3's grid before its multiplication by s; x fp32 or (bf16) bf16 rows,
 * always inlined with a constant bf16, so that both loops stay straight vector code */
static inline __attribute__((always_inline)) void e4m3_rows(const void *x, int bf16, int64_t rows, int64_t cols,
                                                            uint16_t *codes, float *scale, int32_t threads) {
    FOR_ROWS(i, rows, {
        const void *r = bf16 ? (const void *)((const uint16_t *)x + i * cols) : (const void *)((const float *)x + i * cols);
        uint16_t *c = codes + i * cols;
        uint32_t m = 0;
        for (int64_t j = 0; j < cols; ++j) {
            const uint32_t u = abs_bits(element(r, bf16, j));
            m = u > m ? u : m;
        }
        const float amax = bits_float(m);
        const float s = (amax > 1e-8f || amax != amax ? amax : 1e-8f) / 448.0f;
        scale[i] = s;
        if (divides_fast(s)) {
            const float inv = 1.0f / s;
            for (int64_t j = 0; j < cols; ++j)
                c[j] = (uint16_t)(float_bits(grid_value(div_rn(element(r, bf16, j), s, inv), 448.0f, 3, -6)) >> 16);
        } else {
            for (int64_t j = 0; j < cols; ++j)
                c[j] = (uint16_t)(float_bits(grid_value(element(r, bf16, j) / s, 448.0f, 3, -6)) >> 16);
        }
    });
}

void compressdit_quantize_e4m3_bf16(const float *x, int64_t rows, int64_t cols, uint16_t *codes, float *scale,
                                    int32_t threads) {
    e4m3_rows(x, 0, rows, cols, codes, scale, threads);
}

/* the same of bf16 rows x (widened exactly as they are read: the codes and scales of x.float()) */
void compressdit_quantize_e4m3_bf16_rows(const uint16_t *x, int64_t rows, int64_t cols, uint16_t *codes, float *scale,
                                         int32_t threads) {
    e4m3_rows(x, 1, rows, cols, codes, scale, threads);
}

/* float(r[j]) * s * col_scale[j] (+ bias[j]): an element of compressdit_bf16_scale (the branch on bias leaves the
 * loops by unswitching) */
static inline float scaled(const uint16_t *r, float s, const float *restrict col_scale, const float *restrict bias,
                           int64_t j) {
    const float v = bits_float((uint32_t)r[j] << 16) * s * col_scale[j];
    return bias ? v + bias[j] : v;
}

/* out[i, j] = float(y[i, j]) * row_scale[i] * col_scale[j] (+ bias[j]): a bf16 GEMM of codes back to fp32 with its
 * per-token and per-channel scales and its bias, in that order. */
void compressdit_bf16_scale(const uint16_t *restrict y, const float *restrict row_scale, const float *restrict col_scale,
                            const float *restrict bias, int64_t rows, int64_t cols, float *restrict out,
                            int32_t threads) {
    FOR_ROWS(i, rows, {
        float *o = out + i * cols;
        for (int64_t j = 0; j < cols; ++j) o[j] = scaled(y + i * cols, row_scale[i], col_scale, bias, j);
    });
}

/* compressdit_bf16_scale's values rounded to bf16 (to_bf16) into out, which may be y itself: a bf16 model's output */
void compressdit_bf16_scale_bf16(const uint16_t *y, const float *restrict row_scale, const float *restrict col_scale,
                                 const float *restrict bias, int64_t rows, int64_t cols, uint16_t *out,
                                 int32_t threads) {
    FOR_ROWS(i, rows, {
        uint16_t *o = out + i * cols;
        for (int64_t j = 0; j < cols; ++j) o[j] = to_bf16(scaled(y + i * cols, row_scale[i], col_scale, bias, j));
    });
}

/* e^t for t in [-87, 88] (callers clamp): t = n ln2 + r with n = round(t / ln2), |r| <= ln2 / 2 (ln2 split in a
 * 16-bit head, exact in n * head, and a tail), e^r by its degree-7 Taylor polynomial (truncation below 6e-9
 * relative), times 2^n built in the exponent bits (n in [-126, 127]: a normal float). Within 2 ulp of expf;
 * branch-free, so the loops below vectorize. */
static inline float exp_clamped(float t) {
    const float n = (t * 1.44269504f + 12582912.0f) - 12582912.0f; /* round half to even, as round_even */
    float r = __builtin_fmaf(-n, 0.693145752f, t);
    r = __builtin_fmaf(-n, 1.42860677e-6f, r);
    float p = 1.98412698e-4f;                      /* 1/5040 */
    p = __builtin_fmaf(p, r, 1.38888889e-3f);      /* 1/720 */
    p = __builtin_fmaf(p, r, 8.33333333e-3f);      /* 1/120 */
    p = __builtin_fmaf(p, r, 4.16666667e-2f);      /* 1/24 */
    p = __builtin_fmaf(p, r, 1.66666667e-1f);      /* 1/6 */
    p = __builtin_fmaf(p, r, 0.5f);
    p = __builtin_fmaf(p, r, 1.0f);
    p = __builtin_fmaf(p, r, 1.0f);
    return p * bits_float((uint32_t)((int32_t)n + 127) << 23);
}

/* y = gelu_tanh(x) = x (1 + tanh(u)) / 2, u = sqrt(2 / pi) (x + 0.044715 x^3), computed as x / (1 + e^(-2u)) (the
 * same function: 1 + tanh(u) = 2 / (1 + e^(-2u))), which keeps the relative precision torch's 1 + tanh(u) loses to
 * cancellation for negative x; -2u clamped to [-87, 88] (beyond, |gelu(x) - result| < 1e-37 |x|, or x itself).
 * torch's CPU tanh GELU runs a vectorized tanh at ~1.4 ns an element here; this ~0.1. NaN in, NaN out. */
static inline float gelu_tanh_value(float v) {
    float t = -1.59576912f * __builtin_fmaf(0.044715f * v, v * v, v); /* -2 sqrt(2 / pi) (v + 0.044715 v^3) */
    t = t < 88.0f ? t : 88.0f;
    t = t > -87.0f ? t : -87.0f;
    return v / (1.0f + exp_clamped(t));
}

void compressdit_gelu_tanh(const float *x, int64_t n, float *y, int32_t threads) {
    FOR_ROWS(i, n, { y[i] = gelu_tanh_value(x[i]); });
}

/* The same on bf16 values: widened exactly, the fp32 function, rounded to bf16 (half to even) once; torch's bf16
 * GELU also computes in fp32, through its tanh (~1.4 ns an element here on bf16, this ~0.15). y may alias x. */
void compressdit_gelu_tanh_bf16(const uint16_t *x, int64_t n, uint16_t *y, int32_t threads) {
    FOR_ROWS(i, n, { y[i] = to_bf16(gelu_tanh_value(bits_float((uint32_t)x[i] << 16))); });
}

#if defined(__GNUC__) && !defined(__clang__) /* GCC's generic vectors and __builtin_shuffle */
#define COMPRESSDIT_VECTOR_BUTTERFLY 1
/* one register of floats: 16 with AVX-512, else 8 (GCC builds a wider vector's shuffles from scalar inserts: on AVX2 a
 * 64-byte one made the butterflies slower than the scalar loop) */
#ifdef __AVX512F__
#define BUTTERFLY_LANES 16
#define BUTTERFLY_LANE_INDEX {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
#else
#define BUTTERFLY_LANES 8
#define BUTTERFLY_LANE_INDEX {0, 1, 2, 3, 4, 5, 6, 7}
#endif
typedef float vbf __attribute__((vector_size(4 * BUTTERFLY_LANES)));
typedef int32_t vbi __attribute__((vector_size(4 * BUTTERFLY_LANES)));

/* One butterfly stage of distance s (< BUTTERFLY_LANES) within a register: v[k] + v[k + s] where bit s of k is clear,
 * v[k - s] - v[k] where it is set: the partner p from one shuffle plus v with its sign flipped where the bit is set
 * (p + -v is p - v exactly, p + v is v + p: the same single additions as the scalar loop). */
static inline vbf butterfly_lanes(vbf v, int s) {
    const vbi lane = BUTTERFLY_LANE_INDEX;
    const vbf p = __builtin_shuffle(v, lane ^ s);
    const vbi flip = ((lane & s) != 0) & (vbi)(0x80000000u + (vbi){}); /* the sign bit where bit s is set */
    return p + (vbf)((vbi)v ^ flip);
}
#endif

/* the butterflies of fwht on each run of `block` values of a row, in its order (h = 1, 2, 4, ...) */
static void butterflies(float *o, int64_t cols, int64_t block) {
#ifdef COMPRESSDIT_VECTOR_BUTTERFLY
    if (block >= BUTTERFLY_LANES) { /* the stages h < BUTTERFLY_LANES within each register, then whole registers */
        for (int64_t start = 0; start < cols; start += BUTTERFLY_LANES) {
            vbf v;
            memcpy(&v, o + start, sizeof v);
            for (int s = 1; s < BUTTERFLY_LANES; s *= 2) v = butterfly_lanes(v, s);
            memcpy(o + start, &v, sizeof v);
        }
        for (int64_t h = BUTTERFLY_LANES; h < block; h *= 2)
            for (int64_t start = 0; start < cols; start += 2 * h)
                for (int64_t j = start; j < start + h; j += BUTTERFLY_LANES) {
                    vbf a, b;
                    memcpy(&a, o + j, sizeof a);
                    memcpy(&b, o + j + h, sizeof b);
                    const vbf sum = a + b, difference = a - b;
                    memcpy(o + j, &sum, sizeof sum);
                    memcpy(o + j + h, &difference, sizeof difference);
                }
        return;
    }
#endif
    for (int64_t h = 1; h < block; h *= 2)
        for (int64_t start = 0; start < cols; start += 2 * h)
            for (int64_t j = start; j < start + h; ++j) {
                const float a = o[j], b = o[j + h];
                o[j] = a + b;
                o[j + h] = a - b;
            }
}

/* One row of compressdit_hadamard_rows before its grid, into o (not r): v = r / smooth * signs as r / signed[j]
 * (signed = smooth * signs, exactly; by divide_row from inv = 1 / signed) or r * signs[j] (signed NULL; as floats in
 * `sign`), the butterflies, then v / norm by div_rn from inv_norm (1 <= norm <= 2^6). Returns nonzero, the row
 * unfinished, where a value before that division left [2^-94, 2^100] (div_rn's exact range for the quotient; 0 is
 * fine): the caller redoes it with the plain divisions (hadamard_row_plain). */
static int hadamard_row(const float *restrict r, const float *restrict signed_smooth, const float *restrict inv,
                        const float *restrict sign, int64_t cols, int64_t block, float norm, float inv_norm,
                        float *restrict o) {
    if (signed_smooth) {
        divide_row(r, signed_smooth, inv, cols, o);
    } else {
        for (int64_t j = 0; j < cols; ++j) o[j] = r[j] * sign[j];
    }
    butterflies(o, cols, block);
    int bad = 0;
    for (int64_t j = 0; j < cols; ++j) {
        const float v = o[j];
        const uint32_t u = abs_bits(v);
        bad |= (u > 0x71800000u) | ((u < 0x10800000u) & (v != 0.0f));
        o[j] = div_rn(v, norm, inv_norm);
    }
    return bad;
}

/* The same with the plain divisions (any values; o may be r) */
static void hadamard_row_plain(const float *r, const float *smooth, const int8_t *signs, int64_t cols, int64_t block,
                               float norm, float *o) {
    if (smooth)
        for (int64_t j = 0; j < cols; ++j) o[j] = r[j] / smooth[j] * (float)signs[j];
    else
        for (int64_t j = 0; j < cols; ++j) o[j] = r[j] * (float)signs[j];
    butterflies(o, cols, block);
    for (int64_t j = 0; j < cols; ++j) o[j] = o[j] / norm;
}

#if defined(__AVX2__) && defined(__FMA__)
/* butterfly_lanes' stages 1, 2 and 4 on one AVX2 register: the partner plus the value with its sign flipped where
 * the stage's bit of the lane is set (the same single additions) */
static inline __m256 butterflies8_avx2(__m256 v) {
    const int s = (int)0x80000000;
    const __m256 odd = _mm256_castsi256_ps(_mm256_setr_epi32(0, s, 0, s, 0, s, 0, s));
    const __m256 pair = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, s, s, 0, 0, s, s));
    const __m256 half = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, s, s, s, s));
    v = _mm256_add_ps(_mm256_permute_ps(v, 0xB1), _mm256_xor_ps(v, odd));
    v = _mm256_add_ps(_mm256_permute_ps(v, 0x4E), _mm256_xor_ps(v, pair));
    return _mm256_add_ps(_mm256_permute2f128_ps(v, v, 0x01), _mm256_xor_ps(v, half));
}

/* div_rn on 8 lanes */
static inline __m256 div_rn8(__m256 a, __m256 b, __m256 inv) {
    const __m256 q0 = _mm256_mul_ps(a, inv);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, b, a), inv, q0);
}

/* The scales of 8 groups of 16 rotated values at o (before their division by norm) for grid_groups' rule 0 on the
 * integer grid, and their reciprocals, lane k group k's: the groups' maxima from the values before the division (a
 * correctly rounded division by norm is monotone: the quotient of the largest is the largest quotient), transposed
 * into one register, so that the 8 scales take one vector division. Returns nonzero where a |v| is above
 * hadamard_row's range or NaN; below its range a value's quotient may be off in its last bits but rounds to a signed
 * 0 on the grid as the exact one would (the scale is at least 1e-8 / top, |v| < 2^-94). */
static inline __attribute__((always_inline)) int grid8_scales(const float *o, __m256 vn, __m256 vin, __m256 vtop,
                                                               __m256 *scale, __m256 *inverse) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256i m[8], t[4], w[2];
    for (int k = 0; k < 8; ++k)
        m[k] = _mm256_max_epu32(_mm256_castps_si256(_mm256_and_ps(_mm256_loadu_ps(o + 16 * k), absmask)),
                                _mm256_castps_si256(_mm256_and_ps(_mm256_loadu_ps(o + 16 * k + 8), absmask)));
    for (int k = 0; k < 4; ++k)
        t[k] = _mm256_max_epu32(_mm256_unpacklo_epi32(m[2 * k], m[2 * k + 1]),
                                _mm256_unpackhi_epi32(m[2 * k], m[2 * k + 1]));
    for (int k = 0; k < 2; ++k)
        w[k] = _mm256_max_epu32(_mm256_unpacklo_epi64(t[2 * k], t[2 * k + 1]),
                                _mm256_unpackhi_epi64(t[2 * k], t[2 * k + 1]));
    const __m256i mx = _mm256_max_epu32(_mm256_permute2x128_si256(w[0], w[1], 0x20),
                                        _mm256_permute2x128_si256(w[0], w[1], 0x31)); /* lane k: group k's */
    const __m256i above = _mm256_cmpgt_epi32(mx, _mm256_set1_epi32((int)DIV_ABOVE));
    /* grid_scale's rule 0 (the absmax floored at 1e-8; never NaN here), its reciprocal */
    *scale = _mm256_div_ps(_mm256_max_ps(div_rn8(_mm256_castsi256_ps(mx), vn, vin), _mm256_set1_ps(1e-8f)), vtop);
    *inverse = _mm256_div_ps(_mm256_set1_ps(1.0f), *scale);
    return !_mm256_testz_si256(above, above);
}

/* The 8 groups at o divided by norm (div_rn) and put on the grid with grid8_scales' scales: div_rn by the scale,
 * grid_value_int, times the scale (grid_groups' operations), in place */
static inline __attribute__((always_inline)) void grid8_apply(float *o, __m256 vn, __m256 vin, __m256 vtop,
                                                               __m256 scale, __m256 inverse) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), magic = _mm256_set1_ps(12582912.0f);
    for (int k = 0; k < 8; ++k) {
        const __m256i lane = _mm256_set1_epi32(k);
        const __m256 s = _mm256_permutevar8x32_ps(scale, lane), i = _mm256_permutevar8x32_ps(inverse, lane);
        for (int h = 0; h < 2; ++h) {
            const __m256 q = div_rn8(div_rn8(_mm256_loadu_ps(o + 16 * k + 8 * h), vn, vin), s, i);
            /* grid_value_int: |q| clamped to top, rounded by the 1.5 * 2^23 constant, clamped again, q's sign */
            __m256 a = _mm256_min_ps(_mm256_and_ps(q, absmask), vtop);
            a = _mm256_min_ps(_mm256_sub_ps(_mm256_add_ps(a, magic), magic), vtop);
            _mm256_storeu_ps(o + 16 * k + 8 * h, _mm256_mul_ps(_mm256_or_ps(a, _mm256_andnot_ps(absmask, q)), s));
        }
    }
}
#endif

/* One row of compressdit_hadamard_rows before its grid (hadamard_grid_rows), cols a multiple of 128, in AVX2
 * registers: hadamard_row's balancing divisions (divide_row's range check) or signs, the butterflies (stages 1-4 in
 * each register, then two stages a pass over the row: h and 2h on 4 registers), not yet divided by norm; the same
 * operations on every value as hadamard_row, so the same numbers. Returns nonzero, the row unfinished, where
 * divide_row's check fails or without AVX2 (the caller then takes hadamard_row's route). */
static int hadamard_grid_row(const float *restrict r, const float *restrict signed_smooth, const float *restrict inv,
                             const float *restrict sign, int64_t cols, int64_t block, float *restrict o) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256i bad = _mm256_setzero_si256();
    if (signed_smooth) {
        const __m256i above = _mm256_set1_epi32((int)DIV_ABOVE), below = _mm256_set1_epi32((int)DIV_BELOW);
        for (int64_t j = 0; j < cols; j += 8) {
            const __m256 x = _mm256_loadu_ps(r + j);
            const __m256 v = div_rn8(x, _mm256_loadu_ps(signed_smooth + j), _mm256_loadu_ps(inv + j));
            const __m256i u = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff));
            const __m256i zero = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
            bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi32(u, above),
                                                       _mm256_andnot_si256(zero, _mm256_cmpgt_epi32(below, u))));
            _mm256_storeu_ps(o + j, butterflies8_avx2(v));
        }
        if (!_mm256_testz_si256(bad, bad)) return 1;
    } else {
        for (int64_t j = 0; j < cols; j += 8)
            _mm256_storeu_ps(o + j, butterflies8_avx2(_mm256_mul_ps(_mm256_loadu_ps(r + j),
                                                                    _mm256_loadu_ps(sign + j))));
    }
    int64_t h = 8;
    for (; 4 * h <= block; h *= 4)
        for (int64_t start = 0; start < cols; start += 4 * h)
            for (int64_t j = start; j < start + h; j += 8) {
                const __m256 a0 = _mm256_loadu_ps(o + j), a1 = _mm256_loadu_ps(o + j + h);
                const __m256 a2 = _mm256_loadu_ps(o + j + 2 * h), a3 = _mm256_loadu_ps(o + j + 3 * h);
                const __m256 b0 = _mm256_add_ps(a0, a1), b1 = _mm256_sub_ps(a0, a1);
                const __m256 b2 = _mm256_add_ps(a2, a3), b3 = _mm256_sub_ps(a2, a3);
                _mm256_storeu_ps(o + j, _mm256_add_ps(b0, b2));
                _mm256_storeu_ps(o + j + h, _mm256_add_ps(b1, b3));
                _mm256_storeu_ps(o + j + 2 * h, _mm256_sub_ps(b0, b2));
                _mm256_storeu_ps(o + j + 3 * h, _mm256_sub_ps(b1, b3));
            }
    if (h < block)
        for (int64_t start = 0; start < cols; start += 2 * h)
            for (int64_t j = start; j < start + h; j += 8) {
                const __m256 a = _mm256_loadu_ps(o + j), b = _mm256_loadu_ps(o + j + h);
                _mm256_storeu_ps(o + j, _mm256_add_ps(a, b));
                _mm256_storeu_ps(o + j + h, _mm256_sub_ps(a, b));
            }
    return 0;
#else
    (void)r, (void)signed_smooth, (void)inv, (void)sign, (void)cols, (void)block, (void)o;
    return 1;
#endif
}

/* chunks of 128 values the batch of rows takes its scales for before it quantizes any (the divisions of a chunk's
 * scales wait on its maxima, ~50 cycles of latency: with several chunks in flight they overlap) */
#define GRID_CHUNKS 4

#if defined(__AVX2__) && defined(__FMA__)
/* The n values at o (a multiple of 128) divided by norm (div_rn from inv_norm; norm 1 leaves them as they are) and put
 * on rule 0's integer grid in groups of 16, in place: grid8_scales, then grid8_apply, GRID_CHUNKS chunks of 128 a
 * turn. The same operations on every value as grid_batch (after the division), so the same numbers. Returns nonzero,
 * the values partly done, where a value is above div_rn's range or NaN (the caller redoes them the plain way). */
static int grid16_values(float *o, int64_t n, float norm, float inv_norm, float top) {
    const __m256 vn = _mm256_set1_ps(norm), vin = _mm256_set1_ps(inv_norm), vtop = _mm256_set1_ps(top);
    for (int64_t c0 = 0; c0 < n; c0 += 128 * GRID_CHUNKS) {
        const int chunks = (int)((n - c0) / 128 < GRID_CHUNKS ? (n - c0) / 128 : GRID_CHUNKS);
        __m256 scale[GRID_CHUNKS], inverse[GRID_CHUNKS];
        int bad = 0;
        for (int c = 0; c < chunks; ++c)
            bad |= grid8_scales(o + c0 + 128 * c, vn, vin, vtop, scale + c, inverse + c);
        if (bad) return 1;
        for (int c = 0; c < chunks; ++c) grid8_apply(o + c0 + 128 * c, vn, vin, vtop, scale[c], inverse[c]);
    }
    return 0;
}
#endif

/* Rows [i0, i1) of compressdit_hadamard_rows with their grid, where that is rule 0 on the integer grid in groups of
 * 16 (LRQ's int4 / int8 activations) and cols a multiple of 128: hadamard_grid_row on each, then the division by norm
 * and the grid of every 128 values (grid8_scales, then grid8_apply, GRID_CHUNKS chunks a turn). The same operations on
 * every value as hadamard_row and grid_batch, so the same numbers, in ~half their time on a Zen 3 (0.8-1.0 ns an
 * element against 1.4-2.4: their passes over the row, each group's horizontal maximum and scalar divisions). Returns
 * nonzero, the rows unfinished, where a row's hadamard_row would, or without AVX2 (the caller then takes that route
 * for these rows). */
static int hadamard_grid_rows(const float *x, const float *signed_smooth, const float *inv, const float *sign,
                              int64_t i0, int64_t i1, int64_t cols, int64_t block, float norm, float inv_norm,
                              float top, float *out) {
#if defined(__AVX2__) && defined(__FMA__)
    for (int64_t i = i0; i < i1; ++i)
        if (hadamard_grid_row(x + i * cols, signed_smooth, inv, sign, cols, block, out + i * cols)) return 1;
    return grid16_values(out + i0 * cols, (i1 - i0) * cols, norm, inv_norm, top);
#else
    (void)x, (void)signed_smooth, (void)inv, (void)sign, (void)i0, (void)i1, (void)cols, (void)block, (void)norm,
        (void)inv_norm, (void)top, (void)out;
    return 1;
#endif
}

/* What compressdit_hadamard_rows takes from a layer: its divisor (may be NULL) and signs, the grid, and for the fast
 * rows (out not x, a block of at most 4096 values: norm <= 2^6) the signed divisors smooth * signs (the signs as
 * floats where there is no divisor) and their reciprocals (NULL: no fast rows) */
typedef struct {
    const float *smooth;
    const int8_t *signs;
    int64_t cols, group;
    int32_t rule, mantissa, min_exp;
    float top;
    float *signed_smooth, *inv;
} hadamard_layer;

/* signed_smooth and inv of `layer` into scratch [2 * cols] (their memory), where the block takes the fast rows */
static void hadamard_divisors(hadamard_layer *layer, float *scratch) {
    const int64_t cols = layer->cols;
    layer->signed_smooth = layer->inv = NULL;
    if (!scratch || (cols & -cols) > 4096) return;
    layer->signed_smooth = scratch;
    layer->inv = scratch + cols;
    for (int64_t j = 0; j < cols; ++j) {
        scratch[j] = layer->smooth ? layer->smooth[j] * (float)layer->signs[j] : (float)layer->signs[j];
        scratch[cols + j] = 1.0f / scratch[j];
    }
}

/* compressdit_hadamard_rows for a prepared layer */
static void hadamard_layer_rows(const hadamard_layer *layer, const float *x, int64_t rows, float *out, uint8_t *codes,
                                float *scales, int64_t repeat, float mult, int32_t threads) {
    const int64_t cols = layer->cols, block = cols & -cols, group = layer->group;
    const int32_t rule = layer->rule, mantissa = layer->mantissa, min_exp = layer->min_exp;
    const float top = layer->top, *smooth = layer->smooth, norm = (float)__builtin_sqrt((double)block),
                inv_norm = 1.0f / norm;
    const int8_t *signs = layer->signs;
    const int fast = x != out && layer->signed_smooth != NULL; /* hadamard_row's rows */
    const float *signed_smooth = fast ? layer->signed_smooth : NULL, *inv = fast ? layer->inv : NULL;
    /* the AVX2 rows with their grid (hadamard_grid_rows) where it takes the grid and the rows: batches of up to 512
     * values (their scales' divisions in flight together); else one row a turn */
    const int fused = fast && !codes && group == 16 && rule == 0 && integer_grid(top, mantissa, min_exp)
                      && cols % 128 == 0;
    const int64_t per = fused && cols < 512 ? 512 / cols : 1, batches = (rows + per - 1) / per;
    FOR_ROWS(b, batches, {
        const int64_t i0 = b * per, i1 = i0 + per < rows ? i0 + per : rows;
        if (fused && !hadamard_grid_rows(x, smooth ? signed_smooth : NULL, inv, signed_smooth, i0, i1, cols, block,
                                         norm, inv_norm, top, out))
            continue;
        for (int64_t i = i0; i < i1; ++i) {
            const float *r = x + i * cols;
            float *o = out + i * cols;
            if (!fast || hadamard_row(r, smooth ? signed_smooth : NULL, inv, signed_smooth, cols, block, norm,
                                      inv_norm, o))
                hadamard_row_plain(r, smooth, signs, cols, block, norm, o);
            for (int64_t g = 0; group && g < cols / group; g += GRID_BATCH) { /* then its groups, while in cache */
                const int64_t n = cols / group - g < GRID_BATCH ? cols / group - g : GRID_BATCH;
                if (codes)
                    grid_code_batch(o + g * group, codes + i * cols + g * group,
                                    scales + (i * (cols / group) + g) * repeat, n, group, repeat, rule, top, mantissa,
                                    min_exp, 1.0f, mult);
                else
                    grid_batch(o + g * group, o + g * group, n, group, rule, top, mantissa, min_exp, 1.0f);
            }
        }
    });
}

/* The randomized block Hadamard of compressdit/quant/rotation.py (rotate, after the layer's balancing), bit for bit:
 * per row, v = x / smooth (smooth may be NULL) times the +-1 signs, then within each run of `block` values (the
 * largest power of two dividing cols, as rotate takes it) the butterflies of fwht in its order (h = 1, 2, 4, ...:
 * a + b and a - b of the values h apart in each run of 2h), each value divided by sqrt(block) (rounded to float, as
 * torch does with the Python float) at the end; then, where group > 0, compressdit_fake_quantize_grid's quantization
 * of the row (rules 0 and 1: scales from each group alone) in the same pass: its values into out (codes NULL), or
 * (codes not NULL) as compressdit_grid_codes_rows' codes and scales (each group's `repeat` times, `mult` the grid's
 * integer multiplier), the rotated rows left in out. out may be x's own memory. */
void compressdit_hadamard_rows(const float *x, const float *smooth, const int8_t *signs, int64_t rows, int64_t cols,
                               int64_t group, int32_t rule, float top, int32_t mantissa, int32_t min_exp,
                               int64_t repeat, float mult, float *out, uint8_t *codes, float *scales, int32_t threads) {
    hadamard_layer layer = {smooth, signs, cols, group, rule, mantissa, min_exp, top, NULL, NULL};
    float *scratch = x != out ? (float *)malloc(sizeof(float) * 2 * cols) : NULL;
    hadamard_divisors(&layer, scratch);
    hadamard_layer_rows(&layer, x, rows, out, codes, scales, repeat, mult, threads);
    free(scratch);
}

/* compressdit_hadamard_rows' layer prepared once, for compressdit_hadamard_layer_rows: its tensors' addresses (which
 * must outlive it), the grid, the fast rows' divisors; NULL where it could not be allocated. Freed by
 * compressdit_layer_free. A call with a layer of ready data takes 5 arguments where the plain one takes 16: ~2.5 us
 * less per call through ctypes, and no divisors computed per call. */
void *compressdit_hadamard_layer_new(const float *smooth, const int8_t *signs, int64_t cols, int64_t group,
                                     int32_t rule, float top, int32_t mantissa, int32_t min_exp) {
    hadamard_layer *layer = (hadamard_layer *)malloc(sizeof(hadamard_layer) + sizeof(float) * 2 * cols);
    if (!layer) return NULL;
    *layer = (hadamard_layer){smooth, signs, cols, group, rule, mantissa, min_exp, top, NULL, NULL};
    hadamard_divisors(layer, (float *)(layer + 1));
    return layer;
}

/* compressdit_hadamard_rows of `rows` rows of x into out (without codes) for a layer of
 * compressdit_hadamard_layer_new */
void compressdit_hadamard_layer_rows(const void *layer, const float *x, int64_t rows, float *out, int32_t threads) {
    hadamard_layer_rows((const hadamard_layer *)layer, x, rows, out, NULL, NULL, 1, 1.0f, threads);
}

/* what compressdit_*_layer_new allocated */
void compressdit_layer_free(void *layer) { free(layer); }

/* One greedy step of DuQuant's block rotations (compressdit/quant/duquant.py, _apply_step) on the `block` values at p:
 * each times its sign, the first swapped with the one at `top`, fwht's butterflies, each divided by norm (sqrt(block)
 * rounded to float, as torch divides by the Python float): the same single operations, so the same bits. */
static void duquant_step(float *restrict p, const float *restrict sign, int32_t top, int64_t block, float norm) {
    for (int64_t j = 0; j < block; ++j) p[j] *= sign[j];
    const float first = p[0];
    p[0] = p[top];
    p[top] = first;
    butterflies(p, block, block);
    for (int64_t j = 0; j < block; ++j) p[j] = p[j] / norm;
}

/* The steps of one half (R1 or R2) of a DuQuant rotation on one row: block b's counts[b] steps (their signs and tops
 * from step offset[b] on), in order */
static void duquant_half(float *row, int64_t blocks, int64_t block, const int32_t *counts, const int64_t *offset,
                         const int32_t *tops, const float *signs, float norm) {
    for (int64_t b = 0; b < blocks; ++b)
        for (int64_t s = offset[b]; s < offset[b] + counts[b]; ++s)
            duquant_step(row + b * block, signs + s * block, tops[s], block, norm);
}

/* One row r of the DuQuant pass before its grid, into o (v: scratch of the row's width) */
static void duquant_row(const float *restrict r, const float *restrict smooth, int64_t cols, int64_t block,
                        const int32_t *counts, const int64_t *offset, const int32_t *tops, const float *signs,
                        const int64_t *perm, float norm, float *restrict v, float *restrict o) {
    const int64_t blocks = cols / block;
    if (smooth)
        for (int64_t j = 0; j < cols; ++j) v[j] = r[j] / smooth[j];
    else
        memcpy(v, r, sizeof(float) * cols);
    duquant_half(v, blocks, block, counts, offset, tops, signs, norm);
    for (int64_t j = 0; j < cols; ++j) o[j] = v[perm[j]];
    duquant_half(o, blocks, block, counts + blocks, offset + blocks, tops, signs, norm);
}

/* What the DuQuant pass takes from a layer (compressdit_duquant_layer_new), with each block's first step (offset
 * [2 * blocks + 1]) */
typedef struct {
    const float *smooth;
    int64_t cols, block, group;
    const int32_t *counts, *tops;
    const float *signs;
    const int64_t *perm;
    int32_t rule, mantissa, min_exp;
    float top;
    int64_t *offset;
} duquant_layer;

/* compressdit_duquant_layer_rows */
static int duquant_layer_rows(const duquant_layer *layer, const float *x, int64_t rows, float *out, int32_t threads) {
    const int64_t cols = layer->cols, block = layer->block, group = layer->group, *offset = layer->offset,
                  *perm = layer->perm;
    const int32_t rule = layer->rule, mantissa = layer->mantissa, min_exp = layer->min_exp, *counts = layer->counts,
                  *tops = layer->tops;
    const float top = layer->top, *smooth = layer->smooth, *signs = layer->signs,
                norm = (float)__builtin_sqrt((double)block);
    const int64_t per = 16, batches = (rows + per - 1) / per; /* a row's scratch for R1, allocated a batch at a time */
    /* LRQ's int4 / int8 activations in groups of 16 on widths of 128 multiples: grid16_values */
    const int fast = group == 16 && rule == 0 && integer_grid(top, mantissa, min_exp) && cols % 128 == 0;
    (void)fast;
    int failed = 0;
    FOR_ROWS_MAX(failed, c, batches, {
        float *v = (float *)malloc(sizeof(float) * cols);
        failed = v ? failed : 1;
        for (int64_t i = c * per; v && i < rows && i < (c + 1) * per; ++i) {
            const float *r = x + i * cols;
            float *o = out + i * cols;
            duquant_row(r, smooth, cols, block, counts, offset, tops, signs, perm, norm, v, o);
#if defined(__AVX2__) && defined(__FMA__)
            if (fast && !grid16_values(o, cols, 1.0f, 1.0f, top)) continue;
            if (fast) /* a value out of grid16_values' range: the row again, then grid_batch */
                duquant_row(r, smooth, cols, block, counts, offset, tops, signs, perm, norm, v, o);
#endif
            for (int64_t g = 0; group && g < cols / group; g += GRID_BATCH) {
                const int64_t n = cols / group - g < GRID_BATCH ? cols / group - g : GRID_BATCH;
                grid_batch(o + g * group, o + g * group, n, group, rule, top, mantissa, min_exp, 1.0f);
            }
        }
        free(v);
    });
    return failed;
}

/* DuQuant's outlier rotation T = R1 P R2 of rows after the balancing division (smooth may be NULL), as
 * compressdit/quant/duquant.py's RotationSteps.apply computes it, bit for bit: x / smooth (IEEE divisions, as torch),
 * each block's R1 steps (duquant_step; `counts` [2 * blocks]: the steps of R1's blocks, then R2's, their tops and
 * signs [steps, block] in that order), the permutation (v[perm[j]] to column j), R2's steps; then, where group > 0,
 * compressdit_fake_quantize_grid's quantization of the row (rules 0 and 1: scales from each group alone) in the same
 * pass. Applying the steps costs ~10 operations an element a step where T's dense blocks cost `block` multiply-adds,
 * and calibrated layers take few (the zoo's and a PixArt's DuQuant layers 0-1 a block). This prepares a layer once
 * (each block's first step) for compressdit_duquant_layer_rows: the tensors' addresses must outlive it; NULL where it
 * could not be allocated. Freed by compressdit_layer_free. */
void *compressdit_duquant_layer_new(const float *smooth, int64_t cols, int64_t block, const int32_t *counts,
                                    const int32_t *tops, const float *signs, const int64_t *perm, int64_t group,
                                    int32_t rule, float top, int32_t mantissa, int32_t min_exp) {
    const int64_t blocks = cols / block;
    duquant_layer *layer = (duquant_layer *)malloc(sizeof(duquant_layer) + sizeof(int64_t) * (2 * blocks + 1));
    if (!layer) return NULL;
    *layer = (duquant_layer){smooth, cols, block, group, counts, tops, signs, perm, rule, mantissa, min_exp, top,
                             (int64_t *)(layer + 1)};
    layer->offset[0] = 0;
    for (int64_t b = 0; b < 2 * blocks; ++b) layer->offset[b + 1] = layer->offset[b] + counts[b];
    return layer;
}

/* The rotation (and grid) of `rows` rows of x into out (not x) for a layer of compressdit_duquant_layer_new. Returns
 * nonzero, out unfinished, where its scratch could not be allocated. */
int compressdit_duquant_layer_rows(const void *layer, const float *x, int64_t rows, float *out, int32_t threads) {
    return duquant_layer_rows((const duquant_layer *)layer, x, rows, out, threads);
}

/* h [n, rank] = b [n, cols] @ d [cols, rank] for n <= 4 rows: each output the sum over k in order, one fused
 * multiply-add a term (the same arithmetic on every path: AVX2 vectors of 8 ranks, 4 rows at a time, or fmaf) */
static void times_rows(const float *restrict b, int64_t n, int64_t cols, const float *restrict d, int64_t rank,
                       float *restrict h) {
    int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (n == 4) {
        for (; c + 16 <= rank; c += 16) { /* 8 sums in flight: the FMA latency hidden */
            __m256 s[4][2];
            for (int r = 0; r < 4; ++r) s[r][0] = s[r][1] = _mm256_setzero_ps();
            for (int64_t k = 0; k < cols; ++k) {
                const __m256 d0 = _mm256_loadu_ps(d + k * rank + c), d1 = _mm256_loadu_ps(d + k * rank + c + 8);
                for (int r = 0; r < 4; ++r) {
                    const __m256 v = _mm256_broadcast_ss(b + r * cols + k);
                    s[r][0] = _mm256_fmadd_ps(v, d0, s[r][0]);
                    s[r][1] = _mm256_fmadd_ps(v, d1, s[r][1]);
                }
            }
            for (int r = 0; r < 4; ++r) {
                _mm256_storeu_ps(h + r * rank + c, s[r][0]);
                _mm256_storeu_ps(h + r * rank + c + 8, s[r][1]);
            }
        }
    }
    for (; c + 8 <= rank; c += 8) {
        for (int64_t r = 0; r < n; ++r) {
            __m256 s = _mm256_setzero_ps();
            for (int64_t k = 0; k < cols; ++k)
                s = _mm256_fmadd_ps(_mm256_broadcast_ss(b + r * cols + k), _mm256_loadu_ps(d + k * rank + c), s);
            _mm256_storeu_ps(h + r * rank + c, s);
        }
    }
#endif
    for (; c < rank; ++c) {
        for (int64_t r = 0; r < n; ++r) {
            float s = 0.0f;
            for (int64_t k = 0; k < cols; ++k) s = __builtin_fmaf(b[r * cols + k], d[k * rank + c], s);
            h[r * rank + c] = s;
        }
    }
}

/* SVDQuant's down product h = b @ d of balanced rows b [rows, cols] and d [cols, rank] (rows in blocks of 4 over the
 * threads): where at::mm / torch.mm (MKL) took ~20 us for 256 x 128 @ 128 x 16 on a Zen 3 core */
void compressdit_times_rows(const float *b, int64_t rows, int64_t cols, const float *d, int64_t rank, float *h,
                            int32_t threads) {
    FOR_ROWS(i, (rows + 3) / 4, {
        const int64_t r0 = 4 * i, n = rows - r0 < 4 ? rows - r0 : 4;
        times_rows(b + r0 * cols, n, cols, d, rank, h + r0 * rank);
    });
}
