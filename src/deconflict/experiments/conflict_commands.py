"""``deconflict diagnose`` and ``deconflict recon``: measure conflict, then remove it (Recon).

diagnose: train each method briefly with a ``ConflictMonitor`` and write, under
OUT/PROBLEM/diagnose/: per method steps.csv, layers.csv and a per-layer conflict heatmap; for all
methods a histogram of the pairwise cosines (Recon slides, Figure 1) and report.md.

recon (Shi et al., ICLR 2023; docs/methods.md#recon): train with the base method while
recording every shared layer's cosines, score the layers (S-conflict), branch the top K into
per-task copies, retrain from scratch with the method, with and without Recon (same seeds), and
write OUT/PROBLEM/recon/<method>-top<K>-S<S>/report.md with the metrics, parameter counts, layer
scores and the cosine histograms before and after.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..diagnostics import ConflictMonitor
from ..errors import InvalidOptionError
from ..io import write_json, write_text
from ..recon.scores import conflict_scores, top_layers
from .commands import (
    _config,
    _device,
    _seeds,
    add_common,
    check_output,
    execution,
    method_spec,
    positive_int,
    split_specs,
)
from .problems import get_problem
from .problems.base import SupervisedProblem, problem_names
from .report import _cell, percent, summarize
from .runner import MethodSpec, _slug, intra_op_threads, run_many


def _layered(cls: type) -> bool:
    # Trained by the shared loop for a set number of epochs (--epochs, --score-epochs).
    return issubclass(cls, SupervisedProblem) and any(
        setting.name == "epochs" for setting in cls.schema)


def _supervised(name: str) -> SupervisedProblem:
    problem = get_problem(name)
    if not (isinstance(problem, SupervisedProblem) and _layered(type(problem))):
        raise InvalidOptionError(
            f"{problem.name} is not trained for a set number of epochs by layers of a shared "
            f"network; diagnose and recon take {', '.join(problem_names(_layered))}")
    return problem


def monitored_run(problem: SupervisedProblem, spec: MethodSpec, config: Mapping[str, Any],
                  seed: int, device: str, progress: bool,
                  tensorboard: Path | None = None, threads: int | None = None
                  ) -> tuple[ConflictMonitor, Any]:
    """Train once, in this process, with a monitor on every step (``threads``: PyTorch's
    intra-op threads meanwhile, as ``--threads``); the monitor and the TrainResult."""
    spec.check()
    tasks = problem.tasks(config)
    method = spec.factory()()
    monitor = ConflictMonitor(method, task_names=tasks, tensorboard=tensorboard)
    try:
        with intra_op_threads(threads):
            result = problem.train(lambda: method, config, seed, torch.device(device),
                                   progress=progress, monitor=monitor)
    finally:
        monitor.close()
    return monitor, result


def _refuse_runner_flags(args: argparse.Namespace) -> None:
    """diagnose trains one monitored run in this process: the flags of ``add_common`` that
    only the runner applies (several seeds, processes, checkpoints) are refused, not ignored."""
    given = [flag for flag, value in (("--seeds", args.seeds != 1), ("--nproc", args.nproc != 1),
                                      ("--checkpoint-every", args.checkpoint_every is not None),
                                      ("--resume", args.resume)) if value]
    if given:
        raise InvalidOptionError(
            f"diagnose trains one monitored run of seed --first-seed in this process: "
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to it")


# ----------------------------------------------------------------------------------- diagnose
def command_diagnose(args: argparse.Namespace) -> int:
    # matplotlib is the experiments extra's: imported when a command runs, never by the parser
    from ..diagnostics.plots import plot_cosine_histograms, plot_layer_heatmap

    problem = _supervised(args.problem)
    config = _config(problem, args)
    if args.epochs is not None:
        config["epochs"] = args.epochs
    texts = split_specs(args.method)
    if not texts:
        raise InvalidOptionError("--method is empty")
    if len(texts) > 1 and args.method_options:
        raise InvalidOptionError("with several methods, give options as name:key=value in "
                                 "--method, not as flags")
    _refuse_runner_flags(args)
    specs = [method_spec(args, text, args.method_options) for text in texts]
    check_output(args.out)
    device = _device(args.device)
    folder = Path(args.out) / problem.name / "diagnose"
    histograms, rows, written = {}, [], []
    for spec in specs:
        target = folder / _slug(spec.label)
        tensorboard = target / "tensorboard" if args.tensorboard else None
        monitor, result = monitored_run(problem, spec, config, args.first_seed, device,
                                        not args.quiet, tensorboard, args.threads)
        summary = monitor.summary()
        written += list(monitor.write_csv(target).values())
        written.append(plot_layer_heatmap(monitor.layer_cosines(), target / "layer_heatmap.png",
                                          title=f"{problem.name}, {spec.label}: conflict per "
                                          "shared layer"))
        write_json(target / "summary.json", {"summary": summary, "metrics": result.metrics,
                                             "config": config, "seed": args.first_seed})
        histograms[spec.label] = monitor.cosine_histogram()
        rows.append((spec.label, summary, result.metrics["test"]))
    written.append(plot_cosine_histograms(
        histograms, folder / "cosine_histograms.png",
        title=f"{problem.name}: pairwise cosines of the task gradients"))
    text = diagnose_markdown(problem, config, rows, args.command_line)
    written.append(write_text(folder / "report.md", text))
    print(text)
    print("written:", ", ".join(str(path) for path in written))
    return 0


def diagnose_markdown(problem: SupervisedProblem, config: Mapping[str, Any],
                      rows: Sequence[tuple[str, dict[str, Any], dict[str, float]]],
                      command: str) -> str:
    tasks = problem.tasks(config)
    lines = [f"# {problem.name}: gradient conflict", "", f"Command: `{command}`", "",
             f"{config['epochs']} epochs, every step measured. A pair conflicts when the cosine "
             "of its task gradients is negative. Weak non-conflict: the update conflicts with "
             "no task gradient; strong: no modified gradient conflicts with any original one "
             "(- where the method does not determine it). cos(g_i, D): how well the update "
             "serves task i on average.", "",
             "| method | conflicting pairs per step | steps with a conflict | weak non-conflict "
             "| strong non-conflict | " + " | ".join(f"cos(g_{t}, D)" for t in tasks) + " | "
             + " | ".join(m.name for m in problem.metrics(config)) + " |",
             "|" + "---|" * (5 + len(tasks) + len(problem.metrics(config)))]
    for label, summary, metrics in rows:
        cosines = summary.get("mean_update_cosine") or [None] * len(tasks)
        lines.append(
            f"| {label} | {summary.get('mean_conflicting_pairs', 0.0):.2f} | "
            f"{percent(summary.get('conflict_step_fraction'))} | "
            f"{percent(summary.get('weak_non_conflict_fraction'))} | "
            f"{percent(summary.get('strong_non_conflict_fraction'))} | "
            + " | ".join("-" if c is None else f"{c:.3f}" for c in cosines) + " | "
            + " | ".join(f"{metrics[m.name]:.4f}" for m in problem.metrics(config)) + " |")
    lines += ["", "Fraction of (step, pair) entries with a negative cosine, per shared layer:", "",
              "| layer | " + " | ".join(label for label, _, _ in rows) + " |",
              "|" + "---|" * (1 + len(rows))]
    layers = list(rows[0][1].get("layer_conflict_fraction", {}))
    for layer in layers:
        cells = [percent(summary.get("layer_conflict_fraction", {}).get(layer))
                 for _, summary, _ in rows]
        lines.append(f"| {layer or '(root)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- recon
def command_recon(args: argparse.Namespace) -> int:
    from ..diagnostics.plots import plot_cosine_histograms, plot_layer_heatmap

    problem = _supervised(args.problem)
    config = _config(problem, args)
    if config.get("branch"):
        raise InvalidOptionError("recon chooses the branched layers itself: do not --set branch")
    base = method_spec(args, args.base_method)
    spec = method_spec(args, args.method, args.method_options)  # flags: --method's options
    check_output(args.out)
    device = _device(args.device)
    folder = (Path(args.out) / problem.name / "recon"
              / _slug(f"{spec.label}-top{args.topk}-S{args.S:g}"))

    # Stage 1: the base method's per-layer cosines over a training run.
    score_config = dict(config)
    if args.score_epochs is not None:
        score_config["epochs"] = args.score_epochs
    monitor, _ = monitored_run(problem, base, score_config, args.first_seed, device,
                               not args.quiet, threads=args.threads)
    layer_cosines = monitor.layer_cosines()
    scores = conflict_scores(layer_cosines, args.S)
    chosen = top_layers(scores, args.topk)
    if not chosen:
        raise InvalidOptionError(f"no shared layer has a cosine below S = {args.S} during the "
                                 f"{base.label} run: nothing to branch")
    if len(chosen) == len(scores):
        raise InvalidOptionError(f"--topk {args.topk} would branch every shared layer "
                                 f"({len(scores)}): nothing would be left to share")
    plot_layer_heatmap(layer_cosines, folder / "base_layer_heatmap.png",
                       title=f"{problem.name}, {base.label}: conflict per shared layer")

    # Stages 2 and 3: retrain from scratch, without and with the branched layers.
    measured = {**config, "measure_conflicts": True}
    runs = {}
    for label, settings in ((spec.label, measured),
                            (f"{spec.label} + Recon", {**measured, "branch": chosen})):
        runs[label] = run_many(problem.name, [spec], _seeds(args), settings, device, args.out,
                               args.force, progress=not args.quiet,
                               **execution(args))[spec.label]
    histograms = {label: _summed_histogram(records) for label, records in runs.items()}
    plot = plot_cosine_histograms(histograms, folder / "cosine_histograms.png",
                                  title=f"{problem.name}, {spec.label}: pairwise cosines of the "
                                  "shared gradients")
    text = recon_markdown(problem, config, base, args, scores, chosen, runs)
    report = write_text(folder / "report.md", text)
    write_json(folder / "scores.json", {"S": args.S, "base_method": base.label,
                                        "scores": scores, "branched": chosen})
    print(text)
    print(f"written: {report}, {plot}, {folder / 'base_layer_heatmap.png'}, "
          f"{folder / 'scores.json'}")
    return 0


def _summed_histogram(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    histograms = [r["statistics"]["cosine_histogram"] for r in records
                  if r["statistics"].get("cosine_histogram")]
    if not histograms:
        return np.linspace(-1, 1, 2), np.zeros(1)
    counts = np.sum([h["counts"] for h in histograms], axis=0)
    return np.asarray(histograms[0]["edges"]), counts


def recon_markdown(problem: SupervisedProblem, config: Mapping[str, Any], base: MethodSpec,
                   args: argparse.Namespace, scores: Mapping[str, int], chosen: Sequence[str],
                   runs: Mapping[str, list[dict[str, Any]]]) -> str:
    metrics = problem.metrics(config)
    rows = summarize(problem, config, runs)
    seeds = len(next(iter(runs.values())))
    lines = [f"# {problem.name}: Recon with {args.method}", "", f"Command: `{args.command_line}`",
             "",
             f"Stage 1: {base.label} for {args.score_epochs or config['epochs']} epochs (seed "
             f"{args.first_seed}); S-conflict score of a layer = number of (step, task pair) "
             f"entries with cosine < S = {args.S:g}. Stages 2-3: the top {args.topk} layers "
             "(those with a positive score) become per-task copies, re-initialized, and the "
             f"network is trained from scratch ({config['epochs']} epochs, {seeds} seed(s)).", "",
             "| layer | S-conflict score | branched |", "|---|---:|---|"]
    for layer, score in sorted(scores.items(), key=lambda item: -item[1]):
        lines.append(f"| {layer or '(root)'} | {score} | {'yes' if layer in chosen else ''} |")
    lines += ["", "Test metrics (mean +- std over seeds), parameters, and conflict of the shared "
              "gradients during training:", "",
              "| model | " + " | ".join(m.name for m in metrics) + " | parameters | shared "
              "parameters | conflicting pairs per step | steps with strong non-conflict |",
              "|" + "---|" * (len(metrics) + 5)]
    for row in rows:
        records = runs[row.label]
        statistics = records[0]["statistics"]
        pairs = np.mean([r["statistics"].get("mean_conflicting_pairs", np.nan) for r in records])
        strong = [r["statistics"].get("strong_non_conflict_fraction") for r in records]
        strong = [s for s in strong if s is not None]
        lines.append(f"| {row.label} | "
                     + " | ".join(_cell(row.means[m.name], row.stds[m.name]) for m in metrics)
                     + f" | {statistics.get('parameters', 0):,} | "
                     f"{statistics.get('shared_parameters', 0):,} | {pairs:.2f} | "
                     f"{percent(float(np.mean(strong)) if strong else None)} |")
    lines += ["", f"Data: {next(iter(runs.values()))[0]['note'] or 'generated in code'}"]
    return "\n".join(lines) + "\n"


def add_commands(commands: Any) -> None:
    """Register ``diagnose`` and ``recon`` on the CLI's subcommand parser."""
    diagnose = commands.add_parser(
        "diagnose", help="train briefly and report where and how much the task gradients "
        "conflict",
        description="Train each method (comma separated, options as name:key=value) for a few "
        "epochs with a ConflictMonitor on every step. Writes OUT/PROBLEM/diagnose/: report.md "
        "(conflicting pairs, weak/strong non-conflict, cos(g_i, D) per task, conflict per "
        "shared layer), cosine_histograms.png, and per method steps.csv, layers.csv, "
        "layer_heatmap.png, summary.json (and TensorBoard events with --tensorboard).",
    )
    add_common(diagnose)
    diagnose.add_argument("--method", required=True,
                          help="method spec(s), comma separated, options as name:key=value")
    diagnose.add_argument("--epochs", type=positive_int, default=3,
                          help="training epochs (default 3)")
    diagnose.add_argument("--tensorboard", action="store_true",
                          help="also write TensorBoard events (needs deconflict[tensorboard])")
    diagnose.set_defaults(handler=command_diagnose)

    recon = commands.add_parser(
        "recon", help="Recon: score shared layers by conflict, branch the worst, retrain",
        description="Recon (Shi et al., ICLR 2023). Train with --base-method recording each "
        "shared layer's pairwise cosines; score layers by the number of (step, pair) entries "
        "with cosine < S; make the top K layers task-specific; train from scratch with --method "
        "with and without Recon (per seed); write OUT/PROBLEM/recon/METHOD-topK-SS/report.md, "
        "cosine_histograms.png, base_layer_heatmap.png and scores.json.",
    )
    add_common(recon)
    recon.add_argument("--method", required=True, help="the method to train (name:key=value)")
    recon.add_argument("--base-method", default="sum",
                       help="the method of the scoring run (default sum)")
    recon.add_argument("--S", type=float, default=-0.1,
                       help="conflict threshold S in (-1, 0] (default -0.1)")
    recon.add_argument("--topk", type=positive_int, default=1,
                       help="number of layers to branch (default 1)")
    recon.add_argument("--score-epochs", type=positive_int, default=None,
                       help="epochs of the scoring run (default: the problem's epochs)")
    recon.set_defaults(handler=command_recon)
