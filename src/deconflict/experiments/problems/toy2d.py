"""The 2-D toy problem as a benchmark problem (CAGrad paper Section 5.1; see ``..toy2d``).

One "run" optimizes theta from each start point with the method (Adam, lr 1e-3, 20,000 steps by
default, as in GradOPS Appendix B). Metrics, averaged over the start points: the final L1, L2,
mean loss and distance to the Pareto set (all lower is better). ``starts`` takes a list of
points (``--set starts=[[0,0],[9,9]]``) or a named set: ``code`` (the CAGrad code's three, the
default) or ``paper`` (the five of the CAGrad paper's Section 5.1).

Not a supervised loop (closed-form gradients of a batch of trajectories, no data), so it keeps
its own (``..toy2d.optimize``), checkpointed like the shared one (every N steps: the points,
Adam's and the methods' states, the recorded trajectory and the global RNGs, so a resumed run
ends as an uninterrupted one); one process is enough.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import InvalidOptionError
from ..toy2d import CODE_START_POINTS, PAPER_START_POINTS, optimize, pareto_distance, toy_problem
from .base import (
    Checkpointing,
    MethodFactory,
    Metric,
    Problem,
    TrainResult,
    load_checkpoint,
    rng_states,
    save_torch,
    set_rng_states,
)
from .settings import Setting

TASKS = ("L1", "L2")


class Toy2D(Problem):
    name = "toy2d"
    description = "The CAGrad paper's 2-D problem: final losses and distance to the Pareto set"
    checkpointable = True
    not_distributed = "optimizes a few 2-D points in one process"
    single_task_baseline = False
    schema = (
        Setting("steps", "int", 20_000, "Adam steps from each start point", 50, low=1),
        Setting("lr", "float", 1e-3, "Adam's learning rate", low=0.0, open_low=True),
        Setting("starts", "points", [list(p) for p in CODE_START_POINTS],
                "start points [[x1, x2], ...]: code (the CAGrad code's 3) or paper (its 5)",
                named={"code": [list(p) for p in CODE_START_POINTS],
                       "paper": [list(p) for p in PAPER_START_POINTS]}),
    )

    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        return TASKS

    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        return (Metric("L1", "L1", False), Metric("L2", "L2", False),
                Metric("mean_loss", "all", False), Metric("pareto_distance", "all", False))

    def train(self, method_factory: MethodFactory, config: Mapping[str, Any], seed: int,
              device: torch.device, tasks: Sequence[str] | None = None,
              progress: bool = False, checkpoint: Checkpointing | None = None) -> TrainResult:
        """Optimize from every start point; ``checkpoint`` saves the run every N steps and
        resumes it (``Checkpointing``)."""
        if tasks is not None and tuple(tasks) != TASKS:
            raise InvalidOptionError("toy2d has no single-task baseline")
        torch.manual_seed(seed)
        starts = [tuple(p) for p in config["starts"]]
        methods = [method_factory() for _ in starts]
        steps = config["steps"]
        identity = {"problem": self.name, "config": dict(config), "seed": seed,
                    "tasks": list(TASKS), "method": repr(methods[0])}
        resume = None
        if checkpoint is not None and checkpoint.resume and checkpoint.path.is_file():
            resume = load_checkpoint(checkpoint.path, identity)
            set_rng_states(resume["rng"])

        def save(state: dict[str, Any]) -> None:
            assert checkpoint is not None
            save_torch(checkpoint.path, {**state, "identity": identity, "rng": rng_states()})

        from tqdm import tqdm  # the experiments extra: never imported with the library

        name = getattr(methods[0], "name", "method")
        with tqdm(total=steps, initial=0 if resume is None else resume["step"], unit="step",
                  leave=False, disable=not progress,
                  desc=f"{self.name}: {name} seed {seed} ({len(starts)} starts)") as bar:
            def postfix(losses: np.ndarray) -> None:
                mean = losses.mean(axis=0)  # over the start points
                bar.set_postfix_str(f"L1 {mean[0]:.4g}, L2 {mean[1]:.4g}")

            points = optimize(methods, starts, steps, lr=config["lr"], progress=bar.update,
                              postfix=postfix, save=save if checkpoint is not None else None,
                              save_every=checkpoint.every if checkpoint is not None else 0,
                              resume=resume)
        finals = points[:, -1, :]
        losses = toy_problem(finals)[0]
        metrics = {"L1": float(losses[:, 0].mean()), "L2": float(losses[:, 1].mean()),
                   "mean_loss": float(losses.mean()),
                   "pareto_distance": float(np.mean(pareto_distance(finals)))}
        return TrainResult({"validation": metrics, "test": metrics},
                           {"final_points": finals.tolist(), "steps": steps})
