/* Vectors of floats, the two weight dtypes, and the roundings every kernel shares.

   Plain C with GCC/Clang vector extensions, no intrinsics: the compiler picks the instructions for
   the CPU it is told to target (-march=native). */
#ifndef FUYU_VEC_H
#define FUYU_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native.h" /* dtype */

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
#define L (VB / 4) /* floats in a vector */

typedef float vf __attribute__((vector_size(VB)));
typedef int32_t vi __attribute__((vector_size(VB)));
typedef uint32_t vu __attribute__((vector_size(VB)));
typedef uint16_t vh __attribute__((vector_size(VB / 2)));


static inline float widen_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as torch's .to(bfloat16); NaN stays NaN. */
static inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* round_bf16 for finite f (a dequantized weight): no NaN test, so loops of it vectorise. */
static inline uint16_t round_bf16_finite(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline int64_t size_of(dtype dt) { return dt == BF16 ? 2 : 4; }

/* Element i of p, as float32. */
static inline __attribute__((always_inline)) float get(const void *p, int64_t i, dtype dt) {
    return dt == BF16 ? widen_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* f rounded to dt and back to float32: what a torch op's output in dt holds. */
static inline __attribute__((always_inline)) float rounded(float f, dtype dt) {
    return dt == BF16 ? widen_bf16(round_bf16(f)) : f;
}

/* Store f as element i of p, rounded to dt. */
static inline __attribute__((always_inline)) void put(void *p, int64_t i, float f, dtype dt) {
    if (dt == BF16)
        ((uint16_t *)p)[i] = round_bf16(f);
    else
        ((float *)p)[i] = f;
}

static inline __attribute__((always_inline)) vf load_f32(const float *p) {
    vf f;
    memcpy(&f, p, sizeof f);
    return f;
}

/* L elements of p from element i, as float32 (bf16: the bits shifted up). */
static inline __attribute__((always_inline)) vf load(const void *p, int64_t i, dtype dt) {
    if (dt == F32) return load_f32((const float *)p + i);
    vh h;
    memcpy(&h, (const uint16_t *)p + i, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < L; i++) s += v[i];
    return s;
}

/* exp(x) in float32 within ~1 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r
   times 2^n), for softmax's x <= 0: below -87.3 it is 0, -inf included; NaN stays NaN. A vector
   at a time, where libm's expf takes one value a call (not timed apart: the attention's measured
   gain, 0.25 -> 0.14-0.20 ms a layer on the AVX2 EPYC, came with the value-row prefetch). */
static inline vf vexp(vf x) {
    vi under = x < -87.3365478515625f;
    x = (vf)(((vi)x & ~under) | ((vi)((vf){0} - 87.3365478515625f) & under));
    vf t = x * 1.44269504088896341f + 12582912.f; /* 1.5 * 2^23: rounds n to an integer */
    vi n = (vi)t - 0x4B400000;
    vf nf = t - 12582912.f;
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf y = 1.9875691500E-4f + (vf){0};
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * r * r + r + 1.f;
    y = y * (vf)((n + 127) << 23);
    return (vf)((vi)y & ~under);
}

#endif
