"""Conversion: Adept's Megatron release and our own checkpoints → hub-layout checkpoints."""

import argparse
import json
import os
import random

import numpy as np
import pytest
import torch

from fuyu.model import CheckpointError, FuyuConfig, generate, load_pretrained, logits
from fuyu.model.convert import convert, load_megatron, parse_size
from fuyu.model.fuyu import Fuyu
from fuyu.model.quantize import Int8
from fuyu.testing.batches import make_batch
from fuyu.testing.checkpoint import make_checkpoint, random_state_dict
from fuyu.testing.tokenizer import special_ids, vocab_size, write_tokenizer


def megatron_key(name: str) -> str:
    """Our parameter name → Adept's original Megatron name, written out by hand."""
    if name.startswith("embed_tokens."):
        return "language_model.embedding.word_embeddings." + name.split(".", 1)[1]
    if name.startswith("lm_head."):
        return "word_embeddings_for_head." + name.split(".", 1)[1]
    if name.startswith("vision_embed_tokens."):
        return "vit_encoder.linear_encoder." + name.split(".", 1)[1]
    return "language_model.encoder." + name.replace("self_attn.", "self_attention.")


def megatron_file(sd: dict, cfg: FuyuConfig, extra=None) -> dict:
    """What Megatron's save_checkpoint pickles: nested module state dicts (the encoder's own dict is
    flat), training args, RNG states of python/numpy/torch, iteration counters."""
    model = {"language_model": {"embedding": {"word_embeddings": {}}, "encoder": {}},
             "word_embeddings_for_head": {}, "vit_encoder": {"linear_encoder": {}},
             "rotary_emb": {"inv_freq": torch.rand(cfg.rotary_dim // 2)}}  # dropped on conversion
    for name, t in sd.items():
        key = megatron_key(name)
        if key.startswith("language_model.encoder."):
            model["language_model"]["encoder"][key.removeprefix("language_model.encoder.")] = t
        elif key.startswith("language_model.embedding."):
            model["language_model"]["embedding"]["word_embeddings"][key.rsplit(".", 1)[1]] = t
        elif key.startswith("vit_encoder."):
            model["vit_encoder"]["linear_encoder"][key.rsplit(".", 1)[1]] = t
        else:
            model["word_embeddings_for_head"][key.rsplit(".", 1)[1]] = t
    args = argparse.Namespace(num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                              num_attention_heads=cfg.num_attention_heads, layernorm_epsilon=1e-5,
                              max_position_embeddings=16384, rotary_percent=0.5,
                              params_dtype=torch.bfloat16, tensor_model_parallel_size=1)
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
           "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}
    return {"args": args, "checkpoint_version": 3.0, "iteration": 1251, "model": model,
            "rng_state": [rng], **(extra or {})}


@pytest.fixture(scope="module")
def adept(tmp_path_factory):
    """(release dir, our config, float32 state dict) with a tiny Fuyu-shaped tokenizer."""
    root = tmp_path_factory.mktemp("adept")
    write_tokenizer(root / "tok")
    ids = special_ids(root / "tok")
    cfg = FuyuConfig(vocab_size=vocab_size(root / "tok"), hidden_size=64, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, bos_token_id=ids["bos"],
                     eos_token_id=ids["eos"], image_token_id=ids["speaker"])
    sd = random_state_dict(cfg, seed=5)
    release = root / "fuyu_8b_release"
    (release / "iter_0001251" / "mp_rank_00").mkdir(parents=True)
    torch.save(megatron_file(sd, cfg), release / "iter_0001251" / "mp_rank_00" / "model_optim_rng.pt")
    (release / "adept_vocab.model").write_bytes((root / "tok" / "tokenizer.model").read_bytes())
    return release, cfg, sd


@pytest.fixture(scope="module")
def converted(adept, tmp_path_factory):
    release, _, _ = adept
    return convert(release, tmp_path_factory.mktemp("out") / "fuyu", dtype="float32", shard_size="150KB")


def unconverted_logits(cfg, sd, batch):
    """The logits of the release's own tensors, through the path a loaded model takes (its CPU
    backend's prefill passes included): a converted checkpoint must give them bit for bit."""
    from fuyu.model.weights import for_inference

    model = Fuyu(cfg)
    model.load_state_dict(sd)
    model = for_inference(model, kernels="plain")
    with torch.no_grad():
        return logits(model, batch)


def test_adept_release_converts_to_sharded_hub_checkpoint_with_tokenizer(converted, adept):
    names = sorted(p.name for p in converted.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for f in ("config.json", "model.safetensors.index.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        assert f in names
    keys = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    assert "language_model.model.layers.0.self_attn.query_key_value.weight" in keys
    assert "language_model.lm_head.weight" in keys and "vision_embed_tokens.bias" in keys
    assert not any("inv_freq" in k or "self_attention" in k for k in keys)
    assert (converted / "tokenizer.model").read_bytes() == (adept[0] / "adept_vocab.model").read_bytes()
    # tokenizer.json rebuilt from the sentencepiece pieces: the same file the fixture builds.
    assert (converted / "tokenizer.json").read_bytes() == (adept[0].parent / "tok" / "tokenizer.json").read_bytes()
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["image_token_id"] == adept[1].image_token_id and cfg["num_attention_heads"] == 4
    assert not list(converted.parent.glob(".fuyu.*"))  # no temporary directory left behind


def test_converted_adept_weights_give_the_unconverted_logits(converted, adept):
    _, cfg, sd = adept
    batch = make_batch([(3, 4, 6), (1, 2, 3)], cfg.vocab_size, seed=2, ids=special_ids(converted))
    ours = load_pretrained(converted, dtype=torch.float32)
    with torch.no_grad():
        got = logits(ours, batch)
    assert torch.equal(got, unconverted_logits(cfg, sd, batch))


@pytest.mark.parity
def test_reference_library_loads_the_converted_checkpoint(converted, adept):
    transformers = pytest.importorskip("transformers")
    _, cfg, sd = adept
    batch = make_batch([(3, 4, 6)], cfg.vocab_size, seed=3, ids=special_ids(converted))
    ref = transformers.FuyuForCausalLM.from_pretrained(converted, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   image_patches=batch.per_sample_patches).logits
    assert (want - unconverted_logits(cfg, sd, batch)).abs().max().item() < 1e-4


class Payload:
    """Any class: unpickling it needs its code, which a weights-only load must never import."""


def test_pickled_object_that_needs_code_is_refused_by_name(adept, tmp_path):
    _, cfg, sd = adept
    path = tmp_path / "model_optim_rng.pt"
    torch.save(megatron_file(sd, cfg, {"payload": Payload()}), path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle tests\.test_convert\.Payload"):
        convert(path, tmp_path / "out", tokenizer=adept[0] / "adept_vocab.model")
    assert not (tmp_path / "out").exists()


def test_pickled_call_is_refused_without_running_it(adept, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"model": {}, "args": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle (posix|nt)\.system"):
        load_megatron(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


def test_reconverting_our_checkpoint_reshards_and_casts(tmp_path):
    src = make_checkpoint(tmp_path / "src", layout="module", shards=3, vocab_size=300, tokenizer=True)
    out = convert(src, tmp_path / "out", dtype="bfloat16", shard_size=1 << 20)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    a, b = load_pretrained(src), load_pretrained(out)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_prequantized_checkpoint_loads_without_requantizing(tmp_path, monkeypatch, method):
    src = make_checkpoint(tmp_path / "src", hidden=128, vocab_size=320, tokenizer=False)
    out = convert(src, tmp_path / "out", quantization=method)
    recorded = json.loads((out / "config.json").read_text())["quantization"]
    assert recorded["method"] == method and "layers.0.mlp.dense_h_to_4h" in recorded["modules"]
    on_the_fly = load_pretrained(src, quantization=method)
    if method == "int8":
        monkeypatch.setattr(Int8, "quantize", lambda self, w: pytest.fail("re-quantized"))
    stored = load_pretrained(out)
    batch = make_batch([(2, 3, 4)], 320, seed=1)
    with torch.no_grad():
        assert torch.equal(logits(stored, batch), logits(on_the_fly, batch))
    assert generate(stored, batch, 4).tolist() == generate(on_the_fly, batch, 4).tolist()
    other = "nf4" if method == "int8" else "int8"
    with pytest.raises(CheckpointError, match="stored quantized"):
        load_pretrained(out, quantization=other)


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    src = make_checkpoint(tmp_path / "src", vocab_size=300, tokenizer=False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = cfg["text_config"]["num_hidden_layers"] = 3  # weights have 2
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing from the source"):
        convert(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_shard_sizes_parse():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(123) == 123 and parse_size("500mb") == 500_000_000
    with pytest.raises(ValueError):
        parse_size("big")
