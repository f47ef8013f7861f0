"""kaggle_utils.data.sources: every public format into one schema, every dropped row counted, bad input named.

The fixtures are small frames written from the formats as documented (docs/facts.md §2): the competition train
file, LMSYS arena-55k (JSON turn lists, null turns, one-hot winner), chatbot_arena_conversations
({role, content} lists, two kinds of tie), chosen/rejected DPO pairs, messages pairs labelled A/B and an
unlabelled pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_utils.data import sources
from kaggle_utils.data.schema import TIE, DataError


def conv(*turns: tuple[str, str | None]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


@pytest.fixture
def competition_df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ["c1", "c2", "c3", "c4"],
            "prompt": ["What is 2+2?", "Name a colour", "Hi", "Bonjour"],
            "response_a": ["4", "Red", b"\xff\xfe broken", "Salut"],
            "response_b": ["Four.", "Blue", "Hello", "Coucou"],
            "winner": ["model_a", "model_b", "model_a", "tie"],
            "model_a": ["m1", "m2", "m1", "m3"],
            "model_b": ["m2", "m1", "m3", "m1"],
            "language": ["English", "English", "English", "French"],
        }
    )


def test_competition(competition_df) -> None:
    out, rep = sources.competition(competition_df)
    assert list(out.columns) == list(sources.COLUMNS)
    assert out["id"].tolist() == ["competition:c1", "competition:c2"]
    assert out["source_id"].tolist() == ["c1", "c2"] and set(out["source"]) == {"competition"}
    assert out["winner"].tolist() == ["model_a", "model_b"]
    # the non-UTF-8 bytes row and the tie are dropped, each under its reason
    assert rep.dropped() == {"not_utf8": 1, "tie": 1}
    rep.check_balanced()
    s = rep.summary().loc[("normalise", "competition")]
    assert (s["in"], s["out"]) == (4, 2)


def test_strict_mode_names_source_column_and_row(competition_df) -> None:
    with pytest.raises(DataError, match=r"comp: column 'response_a' row 2 \(source_id='c3'\): text is not valid UTF-8"):
        sources.competition(competition_df, source="comp", strict=True)


def test_missing_column_and_wrong_types(competition_df) -> None:
    with pytest.raises(DataError, match=r"comp: missing column\(s\) \['winner'\]"):
        sources.competition(competition_df.drop(columns="winner"), source="comp")
    bad = competition_df.iloc[:2].astype(object)
    bad.loc[1, "prompt"] = 12345
    out, rep = sources.competition(bad)
    assert rep.dropped() == {"wrong_type": 1} and len(out) == 1
    with pytest.raises(DataError, match=r"column 'prompt' row 1 .*expected text: '12345'"):
        sources.competition(bad, strict=True)


@pytest.fixture
def lmsys_df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [1, 2, 3, 4, 5, 6],
            "model_a": ["gpt-4", "llama", "claude", "gpt-4", "x", "y"],
            "model_b": ["llama", "claude", "gpt-4", "vicuna", "y", "x"],
            "prompt": [
                json.dumps(["What is AI?"]),
                json.dumps(["Hi", "Tell me more"]),
                json.dumps(["Tie question"]),
                '["unterminated',
                json.dumps(["Q"]),
                json.dumps(["Z"]),
            ],
            "response_a": [
                json.dumps(["AI is..."]),
                json.dumps(["Hello!", None]),
                json.dumps(["a"]),
                json.dumps(["a"]),
                json.dumps(["a"]),
                json.dumps(["a"]),
            ],
            "response_b": [
                json.dumps(["Artificial intelligence."]),
                json.dumps(["Hey", "Sure: more."]),
                json.dumps(["b"]),
                json.dumps(["b"]),
                json.dumps(["b"]),
                json.dumps([3]),
            ],
            "winner_model_a": [1, 0, 0, 1, 1, 0],
            "winner_model_b": [0, 1, 0, 0, 1, 1],
            "winner_tie": [0, 0, 1, 0, 0, 0],
        }
    )


def test_lmsys_55k(lmsys_df) -> None:
    out, rep = sources.lmsys_55k(lmsys_df)
    assert out["source_id"].tolist() == ["1", "2"]
    assert out["winner"].tolist() == ["model_a", "model_b"]
    single, multi = out.iloc[0], out.iloc[1]
    # one turn: kept as is, like the competition's rows
    assert (single["prompt"], single["response_b"]) == ("What is AI?", "Artificial intelligence.")
    # several turns: "[turn k]" headers, a blank line between turns, a null turn as an empty text
    assert multi["prompt"] == "[turn 1]\nHi\n\n[turn 2]\nTell me more"
    assert multi["response_a"] == "[turn 1]\nHello!\n\n[turn 2]\n"
    assert multi["response_b"] == sources.join_turns(["Hey", "Sure: more."])
    assert out["language"].isna().all()
    # row 3 is a tie, row 4 has a truncated JSON prompt, row 5 two winners, row 6 a number as a turn
    assert rep.dropped() == {"bad_json": 2, "bad_label": 1, "tie": 1}
    assert rep.notes() == {"multi_turn": 1, "null_turns": 1}
    rep.check_balanced()


def test_lmsys_55k_strict_names_json_row(lmsys_df) -> None:
    # a tie is an expected drop even in strict mode; the unparsable JSON is bad input
    with pytest.raises(DataError, match=r"lmsys-55k: column 'prompt' row 3 \(source_id='4'\): not a JSON list"):
        sources.lmsys_55k(lmsys_df.drop(index=4).reset_index(drop=True), strict=True)


@pytest.fixture
def arena_df() -> pd.DataFrame:
    q = [("user", "Capital of France?")]
    return pd.DataFrame(
        {
            "question_id": ["q1", "q2", "q3", "q4", "q5"],
            "model_a": ["a", "b", "c", "d", "e"],
            "model_b": ["f", "g", "h", "i", "j"],
            "winner": ["model_a", "model_b", "tie", "tie (bothbad)", "model_a"],
            "judge": ["arena_user_1"] * 5,
            "conversation_a": [
                conv(*q, ("assistant", "Paris.")),
                conv(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Goodbye")),
                conv(*q, ("assistant", "Paris")),
                conv(*q, ("assistant", "Lyon")),
                conv(*q, ("assistant", "Paris")),
            ],
            "conversation_b": [
                conv(*q, ("assistant", "It is Paris.")),
                conv(("user", "Hi"), ("assistant", "Hey"), ("user", "Bye"), ("assistant", "See you")),
                conv(*q, ("assistant", "Paris!")),
                conv(*q, ("assistant", "Nice")),
                conv(("user", "Another question"), ("assistant", "Paris")),
            ],
            "turn": [1, 2, 1, 1, 1],
            "anony": [True] * 5,
            "language": ["English"] * 5,
            "tstamp": [1.0] * 5,
        }
    )


def test_arena_conversations(arena_df, tmp_path: Path) -> None:
    out, rep = sources.arena_conversations(arena_df)
    assert out["source_id"].tolist() == ["q1", "q2"]
    assert out.loc[0, ["prompt", "response_a", "response_b"]].tolist() == [
        "Capital of France?",
        "Paris.",
        "It is Paris.",
    ]
    assert out.loc[1, "prompt"] == "[turn 1]\nHi\n\n[turn 2]\nBye"
    assert out.loc[1, "response_b"] == "[turn 1]\nHey\n\n[turn 2]\nSee you"
    assert out["language"].tolist() == ["English", "English"]
    # both kinds of tie are ties; q5's conversations disagree on the user turn
    assert rep.dropped() == {"prompt_mismatch": 1, "tie": 2}
    # the same rows through a parquet file: list<struct> columns come back as numpy arrays of dicts
    arena_df.to_parquet(tmp_path / "arena.parquet")
    out2, rep2 = sources.normalise(tmp_path / "arena.parquet", "arena_conversations")
    pd.testing.assert_frame_equal(out2.drop(columns=["id", "source"]), out.drop(columns=["id", "source"]))
    assert rep2.dropped() == rep.dropped()


def test_dpo_text_pairs_are_placed_at_random_with_a_seed() -> None:
    n = 2000
    df = pd.DataFrame(
        {"prompt": [f"p{i}" for i in range(n)], "chosen": [f"good {i}" for i in range(n)], "rejected": ["bad"] * n}
    )
    out, rep = sources.dpo(df, seed=7)
    winning = np.where(out["winner"] == "model_a", out["response_a"], out["response_b"])
    losing = np.where(out["winner"] == "model_a", out["response_b"], out["response_a"])
    assert (winning == df["chosen"].to_numpy()).all() and (losing == "bad").all()
    share_b = (out["winner"] == "model_b").mean()
    assert 0.46 < share_b < 0.54 and rep.notes() == {"chosen_at_b": int((out["winner"] == "model_b").sum())}
    pd.testing.assert_frame_equal(out, sources.dpo(df, seed=7)[0])
    assert not sources.dpo(df, seed=8)[0]["winner"].equals(out["winner"])


def test_dpo_conversation_pairs() -> None:
    df = pd.DataFrame(
        {
            "chosen": [
                conv(("system", "Be nice"), ("user", "Q1"), ("assistant", "good")),
                conv(("user", "Q2"), ("assistant", "good2")),
                "not a conversation",
            ],
            "rejected": [
                conv(("system", "Be nice"), ("user", "Q1"), ("assistant", "bad")),
                conv(("user", "Q2")),
                conv(("user", "Q3"), ("assistant", "x")),
            ],
        }
    )
    out, rep = sources.dpo(df, source="argilla", seed=0)
    assert len(out) == 1 and out.loc[0, "prompt"] == "Q1" and out.loc[0, "source_id"] == "0"
    assert {out.loc[0, "response_a"], out.loc[0, "response_b"]} == {"good", "bad"}
    # row 2's rejected side has no assistant turn, row 3's chosen is not a list of messages
    assert rep.dropped() == {"bad_conversation": 2}
    assert rep.notes()["system_turns"] == 1


def test_dpo_text_pairs_need_a_prompt_column() -> None:
    with pytest.raises(DataError, match="dpo: chosen/rejected are texts but there is no 'prompt'"):
        sources.dpo(pd.DataFrame({"chosen": ["a"], "rejected": ["b"]}))


def test_messages_pairs() -> None:
    q = ("user", "Explain gravity")
    df = pd.DataFrame(
        {
            "id": ["m1", "m2", "m3", "m4"],
            "messages_a": [conv(q, ("assistant", f"a{i}")) for i in range(4)],
            "messages_b": [conv(q, ("assistant", f"b{i}")) for i in range(4)],
            "label": ["A", "b", "tie", "C"],
        }
    )
    out, rep = sources.messages(df, source="rlhflow")
    assert out["winner"].tolist() == ["model_a", "model_b"]
    assert out["response_b"].tolist() == ["b0", "b1"]
    assert rep.dropped() == {"bad_label": 1, "tie": 1}
    with pytest.raises(DataError, match=r"rlhflow: column 'label' row 3 \(source_id='m4'\): expected one of"):
        sources.messages(df, source="rlhflow", strict=True)


def test_unlabelled_pool_and_duplicate_ids() -> None:
    df = pd.DataFrame(
        {"id": ["u1", "u2", "u1"], "prompt": ["p", "q", "r"], "response_a": ["a"] * 3, "response_b": ["b"] * 3}
    )
    out, rep = sources.unlabelled(df, source="pool")
    assert out["winner"].isna().all() and out["id"].tolist() == ["pool:u1", "pool:u2"]
    assert rep.dropped() == {"duplicate_id": 1}
    rep.check_balanced()


def test_normalise_all_gives_unique_ids_across_sources(competition_df, lmsys_df, arena_df) -> None:
    inputs = [
        (competition_df, "competition", "comp"),
        (lmsys_df, "lmsys_55k", "l55"),
        (arena_df, "arena_conversations", "ac"),
    ]
    out, rep = sources.normalise_all(inputs)
    assert out["id"].is_unique and out["source"].value_counts().to_dict() == {"comp": 2, "l55": 2, "ac": 2}
    rep.check_balanced()
    assert set(rep.summary().index.get_level_values("source")) == {"comp", "l55", "ac"}
    with pytest.raises(ValueError, match="distinct"):
        sources.normalise_all([(competition_df, "competition", "x"), (arena_df, "arena_conversations", "x")])


def test_read_bad_files(tmp_path: Path, competition_df) -> None:
    good = tmp_path / "ok.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in competition_df.iloc[:2].to_dict("records")) + "\n")
    assert len(sources.read(good)) == 2
    truncated = tmp_path / "cut.jsonl"
    truncated.write_text(good.read_text()[:-20])
    with pytest.raises(DataError, match=r"src: .*cut\.jsonl line 2 is not valid JSON .*truncated file\?"):
        sources.read(truncated, "src")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl line 2 is not UTF-8"):
        sources.read(latin)
    competition_df.iloc[:2].to_parquet(tmp_path / "t.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "t.parquet").read_bytes()[:-100])
    with pytest.raises(DataError, match=r"comp: .*cut\.parquet: cannot be read as parquet"):
        sources.normalise(tmp_path / "cut.parquet", "competition", "comp")
    with pytest.raises(DataError, match="not .parquet, .csv"):
        sources.read(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="unknown format"):
        sources.normalise(competition_df, "nope")


def test_keep_ties_keeps_them_as_ties_in_every_format_with_ties(competition_df, lmsys_df, arena_df) -> None:
    q = ("user", "Explain gravity")
    messages_df = pd.DataFrame(
        {
            "id": ["m1", "m2", "m3"],
            "messages_a": [conv(q, ("assistant", f"a{i}")) for i in range(3)],
            "messages_b": [conv(q, ("assistant", f"b{i}")) for i in range(3)],
            "label": ["A", "tie", "B"],
        }
    )
    frames = {
        "competition": competition_df,
        "lmsys_55k": lmsys_df,
        "arena_conversations": arena_df,
        "messages": messages_df,
    }
    assert set(frames) == set(sources.TIE_FORMATS)
    ties = {"competition": ["c4"], "lmsys_55k": ["3"], "arena_conversations": ["q3", "q4"], "messages": ["m2"]}
    for fmt, df in frames.items():
        dropped, rep_dropped = sources.normalise(df, fmt)
        kept, rep = sources.normalise(df, fmt, keep_ties=True)
        # a tie is "tie", never a win; the other rows and every other drop are as without keep_ties
        assert kept.loc[kept["winner"] == TIE, "source_id"].tolist() == ties[fmt], fmt
        assert kept[kept["winner"] != TIE].reset_index(drop=True).equals(dropped), fmt
        assert rep.dropped() == {k: v for k, v in rep_dropped.dropped().items() if k != "tie"}, fmt
        assert rep.notes()["tie_kept"] == rep_dropped.dropped()["tie"] == len(ties[fmt]), fmt
        rep.check_balanced()
    # the default drops them (the tie is an expected drop, so strict mode does not raise on it)
    assert TIE not in set(sources.competition(competition_df.drop(index=2), strict=True)[0]["winner"])


def test_keep_ties_on_a_parquet_file_and_a_tie_that_is_bad_otherwise(tmp_path: Path, arena_df) -> None:
    # q5 is a normal winner with mismatched prompts; make it a tie: it is dropped as prompt_mismatch, not kept
    arena_df.loc[4, "winner"] = "tie"
    arena_df.to_parquet(tmp_path / "arena.parquet")
    out, rep = sources.normalise(tmp_path / "arena.parquet", "arena_conversations", keep_ties=True, batch_rows=2)
    assert out["source_id"].tolist() == ["q1", "q2", "q3", "q4"]
    assert rep.dropped() == {"prompt_mismatch": 1} and rep.notes()["tie_kept"] == 2


def test_parquet_batches_is_public_and_names_the_source(tmp_path: Path, competition_df) -> None:
    competition_df.iloc[:2].to_parquet(tmp_path / "t.parquet")
    batches = list(sources.parquet_batches(tmp_path / "t.parquet", "comp", 1))
    assert [b.num_rows for b in batches] == [1, 1] and batches[1].column("id").to_pylist() == ["c2"]
    with pytest.raises(DataError, match=r"comp: .*gone\.parquet: file not found"):
        list(sources.parquet_batches(tmp_path / "gone.parquet", "comp", 1))
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "t.parquet").read_bytes()[:-100])
    with pytest.raises(DataError, match=r"comp: .*cut\.parquet: cannot be read as parquet"):
        list(sources.parquet_batches(tmp_path / "cut.parquet", "comp", 1))
    assert not hasattr(sources, "_parquet_batches")
