# On Kaggle the package comes from its dataset under /kaggle/input (found by search); locally it is installed.
# The internet is off there: the pinned dependencies Kaggle's image lacks come from the wheels dataset
# (`make wheels`); pip installs only what is missing or at another version. Locally this cell does nothing.
# (`make push` adds this cell, after the parameters, to every Kaggle notebook: kaggle_utils/kaggle/bootstrap.py,
# never imported, since it runs before kaggle_utils can be.)
import subprocess
import sys
from pathlib import Path

kaggle_input = Path("/kaggle/input")
if kaggle_input.is_dir() and not any((Path(p) / "kaggle_utils").is_dir() for p in sys.path):
    sys.path += sorted(str(p.parent.parent) for p in kaggle_input.rglob("kaggle_utils/__init__.py"))[:1]
for pins in sorted(kaggle_input.rglob("kaggle_utils-wheels.txt"))[:1]:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(pins.parent)]
    subprocess.run([*pip, "-r", str(pins)], check=True)
