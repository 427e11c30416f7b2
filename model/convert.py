"""Checkpoint conversion: Adept's Megatron release, or any checkpoint we load, to the hub layout.

Output: config.json, `model-0000N-of-0000M.safetensors` + index with hub keys
(`language_model.model.*`, which every transformers version loads), tokenizer and preprocessor
files. Tensors stream one at a time (memory-mapped sources); everything is written to a temporary
directory next to the output and renamed at the end, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from fuyu.model.config import FuyuConfig
from fuyu.model.errors import CheckpointError
from fuyu.model.fuyu import Fuyu
from fuyu.model.quantize import quantizable, resolve_scheme, scheme_config
from fuyu.model.weights import iter_tensors, read_config, resolve_dtype, shard_files, to_hub_key, to_local_key

# Megatron name → hub name, substring replacements applied in this order.
ADEPT_RENAMES = (
    ("self_attention", "self_attn"),
    ("language_model.encoder", "language_model.model"),
    ("word_embeddings_for_head", "language_model.lm_head"),
    ("language_model.embedding.word_embeddings", "language_model.model.embed_tokens"),
    ("vit_encoder.linear_encoder", "vision_embed_tokens"),
)
ADEPT_DROPPED = ("rotary_emb.inv_freq", "image_patch_projection", "image_patch_projection.weight",
                 "image_patch_projection.bias")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json")
PREPROCESSOR_CONFIG = {  # as the hub preprocessor_config.json
    "image_processor_type": "FuyuImageProcessor", "padding_mode": "constant", "padding_value": 1.0,
    "processor_class": "FuyuProcessor", "target_height": 1080, "target_width": 1920}
TOKENIZER_CONFIG = {  # as the hub's, for a tokenizer.model taken from Adept's release
    "tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "|ENDOFTEXT|",
    "eos_token": "|ENDOFTEXT|", "unk_token": "<unk>", "pad_token": None,
    "additional_special_tokens": ["<unk>", "|ENDOFTEXT|"], "clean_up_tokenization_spaces": False,
    "spaces_between_special_tokens": False, "processor_class": "FuyuProcessor"}
Progress = Callable[[str], None]
BytesProgress = Callable[[int, int], None]  # (bytes converted so far, total), after each tensor


# --- Adept's release ----------------------------------------------------------------------------

def _megatron_globals() -> list:
    """The only non-tensor types a Megatron checkpoint pickles: its training arguments and the
    numpy RNG state (a uint32 array), under numpy 1.x and 2.x module names."""
    import argparse

    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever it lives
    return [argparse.Namespace, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct")]


def load_megatron(path: Path) -> dict:
    """torch.load with only tensors, containers and _megatron_globals() allowed: no code runs."""
    import pickle

    with torch.serialization.safe_globals(_megatron_globals()):
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # pre-1.6 (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(e))
            what = (found[1] or found[2]) if found else "an object that is not a tensor"
            raise CheckpointError(
                f"{path}: refusing to unpickle {what}: unpickling it could run code, and a "
                "Megatron checkpoint needs only tensors, argparse.Namespace and numpy RNG "
                "state") from None
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None


def _flatten(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def adept_to_hub(megatron_sd: Mapping) -> dict[str, torch.Tensor]:
    """Nested Megatron `state_dict["model"]` → flat hub-key state dict (no reshapes: Megatron
    already stores QKV per head as [q|k|v], the order our view expects)."""
    out = {}
    for key, value in _flatten(megatron_sd):
        if key in ADEPT_DROPPED or key.endswith(".rotary_emb.inv_freq") or value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"Megatron state dict: {key!r} is a {type(value).__name__}, not a tensor")
        for old, new in ADEPT_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def adept_config(sd: Mapping[str, torch.Tensor], args, tokenizer: Path | None) -> FuyuConfig:
    """Architecture from tensor shapes (our names), numbers shapes cannot tell from the training
    args when present, special ids from the tokenizer's pieces."""
    def need(name):
        if name not in sd:
            raise CheckpointError(f"Megatron state dict has no tensor for {name!r}; not a Fuyu checkpoint")
        return sd[name].shape

    vocab, hidden = need("embed_tokens.weight")
    head_dim = need("layers.0.self_attn.q_layernorm.weight")[0]
    arg = lambda *names, default: next((getattr(args, n) for n in names if getattr(args, n, None)), default)
    ids = {}
    if tokenizer is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        pieces = {"bos_token_id": "<s>", "eos_token_id": "|ENDOFTEXT|", "image_token_id": "|SPEAKER|"}
        ids = {k: sp.piece_to_id(p) for k, p in pieces.items() if sp.piece_to_id(p) != sp.unk_id()}
    return FuyuConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=hidden // head_dim,
        intermediate_size=need("layers.0.mlp.dense_h_to_4h.weight")[0],
        num_hidden_layers=len({k.split(".")[1] for k in sd if k.startswith("layers.")}),
        max_position_embeddings=arg("max_position_embeddings", default=16384),
        layer_norm_eps=arg("layernorm_epsilon", default=1e-5),
        rope_theta=float(arg("rotary_base", "rotary_emb_base", "rope_theta", default=25000.0)),
        partial_rotary_factor=arg("rotary_percent", default=0.5), **ids)


def tokenizer_json(spm_model: Path) -> bytes:
    """tokenizer.json for a sentencepiece Unigram model, built as the hub's:
    same pieces and scores, Prepend("▁") normalizer, byte fallback, |ENDOFTEXT| prepended."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    eot = ("|ENDOFTEXT|", sp.piece_to_id("|ENDOFTEXT|"))
    tok.post_processor = processors.TemplateProcessing(
        single="|ENDOFTEXT| $A", pair="|ENDOFTEXT| $A |ENDOFTEXT| $B:1", special_tokens=[eot])
    tok.add_special_tokens([AddedToken("<unk>", special=True, normalized=False),
                            AddedToken("|ENDOFTEXT|", special=True, normalized=False)])
    return tok.to_str(pretty=False).encode()


def find_adept_files(src: Path, tokenizer: Path | None) -> tuple[Path, Path | None]:
    """(model_optim_rng.pt, adept_vocab.model) from a release directory or a .pt file."""
    if src.is_file():
        return src, tokenizer
    found = sorted(src.rglob("model_optim_rng.pt"))
    if len(found) != 1:
        raise CheckpointError(f"{src}: found {len(found)} model_optim_rng.pt files; pass the one to "
                              "convert (tensor-parallel checkpoints, mp_rank_01 and up, are not supported)")
    vocab = tokenizer or next(iter(sorted(src.rglob("adept_vocab.model"))), None)
    return found[0], vocab


# --- writing ------------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """Bytes from 2000000000, "2GB", "500MB" or "1.5GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {size!r}: use bytes or a size like 2GB, 500MB, 1.5GiB")
    power = " KMGT".index(m[2].upper() or " ")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


def hub_config_json(cfg: FuyuConfig, dtype: torch.dtype) -> dict:
    """Flat numbers plus a full Persimmon text_config: the hub's nested shape, read alike by
    transformers 4.x/5.x and by model/config.py."""
    flat = cfg.to_hf_json()
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings", "layer_norm_eps", "rope_theta",
                 "partial_rotary_factor", "hidden_act", "qk_layernorm")
    text = {"model_type": "persimmon", **{k: flat[k] for k in text_keys}}
    return {**flat, "text_config": text, "torch_dtype": str(dtype).removeprefix("torch.")}


def save_pretrained(source: torch.nn.Module | Mapping | Iterable, out_dir: str | Path,
                    config: FuyuConfig, shard_size: int | str = "2GB",
                    dtype: torch.dtype | str = torch.bfloat16, quantization=None,
                    extra_files: Mapping[str, bytes | Path] | None = None,
                    progress: Progress | None = None, on_bytes: BytesProgress | None = None) -> Path:
    """Write a checkpoint directory from a model, a state dict or (name, tensor) pairs (our names).

    quantization ("int8", "nf4", ...) stores each quantized module's pieces instead of its weight
    and records the scheme in config.json, so loading is a memory map, not a re-quantization.
    on_bytes(done, total) follows the tensors through, counted at `dtype` before quantization
    (so a progress bar can show bytes); it is called once with done=0 before the first tensor.
    """
    out, dtype = Path(out_dir), resolve_dtype(dtype)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty")
    scheme = resolve_scheme(quantization)
    if scheme is not None and scheme.method == "int4":
        raise ValueError("int4 weights are packed per device at load time; save int8 or nf4, "
                         "or load a 16-bit checkpoint with quantization='int4'")
    with torch.device("meta"):
        skeleton = Fuyu(config)
    expected = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    # bitsandbytes' CPU packing rules apply, so the file loads on CPU as well as on GPU.
    modules = set(quantizable(skeleton, scheme, lambda n: torch.device("cpu"))) if scheme else set()
    if isinstance(source, torch.nn.Module):
        source = source.state_dict()
    pairs = source.items() if isinstance(source, Mapping) else source
    cfg = dataclasses.replace(config, quantization=scheme and scheme_config(scheme, sorted(modules)))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700: the folder gets what mkdir would give
    try:
        _write_shards(pairs, tmp, expected, modules, scheme, dtype, parse_size(shard_size), progress,
                      on_bytes)
        (tmp / "config.json").write_text(json.dumps(hub_config_json(cfg, dtype), indent=2))
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_shards(pairs, tmp: Path, expected, modules, scheme, dtype, limit: int,
                  progress: Progress | None, on_bytes: BytesProgress | None = None) -> None:
    shard: dict[str, torch.Tensor] = {}
    files: list[tuple[Path, list[str]]] = []
    seen, total, shard_bytes = set(), 0, 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    done, grand_total = 0, sum(math.prod(shape) for shape in expected.values()) * itemsize
    if on_bytes:
        on_bytes(0, grand_total)

    def flush():
        path = tmp / f"part-{len(files) + 1}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        path.chmod(0o666 & ~_umask())  # safetensors creates its files 0600; follow the umask
        files.append((path, list(shard)))
        if progress:
            progress(f"wrote shard {len(files)}: {len(shard)} tensors, {shard_bytes / 1e9:.2f} GB")
        shard.clear()

    for name, tensor in pairs:
        if name not in expected or tuple(tensor.shape) != expected[name]:
            what = "unexpected tensor" if name not in expected else f"shape {tuple(tensor.shape)} for"
            raise CheckpointError(f"{what} {name!r}; the weights do not match the config")
        seen.add(name)
        tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
        module, _, leaf = name.rpartition(".")
        pieces = ({f"{module}.{k}": v for k, v in scheme.quantize(tensor).items()}
                  if module in modules and leaf == "weight" else {name: tensor})
        for key, t in pieces.items():
            nbytes = t.numel() * t.element_size()
            if shard and shard_bytes + nbytes > limit:
                flush()
                shard_bytes = 0
            shard[to_hub_key(key)] = t.contiguous()
            shard_bytes, total = shard_bytes + nbytes, total + nbytes
        if on_bytes:
            done += tensor.numel() * itemsize
            on_bytes(done, grand_total)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} (and {len(missing) - 1} more) missing from the source")
    if shard:
        flush()
    weight_map = {}
    for i, (path, keys) in enumerate(files, 1):
        name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        path.rename(tmp / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# --- fuyu convert -------------------------------------------------------------------------------

def convert(src: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
            dtype: torch.dtype | str = torch.bfloat16, shard_size: int | str = "2GB",
            quantization=None, progress: Progress | None = None,
            on_bytes: BytesProgress | None = None) -> Path:
    """SRC: Adept's release directory (or its model_optim_rng.pt with `tokenizer`), or a checkpoint
    directory our loader reads; OUT: a new hub-layout checkpoint directory. progress(message)
    gets notes; on_bytes(done, total) each tensor converted (see save_pretrained)."""
    src, out = Path(src), Path(out)
    say = progress or (lambda message: None)
    if src.is_dir() and (src / "config.json").is_file():
        cfg = read_config(src)
        if cfg.quantization:
            raise CheckpointError(f"{src}: already quantized ({cfg.quantization.get('method')}); "
                                  "convert from the 16-bit checkpoint")
        say(f"reading {src} (safetensors)")
        pairs = ((_local(t.key, t.file), t.read()) for t in iter_tensors(shard_files(src)))
        extra = {n: src / n for n in TOKENIZER_FILES if (src / n).is_file()}
    elif src.is_file() or src.is_dir():
        pt, vocab = find_adept_files(src, Path(tokenizer) if tokenizer else None)
        if vocab is None or not vocab.is_file():
            raise CheckpointError(f"{src}: no adept_vocab.model found; pass --tokenizer PATH")
        say(f"reading {pt} (Megatron, memory-mapped)")
        ckpt = load_megatron(pt)
        if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
            raise CheckpointError(f"{pt}: no state_dict['model']; not a Megatron checkpoint")
        hub = adept_to_hub(ckpt["model"])
        local = {}
        for key, t in hub.items():
            name = to_local_key(key)
            if name is None:
                raise CheckpointError(f"{pt}: unexpected tensor {key!r} after renaming; not a Fuyu checkpoint")
            local[name] = t
        cfg, pairs = adept_config(local, ckpt.get("args"), vocab), local.items()
        extra = {"tokenizer.model": vocab, "tokenizer.json": tokenizer_json(vocab),
                 "tokenizer_config.json": _json(TOKENIZER_CONFIG),
                 "special_tokens_map.json": _json({k: TOKENIZER_CONFIG[k] for k in (
                     "bos_token", "eos_token", "unk_token", "additional_special_tokens")})}
    else:
        raise CheckpointError(f"{src}: no such file or directory")
    extra.setdefault("preprocessor_config.json", _json(PREPROCESSOR_CONFIG))
    return save_pretrained(pairs, out, cfg, shard_size, dtype, quantization, extra, progress, on_bytes)


def _local(key: str, file: Path) -> str:
    name = to_local_key(key)
    if name is None:
        raise CheckpointError(f"{file}: unexpected tensor {key!r}; not a Fuyu checkpoint")
    return name


def _json(obj) -> bytes:
    return json.dumps(obj, indent=2).encode()
