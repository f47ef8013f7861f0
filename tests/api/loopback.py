"""The tests' loopback server: the package's OpenAI-compatible :class:`~kaggle_utils.api.local_server.LocalServer`
with deterministic answers, so the API layer is tested with the real ``openai`` client.

The transport, the fault scripting (:class:`Fault`) and the files / fine-tuning / models endpoints
(:class:`FineTuneService`) live in :mod:`kaggle_utils.api.local_server` (the offline demo endpoint uses them too);
this module adds what only tests need. Answers are deterministic functions of the request, so tests can check
outputs:

* :func:`answering` (the default): ``"answer of <model> to <sha1(prompt)[:8]>"``;
* :func:`translating`: ``"<translation>[<language>] <text></translation>"``, the language read from the system
  message's ``into <language>.``;
* :func:`judging`: a fine-tuned model (``ft:...``) picks the longer response, any other the shorter.

Usage is counted as whitespace-separated words (:func:`count_tokens`), so cost accounting can be checked by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from kaggle_utils.api.local_server import (  # noqa: F401 - re-exported for the tests
    CHAT_PATH,
    Fault,
    FineTuneService,
    LocalServer,
    Received,
    Reply,
    chat_completions,
    completion,
    count_tokens,
    multipart_fields,
    text_hash,
)


def answering(req: Received) -> str:
    """A model's "answer": names the model and the prompt, so tests can tell who answered what."""
    return f"answer of {req.model} to {text_hash(req.message('user'))}"


def translating(req: Received) -> str:
    """A "translation" tagged with the target language named in the system message (``... into <language>.``)."""
    found = re.search(r"into ([^.\n]+)\.", req.message("system"))
    language = found.group(1) if found else "?"
    return f"<translation>[{language}] {req.message('user')}</translation>"


class LoopbackServer(LocalServer):
    """The server, as a context manager: ``with LoopbackServer() as server: ... server.base_url ...``."""

    def __init__(self, responder: Callable[[Received], str] = answering) -> None:
        super().__init__(responder)


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


# --- fine-tuning judges ---------------------------------------------------------------------------------------------


def judging(req: Received) -> str:
    """A judge's "answer": a fine-tuned model (``ft:...``) picks the longer response, any other the shorter."""
    user = req.message("user")
    found = re.search(
        r"Assistant A's Answer\]\n(.*)\n\[The End of Assistant A's Answer.*"
        r"Assistant B's Answer\]\n(.*)\n\[The End of Assistant B's Answer",
        user,
        re.DOTALL,
    )
    if not found:
        return "no idea"
    longer_a = len(found.group(1)) >= len(found.group(2))
    return "A" if longer_a == req.model.startswith("ft:") else "B"
