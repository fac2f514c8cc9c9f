"""Gramian mode swept in groups of layers (``deconflict.track(trunk, max_sweeps=4)``): step time.

The step benchmark's workloads (``_workload.py``), UPGrad: the plain step, Gramian mode on a
trunk tracked as usual (one sweep of the rows, ``.grad`` from the layers' rules), the same
with ``max_sweeps=4`` (where the layers' data would exceed an estimate of the plain step's
memory, the rows are swept once per group of layers and ``.grad`` comes from one weighted
backward pass: ``tracking.sweep_groups``), and TorchJD's autogram engine, timed in interleaved,
shuffled rounds (medians). Prints each as a ratio to the plain step, the swept mode's number of
sweeps, and swept / autogram (goal of issue 15: <= 0.8). The peak memory of the same variants:
``memory.py`` ("deconflict:gramian-sweeps").

    .venv/bin/python benchmarks/gramian_sweeps.py --threads 1 --repeats 3 --warmup 1
"""

from __future__ import annotations

from typing import Any

from _harness import banner, compare, parser, save, setup, table
from _workload import step

from deconflict import tracking

SWEPT = "deconflict:gramian-sweeps"  # max_sweeps = _workload.SWEEPS
KINDS = ("plain", "deconflict:gramian", SWEPT, "torchjd:autogram")


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

            def spy(*a: Any, original: Any = original, counts: list[int] = counts) -> Any:
                groups = original(*a)
                counts.append(len(groups))
                return groups

            tracking.sweep_groups = spy  # type: ignore[assignment]
            runs[SWEPT]()  # one step to count the swept mode's sweeps
            tracking.sweep_groups = original
            sweeps = counts[-1]
            times = compare(runs, args.repeats, args.warmup)
            plain = times["plain"]
            rows.append({"workload": architecture, "T": tasks, "plain_ms": 1e3 * plain,
                         "gramian": times["deconflict:gramian"] / plain,
                         "swept": times[SWEPT] / plain, "sweeps": sweeps,
                         "autogram": times["torchjd:autogram"] / plain,
                         "swept_vs_autogram": times[SWEPT] / times["torchjd:autogram"],
                         "gramian_vs_autogram": (times["deconflict:gramian"]
                                                 / times["torchjd:autogram"])})
            print(f"{architecture} T={tasks}: done", flush=True)
    print(banner())
    print(table(rows, [("workload", "workload"), ("T", "T"), ("plain_ms", "plain (ms)"),
                       ("gramian", "Gramian mode"), ("swept", "max_sweeps=4"),
                       ("sweeps", "sweeps"), ("autogram", "TorchJD autogram"),
                       ("gramian_vs_autogram", "Gramian / autogram"),
                       ("swept_vs_autogram", "swept / autogram (goal <= 0.8)")]))
    print(f"written: {save('gramian_sweeps', args, rows)}")


if __name__ == "__main__":
    main()
