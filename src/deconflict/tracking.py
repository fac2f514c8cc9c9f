"""Gramian-only mode: M = J J^T from per-layer pieces, without ever holding the T x d Jacobian.

``track(trunk)`` registers forward hooks on every module of the trunk that owns parameters;
each call records its inputs and the gradient edges of its outputs (taken before any later
in-place operation can move them). ``deconflict.backward(..., mode="gramian")`` then:

1. computes, for every task i, the gradients Delta_i of L_i w.r.t. the recorded outputs
   (backward passes that skip every weight gradient);
2. builds each layer's share of the Gramian from its inputs and the Delta_i:

   - ``nn.Linear`` (y = x W^T + b, inputs X: N x n_in, Delta_i: N x n_out): the weight gradient
     is G_i = Delta_i^T X, so <G_i, G_j> = <Delta_i, K Delta_j> with K = X X^T (the kernel
     trick; N^2 (n_in + T n_out) operations instead of T N n_in n_out), or, when N is large,
     the G_i themselves a few output rows at a time; the bias gradient is sum_n Delta_i[n];
   - any other module: its parameters' per-task gradients through the module alone (a local
     backward from its outputs with Delta_i), T x (that module's parameters) at a time;

   everything accumulated in float64;
3. leaves the combination to one ordinary backward pass of sum_i c_i L_i.

Under autocast a layer computes in a lower precision (bfloat16, float16): Delta_i has the
output's dtype, and the Linear rule uses the input as the layer did, cast to that dtype (exactly
autocast's rounding). Products of such values are exact in float64, so the kernel trick gives the
Gramian of the exact G_i = Delta_i^T X, whereas autograd rounds each G_i to the layer's dtype:
the two agree to that rounding, not to float64. The other rules use autograd's own gradients.

Memory: the Delta_i (T x the trunk's activations) and one layer's pieces, never T x d.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from . import kernels
from .errors import InvalidOptionError
from .finite import NonFinite
from .graph import reaches
from .jacobian import gradients, row_chunks

# The attribute of a tracked trunk that holds (a weak reference to) its tracker. The trunk's
# hooks hold the tracker itself, so it lives as long as it is registered; a weak reference
# keeps copies of the module from sharing or reviving it (copy.deepcopy copies it as is).
TRACKER_ATTRIBUTE = "_deconflict_tracker"
# Forward passes without a backward after which the tracker warns (each keeps its graph alive).
_PENDING_WARNING = 32
# Largest kernel matrix K (N x N float64) the Linear rule builds, in elements.
_KERNEL_ELEMENTS = 1 << 24
# Elements of the float64 pieces (or per-task weight gradients) formed at a time: cache-sized.
_CHUNK_ELEMENTS = 1 << 17


@dataclass
class _Call:
    """One recorded forward call of a module that owns parameters.

    Only what the Gramian needs is kept: a Linear layer's input (autograd saves it anyway), the
    nodes that produced the other inputs, the outputs' gradient edges and shapes - not the
    outputs, which autograd may have freed.
    """

    module: nn.Module
    name: str
    edges: list[GradientEdge]
    output_shapes: list[tuple[torch.Size, torch.dtype, torch.device]]
    linear_input: Tensor | None = None
    input_version: int = 0
    input_nodes: list[Any] = field(default_factory=list, repr=False)


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

    def __init__(self, trunk: nn.Module) -> None:
        self.trunk = trunk
        self.calls: list[_Call] = []
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
            linear = isinstance(module, nn.Linear) and len(inputs) == 1
            self.calls.append(_Call(
                module=module, name=name or type(module).__name__,
                edges=[get_gradient_edge(t) for t in outputs],
                output_shapes=[(t.shape, t.dtype, t.device) for t in outputs],
                linear_input=inputs[0] if linear else None,
                input_version=inputs[0]._version if linear else 0,
                input_nodes=[t.grad_fn for t in inputs if t.grad_fn is not None]))
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


def track(trunk: nn.Module) -> LayerTracker:
    """Record the trunk's layer calls so that ``backward(..., mode="gramian")`` can use them.

    Call once, before the first forward pass; pass the same module as ``shared_params``. The
    trunk is then tracked (``tracker_of(trunk)``), and ``mode="auto"`` uses Gramian-only mode
    for the methods that need only the Gramian; ``tracker.remove()`` untracks it.

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
        return existing
    return LayerTracker(trunk)


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
def tracked_gramian(
    tracker: LayerTracker, rows: Sequence[Tensor], shared: Sequence[tuple[str, Tensor, str]],
    chunk_size: int | None, scale: float = 1.0,
) -> tuple[Tensor, set[int], dict[str, Tensor]] | NonFinite:
    """M (R x R float64) of the rows' gradients w.r.t. the shared parameters, from the records.

    Returns M, the ids of the shared parameters some row reaches, and each layer's share of M
    (keyed by the layer of its parameters, as ``update.layer_gramians``); or, when a layer's
    share is not finite (a NaN or infinity in some row's gradient reaches its diagonal), what
    was found, naming the layer (``docs/methods.md#gramian``). With loss scaling, the rows are
    ``scale`` times the losses and M is that of the losses' gradients (divided by ``scale``^2,
    exact for a power of two).
    """
    R = len(rows)
    if not tracker.calls:
        raise InvalidOptionError(
            "mode='gramian': the tracker recorded no layer call since the last backward (was the "
            "forward pass run under torch.no_grad(), or before deconflict.track?)"
        )
    shared_ids = {id(p) for _, p, _ in shared}
    # Calls of frozen modules need no Delta: they hold nothing to train.
    calls = [call for call in tracker.calls
             if any(id(p) in shared_ids for p in call.module.parameters(recurse=False))]
    for call in calls:
        if call.linear_input is not None and call.linear_input._version != call.input_version:
            raise InvalidOptionError(
                f"the input of {call.name} was modified in place after the layer used it; "
                "Gramian-only mode needs it unchanged (use mode='sequential')"
            )
    edges = [edge for call in calls for edge in call.edges]
    shapes = [shape for call in calls for shape in call.output_shapes]
    chunks = row_chunks(R, chunk_size)
    deltas: list[Tensor | None] = [None] * len(edges)
    for chunk in chunks:
        grads = gradients(rows, edges, None, chunk, retain_graph=True)
        for e, grad in enumerate(grads):
            if grad is None:
                continue
            if len(chunks) == 1:
                deltas[e] = grad  # (R, *shape): no copy
                continue
            stacked = deltas[e]
            if stacked is None:
                stacked = deltas[e] = grad.new_zeros(R, *grad.shape[1:])
            stacked[chunk.start:chunk.stop] = grad
        del grads
    # Per call: the stacked Delta of each output (R, *shape), or None if no row reaches it.
    call_deltas: list[list[Tensor] | None] = []
    e = 0
    for call in calls:
        outputs = deltas[e:e + len(call.edges)]
        output_shapes = shapes[e:e + len(call.edges)]
        e += len(call.edges)
        if all(d is None for d in outputs):
            call_deltas.append(None)
            continue
        call_deltas.append([
            torch.zeros(R, *shape, dtype=dtype, device=device) if d is None else d
            for d, (shape, dtype, device) in zip(outputs, output_shapes, strict=True)])
    del deltas

    names = {id(p): name for name, p, _ in shared}
    layer_of = {id(p): layer for _, p, layer in shared}
    by_layer: dict[str, Tensor] = {}
    M = torch.zeros(R, R, dtype=torch.float64)
    reached: set[int] = set()
    by_module: dict[int, list[int]] = {}
    for index, call in enumerate(calls):
        if call_deltas[index] is not None:
            by_module.setdefault(id(call.module), []).append(index)
    tied = {pid for pid, owners in tracker.owners.items() if len(owners) > 1}
    # Per-task gradients of parameters that need summing across modules (tied weights).
    pending: dict[int, Tensor] = {}
    for indices in by_module.values():
        module = calls[indices[0]].module
        own: list[Tensor] = [p for _, p in module.named_parameters(recurse=False)
                             if p.requires_grad and id(p) in shared_ids]
        if not own:
            continue
        # by_module holds the calls some row reaches: their Deltas are not None.
        module_deltas = cast(list[list[Tensor]], [call_deltas[i] for i in indices])
        linear = all(calls[i].linear_input is not None for i in indices)
        if linear and not any(id(p) in tied for p in own):
            part = _linear_gramian(cast(nn.Linear, module), [calls[i] for i in indices],
                                   [d[0] for d in module_deltas], R)
        else:
            part = _generic_gramian(module, [calls[i] for i in indices], module_deltas, own,
                                    tied, pending, chunk_size, R)
        if not bool(torch.isfinite(part).all()):
            return NonFinite(
                f"the gradient of a loss with respect to the parameters of {calls[indices[0]].name}"
                " contains NaN or infinity")
        M += part
        _add_layer(by_layer, layer_of[id(own[0])], part)
        reached.update(id(p) for p in own)
    for pid, block in pending.items():
        part = torch.zeros(R, R, dtype=torch.float64)
        kernels.gramian_into(block, part)
        if not bool(torch.isfinite(part).all()):
            return NonFinite(f"the gradient of a loss with respect to shared "
                             f"parameter {names[pid]} contains NaN or infinity")
        M += part
        _add_layer(by_layer, layer_of[pid], part)
    if scale != 1.0:
        M /= scale**2
        by_layer = {layer: part / scale**2 for layer, part in by_layer.items()}
    return M, reached, by_layer


def _add_layer(by_layer: dict[str, Tensor], layer: str, part: Tensor) -> None:
    by_layer[layer] = by_layer[layer] + part if layer in by_layer else part.clone()


def _linear_gramian(
    module: nn.Linear, calls: list[_Call], deltas: list[Tensor], R: int
) -> Tensor:
    """<grad_i, grad_j> over the weight and bias of a Linear layer, from inputs and Delta."""
    n_in, n_out = module.in_features, module.out_features
    # The input as the layer multiplied it: cast to its output's dtype under autocast.
    X = _rows_of([cast(Tensor, call.linear_input).detach().reshape(-1, n_in)
                  .to(call.output_shapes[0][1]) for call in calls], dim=0)
    D = _rows_of([d.detach().reshape(R, -1, n_out) for d in deltas], dim=1)  # R x N x n_out
    N = X.shape[0]
    M = torch.zeros(R, R, dtype=torch.float64)
    if module.bias is not None and module.bias.requires_grad:
        # The bias gradient sum_n Delta_i[n], summed in the gradients' precision as autograd does.
        kernels.gramian_into(D.sum(dim=1), M)
    if not module.weight.requires_grad:
        return M
    # Operation counts of the two rules (float64 products count double).
    kernel_cost = 2 * (N * N * n_in / 2 + R * N * N * n_out)
    direct_cost = R * N * n_in * n_out
    if kernel_cost < direct_cost and N * N <= _KERNEL_ELEMENTS:
        K = torch.zeros(N, N, dtype=torch.float64)
        kernels.gramian_into(X, K)
        # Output columns a few at a time: float64 copies that stay small.
        step = max(8, _CHUNK_ELEMENTS // (R * N))
        for start in range(0, n_out, step):
            part = D[:, :, start:start + step].to(torch.float64)  # R x N x k
            mixed = torch.matmul(K, part)  # K Delta_j
            kernels.cross_into(part.reshape(R, -1), mixed.reshape(R, -1), M)
        return (M + M.T) / 2
    step = max(1, _CHUNK_ELEMENTS // (R * n_in))
    for start in range(0, n_out, step):
        grads = torch.matmul(D[:, :, start:start + step].transpose(1, 2), X)  # R x k x n_in
        kernels.gramian_into(grads.reshape(R, -1), M)
    return M


def _rows_of(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _generic_gramian(
    module: nn.Module, calls: list[_Call], deltas: list[list[Tensor]], own: list[Tensor],
    tied: set[int], pending: dict[int, Tensor], chunk_size: int | None, R: int,
) -> Tensor:
    """<grad_i, grad_j> over a module's own parameters, by local backward passes."""
    if len(calls) > 1 or any(id(p) in tied for p in own):
        _check_not_recurrent(calls, own)
    blocks: list[Tensor | None] = [None] * len(own)
    for call, call_deltas in zip(calls, deltas, strict=True):
        for chunk in row_chunks(R, chunk_size):
            grad_outputs = [d[chunk.start:chunk.stop] for d in call_deltas]
            grads: list[Tensor | None]
            if len(chunk) == 1:
                single = torch.autograd.grad(call.edges, own, grad_outputs=[g[0] for g in
                                                                            grad_outputs],
                                             allow_unused=True, retain_graph=True)
                grads = [None if g is None else g.unsqueeze(0) for g in single]
            else:
                grads = list(torch.autograd.grad(call.edges, own, grad_outputs=grad_outputs,
                                                 is_grads_batched=True, allow_unused=True,
                                                 retain_graph=True))
            for k, grad in enumerate(grads):
                if grad is None:
                    continue
                block = blocks[k]
                if block is None:
                    block = blocks[k] = grad.new_zeros(R, own[k].numel())
                block[chunk.start:chunk.stop] += grad.reshape(len(chunk), -1)
    M = torch.zeros(R, R, dtype=torch.float64)
    for param, block in zip(own, blocks, strict=True):
        if block is None:
            continue
        if id(param) in tied:
            if id(param) in pending:
                pending[id(param)] += block
            else:
                pending[id(param)] = block
            continue
        kernels.gramian_into(block, M)
    return M


def _check_not_recurrent(calls: list[_Call], own: list[Tensor]) -> None:
    """A call whose input depends on the same parameters would be differentiated twice."""
    own_ids = {id(p) for p in own}
    for call in calls:
        if reaches(call.input_nodes, own_ids):
            raise InvalidOptionError(
                f"{call.name} is applied to a result of its own parameters (a recurrence or "
                "a tied weight); Gramian-only mode cannot separate the uses: use "
                "mode='sequential' or 'batched'"
            )
