/* One Linear layer of a decode step, whatever its weights' format: the descriptor, the inputs
   prepared once for the kernel that reads the weights, and the output rows split over threads. */
#ifndef FUYU_LINEAR_H
#define FUYU_LINEAR_H

#include "gemv.h"
#include "quant.h"

/* A weight: fmt and group as native.h's wformat; w, scales as quant.h lays them out (PLAIN: w
   (N, K) in dt, no scales); bias (N) in dt or NULL. */
typedef struct {
    wformat fmt;
    int group;
    const void *w, *scales, *bias;
} lin;

/* A quantized format as quant.h's q_row takes it: 0 INT8, 1 INT4, 2 INT4N. */
static inline int quant_code(wformat fmt) { return fmt == INT4N ? 2 : fmt == INT4; }

/* What a Linear does with each output value y = sum + bias, first rounded to dt as torch's Linear
   would: store it in dt (OUT), keep it in float32 (KEEP), add it to a float32 residual (ADD), or
   keep its squared ReLU rounded again (RELU2: torch's relu_ then square_). */
enum { OUT, KEEP, ADD, RELU2 };

/* Whether a plain 16-bit weight goes through the bfloat16 dot product (gemv.h). */
static inline int uses_dot_bf16(const lin *lw, dtype dt, int64_t K) {
    return HAVE_DOT_BF16 && lw->fmt == PLAIN && dt == BF16 && K % 32 == 0;
}

/* Bytes of the largest prepared input of B rows of K (float32 interleaved, or quant.h's layouts
   with their headers), then K int16 of room for quantizing a row. */
static inline int64_t prepared_core(int64_t B, int64_t K) {
    return B * K * 4 + q4_inputs_offset(B, K);
}
static inline int64_t prepared_bytes(int64_t B, int64_t K) { return prepared_core(B, K) + K * 2 + 64; }

/* x (B, K) float32, rounded to dt already -> xp, the layout lw's kernel reads. */
static void prepare(const float *x, int64_t B, int64_t K, const lin *lw, dtype dt, void *xp) {
    (void)dt;
    int16_t *tmp = (int16_t *)((char *)xp + prepared_core(B, K));
    if (lw->fmt == INT8)
        q8_prepare(x, B, K, xp, tmp);
    else if (lw->fmt == INT4 || lw->fmt == INT4N)
        q4_prepare(x, B, K, lw->group, xp);
#if HAVE_DOT_BF16
    else if (uses_dot_bf16(lw, dt, K))
        interleave_bf16(x, B, K, xp);
#endif
    else
        interleave(x, B, K, xp);
}

static inline __attribute__((always_inline)) void finish(float v, const lin *lw, dtype dt, int64_t n,
                                                         int64_t c, int64_t N, int mode, void *yt,
                                                         float *yf) {
    float t = rounded(v + (lw->bias ? get(lw->bias, n, dt) : 0.f), dt);
    switch (mode) {
    case OUT: put(yt, c * N + n, t, dt); break;
    case KEEP: yf[c * N + n] = t; break;
    case ADD: yf[c * N + n] += t; break;
    default: t = t < 0.f ? 0.f : t; yf[c * N + n] = rounded(t * t, dt); break;
    }
}

/* y (B, N) = x (B, K) @ W^T + bias, 1 <= B <= 8, inside a parallel region: the weight's rows
   (tiles of 4) are split over its threads (an orphaned omp for, with its barrier at the end).
   x: the float32 rows, xp: as `prepare` made them. yt: the output in dt (OUT), else yf: float32. */
static void linear_rows(const float *x, const void *xp, const lin *lw, dtype dt, int64_t B,
                        int64_t N, int64_t K, int mode, void *yt, float *yf) {
    if (lw->fmt != PLAIN) {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < N / 4; t++) {
            float s[32];
            if (lw->fmt == INT8)
                q8_tile_all((const int8_t *)lw->w + t * 4 * K, (const float *)lw->scales + 4 * t, K, xp, B, s);
            else
                q4_tile_all((const uint8_t *)lw->w + t * 4 * (K / 2),
                            (const uint16_t *)lw->scales + t * 4 * (K / lw->group) * 2, K, lw->group,
                            lw->fmt == INT4N, xp, B, s);
            for (int r = 0; r < 4; r++)
                for (int64_t c = 0; c < B; c++) finish(s[r * 8 + c], lw, dt, 4 * t + r, c, N, mode, yt, yf);
        }
        return;
    }
#if HAVE_DOT_BF16
    if (uses_dot_bf16(lw, dt, K)) {
        /* one input row over short weight rows (K = 1,024: 2 KB): 8 rows a tile, half the tiles'
           ends (a 537 MB head, paired with reads: 74-103% of the read rate against 67-97%) */
        if (B == 1 && K <= 2048 && N % 8 == 0) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < N / 8; t++) {
                const uint16_t *w = (const uint16_t *)lw->w + 8 * t * K;
                float s[64];
                bf16_tile(w, K, xp, 1, 0, 8, 1, s);
                for (int r = 0; r < 8; r++) finish(s[r * 8], lw, dt, 8 * t + r, 0, N, mode, yt, yf);
            }
            return;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < (N + 3) / 4; t++) {
            int64_t n = 4 * t, R = N - n < 4 ? N - n : 4;
            const uint16_t *w = (const uint16_t *)lw->w + n * K;
            float s[32];
            switch (R) {
            case 1: bf16_rows_all(w, K, xp, B, 1, s); break;
            case 2: bf16_rows_all(w, K, xp, B, 2, s); break;
            case 3: bf16_rows_all(w, K, xp, B, 3, s); break;
            default: bf16_rows_all(w, K, xp, B, 4, s); break;
            }
            for (int r = 0; r < R; r++)
                for (int64_t c = 0; c < B; c++) finish(s[r * 8 + c], lw, dt, n + r, c, N, mode, yt, yf);
        }
        return;
    }
#endif
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float s[8];
        row_of(dt, (const char *)lw->w + n * K * size_of(dt), xp, x, K, B, s);
        for (int64_t c = 0; c < B; c++) finish(s[c], lw, dt, n, c, N, mode, yt, yf);
    }
}

/* Row n of a weight as float32 values in out (K): plain, or quantized (quant.h's q_row). */
static void dense_row(const lin *lw, dtype dt, int64_t n, int64_t K, int unscaled, float *out) {
    if (lw->fmt == PLAIN)
        for (int64_t k = 0; k < K; k++) out[k] = get(lw->w, n * K + k, dt);
    else
        q_row(quant_code(lw->fmt), lw->group, lw->w, lw->scales, n, K, unscaled, out);
}

#endif
