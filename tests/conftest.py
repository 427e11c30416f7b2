import os

import pytest


@pytest.fixture(autouse=True)
def _isolate_fuyu_env(monkeypatch):
    """No FUYU_* variable from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("FUYU_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A directory holding only the tiny tokenizer files (tests/tiny_tokenizer.py)."""
    from tests.tiny_tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def proc(ckpt):
    from preprocess import FuyuProcessor

    return FuyuProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def tok(proc):
    return proc.tokenizer
