"""Which checkpoint folder to load: --model / FUYU_MODEL, else the Hugging Face cache copy."""

from __future__ import annotations

import os
from pathlib import Path

from fuyu.errors import FuyuError

HUB_REPO = "adept/fuyu-8b"

NO_WEIGHTS_HINT = (
    "pass --model DIR or set FUYU_MODEL; to get the weights run `hf download adept/fuyu-8b` "
    "(found automatically in the Hugging Face cache), or `fuyu convert` Adept's original release")


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def cached_snapshot(cache: Path, repo_id: str = HUB_REPO) -> Path | None:
    """The snapshot `refs/main` points to, else the newest one holding a config.json."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    snaps = [p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime, default=None)


def find_checkpoint(model: str | Path | None, download: bool = False) -> Path:
    """The checkpoint folder for --model: a folder, or a hub repo id found in the local cache."""
    if model is not None:
        path = Path(model)
        if path.is_dir():
            return path
        if path.exists():
            raise FuyuError(f"--model {model}: is a file, not a checkpoint folder",
                            "pass the folder holding config.json and the *.safetensors files")
        if str(model).count("/") != 1 or str(model).startswith((".", "/")):
            raise FuyuError(f"model folder not found ({model})", NO_WEIGHTS_HINT)
        repo_id = str(model)
    else:
        repo_id = HUB_REPO
    snap = cached_snapshot(hub_cache(), repo_id)
    if snap is None:
        what = "no Fuyu checkpoint given and none" if model is None else f"{repo_id}: not a folder, and not"
        raise FuyuError(f"{what} in the Hugging Face cache ({hub_cache()})", NO_WEIGHTS_HINT)
    return snap
