"""Inspection: what a checkpoint holds, one logical tensor at a time (``prune inspect``).

Each tensor is described by its own shape, its storage (dense, a format, or a format of its transpose), its
dtype and bits per stored value, its sparsity, and the bytes it takes in the file; the int8 formats also give
their smallest and largest row scale. Tensors are loaded one at a time, so a checkpoint of any size fits.

Example:
    >>> import os, tempfile
    >>> from safetensors.torch import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_file({"fc.weight": torch.tensor([[0.0, 1.0], [0.0, 0.0]])}, path)
    >>> [(t.name, t.label, t.shape, t.sparsity, t.nbytes) for t in inspect_checkpoint(path)]
    [('fc.weight', 'dense', (2, 2), 0.75, 16)]
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sparse_ops.checkpoint.layout import sparsity_of
from sparse_ops.checkpoint.schema import DENSE, Transposed, iter_tensors

TRANSPOSED_MARK = "^T"  # after the format's name where a tensor is stored transposed (``TensorInfo.label``)


@dataclass(frozen=True)
class TensorInfo:
    """One row of ``prune inspect``: a logical tensor (its own shape), its storage format and bytes;
    ``transposed``: stored as its transpose in ``format`` (``label`` shows it as e.g. "2:4^T")."""

    name: str
    shape: tuple[int, ...]
    format: str
    dtype: torch.dtype
    sparsity: float
    nbytes: int  # bytes stored in the file for this tensor (all its parts)
    transposed: bool = False
    bits: int = 0  # bits per stored value (8 for the int8 formats; 0: those of dtype)
    scales: tuple[float, float] | None = None  # the int8 formats' smallest and largest row scale

    @property
    def value_bits(self) -> int:
        """Bits per stored value: 32 / 16 as its dtype, 8 for int8 formats."""
        return self.bits or 8 * torch.empty((), dtype=self.dtype).element_size()

    @property
    def label(self) -> str:
        """The format, with ``TRANSPOSED_MARK`` when stored transposed: "dense", "csr", "2:4", "2:4^T"."""
        return self.format + (TRANSPOSED_MARK if self.transposed else "")

    @property
    def dense_nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * torch.empty((), dtype=self.dtype).element_size()


def inspect_checkpoint(path: str | os.PathLike) -> Iterator[TensorInfo]:
    """Yield a TensorInfo per logical tensor of a dense or sparse checkpoint, loading one at a time."""
    for name, t in iter_tensors(path):
        if isinstance(t, torch.Tensor):
            yield TensorInfo(name, tuple(t.shape), DENSE, t.dtype, sparsity_of(t), t.numel() * t.element_size())
        else:
            numel = t.shape[0] * t.shape[1]
            sparsity = 1.0 - int(torch.count_nonzero(t.values)) / numel if numel else 0.0
            scales = getattr(t, "scales", None)
            span = None if scales is None or not scales.numel() else (float(scales.min()), float(scales.max()))
            yield TensorInfo(name, t.shape, t.format, t.dtype, sparsity, t.nbytes, isinstance(t, Transposed),
                             8 * t.values.element_size(), span)
