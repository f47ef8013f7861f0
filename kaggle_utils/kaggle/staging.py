"""What a pushed notebook runs: the Kaggle profile's recipes injected into its parameters, and checked first.

``make push`` stages each notebook with a cell after its ``parameters`` cell (tagged ``injected-parameters``, as
papermill does) that sets ``<role>_recipe`` and ``<role>_overrides`` to the recipe of the ``kaggle`` profile and
every field it resolves to. The notebook then runs exactly what the recipe said at push time, whatever version of
the package dataset it finds. After it comes the bootstrap cell (tagged ``injected-bootstrap``): the text of
``kaggle/bootstrap.py``, one source for every notebook, which finds the package and installs the wheels on Kaggle.
Before anything is sent, staging refuses:

* a recipe path ``/kaggle/input/<slug>/...`` that no source of the kernel attaches;
* an inference recipe whose input settings (``max_length``, template, truncation, ...) differ from the training
  config of an adapter it loads, read from ``build/kaggle/models/<slug>/train_config.json`` (what
  ``make upload-model`` uploaded), naming both values.
"""

from __future__ import annotations

import json
import pprint
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kaggle_utils.config import recipes
from kaggle_utils.config.cli import config_to_dict
from kaggle_utils.infer import InferConfig
from kaggle_utils.inputs.formatter import INPUT_CONTRACT
from kaggle_utils.kaggle.env import input_slug
from kaggle_utils.prepare import PrepareConfig
from kaggle_utils.pseudo_label import PseudoLabelConfig
from kaggle_utils.train import TrainConfig

STAGE_CONFIGS: dict[str, type] = {c.STAGE: c for c in (PrepareConfig, TrainConfig, PseudoLabelConfig, InferConfig)}
# input settings that change the token ids a model sees: an adapter must be served with the ones it learned under
# the inference fields that name an adapter
ADAPTER_FIELDS = ("primary_adapter", "secondary_adapter")
INJECTED_TAG = "injected-parameters"
BOOTSTRAP_TAG = "injected-bootstrap"
BOOTSTRAP_FILE = Path(__file__).with_name("bootstrap.py")


class StagingError(ValueError):
    """A notebook cannot be pushed as its recipes stand; the message names the recipe, field and fix."""


def notebook_roles(notebook: str, profile: str = "kaggle") -> dict[str, str]:
    """Role → recipe name for a notebook (``04_inference``) in a profile; an empty name skips the role."""
    table = recipes.profile(profile)
    if notebook not in table:
        raise StagingError(f'{recipes.PROFILES_FILE}: no [{profile}."{notebook}"] table for notebook {notebook}')
    return dict(table[notebook])


def resolve(recipe: str) -> tuple[str, dict[str, Any]]:
    """The stage of a recipe and every field of its config as the stage would see it (JSON-ready)."""
    stage = recipes.read(recipe).stage
    if stage not in STAGE_CONFIGS:
        raise StagingError(f"recipe {recipe}: stage {stage!r} has no notebook ({', '.join(STAGE_CONFIGS)})")
    return stage, config_to_dict(recipes.load(recipe, STAGE_CONFIGS[stage]))


def parameters_source(roles: Mapping[str, str], resolved: Mapping[str, dict]) -> str:
    """The injected cell: ``<role>_recipe`` and ``<role>_overrides`` (all resolved fields) for every role."""
    lines = ["# Parameters injected by `make push` from the kaggle profile (kaggle_utils/recipes/profiles.toml)"]
    for role, recipe in roles.items():
        values = resolved.get(role, {})
        lines.append(f"{role}_recipe = {recipe!r}")
        lines.append(f"{role}_overrides = {pprint.pformat(values, width=110, sort_dicts=False)}")
    return "\n".join(lines) + "\n"


def bootstrap_source() -> str:
    """The bootstrap cell: the text of ``kaggle/bootstrap.py``."""
    return BOOTSTRAP_FILE.read_text()


def _cell(source: str, tag: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {"tags": [tag]}, "outputs": [], "source": source}


def inject(notebook: dict, source: str) -> dict:
    """``notebook`` (nbformat JSON) with the injected parameters ``source`` and then the bootstrap cell after its
    ``parameters`` cell (replacing ones injected before)."""
    injected = (INJECTED_TAG, BOOTSTRAP_TAG)
    cells = [c for c in notebook["cells"] if not set(injected) & set(c.get("metadata", {}).get("tags", []))]
    where = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(where) != 1:
        raise StagingError(f"the notebook needs exactly one cell tagged 'parameters', found {len(where)}")
    new = [_cell(source, INJECTED_TAG), _cell(bootstrap_source(), BOOTSTRAP_TAG)]
    return {**notebook, "cells": [*cells[: where[0] + 1], *new, *cells[where[0] + 1 :]]}


def attached_slugs(meta: Mapping) -> set[str]:
    """The folder names Kaggle mounts under /kaggle/input for a kernel's sources."""
    slugs = set(meta.get("competition_sources", []))
    slugs |= {ref.split("/")[1] for ref in meta.get("dataset_sources", []) + meta.get("kernel_sources", [])}
    slugs |= {ref.split("/")[1] for ref in meta.get("model_sources", [])}
    return slugs


def unattached_inputs(meta: Mapping, role: str, recipe: str, values: Mapping[str, Any]) -> list[str]:
    """Recipe paths under /kaggle/input whose slug the kernel does not attach."""
    attached = attached_slugs(meta)
    problems = []
    for field, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            slug = input_slug(item) if isinstance(item, str) and item else None
            if slug and slug not in attached:
                problems.append(
                    f"{role} ({recipe}): {field} = {item!r} needs the input {slug!r}, which the kernel does not "
                    f"attach: add it to its dataset_sources / kernel_sources / model_sources, or fix the recipe"
                )
    return problems


def adapter_mismatches(recipe: str, values: Mapping[str, Any], models_dir: Path) -> list[str]:
    """An inference recipe's input settings against each adapter's training config, named value against value."""
    problems = []
    for field in ADAPTER_FIELDS:
        slug = input_slug(values.get(field) or "")
        if not slug:
            continue
        trained = models_dir / slug / "train_config.json"
        if not trained.is_file():
            problems.append(
                f"{recipe}: {field} loads the dataset {slug!r}, but {trained} is missing, so its training settings "
                f"cannot be checked: publish it with `make upload-model DIR=<training output> NAME={slug}` from this "
                "checkout, or copy its train_config.json there"
            )
            continue
        saved = json.loads(trained.read_text())
        for key in INPUT_CONTRACT:
            if key in saved and values.get(key) is not None and saved[key] != values.get(key):
                problems.append(
                    f"{recipe}: {key} = {values.get(key)!r}, but {field} ({slug}) was trained with "
                    f"{key} = {saved[key]!r} ({trained}): set the recipe's {key} to {saved[key]!r}"
                )
    return problems


def stage_notebook(notebook: dict, stem: str, meta: Mapping, models_dir: Path) -> dict:
    """The built notebook with its Kaggle recipes injected; StagingError lists every problem found."""
    roles = notebook_roles(stem)
    resolved, problems = {}, []
    for role, recipe in roles.items():
        if not recipe:
            continue
        stage, values = resolve(recipe)
        resolved[role] = values
        problems += unattached_inputs(meta, role, recipe, values)
        if stage == InferConfig.STAGE:
            problems += adapter_mismatches(recipe, values, models_dir)
    if problems:
        raise StagingError(f"{stem}: not pushed:\n  - " + "\n  - ".join(problems))
    return inject(notebook, parameters_source(roles, resolved))
