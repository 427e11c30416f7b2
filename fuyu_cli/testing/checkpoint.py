"""Tiny random Fuyu checkpoints in the real on-disk layout, for tests and benchmarks.

config.json (nested `text_config` as the hub ships it, or flat), `model.safetensors` or sharded
`model-0000i-of-0000N.safetensors` + index, in the hub key layout (`language_model.model.*`) or
the transformers ≥4.52 module layout (`model.language_model.*`), plus the tokenizer files when
tests/tiny_tokenizer.py is available. Every tensor is random, layer norms and biases included.
"""

from __future__ import annotations

import json
import math
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


def random_state_dict(cfg: FuyuConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Our parameter names → random float32 tensors with magnitudes that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Fuyu(cfg).named_parameters()}
    sd = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if "layernorm" in name:
            sd[name] = 1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise
        elif name.endswith("bias"):
            sd[name] = 0.1 * noise
        elif name == "embed_tokens.weight":
            sd[name] = noise
        else:
            sd[name] = noise * (1.5 / math.sqrt(shape[1]))
    return sd


def write_config(ckpt: Path, cfg: FuyuConfig, form: str = "nested") -> None:
    flat = cfg.to_hf_json()
    if form == "flat":
        config = flat
    else:  # the hub's shape: top-level Fuyu numbers plus a Persimmon text_config
        text = {k: flat[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                     "num_hidden_layers", "num_attention_heads",
                                     "max_position_embeddings", "layer_norm_eps", "rope_theta",
                                     "partial_rotary_factor", "hidden_act", "qk_layernorm")}
        config = {**flat, "text_config": {"model_type": "persimmon", **text}}
    config["torch_dtype"] = "float32"
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


def make_checkpoint(ckpt: Path, *, hidden: int = 64, heads: int = 4, layers: int = 2,
                    intermediate: int | None = None, vocab_size: int | None = None,
                    layout: str = "hub", shards: int = 1, form: str = "nested", seed: int = 0,
                    tokenizer: bool = True, dtype: torch.dtype = torch.float32) -> Path:
    """Write a complete random checkpoint directory and return its path."""
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
    write_config(ckpt, cfg, form)
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
