"""The offline demo endpoint: the judge stage (prepare → train → test → compare → cleanup) and the few-shot stage run
end to end against it through the real ``openai`` client, on the demo data's held-out fold; the stand-in models do
what kaggle_utils.api.demo_server says (length rule, opening table fitted on the uploaded file or on the shots,
stated invalid rate); the comparison table scores everything on the same rows."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import pandas as pd
import pytest

from kaggle_utils import side_by_side
from kaggle_utils.api import demo_server, fewshot, judge
from kaggle_utils.api.demo_server import BASE_MODEL, DemoEndpoint, OpeningTable, opening, read_pair
from kaggle_utils.api.fewshot import FewShotConfig
from kaggle_utils.api.judge import JudgeConfig, judge_messages
from kaggle_utils.config import recipes
from kaggle_utils.data import schema

# runs the judge and few-shot stages: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "KAGGLE_UTILS_DEMO_KEY"


@pytest.fixture
def endpoint():
    with DemoEndpoint() as e:
        yield e


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "any-key-the-stand-in-accepts")


def letters(df: pd.DataFrame) -> list[str]:
    return ["AB"[i] for i in schema.labels(df)]


def test_opening_and_the_pair_are_read_from_the_judge_template():
    assert opening("## Answer\n\nBody text.") == "## Answer"
    assert opening("**Summary:** Body text.") == "**Summary:"
    assert opening("1. First item.\n2. Second.") == "1."
    assert opening("I'm sorry, but I cannot help with that. More words.") == "I'm sorry, but I cannot help with that."
    assert opening("抱歉，我无法帮助您。需要系统") == "抱歉，我无法帮助您。"
    system, user = judge_messages("a prompt", "first\nanswer", "second answer", 6000)
    assert read_pair(user["content"]) == ("first\nanswer", "second answer")
    assert read_pair("no pair here") is None


def test_the_opening_table_learns_the_demo_signal(prepared):
    """Fitted on the other folds it nears the 1 - label_noise ceiling; with no examples it is the length rule."""
    df = schema.load(prepared["train"], "train")
    train, valid = df[df["fold"] != 0], df[df["fold"] == 0]
    table = OpeningTable.fit(zip(train["response_a"], train["response_b"], letters(train), strict=True))
    pairs = list(zip(valid["response_a"], valid["response_b"], letters(valid), strict=True))
    fitted = np.mean([table.choose(a, b) == t for a, b, t in pairs])
    length = np.mean([OpeningTable().choose(a, b) == t for a, b, t in pairs])
    longer = np.mean([("A" if len(a) >= len(b) else "B") == t for a, b, t in pairs])
    assert fitted > 0.8 and 0.5 < length < 0.7 and length == longer


def test_unknown_models_are_refused_and_answers_are_deterministic(endpoint):
    client = openai.OpenAI(base_url=endpoint.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="`gpt-4o-mini` does not exist") as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "model_not_found"
    messages = judge_messages("q", "## Answer\n\nlong good text here", "Sorry. short", 6000)
    first = client.chat.completions.create(model=BASE_MODEL, messages=messages)
    again = client.chat.completions.create(model=BASE_MODEL, messages=messages)
    assert first.choices[0].message.content == again.choices[0].message.content == "A"  # the longer one
    # usage is ceil(chars / 4) per text
    assert first.usage.prompt_tokens == sum(-(-len(m["content"]) // 4) for m in messages)
    with pytest.raises(openai.BadRequestError, match="not available for fine-tuning"):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file="file-x")


def test_the_invalid_rate_is_as_stated():
    """Over many distinct requests the share of non-letter answers is INVALID_RATE (the hash is uniform)."""
    draws = np.array([demo_server.unit_hash(BASE_MODEL, [{"role": "user", "content": str(i)}]) for i in range(20000)])
    assert abs((draws < demo_server.INVALID_RATE["base"]).mean() - 0.04) < 0.006


def judge_config(endpoint: DemoEndpoint, prepared, tmp_path: Path) -> JudgeConfig:
    cfg = recipes.load("demo-judge", JudgeConfig, {"base_url": endpoint.base_url, "work_dir": str(tmp_path / "judge")})
    return side_by_side.judge_on_heldout(cfg, prepared["train"], val_fold=0)


def test_the_judge_stage_runs_end_to_end_on_the_heldout_fold(endpoint, prepared, tmp_path, capsys):
    cfg = judge_config(endpoint, prepared, tmp_path)
    heldout = side_by_side.heldout_rows(prepared["train"], 0)
    prep = judge.prepare(cfg)
    # validation rows are exactly the students' held-out fold; training rows are every other row
    assert pd.read_parquet(cfg.path("valid.parquet"))["id"].tolist() == heldout["id"].tolist()
    assert prep.counts["training examples"] + prep.counts["validation rows"] == len(
        schema.load(prepared["train"], "train")
    )
    state = judge.train(cfg, sleep=lambda s: time.sleep(min(s, 0.01)))
    assert state.status == "succeeded" and state.fine_tuned_model.startswith(f"ft:{BASE_MODEL}:demo:wsdm-judge:")
    out = capsys.readouterr().out
    assert f"Fitted the opening table on {prep.counts['training examples']} examples" in out
    evaluation = judge.compare(cfg)
    table = evaluation.table.set_index("model")
    ft, base = table.loc[state.fine_tuned_model], table.loc[BASE_MODEL]
    # the fitted judge is far better than the length rule; invalid answers are counted, never dropped
    assert ft["row_accuracy"] > 0.8 and 0.45 < base["row_accuracy"] < 0.7
    assert ft["answers"] == base["answers"] == 2 * len(heldout)
    assert base["invalid"] > 0 and base["invalid_rate"] < 0.1 and base["invalid"] + base["valid"] == base["answers"]
    assert ft["cost_usd"] > base["cost_usd"] > 0  # the fine-tuned price is twice the base's
    # cleanup deletes the files and the model: the model no longer answers
    done = judge.cleanup(cfg)
    assert set(done.values()) == {"deleted"} and state.fine_tuned_model in done
    assert endpoint.models() == [BASE_MODEL] and endpoint.service.files == {}
    client = openai.OpenAI(base_url=endpoint.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=state.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])


def test_the_fewshot_stage_learns_from_its_shots(endpoint, prepared, tmp_path):
    cfg = recipes.load(
        "demo-fewshot",
        FewShotConfig,
        {"base_url": endpoint.base_url, "out_dir": str(tmp_path / "fewshot"), "shots": [0, 4, 16]},
    )
    cfg = side_by_side.fewshot_on_heldout(cfg, prepared["train"], val_fold=0)
    heldout = side_by_side.heldout_rows(prepared["train"], 0)
    result = fewshot.run_fewshot(cfg)
    assert set(result.answers["row_id"]) == set(heldout["id"])
    acc = result.table.set_index("k")["row_accuracy"]
    # k = 0 is the length rule; the openings its shots show lift it toward the fitted judge
    assert 0.45 < acc[0] < 0.7 and acc[0] < acc[4] < acc[16] and acc[16] > 0.75
    assert (result.table["invalid"] > 0).all()
    fig = fewshot.plot_accuracy(result.table)
    assert len(fig.axes[0].lines) >= 3


def test_compare_scores_every_system_on_the_same_rows(endpoint, prepared, tmp_path):
    cfg = judge_config(endpoint, prepared, tmp_path)
    judge.prepare(cfg)
    state = judge.train(cfg, sleep=lambda s: None)
    evaluation = judge.evaluate(cfg)
    heldout = side_by_side.heldout_rows(prepared["train"], 0)
    # a model's predictions: perfect on all rows but the first, which is NaN
    labels = schema.labels(heldout)
    p_a = np.where(labels == 0, 0.9, 0.1)
    p_a[0] = np.nan
    path = tmp_path / "val_predictions.parquet"
    pd.DataFrame({"id": heldout["id"], "p_a": p_a, "p_b": 1 - p_a, "winner": heldout["winner"]}).to_parquet(path)
    answers = evaluation.answers
    systems = [
        side_by_side.from_predictions("student", path),
        side_by_side.from_answers("judge", answers[answers["model"] == state.fine_tuned_model], cfg.prices),
        side_by_side.from_answers("base", answers[answers["model"] == BASE_MODEL], cfg.prices),
    ]
    table = side_by_side.compare(systems, heldout[["id", "winner"]]).set_index("system")
    n = len(heldout)
    assert (table["rows"] == n).all()
    student = table.loc["student"]
    assert student["accuracy"] == pytest.approx((n - 1) / n) and student["invalid_rate"] == pytest.approx(1 / n)
    assert np.isfinite(student["log_loss"]) and student["cost_usd"] == 0
    judged = evaluation.table.set_index("model")
    # the row-level accuracy agrees with the judge stage's own row_accuracy, invalid answers and ties counted wrong
    assert table.loc["judge", "accuracy"] == pytest.approx(judged.loc[state.fine_tuned_model, "row_accuracy"])
    assert table.loc["base", "accuracy"] == pytest.approx(judged.loc[BASE_MODEL, "row_accuracy"])
    assert table.loc["base", "invalid_rate"] == pytest.approx(judged.loc[BASE_MODEL, "invalid_rate"])
    assert table.loc["judge", "cost_usd"] == pytest.approx(judged.loc[state.fine_tuned_model, "cost_usd"])
    assert np.isnan(table.loc["judge", "log_loss"])
    # fewer rows in one system: the table keeps to the rows all of them scored
    fewer = dataclasses.replace(systems[0], rows=systems[0].rows.iloc[10:])
    assert (side_by_side.compare([fewer, *systems[1:]], heldout)["rows"] == n - 10).all()


def test_arrange_refuses_a_count_the_split_does_not_pick(prepared):
    df = schema.load(prepared["train"], "train")
    with pytest.raises(ValueError, match="held out"):
        side_by_side.arrange(df, df["fold"] == 0, lambda f: judge.split_rows(f, 10, 5, 0)[1])


def test_the_endpoint_serves_from_a_shell():
    proc = subprocess.Popen(
        [sys.executable, "-m", "kaggle_utils.api.demo_server", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        base_url = line.split(" at ")[1].split(";")[0]
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
        messages = judge_messages("q", "Sorry. no", "## Answer\n\nyes, a longer answer", 6000)
        assert client.chat.completions.create(model=BASE_MODEL, messages=messages).choices[0].message.content == "B"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_local_predictions_compare_without_the_openai_package(prepared, tmp_path):
    """Kaggle's image has no openai: the comparison of local models must not import the API stages."""
    heldout = side_by_side.heldout_rows(prepared["train"], 0)
    path = tmp_path / "val_predictions.parquet"
    pd.DataFrame({"id": heldout["id"], "p_a": 0.7, "p_b": 0.3, "winner": heldout["winner"]}).to_parquet(path)
    probe = (
        "import sys; sys.modules['openai'] = None\n"  # any `import openai` now raises ImportError
        "import pandas as pd\n"
        "from kaggle_utils import side_by_side as s\n"
        f"t = s.compare([s.from_predictions('m', {str(path)!r})], s.heldout_rows({str(prepared['train'])!r}, 0))\n"
        "print(round(float(t['accuracy'][0]), 6), 'openai' in sys.modules and sys.modules['openai'] is not None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    share_a = float((schema.labels(heldout) == 0).mean())
    assert proc.stdout.split() == [str(round(share_a, 6)), "False"]
