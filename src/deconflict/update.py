"""From the per-task gradients, block by block, to the update: the one place every method's
output becomes d-dimensional. ``aggregate`` and the engine both go through ``compute_update``.

Input: the Jacobian in column blocks J_k (R x d_k; one per parameter tensor in the engine), a
name per block for error messages, and a layer key per block (blocks of one module share it).
The Gramian is accumulated per block in float64, M = sum_k M_k (``docs/methods.md#gramian``);
then by the method's protocol (``methods.base``):

- ``GramianWeighting``, ``LossWeighting`` and a single-group ``BlockWeighting``: c from M (for a
  "last_layer" loss weighting, from the Gramian of the last layer's blocks), update_k = J_k^T c;
- ``BlockWeighting``: c^(g) from each group's Gramian, update_k = J_k^T c^(group of k);
- ``JacobianAggregator``: the method maps the blocks to their updates itself.

An update J^T c whose norm is below its own float64 rounding error (``gramian.rounding_floor``;
e.g. at a Pareto-stationary point, ``docs/methods.md#stationarity``) is made exact zeros: its
direction would be noise. The update is returned unwritten (``Update``): the engine writes it
into ``.grad`` in place.

Non-finite values (``docs/methods.md#non-finite``) are returned as a ``finite.NonFinite``
finding, not raised: a NaN in the gradients, an update that would overflow its dtype. The
engine raises it, or skips the step under loss scaling; ``aggregate`` raises it.

Loss scaling (``scaling.LossScale``, s a ``torch.amp.GradScaler``'s scale): the blocks are then
the gradients of s L_i. The method sees the Gramian of the gradients of the L_i, M = (s^2 M) /
s^2 (exact for a power of two, as a GradScaler's scale is), and the update is s J^T c: the
product of the scaled blocks with the same weights, which ``scaler.step`` divides by s again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .errors import InvalidOptionError, NonFiniteError, ShapeError
from .finite import NonFinite
from .gramian import check_block, combine_block, gramian_of_blocks
from .kernels import Rows
from .linalg import single_threaded_blas, update_rounding_floor
from .methods.base import (
    BlockWeighting,
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
    Method,
)
from .scaling import NO_SCALE, LossScale

# The methods whose weights c come from a Gramian: ``weights_with_diagnostics(M, ...)``.
WeightsFromGramian = GramianWeighting | LossWeighting | BlockWeighting


def weighs_by_gramian(method: Method) -> bool:
    """Whether the method's update is J^T c with c from the Gramian M (and the losses) alone.

    True for Gramian and loss weightings, and for a block weighting whose blocks form one group
    (GradVac with granularity="whole"): these run in Gramian-only mode, and have task weights.

    >>> import deconflict
    >>> [weighs_by_gramian(deconflict.get(name)) for name in ("upgrad", "mean", "graddrop")]
    [True, True, False]
    """
    if isinstance(method, BlockWeighting):
        return method.single_group
    return not isinstance(method, JacobianAggregator)


def last_layer_scope(method: Method) -> bool:
    """Whether the method weighs the losses from the Gramian of the last shared layer only
    (GradNorm's gradient norms)."""
    return isinstance(method, LossWeighting) and method.gradient_scope == "last_layer"


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
        assert self.block_updates is not None  # one of the two is set (see the class docstring)
        update = self.block_updates[index].view_as(out).to(out.dtype)
        if accumulate:
            out.add_(update)
        else:
            out.copy_(update)

    def materialize(self, blocks: Sequence[Rows]) -> list[Tensor]:
        """Each block's update as a new flat tensor in the block's dtype."""
        if self.block_weights is None:
            assert self.block_updates is not None
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
    scale: LossScale = NO_SCALE,
    gramians: tuple[list[Tensor], Tensor] | None = None,
) -> Update | NonFinite:
    """The method's update for a Jacobian given in blocks (see the module docstring).

    ``scale``: the blocks are the gradients of the losses scaled by it (loss scaling).
    ``gramians``: the blocks' Gramians from ``checked_gramians`` (computed here if None).

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> blocks, names = split_columns(J)
    >>> update = compute_update(deconflict.get("mean"), blocks, names, names)
    >>> update.weights, update.materialize(blocks)
    (tensor([0.5000, 0.5000], dtype=torch.float64), [tensor([0.5000, 1.0000])])
    """
    if gramians is None:
        checked = checked_gramians(blocks, names, scale=scale,
                                   combination=combinations is not None)
        if isinstance(checked, NonFinite):
            return checked
        gramians = checked
    block_gramians, M = gramians
    by_layer = layer_gramians(block_gramians, layers)
    if isinstance(method, JacobianAggregator):
        return _jacobian_update(method, blocks, names, M, losses, features, by_layer, scale)
    if isinstance(method, BlockWeighting) and not method.single_group:
        return _block_update(method, blocks, block_gramians, layers, M, losses, by_layer, scale)
    scoped = M
    if last_layer_scope(method):
        last = [k for k, layer in enumerate(layers) if layer == layers[-1]]
        scoped = torch.stack([block_gramians[k] for k in last]).sum(dim=0)
    weighed = gramian_weights(method, M, blocks_dtypes(blocks), losses=losses,
                              combinations=combinations, scoped=scoped, scale=scale)
    if isinstance(weighed, NonFinite):
        return weighed
    c, r, diagnostics = weighed
    M = M.cpu()
    # J D = M r and ||D||^2 = r^T M r, in NumPy: T x T products cost less there than in torch.
    products = M.numpy() @ r.numpy()
    return Update(M, c, diagnostics, block_weights=[r] * len(blocks), layer_gramians=by_layer,
                  row_products=torch.from_numpy(products),
                  update_sq_norm=float(r.numpy() @ products))


def matrix_update(method: Method, jacobian: Tensor, losses: Any = None
                  ) -> Tensor | NonFinite | None:
    """``compute_update`` and ``materialize`` in one, for a whole T x d Jacobian (one block) and
    a method whose weights come from the Gramian: the call ``aggregate`` makes most often.

    The same checks and the same update, with the per-call cost cut to the two kernels and the
    method: the T x T algebra stays in NumPy and no record (layer Gramians, row products) is
    built, since ``aggregate`` returns the update alone. None where it does not apply (another
    protocol, a layout the compiled kernels cannot read, or a non-finite Gramian: the general
    path then names the task); the caller takes the general path.
    """
    # A loss weighting is told apart first: ``weighs_by_gramian`` holds for every one.
    from_losses: LossWeighting | None = None  # weights from the losses alone: no Gramian
    if isinstance(method, LossWeighting):
        if method.gradient_scope == "last_layer":
            return None
        if method.gradient_scope == "none" and not method.stateful:
            from_losses = method
    elif not weighs_by_gramian(method):
        return None
    rows = kernels.compiled_matrix(jacobian)
    if rows is None:
        return None
    if from_losses is not None:
        return _loss_weighted_update(from_losses, rows, losses)
    M = kernels.matrix_gramian(rows)
    if not np.isfinite(M).all():
        return None
    # M is finite, exactly symmetric (the kernel mirrors its upper triangle) and has a
    # non-negative diagonal (sums of squares): what ``as_gramian_array`` would return, so the
    # method takes it as it is.
    assert isinstance(method, WeightsFromGramian)  # weighs_by_gramian
    c = method.weights_of_gramian_array(M, losses)
    checked = _checked_weights(method, M, c, (jacobian.dtype,))
    if isinstance(checked, NonFinite):
        return checked
    update = np.empty(rows.shape[1], dtype=rows.dtype)
    kernels.matrix_combine(rows, np.ascontiguousarray(checked), update)
    return torch.from_numpy(update)


def _loss_weighted_update(method: LossWeighting, rows: np.ndarray, losses: Any
                          ) -> Tensor | None:
    """J^T c for weights c from the losses alone (a stateless loss weighting: sum, mean): one
    pass over J, no Gramian, as the engine's one weighted backward pass forms none either (so
    no rounding floor is applied to D, in ``aggregate`` as in ``backward``).

    The finiteness check is fused into that pass (``kernels.matrix_combine``): a NaN or
    infinity anywhere in J reaches the float64 sum of its column (0 * inf is NaN too), and so
    does an overflow of D's dtype; both leave a non-finite element in D. Only then (None) the
    general path, which forms the Gramian, names the task or reports the overflow: the method
    is stateless, so computing its weights a second time there changes nothing.
    """
    c = method.loss_weights_array(rows.shape[0], losses)
    # Allocated by NumPy and wrapped: cheaper than torch.empty and .numpy() at small d.
    out = np.empty(rows.shape[1], dtype=rows.dtype)
    if not kernels.matrix_combine(rows, np.ascontiguousarray(c), out):
        return None
    return torch.from_numpy(out)


def checked_gramians(
    blocks: Sequence[Rows], names: Sequence[str], *, scale: LossScale = NO_SCALE,
    combination: bool = False,
) -> tuple[list[Tensor], Tensor] | NonFinite:
    """Each block's Gramian and their sum M (float64), or what is not finite, naming the task.

    The finiteness check is free: a NaN or infinity in row i reaches M_ii in the pass that forms
    M anyway; only then are the rows themselves read again to name the task and block.
    """
    block_gramians = [scale.gramian(gramian_of_blocks([block])) for block in blocks]
    # One block (``aggregate``): M is a copy of its Gramian, not a sum of one.
    M = (block_gramians[0].clone() if len(block_gramians) == 1
         else torch.stack(block_gramians).sum(dim=0))
    if not bool(torch.isfinite(M).all()):
        return non_finite_rows(blocks, names, combination=combination)
    return block_gramians, M


def layer_gramians(block_gramians: Sequence[Tensor], layers: Sequence[str]) -> dict[str, Tensor]:
    """The Gramian of each layer's blocks (M^(k) = sum of its blocks' Gramians), in layer order.

    Blocks of one module share a layer key, so a layer's Gramian is over its weight and bias
    together: the unit of the Recon scores (``docs/methods.md#recon``).
    """
    by_layer: dict[str, Tensor] = {}
    for gramian, layer in zip(block_gramians, layers, strict=True):
        gramian = gramian.cpu()
        by_layer[layer] = by_layer[layer] + gramian if layer in by_layer else gramian
    return by_layer


def gramian_weights(
    method: Method, M: Tensor, dtypes: Sequence[torch.dtype], *, losses: Any = None,
    combinations: np.ndarray | None = None, scoped: Tensor | None = None,
    scale: LossScale = NO_SCALE,
) -> tuple[Tensor, Tensor, dict[str, Any]] | NonFinite:
    """c from the Gramian (of ``scoped`` if given), and the row weights r with J^T r = J^T c.

    r is checked as ``_checked_row_weights`` says; ``dtypes`` are those of the update, which is
    written as s J^T r (s the loss scale).
    """
    if not isinstance(method, WeightsFromGramian):
        raise InvalidOptionError(f"{method.name} needs more than the Gramian")
    M = M.cpu()
    c, diagnostics = method.weights_with_diagnostics(M if scoped is None else scoped,
                                                     losses=losses, combinations=combinations)
    c = c.cpu()
    # With combinations A, J^T c = (A J)^T r for the r solving A^T r = c.
    r = c if combinations is None else torch.from_numpy(
        np.linalg.lstsq(combinations.T, c.numpy(), rcond=None)[0])
    checked = _checked_row_weights(method, M, r, dtypes, scale)
    if isinstance(checked, NonFinite):
        return checked
    return c, checked, diagnostics


def blocks_dtypes(blocks: Sequence[Rows]) -> list[torch.dtype]:
    return [block.dtype if isinstance(block, Tensor) else block[0].dtype for block in blocks]


def _block_update(
    method: BlockWeighting, blocks: Sequence[Rows], block_gramians: list[Tensor],
    layers: Sequence[str], M: Tensor, losses: Any, by_layer: dict[str, Tensor],
    scale: LossScale,
) -> Update | NonFinite:
    group_of = method.group_blocks(layers)
    count = max(group_of) + 1
    gramians = torch.zeros(count, *M.shape, dtype=torch.float64)
    for k, group in enumerate(group_of):
        gramians[group] += block_gramians[k].cpu()
    with single_threaded_blas():
        C, diagnostics = method.block_weights(gramians.numpy(), losses=losses)
    weights = torch.from_numpy(np.asarray(C, dtype=np.float64))
    if weights.shape != (count, M.shape[0]):
        raise NonFiniteError(f"{method.name} returned block weights of shape "
                             f"{tuple(weights.shape)}, expected {(count, M.shape[0])}")
    rows: list[Tensor] = []
    for group in range(count):
        members = [blocks[k] for k, g in enumerate(group_of) if g == group]
        checked = _checked_row_weights(method, gramians[group], weights[group],
                                       blocks_dtypes(members), scale)
        if isinstance(checked, NonFinite):
            return checked
        rows.append(checked)
    diagnostics = {**diagnostics, "block_weights": weights, "groups": torch.tensor(group_of)}
    # J D = sum over groups of M^(g) r^(g): the group Gramians already hold every block.
    products = torch.stack([gramians[g] @ rows[g] for g in range(count)]).sum(dim=0)
    sq_norm = float(sum(rows[g] @ gramians[g] @ rows[g] for g in range(count)))
    return Update(M.cpu(), None, diagnostics, block_weights=[rows[g] for g in group_of],
                  layer_gramians=by_layer, row_products=products, update_sq_norm=sq_norm)


def _checked_row_weights(
    method: Method, M: Tensor, r: Tensor, dtypes: Sequence[torch.dtype],
    scale: LossScale = NO_SCALE,
) -> Tensor | NonFinite:
    """r, or zeros when ||J^T r|| is below its own rounding error; NonFinite if it overflows
    (NonFiniteError if the weights themselves are not finite: a defect of the method).

    Both are decided before anything is written, from M alone: ||J^T r||^2 = r^T M r, and every
    element of the written update s J^T r is at most s sum_i |r_i| ||g_i||.
    """
    weights = r.numpy() if r.device.type == "cpu" and r.dtype == torch.float64 else (
        r.detach().to("cpu", torch.float64).numpy())
    gramian = M.numpy() if M.device.type == "cpu" else M.cpu().numpy()
    checked = _checked_weights(method, gramian, weights, dtypes, scale)
    if isinstance(checked, NonFinite):
        return checked
    return r if checked is weights else torch.zeros_like(r)


def _checked_weights(
    method: Method, gramian: np.ndarray, weights: np.ndarray, dtypes: Sequence[torch.dtype],
    scale: LossScale = NO_SCALE,
) -> np.ndarray | NonFinite:
    """``_checked_row_weights`` on NumPy arrays: ``weights`` itself, or zeros (a new array),
    or NonFinite."""
    if kernels.numba is not None and gramian.dtype == np.float64 and weights.dtype == np.float64:
        # One compiled call instead of about ten NumPy ones on T-sized arrays (each ~1 us).
        finite, budget, square = _weight_sums(gramian, weights)
    else:
        finite = bool(np.isfinite(weights).all())
        budget = float(np.abs(weights) @ np.sqrt(np.maximum(np.diagonal(gramian), 0.0)))
        square = float(weights @ gramian @ weights) if finite else 0.0
    if not finite:
        raise NonFiniteError(f"{method.name} returned non-finite weights {weights.tolist()}")
    bound = scale.factor * budget
    largest = min((_largest(dtype) for dtype in dtypes), default=float("inf"))
    if bound >= largest:
        return NonFinite(
            f"the update of {method.name} overflows: its elements may reach {bound:.3g}"
        )
    # ||J^T r||^2 = r^T M r against the rounding floor (``gramian.rounding_floor``).
    if square <= update_rounding_floor(len(weights), budget) ** 2:
        return np.zeros_like(weights)
    return weights


if kernels.numba is not None:

    @kernels.numba.njit(cache=True)
    def _weight_sums(gramian, weights):  # pragma: no cover - compiled
        # (all weights finite, sum_i |r_i| sqrt(max(M_ii, 0)), r^T M r): what
        # ``_checked_weights`` decides from, summed in float64 in index order.
        T = weights.size
        for i in range(T):
            if not np.isfinite(weights[i]):
                return False, 0.0, 0.0
        budget = 0.0
        square = 0.0
        for i in range(T):
            budget += abs(weights[i]) * np.sqrt(max(gramian[i, i], 0.0))
            row = 0.0
            for j in range(T):
                row += gramian[i, j] * weights[j]
            square += weights[i] * row
        return True, budget, square


_LARGEST: dict[torch.dtype, float] = {}


def _largest(dtype: torch.dtype) -> float:
    """The largest finite value of a floating dtype (cached: ``torch.finfo`` is slow)."""
    if dtype not in _LARGEST:
        _LARGEST[dtype] = float(torch.finfo(dtype).max)
    return _LARGEST[dtype]


def non_finite_rows(blocks: Sequence[Rows], names: Sequence[str], combination: bool
                    ) -> NonFinite:
    """Name the first task and block whose gradient holds NaN or infinity."""
    for block, name in zip(blocks, names, strict=True):
        for task, row in enumerate(check_block(block)):
            if not bool(torch.isfinite(row).all()):
                subject = f"combined loss {task}" if combination else f"loss {task}"
                return NonFinite(
                    f"the gradient of {subject} with respect to {name} contains NaN or infinity"
                )
    return NonFinite("the task gradients are too large: their Gramian overflows float64")


def _jacobian_update(
    method: JacobianAggregator, blocks: Sequence[Rows], names: Sequence[str], M: Tensor,
    losses: Any, features: Sequence[Tensor] | None, by_layer: dict[str, Tensor],
    scale: LossScale,
) -> Update | NonFinite:
    """A Jacobian method's update, from the (unscaled, widened) blocks themselves."""
    if losses is None and method.needs_losses:
        raise InvalidOptionError(f"{method!r} needs the losses: pass losses=[L_1, ..., L_T]")
    stacked = [_for_jacobian_method(b if isinstance(b, Tensor) else torch.stack(list(b)), scale)
               for b in blocks]
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
    products = torch.stack([J.to(u.dtype) @ u for J, u in zip(stacked, updates, strict=True)]
                           ).sum(dim=0).cpu()
    sq_norm = float(sum(torch.dot(u, u).item() for u in updates))
    written: list[Tensor] = []
    for update, dtype, name in zip(updates, blocks_dtypes(blocks), names, strict=True):
        as_written = _as_written(update, scale, dtype, name)
        if isinstance(as_written, NonFinite):
            return as_written
        written.append(as_written)
    return Update(M.cpu(), None, diagnostics, block_updates=written, layer_gramians=by_layer,
                  row_products=products.to(torch.float64), update_sq_norm=sq_norm)


def _for_jacobian_method(block: Tensor, scale: LossScale) -> Tensor:
    """A block as a Jacobian method gets it: unscaled, and in at least float32.

    These methods compute with the gradients themselves (DB-MTL's moving averages): in half
    precision every operation would round to 8 or 11 bits, and unscaling float16 would flush the
    small gradients that loss scaling kept. Widening is exact.
    """
    return scale.unscaled(block.to(torch.promote_types(block.dtype, torch.float32)))


def _as_written(update: Tensor, scale: LossScale, dtype: torch.dtype, name: str
                ) -> Tensor | NonFinite:
    """A Jacobian method's update of one block, scaled and in the block's dtype, as written."""
    if scale.factor == 1.0 and update.dtype == dtype:
        return update  # checked by compute_update already
    written = scale.scaled(update).to(dtype)
    if not bool(torch.isfinite(written).all()):
        return NonFinite(f"the update for {name} overflows {dtype} (scaled by {scale.factor:g})")
    return written
