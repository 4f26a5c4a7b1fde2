"""Which kernel computes a sparse product: one explicit table keyed by (format, device type).

CPU entries are our C++ kernels (``kernels/cpu_native.py``); where they cannot be built (no compiler) or are
disabled (``SPARSE_OPS_NATIVE=0``), ``kernel_for`` returns the entry's ``fallback``: torch's kernels.

Example:
    >>> kernel_for("csr", "cuda").name
    'cuda.csr'
    >>> kernel_for("csr", "cpu").name in ("cpu.csr", "torch.cpu.csr")
    True
    >>> kernel_for("2:4", "mps")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    NotImplementedError: no kernel for format '2:4' on device type 'mps'; supported: csr on cpu, ...
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparse_ops.kernels import cpu, cpu_native, cuda, native


@dataclass(frozen=True)
class Kernel:
    """``prepare(weight) -> state`` once per layer and device; ``matmul(state, x (N, in), bias) -> (N, out)``.

    ``native`` is False where the kernel does not exploit the format (torch's 2:4 on CPU): benchmarks
    and ``linear.candidate_formats`` skip it. ``fuses_activation``: ``matmul`` takes a fourth argument, an activation name
    (``sparse_ops.activations``), applied in the kernel's output writes. ``ffn``, where set, computes a whole
    feed-forward block in one call, ``ffn(up_state, down_state, x, up_bias, down_bias, activation)``, or
    returns None where it does not apply (``sparse_ops.fused.SparseFFN`` then runs the two layers).
    ``fuses_post``: ``matmul`` and ``ffn`` take ``post=`` (``kernels.cpu_native.AddNorm``: a residual add and
    LayerNorm applied to whole output rows, ``sparse_ops.fused.SparseAddNorm``). ``variants``, where set, gives
    the names of the kernel's own paths for n tokens (e.g. CSR's "plain" and "panels"); ``matmul`` then takes
    ``variant=`` one of them (None: the kernel's own choice by batch), and ``sparse_ops.plan`` times each.
    ``available()``
    says whether the kernel can run in this process; when it cannot, ``fallback`` (which must always be
    available) is used.
    """

    name: str
    prepare: Callable[[object], object]
    matmul: Callable[..., torch.Tensor]  # (state, x, bias[, activation]) -> y
    native: bool = True
    fuses_activation: bool = False
    ffn: Callable[..., torch.Tensor | None] | None = None
    fuses_post: bool = False
    variants: Callable[[int], tuple[str, ...]] | None = None
    available: Callable[[], bool] = lambda: True
    fallback: Kernel | None = None


# torch's CPU kernels: the fallbacks of ours, and references in the benchmarks
TORCH_CPU_CSR = Kernel("torch.cpu.csr", cpu.prepare_csr, cpu.csr_matmul)
TORCH_CPU_TWO_FOUR = Kernel("torch.cpu.2:4", cpu.prepare_two_four, cpu.two_four_matmul, native=False)


KERNELS: dict[tuple[str, str], Kernel] = {
    ("csr", "cpu"): Kernel("cpu.csr", cpu_native.prepare_csr, cpu_native.csr_matmul, fuses_activation=True,
                           ffn=cpu_native.ffn_matmul, fuses_post=True, variants=cpu_native.csr_variants,
                           available=native.available,
                           fallback=TORCH_CPU_CSR),
    ("2:4", "cpu"): Kernel("cpu.2:4", cpu_native.prepare_two_four, cpu_native.two_four_matmul,
                           fuses_activation=True, fuses_post=True, available=native.available,
                           fallback=TORCH_CPU_TWO_FOUR),
    ("csr", "cuda"): Kernel("cuda.csr", cuda.prepare_csr, cuda.csr_matmul),
    ("2:4", "cuda"): Kernel("cuda.2:4", cuda.prepare_two_four, cuda.two_four_matmul),
}


def supported() -> str:
    """'csr on cpu, 2:4 on cpu, ...': the pairs in ``KERNELS``."""
    return ", ".join(f"{f} on {d}" for f, d in KERNELS)


# torch's own kernel for a pair where ours is the default: sparse_ops.plan times it too and keeps it where it is
# faster (e.g. MKL's CSR gemv on a weight that stays in L3), so the default is never slower than torch's path.
TORCH_KERNELS: dict[tuple[str, str], Kernel] = {("csr", "cpu"): TORCH_CPU_CSR}


def kernel_for(format: str, device: torch.device | str, *, torch_kernel: bool = False) -> Kernel:
    """The kernel for a format name on a device (its fallback when it cannot run here); NotImplementedError
    listing the supported pairs otherwise. ``torch_kernel``: torch's kernel where ``TORCH_KERNELS`` has one."""
    device_type = torch.device(device).type
    if torch_kernel and (format, device_type) in TORCH_KERNELS:
        return TORCH_KERNELS[(format, device_type)]
    try:
        kernel = KERNELS[(format, device_type)]
    except KeyError:
        raise NotImplementedError(f"no kernel for format {format!r} on device type {device_type!r}; "
                                  f"supported: {supported()}") from None
    return kernel if kernel.fallback is None or kernel.available() else kernel.fallback
