/* Matrix-vector products over int8 and int4 weights, read once at the memory's read rate.

   The weights are laid out in tiles of 4 output rows, so that the 4 rows a thread works on at once
   are one sequential stream (the hardware prefetchers follow one stream; 4 separate rows of an
   int4 weight are 2 KB apiece at K = 4096, and a prefetch distance crossed into other rows):

     INT8  w: (N/4, K/64, 4, 64) int8: for each 64 inputs, the 4 rows' 64 weights in turn;
           scales: (N) float32, weight = q * scale.
     INT4  w: (N/4, K/128, 4, 64) bytes: for each 128 inputs, each row's 64 bytes in turn; byte j
           holds input j's weight in its low nibble and input 64 + j's in its high one, q in 0..15;
           scales: (N/4, K/group, 4, 2) float16 bits: (scale, min) per row and group of `group`
           (64 or 128) inputs, weight = q * scale + min.
     INT4N as INT4, but q indexes 16 levels set where normally distributed weights fall most
           (Q4_NORMAL): weight = level(q) * scale + min, level(q) = Q4_NORMAL[q] * 15 / 127.

   The inputs are quantized as the weights are, so that the products are exact integer dot
   products summed in int32 and only their sums are scaled in float32:

     INT8  inputs per row to int16, x = sx * xq, |xq| <= QMAX (15 bits: 64 times finer than the
           bfloat16 rounding every input has already been through, relative to the row's largest);
           y[n] = scale[n] * sx * sum_k q[n,k] xq[k]                              (vpdpwssd)
           Not 8 bits, though one vpdpbusd per 64 weights (the weights stored unsigned) would
           replace a widening and two vpdpwssd: 1.6-1.8x the products per second from L2 on one
           thread of a 2-core AMD EPYC Zen 4 (a row scale). With each row's largest |x| below 6
           -> 127 and the rest kept exact, int8 decode matched bitsandbytes' 8bit with no margin
           and fell behind it with the head quantized, teacher-forced (mid checkpoint, 24 x 32,
           8-bit prefill: mean |dlogit| 0.0428, top-1 0.910, head 0.0452 and 0.902, against 8bit's
           0.0429 and 0.911; 15-bit decode inputs: 0.0350 and 0.928).
     INT4  inputs per group of the weights' groups to int8, x = sx_g * xg, |xg| <= 127 (the
           weights' own error, a 16th of a group's range, is ~20 times an input's 254th of its
           group's largest, and an outlier input coarsens its own group only);
           y[n] = sum_g scale[n,g] * sx_g * sum_{k in g} q[n,k] xg[k]  +  sum_g min[n,g] * X[g]
                                                                                  (vpdpbusd)
     INT4N the same sums over Q4_NORMAL[q] (a byte shuffle per vector), scaled by 15 / 127 more.
     where X[g] is the sum of the group's inputs (float32, before quantizing).

   Without integer vectors (isa.h: HAVE_QV 0) the same sums are taken a value at a time. */
#ifndef FUYU_QUANT_H
#define FUYU_QUANT_H

#include <omp.h>

#include "isa.h"

#define QMAX 32512       /* xq's largest magnitude (127 * 256) */
#define Q8_CHUNK 64      /* inputs per tile step, INT8 */
#define Q4_CHUNK 128     /* inputs per tile step, INT4 */
#define Q8_FLUSH 32      /* INT8 steps summed in int32 before adding to the float total: with
                            |q| <= 127 and |xq| <= QMAX a lane's int32 sum stays under 2^31 */
#define QPREFETCH 8192   /* bytes ahead in a tile's stream, into L2 (QHINT): more lines in flight
                            than L1's miss buffers hold. Against 2,048 into L1, 8B layer shapes
                            at batch 1, paired in one process at 31-34 GB/s on a 2-core AMD EPYC
                            Zen 4: int8 +6-21% (three runs), int4 +8%; 12-16 KB no better,
                            into L3 less */
#define QHINT 2          /* __builtin_prefetch locality: 2 = prefetcht1, into L2 (as gemv.h) */

/* INT4N's levels, as integers for the byte products (<= 127: two products of a byte pair stay
   under 2^15 where the CPU has no VNNI). Found by Lloyd's algorithm over normally distributed
   weights in groups of 128, fitted by q4_fit's search (then 6 ranges, 2 refits); symmetric.
   Against 16 even levels they leave ~16% less squared error (0.00719 against 0.00860 of
   unit-variance weights). */
static const uint8_t Q4_NORMAL[16] = {0, 14, 25, 33, 41, 48, 54, 60, 67, 73, 79, 86, 94, 102, 113, 127};
#define Q4_NORMAL_UNIT (15.f / 127.f) /* a Q4_NORMAL step in the units of (scale, min) */

/* level(q) in the units of (scale, min): q itself, or (normal) Q4_NORMAL[q] * 15 / 127. */
static inline float q4_level(int normal, int q) {
    return normal ? Q4_NORMAL[q] * Q4_NORMAL_UNIT : (float)q;
}

/* table[idx] for each lane, idx in 0..15: a shuffle of the table's vectors (one with AVX-512). */
static inline vf lookup16(const float *table, vi idx) {
#if L == 16
    vf t;
    memcpy(&t, table, VB);
    return __builtin_shuffle(t, idx);
#else
    vf r = {0};
    for (int p = 0; p < 16; p += L) {
        vf t;
        memcpy(&t, table + p, VB);
        vi in = (idx >= p) & (idx < p + L);
        vf got = __builtin_shuffle(t, (idx - p) & (L - 1));
        r = (vf)(((vi)got & in) | ((vi)r & ~in));
    }
    return r;
#endif
}

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
         for each 128 inputs, each row's 128 int8 in turn. */

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
                xg[(k / Q4_CHUNK * B + b) * Q4_CHUNK + k % Q4_CHUNK] = (int8_t)(q > 127.f ? 127 : q < -127.f ? -127 : q);
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

/* One tile against inputs b0 .. b0 + BB - 1 (BB <= 4): s[r * 8 + b] = sum_g scale sx_g dot_g
   (the min terms are added by q4_tile_all). GROUP (64 or 128) a constant where inlined: with 64,
   a chunk's low nibbles (its inputs 0..63) are one group and its high nibbles the next. */
static inline __attribute__((always_inline)) void q4_tile(const uint8_t *w, const uint16_t *sc,
                                                          int64_t K, const int8_t *xg,
                                                          const float *sx, int64_t B, int64_t b0,
                                                          int BB, int GROUP, int NORMAL, float *s) {
    int64_t G = q4_groups(K);
    float unit = NORMAL ? Q4_NORMAL_UNIT : 1.f;
#if HAVE_QV
    qv table = qv_table16(Q4_NORMAL);
    vf f[4][4], h[4][4]; /* the sums of low and (GROUP 64) high halves: two chains of adds */
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < BB; b++) f[r][b] = h[r][b] = (vf){0};
    for (int64_t c = 0; c < K / Q4_CHUNK; c++) {
        const uint8_t *t = w + c * 4 * 64;
        __builtin_prefetch((const char *)t + QPREFETCH, 0, QHINT);
        __builtin_prefetch((const char *)t + QPREFETCH + 64, 0, QHINT);
        __builtin_prefetch((const char *)t + QPREFETCH + 128, 0, QHINT);
        __builtin_prefetch((const char *)t + QPREFETCH + 192, 0, QHINT);
        /* the chunk's scales times the inputs' (every row's (scale, min) pair at 2r, 2r + 1): of
           its group, or (GROUP 64) of its two */
        float raw0[8], raw1[8], k0[4][8], k1[4][8];
        int64_t g = c * Q4_CHUNK / GROUP;
        halves_to_floats(sc + g * 8, raw0);
        if (GROUP == 64) halves_to_floats(sc + (g + 1) * 8, raw1);
        for (int b = 0; b < BB; b++)
            for (int i = 0; i < 8; i++) {
                k0[b][i] = raw0[i] * sx[(b0 + b) * G + g] * unit;
                if (GROUP == 64) k1[b][i] = raw1[i] * sx[(b0 + b) * G + g + 1] * unit;
            }
        for (int r = 0; r < 4; r++) {
            qv a0[4], a1[4]; /* [b]: the low nibbles' sums, the high ones' (GROUP 128: one sum) */
            for (int b = 0; b < BB; b++) a0[b] = a1[b] = qv_zero();
            for (int o = 0; o < 64; o += QV) {
                qv v = qv_load(t + r * 64 + o), w0 = qv_low_nibbles(v), w1 = qv_high_nibbles(v);
                if (NORMAL) w0 = qv_lookup16(table, w0), w1 = qv_lookup16(table, w1);
                for (int b = 0; b < BB; b++) {
                    const int8_t *x = xg + (c * B + b0 + b) * Q4_CHUNK;
                    a0[b] = qv_dot_u8s8(a0[b], w0, qv_load(x + o));
                    if (GROUP == 64)
                        a1[b] = qv_dot_u8s8(a1[b], w1, qv_load(x + 64 + o));
                    else
                        a0[b] = qv_dot_u8s8(a0[b], w1, qv_load(x + 64 + o));
                }
            }
            for (int b = 0; b < BB; b++) {
                f[r][b] += qv_to_vf(a0[b]) * k0[b][2 * r];
                if (GROUP == 64) h[r][b] += qv_to_vf(a1[b]) * k1[b][2 * r];
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < BB; b++) s[r * 8 + b0 + b] = hsum(f[r][b] + h[r][b]);
#else
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < BB; b++) {
            float total = 0.f;
            for (int64_t g = 0; g < K / GROUP; g++) {
                int32_t a = 0;
                for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k++) {
                    int64_t c = k / Q4_CHUNK, j = k % Q4_CHUNK;
                    uint8_t byte = w[(c * 4 + r) * 64 + j % 64];
                    int q = j < 64 ? byte & 15 : byte >> 4;
                    a += (NORMAL ? Q4_NORMAL[q] : q) * xg[(c * B + b0 + b) * Q4_CHUNK + j];
                }
                total += (float)a * half_to_float(sc[(g * 4 + r) * 2]) * sx[(b0 + b) * G + g] * unit;
            }
            s[r * 8 + b0 + b] = total;
        }
#endif
}

/* q4_tile for every input row, 4 at a time, with GROUP and NORMAL constants. */
static inline __attribute__((always_inline)) void q4_tiles(const uint8_t *w, const uint16_t *sc,
                                                           int64_t K, const int8_t *xg,
                                                           const float *sx, int64_t B, int GROUP,
                                                           int NORMAL, float *s) {
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
        int64_t n = B - b0;
        n == 1 ? q4_tile(w, sc, K, xg, sx, B, b0, 1, GROUP, NORMAL, s)
        : n == 2 ? q4_tile(w, sc, K, xg, sx, B, b0, 2, GROUP, NORMAL, s)
        : n == 3 ? q4_tile(w, sc, K, xg, sx, B, b0, 3, GROUP, NORMAL, s)
                 : q4_tile(w, sc, K, xg, sx, B, b0, 4, GROUP, NORMAL, s);
    }
}

static inline void q4_tile_all(const uint8_t *w, const uint16_t *sc, int64_t K, int group,
                               int normal, const void *xp, int64_t B, float *s) {
    const float *sums = (const float *)((const char *)xp + 64), *sx = sums + B * q4_groups(K);
    const int8_t *xg = (const int8_t *)xp + q4_inputs_offset(B, K);
    if (group == 64)
        normal ? q4_tiles(w, sc, K, xg, sx, B, 64, 1, s) : q4_tiles(w, sc, K, xg, sx, B, 64, 0, s);
    else
        normal ? q4_tiles(w, sc, K, xg, sx, B, 128, 1, s) : q4_tiles(w, sc, K, xg, sx, B, 128, 0, s);
    for (int r = 0; r < 4; r++)
        for (int64_t b = 0; b < B; b++) {
            float m = 0.f;
            for (int64_t g = 0; g < K / group; g++) m += half_to_float(sc[(g * 4 + r) * 2 + 1]) * sums[b * q4_groups(K) + g];
            s[r * 8 + b] += m;
        }
}

/* --- int4 quantization: each group's (scale, min) by search --------------------------------- */

/* Ranges tried (the group's min..max shrunk about its centre by 0, 5, 10, .. %) and least-squares
   refits of (scale, min) to each range's levels, for even and normal levels. The normal levels'
   outer steps are already wide: shrinking past 10% gained nothing (0.1% of the squared error of
   normal weights in groups of 128), a third refit 1%, at two thirds of the time. */
#define Q4_FIT_SHRINKS 6
#define Q4_FIT_ROUNDS 2
#define Q4N_FIT_SHRINKS 3
#define Q4N_FIT_ROUNDS 3

/* Of each w[j], the nearest level under (s, m), w ~ level * s + m: its index into ix[j] (0..15) and
   its value (q4_level) into lv[j]; n a multiple of L (the caller's groups are multiples of 16).
   The sums the least-squares fit and the error take: t[0] = sum lv, t[1] = sum lv^2,
   t[2] = sum lv w. In vectors by hand: GCC leaves the clamped rounding scalar. Even levels
   (level NULL) by rounding; normal ones, level[16], by a binary search over mid[16] (the
   midpoints between them, then infinity). */
static inline void q4_levels(const float *w, int n, float s, float m, const float *level,
                             const float *mid, float *lv, float *ix, float t[3]) {
    int normal = level != NULL;
    vf inv = (vf){0} + 1.f / s, mv = (vf){0} + m, a = {0}, b = {0}, c = {0};
    for (int j = 0; j < n; j += L) {
        vf x, l, u;
        memcpy(&x, w + j, VB);
        vi k;
        if (normal) {
            u = (x - mv) * inv;
            k = (vi){0};
            for (int step = 8; step; step >>= 1) k += (u > lookup16(mid, k + (step - 1))) & step;
            l = lookup16(level, k);
            vf f = __builtin_convertvector(k, vf);
            memcpy(ix + j, &f, VB);
        } else {
            k = __builtin_convertvector((x - mv) * inv + 0.5f, vi); /* truncated: rounded for x >= 0 */
            k &= ~(k < 0); /* below the range (or NaN: INT_MIN) -> 0 */
            vi big = k > 15;
            k = (k & ~big) | (big & 15);
            l = __builtin_convertvector(k, vf);
            memcpy(ix + j, &l, VB);
        }
        memcpy(lv + j, &l, VB);
        a += l, b += l * l, c += l * x;
    }
    t[0] = hsum(a), t[1] = hsum(b), t[2] = hsum(c);
}

/* One group of n <= 256 weights: level indices q (0..15) and (scale, min) with
   w ~ q4_level(normal, q) * scale + min, the pair of least squared error among the ranges tried.
   Min-max alone leaves ~15% more squared error on normally distributed weights (groups of 128)
   than this search: the extreme values stretch the 16 levels over a range most weights do not
   use. */
static void q4_fit(const float *w, int n, int normal, uint8_t *q, float *scale, float *min) {
    float lo = w[0], hi = w[0], sw = 0.f, sww = 0.f;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(+ : sw, sww)
    for (int j = 0; j < n; j++) {
        lo = w[j] < lo ? w[j] : lo;
        hi = w[j] > hi ? w[j] : hi;
        sw += w[j], sww += w[j] * w[j];
    }
    float c = 0.5f * (lo + hi), r = hi - lo, best = INFINITY, lv[256], ix[256], t[3];
    float level[16], mid[16]; /* normal levels' values and the midpoints between them */
    for (int i = 0; i < 16; i++) level[i] = q4_level(1, i);
    for (int i = 0; i < 15; i++) mid[i] = 0.5f * (level[i] + level[i + 1]);
    mid[15] = INFINITY;
    const float *lev = normal ? level : NULL, *mids = normal ? mid : NULL;
    *scale = 1e-8f, *min = lo;
    for (int j = 0; j < n; j++) q[j] = 0;
    if (!(r > 0.f)) return; /* all equal (or not finite): one level */
    int shrinks = normal ? Q4N_FIT_SHRINKS : Q4_FIT_SHRINKS, rounds = normal ? Q4N_FIT_ROUNDS : Q4_FIT_ROUNDS;
    for (int i = 0; i < shrinks; i++) {
        float a = 1.f - 0.05f * i, s = r * a / 15.f, m = c - 0.5f * r * a;
        q4_levels(w, n, s, m, lev, mids, lv, ix, t);
        for (int round = 0; round < rounds; round++) {
            float det = n * t[1] - t[0] * t[0], s2 = (n * t[2] - t[0] * sw) / det;
            if (!(det > 0.f) || !(s2 > 0.f)) break;
            s = s2, m = (sw - s2 * t[0]) / n;
            q4_levels(w, n, s, m, lev, mids, lv, ix, t);
        }
        /* sum (lv s + m - w)^2 from the sums */
        float err = s * s * t[1] + 2.f * s * m * t[0] - 2.f * s * t[2] + n * m * m - 2.f * m * sw + sww;
        if (err < best) {
            best = err, *scale = s, *min = m;
            for (int j = 0; j < n; j++) q[j] = (uint8_t)ix[j];
        }
    }
}

/* --- back to dense rows, for prefill-sized inputs ------------------------------------------- */

/* One value of a dense row, stored as float32 or as bfloat16 bits rounded as torch rounds. */
static inline __attribute__((always_inline)) void put_dense(void *out, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)out)[i] = round_bf16_finite(v);
    else
        ((float *)out)[i] = v;
}

/* Row n (of N) of a quantized weight into out (K), float32 or (bf16) bfloat16: q * scale (+ min),
   or for INT4N level(q) * scale + min; with `unscaled` (INT8 only) q itself, for a product scaled
   afterwards (exact in bfloat16). fmt: quant's code, 0 INT8, 1 INT4, 2 INT4N. One pass a row,
   compiled for each output (q_row, q_row_bf16), so the loops vectorise whole. */
static inline __attribute__((always_inline)) void q_row_to(int fmt, int group, const void *w,
                                                           const void *scales, int64_t n, int64_t K,
                                                           int unscaled, int bf16, void *out) {
    int64_t t = n / 4, r = n % 4;
    if (fmt == 0) {
        const int8_t *tile = (const int8_t *)w + t * 4 * K;
        float s = unscaled ? 1.f : ((const float *)scales)[n];
        for (int64_t c = 0; c < K / Q8_CHUNK; c++)
            for (int j = 0; j < Q8_CHUNK; j++)
                put_dense(out, c * Q8_CHUNK + j, (float)tile[(c * 4 + r) * Q8_CHUNK + j] * s, bf16);
        return;
    }
    const uint8_t *tile = (const uint8_t *)w + t * 4 * (K / 2);
    const uint16_t *sc = (const uint16_t *)scales + t * 4 * (K / group) * 2;
    float level[16];
    for (int i = 0; i < 16; i++) level[i] = q4_level(fmt == 2, i);
    for (int64_t c = 0; c < K / Q4_CHUNK; c++) {
        const uint8_t *bytes = tile + (c * 4 + r) * 64;
        for (int half = 0; half < 2; half++) { /* the low nibbles' 64 inputs, the high ones' */
            int64_t g = (c * Q4_CHUNK + half * 64) / group;
            float scale = half_to_float(sc[(g * 4 + r) * 2]), min = half_to_float(sc[(g * 4 + r) * 2 + 1]);
            int shift = 4 * half;
            if (fmt == 2)
                for (int j = 0; j < 64; j += L) {
                    vi k;
                    for (int i = 0; i < L; i++) k[i] = (bytes[j + i] >> shift) & 15;
                    vf v = lookup16(level, k) * scale + min;
                    for (int i = 0; i < L; i++) put_dense(out, c * Q4_CHUNK + half * 64 + j + i, v[i], bf16);
                }
            else
                for (int j = 0; j < 64; j++)
                    put_dense(out, c * Q4_CHUNK + half * 64 + j, (float)((bytes[j] >> shift) & 15) * scale + min, bf16);
        }
    }
}

static void q_row(int fmt, int group, const void *w, const void *scales, int64_t n, int64_t K,
                  int unscaled, float *out) {
    q_row_to(fmt, group, w, scales, n, K, unscaled, 0, out);
}

static void q_row_bf16(int fmt, int group, const void *w, const void *scales, int64_t n, int64_t K,
                       int unscaled, uint16_t *out) {
    q_row_to(fmt, group, w, scales, n, K, unscaled, 1, out);
}


/* --- INT8 prefill with 8-bit inputs: the rows around torch's int8 GEMM (torch._int_mm) ----------

   A prefill-sized product y = x W^T with W int8 (one scale per row) multiplies 8-bit integers on
   both sides: each input row quantized to int8 with its own scale (largest |x| -> 127), except
   the columns where some row's |x| reaches `limit` (LLM.int8's outlier columns), which are left
   out of the integers and multiplied in float32 by the caller. */

/* The bits of |x[i]| as float32: an unsigned integer that orders magnitudes as floats do. */
static inline __attribute__((always_inline)) uint32_t abs_bits(const void *x, int64_t i, dtype dt) {
    if (dt == BF16) return ((uint32_t)((const uint16_t *)x)[i] << 16) & 0x7fffffffu;
    uint32_t u;
    memcpy(&u, (const float *)x + i, 4);
    return u & 0x7fffffffu;
}

/* Rows of x (M, K) in dt -> xq (M, K) int8, sx (M) float32 with x ~ xq * sx outside the outlier
   columns (xq 0 there); outlier[k] = 1 where |x[m, k]| >= limit for some m. Returns how many
   columns are outliers; more than most, and nothing is quantized (the caller takes another path).
   colmax: K floats of scratch per thread. dt a constant where inlined (q8_quantize_bf16, _f32), so the
   loops vectorise. */
static inline __attribute__((always_inline)) int64_t q8_quantize_rows(const void *x, dtype dt, int64_t M,
                                                                      int64_t K, float limit, int64_t most,
                                                                      int8_t *xq, float *sx, uint8_t *outlier,
                                                                      float *colmax, int threads) {
    /* magnitudes compared as the bits of |x| in float32 (unsigned, monotone): max reductions over
       integers vectorise, fmaxf's do not */
    int64_t count = 0;
    uint32_t *cols = (uint32_t *)colmax, lim;
    memcpy(&lim, &limit, 4);
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        uint32_t *mine = cols + (int64_t)t * K;
        for (int64_t k = 0; k < K; k++) mine[k] = 0;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) {
                uint32_t a = abs_bits(x, m * K + k, dt);
                mine[k] = a > mine[k] ? a : mine[k];
            }
#pragma omp for schedule(static) reduction(+ : count)
        for (int64_t k = 0; k < K; k++) {
            uint32_t top = 0;
            for (int i = 0; i < T; i++) top = cols[(int64_t)i * K + k] > top ? cols[(int64_t)i * K + k] : top;
            outlier[k] = top >= lim;
            count += outlier[k];
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < (count > most ? 0 : M); m++) {
            uint32_t bits = 0;
            for (int64_t k = 0; k < K; k++) {
                uint32_t a = outlier[k] ? 0 : abs_bits(x, m * K + k, dt);
                bits = a > bits ? a : bits;
            }
            float top;
            memcpy(&top, &bits, 4);
            float s = top > 0.f ? top / 127.f : 1.f, inv = 1.f / s;
            sx[m] = s;
            for (int64_t k = 0; k < K; k++) {
                float q = outlier[k] ? 0.f : rintf(get(x, m * K + k, dt) * inv);
                xq[m * K + k] = (int8_t)(q > 127.f ? 127 : q < -127.f ? -127 : q);
            }
        }
    }
    return count;
}

static int64_t q8_quantize_bf16(const void *x, int64_t M, int64_t K, float limit, int64_t most, int8_t *xq,
                                float *sx, uint8_t *outlier, float *colmax, int threads) {
    return q8_quantize_rows(x, BF16, M, K, limit, most, xq, sx, outlier, colmax, threads);
}

static int64_t q8_quantize_f32(const void *x, int64_t M, int64_t K, float limit, int64_t most, int8_t *xq,
                               float *sx, uint8_t *outlier, float *colmax, int threads) {
    return q8_quantize_rows(x, F32, M, K, limit, most, xq, sx, outlier, colmax, threads);
}

/* Rows n0 .. n1 - 1 of an INT8 weight (the tiled layout) as plain int8 rows out (n1 - n0, K). */
static void q8_plain_rows(const int8_t *w, int64_t n0, int64_t n1, int64_t K, int8_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *tile = w + (n / 4) * 4 * K;
        for (int64_t c = 0; c < K / Q8_CHUNK; c++)
            memcpy(out + (n - n0) * K + c * Q8_CHUNK, tile + (c * 4 + n % 4) * Q8_CHUNK, Q8_CHUNK);
    }
}

/* y[m, j] (row stride ldy, in dt) = sw[j] * (acc[m, j] * sx[m] + extra[m, j]) + bias[j], rounded
   once; acc, extra (M, n) (extra and bias may be NULL). */
static void q8_finish_rows(const int32_t *acc, const float *sx, const float *extra, const float *sw,
                           const void *bias, void *y, dtype dt, int64_t M, int64_t n, int64_t ldy, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < n; j++) {
            float v = (float)acc[m * n + j] * sx[m];
            if (extra) v += extra[m * n + j];
            v *= sw[j];
            if (bias) v += get(bias, j, dt);
            if (dt == BF16)
                ((uint16_t *)y)[m * ldy + j] = round_bf16_finite(v);
            else
                ((float *)y)[m * ldy + j] = v;
        }
}

#endif
