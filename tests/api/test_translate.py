"""Stage translate against the loopback server: the chosen rows' three texts translated, winner and columns kept,
provenance marked, a repeated text asked once, failures left out and counted, a rerun that asks nothing again."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from loopback import Fault, LoopbackServer, client_settings, translating

from kaggle_utils.api.translate import TranslateConfig, choose_rows, parse_translation, translate
from kaggle_utils.config import recipes
from kaggle_utils.data import schema


@pytest.fixture
def server():
    with LoopbackServer(responder=translating) as s:
        yield s


def write_rows(path: Path) -> Path:
    """Eight English rows (two share a prompt, one is too long), two Russian, with winners and folds."""
    rows = []
    for i in range(10):
        rows.append(
            {
                "id": f"r{i}",
                "prompt": "a shared prompt" if i < 2 else f"prompt {i}",
                "response_a": f"first answer {i}" + (" long" * 100 if i == 7 else ""),
                "response_b": f"second answer {i}",
                "winner": "model_a" if i % 2 else "model_b",
                "model_a": f"model-{i}",
                "model_b": "model-x",
                "language": "English" if i < 8 else "Russian",
                "fold": i % 3,
            }
        )
    pd.DataFrame(rows).to_parquet(path)
    return path


def config(server: LoopbackServer, tmp_path: Path, **overrides) -> TranslateConfig:
    stage = {
        "input_file": write_rows(tmp_path / "train.parquet"),
        "out_file": tmp_path / "out" / "translated.parquet",
        "target_languages": ["Russian", "German"],
        "source_languages": ["English"],
        "n_rows": 0,
        "max_chars": 200,
        "model": "translator",
    }
    return TranslateConfig(**client_settings(server, **{**stage, **overrides}))


def test_parse_translation_takes_the_tagged_text_only():
    assert parse_translation("Sure! <translation>\n Привет \n</translation> Hope it helps.") == "Привет"
    for bad in ("Привет", "<translation>cut off by max_tokens", "<translation>  </translation>"):
        with pytest.raises(ValueError, match="no <translation>"):
            parse_translation(bad)


def test_rows_are_chosen_from_the_source_languages_within_the_length_cap(tmp_path):
    rows = pd.read_parquet(write_rows(tmp_path / "train.parquet"))
    cfg = TranslateConfig(max_chars=200, source_languages=["English"], n_rows=0)
    assert choose_rows(rows, "German", cfg)["id"].tolist() == ["r0", "r1", "r2", "r3", "r4", "r5", "r6"]
    cfg = TranslateConfig(max_chars=200, source_languages=[], n_rows=3, seed=5)
    chosen = choose_rows(rows, "Russian", cfg)
    assert len(chosen) == 3 and (chosen["language"] == "English").all()  # never the target language itself
    assert chosen.equals(choose_rows(rows, "Russian", cfg))


def test_translated_rows_keep_the_label_and_mark_their_origin(server, tmp_path):
    cfg = config(server, tmp_path)
    result = translate(cfg)
    out = pd.read_parquet(cfg.out_file)
    schema.validate(out, "train", source=str(cfg.out_file))
    original = pd.read_parquet(cfg.input_file).set_index("id")
    assert len(out) == 14 and out["id"].is_unique  # 7 eligible English rows x 2 languages
    for row in out.itertuples():
        src = original.loc[row.original_id]
        assert (
            row.id == f"tr-{row.language}-{row.original_id}" and row.source == f"translated:{row.language}:translator"
        )
        assert (row.winner, row.model_a, row.model_b, row.fold) == (src.winner, src.model_a, src.model_b, src.fold)
        for col in schema.TEXT_COLUMNS:
            assert getattr(row, col) == f"[{row.language}] {src[col]}"
    assert sorted(out["language"].unique()) == ["German", "Russian"]
    # the prompt the first two rows share was translated once per language: 7 x 3 - 1 texts each
    assert len(server.requests()) == 2 * 20 and result.run.requests == 40
    assert server.requests()[0].body["temperature"] == 0.0


def test_a_failed_translation_leaves_its_row_out_and_is_counted(server, tmp_path):
    cfg = config(server, tmp_path, target_languages=["German"])
    # the model answers one response instead of translating it: no <translation> tag, every time
    server.add_faults(
        Fault(content="I would be glad to help!", times=100, match=lambda r: "second answer 3" in str(r.body))
    )
    result = translate(cfg)
    assert "r3" not in set(result.frame["original_id"]) and len(result.frame) == 6
    assert result.counts["rows left out (German: a text not translated)"] == 1
    assert result.run.failed == 1 and result.run.retries["malformed"] == cfg.malformed_retries
    assert "failed: 1" in str(result)


def test_a_rerun_asks_nothing_again_and_writes_the_same_rows(server, tmp_path):
    cfg = config(server, tmp_path)
    first = translate(cfg).frame
    again = translate(cfg)
    assert len(server.requests()) == 40 and again.run.resumed == 40
    pd.testing.assert_frame_equal(first, again.frame)


@pytest.mark.parametrize("name", [r.name for r in recipes.available("translate")])
def test_every_recipe_loads(name):
    """What tests/config checks for the notebooks' stages (its table does not know the API stages yet)."""
    cfg = recipes.load(name, TranslateConfig)
    for key, value in recipes.read(name).values.items():
        got = getattr(cfg, key)
        assert (str(got) if isinstance(got, Path) else got) == value, key
    assert cfg.model in cfg.prices or cfg.max_cost_usd == 0
