"""Gramian mode's sweeps in groups of layers (``tracking.sweeps_for``): step time, bounded or not.

The step benchmark's workloads (``_workload.py``), UPGrad: the plain step; mode="gramian" on a
trunk tracked as usual, which sweeps the rows once per group of layers (at most
``tracking.DEFAULT_MAX_SWEEPS``) where the layers' data would exceed half an estimate of the
plain step's memory, and then writes ``.grad`` by one weighted backward pass (``sweep_groups``);
the same with every cut of the graph between sweeps used, whatever the size of the rows'
gradients there (``tracking.graph_cuts`` without its budget; mode="gramian" uses a cut only where
they fit the budget beside the two groups' data); mode="auto" on the same tracked trunk, whose
Gramian mode takes one sweep (the fastest); and TorchJD's autogram engine, timed in
interleaved, shuffled rounds (medians). Prints each as a ratio to the plain step, the number of
sweeps mode="gramian" took and of cuts each variant used, and the Gramian variants against
autogram (goal of issue 15: <= 0.8). Their peak memory: ``memory.py``.

    .venv/bin/python benchmarks/gramian_sweeps.py --threads 1 --repeats 3 --warmup 1
"""

from __future__ import annotations

from typing import Any

from _harness import banner, compare, parser, save, setup, table
from _workload import step

from deconflict import tracking

BOUNDED = "deconflict:gramian"  # mode="gramian": swept where its data would exceed the budget
ONE_SWEEP = "deconflict:auto-tracked"  # mode="auto": Gramian mode in one sweep
EVERY_CUT = "deconflict:gramian-every-cut"  # mode="gramian", every cut used whatever its size
KINDS = ("plain", BOUNDED, EVERY_CUT, ONE_SWEEP, "torchjd:autogram")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workloads", default="cnn,transformer",
                   help="comma-separated, of mlp,cnn,transformer (default cnn,transformer)")
    p.add_argument("--tasks", default="10", help="task counts (default 10)")
    args = p.parse_args()
    setup(args)
    rows: list[dict[str, Any]] = []
    for architecture in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        for tasks in [int(t) for t in args.tasks.split(",")]:
            runs = {}
            counts: list[int] = []
            for kind in KINDS:
                runs[kind], _ = step(kind, None if kind == "plain" else "UPGrad", tasks,
                                     architecture=architecture, small=args.quick)
            original = tracking.sweep_groups
            original_cuts = tracking.graph_cuts
            used: list[int] = []

            def spy(*a: Any, original: Any = original, counts: list[int] = counts) -> Any:
                groups = original(*a)
                counts.append(len(groups))
                return groups

            def spy_cuts(*a: Any, original: Any = original_cuts, used: list[int] = used) -> Any:
                cuts = original(*a)
                used.append(sum(cut is not None for cut in cuts))
                return cuts

            tracking.sweep_groups = spy  # type: ignore[assignment]
            tracking.graph_cuts = spy_cuts  # type: ignore[assignment]
            runs[BOUNDED]()  # one step to count mode="gramian"'s sweeps and the cuts it used
            runs[EVERY_CUT]()
            tracking.sweep_groups = original
            tracking.graph_cuts = original_cuts  # type: ignore[assignment]
            sweeps = counts[-2]
            cuts, every = (used[0], used[1]) if len(used) == 2 else (0, 0)
            times = compare(runs, args.repeats, args.warmup)
            plain = times["plain"]
            autogram = times["torchjd:autogram"]
            rows.append({"workload": architecture, "T": tasks, "plain_ms": 1e3 * plain,
                         "gramian": times[BOUNDED] / plain, "sweeps": sweeps, "cuts": cuts,
                         "every_cut": times[EVERY_CUT] / plain, "cuts_every": every,
                         "every_cut_vs_autogram": times[EVERY_CUT] / autogram,
                         "one_sweep": times[ONE_SWEEP] / plain, "autogram": autogram / plain,
                         "gramian_vs_autogram": times[BOUNDED] / autogram,
                         "one_sweep_vs_autogram": times[ONE_SWEEP] / autogram})
            print(f"{architecture} T={tasks}: done", flush=True)
    print(banner())
    print(table(rows, [("workload", "workload"), ("T", "T"), ("plain_ms", "plain (ms)"),
                       ("gramian", "mode=gramian"), ("sweeps", "its sweeps"),
                       ("cuts", "cuts it used"),
                       ("every_cut", "every cut used"), ("cuts_every", "cuts"),
                       ("one_sweep", "mode=auto (one sweep)"),
                       ("autogram", "TorchJD autogram"),
                       ("gramian_vs_autogram", "gramian / autogram (goal <= 0.8)"),
                       ("every_cut_vs_autogram", "every cut / autogram"),
                       ("one_sweep_vs_autogram", "auto / autogram")]))
    print(f"written: {save('gramian_sweeps', args, rows)}")


if __name__ == "__main__":
    main()
