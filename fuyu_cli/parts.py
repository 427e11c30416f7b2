"""--output-dir: a job cut into parts that are each written exactly once, by any number of
processes (--shard I/N under a scheduler, or Ray workers), on one machine or many.

DIR/run.json (written first) fingerprints the job: task and prompts, the model (config hash and
weight file sizes), dtype, quantization, generation settings, the fuyu version and the input list
(count and hash). A rerun or a shard with another fingerprint is refused (exit 2).

The input files, sorted by absolute path, are cut into parts of --shard-size files the same way
every time. Part k is written to a temporary file (locked while written), renamed to
DIR/part-0000k.jsonl (or .parquet) when complete, then DIR/part-0000k.done.json records counts,
failures and seconds. A part counts as done only with its marker, so a rerun after any crash
redoes exactly the parts without one, and the union of the parts holds every record once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from fuyu import __version__, inputs
from fuyu.errors import ITEMS_FAILED, FuyuError, OutputError
from fuyu.options import RunOptions
from fuyu.records import FIELDS, Ask, Record, absolute, is_uri

RUN_FILE = "run.json"


def part_name(k: int, fmt: str) -> str:
    return f"part-{k:05d}.{fmt}"


def marker_name(k: int) -> str:
    return f"part-{k:05d}.done.json"


class Folder:
    """The output folder: a local directory (atomic renames, locks) or a URI read and written
    through pyarrow's file systems (each object is written whole)."""

    def __init__(self, location: str):
        self.location = location
        self.local = not is_uri(location)
        if self.local:
            self.path = Path(location)
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(self.path, e) from None
        else:
            from pyarrow import fs

            self.fs, self.root = fs.FileSystem.from_uri(location)
            self.fs.create_dir(self.root, recursive=True)

    def __str__(self) -> str:
        return self.location

    def _remote(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        if self.local:
            return (self.path / name).exists()
        from pyarrow import fs

        return self.fs.get_file_info(self._remote(name)).type != fs.FileType.NotFound

    def read(self, name: str) -> bytes:
        if self.local:
            return (self.path / name).read_bytes()
        with self.fs.open_input_stream(self._remote(name)) as f:
            return f.read()

    def write(self, name: str, data: bytes, exclusive: bool = False) -> bool:
        """Write `name` whole (temp file + rename locally). exclusive: only if it does not exist
        yet; returns False when it did."""
        if not self.local:
            if exclusive and self.exists(name):
                return False
            with self.fs.open_output_stream(self._remote(name)) as f:
                f.write(data)
            return True
        dst = self.path / name
        tmp = dst.with_name(f".{name}.{os.getpid()}.fuyu-tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, dst)  # atomic create-if-absent, even between machines on NFS
                except FileExistsError:
                    return False
                finally:
                    tmp.unlink()
            else:
                os.replace(tmp, dst)
            return True
        except OSError as e:
            if tmp.exists():
                tmp.unlink()
            raise OutputError(dst, e) from None

    def put(self, name: str, local_file: Path) -> None:
        """Move a finished local file into the folder as `name`."""
        if self.local:
            try:
                os.replace(local_file, self.path / name)
            except OSError as e:
                raise OutputError(self.path / name, e) from None
            return
        from pyarrow import fs

        fs.copy_files(str(local_file), self._remote(name), destination_filesystem=self.fs)
        local_file.unlink()


# --- the fingerprint -------------------------------------------------------------------------

def fingerprint(asks: list[Ask], opts: RunOptions, ckpt: Path, files: list[str], fields=None) -> dict:
    """What makes two runs the same job. The model is identified by its config.json hash and its
    weight files' names and sizes (not its folder), so shards on machines with different paths agree."""
    config = (ckpt / "config.json").read_bytes()
    weights = sorted((p.name, p.stat().st_size) for p in ckpt.glob("*.safetensors"))
    listing = hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest()
    gen, model, src = opts.gen, opts.model, opts.inputs
    extra = {} if fields is None else {"fields": fields.fingerprint()}  # names, types, per page/document
    if gen.min_score is not None:
        extra["min_score"] = gen.min_score
    return {
        "fuyu": __version__,
        "prompts": [{"task": a.task, "prompt": a.prompt, **({"field": a.field.spec()} if a.field else {})}
                    for a in asks],  # a typed question's type is part of the job
        "model": {"folder": str(ckpt), "config_sha256": hashlib.sha256(config).hexdigest(),
                  "weights": [list(w) for w in weights]},
        "dtype": model.dtype, "quantize": model.quantize,
        "generation": {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature,
                       "top_p": gen.top_p, "seed": gen.seed},
        "pages": {"pages": src.pages, "dpi": src.dpi, "all_frames": src.all_frames},
        "format": opts.out.format, "shard_size": opts.out.shard_size,
        "inputs": {"count": len(files), "sha256": listing},
        **extra,
    }


def _comparable(fp: dict) -> dict:
    d = json.loads(json.dumps(fp))
    d["model"].pop("folder", None)
    d.pop("fuyu", None)  # a patch release may finish a job its predecessor started
    return d


def claim(folder: Folder, fp: dict, overwrite: bool) -> None:
    """Write run.json, or check that the one there describes this same job."""
    data = json.dumps(fp, indent=2, ensure_ascii=True).encode()
    if overwrite:
        folder.write(RUN_FILE, data)
        return
    if folder.write(RUN_FILE, data, exclusive=True):
        return
    try:
        there = json.loads(folder.read(RUN_FILE))
    except (OSError, ValueError):
        there = {}
    a, b = _comparable(there) if "model" in there else {}, _comparable(fp)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise FuyuError(f"{folder} holds another job ({', '.join(diff) or 'run.json'} differ)",
                        "use --overwrite to redo it with these settings, or another --output-dir")


# --- one part ----------------------------------------------------------------------------------

@dataclass
class PartResult:
    part: int
    records: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: bool = False  # another process holds this part


class PartBusy(Exception):
    """Another process is writing this part right now."""


class PartWriter:
    """Records of one part into a local temporary file, locked so that two processes never write
    the same part at once; `finish` moves it into the folder, then writes the marker."""

    def __init__(self, folder: Folder, k: int, fmt: str, fields=None):
        self.folder, self.k, self.fmt, self.fields = folder, k, fmt, fields
        base = folder.path if folder.local else Path(tempfile.gettempdir())
        self.tmp = base / f".{part_name(k, fmt)}.fuyu-tmp"
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(self.tmp, e) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise PartBusy() from None
            raise OutputError(self.tmp, e) from None
        os.ftruncate(self.fd, 0)  # a crashed run's leftover: ours now
        self.rows: list[dict] = []

    def write(self, rec: Record) -> None:
        rec = rec.with_path(absolute(rec.path))
        if self.fmt == "parquet":  # field records: a column per field (fuyu.fields.FieldSet.row)
            self.rows.append(arrow_row(rec) if self.fields is None else self.fields.row(rec))
            return
        try:
            os.write(self.fd, (rec.to_json() + "\n").encode("utf-8"))
        except OSError as e:
            raise OutputError(self.tmp, e) from None

    def finish(self, result: PartResult) -> None:
        try:
            if self.fmt == "parquet":
                _write_parquet(self.tmp, self.rows, record_schema() if self.fields is None else self.fields.schema())
            os.fsync(self.fd)
        except OSError as e:
            raise OutputError(self.tmp, e) from None
        self.folder.put(part_name(self.k, self.fmt), self.tmp)
        marker = {**asdict(result), "host": socket.gethostname(), "pid": os.getpid(),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        marker.pop("skipped")
        self.folder.write(marker_name(self.k), json.dumps(marker).encode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if self.tmp.exists() and not self.folder.local:
                self.tmp.unlink()


_PARQUET_INT = ("page", "pages", "width", "height", "prompt_tokens", "new_tokens")


def record_schema():
    """Records as Arrow columns (parquet parts, FuyuPredictor's output): FIELDS in order."""
    import pyarrow as pa

    types = {k: pa.int32() for k in _PARQUET_INT}
    types.update(seconds=pa.float64(), score=pa.float64(), doubtful=pa.bool_(),
                 boxes=pa.list_(pa.list_(pa.int32())))
    return pa.schema([(k, types.get(k, pa.string())) for k in FIELDS])


def arrow_row(rec: Record) -> dict:
    """A record as a row of record_schema(): a typed answer (a number, a boolean) as JSON text."""
    d = rec.to_dict()
    if "answer" in d and not isinstance(d["answer"], str):
        d["answer"] = json.dumps(d["answer"])
    return d


def _write_parquet(path: Path, rows: list[dict], schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path))


def process_part(k: int, files: list[str], asks: list[Ask], runner, folder: Folder, opts: RunOptions,
                 on_record: Callable[[Record], None] | None = None, fields=None) -> PartResult:
    """Run one part's files and write the part; PartResult(skipped=True) when another process
    holds it. fields: `runner` is fields.wrap(…)'s, writing field records."""
    from fuyu.pipeline import Tally, plan, source_options

    result = PartResult(k)
    try:
        writer = PartWriter(folder, k, opts.out.format, fields)
    except PartBusy:
        result.skipped = True
        return result
    start = time.perf_counter()
    try:
        tally = Tally()
        batch = opts.model.batch_size or runner.default_batch_size()
        work = plan(files, asks, source_options(opts), tally)
        for rec in runner.run(work, batch, opts.gen, window=max(len(files), 1)):
            writer.write(rec)
            result.records += 1
            result.failed += not rec.ok
            result.tokens += rec.new_tokens or 0
            if on_record is not None:
                on_record(rec)
        result.seconds = round(time.perf_counter() - start, 3)
        writer.finish(result)
    finally:
        writer.close()
    return result


# --- a whole job on this process ---------------------------------------------------------------

def list_inputs(opts: RunOptions) -> list[str]:
    """Every input file, deduplicated, as absolute paths sorted: the same list in every shard."""
    import sys

    found = inputs.Found()
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    files = inputs.iter_files(opts.inputs.paths, stdin, found, recursive=opts.inputs.recursive,
                              null=opts.inputs.null)
    return sorted({absolute(f) for f in files})


def plan_parts(files: list[str], size: int) -> list[list[str]]:
    return [files[i:i + size] for i in range(0, len(files), size)]


def pending(folder: Folder, n_parts: int, shard: tuple[int, int] | None, overwrite: bool) -> tuple[list[int], int]:
    """(the parts this process should do, how many of its parts were done before)."""
    i, n = shard or (0, 1)
    mine = [k for k in range(n_parts) if k % n == i]
    if overwrite:
        return mine, 0
    todo = [k for k in mine if not folder.exists(marker_name(k))]
    return todo, len(mine) - len(todo)


def run_task(asks: list[Ask], opts: RunOptions, *, on_record=None, fields=None) -> None:
    import typer

    from fuyu.locate import find_checkpoint
    from fuyu.pipeline import load_runner, source_options
    from fuyu.render import Reporter

    out = opts.out
    ui = Reporter(out.quiet)
    files = list_inputs(opts)
    if not files:
        ui.note("no images found")
        return
    ckpt = find_checkpoint(opts.model.path, download=opts.model.download, ui=ui)
    folder = Folder(out.output_dir)
    claim(folder, fingerprint(asks, opts, ckpt, files, fields), out.overwrite)
    parts = plan_parts(files, out.shard_size)
    if opts.cluster.address is not None:
        from fuyu import cluster

        if on_record is not None:  # bbox --draw writes next to this process, not on the workers
            raise FuyuError("--draw draws on this machine, --ray runs on the cluster", "drop one of them")
        return cluster.run_parts(asks, opts, folder, parts, ckpt, ui, fields)
    todo, before = pending(folder, len(parts), out.shard, out.overwrite)
    label = "fields" if fields is not None else asks[0].task
    if not todo:
        ui.note(nothing_to_do(label, before, folder))
        return
    from dataclasses import replace

    from fuyu.pipeline import image_warnings

    runner = load_runner(replace(opts.model, path=str(ckpt)), opts.gen.max_new_tokens, source_options(opts), ui)
    load_s = getattr(runner, "load_seconds", None) or 0.0
    if fields is not None:
        runner = fields.wrap(runner)
    results = []
    started = time.perf_counter()
    for k in todo:
        with image_warnings():
            res = process_part(k, parts[k], asks, runner, folder, opts, on_record, fields)
        results.append(res)
        if not res.skipped:
            ui.note(part_line(label, res))
    ui.note(summary_line(label, results, before, time.perf_counter() - started,
                         f"into {folder}; model loaded in {load_s:.1f} s (not included)"))
    if any(r.failed for r in results):
        raise typer.Exit(ITEMS_FAILED)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def nothing_to_do(label: str, before: int, folder: Folder) -> str:
    return f"{label}: nothing to do, {_n(before, 'part')} already done in {folder}"


def part_line(label: str, res: PartResult, where: str = "") -> str:
    """`caption: part 3 done, 1000 records, 2 failed in 812.4 s (host, pid 123)`."""
    return (f"{label}: part {res.part} done, {_n(res.records, 'record')}"
            + (f", {res.failed} failed" if res.failed else "") + f" in {res.seconds:.1f} s"
            + (f" ({where})" if where else ""))


def summary_line(label: str, results: list[PartResult], before: int, seconds: float, tail: str) -> str:
    """The run's last line: parts and records done, failures, parts done before or by others."""
    done = [r for r in results if not r.skipped]
    busy = len(results) - len(done)
    failed = sum(r.failed for r in done)
    extra = [f"{_n(before, 'part')} done earlier" if before else "",
             f"{_n(busy, 'part')} being written by another process" if busy else ""]
    return (f"{label}: {_n(len(done), 'part')}, {_n(sum(r.records for r in done), 'record')}"
            + (f", {failed} failed" if failed else "") + "".join(f", {e}" for e in extra if e)
            + f" in {seconds:.1f} s {tail}")


def read_records(folder: Folder | str, fmt: str = "jsonl") -> Iterator[dict]:
    """Every record of the finished parts (those with a marker), for tests and users' scripts."""
    folder = folder if isinstance(folder, Folder) else Folder(folder)
    if not folder.local:
        raise NotImplementedError("read_records reads local folders")
    for marker in sorted(folder.path.glob("part-*.done.json")):
        data = folder.path / marker.name.replace(".done.json", f".{fmt}")
        if fmt == "parquet":
            import pyarrow.parquet as pq

            yield from pq.read_table(str(data)).to_pylist()
        else:
            for line in data.read_text(encoding="utf-8").splitlines():
                yield json.loads(line)
