"""The memory a run will need, against what this process may really use, before a weight is read.

Need = the weights in the layouts the kernels keep them in (16-bit, int8, int4 …), the KV cache of
the largest batch (its longest prompt plus the new tokens, every row), the activations of the
largest prefill, and the process itself (Python, torch, the tokenizer, the loader's staging
block). What may be used = MemAvailable, capped by the cgroup's limit less what the cgroup already
holds (cgroup v2 `memory.max` / `memory.current`, v1 `memory.limit_in_bytes` /
`memory.usage_in_bytes`, minus its reclaimable page cache), as in containers and Slurm jobs; on a
GPU, `torch.cuda.mem_get_info`'s free bytes. A run whose need does not fit stops before loading
(the CLI prints one line and exits 2) instead of being killed half-way by the OOM killer.

Fuyu-8B (36 layers, hidden 4096, 262,144 words): weights 18.8 GB in 16-bit, 37.6 GB in float32,
~10.0 GB int8 (16-bit head and patch projection), ~5.8 GB int4; KV cache 0.5625 MiB a token in
16-bit, 1.3 GiB for a 1920×1080 screenshot (2,340 image tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# What the process holds besides weights, cache and activations: Python, torch and its libraries,
# the tokenizer, preprocessing of a batch, the loader's staging block. Measured: a plain-kernel
# `fuyu caption` of one 640×480 image with the 8B peaked 0.67 GB above its weights' 18.82 GB
# (2-core AMD EPYC, family 26 model 2, torch 2.13 CPU).
RUNTIME_BYTES = 800 << 20
SAFETY = 0.03  # of what is available, kept back for what the estimate does not see
FLOAT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
# safetensors dtype → bytes per element; floating tensors are cast to --dtype when loaded
STORED_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_IMAGE_TOKENS = 36 * (64 + 1)  # a 1920×1080 image (the largest Fuyu sees: bigger ones are
# downscaled to fit): 36 rows of 64 patches and a newline each
PROMPT_TOKENS = 64  # room for a prompt's text beside its image tokens, in the worst case


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


# --- what the process may use ---------------------------------------------------------------------

def meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes, or None where the kernel does not say (not Linux, no /proc)."""
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemAvailable":
                amount, _, unit = value.strip().partition(" ")
                return int(amount) * (1024 if unit.strip().lower() == "kb" else 1)
    except (OSError, ValueError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= 1 << 60 else value  # v1's "no limit" is a huge number


def _inactive_file(stat: Path) -> int:
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"),
                root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's cgroup may still take (its limit, or the tightest of its ancestors',
    less what the cgroup holds that cannot be reclaimed), or None where no limit applies."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one unified hierarchy
            base, limit, usage = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            base, limit, usage = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        parts = [p for p in path.strip().split("/") if p]
        for depth in range(len(parts), -1, -1):  # the cgroup itself, then each ancestor
            folder = base.joinpath(*parts[:depth])
            cap = _read_int(folder / limit)
            if cap is None:
                continue
            used = (_read_int(folder / usage) or 0) - _inactive_file(folder / "memory.stat")
            rooms.append(cap - max(0, used))
    return min(rooms) if rooms else None


def available(meminfo: Path = Path("/proc/meminfo"), proc_cgroup: Path = Path("/proc/self/cgroup"),
              cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of host memory this process may still take: MemAvailable capped by the cgroup's
    room; None where neither is known."""
    known = [v for v in (meminfo_available(meminfo), cgroup_room(proc_cgroup, cgroup_root)) if v is not None]
    return min(known) if known else None


def device_available(device) -> int | None:
    """Free bytes on a CUDA device (torch.cuda.mem_get_info), host memory for the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return available() if device.type == "cpu" else None


# --- what a run needs -------------------------------------------------------------------------------

def read_header(path: Path) -> dict:
    """A safetensors file's tensor entries ({name: {"dtype", "shape", "data_offsets"}})."""
    from fuyu.model.reader import read_header as read

    return read(path)[0]


def stored_tensors(ckpt: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """{checkpoint key: (stored dtype, shape, bytes)} from the shards' headers (no tensor read)."""
    from fuyu.model.weights import shard_files

    out = {}
    for shard in shard_files(ckpt):
        for key, info in read_header(shard).items():
            begin, end = info["data_offsets"]
            out[key] = (info["dtype"], tuple(info["shape"]), end - begin)
    return out


def quantized_bytes(method: str, shape: tuple[int, ...], dtype: str) -> int:
    """Bytes a (N, K) weight takes quantized by `method`, scales included."""
    N, K = shape
    scale = FLOAT_SIZES.get(dtype, 2)
    if method in ("int8", "llm_int8"):
        return N * K + N * 4
    if method == "int4":
        group = next(g for g in (128, 64, 32) if K % g == 0) if K % 32 == 0 else K
        return N * K // 2 + (K // group) * N * 2 * scale
    return N * K // 2 + (N * K // 64) * 4  # nf4 / fp4: 4-bit codes, one float32 absmax per 64


def weight_bytes(ckpt: Path, dtype: str, quantization: str | None = None,
                 skip: tuple[str, ...] | None = None) -> int:
    """Bytes the checkpoint's tensors take once loaded in `dtype` and, with `quantization`, every
    2-D Linear weight outside `skip` quantized: floating tensors scaled from their stored size,
    others (a pre-quantized checkpoint's) as stored. The CPU kernels' layouts (oneDNN's packed
    weights, the native GEMV's plain ones) take what the 16-bit weight takes."""
    from fuyu.model.quantize import ALIASES, DEFAULT_SKIP
    from fuyu.model.weights import to_local_key

    skip = DEFAULT_SKIP if skip is None else skip
    quantization = ALIASES.get(quantization, quantization)
    total = 0
    for key, (stored, shape, nbytes) in stored_tensors(ckpt).items():
        name = to_local_key(key) or key
        module = name.rpartition(".")[0]
        if (quantization and stored in FLOATS and name.endswith(".weight") and len(shape) == 2
                and not module.startswith(skip) and name != "embed_tokens.weight"):
            total += quantized_bytes(quantization, shape, dtype)
        elif stored in FLOATS:
            total += nbytes * FLOAT_SIZES[dtype] // STORED_SIZES[stored]
        else:
            total += nbytes
    return total


def model_bytes(model, dtype, quantized: dict[str, str] | None = None) -> int:
    """Bytes a meta-device model's parameters and buffers take once loaded: floating ones in
    `dtype` (a torch dtype), int8/packed ones as they are, and the weights of `quantized`
    modules ({name: method}) at that method's size (bitsandbytes modules hold float weights
    until they are placed)."""
    quantized = quantized or {}
    total = 0
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for leaf, t in own:
            if name in quantized and leaf == "weight":
                total += quantized_bytes(quantized[name], (module.out_features, module.in_features),
                                         str(dtype).removeprefix("torch."))
            elif name not in quantized or t.dtype.is_floating_point and leaf == "bias":
                total += t.numel() * (dtype.itemsize if t.dtype.is_floating_point else t.dtype.itemsize)
    return total


def check_weights(model, dtype, device, where, quantized: dict[str, str] | None = None) -> None:
    """InsufficientMemory, before a weight is read, when the weights alone (and the process)
    cannot fit in what `device` has free: the loader's own check, under the CLI's fuller plan."""
    from fuyu.model.errors import InsufficientMemory

    room = device_available(device)
    total = model_bytes(model, dtype, quantized) + RUNTIME_BYTES
    if not fits(total, room):
        raise InsufficientMemory(f"{where}: the weights need {gb(total)} in {str(dtype).removeprefix('torch.')} "
                                 f"but {gb(room)} is free on {device}; quantize them (int8, int4), "
                                 "use device_map='auto' with an offload folder, or free memory")


def kv_bytes(cfg, rows: int, tokens: int, dtype: str) -> int:
    """KV cache of `rows` rows of `tokens` slots: keys and values of every layer."""
    return 2 * cfg.num_hidden_layers * cfg.hidden_size * FLOAT_SIZES.get(dtype, 2) * rows * tokens


def activation_bytes(cfg, rows: int, tokens: int, dtype: str) -> int:
    """The largest prefill's live tensors: the float32 residual stream and a LayerNorm of it,
    the QKV and MLP outputs and attention's, in the weights' dtype, and the last positions' logits."""
    size = FLOAT_SIZES.get(dtype, 2)
    D, inner = cfg.hidden_size, cfg.intermediate_size
    per_token = 3 * D * 4 + (3 * D + inner + 2 * D) * size
    return rows * tokens * per_token + rows * cfg.vocab_size * 4


@dataclass(frozen=True)
class Need:
    weights: int
    kv_cache: int
    activations: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime

    def describe(self) -> str:
        return (f"{gb(self.total)} ({gb(self.weights)} weights, {gb(self.kv_cache)} KV cache, "
                f"{gb(self.activations + self.runtime)} activations and runtime)")


def need(cfg, weights: int, rows: int, tokens: int, dtype: str, runtime: int = RUNTIME_BYTES) -> Need:
    """What a run of `rows`-row batches of prompts up to `tokens` long (new tokens included) needs
    (runtime=0 once the process is running: what it holds is no longer available)."""
    return Need(weights, kv_bytes(cfg, rows, tokens, dtype), activation_bytes(cfg, rows, tokens, dtype), runtime)


def fits(total: int, room: int | None) -> bool:
    return room is None or total <= room * (1 - SAFETY)


def rows_that_fit(cfg, room: int | None, weights: int, tokens: int, dtype: str, most: int,
                  runtime: int = RUNTIME_BYTES) -> int:
    """The largest batch (≤ most rows) of prompts `tokens` long whose need fits in `room`; 0 if
    not even one row does."""
    if room is None:
        return most
    lo = 0
    for rows in range(1, most + 1):
        if not fits(need(cfg, weights, rows, tokens, dtype, runtime).total, room):
            break
        lo = rows
    return lo


def worst_tokens(max_new_tokens: int) -> int:
    """Slots a row may take: the largest image, a prompt, the new tokens."""
    return MAX_IMAGE_TOKENS + PROMPT_TOKENS + max_new_tokens
