"""Our model against the reference (transformers 4.57.6) on tiny random checkpoints, float32, CPU."""

import pytest
import torch

from fuyu.model import generate, load_pretrained, logits, loss, position_ids
from fuyu.testing.batches import make_batch
from fuyu.testing.checkpoint import make_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.parity

# (hidden, heads, layers, layout, shards, config form)
CHECKPOINTS = {
    "h64-hub-single-nested": (64, 4, 2, "hub", 1, "nested"),
    "h96-module-sharded-flat": (96, 6, 3, "module", 3, "flat"),
    "h64-module-single-nested": (64, 4, 2, "module", 1, "nested"),
    "h96-hub-sharded-nested": (96, 6, 3, "hub", 2, "nested"),
}
VOCAB = 300


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def pair(request, tmp_path_factory):
    hidden, heads, layers, layout, shards, form = CHECKPOINTS[request.param]
    ckpt = make_checkpoint(tmp_path_factory.mktemp(request.param), hidden=hidden, heads=heads,
                           layers=layers, layout=layout, shards=shards, form=form,
                           vocab_size=VOCAB, tokenizer=False, seed=hidden + layers)
    ours = load_pretrained(ckpt, dtype=torch.float32)
    ref = transformers.FuyuForCausalLM.from_pretrained(
        ckpt, torch_dtype=torch.float32, attn_implementation="eager").eval()
    return ours, ref


def ref_logits(ref, batch):
    with torch.no_grad():
        return ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   image_patches=batch.per_sample_patches,
                   position_ids=position_ids(batch.attention_mask)).logits


@pytest.mark.parametrize("shapes", [
    [(3, 4, 6)],           # one image, short prompt
    [(0, 0, 12)],          # text only
    [(7, 2, 5)],           # tall narrow image
    [(2, 9, 3)],           # wide image
])
def test_logits_equal_reference_for_single_samples(pair, shapes):
    ours, ref = pair
    batch = make_batch(shapes, VOCAB, seed=len(shapes[0]) + shapes[0][0])
    with torch.no_grad():
        got = logits(ours, batch)
    want = ref_logits(ref, batch)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


def test_logits_equal_reference_on_left_padded_batch(pair):
    ours, ref = pair
    batch = make_batch([(3, 4, 6), (1, 2, 3), (0, 0, 4)], VOCAB, seed=3)
    with torch.no_grad():
        got = logits(ours, batch)
    want = ref_logits(ref, batch)
    real = batch.attention_mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("shapes", [[(3, 4, 6)], [(4, 5, 3), (2, 3, 7), (1, 6, 2)], [(0, 0, 9)]])
def test_greedy_generation_matches_reference(pair, shapes):
    ours, ref = pair
    batch = make_batch(shapes, VOCAB, seed=11)
    got = generate(ours, batch, max_new_tokens=24)
    with torch.no_grad():
        out = ref.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           image_patches=batch.per_sample_patches, max_new_tokens=24,
                           do_sample=False, pad_token_id=ours.config.eos_token_id)
    want = out[:, batch.input_ids.shape[1]:]
    assert got.tolist() == want.tolist()


def test_loss_matches_reference(pair):
    ours, ref = pair
    batch = make_batch([(2, 3, 8), (1, 2, 4)], VOCAB, seed=5)
    # A label whose predecessor is a pad would be predicted from a pad query: meaningless in both.
    prev_pad = torch.nn.functional.pad(batch.attention_mask, (1, 0))[:, :-1] == 0
    labels = batch.input_ids.masked_fill(prev_pad | (batch.attention_mask == 0), -100)
    got = loss(ours, batch, labels)
    with torch.no_grad():
        want = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   image_patches=batch.per_sample_patches, labels=labels,
                   position_ids=position_ids(batch.attention_mask)).loss
    assert abs(got.item() - want.item()) < 1e-4
