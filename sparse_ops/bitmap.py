"""The tiled bitmap: an (out, in) weight in TILE_OUT x TILE_K tiles, each a bitmap (one bit per weight) and its
packed nonzeros. One layout for both devices: the GPU's Triton kernel (``kernels/triton_sparse.py``, whose module
docstring draws it) and the CPU's int8 kernel (``sparse_ops.quantized.BitmapInt8``, 32 x 64 tiles).

    tile_ptr      (tile_rows + 1,) int32    like CSR's crow, over tiles
    tile_cols     (T,) int32                T = nonempty tiles, in (tile row, tile column) order
    value_offsets (T + 1,) int32            prefix sums of the tiles' nonzero counts
    bitmaps       (T, TILE_OUT, TILE_K // 32) int32, bit b of word (i, j): entry (i, 32 j + b) of the tile
    values        (nnz,) row-major within each tile (``STORED``: fp32 / fp16 / bf16; ``Int8Tiles``: int8)

Example:
    >>> w = torch.zeros(40, 100); w[3, 7] = 2.0; w[35, 90] = -1.0
    >>> tb = TiledBitmap.from_dense(w)
    >>> tb.num_tiles, tb.nnz, torch.equal(tb.to_dense(), w)
    (2, 2, True)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparse_ops.errors import UserValueError
from sparse_ops.formats import CSR, INT32_MAX, VALUE_DTYPES, ValuesMixin

TILE_OUTS = (16, 32, 64, 128)  # powers of two (Triton's tl.arange) and >= 16 (tl.dot)
TILE_KS = (32, 64, 128)  # whole int32 words per tile row
DEFAULT_TILE = (32, 64)
_ENCODE_BLOCK = 1 << 22  # weight entries per block of tile rows when encoding

def _to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _word_bits(words: torch.Tensor) -> torch.Tensor:
    """(..., W) int32 words -> (..., 32 W) bool, bit b of word j at position 32 j + b."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1  # int64: >> of the sign bit stays in bit 31
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 32).bool()


@dataclass(frozen=True, eq=False)
class TiledBitmap(ValuesMixin):
    """An (out, in) weight in TILE_OUT x TILE_K tiles, each a bitmap and its packed nonzeros (see the module
    docstring).

    Python ints (``shape``, the tile shape, ``max_row_tiles``) are kept so a product never reads a tensor back
    to the host.
    """

    tile_ptr: torch.Tensor  # (tile_rows + 1,) int32
    tile_cols: torch.Tensor  # (T,) int32
    value_offsets: torch.Tensor  # (T + 1,) int32
    bitmaps: torch.Tensor  # (T, TILE_OUT, TILE_K // 32) int32
    values: torch.Tensor  # (nnz,)
    shape: tuple[int, int]
    tile_out: int
    tile_k: int
    max_row_tiles: int  # most nonempty tiles in one tile row

    PARTS = ("tile_ptr", "tile_cols", "value_offsets", "bitmaps", "values")
    STORED: ClassVar[tuple[torch.dtype, ...]] = VALUE_DTYPES  # the value dtypes it holds

    # -- sizes
    @property
    def tile_rows(self) -> int:
        return -(-self.shape[0] // self.tile_out)

    @property
    def tile_col_count(self) -> int:
        return -(-self.shape[1] // self.tile_k)

    @property
    def words(self) -> int:
        """int32 bitmap words per tile row."""
        return self.tile_k // 32

    @property
    def num_tiles(self) -> int:
        """Nonempty (stored) tiles."""
        return self.tile_cols.numel()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def parts(self) -> dict[str, torch.Tensor]:  # nbytes (ValuesMixin) sums them: an all-zero tile costs nothing
        return {name: getattr(self, name) for name in self.PARTS}

    @staticmethod
    def estimate_nbytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype, tiles: int | None = None,
                        tile: tuple[int, int] = DEFAULT_TILE) -> int:
        """Bytes for ``nnz`` values in ``tiles`` nonempty tiles (None: every tile nonempty)."""
        tile_out, tile_k = tile
        rows, cols = -(-shape[0] // tile_out), -(-shape[1] // tile_k)
        tiles = rows * cols if tiles is None else tiles
        value_bytes = torch.empty((), dtype=dtype).element_size()
        return 4 * (rows + 1) + tiles * (8 + tile_out * tile_k // 8) + 4 + nnz * value_bytes

    def to(self, device: torch.device | str) -> TiledBitmap:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.parts().items()})

    # -- encoding
    @staticmethod
    def _check_tile(tile: tuple[int, int]) -> tuple[int, int]:
        tile_out, tile_k = tile
        if tile_out not in TILE_OUTS or tile_k not in TILE_KS:
            raise UserValueError(f"tile must be (TILE_OUT in {TILE_OUTS}, TILE_K in {TILE_KS}), got {tile}")
        return tile_out, tile_k

    @classmethod
    def _encode(cls, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, tile: tuple[int, int],
                blocks) -> TiledBitmap:
        """Assemble from ``blocks``: per block of whole tile rows (first weight row r0, rows), the stored
        entries (rows relative to r0, columns, values) in any order. Vectorised within a block (sort, unique,
        index_add); blocks bound the int64 scratch."""
        out, inp = shape
        tile_out, tile_k = cls._check_tile(tile)
        kt, words, per_tile = -(-inp // tile_k), tile_k // 32, tile_out * tile_k
        row_counts, cols_l, counts_l, bitmaps_l, values_l = [], [], [], [], []
        for r0, nrows, rows, cols, vals in blocks:
            block_tile_rows = -(-nrows // tile_out)
            tr, r = rows // tile_out, rows % tile_out
            tc, c = cols // tile_k, cols % tile_k
            key = tr * kt + tc  # tile id within the block, row-major over tiles
            order = torch.argsort(key * per_tile + r * tile_k + c)  # entries in (tile, row, column) order
            tiles, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
            words_flat = torch.zeros(tiles.numel() * tile_out * words, dtype=torch.int64, device=device)
            # each bit is set once, so adding the bits is or-ing them
            word_index = (inverse * tile_out + r) * words + c // 32
            words_flat.index_add_(0, word_index, torch.ones_like(c) << (c % 32))
            bitmaps_l.append(_to_int32_words(words_flat).view(-1, tile_out, words))
            row_counts.append(torch.bincount(tiles // kt, minlength=block_tile_rows))
            cols_l.append((tiles % kt).to(torch.int32))
            counts_l.append(counts)
            values_l.append(vals[order])
        if sum(v.numel() for v in values_l) > INT32_MAX:
            raise UserValueError(f"a tiled bitmap holds at most {INT32_MAX} nonzeros with int32 offsets")
        cat = lambda parts, empty: torch.cat(parts) if parts else empty
        i64 = torch.empty(0, dtype=torch.int64, device=device)
        row_counts, counts = cat(row_counts, i64), cat(counts_l, i64)
        tile_ptr = torch.zeros(-(-out // tile_out) + 1, dtype=torch.int64, device=device)
        tile_ptr[1:] = torch.cumsum(row_counts, 0)
        value_offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
        value_offsets[1:] = torch.cumsum(counts, 0)
        return cls(tile_ptr.to(torch.int32), cat(cols_l, torch.empty(0, dtype=torch.int32, device=device)),
                   value_offsets.to(torch.int32),
                   cat(bitmaps_l, torch.empty(0, tile_out, words, dtype=torch.int32, device=device)),
                   cat(values_l, torch.empty(0, dtype=dtype, device=device)), (out, inp), tile_out, tile_k,
                   int(row_counts.max()) if row_counts.numel() else 0)

    @staticmethod
    def _tile_row_blocks(out: int, inp: int, tile_out: int) -> list[tuple[int, int]]:
        """(first row, rows) of blocks of whole tile rows, about ``_ENCODE_BLOCK`` entries each."""
        step = max(1, _ENCODE_BLOCK // max(inp * tile_out, 1)) * tile_out
        return [(r, min(step, out - r)) for r in range(0, out, step)]

    @classmethod
    def from_dense(cls, w: torch.Tensor, tile: tuple[int, int] = DEFAULT_TILE) -> TiledBitmap:
        """Keep the entries with ``w != 0`` (``-0.0`` is a zero, NaN is kept, as ``formats.CSR``)."""
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in cls.STORED:
            raise UserValueError(f"TiledBitmap needs a 2-D fp32 / fp16 / bf16 weight, got "
                             f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
        out, inp = w.shape
        tile_out, _ = cls._check_tile(tile)

        def blocks():
            for r0, nrows in cls._tile_row_blocks(out, inp, tile_out):
                block = w[r0:r0 + nrows]
                rows, cols = (block != 0).nonzero(as_tuple=True)
                yield r0, nrows, rows, cols, block[rows, cols]
        return cls._encode((out, inp), w.dtype, w.device, tile, blocks())

    @classmethod
    def from_csr(cls, w: CSR, tile: tuple[int, int] = DEFAULT_TILE) -> TiledBitmap:
        """From the stored CSR, without a dense copy: blocks of tile rows are slices of its entries."""
        out, inp = w.shape
        tile_out, _ = cls._check_tile(tile)
        spans = cls._tile_row_blocks(out, inp, tile_out)
        bounds = w.crow_indices[[r for r, _ in spans] + [out]].tolist() if spans else [0]

        def blocks():
            for i, (r0, nrows) in enumerate(spans):
                lo, hi = bounds[i], bounds[i + 1]
                crow = w.crow_indices[r0:r0 + nrows + 1].to(torch.int64)
                counts = crow[1:] - crow[:-1]
                rows = torch.repeat_interleave(torch.arange(nrows, device=w.device), counts)
                yield r0, nrows, rows, w.col_indices[lo:hi].to(torch.int64), w.values[lo:hi]
        return cls._encode((out, inp), w.dtype, w.device, tile, blocks())

    # -- decoding
    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) int64 of every stored value, in the order of ``values``."""
        t, r, c = _word_bits(self.bitmaps).nonzero(as_tuple=True)  # (tile, row, column) order, as encoded
        counts = (self.tile_ptr[1:] - self.tile_ptr[:-1]).to(torch.int64)
        tile_row = torch.repeat_interleave(torch.arange(self.tile_rows, device=self.device), counts)  # (T,)
        return tile_row[t] * self.tile_out + r, self.tile_cols.to(torch.int64)[t] * self.tile_k + c

    def to_dense(self) -> torch.Tensor:
        """The weight, exactly (the sign of zeros aside)."""
        rows, cols = self.entries()
        dense = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        dense[rows, cols] = self.values
        return dense

    def reference_matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 ``x @ W^T (+ bias)`` from the stored parts with torch ops, the yardstick of the kernel."""
        rows, cols = self.entries()
        x = x.to(torch.float32)
        y = torch.zeros(x.shape[0], self.shape[0], dtype=torch.float32, device=x.device)
        y.index_add_(1, rows, x[:, cols] * self.values.to(torch.float32))
        return y if bias is None else y + bias.to(torch.float32)

    def validate(self) -> TiledBitmap:
        """Check dtypes, shapes, pointers, column order, offsets against the popcounts and that padding bits
        are zero; return self or raise ValueError."""
        out, inp = self.shape
        self._check_tile((self.tile_out, self.tile_k))
        t, nnz = self.num_tiles, self.nnz
        expect = {"tile_ptr": ((self.tile_rows + 1,), (torch.int32,)), "tile_cols": ((t,), (torch.int32,)),
                  "value_offsets": ((t + 1,), (torch.int32,)),
                  "bitmaps": ((t, self.tile_out, self.words), (torch.int32,)),
                  "values": ((nnz,), self.STORED)}
        for name, (shape, dtypes) in expect.items():
            part = getattr(self, name)
            if tuple(part.shape) != shape or part.dtype not in dtypes:
                raise UserValueError(f"tiled bitmap {name}: need shape {shape} of {dtypes}, got "
                                 f"{tuple(part.shape)} {part.dtype}")
        ptr = self.tile_ptr.to(torch.int64)
        if ptr[0].item() != 0 or ptr[-1].item() != t or bool((ptr[1:] < ptr[:-1]).any()):
            raise UserValueError("tiled bitmap tile_ptr must rise from 0 to the number of tiles")
        counts = ptr[1:] - ptr[:-1]
        if (int(counts.max()) if counts.numel() else 0) != self.max_row_tiles:
            raise UserValueError("tiled bitmap max_row_tiles does not match tile_ptr")
        cols = self.tile_cols.to(torch.int64)
        if t and (cols.min().item() < 0 or cols.max().item() >= self.tile_col_count):
            raise UserValueError("tiled bitmap tile_cols out of range")
        if t > 1:
            rising = cols[1:] > cols[:-1]
            starts = ptr[1:-1]
            rising[starts[(starts > 0) & (starts < t)] - 1] = True
            if not bool(rising.all()):
                raise UserValueError("tiled bitmap tile_cols must increase within a tile row")
        bits = _word_bits(self.bitmaps)  # (T, TILE_OUT, TILE_K)
        offsets = self.value_offsets.to(torch.int64)
        if offsets[0].item() != 0 or not torch.equal(offsets[1:] - offsets[:-1], bits.sum((1, 2))) \
                or offsets[-1].item() != nnz:
            raise UserValueError("tiled bitmap value_offsets must be the prefix sums of the bitmaps' popcounts")
        rows, cols = self.entries()
        if nnz and (rows.max().item() >= out or cols.max().item() >= inp):
            raise UserValueError("tiled bitmap has bits set in the padding beyond the weight's shape")
        return self


@dataclass(frozen=True, eq=False)
class Int8Tiles(TiledBitmap):
    """A tiled bitmap of int8 values (the quantized weight ``q`` of ``sparse_ops.quantized.BitmapInt8``)."""

    STORED: ClassVar[tuple[torch.dtype, ...]] = (torch.int8,)
