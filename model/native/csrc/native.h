/* The library's exported functions: the one table of their signatures.

   native.c includes it, so the compiler checks every definition against it; model/native/build.py
   reads it to make the ctypes bindings (a pointer becomes c_void_p, int64_t c_int64, int and
   dtype c_int, float c_float; void: no result) and the dtype codes. One prototype per line, as
   it is here. */
#ifndef FUYU_NATIVE_H
#define FUYU_NATIVE_H

#include <stdint.h>

/* The dtype of weights, caches and outputs: float32, or bfloat16 stored as its 16 bits. Each
   kernel is written once over it; inlined code is specialised for each value by the compiler. */
typedef enum { F32, BF16 } dtype;

/* y (B, N) = x (B, K) @ w (N, K)^T + bias (N; may be NULL), 1 <= B <= 8: x float32; w, bias and y
   in dt; xi: B * K floats of scratch. */
void fuyu_gemv(const float *x, const void *w, const void *bias, void *y, dtype dt, int64_t B, int64_t N, int64_t K, int threads, float *xi);

/* out (B, H, d) = softmax(q.k_s * scale, masked) . v over the cache k, v (B, H, S, d) in dt; q
   float32; mask (B, S) bytes, 0 = not seen; out in dt, rounded once. */
void fuyu_attend(const float *q, const void *k, const void *v, const uint8_t *mask, void *out, dtype dt, int64_t B, int64_t H, int64_t S, int64_t d, float scale, int threads);

/* Every decoder layer of a decode step on the residual stream x (B, H * d) float32, in place;
   returns -1 (and does nothing) where *slot is outside the cache. See native.c. */
int fuyu_layers(float *x, const void *const *p, void *const *kcs, void *const *vcs, const float *cos, const float *sin, const int64_t *slot, const uint8_t *mask, dtype dt, int64_t n_layers, int64_t B, int64_t H, int64_t d, int64_t R2, int64_t S, int64_t I, float eps, int threads, float *work);

/* out[b] = the index of the largest of row b's V values of x (B, V) in dt, as torch.argmax. */
void fuyu_argmax(const void *x, dtype dt, int64_t B, int64_t V, int64_t *out);

#endif
