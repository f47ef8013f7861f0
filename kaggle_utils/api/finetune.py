"""The fine-tuning API through the official ``openai`` client: files, jobs, events and models, with the chat
client's retry rules, the key scrubbed from every message, and the job's ids kept in a state file the moment they
exist (a restarted run uploads nothing twice and never makes a second job)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai

from kaggle_utils.api.client import NO_KEY, TRANSIENT, ApiConfig, ApiError, Malformed, api_key, backoff_s, retry_after_s
from kaggle_utils.store import write_text_atomic

# Job states after which nothing changes.
TERMINAL = ("succeeded", "failed", "cancelled")


class JobFailed(ApiError):
    """The fine-tuning job ended failed or cancelled; the message holds the job's own error."""


class Refused(ApiError):
    """A request the server refused for good (not worth a retry); ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class JobState:
    """``<work_dir>/state.json``: written after every step, read by every action."""

    files: dict[str, str] = field(default_factory=dict)  # "train"/"valid" -> uploaded file id
    job_id: str = ""
    status: str = ""
    fine_tuned_model: str = ""
    error: str = ""
    # ids of the job events already printed
    events_seen: list[str] = field(default_factory=list)
    # what cleanup deleted (file ids, model names)
    deleted: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> JobState:
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")  # the old state or the new one


class FineTuneClient:
    """The ``openai`` client for files, jobs and models, with the chat client's retry rules and the key scrubbed."""

    def __init__(self, cfg: ApiConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self._key = api_key(cfg)
        self.openai = openai.OpenAI(
            base_url=cfg.base_url, api_key=self._key or NO_KEY, timeout=cfg.timeout_s, max_retries=0
        )
        self._sleep = sleep
        self._rng = random.Random()
        # retries by cause, over every call
        self.retries: Counter = Counter()

    def __repr__(self) -> str:
        return f"FineTuneClient(base_url={self.cfg.base_url!r}, key from ${self.cfg.api_key_env or '(none)'})"

    def scrub(self, text: str) -> str:
        """Server texts may quote the key: never let it reach the state file, a log or an error."""
        return text.replace(self._key, "***") if self._key else text

    def call(
        self, what: str, fn: Callable[..., Any], *args: Any, valid: Callable[[Any], bool] | None = None, **kwargs: Any
    ) -> Any:
        """``fn(*args, **kwargs)``, retrying 429/5xx/timeouts with backoff and malformed answers a bounded number of
        times (``malformed_retries``); :class:`ApiError` when it cannot work. ``valid`` checks the parsed answer."""
        malformed = 0
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                result = fn(*args, **kwargs)
                if valid is not None and not valid(result):
                    raise Malformed(f"unexpected answer: {str(result)[:120]}")
                return result
            except openai.APIStatusError as err:
                status, text = err.status_code, self.scrub(str(err.message))
                if status in (401, 403):
                    raise ApiError(
                        f"HTTP {status} on {what}: the key was refused ({text}); fix: put a valid key in "
                        f"${self.cfg.api_key_env or '(api_key_env is empty)'}"
                    ) from None
                if status == 429 and err.code == "insufficient_quota":
                    raise ApiError(f"HTTP 429 on {what}: quota spent ({text}); fix: add credit") from None
                if not (status == 429 or status >= 500 or status in TRANSIENT):
                    raise Refused(f"HTTP {status} on {what}, not retried: {text}", status) from None
                cause, wait = ("rate_limit" if status == 429 else "server_error"), retry_after_s(err.response.headers)
                last = f"HTTP {status} ({text})"
            except openai.APIConnectionError as err:
                cause, wait = ("timeout" if isinstance(err, openai.APITimeoutError) else "connection"), None
                last = f"{cause} ({self.scrub(str(err))})"
            except (Malformed, openai.APIResponseValidationError, AttributeError, TypeError, ValueError) as err:
                # a 200 that is not the expected JSON: the openai client fails inside its parser, or returns an
                # object whose fields are None
                cause, wait = "malformed", None
                last = f"malformed answer ({type(err).__name__}: {self.scrub(str(err))[:160]})"
                malformed += 1
                if malformed > self.cfg.malformed_retries:
                    break
            if attempt < self.cfg.max_attempts:
                self.retries[cause] += 1
                self._sleep(backoff_s(attempt, self.cfg, wait, self._rng))
        raise ApiError(f"{what}: gave up after {attempt} tries; last: {last}")

    def upload(self, path: Path) -> str:
        with open(path, "rb") as f:
            # read once: a retried upload must send the whole file again, not the rest of a consumed stream
            content = f.read()
        file = self.call(
            f"upload {path.name}", self.openai.files.create, file=(path.name, content), purpose="fine-tune"
        )
        return file.id

    def create_job(
        self, train_id: str, valid_id: str, base_model: str, n_epochs: int, *, suffix: str, seed: int
    ) -> Any:
        """Create the job, or adopt the one these files already have.

        Creation is not idempotent: a timeout or a 5xx may come after the server made the job, and a kill may come
        before its id was saved. So every try first looks for a live job on the same uploaded training file (file
        ids are unique per upload): a retry or a restart never makes a second job.
        """

        def create() -> Any:
            existing = self.find_job(train_id, valid_id)
            if existing is not None:
                print(f"job {existing.id} already exists for {train_id}: adopting it")
                return existing
            return self.openai.fine_tuning.jobs.create(
                model=base_model,
                training_file=train_id,
                validation_file=valid_id,
                suffix=suffix,
                seed=seed,
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": n_epochs}}},
            )

        return self.call("create the fine-tuning job", create, valid=_is_job)

    def find_job(self, train_id: str, valid_id: str) -> Any:
        """The newest job not failed or cancelled on these files, or None (the 50 newest jobs are searched)."""
        for job in self.openai.fine_tuning.jobs.list(limit=50).data:
            if job.training_file == train_id and job.validation_file == valid_id and job.status not in TERMINAL[1:]:
                return job
        return None

    def job(self, job_id: str) -> Any:
        return self.call(f"retrieve job {job_id}", self.openai.fine_tuning.jobs.retrieve, job_id, valid=_is_job)

    def events(self, job_id: str, limit: int = 50) -> list[Any]:
        """The job's latest events, oldest first (the API lists newest first)."""
        page = self.call(
            f"list events of {job_id}",
            self.openai.fine_tuning.jobs.list_events,
            job_id,
            limit=limit,
            valid=lambda p: isinstance(p.data, list) and all(isinstance(e.id, str) for e in p.data),
        )
        return list(reversed(page.data))

    def cancel(self, job_id: str) -> Any:
        return self.call(f"cancel job {job_id}", self.openai.fine_tuning.jobs.cancel, job_id, valid=_is_job)

    def delete(self, kind: str, name: str) -> bool:
        """Delete a file ("file") or a model ("model"); False when the server no longer has it."""
        fn = self.openai.files.delete if kind == "file" else self.openai.models.delete
        try:
            return self.call(f"delete {kind} {name}", fn, name, valid=lambda d: isinstance(d.deleted, bool)).deleted
        except Refused as err:
            if err.status == 404:
                return False
            raise


def _is_job(job: Any) -> bool:
    return isinstance(getattr(job, "id", None), str) and isinstance(getattr(job, "status", None), str)


def job_error(job: Any) -> str:
    err = getattr(job, "error", None)
    if err is None:
        return f"job {job.id} ended {job.status} without an error message"
    return f"job {job.id} {job.status}: {err.code or 'error'}: {err.message}" + (
        f" (param {err.param})" if err.param else ""
    )
