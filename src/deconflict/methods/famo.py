"""FAMO: fast adaptive multitask optimization (Liu et al., NeurIPS 2023; ``docs/methods.md#famo``).

Keeps task logits xi (weights z = softmax(xi)) and, at each step, balances the tasks' *rates* of
loss decrease at the cost of one backward pass and one extra forward pass:

1. with l_i = max(L_i - L*_i, 0) + 1e-8, backpropagate sum_i (z_i / C) log l_i where
   C = sum_j z_j / l_j: the weights on the raw losses are c_i = (z_i / l_i) / sum_j (z_j / l_j),
   which sum to 1;
2. after the optimizer step, recompute the losses on the same batch and pass them to
   ``after_step``: with delta_i = log l_i(t) - log l_i(t+1), xi takes an Adam descent step (weight
   decay gamma) with gradient z * (delta - z . delta), lowering the weight of the tasks that
   improved most.

Usage::

    record = deconflict.backward(losses, shared, famo)
    optimizer.step()
    with torch.no_grad():
        famo.after_step(compute_losses(model, batch))

Calling ``backward`` again without ``after_step`` raises an error. Options: ``w_lr`` = 0.025,
``gamma`` = 1e-3 (LibMTL; the FAMO repository's argparse default is 1e-2 and its scripts use
1e-3 or 1e-2), ``min_losses`` L* = 0 (a number or one per task).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidOptionError, ShapeError
from ..linalg import to_numpy
from ._task_parameters import ADAM, TaskParameters
from .base import Context, Diagnostics, LossWeighting
from .options import Option
from .registry import register
from .state import StateField

_EPS = 1e-8


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@register
class FAMO(LossWeighting):
    """FAMO (NeurIPS 2023); see the module docstring. Needs ``losses``, and ``after_step`` after
    every optimizer step (an ``AfterStep`` method).

    Diagnostics: ``task_weights`` (z = softmax(xi)).

    The weights, then the losses after the optimizer step: the first task improved, so its
    share z falls below 1/2 (its weight on the raw loss, z_i / l_i normalized, also sees l fall):

    >>> import deconflict
    >>> famo = deconflict.FAMO()
    >>> famo.weights(losses=[1.0, 2.0])
    tensor([0.6667, 0.3333], dtype=torch.float64)
    >>> famo.after_step([0.5, 2.0])
    >>> weights, diagnostics = famo.weights_with_diagnostics(losses=[0.5, 2.0])
    >>> diagnostics["task_weights"]
    tensor([0.4875, 0.5125], dtype=torch.float64)
    >>> weights
    tensor([0.7919, 0.2081], dtype=torch.float64)
    """

    name = "famo"
    summary = "Balance the tasks' log-loss decrease rates with learned logits (O(1) per step)"
    paper = "Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023"
    stateful = True

    OPTIONS = (
        Option("w_lr", "float", 0.025, "learning rate of the task logits", low=0.0),
        Option("gamma", "float", 1e-3, "weight decay of the task logits", low=0.0),
        Option("min_losses", "float", 0.0, "the lowest loss values L* (one for all tasks or "
               "one per task)", shape="scalar_or_list"),
    )

    w_lr: float
    gamma: float
    min_losses: float | tuple[float, ...]

    STATE = (StateField("logits", ADAM), StateField("pending"))

    logits: TaskParameters | None  # xi, with its Adam state
    pending: np.ndarray | None  # l(t), waiting for after_step

    def __init__(
        self, w_lr: float = 0.025, gamma: float = 1e-3,
        min_losses: float | Sequence[float] = 0.0,
    ) -> None:
        self._set_options(w_lr=w_lr, gamma=gamma, min_losses=min_losses)

    @property
    def needs_losses(self) -> bool:
        return True

    def _shifted(self, losses: np.ndarray) -> np.ndarray:
        floor = np.asarray(self.min_losses, dtype=np.float64)
        if floor.ndim and floor.size != losses.size:
            raise ShapeError(f"{self.name}: {floor.size} min_losses for {losses.size} tasks")
        return np.maximum(losses - floor, 0.0) + _EPS

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        losses = context.losses
        assert losses is not None
        if self.pending is not None:
            raise InvalidOptionError(
                "famo needs the losses after the optimizer step: call method.after_step(losses) "
                "after optimizer.step(), before the next backward"
            )
        T = losses.size
        if self.logits is None:
            self.logits = TaskParameters(np.zeros(T), self.w_lr, self.gamma)
        self.logits.check_tasks(self.name, T)
        z = softmax(self.logits.values)
        shifted = self._shifted(losses)
        ratio = z / shifted
        self.pending = shifted
        return ratio / ratio.sum(), {"task_weights": z}

    def after_step(self, losses: Any) -> None:
        """Update the logits from the losses on the same batch after the optimizer step."""
        if self.pending is None or self.logits is None:
            raise InvalidOptionError("famo.after_step was called without a backward before it")
        new = to_numpy(losses).reshape(-1)
        if new.shape != self.pending.shape or not np.isfinite(new).all():
            raise ShapeError(f"famo.after_step needs {self.pending.size} finite losses, got "
                             f"{new.tolist()}")
        delta = np.log(self.pending) - np.log(self._shifted(new))
        z = softmax(self.logits.values)
        self.logits.step(z * (delta - z @ delta))
        self.pending = None
