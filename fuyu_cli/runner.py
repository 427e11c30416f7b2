"""Load the model once and turn jobs into result records.

The CLI module that loads and runs the model (options.py only borrows model.devices' parsers for
--device-map/--max-memory), importing model/, preprocess/ and torch inside functions, so
`fuyu --help` never pays for them. Images are grouped by size so a batch wastes little padding;
the next batch is preprocessed on a worker thread while the model runs the current one. An item
that fails (unreadable image, over-long prompt, box outside the image) becomes an error record;
a batch that fails is retried one item at a time, so one bad item does not fail its neighbours.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

from fuyu.errors import FuyuError
from fuyu.options import GenOptions, ModelSpec

DEFAULT_BATCH = {"cpu": 2, "cuda": 8}  # a 1920×1080 screenshot needs ~1.3 GiB of KV cache


@dataclass(frozen=True)
class Job:
    path: str
    task: str  # caption | ask | bbox (text → boxes) | ocr (box → text)
    text: str | None = None  # caption: a prompt instead of the default; ask: the question; bbox: what to find
    box: tuple[float, float, float, float] | None = None  # ocr: the box to read, in image pixels

    @property
    def prompt(self) -> str:
        """The text given to the processor, from the model card's prompts (fuyu-spec §5.6)."""
        from fuyu.preprocess import TASK_PROMPTS, ask_prompt, box_to_text_prompt, text_to_box_prompt

        if self.task == "ocr":
            return box_to_text_prompt(self.box)
        if self.task == "bbox":
            return text_to_box_prompt(self.text)
        if self.task == "caption" and not self.text:
            return TASK_PROMPTS["caption"]
        return ask_prompt(self.text)  # a question or custom prompt, ending in one newline


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when it cannot be read (reported later)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return None


def _error(job: Job, exc: BaseException, size=None) -> dict:
    from fuyu.preprocess import PreprocessError

    known = isinstance(exc, (PreprocessError, FuyuError))
    rec = {"path": job.path, "task": job.task, "prompt": job.prompt}
    if size:
        rec["width"], rec["height"] = size
    message = " ".join(str(exc).split())  # one line, whatever the exception printed
    rec["error"] = message if known else f"{type(exc).__name__}: {message}"
    return rec


def _new_tokens(row, eos: int) -> int:
    hits = (row == eos).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else len(row)


class Runner:
    def __init__(self, model, processor, device: str):
        self.model, self.processor, self.device = model, processor, device

    @classmethod
    def load(cls, spec: ModelSpec) -> "Runner":
        from fuyu.locate import HUB_REPO, find_checkpoint

        ckpt = find_checkpoint(spec.path)  # before the heavy imports: "no weights" is instant
        import torch
        from fuyu.model import CheckpointError, load_pretrained
        from fuyu.preprocess import FuyuProcessor

        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        quantization = None if spec.quantize == "none" else spec.quantize
        if device == "cpu" and quantization is None and spec.device_map is None:
            warn_if_too_big(ckpt, str(spec.path) if spec.path else HUB_REPO, dtype)
        processor = FuyuProcessor.from_pretrained(ckpt)
        try:
            with _quiet_logger("accelerate.big_modeling"):  # "parameters on the meta device…": expected
                model = load_pretrained(ckpt, device=device, dtype=getattr(torch, dtype),
                                        quantization=quantization, device_map=spec.device_map,
                                        max_memory=spec.max_memory, offload_folder=spec.offload_folder)
        except CheckpointError:
            raise
        except ValueError as e:  # a map naming no module, a pinned module offloaded, too little memory
            if spec.device_map is None:
                raise
            from fuyu.options import DEVICE_MAP_EXAMPLE

            message = " ".join(str(e).split())
            hint = ("add --offload-folder DIR" if "offload_folder" in message
                    else f"e.g. {DEVICE_MAP_EXAMPLE}")
            raise FuyuError(message, hint) from None
        if spec.device_map is not None:  # the map decides: run where the embeddings live
            device = str(model.embed_tokens.weight.device)
        return cls(model, processor, device)

    def default_batch_size(self) -> int:
        return DEFAULT_BATCH["cuda" if self.device.startswith("cuda") else "cpu"]

    def run(self, jobs: Iterable[Job], batch_size: int, gen: GenOptions) -> Iterator[dict]:
        """Records in completion order: same-size images run together, in their input order."""
        sized = [(job, image_size(job.path)) for job in jobs]
        groups: dict = {}
        for item in sized:
            groups.setdefault(item[1] or (0, 0), []).append(item)
        ordered = [item for size in sorted(groups, key=lambda s: s[0] * s[1]) for item in groups[size]]
        chunks = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
        if not chunks:
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuyu-preprocess")
        try:
            pending = pool.submit(self._prepare, chunks[0])
            for i in range(len(chunks)):
                ready, failed = pending.result()
                if i + 1 < len(chunks):
                    pending = pool.submit(self._prepare, chunks[i + 1])
                yield from failed
                if ready:
                    yield from self._generate(ready, gen)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _prepare(self, chunk):
        """Preprocess each item alone, so one unreadable image fails only itself."""
        ready, failed = [], []
        for job, header_size in chunk:
            start = time.perf_counter()
            try:
                sample = self.processor.prepare_one(job.path, job.prompt)
                size = sample.size[::-1]  # (width, height) after EXIF orientation
                if job.box is not None:
                    check_box(job.box, size)
                ready.append((job, size, sample, time.perf_counter() - start))
            except Exception as exc:
                failed.append(_error(job, exc, header_size))
        return ready, failed

    def _generate(self, items, gen: GenOptions) -> Iterator[dict]:
        try:
            records = self._generate_batch(items, gen)
        except Exception as exc:
            if len(items) == 1:
                yield _error(items[0][0], exc, items[0][1])
                return
            for item in items:  # find the culprit; the others still get their result
                yield from self._generate([item], gen)
            return
        yield from records

    def _generate_batch(self, items, gen: GenOptions) -> list[dict]:
        import torch

        start = time.perf_counter()
        batch = self.processor.collate([sample for _, _, sample, _ in items])
        T, limit = batch.input_ids.shape[1], self.model.config.max_position_embeddings
        if T + gen.max_new_tokens > limit:
            raise FuyuError(f"prompt is {T} tokens; with --max-new-tokens {gen.max_new_tokens} "
                            f"it exceeds the model's {limit} positions")
        generator = None
        if gen.seed is not None:
            generator = torch.Generator(self.device).manual_seed(gen.seed)
        new_ids = self.model.generate(batch, max_new_tokens=gen.max_new_tokens,
                                      temperature=gen.temperature, top_p=gen.top_p,
                                      generator=generator, compile=gen.compile).cpu()
        texts = self.processor.decode(new_ids)
        boxes = None
        if any(job.task == "bbox" for job, *_ in items):
            # Malformed spans are skipped; the raw answer stays in "text" for the user to see.
            boxes = self.processor.boxes(new_ids, batch, on_problem=lambda message: None)
        share = (time.perf_counter() - start) / len(items)
        eos, mask = self.model.config.eos_token_id, batch.attention_mask
        records = []
        for i, (job, size, _, prep_s) in enumerate(items):
            rec = {"path": job.path, "task": job.task, "prompt": job.prompt, "text": texts[i].strip()}
            if job.task == "bbox":
                rec["boxes"] = [[round(v) for v in b] for b in boxes[i]]
            elif job.task == "ocr":
                rec["boxes"] = [[round(v) for v in job.box]]
            rec["width"], rec["height"] = size
            rec["prompt_tokens"] = int(mask[i].sum())
            rec["new_tokens"] = _new_tokens(new_ids[i], eos)
            rec["seconds"] = round(prep_s + share, 4)
            records.append(rec)
        return records


@contextmanager
def _quiet_logger(name: str):
    """Only errors from logger `name` while inside: a library's warnings about what the user asked
    for would otherwise reach stderr through logging's last-resort handler."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def warn_if_too_big(ckpt, name: str, dtype: str) -> None:
    """One `warning:` line on stderr, before loading, when the weights at `dtype` exceed the
    memory available: the run goes on, but int8/int4 would fit (CPU, no --quantize or map)."""
    from fuyu import memory

    message = memory.checkpoint_fit_warning(ckpt, name, dtype, memory.available_memory())
    if message:
        from fuyu.render import stderr_console

        # The console looks sys.stderr up when printing, so this lands above a running spinner.
        stderr_console().print(f"warning: {message}", markup=False)


def check_box(box, size) -> None:
    (x0, y0, x1, y1), (w, h) = box, size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise FuyuError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is outside the {w}×{h} image "
                        "(x0,y0,x1,y1 with x0<x1, y0<y1)")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise FuyuError(f"--device {device}: no such CUDA device "
                            f"({torch.cuda.device_count()} visible)", "use --device cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    import torch

    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    # On CPUs without native bf16 it is emulated and slower than float32.
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
