"""The layout policy: how conversion stores each tensor (dense, or which format, and whether as its transpose).

Only 2-D float32/float16/bfloat16 tensors are candidates, and embedding tables (``EMBEDDING``) only when asked
for. A format is worth it when the tensor is at least as sparse as asked (by default the format's own
``MIN_SPARSITY``, or, where it has none, when the format stores the tensor in fewer bytes than dense); "auto"
takes the smallest of dense and the formats that are worth it and fit. The decision reads the tensor's zeros and
the formats' size estimates only: how fast a layout runs is chosen where the model runs (``sparse_ops.plan``).

Example:
    >>> w = torch.zeros(8, 8)
    >>> w[0, 0] = 1.0
    >>> sparsity_of(w), choose_storage("fc.weight", w, "auto", None)
    (0.984375, 'csr')
    >>> choose_storage("embeddings.word_embeddings.weight", w, "auto", None)  # embeddings stay dense
    'dense'
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch

from sparse_ops.checkpoint.schema import DENSE
from sparse_ops.errors import UserValueError
from sparse_ops.formats import VALUE_DTYPES
from sparse_ops.quantized import CSRInt8, DenseInt8
from sparse_ops.registry import AUTO, FORMATS, LOSSLESS, QUANTIZED, format_class

EMBEDDING = re.compile(r"embed|(^|\.)(wte|wpe)(\.|$)")  # names of embedding tables (stay dense by default)
INT8_TWINS = {"csr": CSRInt8.format}  # a lossless format -> its int8 layout under quantize="int8"


def sparsity_of(t: torch.Tensor) -> float:
    """Fraction of exact zeros (0.0 for an empty tensor)."""
    return 1.0 - int(torch.count_nonzero(t)) / t.numel() if t.numel() else 0.0


class Storage(NamedTuple):
    """How one tensor is stored: "dense" or a format name, and whether as its transpose."""

    format: str
    transposed: bool = False


def choose_layout(name: str, t: torch.Tensor, format: str, min_sparsity: float | None,
                  embeddings: bool = False, *, transpose: bool = True, quantize: str | None = None) -> Storage:
    """The ``Storage`` of one tensor (see ``convert_checkpoint``): as ``choose_storage``, and where a format's
    pattern fails along the last dim but holds for the transpose (groups along dim 0: the (in, out) weight of
    transformers' ``Conv1D`` pruned along its input), that format of the transpose (``transpose=False``:
    never). The transpose is tried only where the tensor as it is breaks the pattern.

    Example:
        >>> w = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 5.0],
        ...                   [0.0, 6.0, 0.0, 7.0], [0.0, 0.0, 8.0, 0.0]])  # 2:4 down each column, not row 0
        >>> choose_layout("h.0.attn.c_attn.weight", w, "2:4", None)
        Storage(format='2:4', transposed=True)
        >>> choose_storage("fc.weight", w.t(), "2:4", None)
        '2:4'
        >>> choose_layout("fc.weight", w, "auto", None, quantize="int8")  # the smallest int8 layout
        Storage(format='dense-int8', transposed=False)
    """
    if t.dim() != 2 or t.dtype not in VALUE_DTYPES or (EMBEDDING.search(name) and not embeddings):
        return Storage(DENSE)
    if quantize is not None:
        return Storage(_int8_layout(t, format, min_sparsity))
    shape, nnz, dense_bytes = tuple(t.shape), int(torch.count_nonzero(t)), t.numel() * t.element_size()
    sparsity = 1.0 - nnz / max(t.numel(), 1)

    def worth(cls: type, shape: tuple[int, int]) -> bool:
        need = cls.MIN_SPARSITY if min_sparsity is None else min_sparsity
        return cls.estimate_nbytes(shape, nnz, t.dtype) < dense_bytes if need is None else sparsity >= need

    def fit(cls: type) -> Storage | None:
        """The orientation ``cls`` stores ``t`` in, if any: as is where that fits the pattern (and is worth
        it), else the transpose where it fits (and is worth it). Worth is asked before any pattern scan."""
        worth_as_is = worth(cls, shape)
        if worth_as_is and cls.eligible(t):
            return Storage(cls.format)
        if not transpose or not worth(cls, shape[::-1]):
            return None
        if not worth_as_is and cls.eligible(t):
            return None  # fits as is, only not worth it there: no reason to turn it round
        return Storage(cls.format, True) if cls.eligible(t.t()) else None

    if format != AUTO:
        cls = format_class(format)
        found = fit(cls)
        if found is not None:
            return found
        if not worth(cls, shape):
            return Storage(DENSE)
        try:
            cls.from_dense(t)  # raises, naming the shape or the count of groups that break the pattern
        except ValueError as e:
            tried = transpose and worth(cls, shape[::-1])
            raise UserValueError(f"{e} (nor along dim 0: its transpose is not {format} either)" if tried
                             else str(e)) from None
        return Storage(format)
    sizes = {Storage(DENSE): dense_bytes}
    for cls in (FORMATS[f] for f in LOSSLESS):  # int8 only where asked for (quantize, or by name)
        found = fit(cls)
        if found is not None:
            sizes[found] = cls.estimate_nbytes(shape[::-1] if found.transposed else shape, nnz, t.dtype)
    return min(sizes, key=sizes.__getitem__)


def _int8_layout(t: torch.Tensor, format: str, min_sparsity: float | None) -> str:
    """The int8 format of a 2-D float tensor under ``quantize="int8"``: "auto", the smallest int8 layout; an int8
    format, itself; "csr", csr-int8 where the tensor is ``min_sparsity`` sparse (None: where smaller than
    dense-int8), else dense-int8. Formats with no int8 layout (2:4) raise ValueError."""
    shape, nnz = (t.shape[0], t.shape[1]), int(torch.count_nonzero(t))
    size = {f: FORMATS[f].estimate_nbytes(shape, nnz, t.dtype) for f in QUANTIZED}
    if format in size:
        return format
    if format == AUTO:
        return min(size, key=size.__getitem__)
    twin = INT8_TWINS.get(format)
    if twin is None:
        raise UserValueError(f"{format} has no int8 layout; with quantize='int8' allowed: {AUTO}, "
                         f"{', '.join(INT8_TWINS)}, {', '.join(QUANTIZED)}")
    worth = (size[twin] < size[DenseInt8.format]) if min_sparsity is None else sparsity_of(t) >= min_sparsity
    return twin if worth else DenseInt8.format


def choose_storage(name: str, t: torch.Tensor, format: str, min_sparsity: float | None,
                   embeddings: bool = False) -> str:
    """"dense" or a format name (``formats.FORMATS``) for one tensor as it is, never transposed (see
    ``convert_checkpoint``; ``choose_layout`` also considers the transpose, as conversion does).

    A format is worth storing when the tensor is at least ``min_sparsity`` sparse (None: the format's own
    ``MIN_SPARSITY``, or, where it has none, when it stores the tensor smaller than dense). A format asked for
    by name whose pattern the tensor breaks raises ValueError naming what breaks it; "auto" takes the smallest
    of dense and the formats that are worth it and fit."""
    return choose_layout(name, t, format, min_sparsity, embeddings, transpose=False).format

