"""Non-finite check: the cost of ``backward``'s NaN / infinity checks, checks on vs off.

The workload is the step benchmark's (``_workload.py``: MLP trunk of 5.05M parameters, T heads,
batch 256, Adam). For each method and mode, these variants run in the same interleaved rounds:

- plain: ``sum(losses).backward()`` and the optimizer step;
- checked: ``deconflict.backward`` as shipped;
- unchecked: the same with the checks that are not fused into another pass switched off (the
  read of the new gradients, the task labelling of the graph and its hooks in the one-backward
  pass of loss weighting, the copy of the method's state). The check fused into the Gramian
  (a NaN in row i reaches M_ii) costs nothing and cannot be switched off;
- probed: the checked step with a timer around each check, which reports the time each one
  takes inside a real step (the gradients just computed, the graph just built);
- each check alone ("cold"), on tensors made once before the rounds: the read of a step's
  gradients, the labelling walk and its hooks' registration, the hooks' work in the pass (each
  task's gradient into the trunk output reduced to a sum), the copy of UW's state. Between two
  calls the other candidates run, so these read memory that is no longer in cache.

The whole-step difference (checked - unchecked) / plain is within the noise of a busy machine;
the parts are the precise measure: "parts / plain" sums the cold parts, "in step / plain" the
probed ones (with the hooks' work in the pass taken from the cold measure: it runs inside
autograd, where no timer can reach it).

    .venv/bin/python benchmarks/non_finite.py            # about 10 minutes on 2 busy cores
    .venv/bin/python benchmarks/non_finite.py --quick    # T = 3, two variants
    .venv/bin/python benchmarks/non_finite.py --methods mean,uw   # loss weighting only
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from _harness import compare, parser, save, setup, table
from _workload import step, workload

import deconflict
from deconflict import engine, graph

# (label, method name, options, mode)
CASES = [("mean", "mean", {}, "sequential"), ("UW", "uw", {}, "sequential"),
         ("UPGrad", "upgrad", {}, "sequential"), ("UPGrad", "upgrad", {}, "gramian")]
PARTS = ("read", "graph", "hooks", "state_copy")


class _Unwatched:
    """``graph.TaskGraph`` without the labels and hooks: just the leaves."""

    def __init__(self, roots: Any) -> None:
        self.leaves = graph.leaves(roots)

    def watching(self) -> Any:
        return nullcontext()


class _Unkept:
    """``engine._KeptState`` without the copy."""

    def __init__(self, method: Any) -> None:
        pass

    def restore(self) -> None:
        pass


@contextmanager
def _replaced(module: Any, **names: Any) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in names}
    for name, value in names.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


@contextmanager
def unchecked() -> Iterator[None]:
    with _replaced(graph, TaskGraph=_Unwatched), _replaced(
            engine, first_non_finite=lambda grads: None, _KeptState=_Unkept):
        yield


class Probe:
    """Timers around each check of the checked step: seconds per part, per step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    @contextmanager
    def installed(self) -> Iterator[None]:
        times = dict.fromkeys(PARTS, 0.0)
        self.steps.append(times)
        original_read, original_kept = engine.first_non_finite, engine._KeptState

        def read(grads: Any) -> Any:
            start = time.perf_counter()
            try:
                return original_read(grads)
            finally:
                times["read"] += time.perf_counter() - start

        def kept(method: Any) -> Any:
            start = time.perf_counter()
            try:
                return original_kept(method)
            finally:
                times["state_copy"] += time.perf_counter() - start

        class Timed(graph.TaskGraph):
            def __init__(self, roots: Any) -> None:
                start = time.perf_counter()
                super().__init__(roots)
                times["graph"] += time.perf_counter() - start

            @contextmanager
            def watching(self) -> Iterator[None]:
                start = time.perf_counter()
                hooks = super().watching()
                hooks.__enter__()
                times["hooks"] += time.perf_counter() - start
                try:
                    yield
                finally:
                    start = time.perf_counter()
                    hooks.__exit__(None, None, None)
                    times["hooks"] += time.perf_counter() - start

        with _replaced(graph, TaskGraph=Timed), _replaced(engine, first_non_finite=read,
                                                          _KeptState=kept):
            yield

    def medians(self, skip: int) -> dict[str, float]:
        timed = self.steps[skip:]
        return {part: statistics.median(step[part] for step in timed) for part in PARTS}


def deconflict_step(name: str, options: dict, mode: str, tasks: int,
                    checks: bool | Probe) -> Callable[[], None]:
    work = workload(tasks)
    method = deconflict.get(name, **options)
    if mode == "gramian":
        deconflict.track(work.trunk)

    def run() -> None:
        work.optimizer.zero_grad(set_to_none=True)
        context = (checks.installed() if isinstance(checks, Probe) else
                   nullcontext() if checks else unchecked())
        with context:
            _, losses = work.forward()
            deconflict.backward(losses, work.trunk, method, mode=mode)
        work.optimizer.step()

    return run


def components(tasks: int) -> dict[str, Callable[[], None]]:
    """Each check alone, on the workload's own gradients and graph, as candidates timed in the
    same rounds as the steps."""
    import torch

    work = workload(tasks)
    params = [*work.trunk.parameters(), *work.heads.parameters()]
    z, losses = work.forward()
    grads = torch.autograd.grad(sum(losses), params, retain_graph=True)
    method = deconflict.get("uw")
    method.weights(losses=torch.stack(losses).detach())
    flow = z.detach().clone()

    def labelled() -> None:
        watched = graph.TaskGraph(losses)
        with watched.watching():
            pass

    def hooks() -> None:
        # The hooks' work in the pass: each task's gradient into the trunk output (z's shape)
        # reduced to a sum.
        for _ in range(tasks):
            flow.sum(dtype=torch.float32)

    return {"read": lambda: engine.first_non_finite(grads), "graph": labelled, "hooks": hooks,
            "state_copy": lambda: engine._KeptState(method)}


def main() -> None:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--methods", default=None,
                     help="comma-separated method names to run (default: all of "
                          f"{sorted({name for _, name, _, _ in CASES})})")
    args = cli.parse_args()
    setup(args)
    task_counts = (3,) if args.quick else (3, 10)
    cases = CASES[::2] if args.quick else CASES
    if args.methods is not None:
        chosen = set(args.methods.split(","))
        cases = [case for case in cases if case[1] in chosen]
    rows: list[dict[str, Any]] = []
    for tasks in task_counts:
        parts = components(tasks)
        for label, name, options, mode in cases:
            probe = Probe()
            runs = {"plain": step("plain", None, tasks)[0],
                    "checked": deconflict_step(name, options, mode, tasks, True),
                    "unchecked": deconflict_step(name, options, mode, tasks, False),
                    "probed": deconflict_step(name, options, mode, tasks, probe), **parts}
            medians = compare(runs, args.repeats, args.warmup)
            in_step = probe.medians(skip=args.warmup)
            ms = {f"{part}_ms": medians[part] * 1e3 for part in parts}
            ms |= {f"{part}_in_step_ms": in_step[part] * 1e3 for part in PARTS}
            # What each path runs: loss weighting all of it; gradient methods read the heads'
            # gradient only (Gramian mode also the shared one), their other check is fused.
            used = (["read", "graph", "hooks"] if name in ("mean", "uw") else
                    ["read"] if mode == "gramian" else [])
            used += ["state_copy"] if name == "uw" else []
            # The hooks' work inside the pass is only measured cold (see the docstring).
            in_step_total = sum(in_step[part] for part in used) + (
                medians["hooks"] if "hooks" in used else 0.0)
            rows.append({"T": tasks, "method": label, "mode": mode, **ms,
                         "components_of_plain": sum(medians[part] for part in used)
                         / medians["plain"],
                         "in_step_of_plain": in_step_total / medians["plain"],
                         "plain_ms": medians["plain"] * 1e3,
                         "checked_ms": medians["checked"] * 1e3,
                         "unchecked_ms": medians["unchecked"] * 1e3,
                         "cost_of_plain": (medians["checked"] - medians["unchecked"])
                         / medians["plain"]})
            print(f"T={tasks} {label} {mode}: {rows[-1]['cost_of_plain']:+.2%} of a plain step "
                  f"(parts {rows[-1]['components_of_plain']:.2%}, in step "
                  f"{rows[-1]['in_step_of_plain']:.2%})", flush=True)
    print(table(rows, [("T", "T"), ("method", "method"), ("mode", "mode"),
                       ("plain_ms", "plain ms"), ("checked_ms", "checked ms"),
                       ("unchecked_ms", "unchecked ms"),
                       ("cost_of_plain", "checks / plain step"), ("read_ms", "read ms"),
                       ("graph_ms", "graph ms"), ("hooks_ms", "hooks ms"),
                       ("state_copy_ms", "UW state ms"),
                       ("components_of_plain", "parts / plain step")]))
    print(table(rows, [("T", "T"), ("method", "method"), ("mode", "mode"),
                       ("read_in_step_ms", "read ms"), ("graph_in_step_ms", "graph ms"),
                       ("hooks_in_step_ms", "hook (un)registration ms"),
                       ("state_copy_in_step_ms", "UW state ms"),
                       ("in_step_of_plain", "in step / plain step")]))
    print(f"results: {save('non_finite', args, rows)}")


if __name__ == "__main__":
    main()
