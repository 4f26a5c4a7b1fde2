"""Our CPU kernels (C++, ``sparse_ops/csrc/sparse_cpu.cpp``) for ``y = x @ W^T + b``: CSR and 2:4 in fp32/bf16, and
the int8 layouts (dense, CSR, bitmap; weight-only: int8 widened to fp32 in registers, a scale per row).

``prepare`` validates the weight (the C++ code trusts its indices) and keeps its parts as they are stored:
int16 column indices when ``in <= 32767`` (6 B per nonzero with fp32 values, 4 B with bf16), and for 2:4 the
values plus 2-bit codes. fp16 values are widened to fp32 once at prepare (no fp16 path in the C++ code).
The large-batch kernel reads a panelled copy of a CSR weight (``panel_parts``: row blocks x 256-column panels,
1-byte column offsets, about 5 B per nonzero plus 4 B per (row, panel)), built the first time a batch goes to
it: from then on the layer holds its weight twice; a layer only ever run at batch 1 keeps one copy.
Paths by batch n (``use_panels``): n == 1, a gathered gemv on the plain CSR; batches the table of
``use_panels`` gives to the panelled kernel, x packed into token tiles so that one panel of x stays in cache;
others, the plain-CSR kernel with x transposed into a zero-padded (in, ld) panel so that each nonzero
multiplies a contiguous run of tokens. The C++ code packs x itself, inside the same OpenMP parallel region as
the multiply; each call is one ctypes call with the weight's pointers bound at ``prepare`` (a few microseconds
of Python per layer). All run on torch's OpenMP pool with torch's thread count; outputs are cast back to the
weight's dtype. An activation (``sparse_ops.activations``) can be fused into the output writes. Inference
only: when a gradient is needed the layer's router takes a kernel that has a backward (``dispatch.Kernel.grad``).

Example:
    >>> import torch
    >>> from sparse_ops.formats import CSR
    >>> w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, -1.0]])
    >>> if cpp.available():
    ...     y = csr_matmul(prepare_csr(CSR.from_dense(w)), torch.tensor([[1.0, 10.0, 100.0]]), None)
    ... else:
    ...     y = torch.tensor([[20.0, -99.0]])
    >>> y.tolist()
    [[20.0, -99.0]]
"""
from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparse_ops.activations import CODES
from sparse_ops.errors import UnavailableError, UserValueError
from sparse_ops.formats import CSR, TwoFour
from sparse_ops.kernels import cpp, needs_grad, torch_cpu
from sparse_ops.post import AddNorm
from sparse_ops.quantized import BitmapInt8, CSRInt8, DenseInt8, Int8CSR, Int8Weight, quantize_input

VALUE_CODE = {torch.float32: "f32", torch.bfloat16: "bf16"}  # value dtypes the C++ code reads
INDEX_CODE = {torch.int16: "i16", torch.int32: "i32"}
# Panelled CSR (batches chosen by use_panels): rows in blocks of PANEL_ROWS, columns in panels of PANEL_WIDTH
# (<= 256: 1-byte column offsets), tokens in tiles of 16, 32 or PANEL_TILE (the smallest that holds the batch).
# Measured on the 2-core EPYC (Zen 4: 32 KiB L1d, 1 MiB L2 per core) in paired, interleaved A/B runs of the
# kernel alone, on BERT shapes (1536x384, 384x1536, 384x384) and 4096x4096 at 90%, 2 threads:
#   256-column panels against 128: +16-41% at 16-32 tokens (a row's segment in a panel is twice as long, so
#   the per-(row, panel) cost of loading and storing its sums is spread wider), -2-11% at 64-token tiles (a
#   256 x 64 panel of x is 64 KiB: it lives in L2 rather than L1). Visiting two or four 128-column panels per
#   row instead lost 30-50% at 16-32 tokens. A second accumulator set per row (S = 2) changed nothing.
# Which batches go to the panelled kernel (its speed / the plain-CSR kernel's, batches 2-8 | 16 | 32 | 64-256):
#   4096x4096,   sparsity 0.5-0.7: 1.4-1.75 | 1.35-1.9 | 1.3-1.6 | 1.2-1.4
#                sparsity 0.9:     0.73-0.78 | 0.88 | 1.09 | 1.22-1.36      0.95: 0.51 | 0.59 | 0.92 | 1.10-1.16
#                sparsity 0.99:    0.21 | 0.34 | 0.46 | 0.61-0.85
#   BERT shapes, sparsity 0.5-0.7: 0.81-1.15 | 1.01-1.43 | 1.08-1.43 | 1.18-1.41 (384 inputs: x of 2-8 tokens
#                sparsity 0.9-0.95: 0.76-0.87 | 0.94-1.05 | 1.04-1.20 | 1.03-1.24     fits L1 for the plain kernel)
#                sparsity 0.99:    0.69-0.81 | 0.88-0.96 | 0.94-1.10 | 0.85-1.01
PANEL_MIN_DENSITY = 0.015  # sparser: always the plain kernel
PANEL_DENSE = 0.25  # this dense: panels from 16 tokens, or from 2 when in_features >= PANEL_WIDE_INPUT
PANEL_WIDE_INPUT = 1024
PANEL_SPARSE = 0.08  # between PANEL_MIN_DENSITY and PANEL_DENSE: panels from 32 tokens, from 64 below this
PANEL_ROWS = 64
PANEL_WIDTH = 256
PANEL_TILE = 64
assert PANEL_WIDTH <= 256 and PANEL_ROWS * PANEL_TILE <= 64 * 64  # uint8 offsets; the C++ per-thread sums buffer


@dataclass
class NativeWeight:
    """A weight ready for the C++ kernels: ``call(x_ptr, n, bias_ptr, y_ptr, threads)`` with its parts bound;
    CSR's panelled copy and ``panel_call`` are added by ``panelled`` at the first batch that needs them."""

    source: CSR | TwoFour | Int8Weight | torch.Tensor  # validated container, or a dense weight (kept for the
    # autograd fallback and the tensors' lifetime)
    tensors: tuple[torch.Tensor, ...]  # contiguous parts the bound pointers point into (kept alive here)
    call: Callable[..., None]  # (x_ptr, n, bias_ptr, y_ptr, threads, activation code)
    out_dtype: torch.dtype
    density: float = 1.0  # nonzeros / (out * in)
    nnz: int = 0  # stored values (2:4: out * in / 2)
    value_code: str = "f32"  # the C++ value type: f32, bf16 or i8
    panels: tuple[torch.Tensor, ...] = ()  # CSR only: (seg, lcol, values) of panel_parts, for large batches
    panel_call: Callable[..., None] | None = None  # (x_ptr, tile, n, bias_ptr, y_ptr, threads, act code)
    scales: torch.Tensor | None = None  # int8 weights: the (out,) fp32 row scales every entry reads
    # ffn_matmul's (down weight, gate weight or None, bound entry), on the up weight
    ffn_call: tuple[NativeWeight, NativeWeight | None, Callable[..., None]] | None = None
    masked: NativeWeight | None = None  # CSR only: the column-mask copy (``masked``), for the "mask" variant
    layout: str = ""  # the C++ entry point ``call`` binds (its layout: sparse_cpu.cpp's LINEAR_NAMES)
    extra: int = 0  # the int8 entries' flags after the sizes (cpp.LINEAR_FLAGS)


def post_args(post: AddNorm, n: int, out: int) -> tuple[tuple[object, ...], tuple[torch.Tensor | None, ...]]:
    """The C++ post arguments of ``post`` (kind, residual, gamma, beta, eps) and the fp32 tensors they point
    into (kept alive by the caller for the call)."""
    if post.residual.shape != (n, out):
        raise UserValueError(f"residual must have shape ({n}, {out}), got {tuple(post.residual.shape)}")
    parts = (_fp32(post.residual), *(_fp32(t) if post.norm else None for t in (post.weight, post.bias)))
    for t in parts[1:]:
        if t is not None and t.shape != (out,):
            raise UserValueError(f"the norm's weight and bias must have shape ({out},), got {tuple(t.shape)}")
    kind = cpp.POST_KINDS["add_norm" if post.norm else "add"]
    return (kind, *(None if t is None else t.data_ptr() for t in parts), float(post.eps)), parts


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as a contiguous fp32 tensor, converted only where needed (each torch call costs ~1 us)."""
    return t if t is None or (t.dtype == torch.float32 and t.is_contiguous()) else t.float().contiguous()


def _entry(name: str, *bound: object) -> Callable[..., None]:
    """The C++ entry ``name`` with its leading arguments (weight pointers, sizes) bound."""
    lib = cpp.library()
    if lib is None:
        raise UnavailableError("the native CPU kernels are unavailable in this process (see the log)")
    args = (t.data_ptr() if isinstance(t, torch.Tensor) else t for t in bound)
    return functools.partial(getattr(lib, name), *args)


def _values(values: torch.Tensor) -> torch.Tensor:
    """Values as the C++ code reads them: fp32 as is, bf16 as its 16-bit pattern, fp16 widened to fp32."""
    if values.dtype == torch.float16:
        torch_cpu.log_once("native CPU kernels have no float16 path: float16 weights are widened to float32 at load")
        return values.float().contiguous()
    v = values.contiguous()
    return v.view(torch.int16) if v.dtype == torch.bfloat16 else v


def _value_code(values: torch.Tensor) -> str:
    return VALUE_CODE[torch.float32 if values.dtype == torch.float16 else values.dtype]


def _check_cpu(w: CSR | TwoFour) -> None:
    if w.device.type != "cpu":
        raise UserValueError(f"native CPU kernels need a CPU weight, got device {w.device}")


def prepare_csr(w: CSR) -> NativeWeight:
    """Validate (indices reach native code) and keep the parts contiguous; no panelled copy yet."""
    _check_cpu(w)
    w.validate()
    out, inp = w.shape
    parts = (w.crow_indices.contiguous(), w.col_indices.contiguous(), _values(w.values))
    code = _value_code(w.values)
    layout = f"csr_{code}_{INDEX_CODE[w.col_indices.dtype]}"
    return NativeWeight(w, parts, _entry(layout, *parts, out, inp), w.dtype, w.values.numel() / max(1, out * inp),
                        w.values.numel(), code, layout=layout)


_PANEL_LOCK = threading.Lock()


def panelled(w: NativeWeight) -> Callable[..., None]:
    """``w.panel_call``, building the panelled copy of a prepared CSR (or sparse int8) weight on first use (once,
    even when several threads run the layer: a second copy would free the first while a call still reads it)."""
    if w.panel_call is None:
        with _PANEL_LOCK:
            if w.panel_call is None:
                out, inp = w.source.shape
                w.panels = panel_parts(*_csr_parts(w), w.source.shape, PANEL_ROWS, PANEL_WIDTH)  # alive before bound
                w.panel_call = _entry(f"csr_panels_{w.value_code}", *_panel_args(w), out, inp, PANEL_ROWS,
                                      PANEL_WIDTH)
    return w.panel_call


def masked(w: NativeWeight) -> NativeWeight:
    """The column-mask copy of a prepared CSR weight (``csr_mask_*``: its row pointers and values, a bit per column
    in place of the column indices; see sparse_cpu.cpp), built on first use and kept: the one-token variant
    "mask", which reads no column indices and gathers nothing.

    >>> w = prepare_csr(CSR.from_dense(torch.tensor([[0.0, 2.0, 0.0, 3.0], [1.0, 0.0, 0.0, 0.0]])))
    >>> masked(w).tensors[1].tolist(), masked(w).layout
    ([[10], [1]], 'csr_mask_f32')
    """
    if w.masked is None:
        with _PANEL_LOCK:
            if w.masked is None:
                crow, col, values = w.tensors
                out, inp = w.source.shape
                parts = (crow, column_mask(crow, col, out, inp), values)
                layout = f"csr_mask_{w.value_code}"
                w.masked = NativeWeight(w.source, parts, _entry(layout, *parts, out, inp), w.out_dtype, w.density,
                                        w.nnz, w.value_code, layout=layout)
    return w.masked


def column_mask(crow: torch.Tensor, col: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    """(out, ceil(inp / 8)) uint8: bit c % 8 of byte c // 8 of row r set where a CSR stores (r, c)."""
    nbytes = (inp + 7) // 8
    rows = torch.repeat_interleave(torch.arange(out), (crow[1:] - crow[:-1]).to(torch.int64))
    c = col.to(torch.int64)
    mask = torch.zeros(out * nbytes, dtype=torch.int64)
    mask.index_add_(0, rows * nbytes + c // 8, torch.ones_like(c) << (c % 8))  # distinct bits: the sum is the OR
    return mask.to(torch.uint8).view(out, nbytes)


def _csr_parts(w: NativeWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, col, values) of a prepared CSR, csr-int8 or bitmap-int8 weight (the bitmap's through dense int8)."""
    if isinstance(w.source, BitmapInt8):
        q = Int8CSR.from_dense(w.source.q.to_dense())
        return q.crow_indices, q.col_indices, q.values
    return w.tensors[0], w.tensors[1], w.tensors[2]


def _panel_args(w: NativeWeight) -> tuple[torch.Tensor, ...]:
    """The panelled copy's parts as the entries take them: (seg, lcol, values[, scales])."""
    return (*w.panels, *(() if w.scales is None else (w.scales,)))


def use_panels(n: int, density: float, in_features: int) -> bool:
    """Whether n tokens go to the panelled kernel (else the gemv at n == 1, the plain-CSR kernels above it).

    >>> use_panels(1, 0.5, 4096), use_panels(8, 0.3, 4096), use_panels(8, 0.3, 384), use_panels(16, 0.3, 384)
    (False, True, False, True)
    >>> use_panels(16, 0.1, 4096), use_panels(32, 0.1, 4096), use_panels(32, 0.05, 4096), use_panels(256, 0.01, 4096)
    (False, True, False, False)
    """
    if n < 2 or density < PANEL_MIN_DENSITY:
        return False
    if density >= PANEL_DENSE:
        return n >= 16 or in_features >= PANEL_WIDE_INPUT
    return n >= (32 if density >= PANEL_SPARSE else 64)


def panel_parts(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                rows: int = PANEL_ROWS, width: int = PANEL_WIDTH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The panelled copy of a validated CSR weight: (seg int32, lcol uint8, values), see ``sparse_cpu.cpp``.

    Nonzeros are reordered by (row block, column panel, row): key q = (b * npanels + p) * rows + i for row
    b * rows + i and panel p = col // width; seg[q] .. seg[q + 1] are key q's nonzeros, lcol their column - p *
    width (< width <= 256, so one byte). Column order within a row is kept.

    >>> crow, col = torch.tensor([0, 2, 3]), torch.tensor([1, 5, 1], dtype=torch.int16)  # W[0,1], W[0,5], W[1,1]
    >>> seg, lcol, vals = panel_parts(crow, col, torch.tensor([1.0, 2.0, 3.0]), (2, 6), rows=2, width=4)
    >>> seg.tolist(), lcol.tolist(), vals.tolist()  # keys q: (row 0, panel 0), (1, 0), (0, 1), (1, 1)
    ([0, 1, 2, 3, 3], [1, 1, 1], [1.0, 3.0, 2.0])
    """
    out, inp = shape
    npanels, nblocks = -(-inp // width), -(-out // rows)
    counts = (crow[1:] - crow[:-1]).to(torch.int64)  # (out,) nonzeros per row
    r = torch.repeat_interleave(torch.arange(out), counts)  # (nnz,) row of each nonzero
    c = col.to(torch.int64)
    p = torch.div(c, width, rounding_mode="floor")
    key = (torch.div(r, rows, rounding_mode="floor") * npanels + p) * rows + r % rows  # (nnz,)
    order = torch.argsort(key, stable=True)
    seg = torch.zeros(nblocks * npanels * rows + 1, dtype=torch.int64)
    seg[1:] = torch.cumsum(torch.bincount(key, minlength=nblocks * npanels * rows), 0)
    return seg.to(torch.int32), (c - p * width)[order].to(torch.uint8), values[order].contiguous()


def prepare_two_four(w: TwoFour) -> NativeWeight:
    _check_cpu(w)
    w.validate()
    parts = (_values(w.values), w.metadata.contiguous())
    code = _value_code(w.values)
    return NativeWeight(w, parts, _entry(f"two_four_{code}", *parts, *w.shape), w.dtype, nnz=w.values.numel(),
                        value_code=code, layout=f"two_four_{code}")


def prepare_dense(w: torch.Tensor) -> NativeWeight:
    """A dense (out, in) fp32 or bf16 weight for our dense kernel (fp16 widened to fp32): the decoder step's dense
    layers (``sparse_ops.decode``), where torch's kernels cannot be called.

    >>> w = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    >>> (dense_matmul(prepare_dense(w), torch.tensor([[3.0, 4.0]]), None).tolist() if cpp.available()
    ...  else [[11.0, -4.0]])
    [[11.0, -4.0]]
    """
    if w.dim() != 2 or w.device.type != "cpu":
        raise UserValueError(f"a dense CPU weight (out, in) is needed, got shape {tuple(w.shape)} on {w.device}")
    values = _values(w.detach())
    code = _value_code(w)
    return NativeWeight(w, (values,), _entry(f"dense_{code}", values, *w.shape), w.dtype, nnz=w.numel(),
                        value_code=code, layout=f"dense_{code}")


def dense_matmul(w: NativeWeight, x: torch.Tensor, bias: torch.Tensor | None,
                 activation: str | None = None) -> torch.Tensor:
    """x: (N, in) -> activation(x W^T + bias) (N, out) for a ``prepare_dense`` weight, on our dense kernel."""
    return _matmul(w, x, bias, False, CODES[activation], None)


# ---- int8 weights (sparse_ops.quantized): int8 values widened to fp32 in registers, or with input_bits=8 int8
# times int8 at one token ------------------------------------------------------------------------------------
# One token on a bitmap-int8 weight: each bitmap word is expanded to dense lanes (pdep, on x86 builds with BMI2)
# at densities from BITMAP_EXPAND_DENSITY, else walked bit by bit (sparser rows have few bits per word).
BITMAP_EXPAND_DENSITY = 0.1


def _int8(w: Int8Weight, entry: str, parts: tuple[torch.Tensor, ...], flags: int = 0) -> NativeWeight:
    """A validated int8 weight bound to ``entry``: its layout's parts, the fp32 scales, the shape, then the flags
    (``cpp.LINEAR_FLAGS``: the bitmap's ``flags``, and int8 inputs from ``w.input_bits``)."""
    tensors = (*(t.contiguous() for t in parts), _fp32(w.scales))
    out, inp = w.shape
    nnz = w.values.numel()
    flags |= cpp.LINEAR_FLAGS["int8_input"] if w.input_bits == 8 else 0
    return NativeWeight(w, tensors, _entry(entry, *tensors, out, inp, flags), w.dtype, nnz / max(1, out * inp), nnz,
                        "i8", scales=tensors[-1], layout=entry, extra=flags)


def prepare_dense_int8(w: DenseInt8) -> NativeWeight:
    _check_cpu(w)
    return _int8(w.validate(), "dense_i8", (w.values,))


def prepare_csr_int8(w: CSRInt8) -> NativeWeight:
    _check_cpu(w)
    q = w.validate().q
    return _int8(w, f"csr_i8_{INDEX_CODE[q.col_indices.dtype]}", (q.crow_indices, q.col_indices, q.values))


def prepare_bitmap_int8(w: BitmapInt8) -> NativeWeight:
    _check_cpu(w)
    q = w.validate().q
    expand = q.nnz >= BITMAP_EXPAND_DENSITY * w.shape[0] * w.shape[1]
    return _int8(w, "bitmap_i8", (q.tile_ptr, q.tile_cols, q.value_offsets, q.bitmaps, q.values),
                 cpp.LINEAR_FLAGS["bitmap_expand"] if expand else 0)


def int8_matmul(w: NativeWeight, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None,
                post: AddNorm | None = None, variant: str = "plain") -> torch.Tensor:
    """x: (N, in) -> post(activation(x W^T + bias)) (N, out) in the weight's dtype for a sparse int8 layout,
    W = scales * q, x quantized per block first where the weight's ``input_bits`` says so. ``variant``: one of
    ``int8_variants(N)`` (the panelled copy as CSR's; ``pick_csr`` gives the default)."""
    panels = _is_panels(variant, x.shape[0], int8_variants(x.shape[0]))
    if panels and w.source.input_bits is not None:  # the panelled kernel takes fp32 inputs: the int8 copy here
        x = quantize_input(x)
    return _matmul(w, x, bias, panels, CODES[activation], post)


def dense_int8_matmul(w: NativeWeight, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None,
                      post: AddNorm | None = None, variant: str = "") -> torch.Tensor:
    """``int8_matmul`` for dense-int8 (no variants): the kernel quantizes x itself where ``input_bits`` says so."""
    if variant:
        raise UserValueError(f"the dense-int8 kernel has no variants, got {variant!r}")
    return _matmul(w, x, bias, False, CODES[activation], post)


def _is_panels(variant: str, n: int, allowed: tuple[str, ...]) -> bool:
    """Whether ``variant`` (one of ``allowed`` for n tokens) is the panelled kernel; ValueError naming those."""
    if variant not in allowed:
        raise UserValueError(f"unknown kernel variant {variant!r} for {n} tokens; allowed: {', '.join(allowed)}")
    return variant == "panels"


def pick_csr(w: NativeWeight, n: int) -> str:
    """The variant a call of n tokens takes where no plan chose one: ``use_panels``' rule by batch and density.

    >>> from sparse_ops.formats import CSR
    >>> w = prepare_csr(CSR.from_dense(torch.eye(64))) if cpp.available() else None
    >>> [pick_csr(w, n) for n in (1, 256)] if w is not None else ['plain', 'panels']
    ['plain', 'panels']
    """
    return "panels" if use_panels(n, w.density, w.source.shape[1]) else "plain"


# Below this much work (stored values x tokens) a plain-kernel call runs on one thread: waking the other
# threads and the barrier cost more than they save. Measured on the 2-core EPYC (768x768 and 3072x768 weights):
# batch 1 at 5.8k: one thread 9% faster, at 29k: 12% slower; batch 8 at 47k: 27% faster, at 470k: 35% slower.
SINGLE_THREAD_WORK = {True: 16_000, False: 64_000}  # {batch 1 (gemv): ..., larger batches: ...}


def threads_for(work: int, n: int) -> int:
    """Threads for a plain-kernel call of ``work`` stored values x tokens on n tokens.

    >>> threads_for(5_000, 1), threads_for(47_000, 8)
    (1, 1)
    """
    return 1 if work < SINGLE_THREAD_WORK[n == 1] else cpp.num_threads()


def panel_tile(n: int) -> int:
    """Tokens per tile of the panelled kernel: the smallest of 16, 32 and PANEL_TILE holding n, else PANEL_TILE.

    >>> [panel_tile(n) for n in (2, 16, 17, 64, 1000)]
    [16, 16, 32, 64, 64]
    """
    return 16 if n <= 16 else 32 if n <= 32 else PANEL_TILE


def _matmul(w: NativeWeight, x: torch.Tensor, bias: torch.Tensor | None, panels: bool, act: int,
            post: AddNorm | None) -> torch.Tensor:
    """One C++ call: x (N, in) -> post(act(x W^T + bias)) (N, out) in the weight's dtype. The C++ code has no
    backward: the router sends calls that need a gradient to a kernel that has one (``dispatch.Kernel.grad``)."""
    if needs_grad(x, bias):
        raise UserValueError("our CPU kernels have no backward; call the layer (SparseLinear), whose router "
                             "takes a kernel with one when a gradient is needed")
    n, out = x.shape[0], w.source.shape[0]
    y = torch.empty(n, out, dtype=torch.float32)
    if n and out:  # conversions only where needed: each torch call costs ~2 us, a BERT forward makes 36 of these
        x, bias = _fp32(x), _fp32(bias)
        bp = None if bias is None else bias.data_ptr()
        post_c, _alive = post_args(post, n, out) if post is not None else (cpp.NO_POST, ())
        if panels:
            panelled(w)(x.data_ptr(), panel_tile(n), n, bp, y.data_ptr(), cpp.num_threads(), act, *post_c)
        else:
            w.call(x.data_ptr(), n, bp, y.data_ptr(), threads_for(w.nnz * n, n), act, *post_c)
    return y if w.out_dtype == torch.float32 else y.to(w.out_dtype)


# Fewest tokens for the fused feed-forward kernel (ffn_matmul); fewer go to the two layers' own kernels.
FFN_MIN_TOKENS = 16


def ffn_matmul(up: NativeWeight, down: NativeWeight, x: torch.Tensor, up_bias: torch.Tensor | None,
               down_bias: torch.Tensor | None, activation: str | None = None, post: AddNorm | None = None,
               gate: NativeWeight | None = None, gate_bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x: (N, in) -> post(activation(x U^T + up_bias) D^T + down_bias) (N, out) in one C++ call (``run_ffn``: the
    hidden activations stay in the packed layout D's kernel reads); with a ``gate`` G, the hidden activations
    are activation(x G^T + gate_bias) * (x U^T + up_bias) (LLaMA's MLP). None where that does not apply and the
    caller runs the layers: a gradient is needed, fewer than ``FFN_MIN_TOKENS`` tokens, a weight too sparse for
    the panelled kernel, or different value types or dtypes. U, G (hidden, in) and D (out, hidden) are CSR."""
    n, weights = x.shape[0], (up, down) if gate is None else (gate, up, down)
    if n < FFN_MIN_TOKENS or needs_grad(x, up_bias, down_bias, gate_bias) \
            or min(w.density for w in weights) < PANEL_MIN_DENSITY or len({w.value_code for w in weights}) > 1 \
            or len({w.out_dtype for w in weights}) > 1 \
            or not all(isinstance(w.source, (CSR, CSRInt8, BitmapInt8)) for w in weights) \
            or any(getattr(w.source, "input_bits", None) for w in weights):  # int8 inputs: each layer's own
        return None
    (hidden, inp), out = up.source.shape, down.source.shape[0]
    if down.source.shape[1] != hidden:
        raise UserValueError(f"the down weight takes {down.source.shape[1]} inputs, the up weight gives {hidden}")
    if gate is not None and gate.source.shape != up.source.shape:
        raise UserValueError(f"the gate weight is {tuple(gate.source.shape)}, the up weight {(hidden, inp)}")
    x, bg, bu, bd = (_fp32(t) for t in (x, gate_bias, up_bias, down_bias))
    call = up.ffn_call
    if call is None or call[0] is not down or call[1] is not gate:  # bind once per set (a few us per call else)
        for w in weights:
            panelled(w)  # the panelled copies, built on first use
        gate_parts = _panel_args(gate) if gate is not None else (None,) * len(_panel_args(up))
        up.ffn_call = (down, gate, _entry(f"csr_ffn_{up.value_code}", *gate_parts, *_panel_args(up),
                                          *_panel_args(down), inp, hidden, out, PANEL_ROWS, PANEL_WIDTH))
    y = torch.empty(n, out, dtype=torch.float32)
    post_c, _alive = post_args(post, n, out) if post is not None else (cpp.NO_POST, ())
    up.ffn_call[2](x.data_ptr(), panel_tile(n), n, *(None if t is None else t.data_ptr() for t in (bg, bu, bd)),
                   y.data_ptr(), cpp.num_threads(), CODES[activation], *post_c)
    return y if up.out_dtype == torch.float32 else y.to(up.out_dtype)


def csr_variants(n: int) -> tuple[str, ...]:
    """The CSR kernels that can run n tokens: "plain" (the gemv at n == 1), at one token "mask" (``masked``), from
    2 tokens "panels".

    >>> csr_variants(1), csr_variants(8)
    (('plain', 'mask'), ('plain', 'panels'))
    """
    return ("plain", "mask") if n < 2 else ("plain", "panels")


def int8_variants(n: int) -> tuple[str, ...]:
    """The sparse int8 kernels that can run n tokens: "plain" and, from 2 tokens, "panels" (CSR's panelled kernel
    on an int8 copy).

    >>> int8_variants(1), int8_variants(8)
    (('plain',), ('plain', 'panels'))
    """
    return ("plain",) if n < 2 else ("plain", "panels")


# Most token-expert pairs per expert (on average) for moe_forward: beyond, each expert's product is a GEMM that
# MKL runs faster than our loops (they read the weights once per token tile but do not block for compute),
# unless the experts are small (D * H <= MOE_SMALL_EXPERT), where the torch loop's per-expert overhead
# dominates. Paired runs, 8 experts top-2, 2 threads, AMD EPYC Zen 4, avx512 build: 768 x 1536 experts, kernel / loop speed 1.28x,
# 1.10x, 1.03x, 0.62x at 16, 32, 64, 256 pairs per expert; 128 x 256 experts 3.4x, 2.7x, 2.0x, 1.26x.
MOE_MAX_TOKENS_PER_EXPERT = 64
MOE_SMALL_EXPERT = 1 << 17


def moe_forward(logits: torch.Tensor, x: torch.Tensor, top_k: int, capacity: int | None, w_in: torch.Tensor,
                b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None, activation: str,
                w_gate: torch.Tensor | None = None,
                b_gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A Mixture-of-Experts layer after its router's matmul, in one C++ call: logits (T, E), x (T, D) ->
    (y (T, D), routed (E,) int64 assignments per expert before capacity). Routing as ``layers.moe.route``
    (softmax, top-k, renormalised), dispatch as ``plan_dispatch`` (sorted by expert, later tokens dropped beyond
    ``capacity``), each expert ``act(x W_in^T + b_in) W_out^T + b_out`` (gated: ``act(x W_gate^T + b_gate) *
    (x W_in^T + b_in)`` inside) with w_in, w_gate (E, H, D), w_out (E, D, H). None where it does not apply
    (the layer runs its torch path): no native kernels, not fp32 on the CPU, a gradient needed, or more than
    ``MOE_MAX_TOKENS_PER_EXPERT`` assignments per expert on average for experts larger than
    ``MOE_SMALL_EXPERT``."""
    weights = [t for t in (w_in, b_in, w_out, b_out, w_gate, b_gate) if t is not None]
    (T, D), (E, H, _) = x.shape, w_in.shape
    lib = cpp.library()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or T == 0 \
            or (T * top_k > MOE_MAX_TOKENS_PER_EXPERT * E and D * H > MOE_SMALL_EXPERT) \
            or any(t.dtype != torch.float32 for t in weights) \
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (x, logits, *weights))):
        return None
    x, logits = x.contiguous(), logits.float().contiguous()
    parts = [None if t is None else t.detach().contiguous() for t in (w_in, b_in, w_gate, b_gate, w_out, b_out)]
    y, routed = torch.empty_like(x), torch.empty(E, dtype=torch.int64)
    lib.moe_forward_f32(logits.data_ptr(), x.data_ptr(), T, top_k, -1 if capacity is None else capacity,
                        *(None if t is None else t.data_ptr() for t in parts), E, D, H, y.data_ptr(),
                        routed.data_ptr(), cpp.num_threads(), CODES[activation])
    return y, routed


# Most keys attention() takes (beyond, the caller runs torch's SDPA): a query block's scores are held whole (32 x L
# floats per thread), not streamed as in flash attention, so long sequences lose. benchmarks/attention.py, 2
# threads, AMD EPYC Zen 4, ours / torch 2.14 SDPA at the same ISA (ATEN_CPU_CAPABILITY), heads of 32-128, batch
# 1-8: avx512 build 1.4-2.5x at 64-128 keys, 1.4-2.1x at 256-512, 1.2-1.5x at 1024; avx2 build 1.3-1.9x at 64-128
# keys, 1.0-1.6x at 256-512, 0.87-1.2x at 1024 (results/attention/).
ATTENTION_MAX_KEYS = 512
# Fewest multiply-adds per product (B H S L D) worth the call: below, the ~15 us of Python and ctypes are about
# SDPA's whole time (same runs: 0.87-1.4x at 8-32K, 1.4-2.2x from 64K).
ATTENTION_MIN_WORK = 1 << 16


# Below this many multiply-adds (2 B H S L D) an attention call runs on one thread. Measured on the 2-core EPYC
# Zen 3 (avx2 build): 1 and 2 threads level at 150k-200k (SmolLM2's decode step at 128 keys, 12 heads of 32 at
# 16 queries), 2 threads 1.3x faster at 590k.
ATTENTION_SINGLE_THREAD_WORK = 200_000


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False) -> torch.Tensor | None:
    """``softmax(q k^T * scale + mask) v`` in one C++ call over every batch and head: q (B, H, S, D), k and v
    (B, Hk, L, D) with H a multiple of Hk (grouped-query: head h reads key head h // (H // Hk)), fp32, any
    strides with a contiguous last dimension. ``mask`` broadcasts to (B, H, S, L): additive (float) or which
    keys to attend to (bool); ``causal``: query i sees keys j <= i + L - S. ``scale`` defaults to D ** -0.5.
    Returns (B, S, H, D), the layout of the output projection's input (``.transpose(1, 2)`` of SDPA's output); a
    query that sees no key gets zeros (SDPA: NaN). None where it does not apply or does not pay (the caller runs
    SDPA): no native kernels, not fp32 on the CPU, a gradient needed, an unsupported layout, more than
    ``ATTENTION_MAX_KEYS`` keys or fewer than ``ATTENTION_MIN_WORK`` products.

    >>> q = k = v = torch.eye(64).expand(1, 1, 64, 64)  # each query matches only its own key
    >>> out = attention(q, k, v, scale=100.0)
    >>> out is None or torch.allclose(out[0, :, 0], torch.eye(64), atol=1e-6)
    True
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    (B, H, S, D), (_, Hk, L, _) = q.shape, k.shape
    work = B * H * S * L * D  # multiply-adds of each product
    if not 0 < L <= ATTENTION_MAX_KEYS or work == 0 or work < ATTENTION_MIN_WORK:  # first: the cheapest checks
        return None
    lib, f32, grad = cpp.library(), torch.float32, torch.is_grad_enabled()
    if lib is None or q.dtype != f32 or k.dtype != f32 or v.dtype != f32 or q.device.type != "cpu" \
            or k.device != q.device or v.device != q.device or q.stride(-1) != 1 or k.stride(-1) != 1 \
            or v.stride(-1) != 1 or k.shape != (B, Hk, L, D) or v.shape != k.shape or Hk == 0 or H % Hk \
            or (grad and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return None
    kind, mask_strides = cpp.MASK_KINDS["none"], (0, 0, 0)
    if mask is not None:
        if mask.dim() > 4 or mask.device.type != "cpu" or (grad and mask.requires_grad):
            return None
        keep = mask.dtype == torch.bool
        kind = cpp.MASK_KINDS["keep" if keep else "additive"]
        mask = mask.to(torch.uint8 if keep else f32).expand(B, H, S, L)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask_strides = mask.stride()[:3]
    strides = struct.pack("12q", *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides)
    out = torch.empty(B, S, H, D, dtype=f32)
    lib.attention_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, None if mask is None else mask.data_ptr(),
                      kind, B, H, Hk, S, L, D, D ** -0.5 if scale is None else scale, int(causal), out.data_ptr(),
                      1 if 2 * B * H * S * L * D < ATTENTION_SINGLE_THREAD_WORK else cpp.num_threads())
    return out


def csr_matmul(w: NativeWeight, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None,
               post: AddNorm | None = None, variant: str = "plain") -> torch.Tensor:
    """x: (N, in) -> post(activation(x W^T + bias)) (N, out) in the weight's dtype. ``variant``: one of
    ``csr_variants(N)`` ("mask": the column-mask copy at one token; ``pick_csr`` gives the default)."""
    if variant == "mask" and x.shape[0] == 1:
        return _matmul(masked(w), x, bias, False, CODES[activation], post)
    return _matmul(w, x, bias, _is_panels(variant, x.shape[0], csr_variants(x.shape[0])), CODES[activation], post)


def two_four_matmul(w: NativeWeight, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None,
                    post: AddNorm | None = None, variant: str = "") -> torch.Tensor:
    """x: (N, in) -> post(activation(x W^T + bias)) (N, out) in the weight's dtype (no variants)."""
    if variant:
        raise UserValueError(f"the 2:4 kernel has no variants, got {variant!r}")
    return _matmul(w, x, bias, False, CODES[activation], post)
