"""kaggle_utils.data.pool: a manifest of public sources into the labelled extra set and the unlabelled pool.

Inputs are the small synthetic files in the public formats that ``demo.write_public_formats`` writes (ties, a
truncated JSON row, copies across sources and leaked test prompts planted), plus hand-made files where a test
needs exact control over one case.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.figure
import numpy as np
import pandas as pd
import pytest

from kaggle_utils.config import recipes
from kaggle_utils.data import pool, schema
from kaggle_utils.data.clean import prompt_keys
from kaggle_utils.data.demo import PUBLIC_FILES, write_public_formats
from kaggle_utils.data.mixing import MixConfig, mix_extras
from kaggle_utils.data.schema import TIE, DataError, swap_ab

N_ROWS = 40


@pytest.fixture(scope="module")
def public(tmp_path_factory, demo_files) -> Path:
    out = tmp_path_factory.mktemp("public")
    write_public_formats(out, n_rows=N_ROWS, seed=0, test_file=demo_files["test"])
    return out


def manifest(public: Path, **overrides) -> list[dict]:
    """The five demo sources, labelled ones first; ``overrides``: source name -> keys to change."""
    entries = [
        {"name": "lmsys", "path": str(public / PUBLIC_FILES["lmsys_55k"]), "format": "lmsys_55k"},
        {"name": "arena", "path": str(public / PUBLIC_FILES["arena_conversations"]), "format": "arena_conversations"},
        {"name": "dpo", "path": str(public / PUBLIC_FILES["dpo"]), "format": "dpo", "labelled": False},
        {"name": "msgs", "path": str(public / PUBLIC_FILES["messages"]), "format": "messages", "labelled": False},
        {"name": "gen", "path": str(public / PUBLIC_FILES["unlabelled"]), "format": "unlabelled", "labelled": False},
    ]
    for e in entries:
        e.update(overrides.get(e["name"], {}))
    return entries


def config(public: Path, out: Path, demo_files, sources=None, **kwargs) -> pool.PoolConfig:
    return pool.PoolConfig(
        sources=sources or manifest(public), holdout_files=[str(demo_files["test"])], out_dir=out, **kwargs
    )


@pytest.fixture(scope="module")
def run(public, demo_files, tmp_path_factory) -> pool.PoolResult:
    cfg = config(public, tmp_path_factory.mktemp("pool"), demo_files, sources=manifest(public, gen={"weight": 0.5}))
    return pool.assemble(cfg)


def outputs(result: pool.PoolResult) -> dict[str, pd.DataFrame]:
    return {k: pd.read_parquet(p) for k, p in result.paths.items()}


def test_outputs_carry_provenance_per_row(run, public) -> None:
    out = outputs(run)
    lab, unl = out["labelled"], out["unlabelled"]
    assert list(lab.columns) == [*pool.OUTPUT_SCHEMAS["labelled"].names]
    assert "winner" not in unl.columns and set(lab["winner"]) == {"model_a", "model_b"}
    assert set(lab["source"]) == {"lmsys", "arena"} and set(unl["source"]) == {"dpo", "msgs", "gen"}
    for df in (lab, unl):
        assert df["id"].is_unique and (df["id"] == df["source"] + ":" + df["source_id"]).all()
    assert (unl.loc[unl["source"] == "gen", "weight"] == 0.5).all() and (lab["weight"] == 1.0).all()
    # the original id leads back to the raw row: lmsys ids, and the file + row number within the DPO folder
    raw = pd.read_csv(public / PUBLIC_FILES["lmsys_55k"]).set_index("id")
    for row in lab[lab["source"] == "lmsys"].itertuples():
        turns = json.loads(raw.loc[int(row.source_id), "prompt"])
        if len(turns) == 1:
            assert row.prompt == turns[0]
            # A/B balancing may have swapped the pair: the winning text is still the one the raw row preferred
            raw_a, raw_b = (json.loads(raw.loc[int(row.source_id), c])[0] for c in ("response_a", "response_b"))
            raw_won = raw_a if raw.loc[int(row.source_id), "winner_model_a"] == 1 else raw_b
            assert (row.response_a if row.winner == "model_a" else row.response_b) == raw_won
    assert run.report.notes().get("swapped", 0) > 0
    dpo = unl[unl["source"] == "dpo"]
    assert dpo["source_id"].str.match(r"^part-[01]\.parquet:\d+$").all()
    part, number = dpo["source_id"].iloc[0].split(":")
    raw_row = pd.read_parquet(public / "dpo" / part).iloc[int(number)]
    assert dpo["prompt"].iloc[0] == raw_row["prompt"]
    assert {dpo["response_a"].iloc[0], dpo["response_b"].iloc[0]} == {raw_row["chosen"], raw_row["rejected"]}


def test_the_report_adds_up_per_source(run) -> None:
    summary = run.summary()
    drops = summary.drop(columns=["output", "in", "kept"])
    assert (summary["in"] == summary["kept"] + drops.sum(axis=1)).all()
    assert (summary["in"] == N_ROWS).all()
    out = outputs(run)
    written = pd.concat([out["labelled"], out["unlabelled"]])["source"].value_counts()
    assert written.reindex(summary.index).tolist() == summary["kept"].tolist()
    assert run.rows == {"labelled": len(out["labelled"]), "unlabelled": len(out["unlabelled"])}
    run.report.check_balanced()
    # and each step takes in exactly what the step before it let out
    flow = run.report.table().query("kind in ['in', 'out']").groupby(["source", "step", "kind"], sort=False)
    for source, part in flow["rows"].sum().groupby(level=0):
        rows = part.to_numpy()  # in, out, in, out, ... in step order
        assert (rows[2::2] == rows[1:-1:2]).all(), source
    # the files on disk say the same
    out_dir = run.paths["labelled"].parent
    doc = json.loads((out_dir / "pool_report.json").read_text())
    assert {s["source"]: s["kept"] for s in doc["sources"]} == summary["kept"].to_dict()
    table = pd.read_csv(out_dir / "pool_report.csv")
    assert table["rows"].sum() == run.report.table()["rows"].sum()
    # rows per source × language at the last step are the rows written
    langs = pd.read_csv(out_dir / "pool_languages.csv").query("step == 'selected'")
    assert langs.groupby("source")["rows"].sum().reindex(summary.index).tolist() == summary["kept"].tolist()
    assert (langs["language"] != "unknown").all()  # every source without a language column got one detected


def test_planted_cases_are_counted(run) -> None:
    s = run.summary()
    # lmsys: ties at rows 5, 15, 25, 35 and one truncated JSON prompt; arena: two kinds of tie; messages: one tie
    assert (s.loc["lmsys", "tie"], s.loc["lmsys", "bad_json"], s.loc["arena", "tie"], s.loc["msgs", "tie"]) == (
        4,
        1,
        2,
        1,
    )
    assert (s.loc["gen", "too_short"], s.loc["msgs", "identical_responses"]) == (1, 1)
    # arena rows 0-4 repeat lmsys rows 10-14, swapped on the even ones: kept once, from lmsys (listed first)
    assert (s.loc["arena", "duplicate_pair"], s.loc["arena", "duplicate_pair_swapped"]) == (2, 3)
    assert s.loc["lmsys", ["duplicate_pair", "duplicate_pair_swapped"]].sum() == 0
    # the label of a swapped copy agreed with its original: no conflicts noted
    assert run.report.notes().get("label_conflict", 0) == 0


def test_cross_source_duplicates_kept_once_from_the_first_source(tmp_path, demo_files) -> None:
    base = pd.DataFrame(
        {
            "id": ["a1", "a2"],
            "prompt": ["Explain the tides, please", "Name three rivers of Europe"],
            "response_a": ["The moon pulls the sea.", "Rhine, Danube, Elbe."],
            "response_b": ["Wind moves the water.", "Nile, Amazon, Congo."],
            "winner": ["model_a", "model_a"],
            "model_a": ["m1", "m1"],
            "model_b": ["m2", "m2"],
            "language": ["English", "English"],
        }
    )
    base.to_parquet(tmp_path / "first.parquet")
    # the second source holds row a1 A/B-swapped (its label follows) and a1 as is, plus one new pair
    copy = pd.concat([swap_ab(base.iloc[[0]]), base.iloc[[0]], base.iloc[[1]].assign(response_b="Seine, Loire.")])
    copy.assign(id=["b1", "b2", "b3"]).to_json(tmp_path / "second.jsonl", orient="records", lines=True)
    # the unlabelled third source repeats a2 swapped: dropped too, though it is another output
    swap_ab(base.iloc[[1]]).drop(columns="winner").assign(id="c1").to_csv(tmp_path / "third.csv", index=False)
    sources = [
        {"name": "first", "path": str(tmp_path / "first.parquet"), "format": "competition"},
        {"name": "second", "path": str(tmp_path / "second.jsonl"), "format": "competition"},
        {"name": "third", "path": str(tmp_path / "third.csv"), "format": "unlabelled", "labelled": False},
    ]
    result = pool.assemble(pool.PoolConfig(sources=sources, out_dir=tmp_path / "out", balance_ab=False))
    lab = pd.read_parquet(result.paths["labelled"])
    assert lab["id"].tolist() == ["first:a1", "first:a2", "second:b3"]
    assert len(pd.read_parquet(result.paths["unlabelled"])) == 0
    dropped = result.report.table().query("kind == 'dropped'").groupby(["source", "reason"])["rows"].sum().to_dict()
    assert dropped == {
        ("second", "duplicate_pair"): 1,
        ("second", "duplicate_pair_swapped"): 1,
        ("third", "duplicate_pair_swapped"): 1,
    }


def test_leaked_prompts_are_dropped_and_counted(run, demo_files) -> None:
    out = outputs(run)
    test_keys = set(prompt_keys(pd.read_parquet(demo_files["test"])["prompt"]))
    for df in out.values():
        assert not set(prompt_keys(df["prompt"])) & test_keys
    s = run.summary()
    # planted: lmsys row 18 in other spacing/case, generated rows 0 and 1 verbatim (synthetic prompts may add more)
    assert s.loc["lmsys", "leak_exact"] >= 1 and s.loc["gen", "leak_exact"] >= 2
    leaks = pd.read_csv(run.paths["labelled"].parent / "pool_leaks.csv")
    assert len(leaks) == s[["leak_exact", "leak_near"]].to_numpy().sum()
    assert {"lmsys:1018", "gen:syn-u00000", "gen:syn-u00001"} <= set(leaks["id"])
    test = pd.read_parquet(demo_files["test"])
    hit = leaks.set_index("id").loc["gen:syn-u00001"]
    assert (
        hit["holdout_file"] == str(demo_files["test"])
        and test["prompt"].iloc[hit["holdout_row"]] == (test["prompt"].iloc[2])
    )


def test_allocate_fills_toward_the_shares() -> None:
    shares = {"English": 0.5, "Russian": 0.3, "other": 0.2}
    # Russian has fewer rows than its share: all kept, the rest split 0.5 : 0.2
    assert pool.allocate({"English": 100, "Russian": 5, "other": 50}, shares, 60) == {
        "English": 39,
        "Russian": 5,
        "other": 16,
    }
    assert pool.allocate({"English": 100, "Russian": 100, "other": 100}, shares, 10) == {
        "English": 5,
        "Russian": 3,
        "other": 2,
    }
    # no budget shortage: everything; a bucket without a share only after the shared ones run out
    assert pool.allocate({"English": 3, "Japanese": 4}, shares, 100) == {"English": 3, "Japanese": 4}
    assert pool.allocate({"English": 3, "Japanese": 4}, {"English": 1.0}, 5) == {"English": 3, "Japanese": 2}


def test_caps_and_language_balance_are_respected(public, demo_files, tmp_path) -> None:
    shares = {"English": 0.6, "Russian": 0.2, "other": 0.2}
    cfg = config(
        public, tmp_path, demo_files, sources=manifest(public, msgs={"cap": 7}, arena={"languages": ["English"]}),
        unlabelled_rows=50, language_shares=shares, language_caps={"Chinese": 2},
    )  # fmt: skip
    result = pool.assemble(cfg)
    out = outputs(result)
    lab, unl = out["labelled"], out["unlabelled"]
    s = result.summary()
    assert (unl["source"] == "msgs").sum() == 7 and s.loc["msgs", "source_cap"] > 0
    assert set(lab.loc[lab["source"] == "arena", "language"]) == {"English"}
    assert s.loc["arena", "language_not_selected"] > 0
    for df in (lab, unl):
        assert (df["language"] == "Chinese").sum() <= 2
    # the budget binds on the unlabelled output: 50 rows, per bucket what allocate() gives for what was there
    assert len(unl) == 50
    before = result.languages.query("step == 'cap'")
    before = before[before["source"].isin(["dpo", "msgs", "gen"])]
    lang = before["language"]
    capped = before.assign(rows=np.where(lang == "Chinese", 0, before["rows"]))  # Chinese: at most 2, counted apart
    chinese = min(2, before.loc[lang == "Chinese", "rows"].sum())
    buckets = capped.assign(b=lang.where(lang.isin(shares), "other")).groupby("b")["rows"].sum().to_dict()
    buckets["other"] = buckets.get("other", 0) + chinese
    want = pool.allocate(buckets, shares, 50)
    got = unl["language"].where(unl["language"].isin(shares), "other").value_counts().to_dict()
    assert got == {k: v for k, v in want.items() if v}
    # no budget on the labelled output: only the cap and the source's language filter removed rows
    assert s.loc[["lmsys", "arena"], "language_balance"].sum() == 0


def test_same_seed_same_files_other_seed_other_rows(public, demo_files, tmp_path, monkeypatch) -> None:
    def run_with(seed: int, name: str) -> dict[str, pd.DataFrame]:
        cfg = config(public, tmp_path / name, demo_files, unlabelled_rows=60, seed=seed)
        return outputs(pool.assemble(cfg))

    first, again, other = run_with(0, "a"), run_with(0, "b"), run_with(1, "c")
    monkeypatch.setattr(pool, "WRITE_BATCH", 5)  # shards written and read back 5 rows at a time
    chunked = outputs(pool.assemble(config(public, tmp_path / "d", demo_files, unlabelled_rows=60, chunk_rows=7)))
    for k in first:
        pd.testing.assert_frame_equal(first[k], again[k])
        pd.testing.assert_frame_equal(first[k], chunked[k])  # a chunk at a time changes no row
    assert set(first["unlabelled"]["id"]) != set(other["unlabelled"]["id"])
    # A/B balance: each labelled source's winners split evenly (within one row)
    for _, part in first["labelled"].groupby("source"):
        counts = part["winner"].value_counts()
        assert abs(counts.get("model_a", 0) - counts.get("model_b", 0)) <= 1


def test_a_bad_manifest_entry_fails_before_any_work(public, demo_files, tmp_path) -> None:
    out = tmp_path / "never"
    with pytest.raises(DataError, match=r"source 'msgs' \(sources\[3\]\): format 'message' is not a normaliser "
                       r"\(did you mean 'messages'\?\); set one of"):  # fmt: skip
        config(public, out, demo_files, sources=manifest(public, msgs={"format": "message"}))
    with pytest.raises(DataError, match=r"source 'dpo' \(sources\[2\]\): unknown key 'lablled'; did you mean"):
        config(public, out, demo_files, sources=manifest(public, dpo={"lablled": False}))
    with pytest.raises(DataError, match=r"source 'gen' .*format 'unlabelled' has no labels; set labelled = false"):
        config(public, out, demo_files, sources=manifest(public, gen={"labelled": True}))
    with pytest.raises(DataError, match=r"source 'lmsys' .*cap = 0"):
        config(public, out, demo_files, sources=manifest(public, lmsys={"cap": 0}))
    with pytest.raises(DataError, match=r"\['arena'\] appear more than once"):
        config(public, out, demo_files, sources=manifest(public, lmsys={"name": "arena"}))
    with pytest.raises(DataError, match="no sources"):
        pool.PoolConfig(sources=[])
    # a missing file is found by assemble before it reads anything; every problem is listed at once
    cfg = config(public, out, demo_files, sources=manifest(public, arena={"path": str(tmp_path / "gone.jsonl")}))
    cfg.holdout_files.append(str(tmp_path / "no-test.parquet"))
    with pytest.raises(DataError, match=r"(?s)source 'arena' \(sources\[1\], format 'arena_conversations'\): path "
                       r".*gone\.jsonl not found; fix `path`.*holdout file .*no-test\.parquet not found"):  # fmt: skip
        pool.assemble(cfg)
    assert not out.exists()


def test_the_demo_recipe_runs_on_the_demo_files(public, demo_files, tmp_path) -> None:
    values = recipes.recipe_values("demo-pool", pool.PoolConfig)
    files = {
        "demo/data/public": str(public),
        "demo/data/test.parquet": str(demo_files["test"]),
        "demo/data/train.parquet": str(demo_files["train"]),
        "demo/data/unlabeled.parquet": str(demo_files["unlabeled"]),
    }

    def moved(path: str) -> str:
        return next((path.replace(k, v) for k, v in files.items() if path.startswith(k)), path)

    sources = [{**e, "path": moved(e["path"])} for e in values["sources"]]
    overrides = {"sources": sources, "holdout_files": [moved(p) for p in values["holdout_files"]]}
    cfg = recipes.load("demo-pool", pool.PoolConfig, {**overrides, "out_dir": str(tmp_path)})
    result = pool.assemble(cfg)
    assert result.rows["labelled"] <= cfg.labelled_rows and result.rows["unlabelled"] <= cfg.unlabelled_rows
    assert all(Path(e["path"]).exists() for e in sources)  # every demo source is one the demo data step writes
    assert sum(result.rows.values()) == result.summary()["kept"].sum() > 0
    assert json.loads((tmp_path / "pool_config.json").read_text())["sources"] == sources
    assert not (tmp_path / "work").exists()
    assert isinstance(pool.plot_languages(result), matplotlib.figure.Figure)


def test_the_stage_runs_from_a_shell(public, demo_files, tmp_path, capsys) -> None:
    recipe = tmp_path / "mine.toml"
    recipe.write_text('stage = "pool"\n' + "".join(
        f'[[sources]]\nname = "{e["name"]}"\npath = "{e["path"]}"\nformat = "{e["format"]}"\n'
        f'labelled = {str(e.get("labelled", True)).lower()}\n' for e in manifest(public)[:3]
    ))  # fmt: skip
    pool.main(["--recipe", str(recipe), "--out-dir", str(tmp_path / "out"), "--seed", "3"])
    printed = capsys.readouterr().out
    assert "lmsys" in printed and "rows ->" in printed
    assert json.loads((tmp_path / "out" / "pool_config.json").read_text())["seed"] == 3


def test_an_id_repeated_across_chunks_is_kept_once(tmp_path) -> None:
    df = pd.DataFrame(
        {
            "id": ["u1", "u2", "u3", "u1"],
            "prompt": ["What is rain?", "What is snow?", "What is hail?", "What is fog?"],
            "response_a": ["Water falling.", "Frozen flakes.", "Ice balls.", "A low cloud."],
            "response_b": ["Clouds crying.", "Cold rain.", "Hard rain.", "Mist, mostly."],
        }
    )
    df.to_parquet(tmp_path / "u.parquet", row_group_size=2)
    spec = {"name": "u", "path": str(tmp_path / "u.parquet"), "format": "unlabelled", "labelled": False}
    result = pool.assemble(pool.PoolConfig(sources=[spec], out_dir=tmp_path / "out", chunk_rows=2))
    assert pd.read_parquet(result.paths["unlabelled"])["source_id"].tolist() == ["u1", "u2", "u3"]
    assert result.summary().loc["u", ["in", "kept", "duplicate_id"]].tolist() == [4, 3, 1]


def test_a_folder_source_reads_its_data_files_only(tmp_path) -> None:
    for name in ("b/part-1.parquet", "a.csv", "dataset_info.json", ".cache/x.parquet", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    spec = pool.SourceSpec.from_entry({"name": "s", "path": str(tmp_path), "format": "dpo"}, 0)
    assert [p.relative_to(tmp_path).as_posix() for p in spec.files()] == ["a.csv", "b/part-1.parquet"]


def test_keep_ties_writes_labelled_ties_with_even_targets(public, demo_files, tmp_path) -> None:
    ties = {"keep_ties": True}
    cfg = config(
        public, tmp_path, demo_files, sources=manifest(public, lmsys=ties, arena=ties, msgs=ties), balance_ab=False
    )
    result = pool.assemble(cfg)
    lab, unl = outputs(result).values()
    s = result.summary()
    # planted ties: lmsys rows 5, 15, 25, 35 (row 15 is also copied into dpo: lmsys keeps it), arena rows 9 and 10
    tied = lab[lab["winner"] == TIE]
    assert sorted(tied["id"]) == sorted(["lmsys:1005", "lmsys:1015", "lmsys:1025", "lmsys:1035", "arena:q00009",
                                         "arena:q00010"])  # fmt: skip
    assert "tie" not in s.columns and result.report.notes("normalise")["tie_kept"] == 7  # + messages row 3
    assert (tied[["p_a", "p_b"]] == 0.5).all().all()
    assert lab.loc[lab["winner"] != TIE, ["p_a", "p_b"]].isna().all().all()
    # an unlabelled source keeps its tie as one more pair for the teacher
    assert "msgs:m00003" in set(unl["id"]) and "winner" not in unl.columns
    # the train stage reads the labelled file as an extra file: ties distilled toward 50/50, the rest by winner
    extra = schema.load(result.paths["labelled"], "soft")
    logits = schema.teacher_logits(extra)
    targets = schema.soft_targets(extra)  # (N, 2): a tie's 50/50, else the winner's one-hot
    assert np.isfinite(logits).all(1).sum() == len(tied) and np.isfinite(targets).all()
    np.testing.assert_array_equal(targets[(extra["winner"] == TIE).to_numpy()], 0.5)
    assert (targets[(extra["winner"] == "model_b").to_numpy()] == [0.0, 1.0]).all()
    out, report = mix_extras(MixConfig(mix_min_confidence=0.9, mix_agree_with_human=True), extra, 0, verbose=False)
    pd.testing.assert_frame_equal(out, extra)  # human rows, ties included, pass every teacher filter
    assert report.table["human"].sum() == len(lab) and report.table["teacher"].sum() == 0
    # without keep_ties, as before: ties dropped and counted
    default = pool.assemble(config(public, tmp_path / "d", demo_files, balance_ab=False))
    assert TIE not in set(outputs(default)["labelled"]["winner"])
    assert default.summary()["tie"].sum() == 7


def test_keep_ties_is_checked_in_the_manifest(public, demo_files, tmp_path) -> None:
    with pytest.raises(DataError, match=r"'dpo' \(sources\[2\]\): keep_ties = true, but format 'dpo' has no ties"):
        config(public, tmp_path, demo_files, sources=manifest(public, dpo={"keep_ties": True}))
    with pytest.raises(DataError, match=r"source 'lmsys' \(sources\[0\]\): keep_ties = 'yes'; write true or false"):
        config(public, tmp_path, demo_files, sources=manifest(public, lmsys={"keep_ties": "yes"}))
