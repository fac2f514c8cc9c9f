"""Tables and fronts from run records: ``compare`` and ``sweep``.

compare: per method, each metric's mean +- standard deviation over seeds (test split; NaN values,
e.g. the epochs of runs that did not converge, are skipped), Delta_m% against the single-task
baseline (CAGrad paper formula, see ``metrics.delta_m``; negative is better), the mean rank over
the metrics, and the conflict statistics of training (fraction of steps with strong and with
weak non-conflict; GradOPS's mean r per task).

sweep: one method over a grid of values of one option; per value the mean metrics over seeds;
the per-task metrics as functions of the option; the Pareto front of the values in the space of
the task metrics (all oriented to be maximized) and its hypervolume from a reference point 5% of
each metric's range below the worst value observed (every front point then counts).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidOptionError
from ..io import write_text
from .metrics import delta_m, hypervolume, mean_rank, pareto_front
from .problems.base import Metric, Problem
from .runner import SINGLE_TASK, MethodSpec

Records = Mapping[str, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Row:
    label: str
    means: dict[str, float]
    stds: dict[str, float]
    seeds: int
    delta_m: float | None
    rank: float | None
    statistics: dict[str, Any]


def _values(records: Sequence[Mapping[str, Any]], split: str, metric: str) -> np.ndarray:
    values = [r["metrics"][split].get(metric) for r in records]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def _statistics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys = ("strong_non_conflict_fraction", "weak_non_conflict_fraction",
            "mean_conflicting_pairs")
    summary: dict[str, Any] = {}
    for key in keys:
        values = [r["statistics"].get(key) for r in records if r["statistics"].get(key)
                  is not None]
        if values:
            summary[key] = float(np.mean(values))
    r_values = [r["statistics"]["mean_r"] for r in records if r["statistics"].get("mean_r")]
    if r_values:
        summary["mean_r"] = np.mean(np.array(r_values), axis=0).tolist()
    return summary


def summarize(problem: Problem, config: Mapping[str, Any], records: Records,
              split: str = "test") -> list[Row]:
    """One row per method label (the single-task baseline, if present, included)."""
    metrics = problem.metrics(config)
    names = [m.name for m in metrics]
    higher = {m.name: m.higher_is_better for m in metrics}
    means, stds = {}, {}
    for label, runs in records.items():
        pairs = {name: _mean_std(_values(runs, split, name)) for name in names}
        means[label] = {k: v[0] for k, v in pairs.items()}
        stds[label] = {k: v[1] for k, v in pairs.items()}
    baseline = means.get(SINGLE_TASK)
    comparable = [n for n in names if baseline is not None and math.isfinite(baseline[n])
                  and baseline[n] != 0]
    rankable = [n for n in names if all(math.isfinite(means[label][n]) for label in means)]
    ranks = mean_rank({k: v for k, v in means.items()}, {n: higher[n] for n in rankable}) \
        if rankable else {}
    rows = []
    for label, runs in records.items():
        dm = None
        if comparable and label != SINGLE_TASK and all(math.isfinite(means[label][n])
                                                       for n in comparable):
            dm = delta_m({n: means[label][n] for n in comparable},
                         {n: baseline[n] for n in comparable}, higher)
        rows.append(Row(label, means[label], stds[label], len(runs), dm, ranks.get(label),
                        _statistics(runs)))
    return rows


def percent(value: float | None) -> str:
    """A fraction as a table cell: "12.3%", or "-" when unknown."""
    return "-" if value is None else f"{100 * value:.1f}%"


def _cell(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    digits = 4 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def compare_markdown(problem: Problem, config: Mapping[str, Any], rows: Sequence[Row],
                     note: str, command: str) -> str:
    metrics = problem.metrics(config)
    arrows = {True: "higher is better", False: "lower is better"}
    header = ["method", *(f"{m.name}" for m in metrics), "Delta_m% (lower better)",
              "mean rank", "strong non-conflict", "weak non-conflict"]
    lines = [
        f"# {problem.name}: comparison",
        "",
        f"{problem.description}. Test split; mean +- standard deviation over seeds.",
        "",
        "Metrics: " + "; ".join(f"{m.name} ({arrows[m.higher_is_better]})" for m in metrics)
        + ". Non-conflict columns: fraction of training steps where no modified gradient "
        "conflicts with any original one (strong) / where the update conflicts with no task "
        "(weak).",
        "",
        f"Data: {note or 'generated in code, no data files'}",
        "",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row.label, *(_cell(row.means[m.name], row.stds[m.name]) for m in metrics)]
        cells.append("-" if row.delta_m is None else f"{row.delta_m:+.2f}")
        cells.append("-" if row.rank is None else f"{row.rank:.2f}")
        for key in ("strong_non_conflict_fraction", "weak_non_conflict_fraction"):
            value = row.statistics.get(key)
            cells.append(percent(value))
        lines.append("| " + " | ".join(cells) + " |")
    dominance = [(row.label, row.statistics["mean_r"]) for row in rows
                 if row.statistics.get("mean_r")]
    if dominance:
        tasks = problem.tasks(config)
        lines += ["", "GradOPS's mean r per task over training (r > 1: the task dominates the "
                  "update; r < 1: it is dominated):", ""]
        for label, r in dominance:
            lines.append(f"- {label}: " + ", ".join(f"{t} {v:.3f}" for t, v in zip(tasks, r,
                                                                                   strict=False)))
    return "\n".join(lines) + "\n"


def compare_csv(problem: Problem, config: Mapping[str, Any], rows: Sequence[Row]) -> str:
    metrics = problem.metrics(config)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "seeds", *(f"{m.name}_{s}" for m in metrics
                                          for s in ("mean", "std")),
                     "delta_m_percent", "mean_rank", "strong_non_conflict_fraction",
                     "weak_non_conflict_fraction"])
    for row in rows:
        writer.writerow([row.label, row.seeds,
                         *(v for m in metrics for v in (row.means[m.name], row.stds[m.name])),
                         row.delta_m, row.rank,
                         row.statistics.get("strong_non_conflict_fraction"),
                         row.statistics.get("weak_non_conflict_fraction")])
    return buffer.getvalue()


# --------------------------------------------------------------------------------------- sweep
def sweep_values(spec: str, tasks: int) -> list[Any]:
    """Values of a swept option: ``start:stop:count`` (evenly spaced), ``a,b,c`` (a list), or
    ``simplex:K`` (every weight vector with positive entries in multiples of T/K summing to T:
    a grid of static loss weights, GradOPS Appendix C.3)."""
    spec = spec.strip()
    if spec.startswith("simplex:"):
        K = int(spec.split(":", 1)[1])
        if K < tasks:
            raise InvalidOptionError(f"simplex:{K} needs K >= {tasks} (one part per task)")
        grid = []
        for cuts in combinations(range(1, K), tasks - 1):
            parts = np.diff([0, *cuts, K])
            grid.append([float(p) * tasks / K for p in parts])
        return grid
    if spec.count(":") == 2:
        start, stop, count = spec.split(":")
        values = np.linspace(float(start), float(stop), int(count))
        return [round(float(v), 10) for v in values]
    from .runner import parse_value

    values = [parse_value(part) for part in spec.split(",") if part.strip()]
    if not values:
        raise InvalidOptionError(f"no values in {spec!r}")
    return values


@dataclass(frozen=True)
class SweepResult:
    values: list[Any]
    means: list[dict[str, float]]
    front: list[int]
    hypervolume: float
    reference: list[float]
    metrics: tuple[Metric, ...]


def sweep_summary(problem: Problem, config: Mapping[str, Any], specs: Sequence[MethodSpec],
                  option: str, records: Records, split: str = "test") -> SweepResult:
    metrics = problem.metrics(config)
    task_metrics = tuple(m for m in metrics if m.task in problem.tasks(config))
    values = [spec.options[option] for spec in specs]
    means = [{m.name: _mean_std(_values(records[spec.label], split, m.name))[0]
              for m in metrics} for spec in specs]
    points = np.array([[row[m.name] if m.higher_is_better else -row[m.name]
                        for m in task_metrics] for row in means])
    finite = np.all(np.isfinite(points), axis=1)
    front = [int(i) for i in np.flatnonzero(finite)[pareto_front(points[finite])]] \
        if finite.any() else []
    if front:
        low, high = points[finite].min(axis=0), points[finite].max(axis=0)
        reference = low - 0.05 * np.where(high > low, high - low, 1.0)
        volume = hypervolume(points[front], reference)
    else:
        reference, volume = np.full(len(task_metrics), np.nan), math.nan
    return SweepResult(values, means, front, volume, reference.tolist(), task_metrics)


def sweep_csv(result: SweepResult, option: str, all_metrics: Sequence[Metric]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([option, *(m.name for m in all_metrics), "on_front"])
    for k, (value, row) in enumerate(zip(result.values, result.means, strict=True)):
        shown = "/".join(f"{v:g}" for v in value) if isinstance(value, list) else value
        writer.writerow([shown, *(row[m.name] for m in all_metrics), k in result.front])
    return buffer.getvalue()


def write_report(path: Path, text: str) -> Path:
    return write_text(path, text)
