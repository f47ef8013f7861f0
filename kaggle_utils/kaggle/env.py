"""Where we run and where things are: local machine or Kaggle (interactive, batch, competition rerun).

On Kaggle, inputs are mounted under ``/kaggle/input/<slug>/...`` and the slug depends on how the user
attached them (a competition, a dataset, a model with framework/variation/version folders). Nothing here
hard-codes those paths: files are found by searching the input root for what identifies them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
# A folder standing in for /kaggle (its input/ and working/ below it), for a rehearsal of a Kaggle run on another
# machine (`make rehearse`); unset on Kaggle. Recipes keep writing /kaggle/... paths either way.
ROOT_VARIABLE = "KAGGLE_UTILS_KAGGLE_ROOT"


@dataclass(frozen=True)
class Environment:
    """``kind`` is one of ``local``, ``kaggle-interactive``, ``kaggle-batch``, ``kaggle-rerun``."""

    kind: str
    input_root: Path
    working_dir: Path

    @property
    def on_kaggle(self) -> bool:
        return self.kind != "local"

    def output_path(self, path: str | Path) -> Path:
        """A recipe's output path: one under /kaggle/working moved below this run's working folder (the same folder
        on Kaggle; a rehearsal's stand-in elsewhere), any other as written."""
        path = Path(path)
        if not self.on_kaggle or not path.is_relative_to(KAGGLE_WORKING):
            return path
        return self.working_dir / path.relative_to(KAGGLE_WORKING)

    @property
    def is_rerun(self) -> bool:
        """The hidden-test scoring run: the full test set replaces the 3 visible rows."""
        return self.kind == "kaggle-rerun"


def detect(environ: Mapping[str, str] | None = None, local_root: Path = Path(".")) -> Environment:
    """Read the environment variables Kaggle sets (``KAGGLE_KERNEL_RUN_TYPE``, ``KAGGLE_IS_COMPETITION_RERUN``)."""
    environ = os.environ if environ is None else environ
    run_type = environ.get("KAGGLE_KERNEL_RUN_TYPE")
    if run_type is None:
        return Environment("local", Path(local_root), Path(local_root))
    if environ.get("KAGGLE_IS_COMPETITION_RERUN"):
        kind = "kaggle-rerun"
    else:
        kind = "kaggle-batch" if run_type.lower() == "batch" else "kaggle-interactive"
    root = environ.get(ROOT_VARIABLE)
    if root:
        return Environment(kind, Path(root) / KAGGLE_INPUT.name, Path(root) / KAGGLE_WORKING.name)
    return Environment(kind, KAGGLE_INPUT, KAGGLE_WORKING)


def _search(root: Path, marker: str, hint: str | None) -> list[Path]:
    """Folders under ``root`` containing ``marker`` whose path contains ``hint`` (case-insensitive). Symlinked
    folders are entered: Kaggle can mount an input as a link, and ``Path.rglob`` does not follow links."""
    hits = sorted(Path(folder) for folder, _, files in os.walk(root, followlinks=True) if marker in files)
    if hint:
        hits = [h for h in hits if hint.lower() in str(h).lower()]
    return hits


def _one(hits: list[Path], what: str, root: Path, hint: str | None) -> Path:
    if not hits:
        extra = f" with {hint!r} in its path" if hint else ""
        raise FileNotFoundError(
            f"no {what}{extra} under {root}; attach it to the notebook (Add input) or pass its path explicitly"
        )
    # several matches: the shortest path is the least nested one (e.g. a model's latest version folder
    # is found by its hint; an unversioned copy wins over a nested checkpoint)
    return min(hits, key=lambda p: (len(p.parts), str(p)))


def find_competition_dir(root: Path, hint: str | None = None) -> Path:
    """The folder that holds ``test.parquet`` (and ``train.parquet``) of the competition."""
    hits = [h for h in _search(root, "test.parquet", hint) if (h / "train.parquet").is_file() or hint]
    return _one(hits, "competition folder (train.parquet + test.parquet)", root, hint)


def find_model_dir(root: Path, hint: str) -> Path:
    """A ``save_pretrained`` model folder (``config.json`` beside weights) whose path contains ``hint``."""
    hits = [h for h in _search(root, "config.json", hint) if any(h.glob("*.safetensors")) or any(h.glob("*.bin"))]
    return _one(hits, "model folder (config.json + weights)", root, hint)


def find_adapter_dir(root: Path, hint: str) -> Path:
    """A peft adapter folder (``adapter_config.json``) whose path contains ``hint``."""
    return _one(_search(root, "adapter_config.json", hint), "LoRA adapter folder", root, hint)


def find_dir(root: Path, marker: str, hint: str | None = None) -> Path:
    """The least nested folder under ``root`` holding a file named ``marker`` whose path contains ``hint``."""
    return _one(_search(root, marker, hint), f"folder holding {marker}", root, hint)


def locate(value: str | Path, env: Environment, find) -> Path:
    """A notebook path parameter: the path itself when it exists; on Kaggle, otherwise ``find(env.input_root)``.

    Defaults in the notebooks are the demo's local paths; on Kaggle the same notebook finds the attached
    model, adapter or earlier kernel's output by search, so it runs there unedited.
    """
    path = Path(value)
    if value and path.exists():
        return path
    if env.on_kaggle:
        return find(env.input_root)
    raise FileNotFoundError(f"{path}: not found; run the earlier notebooks (or `make demo`) or pass an existing path")


def input_slug(path: str | Path) -> str | None:
    """The first folder below ``/kaggle/input`` in a recipe path (the dataset, model or kernel slug), else None."""
    parts = Path(path).parts
    root = KAGGLE_INPUT.parts
    return parts[len(root)] if len(parts) > len(root) and parts[: len(root)] == root else None


def locate_model(path: str | Path | None, env: Environment) -> Path | None:
    """A recipe's base-model folder: as written, or on Kaggle the attached model wherever it is mounted.

    An empty path (an optional model left out) stays None, as in the stage configs.
    """
    if not path:
        return None
    return locate(path, env, lambda root: find_model_dir(root, input_slug(path) or Path(path).name))


def locate_adapter(path: str | Path | None, env: Environment) -> Path | None:
    """A recipe's LoRA adapter folder: as written, or on Kaggle the attached dataset that holds it; empty: None."""
    if not path:
        return None
    return locate(path, env, lambda root: find_adapter_dir(root, input_slug(path) or Path(path).name))


def locate_soft(path: str | Path | None, env: Environment, locate_one: Callable) -> Path | None:
    """``locate_one(path, env)`` (:func:`locate_model`, :func:`locate_adapter`), or ``path`` as written when nothing
    is found, said in one line: the stage's own checks then report it where it fails soft. So a model that is not
    attached (Gemma is consent-gated on Kaggle) costs its own rows, never the submission."""
    try:
        return locate_one(path, env)
    except FileNotFoundError as err:
        print(f"WARNING: {err}", flush=True)
        return Path(path)


def locate_file(path: str | Path, env: Environment) -> Path:
    """A recipe's input file: as written, or on Kaggle the file of that name in the input it names."""
    name = Path(path).name
    return locate(path, env, lambda root: find_dir(root, name, input_slug(path)) / name)
