"""Sparsity reports: per-layer rows (name, shape, nnz, sparsity, pattern) and totals, printable as a table.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4, bias=False))
    >>> _ = nn.init.zeros_(model[0].weight)
    >>> print(sparsity_report(model))  # doctest: +NORMALIZE_WHITESPACE
    layer  shape   nnz  sparsity  pattern
    0      (4, 4)  0    1.0000    2:4
    total  16      0    1.0000
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prune.masks import input_last
from prune.targets import input_dim
from sparse_ops.formats import is_two_four
from sparse_ops.tables import text_table


@dataclass(frozen=True)
class LayerSparsity:
    """One weight's row: its module name, shape, number of nonzeros, sparsity and pattern."""

    name: str
    shape: tuple[int, ...]
    nnz: int
    sparsity: float
    pattern: str

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass(frozen=True)
class SparsityReport:
    """Rows plus totals; ``str(report)`` is a readable table."""

    rows: list[LayerSparsity]

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def nnz(self) -> int:
        return sum(r.nnz for r in self.rows)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    def to_dicts(self) -> list[dict[str, object]]:
        """Rows as plain dicts (for JSON/CSV)."""
        return [{"name": r.name, "shape": list(r.shape), "nnz": r.nnz, "sparsity": r.sparsity,
                 "pattern": r.pattern} for r in self.rows]

    def __str__(self) -> str:
        body = [[r.name, str(r.shape), str(r.nnz), f"{r.sparsity:.4f}", r.pattern] for r in self.rows]
        body.append(["total", str(self.numel), str(self.nnz), f"{self.sparsity:.4f}", ""])
        return text_table(["layer", "shape", "nnz", "sparsity", "pattern"], body)


def detect_pattern(weight: Tensor, in_dim: int = 1) -> str:
    """``"2:4"`` when every group of 4 along the input dimension has at most 2 nonzeros, else ``"unstructured"``."""
    if weight.dim() < 2:
        return "unstructured"
    return "2:4" if is_two_four(input_last(weight, in_dim)) else "unstructured"


def layer_row(name: str, weight: Tensor, pattern: str) -> LayerSparsity:
    """Count the nonzeros of one weight."""
    nnz = int(torch.count_nonzero(weight))
    return LayerSparsity(name, tuple(weight.shape), nnz, 1.0 - nnz / max(weight.numel(), 1), pattern)


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Report every weight matrix (``weight`` parameters with 2 or more dims) of any model.

    The pattern column says ``"2:4"`` where the weight already satisfies it along its input dimension.
    """
    rows = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, Tensor) and w.dim() >= 2:
            rows.append(layer_row(name, w, detect_pattern(w, input_dim(module))))
    return SparsityReport(rows)
