"""prune: prune PyTorch models while they train (the upper layer; see sparse_ops for formats and kernels).

Example:
    >>> from torch import nn
    >>> from prune import Pruner, Cubic
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> pruner = Pruner(model, sparsity=Cubic(0.0, 0.5, begin_step=0, end_step=10, every=5))
"""
__version__ = "0.1.0"

from prune.pruner import Pruner, find_targets
from prune.report import SparsityReport, sparsity_report
from prune.schedules import Constant, Cubic, Exponential, Linear, Schedule

__all__ = ["Pruner", "find_targets", "SparsityReport", "sparsity_report", "Schedule", "Constant", "Linear",
           "Cubic", "Exponential", "__version__"]
