/* What group_gemm.c and int4_dot.c share (compressdit/quant/cpu_native.py builds both into one library): the 16 x 16
 * transpose of 4-byte groups that packs a block of 16 row-major channels into the tiles' channel-in-lane layout. */
#ifndef COMPRESSDIT_TRANSPOSE_H
#define COMPRESSDIT_TRANSPOSE_H

#if defined(__AVX512F__) && defined(__GNUC__)
#include <immintrin.h>

/* r[c] (c < 16): 16 dwords each, -> r[q] holds dword q of every r[c] in order (a 16 x 16 transpose of dwords):
 * 32-bit then 64-bit interleaves within 128-bit lanes, then the 4 x 4 transpose of the lanes */
static __attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 8; ++i) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int j = 0; j < 4; ++j) { /* b[4j + e], lane L: rows 4j .. 4j + 3 of column 4L + e */
        b[4 * j] = _mm512_unpacklo_epi64(a[4 * j], a[4 * j + 2]);
        b[4 * j + 1] = _mm512_unpackhi_epi64(a[4 * j], a[4 * j + 2]);
        b[4 * j + 2] = _mm512_unpacklo_epi64(a[4 * j + 1], a[4 * j + 3]);
        b[4 * j + 3] = _mm512_unpackhi_epi64(a[4 * j + 1], a[4 * j + 3]);
    }
    for (int e = 0; e < 4; ++e) {
        const __m512i c0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0x44), c1 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0xee);
        const __m512i c2 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0x44);
        const __m512i c3 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0xee);
        r[e] = _mm512_shuffle_i32x4(c0, c2, 0x88);
        r[4 + e] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
        r[8 + e] = _mm512_shuffle_i32x4(c1, c3, 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
    }
}
#endif

#endif
