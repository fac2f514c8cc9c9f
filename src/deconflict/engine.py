"""From task losses to ``.grad``: the PyTorch side of deconflict.

``backward(losses, shared_params, method)`` replaces ``loss.backward()`` in a training loop:

1. the per-task gradients with respect to the shared parameters, by one of the modes below;
2. the method's weights c from the Gramian M = J J^T (float64), or its own block or Jacobian
   rule (``update.compute_update``, ``methods.base``);
3. the update J^T c added to each shared parameter's ``.grad`` (float64 accumulation, written in
   place); every other parameter the losses reach (the task heads) gets its ordinary gradient,
   that of sum_i L_i (or another weighting, see ``head_weights``).
Nothing is written until every gradient is computed and checked.

Modes (``mode=``):

- "sequential": one backward pass per task, keeping the graph; the T x d Jacobian in memory.
- "batched": the T backward passes vectorized (``is_grads_batched``), ``chunk_size`` tasks at a
  time (None: all); faster on wide layers, same memory (more with large chunks).
- "gramian": never holds the Jacobian: M from per-layer pieces (``tracking``; the trunk must be
  tracked with ``deconflict.track(trunk)`` before the forward pass), then one backward pass of
  sum_i c_i L_i. For methods that need only M.
- "auto" (default): "gramian" when the trunk is tracked and the method needs only M, otherwise
  "sequential".
- ``features=``: representation mode (gradients w.r.t. the shared features, one trunk backward),
  with the features' per-task gradients computed sequentially or batched as above.

Loss-weighting methods (sum, mean, UW, DWA, RLW, FAMO, ...) cost one ordinary backward pass of
sum_i c_i L_i instead of T, whatever the mode; GradNorm adds T cheap passes down to the last
shared layer.

Gradients add to ``.grad`` as autograd's do, so gradient accumulation over micro-batches works
unchanged. ``backward`` returns a ``StepRecord`` for logging.

Mixed precision: the forward pass may run under ``torch.autocast``; ``backward`` turns autocast
off for its own arithmetic (the Gramian and combination stay float64). With a GradScaler
(``scaler=``), the rows differentiated are s L_i (s = the scaler's scale), the method sees the
Gramian of the unscaled gradients, M = (s^2 M) / s^2 (``update``), and ``.grad`` receives s times
the update and the head gradients, as ``scaler.scale(loss).backward()`` would leave them for
``scaler.step``. A non-finite loss or gradient then skips the step: the reached parameters'
``.grad`` is filled with infinity, so ``scaler.step`` skips the optimizer and ``scaler.update``
lowers the scale, and the record says ``skipped``.

Data parallel (``distributed="exact"`` or ``"local"``): ``deconflict.distributed`` averages the
per-task gradients across ranks before the method runs, or the updates after it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .distributed import Communication, active_step, run_step
from .errors import (
    DisconnectedLossError,
    InvalidOptionError,
    NonFiniteError,
    NonFiniteGradientError,
    ShapeError,
)
from .gramian import gramian_of_blocks
from .jacobian import check_chunk_size, task_jacobian
from .methods.base import Method
from .methods.registry import method_class
from .tracking import _TRACKERS, tracked_gramian, tracker_of
from .update import compute_update, gramian_weights, raise_non_finite

HeadWeights = Literal["auto", "unit", "method"]
Mode = Literal["auto", "sequential", "batched", "gramian"]
MODES = ("auto", "sequential", "batched", "gramian")


@dataclass(frozen=True)
class StepRecord:
    """What one call to ``backward`` did, for logging (all tensors float64, on the CPU).

    - ``weights``: c (T,) when the shared update is J^T c (None for block and Jacobian methods,
      whose weights are in the diagnostics or do not exist);
    - ``losses``: the T loss values;
    - ``gramian``: M = J J^T, or None when the method needed no per-task gradients. With
      ``combinations`` (CAGrad-Fast), the Gramian of the combined losses A L instead;
    - ``diagnostics``: the method's own (see its docstring);
    - ``mode``: "sequential", "batched", "gramian", or "losses" (one weighted backward pass);
    - ``features``: whether the gradients were taken w.r.t. the shared features;
    - ``layer_gramians``: each shared layer's Gramian M^(k) (a module's weight and bias
      together; M = sum_k M^(k)), keyed by the module's name; empty without a Gramian;
    - ``update_products``: J D, each differentiated row's gradient dotted with the shared update
      D (None without a Gramian); ``update_sq_norm``: ||D||^2;
    - ``skipped``: a GradScaler overflow (``backward(..., scaler=)``): no update was computed,
      ``.grad`` holds infinity so that ``scaler.step`` skips the step; the reason is
      ``diagnostics["overflow"]``;
    - ``communication``: with ``distributed=``, what this rank exchanged
      (``deconflict.distributed.Communication``).
    Conflict diagnostics (``deconflict.diagnostics``) are computed from these, at O(T^2) cost.
    """

    weights: Tensor | None
    losses: Tensor
    gramian: Tensor | None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    mode: str = "sequential"
    combinations: Tensor | None = None
    features: bool = False
    layer_gramians: dict[str, Tensor] = field(default_factory=dict)
    update_products: Tensor | None = None
    update_sq_norm: float | None = None
    skipped: bool = False
    communication: Communication | None = None

    @property
    def conflicting_pairs(self) -> list[tuple[int, int]]:
        """Pairs (i, j), i < j, whose gradients conflict (M_ij < 0); empty without a Gramian."""
        if self.gramian is None or self.combinations is not None:
            return []
        rows, cols = torch.nonzero(torch.triu(self.gramian < 0, diagonal=1), as_tuple=True)
        return list(zip(rows.tolist(), cols.tolist(), strict=True))


def resolve_method(method: Method | str) -> Method:
    """A Method instance from an instance or a registry name (stateless methods only)."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        cls = method_class(method)
        if cls.stateful:
            raise InvalidOptionError(
                f"{cls.name} keeps state across steps: create it once, outside the training loop, "
                f"with deconflict.get({cls.name!r}) and pass that instance"
            )
        return cls()
    raise TypeError(f"method must be a deconflict Method or a method name, got {type(method)!r}")


def backward(
    losses: Sequence[Tensor] | Tensor,
    shared_params: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    method: Method | str,
    *,
    mode: Mode = "auto",
    chunk_size: int | None = None,
    features: Tensor | Sequence[Tensor] | None = None,
    head_weights: HeadWeights = "auto",
    compute_gramian: bool | None = None,
    retain_graph: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    distributed: Literal["exact", "local"] | None = None,
    process_group: Any = None,
) -> StepRecord:
    """Write the method's update into ``.grad``; use it in place of ``loss.backward()``.

    Args:
        losses: the T task losses (scalars), as a sequence or a 1-D tensor.
        shared_params: the parameters all tasks share (a module, tensors, or named tensors).
            They receive J^T c; every other parameter the losses reach gets its ordinary
            gradient. For mode="gramian", the tracked trunk module.
        method: a Method instance, or the name of a stateless one.
        mode: how the per-task gradients are computed: "sequential", "batched", "gramian" or
            "auto" (see the module docstring).
        chunk_size: tasks differentiated together in "batched" and "gramian" modes (None: all).
        features: representation mode (MGDA-UB style): the shared representation Z (or several).
            The method combines the task gradients with respect to Z, and the combination is
            backpropagated once through the trunk into ``shared_params``. The Gramian then sums
            over the batch and feature dimensions.
        head_weights: gradient given to the other parameters: "auto" (the method's own choice:
            sum_i L_i for gradient methods, sum_i c_i L_i for loss weighting, the log losses for
            DB-MTL), "unit" (that of sum_i L_i) or "method" (that of sum_i c_i L_i, the
            official MGDA/Nash-MTL convention).
        compute_gramian: force (True) the per-task gradients and Gramian even for methods that
            only weight losses, e.g. to log conflicts; None decides from the method.
        retain_graph: keep the autograd graph for another backward pass.
        scaler: a ``torch.amp.GradScaler`` (mixed precision), used in place of
            ``scaler.scale(loss).backward()``: the losses are differentiated scaled by its scale
            s, the method sees the unscaled gradients' Gramian and the true losses, and ``.grad``
            receives s times the update (and the heads s times their gradients), for
            ``scaler.step(optimizer)`` and ``scaler.update()`` as usual. A non-finite loss or
            gradient (an overflow) skips the step instead of raising: ``.grad`` is filled with
            infinity, the record has ``skipped=True``, the method's state is left as it was
            (except a Jacobian method's, e.g. DB-MTL's moving averages, not copied for their
            size). A disabled scaler is the same as none.
        distributed: data parallel over ``torch.distributed`` (initialized; every rank calls
            ``backward`` with its own batch of the same size; see ``deconflict.distributed``):
            "exact" averages the per-task gradients over the ranks before the method runs (the
            single-process update on the global batch, identical on every rank), "local" runs
            the method on each rank's batch and averages the updates (plain DDP's
            communication). None: this process only.
        process_group: the group to use with ``distributed`` (None: the default group).

    Returns:
        A StepRecord (weights, losses, Gramian, diagnostics).

    Raises:
        NonFiniteError: a loss or a gradient is NaN or infinite (without an enabled scaler).
        DisconnectedLossError: a loss does not depend on the shared parameters (or features).
        ShapeError: a loss is not a scalar, no loss was given, ...
        InvalidOptionError, UnknownMethodError: bad options or method name.
    """
    method = resolve_method(method)
    step = functools.partial(
        _backward, losses, shared_params, method, mode=mode, chunk_size=chunk_size,
        features=features, head_weights=head_weights, compute_gramian=compute_gramian,
        retain_graph=retain_graph, scaler=scaler)
    if distributed is None and process_group is None:
        return step()
    return run_step(step, method, distributed, process_group)


def _backward(
    losses: Sequence[Tensor] | Tensor, shared_params: Any, method: Method, *, mode: str,
    chunk_size: int | None, features: Any, head_weights: str, compute_gramian: bool | None,
    retain_graph: bool, scaler: torch.amp.GradScaler | None,
) -> StepRecord:
    """``backward`` on this process (inside a distributed step, its hooks exchange data)."""
    if head_weights not in ("auto", "unit", "method"):
        raise InvalidOptionError(
            f"head_weights must be 'auto', 'unit' or 'method', got {head_weights!r}"
        )
    if mode not in MODES:
        raise InvalidOptionError(f"mode must be one of {', '.join(map(repr, MODES))}, "
                                 f"got {mode!r}")
    check_chunk_size(chunk_size)
    if mode == "sequential" and chunk_size not in (None, 1):
        raise InvalidOptionError("chunk_size applies to mode='batched' and mode='gramian'")
    loss_list = _check_losses(losses)
    loss_values = torch.stack([loss.detach().to(torch.float64) for loss in loss_list]).cpu()
    step = active_step()
    if step is not None:
        loss_values = step.handshake(loss_values, _reachable_leaves(loss_list, set()), features,
                                     scaler is not None and scaler.is_enabled())
    bad = torch.nonzero(~torch.isfinite(loss_values)).flatten().tolist()
    bad_losses = (f"loss {bad[0]} is {loss_values[bad[0]].item()} (non-finite losses: tasks "
                  f"{bad})" if bad else None)
    if scaler is not None and not scaler.is_enabled():
        scaler = None
    if bad_losses and scaler is None:
        raise NonFiniteError(bad_losses)
    shared = _named_leaves(shared_params)
    feature_list = _check_features(features)
    if method.needs_features and feature_list is None:
        raise InvalidOptionError(
            f"{method.name} works on the shared representation: pass features=<the trunk's output>"
        )
    loss_weighting = method.kind == "losses"
    if compute_gramian is False and not loss_weighting:
        raise InvalidOptionError(f"{method.name} needs the per-task gradients")
    gramian_only = method.kind in ("gramian", "losses")
    if mode == "gramian":
        if feature_list is not None:
            raise InvalidOptionError("mode='gramian' differentiates the parameters; it does not "
                                     "combine with features=")
        if not gramian_only:
            raise InvalidOptionError(
                f"{method.name} needs more than the Gramian ({method.kind} method); use "
                "mode='sequential' or 'batched'"
            )
    if mode == "auto":
        tracked = isinstance(shared_params, nn.Module) and shared_params in _TRACKERS
        mode = "gramian" if tracked and gramian_only and feature_list is None else "sequential"
    per_task = not loss_weighting or method.gradient_scope == "shared" or bool(compute_gramian)
    if not per_task and head_weights == "unit":
        raise InvalidOptionError(
            f"{method.name} does one weighted backward pass, so every parameter gets the "
            "weighted gradient; pass compute_gramian=True for head_weights='unit'"
        )
    if step is not None:
        step.prepare(mode, per_task, feature_list is not None, shared)
    scale = None
    if scaler is not None:
        # What scaler.scale(loss).backward() differentiates, so that float16 gradients keep
        # their small values; it also creates the scale that scaler.update() will adjust.
        loss_list = [scaler.scale(loss) for loss in loss_list]
        scale = scaler.get_scale()
    state = _state_copy(method) if scaler is not None else None
    try:
        with _autocast_disabled(loss_list):
            if bad_losses:
                raise NonFiniteGradientError(bad_losses)
            if not per_task:
                if mode == "gramian":
                    tracker_of(shared_params).clear()
                return _weighted_loss_backward(method, loss_list, loss_values, shared,
                                               feature_list, retain_graph, scale)
            if mode == "gramian":
                return _gramian_backward(method, loss_list, loss_values, shared, shared_params,
                                         head_weights, retain_graph, chunk_size, scale)
            return _gradient_backward(method, loss_list, loss_values, shared, feature_list,
                                      head_weights, retain_graph, 1 if mode == "sequential" else
                                      chunk_size, mode, scale)
    except NonFiniteGradientError as overflow:
        if scaler is None:
            raise
        if state is not None:
            method.load_state_dict(state)
        return _skip_step(overflow, loss_list, loss_values, shared_params,
                          mode if per_task else "losses", feature_list is not None)


# ------------------------------------------------------------------------------------ paths
def _weighted_loss_backward(
    method: Method, loss_list: list[Tensor], loss_values: Tensor,
    shared: list[tuple[str, Tensor, str]], features: list[Tensor] | None, retain_graph: bool,
    scale: float | None,
) -> StepRecord:
    """Loss-weighting methods: one ordinary backward pass of sum_i c_i L_i.

    With a scaler (``scale``), the L_i are already scaled, and an overflow shows only in the
    gradients of that pass: they are checked before they are written (NonFiniteGradientError,
    for ``backward`` to skip the step).
    """
    leaf_ids = set() if features is not None else {id(p) for _, p, _ in shared}
    nodes = {f.grad_fn for f in features} if features is not None else set()
    for task, loss in enumerate(loss_list):
        if not _reaches(loss, leaf_ids, nodes):
            raise _disconnected(task, features is not None)
    layer_gramian = None
    if method.gradient_scope == "last_layer":
        # GradNorm: per-task gradients of the last shared layer only (cheap: through the heads).
        last = [(name, p) for name, p, layer in shared if layer == shared[-1][2]]
        columns = [torch.autograd.grad(loss, [p for _, p in last], retain_graph=True,
                                       allow_unused=True) for loss in loss_list]
        blocks = [torch.stack([torch.zeros_like(p) if g[k] is None else g[k] for g in columns])
                  .reshape(len(loss_list), -1) for k, (_, p) in enumerate(last)]
        step = active_step()
        if step is not None:
            blocks, _ = step.exchange(blocks, None)
        layer_gramian = gramian_of_blocks(blocks)
        if not bool(torch.isfinite(layer_gramian).all()):
            raise_non_finite(blocks, [f"shared parameter {name}" for name, _ in last], False)
        if scale is not None:
            layer_gramian /= scale**2
    c, diagnostics = method.weights_with_diagnostics(layer_gramian, losses=loss_values)
    total = sum(float(w) * loss for w, loss in zip(c.tolist(), loss_list, strict=True))
    if scale is None:
        torch.autograd.backward(total, retain_graph=retain_graph)
    else:
        leaves = _reachable_leaves([total], set())
        grads = torch.autograd.grad(total, leaves, allow_unused=True, retain_graph=retain_graph)
        _check_finite(leaves, grads, "a parameter")
        _accumulate(leaves, grads)
    if layer_gramian is not None:
        diagnostics["layer_gramian"] = layer_gramian.cpu()
    return StepRecord(weights=c, losses=loss_values, gramian=None, diagnostics=diagnostics,
                      mode="losses", features=features is not None)


def _rows(method: Method, loss_list: list[Tensor]) -> tuple[list[Tensor], np.ndarray | None]:
    """The differentiated rows: the losses, or the method's combinations A L of them."""
    A = method.gradient_combinations(len(loss_list))
    if A is None:
        return loss_list, None
    return [sum(float(a) * loss for a, loss in zip(row, loss_list, strict=True) if a != 0.0)
            for row in A], A


def _gradient_backward(
    method: Method, loss_list: list[Tensor], loss_values: Tensor,
    shared: list[tuple[str, Tensor, str]], features: list[Tensor] | None,
    head_weights: str, retain_graph: bool, chunk_size: int | None, mode: str,
    scale: float | None,
) -> StepRecord:
    """Sequential and batched modes, on the parameters or (``features``) the representation."""
    shared_ids = {id(p) for _, p, _ in shared}
    stop = {f.grad_fn for f in features} if features is not None else set()
    leaves = _reachable_leaves(loss_list, stop)
    heads = [leaf for leaf in leaves if id(leaf) not in shared_ids]
    if features is not None:
        bypass = [name for name, p, _ in shared if any(leaf is p for leaf in leaves)]
        if bypass:
            raise ShapeError(
                f"shared parameter {bypass[0]} is reached by the losses without passing through "
                "the features: representation mode needs the features to separate the trunk "
                "from the heads"
            )
        targets = features
        target_names = [f"the features (input {k})" for k in range(len(features))]
        layers = target_names
    else:
        targets = [p for _, p, _ in shared]
        target_names = [f"shared parameter {name}" for name, _, _ in shared]
        layers = [layer for _, _, layer in shared]

    rows, A = _rows(method, loss_list)
    leaf_ids = set() if features is not None else shared_ids
    for k, row in enumerate(rows):
        if not _reaches(row, leaf_ids, stop):
            raise _disconnected(k, features is not None, combination=A is not None)
    # The graph is freed by its last use: the last row when there is nothing else to do.
    free_graph = features is None and not heads and not retain_graph
    blocks, target_reached = task_jacobian(rows, targets, target_names, chunk_size=chunk_size,
                                           free_graph=free_graph)

    detached = None if features is None else [f.detach() for f in features]
    step = active_step()
    if step is not None:
        blocks, detached = step.exchange(blocks, detached)
    update = compute_update(
        method, blocks, target_names, layers, losses=loss_values, combinations=A,
        features=detached,
        scale=1.0 if scale is None else scale,
    )
    c = update.weights

    # Everything is computed and checked before any .grad changes: no half-applied step.
    head_grads = _head_gradients(method, head_weights, c, loss_values, loss_list, heads,
                                 retain_graph or features is not None)
    if features is None:
        _accumulate(heads, head_grads)
        for k, (_, param, _) in enumerate(shared):
            if target_reached[k]:
                fresh = param.grad is None
                if fresh:
                    param.grad = torch.empty_like(param, memory_format=torch.contiguous_format)
                update.write(k, blocks[k], param.grad, accumulate=not fresh)
    else:
        updates = update.materialize(blocks)
        if step is not None:
            updates = step.local_part(updates)
        outputs = [u.view_as(f) for f, u in zip(features, updates, strict=True)]
        params = [p for _, p, _ in shared]
        trunk_grads = torch.autograd.grad(features, params, outputs, allow_unused=True,
                                          retain_graph=retain_graph)
        if all(g is None for g in trunk_grads):
            raise DisconnectedLossError("the features do not depend on any shared parameter")
        _check_finite(params, trunk_grads, "a shared parameter")
        _accumulate(heads, head_grads)
        _accumulate(params, trunk_grads)

    return StepRecord(
        weights=c, losses=loss_values, gramian=update.gramian, diagnostics=update.diagnostics,
        mode=mode, combinations=None if A is None else torch.from_numpy(A),
        features=features is not None, layer_gramians=update.layer_gramians,
        update_products=update.row_products, update_sq_norm=update.update_sq_norm,
    )


def _gramian_backward(
    method: Method, loss_list: list[Tensor], loss_values: Tensor,
    shared: list[tuple[str, Tensor, str]], shared_params: Any, head_weights: str,
    retain_graph: bool, chunk_size: int | None, scale: float | None,
) -> StepRecord:
    """Gramian-only mode: M from the tracked layers, then one backward pass of sum_i r_i L_i."""
    tracker = tracker_of(shared_params)
    try:
        shared_ids = {id(p) for _, p, _ in shared}
        leaves = _reachable_leaves(loss_list, set())
        heads = [leaf for leaf in leaves if id(leaf) not in shared_ids]
        reached = [p for _, p, _ in shared if any(leaf is p for leaf in leaves)]
        stop = {edge.node for call in tracker.calls for edge in call.edges}
        outside = _reachable_leaves(loss_list, stop)
        bypass = [name for name, p, _ in shared if any(leaf is p for leaf in outside)]
        if bypass:
            raise InvalidOptionError(
                f"shared parameter {bypass[0]} is used outside the tracked layer calls (e.g. a "
                "tied weight used by a head); mode='gramian' cannot see its per-task gradients: "
                "use mode='sequential' or 'batched'"
            )
        rows, A = _rows(method, loss_list)
        for k, row in enumerate(rows):
            if not _reaches(row, shared_ids, set()):
                raise _disconnected(k, False, combination=A is not None)
        scale = 1.0 if scale is None else scale
        M, covered, by_layer = tracked_gramian(tracker, rows, shared, chunk_size, scale)
        missing = [name for name, p, _ in shared if any(p is q for q in reached)
                   and id(p) not in covered]
        if missing:
            raise InvalidOptionError(
                f"shared parameter {missing[0]} is reached by the losses but not through a "
                "recorded call of the module that owns it; use mode='sequential'"
            )
        c, r, diagnostics = gramian_weights(method, M, [p.dtype for p in reached],
                                            losses=loss_values, combinations=A, scale=scale)
        head_grads = _head_gradients(method, head_weights, c, loss_values, loss_list, heads,
                                     True)
        combined = sum(float(w) * row for w, row in zip(r.tolist(), rows, strict=True))
        shared_grads = torch.autograd.grad(combined, reached, allow_unused=True,
                                           retain_graph=retain_graph)
        _check_finite(reached, shared_grads, "a shared parameter")
    finally:
        tracker.clear()
    _accumulate(heads, head_grads)
    _accumulate(reached, shared_grads)
    return StepRecord(
        weights=c, losses=loss_values, gramian=M, diagnostics=diagnostics, mode="gramian",
        combinations=None if A is None else torch.from_numpy(A), layer_gramians=by_layer,
        update_products=M @ r, update_sq_norm=float(r @ M @ r),
    )


def _head_gradients(
    method: Method, head_weights: str, weights: Tensor | None, losses: Tensor,
    loss_list: list[Tensor], heads: list[Tensor], retain_graph: bool,
) -> Sequence[Tensor | None]:
    """The task-specific parameters' gradients (checked, not yet written)."""
    if not heads:
        return []
    coefficients = _head_coefficients(method, head_weights, weights, losses)
    head_loss = sum(float(w) * loss for w, loss in zip(coefficients, loss_list, strict=True)
                    if w != 0.0)
    if not isinstance(head_loss, Tensor):
        return [None] * len(heads)
    grads = torch.autograd.grad(head_loss, heads, allow_unused=True, retain_graph=retain_graph)
    _check_finite(heads, grads, "a task-specific parameter")
    return grads


def _head_coefficients(
    method: Method, head_weights: str, weights: Tensor | None, losses: Tensor
) -> np.ndarray:
    if head_weights == "unit":
        return np.ones(len(losses))
    if head_weights == "method":
        if weights is None:
            raise InvalidOptionError(
                f"head_weights='method' needs task weights, and {method.name} has none"
            )
        return weights.numpy()
    return method.head_coefficients(None if weights is None else weights.numpy(),
                                    losses.numpy())


# ---------------------------------------------------------------------------------- helpers
def _check_losses(losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(losses, Tensor):
        if losses.ndim != 1:
            raise ShapeError(
                f"losses given as one tensor must be 1-D (one value per task), got shape "
                f"{tuple(losses.shape)}"
            )
        loss_list = list(losses.unbind())
    else:
        loss_list = list(losses)
    if not loss_list:
        raise ShapeError("backward needs at least one loss")
    for task, loss in enumerate(loss_list):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss {task} is a {type(loss).__name__}, not a torch.Tensor")
        if loss.numel() != 1 or loss.ndim > 1:
            raise ShapeError(
                f"loss {task} has shape {tuple(loss.shape)}; each loss must be a scalar (reduce "
                "it, e.g. with .mean())"
            )
        if not loss.requires_grad:
            raise DisconnectedLossError(
                f"loss {task} does not require grad: it is not connected to any parameter"
            )
    return [loss.reshape(()) for loss in loss_list]


def _named_leaves(
    params: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
) -> list[tuple[str, Tensor, str]]:
    """(name, tensor, layer key) for each shared tensor; tensors of one module share a key."""
    items = params.named_parameters() if isinstance(params, nn.Module) else params
    named: list[tuple[str, Tensor, str]] = []
    seen: set[int] = set()
    for index, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
            name, param = item
            layer = name.rsplit(".", 1)[0] if "." in name else ""
        elif isinstance(item, Tensor):
            name, param = f"#{index} (shape {tuple(item.shape)})", item
            layer = name
        else:
            raise TypeError(f"shared_params item {index} is a {type(item).__name__}, not a tensor")
        if not param.requires_grad:
            raise InvalidOptionError(f"shared parameter {name} does not require grad")
        if not param.is_leaf:
            raise InvalidOptionError(
                f"shared parameter {name} is not a leaf tensor (pass parameters, not results "
                "computed from them; use features= for a shared representation)"
            )
        if id(param) not in seen:
            seen.add(id(param))
            named.append((name, param, layer))
    if not named:
        raise ShapeError("shared_params is empty: give the parameters all tasks share")
    return named


def _check_features(features: Tensor | Sequence[Tensor] | None) -> list[Tensor] | None:
    if features is None:
        return None
    feature_list = [features] if isinstance(features, Tensor) else list(features)
    if not feature_list:
        raise ShapeError("features is empty")
    for k, feature in enumerate(feature_list):
        if not isinstance(feature, Tensor) or feature.grad_fn is None:
            raise InvalidOptionError(
                f"features input {k} must be a tensor computed from the shared parameters "
                "(with a grad_fn)"
            )
    return feature_list


def _reachable_leaves(roots: Sequence[Tensor], stop: set[Any]) -> list[Tensor]:
    """Leaf tensors that require grad and are reached from ``roots`` without crossing ``stop``."""
    leaves: list[Tensor] = []
    found: set[int] = set()
    for root in roots:
        if root.grad_fn is None and root.requires_grad and id(root) not in found:
            found.add(id(root))
            leaves.append(root)
    seen: set[Any] = set()
    pending = [root.grad_fn for root in roots if root.grad_fn is not None]
    while pending:
        node = pending.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in found:
            found.add(id(variable))
            leaves.append(variable)
        pending.extend(child for child, _ in node.next_functions)
    return leaves


def _reaches(root: Tensor, leaf_ids: set[int], nodes: set[Any]) -> bool:
    """Whether the graph of ``root`` contains one of the given leaves or graph nodes."""
    if id(root) in leaf_ids:
        return True
    seen: set[Any] = set()
    pending = [root.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        if node in nodes:
            return True
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in leaf_ids:
            return True
        pending.extend(child for child, _ in node.next_functions)
    return False


def _disconnected(task: int, features: bool, combination: bool = False) -> DisconnectedLossError:
    what = "the features" if features else "any shared parameter"
    subject = f"combined loss {task}" if combination else f"loss {task}"
    return DisconnectedLossError(f"{subject} does not depend on {what}")


def _check_finite(params: Sequence[Tensor], grads: Sequence[Tensor | None], what: str) -> None:
    present = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
    if not present:
        return
    # A sum is non-finite whenever an element is (NaN and infinity propagate) and costs one
    # pass; only if one is, the exact test below rules out an overflow of the sum itself.
    sums = torch.stack([g.sum() for _, g in present])
    if bool(torch.isfinite(sums).all()):
        return
    for param, grad in present:
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteGradientError(f"the gradient of {what} of shape "
                                         f"{tuple(param.shape)} contains NaN or infinity")


def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Add gradients to ``.grad``, as autograd does."""
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        grad = grad.detach().to(param.dtype)
        if param.grad is not None:
            param.grad.add_(grad)
        elif grad.is_contiguous():
            param.grad = grad
        else:
            # Autograd may hand back broadcast views (stride 0): give .grad its own storage.
            param.grad = grad.clone(memory_format=torch.contiguous_format)


def _autocast_disabled(losses: Sequence[Tensor]) -> ExitStack:
    """Autocast off while the engine works: it would recast the float32 products of Jacobian
    methods and diagnostics to bfloat16/float16. Backward passes do not depend on it (they
    replay the dtypes the forward pass chose)."""
    stack = ExitStack()
    for device in sorted({"cpu", *(loss.device.type for loss in losses)}):
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def _state_copy(method: Method) -> dict[str, Any] | None:
    """The method's state, to restore if the step is skipped; None if it has none to save.

    Jacobian methods are not copied: DB-MTL's state is as large as the gradients.
    """
    if not method.stateful or method.kind == "jacobian":
        return None
    return copy.deepcopy(method.state_dict())


def _skip_step(
    overflow: NonFiniteGradientError, loss_list: list[Tensor], loss_values: Tensor,
    shared_params: Any, mode: str, features: bool,
) -> StepRecord:
    """A GradScaler overflow: make ``scaler.step`` skip the optimizer step, as it would after an
    overflowing ``scaler.scale(loss).backward()``, by writing infinity into the ``.grad`` of
    every parameter the losses reach (so every optimizer holding one of them skips)."""
    tracker = _TRACKERS.get(shared_params) if isinstance(shared_params, nn.Module) else None
    if tracker is not None:
        tracker.clear()
    for leaf in _reachable_leaves(loss_list, set()):
        if leaf.grad is None:
            leaf.grad = torch.full_like(leaf, float("inf"), memory_format=torch.contiguous_format)
        else:
            leaf.grad.fill_(float("inf"))
    return StepRecord(weights=None, losses=loss_values, gramian=None,
                      diagnostics={"overflow": str(overflow)}, mode=mode, features=features,
                      skipped=True)
