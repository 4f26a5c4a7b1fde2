"""``taylor``: a first-order (Taylor) importance for short budgets: ``S = sum_t (W * dL/dW')^2``, the squared
first-order change of the loss when the weight is removed (kept weights) or restored (pruned ones), summed over
batches, which estimates ``W^2 * Fisher``, the second-order (OBD) saliency, from gradients alone (Molchanov et al.
2019). It reads the size of a weight's effect, whatever the sign, so it does not need the many steps movement
needs to build a direction. Ranked as ``sqrt(S) / mean(sqrt(S)) + prior * |W| / rms(W)`` per layer; with zero
gradients (a model at its optimum before anything is pruned) by magnitude alone, with a warning. Pruned weights
can regrow.

Example:
    >>> import torch
    >>> CRITERION.increment(torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 0.5]]))
    tensor([[1.0000, 0.2500]])
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import Tensor

from prune.criteria.base import Criterion, Evidence
from prune.criteria.signal import UninformativeScores, magnitude_unit
from sparse_ops.errors import UserValueError


@dataclass(frozen=True)
class Taylor(Criterion):
    """``prior``: weight of ``|W| / rms(W)`` against ``sqrt(S)`` on the scale of its layer mean (0: gradients only)."""

    prior: float = 0.0
    name = "taylor"
    uses_gradients = True
    regrows = True
    increment_degree = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.prior, (int, float)) and 0 <= self.prior < float("inf")):
            raise UserValueError(f"taylor prior must be a finite number >= 0, got {self.prior!r}")

    def score(self, weight: Tensor, evidence: Evidence) -> Tensor:
        assert evidence.accumulated is not None, "taylor scores accumulate in backward"
        root = evidence.accumulated.float().clamp_min(0).sqrt()
        mean = float(root.mean())
        if mean == 0:
            warnings.warn(f"criterion {self.name!r}: the gradients are all zero so far (a model at its optimum), "
                          "so this mask update ranks the layer by magnitude", UninformativeScores, stacklevel=2)
            return magnitude_unit(weight)
        return root / mean + self.prior * magnitude_unit(weight)

    def increment(self, weight: Tensor, grad_masked: Tensor) -> Tensor:
        return (weight.detach().float() * grad_masked.detach().float()).square()


CRITERION = Taylor()
