"""Shared image prefixes: several prompts continue one encoded image, as if each ran alone."""

import pytest
import torch

from fuyu.model import encode_prefix, generate, load_pretrained, prefill
from fuyu.testing.checkpoint import PLAIN_IDS, make_checkpoint
from fuyu.testing.batches import sample_ids

VOCAB = 300


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("prefix"), hidden=96, heads=6, layers=3,
                           vocab_size=VOCAB, tokenizer=False, seed=5)
    return load_pretrained(ckpt, dtype=torch.float32)


def left_pad(rows: list[list[int]]):
    T = max(map(len, rows))
    ids = torch.tensor([[PLAIN_IDS["pad"]] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_continuations_of_a_shared_prefix_decode_as_separate_full_prompts(fp32):
    g = torch.Generator().manual_seed(0)
    rows, cols = 3, 4
    images = [sample_ids(rows, cols, 0, g, VOCAB) for _ in range(2)]  # (ids, patches); ids end <s> <0x04>
    n_image = rows * (cols + 1)
    prefix_ids = torch.tensor([ids[:n_image] for ids, _ in images])  # (2, P): |SPEAKER|/|NEWLINE| rows
    patches = torch.cat([p for _, p in images])
    # Four prompts of different lengths, two per image, in an order that mixes the images.
    texts = [sample_ids(0, 0, n, g, VOCAB)[0] for n in (5, 2, 7, 3)]  # <s> text <0x04>
    which = torch.tensor([1, 0, 0, 1])
    ids, mask = left_pad(texts)

    prefix = encode_prefix(fp32, prefix_ids, patches)
    shared = generate(fp32, dict(input_ids=ids, attention_mask=mask), 12, eos_id=-1, prefix=prefix, rows=which)
    _, shared_last = prefill(fp32, dict(input_ids=ids, attention_mask=mask), 4, prefix=prefix, rows=which)
    for i, (text, row) in enumerate(zip(texts, which.tolist())):
        full = torch.tensor([images[row][0][:n_image] + text])
        alone = dict(input_ids=full, attention_mask=torch.ones_like(full),
                     image_patches=images[row][1])
        assert shared[i].tolist() == generate(fp32, alone, 12, eos_id=-1)[0].tolist(), f"prompt {i}"
        _, last = prefill(fp32, alone, 4)
        assert (shared_last[i] - last[0]).abs().max().item() < 1e-4


def test_rows_must_match_the_continuations(fp32):
    prefix = encode_prefix(fp32, torch.tensor([[5, 5, 6]]), torch.zeros(2, 2700))
    with pytest.raises(ValueError, match="rows has shape"):
        prefill(fp32, dict(input_ids=torch.tensor([[1, 9, 8]])), 2, prefix=prefix, rows=torch.tensor([0, 0]))
