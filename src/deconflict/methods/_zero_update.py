"""Zero updates that Pareto-stationarity does not explain: recorded per step, warned once.

A zero update is right at a strongly stationary J (a strictly positive combination of the task
gradients vanishes): then no direction improves a task without harming another. Anywhere else
some direction does, and a method that returns zero there does so by its own rule (GradOPS
with every task dependent, IMTL-G with no equal-projection direction, modified gradients that
cancel). Those zeros would repeat step after step without a word; ``note_zero_update`` puts the
cause in the method's diagnostics (``StepRecord.diagnostics["zero_update"]``) and issues a
``ZeroUpdateWarning`` the first time a method instance produces one.
"""

from __future__ import annotations

import sys
import warnings
from types import FrameType
from typing import Any

import numpy as np

from ..errors import ZeroUpdateWarning
from ..linalg import negligible_update
from ..solvers import dual_cone_weights

# Diagnostics value for a zero update at a strongly stationary J (no warning: it is the optimum).
STATIONARY = "stationary"


def strongly_stationary(M: np.ndarray) -> bool:
    """Whether sum_i v_i g_i = 0 for some v > 0, up to rounding, from the Gramian alone.

    By Stiemke's lemma exactly one of two holds: such a v exists, or some x has J x >= 0 with
    J x != 0. In the second case the mean gradient has x . mean > 0, so its projection onto the
    dual cone {x : J x >= 0} (DualProj's update) is non-zero; in the first the cone is the null
    space of J and the projection is zero. The test is that projection's norm against the
    rounding floor of ``linalg.negligible_update``.
    """
    T = M.shape[0]
    v = dual_cone_weights(M, np.full((1, T), 1.0 / T))[0]
    return negligible_update(M, v)


def note_zero_update(
    method: Any, M: np.ndarray, c: np.ndarray, diagnostics: dict[str, Any], cause: str,
    explanation: str,
) -> None:
    """Set ``diagnostics["zero_update"]`` and warn once per ``method`` instance if needed.

    The value is None when J^T c is not negligible, ``STATIONARY`` when it is and J is strongly
    stationary, and ``cause`` (a short code: "dependent", "infeasible", "cancelled") otherwise;
    ``explanation`` is the warning's account of the cause, in words.
    """
    diagnostics["zero_update"] = None
    if not negligible_update(M, c):
        return
    if strongly_stationary(M):
        diagnostics["zero_update"] = STATIONARY
        return
    diagnostics["zero_update"] = cause
    if getattr(method, "_warned_zero_update", False):
        return
    method._warned_zero_update = True
    warnings.warn(
        f"{method.name}: the update is zero although the task gradients are not Pareto-"
        f"stationary (some direction improves a task and harms none): {explanation}. Every "
        f"step's StepRecord.diagnostics['zero_update'] says so ({cause!r}); this warning is "
        "issued once per method instance.", ZeroUpdateWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The stacklevel of the first frame outside deconflict, so the warning names the user's
    call (``backward`` or ``aggregate``) whatever the depth of the engine between them."""
    level = 2
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("deconflict"):
        level, frame = level + 1, frame.f_back
    return level
