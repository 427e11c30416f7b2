"""Loading without a second copy: the tensor reader, packing as it reads, one swap at a time, and
the streamed writer of big random checkpoints (the 8B's own layout, at a tiny size)."""

import gc
import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fuyu.model import FuyuConfig, load_pretrained, logits
from fuyu.model import kernels, plan, reader, weights
from fuyu.model.errors import CheckpointError
from fuyu.testing.batches import make_batch
from fuyu.testing.checkpoint import hub_order, make_checkpoint, parameter_shapes

VOCAB = 300


def test_the_reader_gives_safetensors_own_values_cast_and_by_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "BLOCK_BYTES", 1000)  # converting reads in many staging blocks
    g = torch.Generator().manual_seed(0)
    stored = {"a": torch.randn(37, 53, generator=g).half(), "b": torch.randn(5, generator=g).bfloat16(),
              "c": torch.randint(-128, 127, (7, 9), generator=g, dtype=torch.int8), "d": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    save_file(stored, str(path))
    got = {t.key: t for t in reader.tensors(path)}
    assert set(got) == set(stored)
    with safe_open(str(path), "pt") as f:
        for key, entry in got.items():
            want = f.get_tensor(key)
            assert entry.shape == tuple(want.shape) and entry.dtype == want.dtype
            assert torch.equal(entry.read(), want)
            cast = entry.read(torch.bfloat16)
            assert cast.dtype == (torch.bfloat16 if want.is_floating_point() else want.dtype)
            assert torch.equal(cast, want.to(cast.dtype))
            assert cast.data_ptr() % 64 == 0 or cast.numel() == 0
    a = got["a"]
    assert torch.equal(a.read_rows(10, 29, torch.float32), stored["a"][10:29].float())


def test_a_truncated_shard_fails_before_any_read_naming_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"x\.safetensors: ends before its tensors do .*truncated"):
        reader.tensors(path)


def test_a_block_packed_linear_equals_the_plain_one():
    if not kernels.can_pack(torch.empty(1, dtype=torch.float32)):
        pytest.skip("oneDNN cannot pack on this build")
    lin = nn.Linear(64, 200, bias=True)
    w = lin.weight.detach()
    packed = kernels.PackedLinear.from_rows(lambda i, j: w[i:j].clone(), 200, 48, lin.bias.detach())
    assert len(packed.blocks) == 5 and packed.out_features == 200  # 48 × 4 + 8
    x = torch.randn(3, 7, 64)
    with torch.inference_mode():
        assert torch.allclose(packed(x), lin(x), atol=1e-5)
    assert torch.equal(packed.plain().weight, w)


def test_swapping_kernels_frees_each_plain_weight_before_the_next_swap():
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)]).requires_grad_(False)
    refs = {f"{i}": weakref.ref(m) for i, m in enumerate(model)}
    alive_at_each_swap = []

    def choose(name, module):
        gc.collect()
        alive_at_each_swap.append(sum(r() is not None for n, r in refs.items() if n < name))
        return "linear+f32"  # a new module each time, like every other kernel but "linear"

    kernels.apply(model, choose)
    assert alive_at_each_swap == [0, 0, 0, 0]  # nothing swapped before is still held


def test_the_plan_is_timed_before_the_weights_are_read(tmp_path, monkeypatch, own_plan_cache):
    ckpt = make_checkpoint(tmp_path / "m", hidden=64, heads=4, layers=2, vocab_size=VOCAB, tokenizer=False,
                           dtype=torch.bfloat16)
    events = []
    real_read = reader.StoredTensor.read
    monkeypatch.setattr(plan, "time_plans", lambda shape, settings: (events.append("timed"),
                                                                     (plan.Plan("linear", "linear"), False))[1])
    monkeypatch.setattr(reader.StoredTensor, "read", lambda self, *a, **k: (events.append("read"), real_read(self, *a, **k))[1])
    load_pretrained(ckpt, dtype=torch.bfloat16, kernels="auto")
    assert events[0] == "timed" and events.count("timed") == 1 and "read" in events


def test_a_big_weight_planned_packed_is_packed_as_it_is_read(tmp_path, monkeypatch, own_plan_cache):
    if not kernels.can_pack(torch.empty(1, dtype=torch.bfloat16)):
        pytest.skip("oneDNN cannot pack bf16 on this CPU")
    ckpt = make_checkpoint(tmp_path / "m", hidden=64, heads=4, layers=2, vocab_size=VOCAB, tokenizer=False, seed=3)
    plain = load_pretrained(ckpt, dtype=torch.bfloat16, kernels="plain")
    monkeypatch.setattr(weights, "PACK_BLOCK_BYTES", 64 * 2 * 64)  # the head (300 rows) is "big": 64-row blocks
    monkeypatch.setattr(plan, "time_plans", lambda shape, settings: (plan.Plan("linear", "packed"), False))
    reads = []
    real = reader.StoredTensor.read
    monkeypatch.setattr(reader.StoredTensor, "read", lambda self, *a, **k: (reads.append((self.key, self.shape)),
                                                                             real(self, *a, **k))[1])
    model = load_pretrained(ckpt, dtype=torch.bfloat16, kernels="auto")
    assert isinstance(model.lm_head, kernels.PackedLinear) and len(model.lm_head.blocks) == 5
    head = [shape for key, shape in reads if key == "language_model.lm_head.weight"]
    assert head == [(64, 64)] * 4 + [(44, 64)]  # the head was never read whole
    batch = make_batch([(3, 4, 5), (0, 0, 6)], VOCAB, seed=2)
    with torch.inference_mode():
        assert torch.equal(logits(model, batch), logits(plain, batch))


def test_the_streamed_writer_lays_shards_out_as_save_pretrained_and_loads(tmp_path):
    cfg_kw = dict(hidden=64, heads=4, layers=3, vocab_size=VOCAB, tokenizer=False, dtype=torch.float16)
    ckpt = make_checkpoint(tmp_path / "m", **cfg_kw, max_shard_bytes=80_000)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    cfg = FuyuConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=4)
    shapes = parameter_shapes(cfg)
    sizes = []
    for name in files:  # every shard within the limit unless one tensor alone is bigger
        with safe_open(str(ckpt / name), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert all(t.dtype == torch.float16 for t in tensors.values())
        sizes.append(sum(t.numel() * 2 for t in tensors.values()))
        assert sizes[-1] <= 80_000 or len(tensors) == 1
    assert sum(sizes) == index["metadata"]["total_size"] == sum(s.numel() * 2 for s in shapes.values())
    assert hub_order(shapes)[-1].startswith("vision_embed_tokens")  # the hub's module order
    assert index["weight_map"]["vision_embed_tokens.bias"] == files[-1]
    model = load_pretrained(ckpt, dtype=torch.float32)
    assert model.lm_head.weight.abs().sum() > 0


def test_the_loader_refuses_weights_that_cannot_fit_before_reading_any(tmp_path, monkeypatch):
    from fuyu.model import memory
    from fuyu.model.errors import InsufficientMemory

    ckpt = make_checkpoint(tmp_path / "m", hidden=64, heads=4, layers=2, vocab_size=VOCAB, tokenizer=False)
    with torch.device("meta"):
        from fuyu.model import Fuyu
        from fuyu.model.weights import read_config

        meta = Fuyu(read_config(ckpt))
    need = memory.model_bytes(meta, torch.bfloat16) + memory.RUNTIME_BYTES
    assert need == sum(p.numel() for p in meta.parameters()) * 2 + memory.RUNTIME_BYTES
    reads = []
    monkeypatch.setattr(reader.StoredTensor, "read", lambda self, *a, **k: reads.append(self))
    monkeypatch.setattr(memory, "available", lambda: int(need * 0.9))
    with pytest.raises(InsufficientMemory, match=r"m: the weights need .* in bfloat16 but .* is free on cpu"):
        load_pretrained(ckpt, dtype=torch.bfloat16, kernels="plain")
    assert reads == []
    int8 = memory.model_bytes(meta, torch.bfloat16, {f"layers.{i}.mlp.dense_h_to_4h": "int8" for i in range(2)})
    assert int8 == need - memory.RUNTIME_BYTES - 2 * (256 * 64 * 2) + 2 * (256 * 64 + 256 * 4)
