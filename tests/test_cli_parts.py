"""--output-dir, --shard and the run fingerprint (issue 11), on the tiny random checkpoint: parts
written whole or not at all, a rerun redoing only unfinished parts, shards that together make the
single run's parts."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fuyu.parts import read_records
from tests.helpers import cli_env, fuyu, fuyu_cmd, png

FAST = ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for i in range(10):
        png(d / f"img{i:02d}.png", (40 + 10 * (i % 3), 30), (i * 20, 100, 200 - i * 15))
    return d


@pytest.fixture(scope="module")
def single(tiny_model, images, tmp_path_factory) -> dict:
    """The plain --output run's text per image."""
    out = tmp_path_factory.mktemp("single") / "caps.jsonl"
    r = fuyu("caption", images, "-o", out, "-m", tiny_model, *FAST)
    assert r.code == 0, r.err
    return {x["path"]: x["text"] for x in map(json.loads, out.read_text().splitlines())}


def by_path(folder: Path, fmt: str = "jsonl") -> dict:
    recs = list(read_records(str(folder), fmt))
    paths = [x["path"] for x in recs]
    assert len(paths) == len(set(paths)), "an image is in two parts"
    return {x["path"]: x["text"] for x in recs}


def test_the_parts_hold_the_output_runs_records_each_once(tiny_model, images, single, tmp_path):
    out = tmp_path / "job"
    r = fuyu("caption", images, "--output-dir", out, "--shard-size", "4", "-m", tiny_model, *FAST)
    assert r.code == 0, r.err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["part-00000.done.json", "part-00000.jsonl", "part-00001.done.json", "part-00001.jsonl",
                     "part-00002.done.json", "part-00002.jsonl", "run.json"]
    assert by_path(out) == single
    marker = json.loads((out / "part-00002.done.json").read_text())
    assert (marker["part"], marker["records"], marker["failed"]) == (2, 2, 0) and marker["seconds"] > 0
    again = fuyu("caption", images, "--output-dir", out, "--shard-size", "4", "-m", tiny_model, *FAST)
    assert again.code == 0 and "nothing to do, 3 parts already done" in again.err


def test_parquet_parts_hold_the_same_records(tiny_model, images, single, tmp_path):
    out = tmp_path / "job"
    r = fuyu("caption", images, "--output-dir", out, "--format", "parquet", "--shard-size", "6",
             "-m", tiny_model, *FAST)
    assert r.code == 0, r.err
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert by_path(out, "parquet") == single


def test_three_shards_run_apart_make_the_single_runs_parts(tiny_model, images, single, tmp_path):
    out = tmp_path / "job"
    for i in range(3):
        r = fuyu("caption", images, "--output-dir", out, "--shard-size", "2", "--shard", f"{i}/3",
                 "-m", tiny_model, *FAST)
        assert r.code == 0, r.err
        done = sorted(int(p.name[5:10]) for p in out.glob("part-*.done.json"))
        assert set(range(i + 1)) <= {k % 3 for k in done}
    assert sorted(p.name for p in out.glob("part-*.jsonl")) == [f"part-{k:05d}.jsonl" for k in range(5)]
    assert by_path(out) == single


def test_another_question_into_the_same_folder_is_refused_in_one_line(tiny_model, images, tmp_path):
    out = tmp_path / "job"
    assert fuyu("ask", images, "-q", "Total?", "--output-dir", out, "-m", tiny_model, *FAST).code == 0
    r = fuyu("ask", images, "-q", "Date?", "--output-dir", out, "-m", tiny_model, *FAST)
    assert r.code == 2 and len(r.err.splitlines()) == 1
    assert f"{out} holds another job (prompts differ)" in r.err and "--overwrite" in r.err
    r = fuyu("ask", images, "-q", "Date?", "--output-dir", out, "--overwrite", "-m", tiny_model, *FAST)
    assert r.code == 0 and {x["prompt"] for x in read_records(str(out))} == {"Date?\n"}


def test_sigkill_mid_job_then_rerun_redoes_only_unfinished_parts_and_leaves_no_temp_files(
        tiny_model, images, single, tmp_path):
    out = tmp_path / "job"
    cmd = fuyu_cmd("caption", images, "--output-dir", out, "--shard-size", "2", "-b", "1",
                   "-m", tiny_model, "--dtype", "float32", "--max-new-tokens", "24")
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("*.done.json"))) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name for p in out.glob("*.done.json")}
    assert proc.returncode == -signal.SIGKILL and 2 <= len(finished) < 5
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.done.json")}
    rerun = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    left = 5 - len(finished)
    assert f"{left} part{'s' * (left != 1)}, " in rerun.stderr and f"{len(finished)} parts done earlier" in rerun.stderr
    assert all(out.joinpath(name).stat().st_mtime_ns == t for name, t in stamps.items())  # not redone
    assert not [p.name for p in out.iterdir() if "tmp" in p.name]
    assert by_path(out).keys() == single.keys()  # every image exactly once (longer answers here)
