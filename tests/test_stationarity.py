"""The stationarity property, and zero updates that are never silent (issue 13, items 5 and 7).

A Jacobian J (rows g_i) is *strongly stationary* when a strictly positive combination of its
rows vanishes, *weakly stationary* when a non-negative non-zero one does (0 in the convex hull
of the gradients). Where J is weakly but not strongly stationary, the cone {x : J x >= 0}
holds directions that improve some tasks and harm none. What each method claims, from its
definition:

| method     | claim   | why                                                              |
|------------|---------|------------------------------------------------------------------|
| UPGrad     | strong  | D = mean of projections onto {x : J x >= 0}; all are zero iff the |
| DualProj   | strong  | cone is the null space of J, i.e. iff J is strongly stationary   |
|            |         | (Stiemke's lemma). Zero exactly there.                           |
| MGDA       | weak    | D is the min-norm point of the hull: zero iff 0 is in the hull.  |
| MGDA-UB    | weak    | the same, on the shared representation.                          |
| Nash-MTL   | weak    | alpha_i (M alpha)_i = 1 forces M alpha != 0 off weakly stationary |
|            |         | J (zero only where it is).                                        |
| tensioner  | weak    | its base is MGDA's min-norm point (zero only where weakly         |
|            |         | stationary).                                                     |

Other methods claim nothing. GradOPS returns zero whenever every conflicting task is dependent
(more tasks than the rank of J), IMTL-G whenever no equal-projection direction exists; such a
zero, or any other at a J that is not strongly stationary, must be reported: a
``ZeroUpdateWarning`` and ``diagnostics["zero_update"]`` naming the cause.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from properties import (
    assert_close_relative,
    assert_dual_cone_projection,
    assert_zero_only_where_stationary,
    assert_zero_where_stationary,
    nnls_kkt_rtol,
    update,
)
from scipy.optimize import linprog
from strategies import STATIONARITY, build_stationary_jacobian, stationary_jacobians

import deconflict
from deconflict.methods import BlockWeighting, GramianWeighting
from deconflict.methods.registry import method_class
from deconflict.solvers import dual_cone_weights

CLAIMS = {"upgrad": "strong", "dualproj": "strong", "mgda": "weak", "mgda_ub": "weak",
          "nash_mtl": "weak", "tensioner": "weak", "fairgrad": "weak",
          "mgda_log": "weak", "log_losses": "weak", "modo": "weak", "sdmgrad": "strong",
          "excess_mtl": "strong", "si_ls": "strong"}
# Zero exactly at the stationary J of their class, not only "zero only there".
EXACT = ("upgrad", "dualproj", "mgda", "mgda_ub", "mgda_log", "log_losses")
_EPS = float(np.finfo(np.float64).eps)


def make(name: str) -> deconflict.Method:
    cls = method_class(name)
    return cls(seed=0) if "seed" in inspect.signature(cls).parameters else cls()


def losses_for(J: np.ndarray) -> np.ndarray:
    return np.linspace(0.5, 2.0, J.shape[0])


def lp_feasible(J: np.ndarray, strictly: bool) -> bool:
    """An independent check of the class: v >= 1 (strictly) or v >= 0 with sum v = 1, and
    v^T J = 0, by linear programming on unit rows (the class is invariant to row scales)."""
    norms = np.linalg.norm(J, axis=1)
    units = J / np.where(norms > 0, norms, 1.0)[:, None]
    T = J.shape[0]
    if strictly:
        result = linprog(np.zeros(T), A_eq=units.T, b_eq=np.zeros(J.shape[1]),
                         bounds=[(1.0, None)] * T, method="highs")
    else:
        result = linprog(np.zeros(T), A_eq=np.vstack([units.T, np.ones(T)]),
                         b_eq=np.append(np.zeros(J.shape[1]), 1.0), bounds=[(0.0, None)] * T,
                         method="highs")
    return result.status == 0


# ------------------------------------------------------------------------- the generator
@pytest.mark.parametrize("kind", STATIONARITY)
@settings(max_examples=25)
@given(data=st.data())
def test_generated_jacobians_are_in_their_class_at_their_rank(kind, data):
    J, rank = data.draw(stationary_jacobians(kind, max_tasks=10, max_dim=8))
    assert np.linalg.matrix_rank(J) == rank
    strong, weak = lp_feasible(J, strictly=True), lp_feasible(J, strictly=False)
    assert (strong, weak) == {"strong": (True, True), "weak": (False, True),
                              "none": (False, False)}[kind]


# ------------------------------------------------------------------ the stationarity property
@pytest.mark.parametrize("name", sorted(CLAIMS))
@pytest.mark.parametrize("kind", STATIONARITY)
@settings(max_examples=15)
@given(data=st.data())
def test_update_is_zero_only_where_the_method_claims_stationarity(name, kind, data):
    J, _ = data.draw(stationary_jacobians(kind))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deconflict.ZeroUpdateWarning)
        D = update(make(name), J, losses=losses_for(J))
    assert_zero_only_where_stationary(D, kind, CLAIMS[name], name)
    if name in EXACT:
        assert_zero_where_stationary(D, kind, CLAIMS[name], name)


# Krum selects among the gradients (n_byzantine + 3 of them at least): fewer are refused.
NEEDS_THREE_TASKS = ("krum",)


@pytest.mark.parametrize("name", deconflict.available())
@pytest.mark.parametrize("kind", STATIONARITY)
@settings(max_examples=8)
@given(data=st.data())
def test_a_zero_update_off_strong_stationarity_is_never_silent(name, kind, data):
    """Every method: a zero update where J is not strongly stationary either is one the method
    claims (MGDA at a weakly stationary J) or comes with a ZeroUpdateWarning and, from the
    Gramian, diagnostics["zero_update"] naming the cause. At a strongly stationary J a zero is
    the optimum: no warning."""
    J, _ = data.draw(stationary_jacobians(kind))
    if name in NEEDS_THREE_TASKS and J.shape[0] < 3:
        with pytest.raises(deconflict.ShapeError, match=f"got {J.shape[0]}"):
            update(make(name), J, losses=losses_for(J))
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", deconflict.ZeroUpdateWarning)
        D = update(make(name), J, losses=losses_for(J))
    warned = [w for w in caught if issubclass(w.category, deconflict.ZeroUpdateWarning)]
    if kind == "strong":
        assert not warned, f"{name} warned at a strongly stationary J: {warned[0].message}"
        return
    if np.linalg.norm(D) > 0.0 or (CLAIMS.get(name) == "weak" and kind == "weak"):
        return
    assert len(warned) == 1, f"{name} returned a silent zero update on a {kind} J"
    method = make(name)
    if isinstance(method, GramianWeighting) or (isinstance(method, BlockWeighting)
                                                and method.single_group):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", deconflict.ZeroUpdateWarning)
            _, diagnostics = method.weights_with_diagnostics(J @ J.T, losses=losses_for(J))
        assert diagnostics["zero_update"] not in (None, "stationary")


# --------------------------------------------------------------- UPGrad and DualProj (item 7)
@functools.lru_cache(maxsize=1)
def issue_jacobians(count: int = 60) -> tuple[np.ndarray, ...]:
    """The issue's strictly weakly stationary Jacobians: J = B - v (v^T B) / |v|^2 for a
    non-negative v with zero entries (so v^T J = 0) and a random B of rank r, kept when no
    strictly positive combination vanishes; T from 3 to 20, often rank-deficient."""
    rng = np.random.default_rng(0)
    found: list[np.ndarray] = []
    while len(found) < count:
        T, d = int(rng.integers(3, 21)), int(rng.integers(3, 12))
        r = int(rng.integers(1, min(T, d) + 1))
        v = rng.uniform(0.1, 1.0, T)
        v[rng.random(T) < 0.4] = 0.0
        if (v > 0).sum() < 2 or (v > 0).all():
            continue
        B = rng.standard_normal((T, r)) @ rng.standard_normal((r, d))
        J = B - np.outer(v, v @ B) / (v @ v)
        if not lp_feasible(J, strictly=True):
            found.append(J)
    return tuple(found)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_projections_at_the_issues_weakly_stationary_jacobians_are_exact_and_non_zero(name):
    """Before the fix 5 of these 60 gave UPGrad's exact zeros and 2 DualProj's: NNLS's
    multipliers drifted along the ray z + t w (J^T w = 0) to 1e13, so J^T c was cancellation.
    """
    for J in issue_jacobians():
        T = J.shape[0]
        M = J @ J.T
        targets = np.eye(T) / T if name == "upgrad" else np.full((1, T), 1.0 / T)
        projections = dual_cone_weights(M, targets)
        for u, v in zip(targets, projections, strict=True):
            assert_dual_cone_projection(M, u, v, nnls_kkt_rtol(T))
        D = update(make(name), J)
        assert np.linalg.norm(D) > 0.0, f"{name} gives zero on a strictly weakly stationary J"


@pytest.mark.parametrize("kind", STATIONARITY)
@settings(max_examples=30)
@given(data=st.data())
def test_upgrad_projections_satisfy_their_kkt_conditions_on_every_class(kind, data):
    J, _ = data.draw(stationary_jacobians(kind, max_tasks=12))
    T = J.shape[0]
    M = J @ J.T
    targets = np.vstack([np.eye(T) / T, np.full((1, T), 1.0 / T)])
    for u, v in zip(targets, dual_cone_weights(M, targets), strict=True):
        assert_dual_cone_projection(M, u, v, nnls_kkt_rtol(T))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_torchjd_agrees_on_weakly_stationary_jacobians(name):
    """TorchJD's problem (M / tr M + 1e-4 I, our reg_eps=1e-4) solved by both: the same update.
    The problem is strongly convex with condition number at most (1 + 1e-4) / 1e-4 ~ 1e4, so
    two backward-stable solves agree to ~ T cond eps each: 1e2 T cond eps allows for the
    solvers' constants."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    reference = {"upgrad": aggregation.UPGrad, "dualproj": aggregation.DualProj}[name]()
    ours = method_class(name)(reg_eps=1e-4)
    for J in issue_jacobians()[:12]:
        T = J.shape[0]
        theirs = reference(torch.from_numpy(J)).numpy()
        assert np.linalg.norm(theirs) > 0.0
        assert_close_relative(update(ours, J), theirs, 1e2 * T * 1e4 * _EPS, f"{name} vs TorchJD")


def test_dualproj_on_a_six_by_three_weakly_stationary_jacobian_of_rank_three():
    J = build_stationary_jacobian("weak", 3, 6, 3, 3)
    assert np.linalg.matrix_rank(J) == 3
    M = J @ J.T
    c = make("dualproj").weights(M).numpy()
    assert_dual_cone_projection(M, np.full(6, 1 / 6), c, nnls_kkt_rtol(6))
    assert np.linalg.norm(update(make("dualproj"), J)) > 0.0


# ------------------------------------------------------------------- silent zeros (item 5)
def fifty_tasks_on_a_batch_of_eight():
    """T = 50 tasks whose gradients share a direction (each head's target is 1), batch 8: more
    tasks than the rank of J, and J is far from stationary."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 6)
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(50))
    z = trunk(torch.randn(8, 4))
    losses = [(head(z) - 1.0).pow(2).mean() for head in heads]
    return trunk, losses


@pytest.mark.parametrize(("name", "cause"), [("gradops", "dependent"), ("imtl_g", "infeasible")])
def test_zero_update_with_more_tasks_than_the_rank_is_reported_and_warned_once(name, cause):
    trunk, losses = fifty_tasks_on_a_batch_of_eight()
    method = make(name)
    with pytest.warns(deconflict.ZeroUpdateWarning, match=f"{name}: the update is zero") as caught:
        records = [deconflict.backward(losses, trunk, method, retain_graph=True)
                   for _ in range(3)]
    assert len([w for w in caught if issubclass(w.category, deconflict.ZeroUpdateWarning)]) == 1
    assert all(record.diagnostics["zero_update"] == cause for record in records)
    assert torch.count_nonzero(trunk.weight.grad) == 0
    # Not a stationary point: UPGrad moves, and its update harms no task.
    trunk.zero_grad()
    record = deconflict.backward(losses, trunk, "upgrad", retain_graph=True)
    assert float(trunk.weight.grad.norm()) > 0.0
    assert record.diagnostics.get("zero_update") is None
    # Another instance warns again: the warning is per method instance.
    with pytest.warns(deconflict.ZeroUpdateWarning):
        deconflict.backward(losses, trunk, make(name), retain_graph=True)


def test_zero_update_at_a_strongly_stationary_point_is_not_a_warning():
    J = np.array([[1.0, 2.0], [-2.0, -4.0]])  # 2 g_1 + g_2 = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", deconflict.ZeroUpdateWarning)
        for name in ("gradops", "imtl_g", "pcgrad"):
            _, diagnostics = make(name).weights_with_diagnostics(J @ J.T)
            assert diagnostics["zero_update"] == "stationary", name
            assert np.linalg.norm(update(make(name), J)) == 0.0


def test_zero_update_warning_is_a_user_warning_not_a_runtime_warning():
    # pyproject.toml turns deconflict's RuntimeWarnings into errors; users filter ours by class.
    assert issubclass(deconflict.ZeroUpdateWarning, deconflict.DeconflictWarning)
    assert issubclass(deconflict.DeconflictWarning, UserWarning)
    assert not issubclass(deconflict.ZeroUpdateWarning, RuntimeWarning)
