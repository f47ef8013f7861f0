"""Recipes: every stage × model's settings written once, in a commented TOML file inside the package.

A recipe is read into the stage's config dataclass; an unknown or mistyped key, or a value of the wrong type,
is a :class:`RecipeError` naming the file and the key. Layout of a recipe (``kaggle_utils/recipes/*.toml``)::

    # One line saying what it is for (listed by ``--help``).
    # Command, prerequisites and the hardware it was sized for, as further comment lines.
    stage = "train"                 # which stage's dataclass it fills
    extends = "student-base"        # optional: a recipe (name, or path relative to this file) it overrides

    [inputs]                        # the section the field belongs to: the config's ``inputs`` section
    max_length = 2500

The ``[section]`` tables are the sections of the stage's config (:mod:`kaggle_utils.config.sections`: a sectioned
config's section attributes, or a flat config's ``SECTIONS``); a key under a section is the field's name there.
A key under another section is an error naming the file, the section and the key; a key at the top of the file is
allowed and takes the field's flat name (its ``--flag``). ``--help`` groups a stage's flags by the same sections.

A variant ``extends`` its base and writes only what differs, so no two files drift apart. Empty strings stand
for ``None`` in optional fields (TOML has no null), as on the command line.

Profiles (``recipes/profiles.toml``) say which recipe each notebook's stage role takes in each place the suite
runs: ``demo`` (a CPU laptop), ``kaggle`` (2×T4, what ``make push`` ships) and ``shell`` (rented GPUs).
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kaggle_utils.config.sections import flat_fields, from_flat, sections

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Kaggle and the test suite run 3.11+
    import tomli as tomllib


def base_type(tp: Any) -> Any:
    """Strip ``Optional[...]`` / ``X | None`` down to ``X``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
PROFILES_FILE = RECIPES_DIR / "profiles.toml"
PROFILES = ("demo", "kaggle", "shell")
# keys of a recipe that are not config fields
META_KEYS = ("stage", "extends")

C = TypeVar("C")


class RecipeError(ValueError):
    """A recipe file that cannot be used as written; the message names the file and the key."""


@dataclass(frozen=True)
class Recipe:
    """One recipe file, with its ``extends`` chain resolved into ``values`` (flat: field → value)."""

    name: str
    path: Path
    stage: str
    summary: str
    values: dict[str, Any]
    chain: tuple[Path, ...]


def recipe_path(name_or_path: str | Path, relative_to: Path = RECIPES_DIR) -> Path:
    """A recipe name (``student-qwen2.5-14b``) from the package, or a path to any ``.toml`` file."""
    text = str(name_or_path)
    candidates = [Path(text)] if text.endswith(".toml") else []
    candidates += [relative_to / text, relative_to / f"{text}.toml", RECIPES_DIR / f"{text}.toml"]
    for path in candidates:
        if path.is_file():
            return path
    known = ", ".join(r.name for r in available())
    raise RecipeError(f"no recipe {text!r} (looked for {candidates[-1]}); the package has: {known}")


def _summary(text: str) -> str:
    """The first comment line of the file: what the recipe is for."""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def _flatten(raw: dict[str, Any], path: Path, cls: type | None) -> dict[str, Any]:
    """Sections are for reading only: ``[optim] lr = 1e-4`` is the field ``lr`` (``[primary] model`` is
    ``primary_model``). A table named after a dict field is that field's value. A field set twice is an error.

    Without the stage's config ``cls`` (listing recipes: only their stage and summary are read) keys are taken as
    written and not checked: ``[primary] model`` and ``[secondary] model`` are one key then."""
    layout = sections(cls) if cls is not None else {}
    dict_fields = _dict_fields(cls) if cls is not None else frozenset()
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in META_KEYS:
            continue
        if isinstance(value, dict) and key not in dict_fields:
            names = layout.get(key, {})
            items = [(names.get(local, local), v) for local, v in value.items()]
        else:
            items = [(key, value)]
        for field, v in items:
            if field in flat and cls is not None:
                raise RecipeError(f"{path}: key {field!r} is set twice (sections are flattened: set it once)")
            flat[field] = v
    return flat


def read(name_or_path: str | Path, cls: type | None = None, _seen: tuple = ()) -> Recipe:
    """Parse a recipe and the chain it extends; child values override the base's. The values are flat names when
    read for the stage's config ``cls``; without it, as written (enough for the stage and the summary)."""
    path = recipe_path(name_or_path, _seen[-1].parent if _seen else RECIPES_DIR).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: 'extends' loops back to itself ({' → '.join(p.name for p in (*_seen, path))})")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: not valid TOML: {err}") from err
    values: dict[str, Any] = {}
    chain: tuple[Path, ...] = (path,)
    stage = raw.get("stage")
    if "extends" in raw:
        base = read(raw["extends"], cls, (*_seen, path))
        if stage and stage != base.stage:
            raise RecipeError(f"{path}: stage {stage!r} differs from the stage {base.stage!r} of {base.path}")
        stage, values, chain = base.stage, dict(base.values), (*base.chain, path)
    if not isinstance(stage, str) or not stage:
        raise RecipeError(f"{path}: no 'stage' key (e.g. stage = \"train\"), and nothing it extends has one")
    values.update(_flatten(raw, path, cls))
    name = path.stem if path.parent == RECIPES_DIR.resolve() else str(path)
    return Recipe(name, path, stage, _summary(text), values, chain)


def _type_ok(value: Any, tp: Any) -> bool:
    base = base_type(tp)
    if base is not tp and value in ("", None):
        return True  # optional field left empty
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base in (str, Path):
        return isinstance(value, str)
    origin = typing.get_origin(base) or base
    if origin in (list, tuple):
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    return True


def check_values(values: Mapping[str, Any], cls: type, where: str) -> None:
    """Every key is a field of ``cls`` (its flat name) and every value has the field's type; else RecipeError
    naming ``where``."""
    fields = flat_fields(cls)
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{where}: unknown key {key!r}{hint}; {cls.__name__} has no such field")
        if not _type_ok(value, fields[key].type):
            want = getattr(base_type(fields[key].type), "__name__", str(fields[key].type))
            raise RecipeError(f"{where}: key {key!r} = {value!r} should be {want}")


def check_sections(raw: Mapping[str, Any], path: Path, cls: type) -> None:
    """Every key under a ``[section]`` belongs to that section; else RecipeError naming file, section and key.

    A key that is no field at all is left to :func:`check_values` (it names the closest field).
    """
    layout, fields = sections(cls), flat_fields(cls)
    for name, value in raw.items():
        if name in META_KEYS or not isinstance(value, dict) or name in _dict_fields(cls) or not layout:
            continue
        if name not in layout:
            raise RecipeError(f"{path}: unknown section [{name}]; {stage_name(cls)!r} recipes have {', '.join(layout)}")
        for key in value:
            owner = fields.get(key)
            if key not in layout[name] and owner is not None and owner.section not in (None, name):
                local = f" (as {owner.local!r})" if owner.local != key else ""
                raise RecipeError(f"{path}: key {key!r} is under [{name}]; it belongs in [{owner.section}]{local}")


def _dict_fields(cls: type) -> frozenset[str]:
    """Flat names of the dict-valued fields (a TOML table of that name is the field's value, not a section)."""
    return frozenset(f.name for f in flat_fields(cls).values() if typing.get_origin(base_type(f.type)) is dict)


def stage_name(cls: type) -> str:
    """The stage a config class belongs to (its ``STAGE`` class attribute), matched against ``stage =``."""
    stage = getattr(cls, "STAGE", None)
    if not stage:
        raise TypeError(f"{cls.__name__} has no STAGE class attribute: it cannot be filled from a recipe")
    return stage


def recipe_values(name_or_path: str | Path, cls: type) -> dict[str, Any]:
    """The recipe's resolved values for ``cls``, checked key by key (file and key named on error)."""
    recipe = read(name_or_path, cls)
    if recipe.stage != stage_name(cls):
        raise RecipeError(
            f"{recipe.path}: a recipe for the {recipe.stage!r} stage, not {stage_name(cls)!r}; "
            f"recipes for {stage_name(cls)!r}: {', '.join(r.name for r in available(stage_name(cls)))}"
        )
    for path in recipe.chain:  # name the file that holds a bad key, not the last of the chain
        raw = tomllib.loads(path.read_text())
        check_sections(raw, path, cls)
        check_values(_flatten(raw, path, cls), cls, str(path))
    return recipe.values


def load(name_or_path: str | Path, cls: type[C], overrides: Mapping[str, Any] | None = None) -> C:
    """The config ``cls`` from a recipe, with ``overrides`` (field → value) applied over it."""
    values = recipe_values(name_or_path, cls)
    if overrides:
        check_values(overrides, cls, f"overrides of recipe {name_or_path}")
        values = {**values, **overrides}
    try:
        return from_flat(cls, values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe {name_or_path}: {err}") from err


def available(stage: str | None = None) -> list[Recipe]:
    """Every recipe in the package (for one stage), sorted by name."""
    out = []
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        if path == PROFILES_FILE:
            continue
        recipe = read(path)
        if stage is None or recipe.stage == stage:
            out.append(recipe)
    return out


def profile(name: str) -> dict[str, Any]:
    """The ``[name]`` table of ``profiles.toml``: notebook → {role: recipe}, and the shell stages' recipes."""
    if name not in PROFILES:
        raise RecipeError(f"profile {name!r}: expected one of {PROFILES}")
    return tomllib.loads(PROFILES_FILE.read_text())[name]
