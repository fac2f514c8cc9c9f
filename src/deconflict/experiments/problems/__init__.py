"""The benchmark problems, by name: every module of this package is imported, and each
``Problem`` subclass with a ``name`` registers itself (``base.REGISTRY``), so a new problem is a
new module and nothing else."""

from __future__ import annotations

import importlib
import pkgutil

from ...errors import InvalidOptionError
from .base import REGISTRY, Metric, MultiTaskModel, Problem, SupervisedProblem, TrainResult

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

PROBLEMS: dict[str, Problem] = {name: cls() for name, cls in REGISTRY.items()}


def get_problem(name: str) -> Problem:
    if name not in PROBLEMS:
        raise InvalidOptionError(f"unknown problem {name!r}; the problems are: "
                                 f"{', '.join(PROBLEMS)}")
    return PROBLEMS[name]


__all__ = ["PROBLEMS", "Metric", "MultiTaskModel", "Problem", "SupervisedProblem",
           "TrainResult", "get_problem"]
