"""``magnitude``: score = |W| (Zhu & Gupta 2017). Weights it has pruned stay pruned: their score is -inf at later
updates, so the mask only grows.

Example:
    >>> import torch
    >>> from prune.criteria.base import Evidence
    >>> CRITERION.score(torch.tensor([[-3.0, 1.0]]), Evidence())
    tensor([[3., 1.]])
"""
from __future__ import annotations

from torch import Tensor

from prune.criteria.base import Criterion, Evidence


class Magnitude(Criterion):
    name = "magnitude"

    def score(self, weight: Tensor, evidence: Evidence) -> Tensor:
        return weight.detach().abs().float()


CRITERION = Magnitude()
