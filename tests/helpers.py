"""Helpers the test modules share: running `fuyu` in-process or as a subprocess, making images,
and a fake Runner for CLI tests that need no model."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from fuyu import app as app_module

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "examples" / "assets"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.out.splitlines()]


def fuyu(*args: str, input: str | None = None, env: dict | None = None) -> Run:
    """Run `fuyu ARGS` through the real entry point (main(): the error boundary) with captured streams."""
    with CliRunner().isolation(input=input, env=env) as (out, err, _):
        try:
            app_module.main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            app_module._debug = False
        return Run(code, out.getvalue().decode(), err.getvalue().decode())


def png(path: Path, size=(40, 30), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


class FakeRunner:
    """Answers every readable image with its file name, as the real runner would shape it (the
    real Record type); unreadable ones become error records. Each call's work is kept in `calls`."""

    load_seconds = 0.25

    def __init__(self):
        self.calls = []

    def default_batch_size(self) -> int:
        return 3

    def run(self, work, batch_size, gen, window=256):
        from fuyu.records import Record, Unit

        seen: list = []
        self.calls.append((seen, batch_size, gen))
        for unit in work:  # lazily, as the real runner reads its input
            if not isinstance(unit, (Record, Unit)):  # inputs.IDLE
                continue
            seen.append(unit)
            if isinstance(unit, Record):
                yield unit
                continue
            item = unit.item
            try:
                with Image.open(item.path) as im:
                    w, h = im.size
            except Exception as exc:
                for ask in unit.asks:
                    yield Record.failed(item, ask, f"cannot read image ({type(exc).__name__})")
                continue
            for ask in unit.asks:
                boxes = {"bbox": [[1, 2, 3, 4]], "ocr": [list(ask.box or ())]}.get(ask.task)
                yield Record(item.path, ask.task, ask.prompt, item.page, item.pages,
                             text=f"a picture named {Path(item.path).stem}", boxes=boxes, width=w,
                             height=h, prompt_tokens=10, new_tokens=5, seconds=0.01)

    def units(self, call: int = -1) -> list:
        """The units (not pass-through records) of one call."""
        from fuyu.records import Unit

        return [u for u in self.calls[call][0] if isinstance(u, Unit)]

    def names(self, call: int = -1) -> list[str]:
        return [Path(u.item.path).name for u in self.units(call)]


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUYU_")}
    return {**env, "NO_COLOR": "1", **extra}


def fuyu_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "fuyu", *map(str, args)]


def kill_after_lines(cmd: list[str], out: Path, lines: int, timeout: float = 120) -> int:
    """Run cmd, SIGKILL it once `out` holds `lines` lines (or it exits), and return how many it
    holds then: an interrupted run, for the exactly-once tests."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    return out.read_bytes().count(b"\n")
