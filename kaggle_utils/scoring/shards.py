"""Row shards across processes and the part files they write: which process scores what, and what is done.

A long scoring job (a 72B teacher over 560K rows) is cut into numbered parts. Every part file is named by a key
that hashes everything that decides its content (model, adapter, settings and the rows themselves), so a file
written under other settings is never mistaken for a finished part: it is reported as stale and left alone.

Several processes (``accelerate launch`` / ``torchrun``: one per GPU) share the parts without talking to each
other: rank ``r`` of ``w`` scores the parts whose index is ``r`` mod ``w``, and rank 0 waits for every part file
to appear before it assembles the output. The wait is on the files, not on a collective: no process group is
needed, a rank that finishes early does not time out in NCCL, and a rank that dies leaves its finished parts for
the rerun (of any world size).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kaggle_utils.store import write_atomic


@dataclass(frozen=True)
class Shard:
    """This process's place among the processes of one launch."""

    # this process's rank, 0 ... world - 1 (``RANK``)
    rank: int = 0
    # processes in the launch (``WORLD_SIZE``); 1 when started with plain ``python``
    world: int = 1
    # rank within this host: the GPU this process uses (``LOCAL_RANK``)
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank={self.rank} of world={self.world}: need 0 <= rank < world")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Shard:
        """Read what ``accelerate launch`` and ``torchrun`` set (both export RANK, WORLD_SIZE, LOCAL_RANK).

        Plain environment variables rather than ``accelerate.PartialState()``: building the state initialises a
        process group, and nothing here needs one.
        """
        env = os.environ if env is None else env
        try:
            rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from err
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Part ``index`` is scored by this process (round robin: neighbouring parts go to different GPUs)."""
        return index % self.world == self.rank

    def device(self, requested: str, cuda_available: bool) -> str:
        """``requested``, except "auto" in a multi-process launch: this process's own GPU, ``cuda:LOCAL_RANK``."""
        if requested == "auto" and self.world > 1 and cuda_available:
            return f"cuda:{self.local_rank}"
        return requested


class PartStore:
    """Part files ``part-NNNNN-<key>.parquet`` in one folder; a part exists only once its file is complete."""

    def __init__(self, folder: Path, keys: Sequence[str]):
        # keys[i]: the key of part i under the current settings and rows
        self.folder, self.keys = Path(folder), list(keys)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"part-{index:05d}-{self.keys[index]}.parquet"

    def done(self) -> set[int]:
        """Indices of the parts whose file (under the current key) exists."""
        return {i for i in range(len(self.keys)) if self.path(i).is_file()}

    def stale(self) -> list[Path]:
        """Part files of other settings or other rows: never read, never deleted here (they may be wanted back)."""
        current = {self.path(i).name for i in range(len(self.keys))}
        return sorted(p for p in self.folder.glob("part-*.parquet") if p.name not in current)

    def write(self, index: int, part: pd.DataFrame) -> Path:
        """Write part ``index`` atomically: a kill mid-write never leaves a truncated part."""
        return write_atomic(self.path(index), lambda tmp: part.to_parquet(tmp, index=False))

    def read(self, index: int) -> pd.DataFrame:
        return pd.read_parquet(self.path(index))

    def wait(
        self,
        timeout_s: float,
        poll_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Block until every part exists; TimeoutError naming the missing parts after ``timeout_s``."""
        start = clock()
        while True:
            missing = sorted(set(range(len(self.keys))) - self.done())
            if not missing:
                return
            if clock() - start >= timeout_s:
                shown = ", ".join(self.path(i).name for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise TimeoutError(
                    f"{self.folder}: {len(missing)} of {len(self.keys)} parts still missing after {timeout_s:.0f} s "
                    f"({shown}); another rank failed or is slow: rerun the same command (finished parts are kept), "
                    "or raise wait_minutes"
                )
            sleep(poll_s)
