"""CAGrad-Fast: CAGrad on a random subset of tasks (Liu et al., NeurIPS 2021, Section 3.3, Eq. 4;
``docs/methods.md#cagrad_fast``).

Sample a subset S of the K tasks. With h = (K g0 - sum_{i in S} g_i) / (K - |S|), the mean
gradient of the unsampled tasks, solve

    max_D min( h . D, min_{i in S} g_i . D )   subject to   ||D - g0|| <= c ||g0||,

i.e. CAGrad over the |S| + 1 vectors {g_i : i in S} and h, with the ball still centred on the
mean gradient g0 of all K tasks. Those vectors are the rows of A J, where A has rows e_i
(i in S) and (1 - 1_S) / (K - |S|); g0 = (A J)^T a with a_i = 1/K on S and (K - |S|)/K on h.

The speed-up needs fewer backward passes: the engine asks ``gradient_combinations(K)`` for A,
differentiates the |S| + 1 combined losses A L instead of the K task losses, and passes their
Gramian with ``combinations=A``. Given the full K x K Gramian instead, the method draws A itself
and uses A M A^T, with the same result for the same random state.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from .base import Context, Diagnostics, GramianWeighting, SeededRandomness
from .cagrad import DEGENERATE, cagrad_weights
from .options import Option
from .registry import register


def subsampling_matrix(num_tasks: int, sampled: np.ndarray) -> np.ndarray:
    """A: rows e_i for i in ``sampled`` (sorted), then the mean of the others if any remain."""
    sampled = np.sort(np.asarray(sampled, dtype=int))
    rows = [np.eye(num_tasks)[i] for i in sampled]
    rest = np.ones(num_tasks, dtype=bool)
    rest[sampled] = False
    if rest.any():
        rows.append(rest / rest.sum())
    return np.array(rows)


@register
class CAGradFast(SeededRandomness, GramianWeighting):
    """CAGrad-Fast (CAGrad paper Eq. 4); see the module docstring.

    Options: ``c``, ``rescale``, ``degenerate`` as CAGrad; ``num_sampled``: |S| (default None:
    ceil(K/2); the paper sampled 4 of 10 and 8 of 50 tasks); ``seed``: private generator (saved
    by ``state_dict``) or None for PyTorch's global RNG.

    Diagnostics: ``dual_weights``, ``stationary``, ``fallback`` (as CAGrad), ``sampled`` (the
    tasks whose gradients enter individually; not the left-out task when only one is left out,
    although its row of A is then a unit vector too).

    Three tasks, two sampled individually and the mean of the third:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0], [0.0, -0.5, 1.0]])
    >>> deconflict.aggregate(J, deconflict.CAGradFast(c=0.5, seed=0))
    tensor([0.1849, 0.2774, 0.3236])
    """

    name = "cagrad_fast"
    summary = "CAGrad on a random subset of tasks plus the mean of the rest (fewer backward passes)"
    paper = "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021"
    family = "multi-objective"

    OPTIONS = (
        Option("c", "float", 0.5, "radius of the ball around the mean gradient, relative to "
               "its norm (Eq. 3)", low=0.0),
        Option("rescale", "int", 1, "0: the update D; 1: D / (1 + c^2), the official default; "
               "2: D / (1 + c)", choices=(0, 1, 2)),
        Option("num_sampled", "int", None, "|S|, the tasks sampled individually each step "
               "(none: half of them, rounded up)", low=1, nullable=True),
        Option("seed", "int", None, "a private random generator seeded with it (saved in the "
               "state); none: PyTorch's global RNG", nullable=True),
        Option("degenerate", "str", "definition", "when the hull of the gradients contains 0: "
               "the optimum of Eq. 4 (definition) or the mean gradient (official code)",
               choices=DEGENERATE),
    )

    c: float
    rescale: int
    num_sampled: int | None
    seed: int | None
    degenerate: str

    STATE = (SeededRandomness.GENERATOR_STATE,)

    def __init__(
        self, c: float = 0.5, rescale: int = 1, num_sampled: int | None = None,
        seed: int | None = None, degenerate: str = "definition",
    ) -> None:
        self._set_options(c=c, rescale=rescale, num_sampled=num_sampled, seed=seed,
                          degenerate=degenerate)

    def sample_size(self, num_tasks: int) -> int:
        """|S|: ``num_sampled`` (default ceil(K / 2)), at most K."""
        size = self.num_sampled if self.num_sampled is not None else math.ceil(num_tasks / 2)
        return min(size, num_tasks)

    def gradient_combinations(self, num_tasks: int) -> np.ndarray:
        sampled = self._randperm(num_tasks)[:self.sample_size(num_tasks)]
        return subsampling_matrix(num_tasks, sampled)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        K = context.num_tasks
        A = context.combinations
        if A is None:
            A = self.gradient_combinations(K)
            M = A @ M @ A.T
        # Express g0 = J^T 1/K through the rows of A J.
        anchor, *_ = np.linalg.lstsq(A.T, np.full(K, 1.0 / K), rcond=None)
        if not np.allclose(A.T @ anchor, 1.0 / K, atol=1e-12):
            raise ShapeError("the combinations given to cagrad_fast do not span the mean gradient")
        weights, diagnostics = cagrad_weights(M, anchor, self.c, self.rescale, self.degenerate)
        # The sampled rows come first; the last row is the mean of the others when any remain,
        # itself a unit vector when exactly one task is left out, so it is not counted.
        size = self.sample_size(K)
        rows = A[:size] if A.shape[0] > size else A
        unit = (rows == 1.0).sum(axis=1) == 1
        diagnostics["sampled"] = np.sort(np.argmax(rows[unit], axis=1))
        return A.T @ weights, diagnostics
