/* One MoE FFN layer's routing and expert matmuls on the CPU in two calls (compressdit/moe/cpu_native.py builds
 * and calls them; the activation between them stays torch's): the same arithmetic as the PyTorch path of
 * compressdit/moe/routing.py and stacked.py, call for call.
 *
 * Every matmul is the MKL `sgemm_` call torch's mm / addmm makes for `x @ w.t()` with fp32 row-major x [m, k] and
 * weight w [n, k] (column-major view: C^T = W^T-transposed times X^T), on a whole expert's rows and on one thread:
 * with several threads the experts (and the shared expert) run side by side, each matmul alone, instead of one
 * small matmul after the other split over the threads. Elementwise adds and multiplies are done one operation at a
 * time as torch does them (the library is built with -ffp-contract=off: no fused multiply-add). */
#include <stdint.h>
#include <string.h>
#include <math.h>

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
 * and per token the grouped rows of its experts in ascending expert order (positions [tokens, k]) with the slot of
 * `chosen` each came from (slots [tokens, k]). Serial: ~1 % of the layer. */
void compressdit_moe_route(sgemm_fn sgemm, const float *x, int64_t tokens, int64_t dim, const float *router_w,
                           const float *router_b, int64_t experts, int64_t k, float *logits, int64_t *chosen,
                           int64_t *counts, int64_t *rows, int64_t *positions, int64_t *slots) {
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
}

/* Experts in decreasing row count, the shared one (index `experts`, `shared_rows` rows) among them: the order the
 * threads take them in (largest first balances the two threads' loads). */
static void by_size(const int64_t *counts, int64_t experts, int64_t shared_rows, int64_t *order) {
    int64_t n = 0;
    for (int64_t e = 0; e <= experts; ++e) {
        const int64_t size = e < experts ? counts[e] : shared_rows;
        int64_t i = n++;
        while (i > 0 && (order[i - 1] < experts ? counts[order[i - 1]] : shared_rows) < size) {
            order[i] = order[i - 1];
            --i;
        }
        order[i] = e;
    }
}

/* The up projections: the shared expert's hidden rows shared_h [tokens, shared_hidden] = x @ shared_up^T (+ bias,
 * as F.linear: addmm) and every routed expert's, hidden [tokens * k, hidden] = x[rows of e] @ up[e]^T, then + up_b[e]
 * (grouped_mm, then add_). The gathered rows go to xs [tokens * k, dim]. `order` [experts + 1]: scratch. */
void compressdit_moe_up(sgemm_fn sgemm, const float *x, int64_t tokens, int64_t dim, int64_t experts,
                        const int64_t *counts, const int64_t *rows, const float *shared_up, const float *shared_up_b,
                        int64_t shared_hidden, const float *up, const float *up_b, int64_t hidden, float *xs,
                        float *shared_h, float *routed_h, int64_t *order, int threads) {
    by_size(counts, experts, shared_up != NULL ? tokens : 0, order);
    int64_t starts[experts + 1];
    starts[0] = 0;
    for (int64_t e = 0; e < experts; ++e)
        starts[e + 1] = starts[e] + counts[e];
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i <= experts; ++i) {
        const int64_t e = order[i];
        if (e == experts) {
            if (shared_up == NULL)
                continue;
            if (shared_up_b != NULL)
                fill_rows(shared_h, shared_up_b, tokens, shared_hidden);
            linear(sgemm, x, shared_up, tokens, shared_hidden, dim, shared_up_b != NULL, shared_h);
            continue;
        }
        const int64_t start = starts[e], n = counts[e];
        if (n == 0)
            continue;
        float *xe = xs + start * dim, *he = routed_h + start * hidden;
        for (int64_t r = 0; r < n; ++r)
            memcpy(xe + r * dim, x + rows[start + r] * dim, (size_t)dim * sizeof(float));
        linear(sgemm, xe, up + e * hidden * dim, n, hidden, dim, 0, he);
        if (up_b != NULL) {
            const float *b = up_b + e * hidden;
            for (int64_t r = 0; r < n; ++r)
                for (int64_t c = 0; c < hidden; ++c)
                    he[r * hidden + c] = he[r * hidden + c] + b[c];
        }
    }
}

/* The down projections and the combination: out [tokens, dim_out] = shared expert + bias (addmm; the bias alone, or
 * zeros, without one), y [tokens * k, dim_out] = hidden[rows of e] @ down[e]^T per routed expert, then every token
 * adds its experts' rows in ascending expert order, each times its gate (gates [tokens, k] in `chosen`'s slots;
 * NULL: unit gates, not multiplied), as the gated index_add_ does. */
void compressdit_moe_down(sgemm_fn sgemm, int64_t tokens, int64_t experts, int64_t k, const int64_t *counts,
                          const int64_t *positions, const int64_t *slots, const float *gates, const float *shared_h,
                          const float *shared_down, int64_t shared_hidden, const float *bias, const float *routed_h,
                          const float *down, int64_t hidden, int64_t dim_out, float *y, float *out, int64_t *order,
                          int threads) {
    by_size(counts, experts, shared_down != NULL ? tokens : 0, order);
    int64_t starts[experts + 1];
    starts[0] = 0;
    for (int64_t e = 0; e < experts; ++e)
        starts[e + 1] = starts[e] + counts[e];
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i <= experts; ++i) {
            const int64_t e = order[i];
            if (e == experts) {
                if (bias != NULL)
                    fill_rows(out, bias, tokens, dim_out);
                else
                    memset(out, 0, (size_t)(tokens * dim_out) * sizeof(float));
                if (shared_down != NULL)
                    linear(sgemm, shared_h, shared_down, tokens, dim_out, shared_hidden, bias != NULL, out);
                continue;
            }
            linear(sgemm, routed_h + starts[e] * hidden, down + e * dim_out * hidden, counts[e], dim_out, hidden, 0,
                   y + starts[e] * dim_out);
        }
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
