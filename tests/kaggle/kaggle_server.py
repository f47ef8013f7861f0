"""A stand-in for api.kaggle.com on 127.0.0.1, so the real ``kaggle`` CLI can be run end to end in tests.

The CLI sends every call as ``POST /api/v1/<service>/<Method>`` with a JSON body. With
``KAGGLE_API_ENVIRONMENT=LOCALHOST`` it targets ``http://localhost``; ``HTTP_PROXY`` pointing at this server
routes those requests here whatever port it listens on (the proxy request line carries the absolute URL).
Blob uploads are a ``PUT`` to the ``createUrl`` this server hands out from ``StartBlobUpload``.

Every request is recorded (verb, path, JSON body, raw bytes); replies are canned per RPC method name
and can be overridden by a test, e.g. ``server.replies["SaveKernel"] = {"error": "..."}``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Recorded:
    verb: str
    path: str
    # the parsed JSON body of an RPC; None for an upload
    body: Any
    # the raw bytes received (an upload's file content)
    data: bytes

    @property
    def method(self) -> str:
        """The RPC name, e.g. ``SaveKernel`` (last path component)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def default_replies() -> dict[str, Any]:
    """What a healthy Kaggle answers; a status code instead of a dict answers an HTTP error with that code."""
    return {
        "SaveKernel": {"ref": "/code/owner/slug", "url": "http://localhost/code/owner/slug", "versionNumber": 7},
        "StartBlobUpload": {"token": "blob-token-1", "createUrl": "http://localhost/upload/blob-1"},
        "CreateDatasetVersion": {"status": "ok", "url": "http://localhost/datasets/owner/slug", "ref": "owner/slug"},
        "CreateDataset": {"status": "ok", "url": "http://localhost/datasets/owner/slug", "ref": "owner/slug"},
        "GetDatasetStatus": 404,
        "GetKernelSessionStatus": {"status": "COMPLETE"},
        "CreateCodeSubmission": {"message": "Submission successful", "ref": 1},
    }


@dataclass
class FakeKaggle:
    """``with FakeKaggle() as server: ...`` serves in a background thread; ``server.proxy`` is the HTTP_PROXY."""

    replies: dict[str, Any] = field(default_factory=default_replies)
    requests: list[Recorded] = field(default_factory=list)

    def __enter__(self) -> FakeKaggle:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, payload: Any = None) -> None:
                data = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read(self) -> bytes:
                # uploads stream without Content-Length (chunked) when the body is a file reader
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                path = urlsplit(self.path).path
                raw = self._read()
                rec = Recorded("POST", path, json.loads(raw or b"{}"), raw)
                fake.requests.append(rec)
                reply = fake.replies.get(rec.method, {})
                if isinstance(reply, int):
                    why = "not found" if reply == 404 else "internal error"
                    self._reply(reply, {"code": reply, "message": f"{rec.method}: {why}"})
                else:
                    self._reply(200, reply)

            def do_PUT(self) -> None:  # noqa: N802
                raw = self._read()
                fake.requests.append(Recorded("PUT", urlsplit(self.path).path, None, raw))
                self._reply(200, {})

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def calls(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method]
