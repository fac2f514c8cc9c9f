"""The benchmark problems, by name."""

from __future__ import annotations

from ...errors import InvalidOptionError
from .base import Metric, MultiTaskModel, Problem, SupervisedProblem, TrainResult
from .census import CensusIncome
from .digits import Digits, MultiMnist
from .nyuv2 import NYUv2
from .toy2d import Toy2D
from .xor_and import XorAnd

PROBLEMS: dict[str, Problem] = {
    problem.name: problem for problem in (Toy2D(), XorAnd(), CensusIncome(), Digits(),
                                          MultiMnist(), NYUv2())
}


def get_problem(name: str) -> Problem:
    if name not in PROBLEMS:
        raise InvalidOptionError(f"unknown problem {name!r}; the problems are: "
                                 f"{', '.join(PROBLEMS)}")
    return PROBLEMS[name]


__all__ = ["PROBLEMS", "Metric", "MultiTaskModel", "Problem", "SupervisedProblem",
           "TrainResult", "get_problem"]
