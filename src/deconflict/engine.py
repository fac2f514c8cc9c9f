"""From task losses to ``.grad``: the PyTorch side of deconflict.

``backward(losses, shared_params, method)`` replaces ``loss.backward()`` in a training loop:

1. differentiate each task loss with respect to the shared parameters (or, in representation
   mode, the shared features), giving the Jacobian J in blocks, one per tensor;
2. turn the blocks into the update with ``update.compute_update`` (Gramian M = J J^T in
   float64, the method's weights c, J^T c accumulated in float64 - or the method's own block or
   Jacobian rule, see ``methods.base``);
3. add the update to each shared parameter's ``.grad`` - in representation mode, backpropagate
   it once through the trunk instead;
4. give every other parameter the losses reach (the task heads) its ordinary gradient, that of
   sum_i L_i (or another weighting, see ``head_weights``).
Nothing is written until every gradient is computed and checked.

Loss-weighting methods (sum, mean, UW, DWA, RLW, FAMO, ...) cost one ordinary backward pass of
sum_i c_i L_i instead of T; GradNorm adds T cheap passes down to the last shared layer.

Gradients add to ``.grad`` as autograd's do, so gradient accumulation over micro-batches works
unchanged. ``backward`` returns a ``StepRecord`` for logging.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .errors import DisconnectedLossError, InvalidOptionError, NonFiniteError, ShapeError
from .gramian import gramian_of_blocks
from .methods.base import Method
from .methods.registry import method_class
from .update import compute_update, raise_non_finite

HeadWeights = Literal["auto", "unit", "method"]


@dataclass(frozen=True)
class StepRecord:
    """What one call to ``backward`` did, for logging (all tensors float64, on the CPU).

    - ``weights``: c (T,) when the shared update is J^T c (None for block and Jacobian methods,
      whose weights are in the diagnostics or do not exist);
    - ``losses``: the T loss values;
    - ``gramian``: M = J J^T, or None when the method needed no per-task gradients. With
      ``combinations`` (CAGrad-Fast), the Gramian of the combined losses A L instead;
    - ``diagnostics``: the method's own (see its docstring);
    - ``mode``: "losses" (one weighted backward), "parameters" or "features".
    """

    weights: Tensor | None
    losses: Tensor
    gramian: Tensor | None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    mode: str = "parameters"
    combinations: Tensor | None = None

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
    features: Tensor | Sequence[Tensor] | None = None,
    head_weights: HeadWeights = "auto",
    compute_gramian: bool | None = None,
    retain_graph: bool = False,
) -> StepRecord:
    """Write the method's update into ``.grad``; use it in place of ``loss.backward()``.

    Args:
        losses: the T task losses (scalars), as a sequence or a 1-D tensor.
        shared_params: the parameters all tasks share (a module, tensors, or named tensors).
            They receive J^T c; every other parameter the losses reach gets its ordinary
            gradient.
        method: a Method instance, or the name of a stateless one.
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

    Returns:
        A StepRecord (weights, losses, Gramian, diagnostics).

    Raises:
        NonFiniteError: a loss or a gradient is NaN or infinite.
        DisconnectedLossError: a loss does not depend on the shared parameters (or features).
        ShapeError: a loss is not a scalar, no loss was given, ...
        InvalidOptionError, UnknownMethodError: bad options or method name.
    """
    method = resolve_method(method)
    if head_weights not in ("auto", "unit", "method"):
        raise InvalidOptionError(
            f"head_weights must be 'auto', 'unit' or 'method', got {head_weights!r}"
        )
    loss_list = _check_losses(losses)
    loss_values = torch.stack([loss.detach().to(torch.float64) for loss in loss_list]).cpu()
    bad = torch.nonzero(~torch.isfinite(loss_values)).flatten().tolist()
    if bad:
        raise NonFiniteError(
            f"loss {bad[0]} is {loss_values[bad[0]].item()} (non-finite losses: tasks {bad})"
        )
    shared = _named_leaves(shared_params)
    feature_list = _check_features(features)
    if method.needs_features and feature_list is None:
        raise InvalidOptionError(
            f"{method.name} works on the shared representation: pass features=<the trunk's output>"
        )
    loss_weighting = method.kind == "losses"
    if compute_gramian is False and not loss_weighting:
        raise InvalidOptionError(f"{method.name} needs the per-task gradients")
    per_task = not loss_weighting or method.gradient_scope == "shared" or bool(compute_gramian)
    if not per_task:
        if head_weights == "unit":
            raise InvalidOptionError(
                f"{method.name} does one weighted backward pass, so every parameter gets the "
                "weighted gradient; pass compute_gramian=True for head_weights='unit'"
            )
        return _weighted_loss_backward(method, loss_list, loss_values, shared, feature_list,
                                       retain_graph)
    return _gradient_backward(method, loss_list, loss_values, shared, feature_list,
                              head_weights, retain_graph)


# ------------------------------------------------------------------------------------ paths
def _weighted_loss_backward(
    method: Method, loss_list: list[Tensor], loss_values: Tensor,
    shared: list[tuple[str, Tensor]], features: list[Tensor] | None, retain_graph: bool,
) -> StepRecord:
    """Loss-weighting methods: one ordinary backward pass of sum_i c_i L_i."""
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
        layer_gramian = gramian_of_blocks(blocks)
        if not bool(torch.isfinite(layer_gramian).all()):
            raise_non_finite(blocks, [f"shared parameter {name}" for name, _ in last], False)
    c, diagnostics = method.weights_with_diagnostics(layer_gramian, losses=loss_values)
    total = sum(float(w) * loss for w, loss in zip(c.tolist(), loss_list, strict=True))
    torch.autograd.backward(total, retain_graph=retain_graph)
    if layer_gramian is not None:
        diagnostics["layer_gramian"] = layer_gramian.cpu()
    return StepRecord(weights=c, losses=loss_values, gramian=None, diagnostics=diagnostics,
                      mode="losses")


def _gradient_backward(
    method: Method, loss_list: list[Tensor], loss_values: Tensor,
    shared: list[tuple[str, Tensor, str]], features: list[Tensor] | None,
    head_weights: str, retain_graph: bool,
) -> StepRecord:
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

    A = method.gradient_combinations(len(loss_list))
    if A is None:
        rows = loss_list
    else:
        rows = [sum(float(a) * loss for a, loss in zip(row, loss_list, strict=True) if a != 0.0)
                for row in A]

    # The graph is freed by its last use: the last row when there is nothing else to do.
    rows_free_graph = features is None and not heads and not retain_graph
    per_row: list[tuple[Tensor | None, ...]] = []
    for k, row in enumerate(rows):
        last = k == len(rows) - 1
        grads = torch.autograd.grad(row, targets, allow_unused=True,
                                    retain_graph=not (last and rows_free_graph))
        if all(g is None for g in grads):
            raise _disconnected(k, features is not None, combination=A is not None)
        per_row.append(grads)
    # Like autograd, a tensor no loss reaches keeps .grad as it was (optimizers skip None).
    target_reached = [any(grads[index] is not None for grads in per_row)
                      for index in range(len(targets))]
    blocks = []
    for index, target in enumerate(targets):
        column = []
        for grads in per_row:
            g = grads[index]
            if g is not None and g.layout != torch.strided:
                raise ShapeError(
                    f"{target_names[index]} has a sparse gradient; deconflict needs dense "
                    "gradients (e.g. nn.Embedding(sparse=False))"
                )
            column.append(torch.zeros_like(target) if g is None else g)
        blocks.append(torch.stack(column).reshape(len(per_row), -1))
    del per_row

    update = compute_update(
        method, blocks, target_names, layers, losses=loss_values, combinations=A,
        features=None if features is None else [f.detach() for f in features],
    )
    c = update.weights

    # Everything is computed and checked before any .grad changes: no half-applied step.
    writes: list[tuple[str, list[Tensor], Sequence[Tensor | None], bool]] = []
    if heads:
        coefficients = _head_coefficients(method, head_weights, c, loss_values)
        head_loss = sum(float(w) * loss for w, loss in zip(coefficients, loss_list, strict=True)
                        if w != 0.0)
        if isinstance(head_loss, Tensor):
            head_grads = torch.autograd.grad(head_loss, heads, allow_unused=True,
                                             retain_graph=retain_graph or features is not None)
            writes.append(("a task-specific parameter", heads, head_grads, False))

    if features is None:
        hit = [(p, u.view_as(p)) for (_, p, _), u, r in zip(shared, update.blocks,
                                                             target_reached, strict=True) if r]
        writes.append(("a shared parameter", [p for p, _ in hit], [u for _, u in hit], True))
    else:
        outputs = [u.view_as(f) for f, u in zip(features, update.blocks, strict=True)]
        params = [p for _, p, _ in shared]
        trunk_grads = torch.autograd.grad(features, params, outputs, allow_unused=True,
                                          retain_graph=retain_graph)
        if all(g is None for g in trunk_grads):
            raise DisconnectedLossError("the features do not depend on any shared parameter")
        writes.append(("a shared parameter", params, trunk_grads, False))

    for what, params, grads, _ in writes:
        _check_finite(params, grads, what)
    for _, params, grads, fresh in writes:
        _accumulate(params, grads, fresh=fresh)

    return StepRecord(
        weights=c, losses=loss_values, gramian=update.gramian, diagnostics=update.diagnostics,
        mode="features" if features is not None else "parameters",
        combinations=None if A is None else torch.from_numpy(A),
    )


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
    finite = torch.stack([torch.isfinite(g).all() for _, g in present])
    if not bool(finite.all()):
        index = int(torch.nonzero(~finite)[0])
        raise NonFiniteError(f"the gradient of {what} of shape {tuple(present[index][0].shape)} "
                             "contains NaN or infinity")


def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor | None], *, fresh: bool) -> None:
    """Add gradients to ``.grad``, as autograd does. ``fresh``: the tensors are ours to keep."""
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        grad = grad.detach().to(param.dtype)
        if param.grad is not None:
            param.grad.add_(grad)
        elif fresh or grad.is_contiguous():
            param.grad = grad
        else:
            # Autograd may hand back broadcast views (stride 0): give .grad its own storage.
            param.grad = grad.clone(memory_format=torch.contiguous_format)
