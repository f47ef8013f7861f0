"""Publish to Kaggle: validate kernel and dataset metadata, stage folders, and drive the ``kaggle`` CLI.

Committed metadata never names an account: ids and sources are written ``{owner}/slug`` and the owner is
filled in at staging time (``--owner``, else ``KAGGLE_USERNAME``, else ``kaggle.json``). Staged folders are
what the CLI uploads, so they hold exactly one thing each:

* a kernel: ``build/kaggle/kernels/<slug>/`` = ``kernel-metadata.json`` + the ``.ipynb`` built by
  ``make notebooks`` from ``notebooks/<code_file stem>.py``;
* the package dataset: ``build/kaggle/dataset/`` = ``dataset-metadata.json`` + ``package/kaggle_utils/``
  (uploaded with ``--dir-mode zip`` as ``package.zip``, whose entries start with ``kaggle_utils/``: however Kaggle
  extracts it, the notebooks find ``kaggle_utils/__init__.py`` by searching ``/kaggle/input``);
* the wheels dataset: ``build/wheels/`` = the wheels (the requirements below and all they depend on, minus
  torch) + ``kaggle_utils-wheels.txt`` (what the notebooks install, offline) + its ``dataset-metadata.json``.

``push`` goes in the order the kernels' ``kernel_sources`` give, waiting for the run of a kernel that a later one
attaches (:mod:`kaggle_utils.kaggle.push_order`). The CLI prints push errors and still exits 0 (docs/facts.md §5), so
its output is read: any known error line fails the command here. Credentials are checked before any call and never
printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from kaggle_utils.kaggle import push_order, staging

COMPETITION = "wsdm-cup-multilingual-chatbot-arena"
OWNER = "{owner}"
ROOT = Path(__file__).resolve().parents[2]
KERNEL_METADATA = "kernel-metadata.json"
# where `make upload-model` stages each adapter dataset; staging reads their train_config.json
MODELS_DIR = ROOT / "build/kaggle/models"
DATASET_METADATA = "dataset-metadata.json"
# the pins file the notebooks' bootstrap cell searches for under /kaggle/input
WHEELS_PINS = "kaggle_utils-wheels.txt"
# beside it: the Python and glibc the wheels were downloaded for (the bootstrap stops on another Python)
WHEELS_TARGET = "kaggle_utils-wheels-target.json"
WHEELS_DATASET = {
    "id": f"{OWNER}/wsdm-arena-wheels",
    "title": "WSDM Arena offline wheels",
    "subtitle": "Pinned wheels the kaggle_utils notebooks install offline",
    "licenses": [{"name": "other"}],
}
# The licence names the kaggle CLI documents for dataset-metadata.json (Kaggle/kaggle-api docs/datasets_metadata.md,
# "Licenses"); kaggle 2.2.5 sends the name unchecked. MIT is not among them: an MIT-licensed upload says "other"
# ("Other (specified in description)") and names MIT in its description.
DATASET_LICENSES = tuple(
    """CC0-1.0 CC-BY-SA-3.0 CC-BY-SA-4.0 CC-BY-NC-SA-4.0 GPL-2.0 ODbL-1.0 DbCL-1.0 copyright-authors other unknown
    CC-BY-4.0 CC-BY-NC-4.0 PDDL CC-BY-3.0 CC-BY-3.0-IGO US-Government-Works CC-BY-NC-SA-3.0-IGO CDLA-Permissive-1.0
    CDLA-Sharing-1.0 CC-BY-ND-4.0 CC-BY-NC-ND-4.0 ODC-BY-1.0 LGPL-3.0 AGPL-3.0 FDL-1.3 EU-ODP-Legal-Notice apache-2.0
    GPL-3.0""".split()
)
# The CLI's own rules (kaggle 2.2.5, kaggle_api_extended.py kernels_push / dataset_create_new).
KERNEL_TYPES = ("script", "notebook")
LANGUAGES = ("python", "r", "rmarkdown")
PINNING_TYPES = ("original", "latest")
BOOLEAN_FIELDS = ("is_private", "enable_gpu", "enable_tpu", "enable_internet")
# Lines the CLI prints for a failed call while exiting 0. "The following are not valid ... sources": the kernel was
# saved without those inputs (competition rules or a model's terms not accepted by the account, a dataset still
# processing) and would fail on Kaggle; invalid model sources the CLI does not print at all (docs/kaggle.md).
CLI_ERRORS = (
    "Kernel push error",
    "Dataset version creation error",
    "Dataset creation error",
    "The following are not valid",
)
# Not shipped as wheels: Kaggle's image has its own CUDA build of torch (and what comes with it).
NOT_SHIPPED = re.compile(r"^(torch|triton|nvidia-.*|setuptools|pip)$")


class MetadataError(ValueError):
    """A metadata file breaks a rule the kaggle CLI or this competition enforces."""


class CredentialsError(RuntimeError):
    """No Kaggle credentials where the CLI looks for them."""


class KaggleCommandError(RuntimeError):
    """The kaggle CLI failed, or printed an error while exiting 0."""


# ---------------------------------------------------------------------------------------------- credentials

CREDENTIALS_HELP = """no Kaggle credentials found. Provide one of (values are never printed):
  * environment: KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN)
  * file: {config_dir}/kaggle.json with {{"username": ..., "key": ...}} (chmod 600),
    or {config_dir}/access_token
Create a token at https://www.kaggle.com/settings/api ("Create New Token"). Never commit it."""


def _config_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("KAGGLE_CONFIG_DIR") or Path(environ.get("HOME") or Path.home()) / ".kaggle")


def credential_source(environ: Mapping[str, str] | None = None) -> str:
    """Where the CLI will take credentials from (a description, never a value); raises CredentialsError."""
    environ = os.environ if environ is None else environ
    if environ.get("KAGGLE_API_TOKEN"):
        return "environment (KAGGLE_API_TOKEN)"
    if environ.get("KAGGLE_USERNAME") and environ.get("KAGGLE_KEY"):
        return "environment (KAGGLE_USERNAME, KAGGLE_KEY)"
    config_dir = _config_dir(environ)
    for name in ("kaggle.json", "access_token"):
        if (config_dir / name).is_file():
            return str(config_dir / name)
    raise CredentialsError(CREDENTIALS_HELP.format(config_dir=config_dir))


def resolve_owner(given: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The Kaggle account that owns kernels and datasets: ``given``, else KAGGLE_USERNAME, else kaggle.json."""
    environ = os.environ if environ is None else environ
    owner = given or environ.get("KAGGLE_USERNAME")
    kaggle_json = _config_dir(environ) / "kaggle.json"
    if not owner and kaggle_json.is_file():
        owner = json.loads(kaggle_json.read_text()).get("username")
    if not owner:
        raise CredentialsError(
            f"no Kaggle username: pass --owner (make ... KAGGLE_USERNAME=you), set KAGGLE_USERNAME, "
            f"or put it in {kaggle_json}"
        )
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", owner):
        raise CredentialsError(f"Kaggle username {owner!r} is not a valid account name")
    return owner


# ------------------------------------------------------------------------------------------------- metadata


def slugify(title: str) -> str:
    """The slug Kaggle derives from a title (ASCII titles): lowercase, runs of other characters become ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def fill_owner(value, owner: str):
    """``{owner}`` replaced by ``owner`` in every string of a metadata value."""
    if isinstance(value, str):
        return value.replace(OWNER, owner)
    if isinstance(value, list):
        return [fill_owner(v, owner) for v in value]
    if isinstance(value, dict):
        return {k: fill_owner(v, owner) for k, v in value.items()}
    return value


def _ref_problems(field: str, refs, parts: int, more: str = "") -> list[str]:
    if not isinstance(refs, list):
        return [f"{field} must be a list of strings, got {type(refs).__name__}"]
    bad = [r for r in refs if not isinstance(r, str) or r.count("/") != parts - 1 or not all(r.split("/"))]
    return [f"{field}: {r!r} is not of the form {more}" for r in bad]


def kernel_problems(meta: Mapping, folder: Path | None = None) -> list[str]:
    """Every rule ``meta`` breaks (the CLI's checks, plus this competition's), as readable sentences.

    ``folder`` is where ``code_file`` must exist (a staged kernel); None skips that check.
    """
    problems = []
    title = meta.get("title") or ""
    if len(title) < 5:
        problems.append(f"title {title!r} must be at least 5 characters")
    slug_ref = meta.get("id") or ""
    owner, _, slug = slug_ref.partition("/")
    if not owner or not slug or "/" in slug:
        problems.append(f"id {slug_ref!r} must be 'owner/kernel-slug' (no version)")
    elif len(slug) < 5:
        problems.append(f"id {slug_ref!r}: the kernel slug must be at least 5 characters")
    elif title and slugify(title) != slug.lower():
        problems.append(f"id slug {slug!r} does not match the title (it resolves to {slugify(title)!r}): rename one")
    code_file = meta.get("code_file") or ""
    if not code_file:
        problems.append("code_file is missing: name the notebook to push")
    elif folder is not None and not (folder / code_file).is_file():
        problems.append(f"code_file {code_file!r} not found in {folder}")
    if meta.get("language") not in LANGUAGES:
        problems.append(f"language {meta.get('language')!r} must be one of {LANGUAGES}")
    if meta.get("kernel_type") not in KERNEL_TYPES:
        problems.append(f"kernel_type {meta.get('kernel_type')!r} must be one of {KERNEL_TYPES}")
    for field in BOOLEAN_FIELDS:
        # the CLI accepts true/false or "true"/"false"; we ask for real booleans
        if field in meta and not isinstance(meta[field], bool):
            problems.append(f"{field} must be true or false, got {meta[field]!r}")
    pinning = meta.get("docker_image_pinning_type")
    if pinning is not None and pinning not in PINNING_TYPES:
        problems.append(f"docker_image_pinning_type {pinning!r} must be one of {PINNING_TYPES}")
    problems += _ref_problems("dataset_sources", meta.get("dataset_sources", []), 2, "'owner/dataset-slug'")
    problems += _ref_problems("kernel_sources", meta.get("kernel_sources", []), 2, "'owner/kernel-slug'")
    problems += _ref_problems(
        "model_sources", meta.get("model_sources", []), 5, "'owner/model/framework/instance/version'"
    )
    for ref in meta.get("model_sources", []) if isinstance(meta.get("model_sources"), list) else []:
        if isinstance(ref, str) and ref.count("/") == 4 and not ref.rsplit("/", 1)[-1].isdigit():
            problems.append(f"model_sources: {ref!r} must end in a version number")
    # This competition: submissions run with the internet off, on its data; a kernel with a GPU gets T4 x2, one
    # without (data preparation) asks for none: Kaggle's GPU hours are a weekly quota.
    if meta.get("enable_internet", True) is not False:
        problems.append("enable_internet must be false: the competition runs offline (the CLI's default is true)")
    if COMPETITION not in meta.get("competition_sources", []):
        problems.append(f"competition_sources must include {COMPETITION!r}")
    shape = meta.get("machine_shape")
    if meta.get("enable_gpu") is True and shape != "NvidiaTeslaT4":
        problems.append('a GPU kernel runs on T4 x2: set "machine_shape": "NvidiaTeslaT4"')
    elif meta.get("enable_gpu") is not True and shape is not None:
        problems.append(f'machine_shape {shape!r} without "enable_gpu": true: drop it (CPU only) or turn the GPU on')
    return problems


def dataset_problems(meta: Mapping) -> list[str]:
    """The rules ``kaggle datasets create`` applies to ``dataset-metadata.json``."""
    problems = []
    ref = meta.get("id") or ""
    owner, _, slug = ref.partition("/")
    if not owner or not slug or "/" in slug:
        problems.append(f"id {ref!r} must be 'owner/dataset-slug'")
    elif not 6 <= len(slug) <= 50:
        problems.append(f"id {ref!r}: the dataset slug must be 6 to 50 characters")
    if not 6 <= len(meta.get("title") or "") <= 50:
        problems.append(f"title {meta.get('title')!r} must be 6 to 50 characters")
    licenses = meta.get("licenses") or []
    if len(licenses) != 1:
        problems.append("licenses must hold exactly one license, e.g. [{'name': 'other'}]")
    elif (licenses[0] or {}).get("name") not in DATASET_LICENSES:
        problems.append(
            f"license {(licenses[0] or {}).get('name')!r} is not a name the kaggle CLI documents: use one of "
            f"{', '.join(DATASET_LICENSES)} ('other' with the licence named in the description)"
        )
    subtitle = meta.get("subtitle")
    if subtitle and not 20 <= len(subtitle) <= 80:
        problems.append(f"subtitle must be 20 to 80 characters, got {len(subtitle)}")
    return problems


def _raise_if(problems: list[str], path: Path) -> None:
    if problems:
        raise MetadataError(f"{path}:\n  - " + "\n  - ".join(problems))


def load_kernel_metadata(path: Path, owner: str) -> dict:
    """A kernel's metadata with the owner filled in; MetadataError names the file and every problem."""
    meta = fill_owner(json.loads(Path(path).read_text()), owner)
    _raise_if(kernel_problems(meta), path)
    return meta


def check_notebook(path: Path) -> None:
    """Kaggle runs notebooks through papermill: a kernelspec is required; outputs must not be committed."""
    nb = json.loads(Path(path).read_text())
    problems = []
    if not nb.get("metadata", {}).get("kernelspec", {}).get("name"):
        problems.append("metadata.kernelspec.name is missing (papermill on Kaggle fails without it)")
    if any(c.get("outputs") or c.get("execution_count") for c in nb.get("cells", []) if c["cell_type"] == "code"):
        problems.append("code cells hold outputs or execution counts: push the clean notebook from `make notebooks`")
    _raise_if(problems, path)


def kernel_dirs(root: Path = ROOT, kernel: str | None = None) -> list[Path]:
    """The folders under ``kernel-metadata/``; with ``kernel``, only the one with that slug (or code-file stem)."""
    dirs = sorted(p.parent for p in (root / "kernel-metadata").glob(f"*/{KERNEL_METADATA}"))
    if kernel:
        code_stem = {d: Path(json.loads((d / KERNEL_METADATA).read_text())["code_file"]).stem for d in dirs}
        dirs = [d for d in dirs if kernel in (d.name, code_stem[d])]
        if not dirs:
            known = ", ".join(p.parent.name for p in (root / "kernel-metadata").glob(f"*/{KERNEL_METADATA}"))
            raise MetadataError(f"no kernel {kernel!r} under {root / 'kernel-metadata'}; known: {known}")
    return dirs


# -------------------------------------------------------------------------------------------------- staging


def stage_kernel(meta_dir: Path, notebooks_dir: Path, owner: str, out_dir: Path, models_dir: Path = MODELS_DIR) -> Path:
    """``out_dir/<slug>/`` holding the filled-in metadata and the built notebook with its Kaggle recipes injected
    (:mod:`kaggle_utils.kaggle.staging`), validated; returns it. ``models_dir`` holds the uploaded adapters'
    training configs that an inference notebook's recipe is checked against."""
    meta = load_kernel_metadata(meta_dir / KERNEL_METADATA, owner)
    built = notebooks_dir / meta["code_file"]
    if not built.is_file():
        raise MetadataError(f"{built} not found: build it with `make notebooks` (from notebooks/{built.stem}.py)")
    check_notebook(built)
    notebook = staging.stage_notebook(json.loads(built.read_text()), built.stem, meta, models_dir)
    staged = out_dir / meta_dir.name
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    (staged / meta["code_file"]).write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    (staged / KERNEL_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    _raise_if(kernel_problems(meta, staged), staged / KERNEL_METADATA)
    return staged


def stage_dataset(package_dir: Path, metadata_file: Path, owner: str, out_dir: Path) -> Path:
    """``out_dir`` holding ``dataset-metadata.json`` and ``package/<clean copy of the package>``, nothing else.

    The extra ``package/`` level keeps the folder name ``kaggle_utils`` inside the uploaded archive.
    """
    meta = fill_owner(json.loads(metadata_file.read_text()), owner)
    _raise_if(dataset_problems(meta), metadata_file)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(package_dir, out_dir / "package" / package_dir.name, ignore=ignore)
    (out_dir / DATASET_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------- the kaggle CLI


def kaggle_executable() -> str:
    """The ``kaggle`` installed beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "kaggle"
    return str(beside) if beside.is_file() else "kaggle"


def run_kaggle(args: Sequence[str], kaggle: str | None = None, echo: bool = True) -> str:
    """Run ``kaggle <args>``, echo its output (unless ``echo`` is false), and raise KaggleCommandError on a failure it
    reports."""
    credential_source()
    cmd = [kaggle or kaggle_executable(), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    # progress bars (\r-rewritten lines) are noise in logs
    output = "\n".join(line.rsplit("\r", 1)[-1] for line in (proc.stdout + proc.stderr).splitlines() if line.strip())
    if echo:
        print(output)
    errors = [line for line in output.splitlines() if line.startswith(CLI_ERRORS)]
    if proc.returncode != 0 or errors:
        why = "; ".join(errors) if errors else f"exit status {proc.returncode}"
        raise KaggleCommandError(f"`kaggle {' '.join(args)}` failed: {why}")
    return output


def push_kernels(
    owner: str,
    kernel: str | None = None,
    notebooks_dir: Path = ROOT / "build/notebooks",
    stage_dir: Path = ROOT / "build/kaggle/kernels",
    root: Path = ROOT,
    kaggle: str | None = None,
    models_dir: Path = MODELS_DIR,
    waiting: push_order.Waiting | None = None,
) -> dict[str, int | None]:
    """Stage and validate every selected kernel first (nothing is pushed if one is wrong), then push them in the order
    their ``kernel_sources`` give, waiting for each kernel a later one attaches (:mod:`kaggle_utils.kaggle.push_order`).

    ``waiting``: None waits as :class:`push_order.Waiting` does by default. Returns the version number Kaggle gave each
    kernel id (None if the CLI did not print one), in push order.
    """
    credential_source()
    staged = {}
    for meta_dir in kernel_dirs(root, kernel):
        folder = stage_kernel(meta_dir, notebooks_dir, owner, stage_dir, models_dir)
        staged[json.loads((folder / KERNEL_METADATA).read_text())["id"]] = folder
    metas = {ref: json.loads((folder / KERNEL_METADATA).read_text()) for ref, folder in staged.items()}

    def push(ref: str) -> int | None:
        output = run_kaggle(["kernels", "push", "-p", str(staged[ref])], kaggle)
        found = re.search(r"Kernel version (\d+) successfully", output)
        return int(found.group(1)) if found else None

    def status(ref: str) -> str:
        return run_kaggle(["kernels", "status", ref], kaggle, echo=False)

    return push_order.push_in_order(metas, push, status, waiting or push_order.Waiting())


def publish_dataset(folder: Path, message: str, kaggle: str | None = None) -> str:
    """A new version of the dataset staged in ``folder``; creates it (private) when it does not exist yet."""
    credential_source()
    ref = json.loads((folder / DATASET_METADATA).read_text())["id"]
    status = subprocess.run([kaggle or kaggle_executable(), "datasets", "status", ref], capture_output=True, text=True)
    if status.returncode == 0:
        return run_kaggle(["datasets", "version", "-p", str(folder), "-m", message, "--dir-mode", "zip"], kaggle)
    if "not found" not in (status.stdout + status.stderr).lower():
        raise KaggleCommandError(f"`kaggle datasets status {ref}` failed: {status.stderr.strip()[-300:]}")
    return run_kaggle(["datasets", "create", "-p", str(folder), "--dir-mode", "zip"], kaggle)


# --------------------------------------------------------------------------------------------------- wheels


@dataclass(frozen=True)
class WheelsTarget:
    """Kaggle's platform, for ``pip download``; check it against ``!python -V`` in a Kaggle notebook."""

    # Kaggle image's Python: 3.12 since the image moved to it (Kaggle/docker-python "Upgrade to Python 3.12"); a
    # kernel pinned to an older image may still run 3.11
    python_version: str = "3.12"
    # Kaggle image's glibc (Ubuntu 22.04: 2.35): every manylinux_2_N tag with N up to it is accepted
    glibc: str = "2.35"
    arch: str = "x86_64"

    def __post_init__(self):
        if not re.fullmatch(r"3\.\d+", self.python_version) or not re.fullmatch(r"2\.\d+", self.glibc):
            raise ValueError(f"expected versions like 3.11 and 2.35, got {self.python_version!r}, {self.glibc!r}")

    @property
    def abi(self) -> str:
        return "cp" + self.python_version.replace(".", "")

    @property
    def platforms(self) -> list[str]:
        """Newest first; pip does not expand a manylinux tag to older ones by itself, so all are listed."""
        newest = int(self.glibc.split(".")[1])
        tags = [f"manylinux_2_{n}_{self.arch}" for n in range(newest, 16, -1)]
        return tags + [f"manylinux2014_{self.arch}"]


def requirement_names(pyproject: Path, key: str) -> list[str]:
    """The package names of the list ``key`` in pyproject.toml: ``dependencies`` or an extra."""
    from packaging.requirements import Requirement

    from kaggle_utils.config.recipes import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = project["dependencies"] if key == "dependencies" else project.get("optional-dependencies", {}).get(key)
    if reqs is None:
        raise MetadataError(f"{pyproject}: no list {key!r} (the project's dependencies or an extra)")
    return [Requirement(r).name for r in reqs]


def constraint_pins(constraints: Path) -> dict[str, str]:
    """``canonical name → name==version`` for every line of the constraints file (comments and blanks skipped)."""
    from packaging.utils import canonicalize_name

    lines = [line.split("#", 1)[0].strip() for line in constraints.read_text().splitlines()]
    return {canonicalize_name(line.split("==")[0]): line for line in lines if "==" in line}


def wheel_requirements(
    pyproject: Path = ROOT / "pyproject.toml", extra: str = "train", constraints: Path = ROOT / "constraints.txt"
) -> list[str]:
    """What the notebooks install on Kaggle: the extra at the exact versions of ``constraints`` (the code ran with
    those), then the package's own dependencies by name only, so that pip installs them only where Kaggle's image
    lacks one and leaves its numpy / pandas alone. Torch and friends are the image's own."""
    from packaging.utils import canonicalize_name

    pins = constraint_pins(constraints)
    shipped = [n for n in requirement_names(pyproject, extra) if not NOT_SHIPPED.match(canonicalize_name(n))]
    unpinned = [n for n in shipped if canonicalize_name(n) not in pins]
    if unpinned:
        raise MetadataError(f"{constraints}: no exact version (name==version) for {unpinned}; add one")
    return [pins[canonicalize_name(n)] for n in shipped] + requirement_names(pyproject, "dependencies")


def dependency_closure(pins: Iterable[str]) -> list[str]:
    """``pins`` and everything they require, at the versions installed here (where the test suite ran them).

    Kaggle's image already holds most of these; pip installs from the wheels only what it lacks.
    """
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = [p.split("==")[0] for p in pins]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen or NOT_SHIPPED.match(key):
            continue
        dist = metadata.distribution(name)
        seen[key] = f"{dist.metadata['Name']}=={dist.version}"
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sorted(seen.values(), key=str.lower)


def wheels_command(requirements: Sequence[str], dest: Path, target: WheelsTarget) -> list[str]:
    """The ``pip download`` line: binary wheels for Kaggle's platform, each pinned, no resolution against here."""
    cmd = [sys.executable, "-m", "pip", "download", "--dest", str(dest), "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", target.python_version, "--implementation", "cp", "--abi", target.abi]
    for platform in target.platforms:
        cmd += ["--platform", platform]
    return cmd + list(requirements)


def resolution_command(dest: Path, target: WheelsTarget) -> list[str]:
    """``pip install --dry-run`` of the pins file from ``dest`` alone, for ``target``'s Python and platform (no such
    interpreter needed): what the bootstrap's install will do offline on Kaggle, checked before the upload."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index", "--quiet"]
    cmd += ["--target", str(dest / ".resolve-check"), "--find-links", str(dest), "--only-binary=:all:"]
    cmd += ["--python-version", target.python_version, "--implementation", "cp", "--abi", target.abi]
    for platform in target.platforms:
        cmd += ["--platform", platform]
    return cmd + ["-r", str(dest / WHEELS_PINS)]


def check_resolution(dest: Path, target: WheelsTarget) -> None:
    """Raise, naming what pip could not find, when the pins do not resolve from ``dest`` for ``target``."""
    proc = subprocess.run(resolution_command(dest, target), capture_output=True, text=True)
    if proc.returncode != 0:
        why = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or [proc.stderr.strip()]
        raise MetadataError(
            f"{dest}: the pins do not install offline on Python {target.python_version}: {'; '.join(why)} "
            f"(run make wheels again with KAGGLE_PYTHON / KAGGLE_GLIBC as the kernel's image has them)"
        )


def build_wheels(dest: Path, target: WheelsTarget, extra: str = "train", download: bool = True) -> list[str]:
    """``dest`` = the wheels, the pins file the notebooks install from, the target they were built for and the
    dataset's metadata; after the download, the pins are resolved offline from ``dest`` for the target."""
    pins = wheel_requirements(extra=extra)
    closure = dependency_closure(pins)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / WHEELS_PINS).write_text("\n".join(pins) + "\n")
    (dest / WHEELS_TARGET).write_text(json.dumps({"python": target.python_version, "glibc": target.glibc}) + "\n")
    (dest / DATASET_METADATA).write_text(json.dumps(WHEELS_DATASET, indent=2) + "\n")
    cmd = wheels_command(closure, dest, target)
    print(" ".join(cmd))
    if download:
        subprocess.run(cmd, check=True)
        check_resolution(dest, target)
        print(f"the pins resolve offline from {dest} for Python {target.python_version}")
    return cmd


# ------------------------------------------------------------------------------------------------------ CLI


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _waiting_arguments(cmd: argparse.ArgumentParser) -> None:
    """``push``'s options for a kernel a later kernel attaches (:class:`push_order.Waiting`)."""
    default = push_order.Waiting()
    cmd.add_argument(
        "--no-wait",
        action="store_true",
        help="do not wait for a kernel's run: refuse to push it with a kernel that attaches it, print the order",
    )
    cmd.add_argument(
        "--wait-timeout", type=_seconds, default=default.timeout_s, help="seconds to wait for one kernel's run"
    )
    cmd.add_argument(
        "--poll-interval", type=_seconds, default=default.poll_s, help="seconds between `kaggle kernels status`"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kaggle_utils.kaggle.publish", description=__doc__.split("\n")[0])
    parser.add_argument("--owner", default="", help="Kaggle account; empty: KAGGLE_USERNAME, then kaggle.json")
    parser.add_argument("--kaggle", default=None, help="the kaggle executable; default: the one beside python")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("validate", "validate every kernel's metadata and built notebook (no upload)"),
        ("push", "validate, stage and push kernels (`kaggle kernels push`)"),
    ]:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--kernel", default="", help="one kernel (slug or notebook name); empty: all")
        cmd.add_argument("--notebooks-dir", type=Path, default=ROOT / "build/notebooks", help="built .ipynb files")
        cmd.add_argument("--stage-dir", type=Path, default=ROOT / "build/kaggle/kernels", help="staging folder")
        cmd.add_argument(
            "--models-dir", type=Path, default=MODELS_DIR, help="staged adapter datasets (make upload-model)"
        )
    _waiting_arguments(cmd)  # the last one added: push
    cmd = sub.add_parser("dataset", help="stage kaggle_utils/ and publish it as a dataset version")
    cmd.add_argument("--message", "-m", default="kaggle_utils update", help="version notes")
    cmd.add_argument("--stage-dir", type=Path, default=ROOT / "build/kaggle/dataset", help="staging folder")
    cmd = sub.add_parser("wheels", help="download the notebooks' pinned wheels for Kaggle's platform")
    cmd.add_argument("--dest", type=Path, default=ROOT / "build/wheels", help="wheels dataset folder")
    cmd.add_argument("--python-version", default=WheelsTarget.python_version, help="Kaggle image's Python")
    cmd.add_argument("--glibc", default=WheelsTarget.glibc, help="Kaggle image's glibc (sets the manylinux tags)")
    cmd.add_argument("--extra", default="train", help="pyproject extra holding the pins")
    cmd.add_argument("--dry-run", action="store_true", help="write the pins and print the pip line only")
    cmd.add_argument("--publish", action="store_true", help="then upload the folder as the wheels dataset")
    cmd = sub.add_parser("submit", help="submit a pushed version of the inference kernel to the competition")
    cmd.add_argument("--kernel", default="04_inference", help="kernel (slug or notebook name)")
    cmd.add_argument("--version", default="", help="kernel version printed by push (required)")
    cmd.add_argument("--message", "-m", default="kaggle_utils submission", help="submission description")
    for name, help_text in [("status", "run status of kernels"), ("output", "download kernels' outputs")]:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--kernel", default="", help="one kernel (slug or notebook name); empty: all")
        if name == "output":
            cmd.add_argument("--dest", type=Path, default=ROOT / "build/kaggle/output", help="one folder per kernel")
    return parser


def _push(args: argparse.Namespace, owner: str) -> None:
    waiting = push_order.Waiting(not args.no_wait, args.wait_timeout, args.poll_interval)
    versions = push_kernels(
        owner,
        args.kernel or None,
        args.notebooks_dir,
        args.stage_dir,
        kaggle=args.kaggle,
        models_dir=args.models_dir,
        waiting=waiting,
    )
    for ref, version in versions.items():
        print(f"pushed {ref} version {version}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "wheels":
            target = WheelsTarget(args.python_version, args.glibc)
            build_wheels(args.dest, target, args.extra, download=not args.dry_run)
            if args.publish:
                staged = fill_owner(WHEELS_DATASET, resolve_owner(args.owner))
                _raise_if(dataset_problems(staged), args.dest / DATASET_METADATA)
                (args.dest / DATASET_METADATA).write_text(json.dumps(staged, indent=2) + "\n")
                publish_dataset(args.dest, f"wheels for Python {args.python_version}", args.kaggle)
            return 0
        if args.command == "submit" and not args.version.isdigit():
            raise MetadataError(
                f"submit needs the version `make push` printed (make submit VERSION=N): {args.version!r}"
            )
        owner = resolve_owner(args.owner)
        if args.command == "validate":
            for d in kernel_dirs(ROOT, args.kernel or None):
                print("ok:", stage_kernel(d, args.notebooks_dir, owner, args.stage_dir, args.models_dir))
        elif args.command == "push":
            _push(args, owner)
        elif args.command == "dataset":
            folder = stage_dataset(ROOT / "kaggle_utils", ROOT / DATASET_METADATA, owner, args.stage_dir)
            publish_dataset(folder, args.message, args.kaggle)
        else:
            dirs = kernel_dirs(ROOT, args.kernel or None)
            for ref in [load_kernel_metadata(d / KERNEL_METADATA, owner)["id"] for d in dirs]:
                if args.command == "submit":
                    submit = ["-k", ref, "-v", args.version, "-f", "submission.csv", "-m", args.message]
                    run_kaggle(["competitions", "submit", COMPETITION, *submit], args.kaggle)
                elif args.command == "status":
                    run_kaggle(["kernels", "status", ref], args.kaggle)
                else:
                    run_kaggle(["kernels", "output", ref, "-p", str(args.dest / ref.split("/")[1]), "-o"], args.kaggle)
    except (
        MetadataError,
        staging.StagingError,
        CredentialsError,
        KaggleCommandError,
        push_order.OrderError,
        push_order.KernelRunError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
