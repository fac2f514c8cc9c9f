"""``ConflictMonitor``: conflict diagnostics gathered over training, written as CSV and TensorBoard.

Cheap enough to leave on: per observed step it does T x T arithmetic on the engine's Gramians
(``conflicts.step_conflicts``) and keeps (T (T - 1) / 2) cosines per shared layer. Use::

    monitor = deconflict.ConflictMonitor(method, task_names=["seg", "depth"])
    ...
    record = deconflict.backward(losses, trunk, method)   # compute_gramian=True for sum/mean
    monitor.observe(record)
    ...
    monitor.write_csv("diagnostics/")        # steps.csv, layers.csv
    print(monitor.summary())

TensorBoard (``tensorboard=<log dir>``, needs the ``tensorboard`` extra): per observed step the
number of conflicting pairs, weak and strong conflict, the update projections, each pair's cosine
and each layer's mean cosine, plus a histogram of the pairwise cosines.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidOptionError
from ..io import write_text
from ..methods.base import Method
from ..record import StepRecord
from .conflicts import StepConflicts, pair_indices, step_conflicts

HISTOGRAM_BINS = 40


class ConflictMonitor:
    """Aggregates ``StepConflicts`` over training (see the module docstring).

    Args:
        method: the method being trained (tells whether it only scales the task gradients);
            None: modified gradients are known only where the method reports them.
        task_names: names for the CSV columns (default task0, task1, ...).
        every: observe one step in ``every`` (the others are counted, not measured).
        tensorboard: a log directory to write TensorBoard events to, or None.

    The cosines are those of docs/methods.md#notation (K = N^-1 M N^-1); weak and strong
    conflict are defined in docs/methods.md#stationarity.

    >>> import torch
    >>> import deconflict
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> method = deconflict.GradOPS()
    >>> monitor = deconflict.ConflictMonitor(method, task_names=["a", "b"])
    >>> for step in range(3):
    ...     losses = [w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([-1.0, 1.0])]
    ...     record = deconflict.backward(losses, [w], method)
    ...     _ = monitor.observe(record)
    >>> monitor.pair_names
    ['a-b']
    >>> monitor.pair_cosines().round(4).tolist()
    [[-0.7071], [-0.7071], [-0.7071]]
    >>> summary = monitor.summary()
    >>> summary["mean_conflicting_pairs"], summary["strong_non_conflict_fraction"]
    (1.0, 1.0)
    """

    def __init__(self, method: Method | None = None, task_names: Sequence[str] | None = None,
                 every: int = 1, tensorboard: str | Path | None = None) -> None:
        if not isinstance(every, int) or every < 1:
            raise InvalidOptionError(f"every must be a positive integer, got {every!r}")
        self.scales_task_gradients = bool(method is not None and method.scales_task_gradients)
        self.task_names = None if task_names is None else [str(t) for t in task_names]
        self.every = every
        self.steps = 0
        self.measured: list[int] = []  # step numbers of the measured steps
        self._pairs: list[np.ndarray] = []  # whole-model cosines of the pairs i < j
        self._conflicting: list[int] = []
        self._weak: list[bool | None] = []
        self._strong: list[bool | None] = []
        self._projections: list[np.ndarray | None] = []
        self._update_cosines: list[np.ndarray] = []  # cos(g_i, D) where D != 0
        self._layers: dict[str, list[tuple[int, np.ndarray]]] = {}  # layer -> (index, cosines)
        self._r_sum: np.ndarray | None = None
        self._r_steps = 0
        self._writer = None if tensorboard is None else _summary_writer(tensorboard)

    # ----------------------------------------------------------------------------- observing
    def observe(self, record: StepRecord) -> StepConflicts | None:
        """Measure one step (every ``every``-th call); returns its diagnostics, or None."""
        self.steps += 1
        if (self.steps - 1) % self.every:
            return None
        conflicts = step_conflicts(record, self.scales_task_gradients)
        if conflicts is None:
            return None
        T = conflicts.num_tasks
        if self.task_names is None:
            self.task_names = [f"task{i}" for i in range(T)]
        if len(self.task_names) != T:
            raise InvalidOptionError(f"the monitor has {len(self.task_names)} task names and the "
                                     f"step has {T} tasks")
        rows, cols = pair_indices(T)
        index = len(self.measured)
        self.measured.append(self.steps)
        self._pairs.append(conflicts.cosines[rows, cols].astype(np.float32))
        self._conflicting.append(conflicts.conflicting_pairs)
        self._weak.append(conflicts.weak_conflict)
        self._strong.append(conflicts.strong_conflict)
        self._projections.append(conflicts.update_projections)
        if conflicts.update_projections is not None and record.update_sq_norm:
            self._update_cosines.append(conflicts.update_projections
                                        / np.sqrt(record.update_sq_norm))
        for layer, K in conflicts.layer_cosines.items():
            self._layers.setdefault(layer, []).append((index, K[rows, cols].astype(np.float32)))
        r = record.diagnostics.get("r")
        if r is not None:
            self._r_sum = r.numpy() if self._r_sum is None else self._r_sum + r.numpy()
            self._r_steps += 1
        if self._writer is not None:
            self._write_tensorboard(self._writer, self.task_names, conflicts)
        return conflicts

    # ---------------------------------------------------------------------------------- state
    _STATE = ("task_names", "steps", "measured", "_pairs", "_conflicting", "_weak", "_strong",
              "_projections", "_update_cosines", "_layers", "_r_sum", "_r_steps")

    def state_dict(self) -> dict[str, Any]:
        """Everything observed so far, to checkpoint with the training run."""
        return {name: getattr(self, name) for name in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s observations."""
        for name in self._STATE:
            setattr(self, name, state[name])

    # ------------------------------------------------------------------------------- results
    @property
    def pair_names(self) -> list[str]:
        names = self.task_names or []
        rows, cols = pair_indices(len(names))
        return [f"{names[i]}-{names[j]}" for i, j in zip(rows, cols, strict=True)]

    def pair_cosines(self) -> np.ndarray:
        """Whole-model cosines, measured steps x pairs (i < j, row-major)."""
        if not self._pairs:
            return np.zeros((0, 0))
        return np.stack(self._pairs).astype(np.float64)

    def layer_cosines(self) -> dict[str, np.ndarray]:
        """Per shared layer: its cosines, (measured steps where it had a gradient) x pairs."""
        return {layer: np.stack([v for _, v in entries]).astype(np.float64)
                for layer, entries in self._layers.items()}

    def cosine_histogram(self, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
        """Counts of the whole-model pairwise cosines in ``bins`` equal bins of [-1, 1]."""
        edges = np.linspace(-1.0, 1.0, bins + 1)
        counts, _ = np.histogram(self.pair_cosines().ravel(), bins=edges)
        return edges, counts

    def summary(self) -> dict[str, Any]:
        """Fractions and means over the measured steps (JSON-friendly).

        ``strong_non_conflict_fraction`` / ``weak_non_conflict_fraction``: of the steps where
        they are determined; ``mean_conflicting_pairs``; ``layer_conflict_fraction``: per layer,
        the fraction of (step, pair) entries with a negative cosine; ``conflict_step_fraction``:
        of the steps with some conflicting pair; ``cosine_histogram``;
        ``mean_update_cosine``: per task, the mean of cos(g_i, D) = p_i / ||D|| (how well the
        update serves each task); ``mean_r`` (GradOPS's r_i: above 1, task i dominates).
        """
        result: dict[str, Any] = {"steps": self.steps, "measured_steps": len(self.measured)}
        if not self.measured:
            return result
        for key, values in (("strong_non_conflict_fraction", self._strong),
                            ("weak_non_conflict_fraction", self._weak)):
            known = [v for v in values if v is not None]
            if known:
                result[key] = 1.0 - float(np.mean(known))
        result["mean_conflicting_pairs"] = float(np.mean(self._conflicting))
        result["conflict_step_fraction"] = float(np.mean(np.asarray(self._conflicting) > 0))
        if self._update_cosines:
            result["mean_update_cosine"] = np.mean(self._update_cosines, axis=0).tolist()
        result["layer_conflict_fraction"] = {
            layer: float((cosines < 0).mean()) for layer, cosines in self.layer_cosines().items()
            if cosines.size}
        edges, counts = self.cosine_histogram()
        result["cosine_histogram"] = {"edges": edges.tolist(), "counts": counts.tolist()}
        if self._r_sum is not None:
            result["mean_r"] = (self._r_sum / self._r_steps).tolist()
        return result

    # -------------------------------------------------------------------------------- output
    def write_csv(self, directory: str | Path) -> dict[str, Path]:
        """steps.csv (one row per measured step) and layers.csv (one per step and layer)."""
        directory = Path(directory)
        pairs = [f"cos_{name}" for name in self.pair_names]
        projections = [f"projection_{name}" for name in self.task_names or []]
        steps: list[list[Any]] = [["step", "conflicting_pairs", "weak_conflict",
                                   "strong_conflict", *pairs, *projections]]
        for k, step in enumerate(self.measured):
            projection = self._projections[k]
            steps.append([step, self._conflicting[k], _flag(self._weak[k]),
                          _flag(self._strong[k]), *_floats(self._pairs[k]),
                          *(_floats(projection) if projection is not None
                            else [""] * len(projections))])
        layers: list[list[Any]] = [["step", "layer", *pairs]]
        for layer, entries in self._layers.items():
            for index, cosines in entries:
                layers.append([self.measured[index], layer, *_floats(cosines)])
        return {"steps": write_text(directory / "steps.csv", _csv(steps)),
                "layers": write_text(directory / "layers.csv", _csv(layers))}

    def _write_tensorboard(self, writer: Any, task_names: Sequence[str],
                           conflicts: StepConflicts) -> None:
        step = self.steps
        writer.add_scalar("conflict/conflicting_pairs", conflicts.conflicting_pairs, step)
        for name, value in (("weak_conflict", conflicts.weak_conflict),
                            ("strong_conflict", conflicts.strong_conflict)):
            if value is not None:
                writer.add_scalar(f"conflict/{name}", float(value), step)
        for name, value in zip(self.pair_names, self._pairs[-1], strict=True):
            writer.add_scalar(f"cosine/{name}", float(value), step)
        if conflicts.update_projections is not None:
            for name, value in zip(task_names, conflicts.update_projections, strict=True):
                writer.add_scalar(f"update_projection/{name}", float(value), step)
        rows, cols = pair_indices(conflicts.num_tasks)
        for layer, K in conflicts.layer_cosines.items():
            writer.add_scalar(f"layer_mean_cosine/{layer or '(root)'}",
                              float(K[rows, cols].mean()) if rows.size else 1.0, step)
        if rows.size:
            writer.add_histogram("cosines", conflicts.cosines[rows, cols], step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (if any)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer(log_dir: str | Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise InvalidOptionError(
            "TensorBoard logging needs the tensorboard package: pip install "
            f"'deconflict[tensorboard]' ({error})") from None
    return SummaryWriter(log_dir=str(log_dir))


def _flag(value: bool | None) -> str:
    return "" if value is None else str(int(value))


def _floats(values: np.ndarray) -> list[str]:
    return [f"{float(v):.6g}" for v in values]


def _csv(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
