"""Prompts with <box>/<point>, the task table, and generated coordinates back to pixels."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fuyu.preprocess import (TASK_PROMPTS, Box, FuyuProcessor, PromptError, ask_prompt, box_to_text_prompt,
                        task_prompt, text_to_box_prompt)
from fuyu.preprocess.boxes import find_spans, to_model_coords
from fuyu.preprocess.prompt import encode_prompt

INSTRUCTION = ("When presented with a box, perform OCR to extract text contained within it. "
               "If provided with text, generate the corresponding bounding box.\n")


def image(h: int, w: int) -> Image.Image:
    return Image.new("RGB", (w, h), (90, 120, 30))


def test_task_prompts_use_the_model_card_wording():
    assert TASK_PROMPTS["caption"] == "Generate a coco-style caption.\n"
    assert TASK_PROMPTS["bbox"] == INSTRUCTION
    assert ask_prompt("What color is the bus?") == ask_prompt("What color is the bus?\n") == "What color is the bus?\n"
    assert text_to_box_prompt("Williams") == INSTRUCTION + "Williams"


def test_each_task_has_its_prompt_in_one_table():
    # The CLI's records ask preprocess for every prompt (fuyu.records.Ask.prompt -> task_prompt).
    assert task_prompt("caption") == TASK_PROMPTS["caption"]
    assert task_prompt("caption", "Describe the UI.") == "Describe the UI.\n"
    assert task_prompt("ask", "Total?\n\n") == "Total?\n"
    assert task_prompt("bbox", "Save") == INSTRUCTION + "Save"
    assert task_prompt("ocr", box=(1, 2, 3, 4)) == INSTRUCTION + "<box>2, 1, 4, 3</box>"
    with pytest.raises(ValueError, match="unknown task"):
        task_prompt("summarise", "x")


def test_prompts_about_one_image_share_its_rows_and_each_follows_them_once(proc, tok):
    # prepare_many = prepare_one per prompt; ids[:prefix_len] are the image's rows, then <s> prompt <0x04>.
    img = image(60, 90)
    many = proc.prepare_many(img, ["Total?\n", "Date?\n"])
    for sample, prompt in zip(many, ["Total?\n", "Date?\n"]):
        one = proc.prepare_one(img, prompt)
        P = sample.prefix_len
        assert sample.ids == one.ids and P == one.prefix_len == 2 * (3 + 1)  # 2 rows of 3 patches + |NEWLINE|
        assert set(sample.ids[:P]) == {tok.speaker_id, tok.newline_id}
        assert sample.ids[P:] == [tok.bos_id, *encode_prompt(prompt, sample.scale, tok), tok.boa_id]
    assert many[0].patches is many[1].patches


def test_box_to_text_takes_user_order_and_writes_top_left_bottom_right():
    assert box_to_text_prompt(Box(x0=428, y0=388, x1=488, y1=404)) == INSTRUCTION + "<box>388, 428, 404, 488</box>"
    assert box_to_text_prompt((1.5, 2, 3, 4)).endswith("<box>2, 1.5, 4, 3</box>")


def test_coordinates_round_half_to_even():
    # ÷2 gives 2.5, 3.5, 4.5, 5.5 -> 2, 4, 4, 6 (np.round), as the reference
    assert to_model_coords([5, 7, 9, 11], 1.0) == [2, 4, 4, 6]
    assert to_model_coords([1998, 0], 1.0) == [999, 0]


def test_spec_point_example(tok):
    ids = encode_prompt("Look at <point>100, 250</point> now", 0.5, tok)
    assert ids == tok.encode("Look at ") + [tok.point_open_id, tok.number_id(25), tok.number_id(62),
                                            tok.point_close_id] + tok.encode(" now")


def test_spec_box_example_tail(tok):
    ids = encode_prompt(INSTRUCTION + "<box>388, 428, 404, 488</box>", 1.0, tok)
    assert ids[-6:] == [tok.box_open_id, *map(tok.number_id, (194, 214, 202, 244)), tok.box_close_id]
    assert ids[:-6] == tok.encode(INSTRUCTION)


def test_literal_byte_piece_names_act_as_tags_like_the_reference(tok):
    assert encode_prompt("<0x00>2, 4, 6, 8<0x01>", 1.0, tok) == encode_prompt("<box>2, 4, 6, 8</box>", 1.0, tok)


def test_unterminated_box_still_encodes_like_the_reference(tok):
    assert encode_prompt("a <box>2, 4, 6, 8", 1.0, tok) == encode_prompt("a <box>2, 4, 6, 8</box>", 1.0, tok)


def test_known_keyerror_case_is_a_prompt_error(proc):
    # On a 1280×1080 (h×w) image 4233 -> 1786, which has no token: the reference raises KeyError.
    with pytest.raises(PromptError, match=r"4233 becomes 1786.*outside the model's 0…999"):
        proc(images=[image(1280, 1080)], prompts=["<box>1000, 1010, 2000, 4233</box>"])


@pytest.mark.parametrize("prompt,message", [
    ("<box>-10, 0, 4, 4</box>", "outside"),
    ("<box>1, 2, 3</box>", "expected 4 comma-separated numbers"),
    ("<box>1, 2, 3, 4, 5</box>", "expected 4"),
    ("<point>1, 2, 3, 4</point>", "expected 2 comma-separated numbers, x, y"),
    ("<box>a, b, c, d</box>", "expected 4"),
    ("<box>1, 2, 3, 4 and text</box>", "expected 4"),
    ("<point>nan, 2</point>", "not a finite number"),
    ("<point>inf, 2</point>", "not a finite number"),
    ("look |SPEAKER| here", "image placeholder"),
])
def test_bad_prompts_raise_prompt_error_naming_the_image(proc, tmp_path, prompt, message):
    image(40, 40).save(tmp_path / "shot.png")
    with pytest.raises(PromptError, match=message) as info:
        proc(images=[tmp_path / "shot.png"], prompts=[prompt])
    assert str(info.value).startswith(str(tmp_path / "shot.png"))


def test_too_long_prompt_is_a_prompt_error(proc):
    short = FuyuProcessor(proc.tokenizer, max_length=50)
    with pytest.raises(PromptError, match="over the limit of 50"):
        short(images=[image(60, 60)], prompts=["word " * 60])


def test_prompt_must_be_a_string(proc):
    with pytest.raises(PromptError, match="must be a str"):
        proc(images=[None], prompts=[b"bytes"])


def generated(tok, *spans, tail=()):
    """Ids as a model would emit them: some text, then the spans, then EOS, then padding."""
    return tok.encode("Here") + [t for span in spans for t in span] + [tok.eos_id, *tail]


def box_ids(tok, y0, x0, y1, x1):
    return [tok.box_open_id, *map(tok.number_id, (y0, x0, y1, x1)), tok.box_close_id]


def test_boxes_come_back_in_pixels_user_order(proc, tok):
    batch = proc(images=[image(3000, 4000), image(500, 800)], prompts=["a", "b"])
    new = torch.tensor([generated(tok, box_ids(tok, 10, 20, 500, 700), tail=[tok.eos_id] * 6),  # EOS padding
                        generated(tok, box_ids(tok, 5, 6, 7, 8), box_ids(tok, 0, 0, 1, 1))])
    first, second = proc.boxes(new, batch)
    assert first == [Box(x0=111, y0=56, x1=3889, y1=2778)]  # ×2 ÷ 0.36
    assert second == [Box(12, 10, 16, 14), Box(0, 0, 2, 2)]  # no resize: ×2
    assert proc.boxes(new, [(3000, 4000), (500, 800)]) == [first, second]  # each row's image size is enough


def test_boxes_are_clamped_to_the_image(proc, tok):
    batch = proc(images=[image(100, 200)], prompts=["a"])
    assert proc.boxes(torch.tensor([generated(tok, box_ids(tok, 10, 20, 999, 999))]), batch) == [
        [Box(40, 20, 200, 100)]]


def test_box_prompt_round_trips_through_generated_tokens(proc, tok):
    """box -> prompt tokens -> (as if generated) -> box: within 2 px, for resized images too."""
    for h, w, box in [(3000, 4000, Box(400, 300, 2000, 1200)), (1081, 1921, Box(10, 20, 1900, 1070)),
                      (640, 480, Box(33, 44, 55, 66)), (200, 6000, Box(100, 10, 5900, 190))]:
        batch = proc(images=[image(h, w)], prompts=[box_to_text_prompt(box)])
        ids = batch.input_ids[0].tolist()
        start = ids.index(tok.box_open_id)
        (back,), = proc.boxes(torch.tensor([ids[start:start + 6]]), batch)
        assert max(abs(a - b) for a, b in zip(back, box)) <= 2 / batch.scale_factors[0] + 1, (h, w, back)


def test_points_come_back_in_pixels(proc, tok):
    batch = proc(images=[image(1080, 1920)], prompts=["a"])
    new = torch.tensor([generated(tok, [tok.point_open_id, tok.number_id(25), tok.number_id(62), tok.point_close_id])])
    assert proc.points(new, batch) == [[(50, 124)]]


def test_text_only_samples_decode_coordinates_by_doubling(proc, tok):
    batch = proc(images=[None], prompts=["<box>20, 40, 60, 80</box>"])
    ids = batch.input_ids[0].tolist()
    assert ids[ids.index(tok.box_open_id):][:6] == box_ids(tok, 10, 20, 30, 40)
    assert proc.boxes(torch.tensor([generated(tok, box_ids(tok, 10, 20, 30, 40))]), batch) == [
        [Box(40, 20, 80, 60)]]


def test_spans_after_eos_are_ignored(proc, tok):
    batch = proc(images=[image(100, 100)], prompts=["a"])
    new = torch.tensor([generated(tok, tail=box_ids(tok, 1, 2, 3, 4))])
    assert proc.boxes(new, batch) == [[]]


@pytest.mark.parametrize("ids,found,problems", [
    ([0, 1, 5, 6, 7, 8, 2], [[5, 6, 7, 8]], 0),  # well formed
    ([1, 5, 6, 7, 8, 2], [[5, 6, 7, 8]], 0),  # open tag at index 0 (the reference misses it)
    ([0, 1, 5, 6, 7, 2], [], 1),  # three numbers: the reference loops forever here
    ([0, 1, 5, 6, 7, 8, 9, 2], [], 1),  # five numbers
    ([0, 1, 5, 99, 7, 8, 2], [], 1),  # a non-number inside
    ([0, 1, 5, 6], [], 1),  # unterminated at the end
    ([1, 1, 5, 6, 7, 8, 2], [[5, 6, 7, 8]], 1),  # a stray open before a good span
    ([2, 1, 5, 6, 7, 8, 2, 1], [[5, 6, 7, 8]], 1),  # stray close is ignored, trailing open reported
])
def test_malformed_spans_are_reported_and_skipped(ids, found, problems):
    number_of = lambda t: t if 3 <= t <= 90 else None  # noqa: E731
    spans, reported = find_spans(ids, 1, 2, 4, number_of)
    assert spans == found and len(reported) == problems


def test_malformed_boxes_warn_by_default_or_go_to_the_callback(proc, tok):
    batch = proc(images=[image(100, 100)], prompts=["a"])
    new = torch.tensor([generated(tok, [tok.box_open_id, tok.number_id(1), tok.box_close_id])])
    with pytest.warns(RuntimeWarning, match="malformed span at token"):
        assert proc.boxes(new, batch) == [[]]
    seen = []
    assert proc.boxes(new, batch, on_problem=seen.append) == [[]]
    assert len(seen) == 1 and seen[0].startswith("<PIL RGB image>")
