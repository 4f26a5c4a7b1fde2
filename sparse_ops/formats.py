"""Sparse storage formats for 2-D weights: CSR and 2:4 semi-structured.

Each format is a small frozen container that describes itself: ``from_dense`` / ``to_dense`` (lossless),
``nbytes`` and ``estimate_nbytes(shape, nnz, dtype)`` (before encoding), ``eligible(w)`` (whether a dense
weight fits the format's pattern), ``MIN_SPARSITY`` (below it the format is not worth storing; None: whenever
it is smaller than dense), ``QUANTIZED`` (lossy: int8 values, ``sparse_ops.quantized``), ``validate`` (every
invariant, so a corrupted file raises ``ValueError`` before any index reaches torch) and ``parts`` /
``from_parts`` (a dict of named tensors, how a checkpoint stores it). ``sparse_ops.registry.FORMATS`` is the one
registry: every list of formats (conversion, layers, benchmarks) derives from it, so a new format is one class
and its entry there (plus a kernel in ``sparse_ops.dispatch`` and a reference product in
``kernels/reference.py``).

Zeros: a "nonzero" is ``w != 0``, so ``-0.0`` counts as zero and comes back from ``to_dense`` as ``+0.0``.
Keeping ``-0.0`` would store half the pruned weights of any model pruned by ``w * mask`` (negative weight
times 0 is -0.0) and defeat the format; ``-0.0 == +0.0`` and a product with either gives the same sum.
Apart from the sign of zeros the round trip is bit for bit (NaN and inf included).

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 0.0]])
    >>> csr = CSR.from_dense(w)
    >>> csr.crow_indices.tolist(), csr.col_indices.tolist(), csr.values.tolist()
    ([0, 2, 3], [1, 3, 0], [1.5, -2.0, 3.0])
    >>> torch.equal(csr.to_dense(), w) and torch.equal(TwoFour.from_dense(w).to_dense(), w)
    True
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from sparse_ops.errors import UserTypeError, UserValueError

# Value dtypes a sparse format may hold; anything else stays dense.
VALUE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
INT16_MAX_COLS = 32767  # int16 column indices address columns 0..32766 when in_features <= 32767
INT32_MAX = 2**31 - 1
_BLOCK = 1 << 22  # entries per block of rows when encoding (4 Mi: a 4 MB mask, <= 32 MB of int64 scratch)


class SparseFormat(Protocol):
    """What every format container offers (CSR, TwoFour)."""

    format: ClassVar[str]
    PARTS: ClassVar[tuple[str, ...]]  # names of the stored tensors, as in parts()
    MIN_SPARSITY: ClassVar[float | None]  # below it a weight stays dense (None: when smaller than dense)
    QUANTIZED: ClassVar[bool]  # lossy (int8 values, ``sparse_ops.quantized``): stored only when asked for
    shape: tuple[int, int]

    @staticmethod
    def estimate_nbytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype) -> int: ...
    @staticmethod
    def eligible(w: torch.Tensor) -> bool: ...

    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def nbytes(self) -> int: ...
    def to_dense(self) -> torch.Tensor: ...
    def validate(self) -> SparseFormat: ...
    def parts(self) -> dict[str, torch.Tensor]: ...
    def to(self, device: torch.device | str) -> SparseFormat: ...


def _check_dense_weight(w: torch.Tensor, fmt: str, dtypes: tuple[torch.dtype, ...] = VALUE_DTYPES) -> None:
    if not isinstance(w, torch.Tensor):
        raise UserTypeError(f"{fmt}.from_dense needs a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise UserValueError(f"{fmt} needs a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if w.dtype not in dtypes:
        raise UserValueError(f"{fmt} stores {_names(dtypes)} values, got {w.dtype}")
    if w.layout != torch.strided:
        raise UserValueError(f"{fmt}.from_dense needs a dense (strided) tensor, got layout {w.layout}")


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_shape(shape: object, fmt: str) -> tuple[int, int]:
    ok = isinstance(shape, (tuple, list)) and len(shape) == 2
    if not ok or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise UserValueError(f"{fmt} shape must be two non-negative ints (out, in), got {shape!r}")
    return int(shape[0]), int(shape[1])


def _expect(t: object, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...], fmt: str) -> None:
    """Raise ValueError unless ``t`` is a dense tensor with one of ``dtypes`` and exactly ``shape``."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise UserValueError(f"{fmt} {name} must be a dense tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise UserValueError(f"{fmt} {name} must have dtype {_names(dtypes)}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise UserValueError(f"{fmt} {name} must have shape {shape}, got {tuple(t.shape)}")


def csr_col_dtype(in_features: int) -> torch.dtype:
    """int16 column indices when every column fits (in_features <= 32767), else int32."""
    return torch.int16 if in_features <= INT16_MAX_COLS else torch.int32


def csr_nbytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype) -> int:
    """Bytes of a CSR weight: int32 row pointers (out+1) + nnz column indices + nnz values."""
    out, inp = shape
    col_bytes = torch.empty((), dtype=csr_col_dtype(inp)).element_size()
    return (out + 1) * 4 + nnz * (col_bytes + torch.empty((), dtype=dtype).element_size())


def _row_blocks(out: int, inp: int) -> list[tuple[int, int]]:
    """(first row, rows) of blocks of about ``_BLOCK`` entries covering ``out`` rows of ``inp`` columns."""
    step = max(1, _BLOCK // max(inp, 1))
    return [(r, min(step, out - r)) for r in range(0, out, step)]


class ValuesMixin:
    """dtype / device / nbytes of a container whose ``values`` part carries the dtype (every format here,
    ``checkpoint.schema.Transposed``, ``bitmap.TiledBitmap``; the int8 formats take their dtype from their scales)."""

    values: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of every stored part (what a file holds for this tensor, its header aside)."""
        return sum(t.numel() * t.element_size() for t in self.parts().values())


def two_four_nbytes(shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of a 2:4 weight: (out, in/2) values + (out, ceil(in/8)) uint8 metadata."""
    out, inp = shape
    return out * (inp // 2) * torch.empty((), dtype=dtype).element_size() + out * ((inp // 4 + 1) // 2)


@dataclass(frozen=True, eq=False)
class CSR(ValuesMixin):
    """Compressed sparse rows of an (out, in) weight.

    crow_indices: (out + 1,) int32, row r holds entries crow[r]:crow[r+1]
    col_indices:  (nnz,) int16 if in <= 32767 else int32, strictly increasing within a row
    values:       (nnz,) fp32 / fp16 / bf16, never zero
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    format: ClassVar[str] = "csr"
    PARTS: ClassVar[tuple[str, ...]] = ("crow_indices", "col_indices", "values")
    MIN_SPARSITY: ClassVar[float | None] = None
    QUANTIZED: ClassVar[bool] = False
    STORED: ClassVar[tuple[torch.dtype, ...]] = VALUE_DTYPES  # the value dtypes it holds

    @staticmethod
    def estimate_nbytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype) -> int:
        return csr_nbytes(shape, nnz, dtype)

    @staticmethod
    def eligible(w: torch.Tensor) -> bool:
        """Any 2-D weight of a value dtype."""
        return w.dim() == 2 and w.dtype in VALUE_DTYPES

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> CSR:
        """Keep the entries with ``w != 0``; see the module note on -0.0.

        Works on blocks of rows so the scratch memory (a bool mask, int64 indices of the block's nonzeros) is
        bounded by ``_BLOCK`` entries, not the weight's size: converting a large checkpoint stays near one
        weight plus its CSR parts.
        """
        _check_dense_weight(w, cls.format, cls.STORED)
        out, inp = w.shape
        counts, cols, values = [], [], []  # per block: (rows,) int64, (nnz_b,) columns, (nnz_b,) values
        for r0, rows_in_block in _row_blocks(out, inp):
            block = w[r0:r0 + rows_in_block]  # (rows, in)
            rows, c = (block != 0).nonzero(as_tuple=True)  # row-major: cols increasing within a row; NaN kept
            counts.append(torch.bincount(rows, minlength=block.shape[0]))
            cols.append(c.to(csr_col_dtype(inp)))
            values.append(block[rows, c])
        crow = torch.zeros(out + 1, dtype=torch.int64, device=w.device)
        if out:
            crow[1:] = torch.cumsum(torch.cat(counts), 0)
        if int(crow[-1]) > INT32_MAX:
            raise UserValueError(f"csr holds at most {INT32_MAX} nonzeros with int32 row pointers, "
                             f"got {int(crow[-1])}")
        cols = torch.cat(cols) if cols else torch.empty(0, dtype=csr_col_dtype(inp), device=w.device)
        values = torch.cat(values) if values else w.new_empty(0)
        return cls(crow.to(torch.int32), cols, values, (out, inp))

    def to_dense(self) -> torch.Tensor:
        out, inp = self.shape
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(out, device=self.device), counts)  # (nnz,)
        dense = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        dense[rows, self.col_indices.to(torch.int64)] = self.values
        return dense

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def parts(self) -> dict[str, torch.Tensor]:
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> CSR:
        """Rebuild from ``parts()`` (e.g. read from a file) and validate every invariant."""
        _require_parts(parts, cls.PARTS, "csr")
        return cls(parts["crow_indices"], parts["col_indices"], parts["values"], _check_shape(shape, "csr")).validate()

    def to(self, device: torch.device | str) -> CSR:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.parts().items()})

    def to_torch(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """torch sparse CSR tensor with int32 crow/col (torch needs both the same dtype: int16 widened here,
        once) and values cast to ``dtype``.  Call ``validate`` first on untrusted parts: torch does not check."""
        values = self.values if dtype is None else self.values.to(dtype)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow_indices, self.col_indices.to(torch.int32), values,
                                           self.shape, check_invariants=False)

    def validate(self) -> CSR:
        """Check dtypes, lengths, monotone row pointers and column ranges; return self or raise ValueError."""
        out, inp = _check_shape(self.shape, "csr")
        _expect(self.crow_indices, "crow_indices", (torch.int32,), (out + 1,), "csr")
        nnz = self.values.numel() if isinstance(self.values, torch.Tensor) else -1
        _expect(self.values, "values", self.STORED, (nnz,), "csr")
        if inp > INT32_MAX:
            raise UserValueError(f"csr in_features must be at most {INT32_MAX} (int32 column indices), got {inp}")
        # int16 columns only where they address every column (as from_dense writes): a file whose shape was
        # inflated past what its indices can reach is corrupt, not a huge weight
        col_dtypes = (torch.int16, torch.int32) if inp <= INT16_MAX_COLS else (torch.int32,)
        _expect(self.col_indices, "col_indices", col_dtypes, (nnz,), "csr")
        crow = self.crow_indices.to(torch.int64)
        if crow[0].item() != 0 or crow[-1].item() != nnz:
            raise UserValueError(f"csr crow_indices must start at 0 and end at nnz={nnz}, "
                             f"got {crow[0].item()} and {crow[-1].item()}")
        if bool((crow[1:] < crow[:-1]).any()):
            raise UserValueError("csr crow_indices must be non-decreasing")
        cols = self.col_indices  # compared in its own dtype: an int64 copy would be 4x (int16) the indices
        if nnz and (cols.min().item() < 0 or cols.max().item() >= inp):
            raise UserValueError(f"csr col_indices must lie in [0, {inp}), got [{cols.min().item()}, {cols.max().item()}]")
        _check_sorted_rows(cols, crow)
        return self


def _check_sorted_rows(cols: torch.Tensor, crow: torch.Tensor) -> None:
    """Columns strictly increase within each row (no duplicates), i.e. except where a new row starts."""
    if cols.numel() < 2:
        return
    step_ok = cols[1:] > cols[:-1]  # (nnz - 1,): entry i -> i + 1
    starts = crow[1:-1]
    starts = starts[(starts > 0) & (starts < cols.numel())]
    step_ok[starts - 1] = True  # entry starts-1 is the last of its row
    if not bool(step_ok.all()):
        raise UserValueError(f"csr col_indices must strictly increase within each row; "
                         f"{int((~step_ok).sum())} entries do not")


def _require_parts(parts: dict[str, torch.Tensor], names: tuple[str, ...], fmt: str) -> None:
    if not isinstance(parts, dict) or set(parts) != set(names):
        got = sorted(parts) if isinstance(parts, dict) else type(parts).__name__
        raise UserValueError(f"{fmt} needs parts {list(names)}, got {got}")


# --- 2:4: two stored values per group of 4 along the input dimension, positions in 2-bit codes. ---

def _check_24_shape(shape: tuple[int, int]) -> None:
    if shape[1] % 4:
        raise UserValueError(f"2:4 needs in_features divisible by 4, got weight shape {shape}")


def _pack_positions(pos: torch.Tensor) -> torch.Tensor:
    """(out, G, 2) positions p0 < p1 in 0..3 -> (out, ceil(G/2)) uint8: nibble p0 | p1 << 2, even group low."""
    out, groups, _ = pos.shape
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)  # (out, G)
    if groups % 2:
        nib = torch.cat([nib, nib.new_zeros(out, 1)], dim=1)  # pad nibble: 0
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def _unpack_nibbles(meta: torch.Tensor) -> torch.Tensor:
    """(out, ceil(G/2)) uint8 -> (out, G + G % 2) nibbles as int64 (the last one padding when G is odd)."""
    m = meta.to(torch.int64)
    return torch.stack([m & 0xF, m >> 4], dim=-1).reshape(meta.shape[0], 2 * meta.shape[1])


def _count_over_two(block: torch.Tensor) -> int:
    """Groups of 4 (along the last dim of a (rows, in) block) holding more than 2 nonzeros."""
    return int(((block != 0).reshape(-1, 4).sum(-1) > 2).sum())


def _encode_two_four(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, in) 2:4 block -> (rows, in/2) values and (rows, ceil(in/8)) uint8 metadata."""
    rows, inp = block.shape
    g = block.masked_fill(block == 0, 0.0).reshape(rows, inp // 4, 4)  # (rows, G, 4), -0.0 -> +0.0
    # Prefer nonzeros, then the lowest free positions: key = 4 * is_zero + position, take the 2 smallest.
    key = (g == 0).to(torch.int64) * 4 + torch.arange(4, device=block.device)
    pos = key.topk(2, dim=-1, largest=False).indices.sort(dim=-1).values  # (rows, G, 2)
    return g.gather(-1, pos).reshape(rows, inp // 2), _pack_positions(pos)


@dataclass(frozen=True, eq=False)
class TwoFour(ValuesMixin):
    """2:4 semi-structured (out, in) weight: at most 2 nonzeros in each group of 4 input columns.

    values:   (out, in/2) fp32 / fp16 / bf16, the two kept entries of each group in column order
              (a group with fewer than two nonzeros stores zeros in its lowest free positions)
    metadata: (out, ceil(in/8)) uint8, per group a 4-bit code p0 | p1 << 2 with 0 <= p0 < p1 <= 3,
              two groups per byte (even group in the low nibble; an odd last group is padded with 0)
    """

    values: torch.Tensor
    metadata: torch.Tensor
    shape: tuple[int, int]

    format: ClassVar[str] = "2:4"
    PARTS: ClassVar[tuple[str, ...]] = ("values", "metadata")
    MIN_SPARSITY: ClassVar[float | None] = 0.5  # what the pattern itself implies
    QUANTIZED: ClassVar[bool] = False

    @staticmethod
    def estimate_nbytes(shape: tuple[int, int], nnz: int, dtype: torch.dtype) -> int:
        return two_four_nbytes(shape, dtype)

    @staticmethod
    def eligible(w: torch.Tensor) -> bool:
        """A 2-D weight of a value dtype with at most 2 nonzeros in every group of 4 input columns."""
        return w.dtype in VALUE_DTYPES and is_two_four(w)

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> TwoFour:
        """Raise ValueError naming the offending group count when ``w`` breaks the 2:4 pattern.

        Encodes blocks of rows (``_BLOCK`` entries each) into preallocated outputs: the int64 scratch of the
        position search stays bounded instead of being 2x the weight's size.
        """
        _check_dense_weight(w, "2:4")
        out, inp = w.shape
        _check_24_shape((out, inp))
        bad = sum(_count_over_two(w[r:r + step]) for r, step in _row_blocks(out, inp))
        if bad:
            raise UserValueError(f"weight of shape {(out, inp)} is not 2:4: {bad} of {out * inp // 4} groups of 4 "
                             f"hold more than 2 nonzeros")
        values = w.new_empty(out, inp // 2)
        metadata = torch.empty(out, (inp // 4 + 1) // 2, dtype=torch.uint8, device=w.device)
        for r, step in _row_blocks(out, inp):
            values[r:r + step], metadata[r:r + step] = _encode_two_four(w[r:r + step])
        return cls(values, metadata, (out, inp))

    def positions(self) -> torch.Tensor:
        """(out, G, 2) int64 positions within each group of 4."""
        out, inp = self.shape
        nib = _unpack_nibbles(self.metadata)[:, : inp // 4]  # (out, G)
        return torch.stack([nib & 0x3, nib >> 2], dim=-1)

    def to_dense(self) -> torch.Tensor:
        out, inp = self.shape
        dense = torch.zeros(out, inp // 4, 4, dtype=self.dtype, device=self.device)
        dense.scatter_(-1, self.positions(), self.values.reshape(out, inp // 4, 2))
        return dense.reshape(out, inp)

    def parts(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "metadata": self.metadata}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> TwoFour:
        """Rebuild from ``parts()`` (e.g. read from a file) and validate every invariant."""
        _require_parts(parts, cls.PARTS, "2:4")
        return cls(parts["values"], parts["metadata"], _check_shape(shape, "2:4")).validate()

    def to(self, device: torch.device | str) -> TwoFour:
        return dataclasses.replace(self, values=self.values.to(device), metadata=self.metadata.to(device))

    def validate(self) -> TwoFour:
        """Check dtypes, shapes and that every code has p0 < p1 (padding code 0); return self or raise."""
        out, inp = _check_shape(self.shape, "2:4")
        _check_24_shape((out, inp))
        groups = inp // 4
        _expect(self.values, "values", VALUE_DTYPES, (out, inp // 2), "2:4")
        _expect(self.metadata, "metadata", (torch.uint8,), (out, (groups + 1) // 2), "2:4")
        nib = _unpack_nibbles(self.metadata)
        p0, p1 = nib[:, :groups] & 0x3, nib[:, :groups] >> 2
        bad = int((p0 >= p1).sum())
        if bad:
            raise UserValueError(f"2:4 metadata holds {bad} invalid position codes (need p0 < p1)")
        if groups % 2 and bool((nib[:, groups:] != 0).any()):
            raise UserValueError("2:4 metadata padding nibbles must be 0")
        return self


def is_two_four(w: torch.Tensor) -> bool:
    """True when a 2-D weight has in % 4 == 0 and at most 2 nonzeros in every group of 4 input columns."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    # in blocks of rows: the int64 group sums stay small
    return not any(_count_over_two(w[r:r + step]) for r, step in _row_blocks(*w.shape))
