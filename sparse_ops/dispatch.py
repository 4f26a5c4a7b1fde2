"""Which kernels can compute a sparse product: one registry keyed by (format, device type), each entry an
ordered tuple of candidates, each declaring what it can do. The registry never chooses a layer's route: the
router (``sparse_ops.plan.Router``) does, from what the candidates declare.

- The first candidate that can run in this process (``Kernel.available``) and takes the weight
  (``Kernel.accepts``) is the layer's kernel: ours (C++ on CPU, Triton on CUDA) first, torch's (MKL / cuSPARSE /
  cuSPARSELt) after it. That is the one fallback mechanism: where our kernels cannot be built (no compiler) or
  are disabled (``SPARSE_OPS_NATIVE=0``), torch's kernel is the next candidate.
- Every available candidate that exploits the format (``Kernel.native``) is a path the plan times per batch:
  torch's is the path ``"<format>:torch"``, kept where it beats ours so that the default is never slower than
  torch's path.
- ``Kernel.grad``: the kernel's product has a backward (for the input and the bias). A call that needs a
  gradient goes to the first candidate that has one, else to ``DENSE_KERNEL`` (``kernel_for(grad=True)``).
- Every kernel's ``matmul`` has one signature, ``matmul(state, x (N, in), bias, activation=None, *, post=None,
  variant=...) -> (N, out)``: a kernel that cannot fuse the activation or post-op is wrapped (``unfused``) to
  apply them after the product with torch ops, so callers never branch on what a kernel can do. A kernel with
  ``variants`` runs the one it is given (``Kernel.pick``: the default where no plan chose one).

A new kernel backend is one module under ``kernels/`` (``prepare`` and ``matmul``) and its place in a tuple of
``KERNELS``.

Example:
    >>> [k.name for k in KERNELS[("csr", "cuda")]]
    ['cuda.csr', 'torch.cuda.csr']
    >>> [k.name for k in KERNELS[("csr", "cpu")]], kernel_for("csr", "cpu", grad=True).name
    (['cpu.csr', 'torch.cpu.csr'], 'torch.cpu.csr')
    >>> kernel_for("2:4", "mps")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sparse_ops.errors.UnsupportedError: no kernel for format '2:4' on device type 'mps'; supported: csr on cpu, ...
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_ops import activations
from sparse_ops.errors import UnsupportedError, UserValueError
from sparse_ops.kernels import cpp, ours_cpu, torch_cpu, torch_cuda, triton_sparse, triton_two_four
from sparse_ops.post import AddNorm
from sparse_ops.quantized import quantize_input

OURS, TORCH = "ours", "torch"


@dataclass(frozen=True)
class Kernel:
    """``prepare(weight) -> state`` once per layer and device; ``matmul(state, x, bias, activation=None, *,
    post=None, variant=...)`` per call (the module docstring).

    ``backend``: ``"ours"`` or ``"torch"``. ``native`` is False where the kernel does not exploit the format
    (torch's 2:4 on CPU runs dense or CSR): the plan and ``linear.candidate_formats`` skip it.
    ``grad``: the product has a backward (the module docstring).
    ``fuses``: the activation and the post-op (``sparse_ops.post.AddNorm``: residual add and LayerNorm on
    whole output rows) are applied inside the kernel's output writes, so fusing them is worth a module swap
    (``sparse_ops.fusion``). ``ffn``, where set, computes a whole feed-forward block in one call,
    ``ffn(up_state, down_state, x, up_bias, down_bias, activation, *, post=None, gate=None, gate_bias=None)``,
    or returns None where it does not apply (``sparse_ops.fusion.modules`` then runs the layers in turn).
    ``variants``, where set, names the kernel's own paths for n tokens (CSR's "plain" and "panels"), each
    planned as ``"<format>.<variant>"``, and ``pick(state, n)`` the one a call takes where no plan chose.
    ``available()`` says whether the kernel can run in this process, ``accepts(weight)`` whether it takes this
    weight (torch's CUDA 2:4: fp16 / bf16 only).
    """

    name: str
    prepare: Callable[[object], object]
    matmul: Callable[..., torch.Tensor]
    backend: str = OURS
    native: bool = True
    grad: bool = False
    fuses: bool = False
    ffn: Callable[..., torch.Tensor | None] | None = None
    variants: Callable[[int], tuple[str, ...]] | None = None
    pick: Callable[[object, int], str] | None = None
    available: Callable[[], bool] = lambda: True
    accepts: Callable[[object], bool] = lambda weight: True

    def default_variant(self, state: object, n: int) -> str:
        """The variant a call of n tokens takes where no plan chose one ("" for a kernel without variants)."""
        return self.pick(state, n) if self.pick is not None else ""


def unfused(matmul: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``matmul(state, x, bias)`` with the common signature: activation and post-op applied after it."""
    def call(state: object, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None, *,
             post: AddNorm | None = None, variant: str = "") -> torch.Tensor:
        if variant:
            raise UserValueError(f"this kernel has no variants, got {variant!r}")
        y = activations.apply(matmul(state, x, bias), activation)
        return y if post is None else post.apply(y)
    return call


def _prepare_dense(w: object) -> tuple[torch.Tensor, int | None]:
    return w.to_dense(), getattr(w, "input_bits", None)


def _dense_linear(state: tuple[torch.Tensor, int | None], x: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    weight, input_bits = state
    return F.linear(x if input_bits is None else quantize_input(x), weight, bias)


# F.linear on the weight decompressed (an int8 weight dequantized) once at prepare, the input quantized as an int8
# weight's input_bits say: the plan's "dense" path, the kernel of an int8 weight where none of ours runs it (no
# speed or memory gain: dense-int8 on the GPU, and our kernels' fallback), and the backward of last resort.
DENSE_KERNEL = Kernel("torch.dense", _prepare_dense, unfused(_dense_linear), backend=TORCH, native=False, grad=True)
TORCH_CPU_CSR = Kernel("torch.cpu.csr", torch_cpu.prepare_csr, unfused(torch_cpu.csr_matmul), backend=TORCH,
                       grad=True)

KERNELS: dict[tuple[str, str], tuple[Kernel, ...]] = {
    ("csr", "cpu"): (
        Kernel("cpu.csr", ours_cpu.prepare_csr, ours_cpu.csr_matmul, fuses=True, ffn=ours_cpu.ffn_matmul,
               variants=ours_cpu.csr_variants, pick=ours_cpu.pick_csr, available=cpp.available),
        TORCH_CPU_CSR),
    ("2:4", "cpu"): (
        Kernel("cpu.2:4", ours_cpu.prepare_two_four, ours_cpu.two_four_matmul, fuses=True,
               available=cpp.available),
        Kernel("torch.cpu.2:4", torch_cpu.prepare_two_four, unfused(torch_cpu.two_four_matmul), backend=TORCH,
               native=False, grad=True)),
    ("dense-int8", "cpu"): (Kernel("cpu.dense-int8", ours_cpu.prepare_dense_int8, ours_cpu.dense_int8_matmul,
                                   fuses=True, available=cpp.available), DENSE_KERNEL),
    # the sparse int8 layouts: CSR's variants ("panels": a panelled int8 copy built at the first batch that takes
    # it) and its fused feed-forward block
    **{(fmt, "cpu"): (Kernel(f"cpu.{fmt}", prepare, ours_cpu.int8_matmul, fuses=True, ffn=ours_cpu.ffn_matmul,
                             variants=ours_cpu.int8_variants, pick=ours_cpu.pick_csr, available=cpp.available),
                      DENSE_KERNEL)
       for fmt, prepare in (("csr-int8", ours_cpu.prepare_csr_int8),
                            ("bitmap-int8", ours_cpu.prepare_bitmap_int8))},
    # the sparse int8 layouts on the GPU: the tiled-bitmap kernel on int8 tiles, dequantized in registers
    **{(fmt, "cuda"): (Kernel(f"cuda.{fmt}", triton_sparse.prepare_int8, triton_sparse.matmul,
                              variants=triton_sparse.variants, pick=triton_sparse.pick,
                              available=triton_sparse.available), DENSE_KERNEL)
       for fmt in ("csr-int8", "bitmap-int8")},
    ("dense-int8", "cuda"): (DENSE_KERNEL,),
    ("csr", "cuda"): (
        Kernel("cuda.csr", triton_sparse.prepare, triton_sparse.matmul, variants=triton_sparse.variants,
               pick=triton_sparse.pick, available=triton_sparse.available),
        Kernel("torch.cuda.csr", torch_cuda.prepare_csr, unfused(torch_cuda.csr_matmul), backend=TORCH,
               grad=True)),
    ("2:4", "cuda"): (
        Kernel("cuda.2:4", triton_two_four.prepare, triton_two_four.matmul, variants=triton_two_four.variants,
               pick=triton_two_four.pick, available=triton_two_four.available),
        Kernel("torch.cuda.2:4", torch_cuda.prepare_two_four, unfused(torch_cuda.two_four_matmul), backend=TORCH,
               accepts=torch_cuda.accepts_two_four)),
}


def supported() -> str:
    """'csr on cpu, 2:4 on cpu, ...': the pairs in ``KERNELS``."""
    return ", ".join(f"{f} on {d}" for f, d in KERNELS)


def candidates(format: str, device: torch.device | str) -> list[Kernel]:
    """The kernels that can run a format on a device in this process, in order of preference; NotImplementedError
    listing the supported pairs where the registry has none."""
    device_type = torch.device(device).type
    try:
        listed = KERNELS[(format, device_type)]
    except KeyError:
        raise UnsupportedError(f"no kernel for format {format!r} on device type {device_type!r}; "
                                  f"supported: {supported()}") from None
    return [k for k in listed if k.available()]


def kernel_for(format: str, device: torch.device | str, *, torch_kernel: bool = False,
               weight: object = None, grad: bool = False) -> Kernel:
    """The first available candidate for a format on a device (with ``weight``: the first that accepts it, if
    any does); ``torch_kernel``: the first of torch's; ``grad``: the first with a backward, else
    ``DENSE_KERNEL``."""
    found = candidates(format, device)
    if weight is not None:
        found = [k for k in found if k.accepts(weight)] or found
    if grad:
        return next((k for k in found if k.grad), DENSE_KERNEL)
    if torch_kernel:
        found = [k for k in found if k.backend == TORCH] or found
    return found[0]


def torch_path_kernel(format: str, device: torch.device | str, weight: object = None) -> Kernel | None:
    """The kernel of the path ``"<format>:torch"``: torch's native candidate where ours is also available
    (else torch's kernel already is the layer's kernel, or there is none); with ``weight``, one that accepts it."""
    found = candidates(format, device)
    theirs = [k for k in found if k.backend == TORCH and k.native and (weight is None or k.accepts(weight))]
    return theirs[0] if theirs and found[0].backend == OURS else None


def ours_for(format: str, device: torch.device | str) -> Kernel | None:
    """Our first available kernel for a format on a device, if any."""
    return next((k for k in candidates(format, device) if k.backend == OURS), None)
