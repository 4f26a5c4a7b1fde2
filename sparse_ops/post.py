"""Post-ops: what a kernel applies to whole output rows once they are written, so that a transformer
sublayer's ``norm(y + residual)`` needs no second pass over ``y``.

``AddNorm`` is the one post-op: ``y + residual``, then (``norm``) a LayerNorm over each row. Our CPU kernels
apply it inside their output writes (``kernels.ours_cpu.post_args`` hands it to the C++ code); every other
kernel applies it after the product with ``AddNorm.apply`` (``dispatch.unfused``), so callers never branch on
what a kernel can do. ``sparse_ops.fusion.modules.SparseAddNorm`` builds one per call.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class AddNorm(NamedTuple):  # a NamedTuple: built per call, it must be cheap (a frozen dataclass costs ~2 us)
    """``y + residual``, then (``norm``) ``F.layer_norm`` over the row with ``weight`` / ``bias`` (None: no
    affine) and ``eps``: a post-LN transformer sublayer's output."""

    residual: torch.Tensor  # (N, out)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    eps: float = 1e-5
    norm: bool = True

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """The same with torch ops (the kernels without the post-op, and the reference).

        >>> AddNorm(torch.ones(1, 2), norm=False).apply(torch.tensor([[1.0, 2.0]])).tolist()
        [[2.0, 3.0]]
        """
        y = y + self.residual
        return F.layer_norm(y, y.shape[-1:], self.weight, self.bias, self.eps) if self.norm else y
