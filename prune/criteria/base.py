"""The criterion interface: how a pruning criterion scores weights and what it may observe to do so.

A criterion scores one weight tensor (higher score = more important = kept) from the dense weight and an
:class:`Evidence`: what the pruner collected for that layer since it was attached or last updated.
A criterion says what it needs:

- ``uses_gradients``: the pruner's masked-weight autograd function adds ``increment(W, dL/dW')`` into a
  float32 running score after every backward (``Evidence.accumulated``); such a criterion cannot prune at step 0.
- ``uses_inputs``: a forward pre-hook collects the layer's input statistics (``prune.calibration.InputStats``,
  ``Evidence.inputs``) during the forward passes between mask updates; also not at step 0 (no data yet), except
  in one-shot pruning, which runs calibration data first.
- ``regrows``: a pruned weight may come back at a later update (else its score is -inf once pruned).
- ``updates_weights``: after each mask update the pruner calls ``update``, which changes the kept weights to
  make up for the ones just removed (``obert``'s Optimal Brain Surgeon step).

A gradient criterion's running score is what ``new_score`` allocates (by default float32 in the weight's shape;
``obert`` keeps a block-diagonal Fisher instead) and ``accumulate`` adds one backward into it.

Gradient criteria also see ``Evidence.energy``: the sum over backward passes of ``||increment||^2`` for the layer.
Pure noise that averages out gives ``||accumulated||^2 / energy`` near 1 (a random walk); a consistent signal
over T steps up to T. Exactly zero gradients (a model at its optimum) give ``energy == 0``: then every score
ties, and a top-k would choose by position. A criterion must not let that decide a mask.

A new criterion is one new file in this package defining ``CRITERION`` (an instance of a subclass);
``prune.criteria`` finds it by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prune.calibration import InputStats


@dataclass(frozen=True)
class Evidence:
    """What a criterion may read about one weight besides the weight itself.

    ``in_dim``: which dimension of the weight is its input (0 for transformers' ``Conv1D``, else 1): per-input
    statistics broadcast along it (``per_input``).
    """

    in_dim: int = 1
    accumulated: Tensor | None = None  # the running gradient score (uses_gradients)
    inputs: InputStats | None = None  # the layer's input statistics (uses_inputs)
    energy: float | None = None  # sum of ||increment||^2 over the backward passes so far (uses_gradients)
    mask: Tensor | None = None  # the current mask, True = kept (the pruner's; None outside one)

    def per_input(self, values: Tensor, weight: Tensor) -> Tensor:
        """Shape (in,) ``values`` so that they broadcast against ``weight`` along its input dimension."""
        shape = [1] * weight.dim()
        shape[self.in_dim] = values.numel()
        return values.view(shape)


class Criterion:
    """Base of every criterion; see the module docstring. Subclasses set ``name`` and implement ``score``."""

    name: ClassVar[str]
    uses_gradients: ClassVar[bool] = False
    uses_inputs: ClassVar[bool] = False
    regrows: ClassVar[bool] = False
    updates_weights: ClassVar[bool] = False
    increment_degree: ClassVar[int] = 1  # the increment's degree in the gradient (DDP scales by it)

    def score(self, weight: Tensor, evidence: Evidence) -> Tensor:
        """float32 scores, the weight's shape; higher is kept. ``weight`` is the dense (unmasked) weight."""
        raise NotImplementedError

    def increment(self, weight: Tensor, grad_masked: Tensor) -> Tensor:
        """One backward's addition to the running score (criteria with ``uses_gradients``)."""
        raise NotImplementedError(f"criterion {self.name!r} does not use gradients")

    def new_score(self, weight: Tensor, in_dim: int) -> Tensor:
        """The zero running score a gradient criterion accumulates into: float32 in the weight's shape."""
        return torch.zeros_like(weight, dtype=torch.float32)

    def accumulate(self, score: Tensor, energy: Tensor, weight: Tensor, grad_masked: Tensor, world: int) -> None:
        """Add one backward into ``score`` and ``||increment||^2`` into ``energy``, in place. Under DDP
        (``world`` ranks) a quantity of degree k in the gradient is divided by ``world ** (k - 1)``, so that the
        ranks' mean at the next sync is what one process accumulating their micro-batches (loss / world) sums."""
        inc = self.increment(weight, grad_masked)
        if world > 1 and self.increment_degree > 1:
            inc = inc / world ** (self.increment_degree - 1)
        energy.add_(inc.square().sum() / world)  # degree 2 * increment_degree
        score.add_(inc)

    def update(self, weight: Tensor, mask: Tensor, evidence: Evidence) -> None:
        """Change ``weight``'s kept entries in place after the mask moved from ``evidence.mask`` to ``mask``
        (criteria with ``updates_weights``)."""
        raise NotImplementedError(f"criterion {self.name!r} does not update weights")

    def __repr__(self) -> str:
        return f"<criterion {self.name}>"
