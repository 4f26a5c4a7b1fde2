"""OWL, "Outlier Weighed Layerwise sparsity" (Yin et al. 2024): non-uniform sparsity across a language model's
blocks, from how many outlier activations-times-weights each block holds.

A block's outlier ratio is the fraction of its Wanda scores ``|W_ij| * ||X_j||`` (over all the pruned linears
of the block) above ``threshold`` times their mean (the paper's M, 5 for LLaMA). Blocks with more outliers are
pruned less: the densities ``1 - s_b`` are the ratios rescaled to a range of ``2 * lam`` (the paper's lambda,
0.08) and shifted so that their mean is ``1 - sparsity``. Blocks of one model have equal sizes, so the mean
sparsity over blocks is the model's.

Example:
    >>> [round(s, 3) for s in block_sparsities([0.01, 0.02, 0.03], 0.7, lam=0.08)]
    [0.78, 0.7, 0.62]
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparse_ops.errors import UserValueError


def outlier_ratio(scores: Sequence[Tensor], threshold: float = 5.0) -> float:
    """The fraction of all entries of ``scores`` (one block's layers) above ``threshold`` times their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / max(total, 1)
    return sum(int((s > threshold * mean).sum()) for s in scores) / max(total, 1)


def block_sparsities(ratios: Sequence[float], sparsity: float, *, lam: float = 0.08) -> list[float]:
    """Per-block sparsities with mean ``sparsity`` spread over a range of ``2 * lam``: more outliers, less
    pruning. Equal ratios (or one block) give ``sparsity`` everywhere. ValueError where a block would leave [0, 1)."""
    if not 0.0 <= lam:
        raise UserValueError(f"OWL's lambda must be >= 0, got {lam}")
    r = torch.tensor(list(ratios), dtype=torch.float64)
    span = float(r.max() - r.min()) if r.numel() else 0.0
    scaled = (r - r.min()) / span * 2 * lam if span > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1.0 - sparsity)
    out = (1.0 - density).tolist()
    if any(not 0.0 <= s < 1.0 for s in out):
        raise UserValueError(f"OWL with lambda {lam} at sparsity {sparsity} gives block sparsities outside [0, 1): "
                         f"{min(out):.3f}..{max(out):.3f}; use a smaller lambda")
    return out
