"""FuyuProcessor: images + prompts -> FuyuBatch, and generated ids -> text, boxes and points."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fuyu.preprocess.batch import FuyuBatch, Sample, collate
from fuyu.preprocess.boxes import Box, find_spans, to_pixels
from fuyu.preprocess.errors import PreprocessError, PromptError
from fuyu.preprocess.image import ImageInput, describe, fit_size, load_image, resize_to_fit
from fuyu.preprocess.pages import Page, load_page
from fuyu.preprocess.patches import PATCH_DIM, grid, image_token_ids, patchify
from fuyu.preprocess.prompt import prompt_ids
from fuyu.preprocess.tokenizer import Tokenizer

MAX_LENGTH = 16384  # Fuyu-8B's max_position_embeddings


class FuyuProcessor:
    """Images + prompts -> FuyuBatch, identical to transformers 4.57.6's FuyuProcessor on RGB inputs;
    generated ids -> text, boxes and points. No transformers import."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = MAX_LENGTH, uint8_patches: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        # uint8 patches, normalised by the model on its device (a GPU: 4× less to upload; the same
        # float32 values, bit for bit); float32 ones otherwise
        self.uint8_patches = uint8_patches

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, max_length: int = MAX_LENGTH,
                        uint8_patches: bool = False) -> FuyuProcessor:
        return cls(Tokenizer.from_dir(ckpt_dir), max_length, uint8_patches)

    def __call__(self, images: ImageInput | Sequence[ImageInput | None] | None,
                 prompts: str | Sequence[str]) -> FuyuBatch:
        """One image (or None for text-only) per prompt -> a left-padded batch."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if images is None:
            images = [None] * len(prompts)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) != len(prompts) or not prompts:
            raise PreprocessError(f"{len(images)} images for {len(prompts)} prompts; "
                                  "pass one image (or None) per prompt")
        return self.collate([self.prepare_one(im, p) for im, p in zip(images, prompts)])

    def prepare_one(self, image: ImageInput | Page | None, prompt: str) -> Sample:
        """Everything for one sample; errors name the image. Thread-safe (for worker threads)."""
        return self._with_prompt(self._image(image), prompt)

    def prepare_many(self, image: ImageInput | Page, prompts: Sequence[str | Exception]) -> list[Sample | Exception]:
        """prepare_one for several prompts about one image: the image is loaded, resized and cut
        into patches once (the samples share its patches tensor). A prompt that cannot be encoded
        gives its exception in its place; an Exception given as a prompt is passed through."""
        out: list[Sample | Exception] = []
        base = None
        for prompt in prompts:
            if isinstance(prompt, Exception):
                out.append(prompt)
                continue
            if base is None:
                base = self._image(image)  # raises ImageError for an unreadable image
            try:
                out.append(self._with_prompt(base, prompt))
            except PromptError as e:
                out.append(e)
        return out

    def _image(self, image: ImageInput | Page | None) -> Sample:
        """A sample of the image alone: its |SPEAKER|/|NEWLINE| rows (all of ids) and its patches."""
        if image is None:
            dtype = torch.uint8 if self.uint8_patches else torch.float32
            return Sample([], torch.zeros((0, PATCH_DIM), dtype=dtype), None, None, "<text-only>")
        if isinstance(image, Page):  # a PDF page or a frame, from list_pages
            name, im = image.id, load_page(image)
        else:
            name, im = describe(image), load_image(image)
        size = (im.height, im.width)
        pixels = resize_to_fit(im)
        # The realised height ratio, rounded to float32 as the reference's tensor holds it (§4.2).
        scale = float(np.float32(pixels.shape[0] / size[0]))
        tok = self.tokenizer
        ids = image_token_ids(*grid(*pixels.shape[:2]), tok.speaker_id, tok.newline_id)
        return Sample(ids, patchify(pixels, normalise=not self.uint8_patches), size, scale, name, prefix_len=len(ids))

    def _with_prompt(self, image: Sample, prompt: str) -> Sample:
        """`image` (from _image) followed by its prompt's ids; a PromptError names the image."""
        try:
            # Text-only samples have no resize: coordinates are only halved (scale 1).
            text_ids = prompt_ids(prompt, 1.0 if image.scale is None else image.scale, self.tokenizer)
        except PromptError as e:
            raise PromptError(f"{image.name}: {e}") from None
        ids = image.ids + text_ids
        if len(ids) > self.max_length:
            raise PromptError(f"{image.name}: {len(ids)} tokens ({len(text_ids) - 2} of prompt), over the "
                              f"limit of {self.max_length}; shorten the prompt")
        return replace(image, ids=ids)

    def collate(self, samples: Sequence[Sample]) -> FuyuBatch:
        return collate(samples, self.tokenizer.pad_id)

    def decode(self, new_ids: torch.Tensor) -> list[str]:
        """Generated ids (B, N) -> text per row, cut at the first |ENDOFTEXT|."""
        return [self.tokenizer.decode(row) for row in self._rows(new_ids)]

    def boxes(self, new_ids: torch.Tensor, batch: FuyuBatch | Sequence[tuple[int, int] | None],
              on_problem: Callable[[str], None] | None = None) -> list[list[Box]]:
        """Per row: generated <0x00> y1 x1 y2 x2 <0x01> spans as Box(x0, y0, x1, y1) in original-image
        pixels, clamped to the image. batch: the batch the ids came from, or just each row's
        original (height, width) (None: text-only), all the mapping needs. Malformed spans go to
        on_problem (default: a RuntimeWarning)."""
        tok = self.tokenizer
        rows = self._spans(new_ids, batch, tok.box_open_id, tok.box_close_id, 4, on_problem)
        return [[Box(to_x(x0), to_y(y0), to_x(x1), to_y(y1)) for y0, x0, y1, x1 in spans]
                for spans, (to_x, to_y) in rows]

    def points(self, new_ids: torch.Tensor, batch: FuyuBatch | Sequence[tuple[int, int] | None],
               on_problem: Callable[[str], None] | None = None) -> list[list[tuple[int, int]]]:
        """Per row: generated <0x02> x y <0x03> spans as (x, y) in original-image pixels (batch: as
        for boxes)."""
        tok = self.tokenizer
        rows = self._spans(new_ids, batch, tok.point_open_id, tok.point_close_id, 2, on_problem)
        return [[(to_x(x), to_y(y)) for x, y in spans] for spans, (to_x, to_y) in rows]

    def _rows(self, new_ids) -> list[list[int]]:
        rows = new_ids.tolist() if isinstance(new_ids, torch.Tensor) else [list(r) for r in new_ids]
        eos = self.tokenizer.eos_id
        return [row[:row.index(eos)] if eos in row else row for row in rows]

    def _spans(self, new_ids, batch, open_id, close_id, count, on_problem):
        """Per row: (the numbers of each well-formed span, the row's (to_x, to_y) converters)."""
        if isinstance(batch, FuyuBatch):
            sizes, names = batch.image_sizes, batch.names
        else:  # the rows' image sizes
            sizes = list(batch)
            names = [f"row {b}" for b in range(len(sizes))]
        out = []
        for b, row in enumerate(self._rows(new_ids)):
            spans, problems = find_spans(row, open_id, close_id, count, self.tokenizer.number_of)
            for p in problems:
                if on_problem is None:
                    warnings.warn(f"{names[b]}: {p}", RuntimeWarning, stacklevel=3)
                else:
                    on_problem(f"{names[b]}: {p}")
            out.append((spans, _axes(sizes[b])))
        return out


def _axes(size: tuple[int, int] | None):
    """Model coordinate -> pixel converters (to_x, to_y) for one sample. Each axis uses its own
    resized/original ratio, so very wide or tall images map back accurately (the prompt side
    uses the height ratio for both, as the reference does)."""
    if size is None:  # text-only: coordinates were only halved
        return (lambda c: to_pixels(c, 1.0, None)), (lambda c: to_pixels(c, 1.0, None))
    h, w = size
    new_h, new_w = fit_size(h, w)
    return (lambda c: to_pixels(c, new_w / w, w)), (lambda c: to_pixels(c, new_h / h, h))
