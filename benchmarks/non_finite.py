"""Non-finite check: the cost of ``backward``'s NaN / infinity checks, checks on vs off.

The workload is the step benchmark's (``_workload.py``: MLP trunk of 5.05M parameters, T heads,
batch 256, Adam). For each method and mode, these variants run in the same interleaved rounds:

- plain: ``sum(losses).backward()`` and the optimizer step;
- checked: ``deconflict.backward`` as shipped, with a timer around each check, which reports
  the time each one takes inside a real step (the gradients just computed, the graph just
  built): the read of the new gradients, the labelling walk of the graph (loss weighting), the
  registration and disarming of its hooks, the copy of the method's state;
- unchecked: the same with the checks that are not fused into another pass switched off. The
  check fused into the Gramian (a NaN in row i reaches M_ii) costs nothing and cannot be
  switched off. What the step needs the graph for anyway stays, and is timed: the leaves and
  whether each loss reaches a shared parameter (``_Unwatched``: one walk for the leaves, one
  per loss), which the labelling walk answers too; the labels' own cost is the difference;
- each check alone ("cold"), on tensors made once before the rounds: the read of a step's
  gradients (all of them, or the heads' only), the labelling walk with its hooks'
  registration, the walks without labels, the hooks' work in the pass (each task's gradient
  into the trunk output reduced to a sum), the copy of UW's state. Between two calls the other
  candidates run, so these read memory that is no longer in cache.

The whole-step difference (checked - unchecked) / plain is within the noise of a busy machine;
the parts are the precise measure: "cold parts / plain" sums the cold parts a case runs, "in
step / plain" the timed ones (with the hooks' work in the pass taken from the cold measure: it
runs inside autograd, where no timer can reach it).

    .venv/bin/python benchmarks/non_finite.py            # about 10 minutes on 2 busy cores
    .venv/bin/python benchmarks/non_finite.py --quick    # T = 3, two cases
    .venv/bin/python benchmarks/non_finite.py --methods mean,uw   # loss weighting only
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from _harness import banner, compare, parser, save, setup, table
from _workload import step, workload

import deconflict
from deconflict import engine, graph

# (label, method name, options, mode)
CASES = [("mean", "mean", {}, "sequential"), ("UW", "uw", {}, "sequential"),
         ("UPGrad", "upgrad", {}, "sequential"), ("UPGrad", "upgrad", {}, "gramian")]
# Timed inside the steps: the checks of the checked step, and the walk the unchecked step
# takes instead of the labelling one (the leaves and the connected losses).
PARTS = ("read", "graph", "hooks", "state_copy", "walks")


class _Unwatched:
    """``graph.TaskGraph`` without the labels and hooks: what a step without the checks would
    still walk the graph for (the leaves, and whether each loss reaches a shared parameter)."""

    def __init__(self, roots: Any, shared: Any = ()) -> None:
        self.leaves = graph.leaves(roots)
        self.disconnected = [task for task, root in enumerate(roots)
                             if shared and not graph.reaches([root], shared)]

    def watching(self, retain_graph: bool = False) -> Any:
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


def _timed(part: str, times: dict[str, float], call: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            times[part] += time.perf_counter() - start
    return timed


class Probe:
    """Timers around each check of the checked step (and around the walk of the unchecked
    one): seconds per part, per step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    @contextmanager
    def installed(self, checks: bool) -> Iterator[None]:
        times = dict.fromkeys(PARTS, 0.0)
        self.steps.append(times)
        if not checks:
            with _replaced(graph, TaskGraph=_timed("walks", times, _Unwatched)), _replaced(
                    engine, first_non_finite=lambda grads: None, _KeptState=_Unkept):
                yield
            return

        class Timed(graph.TaskGraph):
            def __init__(self, roots: Any, shared: Any = ()) -> None:
                start = time.perf_counter()
                super().__init__(roots, shared)
                times["graph"] += time.perf_counter() - start

            @contextmanager
            def watching(self, retain_graph: bool = False) -> Iterator[None]:
                start = time.perf_counter()
                hooks = super().watching(retain_graph)
                hooks.__enter__()
                times["hooks"] += time.perf_counter() - start
                try:
                    yield
                finally:
                    start = time.perf_counter()
                    hooks.__exit__(None, None, None)
                    times["hooks"] += time.perf_counter() - start

        with _replaced(graph, TaskGraph=Timed), _replaced(
                engine, first_non_finite=_timed("read", times, engine.first_non_finite),
                _KeptState=_timed("state_copy", times, engine._KeptState)):
            yield

    def medians(self, skip: int) -> dict[str, float]:
        timed = self.steps[skip:]
        return {part: statistics.median(step[part] for step in timed) for part in PARTS}


def deconflict_step(name: str, options: dict, mode: str, tasks: int, checks: bool,
                    probe: Probe | None = None) -> Callable[[], None]:
    work = workload(tasks)
    method = deconflict.get(name, **options)
    if mode == "gramian":
        deconflict.track(work.trunk)

    def run() -> None:
        work.optimizer.zero_grad(set_to_none=True)
        context = (probe.installed(checks) if probe is not None else
                   nullcontext() if checks else _unchecked())
        with context:
            _, losses = work.forward()
            deconflict.backward(losses, work.trunk, method, mode=mode)
        work.optimizer.step()

    return run


@contextmanager
def _unchecked() -> Iterator[None]:
    with _replaced(graph, TaskGraph=_Unwatched), _replaced(
            engine, first_non_finite=lambda grads: None, _KeptState=_Unkept):
        yield


def components(tasks: int) -> dict[str, Callable[[], None]]:
    """Each check alone, on the workload's own gradients and graph, as candidates timed in the
    same rounds as the steps."""
    import torch

    work = workload(tasks)
    shared = {id(p) for p in work.trunk.parameters()}
    heads = list(work.heads.parameters())
    params = [*work.trunk.parameters(), *heads]
    z, losses = work.forward()
    grads = torch.autograd.grad(sum(losses), params, retain_graph=True)
    method = deconflict.get("uw")
    method.weights(losses=torch.stack(losses).detach())
    flow = z.detach().clone()

    def labelled() -> None:
        watched = graph.TaskGraph(losses, shared)
        with watched.watching():
            pass

    def hooks() -> None:
        # The hooks' work in the pass: each task's gradient into the trunk output (z's shape)
        # reduced to a sum.
        for _ in range(tasks):
            flow.sum()

    return {"read": lambda: engine.first_non_finite(grads),
            "read_heads": lambda: engine.first_non_finite(grads[-len(heads):]),
            "graph": labelled, "walks": lambda: _Unwatched(losses, shared), "hooks": hooks,
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
            checked, unchecked = Probe(), Probe()
            runs = {"plain": step("plain", None, tasks)[0],
                    "checked": deconflict_step(name, options, mode, tasks, True, checked),
                    "unchecked": deconflict_step(name, options, mode, tasks, False, unchecked),
                    **parts}
            medians = compare(runs, args.repeats, args.warmup)
            in_step = checked.medians(skip=args.warmup)
            # The labelling's own cost: its walk less the one the unchecked step takes anyway.
            in_step["labels"] = in_step["graph"] - unchecked.medians(skip=args.warmup)["walks"]
            medians["labels"] = medians["graph"] - medians["walks"]
            ms = {f"{part}_ms": medians[part] * 1e3 for part in [*parts, "labels"]}
            ms |= {f"{part}_in_step_ms": in_step[part] * 1e3
                   for part in ("read", "labels", "hooks", "state_copy")}
            ms["walks_in_step_ms"] = unchecked.medians(skip=args.warmup)["walks"] * 1e3
            # What each path runs: loss weighting all of it; gradient methods read the heads'
            # gradient (Gramian mode also the shared update), their other check is fused into
            # the Gramian. The hooks' work inside the pass is only measured cold (see above).
            weighted = name in ("mean", "uw")
            read = "read" if weighted or mode == "gramian" else "read_heads"
            cold = [read, *(["labels", "hooks"] if weighted else []),
                    *(["state_copy"] if name == "uw" else [])]
            in_step_total = (sum(in_step[part] for part in ("read", "state_copy"))
                             + (in_step["labels"] + in_step["hooks"] + medians["hooks"]
                                if weighted else 0.0))
            rows.append({"T": tasks, "method": label, "mode": mode, **ms,
                         "components_of_plain": sum(medians[part] for part in cold)
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
    print(banner())
    print(table(rows, [("T", "T"), ("method", "method"), ("mode", "mode"),
                       ("plain_ms", "plain ms"), ("checked_ms", "checked ms"),
                       ("unchecked_ms", "unchecked ms"),
                       ("cost_of_plain", "checks / plain step"), ("read_ms", "read ms"),
                       ("read_heads_ms", "heads' read ms"), ("labels_ms", "labels ms"),
                       ("hooks_ms", "hooks' work ms"), ("state_copy_ms", "UW state ms"),
                       ("components_of_plain", "cold parts / plain step")]))
    print(table(rows, [("T", "T"), ("method", "method"), ("mode", "mode"),
                       ("plain_ms", "plain ms"), ("read_in_step_ms", "read ms"),
                       ("labels_in_step_ms", "labels ms"),
                       ("walks_in_step_ms", "walk anyway ms"),
                       ("hooks_in_step_ms", "hook (un)registration ms"),
                       ("state_copy_in_step_ms", "state ms"),
                       ("in_step_of_plain", "in step / plain step")]))
    print(f"results: {save('non_finite', args, rows)}")


if __name__ == "__main__":
    main()
