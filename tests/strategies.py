"""Hypothesis strategies for task Jacobians, one per input class the methods must survive.

Each Jacobian is built from a drawn seed with NumPy, so shrinking stays meaningful (kind, sizes,
scales) while the construction is exact: duplicates are exact copies, combinations exact sums.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

KINDS = (
    "random",          # generic full-rank rows
    "rank_deficient",  # J = A B with inner rank below min(T, d)
    "duplicate",       # one row an exact copy of another
    "near_duplicate",  # two rows with cosine 1 - 1e-9
    "combination",     # a row that is an exact combination of others at very different scales
    "zero_row",        # a task whose gradient is exactly zero
    "wide",            # more tasks than dimensions (T > d)
    "single",          # T = 1
    "norm_spread",     # row norms spanning six orders of magnitude
    "conflicting",     # every pair strongly conflicting (sum of rows near zero)
)


def _unit_orthogonal(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    while True:
        u = rng.standard_normal(v.shape)
        u -= (u @ v) / (v @ v) * v
        if np.linalg.norm(u) > 1e-6:
            return u / np.linalg.norm(u)


def build_jacobian(kind: str, seed: int, tasks: int, dim: int, log_scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "single":
        J = rng.standard_normal((1, dim))
    elif kind == "wide":
        d = max(1, min(dim, tasks - 1))
        J = rng.standard_normal((tasks, d))
    elif kind == "rank_deficient":
        rank = max(1, min(tasks, dim) - 1)
        J = rng.standard_normal((tasks, rank)) @ rng.standard_normal((rank, dim))
    else:
        J = rng.standard_normal((tasks, max(dim, tasks)))
    T = J.shape[0]
    if kind == "duplicate" and T >= 2:
        J[T - 1] = J[0]
    elif kind == "near_duplicate" and T >= 2:
        angle = np.sqrt(2e-9)  # cos(angle) = 1 - 1e-9 to first order
        J[T - 1] = np.linalg.norm(J[0]) * (
            np.cos(angle) * J[0] / np.linalg.norm(J[0])
            + np.sin(angle) * _unit_orthogonal(rng, J[0])
        )
    elif kind == "combination" and T >= 3:
        J[T - 1] = 1e3 * J[0] - 1e-3 * J[1]
    elif kind == "zero_row" and T >= 2:
        J[rng.integers(T)] = 0.0
    elif kind == "norm_spread":
        J *= 10.0 ** rng.uniform(-3.0, 3.0, size=(T, 1))
    elif kind == "conflicting" and T >= 2:
        J -= J.mean(axis=0, keepdims=True) * (1.0 + 0.05 * rng.standard_normal())
    return J * 10.0**log_scale


@st.composite
def jacobians(
    draw: st.DrawFn, *, kinds: tuple[str, ...] = KINDS, min_tasks: int = 1, max_tasks: int = 6,
    max_dim: int = 8, scales: bool = True,
) -> np.ndarray:
    kind = draw(st.sampled_from([k for k in kinds if k != "single" or min_tasks <= 1]))
    seed = draw(st.integers(0, 2**32 - 1))
    tasks = draw(st.integers(max(min_tasks, 2 if kind != "single" else 1), max_tasks))
    dim = draw(st.integers(1, max_dim))
    log_scale = draw(st.sampled_from([0.0, -20.0, -8.0, 8.0, 20.0])) if scales else 0.0
    return build_jacobian(kind, seed, tasks, dim, log_scale)


@st.composite
def positive_losses(draw: st.DrawFn, tasks: int) -> np.ndarray:
    seed = draw(st.integers(0, 2**32 - 1))
    return np.exp(np.random.default_rng(seed).uniform(-3.0, 3.0, size=tasks))
