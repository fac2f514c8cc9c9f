"""Runs: one (problem, method, options, seed, configuration) trained once, recorded as JSON.

Layout of a results directory::

    <out>/<problem>/runs/<method label>/seed<k>-<config hash>.json   one record per run
    <out>/<problem>/<name>.md, <name>.csv             comparison tables (``compare``)
    <out>/<problem>/sweep_<method>_<option>.*          sweeps (``sweep``)

A record holds the problem, method, options, seed, full configuration, library and PyTorch
versions, device, metrics (validation and test), the conflict statistics of training, the data
note, the wall time and the date. A run whose record exists with the same configuration is
reused, not retrained (``force`` retrains), so ``compare`` and ``sweep`` share runs.

The pseudo-method ``single_task`` trains one model per task on that task alone (with ``sum``)
and merges their metrics: the baseline of Delta_m.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import InvalidOptionError
from ..io import save_torch, write_json
from ..methods.registry import get, method_class
from .problems import get_problem
from .problems.base import (
    Checkpointing,
    Problem,
    SupervisedProblem,
    TrainResult,
    essential_config,
)

SINGLE_TASK = "single_task"


@dataclass(frozen=True)
class MethodSpec:
    """A method name and its options; ``parse("gradops:alpha=-3")`` reads the CLI form."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        args = ",".join(f"{k}={_format(v)}" for k, v in sorted(self.options.items()))
        return f"{self.name}({args})"

    def factory(self):
        return lambda: get(self.name, **self.options)

    def check(self) -> None:
        """Raise a clear error now for an unknown method or a bad option, not mid-run."""
        if self.name != SINGLE_TASK:
            method_class(self.name)
            get(self.name, **self.options)

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        name, *parts = text.strip().split(":")
        options = {}
        for part in parts:
            if "=" not in part:
                raise InvalidOptionError(f"method option {part!r} in {text!r} is not key=value")
            key, value = part.split("=", 1)
            options[key.strip()] = parse_value(value)
        return cls(name.strip().lower().replace("-", "_"), options)


def _format(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "/".join(_format(v) for v in value)
    return repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(
        value, float) else str(value)


def parse_value(text: str) -> Any:
    """A CLI value: int, float, bool, None, a list (``a/b/c`` or ``a,b,c``) or a string."""
    text = text.strip()
    if "/" in text or ("," in text and not text.startswith("'")):
        return [parse_value(part) for part in re.split(r"[/,]", text) if part]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", label).strip("_")


def config_key(config: Mapping[str, Any]) -> str:
    """A short hash of a configuration: runs of other settings live beside each other.

    Settings at their neutral value (``NEUTRAL_SETTINGS``) do not count, so adding one to the
    problems left the earlier runs' keys unchanged.
    """
    text = json.dumps(_clean(essential_config(config)), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_path(out: Path, problem: Problem, spec: MethodSpec, seed: int,
             config: Mapping[str, Any]) -> Path:
    return (out / problem.name / "runs" / _slug(spec.label)
            / f"seed{seed}-{config_key(config)}.json")


def _clean(value: Any) -> Any:
    """JSON-friendly copies: NumPy scalars to floats, NaN to None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def run(problem_name: str, spec: MethodSpec, seed: int, config: Mapping[str, Any],
        device: str | torch.device = "cpu", out: str | Path = "results", force: bool = False,
        progress: bool = False, checkpoint_every: int | None = None,
        resume: bool = False, nproc: int = 1) -> dict[str, Any]:
    """Train (or reuse) one run and return its record.

    ``checkpoint_every`` N: save the run's state every N steps beside its record
    (``<record>.ckpt``, removed when the run completes); ``resume``: continue from it.
    ``nproc`` > 1: train in that many processes with torch.distributed (gloo on the CPU, NCCL on
    CUDA), each on its share of every batch, combined as the configuration's ``ddp`` says.
    """
    problem = get_problem(problem_name)
    spec.check()
    device = torch.device(device)
    config = _clean(dict(config))
    path = run_path(Path(out), problem, spec, seed, config)
    if path.is_file() and not force:
        record = json.loads(path.read_text())
        if (essential_config(record.get("config") or {}) == essential_config(config)
                and record.get("options") == _clean(spec.options)):
            return record
    if (checkpoint_every is not None or resume) and not isinstance(problem, SupervisedProblem):
        raise InvalidOptionError(f"{problem.name} runs in seconds to minutes and is not "
                                 "checkpointed; --checkpoint-every and --resume apply to "
                                 "census-income, digits, multi-mnist and nyuv2")
    if nproc < 1 or (nproc > 1 and spec.name == SINGLE_TASK):
        raise InvalidOptionError(f"--nproc {nproc}: give a positive number of processes (the "
                                 "single-task baseline runs in one)")
    if nproc > 1 and not isinstance(problem, SupervisedProblem):
        raise InvalidOptionError(f"{problem.name} trains on a handful of points; --nproc "
                                 "applies to census-income, digits, multi-mnist and nyuv2")
    if resume and checkpoint_every is None:
        raise InvalidOptionError("--resume needs --checkpoint-every (how often to keep saving)")

    def checkpoint(part: str = "") -> dict[str, Any]:
        if checkpoint_every is None:
            return {}
        return {"checkpoint": Checkpointing(path.with_name(f"{path.stem}{part}.ckpt"),
                                            checkpoint_every, resume)}

    started = time.perf_counter()
    if spec.name == SINGLE_TASK:
        metrics: dict[str, dict[str, float]] = {"validation": {}, "test": {}}
        statistics: dict[str, Any] = {}
        note = ""
        plans = []
        for task in problem.tasks(config):
            plan = checkpoint(f"-{task}")
            plans.append(plan)
            result = problem.train(MethodSpec("sum").factory(), config, seed, device,
                                   tasks=[task], progress=progress, **plan)
            for split in metrics:
                metrics[split].update(result.metrics[split])
            note = result.note
    else:
        plans = [checkpoint()]
        if nproc > 1:
            result = train_distributed(problem, spec, config, seed, device, nproc, progress,
                                       plans[0])
        else:
            result = problem.train(spec.factory(), config, seed, device, progress=progress,
                                   **plans[0])
        metrics, statistics, note = result.metrics, result.statistics, result.note
    record = _clean({
        "problem": problem.name, "method": spec.name, "options": spec.options,
        "label": spec.label, "seed": seed, "config": config, "nproc": nproc, "metrics": metrics,
        "statistics": statistics, "note": note, "device": str(device),
        "deconflict_version": __version__, "torch_version": torch.__version__,
        "wall_time_s": time.perf_counter() - started,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    write_json(path, record)
    for plan in plans:  # the record is complete: the checkpoints have served
        if plan:
            checkpoint = plan["checkpoint"]
            checkpoint.path.unlink(missing_ok=True)
            for rank in range(nproc if nproc > 1 else 0):
                checkpoint.for_rank(rank).path.unlink(missing_ok=True)
    return record


def train_distributed(problem: Problem, spec: MethodSpec, config: Mapping[str, Any], seed: int,
                      device: torch.device, nproc: int, progress: bool,
                      plan: Mapping[str, Any]) -> TrainResult:
    """Train in ``nproc`` processes (one per rank, spawned here) and return rank 0's result."""
    import tempfile

    import torch.multiprocessing as multiprocessing

    with tempfile.TemporaryDirectory(prefix="deconflict-ddp-") as folder:
        result_path = Path(folder) / "result.pt"
        multiprocessing.spawn(
            _rank_main, nprocs=nproc, join=True,
            args=(nproc, f"file://{folder}/store", str(result_path), problem.name, spec, config,
                  seed, str(device), progress, dict(plan)))
        metrics, statistics, note = torch.load(result_path, weights_only=False)
    return TrainResult(metrics, statistics, note)


def _rank_main(rank: int, nproc: int, store: str, result_path: str, problem_name: str,
               spec: MethodSpec, config: Mapping[str, Any], seed: int, device: str,
               progress: bool, plan: dict[str, Any]) -> None:
    """One rank of ``train_distributed``: join the group, train, rank 0 saves the result."""
    import torch.distributed as distributed

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        device = f"cuda:{rank}"
    # The machine's cores are shared among the ranks.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    distributed.init_process_group(backend, init_method=store, rank=rank, world_size=nproc)
    try:
        result = get_problem(problem_name).train(spec.factory(), config, seed,
                                                 torch.device(device),
                                                 progress=progress and rank == 0, **plan)
        if rank == 0:
            save_torch(result_path, (result.metrics, result.statistics, result.note))
        # Tear the group down together: a rank leaving while another still holds its gloo
        # connections can abort ("terminate called without an active exception").
        distributed.barrier()
    finally:
        distributed.destroy_process_group()


def run_many(problem_name: str, specs: Sequence[MethodSpec], seeds: Sequence[int],
             config: Mapping[str, Any], device: str = "cpu", out: str | Path = "results",
             force: bool = False, progress: bool = True, checkpoint_every: int | None = None,
             resume: bool = False, nproc: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Every (method, seed) run; records grouped by method label, in the given order."""
    from tqdm import tqdm

    for spec in specs:
        spec.check()
    records: dict[str, list[dict[str, Any]]] = {spec.label: [] for spec in specs}
    jobs = [(spec, seed) for spec in specs for seed in seeds]
    for spec, seed in tqdm(jobs, desc=f"{problem_name}: runs", unit="run", disable=not progress):
        records[spec.label].append(run(problem_name, spec, seed, config, device, out, force,
                                       progress=False, checkpoint_every=checkpoint_every,
                                       resume=resume, nproc=nproc))
    return records
