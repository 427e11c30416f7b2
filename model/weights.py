"""Checkpoint loading: config.json + (sharded) safetensors in either published key layout.

The model is built on the meta device and every parameter is read straight into the tensor it
becomes (model/reader.py), one tensor at a time, cast or quantized on the way: host memory holds
the loaded model and one staging block, never a second copy of a weight.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from fuyu.model.config import FuyuConfig
from fuyu.model.devices import dispatch, plan_placement
from fuyu.model.errors import CheckpointError
from fuyu.model.fuyu import Fuyu
from fuyu.model import backend, memory, native, plan as kernel_plan, reader
from fuyu.model.kernels import NATIVE_QUANT, NativeQuantLinear, PackedLinear, prefill_of
from fuyu.model.quantize import quantizable, resolve_scheme, swap_linears
from fuyu.model.settings import Settings

# Checkpoint key prefix → our module prefix. Hub layout (transformers ≤4.51 module tree, what
# adept/fuyu-8b ships) and the module layout transformers ≥4.52 writes
# (model.language_model.*).
KEY_PREFIXES = (
    ("language_model.model.", ""),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", ""),
    ("model.vision_embed_tokens.", "vision_embed_tokens."),
    ("vision_embed_tokens.", "vision_embed_tokens."),
    ("lm_head.", "lm_head."),
)
# A weight bigger than this whose kernel repacks it (oneDNN's layout) is packed in blocks of rows
# as it is read, rather than after, next to a plain copy of itself (the 8B's LM head is 2.1 GB)
PACK_BLOCK_BYTES = 256 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_hub_key(name: str) -> str:
    """The hub checkpoint key for our name: the layout every transformers version loads."""
    if name.startswith("vision_embed_tokens."):
        return name
    return ("language_model." if name.startswith("lm_head.") else "language_model.model.") + name


def to_local_key(key: str) -> str | None:
    """Our parameter name for a checkpoint key, or None when the key belongs to no known layout."""
    for prefix, local in KEY_PREFIXES:
        if key.startswith(prefix):
            return local + key[len(prefix):]
    return None


def read_config(ckpt: Path) -> FuyuConfig:
    path = ckpt / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a checkpoint directory needs config.json "
                              "next to its *.safetensors files")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not the object of a "
                              "model configuration; re-download or re-convert the checkpoint")
    try:
        return FuyuConfig.from_hf_json(data, source=str(path))
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a Fuyu configuration ({' '.join(str(e).split())})") from None


def shard_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when there is one."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e!r})") from None
        missing = [n for n in names if not (ckpt / n).is_file()]
        if missing:
            raise CheckpointError(f"{ckpt / missing[0]}: shard listed in {index.name} is missing; "
                                  "re-download or re-convert the checkpoint")
        return [ckpt / n for n in names]
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt}: no model.safetensors or model-*.safetensors found; "
                              "convert other formats with `fuyu convert`")
    return files


def iter_tensors(files: list[Path]) -> Iterator[reader.StoredTensor]:
    """Every tensor of the shards (unread: `.read(dtype, device)` reads it), in file order."""
    for file in files:
        yield from reader.tensors(file)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_pretrained(ckpt_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str = torch.bfloat16, *, quantization=None,
                    device_map=None, max_memory=None, offload_folder: str | Path | None = None,
                    kernels: str | None = None, config: FuyuConfig | None = None) -> Fuyu:
    """Load a checkpoint directory into an eval-mode Fuyu on `device`, weights cast to `dtype`.

    quantization: None, "int8"/"int4" (torch) or "8bit"/"4bit"/"nf4"/"fp4" (bitsandbytes), applied
    per tensor as it streams in; a pre-quantized checkpoint (config.json "quantization") loads as is.
    device_map: "auto" (with optional max_memory {0: "20GiB", "cpu": "30GiB"}) or {module: device}
    (model/devices.py); it overrides `device`. Offloaded modules stay unquantized; disk-offloaded
    tensors are read from the checkpoint's own files, or from offload_folder when they must change.
    kernels: on CPU, "auto" swaps in the kernel plan timed fastest on this machine for a whole
    decode step (model/plan.py; same results up to rounding), "plain" keeps nn.Linear and the
    quantized modules' own kernels, "native"/"packed"/"linear" fix the plan without timing;
    None = $FUYU_KERNELS or "auto". `fuyu.model.kernels.restore_plain(model)` undoes it exactly.
    On the CPU this writes caches and starts a compiler: the plan goes to $XDG_CACHE_HOME/fuyu/
    once per machine and model shape (unless kernels="plain"), and the CPU backend's C kernels
    compile into it at their first use (model/native, once per machine, with $CC; FUYU_NATIVE=0
    keeps the compiler off). model/settings.py reads those variables.
    config: the checkpoint's config.json as read_config(ckpt_dir) returned it, for a caller that
    read it already (the CLI checks memory with it first); None reads it here.
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory; pass a checkpoint directory "
                              "(config.json + *.safetensors)")
    cfg = read_config(ckpt) if config is None else config
    return build(cfg, iter_tensors(shard_files(ckpt)), device, dtype, quantization=quantization,
                 device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                 kernels=kernels, where=ckpt)


def build(cfg: FuyuConfig, tensors: Iterable, device: str | torch.device = "cpu",
          dtype: torch.dtype | str = torch.bfloat16, *, quantization=None, device_map=None,
          max_memory=None, offload_folder: str | Path | None = None, kernels: str | None = None,
          where: str | Path = "the checkpoint") -> Fuyu:
    """A Fuyu of `cfg` from `tensors`, the checkpoint's tensors one at a time, each not yet read
    (reader.StoredTensor, or anything with its key, file, shape, read and read_rows: random
    weights for a benchmark): load_pretrained's work once the files are found. `where` names the
    source in errors."""
    ckpt, dtype = Path(where), resolve_dtype(dtype)
    settings = Settings.from_environment()
    on_cpu = device_map is None and torch.device(device).type == "cpu"
    if on_cpu and kernel_plan.mode(settings, kernels) != "plain":
        native.build_in_background(settings)  # for the plan (timed before the weights are read)
    try:
        stored = resolve_scheme(cfg.quantization)  # how the checkpoint's own tensors are quantized
    except ValueError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: {e}") from None
    scheme = _pick_scheme(ckpt, resolve_scheme(quantization), stored)
    with torch.device("meta"):
        model = Fuyu(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    stored_modules = set(cfg.quantization.get("modules", ())) if stored else set()
    placement, quantized = _plan(model, scheme, stored_modules, device, device_map, max_memory, dtype)
    if scheme:
        swap_linears(model, scheme.make, sorted(quantized))
    if device_map is None:
        memory.check_weights(model, dtype, device, ckpt, dict.fromkeys(quantized, scheme.method) if scheme else None)
    # The kernel plan is timed now, on synthetic weights, while memory is free; a weight whose
    # kernel repacks it and that is too big to hold twice (the LM head) is packed as it is read,
    # and quantized weights the native kernels serve are laid out for them as they are read.
    plan = kernel_plan.choose(kernel_plan.Shape.of(model, dtype), settings, kernels) if on_cpu else None
    planned = {name: plan.kernel(name) for name, _ in model.named_modules()} if plan else {}
    if on_cpu and getattr(scheme, "levels", "") == "normal" and (plan is None or plan.layers != "native"):
        print("fuyu: warning: int4 on normal levels without our C kernels is upcast per call (slow); "
              'load {"method": "int4", "levels": "uniform"} for torch\'s int4 kernel', file=sys.stderr)
    pack_as_read = {name for name, m in model.named_modules()
                    if type(m) is torch.nn.Linear and m.weight.numel() * dtype.itemsize > PACK_BLOCK_BYTES
                    and planned.get(name) == "packed"}

    expected: dict[str, tuple[str, str]] = {}  # local tensor name → (module, piece)
    for name in shapes:
        module, _, leaf = name.rpartition(".")
        pieces = stored.pieces() if module in stored_modules and leaf == "weight" else (leaf,)
        expected.update({f"{module}.{p}": (module, p) for p in pieces})
    loaded, pending, offload_index = set(), {}, {}
    for entry in tensors:
        key, file = entry.key, entry.file
        name = to_local_key(key)
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {key!r}; this is not a Fuyu "
                                  "checkpoint, or it does not match config.json")
        if name in loaded:
            raise CheckpointError(f"{file}: tensor {key!r} appears twice in the checkpoint")
        loaded.add(name)
        module, piece = expected[name]
        target, source = placement.target(module), (file, key)
        if module in stored_modules and piece != "bias":  # one piece of a pre-quantized weight
            pending.setdefault(module, {})[piece] = entry.read()
            if len(pending[module]) < len(stored.pieces()):
                continue
            pieces = pending.pop(module)
            if module in quantized:
                _install(stored, model, module, pieces, target, dtype, file, planned.get(module))
                continue
            name, entry, source = f"{module}.weight", stored.dequantize(pieces), None  # offloaded
        shape = tuple(entry.shape)
        if shape != shapes[name]:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}, "
                                  f"config.json implies {shapes[name]}")
        if module in quantized and piece == "weight":
            pieces = scheme.quantize(_read(entry, dtype, target))
            _install(scheme, model, module, pieces, target, dtype, file, planned.get(module))
            del pieces
        elif module in pack_as_read and piece == "weight":
            _pack_rows(model, module, entry, dtype)
        elif target == "disk":
            _offload(name, entry, source, dtype, offload_folder, offload_index)
        else:
            _set_tensor(model, name, _read(entry, dtype, target))
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt}: tensor {missing[0]!r}{more} missing from the checkpoint; "
                              "a shard is incomplete or the checkpoint does not match config.json")
    dispatch(model, placement, offload_folder, offload_index)
    return for_inference(model, kernels, kernel_step=device_map is None, settings=settings, plan=plan)


def for_inference(model: Fuyu, kernels: str | None = None, kernel_step: bool = True,
                  settings: Settings | None = None, plan: kernel_plan.Plan | None = None) -> Fuyu:
    """Eval mode, frozen weights, and for a model on the CPU the kernel plan (model/plan.py; a
    `plan` chosen before loading spares choosing it again) and the CPU backend (model/backend.py;
    its C kernels compile at first use), per `settings` (None: Settings.from_environment()): what
    every loaded model goes through, random benchmark models included."""
    settings = settings or Settings.from_environment()
    model = model.eval().requires_grad_(False)
    kernel_plan.mode(settings, kernels)  # a bad name fails on any device
    model.backend = backend.for_model(model, settings)
    if kernel_step and model.embed_tokens.weight.device.type == "cpu":
        if plan is None:
            plan = kernel_plan.choose(kernel_plan.Shape.of(model, model.embed_tokens.weight.dtype), settings, kernels)
        kernel_plan.apply(model, plan)
        model.backend.plan = plan
    return model


def _plan(model, scheme, stored_modules, device, device_map, max_memory, dtype):
    """Placement, and which Linear modules get quantized: those the scheme (or the pre-quantized
    checkpoint) covers that are not offloaded, since accelerate offloads plain tensors only."""
    if stored_modules or not scheme:
        sized = sorted(stored_modules)
    else:  # an estimate for the auto map's sizes; the device-dependent test comes next
        sized = quantizable(model, scheme, lambda name: torch.device("cuda"))
    placement = plan_placement(model, device, device_map, max_memory, dtype,
                               {n: scheme.bits for n in sized})
    if scheme and not stored_modules:
        sized = quantizable(model, scheme, placement.execution_device)
    return placement, {n for n in sized if not placement.offloaded(n)}


def _pick_scheme(ckpt: Path, requested, stored):
    if stored is None or requested is None:
        return requested or stored
    if requested.method != stored.method:
        raise CheckpointError(f"{ckpt}: weights are stored quantized as {stored.method}; they cannot be "
                              f"loaded as {requested.method}. Convert the 16-bit checkpoint instead")
    return stored


def _install(scheme, model, module: str, pieces, device, dtype, file: Path, kernel: str | None = None) -> None:
    """Install a quantized weight's pieces into its module, or, where the plan serves it with the
    native kernels, straight into their layout (no second layout made and dropped)."""
    try:
        old = model.get_submodule(module)
        group = getattr(old, "group", 0)
        if kernel in NATIVE_QUANT and NativeQuantLinear.serves(scheme.method, old.out_features, old.in_features,
                                                               group):
            parent, _, leaf = module.rpartition(".")
            new = NativeQuantLinear.from_pieces(scheme.method, pieces, None, dtype, group, getattr(old, "levels", ""),
                                                prefill_of(kernel))
            new.bias = old.bias  # meta until the checkpoint's bias is read (_set_tensor)
            setattr(model.get_submodule(parent), leaf, new)
            return
        scheme.install(old, pieces, device, dtype)
    except (RuntimeError, ValueError, KeyError, AssertionError) as e:
        raise CheckpointError(f"{file}: the {scheme.method} tensors of {module!r} are unusable "
                              f"({e}); re-convert the checkpoint") from None


def _offload(name: str, tensor, source, dtype, folder, index: dict) -> None:
    """Record where a disk-offloaded tensor is read from: its own shard when it can be used as
    stored (cast on read), else a copy in `folder`."""
    if source is not None:
        file, key = source
        index[name] = {"safetensors_file": str(file), "weight_name": key,
                       "dtype": str(dtype).removeprefix("torch.")}
        return
    if folder is None:
        raise ValueError(f"device_map puts {name} on disk and it must be rewritten (dequantized); "
                         "pass offload_folder")
    from accelerate.utils import offload_weight

    Path(folder).mkdir(parents=True, exist_ok=True)
    offload_weight(tensor.to(dtype), name, str(folder), index)


def _pack_rows(model: torch.nn.Module, module: str, entry: reader.StoredTensor, dtype) -> None:
    """Module `module` as a PackedLinear made from its stored weight a block of rows at a time."""
    parent, _, leaf = module.rpartition(".")
    old = model.get_submodule(module)
    rows = max(1, PACK_BLOCK_BYTES // (entry.shape[1] * dtype.itemsize))
    packed = PackedLinear.from_rows(lambda i, j: entry.read_rows(i, j, dtype), entry.shape[0], rows,
                                            old.bias)
    setattr(model.get_submodule(parent), leaf, packed)


def _read(stored: reader.StoredTensor | torch.Tensor, dtype, device) -> torch.Tensor:
    """A stored tensor read as `dtype` on `device` (a dequantized one is a tensor already)."""
    if isinstance(stored, torch.Tensor):
        return stored.to(device, dtype)
    return stored.read(dtype, device)


def _set_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._buffers:  # quantized modules keep their bias as a buffer
        module._buffers[leaf] = tensor
    else:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
