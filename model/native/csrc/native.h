/* The library's exported functions: the one table of their signatures.

   native.c includes it, so the compiler checks every definition against it; model/native.py
   reads it to make the ctypes bindings (a pointer becomes c_void_p, int64_t c_int64, int c_int,
   float c_float; void: no result). One prototype per line, as it is here. Each kernel comes in
   one function per dtype of the weights and cache: _bf16 (bfloat16, as its 16 bits) and _f32. */
#ifndef FUYU_NATIVE_H
#define FUYU_NATIVE_H

#include <stdint.h>

/* y (B, N) = x (B, K) @ w (N, K)^T + bias (N; may be NULL), 1 <= B <= 8: x float32, y in the
   weights' dtype; xi: B * K floats of scratch. */
void fuyu_gemv_bf16(const float *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t B, int64_t N, int64_t K, int threads, float *xi);
void fuyu_gemv_f32(const float *x, const float *w, const float *bias, float *y, int64_t B, int64_t N, int64_t K, int threads, float *xi);

/* out (B, H, d) = softmax(q.k_s * scale, masked) . v over the cache k, v (B, H, S, d); q float32;
   mask (B, S) bytes, 0 = not seen. */
void fuyu_attend_bf16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out, int64_t B, int64_t H, int64_t S, int64_t d, float scale, int threads);
void fuyu_attend_f32(const float *q, const float *k, const float *v, const uint8_t *mask, float *out, int64_t B, int64_t H, int64_t S, int64_t d, float scale, int threads);

/* Every decoder layer of a decode step on the residual stream x (B, H * d) float32, in place;
   returns -1 (and does nothing) where *slot is outside the cache. See native.c. */
int fuyu_layers_bf16(float *x, const void *const *p, void *const *kcs, void *const *vcs, const float *cos, const float *sin, const int64_t *slot, const uint8_t *mask, int64_t n_layers, int64_t B, int64_t H, int64_t d, int64_t R2, int64_t S, int64_t I, float eps, int threads, float *work);
int fuyu_layers_f32(float *x, const void *const *p, void *const *kcs, void *const *vcs, const float *cos, const float *sin, const int64_t *slot, const uint8_t *mask, int64_t n_layers, int64_t B, int64_t H, int64_t d, int64_t R2, int64_t S, int64_t I, float eps, int threads, float *work);

/* out[b] = the index of the largest of row b's V values of x (B, V), as torch.argmax. */
void fuyu_argmax_bf16(const uint16_t *x, int64_t B, int64_t V, int64_t *out);
void fuyu_argmax_f32(const float *x, int64_t B, int64_t V, int64_t *out);

#endif
