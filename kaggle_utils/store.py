"""Files that are complete or absent, and the fingerprint that says which rows a file was made from.

Every long job here can be killed at any moment (Kaggle's 12-hour limit, a pre-empted GPU, Ctrl-C) and is
rerun to resume: a submission, a checkpoint, a part of teacher logits, a token cache entry or a job's state must
then be the old file or the new one, never half of one. :func:`write_atomic` is the one way they are written.
:func:`rows_fingerprint` keys what was computed from rows (token caches, pseudo-label parts) by their content;
:func:`file_fingerprint` names the bytes of a file (an adapter's weights) that something was fitted for.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd


def write_atomic(path: Path | str, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` puts the content at a temporary path beside ``path`` (a file, or a folder it creates); one
    rename then puts it in place. A kill before the rename leaves the previous ``path`` untouched.

    The temporary name is hidden (``.name.<pid>.tmp``: never taken for a part by a ``part-*`` glob) and per
    process (two processes writing one path do not share it); it is removed if ``write`` raises. A folder that
    already exists at ``path`` is removed just before the rename (a rename cannot replace a non-empty folder):
    a kill between the two leaves no folder, which readers take as absent and rebuild.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        write(tmp)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def write_text_atomic(path: Path | str, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def rows_fingerprint(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """SHA-256 of ``columns`` row by row, in order, row count included: texts as UTF-8, other values (ids) as
    their ``repr``, each length-prefixed so that ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.sha256(str(len(df)).encode())
    for col in columns:
        h.update(col.encode())
        for value in df[col].tolist():
            b = (value if isinstance(value, str) else repr(value)).encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def file_fingerprint(path: Path | str, chunk: int = 1 << 20) -> str:
    """``sha256:<hex>`` of the file's bytes, read in 1 MiB chunks (an adapter's weights: hundreds of MiB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"sha256:{h.hexdigest()}"
