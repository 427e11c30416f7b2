"""Quantized linear layers, applied from outside the network by swapping modules (style rule 6).

Schemes, by the name `load_pretrained(quantization=...)` takes and config.json records:
  int8      weight-only int8, one scale per output channel (on CPU our C kernels where the plan
            picks them, kernels.NativeQuantLinear; else torch's _weight_int8pack_mm)
  int4      weight-only int4, asymmetric, groups of up to 128 inputs, each group's (scale, min)
            searched for least squared error; 16 levels set where normally distributed weights
            fall most ("levels": "normal", the default: our C kernels only, upcast per call
            elsewhere) or evenly ("uniform": torch's _weight_int4pack_mm_for_cpu where our
            kernels are not used)
  llm_int8  bitsandbytes LLM.int8 ("8bit"): int8 weights, fp16 for outlier activation columns
  nf4, fp4  bitsandbytes 4-bit ("4bit" = nf4): blocks of 64, double-quantized absmax, bf16 compute
Each scheme maps a float weight to the tensors a pre-quantized checkpoint stores for its module
(`quantize`), and those tensors into a swapped module (`install`): quantizing while loading and
loading a pre-quantized checkpoint are one path. By default `vision_embed_tokens` (2700 inputs,
which bitsandbytes' CPU kernels cannot pack) and `lm_head` stay 16-bit, as transformers does for
bitsandbytes: the logits' accuracy rests on the head. {"method": ..., "skip": ["vision_embed_tokens"]}
(the CLI's --quantize-head) quantizes the head too: at 8B it is 2.1 GB of the 16.6 GB a decode step
reads in bf16, and a larger share of a quantized step's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_SKIP = ("vision_embed_tokens", "lm_head")
ALIASES = {"8bit": "llm_int8", "4bit": "nf4", "bnb_int8": "llm_int8", "bnb_nf4": "nf4", "bnb_fp4": "fp4"}
Pieces = dict[str, torch.Tensor]


# --- torch weight-only kernels ------------------------------------------------------------------

def _by_rows(fn, dims: tuple[int, int], w: torch.Tensor, *args):
    """fn over row chunks of ≤ 16M elements: rows are independent, and a float32 copy of a whole
    262144-row head would double the loader's peak memory."""
    rows = max(1, (1 << 24) // w.shape[1])
    parts = [fn(w[i:i + rows], *args) for i in range(0, w.shape[0], rows)]
    return tuple(torch.cat(p, dim=d) for p, d in zip(zip(*parts), dims))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) → int8 q (N, K) and float32 scales (N,) with w ≈ q * scales[:, None]."""
    return _by_rows(_int8_rows, (0, 0), w)


def _int8_rows(w: torch.Tensor):
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


# int4's "normal" levels, in the units of (scale, min): 16 integers 0..127 (what the C kernels'
# byte products use; csrc/quant.h: Q4_NORMAL, the same numbers) times 15/127. Found by Lloyd's
# algorithm over normally distributed weights in groups of 128, fitted by _int4_fit's search (then
# 6 ranges, 2 refits); against 16 even levels (0..15) they leave ~16% less squared error.
NORMAL_LEVELS_127 = (0, 14, 25, 33, 41, 48, 54, 60, 67, 73, 79, 86, 94, 102, 113, 127)
LEVELS = ("normal", "uniform")


def level_values(levels: str) -> torch.Tensor:
    """The 16 levels' values (float32) in the units of (scale, min): 0..15, or the normal ones."""
    if levels == "uniform":
        return torch.arange(16, dtype=torch.float32)
    return torch.tensor(NORMAL_LEVELS_127, dtype=torch.float32) * (15 / 127)


def quantize_int4(w: torch.Tensor, group: int, levels: str = "normal") -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) → nibbles (N, K/2) uint8 (even column in the low nibble) and scales_and_zeros
    (K/group, N, 2) float32, with w ≈ (level(q) - 8) * scale + zero per group (torch's int4
    convention when the levels are uniform: level(q) = q)."""
    return _by_rows(_int4_rows, (0, 1), w, group, levels)


def _int4_rows(w: torch.Tensor, group: int, levels: str):
    N, K = w.shape
    q, sm = _int4_fit(w.float().contiguous(), group, levels)  # (N, K) indices, (N, K/g, 2) (scale, min)
    scale, lo = sm.unbind(-1)
    sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()  # (K/g, N, 2)
    return q[:, 0::2] | (q[:, 1::2] << 4), sz


# ranges tried and least-squares refits, per levels: as csrc/quant.h's Q4_FIT_* and Q4N_FIT_*
FIT = {"uniform": (6, 2), "normal": (3, 3)}


def _int4_fit(w: torch.Tensor, group: int, levels: str = "normal") -> tuple[torch.Tensor, torch.Tensor]:
    """Level indices q (N, K) uint8 in 0..15 and (scale, min) pairs (N, K/group, 2) float32 for w
    (N, K) float32, w ≈ level(q)·scale + min per group (level_values): of the group's min..max
    range shrunk about its centre by 0, 5, .., 25% (normal levels: .., 10%), each refitted twice
    (normal: three times) by least squares to its nearest levels, the pair of least squared error
    (FIT). Normally distributed weights in groups of 128 keep ~15% less squared error than with
    min..max alone on uniform levels (as little as bitsandbytes' nf4 in groups of 64), ~16% less
    again on the normal ones. The C kernels' fit (csrc/quant.h: q4_fit) where they are built,
    else these torch ops (the same search, slower)."""
    from fuyu.model import native

    N, K = w.shape
    lib = native.library()
    if lib is not None and group <= 256 and group % 16 == 0:  # q4_fit: whole vectors of a group
        q = torch.empty(N, K, dtype=torch.uint8)
        sm = torch.empty(N, K // group, 2)
        lib.fuyu_int4_fit(w.data_ptr(), N, K, group, int(levels == "normal"), q.data_ptr(), sm.data_ptr(),
                          torch.get_num_threads())
        return q, sm
    value = level_values(levels)
    mids = (value[1:] + value[:-1]) / 2
    wg = w.reshape(N, K // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    c, r = (lo + hi) / 2, hi - lo
    flat = r <= 0
    best = None
    shrinks, rounds = FIT[levels]
    for i in range(shrinks):
        a = 1 - 0.05 * i
        s, m = torch.where(flat, 1e-8, r * a / 15), torch.where(flat, lo, c - r * a / 2)
        for fit in range(rounds + 1):
            u = (wg - m) / s
            if levels == "uniform":
                q = k = u.clamp(0, 15).add(0.5).floor()
            else:  # the nearest level: how many midpoints lie below (ties go down, as in C)
                k = torch.bucketize(u, mids).float()
                q = value[k.long()]
            if fit == rounds:
                break
            sq, sqq = q.sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True)
            sw, sqw = wg.sum(-1, keepdim=True), (q * wg).sum(-1, keepdim=True)
            det = group * sqq - sq * sq
            s2 = (group * sqw - sq * sw) / det
            ok = (det > 0) & (s2 > 0)
            s, m = torch.where(ok, s2, s), torch.where(ok, (sw - s2 * sq) / group, m)
        err = (q * s + m - wg).square().sum(-1, keepdim=True)
        if best is None:
            best = [err, k, s, m]
        else:
            take = err < best[0]
            best = [torch.where(take, new, old) for new, old in zip((err, k, s, m), best)]
    _, k, s, m = best
    return k.to(torch.uint8).reshape(N, K), torch.cat([s, m], -1)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t, copied when its data is not 64-byte aligned: torch's int8 CPU kernel crashes (SIGSEGV)
    on unaligned weights, and tensors memory-mapped from safetensors sit at any byte offset."""
    return t if t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


def unpack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 → (N, K) values 0..15 (uint8)."""
    return torch.stack([nibbles & 15, nibbles >> 4], dim=-1).flatten(-2)


def dequantize_int4(nibbles: torch.Tensor, sz: torch.Tensor, levels: str = "normal") -> torch.Tensor:
    q = level_values(levels).to(nibbles.device)[unpack_int4(nibbles).long()]
    N, K = q.shape
    scale, zero = sz.float().transpose(0, 1).unbind(-1)  # (N, K/g) each
    return ((q.reshape(N, scale.shape[1], -1) - 8) * scale[..., None] + zero[..., None]).reshape(N, K)


class Int8Linear(nn.Module):
    """y = x Wᵀ·scales + b with W int8 (N, K). CPU: torch's int8 kernel; elsewhere W is upcast."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, self.int8(x.reshape(-1, self.in_features).to(self.scales.dtype)))

    def int8(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) @ (W·scales)ᵀ: the int8 kernel on CPU."""
        if x2.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        return self.dequantized(x2)

    def dequantized(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) @ (W·scales)ᵀ with the weight upcast per call: one GEMM in x2's dtype."""
        return F.linear(x2, self.weight.to(x2.dtype)) * self.scales

    def finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (M, N) plus the bias, in x's dtype and leading shape."""
        y = y.to(x.dtype) if self.bias is None else (y + self.bias).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Grouped int4 weights. Uniform levels on CPU: `weight` holds torch's packed kernel layout
    (made at install time from the portable nibbles); otherwise (other devices, or normal levels,
    which no torch kernel takes) the portable nibbles, upcast per call. On CPU the kernel plan
    swaps in our C kernels (kernels.NativeQuantLinear) where they are built."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group: int = 128,
                 levels: str = "normal"):
        super().__init__()
        self.in_features, self.out_features, self.group, self.levels = in_features, out_features, group, levels
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group, out_features, 2))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros
        x2 = x.reshape(-1, self.in_features).to(sz.dtype)
        if self.packed:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group, sz)
        else:
            y = F.linear(x2, dequantize_int4(self.weight, sz, self.levels).to(x2.dtype))
        y = y.to(x.dtype) if self.bias is None else (y + self.bias).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def packed(self) -> bool:
        """Whether `weight` is torch's CPU int4 layout rather than the portable nibbles."""
        return self.levels == "uniform" and self.weight.device.type == "cpu"


# --- schemes ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Int8:
    method: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8
    skip: tuple[str, ...] = DEFAULT_SKIP

    def supports(self, lin: nn.Linear, device: torch.device) -> bool:
        return True

    def pieces(self) -> tuple[str, ...]:
        return ("weight", "scales")

    def make(self, lin: nn.Linear) -> nn.Module:
        return Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)

    def quantize(self, w: torch.Tensor) -> Pieces:
        q, scales = quantize_int8(w)
        return {"weight": q, "scales": scales}

    def install(self, module: nn.Module, p: Pieces, device: torch.device, dtype: torch.dtype) -> None:
        module.weight = aligned(p["weight"].to(device))
        module.scales = aligned(p["scales"].to(device, dtype))

    def dequantize(self, p: Pieces) -> torch.Tensor:
        return p["weight"].float() * p["scales"].float()[:, None]


@dataclass(frozen=True)
class Int4:
    method: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4
    group_size: int = 128
    levels: str = "normal"
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self):
        if self.levels not in LEVELS:
            raise ValueError(f"int4 levels {self.levels!r}: use one of {', '.join(LEVELS)}")

    def _group(self, in_features: int) -> int:
        return min(self.group_size, in_features)

    def supports(self, lin: nn.Linear, device: torch.device) -> bool:
        g = self._group(lin.in_features)  # the CPU kernel takes groups of 32..256, N % 16 == 0
        return g in (32, 64, 128, 256) and lin.in_features % g == 0 and lin.out_features % 16 == 0

    def pieces(self) -> tuple[str, ...]:
        return ("weight", "scales_and_zeros")

    def make(self, lin: nn.Linear) -> nn.Module:
        return Int4Linear(lin.in_features, lin.out_features, lin.bias is not None,
                          self._group(lin.in_features), self.levels)

    def quantize(self, w: torch.Tensor) -> Pieces:
        nibbles, sz = quantize_int4(w, self._group(w.shape[1]), self.levels)
        return {"weight": nibbles, "scales_and_zeros": sz}

    def install(self, module: nn.Module, p: Pieces, device: torch.device, dtype: torch.dtype) -> None:
        w = p["weight"]
        if device.type == "cpu" and self.levels == "uniform":  # a pure re-layout; int32 values 0..15
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(w).to(torch.int32), 1)
        module.weight = aligned(w.to(device))
        module.scales_and_zeros = aligned(p["scales_and_zeros"].to(device, dtype))

    def dequantize(self, p: Pieces) -> torch.Tensor:
        return dequantize_int4(p["weight"], p["scales_and_zeros"], self.levels)


@dataclass(frozen=True)
class BnbInt8:
    method: ClassVar[str] = "llm_int8"
    bits: ClassVar[int] = 8
    threshold: float = 6.0
    skip: tuple[str, ...] = DEFAULT_SKIP

    def supports(self, lin: nn.Linear, device: torch.device) -> bool:
        return True

    def pieces(self) -> tuple[str, ...]:
        return ("weight", "SCB")

    def make(self, lin: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        _quiet_cast_warning()
        return bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, lin.bias is not None,
                                   has_fp16_weights=False, threshold=self.threshold)

    def quantize(self, w: torch.Tensor) -> Pieces:
        import bitsandbytes as bnb

        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
        return {"weight": cb, "SCB": scb}

    def install(self, module: nn.Module, p: Pieces, device: torch.device, dtype: torch.dtype) -> None:
        import bitsandbytes as bnb

        cb = aligned(p["weight"].to(device))
        module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False,
                                          CB=cb, SCB=aligned(p["SCB"].to(device)))

    def dequantize(self, p: Pieces) -> torch.Tensor:
        return p["weight"].float() * p["SCB"].float()[:, None] / 127


@dataclass(frozen=True)
class BnbInt4:
    bits: ClassVar[int] = 4
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    skip: tuple[str, ...] = DEFAULT_SKIP

    @property
    def method(self) -> str:
        return self.quant_type

    def supports(self, lin: nn.Linear, device: torch.device) -> bool:
        # bitsandbytes' CPU kernel repacks weights in blocks: in % 64, out % 32 (NOTES.md).
        return device.type != "cpu" or (lin.in_features % 64 == 0 and lin.out_features % 32 == 0)

    def pieces(self) -> tuple[str, ...]:
        nested = ("weight.nested_absmax", "weight.nested_quant_map") if self.double_quant else ()
        return ("weight", "weight.absmax", "weight.quant_map", *nested,
                f"weight.quant_state.bitsandbytes__{self.quant_type}")

    def make(self, lin: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None,
                                 compute_dtype=getattr(torch, self.compute_dtype),
                                 compress_statistics=self.double_quant, quant_type=self.quant_type,
                                 quant_storage=torch.uint8)

    def quantize(self, w: torch.Tensor) -> Pieces:
        import bitsandbytes as bnb

        packed, state = bnb.functional.quantize_4bit(
            w.contiguous(), blocksize=self.blocksize, compress_statistics=self.double_quant,
            quant_type=self.quant_type, quant_storage=torch.uint8)
        return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}

    def install(self, module: nn.Module, p: Pieces, device: torch.device, dtype: torch.dtype) -> None:
        import bitsandbytes as bnb

        stats = {k[len("weight."):]: v for k, v in p.items() if k != "weight"}
        module.weight = bnb.nn.Params4bit.from_prequantized(aligned(p["weight"]), stats, requires_grad=False,
                                                            device=device, module=module)

    def dequantize(self, p: Pieces) -> torch.Tensor:
        import bitsandbytes as bnb

        stats = {k[len("weight."):]: v for k, v in p.items() if k != "weight"}
        state = bnb.functional.QuantState.from_dict(stats, device=p["weight"].device)
        return bnb.functional.dequantize_4bit(p["weight"], state).float()


class _DropCastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_cast_warning() -> None:
    """bitsandbytes logs this on every LLM.int8 matmul of bf16/fp32 input: the cast to fp16 is how
    LLM.int8 quantizes activations, not news. Dropped by one filter on that logger, once."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastWarning) for f in log.filters):
        log.addFilter(_DropCastWarning())


Scheme = Int8 | Int4 | BnbInt8 | BnbInt4
SCHEMES: dict[str, Callable[..., Scheme]] = {
    "int8": Int8, "int4": Int4, "llm_int8": BnbInt8,
    "nf4": lambda **kw: BnbInt4(quant_type="nf4", **kw),
    "fp4": lambda **kw: BnbInt4(quant_type="fp4", **kw),
}


def resolve_scheme(spec: str | Mapping | None) -> Scheme | None:
    """A scheme from a name ("int8", "8bit", "nf4", ...) or a config.json dict; None = no quantization."""
    if spec is None or spec == "none":
        return None
    params = dict(spec) if isinstance(spec, Mapping) else {"method": spec}
    method = str(params.pop("method", ""))
    method = ALIASES.get(method, method)
    if method not in SCHEMES:
        raise ValueError(f"unknown quantization {method!r}; use one of "
                         f"{', '.join([*SCHEMES, *ALIASES])}")
    params.pop("quant_type", None)  # implied by the method name
    if method == "int4" and "modules" in params:
        # a pre-quantized checkpoint's record (our tools write none for int4); one without
        # "levels" predates the choice and holds even ones
        params.setdefault("levels", "uniform")
    params.pop("modules", None)  # which modules a pre-quantized checkpoint holds: the loader reads it
    if "skip" in params:
        params["skip"] = tuple(params["skip"])
    try:
        return SCHEMES[method](**params)
    except TypeError as e:
        raise ValueError(f"quantization {method!r}: bad parameters {sorted(params)} ({e})") from None


def scheme_of(method: str, group: int = 0, levels: str = "") -> Scheme:
    """The scheme of a quantized module from what it records: its method, int4 group size and
    levels (0 and "": the scheme's defaults)."""
    return resolve_scheme({"method": method, **({"group_size": group} if group else {}),
                           **({"levels": levels} if levels else {})})


def scheme_config(scheme: Scheme, modules: list[str] | None = None) -> dict:
    """What config.json records: method, parameters and (pre-quantized) the modules quantized."""
    d = {"method": scheme.method, **dataclasses.asdict(scheme)}
    d.pop("quant_type", None)
    d["skip"] = list(scheme.skip)
    if modules is not None:
        d["modules"] = sorted(modules)
    return d


def quantizable(model: nn.Module, scheme: Scheme, device_of: Callable[[str], torch.device]) -> list[str]:
    """Names of the Linear modules `scheme` quantizes, given where each module will run."""
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if any(name == s or name.startswith(s + ".") for s in scheme.skip):
            continue
        if scheme.supports(mod, device_of(name)):
            names.append(name)
    return names


def swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module], names: list[str]) -> None:
    """Replace each named nn.Linear by make(linear), built on the meta device (no memory)."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        with torch.device("meta"):
            setattr(parent, leaf, make(getattr(parent, leaf)))


def quantize_state_dict(sd: Mapping[str, torch.Tensor], scheme: Scheme, modules: list[str]) -> Pieces:
    """Our-name state dict with each listed module's `weight` replaced by the scheme's pieces."""
    wanted, out = set(modules), {}
    for name, t in sd.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in wanted:
            out.update({f"{module}.{k}": v for k, v in scheme.quantize(t).items()})
        else:
            out[name] = t
    return out
