"""Declared, typed problem settings: what ``--set KEY=VALUE`` may change, and how it is checked.

A problem declares each of its settings once (``Setting``): name, kind, default, smoke value,
allowed range or choices, one-line meaning. ``resolve`` turns raw ``--set`` strings (or values
already typed by a Python caller) into a validated configuration before any training, so a bad
value is one ``InvalidOptionError`` naming the setting, the value and what is allowed.

Kinds: ``int``, ``float`` (finite), ``bool``, ``str`` (with ``choices`` when they are fixed),
``path``, and the lists ``ints``, ``floats``, ``strs`` (``[a, b]``, ``a,b`` or ``a/b``) and
``points`` (``[[x, y], ...]``, or one of the named point sets). A range bounds every element of
a list.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import InvalidOptionError

KINDS = ("int", "float", "bool", "str", "path", "ints", "floats", "strs", "points")
_SAME = object()
_TYPE_NAMES = {"int": "an integer", "float": "a finite number", "bool": "true or false",
               "str": "a string", "path": "a path", "ints": "a list of integers",
               "floats": "a list of numbers", "strs": "a list of names",
               "points": "a list of [x, y] points"}


@dataclass(frozen=True)
class Setting:
    """One setting of a problem.

    ``low``/``high`` bound the value (each element of a list); ``open_low``/``open_high`` make a
    bound strict. ``optional``: ``None`` (``--set KEY=none``) is allowed. ``named``: for
    ``points``, sets of points chosen by name (``--set starts=paper``). ``smoke``: the value in
    the smoke configuration (the default when not given). ``neutral``: a setting added after
    runs were recorded; at its default it is left out of a run's key (``essential_config``), so
    those records stay valid.
    """

    name: str
    kind: str
    default: Any
    meaning: str
    smoke: Any = _SAME
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False
    named: Mapping[str, Any] = field(default_factory=dict)
    neutral: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"setting {self.name}: unknown kind {self.kind!r}")

    def value(self, smoke: bool = False) -> Any:
        """A fresh copy of the default (or smoke) value."""
        value = self.default if not smoke or self.smoke is _SAME else self.smoke
        return _copy(value)

    @property
    def allowed(self) -> str:
        """What is allowed, in words: ``an integer >= 1``, ``one of code, full_batch``..."""
        if self.choices is not None:
            text = f"one of {', '.join(self.choices)}"
        else:
            text = _TYPE_NAMES[self.kind]
            if self.kind == "points" and self.named:
                text += f" or one of {', '.join(self.named)}"
            bounds = self._bounds()
            if bounds:
                text += (" with every element " if self.kind in ("ints", "floats")
                         else " ") + bounds
        if self.kind in ("ints", "floats", "points"):
            text = "a non-empty " + text.removeprefix("a ")
        return text + (", or none" if self.optional else "")

    def _bounds(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.open_high else '<='} {self.high:g}"
        return ""

    def describe(self) -> str:
        """One line: name, meaning, allowed values, default."""
        return (f"{self.name}: {self.meaning} ({self.allowed}; default "
                f"{_show(self.default)})")

    # -- parsing and checking
    def parse(self, raw: Any, problem: str = "") -> Any:
        """``raw`` (a CLI string or a typed value) as a valid value of this setting."""
        where = f"{problem}: " if problem else ""
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null")
                           and self.kind not in ("str",)):
            if self.optional:
                return None
            raise InvalidOptionError(f"{where}{self.name} cannot be none; it must be "
                                     f"{self.allowed}")
        try:
            value = self._convert(raw)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise InvalidOptionError(
                f"{where}{self.name}={_show(raw)} is not {_TYPE_NAMES[self.kind]}: "
                f"{self.name} ({self.meaning}) must be {self.allowed}") from None
        self._check(value, raw, where)
        return value

    def _convert(self, raw: Any) -> Any:
        kind = self.kind
        if kind in ("str", "path"):
            if not isinstance(raw, str):
                raise TypeError
            return raw.strip().strip("'\"") if kind == "str" else raw
        if kind == "bool":
            return _bool(raw)
        if kind in ("int", "float"):
            return _number(raw, kind)
        if kind == "points":
            if isinstance(raw, str) and raw.strip() in self.named:
                return _copy(self.named[raw.strip()])
            items = _literal(raw)
            points = []
            for item in items:
                if isinstance(item, (str, bytes)) or len(item) != 2:
                    raise ValueError
                points.append([_number(v, "float") for v in item])
            if not points:
                raise ValueError
            return points
        items = _list(raw)
        element = {"ints": "int", "floats": "float", "strs": "str"}[kind]
        if element == "str":
            if not all(isinstance(v, str) or _is_number(v) for v in items):
                raise TypeError
            return [str(v).strip().strip("'\"") for v in items]
        values = [_number(v, element) for v in items]
        if not values:
            raise ValueError
        return values

    def _check(self, value: Any, raw: Any, where: str) -> None:
        if self.choices is not None and value not in self.choices:
            raise InvalidOptionError(f"{where}{self.name}={_show(raw)} is not allowed: "
                                     f"{self.name} ({self.meaning}) must be {self.allowed}")
        elements = value if self.kind in ("ints", "floats") else (
            [] if self.kind not in ("int", "float") else [value])
        for element in elements:
            if not self._inside(element):
                raise InvalidOptionError(
                    f"{where}{self.name}={_show(raw)} is out of range: {self.name} "
                    f"({self.meaning}) must be {self.allowed}")

    def _inside(self, x: float) -> bool:
        if self.low is not None and (x < self.low or (self.open_low and x == self.low)):
            return False
        return not (self.high is not None
                    and (x > self.high or (self.open_high and x == self.high)))


def resolve(settings: Sequence[Setting], overrides: Mapping[str, Any] | None, smoke: bool,
            problem: str) -> dict[str, Any]:
    """The default (or smoke) values with ``overrides`` parsed and checked; unknown names are
    refused with the list of the problem's settings."""
    by_name = {setting.name: setting for setting in settings}
    config = {setting.name: setting.value(smoke) for setting in settings}
    for key, raw in (overrides or {}).items():
        if key not in by_name:
            raise InvalidOptionError(f"{problem} has no setting {key!r}; its settings are: "
                                     f"{', '.join(sorted(by_name))}")
        config[key] = by_name[key].parse(raw, problem)
    return config


# ---------------------------------------------------------------------------------- helpers
def _copy(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        lowered = raw.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
    raise ValueError


def _number(raw: Any, kind: str) -> int | float:
    if isinstance(raw, bool):
        raise TypeError
    if isinstance(raw, str):
        text = raw.strip()
        value: int | float = int(text) if kind == "int" else float(text)
    elif kind == "int" and isinstance(raw, int):
        value = raw
    elif kind == "int" and isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    elif kind == "float" and _is_number(raw):
        value = float(raw)
    else:
        raise TypeError
    if kind == "float" and not math.isfinite(value):
        raise ValueError
    return value


def _literal(raw: Any) -> list[Any]:
    if isinstance(raw, str):
        raw = ast.literal_eval(raw.strip())
    if not isinstance(raw, (list, tuple)):
        raise TypeError
    return list(raw)


def _list(raw: Any) -> list[Any]:
    """A list from ``[a, b]``, ``a,b``, ``a/b`` or a Python sequence."""
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if not isinstance(raw, str):
        return [raw]
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [part.strip() for part in re.split(r"[/,]", text) if part.strip()]
