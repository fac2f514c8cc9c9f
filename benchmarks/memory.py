"""Memory: the peak resident memory of each training-step variant, in its own process.

Each variant of ``step.py`` (same workloads, ``_workload.py``: the MLP of 5.05M parameters,
batch 256; the CNN and the Transformer, batch 64; Adam) runs in a fresh Python process: import
and compile everything with a few steps of the same variant on the same layer types at toy size,
reset the peak (Linux: ``/proc/self/clear_refs``) and measure the resident memory, then build
the model and optimizer and run the steps (``--repeats``), and read the peak (``VmHWM``). The
table gives the peak above the memory before the model existed - parameters, Adam state,
gradients, activations and whatever the variant adds, as the operating system sees it (freed
memory the allocator keeps counts) - and its ratio to the plain step's and to TorchJD's
autogram engine's. Goals at T = 10: Gramian mode <= 0.6x autogram and <= 1.5x plain.
"deconflict:gramian" is mode="gramian", which sweeps the rows in groups of layers where their
data would exceed the plain step's memory (starting a sweep from a cut of the graph where the
rows' gradients there fit its budget); "deconflict:gramian-every-cut" is the same with every cut
used, whatever its size; "deconflict:auto-tracked" is mode="auto" on the same tracked trunk,
which takes one sweep (the fastest Gramian mode).

    .venv/bin/python benchmarks/memory.py                       # about 10 minutes
    .venv/bin/python benchmarks/memory.py --workloads mlp       # the MLP only, ~4 minutes
    .venv/bin/python benchmarks/memory.py --workloads cnn,transformer --mmap-threshold 65536
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _harness import banner, parser, save, setup, table

VARIANTS = ["plain", "deconflict:sequential", "deconflict:batched", "deconflict:gramian",
            "deconflict:gramian-every-cut", "deconflict:auto-tracked", "deconflict:features",
            "torchjd", "torchjd:gramian", "torchjd:autogram", "libmtl"]
# Variants of the CNN and Transformer rows (the others are measured on the MLP).
LEAN_VARIANTS = ["plain", "deconflict:sequential", "deconflict:gramian",
                 "deconflict:gramian-every-cut", "deconflict:auto-tracked", "torchjd",
                 "torchjd:autogram"]


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind: str, method: str, tasks: int, steps: int, architecture: str) -> dict[str, Any]:
    import torch
    from _workload import step


    torch.manual_seed(0)
    # Import and compile what the variant uses (same number of tasks, same layer types) on a
    # tiny model.
    warm, warm_work = step(kind, method, tasks, architecture=architecture, small=True)
    for _ in range(2):
        warm()
    del warm, warm_work
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")  # reset VmHWM to the current resident size
    before = _status("VmRSS")
    run, work = step(kind, method, tasks, architecture=architecture)
    for _ in range(steps):
        run()
    peak = _status("VmHWM")
    parameters = sum(p.numel() for p in work.trunk.parameters())
    return {"peak_mb": (peak - before) / 2**20, "parameters": parameters}


def _measure(job: tuple[str, int, str, str], args: argparse.Namespace
             ) -> tuple[float | None, str | None]:
    """One variant's peak in a fresh process (MB), or None and why it did not run."""
    from _workload import available

    architecture, tasks, kind, method = job
    why = available(kind, method, tasks, architecture)
    if why is not None:
        return None, why
    command = [sys.executable, __file__, "--child", kind, method, str(tasks), architecture,
               "--repeats", str(args.repeats)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.mmap_threshold is not None:
        # glibc: a fixed threshold (no dynamic raise), so that freed large blocks go back to
        # the system and the peak is closer to the memory the step really holds at once.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    peaks = []
    for _ in range(max(1, args.runs)):
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent,
                              env=env)
        if done.returncode != 0:
            # A variant the library refuses for this model: its message, not a crash.
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            return None, (lines[-1] if lines else "failed")[:200]
        peaks.append(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])
    return statistics.median(peaks), None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--child", nargs=4, metavar=("KIND", "METHOD", "TASKS", "ARCH"),
                   help=argparse.SUPPRESS)
    p.add_argument("--workloads", default="mlp,cnn,transformer",
                   help="comma-separated, of mlp,cnn,transformer (default all three; the CNN "
                   "and Transformer at T = 10 only, with fewer variants)")
    p.add_argument("--jobs", type=int, default=1,
                   help="variants measured at the same time, each in its own process")
    p.add_argument("--lean", action="store_true",
                   help="the MLP with the CNN's and Transformer's variants only")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="run the variants with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 65536: "
                   "the allocator returns freed large blocks; default: the system's allocator "
                   "as it is)")
    p.add_argument("--runs", type=int, default=1,
                   help="processes per variant, the median peak reported (default 1; the "
                   "allocator's retained memory varies from process to process by up to "
                   "10-20%% on the Transformer)")
    p.set_defaults(repeats=3)
    args = p.parse_args()
    setup(args)
    if args.child:
        kind, method, tasks, architecture = args.child
        print(json.dumps(child(kind, method, int(tasks), args.repeats, architecture)))
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("memory.py needs Linux (/proc/self/clear_refs and VmHWM)")

    rows: list[dict[str, Any]] = []
    method = "UPGrad"
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    plan = []
    for architecture in workloads:
        if architecture == "mlp":
            plan += [(architecture, tasks, VARIANTS) for tasks in ((3,) if args.quick else (3, 10))]
        elif architecture in ("cnn", "transformer"):
            plan.append((architecture, 3 if args.quick else 10, LEAN_VARIANTS))
        else:
            p.error(f"unknown workload {architecture!r} (mlp, cnn, transformer)")
    jobs = []
    for architecture, tasks, variants in plan:
        for kind in (LEAN_VARIANTS if args.lean else variants):
            # LibMTL has no UPGrad; its MGDA holds the same Jacobian.
            method_here = "MGDA" if kind == "libmtl" else method
            jobs.append((architecture, tasks, kind, method_here))
    # Each variant in its own process; --jobs of them at a time (a peak of resident memory does
    # not depend on what else runs, only the time does).
    outcomes: dict[tuple[str, int, str], tuple[float | None, str | None]] = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for key, outcome in zip(jobs, pool.map(lambda job: _measure(job, args), jobs),
                                strict=True):
            outcomes[key[:3]] = outcome
            peak, why = outcome
            print(f"{key[0]} T={key[1]} {key[2]}: "
                  + (f"{peak:.1f} MB" if peak is not None else str(why)), flush=True)
    for architecture, tasks, variants in plan:
        results: dict[str, float | None] = {}
        reasons: dict[str, str] = {}
        for kind in (LEAN_VARIANTS if args.lean else variants):
            peak, why = outcomes[architecture, tasks, kind]
            results[kind] = peak
            if why is not None:
                reasons[kind] = why
        plain, autogram = results.get("plain"), results.get("torchjd:autogram")
        for kind, peak in results.items():
            label = {"plain": "-", "libmtl": "MGDA"}.get(kind, method)
            rows.append({"workload": architecture, "T": tasks, "variant": kind, "method": label,
                         "peak_mb": peak,
                         "vs_plain": None if peak is None or not plain else peak / plain,
                         "vs_autogram": None if peak is None or not autogram
                         else peak / autogram,
                         "why": reasons.get(kind)})
    print(banner())
    print(table(rows, [("workload", "workload"), ("T", "T"), ("variant", "variant"),
                       ("method", "method"), ("peak_mb", "peak above baseline (MB)"),
                       ("vs_plain", "/ plain"), ("vs_autogram", "/ TorchJD autogram")]))
    for row in rows:
        if row["why"]:
            print(f"  {row['workload']} T={row['T']} {row['variant']}: {row['why']}")
    for row in rows:
        if row["variant"] == "deconflict:gramian" and row["T"] == 10 and row["peak_mb"]:
            print(f"goal at T=10, {row['workload']}, {row['variant']}: / autogram = "
                  f"{_fmt(row['vs_autogram'])} (<= 0.6), / plain = {_fmt(row['vs_plain'])} "
                  "(<= 1.5)")
    print(f"written: {save('memory', args, rows)}")


if __name__ == "__main__":
    main()
