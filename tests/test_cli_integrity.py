"""Nothing lost, nothing clobbered (issue 13): one run per --output file, any file name, the
user's own .txt files, a full disk, special files among the inputs, a closed stdout, hidden files
and aliases. The model is the fake runner (tests/helpers.py), so these take milliseconds; the
subprocess cases run a fake-runner `fuyu` through the real entry point."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fuyu import pipeline
from tests.helpers import REPO, FakeRunner, cli_env, fuyu, png


@pytest.fixture
def fake(monkeypatch):
    runner = FakeRunner()
    runner.specs = []
    monkeypatch.setattr(pipeline, "load_runner", lambda spec, *args: runner.specs.append(spec) or runner)
    return runner


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# A `fuyu` process whose model is the fake runner: the real entry point, real signals and pipes.
FAKE_FUYU = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from tests.helpers import FakeRunner
    from fuyu import app, pipeline

    class Slow(FakeRunner):
        def run(self, work, batch_size, gen, window=256):
            for rec in super().run(work, batch_size, gen, window):
                time.sleep(float({delay!r}))
                yield rec

    pipeline.load_runner = lambda spec, *args: Slow()
    sys.argv = ["fuyu", *sys.argv[1:]]
    app.main()
""")


def fake_fuyu(*args, delay: float = 0.0) -> list[str]:
    return [sys.executable, "-c", FAKE_FUYU.format(repo=str(REPO), delay=delay), *map(str, args)]


# --- one run per --output file -------------------------------------------------------------------

def test_a_second_run_on_a_locked_output_is_refused_at_once_naming_the_holder(fake, tmp_path):
    png(tmp_path / "a.png")
    out = tmp_path / "caps.jsonl"
    out.write_text("")
    fd = os.open(out, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        r = fuyu("caption", tmp_path / "a.png", "-o", out)
    finally:
        os.close(fd)
    assert r.code == 2 and fake.specs == [] and len(r.err.splitlines()) == 1
    assert f"{out} is being written by another fuyu run (pid {os.getpid()}" in r.err
    assert out.read_text() == ""


def test_two_concurrent_runs_into_one_file_the_first_finishes_every_image_once(tmp_path):
    shots = tmp_path / "shots"
    for i in range(12):
        png(shots / f"{i:02d}.png", (20 + i, 20))
    out = tmp_path / "caps.jsonl"
    first = subprocess.Popen(fake_fuyu("caption", shots, "-o", out, delay=0.4), env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
        time.sleep(0.02)
    second = subprocess.run(fake_fuyu("caption", shots, "-o", out), env=cli_env(), capture_output=True,
                            text=True, timeout=60)
    _, err = first.communicate(timeout=60)
    assert second.returncode == 2 and "is being written by another fuyu run (pid" in second.stderr
    assert first.returncode == 0, err
    assert sorted(Path(r["path"]).name for r in records(out)) == sorted(p.name for p in shots.iterdir())


# --- any file name ---------------------------------------------------------------------------------

def test_a_non_utf8_file_name_gives_valid_json_and_is_recognised_on_rerun(fake, tmp_path):
    name = os.fsdecode(b"caf\xe9.png")
    png(tmp_path / name)
    png(tmp_path / "plain.png")
    r = fuyu("caption", tmp_path, "-o", "caps.jsonl")
    assert r.code == 0, r.err
    raw = Path("caps.jsonl").read_bytes()
    raw.decode("utf-8")  # valid UTF-8 throughout
    recs = [json.loads(line) for line in raw.splitlines()]
    odd = next(x for x in recs if "path_bytes" in x)
    assert odd["path"].endswith("caf\\xe9.png")
    import base64

    assert base64.b64decode(odd["path_bytes"]) == os.fsencode(str(tmp_path / name))  # exact recovery
    again = fuyu("caption", tmp_path, "-o", "caps.jsonl")
    assert again.code == 0 and "nothing to do, 2 already done" in again.err
    stdout = fuyu("caption", tmp_path / name)
    assert json.loads(stdout.out)["path_bytes"] == odd["path_bytes"]


def test_format_text_escapes_tabs_newlines_and_backslashes_in_paths(fake, tmp_path):
    weird = png(tmp_path / "a\tb\\c\nd.png")
    r = fuyu("caption", weird, "-f", "text")
    (line,) = r.out.splitlines()
    path, text = line.split("\t")
    assert path == str(tmp_path) + r"/a\tb\\c\nd.png"
    assert text == r"a picture named a b\c d"  # the answer's whitespace flattened


# --- the user's own files --------------------------------------------------------------------------

def test_sidecar_never_touches_a_users_txt_even_with_overwrite(fake, tmp_path):
    png(tmp_path / "report.png")
    png(tmp_path / "other.png")
    mine = tmp_path / "report.txt"
    mine.write_bytes(b"my own notes\n")
    for extra in ([], ["--overwrite"]):
        r = fuyu("caption", tmp_path, "--sidecar", *extra)
        assert r.code == 1
        recs = {Path(x["path"]).name: x for x in r.records()}
        assert "not written by fuyu" in recs["report.png"]["error"] and "error" not in recs["other.png"]
        assert mine.read_bytes() == b"my own notes\n"
    # fuyu's own sidecar is recognised: not an input, not "skipped"; the user's note is skipped
    r = fuyu("caption", tmp_path, "--sidecar")
    assert "other.txt" not in r.err and "report.txt" in r.err and "hidden" not in r.err  # nor its manifest


def test_an_edited_sidecar_becomes_the_users(fake, tmp_path):
    png(tmp_path / "a.png")
    fuyu("caption", tmp_path / "a.png", "--sidecar")
    (tmp_path / "a.txt").write_text("I corrected this caption\n")
    r = fuyu("caption", tmp_path / "a.png", "--sidecar", "--overwrite")
    assert r.code == 1 and (tmp_path / "a.txt").read_text() == "I corrected this caption\n"


# --- a full disk -----------------------------------------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_exits_3_naming_the_file_and_a_rerun_with_space_finishes_exactly_once(fake, tmp_path, tiny_fs):
    shots = tmp_path / "shots"
    for i in range(150):  # ~300 bytes a record: more than 64 KiB in all
        png(shots / f"{i:03d}_{'x' * 60}.png", (8, 8))
    out = tiny_fs / "caps.jsonl"
    r = fuyu("caption", shots, "-o", out)
    assert r.code == 3 and len(r.err.splitlines()) == 1
    assert r.err.startswith(f"error: cannot write {out}: no space left on the device")
    data = out.read_bytes()
    assert data.endswith(b"\n") and all(json.loads(line) for line in data.splitlines())  # no partial line
    subprocess.run(["mount", "-o", "remount,size=1m", str(tiny_fs)], check=True)
    r = fuyu("caption", shots, "-o", out)
    assert r.code == 0, r.err
    names = [Path(x["path"]).name for x in records(out)]
    assert sorted(names) == sorted(p.name for p in shots.iterdir())


# --- special files, hidden files, aliases ----------------------------------------------------------

def test_a_fifo_among_the_inputs_is_an_error_record_not_a_wait(fake, tmp_path):
    png(tmp_path / "a.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    r = fuyu("caption", tmp_path / "a.png", fifo)
    assert time.monotonic() - start < 1.0
    recs = {Path(x["path"]).name: x for x in r.records()}
    assert r.code == 1 and "a FIFO" in recs["pipe.png"]["error"] and "error" not in recs["a.png"]


def test_folders_skip_hidden_and_special_entries_name_them_and_take_each_file_once(fake, tmp_path):
    d = tmp_path / "d"
    png(d / "a.png")
    png(d / ".hidden.png")
    png(d / ".cache" / "in_hidden_folder.png")
    png(d / "sub" / "b.png")
    os.symlink(d / "a.png", d / "alias.png")  # the same file twice
    os.symlink(d / "gone.png", d / "dangling.png")
    os.mkfifo(d / "fifo.png")
    r = fuyu("caption", d, "-r")
    assert r.code == 0, r.err
    assert sorted(Path(x["path"]).name for x in r.records()) == ["a.png", "b.png"]
    summary = r.err.splitlines()[-1]
    assert "2 skipped, not regular files (" in summary and "dangling.png" in summary and "fifo.png" in summary
    assert "2 hidden skipped" in summary and "1 duplicates taken once" in summary


def test_stdin_paths_are_read_as_they_arrive(fake, tmp_path):
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    proc = subprocess.Popen(fake_fuyu("caption", "-"), env=cli_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(f"{a}\n".encode())
    proc.stdin.flush()
    first: list[bytes] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()))
    reader.start()
    reader.join(timeout=30)
    assert first and json.loads(first[0])["path"] == str(a)  # answered before stdin closed
    proc.stdin.write(f"{b}\n".encode())
    proc.stdin.close()
    rest = proc.stdout.read()
    assert proc.wait(timeout=30) == 0 and json.loads(rest)["path"] == str(b)


# --- a closed stdout ---------------------------------------------------------------------------------

def test_head_closing_stdout_ends_quietly_with_the_shells_sigpipe_status(tmp_path):
    shots = tmp_path / "shots"
    for i in range(20):
        png(shots / f"{i:02d}.png")
    cmd = shlex.join(fake_fuyu("caption", shots, delay=0.02))
    r = subprocess.run(["bash", "-o", "pipefail", "-c", f"{cmd} | head -1"], env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 141 and r.stderr == "", r.stderr
    assert len(r.stdout.splitlines()) == 1


# --- warnings: one line of ours --------------------------------------------------------------------

def test_library_warnings_are_one_line_of_ours(fake, tmp_path, monkeypatch):
    import logging
    import warnings

    png(tmp_path / "a.png")

    def noisy(spec, *args):
        warnings.warn("config.json: ignoring unknown keys ['foo']\nsecond line", UserWarning)
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: x")
        logging.getLogger("somelib").warning("something odd\nmore detail")
        return fake

    monkeypatch.setattr(pipeline, "load_runner", noisy)
    r = fuyu("caption", tmp_path / "a.png")
    lines = r.err.splitlines()
    assert "warning: config.json: ignoring unknown keys ['foo']" in lines
    assert "warning: something odd" in lines
    assert not any("gemm_4bit" in line or "second line" in line or "more detail" in line for line in lines)
