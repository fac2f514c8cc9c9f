"""Step: a full training step of each engine mode against TorchJD (autojac and autogram).

The workloads are in ``_workload.py``: an MLP (5.05M parameters, batch 256), a VGG-like CNN
(2.31M, 32 x 32 images, batch 64), a Transformer encoder (2 layers, d = 256, 32 tokens, batch 64)
at T in {3, 10}, and "celeba" (the CNN trunk with T = 40 binary heads, batch 16). Every variant
builds its own copy of the model (same seed) and steps with Adam; all variants of a row run in
the same interleaved, shuffled rounds (``_harness.compare``) and report medians:

- plain: ``sum(losses).backward()``, the cost without any gradient method;
- deconflict sequential / batched / gramian (tracked trunk) / auto (tracked trunk: the mode the
  library picks, named in the table);
- TorchJD autojac: ``mtl_backward`` + ``jac_to_grad`` (also with
  ``optimize_gramian_computation``); TorchJD autogram: ``Engine(trunk, batch_dim=None)``,
  ``compute_gramian(torch.stack(losses))``, the method's ``...Weighting``,
  ``torch.stack(losses).backward(weights)``;
- with ``--extras``: representation mode (``features=``), the floors of the sequential and
  batched modes (their T backward passes and nothing else) and LibMTL.

At T = 40 every Gramian method runs in Gramian mode, as mode="gramian" (memory-bounded: it may
sweep the rows in groups) and as mode="auto" on the tracked trunk (one sweep), with TorchJD's
autogram where it has the weighting; UPGrad also in the other modes and TorchJD's autojac. A
variant a library refuses (e.g. a module it cannot track) is listed with the reason instead of
a time.

    .venv/bin/python benchmarks/step.py                        # about 25 minutes on 2 cores
    .venv/bin/python benchmarks/step.py --quick                # T = 3, no T = 40: ~2 minutes
    .venv/bin/python benchmarks/step.py --workloads mlp,cnn --tasks 3
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from _harness import banner, compare, parser, save, setup, table
from _workload import ARCHITECTURES, CELEBA_TASKS, first_step

# Gramian methods of the T = 40 comparison (all in deconflict; GradOPS is not in TorchJD).
MANY_TASK_METHODS = ("UPGrad", "MGDA", "PCGrad", "IMTL-G", "CAGrad", "GradOPS")
OURS = ("deconflict:sequential", "deconflict:batched", "deconflict:gramian",
        "deconflict:auto-tracked")
THEIRS = ("torchjd", "torchjd:gramian", "torchjd:autogram")
EXTRAS = ("deconflict:features", "gradients:sequential", "gradients:batched", "libmtl")
LABELS = {"plain": "plain", "deconflict:sequential": "sequential",
          "deconflict:batched": "batched", "deconflict:gramian": "Gramian mode",
          "deconflict:auto-tracked": "auto", "deconflict:features": "features",
          "gradients:sequential": "floor seq.", "gradients:batched": "floor batched",
          "torchjd": "TorchJD autojac", "torchjd:gramian": "autojac (Gramian opt.)",
          "torchjd:autogram": "TorchJD autogram", "libmtl": "LibMTL"}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return numerator / denominator


def measure(variants: Sequence[tuple[str, str | None]], tasks: int, architecture: str, *,
            repeats: int, warmup: int, small: bool = False, device: str = "cpu",
            wrap: Callable[[Callable[[], Any]], Callable[[], Any]] | None = None
            ) -> tuple[dict[tuple[str, str | None], float], dict[tuple[str, str | None], str],
                       dict[str, str]]:
    """Median seconds of each (kind, method) variant that runs, why the others do not, and the
    mode each method's tracked ``auto`` picked. ``wrap`` (e.g. a CUDA synchronize) goes around
    every candidate."""
    runs: dict[tuple[str, str | None], Callable[[], Any]] = {}
    skipped: dict[tuple[str, str | None], str] = {}
    picked: dict[str, str] = {}
    for kind, method in variants:
        run, why, result = first_step(kind, method, tasks, architecture=architecture,
                                      small=small, device=device)
        if run is None:
            skipped[kind, method] = why or "?"
            continue
        if kind == "deconflict:auto-tracked" and method is not None:
            picked[method] = result.mode  # the first step's record names the mode
        runs[kind, method] = wrap(run) if wrap else run
    named = {f"{kind}|{method}": run for (kind, method), run in runs.items()}
    medians = compare(named, repeats, warmup)
    times = {(key.split("|")[0], None if key.split("|")[1] == "None" else key.split("|")[1]):
             seconds for key, seconds in medians.items()}
    return times, skipped, picked


def row_of(architecture: str, tasks: int, method: str, times: dict, skipped: dict,
           picked: dict[str, str], kinds: Sequence[str]) -> dict[str, Any]:
    """One table row: ms per variant, ratios to plain, and the goal ratios."""
    plain = times.get(("plain", None))
    row: dict[str, Any] = {"workload": architecture, "T": tasks, "method": method,
                           "plain_ms": None if plain is None else plain * 1e3,
                           "auto_picks": picked.get(method)}
    for kind in kinds[1:]:
        seconds = times.get((kind, method))
        row[f"{kind}_ms"] = None if seconds is None else seconds * 1e3
        row[f"{kind}_x"] = _ratio(seconds, plain)
        if (kind, method) in skipped:
            row[f"{kind}_why"] = skipped[kind, method]
    ours = [times[k, method] for k in OURS if (k, method) in times]
    theirs = [times[k, method] for k in THEIRS if (k, method) in times]
    row["best_ms"] = min(ours) * 1e3 if ours else None
    row["gramian_vs_autogram"] = _ratio(times.get(("deconflict:gramian", method)),
                                        times.get(("torchjd:autogram", method)))
    row["best_vs_torchjd_best"] = _ratio(min(ours) if ours else None,
                                         min(theirs) if theirs else None)
    return row


def _cell_x(row: dict[str, Any], kind: str) -> str:
    if row.get(f"{kind}_x") is not None:
        return f"{row[f'{kind}_x']:.2f}"
    why = row.get(f"{kind}_why")
    if why is None:
        return "-"
    return "n/a" if why.startswith(("not in", "TorchJD has no")) else "refused"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated, of {','.join(ARCHITECTURES)} (default: all; "
                   "--quick: all but celeba)")
    p.add_argument("--tasks", default=None, help="task counts of mlp/cnn/transformer "
                   "(default 3,10; --quick: 3)")
    p.add_argument("--methods", default="UPGrad",
                   help="methods of the T = 3/10 rows (default UPGrad); T = 40 runs "
                   + ",".join(MANY_TASK_METHODS))
    p.add_argument("--extras", action="store_true",
                   help="also representation mode, the floors and LibMTL")
    p.add_argument("--small", action="store_true", help="toy sizes (a smoke test of the code)")
    p.set_defaults(repeats=5, warmup=1)
    args = p.parse_args()
    setup(args)
    chosen = args.workloads or ("mlp,cnn,transformer" if args.quick else ",".join(ARCHITECTURES))
    workloads = [w.strip() for w in chosen.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(ARCHITECTURES))
    if unknown:
        p.error(f"unknown workloads {unknown}; choose from {','.join(ARCHITECTURES)}")
    task_counts = [int(t) for t in (args.tasks or ("3" if args.quick else "3,10")).split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    kinds = ["plain", *OURS, *THEIRS, *(EXTRAS if args.extras else ())]
    rows: list[dict[str, Any]] = []
    many: list[dict[str, Any]] = []
    for architecture in workloads:
        if architecture == "celeba":
            many += many_tasks(args)
            continue
        for tasks in task_counts:
            variants = [("plain", None)] + [(k, m) for m in methods for k in kinds[1:]]
            times, skipped, picked = measure(variants, tasks, architecture,
                                             repeats=args.repeats, warmup=args.warmup,
                                             small=args.small)
            for method in methods:
                rows.append(row_of(architecture, tasks, method, times, skipped, picked, kinds))
            print(f"{architecture} T={tasks}: done", flush=True)
    print(banner())
    print_tables(rows, many, kinds)
    print(f"written: {save('step', args, rows + many)}")


def many_tasks(args: Any) -> list[dict[str, Any]]:
    """The T = 40 rows: every Gramian method in Gramian mode, both as mode="gramian" (which
    sweeps the rows in groups where their data would exceed the plain step's memory) and as
    mode="auto" on the tracked trunk (one sweep, the fastest), UPGrad in every variant."""
    tasks = CELEBA_TASKS
    variants: list[tuple[str, str | None]] = [("plain", None)]
    variants += [(k, "UPGrad") for k in (*OURS, *THEIRS)]
    for method in MANY_TASK_METHODS[1:]:
        variants += [("deconflict:gramian", method), ("deconflict:auto-tracked", method),
                     ("torchjd:autogram", method)]
    times, skipped, picked = measure(variants, tasks, "celeba", repeats=args.repeats,
                                     warmup=args.warmup, small=args.small)
    rows = [row_of("celeba", tasks, method, times, skipped, picked, ["plain", *OURS, *THEIRS])
            for method in MANY_TASK_METHODS]
    # The methods compared in the same (fastest) variant: auto's one-sweep Gramian mode.
    fastest = [r["deconflict:auto-tracked_ms"] for r in rows if r["deconflict:auto-tracked_ms"]]
    for row in rows:
        row["auto_vs_fastest_method"] = _ratio(row["deconflict:auto-tracked_ms"],
                                                  min(fastest) if fastest else None)
    print("celeba T=40: done", flush=True)
    return rows


def print_tables(rows: list[dict[str, Any]], many: list[dict[str, Any]],
                 kinds: Sequence[str]) -> None:
    for row in [*rows, *many]:
        for kind in kinds[1:]:
            row[f"{kind}_cell"] = _cell_x(row, kind)
    if rows:
        print("\nstep time / plain step (medians; plain in ms)")
        columns = [("workload", "workload"), ("T", "T"), ("method", "method"),
                   ("plain_ms", "plain (ms)"),
                   *((f"{k}_cell", LABELS[k]) for k in kinds[1:]),
                   ("auto_picks", "auto picks"),
                   ("gramian_vs_autogram", "Gramian / autogram (goal <= 0.8)"),
                   ("best_vs_torchjd_best", "our best / TorchJD best")]
        print(table(rows, columns))
    if many:
        print(f"\nT = {CELEBA_TASKS} (CNN trunk, batch 16): step time / plain step")
        columns = [("method", "method"), ("plain_ms", "plain (ms)"),
                   *((f"{k}_cell", LABELS[k]) for k in kinds[1:] if k not in EXTRAS),
                   ("auto_picks", "auto picks"),
                   ("best_vs_torchjd_best", "our best / TorchJD best (goal <= 0.8)"),
                   ("auto_vs_fastest_method", "auto / fastest method's auto (goal <= 1.2)")]
        print(table(many, columns))
    for row in [*rows, *many]:
        for kind in kinds:
            if f"{kind}_why" in row:
                print(f"  {row['workload']} T={row['T']} {row['method']} {LABELS[kind]}: "
                      f"{row[f'{kind}_why']}")
        for kind in kinds[1:]:
            row.pop(f"{kind}_cell", None)


if __name__ == "__main__":
    main()
