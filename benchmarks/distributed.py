"""Distributed: the step time of 2 processes (exact and local modes) against 1, and the traffic.

The workload of ``_workload.py`` with a narrower trunk (512 -> 1024 -> 1024 -> 512, 2.1M
parameters), T linear heads, a global batch of 256, Adam, GradOPS. One process steps on the
whole batch with all cores; 2 gloo processes (started here) each step on half of it with
cores / 2 threads. For T in {3, 10}, in the same interleaved rounds:

- 1 process: a plain step (``sum(losses).backward()``), deconflict (sequential mode) and
  deconflict's representation mode (``features=``);
- 2 processes: plain DDP (``sum(losses).backward()`` on a DistributedDataParallel model),
  deconflict exact, local, and exact in representation mode.

A 2-process step is timed by each rank between two barriers (the slower rank counts). The
traffic is what ``StepRecord.communication`` reports: the payload each rank puts into the
collectives per step.

    .venv/bin/python benchmarks/distributed.py              # about 2 minutes
    .venv/bin/python benchmarks/distributed.py --quick
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _harness import compare, parser, save, setup, table
from _workload import METHODS, Workload, step, workload
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import deconflict

WORLD = 2
WIDTHS = (512, 1024, 1024, 512)
BATCH = 256  # global
METHOD = "GradOPS"
SINGLE = ("plain", "deconflict:sequential", "deconflict:features")
MULTI = ("ddp", "exact", "local", "exact:features")


class _Model(nn.Module):
    """Trunk and heads as one module, for the DDP wrapper."""

    def __init__(self, work: Workload) -> None:
        super().__init__()
        self.trunk, self.heads = work.trunk, work.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1)


def _multi_step(kind: str, tasks: int, rank: int, widths: tuple[int, ...]
                ) -> Callable[[], deconflict.StepRecord | None]:
    """One rank's step of ``kind`` on its half of the global batch."""
    work = workload(tasks, widths=widths, batch=BATCH)
    half = BATCH // WORLD
    work.x = work.x[rank * half:(rank + 1) * half]
    work.y = work.y[:, rank * half:(rank + 1) * half]
    if kind == "ddp":
        model = DistributedDataParallel(_Model(work))

        def run() -> None:
            out = model(work.x)
            sum(((out[:, i] - work.y[i]) ** 2).mean() for i in range(tasks)).backward()
    else:
        name, options = METHODS[METHOD][0]
        method = deconflict.get(name, **options)
        mode, _, features = kind.partition(":")

        def run() -> deconflict.StepRecord:
            z, losses = work.forward()
            return deconflict.backward(losses, work.trunk, method, distributed=mode,
                                       features=z if features else None)

    def timed_step() -> deconflict.StepRecord | None:
        work.optimizer.zero_grad(set_to_none=True)
        record = run()
        work.optimizer.step()
        return record

    return timed_step


def _worker(rank: int, init: str, commands: list, results: Any, task_counts: tuple[int, ...],
            widths: tuple[int, ...], threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    steps = {(tasks, kind): _multi_step(kind, tasks, rank, widths)
             for tasks in task_counts for kind in MULTI}
    while (command := commands[rank].get()) is not None:
        dist.barrier()
        start = time.perf_counter()
        record = steps[command]()
        dist.barrier()
        elapsed = time.perf_counter() - start
        traffic = None if record is None else dataclasses.asdict(record.communication)
        results.put((rank, elapsed, traffic))
    dist.destroy_process_group()


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    task_counts = (3,) if args.quick else (3, 10)
    widths = (64, 128, 128, 64) if args.quick else WIDTHS
    cores = os.cpu_count() or 1
    worker_threads = max(1, (args.threads or cores) // WORLD)
    context = mp.get_context("spawn")
    commands = [context.Queue() for _ in range(WORLD)]
    results = context.Queue()
    traffic: dict[tuple[int, str], dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as directory:
        workers = mp.start_processes(
            _worker, args=(f"file://{Path(directory) / 'store'}", commands, results, task_counts,
                           widths, worker_threads),
            nprocs=WORLD, join=False, start_method="spawn")
        try:
            rows = []
            for tasks in task_counts:
                candidates: dict[str, Callable[[], float]] = {}
                for kind in SINGLE:
                    run = step(kind, METHOD, tasks, widths=widths, batch=BATCH)[0]
                    candidates[f"1p:{kind}"] = _timed(run)
                for kind in MULTI:
                    candidates[f"2p:{kind}"] = _on_workers((tasks, kind), commands, results,
                                                           traffic)
                medians = compare(candidates, args.repeats, args.warmup, self_timed=True)
                rows.append(_row(tasks, widths, medians, traffic))
                print(f"T={tasks}: done", flush=True)
        finally:
            for queue in commands:
                queue.put(None)
            workers.join(timeout=60)
    columns = [("T", "T"), ("1p:plain_ms", "1p plain"), ("1p:deconflict:sequential_ms", "1p"),
               ("1p:deconflict:features_ms", "1p features"), ("2p:ddp_ms", "2p plain DDP"),
               ("2p:exact_ms", "2p exact"), ("2p:local_ms", "2p local"),
               ("2p:exact:features_ms", "2p exact features"), ("exact_vs_1p", "exact / 1p"),
               ("local_vs_1p", "local / 1p"), ("features_vs_1p", "exact features / 1p features")]
    print(f"step times in ms (medians); {METHOD}, d = {rows[0]['d']} shared parameters, "
          f"global batch {BATCH}; 1 process: {torch.get_num_threads()} threads, "
          f"2 processes: {worker_threads} each")
    print(table(rows, columns))
    traffic_columns = [("T", "T"), ("d", "d"), ("h", "h")]
    for kind in ("exact", "local", "exact:features"):
        traffic_columns += [(f"{kind}_elements", f"{kind} elements"), (f"{kind}_MB", f"{kind} MB")]
    print("payload per rank and step (StepRecord.communication)")
    print(table(rows, traffic_columns))
    print(f"written: {save('distributed', args, rows)}")


def _timed(run: Callable[[], Any]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    return timed


def _on_workers(key: tuple[int, str], commands: list, results: Any,
                traffic: dict[tuple[int, str], dict[str, int]]) -> Callable[[], float]:
    def timed() -> float:
        for queue in commands:
            queue.put(key)
        elapsed = []
        for _ in range(WORLD):
            _, seconds, communication = results.get(timeout=600)
            elapsed.append(seconds)
            if communication is not None:
                traffic[key] = communication
        return max(elapsed)
    return timed



def _row(tasks: int, widths: tuple[int, ...], medians: dict[str, float],
         traffic: dict[tuple[int, str], dict[str, int]]) -> dict[str, Any]:
    work = workload(tasks, widths=widths, batch=1)
    row: dict[str, Any] = {"T": tasks, "d": sum(p.numel() for p in work.trunk.parameters()),
                           "h": sum(p.numel() for p in work.heads.parameters())}
    row.update({f"{name}_ms": seconds * 1e3 for name, seconds in medians.items()})
    row["exact_vs_1p"] = medians["2p:exact"] / medians["1p:deconflict:sequential"]
    row["local_vs_1p"] = medians["2p:local"] / medians["1p:deconflict:sequential"]
    row["features_vs_1p"] = medians["2p:exact:features"] / medians["1p:deconflict:features"]
    for kind in ("exact", "local", "exact:features"):
        sent = traffic[(tasks, kind)]
        row[f"{kind}_elements"] = sent["all_reduce_elements"] + sent["all_gather_elements"]
        row[f"{kind}_MB"] = (sent["all_reduce_bytes"] + sent["all_gather_bytes"]
                             + sent["broadcast_bytes"]) / 1e6
        row[f"{kind}_traffic"] = sent
    return row


if __name__ == "__main__":
    main()
