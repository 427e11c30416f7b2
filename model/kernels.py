"""CPU kernel variants of nn.Linear, swapped in after loading, each equivalent to the plain op.

A kernel name says how decode-sized calls are served and, after a "+", prefill-sized ones where
that differs. Which one serves which weight is decided by timing on the machine
(model/tuning.py); this module
only holds the variants and the swap, and does no I/O. Every variant gives back its plain
nn.Linear exactly (`restore_plain`), e.g. to train, move or save the model.

  linear   F.linear on the plain weight (no swap)
  packed   oneDNN's blocked weight layout (PackedLinear): no per-call weight reorder
  mv       torch.mv (BLAS GEMV) for one-row inputs, F.linear otherwise (MvLinear)
  native   our own C matrix-vector kernel (model/native/, compiled on the machine) for inputs of
           up to 8 rows (a decode batch), F.linear otherwise (NativeLinear): reads 16-bit weights at
           about the memory's read rate where oneDNN's GEMV does not (both AMD EPYC kinds)
  gemv     an inductor-compiled multiply-and-reduce with float32 accumulation for 1–2 rows
           (GemvLinear; F.linear above that), which streams a big LM head at close to the
           memory bandwidth on some CPUs (AMD EPYC) and not on others
  +f32     suffix: prefill-sized calls (more rows than a decode batch) as one float32 GEMM over the
           exactly widened 16-bit weight, rounded once (wide_linear): where the CPU has no fast
           16-bit GEMM (AVX2 without AVX-512 BF16: oneDNN's bf16 GEMM runs at 16-19 GFLOP/s, float32
           at 70-110 on a 2-core AVX2-only AMD EPYC) a prefill is 4-5x faster, no less accurate.
           "linear+f32" is F.linear for the rest
  int8 / int8+dequant   for Int8Linear: torch's int8 kernel, or for prefill-sized inputs the
           weight dequantized per call into one 16-bit GEMM (the int8 kernel is ~5× slower there)

Where tuning picked "native" for every layer's Linears, an eager decode step goes further:
`fused_layers` hands all decoder layers to one call of the C kernels (native.Layers), which the
CPU backend (model/backend.py) runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuyu.model import native
from fuyu.model.quantize import Int8Linear

GEMV_MAX_ROWS = 2  # one multiply-reduce per row, fused by inductor into one pass over the weight
DEQUANT_FROM_ROWS = 32  # Int8Linear "int8+dequant": inputs with this many rows or more
WIDE_FROM_ROWS = native.MAX_ROWS + 1  # "+f32": inputs with more rows than a decode batch
WIDE_BLOCK = 1 << 20  # weight elements widened to float32 at a time (4 MiB)


class PackedLinear(nn.Module):
    """An inference-only nn.Linear for CPU whose weight is kept in oneDNN's blocked layout, as one
    packed tensor or, for a weight too big to pack beside its plain copy (an LM head: 2 GB at 8B),
    as packed blocks of rows made one block at a time (`from_rows`)."""

    kernel = "packed"

    def __init__(self, linear: nn.Linear | None = None, *, blocks: list[torch.Tensor] | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if linear is not None:
            blocks, bias = [torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())], linear.bias
        self.blocks = blocks
        self.in_features, self.out_features = blocks[0].shape[1], sum(b.shape[0] for b in blocks)
        self.bias = bias

    @classmethod
    def from_rows(cls, read_rows, out_features: int, rows: int, bias: torch.Tensor | None = None) -> PackedLinear:
        """Pack a weight `rows` rows at a time from read_rows(start, stop) (a plain (stop - start, K)
        block, e.g. read from the checkpoint): memory holds the packed weight and one plain block."""
        blocks = [torch.ops.mkldnn._reorder_linear_weight(read_rows(i, min(i + rows, out_features)))
                  for i in range(0, out_features, rows)]
        return cls(blocks=blocks, bias=bias)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise RuntimeError("this Fuyu's Linear weights are packed for CPU inference; "
                               "restore plain ones first: fuyu.model.kernels.restore_plain(model)")
        op = _packed_linear if torch.compiler.is_compiling() else _linear_pointwise  # the custom
        # op keeps a compiled graph whole
        if len(self.blocks) == 1:
            return op(x, self.blocks[0], self.bias)
        outs, i = [], 0
        for b in self.blocks:
            outs.append(op(x, b, None if self.bias is None else self.bias[i:i + b.shape[0]]))
            i += b.shape[0]
        return torch.cat(outs, dim=-1)

    def dense(self) -> torch.Tensor:
        return torch.cat([b.to_dense() for b in self.blocks])

    def plain(self) -> nn.Linear:
        return _linear(self.dense(), self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # state_dict() keeps nn.Linear's keys, so saving or converting a loaded model just works
        destination[prefix + "weight"] = self.dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        blocks = f", {len(self.blocks)} blocks" if len(self.blocks) > 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"packed={self.blocks[0].dtype}{blocks}")


def _linear_pointwise(x, packed, bias):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@torch.library.custom_op("fuyu::packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Opaque to torch.compile (inductor cannot lower a pre-packed weight itself)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@_packed_linear.register_fake
def _(x, packed, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, K) @ w (N, K)ᵀ accumulated and returned in float32, B ≤ GEMV_MAX_ROWS.

    Written row by row (B is static): inductor then reads w once for all rows. In blocks of rows,
    so that if it ever ran uncompiled it would not materialise an N × K float32 copy.
    """
    block = max(1, (1 << 22) // w.shape[1])
    xf = x.float()
    parts = [torch.stack([(w[i:i + block].float() * xf[r]).sum(-1) for r in range(x.shape[0])])
             for i in range(0, w.shape[0], block)]
    return torch.cat(parts, dim=-1)


class GemvLinear(nn.Module):
    """nn.Linear (plain weight, no bias) whose 1–2-row calls go through a compiled fp32 GEMV."""

    kernel = "gemv"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("GemvLinear serves bias-free weights (the LM head)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self._compiled = torch.compile(gemv, dynamic=False)
        self._broken = False  # compiling failed once (no C compiler, too many shapes): plain op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > GEMV_MAX_ROWS or x.requires_grad or self._broken:
            return F.linear(x, self.weight)
        if torch.compiler.is_compiling():  # inside a compiled decode step: part of its graph
            return gemv(rows, self.weight).reshape(*x.shape[:-1], -1)
        # A fresh buffer: compiled code guards on strides, and h[:, -1] of a prefill has a row
        # stride of T·D, so each prompt length would recompile.
        rows = torch.empty_like(rows, memory_format=torch.contiguous_format).copy_(rows)
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return self._compiled(rows, self.weight).reshape(*x.shape[:-1], -1)
        except Exception:  # the plain op is always right
            self._broken = True
            return F.linear(x, self.weight)

    def plain(self) -> nn.Linear:
        return _linear(self.weight, None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gemv rows<={GEMV_MAX_ROWS}"


def wide_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for 16-bit x and weights as float32 GEMMs over the exactly
    widened operands, rounded once to the weights' dtype. The weight is widened a block of rows
    at a time, so the float32 copy stays small (an LM head's would be 1 GiB)."""
    N, K = weight.shape
    xf = x.reshape(-1, K).float()
    y = torch.empty(xf.shape[0], N, dtype=weight.dtype, device=x.device)
    step = max(1, WIDE_BLOCK // K)
    for i in range(0, N, step):
        b = None if bias is None else bias[i:i + step].float()
        y[:, i:i + step] = F.linear(xf, weight[i:i + step].float(), b)
    return y.view(*x.shape[:-1], N)


class _PlainWeightLinear(nn.Module):
    """An nn.Linear whose plain weight and bias are kept as they are, with a faster path for
    some calls (the subclass's forward); the calls it does not serve go to `large`: F.linear, or
    with wide=True ("+f32") prefill-sized ones to wide_linear. `note` says which, in the repr."""

    base = "linear"
    note = ""

    def __init__(self, linear: nn.Linear, wide: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.wide = wide

    @property
    def kernel(self) -> str:
        return self.base + ("+f32" if self.wide else "")

    def large(self, x: torch.Tensor) -> torch.Tensor:
        if self.wide and x.numel() >= WIDE_FROM_ROWS * x.shape[-1] and not x.requires_grad:
            return wide_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.large(x)

    def plain(self) -> nn.Linear:
        return _linear(self.weight, self.bias)

    def extra_repr(self) -> str:
        wide = f"float32 GEMM from {WIDE_FROM_ROWS} rows" if self.wide else ""
        return ", ".join(p for p in (f"in_features={self.in_features}", f"out_features={self.out_features}",
                                     self.note, wide) if p)


class WideLinear(_PlainWeightLinear):
    """nn.Linear (plain weight): F.linear, but prefill-sized calls as float32 GEMMs ("linear+f32")."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear, wide=True)


class NativeLinear(_PlainWeightLinear):
    """nn.Linear (plain weight) whose decode-sized calls (≤ native.MAX_ROWS rows) go through
    the C GEMV of model/native/."""

    base = "native"
    note = f"native rows<={native.MAX_ROWS}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > native.MAX_ROWS * x.shape[-1] or x.requires_grad or x.dtype != self.weight.dtype:
            return self.large(x)
        if torch.compiler.is_compiling():  # inside a compiled decode step: an op of its graph
            return _native_linear(x, self.weight, self.bias)
        return native.linear(x, self.weight, self.bias)  # (the op's dispatch costs ~30 µs a call)


def layer_tensors(block: nn.Module) -> list[torch.Tensor | None]:
    """A decoder layer's 16 weights and biases in the order native.Layers takes them (the comment
    on `layers` in native/csrc/native.c)."""
    attn, mlp = block.self_attn, block.mlp
    ln1, qln, kln, ln2 = block.input_layernorm, attn.q_layernorm, attn.k_layernorm, block.post_attention_layernorm
    qkv, dense, up, down = attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h
    return [ln1.weight, ln1.bias, qkv.weight, qkv.bias, qln.weight, qln.bias, kln.weight, kln.bias,
            dense.weight, dense.bias, ln2.weight, ln2.bias, up.weight, up.bias, down.weight, down.bias]


def fused_layers(model: nn.Module, cache, lib) -> native.Layers | None:
    """A Fuyu model's decoder layers as one call of the C kernels (native.Layers, library `lib`)
    for decode steps over `cache`, or None where they do not serve them (backend.CpuBackend.step).

    Served where tuning picked the native GEMV for all four Linears of every layer: the layers then
    do the same GEMVs with nothing in between."""
    eps = model.layers[0].input_layernorm.eps if len(model.layers) else None
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        linears = (attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
        norms = (block.input_layernorm, attn.q_layernorm, attn.k_layernorm, block.post_attention_layernorm)
        if (not all(type(m) is NativeLinear for m in linears)
                or any(n.eps != eps or not n.elementwise_affine for n in norms)):
            return None
    if eps is None:
        return None
    return native.Layers.build([layer_tensors(b) for b in model.layers], cache.k, cache.v, eps,
                               model.layers[0].mlp.dense_h_to_4h.out_features, lib)


@torch.library.custom_op("fuyu::native_linear", mutates_args=())
def _native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """An op of its own, so a compiled decode step keeps the call inside its graph."""
    return native.linear(x, weight, bias)


@_native_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class DequantInt8Linear(Int8Linear):
    """An Int8Linear whose prefill-sized calls (DEQUANT_FROM_ROWS rows or more) multiply by the
    weight dequantized per call, one 16-bit GEMM, where the CPU int8 kernel is ~5x slower
    ("int8+dequant"); the same buffers, so the same state_dict."""

    kernel = "int8+dequant"

    def __init__(self, module: Int8Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = module.in_features, module.out_features
        for name in ("weight", "scales", "bias"):
            self.register_buffer(name, getattr(module, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        big = x2.shape[0] >= DEQUANT_FROM_ROWS
        return self.finish(x, self.dequantized(x2) if big else self.int8(x2))

    def plain(self) -> Int8Linear:
        with torch.device("meta"):
            module = Int8Linear(self.in_features, self.out_features, self.bias is not None)
        module.weight, module.scales, module.bias = self.weight, self.scales, self.bias
        return module


class MvLinear(_PlainWeightLinear):
    """nn.Linear (plain weight) whose one-row calls go through torch.mv: BLAS's GEMV streams a
    16-bit weight faster than F.linear's GEMM path on some CPUs (and slower on others)."""

    base = "mv"
    note = "mv for 1 row"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or x.requires_grad:
            return self.large(x)
        y = torch.mv(self.weight, x.reshape(-1))
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return linear


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack this weight: CPU, float32 or (with oneDNN bf16 support) bfloat16."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16
                                             and torch.ops.mkldnn._is_mkldnn_bf16_supported())


SWAPPED = (PackedLinear, GemvLinear, _PlainWeightLinear, DequantInt8Linear)


def eligible(module: nn.Module) -> bool:
    """Whether a CPU kernel other than its own could serve `module` (cheap: builds nothing)."""
    if type(module) is Int8Linear:
        return module.weight.device.type == "cpu"
    return type(module) is nn.Linear and not hasattr(module, "_hf_hook") and module.weight.device.type == "cpu"


def candidates(module: nn.Module) -> list[str]:
    """Kernel names for `module`'s decode-sized calls (first: what it is now, unswapped)."""
    if not eligible(module):
        return []
    if type(module) is Int8Linear:
        return ["int8"]
    names = ["linear"]
    if can_pack(module.weight):
        names.append("packed")
    if native.serves(module.weight) and native.available():
        names.append("native")
    if module.weight.dtype in (torch.bfloat16, torch.float16):
        names.append("mv")
        if module.bias is None:
            names.append("gemv")
    return names


def prefill_candidates(module: nn.Module) -> list[str]:
    """Kernel names for `module`'s prefill-sized calls: F.linear, oneDNN packed, float32 GEMMs;
    the int8 kernel or the weight dequantized per call."""
    if not eligible(module):
        return []
    if type(module) is Int8Linear:
        return ["int8", "int8+dequant"]
    names = ["linear"]
    if can_pack(module.weight):
        names.append("packed")
    if module.weight.dtype in (torch.bfloat16, torch.float16):
        names.append("linear+f32")
    return names


def compose(decode: str, prefill: str) -> str | None:
    """The kernel that serves decode-sized calls as `decode` and prefill-sized ones as `prefill`
    (names from candidates and prefill_candidates), or None where no one kernel does both."""
    if "packed" in (decode, prefill):  # the packed weight replaces the plain one: both or neither
        return "packed" if decode == prefill else None
    if decode == "int8":
        return prefill
    if prefill == "linear":
        return decode
    return None if decode == "gemv" else decode + "+f32"  # (gemv keeps F.linear for the rest)


def use(module: nn.Module, kernel: str) -> nn.Module:
    """`module` (plain) served by `kernel`: a new module, or the same one set up for it."""
    if kernel == "packed":
        return PackedLinear(module)
    if kernel == "gemv":
        return GemvLinear(module)
    base, _, suffix = kernel.partition("+")
    wide = suffix == "f32"
    if base == "mv":
        return MvLinear(module, wide)
    if base == "native":
        return NativeLinear(module, wide)
    if kernel == "linear+f32":
        return WideLinear(module)
    if kernel == "int8+dequant":
        return DequantInt8Linear(module)
    return module


def kernel_of(module: nn.Module) -> str | None:
    if type(module) is Int8Linear:
        return "int8"
    if type(module) is nn.Linear:
        return "linear"
    return getattr(module, "kernel", None)


def apply(model: nn.Module, choose) -> dict[str, str]:
    """Swap each eligible Linear for the kernel choose(name, module) names (None: leave it);
    returns {module name: kernel}. One module at a time, nothing else holding the one replaced:
    a weight repacked (oneDNN's layout) frees its plain copy before the next is made, so memory
    holds one weight twice at most, never the model."""
    picked = {}
    for name in [n for n, m in model.named_modules() if eligible(m)]:
        module = model.get_submodule(name)
        kernel = choose(name, module)
        if kernel is None or kernel == kernel_of(module):
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, use(module, kernel))
        picked[name] = kernel
        del module
    return picked


def restore_plain(model: nn.Module) -> nn.Module:
    """Undo `apply` exactly: plain nn.Linear weights (the same values), quantized modules on their
    own kernel. Returns the model, e.g. `restore_plain(model).requires_grad_(True)` to train."""
    for name in [n for n, m in model.named_modules() if isinstance(m, SWAPPED)]:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_submodule(name).plain())
    return model


def in_use(model: nn.Module) -> dict[str, str]:
    """{module name: kernel} for every Linear a kernel could serve (plain ones included)."""
    return {name: kernel_of(m) for name, m in model.named_modules()
            if isinstance(m, SWAPPED) or eligible(m)}
