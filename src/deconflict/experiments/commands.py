"""The experiment commands: ``deconflict run``, ``compare`` and ``sweep`` (see ``cli``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidOptionError
from .problems import get_problem
from .report import (
    compare_csv,
    compare_markdown,
    summarize,
    sweep_csv,
    sweep_summary,
    sweep_values,
    write_report,
)
from .runner import SINGLE_TASK, MethodSpec, parse_value, run_many


def method_options(extra: Sequence[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs left over by argparse (method options)."""
    options: dict[str, str] = {}
    items = list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--") or len(item) < 3:
            raise InvalidOptionError(f"unexpected argument {item!r}: method options are "
                                     "written --name value")
        key, _, value = item[2:].partition("=")
        if not value:
            if not items:
                raise InvalidOptionError(f"method option --{key} needs a value")
            value = items.pop(0)
        options[key.replace("-", "_")] = value
    return options


def _config(problem: Any, args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidOptionError(f"--set {item!r} is not key=value")
        overrides[key.strip()] = parse_value(value)
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


def command_run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    problem = get_problem(args.problem)
    spec = MethodSpec(args.method.lower().replace("-", "_"),
                      {k: parse_value(v) for k, v in method_options(extra).items()})
    config = _config(problem, args)
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


def command_compare(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise InvalidOptionError(f"unexpected arguments {list(extra)}: give methods with "
                                 "options as name:key=value in --methods")
    problem = get_problem(args.problem)
    specs = [MethodSpec.parse(text) for text in args.methods.split(",") if text.strip()]
    if not specs:
        raise InvalidOptionError("--methods is empty")
    config = _config(problem, args)
    if not args.no_baseline and problem.name not in ("toy2d",) and \
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


def command_sweep(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from .plots import plot_sweep

    problem = get_problem(args.problem)
    config = _config(problem, args)
    options = method_options(extra)
    if not options:
        raise InvalidOptionError("give the option to sweep, e.g. --alpha -5:5:11")
    option, spec_text = next(iter(options.items()))
    fixed = {k: parse_value(v) for k, v in list(options.items())[1:]}
    values = sweep_values(spec_text, len(problem.tasks(config)))
    name = args.method.lower().replace("-", "_")
    specs = [MethodSpec(name, {**fixed, option: value}) for value in values]
    records = run_many(problem.name, specs, _seeds(args), config, _device(args.device),
                       args.out, args.force, progress=not args.quiet,
                       **execution(args))
    result = sweep_summary(problem, config, specs, option, records)
    metrics = problem.metrics(config)
    folder = Path(args.out) / problem.name
    stem = f"sweep_{name}_{option}"
    write_report(folder / f"{stem}.csv", sweep_csv(result, option, metrics))
    pair = (0, 1)
    if args.pair:
        names = [m.name for m in result.metrics]
        try:
            pair = tuple(names.index(p.strip()) for p in args.pair.split(","))[:2]
        except ValueError:
            raise InvalidOptionError(f"--pair takes two of {names}") from None
    plot = plot_sweep(result, option, folder / f"{stem}.png",
                      f"{problem.name}: {name} over {option}", pair)
    lines = [f"# {problem.name}: {name} swept over {option}", "",
             f"Command: `{args.command_line}`", "",
             f"Data: {next(iter(records.values()))[0]['note'] or 'generated in code'}", "",
             "| " + option + " | " + " | ".join(m.name for m in metrics) + " | front |",
             "|" + "---|" * (len(metrics) + 2)]
    for k, (value, row) in enumerate(zip(result.values, result.means, strict=True)):
        shown = "/".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"
        cells = [f"{row[m.name]:.4f}" for m in metrics]
        mark = "*" if k in result.front else ""
        lines.append(f"| {shown} | " + " | ".join(cells) + f" | {mark} |")
    lines += ["", f"Hypervolume of the front over ({', '.join(m.name for m in result.metrics)}),"
              f" reference {[round(v, 4) for v in result.reference]}: {result.hypervolume:.6g}"]
    text = "\n".join(lines) + "\n"
    write_report(folder / f"{stem}.md", text)
    print(text)
    print(f"written: {folder / (stem + '.md')}, {folder / (stem + '.csv')}, {plot}")
    return 0


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("problem", help="toy2d, xor-and, census-income, digits, multi-mnist or "
                        "nyuv2")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
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
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="save each run's full state every N steps (atomically, beside its "
                        "record; removed when the run completes)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train each run in N processes with torch.distributed (each on its "
                        "share of every batch; --set ddp=local for local mode; default 1)")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted runs from their checkpoints (with "
                        "--checkpoint-every); the result equals an uninterrupted run's")
