/* The row loop shared by int8_rows.c and float_rows.c (compressdit/quant/cpu_native.py builds both into one
 * library): each pass is independent per row, so rows split over `threads` OpenMP threads. */
#ifndef COMPRESSDIT_ROWS_H
#define COMPRESSDIT_ROWS_H

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

/* FOR_ROWS with a max reduction into m */
#define FOR_ROWS_MAX(m, i, n, ...) \
    FOR_ROWS_WITH("omp parallel for schedule(static) num_threads(threads) reduction(max : m)", i, n, __VA_ARGS__)

#endif
