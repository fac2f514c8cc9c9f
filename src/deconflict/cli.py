"""The ``deconflict`` command."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

from .errors import DeconflictError
from .methods.registry import available, method_class

INPUTS = {
    "losses": "losses only",
    "gramian": "Gramian",
    "block_gramians": "Gramian per layer",
    "jacobian": "task gradients",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _command_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    paths = run_demo(args.out, steps=args.steps, workers=args.workers,
                     show_progress=not args.quiet)
    print(paths["table"].read_text(encoding="utf-8"))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def method_table() -> list[dict[str, str]]:
    """One row per registered method: name, family, what it needs, state, summary, paper."""
    rows = []
    for name in available():
        cls = method_class(name)
        method = cls()
        seeded = "seed" in method.options()
        needs = INPUTS[method.kind]
        if method.kind == "losses" and method.gradient_scope != "none":
            needs = "last-layer Gramian" if method.gradient_scope == "last_layer" else "Gramian"
        rows.append({
            "name": name,
            "family": cls.family,
            "input": needs,
            "state": "yes" if cls.stateful else ("RNG" if seeded else "no"),
            "summary": cls.summary,
            "paper": cls.paper,
        })
    return rows


def _command_methods(args: argparse.Namespace) -> int:
    rows = method_table()
    if args.markdown:
        print("| method | family | needs | stateful | description | paper |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(f"| `{row['name']}` | {row['family']} | {row['input']} | {row['state']} | "
                  f"{row['summary']} | {row['paper']} |")
        return 0
    columns = ("name", "family", "input", "state")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    header = "  ".join(f"{c.upper():<{widths[c]}}" for c in columns) + "  DESCRIPTION"
    print(header)
    for row in rows:
        print("  ".join(f"{row[c]:<{widths[c]}}" for c in columns) + f"  {row['summary']}")
    print("\nPapers:")
    for row in rows:
        print(f"  {row['name']}: {row['paper']}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad options give one line, not the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"deconflict: error: {message} (see deconflict --help)\n")


def build_parser() -> argparse.ArgumentParser:
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
    demo.add_argument("--steps", type=_positive_int, default=20_000,
                      help="Adam steps per trajectory (default: %(default)s)")
    demo.add_argument("--workers", type=_positive_int, default=None,
                      help="worker processes (default: up to 2, one per core)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_command_demo)

    methods = commands.add_parser(
        "methods", help="list the methods: family, what they need, state, paper",
        description="Every registered method with its family, what it needs from the engine "
        "(the losses only: one backward pass; the Gramian of the task gradients; a Gramian per "
        "layer; the task gradients themselves), whether it keeps state across steps (RNG: only "
        "when seeded), a one-line description and its paper.",
    )
    methods.add_argument("--markdown", action="store_true", help="print a Markdown table")
    methods.set_defaults(handler=_command_methods)

    from .experiments import commands as experiment

    run = commands.add_parser(
        "run", help="train one method on a benchmark problem (per seed), record the results",
        description="Train METHOD on PROBLEM for each seed and write one JSON record per run to "
        "OUT/PROBLEM/runs/ (reused when the same configuration was already run). Method options "
        "follow as --name value, e.g. `deconflict run census-income --method gradops --alpha -3 "
        "--seeds 3`; lists are written a/b/c.",
    )
    experiment.add_common(run)
    run.add_argument("--method", required=True, help="a method name (deconflict methods)")
    run.set_defaults(handler=experiment.command_run, takes_extra=True)

    compare = commands.add_parser(
        "compare", help="a table of several methods: mean +- std, Delta_m%, mean rank",
        description="Run (or reuse) every method and seed, then write OUT/PROBLEM/NAME.md and "
        ".csv: each metric's mean +- standard deviation over seeds on the test split, Delta_m% "
        "against the single-task baseline (trained automatically), the mean rank, and the "
        "fraction of training steps with strong / weak non-conflict. Methods are comma "
        "separated, options as name:key=value, e.g. --methods sum,mgda,gradops:alpha=-3.",
    )
    experiment.add_common(compare)
    compare.add_argument("--methods", required=True, help="comma-separated method specs")
    compare.add_argument("--name", default="compare", help="report file name (default compare)")
    compare.add_argument("--no-baseline", action="store_true",
                         help="do not train the single-task baseline")
    compare.set_defaults(handler=experiment.command_compare, takes_extra=True)

    sweep = commands.add_parser(
        "sweep", help="one option of a method over a grid: the Pareto front and its hypervolume",
        description="Run METHOD for each value of the first option given (start:stop:count, "
        "a,b,c, or simplex:K for a grid of loss weights summing to T), e.g. `deconflict sweep "
        "census-income --method gradops --alpha -5:5:11`. Writes a CSV, a Markdown table and a "
        "PNG (per-task metrics over the option; two task metrics with the Pareto front) and "
        "reports the front's hypervolume. Further options are fixed.",
    )
    experiment.add_common(sweep)
    sweep.add_argument("--method", required=True, help="a method name")
    sweep.add_argument("--pair", default=None,
                       help="the two task metrics of the scatter plot, e.g. auc_income,auc_marital")
    sweep.set_defaults(handler=experiment.command_sweep, takes_extra=True)

    from .experiments.conflict_commands import add_commands

    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.command_line = "deconflict " + " ".join(shlex.quote(a) for a in argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "takes_extra", False):
            return args.handler(args, extra)
        return args.handler(args)
    except DeconflictError as error:
        print(f"deconflict: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `deconflict methods | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
