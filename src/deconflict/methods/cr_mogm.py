"""CR-MOGM: a moving average over the weights of a Gramian method (Zhou et al., "On the
Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022;
docs/methods.md#cr_mogm).

Stochastic gradient manipulation (MGDA, CAGrad, PCGrad, ...) computes its weights from one
mini-batch, so they are biased; the paper's correction smooths them across steps:

    lambda_k = alpha lambda_(k-1) + (1 - alpha) lambda_hat_k,

where lambda_hat_k = base(M_k) are the base method's weights at step k and the update is
J_k^T lambda_k. As in TorchJD, lambda_0 = lambda_hat_1 (the first update is the base method's),
alpha = 0 is the base method itself and alpha = 1 freezes the first weights. Default
alpha = 0.9 (TorchJD; the paper's Corollary 1 lets alpha_k grow towards 1 as the learning rate
decays: set ``method.alpha`` between steps to follow such a schedule) and base "mgda" (the
paper's main instance, CR-MGDA; TorchJD has no default).

Any registered ``GramianWeighting`` can be the base (``BASES``), built with its default options,
but two: MGDA-UB, which runs on the shared representation only, and CAGrad-Fast, whose engine
computes the gradients of a new random subset of loss combinations at every step, so an average
that still weights the tasks left out of this step's subset could not be applied. The base's
state (a stateful base) is part of this method's state. The base's zero-update warnings are
replaced by this method's own, about the averaged weights.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..errors import ShapeError, ZeroUpdateWarning
from ._zero_update import note_zero_update
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import method_class, register
from .state import StateField

# Every registered GramianWeighting but CR-MOGM itself, MGDA-UB (representation mode only) and
# CAGrad-Fast (see the module docstring); tests/test_new_methods.py checks it against the registry.
BASES = ("mgda", "aligned_mtl", "cagrad", "cagrad_log", "config", "dualproj", "fairgrad",
         "gradops", "gradops_static", "imtl_g", "imtl_g_log", "krum", "log_losses", "mgda_log",
         "modo", "nash_mtl", "pcd", "pcgrad", "sdmgrad", "tensioner", "upgrad")


@register
class CRMOGM(GramianWeighting):
    """CR-MOGM (NeurIPS 2022): the exponential moving average of a base method's weights; see
    the module docstring.

    Diagnostics: ``base_weights`` (lambda_hat_k), the base method's diagnostics prefixed with
    ``base_``, and ``zero_update``.

    >>> import numpy as np
    >>> method = CRMOGM(base="imtl_g", alpha=0.5)
    >>> method.weights(np.diag([1.0, 4.0])).tolist()  # the first step is IMTL-G's
    [0.6666666666666666, 0.3333333333333333]
    >>> method.weights(np.eye(2)).tolist()  # (lambda_1 + (1/2, 1/2)) / 2
    [0.5833333333333333, 0.41666666666666663]
    """

    name = "cr_mogm"
    summary = "Moving average over the weights of another Gramian method"
    paper = ("Zhou et al., On the Convergence of Stochastic Multi-Objective Gradient "
             "Manipulation and Beyond, NeurIPS 2022")
    family = "multi-objective"
    stateful = True

    OPTIONS = (
        Option("base", "str", "mgda", "the Gramian method whose weights are averaged (built "
               "with its defaults)", choices=BASES),
        Option("alpha", "float", 0.9, "weight of the previous average: 0 is the base method, "
               "1 keeps the first weights", low=0.0, high=1.0),
    )

    STATE = (StateField("smoothed"),)

    base: str
    alpha: float
    smoothed: np.ndarray | None

    def __init__(self, base: str = "mgda", alpha: float = 0.9) -> None:
        self._set_options(base=base, alpha=alpha)
        cls = method_class(self.base)
        assert issubclass(cls, GramianWeighting)  # BASES holds Gramian weightings only
        self.base_method: GramianWeighting = cls()

    @property
    def needs_losses(self) -> bool:
        return self.base_method.needs_losses

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "base_method"):  # not yet built during _set_options
            self.base_method.reset()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base": self.base_method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = dict(state)
        base_state = own.pop("base", {})
        super().load_state_dict(own)  # resets the base too
        self.base_method.load_state_dict(base_state)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ZeroUpdateWarning)
            current, base_diagnostics = self.base_method._compute(M, context)
        current = np.asarray(current, dtype=np.float64)
        if self.smoothed is None:
            smoothed = current.copy()
        elif self.smoothed.shape != current.shape:
            raise ShapeError(f"{self.name}: the number of tasks changed from "
                             f"{self.smoothed.shape[0]} to {current.shape[0]}; call reset() "
                             "first")
        else:
            smoothed = self.alpha * self.smoothed + (1.0 - self.alpha) * current
        self.smoothed = smoothed
        diagnostics: Diagnostics = {f"base_{key}": value for key, value in
                                    base_diagnostics.items() if key != "zero_update"}
        diagnostics["base_weights"] = current
        note_zero_update(self, M, smoothed, diagnostics, "cancelled",
                         "the averaged weights cancel on this step's task gradients")
        return smoothed.copy(), diagnostics
