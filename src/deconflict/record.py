"""What one ``backward`` call did: ``StepRecord``, and ``Communication`` for distributed steps.

Records are plain values (float64 CPU tensors, numbers): the diagnostics read them, and nothing
here imports the engine, so the engine, the distributed reducers and the diagnostics all import
this module and none of them imports another for a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Communication:
    """What one distributed ``backward`` call exchanged: this rank's contribution.

    Elements and bytes are the payload each rank puts into the collectives (a ring all-reduce
    moves about 2 (R - 1) / R times its payload in and out of each rank; an all-gather receives
    R - 1 times it).

    >>> Communication("exact", 2, all_reduce_bytes=96, broadcast_bytes=4).bytes
    100
    """

    mode: str
    world_size: int
    all_reduce_elements: int = 0
    all_reduce_bytes: int = 0
    all_gather_elements: int = 0
    all_gather_bytes: int = 0
    broadcast_bytes: int = 0
    collectives: int = 0

    @property
    def bytes(self) -> int:
        """The total payload in bytes."""
        return self.all_reduce_bytes + self.all_gather_bytes + self.broadcast_bytes


@dataclass(frozen=True)
class StepRecord:
    """What one call to ``backward`` did, for logging (all tensors float64, on the CPU).

    In the notation of ``docs/methods.md#notation`` (J the task gradients, M = J J^T, c the
    weights, D = J^T c the shared update):

    - ``weights``: c (T,) when the shared update is J^T c (None for block and Jacobian methods,
      whose weights are in the diagnostics or do not exist);
    - ``losses``: the T loss values;
    - ``gramian``: M = J J^T, or None when the method needed no per-task gradients. With
      ``combinations`` (CAGrad-Fast), the Gramian of the combined losses A L instead;
    - ``diagnostics``: the method's own (see its docstring);
    - ``mode``: "sequential", "batched", "gramian", or "losses" (one weighted backward pass);
    - ``features``: whether the gradients were taken w.r.t. the shared features
      (``docs/methods.md#representation-mode``);
    - ``layer_gramians``: each shared layer's Gramian M^(k) (a module's weight and bias
      together; M = sum_k M^(k)), keyed by the module's name; empty without a Gramian;
    - ``update_products``: J D, each differentiated row's gradient dotted with the shared update
      D (None without a Gramian); ``update_sq_norm``: ||D||^2;
    - ``skipped``: a GradScaler overflow (``backward(..., scaler=)``): no update was computed,
      ``.grad`` holds infinity so that ``scaler.step`` skips the step; the reason is
      ``diagnostics["overflow"]``;
    - ``communication``: with ``distributed=``, what this rank exchanged (``Communication``).

    Conflict diagnostics (``deconflict.diagnostics``) are computed from these, at O(T^2) cost.

    >>> import torch
    >>> record = StepRecord(weights=None, losses=torch.ones(3),
    ...                     gramian=torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 1]]))
    >>> record.conflicting_pairs
    [(0, 1)]
    """

    weights: Tensor | None
    losses: Tensor
    gramian: Tensor | None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    mode: str = "sequential"
    combinations: Tensor | None = None
    features: bool = False
    layer_gramians: dict[str, Tensor] = field(default_factory=dict)
    update_products: Tensor | None = None
    update_sq_norm: float | None = None
    skipped: bool = False
    communication: Communication | None = None

    @property
    def conflicting_pairs(self) -> list[tuple[int, int]]:
        """Pairs (i, j), i < j, whose gradients conflict (M_ij < 0); empty without a Gramian."""
        if self.gramian is None or self.combinations is not None:
            return []
        rows, cols = torch.nonzero(torch.triu(self.gramian < 0, diagonal=1), as_tuple=True)
        return list(zip(rows.tolist(), cols.tolist(), strict=True))
