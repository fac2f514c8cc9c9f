"""Gramian methods run on the log losses: the log-loss variants of the FAMO paper's baselines
(Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023; ``docs/methods.md#
log_losses``).

Minimizing log L_i instead of L_i makes a method blind to each loss's scale: the gradient of
log L_i is g_i / L_i, so multiplying a loss (and its gradient) by s > 0 leaves the task's
log-loss gradient unchanged. With S = diag(1 / L_1, ..., 1 / L_T) the Jacobian of the log losses
is S J and its Gramian

    M_log = S M S,    (M_log)_ij = (g_i . g_j) / (L_i L_j),

so ANY Gramian method ``base`` runs on log losses from M and the loss values alone: its weights
c' = base(M_log) on the log-loss gradients are weights

    c_i = c'_i / L_i

on the original gradients, since J^T c = (S J)^T c' (the same update, no extra backward pass).
The base sees the tasks log L_i entirely: its ``losses`` context is log L_i (MGDA's "loss"
normalizer then divides by log L_i, and refuses it where L_i <= 1). The heads are trained on
the log losses too (head weights 1 / L_i, as for DB-MTL and SI-LS). The losses must be positive;
a non-positive loss is refused with an error naming the task. Every property of the base that
holds for any J (no conflict, homogeneity in J) holds here; scale invariance per task is new:
c(s_i L_i, s_i g_i) = c(L, g) / s_i task by task, so the update is unchanged.

``log_losses`` wraps any registered Gramian weighting (option ``base``, built with its defaults;
its state, for a stateful base, is this method's state: Nash-MTL, the tensioner, CR-MOGM,
MoDo, SDMGrad); ``mgda_log``, ``cagrad_log`` and
``imtl_g_log`` are the FAMO paper's three, with their base's options and defaults. MGDA-UB and
Aligned-MTL-UB (representation mode only) and CAGrad-Fast (its engine differentiates random
combinations of the raw losses) cannot be wrapped.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np

from ..errors import InvalidOptionError
from . import modo, sdmgrad  # noqa: F401  (register two of the BASES of this batch)
from .base import Context, Diagnostics, GramianWeighting
from .cagrad import CAGrad
from .imtl_g import IMTLG
from .mgda import MGDA
from .options import Option
from .registry import method_class, register
from .state import Custom, StateField

# Every registered GramianWeighting but the log-loss variants themselves (a second 1 / L_i),
# the representation-mode ones and CAGrad-Fast (see the module docstring); tests check it
# against the registry.
BASES = ("mgda", "aligned_mtl", "cagrad", "config", "cr_mogm", "dualproj", "fairgrad",
         "gradops", "gradops_static", "imtl_g", "krum", "modo", "nash_mtl", "pcd", "pcgrad",
         "sdmgrad", "tensioner", "upgrad")


def inverse_losses(name: str, losses: np.ndarray | None) -> np.ndarray:
    """1 / L_i, the scales of the log-loss gradients g_i / L_i; refuses L_i <= 0 by name."""
    if losses is None:
        raise InvalidOptionError(f"{name} needs the losses: pass losses=[L_1, ..., L_T]")
    bad = np.flatnonzero(losses <= 0.0)
    if bad.size:
        raise InvalidOptionError(
            f"{name} works on log L_i, which needs positive losses, got L_{int(bad[0])} = "
            f"{float(losses[bad[0]])!r}")
    return 1.0 / losses


class _OnLogLosses(GramianWeighting):
    """The shared rule: ``base_method`` on M_log = S M S with the log losses, c = S c'."""

    family = "multi-objective"
    base_method: GramianWeighting

    @property
    def needs_losses(self) -> bool:
        return True

    @property
    def scales_task_gradients(self) -> bool:
        return self.base_method.scales_task_gradients

    def head_coefficients(self, weights: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        """The heads descend the log losses: weights 1 / L_i."""
        return inverse_losses(self.name, losses)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        scales = inverse_losses(self.name, context.losses)
        assert context.losses is not None
        # One rounding per entry: S M S keeps M's relative accuracy (barring over/underflow,
        # which the non-finite check of the weights reports).
        M_log = M * np.outer(scales, scales)
        log_context = Context(num_tasks=context.num_tasks, losses=np.log(context.losses))
        log_weights, diagnostics = self.base_method._compute(M_log, log_context)
        diagnostics = dict(diagnostics)
        diagnostics["log_weights"] = np.asarray(log_weights, dtype=np.float64)
        return scales * diagnostics["log_weights"], diagnostics


def _saved_base_state(state: dict[str, Any]) -> dict[str, Any]:
    return state


@register
class LogLosses(_OnLogLosses):
    """Any Gramian method on the log losses: c_i = c'_i / L_i with c' = base(S M S); see the
    module docstring. Needs ``losses`` (positive).

    Option ``base`` (default "mgda"): the registered Gramian weighting, built with its
    defaults. Stateful because its base may be (Nash-MTL, the tensioner, CR-MOGM): its state is
    the base's, saved under ``base_state`` (empty for a stateless base). Diagnostics: the
    base's, and ``log_weights`` (c', the weights of the log-loss gradients).

    Doubling a loss and its gradient changes nothing: the update is MGDA's on g_i / L_i.

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    >>> method = deconflict.get("log_losses", base="mgda")
    >>> deconflict.aggregate(J, method, losses=[1.0, 2.0])
    tensor([0.1379, 0.3448], dtype=torch.float64)
    >>> deconflict.aggregate(J * torch.tensor([[2.0], [1.0]]), method, losses=[2.0, 2.0])
    tensor([0.1379, 0.3448], dtype=torch.float64)
    """

    name = "log_losses"
    summary = "Any Gramian method on the log losses: weights base(S M S) / L_i, S = diag(1/L)"
    paper = ("Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023 (the "
             "log-loss baselines)")
    stateful = True

    OPTIONS = (
        Option("base", "str", "mgda", "the Gramian method run on the log losses (built with "
               "its defaults)", choices=BASES),
    )

    STATE = (StateField("base_state", Custom(_saved_base_state, _saved_base_state)),)

    base: str

    def __init__(self, base: str = "mgda") -> None:
        self._set_options(base=base)
        cls = method_class(self.base)
        assert issubclass(cls, GramianWeighting)  # BASES holds Gramian weightings only
        self.base_method = cls()

    @property
    def base_state(self) -> dict[str, Any] | None:
        """The base's ``state_dict()``, which the declared state saves and loads."""
        return self.base_method.state_dict() if hasattr(self, "base_method") else None

    @base_state.setter
    def base_state(self, state: dict[str, Any] | None) -> None:
        # reset() sets None (a fresh base); load_state_dict the saved base state. The base's
        # own load is all or nothing, so this method's is too (its only field).
        if not hasattr(self, "base_method"):  # during _set_options: not built yet
            return
        if state is None:
            self.base_method.reset()
        else:
            self.base_method.load_state_dict(state)


@register
class MGDALog(_OnLogLosses):
    """MGDA on the log losses (the FAMO paper's MGDA baseline on log L_i): the min-norm point of
    the hull of the g_i / L_i, as weights c_i = alpha_i / L_i; options and defaults as MGDA's.

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    >>> deconflict.aggregate(J, deconflict.get("mgda_log"), losses=[1.0, 2.0])
    tensor([0.1379, 0.3448], dtype=torch.float64)
    """

    name = "mgda_log"
    summary = "MGDA on the log losses: the min-norm point of the hull of the g_i / L_i"
    paper = ("Sener & Koltun, NeurIPS 2018, on log losses as in Liu et al., FAMO, NeurIPS "
             "2023")

    OPTIONS: ClassVar[tuple[Option, ...]] = MGDA.OPTIONS

    normalizer: str
    update_from: str

    def __init__(
        self,
        normalizer: Literal["none", "l2", "loss", "loss+"] = "none",
        update_from: Literal["normalized", "raw"] = "normalized",
    ) -> None:
        self._set_options(normalizer=normalizer, update_from=update_from)
        self.base_method = MGDA(normalizer=normalizer, update_from=update_from)


@register
class CAGradLog(_OnLogLosses):
    """CAGrad on the log losses (the FAMO paper's CAGrad baseline on log L_i); options and
    defaults as CAGrad's.

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> deconflict.aggregate(J, deconflict.get("cagrad_log", c=0.0), losses=[1.0, 2.0])
    tensor([0.5000, 0.2500], dtype=torch.float64)
    """

    name = "cagrad_log"
    summary = "CAGrad on the log losses: the conflict-averse update of the g_i / L_i"
    paper = ("Liu et al., Conflict-Averse Gradient Descent, NeurIPS 2021, on log losses as in "
             "Liu et al., FAMO, NeurIPS 2023")

    OPTIONS = CAGrad.OPTIONS

    c: float
    rescale: int
    degenerate: str

    def __init__(self, c: float = 0.5, rescale: int = 1, degenerate: str = "definition") -> None:
        self._set_options(c=c, rescale=rescale, degenerate=degenerate)
        self.base_method = CAGrad(c=self.c, rescale=self.rescale, degenerate=self.degenerate)


@register
class IMTLGLog(_OnLogLosses):
    """IMTL-G on the log losses (the FAMO paper's IMTL-G baseline on log L_i); options and
    defaults as IMTL-G's. IMTL-G's direction depends on the unit gradients only, so only the
    weights' normalization (1^T alpha' = 1 on the log-loss gradients) changes the update's
    length.

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> deconflict.aggregate(J, deconflict.get("imtl_g_log"), losses=[1.0, 2.0])
    tensor([0.3333, 0.3333], dtype=torch.float64)
    """

    name = "imtl_g_log"
    summary = "IMTL-G on the log losses: equal projections on the unit gradients"
    paper = ("Liu et al., Towards Impartial Multi-task Learning, ICLR 2021, on log losses as in "
             "Liu et al., FAMO, NeurIPS 2023")

    OPTIONS = IMTLG.OPTIONS

    sign_guard: str

    def __init__(self, sign_guard: Literal["flip", "mean", "off"] = "flip") -> None:
        self._set_options(sign_guard=sign_guard)
        self.base_method = IMTLG(sign_guard=sign_guard)
