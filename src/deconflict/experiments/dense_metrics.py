"""The NYUv2 metrics of the MTAN and CAGrad tables (Liu et al., CVPR 2019; Liu et al., NeurIPS
2021, Table 1), accumulated over batches so a split never has to be held in memory at once.

Segmentation (13 classes, pixels labelled -1 ignored), from the confusion matrix H summed over
every valid pixel of the split (H[t, p] = pixels of true class t predicted as p):

- ``pixel_accuracy`` = 100 · trace(H) / sum(H);
- ``miou`` = 100 · mean over classes c of IoU_c = H[c, c] / (sum_p H[c, p] + sum_t H[t, c] -
  H[c, c]), i.e. TP / (TP + FP + FN). Classes with TP + FP + FN = 0 (absent from both the target
  and the prediction) are left out of the mean. The CAGrad / Nash-MTL code averages all 13 and
  would return NaN for such a class; on the full validation split every class is present, so
  the two agree there, and ours stays defined on small subsets.

Depth, over the pixels whose ground truth d is nonzero (0 marks a missing measurement):

- ``depth_abs_error`` = mean |d̂ - d|; ``depth_rel_error`` = mean |d̂ - d| / d.

Surface normals, over the pixels whose ground-truth normal n is not the zero vector, with
θ = angle(n̂, n) = atan2(|n̂ × n|, n̂ · n) in degrees (atan2 stays accurate near 0 and 180 degrees
where acos does not; for unit vectors it is the reference's acos(n̂ · n)):

- ``normal_mean`` and ``normal_median`` of θ; ``normal_within_t`` = 100 · fraction with θ < t for
  t = 11.25, 22.5, 30.

Every quantity is pooled over the pixels of the whole split. (The reference scripts average
per-batch values over batches of 2 images - per-batch medians included - which differs slightly
from the pooled value.) The median comes from a histogram of θ with 0.001-degree bins (the
middle angle, or the mean of the two middle ones, each placed within its bin), so it is exact to
within 0.001 degrees; everything else is exact.
Percentages are on the 0-100 scale of the papers' tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..errors import ShapeError

CLASSES = 13
IGNORE_INDEX = -1
THRESHOLDS = (11.25, 22.5, 30.0)
SEGMENTATION_METRICS = ("miou", "pixel_accuracy")
DEPTH_METRICS = ("depth_abs_error", "depth_rel_error")
NORMAL_METRICS = ("normal_mean", "normal_median",
                  *(f"normal_within_{t:g}" for t in THRESHOLDS))
TASK_METRICS = {"segmentation": SEGMENTATION_METRICS, "depth": DEPTH_METRICS,
                "normal": NORMAL_METRICS}


def _batch_shape(name: str, tensor: Tensor, channels: int) -> None:
    if tensor.ndim != 4 or tensor.shape[1] != channels:
        raise ShapeError(f"{name} must be B x {channels} x H x W, got {tuple(tensor.shape)}")


def _paired_float64(name: str, prediction: Tensor, target: Tensor,
                    channels: int) -> tuple[Tensor, Tensor]:
    """Prediction and target (B x channels x H x W, same shape) as float64 CPU tensors."""
    _batch_shape(name, prediction, channels)
    if prediction.shape != target.shape:
        raise ShapeError(f"{name} {tuple(prediction.shape)} and target "
                         f"{tuple(target.shape)} differ in shape")
    return (prediction.detach().to("cpu", torch.float64),
            target.detach().to("cpu", torch.float64))


class SegmentationAccumulator:
    """Confusion matrix over batches; ``update`` takes logits B x C x H x W or labels B x H x W."""

    def __init__(self, classes: int = CLASSES) -> None:
        self.classes = classes
        self.confusion = torch.zeros(classes, classes, dtype=torch.int64)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        if prediction.ndim == 4:
            if prediction.shape[1] != self.classes:
                raise ShapeError(f"segmentation logits have {prediction.shape[1]} channels, "
                                 f"expected one per class ({self.classes})")
            prediction = prediction.argmax(dim=1)
        if prediction.shape != target.shape:
            raise ShapeError(f"predicted labels {tuple(prediction.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        target = target.detach().to("cpu", torch.int64).reshape(-1)
        prediction = prediction.detach().to("cpu", torch.int64).reshape(-1)
        if bool((target >= self.classes).any()) or bool((target < IGNORE_INDEX).any()):
            raise ValueError(f"segmentation targets must lie in 0..{self.classes - 1} "
                             f"(or {IGNORE_INDEX} to ignore a pixel)")
        if bool((prediction < 0).any()) or bool((prediction >= self.classes).any()):
            raise ValueError(f"predicted labels must lie in 0..{self.classes - 1}")
        valid = target != IGNORE_INDEX
        cells = target[valid] * self.classes + prediction[valid]
        self.confusion += torch.bincount(cells, minlength=self.classes ** 2).reshape(
            self.classes, self.classes)

    def compute(self) -> dict[str, float]:
        H = self.confusion.to(torch.float64)
        total = float(H.sum())
        if total == 0:
            return {"miou": math.nan, "pixel_accuracy": math.nan}
        true_positive = torch.diag(H)
        union = H.sum(dim=1) + H.sum(dim=0) - true_positive
        present = union > 0
        return {"miou": 100.0 * float((true_positive[present] / union[present]).mean()),
                "pixel_accuracy": 100.0 * float(true_positive.sum()) / total}


class DepthAccumulator:
    """Sums of the absolute and relative errors over pixels with nonzero ground truth."""

    def __init__(self) -> None:
        self.absolute = 0.0
        self.relative = 0.0
        self.count = 0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        prediction, target = _paired_float64("depth prediction", prediction, target, 1)
        valid = target != 0
        error = (prediction[valid] - target[valid]).abs()
        self.absolute += float(error.sum())
        self.relative += float((error / target[valid]).sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {"depth_abs_error": math.nan, "depth_rel_error": math.nan}
        return {"depth_abs_error": self.absolute / self.count,
                "depth_rel_error": self.relative / self.count}


def normal_angles(prediction: Tensor, target: Tensor) -> Tensor:
    """Angles in degrees between predicted and true normals (B x 3 x H x W each) at the pixels
    whose true normal is nonzero, as a flat float64 tensor."""
    prediction, target = _paired_float64("normal prediction", prediction, target, 3)
    valid = (target != 0).any(dim=1)
    p = prediction.permute(0, 2, 3, 1)[valid]
    t = target.permute(0, 2, 3, 1)[valid]
    sine = torch.linalg.cross(p, t, dim=-1).norm(dim=-1)
    cosine = (p * t).sum(dim=-1)
    return torch.rad2deg(torch.atan2(sine, cosine))


class NormalAccumulator:
    """Angle errors over batches: exact sum and threshold counts, a histogram for the median."""

    BIN_WIDTH = 0.001  # degrees

    def __init__(self) -> None:
        self.bins = round(180.0 / self.BIN_WIDTH)
        self.histogram = torch.zeros(self.bins, dtype=torch.int64)
        self.total = 0.0
        self.count = 0
        self.within = [0] * len(THRESHOLDS)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        angles = normal_angles(prediction, target)
        self.total += float(angles.sum())
        self.count += angles.numel()
        for k, threshold in enumerate(THRESHOLDS):
            self.within[k] += int((angles < threshold).sum())
        index = (angles / self.BIN_WIDTH).floor().to(torch.int64).clamp_(0, self.bins - 1)
        self.histogram += torch.bincount(index, minlength=self.bins)

    def order_statistic(self, rank: int) -> float:
        """The ``rank``-th smallest angle (1-based), to within one bin: the bin's angles are
        taken as spread evenly across it."""
        cumulative = self.histogram.cumsum(0).to(torch.float64)
        k = int(torch.searchsorted(cumulative, torch.tensor([float(rank)],
                                                            dtype=torch.float64)))
        before = float(cumulative[k - 1]) if k > 0 else 0.0
        return (k + (rank - before - 0.5) / float(self.histogram[k])) * self.BIN_WIDTH

    def median(self) -> float:
        """Like numpy's: the middle angle, or the mean of the two middle ones for an even count."""
        if self.count % 2:
            return self.order_statistic((self.count + 1) // 2)
        half = self.count // 2
        return (self.order_statistic(half) + self.order_statistic(half + 1)) / 2

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return dict.fromkeys(NORMAL_METRICS, math.nan)
        result = {"normal_mean": self.total / self.count, "normal_median": self.median()}
        for threshold, count in zip(THRESHOLDS, self.within, strict=True):
            result[f"normal_within_{threshold:g}"] = 100.0 * count / self.count
        return result


class Accumulator(Protocol):
    """One task's metrics over batches: ``update`` per batch, ``compute`` at the end."""

    def update(self, prediction: Tensor, target: Tensor) -> None: ...

    def compute(self) -> dict[str, float]: ...


class DenseMetrics:
    """The metrics of the given tasks ("segmentation", "depth", "normal") over batches."""

    def __init__(self, tasks: Sequence[str] = ("segmentation", "depth", "normal"),
                 classes: int = CLASSES) -> None:
        unknown = [task for task in tasks if task not in TASK_METRICS]
        if unknown:
            raise ValueError(f"no dense metrics for task {unknown[0]!r}; tasks are "
                             f"{', '.join(TASK_METRICS)}")
        factories: dict[str, Callable[[], Accumulator]] = {
            "segmentation": lambda: SegmentationAccumulator(classes),
            "depth": DepthAccumulator, "normal": NormalAccumulator}
        self.accumulators = {task: factories[task]() for task in tasks}

    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        for task, accumulator in self.accumulators.items():
            accumulator.update(outputs[task], targets[task])

    def compute(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for accumulator in self.accumulators.values():
            result.update(accumulator.compute())
        return result


def segmentation_metrics(prediction: Tensor, target: Tensor,
                         classes: int = CLASSES) -> dict[str, float]:
    """mIoU and pixel accuracy (percent) of one set of predictions (logits or labels)."""
    accumulator = SegmentationAccumulator(classes)
    accumulator.update(prediction, target)
    return accumulator.compute()


def depth_metrics(prediction: Tensor, target: Tensor) -> dict[str, float]:
    """Absolute and relative depth errors over pixels with nonzero ground truth."""
    accumulator = DepthAccumulator()
    accumulator.update(prediction, target)
    return accumulator.compute()


def normal_metrics(prediction: Tensor, target: Tensor) -> dict[str, float]:
    """Mean and median angle error (degrees) and the percentages within 11.25, 22.5, 30."""
    accumulator = NormalAccumulator()
    accumulator.update(prediction, target)
    return accumulator.compute()
