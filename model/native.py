"""A matrix-vector kernel of our own for decode steps on CPU, compiled on the machine that runs it.

At batch 1-2 a decode step is a stream of weight reads, and the LM head is 70% of them (mid
checkpoint). None of torch's kernels reads 16-bit weights at the memory's read rate on every CPU:
on an AMD EPYC, per call on the 512 MB bf16 head, oneDNN's packed GEMV takes 22-25 ms, F.linear
30-33 ms, this kernel 15-18 ms (a float32 streaming sum of as many bytes: 15 ms). Each weight row is
read once, widened to float32 in registers and multiplied with each input row, accumulated in
float32 and rounded once to the weights' dtype, so it is at least as accurate as oneDNN's bf16 GEMV.
Rows are split over OpenMP threads. It serves up to 8 input rows (a decode batch); the module that
uses it (kernels.NativeLinear) hands bigger calls to F.linear or a float32 GEMM. The same library
holds one-query decode attention (`attend`): scores, softmax and the weighted sum of values in
float32, reading the 16-bit cache once, without the float32 copies the torch ops need; and all
decoder layers of a decode step in one call (`Layers`: LayerNorms, these GEMVs, q/k LayerNorm,
rotary, the cache write and this attention, with the roundings of model/fuyu.py's torch ops), so
that nothing but weight reads fills a step: no torch op, no Python, no sleeping thread in between.

It is plain C (GCC/Clang vector extensions, no intrinsics) compiled with the system's C compiler
(`$CC`, else `cc`) and `-O3 -march=native -fopenmp` the first time it is asked for, into
`$XDG_CACHE_HOME/fuyu/native/` under a name that holds a hash of the source, the compiler, the
flags and the CPU's feature flags, so a home folder shared by different machines never hands one a
binary built for another (once per machine: ~4 s on a 2-core AVX2-only AMD EPYC, started on a
thread when a checkpoint starts loading: `build_in_background`). It links the OpenMP runtime torch has already loaded
(libgomp's soname), so it shares torch's thread pool rather than adding a second one that would
spin against it; where torch brings no libgomp (macOS, Windows, other OpenMP builds) or no
compiler works, `available()` is False and the kernel is simply not offered. `FUYU_NATIVE=0` turns
it off. model/tuning.py times it against the other candidates like any of them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

MAX_ROWS = 8  # input rows it serves (a decode batch); above this it is compute-bound and
# oneDNN's GEMMs, which multiply bf16 pairs in one instruction where the CPU can, win
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm"]

SOURCE = r"""
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One vector register's worth of floats: 16 with AVX-512, 8 with AVX2, 4 on SSE/NEON. A vector
   wider than the CPU's registers would be split and spilled to the stack by GCC (seen: AVX2 at
   64 bytes ran at a third of the memory's read rate), so the width follows the target. */
#if __BIGGEST_ALIGNMENT__ >= 64
#define VB 64
#elif __BIGGEST_ALIGNMENT__ >= 32
#define VB 32
#else
#define VB 16
#endif
#define L (VB / 4)
typedef float vf __attribute__((vector_size(VB)));
typedef uint32_t vu __attribute__((vector_size(VB)));
typedef uint16_t vh __attribute__((vector_size(VB / 2)));

static inline float widen_bf16(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float widen_f32(float v) { return v; }
static inline uint16_t round_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static inline vf load_uint16_t(const uint16_t *p) {  /* L bf16 -> float32: the bits shifted up */
    vh h; memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f; memcpy(&f, &u, sizeof f); return f;
}
/* Weight bytes read ahead of use: the hardware prefetchers alone left 10-20% of the read rate on
   the table (AMD EPYC, AVX2: 11 -> 13-15 GB/s per call on 64 MB, a float32 sum 14-16). */
#define PREFETCH 8192
static inline vf load_float(const float *p) { vf f; memcpy(&f, p, sizeof f); return f; }
static inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < L; i++) s += v[i]; return s; }

/* One weight row against B input rows in one pass over the weight row: each weight vector is
   loaded and widened once and multiplied into B accumulators; U independent accumulators per input
   row so successive multiply-adds do not wait on each other. B and U are constants in each
   instance, so the accumulators live in registers. The inputs come interleaved (xi: for each
   L-wide slice of K, that slice of every row in turn), so they are read as one sequential stream:
   B rows 4 KB apart would fall into one set of the L1 cache and evict each other. The last K % L
   columns are read from the rows as given (x). */
#define DOT(T, W, B, U)                                                                     \
static void dot##B##_##T(const T *w, const float *xi, const float *x, int64_t K, float *s) {\
    vf a[B][U];                                                                             \
    for (int b = 0; b < B; b++) for (int u = 0; u < U; u++) a[b][u] = (vf){0};              \
    int64_t k = 0;                                                                          \
    for (; k + U * L <= K; k += U * L)                                                      \
        for (int u = 0; u < U; u++) {                                                       \
            if ((u * L * sizeof(T)) % 64 == 0) /* once per cache line of weights */        \
                __builtin_prefetch((const char *)(w + k + u * L) + PREFETCH);               \
            vf v = load_##T(w + k + u * L);                                                 \
            const float *p = xi + (k + u * L) * B;                                          \
            for (int b = 0; b < B; b++) a[b][u] += v * load_float(p + b * L);               \
        }                                                                                   \
    for (; k + L <= K; k += L) {                                                            \
        vf v = load_##T(w + k);                                                             \
        for (int b = 0; b < B; b++) a[b][0] += v * load_float(xi + k * B + b * L);          \
    }                                                                                       \
    for (int b = 0; b < B; b++) {                                                           \
        vf t = a[b][0];                                                                     \
        for (int u = 1; u < U; u++) t += a[b][u];                                           \
        float r = hsum(t);                                                                  \
        for (int64_t j = k; j < K; j++) r += W(w[j]) * x[b * K + j];                        \
        s[b] = r;                                                                           \
    }                                                                                       \
}
#define DOTS(T, W) DOT(T, W, 1, 4) DOT(T, W, 2, 2) DOT(T, W, 3, 2) DOT(T, W, 4, 1) \
                   DOT(T, W, 5, 1) DOT(T, W, 6, 1) DOT(T, W, 7, 1) DOT(T, W, 8, 1)
DOTS(uint16_t, widen_bf16)
DOTS(float, widen_f32)

/* The inputs x (B, K) interleaved into xi (see DOT). */
static void interleave(const float *x, int64_t B, int64_t K, float *xi) {
    for (int64_t k = 0; k + L <= K; k += L)
        for (int64_t b = 0; b < B; b++) memcpy(xi + k * B + b * L, x + b * K + k, VB);
}

/* What a GEMV does with y = s + bias, each value first rounded to the weights' dtype as torch's
   Linear would: store it in that dtype (OUT), keep it in float32 (KEEP), add it to a float32
   residual (ADD), or keep its squared ReLU rounded again (RELU2: torch's relu_ then square_). */
enum { OUT, KEEP, ADD, RELU2 };

/* y (B, N) from x (B, K) @ w (N, K)^T + bias (N), 1 <= B <= 8, inside a parallel region: the
   weight rows are split over its threads (an orphaned omp for, with its barrier at the end). */
#define ROWS(T, W, STORE)                                                                   \
static void rows_##T(const float *xi, const float *x, const T *w, const T *bias, int64_t B,  \
                     int64_t N, int64_t K, int mode, T *yt, float *yf) {                    \
    _Pragma("omp for schedule(static)")                                                     \
    for (int64_t n = 0; n < N; n++) {                                                       \
        float s[8];                                                                         \
        const T *r = w + n * K;                                                             \
        switch (B) {                                                                        \
        case 1: dot1_##T(r, xi, x, K, s); break; case 2: dot2_##T(r, xi, x, K, s); break;   \
        case 3: dot3_##T(r, xi, x, K, s); break; case 4: dot4_##T(r, xi, x, K, s); break;   \
        case 5: dot5_##T(r, xi, x, K, s); break; case 6: dot6_##T(r, xi, x, K, s); break;   \
        case 7: dot7_##T(r, xi, x, K, s); break; default: dot8_##T(r, xi, x, K, s); break;  \
        }                                                                                   \
        float b = bias ? W(bias[n]) : 0.f;                                                  \
        for (int64_t c = 0; c < B; c++) {                                                   \
            T y = STORE(s[c] + b);                                                          \
            float t = W(y);                                                                 \
            switch (mode) {                                                                 \
            case OUT: yt[c * N + n] = y; break;                                             \
            case KEEP: yf[c * N + n] = t; break;                                            \
            case ADD: yf[c * N + n] += t; break;                                            \
            default: t = t < 0.f ? 0.f : t; yf[c * N + n] = W(STORE(t * t)); break;         \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
}
ROWS(uint16_t, widen_bf16, round_bf16)
ROWS(float, widen_f32, widen_f32)

/* y (B, N) = x (B, K) @ w (N, K)^T + bias (N), 1 <= B <= 8: x float32; w and bias in one dtype
   (bias may be NULL); y in the weights' dtype. xi is scratch for the interleaved inputs, B * K
   floats. */
#define GEMV(NAME, T)                                                                       \
void NAME(const float *x, const T *w, const T *bias, T *y, int64_t B, int64_t N, int64_t K, \
          int threads, float *xi) {                                                         \
    interleave(x, B, K, xi);                                                                \
    _Pragma("omp parallel num_threads(threads)")                                            \
    rows_##T(xi, x, w, bias, B, N, K, OUT, y, NULL);                                        \
}
GEMV(fuyu_gemv_bf16, uint16_t)
GEMV(fuyu_gemv_f32, float)

/* exp(x) in float32 within ~1 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r
   times 2^n), for softmax's x <= 0: below -87.3 it is 0, -inf included; NaN stays NaN. A vector
   at a time, where libm's expf takes one value a call (not timed apart: the attention's measured
   gain, 0.25 -> 0.14-0.20 ms a layer on the AVX2 EPYC, came with the value-row prefetch). */
typedef int32_t vi __attribute__((vector_size(VB)));
static inline vf vexp(vf x) {
    vi under = x < -87.3365478515625f;
    x = (vf)(((vi)x & ~under) | ((vi)((vf){0} - 87.3365478515625f) & under));
    vf t = x * 1.44269504088896341f + 12582912.f;  /* 1.5 * 2^23: rounds n to an integer */
    vi n = (vi)t - 0x4B400000;
    vf nf = t - 12582912.f;
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf y = 1.9875691500E-4f + (vf){0};
    y = y * r + 1.3981999507E-3f; y = y * r + 8.3334519073E-3f; y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f; y = y * r + 5.0000001201E-1f;
    y = y * r * r + r + 1.f;
    y = y * (vf)((n + 127) << 23);
    return (vf)((vi)y & ~under);
}

#define OV (L >= 16 ? 4 : 8)  /* vectors of o summed in registers at a time (d = 64: all of it) */
#define AHEAD 2048  /* bytes of keys / values prefetched ahead */

/* One query against the S slots of one head's cache ks, vs (S, d): o (d) = softmax(q.k_s * scale,
   masked) . v, all in float32 (p: S floats of scratch). Slots after the last seen one are not
   read; keys are taken four slots at a time (independent sums), the exponentials a vector at a
   time, and the weighted values summed in registers, 4 vectors of o at a time. */
#define ATTEND_ONE(T, W)                                                                    \
static void attend_one_##T(const float *q, const T *ks, const T *vs, const uint8_t *m,       \
                           int64_t S, int64_t d, float scale, float *p, float *o) {         \
    int64_t n = S, s = 0;                                                                   \
    while (n > 0 && !m[n - 1]) n--;                                                         \
    if (d % L == 0)                                                                         \
        for (; s + 4 <= n; s += 4) {                                                        \
            const T *k = ks + s * d;                                                        \
            vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                      \
            for (int64_t c = 0; c < 4 * d * (int64_t)sizeof(T); c += 64)                   \
                __builtin_prefetch((const char *)k + AHEAD + c);                            \
            for (int64_t j = 0; j < d; j += L) {                                            \
                vf x = load_float(q + j);                                                   \
                a0 += load_##T(k + j) * x; a1 += load_##T(k + d + j) * x;                   \
                a2 += load_##T(k + 2 * d + j) * x; a3 += load_##T(k + 3 * d + j) * x;      \
            }                                                                               \
            p[s] = hsum(a0) * scale; p[s + 1] = hsum(a1) * scale;                           \
            p[s + 2] = hsum(a2) * scale; p[s + 3] = hsum(a3) * scale;                       \
        }                                                                                   \
    for (; s < n; s++) {                                                                    \
        const T *k = ks + s * d;                                                            \
        int64_t j = 0; vf a = {0};                                                          \
        for (; j + L <= d; j += L) a += load_##T(k + j) * load_float(q + j);                \
        float t = hsum(a);                                                                  \
        for (; j < d; j++) t += W(k[j]) * q[j];                                             \
        p[s] = t * scale;                                                                   \
    }                                                                                       \
    float top = -INFINITY, sum = 0.f;                                                       \
    for (s = 0; s < n; s++) {                                                               \
        if (!m[s]) p[s] = -INFINITY;                                                        \
        else if (p[s] > top) top = p[s];                                                    \
    }                                                                                       \
    vf acc = {0};                                                                           \
    for (s = 0; s + L <= n; s += L) {                                                       \
        vf e = vexp(load_float(p + s) - top);                                               \
        memcpy(p + s, &e, sizeof e);                                                        \
        acc += e;                                                                           \
    }                                                                                       \
    sum = hsum(acc);                                                                        \
    for (; s < n; s++) { p[s] = m[s] ? expf(p[s] - top) : 0.f; sum += p[s]; }               \
    int64_t j = 0;                                                                          \
    for (; j + OV * L <= d; j += OV * L) {                                                  \
        vf acc[OV];                                                                         \
        for (int u = 0; u < OV; u++) acc[u] = (vf){0};                                      \
        for (s = 0; s < n; s++) {                                                           \
            if (!m[s]) continue;                                                            \
            const T *v = vs + s * d + j;                                                    \
            if (j == 0)                                                                     \
                for (int64_t c = 0; c < d * (int64_t)sizeof(T); c += 64)                    \
                    __builtin_prefetch((const char *)v + AHEAD + c);                        \
            float w = p[s];                                                                 \
            for (int u = 0; u < OV; u++) acc[u] += w * load_##T(v + u * L);                 \
        }                                                                                   \
        for (int u = 0; u < OV; u++) {                                                      \
            vf t = acc[u] / sum;                                                            \
            memcpy(o + j + u * L, &t, VB);                                                  \
        }                                                                                   \
    }                                                                                       \
    for (; j < d; j++) {                                                                    \
        float t = 0.f;                                                                      \
        for (s = 0; s < n; s++) if (m[s]) t += p[s] * W(vs[s * d + j]);                     \
        o[j] = t / sum;                                                                     \
    }                                                                                       \
}
ATTEND_ONE(uint16_t, widen_bf16)
ATTEND_ONE(float, widen_f32)

/* Decode attention, one query per (row, head): out = softmax(q.k_s * scale, masked) . v over the
   S slots of the cache k, v (B, H, S, d) in T; q (B, H, d) float32; mask (B, S) bytes, 0 = not
   seen; out (B, H, d) in T, rounded once. Keys and values are read once, widened in registers,
   everything else is float32; (row, head) pairs are split over the threads. */
#define ATTEND(NAME, T, STORE)                                                              \
void NAME(const float *q, const T *k, const T *v, const uint8_t *mask, T *out, int64_t B,    \
          int64_t H, int64_t S, int64_t d, float scale, int threads) {                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                       \
    for (int64_t bh = 0; bh < B * H; bh++) {                                                \
        float *p = malloc(sizeof(float) * (S + d)), *o = p + S;                             \
        attend_one_##T(q + bh * d, k + bh * S * d, v + bh * S * d, mask + (bh / H) * S,     \
                       S, d, scale, p, o);                                                  \
        for (int64_t j = 0; j < d; j++) out[bh * d + j] = STORE(o[j]);                      \
        free(p);                                                                            \
    }                                                                                       \
}
ATTEND(fuyu_attend_bf16, uint16_t, round_bf16)
ATTEND(fuyu_attend_f32, float, widen_f32)

/* LayerNorm of x (n) in float32 (mean and variance summed in double), affine with weights in T
   (bias may be NULL), into y; rounded to T and kept as float32 when `round` is set. */
#define LAYER_NORM(T, W, STORE)                                                             \
static void layer_norm_##T(const float *x, int64_t n, const T *w, const T *b, float eps,    \
                           int round, float *y) {                                           \
    double sum = 0., sq = 0.;                                                               \
    for (int64_t i = 0; i < n; i++) sum += x[i];                                            \
    float mean = (float)(sum / n);                                                          \
    for (int64_t i = 0; i < n; i++) { double c = x[i] - mean; sq += c * c; }                \
    float r = 1.f / sqrtf((float)(sq / n) + eps);                                           \
    for (int64_t i = 0; i < n; i++) {                                                       \
        float t = (x[i] - mean) * r * W(w[i]) + (b ? W(b[i]) : 0.f);                        \
        y[i] = round ? W(STORE(t)) : t;                                                     \
    }                                                                                       \
}
LAYER_NORM(uint16_t, widen_bf16, round_bf16)
LAYER_NORM(float, widen_f32, widen_f32)

/* The B rows of x (B, D) LayerNormed and rounded into h, then interleaved into xi: a GEMV's input. */
#define NORM_ROWS(T)                                                                        \
static void norm_rows_##T(const float *x, int64_t B, int64_t D, const T *w, const T *b,     \
                          float eps, float *h, float *xi) {                                 \
    for (int64_t r = 0; r < B; r++) layer_norm_##T(x + r * D, D, w, b, eps, 1, h + r * D);  \
    interleave(h, B, D, xi);                                                                \
}
NORM_ROWS(uint16_t)
NORM_ROWS(float)

/* The decoder layers for one new token per row (a decode step), in one parallel region, no torch
   op in between: x (B, D) float32, the residual stream, updated in place, layer after layer:
   x += dense(attention(rotary(qk-LayerNorm(qkv(LN1(x)))))); x += down(relu²(up(LN2(x)))).
   p: 16 tensors in T per layer: LN1 w, b; qkv w, b; q-LN w, b; k-LN w, b; dense w, b; LN2 w, b;
   up w, b; down w, b (biases may be NULL). cos, sin (B, R2): each row's rotary angles; kcs, vcs:
   each layer's cache (B, H, S, d), this token's key and value written at slot *slot; mask (B, S).
   Every rounding is the one the torch ops make (model/fuyu.py: a matmul's input and output in T,
   LayerNorms, rotary and attention in float32). work: Layers.work_floats + threads * S floats. */
#define LAYERS(NAME, T, W, STORE)                                                           \
int NAME(float *x, const void *const *p, void *const *kcs, void *const *vcs, const float *cos, \
         const float *sin, const int64_t *slot, const uint8_t *mask, int64_t n_layers,      \
         int64_t B, int64_t H, int64_t d, int64_t R2, int64_t S, int64_t I, float eps,      \
         int threads, float *work) {                                                        \
    int64_t D = H * d, M = D > I ? D : I, at = *slot;                                       \
    if (at < 0 || at >= S) return -1;                                                       \
    float *h = work, *xi = h + B * M, *qkv = xi + B * M, *q = qkv + B * 3 * D;              \
    float *att = q + B * D, *up = att + B * D, *scores = up + B * I;                        \
    float scale = 1.f / sqrtf((float)d);                                                    \
    _Pragma("omp parallel num_threads(threads)")                                            \
    for (int64_t l = 0; l < n_layers; l++) {                                                \
        const T *const *w = (const T *const *)p + 16 * l;                                   \
        T *kc = (T *)kcs[l], *vc = (T *)vcs[l];                                             \
        _Pragma("omp single")                                                               \
        norm_rows_##T(x, B, D, w[0], w[1], eps, h, xi);                                     \
        rows_##T(xi, h, w[2], w[3], B, 3 * D, D, KEEP, NULL, qkv);                          \
        _Pragma("omp for schedule(static)")                                                 \
        for (int64_t bh = 0; bh < B * H; bh++) {                                            \
            int64_t b = bh / H, head = bh % H;                                              \
            const float *src = qkv + b * 3 * D + head * 3 * d; /* [q | k | v] of a head */  \
            const float *c = cos + b * R2, *s = sin + b * R2;                               \
            float t[2][512];                                                                \
            layer_norm_##T(src, d, w[4], w[5], eps, 0, t[0]);                               \
            layer_norm_##T(src + d, d, w[6], w[7], eps, 0, t[1]);                           \
            for (int i = 0; i < 2; i++)                                                     \
                for (int64_t j = 0; j < R2; j++) {                                          \
                    float a = t[i][j], e = t[i][j + R2];                                    \
                    t[i][j] = a * c[j] - e * s[j];                                          \
                    t[i][j + R2] = e * c[j] + a * s[j];                                     \
                }                                                                           \
            T *kd = kc + (bh * S + at) * d, *vd = vc + (bh * S + at) * d;                   \
            for (int64_t j = 0; j < d; j++) {                                               \
                q[bh * d + j] = W(STORE(t[0][j]));                                          \
                kd[j] = STORE(t[1][j]);                                                     \
                vd[j] = STORE(src[2 * d + j]);                                              \
            }                                                                               \
        }                                                                                   \
        _Pragma("omp for schedule(static)")                                                 \
        for (int64_t bh = 0; bh < B * H; bh++) {                                            \
            float o[512];                                                                   \
            attend_one_##T(q + bh * d, kc + bh * S * d, vc + bh * S * d, mask + (bh / H) * S, \
                           S, d, scale, scores + omp_get_thread_num() * S, o);              \
            for (int64_t j = 0; j < d; j++) att[bh * d + j] = W(STORE(o[j]));               \
        }                                                                                   \
        _Pragma("omp single")                                                               \
        interleave(att, B, D, xi);                                                          \
        rows_##T(xi, att, w[8], w[9], B, D, D, ADD, NULL, x);                               \
        _Pragma("omp single")                                                               \
        norm_rows_##T(x, B, D, w[10], w[11], eps, h, xi);                                   \
        rows_##T(xi, h, w[12], w[13], B, I, D, RELU2, NULL, up);                            \
        _Pragma("omp single")                                                               \
        interleave(up, B, I, xi);                                                           \
        rows_##T(xi, up, w[14], w[15], B, D, I, ADD, NULL, x);                              \
    }                                                                                       \
    return 0;                                                                               \
}
LAYERS(fuyu_layers_bf16, uint16_t, widen_bf16, round_bf16)
LAYERS(fuyu_layers_f32, float, widen_f32, widen_f32)

/* out[b] = the index of the largest of row b's V values, as torch.argmax: the first one where
   several tie, the first NaN where there is one. A vector pass finds the maximum, a second the
   first place it occurs. Rows are few (a decode batch); each is read in one thread. */
#define ARGMAX(NAME, T, W)                                                                  \
void NAME(const T *x, int64_t B, int64_t V, int64_t *out) {                                  \
    for (int64_t b = 0; b < B; b++) {                                                       \
        const T *r = x + b * V;                                                             \
        vf top = (vf){0} - INFINITY;                                                        \
        vi nan = {0};                                                                       \
        int64_t j = 0;                                                                      \
        for (; j + L <= V; j += L) {                                                        \
            vf v = load_##T(r + j);                                                         \
            vi gt = v > top;                                                                \
            nan |= v != v;                                                                  \
            top = (vf)(((vi)v & gt) | ((vi)top & ~gt));                                     \
        }                                                                                   \
        float t = -INFINITY;                                                                \
        int any_nan = 0;                                                                    \
        for (int i = 0; i < L; i++) { any_nan |= nan[i] != 0; if (top[i] > t) t = top[i]; } \
        for (; j < V; j++) { float v = W(r[j]); any_nan |= v != v; if (v > t) t = v; }      \
        int64_t at = 0;                                                                     \
        for (j = 0; j < V; j++) {                                                           \
            float v = W(r[j]);                                                              \
            if (any_nan ? v != v : v == t) { at = j; break; }                               \
        }                                                                                   \
        out[b] = at;                                                                        \
    }                                                                                       \
}
ARGMAX(fuyu_argmax_bf16, uint16_t, widen_bf16)
ARGMAX(fuyu_argmax_f32, float, widen_f32)
"""

DTYPES = {torch.bfloat16: "fuyu_gemv_bf16", torch.float32: "fuyu_gemv_f32"}
ATTEND = {torch.bfloat16: "fuyu_attend_bf16", torch.float32: "fuyu_attend_f32"}
LAYERS = {torch.bfloat16: "fuyu_layers_bf16", torch.float32: "fuyu_layers_f32"}
ARGMAX = {torch.bfloat16: "fuyu_argmax_bf16", torch.float32: "fuyu_argmax_f32"}
MAX_HEAD_DIM = 512  # the layers keep a head's q, k and output on the stack


def _torch_has_libgomp() -> bool:
    """Whether torch has loaded libgomp: its soname is what our library links, so it shares it."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def library_path() -> Path:
    compiler = os.environ.get("CC") or "cc"
    digest = hashlib.sha256("\0".join([SOURCE, compiler, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fuyu" / "native" / f"gemv-{digest}.so"


def _load(path: Path) -> ctypes.CDLL | None:
    if not _torch_has_libgomp():
        return None
    if not path.exists() and not _build(path):
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    for name in DTYPES.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_void_p]
        fn.restype = None
    for name in ATTEND.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
        fn.restype = None
    for name in ARGMAX.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = None
    for name in LAYERS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    return lib


def _build(path: Path) -> bool:
    """Compile SOURCE into `path` (atomically: concurrent processes may build it at once)."""
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "gemv.c", Path(tmp) / "gemv.so"
            src.write_text(SOURCE)
            done = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out)],
                                  capture_output=True, timeout=120)
            if done.returncode != 0:
                return False
            os.replace(out, path)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be had."""
    with _BUILDING:  # one build at a time; a call during a build waits for it
        return _library(os.environ.get("FUYU_NATIVE"), os.environ.get("CC"), os.environ.get("XDG_CACHE_HOME"))


_BUILDING = threading.Lock()


def build_in_background() -> None:
    """Start getting the library on a thread, so that a first build on a machine (~4 s on a 2-core
    AVX2-only AMD EPYC) runs while the checkpoint loads, not after it (model/weights.py)."""
    threading.Thread(target=library, name="fuyu-native-build", daemon=True).start()


@functools.lru_cache(maxsize=None)
def _library(switch: str | None, cc: str | None, cache_home: str | None) -> ctypes.CDLL | None:
    """library() per setting of the variables it depends on (each call costs a dict lookup)."""
    return None if switch == "0" else _load(library_path())


def available() -> bool:
    return library() is not None


def serves(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in DTYPES and weight.dim() == 2


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x with at most MAX_ROWS rows (any leading shape), float32
    accumulation, output in the weight's dtype."""
    lib = library()
    N, K = weight.shape
    rows = x.reshape(-1, K)
    if (lib is None or rows.shape[0] > MAX_ROWS or not serves(weight) or not weight.is_contiguous()
            or x.dtype != weight.dtype or x.device.type != "cpu"
            or (bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous()))):
        raise ValueError("native.linear: a contiguous CPU float32/bfloat16 weight, a bias and CPU "
                         f"inputs of its dtype, at most {MAX_ROWS} rows, and a built kernel are required")
    xf = rows if rows.dtype == torch.float32 else rows.float()
    if not xf.is_contiguous():
        xf = xf.contiguous()
    y = torch.empty(rows.shape[0], N, dtype=weight.dtype)
    scratch = torch.empty(xf.numel(), dtype=torch.float32)  # the inputs, interleaved
    getattr(lib, DTYPES[weight.dtype])(xf.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                       y.data_ptr(), rows.shape[0], N, K, torch.get_num_threads(),
                                       scratch.data_ptr())
    return y.view(*x.shape[:-1], N)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """softmax(q·kᵀ/√d, masked)·v for one query per row and head, q (B, H, 1, d), over a cache
    k, v (B, H, S, d) with mask (B, 1, 1, S) bool: float32 inside, rounded once to k's dtype.
    None where the kernel does not serve these inputs (the caller has a plain path)."""
    lib = library()
    B, H, S, d = k.shape
    if (lib is None or k.dtype not in ATTEND or v.dtype != k.dtype or k.device.type != "cpu"
            or q.shape != (B, H, 1, d) or mask.shape != (B, 1, 1, S) or mask.dtype != torch.bool
            or not (k.is_contiguous() and v.is_contiguous() and mask.is_contiguous())):
        return None
    qf = q.float().contiguous()
    out = torch.empty(B, H, 1, d, dtype=k.dtype)
    getattr(lib, ATTEND[k.dtype])(qf.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(),
                                  B, H, S, d, d ** -0.5, torch.get_num_threads())
    return out



def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """x.argmax(-1) (same index on ties and NaN) of CPU float32/bfloat16 rows x (B, V), read once
    as they are: torch widens bf16 logits to float32 first (a 1 MB copy) or reduces them ~4×
    slower. None where not served."""
    lib = library()
    if (lib is None or x.dtype not in ARGMAX or x.dim() != 2 or x.device.type != "cpu"
            or not x.is_contiguous() or x.shape[1] == 0):
        return None
    out = torch.empty(x.shape[0], dtype=torch.long)
    getattr(lib, ARGMAX[x.dtype])(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


class Layers:
    """A model's decoder layers over one KV cache, prepared for decode steps (one new token per
    row) that run all layers in one call of the kernel: weights, biases and cache checked and
    their addresses gathered once, not at every step.

    tensors: per layer, 16 weights and biases in the cache's dtype, in the order of LAYERS' C
    comment (a bias may be None); k, v: each layer's cache (B, H, S, d). `build` returns None
    where the kernel does not serve them. The object holds the tensors, so the addresses stay
    valid for as long as it lives."""

    def __init__(self, lib, tensors, k, v, eps: float, intermediate: int):
        self.fn = getattr(lib, LAYERS[k[0].dtype])
        self.tensors, self.k, self.v = tensors, k, v  # kept alive: their addresses are used
        self.eps, self.intermediate = eps, intermediate
        B, H, S, d = k[0].shape
        self.shape = (B, H, S, d)
        flat = [t for layer in tensors for t in layer]
        self.pointers = (ctypes.c_void_p * len(flat))(*(None if t is None else t.data_ptr() for t in flat))
        self.k_pointers = (ctypes.c_void_p * len(k))(*(t.data_ptr() for t in k))
        self.v_pointers = (ctypes.c_void_p * len(v))(*(t.data_ptr() for t in v))
        M = max(H * d, intermediate)
        self.work_floats = B * (2 * M + 5 * H * d + intermediate)  # + S per thread (scores)

    @classmethod
    def build(cls, tensors: list[list[torch.Tensor | None]], k: list[torch.Tensor], v: list[torch.Tensor],
              eps: float, intermediate: int) -> Layers | None:
        lib = library()
        if lib is None or not k or len(k) != len(v) or len(k) != len(tensors):
            return None
        shape, dt = k[0].shape, k[0].dtype
        B, H, S, d = shape
        ok = (dt in LAYERS and B <= MAX_ROWS and d <= MAX_HEAD_DIM
              and all(t.shape == shape and t.dtype == dt and t.device.type == "cpu" and t.is_contiguous()
                      for t in (*k, *v))
              and all(len(layer) == 16 and all(t is None or (t.dtype == dt and t.device.type == "cpu"
                                                             and t.is_contiguous()) for t in layer)
                      for layer in tensors))
        return cls(lib, tensors, k, v, eps, intermediate) if ok else None

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor | None:
        """The residual stream x (B, 1, D) float32 after every layer, each layer's key and value
        written at slot `slot` (1,); cos, sin (B, 1, 1, R/2) float32; mask (B, 1, 1, S) bool.
        None where these inputs are not served (the caller has the torch ops)."""
        B, H, S, d = self.shape
        if (x.shape != (B, 1, H * d) or x.dtype != torch.float32 or cos.shape[:3] != (B, 1, 1)
                or 2 * cos.shape[-1] > d or cos.dtype != torch.float32 or sin.shape != cos.shape
                or sin.dtype != torch.float32 or mask.shape != (B, 1, 1, S) or mask.dtype != torch.bool
                or slot.shape != (1,) or slot.dtype != torch.long
                or not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and mask.is_contiguous())):
            return None
        out, threads = x.clone(), torch.get_num_threads()
        work = torch.empty(self.work_floats + threads * S, dtype=torch.float32)
        if self.fn(out.data_ptr(), self.pointers, self.k_pointers, self.v_pointers, cos.data_ptr(),
                   sin.data_ptr(), slot.data_ptr(), mask.data_ptr(), len(self.k), B, H, d, cos.shape[-1],
                   S, self.intermediate, self.eps, threads, work.data_ptr()):
            raise IndexError(f"KV cache slot {int(slot)} is outside the cache's {S} slots")
        return out
