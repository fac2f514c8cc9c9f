"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022; METHODS.md
Section 13).

The update D = J^T alpha with alpha > 0 solving alpha_i (M alpha)_i = 1 for every task (the Nash
bargaining solution). Then ||D||^2 = alpha^T M alpha = T, whatever the gradient scale, and
J D = M alpha = 1/alpha > 0: no task's loss increases. Solved exactly as the convex problem
min over alpha > 0 of alpha^T M alpha / 2 - sum_i log alpha_i by damped Newton
(``solvers.nash_bargaining_weights``), warm-started from the previous alpha; no cvxpy.

Options (reference defaults): ``max_norm`` = 1.0 scales alpha down so that ||J^T alpha|| <=
max_norm (TorchJD's convention; nash-mtl and LibMTL clip the shared gradient to the same norm;
0 disables it); ``update_weights_every`` = 1 reuses alpha for that many steps.

The reference (nash-mtl, LibMTL, TorchJD) normalizes M by its Frobenius norm but keeps the
normalization inside its constraint, so it targets the same equation; its solver (at most 20
convex problems in cvxpy/ECOS) is approximate and sometimes stops far from a solution (in the
parity tests: 5 of 60 random problems with residual ~1). This one converges to
|alpha_i (M alpha)_i - 1| <= 1e-12 (relative to its rounding error when alpha is large).

Edge cases: tasks with a zero gradient get alpha_i = 0; when the hull of the gradients contains
0 (Pareto-stationary) alpha diverges along a null vector of M: Newton stops after 100 steps and
the diagnostic ``converged`` is False (the update J^T alpha stays bounded).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import InvalidOptionError, ShapeError
from ..linalg import to_numpy
from ..solvers import nash_bargaining_weights
from .base import Context, Diagnostics, Method, bounded_option
from .registry import register


@register
class NashMTL(Method):
    """Nash-MTL (ICML 2022) with an exact Newton solver; see the module docstring.

    Diagnostics: ``alpha`` (before clipping), ``converged``, ``recomputed`` (False when alpha
    was reused), ``clip_scale`` (the factor applied for max_norm).
    """

    name = "nash_mtl"
    summary = "Nash bargaining solution: alpha_i (M alpha)_i = 1 (exact Newton solver)"
    paper = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022"
    family = "multi-objective"
    stateful = True

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1) -> None:
        self.max_norm = bounded_option(self.name, "max_norm", max_norm, 0.0)
        if isinstance(update_weights_every, bool) or not isinstance(update_weights_every, int) \
                or update_weights_every < 1:
            raise InvalidOptionError(
                f"{self.name}: update_weights_every must be an int >= 1, got "
                f"{update_weights_every!r}"
            )
        self.update_weights_every = update_weights_every
        self.reset()

    def options(self) -> dict[str, object]:
        return {"max_norm": self.max_norm, "update_weights_every": self.update_weights_every}

    def reset(self) -> None:
        self.alpha: np.ndarray | None = None
        self.step = 0

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        assert M is not None
        T = M.shape[0]
        if self.alpha is not None and self.alpha.shape != (T,):
            raise ShapeError(f"this nash_mtl has seen {self.alpha.size} tasks and now gets {T}; "
                             "call reset() to start over")
        recompute = self.step % self.update_weights_every == 0 or self.alpha is None
        converged = True
        if recompute:
            self.alpha, converged = nash_bargaining_weights(M, self.alpha)
        self.step += 1
        alpha = self.alpha
        scale = 1.0
        if self.max_norm > 0:
            norm = math.sqrt(max(float(alpha @ M @ alpha), 0.0))
            if norm > self.max_norm:
                scale = self.max_norm / norm
        return alpha * scale, {"alpha": alpha.copy(), "converged": converged,
                               "recomputed": recompute, "clip_scale": scale}

    def state_dict(self) -> dict[str, Any]:
        alpha = None if self.alpha is None else torch.from_numpy(self.alpha.copy())
        return {"alpha": alpha, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = None if state.get("alpha") is None else to_numpy(state["alpha"])
        self.step = int(state.get("step", 0))
