"""A learnable vector with its own Adam optimizer, for the methods that learn task weights
(UW, IMTL-L, FAMO, GradNorm). Its gradient is computed in closed form by the method, so no
autograd graph is involved; the state (values and Adam moments) checkpoints exactly through the
``ADAM`` codec (``methods.state``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ShapeError
from ..linalg import to_numpy
from .base import Context, Diagnostics, LossWeighting
from .options import Option
from .state import Custom, StateField, cloned


class TaskParameters:
    """T float64 values on the CPU, stepped by Adam with the given gradient."""

    def __init__(self, initial: np.ndarray, lr: float, weight_decay: float = 0.0) -> None:
        self.tensor = torch.tensor(initial, dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.tensor], lr=lr, weight_decay=weight_decay)

    @property
    def values(self) -> np.ndarray:
        return self.tensor.detach().numpy().copy()

    def step(self, gradient: np.ndarray) -> None:
        """One Adam descent step with this gradient."""
        self.tensor.grad = torch.from_numpy(np.asarray(gradient, dtype=np.float64).copy())
        self.optimizer.step()
        self.tensor.grad = None

    def assign(self, values: np.ndarray) -> None:
        """Overwrite the values (e.g. GradNorm's renormalization), keeping the Adam moments."""
        with torch.no_grad():
            self.tensor.copy_(torch.from_numpy(np.asarray(values, dtype=np.float64)))

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.tensor.detach().clone(),
                "optimizer": cloned(self.optimizer.state_dict())}

    @classmethod
    def restore(cls, state: dict[str, Any]) -> TaskParameters:
        """The parameters ``state_dict`` saved; the saved optimizer state carries the learning
        rate and weight decay, which ``load_state_dict`` puts back in its parameter group."""
        restored = cls(to_numpy(state["values"]), lr=0.0)
        restored.optimizer.load_state_dict(cloned(state["optimizer"]))
        return restored

    def check_tasks(self, method: str, T: int) -> None:
        if self.tensor.numel() != T:
            raise ShapeError(f"this {method} has seen {self.tensor.numel()} tasks and now gets "
                             f"{T}; call reset() to start over")


# A ``TaskParameters`` (or None) in a method's STATE.
ADAM = Custom(TaskParameters.state_dict, TaskParameters.restore)


class LearnedWeighting(LossWeighting):
    """Loss weighting with a learnable vector s, stepped by Adam (UW, IMTL-L).

    Subclasses give ``_weights_from(s)`` and the closed-form ``_gradient(s, losses)`` of their
    objective with respect to s. Each call returns the weights at the current s, then takes one
    Adam step on s. Options: ``lr`` (the Adam learning rate), ``init`` (the initial s).
    """

    stateful = True

    OPTIONS = (
        Option("lr", "float", 0.025, "Adam learning rate of s", low=0.0),
        Option("init", "float", 0.0, "the initial value of every s_i"),
    )

    lr: float
    init: float

    STATE = (StateField("parameters", ADAM),)

    parameters: TaskParameters | None

    def __init__(self, lr: float = 0.025, init: float = 0.0) -> None:
        self._set_options(lr=lr, init=init)

    @property
    def needs_losses(self) -> bool:
        return True

    def _weights_from(self, s: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _gradient(self, s: np.ndarray, losses: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        losses = context.losses
        assert losses is not None
        T = losses.size
        if self.parameters is None:
            self.parameters = TaskParameters(np.full(T, self.init), self.lr)
        self.parameters.check_tasks(self.name, T)
        s = self.parameters.values
        weights = self._weights_from(s)
        self.parameters.step(self._gradient(s, losses))
        return weights, {"s": s}
