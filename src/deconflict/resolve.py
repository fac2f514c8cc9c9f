"""A method instance from an instance or a registry name: shared by ``aggregate`` (pure math on
a Jacobian in hand) and ``backward`` (the autograd engine), so that neither imports the other."""

from __future__ import annotations

from .errors import InvalidOptionError
from .methods.base import Method
from .methods.registry import method_class


def resolve_method(method: Method | str) -> Method:
    """A Method instance from an instance or a registry name (stateless methods only).

    A stateful method given by name would start from a fresh state at every call, silently
    forgetting what it learnt: it must be built once and passed as an instance.

    >>> resolve_method("upgrad")
    UPGrad(...)
    >>> resolve_method("famo")
    Traceback (most recent call last):
    ...
    deconflict.errors.InvalidOptionError: famo keeps state across steps: ...
    """
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        cls = method_class(method)
        if cls.stateful:
            raise InvalidOptionError(
                f"{cls.name} keeps state across steps: create it once, outside the training loop, "
                f"with deconflict.get({cls.name!r}) and pass that instance"
            )
        return cls()
    raise TypeError(f"method must be a deconflict Method or a method name, got {type(method)!r}")
