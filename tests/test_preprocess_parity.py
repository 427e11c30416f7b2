"""Parity with the reference processor (transformers 4.57.6 FuyuProcessor) on the tiny tokenizer."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fuyu.preprocess import FuyuProcessor, box_to_text_prompt
from fuyu.testing.tokenizer import special_ids

pytestmark = pytest.mark.parity
transformers = pytest.importorskip("transformers")

CAPTION = "Generate a coco-style caption.\n"
PROMPTS = [
    CAPTION,
    "Generate a coco-style caption.\\n",  # the HF tests' literal backslash-n
    "What color is the bus?\n",
    box_to_text_prompt((20, 10, 26, 28)),
    "Look at <point>10, 24</point> now, then <box>4, 8, 20, 24</box>.\n",
    "<box>0, 0, 2, 2</box>",
    "Héllo wörld ☃, in 2018 is 80.7.\n",
]


@pytest.fixture(scope="module")
def oracle(ckpt):
    from transformers import AutoTokenizer, FuyuImageProcessor
    from transformers import FuyuProcessor as Reference

    transformers.utils.logging.set_verbosity_error()
    return Reference(image_processor=FuyuImageProcessor(), tokenizer=AutoTokenizer.from_pretrained(ckpt))


@functools.lru_cache(maxsize=None)
def make_image(h: int, w: int, seed: int = 0) -> Image.Image:
    """Gradients, a xor pattern and noise, so resizing has real work to do (cached: never mutated)."""
    x = (np.arange(w) * 255 // w).astype(np.uint8)
    y = (np.arange(h) * 255 // h).astype(np.uint8)
    a = np.empty((h, w, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = x, y[:, None], x ^ y[:, None]
    a += np.random.default_rng(seed).integers(0, 48, (h, w, 3), dtype=np.uint8)  # wraps: just texture
    return Image.fromarray(a)


def reference(oracle, images, prompts):
    """(input_ids, attention_mask, patches concatenated [P, 2700]) from the oracle."""
    out = oracle(images=images, text=prompts, input_data_format="channels_last")  # no HWC/CHW guessing
    patches = out["image_patches"]
    patches = list(patches) if isinstance(patches, (list, tuple)) else [patches]
    return out["input_ids"], out["attention_mask"], torch.cat([p.reshape(-1, 2700) for p in patches])


def assert_same(batch, ref):
    ids, mask, patches = ref
    assert torch.equal(batch.input_ids, ids)
    assert torch.equal(batch.attention_mask, mask)
    assert batch.image_patches.shape == patches.shape
    torch.testing.assert_close(batch.image_patches, patches, atol=1e-6, rtol=0)


def test_oracle_tokenizer_emits_the_space_piece_first(oracle, ckpt):
    ids = special_ids(ckpt)
    assert oracle.tokenizer.encode("|SPEAKER|", add_special_tokens=False) == [ids["space"], ids["speaker"]]
    assert (oracle.image_token_id, oracle.image_newline_id) == (ids["speaker"], ids["newline"])


SIZES = [  # (height, width)
    (1, 1), (2, 3), (29, 31), (31, 29), (30, 30), (64, 300), (300, 64), (333, 777), (720, 1280),
    (1080, 1920),  # exactly the target: no resize
    (1080, 2500),  # wider than 1920
    (1500, 1000),  # taller than 1080
    (1081, 1921), (1921, 1081), (1079, 1921), (4000, 100), (100, 5000), (3000, 4000),
]


@pytest.mark.parametrize("h,w", SIZES)
def test_single_image_matches_reference(proc, oracle, h, w):
    im = make_image(h, w, seed=h * 7 + w)
    prompt = PROMPTS[(h + w) % len(PROMPTS)]
    batch = proc(images=[im], prompts=[prompt])
    assert_same(batch, reference(oracle, [im], [prompt]))
    assert batch.image_sizes == [(h, w)]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompts_with_boxes_and_points_match_reference(proc, oracle, prompt):
    im = make_image(1500, 1000, seed=3)  # scale 0.72: coordinates really get rescaled
    assert_same(proc(images=[im], prompts=[prompt]), reference(oracle, [im], [prompt]))


def test_mixed_size_batch_is_left_padded_like_reference(proc, oracle):
    images = [make_image(1080, 1920, 1), make_image(29, 31, 2), make_image(1500, 1000, 3), make_image(64, 300, 4)]
    prompts = [PROMPTS[0], PROMPTS[4], PROMPTS[3], PROMPTS[2]]
    batch = proc(images=images, prompts=prompts)
    assert_same(batch, reference(oracle, images, prompts))
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum()


def test_grey_image_matches_reference_on_its_rgb_copy(proc, oracle):
    grey = make_image(1300, 2100, seed=5).convert("L")  # resized as L internally: must not change a pixel
    assert_same(proc(images=[grey], prompts=[CAPTION]), reference(oracle, [grey.convert("RGB")], [CAPTION]))


def test_scale_factor_is_the_reference_float32_height_ratio(proc, oracle):
    for h, w in [(1079, 1921), (3000, 4000), (100, 5000)]:
        im = make_image(h, w)
        enc = oracle.image_processor.preprocess(im, return_tensors="pt", input_data_format="channels_last")
        assert proc(images=[im], prompts=[""]).scale_factors == [enc["image_scale_factors"][0][0].item()]


BOX_CASES = [  # (height, width, model coordinates y1, x1, y2, x2)
    (1080, 1920, (194, 213, 202, 244)),
    (3000, 4000, (10, 20, 500, 700)),
    (1500, 1000, (0, 0, 539, 359)),
    (1081, 1921, (1, 950, 539, 959)),
    (640, 480, (100, 120, 300, 239)),
]


@pytest.mark.parametrize("h,w,coords", BOX_CASES)
def test_boxes_agree_with_reference_post_processing(proc, oracle, ckpt, h, w, coords):
    ids = special_ids(ckpt)
    n0 = ids["number_0"]
    text = proc.tokenizer.encode("Box")
    new_ids = torch.tensor([text + [ids["box_open"], *[n0 + c for c in coords], ids["box_close"], ids["eos"]]])
    batch = proc(images=[make_image(h, w)], prompts=[CAPTION])
    (box,), = proc.boxes(new_ids, batch)
    out = oracle.post_process_box_coordinates(new_ids, target_sizes=torch.tensor([[h, w]]))
    decoded = oracle.tokenizer.decode(out[0], skip_special_tokens=True)
    top, left, bottom, right = map(int, re.search(r"<box>(\d+), (\d+), (\d+), (\d+)</box>", decoded).groups())
    assert np.abs(np.array(box) - np.array([left, top, right, bottom])).max() <= 2


def test_decode_matches_reference_on_random_ids(proc, oracle):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, proc.tokenizer.vocab_size, (50, 12), generator=g)
    eos = proc.tokenizer.eos_id
    ids[ids == eos] = 0  # decode() cuts at EOS; the reference would just skip it
    expected = [oracle.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    assert proc.decode(ids) == expected


@pytest.mark.parametrize("text", [
    "|SPEAKER|", " ", "  a  b ", "x\n\ny", "in 2018 is 80.7.\n", "Héllo wörld ☃ 日本", "tab\there",
    "Williams", "What is the highest life expectancy at birth of male?\n", "ﬁ Ａ", "0 999 1000 12345",
])
def test_encode_matches_reference_tokenizer(proc, oracle, text):
    assert proc.tokenizer.encode(text) == oracle.tokenizer.encode(text, add_special_tokens=False)
