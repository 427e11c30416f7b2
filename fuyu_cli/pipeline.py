"""What every command does: find the images, skip finished ones, load the model, run, write each
record as it comes, and end with a summary and the exit code."""

from __future__ import annotations

import sys
import time
from typing import Callable

import typer

from fuyu import inputs as inputs_mod
from fuyu import resume
from fuyu.errors import FuyuError
from fuyu.options import GenOptions, InputSpec, ModelSpec, OutputSpec
from fuyu.output import open_sinks
from fuyu.render import Reporter
from fuyu.runner import Job, Runner


def load_runner(spec: ModelSpec) -> Runner:
    return Runner.load(spec)


def run_task(task: str, text: str | None, inputs: InputSpec, model: ModelSpec, gen: GenOptions,
             out: OutputSpec, *, box=None, on_record: Callable[[dict], None] | None = None) -> None:
    """Run `task` (with the user's prompt, question or text to find) over the images; exit 1 if
    any item failed."""
    if out.output is not None and out.format != "jsonl":
        raise FuyuError(f"--format {out.format} applies to stdout, and --output always writes "
                        "JSON lines", "drop one of --format and --output")
    ui = Reporter(out.quiet)
    found = inputs_mod.collect(inputs.paths, sys.stdin, recursive=inputs.recursive, null=inputs.null)
    plan = resume.plan(found.images, out.output, out.sidecar, out.overwrite)
    notes = [f"{len(plan.done)} already done" if plan.done else "", found.skipped_summary()]
    if not plan.todo:
        ui.note(", ".join(["nothing to do" if found.images else "no images found", *filter(None, notes)]))
        return

    with ui.status("loading the model…"):
        runner = load_runner(model)
    jobs = [Job(path, task, text, box) for path in plan.todo]
    ok = failed = tokens = 0
    start = time.perf_counter()
    try:
        with open_sinks(out) as sinks, ui.progress(len(jobs), task) as advance:
            for rec in runner.run(jobs, model.batch_size or runner.default_batch_size(), gen):
                if not rec.get("error") and on_record is not None:
                    try:
                        on_record(rec)
                    except Exception as exc:  # e.g. --draw cannot write: this item failed
                        rec["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                for sink in sinks:
                    sink.write(rec)
                if rec.get("error"):
                    ui.error(rec["path"], rec["error"])
                    failed += 1
                else:
                    ok += 1
                    tokens += rec.get("new_tokens") or 0
                advance(rec)
    except KeyboardInterrupt:
        resumable = out.output is not None or out.sidecar
        ui.note(f"interrupted after {ok + failed} of {len(jobs)} images; finished results are "
                + ("saved: rerun the same command to continue" if resumable else "above"))
        raise
    secs = max(time.perf_counter() - start, 1e-6)
    counts = [f"{ok} done", f"{failed} failed" if failed else "", *notes]
    ui.note(f"{task}: " + ", ".join(filter(None, counts))
            + f" in {secs:.1f} s ({ok / secs:.2f} images/s, {tokens / secs:.1f} tokens/s)")
    if failed:
        raise typer.Exit(1)
