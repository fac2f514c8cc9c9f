"""Recon's surgery: turn chosen shared layers of a trunk into one copy per task.

Recon (Shi et al., ICLR 2023, "Reducing Conflicting Gradients from the Root";
docs/methods.md#recon) scores the shared layers by how much the task gradients conflict on them,
replaces the K highest-scoring layers by T copies, one per task, and retrains.
``branch(trunk, layer_names, T)`` does the replacement:

- the forward pass splits into T streams at the first branched layer. In stream t each branched
  layer is its t-th copy; a later layer that is not branched stays shared and processes every
  stream with the same weights. So a copy is reached by one task's loss only;
- whatever does not depend on a branched layer (the prefix, a skip connection taken before the
  split) is computed once;
- the copies start from the original weights, so every stream computes the original function
  until ``reset_branches()`` re-initializes them.

A name may be a container ("features"): every layer called inside it that owns parameters or
buffers is branched. Buffers count because a BatchNorm's running statistics describe one
stream's features.

Trunks that compute every task's features themselves (mixtures of experts with per-task gates,
PLE, cross-stitch towers, MTAN's attention) subclass :class:`TaskTrunk`: their forward returns
one entry per task, in task order, and ``task_specific`` names the submodules inside them that
only one task's loss reaches (a task's own gate). Branching such a trunk keeps its output
structure: entry t is computed in stream t, and each stream computes only what its own entry
needs (what only the other entries need is dropped from stream t), so a task's own path, e.g.
its attention masks, runs once rather than once per stream. Task-specific submodules are
never branched and never among ``shared_parameters()``. "The shared layers" of a model are then
known without a single shared output tensor: those of the trunk that are not task-specific.

How: the tracer of ``torch.fx.symbolic_trace`` (told to call the named layers whole) turns a deep
copy of the trunk (the input module is left alone), nn.Sequential or custom forward alike, into a
graph of module calls, functions and tensor methods; the rewritten graph emits every node that
depends on a branched call once per task.

fx can trace nn.Sequential and any forward made of submodule calls, torch functions, tensor
methods and operators, with tuple, list or dict inputs and outputs, and Python control flow that
does not look at tensor values (loops over submodules, branches on constructor options). Modules
of torch.nn (Linear, Conv2d, LSTM, MultiheadAttention...) are called as wholes, so their own code
does not matter. fx cannot trace control flow on tensor values or shapes (``if x.sum() > 0``),
``len()``/``int()`` of a traced tensor, or NumPy and other non-torch code applied to tensors.

``UnsupportedModelError`` is raised for those, and for what cannot be split per task: a tensor of
a branched layer used outside that layer's own call (a tied weight read as ``self.layer.weight``,
or shared with a layer that stays shared), an in-place write from a stream into a tensor computed
before the split (``h.add_(stream)``), and a layer inside a torch.nn module that fx calls as a
whole (branch the enclosing module). As with any fx trace, submodules the forward never uses are
dropped. A shared layer after the split that keeps buffers (a shared BatchNorm) updates them once
per stream.
"""

from __future__ import annotations

import copy
import difflib
import functools
import itertools
import operator
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, fx, nn

from ..errors import InvalidOptionError, UnsupportedModelError

__all__ = ["BranchedModule", "TaskTrunk", "branch"]


class TaskTrunk(nn.Module):
    """A trunk that computes each task's features: ``forward`` returns a tuple with one entry per
    task (in task order), and ``task_specific`` lists the qualified names of the submodules that
    only one task's loss reaches (e.g. ``("gates.income", "gates.marital")``).

    ``shared_parameters()`` are the others: the parameters every task's loss reaches, which a
    multi-task method combines. :func:`branch` keeps a ``TaskTrunk``'s output structure (see the
    module docstring).

    >>> import torch
    >>> from torch import nn
    >>> class TwoGates(TaskTrunk):
    ...     task_specific = ("gates",)
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = nn.Linear(3, 4)
    ...         self.gates = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
    ...     def forward(self, x):
    ...         h = self.body(x)
    ...         return tuple(gate(h) for gate in self.gates)
    >>> [name for name, _ in TwoGates().shared_parameters()]
    ['body.weight', 'body.bias']
    """

    task_specific: tuple[str, ...] = ()

    def shared_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters outside the ``task_specific`` submodules, with their names."""
        for name, parameter in self.named_parameters():
            if not _under(name, self.task_specific):
                yield name, parameter


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


class BranchedModule(nn.Module):
    """A trunk whose branched layers have one copy per task; built by :func:`branch`.

    ``forward(*args, **kwargs)`` takes the trunk's inputs and returns a tuple of ``num_tasks``
    outputs, each structured like the trunk's output (for a :class:`TaskTrunk`, whose output
    already has one entry per task: that output, entry t computed with task t's copies).
    ``trunk`` is the rewritten ``fx.GraphModule`` (``trunk.code`` shows the streams);
    ``branches[key][t]`` is task t's copy of a branched layer, ``key`` being its name with dots
    replaced by underscores; ``task_specific`` the trunk's task-specific modules (a
    :class:`TaskTrunk`'s), which are not among the shared parameters either.

    >>> from torch import nn
    >>> from deconflict.recon import branch
    >>> branched = branch(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), ["1"], num_tasks=3)
    >>> branched.num_tasks, branched.layer_names, len(branched.branches["1"])
    (3, ('1',), 3)
    """

    def __init__(
        self, trunk: fx.GraphModule, branches_attr: str, layer_names: tuple[str, ...],
        num_tasks: int, task_specific: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.num_tasks = num_tasks
        self.layer_names = layer_names
        self.task_specific = task_specific
        self._branches_attr = branches_attr

    @property
    def branches(self) -> nn.ModuleDict:
        # Owned by the trunk (its graph calls them), so registered once, not here as well.
        return getattr(self.trunk, self._branches_attr)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return self.trunk(*args, **kwargs)

    def shared_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters every task reaches: the ones a multi-task method combines.

        Named as in the original trunk, so that per-layer reports use the trunk's names.
        """
        excluded = (self._branches_attr, *self.task_specific)
        for name, parameter in self.trunk.named_parameters():
            if not _under(name, excluded):
                yield name, parameter

    def task_parameters(self, task: int) -> Iterator[tuple[str, nn.Parameter]]:
        """Task ``task``'s copies of the branched layers' parameters (named in the trunk, as
        ``branches.<layer>.<task>.weight``)."""
        if not 0 <= task < self.num_tasks:
            raise InvalidOptionError(f"task must be in [0, {self.num_tasks}), got {task!r}")
        prefixes = tuple(f"{self._branches_attr}.{key}.{task}." for key in self.branches)
        for name, parameter in self.trunk.named_parameters():
            if name.startswith(prefixes):
                yield name, parameter

    def reset_branches(self) -> None:
        """Re-initialize every copy independently: ``reset_parameters()`` on each of the copies'
        modules that has one (Recon retrains the branched model from scratch, and copies that
        start identical would only drift apart through their tasks' gradients)."""
        for copies in self.branches.values():
            for submodule in copies.modules():
                reset = getattr(submodule, "reset_parameters", None)
                if callable(reset):
                    reset()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, layer_names={self.layer_names}"


class _Tracer(fx.Tracer):
    """fx's tracer, also calling as wholes the modules listed (by identity)."""

    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, module_qualified_name)


def branch(module: nn.Module, layer_names: Sequence[str], num_tasks: int) -> BranchedModule:
    """Copy ``module`` with the layers ``layer_names`` replaced by one copy per task.

    ``layer_names`` are qualified names as in ``module.named_modules()`` (a single string is one
    name); a container stands for the layers called inside it; repeated or nested names are
    merged. The result's ``forward`` returns a tuple of ``num_tasks`` outputs. A
    :class:`TaskTrunk` must return a tuple (or list) of ``num_tasks`` entries, its
    ``task_specific`` submodules cannot be branched, and stream t computes only entry t.

    Branch the last layer of a trunk for two tasks; the copies start from the original weights:

    >>> import torch
    >>> from torch import nn
    >>> from deconflict.recon import branch
    >>> trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    >>> branched = branch(trunk, ["2"], num_tasks=2)
    >>> first, second = branched(torch.randn(5, 4))
    >>> first.shape, torch.equal(first, second)
    (torch.Size([5, 8]), True)
    >>> [name for name, _ in branched.task_parameters(1)]
    ['branches.2.1.weight', 'branches.2.1.bias']
    >>> sum(p.numel() for _, p in branched.shared_parameters())   # layer "0" stays shared
    40
    """
    try:
        num_tasks = operator.index(num_tasks)
    except TypeError:
        raise InvalidOptionError(f"num_tasks must be an integer, got {num_tasks!r}") from None
    if num_tasks < 1:
        raise InvalidOptionError(f"num_tasks must be at least 1, got {num_tasks}")
    names = [layer_names] if isinstance(layer_names, str) else list(layer_names)
    if not names:
        raise InvalidOptionError("layer_names is empty: name at least one layer to branch")
    if not all(isinstance(name, str) for name in names):
        raise InvalidOptionError(f"layer_names must be strings, got {names!r}")

    trunk = copy.deepcopy(module)
    task_specific = tuple(module.task_specific) if isinstance(module, TaskTrunk) else ()
    chosen = {name: _submodule(trunk, name) for name in names}
    for name in chosen:
        clash = [t for t in task_specific if _under(name, [t]) or _under(t, [name])]
        if clash:
            raise UnsupportedModelError(
                f"layer {name!r} of {type(module).__name__} is or holds the task-specific "
                f"module {clash[0]!r}: only layers every task shares can be branched"
            )
    for name, layer in chosen.items():
        if not _owns_tensors(layer):
            raise UnsupportedModelError(
                f"layer {name!r} ({type(layer).__name__}) owns no parameters or buffers: there is "
                "nothing to copy per task; name a layer with weights"
            )
    inside = {id(m) for layer in chosen.values() for m in layer.modules()}
    # A layer's own tensors must stay inside its call: traced through, its forward would read
    # them as loose attributes that cannot be redirected to a copy.
    graph = _trace(trunk, {id(m) for layer in chosen.values() for m in layer.modules()
                           if _owns_tensors(m, recurse=False)})

    calls = [node for node in graph.nodes if node.op == "call_module"
             and id(trunk.get_submodule(node.target)) in inside
             and _owns_tensors(trunk.get_submodule(node.target))]
    units = list(dict.fromkeys(node.target for node in calls))
    for name, layer in chosen.items():
        subtree = {id(m) for m in layer.modules()}
        if not any(id(trunk.get_submodule(unit)) in subtree for unit in units):
            raise _never_called(trunk, graph, name, layer)
    _check_tensors_private(trunk, graph, units)
    streams = _dependents(graph, set(calls))
    _check_inplace(graph, streams)

    branches = nn.ModuleDict()
    # One deepcopy per task of all layers together keeps weights tied between branched layers.
    per_task = [copy.deepcopy([trunk.get_submodule(unit) for unit in units])
                for _ in range(num_tasks)]
    keys = {}
    for i, unit in enumerate(units):
        key = unit.replace(".", "_")
        while hasattr(branches, key):
            key += "_"
        keys[unit] = key
        branches[key] = nn.ModuleList(layers[i] for layers in per_task)
    attr = "branches"
    while hasattr(trunk, attr):
        attr += "_"
    trunk.add_module(attr, branches)

    entry_per_task = isinstance(module, TaskTrunk)
    rewritten = _split(graph, streams, {unit: f"{attr}.{keys[unit]}" for unit in units},
                       num_tasks, entry_per_task, type(module).__name__)
    # GraphModule copies only what the new graph references, so the branched layers' original
    # instances are left behind and their parameters are not counted twice.
    graph_module = fx.GraphModule(trunk, rewritten, class_name=type(module).__name__)
    setattr(graph_module, attr, branches)  # keep the ModuleDict, not fx's plain path modules
    return BranchedModule(graph_module, attr, tuple(units), num_tasks, task_specific)


def _owns_tensors(module: nn.Module, recurse: bool = True) -> bool:
    tensors = itertools.chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse))
    return next(tensors, None) is not None


def _submodule(trunk: nn.Module, name: str) -> nn.Module:
    try:
        return trunk.get_submodule(name)
    except AttributeError:
        valid = [n for n, _ in trunk.named_modules() if n]
        close = difflib.get_close_matches(name, valid, n=3)
        if close:
            hint = "did you mean " + ", ".join(map(repr, close)) + "?"
        else:
            hint = "valid names include " + ", ".join(map(repr, valid[:8]))
            hint += ", ..." if len(valid) > 8 else ""
        raise UnsupportedModelError(
            f"{name!r} is not a submodule of {type(trunk).__name__}; {hint}"
        ) from None


def _trace(trunk: nn.Module, leaves: set[int]) -> fx.Graph:
    try:
        return _Tracer(leaves).trace(trunk)
    except Exception as err:  # the trunk's own code can fail on proxies in any way
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(trunk).__name__}.forward ({type(err).__name__}: "
            f"{err}). Branching rewrites the traced graph, so the forward must be free of "
            "control flow on tensor values or shapes and of non-torch code on tensors: make "
            "the trunk traceable (e.g. move that logic out of the trunk) or pass an nn.Sequential"
        ) from err


def _never_called(
    trunk: nn.Module, graph: fx.Graph, name: str, layer: nn.Module,
) -> UnsupportedModelError:
    path = {id(m): n for n, m in trunk.named_modules()}[id(layer)]
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    enclosing = [target for target in called if path.startswith(target + ".")]
    read = sorted(node.target for node in graph.nodes
                  if node.op == "get_attr" and node.target.startswith(path + "."))
    if enclosing:
        outer = enclosing[0]
        why = (f"it sits inside {outer!r} ({type(trunk.get_submodule(outer)).__name__}), which "
               f"fx calls as a whole; branch {outer!r} instead")
    elif read:
        why = (f"its tensors are only read as attributes ({', '.join(read)}), which cannot be "
               "redirected to per-task copies; call the layer as a module")
    else:
        why = "Recon branches layers the forward uses"
    return UnsupportedModelError(
        f"layer {name!r} ({type(layer).__name__}) is never called as a module in the traced "
        f"forward of {type(trunk).__name__}: {why}"
    )


def _check_tensors_private(trunk: nn.Module, graph: fx.Graph, units: list[str]) -> None:
    owner: dict[int, str] = {}
    for unit in units:
        layer = trunk.get_submodule(unit)
        for tensor in itertools.chain(layer.parameters(), layer.buffers()):
            owner.setdefault(id(tensor), unit)
    for node in graph.nodes:
        if node.op == "get_attr":
            found = functools.reduce(getattr, node.target.split("."), trunk)
            where = f"read directly as {node.target!r} in the forward"
        elif node.op == "call_module" and node.target not in units:
            found = trunk.get_submodule(node.target)
            where = f"also held by the shared module {node.target!r}"
        else:
            continue
        if isinstance(found, Tensor):
            tensors = [found]
        elif isinstance(found, nn.Module):
            tensors = itertools.chain(found.parameters(), found.buffers())
        else:
            tensors = []
        for tensor in tensors:
            if id(tensor) in owner:
                raise UnsupportedModelError(
                    f"a tensor of the branched layer {owner[id(tensor)]!r} is {where} (a tied "
                    "weight): it is used outside that layer's own call, so it cannot be split "
                    "per task; untie it or do not branch that layer"
                )


def _dependents(graph: fx.Graph, sources: set[fx.Node]) -> set[fx.Node]:
    found = set(sources)
    for node in graph.nodes:  # topological order
        if any(arg in found for arg in node.all_input_nodes):
            found.add(node)
    return found


def _writes_first_argument(node: fx.Node) -> bool:
    # fx records ``h += y`` as ``h = h + y`` (its proxies have no ``__iadd__``) and cannot trace
    # ``h[i] = y``, so in-place writes reach the graph only as ``add_``-style calls.
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    elif node.op == "call_method":
        name = node.target
    else:
        return False
    return (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace") is True


def _check_inplace(graph: fx.Graph, streams: set[fx.Node]) -> None:
    for node in graph.nodes:
        if (node in streams and _writes_first_argument(node) and node.args
                and isinstance(node.args[0], fx.Node) and node.args[0] not in streams):
            raise UnsupportedModelError(
                f"the in-place operation {node.format_node()} writes a value that depends on a "
                f"branched layer into {node.args[0].name!r}, computed before the split: every "
                "task's stream would write into the same tensor; use the out-of-place form "
                "(h = h + ..., torch.cat, ...)"
            )


def _split(
    graph: fx.Graph, streams: set[fx.Node], copies: dict[str, str], num_tasks: int,
    entry_per_task: bool = False, name: str = "the trunk",
) -> fx.Graph:
    """A graph computing the nodes outside ``streams`` once and those inside once per task,
    calls to a branched layer in stream t going to its t-th copy (``copies`` maps a branched
    layer's path to its copies' path, without the task index). With ``entry_per_task`` the
    output is the trunk's own tuple, entry t taken from stream t."""
    new = fx.Graph()
    shared: dict[fx.Node, fx.Node] = {}
    per_task: list[dict[fx.Node, fx.Node]] = [{} for _ in range(num_tasks)]

    def lookup(node: fx.Node, task: int) -> fx.Node:
        return per_task[task][node] if node in per_task[task] else shared[node]

    for node in graph.nodes:
        if node.op == "output" and entry_per_task:
            entries = node.args[0]
            if not isinstance(entries, (tuple, list)) or len(entries) != num_tasks:
                raise UnsupportedModelError(
                    f"{name} is a TaskTrunk, so its forward must return a tuple with one entry "
                    f"per task ({num_tasks}); it returns {type(entries).__name__}"
                    + (f" of {len(entries)}" if isinstance(entries, (tuple, list)) else ""))
            new.output(tuple(fx.map_arg(entry, functools.partial(lookup, task=t))
                             for t, entry in enumerate(entries)))
        elif node.op == "output":
            new.output(tuple(fx.map_arg(node.args[0], functools.partial(lookup, task=t))
                             for t in range(num_tasks)))
        elif node not in streams:
            shared[node] = new.node_copy(node, shared.__getitem__)
        else:
            for t in range(num_tasks):
                target = node.target
                if node.op == "call_module" and target in copies:
                    target = f"{copies[target]}.{t}"
                transform = functools.partial(lookup, task=t)
                copied = new.create_node(
                    node.op, target, fx.map_arg(node.args, transform),
                    fx.map_arg(node.kwargs, transform), name=f"{node.name}_task{t}",
                    type_expr=node.type,
                )
                copied.meta = dict(node.meta)
                per_task[t][node] = copied
    if entry_per_task:
        # Stream t's copies of what only the other tasks' entries need feed no output: drop
        # them (last first, so that their inputs lose their users too). Only per-task copies
        # go: a call computed once (an input check, say) stays whatever its users.
        copies_made = {copied for stream in per_task for copied in stream.values()}
        for copied in reversed(list(new.nodes)):
            if copied in copies_made and not copied.users:
                new.erase_node(copied)
    for node in new.nodes:
        # Postponed annotations (``from __future__ import annotations``) reach fx as strings,
        # which GraphModule's pickling tries to import as types.
        if isinstance(node.type, str):
            node.type = None
    return new
