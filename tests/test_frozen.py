"""Frozen parameters in the shared trunk (issue 13, item 4): skipped as autograd skips them, in
every mode, with ``.grad`` equal to the method's update computed by hand on the trainable ones.

The trunk freezes a whole layer (its first) and the bias alone of another, the common
fine-tuning set-ups; the expected update is the method applied to the Jacobian of the trainable
parameters only (``manual_jacobian``), through ``deconflict.aggregate`` on a fresh instance.

Tolerance: the modes form M in different summation orders (Gramian mode by the kernel trick),
each within n eps relative for n terms (n <= 100 here, so about 2e-14); the methods' weights
on these well-conditioned 3-task problems move by at most ~1e3 times that, hence rtol 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from properties import assert_close_relative, manual_jacobian
from torch import nn

import deconflict
from deconflict.methods.base import LossWeighting
from deconflict.update import weighs_by_gramian

TASKS = 3
RTOL = 1e-10
METHODS = [("upgrad", {}), ("mgda", {}), ("mean", {}), ("uw", {}), ("gradvac", {"seed": 0}),
           ("gradvac", {"seed": 0, "granularity": "layer"}), ("db_mtl", {})]
MODES = ["sequential", "batched", "gramian", "features"]


def build(seed: int = 0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(),
                          nn.Linear(6, 5), nn.Tanh()).double()
    trunk[0].requires_grad_(False)
    trunk[4].bias.requires_grad_(False)
    heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(TASKS)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    return trunk, heads, x


def losses_of(trunk, heads, x):
    z = trunk(x)
    return z, [(head(z).squeeze(-1) - k).pow(2).mean() for k, head in enumerate(heads)]


def supported(name: str, options: dict, mode: str) -> bool:
    return mode != "gramian" or weighs_by_gramian(deconflict.get(name, **options))


CASES = [(name, options, mode) for name, options in METHODS for mode in MODES
         if supported(name, options, mode)]


@pytest.mark.parametrize(("name", "options", "mode"), CASES,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}-{m}" for n, o, m in CASES])
def test_frozen_parameters_are_skipped_and_the_rest_gets_the_update(name, options, mode):
    trunk, heads, x = build()
    trainable = [p for p in trunk.parameters() if p.requires_grad]
    if mode == "gramian":
        deconflict.track(trunk)
    z, losses = losses_of(trunk, heads, x)
    values = torch.stack(losses).detach()
    method, fresh = deconflict.get(name, **options), deconflict.get(name, **options)
    loss_weighting = isinstance(method, LossWeighting)
    if mode == "features":
        J = manual_jacobian(losses, [z])
        update = deconflict.aggregate(J, fresh, losses=values)
        expected = torch.autograd.grad(z, trainable, update.view_as(z), retain_graph=True)
    else:
        J = manual_jacobian(losses, trainable)
        # One block per layer, as the engine groups a module's tensors (GradVac per layer).
        update = deconflict.aggregate(J, fresh, losses=values, block_sizes=[
            sum(p.numel() for p in layer.parameters() if p.requires_grad)
            for layer in (trunk[2], trunk[4])])
        expected = update.split([p.numel() for p in trainable])

    record = deconflict.backward(losses, trunk, method, mode=mode if mode != "features" else
                                 "sequential", features=z if mode == "features" else None,
                                 retain_graph=True)  # for the heads' gradient below

    assert record.mode == ("losses" if loss_weighting else
                           "sequential" if mode == "features" else mode)
    assert trunk[0].weight.grad is None and trunk[0].bias.grad is None
    assert trunk[4].bias.grad is None
    for param, want in zip(trainable, expected, strict=True):
        assert_close_relative(param.grad, want.reshape(param.shape), RTOL, "trainable .grad")
    weights = None if record.weights is None else record.weights.numpy()
    coefficients = deconflict.get(name, **options).head_coefficients(weights, values.numpy())
    head_loss = sum(float(w) * loss for w, loss in zip(coefficients, losses, strict=True))
    head_params = list(heads.parameters())
    for param, want in zip(head_params, torch.autograd.grad(head_loss, head_params),
                           strict=True):
        assert_close_relative(param.grad, want, RTOL, "head .grad")


def test_a_layer_frozen_or_unfrozen_after_tracking():
    """Gramian mode decides from requires_grad at the step, not when the trunk was tracked."""
    trunk, heads, x = build()
    deconflict.track(trunk)
    trunk[0].requires_grad_(True)  # unfrozen after tracking
    trunk[2].requires_grad_(False)  # frozen after tracking
    trainable = [p for p in trunk.parameters() if p.requires_grad]
    _, losses = losses_of(trunk, heads, x)
    J = manual_jacobian(losses, trainable)
    record = deconflict.backward(losses, trunk, deconflict.UPGrad(), mode="gramian")
    np.testing.assert_allclose(record.gramian.numpy(), (J @ J.T).numpy(), rtol=RTOL)
    assert trunk[2].weight.grad is None and trunk[2].bias.grad is None
    expected = deconflict.aggregate(J, deconflict.UPGrad()).split([p.numel() for p in trainable])
    for param, want in zip(trainable, expected, strict=True):
        assert_close_relative(param.grad, want.reshape(param.shape), RTOL, "trainable .grad")


def test_named_parameters_with_frozen_ones_are_accepted():
    trunk, heads, x = build()
    _, losses = losses_of(trunk, heads, x)
    deconflict.backward(losses, list(trunk.named_parameters()), deconflict.MGDA())
    assert trunk[0].weight.grad is None and trunk[2].weight.grad is not None


def test_an_entirely_frozen_trunk_is_refused_in_every_mode():
    trunk, heads, x = build()
    trunk.requires_grad_(False)
    deconflict.track(trunk)
    for mode in ("sequential", "batched", "gramian"):
        _, losses = losses_of(trunk, heads, x)
        with pytest.raises(deconflict.InvalidOptionError,
                           match="no shared parameter requires grad: all 6 are frozen"):
            deconflict.backward(losses, trunk, "upgrad", mode=mode)
    assert all(p.grad is None for p in heads.parameters())
