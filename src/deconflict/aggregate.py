"""``aggregate(J, method)``: the update J^T c for a Jacobian already in hand."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .engine import resolve_method
from .methods.base import Method


def aggregate(jacobian: Tensor, method: Method | str, *, losses: Any = None) -> Tensor:
    """The update D = J^T c (d,) of ``method`` for a T x d Jacobian J, in J's dtype.

    The Gramian and the combination are accumulated in float64. ``losses`` (T values) is passed
    to methods that use them (the tensioner, MGDA's loss normalizers).
    """
    return resolve_method(method).aggregate(jacobian, losses=losses)
