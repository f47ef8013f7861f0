"""Turn a stage's typed config dataclass into a command line, so every stage runs from a shell.

Each field becomes ``--field-name`` (its flat name: :mod:`kaggle_utils.config.sections`), grouped in ``--help`` by
the config's sections; its help text is the comment written above the field in the dataclass source (one place to
document a field, read by both the notebook reader and ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kaggle_utils.config import recipes
from kaggle_utils.config.recipes import base_type
from kaggle_utils.config.sections import (
    flat_fields,
    from_flat,
    is_sectioned,
    section_classes,
    section_doc,
    sections,
    to_flat,
)

C = TypeVar("C")


def field_docs(cls: type) -> dict[str, str]:
    """The ``#`` comment lines directly above each field in the source of ``cls`` and its bases; for a sectioned
    config, those of its sections' fields, under their flat names."""
    if is_sectioned(cls):
        docs = {name: _source_docs(klass) for name, klass in section_classes(cls).items()}
        return {f.name: docs[f.section][f.local] for f in flat_fields(cls).values() if f.local in docs[f.section]}
    return _source_docs(cls)


def _source_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped.lstrip("#").strip())
                continue
            m = re.match(r"([A-Za-z_]\w*)\s*:", stripped)
            if m and pending:
                docs[m.group(1)] = " ".join(pending)
            pending = []
    return docs


def _converter(tp: Any) -> Callable[[str], Any]:
    base = base_type(tp)
    convert = _plain_converter(base)
    if base is tp:
        return convert

    def optional(text: str) -> Any:
        # ``X | None`` fields: an empty value (``--flag ""``) means None, as the field comments promise
        return None if text == "" else convert(text)

    optional.__name__ = getattr(convert, "__name__", "value")
    return optional


def _plain_converter(tp: Any) -> Callable[[str], Any]:
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return Path
    # lists, tuples and dicts are given as JSON on the command line
    return json.loads


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(
    cls: type,
    description: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per field of the config dataclass ``cls`` (its flat names),
    grouped by the config's sections.

    ``defaults`` (a recipe's values) replace the dataclass defaults; a required field they set is no longer required.
    """
    parser = argparse.ArgumentParser(
        description=description or inspect.cleandoc(cls.__doc__ or ""),
        epilog=epilog,
        formatter_class=_HelpFormatter,
    )
    # a group's line: the comment above the section in the stage's config, else the section class's docstring
    about = _source_docs(cls) if is_sectioned(cls) else {}
    groups = {
        name: parser.add_argument_group(f"[{name}]", about.get(name) or section_doc(cls, name) or None)
        for name in sections(cls)
    }
    docs = field_docs(cls)
    defaults = defaults or {}
    for f in flat_fields(cls).values():
        required, default = f.default is dataclasses.MISSING, f.default
        if f.name in defaults:
            required, default = False, defaults[f.name]
        groups.get(f.section, parser).add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_converter(f.type),
            required=required,
            default=None if default is dataclasses.MISSING else default,
            # argparse %-formats help strings: a literal "%" in a comment (e.g. "10%") must be doubled
            help=docs.get(f.name, "").replace("%", "%%"),
        )
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the epilog (the list of recipes) kept as written."""


def parse_config(cls: type[C], argv: Sequence[str] | None = None) -> C:
    """Parse ``argv`` into an instance of the config dataclass ``cls`` (validated by its ``__post_init__``).

    When ``cls`` has a ``STAGE``, ``--recipe NAME|PATH`` fills the fields from a recipe first and the other flags
    override it; ``--help`` lists the stage's recipes.
    """
    if not getattr(cls, "STAGE", None):
        return from_flat(cls, vars(build_parser(cls).parse_args(argv)))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default="")
    known, rest = pre.parse_known_args(argv)
    values = recipes.recipe_values(known.recipe, cls) if known.recipe else {}
    lines = [f"  {r.name:<28} {r.summary}" for r in recipes.available(cls.STAGE)]
    epilog = "recipes for this stage (--recipe NAME, or a path to a .toml file):\n" + "\n".join(lines)
    parser = build_parser(cls, defaults=values, epilog=epilog)
    parser.add_argument("--recipe", default=known.recipe, help="recipe name or .toml path; flags override it")
    args = vars(parser.parse_args(rest))
    args.pop("recipe")
    return from_flat(cls, args)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths as strings), for saving next to artifacts: flat names, so
    that files written before the configs had sections read the same (:func:`kaggle_utils.config.sections.to_flat`)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {name: convert(value) for name, value in to_flat(cfg).items()}


def config_to_argv(values: Mapping[str, Any]) -> list[str]:
    """The ``--flag value`` arguments that :func:`parse_config` reads back as ``values`` (field name -> value):
    booleans as true/false, None as "", lists and dicts as JSON. For launching a stage in another process."""

    def text(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if value is None:
            return ""
        if isinstance(value, (list, tuple, dict)):
            return json.dumps(value)
        return str(value)

    return [x for key, value in values.items() for x in ("--" + key.replace("_", "-"), text(value))]


def save_config(cfg: Any, path: Path) -> Path:
    """Write the resolved config as JSON beside the artifact it produced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config_to_dict(cfg), indent=2, ensure_ascii=False) + "\n")
    return path
