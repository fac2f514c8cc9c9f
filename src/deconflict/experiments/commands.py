"""The experiment commands: ``deconflict run``, ``compare`` and ``sweep`` (see ``cli``).

Each command checks everything a user gave (problem, method and options, settings, output
directory, grid, metric names) before the first run trains, and writes its reports only once
every run is done and every report is rendered.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidOptionError
from ..methods.options import Option
from ..methods.registry import method_class
from .problems import PROBLEMS, get_problem
from .report import (
    compare_csv,
    compare_markdown,
    hypervolume_lines,
    summarize,
    sweep_csv,
    sweep_summary,
    sweep_values,
    write_report,
)
from .runner import SINGLE_TASK, MethodSpec, run_many


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
        flags = getattr(args, "command_flags", set())
        typed = getattr(args, "typed_flags", set())
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
    """run_many's execution options: --checkpoint-every, --resume, --nproc."""
    return {"checkpoint_every": args.checkpoint_every, "resume": args.resume,
            "nproc": args.nproc}


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
    check_output(args.out)
    if not args.no_baseline and problem.single_task_baseline and \
            len(problem.tasks(config)) > 1 and all(s.name != SINGLE_TASK for s in specs):
        specs.insert(0, MethodSpec(SINGLE_TASK))
    records = run_many(problem.name, specs, _seeds(args), config, _device(args.device),
                       args.out, args.force, progress=not args.quiet,
                       **execution(args))
    rows = summarize(problem, config, records)
    note = next(iter(records.values()))[0]["note"]
    text = compare_markdown(problem, config, rows, note, args.command_line)
    folder = Path(args.out) / problem.name
    write_report(folder / f"{args.name}.md", text)
    write_report(folder / f"{args.name}.csv", compare_csv(problem, config, rows))
    print(text)
    print(f"written: {folder / (args.name + '.md')}, {folder / (args.name + '.csv')}")
    return 0


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
    records = run_many(problem.name, specs, _seeds(args), config, _device(args.device),
                       args.out, args.force, progress=not args.quiet,
                       **execution(args))
    name, swept = base.name, option.name
    result = sweep_summary(problem, config, specs, swept, records)
    metrics = problem.metrics(config)
    folder = Path(args.out) / problem.name
    stem = f"sweep_{name}_{swept}"
    table = sweep_csv(result, swept, metrics)
    lines = [f"# {problem.name}: {name} swept over {swept}", "",
             f"Command: `{args.command_line}`", "",
             f"Data: {next(iter(records.values()))[0]['note'] or 'generated in code'}", "",
             "| " + swept + " | " + " | ".join(m.name for m in metrics) + " | front |",
             "|" + "---|" * (len(metrics) + 2)]
    for k, (value, row) in enumerate(zip(result.values, result.means, strict=True)):
        shown = "/".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"
        cells = [f"{row[m.name]:.4f}" for m in metrics]
        mark = "*" if k in result.front else ""
        lines.append(f"| {shown} | " + " | ".join(cells) + f" | {mark} |")
    lines += ["", *hypervolume_lines(result, pair)]
    text = "\n".join(lines) + "\n"
    # The figure is the part that can still fail: render it before any table is written.
    plot = plot_sweep(result, swept, folder / f"{stem}.png",
                      f"{problem.name}: {name} over {swept}", pair)
    write_report(folder / f"{stem}.csv", table)
    write_report(folder / f"{stem}.md", text)
    print(text)
    print(f"written: {folder / (stem + '.md')}, {folder / (stem + '.csv')}, {plot}")
    return 0


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
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted runs from their checkpoints (with "
                        "--checkpoint-every); the result equals an uninterrupted run's")
