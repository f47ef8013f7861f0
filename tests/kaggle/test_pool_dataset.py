"""`make pool-dataset`: the pool stage's unlabelled pairs published as ``{owner}/wsdm-arena-pool`` through the real
kaggle CLI, against the loopback fake Kaggle (``kaggle/loopback.py``); and notebook 02 on Kaggle reading that file."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kaggle_utils.config import recipes
from kaggle_utils.data import pool
from kaggle_utils.kaggle import pool_dataset, staging
from kaggle_utils.kaggle import publish as kc
from kaggle_utils.kaggle.loopback import FAKE_KEY, OWNER

ROOT = Path(__file__).resolve().parents[2]


def _pool_output(folder: Path, rows: int = 5) -> Path:
    """What the pool stage writes into its out_dir, in miniature: both parquet files, its config and reports."""
    folder.mkdir(parents=True)
    for name, file in pool.OUTPUT_FILES.items():
        columns = pool.OUTPUT_SCHEMAS[name]
        data = {c: [f"{c}-{i}" for i in range(rows)] for c in columns.names}
        data.update({c: [1.0] * rows for c in columns.names if pa.types.is_floating(columns.field(c).type)})
        pq.write_table(pa.Table.from_pydict(data, schema=columns), folder / file)
    (folder / "pool_config.json").write_text(json.dumps({"stage": "pool", "sources": ["lmsys-55k"]}))
    (folder / "pool_report.json").write_text(json.dumps({"rows": rows}))
    (folder / "pool_leaks.csv").write_text("id,source\n")
    return folder


def test_notebook_02_on_kaggle_reads_the_file_the_pool_dataset_holds():
    """The Kaggle recipe of notebook 02 reads /kaggle/input/<the pool dataset>/<the file the pool stage writes>, and
    kernel 02 attaches that dataset."""
    fields = staging.resolve(recipes.profile("kaggle")["02_pseudo_label"]["pseudo_label"])[1]
    assert fields["input_file"] == f"/kaggle/input/{pool_dataset.SLUG}/{pool_dataset.UNLABELLED}"
    meta = kc.load_kernel_metadata(ROOT / "kernel-metadata/wsdm-arena-02-pseudo-label" / kc.KERNEL_METADATA, OWNER)
    assert kc.fill_owner(pool_dataset.METADATA["id"], OWNER) in meta["dataset_sources"]


def test_make_pool_dataset_creates_then_versions_the_pool_dataset(kaggle, make, tmp_path):
    out = _pool_output(tmp_path / "pool")
    stage = tmp_path / "stage"
    args = (f"POOL_DIR={out}", f"KAGGLE_USERNAME={OWNER}", f"POOL_STAGE={stage}")
    proc = make("pool-dataset", *args, "MESSAGE=first")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (create,) = kaggle.calls("CreateDataset")
    assert create.body["ownerSlug"] == OWNER and create.body["slug"] == "wsdm-arena-pool"
    assert create.body["isPrivate"] is True and create.body["licenseName"] == "other"
    # the teacher's pairs and what made them, flat; the labelled set and the leak list stay home
    uploads = kaggle.uploads()
    assert sorted(uploads) == ["pool_config.json", "pool_report.json", "unlabelled.parquet"]
    assert uploads["unlabelled.parquet"] == (out / "unlabelled.parquet").read_bytes()
    assert len(pd.read_parquet(io.BytesIO(uploads["unlabelled.parquet"]))) == 5
    assert sorted(p.name for p in stage.iterdir()) == sorted([kc.DATASET_METADATA, *uploads])
    assert "uploading 5 unlabelled pairs as dataset testuser/wsdm-arena-pool" in proc.stdout
    assert FAKE_KEY not in proc.stdout + proc.stderr

    kaggle.requests.clear()
    kaggle.replies["GetDatasetStatus"] = {"status": "READY"}
    proc = make("pool-dataset", *args, "MESSAGE=second")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (version,) = kaggle.calls("CreateDatasetVersion")
    assert version.body["datasetSlug"] == "wsdm-arena-pool" and version.body["body"]["versionNotes"] == "second"
    assert kaggle.calls("CreateDataset") == []


def test_no_pool_output_is_refused_naming_the_pool_command(kaggle, tmp_path, capsys):
    assert pool_dataset.main(["--dir", str(tmp_path / "nothing"), "--stage-dir", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert f"no {tmp_path / 'nothing' / 'unlabelled.parquet'}" in err and pool_dataset.POOL_COMMAND in err
    assert kaggle.requests == []


@pytest.mark.parametrize("broken", ["columns", "not-parquet"])
def test_a_file_notebook_02_cannot_read_is_refused_before_any_request(broken, kaggle, tmp_path):
    out = _pool_output(tmp_path / "pool")
    if broken == "columns":
        pq.write_table(pa.table({"id": ["a"], "prompt": ["p"]}), out / "unlabelled.parquet")
        expected = "no column(s) ['response_a', 'response_b'], which notebook 02's pseudo-label stage reads"
    else:
        (out / "unlabelled.parquet").write_text("id,prompt\n")
        expected = "not readable as parquet"
    with pytest.raises(pool_dataset.PoolDatasetError, match=re.escape(expected)):
        pool_dataset.upload(pool_dataset.PoolDatasetConfig(out, stage_dir=tmp_path / "s"))
    assert kaggle.requests == []
