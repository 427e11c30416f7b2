"""Our own C kernels for decode steps on CPU (csrc/ beside this file), built on the machine that runs them.

At batch 1-2 a decode step is a stream of weight reads, and the LM head is 70% of them (mid
checkpoint). None of torch's kernels reads 16-bit weights at the memory's read rate on every CPU:
on an AMD EPYC, per call on the 512 MB bf16 head, oneDNN's packed GEMV takes 22-25 ms, F.linear
30-33 ms, our GEMV 15-18 ms (a float32 streaming sum of as many bytes: 15 ms). Each weight row is
read once, widened to float32 in registers and multiplied with each input row, accumulated in
float32 and rounded once to the weights' dtype, so it is at least as accurate as oneDNN's bf16 GEMV.
Rows are split over OpenMP threads. It serves up to 8 input rows (a decode batch); the module that
uses it (kernels.NativeLinear) hands bigger calls to F.linear or a float32 GEMM. The same library
holds one-query decode attention (`attend`): scores, softmax and the weighted sum of values in
float32, reading the 16-bit cache once, without the float32 copies the torch ops need; and all
decoder layers of a decode step in one call (`Layers`: LayerNorms, these GEMVs, q/k LayerNorm,
rotary, the cache write and this attention, with the roundings of model/fuyu.py's torch ops), so
that nothing but weight reads fills a step: no torch op, no Python, no sleeping thread in between.
For prefills it holds two passes around the GEMMs (`qkv_rows`: the q/k LayerNorms, rotary and the
cache write in one pass; `flash`: bf16 attention with AVX512_BF16) and int4 quantization's search
(`fuyu_int4_fit`).

The library is compiled the first time it is asked for (build.py: the command, the
flags, the cache under $XDG_CACHE_HOME/fuyu/native/ with a build log beside it; ~4 s on a 2-core
AVX2-only AMD EPYC, started on a thread when a checkpoint starts loading: `build_in_background`).
`python -m fuyu.model.native build [--debug]` builds it in view. It links the OpenMP runtime torch
has already loaded (libgomp's soname), so it shares torch's thread pool rather than adding a second
one that would spin against it; where torch brings no libgomp (macOS, Windows, other OpenMP
builds), no compiler exists or `FUYU_NATIVE=0`, `available()` is False and the kernels are simply
not offered. A build that fails where a compiler exists is one warning line on stderr; the torch
ops then serve. model/plan.py times them against the other candidates, as whole decode steps.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from fuyu.model.native import build as native_build
from fuyu.model.settings import Settings

MAX_ROWS = 8  # input rows the GEMV serves (a decode batch); above this it is compute-bound and
# oneDNN's GEMMs, which multiply bf16 pairs in one instruction where the CPU can, win
MAX_HEAD_DIM = 512  # the layers keep a head's q, k and output on the stack
_CODES = native_build.enum_codes("dtype")
DTYPE = {torch.float32: _CODES["F32"], torch.bfloat16: _CODES["BF16"]}  # the dtypes served, as the C's codes
FORMAT = native_build.enum_codes("wformat")  # {"PLAIN": 0, "INT8": 1, "INT4": 2, "INT4N": 3}: how a weight is stored
INT4_GROUPS = (64, 128)  # inputs per scale the int4 kernels take
TILE = 4  # rows per tile of the quantized layouts (csrc/quant.h)
CHUNK = {"INT8": 64, "INT4": 128, "INT4N": 128}  # inputs per tile step: in_features must be a multiple


def _torch_has_libgomp() -> bool:
    """Whether torch has loaded libgomp: its soname is what our library links, so it shares it."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


@dataclass(frozen=True)
class Outcome:
    """The library for one setting, or why there is none (and the build, where one ran)."""

    lib: ctypes.CDLL | None
    reason: str = ""
    build: native_build.Build | None = None


def outcome(settings: Settings | None = None) -> Outcome:
    """Get the library, building it first where it is not cached (None: settings from the
    environment). Once per setting and process; a call during a build waits for it."""
    with _BUILDING:
        if settings is None:
            return _from_environment(*(os.environ.get(k) for k in ENVIRONMENT))
        return _outcome(settings)


_BUILDING = threading.Lock()
ENVIRONMENT = ("FUYU_NATIVE", "CC", "XDG_CACHE_HOME")  # what Settings reads for this module


@functools.lru_cache(maxsize=None)
def _from_environment(*values: str | None) -> Outcome:
    """outcome() per value of the variables it depends on (each call costs a dict lookup)."""
    return _outcome(Settings.from_environment())


@functools.lru_cache(maxsize=None)
def _outcome(settings: Settings) -> Outcome:
    if not settings.native:
        return Outcome(None, "turned off (FUYU_NATIVE=0)")
    if not _torch_has_libgomp():
        return Outcome(None, "torch has no libgomp loaded for the kernels to share")
    compiler = native_build.compiler_path(settings.compiler)
    if compiler is None:
        return Outcome(None, f"no C compiler ({settings.compiler})")
    path = native_build.library_path(settings.cache_dir, settings.compiler, settings.debug)
    built = None
    if not path.exists():
        try:
            built = native_build.build(path, compiler, settings.debug)
        except OSError as e:  # e.g. a read-only cache folder
            return _warn(Outcome(None, f"cannot build into {path.parent}: {e}"))
        if not built.ok:
            return _warn(Outcome(None, f"the build failed: {built.summary()} (log: {built.log})", built))
    try:
        return Outcome(native_build.bind(ctypes.CDLL(str(path))), "", built)
    except OSError as e:
        return _warn(Outcome(None, f"cannot load {path}: {e}", built))


def _warn(failed: Outcome) -> Outcome:
    """One line on stderr: a compiler exists, so the kernels were meant to be there."""
    print(f"fuyu: warning: no native CPU kernels, the torch ops serve: {failed.reason}", file=sys.stderr)
    return failed


def library(settings: Settings | None = None) -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None where they cannot be had."""
    return outcome(settings).lib


def build_in_background(settings: Settings | None = None) -> None:
    """Start getting the library on a thread, so that a first build on a machine (~4 s on a 2-core
    AVX2-only AMD EPYC) runs while the checkpoint loads, not after it (model/weights.py)."""
    threading.Thread(target=library, args=(settings,), name="fuyu-native-build", daemon=True).start()


def available(settings: Settings | None = None) -> bool:
    return library(settings) is not None


def serves(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in DTYPE and weight.dim() == 2


def serves_quantized(fmt: str, out_features: int, in_features: int, group: int = 0) -> bool:
    """Whether the int8/int4 kernels take a weight of this shape (and int4 group size)."""
    return (out_features % TILE == 0 and in_features % CHUNK[fmt] == 0
            and (fmt == "INT8" or group in INT4_GROUPS))


@dataclass(frozen=True)
class Weight:
    """A weight as the kernels take it: fmt ("PLAIN", "INT8", "INT4", "INT4N": int4 on normal levels),
    w (PLAIN: (N, K) in the activations' dtype; else the tiled layout of csrc/quant.h), scales
    (INT8: (N,) float32; INT4/INT4N: float16 (scale, min) pairs; PLAIN: None), group (INT4/INT4N),
    out/in features, bias or None."""

    fmt: str
    w: torch.Tensor
    scales: torch.Tensor | None
    bias: torch.Tensor | None
    out_features: int
    in_features: int
    group: int = 0

    def pointers(self) -> list[int | None]:
        return [self.w.data_ptr(), None if self.scales is None else self.scales.data_ptr(),
                None if self.bias is None else self.bias.data_ptr()]

    def kind(self) -> list[int]:
        return [FORMAT[self.fmt], self.group]


def linear(x: torch.Tensor, weight: torch.Tensor | Weight, bias: torch.Tensor | None = None,
           lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x with at most MAX_ROWS rows (any leading shape), float32
    accumulation, output in x's dtype; weight a plain tensor or a Weight (with its own bias).
    lib: the library (default: library())."""
    lib = lib or library()
    if not isinstance(weight, Weight):
        weight = Weight("PLAIN", weight, None, bias, *weight.shape)
    N, K = weight.out_features, weight.in_features
    rows = x.reshape(-1, K)
    plain = weight.fmt == "PLAIN"
    if (lib is None or rows.shape[0] > MAX_ROWS or x.dtype not in DTYPE or x.device.type != "cpu"
            or not weight.w.is_contiguous() or weight.w.device.type != "cpu"
            or (plain and (weight.w.dtype != x.dtype or weight.w.shape != (N, K)))
            or (weight.bias is not None and (weight.bias.dtype != x.dtype or not weight.bias.is_contiguous()))):
        raise ValueError("native.linear: a contiguous CPU weight (float32/bfloat16 as its inputs, or int8/int4), "
                         f"a bias of the inputs' dtype, at most {MAX_ROWS} rows, and a built kernel are required")
    rows = rows.contiguous()
    y = torch.empty(rows.shape[0], N, dtype=x.dtype)
    scratch = torch.empty(lib.fuyu_scratch_bytes(rows.shape[0], K), dtype=torch.uint8)
    w, scales, b = weight.pointers()
    lib.fuyu_linear(rows.data_ptr(), w, scales, b, y.data_ptr(), DTYPE[x.dtype], FORMAT[weight.fmt], weight.group,
                    rows.shape[0], N, K, torch.get_num_threads(), scratch.data_ptr())
    return y.view(*x.shape[:-1], N)


def dense(weight: Weight, start: int, stop: int, dtype: torch.dtype, unscaled: bool = False,
          buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Rows start:stop of a quantized weight as a dense (stop - start, K) tensor of `dtype`;
    unscaled (int8): the integers themselves, exactly, for a product scaled afterwards. buffer:
    contiguous memory to write them into (a view of it is returned), reused from call to call:
    a fresh 64 MB tensor's first touch (page faults) cost as long as making its rows."""
    lib = library()
    if lib is None:
        raise ValueError("native.dense: the C kernels are not built")
    shape = (stop - start, weight.in_features)
    if buffer is None:
        out = torch.empty(shape, dtype=dtype)
    elif buffer.is_contiguous() and buffer.nbytes >= shape[0] * shape[1] * dtype.itemsize:
        out = buffer.view(torch.uint8).view(-1)[:shape[0] * shape[1] * dtype.itemsize].view(dtype).view(shape)
    else:
        raise ValueError("native.dense: the buffer is too small or not contiguous")
    lib.fuyu_dequant(weight.w.data_ptr(), None if weight.scales is None else weight.scales.data_ptr(),
                     out.data_ptr(), DTYPE[dtype], FORMAT[weight.fmt], weight.group, start, stop,
                     weight.in_features, int(unscaled), torch.get_num_threads())
    return out


def q8_quantize(rows: torch.Tensor, limit: float, most: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill rows (M, K) (float32/bfloat16, contiguous) as 8-bit integers for an INT8 weight's
    int8 GEMM: (xq (M, K) int8, sx (M) float32, outlier columns (a LongTensor)); rows ~ xq * sx[:, None]
    except in the outlier columns (where some |x| >= limit), which are 0 in xq. With more than
    `most` outlier columns, xq and sx are left unwritten (the caller takes another path)."""
    lib = library()
    if lib is None or rows.dtype not in DTYPE or rows.dim() != 2 or not rows.is_contiguous():
        raise ValueError("native.q8_quantize: contiguous float32/bfloat16 rows and a built kernel are required")
    M, K = rows.shape
    threads = torch.get_num_threads()
    xq, sx = torch.empty(M, K, dtype=torch.int8), torch.empty(M, dtype=torch.float32)
    outlier = torch.empty(K, dtype=torch.uint8)
    scratch = torch.empty(lib.fuyu_q8_scratch_bytes(K, threads), dtype=torch.uint8)
    count = lib.fuyu_q8_quantize(rows.data_ptr(), DTYPE[rows.dtype], M, K, limit, K if most is None else most,
                                 xq.data_ptr(), sx.data_ptr(), outlier.data_ptr(), threads, scratch.data_ptr())
    cols = outlier.nonzero().view(-1) if count else torch.empty(0, dtype=torch.long)
    return xq, sx, cols


def q8_rows(weight: Weight, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
    """Rows start:stop of an INT8 weight as plain int8 rows (stop - start, K), in a view of buffer
    (contiguous, at least that many bytes)."""
    lib = library()
    K = weight.in_features
    if lib is None or weight.fmt != "INT8" or not buffer.is_contiguous() or buffer.nbytes < (stop - start) * K:
        raise ValueError("native.q8_rows: an INT8 weight, a big enough contiguous buffer and a built kernel are required")
    out = buffer.view(torch.uint8).view(-1)[:(stop - start) * K].view(torch.int8).view(stop - start, K)
    lib.fuyu_q8_rows(weight.w.data_ptr(), start, stop, K, out.data_ptr(), torch.get_num_threads())
    return out


def q8_finish(acc: torch.Tensor, sx: torch.Tensor, extra: torch.Tensor | None, sw: torch.Tensor,
              bias: torch.Tensor | None, y: torch.Tensor, start: int) -> None:
    """y[:, start:start + n] = sw * (acc * sx[:, None] + extra) + bias, rounded once to y's dtype:
    acc (M, n) int32 (an int8 GEMM's sums), sx (M), extra (M, n) float32 or None, sw (n) float32
    (the weight rows' scales), bias (n) in y's dtype or None; y (M, N) contiguous."""
    lib = library()
    M, n = acc.shape
    if (lib is None or acc.dtype != torch.int32 or not acc.is_contiguous() or y.dtype not in DTYPE
            or not y.is_contiguous() or y.shape[0] != M or start + n > y.shape[1]
            or sx.dtype != torch.float32 or sw.dtype != torch.float32 or sw.shape != (n,) or not sw.is_contiguous()
            or (extra is not None and (extra.dtype != torch.float32 or extra.shape != (M, n) or not extra.is_contiguous()))
            or (bias is not None and (bias.dtype != y.dtype or bias.shape != (n,) or not bias.is_contiguous()))):
        raise ValueError("native.q8_finish: int32 sums, float32 scales, a bias in the output's dtype and a built kernel are required")
    lib.fuyu_q8_finish(acc.data_ptr(), sx.data_ptr(), None if extra is None else extra.data_ptr(), sw.data_ptr(),
                       None if bias is None else bias.data_ptr(), y[:, start:].data_ptr(), DTYPE[y.dtype], M, n,
                       y.shape[1], torch.get_num_threads())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """softmax(q·kᵀ/√d, masked)·v for one query per row and head, q (B, H, 1, d), over a cache
    k, v (B, H, S, d) with mask (B, 1, 1, S) bool: float32 inside, rounded once to k's dtype.
    None where the kernel does not serve these inputs (the caller has a plain path). lib: the
    library (default: library())."""
    lib = lib or library()
    B, H, S, d = k.shape
    if (lib is None or k.dtype not in DTYPE or v.dtype != k.dtype or k.device.type != "cpu"
            or q.shape != (B, H, 1, d) or mask.shape != (B, 1, 1, S) or mask.dtype != torch.bool
            or not (k.is_contiguous() and v.is_contiguous() and mask.is_contiguous())):
        return None
    qf = q.float().contiguous()
    out = torch.empty(B, H, 1, d, dtype=k.dtype)
    lib.fuyu_attend(qf.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), DTYPE[k.dtype],
                    B, H, S, d, d ** -0.5, torch.get_num_threads())
    return out


def qkv_rows(qkv: torch.Tensor, norms: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, start: int, eps: float,
             lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """A prefill's attention inputs in one pass over the QKV output qkv (B, T, H·3·d) (each head's
    [q | k | v]): q and k LayerNormed over the head dim (norms: q-LN weight, bias, k-LN weight,
    bias) and rotated (cos, sin (B, 1, T, R/2) float32) in float32, rounded once. k and v are
    written into the caches k, v (B, H, S, d; each slot's d values contiguous, e.g. a view of a
    longer cache's slots) at slots start .. start + T - 1; returns q (B, H, T, d). None, with
    nothing written, where not served (the caller has the torch ops)."""
    lib = lib or library()
    B, H, S, d = k.shape
    T = qkv.shape[1]
    if (lib is None or k.dtype not in DTYPE or qkv.dtype != k.dtype or v.dtype != k.dtype
            or k.device.type != "cpu" or qkv.shape != (B, T, 3 * H * d) or d > MAX_HEAD_DIM
            or start < 0 or start + T > S or cos.shape[:3] != (B, 1, T) or 2 * cos.shape[-1] > d
            or sin.shape != cos.shape or cos.dtype != torch.float32 or sin.dtype != torch.float32
            or len(norms) != 4 or any(t is None or t.shape != (d,) or t.dtype != k.dtype
                                      or t.device.type != "cpu" for t in norms)
            or qkv.device.type != "cpu" or v.device.type != "cpu" or cos.device.type != "cpu"
            or not qkv.is_contiguous() or k.stride() != v.stride() or k.stride()[2:] != (d, 1)):
        return None
    cos, sin, norms = cos.contiguous(), sin.contiguous(), [t.contiguous() for t in norms]
    ln = (ctypes.c_void_p * 4)(*(t.data_ptr() for t in norms))
    q = torch.empty(B, H, T, d, dtype=k.dtype)
    lib.fuyu_qkv_rows(qkv.data_ptr(), ln, cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(),
                      v.data_ptr(), DTYPE[k.dtype], B, T, H, d, cos.shape[-1], k.stride(0), k.stride(1), start, eps,
                      torch.get_num_threads())
    return q


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, start: int,
          lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """Prefill attention in bfloat16: softmax(q·kᵀ/√d, masked)·v for T new queries q (B, H, T, d)
    at slots start .. start + T - 1 over keys and values k, v (B, H, n, d; each slot's d values
    contiguous), causal where mask is None, else mask (B, 1, T, n) bool; with SDPA's roundings in
    bfloat16 (csrc/flash.h). Returns (B, T, H·d), the layout the output projection takes, or None
    where not served (not bf16, no AVX512_BF16, d not a multiple of 32 up to 256)."""
    lib = lib or library()
    B, H, T, d = q.shape
    n = k.shape[2]
    if (lib is None or q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype
            or q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu"
            or k.shape != (B, H, n, d) or v.shape != k.shape
            or k.stride() != v.stride() or k.stride()[2:] != (d, 1) or not q.is_contiguous()
            or start < 0 or start + T > n
            or (mask is not None and (mask.shape != (B, 1, T, n) or mask.dtype != torch.bool
                                      or not mask.is_contiguous()))):
        return None
    out = torch.empty(B, T, H * d, dtype=q.dtype)
    work = torch.empty(lib.fuyu_flash_work_bytes(B, H, d, n), dtype=torch.uint8)
    if lib.fuyu_flash(q.data_ptr(), k.data_ptr(), v.data_ptr(), None if mask is None else mask.data_ptr(),
                      out.data_ptr(), B, H, T, d, n, start, k.stride(0), k.stride(1), d ** -0.5,
                      torch.get_num_threads(), work.data_ptr()):
        return None
    return out


def argmax(x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """x.argmax(-1) (same index on ties and NaN) of CPU float32/bfloat16 rows x (B, V), read once
    as they are: torch widens bf16 logits to float32 first (a 1 MB copy) or reduces them ~4×
    slower. None where not served. lib: the library (default: library())."""
    lib = lib or library()
    if (lib is None or x.dtype not in DTYPE or x.dim() != 2 or x.device.type != "cpu"
            or not x.is_contiguous() or x.shape[1] == 0):
        return None
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.fuyu_argmax(x.data_ptr(), DTYPE[x.dtype], x.shape[0], x.shape[1], out.data_ptr())
    return out


class Layers:
    """A model's decoder layers over one KV cache, prepared for decode steps (one new token per
    row) that run all layers in one call of the kernel: weights, biases and cache checked and
    their addresses gathered once, not at every step.

    layers: per layer, the 8 LayerNorm tensors (LN1 w, b; q-LN w, b; k-LN w, b; LN2 w, b) in the
    cache's dtype and the 4 Linears as Weights (qkv, dense, up, down); k, v: each layer's cache
    (B, H, S, d). `build` returns None where the kernel does not serve them. The object holds the
    tensors, so the addresses stay valid for as long as it lives."""

    def __init__(self, lib, layers, k, v, eps: float, intermediate: int):
        self.fn, self.dtype = lib.fuyu_layers, DTYPE[k[0].dtype]
        self.layers, self.k, self.v = layers, k, v  # kept alive: their addresses are used
        self.eps, self.intermediate = eps, intermediate
        B, H, S, d = k[0].shape
        self.shape = (B, H, S, d)
        flat, kinds = [], []
        for norms, linears in layers:
            ln1w, ln1b, qw, qb, kw, kb, ln2w, ln2b = (None if t is None else t.data_ptr() for t in norms)
            qkv, dense, up, down = (lin.pointers() for lin in linears)
            flat += [ln1w, ln1b, *qkv, qw, qb, kw, kb, *dense, ln2w, ln2b, *up, *down]  # csrc/native.c's order
            kinds += [c for lin in linears for c in lin.kind()]
        self.pointers = (ctypes.c_void_p * len(flat))(*flat)
        self.kinds = (ctypes.c_int * len(kinds))(*kinds)
        self.k_pointers = (ctypes.c_void_p * len(k))(*(t.data_ptr() for t in k))
        self.v_pointers = (ctypes.c_void_p * len(v))(*(t.data_ptr() for t in v))
        self.work_bytes = lambda threads: lib.fuyu_layers_work_bytes(B, H, d, S, intermediate, threads)

    @classmethod
    def build(cls, layers: list[tuple[list[torch.Tensor | None], list[Weight]]], k: list[torch.Tensor],
              v: list[torch.Tensor], eps: float, intermediate: int, lib: ctypes.CDLL | None = None) -> Layers | None:
        lib = lib or library()
        if lib is None or not k or len(k) != len(v) or len(k) != len(layers):
            return None
        shape, dt = k[0].shape, k[0].dtype
        B, H, S, d = shape
        tensors = [t for norms, linears in layers
                   for t in (*norms, *(x for lin in linears for x in (lin.w, lin.scales, lin.bias)))]
        ok = (dt in DTYPE and B <= MAX_ROWS and d <= MAX_HEAD_DIM
              and all(t.shape == shape and t.dtype == dt and t.device.type == "cpu" and t.is_contiguous()
                      for t in (*k, *v))
              and all(len(norms) == 8 and len(linears) == 4 for norms, linears in layers)
              and all(lin.fmt != "PLAIN" or lin.w.dtype == dt for _, linears in layers for lin in linears)
              and all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors)
              and all(t is None or t.dtype == dt for norms, linears in layers
                      for t in (*norms, *(lin.bias for lin in linears))))
        return cls(lib, layers, k, v, eps, intermediate) if ok else None

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor | None:
        """The residual stream x (B, 1, D) float32 after every layer, each layer's key and value
        written at slot `slot` (1,); cos, sin (B, 1, 1, R/2) float32; mask (B, 1, 1, S) bool.
        None where these inputs are not served (the caller has the torch ops)."""
        B, H, S, d = self.shape
        if (x.shape != (B, 1, H * d) or x.dtype != torch.float32 or cos.shape[:3] != (B, 1, 1)
                or 2 * cos.shape[-1] > d or cos.dtype != torch.float32 or sin.shape != cos.shape
                or sin.dtype != torch.float32 or mask.shape != (B, 1, 1, S) or mask.dtype != torch.bool
                or slot.shape != (1,) or slot.dtype != torch.long
                or not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and mask.is_contiguous())):
            return None
        out, threads = x.clone(), torch.get_num_threads()
        work = torch.empty(self.work_bytes(threads), dtype=torch.uint8)
        if self.fn(out.data_ptr(), self.pointers, self.kinds, self.k_pointers, self.v_pointers, cos.data_ptr(),
                   sin.data_ptr(), slot.data_ptr(), mask.data_ptr(), self.dtype, len(self.k), B, H, d, cos.shape[-1],
                   S, self.intermediate, self.eps, threads, work.data_ptr()):
            raise IndexError(f"KV cache slot {int(slot)} is outside the cache's {S} slots")
        return out
