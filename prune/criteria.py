"""Pruning criteria: pure functions that score weights (higher score = more important = kept).

- ``magnitude``: |W|. Weights it has pruned stay pruned (their score is -inf at later updates), as in
  Zhu & Gupta 2017.
- ``movement`` (Sanh et al. 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning"): the score accumulates
  ``-W * dL/dW'`` over steps, W the dense weight and W' the masked weight used in the forward. Weights moving
  away from zero score high. The dense weights are kept, so a pruned weight whose score rises comes back.

Scores are float32 whatever the weight's dtype. NaN scores are an error (the pruner names the layer); an
infinite weight has an infinite magnitude and is kept.

Example:
    >>> import torch
    >>> magnitude(torch.tensor([[-3.0, 1.0]]))
    tensor([[3., 1.]])
    >>> movement_increment(torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 0.5]]))
    tensor([[-1.0000,  0.5000]])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def magnitude(weight: Tensor) -> Tensor:
    """Score = |W| in float32."""
    return weight.detach().abs().float()


def movement_increment(weight: Tensor, grad_masked: Tensor) -> Tensor:
    """One step's movement score: ``-W * dL/dW'`` in float32 (add it to the running score)."""
    return -(weight.detach().float() * grad_masked.detach().float())


@dataclass(frozen=True)
class Criterion:
    """How a criterion is wired into the pruner.

    ``uses_gradients``: scores accumulate from ``dL/dW'`` during backward (so it cannot prune at step 0).
    ``regrows``: a pruned weight may come back at a later update.
    """

    name: str
    uses_gradients: bool
    regrows: bool
    score: Callable[[Tensor], Tensor] | None  # score from the dense weight; None when scores accumulate


CRITERIA: dict[str, Criterion] = {
    "magnitude": Criterion("magnitude", uses_gradients=False, regrows=False, score=magnitude),
    "movement": Criterion("movement", uses_gradients=True, regrows=True, score=None),
}


def get_criterion(name: str) -> Criterion:
    """Look a criterion up by name; unknown names raise ``ValueError`` listing the known ones."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name]


def has_nan(scores: Tensor) -> bool:
    """True when any score is NaN (the pruner then refuses to choose a mask)."""
    return bool(torch.isnan(scores).any())
