"""Conflict diagnostics: where and how much the tasks' gradients conflict (see ``conflicts``).

``step_conflicts(record)`` for one step; ``ConflictMonitor`` over training (CSV, TensorBoard);
``plots`` for the cosine histograms and the per-layer heatmap.
"""

from .conflicts import StepConflicts, modified_gradient_coefficients, step_conflicts
from .monitor import ConflictMonitor

__all__ = ["ConflictMonitor", "StepConflicts", "modified_gradient_coefficients",
           "step_conflicts"]
