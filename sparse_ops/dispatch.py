"""Which kernel computes a sparse product: one explicit table keyed by (format, device type).

Example:
    >>> kernel_for("csr", "cpu").name
    'cpu.csr'
    >>> kernel_for("2:4", "mps")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    NotImplementedError: no kernel for format '2:4' on device type 'mps'; supported: csr on cpu, ...
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparse_ops.kernels import cpu, cuda


@dataclass(frozen=True)
class Kernel:
    """``prepare(weight) -> state`` once per layer and device; ``matmul(state, x (N, in), bias) -> (N, out)``.

    ``native`` is False where the kernel does not exploit the format (2:4 on CPU): ``format="auto"`` skips it.
    """

    name: str
    prepare: Callable[[object], object]
    matmul: Callable[[object, torch.Tensor, torch.Tensor | None], torch.Tensor]
    native: bool = True


KERNELS: dict[tuple[str, str], Kernel] = {
    ("csr", "cpu"): Kernel("cpu.csr", cpu.prepare_csr, cpu.csr_matmul),
    ("2:4", "cpu"): Kernel("cpu.2:4", cpu.prepare_two_four, cpu.two_four_matmul, native=False),
    ("csr", "cuda"): Kernel("cuda.csr", cuda.prepare_csr, cuda.csr_matmul),
    ("2:4", "cuda"): Kernel("cuda.2:4", cuda.prepare_two_four, cuda.two_four_matmul),
}


def supported() -> str:
    """'csr on cpu, 2:4 on cpu, ...': the pairs in ``KERNELS``."""
    return ", ".join(f"{f} on {d}" for f, d in KERNELS)


def kernel_for(format: str, device: torch.device | str) -> Kernel:
    """The kernel for a format name on a device; NotImplementedError listing the supported pairs otherwise."""
    device_type = torch.device(device).type
    try:
        return KERNELS[(format, device_type)]
    except KeyError:
        raise NotImplementedError(f"no kernel for format {format!r} on device type {device_type!r}; "
                                  f"supported: {supported()}") from None
