/* Integer vectors for the quantized kernels (quant.h) and the bfloat16 dot product of the plain
   one (gemv.h), with the instructions the target CPU has. Everything else is plain C over vec.h.

   qv is a vector of QV bytes, as wide as vec.h's float vector vf (VB), so a sum of integers
   converts into a vf in one step:
     AVX-512 (BW): 64 bytes; the dot products are one instruction with AVX512-VNNI
                   (vpdpbusd, vpdpwssd), two (multiply-add pairs, then add) without it.
     AVX2:         32 bytes; one instruction with AVX-VNNI, two without.
   Without either, HAVE_QV is 0 and quant.h computes the same sums a value at a time. */
#ifndef FUYU_ISA_H
#define FUYU_ISA_H

#include "vec.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__AVX512BW__) && VB == 64
#define HAVE_QV 1
#define QV 64
typedef __m512i qv;
static inline qv qv_load(const void *p) { return _mm512_loadu_si512(p); }
static inline qv qv_zero(void) { return _mm512_setzero_si512(); }
static inline qv qv_low_nibbles(qv v) { return _mm512_and_si512(v, _mm512_set1_epi8(15)); }
static inline qv qv_high_nibbles(qv v) {
    return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15));
}
/* 16 bytes at p in every 128-bit lane; qv_lookup16: table[v] for each byte v in 0..15. */
static inline qv qv_table16(const uint8_t *p) { return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p)); }
static inline qv qv_lookup16(qv table, qv v) { return _mm512_shuffle_epi8(table, v); }
/* QV/2 bytes of int8 at p, widened to QV/2 int16. */
static inline qv qv_widen_i8(const int8_t *p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
/* acc (int32 lanes) += sum over each lane's 4 byte pairs of u (unsigned) * s (signed). */
static inline qv qv_dot_u8s8(qv acc, qv u, qv s) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, u, s);
#else /* u <= 127 here: the 16-bit pair sums cannot saturate */
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
/* acc (int32 lanes) += sum over each lane's 2 int16 pairs of a * b. */
static inline qv qv_dot_i16(qv acc, qv a, qv b) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
static inline vf qv_to_vf(qv v) { return (vf)_mm512_cvtepi32_ps(v); }

#elif defined(__x86_64__) && defined(__AVX2__) && VB == 32
#define HAVE_QV 1
#define QV 32
typedef __m256i qv;
static inline qv qv_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline qv qv_zero(void) { return _mm256_setzero_si256(); }
static inline qv qv_low_nibbles(qv v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
static inline qv qv_high_nibbles(qv v) {
    return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15));
}
static inline qv qv_table16(const uint8_t *p) { return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)); }
static inline qv qv_lookup16(qv table, qv v) { return _mm256_shuffle_epi8(table, v); }
static inline qv qv_widen_i8(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
static inline qv qv_dot_u8s8(qv acc, qv u, qv s) {
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
static inline qv qv_dot_i16(qv acc, qv a, qv b) {
#ifdef __AVXVNNI__
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
static inline vf qv_to_vf(qv v) { return (vf)_mm256_cvtepi32_ps(v); }

#else
#define HAVE_QV 0
#endif

/* The bfloat16 dot product instruction (AVX512_BF16 vdpbf16ps): acc (16 float32 lanes) += the
   products of each lane's two bfloat16 pairs, summed in float32. Its products are exact (8-bit
   significands), each addition rounds to nearest even as an FMA does, and subnormal inputs and
   results are flushed to zero, which bfloat16 weights and activations of a trained network never
   reach (the smallest normal bfloat16 is 1.2e-38). */
#if defined(__x86_64__) && defined(__AVX512BF16__) && VB == 64
#define HAVE_DOT_BF16 1
typedef __m512i bv; /* 32 bfloat16 values */
static inline bv bv_load(const uint16_t *p) { return _mm512_loadu_si512(p); }
static inline vf dot_bf16(vf acc, bv w, bv x) {
    return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)w, (__m512bh)x);
}
#else
#define HAVE_DOT_BF16 0
#endif

#endif
