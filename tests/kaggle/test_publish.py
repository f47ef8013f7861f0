"""Kaggle publishing: metadata rules, `make push` / `make dataset` through the real kaggle CLI, the notebooks'
offline bootstrap, the wheels command, and the rendered docs being current.

The CLI talks to ``kaggle/loopback.py`` on 127.0.0.1 (docs/facts.md §5: ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` plus
``HTTP_PROXY``); credentials are fake and live in a temporary HOME.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jupytext
import pytest

from kaggle_utils.config import recipes
from kaggle_utils.kaggle import publish as kc
from kaggle_utils.kaggle import staging
from kaggle_utils.kaggle.env import ROOT_VARIABLE

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.py"))
KAGGLE_NOTEBOOKS = [p for p in NOTEBOOKS if p.stem in recipes.profile("kaggle")]
KERNEL_DIRS = kc.kernel_dirs(ROOT)
# the kernel the single-kernel tests use (not the last of KERNEL_DIRS: that is whichever notebook came last)
INFER_KERNEL = ROOT / "kernel-metadata" / "wsdm-arena-04-inference"
# the kernels that ask for T4 x2; 01 prepares data on the CPU and asks for no GPU (Kaggle's GPU hours are a quota)
GPU_KERNELS = {"wsdm-arena-02-pseudo-label", "wsdm-arena-03-train", "wsdm-arena-04-inference"}
OWNER = "testuser"
# a fake key: it must never show up in anything the tools print
FAKE_KEY = "not-a-real-key"


def _load_render():
    spec = importlib.util.spec_from_file_location("render", ROOT / "docs/render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _meta(kernel_dir: Path) -> dict:
    return kc.load_kernel_metadata(kernel_dir / kc.KERNEL_METADATA, OWNER)


# ---------------------------------------------------------------------------------------------------- metadata


def test_one_kernel_per_kaggle_notebook():
    """Every notebook with a Kaggle profile table has a kernel, and only those (05 is demo and shell only)."""
    stems = sorted(Path(_meta(d)["code_file"]).stem for d in KERNEL_DIRS)
    assert stems == [p.stem for p in KAGGLE_NOTEBOOKS]
    assert [p.stem for p in NOTEBOOKS if p not in KAGGLE_NOTEBOOKS] == ["05_side_experiments"]


@pytest.mark.parametrize("kernel_dir", KERNEL_DIRS, ids=lambda p: p.name)
def test_kernel_metadata_is_valid_and_points_at_a_notebook(kernel_dir, built_notebooks, tmp_path, models_dir):
    meta = _meta(kernel_dir)  # raises MetadataError listing every broken rule
    assert (ROOT / "notebooks" / Path(meta["code_file"]).with_suffix(".py").name).is_file()
    assert meta["id"] == f"{OWNER}/{kernel_dir.name}" and kc.slugify(meta["title"]) == kernel_dir.name
    raw = (kernel_dir / kc.KERNEL_METADATA).read_text()
    assert OWNER not in raw and kc.OWNER in raw, "the owner is filled in at staging, never committed"
    # competition rules: offline, its data; T4 x2 where the notebook needs a GPU, no GPU asked for otherwise
    assert meta["enable_internet"] is False
    if kernel_dir.name in GPU_KERNELS:
        assert meta["enable_gpu"] is True and meta["machine_shape"] == "NvidiaTeslaT4"
    else:
        assert meta["enable_gpu"] is False and "machine_shape" not in meta
    assert meta["competition_sources"] == [kc.COMPETITION] and meta["kernel_type"] == "notebook"
    # every kernel reads the package and the wheels; the others it reads are models uploaded by make upload-model
    utils = kc.fill_owner(json.loads((ROOT / kc.DATASET_METADATA).read_text())["id"], OWNER)
    assert meta["dataset_sources"][:2] == [utils, kc.fill_owner(kc.WHEELS_DATASET["id"], OWNER)]
    kernel_ids = {_meta(d)["id"] for d in KERNEL_DIRS}
    assert set(meta["kernel_sources"]) <= kernel_ids - {meta["id"]}
    # staged: the built notebook next to its metadata, and the stage passes the same rules
    staged = kc.stage_kernel(kernel_dir, built_notebooks, OWNER, tmp_path, models_dir)
    assert sorted(p.name for p in staged.iterdir()) == sorted([kc.KERNEL_METADATA, meta["code_file"]])
    assert kc.kernel_problems(json.loads((staged / kc.KERNEL_METADATA).read_text()), staged) == []


BAD_EDITS = [
    ({"title": "WSDM"}, "at least 5 characters"),
    ({"title": "Another Title Entirely"}, "does not match the title"),
    ({"id": "{owner}/wsdm"}, "slug must be at least 5"),
    ({"id": "{owner}/wsdm-arena-04-inference/3"}, "no version"),
    ({"enable_internet": True}, "enable_internet must be false"),
    ({"enable_internet": None}, "enable_internet must be false"),
    ({"kernel_type": "notebok"}, "kernel_type"),
    ({"language": "Python"}, "language"),
    ({"is_private": "yes"}, "is_private must be true or false"),
    ({"model_sources": ["google/gemma-2/transformers/gemma-2-9b-it"]}, "model_sources"),
    ({"model_sources": ["google/gemma-2/transformers/gemma-2-9b-it/latest"]}, "version number"),
    ({"dataset_sources": ["kaggle-utils"]}, "dataset_sources"),
    ({"competition_sources": []}, "competition_sources must include"),
    ({"machine_shape": "NvidiaTeslaP100"}, "T4 x2"),
    ({"enable_gpu": False}, 'without "enable_gpu": true'),
    ({"code_file": ""}, "code_file is missing"),
]


@pytest.mark.parametrize("edit,message", BAD_EDITS, ids=[m for _, m in BAD_EDITS])
def test_validation_names_the_broken_rule(edit, message, tmp_path):
    good = json.loads((INFER_KERNEL / kc.KERNEL_METADATA).read_text())
    bad = {k: v for k, v in {**good, **edit}.items() if v is not None}
    (tmp_path / kc.KERNEL_METADATA).write_text(json.dumps(bad))
    with pytest.raises(kc.MetadataError, match=re.escape(message)) as err:
        kc.load_kernel_metadata(tmp_path / kc.KERNEL_METADATA, OWNER)
    assert str(tmp_path / kc.KERNEL_METADATA) in str(err.value)


def test_staging_refuses_a_notebook_without_kernelspec_or_with_outputs(built_notebooks, tmp_path):
    nb = json.loads((built_notebooks / "04_inference.ipynb").read_text())
    broken = tmp_path / "nb"
    broken.mkdir()
    no_spec = copy.deepcopy(nb)
    del no_spec["metadata"]["kernelspec"]
    (broken / "04_inference.ipynb").write_text(json.dumps(no_spec))
    with pytest.raises(kc.MetadataError, match="kernelspec"):
        kc.stage_kernel(INFER_KERNEL, broken, OWNER, tmp_path / "stage")
    with_outputs = copy.deepcopy(nb)
    next(c for c in with_outputs["cells"] if c["cell_type"] == "code")["execution_count"] = 3
    (broken / "04_inference.ipynb").write_text(json.dumps(with_outputs))
    with pytest.raises(kc.MetadataError, match="outputs"):
        kc.stage_kernel(INFER_KERNEL, broken, OWNER, tmp_path / "stage")
    with pytest.raises(kc.MetadataError, match="make notebooks"):
        kc.stage_kernel(INFER_KERNEL, tmp_path / "missing", OWNER, tmp_path / "stage")


def test_dataset_metadata_is_valid_and_staging_holds_only_the_package(tmp_path):
    meta = kc.fill_owner(json.loads((ROOT / kc.DATASET_METADATA).read_text()), OWNER)
    assert kc.dataset_problems(meta) == [] and kc.dataset_problems(kc.fill_owner(kc.WHEELS_DATASET, OWNER)) == []
    assert kc.dataset_problems({"id": "a/short", "title": "x", "licenses": []}) == [
        "id 'a/short': the dataset slug must be 6 to 50 characters",
        "title 'x' must be 6 to 50 characters",
        "licenses must hold exactly one license, e.g. [{'name': 'other'}]",
    ]
    staged = kc.stage_dataset(ROOT / "kaggle_utils", ROOT / kc.DATASET_METADATA, OWNER, tmp_path / "ds")
    assert sorted(p.relative_to(staged).as_posix() for p in staged.glob("*/*")) == ["package/kaggle_utils"]
    assert sorted(p.name for p in staged.iterdir()) == ["dataset-metadata.json", "package"]
    files = sorted(p.relative_to(staged / "package").as_posix() for p in (staged / "package").rglob("*") if p.is_file())
    source = [p for p in (ROOT / "kaggle_utils").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files == sorted(p.relative_to(ROOT).as_posix() for p in source)
    assert "kaggle_utils/kaggle/publish.py" in files and not any(f.endswith(".pyc") for f in files)


# ------------------------------------------------------------------------------- end to end, real kaggle CLI


def test_make_push_sends_every_kernel_as_defined(kaggle, models_dir, make):
    proc = make("push", f"KAGGLE_USERNAME={OWNER}", f"MODELS_DIR={models_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saves = {r.body["slug"]: r.body for r in kaggle.calls("SaveKernel")}
    assert sorted(saves) == sorted(f"{OWNER}/{d.name}" for d in KERNEL_DIRS)
    for kernel_dir in KERNEL_DIRS:
        meta, body = _meta(kernel_dir), saves[f"{OWNER}/{kernel_dir.name}"]
        assert body["newTitle"] == meta["title"] and body["kernelType"] == "notebook" and body["language"] == "python"
        assert body["enableInternet"] is False and body["isPrivate"] is True
        # a false / missing field may be left out of the request body
        assert body.get("enableGpu", False) is (kernel_dir.name in GPU_KERNELS)
        assert body.get("machineShape") == meta.get("machine_shape")
        assert body["competitionDataSources"] == [kc.COMPETITION]
        assert body["datasetDataSources"] == meta["dataset_sources"]
        assert body.get("kernelDataSources", []) == meta["kernel_sources"]
        assert body.get("modelDataSources", []) == meta["model_sources"]
        nb = json.loads(body["text"])
        assert nb["metadata"]["kernelspec"]["name"] == "python3"
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
        assert nb["cells"][0]["source"].startswith("# " + Path(meta["code_file"]).stem[:2])
    assert saves[f"{OWNER}/wsdm-arena-04-inference"]["enableInternet"] is False
    assert "pushed testuser/wsdm-arena-04-inference version 7" in proc.stdout
    assert FAKE_KEY not in proc.stdout + proc.stderr


def test_a_push_error_in_the_response_fails_make_push(kaggle, models_dir, make):
    kaggle.replies["SaveKernel"] = {"error": "Notebook exceeds the session limit"}
    proc = make("push", "KERNEL=04_inference", f"KAGGLE_USERNAME={OWNER}", f"MODELS_DIR={models_dir}")
    assert proc.returncode != 0
    assert "Kernel push error: Notebook exceeds the session limit" in proc.stderr
    assert [r.body["slug"] for r in kaggle.calls("SaveKernel")] == [f"{OWNER}/wsdm-arena-04-inference"]


def test_sources_the_server_calls_invalid_fail_make_push_naming_each(kaggle, models_dir, make):
    """kaggle 2.2.5 prints them and exits 0; the kernel would then run without its model or data."""
    saved = {"ref": "/code/o/s", "url": "http://localhost/code/o/s", "versionNumber": 8}
    bad = {"invalidDatasetSources": [f"{OWNER}/wsdm-gemma2-9b-student"], "invalidCompetitionSources": ["wsdm-cup"]}
    kaggle.replies["SaveKernel"] = {**saved, **bad}
    proc = make("push", "KERNEL=04_inference", f"KAGGLE_USERNAME={OWNER}", f"MODELS_DIR={models_dir}")
    assert proc.returncode != 0
    assert f"not valid dataset sources and could not be added to the kernel: ['{OWNER}/wsdm-gemma2-9b-student']" in (
        proc.stderr
    )
    assert "not valid competition sources and could not be added to the kernel: ['wsdm-cup']" in proc.stderr


def test_push_stops_before_any_upload_when_one_kernel_is_invalid(kaggle, tmp_path, built_notebooks):
    root = tmp_path / "repo"
    for d in KERNEL_DIRS:
        (root / "kernel-metadata" / d.name).mkdir(parents=True)
        meta = json.loads((d / kc.KERNEL_METADATA).read_text())
        if d.name.endswith("inference"):
            meta["enable_internet"] = True
        (root / "kernel-metadata" / d.name / kc.KERNEL_METADATA).write_text(json.dumps(meta))
    with pytest.raises(kc.MetadataError, match="enable_internet"):
        kc.push_kernels(OWNER, None, built_notebooks, tmp_path / "stage", root=root)
    assert kaggle.requests == []


def test_make_dataset_creates_then_versions_the_package_dataset(kaggle, make):
    proc = make("dataset", f"KAGGLE_USERNAME={OWNER}", "MESSAGE=first")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the dataset did not exist (status 404): created, private, with one uploaded archive of the package
    (create,) = kaggle.calls("CreateDataset")
    assert create.body["ownerSlug"] == OWNER and create.body["slug"] == "wsdm-arena-kaggle-utils"
    assert create.body["isPrivate"] is True and create.body["files"] == [{"token": "blob-token-1"}]
    (start,) = kaggle.calls("StartBlobUpload")
    assert start.body["name"] == "package.zip"
    (upload,) = [r for r in kaggle.requests if r.verb == "PUT"]
    names = [n for n in zipfile.ZipFile(io.BytesIO(upload.data)).namelist() if not n.endswith("/")]
    # the package and nothing else, under its own name whichever way Kaggle extracts the archive
    assert "kaggle_utils/__init__.py" in names and "kaggle_utils/kaggle/publish.py" in names
    assert all(n.startswith("kaggle_utils/") and "__pycache__" not in n for n in names), names

    kaggle.requests.clear()
    kaggle.replies["GetDatasetStatus"] = {"status": "READY"}
    proc = make("dataset", f"KAGGLE_USERNAME={OWNER}", "MESSAGE=second")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (version,) = kaggle.calls("CreateDatasetVersion")
    assert version.body["ownerSlug"] == OWNER and version.body["datasetSlug"] == "wsdm-arena-kaggle-utils"
    assert version.body["body"]["versionNotes"] == "second" and kaggle.calls("CreateDataset") == []


def test_a_dataset_error_fails_and_nothing_is_created_on_a_status_error(kaggle, capsys):
    kaggle.replies["GetDatasetStatus"] = {"status": "READY"}
    kaggle.replies["CreateDatasetVersion"] = {"status": "error", "error": "Dataset is locked"}
    assert kc.main(["dataset", "-m", "x"]) == 1
    assert "Dataset version creation error: Dataset is locked" in capsys.readouterr().err
    # a status call failing for another reason than "not found" must not create a second dataset
    kaggle.requests.clear()
    kaggle.replies["GetDatasetStatus"] = 500
    assert kc.main(["dataset", "-m", "x"]) == 1
    assert [r.method for r in kaggle.requests] == ["GetDatasetStatus"]


def test_submit_and_status_name_the_kernel_and_version(kaggle, capsys):
    assert kc.main(["submit", "--version", "7"]) == 0
    (submit,) = kaggle.calls("CreateCodeSubmission")
    assert submit.body["competitionName"] == kc.COMPETITION and submit.body["kernelSlug"] == "wsdm-arena-04-inference"
    assert submit.body["kernelVersion"] == 7 and submit.body["fileName"] == "submission.csv"
    assert kc.main(["submit"]) == 1 and "make submit VERSION=N" in capsys.readouterr().err
    assert kc.main(["status"]) == 0
    assert [r.body["kernelSlug"] for r in kaggle.calls("GetKernelSessionStatus")] == [d.name for d in KERNEL_DIRS]


# --------------------------------------------------------------------------------------------------- credentials


def test_missing_credentials_give_one_clear_message_and_no_request(kaggle, monkeypatch, capsys, make):
    monkeypatch.delenv("KAGGLE_KEY")
    assert kc.main(["push", "--kernel", "04_inference"]) == 1
    err = capsys.readouterr().err
    assert "no Kaggle credentials found" in err and "KAGGLE_USERNAME and KAGGLE_KEY" in err and "kaggle.json" in err
    assert kaggle.requests == []
    proc = make("push", "KERNEL=04_inference")
    assert proc.returncode != 0 and "no Kaggle credentials found" in proc.stderr


def test_credentials_are_found_without_reading_them_out(creds, monkeypatch):
    env = {"HOME": str(creds)}
    with pytest.raises(kc.CredentialsError, match="no Kaggle credentials"):
        kc.credential_source(env)
    assert kc.credential_source({**env, "KAGGLE_API_TOKEN": FAKE_KEY}) == "environment (KAGGLE_API_TOKEN)"
    (creds / ".kaggle").mkdir()
    (creds / ".kaggle/kaggle.json").write_text(json.dumps({"username": "fromfile", "key": FAKE_KEY}))
    assert kc.credential_source(env) == str(creds / ".kaggle/kaggle.json")
    assert kc.resolve_owner("", env) == "fromfile" and kc.resolve_owner("given", env) == "given"
    with pytest.raises(kc.CredentialsError, match="not a valid account name"):
        kc.resolve_owner("../etc", env)


# ---------------------------------------------------------------------------------- the notebooks' bootstrap


def _tiny_wheel(folder: Path) -> Path:
    """A real, minimal pure-Python wheel (``tinydep 0.1``) with a correct RECORD."""
    files = {
        "tinydep/__init__.py": b"VALUE = 42\n",
        "tinydep-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinydep\nVersion: 0.1\n",
        "tinydep-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(data)}\n"
    files["tinydep-0.1.dist-info/RECORD"] = (record + "tinydep-0.1.dist-info/RECORD,,\n").encode()
    wheel = folder / "tinydep-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def test_the_bootstrap_has_one_source_which_staging_adds_to_every_kaggle_notebook(models_dir):
    """kaggle/bootstrap.py, right after the injected parameters; no notebook source carries a copy of its own."""
    cell = staging.bootstrap_source()
    assert cell.startswith("# On Kaggle the package comes") and kc.WHEELS_PINS in cell
    for meta_file in sorted(ROOT.glob("kernel-metadata/*/" + kc.KERNEL_METADATA)):
        meta = kc.load_kernel_metadata(meta_file, OWNER)
        path = ROOT / "notebooks" / Path(meta["code_file"]).with_suffix(".py").name
        assert "kaggle_input" not in path.read_text(), f"{path} holds its own bootstrap code"
        built = json.loads(jupytext.writes(jupytext.read(path), fmt="ipynb"))
        nb = staging.stage_notebook(built, path.stem, meta, models_dir)
        tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
        at = tags.index([staging.INJECTED_TAG])
        assert tags[at + 1] == [staging.BOOTSTRAP_TAG] and tags.count([staging.BOOTSTRAP_TAG]) == 1
        assert nb["cells"][at + 1]["source"] == cell


def _run_bootstrap(root: Path, tmp_path: Path, then: str = "") -> subprocess.CompletedProcess:
    """The bootstrap cell with ``root`` as /kaggle/input (``root``'s parent standing in for /kaggle, as a rehearsal
    names it), in a Python that cannot see the installed package."""
    assert root.name == "input"
    probe = staging.bootstrap_source() + "\n" + then
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)  # before start-up, or Python caches "no such folder" for it
    # -S: no site-packages, so the installed kaggle_utils is out of sight and only the dataset copy can be found;
    # pip (a child with its normal site) installs into PIP_TARGET instead of the venv; TMPDIR: where a zip unpacks
    env = {**os.environ, "PIP_TARGET": str(site), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": str(site)}
    env[ROOT_VARIABLE] = str(root.parent)
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-S", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("layout", ["mounted", "symlinked", "packed"])
def test_bootstrap_imports_the_package_and_installs_wheels_from_a_simulated_kaggle_input(tmp_path, creds, layout):
    """/kaggle/input as Kaggle mounts it: the package dataset (extracted, behind a symlinked mount as the 2026
    layout's datasets/<owner>/<slug> can be, or left as a zip) and the wheels dataset."""
    root = tmp_path / "input"
    real = tmp_path / "elsewhere" if layout == "symlinked" else root / "datasets" / OWNER
    staged = kc.stage_dataset(
        ROOT / "kaggle_utils", ROOT / kc.DATASET_METADATA, OWNER, real / "wsdm-arena-kaggle-utils"
    )
    (staged / kc.DATASET_METADATA).unlink()
    if layout == "symlinked":
        (root / "datasets").mkdir(parents=True)
        (root / "datasets" / OWNER).symlink_to(real, target_is_directory=True)
    if layout == "packed":
        shutil.make_archive(str(staged / "package"), "zip", staged / "package")
        shutil.rmtree(staged / "package")
    wheels = root / "wsdm-arena-wheels"
    wheels.mkdir(parents=True)
    _tiny_wheel(wheels)
    (wheels / kc.WHEELS_PINS).write_text("tinydep==0.1\n")
    then = "import kaggle_utils, kaggle_utils.kaggle.env, tinydep\nprint(kaggle_utils.__file__, tinydep.VALUE)"
    proc = _run_bootstrap(root, tmp_path, then)
    assert proc.returncode == 0, proc.stderr
    said, (package_file, value) = proc.stdout.splitlines()[:-1], proc.stdout.splitlines()[-1].split()
    where = {"mounted": staged, "symlinked": root / "datasets" / OWNER / staged.name, "packed": tmp_path / "tmp"}
    assert Path(package_file).is_relative_to(where[layout]) and package_file.endswith("kaggle_utils/__init__.py")
    assert value == "42" and (tmp_path / "site" / "tinydep/__init__.py").is_file()
    # it says what it found and installed
    assert any(line.startswith("kaggle_utils: ") for line in said) and any(line.startswith("wheels: ") for line in said)


@pytest.mark.parametrize("missing", ["package", "wheels"])
def test_bootstrap_stops_naming_the_dataset_to_attach(tmp_path, missing):
    root = tmp_path / "input"
    if missing == "wheels":
        kc.stage_dataset(ROOT / "kaggle_utils", ROOT / kc.DATASET_METADATA, OWNER, root / "wsdm-arena-kaggle-utils")
    else:
        root.mkdir()
    proc = _run_bootstrap(root, tmp_path)
    assert proc.returncode != 0
    expected = {"package": "attach the package dataset", "wheels": "attach the wheels dataset"}[missing]
    assert "FileNotFoundError" in proc.stderr and expected in proc.stderr


@pytest.mark.parametrize("built_for", ["this", "another"])
def test_bootstrap_checks_the_python_the_wheels_were_built_for(tmp_path, built_for):
    root = tmp_path / "input"
    kc.stage_dataset(ROOT / "kaggle_utils", ROOT / kc.DATASET_METADATA, OWNER, root / "wsdm-arena-kaggle-utils")
    wheels = root / "wsdm-arena-wheels"
    wheels.mkdir()
    _tiny_wheel(wheels)
    (wheels / kc.WHEELS_PINS).write_text("tinydep==0.1\n")
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = running if built_for == "this" else "3.9"
    (wheels / kc.WHEELS_TARGET).write_text(json.dumps({"python": python, "glibc": "2.35"}))
    proc = _run_bootstrap(root, tmp_path)
    if built_for == "this":
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0
        assert f"are for Python 3.9, this image runs {running}: `make wheels KAGGLE_PYTHON={running}`" in proc.stderr


def test_the_wheels_check_resolves_the_pins_offline_for_the_target_python(tmp_path):
    """pip's dry run from the folder alone, for the target's Python (here this one): a missing wheel is named."""
    dest = tmp_path / "wheels"
    dest.mkdir()
    _tiny_wheel(dest)
    target = kc.WheelsTarget(f"{sys.version_info.major}.{sys.version_info.minor}")
    (dest / kc.WHEELS_PINS).write_text("tinydep==0.1\n")
    kc.check_resolution(dest, target)
    (dest / kc.WHEELS_PINS).write_text("tinydep==0.1\nnot-shipped-dep==1.0\n")
    with pytest.raises(kc.MetadataError, match=r"do not install offline on Python .*not-shipped-dep"):
        kc.check_resolution(dest, target)
    assert kc.WheelsTarget().python_version == "3.12", "Kaggle's image runs Python 3.12"
    assert "KAGGLE_PYTHON ?= 3.12" in (ROOT / "Makefile").read_text()


def test_bootstrap_is_a_no_op_off_kaggle(tmp_path):
    probe = staging.bootstrap_source() + "\nprint(len(sys.path))"
    before = subprocess.run(
        [sys.executable, "-c", "import sys; print(len(sys.path))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    after = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert after.stdout == before and after.stderr == ""


# ------------------------------------------------------------------------------------------------------ wheels


def test_wheels_command_targets_kaggles_platform_with_the_package_pins(tmp_path, capsys):
    pins = kc.wheel_requirements()
    assert "peft==0.21.2" in pins and "bitsandbytes==0.50.2" in pins and "transformers==5.24.0" in pins
    assert not any(p.startswith("torch") for p in pins), "Kaggle's image brings its own CUDA torch"
    # the package's own dependencies by name: installed only where Kaggle's image lacks them
    assert "numpy" in pins and "pandas" in pins and not any(p.startswith(("numpy=", "pandas=")) for p in pins)
    cmd = kc.wheels_command(["peft==0.21.2"], tmp_path, kc.WheelsTarget("3.11", "2.35"))
    line = " ".join(cmd)
    assert " -m pip download --dest " in line and "--no-deps --only-binary=:all:" in line
    assert "--python-version 3.11 --implementation cp --abi cp311" in line
    # bitsandbytes ships manylinux_2_24 wheels: pip must be told every tag up to Kaggle's glibc
    assert "--platform manylinux_2_35_x86_64" in line and "--platform manylinux_2_24_x86_64" in line
    assert line.endswith("--platform manylinux2014_x86_64 peft==0.21.2")
    assert kc.main(["wheels", "--dry-run", "--dest", str(tmp_path / "w"), "--python-version", "3.10"]) == 0
    assert (tmp_path / "w" / kc.WHEELS_PINS).read_text().split() == pins
    assert json.loads((tmp_path / "w" / kc.DATASET_METADATA).read_text())["id"] == kc.WHEELS_DATASET["id"]
    printed = capsys.readouterr().out
    assert "--abi cp310" in printed and "bitsandbytes==0.50.2" in printed and " torch==" not in printed
    # the pins file is what the notebooks' bootstrap searches for
    assert kc.WHEELS_PINS in staging.bootstrap_source()


@pytest.mark.slow  # a subprocess
def test_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "kaggle_utils.kaggle.publish", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    for command in ("validate", "push", "dataset", "wheels", "submit", "status", "output"):
        assert command in out


# -------------------------------------------------------------------------------------------- rendered docs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_rendered_notebook_is_current(path):
    render = _load_render()
    page = ROOT / "docs/notebooks" / f"{path.stem}.md"
    assert page.is_file(), f"{page} missing: run `make render`"
    assert render.stamp_of(page) == render.inputs_hash(ROOT), (
        f"{page} was rendered from older sources (notebooks/ or kaggle_utils/ changed since): run `make render`"
    )
    text = page.read_text()
    assert text.startswith("<!-- generated by `make render`")
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (page.parent / image).is_file(), image
    leaked = re.findall(r"(?<![\w.])/(?:work|home|root|tmp)/\S*", text)
    assert leaked == [], f"machine paths leaked into {page}: {leaked[:3]}"
    assert page.stat().st_size < 100_000


def test_render_marks_pages_generated_keeps_images_and_drops_stderr(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    render = _load_render()
    png = base64.b64decode(  # a 1x1 PNG
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    cell = new_code_cell(
        "train()",
        outputs=[
            new_output("stream", name="stdout", text="step 1\rstep 2\rstep 3 done\n"),
            new_output("stream", name="stderr", text="/machine/path/warnings.py: FutureWarning\n"),
            new_output("display_data", data={"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"}),
        ],
    )
    demo = tmp_path / "demo"
    demo.mkdir()
    nbformat.write(new_notebook(cells=[new_markdown_cell("# 09 · Title"), cell]), demo / "09_x.ipynb")
    (page,) = render.render(demo, tmp_path / "docs", "abc123")
    text = page.read_text()
    assert text.startswith("<!-- generated by `make render`") and render.stamp_of(page) == "abc123"
    assert "step 3 done" in text and "step 1" not in text and "FutureWarning" not in text
    (image,) = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert (page.parent / image).read_bytes() == png
    assert render.stamp_of(tmp_path / "docs/README.md") == "abc123"


def test_inputs_hash_follows_notebook_and_package_sources(tmp_path):
    render = _load_render()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "kaggle_utils/sub").mkdir(parents=True)
    (tmp_path / "notebooks/01_a.py").write_text("# %%\n")
    (tmp_path / "kaggle_utils/sub/m.py").write_text("x = 1\n")
    first = render.inputs_hash(tmp_path)
    (tmp_path / "README.md").write_text("not an input\n")
    assert render.inputs_hash(tmp_path) == first
    (tmp_path / "kaggle_utils/sub/m.py").write_text("x = 2\n")
    second = render.inputs_hash(tmp_path)
    (tmp_path / "notebooks/01_a.py").write_text("# %%\n1\n")
    assert len({first, second, render.inputs_hash(tmp_path)}) == 3
