"""Encoded pairs in flat numpy arrays: one int32 copy of the fields, both A/B orientations built per batch.

A row of :class:`~kaggle_utils.inputs.formatter.PromptFormatter` is always::

    prefix + T0 + P + T1 + A + T2 + B + T3          (B first: prefix + T0 + P + T1 + B + T2 + A + T3)

where T0..T3 are the template's fixed pieces and P, A, B the cut fields. Truncation is symmetric in A and B
(swapping the responses swaps their cuts), so the B-first row is the same three field segments in another
order. :class:`PairTokens` stores each row's P, A, B once, back to back, in one flat int32 array with int64
row offsets and the (N, 3) segment lengths; the template pieces are stored once. Python lists of ids in both
orientations cost ~97 bytes a row token (an int object and a pointer per orientation, list slack, allocator
arenas: measured by ``benchmarks/bench_train_memory.py``); this costs ~4 bytes a row token for both.

On disk a store is a folder of ``.npy`` files plus ``template.json``; :meth:`PairTokens.load` memory-maps
the arrays, so the ids of the 560K-row training mix live in the page cache, not in the process.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from kaggle_utils.store import write_atomic

# Bump when the files of a saved store or their meaning change.
FORMAT_VERSION = 1
_ARRAYS = ("ids", "offsets", "fields")  # the .npy files of a saved store


class PairTokens:
    """Token ids of N encoded pairs: ``ids`` (T,) int32 fields back to back, ``offsets`` (N + 1,) int64 row starts
    in ``ids``, ``fields`` (N, 3) int32 kept tokens of (prompt, response A, response B) per row."""

    def __init__(
        self,
        ids: np.ndarray,
        offsets: np.ndarray,
        fields: np.ndarray,
        prefix: list[int],
        pieces: list[list[int]],
    ):
        if ids.ndim != 1 or ids.dtype != np.int32:
            raise ValueError(f"ids must be a 1-D int32 array; got {ids.dtype} with shape {ids.shape}")
        if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) < 1:
            raise ValueError(f"offsets must be a 1-D int64 array of N + 1 starts; got {offsets.dtype} {offsets.shape}")
        n = len(offsets) - 1
        if fields.shape != (n, 3) or fields.dtype != np.int32:
            raise ValueError(f"fields must be an ({n}, 3) int32 array for {n} rows; got {fields.dtype} {fields.shape}")
        if offsets[0] != 0 or offsets[-1] != len(ids):
            raise ValueError(f"offsets must run from 0 to len(ids)={len(ids)}; got {offsets[0]} .. {offsets[-1]}")
        if len(pieces) != 4:
            raise ValueError(f"pieces must be the template's 4 fixed pieces; got {len(pieces)}")
        self.ids = ids
        self.offsets = offsets
        self.fields = fields
        self.prefix = [int(t) for t in prefix]
        self.pieces = [[int(t) for t in p] for p in pieces]
        self._head = self.prefix + self.pieces[0]  # before the prompt
        self.fixed_length = len(self._head) + sum(len(p) for p in self.pieces[1:])
        # (N,) tokens per row, the same in both orientations; int64 like PromptFormatter.lengths
        self.lengths = fields.sum(axis=1, dtype=np.int64) + self.fixed_length
        if n and not np.array_equal(np.diff(offsets), self.lengths - self.fixed_length):
            raise ValueError("offsets and fields disagree: each row's span must hold its three field segments")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (resident in memory unless memory-mapped)."""
        return int(self.ids.nbytes + self.offsets.nbytes + self.fields.nbytes)

    @property
    def num_tokens(self) -> int:
        """Tokens of all rows in one orientation, template included."""
        return int(self.lengths.sum())

    def rows(self, idx: np.ndarray, swapped: np.ndarray | None = None) -> list[list[int]]:
        """Token ids of rows ``idx`` in order; ``swapped[k]`` True shows row ``idx[k]`` with response B first.

        Equal to ``fmt.encode(df)[i]`` (A first) or ``fmt.encode(schema.swap_ab(df))[i]`` (B first).
        """
        idx = np.asarray(idx)
        if idx.ndim != 1 or not (idx.dtype.kind in "iu" or idx.size == 0):
            raise ValueError(f"idx must be a 1-D array of row numbers; got {idx.dtype} with shape {idx.shape}")
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"row {bad} is out of range for a store of {n} rows")
        if swapped is None:
            swapped = np.zeros(len(idx), dtype=bool)
        else:
            swapped = np.asarray(swapped)
            if swapped.dtype != bool or swapped.shape != idx.shape:
                raise ValueError(
                    f"swapped must be a bool array aligned with idx {idx.shape}; got {swapped.dtype} {swapped.shape}"
                )
        head, (t1, t2, t3) = self._head, self.pieces[1:]
        starts = self.offsets[idx].tolist()
        fields = self.fields[idx].tolist()
        out = []
        for start, (lp, la, lb), b_first in zip(starts, fields, swapped.tolist(), strict=True):
            seg = self.ids[start : start + lp + la + lb].tolist()
            p, a, b = seg[:lp], seg[lp : lp + la], seg[lp + la :]
            if b_first:
                a, b = b, a
            out.append(head + p + t1 + a + t2 + b + t3)
        return out

    # --- disk ----------------------------------------------------------------------------------------------
    def save(self, folder: Path | str) -> Path:
        """Write ``ids.npy``, ``offsets.npy``, ``fields.npy`` and ``template.json`` into ``folder``.

        Written into a temporary sibling folder and renamed, so a crash never leaves a half-written store.
        """
        meta = {"version": FORMAT_VERSION, "rows": len(self), "prefix": self.prefix, "pieces": self.pieces}

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            for name in _ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(self, name))
            (tmp / "template.json").write_text(json.dumps(meta))

        return write_atomic(folder, write)

    @classmethod
    def load(cls, folder: Path | str, mmap: bool = True) -> PairTokens:
        """A store written by :meth:`save`; ``mmap``: the arrays are read-only memory maps of the files."""
        folder = Path(folder)
        meta_path = folder / "template.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} is missing: {folder} is not a PairTokens folder (see PairTokens.save)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{folder} holds PairTokens format {meta.get('version')}, this code reads {FORMAT_VERSION}; "
                "encode the rows again (PromptFormatter.encode_pairs)"
            )
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None) for name in _ARRAYS}
        store = cls(**arrays, prefix=meta["prefix"], pieces=meta["pieces"])
        if len(store) != meta["rows"]:
            raise ValueError(f"{folder}: template.json says {meta['rows']} rows, the arrays hold {len(store)}")
        return store


def pack_segments(prompts: list[list[int]], as_: list[list[int]], bs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of cut (prompt, a, b) ids as ``ids`` (T,) int32, each row's P, A, B back to back, and ``fields``
    (n, 3) int32, their lengths: the layout of :class:`PairTokens`."""
    rows = list(zip(prompts, as_, bs, strict=True))
    fields = np.array([(len(p), len(a), len(b)) for p, a, b in rows], dtype=np.int32).reshape(-1, 3)
    flat = np.fromiter(
        itertools.chain.from_iterable(seg for row in rows for seg in row), dtype=np.int32, count=int(fields.sum())
    )
    return flat, fields


class PairTokensBuilder:
    """Collects cut field segments chunk by chunk into one growing int32 buffer; :meth:`finish` makes the store.

    The buffer grows by a quarter at a time with ``ndarray.resize`` (realloc: glibc remaps large blocks rather
    than copying them), so the peak is at most ~1.25x the final array, not 2x as concatenating per-chunk arrays
    would be; :meth:`finish` shrinks it to size.
    """

    def __init__(self, prefix: list[int], pieces: list[list[int]], capacity: int = 1 << 20):
        self.prefix, self.pieces = list(prefix), [list(p) for p in pieces]
        self._ids = np.empty(max(capacity, 1), dtype=np.int32)
        self._used = 0
        self._fields: list[np.ndarray] = []  # (n, 3) int32 per chunk: small, concatenated at the end

    def _reserve(self, extra: int) -> None:
        need = self._used + extra
        if need > len(self._ids):
            self._ids.resize(max(need, len(self._ids) + len(self._ids) // 4), refcheck=False)

    def append(self, ids: np.ndarray, fields: np.ndarray) -> None:
        """Add rows given as their segments back to back (``ids``) and their (n, 3) segment lengths."""
        fields = np.asarray(fields, dtype=np.int32).reshape(-1, 3)
        if int(fields.sum()) != len(ids):
            raise ValueError(f"the segments hold {len(ids)} ids but their lengths sum to {int(fields.sum())}")
        if fields.size and fields.min() < 0:
            raise ValueError("segment lengths must not be negative")
        self._reserve(len(ids))
        self._ids[self._used : self._used + len(ids)] = ids
        self._used += len(ids)
        self._fields.append(fields)

    def append_rows(self, prompts: list[list[int]], as_: list[list[int]], bs: list[list[int]]) -> None:
        """Add rows given as their cut (prompt, response A, response B) ids."""
        self.append(*pack_segments(prompts, as_, bs))

    def finish(self) -> PairTokens:
        ids = self._ids
        ids.resize(self._used, refcheck=False)  # give back the unused capacity (shrinks in place)
        self._ids = np.empty(0, dtype=np.int32)
        fields = np.concatenate(self._fields) if self._fields else np.zeros((0, 3), dtype=np.int32)
        offsets = np.zeros(len(fields) + 1, dtype=np.int64)
        np.cumsum(fields.sum(axis=1, dtype=np.int64), out=offsets[1:])
        return PairTokens(ids, offsets, fields, self.prefix, self.pieces)
