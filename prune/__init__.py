"""prune: prune PyTorch models while they train (the upper layer; formats, kernels and loading are in sparse_ops).

The public API (``__all__``): :class:`Pruner` (wrap a model, ``step()`` after each optimizer step,
``finalize()``); the sparsity schedules :class:`Constant` (one-shot), :class:`LinearRamp`, :class:`CubicRamp`
(Zhu & Gupta) and :class:`ExponentialRamp`, all :class:`Schedule`; :func:`find_targets` (which weights a pruner
takes, from include/exclude module name patterns); :func:`sparsity_report` (any model's per-layer sparsity).

Example:
    >>> from torch import nn
    >>> from prune import Pruner, CubicRamp
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> pruner = Pruner(model, sparsity=CubicRamp(0.0, 0.5, begin_step=0, end_step=10, every=5))
"""
__version__ = "0.2.0"

from prune.pruner import Pruner
from prune.report import SparsityReport, sparsity_report
from prune.schedules import Constant, CubicRamp, ExponentialRamp, LinearRamp, Schedule, deprecated_name
from prune.targets import Target, find_targets

__all__ = ["Pruner", "Schedule", "Constant", "LinearRamp", "CubicRamp", "ExponentialRamp", "find_targets", "Target",
           "sparsity_report", "SparsityReport", "__version__"]


def __getattr__(name: str) -> type[Schedule]:  # prune.Linear / Cubic / Exponential: renamed, with a warning
    return deprecated_name(__name__, name)
