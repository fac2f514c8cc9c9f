"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao et al.,
"Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
NeurIPS 2023, Algorithm 1; TorchJD's SDMGradWeighting; ``docs/methods.md#sdmgrad``).

SDMGrad looks for the MGDA-like direction closest to a target direction g_0 = J^T w~ (the mean
gradient for the default w~ = 1/T): with lambda the regularization towards it, the weights w
minimize 1/2 ||J^T (w + lambda w~)||^2 over the simplex (the paper's Eq. 9), solved
approximately by n_iter steps of SGD with momentum, each projected onto the simplex, warm-started
from the previous step's w; the update is

    D = J^T (w + lambda w~) / (1 + lambda).

The inner objective's gradient is A (w + lambda w~) with A the Gramian estimate J_xi J_xi'^T of
two independent mini-batches (the paper's double sampling), normalized by the mean task norm:
A / (mean_i sqrt(A_ii))^2, so the inner learning rate does not depend on the gradients' scale.
Deviations: one ``backward`` call sees one mini-batch, so A = M = J J^T and D uses the same J
(the single-batch form TorchJD computes when given J J^T; the paper's unbiasedness is lost, the
rule is the same); the normalization guards only a zero mean norm (all gradients zero, D = 0),
where TorchJD and LibMTL add 1e-8 to its square, which stops being negligible for gradients
below ~1e-4 and breaks the scale invariance there.

Defaults (TorchJD's): lr = 10, momentum = 0.5, n_iter = 20, lambda = 0.3 (the authors'
experiments; LibMTL uses lr = 5); w~ = 1/T. w starts at 1/T and is the state (the momentum
restarts at every step, as in TorchJD and LibMTL). With the normalization the update is
homogeneous, D(sJ) = s D(J); a single task gets D = g_1.

Sensitivity: 20 momentum steps of lr 10 on A (whose largest eigenvalue is up to T) do not
settle; they amplify a change of the input. A relative change of 1e-7 in M moved the weights by
up to 9e-4 (measured on 50 random two-task draws), so runs on float32 gradients (the Gramians
of two summation orders, of two ranks' averages) agree to ~1e-4 only: a property of the
defaults (TorchJD's are the same), not of the Gramian's accuracy. A smaller ``lr`` settles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ShapeError
from ._simplex import project_onto_simplex
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register
from .state import StateField
from .upgrad import preference_weights


@register
class SDMGrad(GramianWeighting):
    """SDMGrad (NeurIPS 2023, Algorithm 1), single-batch form; see the module docstring.

    Diagnostics: ``inner_weights`` (w, also the state).

    Orthogonal gradients of equal norm: w stays 1/2 by symmetry, so D is the mean gradient:

    >>> import numpy as np, deconflict
    >>> deconflict.get("sdmgrad").weights(np.eye(2))
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    name = "sdmgrad"
    summary = "Weights of the direction nearest the mean gradient, by projected SGD (warm start)"
    paper = ("Xiao et al., Direction-oriented Multi-objective Learning: Simple and Provable "
             "Stochastic Algorithms, NeurIPS 2023")
    family = "multi-objective"
    stateful = True

    OPTIONS = (
        Option("lr", "float", 10.0, "learning rate of the inner SGD on the weights", low=0.0,
               low_open=True),
        Option("momentum", "float", 0.5, "momentum of the inner SGD", low=0.0, high=1.0,
               high_open=True),
        Option("n_iter", "int", 20, "inner SGD steps per call", low=1),
        Option("lam", "float", 0.3, "regularization lambda towards the target direction",
               low=0.0),
        Option("pref_vector", "float", None, "target weights w~, one per task (none: 1/T each)",
               low=0.0, nullable=True, shape="list"),
    )

    STATE = (StateField("inner"),)

    lr: float
    momentum: float
    n_iter: int
    lam: float
    pref_vector: tuple[float, ...] | None
    inner: np.ndarray | None

    def __init__(
        self, lr: float = 10.0, momentum: float = 0.5, n_iter: int = 20, lam: float = 0.3,
        pref_vector: Sequence[float] | None = None,
    ) -> None:
        self._set_options(lr=lr, momentum=momentum, n_iter=n_iter, lam=lam,
                          pref_vector=pref_vector)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        T = M.shape[0]
        target = preference_weights(self.name, self.pref_vector, T)
        w = np.full(T, 1.0 / T) if self.inner is None else self.inner
        if w.shape != (T,):
            raise ShapeError(f"{self.name}: the number of tasks changed from {w.size} to {T}; "
                             "call reset() first")
        scale = float(np.mean(np.sqrt(np.maximum(np.diag(M), 0.0))))
        if scale > 0.0:
            A = (M / scale) / scale  # two divisions: scale^2 may underflow where M does not
            velocity = None
            for _ in range(self.n_iter):
                gradient = A @ (w + self.lam * target)
                velocity = gradient if velocity is None else self.momentum * velocity + gradient
                w = project_onto_simplex(w - self.lr * velocity)
        self.inner = w
        return (w + self.lam * target) / (1.0 + self.lam), {"inner_weights": w.copy()}
