"""An offline OpenAI-compatible endpoint with STAND-IN judge models, so the demo runs the judge and few-shot stages
through the real ``openai`` client with no network, no key and no cost.

Nothing here is a language model. The "models" are transparent rules over the demo data's learnable signal
(:mod:`kaggle_utils.data.demo`: the good response opens with a structured lead, ``## Answer`` / ``**Answer:**`` /
``1.``; the flawed one opens with a refusal or filler phrase; the good one is ~20% longer on average), named as
stand-ins, with their behaviour stated here so every number they produce can be checked by hand:

* ``demo-judge`` (:data:`BASE_MODEL`), the base model. It reads the pair from the judge's user message
  (``inputs.formatter.CHAT_USER``) and decides with an :class:`OpeningTable`: per *opening* (the response's text up to
  its first sentence stop, colon or line break, :func:`opening`), how often a response that opened so won or lost in
  the examples it has. The response whose opening has the higher smoothed win rate wins; when both are unseen or equal
  the longer response wins (on the demo data that rule is right ~57% of the time: lognormal lengths with sigma 0.6 and
  a 1.2x mean ratio, under 10% label noise). Its examples are the labelled turns in its own prompt: with no shots it
  is the length rule, with k shots it learns the openings those shots show (in-context learning, for
  :mod:`kaggle_utils.api.fewshot`).
* ``ft:demo-judge:demo:<suffix>:<id>``, what a fine-tuning job makes: the same judge with the table fitted on every
  example of the uploaded training JSONL (:class:`FineTuneService`'s ``trainer``). It knows every opening the training
  rows show, so it reaches about the demo data's ceiling (1 - label_noise, ~0.9).
* A stated share of answers is not a letter ("Both answers have their merits."): :data:`INVALID_RATE` per model
  kind, chosen by a hash of (model, messages), so a rerun gives the same answers. The judge and few-shot stages must
  count them invalid, never drop them.
* Usage is ``ceil(chars / 4)`` tokens per text (the judge stage's own approximation,
  :data:`kaggle_utils.api.tokens.APPROX_CHARS_PER_TOKEN`); the demo recipes price those tokens at gpt-4o-mini's list
  prices, to show what the same run would cost there.

Any other model name is a 404 ``model_not_found``; a fine-tuning job may start only from ``demo-judge``. Keys are not
checked (any key is accepted) and the server listens on 127.0.0.1 only. State (uploaded files, jobs, fine-tuned
models) lives in memory and ends with the process.

In Python: ``with DemoEndpoint() as endpoint: ... endpoint.base_url ...`` (or ``endpoint = DemoEndpoint().start()``
and ``endpoint.stop()``). From a shell, for the demo-judge and demo-fewshot recipes::

    python -m kaggle_utils.api.demo_server --port 8765
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kaggle_utils.api.judge import parse_choice
from kaggle_utils.api.local_server import (
    CHAT_PATH,
    FineTuneService,
    LocalServer,
    Received,
    Reply,
    chat_completions,
)
from kaggle_utils.api.tokens import APPROX_CHARS_PER_TOKEN
from kaggle_utils.inputs.formatter import CHAT_USER

# The base model's name; fine-tuned ones are ``ft:demo-judge:demo:<suffix>:<id>``.
BASE_MODEL = "demo-judge"
ORG = "demo"
# Share of answers that are not a letter, per model kind: a base model strays from the format more than a model
# fine-tuned on one-letter answers.
INVALID_RATE = {"base": 0.04, "fine-tuned": 0.01}
INVALID_ANSWER = "Both answers have their merits."
# An opening ends at the first sentence stop, colon or line break (Latin and CJK punctuation); at most this long.
_OPENING = re.compile(r"[^\n.。?？!！:：]*[.。?？!！:：]?")
OPENING_MAX_CHARS = 80
DEFAULT_PORT = 8765


def _pair_pattern() -> re.Pattern[str]:
    """The two responses of a judge user message, from the formatter's template itself (no second copy of it)."""
    before_a, rest = CHAT_USER.split("{response_a}")
    between, after_b = rest.split("{response_b}")
    lead = before_a.split("{prompt}")[1]
    return re.compile(re.escape(lead) + "(.*?)" + re.escape(between) + "(.*)" + re.escape(after_b) + r"\Z", re.DOTALL)


PAIR = _pair_pattern()


def read_pair(user_message: str) -> tuple[str, str] | None:
    """(response A, response B) of a judge user message; None when the message is not one."""
    found = PAIR.search(user_message)
    return (found.group(1), found.group(2)) if found else None


def opening(text: str) -> str:
    """The response's first words up to its first sentence stop, colon or line break: ``## Answer``, ``**Answer:``,
    ``1.``, ``I'm sorry, but I cannot help with that.``."""
    return _OPENING.match(text.strip()).group(0)[:OPENING_MAX_CHARS]


Example = tuple[str, str, str]  # (response A, response B, "A" | "B")


@dataclass
class OpeningTable:
    """How often a response with each opening won and lost in the examples seen; decides a pair by them."""

    # opening -> [wins, losses]
    counts: dict[str, list[int]] = field(default_factory=dict)
    examples: int = 0

    @classmethod
    def fit(cls, examples: Iterable[Example]) -> OpeningTable:
        table = cls()
        for a, b, letter in examples:
            winner, loser = (a, b) if letter == "A" else (b, a)
            table.counts.setdefault(opening(winner), [0, 0])[0] += 1
            table.counts.setdefault(opening(loser), [0, 0])[1] += 1
            table.examples += 1
        return table

    def merged(self, other: OpeningTable) -> OpeningTable:
        counts = {k: list(v) for k, v in self.counts.items()}
        for k, (w, lost) in other.counts.items():
            counts.setdefault(k, [0, 0])
            counts[k][0] += w
            counts[k][1] += lost
        return OpeningTable(counts, self.examples + other.examples)

    def win_rate(self, text: str) -> float:
        """Laplace-smoothed share of wins of this response's opening (0.5 when never seen)."""
        wins, losses = self.counts.get(opening(text), (0, 0))
        return (wins + 1) / (wins + losses + 2)

    def choose(self, a: str, b: str) -> str:
        """ "A" or "B": the better-known opening; when that does not decide, the longer response."""
        ra, rb = self.win_rate(a), self.win_rate(b)
        if ra != rb:
            return "A" if ra > rb else "B"
        return "A" if len(a) >= len(b) else "B"


def examples_in(messages: Sequence[dict[str, Any]]) -> list[Example]:
    """The labelled turns of a conversation: each user turn holding a pair, answered by the next assistant turn with
    one letter (few-shot examples; in a training file, the example itself)."""
    out = []
    for turn, reply in zip(messages, messages[1:], strict=False):
        if turn.get("role") != "user" or reply.get("role") != "assistant":
            continue
        pair, letter = read_pair(turn.get("content") or ""), parse_choice(reply.get("content"))
        if pair and letter:
            out.append((*pair, letter))
    return out


def approx_tokens(text: str) -> int:
    return math.ceil(len(text) / APPROX_CHARS_PER_TOKEN)


def unit_hash(*parts: Any) -> float:
    """A number in [0, 1) fixed by ``parts``: which answers stray from the format, the same in every run."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return int(digest[:12], 16) / 16**12


class DemoEndpoint:
    """The stand-in endpoint: chat completions from the opening-table judges, files, fine-tuning jobs, models."""

    def __init__(self, port: int = 0, polls_to_finish: int = 4) -> None:
        # fine-tuned model -> the table fitted on its training file
        self.fitted: dict[str, OpeningTable] = {}
        self._lock = threading.Lock()
        self.server = LocalServer(self.answer, count=approx_tokens, port=port)
        self.server.add_route("POST", CHAT_PATH, self.chat)
        self.service = FineTuneService(
            polls_to_finish=polls_to_finish,
            org=ORG,
            base_models=(BASE_MODEL,),
            trainer=self.fine_tune,
            count_tokens=approx_tokens,
            # nothing trains while the job "runs": say so rather than show a loss
            running_event="Running (poll {n}); the stand-in fits its opening table when the job completes",
        ).install(self.server)

    # --- models --------------------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The models that answer now: the base model and the fine-tuned ones not deleted."""
        return [BASE_MODEL, *sorted(self.service.models)]

    def fine_tune(self, model: str, lines: list[dict[str, Any]]) -> str:
        """The job's "training": the opening table of every example in the uploaded file."""
        table = OpeningTable.fit(ex for line in lines for ex in examples_in(line.get("messages", [])))
        with self._lock:
            self.fitted[model] = table
        return f"Fitted the opening table on {table.examples} examples ({len(table.counts)} openings)"

    def answer(self, req: Received) -> str:
        """The judge's reply to one request (the model is known: :meth:`chat` checked it)."""
        messages = req.body["messages"]
        with self._lock:
            fitted = self.fitted.get(req.model)
        kind = "fine-tuned" if fitted is not None else "base"
        if unit_hash(req.model, messages) < INVALID_RATE[kind]:
            return INVALID_ANSWER
        pair = read_pair(req.message("user"))
        if pair is None:
            return "Please show me two answers to compare."
        # the question is the last user turn: the labelled turns before it are the shots
        shots = OpeningTable.fit(examples_in(messages))
        table = shots if fitted is None else fitted.merged(shots)
        return table.choose(*pair)

    def chat(self, server: LocalServer, req: Received) -> Reply:
        if isinstance(req.body, dict) and req.model not in self.models():
            message = f"The model `{req.model}` does not exist or you do not have access to it."
            error = {"message": message, "type": "invalid_request_error", "code": "model_not_found"}
            return Reply.json(404, {"error": error})
        return chat_completions(server, req)

    # --- serving -------------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.server.base_url

    def start(self) -> DemoEndpoint:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> DemoEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kaggle_utils.api.demo_server",
        description="Serve the stand-in judge models (demo-judge and its fine-tunes) on 127.0.0.1 until interrupted.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (the demo recipes' base_url uses 8765)")
    args = parser.parse_args(argv)
    endpoint = DemoEndpoint(port=args.port).start()
    print(
        f"demo endpoint (stand-in models, no network) at {endpoint.base_url}; models: {endpoint.models()}", flush=True
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        endpoint.stop()


if __name__ == "__main__":
    main()
