"""Slow, obviously correct fp32 products ``y = x @ W^T`` for each format, the yardstick of every fast kernel.

They read the stored parts directly (never ``to_dense``), so a bug in a container's ``to_dense`` and one in a
kernel cannot hide each other.

Example:
    >>> import torch
    >>> from sparse_ops.formats import CSR
    >>> w = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    >>> csr_matmul(CSR.from_dense(w), torch.tensor([[1.0, 10.0]])).tolist()
    [[20.0, 1.0]]
"""
from __future__ import annotations

import torch

from sparse_ops.formats import CSR, TwoFour
from sparse_ops.quantized import BitmapInt8, CSRInt8, DenseInt8, Int8Weight, quantize_input


def _scatter_matmul(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, out: int,
                    x: torch.Tensor) -> torch.Tensor:
    """y[:, r] = sum over stored (r, c, v) of v * x[:, c], in fp32.  x: (N, in) -> (N, out)."""
    x = x.to(torch.float32)
    y = torch.zeros(x.shape[0], out, dtype=torch.float32, device=x.device)
    y.index_add_(1, rows, x[:, cols] * vals.to(torch.float32))  # (N, nnz) products summed into columns
    return y


def csr_matmul(w: CSR, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ W^T`` for a CSR weight.  x: (N, in) -> (N, out)."""
    counts = (w.crow_indices[1:] - w.crow_indices[:-1]).to(torch.int64)  # (out,) entries per row
    rows = torch.repeat_interleave(torch.arange(w.shape[0], device=w.device), counts)  # (nnz,)
    return _scatter_matmul(rows, w.col_indices.to(torch.int64), w.values, w.shape[0], x)


def two_four_matmul(w: TwoFour, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ W^T`` for a 2:4 weight.  x: (N, in) -> (N, out)."""
    out, inp = w.shape
    pos = w.positions()  # (out, G, 2) within each group of 4
    cols = pos + 4 * torch.arange(inp // 4, device=w.device).view(1, -1, 1)  # (out, G, 2) absolute column
    rows = torch.arange(out, device=w.device).view(-1, 1, 1).expand_as(cols)
    return _scatter_matmul(rows.reshape(-1), cols.reshape(-1), w.values.reshape(-1), out, x)


def dense_int8_matmul(w: DenseInt8, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ (scales * q)^T`` for a dense int8 weight.  x: (N, in) -> (N, out). With ``w.input_bits``,
    x as the kernels take it (``quantize_input``), as in the other int8 references."""
    x = _input(w, x)
    return (x.to(torch.float64) @ w.q.values.to(torch.float64).t() * w.scales.to(torch.float64)).float()


def _input(w: Int8Weight, x: torch.Tensor) -> torch.Tensor:
    return x if w.input_bits is None else quantize_input(x)


def csr_int8_matmul(w: CSRInt8, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ (scales * q)^T`` for a CSR int8 weight, each stored value times its row's scale."""
    q = w.q
    counts = (q.crow_indices[1:] - q.crow_indices[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(w.shape[0], device=w.device), counts)
    return _scatter_matmul(rows, q.col_indices.to(torch.int64), q.values.float() * w.scales.float()[rows],
                           w.shape[0], _input(w, x))


def bitmap_int8_matmul(w: BitmapInt8, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ (scales * q)^T`` for a tiled-bitmap int8 weight (entries decoded from the bitmaps)."""
    rows, cols = w.q.entries()
    return _scatter_matmul(rows, cols, w.q.values.float() * w.scales.float()[rows], w.shape[0], _input(w, x))


# format name -> reference product
REFERENCE: dict[str, object] = {CSR.format: csr_matmul, TwoFour.format: two_four_matmul,
                                DenseInt8.format: dense_int8_matmul, CSRInt8.format: csr_int8_matmul,
                                BitmapInt8.format: bitmap_int8_matmul}
