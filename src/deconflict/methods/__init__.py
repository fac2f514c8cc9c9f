"""One module per method; importing this package registers them all."""

from .aligned_mtl import AlignedMTL
from .base import (
    BlockWeighting,
    Context,
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
    Method,
)
from .cagrad import CAGrad
from .cagrad_fast import CAGradFast
from .db_mtl import DBMTL
from .dualproj import DualProj
from .dwa import DWA
from .famo import FAMO
from .graddrop import GradDrop
from .gradnorm import GradNorm
from .gradops import GradOPS
from .gradvac import GradVac
from .imtl_g import IMTLG
from .imtl_l import IMTLL
from .mgda import MGDA
from .mgda_ub import MGDAUB
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .registry import available, get, method_class, register
from .rlw import RLW
from .scalarization import Mean, Sum
from .tensioner import Tensioner
from .upgrad import UPGrad
from .uw import UncertaintyWeighting

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "MGDAUB",
    "RLW",
    "AlignedMTL",
    "BlockWeighting",
    "CAGrad",
    "CAGradFast",
    "Context",
    "DualProj",
    "GradDrop",
    "GradNorm",
    "GradOPS",
    "GradVac",
    "GramianWeighting",
    "JacobianAggregator",
    "LossWeighting",
    "Mean",
    "Method",
    "NashMTL",
    "PCGrad",
    "Sum",
    "Tensioner",
    "UPGrad",
    "UncertaintyWeighting",
    "available",
    "get",
    "method_class",
    "register",
]
