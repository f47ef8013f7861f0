"""Every ``dataset-metadata.json`` the project writes names a licence the kaggle CLI documents
(Kaggle/kaggle-api docs/datasets_metadata.md): kaggle 2.2.5 sends the name unchecked, so a wrong one is only found
by the server, at upload time."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from kaggle_utils.kaggle import models, pool_dataset
from kaggle_utils.kaggle import publish as kc

ROOT = Path(__file__).resolve().parents[2]
OWNER = "testuser"


def _package(tmp: Path) -> Path:
    return kc.stage_dataset(ROOT / "kaggle_utils", ROOT / kc.DATASET_METADATA, OWNER, tmp / "package")


def _wheels(tmp: Path) -> Path:
    kc.build_wheels(tmp / "wheels", kc.WheelsTarget(), download=False)
    return tmp / "wheels"


def _adapter(tmp: Path) -> Path:
    meta = models.dataset_metadata(OWNER, "wsdm-tiny-lora", {"model_path": "models/qwen2-tiny"})
    return models.stage({}, meta, tmp / "adapter")


def _pool(tmp: Path) -> Path:
    return pool_dataset.stage({}, kc.fill_owner(pool_dataset.METADATA, OWNER), tmp / "pool")


# what writes a dataset-metadata.json (the module, and a call that writes one as the project does)
WRITERS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "package": ("publish", _package),
    "wheels": ("publish", _wheels),
    "adapter": ("models", _adapter),
    "pool": ("pool_dataset", _pool),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_dataset_metadata_written_names_a_documented_license(writer, tmp_path):
    folder = WRITERS[writer][1](tmp_path)
    meta = json.loads((folder / kc.DATASET_METADATA).read_text())
    (entry,) = meta["licenses"]
    assert entry["name"] in kc.DATASET_LICENSES
    assert kc.dataset_problems(kc.fill_owner(meta, OWNER)) == []


def test_the_writers_above_are_every_module_that_writes_dataset_metadata():
    """A new module writing dataset metadata must join WRITERS, so that its licence is checked too."""
    writes = re.compile(r"DATASET_METADATA\)\.write_text|dataset-metadata\.json\"?\)\.write_text")
    found = {p.stem for p in (ROOT / "kaggle_utils").rglob("*.py") if writes.search(p.read_text())}
    assert found == {module for module, _ in WRITERS.values()}


def test_the_package_dataset_is_mit_licensed_as_other_with_mit_in_its_description():
    meta = json.loads((ROOT / kc.DATASET_METADATA).read_text())
    assert meta["licenses"] == [{"name": "other"}] and "License: MIT" in meta["description"]


@pytest.mark.parametrize("name", ["MIT", "cc0-1.0", "Apache-2.0", "", None])
def test_a_license_name_the_cli_does_not_document_is_refused_naming_the_choices(name):
    meta = {"id": "o/wsdm-arena-pool", "title": "WSDM Arena pool", "licenses": [{"name": name}]}
    (problem,) = kc.dataset_problems(meta)
    assert f"license {name!r} is not a name the kaggle CLI documents" in problem
    assert "CC0-1.0" in problem and "'other' with the licence named in the description" in problem
