/* Prefill attention over bfloat16 keys and values with the bfloat16 dot product instruction: all
   T new queries of a head against its cache, in blocks (flash attention: scores, an online softmax
   and the weighted values a block of keys at a time, nothing of size T x T in memory).

   The roundings are those of torch's CPU flash attention in bfloat16 (SDPA's kernel, which the
   plain forward calls): q.k summed in float32 and scaled, softmax in float32, its weights rounded
   to bfloat16 for the product with the values (summed in float32 from the unrounded ones), the
   output divided by the sum and rounded once. Both products run at the instruction's full width:

     scores  16 keys a vector: the keys of a block laid out by pairs of dimensions (kt: for each
             pair p, the 16 keys' (2p, 2p + 1) values), each multiplied with one query's pair p
             broadcast to every lane; FQ queries share each load of the keys.
     values  16 output dimensions a vector: the values laid out by pairs of keys (vp: for each
             pair of keys, each dimension's two values), multiplied with the pair's two weights
             broadcast.

   Without AVX512_BF16 (isa.h: HAVE_DOT_BF16 0) nothing is compiled here and SDPA serves. */
#ifndef FUYU_FLASH_H
#define FUYU_FLASH_H

#include "isa.h"

#define FQ 16           /* queries a block */
#define FK 16           /* keys a block: one vector of scores */
#define FLASH_MAX_D 256 /* head dims served (a multiple of 32) */

static inline int64_t flash_keys(int64_t n) { return (n + FK - 1) / FK * FK; } /* padded to blocks */

#if HAVE_DOT_BF16

/* One head's first n keys ks (n, d) into kt (flash_keys(n) / FK, d / 2, FK, 2), its values vs into
   vp (flash_keys(n) / 2, d, 2); the padding zero. rs: the row stride of ks and vs (elements). */
static void flash_pack(const uint16_t *ks, const uint16_t *vs, int64_t n, int64_t d, int64_t rs,
                       uint16_t *kt, uint16_t *vp) {
    int64_t np = flash_keys(n);
    for (int64_t key = 0; key < np; key++) {
        int64_t b = key / FK, j = key % FK;
        for (int64_t p = 0; p < d / 2; p++) {
            uint16_t *o = kt + ((b * (d / 2) + p) * FK + j) * 2;
            o[0] = key < n ? ks[key * rs + 2 * p] : 0;
            o[1] = key < n ? ks[key * rs + 2 * p + 1] : 0;
        }
        for (int64_t c = 0; c < d; c++) vp[((key / 2) * d + c) * 2 + key % 2] = key < n ? vs[key * rs + c] : 0;
    }
}

static inline bv broadcast_pair(const uint16_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

static inline float hmax(vf v) { return _mm512_reduce_max_ps((__m512)v); }

/* Queries q0 .. q0 + nq - 1 (nq <= FQ) of one head: q (T, d) bf16, the packed keys and values of
   its n cached slots; query i sits at slot start + q0 + i and sees slot s where the mask says so
   (mask: (T, ms) bytes), or with no mask where s <= its slot. out: row q0 + i at out + (q0 + i) *
   os, d bf16 values. */
static void flash_block(const uint16_t *q, const uint16_t *kt, const uint16_t *vp, const uint8_t *mask,
                        int64_t ms, int64_t n, int64_t d, int64_t start, int64_t q0, int nq,
                        float scale, uint16_t *out, int64_t os) {
    float mx[FQ], l[FQ], o[FQ][FLASH_MAX_D];
    uint16_t pb[FQ][FK];
    for (int i = 0; i < FQ; i++) {
        mx[i] = -INFINITY, l[i] = 0.f;
        memset(o[i], 0, sizeof(float) * d);
    }
    int64_t end = mask ? n : start + q0 + nq; /* slots any of these queries may see */
    if (end > n) end = n;
    for (int64_t k0 = 0; k0 < end; k0 += FK) {
        const uint16_t *kb = kt + k0 / FK * (d / 2) * FK * 2;
        vf s[FQ];
        for (int i = 0; i < FQ; i++) s[i] = (vf){0};
        for (int64_t p = 0; p < d / 2; p++) {
            bv kv = bv_load(kb + p * FK * 2);
            for (int i = 0; i < nq; i++) s[i] = dot_bf16(s[i], kv, broadcast_pair(q + (q0 + i) * d + 2 * p));
        }
        /* mask, unless every key of the block is seen by every query */
        int whole = !mask && k0 + FK <= n && k0 + FK - 1 <= start + q0;
        for (int i = 0; i < nq; i++) {
            vf x = s[i] * scale;
            if (!whole)
                for (int j = 0; j < FK; j++) {
                    int64_t key = k0 + j;
                    int seen = key < n && (mask ? mask[(q0 + i) * ms + key] != 0 : key <= start + q0 + i);
                    if (!seen) x[j] = -INFINITY;
                }
            float top = hmax(x);
            if (top > mx[i]) { /* a new maximum: what was summed so far scaled to it */
                float alpha = mx[i] == -INFINITY ? 0.f : expf(mx[i] - top);
                l[i] *= alpha;
                for (int64_t c = 0; c < d; c++) o[i][c] *= alpha;
                mx[i] = top;
            }
            if (mx[i] == -INFINITY) { /* nothing seen yet */
                memset(pb[i], 0, sizeof pb[i]);
                continue;
            }
            vf e = vexp(x - mx[i]);
            l[i] += _mm512_reduce_add_ps((__m512)e);
            __m256bh h = _mm512_cvtneps_pbh((__m512)e); /* rounded to nearest even, as torch */
            memcpy(pb[i], &h, sizeof h);
        }
        for (int i = nq; i < FQ; i++) memset(pb[i], 0, sizeof pb[i]);
        /* each vector of the values' block loaded once for all the queries */
        const uint16_t *vb = vp + (k0 / 2) * d * 2;
        for (int64_t c = 0; c < d; c += L) {
            vf acc[FQ];
            for (int i = 0; i < FQ; i++) acc[i] = load_f32(o[i] + c);
            for (int m = 0; m < FK / 2; m++) {
                bv vv = bv_load(vb + (m * d + c) * 2);
                for (int i = 0; i < FQ; i++) acc[i] = dot_bf16(acc[i], vv, broadcast_pair(pb[i] + 2 * m));
            }
            for (int i = 0; i < FQ; i++) memcpy(o[i] + c, acc + i, VB);
        }
    }
    for (int i = 0; i < nq; i++)
        for (int64_t c = 0; c < d; c++) out[(q0 + i) * os + c] = round_bf16(o[i][c] / l[i]);
}

#endif
#endif
