"""CPU kernels: ``y = x @ W^T + b`` for x (N, in), each a ``prepare`` (once, at load) and a ``matmul`` (per call).

CSR runs on MKL through torch with int32 indices: ``torch.mv`` at N == 1 (about 2x faster than ``torch.sparse.mm``
on a 4096x4096 weight at 90% sparsity here), else ``torch.sparse.mm(W, x^T)^T``, several times faster than
``F.linear(x, W_csr)`` at N >= 8 (see sparse_ops/bench/matmul.py). MKL has no fp16/bf16 CSR, so those weights are
upcast to fp32 once at prepare and outputs cast back.

No CPU kernel exploits 2:4 itself; a 2:4 weight runs as whatever is fastest: dense ``F.linear`` on the
decompressed weight, or the CSR path above when the weight is sparse enough for CSR to beat dense.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_ops.formats import CSR, TwoFour

log = logging.getLogger(__name__)

# Below about 80% sparsity torch's CPU CSR loses to dense F.linear (BENCHMARKING.md, sparse_ops/bench/matmul.py).
CSR_BEATS_DENSE_SPARSITY = 0.8


@functools.cache
def log_once(message: str) -> None:
    """Log ``message`` at INFO the first time it is seen in this process."""
    log.info(message)


@dataclass(frozen=True)
class TorchCSR:
    """A weight prepared for torch's CSR matmul: int32 indices, fp32 values, and the dtype to return."""

    weight: torch.Tensor  # torch sparse CSR (out, in)
    out_dtype: torch.dtype


def prepare_csr(w: CSR) -> TorchCSR:
    if w.dtype != torch.float32:
        log_once(f"CPU CSR has no {w.dtype} kernel (MKL): computing in float32, results cast back")
    return TorchCSR(w.to_torch(torch.float32), w.dtype)


def csr_matmul(state: TorchCSR, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (N, in) -> (N, out)."""
    x32 = x.to(torch.float32)
    if x32.shape[0] == 1:
        y = torch.mv(state.weight, x32[0]).unsqueeze(0)  # (out,) -> (1, out)
    else:
        y = torch.sparse.mm(state.weight, x32.t()).t()  # (out, in) @ (in, N) -> (out, N) -> (N, out)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(state.out_dtype)


def prepare_two_four(w: TwoFour) -> TorchCSR | torch.Tensor:
    """A TorchCSR when the weight is sparse enough for CSR to win, else the dense weight for F.linear."""
    dense = w.to_dense()
    sparsity = 1.0 - int((dense != 0).sum()) / max(dense.numel(), 1)
    if sparsity >= CSR_BEATS_DENSE_SPARSITY:
        log_once("2:4 on CPU: no CPU kernel uses the 2:4 pattern; weights this sparse run as CSR")
        return prepare_csr(CSR.from_dense(dense))
    log_once("2:4 on CPU: no CPU kernel uses the 2:4 pattern; running dense F.linear (no speedup on CPU)")
    return dense


def two_four_matmul(state: TorchCSR | torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (N, in) -> (N, out)."""
    if isinstance(state, TorchCSR):
        return csr_matmul(state, x, bias)
    return F.linear(x, state, bias)
