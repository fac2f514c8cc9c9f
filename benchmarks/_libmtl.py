"""LibMTL's weighting classes without LibMTL's package initializer.

``LibMTL/__init__.py`` imports its trainer and models, which import torchvision; LibMTL 1.1.5
from PyPI pulls torchvision 0.28, which does not import with the CPU build of torch 2.13
(``operator torchvision::nms does not exist``). The weighting modules need only torch, numpy and
scipy, so install LibMTL with ``pip install --no-deps LibMTL==1.1.5`` and load them here under an
empty parent package. This workaround stays in the benchmarks, never in the library.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


def weighting(name: str) -> type | None:
    """The LibMTL weighting class ``name`` (e.g. "PCGrad"), or None if LibMTL is absent."""
    if "LibMTL" not in sys.modules:
        spec = importlib.util.find_spec("LibMTL")
        if spec is None or spec.submodule_search_locations is None:
            return None
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    module = importlib.import_module(f"LibMTL.weighting.{name}")
    return getattr(module, name)


def given_jacobian(name: str, jacobian: Any) -> Any:
    """A LibMTL weighting that aggregates a fixed Jacobian: its gradient steps are bypassed."""
    base = weighting(name)
    if base is None:
        return None

    class Fixed(base):
        def __init__(self) -> None:
            super().__init__()
            self.task_num = jacobian.shape[0]
            self.device = jacobian.device
            self.rep_grad = False
            self.init_param()
            self.result = None

        def _compute_grad_dim(self) -> None:
            self.grad_dim = jacobian.shape[1]

        def _compute_grad(self, losses, mode, rep_grad=False):
            return jacobian

        def _reset_grad(self, new_grads) -> None:
            self.result = new_grads

    return Fixed()


def on_model(name: str, shared: list, task_num: int) -> Any:
    """A LibMTL weighting wired to a model as LibMTL's trainer wires it (shared parameters)."""
    base = weighting(name)
    if base is None:
        return None

    class Wired(base):
        def __init__(self) -> None:
            super().__init__()
            self.task_num = task_num
            self.device = shared[0].device
            self.rep_grad = False
            self.init_param()

        def get_share_params(self):
            return shared

        def zero_grad_share_params(self) -> None:
            for param in shared:
                if param.grad is not None:
                    param.grad.zero_()

    return Wired()
