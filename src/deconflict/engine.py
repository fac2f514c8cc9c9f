"""From task losses to ``.grad``: the PyTorch side of deconflict.

``backward(losses, shared_params, method)`` replaces ``loss.backward()`` in a training loop:

1. the per-task gradients with respect to the shared parameters, by one of the modes below;
2. the method's weights c from the Gramian M = J J^T (float64, ``docs/methods.md#gramian``), or
   its own block or Jacobian rule (``update.compute_update``, ``methods.base``);
3. the update J^T c added to each shared parameter's ``.grad`` (float64 accumulation, written in
   place); every other parameter the losses reach (the task heads) gets its ordinary gradient,
   that of sum_i L_i (or another weighting, see ``head_weights``).

``backward`` is a composition: the losses and parameters are checked, the options are
validated into a frozen step plan (``plan.plan_step``: every combination that cannot run is
refused there), and inside the reducer's step (``distributed``) the plan's gradient source runs
its three phases: the gradients (per-task Jacobian, sequential or batched; feature Jacobian;
tracked Gramian; or only the losses for one weighted pass), the update (``compute_update``),
the writes into ``.grad``. A non-finite finding stops the phases: an error, or under loss
scaling a skipped step (``scaling.LossScale``).

Nothing is written until every gradient is computed and checked (``docs/methods.md#non-finite``):
a NaN or infinity in any task's gradient (shared parameters, features or heads) raises
``NonFiniteGradientError`` naming the task and the parameter, with ``.grad`` and the method's
state as they were before the call. The checks ride on passes that read the gradients anyway (a
NaN in task i reaches M_ii), or read the new gradient once (the heads', the one backward pass of
loss weighting); the task at fault is found only on the error path. Frozen parameters
(``requires_grad=False``) in the shared trunk are skipped in every mode, as autograd skips them:
their ``.grad`` stays None.

Modes (``mode=``):

- "sequential": one backward pass per task, keeping the graph; the T x d Jacobian in memory.
- "batched": the T backward passes vectorized (``is_grads_batched``), ``chunk_size`` tasks at a
  time (None: all); faster on wide layers, same memory (more with large chunks).
- "gramian": M from per-layer rules (``tracking``, ``layer_gramians``; the trunk must be
  tracked with ``deconflict.track(trunk)`` before the forward pass): one backward pass per task
  stopped at the tracked layers, and J^T c written from what the rules kept, without a second
  pass through the trunk. For methods that need only M.
- "auto" (default): "gramian" when the trunk is tracked (``deconflict.tracker_of(trunk)``) and
  the method needs only M, otherwise "sequential".
- ``features=``: representation mode (gradients w.r.t. the shared features, one trunk backward;
  ``docs/methods.md#representation-mode``), with the features' per-task gradients computed
  sequentially or batched as above.

Loss-weighting methods (sum, mean, UW, DWA, RLW, FAMO, ...; ``docs/methods.md#loss-weighting``)
cost one ordinary backward pass of sum_i c_i L_i instead of T, whatever the mode; GradNorm adds
T cheap passes down to the last shared layer.

Gradients add to ``.grad`` as autograd's do, so gradient accumulation over micro-batches works
unchanged. ``backward`` returns a ``StepRecord`` for logging.

Mixed precision: the forward pass may run under ``torch.autocast``; ``backward`` turns autocast
off for its own arithmetic (the Gramian and combination stay float64). With a GradScaler
(``scaler=``, ``scaling.LossScale``), the rows differentiated are s L_i (s = the scaler's
scale), the method sees the Gramian of the unscaled gradients, M = (s^2 M) / s^2, and ``.grad``
receives s times the update and the head gradients, as ``scaler.scale(loss).backward()`` would
leave them for ``scaler.step``. A non-finite loss or gradient then skips the step: the reached
parameters' ``.grad`` is filled with infinity, so ``scaler.step`` skips the optimizer and
``scaler.update`` lowers the scale, and the record says ``skipped``.

Data parallel (``distributed="exact"`` or ``"local"``): ``deconflict.distributed`` averages the
per-task gradients across ranks before the method runs, or the updates after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from . import graph
from .distributed import Reducer, StepSync, reducer_for
from .errors import DisconnectedLossError, InvalidOptionError, ShapeError
from .finite import NonFinite, first_non_finite
from .gramian import gramian_of_blocks
from .jacobian import task_jacobian
from .kernels import Rows
from .methods._task_parameters import ADAM, TaskParameters
from .methods.base import GramianWeighting, JacobianAggregator, LossWeighting, Method
from .methods.state import ARRAY, ARRAYS, GENERATOR, NUMBER, Codec
from .plan import MODES, HeadWeights, Mode, StepPlan, plan_step
from .record import StepRecord
from .resolve import resolve_method
from .scaling import LossScale
from .tracking import tracked_gramian, tracker_of
from .update import (
    Update,
    checked_gramians,
    compute_update,
    gramian_weights,
    non_finite_rows,
)

__all__ = ["MODES", "HeadWeights", "Mode", "StepRecord", "backward", "resolve_method"]

Shared = list[tuple[str, Tensor, str]]  # (name, trainable shared tensor, layer key)


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
    distributed: Literal["exact", "local"] | Reducer | None = None,
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
        chunk_size: tasks differentiated together in "batched" and "gramian" modes (None: all in
            "batched", one at a time in "gramian", which measured faster there).
        features: representation mode (MGDA-UB style, ``docs/methods.md#representation-mode``):
            the shared representation Z (or several). The method combines the task gradients
            with respect to Z, and the combination is backpropagated once through the trunk into
            ``shared_params``. The Gramian then sums over the batch and feature dimensions.
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
            communication), or a ``distributed.Reducer`` instance. None: this process only.
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

    >>> import torch, deconflict
    >>> torch.manual_seed(0) and None
    >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.ModuleList(torch.nn.Linear(8, 1)
    ...                                                            for _ in range(2))
    >>> z = trunk(torch.randn(16, 4))
    >>> losses = [head(z).pow(2).mean() for head in heads]
    >>> record = deconflict.backward(losses, trunk, "upgrad")
    >>> record.mode, tuple(record.gramian.shape), trunk.weight.grad.shape
    ('sequential', (2, 2), torch.Size([8, 4]))
    >>> bool((record.update_products >= 0).all())  # UPGrad's update conflicts with no task
    True
    """
    method = resolve_method(method)
    step = _Inputs.of(losses, shared_params, features)
    plan = plan_step(
        method, mode=mode, features=features is not None, tracker=tracker_of(shared_params),
        reducer=reducer_for(distributed, process_group), scale=LossScale.of(scaler),
        head_weights=head_weights, compute_gramian=compute_gramian, chunk_size=chunk_size,
        retain_graph=retain_graph)
    with _state_kept(method) as kept, plan.reducer.step(method) as sync, _consumed(plan):
        values = sync.handshake(step.values, step.losses, features, plan.scale.skips_overflow)
        sync.prepare(plan.per_task, plan.features, plan.exchanges, step.shared)
        rows = plan.scale.losses(step.losses)
        source = _SOURCES[plan.source](plan, step, rows, values, sync)
        with _autocast_disabled(rows):
            outcome = (_non_finite_losses(values) or source.gradients() or source.update()
                       or source.write())
        if isinstance(outcome, NonFinite):
            outcome = _skipped(plan, step, values, outcome, kept)
    return sync.finish(outcome)


# ------------------------------------------------------------------------------- the inputs
@dataclass(frozen=True)
class _Inputs:
    """The step's tensors, checked: the losses (scalars that require grad), their values
    (float64, CPU), the trainable shared tensors with their layer keys, and the features."""

    losses: list[Tensor]
    values: Tensor
    shared: Shared
    features: list[Tensor] | None

    @classmethod
    def of(cls, losses: Sequence[Tensor] | Tensor, shared_params: Any, features: Any) -> _Inputs:
        loss_list = _check_losses(losses)
        values = torch.stack([loss.detach().to(torch.float64) for loss in loss_list]).cpu()
        return cls(loss_list, values, _named_leaves(shared_params), _check_features(features))

    @property
    def shared_ids(self) -> set[int]:
        return {id(p) for _, p, _ in self.shared}

    def names(self) -> dict[int, str]:
        return {id(p): f"shared parameter {name}" for name, p, _ in self.shared}


def _non_finite_losses(values: Tensor) -> NonFinite | None:
    """A finding when a loss is NaN or infinite (an error without a scaler, ``NonFiniteError``:
    the loss, not a gradient, is at fault; an overflow with one)."""
    bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
    if not bad:
        return None
    return NonFinite(f"loss {bad[0]} is {values[bad[0]].item()} (non-finite losses: tasks {bad})",
                     gradient=False)


# ---------------------------------------------------------------------- the gradient sources
class _Source:
    """One step's gradient source, in three phases that ``backward`` runs in order; each
    returns a ``NonFinite`` finding to stop at (or None to go on):

    - ``gradients``: what the method needs (the per-task Jacobian of the parameters or of the
      features, the tracked Gramian, or for loss weighting nothing but the losses), checked;
    - ``update``: the method's update from it (``compute_update``, or the weights alone);
    - ``write``: the last backward pass where there is one, its check, the heads' gradient, and
      the writes into ``.grad``; returns the step's record.

    Nothing is written before ``write`` has checked every gradient it writes.
    """

    def __init__(self, plan: StepPlan, step: _Inputs, rows: list[Tensor], values: Tensor,
                 sync: StepSync) -> None:
        self.plan, self.step, self.rows, self.values, self.sync = plan, step, rows, values, sync

    def gradients(self) -> NonFinite | None:
        raise NotImplementedError

    def update(self) -> NonFinite | None:
        raise NotImplementedError

    def write(self) -> StepRecord | NonFinite:
        raise NotImplementedError


class _WeightedPass(_Source):
    """Loss weighting: one ordinary backward pass of sum_i c_i L_i.

    The gradients of that pass are checked (one read of them) before they are written; a NaN or
    infinity is named by task without a second pass and without keeping the graph (which would
    hold the activations until the caller drops the losses): ``graph.TaskGraph`` watches the
    gradient each task sends into the part of the graph the tasks share, and tells which
    parameters belong to one task only. With a scaler the L_i are already scaled, and the same
    check catches an overflow (for ``backward`` to skip the step).
    """

    layer_gramian: Tensor | None = None
    labelled: graph.TaskGraph

    def gradients(self) -> NonFinite | None:
        """Nothing but the losses, or for GradNorm the last shared layer's Gramian (cheap:
        per-task gradients through the heads only). The graph's one walk (the leaves, the
        losses that reach no shared parameter, the task labels) is taken here."""
        step = self.step
        if step.features is None:
            self.labelled = graph.TaskGraph(self.rows, step.shared_ids)
            if self.labelled.disconnected:
                raise DisconnectedLossError(f"loss {self.labelled.disconnected[0]} does not "
                                            "depend on any shared parameter")
        else:  # connected to the features, a question of nodes, not of leaves
            _check_connected(self.rows, step, combination=False)
            self.labelled = graph.TaskGraph(self.rows)
        if not self.plan.last_layer:
            return None
        last = [(name, p) for name, p, layer in step.shared if layer == step.shared[-1][2]]
        columns = [torch.autograd.grad(row, [p for _, p in last], retain_graph=True,
                                       allow_unused=True) for row in self.rows]
        blocks: list[Rows] = [
            torch.stack([torch.zeros_like(p) if g[k] is None else g[k] for g in columns])
            .reshape(len(self.rows), -1) for k, (_, p) in enumerate(last)]
        blocks, _ = self.sync.exchange(blocks, None)
        layer_gramian = gramian_of_blocks(blocks)
        if not bool(torch.isfinite(layer_gramian).all()):
            return non_finite_rows(blocks, [f"shared parameter {name}" for name, _ in last],
                                   False)
        self.layer_gramian = self.plan.scale.gramian(layer_gramian)
        return None

    def update(self) -> NonFinite | None:
        method = self.plan.method
        assert isinstance(method, LossWeighting)  # the plan's "weighted" source
        self.c, self.diagnostics = method.weights_with_diagnostics(self.layer_gramian,
                                                                   losses=self.values)
        return None

    def write(self) -> StepRecord | NonFinite:
        total = _weighted_sum(self.c.tolist(), self.rows)
        labelled = self.labelled
        with labelled.watching(self.plan.retain_graph):
            grads = torch.autograd.grad(total, labelled.leaves, allow_unused=True,
                                        retain_graph=self.plan.retain_graph)
        bad = first_non_finite(grads)
        if bad is not None:
            return labelled.culprit(labelled.leaves[bad], self.step.names())
        _accumulate(labelled.leaves, grads)
        if self.layer_gramian is not None:
            self.diagnostics["layer_gramian"] = self.layer_gramian.cpu()
        return StepRecord(weights=self.c, losses=self.values, gramian=None,
                          diagnostics=self.diagnostics, mode=self.plan.record_mode,
                          features=self.plan.features)


class _TaskJacobian(_Source):
    """Sequential and batched modes, on the parameters or (``features``) the representation:
    the Jacobian of the rows, block by block, then ``compute_update`` and the writes."""

    def gradients(self) -> NonFinite | None:
        plan, step, features = self.plan, self.step, self.step.features
        stop = set() if features is None else {f.grad_fn for f in features}
        leaves = graph.leaves(self.rows, stop)
        self.heads = [leaf for leaf in leaves if id(leaf) not in step.shared_ids]
        if features is not None:
            bypass = [name for name, p, _ in step.shared if any(leaf is p for leaf in leaves)]
            if bypass:
                raise ShapeError(
                    f"shared parameter {bypass[0]} is reached by the losses without passing "
                    "through the features: representation mode needs the features to separate "
                    "the trunk from the heads")
            targets: list[Tensor] = features
            self.names = [f"the features (input {k})" for k in range(len(features))]
            self.layers = self.names
        else:
            targets = [p for _, p, _ in step.shared]
            self.names = [f"shared parameter {name}" for name, _, _ in step.shared]
            self.layers = [layer for _, _, layer in step.shared]
        differentiated, self.A = _combined_rows(plan.method, self.rows)
        _check_connected(differentiated, step, combination=self.A is not None)
        # The graph is freed by its last use: the last row when there is nothing else to do.
        # Not by a batched pass: a NaN in one task spreads to the others there (0 * inf where a
        # task's branch gets a zero output gradient), and the graph is needed to find the task
        # at fault.
        free_graph = (features is None and not self.heads and not plan.retain_graph
                      and plan.chunk_size == 1)
        blocks, self.reached = task_jacobian(differentiated, targets, self.names,
                                             chunk_size=plan.chunk_size, free_graph=free_graph)
        detached = None if features is None else [f.detach() for f in features]
        self.blocks, self.detached = self.sync.exchange(blocks, detached)
        gramians = checked_gramians(self.blocks, self.names, scale=plan.scale,
                                    combination=self.A is not None)
        if isinstance(gramians, NonFinite):
            # Sequential rows name their task already, unless they are combinations of tasks.
            if not free_graph and (plan.chunk_size != 1 or self.A is not None):
                return _culprit(self.rows, targets, self.names) or gramians
            return gramians
        self.gramians = gramians
        # As much as possible is checked before the method runs and updates its state.
        self.head_pass = _Heads(plan, self.rows, self.values, self.heads,
                                retain=plan.retain_graph or features is not None)
        self.head_grads = self.head_pass.gradients(None) if plan.heads_first else None
        return self.head_grads if isinstance(self.head_grads, NonFinite) else None

    def update(self) -> NonFinite | None:
        update = compute_update(self.plan.method, self.blocks, self.names, self.layers,
                                losses=self.values, combinations=self.A,
                                features=self.detached, scale=self.plan.scale,
                                gramians=self.gramians)
        if isinstance(update, NonFinite):
            return update
        self.result = update
        return None

    def write(self) -> StepRecord | NonFinite:
        step, update = self.step, self.result
        head_grads = (self.head_grads if self.head_grads is not None
                      else self.head_pass.gradients(update.weights))
        if isinstance(head_grads, NonFinite):
            return head_grads
        if step.features is None:
            _accumulate(self.heads, head_grads)
            for k, (_, param, _) in enumerate(step.shared):
                if self.reached[k]:
                    existing = param.grad
                    out = (torch.empty_like(param, memory_format=torch.contiguous_format)
                           if existing is None else existing)
                    update.write(k, self.blocks[k], out, accumulate=existing is not None)
                    param.grad = out
            return _record(self.plan, self.values, update, self.A)
        # Representation mode: the combined update backpropagated once through the trunk.
        outputs = [u.view_as(f) for f, u in
                   zip(step.features, self.sync.local_part(update.materialize(self.blocks)),
                       strict=True)]
        params = [p for _, p, _ in step.shared]
        trunk_grads = torch.autograd.grad(step.features, params, outputs, allow_unused=True,
                                          retain_graph=self.plan.retain_graph)
        if all(g is None for g in trunk_grads):
            raise DisconnectedLossError("the features do not depend on any shared parameter")
        bad = first_non_finite(trunk_grads)
        if bad is not None:
            return NonFinite(
                f"the gradient of shared parameter {step.shared[bad][0]} (the combined update "
                "backpropagated through the trunk) contains NaN or infinity, although every "
                "task's gradient with respect to the features is finite: it arises in the trunk")
        _accumulate(self.heads, head_grads)
        _accumulate(params, trunk_grads)
        return _record(self.plan, self.values, update, self.A)


class _TrackedGramian(_Source):
    """Gramian-only mode: M from the tracked layers (one backward pass of the rows, stopped at
    the layers: ``tracking.tracked_gramian``), then J^T r written from what the layers' rules
    kept (``layer_gramians``), with no second backward pass through the trunk."""

    def gradients(self) -> NonFinite | None:
        plan, step, tracker = self.plan, self.step, self.plan.tracker
        assert tracker is not None  # the plan chose this source because the trunk is tracked
        leaves = graph.leaves(self.rows)
        self.heads = [leaf for leaf in leaves if id(leaf) not in step.shared_ids]
        self.reached = [p for _, p, _ in step.shared if any(leaf is p for leaf in leaves)]
        self.differentiated, self.A = _combined_rows(plan.method, self.rows)
        _check_connected(self.differentiated, step, combination=self.A is not None)
        tracked = tracked_gramian(tracker, self.differentiated, step.shared, self.reached,
                                  plan.chunk_size, plan.scale.factor, plan.max_sweeps)
        if isinstance(tracked, NonFinite):
            # The pieces of M are per layer: the task is found from its own gradient.
            names = [f"shared parameter {name}" for name, p, _ in step.shared
                     if any(p is q for q in self.reached)]
            return _culprit(self.rows, self.reached, names) or tracked
        self.tracked = tracked
        self.M, self.by_layer = tracked.M, tracked.by_layer
        # After several sweeps the update is a backward pass (``tracking.sweep_groups``): the
        # head pass keeps the graph for it.
        self.head_pass = _Heads(plan, self.rows, self.values, self.heads,
                                retain=plan.retain_graph or not plan.heads_first
                                or tracked.needs_graph)
        self.head_grads = self.head_pass.gradients(None) if plan.heads_first else None
        return self.head_grads if isinstance(self.head_grads, NonFinite) else None

    def update(self) -> NonFinite | None:
        weighed = gramian_weights(self.plan.method, self.M, [p.dtype for p in self.reached],
                                  losses=self.values, combinations=self.A, scale=self.plan.scale)
        if isinstance(weighed, NonFinite):
            return weighed
        self.c, self.r, self.diagnostics = weighed
        return None

    def write(self) -> StepRecord | NonFinite:
        head_grads = (self.head_grads if self.head_grads is not None
                      else self.head_pass.gradients(self.c))
        if isinstance(head_grads, NonFinite):
            return head_grads
        shared_grads = self.tracked.update(self.r, retain_graph=self.plan.retain_graph)
        self.tracked.release()
        bad = first_non_finite(shared_grads)
        if bad is not None:
            name = next(n for n, p, _ in self.step.shared if p is self.reached[bad])
            return NonFinite(
                f"the gradient of shared parameter {name} in the combined update contains NaN "
                "or infinity, although every task's gradient is finite")
        _accumulate(self.heads, head_grads)
        _accumulate(self.reached, shared_grads)
        M, r = self.M, self.r
        update = Update(M, self.c, self.diagnostics, layer_gramians=self.by_layer,
                        row_products=M @ r, update_sq_norm=float(r @ M @ r))
        return _record(self.plan, self.values, update, self.A)


_SOURCES: dict[str, type[_Source]] = {"weighted": _WeightedPass, "jacobian": _TaskJacobian,
                                      "features": _TaskJacobian, "tracked": _TrackedGramian}


# ------------------------------------------------------------------ shared by the sources
def _combined_rows(method: Method, losses: list[Tensor]) -> tuple[list[Tensor], np.ndarray | None]:
    """The differentiated rows: the losses, or the method's combinations A L of them."""
    A = method.gradient_combinations(len(losses)) if isinstance(method, GramianWeighting) else None
    if A is None:
        return losses, None
    return [_weighted_sum(row.tolist(), losses, skip_zeros=True) for row in A], A


def _weighted_sum(weights: Sequence[float], rows: Sequence[Tensor], *,
                  skip_zeros: bool = False) -> Tensor:
    """sum_i w_i rows_i. ``skip_zeros`` leaves out the rows of zero weight (not differentiated
    at all); by default they stay, so that 0 * NaN still reveals a NaN in their gradient."""
    terms = [float(w) * row for w, row in zip(weights, rows, strict=True)
             if not (skip_zeros and w == 0.0)]
    if not terms:
        return rows[0] * 0.0
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _check_connected(rows: Sequence[Tensor], step: _Inputs, *, combination: bool) -> None:
    """Every row reaches the shared parameters (or the features): else DisconnectedLossError."""
    features = step.features
    leaf_ids = set() if features is not None else step.shared_ids
    nodes = set() if features is None else {f.grad_fn for f in features}
    for task, row in enumerate(rows):
        if not graph.reaches([row], leaf_ids, nodes):
            what = "the features" if features is not None else "any shared parameter"
            subject = f"combined loss {task}" if combination else f"loss {task}"
            raise DisconnectedLossError(f"{subject} does not depend on {what}")


class _Heads:
    """The task-specific parameters' gradient, checked and not yet written: that of
    sum_i h_i L_i, with h from ``head_weights`` (ones, c, or the method's own choice)."""

    def __init__(self, plan: StepPlan, rows: list[Tensor], values: Tensor, heads: list[Tensor],
                 *, retain: bool) -> None:
        self.plan, self.rows, self.values, self.heads, self.retain = (plan, rows, values, heads,
                                                                      retain)

    def gradients(self, weights: Tensor | None) -> Sequence[Tensor | None] | NonFinite:
        if not self.heads:
            return []
        coefficients = self._coefficients(weights)
        if not coefficients.any():
            return [None] * len(self.heads)
        head_loss = _weighted_sum(coefficients.tolist(), self.rows, skip_zeros=True)
        grads = torch.autograd.grad(head_loss, self.heads, allow_unused=True,
                                    retain_graph=self.retain)
        bad = first_non_finite(grads)
        if bad is None:
            return grads
        # The head pass sums the tasks; a head is normally reached by one task only.
        head = self.heads[bad]
        tasks = [task for task, row in enumerate(self.rows) if graph.reaches([row], {id(head)})]
        what = f"a task-specific parameter of shape {tuple(head.shape)}"
        if len(tasks) == 1:
            return NonFinite(f"the gradient of loss {tasks[0]} with respect to {what} contains "
                             "NaN or infinity")
        return NonFinite(f"the gradient of {what}, reached by losses {tasks}, contains NaN or "
                         "infinity")

    def _coefficients(self, weights: Tensor | None) -> np.ndarray:
        if self.plan.head_weights == "unit":
            return np.ones(len(self.values))
        if self.plan.head_weights == "method":
            assert weights is not None  # the plan refuses "method" for methods without c
            return weights.numpy()
        return self.plan.method.head_coefficients(None if weights is None else weights.numpy(),
                                                  self.values.numpy())


def _culprit(losses: Sequence[Tensor], targets: Sequence[Any], names: Sequence[str]
             ) -> NonFinite | None:
    """On the error path only: the first task whose own gradient is not finite.

    Batched passes, Gramian mode's per-layer pieces and combinations of the losses (CAGrad-Fast)
    cannot tell which task a NaN came from; one plain backward pass per task, on the graph that
    is still there, can. None if every task's gradient is finite on its own (the caller then
    reports its own finding: e.g. another rank's gradient in a distributed step).
    """
    for task, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, list(targets), allow_unused=True, retain_graph=True)
        bad = first_non_finite(grads)
        if bad is not None:
            return NonFinite(f"the gradient of loss {task} with respect to {names[bad]} "
                             "contains NaN or infinity")
    return None


def _record(plan: StepPlan, values: Tensor, update: Update, A: np.ndarray | None) -> StepRecord:
    return StepRecord(
        weights=update.weights, losses=values, gramian=update.gramian,
        diagnostics=update.diagnostics, mode=plan.record_mode,
        combinations=None if A is None else torch.from_numpy(A), features=plan.features,
        layer_gramians=update.layer_gramians, update_products=update.row_products,
        update_sq_norm=update.update_sq_norm)


# ------------------------------------------------------------------------------- the writes
def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Add gradients to ``.grad``, as autograd does."""
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        # (Each a no-op for the usual gradient, and tested first: a call costs a microsecond
        # per parameter, and a model with many tasks has many small heads.)
        if grad.requires_grad:
            grad = grad.detach()
        if grad.dtype != param.dtype:
            grad = grad.to(param.dtype)
        if param.grad is not None:
            param.grad.add_(grad)
        elif grad.is_contiguous():
            param.grad = grad
        else:
            # Autograd may hand back broadcast views (stride 0): give .grad its own storage.
            param.grad = grad.clone(memory_format=torch.contiguous_format)


def _skipped(plan: StepPlan, step: _Inputs, values: Tensor, finding: NonFinite,
             kept: _KeptState) -> StepRecord:
    """The outcome of a non-finite loss or gradient: an error, or under loss scaling a skipped
    step. ``scaler.step`` skips the optimizer step, as it would after an overflowing
    ``scaler.scale(loss).backward()``, because the ``.grad`` of every parameter the losses reach
    is filled with infinity (so every optimizer holding one of them skips)."""
    if not plan.scale.skips_overflow:
        raise finding.error()
    kept.restore()
    for leaf in graph.leaves(step.losses):
        if leaf.grad is None:
            leaf.grad = torch.full_like(leaf, float("inf"), memory_format=torch.contiguous_format)
        else:
            leaf.grad.fill_(float("inf"))
    return StepRecord(weights=None, losses=values, gramian=None,
                      diagnostics={"overflow": finding.message}, mode=plan.record_mode,
                      features=plan.features, skipped=True)


# ------------------------------------------------------------------------------- the context
class _KeptState:
    """The method's state before the step, to put back if the step fails or is skipped.

    Every step of a stateful method pays for this copy, so the common kinds of state are copied
    directly, each as cheaply as it allows: numbers as they are (immutable), float64 arrays and
    histories of them as NumPy copies, a private generator as its state, and the learnable task
    weights of UW, IMTL-L, FAMO and GradNorm as clones of their tensor and Adam moments, put
    back in place. A method with any other kind of state is kept by ``state_dict()``, a
    generic snapshot that aliases nothing live (several times slower: it packs the optimizer's
    state). Stateless methods (nothing in ``STATE``) have nothing to keep. Jacobian methods are
    not copied (DB-MTL's state is as large as the gradients): every gradient they see is
    checked before they run.
    """

    def __init__(self, method: Method) -> None:
        self.method = method
        self.state: dict[str, Any] | None = None
        self.fields: list[tuple[str, Codec, Any]] | None = None
        if isinstance(method, JacobianAggregator) or not method.STATE:
            return
        if all(id(field.codec) in _DIRECT for field in method.STATE):
            self.fields = [(field.attribute, field.codec,
                            _snapshot(field.codec, getattr(method, field.attribute)))
                           for field in method.STATE]
        else:
            self.state = method.state_dict()

    def restore(self) -> None:
        if self.state is not None:
            self.method.load_state_dict(self.state)
        for attribute, codec, saved in self.fields or ():
            setattr(self.method, attribute, _put_back(codec, saved))


# The kinds of state ``_KeptState`` copies directly (``_snapshot``, ``_put_back``), by identity.
_DIRECT = {id(codec) for codec in (NUMBER, ARRAY, ARRAYS, GENERATOR, ADAM)}


def _snapshot(codec: Codec, value: Any) -> Any:
    """A copy of one state value that nothing live aliases (``_put_back`` restores it)."""
    if value is None or codec is NUMBER:
        return value
    if codec is ARRAY:
        return np.array(value, copy=True)
    if codec is ARRAYS:
        return [np.array(item, copy=True) for item in value]
    if codec is GENERATOR:
        return value, value.get_state()
    assert codec is ADAM and isinstance(value, TaskParameters)
    moments = value.optimizer.state.get(value.tensor, {})
    return value, value.tensor.detach().clone(), _cloned_entries(moments)


def _put_back(codec: Codec, saved: Any) -> Any:
    """The value to set for a ``_snapshot``; copies again, so that the snapshot stays intact
    (the live value is changed in place: the generator, the task weights' tensor)."""
    if saved is None or codec is NUMBER:
        return saved
    if codec is ARRAY:
        return saved.copy()
    if codec is ARRAYS:
        return [item.copy() for item in saved]
    if codec is GENERATOR:
        generator, generator_state = saved
        generator.set_state(generator_state)
        return generator
    parameters, values, moments = saved
    with torch.no_grad():
        parameters.tensor.copy_(values)
    if moments:
        parameters.optimizer.state[parameters.tensor] = _cloned_entries(moments)
    else:  # no Adam step had been taken: none is recorded
        parameters.optimizer.state.pop(parameters.tensor, None)
    return parameters


def _cloned_entries(entries: dict[str, Any]) -> dict[str, Any]:
    return {key: value.clone() if isinstance(value, Tensor) else value
            for key, value in entries.items()}


@contextmanager
def _state_kept(method: Method) -> Iterator[_KeptState]:
    """Every check comes before ``.grad`` changes, but some come after the method ran (the one
    backward pass of loss weighting needs its weights first): a failed step puts the state
    back."""
    kept = _KeptState(method)
    try:
        yield kept
    except BaseException:
        kept.restore()
        raise


@contextmanager
def _consumed(plan: StepPlan) -> Iterator[None]:
    """A tracked trunk's records are consumed by the step, whatever its mode or outcome."""
    try:
        yield
    finally:
        if plan.tracker is not None:
            plan.tracker.clear()


def _autocast_disabled(losses: Sequence[Tensor]) -> ExitStack:
    """Autocast off while the engine works: it would recast the float32 products of Jacobian
    methods and diagnostics to bfloat16/float16. Backward passes do not depend on it (they
    replay the dtypes the forward pass chose)."""
    stack = ExitStack()
    for device in sorted({"cpu", *(loss.device.type for loss in losses)}):
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


# ---------------------------------------------------------------------------------- checks
def _check_losses(losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(losses, Tensor):
        if losses.ndim != 1:
            raise ShapeError(
                f"losses given as one tensor must be 1-D (one value per task), got shape "
                f"{tuple(losses.shape)}")
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
                "it, e.g. with .mean())")
        if not loss.requires_grad:
            raise DisconnectedLossError(
                f"loss {task} does not require grad: it is not connected to any parameter")
    return [loss.reshape(()) for loss in loss_list]


def _named_leaves(
    params: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
) -> Shared:
    """(name, tensor, layer key) for each trainable shared tensor (frozen ones are skipped);
    tensors of one module share a key."""
    items = params.named_parameters() if isinstance(params, nn.Module) else params
    named: Shared = []
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
                "computed from them; use features= for a shared representation)")
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
                "(with a grad_fn)")
    return feature_list
