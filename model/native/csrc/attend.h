/* Decode attention: one query against one head's cache, everything in float32, keys and values
   read once in their dtype and widened in registers. */
#ifndef FUYU_ATTEND_H
#define FUYU_ATTEND_H

#include "vec.h"

#define OV (L >= 16 ? 4 : 8) /* vectors of o summed in registers at a time (d = 64: all of it) */
#define AHEAD 2048           /* bytes of keys / values prefetched ahead */

/* o (d) = softmax(q.k_s * scale, masked) . v over the S slots of one head's cache ks, vs (S, d),
   q (d) float32, m (S) bytes (0: not seen); p: S floats of scratch. Slots after the last seen one
   are not read; keys are taken four slots at a time (independent sums), the exponentials a
   vector at a time, and the weighted values summed in registers, OV vectors of o at a time. */
static inline __attribute__((always_inline)) void attend_one(const float *q, const void *ks,
                                                             const void *vs, dtype dt,
                                                             const uint8_t *m, int64_t S,
                                                             int64_t d, float scale, float *p,
                                                             float *o) {
    int64_t n = S, s = 0, z = size_of(dt);
    while (n > 0 && !m[n - 1]) n--;
    if (d % L == 0)
        for (; s + 4 <= n; s += 4) {
            int64_t k = s * d; /* element of ks where slot s starts */
            vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t c = 0; c < 4 * d * z; c += 64)
                __builtin_prefetch((const char *)ks + k * z + AHEAD + c);
            for (int64_t j = 0; j < d; j += L) {
                vf x = load_f32(q + j);
                a0 += load(ks, k + j, dt) * x;
                a1 += load(ks, k + d + j, dt) * x;
                a2 += load(ks, k + 2 * d + j, dt) * x;
                a3 += load(ks, k + 3 * d + j, dt) * x;
            }
            p[s] = hsum(a0) * scale;
            p[s + 1] = hsum(a1) * scale;
            p[s + 2] = hsum(a2) * scale;
            p[s + 3] = hsum(a3) * scale;
        }
    for (; s < n; s++) {
        int64_t k = s * d, j = 0;
        vf a = {0};
        for (; j + L <= d; j += L) a += load(ks, k + j, dt) * load_f32(q + j);
        float t = hsum(a);
        for (; j < d; j++) t += get(ks, k + j, dt) * q[j];
        p[s] = t * scale;
    }
    float top = -INFINITY, sum = 0.f;
    for (s = 0; s < n; s++) {
        if (!m[s])
            p[s] = -INFINITY;
        else if (p[s] > top)
            top = p[s];
    }
    vf acc = {0};
    for (s = 0; s + L <= n; s += L) {
        vf e = vexp(load_f32(p + s) - top);
        memcpy(p + s, &e, sizeof e);
        acc += e;
    }
    sum = hsum(acc);
    for (; s < n; s++) {
        p[s] = m[s] ? expf(p[s] - top) : 0.f;
        sum += p[s];
    }
    int64_t j = 0;
    for (; j + OV * L <= d; j += OV * L) {
        vf acc[OV];
        for (int u = 0; u < OV; u++) acc[u] = (vf){0};
        for (s = 0; s < n; s++) {
            if (!m[s]) continue;
            int64_t v = s * d + j; /* element of vs */
            if (j == 0)
                for (int64_t c = 0; c < d * z; c += 64)
                    __builtin_prefetch((const char *)vs + v * z + AHEAD + c);
            float w = p[s];
            for (int u = 0; u < OV; u++) acc[u] += w * load(vs, v + u * L, dt);
        }
        for (int u = 0; u < OV; u++) {
            vf t = acc[u] / sum;
            memcpy(o + j + u * L, &t, VB);
        }
    }
    for (; j < d; j++) {
        float t = 0.f;
        for (s = 0; s < n; s++)
            if (m[s]) t += p[s] * get(vs, s * d + j, dt);
        o[j] = t / sum;
    }
}

/* attend_one, compiled once per dtype. */
static void attend_one_bf16(const float *q, const void *ks, const void *vs, const uint8_t *m,
                            int64_t S, int64_t d, float scale, float *p, float *o) {
    attend_one(q, ks, vs, BF16, m, S, d, scale, p, o);
}

static void attend_one_f32(const float *q, const void *ks, const void *vs, const uint8_t *m,
                           int64_t S, int64_t d, float scale, float *p, float *o) {
    attend_one(q, ks, vs, F32, m, S, d, scale, p, o);
}

static inline void attend_one_of(dtype dt, const float *q, const void *ks, const void *vs,
                                 const uint8_t *m, int64_t S, int64_t d, float scale, float *p,
                                 float *o) {
    (dt == BF16 ? attend_one_bf16 : attend_one_f32)(q, ks, vs, m, S, d, scale, p, o);
}

#endif
