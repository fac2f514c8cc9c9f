"""From task losses to ``.grad``: the PyTorch side of deconflict.

``backward(losses, shared_params, method)`` replaces ``loss.backward()`` in a training loop:

1. the per-task gradients with respect to the shared parameters, by one of the modes below;
2. the method's weights c from the Gramian M = J J^T (float64), or its own block or Jacobian
   rule (``update.compute_update``, ``methods.base``);
3. the update J^T c added to each shared parameter's ``.grad`` (float64 accumulation, written in
   place); every other parameter the losses reach (the task heads) gets its ordinary gradient,
   that of sum_i L_i (or another weighting, see ``head_weights``).
Nothing is written until every gradient is computed and checked: a NaN or infinity in any
task's gradient (shared parameters, features or heads) raises ``NonFiniteGradientError`` naming
the task and the parameter, with ``.grad`` and the method's state as they were before the call.
The checks ride on passes that read the gradients anyway (a NaN in task i reaches M_ii), or
read the new gradient once (the heads', the one backward pass of loss weighting); the task at
fault is found only on the error path. Frozen parameters (``requires_grad=False``) in the shared
trunk are skipped in every mode, as autograd skips them: their ``.grad`` stays None.

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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
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
from .update import checked_gramians, compute_update, gramian_weights, raise_non_finite

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
            gradient. Frozen ones (``requires_grad=False``) are skipped; at least one must be
            trainable. For mode="gramian", the tracked trunk module.
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
        NonFiniteError: a loss or a gradient is NaN or infinite (without an enabled scaler);
            for a gradient, NonFiniteGradientError naming the task and the parameter. Whatever
            the error, ``.grad`` and the method's state are left as they were (a Jacobian
            method's state is not copied: every gradient it sees is checked before it runs).
        DisconnectedLossError: a loss does not depend on the shared parameters (or features).
        ShapeError: a loss is not a scalar, no loss was given, ...
        InvalidOptionError, UnknownMethodError: bad options or method name.
    """
    method = resolve_method(method)
    # Every check comes before .grad changes, but some come after the method ran (the one
    # backward pass of loss weighting needs its weights first): a failed step puts the state back.
    state = _state_copy(method)
    step = functools.partial(
        _backward, losses, shared_params, method, mode=mode, chunk_size=chunk_size,
        features=features, head_weights=head_weights, compute_gramian=compute_gramian,
        retain_graph=retain_graph, scaler=scaler, state=state)
    try:
        if distributed is None and process_group is None:
            return step()
        return run_step(step, method, distributed, process_group)
    except Exception:
        if state is not None:
            method.load_state_dict(state)
        raise


def _backward(
    losses: Sequence[Tensor] | Tensor, shared_params: Any, method: Method, *, mode: str,
    chunk_size: int | None, features: Any, head_weights: str, compute_gramian: bool | None,
    retain_graph: bool, scaler: torch.amp.GradScaler | None, state: dict[str, Any] | None,
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

    The gradients of that pass are checked (one read of them) before they are written; a NaN
    or infinity raises NonFiniteGradientError naming the task. The pass sums the tasks, so the
    task is found without a second pass and without keeping the graph (which would hold the
    activations until the caller drops the losses): ``_TaskGraph`` watches the gradient each
    task sends into the part of the graph the tasks share, and tells which parameters belong
    to one task only. With a scaler (``scale``), the L_i are already scaled, and the same check
    catches an overflow (for ``backward`` to skip the step).
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
    graph = _TaskGraph(loss_list)
    with graph.watching():
        grads = torch.autograd.grad(total, graph.leaves, allow_unused=True,
                                    retain_graph=retain_graph)
    bad = _non_finite_index(grads)
    if bad is not None:
        names = {id(p): f"shared parameter {name}" for name, p, _ in shared}
        raise graph.error(graph.leaves[bad], names)
    _accumulate(graph.leaves, grads)
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
    # The graph is freed by its last use: the last row when there is nothing else to do. Not
    # by a batched pass: a NaN in one task spreads to the others there (0 * inf where a task's
    # branch gets a zero output gradient), and the graph is needed to find the task at fault.
    free_graph = features is None and not heads and not retain_graph and chunk_size == 1
    blocks, target_reached = task_jacobian(rows, targets, target_names, chunk_size=chunk_size,
                                           free_graph=free_graph)

    detached = None if features is None else [f.detach() for f in features]
    step = active_step()
    if step is not None:
        blocks, detached = step.exchange(blocks, detached)
    scale = 1.0 if scale is None else scale
    try:
        gramians = checked_gramians(blocks, target_names, scale=scale,
                                    combination=A is not None)
    except NonFiniteGradientError:
        # Sequential rows name their task already, unless they are combinations of the tasks.
        if not free_graph and (chunk_size != 1 or A is not None):
            _raise_culprit(loss_list, targets, target_names)
        raise
    # Everything is computed and checked before any .grad changes (no half-applied step), and
    # as much as possible before the method runs and updates its state.
    head_retain = retain_graph or features is not None
    early = _heads_first(method, head_weights)
    if early:
        head_grads = _head_gradients(method, head_weights, None, loss_values, loss_list, heads,
                                     head_retain)
    update = compute_update(
        method, blocks, target_names, layers, losses=loss_values, combinations=A,
        features=detached, scale=scale, gramians=gramians,
    )
    c = update.weights
    if not early:
        head_grads = _head_gradients(method, head_weights, c, loss_values, loss_list, heads,
                                     head_retain)
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
        bad = _non_finite_index(trunk_grads)
        if bad is not None:
            raise NonFiniteGradientError(
                f"the gradient of shared parameter {shared[bad][0]} (the combined update "
                "backpropagated through the trunk) contains NaN or infinity, although every "
                "task's gradient with respect to the features is finite: it arises in the trunk")
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
        try:
            M, covered, by_layer = tracked_gramian(tracker, rows, shared, chunk_size, scale)
        except NonFiniteGradientError:
            # The pieces of M are per layer: the task is found from its own gradient.
            _raise_culprit(loss_list, reached, [f"shared parameter {name}" for name, p, _
                                                in shared if any(p is q for q in reached)])
            raise
        missing = [name for name, p, _ in shared if any(p is q for q in reached)
                   and id(p) not in covered]
        if missing:
            raise InvalidOptionError(
                f"shared parameter {missing[0]} is reached by the losses but not through a "
                "recorded call of the module that owns it; use mode='sequential'"
            )
        early = _heads_first(method, head_weights)
        if early:
            head_grads = _head_gradients(method, head_weights, None, loss_values, loss_list,
                                         heads, True)
        c, r, diagnostics = gramian_weights(method, M, [p.dtype for p in reached],
                                            losses=loss_values, combinations=A, scale=scale)
        if not early:
            head_grads = _head_gradients(method, head_weights, c, loss_values, loss_list,
                                         heads, True)
        combined = sum(float(w) * row for w, row in zip(r.tolist(), rows, strict=True))
        shared_grads = torch.autograd.grad(combined, reached, allow_unused=True,
                                           retain_graph=retain_graph)
        bad = _non_finite_index(shared_grads)
        if bad is not None:
            name = next(n for n, p, _ in shared if p is reached[bad])
            raise NonFiniteGradientError(
                f"the gradient of shared parameter {name} in the combined backward pass "
                "contains NaN or infinity, although every task's gradient is finite")
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
    bad = _non_finite_index(grads)
    if bad is not None:
        # The head pass sums the tasks; a head is normally reached by one task only.
        head = heads[bad]
        tasks = [task for task, loss in enumerate(loss_list) if _reaches(loss, {id(head)}, set())]
        raise NonFiniteGradientError(_head_message(tasks, head))
    return grads


def _heads_first(method: Method, head_weights: str) -> bool:
    """Whether the heads' gradient is known before the method runs (it needs no weights c)."""
    return head_weights != "method" and method.kind != "losses"


def _head_message(tasks: list[int], head: Tensor) -> str:
    what = f"a task-specific parameter of shape {tuple(head.shape)}"
    if len(tasks) == 1:
        return f"the gradient of loss {tasks[0]} with respect to {what} contains NaN or infinity"
    return (f"the gradient of {what}, reached by losses {tasks}, contains NaN or infinity")


def _raise_culprit(losses: Sequence[Tensor], targets: Sequence[Any], names: Sequence[str]
                   ) -> None:
    """On the error path only: name the first task whose own gradient is not finite.

    Batched passes, Gramian mode's per-layer pieces and combinations of the losses (CAGrad-Fast)
    cannot tell which task a NaN came from; one plain backward pass per task, on the graph that
    is still there, can. Returns if every task's gradient is finite on its own (the caller then
    raises its own error: e.g. another rank's gradient in a distributed step).
    """
    for task, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, list(targets), allow_unused=True, retain_graph=True)
        bad = _non_finite_index(grads)
        if bad is not None:
            raise NonFiniteGradientError(
                f"the gradient of loss {task} with respect to {names[bad]} contains NaN or "
                "infinity")


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
    """(name, tensor, layer key) for each trainable shared tensor (frozen ones are skipped);
    tensors of one module share a key."""
    items = params.named_parameters() if isinstance(params, nn.Module) else params
    named: list[tuple[str, Tensor, str]] = []
    seen: set[int] = set()
    frozen = 0
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
            # Frozen (e.g. a fine-tuned backbone's first layers): skipped, as autograd skips it.
            frozen += 1
            continue
        if not param.is_leaf:
            raise InvalidOptionError(
                f"shared parameter {name} is not a leaf tensor (pass parameters, not results "
                "computed from them; use features= for a shared representation)"
            )
        if id(param) not in seen:
            seen.add(id(param))
            named.append((name, param, layer))
    if not named and frozen:
        raise InvalidOptionError(
            f"no shared parameter requires grad: all {frozen} are frozen (requires_grad=False), "
            "so there is nothing shared to train")
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


def _non_finite_index(grads: Sequence[Tensor | None]) -> int | None:
    """The index of the first gradient holding NaN or infinity, or None (one read of each)."""
    present = [(k, g) for k, g in enumerate(grads) if g is not None]
    if not present:
        return None
    # A sum is non-finite whenever an element is (NaN and infinity propagate) and costs one
    # pass; only if one is, the exact test below rules out an overflow of the sum itself. One
    # synchronization for all the tensors.
    sums = torch.stack([g.sum() for _, g in present])
    if bool(torch.isfinite(sums).all()):
        return None
    for k, grad in present:
        if not bool(torch.isfinite(grad).all()):
            return k
    return None


_SHARED = -1


class _TaskGraph:
    """The losses' autograd graph, each node labelled with the one task that reaches it (or
    ``_SHARED``), to name the task at fault after a single backward pass of sum_i c_i L_i.

    The labels take one walk (each node is visited at most twice: when a task first reaches it
    and when a second one does). The "frontier" of task i are its own nodes with a shared input:
    the gradient they send is task i's contribution c_i dL_i/dz to the shared part. During the
    pass (``watching``), each frontier node's outgoing gradient is reduced to a sum, kept as a
    tensor and read only if the pass produced a non-finite gradient.
    """

    def __init__(self, roots: Sequence[Tensor]) -> None:
        owner: dict[Any, int] = {}
        leaf_owner: dict[int, int] = {}
        self.leaves: list[Tensor] = []
        for task, root in enumerate(roots):
            if root.grad_fn is None and root.requires_grad:
                self._add_leaf(root, task, leaf_owner)
            pending = [] if root.grad_fn is None else [(root.grad_fn, False)]
            while pending:
                node, shared = pending.pop()
                current = owner.get(node)
                if shared or (current is not None and current != task):
                    if current == _SHARED:
                        continue
                    owner[node] = _SHARED
                    shared = True
                elif current is None:
                    owner[node] = task
                else:
                    continue  # this task was here already
                pending += [(child, shared) for child, _ in node.next_functions
                            if child is not None]
        # (node, task, the indices of its inputs that are shared)
        self.frontier: list[tuple[Any, int, list[int]]] = []
        for node, task in owner.items():
            variable = getattr(node, "variable", None)
            if variable is not None:
                self._add_leaf(variable, task, leaf_owner)
            elif task != _SHARED:
                edges = [k for k, (child, _) in enumerate(node.next_functions)
                         if child is not None and owner.get(child) == _SHARED]
                if edges:
                    self.frontier.append((node, task, edges))
        self._leaf_owner = leaf_owner
        self._flows: list[tuple[int, Tensor]] = []

    def _add_leaf(self, leaf: Tensor, task: int, leaf_owner: dict[int, int]) -> None:
        if id(leaf) not in leaf_owner:
            self.leaves.append(leaf)
            leaf_owner[id(leaf)] = task
        elif leaf_owner[id(leaf)] != task:
            leaf_owner[id(leaf)] = _SHARED

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Record each frontier node's outgoing gradient (as its sum) during a backward pass."""
        def hook(task: int, edges: list[int]) -> Any:
            def record(grad_inputs: Any, grad_outputs: Any) -> None:
                for k in edges:
                    grad = grad_inputs[k]
                    if grad is not None:
                        # At least float32: a float16 sum of finite values may overflow.
                        self._flows.append((task, grad.sum(
                            dtype=torch.promote_types(grad.dtype, torch.float32))))
            return record

        handles = [node.register_hook(hook(task, edges)) for node, task, edges in self.frontier]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def error(self, leaf: Tensor, names: dict[int, str]) -> NonFiniteGradientError:
        """The error for a non-finite gradient of ``leaf`` found after the pass."""
        name = names.get(id(leaf), f"a task-specific parameter of shape {tuple(leaf.shape)}")
        tasks = sorted({task for task, flow in self._flows if not bool(torch.isfinite(flow))})
        owner = self._leaf_owner.get(id(leaf), _SHARED)
        if not tasks and owner != _SHARED:
            tasks = [owner]
        if tasks:
            return NonFiniteGradientError(
                f"the gradient of loss {tasks[0]} with respect to {name} contains NaN or "
                f"infinity (tasks at fault: {tasks})")
        return NonFiniteGradientError(
            f"the gradient of the weighted sum of the losses with respect to {name} contains "
            "NaN or infinity, although the gradient each task sends into the part they share "
            "is finite: it arises in the shared part (every task's gradient may hold it)")


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
    """The method's state, to restore if the step fails or is skipped; None if it has none.

    Jacobian methods are not copied (DB-MTL's state is as large as the gradients): every
    gradient they see is checked before they run. Tensors and arrays are cloned directly,
    several times faster than ``copy.deepcopy`` on the small states of the other methods.
    """
    if method.kind == "jacobian":
        return None
    return _copied(method.state_dict())


def _copied(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_copied(item) for item in value)
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return copy.deepcopy(value)


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
