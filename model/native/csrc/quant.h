/* Matrix-vector products over int8 and int4 weights, read once at the memory's read rate.

   The weights are laid out in tiles of 4 output rows, so that the 4 rows a thread works on at once
   are one sequential stream (the hardware prefetchers follow one stream; 4 separate rows of an
   int4 weight are 2 KB apiece at K = 4096, and a prefetch distance crossed into other rows):

     INT8  w: (N/4, K/64, 4, 64) int8: for each 64 inputs, the 4 rows' 64 weights in turn;
           scales: (N) float32, weight = q * scale.
     INT4  w: (N/4, K/256, 4, 128) bytes: for each 256 inputs, each row's 128 bytes in turn, two
           64-byte units; q in 0..15, weight = q * scale + min per row and group of `group` (64
           or 128) inputs. scales: (N/4, K/256, 2, 4, 256/group) float16: for each 256 inputs,
           the 4 rows' scales, then their mins, a row's groups in turn.
           Within a row's 128 bytes the weights are placed so that each 4-byte lane of a vector
           holds weights of one group only (q4_place): the low nibbles of unit u and then its
           high nibbles are four "vectors" m = 2u, 2u + 1 of 16 lanes; lane i holds group
           i / (group / 16) of the 256, weights 4 (i % (group / 16)) + j, j < 4, of that group's
           quarter m. So one integer dot product covers several groups, lane-wise, and one float
           multiply-add per 256 inputs scales them all (a vector of each lane's group scale).

   The inputs are quantized as the weights are, so that the products are exact integer dot
   products summed in int32 and only their sums are scaled in float32:

     INT8  inputs per row to int16, x = sx * xq, |xq| <= QMAX (15 bits: 64 times finer than the
           bfloat16 rounding every input has already been through, relative to the row's largest);
           y[n] = scale[n] * sx * sum_k q[n,k] xq[k]                              (vpdpwssd)
     INT4  inputs per group of the weights' groups to int8, x = sx_g * xg, |xg| <= 127 (the
           weights' own error, a 16th of a group's range, is ~20 times an input's 254th of its
           group's largest, and an outlier input coarsens its own group only);
           y[n] = sum_g scale[n,g] * sx_g * sum_{k in g} q[n,k] xg[k]  +  sum_g min[n,g] * X[g]
                                                                                  (vpdpbusd)
     where X[g] is the sum of the group's inputs (float32, before quantizing).

   Without integer vectors (isa.h: HAVE_QV 0) the same sums are taken a value at a time. */
#ifndef FUYU_QUANT_H
#define FUYU_QUANT_H

#include "isa.h"

#define QMAX 32512       /* xq's largest magnitude (127 * 256) */
#define Q8_CHUNK 64      /* inputs per tile step, INT8 */
#define Q4_CHUNK 256     /* inputs per tile step, INT4 */
#define Q8_FLUSH 32      /* INT8 steps summed in int32 before adding to the float total: with
                            |q| <= 127 and |xq| <= QMAX a lane's int32 sum stays under 2^31 */
#ifndef QPREFETCH
#define QPREFETCH 1024   /* bytes ahead in a tile's stream */
#endif
#ifndef QHINT
#define QHINT 3          /* __builtin_prefetch locality: 3 = into L1 */
#endif

/* float16 bits to float32: one instruction with F16C (every AVX2 CPU), else by hand (normal,
   subnormal, zero, inf; NaN as inf: scales are finite). */
static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#endif
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023, u;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-8f; /* m * 2^-24 */
        return sign ? -f : f;
    }
    u = sign | (e == 31 ? 0x7f800000u : ((e + 112) << 23)) | (m << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 8 float16 values at p to float32. */
static inline void halves_to_floats(const uint16_t *p, float *out) {
#ifdef __F16C__
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
#else
    for (int i = 0; i < 8; i++) out[i] = half_to_float(p[i]);
#endif
}

/* --- the inputs, prepared once per call for every output row ---------------------------------

   INT8: sx[B] float32 (in 64 bytes), then xq interleaved: for each 64 inputs, each row's 64 int16
         in turn.
   INT4: 64 bytes, X[B][K/64] then sx[B][K/64] float32 (per group; groups of 64 or more), then
         for each 256 inputs, each row's 256 int8 in turn, placed as the weights are (q4_place). */

static inline int64_t q4_groups(int64_t K) { return K / 64; } /* room per row for per-group values */

/* Quantize row x (K) to xq (K) int16; returns sx. */
static float quantize_row(const float *x, int64_t K, int16_t *xq) {
    float top = 0.f;
    for (int64_t k = 0; k < K; k++) top = fmaxf(top, fabsf(x[k]));
    float sx = top > 0.f ? top / QMAX : 1.f, inv = 1.f / sx;
    for (int64_t k = 0; k < K; k++) {
        float q = rintf(x[k] * inv);
        xq[k] = (int16_t)(q > QMAX ? QMAX : q < -QMAX ? -QMAX : q);
    }
    return sx;
}

/* x (B, K) float32 -> xp as the INT8 kernels read it. tmp: K int16. */
static void q8_prepare(const float *x, int64_t B, int64_t K, void *xp, int16_t *tmp) {
    float *sx = xp;
    int16_t *xi = (int16_t *)((char *)xp + 64);
    for (int64_t b = 0; b < B; b++) {
        sx[b] = quantize_row(x + b * K, K, tmp);
        for (int64_t k = 0; k < K; k += Q8_CHUNK)
            memcpy(xi + k * B + b * Q8_CHUNK, tmp + k, Q8_CHUNK * 2);
    }
}

static inline int64_t q4_inputs_offset(int64_t B, int64_t K) {
    return 64 + ((2 * B * q4_groups(K) * 4 + 63) & ~(int64_t)63);
}

/* Where input k of a row (within its 256) sits in INT4's layout: byte (0..255) of the four
   16-lane vectors m = 0..3 in turn; for the weights, vector m is unit m / 2's low (m even) or high
   nibbles. */
static inline int q4_place(int k, int group) {
    int g = k / group, p = k % group, quarter = group / 4, lanes = group / 16;
    int m = p / quarter, q = p % quarter;
    return m * 64 + (g * lanes + q / 4) * 4 + q % 4;
}

/* x (B, K) float32 -> xp as the INT4 kernels read it, in groups of `group` inputs. */
static void q4_prepare(const float *x, int64_t B, int64_t K, int group, void *xp) {
    float *sums = (float *)((char *)xp + 64), *sx = sums + B * q4_groups(K);
    int8_t *xg = (int8_t *)xp + q4_inputs_offset(B, K);
    for (int64_t b = 0; b < B; b++) {
        const float *row = x + b * K;
        for (int64_t g = 0; g < K / group; g++) {
            float s = 0.f, top = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) {
                s += row[k];
                top = fmaxf(top, fabsf(row[k]));
            }
            float scale = top > 0.f ? top / 127.f : 1.f, inv = 1.f / scale;
            sums[b * q4_groups(K) + g] = s;
            sx[b * q4_groups(K) + g] = scale;
            for (int64_t k = g * group; k < (g + 1) * group; k++) {
                float q = rintf(row[k] * inv);
                xg[(k / Q4_CHUNK * B + b) * Q4_CHUNK + q4_place((int)(k % Q4_CHUNK), group)] =
                    (int8_t)(q > 127.f ? 127 : q < -127.f ? -127 : q);
            }
        }
    }
}

/* --- INT8 ---------------------------------------------------------------------------------- */

/* The int32 sums of one tile (4 rows) against inputs b0 .. b0 + BB - 1, into s[r * 8 + b]
   (before scaling). BB <= 4, a constant where inlined. */
static inline __attribute__((always_inline)) void q8_tile(const int8_t *w, int64_t K,
                                                          const int16_t *xi, int64_t B, int64_t b0,
                                                          int BB, float *s) {
    float total[4][4] = {{0}};
#if HAVE_QV
    qv acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < BB; b++) acc[r][b] = qv_zero();
    for (int64_t c = 0; c < K / Q8_CHUNK; c++) {
        const int8_t *t = w + c * 4 * Q8_CHUNK;
        __builtin_prefetch((const char *)t + QPREFETCH, 0, QHINT);
        __builtin_prefetch((const char *)t + QPREFETCH + 64, 0, QHINT);
        __builtin_prefetch((const char *)t + QPREFETCH + 128, 0, QHINT);
        __builtin_prefetch((const char *)t + QPREFETCH + 192, 0, QHINT);
        const int16_t *x = xi + c * B * Q8_CHUNK + b0 * Q8_CHUNK;
        for (int h = 0; h < Q8_CHUNK; h += QV / 2)
            for (int r = 0; r < 4; r++) {
                qv v = qv_widen_i8(t + r * Q8_CHUNK + h);
                for (int b = 0; b < BB; b++)
                    acc[r][b] = qv_dot_i16(acc[r][b], v, qv_load(x + b * Q8_CHUNK + h));
            }
        if ((c + 1) % Q8_FLUSH == 0 || c + 1 == K / Q8_CHUNK)
            for (int r = 0; r < 4; r++)
                for (int b = 0; b < BB; b++) {
                    total[r][b] += hsum(qv_to_vf(acc[r][b]));
                    acc[r][b] = qv_zero();
                }
    }
#else
    for (int64_t c = 0; c < K / Q8_CHUNK; c++) {
        const int8_t *t = w + c * 4 * Q8_CHUNK;
        const int16_t *x = xi + c * B * Q8_CHUNK + b0 * Q8_CHUNK;
        for (int r = 0; r < 4; r++)
            for (int b = 0; b < BB; b++) {
                int32_t a = 0;
                for (int j = 0; j < Q8_CHUNK; j++) a += (int32_t)t[r * Q8_CHUNK + j] * x[b * Q8_CHUNK + j];
                total[r][b] += (float)a;
            }
    }
#endif
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < BB; b++) s[r * 8 + b0 + b] = total[r][b];
}

/* q8_tile for every input row b < B, 4 at a time: s[r * 8 + b] = the tile's scaled sums. */
static inline void q8_tile_all(const int8_t *w, const float *scales, int64_t K, const void *xp,
                               int64_t B, float *s) {
    const float *sx = xp;
    const int16_t *xi = (const int16_t *)((const char *)xp + 64);
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
        switch (B - b0) {
        case 1: q8_tile(w, K, xi, B, b0, 1, s); break;
        case 2: q8_tile(w, K, xi, B, b0, 2, s); break;
        case 3: q8_tile(w, K, xi, B, b0, 3, s); break;
        default: q8_tile(w, K, xi, B, b0, 4, s); break;
        }
    }
    for (int r = 0; r < 4; r++)
        for (int64_t b = 0; b < B; b++) s[r * 8 + b] *= scales[r] * sx[b];
}

/* --- INT4 ---------------------------------------------------------------------------------- */

#if HAVE_QV
/* A lane permutation of v: lane i of the result is lane idx(i) of v. */
static inline __attribute__((always_inline)) vf permute(vf v, vi idx) { return __builtin_shuffle(v, idx); }

/* Which lane of kv[r * GC / L] each lane h * L + i of row r's vectors takes its scale from:
   the lane's group (h * L + i) / (GROUP / 16) of the chunk (q4_place), in the row's GC values. */
static inline __attribute__((always_inline)) vi group_index(int r, int h, int GROUP) {
    int GC = Q4_CHUNK / GROUP;
    vi idx;
    for (int i = 0; i < L; i++) idx[i] = r * GC % L + (h * L + i) / (GROUP / 16);
    return idx;
}
#endif

/* One tile against inputs b0 .. b0 + BB - 1 (BB <= 4): s[r * 8 + b] = sum_g scale sx_g dot_g
   (the min terms are added by q4_tile_all). GROUP (64 or 128) a constant where inlined. */
static inline __attribute__((always_inline)) void q4_tile(const uint8_t *w, const uint16_t *sc,
                                                          int64_t K, const int8_t *xg,
                                                          const float *sx, int64_t B, int64_t b0,
                                                          int BB, int GROUP, float *s) {
    int64_t G = q4_groups(K);
    const int GC = Q4_CHUNK / GROUP; /* groups a chunk */
#if HAVE_QV
    vf f[4][4];
    vi idx[4][64 / QV]; /* the scales' lane permutations, made once */
    vi mod;
    for (int i = 0; i < L; i++) mod[i] = i % GC;
    for (int r = 0; r < 4; r++)
        for (int h = 0; h < 64 / QV; h++) idx[r][h] = group_index(r, h, GROUP);
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < BB; b++) f[r][b] = (vf){0};
    for (int64_t c = 0; c < K / Q4_CHUNK; c++) {
        const uint8_t *t = w + c * 4 * 128;
        for (int i = 0; i < 512; i += 64) __builtin_prefetch((const char *)t + QPREFETCH + i, 0, QHINT);
        /* every row's group scales times the inputs', rows in turn (4 GC of them, 16 at most:
           L to a vector), built in registers */
        const uint16_t *scales = sc + c * 8 * GC;
        vf kv[4][16 / L];
        for (int b = 0; b < BB; b++) {
            vf sxv = permute(load_f32(sx + (b0 + b) * G + c * GC), mod);
            for (int v = 0; v < (4 * GC + L - 1) / L; v++) kv[b][v] = vf_halves(scales + v * L) * sxv;
        }
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            /* [b][unit half]: the lanes' integer sums over the chunk, low and high nibbles apart
               (two short chains of dependent dot products, not one long one) */
            qv lo[4][64 / QV], hi[4][64 / QV];
            for (int b = 0; b < BB; b++)
                for (int h = 0; h < 64 / QV; h++) lo[b][h] = hi[b][h] = qv_zero();
            for (int u = 0; u < 2; u++)
                for (int h = 0; h < 64 / QV; h++) {
                    qv v = qv_load(t + r * 128 + u * 64 + h * QV);
                    qv w0 = qv_low_nibbles(v), w1 = qv_high_nibbles(v);
                    for (int b = 0; b < BB; b++) {
                        const int8_t *x = xg + (c * B + b0 + b) * Q4_CHUNK + u * 128 + h * QV;
                        lo[b][h] = qv_dot_u8s8(lo[b][h], w0, qv_load(x));
                        hi[b][h] = qv_dot_u8s8(hi[b][h], w1, qv_load(x + 64));
                    }
                }
            for (int b = 0; b < BB; b++)
                for (int h = 0; h < 64 / QV; h++)
                    f[r][b] += qv_to_vf(qv_add(lo[b][h], hi[b][h])) * permute(kv[b][r * GC / L], idx[r][h]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < BB; b++) s[r * 8 + b0 + b] = hsum(f[r][b]);
#else
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < BB; b++) {
            float total = 0.f;
            for (int64_t g = 0; g < K / GROUP; g++) {
                int32_t a = 0;
                for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k++) {
                    int64_t c = k / Q4_CHUNK;
                    int at = q4_place((int)(k % Q4_CHUNK), GROUP), m = at / 64;
                    uint8_t byte = w[(c * 4 + r) * 128 + m / 2 * 64 + at % 64];
                    a += (m % 2 ? byte >> 4 : byte & 15) * xg[(c * B + b0 + b) * Q4_CHUNK + at];
                }
                float scale = half_to_float(sc[g / GC * 8 * GC + r * GC + g % GC]);
                total += (float)a * scale * sx[(b0 + b) * G + g];
            }
            s[r * 8 + b0 + b] = total;
        }
#endif
}

static inline void q4_tile_all(const uint8_t *w, const uint16_t *sc, int64_t K, int group,
                               const void *xp, int64_t B, float *s) {
    const float *sums = (const float *)((const char *)xp + 64), *sx = sums + B * q4_groups(K);
    const int8_t *xg = (const int8_t *)xp + q4_inputs_offset(B, K);
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
        int64_t n = B - b0;
        if (group == 64)
            n == 1 ? q4_tile(w, sc, K, xg, sx, B, b0, 1, 64, s)
            : n == 2 ? q4_tile(w, sc, K, xg, sx, B, b0, 2, 64, s)
            : n == 3 ? q4_tile(w, sc, K, xg, sx, B, b0, 3, 64, s) : q4_tile(w, sc, K, xg, sx, B, b0, 4, 64, s);
        else
            n == 1 ? q4_tile(w, sc, K, xg, sx, B, b0, 1, 128, s)
            : n == 2 ? q4_tile(w, sc, K, xg, sx, B, b0, 2, 128, s)
            : n == 3 ? q4_tile(w, sc, K, xg, sx, B, b0, 3, 128, s) : q4_tile(w, sc, K, xg, sx, B, b0, 4, 128, s);
    }
    int GC = Q4_CHUNK / group;
    for (int r = 0; r < 4; r++)
        for (int64_t b = 0; b < B; b++) {
            float m = 0.f;
            for (int64_t g = 0; g < K / group; g++)
                m += half_to_float(sc[g / GC * 8 * GC + 4 * GC + r * GC + g % GC]) * sums[b * q4_groups(K) + g];
            s[r * 8 + b] += m;
        }
}

/* --- back to dense rows, for prefill-sized inputs ------------------------------------------- */

/* Row n (of N) of a quantized weight as float32 values into out (K): q * scale (+ min); with
   `unscaled` (INT8 only) q itself, for a product scaled afterwards. */
static void q_row(int fmt_int4, int group, const void *w, const void *scales, int64_t n, int64_t K,
                  int unscaled, float *out) {
    int64_t t = n / 4, r = n % 4;
    if (!fmt_int4) {
        const int8_t *tile = (const int8_t *)w + t * 4 * K;
        float s = unscaled ? 1.f : ((const float *)scales)[n];
        for (int64_t c = 0; c < K / Q8_CHUNK; c++)
            for (int j = 0; j < Q8_CHUNK; j++)
                out[c * Q8_CHUNK + j] = (float)tile[(c * 4 + r) * Q8_CHUNK + j] * s;
        return;
    }
    /* q4_place puts a group's quarter m in one run of group / 4 slots: vector m, from lane
       g * group / 16; so a chunk is copied run by run */
    const uint8_t *tile = (const uint8_t *)w + t * 4 * (K / 2);
    const uint16_t *sc = (const uint16_t *)scales + t * 4 * (K / group) * 2;
    int GC = Q4_CHUNK / group, quarter = group / 4;
    for (int64_t c = 0; c < K / Q4_CHUNK; c++) {
        const uint8_t *bytes = tile + (c * 4 + r) * 128;
        for (int g = 0; g < GC; g++) {
            float scale = half_to_float(sc[c * 8 * GC + r * GC + g]);
            float min = half_to_float(sc[c * 8 * GC + 4 * GC + r * GC + g]);
            for (int m = 0; m < 4; m++) {
                const uint8_t *run = bytes + m / 2 * 64 + g * quarter;
                float *o = out + c * Q4_CHUNK + g * group + m * quarter;
                for (int q = 0; q < quarter; q++) o[q] = (float)(m % 2 ? run[q] >> 4 : run[q] & 15) * scale + min;
            }
        }
    }
}

#endif
