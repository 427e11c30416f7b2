"""Ray: an --output-dir job's parts shared out over model replicas (`--ray`), and FuyuPredictor,
the same model as a callable class for users' own ray.data pipelines (pip install 'fuyu[ray]').

The driver lists and cuts the input exactly as a local run does (fuyu.parts), skips the parts that
have a marker, and maps a dataset of part descriptors (number + files), one row per block, over an
actor pool. Each actor (PartWorker) loads the model once, sets torch's threads to the CPUs Ray
gave it, and writes whole parts through fuyu.parts.process_part: a temporary file, renamed when
complete, then the marker. Ray restarts a killed actor and runs its part again (at least once);
the rename and the marker make that exactly once, since a part counts only with its marker and a
rerun of it replaces the whole file. Paths and the output folder may be URIs (s3://, gs://,
hdfs://, file://): workers on other machines must see the same inputs, output and model folder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from fuyu.errors import INTERNAL, ITEMS_FAILED, FuyuError, explain, one_line
from fuyu.options import ClusterSpec, GenOptions, ModelSpec, RunOptions
from fuyu.parts import (Folder, PartResult, marker_name, nothing_to_do, part_line, pending, process_part,
                        summary_line)
from fuyu.records import Ask, Item, Record, Unit

# --ray local: the dataset carries file lists and summaries, never images (workers read those).
LOCAL_OBJECT_STORE = 128 * 2**20


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FuyuError("--ray needs Ray", "pip install 'fuyu[ray]'") from None
    return ray


@contextmanager
def connected(address: str):
    """Connected to the cluster at `address` (auto | local | host:port) for the block, with Ray's
    own logging kept off stderr. A process already connected (a script, a test) stays so."""
    ray = _ray()
    if address.startswith("ray://"):  # github.com/ray-project/ray/issues/48682
        raise FuyuError("Ray Data does not run through Ray Client (ray://…): the driver must be on "
                        "the cluster",
                        "run fuyu on a cluster node with --ray auto, e.g. `ray job submit --address "
                        "http://HEAD:8265 -- fuyu caption s3://… --ray auto --output-dir s3://…`")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # progress is ours: one line per finished part
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    if ray.is_initialized():
        _quiet_ray_data()
        yield ray
        return
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    # The core worker's C++ log: only fatal errors (else an "actor constructor arguments in the
    # object store" line per worker); the line saying so, and the processes a local cluster
    # starts, write to the stderr that ray.init sees: not ours.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        with _stderr_silenced():
            if address == "local":
                from fuyu.threads import available_cpus

                ray.init(address="local", num_cpus=available_cpus(), object_store_memory=LOCAL_OBJECT_STORE,
                         include_dashboard=False, **quiet)
            else:
                ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:  # no cluster there, a bad address
        raise FuyuError(f"cannot join the Ray cluster at {address}: {one_line(e, first=True) or type(e).__name__}",
                        "start one with `ray start --head` (or set RAY_ADDRESS), or use --ray local") from None
    _quiet_ray_data()
    try:
        yield ray
    finally:
        with _stderr_silenced():
            ray.shutdown()


def _quiet_ray_data() -> None:
    """ray.data logs every execution at INFO on stderr; its log file in the session folder keeps all."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console, not the session log file
            handler.setLevel(logging.ERROR)


@contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the block (C++ logging and child processes write there
    directly); Python exceptions still come through."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def worker_resources(spec: ClusterSpec, nodes: list[dict], local: bool) -> tuple[int, float, float]:
    """(workers, CPUs, GPUs) per worker. CPUs default to 1 with a GPU, else the cluster's CPUs
    shared out so that every worker fits on some node (fractions when there are fewer CPUs
    than workers)."""
    cpus = [n.get("CPU", 0.0) for n in nodes]
    gpus = spec.gpus_per_worker
    share = spec.cpus_per_worker
    if share is None:
        share = 1.0 if gpus > 0 else float(sum(cpus) // spec.workers)
        while share > 1 and sum(c // share for c in cpus) < spec.workers:
            share -= 1
        if share < 1:
            share = round(sum(cpus) / spec.workers, 2) or 0.01
    from fuyu.render import warning_line

    cluster_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    for name, per, have in (("CPU", share, sum(cpus)), ("GPU", gpus, cluster_gpus)):
        need = per * spec.workers
        if need > have + 1e-9:
            message = f"{spec.workers} workers need {need:g} {name}s, the cluster has {have:g}"
            if local:
                raise FuyuError(message, "use fewer --workers, or less --gpus-per-worker / --cpus-per-worker")
            warning_line(message + "; the rest wait until the cluster grows")
    if cluster_gpus and not gpus:  # Ray hides the GPUs from workers that did not ask for one
        warning_line(f"the cluster has {cluster_gpus:g} GPUs and the workers run on CPUs; "
                     "add --gpus-per-worker 1 to use them")
    return spec.workers, share, gpus


def run_parts(asks: list[Ask], opts: RunOptions, folder: Folder, parts: list[list[str]], ckpt: Path,
              ui, fields=None) -> None:
    """The parts without a marker, on a Ray cluster; the same notes, summary and exit codes as a
    local --output-dir run."""
    import typer

    todo, before = pending(folder, len(parts), None, opts.out.overwrite)
    label = "fields" if fields is not None else asks[0].task
    if not todo:
        ui.note(nothing_to_do(label, before, folder))
        return
    launched = time.time()
    spec = opts.cluster
    with connected(spec.address) as ray:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        workers, cpus, gpus = worker_resources(replace(spec, workers=min(spec.workers, len(todo))),
                                               nodes, local=spec.address == "local")
        ds = ray.data.from_items([{"part": k, "files": json.dumps(parts[k])} for k in todo],
                                 override_num_blocks=len(todo))  # one part per block: any worker takes any part
        ds = ds.map_batches(
            PartWorker, batch_size=1,
            fn_constructor_kwargs=dict(asks=asks, opts=opts, ckpt=str(ckpt), folder=folder.location, fields=fields),
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            num_cpus=cpus, **({"num_gpus": gpus} if gpus else {}))
        results, first, last = [], None, None
        for row in _rows(ds, ray):
            if row["error"] is not None:  # the same error would stop a local run: stop here too
                raise FuyuError(row["error"], row["hint"] or "", row["code"])
            res = PartResult(*(row[k] for k in ("part", "records", "failed", "tokens", "seconds", "skipped")))
            results.append(res)
            if res.skipped:
                continue
            first = min(first or row["started"], row["started"])
            last = max(last or row["finished"], row["finished"])
            ui.note(part_line(label, res, f"{row['host']}, pid {row['pid']}"))
    startup = (f"; start-up (cluster, workers, model loads) {first - launched:.1f} s (not included)"
               if first is not None else "")
    ui.note(summary_line(label, results, before, (last or launched) - (first or launched),
                         f"on {workers} worker{'s' * (workers > 1)} into {folder}{startup}"))
    if any(r.failed for r in results):
        raise typer.Exit(ITEMS_FAILED)


def _rows(ds, ray):
    """The dataset's rows; Ray's own failures (a lost node, a worker that cannot start) as one line."""
    try:
        yield from ds.iter_rows()
    except ray.exceptions.RayError as e:
        raise FuyuError(f"the Ray job failed: {one_line(e, first=True) or type(e).__name__}",
                        "finished parts are kept: rerun the same command to do the rest", INTERNAL) from None


def _summary_schema():
    import pyarrow as pa

    ints = ("part", "records", "failed", "tokens", "pid", "code")
    floats = ("seconds", "started", "finished")
    return pa.schema([(k, pa.int64()) for k in ints] + [(k, pa.float64()) for k in floats]
                     + [("skipped", pa.bool_()), ("host", pa.string()), ("error", pa.string()),
                        ("hint", pa.string())])


def _explained(exc: BaseException) -> tuple[str, str, int]:
    """(message, hint, exit code) for the driver; an unexpected error's traceback goes to the
    worker's log (Ray keeps worker stderr in the session's logs folder)."""
    known = explain(exc)
    if known is not None:
        return known
    import traceback

    traceback.print_exception(exc)
    return (f"{type(exc).__name__}: {one_line(exc)}",
            f"a bug in fuyu; the traceback is in worker-*.err under /tmp/ray/session_latest/logs on "
            f"{socket.gethostname()} (pid {os.getpid()})", INTERNAL)


def cpu_share() -> int:
    """The CPUs Ray scheduled this worker with, as a torch thread count (at least 1); outside a
    Ray worker, the CPUs this process may use."""
    import sys

    from fuyu.threads import available_cpus

    ray = sys.modules.get("ray")  # never imported (or started) here just to ask
    if ray is None or not ray.is_initialized():
        return available_cpus()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else available_cpus()


def _load_runner(spec: ModelSpec, ckpt: str | None, max_new_tokens: int, src):
    """Runner.load on this worker, with torch threads = its CPU share unless --threads was given.
    The driver's model folder is used when this machine has it, else spec.path is resolved here."""
    from fuyu.runner import Runner

    here = ckpt is not None and Path(ckpt).is_dir()
    spec = replace(spec, path=ckpt if here else spec.path, threads=spec.threads or cpu_share())
    return Runner.load(spec, ckpt=Path(ckpt) if here else None, max_new_tokens=max_new_tokens,
                       sources_options=src)


class PartWorker:
    """A Ray Data actor: loads the model once, then writes one whole part per call and returns a
    summary row. Errors come back in the row (message, hint, exit code), for the driver to stop on."""

    def __init__(self, asks: list[Ask], opts: RunOptions, ckpt: str, folder: str, fields=None):
        from fuyu.pipeline import source_options

        self.asks, self.opts, self.fields, self.error = asks, opts, fields, None
        try:
            self.folder = Folder(folder)
            self.runner = _load_runner(opts.model, ckpt, opts.gen.max_new_tokens, source_options(opts))
            if fields is not None:
                self.runner = fields.wrap(self.runner)
        except Exception as exc:  # reported with the first part, as a local run reports it
            self.error = _explained(exc)

    def __call__(self, batch):
        import pyarrow as pa

        rows = [self._part(int(k), json.loads(files)) for k, files in zip(batch["part"], batch["files"])]
        return pa.Table.from_pylist(rows, schema=_summary_schema())

    def _part(self, k: int, files: list[str]) -> dict:
        row = dict(part=k, records=0, failed=0, tokens=0, seconds=0.0, skipped=False, started=time.time(),
                   finished=0.0, host=socket.gethostname(), pid=os.getpid(), error=None, hint=None, code=0)
        error = self.error
        if error is None:
            try:
                # A retry after the marker was written (the worker died before returning) is done.
                res = self._marked(k) or process_part(k, files, self.asks, self.runner, self.folder, self.opts,
                                                      fields=self.fields)
                row.update(records=res.records, failed=res.failed, tokens=res.tokens, seconds=res.seconds,
                           skipped=res.skipped)
            except Exception as exc:
                error = _explained(exc)
        if error is not None:
            row.update(zip(("error", "hint", "code"), error))
        row["finished"] = time.time()
        return row

    def _marked(self, k: int) -> PartResult | None:
        if self.opts.out.overwrite or not self.folder.exists(marker_name(k)):
            return None
        m = json.loads(self.folder.read(marker_name(k)))
        return PartResult(k, m["records"], m["failed"], m["tokens"], m["seconds"])


# --- a callable class for users' own pipelines -------------------------------------------------

DEFAULT_MAX_NEW_TOKENS = {"caption": 64, "ask": 64, "bbox": 32, "fields": 64}


class FuyuPredictor:
    """Fuyu for ray.data: `ds.map_batches(FuyuPredictor, fn_constructor_kwargs={"model": DIR,
    "task": "caption"}, compute=ray.data.ActorPoolStrategy(size=N), num_gpus=1, batch_size=16)`.

    Rows hold `path` (a local path or a URI) or `bytes` (e.g. ray.data.read_binary_files, whose
    `path` then only names the row), and optionally `question`: that row's question (ask), text
    to find (bbox) or prompt (caption). Each row gives one record per item (a PDF path: one per
    page) with the columns of fuyu's JSON records, in row order; a row that fails (unreadable
    bytes, missing file) gets its `error` instead of stopping the batch.

    task="fields", fields=[{"name", "question", "type", …}] (or fuyu.fields.Field): one row per
    item (per file with per_document=True) with a column per field, its score (and page), as
    `fuyu ask --fields --format parquet` writes them (docs/fields.md).
    """

    def __init__(self, model: str | None = None, task: str = "caption", prompt: str | None = None,
                 question: str | None = None, find: str | None = None, box=None, dtype: str = "auto",
                 device: str = "auto", quantize: str = "none", max_new_tokens: int | None = None,
                 model_batch_size: int | None = None, temperature: float = 0.0, top_p: float | None = None,
                 seed: int | None = None, pages: str | None = None, dpi: float | None = None,
                 threads: int | None = None, fields=None, per_document: bool = False,
                 min_score: float | None = None):
        from fuyu import sources

        if task not in DEFAULT_MAX_NEW_TOKENS:
            raise ValueError(f"task {task!r}: expected one of {', '.join(DEFAULT_MAX_NEW_TOKENS)}")
        self.fieldset = None
        if task == "fields":
            from fuyu.fields import FieldSet, as_fields

            if not fields:
                raise ValueError('task "fields" needs fields=[{"name": …, "question": …}, …]')
            self.fieldset = FieldSet(as_fields(fields), per_document, min_score)
        self.task = "ocr" if task == "bbox" and box is not None else task
        self.text = {"caption": prompt, "ask": question, "bbox": find, "fields": None}[task]
        self.box = None if box is None else tuple(float(v) for v in box)
        self.gen = GenOptions(max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task], temperature=temperature,
                              top_p=top_p, seed=seed, min_score=min_score)
        self.src = sources.Options(pages, dpi)
        spec = ModelSpec(path=model, device=device, dtype=dtype, quantize=quantize, batch_size=model_batch_size,
                         threads=threads)
        self.runner = _load_runner(spec, None, self.gen.max_new_tokens, self.src)
        self.batch_size = model_batch_size or self.runner.default_batch_size()

    def _ask(self, question) -> Ask:
        text = question if isinstance(question, str) and question else self.text
        if self.task == "ask" and not text:
            raise FuyuError("no question: give FuyuPredictor(question=...) or a `question` column")
        return Ask(self.task, text, self.box)

    def __call__(self, batch):
        import pyarrow as pa

        from fuyu.parts import arrow_row, record_schema

        rows = _columns(batch)
        records = self._records(rows)
        if self.fieldset is not None:
            return pa.Table.from_pylist([self.fieldset.row(r) for r in records], schema=self.fieldset.schema())
        return pa.Table.from_pylist([arrow_row(r) for r in records], schema=record_schema())

    def _records(self, rows: list[dict]) -> list[Record]:
        from fuyu import sources
        from fuyu.pipeline import Tally, plan

        work, order = [], {}  # order: path → the first row naming it
        for i, row in enumerate(rows):
            name = str(row.get("path") or f"<row {i}>")
            try:
                asks = self.fieldset.asks if self.fieldset is not None else [self._ask(row.get("question"))]
            except FuyuError as exc:
                work.append(Record(name, self.task, "", error=str(exc)))
                order.setdefault(name, i)
                continue
            data = row.get("bytes")
            if data is not None:
                work.append(Unit(Item(name, source=sources.Blob.of(bytes(data))), tuple(asks)))
            elif row.get("path"):
                work += plan([name], asks, self.src, Tally())
            else:
                work += [Record.failed(Item(name), ask, "the row has neither `path` nor `bytes`") for ask in asks]
            order.setdefault(name, i)
        runner = self.runner if self.fieldset is None else self.fieldset.wrap(self.runner)
        try:
            records = list(runner.run(work, self.batch_size, self.gen, window=max(len(work), 1)))
        except Exception as exc:  # the runner isolates bad items itself; this is the last guard
            message = f"{type(exc).__name__}: {one_line(exc)}"
            records = [w if isinstance(w, Record) else Record.failed(w.item, w.asks[0], message) for w in work]
            if self.fieldset is not None:
                records = [runner.combine([r]) for r in records]
        return sorted(records, key=lambda r: (order.get(r.path, len(rows)), r.page or 0))


def _columns(batch) -> list[dict]:
    """A Ray Data batch (dict of numpy arrays, pandas DataFrame or Arrow table) → rows as dicts."""
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):
        return batch.to_dict("records")
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{k: _plain(batch[k][i]) for k in names} for i in range(n)]


def _plain(v):
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
