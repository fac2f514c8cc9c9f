"""CAGrad-Fast: CAGrad on a random subset of tasks (Liu et al., NeurIPS 2021, Section 3.3, Eq. 4).

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
from .base import Context, Diagnostics, Method, SeededRandomness, bounded_option, choice_option
from .cagrad import cagrad_weights
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
class CAGradFast(SeededRandomness, Method):
    """CAGrad-Fast (CAGrad paper Eq. 4); see the module docstring.

    Options: ``c``, ``rescale`` as CAGrad; ``num_sampled``: |S| (default None: ceil(K/2); the
    paper sampled 4 of 10 and 8 of 50 tasks); ``seed``: private generator (saved by
    ``state_dict``) or None for PyTorch's global RNG.

    Diagnostics: ``dual_weights``, ``stationary`` (as CAGrad), ``sampled`` (the tasks whose
    gradients enter individually).
    """

    name = "cagrad_fast"
    summary = "CAGrad on a random subset of tasks plus the mean of the rest (fewer backward passes)"
    paper = "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021"
    family = "multi-objective"

    def __init__(
        self, c: float = 0.5, rescale: int = 1, num_sampled: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.c = bounded_option(self.name, "c", c, 0.0)
        self.rescale = choice_option(self.name, "rescale", rescale, (0, 1, 2))
        if num_sampled is not None:
            bounded_option(self.name, "num_sampled", num_sampled, 1)
            num_sampled = int(num_sampled)
        self.num_sampled = num_sampled
        self._init_generator(seed)

    def options(self) -> dict[str, object]:
        return {"c": self.c, "rescale": self.rescale, "num_sampled": self.num_sampled,
                "seed": self.seed}

    def gradient_combinations(self, num_tasks: int) -> np.ndarray:
        size = self.num_sampled if self.num_sampled is not None else math.ceil(num_tasks / 2)
        size = min(size, num_tasks)
        sampled = self._randperm(num_tasks)[:size]
        return subsampling_matrix(num_tasks, sampled)

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        assert M is not None
        K = context.num_tasks
        A = context.combinations
        if A is None:
            A = self.gradient_combinations(K)
            M = A @ M @ A.T
        # Express g0 = J^T 1/K through the rows of A J.
        anchor, *_ = np.linalg.lstsq(A.T, np.full(K, 1.0 / K), rcond=None)
        if not np.allclose(A.T @ anchor, 1.0 / K, atol=1e-12):
            raise ShapeError("the combinations given to cagrad_fast do not span the mean gradient")
        weights, diagnostics = cagrad_weights(M, anchor, self.c, self.rescale)
        diagnostics["sampled"] = np.flatnonzero((A == 1.0).sum(axis=0))
        return A.T @ weights, diagnostics
