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
e.g. at a Pareto-stationary point) is made exact zeros: its direction would be noise. The
update is returned unwritten (``Update``): the engine writes it into ``.grad`` in place.

Loss scaling (``scale`` = s, a ``torch.amp.GradScaler``'s scale): the blocks are then the
gradients of s L_i. The method sees the Gramian of the gradients of the L_i, M = (s^2 M) / s^2
(exact for a power of two, as a GradScaler's scale is), and the update is s J^T c: the product of
the scaled blocks with the same weights, which ``scaler.step`` divides by s again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InvalidOptionError, NonFiniteError, NonFiniteGradientError, ShapeError
from .gramian import check_block, combine_block, gramian_of_blocks, rounding_floor
from .kernels import Rows
from .linalg import single_threaded_blas
from .methods.base import Method


@dataclass(frozen=True)
class Update:
    """The method's update, before it is written anywhere, and what produced it.

    For most methods the update of block k is J_k^T r_k, with row weights r_k (the same r for
    every block of a Gramian method, one per group for block-Gramian methods): it is written
    straight into its destination by ``write`` (float64 accumulation, no temporary). Jacobian
    methods computed their updates already (``block_updates``).
    """

    gramian: Tensor  # R x R float64 on the CPU, of the differentiated rows
    weights: Tensor | None = None  # (T,) when the update is J^T c
    diagnostics: dict[str, Any] = field(default_factory=dict)
    block_weights: list[Tensor] | None = None  # r_k (R,) float64 per block
    block_updates: list[Tensor] | None = None  # flat, per block, in its dtype, as written
    layer_gramians: dict[str, Tensor] = field(default_factory=dict)  # layer -> R x R float64
    row_products: Tensor | None = None  # J D (R,) float64: each row's gradient . the update
    update_sq_norm: float | None = None  # ||D||^2

    def write(self, index: int, block: Rows, out: Tensor, *, accumulate: bool) -> None:
        """Put the update of block ``index`` (Jacobian block ``block``) into ``out``."""
        if self.block_weights is not None:
            combine_block(block, self.block_weights[index], out, accumulate=accumulate)
            return
        update = self.block_updates[index].view_as(out).to(out.dtype)
        if accumulate:
            out.add_(update)
        else:
            out.copy_(update)

    def materialize(self, blocks: Sequence[Rows]) -> list[Tensor]:
        """Each block's update as a new flat tensor in the block's dtype."""
        if self.block_weights is None:
            return list(self.block_updates)
        return [combine_block(block, r) for block, r in zip(blocks, self.block_weights,
                                                             strict=True)]


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
    blocks: Sequence[Rows],
    names: Sequence[str],
    layers: Sequence[str],
    *,
    losses: Any = None,
    combinations: np.ndarray | None = None,
    features: Sequence[Tensor] | None = None,
    scale: float = 1.0,
    gramians: tuple[list[Tensor], Tensor] | None = None,
) -> Update:
    """The method's update for a Jacobian given in blocks (see the module docstring).

    ``scale``: the blocks are the gradients of ``scale`` times the losses (loss scaling).
    ``gramians``: the blocks' Gramians from ``checked_gramians`` (computed here if None).
    """
    if gramians is None:
        gramians = checked_gramians(blocks, names, scale=scale,
                                    combination=combinations is not None)
    block_gramians, M = gramians
    by_layer = layer_gramians(block_gramians, layers)
    kind = method.kind
    if kind == "block_gramians":
        return _block_update(method, blocks, block_gramians, layers, M, losses, by_layer, scale)
    if kind == "jacobian":
        if losses is None and method.needs_losses:
            raise InvalidOptionError(f"{method!r} needs the losses: pass losses=[L_1, ..., L_T]")
        stacked = [_for_jacobian_method(b if isinstance(b, Tensor) else torch.stack(list(b)),
                                        scale) for b in blocks]
        updates, diagnostics = method.combine_jacobian(
            stacked, losses=None if losses is None else np.asarray(losses, dtype=np.float64),
            features=features)
        updates = [u.reshape(-1) for u in updates]
        for update, name in zip(updates, names, strict=True):
            if not bool(torch.isfinite(update).all()):
                raise NonFiniteError(f"the update of {method.name} for {name} contains NaN or "
                                     "infinity")
        # J D and ||D||^2 block by block, for the conflict diagnostics: O(T d), beside the
        # O(T^2 d) of the Gramian.
        products = sum(J.to(u.dtype) @ u for J, u in zip(stacked, updates, strict=True)).cpu()
        sq_norm = float(sum(torch.dot(u, u).item() for u in updates))
        updates = [_as_written(u, scale, dtype, name) for u, dtype, name
                   in zip(updates, blocks_dtypes(blocks), names, strict=True)]
        return Update(M.cpu(), None, diagnostics, block_updates=updates,
                      layer_gramians=by_layer, row_products=products.to(torch.float64),
                      update_sq_norm=sq_norm)

    scoped = M
    if kind == "losses" and method.gradient_scope == "last_layer":
        last = [k for k, layer in enumerate(layers) if layer == layers[-1]]
        scoped = torch.stack([block_gramians[k] for k in last]).sum(dim=0)
    c, r, diagnostics = gramian_weights(method, M, blocks_dtypes(blocks), losses=losses,
                                        combinations=combinations, scoped=scoped, scale=scale)
    M = M.cpu()
    return Update(M, c, diagnostics, block_weights=[r] * len(blocks), layer_gramians=by_layer,
                  row_products=M @ r, update_sq_norm=float(r @ M @ r))


def checked_gramians(
    blocks: Sequence[Rows], names: Sequence[str], *, scale: float = 1.0,
    combination: bool = False,
) -> tuple[list[Tensor], Tensor]:
    """Each block's Gramian and their sum M (float64), or NonFiniteGradientError naming the task.

    The finiteness check is free: a NaN or infinity in row i reaches M_ii in the pass that forms
    M anyway; only then are the rows themselves read again to name the task and block.
    """
    block_gramians = [gramian_of_blocks([block]) / scale**2 for block in blocks]
    M = torch.stack(block_gramians).sum(dim=0)
    if not bool(torch.isfinite(M).all()):
        raise_non_finite(blocks, names, combination=combination)
    return block_gramians, M


def layer_gramians(block_gramians: Sequence[Tensor], layers: Sequence[str]) -> dict[str, Tensor]:
    """The Gramian of each layer's blocks (M^(k) = sum of its blocks' Gramians), in layer order.

    Blocks of one module share a layer key, so a layer's Gramian is over its weight and bias
    together: the unit Recon scores (EXPERIMENTS.md Section 6).
    """
    by_layer: dict[str, Tensor] = {}
    for gramian, layer in zip(block_gramians, layers, strict=True):
        gramian = gramian.cpu()
        by_layer[layer] = by_layer[layer] + gramian if layer in by_layer else gramian
    return by_layer


def gramian_weights(
    method: Method, M: Tensor, dtypes: Sequence[torch.dtype], *, losses: Any = None,
    combinations: np.ndarray | None = None, scoped: Tensor | None = None, scale: float = 1.0,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """c from the Gramian (of ``scoped`` if given), and the row weights r with J^T r = J^T c.

    r is checked as ``_checked_row_weights`` says; ``dtypes`` are those of the update, which is
    written as ``scale`` J^T r.
    """
    M = M.cpu()
    c, diagnostics = method.weights_with_diagnostics(M if scoped is None else scoped,
                                                     losses=losses, combinations=combinations)
    c = c.cpu()
    # With combinations A, J^T c = (A J)^T r for the r solving A^T r = c.
    r = c if combinations is None else torch.from_numpy(
        np.linalg.lstsq(combinations.T, c.numpy(), rcond=None)[0])
    return c, _checked_row_weights(method, M, r, dtypes, scale), diagnostics


def blocks_dtypes(blocks: Sequence[Rows]) -> list[torch.dtype]:
    return [block.dtype if isinstance(block, Tensor) else block[0].dtype for block in blocks]


def _block_update(
    method: Method, blocks: Sequence[Rows], block_gramians: list[Tensor],
    layers: Sequence[str], M: Tensor, losses: Any, by_layer: dict[str, Tensor], scale: float,
) -> Update:
    group_of = method.group_blocks(layers)
    count = max(group_of) + 1
    gramians = torch.zeros(count, *M.shape, dtype=torch.float64)
    for k, group in enumerate(group_of):
        gramians[group] += block_gramians[k].cpu()
    with single_threaded_blas():
        C, diagnostics = method.block_weights(gramians.numpy(), losses=losses)
    C = torch.from_numpy(np.asarray(C, dtype=np.float64))
    if C.shape != (count, M.shape[0]):
        raise NonFiniteError(f"{method.name} returned block weights of shape {tuple(C.shape)}, "
                             f"expected {(count, M.shape[0])}")
    rows = []
    for group in range(count):
        members = [blocks[k] for k, g in enumerate(group_of) if g == group]
        rows.append(_checked_row_weights(method, gramians[group], C[group],
                                         blocks_dtypes(members), scale))
    diagnostics = {**diagnostics, "block_weights": C, "groups": torch.tensor(group_of)}
    # J D = sum over groups of M^(g) r^(g): the group Gramians already hold every block.
    products = sum(gramians[g] @ rows[g] for g in range(count))
    sq_norm = float(sum(rows[g] @ gramians[g] @ rows[g] for g in range(count)))
    return Update(M.cpu(), None, diagnostics, block_weights=[rows[g] for g in group_of],
                  layer_gramians=by_layer, row_products=products, update_sq_norm=sq_norm)


def _checked_row_weights(
    method: Method, M: Tensor, r: Tensor, dtypes: Sequence[torch.dtype], scale: float = 1.0
) -> Tensor:
    """r, or zeros when ||J^T r|| is below its own rounding error; NonFiniteError if unusable.

    Both are decided before anything is written, from M alone: ||J^T r||^2 = r^T M r, and every
    element of the written update ``scale`` J^T r is at most ``scale`` sum_i |r_i| ||g_i||.
    """
    if not bool(torch.isfinite(r).all()):
        raise NonFiniteError(f"{method.name} returned non-finite weights {r.tolist()}")
    norms = torch.sqrt(torch.clamp(torch.diagonal(M), min=0.0))
    bound = scale * float((r.abs() * norms).sum())
    largest = min((torch.finfo(dtype).max for dtype in dtypes), default=float("inf"))
    if bound >= largest:
        raise NonFiniteGradientError(
            f"the update of {method.name} overflows: its elements may reach {bound:.3g}"
        )
    if float(r @ M @ r) <= rounding_floor(M, r) ** 2:
        return torch.zeros_like(r)
    return r


def raise_non_finite(blocks: Sequence[Rows], names: Sequence[str], combination: bool) -> None:
    """Name the first task and block whose gradient holds NaN or infinity."""
    for block, name in zip(blocks, names, strict=True):
        for task, row in enumerate(check_block(block)):
            if not bool(torch.isfinite(row).all()):
                subject = f"combined loss {task}" if combination else f"loss {task}"
                raise NonFiniteGradientError(
                    f"the gradient of {subject} with respect to {name} contains NaN or infinity"
                )
    raise NonFiniteGradientError(
        "the task gradients are too large: their Gramian overflows float64")


def _for_jacobian_method(block: Tensor, scale: float) -> Tensor:
    """A block as a Jacobian method gets it: unscaled, and in at least float32.

    These methods compute with the gradients themselves (DB-MTL's moving averages): in half
    precision every operation would round to 8 or 11 bits, and unscaling float16 would flush the
    small gradients that loss scaling kept. Widening is exact.
    """
    wide = block.to(torch.promote_types(block.dtype, torch.float32))
    return wide if scale == 1.0 else wide / scale


def _as_written(update: Tensor, scale: float, dtype: torch.dtype, name: str) -> Tensor:
    """A Jacobian method's update of one block, scaled and in the block's dtype, as written."""
    if scale == 1.0 and update.dtype == dtype:
        return update  # checked by compute_update already
    written = (update if scale == 1.0 else update * scale).to(dtype)
    if not bool(torch.isfinite(written).all()):
        raise NonFiniteGradientError(
            f"the update for {name} overflows {dtype} (scaled by {scale:g})")
    return written
