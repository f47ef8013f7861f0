"""A chat client for long, resumable runs against the OpenAI API, a local vLLM server or any compatible server.

* Transport: the official ``openai`` client with its own retries off (``max_retries=0``): retries happen here, so
  every one is counted. Transient errors (429, 408, 409, 5xx, timeouts, lost connections) back off exponentially
  with jitter and honour ``Retry-After``; a refused key (401/403) or an unknown model (404) stops the run with the
  fix; any other 4xx (a prompt over the context window) fails that request only, without a retry.
* Malformed answers (not JSON, no choices, empty content, or content the caller's ``parse`` rejects) are counted and
  asked again a bounded number of times, then recorded as failed: never a crash, never a silent drop.
* State: each finished request is one JSON line in a :class:`JsonlStore`, keyed by a hash of (tag, model, messages,
  settings). A rerun skips finished keys; a torn last line left by a kill is cut off and that request asked again.
* Secrets: the key is read from the environment variable the config names, handed to the ``openai`` client and
  nowhere else: no config field, repr, record or message holds it (server error texts are scrubbed of it).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
import pandas as pd
from tqdm.auto import tqdm

from kaggle_utils.data import schema

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# What a keyless local server (vLLM started without --api-key) is sent: it ignores the header
NO_KEY = "EMPTY"
# Statuses worth asking again: rate limits, request/lock timeouts, server errors (the openai client's own rule)
TRANSIENT = (408, 409, 429)


class ApiError(RuntimeError):
    """A run cannot go on as configured (key refused, model unknown, quota spent); the message says the fix."""


class Malformed(ValueError):
    """A 200 answer that holds no usable text."""


# the [api] section of every API stage's recipe: where and how it calls, retries and pays (ApiConfig's fields but the
# sampling ones, temperature and max_tokens, which each stage files under its own section)
API_SECTION = (
    "base_url",
    "api_key_env",
    "workers",
    "timeout_s",
    "max_attempts",
    "backoff_base_s",
    "backoff_max_s",
    "malformed_retries",
    "max_consecutive_failures",
    "retry_failed",
    "prices",
    "max_cost_usd",
)


@dataclass
class ApiConfig:
    """Where requests go, how hard to retry, what they may cost; every stage that calls an API takes these fields."""

    # OpenAI-compatible endpoint, up to /v1 (a local vLLM server: http://127.0.0.1:8000/v1)
    base_url: str = DEFAULT_BASE_URL
    # environment variable that holds the API key (empty: a server that needs none); the key itself is never stored
    api_key_env: str = "OPENAI_API_KEY"
    # requests in flight at once (a thread pool)
    workers: int = 8
    # seconds without an answer before a request counts as timed out and is asked again
    timeout_s: float = 120.0
    # tries per request on transient errors (429, 5xx, timeouts, lost connections) before it is recorded as failed
    max_attempts: int = 6
    # first backoff in seconds; doubles per try, times a random factor in [0.5, 1] so workers do not retry in step
    backoff_base_s: float = 1.0
    # longest wait between tries, also the cap on a server's Retry-After
    backoff_max_s: float = 60.0
    # extra tries for a malformed answer (not JSON, no choices, empty or unparseable content) before it fails
    malformed_retries: int = 2
    # stop the run when this many requests in a row have failed (a systematic fault); 0: never stop
    max_consecutive_failures: int = 20
    # a rerun asks again for requests recorded as failed (transient causes clear up); false keeps them as final
    retry_failed: bool = True
    # sampling temperature sent with every request (empty: the server's default, as reasoning models require)
    temperature: float | None = 0.7
    # most tokens per answer (sent as max_completion_tokens)
    max_tokens: int = 1024
    # USD per 1M tokens, model -> [input, output], for the cost estimate (a model not listed: cost unknown)
    prices: dict[str, list[float]] = field(default_factory=dict)
    # stop asking once the estimated spend of this output (earlier runs included) reaches this many USD; 0: no cap
    max_cost_usd: float = 0.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r} must be an http(s) URL ending in /v1")
        for name in ("workers", "max_attempts", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("timeout_s", "backoff_base_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("malformed_retries", "max_consecutive_failures", "max_cost_usd"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more")
        for model, price in self.prices.items():
            if len(price) != 2 or any(not isinstance(p, (int, float)) or p < 0 for p in price):
                raise ValueError(f"prices[{model!r}]={price!r}: expected [USD per 1M input, USD per 1M output tokens]")

    @property
    def settings(self) -> dict[str, Any]:
        """The sampling settings sent with every request (and hashed into its key)."""
        out: dict[str, Any] = {"max_completion_tokens": self.max_tokens}
        if self.temperature is not None:
            out["temperature"] = self.temperature
        return out

    def check_prices(self, models: Iterable[str]) -> None:
        """A spend cap needs a price for every model it may call."""
        missing = [m for m in models if m not in self.prices]
        if self.max_cost_usd > 0 and missing:
            raise ValueError(f"max_cost_usd={self.max_cost_usd} needs prices for {missing}: add them to prices")


@dataclass
class ChatRequest:
    """One chat completion to ask for; ``key`` identifies it across runs."""

    key: str
    model: str
    messages: list[dict[str, str]]
    settings: dict[str, Any]
    # the caller's data kept with the result (prompt id, field, language), not sent
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatResult:
    """One finished request, as stored: an answer, or the reason it failed."""

    key: str
    model: str
    status: str  # "ok" | "failed"
    content: str | None = None
    error: str | None = None
    attempts: int = 0
    # retries by cause: rate_limit, server_error, timeout, connection, malformed
    retries: dict[str, int] = field(default_factory=dict)
    # from the answer's ``usage`` (None: the server sent none)
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatResult:
        return cls(**data)


def request_key(tag: str, model: str, messages: list[dict[str, str]], settings: Mapping[str, Any]) -> str:
    """A stable key: the same tag, model, messages and settings give the same key in every run and process."""
    blob = json.dumps([tag, model, messages, dict(settings)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cost_usd(model: str, input_tokens: int, output_tokens: int, prices: Mapping[str, list[float]]) -> float | None:
    """Estimated USD for one model's tokens from the price table (USD per 1M tokens); None if it has no price."""
    if model not in prices:
        return None
    price_in, price_out = prices[model]
    return (input_tokens * price_in + output_tokens * price_out) / 1e6


def usage_table(results: Iterable[ChatResult], prices: Mapping[str, list[float]]) -> pd.DataFrame:
    """Per model: answers, failures, tokens and estimated cost (NaN where the model has no price), plus a total."""
    rows: dict[str, Counter] = {}
    for r in results:
        row = rows.setdefault(r.model, Counter())
        row["ok" if r.ok else "failed"] += 1
        row["input_tokens"] += r.input_tokens or 0
        row["output_tokens"] += r.output_tokens or 0
    table = pd.DataFrame(
        [{"model": m, **{k: c[k] for k in ("ok", "failed", "input_tokens", "output_tokens")}} for m, c in rows.items()],
        columns=["model", "ok", "failed", "input_tokens", "output_tokens"],
    )
    table["cost_usd"] = [
        cost_usd(m, i, o, prices) for m, i, o in table[["model", "input_tokens", "output_tokens"]].values
    ]
    table["cost_usd"] = table["cost_usd"].astype(float)
    total = {c: table[c].sum() for c in ("ok", "failed", "input_tokens", "output_tokens")}
    # a total cost only when every model has a price (else it would understate)
    total["cost_usd"] = table["cost_usd"].sum(min_count=len(table)) if table["cost_usd"].notna().all() else math.nan
    out = pd.concat([table, pd.DataFrame([{"model": "total", **total}])], ignore_index=True)
    return out.astype({c: "int64" for c in ("ok", "failed", "input_tokens", "output_tokens")})


class JsonlStore:
    """Finished requests, one JSON line each, appended as they finish: the file is the run's resumable state."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # what load() had to leave out: a torn last line (a kill mid-write) and unreadable lines
        self.torn = 0
        self.unreadable = 0

    def load(self) -> dict[str, ChatResult]:
        """Key -> result. An answer is never replaced by a later failure of the same key; otherwise the last wins."""
        if not self.path.is_file():
            return {}
        data = self._cut_torn_tail(self.path.read_bytes())
        results: dict[str, ChatResult] = {}
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                result = ChatResult.from_dict(json.loads(line))
            except (ValueError, TypeError):
                self.unreadable += 1
                continue
            old = results.get(result.key)
            if old is None or result.ok or not old.ok:
                results[result.key] = result
        if self.unreadable:
            print(f"{self.path}: {self.unreadable} unreadable line(s) left out; their requests will be asked again")
        return results

    def _cut_torn_tail(self, data: bytes) -> bytes:
        """A line without its newline was cut by a kill: drop it from the file, so appends start on a new line."""
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.torn += 1
            with open(self.path, "r+b") as f:
                f.truncate(end)
            print(f"{self.path}: dropped a partly written last line (an interrupted run); it will be asked again")
        return data[:end]

    def append(self, result: ChatResult) -> None:
        line = json.dumps(asdict(result), ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)  # one write per line: a kill tears at most the last one


@dataclass
class RunSummary:
    """What one :meth:`ChatClient.run` did."""

    requests: int = 0  # distinct requests it was given
    resumed: int = 0  # already finished in the store, not asked again
    ok: int = 0
    failed: int = 0
    retries: Counter = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    # estimated USD of this run's answers; None once a model without a price answered
    cost_usd: float | None = 0.0
    # why the run stopped before asking everything ("" when it did not)
    stopped: str = ""
    # failures by cause, first words of the error
    failures: Counter = field(default_factory=Counter)

    def add(self, result: ChatResult, prices: Mapping[str, list[float]]) -> None:
        self.ok += result.ok
        self.failed += not result.ok
        self.retries.update(result.retries)
        if not result.ok:
            self.failures[(result.error or "").split(":")[0]] += 1
        self.input_tokens += result.input_tokens or 0
        self.output_tokens += result.output_tokens or 0
        cost = cost_usd(result.model, result.input_tokens or 0, result.output_tokens or 0, prices)
        self.cost_usd = None if cost is None or self.cost_usd is None else self.cost_usd + cost

    def __str__(self) -> str:
        cost = "unknown (a model has no price)" if self.cost_usd is None else f"${self.cost_usd:.4f}"
        lines = [
            f"requests: {self.requests} ({self.resumed} finished earlier, {self.ok + self.failed} asked now)",
            f"answered: {self.ok}   failed: {self.failed} {dict(self.failures) or ''}",
            f"retries: {sum(self.retries.values())} {dict(self.retries) or ''}",
            f"tokens: {self.input_tokens:,} in / {self.output_tokens:,} out   estimated cost: {cost}",
        ]
        return "\n".join(lines + ([f"stopped early: {self.stopped}"] if self.stopped else []))


def api_key(cfg: ApiConfig) -> str:
    """The key from the environment variable ``cfg.api_key_env`` ("" when the config says none is needed)."""
    if not cfg.api_key_env:
        return ""
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise ApiError(
            f"no API key for {cfg.base_url}: the environment variable {cfg.api_key_env} is not set; "
            f'fix: export {cfg.api_key_env}=<your key>, or set api_key_env = "" for a local server that needs none'
        )
    return key


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, ``retry-after`` in seconds or as an HTTP date)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            seconds = email.utils.mktime_tz(parsed) - time.time() if parsed else math.nan
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    return None


def backoff_s(attempt: int, cfg: ApiConfig, retry_after: float | None, rng: random.Random) -> float:
    """Wait before try ``attempt + 1``: the server's Retry-After if given, else exponential; capped, jittered."""
    if retry_after is not None:
        # at least what the server asked (capped), spread a little so the workers do not return together
        return min(retry_after, cfg.backoff_max_s) * rng.uniform(1.0, 1.1)
    return min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0)


def parse_body(text: str) -> tuple[str, dict[str, Any], str | None]:
    """(content, usage, finish_reason) of a chat completion body; :class:`Malformed` when it holds no text."""
    try:
        body = json.loads(text)
    except ValueError:
        raise Malformed(f"not JSON: {text[:80]!r}") from None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise Malformed(f"no choices in the answer: {text[:80]!r}")
    content = (choices[0].get("message") or {}).get("content")
    finish = choices[0].get("finish_reason")
    if not isinstance(content, str) or not content.strip():
        raise Malformed(f"empty content (finish_reason={finish!r}; 'length' means max_tokens ran out)")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return content, usage, finish


class ChatClient:
    """Chat completions with bounded concurrency, retries, token and cost accounting, and a resumable store."""

    def __init__(self, cfg: ApiConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self._key = api_key(cfg)
        self._openai = openai.OpenAI(
            base_url=cfg.base_url, api_key=self._key or NO_KEY, timeout=cfg.timeout_s, max_retries=0
        )
        self._sleep = sleep
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.cfg.base_url!r}, key from ${self.cfg.api_key_env or '(none)'})"

    def request(self, model: str, messages: list[dict[str, str]], tag: str = "", **meta: Any) -> ChatRequest:
        """A request with this client's settings; ``tag`` (e.g. a prompt id) joins the key, ``meta`` is kept."""
        key = request_key(tag, model, messages, self.cfg.settings)
        return ChatRequest(key, model, messages, dict(self.cfg.settings), meta)

    # --- one request -----------------------------------------------------------------------------------------
    def complete(self, req: ChatRequest, parse: Callable[[str], str] | None = None) -> ChatResult:
        """Ask once, retrying transient errors and malformed answers; failures come back as a failed result."""
        retries: Counter = Counter()
        attempt, last = 0, ""
        while attempt < self.cfg.max_attempts:
            attempt += 1
            try:
                return self._attempt(req, parse, attempt, retries)
            except Malformed as err:
                cause, wait_for, last = "malformed", None, f"malformed answer: {err}"
                if retries["malformed"] >= self.cfg.malformed_retries:
                    break
            except openai.APIStatusError as err:
                cause, last = self._status_cause(err, req)
                if cause == "refused":
                    return self._failed(req, attempt, retries, last)
                wait_for = retry_after_s(err.response.headers)
            except openai.APIConnectionError as err:  # APITimeoutError is a subclass
                timeout = isinstance(err, openai.APITimeoutError)
                cause, wait_for = ("timeout" if timeout else "connection"), None
                last = f"{cause}: no answer from {self.cfg.base_url} within {self.cfg.timeout_s:g}s ({err})"
            if attempt < self.cfg.max_attempts:
                retries[cause] += 1
                self._sleep(backoff_s(attempt, self.cfg, wait_for, self._rng))
        return self._failed(req, attempt, retries, f"{last} (gave up after {attempt} tries)")

    def _attempt(
        self, req: ChatRequest, parse: Callable[[str], str] | None, attempt: int, retries: Counter
    ) -> ChatResult:
        raw = self._openai.chat.completions.with_raw_response.create(
            model=req.model, messages=req.messages, **req.settings
        )
        content, usage, finish = parse_body(raw.text)
        if parse is not None:
            try:
                content = parse(content)
            except ValueError as err:
                raise Malformed(f"unparseable content: {err}") from None
        return ChatResult(
            req.key, req.model, "ok", content, None, attempt, dict(retries),
            usage.get("prompt_tokens"), usage.get("completion_tokens"), finish, req.meta,
        )  # fmt: skip

    def _status_cause(self, err: openai.APIStatusError, req: ChatRequest) -> tuple[str, str]:
        """(cause, message) of an HTTP error; raises :class:`ApiError` when no request of the run can succeed."""
        status, text = err.status_code, self._scrub(str(err.message))
        where = f"model {req.model!r} at {self.cfg.base_url}"
        if status in (401, 403):
            raise ApiError(
                f"HTTP {status} from {where}: the key was refused ({text}); fix: put a valid key in "
                f"${self.cfg.api_key_env or '(api_key_env is empty)'}, or check the project's access to this model"
            ) from None
        if status == 404:
            raise ApiError(
                f"HTTP 404 from {where}: no such model or endpoint ({text}); fix: correct the model name in the "
                f"recipe (a vLLM server serves its --served-model-name) and check that base_url ends in /v1"
            ) from None
        if status == 429 and err.code == "insufficient_quota":
            raise ApiError(
                f"HTTP 429 from {where}: quota spent ({text}); fix: add credit or raise the usage limit"
            ) from None
        if status == 429:
            return "rate_limit", f"rate limited by {where} ({text})"
        if status >= 500 or status in TRANSIENT:
            return "server_error", f"HTTP {status} from {where} ({text})"
        return "refused", (
            f"HTTP {status} from {where}, not retried ({text}); fix: check the request settings for this model "
            "(max_tokens, temperature), or shorten the prompt if it exceeds the context window"
        )

    def _scrub(self, text: str) -> str:
        """Server messages may quote the key (401 bodies do): never let it reach a record, a log or an error."""
        return text.replace(self._key, "***") if self._key else text

    def _failed(self, req: ChatRequest, attempt: int, retries: Counter, error: str) -> ChatResult:
        return ChatResult(req.key, req.model, "failed", None, self._scrub(error), attempt, dict(retries), meta=req.meta)

    # --- many requests ---------------------------------------------------------------------------------------
    def run(
        self,
        requests: Iterable[ChatRequest],
        store: JsonlStore,
        parse: Callable[[str], str] | None = None,
        desc: str = "requests",
        after_each: Callable[[ChatResult], None] | None = None,
    ) -> RunSummary:
        """Ask every request not finished in ``store``, ``cfg.workers`` at a time; each result is appended as it comes.

        ``after_each`` runs after each result is stored (tests raise from it to simulate a kill). On any exception
        (Ctrl-C, :class:`ApiError`) the requests not started are dropped and those in flight are waited for and
        stored — they are paid for — before it propagates.
        """
        done = store.load()
        todo, summary = self._todo(requests, done)
        print(
            f"{desc}: {summary.requests} requests, {summary.resumed} finished earlier in {store.path}, "
            f"{len(todo)} to ask, {self.cfg.workers} at a time"
        )
        spent = self._spent(done.values())
        state = {"in_a_row": 0}
        with (
            ThreadPoolExecutor(self.cfg.workers) as pool,
            tqdm(total=len(todo), desc=desc, unit="req", mininterval=1.0) as bar,
        ):
            futures = {pool.submit(self.complete, req, parse): req for req in todo}
            stored: set[Future] = set()
            try:
                for fut in as_completed(futures):
                    result = fut.result()
                    self._store(result, store, summary)
                    stored.add(fut)
                    bar.update()
                    bar.set_postfix(failed=summary.failed, retries=sum(summary.retries.values()))
                    if after_each is not None:
                        after_each(result)
                    summary.stopped = self._should_stop(result, summary, spent, state)
                    if summary.stopped:
                        self._drain(futures, stored, store, summary)
                        break
            except BaseException:
                self._drain(futures, stored, store, summary)
                raise
        if state.get("error"):
            raise ApiError(state["error"])
        return summary

    def _todo(
        self, requests: Iterable[ChatRequest], done: Mapping[str, ChatResult]
    ) -> tuple[list[ChatRequest], RunSummary]:
        """Distinct requests not yet finished (a failed one counts as unfinished when ``retry_failed``)."""
        todo, seen, summary = [], set(), RunSummary()
        for req in requests:
            if req.key in seen:
                continue
            seen.add(req.key)
            old = done.get(req.key)
            if old is None or (not old.ok and self.cfg.retry_failed):
                todo.append(req)
        summary.requests, summary.resumed = len(seen), len(seen) - len(todo)
        return todo, summary

    def _spent(self, done: Iterable[ChatResult]) -> float:
        """Estimated USD already spent on the store's answers (for the spend cap)."""
        costs = [cost_usd(r.model, r.input_tokens or 0, r.output_tokens or 0, self.cfg.prices) for r in done]
        return sum(c for c in costs if c is not None)

    def _store(self, result: ChatResult, store: JsonlStore, summary: RunSummary) -> None:
        store.append(result)
        summary.add(result, self.cfg.prices)

    def _should_stop(self, result: ChatResult, summary: RunSummary, spent: float, state: dict[str, Any]) -> str:
        """Why to stop now ("" to go on): the spend cap is reached, or failures in a row point to a systematic fault."""
        state["in_a_row"] = 0 if result.ok else state["in_a_row"] + 1
        limit = self.cfg.max_consecutive_failures
        if limit and state["in_a_row"] >= limit:
            state["error"] = (
                f"{limit} requests in a row failed; the last: {result.error}; fix the cause and rerun "
                f"(finished requests are kept in the store), or raise max_consecutive_failures"
            )
            return f"{limit} failures in a row"
        total = spent + (summary.cost_usd or 0.0)
        if self.cfg.max_cost_usd and total >= self.cfg.max_cost_usd:
            return (
                f"estimated spend ${total:.4f} reached max_cost_usd={self.cfg.max_cost_usd:g}; rerun with a larger "
                f"--max-cost-usd to go on (finished requests are kept)"
            )
        return ""

    def _drain(
        self, futures: Mapping[Future, ChatRequest], stored: set[Future], store: JsonlStore, summary: RunSummary
    ) -> None:
        """Drop requests not started; wait for those in flight and store what they return."""
        for fut in futures:
            fut.cancel()
        running = [f for f in futures if not f.cancelled() and f not in stored]
        if running:
            print(f"stopping: waiting for {len(running)} request(s) in flight (they are paid for and kept)")
        for fut in running:
            try:
                result = fut.result()
            except Exception:  # an ApiError of another worker: the first one is already on its way up
                continue
            self._store(result, store, summary)
            stored.add(fut)


@dataclass
class StageResult:
    """What an API stage returns: its output frame, the run's summary, usage per model and stage counts."""

    frame: pd.DataFrame
    run: RunSummary
    # per model over every answer the output drew on (earlier runs included): see :func:`usage_table`
    usage: pd.DataFrame
    # the stage's own counts (pairs formed, rows left out, ...)
    counts: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        counts = "\n".join(f"{k}: {v}" for k, v in self.counts.items())
        return f"{self.run}\n{counts}\n\n{self.usage.to_string(index=False)}"

    @classmethod
    def written(
        cls,
        frame: pd.DataFrame,
        kind: str,
        out_file: Path,
        run: RunSummary,
        results: Iterable[ChatResult],
        prices: Mapping[str, list[float]],
        counts: dict[str, int],
    ) -> StageResult:
        """The stage's output checked against the ``kind`` schema (a bad frame is never written), written to
        ``out_file``, with the run's usage per model."""
        schema.validate(frame, kind, source=f"{out_file.name} (before writing)")
        out_file.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(out_file, index=False)
        return cls(frame, run, usage_table(results, prices), counts)
