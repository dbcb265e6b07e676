/* What int8_rows.c and float_rows.c share (compressdit/quant/cpu_native.py builds both into one library): the row
 * loop (each pass is independent per row, so rows split over `threads` OpenMP threads), the exact division by
 * reciprocal + FMA, and a row's absmax and balancing division. */
#ifndef COMPRESSDIT_ROWS_H
#define COMPRESSDIT_ROWS_H

#include <stdint.h>
#include <string.h>

/* for (int64_t i = 0; i < n; ++i) BODY on `threads` OpenMP threads under `pragma` (a string literal) when
 * threads > 1, else as a plain loop: entering even a one-thread parallel region costs ~0.6 us a call. */
#define FOR_ROWS_WITH(pragma, i, n, ...)             \
    do {                                             \
        if (threads > 1) {                           \
            _Pragma(pragma)                          \
            for (int64_t i = 0; i < (n); ++i) __VA_ARGS__ \
        } else {                                     \
            for (int64_t i = 0; i < (n); ++i) __VA_ARGS__ \
        }                                            \
    } while (0)

/* rows in contiguous static chunks (torch's split) */
#define FOR_ROWS(i, n, ...) \
    FOR_ROWS_WITH("omp parallel for schedule(static) num_threads(threads)", i, n, __VA_ARGS__)

/* the pragma's text with m's name in it (a string literal of its own does not take the argument) */
#define ROWS_PRAGMA_TEXT(...) #__VA_ARGS__

/* FOR_ROWS with a max reduction into m */
#define FOR_ROWS_MAX(m, i, n, ...)                                                                           \
    FOR_ROWS_WITH(ROWS_PRAGMA_TEXT(omp parallel for schedule(static) num_threads(threads) reduction(max : m)), i, n, \
                  __VA_ARGS__)

/* a / b rounded to nearest, as the IEEE division, from inv = 1 / b (rounded to nearest): q0 = a * inv is within
 * an ulp, and one FMA correction with the exact residual a - b * q0 rounds it correctly (Markstein's theorem;
 * also checked against the division on 4e8 random pairs). Division is the bottleneck of these loops otherwise
 * (a vector divide issues every ~5 cycles, a multiply-add twice a cycle). Needs normal, finite quotients:
 * callers check. Without hardware FMA, the plain division. */
static inline float div_rn(float a, float b, float inv) {
#if defined(__FMA__)
    float q0 = a * inv;
    return __builtin_fmaf(__builtin_fmaf(-q0, b, a), inv, q0);
#else
    (void)inv;
    return a / b;
#endif
}

/* The bit patterns of 2^100 and 2^-100: div_rn's exact range (the AVX2 passes of float_rows.c check it 8 lanes at a
 * time) */
#define DIV_ABOVE 0x71800000u
#define DIV_BELOW 0x0d800000u

/* div_rn(x, d, inv) where it is exact (see above): false where the quotient q (|q|'s bit pattern u) is NaN or
 * outside [2^-100, 2^100] for a nonzero x; callers then divide the plain way. */
static inline int div_in_range(uint32_t u, float x) {
    return !((u > DIV_ABOVE) | ((u < DIV_BELOW) & (x != 0.0f)));
}

/* |v| as its IEEE bit pattern: for non-negative floats, integer order is float order and NaN sorts above inf,
 * so an integer max reduction (which compilers vectorize without -ffast-math) is the float amax, NaN included. */
static inline uint32_t abs_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u & 0x7fffffffu;
}

/* max |x[j]| over n elements as its bit pattern (abs_bits) */
static inline uint32_t absmax_bits(const float *restrict x, int64_t n) {
    uint32_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
        const uint32_t u = abs_bits(x[j]);
        m = u > m ? u : m;
    }
    return m;
}

/* y = x / smooth over n elements, as the IEEE division (torch's x / smooth), by div_rn from inv = 1 / smooth: the
 * plain division again where a quotient left div_rn's exact range. Returns max |y| as its bit pattern. */
static inline uint32_t divide_row(const float *restrict x, const float *restrict smooth, const float *restrict inv,
                                  int64_t n, float *restrict y) {
    uint32_t m = 0;
    int bad = 0;
    for (int64_t j = 0; j < n; ++j) {
        const float q = div_rn(x[j], smooth[j], inv[j]);
        const uint32_t u = abs_bits(q);
        bad |= !div_in_range(u, x[j]);
        m = u > m ? u : m;
        y[j] = q;
    }
    if (!bad) return m;
    for (int64_t j = 0; j < n; ++j) y[j] = x[j] / smooth[j];
    return absmax_bits(y, n);
}

#endif
