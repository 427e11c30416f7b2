/* The matrix-vector product of a decode step: y (B, N) = x (B, K) @ w (N, K)^T + bias, B <= 8,
   one pass over the weights, float32 accumulation, each output rounded once as torch's Linear. */
#ifndef FUYU_GEMV_H
#define FUYU_GEMV_H

#include "isa.h"

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

/* row, compiled once per dtype. */
static void row_bf16(const void *w, const float *xi, const float *x, int64_t K, int64_t B, float *s) {
    row(w, BF16, xi, x, K, B, s);
}

static void row_f32(const void *w, const float *xi, const float *x, int64_t K, int64_t B, float *s) {
    row(w, F32, xi, x, K, B, s);
}

static inline void row_of(dtype dt, const void *w, const float *xi, const float *x, int64_t K,
                          int64_t B, float *s) {
    (dt == BF16 ? row_bf16 : row_f32)(w, xi, x, K, B, s);
}

#if HAVE_DOT_BF16
/* 16-bit weights with the bfloat16 dot product instruction (isa.h): the inputs are bfloat16
   already (every GEMV input is rounded to the weights' dtype first), interleaved for each 32
   columns (xb: each row's 32 in turn), and R <= 8 weight rows go through at once, each weight
   vector multiplied into BB <= 4 input rows (R * BB <= 16 accumulators), the inputs loaded once
   per R rows.
   s[r * 8 + b] for b0 <= b < b0 + BB. */
/* The weight rows a tile reads are R consecutive rows, one contiguous block; while it works the
   next block is fetched into L2 (prefetcht1), R lines a step, so that the block is there when its
   turn comes. Measured in pairs (a streaming sum, then the products, over the same 402 MB layer of
   Fuyu-8B's shapes, AVX-512 AMD EPYC family 25 model 17, sums at 45-58 GB/s): 93% of the sum's
   rate, where 512 bytes ahead of each row into L1 gave 79% and 4 KB ahead of each row into L2 84%
   (the hardware prefetchers follow 4 streams 8 KB apart less well than one). */
static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *w, int64_t K,
                                                            const uint16_t *xb, int64_t B,
                                                            int64_t b0, int R, int BB, float *s) {
    vf a[8][4];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < BB; b++) a[r][b] = (vf){0};
    const char *next = (const char *)(w + R * K);
    for (int64_t k = 0; k < K; k += 32) {
        bv v[8];
        for (int r = 0; r < R; r++) {
            __builtin_prefetch(next + (k / 32 * R + r) * 64, 0, 2);
            v[r] = bv_load(w + r * K + k);
        }
        const uint16_t *x = xb + k * B + b0 * 32;
        for (int b = 0; b < BB; b++) {
            bv xv = bv_load(x + b * 32);
            for (int r = 0; r < R; r++) a[r][b] = dot_bf16(a[r][b], v[r], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < BB; b++) s[r * 8 + b0 + b] = hsum(a[r][b]);
}

/* bf16_tile over every input row, 4 at a time. */
static inline __attribute__((always_inline)) void bf16_rows_all(const uint16_t *w, int64_t K,
                                                                const uint16_t *xb, int64_t B,
                                                                int R, float *s) {
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
        switch (B - b0) {
        case 1: bf16_tile(w, K, xb, B, b0, R, 1, s); break;
        case 2: bf16_tile(w, K, xb, B, b0, R, 2, s); break;
        case 3: bf16_tile(w, K, xb, B, b0, R, 3, s); break;
        default: bf16_tile(w, K, xb, B, b0, R, 4, s); break;
        }
    }
}

/* The inputs x (B, K) rounded to bfloat16 and interleaved for bf16_tile. */
static void interleave_bf16(const float *x, int64_t B, int64_t K, uint16_t *xb) {
    for (int64_t k = 0; k < K; k += 32)
        for (int64_t b = 0; b < B; b++)
            for (int j = 0; j < 32; j++) xb[k * B + b * 32 + j] = round_bf16(x[b * K + k + j]);
}
#endif

#endif
