"""``make pool-dataset``: the pool stage's unlabelled pairs as the private Kaggle dataset ``{owner}/wsdm-arena-pool``
that notebook 02 attaches (its Kaggle recipe, ``pseudo-label-gemma2-9b-2xt4``, reads
``/kaggle/input/wsdm-arena-pool/unlabelled.parquet``): created the first time, a new version after, with the real
``kaggle`` CLI.

The pool stage (``python -m kaggle_utils.data.pool --recipe pool-public``) writes into its ``out_dir``
(``output/pool``): ``unlabelled.parquet`` (the pairs for the teacher), ``extra_labelled.parquet`` (human-labelled
rows for training on rented GPUs: not uploaded), ``pool_config.json`` and its reports. The upload is staged flat in
``build/kaggle/pool/``::

    dataset-metadata.json   id {owner}/wsdm-arena-pool, title, licence "other" (each source keeps its own licence)
    unlabelled.parquet      hard-linked from DIR where the file system allows (it can be GBs), else copied
    pool_config.json        the config that made it, and pool_report.json (rows dropped per source and step),
                            when the stage wrote them

``python -m kaggle_utils.kaggle.pool_dataset --dir output/pool [-m MSG] [--owner you] [--stage-dir build/kaggle/pool]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from kaggle_utils.config.cli import field_docs
from kaggle_utils.data import pool, schema
from kaggle_utils.kaggle.models import add_dataset_version_args
from kaggle_utils.kaggle.publish import (
    DATASET_METADATA,
    OWNER,
    ROOT,
    CredentialsError,
    KaggleCommandError,
    MetadataError,
    _raise_if,
    credential_source,
    dataset_problems,
    fill_owner,
    publish_dataset,
    resolve_owner,
)

SLUG = "wsdm-arena-pool"
# the pool stage's file of pairs for the teacher: what notebook 02 reads from the dataset
UNLABELLED = pool.OUTPUT_FILES["unlabelled"]
# uploaded beside it when the stage wrote them: what made the pool, and what it dropped
PROVENANCE = ("pool_config.json", "pool_report.json")
POOL_COMMAND = "python -m kaggle_utils.data.pool --recipe pool-public"
METADATA = {
    "id": f"{OWNER}/{SLUG}",
    "title": "WSDM Arena unlabelled pool",
    "subtitle": "Unlabelled pairs for the pseudo-labelling teacher (kaggle_utils)",
    "description": f"{UNLABELLED}: pairs from public preference sets for the teacher of notebook 02 to label, "
    f"written by kaggle_utils.data.pool; pool_config.json names every source. Each source keeps its own licence.",
    "licenses": [{"name": "other"}],
}


class PoolDatasetError(ValueError):
    """DIR is not a pool stage output that notebook 02 can read; the message names the path and the fix."""


@dataclass(frozen=True)
class PoolDatasetConfig:
    """The pool stage's output to publish as ``{owner}/wsdm-arena-pool``."""

    # the pool stage's out_dir, holding unlabelled.parquet (pool-public writes output/pool)
    dir: Path = Path("output/pool")
    # version notes (a new dataset takes none)
    message: str = ""
    # Kaggle account that owns the dataset; empty: KAGGLE_USERNAME, then kaggle.json
    owner: str = ""
    # where the upload is staged (replaced on every run)
    stage_dir: Path = ROOT / "build/kaggle/pool"


def pool_files(folder: Path) -> dict[str, Path]:
    """The files to upload by name: ``unlabelled.parquet`` (required, with the columns the pseudo-label stage reads)
    and the provenance files the stage wrote. PoolDatasetError names the path and the fix."""
    folder = Path(folder)
    path = folder / UNLABELLED
    if not path.is_file():
        raise PoolDatasetError(
            f"no {path}: make pool-dataset uploads the pool stage's output. Run `{POOL_COMMAND}` (its out_dir is "
            f"output/pool), or point POOL_DIR= at the out_dir it wrote"
        )
    try:
        columns = pq.read_schema(path).names
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise PoolDatasetError(f"{path}: not readable as parquet ({err}); run `{POOL_COMMAND}` again") from err
    missing = [c for c in schema.SCHEMAS["unlabeled"] if c not in columns]
    if missing:
        raise PoolDatasetError(
            f"{path}: no column(s) {missing}, which notebook 02's pseudo-label stage reads; it has {columns}. "
            f"Write it with `{POOL_COMMAND}`"
        )
    return {UNLABELLED: path} | {name: folder / name for name in PROVENANCE if (folder / name).is_file()}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def stage(files: dict[str, Path], meta: dict, out: Path) -> Path:
    """``out`` = the metadata + each file, flat; nothing else."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, src in files.items():
        _link_or_copy(src, out / name)
    (out / DATASET_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def upload(cfg: PoolDatasetConfig, kaggle: str | None = None) -> Path:
    """Stage and publish ``cfg.dir`` as ``{owner}/wsdm-arena-pool``; returns the staged folder."""
    files = pool_files(cfg.dir)
    credential_source()  # before anything is staged or requested
    meta = fill_owner(METADATA, resolve_owner(cfg.owner or None))
    _raise_if(dataset_problems(meta), cfg.stage_dir / DATASET_METADATA)
    rows = pq.read_metadata(files[UNLABELLED]).num_rows
    staged = stage(files, meta, cfg.stage_dir)
    print(f"uploading {rows:,} unlabelled pairs as dataset {meta['id']}: {', '.join(files)}", flush=True)
    publish_dataset(staged, cfg.message or f"pool from {cfg.dir}", kaggle)
    return staged


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kaggle_utils.kaggle.pool_dataset", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--kaggle", default=None, help="the kaggle executable; default: the one beside python")
    parser.add_argument("--dir", type=Path, default=PoolDatasetConfig.dir, help=field_docs(PoolDatasetConfig)["dir"])
    add_dataset_version_args(parser, PoolDatasetConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        staged = upload(PoolDatasetConfig(args.dir, args.message, args.owner, args.stage_dir), args.kaggle)
    except (PoolDatasetError, MetadataError, CredentialsError, KaggleCommandError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"uploaded {SLUG}; staged in {staged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
