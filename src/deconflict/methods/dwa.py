"""DWA: dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019; ``docs/methods.md#dwa``).

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

from typing import Literal

import numpy as np

from ..errors import ShapeError
from .base import Context, Diagnostics, LossWeighting
from .options import Option
from .registry import register
from .state import ARRAYS, NUMBER, StateField

_TINY = 1e-12


def dwa_weights(latest: np.ndarray, earlier: np.ndarray, tau: float) -> np.ndarray:
    """T softmax(w / tau) with w = latest / earlier (guarded against zero means)."""
    ratio = latest / np.maximum(earlier, _TINY)
    scaled = ratio / tau
    exp = np.exp(scaled - scaled.max())
    return latest.size * exp / exp.sum()


@register
class DWA(LossWeighting):
    """Dynamic weight average; see the module docstring. Needs ``losses``; in epoch mode
    without ``steps_per_epoch``, ``end_epoch()`` at the end of every epoch (an ``EpochEnd``
    method).

    Diagnostics: ``ratios`` (w_i, once available).

    One step per epoch; once two epoch means exist, the task whose loss fell less gains weight:

    >>> import deconflict
    >>> dwa = deconflict.DWA(steps_per_epoch=1)
    >>> for losses in ([1.0, 2.0], [0.5, 2.0]):
    ...     _ = dwa.weights(losses=losses)
    >>> dwa.weights(losses=[0.25, 2.0])
    tensor([0.8756, 1.1244], dtype=torch.float64)
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

    tau: float
    mode: str
    steps_per_epoch: int | None
    window: int

    STATE = (StateField("epoch_sum"), StateField("epoch_steps", NUMBER),
             StateField("history", ARRAYS), StateField("recent", ARRAYS))

    epoch_sum: np.ndarray | None  # the losses summed over the current epoch
    epoch_steps: int
    history: list[np.ndarray]  # the latest two epoch means, oldest first
    recent: list[np.ndarray]  # mode window: the losses of the last 2 * window steps

    def __init__(
        self, tau: float = 2.0, mode: Literal["epoch", "window"] = "epoch",
        steps_per_epoch: int | None = None, window: int = 25,
    ) -> None:
        self._set_options(tau=tau, mode=mode, steps_per_epoch=steps_per_epoch, window=window)

    @property
    def needs_losses(self) -> bool:
        return True

    def end_epoch(self) -> None:
        """Close the current epoch: its mean loss becomes the latest average."""
        if self.epoch_steps and self.epoch_sum is not None:
            self.history = [*self.history, self.epoch_sum / self.epoch_steps][-2:]
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
            self.recent = [*self.recent, losses.copy()][-2 * self.window:]
        return weights, diagnostics
