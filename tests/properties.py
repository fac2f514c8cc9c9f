"""Named property assertions, shared by every method's tests.

Each takes plain arrays (float64 NumPy) so it can check any method's output, and fails with a
message that names the violated property and by how much.
"""

from __future__ import annotations

import numpy as np
import torch

import deconflict


def as_array(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_finite(values, what: str = "output") -> None:
    values = as_array(values)
    assert np.isfinite(values).all(), f"{what} is not finite: {values}"


def relative_dots(J: np.ndarray, D: np.ndarray) -> np.ndarray:
    """cos(g_j, D) with 0 where g_j or D is zero."""
    norms = np.linalg.norm(J, axis=1) * np.linalg.norm(D)
    dots = J @ D
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)


def assert_non_conflicting(J, D, rtol: float = 1e-6) -> None:
    """g_j . D >= -rtol ||g_j|| ||D|| for every task j (weak non-conflict)."""
    J, D = as_array(J), as_array(D)
    cosines = relative_dots(J, D)
    assert cosines.min() >= -rtol, (
        f"update conflicts with task {int(cosines.argmin())}: cos = {cosines.min():.3e}"
    )


def assert_strongly_non_conflicting(J, rows, rtol: float = 1e-6) -> None:
    """Every modified gradient g'_i = rows[i] @ J has g'_i . g_j >= -rtol |g'_i| |g_j|."""
    J, rows = as_array(J), as_array(rows)
    for i, row in enumerate(rows):
        modified = row @ J
        cosines = relative_dots(J, modified)
        assert cosines.min() >= -rtol, (
            f"modified gradient {i} conflicts with task {int(cosines.argmin())}: "
            f"cos = {cosines.min():.3e}"
        )


def assert_close_relative(
    actual, expected, rtol: float, what: str = "update", atol: float = 0.0
) -> None:
    """||actual - expected|| <= rtol * max(||expected||, ||actual||) + atol (both zero passes)."""
    actual, expected = as_array(actual), as_array(expected)
    scale = max(np.linalg.norm(expected), np.linalg.norm(actual))
    error = np.linalg.norm(actual - expected)
    assert error <= rtol * scale + atol or scale == 0.0, (
        f"{what} differs by {error / scale:.3e} relative (allowed {rtol:g}):\n"
        f"actual   {actual}\nexpected {expected}"
    )


def rounding_scale(J) -> float:
    """An absolute tolerance for updates that cancel to rounding: 1e-12 of sum_i ||g_i||."""
    return 1e-12 * float(np.linalg.norm(as_array(J), axis=1).sum())


def assert_positive_multiple(D, g, rtol: float = 1e-9) -> None:
    """D = s g for some s > 0 (or both zero)."""
    D, g = as_array(D), as_array(g)
    if np.linalg.norm(g) == 0.0:
        assert np.linalg.norm(D) == 0.0, f"zero gradient but nonzero update {D}"
        return
    scale = (D @ g) / (g @ g)
    assert scale > 0, f"update {D} is not a positive multiple of {g}"
    assert_close_relative(D, scale * g, rtol, "single-task update")


def assert_on_simplex(w, atol: float = 1e-12) -> None:
    w = as_array(w)
    assert w.min() >= -atol, f"negative weight {w.min()}"
    assert abs(w.sum() - 1.0) <= 1e-10, f"weights sum to {w.sum()}"


def assert_min_norm_optimal(M, w, rtol: float = 1e-9) -> None:
    """KKT of min w^T M w on the simplex: (M w)_i >= w^T M w, equality on the support."""
    M, w = as_array(M), as_array(w)
    assert_on_simplex(w)
    Mw = M @ w
    value = w @ Mw
    scale = max(np.max(np.diag(M)), 1e-300)
    assert Mw.min() >= value - rtol * scale, f"not optimal: min (Mw) {Mw.min()} < {value}"
    support = w > 1e-9
    assert np.all(np.abs(Mw[support] - value) <= rtol * scale * 10), (
        f"complementary slackness fails on the support: {Mw[support]} vs {value}"
    )


def update(method, J: np.ndarray, **context) -> np.ndarray:
    """deconflict.aggregate in float64, as an array."""
    return as_array(deconflict.aggregate(torch.from_numpy(J), method, **context))


def manual_jacobian(losses, params) -> torch.Tensor:
    """The T x d Jacobian by one autograd.grad per loss (zeros where a loss misses a parameter):
    the reference the engine's modes are checked against."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for p, g in zip(params, grads, strict=True)]))
    return torch.stack(rows)
