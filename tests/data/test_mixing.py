"""kaggle_utils.data.mixing: which extra rows training keeps (confidence, agreement with humans, per-source caps)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from kaggle_utils.config import recipes
from kaggle_utils.data import mixing, schema
from kaggle_utils.data.mixing import MixConfig, mix_extras
from kaggle_utils.data.pool import priority
from kaggle_utils.data.schema import TIE, DataError


def _rows(source: str, n: int, **cols) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "id": [f"{source}:{i}" for i in range(n)],
            "prompt": [f"{source} prompt {i}" for i in range(n)],
            "response_a": [f"a {i}" for i in range(n)],
            "response_b": [f"b {i}" for i in range(n)],
            "source": source,
        }
    )
    return df.assign(**cols)


def _teacher(p_a: list[float]) -> dict[str, np.ndarray]:
    """Teacher columns for these P(A): logits log p (a per-row constant away from any raw logits) and p."""
    p = np.array(p_a)
    return {"logit_a": np.log(p), "logit_b": np.log(1 - p), "p_a": p, "p_b": 1 - p, "teacher": "t"}


# confidence (max prob) per dpo row: 0.55, 0.65, 0.75, 0.85, 0.95 and 0.8 (a row that prefers B)
DPO_P_A = [0.55, 0.65, 0.75, 0.85, 0.95, 0.2]
# out-of-fold rows (winner + teacher): agrees at 0.9, disagrees at 0.9, agrees at 0.55, an exact 50/50 teacher
OOF_P_A = [0.9, 0.1, 0.55, 0.5]


@pytest.fixture
def extras() -> pd.DataFrame:
    """After average_teachers: pseudo-labelled rows, hard-labelled rows (one kept tie) and out-of-fold rows."""
    dpo = _rows("dpo", 6, **_teacher(DPO_P_A))
    human = _rows("lmsys", 5, winner=["model_a", "model_b", "model_a", "model_b", TIE])
    human.loc[4, ["p_a", "p_b"]] = [0.5, 0.5]  # a kept tie carries its 50/50 target; the rest have none
    oof = _rows("comp", 4, winner=["model_a", "model_a", "model_a", "model_b"], **_teacher(OOF_P_A))
    df = pd.concat([dpo, human, oof], ignore_index=True)
    return schema.validate(df, "soft")


def _kept(out: pd.DataFrame, source: str) -> list[int]:
    return [int(i.split(":")[1]) for i in out.loc[out["source"] == source, "id"]]


def test_defaults_keep_every_row_and_count_the_kinds(extras, capsys) -> None:
    out, report = mix_extras(MixConfig(), extras, seed=0)
    pd.testing.assert_frame_equal(out, extras)
    t = report.table
    assert t.index.tolist() == ["dpo", "lmsys", "comp"]
    assert t[["in", "teacher", "human", "kept"]].to_dict("index") == {
        "dpo": {"in": 6, "teacher": 6, "human": 0, "kept": 6},
        "lmsys": {"in": 5, "teacher": 0, "human": 5, "kept": 5},  # the tie's p = 0.5 is a human label
        "comp": {"in": 4, "teacher": 4, "human": 4, "kept": 4},
    }
    assert report.dropped() == {"low_confidence": 0, "disagrees_with_human": 0, "source_cap": 0}
    assert "15 in, 15 kept (no filter)" in capsys.readouterr().out  # verbose: the stage's log shows the table
    mix_extras(MixConfig(), extras, seed=0, verbose=False)
    assert capsys.readouterr().out == ""


def test_min_confidence_drops_teacher_only_rows_below_it(extras) -> None:
    out, report = mix_extras(MixConfig(mix_min_confidence=0.7), extras, seed=0, verbose=False)
    assert _kept(out, "dpo") == [2, 3, 4, 5]  # 0.55 and 0.65 dropped; 0.8 toward B kept
    # hard-labelled rows (the tie too) and rows with a human label pass untouched, however unsure the teacher
    assert _kept(out, "lmsys") == [0, 1, 2, 3, 4] and _kept(out, "comp") == [0, 1, 2, 3]
    assert report.table.loc["dpo", ["low_confidence", "kept"]].tolist() == [2, 4]
    assert report.dropped()["low_confidence"] == 2
    out, _ = mix_extras(MixConfig(mix_min_confidence=0.99), extras, seed=0, verbose=False)
    assert _kept(out, "dpo") == [] and len(out) == 9
    # the kept rows are the input's rows, unchanged, in input order
    pd.testing.assert_frame_equal(out, extras[extras["source"] != "dpo"].reset_index(drop=True))


def test_agree_with_human_drops_rows_whose_teacher_prefers_the_other_response(extras) -> None:
    out, report = mix_extras(MixConfig(mix_agree_with_human=True), extras, seed=0, verbose=False)
    assert _kept(out, "comp") == [0, 2, 3]  # row 1 disagrees; the 50/50 teacher disagrees with no one
    assert _kept(out, "dpo") == list(range(6)) and _kept(out, "lmsys") == list(range(5))
    assert report.table.loc["comp", ["disagrees_with_human", "kept"]].tolist() == [1, 3]
    # the teacher's orientation matters: swap A/B on every row and the same row is the one dropped
    swapped, _ = mix_extras(MixConfig(mix_agree_with_human=True), schema.swap_ab(extras), seed=0, verbose=False)
    assert _kept(swapped, "comp") == [0, 2, 3]


def test_caps_count_the_rows_the_filters_kept(extras) -> None:
    cfg = MixConfig(mix_min_confidence=0.7, mix_source_caps={"dpo": 3, "lmsys": 0})
    out, report = mix_extras(cfg, extras, seed=0, verbose=False)
    t = report.table
    assert t.loc["dpo", ["in", "low_confidence", "source_cap", "kept"]].tolist() == [6, 2, 1, 3]
    assert set(_kept(out, "dpo")) < {2, 3, 4, 5}  # never a row the filter dropped
    assert t.loc["lmsys", ["source_cap", "kept"]].tolist() == [5, 0] and _kept(out, "lmsys") == []  # 0: none
    assert _kept(out, "comp") == [0, 1, 2, 3]  # not listed: not capped
    # every line balances: in = the drops + kept
    s = report.summary()
    assert (s["in"] == s[list(mixing.REASONS)].sum(axis=1) + s["kept"]).all()
    assert s.loc["total"].tolist() == [15, 10, 9, 2, 0, 6, 7]


def test_caps_are_seeded_and_independent_of_the_other_rows() -> None:
    big = _rows("big", 200, winner="model_a")
    cfg = MixConfig(mix_source_caps={"big": 20})
    first, _ = mix_extras(cfg, big, seed=0, verbose=False)
    again, _ = mix_extras(cfg, big.sample(frac=1, random_state=1), seed=0, verbose=False)
    other_seed, _ = mix_extras(cfg, big, seed=1, verbose=False)
    assert len(first) == 20 and set(first["id"]) == set(again["id"])
    assert set(first["id"]) != set(other_seed["id"])
    # the rows of lowest pool.priority(id, seed): what the pool stage's caps keep for the same seed
    assert set(first["id"]) == set(big["id"].iloc[np.argsort(priority(big["id"], 0))[:20]])
    # kept in input order, and the same whatever other sources are mixed in
    assert first["id"].tolist() == sorted(first["id"], key=lambda i: int(i.split(":")[1]))
    more = pd.concat([_rows("other", 50, winner="model_b"), big], ignore_index=True)
    with_other, _ = mix_extras(cfg, more, seed=0, verbose=False)
    assert with_other.loc[with_other["source"] == "big", "id"].tolist() == first["id"].tolist()


def test_rows_without_a_source_are_one_group(extras) -> None:
    bare = extras.drop(columns="source")
    out, report = mix_extras(MixConfig(mix_source_caps={mixing.NO_SOURCE: 4}), bare, seed=0, verbose=False)
    assert report.table.index.tolist() == [mixing.NO_SOURCE] and len(out) == 4


def test_a_cap_on_a_source_no_row_has_is_an_error(extras) -> None:
    with pytest.raises(DataError, match=r"source\(s\) \['lmsis'\] that no extra row has .* did you mean 'lmsys'\?"):
        mix_extras(MixConfig(mix_source_caps={"lmsis": 3}), extras, seed=0)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"mix_min_confidence": 0.3}, r"mix_min_confidence=0.3: write a probability in \[0.5, 1\)"),
        ({"mix_min_confidence": 1.0}, r"mix_min_confidence=1.0: .*1 would drop them all"),
        ({"mix_min_confidence": True}, r"mix_min_confidence=True"),
        ({"mix_min_confidence": "0.6"}, r"mix_min_confidence='0.6'"),
        ({"mix_agree_with_human": "yes"}, r"mix_agree_with_human='yes': write true or false"),
        ({"mix_source_caps": [("dpo", 3)]}, r"mix_source_caps=\[\('dpo', 3\)\]: write a table"),
        ({"mix_source_caps": {"dpo": -1}}, r"mix_source_caps \{'dpo': -1\}: each cap is a source name .* >= 0"),
        ({"mix_source_caps": {"dpo": 2.5}}, r"mix_source_caps \{'dpo': 2.5\}"),
        ({"mix_source_caps": {"dpo": True}}, r"mix_source_caps \{'dpo': True\}"),
        ({"mix_source_caps": {"": 3}}, r"mix_source_caps \{'': 3\}"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_settings_are_rejected_naming_the_field(settings: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MixConfig(**settings)


@dataclass
class StageConfig(MixConfig):
    """A stand-in for the train stage's config: MixConfig as a mixin, its checks called from __post_init__."""

    STAGE: ClassVar[str] = "mix-test"

    # the stage's seed, passed to mix_extras
    seed: int = 42

    def __post_init__(self) -> None:
        MixConfig.__post_init__(self)


def test_as_a_mixin_read_from_a_recipe(tmp_path: Path, extras) -> None:
    recipe = tmp_path / "mix.toml"
    recipe.write_text(
        'stage = "mix-test"\n[mix]\nmix_min_confidence = 0.7\nmix_agree_with_human = true\n'
        "mix_source_caps = {dpo = 3}\n"
    )
    cfg = recipes.load(recipe, StageConfig)
    assert cfg.mix_settings == {
        "mix_min_confidence": 0.7,
        "mix_agree_with_human": True,
        "mix_source_caps": {"dpo": 3},
    }
    out, report = mix_extras(cfg, extras, cfg.seed, verbose=False)
    assert report.settings == cfg.mix_settings and len(out) == report.kept == 11
    text = str(report)
    assert "15 in, 11 kept (mix_min_confidence=0.7, mix_agree_with_human=True" in text and "total" in text
    assert json.loads(json.dumps(report.to_dict()))["sources"]["dpo"] == {
        "in": 6, "teacher": 6, "human": 0, "low_confidence": 2, "disagrees_with_human": 0, "source_cap": 1, "kept": 3
    }  # fmt: skip
    recipe.write_text('stage = "mix-test"\nmix_min_confidence = 0.2\n')
    with pytest.raises(recipes.RecipeError, match=r"recipe .*mix\.toml: mix_min_confidence=0.2"):
        recipes.load(recipe, StageConfig)


def test_read_extras_takes_pseudo_labelled_and_hard_labelled_files(tmp_path: Path, extras) -> None:
    teacher = extras[extras["source"] == "dpo"].drop(columns="winner")
    other = teacher.assign(logit_a=teacher["logit_a"] + 1.0, teacher="t2")  # a second teacher, surer of A
    hard = extras[extras["source"] == "lmsys"].drop(columns=["logit_a", "logit_b", "teacher"])
    files = []
    for name, df in (("t1", teacher), ("t2", other), ("hard", hard)):
        files.append(str(tmp_path / f"{name}.parquet"))
        df.to_parquet(files[-1], index=False)
    out = mixing.read_extras(files)
    assert out["id"].tolist() == [*teacher["id"], *hard["id"]]  # one row per id: the teachers merged
    np.testing.assert_allclose(out["logit_a"].iloc[:6], teacher["logit_a"] + 0.5, rtol=1e-6)
    mixed, report = mix_extras(MixConfig(mix_min_confidence=0.99), out, seed=0, verbose=False)
    assert mixed["source"].tolist() == ["lmsys"] * 5 and report.table.loc["lmsys", "human"] == 5
    assert mixing.read_extras([]).empty
    empty, report = mix_extras(MixConfig(), mixing.read_extras([]), seed=0, verbose=False)
    assert empty.empty and report.rows_in == report.kept == 0


def test_confidence_table_says_what_each_min_confidence_keeps(extras) -> None:
    t = mixing.confidence_table(extras, levels=(0.7, 0.9))
    assert t.index.tolist() == ["dpo", "lmsys", "comp"]
    assert t.loc["dpo", ["rows", "teacher", ">= 0.7", ">= 0.9"]].tolist() == [6, 6, 4, 1]
    assert t.loc["dpo", "confidence"] == pytest.approx(np.mean([0.55, 0.65, 0.75, 0.85, 0.95, 0.8]), abs=1e-3)
    assert t.loc["dpo", "prefers_a"] == pytest.approx(5 / 6, abs=1e-3)
    # rows with a human label are never filtered by confidence: none counted; the tie has no teacher
    assert t.loc["lmsys", ["teacher", ">= 0.7"]].tolist() == [0, 0] and t.loc["comp", ">= 0.7"] == 0
    for level in (0.7, 0.9):
        out, _ = mix_extras(MixConfig(mix_min_confidence=level), extras, seed=0, verbose=False)
        assert len(out) == t[f">= {level:g}"].sum() + (extras["winner"].notna()).sum()
