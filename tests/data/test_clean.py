"""kaggle_utils.data.clean: quality filters, pair dedup, leakage control, language, A/B balance, folds.

Dedup, leakage and fold invariants are property-tested with hypothesis on frames built from a small
alphabet, so that duplicates, swapped copies, case/space variants and shared prompts occur often.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaggle_utils.data import clean
from kaggle_utils.data.sources import COLUMNS
from kaggle_utils.prepare import assign_folds


def frame(rows: list[tuple], source: str = "s") -> pd.DataFrame:
    """Rows of (prompt, response_a, response_b, winner[, language, source])."""
    recs = []
    for i, r in enumerate(rows):
        p, a, b, w = r[:4]
        lang = r[4] if len(r) > 4 else "English"
        src = r[5] if len(r) > 5 else source
        recs.append(
            {"id": f"{src}:{i}", "prompt": p, "response_a": a, "response_b": b, "winner": w, "model_a": "m1",
             "model_b": "m2", "language": lang, "source": src, "source_id": str(i)}
        )  # fmt: skip
    return pd.DataFrame(recs, columns=list(COLUMNS))


def test_quality_filter_counts_each_reason() -> None:
    cfg = clean.QualityConfig(min_response_chars=3, max_prompt_chars=200, max_response_chars=300)
    rows = [
        ("Explain tides", "The moon pulls water.", "Gravity of the moon.", "model_a"),  # kept
        ("", "some answer", "other answer", "model_a"),  # empty
        ("   \n ", "some answer", "other answer", "model_b"),  # whitespace only
        ("Explain tides", "ok", "A longer answer", "model_b"),  # too short
        ("Explain tides", "Same answer", "  Same answer\n", "model_a"),  # identical (after trimming)
        ("Explain tides", "#### ---- **** !!!! ????", "A real answer", "model_a"),  # non-text junk
        ("Explain tides", "Fine text \x00\x01 with control bytes", "A real answer", "model_a"),  # non-text
        ("x" * 201, "An answer", "Another answer", "model_a"),  # extreme prompt
        ("Explain tides", "An answer", "long " * 61, "model_b"),  # extreme response
        ("Объясни приливы", "Луна притягивает воду.", "月亮的引力。", "model_a"),  # kept: non-ASCII letters
    ]
    out, rep = clean.quality_filter(frame(rows), cfg)
    assert rep.dropped() == {
        "empty": 1, "whitespace_only": 1, "too_short": 1, "identical_responses": 1, "non_text": 2, "extreme_length": 2,
    }  # fmt: skip
    assert out["source_id"].tolist() == ["0", "9"]
    rep.check_balanced()


def test_text_stats_counts_characters_not_bytes() -> None:
    s = clean.text_stats(pd.Series(["abc!", "日本語", "", "  "]))
    assert s["chars"].tolist() == [4, 3, 0, 2] and s["stripped_chars"].tolist() == [4, 3, 0, 0]
    assert s["alnum_share"].tolist() == [0.75, 1.0, 0.0, 0.0]


def test_dedup_treats_swapped_pairs_as_one_within_and_across_sources() -> None:
    rows = [
        ("What is AI?", "Answer one", "Answer two", "model_a", "English", "comp"),
        ("what  is AI? ", "Answer two", "Answer one", "model_b", "English", "comp"),  # swapped copy, same label
        ("What is AI?", "Answer one", "Answer two", "model_b", "English", "dpo"),  # copy, conflicting label
        ("What is AI?", "Answer one", "Answer three", "model_a", "English", "dpo"),  # another pair
    ]
    out, rep = clean.dedup(frame(rows))
    assert out["source"].tolist() == ["comp", "dpo"] and out["response_b"].tolist() == ["Answer two", "Answer three"]
    assert rep.dropped() == {"duplicate_pair": 1, "duplicate_pair_swapped": 1}
    assert rep.notes() == {"label_conflict": 1}
    per_source = rep.table().query("kind == 'dropped'").groupby("source")["rows"].sum().to_dict()
    assert per_source == {"comp": 1, "dpo": 1}
    rep.check_balanced()


words = st.sampled_from(["Hello", "hello", "world", " world", "WORLD ", "a", "b", "日本", "test"])
texts = st.lists(words, min_size=1, max_size=3).map(" ".join)
pair_rows = st.lists(st.tuples(texts, texts, texts, st.sampled_from(["model_a", "model_b"])), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=pair_rows, swap=st.lists(st.booleans(), min_size=40, max_size=40))
def test_dedup_invariants(rows, swap) -> None:
    # every row also appears swapped (where `swap` says so): dedup must fold the copies back together
    extra = [
        (p, b, a, "model_b" if w == "model_a" else "model_a")
        for (p, a, b, w), s in zip(rows, swap[: len(rows)], strict=True)
        if s
    ]
    df = frame(rows + extra)
    out, rep = clean.dedup(df)
    keys_in, keys_out = clean.pair_keys(df), clean.pair_keys(out)
    assert len(set(keys_out)) == len(keys_out)  # no pair twice, in either order
    assert set(keys_out) == set(keys_in)  # and no pair lost
    assert rep.summary()["out"].sum() == len(out)
    rep.check_balanced()
    again, rep2 = clean.dedup(out)  # idempotent
    assert len(again) == len(out) and rep2.dropped() == {}
    # the order of the input rows decides which copy is kept, not which pairs survive
    shuffled, _ = clean.dedup(df.sample(frac=1.0, random_state=1))
    assert set(clean.pair_keys(shuffled)) == set(keys_out)


def test_leakage_exact_and_near() -> None:
    long = "Write a detailed essay about the history of the Roman empire and its fall in the west"
    holdout = [long, "What is the capital of Peru?", "hi"]
    rows = [
        ("  WHAT is the capital of   peru?", "Lima", "Cusco", "model_a"),  # exact after normalising
        (long.replace("detailed", "detailled"), "x1", "y1", "model_a"),  # near duplicate (one typo)
        ("Write a poem about the sea and the wind and the gulls over the harbour", "x2", "y2", "model_b"),
        ("hello", "x3", "y3", "model_a"),  # short: only an exact match would count
    ]
    out, rep, dropped = clean.drop_leaks(frame(rows), holdout)
    assert rep.dropped() == {"leak_exact": 1, "leak_near": 1}
    assert out["source_id"].tolist() == ["2", "3"]
    assert dropped["holdout_index"].tolist() == [1, 0]
    assert dropped["similarity"].iloc[0] == 1.0 and 0.7 <= dropped["similarity"].iloc[1] < 1.0
    exact_only, rep2, _ = clean.drop_leaks(frame(rows), holdout, clean.LeakConfig(near=False))
    assert rep2.dropped() == {"leak_exact": 1} and len(exact_only) == 3
    rep.check_balanced()


@settings(max_examples=40, deadline=None)
@given(train=st.lists(texts, min_size=1, max_size=30), hold=st.lists(texts, min_size=0, max_size=10))
def test_leakage_invariant_no_holdout_prompt_survives(train, hold) -> None:
    df = frame([(p, "answer a", "answer b", "model_a") for p in train])
    out, rep, dropped = clean.drop_leaks(df, hold)
    assert not set(clean.prompt_keys(out["prompt"])) & set(clean.prompt_keys(hold))
    assert len(out) + len(dropped) == len(df)
    # nothing is dropped that does not match: every exact drop's prompt is a holdout prompt
    exact = dropped[dropped["similarity"] == 1.0]
    assert set(clean.prompt_keys(exact["prompt"])) <= set(clean.prompt_keys(hold))
    rep.check_balanced()


def test_minhash_estimates_similarity() -> None:
    a = "the quick brown fox jumps over the lazy dog near the river bank today"
    docs = [a, a.replace("lazy", "lazzy"), "completely unrelated sentence about taxes", ""]
    sig = clean.minhash(docs, num_perm=64)
    assert (sig[0] == sig[1]).mean() > 0.6 and (sig[0] == sig[2]).mean() < 0.2
    assert (sig[3] == np.iinfo(np.uint32).max).all()
    np.testing.assert_array_equal(sig, clean.minhash(docs, num_perm=64, chunk=3))  # chunking changes nothing


folds_rows = st.lists(
    st.tuples(texts, st.sampled_from(["English", "Russian", "Chinese", None])), min_size=1, max_size=60
)


@settings(max_examples=60, deadline=None)
@given(rows=folds_rows, n_folds=st.integers(2, 5))
def test_fold_invariants(rows, n_folds) -> None:
    df = pd.DataFrame({"prompt": [p for p, _ in rows], "language": [lang for _, lang in rows]})
    folds = assign_folds(df, n_folds)
    assert folds.min() >= 0 and folds.max() < n_folds
    key = clean.prompt_keys(df["prompt"])
    # grouped: one normalised prompt, one fold
    assert (pd.Series(folds).groupby(key).nunique() == 1).all()
    # stratified: inside each language, prompt groups are dealt evenly over the folds
    lang = df["language"].fillna("unknown")
    groups = (
        pd.DataFrame({"key": key, "lang": lang, "fold": folds})
        .groupby("key")
        .agg(lang=("lang", "min"), fold=("fold", "first"))
    )
    for _, g in groups.groupby("lang"):
        sizes = g["fold"].value_counts().reindex(range(n_folds), fill_value=0)
        assert sizes.max() - sizes.min() <= 1
    # independent of row order
    perm = np.random.default_rng(0).permutation(len(df))
    np.testing.assert_array_equal(assign_folds(df.iloc[perm], n_folds), folds[perm])


def test_ab_balance_and_balancing() -> None:
    rows = [(f"p{i}", f"win {i}", f"lose {i}", "model_a", "English", "s") for i in range(30)]
    rows += [(f"q{i}", f"lose {i}", f"win {i}", "model_b", "English", "s") for i in range(10)]
    rows += [(f"r{i}", f"win {i}", f"lose {i}", "model_a", "English", "t") for i in range(5)]
    df = frame(rows)
    before = clean.ab_balance(df).set_index("source")
    assert before.loc["s", ["rows", "a_wins", "b_wins"]].tolist() == [40, 30, 10] and before.loc["s", "share_a"] == 0.75
    out, rep = clean.balance_ab(df, seed=1)
    after = clean.ab_balance(out).set_index("source")
    assert after.loc["s", ["a_wins", "b_wins"]].tolist() == [20, 20]
    assert after.loc["t", ["a_wins", "b_wins"]].tolist() == [3, 2]
    assert rep.notes() == {"swapped": 12}
    # swapping moves the winner with its text: the winning response is still the "win" one on every row
    won = np.where(out["winner"] == "model_a", out["response_a"], out["response_b"])
    assert all(w.startswith("win") for w in won)
    assert out["id"].tolist() == df["id"].tolist()


def test_fill_language_keeps_given_labels() -> None:
    rows = [
        ("How do I bake bread at home?", "a1", "b1", "model_a", "German"),  # given (even if wrong): kept
        ("How do I bake bread at home?", "a2", "b2", "model_a", None),
        ("Как испечь хлеб дома?", "a3", "b3", "model_b", None),
        ("如何在家里烤面包？", "a4", "b4", "model_b", ""),
    ]
    out, rep = clean.fill_language(frame(rows))
    assert out["language"].tolist() == ["German", "English", "Russian", "Chinese"]
    assert rep.notes() == {"language_detected": 3}


def test_clean_runs_every_step_and_accounts_for_every_row() -> None:
    rows = [(f"Prompt number {i}", f"answer a {i}", f"answer b {i}", "model_a", None, "s") for i in range(20)]
    rows += [("Prompt number 3", "answer b 3", "answer a 3", "model_b", None, "t")]  # swapped duplicate
    rows += [("", "a", "b", "model_a", None, "t")]
    out, rep = clean.clean(frame(rows), ["prompt number 5"], clean.CleanConfig(balance=True))
    rep.check_balanced()
    assert rep.dropped() == {"duplicate_pair_swapped": 1, "empty": 1, "leak_exact": 1}
    assert len(out) == 19 and out["language"].notna().all()
    assert list(rep.summary().index.get_level_values("step").unique()) == [
        "quality",
        "dedup",
        "leakage",
        "language",
        "balance",
    ]
    shares = clean.ab_balance(out)["share_a"]
    assert ((shares - 0.5).abs() <= 0.05).all()


@pytest.mark.parametrize("threshold", [0, 1.5])
def test_leak_config_validated(threshold) -> None:
    with pytest.raises(ValueError, match="threshold"):
        clean.LeakConfig(threshold=threshold)
