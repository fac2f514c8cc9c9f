"""``deconflict demo``: the 2-D toy problem of the CAGrad paper, every core method side by side.

Adam (lr 1e-3, 20,000 steps as in GradOPS Appendix B) from the start points (-8.5, 7.5),
(-8.5, -5) and (9, 9), for sum, MGDA, PCGrad, CAGrad (c = 0.5), IMTL-G, the tensioner and
GradOPS with alpha in {-5, -2, 0, 2}. Writes a PNG of the trajectories over the mean-loss
contour, a Markdown table (final L1, L2, mean loss, distance to the Pareto set) and the same
numbers as JSON. Trajectories are split over worker processes (one per core by default).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .experiments.plots import plot_toy_trajectories
from .experiments.toy2d import START_POINTS, optimize, pareto_distance, toy_problem
from .io import write_json, write_text
from .methods.registry import get

DEMO_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("Sum", "sum", {}),
    ("MGDA", "mgda", {}),
    ("PCGrad", "pcgrad", {}),
    ("CAGrad (c=0.5)", "cagrad", {"c": 0.5}),
    ("IMTL-G", "imtl_g", {}),
    ("Tensioner", "tensioner", {}),
    ("GradOPS (alpha=-5)", "gradops", {"alpha": -5.0}),
    ("GradOPS (alpha=-2)", "gradops", {"alpha": -2.0}),
    ("GradOPS (alpha=0)", "gradops", {"alpha": 0.0}),
    ("GradOPS (alpha=2)", "gradops", {"alpha": 2.0}),
)
STEPS = 20_000
LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class Job:
    label: str
    method: str
    options: dict[str, Any]
    start: tuple[float, float]


def _run_jobs(jobs: list[Job], steps: int, report: Any = None) -> np.ndarray:
    torch.set_num_threads(1)
    methods = [get(job.method, **job.options) for job in jobs]
    return optimize(methods, [job.start for job in jobs], steps, lr=LEARNING_RATE,
                    progress=report)


def _worker(jobs: list[Job], steps: int, index: int, results: Any, progress: Any) -> None:
    def report(done: int) -> None:
        with progress.get_lock():
            progress.value += done
    try:
        results.put((index, _run_jobs(jobs, steps, report), None))
    except BaseException as error:  # report, don't hang the parent
        results.put((index, None, repr(error)))


def _split(jobs: list[Job], parts: int) -> list[list[Job]]:
    """Round-robin, so every part gets a mix of cheap and expensive methods."""
    return [chunk for chunk in (jobs[k::parts] for k in range(parts)) if chunk]


def run_trajectories(jobs: list[Job], steps: int, workers: int, show_progress: bool) -> np.ndarray:
    """Trajectories for all jobs, in job order, computed by ``workers`` processes."""
    workers = max(1, min(workers, len(jobs)))
    chunks = _split(jobs, workers)
    bar = tqdm(total=steps * len(chunks), unit="step", disable=not show_progress,
               desc=f"toy2d: {len(jobs)} trajectories on {len(chunks)} process(es)")
    if len(chunks) == 1:
        points = _run_jobs(chunks[0], steps, bar.update)
        bar.close()
        return points
    context = mp.get_context("spawn")
    results = context.Queue()
    progress = context.Value("q", 0)
    processes = [context.Process(target=_worker, args=(chunk, steps, k, results, progress),
                                 daemon=True) for k, chunk in enumerate(chunks)]
    for process in processes:
        process.start()
    outputs: dict[int, np.ndarray] = {}
    try:
        while len(outputs) < len(chunks):
            try:
                index, points, error = results.get(timeout=0.2)
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and results.empty():
                    raise RuntimeError("a demo worker process died without a result") from None
            else:
                if error is not None:
                    raise RuntimeError(f"demo worker {index} failed: {error}")
                outputs[index] = points
            bar.update(progress.value - bar.n)
    finally:
        bar.close()
        for process in processes:
            process.join(timeout=5)
    by_position: dict[int, np.ndarray] = {}
    for k in range(len(chunks)):
        for position, job_points in zip(range(k, len(jobs), len(chunks)), outputs[k],
                                        strict=True):
            by_position[position] = job_points
    return np.stack([by_position[position] for position in range(len(jobs))])


def results_table(finals: list[dict[str, Any]], steps: int) -> str:
    """The Markdown report of the final points."""
    lines = [
        "# deconflict demo: the 2-D toy problem",
        "",
        "CAGrad paper Section 5.1 (the losses of its authors' code). Adam, lr "
        f"{LEARNING_RATE:g}, {steps:,} steps from each start point. The Pareto set is the segment "
        "from (-7, -8.3552) to (7, -8.3552); the mean loss is lowest near (0, -8.3552).",
        "",
        "| method | start | final point | L1 | L2 | mean loss | distance to Pareto set |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in finals:
        start = "({:g}, {:g})".format(*row["start"])
        point = "({:.3f}, {:.3f})".format(*row["final"])
        lines.append(
            f"| {row['label']} | {start} | {point} | {row['L1']:.4f} | {row['L2']:.4f} | "
            f"{row['mean_loss']:.4f} | {row['pareto_distance']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def run_demo(out_dir: str | Path = "deconflict-demo", *, steps: int = STEPS,
             workers: int | None = None, show_progress: bool = True) -> dict[str, Path]:
    """Run the demo and write its plot, table and JSON into ``out_dir``; return their paths."""
    started = time.perf_counter()
    out = Path(out_dir)
    jobs = [Job(label, name, options, start)
            for label, name, options in DEMO_METHODS for start in START_POINTS]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 2)
    points = run_trajectories(jobs, steps, workers, show_progress)

    finals = []
    final_losses = toy_problem(points[:, -1, :])[0]
    distances = pareto_distance(points[:, -1, :])
    for job, point, losses, distance in zip(jobs, points[:, -1, :], final_losses, distances,
                                           strict=True):
        finals.append({
            "label": job.label, "method": job.method, "options": job.options,
            "start": list(job.start), "final": point.tolist(), "L1": float(losses[0]),
            "L2": float(losses[1]), "mean_loss": float(losses.mean()),
            "pareto_distance": float(distance),
        })
    by_method = {label: points[[k for k, job in enumerate(jobs) if job.label == label]]
                 for label, _, _ in DEMO_METHODS}
    paths = {
        "plot": plot_toy_trajectories(
            by_method, out / "toy2d_trajectories.png", steps=steps,
            title=f"The 2-D toy problem (CAGrad paper, Section 5.1): Adam, lr "
                  f"{LEARNING_RATE:g}, {steps:,} steps from each start point"),
        "table": write_text(out / "toy2d_results.md", results_table(finals, steps)),
    }
    paths["json"] = write_json(out / "toy2d_results.json", {
        "experiment": "toy2d", "steps": steps, "lr": LEARNING_RATE, "optimizer": "Adam",
        "deconflict_version": __version__, "wall_time_s": time.perf_counter() - started,
        "results": finals,
    })
    return paths
