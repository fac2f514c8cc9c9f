"""Per-task gradients: the rows of the Jacobian, one block per differentiated tensor.

Two ways to run the R backward passes (R = the number of losses, or of combined losses):

- ``chunk_size=1`` ("sequential"): one ``torch.autograd.grad`` per loss, keeping the graph;
- ``chunk_size=k`` or None ("batched"): ``is_grads_batched`` backward passes over k losses at a
  time (None: all at once), which vectorize the R passes into batched kernels.

Each row is copied into its block as soon as it is computed, so the peak memory is the Jacobian
plus one row, not two Jacobians.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .errors import InvalidOptionError, ShapeError
from .kernels import Rows


def check_chunk_size(chunk_size: int | None) -> None:
    """InvalidOptionError unless ``chunk_size`` is a positive int or None.

    >>> check_chunk_size(0)
    Traceback (most recent call last):
    ...
    deconflict.errors.InvalidOptionError: chunk_size must be a positive integer or None, got 0
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise InvalidOptionError(
            f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def row_chunks(rows: int, chunk_size: int | None) -> list[range]:
    """The ranges of rows differentiated together.

    >>> row_chunks(5, 2)
    [range(0, 2), range(2, 4), range(4, 5)]
    """
    size = rows if chunk_size is None else min(chunk_size, rows)
    return [range(start, min(rows, start + size)) for start in range(0, rows, size)]


def gradients(
    rows: Sequence[Tensor], targets: Sequence[Tensor] | Sequence[GradientEdge],
    grad_outputs: Sequence[Tensor] | None, rows_range: range, *, retain_graph: bool,
) -> list[Tensor | None]:
    """d rows[i] / d targets for i in ``rows_range``, stacked: one (k, *shape) tensor per target.

    A single row is differentiated with a plain backward pass; several with one batched pass.
    ``targets`` are tensors or ``torch.autograd.graph.GradientEdge``s. ``grad_outputs`` are the
    rows' output gradients (default: 1 for a scalar row).
    """
    if len(rows_range) == 1:
        i = rows_range[0]
        outputs = [rows[i]] if grad_outputs is None else rows[i]
        grads = torch.autograd.grad(
            outputs, targets, grad_outputs=None if grad_outputs is None else grad_outputs[i],
            allow_unused=True, retain_graph=retain_graph)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    stacked = torch.stack([rows[i] for i in rows_range])
    eye = torch.eye(len(rows_range), dtype=stacked.dtype, device=stacked.device)
    return list(torch.autograd.grad(stacked, targets, grad_outputs=eye, is_grads_batched=True,
                                    allow_unused=True, retain_graph=retain_graph))


def task_jacobian(
    rows: Sequence[Tensor], targets: Sequence[Tensor], names: Sequence[str], *,
    chunk_size: int | None, free_graph: bool,
) -> tuple[list[Rows], list[bool]]:
    """The Jacobian of the scalar ``rows`` w.r.t. ``targets``, one block per target.

    A block is the (R, numel) batched gradient when all rows were differentiated together, or
    else the list of the R flat per-row gradients as autograd returned them: stacking them would
    copy the Jacobian (measured: a quarter of the overhead of the sequential mode, as fresh pages
    are faulted in). Rows that do not reach a target are zeros. Also returns, per target,
    whether any row reaches it. ``free_graph`` frees the graph with the last backward pass.
    """
    chunks = row_chunks(len(rows), chunk_size)
    per_row: list[list[Tensor | None]] = [[None] * len(rows) for _ in targets]
    whole: list[Tensor | None] = [None] * len(targets)
    for n, chunk in enumerate(chunks):
        grads = gradients(rows, targets, None, chunk,
                          retain_graph=not (free_graph and n == len(chunks) - 1))
        for index, grad in enumerate(grads):
            if grad is None:
                continue
            if grad.layout != torch.strided:
                raise ShapeError(
                    f"{names[index]} has a sparse gradient; deconflict needs dense gradients "
                    "(e.g. nn.Embedding(sparse=False))"
                )
            flat = grad.reshape(len(chunk), -1)
            if len(chunks) == 1:
                whole[index] = flat  # the batched result is the block
                continue
            for k, row in enumerate(chunk):
                per_row[index][row] = flat[k]
        del grads
    blocks: list[Rows] = []
    reached = []
    for index, target in enumerate(targets):
        batched = whole[index]
        if batched is not None:
            blocks.append(batched)
            reached.append(True)
            continue
        found = [g for g in per_row[index] if g is not None]
        reached.append(bool(found))
        zeros = None
        block = []
        for grad in per_row[index]:
            if grad is None:
                if zeros is None:
                    zeros = torch.zeros(target.numel(), dtype=target.dtype, device=target.device)
                grad = zeros
            block.append(grad)
        blocks.append(block)
    return blocks, reached
