"""Model behaviour that needs no reference: cache, dtypes, sampling, config and load errors."""

import importlib
import json
import subprocess
import sys

import pytest
import torch

from fuyu.model import (CheckpointError, FuyuConfig, KVCache, generate, load_pretrained, logits, loss,
                        sample)
from fuyu.model.kernels import restore_plain
from fuyu.testing.checkpoint import PLAIN_IDS, break_checkpoint, make_checkpoint
from fuyu.testing.batches import make_batch

VOCAB = 300
# The module, not the `model.generate` function that model/__init__ re-exports under that name.
generate_module = importlib.import_module("fuyu.model.generate")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), vocab_size=VOCAB, tokenizer=False, seed=1)


@pytest.fixture(scope="module")
def fp32(ckpt):
    return load_pretrained(ckpt, dtype=torch.float32)


def test_cached_decoding_equals_recomputing_the_full_sequence(fp32, monkeypatch):
    batch = make_batch([(3, 4, 5), (1, 3, 2), (0, 0, 6)], VOCAB, seed=2)
    seen = []  # the logits generate() samples from at each step, from its KV-cached path
    real_sample = generate_module.sample
    monkeypatch.setattr(generate_module, "sample",
                        lambda logits, *a, **kw: (seen.append(logits.clone()), real_sample(logits, *a, **kw))[1])
    new = generate(fp32, batch, max_new_tokens=12, eos_id=-1)  # no early stop
    assert len(seen) == new.shape[1] == 12
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        for step in range(new.shape[1]):
            full = logits(fp32, dict(input_ids=ids, attention_mask=mask, image_patches=batch.image_patches))[:, -1]
            assert full.argmax(-1).tolist() == new[:, step].tolist()
            # float32, logits up to |6|: measured max |Δ| 4e-6 (summation order differs between the
            # cached one-token steps and the full recompute). 1e-4 leaves 25x headroom and is still
            # 10^4 below what a cache bug gives: an off-by-one decode position or one dropped cached
            # token moves these logits by 1.0 and 1.4.
            torch.testing.assert_close(seen[step], full, atol=1e-4, rtol=0, msg=f"step {step}")
            ids = torch.cat([ids, new[:, step:step + 1]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def test_prefill_in_two_chunks_equals_one_prefill(fp32):
    batch = make_batch([(2, 3, 6), (1, 2, 3)], VOCAB, seed=4)
    ids, mask, cut = batch.input_ids, batch.attention_mask, 7

    def run(chunks):
        cache, out = KVCache.for_model(fp32, 2, 64), []
        for ids_, mask_, patches in chunks:
            out.append(fp32(ids_, cache.append(mask_), cache, patches))
            cache.advance()
        return torch.cat(out, 1)

    n_first = int((ids[:, :cut] == fp32.config.image_token_id).sum())
    with torch.no_grad():
        whole = run([(ids, mask, batch.image_patches)])
        split = run([(ids[:, :cut], mask[:, :cut], batch.image_patches[:n_first]),
                     (ids[:, cut:], mask[:, cut:], batch.image_patches[n_first:])])
    real = mask.bool()
    assert torch.allclose(split[real], whole[real], atol=1e-5)


def test_bfloat16_load_stays_close_to_float32(ckpt, fp32):
    bf16 = load_pretrained(ckpt)  # default dtype
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    batch = make_batch([(3, 4, 6)], VOCAB, seed=3)
    with torch.no_grad():
        a, b = logits(fp32, batch), logits(bf16, batch).float()
    # Measured: max |Δ| 0.09, mean 0.014 on logits of std 1.6, argmax agrees on 96% of positions.
    assert (a - b).abs().max().item() < 0.25
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9


def test_float16_load_runs_and_stays_close_to_float32(ckpt, fp32):
    f16 = load_pretrained(ckpt, dtype=torch.float16)
    assert {p.dtype for p in f16.parameters()} == {torch.float16}
    batch = make_batch([(3, 4, 6)], VOCAB, seed=3)
    with torch.no_grad():
        a, b = logits(fp32, batch), logits(f16, batch)
    assert b.dtype == torch.float16 and torch.isfinite(b).all()
    # Measured: max |Δ| 0.011, mean 0.0018 on logits of std 1.6 (float16 keeps 3 more mantissa
    # bits than bfloat16: ~8x closer); argmax agrees on 22 of 23 positions (one near-tie).
    diff = (a - b.float()).abs()
    assert diff.max().item() < 0.05 and diff.mean().item() < 0.005
    assert (a.argmax(-1) == b.float().argmax(-1)).float().mean().item() > 0.9
    new = generate(f16, batch, max_new_tokens=4, eos_id=-1)
    assert new.shape == (1, 4)


@pytest.mark.parametrize("make_optimizer", [
    pytest.param(lambda params: torch.optim.SGD(params, lr=0.1), id="sgd"),
    # AdamW's per-element step is ~lr; bfloat16 keeps 8 bits, so a step much below 1/256 of a
    # weight (~0.2 here) would round away: 1e-2 is a step the weights can hold.
    pytest.param(lambda params: torch.optim.AdamW(params, lr=1e-2), id="adamw"),
])
def test_bfloat16_fine_tuning_steps_change_the_weights_and_lower_the_loss(ckpt, make_optimizer):
    m = load_pretrained(ckpt, dtype=torch.bfloat16)
    assert not any(p.requires_grad for p in m.parameters())  # loaded frozen, for inference
    restore_plain(m).requires_grad_(True)  # plain nn.Linear weights back from any CPU kernel
    batch = make_batch([(2, 3, 6), (1, 2, 4)], VOCAB, seed=5)
    ids = batch.input_ids
    # Train on the text only: pads and the image placeholder/newline tokens are ignored.
    labels = ids.masked_fill((batch.attention_mask == 0) | (ids == PLAIN_IDS["speaker"])
                             | (ids == PLAIN_IDS["newline"]), -100)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = make_optimizer(m.parameters())

    value = loss(m, batch, labels)
    value.backward()
    for name, p in m.named_parameters():  # every weight, the image projection included, gets a gradient
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    opt.step()
    for name in ("embed_tokens.weight", "vision_embed_tokens.weight", "layers.0.self_attn.query_key_value.weight",
                 "layers.1.mlp.dense_h_to_4h.weight", "lm_head.weight"):
        assert not torch.equal(m.get_parameter(name), before[name]), f"{name} did not change"
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())

    # Measured losses 6.83 → 3.6 / 2.95 after one step, then falling on every step (SGD, AdamW).
    losses = [value.item()]
    for _ in range(3):
        opt.zero_grad()
        value = loss(m, batch, labels)
        value.backward()
        opt.step()
        losses.append(value.item())
    with torch.no_grad():
        losses.append(loss(m, batch, labels).item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0], losses


def test_sampling_is_reproducible_with_a_seeded_generator(fp32):
    batch = make_batch([(2, 2, 4)], VOCAB, seed=6)
    runs = [generate(fp32, batch, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()
    assert generate(fp32, batch, 10, temperature=1.0, top_k=1).tolist() == generate(fp32, batch, 10).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert drawn == {0, 1}


def test_generation_stops_at_eos_and_pads_finished_rows(fp32):
    batch = make_batch([(2, 2, 4), (1, 1, 3)], VOCAB, seed=8)
    free = generate(fp32, batch, 6, eos_id=-1)
    eos = int(free[0, 1])  # pretend row 0's second token is EOS
    out = generate(fp32, batch, 6, eos_id=eos)
    assert out[0, 1] == eos and (out[0, 1:] == eos).all()
    assert generate(fp32, batch, 0).shape == (2, 0)


def test_hub_config_builds_fuyu_8b_with_rope_base_25000():
    hub = {"architectures": ["FuyuForCausalLM"], "model_type": "fuyu", "text_config": {"model_type": "persimmon"},
           "vocab_size": 262144, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 36,
           "num_attention_heads": 64, "hidden_act": "relu2", "max_position_embeddings": 16384,
           "layer_norm_eps": 1e-05, "qk_layernorm": True, "partial_rotary_factor": 0.5, "rope_theta": 25000.0,
           "rope_scaling": None, "hidden_dropout": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02,
           "image_size": 300, "patch_size": 30, "num_channels": 3, "bos_token_id": 1, "eos_token_id": 71013,
           "tie_word_embeddings": False, "use_cache": True, "torch_dtype": "bfloat16",
           "transformers_version": "4.35.0.dev0"}
    cfg = FuyuConfig.from_hf_json(hub)
    assert cfg == FuyuConfig()
    assert (cfg.rope_theta, cfg.head_dim, cfg.rotary_dim, cfg.image_token_id) == (25000.0, 64, 32, 71011)


def test_unknown_config_keys_warn_and_unsupported_ones_fail():
    with pytest.warns(UserWarning, match="frobnicate"):
        FuyuConfig.from_hf_json({"frobnicate": 1})
    with pytest.raises(CheckpointError, match="hidden_act"):
        FuyuConfig.from_hf_json({"hidden_act": "gelu"})


@pytest.mark.parametrize("how, message", [
    ("no config.json", r"config\.json: not found"),
    ("truncated", r"model\.safetensors: ends before its tensors do .*truncated"),
    ("missing tensor", r"'lm_head\.weight' missing"),
    ("extra tensor", r"model\.safetensors: unexpected tensor 'extra\.weight'"),
    ("wrong shape", r"'vision_embed_tokens\.bias' has shape \(3,\), config\.json implies \(64,\)"),
    ("config.json not JSON", r"config\.json: not valid JSON"),
    ("no weights", r"no model\.safetensors"),
])
def test_broken_checkpoints_fail_with_one_clear_message(ckpt, tmp_path, how, message):
    broken = break_checkpoint(ckpt, tmp_path / "ckpt", how)
    with pytest.raises(CheckpointError, match=message) as err:
        load_pretrained(broken, dtype=torch.float32)
    assert "\n" not in str(err.value)


def test_a_missing_shard_named_in_the_index_is_reported(tmp_path):
    ckpt = make_checkpoint(tmp_path / "sharded", vocab_size=VOCAB, tokenizer=False, shards=3)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: shard listed"):
        load_pretrained(ckpt)


def test_patch_count_must_match_placeholders(fp32):
    batch = make_batch([(2, 2, 3)], VOCAB)
    batch.image_patches = batch.image_patches[:-1]
    with pytest.raises(ValueError, match="3 image patches for 4 image placeholder tokens"):
        logits(fp32, batch)


def test_model_package_imports_no_transformers_preprocess_or_cli():
    code = ("import sys, fuyu.model; bad = [m for m in sys.modules if m.split('.')[0] == 'transformers' "
            "or m.startswith(('fuyu.preprocess', 'fuyu.commands', 'fuyu.pipeline', 'fuyu.runner'))]; "
            "print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_list_of_batches_decodes_together_as_each_alone(fp32):
    """Batches of different lengths (one per image size) are prefilled apart, right-aligned in
    one cache, and decoded together: the same ids and logits as each batch on its own."""
    from fuyu.model import decode_step, prefill

    groups = [make_batch([(3, 4, 5), (3, 4, 2)], VOCAB, seed=5), make_batch([(1, 2, 3)], VOCAB, seed=6),
              make_batch([(2, 5, 4), (0, 0, 7)], VOCAB, seed=7)]  # the last one padded within itself
    together = generate(fp32, groups, max_new_tokens=6, eos_id=-1)
    alone = [generate(fp32, g, max_new_tokens=6, eos_id=-1) for g in groups]
    assert torch.equal(together, torch.cat(alone))
    assert torch.equal(generate(fp32, groups, max_new_tokens=6, eos_id=-1, compile=True), together)

    cache, last = prefill(fp32, groups, max_new_tokens=3)
    ids = together[:, 0]
    steps = [last] + [decode_step(fp32, cache, together[:, i]) for i in range(2)]
    for g, rows in zip(groups, ([0, 1], [2], [3, 4])):
        c, l = prefill(fp32, g, max_new_tokens=3)
        mine = [l] + [decode_step(fp32, c, together[rows, i]) for i in range(2)]
        for a, b in zip(steps, mine):
            torch.testing.assert_close(a[rows], b, atol=1e-5, rtol=0)
    assert ids.shape == (5,)
    with pytest.raises(ValueError, match="prefix"):
        prefill(fp32, groups, prefix=cache)


def test_generate_resolves_each_batch_once(fp32, monkeypatch):
    # A batch goes from the caller's form (FuyuBatch, dict, or a list of them) to tensors once,
    # at generate's edge; prefill then works on those tensors.
    gen = sys.modules["fuyu.model.generate"]  # (fuyu.model.generate is the function)
    groups = [make_batch([(3, 4, 5)], VOCAB, seed=5), make_batch([(1, 2, 3)], VOCAB, seed=6)]
    resolved = []
    real = gen.batch_tensors
    monkeypatch.setattr(gen, "batch_tensors", lambda b, device: resolved.append(b) or real(b, device))
    generate(fp32, groups, max_new_tokens=2, eos_id=-1)
    assert resolved == groups
    resolved.clear()
    generate(fp32, vars(groups[0]), max_new_tokens=2, eos_id=-1)  # a dict
    assert resolved == [vars(groups[0])]
