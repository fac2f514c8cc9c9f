"""The ``deconflict`` command."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from .errors import DeconflictError
from .methods.registry import available, method_class

INPUTS = {
    "losses": "losses only (one backward pass)",
    "gramian": "Gramian only",
    "block_gramians": "a Gramian per layer",
    "jacobian": "the task gradients themselves",
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


def _command_methods(args: argparse.Namespace) -> int:
    rows = []
    for name in available():
        cls = method_class(name)
        traits = [cls.family, f"input: {INPUTS[cls().kind]}"]
        if cls.stateful:
            traits.append("stateful")
        rows.append((name, cls.summary, ", ".join(traits), cls.paper))
    width = max(len(name) for name, *_ in rows)
    for name, summary, traits, paper in rows:
        print(f"{name:<{width}}  {summary}")
        if args.verbose:
            pad = " " * (width + 2)
            print(textwrap.indent(f"[{traits}]\n{paper}", pad))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deconflict",
        description="Multi-task learning without conflicting gradients.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    methods = commands.add_parser("methods", help="list the available methods")
    methods.add_argument("-v", "--verbose", action="store_true",
                         help="also show family, needs and paper")
    methods.set_defaults(handler=_command_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except DeconflictError as error:
        print(f"deconflict: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
