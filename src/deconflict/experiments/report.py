"""Tables and fronts from run records: ``compare`` and ``sweep``.

compare: per method, each metric's mean +- standard error over seeds with the number of seeds
(test split; NaN values, e.g. the epochs of runs that did not converge, are skipped and not
counted; ``statistics.Summary``), Delta_m% against the single-task baseline (CAGrad paper
formula, see ``metrics.delta_m``; negative is better), the mean rank over the metrics, and the
conflict statistics of training (fraction of steps with strong and with weak non-conflict;
GradOPS's mean r per task). With a named baseline (``--paired-with``), a second table gives per
method and metric the paired difference method - baseline over the same seeds, its 95%
percentile bootstrap interval, the paired t-test's p-value and the verdict in the metric's
direction (``statistics.paired``).

sweep: one method over a grid of values of one option; per value the metrics' mean +- standard
error over seeds; the per-task metrics as functions of the option; the Pareto front of the
values' means in the space of the task metrics (all oriented to be maximized) and its
hypervolume from a reference point 5% of each metric's range below the worst value observed
(every front point then counts). The plot's front is that of the two task metrics it plots
(``plotted_pair``), with its own hypervolume; every statement of a front or a hypervolume names
the metrics it covers. A named baseline (a grid value, or another method run on the same seeds
beside the grid) adds the paired table as in compare.

Markdown, CSV and JSON carry the same numbers (the JSON unrounded).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidOptionError
from ..io import write_json, write_text
from .metrics import delta_m, hypervolume, mean_rank, pareto_front
from .problems.base import Metric, Problem
from .runner import SINGLE_TASK, MethodSpec
from .statistics import (
    LEVEL,
    RESAMPLES,
    SEED,
    Paired,
    Summary,
    UnpairedError,
    paired,
    summarize_values,
)

Records = Mapping[str, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Row:
    """One method of a comparison: per metric its summary over seeds (``summaries``; ``means``
    and ``stds`` are their means and standard deviations) and, against a named baseline, the
    paired comparison (``paired``, empty for the baseline itself or without one)."""

    label: str
    means: dict[str, float]
    stds: dict[str, float]
    seeds: int
    delta_m: float | None
    rank: float | None
    statistics: dict[str, Any]
    summaries: dict[str, Summary] = field(default_factory=dict)
    paired: dict[str, Paired] = field(default_factory=dict)


def _values(records: Sequence[Mapping[str, Any]], split: str, metric: str) -> np.ndarray:
    values = [r["metrics"][split].get(metric) for r in records]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _by_seed(records: Sequence[Mapping[str, Any]], split: str, metric: str
             ) -> dict[int, float | None]:
    return {int(r["seed"]): r["metrics"][split].get(metric) for r in records}


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


def paired_against(records: Records, baseline: str, metrics: Sequence[Metric],
                   split: str = "test") -> dict[str, dict[str, Paired]]:
    """Per method label (the baseline's own left out), per metric, the paired comparison of
    the method's runs with ``baseline``'s on the same seeds (``statistics.paired``).

    Runs on other seeds than the baseline's are an ``UnpairedError``.
    """
    if baseline not in records:
        raise InvalidOptionError(f"the baseline {baseline!r} is not among the methods: "
                                 f"{', '.join(records)}")
    reference = records[baseline]
    result = {}
    for label, runs in records.items():
        if label == baseline:
            continue
        try:
            result[label] = {m.name: paired(_by_seed(runs, split, m.name),
                                            _by_seed(reference, split, m.name))
                             for m in metrics}
        except UnpairedError as error:
            raise UnpairedError(f"{label} against {baseline}: {error}") from None
    return result


def summarize(problem: Problem, config: Mapping[str, Any], records: Records,
              split: str = "test", baseline: str | None = None) -> list[Row]:
    """One row per method label (the single-task baseline, if present, included); with
    ``baseline`` (a label of ``records``) each other row carries its paired comparisons."""
    metrics = problem.metrics(config)
    names = [m.name for m in metrics]
    higher = {m.name: m.higher_is_better for m in metrics}
    summaries = {label: {name: summarize_values(_values(runs, split, name)) for name in names}
                 for label, runs in records.items()}
    means = {label: {k: v.mean for k, v in rows.items()} for label, rows in summaries.items()}
    stds = {label: {k: 0.0 if v.std is None else v.std for k, v in rows.items()}
            for label, rows in summaries.items()}
    versus = paired_against(records, baseline, metrics, split) if baseline is not None else {}
    reference = means.get(SINGLE_TASK, {})
    comparable = [n for n in reference if math.isfinite(reference[n]) and reference[n] != 0]
    rankable = [n for n in names if all(math.isfinite(means[label][n]) for label in means)]
    ranks = mean_rank({k: v for k, v in means.items()}, {n: higher[n] for n in rankable}) \
        if rankable else {}
    rows = []
    for label, runs in records.items():
        dm = None
        if comparable and label != SINGLE_TASK and all(math.isfinite(means[label][n])
                                                       for n in comparable):
            dm = delta_m({n: means[label][n] for n in comparable},
                         {n: reference[n] for n in comparable}, higher)
        rows.append(Row(label, means[label], stds[label], len(runs), dm, ranks.get(label),
                        _statistics(runs), summaries[label], versus.get(label, {})))
    return rows


def percent(value: float | None) -> str:
    """A fraction as a table cell: "12.3%", or "-" when unknown."""
    return "-" if value is None else f"{100 * value:.1f}%"


def _cell(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    digits = 4 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def paired_legend(baseline: str, metrics: Sequence[Metric]) -> list[str]:
    """The sentences under a paired table: what each number is and how the verdict reads."""
    arrows = {True: "higher is better", False: "lower is better"}
    return [
        f"Paired differences against **{baseline}**, method - baseline, over the same seeds "
        "(a seed with a NaN on either side is left out). Cell: mean difference [95% "
        f"percentile bootstrap interval, {RESAMPLES:,} resamples, seed {SEED}], two-sided "
        "paired t-test p-value (`-` when every difference is equal), and the verdict for the "
        "method in the metric's direction ("
        + "; ".join(f"{m.name}: {arrows[m.higher_is_better]}" for m in metrics)
        + "): better / worse when the interval excludes 0 and p < 0.05, else no difference "
        "shown. The p-values are not corrected for the number of comparisons.",
    ]


def paired_table(label_header: str, labels: Sequence[str],
                 paired_rows: Sequence[Mapping[str, Paired]], baseline: str,
                 metrics: Sequence[Metric]) -> list[str]:
    """A Markdown table of paired comparisons, one row per label, one column per metric.

    >>> from deconflict.experiments.statistics import paired
    >>> m = Metric("auc", "income", True)
    >>> rows = [{}, {"auc": paired({0: 0.91, 1: 0.93}, {0: 0.90, 1: 0.90})}]
    >>> print("\\n".join(paired_table("method", ["sum", "mgda"], rows, "sum", [m])))
    | method | auc |
    |---|---|
    | sum | (baseline) |
    | mgda | +0.0200 [+0.0100, +0.0300], p 0.295: no difference shown |
    """
    lines = ["| " + " | ".join([label_header, *(m.name for m in metrics)]) + " |",
             "|" + "---|" * (len(metrics) + 1)]
    for label, row in zip(labels, paired_rows, strict=True):
        if label == baseline:
            cells = ["(baseline)"] * len(metrics)
        else:
            cells = [row[m.name].cell(m.higher_is_better) if m.name in row else "-"
                     for m in metrics]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


def compare_markdown(problem: Problem, config: Mapping[str, Any], rows: Sequence[Row],
                     note: str, command: str, baseline: str | None = None,
                     chosen: tuple[str, Mapping[str, str]] | None = None,
                     protocol: str = "") -> str:
    """The comparison table; ``chosen`` = (setting, label -> value) adds the column of the
    value a grid chose per method (``compare --grid``), ``protocol`` a paragraph saying how."""
    metrics = problem.metrics(config)
    arrows = {True: "higher is better", False: "lower is better"}
    header = ["method", *(["chosen " + chosen[0]] if chosen else []),
              *(f"{m.name}" for m in metrics), "Delta_m% (lower better)",
              "mean rank", "strong non-conflict", "weak non-conflict"]
    lines = [
        f"# {problem.name}: comparison" + (f", best {chosen[0]} per method" if chosen else ""),
        "",
        *([protocol, ""] if protocol else []),
        f"{problem.description}. Test split; mean +- standard error over seeds (the number of "
        "seeds in parentheses; one seed has no standard error).",
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
        cells = [row.label, *([chosen[1].get(row.label, "-")] if chosen else []),
                 *(_summary(row, m.name).cell() for m in metrics)]
        cells.append("-" if row.delta_m is None else f"{row.delta_m:+.2f}")
        cells.append("-" if row.rank is None else f"{row.rank:.2f}")
        for key in ("strong_non_conflict_fraction", "weak_non_conflict_fraction"):
            value = row.statistics.get(key)
            cells.append(percent(value))
        lines.append("| " + " | ".join(cells) + " |")
    if baseline is not None:
        lines += ["", *paired_legend(baseline, metrics), "",
                  *paired_table("method", [row.label for row in rows],
                                [row.paired for row in rows], baseline, metrics)]
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


def _summary(row: Row, name: str) -> Summary:
    # A Row built without summaries (by hand) still renders: mean +- std as one "seed" count.
    if name in row.summaries:
        return row.summaries[name]
    mean = row.means[name]
    return Summary(row.seeds if math.isfinite(mean) else 0, mean, row.stds[name],
                   row.stds[name] / math.sqrt(row.seeds) if row.seeds > 1 else None)


PAIRED_FIELDS = ("diff", "diff_se", "ci_low", "ci_high", "p_value", "pairs")


def _paired_values(result: Paired | None) -> list[Any]:
    if result is None:
        return [None] * len(PAIRED_FIELDS)
    low, high = result.ci if result.ci is not None else (None, None)
    return [result.difference, result.se, low, high, result.p_value, result.n]


def compare_csv(problem: Problem, config: Mapping[str, Any], rows: Sequence[Row],
                baseline: str | None = None) -> str:
    """One line per method: per metric mean, std, SE and n; Delta_m%, rank, non-conflict; with
    a baseline, per metric the paired difference, its SE, interval, p-value and pair count."""
    metrics = problem.metrics(config)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["method", "seeds", *(f"{m.name}_{s}" for m in metrics
                                   for s in ("mean", "std", "se", "n")),
              "delta_m_percent", "mean_rank", "strong_non_conflict_fraction",
              "weak_non_conflict_fraction"]
    if baseline is not None:
        header += ["baseline", *(f"{m.name}_{s}" for m in metrics for s in PAIRED_FIELDS)]
    writer.writerow(header)
    for row in rows:
        line = [row.label, row.seeds]
        for m in metrics:
            summary = _summary(row, m.name)
            line += [row.means[m.name], row.stds[m.name], summary.se, summary.n]
        line += [row.delta_m, row.rank, row.statistics.get("strong_non_conflict_fraction"),
                 row.statistics.get("weak_non_conflict_fraction")]
        if baseline is not None:
            line.append(baseline)
            for m in metrics:
                line += _paired_values(row.paired.get(m.name))
        writer.writerow(line)
    return buffer.getvalue()


def _summary_json(summary: Summary) -> dict[str, Any]:
    return {"n": summary.n, "mean": _number(summary.mean), "std": summary.std,
            "se": summary.se}


def _paired_json(result: Paired, higher_is_better: bool) -> dict[str, Any]:
    return {"pairs": result.n, "difference": _number(result.difference), "se": result.se,
            "t": result.t, "p_value": result.p_value,
            "ci": None if result.ci is None else list(result.ci), "level": result.level,
            "verdict": result.verdict(higher_is_better)}


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def bootstrap_settings() -> dict[str, Any]:
    """How the intervals of a report were drawn (recorded in its JSON)."""
    return {"method": "percentile bootstrap of the mean paired difference",
            "resamples": RESAMPLES, "level": LEVEL, "seed": SEED,
            "test": "two-sided paired t-test (scipy.stats.ttest_rel)"}


def compare_json(problem: Problem, config: Mapping[str, Any], rows: Sequence[Row],
                 command: str, baseline: str | None = None, split: str = "test"
                 ) -> dict[str, Any]:
    """The comparison as a JSON object: the numbers of the Markdown and CSV tables, unrounded."""
    metrics = problem.metrics(config)
    methods = []
    for row in rows:
        entry: dict[str, Any] = {
            "label": row.label, "seeds": row.seeds,
            "metrics": {m.name: _summary_json(_summary(row, m.name)) for m in metrics},
            "delta_m_percent": row.delta_m, "mean_rank": row.rank,
            "statistics": row.statistics}
        if baseline is not None and row.label != baseline:
            entry["paired"] = {m.name: _paired_json(row.paired[m.name], m.higher_is_better)
                               for m in metrics if m.name in row.paired}
        methods.append(entry)
    return {"problem": problem.name, "split": split, "command": command,
            "metrics": [{"name": m.name, "task": m.task,
                         "higher_is_better": m.higher_is_better} for m in metrics],
            "baseline": baseline, "bootstrap": bootstrap_settings(), "methods": methods}


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
            shares = np.diff([0, *cuts, K])
            grid.append([float(p) * tasks / K for p in shares])
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
    # Per value, per metric (every metric, not only the task ones): the summary over seeds.
    summaries: list[dict[str, Summary]] = field(default_factory=list)
    # With a named baseline: its label, per value the paired comparisons (empty for the
    # baseline's own value), and the baseline's summaries when it is not a grid value.
    baseline: str | None = None
    paired: list[dict[str, Paired]] = field(default_factory=list)
    baseline_summaries: dict[str, Summary] | None = None

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
                  option: str, records: Records, split: str = "test",
                  baseline: str | None = None) -> SweepResult:
    """Per grid spec the summaries of its runs; the front of their means over the task metrics.

    ``baseline``: a label of ``records``, either one of ``specs`` or a method run beside the
    grid on the same seeds; every other value then carries its paired comparisons with it.
    """
    metrics = problem.metrics(config)
    task_metrics = tuple(m for m in metrics if m.task in problem.tasks(config))
    values = [spec.options[option] for spec in specs]
    summaries = [{m.name: summarize_values(_values(records[spec.label], split, m.name))
                  for m in metrics} for spec in specs]
    means = [{name: summary.mean for name, summary in row.items()} for row in summaries]
    front = pareto_of(means, task_metrics)
    paired_rows: list[dict[str, Paired]] = []
    baseline_summaries = None
    if baseline is not None:
        versus = paired_against(records, baseline, metrics, split)
        paired_rows = [versus.get(spec.label, {}) for spec in specs]
        if baseline not in {spec.label for spec in specs}:
            baseline_summaries = {m.name: summarize_values(_values(records[baseline], split,
                                                                   m.name)) for m in metrics}
    return SweepResult(values, means, front.indices, front.hypervolume, front.reference,
                       task_metrics, summaries, baseline, paired_rows, baseline_summaries)


def _shown_value(value: Any) -> str:
    return "/".join(f"{v:g}" for v in value) if isinstance(value, list) else \
        f"{value:g}" if isinstance(value, (int, float)) else str(value)


def sweep_markdown(problem: Problem, result: SweepResult, specs: Sequence[MethodSpec],
                   option: str, all_metrics: Sequence[Metric], title: str, command: str,
                   note: str, pair: Sequence[int | str] | None = None) -> str:
    """The sweep report: per value each metric's mean +- SE (n), the front column, the
    hypervolume statements and, with a baseline, the paired table."""
    arrows = {True: "higher is better", False: "lower is better"}
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             f"Data: {note or 'generated in code'}", "",
             "Test split; mean +- standard error over seeds (the number of seeds in "
             "parentheses; one seed has no standard error). Metrics: "
             + "; ".join(f"{m.name} ({arrows[m.higher_is_better]})" for m in all_metrics)
             + ". The front is that of the means.", "",
             "| " + option + " | " + " | ".join(m.name for m in all_metrics) + " | front |",
             "|" + "---|" * (len(all_metrics) + 2)]
    for k, (value, row) in enumerate(zip(result.values, result.means, strict=True)):
        cells = [_sweep_cell(result, k, row, m.name) for m in all_metrics]
        mark = "*" if k in result.front else ""
        lines.append(f"| {_shown_value(value)} | " + " | ".join(cells) + f" | {mark} |")
    if result.baseline_summaries is not None:
        cells = [result.baseline_summaries[m.name].cell() for m in all_metrics]
        lines.append(f"| baseline: {result.baseline} | " + " | ".join(cells) + " | |")
    lines += ["", *hypervolume_lines(result, pair)]
    if result.baseline is not None:
        labels = [spec.label for spec in specs]
        lines += ["", *paired_legend(result.baseline, all_metrics), "",
                  *paired_table(option, [_shown_value(v) for v in result.values],
                                result.paired, _baseline_value(result, labels), all_metrics)]
    return "\n".join(lines) + "\n"


def _baseline_value(result: SweepResult, labels: Sequence[str]) -> str:
    # The row label marked "(baseline)" in the paired table: the grid value, if it is one.
    labels = list(labels)
    if result.baseline is not None and result.baseline in labels:
        return _shown_value(result.values[labels.index(result.baseline)])
    return str(result.baseline)


def _sweep_cell(result: SweepResult, k: int, row: Mapping[str, float], name: str) -> str:
    if result.summaries:
        return result.summaries[k][name].cell()
    return "-" if not math.isfinite(row[name]) else f"{row[name]:.4f}"


def sweep_csv(result: SweepResult, option: str, all_metrics: Sequence[Metric]) -> str:
    """One line per value: the metrics' means and the front column; with summaries, then per
    metric the SE and n; with a baseline, per metric the paired numbers (as compare_csv)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    # The column names the metrics of its front, like every other statement of a front.
    front_column = "on_front[" + ";".join(m.name for m in result.metrics) + "]"
    header = [option, *(m.name for m in all_metrics), front_column]
    if result.summaries:
        header += [f"{m.name}_{s}" for m in all_metrics for s in ("std", "se", "n")]
    if result.baseline is not None:
        header += ["baseline", *(f"{m.name}_{s}" for m in all_metrics for s in PAIRED_FIELDS)]
    writer.writerow(header)
    for k, (value, row) in enumerate(zip(result.values, result.means, strict=True)):
        shown = "/".join(f"{v:g}" for v in value) if isinstance(value, list) else value
        line = [shown, *(row[m.name] for m in all_metrics), k in result.front]
        if result.summaries:
            for m in all_metrics:
                summary = result.summaries[k][m.name]
                line += [summary.std, summary.se, summary.n]
        if result.baseline is not None:
            line.append(result.baseline)
            for m in all_metrics:
                line += _paired_values(result.paired[k].get(m.name))
        writer.writerow(line)
    return buffer.getvalue()


def sweep_json(result: SweepResult, option: str, all_metrics: Sequence[Metric],
               command: str) -> dict[str, Any]:
    """The sweep as a JSON object: the numbers of its Markdown and CSV tables, unrounded."""
    front = result.front_over()
    values = []
    for k, value in enumerate(result.values):
        entry: dict[str, Any] = {"value": value, "on_front": k in result.front}
        if result.summaries:
            entry["metrics"] = {m.name: _summary_json(result.summaries[k][m.name])
                                for m in all_metrics}
        else:
            entry["metrics"] = {m.name: {"mean": _number(result.means[k][m.name])}
                                for m in all_metrics}
        if result.baseline is not None and result.paired[k]:
            entry["paired"] = {m.name: _paired_json(result.paired[k][m.name],
                                                    m.higher_is_better)
                               for m in all_metrics if m.name in result.paired[k]}
        values.append(entry)
    data: dict[str, Any] = {
        "option": option, "command": command,
        "metrics": [{"name": m.name, "task": m.task, "higher_is_better": m.higher_is_better}
                    for m in all_metrics],
        "front": {"metrics": [m.name for m in result.metrics], "indices": result.front,
                  "hypervolume": _number(front.hypervolume), "reference": front.reference},
        "baseline": result.baseline, "bootstrap": bootstrap_settings(), "values": values}
    if result.baseline_summaries is not None:
        data["baseline_metrics"] = {m.name: _summary_json(result.baseline_summaries[m.name])
                                    for m in all_metrics}
    return data


def write_report(path: Path, text: str) -> Path:
    """Write a report atomically (``deconflict.io.write_text``)."""
    return write_text(path, text)


def write_report_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write a report's JSON atomically (``deconflict.io.write_json``); NaN becomes null."""
    return write_json(path, _clean_json(data))


def _clean_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _clean_json(value.item())
    return value
