"""An OpenAI-compatible HTTP server on 127.0.0.1, in a thread: the transport of the offline demo endpoint
(:mod:`kaggle_utils.api.demo_server`) and of the tests' loopback server (``tests/api/loopback.py``).

It speaks ``POST /v1/chat/completions``, answering with ``responder(request)``; more endpoints are added with
:meth:`LocalServer.add_route` (and :meth:`LocalServer.add_pattern_route` for paths holding an id) without touching the
transport. :class:`FineTuneService` adds the files, fine-tuning jobs and models endpoints (a job that succeeds, or
fails with an error, after a scripted number of polls). Every request is recorded (:class:`Received`: path, headers,
JSON body, arrival time), and the server tracks how many were in flight at once.

Usage is counted with ``count_tokens`` (default: whitespace-separated words, so cost accounting can be checked by
hand).

Faults are scripted per request with :meth:`LocalServer.add_faults`: the first queued :class:`Fault` whose ``match``
accepts a request is applied to it (``times`` requests in all), e.g. ``Fault.rate_limited(0.2)``,
``Fault.server_error()``, ``Fault.slow(1.0)``, ``Fault.not_json()``, ``Fault.no_choices()``, ``Fault.empty()``,
``Fault.status_code(400)``, ``Fault.disconnect()``.

Nothing here is a model: what a "model" answers is the ``responder`` the server is given. Keys are not checked (any
``Authorization`` header is accepted); the server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

CHAT_PATH = "/v1/chat/completions"


@dataclass
class Received:
    """One request as the server saw it."""

    method: str
    path: str
    # header names lower-cased
    headers: dict[str, str]
    # the parsed JSON body (None when it was not JSON)
    body: Any
    # time.monotonic() on arrival
    at: float
    # the raw body (a multipart upload to /v1/files is not JSON) and the query string's values
    raw: bytes = b""
    query: dict[str, list[str]] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return (self.body or {}).get("model", "")

    def message(self, role: str) -> str:
        """The content of the last message with ``role`` ("" when there is none)."""
        found = [m.get("content", "") for m in (self.body or {}).get("messages", []) if m.get("role") == role]
        return found[-1] if found else ""


@dataclass
class Reply:
    """What a route answers: status, raw body and headers, after an optional delay."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    # close the connection instead of answering
    drop: bool = False

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class Fault:
    """What the server does to one matching request instead of (or before) its normal answer."""

    # HTTP status; 200 keeps the normal answer unless ``body`` or ``content`` replace it
    status: int = 200
    # extra response headers (e.g. Retry-After)
    headers: dict[str, str] = field(default_factory=dict)
    # a raw body sent instead of the normal one
    body: bytes | None = None
    # a normal completion, but with this message content
    content: str | None = None
    # seconds to wait before answering (longer than the client's timeout: a timeout)
    delay_s: float = 0.0
    # close the connection without answering (the client sees a connection error)
    drop: bool = False
    # which requests it applies to (None: any)
    match: Callable[[Received], bool] | None = None
    # how many requests it applies to
    times: int = 1

    @classmethod
    def rate_limited(cls, retry_after: float | None = None, **kw: Any) -> Fault:
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        body = json.dumps({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}})
        return cls(status=429, headers=headers, body=body.encode(), **kw)

    @classmethod
    def server_error(cls, status: int = 500, **kw: Any) -> Fault:
        return cls.status_code(status, "The server had an error while processing your request.", **kw)

    @classmethod
    def status_code(cls, status: int, message: str = "refused", code: str | None = None, **kw: Any) -> Fault:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}})
        return cls(status=status, body=body.encode(), **kw)

    @classmethod
    def slow(cls, delay_s: float, **kw: Any) -> Fault:
        return cls(delay_s=delay_s, **kw)

    @classmethod
    def disconnect(cls, **kw: Any) -> Fault:
        return cls(drop=True, **kw)

    @classmethod
    def not_json(cls, **kw: Any) -> Fault:
        html = b"<html>502 Bad Gateway (served with status 200)</html>"
        return cls(body=html, headers={"Content-Type": "text/html"}, **kw)

    @classmethod
    def no_choices(cls, **kw: Any) -> Fault:
        return cls(body=json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode(), **kw)

    @classmethod
    def empty(cls, **kw: Any) -> Fault:
        return cls(content="", **kw)


def count_tokens(text: str) -> int:
    """The default token count: whitespace-separated words."""
    return len(text.split())


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


Route = Callable[["LocalServer", Received], Reply]


def chat_completions(server: LocalServer, req: Received) -> Reply:
    """``POST /v1/chat/completions``: one choice from the server's responder, usage from its ``count_tokens``."""
    if not isinstance(req.body, dict) or not req.body.get("messages"):
        return Reply.json(400, {"error": {"message": "messages is required", "type": "invalid_request_error"}})
    return Reply.json(200, completion(req, server.responder(req), server.count_tokens))


def completion(req: Received, content: str, count: Callable[[str], int] = count_tokens) -> dict[str, Any]:
    """A ``chat.completion`` object holding ``content``, its usage counted with ``count``."""
    prompt_tokens = sum(count(m.get("content", "")) for m in req.body["messages"])
    return {
        "id": f"chatcmpl-loop-{text_hash(json.dumps(req.body))}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": count(content),
            "total_tokens": prompt_tokens + count(content),
        },
    }


class LocalServer:
    """The server, as a context manager (``with LocalServer(responder) as server: ... server.base_url ...``) or
    started and stopped by hand (:meth:`start`, :meth:`stop`: a notebook keeps it across cells)."""

    def __init__(
        self, responder: Callable[[Received], str], count: Callable[[str], int] = count_tokens, port: int = 0
    ) -> None:
        self.responder = responder
        # tokens of a text, for the answers' usage
        self.count_tokens = count
        # 0: any free port
        self.port = port
        self.routes: dict[tuple[str, str], Route] = {("POST", CHAT_PATH): chat_completions}
        # routes whose path holds an id (``/v1/files/{id}``): (method, compiled full-match pattern, route)
        self.pattern_routes: list[tuple[str, re.Pattern[str], Route]] = []
        self.received: list[Received] = []
        self.faults: list[Fault] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # --- scripting -------------------------------------------------------------------------------------------
    def add_route(self, method: str, path: str, route: Route) -> None:
        """Serve another endpoint, e.g. ``add_route("POST", "/v1/files", upload)``."""
        self.routes[(method, path)] = route

    def add_pattern_route(self, method: str, pattern: str, route: Route) -> None:
        """Serve paths matching a regex, e.g. ``add_pattern_route("GET", r"/v1/fine_tuning/jobs/[^/]+", job)``."""
        self.pattern_routes.append((method, re.compile(pattern), route))

    def add_faults(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def requests(self, path: str = CHAT_PATH) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    # --- serving ---------------------------------------------------------------------------------------------
    def handle(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> Reply:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        url = urlsplit(target)
        path = url.path
        req = Received(method, path, headers, body, time.monotonic(), raw, parse_qs(url.query))
        with self._lock:
            self.received.append(req)
            fault = self._take_fault(req)
        route = self.routes.get((method, path))
        if route is None:
            route = next((r for m, p, r in self.pattern_routes if m == method and p.fullmatch(path)), None)
        if route is None:
            return Reply.json(404, {"error": {"message": f"no route {method} {path}", "type": "invalid_request_error"}})
        if fault is None:
            return route(self, req)
        return self._apply(fault, req, route)

    def _take_fault(self, req: Received) -> Fault | None:
        for i, fault in enumerate(self.faults):
            if fault.match is None or fault.match(req):
                fault.times -= 1
                if fault.times <= 0:
                    del self.faults[i]
                return fault
        return None

    def _apply(self, fault: Fault, req: Received, route: Route) -> Reply:
        if fault.body is not None:
            reply = Reply(fault.status, fault.body, {"Content-Type": "application/json"})
        elif fault.content is not None:
            reply = Reply.json(fault.status, completion(req, fault.content, self.count_tokens))
        else:
            reply = route(self, req)
        reply.headers.update(fault.headers)
        reply.delay_s += fault.delay_s
        reply.drop = fault.drop
        return reply

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "start the server first (start(), or use it as a context manager)"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> LocalServer:
        """Listen on 127.0.0.1 and serve from a daemon thread; returns the server."""
        self._httpd = _HTTPServer(("127.0.0.1", self.port), _handler_class(self))
        # a short poll interval: shutdown() waits up to one interval, at every test's end
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # a slow-fault handler may still be sleeping when a test ends: do not wait for it
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out has closed its socket; the late write fails, and that is expected here."""


def _handler_class(server: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real server

        def _serve(self) -> None:
            server._enter()
            try:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = server.handle(self.command, self.path, headers, raw)
                time.sleep(reply.delay_s)
                if reply.drop:
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
            finally:
                server._leave()

        do_POST = do_GET = do_DELETE = _serve  # noqa: N815 (http.server's naming)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
            """Quiet: the test output is for assertions."""

    return Handler


# --- files, fine-tuning jobs, models ---------------------------------------------------------------------------------


def multipart_fields(req: Received) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart body: name -> (filename, content)."""
    import email.parser
    import email.policy

    head = f"Content-Type: {req.headers.get('content-type', '')}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + req.raw)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _not_found(what: str) -> Reply:
    return Reply.json(404, {"error": {"message": f"No such {what}", "type": "invalid_request_error", "code": None}})


@dataclass
class FineTuneService:
    """The files, fine-tuning and models endpoints, in memory: ``FineTuneService().install(server)``.

    A job moves one step per ``GET`` of it: validating_files, queued, running (``polls_to_finish - 2`` polls), then
    succeeded with ``ft:<model>:<org>:<suffix>:<n>`` — or failed with ``fail_error`` when that is set. Each change
    adds an event. Uploaded files must be JSONL in chat format (``{"messages": [...]}`` per line), else the job
    fails as OpenAI's validation would. On success ``trainer(model name, training lines)`` runs, if given, and its
    message (what was fitted) becomes an event: that is where a stand-in model learns from the uploaded file.
    """

    polls_to_finish: int = 4
    # {"code": ..., "message": ...}: every job fails with it
    fail_error: dict[str, Any] | None = None
    # the organisation part of fine-tuned model names
    org: str = "loopback"
    # models a job may start from (empty: any); another is refused with 400, as OpenAI refuses a model it cannot tune
    base_models: tuple[str, ...] = ()
    # called when a job succeeds: (fine-tuned model name, the training file's JSON lines) -> an event message
    trainer: Callable[[str, list[dict[str, Any]]], str] | None = None
    # tokens of a text, for ``trained_tokens``
    count_tokens: Callable[[str], int] = count_tokens
    # the event of each poll while the job runs ({n}: the poll; {loss}: 1 / n, a scripted number, not a measurement)
    running_event: str = "Step {n}: training loss={loss:.3f}"
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # fine-tuned models that exist (deleted ones are removed)
    models: set[str] = field(default_factory=set)
    deleted: list[str] = field(default_factory=list)
    _polls: dict[str, int] = field(default_factory=dict)

    def install(self, server: LocalServer) -> FineTuneService:
        server.add_route("POST", "/v1/files", self.upload)
        server.add_pattern_route("DELETE", r"/v1/files/[^/]+", self.delete_file)
        server.add_route("POST", "/v1/fine_tuning/jobs", self.create_job)
        server.add_route("GET", "/v1/fine_tuning/jobs", self.list_jobs)
        server.add_pattern_route("GET", r"/v1/fine_tuning/jobs/[^/]+", self.retrieve_job)
        server.add_pattern_route("GET", r"/v1/fine_tuning/jobs/[^/]+/events", self.list_events)
        server.add_pattern_route("POST", r"/v1/fine_tuning/jobs/[^/]+/cancel", self.cancel_job)
        server.add_pattern_route("DELETE", r"/v1/models/.+", self.delete_model)
        return self

    # --- files ------------------------------------------------------------------------------------------------
    def upload(self, server: LocalServer, req: Received) -> Reply:
        fields = multipart_fields(req)
        if "file" not in fields or "purpose" not in fields:
            return Reply.json(
                400, {"error": {"message": "file and purpose are required", "type": "invalid_request_error"}}
            )
        filename, content = fields["file"]
        file_id = f"file-{self.org}{len(self.files) + 1}"
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": fields["purpose"][1].decode(),
            "status": "processed",
            "content": content,
        }
        return Reply.json(200, {k: v for k, v in self.files[file_id].items() if k != "content"})

    def delete_file(self, server: LocalServer, req: Received) -> Reply:
        file_id = unquote(req.path.rsplit("/", 1)[1])
        if self.files.pop(file_id, None) is None:
            return _not_found(f"file: {file_id}")
        self.deleted.append(file_id)
        return Reply.json(200, {"id": file_id, "object": "file", "deleted": True})

    def file_lines(self, file_id: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.files[file_id]["content"].decode().splitlines() if line.strip()]

    # --- jobs -------------------------------------------------------------------------------------------------
    def create_job(self, server: LocalServer, req: Received) -> Reply:
        body = req.body or {}
        if self.base_models and body.get("model") not in self.base_models:
            message = f"Model {body.get('model')} is not available for fine-tuning; available: {list(self.base_models)}"
            return Reply.json(400, {"error": {"message": message, "type": "invalid_request_error", "code": None}})
        for name in ("training_file", "validation_file"):
            if body.get(name) and body[name] not in self.files:
                return _not_found(f"file: {body[name]}")
        job_id = f"ftjob-{self.org}{len(self.jobs) + 1}"
        self.jobs[job_id] = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": int(time.time()),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
            "method": body.get("method"),
            "model": body.get("model"),
            "organization_id": f"org-{self.org}",
            "result_files": [],
            "seed": body.get("seed") or 0,
            "status": "validating_files",
            "trained_tokens": None,
            "training_file": body.get("training_file"),
            "validation_file": body.get("validation_file"),
            "suffix": body.get("suffix"),
        }
        self._polls[job_id] = 0
        self.events[job_id] = []
        self._event(job_id, f"Validating training file: {body.get('training_file')}")
        return Reply.json(200, self._public(job_id))

    def _public(self, job_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.jobs[job_id].items() if k != "suffix"}

    def _event(self, job_id: str, message: str, level: str = "info") -> None:
        events = self.events[job_id]
        events.append(
            {
                "id": f"ftevent-{job_id}-{len(events) + 1}",
                "object": "fine_tuning.job.event",
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "type": "message",
                "data": {},
            }
        )

    def _advance(self, job_id: str) -> None:
        job = self.jobs[job_id]
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return
        self._polls[job_id] += 1
        n = self._polls[job_id]
        bad = any("messages" not in line for line in self.file_lines(job["training_file"]))
        if bad or (self.fail_error is not None and n >= 2):
            error = {
                "code": "invalid_training_file",
                "message": "Every line needs 'messages'",
                "param": "training_file",
            }
            job.update(
                status="failed", error={"param": None, **(self.fail_error or error)}, finished_at=int(time.time())
            )
            self._event(job_id, f"Job failed: {job['error']['message']}", "error")
        elif n >= self.polls_to_finish:
            model = f"ft:{job['model']}:{self.org}:{job['suffix']}:{job_id.rsplit('-', 1)[1]}"
            lines = self.file_lines(job["training_file"])
            fitted = self.trainer(model, lines) if self.trainer is not None else ""
            self.models.add(model)
            tokens = sum(self.count_tokens(json.dumps(line, ensure_ascii=False)) for line in lines)
            job.update(status="succeeded", fine_tuned_model=model, trained_tokens=tokens, finished_at=int(time.time()))
            if fitted:
                self._event(job_id, fitted)
            self._event(job_id, f"New fine-tuned model created: {model}")
            self._event(job_id, "The job has successfully completed")
        elif n == 1:
            job["status"] = "queued"
            self._event(job_id, "Files validated, moving job to queued state")
        elif job["status"] != "running":
            job["status"] = "running"
            self._event(job_id, "Fine-tuning job started")
        else:
            self._event(job_id, self.running_event.format(n=n, loss=1.0 / n), "info")

    def list_jobs(self, server: LocalServer, req: Received) -> Reply:
        limit = int(req.query.get("limit", ["20"])[0])
        newest_first = [self._public(j) for j in reversed(self.jobs)][:limit]
        return Reply.json(200, {"object": "list", "data": newest_first, "has_more": len(self.jobs) > limit})

    def _job_id(self, req: Received) -> str:
        return unquote(req.path.split("/")[4])

    def retrieve_job(self, server: LocalServer, req: Received) -> Reply:
        job_id = self._job_id(req)
        if job_id not in self.jobs:
            return _not_found(f"job: {job_id}")
        self._advance(job_id)
        return Reply.json(200, self._public(job_id))

    def list_events(self, server: LocalServer, req: Received) -> Reply:
        job_id = self._job_id(req)
        if job_id not in self.jobs:
            return _not_found(f"job: {job_id}")
        limit = int(req.query.get("limit", ["20"])[0])
        newest_first = list(reversed(self.events[job_id]))[:limit]
        return Reply.json(200, {"object": "list", "data": newest_first, "has_more": len(self.events[job_id]) > limit})

    def cancel_job(self, server: LocalServer, req: Received) -> Reply:
        job_id = self._job_id(req)
        if job_id not in self.jobs:
            return _not_found(f"job: {job_id}")
        self.jobs[job_id].update(status="cancelled", finished_at=int(time.time()))
        self._event(job_id, "Job cancelled")
        return Reply.json(200, self._public(job_id))

    # --- models -----------------------------------------------------------------------------------------------
    def delete_model(self, server: LocalServer, req: Received) -> Reply:
        model = unquote(req.path[len("/v1/models/") :])
        if model not in self.models:
            return _not_found(f"model: {model}")
        self.models.discard(model)
        self.deleted.append(model)
        return Reply.json(200, {"id": model, "object": "model", "deleted": True})
