"""The task tensioner (Nakamura, Grassi & Wolf, Eq. 2-8 and Algorithms 1-2;
``docs/methods.md#tensioner``).

A common descent direction v is pulled toward the tasks whose convergence stalls.

1. Base direction v = J^T p (paper Eq. 2-4):
   - "min_norm": p = argmin over the simplex of p^T M p (MGDA);
   - "central" (default): k = argmin over the simplex of k^T K k on the cosine matrix K (unit
     gradients), then p_m = (k_m / n_m) / sum_j (k_j / n_j). This is v = gamma sum_m k_m u_m with
     gamma = 1 / sum_m (k_m / n_m), the *raw* norms (as in the authors' code; the paper's Eq. 4
     writes the unit vector's norm, which would make gamma = 1 and v leave the convex hull).
2. Window statistic zeta_m(t) = mean of ||g_m|| over the last W steps (W = ``window``).
3. While fewer than W + 1 steps have been seen (so zeta(t - 1) does not exist yet), D = v
   (Algorithm 1, lines 8-11).
4. delta_m = zeta_m(t) / zeta_m(t - 1) + log10(L_m) (Eq. 6). Losses are clamped below at
   ``min_loss`` (default 1e-12) so the logarithm exists; a task whose window mean goes from 0 to
   positive gets delta = inf (tension factor 1).
5. c_m = alpha / (1 + exp(-e delta_m + e)) + 1 - alpha, in (1 - alpha, 1] (Eq. 7).
6. u_m = c_m (g_m - v) / ||g_m - v||, or 0 when g_m = v (Eq. 5).
7. v_n = v + sum_m u_m subject to g_m . v_n >= 0 (Eq. 8). The paper does not say how the
   constraint is enforced. ``constraint="feasible"`` (default, documented deviation):
   v_n = v + b U with U = sum_m u_m and the largest b in [0, 1] that keeps every g_m . v_n >= 0;
   always feasible because v itself does not conflict. ``constraint="reference"``: the authors'
   sequential fix: for each task in turn whose angle with v_n exceeds 90 degrees,
   v_n <- tan(a) n_m w with w the unit component of v_n orthogonal to g_m and
   a = pi - angle(g_m, v_n - g_m); a later fix can break an earlier task's constraint.

Everything is in Gramian form: g_m - v = J^T (e_m - p), ||g_m - v||^2 = (e_m - p)^T M (e_m - p),
and every constraint is a row of M times the coefficients. Note the units: u_m are unit vectors
added to v, which is on the gradient scale (the paper's definition, kept).

State (explicit, ``TensionerState``): the last W gradient norms per task, the previous window
statistic, and the step count; ``tensioner_step`` is a pure function of (M, losses, state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.special import expit

from ..errors import ShapeError
from ..linalg import cosine_matrix, task_norms, to_numpy
from ..solvers import min_norm_point
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register
from .state import Custom, StateField


@dataclass(frozen=True)
class TensionerState:
    """History the tensioner needs: a ring buffer of norms and the previous window mean."""

    norms: np.ndarray  # (window, T): norms[step % window] holds the norms of that step
    count: int  # steps seen so far
    previous: np.ndarray | None  # zeta(t - 1), once it exists


def initial_state(num_tasks: int, window: int) -> TensionerState:
    return TensionerState(norms=np.zeros((window, num_tasks)), count=0, previous=None)


def _saved(state: TensionerState) -> dict[str, Any]:
    previous = state.previous
    return {"norms": torch.from_numpy(state.norms.copy()), "count": state.count,
            "previous": None if previous is None else torch.from_numpy(previous.copy())}


def _restored(saved: dict[str, Any]) -> TensionerState:
    previous = saved["previous"]
    return TensionerState(norms=to_numpy(saved["norms"]), count=int(saved["count"]),
                          previous=None if previous is None else to_numpy(previous))


def base_direction(M: np.ndarray, base: str) -> np.ndarray:
    """Coefficients p of the base direction v = J^T p (a convex combination of the g_m)."""
    if base == "min_norm":
        return min_norm_point(M)
    norms = task_norms(M)
    live = np.flatnonzero(norms > 0)
    T = M.shape[0]
    if live.size == 0:
        return np.full(T, 1.0 / T)
    k = min_norm_point(cosine_matrix(M, norms)[np.ix_(live, live)])
    p = np.zeros(T)
    p[live] = k / norms[live]
    return p / p.sum()


def tension_factors(delta: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 7: c = alpha / (1 + exp(-e delta + e)) + 1 - alpha, clipped below at 0."""
    return np.maximum(alpha * expit(math.e * (delta - 1.0)) + 1.0 - alpha, 0.0)


def _feasible_pull(M: np.ndarray, p: np.ndarray, pull: np.ndarray) -> tuple[np.ndarray, float]:
    """p + b * pull with the largest b in [0, 1] such that M (p + b pull) >= 0."""
    base_dots = np.maximum(M @ p, 0.0)
    pull_dots = M @ pull
    b = 1.0
    shrinking = pull_dots < 0.0
    if shrinking.any():
        b = min(1.0, float(np.min(base_dots[shrinking] / -pull_dots[shrinking])))
    return p + b * pull, b


def _reference_pull(M: np.ndarray, q: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """The authors' sequential correction, on coefficients q of v_n = J^T q."""
    q = q.copy()
    for m in range(M.shape[0]):
        if norms[m] == 0.0 or float(M[m] @ q) >= 0.0:
            continue
        # w: the component of v_n orthogonal to g_m, normalized.
        w = q.copy()
        w[m] -= float(M[m] @ q) / M[m, m]
        w_norm = math.sqrt(max(float(w @ M @ w), 0.0))
        diff = q.copy()
        diff[m] -= 1.0
        diff_norm = math.sqrt(max(float(diff @ M @ diff), 0.0))
        if w_norm == 0.0 or diff_norm == 0.0:
            q = np.zeros_like(q)
            continue
        cosine = float(M[m] @ diff) / (norms[m] * diff_norm)
        angle = math.pi - math.acos(min(max(cosine, -1.0), 1.0))
        q = math.tan(angle) * norms[m] * w / w_norm
    return q


def tensioner_step(
    M: np.ndarray, losses: np.ndarray, state: TensionerState, *, alpha: float, base: str,
    constraint: str, min_loss: float,
) -> tuple[np.ndarray, TensionerState, Diagnostics]:
    """One step: (weights q with D = J^T q, the new state, diagnostics). Pure."""
    window, T = state.norms.shape
    norms = task_norms(M)
    buffer = state.norms.copy()
    buffer[state.count % window] = norms
    count = state.count + 1
    statistic = buffer.mean(axis=0) if count >= window else None
    p = base_direction(M, base)
    diagnostics: Diagnostics = {"base_weights": p, "tensioned": False}
    new_state = TensionerState(norms=buffer, count=count, previous=statistic)
    if statistic is None or state.previous is None:
        return p, new_state, diagnostics

    previous = state.previous
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(previous > 0, statistic / np.where(previous > 0, previous, 1.0),
                         np.where(statistic > 0, np.inf, 1.0))
    delta = ratio + np.log10(np.maximum(losses, min_loss))
    factors = tension_factors(delta, alpha)

    Mp = M @ p
    distance_sq = np.maximum(np.diag(M) - 2.0 * Mp + float(p @ Mp), 0.0)
    distance = np.sqrt(distance_sq)
    scale = float(np.sqrt(np.max(np.diag(M)))) if T else 0.0
    pull = np.zeros(T)
    for m in range(T):
        if distance[m] > 1e-12 * scale:
            direction = -p.copy()
            direction[m] += 1.0
            pull += factors[m] * direction / distance[m]
    if constraint == "feasible":
        q, b = _feasible_pull(M, p, pull)
        diagnostics["pull_scale"] = b
    else:
        q = _reference_pull(M, p + pull, norms)
    diagnostics.update({"tensioned": True, "delta": delta, "tension_factors": factors})
    return q, new_state, diagnostics


@register
class Tensioner(GramianWeighting):
    """The task tensioner (Nakamura, Grassi & Wolf, Eq. 2-8, Algorithms 1-2); see the module
    docstring.

    Options: ``alpha`` in [0, 1] (sensitivity, default 0.3), ``window`` W >= 1 (default 10),
    ``base`` in {"central", "min_norm"}, ``constraint`` in {"feasible", "reference"},
    ``min_loss`` > 0 (clamp for log10 of the losses). Needs ``losses``.

    Diagnostics: ``base_weights`` (p), ``tensioned`` (False during the warm-up), and after it
    ``delta``, ``tension_factors`` (c_m) and, for the feasible constraint, ``pull_scale`` (b).

    The first step, before the window statistic exists, is the central direction:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.Tensioner(), losses=[1.0, 2.0])
    tensor([0.2918, 0.4721])
    """

    name = "tensioner"
    summary = "Central (or min-norm) direction pulled toward tasks whose convergence stalls"
    paper = ("Nakamura, Grassi & Wolf, Leveraging convergence behavior to balance conflicting "
             "tasks in multi-task learning")
    family = "multi-objective"
    stateful = True

    OPTIONS = (
        Option("alpha", "float", 0.3, "sensitivity of the tension factors (Eq. 7)", low=0.0,
               high=1.0),
        Option("window", "int", 10, "W, the steps of the gradient-norm window statistic",
               low=1),
        Option("base", "str", "central", "the base direction: min-norm point of the unit "
               "gradients (central) or of the gradients (MGDA)", choices=("central", "min_norm")),
        Option("constraint", "str", "feasible", "keep the pulled update non-conflicting by a "
               "feasible step, or the authors' sequential correction",
               choices=("feasible", "reference")),
        Option("min_loss", "float", 1e-12, "losses are floored there so their logarithm exists",
               low=0.0, low_open=True),
        Option("tension", "bool", True, "apply the tension factors (false: the base direction "
               "alone)"),
    )

    alpha: float
    window: int
    base: str
    constraint: str
    min_loss: float
    tension: bool
    # None until the first step, which knows the number of tasks.
    STATE = (StateField("state", Custom(_saved, _restored)),)

    state: TensionerState | None

    def __init__(
        self,
        alpha: float = 0.3,
        window: int = 10,
        base: Literal["central", "min_norm"] = "central",
        constraint: Literal["feasible", "reference"] = "feasible",
        min_loss: float = 1e-12,
        tension: bool = True,
    ) -> None:
        self._set_options(alpha=alpha, window=window, base=base, constraint=constraint,
                          min_loss=min_loss, tension=tension)

    @property
    def needs_losses(self) -> bool:
        return True

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        assert context.losses is not None
        T = M.shape[0]
        state = self.state if self.state is not None else initial_state(T, self.window)
        if state.norms.shape[1] != T:
            raise ShapeError(
                f"this tensioner has seen {state.norms.shape[1]} tasks and now gets {T}; "
                "call reset() to start over"
            )
        if not self.tension:
            return base_direction(M, self.base), {"tensioned": False}
        q, self.state, diagnostics = tensioner_step(
            M, context.losses, state, alpha=self.alpha, base=self.base,
            constraint=self.constraint, min_loss=self.min_loss,
        )
        return q, diagnostics

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("state")
        if saved is not None:
            norms = saved["norms"]
            if norms.ndim != 2 or norms.shape[0] != self.window:
                raise ShapeError(
                    f"tensioner state has a norm buffer of shape {tuple(norms.shape)}, expected "
                    f"({self.window}, T) for window={self.window}"
                )
        super().load_state_dict(state)
