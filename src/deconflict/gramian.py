"""The two passes over d-dimensional data: the Gramian M = J J^T and the combination J^T c.

Both accumulate in float64 whatever the dtype of J (METHODS.md Section 0, "Precision"): with
float32 gradients, a float32 Gramian loses the small differences between nearly collinear task
gradients that projection methods depend on, and a float32 combination J^T c loses the
cancellation between large coefficients of opposite sign. Float64 accumulation makes both errors
about 1e-16 relative instead. Work is done in column blocks so the float64 copies stay small.

A Jacobian may be given whole (T x d) or as blocks (T x d_k each, e.g. one per parameter tensor):
M = sum_k J_k J_k^T and (J^T c) restricted to block k is J_k^T c.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .errors import ShapeError

# Float64 elements converted at a time per block: about 4 MiB, small enough to stay in cache.
_CHUNK_ELEMENTS = 1 << 19


def _chunk_columns(num_rows: int) -> int:
    return max(256, _CHUNK_ELEMENTS // max(num_rows, 1))


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
        if block.dtype == torch.float64:
            M.addmm_(block, block.T)
            continue
        step = _chunk_columns(block.shape[0])
        for start in range(0, block.shape[1], step):
            chunk = block[:, start:start + step].to(torch.float64)
            M.addmm_(chunk, chunk.T)
    if M is None:
        raise ShapeError("no Jacobian blocks were given")
    return M


def gramian(jacobian: Tensor) -> Tensor:
    """The Gramian M = J J^T (T x T, float64) of a T x d Jacobian, accumulated in float64."""
    return gramian_of_blocks([jacobian])


def combine_block(block: Tensor, weights: Tensor, out: Tensor | None = None) -> Tensor:
    """J_k^T c for one block (T x d_k), accumulated in float64, returned in the block's dtype.

    With ``out`` (a tensor of d_k elements in any shape), the result is added to it in place.
    """
    block = _check_matrix(block)
    c = weights.to(device=block.device, dtype=torch.float64)
    if c.shape != (block.shape[0],):
        raise ShapeError(
            f"weights of shape {tuple(c.shape)} do not fit a Jacobian with {block.shape[0]} rows"
        )
    flat_out = None if out is None else out.view(-1)
    if block.dtype == torch.float64:
        result = c @ block
        if flat_out is None:
            return result
        flat_out.add_(result.to(flat_out.dtype))
        return out
    if flat_out is None:
        flat_out = torch.zeros(block.shape[1], dtype=block.dtype, device=block.device)
        out = flat_out
    step = _chunk_columns(block.shape[0])
    for start in range(0, block.shape[1], step):
        part = c @ block[:, start:start + step].to(torch.float64)
        flat_out[start:start + step] += part.to(flat_out.dtype)
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
