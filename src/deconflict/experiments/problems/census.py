"""UCI Census-income with the three GradOPS tasks (GradOPS Section 4.1 and Appendix B).

Income, marital status and education (see ``data.census``), each a binary classification with a
logistic loss; metric: AUC per task (and the average in comparisons). Model (GradOPS settings): a
shared 2-layer fully connected ReLU network with 192 hidden units per layer and one dropout layer
(p = 0.3), a linear head per task; Adam with lr 1e-4, batch 1024, 200 epochs. ``model="mmoe"``
swaps in a multi-gate mixture of experts (Ma et al., KDD 2018) with ``experts`` experts of the
same shape (smaller units) and a softmax gate and small tower per task; ``"dselect_k"`` the same
experts with DSelect-k gates (options ``k``, ``gamma``); ``"cgc"`` and ``"ple"`` customized gate
control and progressive layered extraction (``experts`` shared and ``task_experts`` per-task
experts per level, ``levels`` levels for PLE); ``"cross_stitch"`` one ``hidden``-shaped tower per
task joined by cross-stitch units. What each model shares (the parameters
``deconflict.backward`` combines) is in ``experiments.models``. The defaults of the expert
counts, ``task_experts``, ``levels`` and ``k`` are sized for this problem's CPU budget, not taken
from the papers (``gamma`` = 1 is the DSelect-k authors' default). Representation mode
(``representation=True`` or a method that needs it) applies to shared_bottom, mmoe and
dselect_k only: CGC, PLE and cross-stitch have no representation that every task reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import InvalidOptionError
from ...methods.base import Method
from ..data.census import EDUCATION_CUTS, TASKS, load_census
from ..metrics import roc_auc
from ..models import CGC, PLE, CrossStitch, DSelectK, MMoE, SharedBottom
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

MODELS = ("shared_bottom", "mmoe", "cgc", "ple", "cross_stitch", "dselect_k")
# The models without a representation every task reads (see experiments.models).
WITHOUT_REPRESENTATION = ("cgc", "ple", "cross_stitch")


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
        Setting("model", "str", "shared_bottom", "shared-bottom network, multi-gate mixture "
                "of experts (mmoe, dselect_k), CGC, PLE or cross-stitch towers",
                choices=MODELS),
        Setting("experts", "int", 8, "experts of mmoe and dselect_k; shared experts per level "
                "of cgc and ple", 2, low=1),
        Setting("expert_hidden", "ints", [64, 64], "units of each expert's layers", [8, 8],
                low=1),
        # Added with cgc, ple and dselect_k: neutral, so that earlier records keep their keys.
        Setting("task_experts", "int", 2, "task-specific experts per task and level (cgc, ple)",
                1, low=1, neutral=True),
        Setting("levels", "int", 2, "extraction levels of ple", low=1, neutral=True),
        Setting("k", "int", 2, "experts each dselect_k gate selects at most", low=1,
                neutral=True),
        Setting("gamma", "float", 1.0, "width of dselect_k's smooth-step band", low=0.0,
                open_low=True, neutral=True),
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
        model = config["model"]
        if model in WITHOUT_REPRESENTATION and config.get("representation"):
            raise InvalidOptionError(_no_representation(model))
        if model == "shared_bottom":
            return SharedBottom(inputs, config["hidden"], outputs, config["dropout"])
        if model == "mmoe":
            return MMoE(inputs, config["experts"], config["expert_hidden"], outputs,
                        config["dropout"])
        if model == "dselect_k":
            return DSelectK(inputs, config["experts"], config["expert_hidden"], outputs,
                            config["dropout"], k=config["k"], gamma=config["gamma"])
        if model == "cgc":
            return CGC(inputs, outputs, config["experts"], config["task_experts"],
                       config["expert_hidden"], config["dropout"])
        if model == "ple":
            return PLE(inputs, outputs, config["experts"], config["task_experts"],
                       config["expert_hidden"], config["levels"], config["dropout"])
        if model == "cross_stitch":
            return CrossStitch(inputs, config["hidden"], outputs, config["dropout"])
        raise InvalidOptionError(f"census-income: model must be one of {', '.join(MODELS)}, "
                                 f"got {model!r}")

    def adjust_method(self, method: Method, config: Mapping[str, Any]) -> Method:
        # The engine's own error would not say why a representation method cannot work here.
        if config.get("model") in WITHOUT_REPRESENTATION and method.needs_features:
            raise InvalidOptionError(f"{method.name} works on the shared representation; "
                                     f"{_no_representation(config['model'])}")
        return method

    def losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               tasks: Sequence[str]) -> list[Tensor]:
        return [torch.nn.functional.binary_cross_entropy_with_logits(
            outputs[task].squeeze(-1), targets[task]) for task in tasks]

    def evaluate(self, model: MultiTaskModel, dataset: Dataset, tasks: Sequence[str],
                 config: Mapping[str, Any]) -> dict[str, float]:
        scores = predict(model, dataset)
        return {f"auc_{task}": roc_auc(dataset.targets[task].numpy(),
                                       scores[task].squeeze(-1).numpy()) for task in tasks}


def _no_representation(model: str) -> str:
    return (f"census-income: {model} has no shared representation that every task reads (each "
            "task reads its own output of the trunk), so representation mode is not supported "
            "with it; use shared_bottom, mmoe or dselect_k, or representation=False")
