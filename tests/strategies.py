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


# ------------------------------------------------------------------ stationarity classes
STATIONARITY = (
    "strong",  # a strictly positive combination of the rows vanishes
    "weak",    # a non-negative one vanishes, no strictly positive one (strictly weakly stationary)
    "none",    # some x has J x > 0: not even weakly stationary
)


def build_stationary_jacobian(
    kind: str, seed: int, tasks: int, dim: int, rank: int, spread: float = 2.0
) -> np.ndarray:
    """A T x d Jacobian of rank ``rank`` in the stationarity class ``kind``, exactly by design.

    Rows are built in R^rank and embedded by orthonormal rows Q (rank x d), then scaled by
    positive factors 10^U(-spread, spread) and permuted; both keep the class. With a unit x:

    - "none": every row has a . x > 0, so J x > 0 and no non-negative v != 0 has v^T J = 0.
    - "strong": the last row is -(sum_i w_i a_i) / w_T with w > 0.
    - "weak": a set S of >= 2 rows orthogonal to x whose w-combination vanishes (w > 0), and
      the others with a . x > 0. Any v >= 0 with v^T J = 0 has v^T J x = sum over the others
      of v_i a_i . x = 0, so v is zero off S: no strictly positive v. With rank 1, x's
      complement is {0} and S is a set of zero gradients.

    Valid sizes: 1 <= rank <= dim; for "strong" and "weak" rank <= T - 1 (a vanishing
    combination), and T >= 3 for "weak".
    """
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T
    x = rng.standard_normal(rank)
    x /= np.linalg.norm(x)

    def along_x(rows: np.ndarray) -> np.ndarray:
        # Give every row a component along x in [0.1, 1]: a . x > 0.
        wanted = rng.uniform(0.1, 1.0, size=rows.shape[0])
        return rows + (wanted - rows @ x)[:, None] * x

    if kind == "none":
        A = along_x(rng.standard_normal((tasks, rank)))
    elif kind == "strong":
        if not 1 <= rank <= tasks - 1:
            raise ValueError(f"a strongly stationary J of rank {rank} needs T > {rank}")
        w = rng.uniform(0.2, 1.0, size=tasks)
        A = rng.standard_normal((tasks, rank))
        A[-1] = -(w[:-1] @ A[:-1]) / w[-1]
    elif kind == "weak":
        if tasks < 3:
            raise ValueError("a strictly weakly stationary J needs T >= 3")
        size = int(rng.integers(2, tasks))
        w = rng.uniform(0.2, 1.0, size=size)
        S = rng.standard_normal((size, rank))
        S -= np.outer(S @ x, x)
        S[-1] = -(w[:-1] @ S[:-1]) / w[-1]
        if rank == 1:
            S[:] = 0.0  # x^perp = {0}: cancelling rows are zero rows (exactly)
        A = np.vstack([S, along_x(rng.standard_normal((tasks - size, rank)))])
    else:
        raise ValueError(f"unknown stationarity class {kind!r}")
    A *= 10.0 ** rng.uniform(-spread, spread, size=(tasks, 1))
    return (A @ Q)[rng.permutation(tasks)]


@st.composite
def stationary_jacobians(
    draw: st.DrawFn, kind: str, *, max_tasks: int = 8, max_dim: int = 8,
) -> tuple[np.ndarray, int]:
    """(J, rank) in stationarity class ``kind``, of any rank the class allows at its size."""
    tasks = draw(st.integers(3 if kind == "weak" else 2, max_tasks))
    dim = draw(st.integers(1, max_dim))
    # A vanishing combination caps the rank at T - 1.
    top = min(dim, tasks) if kind == "none" else min(dim, tasks - 1)
    rank = draw(st.integers(1, top))
    seed = draw(st.integers(0, 2**32 - 1))
    return build_stationary_jacobian(kind, seed, tasks, dim, rank), rank


# ------------------------------------------------------------------ task-norm spans
SPAN_KINDS = ("random", "conflicting", "rank_deficient", "wide", "duplicate", "near_duplicate",
              "combination")


def spread_norms(J: np.ndarray, seed: int, span: float) -> np.ndarray:
    """J with its rows rescaled so that their norms span ``span`` (largest / smallest) exactly.

    Row i is scaled to norm span^u_i with u_i uniform in [0, 1] and one row at each end, so
    the directions (and the stationarity class) of J are kept; zero rows stay zero.
    """
    rng = np.random.default_rng(seed)
    T = J.shape[0]
    exponents = rng.uniform(0.0, 1.0, size=T)
    if T >= 2:
        ends = rng.choice(T, size=2, replace=False)
        exponents[ends] = (0.0, 1.0)
    norms = np.linalg.norm(J, axis=1)
    unit = J / np.where(norms > 0, norms, 1.0)[:, None]
    return unit * (span**exponents)[:, None]


@st.composite
def norm_span_jacobians(
    draw: st.DrawFn, *, kinds: tuple[str, ...] = SPAN_KINDS, max_span: float = 1e12,
    max_tasks: int = 8, max_dim: int = 8,
) -> np.ndarray:
    """Jacobians of the ``strategies.KINDS`` classes with task-gradient norms spanning up to
    ``max_span`` (the largest span and 1e3..1e9 between, each equally likely)."""
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**32 - 1))
    tasks = draw(st.integers(2, max_tasks))
    dim = draw(st.integers(1, max_dim))
    spans = [s for s in (1e3, 1e6, 1e9) if s < max_span] + [max_span]
    span = draw(st.sampled_from(spans))
    return spread_norms(build_jacobian(kind, seed, tasks, dim, 0.0), seed + 1, span)
