"""Memory: the peak resident memory of each training-step variant, in its own process.

Each variant of ``step.py`` (same workload: MLP trunk of 5.05M parameters, batch 256, Adam) runs
in a fresh Python process: import and compile everything with a few steps of the same variant
on a tiny model, reset the peak (Linux: ``/proc/self/clear_refs``) and measure the resident
memory, then build the model and optimizer and run the steps, and read the peak (``VmHWM``).
The table gives the peak above the memory before the model existed - parameters, Adam state,
gradients, activations and whatever the variant adds, as the operating system sees it (freed
memory the allocator keeps counts) - and its ratio to the plain step's.

    .venv/bin/python benchmarks/memory.py            # about 5 minutes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _harness import parser, save, setup, table

VARIANTS = ["plain", "deconflict:sequential", "deconflict:batched", "deconflict:gramian",
            "deconflict:features", "torchjd", "torchjd:gramian", "libmtl"]


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind: str, method: str, tasks: int, steps: int) -> dict[str, Any]:
    import torch
    from _workload import step

    torch.manual_seed(0)
    # Import and compile what the variant uses (same number of tasks) on a tiny model.
    warm, _ = step(kind, method, tasks, widths=(8, 16, 8), batch=4)
    for _ in range(2):
        warm()
    del warm, _
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")  # reset VmHWM to the current resident size
    before = _status("VmRSS")
    run, work = step(kind, method, tasks)
    for _ in range(steps):
        run()
    peak = _status("VmHWM")
    parameters = sum(p.numel() for p in work.trunk.parameters())
    return {"peak_mb": (peak - before) / 2**20, "parameters": parameters}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, metavar=("KIND", "METHOD", "TASKS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    setup(args)
    if args.child:
        kind, method, tasks = args.child
        print(json.dumps(child(kind, method, int(tasks), args.repeats)))
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("memory.py needs Linux (/proc/self/clear_refs and VmHWM)")
    from _workload import available

    rows: list[dict[str, Any]] = []
    method = "UPGrad"
    for tasks in ((3,) if args.quick else (3, 10)):
        results: dict[str, float | None] = {}
        for kind in VARIANTS:
            # LibMTL has no UPGrad; its MGDA holds the same Jacobian.
            method_here = "MGDA" if kind == "libmtl" else method
            why = available(kind, method_here, tasks)
            if why is not None:
                results[kind] = None
                continue
            command = [sys.executable, __file__, "--child", kind, method_here, str(tasks),
                       "--repeats", str(args.repeats)]
            if args.threads is not None:
                command += ["--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout
            results[kind] = json.loads(output.strip().splitlines()[-1])["peak_mb"]
            print(f"T={tasks} {kind}: {results[kind]:.1f} MB", flush=True)
        plain = results["plain"]
        for kind, peak in results.items():
            label = {"plain": "-", "libmtl": "MGDA"}.get(kind, method)
            rows.append({"T": tasks, "variant": kind, "method": label, "peak_mb": peak,
                         "vs_plain": None if peak is None else peak / plain})
    print(table(rows, [("T", "T"), ("variant", "variant"), ("method", "method"),
                       ("peak_mb", "peak above baseline (MB)"), ("vs_plain", "/ plain")]))
    print(f"written: {save('memory', args, rows)}")


if __name__ == "__main__":
    main()
