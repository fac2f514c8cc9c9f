"""The two passes over d-dimensional data: the Gramian M = J J^T and the combination J^T c.

Both accumulate in float64 whatever the dtype of J (docs/methods.md#gramian): with
float32 gradients, a float32 Gramian loses the small differences between nearly collinear task
gradients that projection methods depend on, and a float32 combination J^T c loses the
cancellation between large coefficients of opposite sign. Float64 accumulation makes both errors
about 1e-16 relative instead. The loops themselves are in ``kernels``.

A Jacobian may be given whole (T x d) or as blocks (T x d_k each, e.g. one per parameter tensor):
M = sum_k J_k J_k^T and (J^T c) restricted to block k is J_k^T c.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from . import kernels
from .errors import ShapeError
from .kernels import Rows
from .linalg import update_rounding_floor


def _check_matrix(jacobian: Tensor) -> Tensor:
    if not isinstance(jacobian, Tensor):
        raise TypeError(f"expected a torch.Tensor Jacobian, got {type(jacobian).__name__}")
    if jacobian.ndim != 2:
        raise ShapeError(
            f"a Jacobian must be 2-D (tasks x parameters), got shape {tuple(jacobian.shape)}"
        )
    if jacobian.shape[0] < 1:
        raise ShapeError("a Jacobian needs at least one task (row)")
    if not jacobian.is_floating_point():
        raise TypeError(f"a Jacobian must be floating point, got {jacobian.dtype}")
    return jacobian.detach()


def check_block(block: Rows) -> list[Tensor]:
    """The rows of a block given as a T x d_k tensor or as T tensors of d_k elements each.

    >>> import torch
    >>> [row.shape for row in check_block([torch.zeros(2, 3), torch.ones(6)])]
    [torch.Size([6]), torch.Size([6])]
    """
    if isinstance(block, Tensor):
        return kernels.row_list(_check_matrix(block))
    rows = [row.detach() for row in block]
    if not rows:
        raise ShapeError("a Jacobian needs at least one task (row)")
    for row in rows:
        if not isinstance(row, Tensor) or not row.is_floating_point():
            raise TypeError("Jacobian rows must be floating-point tensors")
        if row.numel() != rows[0].numel():
            raise ShapeError(f"Jacobian rows of different sizes: {row.numel()} vs "
                             f"{rows[0].numel()}")
    return [row.reshape(-1) for row in rows]


def _kernel_rows(block: Rows) -> tuple[Rows, int, int, Tensor]:
    """A checked block as the kernels take it (the 2-D tensor itself, or its rows: a
    contiguous matrix goes to them whole), its numbers of rows and columns, and a row."""
    if isinstance(block, Tensor):
        matrix = _check_matrix(block)
        return matrix, matrix.shape[0], matrix.shape[1], matrix[0]
    rows = check_block(block)
    return rows, len(rows), rows[0].numel(), rows[0]


def gramian_of_blocks(blocks: Iterable[Rows]) -> Tensor:
    """M = sum_k J_k J_k^T in float64, for column blocks J_k (T x d_k) of one Jacobian.

    The blocks of a model's Jacobian are its parameter tensors; their Gramians add up to the
    Gramian of the whole (docs/methods.md#gramian):

    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> gramian_of_blocks([J[:, :1], J[:, 1:]])
    tensor([[ 1., -1.],
            [-1.,  2.]], dtype=torch.float64)
    """
    M: Tensor | None = None
    for block in blocks:
        rows, count, _, first = _kernel_rows(block)
        if M is None:
            M = torch.zeros(count, count, dtype=torch.float64, device=first.device)
        elif count != M.shape[0]:
            raise ShapeError(
                f"Jacobian blocks disagree on the number of tasks: {count} vs {M.shape[0]}"
            )
        kernels.gramian_into(rows, M)
    if M is None:
        raise ShapeError("no Jacobian blocks were given")
    return M


def gramian(jacobian: Tensor) -> Tensor:
    """The Gramian M = J J^T (T x T, float64) of a T x d Jacobian, accumulated in float64.

    M_ij = g_i . g_j for the rows g_i of J (docs/methods.md#notation); a negative off-diagonal
    entry is a conflicting pair. Float32 rows are read as float64, so the small differences
    between nearly collinear gradients survive (docs/methods.md#gramian).

    >>> import torch
    >>> import deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])   # two tasks, two parameters
    >>> deconflict.gramian(J)
    tensor([[ 1., -1.],
            [-1.,  2.]], dtype=torch.float64)
    """
    return gramian_of_blocks([jacobian])


def combine_block(
    block: Rows, weights: Tensor, out: Tensor | None = None, *, accumulate: bool = True
) -> Tensor:
    """J_k^T c for one block (T x d_k), accumulated in float64, returned in the block's dtype.

    With ``out`` (a tensor of d_k elements in any shape, e.g. a ``.grad``), the result is added
    to it in place (``accumulate=False``: written over it) and ``out`` is returned.

    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> grad = torch.ones(2)
    >>> combine_block(J, torch.tensor([1.0, 0.5], dtype=torch.float64), grad)
    tensor([1.5000, 1.5000])
    """
    rows, count, width, first = _kernel_rows(block)
    if weights.shape != (count,):
        raise ShapeError(
            f"weights of shape {tuple(weights.shape)} do not fit a Jacobian with "
            f"{count} rows"
        )
    if out is None:
        out = torch.empty(width, dtype=first.dtype, device=first.device)
        accumulate = False
    elif out.numel() != width:
        raise ShapeError(f"out has {out.numel()} elements, the block {width} columns")
    if out.is_contiguous():
        kernels.combine_into(rows, weights, out, accumulate=accumulate)
        return out
    result = torch.empty(width, dtype=out.dtype, device=out.device)
    kernels.combine_into(rows, weights, result, accumulate=False)
    if accumulate:
        out.add_(result.view_as(out))
    else:
        out.copy_(result.view_as(out))
    return out


def combine(jacobian: Tensor, weights: Tensor) -> Tensor:
    """The update J^T c (d,) of a T x d Jacobian, accumulated in float64, in J's dtype.

    D = J^T c = sum_i c_i g_i (docs/methods.md#notation): the update a method's weights c
    give. Large coefficients of opposite sign cancel in float64, not in J's dtype.

    >>> import torch
    >>> import deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> deconflict.combine(J, torch.tensor([1.0, 0.5], dtype=torch.float64))
    tensor([0.5000, 0.5000])
    """
    return combine_block(_check_matrix(jacobian), weights)


def rounding_floor(gramian: Tensor, weights: Tensor) -> float:
    """The norm below which J^T c cannot be told apart from its float64 rounding error.

    At a Pareto-stationary point (e.g. two opposite gradients) a method's update cancels to
    ~1e-17 of the gradients, in an arbitrary direction that can point against every task. The
    engine and ``aggregate`` return an exact zero update below this floor instead
    (docs/methods.md#gramian, "Rounding floor").

    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])       # opposite gradients
    >>> M, c = gramian(J), torch.tensor([0.5, 0.5], dtype=torch.float64)
    >>> float(c @ M @ c) ** 0.5 <= rounding_floor(M, c)  # ||J^T c|| = 0 exactly
    True
    """
    norms = torch.sqrt(torch.clamp(torch.diagonal(gramian).to(torch.float64), min=0.0))
    c = weights.to(device=norms.device, dtype=torch.float64)
    return update_rounding_floor(len(c), float((c.abs() * norms).sum()))


def vector_norm(tensors: Iterable[Tensor]) -> float:
    """Euclidean norm of several tensors taken together, accumulated in float64.

    >>> import torch
    >>> vector_norm([torch.tensor([3.0]), torch.tensor([4.0])])
    5.0
    """
    total = 0.0
    for tensor in tensors:
        total += float(torch.linalg.vector_norm(tensor, dtype=torch.float64) ** 2)
    return total**0.5
