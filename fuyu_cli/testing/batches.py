"""Hand-built Fuyu batches (no processor needed): image rows, <s>, text, <0x04>, left padding."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fuyu.testing.checkpoint import PLAIN_IDS


def sample_ids(rows: int, cols: int, n_text: int, g: torch.Generator, vocab: int, ids=PLAIN_IDS):
    """One sample's ids (list) and its patches (rows*cols, 2700); rows=0 means text-only."""
    image = ([ids["speaker"]] * cols + [ids["newline"]]) * rows
    specials = set(ids.values())
    text = [t for t in torch.randint(10, vocab, (n_text * 2,), generator=g).tolist()
            if t not in specials][:n_text]
    patches = torch.rand(rows * cols, 2700, generator=g) * 2 - 1
    return image + [ids["bos"]] + text + [ids["boa"]], patches


def make_batch(shapes, vocab: int, seed: int = 0, ids=PLAIN_IDS):
    """shapes: [(rows, cols, n_text)] → batch with input_ids/attention_mask/image_patches, plus
    `per_sample_patches` (the reference's list form)."""
    g = torch.Generator().manual_seed(seed)
    samples = [sample_ids(r, c, n, g, vocab, ids) for r, c, n in shapes]
    T = max(len(s) for s, _ in samples)
    input_ids = torch.tensor([[ids["pad"]] * (T - len(s)) + s for s, _ in samples])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s, _ in samples])
    per_sample = [p[None] for _, p in samples if len(p)]
    patches = torch.cat([p for _, p in samples]) if per_sample else torch.zeros(0, 2700)
    return SimpleNamespace(input_ids=input_ids, attention_mask=mask, image_patches=patches,
                           per_sample_patches=per_sample or None)
