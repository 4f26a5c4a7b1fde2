"""``soft_movement`` (after Sanh et al. 2020's soft movement): learned scores ``S``, one per weight, trained by
their own Adam from the straight-through gradient ``dL/dS = W * dL/dW'`` plus a regulariser
``reg * mean_layers mean(sigmoid(S))`` that the user adds to the loss (``loss + pruner.regularization()``).
Masks are the top scores under the pruner's schedule and scope: unlike the paper, the sparsity is the schedule's
(exact), not whatever a fixed threshold and ``reg`` lead to. With ``scope="global"`` layers end at different
sparsities, the paper's adaptive allocation. Pruned weights regrow when their scores rise.

Scores start at ``init * |W| / rms(W)``, a magnitude prior, not at a constant: a model that starts at its optimum
has zero gradients until something is pruned, and constant scores would tie and be pruned by position (issue
19). Adam moves each score by about ``lr`` per step in the direction its gradient agrees on, and less where the
gradient's sign is noise, so over a run the gradient can overturn a magnitude gap of about ``lr * steps``.

Example:
    >>> import torch
    >>> s = CRITERION.initial_score(torch.tensor([[2.0, -1.0, 0.0, 1.0]]))
    >>> [round(v, 3) for v in s.flatten().tolist()]
    [1.633, 0.816, 0.0, 0.816]
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prune.criteria.base import Criterion, Evidence
from prune.criteria.signal import magnitude_unit


@dataclass(frozen=True)
class SoftMovement(Criterion):
    """``lr``, ``betas``, ``eps``: the scores' Adam; ``reg``: the regulariser's weight; ``init``: the prior's."""

    lr: float = 1e-3
    reg: float = 1.0
    init: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    name = "soft_movement"
    uses_gradients = True
    regrows = True
    learned = True

    def __post_init__(self) -> None:
        for field in ("lr", "reg", "init", "eps"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"soft_movement {field} must be a finite number >= 0, got {value!r}")

    def initial_score(self, weight: Tensor) -> Tensor:
        return self.init * magnitude_unit(weight)

    def score(self, weight: Tensor, evidence: Evidence) -> Tensor:
        assert evidence.accumulated is not None, "soft_movement learns its scores in backward"
        s = evidence.accumulated.float()
        if float(s.max()) == float(s.min()):  # init=0 and no gradient yet: all tie; let magnitude decide
            return s + magnitude_unit(weight)
        return s.clone()

    def increment(self, weight: Tensor, grad_masked: Tensor) -> Tensor:
        return -(weight.detach().float() * grad_masked.detach().float())

    def regularization(self, scores: Sequence[Tensor]) -> Tensor:
        """``reg * mean over layers of mean(sigmoid(S))``: pulls every score down, most where it is near 0."""
        return self.reg * torch.stack([torch.sigmoid(s).mean() for s in scores]).mean()

    def learn(self, score: Tensor, grad: Tensor, state: dict[str, Tensor], step: int) -> None:
        adam_step(score, grad, state, step, self.lr, self.betas, self.eps)


def adam_step(param: Tensor, grad: Tensor, state: dict[str, Tensor], step: int, lr: float,
              betas: tuple[float, float], eps: float) -> None:
    """One Adam update of ``param`` in place (Kingma & Ba, bias-corrected); moments kept in ``state``."""
    if "m" not in state:
        state["m"], state["v"] = torch.zeros_like(param), torch.zeros_like(param)
    m, v = state["m"], state["v"]
    m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    m_hat = m / (1 - betas[0] ** step)
    v_hat = v / (1 - betas[1] ** step)
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


CRITERION = SoftMovement()
