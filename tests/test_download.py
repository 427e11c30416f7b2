"""Getting the weights: --model REPO found in the Hugging Face cache or downloaded into it, against a
fake hub on 127.0.0.1 (tests/fake_hub.py), never the real one."""

from __future__ import annotations

import errno
import io
import socket
import subprocess
import sys
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

import pytest

from fuyu import locate
from fuyu.errors import FuyuError
from fuyu.testing import make_checkpoint
from tests.fake_hub import FakeHub
from tests.helpers import REPO as SOURCE_TREE, cli_env, fuyu, fuyu_cmd, png

REPO = "tiny/fuyu"
GATED = "tiny/gated"
SHARD2 = "model-00002-of-00002.safetensors"
NEEDED = {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", SHARD2,
          "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
          "tokenizer.model", "tokenizer_config.json"}
FAST = ("--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, bytes]:
    """A tiny sharded checkpoint, plus what a real repo also holds and we must not fetch."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("served"), shards=2)
    files = {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}
    assert set(files) == NEEDED
    return {**files, "pytorch_model-00001-of-00002.bin": b"b" * 5000, "consolidated.pt": b"p" * 5000,
            "pytorch_model.bin.index.json": b"{}", "README.md": b"# tiny\n"}


@pytest.fixture
def hub(served, tmp_path, monkeypatch):
    """A running fake hub, HF_ENDPOINT pointing at it, an empty cache, online, never a prompt."""
    import huggingface_hub.constants as constants

    hub = FakeHub({REPO: served, GATED: served}).start()
    hub.gated.add(GATED)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import: maybe from the shell
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)  # 10 MB: a tiny shard is one chunk
    monkeypatch.setattr(locate, "RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(locate, "_interactive", lambda: False)
    yield hub
    hub.stop()


class Recorder:
    """A stand-in for fuyu.render.Reporter: notes and byte progress kept for the test."""

    def __init__(self):
        self.notes, self.bytes = [], []

    def note(self, message: str) -> None:
        self.notes.append(message)

    @contextmanager
    def byte_progress(self, label: str):
        yield lambda done, total: self.bytes.append((done, total))


def snapshot(tmp_path: Path) -> Path:
    (snap,) = (tmp_path / "hf-cache" / "models--tiny--fuyu" / "snapshots").iterdir()
    return snap


def fetched(hub: FakeHub) -> set[str]:
    return {path.rsplit("/", 1)[1] for _, path, _, _ in hub.requests("GET") if "/resolve/" in path}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_caption_with_a_repo_id_and_download_fetches_only_the_needed_files_then_runs_from_the_cache(
        hub, served, tmp_path, monkeypatch):
    img = png(tmp_path / "a.png")
    r = fuyu("caption", img, "--model", REPO, "--download", *FAST)
    assert r.code == 0, r.err
    (rec,) = r.records()
    assert rec["text"] and rec["path"] == str(img)
    assert fetched(hub) == NEEDED
    snap = snapshot(tmp_path)
    assert {p.name for p in snap.iterdir()} == NEEDED
    assert all((snap / n).read_bytes() == served[n] for n in NEEDED)
    assert (snap.parent.parent / "refs" / "main").read_text() == snap.name
    assert "downloading tiny/fuyu (≈1.9 MB) into" in r.err and "downloaded tiny/fuyu" in r.err
    assert "Traceback" not in r.err and "%|" not in r.err  # no tqdm bars of huggingface_hub

    # Again with the hub gone and offline mode on: the cache alone, not one request.
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n_requests = len(hub.log)
    r = fuyu("caption", img, "--model", REPO, *FAST)
    assert r.code == 0, r.err
    assert r.records()[0]["text"] and "download" not in r.err
    assert len(hub.log) == n_requests


def test_a_shard_cut_off_mid_file_resumes_where_it_stopped(hub, served):
    hub.drop[SHARD2] = (500_000, 1)
    ui = Recorder()
    snap = locate.find_checkpoint(REPO, download=True, ui=ui)
    assert (snap / SHARD2).read_bytes() == served[SHARD2]
    first, second = hub.requests("GET", SHARD2)
    assert first[2] is None and first[3] == 500_000
    start = int(second[2].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 500_000 and second[3] == len(served[SHARD2]) - start  # only the rest again
    assert any("connection lost during " + SHARD2 in n for n in ui.notes)
    total = sum(len(served[n]) for n in NEEDED)
    assert ui.bytes[-1] == (total, total)
    assert [d for d, _ in ui.bytes] == sorted(d for d, _ in ui.bytes)


def test_a_download_that_keeps_failing_is_one_line_and_the_next_run_resumes_it(hub, served, tmp_path):
    hub.drop[SHARD2] = (300_000, locate.ATTEMPTS)
    r = fuyu("caption", png(tmp_path / "a.png"), "--model", REPO, "--download", *FAST)
    assert r.code == 2
    line = r.err.strip().splitlines()[-1]
    assert line.startswith("error: cannot download tiny/fuyu") and "resumes" in line
    assert not list((tmp_path / "hf-cache" / "models--tiny--fuyu").glob("snapshots/*/config.json"))
    # Without --download the next run says it is partly there and how to finish.
    with pytest.raises(FuyuError, match="only partly in the Hugging Face cache") as e:
        locate.find_checkpoint(REPO)
    assert "--download" in e.value.hint
    kept = sum(p.stat().st_size for p in (tmp_path / "hf-cache").rglob("*.incomplete"))
    assert kept > 0
    snap = locate.find_checkpoint(REPO, download=True, ui=Recorder())
    assert (snap / SHARD2).read_bytes() == served[SHARD2]
    last = hub.requests("GET", SHARD2)[-1]
    assert last[2] == f"bytes={kept}-" and last[3] == len(served[SHARD2]) - kept
    assert len(hub.requests("GET", "model-00001-of-00002.safetensors")) == 1  # never fetched twice


def test_a_snapshot_missing_a_shard_of_its_index_is_finished_not_used(hub, served):
    snap = locate.find_checkpoint(REPO, download=True, ui=Recorder())
    (snap / SHARD2).unlink()  # as `hf download` cut short leaves it
    with pytest.raises(FuyuError, match="only partly in"):
        locate.find_checkpoint(REPO)
    assert locate.find_checkpoint(REPO, download=True, ui=Recorder()) == snap
    assert (snap / SHARD2).read_bytes() == served[SHARD2]
    assert len(hub.requests("GET", SHARD2)) == 1  # the blob was still there: linked again


def test_off_a_terminal_without_download_the_one_line_names_the_exact_command(hub, tmp_path, monkeypatch):
    img = png(tmp_path / "a b.png")
    args = ["caption", str(img), "--model", REPO, "--max-new-tokens", "4"]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/fuyu", *args])
    r = fuyu(*args)
    assert r.code == 2
    line = one_error_line(r.err)
    assert f"--model tiny/fuyu: not a folder, and not in the Hugging Face cache ({tmp_path / 'hf-cache'})" in line
    assert f"`fuyu caption '{img}' --model tiny/fuyu --max-new-tokens 4 --download`" in line
    assert "`hf download tiny/fuyu --include '*.json' tokenizer.model '*.safetensors'`" in line
    assert hub.log == []


def test_offline_with_nothing_cached_is_one_line_and_no_request(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = fuyu("caption", png(tmp_path / "a.png"), "--model", REPO, "--download", *FAST)
    assert r.code == 2
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in one_error_line(r.err)
    assert hub.log == []


def test_at_a_terminal_it_asks_first_and_no_downloads_nothing(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "_interactive", lambda: True)
    r = fuyu("caption", png(tmp_path / "a.png"), "--model", REPO, *FAST, input="n\n")
    assert r.code == 2
    prompt, error = r.err.split("[y/N] ")
    assert prompt == f"Download tiny/fuyu (≈1.9 MB) into {tmp_path / 'hf-cache'}? "
    assert "tiny/fuyu: download declined" in one_error_line(error)
    assert fetched(hub) == set() and not (tmp_path / "hf-cache" / "models--tiny--fuyu").exists()


def test_at_a_terminal_yes_downloads(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(locate, "_interactive", lambda: True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    snap = locate.find_checkpoint(REPO, ui=Recorder())
    assert {p.name for p in snap.iterdir()} == NEEDED
    assert capsys.readouterr().err == f"Download tiny/fuyu (≈1.9 MB) into {tmp_path / 'hf-cache'}? [y/N] "


@pytest.mark.parametrize("repo, endpoint, expected", [
    ("nobody/nothing", None, "nobody/nothing: no such model on the Hugging Face Hub"),
    (GATED, None, "tiny/gated is gated on the Hugging Face Hub"),
    (REPO, "dead", "cannot download tiny/fuyu: the Hugging Face Hub (http://127.0.0.1:"),
])
def test_hub_failures_are_one_line_naming_the_repo(hub, tmp_path, monkeypatch, repo, endpoint, expected):
    if endpoint == "dead":
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    r = fuyu("caption", png(tmp_path / "a.png"), "--model", repo, "--download", *FAST)
    assert r.code == 2
    assert expected in r.err.strip().splitlines()[-1]
    one_error_line("\n".join(l for l in r.err.splitlines() if not l.startswith("downloading ")))


def test_a_full_disk_is_one_line_before_and_during_the_download(hub, monkeypatch):
    import huggingface_hub

    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(locate.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
        with pytest.raises(FuyuError, match=r"not enough space in .* for tiny/fuyu: 1.9 MB needed, 1.0 kB free"):
            locate.find_checkpoint(REPO, download=True, ui=Recorder())
    assert fetched(hub) == set()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", full)
    with pytest.raises(FuyuError, match="cannot download tiny/fuyu: no space left in") as e:
        locate.find_checkpoint(REPO, download=True, ui=Recorder())
    assert "HF_HUB_CACHE" in e.value.hint and "resumes" in e.value.hint


def test_model_that_is_a_file_is_a_one_line_usage_error(tmp_path):
    f = png(tmp_path / "weights.png")
    r = fuyu("caption", f, "--model", f)
    assert r.code == 2
    assert f"--model {f}: is a file, not a checkpoint folder" in one_error_line(r.err)


def test_a_path_that_is_no_repo_id_is_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for bad in ("./weights", "a/b/c", "/nowhere/fuyu", "x--y/z"):
        with pytest.raises(FuyuError, match=r"model folder not found"):
            locate.find_checkpoint(bad)


def test_the_cache_location_follows_huggingface_hub(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert locate.hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert locate.hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert locate.hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", "~/hub-cache")
    assert locate.hub_cache() == tmp_path / "hub-cache"


def test_the_real_command_downloads_then_runs_offline_from_the_cache(hub, tmp_path):
    """One subprocess run of each: the real argv, environment and streams (not terminals)."""
    img = png(tmp_path / "a.png")
    env = cli_env(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_HUB_OFFLINE="0")
    args = ["caption", str(img), "--model", REPO, *FAST]

    def run(*extra, **more):
        return subprocess.run(fuyu_cmd(*args, *extra), env={**env, **more}, cwd=SOURCE_TREE,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)

    r = run()
    assert r.returncode == 2 and r.stdout == ""
    assert f"run `python -m fuyu {' '.join(args)} --download`" in one_error_line(r.stderr)
    r = run("--download")
    assert r.returncode == 0, r.stderr
    assert '"text": ' in r.stdout and "downloaded tiny/fuyu" in r.stderr
    hub.stop()
    r = run(HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert '"text": ' in r.stdout and "download" not in r.stderr
