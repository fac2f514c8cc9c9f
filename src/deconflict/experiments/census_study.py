"""GradOPS's Census-income studies (Zhu et al., WSDM 2025, Appendix C): the w_i traces
(Figure 6), the training and test gains over alpha (Figure 7) and the static-weight grid
(Figure 8), on top of the ``census-income`` problem.

- **Weight traces (Figure 6).** ``WeightTrace`` is a ``ConflictMonitor`` that also keeps the
  weights w_i = r_i^alpha / mean_j r_j^alpha of GradOPS's Eq. 5, exactly as ``gradops`` reports
  them in its diagnostics (``diagnostics["w"]``), one row per training step.
- **Gains over alpha (Figure 7).** ``alpha_run`` trains GradOPS(alpha) (or uniform scaling, the
  ``sum`` method, for ``alpha=None``) with that monitor and evaluates the trained model on the
  training split as well as on validation and test (the runner's records have only the last
  two). ``gains`` turns a table of AUCs into the relative gains over uniform scaling, in %:
  gain_t = 100 (AUC_t(alpha) - AUC_t(uniform)) / AUC_t(uniform) per task t, and for the
  average, 100 (mean_t AUC_t(alpha) / mean_t AUC_t(uniform) - 1).
- **Static grid (Figure 8).** The grid runs themselves are ``deconflict sweep census-income
  --method gradops_static --weights simplex:K --paired-with gradops:alpha=-3``;
  ``static_grid_summary`` reads that sweep's JSON and says where GradOPS(alpha = -3)'s average
  AUC ranks among the grid's.

Runs are recorded (atomically) as JSON under ``OUT/census-income/study/`` and reused when rerun
with the same settings. ``python -m deconflict.experiments.census_study figures`` runs the study
and draws the figures, ``... averages`` tabulates the average test AUC of ``compare``'s runs
with paired comparisons (``compare`` reports each task's AUC, not their average); importing
this module runs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..diagnostics import ConflictMonitor
from ..errors import DataFormatError, DeconflictError, InvalidOptionError
from ..io import write_json, write_text
from ..methods import GradOPS, Sum
from ..methods.base import Method
from ..record import StepRecord
from .data.census import TASKS
from .problems import get_problem
from .problems.base import MultiTaskModel, SupervisedProblem, essential_config
from .runner import MethodSpec, _clean, config_key, run_path
from .statistics import paired, summarize_values

PROBLEM = "census-income"
# Figure 6's two rows: alpha in {1, 0, -1} and alpha in {3, 0, -3}.
TRACE_GROUPS: tuple[tuple[float, ...], ...] = ((1.0, 0.0, -1.0), (3.0, 0.0, -3.0))
# Figure 7's range, -10 <= alpha <= 5.
GAIN_ALPHAS: tuple[float, ...] = (-10.0, -7.0, -5.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 5.0)
SPLITS = ("train", "validation", "test")
STUDY_VERSION = 1


class WeightTrace(ConflictMonitor):
    """A ``ConflictMonitor`` that also records GradOPS's w_i (Eq. 5) at every step.

    ``weights()`` is a (steps x T) array, row k the ``diagnostics["w"]`` of the k-th observed
    step that reported weights (methods without them, such as ``sum``, leave it empty);
    ``steps_with_weights()`` gives the step numbers (1-based, as the monitor counts them).
    """

    def __init__(self, method: Method | None = None, task_names: Sequence[str] | None = None,
                 every: int = 1) -> None:
        super().__init__(method, task_names, every)
        self._weight_rows: list[np.ndarray] = []
        self._weight_steps: list[int] = []

    def observe(self, record: StepRecord) -> Any:
        w = record.diagnostics.get("w")
        if w is not None:
            # Copied: the record's tensors are the method's and must not alias the trace.
            values = w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else w
            self._weight_rows.append(np.array(values, dtype=np.float64))
            self._weight_steps.append(self.steps + 1)
        return super().observe(record)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["weight_rows"] = list(self._weight_rows)
        state["weight_steps"] = list(self._weight_steps)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._weight_rows = list(state["weight_rows"])
        self._weight_steps = list(state["weight_steps"])

    def weights(self) -> np.ndarray:
        if not self._weight_rows:
            return np.zeros((0, 0))
        return np.stack(self._weight_rows)

    def steps_with_weights(self) -> np.ndarray:
        return np.asarray(self._weight_steps, dtype=np.int64)


def epoch_means(weights: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    """Mean of each epoch's rows (the last epoch may be shorter): (epochs x T)."""
    if steps_per_epoch < 1:
        raise InvalidOptionError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.size == 0:
        return np.zeros((0, weights.shape[1] if weights.ndim == 2 else 0))
    starts = range(0, weights.shape[0], steps_per_epoch)
    return np.stack([weights[s:s + steps_per_epoch].mean(axis=0) for s in starts])


# ------------------------------------------------------------------------------------ runs
def _label(alpha: float | None) -> str:
    return "uniform" if alpha is None else f"gradops_alpha{alpha:g}"


def study_path(out: str | Path, alpha: float | None, seed: int,
               config: Mapping[str, Any]) -> Path:
    problem = get_problem(PROBLEM)
    key = config_key(config, problem.settings())
    return Path(out) / PROBLEM / "study" / f"{_label(alpha)}-seed{seed}-{key}.json"


def alpha_run(alpha: float | None, seed: int, overrides: Mapping[str, Any] | None = None,
              out: str | Path = "results", force: bool = False,
              smoke: bool = False) -> dict[str, Any]:
    """Train GradOPS(alpha) (uniform scaling for ``alpha=None``) on Census-income; return (and
    record) its AUCs on the train, validation and test splits and its per-epoch mean w_i.

    A recorded run with the same settings is returned as it is unless ``force``.
    """
    if alpha is not None and not math.isfinite(alpha):
        raise InvalidOptionError(f"alpha must be a finite number, got {alpha!r}")
    if not isinstance(seed, int) or seed < 0:
        raise InvalidOptionError(f"seed must be a non-negative integer, got {seed!r}")
    problem = get_problem(PROBLEM)
    if not isinstance(problem, SupervisedProblem):  # the registry's census-income is one
        raise InvalidOptionError(f"{PROBLEM} is not a supervised problem")
    config = problem.resolve_config(overrides, smoke=smoke)
    path = study_path(out, alpha, seed, config)
    clean = _clean(config)
    if path.is_file() and not force:
        record = read_json(path)
        settings = problem.settings()
        # As the runner does: settings added later at their neutral value do not count.
        if (essential_config(record.get("config") or {}, settings)
                == essential_config(clean, settings) and record.get("version") == STUDY_VERSION):
            return dict(record)
    tasks = problem.tasks(config)
    method: Method = Sum() if alpha is None else GradOPS(alpha=alpha)
    # Uniform scaling has no weights to trace; a monitor would make it compute the Gramian.
    trace = None if alpha is None else WeightTrace(method, task_names=tasks)
    result = problem.train(lambda: method, config, seed, torch.device("cpu"), monitor=trace)
    model = result.model
    if not isinstance(model, MultiTaskModel):
        raise DataFormatError(f"{PROBLEM}: training returned no model to evaluate")
    data = problem.load(config)
    model.eval()
    with torch.no_grad():
        train_metrics = problem.evaluate(model, data.train, tasks, config)
    steps_per_epoch = math.ceil(len(data.train) / config["batch_size"])
    weights = np.zeros((0, len(tasks))) if trace is None else trace.weights()
    record = _clean({
        "version": STUDY_VERSION, "problem": PROBLEM, "alpha": alpha, "seed": seed,
        "config": config, "tasks": list(tasks),
        "metrics": {"train": train_metrics, **result.metrics},
        "statistics": result.statistics, "note": result.note,
        "steps_per_epoch": steps_per_epoch,
        "weights_per_epoch": epoch_means(weights, steps_per_epoch).tolist(),
    })
    write_json(path, record)
    return dict(record)


# --------------------------------------------------------------------------------- gains
def average(metrics: Mapping[str, float], tasks: Sequence[str]) -> float:
    """The mean AUC over ``tasks`` (metrics named auc_<task>)."""
    missing = [t for t in tasks if f"auc_{t}" not in metrics]
    if missing:
        raise DataFormatError(f"no AUC for task(s) {', '.join(missing)}")
    return float(np.mean([metrics[f"auc_{t}"] for t in tasks]))


def gains(table: Mapping[float, Mapping[str, float]], uniform: Mapping[str, float],
          tasks: Sequence[str]) -> dict[float, dict[str, float]]:
    """Relative gains over uniform scaling, in %: per task and for the average AUC.

    ``table`` maps alpha to that run's metrics (auc_<task>); ``uniform`` is the baseline's.
    """
    base_average = average(uniform, tasks)
    out: dict[float, dict[str, float]] = {}
    for alpha, metrics in table.items():
        row = {t: 100.0 * (metrics[f"auc_{t}"] - uniform[f"auc_{t}"]) / uniform[f"auc_{t}"]
               for t in tasks}
        row["average"] = 100.0 * (average(metrics, tasks) / base_average - 1.0)
        out[alpha] = row
    return out


# ---------------------------------------------------------------------------- static grid
def static_grid_summary(sweep: Mapping[str, Any]) -> dict[str, Any]:
    """Where the sweep's paired baseline (GradOPS(alpha = -3)) ranks among the grid's points
    by the average of the metrics' means; rank 1 is the best, ties count in its favour."""
    names = sorted({name for value in sweep.get("values", []) for name in value["metrics"]})
    if not names or not sweep.get("baseline_metrics"):
        raise DataFormatError("the sweep has no grid values or no paired baseline "
                              "(run it with --paired-with)")
    points = []
    for value in sweep["values"]:
        means = [value["metrics"][n]["mean"] for n in names]
        points.append({"weights": list(value["value"]), "average": float(np.mean(means)),
                       **{n: value["metrics"][n]["mean"] for n in names}})
    baseline = float(np.mean([sweep["baseline_metrics"][n]["mean"] for n in names]))
    better = sum(p["average"] > baseline for p in points)
    best = max(points, key=lambda p: p["average"])
    return {"metrics": names, "points": points, "baseline": sweep.get("baseline"),
            "baseline_average": baseline, "rank": better + 1, "out_of": len(points) + 1,
            "grid_better": better, "best": best}


# ------------------------------------------------------------------------- average AUC
def recorded_runs(specs: Sequence[str], seeds: Sequence[int],
                  overrides: Mapping[str, Any] | None = None, out: str | Path = "results"
                  ) -> dict[str, dict[int, dict[str, Any]]]:
    """The runner's records (``deconflict compare census-income``) of each method and seed,
    by label; a missing one is a DataFormatError that says which and how to make it."""
    problem = get_problem(PROBLEM)
    config = problem.resolve_config(overrides)
    records: dict[str, dict[int, dict[str, Any]]] = {}
    for text in specs:
        spec = MethodSpec.parse(text)
        records[spec.label] = {}
        for seed in seeds:
            path = run_path(Path(out), problem, spec, seed, _clean(config))
            if not path.is_file():
                raise DataFormatError(
                    f"no record of {spec.label}, seed {seed}, at {path}: run `deconflict "
                    f"compare {PROBLEM} --methods {text} --seeds {max(seeds) + 1}` with the "
                    "same --set options first")
            records[spec.label][seed] = read_json(path)
    return records


def average_auc_markdown(records: Mapping[str, Mapping[int, Mapping[str, Any]]],
                         baselines: Sequence[str], tasks: Sequence[str] = TASKS) -> str:
    """Per method: the average test AUC over ``tasks``, mean +- SE (n) over seeds, and the
    paired comparison (same seeds) with each baseline label (``statistics.paired``)."""
    missing = [b for b in baselines if b not in records]
    if missing:
        raise InvalidOptionError(f"baseline(s) {', '.join(missing)} not among the methods "
                                 f"{', '.join(records)}")
    averages = {label: {seed: average(r["metrics"]["test"], tasks) for seed, r in runs.items()}
                for label, runs in records.items()}
    head = ["method", "average test AUC", *(f"minus {b}" for b in baselines)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, values in averages.items():
        cells = [label, summarize_values(values.values()).cell()]
        for b in baselines:
            cells.append("-" if b == label else paired(values, averages[b]).cell(True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- figures
def weights_trace_figure(traces: Mapping[float, np.ndarray], tasks: Sequence[str],
                         groups: Sequence[Sequence[float]] = TRACE_GROUPS) -> Any:
    """Figure 6: each group of alphas in one panel, w_i per epoch (color: task; style: alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(len(groups), 1, figsize=(7.5, 3.2 * len(groups)), squeeze=False)
    styles = ("-", "--", ":")
    for axis, group in zip(axes[:, 0], groups, strict=True):
        for style, alpha in zip(styles * len(group), group, strict=False):
            w = np.asarray(traces[alpha])
            epochs = np.arange(1, w.shape[0] + 1)
            for t, task in enumerate(tasks):
                axis.plot(epochs, w[:, t], style, color=f"C{t}",
                          label=f"{task}, alpha = {alpha:g}")
        axis.axhline(1.0, color="0.6", lw=0.6)
        axis.set_ylabel("w_i (epoch mean)")
        axis.set_title("alpha in {" + ", ".join(f"{a:g}" for a in group) + "}")
        axis.legend(fontsize=7, ncol=len(group))
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle("GradOPS weights w_i over training, Census-income (GradOPS Figure 6)")
    figure.tight_layout()
    return figure


def alpha_gains_figure(train: Mapping[float, Mapping[str, float]],
                       test: Mapping[float, Mapping[str, float]],
                       tasks: Sequence[str]) -> Any:
    """Figure 7: gains over uniform scaling (%) against alpha, training and test side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for axis, (split, table) in zip(axes, (("training", train), ("test", test)), strict=True):
        alphas = sorted(table)
        for t, task in enumerate((*tasks, "average")):
            last = task == "average"
            axis.plot(alphas, [table[a][task] for a in alphas], "s-" if last else "o-",
                      color="k" if last else f"C{t}", label=task, lw=2.0 if last else 1.2,
                      ms=4)
        axis.axhline(0.0, color="0.5", lw=0.8)
        axis.set_title(f"{split} AUC gain over uniform scaling")
        axis.set_xlabel("alpha")
        axis.set_ylabel("gain (%)")
        axis.legend(fontsize=8)
    figure.suptitle("GradOPS over alpha, Census-income (GradOPS Figure 7)")
    figure.tight_layout()
    return figure


def static_grid_figure(summary: Mapping[str, Any]) -> Any:
    """Figure 8: the grid's average AUCs, sorted, with GradOPS(alpha = -3)'s as a line; and the
    grid in the (w_income, w_marital) plane colored by average AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(summary["points"], key=lambda p: -p["average"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.bar(range(len(points)), [p["average"] for p in points], color="C0",
             label="GradOPS-static, one grid point each")
    left.axhline(summary["baseline_average"], color="C3", lw=1.5,
                 label=f"{summary['baseline']}: rank {summary['rank']} of {summary['out_of']}")
    low = min(min(p["average"] for p in points), summary["baseline_average"])
    high = max(max(p["average"] for p in points), summary["baseline_average"])
    margin = 0.15 * (high - low or 1e-4)
    left.set_ylim(low - margin, high + margin)
    left.set_xticks(range(len(points)))
    left.set_xticklabels(["/".join(f"{w:.2g}" for w in p["weights"]) for p in points],
                         rotation=90, fontsize=6)
    left.set_ylabel("average test AUC")
    left.set_title("grid points, best first")
    left.legend(fontsize=8, loc="lower left")
    w = np.array([p["weights"] for p in summary["points"]])
    shown = right.scatter(w[:, 0], w[:, 1], c=[p["average"] for p in summary["points"]],
                          cmap="viridis", s=90)
    figure.colorbar(shown, ax=right, label="average test AUC")
    right.set_xlabel("w_income")
    right.set_ylabel("w_marital (w_education = 3 - the others)")
    right.set_title("the grid (sum of w = 3)")
    figure.suptitle("GradOPS-static over a grid of static weights vs GradOPS(alpha = -3), "
                    "Census-income (GradOPS Figure 8)")
    figure.tight_layout()
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    from ..io import save_figure

    try:
        return save_figure(figure, path, dpi=110)
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------------------- report
def alpha_study_markdown(records: Mapping[float | None, Mapping[str, Any]],
                         tasks: Sequence[str]) -> str:
    """A Markdown table: per alpha, train and test AUC per task and average, and the gains."""
    uniform = records[None]["metrics"]
    alphas = sorted(a for a in records if a is not None)
    train = gains({a: records[a]["metrics"]["train"] for a in alphas}, uniform["train"], tasks)
    test = gains({a: records[a]["metrics"]["test"] for a in alphas}, uniform["test"], tasks)
    head = ["alpha", *(f"test {t}" for t in tasks), "test average",
            "train gain average %", "test gain average %", "strong non-conflict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, record: Mapping[str, Any], g_train: str, g_test: str) -> str:
        m = record["metrics"]["test"]
        fraction = record["statistics"].get("strong_non_conflict_fraction")
        strong = "-" if fraction is None else f"{100 * fraction:.1f}%"
        cells = [label, *(f"{m[f'auc_{t}']:.4f}" for t in tasks), f"{average(m, tasks):.4f}",
                 g_train, g_test, strong]
        return "| " + " | ".join(cells) + " |"

    lines.append(row("uniform (sum)", records[None], "0", "0"))
    for a in alphas:
        lines.append(row(f"{a:g}", records[a], f"{train[a]['average']:+.3f}",
                         f"{test[a]['average']:+.3f}"))
    return "\n".join(lines) + "\n"


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing or malformed file is a DataFormatError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataFormatError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object")
    return data


def _numbers(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidOptionError(f"--alphas {text!r}: give comma-separated numbers") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise InvalidOptionError(f"--alphas {text!r}: give finite numbers")
    return values


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.data is not None:
        overrides["data"] = args.data
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidOptionError(f"--set {item!r}: write KEY=VALUE")
        overrides[key] = value
    return overrides


def _figures(args: argparse.Namespace) -> int:
    alphas = _numbers(args.alphas)
    overrides = _overrides(args)
    # Every input is checked before the first run trains.
    get_problem(PROBLEM).resolve_config(overrides, smoke=args.smoke)
    sweep = None
    if args.static_sweep is not None:
        sweep = static_grid_summary(read_json(Path(args.static_sweep)))
    img = Path(args.img)
    records: dict[float | None, dict[str, Any]] = {}
    for alpha in (None, *alphas):
        records[alpha] = alpha_run(alpha, args.seed, overrides, args.out, smoke=args.smoke)
        print(f"{_label(alpha)}: test {records[alpha]['metrics']['test']}", flush=True)
    tasks = records[None]["tasks"]
    table = alpha_study_markdown(records, tasks)
    report = Path(args.out) / PROBLEM / "alpha_study.md"
    write_text(report, table)
    print(table)
    traced = {a: np.asarray(records[a]["weights_per_epoch"]) for a in alphas}
    groups = [g for g in TRACE_GROUPS if all(a in traced for a in g)]
    if groups:
        print("written:", _save(weights_trace_figure(traced, tasks, groups),
                                img / "census_weights_trace.png"))
    uniform = records[None]["metrics"]
    train = gains({a: records[a]["metrics"]["train"] for a in alphas}, uniform["train"], tasks)
    test = gains({a: records[a]["metrics"]["test"] for a in alphas}, uniform["test"], tasks)
    print("written:", _save(alpha_gains_figure(train, test, tasks),
                            img / "census_alpha_gains.png"), report)
    if sweep is not None:
        print(f"{sweep['baseline']}: average {sweep['baseline_average']:.5f}, rank "
              f"{sweep['rank']} of {sweep['out_of']} (grid points better: "
              f"{sweep['grid_better']}); best grid point {sweep['best']['weights']} "
              f"{sweep['best']['average']:.5f}")
        print("written:", _save(static_grid_figure(sweep), img / "census_static_grid.png"))
    return 0


def _averages(args: argparse.Namespace) -> int:
    specs = [part.strip() for part in args.methods.split(",") if part.strip()]
    if not specs:
        raise InvalidOptionError("--methods: give at least one method")
    if args.seeds < 1:
        raise InvalidOptionError(f"--seeds must be at least 1, got {args.seeds}")
    labels = {text: MethodSpec.parse(text).label for text in specs}
    baselines = [MethodSpec.parse(b.strip()).label
                 for b in (args.paired_with or "").split(",") if b.strip()]
    records = recorded_runs(specs, range(args.seeds), _overrides(args), args.out)
    table = average_auc_markdown({labels[t]: records[labels[t]] for t in specs}, baselines)
    report = Path(args.out) / PROBLEM / f"averages_{args.name}.md"
    write_text(report, table)
    print(table)
    print("written:", report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deconflict.experiments.census_study",
        description="GradOPS's Census-income study (Appendix C). `figures`: train uniform "
                    "scaling and GradOPS for each alpha (one seed), write the w_i traces "
                    "(Figure 6), the gains over alpha (Figure 7) and, given a GradOPS-static "
                    "sweep, the rank of GradOPS(alpha = -3) among its grid (Figure 8). "
                    "`averages`: the average test AUC of recorded `compare` runs, mean +- SE, "
                    "with paired comparisons.")
    commands = parser.add_subparsers(dest="command", required=True)
    figures = commands.add_parser("figures", help="Figures 6-8")
    averages = commands.add_parser("averages", help="average AUC of recorded compare runs")
    for sub in (figures, averages):
        sub.add_argument("--epochs", type=int, default=None,
                         help="default: the problem's (200)")
        sub.add_argument("--data", default=None)
        sub.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="another census-income setting (repeatable)")
        sub.add_argument("--out", default="results")
    figures.add_argument("--alphas", default=",".join(f"{a:g}" for a in GAIN_ALPHAS),
                         help="write negative values as --alphas=-3,-1,0")
    figures.add_argument("--seed", type=int, default=0)
    figures.add_argument("--img", default="docs/img", help="folder of the figures")
    figures.add_argument("--static-sweep", default=None,
                         help="a sweep JSON of gradops_static run with --paired-with")
    figures.add_argument("--smoke", action="store_true")
    averages.add_argument("--methods", required=True, help="method specs as for compare")
    averages.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1")
    averages.add_argument("--paired-with", default=None,
                          help="comma-separated baselines among --methods")
    averages.add_argument("--name", default="compare", help="report: averages_NAME.md")
    args = parser.parse_args(argv)
    return _figures(args) if args.command == "figures" else _averages(args)


if __name__ == "__main__":
    import sys

    try:
        raise SystemExit(main())
    except DeconflictError as error:  # a clear one-line error, no traceback
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
