"""Tables and fronts from run records: ``compare`` and ``sweep``.

compare: per method, each metric's mean +- standard deviation over seeds (test split; NaN values,
e.g. the epochs of runs that did not converge, are skipped), Delta_m% against the single-task
baseline (CAGrad paper formula, see ``metrics.delta_m``; negative is better), the mean rank over
the metrics, and the conflict statistics of training (fraction of steps with strong and with
weak non-conflict; GradOPS's mean r per task).

sweep: one method over a grid of values of one option; per value the mean metrics over seeds;
the per-task metrics as functions of the option; the Pareto front of the values in the space of
the task metrics (all oriented to be maximized) and its hypervolume from a reference point 5% of
each metric's range below the worst value observed (every front point then counts). The plot's
front is that of the two task metrics it plots (``plotted_pair``), with its own hypervolume; every
statement of a front or a hypervolume names the metrics it covers.
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
    a grid of static loss weights, GradOPS Appendix C.3).

    A malformed grid (a bound that is not a finite number, a count that is not an integer >= 2,
    repeated values) is an InvalidOptionError naming the grid, raised before anything runs.
    """
    text = spec.strip()
    forms = "start:stop:count (e.g. -5:5:11), a,b,c or simplex:K"
    if text.startswith("simplex:"):
        K = _grid_integer(text, text.split(":", 1)[1], "K")
        if K < tasks:
            raise InvalidOptionError(f"simplex:{K} needs K >= {tasks} (one part per task)")
        grid = []
        for cuts in combinations(range(1, K), tasks - 1):
            parts = np.diff([0, *cuts, K])
            grid.append([float(p) * tasks / K for p in parts])
        return grid
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise InvalidOptionError(f"grid {text!r}: write {forms}")
        start, stop = (_grid_number(text, part) for part in parts[:2])
        count = _grid_integer(text, parts[2], "count")
        if count < 2 and start != stop:
            raise InvalidOptionError(f"grid {text!r}: the count must be at least 2 to go from "
                                     f"{start:g} to {stop:g}")
        values = [round(float(v), 10) for v in np.linspace(start, stop, count)]
        if len(set(values)) != len(values):
            raise InvalidOptionError(f"grid {text!r} repeats values (start equals stop)")
        return values
    from .runner import parse_value

    parts = [part.strip() for part in text.split(",")]
    if not text or any(not part for part in parts):
        raise InvalidOptionError(f"grid {text!r} has an empty value: write {forms}")
    values = [parse_value(part) for part in parts]
    if len({repr(v) for v in values}) != len(values):
        raise InvalidOptionError(f"grid {text!r} repeats a value")
    return values


def _grid_number(grid: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidOptionError(f"grid {grid!r}: {text!r} is not a finite number")
    return value


def _grid_integer(grid: str, text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidOptionError(f"grid {grid!r}: {what} {text!r} is not a whole number") \
            from None
    if value < 1:
        raise InvalidOptionError(f"grid {grid!r}: {what} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class Front:
    """The Pareto front of a sweep's values in the space of some of its metrics.

    A value is on the front when no other value is at least as good in every one of
    ``metrics`` and better in one (each metric in its own direction). The hypervolume is the
    area (volume) those values dominate, measured from ``reference``: 5% of each metric's
    observed range beyond its worst value, so every front value counts. Values with a NaN in
    ``metrics`` are left out.
    """

    metrics: tuple[Metric, ...]
    indices: list[int]  # the sweep values on the front, in sweep order
    hypervolume: float
    reference: list[float]  # in each metric's own units (not negated)

    @property
    def names(self) -> str:
        """The metrics as "(a, b)", the way every statement of this front names them."""
        return "(" + ", ".join(m.name for m in self.metrics) + ")"

    def statement(self) -> str:
        """One sentence giving the hypervolume, the metrics it covers and its reference."""
        if not self.indices:
            return f"No value has finite {self.names}: no Pareto front, no hypervolume."
        reference = ", ".join(f"{m.name} = {v:.6g}" for m, v in zip(self.metrics, self.reference,
                                                                    strict=True))
        return (f"Hypervolume of the Pareto front over {self.names}: {self.hypervolume:.6g} "
                f"(reference point {reference}; each metric in its own direction).")


def pareto_of(means: Sequence[Mapping[str, float]], metrics: Sequence[Metric]) -> Front:
    """The Pareto front of the rows ``means`` in the space of ``metrics`` and its hypervolume."""
    metrics = tuple(metrics)
    sign = np.array([1.0 if m.higher_is_better else -1.0 for m in metrics])
    # Oriented so that every objective is maximized (what pareto_front and hypervolume take).
    points = np.array([[row[m.name] for m in metrics] for row in means],
                      dtype=np.float64).reshape(len(means), len(metrics)) * sign
    finite = np.flatnonzero(np.all(np.isfinite(points), axis=1))
    if finite.size == 0:
        return Front(metrics, [], math.nan, [math.nan] * len(metrics))
    front = sorted(int(i) for i in finite[pareto_front(points[finite])])
    low, high = points[finite].min(axis=0), points[finite].max(axis=0)
    reference = low - 0.05 * np.where(high > low, high - low, 1.0)
    volume = hypervolume(points[front], reference)
    return Front(metrics, front, volume, (reference * sign).tolist())


@dataclass(frozen=True)
class SweepResult:
    """Per swept value the mean metrics over seeds; ``front``, ``hypervolume`` and
    ``reference`` are those of the Pareto front over all task metrics (``metrics``)."""

    values: list[Any]
    means: list[dict[str, float]]
    front: list[int]
    hypervolume: float
    reference: list[float]
    metrics: tuple[Metric, ...]

    def front_over(self, metrics: Sequence[Metric] | None = None) -> Front:
        """The Pareto front over ``metrics`` (default: all task metrics)."""
        return pareto_of(self.means, self.metrics if metrics is None else metrics)


def plotted_pair(metrics: Sequence[Metric],
                 pair: Sequence[int | str] | None = None) -> tuple[Metric, Metric]:
    """The two task metrics of a sweep's front plot: ``pair`` by position or by name, or by
    default the first metric of each of the first two tasks (two metrics of one task, such as
    xor-and's converged_xor and epochs_xor, say nothing about the trade-off between tasks)."""
    metrics = tuple(metrics)
    if len(metrics) < 2:
        raise InvalidOptionError(f"a front plot needs two task metrics, there is "
                                 f"{len(metrics)}")
    if pair is None:
        firsts = list({m.task: m for m in reversed(metrics)}.values())[::-1]
        chosen = firsts[:2] if len(firsts) >= 2 else list(metrics[:2])
        return chosen[0], chosen[1]
    names = [m.name for m in metrics]
    picked = []
    for item in pair:
        if isinstance(item, str):
            if item not in names:
                raise InvalidOptionError(f"{item!r} is not a task metric; choose two of "
                                         f"{', '.join(names)}")
            item = names.index(item)
        picked.append(metrics[item])
    if len(picked) != 2 or picked[0] == picked[1]:
        raise InvalidOptionError(f"the front plot takes two different task metrics of "
                                 f"{', '.join(names)}")
    return picked[0], picked[1]


def hypervolume_lines(result: SweepResult, pair: Sequence[int | str] | None = None) -> list[str]:
    """The sweep report's statement of its fronts: the one over all task metrics (the values
    marked in the table) and, when it differs, the one of the plotted pair."""
    front = result.front_over()
    lines = [f"Front column: * marks the values on the Pareto front over {front.names}.", "",
             front.statement()]
    if len(result.metrics) > 2:
        plotted = result.front_over(plotted_pair(result.metrics, pair))
        lines += ["", "Plotted pair: " + plotted.statement()]
    return lines


def sweep_summary(problem: Problem, config: Mapping[str, Any], specs: Sequence[MethodSpec],
                  option: str, records: Records, split: str = "test") -> SweepResult:
    metrics = problem.metrics(config)
    task_metrics = tuple(m for m in metrics if m.task in problem.tasks(config))
    values = [spec.options[option] for spec in specs]
    means = [{m.name: _mean_std(_values(records[spec.label], split, m.name))[0]
              for m in metrics} for spec in specs]
    front = pareto_of(means, task_metrics)
    return SweepResult(values, means, front.indices, front.hypervolume, front.reference,
                       task_metrics)


def sweep_csv(result: SweepResult, option: str, all_metrics: Sequence[Metric]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    # The column names the metrics of its front, like every other statement of a front.
    front_column = "on_front[" + ";".join(m.name for m in result.metrics) + "]"
    writer.writerow([option, *(m.name for m in all_metrics), front_column])
    for k, (value, row) in enumerate(zip(result.values, result.means, strict=True)):
        shown = "/".join(f"{v:g}" for v in value) if isinstance(value, list) else value
        writer.writerow([shown, *(row[m.name] for m in all_metrics), k in result.front])
    return buffer.getvalue()


def write_report(path: Path, text: str) -> Path:
    return write_text(path, text)
