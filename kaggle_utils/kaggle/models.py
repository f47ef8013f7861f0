"""``make upload-model``: publish a trained LoRA adapter (or a merged model folder) as a Kaggle dataset (created,
private, when new; else a new version) with the real ``kaggle`` CLI, so that the Kaggle notebooks can attach it.

DIR is what the train stage wrote: its ``out_dir`` (``adapter/`` + ``train_config.json`` [+ ``metrics.json``]), or
the ``adapter/`` folder itself (``adapter_config.json``, ``adapter_model.safetensors``, the tokenizer files and
``train_config.json``). The upload is staged flat in ``build/kaggle/models/<NAME>/``::

    dataset-metadata.json        id {owner}/<NAME>, title, one license (read by the CLI, not uploaded as a file)
    adapter_config.json          \\
    adapter_model.safetensors     } every file of the adapter folder (sub-folders are skipped, and said so)
    tokenizer.json ...           /
    calibration.json             its temperature, and blend.json (the secondary's): what inference reads beside it
    train_config.json            the training config of this adapter (from adapter/, else from DIR)
    metrics.json                 when the training wrote one

Flat, so that on Kaggle ``/kaggle/input/<NAME>/`` is itself the folder ``PeftModel.from_pretrained`` loads. The
staged folder is a contract other code reads: it stays after the upload and is replaced only once an upload
succeeded, so ``build/kaggle/models/<NAME>/train_config.json`` is the training config of what was last uploaded.

``python -m kaggle_utils.kaggle.models upload --dir output/train/qwen --name wsdm-qwen14b-lora [-m MSG] [--owner you]``
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kaggle_utils.config.cli import field_docs
from kaggle_utils.kaggle.publish import (
    DATASET_METADATA,
    ROOT,
    CredentialsError,
    KaggleCommandError,
    MetadataError,
    _raise_if,
    credential_source,
    dataset_problems,
    publish_dataset,
    resolve_owner,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAIN_CONFIG = "train_config.json"
# fitted for these weights (kaggle_utils.evaluation.calibration); inference reads them beside the adapter
CALIBRATION, BLEND = "calibration.json", "blend.json"
METRICS = "metrics.json"
# an adapter is bound by its base model's license (Qwen, Gemma), which is not one of Kaggle's choices
LICENSE = "other"
# what kaggle.com accepts as a dataset slug (the CLI itself checks only the length)
SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
USAGE = "make upload-model DIR=<training output or adapter folder> NAME=<dataset-slug>"


class UploadError(ValueError):
    """DIR or NAME cannot be uploaded as given; the message names the path and the fix."""


@dataclass(frozen=True)
class UploadConfig:
    """One adapter to publish as the Kaggle dataset ``{owner}/<name>``."""

    # training output folder (holds adapter/ and train_config.json) or the adapter folder itself
    dir: Path
    # the dataset's slug on Kaggle: 6 to 50 characters, lowercase letters, digits and single hyphens
    name: str
    # version notes (a new dataset takes none)
    message: str = ""
    # Kaggle account that owns the dataset; empty: KAGGLE_USERNAME, then kaggle.json
    owner: str = ""
    # where uploads are staged, one folder per name, kept after the upload
    stage_dir: Path = ROOT / "build/kaggle/models"

    def __post_init__(self) -> None:
        if not 6 <= len(self.name) <= 50 or not SLUG.fullmatch(self.name):
            raise UploadError(
                f"NAME {self.name!r} is not a valid Kaggle dataset slug: use 6 to 50 characters, lowercase letters, "
                "digits and single hyphens (e.g. wsdm-qwen14b-lora)"
            )


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UploadError(f"{path}: not readable as JSON ({err}); copy it again from the training run") from err
    if not isinstance(value, dict):
        raise UploadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def merged_files(folder: Path) -> dict[str, Path]:
    """A merged model folder (``python -m kaggle_utils.models.merge``: config.json, the dense weights, the tokenizer,
    train_config.json, merge_info.json): every file of it, flat, so that ``from_pretrained`` loads the dataset folder
    itself. Its ``int8/`` copy is a model of its own: upload it with DIR=<merged>/int8."""
    if not any(folder.glob("*.safetensors")):
        raise UploadError(f"{folder} has config.json but no *.safetensors weights: the merge did not finish")
    files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    for sub in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        print(f"skipped {folder / sub}/: the dataset is flat; upload {folder / sub} as a dataset of its own")
    if TRAIN_CONFIG not in files:
        raise UploadError(
            f"no {TRAIN_CONFIG} in {folder}: the merge copies the adapter's; without it nobody can tell how the "
            f"weights were trained. Copy the {TRAIN_CONFIG} of the adapter that was merged into {folder}"
        )
    _json_object(files[TRAIN_CONFIG])
    return files


def adapter_files(folder: Path) -> dict[str, Path]:
    """The files to upload, by the name they take in the dataset; UploadError naming the path and the fix. A merged
    model folder (config.json and dense weights, no adapter) uploads as it is (:func:`merged_files`)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and not (folder / ADAPTER_CONFIG).is_file():
        return merged_files(folder)
    if (folder / "adapter" / ADAPTER_CONFIG).is_file():
        adapter = folder / "adapter"  # a training output folder
    elif (folder / ADAPTER_CONFIG).is_file():
        adapter = folder  # the adapter folder itself
    else:
        raise UploadError(
            f"{folder} holds no adapter: expected {folder / 'adapter' / ADAPTER_CONFIG} (a training output folder) "
            f"or {folder / ADAPTER_CONFIG} (an adapter folder). Pass the out_dir the train stage wrote: {USAGE}"
        )
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise UploadError(f"{adapter} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: the training did not finish")
    _json_object(adapter / ADAPTER_CONFIG)
    files = {p.name: p for p in sorted(adapter.iterdir()) if p.is_file() and not p.name.startswith(".")}
    for sub in sorted(p.name for p in adapter.iterdir() if p.is_dir()):
        print(f"skipped {adapter / sub}/: the dataset is flat, only the adapter folder's files are uploaded")
    # the adapter's own copy of its config wins: the train stage writes it beside the weights it belongs to
    for name in (TRAIN_CONFIG, METRICS):
        if name not in files and (folder / name).is_file():
            files[name] = folder / name
    if TRAIN_CONFIG not in files:
        raise UploadError(
            f"no {TRAIN_CONFIG} in {adapter} or {folder}: without it nobody can tell how this adapter was trained. "
            f"Copy the {TRAIN_CONFIG} the training run saved next to the adapter, or pass its training output folder"
        )
    _json_object(files[TRAIN_CONFIG])
    if CALIBRATION not in files:
        print(
            f"note: no {CALIBRATION} in {adapter}: inference will apply T = 1. Fit it with "
            "python -m kaggle_utils.evaluation.calibration --recipe calibrate-students before uploading"
        )
    return files


def dataset_metadata(owner: str, name: str, train_config: dict, merged: bool = False) -> dict:
    base = train_config.get("model_path") or "see train_config.json"
    what = "LoRA merged into its dequantised nf4 base" if merged else "LoRA adapter"
    return {
        "id": f"{owner}/{name}",
        "title": name,
        "subtitle": f"{what} and its training config (kaggle_utils)",
        "description": f"{what}, trained with kaggle_utils.train; base model: {base}. "
        f"{TRAIN_CONFIG} holds the full training config.",
        "licenses": [{"name": LICENSE}],
    }


def stage(files: dict[str, Path], meta: dict, out: Path) -> Path:
    """``out`` = the metadata + a copy of each file, flat; nothing else."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy2(src, out / name)
    (out / DATASET_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def upload(cfg: UploadConfig, kaggle: str | None = None) -> Path:
    """Stage and publish ``cfg.dir`` as ``{owner}/{cfg.name}``; returns the staged folder (kept)."""
    files = adapter_files(cfg.dir)
    credential_source()  # before anything is staged or requested
    owner = resolve_owner(cfg.owner or None)
    merged = ADAPTER_CONFIG not in files
    meta = dataset_metadata(owner, cfg.name, json.loads(files[TRAIN_CONFIG].read_text()), merged)
    final = cfg.stage_dir / cfg.name
    _raise_if(dataset_problems(meta), final / DATASET_METADATA)
    # staged beside the final folder and moved there only after the upload went through, so the final folder always
    # holds what Kaggle has (the CLI names uploaded files by their own names, not the folder's)
    partial = cfg.stage_dir / f".{cfg.name}.partial"
    stage(files, meta, partial)
    print(f"uploading {len(files)} files as dataset {meta['id']}: {', '.join(files)}", flush=True)
    try:
        publish_dataset(partial, cfg.message or f"adapter from {cfg.dir}", kaggle)
    except KaggleCommandError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kaggle_utils.kaggle.models", description=__doc__.split("\n")[0])
    parser.add_argument("--kaggle", default=None, help="the kaggle executable; default: the one beside python")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("upload", help="publish a trained adapter as a Kaggle dataset (created if new)")
    cmd.add_argument("--dir", required=True, help=field_docs(UploadConfig)["dir"])
    cmd.add_argument("--name", required=True, help=field_docs(UploadConfig)["name"])
    add_dataset_version_args(cmd, UploadConfig)
    return parser


def add_dataset_version_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """``--message``, ``--owner`` and ``--stage-dir`` of a dataset upload config ``cls``, help from its comments."""
    docs = field_docs(cls)  # the help is the comment above each field: written once
    parser.add_argument("-m", "--message", default="", help=docs["message"])
    parser.add_argument("--owner", default="", help=docs["owner"])
    parser.add_argument("--stage-dir", type=Path, default=cls.stage_dir, help=docs["stage_dir"])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not args.dir:  # `make upload-model` without DIR=
            raise UploadError(f"no DIR given: {USAGE}")
        cfg = UploadConfig(Path(args.dir), args.name, args.message, args.owner, args.stage_dir)
        staged = upload(cfg, args.kaggle)
    except (UploadError, MetadataError, CredentialsError, KaggleCommandError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"uploaded {staged.name}; staged copy kept in {staged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
