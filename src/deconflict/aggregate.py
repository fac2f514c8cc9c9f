"""``aggregate(J, method)``: the update for a Jacobian already in hand (no autograd)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .finite import NonFinite
from .methods.base import Method
from .resolve import resolve_method
from .update import compute_update, matrix_update, split_columns


def aggregate(
    jacobian: Tensor, method: Method | str, *, losses: Any = None,
    block_sizes: Sequence[int] | None = None,
) -> Tensor:
    """The update D (d,) of ``method`` for a T x d Jacobian J, in J's dtype.

    For most methods D = J^T c (``docs/methods.md#notation``), with the Gramian M = J J^T and
    the combination accumulated in float64 (``docs/methods.md#gramian``). ``losses`` (T values)
    is passed to methods that use them. ``block_sizes`` splits J's columns into parameter
    blocks for methods that work per block (GradVac per parameter, GradDrop, DB-MTL); by
    default J is one block. A NaN or infinity in J raises ``NonFiniteGradientError`` naming the
    row (``docs/methods.md#non-finite``).

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])
    >>> deconflict.aggregate(J, "mean")
    tensor([0.2500, 0.5000])
    >>> D = deconflict.aggregate(J, "upgrad")
    >>> bool((J @ D >= 0).all())  # UPGrad's update conflicts with no task
    True
    """
    resolved = resolve_method(method)
    if block_sizes is None and isinstance(jacobian, Tensor):
        whole = matrix_update(resolved, jacobian, losses)  # the lean path, where it applies
        if isinstance(whole, NonFinite):
            raise whole.error()
        if whole is not None:
            return whole
    blocks, names = split_columns(jacobian, block_sizes)
    update = compute_update(resolved, blocks, names, names, losses=losses)
    if isinstance(update, NonFinite):
        raise update.error()
    updates = update.materialize(blocks)
    return updates[0] if len(updates) == 1 else torch.cat(updates)
