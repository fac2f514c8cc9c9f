"""Two-digit classification and reconstruction (the tensioner paper, Section 4.3).

Task "left": classify the upper-left digit (negative log-likelihood; metric accuracy). Task
"right": reconstruct the lower-right digit through the shared latent (MSE; metric reconstruction
MSE, lower is better), or, with ``variant="classify_both"``, classify it too. Model: a LeNet-like
shared encoder to a 50-dimensional latent, a classifier or an MLP decoder per task.

``digits``: the real handwritten digits bundled with scikit-learn (1,797 images of 8 x 8, on a
10 x 10 canvas), no files needed. ``multi-mnist``: MNIST from the standard idx files (28 x 28 on a
32 x 32 canvas resized to 28 x 28, as in the paper). The digit images are split first
(deterministically) and pairs are drawn within each split, so no test digit is seen in training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import InvalidOptionError
from ..data.two_digits import TwoDigits, compose
from ..models import TwoDigitModel
from .base import (
    DATA,
    REPRESENTATION,
    WEIGHT_DECAY,
    Data,
    Dataset,
    Metric,
    MultiTaskModel,
    SupervisedProblem,
    batch_size_setting,
    epochs_setting,
    lr_setting,
    predict,
)
from .settings import Setting

VARIANTS = ("classify_reconstruct", "classify_both")
SPLIT_SEED = 0


def _dataset(samples: TwoDigits, variant: str) -> Dataset:
    right = samples.right_images if variant == "classify_reconstruct" else samples.right_labels
    return Dataset(torch.from_numpy(samples.images),
                   {"left": torch.from_numpy(samples.left_labels),
                    "right": torch.from_numpy(right)})


def _schema(epochs: int, batch_size: int, pairs: float, smoke_pairs: float
            ) -> tuple[Setting, ...]:
    return (
        epochs_setting(epochs, 1),
        batch_size_setting(batch_size),
        lr_setting(1e-3),
        WEIGHT_DECAY,
        Setting("latent", "int", 50, "width of the shared latent", 8, low=1),
        Setting("pairs_per_image", "float", pairs, "two-digit images composed per digit image",
                smoke_pairs, low=0.0, open_low=True),
        Setting("variant", "str", VARIANTS[0], "reconstruct the lower-right digit or classify "
                "it too", choices=VARIANTS),
        REPRESENTATION,
        DATA,
    )


class TwoDigitProblem(SupervisedProblem):
    """Shared by ``digits`` and ``multi-mnist``; subclasses give the digit images."""

    canvas: int
    resize: int | None = None

    def _images(self, config: Mapping[str, Any]) -> tuple[dict[str, tuple[np.ndarray,
                                                                       np.ndarray]], str]:
        raise NotImplementedError

    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        return ("left", "right")

    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        right = (Metric("mse_right", "right", False) if config["variant"] == VARIANTS[0]
                 else Metric("accuracy_right", "right", True))
        return (Metric("accuracy_left", "left", True), right)

    def load(self, config: Mapping[str, Any]) -> Data:
        if config["variant"] not in VARIANTS:
            raise InvalidOptionError(f"{self.name}: variant must be one of {list(VARIANTS)}")
        splits, note = self._images(config)
        datasets = []
        for k, name in enumerate(("train", "validation", "test")):
            images, labels = splits[name]
            count = int(len(images) * config["pairs_per_image"])
            samples = compose(images, labels, count, self.canvas, SPLIT_SEED + k, self.resize)
            datasets.append(_dataset(samples, config["variant"]))
        train, validation, test = datasets
        return Data(train, validation, test, note=note)

    def build_model(self, config: Mapping[str, Any], tasks: Sequence[str],
                    data: Data) -> MultiTaskModel:
        size = data.train.inputs.shape[-1]
        kinds = {"left": ("classify", 10)}
        if config["variant"] == VARIANTS[0]:
            kinds["right"] = ("reconstruct", data.train.targets["right"].shape[1])
        else:
            kinds["right"] = ("classify", 10)
        return TwoDigitModel(size, config["latent"], {t: kinds[t] for t in tasks})

    def losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               tasks: Sequence[str]) -> list[Tensor]:
        losses = []
        for task in tasks:
            if targets[task].dtype == torch.int64:
                losses.append(torch.nn.functional.nll_loss(outputs[task], targets[task]))
            else:
                losses.append(torch.nn.functional.mse_loss(outputs[task], targets[task]))
        return losses

    def evaluate(self, model: MultiTaskModel, dataset: Dataset, tasks: Sequence[str],
                 config: Mapping[str, Any]) -> dict[str, float]:
        outputs = predict(model, dataset)
        metrics = {}
        for task in tasks:
            target = dataset.targets[task]
            if target.dtype == torch.int64:
                metrics[f"accuracy_{task}"] = float((outputs[task].argmax(-1) == target)
                                                    .double().mean())
            else:
                metrics[f"mse_{task}"] = float(((outputs[task] - target) ** 2).mean())
        return metrics


class Digits(TwoDigitProblem):
    name = "digits"
    description = ("scikit-learn's handwritten digits in pairs: classify the upper-left one, "
                   "reconstruct (or classify) the lower-right one (tensioner paper Section 4.3)")
    canvas = 10
    schema = _schema(epochs=30, batch_size=64, pairs=2.0, smoke_pairs=0.25)

    def _images(self, config: Mapping[str, Any]) -> tuple[dict[str, tuple[np.ndarray,
                                                                       np.ndarray]], str]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
        a, b = int(0.6 * len(order)), int(0.8 * len(order))
        parts = {"train": order[:a], "validation": order[a:b], "test": order[b:]}
        note = (f"scikit-learn digits ({len(images):,} images of 8 x 8), split deterministically "
                f"60/20/20 before pairing, {config['pairs_per_image']:g} pairs per image")
        return {k: (images[v], digits.target[v]) for k, v in parts.items()}, note


class MultiMnist(TwoDigitProblem):
    name = "multi-mnist"
    description = ("MNIST digits in pairs (standard idx files): classify the upper-left one, "
                   "reconstruct (or classify) the lower-right one (tensioner paper Section 4.3)")
    canvas = 32
    resize = 28
    schema = _schema(epochs=10, batch_size=128, pairs=1.0, smoke_pairs=0.05)

    def _images(self, config: Mapping[str, Any]) -> tuple[dict[str, tuple[np.ndarray,
                                                                       np.ndarray]], str]:
        from ..data.mnist import load_mnist

        mnist = load_mnist(config.get("data"))
        return {"train": mnist.train, "validation": mnist.validation, "test": mnist.test}, \
            mnist.note
