"""Many tasks: the T x T part of each method (Gramian to weights) at T in {10, 30, 100}.

Everything that does not grow with d: given the float64 Gramian M, the method's weights. GradOPS
solves one Schur system per task (METHODS.md Section 2); the question is whether that stays cheap
when T reaches 100. Two Gramians per T, from a T x 4T Gaussian J with a shared component (every
pair of tasks correlated, some conflicting): full rank, and rank T/2 (half the tasks in the span
of the others, GradOPS's dependent-task path). TorchJD's Gramian weightings run on the same M
where it has the method.

    .venv/bin/python benchmarks/many_tasks.py            # about 3 minutes
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from _harness import compare, parser, save, setup, table

import deconflict

# (label, deconflict name and options, TorchJD weighting class or None)
METHODS: list[tuple[str, tuple[str, dict], str | None]] = [
    ("GradOPS", ("gradops", {}), None),
    ("GradOPS alpha=-2", ("gradops", {"alpha": -2.0}), None),
    ("PCGrad", ("pcgrad", {}), "PCGradWeighting"),
    ("MGDA", ("mgda", {}), "MGDAWeighting"),
    ("IMTL-G", ("imtl_g", {}), "IMTLGWeighting"),
    ("CAGrad", ("cagrad", {"c": 0.5, "rescale": 1}), None),
    ("UPGrad", ("upgrad", {}), "UPGradWeighting"),
]


def gramian(T: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """J J^T (float64) for a T x 4T J of the given rank, tasks correlated through a shared row."""
    basis = torch.randn(rank, 4 * T, generator=generator, dtype=torch.float64)
    mixing = torch.randn(T, rank, generator=generator, dtype=torch.float64)
    J = mixing @ basis
    J += 0.5 * J.mean(dim=0)  # a common direction: most pairs agree, some still conflict
    return J @ J.T


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    setup(args)
    import torchjd.aggregation as torchjd_aggregation

    generator = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for T in ((10, 30) if args.quick else (10, 30, 100)):
        for rank_label, rank in (("full", T), ("T/2", T // 2)):
            M = gramian(T, rank, generator)
            runs: dict[str, Callable[[], Any]] = {}
            for label, (name, options), theirs in METHODS:
                method = deconflict.get(name, **options)
                runs[f"deconflict {label}"] = lambda m=method, g=M: m.weights(g)
                if theirs is not None:
                    weighting = getattr(torchjd_aggregation, theirs)()
                    runs[f"TorchJD {label}"] = lambda w=weighting, g=M: w(g)
            times = compare(runs, args.repeats, args.warmup)
            for label, _, _ in METHODS:
                ours = times[f"deconflict {label}"]
                other = times.get(f"TorchJD {label}")
                rows.append({"T": T, "rank": rank_label, "method": label, "ms": 1e3 * ours,
                             "torchjd_ms": None if other is None else 1e3 * other})
            print(f"T={T} rank {rank_label}: GradOPS "
                  f"{1e3 * times['deconflict GradOPS']:.2f} ms", flush=True)
    print(table(rows, [("T", "T"), ("rank", "rank of M"), ("method", "method"),
                       ("ms", "deconflict (ms)"), ("torchjd_ms", "TorchJD (ms)")]))
    print(f"written: {save('many_tasks', args, rows)}")


if __name__ == "__main__":
    main()
