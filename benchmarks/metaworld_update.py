"""Meta-World MT10/MT50: seconds per multi-task SAC update for each method, side by side.

One update is what a training step of ``deconflict run mt10`` costs beside the environments:
the per-task critic losses through ``deconflict.backward`` with the method, the per-task actor
losses through a second call, the temperatures and the target critics (``experiments.sac``).
The networks are the paper's (mtrl's 3 x 400 actor and twin critics over the 39-dimensional
observation and the one-hot task id), the batch 128 transitions per task (the authors' 1280 on
MT10); the batch's values are random, since an update's cost does not depend on them, so no
environment (and no ``rl`` extra) is needed. Every method updates its own copy of the agent
on the same batch, in interleaved rounds (``_harness.compare``); the table gives the median
and the ratios that CAGrad's Section 5.3 claims: CAGrad-Fast (4 of 10 / 8 of 50 tasks sampled)
against PCGrad (2x on MT10, 5x on MT50) and against CAGrad.

    .venv/bin/python benchmarks/metaworld_update.py              # about 10 minutes, 2 cores
    .venv/bin/python benchmarks/metaworld_update.py --quick      # small networks, seconds
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from _harness import compare, parser, save, setup, table

import deconflict
from deconflict.experiments.sac import MultiTaskSAC, SACConfig

OBSERVATION, ACTION = 39, 4  # Meta-World's observation and action sizes
# (label, method name, options per benchmark: CAGrad-Fast samples 4 of 10 and 8 of 50 tasks)
METHODS: list[tuple[str, str, dict[int, dict[str, Any]]]] = [
    ("MT-SAC (sum)", "sum", {}),
    ("PCGrad", "pcgrad", {}),
    ("CAGrad", "cagrad", {}),
    ("CAGrad-Fast", "cagrad_fast", {10: {"num_sampled": 4}, 50: {"num_sampled": 8}}),
    ("GradOPS", "gradops", {}),
    ("FAMO", "famo", {}),
    ("Nash-MTL", "nash_mtl", {}),
]


def batch(tasks: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Per-task transitions (T, n, ...): observations with their one-hot task id."""
    def observations() -> torch.Tensor:
        obs = torch.randn(tasks, size, OBSERVATION, generator=generator)
        onehot = torch.eye(tasks)[:, None, :].expand(tasks, size, tasks)
        return torch.cat([obs, onehot], dim=-1)

    return [observations(), torch.rand(tasks, size, ACTION, generator=generator) * 2 - 1,
            torch.rand(tasks, size, generator=generator), observations(),
            torch.zeros(tasks, size)]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128, help="transitions per task")
    p.add_argument("--benchmarks", default="10,50", help="task counts (default 10,50)")
    args = p.parse_args()
    setup(args)
    hidden, layers = (32, 1) if args.quick else (400, 3)
    config = SACConfig(hidden=hidden, layers=layers)
    generator = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for tasks in (int(t) for t in args.benchmarks.split(",")):
        names = [f"task{i}" for i in range(tasks)]
        data = batch(tasks, args.batch_size, generator)
        runs: dict[str, Callable[[], Any]] = {}
        for label, name, options in METHODS:
            chosen = options.get(tasks, {})

            def method(name: str = name, chosen: dict = chosen) -> deconflict.Method:
                return deconflict.get(name, **chosen)

            torch.manual_seed(0)  # the same initial networks for every method
            agent = MultiTaskSAC(OBSERVATION + tasks, ACTION, names, config, method(),
                                 method())
            runs[label] = lambda a=agent, d=data: a.update(d)
        seconds = compare(runs, args.repeats, args.warmup)
        fast, pcgrad, cagrad = (seconds[k] for k in ("CAGrad-Fast", "PCGrad", "CAGrad"))
        for label, _, _ in METHODS:
            rows.append({"benchmark": f"MT{tasks}", "method": label,
                         "seconds": seconds[label],
                         "vs_sum": seconds[label] / seconds["MT-SAC (sum)"]})
        rows.append({"benchmark": f"MT{tasks}", "method": "speed-up of CAGrad-Fast",
                     "pcgrad_over_fast": pcgrad / fast, "cagrad_over_fast": cagrad / fast})
        print(f"MT{tasks}: CAGrad-Fast {pcgrad / fast:.2f}x faster than PCGrad, "
              f"{cagrad / fast:.2f}x than CAGrad", flush=True)
    path = save("metaworld_update", args, rows, {
        "batch_per_task": args.batch_size, "hidden": hidden, "layers": layers})
    print(table(rows, [("benchmark", "benchmark"), ("method", "method"),
                       ("seconds", "s / update (median)"), ("vs_sum", "x MT-SAC"),
                       ("pcgrad_over_fast", "PCGrad / CAGrad-Fast"),
                       ("cagrad_over_fast", "CAGrad / CAGrad-Fast")]))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
