"""deconflict: multi-task learning without conflicting gradients.

Three lines in a training loop::

    method = deconflict.GradOPS(alpha=-1)            # once
    ...
    losses = [loss_fn(out, y) for out, y in ...]     # one scalar per task
    deconflict.backward(losses, model.trunk.parameters(), method)   # instead of loss.backward()
    optimizer.step()

Every method maps the Gramian M = J J^T of the task gradients to task weights c, and the update
of the shared parameters is J^T c. ``deconflict.get(name, **options)`` builds any method by name.
"""

from importlib.metadata import PackageNotFoundError, version

from .aggregate import aggregate
from .diagnostics import ConflictMonitor, StepConflicts, step_conflicts
from .engine import backward
from .errors import (
    DataFormatError,
    DataNotFoundError,
    DeconflictError,
    DeconflictWarning,
    DisconnectedLossError,
    DistributedError,
    InvalidGramianError,
    InvalidOptionError,
    NonFiniteError,
    NonFiniteGradientError,
    ShapeError,
    UnknownMethodError,
    UnsupportedModelError,
    ZeroUpdateWarning,
)
from .gramian import combine, gramian
from .methods import (
    COSMOS,
    CRMOGM,
    DBMTL,
    DWA,
    FAMO,
    IMTLG,
    IMTLL,
    MGDA,
    MGDAUB,
    PBI,
    PCD,
    RLW,
    SILS,
    STCH,
    AlignedMTL,
    AlignedMTLUB,
    CAGrad,
    CAGradFast,
    CAGradLog,
    ConFIG,
    DualProj,
    ExcessMTL,
    FairGrad,
    GeometricMean,
    GradDrop,
    GradNorm,
    GradOPS,
    GradOPSStatic,
    GradVac,
    IMTLGLog,
    Krum,
    LogLosses,
    Mean,
    Method,
    MGDALog,
    MoCo,
    MoDo,
    NashMTL,
    PCGrad,
    SDMGrad,
    Sum,
    Tensioner,
    TrimmedMean,
    UncertaintyWeighting,
    UPGrad,
    available,
    get,
)
from .record import StepRecord

try:
    __version__ = version("deconflict")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

from .tracking import LayerTracker, track, tracker_of

__all__ = [
    "COSMOS",
    "CRMOGM",
    "DBMTL",
    "DWA",
    "FAMO",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "MGDAUB",
    "PBI",
    "PCD",
    "RLW",
    "SILS",
    "STCH",
    "AlignedMTL",
    "AlignedMTLUB",
    "CAGrad",
    "CAGradFast",
    "CAGradLog",
    "ConFIG",
    "ConflictMonitor",
    "DataFormatError",
    "DataNotFoundError",
    "DeconflictError",
    "DeconflictWarning",
    "DisconnectedLossError",
    "DistributedError",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GeometricMean",
    "GradDrop",
    "GradNorm",
    "GradOPS",
    "GradOPSStatic",
    "GradVac",
    "IMTLGLog",
    "InvalidGramianError",
    "InvalidOptionError",
    "Krum",
    "LayerTracker",
    "LogLosses",
    "MGDALog",
    "Mean",
    "Method",
    "MoCo",
    "MoDo",
    "NashMTL",
    "NonFiniteError",
    "NonFiniteGradientError",
    "PCGrad",
    "SDMGrad",
    "ShapeError",
    "StepConflicts",
    "StepRecord",
    "Sum",
    "Tensioner",
    "TrimmedMean",
    "UPGrad",
    "UncertaintyWeighting",
    "UnknownMethodError",
    "UnsupportedModelError",
    "ZeroUpdateWarning",
    "__version__",
    "aggregate",
    "available",
    "backward",
    "combine",
    "get",
    "gramian",
    "step_conflicts",
    "track",
    "tracker_of",
]
