"""The shared property suite, run on every registered method.

Every method, on every input class of ``strategies.KINDS`` at global scales 1e-20..1e20, returns a
finite update or raises a deconflict error; methods that guarantee it never conflict; the
single-task update is a positive multiple of the gradient; homogeneous methods scale linearly.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from properties import (
    assert_close_relative,
    assert_finite,
    assert_non_conflicting,
    assert_positive_multiple,
    rounding_scale,
    update,
)
from strategies import build_jacobian, jacobians

import deconflict
from deconflict.methods import JacobianAggregator
from deconflict.methods.registry import method_class

ALL_METHODS = deconflict.available()
# Methods whose update never conflicts with a task gradient (docs/methods.md#stationarity),
# with their defaults.
NON_CONFLICTING = ("gradops", "gradops_static", "mgda", "mgda_ub", "imtl_g", "tensioner",
                   "upgrad", "dualproj", "nash_mtl", "fairgrad", "log_losses", "mgda_log",
                   "imtl_g_log")
# D(s J) = s D(J) for s > 0 (fresh instances; Nash-MTL and MGDA-UB's "loss+" are scale-free).
HOMOGENEOUS = ("sum", "mean", "gradops", "pcgrad", "mgda", "cagrad", "cagrad_fast", "imtl_g",
               "upgrad", "dualproj", "aligned_mtl", "gradvac", "graddrop", "db_mtl", "uw", "dwa",
               "rlw", "famo", "imtl_l", "gradnorm", "gradops_static", "config", "cr_mogm",
               "trimmed_mean", "geometric_mean", "stch", "pbi", "log_losses", "mgda_log",
               "cagrad_log", "imtl_g_log", "si_ls", "cosmos", "aligned_mtl_ub", "sdmgrad")
# Robust aggregators that select among the gradients: a single task is refused, by name.
NEEDS_SEVERAL_TASKS = ("krum",)
# Deterministic, so permuting the tasks (and their losses) permutes nothing in the update.
ORDER_FREE = ("sum", "mean", "gradops", "mgda", "mgda_ub", "cagrad", "imtl_g", "upgrad",
              "dualproj", "aligned_mtl", "nash_mtl", "db_mtl", "uw", "dwa", "famo", "imtl_l",
              "gradops_static", "fairgrad", "config", "cr_mogm", "trimmed_mean", "geometric_mean",
              "stch", "pbi", "log_losses", "mgda_log", "cagrad_log", "imtl_g_log", "si_ls",
              "cosmos", "aligned_mtl_ub", "moco", "modo", "sdmgrad", "excess_mtl")


def make(name: str) -> deconflict.Method:
    """A method with a fixed seed where it draws random numbers."""
    cls = method_class(name)
    return cls(seed=0) if "seed" in inspect.signature(cls).parameters else cls()


def losses_for(J: np.ndarray) -> np.ndarray:
    return np.linspace(0.5, 2.0, J.shape[0])


def test_registry_holds_every_method_of_the_issues():
    assert set(ALL_METHODS) >= {
        "sum", "mean", "gradops", "pcgrad", "mgda", "cagrad", "cagrad_fast", "imtl_g",
        "tensioner", "gradvac", "graddrop", "gradnorm", "uw", "dwa", "rlw", "famo", "db_mtl",
        "nash_mtl", "aligned_mtl", "upgrad", "mgda_ub", "imtl_l", "dualproj"}


@pytest.mark.parametrize("name", ALL_METHODS)
@given(J=jacobians())
def test_output_is_finite_or_a_clear_error(name, J):
    try:
        D = update(make(name), J, losses=losses_for(J))
    except deconflict.DeconflictError:
        return
    assert_finite(D, f"{name} update")
    assert D.shape == (J.shape[1],)


@pytest.mark.parametrize("name", NON_CONFLICTING)
@given(J=jacobians())
def test_update_never_conflicts(name, J):
    D = update(make(name), J, losses=losses_for(J))
    assert_non_conflicting(J, D)


@pytest.mark.parametrize("name", NON_CONFLICTING)
@given(data=st.data())
def test_update_never_conflicts_over_a_run(name, data):
    """Stateful methods too: ten-plus steps, past the tensioner's warm-up window."""
    method = make(name)
    for step in range(14):
        J = data.draw(jacobians(min_tasks=3, max_tasks=3, max_dim=5), label=f"J{step}")
        losses = np.exp(np.sin(np.arange(3) + step))
        assert_non_conflicting(J, update(method, J, losses=losses))


@pytest.mark.parametrize("name", ALL_METHODS)
@given(J=jacobians(kinds=("single",)))
def test_single_task_gives_a_positive_multiple_of_its_gradient(name, J):
    if name in NEEDS_SEVERAL_TASKS:
        with pytest.raises(deconflict.ShapeError, match="got 1"):
            update(make(name), J, losses=losses_for(J))
        return
    assert_positive_multiple(update(make(name), J, losses=losses_for(J)), J[0])


@pytest.mark.parametrize("name", ALL_METHODS)
def test_single_zero_gradient_gives_zero_update(name):
    J = np.zeros((1, 4))
    if name in NEEDS_SEVERAL_TASKS:
        with pytest.raises(deconflict.ShapeError, match="got 1"):
            update(make(name), J, losses=[1.0])
        return
    np.testing.assert_array_equal(update(make(name), J, losses=[1.0]), np.zeros(4))


@pytest.mark.parametrize("name", HOMOGENEOUS)
@given(J=jacobians(scales=False), exponent=st.sampled_from([-66, -16, 16, 66]))
def test_homogeneous_methods_scale_linearly(name, J, exponent):
    # Powers of two (2^66 ~ 1e20) scale J exactly, so any difference is the method's own.
    scale = 2.0**exponent
    base = update(make(name), J, losses=losses_for(J))
    scaled = update(make(name), J * scale, losses=losses_for(J))
    assert_close_relative(scaled / scale, base, 1e-8, f"{name} at scale {scale:g}")


@pytest.mark.parametrize("name", ORDER_FREE)
@given(J=jacobians(kinds=("random", "norm_spread", "conflicting", "rank_deficient"),
                   min_tasks=2), seed=st.integers(0, 2**16))
def test_deterministic_methods_are_invariant_to_task_order(name, J, seed):
    perm = np.random.default_rng(seed).permutation(J.shape[0])
    base = update(make(name), J, losses=losses_for(J))
    permuted = update(make(name), J[perm], losses=losses_for(J)[perm])
    assert_close_relative(permuted, base, 1e-7, f"{name} with tasks permuted",
                          atol=10 * rounding_scale(J))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_float32_jacobian_gives_float32_update(name):
    J = build_jacobian("conflicting", 3, 3, 5, 0.0).astype(np.float32)
    D = deconflict.aggregate(torch.from_numpy(J), make(name), losses=[1.0, 2.0, 3.0])
    assert D.dtype == torch.float32
    assert_finite(D)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_weights_accept_tensor_and_array_gramians(name):
    J = build_jacobian("random", 5, 3, 4, 0.0)
    M = J @ J.T
    if isinstance(make(name), JacobianAggregator):
        with pytest.raises(deconflict.InvalidOptionError, match="task gradients themselves"):
            make(name).weights(M, losses=[1.0, 2.0, 3.0])
        return
    a = make(name).weights(torch.from_numpy(M), losses=[1.0, 2.0, 3.0])
    b = make(name).weights(M, losses=np.array([1.0, 2.0, 3.0]))
    assert a.dtype == torch.float64 and a.shape == (3,)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
