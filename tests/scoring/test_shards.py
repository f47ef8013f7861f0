"""kaggle_utils.scoring.shards: which rank scores which part, keyed part files, stale parts, the wait for ranks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kaggle_utils.scoring.shards import PartStore, Shard


def test_shard_reads_what_accelerate_and_torchrun_export() -> None:
    assert Shard.from_env({}) == Shard(0, 1, 0)
    assert Shard.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Shard(5, 8, 1)
    assert Shard.from_env({"RANK": "3", "WORLD_SIZE": "4"}).local_rank == 3  # one host: local rank = rank
    with pytest.raises(ValueError, match="rank=4 of world=4"):
        Shard.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="must be integers"):
        Shard.from_env({"RANK": "zero"})


def test_every_part_has_exactly_one_owner_round_robin() -> None:
    shards = [Shard(r, 3) for r in range(3)]
    owners = [[s.rank for s in shards if s.owns(i)] for i in range(10)]
    assert owners == [[i % 3] for i in range(10)]
    assert all(Shard().owns(i) for i in range(10))


def test_each_rank_takes_its_own_gpu_unless_a_device_is_named() -> None:
    assert Shard(5, 8, 5).device("auto", cuda_available=True) == "cuda:5"
    assert Shard(5, 8, 5).device("cuda:0", cuda_available=True) == "cuda:0"
    assert Shard(1, 2, 1).device("auto", cuda_available=False) == "auto"  # CPU rehearsal
    assert Shard().device("auto", cuda_available=True) == "auto"


def test_part_store_names_parts_by_key_and_reports_others_as_stale(tmp_path: Path) -> None:
    store = PartStore(tmp_path / "parts", ["aaaa", "bbbb"])
    (store.folder / "part-00000.parquet").write_bytes(b"an old run's part")  # unkeyed: stale
    (store.folder / "part-00001-cccc.parquet").write_bytes(b"other settings")  # another key: stale
    assert store.done() == set()
    store.write(1, pd.DataFrame({"id": [1], "logit_a": [0.5], "logit_b": [-0.5]}))
    assert store.done() == {1} and store.path(1).name == "part-00001-bbbb.parquet"
    assert [p.name for p in store.stale()] == ["part-00000.parquet", "part-00001-cccc.parquet"]
    assert not list(store.folder.glob("*.tmp"))
    assert store.read(1)["logit_a"].tolist() == [0.5]


def test_wait_returns_once_every_part_exists_and_times_out_naming_the_missing(tmp_path: Path) -> None:
    store = PartStore(tmp_path, ["k0", "k1", "k2"])
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds
        if len(sleeps) == 2:  # another rank finishes its parts while rank 0 waits
            for i in (0, 2):
                store.write(i, pd.DataFrame({"id": [i]}))

    store.write(1, pd.DataFrame({"id": [1]}))
    store.wait(60, poll_s=5, clock=lambda: now[0], sleep=sleep)
    assert sleeps == [5, 5]
    late = PartStore(tmp_path / "late", ["k0", "k1"])
    late.write(0, pd.DataFrame({"id": [0]}))
    with pytest.raises(TimeoutError, match=r"1 of 2 parts still missing after 10 s \(part-00001-k1.parquet\)"):
        late.wait(10, poll_s=5, clock=lambda: now[0], sleep=sleep)
