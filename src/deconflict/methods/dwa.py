"""DWA: dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019; METHODS.md Section 11).

lambda_i(t) = T exp(w_i / tau) / sum_j exp(w_j / tau), with w_i = Lbar_i(t-1) / Lbar_i(t-2) the
ratio of the task's two latest average training losses: a task whose loss falls slowly gets
more weight. lambda = 1 until two averages exist. The weights sum to T (a sum-scale loss).

Averages (``mode``):

- "epoch" (the paper): epoch means of the training losses. Tell the method where epochs end,
  either with ``steps_per_epoch`` or by calling ``end_epoch()``.
- "window" (nash-mtl's variant): the means of the last two windows of ``window`` = 25 steps.
  (nash-mtl also reports mean(lambda * L), i.e. 1/T of this scale.)

Options: ``tau`` = 2.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import numpy as np

from ..errors import ShapeError
from ..linalg import to_numpy
from .base import Context, Diagnostics, LossWeighting
from .options import Option
from .registry import register

_TINY = 1e-12


def dwa_weights(latest: np.ndarray, earlier: np.ndarray, tau: float) -> np.ndarray:
    """T softmax(w / tau) with w = latest / earlier (guarded against zero means)."""
    ratio = latest / np.maximum(earlier, _TINY)
    scaled = ratio / tau
    exp = np.exp(scaled - scaled.max())
    return latest.size * exp / exp.sum()


@register
class DWA(LossWeighting):
    """Dynamic weight average; see the module docstring. Needs ``losses``.

    Diagnostics: ``ratios`` (w_i, once available).
    """

    name = "dwa"
    summary = "Weights from how fast each task's average loss fell: T softmax(ratio / tau)"
    paper = "Liu, Johns & Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019"
    stateful = True

    OPTIONS = (
        Option("tau", "float", 2.0, "temperature of the softmax over the loss ratios",
               low=0.0, low_open=True),
        Option("mode", "str", "epoch", "average the losses per epoch (paper) or over windows "
               "of steps (nash-mtl)", choices=("epoch", "window")),
        Option("steps_per_epoch", "int", None, "mode epoch: steps per epoch (none: the "
               "training loop calls end_epoch())", low=1, nullable=True),
        Option("window", "int", 25, "mode window: steps per window", low=1),
    )

    def __init__(
        self, tau: float = 2.0, mode: Literal["epoch", "window"] = "epoch",
        steps_per_epoch: int | None = None, window: int = 25,
    ) -> None:
        self._set_options(tau=tau, mode=mode, steps_per_epoch=steps_per_epoch, window=window)
        self.reset()

    @property
    def needs_losses(self) -> bool:
        return True

    def reset(self) -> None:
        self.epoch_sum: np.ndarray | None = None
        self.epoch_steps = 0
        self.history: deque[np.ndarray] = deque(maxlen=2)  # latest epoch means, oldest first
        self.recent: deque[np.ndarray] = deque(maxlen=2 * self.window)

    def end_epoch(self) -> None:
        """Close the current epoch: its mean loss becomes the latest average."""
        if self.epoch_steps:
            self.history.append(self.epoch_sum / self.epoch_steps)
        self.epoch_sum, self.epoch_steps = None, 0

    def _averages(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.mode == "epoch":
            return (self.history[1], self.history[0]) if len(self.history) == 2 else None
        if len(self.recent) < 2 * self.window:
            return None
        values = np.array(self.recent)
        return values[self.window:].mean(axis=0), values[:self.window].mean(axis=0)

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        losses = context.losses
        assert losses is not None
        T = losses.size
        seen = self.epoch_sum if self.epoch_sum is not None else (
            self.history[-1] if self.history else (self.recent[-1] if self.recent else None))
        if seen is not None and seen.size != T:
            raise ShapeError(f"this dwa has seen {seen.size} tasks and now gets {T}; call reset()")
        averages = self._averages()
        diagnostics: Diagnostics = {}
        if averages is None:
            weights = np.ones(T)
        else:
            weights = dwa_weights(*averages, self.tau)
            diagnostics["ratios"] = averages[0] / np.maximum(averages[1], _TINY)
        if self.mode == "epoch":
            self.epoch_sum = losses.copy() if self.epoch_sum is None else self.epoch_sum + losses
            self.epoch_steps += 1
            if self.steps_per_epoch is not None and self.epoch_steps == self.steps_per_epoch:
                self.end_epoch()
        else:
            self.recent.append(losses.copy())
        return weights, diagnostics

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch_sum": None if self.epoch_sum is None else self.epoch_sum.copy(),
            "epoch_steps": self.epoch_steps,
            "history": [h.copy() for h in self.history],
            "recent": [r.copy() for r in self.recent],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        if state.get("epoch_sum") is not None:
            self.epoch_sum = to_numpy(state["epoch_sum"])
        self.epoch_steps = int(state.get("epoch_steps", 0))
        self.history.extend(to_numpy(h) for h in state.get("history", []))
        self.recent.extend(to_numpy(r) for r in state.get("recent", []))
