"""torch's CUDA kernels: ``y = x @ W^T + b`` for x (N, in), each a ``prepare`` (once per layer, at load) and a
``matmul`` (per call); the dispatch lists them after ours (``triton_sparse``, ``triton_two_four``) as the paths
``"csr:torch"`` and ``"2:4:torch"``.

CSR runs on cuSPARSE through ``torch.sparse.mm`` with int32 indices, in the weight's own dtype.
2:4 runs on cuSPARSELt / CUTLASS through ``torch.sparse.to_sparse_semi_structured`` (fp16 / bf16 only), the
weight zero-padded to the kernels' minimum tile multiples and the input padded to match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_ops.errors import UnsupportedError
from sparse_ops.formats import CSR, TwoFour

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def prepare_csr(w: CSR) -> torch.Tensor:
    return w.to_torch()


def csr_matmul(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (N, in) -> (N, out)."""
    y = torch.sparse.mm(weight, x.t()).t()  # (out, in) @ (in, N) -> (out, N) -> (N, out)
    return y if bias is None else y + bias


@dataclass(frozen=True)
class SemiStructured:
    """A 2:4 weight as torch's semi-structured tensor, padded to (out_pad, in_pad)."""

    weight: torch.Tensor
    out_features: int
    in_features: int
    in_padded: int


def _tile_multiples(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, cols) multiples that both of torch's 2:4 backends (CUTLASS, cuSPARSELt) accept for ``dtype``."""
    from torch.sparse import semi_structured as ss

    rows, cols = 32, 64  # CUTLASS fp16/bf16 minimum tile, the larger of the two backends
    for backend in (ss.SparseSemiStructuredTensorCUTLASS, ss.SparseSemiStructuredTensorCUSPARSELT):
        cfg = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
        if cfg is not None:
            rows, cols = max(rows, cfg.sparse_min_rows), max(cols, cfg.sparse_min_cols)
    return rows, cols


def accepts_two_four(w: TwoFour) -> bool:
    """torch's semi-structured kernels take fp16 / bf16 values only."""
    return w.dtype in SEMI_STRUCTURED_DTYPES


def prepare_two_four(w: TwoFour) -> SemiStructured:
    if w.dtype not in SEMI_STRUCTURED_DTYPES:
        raise UnsupportedError(f"CUDA 2:4 needs float16 or bfloat16 values, got {w.dtype}")
    out, inp = w.shape
    rm, cm = _tile_multiples(w.dtype)
    out_pad, in_pad = -(-out // rm) * rm, -(-inp // cm) * cm
    dense = F.pad(w.to_dense(), (0, in_pad - inp, 0, out_pad - out))  # zero padding keeps the 2:4 pattern
    return SemiStructured(torch.sparse.to_sparse_semi_structured(dense), out, inp, in_pad)


def two_four_matmul(state: SemiStructured, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (N, in) -> (N, out); padded input columns meet zero weight columns."""
    xp = F.pad(x, (0, state.in_padded - state.in_features))  # (N, in_pad)
    y = F.linear(xp, state.weight)[:, : state.out_features]  # (N, out_pad) -> (N, out)
    return y if bias is None else y + bias
