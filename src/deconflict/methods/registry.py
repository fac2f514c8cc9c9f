"""Methods by name: ``get("gradops", alpha=-1)``, ``available()``."""

from __future__ import annotations

import difflib
import re
from typing import Any, TypeVar

from ..errors import InvalidOptionError, UnknownMethodError
from .base import Method

_METHODS: dict[str, type[Method]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: make a Method subclass available under its ``name``."""
    name = cls.name
    if not _NAME.match(name):
        raise ValueError(f"method names are lower snake case, got {name!r}")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered")
    _METHODS[name] = cls
    return cls


def available() -> tuple[str, ...]:
    """The registered method names, sorted.

    >>> import deconflict
    >>> "gradops" in deconflict.available()
    True
    """
    return tuple(sorted(_METHODS))


def method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (hyphens and case are forgiven).

    >>> method_class("CAGrad-Fast").__name__
    'CAGradFast'
    """
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in _METHODS:
        close = difflib.get_close_matches(str(key), _METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"unknown method {name!r}.{hint} Known methods: {', '.join(available())}"
        )
    return _METHODS[key]


def get(name: str, **options: Any) -> Method:
    """A new instance of the method registered under ``name``, built with ``options``.

    >>> import deconflict
    >>> deconflict.get("gradops", alpha=-1)
    GradOPS(alpha=-1.0, gating='per_task', dependence_tol=1e-06)
    """
    cls = method_class(name)
    accepted = [option.name for option in cls.OPTIONS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        listed = ", ".join(accepted) if accepted else "none"
        raise InvalidOptionError(
            f"{cls.name} does not take option(s) {', '.join(unknown)}; its options are: {listed}"
        )
    return cls(**options)
