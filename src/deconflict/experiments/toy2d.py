"""The 2-D toy problem (CAGrad paper Section 5.1, reused by GradOPS Figure 2).

theta = (x1, x2), two losses (as the CAGrad authors' code defines them, checked against it):

    f1 = log(max(|0.5 (-x1 - 7) - tanh(-x2)|, 5e-6)) + 6
    f2 = log(max(|0.5 (-x1 + 3) + tanh(-x2) + 2|, 5e-6)) + 6
    g1 = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    g2 = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    c1 = max(tanh(x2 / 2), 0),  c2 = max(tanh(-x2 / 2), 0)
    L1 = c1 f1 + c2 g1,  L2 = c1 f2 + c2 g2

The Pareto set is the segment from (-7, -8.3552) to (7, -8.3552). Every parameter is shared,
so the task Jacobian at theta is the 2 x 2 matrix of the two loss gradients.

Start points: the CAGrad paper's Section 5.1 picks five, (-8.5, 7.5), (-8.5, -5), (0, 0),
(9, 9) and (10, -8) (``PAPER_START_POINTS``); its public code and GradOPS Figure 2 use the first,
second and fourth (``CODE_START_POINTS``, the default ``START_POINTS``).

``optimize`` runs many trajectories (one method instance each) in one batch: the losses and
gradients of all trajectories come from the closed form in ``toy_problem`` (tested against
autograd), each method maps its trajectory's Gramian to weights through the public
``Method.weights`` (methods that need the gradients themselves go through ``aggregate``), and
``torch.optim.Adam`` (elementwise, so trajectories stay independent) takes the step; FAMO gets
the losses after the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..aggregate import aggregate
from ..methods.base import AfterStep, BlockWeighting, GramianWeighting, LossWeighting, Method

LOWER = 5e-6
PARETO_Y = -8.3552
PARETO_X = (-7.0, 7.0)
PAPER_START_POINTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5), (-8.5, -5.0), (0.0, 0.0), (9.0, 9.0), (10.0, -8.0))
CODE_START_POINTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
START_POINTS = CODE_START_POINTS


def toy_problem(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Losses (..., 2) and task Jacobians (..., 2, 2) at points (..., 2), in closed form.

    Row t of a Jacobian is the gradient of L_t, equal to autograd of the same formula written
    with ``torch.clamp`` (the authors' PyTorch code) everywhere: a clamp passes the gradient
    where its input is at or above the bound (clamp's subgradient at the kink is the identity's),
    so at x2 = 0, where tanh(x2 / 2) = 0, both c1 and c2 have slope +-1/2 and the gradient is
    not zero, and |a| = 5e-6 exactly still differentiates the log.
    """
    x1, x2 = np.moveaxis(np.asarray(points, dtype=np.float64), -1, 0)
    th = np.tanh(x2)
    sech2 = 1.0 - th * th
    a1 = -0.5 * x1 - 3.5 + th  # 0.5 (-x1 - 7) - tanh(-x2)
    a2 = -0.5 * x1 + 3.5 - th  # 0.5 (-x1 + 3) + tanh(-x2) + 2
    live1, live2 = np.abs(a1) >= LOWER, np.abs(a2) >= LOWER
    f1 = np.log(np.maximum(np.abs(a1), LOWER)) + 6.0
    f2 = np.log(np.maximum(np.abs(a2), LOWER)) + 6.0
    inv1 = np.where(live1, 1.0 / np.where(live1, a1, 1.0), 0.0)  # d log|a| = da / a
    inv2 = np.where(live2, 1.0 / np.where(live2, a2, 1.0), 0.0)
    df1 = (-0.5 * inv1, sech2 * inv1)
    df2 = (-0.5 * inv2, -sech2 * inv2)
    q = 0.1 * (x2 + 8.0) ** 2
    g1 = ((7.0 - x1) ** 2 + q) / 10.0 - 20.0
    g2 = ((x1 + 7.0) ** 2 + q) / 10.0 - 20.0
    dq = 0.02 * (x2 + 8.0)
    dg1 = ((x1 - 7.0) / 5.0, dq)
    dg2 = ((x1 + 7.0) / 5.0, dq)
    half = np.tanh(0.5 * x2)
    dhalf = 0.5 * (1.0 - half * half)
    c1, c2 = np.maximum(half, 0.0), np.maximum(-half, 0.0)
    dc1 = np.where(half >= 0.0, dhalf, 0.0)
    dc2 = np.where(half <= 0.0, -dhalf, 0.0)
    losses = np.stack([c1 * f1 + c2 * g1, c1 * f2 + c2 * g2], axis=-1)
    jacobians = np.stack([
        np.stack([c1 * df1[0] + c2 * dg1[0], c1 * df1[1] + f1 * dc1 + c2 * dg1[1] + g1 * dc2],
                 axis=-1),
        np.stack([c1 * df2[0] + c2 * dg2[0], c1 * df2[1] + f2 * dc1 + c2 * dg2[1] + g2 * dc2],
                 axis=-1),
    ], axis=-2)
    return losses, jacobians


def pareto_distance(points: np.ndarray) -> np.ndarray:
    """Euclidean distance from points (..., 2) to the Pareto segment."""
    points = np.asarray(points, dtype=float)
    dx = np.maximum(np.abs(points[..., 0]) - PARETO_X[1], 0.0)
    dy = points[..., 1] - PARETO_Y
    return np.hypot(dx, dy)


def average_loss_grid(limit: float = 11.0, size: int = 300) -> tuple[np.ndarray, ...]:
    """(X, Y, mean loss) on a size x size grid over [-limit, limit]^2, for contour plots."""
    axis = np.linspace(-limit, limit, size)
    X, Y = np.meshgrid(axis, axis, indexing="xy")
    return X, Y, toy_problem(np.stack([X, Y], axis=-1))[0].mean(axis=-1)


def optimize(
    methods: Sequence[Method],
    starts: Sequence[tuple[float, float]],
    steps: int,
    *,
    lr: float = 1e-3,
    record_every: int = 20,
    progress: Callable[[int], None] | None = None,
    postfix: Callable[[np.ndarray], None] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    save_every: int = 0,
    resume: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Adam on the toy problem, one trajectory per (method, start) pair.

    Returns the recorded points (B, steps // record_every + 1, 2), the last being the final
    point. ``progress`` is called with the number of steps done since its last call, every 100
    steps, and ``postfix`` then with the current losses (B, 2). ``save`` is called every
    ``save_every`` steps with the whole state (step, points, Adam's and the methods' states,
    the points recorded so far); ``resume`` (such a state) continues from it, to the same end.
    """
    if len(methods) != len(starts):
        raise ValueError(f"{len(methods)} methods for {len(starts)} start points")
    theta = torch.tensor(starts, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    recorded = [theta.detach().numpy().copy()]
    first = 1
    if resume is not None:
        with torch.no_grad():
            theta.copy_(resume["theta"])
        optimizer.load_state_dict(resume["optimizer"])
        for method, state in zip(methods, resume["methods"], strict=True):
            method.load_state_dict(state)
        recorded = [np.array(points) for points in resume["recorded"]]
        first = resume["step"] + 1
    done = first - 1
    after_step = [m for m in methods if isinstance(m, AfterStep)]
    for step in range(first, steps + 1):
        losses, J = toy_problem(theta.detach().numpy())
        gramians = J @ np.swapaxes(J, 1, 2)
        updates = np.empty((len(methods), 2))
        for b, method in enumerate(methods):
            if isinstance(method, (GramianWeighting, BlockWeighting, LossWeighting)):
                updates[b] = method.weights(gramians[b], losses=losses[b]).numpy() @ J[b]
            else:  # a Jacobian aggregator needs the gradients themselves
                updates[b] = aggregate(torch.from_numpy(J[b]), method, losses=losses[b]).numpy()
        theta.grad = torch.from_numpy(updates)
        optimizer.step()
        if after_step:
            new_losses = toy_problem(theta.detach().numpy())[0]
            for b, method in enumerate(methods):
                if isinstance(method, AfterStep):
                    method.after_step(new_losses[b])
        if step % record_every == 0 or step == steps:
            recorded.append(theta.detach().numpy().copy())
        if step % 100 == 0 or step == steps:
            if progress is not None:
                progress(step - done)
            if postfix is not None:
                postfix(losses)
            done = step
        if save is not None and save_every and step % save_every == 0:
            save({"step": step, "theta": theta.detach().clone(),
                  "optimizer": optimizer.state_dict(),
                  "methods": [method.state_dict() for method in methods],
                  "recorded": [points.copy() for points in recorded]})
    return np.stack(recorded, axis=1)
