"""Linear scalarization: D = J^T w with fixed weights (METHODS.md Section 1)."""

from __future__ import annotations

import numpy as np

from .base import Context, Diagnostics, LossWeighting
from .registry import register


@register
class Sum(LossWeighting):
    """Sum of the task gradients, D = sum_i g_i: backpropagate sum_i L_i (weights 1).

    The weights do not depend on the gradients, so the engine does one ordinary backward pass.
    """

    name = "sum"
    summary = "Sum of the task losses (uniform weights 1)"
    paper = "Linear scalarization (the standard multi-task baseline)"
    family = "scalarization"

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        return np.ones(context.num_tasks), {}


@register
class Mean(LossWeighting):
    """Mean of the task gradients, D = (1/T) sum_i g_i: backpropagate the mean loss."""

    name = "mean"
    summary = "Mean of the task losses (uniform weights 1/T)"
    paper = "Linear scalarization (the standard multi-task baseline)"
    family = "scalarization"

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        return np.full(context.num_tasks, 1.0 / context.num_tasks), {}
