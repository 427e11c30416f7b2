"""`fuyu` commands with a fake Runner: flags, inputs, output formats, resume, errors, exit codes.

The model is replaced by `FakeRunner` (patched in at `pipeline.load_runner`), so these run in
milliseconds; tests/test_cli_e2e.py runs the same commands on a real tiny checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fuyu import pipeline
from fuyu.errors import FuyuError
from tests.helpers import FakeRunner, fuyu, png


@pytest.fixture
def fake(monkeypatch):
    runner = FakeRunner()
    specs = []
    monkeypatch.setattr(pipeline, "load_runner", lambda spec, *args: specs.append(spec) or runner)
    runner.specs = specs
    return runner


@pytest.fixture
def shots(tmp_path):
    """A folder of three good images, a corrupt one, a zero-byte one, a text file named .png,
    a .txt note and a subfolder with one more image."""
    d = tmp_path / "shots"
    for name, size in [("a.png", (40, 30)), ("b.png", (40, 30)), ("c.jpg", (20, 50))]:
        png(d / name, size)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("this is not an image\n")
    (d / "notes.txt").write_text("not an image either\n")
    png(d / "sub" / "deep.png")
    return d


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_caption_folder_captions_good_images_reports_bad_ones_and_exits_1(fake, shots):
    r = fuyu("caption", shots)
    assert r.code == 1
    recs = {Path(x["path"]).name: x for x in r.records()}
    assert set(recs) == {"a.png", "b.png", "c.jpg", "corrupt.png", "empty.png", "text.png"}
    assert recs["a.png"]["text"] == "a picture named a" and "error" not in recs["a.png"]
    assert all("error" in recs[n] for n in ("corrupt.png", "empty.png", "text.png"))
    for name in ("corrupt.png", "empty.png", "text.png"):  # one stderr line per failure
        assert sum(name in line and line.startswith("error:") for line in r.err.splitlines()) == 1
    assert "3 done, 3 failed" in r.err and "notes.txt" in r.err  # summary names the skipped file


def test_recursive_reaches_subfolders_and_good_only_run_exits_0(fake, shots):
    for bad in ("corrupt.png", "empty.png", "text.png"):
        (shots / bad).unlink()
    r = fuyu("caption", shots, "--recursive")
    assert r.code == 0
    assert sorted(Path(x["path"]).name for x in r.records()) == ["a.png", "b.png", "c.jpg", "deep.png"]


def test_unexpanded_glob_is_expanded_and_filters_extensions(fake, shots):
    r = fuyu("caption", str(shots / "*"))
    assert {Path(x["path"]).name for x in r.records()} >= {"a.png", "c.jpg"}
    assert "notes.txt" not in r.out


def test_missing_path_is_a_usage_error_before_loading(fake, tmp_path):
    r = fuyu("caption", tmp_path / "nope.png")
    assert r.code == 2 and fake.specs == []
    assert r.err.startswith("error: no such file or folder") and len(r.err.splitlines()) == 1


def test_paths_from_stdin_one_per_line(fake, shots):
    r = fuyu("caption", "-", input=f"{shots / 'a.png'}\n\n{shots / 'b.png'}\n")
    assert r.code == 0 and [Path(x["path"]).name for x in r.records()] == ["a.png", "b.png"]


def test_paths_from_stdin_nul_separated(fake, shots):
    weird = png(shots / "with\nnewline.png")
    r = fuyu("caption", "-", "--null", input=f"{shots / 'a.png'}\0{weird}\0")
    assert r.code == 0 and [x["path"] for x in r.records()] == [str(shots / "a.png"), str(weird)]


def test_same_file_twice_runs_once(fake, shots):
    r = fuyu("caption", shots / "a.png", "./shots/a.png")
    assert len(r.records()) == 1


def test_format_csv_parses_with_the_csv_module(fake, shots):
    tricky = png(shots / 'quote",comma.png')
    r = fuyu("caption", shots / "a.png", tricky, shots / "empty.png", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(r.out)))
    assert [row["path"] for row in rows] == [str(shots / "a.png"), str(tricky), str(shots / "empty.png")]
    assert rows[0]["text"] == "a picture named a" and rows[0]["width"] == "40" and rows[0]["error"] == ""
    assert rows[2]["error"].startswith("cannot read image")


def test_format_text_is_path_tab_answer_for_successes(fake, shots):
    r = fuyu("caption", shots / "a.png", shots / "empty.png", "-f", "text")
    assert r.out == f"{shots / 'a.png'}\ta picture named a\n"
    assert r.code == 1 and "empty.png" in r.err


def test_output_appends_and_rerun_skips_finished_and_retries_failed(fake, shots):
    out = Path("caps.jsonl")
    first = fuyu("caption", shots, "--output", out)
    assert first.code == 1 and first.out == ""  # --output replaces stdout
    assert len(out.read_text().splitlines()) == 6
    second = fuyu("caption", shots, "-o", out)
    assert fake.names() == ["corrupt.png", "empty.png", "text.png"]
    assert "3 already done" in second.err
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(Path(x["path"]).name for x in recs) == sorted(
        ["a.png", "b.png", "c.jpg", "corrupt.png", "empty.png", "text.png"])  # still once each


def test_overwrite_redoes_everything_and_keeps_one_record_per_image(fake, shots):
    out = Path("caps.jsonl")
    fuyu("caption", shots / "a.png", shots / "b.png", "-o", out)
    fuyu("caption", shots / "a.png", "-o", out, "--overwrite")
    assert fake.names() == ["a.png"]
    assert sorted(Path(json.loads(x)["path"]).name for x in out.read_text().splitlines()) == ["a.png", "b.png"]


def test_truncated_last_line_from_a_crash_is_dropped_and_redone(fake, shots):
    out = Path("caps.jsonl")
    fuyu("caption", shots / "a.png", shots / "b.png", "-o", out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed mid-write of b's record
    r = fuyu("caption", shots / "a.png", shots / "b.png", "-o", out)
    assert r.code == 0 and fake.names() == ["b.png"]
    text = out.read_text()
    assert text.endswith("\n")
    assert [Path(json.loads(x)["path"]).name for x in text.splitlines()] == ["a.png", "b.png"]


def test_nothing_left_to_do_exits_0_without_loading_the_model(fake, shots):
    fuyu("caption", shots / "a.png", "-o", "caps.jsonl")
    r = fuyu("caption", shots / "a.png", "-o", "caps.jsonl")
    assert r.code == 0 and len(fake.specs) == 1 and "nothing to do, 1 already done" in r.err


def test_output_with_a_stdout_format_is_a_usage_error(fake, shots):
    r = fuyu("caption", shots / "a.png", "-o", "x.jsonl", "--format", "csv")
    assert r.code == 2 and "--output always writes JSON lines" in r.err


def test_sidecar_writes_text_next_to_image_and_rerun_skips(fake, shots):
    r = fuyu("caption", shots / "a.png", shots / "empty.png", "--sidecar")
    assert (shots / "a.txt").read_text() == "a picture named a\n"
    assert not (shots / "empty.txt").exists() and r.code == 1
    assert not list(shots.glob(".*fuyu-tmp"))  # written through a temp file, renamed into place
    fuyu("caption", shots / "a.png", shots / "b.png", "--sidecar")
    assert fake.names() == ["b.png"]
    fuyu("caption", shots / "a.png", "--sidecar", "--overwrite")
    assert fake.names() == ["a.png"]
    assert "skipped" not in fuyu("caption", shots, "--sidecar").err.split("notes.txt")[0].split("skipped, not images")[-1]


def test_sidecars_that_would_collide_fail_the_second_image_only(fake, tmp_path):
    png(tmp_path / "d" / "x.png"), png(tmp_path / "d" / "x.jpg")
    r = fuyu("caption", tmp_path / "d", "--sidecar")
    recs = {Path(x["path"]).name: x for x in r.records()}
    assert r.code == 1 and "error" not in recs["x.jpg"] and "share a name" in recs["x.png"]["error"]
    assert (tmp_path / "d" / "x.txt").read_text() == "a picture named x\n"


def test_options_reach_the_runner(fake, shots, monkeypatch):
    monkeypatch.setenv("FUYU_MODEL", str(shots))
    fuyu("caption", shots / "a.png", "--device", "cpu", "--dtype", "float32", "--quantize", "8bit",
         "--batch-size", "5", "--max-new-tokens", "7", "--temperature", "0.7", "--top-p", "0.9",
         "--seed", "3")
    spec = fake.specs[0]
    assert (spec.path, spec.device, spec.dtype, spec.quantize, spec.batch_size) == (
        str(shots), "cpu", "float32", "8bit", 5)
    units, batch_size, gen = fake.calls[0]
    assert batch_size == 5 and (gen.max_new_tokens, gen.temperature, gen.top_p, gen.seed) == (7, 0.7, 0.9, 3)
    fuyu("caption", shots / "b.png", "-m", shots / "sub")
    assert fake.specs[1].path == str(shots / "sub") and fake.calls[1][1] == 3  # runner's default batch


def test_option_groups_are_built_by_keyword_only():
    # A spec of ten fields built by position silently shifts when a field is added.
    from dataclasses import fields

    from fuyu import options

    for spec in (options.InputSpec, options.ModelSpec, options.GenOptions, options.OutputSpec,
                 options.ClusterSpec, options.RunOptions):
        with pytest.raises(TypeError, match="positional"):
            spec(*[None] * len(fields(spec)))


@pytest.mark.parametrize("args", [["--device", "gpu"], ["--dtype", "int3"], ["--quantize", "2bit"],
                                  ["--batch-size", "0"], ["--top-p", "0"], ["--format", "xml"],
                                  ["--temperature", "-1"], ["--seed", "3"], ["--top-p", "0.5"],
                                  ["--output", "x.jsonl", "--output-dir", "d"], ["--shard", "0/2"],
                                  ["--shard", "2/2", "--output-dir", "d"], ["--pages", "3-1"]])
def test_bad_option_values_are_one_line_usage_errors_before_loading(fake, shots, args):
    r = fuyu("caption", shots / "a.png", *args)
    assert r.code == 2 and fake.specs == [] and len(r.err.splitlines()) == 1 and r.err.startswith("error: ")


def test_caption_prompt_override_reaches_the_job(fake, shots):
    fuyu("caption", shots / "a.png", "--prompt", "Describe the UI.")
    (ask,) = fake.units()[0].asks
    assert (ask.task, ask.text, ask.prompt) == ("caption", "Describe the UI.", "Describe the UI.\n")


def test_ask_takes_the_question_last_or_by_option(fake, shots):
    r = fuyu("ask", shots / "a.png", "What color?")
    assert r.code == 0 and [a.text for a in fake.units(0)[0].asks] == ["What color?"]
    fuyu("ask", shots / "a.png", shots / "b.png", "--question", "Why?")
    assert [[a.text for a in u.asks] for u in fake.units(1)] == [["Why?"], ["Why?"]]
    assert fuyu("ask", shots / "a.png").code == 2
    assert fuyu("ask", shots / "a.png", "--question", " ").code == 2


@pytest.mark.parametrize("command, what", [("ask", "a question"), ("bbox", "the text to find")])
def test_a_file_or_stdin_as_the_last_argument_is_a_usage_error(fake, shots, command, what):
    # ask and bbox read their text after the paths the same way (options.text_after_paths).
    for last in (shots / "b.png", "-"):
        r = fuyu(command, shots / "a.png", last)
        assert r.code == 2 and f"the last argument ({last}) is a file, not {what}" in r.err and fake.specs == []


def test_several_questions_give_one_record_each_and_run_together(fake, shots, tmp_path):
    qfile = tmp_path / "q.txt"
    qfile.write_text("Date?\n\nVendor?\n")
    r = fuyu("ask", shots / "a.png", shots / "b.png", "-q", "Total?", "--questions", qfile)
    assert r.code == 0
    assert [(Path(x["path"]).name, x["prompt"]) for x in r.records()] == [
        (n, q) for n in ("a.png", "b.png") for q in ("Total?\n", "Date?\n", "Vendor?\n")]
    assert [[a.text for a in u.asks] for u in fake.units()] == [["Total?", "Date?", "Vendor?"]] * 2


def test_bbox_find_gives_boxes_and_draws_them(fake, shots):
    r = fuyu("bbox", shots / "a.png", "Total", "--draw", "found.png")
    (rec,) = r.records()
    assert r.code == 0 and rec["task"] == "bbox" and rec["boxes"] == [[1, 2, 3, 4]]
    assert fake.units()[0].asks[0].text == "Total"
    with Image.open("found.png") as im:
        assert im.size == (40, 30) and im.getpixel((1, 2)) != im.getpixel((20, 20))


def test_bbox_draw_into_a_folder_for_many_images(fake, shots):
    r = fuyu("bbox", shots / "a.png", shots / "b.png", "--find", "x", "--draw", "drawn", "-f", "text")
    assert r.out.splitlines()[0].endswith("\t1,2,3,4")
    assert sorted(p.name for p in Path("drawn").iterdir()) == ["a.png", "b.png"]


def test_bbox_draw_to_one_file_with_many_images_is_a_usage_error_before_loading(fake, shots):
    r = fuyu("bbox", shots / "a.png", shots / "b.png", "--find", "x", "--draw", "one.png")
    assert r.code == 2 and "give a folder" in r.err and fake.specs == []
    assert fuyu("bbox", shots, "--find", "x", "--draw", "one.png").code == 2


def test_bbox_several_targets_and_boxes_give_one_record_each(fake, shots):
    r = fuyu("bbox", shots / "a.png", "--find", "Save", "--find", "Cancel", "--box", "1,2,30,20")
    assert [(x["task"], x["boxes"]) for x in r.records()] == [
        ("bbox", [[1, 2, 3, 4]]), ("bbox", [[1, 2, 3, 4]]), ("ocr", [[1.0, 2.0, 30.0, 20.0]])]
    assert [x["prompt"].rsplit("\n", 1)[1] for x in r.records()[:2]] == ["Save", "Cancel"]


def test_bbox_box_reads_text_and_rejects_bad_boxes(fake, shots):
    r = fuyu("bbox", shots / "a.png", "--box", "1,2,30,20")
    (rec,) = r.records()
    assert rec["task"] == "ocr" and fake.units()[0].asks[0].box == (1.0, 2.0, 30.0, 20.0)
    assert fuyu("bbox", shots / "a.png", "--box", "1,2,3").code == 2
    assert fuyu("bbox", shots / "a.png", "--box", "a,b,c,d").code == 2
    assert fuyu("bbox", shots / "a.png").code == 2


def test_quiet_keeps_only_error_lines_on_stderr(fake, shots):
    r = fuyu("caption", shots, "--quiet")
    assert r.err and all(line.startswith("error: ") for line in r.err.splitlines())


def test_known_error_is_one_line_exit_2_and_traceback_only_with_debug(fake, monkeypatch, shots):
    def boom(spec, *args):
        raise FuyuError("model folder not found (x)", "pass --model DIR")

    monkeypatch.setattr(pipeline, "load_runner", boom)
    r = fuyu("caption", shots / "a.png")
    assert (r.code, r.err) == (2, "error: model folder not found (x) — pass --model DIR\n")
    r = fuyu("--debug", "caption", shots / "a.png")
    assert r.code == 2 and "Traceback" in r.err and r.err.endswith("— pass --model DIR\n")
    assert "Traceback" in fuyu("caption", shots / "a.png", env={"FUYU_DEBUG": "1"}).err


def test_unexpected_error_is_one_line_exit_70_with_a_debug_hint(fake, monkeypatch, shots):
    monkeypatch.setattr(pipeline, "load_runner", lambda spec, *args: 1 / 0)
    r = fuyu("caption", shots / "a.png")
    assert r.code == 70 and len(r.err.splitlines()) == 1
    assert r.err.startswith("error: unexpected ZeroDivisionError") and "--debug" in r.err


def test_ctrl_c_keeps_finished_results_and_exits_130(fake, monkeypatch, shots):
    real_run = fake.run

    def run(work, batch_size, gen, window=256):
        it = real_run(work, batch_size, gen)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(fake, "run", run)
    r = fuyu("caption", shots / "a.png", shots / "b.png", "-o", "caps.jsonl")
    assert r.code == 130 and "rerun the same command to continue" in r.err
    assert len(Path("caps.jsonl").read_text().splitlines()) == 1


def test_no_weights_anywhere_says_how_to_get_them(monkeypatch, tmp_path, shots):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    r = fuyu("caption", shots / "a.png")
    assert r.code == 2 and len(r.err.splitlines()) == 1
    assert "hf download adept/fuyu-8b" in r.err and "fuyu convert" in r.err


def test_hf_cache_snapshot_is_found(monkeypatch, tmp_path):
    from fuyu.locate import find_checkpoint

    repo = tmp_path / "hub" / "models--adept--fuyu-8b"
    for rev in ("old", "abc123"):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert find_checkpoint(None) == repo / "snapshots" / "abc123"
    assert find_checkpoint("adept/fuyu-8b") == repo / "snapshots" / "abc123"
    assert find_checkpoint(str(tmp_path)) == tmp_path


def test_progress_bar_shows_on_a_terminal_and_stdout_stays_data(fake, monkeypatch, shots):
    from rich.console import Console

    from fuyu import render

    monkeypatch.setattr(render, "stderr_console",
                        lambda: Console(stderr=True, force_terminal=True, soft_wrap=True))
    r = fuyu("caption", shots / "a.png", shots / "b.png")
    assert "rec/s" in r.err and "tok/s" in r.err
    assert len(r.records()) == 2


def test_no_color_is_honoured(fake, shots):
    colored = fuyu("caption", shots / "empty.png", env={"FORCE_COLOR": "1"})
    plain = fuyu("caption", shots / "empty.png", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert "\x1b[31m" in colored.err or "\x1b[1;31m" in colored.err
    assert "31m" not in plain.err


def test_version_and_help_with_examples_for_every_command():
    assert fuyu("--version").out.startswith("fuyu ")
    top = fuyu("--help")
    assert top.code == 0 and all(c in top.out for c in ("caption", "ask", "bbox"))
    for command in ("caption", "ask", "bbox"):
        r = fuyu(command, "--help")
        assert r.code == 0 and "Examples" in r.out and f"fuyu {command} " in r.out


def test_sidecar_names_never_collide_with_their_own_input():
    from fuyu.output import sidecar_path
    from fuyu.records import Item

    assert sidecar_path(Item("a/b.png")) == Path("a/b.txt")
    assert sidecar_path(Item("a/b.pdf", 2, 3)) == Path("a/b.page-2.txt")
    for name in ("notes.txt", "notes.TXT", "b.png", "x.tar.gz"):
        assert sidecar_path(Item(f"d/{name}")) != Path(f"d/{name}")


def test_without_a_terminal_progress_is_a_plain_line_every_interval(capsys):
    from fuyu.pipeline import Tally
    from fuyu.records import Record
    from fuyu.render import Reporter

    tally = Tally()
    tally.started -= 10.0  # ten seconds in
    ui = Reporter()
    with ui.progress(tally, "caption", every=0.0) as advance:
        for i in range(3):
            tally.add(Record("a.png", "caption", "p", text="x", new_tokens=4) if i else
                      Record("b.png", "caption", "p", error="bad"))
            tally.total, tally.inputs_listed = 3, i == 2
            advance()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[0].startswith("caption: 1 done (1 failed), 0.1")
    assert lines[2].startswith("caption: 3/3 done (1 failed), 0.3") and lines[2].endswith("ETA 0:00:00")
    with Reporter(quiet=True).progress(tally, "caption", every=0.0) as advance:
        advance()
    assert capsys.readouterr().err == ""


def test_the_summary_says_the_load_time_is_not_included(fake, shots):
    r = fuyu("caption", shots / "a.png")
    assert "model loaded in" in r.err.splitlines()[-1] and "(not included)" in r.err


def test_output_dash_is_stdout(fake, shots):
    r = fuyu("caption", shots / "a.png", "-o", "-")
    assert r.code == 0 and r.records()[0]["text"] == "a picture named a" and not Path("-").exists()
