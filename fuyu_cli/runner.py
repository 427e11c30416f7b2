"""Load the model once and turn units (an item and the prompts asked of it) into records.

The CLI module that runs the model, importing torch, fuyu.model and fuyu.preprocess inside
functions so `fuyu --help` never pays for them. Units are taken from the input a window at a time
(never the whole input) and grouped by image size inside the window, so a batch wastes little
padding; the next batch is preprocessed on a worker thread while the model runs the current one.

One prompt per item: the items of a batch run as one left-padded batch. Several prompts: each
image's prefix (its patch rows) is prefilled once and its keys and values are shared by all of
its prompts, which then decode together (fuyu.model.encode_prefix / prefill(prefix=…)).

An item that fails (unreadable image, over-long prompt, box outside the image) becomes an error
record; a batch that fails is retried one unit at a time, so one bad item does not fail its
neighbours.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from fuyu import memory, sources
from fuyu.inputs import IDLE
from fuyu.errors import FuyuError, one_line, record_error
from fuyu.options import GenOptions, ModelSpec
from fuyu.records import Ask, Item, Record, Unit

DEFAULT_BATCH = {"cpu": 2, "cuda": 8}  # a 1920×1080 screenshot needs ~1.3 GiB of KV cache
WINDOW = 256  # units looked at together when grouping by size (stdout / --output)


@dataclass
class Prepared:
    """A unit whose image and prompts are ready for the model."""

    unit: Unit
    asks: list[Ask]  # the unit's asks that prepared well, in order
    samples: list  # one fuyu.preprocess.Sample per ask (sharing the image's patches)
    size: tuple[int, int]  # (width, height) in original pixels, after EXIF orientation
    seconds: float  # preprocessing time


class Runner:
    def __init__(self, model, processor, device: str, sources_options: sources.Options | None = None):
        self.model, self.processor, self.device = model, processor, device
        self.sources = sources_options or sources.Options()
        self.load_seconds: float | None = None
        self.mapped = False  # placed by a device map: accelerate moves weights, no batch budget
        self._vocabulary = None  # fuyu.model.constrain.Vocabulary, built for the first typed answer

    def grammar(self, regex: str):
        """The compiled constraint for `regex` (once per runner); a FuyuError if it cannot be built."""
        from fuyu.model.constrain import GrammarError, Vocabulary

        if self._vocabulary is None:
            tok = self.processor.tokenizer
            self._vocabulary = Vocabulary(tok.token_bytes(), self.model.config.eos_token_id,
                                          self.model.config.vocab_size)
        try:
            return self._vocabulary.grammar(regex)
        except GrammarError as e:
            raise FuyuError(str(e), "write the pattern without look-arounds, anchors or \\b") from None

    @classmethod
    def load(cls, spec: ModelSpec, ckpt=None, max_new_tokens: int | None = None,
             sources_options: sources.Options | None = None) -> Runner:
        """Load the checkpoint `ckpt` (default: resolved from spec, without downloading). A
        max_new_tokens past the model's positions is a usage error before any weight is read."""
        from fuyu import threads
        from fuyu.locate import find_checkpoint

        start = time.perf_counter()
        if ckpt is None:
            ckpt = find_checkpoint(spec.path)  # before the heavy imports: "no weights" is instant
        threads.configure(spec.threads)
        import torch

        from fuyu.model import CheckpointError, load_pretrained
        from fuyu.model.weights import read_config
        from fuyu.preprocess import FuyuProcessor

        cfg = read_config(ckpt)
        limit = cfg.max_position_embeddings
        if max_new_tokens is not None and max_new_tokens >= limit:
            raise FuyuError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the "
                            f"model has {limit} positions in all", "use a smaller --max-new-tokens")
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        quantization = quantization_of(spec)
        if spec.device_map is None:  # (a map places what fits, accelerate's way)
            memory.check_fit(ckpt, spec.path or str(ckpt), cfg, dtype, spec_method(quantization),
                             max_new_tokens or GenOptions.max_new_tokens, device)
        processor = FuyuProcessor.from_pretrained(ckpt)
        # On a GPU the patches go up as uint8 and are normalised there (a 1920×1080 screenshot's
        # 25 MB of float32 patches are 6 MB in uint8); the same values, bit for bit.
        processor.uint8_patches = device.startswith("cuda")
        try:
            with _quiet_logger("accelerate.big_modeling"):  # "parameters on the meta device…": expected
                model = load_pretrained(ckpt, device=device, dtype=getattr(torch, dtype),
                                        quantization=quantization, device_map=spec.device_map,
                                        max_memory=spec.max_memory, offload_folder=spec.offload_folder,
                                        config=cfg)
        except CheckpointError:
            raise
        except ValueError as e:  # a map naming no module, a pinned module offloaded, too little memory
            if spec.device_map is None:
                raise
            from fuyu.options import DEVICE_MAP_EXAMPLE

            message = one_line(e)
            hint = ("add --offload-folder DIR" if "offload_folder" in message
                    else f"e.g. {DEVICE_MAP_EXAMPLE}")
            raise FuyuError(message, hint) from None
        if spec.device_map is not None:  # the map decides: run where the embeddings live
            device = str(model.embed_tokens.weight.device)
        runner = cls(model, processor, device, sources_options)
        runner.load_seconds = time.perf_counter() - start
        runner.mapped = spec.device_map is not None
        return runner

    def budget(self, gen: GenOptions) -> memory.BatchBudget:
        """What a batch may take, measured now (after loading, between batches)."""
        budget = memory.BatchBudget.after_load(self.model, self.device, gen.max_new_tokens)
        if self.mapped:
            budget.room = None
        return budget

    def default_batch_size(self) -> int:
        return DEFAULT_BATCH["cuda" if self.device.startswith("cuda") else "cpu"]

    # --- the run -----------------------------------------------------------------------------

    def run(self, work: Iterable[Unit | Record], batch_size: int, gen: GenOptions,
            window: int = WINDOW) -> Iterator[Record]:
        """Records as they finish. `work` may mix units with ready records (failures found while
        listing the input), which pass straight through. Units are grouped by image size and
        number of prompts inside each window of `window` units (cut short at inputs.IDLE, when
        stdin is quiet), in input order otherwise."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuyu-preprocess")
        try:
            pending = None  # the next chunk, being prepared while the model runs this one
            for chunk in self._chunks(work, batch_size, window, self.budget(gen)):
                if isinstance(chunk, Record):
                    yield chunk
                    continue
                if chunk is IDLE:  # the input is quiet: finish what is prepared, not wait for more
                    if pending is not None:
                        yield from self._finish(pending.result(), gen)
                        pending = None
                    continue
                future = pool.submit(self._prepare, chunk)
                if pending is not None:
                    yield from self._finish(pending.result(), gen)
                pending = future
            if pending is not None:
                yield from self._finish(pending.result(), gen)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _chunks(self, work, batch_size: int, window: int,
                budget: memory.BatchBudget) -> Iterator[list[Unit] | Record]:
        """Batches of same-size units (and pass-through records), one window at a time, each at
        most batch_size rows and no more than `budget` holds (a unit that fits in no batch is a
        failed record); IDLE after the batches of a window the quiet input cut short, or when it
        falls quiet with nothing collected, so that `run` finishes the batch it holds."""
        it = iter(work)
        while True:
            units: list[Unit] = []
            quiet = False
            for w in it:
                if isinstance(w, Record):
                    yield w
                    continue
                if w is IDLE:  # the input is quiet for now: run what there is
                    if units:
                        quiet = True
                        break
                    yield IDLE
                    continue
                units.append(w)
                if len(units) == window:
                    break
            if not units:
                return
            groups: dict = {}
            for unit in units:
                size = sources.header_size(unit.item, self.sources) or (0, 0)
                groups.setdefault((size, len(unit.asks)), []).append(unit)
            # Images of one prompt each fill batches across sizes (smallest first): each size is
            # prefilled on its own and the batch decodes together (fuyu.model.generate on a list).
            # Several prompts an image: same-size batches, the image's prefix shared by its prompts.
            # Smallest first, so a batch's newest unit is its longest: the cache is rows × that.
            mixed: list[Unit] = []
            for (size, n_asks), group in sorted(groups.items(), key=lambda g: (g[0][0][0] * g[0][0][1], g[0][1])):
                tokens = budget.tokens(size)
                if not budget.fits(n_asks, tokens):
                    yield from (_failure(u.item, ask, FuyuError(budget.too_big(tokens)), size or None)
                                for u in group for ask in u.asks)
                    continue
                if n_asks == 1:
                    for unit in group:
                        if mixed and not budget.fits(len(mixed) + 1, tokens):
                            yield mixed
                            mixed = []
                        mixed.append(unit)
                        if len(mixed) == batch_size:
                            yield mixed
                            mixed = []
                    continue
                per_batch = max(1, batch_size // n_asks)  # all of an image's prompts run together
                while per_batch > 1 and not budget.fits(per_batch * n_asks, tokens):
                    per_batch -= 1
                for i in range(0, len(group), per_batch):
                    yield group[i:i + per_batch]
            if mixed:
                yield mixed
            if quiet:
                yield IDLE

    def _prepare(self, units: list[Unit]) -> tuple[list[Prepared], list[Record]]:
        """Preprocess each unit alone, so one unreadable image fails only itself."""
        ready, failed = [], []
        for unit in units:
            start = time.perf_counter()
            try:
                image = sources.open_image(unit.item, self.sources)
            except Exception as exc:
                failed += [_failure(unit.item, ask, exc) for ask in unit.asks]
                continue
            try:  # the image once, then each prompt on its own: a bad box fails only its record
                prepared = self.processor.prepare_many(image, [_prompt(ask) for ask in unit.asks])
            except Exception as exc:
                failed += [_failure(unit.item, ask, exc) for ask in unit.asks]
                continue
            asks, samples = [], []
            size = next(s.size[::-1] for s in prepared if not isinstance(s, Exception)) if any(
                not isinstance(s, Exception) for s in prepared) else None  # (width, height), upright
            for ask, sample in zip(unit.asks, prepared):
                try:
                    if isinstance(sample, Exception):
                        raise sample
                    if ask.box is not None:
                        check_box(ask.box, size)
                    asks.append(ask)
                    samples.append(sample)
                except Exception as exc:
                    failed.append(_failure(unit.item, ask, exc, size))
            if asks:
                ready.append(Prepared(unit, asks, samples, size, time.perf_counter() - start))
        return ready, failed

    def _finish(self, prepared: tuple[list[Prepared], list[Record]], gen: GenOptions) -> Iterator[Record]:
        ready, failed = prepared
        yield from failed
        if ready:
            yield from self._generate(ready, gen)

    def _generate(self, items: list[Prepared], gen: GenOptions) -> Iterator[Record]:
        try:
            records = self._generate_batch(items, gen)
        except Exception as exc:
            if len(items) == 1:
                p = items[0]
                yield from (_failure(p.unit.item, ask, exc, p.size) for ask in p.asks)
                return
            for item in items:  # find the culprit; the others still get their result
                yield from self._generate([item], gen)
            return
        yield from records

    def _generate_batch(self, items: list[Prepared], gen: GenOptions) -> list[Record]:
        import torch

        from fuyu.model import generate

        start = time.perf_counter()
        samples = [s for p in items for s in p.samples]
        T = max(len(s.ids) for s in samples)
        limit = self.model.config.max_position_embeddings
        if T + gen.max_new_tokens > limit:
            raise FuyuError(f"prompt is {T} tokens; with --max-new-tokens {gen.max_new_tokens} "
                            f"it exceeds the model's {limit} positions")
        generator = None
        if gen.seed is not None:
            generator = torch.Generator(self.device).manual_seed(gen.seed)
        asks = [ask for p in items for ask in p.asks]
        regexes = [None if a.field is None else a.field.regex for a in asks]
        constraints = [None if r is None else self.grammar(r) for r in regexes]
        sampling = dict(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                        generator=generator, compile=gen.compile, logprobs=True,
                        constraints=constraints if any(c is not None for c in constraints) else None)
        if all(len(p.samples) == 1 for p in items):  # one prompt per image: a batch per image size
            sizes: dict = {}
            for s in samples:
                sizes.setdefault(s.size, []).append(s)
            order = [s for group in sizes.values() for s in group]
            parts = [self.processor.collate(group) for group in sizes.values()]  # generate moves them
            if sampling["constraints"] is not None:  # each row's grammar follows its row
                grammar_of = {id(s): g for s, g in zip(samples, constraints)}
                sampling["constraints"] = [grammar_of[id(s)] for s in order]
            new_ids, logprobs = generate(self.model, parts, **sampling)
            back = {id(s): i for i, s in enumerate(order)}
            rows = [back[id(s)] for s in samples]
            new_ids, logprobs = new_ids[rows], logprobs[rows]  # rows in the items' order again
        else:  # several: each image's prefix once, its prompts continuing from it
            conts, shared = self._shared_prefix(items)
            new_ids, logprobs = generate(self.model, conts, **shared, **sampling)
        new_ids, logprobs = new_ids.cpu(), logprobs.cpu()
        texts = self.processor.decode(new_ids)
        boxes = {}  # row → its boxes, for bbox rows: mapped back with each row's image size
        located = [row for row, ask in enumerate(asks) if ask.task == "bbox"]
        if located:
            # Malformed spans are skipped; the raw answer stays in "text" for the user to see.
            found = self.processor.boxes(new_ids[located], [samples[row].size for row in located],
                                         on_problem=lambda message: None)
            boxes = dict(zip(located, found))
        share = (time.perf_counter() - start) / len(samples)
        eos = self.model.config.eos_token_id
        records, row = [], 0
        for p in items:
            for ask, sample in zip(p.asks, p.samples):
                # A typed answer keeps its text exactly as its grammar matched it.
                typed = ask.field is not None and ask.field.regex is not None
                rec = Record(p.unit.item.path, ask.task, ask.prompt, p.unit.item.page,
                             p.unit.item.pages, text=texts[row] if typed else texts[row].strip())
                rec.asked = ask
                if typed:
                    _parse_answer(rec, ask.field, gen.max_new_tokens)
                if ask.task == "bbox":
                    rec.boxes = [[round(v) for v in b] for b in boxes[row]]
                elif ask.task == "ocr":
                    rec.boxes = [[round(v) for v in ask.box]]
                rec.width, rec.height = p.size
                rec.prompt_tokens = len(sample.ids)
                rec.new_tokens = _new_tokens(new_ids[row], eos)
                rec.score = round(float(logprobs[row, :rec.new_tokens].mean()), 6) if rec.new_tokens else None
                if gen.min_score is not None and rec.score is not None and rec.score < gen.min_score:
                    rec.doubtful = True
                rec.seconds = round(p.seconds / len(p.samples) + share, 4)
                records.append(rec)
                row += 1
        return records

    def _shared_prefix(self, items: list[Prepared]) -> tuple:
        """(continuations batch, prefix=, rows=) for generate: every image's prefix (its patch rows,
        the same length for same-size images) encoded once, and each prompt's ids (left-padded
        among themselves) continuing from its image's keys and values."""
        import torch

        from fuyu.model import encode_prefix

        P = items[0].samples[0].prefix_len
        prefix_ids = torch.tensor([p.samples[0].ids[:P] for p in items], device=self.device)  # (B, P)
        patches = torch.cat([p.samples[0].patches for p in items]).to(self.device)
        conts = [replace(s, ids=s.ids[P:], patches=s.patches[:0], prefix_len=0) for p in items for s in p.samples]
        rows = torch.tensor([b for b, p in enumerate(items) for _ in p.samples], device=self.device)
        batch = self.processor.collate(conts)
        return batch, {"prefix": encode_prefix(self.model, prefix_ids, patches), "rows": rows}


def _failure(item: Item, ask: Ask, exc: BaseException, size=None) -> Record:
    return Record.failed(item, ask, record_error(exc), size)


def _parse_answer(rec: Record, field, max_new_tokens: int) -> None:
    """rec.answer from rec.text; an answer its grammar could not finish (it ran into
    max_new_tokens) is no value, and `error` says so (`unparsed`: the item itself was fine)."""
    try:
        rec.answer = field.parse(rec.text)
    except ValueError:
        rec.error = (f"the {field.type} answer did not finish within --max-new-tokens {max_new_tokens} "
                     f"(it had {rec.text.strip()!r}); raise --max-new-tokens")
        rec.unparsed = True


def _prompt(ask: Ask) -> str | Exception:
    try:
        return ask.prompt
    except Exception as exc:  # e.g. a box whose numbers cannot be written as a prompt
        return exc


def _new_tokens(row, eos: int) -> int:
    hits = (row == eos).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else len(row)


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


def check_box(box, size) -> None:
    (x0, y0, x1, y1), (w, h) = box, size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise FuyuError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is outside the {w}×{h} image "
                        "(x0,y0,x1,y1 with x0<x1, y0<y1)")


def quantization_of(spec: ModelSpec):
    """load_pretrained's quantization for a spec: None, the method, or with --quantize-head the
    method with the LM head off the skip list ({"method": m, "skip": ["vision_embed_tokens"]})."""
    if spec.quantize == "none":
        if spec.quantize_head:
            raise FuyuError("--quantize-head goes with --quantize", "e.g. --quantize int8 --quantize-head")
        return None
    return {"method": spec.quantize, "skip": ["vision_embed_tokens"]} if spec.quantize_head else spec.quantize


def spec_method(quantization) -> str | None:
    return quantization["method"] if isinstance(quantization, dict) else quantization


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
    # On the CPU always 16-bit weights, never a float32 copy of the model (Fuyu-8B: 18.8 GB, not
    # 37.6): where the CPU has no bf16 arithmetic the kernels compute in float32 over the exactly
    # widened weights (model/kernels.py: the native GEMV, "+f32" prefills), chosen by timing.
    return "bfloat16"

