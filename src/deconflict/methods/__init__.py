"""One module per method; importing this package registers them all."""

from .aligned_mtl import AlignedMTL
from .aligned_mtl_ub import AlignedMTLUB
from .base import (
    AfterStep,
    BlockWeighting,
    Context,
    EpochEnd,
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
    Method,
)
from .cagrad import CAGrad
from .cagrad_fast import CAGradFast
from .config import ConFIG
from .cosmos import COSMOS
from .cr_mogm import CRMOGM
from .db_mtl import DBMTL
from .dualproj import DualProj
from .dwa import DWA
from .excess_mtl import ExcessMTL
from .fairgrad import FairGrad
from .famo import FAMO
from .geometric_mean import GeometricMean
from .graddrop import GradDrop
from .gradnorm import GradNorm
from .gradops import GradOPS
from .gradops_static import GradOPSStatic
from .gradvac import GradVac
from .imtl_g import IMTLG
from .imtl_l import IMTLL
from .krum import Krum
from .log_losses import CAGradLog, IMTLGLog, LogLosses, MGDALog
from .mgda import MGDA
from .mgda_ub import MGDAUB
from .moco import MoCo
from .modo import MoDo
from .nash_mtl import NashMTL
from .pbi import PBI
from .pcd import PCD
from .pcgrad import PCGrad
from .registry import available, get, method_class, register
from .rlw import RLW
from .scalarization import Mean, Sum
from .sdmgrad import SDMGrad
from .si_ls import SILS
from .stch import STCH
from .tensioner import Tensioner
from .trimmed_mean import TrimmedMean
from .upgrad import UPGrad
from .uw import UncertaintyWeighting

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
    "AfterStep",
    "AlignedMTL",
    "AlignedMTLUB",
    "BlockWeighting",
    "CAGrad",
    "CAGradFast",
    "CAGradLog",
    "ConFIG",
    "Context",
    "DualProj",
    "EpochEnd",
    "ExcessMTL",
    "FairGrad",
    "GeometricMean",
    "GradDrop",
    "GradNorm",
    "GradOPS",
    "GradOPSStatic",
    "GradVac",
    "GramianWeighting",
    "IMTLGLog",
    "JacobianAggregator",
    "Krum",
    "LogLosses",
    "LossWeighting",
    "MGDALog",
    "Mean",
    "Method",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "SDMGrad",
    "Sum",
    "Tensioner",
    "TrimmedMean",
    "UPGrad",
    "UncertaintyWeighting",
    "available",
    "get",
    "method_class",
    "register",
]
