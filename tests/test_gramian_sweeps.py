"""Gramian-only mode swept in groups of layers (``tracking.sweep_groups``): the same M and .grad.

In Gramian mode, when the rules' data (R x their parameters or layer outputs) would exceed an
estimate of the plain step's memory, the rows are swept once per group of rules (at most S:
``DEFAULT_MAX_SWEEPS`` for mode="gramian", 1 for mode="auto", or the ``max_sweeps`` of
``track(trunk, max_sweeps=S)``), each group's share of M is
formed and its data dropped, and ``.grad`` comes from one weighted backward pass. The tests
force the sweeps (``SWEEP_BUDGET`` tiny, ``SWEEP_MINIMUM`` 0: as many groups as
``max_sweeps`` = 4 allows) and check,
on a small CNN (convolution, batch norm, pooling), a Transformer encoder (an embedding and two
``TransformerEncoderLayer``), an MLP and a model with a skip connection across layers:

- M against J J^T of the float64 Jacobian, swept and unswept;
- ``.grad`` against the sequential mode's, and the heads' gradient;
- the grouping (contiguous in depth, every rule once), the number of sweeps each mode takes,
  the option's validation, a NaN in a
  lower group's gradient named by task with ``.grad`` unchanged, frozen parameters,
  ``retain_graph``, loss scaling.

Tolerances as in ``test_gramian_layers`` (``properties.gamma``): every compared quantity is a
dot product or a sum over at most n = d + (the positions any layer sums over) terms, so two
float64 evaluations differ by at most 2 gamma_n |a| |b|, with a factor 4 for the roundings of
the Jacobian entries; the float32 case uses float32's gamma on the same lengths.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from properties import gamma, manual_jacobian
from torch import nn

import deconflict
from deconflict import tracking

TASKS = 3
BATCH = 6
SWEEPS = 4


class Skip(nn.Module):
    """A residual connection across two layers: the sum needs both paths, so no single edge
    between ``middle`` and ``lower`` carries every path from the losses to ``inner``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 8)
        self.lower = nn.Linear(8, 8)
        self.middle = nn.Linear(8, 8)
        self.outer = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x)
        return self.outer(torch.tanh(self.middle(torch.tanh(self.lower(z)))) + z)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        # The keys' bias cannot change the softmax: its gradient is zero up to rounding noise,
        # which no bound relative to the computed Jacobian covers. Frozen (as the bias before
        # the CNN's batch norm is left out).
        for block in self.encoder.layers:
            block.self_attn.in_proj_bias.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(tokens)).mean(dim=1)


class CNN(nn.Module):
    """Conv, batch norm, pooling; ``low`` keeps the first layer's output (for a NaN there)."""

    def __init__(self) -> None:
        super().__init__()
        # No bias before the batch norm: its gradient would be zero up to rounding noise, which
        # no bound relative to the computed Jacobian covers.
        self.first = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(4)
        self.rest = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 32, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 16, 3, padding=1),
                                  nn.Tanh(), nn.Flatten())
        self.low = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.low = self.first(x)
        return self.rest(self.norm(self.low))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...] | None]] = {
    "cnn": (CNN, (BATCH, 3, 8, 8)),
    "transformer": (Encoder, None),
    "mlp": (mlp, (BATCH, 64)),
    "skip": (Skip, (BATCH, 5)),
}


def setup(name: str, dtype: torch.dtype = torch.float64):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    trunk = build().to(dtype)
    generator = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 20, (BATCH, 5), generator=generator) if shape is None
         else torch.randn(*shape, generator=generator, dtype=dtype))
    with torch.no_grad():
        width = trunk(x).shape[1]
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(TASKS)).to(dtype)
    targets = torch.randn(TASKS, BATCH, generator=generator, dtype=dtype)
    return trunk, heads, x, targets


def task_losses(trunk, heads, x, targets):
    z = trunk(x)
    return [((head(z).squeeze(-1) - t) ** 2).mean() + (k + 1) * z.pow(2).mean()
            for k, (head, t) in enumerate(zip(heads, targets, strict=True))]


def positions(x: torch.Tensor) -> int:
    """An upper bound on the rows N any layer's rule sums over (batch x positions)."""
    return x.numel() * 8


def force_sweeps(monkeypatch) -> list[int]:
    """Force the sweeps from now on; the list collects the number of groups of every step."""
    counts: list[int] = []
    original = tracking.sweep_groups

    def spy(*args):
        groups = original(*args)
        counts.append(len(groups))
        return groups

    monkeypatch.setattr(tracking, "SWEEP_BUDGET", 1e-12)
    monkeypatch.setattr(tracking, "SWEEP_MINIMUM", 0)
    monkeypatch.setattr(tracking, "sweep_groups", spy)
    return counts


@pytest.fixture
def sweeps(monkeypatch):
    """Sweeps forced for the whole test (``force_sweeps``)."""
    return force_sweeps(monkeypatch)


def step(name: str, mode: str, method: str = "upgrad", dtype: torch.dtype = torch.float64,
         **options):
    trunk, heads, x, targets = setup(name, dtype)
    if mode == "gramian":
        deconflict.track(trunk, max_sweeps=SWEEPS)
    losses = task_losses(trunk, heads, x, targets)
    params = [p for p in trunk.parameters() if p.requires_grad]
    J = manual_jacobian(losses, params)
    record = deconflict.backward(losses, trunk, method, mode=mode, **options)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    head = torch.cat([p.grad.reshape(-1) for p in heads.parameters()])
    return record, J, grads, head, x


@pytest.mark.parametrize("method", ["upgrad", "mgda"])
@pytest.mark.parametrize("name", list(MODELS))
def test_swept_equals_unswept_and_sequential(name, method, sweeps):
    ours, J, grad, head, x = step(name, "gramian", method)
    assert sweeps and sweeps[0] > 1
    reference, _, reference_grad, reference_head, _ = step(name, "sequential", method)
    n = J.shape[1] + positions(x)
    norms = J.norm(dim=1)
    bound = 4 * 2 * gamma(n) * torch.outer(norms, norms)
    assert ((ours.gramian - J @ J.T).abs() <= bound).all()
    c, c_ref = ours.weights, reference.weights
    torch.testing.assert_close(c, c_ref, rtol=1e-9, atol=1e-12)
    allowed = 4 * 2 * gamma(n) * (c.abs() @ J.abs()) + (c - c_ref).abs() @ J.abs()
    assert ((grad - reference_grad).abs() <= allowed).all()
    assert ((grad - c @ J).abs() <= 4 * 2 * gamma(n) * (c.abs() @ J.abs())).all()
    torch.testing.assert_close(head, reference_head, rtol=1e-12, atol=1e-14)


def grouped(name: str):
    """The tracker, losses, rules and sweep groups of a tracked model's forward pass."""
    trunk, heads, x, targets = setup(name)
    tracker = deconflict.track(trunk, max_sweeps=SWEEPS)
    losses = task_losses(trunk, heads, x, targets)
    reached = [p for p in trunk.parameters() if p.requires_grad]
    shared = [(n, p, n) for n, p in trunk.named_parameters()]
    rules, _ = tracking._rules(tracker, losses, shared, reached, TASKS)
    groups = tracking.sweep_groups(tracker, rules, reached, TASKS, SWEEPS)
    return tracker, losses, rules, groups


def without_cuts(monkeypatch) -> None:
    """Every sweep starts from the rows (``graph_cuts`` finds none)."""
    monkeypatch.setattr(tracking, "graph_cuts",
                        lambda tracker, rows, groups, budget: [None] * len(groups))


def with_cuts(monkeypatch) -> None:
    """Cuts wherever the graph has one, whatever their size: ``force_sweeps`` leaves no room for
    any in the budget."""
    original = tracking.graph_cuts
    monkeypatch.setattr(tracking, "graph_cuts",
                        lambda tracker, rows, groups, budget: original(tracker, rows, groups,
                                                                       math.inf))


def set_cuts(monkeypatch, cuts: bool) -> None:
    (with_cuts if cuts else without_cuts)(monkeypatch)


@pytest.mark.parametrize(("cuts", "chunk_size"), [(True, None), (False, None), (True, 2)])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_sweeps_run_and_match_the_single_sweep(name, cuts, chunk_size, monkeypatch):
    """With cuts or without, one row per pass or two (the passes from a cut then start from
    a stack of the rows' gradients there)."""
    single, J, grad, _, x = step(name, "gramian")
    counts = force_sweeps(monkeypatch)
    set_cuts(monkeypatch, cuts)
    swept, _, swept_grad, _, _ = step(name, "gramian", chunk_size=chunk_size)
    assert counts and counts[0] > 1
    n = J.shape[1] + positions(x)
    norms = J.norm(dim=1)
    assert ((swept.gramian - single.gramian).abs()
            <= 4 * 2 * gamma(n) * torch.outer(norms, norms)).all()
    c = single.weights
    torch.testing.assert_close(swept.weights, c, rtol=1e-9, atol=1e-12)
    allowed = 4 * 2 * gamma(n) * (c.abs() @ J.abs()) + (swept.weights - c).abs() @ J.abs()
    assert ((swept_grad - grad).abs() <= allowed).all()


class _Count(torch.autograd.Function):
    """The identity, counting its backward passes in ``counts[index]``."""

    @staticmethod
    def forward(ctx, x, counts, index):
        ctx.counts, ctx.index = counts, index
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.counts[ctx.index] += 1
        return grad, None, None


class Counted(nn.Module):
    """Three Linear layers, each followed by tanh and a counter of the passes through it."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.counts = [0, 0, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = _Count.apply(torch.tanh(layer(x)), self.counts, index)
        return x


@pytest.mark.parametrize("cuts", [True, False])
def test_with_cuts_the_sweeps_pass_through_each_layer_once_per_row(cuts, sweeps, monkeypatch):
    """Three groups, one layer each. With cuts between them, each layer's backward runs once per
    row and once for the weighted update pass, as in a single sweep; without, each sweep passes
    again through the layers above its group (the counter above layer k, from k = 0 at the bottom:
    (k + 1) R + 1)."""
    set_cuts(monkeypatch, cuts)
    torch.manual_seed(0)
    trunk = Counted().double()
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(TASKS)).double()
    x = torch.randn(BATCH, 8, dtype=torch.float64)
    deconflict.track(trunk, max_sweeps=3)
    z = trunk(x)
    losses = [(head(z) ** 2).mean() + (k + 1) * z.pow(2).mean() for k, head in enumerate(heads)]
    params = list(trunk.parameters())
    J = manual_jacobian(losses, params)
    trunk.counts[:] = [0, 0, 0]  # manual_jacobian's own passes
    record = deconflict.backward(losses, trunk, "upgrad", mode="gramian")
    assert sweeps == [3]
    expected = [TASKS + 1] * 3 if cuts else [TASKS + 1, 2 * TASKS + 1, 3 * TASKS + 1]
    assert trunk.counts == expected
    norms = J.norm(dim=1)
    n = J.shape[1] + positions(x)
    assert ((record.gramian - J @ J.T).abs() <= 4 * 2 * gamma(n) * torch.outer(norms, norms)).all()


def test_no_cut_across_a_skip_connection(sweeps):
    """skip: outer(tanh(middle(tanh(lower(z)))) + z), z = inner(x), one layer per group. Each
    group's passes can start from a cut every path to its own layer crosses: middle's from its
    output, lower's from middle's input. inner's would start from a cut below that one, but z
    reaches the sum directly, so its gradient is not that of middle's input pulled back: no
    cut there, inner's passes start from the rows."""
    tracker, losses, _rules, groups = grouped("skip")
    assert [[rule.name for rule in group] for group in groups] == [["outer"], ["middle"],
                                                                    ["lower"], ["inner"]]
    cuts = tracking.graph_cuts(tracker, losses, groups, math.inf)
    assert [cut is not None for cut in cuts] == [True, True, False, False]
    tracker.remove()


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_a_sequential_trunk_has_a_cut_between_every_two_groups(name, sweeps):
    tracker, losses, _rules, groups = grouped(name)
    assert len(groups) > 1
    cuts = tracking.graph_cuts(tracker, losses, groups, math.inf)
    assert all(cut is not None for cut in cuts[:-1]) and cuts[-1] is None
    tracker.remove()


def test_a_cut_is_used_only_where_its_gradients_fit_the_budget(sweeps):
    """The rows' gradients at the cut (R x its elements) must fit in the budget beside the data
    of the two groups it joins; one element less and the lower group starts from the rows."""
    tracker, losses, _rules, groups = grouped("mlp")
    assert len(groups) == 2
    cut = tracking.graph_cuts(tracker, losses, groups, math.inf)[0]
    # The MLP's cut: the 32-wide tanh between its two Linear layers, BATCH rows.
    assert type(cut.node).__name__ == "TanhBackward0"
    data = max(TASKS * sum(rule.held for rule in group) for group in groups)
    needed = data + TASKS * BATCH * 32
    assert tracking.graph_cuts(tracker, losses, groups, needed)[0] is not None
    assert tracking.graph_cuts(tracker, losses, groups, needed - 1) == [None, None]
    tracker.remove()


def test_float32_cnn_swept_matches_sequential(sweeps):
    ours, J, grad, _, x = step("cnn", "gramian", dtype=torch.float32)
    assert sweeps[0] > 1
    reference, _, reference_grad, _, _ = step("cnn", "sequential", dtype=torch.float32)
    n = J.shape[1] + positions(x)
    c = reference.weights
    J64 = J.double()
    # float32 gradients on both sides (the weighted pass, autograd's per-task gradients
    # combined in float64): each within the float32 rounding of the sums J^T c, plus what the
    # (float64) difference of the weights moves it by.
    allowed = 4 * 2 * gamma(n, torch.float32) * (c.abs() @ J64.abs()) \
        + (ours.weights - c).abs() @ J64.abs()
    assert ((grad.double() - reference_grad.double()).abs() <= allowed).all()


def test_groups_are_contiguous_in_depth_and_cover_every_rule(sweeps):
    tracker, _losses, rules, groups = grouped("transformer")
    assert len(groups) == min(SWEEPS, len(rules))
    assert sorted(id(r) for g in groups for r in g) == sorted(id(r) for r in rules)
    last = {call.name: k for k, call in enumerate(tracker.calls)}
    # The embedding (the first call) is in the last group, the last layer's feed-forward in
    # the first: the groups go down from the losses.
    assert any(rule.name == "embed" for rule in groups[-1])
    assert any(rule.name == "encoder.layers.1.linear2" for rule in groups[0])
    depths = [[last.get(rule.name, -1) for rule in group if rule.name in last]
              for group in groups]
    for upper, lower in itertools.pairwise(depths):
        if upper and lower:
            assert min(upper) >= max(lower)
    tracker.remove()


@pytest.mark.parametrize("max_sweeps", [1, SWEEPS])
def test_one_sweep_for_small_data(max_sweeps):
    """One sweep where the rules hold < ``SWEEP_MINIMUM`` elements, whatever the option."""
    for name in MODELS:
        trunk, heads, x, targets = setup(name)
        tracker = deconflict.track(trunk)
        losses = task_losses(trunk, heads, x, targets)
        reached = [p for p in trunk.parameters() if p.requires_grad]
        shared = [(n, p, n) for n, p in trunk.named_parameters()]
        rules, _ = tracking._rules(tracker, losses, shared, reached, TASKS)
        assert len(tracking.sweep_groups(tracker, rules, reached, TASKS, max_sweeps)) == 1
        tracker.remove()


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_mode_gramian_sweeps_by_default_and_auto_does_not(name, monkeypatch):
    """Where the rules' data exceeds the budget: mode="gramian" sweeps in up to
    ``DEFAULT_MAX_SWEEPS`` groups (the lean mode), mode="auto" once (the fast choice); a
    tracker's ``max_sweeps`` applies to both. Every variant gives the same weights."""
    counts = force_sweeps(monkeypatch)
    weights = []
    for max_sweeps, mode, expected in [(None, "gramian", tracking.DEFAULT_MAX_SWEEPS),
                                       (None, "auto", 1), (1, "gramian", 1), (2, "auto", 2)]:
        trunk, heads, x, targets = setup(name)
        deconflict.track(trunk, max_sweeps=max_sweeps)
        record = deconflict.backward(task_losses(trunk, heads, x, targets), trunk, "upgrad",
                                     mode=mode)
        assert record.mode == "gramian"
        rules = len(deconflict.tracker_of(trunk).rules)
        assert counts.pop() == min(expected, rules), (max_sweeps, mode)
        weights.append(record.weights)
        deconflict.tracker_of(trunk).remove()
    for other in weights[1:]:
        torch.testing.assert_close(other, weights[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cuts", [True, False])
def test_a_nan_in_a_lower_group_is_named_and_grad_is_unchanged(cuts, sweeps, monkeypatch):
    set_cuts(monkeypatch, cuts)
    trunk, heads, x, targets = setup("cnn")
    deconflict.track(trunk, max_sweeps=SWEEPS)
    for p in trunk.parameters():
        p.grad = torch.full_like(p, 0.5)
    losses = task_losses(trunk, heads, x, targets)
    # A zero value whose gradient is inf * 0 = NaN at the first layer's output only: the
    # first layer's parameters (the deepest group) get NaN, the upper layers stay finite.
    losses[1] = losses[1] + torch.sqrt(trunk.low[0, 0, 0, 0] * 0)
    with pytest.raises(deconflict.NonFiniteGradientError,
                       match=r"gradient of loss 1 with respect to shared parameter first\."):
        deconflict.backward(losses, trunk, "upgrad", mode="gramian")
    assert sweeps[0] > 1
    assert all(bool((p.grad == 0.5).all()) for p in trunk.parameters())
    assert all(p.grad is None for p in heads.parameters())


def test_frozen_parameters_get_no_grad(sweeps):
    results = []
    for mode in ("gramian", "sequential"):
        trunk, heads, x, targets = setup("transformer")
        trunk.encoder.layers[0].linear1.weight.requires_grad_(False)
        trunk.embed.weight.requires_grad_(False)
        if mode == "gramian":
            deconflict.track(trunk, max_sweeps=SWEEPS)
        losses = task_losses(trunk, heads, x, targets)
        params = [p for p in trunk.parameters() if p.requires_grad]
        J = manual_jacobian(losses, params)
        record = deconflict.backward(losses, trunk, "upgrad", mode=mode)
        assert trunk.embed.weight.grad is None
        assert trunk.encoder.layers[0].linear1.weight.grad is None
        results.append((record, torch.cat([p.grad.reshape(-1) for p in params])))
    assert sweeps[0] > 1
    (ours, grad), (reference, reference_grad) = results
    n = J.shape[1] + positions(x)
    c = reference.weights
    allowed = 4 * 2 * gamma(n) * (c.abs() @ J.abs()) + (ours.weights - c).abs() @ J.abs()
    assert ((grad - reference_grad).abs() <= allowed).all()


@pytest.mark.parametrize("method", ["upgrad", "mgda"])
def test_retain_graph_keeps_the_graph_for_another_backward(method, sweeps):
    trunk, heads, x, targets = setup("skip")
    deconflict.track(trunk, max_sweeps=SWEEPS)
    losses = task_losses(trunk, heads, x, targets)
    deconflict.backward(losses, trunk, method, mode="gramian", retain_graph=True)
    first = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    # The tracker's records were consumed; the second step differentiates the same graph.
    deconflict.backward(losses, trunk, method, mode="sequential")
    for a, p in zip(first, trunk.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cuts", [True, False])
def test_loss_scaling_gives_the_scaled_update(cuts, sweeps, monkeypatch):
    """With a GradScaler (scale s = 16): the method sees the unscaled Gramian, .grad is s J^T c."""
    set_cuts(monkeypatch, cuts)
    results = []
    for mode in ("gramian", "sequential"):
        trunk, heads, x, targets = setup("cnn")
        if mode == "gramian":
            deconflict.track(trunk, max_sweeps=SWEEPS)
        losses = task_losses(trunk, heads, x, targets)
        J = manual_jacobian(losses, list(trunk.parameters()))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        record = deconflict.backward(losses, trunk, "upgrad", mode=mode, scaler=scaler)
        assert not record.skipped
        results.append((record, torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])))
    assert sweeps[0] > 1
    (ours, grad), (reference, reference_grad) = results
    n = J.shape[1] + positions(x)
    norms = J.norm(dim=1)
    assert ((ours.gramian - J @ J.T).abs() <= 4 * 2 * gamma(n) * torch.outer(norms, norms)).all()
    c = reference.weights
    # Scaling by a power of two is exact: the unscaled bounds, times s.
    allowed = 16 * (4 * 2 * gamma(n) * (c.abs() @ J.abs()) + (ours.weights - c).abs() @ J.abs())
    assert ((grad - reference_grad).abs() <= allowed).all()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_max_sweeps_is_validated(bad):
    trunk = mlp()
    if bad is None:  # None keeps the current value (None, the mode's default, when new)
        assert deconflict.track(trunk, max_sweeps=bad).max_sweeps is None
        deconflict.tracker_of(trunk).remove()
        return
    with pytest.raises(deconflict.InvalidOptionError, match="max_sweeps must be"):
        deconflict.track(trunk, max_sweeps=bad)
    assert deconflict.tracker_of(trunk) is None


def test_max_sweeps_of_a_tracked_trunk_can_be_changed():
    trunk = mlp()
    tracker = deconflict.track(trunk)
    assert tracker.max_sweeps is None
    assert deconflict.track(trunk, max_sweeps=3) is tracker and tracker.max_sweeps == 3
    assert deconflict.track(trunk) is tracker and tracker.max_sweeps == 3
    tracker.remove()
