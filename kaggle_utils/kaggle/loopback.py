"""A stand-in for api.kaggle.com on 127.0.0.1: the real ``kaggle`` CLI run end to end (tests, `make rehearse`).

The CLI sends every call as ``POST /api/v1/<service>/<Method>`` with a JSON body. With
``KAGGLE_API_ENVIRONMENT=LOCALHOST`` it targets ``http://localhost``; ``HTTP_PROXY`` pointing at this server
routes those requests here whatever port it listens on (the proxy request line carries the absolute URL).

* Uploads: ``StartBlobUpload`` hands out one ``createUrl`` and token per file (numbered from 1); the file is then
  a ``PUT`` to that URL. :meth:`FakeKaggle.uploads` pairs each uploaded file's name with its bytes.
* Downloads: ``competitions.CompetitionApiService/DownloadDataFiles`` and
  ``datasets.DatasetApiService/DownloadDataset`` answer the way Kaggle does, with a redirect to a signed storage
  URL; here that is a ``GET`` of a file this server holds in ``files`` (:meth:`FakeKaggle.serve_zip`).

* Kernel runs: ``kernels.KernelsApiService/GetKernelSessionStatus`` (``kaggle kernels status``) answers, for a kernel
  given a script with :meth:`FakeKaggle.script_run`, its next status (the last one repeats), as a run on Kaggle goes
  from QUEUED through RUNNING to COMPLETE or ERROR; any other kernel gets the canned reply (COMPLETE).

Every request is recorded (verb, path, JSON body, raw bytes); replies are canned per RPC method name and can be
overridden by a test, e.g. ``server.replies["SaveKernel"] = {"error": "..."}``. A reply is a dict (200 with that
JSON), an int or an :class:`Error` (that HTTP status with Kaggle's ``{"code", "message"}`` body), or a
:class:`Redirect`.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Fake credentials the fixtures put in the environment: the key must never show up in anything a tool prints.
OWNER = "testuser"
FAKE_KEY = "not-a-real-key"


@dataclass
class Recorded:
    verb: str
    path: str
    # the parsed JSON body of an RPC; None for an upload or a file download
    body: Any
    # the raw bytes received (an upload's file content)
    data: bytes

    @property
    def method(self) -> str:
        """The RPC name, e.g. ``SaveKernel`` (last path component)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def fake_credentials(home: Path, owner: str = OWNER) -> dict[str, str]:
    """Environment variables with fake credentials and a HOME of their own, so no real kaggle.json can be read (the
    caller drops any other KAGGLE_* variable)."""
    return {
        "HOME": str(home),
        "KAGGLE_CONFIG_DIR": str(home / ".kaggle"),
        "KAGGLE_USERNAME": owner,
        "KAGGLE_KEY": FAKE_KEY,
    }


@dataclass(frozen=True)
class Error:
    """An HTTP error with the JSON body Kaggle sends, e.g. ``Error(404, "not found")``."""

    code: int
    message: str


@dataclass(frozen=True)
class Redirect:
    """``302 Found`` to ``http://localhost<path>``: how Kaggle hands out a download (a signed storage URL)."""

    path: str


# What kaggle.com answers a competition download by an account that has not accepted the rules: HTTP 403 with
# this body (quoted in openai/mle-bench issue #29, 2025). kagglesdk turns any JSON body with "code" >= 400 into an
# HTTPError carrying "message"; the CLI prints it, adds its 403 hint, and exits 1.
RULES_NOT_ACCEPTED = Error(403, "You must accept this competition's rules before you'll be able to download files.")


def default_replies() -> dict[str, Any]:
    """What a healthy Kaggle answers; a status code instead of a dict answers an HTTP error with that code.

    Downloads answer 404 until a test serves a file (:meth:`FakeKaggle.serve_zip`).
    """
    return {
        "SaveKernel": {"ref": "/code/owner/slug", "url": "http://localhost/code/owner/slug", "versionNumber": 7},
        "CreateDatasetVersion": {"status": "ok", "url": "http://localhost/datasets/owner/slug", "ref": "owner/slug"},
        "CreateDataset": {"status": "ok", "url": "http://localhost/datasets/owner/slug", "ref": "owner/slug"},
        "GetDatasetStatus": 404,
        "GetDatasetMetadata": {"info": {"licenses": [{"name": "CC0-1.0"}]}},
        "DownloadDataFiles": 404,
        "DownloadDataset": 404,
        "GetKernelSessionStatus": {"status": "COMPLETE"},
        "CreateCodeSubmission": {"message": "Submission successful", "ref": 1},
    }


def zip_bytes(members: Mapping[str, bytes]) -> bytes:
    """A zip archive holding ``members`` (name → content), as Kaggle serves a competition's or dataset's files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class _Server(ThreadingHTTPServer):
    # the FakeKaggle whose replies it answers with
    fake: FakeKaggle


class _Handler(BaseHTTPRequestHandler):
    """One request to the fake: recorded on ``self.server.fake``, answered as its replies say."""

    server: _Server

    def _send(self, code: int, data: bytes, kind: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _reply(self, code: int, payload: Any = None) -> None:
        self._send(code, json.dumps(payload if payload is not None else {}).encode(), "application/json")

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
        reply = self.server.fake.answer(rec)
        if isinstance(reply, int):
            why = "not found" if reply == 404 else "internal error"
            reply = Error(reply, f"{rec.method}: {why}")
        if isinstance(reply, Error):
            self._reply(reply.code, {"code": reply.code, "message": reply.message})
        elif isinstance(reply, Redirect):
            self._send(302, b"", "text/plain", {"Location": f"http://localhost{reply.path}"})
        else:
            self._reply(200, reply)

    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        self.server.fake.record(Recorded("GET", path, None, b""))
        if path in self.server.fake.files:
            self._send(200, self.server.fake.files[path], "application/zip")
        else:
            self._reply(404, {"code": 404, "message": f"no file {path}"})

    def do_PUT(self) -> None:  # noqa: N802
        raw = self._read()
        self.server.fake.record(Recorded("PUT", urlsplit(self.path).path, None, raw))
        self._reply(200, {})

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass


@dataclass
class FakeKaggle:
    """``with FakeKaggle() as server: ...`` serves in a background thread; ``server.proxy`` is the HTTP_PROXY."""

    replies: dict[str, Any] = field(default_factory=default_replies)
    requests: list[Recorded] = field(default_factory=list)
    # what GET serves, by path (the targets of Redirect replies)
    files: dict[str, bytes] = field(default_factory=dict)
    # kernel slug -> the replies of its next GetKernelSessionStatus calls, in order; the last one repeats
    runs: dict[str, list[Any]] = field(default_factory=dict)

    def __enter__(self) -> FakeKaggle:
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        # a short poll interval: shutdown() waits for one, at the end of every test
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def answer(self, rec: Recorded) -> Any:
        """Record an RPC and pick its reply: the canned one, a fresh upload URL, or a scripted run's next status."""
        with self._lock:
            self.requests.append(rec)
            if rec.method == "StartBlobUpload" and rec.method not in self.replies:
                n = len(self.calls("StartBlobUpload"))
                return {"token": f"blob-token-{n}", "createUrl": f"http://localhost/upload/blob-{n}"}
            if rec.method == "GetKernelSessionStatus" and rec.body.get("kernelSlug") in self.runs:
                script = self.runs[rec.body["kernelSlug"]]
                return script.pop(0) if len(script) > 1 else script[0]
            return self.replies.get(rec.method, {})

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def routing(self) -> dict[str, str]:
        """The environment that sends the real CLI here: Kaggle's LOCALHOST target, this server as the HTTP proxy."""
        proxies = {"HTTP_PROXY": self.proxy, "http_proxy": self.proxy, "NO_PROXY": "", "no_proxy": ""}
        return {"KAGGLE_API_ENVIRONMENT": "LOCALHOST"} | proxies

    def calls(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method]

    def serve_zip(self, method: str, name: str, members: Mapping[str, bytes]) -> bytes:
        """Answer the download RPC ``method`` with a redirect to ``/files/<name>``, a zip of ``members``."""
        data = zip_bytes(members)
        self.files[f"/files/{name}"] = data
        self.replies[method] = Redirect(f"/files/{name}")
        return data

    def script_run(self, slug: str, *statuses: str, failure: str = "") -> None:
        """``kaggle kernels status`` of kernel ``slug`` answers ``statuses`` (kagglesdk's KernelWorkerStatus names:
        QUEUED, RUNNING, COMPLETE, ERROR, CANCEL_ACKNOWLEDGED ...) one call after another, the last one from then on,
        with ``failure`` as the run's failure message."""
        replies = [{"status": status} for status in statuses]
        if failure:
            replies[-1]["failureMessage"] = failure
        self.runs[slug] = replies

    def uploads(self) -> dict[str, bytes]:
        """Each uploaded file's name (as given to ``StartBlobUpload``) → the bytes PUT to its upload URL."""
        put = {r.path: r.data for r in self.requests if r.verb == "PUT"}
        starts = self.calls("StartBlobUpload")
        return {r.body["name"]: put[f"/upload/blob-{n}"] for n, r in enumerate(starts, 1) if f"/upload/blob-{n}" in put}
