"""Engine modes: sequential, batched, Gramian-only and representation give the same update.

Gramian-only mode is checked against the Jacobian it never forms: its M equals J J^T, its .grad
equals the other modes', on networks with linear, convolution, layer-norm and embedding layers,
layers called twice, 3-D inputs with in-place activations, and parameters owned by a container.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from properties import manual_jacobian
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import deconflict
from deconflict.errors import InvalidOptionError

TASKS = 3
PARAMETER_MODES = [("sequential", None), ("batched", None), ("batched", 2), ("gramian", None),
                   ("gramian", 1)]


class Scaled(nn.Module):
    """A module with its own parameter and a child: the parameter's gradient is local."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.inner = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


class Trunk(nn.Module):
    """Embedding -> Conv1d -> LayerNorm -> Linear (3-D input, in-place ReLU) -> Scaled, with a
    Linear called twice on different inputs."""

    def __init__(self) -> None:
        super().__init__()
        # 48 rows for 6 x 7 = 42 positions looked up: the embedding rule holds less than the
        # table's per-task gradients (tracking._delta_rule), so the Delta rule is exercised.
        self.embed = nn.Embedding(48, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 5)
        self.scaled = Scaled(5)
        self.shared = nn.Linear(5, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = torch.tanh(self.norm(x))
        x = torch.relu_(self.mix(x))
        x = self.scaled(x)
        return self.shared(x[:, 0]) + self.shared(x.mean(dim=1))


def build(seed: int = 0, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    trunk = Trunk().to(dtype)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(TASKS)).to(dtype)
    tokens = torch.randint(0, 20, (6, 7))
    targets = torch.randn(TASKS, 6, dtype=dtype)
    return trunk, heads, tokens, targets


def losses_of(trunk, heads, tokens, targets):
    z = trunk(tokens)
    return z, [((head(z).squeeze(-1) - t) ** 2).mean() for head, t in zip(heads, targets,
                                                                           strict=True)]


def run(mode, chunk_size, method, dtype=torch.float64, seed=0):
    trunk, heads, tokens, targets = build(seed, dtype)
    if mode == "gramian":
        deconflict.track(trunk)
    _, losses = losses_of(trunk, heads, tokens, targets)
    record = deconflict.backward(losses, trunk, method, mode=mode, chunk_size=chunk_size)
    shared = torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])
    head = torch.cat([p.grad.reshape(-1) for p in heads.parameters()])
    return record, shared, head


@pytest.mark.parametrize(("mode", "chunk_size"), PARAMETER_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_mode_gives_the_jacobian_gramian_and_update(mode, chunk_size, seed):
    trunk, heads, tokens, targets = build(seed)
    _, losses = losses_of(trunk, heads, tokens, targets)
    J = manual_jacobian(losses, list(trunk.parameters()))
    method = deconflict.GradOPS(alpha=-1.0)
    record, shared, head = run(mode, chunk_size, method, seed=seed)
    assert record.mode == mode
    torch.testing.assert_close(record.gramian, J @ J.T, rtol=1e-12, atol=1e-14)
    expected = deconflict.GradOPS(alpha=-1.0).weights(J @ J.T) @ J
    torch.testing.assert_close(shared, expected, rtol=1e-11, atol=1e-13)
    _, reference_head = run("sequential", None, deconflict.GradOPS(alpha=-1.0), seed=seed)[1:]
    torch.testing.assert_close(head, reference_head, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("mode", "chunk_size"), PARAMETER_MODES)
@pytest.mark.parametrize("name", ["upgrad", "mgda", "imtl_g", "cagrad", "nash_mtl", "sum"])
def test_float32_modes_agree_to_float32_precision(mode, chunk_size, name):
    _, reference, reference_head = run("sequential", None, deconflict.get(name), torch.float32)
    record, shared, head = run(mode, chunk_size, deconflict.get(name), torch.float32)
    assert record.mode == (mode if name != "sum" else "losses")
    torch.testing.assert_close(shared, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head, reference_head, rtol=1e-4, atol=1e-6)


def test_auto_mode_uses_the_tracker_when_the_method_needs_only_the_gramian():
    trunk, heads, tokens, targets = build()
    deconflict.track(trunk)
    _, losses = losses_of(trunk, heads, tokens, targets)
    assert deconflict.backward(losses, trunk, "upgrad").mode == "gramian"
    _, losses = losses_of(trunk, heads, tokens, targets)
    # Per-layer GradVac combines each layer with its own weights: it falls back to sequential.
    per_layer = deconflict.get("gradvac", granularity="layer")
    assert deconflict.backward(losses, trunk, per_layer).mode == "sequential"
    untracked, heads, tokens, targets = build()
    _, losses = losses_of(untracked, heads, tokens, targets)
    assert deconflict.backward(losses, untracked, "upgrad").mode == "sequential"


def test_representation_mode_with_batched_feature_gradients():
    results = []
    for chunk in (1, None):
        trunk, heads, tokens, targets = build()
        z, losses = losses_of(trunk, heads, tokens, targets)
        record = deconflict.backward(losses, trunk, "mgda_ub", features=z,
                                     mode="batched" if chunk is None else "sequential")
        assert record.features
        results.append(torch.cat([p.grad.reshape(-1) for p in trunk.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_gramian_mode_never_forms_per_task_weight_gradients():
    """No tensor as large as T x (the widest layer's weight) exists during the backward pass."""
    torch.manual_seed(0)
    tasks = 4
    trunk = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(tasks))
    deconflict.track(trunk)
    x, y = torch.randn(8, 64), torch.randn(tasks, 8)
    z = trunk(x)
    losses = [((h(z).squeeze(-1) - t) ** 2).mean() for h, t in zip(heads, y, strict=True)]
    with _LargestTensor() as probe:
        deconflict.backward(losses, trunk, "upgrad", mode="gramian")
    weight = 256 * 256
    assert probe.largest <= weight  # the final backward's own gradient, nothing T times larger
    # The batched mode, by contrast, forms the T x d Jacobian (the probe sees it).
    z = trunk(x)
    losses = [((h(z).squeeze(-1) - t) ** 2).mean() for h, t in zip(heads, y, strict=True)]
    with _LargestTensor() as probe:
        deconflict.backward(losses, trunk, "upgrad", mode="batched")
    assert probe.largest >= tasks * weight


def test_near_collinear_gradients_every_mode_within_1e4_of_float64():
    """Pairwise cosine 1 - 1e-5 between two tasks, d = 1e5 float32: every mode within 1e-4."""
    d_side = 316  # a 316 x 316 weight: d = 99,856
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(d_side, generator=generator, dtype=torch.float64)
    base /= base.norm()
    noise = torch.randn(2, d_side, generator=generator, dtype=torch.float64)
    noise -= (noise @ base)[:, None] * base
    noise /= noise.norm(dim=1, keepdim=True)
    angle = (2e-5) ** 0.5  # 1 - cos(angle) = 1e-5
    v = torch.stack([base, torch.cos(torch.tensor(angle)) * base
                     + torch.sin(torch.tensor(angle)) * noise[0],
                     -0.7 * base + 0.5 * noise[1]]).float()
    x = torch.randn(4, d_side, generator=generator).float()
    cos = torch.nn.functional.cosine_similarity(v[0:1].double(), v[1:2].double()).item()
    assert abs(cos - (1 - 1e-5)) < 1e-7
    # L_i = mean_b v_i . (W x_b): g_i = v_i xbar^T, so cos(g_i, g_j) = cos(v_i, v_j).
    xbar = x.double().mean(dim=0)
    J = torch.stack([torch.outer(row, xbar).reshape(-1) for row in v.double()])
    method = deconflict.GradOPS(alpha=-1.0)
    reference = method.weights(J @ J.T) @ J
    assert method.weights_with_diagnostics(J @ J.T)[1]["projected"].all()

    for mode in ("sequential", "batched", "gramian", "features"):
        layer = nn.Linear(d_side, d_side, bias=False)
        nn.init.normal_(layer.weight, std=0.01)
        if mode == "gramian":
            deconflict.track(layer)
        z = layer(x)
        losses = [(z @ row).mean() for row in v]
        if mode == "features":
            deconflict.backward(losses, layer, method, features=z)
        else:
            deconflict.backward(losses, layer, method, mode=mode)
        update = layer.weight.grad.reshape(-1).double()
        error = float((update - reference).norm() / reference.norm())
        assert error < 1e-4, (mode, error)


# ------------------------------------------------------------------------------- Gramian errors
def test_gramian_mode_needs_a_tracked_module():
    trunk, heads, tokens, targets = build()
    _, losses = losses_of(trunk, heads, tokens, targets)
    with pytest.raises(InvalidOptionError, match=r"deconflict\.track"):
        deconflict.backward(losses, trunk, "upgrad", mode="gramian")
    with pytest.raises(InvalidOptionError, match=r"deconflict\.track"):
        deconflict.backward(losses, list(trunk.parameters()), "upgrad", mode="gramian")


def test_gramian_mode_rejects_methods_that_need_more_than_the_gramian():
    trunk, heads, tokens, targets = build()
    deconflict.track(trunk)
    _, losses = losses_of(trunk, heads, tokens, targets)
    for method in (deconflict.get("gradvac", granularity="layer"), deconflict.get("graddrop")):
        with pytest.raises(InvalidOptionError, match="more than the Gramian"):
            deconflict.backward(losses, trunk, method, mode="gramian", retain_graph=True)


def test_gramian_mode_falls_back_for_a_tied_weight_used_by_a_head():
    """The shared weight read outside its layer: that module's per-task gradients are taken
    directly (the fallback), the rest of the trunk keeps its rules; M is still J J^T."""
    trunk, _, tokens, targets = build()
    tracker = deconflict.track(trunk)
    z = trunk(tokens)
    losses = [(z.sum(dim=1) - t).pow(2).mean() for t in targets]
    losses[0] = losses[0] + trunk.shared.weight.sum()  # the shared weight used outside its layer
    J = manual_jacobian(losses, list(trunk.parameters()))
    record = deconflict.backward(losses, trunk, "upgrad", mode="gramian")
    assert tracker.rules["shared"] == "fallback"
    assert tracker.rules["embed"] == "embedding"
    torch.testing.assert_close(record.gramian, J @ J.T, rtol=1e-12, atol=1e-14)


def test_gramian_mode_is_exact_for_a_recurrent_generic_layer():
    """A LayerNorm applied to its own output: the Jacobian rule differentiates its parameters
    directly, so both uses are counted once."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(4).double()
    trunk = nn.ModuleDict({"norm": norm})
    deconflict.track(trunk)
    x = torch.randn(5, 4, dtype=torch.float64)
    z = norm(torch.tanh(norm(x)))
    losses = [z[:, 0].mean(), (z[:, 1] ** 2).mean()]
    J = manual_jacobian(losses, list(trunk.parameters()))
    record = deconflict.backward(losses, trunk, "upgrad", mode="gramian")
    torch.testing.assert_close(record.gramian, J @ J.T, rtol=1e-12, atol=1e-14)


def test_gramian_mode_refuses_an_input_modified_in_place():
    layer = nn.Linear(3, 2)
    deconflict.track(layer)
    x = torch.randn(4, 3)
    z = layer(x)
    losses = [z[:, 0].sum(), z[:, 1].sum()]
    x.mul_(2.0)
    with pytest.raises(InvalidOptionError, match="modified in place"):
        deconflict.backward(losses, layer, "upgrad", mode="gramian")


def test_recurrent_linear_layers_are_exact():
    """A Linear applied to its own output: its inputs and Delta cover both uses."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4).double()
    results = []
    for mode in ("sequential", "gramian"):
        layer.zero_grad(set_to_none=True)
        if mode == "gramian":
            deconflict.track(layer)
        x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        z = layer(torch.tanh(layer(x)))
        losses = [z[:, 0].mean(), (z[:, 1] ** 2).mean(), z[:, 2:].sum()]
        record = deconflict.backward(losses, layer, "upgrad", mode=mode)
        results.append((record.gramian, layer.weight.grad.clone(), layer.bias.grad.clone()))
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------ tracker
def test_tracker_records_only_differentiable_forward_passes_and_is_cleared():
    trunk, heads, tokens, targets = build()
    tracker = deconflict.track(trunk)
    assert deconflict.track(trunk) is tracker
    with torch.no_grad():
        trunk(tokens)
    assert tracker.calls == []
    _, losses = losses_of(trunk, heads, tokens, targets)
    # embed, conv, norm, mix, scaled.inner, scaled, shared twice
    assert len(tracker.calls) == 8
    deconflict.backward(losses, trunk, "upgrad", mode="gramian")
    assert tracker.calls == []
    tracker.remove()
    _, losses = losses_of(trunk, heads, tokens, targets)
    assert tracker.calls == []
    with pytest.raises(InvalidOptionError, match=r"deconflict\.track"):
        deconflict.backward(losses, trunk, "upgrad", mode="gramian")


def test_tracked_is_a_property_of_the_trunk_not_of_the_process():
    """auto mode reads the trunk it is given: tracking another module, or copying a tracked
    one, changes nothing for it; remove() untracks."""
    torch.manual_seed(0)
    tracked, other = nn.Linear(3, 4), nn.Linear(3, 4)
    tracker = deconflict.track(tracked)
    assert deconflict.tracker_of(tracked) is tracker and deconflict.tracker_of(other) is None
    duplicate = copy.deepcopy(tracked)
    assert deconflict.tracker_of(duplicate) is None
    assert deconflict.tracker_of(list(tracked.parameters())) is None
    x = torch.randn(6, 3)
    modes = []
    for module in (tracked, other, duplicate):
        z = module(x)
        record = deconflict.backward([z[:, 0].mean(), z[:, 1].pow(2).mean()], module, "upgrad")
        modes.append(record.mode)
    assert modes == ["gramian", "sequential", "sequential"]
    tracker.clear()  # the duplicate's hooks recorded into the original tracker
    tracker.remove()
    assert deconflict.tracker_of(tracked) is None
    z = tracked(x)
    record = deconflict.backward([z[:, 0].mean(), z[:, 1].pow(2).mean()], tracked, "upgrad")
    assert record.mode == "sequential" and tracker.calls == []
    assert deconflict.track(tracked) is not tracker  # tracking again makes a new tracker


def test_a_step_consumes_the_records_of_a_tracked_trunk_in_every_mode():
    """Records would otherwise keep each forward pass's graph alive."""
    layer = nn.Linear(3, 2)
    tracker = deconflict.track(layer)
    for method, mode in [("graddrop", "auto"), ("upgrad", "sequential"), ("mean", "auto")]:
        z = layer(torch.randn(4, 3))
        deconflict.backward([z[:, 0].sum(), z[:, 1].sum()], layer, method, mode=mode)
        assert tracker.calls == [], (method, mode)


def test_tracker_warns_when_forward_passes_pile_up():
    layer = nn.Linear(2, 2)
    tracker = deconflict.track(layer)
    def forward_passes(count: int) -> None:
        for _ in range(count):
            layer(torch.randn(1, 2))

    with pytest.warns(RuntimeWarning, match="forward passes of the trunk"):
        forward_passes(40)
    tracker.clear()
    assert tracker.calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(1, 2))


def test_bad_mode_and_chunk_size_are_named():
    trunk, heads, tokens, targets = build()
    _, losses = losses_of(trunk, heads, tokens, targets)
    with pytest.raises(InvalidOptionError, match="mode must be one of"):
        deconflict.backward(losses, trunk, "upgrad", mode="vectorized")
    with pytest.raises(InvalidOptionError, match="chunk_size must be a positive integer"):
        deconflict.backward(losses, trunk, "upgrad", mode="batched", chunk_size=0)
    with pytest.raises(InvalidOptionError, match="chunk_size applies"):
        deconflict.backward(losses, trunk, "upgrad", mode="sequential", chunk_size=2)
