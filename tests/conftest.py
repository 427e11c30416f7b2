import os
from pathlib import Path

import pytest

from fuyu.testing.checkpoint import make_checkpoint
from fuyu.testing.tokenizer import vocab_size


@pytest.fixture(scope="session", autouse=True)
def _own_cache_folder(tmp_path_factory):
    """Kernel choices and other caches go to a folder of the test session, never the user's
    ~/.cache (subprocesses inherit it too)."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(autouse=True)
def _isolate_fuyu_env(monkeypatch):
    """No FUYU_* variable from the developer's shell leaks into a test. In-process loads use plain
    kernels: many tests compare texts across loads, and the timed kernel choice (model/tuning.py)
    may differ from one load to the next on a busy machine, which can flip a near-tie of the tiny
    random models. The timed path has tests of its own (test_fast_paths.py, test_cli_e2e.py)."""
    for key in list(os.environ):
        if key.startswith("FUYU_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FUYU_KERNELS", "plain")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A directory holding only the tiny tokenizer files (fuyu/testing/tokenizer.py)."""
    from fuyu.testing.tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def proc(ckpt):
    from fuyu.preprocess import FuyuProcessor

    return FuyuProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def tok(proc):
    return proc.tokenizer


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """One tiny random checkpoint (hub layout, tokenizer files) shared by the whole session."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-fuyu"), vocab_size=vocab_size())


@pytest.fixture
def native_lib():
    """The C kernels (fuyu.model.native), built. Where a C compiler exists a failed build fails the
    test with the compiler's message; the test skips only where there is no compiler at all (or
    torch brings no libgomp for the kernels to share: macOS, Windows, other OpenMP builds)."""
    from fuyu.model import native
    from fuyu.model.native import build
    from fuyu.model.settings import Settings

    got = native.outcome()
    if got.lib is None:
        if build.compiler_path(Settings.from_environment().compiler) is None:
            pytest.skip("no C compiler")
        if not native._torch_has_libgomp():
            pytest.skip("torch has no libgomp for the C kernels to share")
        pytest.fail(f"the C kernels did not build or load: {got.reason}\n"
                    f"{got.build.output if got.build else ''}")
    return got.lib
