"""SparseGPT: one-shot pruning of one layer with the optimal-brain-surgeon (OBS) reconstruction update.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (ICML 2023).
Given a weight ``W`` (rows, in) and the Gram matrix ``H = X^T X`` of the layer's calibration inputs,
SparseGPT visits the input columns left to right; it zeroes the chosen weights of a column and spreads the
error over the columns not yet visited, so that ``W' X`` stays close to ``W X``. With ``U`` the upper Cholesky
factor of ``H^{-1}``, column ``j`` has error ``(w - q) / U_jj``; later columns move by ``-err * U[j, j+1:]``.
Masks follow the OBS saliency ``w^2 / U_jj^2``: per block of ``block_size`` columns at the block's start
(unstructured), or per group of M columns at the group's first column (N:M). Inside a block the update runs
column by column; later blocks get it lazily, one matrix product per block.

Choices:

* the weights are updated in float32 whatever their dtype; ``H``, its inverse and ``U`` are float64. Damping
  is relative, ``damp * mean(diag H)``; if a Cholesky fails it is multiplied by 10 (up to 5 times);
* exact counts: unstructured pruning zeroes ``round(sparsity * numel)`` weights; each block prunes what the
  cumulative target ``round(sparsity * numel * cols_done / in)`` still asks for;
* dead inputs (``H_jj == 0``: always zero in the data) get ``H_jj = 1`` and their weight column zeroed. Those
  zeros count toward the target, so a layer with more dead weights than the target comes out sparser;
* ``sparsity == 0`` returns an unchanged copy (dead columns included), unless ``bits`` asks for quantization;
* ``bits=8``: the paper's joint mode (GPTQ's quantization inside the same pass): each kept weight is rounded to
  its row's symmetric int8 grid (scale: the row's largest magnitude / 127, fixed before the pass) when its
  column is visited, and the rounding error is spread over the later columns exactly like a pruned weight's.
  The result holds ``scales * q`` (float32 only: a lower precision would leave the grid).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x, w = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g)
    >>> result = sparsegpt_prune(w, x.T @ x, 0.5)
    >>> int((result.weight == 0).sum()), result.weight.shape, 0 < result.error < 1
    (16, torch.Size([4, 8]), True)
    >>> result.error == relative_error(w, result.weight, x.T @ x)
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from prune.masks import NMPattern, from_input_last, input_last, nm_mask, num_pruned, prune_lowest
from sparse_ops.errors import UserValueError
from sparse_ops.quantized import on_grid, row_scales

_RETRIES = 5  # times the damping is multiplied by 10 when a Cholesky fails


@dataclass(frozen=True)
class SparseGPTResult:
    """The pruned weight (shape, dtype and device of the input), its :func:`relative_error` and, with ``bits``,
    the (out,) scales whose int8 grids its rows lie on."""

    weight: Tensor
    error: float
    scales: Tensor | None = None


def relative_error(weight: Tensor, new_weight: Tensor, gram: Tensor, in_dim: int = 1) -> float:
    """``||(W - W') X||_F / ||W X||_F`` on the calibration data, from its Gram matrix ``X^T X`` (in, in):
    ``sqrt(tr(D H D^T) / tr(W H W^T))`` with ``D = W - W'``, in float64. 0 when both are 0, inf when only the
    denominator is. ``in_dim``: the weights' input dimension (1 for (out, in), 0 for Conv1D's (in, out))."""
    w = input_last(weight, in_dim).to(torch.float64, memory_format=torch.contiguous_format)
    if gram.shape != (w.shape[1], w.shape[1]):
        raise UserValueError(f"gram has shape {tuple(gram.shape)}, expected {(w.shape[1],) * 2} for a weight of "
                         f"shape {tuple(weight.shape)} with in_dim={in_dim}")
    h = gram.to(w)
    d = w - input_last(new_weight, in_dim).to(w, memory_format=torch.contiguous_format)
    num, den = float(((d @ h) * d).sum()), float(((w @ h) * w).sum())
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return math.sqrt(max(num, 0.0) / den)


def sparsegpt_prune(weight: Tensor, gram: Tensor, sparsity: float, *, nm: NMPattern | None = None,
                    block_size: int = 128, damp: float = 0.01, in_dim: int = 1,
                    bits: int | None = None) -> SparseGPTResult:
    """Prune ``weight`` to ``sparsity`` with SparseGPT; returns a new tensor and its relative error.

    ``weight``: (out, in) with ``in_dim=1``, (in, out) (transformers' Conv1D) with ``in_dim=0``; float32,
    float16 or bfloat16. ``gram``: (in, in), the sum of ``x x^T`` over calibration input rows (float64
    preferred). ``sparsity`` in [0, 1); with ``nm`` (at most N nonzeros in every M consecutive inputs) it must
    equal ``nm.sparsity`` (e.g. 0.5 for 2:4), ``in`` must be a multiple of M, and ``block_size`` is rounded
    down to a multiple of M (at least M). ``damp``: dampening relative to the mean diagonal of ``gram``.
    ``bits=8``: quantize jointly (the module docstring); float32 weights only.
    """
    block_size = _check_args(weight, gram, sparsity, nm, block_size, damp, in_dim, bits)
    # (rows, in), float32, contiguous whatever the layout (so both orientations compute the very same thing)
    w = input_last(weight, in_dim).to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    rows, cols = w.shape
    if sparsity == 0 and bits is None:
        return SparseGPTResult(weight.clone(), 0.0)

    h = gram.to(device=w.device, dtype=torch.float64, copy=True)
    if not torch.isfinite(h).all():
        raise UserValueError(f"gram of the layer with weight shape {tuple(weight.shape)} has inf or NaN entries")
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_cholesky(h, damp, tuple(weight.shape)).float()
    del h
    scales = row_scales(w) if bits else None  # (rows,): each row's int8 grid, fixed before the pass
    diag = u.diagonal()
    total, pruned = num_pruned(sparsity, w.numel()), 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # the block transposed, (columns, rows) and contiguous: each column's update of the later columns is
        # one rank-1 update of contiguous rows (on the strided (rows, columns) slice it was 50x slower)
        w1t, u1, dead1 = w[:, i1:i2].t().contiguous(), u[i1:i2, i1:i2], dead[i1:i2]
        w1 = w1t.t()  # (rows, columns) view of the same storage, for the masks
        err1t = torch.zeros_like(w1t)
        if nm is None:
            scores = (w1.square() / diag[i1:i2].square()).masked_fill_(dead1, -math.inf)
            target = total if i2 == cols else round(sparsity * w.numel() * i2 / cols)
            n_prune = min(max(target - pruned, rows * int(dead1.sum())), w1.numel())
            keep = prune_lowest(scores, n_prune)
            pruned += n_prune
        else:
            keep = torch.empty_like(w1, dtype=torch.bool)
        for j in range(i2 - i1):
            if nm is not None and j % nm.m == 0:
                g = slice(j, j + nm.m)
                scores = (w1[:, g].square() / diag[i1:i2][g].square()).masked_fill_(dead1[g], -math.inf)
                keep[:, g] = nm_mask(scores, nm.n, nm.m)
            col = w1t[j]
            q = torch.where(keep[:, j], col if scales is None else on_grid(col, scales), 0.0)
            err = (col - q) / u1[j, j]
            w1t[j + 1:].addr_(u1[j, j + 1:], err, alpha=-1.0)
            w1t[j] = q
            err1t[j] = err
        w[:, i1:i2] = w1
        w[:, i2:].addmm_(err1t.t(), u[i1:i2, i2:], alpha=-1.0)
    new = from_input_last(w, weight.shape, in_dim).to(weight.dtype).contiguous()
    return SparseGPTResult(new, relative_error(weight, new, gram, in_dim), scales)


def _check_args(weight: Tensor, gram: Tensor, sparsity: float, nm: NMPattern | None, block_size: int, damp: float,
                in_dim: int, bits: int | None) -> int:
    """ValueError naming the first bad argument of :func:`sparsegpt_prune`; the block size it will use (a
    multiple of M under an N:M pattern)."""
    if weight.dim() != 2 or in_dim not in (0, 1) or not weight.is_floating_point():
        raise UserValueError(f"weight must be a 2-D floating tensor with in_dim 0 or 1, got shape "
                             f"{tuple(weight.shape)}, dtype {weight.dtype}, in_dim={in_dim}")
    cols = weight.shape[in_dim]
    if gram.shape != (cols, cols):
        raise UserValueError(f"gram has shape {tuple(gram.shape)}, expected {(cols, cols)} for a weight of shape "
                             f"{tuple(weight.shape)} with in_dim={in_dim}")
    if block_size < 1 or not damp >= 0:
        raise UserValueError(f"block_size must be >= 1 and damp >= 0, got block_size={block_size}, damp={damp}")
    if not 0.0 <= sparsity < 1.0:
        raise UserValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if bits not in (None, 8):
        raise UserValueError(f"bits must be None or 8, got {bits!r}")
    if bits and weight.dtype != torch.float32:
        raise UserValueError(f"joint int8 quantization needs a float32 weight (a lower precision leaves the int8 "
                             f"grid), got {weight.dtype}")
    if nm is None:
        return block_size
    if cols % nm.m:
        raise UserValueError(f"input size {cols} is not a multiple of M={nm.m} (pattern {nm})")
    if abs(sparsity - nm.sparsity) > 1e-9:
        raise UserValueError(f"sparsity {sparsity} does not match pattern {nm}; pass {nm.sparsity}")
    return max(nm.m, block_size // nm.m * nm.m)


def _inverse_cholesky(h: Tensor, damp: float, shape: tuple[int, ...]) -> Tensor:
    """Upper Cholesky factor of ``(h + lambda I)^{-1}`` in float64, raising the damping until it exists."""
    mean = float(h.diagonal().mean())
    lam = damp * mean
    for _ in range(_RETRIES + 1):
        tried, hd = lam, h.clone()
        hd.diagonal().add_(lam)
        low, info = torch.linalg.cholesky_ex(hd)
        if not int(info):
            up, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if not int(info) and bool(torch.isfinite(up).all()):
                return up
        lam = max(10 * lam, 1e-6 * mean)
    raise UserValueError(f"the damped Hessian of the layer with weight shape {shape} is not positive definite "
                     f"even with damping {tried:.3g} (damp={damp}, mean diagonal {mean:.3g}); is gram X^T X?")
