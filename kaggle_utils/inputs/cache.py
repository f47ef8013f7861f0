"""Token ids cached on disk: one parquet file per (settings, tokenizer, rows) key.

Tokenising the 560K-row training mix takes minutes; every stage that formats the same rows with the same
tokenizer and settings (training, its swapped view, pseudo-labelling, validation) can load the ids instead.
An entry is ``<cache_dir>/<sha256 of the key>.parquet`` with one column ``input_ids`` (large_list<int32>) in row
order; the key itself is stored in the file's metadata so an entry can be traced back to what made it.
Entries are written to a temporary name and renamed, so a crash never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kaggle_utils.store import write_atomic

# Bump when the layout of an entry or the meaning of the key changes.
FORMAT_VERSION = 1
KEY_METADATA = b"kaggle_utils.inputs.cache.key"


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides the tokenizer's ids: its full ``tokenizer.json`` (vocabulary, merges,
    normaliser, pre-tokeniser, added and special tokens), its chat template and special-token settings."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: the vocabulary stands in for tokenizer.json
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps([type(tokenizer).__name__, len(tokenizer), tokenizer.all_special_tokens]).encode())
    return h.hexdigest()


def entry_path(cache_dir: Path | str, key: dict) -> Path:
    """Where the entry of ``key`` (a JSON-serialisable dict) lives."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"{digest[:32]}.parquet"


def save_rows(path: Path, rows: list[list[int]], key: dict) -> Path:
    """Write ``rows`` (token ids per row) as one large_list<int32> column; atomic on the same filesystem."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    # 64-bit offsets: 560K rows of 2,500 tokens come close to 2**31 ids
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if rows else np.zeros(0, np.int32)
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))
    table = pa.table({"input_ids": column}).replace_schema_metadata({KEY_METADATA: json.dumps(key).encode()})
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def load_rows(path: Path) -> list[list[int]]:
    """Token ids per row, as written by :func:`save_rows`."""
    column = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
    offsets = column.offsets.to_numpy()
    flat = column.values.to_numpy()
    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def load_key(path: Path) -> dict:
    """The key an entry was written under."""
    return json.loads(pq.read_schema(path).metadata[KEY_METADATA])
