"""kaggle_utils.api.client against the loopback server, through the real ``openai`` client: retries and their counts,
no retry where a retry cannot help, malformed answers bounded, resumption after a kill without a repeated or lost
request, the concurrency bound, token and cost accounting, and a key that never leaves the environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from loopback import Fault, LoopbackServer, Received, Reply, answering, client_settings, count_tokens, text_hash

from kaggle_utils.api.client import (
    ApiConfig,
    ApiError,
    ChatClient,
    ChatRequest,
    ChatResult,
    JsonlStore,
    backoff_s,
    cost_usd,
    retry_after_s,
    usage_table,
)

SECRET = "sk-test-" + "0123456789abcdef" * 3


@pytest.fixture
def server():
    with LoopbackServer() as s:
        yield s


def client_for(server: LoopbackServer, **overrides) -> ChatClient:
    return ChatClient(ApiConfig(**client_settings(server, **overrides)))


def prompts(n: int, model: str = "m1", client: ChatClient | None = None) -> list[ChatRequest]:
    assert client is not None
    return [client.request(model, [{"role": "user", "content": f"prompt number {i}"}], tag=str(i)) for i in range(n)]


def asked(server: LoopbackServer) -> Counter:
    """How many times the server was asked each (model, prompt)."""
    return Counter((r.model, r.message("user")) for r in server.requests())


def about(text: str):
    """A fault matcher: requests whose prompt is ``text``."""
    return lambda r: r.message("user") == text


# --- answers, usage, cost ------------------------------------------------------------------------------------------


def test_answers_tokens_and_cost_are_recorded(server, tmp_path):
    prices = {"m1": [1.0, 2.0], "m2": [10.0, 20.0]}
    client = client_for(server, prices=prices)
    requests = prompts(3, "m1", client) + prompts(3, "m2", client)
    store = JsonlStore(tmp_path / "requests.jsonl")
    summary = client.run(requests, store)
    done = store.load()
    assert (summary.requests, summary.ok, summary.failed, summary.resumed) == (6, 6, 0, 0)
    expected_cost, tokens_in, tokens_out = 0.0, 0, 0
    for req in requests:
        result = done[req.key]
        answer = f"answer of {req.model} to {text_hash(req.messages[-1]['content'])}"
        assert result.ok and result.content == answer and result.attempts == 1 and result.finish_reason == "stop"
        assert (result.input_tokens, result.output_tokens) == (count_tokens(req.messages[-1]["content"]), 5)
        tokens_in, tokens_out = tokens_in + result.input_tokens, tokens_out + result.output_tokens
        p_in, p_out = prices[req.model]
        expected_cost += (result.input_tokens * p_in + result.output_tokens * p_out) / 1e6
    assert (summary.input_tokens, summary.output_tokens) == (tokens_in, tokens_out) == (18, 30)
    assert summary.cost_usd == pytest.approx(expected_cost) == pytest.approx((9 * 1 + 15 * 2 + 9 * 10 + 15 * 20) / 1e6)
    table = usage_table(done.values(), prices).set_index("model")
    assert table.loc["total", "cost_usd"] == pytest.approx(expected_cost)
    assert table.loc["m2", ["ok", "failed", "input_tokens", "output_tokens"]].tolist() == [3, 0, 9, 15]


def test_cost_is_unknown_when_a_model_has_no_price():
    assert cost_usd("m1", 1_000_000, 500_000, {"m1": [0.15, 0.6]}) == pytest.approx(0.45)
    assert cost_usd("other", 10, 10, {"m1": [0.15, 0.6]}) is None
    results = [
        ChatResult("k1", "m1", "ok", "x", input_tokens=10, output_tokens=5),
        ChatResult("k2", "other", "ok", "x"),
    ]
    table = usage_table(results, {"m1": [1.0, 1.0]}).set_index("model")
    assert table.loc["m1", "cost_usd"] == pytest.approx(15e-6)
    assert table["cost_usd"].isna().tolist() == [False, True, True]  # no total that would understate


def test_the_request_carries_the_settings_and_the_key_is_stable(server, tmp_path):
    client = client_for(server, temperature=0.3, max_tokens=77)
    (req,) = prompts(1, client=client)
    client.run([req], JsonlStore(tmp_path / "r.jsonl"))
    body = server.requests()[0].body
    assert (body["model"], body["temperature"], body["max_completion_tokens"]) == ("m1", 0.3, 77)
    assert client_for(server, temperature=0.3, max_tokens=77).request(req.model, req.messages, "0").key == req.key
    assert client_for(server, temperature=0.4, max_tokens=77).request(req.model, req.messages, "0").key != req.key
    assert "temperature" not in client_for(server, temperature=None).request("m", [], "").settings


# --- retries -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault,cause",
    [
        (Fault.rate_limited(), "rate_limit"),
        (Fault.server_error(500), "server_error"),
        (Fault.server_error(503), "server_error"),
        (Fault.slow(1.0), "timeout"),
        (Fault.disconnect(), "connection"),
    ],
    ids=["429", "500", "503", "timeout", "connection"],
)
def test_a_transient_error_is_retried_and_counted(server, tmp_path, fault, cause):
    client = client_for(server, timeout_s=0.25)
    server.add_faults(fault)
    (req,) = prompts(1, client=client)
    summary = client.run([req], JsonlStore(tmp_path / "r.jsonl"))
    result = JsonlStore(tmp_path / "r.jsonl").load()[req.key]
    assert result.ok and result.attempts == 2 and result.retries == {cause: 1}
    assert summary.retries == Counter({cause: 1}) and summary.ok == 1
    assert len(server.requests()) == 2


def test_retry_after_is_honoured(server, tmp_path):
    # its own backoff starts at 1 ms: only Retry-After (under the 1 s cap) can explain a longer wait
    client = client_for(server, backoff_max_s=1.0)
    server.add_faults(Fault.rate_limited(retry_after=0.3))
    client.run(prompts(1, client=client), JsonlStore(tmp_path / "r.jsonl"))
    first, second = server.requests()
    assert second.at - first.at >= 0.3


def test_retry_after_forms_and_the_backoff_schedule():
    import random

    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == pytest.approx(0.25)
    assert retry_after_s({"retry-after": "2"}) == 2.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after_s({"retry-after": date}) <= 30
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s({}) is None
    cfg, rng = ApiConfig(backoff_base_s=1.0, backoff_max_s=10.0), random.Random(0)
    waits = [backoff_s(a, cfg, None, rng) for a in (1, 2, 3, 4, 5, 6)]
    for attempt, wait in enumerate(waits, 1):
        assert 0.5 * min(10, 2 ** (attempt - 1)) <= wait <= min(10, 2 ** (attempt - 1))
    assert 5.0 <= backoff_s(1, cfg, 5.0, rng) <= 5.5 and backoff_s(1, cfg, 99.0, rng) <= 11.0


def test_a_request_that_keeps_failing_is_recorded_after_max_attempts(server, tmp_path):
    client = client_for(server, max_attempts=3)
    server.add_faults(Fault.server_error(times=10, match=about("prompt number 0")))
    summary = client.run(prompts(2, client=client), JsonlStore(tmp_path / "r.jsonl"))
    failed = [r for r in JsonlStore(tmp_path / "r.jsonl").load().values() if not r.ok]
    assert (summary.ok, summary.failed) == (1, 1) and len(failed) == 1
    assert failed[0].attempts == 3 and failed[0].retries == {"server_error": 2}
    assert "HTTP 500" in failed[0].error and "'m1'" in failed[0].error and "gave up after 3 tries" in failed[0].error
    assert asked(server)[("m1", "prompt number 0")] == 3


def test_a_400_is_not_retried_and_says_the_fix(server, tmp_path):
    client = client_for(server)
    server.add_faults(Fault.status_code(400, "This model's maximum context length is 128000 tokens"))
    (req,) = prompts(1, client=client)
    summary = client.run([req], JsonlStore(tmp_path / "r.jsonl"))
    result = JsonlStore(tmp_path / "r.jsonl").load()[req.key]
    assert len(server.requests()) == 1 and summary.failed == 1 and result.attempts == 1
    assert "HTTP 400" in result.error and "model 'm1'" in result.error and "maximum context length" in result.error
    assert "fix:" in result.error


@pytest.mark.parametrize(
    "status,message",
    [(401, r"HTTP 401 .*model 'm1'.*key was refused.*fix: put a valid key in \$TEST_API_KEY"),
     (404, r"HTTP 404 .*model 'm1'.*fix: correct the model name")],
)  # fmt: skip
def test_a_refused_key_or_unknown_model_stops_the_run_with_the_fix(server, tmp_path, monkeypatch, status, message):
    monkeypatch.setenv("TEST_API_KEY", SECRET)
    client = client_for(server, api_key_env="TEST_API_KEY", workers=2)
    server.add_faults(Fault.status_code(status, f"Incorrect API key provided: {SECRET}", times=1000))
    with pytest.raises(ApiError, match=message) as err:
        client.run(prompts(20, client=client), JsonlStore(tmp_path / "r.jsonl"))
    assert SECRET not in str(err.value)
    assert len(server.requests()) <= 4  # at most one more per worker before the rest is dropped; none retried


def test_a_spent_quota_stops_the_run(server, tmp_path):
    client = client_for(server)
    server.add_faults(Fault.status_code(429, "You exceeded your current quota", code="insufficient_quota"))
    with pytest.raises(ApiError, match="quota spent.*fix: add credit"):
        client.run(prompts(1, client=client), JsonlStore(tmp_path / "r.jsonl"))


# --- malformed answers ---------------------------------------------------------------------------------------------

MALFORMED = [Fault.not_json, Fault.no_choices, Fault.empty]


@pytest.mark.parametrize("fault", MALFORMED, ids=lambda f: f.__name__)
def test_a_malformed_answer_is_asked_again(server, tmp_path, fault):
    client = client_for(server)
    server.add_faults(fault())
    (req,) = prompts(1, client=client)
    summary = client.run([req], JsonlStore(tmp_path / "r.jsonl"))
    assert summary.ok == 1 and summary.retries == Counter({"malformed": 1}) and len(server.requests()) == 2


@pytest.mark.parametrize("fault", MALFORMED, ids=lambda f: f.__name__)
def test_a_malformed_answer_fails_after_its_retries_and_the_run_goes_on(server, tmp_path, fault):
    client = client_for(server, malformed_retries=2, max_attempts=6)
    server.add_faults(fault(times=100, match=about("prompt number 1")))
    summary = client.run(prompts(4, client=client), JsonlStore(tmp_path / "r.jsonl"))
    (failed,) = [r for r in JsonlStore(tmp_path / "r.jsonl").load().values() if not r.ok]
    assert (summary.ok, summary.failed) == (3, 1) and summary.retries == Counter({"malformed": 2})
    assert failed.attempts == 3 and failed.error.startswith("malformed answer")
    assert asked(server)[("m1", "prompt number 1")] == 3


def test_content_the_caller_cannot_parse_counts_as_malformed(server, tmp_path):
    def parse(text: str) -> str:
        if "m1" in text:
            raise ValueError("not what was asked for")
        return text.upper()

    client = client_for(server)
    store = JsonlStore(tmp_path / "r.jsonl")
    summary = client.run(prompts(1, "m1", client) + prompts(1, "m2", client), store, parse=parse)
    results = {r.model: r for r in store.load().values()}
    assert results["m2"].content.startswith("ANSWER OF M2") and not results["m1"].ok
    assert "unparseable content: not what was asked for" in results["m1"].error
    assert summary.retries == Counter({"malformed": 2})


def test_failures_in_a_row_stop_the_run(server, tmp_path):
    client = client_for(server, workers=1, max_consecutive_failures=3)
    server.add_faults(Fault.status_code(400, "bad parameter: temperature", times=1000))
    with pytest.raises(ApiError, match="3 requests in a row failed.*bad parameter"):
        client.run(prompts(10, client=client), JsonlStore(tmp_path / "r.jsonl"))
    # every request sent was stored (none lost), and the run stopped early
    assert 3 <= len(JsonlStore(tmp_path / "r.jsonl").load()) == len(server.requests()) <= 4


# --- resumption ----------------------------------------------------------------------------------------------------


class Killed(Exception):
    """Raised from ``after_each`` to stop a run as a kill would."""


def kill_after(k: int):
    seen = []

    def hook(result: ChatResult) -> None:
        seen.append(result)
        if len(seen) == k:
            raise Killed

    return hook


def test_a_run_killed_midway_resumes_without_repeating_or_losing_a_request(server, tmp_path):
    client = client_for(server, workers=3)
    requests = prompts(20, "m1", client) + prompts(20, "m2", client)
    store = JsonlStore(tmp_path / "killed.jsonl")
    with pytest.raises(Killed):
        client.run(requests, store, after_each=kill_after(7))
    finished = set(store.load())
    assert 7 <= len(finished) < 40  # those in flight at the "kill" were kept too
    summary = client_for(server, workers=3).run(requests, store)
    assert (summary.resumed, summary.ok) == (len(finished), 40 - len(finished))
    assert set(asked(server).values()) == {1}  # no request was sent twice
    with LoopbackServer() as fresh:
        client_for(fresh).run(requests, JsonlStore(tmp_path / "whole.jsonl"))
    resumed, whole = store.load(), JsonlStore(tmp_path / "whole.jsonl").load()
    assert {k: r.content for k, r in resumed.items()} == {k: r.content for k, r in whole.items()}
    assert len(store.path.read_text().splitlines()) == 40  # one line per request: no duplicates


def test_a_torn_last_line_is_dropped_and_asked_again(server, tmp_path):
    client = client_for(server)
    requests = prompts(5, client=client)
    store = JsonlStore(tmp_path / "r.jsonl")
    client.run(requests, store)
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) - 25])  # a kill in the middle of writing the last line
    summary = client.run(requests, JsonlStore(store.path))
    assert (summary.resumed, summary.ok) == (4, 1) and len(server.requests()) == 6
    lines = store.path.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["status"] == "ok" for line in lines)
    assert set(store.load()) == {r.key for r in requests}


@pytest.mark.slow  # a subprocess
def test_a_real_kill_loses_and_repeats_nothing_finished(server, tmp_path):
    """SIGKILL a run in another process mid-way; the rerun asks only what was not stored."""
    store_path = tmp_path / "r.jsonl"
    settings = client_settings(server, workers=2)
    script = (
        "import json, sys; from kaggle_utils.api.client import ApiConfig, ChatClient, JsonlStore\n"
        f"client = ChatClient(ApiConfig(**json.loads({json.dumps(json.dumps(settings))})))\n"
        "reqs = [client.request('m1', [{'role': 'user', 'content': f'prompt number {i}'}], tag=str(i)) "
        "for i in range(40)]\n"
        f"client.run(reqs, JsonlStore({str(store_path)!r}))\n"
    )
    server.add_faults(Fault.slow(0.05, times=1000))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not store_path.exists() or store_path.read_text().count("\n") < 8):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic()
    server.faults.clear()
    finished = JsonlStore(store_path).load()
    assert 8 <= len(finished) < 40
    client = client_for(server)
    requests = prompts(40, client=client)
    summary = client.run(requests, JsonlStore(store_path))
    finished_prompts = {req.messages[-1]["content"] for req in requests if req.key in finished}
    asked_again = [r.message("user") for r in server.requests() if r.at > killed_at]
    assert finished_prompts.isdisjoint(asked_again) and len(asked_again) == len(set(asked_again)) == 40 - len(finished)
    assert summary.resumed == len(finished) and summary.ok == 40 - len(finished)
    assert len(JsonlStore(store_path).load()) == 40 and all(r.ok for r in JsonlStore(store_path).load().values())


def test_failed_requests_are_asked_again_on_a_rerun_unless_told_not_to(server, tmp_path):
    store = JsonlStore(tmp_path / "r.jsonl")
    server.add_faults(Fault.status_code(400, "transient 400"))
    client = client_for(server)
    (req,) = prompts(1, client=client)
    client.run([req], store)
    assert client_for(server, retry_failed=False).run([req], store).resumed == 1
    assert len(server.requests()) == 1
    summary = client.run([req], store)
    assert summary.ok == 1 and len(server.requests()) == 2
    assert store.load()[req.key].ok  # the answer wins over the earlier failure of the same key


def test_a_request_given_twice_is_asked_once(server, tmp_path):
    client = client_for(server)
    requests = prompts(3, client=client)
    summary = client.run(requests + requests, JsonlStore(tmp_path / "r.jsonl"))
    assert summary.requests == 3 and len(server.requests()) == 3


def test_the_spend_cap_stops_the_run_and_a_larger_cap_goes_on(server, tmp_path):
    # each answer: 3 prompt + 5 answer tokens at $1e5 per 1M tokens = $0.80, so the third reaches a $2 cap
    client = client_for(server, workers=1, prices={"m1": [1e5, 1e5]}, max_cost_usd=2.0)
    store = JsonlStore(tmp_path / "r.jsonl")
    requests = prompts(10, client=client)
    first = client.run(requests, store)
    assert "max_cost_usd=2" in first.stopped and 3 <= first.ok <= 4
    second = client_for(server, workers=1, prices={"m1": [1e5, 1e5]}, max_cost_usd=100.0).run(requests, store)
    assert second.resumed == first.ok and second.ok == 10 - first.ok and not second.stopped


# --- concurrency and secrets ---------------------------------------------------------------------------------------


def test_at_most_workers_requests_are_in_flight(server, tmp_path):
    client = client_for(server, workers=3)
    server.add_faults(Fault.slow(0.1, times=12))
    client.run(prompts(12, client=client), JsonlStore(tmp_path / "r.jsonl"))
    assert server.max_in_flight == 3


def test_the_key_is_sent_but_never_stored_printed_or_shown(server, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level("DEBUG")
    monkeypatch.setenv("TEST_API_KEY", SECRET)
    client = client_for(server, api_key_env="TEST_API_KEY")
    # a server that quotes the key back in an error body (OpenAI's 401 does, partly)
    server.add_faults(Fault.status_code(400, f"bad request with key {SECRET}"))
    store = JsonlStore(tmp_path / "r.jsonl")
    client.run(prompts(3, client=client), store)
    assert {r.headers["authorization"] for r in server.requests()} == {f"Bearer {SECRET}"}
    out = capsys.readouterr()
    shown = [repr(client), repr(client.cfg), store.path.read_text(), out.out, out.err, caplog.text]
    assert all(SECRET not in text for text in shown)
    assert any("***" in r.error for r in store.load().values() if not r.ok)


def test_a_missing_key_says_which_variable_to_set(server, monkeypatch):
    monkeypatch.delenv("TEST_API_KEY", raising=False)
    with pytest.raises(ApiError, match=r"TEST_API_KEY is not set; fix: export TEST_API_KEY=.*api_key_env = \"\""):
        client_for(server, api_key_env="TEST_API_KEY")


def test_a_keyless_local_server_needs_no_variable(server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = client_for(server, api_key_env="")
    assert client.run(prompts(1, client=client), JsonlStore(tmp_path / "r.jsonl")).ok == 1


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("workers", 0, "workers=0 must be at least 1"),
        ("timeout_s", 0.0, "timeout_s=0.0 must be positive"),
        ("prices", {"m": [1.0]}, r"prices\['m'\]=\[1.0\]: expected \[USD per 1M input, USD per 1M output"),
        ("base_url", "api.openai.com", "must be an http"),
    ],
)
def test_config_checks_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ApiConfig(**{field: value})


def test_the_loopback_answers_are_functions_of_the_request():
    req = Received(
        "POST", "/v1/chat/completions", {}, {"model": "m", "messages": [{"role": "user", "content": "x"}]}, 0
    )
    assert answering(req) == f"answer of m to {text_hash('x')}" == answering(req)


def test_the_loopback_takes_more_routes(server):
    """How files / fine-tuning endpoints will be added: a route, answered through the real openai client."""
    import openai

    model = {"id": "m1", "object": "model", "created": 0, "owned_by": "loopback"}
    server.add_route("GET", "/v1/models", lambda s, r: Reply.json(200, {"object": "list", "data": [model]}))
    listed = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0).models.list()
    assert [m.id for m in listed] == ["m1"] and server.requests("/v1/models")[0].method == "GET"
