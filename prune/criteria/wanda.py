"""``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
score = |W_ij| * ||X_j||_2, the weight's magnitude times the L2 norm of its input feature over the inputs seen
(a forward hook collects them). A weight on a large-activation feature matters more than its size alone says.

The paper compares scores within each output row (``scope="row"``), which it found much better than across the
layer for language models; ``prune.oneshot`` does so by default. During training the norms are those of the
forward passes since the last mask update. Pruned weights stay pruned, as with magnitude.

Example:
    >>> import torch
    >>> from prune.calibration import InputStats
    >>> from prune.criteria.base import Evidence
    >>> stats = InputStats(2); stats.update(torch.tensor([[3.0, 0.1], [4.0, 0.0]]))
    >>> CRITERION.score(torch.tensor([[1.0, 2.0]]), Evidence(inputs=stats))
    tensor([[5.0000, 0.2000]], dtype=torch.float64)
"""
from __future__ import annotations

from torch import Tensor

from prune.criteria.base import Criterion, Evidence


class Wanda(Criterion):
    name = "wanda"
    uses_inputs = True

    def score(self, weight: Tensor, evidence: Evidence) -> Tensor:
        assert evidence.inputs is not None, "wanda needs the layer's input statistics"
        norms = evidence.inputs.norms().to(weight.device)
        return weight.detach().abs().double() * evidence.per_input(norms, weight)  # float64: see calibration


CRITERION = Wanda()
