"""Runs: one (problem, method, options, seed, configuration) trained once, recorded as JSON.

Layout of a results directory::

    <out>/<problem>/runs/<method label>/seed<k>-<config hash>.json   one record per run
    <out>/<problem>/<name>.md, <name>.csv             comparison tables (``compare``)
    <out>/<problem>/sweep_<method>_<option>.*          sweeps (``sweep``)

A record holds the problem, method, options, seed, full configuration, library and PyTorch
versions, device, the number of processes and of PyTorch intra-op threads per process that
trained it, metrics (validation and test), the conflict statistics of training, the data note,
the wall time and the date. A run whose record exists with the same configuration is
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import DataFormatError, InvalidOptionError
from ..io import save_torch, write_json
from ..methods.base import Method
from ..methods.options import parse_options
from ..methods.registry import get, method_class
from .problems import get_problem
from .problems.base import (
    Checkpointing,
    Problem,
    TrainResult,
    essential_config,
)
from .problems.settings import Setting

SINGLE_TASK = "single_task"


@dataclass(frozen=True)
class MethodSpec:
    """A method name and its options; ``parse("gradops:alpha=-3")`` reads the CLI form.

    ``options`` holds only what the user gave, validated by the method's declaration (so a
    record shows exactly the options that were set).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        args = ",".join(f"{k}={_format(v)}" for k, v in sorted(self.options.items()))
        return f"{self.name}({args})"

    def factory(self) -> Callable[[], Method]:
        """A fresh method with these options per call (each run, rank or task gets its own)."""
        return lambda: get(self.name, **self.options)

    def check(self) -> None:
        """Raise a clear error now for an unknown method or a bad option, not mid-run."""
        if self.name != SINGLE_TASK:
            method_class(self.name)
            get(self.name, **self.options)

    @classmethod
    def parse(cls, text: str, extra: Sequence[tuple[str, str]] = ()) -> MethodSpec:
        """``name:key=value:...``, plus options given apart (``--key value``) in ``extra``.

        Values are parsed by the types the method declares; an unknown method or option, a
        value of the wrong type or out of range, or an option given twice is an
        InvalidOptionError (UnknownMethodError for the name).
        """
        name, *parts = text.strip().split(":")
        if not name.strip():
            raise InvalidOptionError(f"method spec {text!r} has no method name")
        given: list[tuple[str, str]] = []
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise InvalidOptionError(f"method option {part!r} in {text!r} is not key=value")
            given.append((key, value))
        texts: dict[str, str] = {}
        for key, value in [*given, *extra]:
            key = key.strip().replace("-", "_")
            if key in texts:
                raise InvalidOptionError(f"method option {key} is given twice")
            texts[key] = value
        name = name.strip().lower().replace("-", "_")
        if name == SINGLE_TASK:
            if texts:
                raise InvalidOptionError(f"{SINGLE_TASK} takes no options")
            return cls(name)
        method = method_class(name)
        return cls(method.name, parse_options(method.name, method.OPTIONS, texts))


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


def config_key(config: Mapping[str, Any], settings: Iterable[Setting] = ()) -> str:
    """A short hash of a configuration: runs of other settings live beside each other.

    Settings at their neutral value (``NEUTRAL_SETTINGS``, and the problem's ``neutral``
    ``settings`` at their default) do not count, so adding one to a problem left the earlier
    runs' keys unchanged.
    """
    text = json.dumps(_clean(essential_config(config, settings)), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_path(out: Path, problem: Problem, spec: MethodSpec, seed: int,
             config: Mapping[str, Any]) -> Path:
    return (out / problem.name / "runs" / _slug(spec.label)
            / f"seed{seed}-{config_key(config, problem.settings())}.json")


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


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``checkpoints`` are the files that let ``--resume`` continue it."""

    def __init__(self, label: str, checkpoints: Sequence[Path]) -> None:
        super().__init__(label)
        self.label = label
        self.checkpoints = list(checkpoints)


def _checkpoints(path: Path) -> list[Path]:
    """The checkpoint files of the run recorded at ``path`` (per task, per rank included)."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f"{path.stem}*.ckpt"))


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataFormatError(f"the run record {path} cannot be read ({_first_line(error)}): "
                              "delete it, or rerun with --force to retrain the run") from None
    if not isinstance(record, dict):
        raise DataFormatError(f"the run record {path} is not a JSON object: delete it, or rerun "
                              "with --force to retrain the run")
    return record


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _reusable(path: Path, spec: MethodSpec, config: Mapping[str, Any], force: bool,
              settings: Iterable[Setting] = ()) -> dict[str, Any] | None:
    if force or not path.is_file():
        return None
    record = _read_record(path)
    if (essential_config(record.get("config") or {}, settings)
            == essential_config(config, settings)
            and record.get("options") == _clean(spec.options)):
        return record
    return None


def preflight(problem_name: str, spec: MethodSpec, seed: int, config: Mapping[str, Any],
              out: str | Path = "results", force: bool = False, resume: bool = False) -> None:
    """Refuse, before anything trains, what would fail or go wrong in ``run``.

    A corrupt record is named (reading it would fail); a checkpoint left by an interrupted run
    must be continued (``resume``) or discarded (``force``) explicitly, never silently
    overwritten by a run started over; with ``resume`` the checkpoint must be readable.
    """
    problem = get_problem(problem_name)
    spec.check()
    config = _clean(dict(config))
    path = run_path(Path(out), problem, spec, seed, config)
    if _reusable(path, spec, config, force, problem.settings()) is not None:
        return
    checkpoints = _checkpoints(path)
    if checkpoints and not resume and not force:
        raise InvalidOptionError(
            f"{checkpoints[0]} holds an interrupted run of {spec.label} (seed {seed}): add "
            "--resume (with --checkpoint-every) to continue it, or --force to start it over")
    if resume:
        for checkpoint in checkpoints:
            try:
                torch.load(checkpoint, map_location="cpu", weights_only=False)
            except Exception as error:  # any unreadable file: name it, whatever torch raised
                raise DataFormatError(
                    f"the checkpoint {checkpoint} cannot be read ({_first_line(error)}): "
                    "delete it to start the run over, or rerun with --force") from None


def _check_threads(threads: int | None) -> None:
    """Refuse a thread count torch would refuse mid-run (or, for a bool, silently take as 1)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise InvalidOptionError(f"--threads {threads!r}: give a positive number of threads")


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[int]:
    """PyTorch's intra-op thread count set to ``threads`` inside the block; yields the count in
    effect there (PyTorch's current one when ``threads`` is None, which leaves it alone).

    The count is process-wide state: the runner is also called in-process (tests, notebooks),
    so the caller's count is restored on leaving, after an exception or Ctrl-C too.
    """
    _check_threads(threads)
    if threads is None:
        yield torch.get_num_threads()
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def rank_threads(threads: int | None, nproc: int) -> int:
    """The intra-op threads of each of ``nproc`` ranks: ``threads``, or by default the machine's
    cores shared among the ranks (so N processes do not oversubscribe the cores N times)."""
    return threads if threads is not None else max(1, (os.cpu_count() or 1) // nproc)


def run(problem_name: str, spec: MethodSpec, seed: int, config: Mapping[str, Any],
        device: str | torch.device = "cpu", out: str | Path = "results", force: bool = False,
        progress: bool = False, checkpoint_every: int | None = None,
        resume: bool = False, nproc: int = 1, threads: int | None = None) -> dict[str, Any]:
    """Train (or reuse) one run and return its record.

    ``checkpoint_every`` N: save the run's state every N steps beside its record
    (``<record>.ckpt``, removed when the run completes); ``resume``: continue from it.
    ``nproc`` > 1: train in that many processes with torch.distributed (gloo on the CPU, NCCL on
    CUDA), each on its share of every batch, combined as the configuration's ``ddp`` says.
    ``threads``: PyTorch's intra-op threads while training (per rank with ``nproc`` > 1), set
    for the training only and restored after; None keeps PyTorch's count (``rank_threads`` per
    rank). The record's ``threads`` is the count training ran with, so its timing can be read.
    A reused record is returned as it was written: the thread count does not name a run.
    """
    problem = get_problem(problem_name)
    spec.check()
    device = torch.device(device)
    config = _clean(dict(config))
    path = run_path(Path(out), problem, spec, seed, config)
    reused = _reusable(path, spec, config, force, problem.settings())
    if reused is not None:
        return reused
    preflight(problem_name, spec, seed, config, out, force, resume)
    _check_threads(threads)
    if nproc < 1 or (nproc > 1 and spec.name == SINGLE_TASK):
        raise InvalidOptionError(f"--nproc {nproc}: give a positive number of processes (the "
                                 "single-task baseline runs in one)")
    problem.check_execution(checkpoint=checkpoint_every is not None or resume, nproc=nproc)
    if resume and checkpoint_every is None:
        raise InvalidOptionError("--resume needs --checkpoint-every (how often to keep saving)")
    if force and not resume:  # --force starts over: an old checkpoint must not be resumed later
        for stale in _checkpoints(path):
            stale.unlink()

    def checkpoint(part: str = "") -> dict[str, Any]:
        if checkpoint_every is None:
            return {}
        return {"checkpoint": Checkpointing(path.with_name(f"{path.stem}{part}.ckpt"),
                                            checkpoint_every, resume)}

    started = time.perf_counter()
    try:
        if spec.name == SINGLE_TASK:
            metrics: dict[str, dict[str, float]] = {"validation": {}, "test": {}}
            statistics: dict[str, Any] = {}
            note = ""
            plans = []
            with intra_op_threads(threads) as used:
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
            if nproc > 1:  # the ranks set their own threads; this process only waits
                result, used = train_distributed(problem, spec, config, seed, device, nproc,
                                                 progress, plans[0], threads)
            else:
                with intra_op_threads(threads) as used:
                    result = problem.train(spec.factory(), config, seed, device,
                                           progress=progress, **plans[0])
            metrics, statistics, note = result.metrics, result.statistics, result.note
    except KeyboardInterrupt:
        raise RunInterrupted(spec.label, _checkpoints(path)) from None
    record = _clean({
        "problem": problem.name, "method": spec.name, "options": spec.options,
        "label": spec.label, "seed": seed, "config": config, "nproc": nproc, "threads": used,
        "metrics": metrics, "statistics": statistics, "note": note, "device": str(device),
        "deconflict_version": __version__, "torch_version": torch.__version__,
        "wall_time_s": time.perf_counter() - started,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    write_json(path, record)
    for plan in plans:  # the record is complete: the checkpoints have served
        if plan:
            saved: Checkpointing = plan["checkpoint"]
            saved.path.unlink(missing_ok=True)
            for rank in range(nproc if nproc > 1 else 0):
                saved.for_rank(rank).path.unlink(missing_ok=True)
    return record


def train_distributed(problem: Problem, spec: MethodSpec, config: Mapping[str, Any], seed: int,
                      device: torch.device, nproc: int, progress: bool,
                      plan: Mapping[str, Any], threads: int | None = None
                      ) -> tuple[TrainResult, int]:
    """Train in ``nproc`` processes (one per rank, spawned here); rank 0's result and the
    intra-op threads it trained with (``threads``, or ``rank_threads``'s default)."""
    import tempfile

    import torch.multiprocessing as multiprocessing

    with tempfile.TemporaryDirectory(prefix="deconflict-ddp-") as folder:
        result_path = Path(folder) / "result.pt"
        multiprocessing.spawn(
            _rank_main, nprocs=nproc, join=True,
            args=(nproc, f"file://{folder}/store", str(result_path), problem.name, spec, config,
                  seed, str(device), progress, dict(plan), threads))
        metrics, statistics, note, used = torch.load(result_path, weights_only=False)
    return TrainResult(metrics, statistics, note), used


def _rank_main(rank: int, nproc: int, store: str, result_path: str, problem_name: str,
               spec: MethodSpec, config: Mapping[str, Any], seed: int, device: str,
               progress: bool, plan: dict[str, Any], threads: int | None = None) -> None:
    """One rank of ``train_distributed``: join the group, train, rank 0 saves the result."""
    import torch.distributed as distributed

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        device = f"cuda:{rank}"
    # A spawned process of its own, ended after training: nothing to restore.
    torch.set_num_threads(rank_threads(threads, nproc))
    used = torch.get_num_threads()
    distributed.init_process_group(backend, init_method=store, rank=rank, world_size=nproc)
    try:
        result = get_problem(problem_name).train(spec.factory(), config, seed,
                                                 torch.device(device),
                                                 progress=progress and rank == 0, **plan)
        if rank == 0:
            save_torch(result_path, (result.metrics, result.statistics, result.note, used))
        # Tear the group down together: a rank leaving while another still holds its gloo
        # connections can abort ("terminate called without an active exception").
        distributed.barrier()
    finally:
        distributed.destroy_process_group()


def run_many(problem_name: str, specs: Sequence[MethodSpec], seeds: Sequence[int],
             config: Mapping[str, Any], device: str = "cpu", out: str | Path = "results",
             force: bool = False, progress: bool = True, checkpoint_every: int | None = None,
             resume: bool = False, nproc: int = 1,
             threads: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every (method, seed) run; records grouped by method label, in the given order.

    ``threads`` (see ``run``) is set around each run's training, not around the loop, so the
    caller's thread count is back between runs and after a failed one.
    """
    from tqdm import tqdm

    if len({spec.label for spec in specs}) != len(specs):
        raise InvalidOptionError(f"a method is given twice: {[spec.label for spec in specs]}")
    records: dict[str, list[dict[str, Any]]] = {spec.label: [] for spec in specs}
    jobs = [(spec, seed) for spec in specs for seed in seeds]
    _check_threads(threads)
    for spec, seed in jobs:  # every refusal before the first run trains
        preflight(problem_name, spec, seed, config, out, force, resume)
    for spec, seed in tqdm(jobs, desc=f"{problem_name}: runs", unit="run", disable=not progress):
        # Each run's own bar over its steps sits under this one (tqdm stacks open bars).
        records[spec.label].append(run(problem_name, spec, seed, config, device, out, force,
                                       progress=progress, checkpoint_every=checkpoint_every,
                                       resume=resume, nproc=nproc, threads=threads))
    return records
