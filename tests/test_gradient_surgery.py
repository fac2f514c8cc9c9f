"""GradVac, GradDrop and DB-MTL: golden values and defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from properties import assert_close_relative, rounding_scale, update
from strategies import jacobians

import deconflict
from deconflict.methods import BlockWeighting
from deconflict.methods.gradvac import vaccinate


# ---------------------------------------------------------------------------------- GradVac
def test_gradvac_golden_first_two_steps():
    """g1 = (1, 0), g2 = (-1, 1), beta = 1/2, targets start at 0.

    Step 1: cos(g1, g2) = -1/sqrt 2 < 0, so each gradient is corrected to cosine 0, which is
    PCGrad's projection: g'_1 = (1/2, 1/2), g'_2 = (0, 1), D = (1/2, 3/2). The targets move to
    (1 - 1/2) 0 + (1/2)(-1/sqrt 2) = -1/(2 sqrt 2).
    Step 2: cos = -1/sqrt 2 is still below the target -1/(2 sqrt 2), so g1 is corrected to have
    exactly that cosine with g2: a = |g1| (t sqrt(1 - c^2) - c sqrt(1 - t^2)) / (|g2| sqrt(1 - t^2))
    with c = -1/sqrt 2, t = -1/(2 sqrt 2): a = (-1/4 + sqrt(7/8)/sqrt 2) / (sqrt 2 sqrt(7/8)).
    """
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    method = deconflict.GradVac(beta=0.5)
    np.testing.assert_allclose(update(method, J), [0.5, 1.5], rtol=1e-14)
    t = -1 / (2 * math.sqrt(2))
    np.testing.assert_allclose(method.targets[0], [[0.0, t], [t, 0.0]], rtol=1e-14)
    _, diagnostics = method.weights_with_diagnostics(J @ J.T)
    a = (-0.25 + math.sqrt(7 / 8) / math.sqrt(2)) / (math.sqrt(2) * math.sqrt(7 / 8))
    corrected = J[0] + a * J[1]
    cosine = corrected @ J[1] / (np.linalg.norm(corrected) * np.linalg.norm(J[1]))
    assert cosine == pytest.approx(t, rel=1e-12)
    assert diagnostics["corrections"] == 2


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread"), min_tasks=3, scales=False))
def test_gradvac_with_zero_targets_is_pcgrad(J):
    """beta = 0 keeps every target at 0: each correction is then PCGrad's projection."""
    gradvac = update(deconflict.GradVac(beta=0.0, seed=4), J)
    pcgrad = update(deconflict.PCGrad(seed=4), J)
    assert_close_relative(gradvac, pcgrad, 1e-10, atol=rounding_scale(J))


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread"), min_tasks=2, max_tasks=2,
                   scales=False))
def test_gradvac_correction_reaches_the_target_exactly(J):
    """docs/methods.md#gradvac: after a correction, cos(g'_i, g_j) equals phihat exactly."""
    M = J @ J.T
    target = 0.3
    C, new_targets, _ = vaccinate(M, np.full((2, 2), target), [np.array([1]), np.array([0])],
                                  0.5, "on_correction")
    cosine = M[0, 1] / math.sqrt(M[0, 0] * M[1, 1])
    for i in range(2):
        modified = C[i] @ J
        now = modified @ J[1 - i] / (np.linalg.norm(modified) * np.linalg.norm(J[1 - i]))
        if cosine < target:
            assert now == pytest.approx(target, abs=1e-10)
            # on_correction: the target moved, toward the cosine before the correction
            assert new_targets[i, 1 - i] == pytest.approx(0.5 * target + 0.5 * cosine)
        else:
            np.testing.assert_array_equal(C[i], np.eye(2)[i])
            assert new_targets[i, 1 - i] == target  # no correction, no move


def test_gradvac_granularity_groups():
    method = deconflict.GradVac(granularity="layer")
    assert isinstance(method, BlockWeighting) and not method.single_group
    assert method.group_blocks(["0", "0", "2", "2"]) == [0, 0, 1, 1]
    assert deconflict.GradVac(granularity="parameter").group_blocks(["0", "0", "2"]) == [0, 1, 2]
    whole = deconflict.GradVac()
    assert isinstance(whole, BlockWeighting) and whole.single_group
    assert whole.group_blocks(["0", "0", "2"]) == [0, 0, 0]


# --------------------------------------------------------------------------------- GradDrop
def test_graddrop_golden():
    """g1 = (1, -1), g2 = (1, 1). Coordinate 0: both positive, purity P = 1 > U, both kept: 2.
    Coordinate 1: signs disagree, P = 1/2: the positive one is kept if 1/2 > U, else the
    negative one, so D_1 = +1 or -1. U comes from the seeded generator (two uniform draws)."""
    J = np.array([[1.0, -1.0], [1.0, 1.0]])
    U = torch.rand(2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = [2.0, 1.0 if 0.5 > U[1] else -1.0]
    np.testing.assert_array_equal(update(deconflict.GradDrop(seed=11), J), expected)
    # Full leak keeps every gradient: the plain sum.
    np.testing.assert_array_equal(update(deconflict.GradDrop(leak=1.0, seed=11), J), [2.0, 0.0])


def test_graddrop_keeps_the_sign_with_the_agreeing_probability():
    """With purity P, the positive gradients survive with probability P (here 3/4)."""
    J = np.array([[3.0], [1.0], [-1.0]])  # P = (1 + 3/5) / 2 = 0.8
    method = deconflict.GradDrop(seed=0)
    kept_positive = np.mean([update(method, J)[0] > 0 for _ in range(4000)])
    assert kept_positive == pytest.approx(0.8, abs=0.02)


def test_graddrop_per_task_leak_is_validated():
    with pytest.raises(deconflict.ShapeError, match="2 leaks for 3 tasks"):
        update(deconflict.GradDrop(leak=[0.1, 0.2]), np.eye(3))
    with pytest.raises(deconflict.InvalidOptionError, match=r"leak\[1\]"):
        deconflict.GradDrop(leak=[0.1, 1.2])


# ----------------------------------------------------------------------------------- DB-MTL
def test_db_mtl_golden_two_steps():
    """g1 = (3, 0), g2 = (0, 4), losses (1, 2), beta = 0.9.
    Step 1: gl = (g1 / 1, g2 / 2) = ((3, 0), (0, 2)); Ghat = 0.1 gl = ((0.3, 0), (0, 0.2)),
    norms (0.3, 0.2), scales a = (1, 1.5): D = (0.3, 0.3).
    Step 2: Ghat = 0.9 * 0.1 gl + 0.1 gl = 0.19 gl: D = (0.57, 0.57)."""
    J = np.array([[3.0, 0.0], [0.0, 4.0]])
    method = deconflict.DBMTL()
    np.testing.assert_allclose(update(method, J, losses=[1.0, 2.0]), [0.3, 0.3], rtol=1e-7)
    np.testing.assert_allclose(update(method, J, losses=[1.0, 2.0]), [0.57, 0.57], rtol=1e-7)
    np.testing.assert_allclose(method.head_coefficients(None, np.array([1.0, 2.0])), [1.0, 0.5],
                               rtol=1e-7)


def test_db_mtl_needs_losses_and_fixed_blocks():
    method = deconflict.DBMTL()
    with pytest.raises(deconflict.InvalidOptionError, match="needs the losses"):
        update(method, np.eye(2))
    update(method, np.eye(2), losses=[1.0, 1.0])
    with pytest.raises(deconflict.ShapeError, match="changed shape"):
        update(method, np.ones((2, 3)), losses=[1.0, 1.0])
