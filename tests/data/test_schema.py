"""kaggle_utils.data.schema: schema validation with precise errors, labels, and the A/B swap."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_utils.data import schema
from kaggle_utils.data.schema import DataError


def _train_frame(n: int = 8) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"id-{i}" for i in range(n)],
            "prompt": [f"prompt {i}" for i in range(n)],
            "response_a": [f"answer A {i}" for i in range(n)],
            "response_b": [f"answer B number {i}" for i in range(n)],
            "winner": ["model_a" if i % 3 else "model_b" for i in range(n)],
            "model_a": [f"ma-{i}" for i in range(n)],
            "model_b": [f"mb-{i}" for i in range(n)],
            "language": ["English"] * n,
        }
    )


def _soft_frame(n: int = 8) -> pd.DataFrame:
    df = _train_frame(n).drop(columns=["winner"])
    p_a = np.linspace(0.1, 0.9, n)
    return df.assign(p_a=p_a, p_b=1 - p_a)


def _write(df: pd.DataFrame, path: Path) -> Path:
    df.to_parquet(path, index=False)
    return path


def _assert_names(err: DataError, path: Path, column: str | None, row: int | None) -> None:
    msg = str(err)
    assert str(path) in msg, msg
    if column is not None:
        assert column in msg, msg
    if row is not None:
        assert re.search(rf"\brow {row}\b", msg), msg


def test_valid_file_loads_unchanged(tmp_path: Path) -> None:
    df = _train_frame()
    out = schema.load(_write(df, tmp_path / "train.parquet"), "train")
    pd.testing.assert_frame_equal(out, df, check_dtype=False)


def test_csv_loads(tmp_path: Path) -> None:
    df = _train_frame()
    path = tmp_path / "train.csv"
    df.to_csv(path, index=False)
    assert list(schema.load(path, "train")["id"]) == list(df["id"])


def test_missing_column(tmp_path: Path) -> None:
    path = _write(_train_frame().drop(columns=["response_b"]), tmp_path / "train.parquet")
    with pytest.raises(DataError) as exc:
        schema.load(path, "train")
    _assert_names(exc.value, path, "response_b", None)
    assert "missing column" in str(exc.value)


def test_none_text_cell(tmp_path: Path) -> None:
    df = _train_frame()
    df["response_b"] = df["response_b"].astype(object)
    df.loc[5, "response_b"] = None
    path = _write(df, tmp_path / "test.parquet")
    with pytest.raises(DataError) as exc:
        schema.load(path, "test")
    _assert_names(exc.value, path, "'response_b'", 5)
    assert "id-5" in str(exc.value)


def test_non_string_text_cell_in_frame() -> None:
    df = _train_frame().astype({"prompt": object})
    df.loc[3, "prompt"] = 42
    with pytest.raises(DataError) as exc:
        schema.validate(df, "unlabeled", source="pool.parquet")
    _assert_names(exc.value, Path("pool.parquet"), "'prompt'", 3)
    assert "int" in str(exc.value)


def test_duplicate_id(tmp_path: Path) -> None:
    df = _train_frame()
    df.loc[6, "id"] = "id-2"
    path = _write(df, tmp_path / "train.parquet")
    with pytest.raises(DataError) as exc:
        schema.load(path, "train")
    _assert_names(exc.value, path, "'id'", 6)
    assert "id-2" in str(exc.value)


def test_bad_winner(tmp_path: Path) -> None:
    df = _train_frame()
    df.loc[4, "winner"] = "tie"
    path = _write(df, tmp_path / "train.parquet")
    with pytest.raises(DataError) as exc:
        schema.load(path, "train")
    _assert_names(exc.value, path, "'winner'", 4)
    assert "'tie'" in str(exc.value)


def test_winner_not_required_for_test_kind(tmp_path: Path) -> None:
    df = _train_frame()
    df.loc[4, "winner"] = "tie"
    assert len(schema.load(_write(df, tmp_path / "t.parquet"), "test")) == len(df)


@pytest.mark.parametrize("bad", [(0.7, 0.7), (1.2, -0.2), (np.nan, 1.0)], ids=["sum-1.4", "negative", "nan"])
def test_soft_labels_must_be_probabilities(tmp_path: Path, bad: tuple[float, float]) -> None:
    df = _soft_frame()
    df.loc[5, ["p_a", "p_b"]] = bad
    path = _write(df, tmp_path / "pseudo.parquet")
    with pytest.raises(DataError) as exc:
        schema.load(path, "soft")
    _assert_names(exc.value, path, "'p_a','p_b'", 5)


def test_soft_labels_valid(tmp_path: Path) -> None:
    df = _soft_frame()
    out = schema.load(_write(df, tmp_path / "pseudo.parquet"), "soft")
    np.testing.assert_allclose(out[["p_a", "p_b"]].sum(axis=1), 1.0)


def test_truncated_parquet(tmp_path: Path) -> None:
    path = _write(_train_frame(), tmp_path / "train.parquet")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as exc:
        schema.load(path, "train")
    _assert_names(exc.value, path, None, None)
    assert "cannot be read as parquet" in str(exc.value)


def test_garbage_and_missing_and_wrong_suffix(tmp_path: Path) -> None:
    garbage = tmp_path / "x.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match=re.escape(str(garbage))):
        schema.read_table(garbage)
    with pytest.raises(DataError, match="file not found"):
        schema.read_table(tmp_path / "nope.parquet")
    other = tmp_path / "x.json"
    other.write_text("{}")
    with pytest.raises(DataError, match="expected a .parquet or .csv"):
        schema.read_table(other)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        schema.validate(_train_frame(), "nonsense")


def test_swap_ab_swaps_everything() -> None:
    df = _train_frame().assign(p_a=np.linspace(0.2, 0.8, 8))
    df["p_b"] = 1 - df["p_a"]
    out = schema.swap_ab(df)
    assert list(out["response_a"]) == list(df["response_b"])
    assert list(out["response_b"]) == list(df["response_a"])
    assert list(out["model_a"]) == list(df["model_b"])
    assert list(out["model_b"]) == list(df["model_a"])
    flip = {"model_a": "model_b", "model_b": "model_a"}
    assert list(out["winner"]) == [flip[w] for w in df["winner"]]
    np.testing.assert_array_equal(out["p_a"], df["p_b"])
    np.testing.assert_array_equal(out["p_b"], df["p_a"])
    # untouched columns and the input itself
    assert list(out["prompt"]) == list(df["prompt"]) and list(out["id"]) == list(df["id"])
    assert list(df["response_a"]) == [f"answer A {i}" for i in range(8)]
    np.testing.assert_array_equal(schema.labels(out), 1 - schema.labels(df))


def test_swap_ab_twice_is_identity() -> None:
    df = _train_frame().assign(p_a=np.linspace(0.2, 0.8, 8))
    df["p_b"] = 1 - df["p_a"]
    pd.testing.assert_frame_equal(schema.swap_ab(schema.swap_ab(df)), df)
    soft = _soft_frame()  # no winner column
    pd.testing.assert_frame_equal(schema.swap_ab(schema.swap_ab(soft)), soft)


def test_swap_probs() -> None:
    probs = np.array([[0.875, 0.125], [0.25, 0.75]], dtype=np.float32)
    np.testing.assert_array_equal(schema.swap_probs(probs), [[0.125, 0.875], [0.75, 0.25]])
    np.testing.assert_array_equal(schema.swap_probs(schema.swap_probs(probs)), probs)


def test_labels() -> None:
    df = _train_frame(4)
    assert df["winner"].tolist() == ["model_b", "model_a", "model_a", "model_b"]
    np.testing.assert_array_equal(schema.labels(df), [1, 0, 0, 1])


def test_soft_targets_one_hot_without_probabilities() -> None:
    df = _train_frame(4)
    np.testing.assert_array_equal(schema.soft_targets(df), [[0, 1], [1, 0], [1, 0], [0, 1]])


def test_soft_targets_uses_probabilities_and_falls_back_per_row() -> None:
    df = _train_frame(4).assign(p_a=[0.8, np.nan, 0.25, np.nan], p_b=[0.2, np.nan, 0.75, np.nan])
    np.testing.assert_allclose(schema.soft_targets(df), [[0.8, 0.2], [1, 0], [0.25, 0.75], [0, 1]])


def test_soft_targets_of_soft_file() -> None:
    df = _soft_frame(3)
    np.testing.assert_allclose(schema.soft_targets(df), df[["p_a", "p_b"]].to_numpy())


# --- teacher logits (issue 10): the distillation targets ------------------------------------------------------
def test_swap_ab_swaps_teacher_logits() -> None:
    df = _soft_frame(3).assign(logit_a=[1.0, -2.0, 0.5], logit_b=[0.0, 0.25, np.nan])
    out = schema.swap_ab(df)
    np.testing.assert_array_equal(out["logit_a"], df["logit_b"])
    np.testing.assert_array_equal(out["logit_b"], df["logit_a"])
    np.testing.assert_array_equal(schema.teacher_logits(out), schema.teacher_logits(df)[:, ::-1])
    pd.testing.assert_frame_equal(schema.swap_ab(out), df)


def test_teacher_logits_prefer_logits_and_fall_back_to_log_probabilities() -> None:
    df = _train_frame(4).assign(
        p_a=[0.8, 0.25, np.nan, 0.0],
        p_b=[0.2, 0.75, np.nan, 1.0],
        logit_a=[3.0, np.nan, np.nan, np.nan],
        logit_b=[-1.0, np.nan, np.nan, np.nan],
    )
    got = schema.teacher_logits(df)
    assert got.dtype == np.float32 and got.shape == (4, 2)
    np.testing.assert_allclose(got[0], [3.0, -1.0])  # the logits where given
    np.testing.assert_allclose(got[1], np.log([0.25, 0.75]), rtol=1e-6)  # else log p: softmax gives p back
    assert np.isnan(got[2]).all()  # no teacher: the row is trained on its human label
    np.testing.assert_allclose(got[3], np.log([schema.PROB_FLOOR, 1.0]), rtol=1e-6)  # p = 0 clipped, not -inf
    assert np.isnan(schema.teacher_logits(_train_frame(2))).all()  # a file without a teacher


def test_log_probabilities_give_the_same_softened_target_as_the_logits() -> None:
    """softmax(log p / T) = softmax(z / T) when p = softmax(z): probability-only rows follow the temperature exactly."""
    z = np.array([[1.3, -0.4], [-2.0, 0.5]])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    from_probs = schema.teacher_logits(pd.DataFrame({"p_a": p[:, 0], "p_b": p[:, 1]}))
    for t in (0.25, 2.0, 5.0):
        a, b = from_probs / t, z / t
        np.testing.assert_allclose(
            np.exp(a) / np.exp(a).sum(1, keepdims=True), np.exp(b) / np.exp(b).sum(1, keepdims=True), rtol=1e-5
        )


def test_average_teachers_averages_logits_per_id() -> None:
    pool = _soft_frame(3)
    t1 = pool.assign(logit_a=[2.0, 0.0, -1.0], logit_b=[0.0, 1.0, 0.0])
    t2 = pool.iloc[[0, 1]].assign(p_a=[0.5, 0.5], p_b=[0.5, 0.5])  # probabilities only: logits log(0.5), log(0.5)
    out = schema.average_teachers([t1, t2], sources=["llama.parquet", "qwen.parquet"])
    assert out["id"].tolist() == pool["id"].tolist()
    margin = (out["logit_a"] - out["logit_b"]).to_numpy()
    np.testing.assert_allclose(margin, [1.0, -0.5, -1.0])  # (2 + 0) / 2, (-1 + 0) / 2, the first teacher alone
    np.testing.assert_allclose(out["p_a"], 1 / (1 + np.exp(-margin)))
    np.testing.assert_allclose(out["p_a"] + out["p_b"], 1.0)


def test_average_teachers_refuses_rows_in_another_orientation() -> None:
    pool = _soft_frame(2)
    with pytest.raises(DataError, match=r"qwen.parquet: id .* another response A than in llama.parquet"):
        schema.average_teachers([pool, schema.swap_ab(pool)], sources=["llama.parquet", "qwen.parquet"])


def _hard_frame(n: int = 4) -> pd.DataFrame:
    """A hard-labelled extra file as the pool writes it: a winner, no teacher; p_a/p_b empty but on kept ties."""
    df = _train_frame(n).assign(source="lmsys", p_a=np.nan, p_b=np.nan)
    df.loc[n - 1, ["winner", "p_a", "p_b"]] = [schema.TIE, 0.5, 0.5]
    return df


def test_soft_kind_takes_hard_labelled_extras(tmp_path: Path) -> None:
    hard = _hard_frame()
    out = schema.load(_write(hard, tmp_path / "extra_labelled.parquet"), "soft")
    pd.testing.assert_frame_equal(out, hard)
    # without p columns at all (a pool file written before ties were kept) and mixed with pseudo-labelled rows
    schema.load(_write(_train_frame(), tmp_path / "plain.parquet"), "soft")
    mixed = pd.concat([_soft_frame().assign(id=lambda d: "p" + d["id"]), hard], ignore_index=True)
    schema.validate(mixed, "soft")
    # a row with logits only is a teacher row too
    logits = _train_frame().drop(columns="winner").assign(logit_a=0.3, logit_b=-1.0)
    schema.validate(logits, "soft")
    # what the train stage then reads from them: teacher logits only where a teacher or a tie gave p
    lg = schema.teacher_logits(mixed)
    assert np.isfinite(lg).all(1).tolist() == [True] * 8 + [False, False, False, True]
    np.testing.assert_allclose(lg[-1], np.log([0.5, 0.5]))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"winner": None}, r"row 1 \(id='id-1'\) has no target: no 'p_a','p_b', no finite 'logit_a','logit_b'"),
        ({"winner": "tie"}, r"row 1 \(id='id-1'\) is a tie without 'p_a','p_b'"),
        ({"winner": "both"}, r"column 'winner' row 1 \(id='id-1'\) is 'both'; expected one of"),
    ],
    ids=["no-target", "tie-without-p", "bad-winner"],
)
def test_soft_kind_rejects_a_row_without_a_usable_target(change: dict, match: str) -> None:
    df = _train_frame(3)
    for col, value in change.items():
        df[col] = df[col].astype(object)
        df.loc[1, col] = value
    with pytest.raises(DataError, match=match):
        schema.validate(df, "soft", source="extra.parquet")
    # a winner does not excuse broken probabilities: p given on the row must still be a distribution
    df = _train_frame(3).assign(p_a=[np.nan, 0.9, np.nan], p_b=[np.nan, 0.9, np.nan])
    with pytest.raises(DataError, match=r"columns 'p_a','p_b' row 1 .* expected two probabilities"):
        schema.validate(df, "soft")


def test_swap_ab_leaves_a_tie_and_an_empty_winner_alone() -> None:
    df = _hard_frame().astype({"winner": object})
    df.loc[0, "winner"] = None
    out = schema.swap_ab(df)
    assert pd.isna(out["winner"].iloc[0]) and out["winner"].tolist()[1:] == ["model_b", "model_b", schema.TIE]
    assert out["response_a"].tolist() == df["response_b"].tolist()
    assert schema.swap_ab(out)["winner"].tolist()[1:] == df["winner"].tolist()[1:]
