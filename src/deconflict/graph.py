"""Walks of the autograd graph: the one place the engine and the tracker read its structure.

An autograd graph is a DAG of nodes (``tensor.grad_fn``); a leaf tensor that requires grad is
reached through its ``AccumulateGrad`` node, whose ``variable`` is the leaf. Three questions are
asked of it, the first two answered by ``nodes`` (each node reached once, depth first, never
past a ``stop`` node):

- ``leaves``: the leaf tensors the losses reach (the parameters that get a gradient: the
  shared ones and the task heads), optionally not crossing given nodes (the features);
- ``reaches``: whether a loss depends on given leaves or nodes (a disconnected loss, a
  recurrent layer in Gramian mode), stopping at the first hit;
- ``TaskGraph``: which task owns each node, to name the task at fault after one backward pass
  of sum_i c_i L_i (``docs/methods.md#non-finite``); its one walk also finds the leaves and
  the losses that reach no shared parameter, which loss weighting would otherwise walk for.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .finite import NonFinite

Node = Any  # torch.autograd.graph.Node; its Python type is not public


# The node type of a leaf that requires grad (it holds the leaf as ``variable``). Telling it by
# type costs a pointer comparison; ``getattr(node, "variable", None)`` raises and catches an
# AttributeError inside autograd's wrapper for every other node.
def _accumulate_type() -> Any:
    known = getattr(torch._C._functions, "AccumulateGrad", None)
    if known is not None:
        return known
    # Made, whatever grad mode the import runs in.
    with torch.inference_mode(False), torch.enable_grad():
        view = torch.empty(0, requires_grad=True).view(0)
    assert view.grad_fn is not None  # a view of a leaf that requires grad
    return type(view.grad_fn.next_functions[0][0])


_ACCUMULATE = _accumulate_type()


def _variable(node: Node) -> Tensor | None:
    """The leaf of an ``AccumulateGrad`` node, None for any other node."""
    return node.variable if type(node) is _ACCUMULATE else None


def nodes(starts: Iterable[Node | None], stop: Collection[Node] = ()) -> Iterator[Node]:
    """Every node reached from ``starts`` (each once), never entering a node of ``stop``.

    >>> import torch
    >>> x = torch.ones(2, requires_grad=True)
    >>> [type(n).__name__ for n in nodes([(x * 2).sum().grad_fn])]
    ['SumBackward0', 'MulBackward0', 'AccumulateGrad']
    """
    seen: set[Node] = set()
    pending = [node for node in starts if node is not None]
    while pending:
        node = pending.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        yield node
        pending.extend(child for child, _ in node.next_functions if child is not None)


def leaves(roots: Sequence[Tensor], stop: Collection[Node] = ()) -> list[Tensor]:
    """Leaf tensors that require grad and are reached from ``roots`` without entering ``stop``.

    >>> import torch
    >>> w = torch.ones(2, requires_grad=True)
    >>> found = leaves([(w * 3).sum()])
    >>> len(found), found[0] is w
    (1, True)
    """
    found: dict[int, Tensor] = {}
    for root in roots:
        if root.grad_fn is None and root.requires_grad:
            found.setdefault(id(root), root)
    for node in nodes((root.grad_fn for root in roots), stop):
        variable = _variable(node)
        if variable is not None:
            found.setdefault(id(variable), variable)
    return list(found.values())


def reaches(
    starts: Iterable[Tensor | Node], leaf_ids: Collection[int], targets: Collection[Node] = ()
) -> bool:
    """Whether the graph below ``starts`` (tensors or nodes) holds one of the leaves (by id) or
    one of the ``targets`` nodes; stops at the first one found.

    >>> import torch
    >>> w, v = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    >>> loss = (w * 2).sum()
    >>> reaches([loss], {id(w)}), reaches([loss], {id(v)})
    (True, False)
    """
    roots: list[Node] = []
    for start in starts:
        if isinstance(start, Tensor):
            if id(start) in leaf_ids:
                return True
            roots.append(start.grad_fn)
        else:
            roots.append(start)
    for node in nodes(roots):
        if node in targets:
            return True
        variable = _variable(node)
        if variable is not None and id(variable) in leaf_ids:
            return True
    return False


def above_cut(starts: Iterable[Node | None], cut: tuple[Node, int], below_nodes: Collection[Node],
              below_leaf_ids: Collection[int]) -> set[Node] | None:
    """The nodes reached from ``starts`` without crossing the edge ``cut`` (a node and its input
    number, as in ``next_functions``), or None where such a walk reaches a node of
    ``below_nodes`` or a leaf of ``below_leaf_ids``: then some path from the starts to them
    avoids the edge, and their gradient is not the edge's gradient pulled back.

    Where it returns a set, every path from the starts to those nodes and leaves crosses the
    edge once (the graph is acyclic), so by the chain rule their gradient is that of the edge
    (``torch.autograd.grad(starts, edge)``) backpropagated from the edge alone. A node reached
    through another of its inputs is entered (conservative: the walk may refuse a valid cut,
    never accept an invalid one).

    >>> import torch
    >>> from torch.autograd.graph import get_gradient_edge
    >>> w = torch.ones(2, requires_grad=True)
    >>> h = w * 2
    >>> edge = get_gradient_edge(h)
    >>> above_cut([(h.sin() + h).sum().grad_fn], (edge.node, edge.output_nr), (), {id(w)}) is None
    False
    >>> above_cut([(h.sin() + w).sum().grad_fn], (edge.node, edge.output_nr), (), {id(w)}) is None
    True
    """
    seen: set[Node] = set()
    pending = [node for node in starts if node is not None]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        if node in below_nodes:
            return None
        if type(node) is _ACCUMULATE and id(node.variable) in below_leaf_ids:
            return None
        seen.add(node)
        for child, number in node.next_functions:
            if child is not None and (child, number) != cut:
                pending.append(child)
    return seen


_SHARED = -1
_WIDE = (torch.float32, torch.float64)


def _reaches_leaf(start: Node, leaf_ids: Collection[int],
                  children: dict[Node, list[Node | None]], known: dict[Node, bool]) -> bool:
    """Whether one of the leaves (by id) lies at or below ``start``, from the children a walk
    already read. ``known`` carries over between calls: True for a start found to reach one,
    False for every node explored to the bottom without finding one (so no node is explored
    twice in a negative answer)."""
    seen: set[Node] = set()
    pending: list[Node | None] = [start]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        state = known.get(node)
        if state is False:
            continue
        if state or (type(node) is _ACCUMULATE and id(node.variable) in leaf_ids):
            known[start] = True
            return True
        seen.add(node)
        pending += children[node]
    known.update(dict.fromkeys(seen, False))
    return False


class TaskGraph:
    """The losses' autograd graph, each node labelled with the one task that reaches it (or
    shared), to name the task at fault after a single backward pass of sum_i c_i L_i.

    One walk of the graph does what the step needs anyway, the leaves (the parameters that get
    a gradient) and, given the shared parameters' ids, which tasks reach none of them
    (``disconnected``), and labels each node on the way: each task's walk stops at the nodes
    an earlier task reached (they are shared), and a second walk, over the children already
    read, marks everything below those meeting points shared. The "frontier" of task i are its
    own nodes with a shared input: the gradient they send is task i's contribution
    c_i dL_i/dz to the shared part. During the pass (``watching``), each frontier node's
    outgoing gradient is reduced to a sum, kept as a tensor and read only if the pass produced
    a non-finite gradient.

    >>> import torch
    >>> z = torch.ones(3, requires_grad=True) * 2           # shared
    >>> heads = [torch.ones(3, requires_grad=True) for _ in range(2)]
    >>> graph = TaskGraph([(z * h).sum() for h in heads])
    >>> len(graph.leaves), len(graph.frontier)
    (3, 2)
    """

    def __init__(self, roots: Sequence[Tensor], shared: Collection[int] = ()) -> None:
        owner: dict[Node, int] = {}
        # The children of each node (None where an input needs no gradient), read once:
        # next_functions builds new tuples at every read. A leaf's node has none.
        children: dict[Node, list[Node | None]] = {}
        leaf_owner: dict[int, int] = {}
        self.leaves: list[Tensor] = []
        leaf_nodes: list[Node] = []
        reaches_shared = [False] * len(roots)
        met: list[list[Node]] = []  # per task: the nodes its walk found another task's
        meeting: list[Node] = []  # the nodes first found by a second task
        for task, root in enumerate(roots):
            if root.grad_fn is None and root.requires_grad:
                self._add_leaf(root, task, leaf_owner)
                reaches_shared[task] = id(root) in shared
            found: list[Node] = []
            pending: list[Node | None] = [root.grad_fn]
            while pending:
                node = pending.pop()
                if node is None:
                    continue
                current = owner.get(node)
                if current is None:
                    owner[node] = task
                    if type(node) is _ACCUMULATE:
                        children[node] = []
                        leaf_nodes.append(node)
                        if id(node.variable) in shared:
                            reaches_shared[task] = True
                    else:
                        below = children[node] = [child for child, _ in node.next_functions]
                        pending += below
                elif current != task:
                    found.append(node)
                    if current != _SHARED:
                        owner[node] = _SHARED
                        meeting.append(node)
            met.append(found)
        # Everything below a meeting point is shared (no call into autograd: children known).
        shared_nodes = set(meeting)
        pending = [child for node in meeting for child in children[node]]
        while pending:
            node = pending.pop()
            if node is not None and owner[node] != _SHARED:
                owner[node] = _SHARED
                shared_nodes.add(node)
                pending += children[node]
        for node in leaf_nodes:
            self._add_leaf(node.variable, owner[node], leaf_owner)
        # (node, task, the indices of its inputs that are shared); most nodes have no shared
        # input, which one set operation tells.
        self.frontier: list[tuple[Node, int, list[int]]] = [
            (node, task, [k for k, child in enumerate(children[node]) if child in shared_nodes])
            for node, task in owner.items()
            if task != _SHARED and not shared_nodes.isdisjoint(children[node])]
        # A task reaches what it labelled and what lies below the nodes it found labelled.
        known: dict[Node, bool] = {}
        self.disconnected: list[int] = [
            task for task, found in enumerate(met) if shared and not reaches_shared[task]
            and not any(_reaches_leaf(node, shared, children, known) for node in found)]
        self._leaf_owner = leaf_owner
        self._flows: list[tuple[int, Tensor]] = []

    def _add_leaf(self, leaf: Tensor, task: int, leaf_owner: dict[int, int]) -> None:
        if id(leaf) not in leaf_owner:
            self.leaves.append(leaf)
            leaf_owner[id(leaf)] = task
        elif leaf_owner[id(leaf)] != task:
            leaf_owner[id(leaf)] = _SHARED

    @contextmanager
    def watching(self, retain_graph: bool = False) -> Iterator[None]:
        """Record each frontier node's outgoing gradient (as its sum) during a backward pass.

        Afterwards the hooks are disarmed (one flag), and removed only if the graph is
        retained for another pass: otherwise they go with the graph (a node that saved no
        tensor may still run again, and then its disarmed hook returns at once).
        """
        flows = self._flows
        armed = [True]

        def hook(task: int, edges: list[int]) -> Any:
            def record(grad_inputs: Any, grad_outputs: Any) -> None:
                if not armed[0]:
                    return
                for k in edges:
                    grad = grad_inputs[k]
                    if grad is not None:
                        # At least float32: a float16 sum of finite values may overflow. (A
                        # plain sum otherwise: the dtype argument alone costs a few us a call.)
                        flows.append((task, grad.sum() if grad.dtype in _WIDE else grad.sum(
                            dtype=torch.promote_types(grad.dtype, torch.float32))))
            return record

        handles = [node.register_hook(hook(task, edges)) for node, task, edges in self.frontier]
        try:
            yield
        finally:
            armed[0] = False
            if retain_graph:
                for handle in handles:
                    handle.remove()

    def culprit(self, leaf: Tensor, names: dict[int, str]) -> NonFinite:
        """What is wrong, for a non-finite gradient of ``leaf`` found after the pass."""
        name = names.get(id(leaf), f"a task-specific parameter of shape {tuple(leaf.shape)}")
        tasks = sorted({task for task, flow in self._flows if not bool(torch.isfinite(flow))})
        owner = self._leaf_owner.get(id(leaf), _SHARED)
        if not tasks and owner != _SHARED:
            tasks = [owner]
        if tasks:
            return NonFinite(
                f"the gradient of loss {tasks[0]} with respect to {name} contains NaN or "
                f"infinity (tasks at fault: {tasks})")
        return NonFinite(
            f"the gradient of the weighted sum of the losses with respect to {name} contains "
            "NaN or infinity, although the gradient each task sends into the part they share "
            "is finite: it arises in the shared part (every task's gradient may hold it)")
