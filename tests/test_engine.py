"""deconflict.backward on small networks: .grad equals J^T c by hand, heads, representation mode,
bad input, and checkpoint/resume inside a training loop."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from properties import manual_jacobian
from torch import nn

import deconflict
from deconflict.methods.base import LossWeighting

TASKS = 3


class Net(nn.Module):
    def __init__(self, tasks: int = TASKS) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


def make(seed: int = 0, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    net = Net().to(dtype)
    x = torch.randn(16, 5, dtype=dtype)
    y = torch.randn(16, TASKS, dtype=dtype)
    return net, x, y


def task_losses(net: Net, x: torch.Tensor, y: torch.Tensor):
    z, outputs = net(x)
    return z, [((out - y[:, t]) ** 2).mean() for t, out in enumerate(outputs)]


def grads_of(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


@pytest.mark.parametrize("name", ["gradops", "pcgrad", "mgda", "cagrad", "imtl_g", "sum", "mean"])
def test_shared_grad_is_j_transpose_c_and_heads_get_their_own(name):
    net, x, y = make()
    shared = list(net.trunk.parameters())
    heads = list(net.heads.parameters())
    _, losses = task_losses(net, x, y)
    J = manual_jacobian(losses, shared)
    method = deconflict.get(name, **({"seed": 0} if name == "pcgrad" else {}))
    expected_c = deconflict.get(name, **({"seed": 0} if name == "pcgrad" else {})).weights(
        J @ J.T, losses=torch.stack(losses).detach())
    head_expected = torch.autograd.grad(
        sum((w if isinstance(method, LossWeighting) else 1.0) * loss
            for w, loss in zip(expected_c.tolist(), losses, strict=True)),
        heads, retain_graph=True)

    record = deconflict.backward(losses, net.trunk, method)

    torch.testing.assert_close(record.weights, expected_c, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads_of(shared), expected_c @ J, rtol=1e-10, atol=1e-14)
    for param, want in zip(heads, head_expected, strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-12, atol=1e-14)


def test_record_reports_the_gramian_and_conflicts():
    net, x, y = make(1)
    _, losses = task_losses(net, x, y)
    J = manual_jacobian(losses, list(net.trunk.parameters()))
    record = deconflict.backward(losses, net.trunk, deconflict.GradOPS())
    torch.testing.assert_close(record.gramian, J @ J.T, rtol=1e-12, atol=1e-14)
    M = J @ J.T
    expected = [(i, j) for i in range(TASKS) for j in range(i + 1, TASKS) if M[i, j] < 0]
    assert record.conflicting_pairs == expected
    assert record.mode == "sequential" and not record.features
    assert set(record.diagnostics) >= {"projected", "R", "w"}


def test_head_weights_method_gives_heads_the_weighted_gradient():
    net, x, y = make(2)
    _, losses = task_losses(net, x, y)
    heads = list(net.heads.parameters())
    record = deconflict.backward(losses, net.trunk, deconflict.MGDA(), head_weights="method",
                                 retain_graph=True)
    want = torch.autograd.grad(sum(w * loss for w, loss in zip(record.weights.tolist(), losses,
                                                                  strict=True)), heads)
    for param, grad in zip(heads, want, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-12, atol=1e-14)


def test_representation_mode_equals_the_manual_computation():
    net, x, y = make(3)
    z, losses = task_losses(net, x, y)
    shared = list(net.trunk.parameters())
    G = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1)
                     for loss in losses])
    c = deconflict.GradOPS(-1.0).weights(G @ G.T)
    combined = (c @ G).reshape(z.shape)
    expected = torch.autograd.grad(z, shared, combined, retain_graph=True)
    heads = list(net.heads.parameters())
    head_expected = torch.autograd.grad(sum(losses), heads, retain_graph=True)

    record = deconflict.backward(losses, shared, deconflict.GradOPS(-1.0), features=z)

    assert record.features and record.mode == "sequential"
    torch.testing.assert_close(record.gramian, G @ G.T, rtol=1e-12, atol=1e-14)
    for param, want in zip(shared, expected, strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-10, atol=1e-14)
    for param, want in zip(heads, head_expected, strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-12, atol=1e-14)


def test_gradients_accumulate_like_autograd():
    net, x, y = make(4)
    for _ in range(2):
        _, losses = task_losses(net, x, y)
        deconflict.backward(losses, net.trunk, deconflict.GradOPS())
    once, _, _ = make(4)
    _, losses = task_losses(once, x, y)
    deconflict.backward(losses, once.trunk, deconflict.GradOPS())
    for twice, single in zip(net.parameters(), once.parameters(), strict=True):
        torch.testing.assert_close(twice.grad, 2 * single.grad, rtol=1e-12, atol=1e-14)


def test_loss_weighting_costs_one_backward_and_matches_plain_autograd():
    net, x, y = make(5)
    _, losses = task_losses(net, x, y)
    record = deconflict.backward(losses, net.trunk, "mean")
    assert record.gramian is None and record.mode == "losses"
    plain, _, _ = make(5)
    _, plain_losses = task_losses(plain, x, y)
    (sum(plain_losses) / TASKS).backward()
    for a, b in zip(net.parameters(), plain.parameters(), strict=True):
        # Elementwise rtol misses cancelling elements, whose rounding scales with the terms.
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12,
                                   atol=1e-12 * float(b.grad.abs().max()))


def test_compute_gramian_for_a_loss_weighting_method_gives_the_same_grads():
    net, x, y = make(6)
    _, losses = task_losses(net, x, y)
    record = deconflict.backward(losses, net.trunk, "sum", compute_gramian=True)
    assert record.gramian is not None and record.gramian.shape == (TASKS, TASKS)
    plain, _, _ = make(6)
    _, plain_losses = task_losses(plain, x, y)
    sum(plain_losses).backward()
    for a, b in zip(net.parameters(), plain.parameters(), strict=True):
        # Elementwise rtol misses cancelling elements, whose rounding scales with the terms.
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12,
                                   atol=1e-12 * float(b.grad.abs().max()))


def test_cagrad_fast_differentiates_the_combined_losses():
    net, x, y = make(7)
    shared = list(net.trunk.parameters())
    _, losses = task_losses(net, x, y)
    J = manual_jacobian(losses, shared)
    expected = deconflict.CAGradFast(num_sampled=1, seed=3).weights(J @ J.T) @ J
    record = deconflict.backward(losses, shared, deconflict.CAGradFast(num_sampled=1, seed=3))
    assert record.gramian.shape == (2, 2)  # one sampled task and the mean of the other two
    torch.testing.assert_close(grads_of(shared), expected, rtol=1e-10, atol=1e-14)


def test_float32_network_gets_float32_grads():
    net, x, y = make(8, torch.float32)
    _, losses = task_losses(net, x, y)
    deconflict.backward(losses, net.trunk, deconflict.GradOPS())
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())


def test_zero_gradient_task_is_legal():
    net, x, y = make(9)
    z, losses = task_losses(net, x, y)
    losses[2] = 0.0 * z.sum()
    record = deconflict.backward(losses, net.trunk, deconflict.GradOPS(-2.0))
    assert record.gramian[2].abs().max() == 0.0
    assert record.weights[2] == 0.0
    assert all(torch.isfinite(p.grad).all() for p in net.trunk.parameters())


def test_retain_graph_allows_a_second_pass():
    net, x, y = make(10)
    _, losses = task_losses(net, x, y)
    deconflict.backward(losses, net.trunk, deconflict.GradOPS(), retain_graph=True)
    sum(losses).backward()


def test_shared_params_accept_modules_tensors_and_named_tensors():
    grads = []
    for form in ("module", "tensors", "named"):
        net, x, y = make(11)
        shared = {"module": net.trunk, "tensors": list(net.trunk.parameters()),
                  "named": list(net.trunk.named_parameters())}[form]
        _, losses = task_losses(net, x, y)
        deconflict.backward(losses, shared, deconflict.PCGrad(seed=0))
        grads.append(grads_of(list(net.parameters())))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[2], rtol=0, atol=0)


def test_losses_as_one_tensor():
    net, x, y = make(12)
    _, losses = task_losses(net, x, y)
    record = deconflict.backward(torch.stack(losses), net.trunk, deconflict.MGDA())
    assert record.weights.shape == (TASKS,)


# ----------------------------------------------------------------------------------- bad input
def test_nan_loss_is_named():
    net, x, y = make()
    _, losses = task_losses(net, x, y)
    losses[1] = losses[1] * math.nan
    with pytest.raises(deconflict.NonFiniteError, match="loss 1 is nan"):
        deconflict.backward(losses, net.trunk, deconflict.GradOPS())
    assert all(p.grad is None for p in net.parameters())


def test_infinite_loss_is_named():
    net, x, y = make()
    _, losses = task_losses(net, x, y)
    losses[2] = losses[2] * math.inf
    with pytest.raises(deconflict.NonFiniteError, match="loss 2 is inf"):
        deconflict.backward(losses, net.trunk, "sum")


def test_nan_gradient_names_the_task_and_parameter():
    net, x, y = make()
    z, losses = task_losses(net, x, y)
    losses[0] = losses[0] + torch.sqrt(z[0, 0] - z[0, 0])  # finite (0), gradient inf * 0 = nan
    with pytest.raises(deconflict.NonFiniteError, match=r"loss 0 .*shared parameter 0\.weight"):
        deconflict.backward(losses, net.trunk, deconflict.GradOPS())
    assert all(p.grad is None for p in net.parameters())


def test_nan_gradient_in_a_head_is_caught():
    net, x, y = make()
    _, losses = task_losses(net, x, y)
    w = net.heads[2].weight
    losses[2] = losses[2] + torch.sqrt(w[0, 0] - w[0, 0].detach())
    with pytest.raises(deconflict.NonFiniteError, match="task-specific parameter"):
        deconflict.backward(losses, net.trunk, deconflict.GradOPS())
    assert all(p.grad is None for p in net.parameters())  # nothing half-applied


def test_loss_that_does_not_reach_the_shared_parameters():
    net, x, y = make()
    _, losses = task_losses(net, x, y)
    losses.append(net.heads[0].weight.pow(2).sum())
    for method in (deconflict.GradOPS(), "sum"):
        with pytest.raises(deconflict.DisconnectedLossError,
                           match="loss 3 does not depend on any shared parameter"):
            deconflict.backward(losses, net.trunk, method, retain_graph=True)


def test_loss_without_grad():
    net, x, y = make()
    _, losses = task_losses(net, x, y)
    with pytest.raises(deconflict.DisconnectedLossError, match="loss 1 does not require grad"):
        deconflict.backward([losses[0], torch.tensor(1.0)], net.trunk, deconflict.GradOPS())


def test_no_losses_and_non_scalar_losses():
    net, x, y = make()
    with pytest.raises(deconflict.ShapeError, match="at least one loss"):
        deconflict.backward([], net.trunk, deconflict.GradOPS())
    z, _ = task_losses(net, x, y)
    with pytest.raises(deconflict.ShapeError, match=r"loss 0 has shape \(16, 6\)"):
        deconflict.backward([z], net.trunk, deconflict.GradOPS())


def test_unknown_method_lists_the_known_ones():
    net, x, y = make()
    _, losses = task_losses(net, x, y)
    with pytest.raises(deconflict.UnknownMethodError, match=r"Did you mean 'gradops'.*pcgrad"):
        deconflict.backward(losses, net.trunk, "gradop")


def test_stateful_method_by_name_is_refused():
    net, x, y = make()
    _, losses = task_losses(net, x, y)
    with pytest.raises(deconflict.InvalidOptionError, match="create it once"):
        deconflict.backward(losses, net.trunk, "tensioner")


def test_bad_shared_parameters():
    net, x, y = make()
    _, losses = task_losses(net, x, y)
    with pytest.raises(deconflict.ShapeError, match="shared_params is empty"):
        deconflict.backward(losses, [], deconflict.GradOPS())
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(deconflict.InvalidOptionError,
                       match="no shared parameter requires grad: all 2 are frozen"):
        deconflict.backward(losses, frozen, deconflict.GradOPS())
    with pytest.raises(deconflict.InvalidOptionError, match="not a leaf"):
        deconflict.backward(losses, [net.trunk[0].weight * 2], deconflict.GradOPS())


def test_failing_trunk_pass_leaves_every_grad_untouched():
    """Representation mode: heads are computed first, but written only if the trunk pass works."""
    net, x, y = make()
    z, losses = task_losses(net, x, y)
    with pytest.raises(deconflict.DisconnectedLossError, match="features do not depend"):
        deconflict.backward(losses, [nn.Parameter(torch.ones(2))], deconflict.GradOPS(),
                            features=z)
    assert all(p.grad is None for p in net.parameters())


def test_features_bypassed_by_a_shared_parameter():
    net, x, y = make()
    z, losses = task_losses(net, x, y)
    losses[0] = losses[0] + net.trunk[0].bias.sum()  # reaches the trunk without passing z
    with pytest.raises(deconflict.ShapeError, match="without passing through the features"):
        deconflict.backward(losses, net.trunk, deconflict.GradOPS(), features=z)


def test_bad_method_options():
    with pytest.raises(deconflict.InvalidOptionError, match="alpha must be finite"):
        deconflict.get("gradops", alpha=math.nan)
    with pytest.raises(deconflict.InvalidOptionError, match="its options are: alpha"):
        deconflict.get("gradops", beta=1.0)
    with pytest.raises(deconflict.InvalidOptionError, match="c must be in"):
        deconflict.get("cagrad", c=-1)
    net, x, y = make()
    losses = task_losses(net, x, y)[1]
    with pytest.raises(deconflict.InvalidOptionError, match="head_weights"):
        deconflict.backward(losses, net.trunk, "sum", head_weights="all")


# ------------------------------------------------------------------------- checkpoint / resume
def train(net, optimizer, method, data, steps):
    for x, y in data[:steps]:
        optimizer.zero_grad()
        _, losses = task_losses(net, x, y)
        deconflict.backward(losses, net.trunk, method)
        optimizer.step()


def test_tensioner_checkpoint_resume_reproduces_the_uninterrupted_run():
    torch.manual_seed(0)
    data = [(torch.randn(16, 5, dtype=torch.float64), torch.randn(16, TASKS, dtype=torch.float64))
            for _ in range(30)]
    net, _, _ = make(20)
    start = copy.deepcopy(net.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    train(net, optimizer, deconflict.Tensioner(window=4), data, 30)
    uninterrupted = copy.deepcopy(net.state_dict())

    net, _, _ = make(20)
    net.load_state_dict(start)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    method = deconflict.Tensioner(window=4)
    train(net, optimizer, method, data, 13)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "method": method.state_dict()}, buffer)

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed, _, _ = make(99)
    resumed.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    optimizer.load_state_dict(checkpoint["optimizer"])
    method = deconflict.Tensioner(window=4)
    method.load_state_dict(checkpoint["method"])
    train(resumed, optimizer, method, data[13:], 17)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_update_at_a_pareto_stationary_point_is_exactly_zero():
    """Opposite task gradients g and -1.3 g: MGDA's weights (1.3, 1)/2.3 cancel them only up to
    rounding (~1e-15 left over, checked below); the engine writes exact zeros instead."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 3).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    out = trunk(x).sum()
    g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(out, list(trunk.parameters()),
                                                              retain_graph=True)])
    J = torch.stack([g, -1.3 * g])
    noise = deconflict.combine(J, deconflict.MGDA().weights(J @ J.T))
    # c_1 g + c_2 (-1.3 g) with c_1 + 1.3 c_2 < 1.2: three roundings, below 2 eps max|g|.
    assert 0 < noise.abs().max() < 2 * torch.finfo(torch.float64).eps * float(g.abs().max())
    deconflict.backward([out, -1.3 * out], trunk, deconflict.MGDA())
    assert all((p.grad == 0).all() for p in trunk.parameters())


def test_shared_parameter_no_loss_reaches_keeps_grad_none():
    net, x, y = make(13)
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    _, losses = task_losses(net, x, y)
    deconflict.backward(losses, [*net.trunk.parameters(), unused], deconflict.GradOPS())
    assert unused.grad is None
    assert all(p.grad is not None for p in net.trunk.parameters())
