"""Which checkpoint folder to load: --model DIR, or a Hugging Face repo id (default adept/fuyu-8b)
found in the Hugging Face cache, else downloaded into that cache with huggingface_hub.

A download asks first on a terminal and needs --download elsewhere; HF_HUB_OFFLINE=1 forbids it.
It fetches only what the loader and processor read, config.json last, so a snapshot holding a
config.json is complete, and an interrupted download resumes from its `.incomplete` files.
The cache location, endpoint and offline flag are read from the environment at each call
(huggingface_hub reads them once, at import) and passed to huggingface_hub explicitly.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import shutil
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fuyu.errors import FuyuError

HUB_REPO = "adept/fuyu-8b"
HUB_REPO_SIZE = "18.8 GB"  # its safetensors, for messages written before the hub is asked
DEFAULT_ENDPOINT = "https://huggingface.co"

# Only what the loader and processor read: never the .bin/.pt duplicates of the weights.
ALLOW_PATTERNS = ["config.json", "generation_config.json", "preprocessor_config.json",
                  "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "model.safetensors.index.json", "*.safetensors"]
HF_INCLUDE = "'*.json' tokenizer.model '*.safetensors'"  # the same for `hf download --include`

ATTEMPTS = 3  # per file, when the connection drops mid-file; each attempt resumes
RETRY_WAIT_S = 2.0  # times the attempt number
PLAIN_EVERY_S = 30.0  # a progress line this often when stderr is not a terminal

NO_WEIGHTS_HINT = "pass --model DIR (a checkpoint folder, or `fuyu convert` Adept's original release)"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")


def find_checkpoint(model: str | Path | None, download: bool = False, *, ui=None) -> Path:
    """The checkpoint folder for --model: a folder, or a hub repo id found in the local cache or,
    with `download` (or a yes at the terminal prompt), fetched into it. `ui` (a
    fuyu.render.Reporter, a new one by default) shows the download's notes and progress bar."""
    if model is not None:
        path = Path(model).expanduser()
        if path.is_dir():
            return path
        if path.exists():
            raise FuyuError(f"--model {model}: is a file, not a checkpoint folder",
                            "pass the folder holding config.json and the *.safetensors files")
        repo_id = str(model)
        if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
            raise FuyuError(f"model folder not found ({model})", NO_WEIGHTS_HINT)
    else:
        repo_id = HUB_REPO
    cache = hub_cache()
    snap = cached_snapshot(cache, repo_id)
    if snap is not None and not missing_shards(snap):
        return snap
    started = snap is not None or any((repo_folder(cache, repo_id) / "blobs").glob("*"))
    state = f"{'only partly' if started else 'not'} in the Hugging Face cache ({cache})"
    what = (f"no Fuyu checkpoint given and {repo_id} is {state}" if model is None
            else f"--model {model}: not a folder, and {state}")
    if hub_offline():
        raise FuyuError(f"{what}, and HF_HUB_OFFLINE=1 forbids downloading it",
                        f"unset HF_HUB_OFFLINE to download it, or {NO_WEIGHTS_HINT}")
    ask = not download and _interactive()
    if not download and not ask:
        raise FuyuError(what, how_to_download(repo_id))
    if ui is None:
        from fuyu.render import Reporter

        ui = Reporter()
    return _download(repo_id, cache, hub_endpoint(), ui, ask)


# --- the cache, the environment --------------------------------------------------------------------

def hub_cache() -> Path:
    """huggingface_hub's own rule: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if flag is not None:
        return flag.upper() in {"1", "ON", "YES", "TRUE"}
    constants = sys.modules.get("huggingface_hub.constants")  # set at its import, if imported
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(cache: Path, repo_id: str = HUB_REPO) -> Path | None:
    """The snapshot `refs/main` points to, else the newest one holding a config.json."""
    repo = repo_folder(cache, repo_id)
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    snaps = [p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime, default=None)


def missing_shards(snap: Path) -> list[str]:
    """Shards the index names that the snapshot lacks (a download cut short by another tool:
    ours fetches config.json last, so a snapshot of ours holding it is complete)."""
    try:
        weight_map = json.loads((snap / "model.safetensors.index.json").read_text())["weight_map"]
        return sorted(n for n in set(weight_map.values()) if not (snap / n).is_file())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # no index (one file), or an unreadable one: the loader says what is wrong


# --- what to tell the user -------------------------------------------------------------------------

def how_to_download(repo_id: str) -> str:
    size = f" (≈{HUB_REPO_SIZE})" if repo_id == HUB_REPO else ""
    cmd = rerun_with_download()
    run = f"`{cmd}`" if cmd else "the same fuyu command with --download"
    return (f"to download it{size} run {run}, or `hf download {repo_id} --include {HF_INCLUDE}`; "
            f"or {NO_WEIGHTS_HINT}")


def rerun_with_download() -> str | None:
    """This very command line plus --download, when this process is the fuyu command."""
    argv0 = Path(sys.argv[0] if sys.argv else "")
    if argv0.name in ("fuyu", "fuyu.exe"):
        head = ["fuyu"]
    elif argv0.name == "__main__.py" and argv0.parent.name in ("fuyu", "fuyu_cli"):
        head = ["python", "-m", "fuyu"]
    else:
        return None
    return shlex.join([*head, *sys.argv[1:], "--download"])


def size_text(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _interactive() -> bool:
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _confirm(question: str) -> bool:
    """`question [y/N]` on stderr, the answer from stdin; end of input is a no."""
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


# --- the download ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubFile:
    name: str
    size: int | None
    blob: str | None  # its name in the cache's blobs/ (the hub's ETag: LFS sha256, else git blob id)


def list_hub_files(repo_id: str, endpoint: str) -> tuple[str, list[HubFile]]:
    """(commit sha of main, the files to fetch) from the hub's file listing."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    info = HfApi(endpoint=endpoint, library_name="fuyu").model_info(repo_id, files_metadata=True,
                                                                     timeout=15)
    wanted = filter_repo_objects(info.siblings or [], allow_patterns=ALLOW_PATTERNS,
                                 key=lambda s: s.rfilename)
    files = [HubFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else s.blob_id) for s in wanted]
    return info.sha, files


def _download(repo_id: str, cache: Path, endpoint: str, ui, ask: bool) -> Path:
    try:
        with _quiet_hub():
            sha, files = list_hub_files(repo_id, endpoint)
    except Exception as exc:
        raise _hub_error(exc, repo_id, cache, endpoint) or exc
    if "config.json" not in {f.name for f in files}:
        raise FuyuError(f"{repo_id} on the Hugging Face Hub has no config.json: not a checkpoint "
                        "fuyu can load", NO_WEIGHTS_HINT)
    storage = repo_folder(cache, repo_id)
    progress = _Progress(storage / "blobs", storage / "snapshots" / sha, files)
    total, have = progress.total, progress.done()
    left = total - have if total is not None else None
    size = "" if total is None else (f" (≈{size_text(left)} left of {size_text(total)})" if have
                                     else f" (≈{size_text(total)})")
    if ask and not _confirm(f"Download {repo_id}{size} into {cache}?"):
        raise FuyuError(f"{repo_id}: download declined",
                        f"answer y to download it, or add --download; or {NO_WEIGHTS_HINT}")
    _check_space(cache, left, repo_id)
    ui.note(f"downloading {repo_id}{size} into {cache}; if interrupted, the same command resumes")
    started = time.monotonic()
    try:
        with _quiet_hub():
            _fetch_all(repo_id, sha, files, cache, endpoint, ui, progress)
    except KeyboardInterrupt:
        ui.note(f"download of {repo_id} interrupted; the same command resumes it")
        raise
    except Exception as exc:
        raise _hub_error(exc, repo_id, cache, endpoint) or exc
    snap = storage / "snapshots" / sha
    ui.note(f"downloaded {repo_id} ({size_text(progress.done())}) in {time.monotonic() - started:.0f} s")
    return snap


def _fetch_all(repo_id: str, sha: str, files: list[HubFile], cache: Path, endpoint: str, ui,
               progress: _Progress) -> None:
    """Fetch the files one by one on a daemon thread (config.json last) while this one draws the
    progress: Ctrl-C ends the process at once, and a rerun resumes from the .incomplete file."""
    from huggingface_hub import hf_hub_download

    from fuyu import __version__

    storage = repo_folder(cache, repo_id)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(sha)  # what huggingface_hub writes for a branch download
    order = sorted(files, key=lambda f: (f.name == "config.json", f.size or 0))
    failure: list[BaseException] = []

    def fetch() -> None:
        try:
            for f in order:
                for attempt in range(1, ATTEMPTS + 1):
                    try:
                        hf_hub_download(repo_id, f.name, revision=sha, cache_dir=str(cache),
                                        endpoint=endpoint, library_name="fuyu",
                                        library_version=__version__)
                        break
                    except _dropped() as exc:
                        if attempt == ATTEMPTS:
                            raise
                        ui.note(f"{repo_id}: connection lost during {f.name} ({type(exc).__name__}); "
                                f"resuming ({attempt + 1} of {ATTEMPTS})")
                        time.sleep(RETRY_WAIT_S * attempt)
        except BaseException as exc:  # handed to the main thread, which explains it
            failure.append(exc)

    worker = threading.Thread(target=fetch, name="fuyu-download", daemon=True)
    with ui.byte_progress(f"downloading {repo_id}") as on_bytes:
        worker.start()
        last_line = time.monotonic()
        while worker.is_alive():
            worker.join(0.25)
            done = progress.done()
            if on_bytes is not None:
                on_bytes(done, progress.total)
            elif time.monotonic() - last_line >= PLAIN_EVERY_S and worker.is_alive():
                last_line = time.monotonic()
                ui.note(progress.line(repo_id, done))
    if failure:
        raise failure[0]


class _Progress:
    """Bytes on disk so far, from the cache's blobs (finished) and their .incomplete files."""

    def __init__(self, blobs: Path, snapshot: Path, files: list[HubFile]):
        self.blobs, self.snapshot, self.files = blobs, snapshot, files
        sizes = [f.size for f in files]
        self.total = None if None in sizes else sum(sizes)
        self.started, self.at_start = time.monotonic(), None

    def done(self) -> int:
        n = 0
        for f in self.files:
            if (self.snapshot / f.name).exists() or (f.blob and (self.blobs / f.blob).exists()):
                n += f.size or 0
            elif f.blob:
                try:
                    n += (self.blobs / f"{f.blob}.incomplete").stat().st_size
                except OSError:
                    pass
        if self.at_start is None:
            self.at_start = n
        return n

    def line(self, repo_id: str, done: int) -> str:
        rate = (done - (self.at_start or 0)) / max(time.monotonic() - self.started, 1e-9)
        line = f"downloading {repo_id}: {size_text(done)}"
        if self.total:
            line += f" of {size_text(self.total)} ({100 * done / self.total:.0f}%)"
        line += f", {size_text(rate)}/s"
        if self.total and rate > 0:
            left = (self.total - done) / rate
            line += f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
        return line


def _check_space(cache: Path, needed: int | None, repo_id: str) -> None:
    if not needed:
        return
    where = cache
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if free < needed:
        raise FuyuError(f"not enough space in {cache} for {repo_id}: {size_text(needed)} needed, "
                        f"{size_text(free)} free",
                        "free some space, or set HF_HUB_CACHE to a folder on a larger disk")


def _dropped() -> tuple[type[BaseException], ...]:
    """A connection that broke mid-file: worth another attempt, which resumes."""
    import requests

    return (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError,
            requests.exceptions.Timeout)


def _hub_error(exc: BaseException, repo_id: str, cache: Path, endpoint: str) -> FuyuError | None:
    """One line for what the hub, the network or the disk did; None for the unexpected."""
    import requests
    from huggingface_hub import errors

    again = "run the same command again: it resumes where it stopped"
    page = f"{endpoint}/{repo_id}"
    if isinstance(exc, errors.OfflineModeIsEnabled) or isinstance(exc.__cause__, errors.OfflineModeIsEnabled):
        return FuyuError(f"{repo_id} is not in the Hugging Face cache ({cache}), and offline mode "
                         "(HF_HUB_OFFLINE) forbids downloading it", "unset HF_HUB_OFFLINE")
    if isinstance(exc, errors.GatedRepoError):
        return FuyuError(f"{repo_id} is gated on the Hugging Face Hub: its files need an accepted "
                         "licence and a token", f"accept its terms at {page}, log in with "
                         "`hf auth login` (or set HF_TOKEN), and run the same command again")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.RepositoryNotFoundError) or status == 404:  # 404, or 401 without a token
        return FuyuError(f"{repo_id}: no such model on the Hugging Face Hub ({endpoint}), or it is private",
                         f"check the name (e.g. {HUB_REPO}) and HF_ENDPOINT; for a private model "
                         "log in with `hf auth login` or set HF_TOKEN")
    if isinstance(exc, errors.HfHubHTTPError) and status is not None:
        if status in (401, 403):
            return FuyuError(f"{repo_id}: the Hugging Face Hub refused access ({status})",
                             f"log in with `hf auth login` (or set HF_TOKEN) with access to {page}")
        return FuyuError(f"{repo_id}: the Hugging Face Hub answered {status}", f"try again later; {again}")
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ReadTimeout)):
        return FuyuError(f"cannot download {repo_id}: the connection to the Hugging Face Hub ({endpoint}) "
                         "kept dropping", f"check the network, then {again}")
    if isinstance(exc, (requests.exceptions.RequestException, errors.LocalEntryNotFoundError)):
        return FuyuError(f"cannot download {repo_id}: the Hugging Face Hub ({endpoint}) is unreachable",
                         f"check the network (or HF_ENDPOINT), then {again}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FuyuError(f"cannot download {repo_id}: no space left in {cache}",
                         f"free some space or set HF_HUB_CACHE to a larger disk, then {again}")
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FuyuError(f"cannot download {repo_id}: cannot write to {cache} ({exc.strerror})",
                         "fix its permissions, or set HF_HUB_CACHE to a writable folder")
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return FuyuError(f"cannot download {repo_id}: a file arrived truncated", again)
    return None


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """No tqdm bars, warnings or log lines from huggingface_hub: our progress and errors say it."""
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)

    log = logging.getLogger("huggingface_hub")
    level, bars_were_off = log.level, are_progress_bars_disabled()
    log.setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        disable_progress_bars()
        try:
            yield
        finally:
            if not bars_were_off:
                enable_progress_bars()
            log.setLevel(level)
