"""Faster kernels for hot spots, each equivalent to the plain PyTorch op it replaces.

On CPU, torch's bf16 GEMV (F.linear at batch 1-2) reads weights at roughly half the memory
bandwidth. Two remedies: an inductor-compiled multiply-and-reduce with float32 accumulation, which
streams the LM head (262,144 × hidden, most of the bytes a decode step reads) at close to the
bandwidth limit; and oneDNN's pre-packed weights for the layer Linears (PackedLinear).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_MIN_HEAD_ELEMENTS = 1 << 25  # below ~32 M weights the plain op is already fast enough
# Each (head shape, dtype, row count) compiles once. They share one code object, whose recompile limit (8) must never
# be reached: past it dynamo would run the multiply-reduce eagerly, materialising V×D floats.
_MAX_SHAPES = 4
_shapes: set = set()
_failed: list = []  # non-empty once compiling failed (no C compiler, inductor error)


_MAX_ROWS = 2  # one multiply-reduce per row, fused by inductor into one pass over the weight


def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, D) @ w (V, D)ᵀ accumulated and returned in float32 (not rounded: see exact_argmax).

    Written row by row (B is static): inductor then reads w once for all rows. Measured on the
    262,144 × 1024 head: 16.6 ms at 1 row, 18.9 ms at 2 (F.linear: 27.5 ms); at 4 rows the loop
    spills and F.linear wins, hence _MAX_ROWS.
    """
    wf = w.float()
    return torch.stack([(wf * x[i].float()).sum(-1) for i in range(x.shape[0])])


@functools.cache
def _compiled_gemv():
    return torch.compile(_gemv, dynamic=False)


def wants_fast_head(weight: torch.Tensor) -> bool:
    """Whether head_logits would take the compiled path for this weight (CPU, 16-bit, large)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
            and weight.numel() >= _MIN_HEAD_ELEMENTS)


def head_logits(h: torch.Tensor, head: torch.nn.Module | torch.Tensor, fast: bool) -> torch.Tensor:
    """Logits (B, V) from hidden states h (B, D) through `head` (the LM head module, or a weight);
    `fast` picks the compiled GEMV for up to _MAX_ROWS rows (only for a plain Linear's 16-bit weight),
    whose float32 logits differ from F.linear's rounded ones by a summation order and the rounding.
    """
    if isinstance(head, torch.nn.Module) and not fast:
        return head(h)
    weight = head.weight if isinstance(head, torch.nn.Module) else head
    key = (tuple(weight.shape), weight.dtype, h.dtype, h.shape[0])
    if fast and h.shape[0] <= _MAX_ROWS and not _failed and (key in _shapes or len(_shapes) < _MAX_SHAPES):
        _shapes.add(key)
        try:
            # A fresh buffer: h[:, -1] of a prefill is "contiguous" with a row stride of T·D, and
            # compiled code guards on strides, so each prompt length would recompile.
            x = torch.empty_like(h, memory_format=torch.contiguous_format).copy_(h)
            return _compiled_gemv()(x, weight)
        except Exception as exc:  # the plain op below is always right
            _failed.append(exc)
    return F.linear(h, weight)


_MAX_CANDIDATES = 8192  # more near-ties than this (a degenerate head): recompute every logit
_BLOCK = 512


def exact_argmax(h: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Greedy ids (B,): argmax of F.linear(h, weight) in h's dtype, first index on ties, exactly as
    the reference picks them, from `approx` (B, V), logits summed in another order (head_logits'
    fast path). Only the logits that could be the maximum are recomputed with F.linear (on those
    weight rows alone, which gives bit for bit the full op's values: tested).

    Candidates: within two 16-bit rounding steps of the approximate maximum plus twice the float32
    summation error bound γ_K·Σ|w·h| ≤ K·2⁻²⁴·max|w|·Σ|h| for each of the two orders.
    """
    approx = approx.float()
    B, V = approx.shape
    # Scanning 262,144 logits is done in blocks: a block max (fast) picks the few blocks to search.
    size = _BLOCK if V % _BLOCK == 0 else 1
    blocks = approx.view(B, V // size, size)
    block_max = blocks.amax(-1)  # (B, V / size)
    top = block_max.amax(-1, keepdim=True)  # (B, 1)
    K = weight.shape[1]
    summation = 1.01 * K * 2.0 ** -24 * _max_abs(weight) * h.float().abs().sum(-1, keepdim=True)
    floor = top - 4 * torch.finfo(h.dtype).eps * top.abs() - 4 * summation  # (B, 1)
    hot = (block_max >= floor).any(0).nonzero().squeeze(1)  # ascending block numbers
    if hot.numel() * size > _MAX_CANDIDATES:
        return F.linear(h, weight).float().argmax(-1)
    near = (blocks[:, hot] >= floor[..., None]).flatten(1)  # (B, hot · size)
    ids = (hot[:, None] * size + torch.arange(size, device=hot.device)).flatten()
    keep = near.any(0)
    idx = ids[keep]  # ascending, so the first maximum stays first
    exact = F.linear(h, weight[idx]).float().masked_fill(~near[:, keep], float("-inf"))
    return idx[exact.argmax(-1)]


def _max_abs(weight: torch.Tensor) -> float:
    """max |w|, measured once per weight (a pass over 0.5 GB) and again only if it was modified."""
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor: it cannot be modified in place
        version = None
    cached = getattr(weight, "_fuyu_max_abs", None)
    if cached is None or cached[0] != version:
        cached = (version, weight.abs().max().float().item())
        weight._fuyu_max_abs = cached
    return cached[1]


class PackedLinear(torch.nn.Module):
    """An inference-only nn.Linear for CPU whose weight is kept in oneDNN's blocked layout.

    Results are bit for bit those of F.linear (checked in tests), but the packed GEMM skips the
    per-call weight reorder: on a 2-core AVX-512 machine a decode step's 32 layer GEMVs (weights
    cold in cache) take ~9.5 ms instead of ~12.5, and prefill GEMMs run ~5% faster. The weight can always be
    restored exactly (`unpack`), which `Fuyu.requires_grad_(True)` does before training.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise RuntimeError("this Fuyu's Linear weights are packed for CPU inference; call "
                               "model.requires_grad_(True) first to train it (that unpacks them)")
        if torch.compiler.is_compiling():  # the custom op keeps a compiled graph whole
            return _packed_linear(x, self.packed, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")  # ~20 µs less a call

    def unpack(self) -> torch.nn.Linear:
        with torch.device("meta"):
            linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                     dtype=self.bias.dtype if self.bias is not None else None)
        linear.weight = torch.nn.Parameter(self.packed.to_dense(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # state_dict() keeps nn.Linear's keys, so saving or converting a loaded model just works
        destination[prefix + "weight"] = self.packed.to_dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.packed.dtype}"


@torch.library.custom_op("fuyu::packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """An opaque op to torch.compile (inductor cannot lower a pre-packed weight itself), so a
    compiled decode step calls it in place without breaking its graph."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@_packed_linear.register_fake
def _(x, packed, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def can_pack(weight: torch.Tensor) -> bool:
    """Whether PackedLinear serves this weight: CPU, bfloat16, and a oneDNN build that has bf16."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head", "vision_embed_tokens")) -> int:
    """Swap every plain CPU bf16 nn.Linear (not quantized, not offloaded, not in `skip`) for a
    PackedLinear; returns how many. Skipped by default: the LM head (at batch 1 head_logits' compiled
    GEMV reads its plain weight, faster still) and the patch projection (once per prefill)."""
    count = 0
    for name, module in list(model.named_modules()):
        if (type(module) is torch.nn.Linear and name not in skip and not hasattr(module, "_hf_hook")
                and can_pack(module.weight)):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, PackedLinear(module))
            count += 1
    return count


def unpack_linears(model: torch.nn.Module) -> int:
    """Undo pack_linears (exactly); returns how many modules were restored."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module.unpack())
            count += 1
    return count
