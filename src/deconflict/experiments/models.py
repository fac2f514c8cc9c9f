"""Models of the benchmark problems, each a ``MultiTaskModel``: ``shared`` is the one trunk module
the forward calls (``recon.branch`` may split its layers), ``shared_parameters()`` the parameters
every task's loss reaches (what ``deconflict.backward`` combines), ``forward`` returns (shared
representation, {task: output}).

The multi-task architectures, and what is shared in each (docs/methods.md#notation: the shared
parameters are those whose gradient every task has, so the Gramian is formed over them):

- ``SharedBottom`` (hard sharing): the MLP trunk; a linear head per task.
- ``MMoE`` (Ma et al., KDD 2018): n expert MLPs E_j, per task t a softmax gate
  g_t(x) = softmax(W_t x + b_t) and a tower, f_t(x) = tower_t(sum_j g_t(x)_j E_j(x)). Shared:
  the experts; the representation is their stack (batch x n x units), read by every task.
- ``DSelectK`` (Hazimeh et al., NeurIPS 2021): MMoE with each softmax gate replaced by the
  DSelect-k gate (``DSelectKGate``: k single-expert selectors built from the smooth-step
  function, mixed by a softmax), so at most k experts are selected once the gate is binary.
  Shared: the experts.
- ``PLE`` (progressive layered extraction, Tang et al., RecSys 2020) with ``levels`` extraction
  levels, ``CGC`` being PLE with one level (customized gate control, their Section 4): at level l
  each task t has its own experts E^t_l and the level has shared experts E^s_l; task t's gate
  mixes [E^t_l, E^s_l] of task t's input, and below the last level a shared gate mixes every
  expert of the level into the shared input of the next. Shared: every parameter the losses of
  all tasks reach, which is the whole extraction network except the last level's task experts
  and gates and the task gates of the level below it (those feed one task only); their trunk
  (``Extraction``, a ``recon.branch.TaskTrunk``) returns one tensor per task.
- ``CrossStitch`` (Misra et al., CVPR 2016): one MLP tower per task, and after each layer a
  cross-stitch unit, a learned T x T matrix alpha with h~_t = sum_s alpha_ts h_s (their unit,
  for T tasks), initialized to alpha_tt = 0.9 and alpha_ts = 0.1 / (T - 1) (the best of their
  initializations, (0.9, 0.1) for two tasks). Through the units every task's loss reaches every
  tower, so the towers' layers and the units are the shared parameters (what the method
  deconflicts: task t's gradient on tower s is its pull through the mixing), and the linear
  head per task is task-specific. The paper's larger learning rate for the units is not
  applied (one optimizer for all parameters).

Representation mode (``features=``) needs one tensor that every task reads and through which all
shared parameters are reached: the stack of expert outputs for ``MMoE`` and ``DSelectK``, the
trunk output for ``SharedBottom``. ``CGC``, ``PLE`` and ``CrossStitch`` have none (each task
reads its own slice of the trunk's output, so a Gramian over it would be diagonal), and the
problems refuse representation mode for them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from ..recon.branch import TaskTrunk
from .multitask import MultiTaskModel


def mlp(sizes: Sequence[int], dropout: float = 0.0, last_activation: bool = True) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last if ``last_activation``); one
    dropout layer after the first activation when ``dropout`` > 0."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
            if k == 0 and dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class SharedBottom(MultiTaskModel):
    """Hard parameter sharing: a shared MLP trunk, one linear head per task."""

    supports_branching = True

    def __init__(self, inputs: int, hidden: Sequence[int], outputs: Mapping[str, int],
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.shared = mlp([inputs, *hidden], dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(hidden[-1], n) for t, n in outputs.items()})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.shared(x)
        streams = self.task_streams(z, len(self.heads))
        return z, {task: head(h) for (task, head), h in zip(self.heads.items(), streams,
                                                            strict=True)}


class Experts(nn.ModuleList):
    """``count`` expert MLPs of the same shape on the same input; ``forward`` stacks their outputs
    (batch x count x units).

    >>> import torch
    >>> Experts(3, [5, 4, 2])(torch.randn(7, 5)).shape
    torch.Size([7, 3, 2])
    """

    def __init__(self, count: int, sizes: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__(mlp(sizes, dropout) for _ in range(count))

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([expert(x) for expert in self], dim=1)


def _mix(weights: Tensor, experts: Tensor) -> Tensor:
    """sum_j w_j E_j per example: (batch x n) weights, (batch x n x units) experts."""
    return (weights.unsqueeze(-1) * experts).sum(dim=1)


class MMoE(MultiTaskModel):
    """Multi-gate mixture of experts (Ma et al., KDD 2018): shared experts, one softmax gate and
    one tower per task, f_t(x) = tower_t(sum_j softmax(W_t x)_j E_j(x)). The experts are the
    shared parameters (``shared``, an ``Experts``); gates and towers are per task. The shared
    representation is the stack of expert outputs (batch x experts x units).

    >>> import torch
    >>> model = MMoE(6, 4, [8, 5], {"a": 1, "b": 2})
    >>> z, out = model(torch.randn(3, 6))
    >>> tuple(z.shape), tuple(out["b"].shape)
    ((3, 4, 5), (3, 2))
    >>> sum(p.numel() for _, p in model.shared_parameters())   # 4 x (6*8 + 8 + 8*5 + 5)
    404
    """

    supports_branching = True
    shared: Experts

    def __init__(self, inputs: int, experts: int, expert_hidden: Sequence[int],
                 outputs: Mapping[str, int], dropout: float = 0.0, tower: int = 16) -> None:
        super().__init__()
        self.shared = Experts(experts, [inputs, *expert_hidden], dropout)
        self.gates = nn.ModuleDict({t: self._gate(inputs, experts) for t in outputs})
        self.towers = nn.ModuleDict({t: mlp([expert_hidden[-1], tower, n], last_activation=False)
                                     for t, n in outputs.items()})

    def _gate(self, inputs: int, experts: int) -> nn.Module:
        return nn.Linear(inputs, experts)

    def gate_weights(self, task: str, x: Tensor) -> Tensor:
        """Task ``task``'s weights over the experts (batch x experts), rows on the simplex."""
        return torch.softmax(self.gates[task](x), dim=-1)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.shared(x)
        streams = self.task_streams(z, len(self.towers))
        return z, {task: tower(_mix(self.gate_weights(task, x), h))
                   for (task, tower), h in zip(self.towers.items(), streams, strict=True)}


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """The smooth-step function of DSelect-k (Hazimeh et al. 2021, Section 3): 0 for t <= -gamma/2,
    1 for t >= gamma/2, and -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2 between (continuously
    differentiable; exactly 0 or 1 outside the band, so a gate can become exactly sparse).

    >>> import torch
    >>> smooth_step(torch.tensor([-1.0, -0.25, 0.0, 0.25, 1.0])).tolist()
    [0.0, 0.15625, 0.5, 0.84375, 1.0]
    """
    cubic = -2.0 / gamma ** 3 * t ** 3 + 1.5 / gamma * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t),
                       torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectKGate(nn.Module):
    """The per-example DSelect-k gate over n experts (Hazimeh et al. 2021, Section 3).

    With m = ceil(log2 n) binary variables, selector i (i = 1..k) turns z_i = Z_i x (m numbers)
    into a distribution over the 2^m binary codes, r(z_i)_c = prod_l S(z_il) if bit l of c is 1,
    else 1 - S(z_il) (S: ``smooth_step``); the gate is sum_i softmax(w x)_i r(z_i), a
    distribution over the experts. Once every S(z_il) is 0 or 1 each selector picks one code, so
    at most k experts have nonzero weight.

    Deviation: when n is not a power of 2, the authors' code adds a loss term keeping the
    weight off the 2^m - n codes without an expert; here code c belongs to expert c mod n, so
    the gate is a distribution over the n experts without an extra loss (identical when n is a
    power of 2). The optional entropy regularizer is not used (off by default in their code).
    Initialization as in their code: Z uniform in [-gamma/100, gamma/100] (selectors start in
    the smooth band), w uniform in [-0.05, 0.05].

    >>> import torch
    >>> gate = DSelectKGate(inputs=3, experts=4, k=2)
    >>> weights = gate(torch.randn(5, 3))
    >>> tuple(weights.shape), bool(torch.allclose(weights.sum(-1), torch.ones(5)))
    ((5, 4), True)
    """

    codes: Tensor
    owner: Tensor

    def __init__(self, inputs: int, experts: int, k: int = 2, gamma: float = 1.0) -> None:
        super().__init__()
        if experts < 1 or k < 1 or not gamma > 0:
            raise ValueError(f"DSelect-k needs experts >= 1, k >= 1, gamma > 0; got "
                             f"{experts}, {k}, {gamma}")
        self.k, self.gamma, self.experts = k, float(gamma), experts
        self.bits = max(1, math.ceil(math.log2(experts)))
        self.selectors = nn.Linear(inputs, k * self.bits)
        self.weights = nn.Linear(inputs, k)
        nn.init.uniform_(self.selectors.weight, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.selectors.bias, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.weights.weight, -0.05, 0.05)
        nn.init.uniform_(self.weights.bias, -0.05, 0.05)
        count = 2 ** self.bits
        code = torch.arange(count)
        # codes[c, l]: bit l of code c (most significant first); owner[c, j] = 1 for j = c mod n.
        shifts = torch.arange(self.bits - 1, -1, -1)
        self.register_buffer("codes", ((code[:, None] >> shifts) & 1).bool(), persistent=False)
        self.register_buffer("owner", nn.functional.one_hot(code % experts, experts).float(),
                             persistent=False)

    def selector_outputs(self, x: Tensor) -> Tensor:
        """r(z_i) for each selector, over the experts (batch x k x n)."""
        s = smooth_step(self.selectors(x).view(-1, self.k, 1, self.bits), self.gamma)
        per_code = torch.where(self.codes, s, 1.0 - s).prod(dim=-1)  # batch x k x 2^m
        return per_code @ self.owner

    def forward(self, x: Tensor) -> Tensor:
        mixing = torch.softmax(self.weights(x), dim=-1)
        return (mixing.unsqueeze(-1) * self.selector_outputs(x)).sum(dim=1)


class DSelectK(MMoE):
    """MMoE with DSelect-k gates (Hazimeh et al., NeurIPS 2021): each task's gate selects at most
    ``k`` of the shared experts once binary (``DSelectKGate``, options ``k`` and ``gamma``).
    Shared: the experts, as in MMoE.

    >>> import torch
    >>> model = DSelectK(6, 4, [8, 5], {"a": 1, "b": 1}, k=2)
    >>> tuple(model(torch.randn(3, 6))[1]["a"].shape)
    (3, 1)
    """

    def __init__(self, inputs: int, experts: int, expert_hidden: Sequence[int],
                 outputs: Mapping[str, int], dropout: float = 0.0, tower: int = 16,
                 k: int = 2, gamma: float = 1.0) -> None:
        self._k, self._gamma = k, gamma
        super().__init__(inputs, experts, expert_hidden, outputs, dropout, tower)

    def _gate(self, inputs: int, experts: int) -> nn.Module:
        return DSelectKGate(inputs, experts, self._k, self._gamma)

    def gate_weights(self, task: str, x: Tensor) -> Tensor:
        return self.gates[task](x)


class Extraction(TaskTrunk):
    """PLE's extraction network (Tang et al. 2020, Section 4): ``levels`` levels of task experts,
    shared experts and gates; returns each task's input to its tower, in task order.

    Level l (inputs x^t_l per task and x^s_l shared, all x at l = 0) computes
    x^t_{l+1} = sum_j softmax(W^t_l x^t_l)_j [E^t_l(x^t_l), E^s_l(x^s_l)]_j and, below the
    last level, x^s_{l+1} = sum_j softmax(W^s_l x^s_l)_j [E^1_l, ..., E^T_l, E^s_l]_j (the
    shared gate). ``task_specific``: the modules one task's loss reaches, the last level's task
    experts and gates and the task gates of the level below (see the module docstring).
    """

    def __init__(self, inputs: int, tasks: Sequence[str], shared_experts: int,
                 task_experts: int, expert_hidden: Sequence[int], levels: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if levels < 1 or shared_experts < 1 or task_experts < 1:
            raise ValueError(f"PLE needs levels, shared and task experts >= 1; got {levels}, "
                             f"{shared_experts}, {task_experts}")
        self.tasks = tuple(tasks)
        widths = [inputs] + [expert_hidden[-1]] * (levels - 1)
        self.shared_experts = nn.ModuleList(Experts(shared_experts, [w, *expert_hidden], dropout)
                                            for w in widths)
        self.task_experts = nn.ModuleList(
            nn.ModuleDict({t: Experts(task_experts, [w, *expert_hidden], dropout)
                           for t in self.tasks}) for w in widths)
        self.task_gates = nn.ModuleList(
            nn.ModuleDict({t: nn.Linear(w, task_experts + shared_experts) for t in self.tasks})
            for w in widths)
        everyone = len(self.tasks) * task_experts + shared_experts
        self.shared_gates = nn.ModuleList(nn.Linear(w, everyone) for w in widths[:-1])
        last = levels - 1
        own = [f"task_experts.{last}.{t}" for t in self.tasks]
        own += [f"task_gates.{level}.{t}" for level in range(max(last - 1, 0), levels)
                for t in self.tasks]
        self.task_specific = tuple(own)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        inputs = [x] * len(self.tasks)
        shared = x
        for level, experts in enumerate(self.shared_experts):
            common = experts(shared)
            # ModuleList and ModuleDict are untyped; their entries are built in __init__.
            task_experts = cast(nn.ModuleDict, self.task_experts[level])
            gates = cast(nn.ModuleDict, self.task_gates[level])
            own = [task_experts[t](h) for t, h in zip(self.tasks, inputs, strict=True)]
            if level < len(self.shared_gates):
                weights = torch.softmax(self.shared_gates[level](shared), dim=-1)
                shared = _mix(weights, torch.cat([*own, common], dim=1))
            inputs = [_mix(torch.softmax(gates[t](h), dim=-1), torch.cat([e, common], dim=1))
                      for t, h, e in zip(self.tasks, inputs, own, strict=True)]
        return tuple(inputs)


class _TaskTrunkModel(MultiTaskModel):
    """A model whose trunk is a ``TaskTrunk``: one tensor per task out of ``shared``, a head per
    task on it; the shared parameters leave out the trunk's task-specific modules."""

    supports_branching = True
    heads: nn.ModuleDict

    def shared_parameters(self) -> list[tuple[str, Tensor]]:
        if isinstance(self.shared, TaskTrunk):
            return list(self.shared.shared_parameters())
        return super().shared_parameters()

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # Branched or not, the trunk returns one tensor per task (recon.branch keeps a
        # TaskTrunk's output structure), so no per-task streams to pick from.
        features = self.shared(x)
        outputs = {task: head(h) for (task, head), h in zip(self.heads.items(), features,
                                                            strict=True)}
        return torch.stack(list(features), dim=1), outputs


class PLE(_TaskTrunkModel):
    """Progressive layered extraction (Tang et al., RecSys 2020): the ``Extraction`` trunk and a
    tower per task (``levels`` = 1 is CGC). The representation returned (batch x tasks x units,
    each task's tower input) is not shared: representation mode does not apply.

    >>> import torch
    >>> model = PLE(6, {"a": 1, "b": 1}, shared_experts=2, task_experts=1,
    ...             expert_hidden=[8, 4], levels=2)
    >>> z, out = model(torch.randn(3, 6))
    >>> tuple(z.shape), tuple(out["a"].shape)
    ((3, 2, 4), (3, 1))
    """

    shared: Extraction

    def __init__(self, inputs: int, outputs: Mapping[str, int], shared_experts: int,
                 task_experts: int, expert_hidden: Sequence[int], levels: int = 2,
                 dropout: float = 0.0, tower: int = 16) -> None:
        super().__init__()
        self.shared = Extraction(inputs, list(outputs), shared_experts, task_experts,
                                 expert_hidden, levels, dropout)
        self.heads = nn.ModuleDict({t: mlp([expert_hidden[-1], tower, n], last_activation=False)
                                    for t, n in outputs.items()})


class CGC(PLE):
    """Customized gate control (Tang et al. 2020, Section 4): PLE with one extraction level;
    shared: the shared experts.

    >>> import torch
    >>> model = CGC(6, {"a": 1, "b": 1}, shared_experts=2, task_experts=1, expert_hidden=[4])
    >>> sum(p.numel() for _, p in model.shared_parameters())   # 2 x (6*4 + 4)
    56
    """

    def __init__(self, inputs: int, outputs: Mapping[str, int], shared_experts: int,
                 task_experts: int, expert_hidden: Sequence[int], dropout: float = 0.0,
                 tower: int = 16) -> None:
        super().__init__(inputs, outputs, shared_experts, task_experts, expert_hidden, 1,
                         dropout, tower)


class CrossStitchUnit(nn.Module):
    """A cross-stitch unit for T tasks (Misra et al. 2016): h~_t = sum_s alpha_ts h_s,
    alpha initialized to ``same`` on the diagonal and (1 - same) / (T - 1) off it."""

    def __init__(self, tasks: int, same: float = 0.9) -> None:
        super().__init__()
        other = (1.0 - same) / (tasks - 1) if tasks > 1 else 0.0
        alpha = torch.full((tasks, tasks), other)
        alpha.fill_diagonal_(same)
        self.tasks = tasks
        self.alpha = nn.Parameter(alpha)

    def forward(self, streams: Sequence[Tensor]) -> tuple[Tensor, ...]:
        mixed = torch.einsum("ts,bs...->bt...", self.alpha, torch.stack(list(streams), dim=1))
        return tuple(mixed[:, t] for t in range(self.tasks))  # fx cannot unpack unbind's output


class CrossStitchTowers(TaskTrunk):
    """One MLP tower per task (layers ``[inputs, *hidden]``, ReLU, dropout after the first
    layer) with a cross-stitch unit after every layer; returns each task's stitched features.
    Every parameter is reached by every task's loss (through the units): none is task-specific.
    """

    def __init__(self, inputs: int, hidden: Sequence[int], tasks: Sequence[str],
                 dropout: float = 0.0, same: float = 0.9) -> None:
        super().__init__()
        sizes = [inputs, *hidden]
        self.towers = nn.ModuleDict({t: nn.ModuleList(
            mlp([a, b], dropout if layer == 0 else 0.0)
            for layer, (a, b) in enumerate(itertools.pairwise(sizes))) for t in tasks})
        self.stitches = nn.ModuleList(CrossStitchUnit(len(tasks), same) for _ in hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        count = len(self.towers)
        streams: tuple[Tensor, ...] = (x,) * count
        for layer, stitch in enumerate(self.stitches):
            mixed = stitch([cast(nn.ModuleList, tower)[layer](h)
                            for tower, h in zip(self.towers.values(), streams, strict=True)])
            # Indexed, not unpacked: once Recon branches a unit, fx sees its output as one value.
            streams = tuple(mixed[t] for t in range(count))
        return streams


class CrossStitch(_TaskTrunkModel):
    """Cross-stitch networks (Misra et al., CVPR 2016) on MLP towers: ``CrossStitchTowers`` and
    a linear head per task. What is shared and why: see the module docstring.

    >>> import torch
    >>> model = CrossStitch(6, [8, 4], {"a": 1, "b": 1})
    >>> sum(p.numel() for _, p in model.shared_parameters())   # 2 x (6*8+8 + 8*4+4) + 2 x 4
    192
    """

    shared: CrossStitchTowers

    def __init__(self, inputs: int, hidden: Sequence[int], outputs: Mapping[str, int],
                 dropout: float = 0.0, same: float = 0.9) -> None:
        super().__init__()
        self.shared = CrossStitchTowers(inputs, hidden, list(outputs), dropout, same)
        self.heads = nn.ModuleDict({t: nn.Linear(hidden[-1], n) for t, n in outputs.items()})


class ConvEncoder(nn.Module):
    """LeNet-like encoder: two 3x3 conv + ReLU + 2x2 max-pool blocks, then a linear latent."""

    def __init__(self, size: int, latent: int, channels: tuple[int, int] = (10, 20)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = size // 4
        self.latent = nn.Sequential(nn.Flatten(), nn.Linear(channels[1] * side * side, latent),
                                    nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.latent(self.features(x))


class TwoDigitModel(MultiTaskModel):
    """The tensioner paper's digits model: a shared encoder to a latent, a classifier head per
    classification task (log-probabilities) and an MLP decoder per reconstruction task
    (sigmoid pixels)."""

    supports_branching = True

    def __init__(self, size: int, latent: int, tasks: Mapping[str, tuple[str, int]]) -> None:
        super().__init__()
        self.shared = ConvEncoder(size, latent)
        heads: dict[str, nn.Module] = {}
        for task, (kind, outputs) in tasks.items():
            if kind == "classify":
                heads[task] = nn.Sequential(nn.Linear(latent, outputs), nn.LogSoftmax(dim=-1))
            else:
                heads[task] = nn.Sequential(nn.Linear(latent, 128), nn.ReLU(),
                                            nn.Linear(128, outputs), nn.Sigmoid())
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.shared(x)
        streams = self.task_streams(z, len(self.heads))
        return z, {task: head(h) for (task, head), h in zip(self.heads.items(), streams,
                                                            strict=True)}


def digit_head(kind: str, inputs: int, outputs: int) -> nn.Sequential:
    """``TwoDigitModel``'s head for one task: a linear classifier to log-probabilities
    (``kind="classify"``) or an MLP decoder ``inputs -> 128 -> outputs`` to sigmoid pixels
    (``"reconstruct"``).

    >>> import torch
    >>> digit_head("classify", 5, 10)(torch.randn(2, 5)).exp().sum(-1).round().tolist()
    [1.0, 1.0]
    >>> head = digit_head("reconstruct", 5, 64)
    >>> sum(p.numel() for p in head.parameters())   # 5*128 + 128 + 128*64 + 64
    9024
    """
    if kind == "classify":
        return nn.Sequential(nn.Linear(inputs, outputs), nn.LogSoftmax(dim=-1))
    if kind == "reconstruct":
        return nn.Sequential(nn.Linear(inputs, 128), nn.ReLU(), nn.Linear(128, outputs),
                             nn.Sigmoid())
    raise ValueError(f"digit_head: kind must be classify or reconstruct, got {kind!r}")


def replace_task_heads(model: MultiTaskModel, heads: Mapping[str, nn.Module]) -> MultiTaskModel:
    """Put ``heads[t]`` in place of task t's tower (``MMoE``, ``DSelectK``) or head (the other
    architectures), in place; returns ``model``. The towers and heads are task-specific, so the
    shared parameters and what the trunk computes are unchanged.

    >>> import torch
    >>> model = replace_task_heads(MMoE(6, 2, [4], {"a": 3}), {"a": digit_head("classify", 4, 3)})
    >>> tuple(model(torch.randn(5, 6))[1]["a"].shape)
    (5, 3)
    """
    slot = getattr(model, "towers" if isinstance(model, MMoE) else "heads", None)
    if not isinstance(slot, nn.ModuleDict) or set(slot) != set(heads):
        raise ValueError(f"replace_task_heads: {type(model).__name__} has no task heads for "
                         f"{list(heads)}")
    for task, head in heads.items():
        slot[task] = head
    return model
