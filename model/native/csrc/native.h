/* The library's exported functions: the one table of their signatures.

   native.c includes it, so the compiler checks every definition against it; model/native/build.py
   reads it to make the ctypes bindings (a pointer becomes c_void_p, int64_t c_int64, int, dtype
   and wformat c_int, float c_float; void: no result) and the enum codes. One prototype per line,
   as it is here. */
#ifndef FUYU_NATIVE_H
#define FUYU_NATIVE_H

#include <stdint.h>

/* The dtype of activations, plain weights, biases, caches and outputs: float32, or bfloat16
   stored as its 16 bits. Each kernel is written once over it; inlined code is specialised for
   each value by the compiler. */
typedef enum { F32, BF16 } dtype;

/* How a weight is stored: in the dtype (PLAIN), or quantized in quant.h's tiled layouts with
   their scales (INT8: one per output row; INT4: a scale and a min per row and group of inputs). */
typedef enum { PLAIN, INT8, INT4, INT4N } wformat;

/* y (B, N) = x (B, K) @ W^T + bias (N; may be NULL), 1 <= B <= 8; x, bias, y in dt; W: w and
   scales in format fmt (group: INT4's inputs per scale, 64 or 128); scratch: fuyu_scratch_bytes. */
void fuyu_linear(const void *x, const void *w, const void *scales, const void *bias, void *y, dtype dt, wformat fmt, int group, int64_t B, int64_t N, int64_t K, int threads, void *scratch);

/* Bytes of scratch fuyu_linear needs for B rows of K inputs. */
int64_t fuyu_scratch_bytes(int64_t B, int64_t K);

/* Rows n0 .. n1 - 1 of a weight (w, scales in format fmt) as dense rows in dt, out (n1 - n0, K);
   unscaled (INT8): q itself, exactly, for a product scaled by the scales afterwards. */
void fuyu_dequant(const void *w, const void *scales, void *out, dtype dt, wformat fmt, int group, int64_t n0, int64_t n1, int64_t K, int unscaled, int threads);

/* Prefill rows x (M, K) in dt as 8-bit integers for an INT8 weight's int8 GEMM: xq (M, K) int8 and
   sx (M) float32, x ~ xq * sx, except in the columns where some |x| >= limit (outlier (K) bytes set
   to 1, xq 0 there); returns their count (more than `most`: xq and sx are not written).
   scratch: fuyu_q8_scratch_bytes. */
int64_t fuyu_q8_quantize(const void *x, dtype dt, int64_t M, int64_t K, float limit, int64_t most, int8_t *xq, float *sx, uint8_t *outlier, int threads, void *scratch);

/* Bytes of scratch fuyu_q8_quantize needs. */
int64_t fuyu_q8_scratch_bytes(int64_t K, int threads);

/* Rows n0 .. n1 - 1 of an INT8 weight w (N, K, tiled) as plain int8 rows out (n1 - n0, K). */
void fuyu_q8_rows(const void *w, int64_t n0, int64_t n1, int64_t K, int8_t *out, int threads);

/* y[m, j] (row stride ldy) = sw[j] * (acc[m, j] * sx[m] + extra[m, j]) + bias[j] in dt, rounded once;
   acc (M, n) int32, extra (M, n) float32 or NULL, sw (n) float32, bias (n) in dt or NULL. */
void fuyu_q8_finish(const int32_t *acc, const float *sx, const float *extra, const float *sw, const void *bias, void *y, dtype dt, int64_t M, int64_t n, int64_t ldy, int threads);

/* w (N, K) float32 quantized to int4 in groups of `group` <= 256: q (N, K) level indices 0..15 and
   sm (N, K / group, 2) float32 (scale, min), w ~ level(q) * scale + min, each group's pair by
   search; level(q) = q, or with `normal` INT4N's levels (quant.h: Q4_NORMAL). */
void fuyu_int4_fit(const float *w, int64_t N, int64_t K, int group, int normal, uint8_t *q, float *sm, int threads);

/* out (B, H, d) = softmax(q.k_s * scale, masked) . v over the cache k, v (B, H, S, d) in dt; q
   float32; mask (B, S) bytes, 0 = not seen; out in dt, rounded once. */
void fuyu_attend(const float *q, const void *k, const void *v, const uint8_t *mask, void *out, dtype dt, int64_t B, int64_t H, int64_t S, int64_t d, float scale, int threads);

/* A prefill's q (into q_out (B, H, T, d)) and its keys and values (into the caches (B, H, slots,
   d), strides sb, sh, at slots start ..) from the QKV output qkv (B, T, H, 3, d): LayerNorm,
   rotary. See native.c. */
void fuyu_qkv_rows(const void *qkv, const void *const *ln, const float *cos, const float *sin, void *q_out, void *kc, void *vc, dtype dt, int64_t B, int64_t T, int64_t H, int64_t d, int64_t R2, int64_t sb, int64_t sh, int64_t start, float eps, int threads);

/* Prefill attention of T new queries q (B, H, T, d) over the caches' first n slots, in bfloat16,
   into out (B, T, H, d); -1 where not served (no AVX512_BF16). See native.c. */
int fuyu_flash(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int64_t B, int64_t H, int64_t T, int64_t d, int64_t n, int64_t start, int64_t sb, int64_t sh, float scale, int threads, void *work);

/* Bytes of work fuyu_flash needs. */
int64_t fuyu_flash_work_bytes(int64_t B, int64_t H, int64_t d, int64_t n);

/* Every decoder layer of a decode step on the residual stream x (B, H * d) float32, in place;
   returns -1 (and does nothing) where *slot is outside the cache. See native.c. */
int fuyu_layers(float *x, const void *const *p, const int *kinds, void *const *kcs, void *const *vcs, const float *cos, const float *sin, const int64_t *slot, const uint8_t *mask, dtype dt, int64_t n_layers, int64_t B, int64_t H, int64_t d, int64_t R2, int64_t S, int64_t I, float eps, int threads, void *work);

/* Bytes of work fuyu_layers needs. */
int64_t fuyu_layers_work_bytes(int64_t B, int64_t H, int64_t d, int64_t S, int64_t I, int threads);

/* out[b] = the index of the largest of row b's V values of x (B, V) in dt, as torch.argmax. */
void fuyu_argmax(const void *x, dtype dt, int64_t B, int64_t V, int64_t *out);

#endif
