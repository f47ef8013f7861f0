"""`make data`: the competition and the recipe's datasets through the real kaggle CLI, against the loopback fake
Kaggle (``kaggle_utils/kaggle/loopback.py``), with tiny files in the competition's schema."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from kaggle_utils.config import recipes
from kaggle_utils.data import schema
from kaggle_utils.kaggle import download as dl
from kaggle_utils.kaggle.loopback import FAKE_KEY, RULES_NOT_ACCEPTED
from kaggle_utils.kaggle.publish import COMPETITION

SEED_DATASET = "lizhecheng/kaggle-multilingual-chatbot-arena-datasets"
DATASET_DIR = f"datasets/{SEED_DATASET}"


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _train(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"t{i}" for i in range(n)],
            "prompt": [f"question {i}" for i in range(n)],
            "response_a": ["an answer"] * n,
            "response_b": ["another answer"] * n,
            "winner": ["model_a", "model_b"] * (n // 2),
            "model_a": ["m1"] * n,
            "model_b": ["m2"] * n,
            "language": ["English"] * n,
        }
    )


def _test() -> pd.DataFrame:
    # as in the visible test file: integer ids, a `scored` flag
    texts = {"prompt": ["a", "b", "c"], "response_a": ["x"] * 3, "response_b": ["y"] * 3}
    return pd.DataFrame({"id": [1, 2, 3], **texts, "scored": [False] * 3})


def _competition(train: pd.DataFrame | None = None) -> dict[str, bytes]:
    """The competition's zip, as Kaggle serves it: the three files at its top."""
    return {
        "train.parquet": _parquet(_train() if train is None else train),
        "test.parquet": _parquet(_test()),
        "sample_submission.csv": b"id,winner\n1,model_a\n2,model_a\n3,model_a\n",
    }


def _dataset() -> dict[str, bytes]:
    """The seed team's extra-data archive: its own tables plus a copy of the competition's train file."""
    return {"train.parquet": _parquet(_train(6)), "extra/pseudo_labels.csv": b"id,p_a\nx,0.2\ny,0.7\n"}


@pytest.fixture
def served(kaggle):
    """The fake Kaggle serving both archives of the data-wsdm recipe."""
    kaggle.serve_zip("DownloadDataFiles", f"{COMPETITION}.zip", _competition())
    kaggle.serve_zip("DownloadDataset", "kaggle-multilingual-chatbot-arena-datasets.zip", _dataset())
    return kaggle


def _run(dest, *flags: str) -> int:
    return dl.main(["--recipe", "data-wsdm", "--dest", str(dest), *flags])


# ------------------------------------------------------------------------------------------------ end to end


def test_make_data_downloads_unpacks_checks_and_lists_everything(served, make, tmp_path):
    dest = tmp_path / "data"
    proc = make("data", f"DEST={dest}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # one request per archive, for what the recipe names, then the redirect to the file itself
    (comp,) = served.calls("DownloadDataFiles")
    assert comp.body["competitionName"] == COMPETITION
    (ds,) = served.calls("DownloadDataset")
    assert (ds.body["ownerSlug"], ds.body["datasetSlug"]) == tuple(SEED_DATASET.split("/"))
    assert sorted(r.path for r in served.requests if r.verb == "GET") == sorted(served.files)
    # unpacked where promised (the competition where the prepare recipe reads it), zips gone, files valid
    assert sorted(p.name for p in (dest / "competition").iterdir()) == sorted(
        [".kaggle_utils-download.json", "sample_submission.csv", "test.parquet", "train.parquet"]
    )
    assert len(schema.load(dest / "competition/train.parquet", "train")) == 4
    assert len(schema.load(dest / "competition/test.parquet", "test")) == 3
    assert (dest / DATASET_DIR / "extra/pseudo_labels.csv").read_bytes() == _dataset()["extra/pseudo_labels.csv"]
    assert not list(dest.rglob("*.zip")) and not (dest / ".incomplete").exists()
    assert (dest / ".gitignore").read_text().splitlines()[-1] == "*", "downloaded data must stay out of git"
    # the table: what, rows, folder
    table = [line.split() for line in proc.stdout.splitlines()]
    assert ["what", "rows", "folder"] in table
    assert [f"{COMPETITION}:", "train.parquet", "4", str(dest / "competition"), "downloaded"] in table
    assert [f"{COMPETITION}:", "test.parquet", "3", str(dest / "competition"), "downloaded"] in table
    assert [f"{SEED_DATASET}:", "train.parquet", "6", str(dest / DATASET_DIR), "downloaded"] in table
    assert [f"{SEED_DATASET}:", "pseudo_labels.csv", "2", str(dest / DATASET_DIR / "extra"), "downloaded"] in table
    assert FAKE_KEY not in proc.stdout + proc.stderr


def test_a_second_run_downloads_nothing_unless_a_file_changed_or_forced(served, tmp_path, capsys):
    dest = tmp_path / "data"
    assert _run(dest) == 0
    served.requests.clear()
    assert _run(dest) == 0
    assert served.requests == [], "already downloaded and checked: not fetched again"
    out = capsys.readouterr().out
    assert "already downloaded and checked" in out
    assert [line.split()[1] for line in out.splitlines() if line.endswith(" kept")] == [
        "sample_submission.csv",
        "test.parquet",
        "train.parquet",
        "pseudo_labels.csv",
        "train.parquet",
    ]
    # a file that no longer matches what was checked: that source (only) is fetched again
    (dest / "competition/train.parquet").write_bytes(b"truncated")
    assert _run(dest) == 0
    assert [r.method for r in served.requests if r.verb == "POST"] == ["DownloadDataFiles"]
    assert len(schema.load(dest / "competition/train.parquet", "train")) == 4
    served.requests.clear()
    assert _run(dest, "--force", "true") == 0
    assert [r.method for r in served.requests if r.verb == "POST"] == [
        "DownloadDataFiles",
        "GetDatasetMetadata",
        "DownloadDataset",
    ]


def test_a_bad_schema_fails_naming_file_and_column_and_keeps_the_good_copy(served, tmp_path, capsys):
    dest = tmp_path / "data"
    assert _run(dest) == 0
    good = (dest / "competition/train.parquet").read_bytes()
    bad = _train().assign(winner=["model_a", "tie", "model_b", "model_a"])
    served.serve_zip("DownloadDataFiles", f"{COMPETITION}.zip", _competition(bad))
    capsys.readouterr()
    assert _run(dest, "--force", "true") == 1
    err = capsys.readouterr().err
    kept = dest / ".incomplete/competition/train.parquet"
    assert f"{kept}: column 'winner' row 1 (id='t1') is 'tie'" in err and "kept in" in err
    # the rejected download never replaces the checked copy, and is not marked complete
    assert (dest / "competition/train.parquet").read_bytes() == good
    assert not (dest / ".incomplete/competition/.kaggle_utils-download.json").exists()


def test_a_first_download_with_a_missing_column_leaves_nothing_in_place(kaggle, tmp_path, capsys):
    kaggle.serve_zip("DownloadDataFiles", f"{COMPETITION}.zip", _competition(_train().drop(columns="response_b")))
    assert dl.main(["--dest", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert "train.parquet: missing column(s) ['response_b']" in err
    assert not (tmp_path / "data/competition").exists()


def test_a_competition_archive_without_test_parquet_is_refused(kaggle, tmp_path, capsys):
    files = _competition()
    del files["test.parquet"]
    kaggle.serve_zip("DownloadDataFiles", f"{COMPETITION}.zip", files)
    assert dl.main(["--dest", str(tmp_path / "data")]) == 1
    assert "has no ['test.parquet'] (it holds: sample_submission.csv, train.parquet)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- refusals


def test_missing_credentials_give_one_clear_message_and_no_request(served, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("KAGGLE_KEY")
    assert _run(tmp_path / "data") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no Kaggle credentials found") and err.count("error:") == 1
    assert "KAGGLE_USERNAME and KAGGLE_KEY" in err and "kaggle.json" in err
    assert served.requests == [] and not (tmp_path / "data").exists()


def test_rules_not_accepted_says_where_to_accept_them(served, make, tmp_path):
    served.replies["DownloadDataFiles"] = RULES_NOT_ACCEPTED
    proc = make("data", f"DEST={tmp_path / 'data'}")
    assert proc.returncode != 0
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "has not accepted its rules" in line
    assert f"Accept them at https://www.kaggle.com/competitions/{COMPETITION}/rules" in line
    # the CLI's own generic hint (with a <competition> placeholder) is replaced by that one message
    assert "<competition>" not in proc.stdout + proc.stderr
    # nothing half-written, and nothing else tried
    assert [p.name for p in (tmp_path / "data").iterdir()] == [".gitignore"]
    assert served.calls("DownloadDataset") == []


def test_another_cli_failure_is_reported_with_the_clis_words(served, tmp_path, capsys):
    served.replies["DownloadDataset"] = 404
    assert _run(tmp_path / "data") == 1
    captured = capsys.readouterr()
    assert "DownloadDataset: not found" in captured.out and f"datasets download {SEED_DATASET}" in captured.err
    assert (tmp_path / "data/competition/train.parquet").is_file(), "what was fetched and checked stays"
    assert not (tmp_path / "data" / DATASET_DIR).exists() and not (tmp_path / "data/.incomplete").exists()


# ------------------------------------------------------------------------------------------------- config


def test_the_recipe_names_the_competition_and_the_seed_teams_datasets():
    cfg = recipes.load("data-wsdm", dl.DownloadConfig)
    assert cfg.competition == COMPETITION and cfg.datasets == [SEED_DATASET]
    assert str(cfg.dest) == "data" and cfg.force is False
    assert [s.folder.as_posix() for s in dl.sources(cfg)] == ["competition", DATASET_DIR]
    # the competition lands where the full-size prepare recipe reads it
    assert Path(recipes.read("prepare").values["data_dir"]) == cfg.dest / "competition"


@pytest.mark.parametrize(
    "values,message",
    [
        ({"datasets": ["no-owner"]}, "is not 'owner/slug'"),
        ({"competition": "WSDM Cup"}, "expected the slug"),
        ({"competition": "", "datasets": []}, "nothing to download"),
    ],
)
def test_config_rejects_what_kaggle_would(values, message):
    with pytest.raises(ValueError, match=message):
        dl.DownloadConfig(**values)


def test_help_lists_the_recipe(capsys):
    with pytest.raises(SystemExit):
        dl.main(["--help"])
    out = capsys.readouterr().out
    assert "data-wsdm" in out and "--force" in out and "owner/slug" in out


def test_a_stamp_for_another_source_is_not_trusted(tmp_path):
    folder = tmp_path / "competition"
    folder.mkdir()
    (folder / dl.STAMP).write_text(json.dumps({"source": "competition other-comp", "files": {}}))
    stamp, why = dl.verified(dl.Source("competition", COMPETITION), folder)
    assert stamp is None and "other-comp" in why


def test_a_folder_not_written_by_make_data_is_left_alone_unless_forced(served, tmp_path, capsys):
    mine = tmp_path / "data/competition"
    mine.mkdir(parents=True)
    (mine / "train.parquet").write_bytes(b"unpacked by hand")
    assert _run(tmp_path / "data") == 1
    assert f"{mine} exists but was not written by `make data`" in capsys.readouterr().err
    assert (mine / "train.parquet").read_bytes() == b"unpacked by hand" and served.requests == []
    assert _run(tmp_path / "data", "--force", "true") == 0
    assert len(schema.load(mine / "train.parquet", "train")) == 4
