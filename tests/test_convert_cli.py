"""`fuyu convert` through the real entry point: exit codes, stderr lines, the written folder."""

import json

import torch

from fuyu.model import load_pretrained
from tests.helpers import fuyu
from fuyu.testing.checkpoint import make_checkpoint


def test_convert_writes_a_prequantized_checkpoint(tmp_path):
    src = make_checkpoint(tmp_path / "src", hidden=128, vocab_size=320, tokenizer=True)
    run = fuyu("convert", src, tmp_path / "out", "--quantize", "int8", "--shard-size", "200KB")
    assert run.code == 0, run.err
    assert run.out == ""  # stdout carries data only; progress went to stderr
    assert "wrote shard 2" in run.err and f"wrote {tmp_path / 'out'}" in run.err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["method"] == "int8"
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    assert load_pretrained(tmp_path / "out").layers[0].mlp.dense_h_to_4h.weight.dtype == torch.int8


def test_existing_output_and_bad_sizes_are_usage_errors(tmp_path):
    src = make_checkpoint(tmp_path / "src", vocab_size=300, tokenizer=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    run = fuyu("convert", src, tmp_path / "taken")
    assert run.code == 2 and "already exists" in run.err and len(run.err.strip().splitlines()) == 1
    run = fuyu("convert", src, tmp_path / "out", "--shard-size", "huge")
    assert run.code == 2 and "shard size 'huge'" in run.err
    assert not (tmp_path / "out").exists()


class Payload:
    """A class: unpickling it needs code."""


def test_refused_pickle_is_one_error_line(tmp_path):
    torch.save({"model": {}, "payload": Payload()}, tmp_path / "model_optim_rng.pt")
    (tmp_path / "vocab.model").write_bytes(b"")
    run = fuyu("convert", tmp_path / "model_optim_rng.pt", tmp_path / "out",
               "--tokenizer", tmp_path / "vocab.model")
    assert run.code == 2
    errors = [line for line in run.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refusing to unpickle tests.test_convert_cli.Payload" in errors[0]


def test_convert_output_permissions_follow_the_umask(tmp_path):
    import os
    import stat

    src = make_checkpoint(tmp_path / "src", vocab_size=300, tokenizer=False)
    old = os.umask(0o027)
    try:
        assert fuyu("convert", src, tmp_path / "out").code == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == 0o750
    assert {mode(p) for p in (tmp_path / "out").iterdir()} == {0o640}
