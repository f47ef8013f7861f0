# On Kaggle the package comes from its dataset under /kaggle/input (found by search); locally it is installed.
# The internet is off there: the pinned dependencies Kaggle's image lacks come from the wheels dataset
# (`make wheels`); pip installs only what is missing or at another version. Locally this cell does nothing.
# (`make push` adds this cell, after the parameters, to every Kaggle notebook: kaggle_utils/kaggle/bootstrap.py,
# never imported, since it runs before kaggle_utils can be.) The search follows symlinked mounts (Kaggle mounts
# inputs under /kaggle/input/<slug> and, in newer kernels, competitions/, datasets/<owner>/, models/...), and a
# package left packed as a .zip is unpacked to a temporary folder.
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# a rehearsal elsewhere names the folder standing in for /kaggle (kaggle_utils/kaggle/env.py: ROOT_VARIABLE)
kaggle_input = Path(os.environ.get("KAGGLE_UTILS_KAGGLE_ROOT") or "/kaggle") / "input"


def files_under(root, match):
    """Files under ``root`` for which ``match(path)`` holds, entering symlinked folders (Path.rglob does not)."""
    return sorted(Path(d) / f for d, _, names in os.walk(root, followlinks=True) for f in names if match(Path(d) / f))


def packed_package(root):
    """The kaggle_utils/__init__.py of a .zip under ``root``, unpacked to a temporary folder; None if none holds one."""
    for archive in files_under(root, lambda p: p.suffix == ".zip"):
        with zipfile.ZipFile(archive) as zf:
            inits = sorted(n for n in zf.namelist() if n.endswith("kaggle_utils/__init__.py"))
            if inits:
                out = Path(tempfile.gettempdir()) / "kaggle_utils_package"
                zf.extractall(out)
                print(f"kaggle_utils: unpacked {archive}")
                return out / inits[0]
    return None


if kaggle_input.is_dir():
    if not any((Path(p) / "kaggle_utils").is_dir() for p in sys.path):
        inits = files_under(kaggle_input, lambda p: p.name == "__init__.py" and p.parent.name == "kaggle_utils")
        init = inits[0] if inits else packed_package(kaggle_input)
        if init is None:
            raise FileNotFoundError(
                f"kaggle_utils not found under {kaggle_input}: attach the package dataset (`make dataset` publishes "
                "<owner>/wsdm-arena-kaggle-utils) to this notebook with Add input"
            )
        sys.path.append(str(init.parent.parent))
        print(f"kaggle_utils: {init.parent}")
    pins = files_under(kaggle_input, lambda p: p.name == "kaggle_utils-wheels.txt")
    if not pins:
        raise FileNotFoundError(
            f"kaggle_utils-wheels.txt not found under {kaggle_input}: attach the wheels dataset (`make wheels-dataset` "
            "publishes <owner>/wsdm-arena-wheels) to this notebook with Add input"
        )
    target = pins[0].with_name("kaggle_utils-wheels-target.json")  # absent in wheels datasets made before it existed
    built_for = json.loads(target.read_text())["python"] if target.is_file() else None
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if built_for not in (None, running):
        raise RuntimeError(
            f"the wheels in {pins[0].parent} are for Python {built_for}, this image runs {running}: "
            f"`make wheels KAGGLE_PYTHON={running}`, then `make wheels-dataset`"
        )
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(pins[0].parent)]
    subprocess.run([*pip, "-r", str(pins[0])], check=True)
    print(f"wheels: {pins[0].parent} ({len(pins[0].read_text().split())} pins, installed where the image lacks them)")
