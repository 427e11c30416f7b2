"""What README promises a newcomer, run as written: the Python API snippet (from a folder that holds
its own model.py and preprocess.py, which must not shadow the library), `python -m fuyu` from that
folder, and the "try it without weights" lines."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, cli_env, png

README = (REPO / "README.md").read_text()


def code_block(after_heading: str, lang: str) -> str:
    """The first ```lang block after the heading line `after_heading`."""
    start = README.index(after_heading)
    m = re.compile(rf"```{lang}\n(.*?)```", re.DOTALL).search(README, start)
    assert m, f"no {lang} block after {after_heading!r}"
    return m.group(1)


def shadowing_folder(tmp_path: Path) -> Path:
    """A user's project folder with modules named like our packages' old top-level names."""
    d = tmp_path / "project"
    d.mkdir()
    for name in ("model", "preprocess", "fuyu_cli"):
        (d / f"{name}.py").write_text("raise SystemExit('the user module was imported instead of fuyu')\n")
    return d


def test_the_python_api_snippet_runs_from_a_folder_with_its_own_model_py(tiny_model, tmp_path):
    d = shadowing_folder(tmp_path)
    png(d / "shot.png", (90, 60))
    script = d / "snippet.py"
    script.write_text(f"ckpt_dir = {str(tiny_model)!r}\n" + code_block("## Python API", "python"))
    r = subprocess.run([sys.executable, script.name], cwd=d, env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "fuyu", "--version"], cwd=d, env=cli_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("fuyu "), r.stderr


def test_try_it_without_weights_runs_as_written(tmp_path):
    lines = [line for line in code_block("Try it without weights", "bash").splitlines()
             if line.strip() and not line.startswith("#")]
    assert 2 <= len(lines) <= 3
    env = cli_env(PATH=f"{Path(sys.executable).parent}:{cli_env()['PATH']}")
    for line in lines:
        cmd = line.split("  #")[0].replace("/tmp/fuyu-tiny", str(tmp_path / "fuyu-tiny"))
        r = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (cmd, r.stderr)
    assert '"text": ' in r.stdout and r.stdout.count("\n") == 3, shlex.quote(r.stdout)
