"""``movement`` (Sanh et al. 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning"): the score accumulates
``-W * dL/dW'`` over steps, W the dense weight and W' the masked weight used in the forward. Weights moving away
from zero score high. The dense weights are kept, so a pruned weight whose score rises comes back.

Example:
    >>> import torch
    >>> CRITERION.increment(torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 0.5]]))
    tensor([[-1.0000,  0.5000]])
"""
from __future__ import annotations

from torch import Tensor

from prune.criteria.base import Criterion, Evidence


class Movement(Criterion):
    name = "movement"
    uses_gradients = True
    regrows = True

    def score(self, weight: Tensor, evidence: Evidence) -> Tensor:
        assert evidence.accumulated is not None, "movement scores accumulate in backward"
        return evidence.accumulated.clone()

    def increment(self, weight: Tensor, grad_masked: Tensor) -> Tensor:
        return -(weight.detach().float() * grad_masked.detach().float())


CRITERION = Movement()
