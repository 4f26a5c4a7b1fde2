"""int8 weights: symmetric int8 values with one scale per output row, in three layouts.

A weight W (out, in) is stored as ``q`` (int8 in [-127, 127]) and ``scales`` (out,) with W ~ scales[:, None] * q
(``quantize_rows``: absmax, or a clipping search on the weight). The layouts, each a format of
``sparse_ops.registry.FORMATS``, differ only in how they index the nonzeros of q:

============== ========================================== =============================================
format         parts                                      bytes per weight at density d (+ 4 per row)
============== ========================================== =============================================
``dense-int8``  values (out, in)                          1
``csr-int8``    crow (out+1,) int32, col (nnz,) int16/32, 3d (int16 columns)
                values (nnz,)
``bitmap-int8`` the tiled bitmap of ``sparse_ops.bitmap``  1/8 + d (32 x 64 tiles, the GPU kernel's layout)
                (32 x 64 tiles), values (nnz,)
============== ========================================== =============================================

So the bitmap is the smallest from about 13% sparsity to 94%, CSR beyond, dense below (``estimate_nbytes``).
They are ``QUANTIZED``: lossy, so conversion stores them only when asked (``prune convert --quantize int8`` or a
named int8 format), never for "auto" alone. ``to_dense`` gives the dequantized weight ``scales * q`` in the
scales' dtype (fp32 as written; what a layer computes in); ``quantized()`` / ``from_quantized(q, scales)`` are
the exact round trip. A weight that rounds to 0 is stored as a zero: quantizing can only raise the sparsity.

``input_bits=8`` (a runtime choice, not stored: ``SparseLinear.input_bits``, ``from_pretrained(input_bits=8)``)
quantizes each layer input too, per block of ``INPUT_BLOCK`` columns (``quantize_input``), so that one token
multiplies int8 by int8 (what llama.cpp's Q8_0 and ONNX Runtime's dynamic quantization do); without it the
kernels are weight-only (int8 widened to fp32 in registers, fp32 inputs).

Example:
    >>> w = torch.tensor([[0.0, 1.27, 0.0, -0.5], [2.54, 0.0, 0.0, 0.0]])
    >>> q, s = quantize_rows(w)
    >>> q.tolist(), s.tolist()
    ([[0, 127, 0, -50], [127, 0, 0, 0]], [0.009999999776482582, 0.019999999552965164])
    >>> b = BitmapInt8.from_dense(w)
    >>> b.format, b.dtype, torch.equal(b.quantized()[0], q), torch.allclose(b.to_dense(), w)
    ('bitmap-int8', torch.float32, True, True)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparse_ops.bitmap import Int8Tiles, TiledBitmap
from sparse_ops.errors import UserValueError
from sparse_ops.formats import (
    CSR,
    VALUE_DTYPES,
    ValuesMixin,
    _check_dense_weight,
    _check_shape,
    _expect,
    _require_parts,
    _row_blocks,
    csr_nbytes,
)

QMAX = 127  # symmetric: -128 is never written, so -q always fits (and the kernels may negate)
CLIPS = ("absmax", "mse")
# quantize_rows(clip="mse"): the clipping ratios tried per row (of the row's largest magnitude)
CLIP_GRID = tuple(round(0.5 + 0.025 * i, 3) for i in range(21))
INT8 = (torch.int8,)
TILE = (32, 64)  # bitmap-int8's tiles: the CPU kernel's row blocks x one 64-column bitmap per row
INPUT_BITS = (None, 8)  # Int8Weight.input_bits: fp inputs, or int8 per block of INPUT_BLOCK columns
INPUT_BLOCK = 32


def quantize_input(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) as the int8 kernels see it under ``input_bits=8``: each block of ``INPUT_BLOCK`` columns (the
    last one shorter) replaced by s * round(x / s) with s = max|x_block| / 127 (rounding to even; where s is 0,
    zeros), in x's dtype. The C++ kernels compute the same codes and scales, bit for bit (finite x).

    >>> quantize_input(torch.tensor([[1.27, -0.5, 0.004]])).tolist()
    [[1.2699999809265137, -0.5, 0.0]]
    """
    inp = x.shape[-1]
    pad = -inp % INPUT_BLOCK
    xf = torch.nn.functional.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], -1, INPUT_BLOCK)
    s = xf.abs().amax(-1, keepdim=True) / QMAX
    q = torch.clamp(torch.round(xf / torch.where(s > 0, s, torch.ones_like(s))), -QMAX, QMAX)
    return (q * s).reshape(*x.shape[:-1], inp + pad)[..., :inp].to(x.dtype)


def quantize_rows(w: torch.Tensor, clip: str = "absmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(q (out, in) int8, scales (out,) fp32), q = clamp(round(w / s), -127, 127) per row r with scale s.

    ``clip="absmax"``: s = max|w_r| / 127, no weight clipped. ``"mse"``: s = a max|w_r| / 127 with the ratio a
    in ``CLIP_GRID`` that minimises the row's squared error sum (w - s q)^2: clipping the few largest weights
    represents the rest more finely. A row of zeros gets scale 1. Non-finite weights raise ValueError.

    >>> quantize_rows(torch.tensor([[0.0, 0.5, -1.0]]))[0].tolist()
    [[0, 64, -127]]
    """
    _check_dense_weight(w, "int8", VALUE_DTYPES)
    if clip not in CLIPS:
        raise UserValueError(f"unknown clip {clip!r}; allowed: {', '.join(CLIPS)}")
    out, inp = w.shape
    q = torch.empty(out, inp, dtype=torch.int8, device=w.device)
    scales = torch.empty(out, dtype=torch.float32, device=w.device)
    for r0, rows in _row_blocks(out, inp):  # bounded fp32 scratch
        block = w[r0:r0 + rows].float()
        if not bool(torch.isfinite(block).all()):
            bad = r0 + int((~torch.isfinite(block)).any(1).nonzero()[0])
            raise UserValueError(f"cannot quantize a weight holding inf or NaN (row {bad})")
        base = row_scales(block)
        s = base if clip == "absmax" else _best_clip(block, base)
        q[r0:r0 + rows] = _round(block, s)
        scales[r0:r0 + rows] = s
    return q, scales


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """(out,) fp32 absmax scales of a 2-D weight: max |w_r| / 127, 1 for a row of zeros.

    >>> row_scales(torch.tensor([[0.0, -2.54], [0.0, 0.0]])).tolist()
    [0.019999999552965164, 1.0]
    """
    amax = w.float().abs().amax(1) if w.shape[1] else w.new_zeros(w.shape[0], dtype=torch.float32)
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


def on_grid(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to its rows' int8 grids, in fp32: clamp(round(w / s), -127, 127) * s; w (out, ...) or (out,)
    with scales (out,) (a column of a weight: SparseGPT's joint quantization).

    >>> on_grid(torch.tensor([0.26, 5.0]), torch.tensor([0.1, 0.01])).tolist()
    [0.30000001192092896, 1.2699999809265137]
    """
    s = scales.view(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w.float() / s), -QMAX, QMAX) * s


def _round(block: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(block / s[:, None]), -QMAX, QMAX).to(torch.int8)


def _best_clip(block: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per row, the scale a * base (a in CLIP_GRID) with the least squared error (ties: the larger a)."""
    best, best_err = base.clone(), torch.full_like(base, float("inf"))
    for a in sorted(CLIP_GRID, reverse=True):
        s = base * a
        err = ((_round(block, s).float() * s[:, None] - block) ** 2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


@dataclass(frozen=True, eq=False)
class Int8Dense:
    """q of ``dense-int8``: values (out, in) int8."""

    values: torch.Tensor
    shape: tuple[int, int]

    PARTS: ClassVar[tuple[str, ...]] = ("values",)

    @classmethod
    def from_dense(cls, q: torch.Tensor) -> Int8Dense:
        _check_dense_weight(q, "dense-int8", INT8)
        return cls(q.contiguous(), (q.shape[0], q.shape[1]))

    def to_dense(self) -> torch.Tensor:
        return self.values

    def parts(self) -> dict[str, torch.Tensor]:
        return {"values": self.values}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> Int8Dense:
        return cls(parts["values"], _check_shape(shape, "dense-int8")).validate()

    def validate(self) -> Int8Dense:
        _expect(self.values, "values", INT8, self.shape, "dense-int8")
        return self

    def to(self, device: torch.device | str) -> Int8Dense:
        return dataclasses.replace(self, values=self.values.to(device))


@dataclass(frozen=True, eq=False)
class Int8CSR(CSR):
    """q of ``csr-int8``: a CSR of int8 values."""

    STORED: ClassVar[tuple[torch.dtype, ...]] = INT8


@dataclass(frozen=True, eq=False)
class Int8Weight(ValuesMixin):
    """W = scales[:, None] * q: ``q`` an int8 container (the layout), ``scales`` (out,) fp32 (or the dtype a
    layer was cast to). Subclasses name the format and the layout (``INNER``)."""

    q: Int8Dense | Int8CSR | Int8Tiles
    scales: torch.Tensor
    input_bits: int | None = None  # INPUT_BITS: how the kernels take the input (not stored in a checkpoint)

    format: ClassVar[str]
    INNER: ClassVar[type]
    PARTS: ClassVar[tuple[str, ...]]
    MIN_SPARSITY: ClassVar[float | None] = None  # worth it wherever smaller than the fp weight (always)
    QUANTIZED: ClassVar[bool] = True

    # -- what every format offers (formats.SparseFormat)
    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def values(self) -> torch.Tensor:
        """The stored int8 values (what sparsity counts)."""
        return self.q.values

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weight computes in: the scales' (fp32 as written), not the stored values' int8."""
        return self.scales.dtype

    @staticmethod
    def eligible(w: torch.Tensor) -> bool:
        """Any 2-D fp32 / fp16 / bf16 weight (non-finite ones are refused when quantized)."""
        return w.dim() == 2 and w.dtype in VALUE_DTYPES

    @classmethod
    def from_dense(cls, w: torch.Tensor, clip: str = "absmax") -> Int8Weight:
        """Quantize a float weight (``quantize_rows``) and store it in this layout."""
        return cls.from_quantized(*quantize_rows(w, clip))

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, input_bits: int | None = None) -> Int8Weight:
        """From q (out, in) int8 in [-127, 127] and scales (out,), exactly."""
        inner = Int8Tiles.from_dense(q, TILE) if cls.INNER is Int8Tiles else cls.INNER.from_dense(q)
        return cls(inner, scales, input_bits).validate()

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (out, in) int8, scales (out,)), exactly as stored."""
        return self.q.to_dense(), self.scales

    def to_dense(self) -> torch.Tensor:
        """The dequantized weight scales[:, None] * q (out, in) in ``dtype``."""
        return (self.q.to_dense().float() * self.scales.float()[:, None]).to(self.dtype)

    def parts(self) -> dict[str, torch.Tensor]:
        return {**self.q.parts(), "scales": self.scales}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> Int8Weight:
        """Rebuild from ``parts()`` (e.g. read from a file) and validate every invariant."""
        _require_parts(parts, cls.PARTS, cls.format)
        inner = {k: parts[k] for k in cls.INNER.PARTS}
        shape = _check_shape(shape, cls.format)
        q = _tiles_from_parts(inner, shape) if cls.INNER is Int8Tiles else cls.INNER.from_parts(inner, shape)
        return cls(q, parts["scales"]).validate()

    def to(self, device: torch.device | str) -> Int8Weight:
        return dataclasses.replace(self, q=self.q.to(device), scales=self.scales.to(device))

    def with_dtype(self, dtype: torch.dtype) -> Int8Weight:
        """The same weight computing in ``dtype`` (its scales cast; the int8 values as they are)."""
        return dataclasses.replace(self, scales=self.scales.to(dtype))

    def with_input_bits(self, bits: int | None) -> Int8Weight:
        """The same weight taking its inputs as ``bits`` says (``INPUT_BITS``; ``quantize_input``)."""
        return dataclasses.replace(self, input_bits=bits).validate()

    def validate(self) -> Int8Weight:
        """The layout's invariants, scales (out,) finite and positive, values in [-127, 127], ``input_bits`` one of
        ``INPUT_BITS``; self or ValueError."""
        if self.input_bits not in INPUT_BITS:
            raise UserValueError(f"unknown input_bits {self.input_bits!r}; allowed: {', '.join(map(str, INPUT_BITS))}")
        self.q.validate()
        out = self.shape[0]
        _expect(self.scales, "scales", VALUE_DTYPES, (out,), self.format)
        if out and not bool((torch.isfinite(self.scales) & (self.scales > 0)).all()):
            raise UserValueError(f"{self.format} scales must be finite and positive")
        if self.values.numel() and int(self.values.min()) < -QMAX:
            raise UserValueError(f"{self.format} values must lie in [-{QMAX}, {QMAX}] (symmetric int8), got -128")
        return self


class DenseInt8(Int8Weight):
    """Every weight stored: (out, in) int8 + scales. The dense twin the plan compares sparse int8 layouts with."""

    format: ClassVar[str] = "dense-int8"
    INNER: ClassVar[type] = Int8Dense
    PARTS: ClassVar[tuple[str, ...]] = (*Int8Dense.PARTS, "scales")

    @staticmethod
    def estimate_nbytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype) -> int:
        return shape[0] * shape[1] + 4 * shape[0]


class CSRInt8(Int8Weight):
    """CSR with int8 values + scales: the smallest layout past about 94% sparsity."""

    format: ClassVar[str] = "csr-int8"
    INNER: ClassVar[type] = Int8CSR
    PARTS: ClassVar[tuple[str, ...]] = (*Int8CSR.PARTS, "scales")

    @staticmethod
    def estimate_nbytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype) -> int:
        return csr_nbytes(shape, nnz, torch.int8) + 4 * shape[0]


class BitmapInt8(Int8Weight):
    """The tiled bitmap (32 x 64 tiles, ``sparse_ops.bitmap``) with int8 values + scales: one bit per weight
    plus one byte per nonzero."""

    format: ClassVar[str] = "bitmap-int8"
    INNER: ClassVar[type] = Int8Tiles
    PARTS: ClassVar[tuple[str, ...]] = (*TiledBitmap.PARTS, "scales")

    @staticmethod
    def estimate_nbytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype) -> int:
        """Every tile taken as nonempty (true of unstructured sparsity below about 99.9%)."""
        return TiledBitmap.estimate_nbytes(shape, nnz, torch.int8, tile=TILE) + 4 * shape[0]


def _tiles_from_parts(parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> Int8Tiles:
    """The int8 tiled bitmap from its parts, its tile read off the bitmaps' shape (which must be ``TILE``)."""
    bitmaps, ptr = parts["bitmaps"], parts["tile_ptr"]
    tile = tuple(bitmaps.shape[1:]) if isinstance(bitmaps, torch.Tensor) and bitmaps.dim() == 3 else None
    if tile is None or (tile[0], 32 * tile[1]) != TILE:
        raise UserValueError(f"bitmap-int8 bitmaps must have shape (tiles, {TILE[0]}, {TILE[1] // 32}), got "
                         f"{tuple(getattr(bitmaps, 'shape', ()))}")
    ok = isinstance(ptr, torch.Tensor) and ptr.dim() == 1 and ptr.numel() > 1 and not ptr.is_floating_point()
    counts = (ptr[1:] - ptr[:-1]).to(torch.int64) if ok else torch.zeros(1, dtype=torch.int64)
    return Int8Tiles(parts["tile_ptr"], parts["tile_cols"], parts["value_offsets"], bitmaps, parts["values"], shape,
                     *TILE, int(counts.max())).validate()
