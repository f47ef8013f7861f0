"""Stage fewshot against the loopback server: shots from the row's language (or the most similar prompts), nested
across k, answers balanced A/B, both orders, invalid answers counted, a table per k and a plot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from loopback import Fault, LoopbackServer, Received, client_settings, judging
from matplotlib.figure import Figure

from kaggle_utils.api import fewshot
from kaggle_utils.api.fewshot import FewShotConfig, char_ngram_tfidf, plot_accuracy, rank_shots, run_fewshot
from kaggle_utils.api.judge import JUDGE_SYSTEM
from kaggle_utils.config import recipes
from kaggle_utils.data import schema

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-test-fewshot-" + "5" * 30
LANGUAGES = ("English", "Russian", "German")
TOPICS = ("cooking pasta recipes", "quantum physics lectures", "football match results", "python code bugs")


def learner(req: Received) -> str:
    """With 4 or more shots it picks the longer response (right 3 times in 4 here), with fewer the shorter one."""
    shots = sum(1 for m in req.body["messages"] if m["role"] == "assistant")
    judged = judging(
        Received(req.method, req.path, req.headers, {**req.body, "model": "ft:x" if shots >= 4 else "b"}, 0)
    )
    return judged


@pytest.fixture
def server():
    with LoopbackServer(responder=learner) as s:
        yield s


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("FEWSHOT_TEST_KEY", SECRET)


def labelled(path, n: int = 60):
    rows = []
    for i in range(n):
        short, long = f"short {i}", f"a longer and more careful answer number {i} " * 2
        a_long, longer_wins = i % 2 == 0, i % 4 != 0
        rows.append(
            {
                "id": f"r{i}",
                "prompt": f"question {i} about {TOPICS[i % len(TOPICS)]}",
                "response_a": long if a_long else short,
                "response_b": short if a_long else long,
                "winner": "model_a" if a_long == longer_wins else "model_b",
                "model_a": "x",
                "model_b": "y",
                "language": LANGUAGES[i % 3] if i < n - 1 else "Klingon",  # one row of a language with no pool
            }
        )
    pd.DataFrame(rows).to_parquet(path)
    return path


def config(server: LoopbackServer, tmp_path, **overrides) -> FewShotConfig:
    stage = {
        "input_file": labelled(tmp_path / "train.parquet"),
        "out_dir": tmp_path / "fewshot",
        "model": "judge-model",
        "shots": [0, 2, 4, 8],
        "n_eval": 12,
        "api_key_env": "FEWSHOT_TEST_KEY",
        "prices": {"judge-model": [1.0, 2.0]},
    }
    return FewShotConfig(**client_settings(server, **{**stage, **overrides}))


def shots_of(req: Received) -> list[tuple[str, str]]:
    """(shot prompt, answer) of each shot turn in a request, in order."""
    msgs = req.body["messages"]
    return [
        (re.search(r"\[User Question\]\n(.*?)\n\n\[The Start", u["content"], re.DOTALL).group(1), a["content"])
        for u, a in zip(msgs[1:-1:2], msgs[2:-1:2], strict=True)
    ]


def test_tfidf_rows_are_unit_vectors_and_similar_texts_score_higher():
    x = char_ngram_tfidf(["cooking pasta with tomato", "cooking pasta with garlic", "quantum field theory"], 3, 512)
    assert x.shape == (3, 512) and np.allclose(np.linalg.norm(x, axis=1), 1)
    sims = x @ x.T
    assert sims[0, 1] > 0.5 > sims[0, 2]
    assert np.array_equal(
        x, char_ngram_tfidf(["cooking pasta with tomato", "cooking pasta with garlic", "quantum field theory"], 3, 512)
    )


def test_shots_come_from_the_language_nested_across_k_and_balanced(server, tmp_path):
    cfg = config(server, tmp_path)
    result = run_fewshot(cfg)
    table = result.table.set_index("k")
    assert list(table.index) == [0, 2, 4, 8] and (table["answers"] == 24).all()
    requests = server.requests()
    assert len(requests) == 4 * 12 * 2
    languages = pd.read_parquet(cfg.input_file).set_index("prompt")["language"]
    by_query: dict[str, dict[int, list]] = {}
    for req in requests:
        msgs = req.body["messages"]
        assert msgs[0] == {"role": "system", "content": JUDGE_SYSTEM} and msgs[-1]["role"] == "user"
        shots = shots_of(req)
        query = re.search(r"\[User Question\]\n(.*?)\n\n\[The Start", msgs[-1]["content"], re.DOTALL).group(1)
        # A and B answers in equal numbers, alternating from the question backwards
        assert [a for _, a in shots] == ["B", "A"] * (len(shots) // 2)
        if languages[query] != "Klingon":
            assert {languages[p] for p, _ in shots} <= {languages[query]}
        assert query not in {p for p, _ in shots}  # never its own example
        by_query.setdefault(query, {})[len(shots)] = [p for p, _ in shots]
    for ks in by_query.values():  # the shots of k=2 are the best-ranked of k=4's, which are among k=8's
        assert ks[2] == ks[4][-2:] and ks[4] == ks[8][-4:]


def test_the_table_counts_every_answer_and_accuracy_follows_the_rule(server, tmp_path):
    cfg = config(server, tmp_path)
    result = run_fewshot(cfg)
    table = result.table.set_index("k")
    answers = result.answers
    # per answer: the learner picks the longer response from 4 shots on; the longer one wins 3 rows in 4
    eval_ids = answers["row_id"].unique()
    longer_wins = pd.Series([int(i[1:]) % 4 != 0 for i in eval_ids], index=eval_ids)
    share = longer_wins.mean()
    assert table.loc[0, "accuracy"] == pytest.approx(1 - share) and table.loc[2, "accuracy"] == pytest.approx(1 - share)
    assert table.loc[4, "accuracy"] == pytest.approx(share) and table.loc[8, "accuracy"] == pytest.approx(share)
    assert (table["consistency"] == 1.0).all() and (table["invalid"] == 0).all()
    assert table.loc[8, "input_tokens"] > table.loc[4, "input_tokens"] > table.loc[0, "input_tokens"]
    assert table.loc[0, "cost_usd"] == pytest.approx(
        (table.loc[0, "input_tokens"] * 1.0 + table.loc[0, "output_tokens"] * 2.0) / 1e6
    )
    assert set(result.by_language["language"]) <= {*LANGUAGES, "Klingon"}
    assert (cfg.out_dir / "table.csv").is_file() and (cfg.out_dir / "answers.parquet").is_file()
    fig = plot_accuracy(result.table)
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 4
    # a rerun asks nothing again
    asked = len(server.requests())
    assert run_fewshot(cfg).run.resumed == 96 and len(server.requests()) == asked


def test_invalid_answers_are_counted_per_k(server, tmp_path):
    cfg = config(server, tmp_path, shots=[0, 2], both_orders=False)
    zero_shot = lambda r: not any(m["role"] == "assistant" for m in r.body["messages"])  # noqa: E731
    server.add_faults(Fault(content="Both are equally good.", times=3, match=zero_shot))
    table = run_fewshot(cfg).table.set_index("k")
    assert table.loc[0, "invalid"] == 3 and table.loc[2, "invalid"] == 0
    assert table.loc[0, "invalid_rate"] == pytest.approx(3 / 12) and table.loc[0, "answers"] == 12
    assert np.isnan(table.loc[0, "consistency"])  # one order only


def pair_keys(frame: pd.DataFrame) -> set:
    """Each row's prompt and its two responses, in no order."""
    triples = zip(frame["prompt"], frame["response_a"], frame["response_b"], strict=True)
    return {(p, frozenset((a, b))) for p, a, b in triples}


def test_a_repeated_pair_never_becomes_a_shot_of_itself(tmp_path):
    df = pd.read_parquet(labelled(tmp_path / "t.parquet", 20))
    twin = df.iloc[[0, 1]].assign(id=["twin0", "twin1"])
    twin.iloc[1] = schema.swap_ab(twin.iloc[[1]]).iloc[0]  # the same pair in the other order
    eval_rows, pool = fewshot.split_eval(pd.concat([df, twin], ignore_index=True), 19, seed=0)
    assert not pair_keys(eval_rows) & pair_keys(pool)
    # seed 0 puts row 1 and its swapped twin on different sides: the pool copy was left out
    assert len(eval_rows) == 19 and len(pool) == 2


def test_similarity_puts_the_same_topic_first(server, tmp_path):
    cfg = config(server, tmp_path, selection="similarity", shots=[2])
    df = pd.read_parquet(cfg.input_file)
    eval_rows, pool = fewshot.split_eval(df, cfg.n_eval, cfg.seed)
    ranked = rank_shots(eval_rows, pool, cfg)
    topic = lambda prompt: next(t for t in TOPICS if t in prompt)  # noqa: E731
    for i, picks in enumerate(ranked):
        if eval_rows["language"][i] == "Klingon":
            continue
        assert topic(pool["prompt"][picks[0]]) == topic(eval_rows["prompt"][i])
        assert set(pool["language"][picks]) == {eval_rows["language"][i]}


def test_the_cli_runs_a_recipe_and_writes_the_plot(server, tmp_path, capsys):
    cfg = config(server, tmp_path)
    fewshot.main(
        [
            "--recipe", "fewshot-gpt-4o-mini-similar", "--input-file", str(cfg.input_file),
            "--out-dir", str(cfg.out_dir), "--n-eval", "6", "--shots", "[0, 2]",
            "--base-url", server.base_url, "--api-key-env", "FEWSHOT_TEST_KEY",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert (cfg.out_dir / "accuracy_vs_k.png").stat().st_size > 1000 and "accuracy" in out
    assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in server.received)
    assert SECRET not in out and not any(
        SECRET.encode() in p.read_bytes() for p in cfg.out_dir.rglob("*") if p.is_file()
    )


@pytest.mark.slow  # a subprocess
def test_the_module_runs_from_a_shell(server, tmp_path):
    cfg = config(server, tmp_path)
    args = ["--recipe", "fewshot-gpt-4o-mini", "--input-file", str(cfg.input_file), "--out-dir", str(cfg.out_dir)]
    args += ["--n-eval", "4", "--shots", "[0, 2]", "--base-url", server.base_url, "--api-key-env", "FEWSHOT_TEST_KEY"]
    env = {**os.environ, "FEWSHOT_TEST_KEY": SECRET}
    proc = subprocess.run(
        [sys.executable, "-m", "kaggle_utils.api.fewshot", *args], capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "accuracy_vs_k.png" in proc.stdout and len(server.requests()) == 4 * 2 * 2
    assert SECRET not in proc.stdout + proc.stderr


def test_configs_refuse_odd_shots_and_unknown_selections(tmp_path):
    with pytest.raises(ValueError, match="even"):
        FewShotConfig(shots=[0, 3], api_key_env="")
    with pytest.raises(ValueError, match="selection"):
        FewShotConfig(selection="nearest", api_key_env="")
    base = recipes.load("fewshot-gpt-4o-mini", FewShotConfig)
    similar = recipes.load("fewshot-gpt-4o-mini-similar", FewShotConfig)
    assert (base.selection, similar.selection) == ("language", "similarity") and base.shots == similar.shots
