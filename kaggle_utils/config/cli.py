"""Turn a stage's typed config dataclass into a command line, so every stage runs from a shell.

Each field becomes ``--field-name``; its help text is the comment written above the field in the
dataclass source (one place to document a field, read by both the notebook reader and ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kaggle_utils.config import recipes
from kaggle_utils.config.recipes import base_type

C = TypeVar("C")


def field_docs(cls: type) -> dict[str, str]:
    """The ``#`` comment lines directly above each field in the source of ``cls`` and its bases."""
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
    sections: Mapping[str, Sequence[str]] | None = None,
) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per field of the dataclass ``cls``.

    ``defaults`` (a recipe's values) replace the dataclass defaults; a required field they set is no longer required.
    ``sections`` (section → fields, a stage's recipe sections) group the options in ``--help``.
    """
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip(),
        epilog=epilog,
        formatter_class=_HelpFormatter,
    )
    groups = {name: parser.add_argument_group(f"[{name}]") for name in (sections or {})}
    group_of = {field: groups[name] for name, fields in (sections or {}).items() for field in fields}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if f.name in defaults:
            required, default = False, defaults[f.name]
        group_of.get(f.name, parser).add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_converter(hints[f.name]),
            required=required,
            default=default,
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
        return cls(**vars(build_parser(cls).parse_args(argv)))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default="")
    known, rest = pre.parse_known_args(argv)
    values = recipes.recipe_values(known.recipe, cls) if known.recipe else {}
    lines = [f"  {r.name:<28} {r.summary}" for r in recipes.available(cls.STAGE)]
    epilog = "recipes for this stage (--recipe NAME, or a path to a .toml file):\n" + "\n".join(lines)
    parser = build_parser(cls, defaults=values, epilog=epilog, sections=recipes.sections(cls.STAGE))
    parser.add_argument("--recipe", default=known.recipe, help="recipe name or .toml path; flags override it")
    args = vars(parser.parse_args(rest))
    args.pop("recipe")
    return cls(**args)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths as strings), for saving next to artifacts."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {f.name: convert(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


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
