"""Tiny random Fuyu checkpoints in the real on-disk layout, for tests and benchmarks.

config.json (nested `text_config` as the hub ships it, or flat), `model.safetensors` or sharded
`model-0000i-of-0000N.safetensors` + index, in the hub key layout (`language_model.model.*`) or
the transformers ≥4.52 module layout (`model.language_model.*`), plus the tokenizer files when
tests/tiny_tokenizer.py is available. Every tensor is random, layer norms and biases included.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fuyu.model.config import FuyuConfig
from fuyu.model.fuyu import Fuyu

# Our parameter prefix → checkpoint key prefix, per layout (the inverse of model.weights).
_LAYOUTS = {
    "hub": (("vision_embed_tokens.", "vision_embed_tokens."), ("lm_head.", "language_model.lm_head."),
            ("", "language_model.model.")),
    "module": (("vision_embed_tokens.", "model.vision_embed_tokens."), ("lm_head.", "lm_head."),
               ("", "model.language_model.")),
}
# Ids for tests that need no tokenizer (vocab of `vocab_size`, pieces irrelevant).
PLAIN_IDS = dict(pad=0, bos=1, speaker=5, newline=6, eos=7, boa=8)


def checkpoint_key(name: str, layout: str) -> str:
    for local, ckpt in _LAYOUTS[layout]:
        if name.startswith(local):
            return ckpt + name[len(local):]
    raise AssertionError(name)


def parameter_shapes(cfg: FuyuConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {n: p.shape for n, p in Fuyu(cfg).named_parameters()}


def random_like(name: str, shape, g: torch.Generator) -> torch.Tensor:
    """Random float32 values for parameter `name` (or a block of its rows), with magnitudes that
    keep activations O(1)."""
    noise = torch.randn(shape, generator=g)
    if "layernorm" in name:
        return 1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise
    if name.endswith("bias"):
        return 0.1 * noise
    if name == "embed_tokens.weight":
        return noise
    return noise * (1.5 / math.sqrt(shape[1]))


def random_state_dict(cfg: FuyuConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Our parameter names → random float32 tensors (random_like)."""
    g = torch.Generator().manual_seed(seed)
    return {name: random_like(name, shape, g) for name, shape in parameter_shapes(cfg).items()}


def write_config(ckpt: Path, cfg: FuyuConfig, form: str = "nested", dtype: torch.dtype = torch.float32) -> None:
    flat = cfg.to_hf_json()
    if form == "flat":
        config = flat
    else:  # the hub's shape: top-level Fuyu numbers plus a Persimmon text_config
        text = {k: flat[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                     "num_hidden_layers", "num_attention_heads",
                                     "max_position_embeddings", "layer_norm_eps", "rope_theta",
                                     "partial_rotary_factor", "hidden_act", "qk_layernorm")}
        config = {**flat, "text_config": {"model_type": "persimmon", **text}}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))


def write_weights(ckpt: Path, sd: dict[str, torch.Tensor], layout: str = "hub", shards: int = 1,
                  dtype: torch.dtype = torch.float32) -> None:
    tensors = {checkpoint_key(n, layout): t.to(dtype).contiguous() for n, t in sd.items()}
    if shards == 1:
        save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@dataclass(frozen=True)
class RandomTensor:
    """A random parameter in the loader's tensor interface (model/reader.StoredTensor's: key, file,
    shape, read, read_rows), made a block of rows at a time where it is read, so a model of any
    size is built with memory for its weights alone (`fuyu benchmark --random 8b`). Rows read
    together draw from one generator seeded by (seed, key, first row)."""

    name: str
    shape: tuple[int, ...]
    seed: int = 0
    dtype: torch.dtype = torch.float32
    file: Path = Path("random weights")

    @property
    def key(self) -> str:
        return checkpoint_key(self.name, "hub")

    def read(self, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        return self.read_rows(0, self.shape[0], dtype, device)

    def read_rows(self, start: int, stop: int, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        out = torch.empty((stop - start, *self.shape[1:]), dtype=dtype or self.dtype, device=device)
        g = torch.Generator().manual_seed((self.seed << 40) ^ (zlib.crc32(self.name.encode()) << 8) ^ start)
        per_row = max(1, out[0].numel()) if out.numel() else 1
        rows = max(1, _BLOCK_ELEMENTS // per_row)
        for r in range(0, stop - start, rows):
            n = min(rows, stop - start - r)
            out[r:r + n].copy_(random_like(self.name, (n, *self.shape[1:]), g))
        return out


def random_tensors(cfg: FuyuConfig, seed: int = 0) -> list[RandomTensor]:
    """Every parameter of `cfg` as a RandomTensor, in the hub's order."""
    shapes = parameter_shapes(cfg)
    return [RandomTensor(name, tuple(shapes[name]), seed) for name in hub_order(shapes)]


# transformers' max_shard_size="10GB" (10⁹ bytes each), what adept/fuyu-8b was saved with: two
# shards of ~9.9 and ~8.9 GB for the 8B in 16-bit.
HUB_SHARD_BYTES = 10 * 10**9
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_BLOCK_ELEMENTS = 1 << 24  # values generated and written at a time (64 MiB of float32)


def hub_order(names) -> list[str]:
    """Parameter names in the order of the module tree adept/fuyu-8b was saved from (the language
    model, then the vision projection), which decides what lands in which shard."""
    return sorted(names, key=lambda n: n.startswith("vision_embed_tokens."))


def stream_random_weights(ckpt: Path, cfg: FuyuConfig, *, seed: int = 0, layout: str = "hub",
                          dtype: torch.dtype = torch.float16, max_shard_bytes: int = HUB_SHARD_BYTES) -> list[Path]:
    """Write random weights for `cfg` as sharded safetensors + index, as save_pretrained lays them out
    (tensors in module order, a new shard when the next tensor would pass max_shard_bytes), one
    block of rows at a time: memory stays at ~64 MiB whatever the model's size (Fuyu-8B: 18.8 GB)."""
    shapes = parameter_shapes(cfg)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name in hub_order(shapes):
        nbytes = shapes[name].numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        file = ckpt / (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                       else "model.safetensors")
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            n = shapes[name].numel() * itemsize
            header[checkpoint_key(name, layout)] = {"dtype": _ST_DTYPES[dtype], "shape": list(shapes[name]),
                                                    "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                shape = shapes[name]
                rows = max(1, _BLOCK_ELEMENTS // max(1, shape.numel() // shape[0]))
                for r in range(0, shape[0], rows):
                    block = random_like(name, (min(rows, shape[0] - r), *shape[1:]), g)
                    f.write(block.to(dtype).view(torch.uint8).numpy())
        files.append(file)
        weight_map.update({checkpoint_key(n, layout): file.name for n in names})
    if len(shards) > 1:
        total = sum(shapes[n].numel() * itemsize for n in shapes)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def make_checkpoint(ckpt: Path, *, hidden: int = 64, heads: int = 4, layers: int = 2,
                    intermediate: int | None = None, vocab_size: int | None = None,
                    layout: str = "hub", shards: int = 1, form: str = "nested", seed: int = 0,
                    tokenizer: bool = True, dtype: torch.dtype = torch.float32,
                    max_shard_bytes: int | None = None) -> Path:
    """Write a complete random checkpoint directory and return its path. With max_shard_bytes the
    weights are generated and written a block at a time into shards of at most that size
    (stream_random_weights: for models too big to hold twice), else held whole and split into
    `shards` files."""
    ckpt = Path(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    ids = dict(PLAIN_IDS)
    if tokenizer:
        from fuyu.testing import tokenizer as tiny_tokenizer

        tiny_tokenizer.write_tokenizer(ckpt)
        ids = tiny_tokenizer.special_ids(ckpt)
        vocab_size = vocab_size or tiny_tokenizer.vocab_size(ckpt)
    cfg = FuyuConfig(vocab_size=vocab_size or 300, hidden_size=hidden,
                     intermediate_size=intermediate or 4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, max_position_embeddings=16384,
                     bos_token_id=ids["bos"], eos_token_id=ids["eos"], image_token_id=ids["speaker"])
    write_config(ckpt, cfg, form, dtype)
    if max_shard_bytes:
        stream_random_weights(ckpt, cfg, seed=seed, layout=layout, dtype=dtype, max_shard_bytes=max_shard_bytes)
    else:
        write_weights(ckpt, random_state_dict(cfg, seed), layout, shards, dtype)
    return ckpt


# --- Broken checkpoints: one way each to spoil a make_checkpoint() directory (hub layout, hidden 64),
# shared by the loader's tests (tests/test_model.py) and the CLI's (tests/test_cli_errors.py).

def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A plain copy of checkpoint `src` at `dst` (created), to break without touching the original."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_weights(path: Path, edit) -> None:
    """Rewrite safetensors file `path` after `edit(state_dict)` changed its tensors in place."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path))


def truncate(path: Path, keep: int = 5000) -> None:
    """Cut a file to its first `keep` bytes, as an interrupted download leaves it."""
    path.write_bytes(path.read_bytes()[:keep])


# name → (function breaking a checkpoint dir, the file it spoils relative to the dir, or "" when
# the problem is the directory as a whole). "truncated shard" needs make_checkpoint(shards=3).
BREAKAGES = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "config.json"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{"), "config.json"),
    "config.json a list": (lambda d: (d / "config.json").write_text("[]"), "config.json"),
    "truncated": (lambda d: truncate(d / "model.safetensors"), "model.safetensors"),
    "truncated shard": (lambda d: truncate(d / "model-00002-of-00003.safetensors"),
                        "model-00002-of-00003.safetensors"),
    "missing tensor": (lambda d: edit_weights(d / "model.safetensors",
                                              lambda sd: sd.pop("language_model.lm_head.weight")), ""),
    "extra tensor": (lambda d: edit_weights(d / "model.safetensors",
                                            lambda sd: sd.update({"extra.weight": torch.zeros(2)})),
                     "model.safetensors"),
    "wrong shape": (lambda d: edit_weights(d / "model.safetensors",
                                           lambda sd: sd.update({"vision_embed_tokens.bias": torch.zeros(3)})),
                    "model.safetensors"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), ""),
}


def break_checkpoint(src: Path, dst: Path, how: str) -> Path:
    """A copy of checkpoint `src` at `dst`, spoiled the BREAKAGES[how] way."""
    broken = copy_checkpoint(src, dst)
    BREAKAGES[how][0](broken)
    return broken
