"""`fuyu` end to end on a tiny random checkpoint: the real model and processor, real files, real
subprocesses (SIGKILL, Ctrl-C, a terminal), and the reference's greedy decode as the oracle."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import ASSETS, REPO, cli_env, fuyu, fuyu_cmd, png
from fuyu.testing.checkpoint import make_checkpoint
from fuyu.testing.tokenizer import vocab_size

FAST = ["--dtype", "float32", "--max-new-tokens", "6"]


@pytest.fixture
def shots(tmp_path) -> Path:
    d = tmp_path / "shots"
    png(d / "wide.png", (90, 40), (250, 250, 250))
    png(d / "tall.jpg", (30, 70), (20, 90, 200))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image\n")
    (d / "notes.txt").write_text("skipped by extension\n")
    return d


@pytest.mark.parity
def test_caption_text_equals_reference_greedy_decode(tiny_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    images = [png(tmp_path / "a.png", (64, 48), (10, 200, 30)),
              png(tmp_path / "b.png", (120, 90), (200, 20, 30)), ASSETS / "chart.png"]
    # Batch size 2 puts two different sizes in one left-padded batch.
    r = fuyu("caption", *images, "-m", tiny_model, "--dtype", "float32", "--max-new-tokens", "12",
             "-b", "2")
    assert r.code == 0, r.err
    got = {rec["path"]: rec for rec in r.records()}

    proc = transformers.FuyuProcessor.from_pretrained(tiny_model)
    ref = transformers.FuyuForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for image in images:
        with Image.open(image) as im:
            inputs = proc(text="Generate a coco-style caption.\n", images=im.convert("RGB"),
                          return_tensors="pt")
        out = ref.generate(**inputs, max_new_tokens=12, do_sample=False,
                           pad_token_id=ref.config.eos_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        want = proc.batch_decode(new, skip_special_tokens=True)[0]
        assert got[str(image)]["text"] == want.strip()
        assert got[str(image)]["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_folder_with_bad_files_captions_the_good_and_reports_the_bad(tiny_model, shots):
    r = fuyu("caption", shots, "-m", tiny_model, *FAST)
    assert r.code == 1
    recs = {Path(x["path"]).name: x for x in r.records()}
    assert set(recs) == {"wide.png", "tall.jpg", "corrupt.png", "empty.png", "text.png"}
    for good in ("wide.png", "tall.jpg"):
        assert "error" not in recs[good] and recs[good]["new_tokens"] == 6
    assert (recs["tall.jpg"]["width"], recs["tall.jpg"]["height"]) == (30, 70)
    for bad in ("corrupt.png", "empty.png", "text.png"):
        assert bad in recs[bad]["error"]  # the message names the file
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all(line.count(str(shots)) == 1 for line in errors)
    assert "2 done, 3 failed" in r.err and "notes.txt" in r.err


def test_stdin_null_csv_and_sidecars_on_the_real_model(tiny_model, shots):
    paths = f"{shots / 'wide.png'}\0{shots / 'tall.jpg'}\0"
    r = fuyu("caption", "-", "--null", "-m", tiny_model, *FAST, "--format", "csv", "--sidecar",
             input=paths)
    rows = list(csv.DictReader(io.StringIO(r.out)))
    by_path = {row["path"]: row for row in rows}
    assert r.code == 0 and sorted(by_path) == [str(shots / "tall.jpg"), str(shots / "wide.png")]
    wide_text = by_path[str(shots / "wide.png")]["text"]
    assert (shots / "wide.txt").read_text() == " ".join(wide_text.split()) + "\n"
    again = fuyu("caption", "-", "--null", "-m", tiny_model, *FAST, "--sidecar", input=paths)
    assert again.code == 0 and again.out == "" and "nothing to do, 2 already done" in again.err


def test_ask_and_both_bbox_directions_on_the_real_model(tiny_model, shots, tmp_path):
    wide = shots / "wide.png"
    r = fuyu("ask", wide, "What is this", "-m", tiny_model, *FAST)
    (rec,) = r.records()
    assert r.code == 0 and rec["task"] == "ask" and rec["prompt"] == "What is this\n"

    r = fuyu("bbox", wide, "Total", "-m", tiny_model, *FAST, "--draw", tmp_path / "drawn.png")
    (rec,) = r.records()
    assert r.code == 0 and rec["task"] == "bbox" and isinstance(rec["boxes"], list)
    assert rec["prompt"].endswith("bounding box.\nTotal") and (tmp_path / "drawn.png").exists()

    r = fuyu("bbox", wide, "--box", "10,5,60,30", "-m", tiny_model, *FAST)
    (rec,) = r.records()
    assert r.code == 0 and rec["task"] == "ocr" and rec["boxes"] == [[10, 5, 60, 30]]
    assert rec["prompt"].endswith("<box>5, 10, 30, 60</box>")  # y0, x0, y1, x1 for the model

    r = fuyu("bbox", wide, "--box", "10,5,600,30", "-m", tiny_model, *FAST)
    (rec,) = r.records()
    assert r.code == 1 and "outside the 90×40 image" in rec["error"]


def test_seeded_sampling_repeats_and_really_samples(tiny_model, shots):
    def text(*options) -> str:
        r = fuyu("caption", shots / "wide.png", "-m", tiny_model, *FAST, *options)
        assert r.code == 0, r.err
        return r.records()[0]["text"]

    greedy, hot = text(), ["--temperature", "1.5"]
    sampled = {seed: text(*hot, "--seed", seed) for seed in (1, 2, 3)}
    # Sampling is applied: at temperature 1.5 the tiny model's top token has p < 1%, so every
    # seed leaves the greedy path here (one differing of three would do), and seeds differ.
    assert any(t != greedy for t in sampled.values()) and len(set(sampled.values())) > 1, sampled
    assert text(*hot, "--seed", 1) == sampled[1]  # the same seed repeats
    nucleus = [*hot, "--top-p", "0.95", "--seed", "7"]
    assert text(*nucleus) == text(*nucleus)
    # --top-p is applied: a nucleus this small holds only the most likely token (any nonzero p
    # exceeds 1e-6), which is greedy decoding whatever the seed.
    assert [text(*hot, "--top-p", "1e-6", "--seed", seed) for seed in (1, 2, 3)] == [greedy] * 3


def test_model_options_fail_cleanly_or_work(tiny_model, shots):
    r = fuyu("caption", shots / "wide.png", "-m", tiny_model, "--device", "cuda:7")
    assert r.code == 2 and r.err.startswith("error: --device cuda:7: no such CUDA device")
    r = fuyu("caption", shots / "wide.png", "-m", tiny_model, *FAST, "--quantize", "int8")
    assert r.code == 0 and r.records()[0]["new_tokens"] == 6, r.err


@pytest.fixture(scope="session")
def runner(tiny_model):
    from fuyu.options import ModelSpec
    from fuyu.runner import Runner

    return Runner.load(ModelSpec(path=tiny_model, device="cpu", dtype="float32"))


def test_loading_reads_config_json_once(tiny_model, monkeypatch):
    # The memory check and the loader take the one FuyuConfig Runner.load read.
    from fuyu.model import weights
    from fuyu.options import ModelSpec
    from fuyu.runner import Runner

    reads = []
    real = weights.read_config
    monkeypatch.setattr(weights, "read_config", lambda ckpt: reads.append(ckpt) or real(ckpt))
    Runner.load(ModelSpec(path=tiny_model, device="cpu", dtype="float32"))
    assert reads == [tiny_model]


def units(paths, *asks):
    from fuyu.records import Ask, Item, Unit

    return [Unit(Item(str(p)), tuple(asks or (Ask("caption"),))) for p in paths]


def test_a_failing_batch_is_retried_item_by_item(runner, tmp_path, monkeypatch):
    from fuyu import model as engine
    from fuyu.options import GenOptions

    paths = [png(tmp_path / f"{name}.png", (50, 40), (i * 80, 0, 0)) for i, name in enumerate(["good1", "bad", "good2"])]
    real = engine.generate

    def generate(model, batch, **kw):  # a list of batches: one per image size
        if any(name.endswith("bad.png") for part in batch for name in part.names):
            raise RuntimeError("boom\nsecond line")
        return real(model, batch, **kw)

    monkeypatch.setattr(engine, "generate", generate)
    recs = list(runner.run(units(paths), 3, GenOptions(max_new_tokens=3)))
    by_name = {Path(r.path).stem: r for r in recs}
    assert by_name["bad"].error == "RuntimeError: boom second line"
    assert by_name["good1"].new_tokens == 3 and by_name["good2"].new_tokens == 3


def test_a_batch_is_collated_once_and_boxes_are_parsed_for_bbox_rows_only(runner, tmp_path, monkeypatch):
    from fuyu.options import GenOptions
    from fuyu.records import Ask

    paths = [png(tmp_path / f"{i}.png", (50, 40), (i * 80, 0, 0)) for i in range(2)]
    proc, collated, parsed = runner.processor, [], []
    collate, boxes = proc.collate, proc.boxes
    monkeypatch.setattr(proc, "collate", lambda samples: collated.extend(samples) or collate(samples))
    monkeypatch.setattr(proc, "boxes", lambda ids, sizes, **kw: parsed.append(list(sizes)) or boxes(ids, sizes, **kw))
    gen = GenOptions(max_new_tokens=3)
    recs = list(runner.run(units(paths, Ask("ask", "What?")), 2, gen))
    assert all(r.ok for r in recs) and len(collated) == 2 and parsed == []
    collated.clear()
    recs = list(runner.run(units(paths, Ask("bbox", "Save"), Ask("ask", "What?")), 4, gen))  # a shared prefix
    assert len(collated) == 4 and parsed == [[(40, 50), (40, 50)]]  # each bbox row's (height, width)
    assert [r.boxes is not None for r in recs] == [r.task == "bbox" for r in recs]


def test_a_prompt_too_long_for_the_model_is_an_error_record(runner, tmp_path, monkeypatch):
    from dataclasses import replace

    from fuyu.options import GenOptions

    small, big = png(tmp_path / "small.png", (30, 30)), png(tmp_path / "big.png", (300, 300))
    monkeypatch.setattr(runner.model, "config", replace(runner.model.config, max_position_embeddings=40))
    recs = {Path(r.path).stem: r for r in runner.run(units([small, big]), 2, GenOptions(max_new_tokens=4))}
    assert recs["small"].ok
    assert "exceeds the model's 40 positions" in recs["big"].error


def test_max_new_tokens_past_the_models_positions_is_a_usage_error_before_loading(tiny_model, shots):
    r = fuyu("caption", shots / "wide.png", "-m", tiny_model, "--max-new-tokens", "100000")
    assert r.code == 2 and len(r.err.splitlines()) == 1 and "leaves no room for a prompt" in r.err


def test_an_unusable_checkpoint_is_one_line_and_exit_2(tmp_path, shots):
    (tmp_path / "ckpt").mkdir()
    r = fuyu("caption", shots / "wide.png", "-m", tmp_path / "ckpt")
    assert r.code == 2 and len(r.err.splitlines()) == 1 and r.err.startswith("error: ")


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"no {n} records in time (exit {proc.poll()})")


@pytest.fixture
def many(tmp_path) -> Path:
    d = tmp_path / "many"
    for i in range(30):
        png(d / f"img{i:02d}.png", (60, 60), (i * 6, 255 - i * 6, 128))
    return d


def test_sigkill_mid_run_then_rerun_gives_every_image_exactly_once(tiny_model, many, tmp_path):
    out = tmp_path / "captions.jsonl"
    cmd = fuyu_cmd("caption", many, "-m", tiny_model, "--dtype", "float32",
                   "--max-new-tokens", "16", "-b", "1", "-o", out)
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_lines(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = out.read_bytes().count(b"\n")
    assert 3 <= killed_at < 30, "the run finished before it could be killed"
    # A kill can also land inside a write: leave half a record at the end, as that would.
    data = out.read_bytes()
    out.write_bytes(data + data[data.rfind(b"\n", 0, -1) + 1:][:25])

    rerun = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{killed_at} already done" in rerun.stderr
    lines = out.read_text().split("\n")
    assert lines[-1] == ""  # ends with a newline: no truncated line
    paths = [json.loads(line)["path"] for line in lines[:-1]]
    assert sorted(paths) == sorted(str(p) for p in many.iterdir()) and len(paths) == 30


def _stdin_reader_thread(pid: int) -> int | None:
    """The thread of process `pid` blocked reading its stdin (Linux x86-64: syscall 0, fd 0)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "syscall").read_text().split()[:2] == ["0", "0x0"]:
            return int(task.name)
    return None


def _sigint_to_thread(pid: int, tid: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(234, pid, tid, signal.SIGINT) == 0, ctypes.get_errno()  # tgkill (x86-64)


@pytest.mark.parametrize("to", ["process", "reader thread"])
def test_ctrl_c_flushes_finished_records_and_exits_130(tiny_model, many, tmp_path, to):
    """Ctrl-C in a run waiting for more paths on stdin keeps the finished records and exits 130
    in one line; also when the kernel hands the signal to the thread reading stdin rather than
    the main thread (with one untimed wait for the next path, such a run waited forever). The run
    starts with SIGINT's default action: pytest started in the background (`cmd &` in a script)
    passes SIGINT on ignored, and Python then never raises KeyboardInterrupt."""
    if to == "reader thread" and not (sys.platform == "linux" and os.uname().machine == "x86_64"):
        pytest.skip("tgkill and /proc/<pid>/task/<tid>/syscall as on Linux x86-64")
    out = tmp_path / "captions.jsonl"
    proc = subprocess.Popen(fuyu_cmd("caption", "-", "-m", tiny_model, "--dtype", "float32",
                                     "--max-new-tokens", "16", "-b", "1", "-o", out),
                            env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    images = sorted(many.iterdir())
    proc.stdin.write("".join(f"{p}\n" for p in images[:2]))
    proc.stdin.flush()
    _wait_for_lines(out, 2, proc)
    if to == "process":
        proc.send_signal(signal.SIGINT)
    else:
        deadline = time.monotonic() + 30
        while (tid := _stdin_reader_thread(proc.pid)) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tid is not None, "no thread of the run is reading stdin"
        time.sleep(0.5)  # the main thread waiting for the next path by now
        _sigint_to_thread(proc.pid, tid)
    try:
        proc.wait(timeout=60)  # stdin stays open: the run ends by the signal or not at all
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert "interrupted after" in err and "Traceback" not in err
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["text"] is not None for line in lines)


def test_progress_shows_on_a_terminal_while_stdout_stays_json(tiny_model, shots):
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(fuyu_cmd("caption", shots / "wide.png", shots / "tall.jpg",
                                     "-m", tiny_model, *FAST),
                            env=cli_env(), stdout=subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    out, _ = proc.communicate(timeout=120)
    err = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    os.close(primary)
    assert proc.returncode == 0
    assert b"rec/s" in err and b"2/2" in err
    assert sorted(json.loads(line)["path"] for line in out.decode().splitlines()) == [
        str(shots / "tall.jpg"), str(shots / "wide.png")]


def test_help_path_imports_no_torch_model_or_preprocess():
    code = ("import sys, fuyu.app; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'PIL', 'safetensors'} "
            "| {m for m in sys.modules if m.startswith(('fuyu.model', 'fuyu.preprocess'))}))")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stderr
    r = subprocess.run(fuyu_cmd("--help"), env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0 and "caption" in r.stdout


def test_a_plain_ask_imports_no_fields_resume_parts_or_cluster(tiny_model, shots):
    # What -q questions to stdout never use stays unimported (the run path, docs/architecture.md).
    code = ("import sys; from fuyu.app import main\ntry: main(sys.argv[1:])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m in {'fuyu.fields', 'fuyu.resume', 'fuyu.parts', "
            "'fuyu.cluster'}), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code, "ask", shots / "wide.png", "-q", "What?", "-m", tiny_model, *FAST,
                        "--quiet"], env=cli_env(FUYU_KERNELS="plain"), capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "[]" and '"text": ' in r.stdout, r.stderr


def test_examples_run_on_the_tiny_model(tiny_model, tmp_path):
    r = subprocess.run([sys.executable, REPO / "examples" / "python_api.py", tiny_model],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "screenshot.png:" in r.stdout and "boxes:" in r.stdout

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "fuyu"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fuyu "$@"\n')
    shim.chmod(0o755)
    env = cli_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FUYU_MODEL=str(tiny_model))
    folder = tmp_path / "assets"
    shutil.copytree(ASSETS, folder)
    r = subprocess.run(["bash", REPO / "examples" / "caption_folder.sh", folder, tmp_path / "c.jsonl"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(line.split("\t")[0] for line in r.stdout.splitlines()) == sorted(
        str(folder / name) for name in ("chart.png", "document.png", "screenshot.png"))


@pytest.mark.slow
def test_compile_flag_gives_the_eager_text(tiny_model, tmp_path):
    image = png(tmp_path / "a.png", (64, 48), (10, 200, 30))
    args = ("caption", image, "-m", tiny_model, "--dtype", "float32", "--max-new-tokens", "6")
    eager, compiled = fuyu(*args), fuyu(*args, "--compile")
    assert eager.code == compiled.code == 0, compiled.err
    assert [r["text"] for r in compiled.records()] == [r["text"] for r in eager.records()]
    # and the flag really reaches generate(): record what each call of generate.stepper (the one
    # place that wraps decode_step in torch.compile) is asked for
    spy = ("import sys, fuyu.model.generate; g = sys.modules['fuyu.model.generate']; f = g.stepper; "
           "asked = []; g.stepper = lambda cache, compile=False: asked.append(compile) or f(cache, compile); "
           "from fuyu.app import main; sys.argv = ['fuyu', *sys.argv[1:]]\n"
           "try: main()\nexcept SystemExit as e: assert not e.code, e.code\n"
           "print('stepper asked for compile:', *asked, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", spy, *map(str, args), "--compile", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "stepper asked for compile: True", r.stderr


def test_the_cli_loads_with_kernels_timed_on_this_machine_and_caches_the_choice(tiny_model, shots, monkeypatch):
    from fuyu.model import plan
    from fuyu.model.settings import Settings

    monkeypatch.setenv("FUYU_KERNELS", "auto")
    r = fuyu("caption", shots / "wide.png", "-m", tiny_model, "--dtype", "bfloat16", "--max-new-tokens", "4")
    assert r.code == 0 and r.records()[0]["new_tokens"] == 4, r.err
    assert plan.cache_file(Settings.from_environment()).is_file()  # in the test session's own XDG_CACHE_HOME
