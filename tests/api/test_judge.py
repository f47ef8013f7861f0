"""Stage judge against the loopback server, through the real ``openai`` client: chat-format JSONL from the judge
templates, token and cost estimates, upload → job → poll (through 429 and 500 answers) → test → compare → cleanup,
a failed job reported with its error, a restart that resumes the same job, invalid answers counted, never dropped,
and a key that never reaches an output."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from loopback import Fault, FineTuneService, LoopbackServer, client_settings, judging

from kaggle_utils.api import judge
from kaggle_utils.api.finetune import FineTuneClient, JobFailed, JobState
from kaggle_utils.api.judge import JUDGE_SYSTEM, JudgeConfig, chat_examples, clip, parse_choice
from kaggle_utils.api.tokens import TokenCounter, reference_encoding
from kaggle_utils.config import recipes
from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import CHAT_SYSTEM

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-test-judge-" + "7" * 30
BASE = "gpt-4o-mini-2024-07-18"
JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def server():
    with LoopbackServer(responder=judging) as s:
        yield s


@pytest.fixture
def service(server):
    return FineTuneService().install(server)


def labelled(path: Path, n: int = 40, shorter_wins_every: int = 4) -> Path:
    """Rows whose longer response wins, except every ``shorter_wins_every``-th row; lengths always differ."""
    rows = []
    for i in range(n):
        short, long = f"short answer {i}", f"a much longer and more detailed answer number {i} " * 2
        a_long = i % 2 == 0
        longer_wins = i % shorter_wins_every != 0
        winner = "model_a" if a_long == longer_wins else "model_b"
        rows.append(
            {
                "id": f"r{i}",
                "prompt": f"prompt {i}: explain",
                "response_a": long if a_long else short,
                "response_b": short if a_long else long,
                "winner": winner,
                "model_a": "x",
                "model_b": "y",
                "language": "English" if i % 3 else "Russian",
            }
        )
    pd.DataFrame(rows).to_parquet(path)
    return path


def config(server: LoopbackServer, tmp_path: Path, **overrides) -> JudgeConfig:
    stage = {
        "input_file": labelled(tmp_path / "train.parquet"),
        "work_dir": tmp_path / "judge",
        "n_train": 20,
        "n_valid": 10,
        "api_key_env": "JUDGE_TEST_KEY",
        "poll_interval_s": 0.001,
        "poll_max_interval_s": 0.004,
        "test_models": ["fine-tuned", BASE],
        "training_prices": {BASE: 3.0},
        "prices": {BASE: [0.15, 0.60], f"ft:{BASE}": [0.30, 1.20]},
        "temperature": 0.0,
        "max_tokens": 5,
    }
    return JudgeConfig(**client_settings(server, **{**stage, **overrides}))


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)


def posts(server: LoopbackServer, path: str) -> int:
    return sum(1 for r in server.requests(path) if r.method == "POST")


def assert_no_secret(tmp_path: Path, *texts: str) -> None:
    for text in texts:
        assert SECRET not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def expected_correct(rows: pd.DataFrame, model: str) -> list[bool]:
    """Per row and order (ab then ba), whether the loopback's judging rule for ``model`` is right."""
    out = []
    for shown in (rows, schema.swap_ab(rows)):
        for a, b, winner in zip(shown["response_a"], shown["response_b"], shown["winner"], strict=True):
            pick_a = (len(a) >= len(b)) == model.startswith("ft:")
            out.append(pick_a == (winner == "model_a"))
    return out


# --- messages, answers, tokens -------------------------------------------------------------------------------------


def test_answers_parse_to_one_letter_or_none():
    for text, want in [("A", "A"), (" b.", "B"), ("[[A]]", "A"), ("Assistant B", "B"), ("Response a\n", "A")]:
        assert parse_choice(text) == want, text
    for text in ["", None, "AB", "Both are good.", "A or B", "I prefer A because it is longer", "C"]:
        assert parse_choice(text) is None, text


def test_examples_use_the_judge_templates_and_the_label_letter(tmp_path):
    rows = pd.read_parquet(labelled(tmp_path / "t.parquet", 4))
    examples = chat_examples(rows, 6000)
    assert [ex["messages"][-1] for ex in examples] == [
        {"role": "assistant", "content": "B" if w == "model_b" else "A"} for w in rows["winner"]
    ]
    system, user, _ = examples[1]["messages"]
    assert system == {"role": "system", "content": JUDGE_SYSTEM} and JUDGE_SYSTEM.startswith(CHAT_SYSTEM)
    assert user["content"].startswith("[User Question]\nprompt 1: explain") and rows["response_a"][1] in user["content"]
    # the swapped row's answer is the other letter: swap_ab is the one definition of the A/B swap
    swapped = chat_examples(schema.swap_ab(rows), 6000)
    assert [s["messages"][-1]["content"] for s in swapped] == ["B" if w == "model_a" else "A" for w in rows["winner"]]
    assert clip("x" * 10, 10) == "x" * 10 and clip("abcdefghij" * 3, 10) == "abcde … fghij"


def test_prepare_writes_disjoint_chat_files_and_a_cost_table(server, tmp_path):
    cfg = config(server, tmp_path, swap_train=True, training_prices={BASE: 3.0, "gpt-4.1-nano-2025-04-14": 1.5})
    prepared = judge.prepare(cfg)
    train = [json.loads(line) for line in cfg.path("train.jsonl").read_text().splitlines()]
    valid = [json.loads(line) for line in cfg.path("valid.jsonl").read_text().splitlines()]
    assert len(train) == 40 and len(valid) == 10  # 20 rows and their swapped copies
    assert Counter(ex["messages"][-1]["content"] for ex in train) == {"A": 20, "B": 20}
    valid_rows = pd.read_parquet(cfg.path("valid.parquet"))
    users = {ex["messages"][1]["content"] for ex in train}
    assert not users & {ex["messages"][1]["content"] for ex in valid}
    assert len(valid_rows) == 10 and set(valid_rows.columns) >= {"id", "winner"}
    table = prepared.tokens.set_index("model")
    assert list(table.index) == [BASE, "gpt-4.1-nano-2025-04-14"]
    counter = TokenCounter(BASE)
    assert table.loc[BASE, "train_tokens"] == sum(counter.messages(ex["messages"]) for ex in train)
    assert table.loc[BASE, "billed_tokens"] == 3 * table.loc[BASE, "train_tokens"]
    assert table.loc[BASE, "training_cost_usd"] == pytest.approx(table.loc[BASE, "billed_tokens"] * 3.0 / 1e6)
    assert (cfg.path("tokens.csv")).is_file() and "training examples: 40" in str(prepared)
    if not counter.exact and reference_encoding() is not None:  # the error of chars/4, measured per language
        assert set(prepared.approximation["language"]) == {"all", "English", "Russian"}
        assert cfg.path("tokens_approximation.csv").is_file() and "Qwen2.5" in str(prepared)
    assert not server.received  # prepare is offline


# --- the whole run ---------------------------------------------------------------------------------------------------


def test_prepare_train_test_compare_cleanup_end_to_end(server, service, tmp_path, capsys):
    cfg = config(server, tmp_path, delete_model=True)
    judge.prepare(cfg)
    # an upload rate-limited, a job creation and two polls answered 500, an event list rate-limited
    server.add_faults(
        Fault.rate_limited(0.001, match=lambda r: r.path == "/v1/files"),
        Fault.server_error(match=lambda r: r.method == "POST" and r.path == JOBS),
        Fault.server_error(503, times=2, match=lambda r: r.method == "GET" and r.path.count("/") == 4),
        Fault.rate_limited(match=lambda r: r.path.endswith("/events")),
    )
    sleeps: list[float] = []
    state = judge.train(cfg, sleep=sleeps.append)
    assert state.status == "succeeded" and state.fine_tuned_model.startswith(f"ft:{BASE}:loopback:wsdm-judge:")
    assert posts(server, JOBS) == 2 and len(service.jobs) == 1  # one 500, then one job: never a second
    assert len(service.files) == 2 and posts(server, "/v1/files") == 3
    job = service.jobs[state.job_id]
    assert job["method"]["supervised"]["hyperparameters"] == {"n_epochs": 3} and job["model"] == BASE
    uploaded = service.file_lines(job["training_file"])
    assert uploaded == [json.loads(line) for line in cfg.path("train.jsonl").read_text().splitlines()]
    out = capsys.readouterr().out
    assert "New fine-tuned model created" in out and out.count("Files validated") == 1  # events once each
    assert JobState.load(cfg.state_file) == state

    result = judge.compare(cfg)
    table = result.table.set_index("model")
    ft = state.fine_tuned_model
    rows = pd.read_parquet(cfg.path("valid.parquet"))
    for model in (ft, BASE):
        right = expected_correct(rows, model)
        assert table.loc[model, "answers"] == 20 and table.loc[model, "invalid"] == 0
        assert table.loc[model, "accuracy"] == pytest.approx(sum(right) / 20)
        assert table.loc[model, "consistency"] == 1.0  # a length rule is order-free
    # the two rules are opposite: they never agree
    assert table["agreement"].tolist() == [0.0, 0.0]
    tokens = table.loc[ft, ["input_tokens", "output_tokens"]]
    assert table.loc[ft, "cost_usd"] == pytest.approx((tokens.iloc[0] * 0.30 + tokens.iloc[1] * 1.20) / 1e6)
    assert cfg.path("compare_table.csv").is_file()

    done = judge.cleanup(cfg)
    assert done == {**{fid: "deleted" for fid in state.files.values()}, ft: "deleted"}
    assert not service.files and not service.models
    assert judge.cleanup(cfg) == {}  # nothing left to delete, nothing asked
    # the key went to the server, and nowhere else
    assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in server.received)
    assert_no_secret(tmp_path, capsys.readouterr().out, str(result), repr(FineTuneClient(cfg)))


def test_malformed_answers_of_the_job_endpoints_are_asked_again_then_fail_clearly(server, service, tmp_path):
    cfg = config(server, tmp_path, malformed_retries=2)
    judge.prepare(cfg)
    job_get = lambda r: r.method == "GET" and r.path.startswith(JOBS + "/") and r.path.count("/") == 4  # noqa: E731
    # a 200 that is not JSON (the openai client fails in its parser), and JSON of the wrong shape
    server.add_faults(Fault.not_json(match=job_get), Fault.no_choices(match=lambda r: r.path.endswith("/events")))
    client = FineTuneClient(cfg, sleep=lambda s: None)
    judge.start_job(cfg, client, JobState())
    state = judge.train(cfg, sleep=lambda s: None)
    assert state.status == "succeeded" and len(service.jobs) == 1
    server.add_faults(Fault.not_json(times=3, match=job_get))
    with pytest.raises(judge.ApiError, match=r"retrieve job .* gave up after 3 tries; last: malformed answer"):
        client.job(state.job_id)


def test_polling_backs_off_and_starts_again_when_the_job_moves(server, tmp_path):
    FineTuneService(polls_to_finish=8).install(server)
    cfg = config(server, tmp_path)
    judge.prepare(cfg)
    sleeps: list[float] = []
    judge.train(cfg, sleep=sleeps.append)
    # queued, running (changes: back to the first interval), then doubling up to the cap
    assert sleeps == [0.001, 0.001, 0.002, 0.004, 0.004, 0.004, 0.004]


def test_a_failed_job_is_reported_with_its_error(server, tmp_path):
    error = {"code": "invalid_n_examples", "message": "Training file has 20 example(s), but must have at least 50"}
    service = FineTuneService(fail_error=error).install(server)
    cfg = config(server, tmp_path)
    judge.prepare(cfg)
    with pytest.raises(JobFailed, match="failed: invalid_n_examples: Training file has 20 example"):
        judge.train(cfg, sleep=lambda s: None)
    state = JobState.load(cfg.state_file)
    assert state.status == "failed" and "invalid_n_examples" in state.error and not state.fine_tuned_model
    # a rerun says so without creating another job; status shows the error too
    with pytest.raises(JobFailed, match="delete .*state.json"):
        judge.train(cfg, sleep=lambda s: None)
    assert judge.status(cfg).error == state.error
    assert len(service.jobs) == 1
    with pytest.raises(judge.ApiError, match="holds no fine-tuned model"):
        judge.evaluate(cfg)


def test_a_restart_mid_poll_resumes_the_same_job(server, service, tmp_path, capsys):
    cfg = config(server, tmp_path)
    judge.prepare(cfg)
    polls = []

    def killed_on_second_poll(state: JobState) -> None:
        polls.append(state.status)
        if len(polls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        judge.train(cfg, sleep=lambda s: None, on_poll=killed_on_second_poll)
    saved = JobState.load(cfg.state_file)
    assert saved.job_id and saved.status == "queued"
    state = judge.train(cfg, sleep=lambda s: None)
    assert state.job_id == saved.job_id and state.status == "succeeded"
    assert posts(server, JOBS) == 1 and posts(server, "/v1/files") == 2  # nothing uploaded or created twice
    assert f"resuming job {saved.job_id}" in capsys.readouterr().out


def test_a_job_created_but_not_answered_or_not_saved_is_adopted_not_made_twice(server, service, tmp_path, capsys):
    cfg = config(server, tmp_path, max_poll_s=1e-9)
    judge.prepare(cfg)
    # the server makes the job, then the connection drops before its answer
    server.add_faults(Fault.disconnect(match=lambda r: r.method == "POST" and r.path == JOBS))
    state = judge.train(cfg, sleep=lambda s: None)
    assert len(service.jobs) == 1 and posts(server, JOBS) == 1 and state.job_id in service.jobs
    assert "adopting it" in capsys.readouterr().out
    # a kill after the job was made but before its id was saved
    JobState(files=state.files).save(cfg.state_file)
    again = judge.train(cfg, sleep=lambda s: None)
    assert again.job_id == state.job_id and len(service.jobs) == 1 and posts(server, JOBS) == 1


def test_cleanup_cancels_a_job_still_running(server, service, tmp_path):
    cfg = config(server, tmp_path, max_poll_s=1e-9, delete_model=True)
    judge.prepare(cfg)
    state = judge.train(cfg, sleep=lambda s: None)
    assert state.status == "queued"
    done = judge.cleanup(cfg)
    assert service.jobs[state.job_id]["status"] == "cancelled" and JobState.load(cfg.state_file).status == "cancelled"
    assert set(done) == set(state.files.values()) and not service.files  # no model was made, none deleted


def test_a_poll_budget_leaves_the_job_running_for_a_later_call(server, service, tmp_path):
    cfg = config(server, tmp_path, max_poll_s=1e-9)
    judge.prepare(cfg)
    assert judge.train(cfg, sleep=lambda s: None).status == "queued"
    assert judge.status(cfg).status == "running"
    assert judge.train(cfg.__class__(**{**vars(cfg), "max_poll_s": 0.0}), sleep=lambda s: None).status == "succeeded"
    assert len(service.jobs) == 1


def test_invalid_and_failed_answers_are_counted_as_wrong_never_dropped(server, service, tmp_path):
    cfg = config(server, tmp_path, test_models=[BASE], max_attempts=2, malformed_retries=1)
    judge.prepare(cfg)
    rows = pd.read_parquet(cfg.path("valid.parquet"))
    first = rows["prompt"].iloc[0]
    about_first = lambda r: first in r.message("user")  # noqa: E731
    # row 0: "Both are good." in one order, a 500 in the other until the tries run out; a not-JSON answer elsewhere
    server.add_faults(
        Fault(content="Both are good.", match=about_first),
        Fault.server_error(times=2, match=about_first),
        Fault.not_json(),
    )
    result = judge.evaluate(cfg)
    row = result.table.iloc[0]
    right = expected_correct(rows, BASE)
    assert (row["answers"], row["valid"], row["invalid"], row["failed"]) == (20, 18, 1, 1)
    assert row["invalid_rate"] == pytest.approx(0.1)
    correct_now = sum(right) - right[0] - right[10]  # row 0's two answers are gone
    assert row["accuracy"] == pytest.approx(correct_now / 20)
    assert row["accuracy_valid"] == pytest.approx(correct_now / 18)
    assert math.isclose(row["consistency"], 1.0)
    answers = result.answers
    assert len(answers) == 20 and answers.loc[answers["status"] == "invalid", "answer"].tolist() == ["Both are good."]
    assert result.run.retries["malformed"] == 1 and result.run.failed == 1


def test_the_cli_runs_each_action_from_a_recipe(server, service, tmp_path, capsys):
    cfg = config(server, tmp_path)
    flags = [
        "--recipe", "judge-gpt-4o-mini",
        "--input-file", str(cfg.input_file), "--work-dir", str(cfg.work_dir),
        "--n-train", "20", "--n-valid", "10",
        "--base-url", server.base_url, "--api-key-env", "JUDGE_TEST_KEY",
        "--poll-interval-s", "0.001", "--poll-max-interval-s", "0.002",
        "--backoff-base-s", "0.001", "--backoff-max-s", "0.01",
    ]  # fmt: skip
    for action in ("prepare", "train", "status", "compare", "cleanup"):
        judge.main([action, *flags])
    out = capsys.readouterr().out
    assert "billed_tokens" in out and "fine-tuned model: ft:" in out and "agreement" in out
    assert not service.files
    assert_no_secret(tmp_path, out)
    with pytest.raises(SystemExit, match="usage"):
        judge.main(["fly", *flags])


@pytest.mark.slow  # a subprocess
def test_the_module_runs_from_a_shell(server, tmp_path):
    cfg = config(server, tmp_path)
    args = ["prepare", "--recipe", "judge-gpt-4o-mini", "--input-file", str(cfg.input_file)]
    args += ["--work-dir", str(cfg.work_dir), "--n-train", "20", "--n-valid", "10"]
    proc = subprocess.run(
        [sys.executable, "-m", "kaggle_utils.api.judge", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "training examples: 20" in proc.stdout and cfg.path("train.jsonl").is_file()
    # no job yet: test names the fix, with the exit status of a failed command
    proc = subprocess.run(
        [sys.executable, "-m", "kaggle_utils.api.judge", "test", *args[1:], "--api-key-env", ""],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "holds no fine-tuned model; fix: run train" in proc.stderr


def test_the_recipes_load_and_the_variant_changes_only_the_model():
    base = recipes.load("judge-gpt-4o-mini", JudgeConfig)
    variant = recipes.load("judge-gpt-4.1-mini", JudgeConfig)
    assert base.base_model == BASE and base.test_models == ["fine-tuned", BASE]
    assert variant.base_model == "gpt-4.1-mini-2025-04-14" and variant.n_train == base.n_train
    assert set(variant.prices) == {"gpt-4.1-mini-2025-04-14", "ft:gpt-4.1-mini-2025-04-14"}
