"""--ray and FuyuPredictor on a local Ray cluster (2 CPUs, a small object store) with the tiny
checkpoint: the records equal a single-process run's, a killed worker or driver never loses or
duplicates a record, and a user's own pipeline gets the same texts."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, cli_env, fuyu, fuyu_cmd, png

ray = pytest.importorskip("ray")

from fuyu.cluster import FuyuPredictor  # noqa: E402
from fuyu.parts import read_records  # noqa: E402

pytestmark = pytest.mark.slow
# float32: texts are compared across batchings (a batch mixes image sizes differently in each
# run), and only float32 promises the same greedy ids whatever the batch; bf16 may flip a near-tie
# of the tiny random model.
COMMON = ("--max-new-tokens", "8", "--shard-size", "2", "--dtype", "float32")


def slow_workers_env(**extra) -> dict:
    """The environment of a `fuyu --ray local` run whose Ray workers take 0.4 s more per record
    (tests/slow_workers/sitecustomize.py, imported by every Python process it starts): time to
    kill something mid-part."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests" / "slow_workers"), os.environ.get("PYTHONPATH")]))
    return cli_env(PYTHONPATH=path, **extra)


# Texts are compared across processes (the single run, Ray workers, the predictor), and kernel
# choices are timed per process (a noisy timing is not cached): plain kernels everywhere, so a
# near-tie of the tiny random model cannot flip between differently chosen float32 kernels.
PLAIN = {"FUYU_KERNELS": "plain"}


@pytest.fixture(autouse=True)
def _plain_kernels(monkeypatch):
    for key, value in PLAIN.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # as the CLI does: no C++ warnings in test logs
    os.environ.update(PLAIN)  # the workers inherit the cluster's environment
    ray.init(address="local", num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False,
             log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    for key in PLAIN:
        os.environ.pop(key, None)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for i in range(8):  # two sizes, so batches group by size as in real runs
        png(d / f"img{i}.png", size=(60, 30) if i % 2 else (40, 40), color=(30 * i, 90, 200 - 20 * i))
    return d


@pytest.fixture(scope="module")
def single(tiny_model, images, tmp_path_factory) -> dict[str, str]:
    """path name → text of the plain single-process run (one thread, as each Ray worker here)."""
    import torch

    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    threads = torch.get_num_threads()
    os.environ.update(PLAIN)  # module-scoped: set up before the per-test environment fixtures
    try:
        run = fuyu("caption", images, "--model", tiny_model, "-o", out, "--max-new-tokens", "8", "--threads", "1",
               "--dtype", "float32")
    finally:
        for key in PLAIN:
            os.environ.pop(key, None)
    torch.set_num_threads(threads)
    assert run.code == 0, run.err
    return texts(json.loads(line) for line in out.read_text().splitlines())


def texts(records) -> dict[str, str]:
    return {Path(r["path"]).name: r.get("text") for r in records}


def exactly_once(folder: Path, images: Path, *extra: str) -> list[dict]:
    records = list(read_records(str(folder)))
    assert sorted(Path(r["path"]).name for r in records) == sorted([p.name for p in images.iterdir()] + list(extra))
    assert not list(folder.glob(".*fuyu-tmp")), "temporary files left behind"
    return records


def test_ray_workers_write_the_records_of_a_single_process_run(cluster, tiny_model, images, single, tmp_path):
    # URIs in and out, read and written through pyarrow's file systems (file:// here, s3:// alike).
    # Their sizes are unknown before reading, so one image per batch: no padding to tell apart.
    uris = [f"file://{p}" for p in sorted(images.iterdir())] + [f"file://{tmp_path}/missing.png"]
    run = fuyu("caption", *uris, "--model", tiny_model, "--ray", "local", "--workers", "2",
               "--output-dir", f"file://{tmp_path / 'out'}", "--batch-size", "1", *COMMON)
    assert run.code == 1, run.err  # as without Ray: some records failed
    records = exactly_once(tmp_path / "out", images, "missing.png")
    assert sorted(r["path"] for r in records) == sorted(uris)
    assert texts(r for r in records if r["path"] != uris[-1]) == single
    assert [r["error"] for r in records if r["path"] == uris[-1]] != [None]
    lines = run.err.splitlines()
    assert sorted(line.split(" done")[0] for line in lines[:-1]) == [f"caption: part {k}" for k in range(5)]
    assert lines[-1].startswith("caption: 5 parts, 9 records, 1 failed in ") and "on 2 workers" in lines[-1]


def test_a_killed_worker_is_restarted_and_its_part_written_once(tiny_model, images, single, tmp_path):
    out = tmp_path / "out"
    killed = []

    def kill_first_writer():  # 0.3 s after its first part, a worker is inside its next one
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for marker in out.glob("part-*.done.json"):
                killed.append(json.loads(marker.read_text())["pid"])
                time.sleep(0.3)
                os.kill(killed[0], signal.SIGKILL)
                break
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_first_writer)
    watcher.start()
    run = subprocess.run(fuyu_cmd("caption", images, "--model", tiny_model, "--ray", "local", "--workers", "2",
                                  "--output-dir", out, *COMMON),
                         env=slow_workers_env(**PLAIN), cwd=REPO, capture_output=True, text=True, timeout=300)
    watcher.join()
    assert run.returncode == 0, run.stderr
    assert killed
    assert texts(exactly_once(out, images)) == single
    writers = [json.loads(m.read_text())["pid"] for m in out.glob("part-*.done.json")]
    assert writers.count(killed[0]) == 1  # its part in progress was redone by its restart
    assert len(set(writers)) >= 2


def _end_session(sid: int) -> None:
    """SIGKILL what is left of a process session this test started (a local Ray cluster whose
    driver was killed leaves agents behind) and wait until it is gone."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # session id; not a zombie
                alive.append(int(stat.parent.name))
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"session {sid} still has processes")


def test_after_the_driver_is_killed_a_rerun_does_only_the_unfinished_parts(cluster, tiny_model, images, tmp_path):
    out = tmp_path / "out"
    args = ["caption", images, "--model", tiny_model, "--workers", "1", "--output-dir", out, *COMMON]
    with open(tmp_path / "first.err", "w") as err:  # a cluster of its own, started by the driver
        first = subprocess.Popen(fuyu_cmd(*args, "--ray", "local"), env=slow_workers_env(), cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not list(out.glob("part-*.done.json")) and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            first.kill()  # SIGKILL the driver only
            first.wait()
        finally:
            _end_session(first.pid)
    markers = {m.name: m.read_text() for m in out.glob("part-*.done.json")}
    first_err = (tmp_path / "first.err").read_text()
    assert 1 <= len(markers) < 4, first_err
    assert all(line.startswith("caption: part ") for line in first_err.splitlines()), first_err

    # The rerun joins the running cluster (RAY_ADDRESS, as after `ray start --head`).
    rerun = subprocess.run(fuyu_cmd(*args, "--ray", "auto"), env=cli_env(RAY_ADDRESS=cluster), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    lines = rerun.stderr.splitlines()
    assert all(line.startswith("caption: ") for line in lines), rerun.stderr  # no Ray chatter
    left, before = 4 - len(markers), len(markers)
    assert f"caption: {left} part{'s' * (left != 1)}, {2 * left} records" in lines[-1]
    assert f"{before} part{'s' * (before != 1)} done earlier" in lines[-1]
    assert {name: (out / name).read_text() for name in markers} == markers  # not redone
    exactly_once(out, images)


def test_predictor_answers_each_row_in_order_and_fails_only_bad_rows(tiny_model, images, single):
    predict = FuyuPredictor(model=str(tiny_model), task="caption", max_new_tokens=8, threads=1, dtype="float32")
    good = sorted(images.iterdir())
    batch = {"path": np.array([good[0].name, "broken.png", good[1].name, "", str(good[2])], dtype=object),
             "bytes": np.array([good[0].read_bytes(), b"\x89PNG\r\n\x1a\n junk", good[1].read_bytes(), None, None],
                               dtype=object)}
    rows = predict(batch).to_pylist()
    assert [r["path"] for r in rows] == [good[0].name, "broken.png", good[1].name, "<row 3>", str(good[2])]
    assert [r["text"] for r in rows[::2]] == [single[p.name] for p in good[:3]]
    assert "broken.png: not an image" in rows[1]["error"] and rows[1]["text"] is None
    assert "neither `path` nor `bytes`" in rows[3]["error"]
    assert set(rows[0]) >= {"path", "page", "id", "task", "prompt", "text", "boxes", "width", "height",
                            "prompt_tokens", "new_tokens", "seconds", "error"}

    ask = FuyuPredictor(model=str(tiny_model), task="ask", max_new_tokens=8, threads=1, dtype="float32")
    rows = ask({"path": np.array([str(good[0]), str(good[0]) + ".missing"]),
                "question": np.array(["What colour?", "Why?"])}).to_pylist()
    assert rows[0]["prompt"] == "What colour?\n" and rows[0]["text"] and rows[0]["error"] is None
    assert rows[1]["error"] and "missing" in rows[1]["error"]


def test_example_pipeline_gives_the_cli_texts_and_an_error_row_for_a_corrupt_image(
        cluster, tiny_model, images, single, tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for p in images.iterdir():
        os.link(p, folder / p.name)
    (folder / "img3b.png").write_bytes((images / "img3.png").read_bytes()[:70])  # truncated
    run = subprocess.run(
        [*fuyu_cmd()[:1], str(REPO / "examples" / "ray_pipeline.py"), str(tiny_model), str(folder),
         "--max-new-tokens", "8", "--batch-size", "4", "--dtype", "float32"],
        env=cli_env(RAY_ADDRESS=cluster), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert texts(r for r in rows if not r["path"].endswith("img3b.png")) == single
    bad = [r for r in rows if r["path"].endswith("img3b.png")]
    assert len(bad) == 1 and "corrupt or truncated" in bad[0]["error"] and "text" not in bad[0]
