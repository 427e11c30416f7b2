/* Fuyu's CPU kernels for decode steps: a matrix-vector product, one-query attention, all decoder
   layers of a step in one call, and argmax. One translation unit; fuyu.model.native compiles it
   on the machine that runs it (-O3 -march=native -fopenmp) and binds the functions of native.h.

   Every rounding is the one the torch ops of model/fuyu.py make: a matmul's input and output in
   the weights' dtype; LayerNorms, rotary, softmax and the residual stream in float32. */
#include <omp.h>
#include <stdlib.h>

#include "attend.h"
#include "gemv.h"
#include "native.h"
#include "vec.h"

void fuyu_gemv(const float *x, const void *w, const void *bias, void *y, dtype dt, int64_t B,
               int64_t N, int64_t K, int threads, float *xi) {
    interleave(x, B, K, xi);
#pragma omp parallel num_threads(threads)
    rows_of(dt, xi, x, w, bias, B, N, K, OUT, y, NULL);
}

/* One query per (row, head), (row, head) pairs split over the threads; out rounded once. */
void fuyu_attend(const float *q, const void *k, const void *v, const uint8_t *mask, void *out,
                 dtype dt, int64_t B, int64_t H, int64_t S, int64_t d, float scale, int threads) {
    int64_t z = size_of(dt);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        float *p = malloc(sizeof(float) * (S + d)), *o = p + S;
        attend_one_of(dt, q + bh * d, (const char *)k + bh * S * d * z,
                      (const char *)v + bh * S * d * z, mask + (bh / H) * S, S, d, scale, p, o);
        for (int64_t j = 0; j < d; j++) put(out, bh * d + j, o[j], dt);
        free(p);
    }
}

/* LayerNorm of x (n) in float32 (mean and variance summed in double), affine with weights in dt
   (bias may be NULL), into y; rounded to dt (and kept as float32) when `round` is set. */
static void layer_norm(const float *x, int64_t n, const void *w, const void *b, dtype dt,
                       float eps, int round, float *y) {
    double sum = 0., sq = 0.;
    for (int64_t i = 0; i < n; i++) sum += x[i];
    float mean = (float)(sum / n);
    for (int64_t i = 0; i < n; i++) {
        double c = x[i] - mean;
        sq += c * c;
    }
    float r = 1.f / sqrtf((float)(sq / n) + eps);
    for (int64_t i = 0; i < n; i++) {
        float t = (x[i] - mean) * r * get(w, i, dt) + (b ? get(b, i, dt) : 0.f);
        y[i] = round ? rounded(t, dt) : t;
    }
}

/* The B rows of x (B, D) LayerNormed and rounded into h, then interleaved into xi: a GEMV's input. */
static void norm_rows(const float *x, int64_t B, int64_t D, const void *w, const void *b,
                      dtype dt, float eps, float *h, float *xi) {
    for (int64_t r = 0; r < B; r++) layer_norm(x + r * D, D, w, b, dt, eps, 1, h + r * D);
    interleave(h, B, D, xi);
}

/* The decoder layers for one new token per row (a decode step), in one parallel region, no torch
   op in between: x (B, D) float32, the residual stream, updated in place, layer after layer:
   x += dense(attention(rotary(qk-LayerNorm(qkv(LN1(x)))))); x += down(relu²(up(LN2(x)))).
   p: 16 tensors in dt per layer: LN1 w, b; qkv w, b; q-LN w, b; k-LN w, b; dense w, b; LN2 w, b;
   up w, b; down w, b (biases may be NULL). cos, sin (B, R2): each row's rotary angles; kcs, vcs:
   each layer's cache (B, H, S, d), this token's key and value written at slot *slot; mask (B, S).
   work: B * (2 max(D, I) + 5 D + I) + threads * S floats (native.Layers.work_floats). */
int fuyu_layers(float *x, const void *const *p, void *const *kcs, void *const *vcs,
                const float *cos, const float *sin, const int64_t *slot, const uint8_t *mask,
                dtype dt, int64_t n_layers, int64_t B, int64_t H, int64_t d, int64_t R2, int64_t S,
                int64_t I, float eps, int threads, float *work) {
    int64_t D = H * d, M = D > I ? D : I, at = *slot, z = size_of(dt);
    if (at < 0 || at >= S) return -1;
    float *h = work, *xi = h + B * M, *qkv = xi + B * M, *q = qkv + B * 3 * D;
    float *att = q + B * D, *up = att + B * D, *scores = up + B * I;
    float scale = 1.f / sqrtf((float)d);
#pragma omp parallel num_threads(threads)
    for (int64_t l = 0; l < n_layers; l++) {
        const void *const *w = p + 16 * l;
        char *kc = kcs[l], *vc = vcs[l];
#pragma omp single
        norm_rows(x, B, D, w[0], w[1], dt, eps, h, xi);
        rows_of(dt, xi, h, w[2], w[3], B, 3 * D, D, KEEP, NULL, qkv);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, head = bh % H;
            const float *src = qkv + b * 3 * D + head * 3 * d; /* [q | k | v] of a head */
            const float *c = cos + b * R2, *s = sin + b * R2;
            float t[2][512];
            layer_norm(src, d, w[4], w[5], dt, eps, 0, t[0]);
            layer_norm(src + d, d, w[6], w[7], dt, eps, 0, t[1]);
            for (int i = 0; i < 2; i++)
                for (int64_t j = 0; j < R2; j++) {
                    float a = t[i][j], e = t[i][j + R2];
                    t[i][j] = a * c[j] - e * s[j];
                    t[i][j + R2] = e * c[j] + a * s[j];
                }
            char *kd = kc + (bh * S + at) * d * z, *vd = vc + (bh * S + at) * d * z;
            for (int64_t j = 0; j < d; j++) {
                q[bh * d + j] = rounded(t[0][j], dt);
                put(kd, j, t[1][j], dt);
                put(vd, j, src[2 * d + j], dt);
            }
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            float o[512];
            attend_one_of(dt, q + bh * d, kc + bh * S * d * z, vc + bh * S * d * z,
                          mask + (bh / H) * S, S, d, scale, scores + omp_get_thread_num() * S, o);
            for (int64_t j = 0; j < d; j++) att[bh * d + j] = rounded(o[j], dt);
        }
#pragma omp single
        interleave(att, B, D, xi);
        rows_of(dt, xi, att, w[8], w[9], B, D, D, ADD, NULL, x);
#pragma omp single
        norm_rows(x, B, D, w[10], w[11], dt, eps, h, xi);
        rows_of(dt, xi, h, w[12], w[13], B, I, D, RELU2, NULL, up);
#pragma omp single
        interleave(up, B, I, xi);
        rows_of(dt, xi, up, w[14], w[15], B, D, I, ADD, NULL, x);
    }
    return 0;
}

/* out[b] = the index of the largest of row b's V values, as torch.argmax: the first one where
   several tie, the first NaN where there is one. A vector pass finds the maximum, a second the
   first place it occurs. Rows are few (a decode batch); each is read in one thread. */
static inline __attribute__((always_inline)) void argmax(const void *x, dtype dt, int64_t B,
                                                         int64_t V, int64_t *out) {
    for (int64_t b = 0; b < B; b++) {
        int64_t r = b * V; /* element of x where row b starts */
        vf top = (vf){0} - INFINITY;
        vi nan = {0};
        int64_t j = 0;
        for (; j + L <= V; j += L) {
            vf v = load(x, r + j, dt);
            vi gt = v > top;
            nan |= v != v;
            top = (vf)(((vi)v & gt) | ((vi)top & ~gt));
        }
        float t = -INFINITY;
        int any_nan = 0;
        for (int i = 0; i < L; i++) {
            any_nan |= nan[i] != 0;
            if (top[i] > t) t = top[i];
        }
        for (; j < V; j++) {
            float v = get(x, r + j, dt);
            any_nan |= v != v;
            if (v > t) t = v;
        }
        int64_t at = 0;
        for (j = 0; j < V; j++) {
            float v = get(x, r + j, dt);
            if (any_nan ? v != v : v == t) {
                at = j;
                break;
            }
        }
        out[b] = at;
    }
}

void fuyu_argmax(const void *x, dtype dt, int64_t B, int64_t V, int64_t *out) {
    if (dt == BF16) /* a loop compiled for each dtype: the loads stay out of its way */
        argmax(x, BF16, B, V, out);
    else
        argmax(x, F32, B, V, out);
}
