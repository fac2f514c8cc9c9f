"""One module per method; importing this package registers them all."""

from .base import Context, Method
from .cagrad import CAGrad
from .cagrad_fast import CAGradFast
from .gradops import GradOPS
from .imtl_g import IMTLG
from .mgda import MGDA
from .pcgrad import PCGrad
from .registry import available, get, method_class, register
from .scalarization import Mean, Sum
from .tensioner import Tensioner

__all__ = [
    "IMTLG",
    "MGDA",
    "CAGrad",
    "CAGradFast",
    "Context",
    "GradOPS",
    "Mean",
    "Method",
    "PCGrad",
    "Sum",
    "Tensioner",
    "available",
    "get",
    "method_class",
    "register",
]
