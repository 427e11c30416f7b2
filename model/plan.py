"""The CPU kernel plan: which kernel serves the decoder layers' Linears and which the LM head,
chosen as a whole by timing on this machine, once per CPU, torch version and model shape.

A plan names two kernels (model/kernels.py): one for every decoder layer's four Linears, one for
the LM head. What counts is a whole decode step, not one Linear at a time: where the layers'
kernel is "native", a decode step runs every layer in one call of our C kernels (the CPU
backend, model/backend.py) with nothing in between, and a per-Linear timing cannot see that
(at mid size on an AVX-512 AMD EPYC oneDNN's packed GEMV won some per-call timings, and the
per-Linear choice left the fused step 30% faster unused).

So each candidate for the layers is timed as decode steps of a stand-in model of the real layer
shapes (model/fuyu.py's own Block, the real decode step, the candidate's kernels), with as many
layers as make its weights outweigh the CPU caches (one at Fuyu-8B's size: 402 MB a layer), at
batch 1, 2 and 8; its prefill half as one layer-sized GEMM at a real prompt's 512 rows. The
head's candidates are timed as calls on a slice of its rows. The weighted sum kept is 16 decode
steps at batch 1 and at batch 2 (the CLI's CPU batch), 4 at batch 8 (a caption batch of mixed
sizes, decoded together) and a 1,024-token prefill (16·t₁ + 16·t₂ + 4·t₈ + 2·t₅₁₂ per layer; the
head, which generation runs on one position per row, without the prefill). The timing runs
before the checkpoint's weights are read, on synthetic weights (~1 s at mid size, ~3 s at 8B).

The choice is remembered in $XDG_CACHE_HOME/fuyu/plans.json under a key made of what really
differs between machines and models: the CPU's feature flags (two CPUs both named "AMD EPYC"
differ in AVX-512 and bf16 instructions), torch's version and thread count, our C kernels'
sources, and the model's shapes, dtype and quantization. A cached plan is checked against what is offered now: a plan
naming the native kernels where they cannot be had (FUYU_NATIVE=0, no compiler) falls back to
the best of its other timed candidates, or to oneDNN's packed kernel.

Modes (settings.kernels, $FUYU_KERNELS): "auto" (timed, cached), "plain" (no swap: nn.Linear and
the quantized modules' own kernels), or a fixed plan for both parts, "native", "native+w8a8"
(int8 layers' prefill on 8-bit inputs; "native" elsewhere), "packed" or "linear" (where a part
cannot have it, its plain kernel), without timing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fuyu.model import kernels, native
from fuyu.model.native import build as native_build
from fuyu.model.quantize import Int4Linear, Int8Linear
from fuyu.model.settings import Settings

MODES = ("auto", "plain", "native", "native+w8a8", "packed", "linear")
FORMAT = 3  # of the cache file's entries: a change of what is timed times again
ROWS = (1, 2, 8)  # decode batches timed
PREFILL_ROWS = 512  # a real prompt's size (a 640×480 image is ~400 tokens): at 128 rows torch's
# int8 kernel beat the dequantized GEMM, at 512 it is 2.5× slower (2-core AMD EPYC family 26)
STEPS = {1: 16, 2: 16, 8: 4}  # decode steps weighed per batch size
PREFILL_WEIGHT = 2  # 512-row prefills weighed (a 1,024-token prefill)
SKIP = ("vision_embed_tokens",)  # once per prefill: not worth a kernel of its own
MIN_STACK_BYTES = 128 << 20  # the stand-in's layers outweigh the last-level cache
HEAD_SLICE_BYTES = 192 << 20  # the head is timed on a slice of its rows this big (or whole)
STEPS_PER_ROUND, ROUNDS = 2, 5  # decode steps timed per round; rounds (the first warms up): with
# two timed rounds a slow spell over both once put int8's batch-8 step at 2.6x its time at 8B
# and chose torch's int8 kernel, 1.6x slower at batch 1
BIG_LAYER_BYTES = 64 << 20  # a layer this big is timed one step a round (Fuyu-8B's: 402 MB)
PREFILL_ROUNDS = 4  # the prefill GEMMs' rounds (the first warms up): the score's largest term at 8B
# Each candidate keeps its fastest round: interference from elsewhere only ever slows a call, and
# a median of two or three rounds let one slow round pick the wrong plan (seen at 8B).
CPU_SHARE = 0.7  # our threads got less of the CPU than this: another process ran, not cached


@dataclass(frozen=True)
class Plan:
    """The kernels of one model: `layers` for every decoder layer's Linears, `head` for the LM
    head. how: "timed" (now), "cached", "fixed" (a mode naming it), "fallback" (a cached or fixed
    plan named a kernel not offered here) or "plain". timings: what was measured, per part and
    candidate: {"layers": {kernel: {"ms": [t1, t2, t8, t512], "score": ms}}, "head": {...}}."""

    layers: str
    head: str
    how: str = "timed"
    timings: dict = field(default_factory=dict, compare=False)

    def kernel(self, name: str) -> str | None:
        """The kernel for module `name` (None: the vision projection, left as it is)."""
        if name.startswith(SKIP):
            return None
        return self.head if name == "lm_head" else self.layers

    @property
    def fused(self) -> bool:
        """Whether decode steps run every layer in one C call (the backend's step)."""
        return self.layers == "native" or self.layers.startswith("native+")

    def describe(self) -> str:
        return f"layers {self.layers}, head {self.head} ({self.how})"


PLAIN = Plan("plain", "plain", "plain")


def mode(settings: Settings | None = None, kernels_arg: str | None = None) -> str:
    """The kernel mode: the argument, else settings.kernels ($FUYU_KERNELS), else "auto"."""
    settings = settings or Settings.from_environment()
    value = kernels_arg or settings.kernels or "auto"
    if value not in MODES:
        raise ValueError(f"kernels={value!r}: use one of {', '.join(MODES)}")
    return value


# --- what a model is, as far as kernels care --------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """A model as the plan sees it: the layers' and head's weight kind ("float", "int8", "int4"),
    dtype, int4 group and levels, and the dimensions the kernels run at."""

    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int
    dtype: torch.dtype
    layer_kind: str
    head_kind: str
    group: int = 0
    levels: str = ""

    @classmethod
    def of(cls, model: nn.Module, dtype: torch.dtype) -> Shape:
        """Of a Fuyu (on the meta device or loaded) whose float weights are, or will be, `dtype`."""
        cfg = model.config
        layer = model.layers[0].self_attn.query_key_value if len(model.layers) else None
        int4 = layer is not None and kernels.kind(layer) == "int4"
        group, levels = (getattr(layer, "group", 0), getattr(layer, "levels", "")) if int4 else (0, "")
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                   cfg.vocab_size, dtype, "float" if layer is None else kernels.kind(layer),
                   kernels.kind(model.lm_head), group, levels)

    def key(self) -> str:
        """What a timing is valid for: the CPU's feature flags, torch, threads, our C kernels'
        sources (a plan timed on other kernels is not this one), this shape."""
        fields = dataclasses.asdict(self)
        fields["dtype"] = str(self.dtype).removeprefix("torch.")
        what = json.dumps({"cpu": native_build.cpu_flags(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "kernels": native_build.source_digest(),
                           "model": fields}, sort_keys=True)
        return hashlib.sha256(what.encode()).hexdigest()[:20]

    def layer_bytes(self) -> int:
        D, I = self.hidden, self.intermediate
        per = {"float": self.dtype.itemsize, "int8": 1, "int4": 0.5}[self.layer_kind]
        return int(D * (4 * D + 2 * I) * per)


def candidates(shape: Shape, part: str, settings: Settings) -> list[str]:
    """The kernels that can serve a part ("layers" or "head") of a model of `shape` here."""
    kind = shape.layer_kind if part == "layers" else shape.head_kind
    N_K = ([(3 * shape.hidden, shape.hidden), (shape.hidden, shape.hidden), (shape.intermediate, shape.hidden),
            (shape.hidden, shape.intermediate)] if part == "layers" else [(shape.vocab, shape.hidden)])
    has_native = native.available(settings) and shape.dtype in native.DTYPE
    if kind != "float":
        ok = has_native and all(kernels.NativeQuantLinear.serves(kind, n, k, shape.group) for n, k in N_K)
        torch_kernels = ["int8+dequant", "int8"] if kind == "int8" else ["int4"]
        if ok and kind == "int4" and shape.levels == "normal":
            return ["native"]  # torch's int4 kernel takes even levels only: it would upcast per call
        if part == "head":
            torch_kernels = torch_kernels[-1:]  # one position per row: never prefill-sized
        native_kernels = list(kernels.NATIVE_QUANT) if kind == "int8" and part == "layers" else ["native"]
        return (native_kernels if ok else []) + torch_kernels
    wide = shape.dtype in (torch.bfloat16, torch.float16)
    out = []
    if has_native:
        out += ["native", "native+f32"] if wide and part == "layers" else ["native"]
    if kernels.can_pack(torch.empty(0, dtype=shape.dtype)):
        out.append("packed")
    return out + (["linear", "linear+f32"] if wide and part == "layers" else ["linear"])


def fixed(shape: Shape, how: str, settings: Settings) -> Plan:
    """The plan a fixed mode names, each part on its plain kernel where it cannot have it
    ("native+w8a8" where it cannot: "native", as for the head and 16-bit or int4 weights)."""
    def pick(part):
        offered = candidates(shape, part, settings)
        for kernel in (how, how.partition("+")[0]):
            if kernel in offered:
                return kernel
        return offered[-1]
    return Plan(pick("layers"), pick("head"), "fixed")


def fall_back(plan: Plan, shape: Shape, settings: Settings) -> Plan:
    """`plan` where every kernel it names is offered here; else each part gets the best timed
    candidate that is (its timings), or the first offered one, and `how` says "fallback"."""
    parts = {}
    for part in ("layers", "head"):
        offered = candidates(shape, part, settings)
        chosen = getattr(plan, part)
        if chosen not in offered:
            timed = plan.timings.get(part, {})
            ok = sorted((t["score"], k) for k, t in timed.items() if k in offered)
            chosen = ok[0][1] if ok else _default(offered)
        parts[part] = chosen
    if (parts["layers"], parts["head"]) == (plan.layers, plan.head):
        return plan
    return Plan(parts["layers"], parts["head"], "fallback", plan.timings)


def _default(offered: list[str]) -> str:
    return next((k for k in ("packed", "int8+dequant", "int4") if k in offered), offered[-1])


# --- choosing -----------------------------------------------------------------------------------

def choose(shape: Shape, settings: Settings, kernels_arg: str | None = None, path: Path | None = None) -> Plan:
    """The plan for a model of `shape`: fixed by the mode, cached, or timed now (and cached unless
    another process was using our CPUs), checked against what is offered here."""
    how = mode(settings, kernels_arg)
    if how == "plain":
        return PLAIN
    if how != "auto":
        return fixed(shape, how, settings)
    path = path or cache_file(settings)
    cached = load(path).get(shape.key())
    if cached is not None:
        return fall_back(Plan(cached["layers"], cached["head"], "cached", cached["timings"]), shape, settings)
    plan, quiet = time_plans(shape, settings)
    if quiet:
        save(path, shape.key(), plan)
    return plan


def cache_file(settings: Settings) -> Path:
    return settings.cache_dir / "plans.json"


def load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if data.get("format") == FORMAT else {}


def save(path: Path, key: str, plan: Plan) -> None:
    """Add one entry, atomically; a read-only or missing home only costs timing again next time."""
    entries = {**load(path), key: {"layers": plan.layers, "head": plan.head, "timings": plan.timings}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def apply(model: nn.Module, plan: Plan) -> dict[str, str]:
    """Swap every Linear for its plan's kernel (model/kernels.py); {module: kernel} swapped."""
    if plan.how == "plain":
        kernels.restore_plain(model)
        return {}
    return kernels.apply(model, lambda name, m: plan.kernel(name))


# --- timing -------------------------------------------------------------------------------------

class _Clock:
    """Times timed calls, and what share of the CPU time our threads could have had they got:
    another process on our cores (whose OpenMP threads spin, say) shows as a low share, and
    makes every candidate wait alike."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.took = time.perf_counter() - self._wall
        self.wall += self.took
        self.cpu += time.process_time() - self._cpu

    @property
    def share(self) -> float:
        return self.cpu / max(self.wall * torch.get_num_threads(), 1e-9)


def time_plans(shape: Shape, settings: Settings) -> tuple[Plan, bool]:
    """Time every candidate of both parts; the fastest of each, and whether the CPU was ours
    alone while the candidates ran (else the plan serves this load but is not cached)."""
    clock = _Clock()
    timings = {"layers": _time_layers(shape, settings, clock), "head": _time_head(shape, settings, clock)}
    best = {part: min(t, key=lambda k: t[k]["score"]) for part, t in timings.items()}
    return Plan(best["layers"], best["head"], "timed", timings), clock.share >= CPU_SHARE


def _score(ms: list[float | None], prefill: bool = True) -> float:
    decode = sum(STEPS[b] * t for b, t in zip(ROWS, ms))
    return round(decode + (PREFILL_WEIGHT * ms[len(ROWS)] if prefill and ms[len(ROWS)] is not None else 0), 3)


def _time_layers(shape: Shape, settings: Settings, clock: _Clock) -> dict:
    """{candidate: {"ms": [per-layer decode step at each of ROWS, per-layer 512-row prefill],
    "score"}}: decode halves timed once each on a stand-in model, prefill halves on one GEMM."""
    offered = candidates(shape, "layers", settings)
    decode = {k: _decode_half(k) for k in offered}
    prefill = {k: _prefill_half(shape, k) for k in offered}
    step_ms = _time_steps(shape, list(dict.fromkeys(decode.values())), settings, clock)
    gemm_ms = _time_prefill(shape, list(dict.fromkeys(prefill.values())), clock)
    out = {}
    for k in offered:
        ms = [*step_ms[decode[k]], gemm_ms[prefill[k]]]
        out[k] = {"ms": [round(t, 4) for t in ms], "score": _score(ms)}
    return out


def _decode_half(kernel: str) -> str:
    return {"int8+dequant": "int8"}.get(kernel, kernel.partition("+")[0])


def _prefill_half(shape: Shape, kernel: str) -> str:
    if shape.layer_kind != "float":
        return {"native": "dense", "native+w8a8": "w8a8"}.get(kernel, kernel)
    return "f32" if kernel.endswith("+f32") else {"native": "linear"}.get(kernel, kernel)


def _synthetic(shape: tuple[int, ...], dtype: torch.dtype, one: bool = False) -> torch.Tensor:
    """A tensor of synthetic values (a random block repeated: kernel speed does not depend on the
    values; ones for LayerNorm weights)."""
    n = 1
    for d in shape:
        n *= d
    if one:
        return torch.ones(shape, dtype=dtype)
    block = torch.randn(1 << 16).mul_(0.02).to(dtype)
    return block.repeat(-(-n // block.numel()))[:n].view(shape)


def _linear(out_features: int, in_features: int, dtype: torch.dtype, bias: bool = True) -> nn.Linear:
    with torch.device("meta"):
        m = nn.Linear(in_features, out_features, bias=bias)
    m.weight = nn.Parameter(_synthetic((out_features, in_features), dtype), requires_grad=False)
    if bias:
        m.bias = nn.Parameter(_synthetic((out_features,), dtype), requires_grad=False)
    return m


def _pieces(kind: str, out_features: int, in_features: int, group: int) -> dict:
    """Synthetic quantized pieces of a weight (model/quantize.py's Int8/Int4 layouts): random
    integers, made as fast as _synthetic makes floats; no float weight quantized."""
    block = torch.randint(-127, 128, (1 << 16,), dtype=torch.int8)
    if kind == "int8":
        n = out_features * in_features
        return {"weight": block.repeat(-(-n // block.numel()))[:n].view(out_features, in_features),
                "scales": torch.full((out_features,), 2e-4)}
    n = out_features * in_features // 2
    nibbles = block.view(torch.uint8).repeat(-(-n // block.numel()))[:n].view(out_features, in_features // 2)
    sz = torch.tensor([2e-3, 0.0]).expand(in_features // group, out_features, 2).contiguous()
    return {"weight": nibbles, "scales_and_zeros": sz}


def _served(linear: nn.Linear, kind: str, group: int, kernel: str, pieces: dict | None = None,
            dtype: torch.dtype = torch.bfloat16, levels: str = "") -> nn.Module:
    """A synthetic `linear` (its weight may be on the meta device for quantized kinds) as the
    module kernel `kernel` makes of it for weights of `kind`: installed as loading would
    (model/quantize.py), then swapped (model/kernels.py). pieces: synthetic ones to share."""
    if kind == "float":
        return kernels.use(linear, kernel)
    from fuyu.model.quantize import scheme_of

    scheme = scheme_of(kind, group, levels)
    pieces = pieces or _pieces(kind, linear.out_features, linear.in_features, group)
    if kernel in kernels.NATIVE_QUANT:
        return kernels.NativeQuantLinear.from_pieces(kind, pieces, linear.bias, dtype, group, levels,
                                                     kernels.prefill_of(kernel))
    with torch.device("meta"):
        module = scheme.make(linear)
    scheme.install(module, pieces, torch.device("cpu"), dtype)
    module.bias = linear.bias
    return kernels.use(module, kernel)


def _stand_in(shape: Shape, n_layers: int, kernel: str, shared: dict):
    """A Fuyu of `shape` with n_layers layers and a small vocabulary, synthetic weights (made once
    in `shared` and shared by every stand-in), every decoder layer's Linears served by `kernel`."""
    from fuyu.model.config import FuyuConfig
    from fuyu.model.fuyu import Fuyu

    cfg = FuyuConfig(vocab_size=64, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                     num_hidden_layers=n_layers, num_attention_heads=shape.heads, eos_token_id=0,
                     image_token_id=1)
    with torch.device("meta"):
        model = Fuyu(cfg)
    quantized = shape.layer_kind != "float"
    for name, p in list(model.named_parameters()):
        module, _, leaf = name.rpartition(".")
        linear = name.startswith("layers.") and leaf == "weight" and p.dim() == 2
        if linear and quantized:
            continue  # as pieces, below
        if name not in shared:
            shared[name] = _synthetic(tuple(p.shape), shape.dtype, one=leaf == "weight" and p.dim() == 1)
        setattr(model.get_submodule(module), leaf, nn.Parameter(shared[name], requires_grad=False))
    for name, m in list(model.named_modules()):
        if name.startswith("layers.") and type(m) is nn.Linear:
            pieces = None
            if quantized:
                pieces = shared.setdefault(name + ".pieces", _pieces(shape.layer_kind, m.out_features,
                                                                     m.in_features, shape.group))
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf,
                    _served(m, shape.layer_kind, shape.group, kernel, pieces, shape.dtype, shape.levels))
    return model.eval()


def _time_steps(shape: Shape, decodes: list[str], settings: Settings, clock: _Clock) -> dict[str, list[float]]:
    """{decode kernel: per-layer ms of a decode step at each of ROWS}, every layer of a stand-in
    model served by that kernel. The stand-ins are built first and timed in turn, round after
    round, so that a drift of the machine's speed (the memory's read rate swings by 2x within
    minutes on these machines) falls on every candidate alike."""
    from fuyu.model import backend
    from fuyu.model.generate import decode_step, prefill

    n = max(1, min(shape.layers, -(-MIN_STACK_BYTES // max(1, shape.layer_bytes()))))
    steps = 1 if shape.layer_bytes() >= BIG_LAYER_BYTES else STEPS_PER_ROUND
    models, shared = {}, {}
    for d in decodes:
        models[d] = _stand_in(shape, n, d, shared)
        models[d].backend = backend.CpuBackend(settings)
    times: dict = {(d, B): [] for d in decodes for B in ROWS}
    with torch.inference_mode():
        for B in ROWS:
            ids = torch.full((B, 4), 2)
            state = {d: prefill(m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, steps * ROUNDS)
                     for d, m in models.items()}
            nxt = {d: logits.argmax(-1) for d, (_, logits) in state.items()}
            for r in range(ROUNDS):
                for d, m in models.items():
                    with clock:
                        for _ in range(steps):
                            nxt[d] = decode_step(m, state[d][0], nxt[d]).argmax(-1)
                    if r:
                        times[d, B].append(clock.took / steps)
            del state
    return {d: [min(times[d, B]) * 1e3 / n for B in ROWS] for d in decodes}


def _time_prefill(shape: Shape, hows: list[str], clock: _Clock) -> dict[str, float]:
    """{how: per-layer ms of a 512-row prefill's GEMMs}, how in "linear", "f32", "packed", "int8",
    "int8+dequant", "dense", "w8a8", "int4": timed on the layer's D×D GEMM, in turn, and scaled by the
    layer's FLOPs."""
    D = shape.hidden
    linear = _linear(D, D, shape.dtype)
    pieces = None if shape.layer_kind == "float" else _pieces(shape.layer_kind, D, D, shape.group)
    modules = {h: _served(linear, shape.layer_kind, shape.group,
                          {"f32": "linear+f32", "dense": "native", "w8a8": "native+w8a8"}.get(h, h),
                          pieces, shape.dtype, shape.levels) for h in hows}
    x = torch.randn(PREFILL_ROWS, D).to(shape.dtype)
    times: dict = {h: [] for h in hows}
    with torch.inference_mode():
        for r in range(PREFILL_ROUNDS):
            for h, module in modules.items():
                with clock:
                    module(x)
                if r:
                    times[h].append(clock.took)
    layer_flops = 4 * D + 2 * shape.intermediate  # qkv 3D + dense D + up I + down I, over D
    return {h: min(t) * 1e3 * layer_flops / D for h, t in times.items()}


def _time_head(shape: Shape, settings: Settings, clock: _Clock) -> dict:
    """{candidate: {"ms": [one call at each of ROWS, None], "score"}}, on a slice of the head's
    rows big enough to stream from memory, scaled to the whole head; candidates in turn, round
    after round (as _time_steps)."""
    offered = candidates(shape, "head", settings)
    per_row = shape.hidden * {"float": shape.dtype.itemsize, "int8": 1, "int4": 0.5}[shape.head_kind]
    rows = min(shape.vocab, max(64, int(HEAD_SLICE_BYTES // per_row)) // 64 * 64)
    quantized = shape.head_kind != "float"
    linear = _linear(rows, shape.hidden, shape.dtype, bias=False) if not quantized else \
        nn.Linear(shape.hidden, rows, bias=False, device="meta")
    pieces = _pieces(shape.head_kind, rows, shape.hidden, shape.group) if quantized else None
    modules = {k: _served(linear, shape.head_kind, shape.group, k, pieces, shape.dtype, shape.levels) for k in offered}
    times: dict = {(k, B): [] for k in offered for B in ROWS}
    with torch.inference_mode():
        for B in ROWS:
            x = torch.randn(B, shape.hidden).to(shape.dtype)
            for r in range(ROUNDS):
                for k, module in modules.items():
                    with clock:
                        module(x)
                    if r:
                        times[k, B].append(clock.took)
    out = {}
    for k in offered:
        ms = [min(times[k, B]) * 1e3 * shape.vocab / rows for B in ROWS]
        out[k] = {"ms": [round(t, 4) for t in ms] + [None], "score": _score(ms + [None], prefill=False)}
    return out


def report(model: nn.Module, plan: Plan) -> dict:
    """What `fuyu benchmark` prints: the plan, how it was chosen, the kernel of each weight shape
    in use, and the timings of the candidates it beat."""
    in_use: dict = {}
    for name, kernel in kernels.in_use(model).items():
        m = model.get_submodule(name)
        key = f"{m.out_features}x{m.in_features}" + (" head" if name == "lm_head" else "")
        in_use.setdefault(key, {"kernel": kernel, "modules": 0})["modules"] += 1
    return {"layers": plan.layers, "head": plan.head, "how": plan.how, "fused": plan.fused,
            "timings": plan.timings, "in_use": in_use}
