"""`make rehearse` (benchmarks/rehearse.py): the chain of shell recipes holds together, a missing artifact stops it
naming the step, and the final check refuses a submission that is invalid, blended by default, or made by this
checkout's package instead of the packed dataset's. The whole rehearsal runs in .ci/run (`make rehearse`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import rehearse
from kaggle_utils.config import recipes
from kaggle_utils.config.sections import to_flat
from kaggle_utils.evaluation.calibration import CalibrateConfig
from kaggle_utils.prepare import PrepareConfig
from kaggle_utils.pseudo_label import PseudoLabelConfig
from kaggle_utils.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
LAID_OUT = {"data/competition/train.parquet", "data/competition/test.parquet"}


@pytest.mark.parametrize("shapes", ["tiny", "real"])
def test_every_step_consumes_what_an_earlier_step_produced(shapes):
    made = set(LAID_OUT)
    for step in rehearse.chain(shapes):
        assert set(step.consumes) <= made | {p.rsplit("/", 1)[0] for p in made if "/adapter/" in p}, step.name
        made |= set(step.produces) | {p.rsplit("/", 1)[0] for p in step.produces}


def _with_parents(paths: set[str]) -> set[str]:
    return {str(q) for p in paths for q in (Path(p), *Path(p).parents)}


# the fields through which a stage reads an earlier stage's output
INPUT_FIELDS = ("train_file", "extra_files", "teacher_files", "init_adapter", "input_file", "adapter_dir")
INPUT_FIELDS += ("oof_adapters", "primary_dir", "secondary_dir")


@pytest.mark.parametrize("shapes", ["tiny", "real"])
def test_the_recipes_read_only_what_an_earlier_step_wrote(shapes):
    """Each step's recipe, loaded with its flags as the stage loads it, names as inputs only files that the steps
    before it produce: a recipe renamed on one side breaks this test (and the rehearsal at that step)."""
    configs = {"train": TrainConfig, "pseudo_label": PseudoLabelConfig, "prepare": PrepareConfig}
    configs["calibrate"] = CalibrateConfig
    made = set(LAID_OUT)
    for step in rehearse.chain(shapes):
        cfg = recipes.load(step.recipe, configs[recipes.read(step.recipe).stage], step.flags)
        flat = to_flat(cfg)  # INPUT_FIELDS are flat names
        for name in INPUT_FIELDS:
            value = flat.get(name)
            for path in value if isinstance(value, list) else [value] if value else []:
                assert str(path) in _with_parents(made), f"{step.name}: {name} = {path}, which no earlier step writes"
        made |= set(step.produces)


@pytest.mark.parametrize("shapes", ["tiny", "real"])
def test_steps_take_recipes_as_written_with_size_flags_only(shapes):
    """No step overrides a path: the recipes' own file names must chain (only fold teachers name their fold)."""
    for step in rehearse.chain(shapes):
        recipes.read(step.recipe)  # exists
        moved = {k for k in step.flags if k.endswith(("_file", "_files", "_dir", "_adapter", "_path"))}
        assert moved <= {"out_dir"} and (not moved or step.flags.get("val_fold")), step.name


def test_a_missing_input_stops_the_step_naming_it(tmp_path):
    step = rehearse.Step(
        "Gemma student", "kaggle_utils.train", "student-gemma2-9b", consumes=("output/pseudo/x.parquet",)
    )
    with pytest.raises(rehearse.RehearsalError, match=r"Gemma student: needs \['output/pseudo/x.parquet'\]"):
        rehearse.run_step(step, tmp_path, {}, tmp_path / "log")


def test_a_step_that_leaves_no_output_is_an_error(tmp_path):
    step = rehearse.Step("nothing", "this_module_does_not_exist", produces=("out.json",))
    with pytest.raises(rehearse.RehearsalError, match="nothing: .* exited 1"):
        rehearse.run_step(step, tmp_path, {"PATH": ""}, tmp_path / "log")
    ok = rehearse.Step("silent", "platform", produces=("out.json",))
    with pytest.raises(rehearse.RehearsalError, match=r"silent: finished without writing \['out.json'\]"):
        rehearse.run_step(ok, tmp_path, {}, tmp_path / "log")


def _kaggle_run(tmp_path: Path, blend: dict, package: str, ids=(1, 2)) -> tuple[Path, Path]:
    kaggle = tmp_path / "kaggle"
    comp = kaggle / "input/competitions/wsdm-cup-multilingual-chatbot-arena"
    comp.mkdir(parents=True)
    (kaggle / "working").mkdir()
    pd.DataFrame({"id": [1, 2]}).to_parquet(comp / "test.parquet")
    pd.DataFrame({"id": list(ids), "winner": ["model_a", "model_b"]}).to_csv(
        kaggle / "working/submission.csv", index=False
    )
    (kaggle / "working/report.json").write_text(json.dumps({"blend": blend}))
    executed = kaggle / "working/run.ipynb"
    said = [f"kaggle_utils: unpacked {kaggle}/input/datasets/x/package.zip\n", f"kaggle_utils: {package}\n"]
    out = {"name": "stdout", "output_type": "stream", "text": said}
    executed.write_text(json.dumps({"cells": [{"cell_type": "code", "outputs": [out]}]}))
    return kaggle, executed


def test_the_final_check_passes_a_valid_fitted_run_from_the_packed_package(tmp_path):
    fitted = {"weight": 0.4, "reason": "fitted on 225 rows", "fingerprint": "ok"}
    kaggle, executed = _kaggle_run(tmp_path, fitted, str(tmp_path / "kaggle/tmp/kaggle_utils_package/kaggle_utils"))
    assert rehearse.check_submission(tmp_path, kaggle, executed)["blend"] == fitted


@pytest.mark.parametrize("fault", ["default blend", "this checkout", "wrong ids"])
def test_the_final_check_refuses(tmp_path, fault):
    blend = {"weight": 0.5, "reason": "no blend.json beside the secondary adapter: secondary_weight=0.5"}
    blend = blend if fault == "default blend" else {"weight": 0.4, "reason": "fitted"}
    package = str(Path(sys.modules["kaggle_utils"].__file__).parent) if fault == "this checkout" else "kaggle/tmp/x"
    package = package if fault == "this checkout" else str(tmp_path / package)
    kaggle, executed = _kaggle_run(tmp_path, blend, package, ids=(1, 3) if fault == "wrong ids" else (1, 2))
    expected = {
        "default blend": "blend was not fitted",
        "this checkout": "did not import the packed",
        "wrong ids": "ids",
    }
    with pytest.raises(rehearse.RehearsalError, match=expected[fault]):
        rehearse.check_submission(tmp_path, kaggle, executed)


@pytest.mark.slow
def test_at_real_shapes_the_kernel_starts_as_a_t4_without_the_checkout(tmp_path):
    """The T4 of ``--shapes real`` is made by an IPython start-up file alone: the papermill kernel must run it (sm_75,
    so fp16) and must not see this checkout through ``PYTHONPATH``."""
    import nbformat

    code = "import os, torch\nprint('capability', torch.cuda.get_device_capability(), os.environ.get('PYTHONPATH'))"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    notebook.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    source, executed = tmp_path / "nb.ipynb", tmp_path / "nb.executed.ipynb"
    nbformat.write(notebook, source)
    env = rehearse.kernel_env({**os.environ, "PYTHONPATH": str(REPO)}, tmp_path / "kaggle", "real")
    subprocess.run(rehearse.papermill_argv(source, executed, tmp_path), env=env, check=True, capture_output=True)
    assert "capability (7, 5) None" in rehearse._printed(executed)
