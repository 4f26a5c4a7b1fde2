"""The kernels: one module per backend (``ours_cpu`` + ``cpp`` our C++ CPU kernels, ``triton_*`` our GPU kernels,
``torch_cpu`` / ``torch_cuda`` torch's), each a ``prepare`` and a ``matmul`` listed in ``sparse_ops.dispatch``;
``reference`` the slow fp32 references the tests compare against."""
from __future__ import annotations

import torch


def needs_grad(x: torch.Tensor, *biases: torch.Tensor | None) -> bool:
    """Whether autograd will want the product's gradient (grad mode on, and x or a bias requires it).

    >>> needs_grad(torch.ones(1, requires_grad=True)), needs_grad(torch.ones(1), None)
    (True, False)
    """
    return torch.is_grad_enabled() and (x.requires_grad or any(b is not None and b.requires_grad for b in biases))
