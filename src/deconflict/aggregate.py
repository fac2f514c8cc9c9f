"""``aggregate(J, method)``: the update for a Jacobian already in hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .engine import resolve_method
from .methods.base import Method


def aggregate(
    jacobian: Tensor, method: Method | str, *, losses: Any = None,
    block_sizes: Sequence[int] | None = None,
) -> Tensor:
    """The update (d,) of ``method`` for a T x d Jacobian J, in J's dtype.

    For most methods it is J^T c, with the Gramian and the combination accumulated in float64.
    ``losses`` (T values) is passed to methods that use them. ``block_sizes`` splits J's columns
    into parameter blocks for methods that work per block (GradVac per parameter, GradDrop,
    DB-MTL); by default J is one block.
    """
    return resolve_method(method).aggregate(jacobian, losses=losses, block_sizes=block_sizes)
