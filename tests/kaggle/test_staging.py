"""`make push` ships each notebook with its Kaggle recipe injected into the parameters, and refuses an inference
recipe that does not match the training config of an adapter it loads, before any request is sent."""

from __future__ import annotations

import json
from pathlib import Path

import jupytext
import pytest

from kaggle_utils.config import recipes
from kaggle_utils.infer import InferConfig
from kaggle_utils.kaggle import publish as kc
from kaggle_utils.kaggle import staging
from kaggle_utils.kaggle.loopback import OWNER

ROOT = Path(__file__).resolve().parents[2]
INFER_KERNEL = ROOT / "kernel-metadata" / "wsdm-arena-04-inference"


def parameters(notebook: dict) -> dict:
    """The values a run of the notebook sees after its parameters and injected-parameters cells."""
    values: dict = {}
    for cell in notebook["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if "parameters" in tags or staging.INJECTED_TAG in tags:
            exec("".join(cell["source"]), values)
    return {k: v for k, v in values.items() if not k.startswith("__")}


def test_make_push_ships_the_inference_notebook_with_the_kaggle_recipe(kaggle, make, models_dir):
    proc = make("push", "KERNEL=04_inference", f"KAGGLE_USERNAME={OWNER}", f"MODELS_DIR={models_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (save,) = kaggle.calls("SaveKernel")
    nb = json.loads(save.body["text"])
    tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
    at = tags.index(["parameters"])
    assert tags[at + 1] == [staging.INJECTED_TAG], "injected right after the parameters cell, as papermill does"
    params = parameters(nb)
    assert params["infer_recipe"] == "infer-cascade-2xt4"
    # the token-id settings are left to each adapter's train_config.json (read at run time, per role)
    assert params["infer_overrides"]["max_length"] is None
    # what the notebook builds from them is exactly the recipe
    cfg = recipes.load(params["infer_recipe"], InferConfig, params["infer_overrides"])
    assert cfg == recipes.load("infer-cascade-2xt4", InferConfig)
    # batch_tokens 0: each model's budget is measured from the T4's free memory once loaded (scoring.memory)
    assert (cfg.inputs.max_length, cfg.inputs.template) == (None, None)
    assert (cfg.budget.batch_tokens, cfg.budget.time_budget_minutes) == (0, 690.0)


def test_a_recipe_value_unlike_the_adapters_training_config_is_refused_at_push_time(models_dir):
    """A recipe that sets a token-id setting must match each adapter it loads; left out, each adapter's own is used."""
    trained = models_dir / "wsdm-gemma2-9b-student" / "train_config.json"
    trained.write_text(json.dumps({**json.loads(trained.read_text()), "max_length": 2048, "truncation": "head_tail"}))
    values = {"secondary_adapter": "/kaggle/input/wsdm-gemma2-9b-student", "max_length": 2500, "truncation": "right"}
    problems = staging.adapter_mismatches("my-infer", values, models_dir)
    said = "max_length = 2500, but secondary_adapter (wsdm-gemma2-9b-student) was trained with max_length = 2048"
    assert len(problems) == 2 and said in problems[0] and "'head_tail'" in problems[1]
    unset = {**values, "max_length": None, "truncation": None}
    assert staging.adapter_mismatches("my-infer", unset, models_dir) == []


def test_an_adapter_whose_training_config_is_unknown_is_refused(kaggle, make, tmp_path):
    proc = make("push", "KERNEL=04_inference", f"KAGGLE_USERNAME={OWNER}", f"MODELS_DIR={tmp_path / 'none'}")
    assert (
        proc.returncode != 0 and "make upload-model DIR=<training output> NAME=wsdm-qwen2-5-14b-student" in proc.stderr
    )
    assert kaggle.requests == []


@pytest.mark.parametrize("kernel_dir", sorted(p.parent for p in ROOT.glob("kernel-metadata/*/kernel-metadata.json")))
def test_every_kernel_carries_its_kaggle_profile_recipes(kernel_dir, tmp_path, models_dir):
    meta = kc.load_kernel_metadata(kernel_dir / kc.KERNEL_METADATA, OWNER)
    stem = Path(meta["code_file"]).stem
    nb = jupytext.writes(jupytext.read(ROOT / "notebooks" / f"{stem}.py"), fmt="ipynb")
    staged = staging.stage_notebook(json.loads(nb), stem, meta, models_dir)
    params = parameters(staged)
    for role, recipe in recipes.profile("kaggle")[stem].items():
        assert params[f"{role}_recipe"] == recipe
        assert params[f"{role}_overrides"] == (staging.resolve(recipe)[1] if recipe else {})
    # staging twice replaces the injected cells rather than adding second ones
    again = staging.stage_notebook(staged, stem, meta, models_dir)
    for tag in (staging.INJECTED_TAG, staging.BOOTSTRAP_TAG):
        assert sum(tag in c["metadata"].get("tags", []) for c in again["cells"]) == 1


def test_a_recipe_input_the_kernel_does_not_attach_is_named(models_dir):
    meta = kc.load_kernel_metadata(INFER_KERNEL / kc.KERNEL_METADATA, OWNER)
    meta["dataset_sources"] = [s for s in meta["dataset_sources"] if "qwen2-5-14b-student" not in s]
    nb = json.loads(jupytext.writes(jupytext.read(ROOT / "notebooks" / "04_inference.py"), fmt="ipynb"))
    with pytest.raises(staging.StagingError, match="needs the input 'wsdm-qwen2-5-14b-student'.*does not attach"):
        staging.stage_notebook(nb, "04_inference", meta, models_dir)
