"""Shared by the benchmarks: side-by-side timing, the machine, tables and JSON results.

Timing: every candidate of a comparison runs once per round, in a shuffled order, for several
rounds after warm-up rounds; each reports its median. Interleaving spreads the machine's drift
(other processes, frequency changes) over all candidates instead of favouring whichever ran
during a quiet moment, which is what makes the ratios meaningful on a noisy machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import deconflict
from deconflict.io import write_json

RESULTS = Path(__file__).resolve().parent.parent / "results" / "benchmarks"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own, i.e. the cores)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default results/benchmarks/)")
    return p


def setup(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def compare(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int,
            seed: int = 0, self_timed: bool = False) -> dict[str, float]:
    """Median seconds per candidate, measured in interleaved, shuffled rounds.

    ``self_timed``: each candidate returns its own time in seconds (e.g. the slowest worker of
    a distributed step), used instead of the wall time of the call.
    """
    order = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in order}
    shuffle = random.Random(seed)
    for round_index in range(warmup + repeats):
        shuffle.shuffle(order)
        for name in order:
            start = time.perf_counter()
            reported = candidates[name]()
            elapsed = reported if self_timed else time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__, "deconflict": deconflict.__version__}
    for name in ("numba", "torchjd", "LibMTL"):
        try:
            from importlib.metadata import version
            versions[name] = version(name)
        except Exception:  # absent is a fine answer here
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "versions": versions,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def banner() -> str:
    """One line naming the machine a table was measured on (printed before the table)."""
    info = machine()
    load = info["load_average"]
    return (f"machine: {info['cpu']}, {info['cores']} cores, torch {info['versions']['torch']} "
            f"with {info['torch_threads']} threads, torchjd {info['versions']['torchjd']}"
            + ("" if load is None else f", load average {load[0]:.1f} (other jobs)"))


def save(name: str, args: argparse.Namespace, rows: list[dict[str, Any]],
         extra: dict[str, Any] | None = None) -> Path:
    path = args.out or RESULTS / f"{name}.json"
    data = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "repeats": args.repeats, "warmup": args.warmup,
            "rows": rows, **(extra or {})}
    write_json(path, data)
    return path


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with (key, header) columns; floats to 3 significant digits."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)
