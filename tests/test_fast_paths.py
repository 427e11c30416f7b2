"""Every fast path gives the same greedy ids as the plain path (tiny checkpoints, CPU)."""

import pytest
import torch

from fuyu.model import load_pretrained
from fuyu.model.kernels import head_logits
from tests.model_batches import make_batch
from fuyu.testing.checkpoint import make_checkpoint

VOCAB = 300


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fast"), hidden=96, heads=6, layers=3,
                           vocab_size=VOCAB, tokenizer=False, seed=4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_and_fast_head_give_the_plain_greedy_ids(ckpt, dtype):
    model = load_pretrained(ckpt, dtype=dtype)
    batch = make_batch([(3, 4, 5), (1, 2, 3)], VOCAB, seed=9)
    plain = model.generate(batch, 16, eos_id=-1, fast_head=False)
    fast = model.generate(batch, 16, eos_id=-1, compile=True, fast_head=True)
    assert fast.tolist() == plain.tolist()


def test_fast_head_equals_linear_up_to_output_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 64, generator=g).bfloat16()
    h = torch.randn(2, 64, generator=g).bfloat16()
    fast, plain = head_logits(h, w, fast=True), head_logits(h, w, fast=False)
    assert fast.dtype == torch.float32 and plain.dtype == torch.bfloat16
    # Both accumulate in float32; the fast one in another order and without the final rounding.
    assert torch.allclose(fast, plain.float(), atol=0.07, rtol=0.01)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_exact_argmax_picks_the_plain_heads_id_even_on_ties(rows):
    from fuyu.model.kernels import exact_argmax

    g = torch.Generator().manual_seed(rows)
    # Coarse weights and inputs make many logits tie in bf16; the plain argmax takes the first.
    w = (torch.randint(-3, 4, (4096, 64), generator=g) / 8).bfloat16()
    for trial in range(20):
        h = (torch.randint(-4, 5, (rows, 64), generator=g) / 4).bfloat16()
        plain = torch.nn.functional.linear(h, w).float()
        want = plain.argmax(-1)
        noisy = plain + torch.rand(plain.shape, generator=g) * 0.004 * plain.abs()  # another rounding
        assert exact_argmax(h, w, noisy).tolist() == want.tolist()
        assert exact_argmax(h, w, head_logits(h, w, fast=True)).tolist() == want.tolist()


@pytest.mark.parametrize("shape", [(1, 96), (4, 1, 96), (2, 37, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_is_f_linear_bit_for_bit(shape, bias):
    from fuyu.model.kernels import PackedLinear, can_pack

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160, bias=bias).bfloat16().requires_grad_(False)
    if not can_pack(linear.weight):
        pytest.skip("no oneDNN bf16 on this CPU")
    x = torch.randn(shape).bfloat16()
    packed = PackedLinear(linear)
    assert torch.equal(packed(x), linear(x))
    restored = packed.unpack()
    assert torch.equal(restored.weight, linear.weight) and restored.bias is linear.bias


def test_bf16_load_packs_layer_linears_with_identical_logits_and_ids(ckpt):
    from fuyu.model.kernels import PackedLinear

    packed, plain = load_pretrained(ckpt, dtype=torch.bfloat16), load_pretrained(ckpt, dtype=torch.bfloat16, pack=False)
    kinds = {type(m).__name__ for m in packed.layers.modules() if isinstance(m, (PackedLinear, torch.nn.Linear))}
    if kinds != {"PackedLinear"}:
        pytest.skip("no oneDNN bf16 on this CPU")
    assert type(packed.lm_head) is torch.nn.Linear  # the compiled batch-1 GEMV reads its plain weight
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    batch = make_batch([(3, 4, 5), (1, 2, 3)], VOCAB, seed=9)
    with torch.inference_mode():
        assert torch.equal(packed.logits(batch), plain.logits(batch))
    assert packed.generate(batch, 12, eos_id=-1).tolist() == plain.generate(batch, 12, eos_id=-1).tolist()


def test_making_a_packed_model_trainable_restores_its_exact_weights(ckpt):
    from fuyu.model.kernels import PackedLinear

    packed, plain = load_pretrained(ckpt, dtype=torch.bfloat16), load_pretrained(ckpt, dtype=torch.bfloat16, pack=False)
    want = plain.state_dict()
    got = packed.state_dict()  # packed weights come out under nn.Linear's keys, exactly
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    layer = packed.layers[0].mlp.dense_h_to_4h
    if isinstance(layer, PackedLinear):
        x = torch.ones(1, 96, dtype=torch.bfloat16, requires_grad=True)
        with pytest.raises(RuntimeError, match="requires_grad_"):
            layer(x)
    packed.requires_grad_(True)
    assert not any(isinstance(m, PackedLinear) for m in packed.modules())
    got = packed.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(p.requires_grad for p in packed.parameters())


def test_fast_head_compiles_once_per_row_count_whatever_the_prompt_length():
    import torch._dynamo

    from fuyu.model import kernels

    torch._dynamo.reset()
    kernels._compiled_gemv.cache_clear()
    kernels._shapes.clear()
    w = torch.randn(512, 64).bfloat16()
    counts = torch._dynamo.utils.counters
    counts.clear()
    for T in (5, 9, 17, 33, 65, 129, 257, 513, 1025, 3):  # more lengths than dynamo's recompile limit
        h = torch.randn(1, T, 64).bfloat16()[:, -1]  # as a prefill's last position: row stride T·64
        assert torch.allclose(head_logits(h, w, fast=True).float(), (h @ w.T).float(), atol=0.07, rtol=0.01)
    assert counts["stats"]["unique_graphs"] == 1


def test_rotary_rounds_like_the_reference_formula_in_bf16():
    from fuyu.model.fuyu import apply_partial_rotary, rotary_cos_sin

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 7, 64, generator=g).bfloat16()  # (B, H, T, d)
    cos, sin = rotary_cos_sin(torch.arange(7).expand(2, 7) * 37, 32, 25000.0, torch.bfloat16)
    # fuyu-spec §6.3: x_rot·cos + rotate_half(x_rot)·sin with cos/sin over all 32 rotary dims
    c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    rot, rest = x[..., :32], x[..., 32:]
    rotate_half = torch.cat((-rot[..., 16:], rot[..., :16]), -1)
    assert torch.equal(apply_partial_rotary(x, cos, sin), torch.cat((rot * c + rotate_half * s, rest), -1))


def test_a_packed_model_saves_like_the_plain_one(ckpt, tmp_path):
    from fuyu.model.convert import save_pretrained

    packed = load_pretrained(ckpt, dtype=torch.bfloat16)
    save_pretrained(packed, tmp_path / "saved", packed.config, dtype=torch.bfloat16)
    want = load_pretrained(ckpt, dtype=torch.bfloat16, pack=False).state_dict()
    got = load_pretrained(tmp_path / "saved", dtype=torch.bfloat16, pack=False).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_moving_or_casting_a_packed_model_restores_plain_weights(ckpt):
    from fuyu.model.kernels import PackedLinear

    model = load_pretrained(ckpt, dtype=torch.bfloat16).float()
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    want = load_pretrained(ckpt, dtype=torch.bfloat16, pack=False).float()
    batch = make_batch([(3, 4, 5)], VOCAB, seed=2)
    with torch.inference_mode():
        assert torch.equal(model.logits(batch), want.logits(batch))
