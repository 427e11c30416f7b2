"""Every fast path gives the same greedy ids as the plain path (tiny checkpoints, CPU)."""

import pytest
import torch

from model import load_pretrained
from model.kernels import head_logits
from tests.model_batches import make_batch
from tests.tiny_checkpoint import make_checkpoint

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
    assert fast.dtype == plain.dtype == torch.bfloat16
    # Both accumulate in float32 and round once; only the summation order differs.
    assert torch.allclose(fast.float(), plain.float(), atol=0.07, rtol=0.01)
    assert (fast.argmax(-1) == plain.argmax(-1)).all()
