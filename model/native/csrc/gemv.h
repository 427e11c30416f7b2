/* The matrix-vector product of a decode step: y (B, N) = x (B, K) @ w (N, K)^T + bias, B <= 8,
   one pass over the weights, float32 accumulation, each output rounded once as torch's Linear. */
#ifndef FUYU_GEMV_H
#define FUYU_GEMV_H

#include "vec.h"

/* Weight bytes read ahead of use: the hardware prefetchers alone left 10-20% of the read rate on
   the table (AMD EPYC, AVX2: 11 -> 13-15 GB/s per call on 64 MB, a float32 sum 14-16). */
#define PREFETCH 8192

/* One weight row w (K) against B input rows in one pass over the weight row: each weight vector
   is loaded and widened once and multiplied into B accumulators; U independent accumulators per
   input row so successive multiply-adds do not wait on each other. Callers pass B and U as
   constants (see `row`), so the accumulators live in registers. The inputs come interleaved (xi:
   for each L-wide slice of K, that slice of every row in turn), so they are read as one
   sequential stream: B rows 4 KB apart would fall into one set of the L1 cache and evict each
   other. The last K % L columns are read from the rows as given (x). s: the B sums. */
static inline __attribute__((always_inline)) void dot(const void *w, dtype dt, const float *xi,
                                                      const float *x, int64_t K, int B, int U,
                                                      float *s) {
    vf a[8][4];
    for (int b = 0; b < B; b++)
        for (int u = 0; u < U; u++) a[b][u] = (vf){0};
    int64_t k = 0;
    for (; k + U * L <= K; k += U * L)
        for (int u = 0; u < U; u++) {
            if ((u * L * size_of(dt)) % 64 == 0) /* once per cache line of weights */
                __builtin_prefetch((const char *)w + (k + u * L) * size_of(dt) + PREFETCH);
            vf v = load(w, k + u * L, dt);
            const float *p = xi + (k + u * L) * B;
            for (int b = 0; b < B; b++) a[b][u] += v * load_f32(p + b * L);
        }
    for (; k + L <= K; k += L) {
        vf v = load(w, k, dt);
        for (int b = 0; b < B; b++) a[b][0] += v * load_f32(xi + k * B + b * L);
    }
    for (int b = 0; b < B; b++) {
        vf t = a[b][0];
        for (int u = 1; u < U; u++) t += a[b][u];
        float r = hsum(t);
        for (int64_t j = k; j < K; j++) r += get(w, j, dt) * x[b * K + j];
        s[b] = r;
    }
}

/* dot for B = 1..8 rows, each with its own constant accumulator count (fewer per row as rows
   add accumulators of their own: 32 vector registers with AVX-512, 16 with AVX2). */
static inline __attribute__((always_inline)) void row(const void *w, dtype dt, const float *xi,
                                                      const float *x, int64_t K, int64_t B,
                                                      float *s) {
    switch (B) {
    case 1: dot(w, dt, xi, x, K, 1, 4, s); break;
    case 2: dot(w, dt, xi, x, K, 2, 2, s); break;
    case 3: dot(w, dt, xi, x, K, 3, 2, s); break;
    case 4: dot(w, dt, xi, x, K, 4, 1, s); break;
    case 5: dot(w, dt, xi, x, K, 5, 1, s); break;
    case 6: dot(w, dt, xi, x, K, 6, 1, s); break;
    case 7: dot(w, dt, xi, x, K, 7, 1, s); break;
    default: dot(w, dt, xi, x, K, 8, 1, s); break;
    }
}

/* The inputs x (B, K) interleaved into xi (see dot). */
static void interleave(const float *x, int64_t B, int64_t K, float *xi) {
    for (int64_t k = 0; k + L <= K; k += L)
        for (int64_t b = 0; b < B; b++) memcpy(xi + k * B + b * L, x + b * K + k, VB);
}

/* What a GEMV does with y = s + bias, each value first rounded to the weights' dtype as torch's
   Linear would: store it in that dtype (OUT), keep it in float32 (KEEP), add it to a float32
   residual (ADD), or keep its squared ReLU rounded again (RELU2: torch's relu_ then square_). */
enum { OUT, KEEP, ADD, RELU2 };

/* y (B, N) from x (B, K) @ w (N, K)^T + bias (N, may be NULL), 1 <= B <= 8, inside a parallel
   region: the weight rows are split over its threads (an orphaned omp for, with its barrier at
   the end). xi: x interleaved. yt: the output in dt (OUT), else yf: float32. */
static inline __attribute__((always_inline)) void rows(const float *xi, const float *x,
                                                       const void *w, const void *bias, dtype dt,
                                                       int64_t B, int64_t N, int64_t K, int mode,
                                                       void *yt, float *yf) {
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float s[8];
        row((const char *)w + n * K * size_of(dt), dt, xi, x, K, B, s);
        float b = bias ? get(bias, n, dt) : 0.f;
        for (int64_t c = 0; c < B; c++) {
            float t = rounded(s[c] + b, dt);
            switch (mode) {
            case OUT: put(yt, c * N + n, t, dt); break;
            case KEEP: yf[c * N + n] = t; break;
            case ADD: yf[c * N + n] += t; break;
            default: t = t < 0.f ? 0.f : t; yf[c * N + n] = rounded(t * t, dt); break;
            }
        }
    }
}

/* rows, compiled once per dtype (the layers call it four times a layer). */
static void rows_bf16(const float *xi, const float *x, const void *w, const void *bias, int64_t B,
                      int64_t N, int64_t K, int mode, void *yt, float *yf) {
    rows(xi, x, w, bias, BF16, B, N, K, mode, yt, yf);
}

static void rows_f32(const float *xi, const float *x, const void *w, const void *bias, int64_t B,
                     int64_t N, int64_t K, int mode, void *yt, float *yf) {
    rows(xi, x, w, bias, F32, B, N, K, mode, yt, yf);
}

static inline void rows_of(dtype dt, const float *xi, const float *x, const void *w,
                           const void *bias, int64_t B, int64_t N, int64_t K, int mode, void *yt,
                           float *yf) {
    (dt == BF16 ? rows_bf16 : rows_f32)(xi, x, w, bias, B, N, K, mode, yt, yf);
}

#endif
