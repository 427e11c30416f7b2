"""A matrix-vector kernel of our own for decode steps on CPU, compiled on the machine that runs it.

At batch 1-2 a decode step is a stream of weight reads, and the LM head is 70% of them (mid
checkpoint). None of torch's kernels reads 16-bit weights at the memory's read rate on every CPU:
on an AMD EPYC, per call on the 512 MB bf16 head, oneDNN's packed GEMV takes 22-25 ms, F.linear
30-33 ms, this kernel 15-18 ms (a float32 streaming sum of as many bytes: 15 ms). Each weight row is
read once, widened to float32 in registers and multiplied with each input row, accumulated in
float32 and rounded once to the weights' dtype, so it is at least as accurate as oneDNN's bf16 GEMV.
Rows are split over OpenMP threads. It serves up to 8 input rows (a decode batch); the module that
uses it (kernels.NativeLinear) hands bigger calls to F.linear or a float32 GEMM. The same library
holds one-query decode attention (`attend`): scores, softmax and the weighted sum of values in
float32, reading the 16-bit cache once, without the float32 copies the torch ops need.

It is plain C (GCC/Clang vector extensions, no intrinsics) compiled with the system's C compiler
(`$CC`, else `cc`) and `-O3 -march=native -fopenmp` the first time it is asked for, into
`$XDG_CACHE_HOME/fuyu/native/` under a name that holds a hash of the source, the compiler, the
flags and the CPU's feature flags, so a home folder shared by different machines never hands one a
binary built for another (~0.2 s to build). It links the OpenMP runtime torch has already loaded
(libgomp's soname), so it shares torch's thread pool rather than adding a second one that would
spin against it; where torch brings no libgomp (macOS, Windows, other OpenMP builds) or no
compiler works, `available()` is False and the kernel is simply not offered. `FUYU_NATIVE=0` turns
it off. model/tuning.py times it against the other candidates like any of them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

MAX_ROWS = 8  # input rows it serves (a decode batch); above this it is compute-bound and
# oneDNN's GEMMs, which multiply bf16 pairs in one instruction where the CPU can, win
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm"]

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
#define L (VB / 4)
typedef float vf __attribute__((vector_size(VB)));
typedef uint32_t vu __attribute__((vector_size(VB)));
typedef uint16_t vh __attribute__((vector_size(VB / 2)));

static inline float widen_bf16(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float widen_f32(float v) { return v; }
static inline uint16_t round_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static inline vf load_uint16_t(const uint16_t *p) {  /* L bf16 -> float32: the bits shifted up */
    vh h; memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f; memcpy(&f, &u, sizeof f); return f;
}
/* Weight bytes read ahead of use: the hardware prefetchers alone left 10-20% of the read rate on
   the table (AMD EPYC, AVX2: 11 -> 13-15 GB/s per call on 64 MB, a float32 sum 14-16). */
#define PREFETCH 8192
static inline vf load_float(const float *p) { vf f; memcpy(&f, p, sizeof f); return f; }
static inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < L; i++) s += v[i]; return s; }

/* One weight row against B input rows in one pass over the weight row: each weight vector is
   loaded and widened once and multiplied into B accumulators; U independent accumulators per input
   row so successive multiply-adds do not wait on each other. B and U are constants in each
   instance, so the accumulators live in registers. The inputs come interleaved (xi: for each
   L-wide slice of K, that slice of every row in turn), so they are read as one sequential stream:
   B rows 4 KB apart would fall into one set of the L1 cache and evict each other. The last K % L
   columns are read from the rows as given (x). */
#define DOT(T, W, B, U)                                                                     \
static void dot##B##_##T(const T *w, const float *xi, const float *x, int64_t K, float *s) {\
    vf a[B][U];                                                                             \
    for (int b = 0; b < B; b++) for (int u = 0; u < U; u++) a[b][u] = (vf){0};              \
    int64_t k = 0;                                                                          \
    for (; k + U * L <= K; k += U * L)                                                      \
        for (int u = 0; u < U; u++) {                                                       \
            if ((u * L * sizeof(T)) % 64 == 0) /* once per cache line of weights */        \
                __builtin_prefetch((const char *)(w + k + u * L) + PREFETCH);               \
            vf v = load_##T(w + k + u * L);                                                 \
            const float *p = xi + (k + u * L) * B;                                          \
            for (int b = 0; b < B; b++) a[b][u] += v * load_float(p + b * L);               \
        }                                                                                   \
    for (; k + L <= K; k += L) {                                                            \
        vf v = load_##T(w + k);                                                             \
        for (int b = 0; b < B; b++) a[b][0] += v * load_float(xi + k * B + b * L);          \
    }                                                                                       \
    for (int b = 0; b < B; b++) {                                                           \
        vf t = a[b][0];                                                                     \
        for (int u = 1; u < U; u++) t += a[b][u];                                           \
        float r = hsum(t);                                                                  \
        for (int64_t j = k; j < K; j++) r += W(w[j]) * x[b * K + j];                        \
        s[b] = r;                                                                           \
    }                                                                                       \
}
#define DOTS(T, W) DOT(T, W, 1, 4) DOT(T, W, 2, 2) DOT(T, W, 3, 2) DOT(T, W, 4, 1) \
                   DOT(T, W, 5, 1) DOT(T, W, 6, 1) DOT(T, W, 7, 1) DOT(T, W, 8, 1)
DOTS(uint16_t, widen_bf16)
DOTS(float, widen_f32)

/* y (B, N) = x (B, K) @ w (N, K)^T + bias (N), 1 <= B <= 8: x float32; w and bias in one dtype
   (bias may be NULL); y in the weights' dtype. Weight rows are split over the threads. xi is
   scratch for the interleaved inputs, B * K floats. */
#define GEMV(NAME, T, W, STORE)                                                             \
void NAME(const float *x, const T *w, const T *bias, T *y, int64_t B, int64_t N, int64_t K, \
          int threads, float *xi) {                                                         \
    for (int64_t k = 0; k + L <= K; k += L)                                                 \
        for (int64_t b = 0; b < B; b++) memcpy(xi + k * B + b * L, x + b * K + k, VB);      \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                       \
    for (int64_t n = 0; n < N; n++) {                                                       \
        float s[8];                                                                         \
        const T *r = w + n * K;                                                             \
        switch (B) {                                                                        \
        case 1: dot1_##T(r, xi, x, K, s); break; case 2: dot2_##T(r, xi, x, K, s); break;   \
        case 3: dot3_##T(r, xi, x, K, s); break; case 4: dot4_##T(r, xi, x, K, s); break;   \
        case 5: dot5_##T(r, xi, x, K, s); break; case 6: dot6_##T(r, xi, x, K, s); break;   \
        case 7: dot7_##T(r, xi, x, K, s); break; default: dot8_##T(r, xi, x, K, s); break;  \
        }                                                                                   \
        float b = bias ? W(bias[n]) : 0.f;                                                  \
        for (int64_t c = 0; c < B; c++) y[c * N + n] = STORE(s[c] + b);                     \
    }                                                                                       \
}
GEMV(fuyu_gemv_bf16, uint16_t, widen_bf16, round_bf16)
GEMV(fuyu_gemv_f32, float, widen_f32, widen_f32)

/* Decode attention, one query per (row, head): out = softmax(q.k_s * scale, masked) . v over the
   S slots of the cache k, v (B, H, S, d) in T; q (B, H, d) float32; mask (B, S) bytes, 0 = not
   seen; out (B, H, d) in T, rounded once. Keys and values are read once, widened in registers,
   everything else is float32; (row, head) pairs are split over the threads. */
#define ATTEND(NAME, T, W, STORE)                                                           \
void NAME(const float *q, const T *k, const T *v, const uint8_t *mask, T *out, int64_t B,    \
          int64_t H, int64_t S, int64_t d, float scale, int threads) {                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                       \
    for (int64_t bh = 0; bh < B * H; bh++) {                                                \
        const float *qi = q + bh * d;                                                       \
        const T *ki = k + bh * S * d, *vi = v + bh * S * d;                                 \
        const uint8_t *m = mask + (bh / H) * S;                                             \
        float *p = malloc(sizeof(float) * (S + d));                                         \
        float *o = p + S, top = -INFINITY, sum = 0.f;                                       \
        for (int64_t s = 0; s < S; s++) {                                                   \
            if (!m[s]) continue;                                                            \
            const T *ks = ki + s * d;                                                       \
            int64_t j = 0; vf a = {0};                                                      \
            for (; j + L <= d; j += L) a += load_##T(ks + j) * load_float(qi + j);          \
            float t = hsum(a);                                                              \
            for (; j < d; j++) t += W(ks[j]) * qi[j];                                       \
            p[s] = t * scale;                                                               \
            if (p[s] > top) top = p[s];                                                     \
        }                                                                                   \
        for (int64_t s = 0; s < S; s++) if (m[s]) { p[s] = expf(p[s] - top); sum += p[s]; } \
        for (int64_t j = 0; j < d; j++) o[j] = 0.f;                                         \
        for (int64_t s = 0; s < S; s++) {                                                   \
            if (!m[s]) continue;                                                            \
            const T *vs = vi + s * d;                                                       \
            float w = p[s] / sum;                                                           \
            int64_t j = 0;                                                                  \
            for (; j + L <= d; j += L) {                                                    \
                vf acc = load_float(o + j) + w * load_##T(vs + j);                          \
                memcpy(o + j, &acc, sizeof acc);                                            \
            }                                                                               \
            for (; j < d; j++) o[j] += w * W(vs[j]);                                        \
        }                                                                                   \
        for (int64_t j = 0; j < d; j++) out[bh * d + j] = STORE(o[j]);                      \
        free(p);                                                                            \
    }                                                                                       \
}
ATTEND(fuyu_attend_bf16, uint16_t, widen_bf16, round_bf16)
ATTEND(fuyu_attend_f32, float, widen_f32, widen_f32)
"""

DTYPES = {torch.bfloat16: "fuyu_gemv_bf16", torch.float32: "fuyu_gemv_f32"}
ATTEND = {torch.bfloat16: "fuyu_attend_bf16", torch.float32: "fuyu_attend_f32"}


def _torch_has_libgomp() -> bool:
    """Whether torch has loaded libgomp: its soname is what our library links, so it shares it."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def library_path() -> Path:
    compiler = os.environ.get("CC") or "cc"
    digest = hashlib.sha256("\0".join([SOURCE, compiler, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fuyu" / "native" / f"gemv-{digest}.so"


def _load(path: Path) -> ctypes.CDLL | None:
    if not _torch_has_libgomp():
        return None
    if not path.exists() and not _build(path):
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    for name in DTYPES.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_void_p]
        fn.restype = None
    for name in ATTEND.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
        fn.restype = None
    return lib


def _build(path: Path) -> bool:
    """Compile SOURCE into `path` (atomically: concurrent processes may build it at once)."""
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "gemv.c", Path(tmp) / "gemv.so"
            src.write_text(SOURCE)
            done = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out)],
                                  capture_output=True, timeout=120)
            if done.returncode != 0:
                return False
            os.replace(out, path)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be had."""
    return _library(os.environ.get("FUYU_NATIVE"), os.environ.get("CC"), os.environ.get("XDG_CACHE_HOME"))


@functools.lru_cache(maxsize=None)
def _library(switch: str | None, cc: str | None, cache_home: str | None) -> ctypes.CDLL | None:
    """library() per setting of the variables it depends on (each call costs a dict lookup)."""
    return None if switch == "0" else _load(library_path())


def available() -> bool:
    return library() is not None


def serves(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in DTYPES and weight.dim() == 2


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x with at most MAX_ROWS rows (any leading shape), float32
    accumulation, output in the weight's dtype."""
    lib = library()
    N, K = weight.shape
    rows = x.reshape(-1, K)
    if (lib is None or rows.shape[0] > MAX_ROWS or not serves(weight) or not weight.is_contiguous()
            or x.dtype != weight.dtype or x.device.type != "cpu"
            or (bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous()))):
        raise ValueError("native.linear: a contiguous CPU float32/bfloat16 weight, a bias and CPU "
                         f"inputs of its dtype, at most {MAX_ROWS} rows, and a built kernel are required")
    xf = rows if rows.dtype == torch.float32 else rows.float()
    if not xf.is_contiguous():
        xf = xf.contiguous()
    y = torch.empty(rows.shape[0], N, dtype=weight.dtype)
    scratch = torch.empty(xf.numel(), dtype=torch.float32)  # the inputs, interleaved
    getattr(lib, DTYPES[weight.dtype])(xf.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                       y.data_ptr(), rows.shape[0], N, K, torch.get_num_threads(),
                                       scratch.data_ptr())
    return y.view(*x.shape[:-1], N)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """softmax(q·kᵀ/√d, masked)·v for one query per row and head, q (B, H, 1, d), over a cache
    k, v (B, H, S, d) with mask (B, 1, 1, S) bool: float32 inside, rounded once to k's dtype.
    None where the kernel does not serve these inputs (the caller has a plain path)."""
    lib = library()
    B, H, S, d = k.shape
    if (lib is None or k.dtype not in ATTEND or v.dtype != k.dtype or k.device.type != "cpu"
            or q.shape != (B, H, 1, d) or mask.shape != (B, 1, 1, S) or mask.dtype != torch.bool
            or not (k.is_contiguous() and v.is_contiguous() and mask.is_contiguous())):
        return None
    qf = q.float().contiguous()
    out = torch.empty(B, H, 1, d, dtype=k.dtype)
    getattr(lib, ATTEND[k.dtype])(qf.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(),
                                  B, H, S, d, d ** -0.5, torch.get_num_threads())
    return out
