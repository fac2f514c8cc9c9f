"""The compiled T x T solves (MGDA's min-norm active set, IMTL-G's pivoted Cholesky) against
their NumPy references, and the lean path of ``aggregate`` that hands them the kernel's Gramian.

Bounds come from the problems, not from one machine's rounding:

- min norm: a point w that passes the KKT test (M w)_j >= w^T M w - tol_j is within max_j tol_j
  of the optimal value (convexity: f(w) - f* <= w^T M w - min_j (M w)_j), so two verified
  points have values within the sum of their largest tolerances;
- IMTL-G: two solutions of K x = 1 with residuals r_a, r_b differ by K^-1 (r_a - r_b), so
  ||x_a - x_b|| <= (||r_a|| + ||r_b||) / lambda_min(K), the residuals being computed in float64
  (each within gamma_T (|K| |x| + 1) of the exact one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deconflict
from deconflict import solvers
from deconflict.errors import NonFiniteGradientError
from deconflict.linalg import task_norms
from deconflict.methods import imtl_g

EPS = float(np.finfo(np.float64).eps)

needs_numba = pytest.mark.skipif(solvers.numba is None, reason="numba not installed")


def _gramian(kind: str, T: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((T, d))
    if kind == "spread":  # norms spanning up to 1e12
        J = J * np.logspace(0, 12, T)[:, None]
    elif kind == "collinear":
        J = rng.standard_normal((1, d)) + 1e-3 * J
    elif kind == "duplicate":  # two identical rows: a singular face, NumPy's fallback
        J[1] = J[0]
    return J @ J.T


def _tolerances(M: np.ndarray, w: np.ndarray) -> np.ndarray:
    """tol_j of ``min_norm_solution``'s KKT test, in units of M (not of M / max n^2)."""
    n = task_norms(M)
    sigma = float(w @ n)
    return 4.0 * (M.shape[0] + 2) * EPS * (n + sigma) * sigma


@needs_numba
@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["random", "spread", "collinear", "duplicate"]),
       T=st.integers(2, 12), d=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_compiled_min_norm_matches_numpy(kind, T, d, seed):
    M = _gramian(kind, T, d, seed)
    n = task_norms(M)
    if n.min() == 0.0:
        return
    reference, reference_verified = solvers._min_norm_numpy(M, n)
    w, verified = solvers.min_norm_solution(M)
    assert verified == reference_verified
    assert np.all(w >= 0.0) and abs(w.sum() - 1.0) <= 4 * T * EPS
    if verified:
        # Both pass the KKT test: their values are within the tolerances of the optimum.
        bound = _tolerances(M, w).max() + _tolerances(M, reference).max()
        assert abs(float(w @ M @ w) - float(reference @ M @ reference)) <= bound
        assert np.all(M @ w >= float(w @ M @ w) - _tolerances(M, w))


@needs_numba
def test_a_singular_face_falls_back_to_numpy_exactly(monkeypatch):
    """When the compiled solve meets a face whose bordered system is singular it returns an
    empty result, and ``min_norm_solution`` returns NumPy's answer for the whole solve (forced
    here: which faces the active set visits depends on the rounding)."""
    J = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.5], [-0.2, 0.3, 1.0]])
    M = J @ J.T
    reference, reference_verified = solvers._min_norm_numpy(M, task_norms(M))
    calls: list[int] = []

    def singular(gramian, n, iterations):
        calls.append(iterations)
        return np.empty(0), False

    monkeypatch.setattr(solvers, "_min_norm_compiled", singular)
    w, verified = solvers.min_norm_solution(M)
    assert calls == [20 * 4 + 50]
    assert np.array_equal(w, reference) and verified == reference_verified


@needs_numba
def test_compiled_min_norm_segment_and_exact_cases():
    # Two tasks: the closed form, (7 g_1 + 6 g_2) / 13 for the docstring's conflicting pair.
    J = np.array([[1.0, 0.0], [-0.5, 1.0]])
    w, verified = solvers.min_norm_solution(J @ J.T)
    assert verified and np.allclose(w, [7 / 13, 6 / 13], rtol=0, atol=8 * EPS)
    # Orthonormal gradients: the centroid, exactly found by the active set.
    w, verified = solvers.min_norm_solution(np.eye(5))
    assert verified and np.allclose(w, np.full(5, 0.2), rtol=0, atol=16 * EPS)


@needs_numba
@settings(max_examples=80, deadline=None)
@given(kind=st.sampled_from(["random", "spread", "collinear", "duplicate"]),
       T=st.integers(2, 12), d=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_compiled_imtl_g_matches_numpy(kind, T, d, seed):
    M = _gramian(kind, T, d, seed)
    n = task_norms(M)
    if n.min() == 0.0:
        return
    reference, reference_outcome = imtl_g._raw_weights(M, n, np.arange(T))
    a, outcome = imtl_g._raw_weights_compiled(M, n, imtl_g._RCOND, imtl_g._RESIDUAL_TOL)
    if outcome == imtl_g._RANK_DEFICIENT:
        return  # left to the NumPy path (the reference itself)
    assert outcome == reference_outcome
    if outcome != imtl_g._SOLVED:
        return
    K = M / np.outer(n, n)
    np.fill_diagonal(K, 1.0)
    lowest = float(np.linalg.eigvalsh(K)[0])
    gamma = 4.0 * (T + 2) * EPS
    if lowest <= 1e3 * gamma * T:  # lambda_min itself not resolved: no bound to test
        return
    x, y = a * n, reference * n
    ones = np.ones(T)

    def residual(v: np.ndarray) -> float:
        return float(np.linalg.norm(K @ v - ones)) + gamma * (
            float(np.linalg.norm(np.abs(K) @ np.abs(v))) + np.sqrt(T))

    bound = (residual(x) + residual(y)) / (lowest - gamma * T)
    assert float(np.linalg.norm(x - y)) <= bound


@pytest.mark.parametrize("name", ["mgda", "imtl_g", "upgrad", "pcgrad", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_aggregate_every_layout_agrees(name, dtype):
    """The lean path (contiguous float32/float64), the general path (``block_sizes``) and the
    layouts the kernels cannot read (half precision, a transposed view) give the same update;
    the general and lean paths bit for bit (the same kernels)."""
    generator = torch.Generator().manual_seed(3)
    J = torch.randn(3, 700, generator=generator).to(dtype)
    J[1] = -0.5 * J[0] + 0.3 * J[1]

    def method() -> deconflict.Method:  # a fresh instance, seeded where the method samples
        seeded = {"seed": 0} if "seed" in deconflict.get(name).options() else {}
        return deconflict.get(name, **seeded)

    lean = deconflict.aggregate(J, method())
    general = deconflict.aggregate(J, method(), block_sizes=[J.shape[1]])
    assert lean.dtype == dtype and torch.equal(lean, general)
    if name != "mean":
        return
    # A transposed view (column stride 3) goes to the torch kernels, which sum in another
    # order: for D = J^T c with c = 1/T, both float64 sums are within gamma_T sum_i |c_i g_i|
    # of the exact one, and each is rounded once to the dtype (one spacing, <= eps |D|).
    strided = deconflict.aggregate(J.T.contiguous().T, method()).double()
    exact = general.double()
    terms = (J.double().abs() / J.shape[0]).sum(dim=0)
    eps = torch.finfo(dtype).eps
    bound = eps * torch.maximum(strided.abs(), exact.abs()) + 2 * 5 * EPS * terms
    assert bool(((strided - exact).abs() <= bound + torch.finfo(dtype).tiny).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["mgda", "imtl_g", "mean", "sum"])
def test_aggregate_names_the_non_finite_task(bad, name):
    J = torch.randn(3, 50)
    J[2, 7] = bad
    with pytest.raises(NonFiniteGradientError, match="loss 2"):
        deconflict.aggregate(J, name)


def test_aggregate_of_a_loss_weighting_overflows_clearly():
    """sum's lean path forms no Gramian: an overflow of D's dtype still gets the general path's
    error, not an infinite update."""
    with pytest.raises(NonFiniteGradientError, match="overflows"):
        deconflict.aggregate(torch.full((2, 3), 3e38), "sum")
