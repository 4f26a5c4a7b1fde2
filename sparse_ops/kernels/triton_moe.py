"""A Triton grouped matmul for Mixture-of-Experts on the GPU: every expert's tokens in one launch, no Python loop.

``grouped_linear(x, offsets, w, b)``: ``x`` (A, D) holds the token-expert assignments sorted by expert, expert
``e``'s rows being ``offsets[e] .. offsets[e+1]``; row ``a`` of expert ``e`` becomes ``x[a] @ w[e]^T + b[e]``
((A, H) out, for w (E, H, D)). The launch covers *row blocks*: each expert's rows cut into blocks of BLOCK_M,
listed on the device from the counts (``block_table``, torch ops, no host sync), the grid sized by the upper
bound ``ceil(A / BLOCK_M) + E`` so that the host never waits for the routing; blocks past the last are idle.
So an expert with no tokens costs nothing and its weights are never read: at decode (a few tokens, top-2 of 8
experts) the bytes read are those of the chosen experts, where a padded batched matmul would stream all E.

Inference only (no autograd): ``sparse_ops.layers.moe.MoE`` uses it on CUDA when no gradient is needed and
runs its per-expert loop otherwise. Tested on CPU tensors under ``TRITON_INTERPRET=1``
(``tests/test_triton_moe.py``).

Example:
    >>> import torch
    >>> block_table(torch.tensor([0, 3, 3, 20]), block_m=16, max_blocks=4)
    (tensor([ 0,  2,  2, -1]), tensor([ 0,  3, 19,  0]))
"""
from __future__ import annotations

import functools

import torch

from sparse_ops.errors import UnavailableError, UserValueError
from sparse_ops.kernels import triton_sparse as ts

triton, tl = ts.triton, ts.tl

BLOCK_M = 16  # assignment rows per program (tl.dot's minimum): decode routes a few tokens to each expert
available = ts.available


def block_table(offsets: torch.Tensor, block_m: int, max_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, first row) of each of ``max_blocks`` row blocks of ``block_m`` rows, expert by expert; -1 and
    0 for the idle blocks past the last. ``offsets``: (E + 1,) cumulative rows per expert."""
    counts = offsets[1:] - offsets[:-1]
    blocks = (counts + block_m - 1) // block_m  # (E,)
    ends = torch.cumsum(blocks, 0)
    j = torch.arange(max_blocks, device=offsets.device)
    expert = torch.searchsorted(ends, j, right=True)  # the expert whose blocks cover block j
    busy = expert < counts.numel()
    e = expert.clamp(max=max(counts.numel() - 1, 0))
    first = offsets[:-1][e] + (j - (ends[e] - blocks[e])) * block_m
    return torch.where(busy, expert, -1), torch.where(busy, first, 0)


if tl is not None:
    def _grouped_kernel(x_ptr, w_ptr, b_ptr, y_ptr, block_expert, block_first, offsets, H, D,
                        stride_we, stride_wh, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                        PRECISION: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        pid, pid_h = tl.program_id(0), tl.program_id(1)
        e = tl.load(block_expert + pid)
        if e >= 0:
            first = tl.load(block_first + pid)
            end = tl.load(offsets + e + 1)
            m = first + tl.arange(0, BLOCK_M)
            if WIDE:  # offsets past INT32_MAX (all experts' weights, or the rows): in int64
                e = e.to(tl.int64)
                m = m.to(tl.int64)
            h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
            k = tl.arange(0, BLOCK_K)
            m_ok, h_ok = m < end, h < H
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + k
                xt = tl.load(x_ptr + m[:, None] * D + kk[None, :], mask=m_ok[:, None] & (kk < D)[None, :],
                             other=0.0)
                wt = tl.load(w_ptr + e * stride_we + h[:, None] * stride_wh + kk[None, :],
                             mask=h_ok[:, None] & (kk < D)[None, :], other=0.0)
                acc = ts._dot_wt(acc, xt, wt, DOT_FP32, PRECISION)
            if HAS_BIAS:
                acc += tl.load(b_ptr + e * H + h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + m[:, None] * H + h[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & h_ok[None, :])


@functools.cache
def _build() -> tuple[object, bool]:
    """The kernel, decorated once per process, compiled or interpreted per ``TRITON_INTERPRET`` now."""
    if triton is None:
        raise UnavailableError("the Triton MoE kernel needs triton")
    ts._build()  # the shared device functions (ts._dot_wt), decorated the same way
    g = globals()
    g["_grouped_kernel"] = triton.jit(getattr(g["_grouped_kernel"], "fn", g["_grouped_kernel"]))
    return g["_grouped_kernel"], ts.interpreting()


def grouped_linear(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                   ) -> torch.Tensor:
    """Rows of expert e (``offsets[e] .. offsets[e+1]`` of x (A, D)) times ``w[e]^T`` (w: (E, H, D)) plus
    ``b[e]``; (A, H) in x's dtype. ``offsets``: (E + 1,) int, starting at 0 and ending at A."""
    E, H, D = w.shape
    if x.dim() != 2 or x.shape[1] != D:
        raise UserValueError(f"x must have shape (A, {D}), got {tuple(x.shape)}")
    if offsets.shape != (E + 1,):
        raise UserValueError(f"offsets must have shape ({E + 1},), got {tuple(offsets.shape)}")
    if b is not None and b.shape != (E, H):
        raise UserValueError(f"b must have shape ({E}, {H}), got {tuple(b.shape)}")
    kernel, interpret = _build()
    if x.device.type != "cuda" and not interpret:
        raise UnavailableError("the Triton kernels run CPU tensors only under TRITON_INTERPRET=1")
    A = x.shape[0]
    y = torch.empty(A, H, dtype=x.dtype, device=x.device)
    if A == 0 or H == 0:
        return y
    x, w = x.contiguous(), w.contiguous()
    max_blocks = -(-A // BLOCK_M) + E
    expert, first = block_table(offsets.to(device=x.device, dtype=torch.int64), BLOCK_M, max_blocks)
    block_h = 64 if interpret or H <= 64 else 128
    block_k = 32 if interpret else 64
    precision = ts.precision(x)
    dot_fp32 = interpret and (x.dtype == torch.bfloat16 or w.dtype == torch.bfloat16)
    with ts.on_device(x):
        kernel[(max_blocks, triton.cdiv(H, block_h))](
            x, w, x if b is None else b.contiguous(), y, expert.to(torch.int32), first.to(torch.int32),
            offsets.to(device=x.device, dtype=torch.int32), H, D, w.stride(0), w.stride(1),
            HAS_BIAS=b is not None, DOT_FP32=dot_fp32, PRECISION=precision,
            WIDE=ts.wide_offsets(x.numel(), A * H, w.numel()), BLOCK_M=BLOCK_M, BLOCK_H=block_h, BLOCK_K=block_k)
    return y
