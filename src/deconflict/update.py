"""From the per-task gradients, block by block, to the update: the one place every method's
output becomes d-dimensional. ``aggregate`` and the engine both go through ``compute_update``.

Input: the Jacobian in column blocks J_k (R x d_k; one per parameter tensor in the engine), a
name per block for error messages, and a layer key per block (blocks of one module share it).
The Gramian is accumulated per block in float64, M = sum_k M_k; then by the method's kind:

- "gramian" / "losses": c from M (for a "last_layer" loss weighting, from the Gramian of the
  last layer's blocks), update_k = J_k^T c;
- "block_gramians": c^(g) from each group's Gramian, update_k = J_k^T c^(group of k);
- "jacobian": the method maps the blocks to their updates itself.

An update J^T c whose norm is below its own float64 rounding error (``gramian.rounding_floor``;
e.g. at a Pareto-stationary point) is returned as exact zeros: its direction would be noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InvalidOptionError, NonFiniteError, ShapeError
from .gramian import combine_block, gramian_of_blocks, rounding_floor, vector_norm
from .methods.base import Method


@dataclass(frozen=True)
class Update:
    """The update, block by block, and what produced it (float64 CPU tensors)."""

    blocks: list[Tensor]  # flat, in each block's dtype
    gramian: Tensor  # R x R, of the differentiated rows
    weights: Tensor | None = None  # (T,) when the update is J^T c
    diagnostics: dict[str, Any] = field(default_factory=dict)


def split_columns(
    jacobian: Tensor, block_sizes: Sequence[int] | None = None
) -> tuple[list[Tensor], list[str]]:
    """Column blocks of a T x d Jacobian and their names ("columns a:b")."""
    if not isinstance(jacobian, Tensor) or jacobian.ndim != 2:
        shape = tuple(jacobian.shape) if isinstance(jacobian, Tensor) else type(jacobian).__name__
        raise ShapeError(f"a Jacobian must be 2-D (tasks x parameters), got {shape}")
    sizes = [jacobian.shape[1]] if block_sizes is None else [int(n) for n in block_sizes]
    if sum(sizes) != jacobian.shape[1] or min(sizes, default=0) < 0:
        raise ShapeError(f"block_sizes {sizes} do not add up to {jacobian.shape[1]} columns")
    blocks, names, start = [], [], 0
    for size in sizes:
        blocks.append(jacobian.detach()[:, start:start + size])
        names.append(f"columns {start}:{start + size}")
        start += size
    return blocks, names


def compute_update(
    method: Method,
    blocks: Sequence[Tensor],
    names: Sequence[str],
    layers: Sequence[str],
    *,
    losses: Any = None,
    combinations: np.ndarray | None = None,
    features: Sequence[Tensor] | None = None,
) -> Update:
    """The method's update for a Jacobian given in blocks (see the module docstring)."""
    block_gramians = [gramian_of_blocks([block]) for block in blocks]
    M = torch.stack(block_gramians).sum(dim=0)
    if not bool(torch.isfinite(M).all()):
        raise_non_finite(blocks, names, combination=combinations is not None)
    kind = method.kind
    if kind == "block_gramians":
        return _block_update(method, blocks, block_gramians, layers, M, losses)
    if kind == "jacobian":
        if losses is None and method.needs_losses:
            raise InvalidOptionError(f"{method!r} needs the losses: pass losses=[L_1, ..., L_T]")
        updates, diagnostics = method.combine_jacobian(
            blocks, losses=None if losses is None else np.asarray(losses, dtype=np.float64),
            features=features)
        return Update([u.reshape(-1) for u in updates], M.cpu(), None, diagnostics)

    scoped = M
    if kind == "losses" and method.gradient_scope == "last_layer":
        last = [k for k, layer in enumerate(layers) if layer == layers[-1]]
        scoped = torch.stack([block_gramians[k] for k in last]).sum(dim=0)
    c, diagnostics = method.weights_with_diagnostics(scoped, losses=losses,
                                                     combinations=combinations)
    c = c.cpu()
    # With combinations A, J^T c = (A J)^T r for the r solving A^T r = c.
    row_weights = c if combinations is None else torch.from_numpy(
        np.linalg.lstsq(combinations.T, c.numpy(), rcond=None)[0])
    updates = [combine_block(block, row_weights) for block in blocks]
    if vector_norm(updates) <= rounding_floor(M, row_weights):
        for update in updates:
            update.zero_()
    return Update(updates, M.cpu(), c, diagnostics)


def _block_update(
    method: Method, blocks: Sequence[Tensor], block_gramians: list[Tensor],
    layers: Sequence[str], M: Tensor, losses: Any,
) -> Update:
    group_of = method.group_blocks(layers)
    count = max(group_of) + 1
    gramians = torch.zeros(count, *M.shape, dtype=torch.float64)
    for k, group in enumerate(group_of):
        gramians[group] += block_gramians[k].cpu()
    C, diagnostics = method.block_weights(gramians.numpy(), losses=losses)
    C = torch.from_numpy(np.asarray(C, dtype=np.float64))
    if C.shape != (count, M.shape[0]) or not bool(torch.isfinite(C).all()):
        raise NonFiniteError(f"{method.name} returned invalid block weights of shape "
                             f"{tuple(C.shape)}")
    updates = [combine_block(block, C[group]) for block, group in zip(blocks, group_of,
                                                                       strict=True)]
    for group in range(count):
        members = [k for k, g in enumerate(group_of) if g == group]
        if vector_norm([updates[k] for k in members]) <= rounding_floor(gramians[group], C[group]):
            for k in members:
                updates[k].zero_()
    diagnostics = {**diagnostics, "block_weights": C, "groups": torch.tensor(group_of)}
    return Update(updates, M.cpu(), None, diagnostics)


def raise_non_finite(blocks: Sequence[Tensor], names: Sequence[str], combination: bool) -> None:
    """Name the first task and block whose gradient holds NaN or infinity."""
    for block, name in zip(blocks, names, strict=True):
        bad_rows = (~torch.isfinite(block)).any(dim=1)
        if bool(bad_rows.any()):
            task = int(torch.nonzero(bad_rows)[0])
            subject = f"combined loss {task}" if combination else f"loss {task}"
            raise NonFiniteError(
                f"the gradient of {subject} with respect to {name} contains NaN or infinity"
            )
    raise NonFiniteError("the task gradients are too large: their Gramian overflows float64")
