"""Patches, sequence layout, batching, decoding and package hygiene."""

from __future__ import annotations

import ast
import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fuyu.preprocess import FuyuBatch, PreprocessError
from fuyu.preprocess.patches import patchify

CAPTION_BACKSLASH = "Generate a coco-style caption.\\n"  # as in the HF processor tests
ROOT = Path(__file__).resolve().parents[1]


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def reference_normalise(v: np.ndarray) -> np.ndarray:
    """The reference's normalisation: float32(u8 × (1/255)) in float64, then (x − 0.5) / 0.5 in float32."""
    x = (v.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(0.5)) / np.float32(0.5)


def test_normalisation_is_bit_exact_for_every_uint8_value():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    got = patchify(values).view(30, 30, 3)[:16, :16]
    assert np.array_equal(got.numpy(), reference_normalise(values))


def test_patch_element_order_is_row_major_patches_then_dy_dx_channel():
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (65, 95, 3), dtype=np.uint8)  # 3 × 4 patches, partial last row/column
    out = patchify(px)
    rows, cols = 3, 4
    assert out.shape == (rows * cols, 2700) and out.dtype == torch.float32
    padded = np.full((90, 120, 3), 1, np.uint8)
    padded[:65, :95] = px
    norm = reference_normalise(padded)
    for i, j, dy, dx, c in [(0, 0, 0, 0, 0), (1, 2, 5, 7, 2), (2, 3, 29, 29, 1), (2, 0, 4, 0, 0), (0, 3, 0, 14, 2)]:
        assert out[i * cols + j, (dy * 30 + dx) * 3 + c].item() == norm[30 * i + dy, 30 * j + dx, c]


def test_padding_is_one_grey_level_in_uint8_units():
    out = patchify(np.full((31, 29, 3), 255, np.uint8))  # 2 × 1 patches
    second = out[1].view(30, 30, 3)
    assert torch.all(second[0, :29] == 1.0)  # row 30 of the image
    torch.testing.assert_close(second[1:], torch.full_like(second[1:], -0.99215686), atol=1e-7, rtol=0)
    assert torch.all(out[0].view(30, 30, 3)[:, 29] == second[1, 0])  # column 29 is padding too


def test_small_images_never_build_a_full_canvas(proc):
    im = image(300, 400)
    proc(images=[im], prompts=["x"])  # warm caches
    tracemalloc.start()
    proc(images=[im], prompts=["x"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * 1080 * 1920 * 4 / 4, peak  # a float canvas would be 24.9 MB


def expected_ids(tok, rows, cols, prompt):
    return ([tok.speaker_id] * cols + [tok.newline_id]) * rows + [tok.bos_id] + tok.encode(prompt) + [tok.boa_id]


def test_bus_layout_is_14_rows_of_22_patches(proc, tok):
    # bus.png resizes into (390, 420] × (630, 660]: 14 rows × 22 columns, 308 patches, 322 image tokens
    batch = proc(images=[image(400, 640)], prompts=[CAPTION_BACKSLASH])
    ids = batch.input_ids[0].tolist()
    assert ids == expected_ids(tok, 14, 22, CAPTION_BACKSLASH)
    assert batch.image_patches.shape == (308, 2700)
    assert ids[321] == tok.newline_id and ids[322] == tok.bos_id and ids[-1] == tok.boa_id


def test_resized_bus_is_10_rows_of_3_and_pads_to_the_bus(proc, tok):
    small = image(300, 64)  # bus.resize((64, 300)): w × h
    batch = proc(images=[image(400, 640), small], prompts=[CAPTION_BACKSLASH] * 2)
    assert batch.input_ids[1].tolist() == [0] * 282 + expected_ids(tok, 10, 3, CAPTION_BACKSLASH)
    assert batch.attention_mask[1].tolist() == [0] * 282 + [1] * (batch.input_ids.shape[1] - 282)
    assert batch.image_patches.shape == (308 + 30, 2700)


def test_image_only_prompt_and_model_card_newline(proc, tok):
    assert proc(images=[image(400, 640)], prompts=[""]).input_ids[0, -2:].tolist() == [tok.bos_id, tok.boa_id]
    ids = proc(images=[image(400, 640)], prompts=["Generate a coco-style caption.\n"]).input_ids[0].tolist()
    assert tok.pieces[ids[-2]] == "<0x0A>" and tok.pieces[ids[-3]] == "."  # real newline: byte piece


@pytest.mark.parametrize("h,w,rows,cols", [(7, 20, 1, 1), (1080, 1920, 36, 64), (2160, 3840, 36, 64)])
def test_grid_sizes(proc, h, w, rows, cols):
    batch = proc(images=[image(h, w)], prompts=[""])
    assert batch.image_patches.shape[0] == rows * cols
    assert batch.input_ids.shape[1] == rows * (cols + 1) + 2


def test_text_only_sample_has_no_image_tokens(proc, tok):
    batch = proc(images=[image(64, 64), None], prompts=["What is 2+2?\n"] * 2)
    row = batch.input_ids[1][batch.attention_mask[1] == 1].tolist()
    assert row == [tok.bos_id] + tok.encode("What is 2+2?\n") + [tok.boa_id]
    assert batch.image_sizes == [(64, 64), None] and batch.scale_factors == [1.0, None]
    assert batch.image_patches.shape == (9, 2700)
    only_text = proc(images=None, prompts=["hi"])
    assert only_text.image_patches.shape == (0, 2700) and only_text.image_patches.dtype == torch.float32


def test_patches_are_concatenated_in_sample_order(proc):
    a, b = image(60, 90, 1), image(30, 30, 2)
    batch = proc(images=[a, None, b], prompts=["x", "y", "z"])
    one, two = (proc(images=[im], prompts=["x"]).image_patches for im in (a, b))
    assert torch.equal(batch.image_patches, torch.cat([one, two]))
    assert int((batch.input_ids == proc.tokenizer.speaker_id).sum()) == batch.image_patches.shape[0]


def test_prepare_one_on_threads_then_collate_equals_call(proc, tmp_path):
    paths = []
    for i, (h, w) in enumerate([(50, 70), (1200, 700), (31, 29), (400, 640)]):
        image(h, w, i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    prompts = ["a", "<box>2, 4, 6, 8</box>", "c", "d\n"]
    with ThreadPoolExecutor(4) as pool:
        samples = list(pool.map(proc.prepare_one, paths, prompts))
    assert [s.name for s in samples] == [str(p) for p in paths]
    threaded, direct = proc.collate(samples), proc(images=paths, prompts=prompts)
    assert torch.equal(threaded.input_ids, direct.input_ids)
    assert torch.equal(threaded.image_patches, direct.image_patches)


def test_batch_to_moves_tensors_and_keeps_float32_patches(proc):
    batch = proc(images=[image(40, 40)], prompts=["x"])
    moved = batch.to("meta")
    assert isinstance(moved, FuyuBatch) and moved.input_ids.device.type == "meta"
    assert moved.image_patches.dtype == torch.float32 and moved.image_sizes == batch.image_sizes
    assert batch.input_ids.device.type == "cpu" and len(batch) == 1


def test_one_image_per_prompt_is_enforced(proc):
    with pytest.raises(PreprocessError, match="2 images for 1 prompts"):
        proc(images=[image(5, 5), image(5, 5)], prompts=["x"])
    with pytest.raises(PreprocessError, match="no samples"):
        proc.collate([])


def test_decode_cuts_each_row_at_the_first_endoftext(proc, tok):
    eos = tok.eos_id
    rows = [tok.encode("A blue bus.") + [eos, eos, eos], tok.encode("Hi") + [eos] + tok.encode("junk") + [eos]]
    width = max(map(len, rows))
    new = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    assert proc.decode(new) == ["A blue bus.", "Hi"]
    assert proc.decode(torch.tensor([tok.encode("no eos")])) == ["no eos"]


def test_preprocess_never_imports_transformers_or_model():
    for path in (ROOT / "preprocess").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "transformers" or n.startswith("fuyu.model") or n in ("model", ".model")
                           for n in names), (path, names)
    code = "import sys, fuyu.preprocess; bad = [m for m in sys.modules if m.split('.')[0] == 'transformers' or m.startswith('fuyu.model')]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_uint8_patches_normalised_by_the_model_are_the_float32_ones_bit_for_bit(tmp_path):
    """A processor for a GPU hands uint8 patches (4× smaller to upload); the model normalises them
    on their device: every uint8 value, and a whole batch's logits, the same as the float path."""
    import torch

    from fuyu.model import load_pretrained, logits
    from fuyu.model.fuyu import normalised
    from fuyu.preprocess import FuyuProcessor
    from fuyu.testing.checkpoint import make_checkpoint
    from fuyu.testing.tokenizer import vocab_size

    values = (np.arange(60 * 60 * 3) % 256).astype(np.uint8).reshape(60, 60, 3)  # every value, 2 × 2 patches
    as_uint8 = patchify(values, normalise=False)
    assert as_uint8.dtype == torch.uint8
    assert torch.equal(normalised(as_uint8), patchify(values))
    assert np.array_equal(normalised(torch.arange(256, dtype=torch.uint8)).numpy(),
                          reference_normalise(np.arange(256, dtype=np.uint8)))
    ckpt = make_checkpoint(tmp_path / "m", vocab_size=vocab_size())
    model = load_pretrained(ckpt, dtype=torch.float32, kernels="plain")
    images = [Image.fromarray(values), Image.fromarray(values[:, :40])]
    prompts = ["Generate a coco-style caption.\n"] * 2
    floats = FuyuProcessor.from_pretrained(ckpt)(images=images, prompts=prompts)
    ints = FuyuProcessor.from_pretrained(ckpt, uint8_patches=True)(images=images, prompts=prompts)
    assert ints.image_patches.dtype == torch.uint8 and floats.image_patches.dtype == torch.float32
    with torch.inference_mode():
        assert torch.equal(logits(model, ints), logits(model, floats))
