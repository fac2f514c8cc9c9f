"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022;
``docs/methods.md#nash_mtl``).

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

Edge cases: tasks with a zero gradient get alpha_i = 0. When the hull of the gradients contains
0 (Pareto-stationary) no solution exists: alpha diverges along a null vector of M, Newton stops
after 100 steps, and the diagnostic ``converged`` is False. The last iterate J^T alpha is
bounded, but its weights are huge and cancel (alpha ~ 1e8 for D ~ 1: in float32 the update
would be rounding noise) and it can conflict with a task (on fuzzed rank-deficient and wide
Jacobians: a third of them). Fallback (documented deviation; the reference returns its last
iterate), diagnostic ``fallback`` True:

1. S = the tasks in some vanishing non-negative combination of the gradients
   (``solvers.stationary_support``, diagnostic ``stationary_tasks``). No non-conflicting
   direction can improve them (every such D has g_s . D = 0), so the bargaining is among the
   others, on their gradients projected off span(g_S) (``solvers.restricted_nash_weights``):
   g_r . D = 1 / alpha_r > 0 for r outside S, g_s . D = 0 on S, and small weights. This is the
   limit the Newton iterates approach. At a strongly stationary J (S = all tasks) D = 0.
2. If that fails (rounding makes S uncertain), D = the projection of the iterate J^T alpha onto
   the dual cone {x : J x >= 0} (``dual_cone_weights``), the closest non-conflicting direction.

The second repair also applies when ``update_weights_every`` > 1 reuses weights that conflict
with the new gradients. A converged solution never needs one: J D = 1/alpha > 0.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from ..solvers import (
    conflicts,
    dual_cone_weights,
    nash_bargaining_weights,
    restricted_nash_weights,
    stationary_support,
)
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register
from .state import NUMBER, StateField


@register
class NashMTL(GramianWeighting):
    """Nash-MTL (ICML 2022) with an exact Newton solver; see the module docstring.

    Diagnostics: ``alpha`` (the solver's iterate, before any repair or clipping),
    ``converged``, ``fallback`` (the update is one of the module docstring's repairs),
    ``stationary_tasks`` (the mask S of that repair; all False otherwise), ``recomputed``
    (False when alpha was reused), ``clip_scale`` (the factor applied for max_norm).

    The bargaining solution, scaled to ``max_norm`` = 1:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.NashMTL())
    tensor([0.5257, 0.8507])
    """

    name = "nash_mtl"
    summary = "Nash bargaining solution: alpha_i (M alpha)_i = 1 (exact Newton solver)"
    paper = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022"
    family = "multi-objective"
    stateful = True

    OPTIONS = (
        Option("max_norm", "float", 1.0, "scale alpha down so that ||J^T alpha|| <= max_norm "
               "(0 disables it)", low=0.0),
        Option("update_weights_every", "int", 1, "solve for alpha every that many steps, "
               "reusing it in between", low=1),
    )

    max_norm: float
    update_weights_every: int

    STATE = (StateField("alpha"), StateField("step", NUMBER))

    alpha: np.ndarray | None  # the weights of the last step: the next solve's warm start
    step: int

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1) -> None:
        self._set_options(max_norm=max_norm, update_weights_every=update_weights_every)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        T = M.shape[0]
        if self.alpha is not None and self.alpha.shape != (T,):
            raise ShapeError(f"this nash_mtl has seen {self.alpha.size} tasks and now gets {T}; "
                             "call reset() to start over")
        recompute = self.step % self.update_weights_every == 0 or self.alpha is None
        converged = True
        if recompute or self.alpha is None:
            solved, converged = nash_bargaining_weights(M, self.alpha)
        else:
            solved = self.alpha
        weights, stationary = solved, np.zeros(T, dtype=bool)
        if not converged:
            # No solution: 0 is in the hull. Bargain among the tasks that can still improve.
            stationary = stationary_support(M)
            restricted = restricted_nash_weights(M, stationary) if stationary.any() else None
            if restricted is not None and not np.any(conflicts(M, restricted)):
                weights = restricted
        fallback = weights is not solved
        if weights is solved and (not converged or np.any(conflicts(M, solved))):
            # The iterate (or reused weights on new gradients) can conflict; its projection
            # onto the dual cone cannot, and is the iterate itself when it does not conflict.
            weights, fallback = dual_cone_weights(M, solved[None, :])[0], True
        self.alpha = weights
        self.step += 1
        scale = 1.0
        if self.max_norm > 0:
            norm = math.sqrt(max(float(weights @ M @ weights), 0.0))
            if norm > self.max_norm:
                scale = self.max_norm / norm
        return weights * scale, {"alpha": solved.copy(), "converged": converged,
                                 "fallback": fallback, "stationary_tasks": stationary,
                                 "recomputed": recompute, "clip_scale": scale}
