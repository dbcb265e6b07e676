/* One MoE FFN layer on the CPU (compressdit/moe/cpu_native.py builds and calls it): the same arithmetic as the
 * PyTorch path of compressdit/moe/routing.py and stacked.py, call for call: in one call where the tanh-GELU can be
 * computed here as torch's vectorized kernel computes it, else in two around torch's activation.
 *
 * Every matmul is the MKL `sgemm_` call torch's mm / addmm makes for `x @ w.t()` with fp32 row-major x [m, k] and
 * weight w [n, k] (in BLAS's column-major terms y^T = w x^T), on a whole expert's rows and on one thread (MKL
 * called inside an OpenMP parallel region runs on the calling thread): with several threads the experts (and the
 * shared expert) run side by side instead of one small matmul after the other split over the threads. Elementwise
 * adds and multiplies are done one operation at a time as torch does them (built with -ffp-contract=off: no
 * contracted multiply-adds; the one fused multiply-add below is torch's own, written out). */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdatomic.h>
#include <sched.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);

/* y [m, n] = x [m, k] @ w [n, k]^T, plus y's current contents when `accumulate` (torch's addmm after copying the
 * bias into y), as torch's addmm_impl_cpu_ calls BLAS for these layouts: sgemm('t', 'n', n, m, k, ...). */
static void linear(sgemm_fn sgemm, const float *x, const float *w, int64_t m, int64_t n, int64_t k, int accumulate,
                   float *y) {
    if (m == 0)
        return;
    const int mm = (int)n, nn = (int)m, kk = (int)k, ldw = (int)k, ldx = (int)k, ldy = (int)n;
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    sgemm("t", "n", &mm, &nn, &kk, &one, w, &ldw, x, &ldx, &beta, y, &ldy);
}

static void fill_rows(float *y, const float *row, int64_t m, int64_t n) {
    for (int64_t i = 0; i < m; ++i)
        memcpy(y + i * n, row, (size_t)n * sizeof(float));
}

/* torch.topk's order: larger first, NaN above every number */
static int above(float a, float b) { return (isnan(a) && !isnan(b)) || a > b; }

/* The routing of `tokens` tokens: router logits (x @ router_w^T + router_b), the top `k` experts of each token
 * (chosen [tokens, k], largest logit first; equal logits: the lower expert first), the assignments grouped by
 * expert with each expert's tokens ascending (rows [tokens * k]: the token of each grouped row; counts [experts]),
 * per token the grouped rows of its experts in ascending expert order (positions [tokens, k]) with the slot of
 * `chosen` each came from (slots [tokens, k]), and the experts largest first (order [experts]). */
static void route(sgemm_fn sgemm, const float *x, int64_t tokens, int64_t dim, const float *router_w,
                  const float *router_b, int64_t experts, int64_t k, float *logits, int64_t *chosen, int64_t *counts,
                  int64_t *rows, int64_t *positions, int64_t *slots, int64_t *order) {
    if (router_b != NULL)
        fill_rows(logits, router_b, tokens, experts);
    linear(sgemm, x, router_w, tokens, experts, dim, router_b != NULL, logits);
    memset(counts, 0, (size_t)experts * sizeof(int64_t));
    for (int64_t t = 0; t < tokens; ++t) {
        const float *l = logits + t * experts;
        int64_t *c = chosen + t * k;
        for (int64_t j = 0; j < k; ++j) {
            int64_t best = -1;
            for (int64_t e = 0; e < experts; ++e) {
                int taken = 0;
                for (int64_t i = 0; i < j; ++i)
                    taken |= c[i] == e;
                if (!taken && (best < 0 || above(l[e], l[best])))
                    best = e;
            }
            c[j] = best;
            counts[best] += 1;
        }
    }
    int64_t start = 0; /* a counting sort: each expert's rows in token order (torch's stable sort) */
    for (int64_t e = 0; e < experts; ++e) {
        const int64_t n = counts[e];
        counts[e] = start; /* the expert's cursor for now */
        start += n;
    }
    for (int64_t t = 0; t < tokens; ++t) {
        int64_t *p = positions + t * k, *s = slots + t * k;
        for (int64_t j = 0; j < k; ++j) {
            const int64_t e = chosen[t * k + j], row = counts[e]++;
            rows[row] = t;
            int64_t i = j; /* insertion by expert: the token's rows in ascending expert order */
            while (i > 0 && chosen[t * k + s[i - 1]] > e) {
                p[i] = p[i - 1];
                s[i] = s[i - 1];
                --i;
            }
            p[i] = row;
            s[i] = j;
        }
    }
    for (int64_t e = experts - 1; e > 0; --e) /* cursors, now at each expert's end, back to counts */
        counts[e] -= counts[e - 1];
    for (int64_t e = 0; e < experts; ++e) { /* largest first (the threads' balance), ties by index */
        int64_t i = e;
        while (i > 0 && counts[order[i - 1]] < counts[e]) {
            order[i] = order[i - 1];
            --i;
        }
        order[i] = e;
    }
}

static void starts_of(const int64_t *counts, int64_t experts, int64_t *starts) {
    starts[0] = 0;
    for (int64_t e = 0; e < experts; ++e)
        starts[e + 1] = starts[e] + counts[e];
}

#ifdef __AVX512F__
typedef __m512 (*tanh16_fn)(__m512);

/* h = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) in place, as torch's AVX-512 GELU(approximate='tanh') kernel
 * computes it in its vectorized loop (x^3 as (x x) x, the inner sum one fused multiply-add, tanh Sleef_tanhf16_u10:
 * bit for bit on 2e7 random inputs); a last partial vector goes through the same arithmetic in a padded copy. */
static void gelu_tanh(tanh16_fn tanh16, float *h, int64_t n) {
    const __m512 beta = _mm512_set1_ps((float)(1.41421356237309504880 * 1.12837916709551257390 * 0.5));
    const __m512 kappa = _mm512_set1_ps(0.044715f), one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    for (int64_t i = 0; i < n; i += 16) {
        float pad[16] = {0};
        const int full = n - i >= 16;
        float *p = full ? h + i : pad;
        if (!full)
            memcpy(pad, h + i, (size_t)(n - i) * sizeof(float));
        const __m512 x = _mm512_loadu_ps(p), cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        const __m512 inner = _mm512_mul_ps(beta, _mm512_fmadd_ps(kappa, cube, x));
        _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, tanh16(inner))));
        if (!full)
            memcpy(h + i, pad, (size_t)(n - i) * sizeof(float));
    }
}
#else
typedef void *tanh16_fn;
static void gelu_tanh(tanh16_fn tanh16, float *h, int64_t n) { (void)tanh16, (void)h, (void)n; }
#endif

/* 1 for a build whose gelu_tanh is torch's AVX-512 kernel */
int compressdit_moe_fused_gelu(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

enum { UP = 1, DOWN = 2 };

/* The layer, or the part of it `phases` names:
 *   UP: the routing (route above; `index` holds chosen, rows, positions, slots [tokens * k] each, then counts and
 *       order [experts]) and the up projections: the shared expert's hidden rows shared_h [tokens, shared_hidden] =
 *       x @ shared_up^T (+ bias, as F.linear: addmm) and every routed expert's, routed_h [tokens * k, hidden] =
 *       x[rows of e] @ up[e]^T, then + up_b[e] (grouped_mm, then add_), the gathered rows in xs [tokens * k, dim];
 *       with `tanh16` (UP | DOWN only) each expert's hidden rows then pass the tanh-GELU;
 *   DOWN: out [tokens, dim_out] = shared expert + bias (addmm; the bias alone, or zeros, without one), y [tokens * k,
 *       dim_out] = routed_h[rows of e] @ down[e]^T, then every token adds its experts' rows in ascending expert
 *       order, each times its gate (gates [tokens, k] in `chosen`'s slots; NULL: unit gates, not multiplied), as the
 *       gated index_add_ does.
 * Tasks: 0 routes while 1 runs the shared expert (which needs no routing); the routed experts follow, largest first,
 * each waiting for the routing if it was handed out before that finished; then the scatter, split by tokens. */
void compressdit_moe_ffn(sgemm_fn sgemm, tanh16_fn tanh16, int phases, const float *x, int64_t tokens, int64_t dim,
                         const float *router_w, const float *router_b, int64_t experts, int64_t k,
                         const float *shared_up, const float *shared_up_b, const float *shared_down,
                         int64_t shared_hidden, const float *up, const float *up_b, const float *down, int64_t hidden,
                         const float *bias, int64_t dim_out, const float *gates, float *logits, int64_t *index,
                         float *xs, float *y, float *shared_h, float *routed_h, float *out, int threads) {
    const int64_t n = tokens * k;
    int64_t *chosen = index, *rows = index + n, *positions = index + 2 * n, *slots = index + 3 * n;
    int64_t *counts = index + 4 * n, *order = counts + experts, starts[experts + 1];
    atomic_int routed = !(phases & UP);
    if (!(phases & UP))
        starts_of(counts, experts, starts);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < experts + 2; ++task) {
            if (task == 0) {
                if (phases & UP) {
                    route(sgemm, x, tokens, dim, router_w, router_b, experts, k, logits, chosen, counts, rows,
                          positions, slots, order);
                    starts_of(counts, experts, starts);
                    atomic_store_explicit(&routed, 1, memory_order_release);
                }
                continue;
            }
            if (task == 1) {
                if ((phases & UP) && shared_up != NULL) {
                    if (shared_up_b != NULL)
                        fill_rows(shared_h, shared_up_b, tokens, shared_hidden);
                    linear(sgemm, x, shared_up, tokens, shared_hidden, dim, shared_up_b != NULL, shared_h);
                    if (tanh16 != NULL)
                        gelu_tanh(tanh16, shared_h, tokens * shared_hidden);
                }
                if (phases & DOWN) {
                    if (bias != NULL)
                        fill_rows(out, bias, tokens, dim_out);
                    else if (shared_down == NULL)
                        memset(out, 0, (size_t)(tokens * dim_out) * sizeof(float));
                    if (shared_down != NULL)
                        linear(sgemm, shared_h, shared_down, tokens, dim_out, shared_hidden, bias != NULL, out);
                }
                continue;
            }
            for (int spins = 0; !atomic_load_explicit(&routed, memory_order_acquire);)
                if (++spins > 1000) /* the routing thread was likely preempted: let it run */
                    sched_yield();
            const int64_t e = order[task - 2], start = starts[e], count = counts[e];
            float *he = routed_h + start * hidden;
            if (phases & UP) {
                float *xe = xs + start * dim;
                for (int64_t r = 0; r < count; ++r)
                    memcpy(xe + r * dim, x + rows[start + r] * dim, (size_t)dim * sizeof(float));
                linear(sgemm, xe, up + e * hidden * dim, count, hidden, dim, 0, he);
                if (up_b != NULL) {
                    const float *b = up_b + e * hidden;
                    for (int64_t r = 0; r < count; ++r)
                        for (int64_t c = 0; c < hidden; ++c)
                            he[r * hidden + c] = he[r * hidden + c] + b[c];
                }
                if (tanh16 != NULL)
                    gelu_tanh(tanh16, he, count * hidden);
            }
            if (phases & DOWN)
                linear(sgemm, he, down + e * dim_out * hidden, count, dim_out, hidden, 0, y + start * dim_out);
        }
        if (phases & DOWN) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tokens; ++t) {
                float *o = out + t * dim_out;
                for (int64_t j = 0; j < k; ++j) {
                    const float *r = y + positions[t * k + j] * dim_out;
                    if (gates == NULL) {
                        for (int64_t c = 0; c < dim_out; ++c)
                            o[c] = o[c] + r[c];
                    } else {
                        const float g = gates[t * k + slots[t * k + j]];
                        for (int64_t c = 0; c < dim_out; ++c)
                            o[c] = o[c] + r[c] * g;
                    }
                }
            }
        }
    }
}
