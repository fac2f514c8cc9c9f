"""Small T x T linear algebra in float64 NumPy: validation, cosine matrices, pseudo-inverses.

Methods do their T x T algebra here, on the CPU, in float64. The Gramian is tiny (T <= ~100), so
the cost per call is dominated by per-operation overhead, which is 3-5x lower in NumPy than in
PyTorch (measured: ~0.6 us vs ~1.9 us for an elementwise add of a 2 x 2 matrix, 7 us vs 26 us
for a 2 x 2 solve). The methods also branch on the data (active sets, conflict gating), which
would force a device synchronisation per branch on a GPU; one copy of M to the host is cheaper.

The algebra runs with one BLAS thread (``single_threaded_blas``): at these sizes threads only
cost. Measured on 2 busy cores: OpenBLAS's threaded triangular solve of a 100 x 100 system with
100 right-hand sides took 16 ms, against 0.2 ms on one thread.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from scipy.linalg import lapack
from threadpoolctl import ThreadpoolController

from .errors import InvalidGramianError, NonFiniteError, ShapeError

# Symmetry and diagonal checks, relative to the largest diagonal entry.
_GRAMIAN_RTOL = 1e-5
_blas_libraries: list[Any] | None = None


class _OneBlasThread(AbstractContextManager):
    """Sets every loaded BLAS to one thread on entry, and back on exit (only those that were
    not at one already). The libraries are looked up once, on first use: NumPy's and SciPy's
    BLAS are loaded by then (this module imports ``scipy.linalg``). Talking to them directly
    costs ~1 us per call, threadpoolctl's ``limit`` ~10 us: this runs once per method call."""

    def __enter__(self) -> _OneBlasThread:
        global _blas_libraries
        if _blas_libraries is None:
            _blas_libraries = [library for library in ThreadpoolController().lib_controllers
                               if library.user_api == "blas"]
        self._changed = []
        for library in _blas_libraries:
            threads = library.num_threads
            if threads != 1:
                library.set_num_threads(1)
                self._changed.append((library, threads))
        return self

    def __exit__(self, *exc: object) -> None:
        for library, threads in reversed(self._changed):
            library.set_num_threads(threads)


def single_threaded_blas() -> AbstractContextManager:
    """A context in which NumPy's and SciPy's BLAS use one thread (for T x T algebra)."""
    return _OneBlasThread()


def to_numpy(values: Any, dtype: type = np.float64) -> np.ndarray:
    """A float64 NumPy copy of a tensor, array or sequence (detached, on the host).

    >>> import torch
    >>> to_numpy(torch.tensor([1.0, 2.0], requires_grad=True))
    array([1., 2.])
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.array(values, dtype=dtype, copy=True)


def as_gramian_array(gramian: Any) -> np.ndarray:
    """Validate a Gramian and return it as a symmetric float64 array with a non-negative diagonal.

    Raises ShapeError (not square), NonFiniteError (NaN/Inf) or InvalidGramianError (asymmetric
    or negative diagonal beyond rounding).

    >>> as_gramian_array([[1.0, -1.0], [-1.0, 2.0]]).dtype
    dtype('float64')
    >>> as_gramian_array([[1.0, 0.5], [0.0, 1.0]])
    Traceback (most recent call last):
    ...
    deconflict.errors.InvalidGramianError: not a Gramian: the matrix is not symmetric ...
    """
    if isinstance(gramian, torch.Tensor):
        M = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        M = np.asarray(gramian, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ShapeError(f"a Gramian must be a square matrix, got shape {M.shape}")
    if M.shape[0] < 1:
        raise ShapeError("a Gramian needs at least one task")
    if not np.isfinite(M).all():
        rows = sorted({int(i) for i in np.argwhere(~np.isfinite(M))[:, 0]})
        raise NonFiniteError(
            f"the Gramian contains NaN or infinity (rows {rows}): a task gradient is non-finite "
            "or too large to square"
        )
    diag = M.diagonal()
    tol = _GRAMIAN_RTOL * max(float(diag.max()), 0.0)
    smallest = float(diag.min())
    if smallest < -tol:
        raise InvalidGramianError(
            f"not a Gramian: diagonal entry {int(diag.argmin())} is negative ({smallest:.3g})"
        )
    asymmetry = float(np.abs(M - M.T).max())
    if asymmetry > tol:
        raise InvalidGramianError(
            f"not a Gramian: the matrix is not symmetric (max |M - M^T| = {asymmetry:.3g})"
        )
    M = (M + M.T) * 0.5  # a new array: the caller's tensor is never modified
    if smallest < 0.0:
        np.fill_diagonal(M, np.maximum(M.diagonal(), 0.0))
    return M


def task_norms(M: np.ndarray) -> np.ndarray:
    """The gradient norms n_i = sqrt(M_ii).

    >>> import numpy as np
    >>> task_norms(np.array([[9.0, 0.0], [0.0, 4.0]])).tolist()
    [3.0, 2.0]
    """
    return np.sqrt(np.maximum(np.diag(M), 0.0))


def cosine_matrix(M: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """K = N^-1 M N^-1 with unit diagonal; rows and columns of zero gradients are zero.

    Entries are clipped to [-1, 1], which rounding can otherwise leave slightly outside
    (docs/methods.md#notation).

    >>> import numpy as np
    >>> cosine_matrix(np.array([[1.0, -1.0, 0.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])).round(4)
    array([[ 1.    , -0.7071,  0.    ],
           [-0.7071,  1.    ,  0.    ],
           [ 0.    ,  0.    ,  0.    ]])
    """
    n = task_norms(M) if norms is None else norms
    zero = n == 0
    if not zero.any():
        K = np.clip(M / np.outer(n, n), -1.0, 1.0)
        np.fill_diagonal(K, 1.0)
        return K
    safe = np.where(zero, 1.0, n)
    K = np.clip(M / np.outer(safe, safe), -1.0, 1.0)
    K[zero, :] = 0.0
    K[:, zero] = 0.0
    np.fill_diagonal(K, np.where(zero, 0.0, 1.0))
    return K


def pivoted_cholesky_solve(
    A: np.ndarray, b: np.ndarray, tol: float, *, minimum_norm: bool = False
) -> tuple[np.ndarray, int]:
    """A solution of A x = b for a symmetric PSD A, and the numerical rank of A.

    Pivoted Cholesky (LAPACK ?pstrf) picks the columns of A one at a time by largest remaining
    diagonal - for a cosine matrix, the vector farthest from the span of those already picked
    (Gram-Schmidt with pivoting) - and stops when that remaining diagonal is <= tol. The basic
    solution sets x_j = 0 for columns not picked; which columns those are depends on the order
    of ties. ``minimum_norm`` removes the null-space component instead, which is symmetric.
    Unlike an eigendecomposition-based pseudo-inverse (residual measured at 4e-9 for cosines of
    1 - 1e-9), the solve is backward stable: |A x - b| ~ eps |A| |x| on the picked rows.

    Two duplicated unit gradients: rank 1; the basic solution leans on the first, the
    minimum-norm one splits evenly:

    >>> import numpy as np
    >>> A = np.ones((2, 2))
    >>> pivoted_cholesky_solve(A, np.array([2.0, 2.0]), 1e-13)
    (array([2., 0.]), 1)
    >>> pivoted_cholesky_solve(A, np.array([2.0, 2.0]), 1e-13, minimum_norm=True)
    (array([1., 1.]), 1)
    """
    n = A.shape[0]
    x = np.zeros(n)
    if n == 0:
        return x, 0
    factor, pivots, rank, _ = lapack.dpstrf(A, tol=tol, lower=1)
    if rank == 0:
        return x, 0
    picked = pivots[:rank] - 1
    leading = factor[:rank, :rank]
    solution, _ = lapack.dpotrs(leading, b[picked], lower=1)
    x[picked] = solution
    if minimum_norm and rank < n:
        # Null vectors: e_q - (A_PP^-1 A_Pq) on the picked rows, one per column q not picked.
        rest = pivots[rank:] - 1
        coupling, _ = lapack.dpotrs(leading, A[np.ix_(picked, rest)], lower=1)
        null = np.zeros((n, rest.size))
        null[picked] = -coupling
        null[rest, np.arange(rest.size)] = 1.0
        x -= null @ np.linalg.lstsq(null, x, rcond=None)[0]
    return x, int(rank)


def normalized(M: np.ndarray) -> tuple[np.ndarray, float]:
    """M divided by its largest diagonal entry (and that entry), for scale-free tolerances.

    >>> import numpy as np
    >>> normalized(np.array([[4.0, 2.0], [2.0, 2.0]]))
    (array([[1. , 0.5],
           [0.5, 0.5]]), 4.0)
    """
    scale = float(np.max(np.diag(M))) if M.size else 0.0
    if scale <= 0.0:
        return M.copy(), 0.0
    return M / scale, scale


# J^T c is trusted when its direction is accurate to 1e-8.
_DIRECTION_ACCURACY = 1e-8
_EPS = float(np.finfo(np.float64).eps)


def update_rounding_floor(num_tasks: int, budget: float) -> float:
    """The norm below which J^T c cannot be told apart from its float64 rounding error.

    That error is at most about T eps sum_i |c_i| ||g_i|| (``budget`` = sum_i |c_i| ||g_i||);
    an update shorter than 1e8 times it has no trustworthy direction, and the engine writes an
    exact zero instead (``gramian.rounding_floor``; docs/methods.md#gramian).

    >>> update_rounding_floor(2, budget=1.0)   # 2 eps / 1e-8
    4.440892098500626e-08
    """
    return num_tasks * _EPS * budget / _DIRECTION_ACCURACY


def negligible_update(M: np.ndarray, c: np.ndarray) -> bool:
    """Whether ||J^T c|| is below ``update_rounding_floor``, decided from M alone
    (||J^T c||^2 = c^T M c).

    Two opposite gradients: their mean cancels exactly, one of them alone does not.

    >>> import numpy as np
    >>> M = np.array([[1.0, -1.0], [-1.0, 1.0]])
    >>> negligible_update(M, np.array([0.5, 0.5])), negligible_update(M, np.array([1.0, 0.0]))
    (True, False)
    """
    c = np.asarray(c, dtype=np.float64)
    floor = update_rounding_floor(c.size, float(np.abs(c) @ task_norms(M)))
    return float(c @ M @ c) <= floor**2
