"""The 2-D toy problem as a benchmark problem (CAGrad paper Section 5.1; see ``..toy2d``).

One "run" optimizes theta from each start point with the method (Adam, lr 1e-3, 20,000 steps by
default, as in GradOPS Appendix B). Metrics, averaged over the start points: the final L1, L2,
mean loss and distance to the Pareto set (all lower is better).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import InvalidOptionError
from ..toy2d import START_POINTS, optimize, pareto_distance, toy_problem
from .base import MethodFactory, Metric, Problem, TrainResult


class Toy2D(Problem):
    name = "toy2d"
    description = "The CAGrad paper's 2-D problem: final losses and distance to the Pareto set"

    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        return ("L1", "L2")

    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        return (Metric("L1", "L1", False), Metric("L2", "L2", False),
                Metric("mean_loss", "all", False), Metric("pareto_distance", "all", False))

    def default_config(self) -> dict[str, Any]:
        return {"steps": 20_000, "lr": 1e-3, "starts": [list(p) for p in START_POINTS]}

    def smoke_config(self) -> dict[str, Any]:
        config = self.default_config()
        config["steps"] = 50
        return config

    def train(self, method_factory: MethodFactory, config: Mapping[str, Any], seed: int,
              device: torch.device, tasks: Sequence[str] | None = None,
              progress: bool = False) -> TrainResult:
        if tasks is not None and tuple(tasks) != ("L1", "L2"):
            raise InvalidOptionError("toy2d has no single-task baseline")
        torch.manual_seed(seed)
        starts = [tuple(p) for p in config["starts"]]
        points = optimize([method_factory() for _ in starts], starts, config["steps"],
                          lr=config["lr"])
        finals = points[:, -1, :]
        losses = toy_problem(finals)[0]
        metrics = {"L1": float(losses[:, 0].mean()), "L2": float(losses[:, 1].mean()),
                   "mean_loss": float(losses.mean()),
                   "pareto_distance": float(np.mean(pareto_distance(finals)))}
        return TrainResult({"validation": metrics, "test": metrics},
                           {"final_points": finals.tolist()})
