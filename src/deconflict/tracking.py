"""Gramian-only mode: M = J J^T from per-layer pieces, without a second pass through the trunk.

``track(trunk)`` registers forward hooks on every module of the trunk that owns parameters;
each call records the nodes of its inputs, the gradient edges of its outputs (taken before any
later in-place operation can move them) and, for ``nn.Linear`` and ``nn.Embedding``, its input.
``deconflict.backward(..., mode="gramian")`` then (``tracked_gramian``):

1. gives every reached shared parameter a rule (``layer_gramians``): a Delta rule for Linear
   layers where the kernel trick is the cheaper (``choose_linear_rule``) and for embeddings,
   the Jacobian rule for every other module and for parameters the records cannot account for
   (used outside any recorded call, tied across modules, feeding their own layer's input: the
   per-module fallback, named in ``tracker.rules``);
2. runs one backward pass per row (or ``chunk_size`` rows vectorized) to what the rules ask
   for: the gradients Delta_i of row i w.r.t. the Delta layers' outputs (weight gradients
   skipped there) and the per-task gradients of the Jacobian rules' parameters;
3. adds up the rules' shares of M (float64) and, once the method has chosen the row weights r,
   writes J^T r from what the rules kept: (sum_i r_i Delta_i)^T X per Linear layer (one GEMM),
   sum_i r_i G_i for the Jacobian rules - no second backward pass through the trunk.

Under autocast a layer computes in a lower precision (bfloat16, float16): Delta_i has the
output's dtype, and the Linear rule uses the input as the layer did, cast to that dtype (exactly
autocast's rounding). Products of such values are exact in float64, so the kernel trick gives the
Gramian of the exact G_i = Delta_i^T X, whereas autograd rounds each G_i to the layer's dtype:
the two agree to that rounding, not to float64. The other rules use autograd's own gradients.

Memory: the Delta rules hold R x (their layers' outputs), the Jacobian rules R x (their
parameters) - never more than the batched mode's Jacobian, and for wide layers on small batches
far less (``docs/performance.md``, "Gramian-only mode and mode='auto'"). Where that would exceed
half an estimate of what the plain step holds anyway, the rules are swept in up to S groups
(``sweep_groups``): each group's R passes, its share of M, its data dropped; then ``.grad``
from one weighted backward pass of sum_k r_k row_k. Between two groups, where the rows'
gradients at a cut of the graph (an edge every path to the lower group crosses: ``graph_cuts``)
fit in the sweep's budget, they are kept, and the next group's passes start there instead of
passing again through the layers above. The same M; about 1/S of the memory for the update's
pass, plus one pass per row through the layers above each boundary without such a cut. S is
``max_sweeps`` (``track``): by default
``DEFAULT_MAX_SWEEPS`` when Gramian mode is asked for (mode="gramian": the lean mode) and 1
when mode="auto" chose it (the fast choice).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .errors import InvalidOptionError, ShapeError
from .finite import NonFinite
from .graph import above_cut, nodes
from .jacobian import gradients, row_chunks
from .kernels import Rows
from .layer_gramians import (
    ConvKernelRule,
    EmbeddingRule,
    JacobianRule,
    KernelRule,
    Rule,
    choose_linear_rule,
    unfoldable,
)

# The attribute of a tracked trunk that holds (a weak reference to) its tracker. The trunk's
# hooks hold the tracker itself, so it lives as long as it is registered; a weak reference
# keeps copies of the module from sharing or reviving it (copy.deepcopy copies it as is).
TRACKER_ATTRIBUTE = "_deconflict_tracker"
# Forward passes without a backward after which the tracker warns (each keeps its graph alive).
_PENDING_WARNING = 32
# The most groups mode="gramian" sweeps the rows in by default (``sweep_groups``). On the
# Transformer workload at T = 10 three bring the peak from 1.9x to 1.44x a plain step
# (docs/performance.md, "Sweeping the rows in groups of layers").
DEFAULT_MAX_SWEEPS = 4


@dataclass
class _Call:
    """One recorded forward call of a module that owns parameters.

    Only what the Gramian needs is kept: a Linear layer's input (autograd saves it anyway) or an
    Embedding's indices, the gradient edges of the inputs (the nodes that produced them, and
    candidate cuts between sweeps: ``graph_cuts``) with their sizes, the outputs' gradient
    edges and shapes - not the outputs, which autograd may have freed.
    """

    module: nn.Module
    name: str
    edges: list[GradientEdge]
    output_shapes: list[tuple[torch.Size, torch.dtype, torch.device]]
    layer_input: Tensor | None = None
    input_version: int = 0
    input_edges: list[tuple[GradientEdge, int]] = field(default_factory=list, repr=False)

    @property
    def input_nodes(self) -> list[Any]:
        """The nodes that produced the differentiable inputs."""
        return [edge.node for edge, _ in self.input_edges]


class LayerTracker:
    """Records the calls of a trunk's parameter-owning modules for Gramian-only mode.

    Create it with ``deconflict.track(trunk)`` before the forward pass. Calls made while
    gradients are disabled (``torch.no_grad()``) are not recorded; ``deconflict.backward``
    consumes the records; ``clear()`` drops them (e.g. after an evaluation forward pass run with
    gradients enabled); ``remove()`` unregisters the hooks.

    >>> import torch, deconflict
    >>> trunk = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> tracker = deconflict.track(trunk)
    >>> z = trunk(torch.randn(5, 3))
    >>> [call.name for call in tracker.calls]  # the modules that own parameters
    ['0', '2']
    >>> with torch.no_grad():
    ...     _ = trunk(torch.randn(5, 3))
    >>> len(tracker.calls)  # not recorded: no gradient will flow
    2
    >>> tracker.remove()
    """

    def __init__(self, trunk: nn.Module, max_sweeps: int | None = None) -> None:
        self.trunk = trunk
        # None: the mode's default (``sweeps_for``).
        self.max_sweeps: int | None = None if max_sweeps is None else _checked_sweeps(max_sweeps)
        self.calls: list[_Call] = []
        # After each Gramian-mode step: the rule each module got ("kernel", "embedding",
        # "jacobian", or "fallback" for parameters the records cannot account for).
        self.rules: dict[str, str] = {}
        self._handles = []
        self._forwards = 0
        self.owners: dict[int, list[str]] = {}
        for name, module in trunk.named_modules():
            # Frozen parameters too: requires_grad may change after tracking (unfreezing a
            # backbone mid-run); the Gramian skips the ones frozen at the time of the step.
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            for param in own:
                self.owners.setdefault(id(param), []).append(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        self._handles.append(trunk.register_forward_pre_hook(self._count))
        # Tracked-ness is a property of the trunk itself, read by tracker_of.
        object.__setattr__(trunk, TRACKER_ATTRIBUTE, weakref.ref(self))

    def _count(self, module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self._forwards += 1
        if self._forwards == _PENDING_WARNING:
            warnings.warn(
                f"deconflict.track: {_PENDING_WARNING} forward passes of the trunk since the last "
                "deconflict.backward; their records keep the graphs alive. Run evaluation under "
                "torch.no_grad(), or call tracker.clear().", RuntimeWarning, stacklevel=3)

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            outputs = [_differentiable_source(t) for t in _tensors(output)
                       if t.requires_grad and t.grad_fn is not None]
            if not outputs:
                return
            inputs = _tensors(args)
            # The input the Delta rules need (Linear, Conv2d: X; Embedding: the indices), kept
            # as is (autograd saves it anyway for the weight gradient).
            kept = (isinstance(module, (nn.Linear, nn.Embedding)) or unfoldable(module)) \
                and len(inputs) == 1 and len(outputs) == 1
            self.calls.append(_Call(
                module=module, name=name or type(module).__name__,
                edges=[get_gradient_edge(t) for t in outputs],
                output_shapes=[(t.shape, t.dtype, t.device) for t in outputs],
                layer_input=inputs[0] if kept else None,
                input_version=inputs[0]._version if kept else 0,
                input_edges=[(get_gradient_edge(t), t.numel()) for t in inputs
                             if t.grad_fn is not None]))
        return record

    def clear(self) -> None:
        """Drop the recorded calls."""
        self.calls = []
        self._forwards = 0

    def remove(self) -> None:
        """Unregister the hooks; the trunk is no longer tracked."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()
        if tracker_of(self.trunk) is self:
            object.__delattr__(self.trunk, TRACKER_ATTRIBUTE)


def track(trunk: nn.Module, *, max_sweeps: int | None = None) -> LayerTracker:
    """Record the trunk's layer calls so that ``backward(..., mode="gramian")`` can use them.

    Call once, before the first forward pass; pass the same module as ``shared_params``. The
    trunk is then tracked (``tracker_of(trunk)``), and ``mode="auto"`` uses Gramian-only mode
    for the methods that need only the Gramian; ``tracker.remove()`` untracks it.

    ``max_sweeps`` trades time for memory: where the per-layer data Gramian mode holds
    (R x the parameters of the layers without a kernel rule, R x the outputs of those with
    one) would exceed half an estimate of what the plain step holds, the R rows are swept in up to
    that many groups of layers, each group's data dropped once its share of M is formed, and
    ``.grad`` is written by one weighted backward pass (``sweep_groups``). The same M and
    update; about 1 / S of that memory for S sweeps, at the cost of one backward pass for the
    update and, at each boundary between groups where no cut of the graph fits the budget
    (``graph_cuts``), one more pass per row through the layers above it. An int >= 1 applies
    to every step; None
    (the default; on a tracked trunk: keep its current value) leaves it to the mode: up to
    ``DEFAULT_MAX_SWEEPS`` for mode="gramian", which bounds its memory, and 1 when mode="auto"
    picks Gramian mode as the fastest (``sweeps_for``). ``max_sweeps=1`` asks for the fastest
    Gramian mode whatever it holds.

    >>> import deconflict, torch
    >>> trunk = torch.nn.Linear(3, 4)
    >>> tracker = deconflict.track(trunk)
    >>> z = trunk(torch.randn(5, 3))
    >>> record = deconflict.backward([z[:, 0].mean(), z[:, 1].pow(2).mean()], trunk, "upgrad")
    >>> record.mode, deconflict.tracker_of(trunk) is tracker
    ('gramian', True)
    >>> tracker.remove(); deconflict.tracker_of(trunk) is None
    True
    """
    if not isinstance(trunk, nn.Module):
        raise TypeError(f"track needs the shared trunk as an nn.Module, got {type(trunk).__name__}")
    existing = tracker_of(trunk)
    if existing is not None:
        if max_sweeps is not None:
            existing.max_sweeps = _checked_sweeps(max_sweeps)
        return existing
    return LayerTracker(trunk, max_sweeps)


def sweeps_for(tracker: LayerTracker, requested_mode: str) -> int:
    """The most sweeps a step in Gramian mode may take: the tracker's ``max_sweeps`` if set,
    else ``DEFAULT_MAX_SWEEPS`` where the mode asked for was "gramian" and 1 where "auto" chose
    it (auto picks the fastest exact mode; the sweeps cost passes to save memory).

    >>> import torch
    >>> tracker = track(torch.nn.Linear(2, 2))
    >>> sweeps_for(tracker, "gramian"), sweeps_for(tracker, "auto")
    (4, 1)
    >>> tracker.remove()
    """
    if tracker.max_sweeps is not None:
        return tracker.max_sweeps
    return DEFAULT_MAX_SWEEPS if requested_mode == "gramian" else 1


def _checked_sweeps(max_sweeps: Any) -> int:
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int):
        raise InvalidOptionError(
            f"track: max_sweeps must be an int >= 1, got {type(max_sweeps).__name__} "
            f"{max_sweeps!r}")
    if max_sweeps < 1:
        raise InvalidOptionError(f"track: max_sweeps must be >= 1, got {max_sweeps}")
    return max_sweeps


def tracker_of(trunk: Any) -> LayerTracker | None:
    """The tracker of a trunk that ``track`` registered (and that was not removed), or None.

    Read from the module itself: a copy of a tracked module is not tracked.

    >>> import torch
    >>> tracker_of(torch.nn.Linear(2, 2)) is None
    True
    """
    if not isinstance(trunk, nn.Module):
        return None
    ref = trunk.__dict__.get(TRACKER_ATTRIBUTE)
    tracker = None if ref is None else ref()
    return tracker if tracker is not None and tracker.trunk is trunk else None


def _differentiable_source(output: Tensor) -> Tensor:
    """The tensor whose gradient edge stands for ``output``: its base if it is a view.

    An in-place operation on a view (e.g. ``relu_`` after a Linear layer on 3-D inputs, whose
    output is a view of a matrix product) rewrites the view's history and disconnects its old
    node; the base's node stays in the graph, and its gradient is the output's.
    """
    base = output._base if output._is_view() else None
    if base is not None and base.requires_grad and base.grad_fn is not None:
        return base
    return output


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


# ------------------------------------------------------------------------------------- Gramian
@dataclass
class TrackedGramian:
    """What ``tracked_gramian`` found: M, its per-layer shares, and the rules that hold what
    the update J^T r needs (``update``), without another backward pass."""

    M: Tensor
    by_layer: dict[str, Tensor]
    rules: list[Rule]
    reached: list[Tensor]
    # Set when the rows were swept in several groups (``sweep_groups``): the rules' data was
    # dropped after each group's share of M, and J^T r comes from one weighted backward pass.
    rows: Sequence[Tensor] | None = None

    @property
    def needs_graph(self) -> bool:
        """Whether ``update`` runs a backward pass (the graph must still be there)."""
        return self.rows is not None

    def update(self, r: Tensor, *, retain_graph: bool = False) -> list[Tensor | None]:
        """J^T r for each reached shared parameter (in ``reached``'s order).

        From the rules' data; each rule's data is released as soon as its share is formed (the
        update is the last use), so the new gradients and the rules' rows are never all held
        at once. After several sweeps: d (sum_k r_k row_k) / d params, one backward pass
        (``retain_graph`` as the step's plan says).
        """
        if self.rows is not None:
            rows, self.rows = self.rows, None
            weights = [r[k].to(dtype=row.dtype, device=row.device) for k, row in enumerate(rows)]
            return list(torch.autograd.grad(list(rows), self.reached, grad_outputs=weights,
                                            allow_unused=True, retain_graph=retain_graph))
        found: dict[int, Tensor | None] = {}
        for rule in self.rules:
            for param, grad in zip(rule.params, rule.update(r), strict=True):
                found[id(param)] = grad
            rule.release()
        self.rules = []
        return [found.get(id(p)) for p in self.reached]

    def release(self) -> None:
        for rule in self.rules:
            rule.release()
        self.rules = []


def tracked_gramian(
    tracker: LayerTracker, rows: Sequence[Tensor], shared: Sequence[tuple[str, Tensor, str]],
    reached: Sequence[Tensor], chunk_size: int | None, scale: float = 1.0,
    max_sweeps: int = 1,
) -> TrackedGramian | NonFinite:
    """M (R x R float64) of the rows' gradients w.r.t. the shared parameters, from the records.

    ``reached``: the trainable shared parameters the rows reach. One backward pass of the rows
    (``chunk_size`` at a time; None: one at a time) gives each layer's rule what it needs
    (``layer_gramians``); the rules give M, each layer's share of it (keyed by the layer of
    its parameters, as ``update.layer_gramians``) and later the update. When a layer's share is
    not finite (a NaN or infinity in some row's gradient reaches its diagonal), returns what
    was found, naming the layer (``docs/methods.md#gramian``). With loss scaling, the rows are
    ``scale`` times the losses and M is that of the losses' gradients (divided by ``scale``^2,
    exact for a power of two). ``tracker.rules`` then says which rule each module got
    ("fallback" for the parameters the records could not account for). ``max_sweeps``: the most
    groups the rows may be swept in (``sweep_groups``; the step's plan, ``sweeps_for``).
    """
    R = len(rows)
    if not tracker.calls:
        raise InvalidOptionError(
            "mode='gramian': the tracker recorded no layer call since the last backward (was the "
            "forward pass run under torch.no_grad(), or before deconflict.track?)"
        )
    rules, fallback = _rules(tracker, rows, shared, reached, R)
    tracker.rules = {rule.name: ("fallback" if rule.name in fallback else rule.kind)
                     for rule in rules}
    groups = sweep_groups(tracker, rules, reached, R, max_sweeps)
    swept = len(groups) > 1
    cuts = graph_cuts(tracker, rows, groups, sweep_budget(tracker, reached)) if swept else [None]

    by_layer: dict[str, Tensor] = {}
    M = torch.zeros(R, R, dtype=torch.float64)
    # Where each sweep starts: the previous group's cut and the rows' gradients there, or the rows.
    seeds: _Seeds | None = None
    for group, cut in zip(groups, cuts, strict=True):
        targets = [target for rule in group for target in rule.targets]
        taken, at_cut = _stacked_gradients(rows, targets, chunk_size, seeds, cut)
        seeds = None if cut is None or at_cut is None else _Seeds(cut, at_cut)
        start = 0
        for rule in group:
            rule.taken = taken[start:start + len(rule.targets)]
            start += len(rule.targets)
        del taken
        for rule in group:
            piece = rule.gramian(R)
            if swept:
                rule.release()  # the update comes from the weighted pass
            for layer, part in piece.parts.items():
                if not bool(torch.isfinite(part).all()):
                    return NonFinite(f"the gradient of a loss with respect to the parameters of "
                                     f"{piece.name} contains NaN or infinity")
                M += part
                by_layer[layer] = by_layer[layer] + part if layer in by_layer else part
    if scale != 1.0:
        M /= scale**2
        by_layer = {layer: part / scale**2 for layer, part in by_layer.items()}
    if swept:
        return TrackedGramian(M, by_layer, [], list(reached), rows=list(rows))
    return TrackedGramian(M, by_layer, rules, list(reached))


# What one sweep may hold, relative to the estimate of a plain step's memory (sweep_groups):
# half, since Gramian mode aims at no more than 1.5x the plain step's peak. With a whole
# estimate the Transformer workload took two sweeps and peaked at 1.40-1.57x in three runs;
# with half, three sweeps and 1.44x (docs/performance.md, "Sweeping the rows ...").
SWEEP_BUDGET = 0.5
# Below this many elements held in all (16 MiB of float32) one sweep: the extra passes would
# cost time for memory that does not matter.
SWEEP_MINIMUM = 1 << 22


def sweep_budget(tracker: LayerTracker, reached: Sequence[Tensor]) -> int:
    """What one sweep may hold (elements): ``SWEEP_BUDGET`` times the estimate of the plain
    step's memory, the recorded layer outputs (the activations) plus twice the parameters
    (values and gradients)."""
    estimate = (sum(math.prod(shape) for call in tracker.calls for shape, _, _ in
                    call.output_shapes) + 2 * sum(p.numel() for p in reached))
    return max(1, int(SWEEP_BUDGET * estimate))


def sweep_groups(tracker: LayerTracker, rules: list[Rule], reached: Sequence[Tensor], R: int,
                 max_sweeps: int) -> list[list[Rule]]:
    """The rules in the groups whose data one sweep of the R rows holds at a time.

    The rules hold R x (their elements per row: a Jacobian rule's parameters, a Delta rule's
    layer outputs) until M is formed. Where that exceeds what a plain step holds anyway -
    estimated as the recorded layer outputs (the activations) plus twice the parameters
    (values and gradients), times ``SWEEP_BUDGET`` - the rules are split into
    S = ceil(held / estimate) groups (at most ``max_sweeps``: ``sweeps_for``; one below
    ``SWEEP_MINIMUM`` elements), each swept by its own R backward passes and dropped once its
    share of M is formed, and J^T r comes from one weighted backward pass instead of the
    rules' data: the peak is about R x held / S. Where the rows' gradients at a cut between
    two groups fit in the budget beside their data (``graph_cuts``), the next group's passes
    start from there; elsewhere from the rows again, at the cost of one more pass per row
    through the layers above. One pass for the update. The groups are contiguous in depth
    (the layers nearest the losses first), balanced by held size, never splitting a depth.
    Any grouping gives the same M: each sweep differentiates the same rows, each rule's share
    is formed as in a single sweep.
    """
    held = [rule.held for rule in rules]
    total = R * sum(held)
    budget = sweep_budget(tracker, reached)
    count = min(max_sweeps, len(rules), -(-total // budget))
    if count <= 1 or total < SWEEP_MINIMUM:
        return [rules]
    depth = _depths(tracker)
    ordered = sorted(rules, key=depth, reverse=True)
    groups: list[list[Rule]] = [[]]
    running, share = 0, sum(held) / count
    previous: int | None = None
    for rule in ordered:
        # Rules of the same depth (one call: an attention layer and the projection it calls
        # functionally) stay together: a cut (``graph_cuts``) can only lie between calls.
        if (groups[-1] and depth(rule) != previous and running + rule.held / 2 > share * len(groups)
                and len(groups) < count):
            groups.append([])
        groups[-1].append(rule)
        running += rule.held
        previous = depth(rule)
    return groups


def _depths(tracker: LayerTracker) -> Callable[[Rule], int]:
    """A rule's depth: the index of the last recorded call of its module (or of the nearest
    recorded module above it, for a child its parent uses functionally); unrecorded: -1, the
    deepest. Only the cost depends on it, never M."""
    last: dict[str, int] = {}
    for index, call in enumerate(tracker.calls):
        last[call.name] = index

    def depth(rule: Rule) -> int:
        name = rule.name
        while True:
            if name in last:
                return last[name]
            if "." not in name:
                return -1
            name = name.rsplit(".", 1)[0]

    return depth


# The candidate cuts tried per boundary between two groups, smallest first (``graph_cuts``).
_CUT_TRIES = 8


def graph_cuts(tracker: LayerTracker, rows: Sequence[Tensor], groups: list[list[Rule]],
               budget: float) -> list[GradientEdge | None]:
    """Per group g, an edge of the graph below it that every path from the rows to group
    g + 1's targets crosses, where the rows' gradients there fit in ``budget`` (elements)
    beside the data of groups g and g + 1; None where no candidate does, and for the last group.

    With a cut after group g, group g's passes also take each row's gradient at the cut, and
    group g + 1's passes start there, from those gradients, instead of from the rows: by the
    chain rule the same gradients (``graph.above_cut``), without passing again through the
    layers above. Without one, group g + 1's passes start from the rows. A cut's gradients
    cost R x its elements while groups g and g + 1 are swept, which ``budget`` (what one sweep
    may hold: ``sweep_groups``) bounds: a cut as large as a sweep's data would undo the
    memory the sweeps are for. Candidates are the recorded layers' outputs and inputs between
    the two groups (in the order of the forward pass), smallest first, at most ``_CUT_TRIES``
    per boundary, none of them a rule's target; a cut after one that is used must lie below it
    (every path from the rows to it crosses that one), since its gradient is taken from there.
    A sequential trunk (MLP, CNN, a stack of Transformer layers) has one between any two
    layers; a skip connection across a boundary leaves none there.
    """
    R = len(rows)
    depth = _depths(tracker)
    held = [R * sum(rule.held for rule in group) for group in groups]
    taken = {(edge.node, edge.output_nr) for group in groups for rule in group
             for edge in rule.targets if isinstance(edge, GradientEdge)}
    starts = [row.grad_fn for row in rows]
    cuts: list[GradientEdge | None] = [None] * len(groups)
    above: set[Any] = set()  # the nodes above the cut group g's passes start from, if any
    for g in range(len(groups) - 1):
        room = budget - max(held[g], held[g + 1])
        lower = [target for rule in groups[g + 1] for target in rule.targets]
        below_nodes = {t.node for t in lower if isinstance(t, GradientEdge)}
        below_leaves = {id(t) for t in lower if isinstance(t, Tensor)}
        high = min(depth(rule) for rule in groups[g])
        low = max(depth(rule) for rule in groups[g + 1])
        candidates: dict[tuple[Any, int], tuple[int, GradientEdge]] = {}
        for index, call in enumerate(tracker.calls):
            found: list[tuple[GradientEdge, int]] = []
            if low <= index < high:
                found += [(edge, math.prod(shape)) for edge, (shape, _, _) in
                          zip(call.edges, call.output_shapes, strict=True)]
            if low < index <= high:
                found += call.input_edges
            for edge, size in found:
                key = (edge.node, edge.output_nr)
                if key not in taken and edge.node not in above:
                    candidates.setdefault(key, (size, edge))
        ordered = sorted(candidates.items(), key=lambda item: item[1][0])
        reached: set[Any] | None = None
        for key, (size, edge) in ordered[:_CUT_TRIES]:
            if R * size > room:
                break  # and every later candidate is larger
            reached = above_cut(starts, key, below_nodes, below_leaves)
            if reached is not None:
                cuts[g] = edge
                break
        above = reached if reached is not None else set()
    return cuts


def _rules(
    tracker: LayerTracker, rows: Sequence[Tensor], shared: Sequence[tuple[str, Tensor, str]],
    reached: Sequence[Tensor], R: int,
) -> tuple[list[Rule], set[str]]:
    """A rule for every reached shared parameter, and the names of the fallback rules.

    Linear and Embedding layers get a Delta rule when their parameters are used by their
    recorded calls only; every other reached parameter, the Jacobian rule (grouped by the
    module that owns it).
    """
    reached_ids = {id(p) for p in reached}
    layer_of = {id(p): layer for _, p, layer in shared}
    name_of = {id(p): name for name, p, _ in shared}
    tied = {pid for pid, owners in tracker.owners.items() if len(owners) > 1}
    by_module: dict[int, list[_Call]] = {}
    for call in tracker.calls:
        by_module.setdefault(id(call.module), []).append(call)

    candidates: dict[int, tuple[nn.Module, list[_Call], list[Tensor]]] = {}
    for calls in by_module.values():
        module = calls[0].module
        own: list[Tensor] = [p for p in module.parameters(recurse=False)
                             if id(p) in reached_ids]
        if not own:
            continue
        modified = [call for call in calls if call.layer_input is not None
                    and call.layer_input._version != call.input_version]
        if modified and not isinstance(module, nn.Conv2d):
            raise InvalidOptionError(
                f"the input of {modified[0].name} was modified in place after the layer used "
                "it; Gramian-only mode needs it unchanged (use mode='sequential')")
        # A convolution whose input changed since takes the Jacobian rule, as it did before its
        # kernel rule existed (autograd itself refuses the change where it needs the input).
        if (not modified and _delta_rule(module, calls, R)
                and not any(id(p) in tied for p in own)):
            candidates[id(module)] = (module, calls, own)
    # A Delta rule sees a parameter's uses by its own calls only: a parameter also used
    # elsewhere (by a head, functionally, or in its own layer's input) gets the Jacobian rule.
    # Outside every recorded call: reached from the rows or from a call's inputs without
    # entering a call's outputs (only for the record: the Jacobian rule is exact either way).
    every_call = [call for calls in by_module.values() for call in calls]
    outside = _leaf_ids([row.grad_fn for row in rows]
                        + [node for call in every_call for node in call.input_nodes],
                        {edge.node for call in every_call for edge in call.edges})
    demoted: set[int] = set()
    while True:
        stop = {edge.node for _, calls, _ in candidates.values() for call in calls
                for edge in call.edges}
        starts = [row.grad_fn for row in rows] + [
            node for _, calls, _ in candidates.values() for call in calls
            for node in call.input_nodes]
        seen = _leaf_ids(starts, stop)
        bad = [key for key, (_, _, own) in candidates.items() if any(id(p) in seen for p in own)]
        if not bad:
            break
        for key in bad:
            demoted.update(id(p) for p in candidates.pop(key)[2])

    rules: list[Rule] = []
    covered: set[int] = set()
    for module, calls, own in candidates.values():
        name = calls[0].name
        layers = [layer_of[id(p)] for p in own]
        edges = [call.edges[0] for call in calls]
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            inputs = [cast(Tensor, call.layer_input).detach().to(call.output_shapes[0][1])
                      for call in calls]
            kind = KernelRule if isinstance(module, nn.Linear) else ConvKernelRule
            rules.append(kind(name, own, layers, edges, module=module, inputs=inputs))
        else:
            indices = [cast(Tensor, call.layer_input).detach() for call in calls]
            rules.append(EmbeddingRule(name, own, layers, edges, module=cast(nn.Embedding, module),
                                       indices=indices))
        rules[-1].held = sum(math.prod(call.output_shapes[0][0]) for call in calls)
        covered.update(id(p) for p in own)
    # The rest, grouped by owning module (the first owner of a tied parameter).
    groups: dict[str, list[Tensor]] = {}
    for param in reached:
        if id(param) not in covered:
            owners = tracker.owners.get(id(param))
            owner = owners[0] if owners else name_of[id(param)]
            groups.setdefault(owner or type(tracker.trunk).__name__, []).append(param)
    fallback: set[str] = set()
    for owner, params in groups.items():
        is_fallback = any(id(p) in outside or id(p) in tied or id(p) in demoted for p in params)
        if is_fallback:
            fallback.add(owner)
        rules.append(JacobianRule(owner, params, [layer_of[id(p)] for p in params],
                                  list(params), fallback=is_fallback,
                                  held=sum(p.numel() for p in params)))
    return rules, fallback


def _delta_rule(module: nn.Module, calls: list[_Call], R: int) -> bool:
    """Whether a module's calls can use a Delta rule, and it is the cheaper one."""
    if any(call.layer_input is None for call in calls):
        return False
    if isinstance(module, nn.Embedding):
        # A frequency-scaled or sparse gradient is not the plain scatter of Delta.
        if module.scale_grad_by_freq or module.sparse:
            return False
        # The rule holds R x (positions looked up) x dim, the Jacobian rule R x (rows of the
        # table) x dim: a short vocabulary looked up at many positions takes the Jacobian rule.
        positions = sum(cast(Tensor, call.layer_input).numel() for call in calls)
        return positions <= module.num_embeddings
    if isinstance(module, nn.Conv2d):
        # A Linear layer on the patches: N L rows (L output positions per sample) of
        # C k_h k_w inputs. Batched 4-D inputs only (the rows of U follow the samples).
        if not unfoldable(module) or any(cast(Tensor, call.layer_input).dim() != 4
                                         or len(call.output_shapes[0][0]) != 4 for call in calls):
            return False
        rows = sum(math.prod(call.output_shapes[0][0]) // module.out_channels for call in calls)
        n_in = module.in_channels * math.prod(module.kernel_size)
        return choose_linear_rule(rows, n_in, module.out_channels, R,
                                  module.weight.requires_grad) == "kernel"
    if not isinstance(module, nn.Linear):
        return False
    rows = sum(cast(Tensor, call.layer_input).numel() // module.in_features for call in calls)
    return choose_linear_rule(rows, module.in_features, module.out_features, R,
                              module.weight.requires_grad) == "kernel"


def _leaf_ids(starts: list[Any], stop: set[Any]) -> set[int]:
    """The ids of the leaves reached from ``starts`` without entering ``stop``."""
    found: set[int] = set()
    for node in nodes(starts, stop):
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
    return found


def _stacked_gradients(rows: Sequence[Tensor], targets: list[Any], chunk_size: int | None,
                       seeds: _Seeds | None = None, cut: GradientEdge | None = None,
                       ) -> tuple[list[Rows | None], list[Tensor | None] | None]:
    """d rows / d targets per target, None if no row reaches it, zeros for the rows that do not;
    and, given a ``cut`` (``graph_cuts``), each row's gradient there (None where the row does
    not reach it), from where the next group's passes start.

    ``seeds``: a cut every path from the rows to the targets and to ``cut`` crosses, and the
    rows' gradients there: the passes start at it, and each row's seed is dropped once its
    pass is done, so the two cuts' gradients are held for about R rows together, not 2 R.

    Each target's gradients (a parameter's, or a layer output's Delta) are written into one
    (R, *shape) buffer as they arrive, so that a row's gradient is freed by the next pass and
    the R rows are never held twice. One buffer per target rather than R tensors from autograd:
    the copy costs little beside the pass, and the process's allocator reuses one row's block
    for the next instead of keeping R scattered ones (measured: 15-25% less peak resident
    memory on the Transformer workload, ``docs/performance.md``). The cut's gradients stay per
    row, as autograd returns them: each is dropped on its own.
    """
    R = len(rows)
    # By default one row per pass: measured faster than one batched pass on the MLP, CNN and
    # Transformer workloads (docs/performance.md; vmap has no batching rule for some backward
    # kernels, e.g. CPU flash attention, and falls back to a loop), with less transient memory.
    chunks = row_chunks(R, 1 if chunk_size is None else chunk_size)
    buffers: list[Tensor | None] = [None] * len(targets)
    filled: list[list[bool]] = [[False] * R for _ in targets]
    at_cut: list[Tensor | None] | None = None if cut is None else [None] * R
    wanted = targets if cut is None else [*targets, cut]
    for chunk in chunks:
        if seeds is None:
            grads = gradients(rows, wanted, None, chunk, retain_graph=True)
        else:
            if all(seeds.rows[i] is None for i in chunk):
                continue  # these rows do not reach the seeds' cut, nor anything below it
            grads = _gradients_from(seeds, wanted, chunk)
            for i in chunk:
                seeds.rows[i] = None
        if at_cut is not None:
            found = grads.pop()
            if found is not None:
                for k, row in enumerate(chunk):
                    at_cut[row] = found[k]
            del found
        for k, grad in enumerate(grads):
            if grad is None:
                continue
            if grad.layout != torch.strided:
                raise ShapeError(
                    "a shared parameter has a sparse gradient; deconflict needs dense gradients "
                    "(e.g. nn.Embedding(sparse=False))")
            buffer = buffers[k]
            if buffer is None:
                buffer = buffers[k] = grad.new_empty(R, *grad.shape[1:])
            buffer[chunk.start:chunk.stop] = grad
            for row in chunk:
                filled[k][row] = True
        del grads
    result: list[Rows | None] = []
    for k, buffer in enumerate(buffers):
        if buffer is not None:
            for row in range(R):
                if not filled[k][row]:
                    buffer[row].zero_()
        result.append(buffer)
    return result, at_cut


@dataclass
class _Seeds:
    """A cut of the graph (``graph_cuts``) and each row's gradient there (None: not reached)."""

    edge: GradientEdge
    rows: list[Tensor | None]


def _gradients_from(seeds: _Seeds, targets: list[Any], chunk: range) -> list[Tensor | None]:
    """d (the rows in ``chunk``) / d targets, backpropagated from their gradients at the cut:
    by the chain rule the rows' own, since every path from them to the targets crosses it. A
    row that does not reach the cut contributes zeros."""
    if len(chunk) == 1:
        grads = torch.autograd.grad([seeds.edge], targets, grad_outputs=[seeds.rows[chunk[0]]],
                                    allow_unused=True, retain_graph=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    present = next(seed for seed in (seeds.rows[i] for i in chunk) if seed is not None)
    stacked = torch.stack([present.new_zeros(present.shape) if seeds.rows[i] is None
                           else cast(Tensor, seeds.rows[i]) for i in chunk])
    return list(torch.autograd.grad([seeds.edge], targets, grad_outputs=[stacked],
                                    is_grads_batched=True, allow_unused=True, retain_graph=True))
