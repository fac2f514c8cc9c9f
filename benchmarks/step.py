"""Step: a full training step with each engine mode, TorchJD and LibMTL, against a plain step.

The workload is in ``_workload.py`` (MLP trunk of 5.05M parameters, T heads, batch 256, Adam).
For T in {3, 10} and each method, every variant runs in the same interleaved rounds:

- plain: ``sum(losses).backward()``, the cost without any gradient method;
- deconflict sequential / batched / gramian / features (representation mode);
- floors: the forward pass, the T backward passes of the sequential or batched mode and the
  optimizer step, without Gramian, method or combination; the method's own overhead (Gramian,
  weights, J^T c into .grad, checks) is (mode - floor) / mode;
- TorchJD ``mtl_backward`` + ``jac_to_grad`` (and with ``optimize_gramian_computation``);
- LibMTL's weighting ``backward`` as its trainer calls it.

    .venv/bin/python benchmarks/step.py              # about 15 minutes
    .venv/bin/python benchmarks/step.py --quick      # T = 3, two methods
"""

from __future__ import annotations

from typing import Any

from _harness import compare, parser, save, setup, table
from _workload import METHODS, MODES, available, step


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    task_counts = (3,) if args.quick else (3, 10)
    methods = ["UPGrad", "GradOPS"] if args.quick else list(METHODS)
    rows: list[dict[str, Any]] = []
    for tasks in task_counts:
        for method in methods:
            kinds = ["plain", *(f"deconflict:{m}" for m in MODES), "gradients:sequential",
                     "gradients:batched", "torchjd", "torchjd:gramian", "libmtl"]
            runs, skipped = {}, {}
            for kind in kinds:
                why = available(kind, method, tasks)
                if why is None:
                    runs[kind] = step(kind, method, tasks)[0]
                else:
                    skipped[kind] = why
            medians = compare(runs, args.repeats, args.warmup)
            plain = medians["plain"]
            row: dict[str, Any] = {"T": tasks, "method": method, "plain_ms": plain * 1e3}
            for kind, seconds in medians.items():
                row[f"{kind}_ms"] = seconds * 1e3
            for kind, why in skipped.items():
                row[f"{kind}_ms"] = None
                row[f"{kind}_why"] = why
            for mode in ("sequential", "batched"):
                total = medians[f"deconflict:{mode}"]
                row[f"{mode}_overhead"] = (total - medians[f"gradients:{mode}"]) / total
            best = min(medians[f"deconflict:{m}"] for m in ("sequential", "batched", "gramian"))
            row["best_ms"] = best * 1e3
            if "torchjd" in medians:
                theirs = min(medians["torchjd"], medians.get("torchjd:gramian", float("inf")))
                row["vs_torchjd"] = best / theirs
            if "libmtl" in medians:
                row["vs_libmtl"] = best / medians["libmtl"]
            row["features_vs_plain"] = medians["deconflict:features"] / plain
            rows.append(row)
            print(f"T={tasks} {method}: done", flush=True)
    columns = [("T", "T"), ("method", "method"), ("plain_ms", "plain"),
               ("deconflict:sequential_ms", "sequential"), ("deconflict:batched_ms", "batched"),
               ("deconflict:gramian_ms", "gramian"), ("deconflict:features_ms", "features"),
               ("torchjd_ms", "TorchJD"), ("torchjd:gramian_ms", "TorchJD (Gramian opt.)"),
               ("libmtl_ms", "LibMTL"), ("vs_torchjd", "best / TorchJD"),
               ("vs_libmtl", "best / LibMTL"), ("sequential_overhead", "seq. overhead"),
               ("batched_overhead", "batched overhead"), ("features_vs_plain", "features / plain")]
    print("times in ms (medians)")
    print(table(rows, columns))
    print(f"written: {save('step', args, rows)}")


if __name__ == "__main__":
    main()
