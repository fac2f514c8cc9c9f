"""A method's state, declared once: which attributes hold it and how each one is saved.

A stateful method lists its state in ``Method.STATE`` (``StateField``: the attribute, how it is
saved, the key in ``state_dict()``). ``Method.state_dict`` / ``load_state_dict`` / ``reset``
read that declaration, so checkpoints, the engine's copy of the state around a step and the
distributed broadcast of rank 0's state need nothing method-specific.

A saved state holds only tensors, Python numbers, None, lists and dicts: ``torch.load`` reads it
back with ``weights_only=True``, and float64 arrays round-trip through float64 tensors exactly.
``state_dict()`` is a snapshot: nothing in it aliases the live state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidOptionError
from ..linalg import to_numpy


class Codec(ABC):
    """How one kind of state value is saved and restored."""

    def initial(self) -> Any:
        """The value of a fresh instance (before any step)."""
        return None

    @abstractmethod
    def save(self, value: Any) -> Any:
        """A snapshot of ``value`` made of tensors, numbers, None, lists and dicts."""

    @abstractmethod
    def load(self, saved: Any, fresh: Any, label: str) -> Any:
        """The value for ``saved``; ``fresh`` is the attribute's value after ``reset()``
        (a seeded generator, say), ``label`` names the state entry in error messages."""


class _Number(Codec):
    """An int (a step count): saved as it is."""

    def initial(self) -> int:
        return 0

    def save(self, value: Any) -> Any:
        return value

    def load(self, saved: Any, fresh: Any, label: str) -> Any:
        return int(saved)


class _Array(Codec):
    """A float64 NumPy array, or None: saved as a tensor of the same values."""

    def save(self, value: np.ndarray | None) -> Tensor | None:
        return None if value is None else torch.from_numpy(np.array(value, copy=True))

    def load(self, saved: Any, fresh: Any, label: str) -> np.ndarray | None:
        return None if saved is None else to_numpy(saved)


class _Arrays(Codec):
    """A list of float64 arrays of one shape (a history): one tensor, stacked along dim 0
    (a single copy: a list of tensors costs a conversion per item, every step the engine
    snapshots the state)."""

    def initial(self) -> list[np.ndarray]:
        return []

    def save(self, value: list[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack(value)) if value else torch.zeros(0, dtype=torch.float64)

    def load(self, saved: Any, fresh: Any, label: str) -> list[np.ndarray]:
        if isinstance(saved, (list, tuple)):  # one array per item
            return [to_numpy(item) for item in saved]
        return list(to_numpy(saved))


class _Tensors(Codec):
    """A list of tensors (kept in their dtype and device), or None: cloned."""

    def save(self, value: list[Tensor] | None) -> list[Tensor] | None:
        return None if value is None else [item.detach().clone() for item in value]

    def load(self, saved: Any, fresh: Any, label: str) -> list[Tensor] | None:
        return None if saved is None else [item.detach().clone() for item in saved]


class _Generator(Codec):
    """A private ``torch.Generator`` (seeded methods), or None for PyTorch's global RNG.

    The fresh value comes from the seed; loading sets its state. A method without a seed
    draws from the global RNG, whose state the caller checkpoints, so it refuses a saved one.
    """

    def save(self, value: torch.Generator | None) -> Tensor | None:
        return None if value is None else value.get_state()

    def load(self, saved: Any, fresh: Any, label: str) -> torch.Generator | None:
        if saved is None:
            return fresh
        if fresh is None:
            raise InvalidOptionError(f"{label}: this method has no seed, so it draws from "
                                     "PyTorch's global RNG and keeps no generator state")
        fresh.set_state(saved)
        return fresh


@dataclass(frozen=True)
class Custom(Codec):
    """A codec from two functions, for a state value of the method's own type."""

    to_saved: Callable[[Any], Any]
    from_saved: Callable[[Any], Any]

    def save(self, value: Any) -> Any:
        return None if value is None else self.to_saved(value)

    def load(self, saved: Any, fresh: Any, label: str) -> Any:
        return None if saved is None else self.from_saved(saved)


NUMBER: Codec = _Number()
ARRAY: Codec = _Array()
ARRAYS: Codec = _Arrays()
TENSORS: Codec = _Tensors()
GENERATOR: Codec = _Generator()


@dataclass(frozen=True)
class StateField:
    """One attribute of a method's state: ``attribute`` on the instance, saved under ``key``
    (default: the attribute's name) with ``codec``."""

    attribute: str
    codec: Codec = ARRAY
    key: str | None = None

    @property
    def saved_as(self) -> str:
        return self.key or self.attribute


def cloned(value: Any) -> Any:
    """A deep copy of nested dicts and lists of tensors (an optimizer's ``state_dict``)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: cloned(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cloned(item) for item in value)
    return value
