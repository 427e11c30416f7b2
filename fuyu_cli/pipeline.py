"""What caption, ask and bbox do: stream the input, skip what is finished, load the model when
there is work, run, write each record as it comes, and end with a summary and the exit code.
--output-dir (parts, --shard, --ray) goes through fuyu/parts.py on the same pieces."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import typer

from fuyu import inputs, sources
from fuyu.errors import ITEMS_FAILED, FuyuError, OutputError, record_error
from fuyu.options import ModelSpec, RunOptions
from fuyu.output import STDOUT_SINKS, Sidecars
from fuyu.records import Ask, Item, Record, Unit, record_key, resolve
from fuyu.render import Reporter
from fuyu.runner import Runner


def load_runner(spec: ModelSpec, max_new_tokens: int | None = None,
                sources_options: sources.Options | None = None, ui: Reporter | None = None) -> Runner:
    """Find the checkpoint (asking to download it, with its own progress bar), then load it
    under a spinner."""
    from fuyu.locate import find_checkpoint

    ckpt = find_checkpoint(spec.path, download=spec.download, ui=ui)
    with ui.status("loading the model…") if ui is not None else contextlib.nullcontext():
        return Runner.load(spec, ckpt, max_new_tokens, sources_options)


@dataclass
class Tally:
    """What a run did, for the summary and the exit code."""

    ok: int = 0
    failed: int = 0
    tokens: int = 0
    already: int = 0  # records an earlier run finished
    inputs_listed: bool = False  # the whole input has been seen (the total is known)
    total: int = 0  # records to produce, as far as listed
    load_seconds: float | None = None
    started: float = field(default_factory=time.perf_counter)

    def add(self, rec: Record) -> None:
        answers = getattr(rec, "answers", None)  # a FieldRecord (fuyu/fields.py): one per field
        if answers is not None:
            self.ok += len(answers)
            self.failed += not rec.ok
            self.tokens += rec.new_tokens or 0
        elif rec.ok:
            self.ok += 1
            self.tokens += rec.new_tokens or 0
        else:
            self.failed += 1


def source_options(opts: RunOptions) -> sources.Options:
    return sources.Options(opts.inputs.pages, opts.inputs.dpi, opts.inputs.all_frames)


def plan(files: Iterable, asks: list[Ask], src: sources.Options, tally: Tally,
         done: Callable[[Item, Ask], bool] = lambda item, ask: False,
         conflict: Callable[[Item], str | None] = lambda item: None) -> Iterator:
    """Units still to do, in input order: each file expanded into its items (pages), each item
    with the asks not done yet; files that cannot be expanded (a broken PDF, a FIFO) and items
    whose output would clobber a user's file become error records. inputs.IDLE passes through."""
    for path in files:
        if path is inputs.IDLE:
            yield path
            continue
        try:
            items = sources.expand(path, src)
        except Exception as exc:
            item = Item(path)
            tally.total += len(asks)
            for ask in asks:
                yield Record.failed(item, ask, record_error(exc))
            continue
        for item in items:
            todo = []
            for ask in asks:
                if done(item, ask):
                    tally.already += 1
                else:
                    todo.append(ask)
            if not todo:
                continue
            tally.total += len(todo)
            problem = conflict(item)
            if problem is not None:
                for ask in todo:
                    yield Record.failed(item, ask, problem)
                continue
            yield Unit(item, tuple(todo))
    tally.inputs_listed = True


def run_task(asks: list[Ask], opts: RunOptions, *, on_record: Callable[[Record], None] | None = None,
             fields=None) -> None:
    """Run `asks` over every input; exit 1 if any record failed (errors exit 2/3 by exception).
    fields (a fuyu.fields.FieldSet): asks are its fields, written as one record per item."""
    if opts.out.output_dir is not None:
        from fuyu import parts

        return parts.run_task(asks, opts, on_record=on_record, fields=fields)
    out = opts.out
    if out.sidecar and (len(asks) > 1 or fields is not None):
        raise FuyuError("--sidecar holds one answer per image, and there are several prompts or fields",
                        "use --output FILE (or --output-dir) for several questions")
    ui = Reporter(out.quiet)
    tally = Tally()
    sidecars = Sidecars()  # also tells fuyu's own sidecars apart from inputs when listing folders
    with contextlib.ExitStack() as stack:
        stack.enter_context(image_warnings())
        outfile = None
        if out.output is not None:  # locked before anything is read from it
            outfile = stack.enter_context(_locked(out.output))
        found = inputs.Found()
        files = inputs.iter_files(opts.inputs.paths, _stdin(), found, recursive=opts.inputs.recursive,
                                  null=opts.inputs.null, is_own_sidecar=sidecars.is_own)

        answered = fields.answered(outfile.dicts()) if fields is not None and outfile is not None else {}

        def done(item: Item, ask: Ask) -> bool:
            if out.overwrite or (outfile is None and not out.sidecar):
                return False
            if fields is not None:  # per field: the (item, field) answers already in --output
                page = None if fields.per_document else item.page
                return ask.field.name in answered.get((resolve(item.path), page), ())
            in_file = outfile is None or outfile.done(record_key(item.path, item.page, ask.task, ask.prompt))
            return in_file and (not out.sidecar or sidecars.done(item, ask))

        src = source_options(opts)
        work = plan(files, asks, src, tally, done, sidecars.conflict if out.sidecar else (lambda item: None))
        first = next((w for w in work if w is not inputs.IDLE), None)  # the model loads only for work
        if first is None:
            ui.note(", ".join(["nothing to do" if tally.already or found.own_sidecars or tally.total
                               else "no images found", *_already(tally), *found.summary()]))
            return
        runner = load_runner(opts.model, opts.gen.max_new_tokens, src, ui)
        tally.load_seconds = getattr(runner, "load_seconds", None)
        if fields is not None:
            runner = fields.wrap(runner)
        tally.started = time.perf_counter()
        stdout_sink = fields.csv_rows if fields is not None and out.format == "csv" else STDOUT_SINKS[out.format]
        sinks = [outfile] if outfile is not None else [stdout_sink()]
        batch = opts.model.batch_size or runner.default_batch_size()
        try:
            with ui.progress(tally, "fields" if fields is not None else asks[0].task) as advance:
                for rec in runner.run(_chain(first, work), batch, opts.gen):
                    if rec.ok and on_record is not None:
                        try:
                            on_record(rec)
                        except Exception as exc:  # e.g. --draw cannot write: this item failed
                            rec.error = record_error(exc)
                    if out.sidecar:
                        sidecars.write(rec)  # first: a sidecar that may not be written fails the record
                    for sink in sinks:
                        sink.write(rec)
                    if not rec.ok:
                        ui.error(rec.id, rec.error)
                    tally.add(rec)
                    advance()
        except KeyboardInterrupt:
            resumable = out.output is not None or out.sidecar
            ui.note(f"interrupted after {tally.ok + tally.failed} records; finished results are "
                    + ("saved: rerun the same command to continue" if resumable else "above"))
            raise
    ui.summary("fields" if fields is not None else asks[0].task, tally, found.summary())
    if tally.failed:
        raise typer.Exit(ITEMS_FAILED)


@contextlib.contextmanager
def _locked(path):
    """The --output file, locked for the run; compacted when the run ends, unless writing failed
    (then the next run compacts, once there is space)."""
    from fuyu.resume import OutputFile

    outfile = OutputFile(path)
    try:
        yield outfile
    except OutputError:
        outfile.close(compact=False)
        raise
    except BaseException:
        outfile.close()
        raise
    outfile.close()


def image_warnings():
    """A large image is one `warning:` line naming it (Pillow's own two lines are dropped)."""
    from fuyu.preprocess.image import image_warnings_to
    from fuyu.render import warning_line

    return image_warnings_to(warning_line)


def _already(tally: Tally) -> list[str]:
    return [f"{tally.already} already done"] if tally.already else []


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _stdin():
    """stdin as bytes (file names need not be UTF-8)."""
    return getattr(sys.stdin, "buffer", sys.stdin)
