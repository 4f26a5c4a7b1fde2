"""``movement`` (Sanh et al. 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning"), hard movement: the
score accumulates ``S = sum_t -W * dL/dW'`` over steps, W the dense weight and W' the masked weight used in the
forward. Weights moving away from zero score high. The dense weights are kept, so a pruned weight whose score
rises comes back.

Why movement failed on a pretrained model (issue 19), in two parts, both measured on all-MiniLM-L6-v2 distilled
to its own dense copy (300 steps, 70%, held-out cosine; ``benchmarks/quality.py``):

1. A model that starts at its optimum has exactly zero gradients until something is pruned, so at the first
   mask update every ``S`` is 0. Every score tied, ties keep the lower flat index, and the first update pruned
   each layer's *last* entries, by position (``tests/test_movement.py`` reproduces it). Now the ranking is
   ``S / noise + prior * |W| / rms(W)`` (``prune.criteria.signal.with_prior``), ``noise = sqrt(sum_t
   ||increment_t||^2 / numel)``: zero or noise-level scores leave the decision to the magnitude, with an
   :class:`~prune.criteria.signal.UninformativeScores` warning that names the cause.
2. After that update the gradients are not noise, but they only say how the kept weights compensate for the
   pruned ones: at an optimum the first-order effect of removing a kept weight is ~0 and the signed ``-W * g``
   ranks by the compensation, not by importance. With ``prior=1`` movement still ended at 0.235 (0.237 with no
   regrowth, so it is not mask churn; 0.236 and 0.239 with ``S / rms(S)`` in place of the noise units and prior 1
   or 3); ``prior=10`` (the default, by that measurement) 0.606; magnitude 0.799,
   one-shot magnitude 0.396, ``taylor`` (squared first-order terms, a Fisher estimate) 0.860. Movement is for
   fine-tuning on a task far from its optimum (Sanh's setting); from an optimum choose ``taylor``.

Scores are on one scale per layer, so ``scope="global"`` compares layers fairly.

Example:
    >>> import torch
    >>> CRITERION.increment(torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 0.5]]))
    tensor([[-1.0000,  0.5000]])
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from prune.criteria.base import Criterion, Evidence
from prune.criteria.signal import warn_if_uninformative, with_prior


@dataclass(frozen=True)
class Movement(Criterion):
    """Hard movement; ``prior``: weight of ``|W| / rms(W)`` against the scores in noise units (10 by measurement:
    on all-MiniLM-L6-v2 distilled to itself, 300 steps, 70%: prior 1 0.235 cosine, 10 0.606; 0: Sanh's plain
    ranking, still by magnitude while there are no gradients at all)."""

    prior: float = 10.0
    regrow: bool = True
    name = "movement"
    uses_gradients = True

    @property
    def regrows(self) -> bool:  # type: ignore[override]
        return self.regrow

    def __post_init__(self) -> None:
        if not (isinstance(self.prior, (int, float)) and 0 <= self.prior < float("inf")):
            raise ValueError(f"movement prior must be a finite number >= 0, got {self.prior!r}")

    def score(self, weight: Tensor, evidence: Evidence) -> Tensor:
        assert evidence.accumulated is not None, "movement scores accumulate in backward"
        warn_if_uninformative(self.name, evidence.accumulated, evidence.energy)
        return with_prior(evidence.accumulated, weight, evidence.energy, self.prior)

    def increment(self, weight: Tensor, grad_masked: Tensor) -> Tensor:
        return -(weight.detach().float() * grad_masked.detach().float())


CRITERION = Movement()
