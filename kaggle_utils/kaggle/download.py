"""``make data``: the competition's files and the public datasets a recipe names, downloaded with the real ``kaggle``
CLI, unpacked, checked against the competition schema, and listed (what, rows, folder).

For shell runs on rented GPUs (on Kaggle the inputs are mounted instead). Where things go, under ``dest``::

    data/competition/                the competition (train.parquet, test.parquet, sample_submission.csv): the
                                     ``data_dir`` of the ``prepare`` recipe
    data/datasets/<owner>/<slug>/    each dataset, unpacked

Each source is downloaded and unpacked into ``<dest>/.incomplete/``, checked there (every ``train.parquet`` and
``test.parquet`` through :func:`kaggle_utils.data.schema.load`), and only then moved into place with a stamp
(``.kaggle_utils-download.json``) listing its files and their sizes. The stamp is what marks a folder complete: a
folder whose files still match it is not downloaded again unless ``force``, and a failed or rejected download never
replaces a good copy. The first run writes ``<dest>/.gitignore`` so that competition data stays out of git.

``python -m kaggle_utils.kaggle.download --recipe data-wsdm [--dest data] [--force true]``
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pyarrow.parquet as pq

from kaggle_utils.config.cli import parse_config
from kaggle_utils.data import schema
from kaggle_utils.kaggle.publish import (
    COMPETITION,
    CredentialsError,
    KaggleCommandError,
    credential_source,
    run_kaggle,
)

STAMP = ".kaggle_utils-download.json"
INCOMPLETE = ".incomplete"
# the files the schema covers, wherever they sit in a download
CHECKED = {"train.parquet": "train", "test.parquet": "test"}
# kaggle 2.2.5 prints this hint under every HTTP 403 (cli.py main → format_http_error); older CLIs and non-JSON
# answers print "403 - Forbidden" / "403 Client Error"
FORBIDDEN = re.compile(r"You don't have access to this resource|\b403\b|accept this competition's rules")
SLUG = re.compile(r"[a-z0-9][a-z0-9-]*[a-z0-9]")


class RulesNotAcceptedError(KaggleCommandError):
    """Kaggle refused a competition download (403): this account has not accepted the competition's rules."""


@dataclass
class DownloadConfig:
    """Download the competition's files and public Kaggle datasets with the kaggle CLI, unpack and check them."""

    # the stage its recipes name (``stage = "data"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "data"
    # its recipes' [sections] and the groups of --help: section -> the fields written under it
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "source": ("competition", "datasets"),
        "output": ("dest", "force"),
    }

    # the competition whose files to download ("" for none); its rules must have been accepted on kaggle.com
    competition: str = COMPETITION
    # public datasets to download too, each "owner/slug" as in its URL kaggle.com/datasets/owner/slug
    datasets: list[str] = field(default_factory=list)
    # folder that receives competition/ and datasets/<owner>/<slug>/ (created if missing)
    dest: Path = Path("data")
    # download again even when a verified copy is there; the old copy is replaced only once the new one checks out
    force: bool = False

    def __post_init__(self) -> None:
        self.dest = Path(self.dest)
        if self.competition and not SLUG.fullmatch(self.competition):
            raise ValueError(f"competition {self.competition!r}: expected the slug from its URL, e.g. {COMPETITION}")
        for ref in self.datasets:
            owner, _, slug = ref.partition("/")
            if not (SLUG.fullmatch(owner.lower()) and SLUG.fullmatch(slug)):
                raise ValueError(f"datasets: {ref!r} is not 'owner/slug' (as in kaggle.com/datasets/owner/slug)")
        if not self.competition and not self.datasets:
            raise ValueError("nothing to download: set competition and/or datasets")


@dataclass(frozen=True)
class Source:
    """One thing to download: the competition, or a dataset ``owner/slug``."""

    kind: str  # "competition" or "dataset"
    ref: str

    @property
    def folder(self) -> Path:
        """Where it lands, relative to ``dest``: one fixed folder for the competition, which the recipes read."""
        return Path("competition") if self.kind == "competition" else Path("datasets", self.ref)

    @property
    def url(self) -> str:
        return f"https://www.kaggle.com/{'competitions' if self.kind == 'competition' else 'datasets'}/{self.ref}"

    def cli_args(self, into: Path) -> list[str]:
        """The kaggle command that downloads and unpacks (``--unzip``; the zip is then deleted) into ``into``.

        ``-q``: its progress bar would only be shown once the download is over (run_kaggle captures the output).
        """
        return [f"{self.kind}s", "download", self.ref, "-p", str(into), "--unzip", "-q"]


def sources(cfg: DownloadConfig) -> list[Source]:
    found = [Source("competition", cfg.competition)] if cfg.competition else []
    return found + [Source("dataset", ref) for ref in cfg.datasets]


# ------------------------------------------------------------------------------------------------ checking


def _rows(path: Path) -> int | None:
    """Row count of a table (parquet from its footer, csv by parsing); None for other files or unreadable ones."""
    try:
        if path.suffix == ".parquet":
            return pq.read_metadata(path).num_rows
        if path.suffix == ".csv":
            return len(pd.read_csv(path, usecols=[0]))
    except Exception:  # a listing only: the schema check below is what fails a download
        return None
    return None


def check(source: Source, folder: Path) -> dict[str, dict]:
    """Every file of an unpacked download with its size and rows; the schema files validated (DataError names
    file, column and row). The competition must hold train.parquet and test.parquet at its top."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STAMP)
    if source.kind == "competition":
        missing = [name for name in CHECKED if not (folder / name).is_file()]
        if missing:
            found = ", ".join(p.relative_to(folder).as_posix() for p in files) or "nothing"
            raise schema.DataError(f"{folder}: the competition download has no {missing} (it holds: {found})")
    listing = {}
    for path in files:
        rows = len(schema.load(path, CHECKED[path.name])) if path.name in CHECKED else _rows(path)
        listing[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "rows": rows}
    return listing


def verified(source: Source, folder: Path) -> tuple[dict | None, str]:
    """The stamp of a complete earlier download whose files are all still there at their sizes, else (None, why)."""
    stamp_path = folder / STAMP
    if not stamp_path.is_file():
        return None, "not downloaded yet"
    try:
        stamp = json.loads(stamp_path.read_text())
    except json.JSONDecodeError:
        return None, f"{stamp_path} is unreadable"
    if stamp.get("source") != f"{source.kind} {source.ref}":
        return None, f"{stamp_path} is for {stamp.get('source')!r}"
    for name, info in stamp["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return None, f"{path} is missing or changed since it was checked"
    return stamp, "already downloaded and checked"


# ---------------------------------------------------------------------------------------------- downloading


def _kaggle(source: Source, into: Path, kaggle: str | None) -> None:
    """Run the download; a 403 on the competition becomes RulesNotAcceptedError with the URL to accept them at."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):  # run_kaggle echoes the CLI's output: read it for the 403
            run_kaggle(source.cli_args(into), kaggle)
    except KaggleCommandError as err:
        said = out.getvalue()
        if source.kind == "competition" and FORBIDDEN.search(said):
            first = next((line for line in said.splitlines() if line.strip()), "")
            raise RulesNotAcceptedError(
                f"Kaggle refused to download the competition {source.ref!r} (HTTP 403): this account has not "
                f"accepted its rules. Accept them at {source.url}/rules (signed in as the account whose "
                f"credentials you use), then run `make data` again. Kaggle said: {first}"
            ) from err
        print(said.strip() or "(the kaggle CLI printed nothing)")
        raise
    if out.getvalue().strip():
        print(out.getvalue().strip())


def fetch(source: Source, dest: Path, kaggle: str | None = None) -> dict:
    """Download, unpack and check ``source`` beside ``dest``; move it into place only once it passed."""
    final, partial = dest / source.folder, dest / INCOMPLETE / source.folder
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"downloading {source.kind} {source.ref} into {final} ...", flush=True)
    try:
        _kaggle(source, partial, kaggle)
    except KaggleCommandError:
        shutil.rmtree(partial, ignore_errors=True)  # a half-written archive is of no use
        raise
    try:
        files = check(source, partial)
    except schema.DataError as err:
        # kept (never in place of a good copy) so the bad file the message names can be looked at
        raise schema.DataError(f"{err}\n(the download is kept in {partial} for inspection and is not used)") from err
    stamp = {"source": f"{source.kind} {source.ref}", "url": source.url, "files": files}
    (partial / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(final)
    return stamp


def _ignore_in_git(dest: Path) -> None:
    """Downloaded data never belongs in the repository (and competition data may not be redistributed)."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = dest / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# written by `make data`: everything downloaded here stays out of git\n*\n")


def download(cfg: DownloadConfig, kaggle: str | None = None) -> list[tuple[Source, dict, str]]:
    """Every source of ``cfg`` present and checked under ``cfg.dest``: (source, stamp, what happened) each."""
    credential_source()  # before anything is created or requested
    _ignore_in_git(cfg.dest)
    done = []
    try:
        for source in sources(cfg):
            folder = cfg.dest / source.folder
            if folder.exists() and not (folder / STAMP).exists() and not cfg.force:
                raise FileExistsError(
                    f"{folder} exists but was not written by `make data` (it has no {STAMP}), so it is left alone: "
                    "move it away, or pass --force true (make data FORCE=1) to replace it with a checked download"
                )
            stamp, why = verified(source, folder)
            if stamp is not None and not cfg.force:
                print(f"{source.kind} {source.ref}: {why} in {folder} (--force true to fetch again)")
                done.append((source, stamp, "kept"))
                continue
            if stamp is None and why != "not downloaded yet":
                print(f"{source.kind} {source.ref}: {why}: downloading again")
            done.append((source, fetch(source, cfg.dest, kaggle), "downloaded"))
    finally:
        # keep only what a failed check left there to be looked at
        incomplete = cfg.dest / INCOMPLETE
        if incomplete.is_dir() and not any(p.is_file() for p in incomplete.rglob("*")):
            shutil.rmtree(incomplete)
    return done


def table(done: list[tuple[Source, dict, str]], dest: Path) -> str:
    """What went where: one line per file, with its rows where it is a table."""
    lines = [("what", "rows", "folder", "")]
    for source, stamp, status in done:
        for name, info in stamp["files"].items():
            rows = f"{info['rows']:,}" if info["rows"] is not None else "-"
            folder = (dest / source.folder / name).parent
            lines.append((f"{source.ref}: {Path(name).name}", rows, str(folder), status))
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join(f"{w:<{widths[0]}}  {r:>{widths[1]}}  {f:<{widths[2]}}  {s}".rstrip() for w, r, f, s in lines)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_config(DownloadConfig, argv)
        done = download(cfg)
    # DataError and RecipeError are ValueErrors
    except (ValueError, FileExistsError, CredentialsError, KaggleCommandError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(table(done, cfg.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
