"""Which CPU kernel serves each weight, decided by timing the candidates on this machine, once.

For every (module kind, dtype, shape) the candidates of model/kernels.py are timed on synthetic
weights of that shape at decode-sized inputs (1, 2 and 8 rows: kernels.candidates) and a
prefill-sized one (512 rows: kernels.prefill_candidates), in alternating rounds, medians. The
winner, a decode kernel and a prefill one that one module can hold together (kernels.compose),
minimises the time of 16 decode steps at batch 1 and at batch 2 (the CLI's CPU batch), 4 at batch
8 (a caption batch of mixed sizes, decoded together) and a 1,024-token prefill
(16·t₁ + 16·t₂ + 4·t₈ + 2·t₅₁₂; the LM head, which generation only runs on one position per row,
without the prefill term). Choices are remembered per (CPU model, torch version,
thread count) in $XDG_CACHE_HOME/fuyu/ (default ~/.cache/fuyu/), so only the first load on a machine
pays for the timing (about 2 s for a model's five weight shapes on a 2-core Xeon, about 2.4 s on
a 2-core AVX2-only EPYC, whose 16-bit prefill GEMMs alone take 60 ms a call).

The compiled GEMV (kernels.gemv) needs an inductor compile, up to ~30 s the first time on a
machine and ~3 s in each new process, so it is timed only in "tune" mode (`FUYU_KERNELS=tune`);
later "auto" loads use what tuning found. `FUYU_KERNELS=plain` (or kernels="plain") turns it all off.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fuyu.model import kernels
from fuyu.model.quantize import Int8Linear
from fuyu.model.settings import Settings

MODES = ("auto", "plain", "tune")
# The prefill size is a real prompt's (a 640×480 image is ~400 tokens): at 128 rows torch's int8
# kernel beat the dequantized GEMM (164 vs 184 ms, 12288×4096), at 512 it is 2.5× slower (564 vs
# 228 ms; 2-core AMD EPYC family 26 model 2), and an 8B int8 prefill of 1,090 tokens ran for minutes
ROWS = (1, 2, 8, 512)
PREFILL_ROWS = ROWS[-1]  # decode steps at batch 1, 2 and 8, a prefill-sized input
# What a choice minimises: the time of 16 decode steps at batch 1 and 2, 4 at batch 8 and a
# 1,024-token prefill. The LM head only ever sees one position per row in generation, so its
# prefill time does not count.
WEIGHTS = {"layer": (16, 16, 4, 2), "head": (16, 16, 4, 0)}
SKIP = ("vision_embed_tokens",)  # once per prefill: not worth timing
# Decode-sized calls cycle through distinct weight copies adding up to more than the last-level
# cache, so they time reads from memory, as a decode step's are; not less than this:
POOL_BYTES = 128 << 20
MAX_POOL_BYTES = 320 << 20
MAX_TIMED_ELEMENTS = 1 << 25  # a bigger weight (the LM head) is timed on a slice of its rows
ROUNDS = 2
NOISY = 1.0
CPU_SHARE = 0.7
CACHED_BYTES = 1 << 20  # smaller weights stay in the CPU caches in use too: one copy is timed
# Decode calls per measurement, taken in turn around the pool (so each copy is cold when its turn
# comes again): all 21-24 copies of a layer shape made tuning ~6 s on a CPU whose 16-bit F.linear
# is slow (2-core AVX2-only AMD EPYC), for no better a choice.
CALLS = 6
GEMV_MIN_ELEMENTS = 1 << 24  # the compiled GEMV is for the LM head; small weights never gain
FORMAT = 4  # 3: native serves up to 8 rows (no longer spilling on AVX2), +f32 prefills, 8-row timings;
# 4: prefill timed at 512 rows


def mode(kernels_arg: str | None = None) -> str:
    """The kernel mode: the argument, else $FUYU_KERNELS, else "auto"."""
    value = kernels_arg or Settings.from_environment().kernels or "auto"
    if value not in MODES:
        raise ValueError(f"kernels={value!r}: use one of {', '.join(MODES)}")
    return value


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cache_file() -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", cpu_model()).strip("-")
    return Settings.from_environment().cache_dir / f"kernels-{slug}-torch{torch.__version__}.json"


def key(module: nn.Module, name: str = "") -> str:
    """What a timing is valid for: module kind, dtype, shape, bias, role (the LM head is timed
    for decoding only), torch's thread count."""
    kind = "int8" if isinstance(module, Int8Linear) else "linear"
    if isinstance(module, Int8Linear):
        dtype = module.scales.dtype
    else:  # a plain Linear, or one a kernel serves (a packed one keeps no plain weight)
        dtype = (module.blocks[0] if isinstance(module, kernels.PackedLinear) else module.weight).dtype
    bias = "+bias" if module.bias is not None else ""
    role = " head" if name == "lm_head" else ""
    return (f"{kind} {str(dtype).removeprefix('torch.')} {module.out_features}x{module.in_features}"
            f"{bias}{role} threads={torch.get_num_threads()}")


def load_choices(path: Path | None = None) -> dict:
    path = path or cache_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = data.get("format") == FORMAT and data.get("torch") == torch.__version__
    return data.get("entries", {}) if ok else {}


def save_choices(entries: dict, path: Path | None = None) -> None:
    """Write atomically; a read-only or missing home only costs re-timing next time."""
    path = path or cache_file()
    data = {"format": FORMAT, "cpu": cpu_model(), "torch": torch.__version__, "entries": entries}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def choose(model: nn.Module, kernels_arg: str | None = None, path: Path | None = None,
           entries: dict | None = None) -> dict:
    """Time what is not yet known (nothing, given the `entries` time_ahead returned for this
    model), swap the winners in; returns the report (see `report`)."""
    how = mode(kernels_arg)
    if how == "plain":
        kernels.restore_plain(model)
        return report(model, {})
    # names, not modules: a module held here would keep its plain weight alive once repacked
    names = {name for name, m in model.named_modules() if kernels.eligible(m) and not name.startswith(SKIP)}
    entries = _timed({name: model.get_submodule(name) for name in names}, how, path, entries)
    kernels.apply(model, lambda name, m: entries[key(m, name)]["kernel"] if name in names else None)
    return report(model, entries)


def time_ahead(model: nn.Module, dtype: torch.dtype, kernels_arg: str | None = None,
               path: Path | None = None) -> dict:
    """The timings `choose` needs for `model`, a model on the meta device whose weights are still
    to be read as `dtype`, taken now: the timing's synthetic weights (a few hundred MB) come and
    go while memory is free, before the weights fill it. {} in plain mode."""
    how = mode(kernels_arg)
    if how == "plain":
        return {}
    shapes = {}  # one module of each kind, shape and role: what a timing is keyed by
    for name, m in model.named_modules():
        if type(m) in (nn.Linear, Int8Linear) and not name.startswith(SKIP):
            shapes.setdefault((type(m), m.out_features, m.in_features, m.bias is not None, name == "lm_head"), name)
    return _timed({name: _stand_in(model.get_submodule(name), dtype) for name in shapes.values()}, how, path)


def planned(model: nn.Module, name: str, dtype: torch.dtype, entries: dict) -> str | None:
    """The kernel `entries` (from time_ahead) give meta-device module `name`, or None."""
    entry = entries.get(key(_stand_in(model.get_submodule(name), dtype), name))
    return entry and entry["kernel"]


def _stand_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A CPU module of `module`'s kind, shape and dtype whose tensors are allocated but never
    touched (no memory is committed): what key() and the candidates look at."""
    N, K = module.out_features, module.in_features
    if isinstance(module, Int8Linear):
        m = Int8Linear(K, N, module.bias is not None)
        m.weight, m.scales = torch.empty(N, K, dtype=torch.int8), torch.empty(N, dtype=dtype)
        m.bias = None if module.bias is None else torch.empty(N, dtype=dtype)
        return m
    with torch.device("meta"):
        m = nn.Linear(K, N, bias=module.bias is not None)
    m.weight = nn.Parameter(torch.empty(N, K, dtype=dtype), requires_grad=False)
    if module.bias is not None:
        m.bias = nn.Parameter(torch.empty(N, dtype=dtype), requires_grad=False)
    return m


def _timed(modules: dict, how: str, path: Path | None, entries: dict | None = None) -> dict:
    """Choices for every module's key: the given entries, the cached ones, and for the rest new
    timings (remembered unless noisy)."""
    entries = {**load_choices(path), **(entries or {})}
    todo = {}
    for name, m in modules.items():
        k, tune = key(m, name), how == "tune" and "gemv" in _candidates(m, True)
        if k not in entries or (tune and not entries[k].get("tuned")):
            todo.setdefault(k, (m, name == "lm_head"))
    if todo:
        for k, (m, head) in todo.items():
            entries[k] = measure(m, tune=how == "tune", head=head)
        save_choices({k: e for k, e in entries.items() if not e.get("noisy")}, path)
    return entries


def report(model: nn.Module, entries: dict) -> dict:
    """{weight key: {"kernel": picked, "modules": how many, "ms": {kernel: [ms at each of ROWS]}}};
    a key's "ms" is empty when nothing was timed (plain mode). Times are for the timed slice."""
    out: dict = {}
    for name, kernel in kernels.in_use(model).items():
        m = model.get_submodule(name)
        k = key(m, name)
        row = out.setdefault(k, {"kernel": kernel, "modules": 0, "ms": entries.get(k, {}).get("ms", {})})
        row["modules"] += 1
    return out


def _candidates(module: nn.Module, tune: bool) -> list[str]:
    names = kernels.candidates(module)
    if "gemv" in names and not (tune and module.weight.numel() >= GEMV_MIN_ELEMENTS):
        names.remove("gemv")
    return names


def measure(module: nn.Module, tune: bool = False, head: bool = False) -> dict:
    """Time each candidate kernel for `module`'s shape and dtype on synthetic weights: decode
    kernels at the decode sizes, prefill kernels at the prefill size; pick the best pair."""
    weights = WEIGHTS["head" if head else "layer"]
    decode = _candidates(module, tune)
    prefill = kernels.prefill_candidates(module) if weights[-1] else []
    names = list(dict.fromkeys(decode + prefill))
    rows = min(module.out_features, max(1, MAX_TIMED_ELEMENTS // module.in_features))
    nbytes = rows * module.in_features * _itemsize(module)
    copies = 1 if nbytes < CACHED_BYTES else max(1, min(24, pool_bytes() // nbytes))
    reps = 1 if nbytes >= CACHED_BYTES else 20  # calls per measurement: µs calls jitter alone
    pool = _synthetic(module, rows, copies)
    served = {name: [kernels.use(_clone_plain(m), name) for m in pool] for name in names}
    dtype = _act_dtype(module)
    xs = {M: torch.randn(M, module.in_features).to(dtype) for M, w in zip(ROWS, weights) if w}
    times: dict = {name: {M: [] for M in xs if name in (prefill if M == PREFILL_ROWS else decode)}
                   for name in names}
    wall, cpu, turn = time.perf_counter(), time.process_time(), 0
    with torch.inference_mode():
        for r in range(ROUNDS + 1):  # round 0 warms up
            for name in names:
                for M in times[name]:
                    if not r:  # a warm-up call (builds, compiles, first-touch allocations)
                        mods = served[name][:1]
                    elif M < PREFILL_ROWS:
                        mods = [served[name][(turn + i) % copies] for i in range(min(CALLS, copies))] * reps
                        turn += len(mods)
                    else:
                        mods = served[name][:1] * reps
                    start = time.perf_counter()
                    for m in mods:
                        m(xs[M])
                    if r:
                        times[name][M].append((time.perf_counter() - start) / len(mods))
    ms = {name: [round(statistics.median(t[M]) * 1e3, 4) if M in t else None for M in ROWS]
          for name, t in times.items()}

    def objective(d: str, p: str | None, r: int | None = None) -> float:
        """Weighted time of decode kernel d and prefill kernel p, median or in round r."""
        at = (lambda n, M: statistics.median(times[n][M])) if r is None else (lambda n, M: times[n][M][r])
        return sum(w * at(p if M == PREFILL_ROWS else d, M) for w, M in zip(weights, ROWS) if w)

    pairs = {}  # kernel name: (decode, prefill)
    for d in decode:
        for p in prefill or [None]:
            k = d if p is None else kernels.compose(d, p)
            if k is not None and (k not in pairs or objective(d, p) < objective(*pairs[k])):
                pairs[k] = (d, p)
    best = min(pairs, key=lambda k: objective(*pairs[k]))
    # Another process on our cores: a choice's objective differs between rounds by more than
    # NOISY, or our threads got less than CPU_SHARE of the CPU time they could have had (another
    # process whose OpenMP threads spin makes every call wait a scheduler time slice, alike for
    # every kernel). The choice then serves this load but is not remembered: a quieter load times again.
    share = (time.process_time() - cpu) / ((time.perf_counter() - wall) * torch.get_num_threads())
    per_round = [[objective(*pair, r) for r in range(ROUNDS)] for pair in pairs.values()]
    spread = max((max(o) - min(o)) / max(min(o), 1e-9) for o in per_round)
    return {"kernel": best, "ms": ms, "tuned": tune, "timed_rows": rows, "cpu_share": round(share, 2),
            "noisy": spread > NOISY or share < CPU_SHARE}


def pool_bytes() -> int:
    """1.25 × the last-level cache (sysfs), within [POOL_BYTES, MAX_POOL_BYTES]."""
    llc = 0
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            size = (index / "size").read_text().strip()
            llc = max(llc, int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]])
        except (OSError, ValueError, KeyError):
            continue
    return max(POOL_BYTES, min(MAX_POOL_BYTES, llc * 5 // 4))


def _itemsize(module) -> int:
    return module.weight.element_size()


def _act_dtype(module) -> torch.dtype:
    return module.scales.dtype if isinstance(module, Int8Linear) else module.weight.dtype


def _synthetic(module: nn.Module, rows: int, copies: int) -> list[nn.Module]:
    """`copies` independent modules like `module` with `rows` output rows of random weights,
    filled by repeating a small random block (fast; kernel speed does not depend on the values)."""
    K = module.in_features
    n = rows * K
    block = torch.randn(min(n, 1 << 16)).to(_act_dtype(module))
    pool = block.repeat(-(-n * copies // block.numel()))
    out = []
    for i in range(copies):
        flat = pool[i * n:(i + 1) * n]
        if isinstance(module, Int8Linear):
            m = Int8Linear(K, rows, module.bias is not None)
            m.weight = (flat.reshape(rows, K).float() * 40).clamp(-127, 127).to(torch.int8)
            m.scales = torch.full((rows,), 0.01, dtype=module.scales.dtype)
            m.bias = None if module.bias is None else torch.zeros(rows, dtype=module.scales.dtype)
        else:
            with torch.device("meta"):
                m = nn.Linear(K, rows, bias=module.bias is not None)
            m.weight = nn.Parameter(flat.reshape(rows, K).to(module.weight.dtype), requires_grad=False)
            if module.bias is not None:
                m.bias = nn.Parameter(torch.zeros(rows, dtype=module.weight.dtype), requires_grad=False)
        out.append(m)
    return out


def _clone_plain(m: nn.Module) -> nn.Module:
    """Each kernel wraps the same plain copy (packing makes its own); int8 kernels set a flag on
    the module, so each gets a shallow copy."""
    return copy.copy(m) if isinstance(m, Int8Linear) else m
