"""`make upload-model`: a trained adapter published as a Kaggle dataset through the real kaggle CLI, against the
loopback fake Kaggle (``kaggle_utils/kaggle/loopback.py``), with a tiny adapter folder built by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kaggle_utils.kaggle import models
from kaggle_utils.kaggle.loopback import FAKE_KEY, OWNER

NAME = "wsdm-tiny-lora"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _adapter(folder: Path, train_config: dict | None = None) -> Path:
    """What ``save_pretrained`` of a peft model and its tokenizer write, in miniature."""
    folder.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "x",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    weights = {"base_model.model.q_proj.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32)}
    save_file(weights, folder / "adapter_model.safetensors")
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    if train_config is not None:
        (folder / "train_config.json").write_text(json.dumps(train_config))
    return folder


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A training output folder: adapter/, the config and metrics, and what is not to be uploaded."""
    out = tmp_path / "train-out"
    _adapter(out / "adapter")
    (out / "train_config.json").write_text(json.dumps({"model_path": "models/qwen2-tiny", "lr": 0.002}))
    (out / "metrics.json").write_text(json.dumps({"steps": 30, "val": {"accuracy": 0.6}}))
    (out / "history.csv").write_text("step,loss\n1,0.7\n")
    (out / "checkpoint.pt").write_bytes(b"optimizer state, not for upload")
    (out / "val_predictions.parquet").write_bytes(b"not for upload")
    return out


def _make_upload(make, folder: Path, stage: Path, *extra: str):
    return make(
        "upload-model", f"DIR={folder}", f"NAME={NAME}", f"KAGGLE_USERNAME={OWNER}", f"MODELS_DIR={stage}", *extra
    )


def test_make_upload_model_creates_then_versions_the_adapter_dataset(kaggle, make, run_dir, tmp_path):
    stage = tmp_path / "models"
    proc = _make_upload(make, run_dir, stage)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # new (status 404): created, private, under the owner, with one file token per uploaded file
    (create,) = kaggle.calls("CreateDataset")
    assert (create.body["ownerSlug"], create.body["slug"], create.body["title"]) == (OWNER, NAME, NAME)
    assert create.body["isPrivate"] is True and create.body["licenseName"] == "other"
    assert "models/qwen2-tiny" in create.body["description"]
    # exactly the adapter's files + its training config and metrics, flat, byte for byte
    uploads = kaggle.uploads()
    expected = {
        **{n: run_dir / "adapter" / n for n in ADAPTER_FILES},
        **{n: run_dir / n for n in ["train_config.json", "metrics.json"]},
    }
    assert sorted(uploads) == sorted(expected)
    assert all(uploads[n] == path.read_bytes() for n, path in expected.items())
    assert len(create.body["files"]) == len(expected)
    # the staged folder stays: the contract other code reads
    staged = stage / NAME
    assert sorted(p.name for p in staged.iterdir()) == sorted([*expected, "dataset-metadata.json"])
    assert json.loads((staged / "train_config.json").read_text())["model_path"] == "models/qwen2-tiny"
    assert json.loads((staged / "dataset-metadata.json").read_text())["id"] == f"{OWNER}/{NAME}"
    assert list(load_file(staged / "adapter_model.safetensors")) == ["base_model.model.q_proj.lora_A.weight"]
    assert [p.name for p in stage.iterdir()] == [NAME], "no partial staging left"
    assert FAKE_KEY not in proc.stdout + proc.stderr

    # it exists now: a new version with the notes given, the staged folder replaced by what was uploaded this time
    kaggle.requests.clear()
    kaggle.replies["GetDatasetStatus"] = {"status": "READY"}
    (run_dir / "train_config.json").write_text(json.dumps({"model_path": "models/qwen2-tiny", "lr": 0.001}))
    proc = _make_upload(make, run_dir, stage, "MESSAGE=lower lr")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (version,) = kaggle.calls("CreateDatasetVersion")
    assert (version.body["ownerSlug"], version.body["datasetSlug"]) == (OWNER, NAME)
    assert version.body["body"]["versionNotes"] == "lower lr" and kaggle.calls("CreateDataset") == []
    assert sorted(kaggle.uploads()) == sorted(expected)
    assert json.loads((staged / "train_config.json").read_text())["lr"] == 0.001


def test_an_adapter_folder_itself_uploads_its_own_files(kaggle, tmp_path, capsys):
    adapter = _adapter(tmp_path / "adapter", train_config={"model_path": "models/gemma2-tiny"})
    (adapter / "checkpoint-30").mkdir()  # a sub-folder is not part of a flat dataset: skipped, and said so
    assert models.main(["upload", "--dir", str(adapter), "--name", NAME, "--stage-dir", str(tmp_path / "m")]) == 0
    assert sorted(kaggle.uploads()) == sorted([*ADAPTER_FILES, "train_config.json"])
    assert f"skipped {adapter / 'checkpoint-30'}/" in capsys.readouterr().out
    staged = json.loads((tmp_path / "m" / NAME / "train_config.json").read_text())
    assert staged == {"model_path": "models/gemma2-tiny"}


def test_the_calibration_and_blend_beside_the_adapter_are_uploaded_with_it(kaggle, run_dir, tmp_path, capsys):
    """What the calibrate step wrote into adapter/ is what inference reads beside the adapter on Kaggle: uploaded."""
    from kaggle_utils.evaluation.calibration import Blend, Calibration, adapter_fingerprint

    fingerprint = adapter_fingerprint(run_dir / "adapter")
    Calibration(temperature=1.7, reason="fitted", adapter_fingerprint=fingerprint).save(
        run_dir / "adapter" / "calibration.json"
    )
    Blend(weight=0.3, reason="fitted", secondary_fingerprint=fingerprint).save(run_dir / "adapter" / "blend.json")
    assert models.main(["upload", "--dir", str(run_dir), "--name", NAME, "--stage-dir", str(tmp_path / "m")]) == 0
    assert {"calibration.json", "blend.json"} <= set(kaggle.uploads())
    staged = tmp_path / "m" / NAME
    assert Calibration.load(staged / "calibration.json").temperature == 1.7
    # the staged copy is what inference loads: its weights keep the fingerprint the files were fitted for
    assert adapter_fingerprint(staged) == fingerprint == Blend.load(staged / "blend.json").secondary_fingerprint
    assert "no calibration.json" not in capsys.readouterr().out


def test_an_adapter_without_calibration_is_uploaded_with_a_note(kaggle, run_dir, tmp_path, capsys):
    assert models.main(["upload", "--dir", str(run_dir), "--name", NAME, "--stage-dir", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "no calibration.json" in out and "--recipe calibrate-students" in out


def test_the_adapters_own_train_config_wins_over_the_run_folders(kaggle, run_dir, tmp_path):
    (run_dir / "adapter/train_config.json").write_text(json.dumps({"model_path": "the adapter's own"}))
    assert models.main(["upload", "--dir", str(run_dir), "--name", NAME, "--stage-dir", str(tmp_path / "m")]) == 0
    assert json.loads(kaggle.uploads()["train_config.json"]) == {"model_path": "the adapter's own"}


# ------------------------------------------------------------------------------------------------ refusals


def _refused(args: list[str], capsys) -> str:
    assert models.main(["upload", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and [line for line in err.splitlines() if line.startswith("error")] == [
        err.splitlines()[0]
    ], "one message"
    return err


def test_refuses_a_folder_without_an_adapter(kaggle, tmp_path, capsys):
    err = _refused(["--dir", str(tmp_path), "--name", NAME, "--stage-dir", str(tmp_path / "m")], capsys)
    assert f"{tmp_path} holds no adapter: expected {tmp_path / 'adapter/adapter_config.json'}" in err
    assert "make upload-model DIR=" in err
    assert kaggle.requests == [] and not (tmp_path / "m").exists()


def test_refuses_an_adapter_without_train_config(kaggle, run_dir, tmp_path, capsys):
    (run_dir / "train_config.json").unlink()
    err = _refused(["--dir", str(run_dir), "--name", NAME, "--stage-dir", str(tmp_path / "m")], capsys)
    assert f"no train_config.json in {run_dir / 'adapter'} or {run_dir}" in err and "Copy the train_config.json" in err
    assert kaggle.requests == [] and not (tmp_path / "m").exists()


def test_refuses_an_unreadable_train_config(kaggle, run_dir, tmp_path, capsys):
    (run_dir / "train_config.json").write_text("{not json")
    err = _refused(["--dir", str(run_dir), "--name", NAME], capsys)
    assert f"{run_dir / 'train_config.json'}: not readable as JSON" in err and kaggle.requests == []


@pytest.mark.parametrize("name", ["short", "x" * 51, "Has-Capitals", "under_score", "-leading", "double--hyphen", ""])
def test_refuses_a_name_that_is_not_a_dataset_slug(kaggle, run_dir, name, capsys):
    err = _refused(["--dir", str(run_dir), f"--name={name}"], capsys)
    assert f"NAME {name!r} is not a valid Kaggle dataset slug: use 6 to 50 characters" in err
    assert kaggle.requests == []


def test_no_dir_says_how_to_call_it(kaggle, capsys):
    # what `make upload-model NAME=...` passes when DIR is not given
    assert "no DIR given: make upload-model DIR=" in _refused(["--dir", "", "--name", NAME], capsys)
    assert kaggle.requests == []


def test_missing_credentials_give_one_clear_message_and_no_request(kaggle, monkeypatch, run_dir, tmp_path, capsys):
    monkeypatch.delenv("KAGGLE_KEY")
    err = _refused(["--dir", str(run_dir), "--name", NAME, "--stage-dir", str(tmp_path / "m")], capsys)
    assert "no Kaggle credentials found" in err and "KAGGLE_USERNAME and KAGGLE_KEY" in err
    assert kaggle.requests == [] and not (tmp_path / "m").exists()


def test_a_failed_upload_leaves_the_last_uploaded_stage_untouched(kaggle, run_dir, tmp_path, capsys):
    stage = tmp_path / "m"
    assert models.main(["upload", "--dir", str(run_dir), "--name", NAME, "--stage-dir", str(stage)]) == 0
    before = {p.name: p.read_bytes() for p in (stage / NAME).iterdir()}
    kaggle.replies["GetDatasetStatus"] = {"status": "READY"}
    kaggle.replies["CreateDatasetVersion"] = {"status": "error", "error": "Dataset is locked"}
    (run_dir / "train_config.json").write_text(json.dumps({"model_path": "a newer run"}))
    err = _refused(["--dir", str(run_dir), "--name", NAME, "--stage-dir", str(stage)], capsys)
    assert "Dataset version creation error: Dataset is locked" in err
    # build/kaggle/models/<NAME>/ still describes what Kaggle has
    assert {p.name: p.read_bytes() for p in (stage / NAME).iterdir()} == before
    assert [p.name for p in stage.iterdir()] == [NAME]


def test_a_merged_model_folder_uploads_as_it_is(kaggle, tmp_path, capsys):
    """What ``python -m kaggle_utils.models.merge`` writes: config, dense weights, tokenizer, train_config.json,
    merge_info.json, and an int8/ copy (a model of its own: skipped, and said so)."""
    merged = tmp_path / "merged"
    (merged / "int8").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "merge_info.json"):
        (merged / name).write_text("{}")
    (merged / "model.safetensors").write_bytes(b"weights")
    (merged / "train_config.json").write_text(json.dumps({"model_path": "models/qwen2-tiny"}))
    assert models.main(["upload", "--dir", str(merged), "--name", NAME, "--stage-dir", str(tmp_path / "m")]) == 0
    expected = ["config.json", "merge_info.json", "model.safetensors", "tokenizer.json", "train_config.json"]
    assert sorted(kaggle.uploads()) == expected
    assert f"skipped {merged / 'int8'}/" in capsys.readouterr().out
    meta = json.loads((tmp_path / "m" / NAME / "dataset-metadata.json").read_text())
    assert meta["subtitle"].startswith("LoRA merged into its dequantised nf4 base")
    (merged / "train_config.json").unlink()
    err = _refused(["--dir", str(merged), "--name", NAME, "--stage-dir", str(tmp_path / "m2")], capsys)
    assert "no train_config.json" in err
