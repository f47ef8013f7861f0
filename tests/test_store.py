"""kaggle_utils.store: a file is the old one or the new one, never half of one; rows keyed by their content."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from kaggle_utils.store import rows_fingerprint, write_atomic, write_text_atomic


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "sub" / "submission.csv"
    assert write_text_atomic(path, "id,winner\n1,model_a\n") == path
    write_text_atomic(path, "id,winner\n1,model_b\n")
    assert path.read_text() == "id,winner\n1,model_b\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["submission.csv"]


def test_a_writer_that_fails_midway_leaves_the_old_file(tmp_path) -> None:
    path = tmp_path / "part-00000.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(path)

    def half_then_crash(tmp):
        tmp.write_bytes(b"PAR1 half a file")
        raise KeyboardInterrupt  # a BaseException, as a kill by Ctrl-C is

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half_then_crash)
    assert pd.read_parquet(path)["x"].tolist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]


def test_the_temporary_is_hidden_and_per_process(tmp_path) -> None:
    seen = []
    write_atomic(tmp_path / "part-00001.parquet", lambda tmp: seen.append(tmp) or tmp.write_text("x"))
    assert seen[0].name == f".part-00001.parquet.{os.getpid()}.tmp"
    assert list(tmp_path.glob("part-*.parquet")) == [tmp_path / "part-00001.parquet"]


def test_a_folder_is_swapped_whole(tmp_path) -> None:
    folder = tmp_path / "tokens"

    def store(version):
        def write(tmp):
            tmp.mkdir()
            (tmp / "ids.npy").write_text(version)

        return write

    write_atomic(folder, store("old"))
    (folder / "stale.npy").write_text("from the old store")
    write_atomic(folder, store("new"))
    assert sorted(p.name for p in folder.iterdir()) == ["ids.npy"] and (folder / "ids.npy").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]


def test_rows_fingerprint_follows_ids_texts_and_order() -> None:
    df = pd.DataFrame({"id": [1, 2], "prompt": ["ab", "c"]})
    base = rows_fingerprint(df, ("id", "prompt"))
    assert rows_fingerprint(df.copy(), ("id", "prompt")) == base
    assert rows_fingerprint(df.assign(prompt=["a", "bc"]), ("id", "prompt")) != base
    assert rows_fingerprint(df.assign(id=[1, 3]), ("id", "prompt")) != base
    assert rows_fingerprint(df.iloc[::-1], ("id", "prompt")) != base
    # moving text across a column boundary is a different row set
    a = pd.DataFrame({"prompt": ["ab"], "response_a": ["c"]})
    b = pd.DataFrame({"prompt": ["a"], "response_a": ["bc"]})
    assert rows_fingerprint(a, ("prompt", "response_a")) != rows_fingerprint(b, ("prompt", "response_a"))


def test_the_fingerprint_of_texts_is_the_one_earlier_caches_were_keyed_by() -> None:
    """Changing it would silently invalidate every token cache and pseudo-label part on users' disks."""
    df = pd.DataFrame({"prompt": ["héllo", "a"], "response_a": ["x", ""]})
    expected = "559fe84171b70a4ae2ff9472cc4200ac3f43791c837aba25981270b593c63423"
    assert rows_fingerprint(df, ("prompt", "response_a")) == expected
