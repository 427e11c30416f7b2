/* Fuyu's CPU kernels for decode steps: a matrix-vector product, one-query attention, all decoder
   layers of a step in one call, and argmax. One translation unit; fuyu.model.native compiles it
   on the machine that runs it (-O3 -march=native -fopenmp) and binds the functions of native.h.

   Every rounding is the one the torch ops of model/fuyu.py make: a matmul's input and output in
   the weights' dtype; LayerNorms, rotary, softmax and the residual stream in float32. */
#include <omp.h>
#include <stdlib.h>

#include "attend.h"
#include "flash.h"
#include "linear.h"
#include "native.h"
#include "vec.h"

int64_t fuyu_scratch_bytes(int64_t B, int64_t K) { return B * K * 4 + prepared_bytes(B, K); }

void fuyu_linear(const void *x, const void *w, const void *scales, const void *bias, void *y,
                 dtype dt, wformat fmt, int group, int64_t B, int64_t N, int64_t K, int threads,
                 void *scratch) {
    float *xf = scratch;
    void *xp = xf + B * K;
    for (int64_t i = 0; i < B * K; i++) xf[i] = get(x, i, dt);
    lin lw = {fmt, group, w, scales, bias};
    prepare(xf, B, K, &lw, dt, xp);
#pragma omp parallel num_threads(threads)
    linear_rows(xf, xp, &lw, dt, B, N, K, OUT, y, NULL);
}

void fuyu_dequant(const void *w, const void *scales, void *out, dtype dt, wformat fmt, int group,
                  int64_t n0, int64_t n1, int64_t K, int unscaled, int threads) {
    lin lw = {fmt, group, w, scales, NULL};
    if (dt == BF16 && fmt != PLAIN) { /* the prefill's case: one vectorised pass a row */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = n0; n < n1; n++)
            q_row_bf16(quant_code(fmt), group, w, scales, n, K, unscaled, (uint16_t *)out + (n - n0) * K);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        float *row = malloc(sizeof(float) * K);
#pragma omp for schedule(static)
        for (int64_t n = n0; n < n1; n++) {
            dense_row(&lw, dt, n, K, unscaled, row);
            if (dt == BF16) { /* finite values: a branch-free rounding the compiler vectorises */
                uint16_t *o = (uint16_t *)out + (n - n0) * K;
                for (int64_t k = 0; k < K; k++) o[k] = round_bf16_finite(row[k]);
            } else {
                memcpy((float *)out + (n - n0) * K, row, sizeof(float) * K);
            }
        }
        free(row);
    }
}

int64_t fuyu_q8_quantize(const void *x, dtype dt, int64_t M, int64_t K, float limit, int64_t most, int8_t *xq,
                         float *sx, uint8_t *outlier, int threads, void *scratch) {
    return (dt == BF16 ? q8_quantize_bf16 : q8_quantize_f32)(x, M, K, limit, most, xq, sx, outlier, scratch, threads);
}

int64_t fuyu_q8_scratch_bytes(int64_t K, int threads) { return (int64_t)sizeof(float) * K * (threads > 0 ? threads : 1); }

void fuyu_q8_rows(const void *w, int64_t n0, int64_t n1, int64_t K, int8_t *out, int threads) {
    q8_plain_rows(w, n0, n1, K, out, threads);
}

void fuyu_q8_finish(const int32_t *acc, const float *sx, const float *extra, const float *sw, const void *bias,
                    void *y, dtype dt, int64_t M, int64_t n, int64_t ldy, int threads) {
    q8_finish_rows(acc, sx, extra, sw, bias, y, dt, M, n, ldy, threads);
}

/* int4 quantization of w (N, K) float32 in groups of `group` (<= 256) inputs: q (N, K) levels
   0..15 and sm (N, K / group, 2) (scale, min) per group, w ~ q * scale + min (quant.h: q4_fit). */
void fuyu_int4_fit(const float *w, int64_t N, int64_t K, int group, int normal, uint8_t *q, float *sm, int threads) {
    int64_t G = K / group;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < N * G; i++)
        q4_fit(w + i * group, group, normal, q + i * group, sm + 2 * i, sm + 2 * i + 1);
}

/* One query per (row, head), (row, head) pairs split over the threads; out rounded once. */
void fuyu_attend(const float *q, const void *k, const void *v, const uint8_t *mask, void *out,
                 dtype dt, int64_t B, int64_t H, int64_t S, int64_t d, float scale, int threads) {
    int64_t z = size_of(dt);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        float *p = malloc(sizeof(float) * (S + d)), *o = p + S;
        attend_one_of(dt, q + bh * d, (const char *)k + bh * S * d * z,
                      (const char *)v + bh * S * d * z, mask + (bh / H) * S, S, d, scale, p, o);
        for (int64_t j = 0; j < d; j++) put(out, bh * d + j, o[j], dt);
        free(p);
    }
}

/* LayerNorm of x (n) in float32 (mean and variance summed in double), affine with weights in dt
   (bias may be NULL), into y; rounded to dt (and kept as float32) when `round` is set. */
static inline __attribute__((always_inline)) void layer_norm(const float *x, int64_t n, const void *w,
                                                             const void *b, dtype dt, float eps,
                                                             int round, float *y) {
    double sum = 0., sq = 0.;
    for (int64_t i = 0; i < n; i++) sum += x[i];
    float mean = (float)(sum / n);
    for (int64_t i = 0; i < n; i++) {
        double c = x[i] - mean;
        sq += c * c;
    }
    float r = 1.f / sqrtf((float)(sq / n) + eps);
    for (int64_t i = 0; i < n; i++) {
        float t = (x[i] - mean) * r * get(w, i, dt) + (b ? get(b, i, dt) : 0.f);
        y[i] = round ? rounded(t, dt) : t;
    }
}

/* The B rows of x (B, D) LayerNormed and rounded into h, then prepared into xp for lw. */
static void norm_rows(const float *x, int64_t B, int64_t D, const void *w, const void *b,
                      dtype dt, float eps, float *h, const lin *lw, void *xp) {
    for (int64_t r = 0; r < B; r++) layer_norm(x + r * D, D, w, b, dt, eps, 1, h + r * D);
    prepare(h, B, D, lw, dt, xp);
}

/* A head's q and k (src: [q | k | ...], d each, float32) LayerNormed over d (ln: q's weight and
   bias, then k's, in dt) and rotated in float32 into t[0], t[1]: the first 2 * R2 dims in pairs
   (j, j + R2) by the angles c, s (R2 each), the rest passed through. */
static inline __attribute__((always_inline)) void norm_rotate(const float *src, int64_t d,
                                                              const void *const *ln, dtype dt, float eps,
                                                              const float *c, const float *s, int64_t R2,
                                                              float t[2][512]) {
    layer_norm(src, d, ln[0], ln[1], dt, eps, 0, t[0]);
    layer_norm(src + d, d, ln[2], ln[3], dt, eps, 0, t[1]);
    for (int i = 0; i < 2; i++)
        for (int64_t j = 0; j < R2; j++) {
            float a = t[i][j], e = t[i][j + R2];
            t[i][j] = a * c[j] - e * s[j];
            t[i][j + R2] = e * c[j] + a * s[j];
        }
}

/* The attention inputs of a prefill's T new tokens per row, in one pass: qkv (B, T, H, 3, d) in dt
   (the QKV Linear's output: each head's [q | k | v]); q and k through norm_rotate (ln: q-LN w, b,
   k-LN w, b; cos, sin (B, T, R2)), rounded once to dt: q into q_out (B, H, T, d), k and v (as it
   is) into the caches kc, vc (B, H, slots, d) at slots start .. start + T - 1, a row of either
   sb values after the last and a head sh (a cache's parts are views into a longer one). */
static inline __attribute__((always_inline)) void qkv_rows(const void *qkv, const void *const *ln,
                                                           const float *cos, const float *sin,
                                                           void *q_out, void *kc, void *vc, dtype dt,
                                                           int64_t B, int64_t T, int64_t H, int64_t d,
                                                           int64_t R2, int64_t sb, int64_t sh,
                                                           int64_t start, float eps, int threads) {
    int64_t z = size_of(dt);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bt = 0; bt < B * T; bt++) {
        int64_t b = bt / T, at = bt % T;
        float src[3 * 512], t[2][512];
        for (int64_t head = 0; head < H; head++) {
            for (int64_t j = 0; j < 3 * d; j++) src[j] = get(qkv, (bt * H + head) * 3 * d + j, dt);
            norm_rotate(src, d, ln, dt, eps, cos + bt * R2, sin + bt * R2, R2, t);
            int64_t bh = b * H + head, slot = (b * sb + head * sh + (start + at) * d) * z;
            char *qd = (char *)q_out + (bh * T + at) * d * z, *kd = (char *)kc + slot, *vd = (char *)vc + slot;
            for (int64_t j = 0; j < d; j++) {
                put(qd, j, t[0][j], dt);
                put(kd, j, t[1][j], dt);
                put(vd, j, src[2 * d + j], dt);
            }
        }
    }
}

void fuyu_qkv_rows(const void *qkv, const void *const *ln, const float *cos, const float *sin,
                   void *q_out, void *kc, void *vc, dtype dt, int64_t B, int64_t T, int64_t H,
                   int64_t d, int64_t R2, int64_t sb, int64_t sh, int64_t start, float eps,
                   int threads) {
    if (dt == BF16) /* compiled for each dtype: no test of it in the loops */
        qkv_rows(qkv, ln, cos, sin, q_out, kc, vc, BF16, B, T, H, d, R2, sb, sh, start, eps, threads);
    else
        qkv_rows(qkv, ln, cos, sin, q_out, kc, vc, F32, B, T, H, d, R2, sb, sh, start, eps, threads);
}

/* Prefill attention in bfloat16 (flash.h): q (B, H, T, d) against the first n slots of the caches
   k, v (B, H, slots, d; strides sb, sh); query t at slot start + t sees slot s where mask (B, T, n)
   bytes says so, or with no mask where s <= start + t. out (B, T, H, d). work: fuyu_flash_work_bytes.
   Returns -1, with nothing done, where the CPU has no AVX512_BF16 or d is not served. */
int fuyu_flash(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int64_t B,
               int64_t H, int64_t T, int64_t d, int64_t n, int64_t start, int64_t sb, int64_t sh,
               float scale, int threads, void *work) {
#if HAVE_DOT_BF16
    if (d % 32 || d > FLASH_MAX_D) return -1;
    int64_t np = flash_keys(n), nqb = (T + FQ - 1) / FQ;
    uint16_t *kt = work, *vp = kt + B * H * np * d;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t at = (bh / H) * sb + (bh % H) * sh;
            flash_pack((const uint16_t *)k + at, (const uint16_t *)v + at, n, d, d, kt + bh * np * d, vp + bh * np * d);
        }
        /* the last query blocks (the most keys) first, handed out as threads come free */
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < B * H * nqb; u++) {
            int64_t qb = nqb - 1 - u / (B * H), bh = u % (B * H), b = bh / H, h = bh % H;
            int nq = T - qb * FQ < FQ ? (int)(T - qb * FQ) : FQ;
            flash_block((const uint16_t *)q + bh * T * d, kt + bh * np * d, vp + bh * np * d,
                        mask ? mask + b * T * n : NULL, n, n, d, start, qb * FQ, nq, scale,
                        (uint16_t *)out + (b * T * H + h) * d, H * d);
        }
    }
    return 0;
#else
    (void)q, (void)k, (void)v, (void)mask, (void)out, (void)B, (void)H, (void)T, (void)d, (void)n;
    (void)start, (void)sb, (void)sh, (void)scale, (void)threads, (void)work;
    return -1;
#endif
}

int64_t fuyu_flash_work_bytes(int64_t B, int64_t H, int64_t d, int64_t n) { return 4 * B * H * flash_keys(n) * d; }

/* Per layer in p: LN1 w, b; qkv w, scales, b; q-LN w, b; k-LN w, b; dense w, scales, b; LN2 w,
   b; up w, scales, b; down w, scales, b (20 pointers; biases and plain weights' scales NULL);
   in kinds: (format, group) of qkv, dense, up, down (8 ints). */
#define LAYER_POINTERS 20
#define LAYER_KINDS 8

static lin layer_linear(const void *const *w, const int *kinds, int i) {
    static const int at[4] = {2, 9, 14, 17}; /* where each Linear's weight is in a layer's pointers */
    lin lw = {(wformat)kinds[2 * i], kinds[2 * i + 1], w[at[i]], w[at[i] + 1], w[at[i] + 2]};
    return lw;
}

/* Float32 values of work per row and in all, besides the prepared inputs. */
static inline int64_t layers_floats(int64_t B, int64_t D, int64_t I) { return B * (3 * D + D + D + I); }

int64_t fuyu_layers_work_bytes(int64_t B, int64_t H, int64_t d, int64_t S, int64_t I, int threads) {
    int64_t D = H * d, M = D > I ? D : I;
    return 4 * (B * M + layers_floats(B, D, I) + threads * S) + prepared_bytes(B, M) + 64;
}

/* The decoder layers for one new token per row (a decode step), in one parallel region, no torch
   op in between: x (B, D) float32, the residual stream, updated in place, layer after layer:
   x += dense(attention(rotary(qk-LayerNorm(qkv(LN1(x)))))); x += down(relu²(up(LN2(x)))).
   p, kinds: as above, per layer; the norms' tensors in dt. cos, sin (B, R2): each row's rotary
   angles; kcs, vcs: each layer's cache (B, H, S, d), this token's key and value written at slot
   *slot; mask (B, S). work: fuyu_layers_work_bytes. */
int fuyu_layers(float *x, const void *const *p, const int *kinds, void *const *kcs,
                void *const *vcs, const float *cos, const float *sin, const int64_t *slot,
                const uint8_t *mask, dtype dt, int64_t n_layers, int64_t B, int64_t H, int64_t d,
                int64_t R2, int64_t S, int64_t I, float eps, int threads, void *work) {
    int64_t D = H * d, M = D > I ? D : I, at = *slot, z = size_of(dt);
    if (at < 0 || at >= S) return -1;
    float *h = work, *qkv = h + B * M, *q = qkv + B * 3 * D, *att = q + B * D, *up = att + B * D;
    float *scores = up + B * I;
    void *xp = scores + threads * S;
    float scale = 1.f / sqrtf((float)d);
#pragma omp parallel num_threads(threads)
    for (int64_t l = 0; l < n_layers; l++) {
        const void *const *w = p + LAYER_POINTERS * l;
        const int *kind = kinds + LAYER_KINDS * l;
        lin L_qkv = layer_linear(w, kind, 0), L_dense = layer_linear(w, kind, 1);
        lin L_up = layer_linear(w, kind, 2), L_down = layer_linear(w, kind, 3);
        char *kc = kcs[l], *vc = vcs[l];
#pragma omp single
        norm_rows(x, B, D, w[0], w[1], dt, eps, h, &L_qkv, xp);
        linear_rows(h, xp, &L_qkv, dt, B, 3 * D, D, KEEP, NULL, qkv);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, head = bh % H;
            const float *src = qkv + b * 3 * D + head * 3 * d; /* [q | k | v] of a head */
            float t[2][512];
            norm_rotate(src, d, w + 5, dt, eps, cos + b * R2, sin + b * R2, R2, t);
            char *kd = kc + (bh * S + at) * d * z, *vd = vc + (bh * S + at) * d * z;
            for (int64_t j = 0; j < d; j++) {
                q[bh * d + j] = rounded(t[0][j], dt);
                put(kd, j, t[1][j], dt);
                put(vd, j, src[2 * d + j], dt);
            }
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            float o[512];
            attend_one_of(dt, q + bh * d, kc + bh * S * d * z, vc + bh * S * d * z,
                          mask + (bh / H) * S, S, d, scale, scores + omp_get_thread_num() * S, o);
            for (int64_t j = 0; j < d; j++) att[bh * d + j] = rounded(o[j], dt);
        }
#pragma omp single
        prepare(att, B, D, &L_dense, dt, xp);
        linear_rows(att, xp, &L_dense, dt, B, D, D, ADD, NULL, x);
#pragma omp single
        norm_rows(x, B, D, w[12], w[13], dt, eps, h, &L_up, xp);
        linear_rows(h, xp, &L_up, dt, B, I, D, RELU2, NULL, up);
#pragma omp single
        prepare(up, B, I, &L_down, dt, xp);
        linear_rows(up, xp, &L_down, dt, B, D, I, ADD, NULL, x);
    }
    return 0;
}

/* out[b] = the index of the largest of row b's V values, as torch.argmax: the first one where
   several tie, the first NaN where there is one. A vector pass finds the maximum, a second the
   first place it occurs. Rows are few (a decode batch); each is read in one thread. */
static inline __attribute__((always_inline)) void argmax(const void *x, dtype dt, int64_t B,
                                                         int64_t V, int64_t *out) {
    for (int64_t b = 0; b < B; b++) {
        int64_t r = b * V; /* element of x where row b starts */
        vf top = (vf){0} - INFINITY;
        vi nan = {0};
        int64_t j = 0;
        for (; j + L <= V; j += L) {
            vf v = load(x, r + j, dt);
            vi gt = v > top;
            nan |= v != v;
            top = (vf)(((vi)v & gt) | ((vi)top & ~gt));
        }
        float t = -INFINITY;
        int any_nan = 0;
        for (int i = 0; i < L; i++) {
            any_nan |= nan[i] != 0;
            if (top[i] > t) t = top[i];
        }
        for (; j < V; j++) {
            float v = get(x, r + j, dt);
            any_nan |= v != v;
            if (v > t) t = v;
        }
        int64_t at = 0;
        for (j = 0; j < V; j++) {
            float v = get(x, r + j, dt);
            if (any_nan ? v != v : v == t) {
                at = j;
                break;
            }
        }
        out[b] = at;
    }
}

void fuyu_argmax(const void *x, dtype dt, int64_t B, int64_t V, int64_t *out) {
    if (dt == BF16) /* a loop compiled for each dtype: the loads stay out of its way */
        argmax(x, BF16, B, V, out);
    else
        argmax(x, F32, B, V, out);
}
