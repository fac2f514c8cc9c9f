"""Gramian-only mode on every layer type: M = J J^T and .grad equal to the sequential mode's.

Generated over a table of layers (Linear with and without bias, on 3-D inputs, by either rule;
Conv1d/Conv2d with groups, stride, padding and dilation, Conv2d by either rule, a small VGG-like
trunk; Embedding with a padding index and repeated indices; LayerNorm, GroupNorm, BatchNorm;
MultiheadAttention batch-first or not, with and without bias, with kdim/vdim;
TransformerEncoderLayer; a child module whose parameters its parent uses functionally; a
recurrent normalization layer). Each case is checked for:

- the Gramian against J J^T of the float64 Jacobian formed by one autograd pass per task;
- ``.grad`` against the sequential mode's, for several methods;
- the rule each module got (``tracker.rules``), frozen parameters, and a NaN named by task.

Tolerances (``properties.gamma``): two float64 evaluations of the same n-term dot product
differ by at most 2 gamma_n sum_k |a_k b_k| <= 2 gamma_n |a| |b|; every quantity compared here
is such a sum (an entry of J J^T over d parameters, or of J^T c, whose per-layer pieces are
themselves dot products over the N positions of the layer's input), so n = d + N bounds the
length of the longest chain of additions in either evaluation, and |a| |b| is taken from the
reference Jacobian. A factor 4 covers the two roundings of the Jacobian entries themselves
(each a product of a few factors, as in the sequential mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from properties import gamma, manual_jacobian
from torch import nn
from torch.nn import functional as F  # noqa: N812 (the usual name)

import deconflict

TASKS = 3
BATCH = 6


class Functional(nn.Module):
    """A child Linear that is never called: the parent reads its parameters (as
    MultiheadAttention reads out_proj's). The parent owns no parameter, so nothing records a
    call around the use: the per-module fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 4)
        self.outer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(F.linear(x, self.inner.weight, self.inner.bias)))


class Recurrent(nn.Module):
    """A LayerNorm applied to a result of its own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.tanh(self.norm(self.mix(x))))


class Attention(nn.Module):
    """Self-attention (or cross-attention with kdim/vdim) between Linear layers."""

    def __init__(self, batch_first: bool, bias: bool, kdim: int | None = None,
                 vdim: int | None = None) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.query = nn.Linear(5, 8)
        self.key = nn.Linear(5, kdim or 8)
        self.value = nn.Linear(5, vdim or 8)
        self.attention = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first,
                                               kdim=kdim, vdim=vdim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: batch x 4 positions x 5
        q, k, v = self.query(x), self.key(x), self.value(x)
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out, _ = self.attention(q, k, v)
        return (out if self.batch_first else out.transpose(0, 1)).mean(dim=1)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0,
                                                batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.embed(x)).mean(dim=1)


class Lookup(nn.Module):
    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 4, padding_idx=0)
        self.mix = nn.Linear(4, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.tanh(self.embed(tokens)).mean(dim=1))


def sequential(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers, nn.Flatten())


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...] | None  # the input's shape (None: token indices)
    rules: dict[str, str]  # some modules and the rule they must get


def tokens() -> torch.Tensor:
    # Repeated indices and the padding index 0 in every sequence.
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 6, (BATCH, 5), generator=generator)
    ids[:, 0] = 0
    return ids


CASES: dict[str, Case] = {
    # Wide layers on few rows: the kernel rule (choose_linear_rule's counts).
    "linear": Case(lambda: sequential(nn.Linear(64, 32), nn.Tanh()), (BATCH, 64), {"0": "kernel"}),
    "linear-no-bias": Case(lambda: sequential(nn.Linear(64, 32, bias=False), nn.Tanh()),
                           (BATCH, 64), {"0": "kernel"}),
    "linear-3d-inplace": Case(lambda: sequential(nn.Linear(64, 32), nn.ReLU(inplace=True),
                                                 nn.Linear(32, 3)), (BATCH, 2, 64),
                              {"0": "kernel", "2": "jacobian"}),
    # Many rows through a narrow layer: the weight gradients cost less than the kernel.
    "linear-many-rows": Case(lambda: sequential(nn.Linear(3, 2), nn.Tanh()), (BATCH, 40, 3),
                             {"0": "jacobian"}),
    "conv1d": Case(lambda: sequential(nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
                                      nn.Tanh()), (BATCH, 4, 9), {"0": "jacobian"}),
    "conv2d": Case(lambda: sequential(nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1,
                                                dilation=(1, 2), groups=2), nn.Tanh()),
                   (BATCH, 4, 6, 6), {"0": "jacobian"}),
    # Many channels at low resolution: the kernel rule on the patches (choose_linear_rule's
    # counts with N L rows of C k_h k_w inputs); stride, padding and dilation per dimension.
    "conv2d-kernel": Case(lambda: sequential(nn.Conv2d(32, 16, 3, stride=2, padding=1),
                                             nn.Tanh()), (BATCH, 32, 4, 4), {"0": "kernel"}),
    "conv2d-kernel-dilated": Case(
        lambda: sequential(nn.Conv2d(32, 16, (3, 2), stride=(1, 2), padding=(1, 1),
                                     dilation=(2, 1), bias=False), nn.Tanh(),
                           nn.Conv2d(16, 32, (1, 2), padding="valid"), nn.Tanh()),
        (BATCH, 32, 3, 3), {"0": "kernel", "2": "kernel"}),
    # A small VGG-like trunk: the Jacobian rule at full resolution, the kernel rule after the
    # poolings.
    "cnn": Case(lambda: sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(8, 48, 3, padding=1), nn.Tanh()),
                (BATCH, 3, 8, 8), {"0": "jacobian", "3": "jacobian", "6": "kernel"}),
    # BATCH x 5 = 30 positions: the Delta rule holds less than the table's gradients for a
    # table of 40 rows, more for one of 10.
    "embedding": Case(lambda: Lookup(40), None, {"embed": "embedding", "mix": "jacobian"}),
    "embedding-short-vocabulary": Case(lambda: Lookup(10), None,
                                       {"embed": "jacobian", "mix": "jacobian"}),
    "layernorm": Case(lambda: sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh()),
                      (BATCH, 5), {"1": "jacobian"}),
    "groupnorm": Case(lambda: sequential(nn.Conv1d(4, 6, 3), nn.GroupNorm(3, 6), nn.Tanh()),
                      (BATCH, 4, 7), {"1": "jacobian"}),
    "batchnorm": Case(lambda: sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh()),
                      (BATCH, 5), {"1": "jacobian"}),
    "attention": Case(lambda: Attention(batch_first=True, bias=True), (BATCH, 4, 5),
                      {"attention": "jacobian"}),
    "attention-seq-first-no-bias": Case(lambda: Attention(batch_first=False, bias=False),
                                        (BATCH, 4, 5), {"attention": "jacobian"}),
    "attention-kdim-vdim": Case(lambda: Attention(batch_first=True, bias=True, kdim=6, vdim=3),
                                (BATCH, 4, 5), {"attention": "jacobian"}),
    "transformer-layer": Case(Encoder, (BATCH, 4, 5),
                              {"layer.self_attn": "jacobian", "layer.norm1": "jacobian"}),
    "functional-child": Case(Functional, (BATCH, 5),
                             {"inner": "fallback", "outer": "jacobian"}),
    "recurrent-norm": Case(Recurrent, (BATCH, 5), {"norm": "jacobian", "mix": "jacobian"}),
}
METHODS = ["upgrad", "mgda", "gradops", "pcgrad"]


def setup(name: str, seed: int = 0):
    case = CASES[name]
    torch.manual_seed(seed)
    trunk = case.build().double()
    generator = torch.Generator().manual_seed(seed + 1)
    x = tokens() if case.shape is None else torch.randn(*case.shape, generator=generator,
                                                        dtype=torch.float64)
    with torch.no_grad():
        width = trunk(x).shape[1]
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(TASKS)).double()
    targets = torch.randn(TASKS, BATCH, generator=generator, dtype=torch.float64)
    return trunk, heads, x, targets


def task_losses(trunk, heads, x, targets, nan_task: int | None = None):
    z = trunk(x)
    losses = [((head(z).squeeze(-1) - t) ** 2).mean() + (k + 1) * z.pow(2).mean()
              for k, (head, t) in enumerate(zip(heads, targets, strict=True))]
    if nan_task is not None:
        # A finite (zero) value whose gradient is inf * 0 = NaN at z[0, 0]: in the trunk.
        losses[nan_task] = losses[nan_task] + torch.sqrt(z[0, 0] * 0)
    return losses


def positions(trunk: nn.Module, x: torch.Tensor) -> int:
    """An upper bound on the rows N any layer's rule sums over (batch x positions)."""
    return x.numel() * 8


def trainable(trunk: nn.Module) -> list[torch.Tensor]:
    return [p for p in trunk.parameters() if p.requires_grad]


def gramian_bound(J: torch.Tensor, n: int) -> torch.Tensor:
    norms = J.norm(dim=1)
    return 4 * 2 * gamma(n) * torch.outer(norms, norms)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_the_gramian_is_that_of_the_jacobian(name, chunk_size):
    trunk, heads, x, targets = setup(name)
    tracker = deconflict.track(trunk)
    losses = task_losses(trunk, heads, x, targets)
    J = manual_jacobian(losses, trainable(trunk))
    record = deconflict.backward(losses, trunk, "upgrad", mode="gramian", chunk_size=chunk_size)
    bound = gramian_bound(J, J.shape[1] + positions(trunk, x))
    error = (record.gramian - J @ J.T).abs()
    assert (error <= bound).all(), (error.max(), bound.min())
    for module, rule in CASES[name].rules.items():
        assert tracker.rules.get(module) == rule, (module, tracker.rules)
    # The per-layer shares add up to M.
    total = sum(record.layer_gramians.values())
    assert ((total - record.gramian).abs() <= bound).all()


def run(name: str, mode: str, method: str, seed: int = 0):
    trunk, heads, x, targets = setup(name, seed)
    if mode == "gramian":
        deconflict.track(trunk)
    losses = task_losses(trunk, heads, x, targets)
    J = manual_jacobian(losses, trainable(trunk))
    record = deconflict.backward(losses, trunk, deconflict.get(method), mode=mode)
    shared = torch.cat([p.grad.reshape(-1) for p in trainable(trunk)])
    head = torch.cat([p.grad.reshape(-1) for p in heads.parameters()])
    return record, J, shared, head


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_grad_equals_the_sequential_modes(name, method):
    ours, J, shared, head = run(name, "gramian", method)
    reference, _, reference_shared, reference_head = run(name, "sequential", method)
    c, c_ref = ours.weights, reference.weights
    # The weights come from Gramians equal to rounding (above); the methods map them
    # continuously on these well-conditioned cases.
    torch.testing.assert_close(c, c_ref, rtol=1e-9, atol=1e-12)
    # .grad = J^T c: the write's own rounding (n-term sums of |c_i| |J_ik|) plus what the
    # difference of the weights moves it by.
    n = J.shape[1] + positions(None, setup(name)[2])
    allowed = (4 * 2 * gamma(n) * (c.abs() @ J.abs()) + (c - c_ref).abs() @ J.abs())
    assert ((shared - reference_shared).abs() <= allowed).all()
    assert ((shared - c @ J).abs() <= 4 * 2 * gamma(n) * (c.abs() @ J.abs())).all()
    torch.testing.assert_close(head, reference_head, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(CASES))
def test_frozen_parameters_are_skipped(name):
    """The first parameter of every module frozen: no .grad, and M over the others only."""
    trunk, heads, x, targets = setup(name)
    for module in trunk.modules():
        own = list(module.parameters(recurse=False))
        if own:
            own[0].requires_grad_(False)
    deconflict.track(trunk)
    losses = task_losses(trunk, heads, x, targets)
    params = trainable(trunk)
    if not params:
        # A layer with a single parameter (Linear without bias) is left with nothing to train:
        # the one case where a frozen trunk is an error, naming it.
        with pytest.raises(deconflict.InvalidOptionError, match="all 1 are frozen"):
            deconflict.backward(losses, trunk, "upgrad", mode="gramian")
        return
    J = manual_jacobian(losses, params)
    record = deconflict.backward(losses, trunk, "upgrad", mode="gramian")
    assert ((record.gramian - J @ J.T).abs()
            <= gramian_bound(J, J.shape[1] + positions(trunk, x))).all()
    for param in trunk.parameters():
        assert (param.grad is None) == (not param.requires_grad)


@pytest.mark.parametrize("name", list(CASES))
def test_a_nan_in_one_task_is_named(name):
    trunk, heads, x, targets = setup(name)
    deconflict.track(trunk)
    losses = task_losses(trunk, heads, x, targets, nan_task=TASKS - 1)
    with pytest.raises(deconflict.NonFiniteGradientError,
                       match=rf"gradient of loss {TASKS - 1} with respect to shared parameter"):
        deconflict.backward(losses, trunk, "upgrad", mode="gramian")
    assert all(p.grad is None for p in trunk.parameters())


def test_a_tied_weight_used_by_a_head_falls_back_for_that_module_only():
    trunk, heads, x, targets = setup("linear-3d-inplace")
    results = []
    for mode in ("sequential", "gramian"):
        trunk.zero_grad(set_to_none=True)
        tracker = deconflict.track(trunk) if mode == "gramian" else None
        losses = task_losses(trunk, heads, x, targets)
        losses[0] = losses[0] + trunk[2].weight.pow(2).sum()  # read outside its layer
        J = manual_jacobian(losses, trainable(trunk))
        record = deconflict.backward(losses, trunk, "upgrad", mode=mode)
        results.append((record, torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])))
    assert tracker is not None and tracker.rules == {"0": "kernel", "2": "fallback"}, tracker.rules
    (reference, reference_grad), (ours, grad) = results
    bound = gramian_bound(J, J.shape[1] + positions(trunk, x))
    assert ((ours.gramian - J @ J.T).abs() <= bound).all()
    c = ours.weights
    n = J.shape[1] + positions(trunk, x)
    allowed = 4 * 2 * gamma(n) * (c.abs() @ J.abs()) + (c - reference.weights).abs() @ J.abs()
    assert ((grad - reference_grad).abs() <= allowed).all()


def test_the_linear_rule_follows_the_operation_count():
    """Both rules are exercised by the cases above; the choice itself follows the counts."""
    from deconflict.layer_gramians import choose_linear_rule

    assert choose_linear_rule(256, 1792, 1792, 10, True) == "kernel"
    assert choose_linear_rule(4096, 64, 64, 3, True) == "jacobian"
    assert choose_linear_rule(10**5, 4096, 4096, 3, True) == "jacobian"  # K would not fit
    assert choose_linear_rule(10**5, 8, 8, 3, False) == "kernel"  # a bias alone: sums of Delta
