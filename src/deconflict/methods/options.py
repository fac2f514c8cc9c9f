"""Method options, declared once: name, type, default, range or choices, one line of help.

Each method lists its constructor's keyword arguments as a tuple of ``Option`` (its ``OPTIONS``).
From that one declaration come the validation in the constructor (``Option.validate``, through
``Method._set_options``), ``Method.options()`` and the repr, the parsing of command-line strings
by type (``Option.parse``, ``parse_options``) and what ``deconflict methods NAME`` shows
(``Option.describe``). The class annotates each option's attribute with the type ``validate``
returns (``float``, ``tuple[float, ...] | None``, ...), for the type checker; tests check the
constructor's signature and those annotations against the declaration. Pure Python: no tensors
here.

Types: ``"float"`` (finite, optionally in a range whose ends may be open), ``"int"`` (a Python or
NumPy integer, never a bool, optionally bounded below/above), ``"bool"`` and ``"str"``;
``choices`` restricts a value to a tuple. ``nullable``: None is accepted (it usually means "the
method picks", e.g. a seed of None draws from PyTorch's global RNG). ``shape``: ``"scalar"``,
``"list"`` (one value per task, e.g. a preference vector) or ``"scalar_or_list"`` (one value for
every task or one each).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import InvalidOptionError

TYPES = ("float", "int", "bool", "str")
SHAPES = ("scalar", "list", "scalar_or_list")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


@dataclass(frozen=True)
class Option:
    """One keyword argument of a method's constructor (see the module docstring).

    >>> radius = Option("c", "float", 0.5, "radius of the ball", low=0.0)
    >>> radius.validate("cagrad", 1), radius.describe(), radius.flag
    (1.0, 'float in [0, inf)', '--c')
    """

    name: str
    type: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    shape: str = "scalar"
    attribute: str | None = None

    def __post_init__(self) -> None:
        # Declarations are code: a wrong one is the developer's error, raised at import.
        if self.type not in TYPES:
            raise TypeError(f"option {self.name}: type must be one of {TYPES}, got {self.type!r}")
        if self.shape not in SHAPES:
            raise TypeError(f"option {self.name}: shape must be one of {SHAPES}")
        if (self.low is not None or self.high is not None) and self.type not in ("float", "int"):
            raise TypeError(f"option {self.name}: only numbers have a range")
        try:
            self.validate("declaration", self.default)
        except InvalidOptionError as error:
            raise TypeError(f"option {self.name}: the default is refused ({error})") from None

    @property
    def key(self) -> str:
        """The attribute of the instance that holds the value."""
        return self.attribute or self.name

    @property
    def flag(self) -> str:
        """The option as a command-line flag: ``--num-sampled``."""
        return "--" + self.name.replace("_", "-")

    # --------------------------------------------------------------------------- validation
    def validate(self, method: str, value: Any) -> Any:
        """The value as the method keeps it (floats, ints, tuples), or InvalidOptionError."""
        if value is None and self.nullable:
            return None
        if self.shape == "list" or (self.shape == "scalar_or_list" and _is_sequence(value)):
            items = _as_list(value)
            if items is None:
                raise InvalidOptionError(
                    f"{method}: {self.name} must be a list of {self._noun()}s, got {value!r}")
            if not items:
                raise InvalidOptionError(f"{method}: {self.name} must not be empty")
            return tuple(self._scalar(method, f"{self.name}[{k}]", item)
                         for k, item in enumerate(items))
        return self._scalar(method, self.name, value)

    def _scalar(self, method: str, label: str, value: Any) -> Any:
        if self.choices is not None:
            return self._choice(method, label, value)
        if self.type == "float":
            return self._float(method, label, value)
        if self.type == "int":
            return self._int(method, label, value)
        if self.type == "bool":
            if isinstance(value, bool) or (isinstance(value, numbers.Integral)
                                           and value in (0, 1)):
                return bool(value)
            raise InvalidOptionError(f"{method}: {label} must be True or False, got {value!r}")
        if not isinstance(value, str):
            raise InvalidOptionError(f"{method}: {label} must be a string, got {value!r}")
        return value

    def _choice(self, method: str, label: str, value: Any) -> Any:
        assert self.choices is not None
        for choice in self.choices:
            # 1 == True in Python: a bool must not pass for an int choice.
            if value == choice and isinstance(value, bool) == isinstance(choice, bool):
                return choice
        raise InvalidOptionError(
            f"{method}: {label} must be one of {list(self.choices)}, got {value!r}")

    def _float(self, method: str, label: str, value: Any) -> float:
        if isinstance(value, bool):
            raise InvalidOptionError(f"{method}: {label} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidOptionError(
                f"{method}: {label} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise InvalidOptionError(f"{method}: {label} must be finite, got {value!r}")
        if not self._in_range(number):
            if self.low == 0.0 and self.low_open and self.high is None:
                raise InvalidOptionError(f"{method}: {label} must be positive, got {value!r}")
            raise InvalidOptionError(f"{method}: {label} must be in {self._interval()}, got "
                                     f"{value!r}")
        return number

    def _int(self, method: str, label: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                or not self._in_range(int(value)):
            if self.low is not None and self.high is None and not self.low_open:
                wanted = f"an int >= {self.low:g}"
            elif self.low is not None or self.high is not None:
                wanted = f"an int in {self._interval()}"
            else:
                wanted = "an int"
            if self.nullable:
                wanted += " or None"
            raise InvalidOptionError(f"{method}: {label} must be {wanted}, got {value!r}")
        return int(value)

    def _in_range(self, number: float) -> bool:
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        return self.high is None or (number < self.high if self.high_open
                                     else number <= self.high)

    def _interval(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{low}, {high}{right}"

    def _noun(self) -> str:
        return {"float": "number", "int": "integer", "bool": "boolean", "str": "string"}[self.type]

    # ------------------------------------------------------------------------------ parsing
    def parse(self, method: str, text: str) -> Any:
        """A command-line string as a value of the declared type (validated).

        Lists are written ``a/b/c`` (or ``a,b,c`` where no comma separates methods); None is
        ``none`` for the options that accept it.
        """
        text = text.strip()
        if self.nullable and text.lower() in ("none", "null"):
            return None
        if self.shape == "list" or (self.shape == "scalar_or_list" and re.search("[/,]", text)):
            parts = [part.strip() for part in re.split("[/,]", text)]
            if not text or any(not part for part in parts):
                raise InvalidOptionError(f"{method}: {self.name} takes a list written a/b/c, "
                                         f"got {text!r}")
            return self.validate(method, [self._parse_scalar(method, part) for part in parts])
        return self.validate(method, self._parse_scalar(method, text))

    def _parse_scalar(self, method: str, text: str) -> Any:
        wanted = self.type
        if self.choices is not None and all(isinstance(c, int) for c in self.choices):
            wanted = "int"
        try:
            if wanted == "float":
                return float(text)
            if wanted == "int":
                return int(text)
        except ValueError:
            shown = f"one of {list(self.choices)}" if self.choices else f"an {self._noun()}" \
                if wanted == "int" else "a number"
            raise InvalidOptionError(f"{method}: {self.name} takes {shown}, got {text!r}") \
                from None
        if wanted == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise InvalidOptionError(f"{method}: {self.name} takes true or false, got {text!r}")
        return text.strip("'\"")

    # ------------------------------------------------------------------------------ display
    def describe(self) -> str:
        """What values the option takes, in words: ``float in [0, inf)``, ``one of ...``."""
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.type in ("float", "int") and (self.low is not None or self.high is not None):
            text = f"{self.type} in {self._interval()}"
        elif self.type == "float":
            text = "finite float"
        else:
            text = self.type
        if self.shape == "list":
            text = f"list of {text} (a/b/c, one per task)"
        elif self.shape == "scalar_or_list":
            text += ", or one per task (a/b/c)"
        if self.nullable:
            text += ", or none"
        return text


def with_defaults(options: Sequence[Option], **defaults: Any) -> tuple[Option, ...]:
    """The same declarations with other defaults (a subclass that changes a default).

    >>> import deconflict
    >>> with_defaults(deconflict.MGDA.OPTIONS, normalizer="loss+")[0].default
    'loss+'
    """
    unknown = set(defaults) - {option.name for option in options}
    if unknown:
        raise TypeError(f"no options {sorted(unknown)} to give defaults to")
    return tuple(replace(option, default=defaults[option.name]) if option.name in defaults
                 else option for option in options)


def parse_options(method: str, declared: Sequence[Option],
                  texts: Mapping[str, str]) -> dict[str, Any]:
    """Command-line strings by option name -> typed, validated values (unknown names refused).

    >>> import deconflict
    >>> parse_options("cagrad", deconflict.CAGrad.OPTIONS, {"c": "0.4", "rescale": "0"})
    {'c': 0.4, 'rescale': 0}
    """
    by_name = {option.name: option for option in declared}
    values = {}
    for name, text in texts.items():
        key = name.strip().replace("-", "_")
        if key not in by_name:
            listed = ", ".join(by_name) if by_name else "none"
            raise InvalidOptionError(f"{method} does not take option {name!r}; its options are: "
                                     f"{listed}")
        values[key] = by_name[key].parse(method, text)
    return values


def _is_sequence(value: Any) -> bool:
    return not isinstance(value, (str, bytes)) and (
        isinstance(value, Sequence) or hasattr(value, "tolist"))


def _as_list(value: Any) -> list[Any] | None:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # NumPy arrays and tensors
        if not isinstance(value, list):
            return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    flat: list[Any] = []
    for item in value:
        if isinstance(item, (list, tuple)):
            return None
        flat.append(item)
    return flat
