"""The errors deconflict raises for bad input.

Every error is a ``ValueError`` (so existing ``except ValueError`` code keeps working) and a
``DeconflictError`` (so callers can catch ours specifically). Messages name the task, parameter or
option at fault.

>>> import deconflict
>>> try:
...     deconflict.get("gradops", alpha=float("nan"))
... except deconflict.DeconflictError as error:
...     print(type(error).__name__, isinstance(error, ValueError))
InvalidOptionError True
"""

from __future__ import annotations


class DeconflictError(Exception):
    """Base class of every error raised by deconflict."""


class NonFiniteError(DeconflictError, ValueError):
    """A loss, a gradient, a Gramian or a method option holds NaN or infinity."""


class NonFiniteGradientError(NonFiniteError):
    """A task gradient, the Gramian or the update is NaN or infinite, or would overflow its dtype.

    This is what a ``torch.amp.GradScaler`` checks for: with ``backward(..., scaler=...)`` the
    engine skips the step (``StepRecord.skipped``) instead of raising it.
    """


class DisconnectedLossError(DeconflictError, ValueError):
    """A task loss does not depend on the shared parameters (or on the shared features)."""


class InvalidGramianError(DeconflictError, ValueError):
    """A matrix given as a Gramian is not symmetric or has a negative diagonal."""


class ShapeError(DeconflictError, ValueError):
    """A tensor has a shape that does not fit (non-square Gramian, non-scalar loss, ...)."""


class UnknownMethodError(DeconflictError, ValueError):
    """No method is registered under the requested name."""


class InvalidOptionError(DeconflictError, ValueError):
    """A method option is out of range or not accepted by the method."""


class DataFormatError(DeconflictError, ValueError):
    """A data file is malformed (the message names the file and, for text files, the line)."""


class DataNotFoundError(DeconflictError, FileNotFoundError):
    """A dataset's files are not where the path or DECONFLICT_DATA points."""


class UnsupportedModelError(DeconflictError, ValueError):
    """A model cannot be handled as asked (untraceable forward, a layer that cannot be split)."""


class DistributedError(DeconflictError, RuntimeError):
    """Another rank of a distributed ``backward`` step raised an error (see its output)."""


class DeconflictWarning(UserWarning):
    """Base class of the warnings deconflict issues (a ``UserWarning``: filter it by class)."""


class ZeroUpdateWarning(DeconflictWarning):
    """A method returned a zero update although the task gradients are not Pareto-stationary.

    Some direction then improves a task without harming any (J is not strongly stationary), so
    the zero comes from the method's own rule (every task dependent, no equal-projection
    direction, cancelling modified gradients), not from the optimum. Issued once per method
    instance; every step's ``StepRecord.diagnostics["zero_update"]`` names the cause.
    """
