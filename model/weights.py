"""Checkpoint loading: config.json + (sharded) safetensors in either published key layout.

The model is built on the meta device and every parameter is assigned straight from the
memory-mapped shard, one tensor at a time, so host memory never holds the model twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import FuyuConfig
from model.errors import CheckpointError
from model.fuyu import Fuyu

# Checkpoint key prefix → our module prefix. Hub layout (transformers ≤4.51 module tree, what
# adept/fuyu-8b ships) and the module layout transformers ≥4.52 writes (fuyu-spec.md §8).
KEY_PREFIXES = (
    ("language_model.model.", ""),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", ""),
    ("model.vision_embed_tokens.", "vision_embed_tokens."),
    ("vision_embed_tokens.", "vision_embed_tokens."),
    ("lm_head.", "lm_head."),
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        return FuyuConfig.from_hf_json(json.loads(path.read_text()), source=str(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


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


def iter_tensors(files: list[Path], device: str = "cpu") -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(checkpoint key, file, tensor) for every tensor, one shard open at a time."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=device) as f:
                for key in f.keys():
                    yield key, file, f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors data ({e}); the file is "
                                  "truncated or corrupt, re-download or re-convert it") from None


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_pretrained(ckpt_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str = torch.bfloat16) -> Fuyu:
    """Load a checkpoint directory into an eval-mode Fuyu on `device`, weights cast to `dtype`."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory; pass a checkpoint directory "
                              "(config.json + *.safetensors)")
    cfg, dtype, device = read_config(ckpt), resolve_dtype(dtype), torch.device(device)
    with torch.device("meta"):
        model = Fuyu(cfg)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for key, file, tensor in iter_tensors(shard_files(ckpt)):
        name = to_local_key(key)
        if name not in params:
            raise CheckpointError(f"{file}: unexpected tensor {key!r}; this is not a Fuyu "
                                  "checkpoint, or it does not match config.json")
        if name in loaded:
            raise CheckpointError(f"{file}: tensor {key!r} appears twice in the checkpoint")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {tuple(params[name].shape)}")
        _assign(model, name, tensor.to(device=device, dtype=dtype))
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt}: tensor {missing[0]!r}{more} missing from the checkpoint; "
                              "a shard is incomplete or the checkpoint does not match config.json")
    return model.eval().requires_grad_(False)


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
