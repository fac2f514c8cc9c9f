"""A grid over one numeric problem setting, the best value kept per method (``compare --grid``).

The tensioner paper reports, per method, the best of a set of learning rates (Tables 1-3).
``deconflict compare PROBLEM --methods ... --grid lr=0.05,0.01 --select METRIC[,METRIC...]``
runs every method on every seed at every grid value (the runs are ordinary records, reused when
they exist, so an interrupted grid resumes where it stopped), then chooses per method the value
whose runs score best on the **validation** split (never the test split), by one of two rules
over the means over seeds of the ``--select`` metrics, each in its own direction:

- ``lexicographic`` (default): the first metric decides, the next breaks its ties, and so on.
  xor-and's paper criterion is ``--select converged,epochs``: the highest convergence rate (the
  mean of the 0/1 ``converged``), then the fewest mean epochs of the converged runs.
- ``mean_rank``: the mean over the metrics of the value's rank among the method's values (1 =
  best, ties share the mean of their ranks), lowest wins; for two tasks on different scales
  (accuracy and reconstruction MSE) without weighing one against the other.

A mean that is NaN (no finite value over the seeds: no converged run's epochs) counts as the
worst. Remaining ties go to the value listed first. A value with no run of the method is not a
candidate (``Choice.missing`` names it); a method with no candidate has no choice.

The single-task baseline trains one model per task, so each task's model gets its own value:
chosen by the ``--select`` metrics of that task, or, when none of them is that task's (xor-and's
joint ``converged``), by all that task's metrics in the problem's order (``converged_xor``, then
``epochs_xor``: the same criterion per task).

Outputs, each written atomically once every run is done: ``<name>.md``/``.json`` the best value
per method with its test metrics (mean +- SE (n), Delta_m%, non-conflict, and with
``--paired-with`` the paired table over the same seeds), ``<name>_grid.md``/``.json`` every
(method, value) with its validation and test metrics and the selection score.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidOptionError
from .problems.base import Metric, Problem
from .runner import SINGLE_TASK
from .statistics import Summary, summarize_values

RULES = ("lexicographic", "mean_rank")
# Kinds of setting a grid may range over.
NUMERIC = ("int", "float")

# records[value index][method label] -> the runs (one per seed)
GridRecords = Sequence[Mapping[str, Sequence[Mapping[str, Any]]]]


@dataclass(frozen=True)
class Grid:
    """One problem setting and its values, parsed and checked by the setting's declaration."""

    key: str
    values: tuple[Any, ...]

    def shown(self, value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)


def parse_grid(problem: Problem, text: str, fixed: Collection[str] = ()) -> Grid:
    """``KEY=V1,V2,...`` as a ``Grid`` over a numeric setting of ``problem``.

    Refused in one line: no ``=``, an unknown setting (the problem's settings are listed), a
    setting that is not numeric, an empty grid or an empty value, a value the setting refuses
    (type or range), a repeated value, and a key also given with ``--set`` (``fixed``).
    """
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InvalidOptionError(f"--grid {text!r} is not KEY=V1,V2,... (e.g. --grid "
                                 "lr=0.1,0.05,0.01)")
    settings = {setting.name: setting for setting in problem.settings()}
    if key not in settings:
        raise InvalidOptionError(f"--grid: {problem.name} has no setting {key!r}; its "
                                 f"settings are: {', '.join(sorted(settings))}")
    setting = settings[key]
    if setting.kind not in NUMERIC:
        numeric = sorted(name for name, s in settings.items() if s.kind in NUMERIC)
        raise InvalidOptionError(f"--grid {key}: {key} is not numeric ({setting.allowed}); a "
                                 f"grid ranges over one of: {', '.join(numeric)}")
    if key in fixed:
        raise InvalidOptionError(f"--grid {key} and --set {key}=...: give the setting once")
    parts = [part.strip() for part in values.split(",")]
    if not values.strip():
        raise InvalidOptionError(f"--grid {key}= is empty: give at least one value, "
                                 f"e.g. --grid {key}=V1,V2")
    if any(not part for part in parts):
        raise InvalidOptionError(f"--grid {text!r} has an empty value")
    parsed = tuple(setting.parse(part, problem.name) for part in parts)
    if len(set(parsed)) != len(parsed):
        raise InvalidOptionError(f"--grid {text!r} repeats a value")
    return Grid(key, parsed)


def parse_select(problem: Problem, config: Mapping[str, Any], text: str) -> tuple[Metric, ...]:
    """``--select``: comma-separated metric names of the problem, each once."""
    by_name = {metric.name: metric for metric in problem.metrics(config)}
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise InvalidOptionError(f"--select {text!r}: give metric names, comma separated, of "
                                 f"{', '.join(by_name)}")
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise InvalidOptionError(f"--select: {', '.join(unknown)} is not a metric of "
                                 f"{problem.name}; its metrics are: {', '.join(by_name)}")
    if len(set(names)) != len(names):
        raise InvalidOptionError(f"--select {text!r} names a metric twice")
    return tuple(by_name[name] for name in names)


@dataclass(frozen=True)
class Choice:
    """The value chosen for one method (for the single-task baseline, one per task).

    ``index``: the chosen grid index (None without a candidate); ``per_task``: the single-task
    baseline's index per task; ``scores``: per grid index the validation means of the selection
    metrics (NaN: no finite value); ``missing``: the grid indices without a run of the method.
    """

    label: str
    index: int | None
    scores: dict[int, dict[str, float]]
    missing: tuple[int, ...] = ()
    per_task: dict[str, int | None] = field(default_factory=dict)


def _mean(runs: Sequence[Mapping[str, Any]], metric: str, split: str = "validation") -> float:
    return summarize_values([r["metrics"][split].get(metric) for r in runs]).mean


def best_index(scores: Mapping[int, Mapping[str, float]], metrics: Sequence[Metric],
               rule: str = "lexicographic") -> int | None:
    """The best grid index of ``scores`` (index -> metric -> mean) by ``rule``; NaN is the
    worst; ties go to the lowest index; None when there is no candidate.

    >>> m = [Metric("converged", "all", True), Metric("epochs", "all", False)]
    >>> best_index({0: {"converged": 1.0, "epochs": 300.0},
    ...             1: {"converged": 1.0, "epochs": 200.0},
    ...             2: {"converged": 0.5, "epochs": 100.0}}, m)
    1
    """
    if rule not in RULES:
        raise InvalidOptionError(f"selection rule must be one of {', '.join(RULES)}, "
                                 f"got {rule!r}")
    indices = sorted(scores)
    if not indices:
        return None
    if rule == "lexicographic":
        def key(index: int) -> tuple[tuple[int, float], ...]:
            return tuple(_oriented(scores[index][m.name], m) for m in metrics)
        return min(indices, key=lambda index: (key(index), index))
    ranks = {index: 0.0 for index in indices}
    for metric in metrics:
        for index, rank in _ranks({i: _oriented(scores[i][metric.name], metric)
                                   for i in indices}).items():
            ranks[index] += rank / len(metrics)
    return min(indices, key=lambda index: (ranks[index], index))


def _oriented(value: float, metric: Metric) -> tuple[int, float]:
    """A sort key, smaller is better: NaN last, then the value in the metric's direction."""
    if not math.isfinite(value):
        return (1, 0.0)
    return (0, -value if metric.higher_is_better else value)


def _ranks(keys: Mapping[int, tuple[int, float]]) -> dict[int, float]:
    """1-based ranks (smaller key first), ties sharing the mean of their ranks."""
    ordered = sorted(keys, key=lambda i: keys[i])
    ranks: dict[int, float] = {}
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and keys[ordered[end + 1]] == keys[ordered[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[ordered[position]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def task_selection(problem: Problem, config: Mapping[str, Any], select: Sequence[Metric],
                   task: str) -> tuple[Metric, ...]:
    """The metrics that choose the single-task model of ``task`` (see the module docstring)."""
    own = tuple(m for m in select if m.task == task)
    return own or tuple(m for m in problem.metrics(config) if m.task == task)


def choose(problem: Problem, config: Mapping[str, Any], labels: Sequence[str],
           records: GridRecords, select: Sequence[Metric],
           rule: str = "lexicographic") -> list[Choice]:
    """Per method label, the grid value whose validation means are best (module docstring)."""
    choices = []
    for label in labels:
        present = {k: runs[label] for k, runs in enumerate(records) if runs.get(label)}
        missing = tuple(k for k in range(len(records)) if k not in present)
        if label == SINGLE_TASK:
            per_task: dict[str, int | None] = {}
            scores: dict[int, dict[str, float]] = {k: {} for k in present}
            for task in problem.tasks(config):
                metrics = task_selection(problem, config, select, task)
                task_scores = {k: {m.name: _mean(runs, m.name) for m in metrics}
                               for k, runs in present.items()}
                for k, values in task_scores.items():
                    scores[k].update(values)
                per_task[task] = best_index(task_scores, metrics, rule)
            chosen = next(iter(per_task.values()), None) if len(set(per_task.values())) == 1 \
                else None
            choices.append(Choice(label, chosen, scores, missing, per_task))
            continue
        scores = {k: {m.name: _mean(runs, m.name) for m in select} for k, runs in present.items()}
        choices.append(Choice(label, best_index(scores, select, rule), scores, missing))
    return choices


def best_records(problem: Problem, config: Mapping[str, Any], records: GridRecords,
                 choices: Sequence[Choice]) -> dict[str, list[dict[str, Any]]]:
    """The runs of each method's chosen value, by label (a method without a choice is left
    out); the single-task baseline's per seed merge each task's metrics from its own value."""
    best: dict[str, list[dict[str, Any]]] = {}
    for choice in choices:
        if choice.per_task:
            if any(index is None for index in choice.per_task.values()):
                continue
            by_seed: dict[int, dict[str, Any]] = {}
            for task, index in choice.per_task.items():
                assert index is not None
                names = {m.name for m in problem.metrics(config) if m.task == task}
                for run in records[index][choice.label]:
                    merged = by_seed.setdefault(int(run["seed"]), {
                        **run, "metrics": {"validation": {}, "test": {}},
                        "statistics": dict(run.get("statistics") or {})})
                    for split in ("validation", "test"):
                        merged["metrics"][split].update(
                            {k: v for k, v in run["metrics"][split].items() if k in names})
            # Only the seeds every task's chosen value has.
            complete = [r for r in by_seed.values()
                        if all(any(k in r["metrics"]["test"] for k in
                                   {m.name for m in problem.metrics(config) if m.task == t})
                               for t in choice.per_task)]
            best[choice.label] = sorted(complete, key=lambda r: r["seed"])
        elif choice.index is not None:
            best[choice.label] = [dict(run) for run in records[choice.index][choice.label]]
    return best


def chosen_text(grid: Grid, choice: Choice) -> str:
    """The chosen value as a table cell (per task for the single-task baseline)."""
    if choice.per_task:
        return ", ".join(f"{task} {'-' if index is None else grid.shown(grid.values[index])}"
                         for task, index in choice.per_task.items())
    return "-" if choice.index is None else grid.shown(grid.values[choice.index])


def grid_markdown(problem: Problem, config: Mapping[str, Any], grid: Grid,
                  labels: Sequence[str], records: GridRecords, choices: Sequence[Choice],
                  select: Sequence[Metric], rule: str, command: str, note: str) -> str:
    """Every (method, grid value): validation and test means +- SE (n); * marks the choice."""
    metrics = problem.metrics(config)
    by_label = {choice.label: choice for choice in choices}
    header = ["method", grid.key, *(f"val {m.name}" for m in metrics),
              *(f"test {m.name}" for m in metrics), "chosen"]
    lines = [f"# {problem.name}: every method at every {grid.key}", "",
             f"Command: `{command}`", "", f"Data: {note or 'generated in code, no data files'}",
             "", selection_sentence(grid, select, rule), "",
             "Mean +- standard error over seeds (n); `-`: no finite value; * marks the chosen "
             "value (for single_task, per task: the tasks named).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        choice = by_label[label]
        for k, value in enumerate(grid.values):
            runs = records[k].get(label) or []
            if not runs:
                cells = ["(not run)"] * (2 * len(metrics))
            else:
                cells = [_summary(runs, m.name, split).cell()
                         for split in ("validation", "test") for m in metrics]
            if choice.per_task:
                mark = ", ".join(t for t, i in choice.per_task.items() if i == k)
                mark = f"* ({mark})" if mark else ""
            else:
                mark = "*" if choice.index == k else ""
            lines.append("| " + " | ".join([label, grid.shown(value), *cells, mark]) + " |")
    return "\n".join(lines) + "\n"


def _summary(runs: Sequence[Mapping[str, Any]], metric: str, split: str) -> Summary:
    return summarize_values([r["metrics"][split].get(metric) for r in runs])


def selection_sentence(grid: Grid, select: Sequence[Metric], rule: str) -> str:
    """How the value was chosen, in one sentence for the reports."""
    names = ", ".join(f"{m.name} ({'higher' if m.higher_is_better else 'lower'} is better)"
                      for m in select)
    how = ("lexicographically (the first metric decides, the next breaks ties)"
           if rule == "lexicographic" else "by the mean rank over the metrics")
    values = ", ".join(grid.shown(v) for v in grid.values)
    return (f"Grid: {grid.key} in {{{values}}}. Per method the value with the best mean over "
            f"seeds on the validation split of {names}, {how}; NaN counts as the worst, ties "
            "go to the value listed first; the single-task baseline chooses per task by that "
            "task's metrics.")


def grid_json(problem: Problem, config: Mapping[str, Any], grid: Grid, labels: Sequence[str],
              records: GridRecords, choices: Sequence[Choice], select: Sequence[Metric],
              rule: str, command: str) -> dict[str, Any]:
    """The grid as JSON: per method and value the validation and test summaries, the
    selection scores, and the choice (unrounded)."""
    metrics = problem.metrics(config)
    by_label = {choice.label: choice for choice in choices}
    methods = []
    for label in labels:
        choice = by_label[label]
        values = []
        for k, value in enumerate(grid.values):
            runs = records[k].get(label) or []
            values.append({
                "value": value, "runs": len(runs),
                "seeds": sorted(int(r["seed"]) for r in runs),
                "selection_scores": choice.scores.get(k),
                "metrics": {split: {m.name: _summary_json(_summary(runs, m.name, split))
                                    for m in metrics} for split in ("validation", "test")}})
        methods.append({"label": label, **choice_json(grid, choice), "values": values})
    return {"problem": problem.name, "command": command, **selection_json(grid, select, rule),
            "methods": methods}


def choice_json(grid: Grid, choice: Choice) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "chosen": None if choice.index is None else grid.values[choice.index],
        "missing": [grid.values[k] for k in choice.missing]}
    if choice.per_task:
        entry["chosen_per_task"] = {task: None if index is None else grid.values[index]
                                    for task, index in choice.per_task.items()}
    return entry


def selection_json(grid: Grid, select: Sequence[Metric], rule: str) -> dict[str, Any]:
    return {"grid": {"setting": grid.key, "values": list(grid.values)},
            "selection": {"split": "validation", "metrics": [m.name for m in select],
                          "rule": rule, "statistic": "mean over seeds (NaN values skipped)",
                          "ties": "the value listed first", "nan": "worst"}}


def _summary_json(summary: Summary) -> dict[str, Any]:
    mean = summary.mean if math.isfinite(summary.mean) else None
    return {"n": summary.n, "mean": mean, "std": summary.std, "se": summary.se}
