"""Linear scalarization: D = J^T w with fixed weights (``docs/methods.md#sum``,
``docs/methods.md#mean``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ShapeError
from .base import Context, Diagnostics, LossWeighting
from .options import Option
from .registry import register


@register
class Sum(LossWeighting):
    """Sum of the task gradients, D = sum_i w_i g_i: backpropagate sum_i w_i L_i.

    Option ``weights``: fixed static weights (default all 1), e.g. a grid of them (GradOPS
    Appendix C.3). The weights do not depend on the gradients, so the engine does one ordinary
    backward pass.

    Fixed loss weights, whatever the losses:

    >>> import deconflict
    >>> deconflict.Sum(weights=[1.0, 0.5]).weights(losses=[1.0, 2.0])
    tensor([1.0000, 0.5000], dtype=torch.float64)
    """

    name = "sum"
    summary = "Sum of the task losses (weights 1, or fixed static weights)"
    paper = "Linear scalarization (the standard multi-task baseline)"
    family = "scalarization"

    # ``weights`` is the method that computes them: the option lives in ``weights_``.
    OPTIONS = (
        Option("weights", "float", None, "fixed non-negative loss weights, one per task (none: "
               "all 1)", low=0.0, nullable=True, shape="list", attribute="weights_"),
    )

    weights_: tuple[float, ...] | None

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        self._set_options(weights=weights)

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        if self.weights_ is None:
            return np.ones(context.num_tasks), {}
        if len(self.weights_) != context.num_tasks:
            raise ShapeError(f"{self.name}: {len(self.weights_)} weights for "
                             f"{context.num_tasks} tasks")
        return np.array(self.weights_), {}

    def loss_weights_array(self, num_tasks: int, losses: Any = None) -> np.ndarray:
        # As Mean's: all ones needs no context without losses to validate.
        if losses is None and self.weights_ is None and num_tasks >= 1:
            return np.ones(num_tasks)
        return super().loss_weights_array(num_tasks, losses)


@register
class Mean(LossWeighting):
    """Mean of the task gradients, D = (1/T) sum_i g_i: backpropagate the mean loss.

    Uniform loss weights 1/T:

    >>> import deconflict
    >>> deconflict.Mean().weights(losses=[1.0, 2.0])
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    name = "mean"
    summary = "Mean of the task losses (uniform weights 1/T)"
    paper = "Linear scalarization (the standard multi-task baseline)"
    family = "scalarization"

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        return np.full(context.num_tasks, 1.0 / context.num_tasks), {}

    def loss_weights_array(self, num_tasks: int, losses: Any = None) -> np.ndarray:
        # Without losses to validate, 1/T needs no context: most of the per-call cost of
        # ``aggregate(J, "mean")`` at small d was building one.
        if losses is None and num_tasks >= 1:
            return np.full(num_tasks, 1.0 / num_tasks)
        return super().loss_weights_array(num_tasks, losses)
