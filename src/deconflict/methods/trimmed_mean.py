"""Coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018; docs/methods.md#trimmed_mean).

For every coordinate k, sort the T values (g_1)_k, ..., (g_T)_k, drop the ``trim`` largest and
the ``trim`` smallest, and average the remaining T - 2 trim:

    D_k = 1 / (T - 2 b) * sum of the values of rank b + 1 .. T - b   (b = ``trim``).

Each coordinate keeps its own subset of tasks, so D is not J^T c for one weight vector: a
``JacobianAggregator``, which needs J itself. Needs T >= 2 trim + 1 (ShapeError otherwise).
The paper trims a fraction beta of the values; here, as in TorchJD, the count b = beta T.
Default b = 0 (the plain mean; TorchJD requires b). The update is positively homogeneous and
independent of the task order, in every engine mode that provides J (not the Gramian mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ShapeError
from .base import Diagnostics, JacobianAggregator
from .options import Option
from .registry import register


@register
class TrimmedMean(JacobianAggregator):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018); see the module docstring.

    Diagnostics: ``kept`` (the number of values averaged per coordinate, T - 2 trim).

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, -9.0], [2.0, 0.0], [30.0, 1.0]])
    >>> deconflict.aggregate(J, TrimmedMean(trim=1))
    tensor([2., 0.])
    """

    name = "trimmed_mean"
    summary = "Per coordinate, the mean of the task gradients without the extreme values"
    paper = ("Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical "
             "Rates, ICML 2018")
    family = "scalarization"

    OPTIONS = (
        Option("trim", "int", 0, "how many of the largest and of the smallest values each "
               "coordinate drops (needs T >= 2 trim + 1)", low=0),
    )

    trim: int

    def __init__(self, trim: int = 0) -> None:
        self._set_options(trim=trim)

    @property
    def scales_task_gradients(self) -> bool:
        return False  # each coordinate keeps its own tasks

    def combine_jacobian(
        self, blocks: Sequence[Tensor], *, losses: np.ndarray | None,
        features: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], Diagnostics]:
        updates = []
        for block in blocks:
            T = block.shape[0]
            if T < 2 * self.trim + 1:
                raise ShapeError(f"{self.name} needs at least 2 trim + 1 = {2 * self.trim + 1} "
                                 f"task gradients, got {T}")
            ordered = torch.sort(block, dim=0).values
            updates.append(ordered[self.trim:T - self.trim].mean(dim=0).reshape(-1))
        kept = blocks[0].shape[0] - 2 * self.trim if blocks else 0
        return updates, {"kept": kept}
