"""A stand-in for an OpenAI-compatible server on 127.0.0.1, so the API layer is tested with the real ``openai`` client.

It speaks ``POST /v1/chat/completions``; more endpoints (``/v1/files``, ``/v1/fine_tuning/jobs``) are added with
:meth:`LoopbackServer.add_route` without touching the transport. Every request is recorded (:class:`Received`:
path, headers, JSON body, arrival time), and the server tracks how many were in flight at once.

Answers are deterministic functions of the request, so tests can check outputs:

* :func:`answering` (the default): ``"answer of <model> to <sha1(prompt)[:8]>"``;
* :func:`translating`: ``"<translation>[<language>] <text></translation>"``, the language read from the system
  message's ``into <language>.``

Usage is counted as whitespace-separated words (:func:`count_tokens`), so cost accounting can be checked by hand.

Faults are scripted per request with :meth:`LoopbackServer.add_faults`: the first queued :class:`Fault` whose
``match`` accepts a request is applied to it (``times`` requests in all), e.g. ``Fault.rate_limited(0.2)``,
``Fault.server_error()``, ``Fault.slow(1.0)``, ``Fault.not_json()``, ``Fault.no_choices()``, ``Fault.empty()``,
``Fault.status_code(400)``, ``Fault.disconnect()``.
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
from urllib.parse import parse_qs, urlsplit

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
    """The loopback's token count: whitespace-separated words."""
    return len(text.split())


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def answering(req: Received) -> str:
    """A model's "answer": names the model and the prompt, so tests can tell who answered what."""
    return f"answer of {req.model} to {text_hash(req.message('user'))}"


def translating(req: Received) -> str:
    """A "translation" tagged with the target language named in the system message (``... into <language>.``)."""
    found = re.search(r"into ([^.\n]+)\.", req.message("system"))
    language = found.group(1) if found else "?"
    return f"<translation>[{language}] {req.message('user')}</translation>"


Route = Callable[["LoopbackServer", Received], Reply]


def chat_completions(server: LoopbackServer, req: Received) -> Reply:
    """``POST /v1/chat/completions``: one choice from the server's responder, usage counted in words."""
    if not isinstance(req.body, dict) or not req.body.get("messages"):
        return Reply.json(400, {"error": {"message": "messages is required", "type": "invalid_request_error"}})
    return Reply.json(200, completion(req, server.responder(req)))


def completion(req: Received, content: str) -> dict[str, Any]:
    prompt_tokens = sum(count_tokens(m.get("content", "")) for m in req.body["messages"])
    return {
        "id": f"chatcmpl-loop-{text_hash(json.dumps(req.body))}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": count_tokens(content),
            "total_tokens": prompt_tokens + count_tokens(content),
        },
    }


class LoopbackServer:
    """The server, as a context manager: ``with LoopbackServer() as server: ... server.base_url ...``."""

    def __init__(self, responder: Callable[[Received], str] = answering) -> None:
        self.responder = responder
        self.routes: dict[tuple[str, str], Route] = {("POST", CHAT_PATH): chat_completions}
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
            reply = Reply.json(fault.status, completion(req, fault.content))
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
        assert self._httpd is not None, "use the server as a context manager"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> LoopbackServer:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _handler_class(self))
        # a short poll interval: shutdown() waits up to one interval, at every test's end
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # a slow-fault handler may still be sleeping when a test ends: do not wait for it
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out has closed its socket; the late write fails, and that is expected here."""


def _handler_class(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
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


def client_settings(server: LoopbackServer, **overrides: Any) -> dict[str, Any]:
    """Settings for :class:`kaggle_utils.api.client.ApiConfig` that keep a test fast: tiny timeouts and backoff."""
    return {
        "base_url": server.base_url,
        "api_key_env": "",
        "workers": 4,
        "timeout_s": 2.0,
        "max_attempts": 4,
        "backoff_base_s": 0.001,
        "backoff_max_s": 0.01,
        "malformed_retries": 2,
        **overrides,
    }
