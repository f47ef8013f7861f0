"""pyproject.toml takes ranges (a user's CUDA torch stays); constraints.txt pins every one of them for `make`."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from kaggle_utils.config.recipes import tomllib
from kaggle_utils.kaggle.publish import MetadataError, constraint_pins, wheel_requirements

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [Requirement(r) for r in PROJECT["dependencies"]] + [
    Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra
]


@pytest.mark.parametrize("req", REQUIREMENTS, ids=str)
def test_dependency_is_a_range_that_its_pin_satisfies(req: Requirement) -> None:
    assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{req}: a range, not an exact pin"
    assert any(spec.operator == ">=" for spec in req.specifier), f"{req}: a lower bound at the tested version"
    pins = constraint_pins(ROOT / "constraints.txt")
    pin = pins.get(canonicalize_name(req.name))
    assert pin is not None, f"constraints.txt pins no version of {req.name}"
    assert req.specifier.contains(Version(pin.split("==")[1])), f"constraints.txt's {pin} is outside {req}"


def test_makefile_installs_through_the_constraints() -> None:
    installs = [line for line in (ROOT / "Makefile").read_text().splitlines() if "pip install" in line]
    package = [line for line in installs if "-e '.[" in line or " torch" in line]
    assert len(package) == 2 and all("-c constraints.txt" in line for line in package)


def test_kaggle_wheels_refuse_an_extra_without_a_pin(tmp_path) -> None:
    constraints = tmp_path / "constraints.txt"
    pins = (ROOT / "constraints.txt").read_text()
    constraints.write_text(pins.replace("\npeft==", "\n# peft=="))
    with pytest.raises(MetadataError, match=r"no exact version .*peft"):
        wheel_requirements(constraints=constraints)


def test_every_data_file_of_the_package_is_shipped_in_its_wheel() -> None:
    """Recipes, accelerate configs and the demo's word tables are read at run time: an installed wheel needs them."""
    import fnmatch

    package = ROOT / "kaggle_utils"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "kaggle_utils"
    ]
    data = [
        p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
    ]
    unshipped = [name for name in data if not any(fnmatch.fnmatch(name, pat) for pat in patterns)]
    assert data and unshipped == []
