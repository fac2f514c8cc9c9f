"""The ``deconflict`` command.

Errors a user can make (a bad flag, an unknown method or option, a value out of range, an
output directory that cannot be written, a malformed grid) print one line and exit with status 2
before anything trains or is written; Ctrl-C prints one line and exits with 130.

Method options. ``run``, ``sweep``, ``diagnose`` and ``recon`` take a method's options either
after its name, ``--method cagrad:c=0.2``, or as flags of their own, ``--method cagrad --c 0.2``
(``compare`` takes only the first form, in ``--methods``). The flags are told apart without
guessing: no parser abbreviates, a token that is exactly one of the command's flags is that flag,
and any other ``--name`` is a method option, parsed by the type the method declares. An option
whose name equals a flag of the command is refused in flag form: it must be written
``name:key=value``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import DeconflictError
from .methods.registry import available, method_class

# The subcommands whose --name value tokens that are not their own flags are method options.
METHOD_OPTION_COMMANDS = ("run", "compare", "sweep", "diagnose", "recon")

# The modules of the `experiments` extra (pyproject.toml): progress bars, plots and the digits
# data set. The library never imports them; these subcommands do, so they check first and say
# what to install rather than fail with a traceback halfway through a run.
EXPERIMENTS_EXTRA = ("matplotlib", "tqdm", "sklearn")
EXPERIMENT_COMMANDS = ("demo", *METHOD_OPTION_COMMANDS)


def missing_modules(names: Sequence[str] = EXPERIMENTS_EXTRA) -> list[str]:
    """The modules of ``names`` that cannot be imported here (found without importing them)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a finder that refuses it; a module without a spec
            found = False
        if not found:
            missing.append(name)
    return missing


def _needs_extra(command: str, missing: Sequence[str]) -> int:
    print(f"deconflict {command}: needs the experiments extra: pip install "
          f"'deconflict[experiments]' (missing: {', '.join(missing)})", file=sys.stderr)
    return 2


def _command_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .experiments.commands import check_output

    check_output(args.out)
    paths = run_demo(args.out, steps=args.steps, workers=args.workers,
                     show_progress=not args.quiet)
    print(paths["table"].read_text(encoding="utf-8"))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def method_table() -> list[dict[str, str]]:
    """One row per registered method: name, family, needs, state, options, summary, paper."""
    rows = []
    for name in available():
        cls = method_class(name)
        method = cls()
        seeded = any(option.name == "seed" for option in cls.OPTIONS)
        rows.append({
            "name": name,
            "family": cls.family,
            "input": method.inputs,  # what its protocol computes from, in words
            "state": "yes" if cls.stateful else ("RNG" if seeded else "no"),
            "options": ", ".join(option.name for option in cls.OPTIONS) or "-",
            "summary": cls.summary,
            "paper": cls.paper,
        })
    return rows


def _command_methods(args: argparse.Namespace) -> int:
    if args.name is not None:
        return _describe_method(args.name)
    rows = method_table()
    if args.markdown:
        print("| method | family | needs | stateful | options | description | paper |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            options = ", ".join(f"`{name}`" for name in row["options"].split(", ")) \
                if row["options"] != "-" else "-"
            print(f"| `{row['name']}` | {row['family']} | {row['input']} | {row['state']} | "
                  f"{options} | {row['summary']} | {row['paper']} |")
        return 0
    columns = ("name", "family", "input", "state")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    header = "  ".join(f"{c.upper():<{widths[c]}}" for c in columns) + "  DESCRIPTION"
    print(header)
    for row in rows:
        print("  ".join(f"{row[c]:<{widths[c]}}" for c in columns) + f"  {row['summary']}")
    print("\nOptions (deconflict methods NAME shows their types, defaults and ranges):")
    for row in rows:
        print(f"  {row['name']}: {row['options']}")
    print("\nPapers:")
    for row in rows:
        print(f"  {row['name']}: {row['paper']}")
    return 0


def _describe_method(name: str) -> int:
    cls = method_class(name)
    row = next(r for r in method_table() if r["name"] == cls.name)
    print(f"{cls.name}: {cls.summary}")
    print(f"  family {row['family']}; needs: {row['input']}; state: {row['state']}")
    print(f"  paper: {cls.paper}")
    if not cls.OPTIONS:
        print("\nNo options.")
        return 0
    first = cls.OPTIONS[0]
    print(f"\nOptions (e.g. --method {cls.name} {first.flag} VALUE, or "
          f"--method {cls.name}:{first.name}=VALUE):")
    cells = [(option.name, option.describe(), _shown(option.default), option.help)
             for option in cls.OPTIONS]
    widths = [max(len(cell[k]) for cell in cells) for k in range(3)]
    titles = ("OPTION", "VALUES", "DEFAULT")
    widths = [max(w, len(t)) for w, t in zip(widths, titles, strict=True)]
    print("  " + "  ".join(f"{t:<{w}}" for t, w in zip(titles, widths, strict=True))
          + "  MEANING")
    for cell in cells:
        print("  " + "  ".join(f"{c:<{w}}" for c, w in zip(cell[:3], widths, strict=True))
              + f"  {cell[3]}")
    return 0


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):  # as the command line writes it
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "/".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


class _Parser(argparse.ArgumentParser):
    """Never abbreviates a flag; a bad flag gives one line, not the usage text."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``deconflict`` parser; building it imports no module of the experiments extra."""
    from .experiments import commands as experiment
    from .experiments.commands import positive_int
    from .experiments.conflict_commands import add_commands

    parser = _Parser(
        prog="deconflict",
        description="Multi-task learning without conflicting gradients.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    demo = commands.add_parser(
        "demo", help="run the 2-D toy problem with every core method; write a plot and a table",
        description="Adam from three start points on the CAGrad paper's 2-D problem for sum, "
        "MGDA, PCGrad, CAGrad, IMTL-G, the tensioner and GradOPS (alpha -5, -2, 0, 2). Writes "
        "toy2d_trajectories.png, toy2d_results.md and toy2d_results.json.",
    )
    demo.add_argument("--out", default="deconflict-demo",
                      help="output directory (default: %(default)s)")
    demo.add_argument("--steps", type=positive_int, default=20_000,
                      help="Adam steps per trajectory (default: %(default)s)")
    demo.add_argument("--workers", type=positive_int, default=None,
                      help="worker processes (default: up to 2, one per core)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_command_demo)

    methods = commands.add_parser(
        "methods", help="list the methods: family, what they need, state, options, paper; "
        "NAME: one method's options",
        description="Every registered method with its family, what it needs from the engine "
        "(the losses only: one backward pass; the Gramian of the task gradients; a Gramian per "
        "layer; the task gradients themselves), whether it keeps state across steps (RNG: only "
        "when seeded), its options, a one-line description and its paper. With NAME: that "
        "method's options with their values, defaults and meaning.",
    )
    methods.add_argument("name", nargs="?", default=None, metavar="NAME",
                         help="a method name: show its options")
    methods.add_argument("--markdown", action="store_true", help="print a Markdown table")
    methods.set_defaults(handler=_command_methods)

    run = commands.add_parser(
        "run", help="train one method on a benchmark problem (per seed), record the results",
        description="Train METHOD on PROBLEM for each seed and write one JSON record per run to "
        "OUT/PROBLEM/runs/ (reused when the same configuration was already run). Method options "
        "follow the name, --method gradops:alpha=-3, or come as flags, --method gradops "
        "--alpha -3 (deconflict methods NAME lists them); lists are written a/b/c. An option "
        "named like one of this command's flags must take the first form.",
    )
    experiment.add_common(run)
    run.add_argument("--method", required=True,
                     help="a method name, optionally with options: name:key=value")
    run.set_defaults(handler=experiment.command_run)

    compare = commands.add_parser(
        "compare", help="a table of several methods: mean +- SE, Delta_m%%, mean rank",
        description="Run (or reuse) every method and seed, then write OUT/PROBLEM/NAME.md, .csv "
        "and .json: each metric's mean +- standard error (n) over seeds on the test split, "
        "paired comparisons with --paired-with NAME over the same seeds, Delta_m% "
        "against the single-task baseline (trained automatically), the mean rank, and the "
        "fraction of training steps with strong / weak non-conflict. Methods are comma "
        "separated, options as name:key=value, e.g. --methods sum,mgda,gradops:alpha=-3.",
    )
    experiment.add_common(compare)
    experiment.add_statistics(compare)
    compare.add_argument("--methods", required=True,
                         help="comma-separated method specs, e.g. sum,cagrad:c=0.2")
    compare.add_argument("--name", default="compare", help="report file name (default compare)")
    compare.add_argument("--no-baseline", action="store_true",
                         help="do not train the single-task baseline")
    compare.set_defaults(handler=experiment.command_compare)

    sweep = commands.add_parser(
        "sweep", help="one option of a method over a grid: the Pareto front and its hypervolume",
        description="Run METHOD for each value of the first option given as a flag "
        "(start:stop:count, a,b,c, or simplex:K for a grid of loss weights summing to T), e.g. "
        "`deconflict sweep census-income --method gradops --alpha -5:5:11`. Writes a CSV, a "
        "Markdown table and a PNG (per-task metrics over the option; two task metrics with the "
        "Pareto front) and reports the front's hypervolume. Further options (flags or "
        "name:key=value) are fixed.",
    )
    experiment.add_common(sweep)
    experiment.add_statistics(sweep)
    sweep.add_argument("--method", required=True,
                       help="a method name, optionally with fixed options: name:key=value")
    sweep.add_argument("--pair", default=None,
                       help="the two task metrics of the scatter plot, e.g. auc_income,auc_marital")
    sweep.set_defaults(handler=experiment.command_sweep)

    add_commands(commands)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each subcommand, by name."""
    for action in parser._actions:  # argparse keeps its subparsers only there
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def split_method_options(
    parser: argparse.ArgumentParser, tokens: Sequence[str]
) -> tuple[list[str], list[tuple[str, str]], set[str]]:
    """Split a subcommand's arguments into its own and method options given as flags.

    Returns the command's tokens, the ``(key, value)`` method options in order, and the set of
    the command's flags that were typed (to detect an option named like one of them).
    """
    known = parser._option_string_actions
    own: list[str] = []
    options: list[tuple[str, str]] = []
    typed: set[str] = set()
    items = list(tokens)
    index = 0
    while index < len(items):
        token = items[index]
        if token == "--":
            own += items[index:]
            break
        flag = token.split("=", 1)[0]
        if flag in known:
            typed.add(flag)
            own.append(token)
            if "=" not in token and known[flag].nargs != 0 and index + 1 < len(items):
                own.append(items[index + 1])
                index += 1
        elif token.startswith("--") and len(token) > 2:
            key, sep, value = token[2:].partition("=")
            if not sep:
                if index + 1 >= len(items):
                    parser.error(f"method option {token} needs a value")
                value = items[index + 1]
                index += 1
            options.append((key, value))
        else:
            own.append(token)
        index += 1
    return own, options, typed


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    parsers = subcommands(parser)
    position = next((k for k, token in enumerate(argv) if not token.startswith("-")), None)
    if position is None or argv[position] not in METHOD_OPTION_COMMANDS:
        args = parser.parse_args(argv)
        args.method_options, args.typed_flags = [], set()
        return args
    sub = parsers[argv[position]]
    own, options, typed = split_method_options(sub, argv[position + 1:])
    args = parser.parse_args([*argv[:position + 1], *own])
    args.method_options, args.typed_flags = options, typed
    args.command_flags = set(sub._option_string_actions)
    return args


def _interrupted(interrupt: KeyboardInterrupt) -> int:
    checkpoints = getattr(interrupt, "checkpoints", [])
    if checkpoints:
        print(f"deconflict: interrupted; {checkpoints[0]} keeps the run's progress: rerun the "
              "same command with --resume to continue it", file=sys.stderr)
    else:
        print("deconflict: interrupted; no checkpoint was saved (--checkpoint-every N makes a "
              "run resumable)", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as done:  # --help, or a usage error already printed in one line
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    args.command_line = "deconflict " + " ".join(shlex.quote(a) for a in argv)
    if args.command in EXPERIMENT_COMMANDS and (missing := missing_modules()):
        return _needs_extra(args.command, missing)
    try:
        return args.handler(args)
    except ModuleNotFoundError as error:  # an extra's module found above but broken at import
        root = (error.name or "").partition(".")[0]
        if root not in EXPERIMENTS_EXTRA:
            raise
        return _needs_extra(args.command, [root])
    except DeconflictError as error:
        print("deconflict: error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        return _interrupted(interrupt)
    except BrokenPipeError:  # e.g. `deconflict methods | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
