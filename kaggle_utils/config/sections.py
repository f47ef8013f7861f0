"""A stage's config made of typed sections, and the flat view of it that users see.

A sectioned stage config (:class:`Sectioned`) is a dataclass whose every field is a section: a small dataclass
holding its own fields and its own checks (``__post_init__``), e.g. ``cfg.inputs.max_length`` or ``cfg.optim.lr``.
Checks that span sections stay in the stage config's ``__post_init__``. A recipe's ``[section]`` tables are these
sections, and ``--help`` groups the flags by them.

Users see one flat name per field: the ``--max-length`` flag, a notebook's overrides, a key at the top of a recipe,
``train_config.json``. A field's flat name is its own name, except in a section class that a stage uses for several
sections (the inference roles: ``primary`` and ``secondary`` are both a ``RoleConfig``), where it is prefixed by
the section: ``primary_model``. Flat names are unique within a stage (a collision is a TypeError when the stage is
first used). :func:`from_flat` and :func:`to_flat` convert between the two, and ``Stage.flat(...)`` and
``cfg.replace(...)`` build a config from flat names. In code a field has one name, its section's:
``cfg.inputs.max_length`` (``cfg.max_length`` is an AttributeError that names the section, and a flat assignment is
refused rather than left as a stray attribute). A function that needs one section takes that section
(``PromptFormatter(tok, cfg.inputs)``).

A stage that keeps a flat config (a few fields) names its sections in a ``SECTIONS`` class attribute (section →
field names) instead; everything here works on both kinds.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

C = TypeVar("C")


@dataclass(frozen=True)
class FlatField:
    """One field as users see it: its flat name, where it lives, its type, default and comment."""

    name: str
    # the section attribute it lives in (None: a flat config's own field) and its name there
    section: str | None
    local: str
    type: Any
    # its default as the stage builds it; dataclasses.MISSING: required
    default: Any


class Sectioned:
    """Base of a stage config made of sections. A field is read and assigned in its section (``cfg.optim.lr``); its
    flat name (``lr``) is for the constructors (:meth:`flat`, :meth:`replace`), flags, recipes and saved configs."""

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: a flat name is not an attribute; say where the field lives
        where = _owners(type(self)).get(name)
        hint = f": the field lives in a section, read cfg.{where[0]}.{where[1]}" if where else ""
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}{hint}")

    def __setattr__(self, name: str, value: Any) -> None:
        # a flat name assigned here would be a stray attribute that no section (and no check) ever sees
        where = _owners(type(self)).get(name)
        if where is not None:
            raise AttributeError(
                f"{type(self).__name__}.{name} is not an attribute: assign cfg.{where[0]}.{where[1]}, or build a "
                f"copy with cfg.replace({name}=...)"
            )
        object.__setattr__(self, name, value)

    @classmethod
    def flat(cls: type[C], **values: Any) -> C:
        """The config from flat names (``TrainConfig.flat(max_length=512, lr=1e-3)``); the rest take defaults."""
        return from_flat(cls, values)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (flat names) applied, every section checked again (``dataclasses.replace``
        takes section objects only)."""
        return from_flat(type(self), {**to_flat(self), **changes})


def is_sectioned(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, Sectioned)


def section_classes(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _owners(cls: type) -> dict[str, tuple[str, str]]:
    """Flat name → (section attribute, field name in the section) of a sectioned config."""
    classes = section_classes(cls)
    shared = {k for k, n in Counter(classes.values()).items() if n > 1}
    owners: dict[str, tuple[str, str]] = {}
    for section, klass in classes.items():
        if not dataclasses.is_dataclass(klass):
            raise TypeError(f"{cls.__name__}.{section}: a section must be a dataclass, not {klass!r}")
        for f in dataclasses.fields(klass):
            if not f.init:
                continue
            name = f"{section}_{f.name}" if klass in shared else f.name
            if name in owners or name in classes:
                other = owners.get(name, (name, ""))[0]
                raise TypeError(
                    f"{cls.__name__}: the flat name {name!r} of [{section}] is also in [{other}]: flat names (flags, "
                    "recipe keys at the top level) must be unique within a stage; rename one of the fields"
                )
            owners[name] = (section, f.name)
    return owners


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def flat_fields(cls: type) -> dict[str, FlatField]:
    """Every field of the config ``cls`` under its flat name, in section order (a flat config: field order)."""
    if not is_sectioned(cls):
        hints = typing.get_type_hints(cls)
        return {
            f.name: FlatField(f.name, section_of(cls).get(f.name), f.name, hints[f.name], _default(f))
            for f in dataclasses.fields(cls)
            if f.init
        }
    out = {}
    section_fields = {f.name: f for f in dataclasses.fields(cls)}
    classes = section_classes(cls)
    for name, (section, local) in _owners(cls).items():
        built = _default(section_fields[section])  # the section as the stage builds it by default
        klass = classes[section]
        own = {f.name: f for f in dataclasses.fields(klass)}[local]
        default = _default(own) if built is dataclasses.MISSING else getattr(built, local)
        out[name] = FlatField(name, section, local, typing.get_type_hints(klass)[local], default)
    return out


def sections(cls: type) -> dict[str, dict[str, str]]:
    """The sections of the config ``cls``, in order: section → {key written under it: flat name}. A flat config
    without ``SECTIONS`` has none."""
    if is_sectioned(cls):
        out: dict[str, dict[str, str]] = {name: {} for name in section_classes(cls)}
        for name, (section, local) in _owners(cls).items():
            out[section][local] = name
        return out
    return {name: {f: f for f in fields} for name, fields in getattr(cls, "SECTIONS", {}).items()}


def section_of(cls: type) -> dict[str, str]:
    """Flat name → its section, for the fields that have one."""
    return {name: section for section, keys in sections(cls).items() for name in keys.values()}


def section_doc(cls: type, section: str) -> str:
    """The first line of a section class's docstring (empty for a flat config's sections)."""
    if not is_sectioned(cls):
        return ""
    doc = (section_classes(cls)[section].__doc__ or "").strip()
    return doc.splitlines()[0] if doc and not doc.startswith(section_classes(cls)[section].__name__ + "(") else ""


def from_flat(cls: type[C], values: Mapping[str, Any]) -> C:
    """The config ``cls`` from flat names (a flat config: its fields); each section is built from its defaults and
    the values given for it, then checked, then the stage config checks what spans sections."""
    if not is_sectioned(cls):
        return cls(**values)
    owners = _owners(cls)
    unknown = [k for k in values if k not in owners]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {unknown[0]!r}")
    given: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, local = owners[key]
        given.setdefault(section, {})[local] = value
    built = {}
    for f in dataclasses.fields(cls):
        base = _default(f)
        if base is dataclasses.MISSING:
            built[f.name] = section_classes(cls)[f.name](**given.get(f.name, {}))
        else:
            built[f.name] = dataclasses.replace(base, **given.get(f.name, {}))
    return cls(**built)


def to_flat(cfg: Any) -> dict[str, Any]:
    """Flat name → value of a config (a sectioned one or a flat one), in :func:`flat_fields` order."""
    if not is_sectioned(type(cfg)):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return {name: getattr(getattr(cfg, section), local) for name, (section, local) in _owners(type(cfg)).items()}
