"""Stage generate_pairs against the loopback server: language-balanced seeded sampling, answers from every model,
pairs of two different models with randomised positions, a resumable run, a summary, and the recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from loopback import Fault, LoopbackServer, client_settings, text_hash

from kaggle_utils.api.generate import (
    GenerateConfig,
    form_pairs,
    generate_pairs,
    language_quotas,
    main,
    read_pool,
    sample_prompts,
)
from kaggle_utils.config import recipes
from kaggle_utils.data import schema

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-test-generate-" + "9" * 24


@pytest.fixture
def server():
    with LoopbackServer() as s:
        yield s


def write_pool(path: Path, counts: dict[str, int]) -> Path:
    rows = [(f"{lang} prompt {i}", lang) for lang, n in counts.items() for i in range(n)]
    pd.DataFrame(rows, columns=["prompt", "language"]).to_parquet(path)
    return path


def config(server: LoopbackServer, tmp_path: Path, **overrides) -> GenerateConfig:
    pool = overrides.pop("pool_file", None) or write_pool(tmp_path / "pool.parquet", {"English": 20, "Russian": 8})
    stage = {
        "pool_file": pool,
        "out_file": tmp_path / "out" / "pairs.parquet",
        "n_prompts": 12,
        "models": ["m1", "m2", "m3"],
    }
    return GenerateConfig(**client_settings(server, **{**stage, **overrides}))


# --- sampling ------------------------------------------------------------------------------------------------------


def test_quotas_are_equal_shares_capped_by_availability():
    # 60 over three languages: 20 each, but zh has 5; its 15 go to the other two equally
    assert language_quotas({"en": 100, "ru": 50, "zh": 5}, 60, {}) == {"en": 28, "ru": 27, "zh": 5}
    # a cap reached in the second round is shared again
    assert language_quotas({"en": 100, "ru": 12, "zh": 5}, 60, {}) == {"en": 43, "ru": 12, "zh": 5}
    # asking for more than the pool holds takes everything
    assert language_quotas({"en": 3, "ru": 2}, 60, {}) == {"en": 3, "ru": 2}
    assert sum(language_quotas({"a": 7, "b": 7, "c": 7}, 10, {}).values()) == 10


def test_quotas_follow_the_weights_and_skip_unweighted_languages():
    quotas = language_quotas({"en": 100, "ru": 100, "zh": 100, "xx": 100}, 40, {"en": 2, "ru": 1, "zh": 1})
    assert quotas == {"en": 20, "ru": 10, "zh": 10, "xx": 0}
    assert language_quotas({"en": 100, "ru": 4}, 30, {"en": 1, "ru": 2}) == {"en": 26, "ru": 4}


def test_the_sample_is_balanced_distinct_and_seeded(tmp_path):
    pool = read_pool(write_pool(tmp_path / "pool.parquet", {"en": 100, "ru": 50, "zh": 5}), 8000)
    sample = sample_prompts(pool, 60, {}, seed=1)
    assert sample["language"].value_counts().to_dict() == {"en": 28, "ru": 27, "zh": 5}
    assert sample["prompt"].is_unique and sample["prompt_id"].is_unique
    shuffled = tmp_path / "shuffled.csv"
    pd.read_parquet(tmp_path / "pool.parquet").sample(frac=1, random_state=3).to_csv(shuffled)
    assert sample.equals(sample_prompts(read_pool(shuffled, 8000), 60, {}, seed=1))  # the pool's row order is moot
    assert set(sample["prompt"]) != set(sample_prompts(pool, 60, {}, seed=2)["prompt"])
    # a larger sample keeps the smaller one's prompts (and so their paid answers)
    assert set(sample_prompts(pool, 30, {}, seed=1)["prompt"]) <= set(sample["prompt"])


def test_the_pool_drops_empty_long_and_repeated_prompts(tmp_path):
    path = tmp_path / "pool.csv"
    pd.DataFrame({"prompt": ["a", "a", " ", "x" * 50, "b"], "language": ["en", "en", "en", "en", None]}).to_csv(path)
    pool = read_pool(path, max_prompt_chars=10)
    assert sorted(pool["prompt"]) == ["a", "b"]
    assert pool.set_index("prompt")["language"].to_dict() == {"a": "en", "b": "unknown"}
    pd.DataFrame({"text": ["a"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(
        schema.DataError, match=r"bad\.parquet: a prompt pool needs a 'prompt' column; found \['text'\]"
    ):
        read_pool(tmp_path / "bad.parquet", 10)


# --- pairs ---------------------------------------------------------------------------------------------------------


def test_pairs_use_two_different_models_in_random_positions():
    prompts = pd.DataFrame({"prompt": [f"p{i}" for i in range(400)], "language": "en"})
    prompts.insert(0, "prompt_id", [text_hash(p) * 2 for p in prompts["prompt"]])
    models = ["m1", "m2", "m3"]
    answers = {(pid, m): f"{m} on {pid}" for pid in prompts["prompt_id"] for m in models}
    pairs = form_pairs(prompts, answers, models, per_prompt=2, seed=0)
    assert len(pairs) == 800 and pairs["id"].is_unique
    assert (pairs["model_a"] != pairs["model_b"]).all()
    assert (pairs["response_a"] == pairs["model_a"] + " on " + pairs["prompt_id"]).all()
    assert (pairs["response_b"] == pairs["model_b"] + " on " + pairs["prompt_id"]).all()
    # positions: each model is A in about half of its pairs (it would be 0 or 1 without the flip)
    for m in models:
        share_a = (pairs["model_a"] == m).sum() / ((pairs["model_a"] == m) | (pairs["model_b"] == m)).sum()
        assert 0.4 < share_a < 0.6, (m, share_a)
    for _, group in pairs.groupby("prompt_id"):  # two different pairs of models per prompt
        assert len({frozenset(ab) for ab in zip(group.model_a, group.model_b, strict=True)}) == 2
    assert pairs.equals(form_pairs(prompts, answers, models, per_prompt=2, seed=0))
    assert not pairs.equals(form_pairs(prompts, answers, models, per_prompt=2, seed=1))
    assert (
        pairs["winner"].isna().all() and (pairs["source"] == "generated:" + pairs.model_a + "|" + pairs.model_b).all()
    )


def test_a_prompt_with_fewer_than_two_answers_makes_no_pair():
    prompts = pd.DataFrame({"prompt_id": ["aaaaaaaa", "bbbbbbbb"], "prompt": ["p", "q"], "language": "en"})
    answers = {("aaaaaaaa", "m1"): "x", ("aaaaaaaa", "m2"): "y", ("bbbbbbbb", "m1"): "z"}
    pairs = form_pairs(prompts, answers, ["m1", "m2"], 1, seed=0)
    assert pairs["prompt_id"].tolist() == ["aaaaaaaa"]


class Killed(Exception):
    """Raised from ``after_each`` to stop a run as a kill would."""


# --- the stage -----------------------------------------------------------------------------------------------------


def test_the_stage_writes_unlabelled_pairs_and_a_summary(server, tmp_path, capsys):
    cfg = config(server, tmp_path, prices={"m1": [1.0, 1.0], "m2": [2.0, 2.0], "m3": [0.0, 0.0]})
    result = generate_pairs(cfg)
    out = pd.read_parquet(cfg.out_file)
    schema.validate(out, "unlabeled", source=str(cfg.out_file))
    assert list(out.columns[:8]) == [
        "id",
        "prompt",
        "response_a",
        "response_b",
        "winner",
        "model_a",
        "model_b",
        "language",
    ]
    assert len(out) == 12 and out["winner"].isna().all() and out["source"].str.match(r"generated:m\d\|m\d$").all()
    assert out["language"].value_counts().to_dict() == {"English": 6, "Russian": 6}
    for row in out.itertuples():
        assert row.response_a == f"answer of {row.model_a} to {text_hash(row.prompt)}" and row.model_a != row.model_b
    assert len(server.requests()) == 36 and Counter(r.model for r in server.requests()) == {
        "m1": 12,
        "m2": 12,
        "m3": 12,
    }
    assert json.loads(cfg.out_file.with_name("pairs_config.json").read_text())["models"] == ["m1", "m2", "m3"]
    tokens_in = sum(len(r.message("user").split()) for r in server.requests())
    assert (result.run.input_tokens, result.run.output_tokens) == (tokens_in, 36 * 5)
    usage = result.usage.set_index("model")
    assert usage.loc["total", "cost_usd"] == pytest.approx(
        sum((usage.loc[m, "input_tokens"] + usage.loc[m, "output_tokens"]) * p for m, p in [("m1", 1), ("m2", 2)]) / 1e6
    )
    printed = str(result)
    assert "answered: 36   failed: 0" in printed and "estimated cost: $" in printed and "pairs: 12" in printed


def test_failed_answers_are_counted_and_their_prompts_pair_what_is_left(server, tmp_path):
    cfg = config(server, tmp_path, models=["m1", "m2"], max_attempts=2)
    russian_m2 = lambda r: r.model == "m2" and r.message("user").startswith("Russian")  # noqa: E731
    server.add_faults(Fault.server_error(times=100, match=russian_m2))
    result = generate_pairs(cfg)
    failed_prompts = {r.message("user") for r in server.requests() if russian_m2(r)}
    assert result.run.failed == len(failed_prompts) == 6 and result.run.retries["server_error"] == 6
    assert result.counts["prompts without two answers"] == len(failed_prompts)
    assert len(result.frame) == 12 - len(failed_prompts) and not set(result.frame["prompt"]) & failed_prompts


def test_a_killed_stage_reruns_to_the_same_output_without_asking_twice(server, tmp_path):
    cfg = config(server, tmp_path)

    seen = []

    def kill_after_five(result):
        seen.append(result)
        if len(seen) == 5:
            raise Killed

    with pytest.raises(Killed):
        generate_pairs(cfg, after_each=kill_after_five)
    resumed = generate_pairs(cfg).frame
    assert set(Counter((r.model, r.message("user")) for r in server.requests()).values()) == {1}
    with LoopbackServer() as fresh:
        whole = generate_pairs(config(fresh, tmp_path / "whole", pool_file=cfg.pool_file)).frame
    pd.testing.assert_frame_equal(resumed, whole)


def test_the_key_never_reaches_an_output_file_or_the_log(server, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level("DEBUG")
    monkeypatch.setenv("TEST_API_KEY", SECRET)
    cfg = config(server, tmp_path, api_key_env="TEST_API_KEY")
    generate_pairs(cfg)
    assert {r.headers["authorization"] for r in server.requests()} == {f"Bearer {SECRET}"}
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 4  # pool, pairs, requests, config
    out = capsys.readouterr()
    assert all(SECRET.encode() not in p.read_bytes() for p in files)
    assert SECRET not in out.out + out.err + caplog.text + repr(cfg)


# --- command line and recipes --------------------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess
def test_the_command_line_runs_the_stage(server, tmp_path):
    pool = write_pool(tmp_path / "pool.parquet", {"English": 5, "German": 5})
    out = tmp_path / "pairs.parquet"
    args = ["--recipe", "generate-pairs", "--base-url", server.base_url, "--api-key-env", "", "--prices", "{}"]
    args += ["--max-cost-usd", "0", "--models", '["a", "b"]', "--pool-file", str(pool), "--out-file", str(out)]
    args += ["--n-prompts", "4", "--backoff-base-s", "0.001"]
    proc = subprocess.run(
        [sys.executable, "-m", "kaggle_utils.api.generate", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4 pairs" in proc.stdout and "estimated cost: unknown" in proc.stdout
    # the recipe weighs English 2 and German 1: 4 x 2/3 = 2.67 and 1.33, the larger remainder rounds up
    assert pd.read_parquet(out)["language"].value_counts().to_dict() == {"English": 3, "German": 1}


def test_help_lists_the_recipes(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "generate-pairs " in text and "demo-generate-pairs " in text and "--language-weights" in text


@pytest.mark.parametrize("name", [r.name for r in recipes.available("generate_pairs")])
def test_every_recipe_loads(name):
    """What tests/config checks for the notebooks' stages (its table does not know the API stages yet)."""
    cfg = recipes.load(name, GenerateConfig)
    for key, value in recipes.read(name).values.items():
        got = getattr(cfg, key)
        assert (str(got) if isinstance(got, Path) else got) == value, key
    assert cfg.max_cost_usd == 0 or set(cfg.models) <= set(cfg.prices)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"models": ["m1", "m1"]}, "at least two different models"),
        ({"models": ["m1", "m2"], "pairs_per_prompt": 2}, r"pairs_per_prompt=2 must be in 1..1"),
        ({"max_cost_usd": 5.0, "prices": {"m1": [1.0, 1.0]}}, r"needs prices for \['m2'\]"),
    ],
)
def test_config_checks_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        GenerateConfig(**{"models": ["m1", "m2"], **overrides})
