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


@pytest.fixture(scope="session", autouse=True)
def _plans_timed_once(_own_cache_folder):
    """The suite runs the path users run: the kernel plan timed on this machine (model/plan.py),
    the native C kernels where a compiler exists. Each model shape's plan is timed once a session
    and kept (also when the machine is busy, which a user's load would not keep), so that every
    later load, in this process or a subprocess, runs the same kernels: many tests compare texts
    across loads, and another plan can flip a near-tie of the tiny random models."""
    from fuyu.model import plan

    keep = plan.CPU_SHARE
    plan.CPU_SHARE = 0.0
    yield
    plan.CPU_SHARE = keep


@pytest.fixture
def own_plan_cache(tmp_path, monkeypatch):
    """A cache folder of the test's own (kernel plans timed afresh), sharing the session's compiled
    C kernels (one build, ~6 s, not one per test)."""
    from fuyu.model.settings import Settings

    session = Settings.from_environment().cache_dir / "native"
    session.mkdir(parents=True, exist_ok=True)
    (tmp_path / "xdg" / "fuyu").mkdir(parents=True)
    (tmp_path / "xdg" / "fuyu" / "native").symlink_to(session)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


@pytest.fixture(autouse=True)
def _isolate_fuyu_env(monkeypatch):
    """No FUYU_* variable from the developer's shell leaks into a test; kernels "auto", as a user's."""
    for key in list(os.environ):
        if key.startswith("FUYU_"):
            monkeypatch.delenv(key)


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
def tiny_model(tmp_path_factory, _plans_timed_once) -> Path:
    """One tiny random checkpoint (hub layout, tokenizer files) shared by the whole session, its
    kernel plans (bfloat16, float32) timed and kept now: the CLI's subprocesses then find them."""
    path = make_checkpoint(tmp_path_factory.mktemp("tiny-fuyu"), vocab_size=vocab_size())
    time_plans(path)
    return path


def time_plans(ckpt: Path) -> None:
    import torch

    from fuyu.model import Fuyu, plan
    from fuyu.model.settings import Settings
    from fuyu.model.weights import read_config

    with torch.device("meta"):
        model = Fuyu(read_config(ckpt))
    for dtype in (torch.bfloat16, torch.float32):
        plan.choose(plan.Shape.of(model, dtype), Settings.from_environment(), "auto")


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
