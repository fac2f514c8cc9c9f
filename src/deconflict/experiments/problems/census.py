"""UCI Census-income with the three GradOPS tasks (GradOPS Section 4.1 and Appendix B).

Income, marital status and education (see ``data.census``), each a binary classification with a
logistic loss; metric: AUC per task (and the average in comparisons). Model (GradOPS settings): a
shared 2-layer fully connected ReLU network with 192 hidden units per layer and one dropout layer
(p = 0.3), a linear head per task; Adam with lr 1e-4, batch 1024, 200 epochs. ``model="mmoe"``
swaps in a multi-gate mixture of experts (Ma et al., KDD 2018) with ``experts`` experts of the
same shape (smaller units) and a softmax gate and small tower per task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import InvalidOptionError
from ..data.census import EDUCATION_CUTS, TASKS, load_census
from ..metrics import roc_auc
from ..models import MMoE, SharedBottom
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

MODELS = ("shared_bottom", "mmoe")


def _dataset(split: Any) -> Dataset:
    return Dataset(torch.from_numpy(split.features),
                   {t: torch.from_numpy(v) for t, v in split.labels.items()})


class CensusIncome(SupervisedProblem):
    name = "census-income"
    description = ("UCI Census-income (KDD): income > 50K, never married, at least college; "
                   "AUC per task (GradOPS Section 4.1)")
    schema = (
        epochs_setting(200, 1),
        batch_size_setting(1024, 512),
        lr_setting(1e-4, 1e-3),
        WEIGHT_DECAY,
        Setting("hidden", "ints", [192, 192], "units of the shared layers", [16, 16], low=1),
        Setting("dropout", "float", 0.3, "dropout probability", low=0.0, high=1.0,
                open_high=True),
        Setting("model", "str", "shared_bottom", "shared-bottom network or multi-gate mixture "
                "of experts", choices=MODELS),
        Setting("experts", "int", 8, "experts of the MMoE model", 2, low=1),
        Setting("expert_hidden", "ints", [64, 64], "units of each expert's layers", [8, 8],
                low=1),
        Setting("education_cut", "str", "bachelors", "lowest degree counted as 'at least "
                "college'", choices=tuple(EDUCATION_CUTS)),
        Setting("subsample", "int", None, "keep only the first that many training rows", 2048,
                low=1, optional=True),
        REPRESENTATION,
        DATA,
    )

    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        return TASKS

    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        return tuple(Metric(f"auc_{task}", task, True) for task in TASKS)

    def load(self, config: Mapping[str, Any]) -> Data:
        census = load_census(config.get("data"), config["education_cut"])
        train = _dataset(census.train)
        limit = config.get("subsample")
        if limit:
            train = Dataset(train.inputs[:limit], {t: v[:limit] for t, v in train.targets.items()})
        return Data(train, _dataset(census.validation), _dataset(census.test), census.note)

    def build_model(self, config: Mapping[str, Any], tasks: Sequence[str],
                    data: Data) -> MultiTaskModel:
        inputs = data.train.inputs.shape[1]
        outputs = {task: 1 for task in tasks}
        if config["model"] == "shared_bottom":
            return SharedBottom(inputs, config["hidden"], outputs, config["dropout"])
        if config["model"] == "mmoe":
            return MMoE(inputs, config["experts"], config["expert_hidden"], outputs,
                        config["dropout"])
        raise InvalidOptionError(f"census-income: model must be 'shared_bottom' or 'mmoe', got "
                                 f"{config['model']!r}")

    def losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               tasks: Sequence[str]) -> list[Tensor]:
        return [torch.nn.functional.binary_cross_entropy_with_logits(
            outputs[task].squeeze(-1), targets[task]) for task in tasks]

    def evaluate(self, model: MultiTaskModel, dataset: Dataset, tasks: Sequence[str],
                 config: Mapping[str, Any]) -> dict[str, float]:
        scores = predict(model, dataset)
        return {f"auc_{task}": roc_auc(dataset.targets[task].numpy(),
                                       scores[task].squeeze(-1).numpy()) for task in tasks}
