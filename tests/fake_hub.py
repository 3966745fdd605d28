"""A local stand-in for the Hugging Face Hub's file API, on a loopback port, that counts what it serves.

It answers what `huggingface_hub` asks (`HF_ENDPOINT`): a repo's info at a revision, its file tree,
and each file's metadata (HEAD) and bytes (GET) under `/{repo}/resolve/{revision}/{path}`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves `folder` as the model repo `repo_id` at revisions "main" and `tags` (one commit)."""

    def __init__(self, repo_id: str, folder: Path, tags: tuple[str, ...] = ()) -> None:
        self.repo_id, self.folder, self.revisions = repo_id, folder, {"main", COMMIT, *tags}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> list[str]:
        """The repo files whose bytes were sent (GET), in order."""
        marker = f"/{self.repo_id}/resolve/"
        return [
            path.split(marker, 1)[1].split("/", 1)[1]
            for method, path in self.requests
            if method == "GET" and marker in path
        ]

    def _files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path))
        api = f"/api/models/{self.repo_id}/"
        if path.startswith(api):
            kind, _, rest = path[len(api) :].partition("/")
            revision = rest.split("/", 1)[0]
            if revision not in self.revisions:
                return self._send(handler, 404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
            if kind == "revision":
                siblings = [{"rfilename": p.relative_to(self.folder).as_posix()} for p in self._files()]
                info = {"id": self.repo_id, "modelId": self.repo_id, "sha": COMMIT, "siblings": siblings}
                return self._send(handler, 200, json.dumps(info).encode(), {}, body)
            if kind == "tree":
                tree = [
                    {"type": "file", "path": p.relative_to(self.folder).as_posix(), "size": p.stat().st_size,
                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                    for p in self._files()
                ]  # fmt: skip
                return self._send(handler, 200, json.dumps(tree).encode(), {}, body)
        resolve = f"/{self.repo_id}/resolve/"
        if path.startswith(resolve):
            revision, _, name = path[len(resolve) :].partition("/")
            file = self.folder / name
            if revision not in self.revisions:
                return self._send(handler, 404, b"", {"X-Error-Code": "RevisionNotFound"}, body)
            if not file.is_file():
                return self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
            data = file.read_bytes()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self._send(handler, 200, data, headers, body)
        self._send(handler, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict, body: bool) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
