"""Our CPU kernels (C++, ``sparse_ops/csrc/sparse_cpu.cpp``) for ``y = x @ W^T + b``: CSR and 2:4, fp32/bf16.

``prepare`` validates the weight (the C++ code trusts its indices) and keeps its parts as they are stored:
int16 column indices when ``in <= 32767`` (6 B per nonzero with fp32 values, 4 B with bf16), and for 2:4 the
values plus 2-bit codes. fp16 values are widened to fp32 once at prepare (no fp16 path in the C++ code).
A CSR weight also gets a panelled copy (``panel_parts``: row blocks x 128-column panels, 1-byte column offsets,
about 5.3 B per nonzero), which the large-batch kernel reads; a prepared CSR layer thus holds its weight twice.
Paths by batch n (``use_panels``): n == 1, a gathered gemv on the plain CSR; batches the table of
``use_panels`` gives to the panelled kernel, x packed into token tiles so that one panel of x stays in L1;
others, the plain-CSR kernel with x transposed into a zero-padded (in, ld) fp32 panel so that each nonzero
multiplies a contiguous run of tokens. All run on torch's OpenMP pool with torch's thread count; outputs are
cast back to the weight's dtype. Inference only: when a gradient is needed the call goes to torch's CSR kernel.

Example:
    >>> import torch
    >>> from sparse_ops.formats import CSR
    >>> w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, -1.0]])
    >>> if native.available():
    ...     y = csr_matmul(prepare_csr(CSR.from_dense(w)), torch.tensor([[1.0, 10.0, 100.0]]), None)
    ... else:
    ...     y = torch.tensor([[20.0, -99.0]])
    >>> y.tolist()
    [[20.0, -99.0]]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_ops.formats import CSR, TwoFour
from sparse_ops.kernels import cpu, native

VALUE_CODE = {torch.float32: "f32", torch.bfloat16: "bf16"}  # value dtypes the C++ code reads
INDEX_CODE = {torch.int16: "i16", torch.int32: "i32"}
L2_PANEL_BYTES = 512 * 1024  # keep one token tile of x (in, tile) fp32 about this size: it stays in L2
TILE_OUTER = 0  # token tiles inside row blocks: each block's weights are read from memory once
ROWS_PER_BLOCK = 32  # rows handed to a thread at a time: enough work per hand-out, balanced over 2-64 threads
# Panelled CSR (batches chosen by use_panels): rows in blocks of PANEL_ROWS, columns in panels of PANEL_WIDTH
# (<= 256: 1-byte column offsets), tokens in tiles of 16, 32 or PANEL_TILE (the smallest that holds the batch).
# One panel of x for a 64-token tile, 128 x 64 fp32 = 32 KiB, is prefetched into L1 while the block's rows use
# the previous one; measured on the 2-core EPYC (kernel + packing vs dense, 1 thread), 64-token tiles beat
# 32-token ones by 0-15% (4096x4096 and BERT shapes), 64-row blocks beat 32-row ones by 5-15%.
# Which batches go to the panelled kernel, from interleaved runs against dense on the 2-core EPYC (4096^2, 1
# thread; speedups over dense F.linear, "8-wide/tiles" = the plain-CSR kernels, "panels" = the panelled one):
#   sparsity 0.5-0.7, batch 2-64:   panels 1.3-3.7x   vs 0.9-2.5x  -> panels from density PANEL_DENSE at any batch
#   sparsity 0.9,     batch 8 / 16: panels 4.9 / 6.8x vs 7.2 / 7.9x -> the 16-token panel tile is too short when
#                     batch 32 / 64: panels 7.2 / 8.9x vs 6.4 / 6.5x    sparse: panels from PANEL_SPARSE_MIN_BATCH
#   sparsity 0.99,    batch 64 / 256: panels 19.7 / 14.4x vs 22.3 / 13.1x -> below PANEL_MIN_DENSITY, tiles
PANEL_DENSE = 0.2
PANEL_SPARSE_MIN_BATCH = 17
PANEL_MIN_DENSITY = 0.015
PANEL_ROWS = 64
PANEL_WIDTH = 128
PANEL_TILE = 64
assert PANEL_WIDTH <= 256 and PANEL_ROWS * PANEL_TILE <= 64 * 64  # uint8 offsets; the C++ per-thread sums buffer


@dataclass(frozen=True)
class NativeWeight:
    """A weight ready for the C++ kernels: ``entry`` names the function, ``args`` its weight pointers."""

    source: CSR | TwoFour  # validated container (kept for the autograd fallback and the tensors' lifetime)
    entry: str
    tensors: tuple[torch.Tensor, ...]  # contiguous parts passed by pointer, in the entry's order
    out_dtype: torch.dtype
    panels: tuple[torch.Tensor, ...] = ()  # CSR only: (seg, lcol, values) of panel_parts, for large batches
    density: float = 1.0  # nonzeros / (out * in)


def _values(values: torch.Tensor) -> torch.Tensor:
    """Values as the C++ code reads them: fp32 as is, bf16 as its 16-bit pattern, fp16 widened to fp32."""
    if values.dtype == torch.float16:
        cpu.log_once("native CPU kernels have no float16 path: float16 weights are widened to float32 at load")
        return values.float().contiguous()
    v = values.contiguous()
    return v.view(torch.int16) if v.dtype == torch.bfloat16 else v


def _value_code(values: torch.Tensor) -> str:
    return VALUE_CODE[torch.float32 if values.dtype == torch.float16 else values.dtype]


def _check_cpu(w: CSR | TwoFour) -> None:
    if w.device.type != "cpu":
        raise ValueError(f"native CPU kernels need a CPU weight, got device {w.device}")


def prepare_csr(w: CSR) -> NativeWeight:
    """Validate (indices reach native code) and keep rowptr, column indices and values contiguous."""
    _check_cpu(w)
    w.validate()
    entry = f"csr_{_value_code(w.values)}_{INDEX_CODE[w.col_indices.dtype]}"
    parts = (w.crow_indices.contiguous(), w.col_indices.contiguous(), _values(w.values))
    density = w.values.numel() / max(1, w.shape[0] * w.shape[1])
    return NativeWeight(w, entry, parts, w.dtype, panel_parts(*parts, w.shape), density)


def use_panels(n: int, density: float) -> bool:
    """Whether n tokens go to the panelled kernel (else the gemv at n == 1, the plain-CSR kernels above it).

    >>> use_panels(1, 0.5), use_panels(8, 0.3), use_panels(16, 0.1), use_panels(17, 0.1), use_panels(256, 0.01)
    (False, True, False, True, False)
    """
    return n >= 2 and (density >= PANEL_DENSE or (n >= PANEL_SPARSE_MIN_BATCH and density >= PANEL_MIN_DENSITY))


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
    return NativeWeight(w, f"two_four_{_value_code(w.values)}", parts, w.dtype)


def token_width(n: int) -> int:
    """Tokens the C++ code computes for n: 1 (gemv), 8 (one 8-wide vector) or n rounded up to 16."""
    return 1 if n == 1 else 8 if n <= 8 else -(-n // 16) * 16


def tiling(in_features: int, n: int, tile_bytes: int = L2_PANEL_BYTES) -> tuple[int, int]:
    """(ld, tile): the x panel's row stride in floats and tokens per tile, for n tokens.

    The stride is the token width, plus 16 floats when that is an even number of 64-byte lines: rows of the
    panel then spread over all L1 sets instead of a few (a 1 KiB or 4 KiB stride thrashes them).

    >>> tiling(4096, 1), tiling(4096, 5), tiling(4096, 100), tiling(384, 1024)
    ((1, 32), (8, 32), (112, 32), (1040, 128))
    """
    width = token_width(n)
    ld = width + 16 if width >= 32 and (width // 16) % 2 == 0 else width
    tile = 16
    while tile < 128 and in_features * (2 * tile) * 4 <= tile_bytes:
        tile *= 2
    return ld, tile


def x_panel(x: torch.Tensor, ld: int) -> torch.Tensor:
    """(N, in) any dtype/strides -> (in, ld) contiguous fp32 holding x^T, zero in columns N .. width - 1
    (or (in,) at N == 1)."""
    n, inp = x.shape
    if n == 1:
        return x.reshape(-1).to(torch.float32).contiguous()
    xt = torch.empty(inp, ld, dtype=torch.float32)
    xt[:, :n] = x.t()
    xt[:, n:token_width(n)] = 0.0
    return xt


def _run(w: NativeWeight, shape: tuple[int, int], lead: tuple[int, ...], x: torch.Tensor,
         bias: torch.Tensor | None) -> torch.Tensor:
    """Call ``w.entry`` with the weight pointers ``lead`` (e.g. out, in) and x; returns (N, out) fp32."""
    out, inp = shape
    n = x.shape[0]
    y = torch.empty(n, out, dtype=torch.float32)
    if n == 0 or out == 0:
        return y
    ld, tile = tiling(inp, n)
    xt = x_panel(x, ld)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    fn = getattr(native.library(), w.entry)
    fn(*(t.data_ptr() for t in w.tensors), *lead, xt.data_ptr(), ld, n, None if b is None else b.data_ptr(),
       y.data_ptr(), tile, ROWS_PER_BLOCK, TILE_OUTER, native.num_threads())
    return y


def _run_panels(w: NativeWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The panelled CSR kernel (it packs x into token tiles itself); returns (N, out) fp32."""
    out, inp = w.source.shape
    n = x.shape[0]
    tile = next(t for t in (16, 32, PANEL_TILE) if n <= t or t == PANEL_TILE)  # tokens per tile
    y = torch.empty(n, out, dtype=torch.float32)
    if n == 0 or out == 0:
        return y
    x32 = x.to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    entry = getattr(native.library(), "csr_panels_" + w.entry.split("_")[1])  # csr_f32_i16 -> csr_panels_f32
    entry(*(t.data_ptr() for t in w.panels), out, inp, PANEL_ROWS, PANEL_WIDTH, x32.data_ptr(), tile, n,
          None if b is None else b.data_ptr(), y.data_ptr(), native.num_threads())
    return y


def _needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def csr_matmul(w: NativeWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (N, in) -> (N, out) in the weight's dtype."""
    if _needs_grad(x, bias):  # the C++ kernels have no backward: torch's CSR path does
        return cpu.csr_matmul(cpu.prepare_csr(w.source), x, bias)
    if use_panels(x.shape[0], w.density):
        return _run_panels(w, x, bias).to(w.out_dtype)
    return _run(w, w.source.shape, (w.source.shape[0],), x, bias).to(w.out_dtype)


def two_four_matmul(w: NativeWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (N, in) -> (N, out) in the weight's dtype."""
    if _needs_grad(x, bias):
        return cpu.csr_matmul(cpu.prepare_csr(CSR.from_dense(w.source.to_dense())), x, bias)
    return _run(w, w.source.shape, w.source.shape, x, bias).to(w.out_dtype)
