"""What `fuyu` prints when things go wrong, on a real tiny checkpoint.

A bad item (unreadable image, over-long prompt, box outside the image) is one error record and
one `error:` line on stderr, the other items still run, and the exit code is 1. A broken
checkpoint is exit 2 and one `error:` line naming the problem and the file, with no traceback
or warning unless --debug (in-process through main(), the error boundary; one subprocess run
checks what Python itself prints).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import cli_env, fuyu, fuyu_cmd, png
from fuyu.testing.checkpoint import BREAKAGES, break_checkpoint, copy_checkpoint, make_checkpoint
from fuyu.testing.tokenizer import vocab_size

FAST = ["--dtype", "float32", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", vocab_size=vocab_size())


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("sharded") / "ckpt", vocab_size=vocab_size(), shards=3)


@pytest.fixture(scope="module")
def short_context(tiny, tmp_path_factory) -> Path:
    """The tiny checkpoint with 40 positions: a 30×30 image's caption prompt (20 tokens) plus 6
    new tokens fits, a 300×300 one's (128 tokens) does not."""
    ckpt = copy_checkpoint(tiny, tmp_path_factory.mktemp("short") / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["max_position_embeddings"] = config["text_config"]["max_position_embeddings"] = 40
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def _bad_image(tmp_path, tiny, short_context):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return ["caption", png(tmp_path / "good.png", (90, 40)), bad, "-m", tiny], bad


def _over_long_prompt(tmp_path, tiny, short_context):
    # Batch size 2 puts both in one batch, which fails as a whole and is retried item by item:
    # the retry must not report the culprit twice or fail its neighbour.
    big = png(tmp_path / "big.png", (300, 300))
    return ["caption", png(tmp_path / "good.png", (30, 30)), big, "-m", short_context, "-b", "2"], big


def _box_outside(tmp_path, tiny, short_context):
    # 10,5,60,30 lies inside the 90×40 image and past the right edge of the 30×70 one.
    narrow = png(tmp_path / "narrow.png", (30, 70))
    return ["bbox", png(tmp_path / "good.png", (90, 40)), narrow, "--box", "10,5,60,30", "-m", tiny], narrow


@pytest.mark.parametrize("case, problem", [
    (_bad_image, "not an image format"),
    (_over_long_prompt, "exceeds the model's 40 positions"),
    (_box_outside, "outside the 30×70 image"),
], ids=["bad image", "over-long prompt", "box outside the image"])
def test_a_bad_item_is_one_error_record_and_one_stderr_line_and_the_run_goes_on(
        tmp_path, tiny, short_context, case, problem):
    args, bad = case(tmp_path, tiny, short_context)
    r = fuyu(*args, *FAST)
    assert r.code == 1, r.err
    recs = r.records()
    assert sorted(rec["path"] for rec in recs) == sorted([str(tmp_path / "good.png"), str(bad)])
    by_name = {Path(rec["path"]).name: rec for rec in recs}
    good, failed = by_name["good.png"], by_name[bad.name]
    assert "error" not in good and good["new_tokens"] == 6 and good["text"] is not None
    assert problem in failed["error"] and "text" not in failed
    # stderr: the item's one `error:` line (naming its file once), then the run's summary line.
    lines = r.err.splitlines()
    assert len(lines) == 2, r.err
    error, summary = lines
    assert error.startswith("error: ") and error.count(str(bad)) == 1 and problem in error
    assert summary.split(": ", 1)[1].startswith("1 done, 1 failed in ")  # "caption: …" / "ocr: …"


def _run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(fuyu_cmd(*args), env=cli_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("how, problem", [
    ("truncated", "truncated or corrupt"),
    ("truncated shard", "truncated or corrupt"),
    ("missing tensor", "tensor 'lm_head.weight' missing"),
    ("extra tensor", "unexpected tensor 'extra.weight'"),
    ("wrong shape", "tensor 'vision_embed_tokens.bias' has shape (3,), config.json implies (64,)"),
    ("no config.json", "not found"),
    ("config.json not JSON", "not valid JSON"),
    ("config.json a list", "holds a JSON list, not the object of a model configuration"),
])
def test_a_broken_checkpoint_is_exit_2_and_one_line_naming_the_problem_and_file(
        tmp_path, tiny, tiny_sharded, how, problem):
    source = tiny_sharded if how == "truncated shard" else tiny
    broken = break_checkpoint(source, tmp_path / "broken", how)
    spoiled = broken / BREAKAGES[how][1]  # the directory itself when no one file is at fault
    r = fuyu("caption", png(tmp_path / "a.png"), "--model", broken)  # in-process: the error boundary is main()
    assert r.code == 2, r.err
    assert r.out == ""
    assert len(r.err.splitlines()) == 1, r.err  # no traceback, no warning, no summary
    (line,) = r.err.splitlines()
    assert line.startswith(f"error: {spoiled}: ") and problem in line, line
    assert "Traceback" not in r.err and "warning" not in r.err.lower()


def test_debug_adds_the_traceback_to_a_broken_checkpoint_error(tmp_path, tiny):
    """The one subprocess smoke test: what Python itself prints reaches the real stderr."""
    broken = break_checkpoint(tiny, tmp_path / "broken", "wrong shape")
    r = _run_cli("--debug", "caption", png(tmp_path / "a.png"), "--model", broken)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("Traceback (most recent call last):")
    assert "fuyu.model.errors.CheckpointError" in r.stderr and "load_pretrained" in r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith(f"error: {broken / 'model.safetensors'}: tensor 'vision_embed_tokens.bias'")


def test_error_text_is_one_line_and_an_unexpected_error_keeps_its_type():
    # One helper flattens every message (records, stderr, Ray's errors, warnings).
    from fuyu.errors import FuyuError, one_line, record_error

    assert one_line("cannot read\n  a.png:\ttruncated ") == "cannot read a.png: truncated"
    assert one_line("\nboom  now\nTraceback (most recent call last):\n  File …", first=True) == "boom now"
    assert record_error(FuyuError("box 1,2,3,4\nis outside")) == "box 1,2,3,4 is outside"
    assert record_error(RuntimeError("boom\nsecond line")) == "RuntimeError: boom second line"
