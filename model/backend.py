"""The CPU backend: how a loaded model's decode steps run on the CPU, beside the model's math.

model/fuyu.py is the math, in torch ops that run anywhere. For a model on the CPU, loading
(weights.for_inference) sets `model.backend` to a CpuBackend, the one part that knows our C
kernels (model/native), the Linear layouts the kernel plan swapped in (model/kernels.py) and the
plan itself (model/plan.py, `plan`):

  step(model, cache, ids)   a whole decode step with every decoder layer in one C call, where
                            the plan serves every layer's Linears with the native kernels (16-bit,
                            int8 or int4); None where it does not (the caller runs the plain step)
  attend(q, k, v, mask)     one-query decode attention in one C pass over the cache, for the
                            plain step's layers (model/fuyu.py's decode_attention otherwise)
  qkv_rows(...)             a prefill's q/k LayerNorms, rotary and cache write in one C pass
                            over the QKV output, for the plain forward's layers
  attend_rows(...)          a prefill's attention in bfloat16 (flash attention in C)
  argmax(logits)            greedy ids in one C pass over 16-bit logits

generate.decode_step is the one place that picks between the backend's step and the plain one.
What the backend prepares for a cache (the fused layers, with the addresses of its tensors) is
kept here, per cache, not on the cache. tests/test_native.py and tests/test_fast_paths.py pin the
backend to the plain path: float32 within 1e-4, the same greedy ids.
"""

from __future__ import annotations

import functools
import weakref

import torch

from fuyu.model import kernels, native
from fuyu.model.settings import Settings


class CpuBackend:
    """The CPU backend of one model. settings: how to get the C kernels (model/settings.py); they
    are compiled at the first call that needs them (model/native: cached per machine), unless
    settings.native is False, and where they cannot be had every method returns None."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.plan = None  # the kernel plan loading applied (model/plan.py), for reports
        self._layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache: (model, Layers | None)

    @functools.cached_property
    def lib(self):
        """The C kernels, or None (resolved once: the decode step asks for them ~10 times)."""
        return native.library(self.settings)

    def __reduce__(self):
        """Copied or pickled as a fresh backend: what it prepared holds addresses of this process."""
        return CpuBackend, (self.settings,)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """fuyu.decode_attention in one pass over the cache, without its float32 copies (torch-op
        time of a batch-1 mid-size step 12.4 -> 4.9 ms, profiler, 2-core AVX2-only AMD EPYC)."""
        lib = self.lib
        return None if lib is None else native.attend(q, k, v, mask, lib)

    def _prefill_lib(self):
        """The library for a prefill pass, or None: not built, or autograd or torch.compile at
        work (the passes are opaque C calls that write the cache in place)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        return self.lib

    def qkv_rows(self, qkv: torch.Tensor, attention, cos: torch.Tensor, sin: torch.Tensor, kv):
        """Attention.forward's q/k LayerNorms, rotary and cache write for a prefill's T tokens in
        one C pass over the QKV output (q, keys, values as kv.update returns them), or None. The
        torch ops make ~20 passes over (T, 3·D) values: 33 of a layer's ~1,250 ms at 1,074
        tokens, 8B shapes (2-core AMD EPYC, Zen 4); this pass 12 ms."""
        lib = self._prefill_lib()
        if lib is None:
            return None
        window = kv.window
        T = qkv.shape[1]
        norms = [attention.q_layernorm.weight, attention.q_layernorm.bias,
                 attention.k_layernorm.weight, attention.k_layernorm.bias]
        q = native.qkv_rows(qkv, norms, cos, sin, kv.k, kv.v, window.span - T,
                            attention.q_layernorm.eps, lib)
        if q is None:
            return None
        return q, kv.k[:, :, :window.span], kv.v[:, :, :window.span]

    def attend_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window) -> torch.Tensor | None:
        """A prefill's attention in bfloat16 (flash attention with the bfloat16 dot product
        instruction, csrc/flash.h), output (B, T, D) as the output projection takes it, or None
        (SDPA serves: float32, no AVX512_BF16). SDPA's CPU flash kernel took ~8% of a layer at
        1,074 tokens, 8B shapes (2-core AMD EPYC, Zen 4): 90 ms a layer against this one's 50 ms."""
        lib = self._prefill_lib()
        return None if lib is None else native.flash(q, k, v, window.mask, window.span - q.shape[2], lib)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor | None:
        lib = self.lib
        return None if lib is None else native.argmax(logits, lib)

    def layers(self, model, cache) -> native.Layers | None:
        """The model's decoder layers as one C call over `cache`, prepared at its first decode
        step, or None where they are not served (see kernels.fused_layers). A model changed in
        the middle of a generation (moved, or its kernels swapped) keeps what it was prepared
        with until the next cache."""
        prepared = self._layers.get(cache)
        if prepared is None or prepared[0] is not model:
            lib = self.lib
            prepared = (model, None if lib is None else kernels.fused_layers(model, cache, lib))
            self._layers[cache] = prepared
        return prepared[1]

    def step(self, model, cache, ids: torch.Tensor) -> torch.Tensor | None:
        """generate.decode_step with every decoder layer in one C call: the same computation,
        without the ~30 torch ops a layer (LayerNorms, rotary, casts, the cache write) and the
        Python around them, which took ~7 ms of a ~60 ms batch-1 mid-size step (2-core AVX2-only
        AMD EPYC) and let the OpenMP threads fall asleep between GEMVs. None, with nothing done,
        where it does not serve this model, cache or call (autograd, torch.compile)."""
        if not cache.decoding or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        layers = self.layers(model, cache)
        if layers is None:
            return None
        positions = cache.step()
        x = model.embed(ids[:, None], None)
        dt = x.dtype
        window = cache.window(1)
        cos, sin = cache.rotary(positions)
        out = layers(x.float(), cos, sin, window.slots, window.mask)
        if out is None:
            raise RuntimeError("the fused decode layers refused a step they were prepared for")
        cache.advance()
        return model.lm_head(model.final_layernorm(out).to(dt)[:, 0])


def for_model(model, settings: Settings) -> CpuBackend | None:
    """The backend for a loaded model: the CPU backend where its weights are on the CPU."""
    return CpuBackend(settings) if model.embed_tokens.weight.device.type == "cpu" else None
