"""The two passes over d-dimensional data: the Gramian M = J J^T and the combination J^T c.

Both accumulate in float64 whatever the dtype of J (METHODS.md Section 0, "Precision"): with
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


def gramian_of_blocks(blocks: Iterable[Tensor]) -> Tensor:
    """M = sum_k J_k J_k^T in float64, for column blocks J_k (T x d_k) of one Jacobian."""
    M: Tensor | None = None
    for block in blocks:
        block = _check_matrix(block)
        if M is None:
            M = torch.zeros(block.shape[0], block.shape[0], dtype=torch.float64,
                            device=block.device)
        elif block.shape[0] != M.shape[0]:
            raise ShapeError(
                f"Jacobian blocks disagree on the number of tasks: {block.shape[0]} vs {M.shape[0]}"
            )
        kernels.gramian_into(block, M)
    if M is None:
        raise ShapeError("no Jacobian blocks were given")
    return M


def gramian(jacobian: Tensor) -> Tensor:
    """The Gramian M = J J^T (T x T, float64) of a T x d Jacobian, accumulated in float64."""
    return gramian_of_blocks([jacobian])


def combine_block(
    block: Tensor, weights: Tensor, out: Tensor | None = None, *, accumulate: bool = True
) -> Tensor:
    """J_k^T c for one block (T x d_k), accumulated in float64, returned in the block's dtype.

    With ``out`` (a contiguous tensor of d_k elements in any shape, e.g. a ``.grad``), the result
    is added to it in place (``accumulate=False``: written over it) and ``out`` is returned.
    """
    block = _check_matrix(block)
    if weights.shape != (block.shape[0],):
        raise ShapeError(
            f"weights of shape {tuple(weights.shape)} do not fit a Jacobian with "
            f"{block.shape[0]} rows"
        )
    if out is None:
        out = torch.empty(block.shape[1], dtype=block.dtype, device=block.device)
        accumulate = False
    elif out.numel() != block.shape[1]:
        raise ShapeError(f"out has {out.numel()} elements, the block {block.shape[1]} columns")
    if out.is_contiguous():
        kernels.combine_into(block, weights, out, accumulate=accumulate)
        return out
    result = torch.empty(block.shape[1], dtype=out.dtype, device=out.device)
    kernels.combine_into(block, weights, result, accumulate=False)
    if accumulate:
        out.add_(result.view_as(out))
    else:
        out.copy_(result.view_as(out))
    return out


def combine(jacobian: Tensor, weights: Tensor) -> Tensor:
    """The update J^T c (d,) of a T x d Jacobian, accumulated in float64, in J's dtype."""
    return combine_block(jacobian, weights)


# An update is trusted when its direction is accurate to ~1e-8: the float64 rounding error of
# J^T c is at most about T * eps * sum_i |c_i| ||g_i||, so below 1e8 times that, D is noise.
_DIRECTION_ACCURACY = 1e-8


def rounding_floor(gramian: Tensor, weights: Tensor) -> float:
    """The norm below which J^T c cannot be told apart from its float64 rounding error.

    At a Pareto-stationary point (e.g. two opposite gradients) a method's update cancels to
    ~1e-17 of the gradients, in an arbitrary direction that can point against every task. The
    engine and ``aggregate`` return an exact zero update below this floor instead.
    """
    norms = torch.sqrt(torch.clamp(torch.diagonal(gramian).to(torch.float64), min=0.0))
    c = weights.to(device=norms.device, dtype=torch.float64)
    budget = float((c.abs() * norms).sum())
    eps = torch.finfo(torch.float64).eps
    return len(c) * eps * budget / _DIRECTION_ACCURACY


def vector_norm(tensors: Iterable[Tensor]) -> float:
    """Euclidean norm of several tensors taken together, accumulated in float64."""
    total = 0.0
    for tensor in tensors:
        total += float(torch.linalg.vector_norm(tensor, dtype=torch.float64) ** 2)
    return total**0.5
