"""A Hugging Face Hub on 127.0.0.1 speaking just enough of its API for huggingface_hub 0.36:
the model info endpoint (`/api/models/{repo}/revision/{rev}`, siblings with sizes, blob ids and LFS
sha256 for `?blobs=true`) and `/{repo}/resolve/{rev}/{file}` with HEAD and GET (ETag,
X-Repo-Commit, Content-Length, Range → 206). Errors carry the hub's X-Error-Code so
huggingface_hub raises its own exception types. Point HF_ENDPOINT at `hub.url`.

Faults for tests: `hub.drop[name] = (nbytes, times)` sends the headers and the first nbytes of
`name`'s body, then closes the connection, `times` times; `hub.gated` lists repos whose files
answer 403 GatedRepo. `hub.log` records (method, path, Range header, body bytes sent).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self, repos: dict[str, Path | dict[str, bytes]]):
        """repos: repo id → a folder (its files, flat) or {file name: bytes}."""
        self.repos = {}
        for repo_id, src in repos.items():
            files = src if isinstance(src, dict) else {p.name: p.read_bytes()
                                                       for p in sorted(Path(src).iterdir()) if p.is_file()}
            sha = hashlib.sha1(repo_id.encode() + b"".join(hashlib.sha1(b).digest()
                                                           for b in files.values())).hexdigest()
            self.repos[repo_id] = (sha, files)
        self.gated: set[str] = set()
        self.drop: dict[str, tuple[int, int]] = {}
        self.log: list[tuple[str, str, str | None, int]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # --- life cycle ---
    def start(self) -> FakeHub:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # --- what the hub says about a file ---
    @staticmethod
    def is_lfs(name: str) -> bool:
        return name.endswith((".safetensors", ".bin", ".pt"))

    def etag(self, data: bytes, name: str) -> str:
        """LFS files: their sha256; others: their git blob id (as the real hub)."""
        if self.is_lfs(name):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def info(self, repo_id: str, blobs: bool) -> dict:
        sha, files = self.repos[repo_id]
        siblings = []
        for name, data in files.items():
            s = {"rfilename": name}
            if blobs:
                s.update(size=len(data), blobId=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
                if self.is_lfs(name):
                    s["lfs"] = {"size": len(data), "sha256": self.etag(data, name), "pointerSize": 134}
            siblings.append(s)
        return {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                "gated": repo_id in self.gated, "siblings": siblings}

    def requests(self, method: str | None = None, name: str | None = None) -> list[tuple]:
        with self.lock:
            return [r for r in self.log if (method is None or r[0] == method)
                    and (name is None or r[1].endswith("/" + name))]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            self._serve(body=True)

        def do_HEAD(self):
            self._serve(body=False)

        def _error(self, status: int, code: str, commit: str | None = None):
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            payload = json.dumps({"error": code}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _serve(self, body: bool):
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            sent = 0
            try:
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if m:
                    sent = self._api(m.group(1), "blobs=true" in parts.query.lower())
                    return
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    sent = self._resolve(m.group(1), m.group(2), m.group(3), body)
                    return
                self._error(404, "NotFound")
            finally:
                with hub.lock:
                    hub.log.append((self.command, path, self.headers.get("Range"), sent))

        def _api(self, repo_id: str, blobs: bool) -> int:
            if repo_id not in hub.repos:
                self._error(404, "RepoNotFound")
                return 0
            payload = json.dumps(hub.info(repo_id, blobs)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return 0

        def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> int:
            if repo_id not in hub.repos:
                self._error(404, "RepoNotFound")
                return 0
            sha, files = hub.repos[repo_id]
            if rev not in (sha, "main"):
                self._error(404, "RevisionNotFound")
                return 0
            if repo_id in hub.gated:
                self._error(403, "GatedRepo")
                return 0
            if name not in files:
                self._error(404, "EntryNotFound", sha)
                return 0
            data = files[name]
            start, end = 0, len(data) - 1
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if rng:
                start = int(rng.group(1))
                end = int(rng.group(2)) if rng.group(2) else end
            self.send_response(206 if rng else 200)
            self.send_header("ETag", f'"{hub.etag(data, name)}"')
            self.send_header("X-Repo-Commit", sha)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if not body:
                return 0
            chunk = data[start:end + 1]
            with hub.lock:
                nbytes, times = hub.drop.get(name, (0, 0))
                if times > 0:
                    hub.drop[name] = (nbytes, times - 1)
            if times > 0:  # the connection breaks mid-file
                self.wfile.write(chunk[:nbytes])
                self.wfile.flush()
                self.close_connection = True
                return min(nbytes, len(chunk))
            self.wfile.write(chunk)
            return len(chunk)

    return Handler
