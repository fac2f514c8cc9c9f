"""Non-finite check: the cost of ``backward``'s NaN / infinity checks, checks on vs off.

The workload is the step benchmark's (``_workload.py``: MLP trunk of 5.05M parameters, T heads,
batch 256, Adam). For each method and mode, three variants run in the same interleaved rounds:

- plain: ``sum(losses).backward()`` and the optimizer step;
- checked: ``deconflict.backward`` as shipped;
- unchecked: the same with the checks that are not fused into another pass switched off (the
  read of the new gradients, the task labelling of the graph and its hooks in the one-backward
  pass of loss weighting, the copy of the method's state). The check fused into the Gramian
  (a NaN in row i reaches M_ii) costs nothing and cannot be switched off.

The cost is (checked - unchecked) / plain: the share of a plain step the checks add.

    .venv/bin/python benchmarks/non_finite.py            # about 10 minutes on 2 busy cores
    .venv/bin/python benchmarks/non_finite.py --quick    # T = 3, two variants
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from _harness import compare, parser, save, setup, table
from _workload import step, workload

import deconflict
from deconflict import engine

# (label, method name, options, mode)
CASES = [("mean", "mean", {}, "sequential"), ("UW", "uw", {}, "sequential"),
         ("UPGrad", "upgrad", {}, "sequential"), ("UPGrad", "upgrad", {}, "gramian")]


class _Unwatched:
    """``engine._TaskGraph`` without the labels and hooks: just the leaves."""

    def __init__(self, roots: Any) -> None:
        self.leaves = engine._reachable_leaves(roots, set())

    def watching(self) -> Any:
        return nullcontext()


@contextmanager
def unchecked() -> Iterator[None]:
    saved = engine._TaskGraph, engine._non_finite_index, engine._state_copy
    engine._TaskGraph = _Unwatched
    engine._non_finite_index = lambda grads: None
    engine._state_copy = lambda method: None
    try:
        yield
    finally:
        engine._TaskGraph, engine._non_finite_index, engine._state_copy = saved


def deconflict_step(name: str, options: dict, mode: str, tasks: int,
                    checks: bool) -> Callable[[], None]:
    work = workload(tasks)
    method = deconflict.get(name, **options)
    if mode == "gramian":
        deconflict.track(work.trunk)

    def run() -> None:
        work.optimizer.zero_grad(set_to_none=True)
        with nullcontext() if checks else unchecked():
            _, losses = work.forward()
            deconflict.backward(losses, work.trunk, method, mode=mode)
        work.optimizer.step()

    return run


def components(tasks: int) -> dict[str, Callable[[], None]]:
    """Each check alone, on the workload's own gradients and graph, as candidates timed in the
    same rounds as the steps: more precise than the difference of two whole steps."""
    import torch

    work = workload(tasks)
    params = [*work.trunk.parameters(), *work.heads.parameters()]
    z, losses = work.forward()
    grads = torch.autograd.grad(sum(losses), params, retain_graph=True)
    method = deconflict.get("uw")
    method.weights(losses=torch.stack(losses).detach())
    flow = z.detach().clone()

    def graph() -> None:
        watched = engine._TaskGraph(losses)
        with watched.watching():
            pass

    def hooks() -> None:
        # The hooks' work in the pass: each task's gradient into the trunk output (z's shape)
        # reduced to a sum.
        for _ in range(tasks):
            flow.sum(dtype=torch.float32)

    return {"read": lambda: engine._non_finite_index(grads), "graph": graph, "hooks": hooks,
            "state_copy": lambda: engine._state_copy(method)}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    task_counts = (3,) if args.quick else (3, 10)
    cases = CASES[::2] if args.quick else CASES
    rows: list[dict[str, Any]] = []
    for tasks in task_counts:
        parts = components(tasks)
        for label, name, options, mode in cases:
            runs = {"plain": step("plain", None, tasks)[0],
                    "checked": deconflict_step(name, options, mode, tasks, True),
                    "unchecked": deconflict_step(name, options, mode, tasks, False), **parts}
            medians = compare(runs, args.repeats, args.warmup)
            ms = {f"{part}_ms": medians[part] * 1e3 for part in parts}
            # What each path runs: loss weighting all of it; gradient methods read the heads'
            # gradient only (Gramian mode also the shared one), their other check is fused.
            used = (["read", "graph", "hooks"] if name in ("mean", "uw") else
                    ["read"] if mode == "gramian" else [])
            used += ["state_copy"] if name == "uw" else []
            rows.append({"T": tasks, "method": label, "mode": mode, **ms,
                         "components_of_plain": sum(medians[part] for part in used)
                         / medians["plain"],
                         "plain_ms": medians["plain"] * 1e3,
                         "checked_ms": medians["checked"] * 1e3,
                         "unchecked_ms": medians["unchecked"] * 1e3,
                         "cost_of_plain": (medians["checked"] - medians["unchecked"])
                         / medians["plain"]})
            print(f"T={tasks} {label} {mode}: {rows[-1]['cost_of_plain']:+.2%} of a plain step",
                  flush=True)
    print(table(rows, [("T", "T"), ("method", "method"), ("mode", "mode"),
                       ("plain_ms", "plain ms"), ("checked_ms", "checked ms"),
                       ("unchecked_ms", "unchecked ms"),
                       ("cost_of_plain", "checks / plain step"), ("read_ms", "read ms"),
                       ("graph_ms", "graph ms"), ("hooks_ms", "hooks ms"),
                       ("state_copy_ms", "UW state ms"),
                       ("components_of_plain", "parts / plain step")]))
    print(f"results: {save('non_finite', args, rows)}")


if __name__ == "__main__":
    main()
