"""The experiment commands: ``deconflict run``, ``compare`` and ``sweep`` (see ``cli``).

Each command checks everything a user gave (problem, method and options, settings, output
directory, grid, metric names, the named baseline) before the first run trains, and writes its
reports (Markdown, CSV and JSON, each atomically) only once every run is done and every report
is rendered.

``--paired-with NAME`` (compare and sweep) names the method the others are compared with, seed by
seed (``statistics.paired``: mean difference, 95% bootstrap interval, paired t-test). There is
no default: which comparison matters is the question the table answers (against single-task for
the Delta_m claims, against the static grid for GradOPS Appendix C.3, against the paper's
choice of alpha in a sweep), so the tables hold no paired column unless one is named. In
``compare`` it is a label of the comparison (``single_task``, ``sum``, ``cagrad(c=0.2)``, or the
spec form ``cagrad:c=0.2``); in ``sweep`` a value of the swept option (``--paired-with -3``), or any
method spec, which then runs on the same seeds beside the grid (not on its front).

``compare --grid KEY=V1,V2 --select METRIC[,METRIC]`` runs every method at every value of one
numeric problem setting and keeps, per method, the value with the best validation metrics
(``tuning``: the tensioner paper's best-of-several-learning-rates protocol).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DeconflictError, InvalidOptionError
from ..methods.options import Option
from ..methods.registry import method_class
from .problems import PROBLEMS, get_problem
from .problems.base import Metric
from .report import (
    compare_csv,
    compare_json,
    compare_markdown,
    summarize,
    sweep_csv,
    sweep_json,
    sweep_markdown,
    sweep_summary,
    sweep_values,
    write_report,
    write_report_json,
)
from .runner import SINGLE_TASK, MethodSpec, parse_value, preflight, run_many
from .tuning import (
    RULES,
    Grid,
    best_records,
    choice_json,
    choose,
    chosen_text,
    grid_json,
    grid_markdown,
    parse_grid,
    parse_select,
    selection_json,
    selection_sentence,
)


def method_spec(args: argparse.Namespace, text: str,
                extra: Sequence[tuple[str, str]] = ()) -> MethodSpec:
    """The method of ``text`` (``name:key=value``) with the options ``extra`` given as flags.

    Options are parsed by the method's declared types and the method is built once here, so
    every mistake is reported before training. An option named like one of the command's own
    flags (``args.command_flags``) cannot be told from that flag: when the flag was typed and the
    option was not written ``name:key=value``, the command line is refused.
    """
    spec = MethodSpec.parse(text, extra)
    if spec.name != SINGLE_TASK:
        written = {part.partition("=")[0].strip().replace("-", "_")
                   for part in text.split(":")[1:]}
        flags: set[str] = getattr(args, "command_flags", set())
        typed: set[str] = getattr(args, "typed_flags", set())
        for option in method_class(spec.name).OPTIONS:
            for flag in {option.flag, "--" + option.name}:
                if flag in flags and flag in typed and option.name not in written:
                    raise InvalidOptionError(
                        f"{flag} is a flag of deconflict {args.command} and also an option of "
                        f"{spec.name}: write the method's as --method "
                        f"{spec.name}:{option.name}=VALUE (then {flag} is the command's flag)")
    spec.check()
    return spec


def split_specs(text: str) -> list[str]:
    """Comma-separated method specs; a piece that is a number continues the previous spec's
    list (``sum:weights=1,2,mgda`` is ``sum:weights=1,2`` and ``mgda``: names start with a
    letter)."""
    specs: list[str] = []
    for piece in text.split(","):
        if specs and piece.strip() and not piece.strip()[0].isalpha():
            specs[-1] += "," + piece
        elif piece.strip():
            specs.append(piece)
    return specs


def check_output(out: str | os.PathLike[str]) -> Path:
    """The output directory, refused now if it is not a directory or cannot be written.

    Nothing is created: the first results file creates the folders. (A superuser may write
    anywhere, so only the "not a directory" check applies to root.)
    """
    path = Path(out)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise InvalidOptionError(f"--out {out}: not a directory{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidOptionError(f"--out {out}: {existing} is not writable")
    return path


def _config(problem: Any, args: argparse.Namespace) -> dict[str, Any]:
    # Raw strings: the problem parses each by its declared kind and checks its range.
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidOptionError(f"--set {item!r} is not KEY=VALUE")
        overrides[key.strip()] = value
    if args.data is not None:
        overrides["data"] = args.data
    return problem.resolve_config(overrides, smoke=args.smoke)


def _device(name: str) -> str:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InvalidOptionError(f"bad --device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(f"--device {name}: CUDA is not available on this machine")
    return name


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds < 1:
        raise InvalidOptionError("--seeds must be at least 1")
    return list(range(args.first_seed, args.first_seed + args.seeds))


def execution(args: argparse.Namespace) -> dict[str, Any]:
    """run_many's execution options: --checkpoint-every, --resume, --nproc, --threads."""
    return {"checkpoint_every": args.checkpoint_every, "resume": args.resume,
            "nproc": args.nproc, "threads": args.threads}


def command_run(args: argparse.Namespace) -> int:
    problem = get_problem(args.problem)
    spec = method_spec(args, args.method, args.method_options)
    config = _config(problem, args)
    check_output(args.out)
    records = run_many(problem.name, [spec], _seeds(args), config, _device(args.device),
                       args.out, args.force, progress=not args.quiet,
                       **execution(args))[spec.label]
    print(f"{problem.name} / {spec.label} ({records[0]['note']})")
    for record in records:
        metrics = record["metrics"]["test"]
        shown = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} -"
                          for k, v in metrics.items())
        print(f"  seed {record['seed']}: {shown}  [{record['wall_time_s']:.1f} s]")
    print(f"records: {Path(args.out) / problem.name / 'runs'}")
    return 0


def command_compare(args: argparse.Namespace) -> int:
    if args.method_options:
        flags = " ".join(f"--{key}" for key, _ in args.method_options)
        raise InvalidOptionError(f"{flags}: compare takes method options only inside --methods, "
                                 "as name:key=value (e.g. --methods sum,cagrad:c=0.2)")
    problem = get_problem(args.problem)
    specs = [method_spec(args, text) for text in split_specs(args.methods)]
    if not specs:
        raise InvalidOptionError("--methods is empty")
    config = _config(problem, args)
    grid = getattr(args, "grid", None)
    if grid is None and getattr(args, "select", None) is not None:
        raise InvalidOptionError("--select chooses a value of --grid: give --grid KEY=V1,V2,...")
    if grid is None and getattr(args, "select_rule", None) is not None:
        raise InvalidOptionError("--select-rule applies with --grid and --select")
    tuned = None
    if grid is not None:
        if getattr(args, "select", None) is None:
            raise InvalidOptionError("--grid needs --select METRIC[,METRIC...]: the validation "
                                     "metrics that choose the best value per method")
        fixed = {item.partition("=")[0].strip() for item in args.set or []}
        tuned = (parse_grid(problem, grid, fixed), parse_select(problem, config, args.select),
                 args.select_rule or RULES[0])
    check_output(args.out)
    if not args.no_baseline and problem.single_task_baseline and \
            len(problem.tasks(config)) > 1 and all(s.name != SINGLE_TASK for s in specs):
        specs.insert(0, MethodSpec(SINGLE_TASK))
    baseline = compare_baseline(getattr(args, "baseline", None), specs)
    if tuned is not None:
        return _compare_grid(args, problem, specs, config, baseline, *tuned)
    records = run_many(problem.name, specs, _seeds(args), config, _device(args.device),
                       args.out, args.force, progress=not args.quiet,
                       **execution(args))
    rows = summarize(problem, config, records, baseline=baseline)
    note = next(iter(records.values()))[0]["note"]
    text = compare_markdown(problem, config, rows, note, args.command_line, baseline)
    table = compare_csv(problem, config, rows, baseline)
    data = compare_json(problem, config, rows, args.command_line, baseline)
    folder = Path(args.out) / problem.name
    write_report(folder / f"{args.name}.md", text)
    write_report(folder / f"{args.name}.csv", table)
    write_report_json(folder / f"{args.name}.json", data)
    print(text)
    print(f"written: {folder / (args.name + '.md')}, {folder / (args.name + '.csv')}, "
          f"{folder / (args.name + '.json')}")
    return 0


def _compare_grid(args: argparse.Namespace, problem: Any, specs: list[MethodSpec],
                  config: dict[str, Any], baseline: str | None, grid: Grid,
                  select: tuple[Metric, ...], rule: str) -> int:
    """``compare --grid``: every method and seed at every grid value, the best value per method
    on the validation split (``tuning``), the reports of both."""
    configs = [problem.resolve_config({**config, grid.key: value}) for value in grid.values]
    seeds = _seeds(args)
    for each in configs:  # every refusal (a corrupt record, a checkpoint left) before training
        for spec in specs:
            for seed in seeds:
                preflight(problem.name, spec, seed, each, args.out, args.force, args.resume)
    records = [run_many(problem.name, specs, seeds, each, _device(args.device), args.out,
                        args.force, progress=not args.quiet, **execution(args))
               for each in configs]
    labels = [spec.label for spec in specs]
    choices = choose(problem, config, labels, records, select, rule)
    best = best_records(problem, config, records, choices)
    if not best:
        raise InvalidOptionError("--grid: no method has a run to choose from")
    note = next(iter(best.values()))[0]["note"]
    if baseline is not None and baseline not in best:
        raise InvalidOptionError(f"--paired-with {baseline}: it has no chosen value")
    rows = summarize(problem, config, best, baseline=baseline)
    chosen = {choice.label: chosen_text(grid, choice) for choice in choices}
    protocol = selection_sentence(grid, select, rule) + (
        " Test metrics of the chosen value's runs; every value's table: "
        f"`{args.name}_grid.md`.")
    text = compare_markdown(problem, config, rows, note, args.command_line, baseline,
                            chosen=(grid.key, chosen), protocol=protocol)
    data = compare_json(problem, config, rows, args.command_line, baseline)
    data.update(selection_json(grid, select, rule))
    by_label = {choice.label: choice for choice in choices}
    for entry in data["methods"]:
        entry.update(choice_json(grid, by_label[entry["label"]]))
    data["not_chosen"] = [label for label in labels if label not in best]
    grid_text = grid_markdown(problem, config, grid, labels, records, choices, select, rule,
                              args.command_line, note)
    grid_data = grid_json(problem, config, grid, labels, records, choices, select, rule,
                          args.command_line)
    folder = Path(args.out) / problem.name
    write_report(folder / f"{args.name}_grid.md", grid_text)
    write_report_json(folder / f"{args.name}_grid.json", grid_data)
    write_report(folder / f"{args.name}.md", text)
    write_report_json(folder / f"{args.name}.json", data)
    print(text)
    print(f"written: {folder / (args.name + '.md')}, {folder / (args.name + '.json')}, "
          f"{folder / (args.name + '_grid.md')}, {folder / (args.name + '_grid.json')}")
    return 0


def compare_baseline(text: str | None, specs: Sequence[MethodSpec]) -> str | None:
    """The label of ``--paired-with`` among the compared methods (None without the flag).

    Accepted: a label as the tables print it (``cagrad(c=0.2)``) or a spec that parses to one
    (``cagrad:c=0.2``); anything else is an InvalidOptionError listing the labels, raised
    before anything trains.

    >>> specs = [MethodSpec("sum"), MethodSpec("cagrad", {"c": 0.2})]
    >>> compare_baseline("cagrad:c=0.2", specs)
    'cagrad(c=0.2)'
    >>> compare_baseline("mgda", specs)
    Traceback (most recent call last):
    ...
    deconflict.errors.InvalidOptionError: --paired-with 'mgda' is not a method of this ...: sum, ...
    """
    if text is None:
        return None
    labels = [spec.label for spec in specs]
    if text.strip() in labels:
        return text.strip()
    try:
        label = MethodSpec.parse(text).label
    except DeconflictError:
        label = None
    if label in labels:
        return label
    raise InvalidOptionError(f"--paired-with {text!r} is not a method of this comparison; choose "
                             f"one of: {', '.join(labels)}")


def command_sweep(args: argparse.Namespace) -> int:
    from .plots import plot_sweep

    problem = get_problem(args.problem)
    if not args.method_options:
        raise InvalidOptionError("give the option to sweep as a flag, e.g. --alpha -5:5:11")
    (swept, grid), *fixed = args.method_options
    base = method_spec(args, args.method, fixed)
    option = _declared(base.name, swept)
    if option.name in base.options:
        raise InvalidOptionError(f"{option.name} is swept and also fixed: give it once")
    config = _config(problem, args)
    check_output(args.out)
    values = [_grid_value(base.name, option, value)
              for value in sweep_values(grid, len(problem.tasks(config)))]
    specs = [MethodSpec(base.name, {**base.options, option.name: value}) for value in values]
    for spec in specs:
        spec.check()
    pair = _pair(problem, config, args.pair)
    baseline = sweep_baseline(args, getattr(args, "baseline", None), base, option, specs)
    extra = [baseline] if baseline is not None and baseline not in specs else []
    records = run_many(problem.name, [*specs, *extra], _seeds(args), config,
                       _device(args.device), args.out, args.force, progress=not args.quiet,
                       **execution(args))
    name, swept = base.name, option.name
    result = sweep_summary(problem, config, specs, swept, records,
                           baseline=None if baseline is None else baseline.label)
    metrics = problem.metrics(config)
    folder = Path(args.out) / problem.name
    stem = f"sweep_{name}_{swept}"
    table = sweep_csv(result, swept, metrics)
    data = sweep_json(result, swept, metrics, args.command_line)
    text = sweep_markdown(problem, result, specs, swept, metrics,
                          f"{problem.name}: {name} swept over {swept}", args.command_line,
                          next(iter(records.values()))[0]["note"], pair)
    # The figure is the part that can still fail: render it before any table is written.
    plot = plot_sweep(result, swept, folder / f"{stem}.png",
                      f"{problem.name}: {name} over {swept}", pair)
    write_report(folder / f"{stem}.csv", table)
    write_report_json(folder / f"{stem}.json", data)
    write_report(folder / f"{stem}.md", text)
    print(text)
    print(f"written: {folder / (stem + '.md')}, {folder / (stem + '.csv')}, "
          f"{folder / (stem + '.json')}, {plot}")
    return 0


def sweep_baseline(args: argparse.Namespace, text: str | None, base: MethodSpec,
                   option: Option, specs: Sequence[MethodSpec]) -> MethodSpec | None:
    """The spec of a sweep's ``--paired-with`` (None without the flag), checked before training.

    In order: a grid point's label; a value of the swept option (it must be in the grid); any
    other method spec (``gradops:alpha=-3``, ``sum``), run on the same seeds beside the grid.
    """
    if text is None:
        return None
    by_label = {spec.label: spec for spec in specs}
    if text.strip() in by_label:
        return by_label[text.strip()]
    parsed = parse_value(text)
    try:
        value = _grid_value(base.name, option, parsed)
    except DeconflictError:
        value = None
    else:
        candidate = MethodSpec(base.name, {**base.options, option.name: value}).label
        if candidate in by_label:
            return by_label[candidate]
    if not text.strip()[:1].isalpha():  # a number or a list of numbers: meant as a value
        shown = ", ".join(f"{spec.options[option.name]}" for spec in specs)
        raise InvalidOptionError(f"--paired-with {text}: {option.name} = {text} is not in the "
                                 f"grid ({shown}); give a grid value or a method spec")
    spec = method_spec(args, text)
    if spec.name == SINGLE_TASK:
        raise InvalidOptionError("--paired-with single_task: a sweep runs no single-task "
                                 "baseline; give a grid value or a method spec")
    return by_label.get(spec.label, spec)


def _declared(method: str, key: str) -> Option:
    declared = method_class(method).OPTIONS
    name = key.strip().replace("-", "_")
    for option in declared:
        if option.name == name:
            return option
    listed = ", ".join(option.name for option in declared) or "none"
    raise InvalidOptionError(f"{method} does not take option {key!r}; its options are: {listed}")


def _grid_value(method: str, option: Option, value: Any) -> Any:
    """A grid point as a value of the swept option (validated; lists stay lists)."""
    if option.type == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = option.parse(method, value)
    checked = option.validate(method, value)
    return list(checked) if isinstance(checked, tuple) else checked


def _pair(problem: Any, config: dict[str, Any], text: str | None) -> tuple[int, int] | None:
    """--pair as indices into the task metrics (None: the plot's default pair)."""
    if text is None:
        return None
    tasks = problem.tasks(config)
    names = [m.name for m in problem.metrics(config) if m.task in tasks]
    chosen = [part.strip() for part in text.split(",")]
    unknown = [part for part in chosen if part not in names]
    if len(chosen) != 2 or unknown or chosen[0] == chosen[1]:
        what = f"{', '.join(unknown)} not among them" if unknown else "two different ones"
        raise InvalidOptionError(f"--pair takes two different task metrics of {problem.name} "
                                 f"({', '.join(names)}), comma separated: {what}")
    return names.index(chosen[0]), names.index(chosen[1])


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (the CLI's and the experiment commands' counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("problem", help=f"one of {', '.join(PROBLEMS)}")
    parser.add_argument("--seeds", type=_count(1), default=1, help="number of seeds (default 1)")
    parser.add_argument("--first-seed", type=_count(0), default=0,
                        help="first seed (default 0)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a problem setting (repeatable), e.g. --set epochs=20")
    parser.add_argument("--data", default=None, help="data directory (else $DECONFLICT_DATA)")
    parser.add_argument("--smoke", action="store_true",
                        help="use the problem's tiny smoke settings (seconds)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", default="results", help="results directory (default results)")
    parser.add_argument("--force", action="store_true",
                        help="retrain runs even if their records exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--checkpoint-every", type=_count(1), default=None, metavar="N",
                        help="save each run's full state every N steps (atomically, beside its "
                        "record; removed when the run completes)")
    parser.add_argument("--nproc", type=_count(1), default=1, metavar="N",
                        help="train each run in N processes with torch.distributed (each on its "
                        "share of every batch; --set ddp=local for local mode; default 1)")
    parser.add_argument("--threads", type=_count(1), default=None, metavar="N",
                        help="PyTorch's intra-op threads while each run trains, in each "
                        "process with --nproc; restored afterwards, recorded as the record's "
                        "threads (default: PyTorch's default; with --nproc, the CPU count // "
                        "nproc per process)")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted runs from their checkpoints (with "
                        "--checkpoint-every); the result equals an uninterrupted run's")


def add_statistics(parser: argparse.ArgumentParser) -> None:
    """The statistics flags of compare and sweep (``--paired-with``)."""
    command = parser.prog.rsplit(" ", 1)[-1]
    where = ("a method of --methods (label or spec: single_task, sum, cagrad:c=0.2)"
             if command == "compare" else "a value of the swept option (e.g. --paired-with -3), "
             "or any method spec, run on the same seeds beside the grid")
    parser.add_argument("--paired-with", dest="baseline", default=None, metavar="NAME",
                        help="add a table of paired comparisons with NAME over the same seeds: "
                        "mean difference, 95%% bootstrap interval (10,000 resamples), paired "
                        f"t-test p-value and verdict per metric; NAME is {where} (default: "
                        "none)")
    if command == "compare":
        add_grid(parser)


def add_grid(parser: argparse.ArgumentParser) -> None:
    """compare's grid flags (``experiments.tuning``): --grid, --select, --select-rule."""
    parser.add_argument("--grid", default=None, metavar="KEY=V1,V2,...",
                        help="run every method at each value of a numeric problem setting and "
                        "keep, per method, the value with the best validation --select metrics "
                        "(e.g. --grid lr=0.1,0.05,0.01); writes NAME.md/.json (the best value "
                        "per method, its test metrics) and NAME_grid.md/.json (every value)")
    parser.add_argument("--select", default=None, metavar="METRIC[,METRIC...]",
                        help="with --grid: the validation metrics that choose the value, each "
                        "in its own direction (xor-and: converged,epochs)")
    parser.add_argument("--select-rule", default=None, choices=RULES,
                        help="with --grid: lexicographic (the first --select metric decides, "
                        "the next breaks ties; default) or mean_rank (the mean of the value's "
                        "ranks over the metrics)")
