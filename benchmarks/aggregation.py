"""Aggregation: the update of a given T x d float32 Jacobian, as a multiple of one pass over J.

For T in {3, 10} and d in {1e5, 1e6, 1e7}, each method of deconflict, TorchJD and LibMTL maps the
same random J to its update; the table gives each median time divided by that of ``J.sum(0)``
(one pass over J, measured in the same rounds). A Gramian method reads J twice (M = J J^T, then
J^T c), so about 2 is the floor.

    .venv/bin/python benchmarks/aggregation.py            # the full table (about 15 minutes)
    .venv/bin/python benchmarks/aggregation.py --quick    # d = 1e4, 1e5 only
    .venv/bin/python benchmarks/aggregation.py --tasks 10 --dims 1e7 --libraries deconflict \
        --repeats 21                                      # one size, more rounds
    .venv/bin/python benchmarks/aggregation.py --solvers 40 --threads 1 --cpu-time  # T x T solves
    .venv/bin/python benchmarks/aggregation.py --threads 1 --cpu-time --libraries deconflict \
        TorchJD --dims 1e3 1e5                            # per-call cost on a loaded machine
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from _harness import compare, parser, save, setup, table

import deconflict

# (label, deconflict name and options, TorchJD class and arguments, LibMTL class and kwargs)
METHODS: list[tuple[str, tuple[str, dict], tuple[str, dict] | None, tuple[str, dict] | None]] = [
    ("GradOPS", ("gradops", {}), None, None),
    ("PCGrad", ("pcgrad", {}), ("PCGrad", {}), ("PCGrad", {})),
    ("MGDA", ("mgda", {}), ("MGDA", {}), ("MGDA", {"mgda_gn": "none"})),
    ("IMTL-G", ("imtl_g", {}), ("IMTLG", {}), ("IMTL", {})),
    ("CAGrad", ("cagrad", {"c": 0.5, "rescale": 1}), ("CAGrad", {"c": 0.5}),
     ("CAGrad", {"calpha": 0.5, "rescale": 1})),
    ("UPGrad", ("upgrad", {}), ("UPGrad", {}), None),
    ("Nash-MTL", ("nash_mtl", {}), ("NashMTL", {"n_tasks": None}), None),
    ("DualProj", ("dualproj", {}), ("DualProj", {}), None),
    ("Aligned-MTL", ("aligned_mtl", {}), ("AlignedMTL", {}), None),
    ("ConFIG", ("config", {}), ("ConFIG", {}), None),
    ("FairGrad", ("fairgrad", {"alpha": 1.0}), ("FairGrad", {"alpha": 1.0}), None),
    ("GradVac", ("gradvac", {"beta": 0.5}), ("GradVac", {"beta": 0.5}), None),
    ("Mean", ("mean", {}), ("Mean", {}), None),
]


LIBRARIES = ("deconflict", "TorchJD", "LibMTL")


def candidates_for(
    J: torch.Tensor, libraries: tuple[str, ...] = LIBRARIES
) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """The timed functions and, for libraries that cannot run a method, why."""
    import torchjd.aggregation as torchjd_aggregation
    from _libmtl import given_jacobian

    T = J.shape[0]
    runs: dict[str, Callable[[], Any]] = {"one pass": lambda: J.sum(0)}
    missing: dict[str, str] = {}
    for label, (name, options), theirs, libmtl in METHODS:
        method = deconflict.get(name, **options)
        runs[f"deconflict {label}"] = lambda m=method: deconflict.aggregate(J, m)
        if theirs is not None and "TorchJD" in libraries:
            cls, kwargs = theirs
            kwargs = {k: (T if v is None else v) for k, v in kwargs.items()}
            aggregator = getattr(torchjd_aggregation, cls)(**kwargs)
            runs[f"TorchJD {label}"] = lambda a=aggregator: a(J)
        if libmtl is not None and "LibMTL" in libraries:
            cls, kwargs = libmtl
            weighting = given_jacobian(cls, J)
            if weighting is None:
                missing[f"LibMTL {label}"] = "LibMTL not installed (pip install --no-deps LibMTL)"
            elif cls == "CAGrad" and T != 3:
                # LibMTL 1.1.5's CAGrad reshapes its weights to (1, 3): three tasks only.
                missing[f"LibMTL {label}"] = "LibMTL's CAGrad is written for 3 tasks"
            else:
                zeros = torch.zeros(T)  # its loss arguments, unused by these methods
                runs[f"LibMTL {label}"] = (
                    lambda w=weighting, k=kwargs, z=zeros: w.backward(z, **k))
    return runs, missing


def _cpu_timed(run: Callable[[], Any]) -> Callable[[], float]:
    """``run`` reporting the CPU time of this thread it took (``compare(self_timed=True)``):
    on a machine shared with other processes, time spent waiting for a core is not counted.
    Calls that take under 1 ms are repeated to get above the clock's resolution."""
    def timed() -> float:
        start = time.thread_time()
        run()
        once = time.thread_time() - start
        if once >= 1e-3:
            return once
        count = max(1, int(2e-3 / max(once, 1e-6)))
        start = time.thread_time()
        for _ in range(count):
            run()
        return (time.thread_time() - start) / count
    return timed


def solver_gramians(T: int) -> dict[str, torch.Tensor]:
    """Gramians of four kinds of T x 4000 Jacobians (seeded): independent Gaussian rows, rows
    near one shared direction (near-collinear), rank 8 (T > rank: every min-norm solver's
    degenerate case), and norms spread over 1e6."""
    g = torch.Generator().manual_seed(T)
    base = torch.randn(4000, generator=g, dtype=torch.float64)
    kinds = {
        "random": torch.randn(T, 4000, generator=g, dtype=torch.float64),
        "collinear": base + 0.05 * torch.randn(T, 4000, generator=g, dtype=torch.float64),
        "rank 8": torch.randn(T, 8, generator=g, dtype=torch.float64)
        @ torch.randn(8, 4000, generator=g, dtype=torch.float64),
        "norms 1e6 apart": torch.randn(T, 4000, generator=g, dtype=torch.float64)
        * torch.logspace(0, 6, T, dtype=torch.float64)[:, None],
    }
    return {kind: J @ J.T for kind, J in kinds.items()}


def solver_rows(T: int, repeats: int, warmup: int, cpu_time: bool = False
                ) -> list[dict[str, Any]]:
    """The weights of every Gramian weighting from a given T x T Gramian, in ms (the T x T
    solve alone: what a step adds on top of the two passes over J)."""
    from deconflict.methods.base import GramianWeighting
    from deconflict.methods.registry import available

    gramians = solver_gramians(T)
    losses = torch.ones(T)
    runs: dict[str, Callable[[], Any]] = {}
    for name in available():
        if not isinstance(deconflict.get(name), GramianWeighting):
            continue
        for kind, M in gramians.items():
            method = deconflict.get(name)
            runs[f"{name}|{kind}"] = lambda m=method, G=M: m.weights(G, losses=losses)
    if cpu_time:
        runs = {key: _cpu_timed(run) for key, run in runs.items()}
    medians = compare(runs, repeats, warmup, self_timed=cpu_time)
    rows: dict[str, dict[str, Any]] = {}
    for key, seconds in medians.items():
        name, kind = key.split("|")
        rows.setdefault(name, {"T": T, "method": name})[kind] = seconds * 1e3
    return list(rows.values())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[3, 10], help="T values (3 10)")
    p.add_argument("--dims", type=float, nargs="+", default=None,
                   help="d values (default 1e5 1e6 1e7; --quick: 1e4 1e5)")
    p.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES),
                   help="libraries to compare (default all)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time each call by the CPU time of this thread, not the wall clock "
                        "(robust on a loaded machine; needs --threads 1)")
    p.add_argument("--solvers", type=int, default=None, metavar="T",
                   help="instead: the T x T solve of every Gramian weighting at this T (ms)")
    args = p.parse_args()
    if args.cpu_time and args.threads != 1:
        p.error("--cpu-time measures this thread only: pass --threads 1")
    setup(args)
    if args.solvers is not None:
        solved = solver_rows(args.solvers, args.repeats, args.warmup, args.cpu_time)
        kinds = list(solver_gramians(2))
        print(table(solved, [("method", "method"), *[(k, f"{k} (ms)") for k in kinds]]))
        print(f"written: {save('aggregation_solvers', args, solved)}")
        return
    if args.dims is not None:
        sizes = [int(d) for d in args.dims]
    else:
        sizes = [10_000, 100_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    for T in args.tasks:
        for d in sizes:
            J = torch.randn(T, d, generator=torch.Generator().manual_seed(T * d))
            runs, missing = candidates_for(J, tuple(args.libraries))
            notes.update(missing)
            # LibMTL takes seconds per call at d = 1e7: fewer rounds keep the run bounded.
            slow = "LibMTL" in args.libraries and d >= 10_000_000
            repeats = max(3, args.repeats // 2) if slow else args.repeats
            if args.cpu_time:
                runs = {name: _cpu_timed(run) for name, run in runs.items()}
            medians = compare(runs, repeats, args.warmup, self_timed=args.cpu_time)
            base = medians["one pass"]
            for label, *_ in METHODS:
                row: dict[str, Any] = {"T": T, "d": d, "method": label,
                                       "one_pass_ms": base * 1e3}
                for library in ("deconflict", "TorchJD", "LibMTL"):
                    key = f"{library} {label}"
                    seconds = medians.get(key)
                    row[f"{library}_ms"] = None if seconds is None else seconds * 1e3
                    row[library] = None if seconds is None else seconds / base
                rows.append(row)
            print(f"T={T} d={d:.0e}: one pass {base * 1e3:.2f} ms", flush=True)
    columns = [("T", "T"), ("d", "d"), ("method", "method"), ("one_pass_ms", "one pass (ms)"),
               ("deconflict", "deconflict (x pass)"), ("TorchJD", "TorchJD (x pass)"),
               ("LibMTL", "LibMTL (x pass)")]
    print(table(rows, columns))
    for key, why in sorted(notes.items()):
        print(f"- {key}: {why}")
    print(f"written: {save('aggregation', args, rows, {'not_run': notes})}")


if __name__ == "__main__":
    main()
