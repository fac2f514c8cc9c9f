"""The methods of issue 16's first batch: GradOPS-static, FairGrad, ConFIG.

Golden values are derived by hand in each test's docstring or comments; the properties are
the ones each method's definition promises (docs/methods.md#gradops_static, #fairgrad,
#config); parity is with TorchJD 0.18 where it has the method.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from properties import (
    GOLDEN_RTOL,
    assert_close_relative,
    assert_non_conflicting,
    assert_strongly_non_conflicting,
    combination_rtol,
    gamma,
    rounding_scale,
    solve_rtol,
    update,
)
from scipy.optimize import linprog
from strategies import jacobians

import deconflict
from deconflict.methods.config import ConFIG
from deconflict.methods.cr_mogm import BASES, CRMOGM
from deconflict.methods.fairgrad import FairGrad, relative_residual
from deconflict.methods.geometric_mean import GeometricMean
from deconflict.methods.gradops_static import GradOPSStatic
from deconflict.methods.krum import Krum, krum_scores
from deconflict.methods.pbi import PBI
from deconflict.methods.stch import STCH
from deconflict.methods.trimmed_mean import TrimmedMean

_EPS = float(np.finfo(np.float64).eps)


def weakly_stationary(J: np.ndarray) -> bool:
    """0 in the convex hull of the rows of J, by linear programming on unit rows."""
    norms = np.linalg.norm(J, axis=1)
    units = J / np.where(norms > 0, norms, 1.0)[:, None]
    T = J.shape[0]
    result = linprog(np.zeros(T), A_eq=np.vstack([units.T, np.ones(T)]),
                     b_eq=np.append(np.zeros(J.shape[1]), 1.0), bounds=[(0.0, None)] * T,
                     method="highs")
    return result.status == 0


def quiet_update(method: deconflict.Method, J: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deconflict.ZeroUpdateWarning)
        return update(method, J)


def quiet_weights(method: deconflict.Method, M: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deconflict.ZeroUpdateWarning)
        c, diagnostics = method.weights_with_diagnostics(M)
    return c.numpy(), diagnostics


# ------------------------------------------------------------------------- GradOPS-static
def test_gradops_static_golden_two_tasks():
    """g1 = (1, 0), g2 = (-1, 1) conflict (g1 . g2 = -1). g'_1 = g1 - (g1.g2 / |g2|^2) g2 =
    (1/2, 1/2), g'_2 = g2 - (g2.g1 / |g1|^2) g1 = (0, 1); with w = (3/2, 1/2),
    D = (3/4, 3/4) + (0, 1/2) = (3/4, 5/4)."""
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    assert_close_relative(update(GradOPSStatic(weights=[1.5, 0.5]), J), [0.75, 1.25],
                          GOLDEN_RTOL)
    _, diagnostics = GradOPSStatic(weights=[1.5, 0.5]).weights_with_diagnostics(J @ J.T)
    rows = diagnostics["projection_coefficients"].numpy()
    assert_close_relative(rows @ J, [[0.5, 0.5], [0.0, 1.0]], GOLDEN_RTOL)


@settings(max_examples=60)
@given(J=jacobians())
def test_gradops_static_with_unit_weights_is_gradops_with_alpha_zero_exactly(J):
    """Eq. 5 at alpha = 0 gives w_i = 1 on the active tasks; the inactive ones have g'_i = 0,
    so both are sum_i g'_i, computed by the same projections: equal to the last bit."""
    M = J @ J.T
    static, _ = quiet_weights(GradOPSStatic(), M)
    reference, _ = quiet_weights(deconflict.GradOPS(alpha=0.0), M)
    np.testing.assert_array_equal(static, reference)


@settings(max_examples=60)
@given(J=jacobians(min_tasks=2), alpha=st.sampled_from([-3.0, -1.0, 0.5, 2.0]))
def test_gradops_is_gradops_static_with_its_own_weights(J, alpha):
    """For any alpha, GradOPS's update is GradOPS-static's with w = that step's Eq. 5 weights
    (any positive weight for the inactive tasks, whose g'_i is 0)."""
    M = J @ J.T
    reference, diagnostics = quiet_weights(deconflict.GradOPS(alpha=alpha), M)
    w = diagnostics["w"].numpy()
    weights = np.where(diagnostics["active"].numpy(), w, 1.0)
    if (weights <= 0).any():  # an Eq. 5 weight that underflowed: no static counterpart
        return
    static, _ = quiet_weights(GradOPSStatic(weights=weights.tolist()), M)
    np.testing.assert_array_equal(static, reference)


@settings(max_examples=60)
@given(J=jacobians(), seed=st.integers(0, 2**16))
def test_gradops_static_is_strongly_non_conflicting_for_any_positive_weights(J, seed):
    weights = np.random.default_rng(seed).uniform(0.05, 3.0, J.shape[0])
    method = GradOPSStatic(weights=weights.tolist())
    _, diagnostics = quiet_weights(method, J @ J.T)
    assert_strongly_non_conflicting(J, diagnostics["projection_coefficients"])
    assert_non_conflicting(J, quiet_update(GradOPSStatic(weights=weights.tolist()), J))


@settings(max_examples=40)
@given(J=jacobians(kinds=("random", "norm_spread", "conflicting", "rank_deficient"),
                   min_tasks=2, scales=False), seed=st.integers(0, 2**16))
def test_gradops_static_is_homogeneous_and_free_of_task_order(J, seed):
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.05, 3.0, J.shape[0])
    base = quiet_update(GradOPSStatic(weights=weights.tolist()), J)
    scale = 2.0**40
    scaled = quiet_update(GradOPSStatic(weights=weights.tolist()), J * scale)
    assert_close_relative(scaled / scale, base, 1e-8, "gradops_static at scale 2^40")
    perm = rng.permutation(J.shape[0])
    permuted = quiet_update(GradOPSStatic(weights=weights[perm].tolist()), J[perm])
    assert_close_relative(permuted, base, 1e-7, "gradops_static with tasks permuted",
                          atol=10 * rounding_scale(J))


def test_gradops_static_checks_its_weights():
    M = np.eye(3)
    with pytest.raises(deconflict.ShapeError, match="gradops_static: 2 weights for 3 tasks"):
        GradOPSStatic(weights=[1.0, 2.0]).weights(M)
    with pytest.raises(deconflict.InvalidOptionError, match=r"weights\[1\] must be positive"):
        GradOPSStatic(weights=[1.0, 0.0])
    assert repr(GradOPSStatic(weights=[1, 2])) == (
        "GradOPSStatic(weights=(1.0, 2.0), gating='per_task', dependence_tol=1e-06)")


def test_the_simplex_sweep_grid_reaches_gradops_static():
    """``sweep --weights simplex:K`` gives every vector of positive multiples of T/K summing to
    T (GradOPS Appendix C.3), each one a valid ``weights`` value."""
    from deconflict.experiments.commands import _declared, _grid_value
    from deconflict.experiments.report import sweep_values

    option = _declared("gradops_static", "weights")
    grid = [_grid_value("gradops_static", option, v) for v in sweep_values("simplex:4", 3)]
    assert len(grid) == 3  # (2,1,1), (1,2,1), (1,1,2) times 3/4
    for weights in grid:
        assert math.isclose(sum(weights), 3.0) and min(weights) > 0
        GradOPSStatic(weights=weights).weights(np.eye(3))


# -------------------------------------------------------------------------------- FairGrad
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_golden_orthogonal_and_symmetric(alpha):
    """Orthogonal gradients: M = diag(4, 1), M_ii w_i = w_i^(-1/alpha) gives
    w_i = M_ii^(-alpha / (alpha + 1)). Two unit gradients with cosine 1/2: by symmetry
    w_1 = w_2 = w with (3/2) w = w^(-1/alpha), w = (3/2)^(-alpha / (alpha + 1))."""
    exponent = -alpha / (alpha + 1.0)
    w = FairGrad(alpha).weights(np.diag([4.0, 1.0])).numpy()
    assert_close_relative(w, [4.0**exponent, 1.0], GOLDEN_RTOL)
    w = FairGrad(alpha).weights(np.array([[1.0, 0.5], [0.5, 1.0]])).numpy()
    assert_close_relative(w, [1.5**exponent] * 2, GOLDEN_RTOL)


@settings(max_examples=120)
@given(J=jacobians(), alpha=st.sampled_from([0.1, 0.5, 1.0, 2.0, 7.0]))
def test_fairgrad_solves_its_equation_or_j_is_weakly_stationary(J, alpha):
    """Solved: (M w)_i = w_i^(-1/alpha) to 1e-10 relative on every task with a nonzero
    gradient, so g_i . D > 0 for each. Unsolved only where no solution exists: 0 in the hull
    of the nonzero gradients (checked independently by linear programming)."""
    M = J @ J.T
    w, diagnostics = quiet_weights(FairGrad(alpha), M)
    live = np.linalg.norm(J, axis=1) > 0
    if diagnostics["solved"]:
        if live.any():
            assert relative_residual(M[np.ix_(live, live)], w[live], alpha).max() <= 1e-10
            assert (w[live] > 0).all()
        assert (w[~live] == 0).all()
    else:
        assert not diagnostics["feasible"] and weakly_stationary(J[live])
        assert (w == 0).all()


@given(J=jacobians(kinds=("random", "norm_spread", "conflicting"), scales=False),
       exponent=st.sampled_from([-30, 30]), alpha=st.sampled_from([0.5, 1.0, 3.0]))
def test_fairgrad_scaling_law(J, exponent, alpha):
    """w(s^2 M) = s^(-2 alpha / (alpha + 1)) w(M), hence D(sJ) = s^((1-alpha)/(1+alpha)) D(J)."""
    s = 2.0**exponent
    base = quiet_update(FairGrad(alpha), J)
    scaled = quiet_update(FairGrad(alpha), J * s)
    assert_close_relative(scaled, base * s ** ((1 - alpha) / (1 + alpha)), 1e-9)


def test_fairgrad_zero_gradients_decouple():
    J = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.3, 1.0, 0.0]])
    w = FairGrad(2.0).weights(J @ J.T).numpy()
    alone = FairGrad(2.0).weights(J[[0, 2]] @ J[[0, 2]].T).numpy()
    assert w[1] == 0.0
    np.testing.assert_array_equal(w[[0, 2]], alone)


def test_fairgrad_without_a_solution_says_so():
    """Opposite gradients are strongly stationary: zero, no warning. With a third gradient
    orthogonal to them 0 is still in the hull (weakly stationary) but (0, 0, 1) improves one
    task and harms none: the zero update is reported."""
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", deconflict.ZeroUpdateWarning)
        np.testing.assert_array_equal(update(FairGrad(), opposite), np.zeros(2))
    J = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.warns(deconflict.ZeroUpdateWarning, match="no positive solution"):
        c, diagnostics = FairGrad().weights_with_diagnostics(J @ J.T)
    assert not diagnostics["feasible"] and diagnostics["zero_update"] == "infeasible"
    np.testing.assert_array_equal(c.numpy(), np.zeros(3))


def test_fairgrad_rejects_a_non_positive_alpha():
    with pytest.raises(deconflict.InvalidOptionError, match="alpha must be positive"):
        FairGrad(alpha=0.0)


# --------------------------------------------------------------------------------- ConFIG
def test_config_golden():
    """Orthogonal: u = e1, e2, x = U^+ 1 = (1, 1), sum_i g_i . x_hat = (1 + 2) / sqrt 2,
    D = (3/2, 3/2). At 120 degrees: u1 = (1, 0), u2 = (-1/2, sqrt3/2), U x = 1 gives
    x = (1, sqrt 3), x_hat = (1/2, sqrt3/2); with g1 = 2 u1, g2 = u2 the length is
    2 (1/2) + 1/2 = 3/2, so D = (3/4, 3 sqrt3/4)."""
    assert_close_relative(update(ConFIG(), np.diag([1.0, 2.0])), [1.5, 1.5], GOLDEN_RTOL)
    J = np.array([[2.0, 0.0], [-0.5, math.sqrt(3) / 2]])
    assert_close_relative(update(ConFIG(), J), [0.75, 0.75 * math.sqrt(3)], GOLDEN_RTOL)


@settings(max_examples=60)
@given(J=jacobians(kinds=("random", "norm_spread", "conflicting"), max_tasks=5),
       seed=st.integers(0, 2**16))
def test_config_has_the_preferred_projections_on_the_unit_gradients(J, seed):
    """Where U has full row rank, U x = p: cos(g_i, D) is proportional to p_i."""
    if np.linalg.matrix_rank(J) < J.shape[0] or np.linalg.cond(J) > 1e6:
        return
    p = np.random.default_rng(seed).uniform(0.2, 2.0, J.shape[0])
    D = update(ConFIG(pref_vector=p.tolist()), J)
    cosines = (J @ D) / (np.linalg.norm(J, axis=1) * np.linalg.norm(D))
    ratios = cosines / p
    tolerance = solve_rtol(np.linalg.cond(J) ** 2, J.shape[0])
    assert ratios.max() - ratios.min() <= tolerance * ratios.max() and ratios.min() > 0


def test_config_zero_where_p_is_orthogonal_to_the_range():
    """Collinear gradients whose signs sum to zero: U^+ 1 = 0 exactly, so D = 0 (TorchJD
    normalizes the rounding noise instead); J is strongly stationary, so no warning."""
    J = np.array([[1.0, 0.0], [-2.0, 0.0], [3.0, 0.0], [-4.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", deconflict.ZeroUpdateWarning)
        np.testing.assert_array_equal(update(ConFIG(), J), np.zeros(2))
        np.testing.assert_array_equal(update(ConFIG(), J[:2]), np.zeros(2))


# ------------------------------------------------------------------------ Krum, TrimmedMean
def test_krum_golden():
    """a = (1, 0), b = (1.1, 0), c = (0.9, 0.1), d = (-5, 3); f = 1 leaves T - f - 2 = 1
    neighbour: s(a) = |a - b|^2 = 0.01, s(b) = 0.01, s(c) = |c - a|^2 = 0.02,
    s(d) = |d - c|^2 = 5.9^2 + 2.9^2 = 43.22. Krum: a (the tie goes to the lower index);
    Multi-Krum with m = 2: (a + b) / 2."""
    J = np.array([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-5.0, 3.0]])
    # Distances from M cancel: M_aa + M_bb - 2 M_ab errs by ~eps (M_aa + M_bb), not eps * 0.01.
    np.testing.assert_allclose(krum_scores(J @ J.T, 1), [0.01, 0.01, 0.02, 43.22],
                               rtol=0, atol=64 * _EPS * 35)
    np.testing.assert_array_equal(update(Krum(n_byzantine=1), J), J[0])
    assert_close_relative(update(Krum(n_byzantine=1, n_selected=2), J), [1.05, 0.0],
                          GOLDEN_RTOL)


def test_krum_needs_enough_tasks():
    with pytest.raises(deconflict.ShapeError, match="at least n_byzantine \\+ 3 = 4"):
        Krum(n_byzantine=1).weights(np.eye(3))
    with pytest.raises(deconflict.ShapeError, match="n_selected = 4 exceeds the 3"):
        Krum(n_selected=4).weights(np.eye(3))


def test_trimmed_mean_golden_and_its_condition():
    """Columns (1, 2, 30) and (-9, 0, 1): dropping the largest and the smallest leaves 2, 0."""
    J = np.array([[1.0, -9.0], [2.0, 0.0], [30.0, 1.0]])
    np.testing.assert_array_equal(update(TrimmedMean(trim=1), J), [2.0, 0.0])
    np.testing.assert_array_equal(update(TrimmedMean(), J), J.mean(axis=0))
    with pytest.raises(deconflict.ShapeError, match="at least 2 trim \\+ 1 = 5"):
        update(TrimmedMean(trim=2), J)
    with pytest.raises(deconflict.InvalidOptionError, match="task gradients themselves"):
        TrimmedMean().weights(J @ J.T)


@settings(max_examples=40)
@given(J=jacobians(min_tasks=3, scales=False), seed=st.integers(0, 2**16))
def test_trimmed_mean_is_homogeneous_free_of_task_order_and_within_the_range(J, seed):
    rng = np.random.default_rng(seed)
    method = TrimmedMean(trim=1)
    D = update(method, J)
    assert (D >= J.min(axis=0)).all() and (D <= J.max(axis=0)).all()
    np.testing.assert_array_equal(update(method, J * 2.0**30), D * 2.0**30)
    np.testing.assert_array_equal(update(method, J[rng.permutation(J.shape[0])]), D)


def test_trimmed_mean_in_the_jacobian_modes_matches_aggregate():
    from torch import nn

    def step(mode: str) -> torch.Tensor:
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).double()
        heads = [nn.Linear(5, 1).double() for _ in range(5)]
        z = trunk(torch.randn(16, 4, dtype=torch.float64))
        losses = [h(z).pow(2).mean() for h in heads]
        deconflict.backward(losses, trunk, TrimmedMean(trim=1), mode=mode)
        return torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])

    assert_close_relative(step("batched").numpy(), step("sequential").numpy(), 1e-12)


# --------------------------------------------------------------------------------- CR-MOGM
def test_cr_mogm_golden():
    """Base IMTL-G, alpha = 1/2. Step 1, M = diag(1, 4): a = (1, 1/2) / (3/2) = (2/3, 1/3), the
    first average. Step 2, M = I: (1/2, 1/2), so lambda_2 = ((2/3, 1/3) + (1/2, 1/2)) / 2 =
    (7/12, 5/12)."""
    method = CRMOGM(base="imtl_g", alpha=0.5)
    assert_close_relative(method.weights(np.diag([1.0, 4.0])).numpy(), [2 / 3, 1 / 3],
                          GOLDEN_RTOL)
    assert_close_relative(method.weights(np.eye(2)).numpy(), [7 / 12, 5 / 12], GOLDEN_RTOL)


def _gramians(steps: int = 12, T: int = 3):
    rng = np.random.default_rng(3)
    return [(lambda J: J @ J.T)(rng.standard_normal((T, 5))) for _ in range(steps)]


@pytest.mark.parametrize("base", ["mgda", "upgrad", "gradops"])
def test_cr_mogm_is_the_moving_average_of_its_base(base):
    """alpha = 0 gives the base's weights; any alpha, the recursion on the base's weights."""
    plain, averaged, fresh = CRMOGM(base, alpha=0.0), CRMOGM(base, alpha=0.7), get_base(base)
    previous = None
    for M in _gramians():
        reference = fresh.weights(M).numpy()
        np.testing.assert_array_equal(plain.weights(M).numpy(), reference)
        expected = reference if previous is None else 0.7 * previous + (1 - 0.7) * reference
        np.testing.assert_array_equal(averaged.weights(M).numpy(), expected)
        previous = expected


def get_base(name: str) -> deconflict.Method:
    return deconflict.get(name)


@pytest.mark.parametrize("base", ["mgda", "nash_mtl"])
def test_cr_mogm_resumes_exactly_and_reset_forgets(base):
    """The average, and a stateful base's state (Nash-MTL's warm start), survive torch.save /
    torch.load(weights_only=True); reset() starts over."""
    import io

    gramians = _gramians(20)
    expected = [w.numpy() for w in map(CRMOGM(base).weights, gramians)]
    first = CRMOGM(base)
    got = [first.weights(M).numpy() for M in gramians[:9]]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = CRMOGM(base)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got += [resumed.weights(M).numpy() for M in gramians[9:]]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    fresh = [CRMOGM(base).weights(M).numpy() for M in gramians[9:]]
    assert any(not np.array_equal(a, b) for a, b in zip(fresh, expected[9:], strict=True))
    resumed.reset()
    np.testing.assert_array_equal(resumed.weights(gramians[0]).numpy(), expected[0])


def test_cr_mogm_bases_are_every_gramian_method():
    from deconflict.methods.registry import method_class

    gramian_methods = {name for name in deconflict.available()
                       if issubclass(method_class(name), deconflict.methods.GramianWeighting)}
    assert set(BASES) == gramian_methods - {"cr_mogm", "mgda_ub", "aligned_mtl_ub",
                                          "cagrad_fast"}
    with pytest.raises(deconflict.InvalidOptionError, match="base must be one of"):
        CRMOGM(base="sum")
    method = CRMOGM(base="mgda")
    method.weights(np.eye(3))
    with pytest.raises(deconflict.ShapeError, match="changed from 3 to 2; call reset"):
        method.weights(np.eye(2))


def test_cr_mogm_matches_torchjd_on_the_same_base_weights():
    """TorchJD's CRMOGMWeighting wrapped around our base's weights: the same recursion, from the
    same first step, so the same numbers to the last bit."""
    A = pytest.importorskip("torchjd.aggregation")
    base = deconflict.get("imtl_g")
    theirs = A.CRMOGMWeighting(lambda M: base.weights(M), alpha=0.8)
    mine = CRMOGM("imtl_g", alpha=0.8)
    for M in _gramians():
        reference = theirs(torch.from_numpy(M)).numpy()
        np.testing.assert_allclose(mine.weights(M).numpy(), reference, rtol=4 * _EPS, atol=0)


# -------------------------------------------------------------------------- geometric mean
def test_geometric_mean_golden():
    """L = (1, 2, 4): G = 8^(1/3) = 2, c_i = G / (3 L_i) = (2/3, 1/3, 1/6)."""
    c, diagnostics = GeometricMean().weights_with_diagnostics(losses=[1.0, 2.0, 4.0])
    assert_close_relative(c.numpy(), [2 / 3, 1 / 3, 1 / 6], GOLDEN_RTOL)
    assert math.isclose(diagnostics["geometric_mean"], 2.0, rel_tol=GOLDEN_RTOL)
    # One loss times s (its gradient too): every term c_i grad L_i scales by s^(1/T).
    scaled = GeometricMean().weights(losses=[1.0, 2.0, 4.0 * 2.0**30]).numpy()
    assert_close_relative(scaled * [1.0, 1.0, 2.0**30], c.numpy() * 2.0**10, 8 * GOLDEN_RTOL)
    with pytest.raises(deconflict.InvalidOptionError, match=r"positive losses.*L_1 = 0\.0"):
        GeometricMean().weights(losses=[1.0, 0.0])


def test_geometric_mean_is_the_gradient_of_torchjds_geometric_mean():
    """backward() with GeometricMean writes the gradient of (prod L_i)^(1/T), which TorchJD's
    scalarizer differentiates by autograd: on the trunk and on every head."""
    S = pytest.importorskip("torchjd.scalarization")
    from torch import nn

    def model():
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).double()
        heads = nn.ModuleList(nn.Linear(5, 1).double() for _ in range(3))
        z = trunk(torch.randn(16, 4, dtype=torch.float64))
        losses = [h(z).pow(2).mean() + 0.1 * (k + 1) for k, h in enumerate(heads)]
        return trunk, heads, losses

    trunk, heads, losses = model()
    S.GeometricMean()(torch.stack(losses)).backward()
    reference = [p.grad.clone() for p in [*trunk.parameters(), *heads.parameters()]]
    trunk, heads, losses = model()
    deconflict.backward(losses, trunk, GeometricMean())
    for mine, theirs in zip([p.grad for p in [*trunk.parameters(), *heads.parameters()]],
                            reference, strict=True):
        assert_close_relative(mine.numpy(), theirs.numpy(), 1e-12, "gradient of G")


# --------------------------------------------------------------------------------- STCH, PBI
def test_stch_golden_and_limits():
    """lambda = (1, 1), mu = 1, L = (0, log 2): softmax(0, log 2) = (1/3, 2/3). Small mu puts
    the weight on the largest weighted excess; large mu gives lambda / T."""
    c = STCH(mu=1.0, pref_vector=[1.0, 1.0]).weights(losses=[0.0, math.log(2.0)]).numpy()
    assert_close_relative(c, [1 / 3, 2 / 3], GOLDEN_RTOL)
    losses = [1.0, 3.0, 2.0]
    sharp = STCH(mu=1e-3, reference=[0.5, 0.5, 0.5]).weights(losses=losses).numpy()
    assert_close_relative(sharp, [0.0, 1 / 3, 0.0], 1e-12)
    flat = STCH(mu=1e12).weights(losses=losses).numpy()
    assert_close_relative(flat, [1 / 9] * 3, 1e-11)
    # Huge losses: the softmax is shifted by its maximum, so nothing overflows.
    assert_close_relative(STCH().weights(losses=[1e308, 1e308]).numpy(), [0.25, 0.25],
                          GOLDEN_RTOL)


def test_pbi_golden_and_on_the_ray():
    """L = (3, 1), u = (1, 1) / sqrt 2: d_1 = 2 sqrt 2, r - d_1 u = (1, -1), d_2 = sqrt 2, so
    c = (1, 1) / sqrt 2 + 5 (1, -1) / sqrt 2 = (6, -4) / sqrt 2. On the ray, c = u."""
    c, diagnostics = PBI(theta=5.0).weights_with_diagnostics(losses=[3.0, 1.0])
    assert_close_relative(c.numpy(), np.array([6.0, -4.0]) / math.sqrt(2), GOLDEN_RTOL)
    assert math.isclose(diagnostics["d1"], 2 * math.sqrt(2), rel_tol=GOLDEN_RTOL)
    assert math.isclose(diagnostics["d2"], math.sqrt(2), rel_tol=GOLDEN_RTOL)
    on_ray = PBI(pref_vector=[1.0, 2.0], reference=[1.0, 1.0]).weights(losses=[2.0, 3.0])
    assert_close_relative(on_ray.numpy(), np.array([1.0, 2.0]) / math.sqrt(5), GOLDEN_RTOL)
    with pytest.raises(deconflict.ShapeError, match="reference has 1 entries for 2 tasks"):
        PBI(reference=[1.0]).weights(losses=[1.0, 2.0])


@pytest.mark.parametrize("make", [
    lambda: STCH(mu=0.3, pref_vector=[0.2, 0.5, 0.3], reference=[0.1, 0.0, -0.2]),
    lambda: PBI(theta=3.0, pref_vector=[1.0, 2.0, 0.5], reference=[0.1, 0.0, -0.2]),
], ids=["stch", "pbi"])
def test_scalarization_weights_are_the_gradient_of_the_scalarized_loss(make):
    """c = dg/dL, checked against autograd of g written directly (the log-sum-exp / d1 + theta
    d2) on random losses: the same derivative, evaluated two ways (a few roundings apart)."""
    method = make()
    rng = np.random.default_rng(4)
    for _ in range(20):
        losses = torch.tensor(rng.uniform(0.1, 3.0, 3), dtype=torch.float64, requires_grad=True)
        lam = torch.tensor(method.pref_vector, dtype=torch.float64)
        z = torch.tensor(method.reference, dtype=torch.float64)
        if isinstance(method, STCH):
            value = method.mu * torch.logsumexp(lam * (losses - z) / method.mu, dim=0)
        else:
            u = lam / lam.norm()
            d1 = u @ (losses - z)
            value = d1 + method.theta * (losses - z - d1 * u).norm()
        (expected,) = torch.autograd.grad(value, losses)
        got = method.weights(losses=losses.detach().numpy()).numpy()
        assert_close_relative(got, expected.numpy(), 64 * _EPS)


# ------------------------------------------------------------------------ parity (TorchJD)
def test_krum_matches_torchjd_with_its_distances():
    """TorchJD scores by sums of distances (distance="euclidean" here): the same rows are
    selected, so the updates are the same average of rows (combination_rtol). Ties at the
    selection boundary are skipped: with one neighbour (T = f + 3) the closest pair always
    ties, and TorchJD's topk breaks ties its own way (here: the lower index)."""
    A = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(2)
    compared = tied = 0
    for J in _problems(80):
        T = J.shape[0]
        M = (J @ J.T).numpy()
        for f in range(T - 2):
            m = int(rng.integers(1, T + 1))
            scores = np.sort(krum_scores(M, f, squared=False))
            if m < T and scores[m] - scores[m - 1] <= 1e-12 * scores[m]:
                tied += 1
                continue
            theirs = A.Krum(n_byzantine=f, n_selected=m)(J).numpy()
            mine = update(Krum(n_byzantine=f, n_selected=m, distance="euclidean"), J.numpy())
            assert _relative(mine, theirs) <= combination_rtol(J.numpy(), theirs)
            compared += 1
    assert compared >= 60 and tied <= compared


def test_trimmed_mean_matches_torchjd():
    A = pytest.importorskip("torchjd.aggregation")
    for J in _problems(80):
        for trim in range((J.shape[0] - 1) // 2 + 1):
            theirs = A.TrimmedMean(trim_number=trim)(J).numpy()
            mine = update(TrimmedMean(trim=trim), J.numpy())
            assert _relative(mine, theirs) <= combination_rtol(J.numpy(), theirs)
def _problems(count: int = 60):
    rng = np.random.default_rng(0)
    for _ in range(count):
        T = int(rng.integers(2, 6))
        yield torch.from_numpy(rng.standard_normal((T, int(rng.integers(T, 12)))))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def config_parity_rtol(J: np.ndarray, c: np.ndarray) -> float:
    """How far two stable evaluations of ConFIG's D = J^T c may be apart, relatively.

    Both solve U x = p (TorchJD by an SVD of U, here by an eigendecomposition of K = U U^T),
    a problem of condition number cond(K) in the Gramian form: its data (the unit rows, or K's
    entries, d-term dot products) err by gamma_d, the factorizations by T gamma_(T+1) (as in
    solve_rtol), so the weights differ by at most 2 cond(K) (gamma_d + T gamma_(T+1)); forming
    J^T c and the length sum_i g_i . x_hat add 2 gamma_(T+d) sum_i |c_i| |g_i| / |D|.
    """
    T, d = J.shape
    U = J / np.linalg.norm(J, axis=1, keepdims=True)
    condition = np.linalg.cond(U @ U.T)
    spread = float(np.abs(c) @ np.linalg.norm(J, axis=1)) / float(np.linalg.norm(c @ J))
    return (2.0 * condition * (gamma(d) + T * gamma(T + 1))
            + 2.0 * gamma(T + d) * spread)


def test_config_matches_torchjd():
    A = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(1)
    worst = 0.0
    for J in _problems():
        T = J.shape[0]
        Jn = J.numpy()
        for p in (None, rng.uniform(0.1, 2.0, T)):
            method = ConFIG() if p is None else ConFIG(pref_vector=p.tolist())
            reference = A.ConFIG() if p is None else A.ConFIG(pref_vector=torch.from_numpy(p))
            c = method.weights(Jn @ Jn.T).numpy()
            difference = _relative(update(method, Jn), reference(J).numpy())
            assert difference <= config_parity_rtol(Jn, c)
            worst = max(worst, difference)
    assert worst > 0.0  # two different computations, not one compared with itself


@pytest.mark.filterwarnings("ignore")
def test_fairgrad_matches_torchjd_and_solves_at_least_as_well():
    """TorchJD runs scipy's least_squares to its default tolerances (1e-8): the directions
    agree to that precision, and our residual of Eq. 4 is never larger than its own (up to the
    rounding floor of evaluating it, 64 T eps)."""
    A = pytest.importorskip("torchjd.aggregation")
    for J in _problems():
        M = (J @ J.T).numpy()
        T = M.shape[0]
        for alpha in (0.5, 1.0, 2.0):
            theirs = A.FairGradWeighting(alpha)(torch.from_numpy(M)).numpy()
            mine = FairGrad(alpha).weights(M).numpy()
            assert _relative(mine @ J.numpy(), theirs @ J.numpy()) <= 1e-6
            ours = relative_residual(M, mine, alpha).max()
            assert ours <= max(relative_residual(M, theirs, alpha).max(), 64 * T * _EPS)


def test_the_new_methods_are_registered():
    for name, cls in [("gradops_static", GradOPSStatic), ("fairgrad", FairGrad),
                      ("config", ConFIG), ("krum", Krum), ("cr_mogm", CRMOGM)]:
        assert isinstance(deconflict.get(name), cls)
        assert isinstance(deconflict.get(name), deconflict.methods.GramianWeighting)
    assert isinstance(deconflict.get("trimmed_mean"), deconflict.methods.JacobianAggregator)
    for name in ("geometric_mean", "stch", "pbi"):
        assert isinstance(deconflict.get(name), deconflict.methods.LossWeighting)


@pytest.mark.parametrize("name", ["gradops_static", "fairgrad", "config", "krum", "cr_mogm"])
def test_backward_in_every_mode_matches_aggregate(name):
    """The same update from the Gramian mode, the Jacobian modes and ``aggregate``."""
    from torch import nn

    def step(mode: str) -> torch.Tensor:
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).double()
        heads = [nn.Linear(5, 1).double() for _ in range(3)]
        if mode == "gramian":
            deconflict.track(trunk)
        z = trunk(torch.randn(16, 4, dtype=torch.float64))
        losses = [h(z).pow(2).mean() + 0.1 * k for k, h in enumerate(heads)]
        deconflict.backward(losses, trunk, deconflict.get(name), mode=mode)
        return torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])

    reference = step("sequential")
    for mode in ("batched", "gramian"):
        assert_close_relative(step(mode).numpy(), reference.numpy(), 1e-9, f"{name} {mode}")


@pytest.mark.parametrize(("name", "flags", "options"), [
    ("krum", ["--n-byzantine", "0", "--n-selected", "2", "--distance", "euclidean"],
     {"n_byzantine": 0, "n_selected": 2, "distance": "euclidean"}),
    ("trimmed_mean", ["--trim", "1"], {"trim": 1}),
])
def test_three_task_methods_through_the_cli(name, flags, options, census_data, tmp_path, capsys):
    """Krum and TrimmedMean need three tasks (toy2d has two): census-income, every option as a
    flag, then the name:key=value form finds the same run."""
    import json

    from deconflict.cli import main

    common = ["--smoke", "--quiet", "--out", str(tmp_path)]
    assert main(["run", "census-income", "--method", name, *flags, *common]) == 0
    (record,) = tmp_path.rglob("*.json")
    assert json.loads(record.read_text())["options"] == options
    spec = ":".join([name, *(f"{key}={value}" for key, value in options.items())])
    assert main(["run", "census-income", "--method", spec, *common]) == 0
    assert list(tmp_path.rglob("*.json")) == [record]
    capsys.readouterr()
