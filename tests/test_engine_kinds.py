"""The engine with every kind of method: loss weighting (one backward pass; GradNorm's last-layer
norms), block Gramians (GradVac per layer), Jacobian methods (GradDrop at both levels, DB-MTL),
MGDA-UB's representation requirement, FAMO's after_step."""

from __future__ import annotations

import pytest
import torch
from test_engine import TASKS, grads_of, make, manual_jacobian, task_losses
from torch import nn

import deconflict


def count_first_layer_backward(net, run):
    """How many backward passes reach the first trunk layer during ``run()``."""
    calls = []
    handle = net.trunk[0].weight.register_hook(lambda grad: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize(("name", "passes"), [
    ("sum", 1), ("mean", 1), ("uw", 1), ("imtl_l", 1), ("dwa", 1), ("rlw", 1), ("famo", 1),
    ("gradnorm", 1), ("gradops", TASKS), ("db_mtl", TASKS),
])
def test_backward_passes_through_the_trunk(name, passes):
    net, x, y = make()
    _, losses = task_losses(net, x, y)
    method = deconflict.get(name)
    assert count_first_layer_backward(
        net, lambda: deconflict.backward(losses, net.trunk, method)) == passes


def test_loss_weighting_gives_every_parameter_the_weighted_gradient():
    net, x, y = make(1)
    _, losses = task_losses(net, x, y)
    record = deconflict.backward(losses, net.trunk, deconflict.UncertaintyWeighting())
    plain, _, _ = make(1)
    _, plain_losses = task_losses(plain, x, y)
    sum(0.5 * loss for loss in plain_losses).backward()
    torch.testing.assert_close(record.weights, torch.full((TASKS,), 0.5, dtype=torch.float64))
    for a, b in zip(net.parameters(), plain.parameters(), strict=True):
        # Elementwise rtol misses cancelling elements, whose rounding scales with the terms.
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12,
                                   atol=1e-12 * float(b.grad.abs().max()))


def test_gradnorm_sees_the_last_shared_layer_gramian():
    net, x, y = make(2)
    _, losses = task_losses(net, x, y)
    last = [net.trunk[2].weight, net.trunk[2].bias]  # trunk = Linear, Tanh, Linear, Tanh
    J = manual_jacobian(losses, last)
    record = deconflict.backward(losses, net.trunk, deconflict.GradNorm())
    # Off-diagonal entries may cancel: their float64 error scales with the diagonal.
    torch.testing.assert_close(record.diagnostics["layer_gramian"], J @ J.T, rtol=1e-12,
                               atol=1e-12 * float(torch.diagonal(J @ J.T).max()))
    torch.testing.assert_close(record.diagnostics["gradient_norms"],
                               torch.linalg.vector_norm(J, dim=1), rtol=1e-12, atol=1e-15)


def test_famo_in_a_training_loop():
    net, x, y = make(3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    famo = deconflict.FAMO()
    for _ in range(3):
        optimizer.zero_grad()
        _, losses = task_losses(net, x, y)
        deconflict.backward(losses, net.trunk, famo)
        optimizer.step()
        with torch.no_grad():
            famo.after_step(torch.stack(task_losses(net, x, y)[1]))
    optimizer.zero_grad()
    _, losses = task_losses(net, x, y)
    deconflict.backward(losses, net.trunk, famo)
    with pytest.raises(deconflict.InvalidOptionError, match="after_step"):
        deconflict.backward(task_losses(net, x, y)[1], net.trunk, famo)


def test_mgda_ub_needs_features_and_is_mgda_on_them():
    net, x, y = make(4)
    z, losses = task_losses(net, x, y)
    with pytest.raises(deconflict.InvalidOptionError, match="features="):
        deconflict.backward(losses, net.trunk, deconflict.MGDAUB())
    record = deconflict.backward(losses, net.trunk, deconflict.MGDAUB(), features=z)
    expected = deconflict.MGDA(normalizer="loss+").weights(record.gramian, losses=record.losses)
    torch.testing.assert_close(record.weights, expected, rtol=0, atol=0)


def test_gradvac_per_layer_is_per_layer_pcgrad_at_the_first_step():
    """Targets start at 0, so with two tasks each layer gets its own PCGrad combination."""
    net, x, y = make(5)
    net.heads = net.heads[:2]
    _, losses = task_losses(net, x, y)
    layers = [[net.trunk[0].weight, net.trunk[0].bias], [net.trunk[2].weight, net.trunk[2].bias]]
    expected = []
    for params in layers:
        J = manual_jacobian(losses, params)
        expected.append(deconflict.PCGrad().weights(J @ J.T) @ J)
    record = deconflict.backward(losses, net.trunk, deconflict.GradVac(granularity="layer"))
    assert record.weights is None
    assert record.diagnostics["groups"].tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(grads_of(list(net.trunk.parameters())), torch.cat(expected),
                               rtol=1e-10, atol=1e-14)


def test_graddrop_activation_level_with_full_leak_is_the_plain_sum():
    net, x, y = make(6)
    z, losses = task_losses(net, x, y)
    deconflict.backward(losses, net.trunk, deconflict.GradDrop(leak=1.0), features=z)
    plain, _, _ = make(6)
    _, plain_losses = task_losses(plain, x, y)
    sum(plain_losses).backward()
    for a, b in zip(net.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_graddrop_activation_level_masks_by_feature():
    """G_i = sum over the batch of sign(z) dL_i/dz; one uniform draw per feature; the mask is
    shared by the whole batch (paper Algorithm 1)."""
    net, x, y = make(7)
    z, losses = task_losses(net, x, y)
    grads = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses])
    statistic = (grads * torch.sign(z)).sum(dim=1)  # (T, features)
    purity = 0.5 * (1 + statistic.sum(0) / statistic.abs().sum(0))
    uniform = torch.rand(purity.shape, generator=torch.Generator().manual_seed(8),
                         dtype=torch.float64)
    mask = ((purity > uniform) & (statistic > 0)) | ((purity < uniform) & (statistic < 0))
    combined = (mask[:, None, :].double() * grads).sum(0)
    expected = torch.autograd.grad(z, list(net.trunk.parameters()), combined, retain_graph=True)
    deconflict.backward(losses, net.trunk, deconflict.GradDrop(seed=8), features=z)
    for param, want in zip(net.trunk.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-12, atol=1e-14)


def test_db_mtl_trains_heads_on_log_losses():
    net, x, y = make(9)
    _, losses = task_losses(net, x, y)
    heads = list(net.heads.parameters())
    want = torch.autograd.grad(sum(torch.log(loss + 1e-8) for loss in losses), heads,
                               retain_graph=True)
    shared = list(net.trunk.parameters())
    J = manual_jacobian(losses, shared)
    gl = J / (torch.stack(losses).detach() + 1e-8)[:, None]
    average = 0.1 * gl
    norms = torch.linalg.vector_norm(average, dim=1)
    expected = (norms.max() / norms) @ average
    record = deconflict.backward(losses, net.trunk, deconflict.DBMTL())
    assert record.weights is None
    for param, grad in zip(heads, want, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grads_of(shared), expected, rtol=1e-10, atol=1e-14)


def test_head_weights_method_needs_task_weights():
    net, x, y = make(10)
    _, losses = task_losses(net, x, y)
    with pytest.raises(deconflict.InvalidOptionError, match="needs task weights"):
        deconflict.backward(losses, net.trunk, deconflict.GradDrop(), head_weights="method")


def test_loss_weighting_with_unit_heads_needs_per_task_gradients():
    net, x, y = make(11)
    _, losses = task_losses(net, x, y)
    with pytest.raises(deconflict.InvalidOptionError, match="compute_gramian=True"):
        deconflict.backward(losses, net.trunk, "sum", head_weights="unit")
    record = deconflict.backward(losses, net.trunk, "mean", head_weights="unit",
                                 compute_gramian=True)
    assert record.gramian is not None


def test_layer_keys_come_from_parameter_names():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 2)))
    from deconflict.engine import _named_leaves  # the engine's own reading of shared_params

    assert [layer for _, _, layer in _named_leaves(net)] == ["0", "0", "2.0", "2.0"]
    tensors = _named_leaves(list(net.parameters()))
    assert len({layer for _, _, layer in tensors}) == 4  # unnamed tensors: one layer each
