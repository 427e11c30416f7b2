"""The prompt, built here only: each task's text (model-card wording), and text -> the ids that
follow the image's rows, <s> prompt <0x04>, with <box>/<point> rewritten to coordinate tokens."""

from __future__ import annotations

import re

from fuyu.preprocess.boxes import Box, to_model_coords
from fuyu.preprocess.errors import PromptError
from fuyu.preprocess.tokenizer import Tokenizer

# "\n" is a real newline, as on the model card (the HF tests spell it as backslash-n, which
# tokenises differently).
TASK_PROMPTS = {
    "caption": "Generate a coco-style caption.\n",
    "ask": "{question}\n",
    "bbox": "When presented with a box, perform OCR to extract text contained within it. "
            "If provided with text, generate the corresponding bounding box.\n",
}

# The reference rewrites the tags to byte-piece names, then splits on those names, so a literal
# "<0x00>" in a prompt acts as <box> too; we keep that.
_TAGS = {"<point>": "<0x02>", "</point>": "<0x03>", "<box>": "<0x00>", "</box>": "<0x01>"}
_SPLIT = re.compile("(<0x00>|<0x01>|<0x02>|<0x03>)")
_OPENERS = {"<0x00>": ("box", 4, "y1, x1, y2, x2 (top, left, bottom, right)"),
            "<0x02>": ("point", 2, "x, y")}


def task_prompt(task: str, text: str | None = None, box=None) -> str:
    """The prompt of a task: caption (text: one's own prompt instead of the model card's), ask (text:
    the question), bbox (text: what to find), ocr (box: x0, y0, x1, y1 pixels to read)."""
    if task == "ocr":
        return box_to_text_prompt(box)
    if task == "bbox":
        return text_to_box_prompt(text)
    if task == "caption" and not text:
        return TASK_PROMPTS["caption"]
    if task in ("ask", "caption"):
        return ask_prompt(text)  # a question or one's own prompt, ending in one newline
    raise ValueError(f"unknown task {task!r}")


def ask_prompt(question: str) -> str:
    """A question prompt: the question with exactly one trailing newline."""
    return TASK_PROMPTS["ask"].format(question=question.rstrip("\n"))


def text_to_box_prompt(text: str) -> str:
    """Ask for the bounding box of `text`; the answer is <0x00> y1 x1 y2 x2 <0x01>."""
    return TASK_PROMPTS["bbox"] + text


def box_to_text_prompt(box: Box | tuple[float, float, float, float]) -> str:
    """Ask for the text inside `box`, given as (x0, y0, x1, y1) in original-image pixels."""
    x0, y0, x1, y1 = box
    return TASK_PROMPTS["bbox"] + f"<box>{_num(y0)}, {_num(x0)}, {_num(y1)}, {_num(x1)}</box>"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(float(v))


def prompt_ids(text: str, scale: float, tok: Tokenizer) -> list[int]:
    """What follows an image's rows (or starts a text-only sample): <s> prompt <0x04>."""
    return [tok.bos_id, *encode_prompt(text, scale, tok), tok.boa_id]


def encode_prompt(text: str, scale: float, tok: Tokenizer) -> list[int]:
    """Prompt ids (no <s>, no <0x04>). Text between tags is tokenised fragment by fragment, each
    with its own leading "▁"; each <box>/<point> becomes open, number tokens, close."""
    if not isinstance(text, str):
        raise PromptError(f"prompt must be a str, got {type(text).__name__}")
    for tag, piece in _TAGS.items():
        text = text.replace(tag, piece)
    parts = _SPLIT.split(text)
    ids: list[int] = []
    for i, part in enumerate(parts):
        if not part or part in _TAGS.values():
            continue
        opener = parts[i - 1] if i > 0 else None
        if opener not in _OPENERS:
            ids += tok.encode(part)
            continue
        kind, count, order = _OPENERS[opener]
        values = _parse_numbers(part, kind, count, order)
        if kind == "box":
            ids += [tok.box_open_id, *map(tok.number_id, to_model_coords(values, scale)), tok.box_close_id]
        else:
            ids += [tok.point_open_id, *map(tok.number_id, to_model_coords(values, scale)), tok.point_close_id]
    if tok.speaker_id in ids:
        raise PromptError("prompt contains |SPEAKER|, the image placeholder token; remove it")
    return ids


def _parse_numbers(part: str, kind: str, count: int, order: str) -> list[float]:
    fields = part.split(",")
    try:
        values = [float(f.strip()) for f in fields]
    except ValueError:
        values = []
    if len(values) != count or len(fields) != count:
        raise PromptError(f"<{kind}>{part}</{kind}>: expected {count} comma-separated numbers, {order}")
    return values
