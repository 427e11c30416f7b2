"""CPU kernel variants of nn.Linear (and of the quantized Linears), swapped in after loading.

A kernel name says how decode-sized calls (up to 8 rows) are served and, after a "+", prefill-sized
ones where that differs. Which one serves which weight is the plan's choice, made by timing whole
decode steps on the machine (model/plan.py); this module only holds the variants and the swap, and
does no I/O. Every variant gives back its plain module exactly (`restore_plain`), e.g. to train,
move or save the model.

  linear   F.linear on the plain weight (no swap)
  packed   oneDNN's blocked weight layout (PackedLinear): no per-call weight reorder
  native   our own C kernels (model/native/, compiled on the machine) for inputs of up to 8 rows:
           a 16-bit weight read once, four rows at a time (NativeLinear; F.linear for more rows),
           or an int8/int4 weight in the kernels' tiled layout (NativeQuantLinear; prefill-sized
           calls as 16-bit GEMMs over blocks of rows made dense a block at a time)
  +f32     suffix: prefill-sized calls as one float32 GEMM over the exactly widened 16-bit weight,
           rounded once (wide_linear): where the CPU has no fast 16-bit GEMM (AVX2 without AVX-512
           BF16: oneDNN's bf16 GEMM runs at 16-19 GFLOP/s, float32 at 70-110 on a 2-core AVX2-only
           AMD EPYC) a prefill is 4-5x faster, no less accurate. "linear+f32" is F.linear otherwise
  int8 / int8+dequant   Int8Linear: torch's int8 kernel, or for prefill-sized inputs the weight
           dequantized per call into one 16-bit GEMM (the int8 kernel is ~5x slower there)
  int4     Int4Linear: torch's int4 kernel (even levels only: int4 on normal levels is `native`'s,
           or without our kernels upcast per call)

Where every decoder layer's Linears are native, an eager decode step goes further: `fused_layers`
hands all decoder layers to one call of the C kernels (native.Layers), which the CPU backend
(model/backend.py) runs.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from fuyu.model import native
from fuyu.model.quantize import Int4Linear, Int8Linear

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
    """nn.Linear (plain weight) whose decode-sized calls (<= native.MAX_ROWS rows) go through
    the C kernels of model/native/."""

    base = "native"
    note = f"native rows<={native.MAX_ROWS}"

    def spec(self) -> native.Weight:
        return native.Weight("PLAIN", self.weight, None, self.bias, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > native.MAX_ROWS * x.shape[-1] or x.requires_grad or x.dtype != self.weight.dtype:
            return self.large(x)
        if torch.compiler.is_compiling():  # inside a compiled decode step: an op of its graph
            return _native_linear(x, self.weight, self.bias)
        return native.linear(x, self.spec())  # (the op's dispatch costs ~30 us a call)


@torch.library.custom_op("fuyu::native_linear", mutates_args=())
def _native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """An op of its own, so a compiled decode step keeps the call inside its graph."""
    return native.linear(x, weight, bias)


@_native_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


DENSE_BLOCK_BYTES = 64 << 20  # a quantized weight's rows made dense at a time for a prefill GEMM
INT8_BLOCK_BYTES = 8 << 20  # an int8 weight's rows made plain at a time for the int8 GEMM: 2,048
# rows of 4,096 inputs; 512 and 8,192 were 1-7% slower at 8B shapes (2-core AMD EPYC Zen 4, AVX512-VNNI)
OUTLIER_LIMIT = 6.0  # an input column with some |x| at or above this stays float (LLM.int8's threshold)
MAX_OUTLIER_SHARE = 1 / 16  # more outlier columns than this share: the 16-bit GEMM serves the call


_buffers = threading.local()


def _dense_buffer(nbytes: int) -> torch.Tensor:
    """This thread's buffer for dense blocks of quantized weights (at least nbytes), kept from one
    prefill GEMM to the next: mapped once, not page-faulted in again for every block."""
    buf = getattr(_buffers, "dense", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _buffers.dense = torch.empty(max(nbytes, DENSE_BLOCK_BYTES), dtype=torch.uint8)
    return buf


class NativeQuantLinear(nn.Module):
    """An int8 or int4 Linear in the C kernels' tiled layout (native/csrc/quant.h): decode-sized
    calls read the packed weight once (int16-quantized inputs, exact integer dot products);
    prefill-sized ones multiply 16-bit blocks of rows made dense a block at a time (DENSE_BLOCK_BYTES:
    64 MB, 8,192 rows of 4,096 inputs; no dense copy of the whole weight), int8 exactly (the integers, scaled after the GEMM as
    Int8Linear's dequantized path does), int4 as q * scale + min rounded to the activations' dtype.
    int8 with prefill="w8a8" (kernel "native+w8a8") instead multiplies 8-bit inputs by the 8-bit
    weight in prefill-sized calls (`_w8a8`): torch's int8 GEMM; a layer's four GEMMs at 8B widths
    ran 1.3-1.6x as fast as bf16's on a 2-core AMD EPYC Zen 4 (AVX512-VNNI) with all four on 8-bit
    inputs; the plan takes it where it times faster.
    Built from a scheme's portable pieces (`from_pieces`); `plain()` and the state dict give them back."""

    def __init__(self, method: str, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int, dtype: torch.dtype, group: int = 0, levels: str = "",
                 prefill: str = "dense"):
        super().__init__()
        self.method, self.in_features, self.out_features, self.group = method, in_features, out_features, group
        self.levels = levels  # int4's: "normal" or "uniform" (model/quantize.py)
        self.dtype = dtype
        if prefill not in ("dense", "w8a8") or (prefill == "w8a8" and method != "int8"):
            raise ValueError(f"no {prefill!r} prefill for {method} weights")
        self.prefill = prefill
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @property
    def kernel(self) -> str:
        return "native+w8a8" if self.prefill == "w8a8" else "native"

    @staticmethod
    def serves(method: str, out_features: int, in_features: int, group: int = 0) -> bool:
        fmt = {"int8": "INT8", "int4": "INT4"}.get(method)
        return fmt is not None and native.serves_quantized(fmt, out_features, in_features, group)

    @classmethod
    def from_pieces(cls, method: str, pieces: dict, bias: torch.Tensor | None, dtype: torch.dtype,
                    group: int = 0, levels: str = "", prefill: str = "dense") -> NativeQuantLinear:
        """From Int8's pieces (weight (N, K) int8, scales (N)) or Int4's (weight (N, K/2) nibbles,
        scales_and_zeros (K/g, N, 2): w = (level(q) - 8) * scale + zero, levels "normal" or
        "uniform") (model/quantize.py)."""
        if method == "int8":
            q = pieces["weight"]
            N, K = q.shape
            tiles = q.view(N // native.TILE, native.TILE, K // 64, 64).permute(0, 2, 1, 3).contiguous()
            return cls(method, tiles, pieces["scales"].float().contiguous(), bias, K, N, dtype, prefill=prefill)
        nibbles, sz = pieces["weight"], pieces["scales_and_zeros"].float()
        N, K = nibbles.shape[0], nibbles.shape[1] * 2
        q = unpack_int4(nibbles).view(N // native.TILE, native.TILE, K // 128, 2, 64)
        tiles = (q[..., 0, :] | (q[..., 1, :] << 4)).permute(0, 2, 1, 3).contiguous()
        scale, zero = sz.unbind(-1)  # (K/g, N) each: w = (q - 8) * scale + zero
        pairs = torch.stack([scale, zero - 8 * scale], -1).transpose(0, 1)  # (N, G, 2): scale, min
        pairs = pairs.to(torch.float16).view(N // native.TILE, native.TILE, -1, 2).transpose(1, 2).contiguous()
        return cls(method, tiles, pairs, bias, K, N, dtype, group, levels, prefill)

    def pieces(self) -> dict:
        """The portable pieces back, exactly (Int8's or Int4's with the scales as float16 rounded them)."""
        N, K = self.out_features, self.in_features
        if self.method == "int8":
            q = self.weight.view(N // native.TILE, K // 64, native.TILE, 64).permute(0, 2, 1, 3).reshape(N, K)
            return {"weight": q, "scales": self.scales}
        t = self.weight.permute(0, 2, 1, 3)  # (N/4, 4, K/128, 64)
        q = torch.stack([t & 15, t >> 4], dim=-2).reshape(N, K)
        pairs = self.scales.transpose(1, 2).reshape(N, -1, 2).float()  # (N, G, 2)
        scale, low = pairs.unbind(-1)
        sz = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous()
        return {"weight": q[:, 0::2] | (q[:, 1::2] << 4), "scales_and_zeros": sz}

    def spec(self) -> native.Weight:
        fmt = "INT4N" if self.levels == "normal" else self.method.upper()
        return native.Weight(fmt, self.weight, self.scales, self.bias, self.out_features,
                             self.in_features, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise RuntimeError("this Fuyu's quantized weights are laid out for the CPU kernels; "
                               "restore plain ones first: fuyu.model.kernels.restore_plain(model)")
        x = x.to(self.dtype)
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= native.MAX_ROWS:
            return native.linear(x, self.spec())
        y = self._w8a8(rows.contiguous()) if self.prefill == "w8a8" else None
        if y is None:
            y = self._dense(rows)
        return y.view(*x.shape[:-1], self.out_features)

    def _w8a8(self, rows: torch.Tensor) -> torch.Tensor | None:
        """x W^T for prefill rows with 8-bit inputs, or None where too many columns are outliers:
        each row quantized to int8 with its own scale (native.q8_quantize), except the columns where
        some |x| reaches OUTLIER_LIMIT, which are multiplied in float32 (LLM.int8's decomposition:
        in trained LLMs of this size a few feature columns carry values ~20x the rest, and an 8-bit
        row scale set by them would flatten every other value); blocks of W's rows made plain int8
        (INT8_BLOCK_BYTES), torch's int8 GEMM (torch._int_mm: oneDNN, VNNI where the CPU has it),
        the sums scaled and rounded once (native.q8_finish)."""
        M, K = rows.shape
        most = int(K * MAX_OUTLIER_SHARE)
        xq, sx, cols = native.q8_quantize(rows, OUTLIER_LIMIT, most)
        if cols.numel() > most:
            return None
        xo = rows[:, cols].float() if cols.numel() else None
        spec, y = self.spec(), torch.empty(M, self.out_features, dtype=self.dtype)
        step = max(native.TILE, INT8_BLOCK_BYTES // K // native.TILE * native.TILE)
        buffer = _dense_buffer(min(step, self.out_features) * K)
        for i in range(0, self.out_features, step):
            j = min(i + step, self.out_features)
            block = native.q8_rows(spec, i, j, buffer)
            extra = None if xo is None else xo @ block[:, cols].float().t()
            native.q8_finish(torch._int_mm(xq, block.t()), sx, extra, self.scales[i:j],
                             None if self.bias is None else self.bias[i:j], y, i)
        return y

    def _dense(self, rows: torch.Tensor) -> torch.Tensor:
        """x W^T for prefill rows by a 16-bit GEMM over blocks of W's rows made dense."""
        spec, int8 = self.spec(), self.method == "int8"
        y = torch.empty(rows.shape[0], self.out_features, dtype=self.dtype)
        step = max(native.TILE, DENSE_BLOCK_BYTES // (self.in_features * 2) // native.TILE * native.TILE)
        buffer = _dense_buffer(min(step, self.out_features) * self.in_features * self.dtype.itemsize)
        for i in range(0, self.out_features, step):
            j = min(i + step, self.out_features)
            block = F.linear(rows, native.dense(spec, i, j, self.dtype, unscaled=int8, buffer=buffer))
            if int8:
                block = block * self.scales[i:j].to(self.dtype)
            y[:, i:j] = block if self.bias is None else block + self.bias[i:j]
        return y

    def plain(self) -> nn.Module:
        from fuyu.model.quantize import scheme_of

        scheme = scheme_of(self.method, self.group, self.levels)
        with torch.device("meta"):
            module = scheme.make(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None))
        scheme.install(module, self.pieces(), self.weight.device, self.dtype)
        module.bias = self.bias
        return module

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the portable pieces under the quantized module's keys: saving a loaded model just works
        pieces = self.pieces()
        if self.method == "int8":
            pieces["scales"] = pieces["scales"].to(self.dtype)
        for k, v in pieces.items():
            destination[prefix + k] = v
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        group = f", groups of {self.group}" if self.group else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.method} tiled for the native kernels{group}")


def unpack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) values 0..15 (even columns in the low nibbles)."""
    return torch.stack([nibbles & 15, nibbles >> 4], dim=-1).flatten(-2)


def layer_spec(block: nn.Module) -> tuple[list[torch.Tensor | None], list[native.Weight]] | None:
    """A decoder layer as native.Layers takes it: its 8 LayerNorm tensors (LN1, q-LN, k-LN, LN2:
    weight, bias) and its 4 Linears as native Weights (qkv, dense, up, down); None where a Linear
    is not served by the native kernels."""
    attn, mlp = block.self_attn, block.mlp
    linears = (attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
    if not all(type(m) in (NativeLinear, NativeQuantLinear) for m in linears):
        return None
    norms = (block.input_layernorm, attn.q_layernorm, attn.k_layernorm, block.post_attention_layernorm)
    return [t for n in norms for t in (n.weight, n.bias)], [m.spec() for m in linears]


def fused_layers(model: nn.Module, cache, lib) -> native.Layers | None:
    """A Fuyu model's decoder layers as one call of the C kernels (native.Layers, library `lib`)
    for decode steps over `cache`, or None where they do not serve them (backend.CpuBackend.step):
    served where every layer's four Linears are native, so the layers do the same products with
    nothing in between."""
    if not len(model.layers):
        return None
    eps = model.layers[0].input_layernorm.eps
    specs = []
    for block in model.layers:
        norms = (block.input_layernorm, block.self_attn.q_layernorm, block.self_attn.k_layernorm,
                 block.post_attention_layernorm)
        spec = layer_spec(block)
        if spec is None or any(n.eps != eps or not n.elementwise_affine for n in norms):
            return None
        specs.append(spec)
    return native.Layers.build(specs, cache.k, cache.v, eps, model.layers[0].mlp.dense_h_to_4h.out_features, lib)


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


SWAPPED = (PackedLinear, _PlainWeightLinear, DequantInt8Linear, NativeQuantLinear)


def eligible(module: nn.Module) -> bool:
    """Whether a CPU kernel other than its own could serve `module` (cheap: builds nothing)."""
    if type(module) in (Int8Linear, Int4Linear):
        return module.weight.device.type == "cpu"
    return type(module) is nn.Linear and not hasattr(module, "_hf_hook") and module.weight.device.type == "cpu"


def kind(module: nn.Module) -> str:
    """What a module's weight is, as the plan groups kernels: "int8", "int4", or "float" (16/32-bit)."""
    if isinstance(module, (Int8Linear,)) or getattr(module, "method", None) == "int8":
        return "int8"
    if isinstance(module, Int4Linear) or getattr(module, "method", None) == "int4":
        return "int4"
    return "float"


def use(module: nn.Module, kernel: str) -> nn.Module:
    """`module` (plain, or quantized on torch's kernel) served by `kernel`: a new module, or the
    same one where it already is."""
    if kernel == kernel_of(module):
        return module
    if kernel == "packed":
        return PackedLinear(module)
    if type(module) is Int8Linear:
        if kernel in NATIVE_QUANT:
            return NativeQuantLinear.from_pieces("int8", {"weight": module.weight, "scales": module.scales},
                                                 module.bias, module.scales.dtype, prefill=prefill_of(kernel))
        return DequantInt8Linear(module) if kernel == "int8+dequant" else module
    if type(module) is NativeQuantLinear and module.method == "int8" and kernel in NATIVE_QUANT:
        return NativeQuantLinear(module.method, module.weight, module.scales, module.bias, module.in_features,
                                 module.out_features, module.dtype, prefill=prefill_of(kernel))
    if type(module) is Int4Linear:
        return module  # installed as planned while loading (its torch layout cannot be re-tiled)
    base, _, suffix = kernel.partition("+")
    wide = suffix == "f32"
    if base == "native":
        return NativeLinear(module, wide)
    if kernel == "linear+f32":
        return WideLinear(module)
    return module


NATIVE_QUANT = ("native", "native+w8a8")  # the kernels NativeQuantLinear is (prefill "dense", "w8a8")


def prefill_of(kernel: str) -> str:
    """A native quantized kernel's prefill half: "w8a8" (8-bit inputs, int8 weights) or "dense"."""
    return "w8a8" if kernel == "native+w8a8" else "dense"


def kernel_of(module: nn.Module) -> str | None:
    if type(module) is Int8Linear:
        return "int8"
    if type(module) is Int4Linear:
        return "int4"
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
