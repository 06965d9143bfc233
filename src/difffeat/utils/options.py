"""Options dataclasses that check themselves, know which fields change the numbers, and list their fields.

Each piece of difffeat (extraction, probe, fusion, search, report, data) owns one options dataclass with its
defaults. A field is declared with :func:`option`, which records its help text, allowed values or range, and
whether it changes the numbers an artefact holds. From that one declaration follow:

* validation in ``__post_init__`` (type, allowed set, range): a notebook user constructing ``ProbeOptions(epochs=0)``
  gets the same one-line error as ``--set probe.epochs=0`` on the command line;
* :func:`fingerprint`, a stable hash of the fields that change the numbers, which the feature store and the run
  folder use as the identity of what they hold (a new numbers-changing option changes it without anyone touching
  the store);
* :func:`option_paths`, the ``section.key`` paths, help and allowed values the CLI shows;
* :func:`from_dict`, reading YAML mappings with an error that names the file and the key.

``numbers`` is True when a field changes every artefact the options describe, a scope name (``"image"``,
``"text"``, ``"search"``) when it only changes the artefacts of that scope, and False when it changes speed,
logging or where things go but not the numbers (beyond float rounding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, Field
from typing import Any

Check = Callable[[Any], str | None]  # what is wrong with a (non-None) value, or None when it is fine


class OptionError(ValueError):
    """A value that does not fit its option; ``field`` is the dotted path, the message says what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def option(
    default: Any = MISSING,
    *,
    default_factory: Callable[[], Any] | Any = MISSING,
    help: str = "",
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    numbers: bool | str = False,
    check: Check | None = None,
    keyed_default: bool = True,
) -> Any:
    """A dataclass field with its help, allowed values or range (for lists: of every item), a ``check`` of the whole
    value (None is always allowed where the type allows it), and whether it changes the numbers.

    ``keyed_default=False`` leaves a numbers-changing field out of the fingerprint while it holds its default: a
    field added after stores were written, whose default reproduces what they hold, keeps their keys valid."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "numbers": numbers, "check": check, "keyed_default": keyed_default}  # fmt: skip
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def added_later(default: Any, **kwargs: Any) -> Any:
    """An option that changes the numbers but was added after stores were written, with a ``default`` that
    reproduces what they hold: keyed only when set away from it (``numbers=True, keyed_default=False``), so those
    stores stay valid. One name for the pattern, so each such field says why it is left out of the key."""
    return option(default, numbers=True, keyed_default=False, **kwargs)


class Options:
    """Base of every options dataclass: validates (and normalises tuples to lists) on construction."""

    def __post_init__(self) -> None:
        validate(self)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_options(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def validate(obj: Any) -> None:
    """Check every field of ``obj`` against its type and its option metadata; tuples become lists."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        where = f"{type(obj).__name__}.{f.name}"
        value = coerce(getattr(obj, f.name), hints[f.name], where)
        _check_meta(value, f, where)
        object.__setattr__(obj, f.name, value)


def _check_meta(value: Any, f: Field, where: str) -> None:
    meta = f.metadata
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item is None or is_options(type(item)):
            continue
        if meta.get("choices") is not None and item not in meta["choices"]:
            allowed = ", ".join(repr(c) for c in meta["choices"])
            raise OptionError(where, f"{item!r} is not allowed; choose from {allowed}")
        if meta.get("min") is not None and isinstance(item, (int, float)) and item < meta["min"]:
            raise OptionError(where, f"{item!r} is too small; must be >= {meta['min']}")
        if meta.get("max") is not None and isinstance(item, (int, float)) and item > meta["max"]:
            raise OptionError(where, f"{item!r} is too large; must be <= {meta['max']}")
    if value is not None and meta.get("check") is not None and (problem := meta["check"](value)):
        raise OptionError(where, problem)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` (YAML/JSON values and tuples accepted), or an :class:`OptionError`."""
    origin = typing.get_origin(tp)
    if is_options(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise OptionError(where, f"expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except OptionError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise OptionError(where, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise OptionError(where, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise OptionError(where, f"expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise OptionError(
                where, f"{value!r} is not allowed; choose from {', '.join(map(repr, typing.get_args(tp)))}"
            )
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise OptionError(where, f"expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or (tp is int and int(value) != value):
            raise OptionError(where, f"expected {tp.__name__}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise OptionError(where, f"expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build options ``cls`` from a mapping; unknown keys and bad values name ``where`` and the key."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise OptionError(where, f"unknown key(s) {unknown}; valid keys: {sorted(names)}")
    hints = _hints(cls)
    values = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except OptionError as exc:  # raised by __post_init__ under the class name: say where in the config instead
        field = exc.field.split(".", 1)[1] if "." in exc.field else exc.field
        raise OptionError(f"{where}.{field}", exc.message) from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def numbers_fields(obj: Any, scope: str | None = None) -> dict[str, Any]:
    """The fields of ``obj`` that change the numbers (in ``scope``; ``"all"``: in any scope), nested options
    flattened with dots; those declared ``keyed_default=False`` only when set away from their default."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if is_options(type(value)):
            out.update({f"{f.name}.{k}": v for k, v in numbers_fields(value, scope).items()})
        elif _keyed(f, value, scope):
            out[f.name] = value
    return out


def _keyed(f: Field, value: Any, scope: str | None) -> bool:
    """Whether field ``f`` holding ``value`` is part of the fingerprint in ``scope``."""
    numbers = f.metadata.get("numbers")
    if not (numbers is True or (numbers and scope in (numbers, "all"))):
        return False
    return f.metadata.get("keyed_default", True) or value != f.default


def digest(obj: Any, length: int = 16) -> str:
    """A stable short hash of JSON-able data (sorted keys), the same on every machine and Python version."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def fingerprint(obj: Any, scope: str | None = None) -> str:
    """Hash of the fields of ``obj`` that change the numbers (see :func:`numbers_fields`)."""
    return digest({"class": type(obj).__name__, **numbers_fields(obj, scope)})


def option_paths(cls: type, prefix: str = "") -> Iterator[tuple[str, Field, Any]]:
    """``(dotted path, field, type)`` for every leaf option of ``cls``, nested options walked depth first."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if is_options(hints[f.name]):
            yield from option_paths(hints[f.name], f"{path}.")
        else:
            yield path, f, hints[f.name]


def describe(f: Field, tp: Any) -> str:
    """One line for ``--help``-like listings: type, default, allowed values or range, and the help text."""
    meta = f.metadata
    default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    parts = [str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__, f"default {default!r}"]
    if meta.get("choices") is not None:
        parts.append("one of " + "|".join(str(c) for c in meta["choices"]))
    if meta.get("min") is not None or meta.get("max") is not None:
        parts.append(f"range [{meta.get('min', '')}, {meta.get('max') if meta.get('max') is not None else ''}]")
    if meta.get("numbers"):
        parts.append("changes the numbers" if meta["numbers"] is True else f"changes the {meta['numbers']} numbers")
    return f"{meta.get('help', '')} ({'; '.join(parts)})"
