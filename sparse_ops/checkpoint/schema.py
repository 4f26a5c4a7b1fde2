"""The on-disk schema of a sparse checkpoint, and reading one back tensor by tensor.

A sparse checkpoint is a safetensors file (or a folder of shards with ``tensorio.SPARSE_INDEX``). Each logical
tensor is stored dense under its own name or as its format's parts under ``<name>/<part>``; which one, and the
format, shape and dtype of every tensor, live only in the file's metadata (``TENSORS_KEY``, JSON: one ``Entry``
record per tensor) beside ``VERSION_KEY``. A 2-D tensor whose pattern holds along dim 0 only (a 2:4-pruned GPT-2
``Conv1D`` weight, stored (in, out)) is stored as its transpose in the format, its record saying
``"transposed": true`` (``shape`` stays the tensor's own; files without the flag read as before); it loads as a
``Transposed`` (``to_dense`` gives the tensor back). A file without sparse_ops metadata (any dense checkpoint
``open_raw`` reads) reads as every tensor dense. Every record is checked against the stored tensors before use:
a bad file is a ``BadFileError`` naming the problem, never a crash.

Example:
    >>> entry = Entry("h.0.mlp.c_fc.weight", "2:4", (64, 256), torch.float16,
    ...               {"values": "h.0.mlp.c_fc.weight/values", "metadata": "h.0.mlp.c_fc.weight/metadata"}, True)
    >>> record = entry.to_json()
    >>> record["shape"], record["dtype"], record[TRANSPOSED]
    ([64, 256], 'float16', True)
    >>> _parse_entry(entry.name, record, set(entry.parts.values())) == entry
    True
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sparse_ops.errors import UserValueError
from sparse_ops.formats import VALUE_DTYPES, SparseFormat, ValuesMixin
from sparse_ops.registry import FORMATS, format_class
from sparse_ops.tensorio import DTYPES, BadFileError, RawSource, open_raw

FORMAT_VERSION = "1"
VERSION_KEY = "sparse_ops.format_version"
TENSORS_KEY = "sparse_ops.tensors"
DENSE = "dense"
TRANSPOSED = "transposed"  # optional key of a tensor's record: true when its parts hold its transpose
RECORD_KEYS = frozenset({"format", "shape", "dtype", "parts"})  # in every record (TRANSPOSED may join them)


@dataclass(frozen=True)
class Entry:
    """One logical tensor of a file: format, shape, dtype, and the stored tensor name of each part;
    ``transposed``: the parts hold the (shape[1], shape[0]) transpose in ``format``."""

    name: str
    format: str
    shape: tuple[int, ...] | None  # None: a plain (dense) file, nothing declared beyond the tensor itself
    dtype: torch.dtype | None
    parts: dict[str, str]
    transposed: bool = False

    def to_json(self) -> dict[str, object]:
        dtype = str(self.dtype).removeprefix("torch.")
        record = {"format": self.format, "shape": list(self.shape), "dtype": dtype, "parts": self.parts}
        if self.transposed:  # written only when set: a file without transposed tensors reads as before
            record[TRANSPOSED] = True
        return record


@dataclass(frozen=True, eq=False)
class Transposed(ValuesMixin):
    """A tensor stored as its transpose in a sparse format: ``inner`` holds the (cols, rows) transpose of this
    (rows, cols) tensor. ``to_dense`` gives the tensor itself; ``format`` is the inner format's name, and
    ``transposed`` marks it (a plain format object has no such attribute: ``getattr(w, "transposed",
    False)``). ``sparse_ops.loading.sparsify`` gives ``inner`` to a transformers ``Conv1D`` as its (out, in)
    weight, as it is.

    Example:
        >>> from sparse_ops.formats import TwoFour
        >>> w = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 4.0]])  # 2:4 down each column
        >>> t = Transposed(TwoFour.from_dense(w.t().contiguous()))
        >>> t.format, t.shape, t.inner.shape, torch.equal(t.to_dense(), w)
        ('2:4', (4, 2), (2, 4), True)
    """

    inner: SparseFormat
    transposed = True  # class attribute, not a field

    @property
    def format(self) -> str:
        return self.inner.format

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.inner.shape
        return (cols, rows)

    @property
    def values(self) -> torch.Tensor:  # dtype, device and nbytes follow (ValuesMixin)
        return self.inner.values

    def to_dense(self) -> torch.Tensor:
        return self.inner.to_dense().t().contiguous()

    def parts(self) -> dict[str, torch.Tensor]:
        return self.inner.parts()

    def validate(self) -> Transposed:
        self.inner.validate()
        return self

    def to(self, device: torch.device | str) -> Transposed:
        return Transposed(self.inner.to(device))

    def with_values(self, values: torch.Tensor) -> Transposed:
        """The same tensor with ``values`` (e.g. cast to another dtype) in place of the inner values."""
        return Transposed(dataclasses.replace(self.inner, values=values))


def _part_names(fmt: str) -> tuple[str, ...]:
    return ("tensor",) if fmt == DENSE else format_class(fmt).PARTS


def _parse_entry(name: str, info: object, stored: set[str]) -> Entry:
    """Validate one metadata record against the file's stored tensor names; ValueError naming the problem."""
    if not isinstance(info, dict) or not RECORD_KEYS <= set(info) <= RECORD_KEYS | {TRANSPOSED}:
        raise UserValueError(f"metadata of {name!r} must have keys format, shape, dtype, parts (and optionally "
                         f"{TRANSPOSED}); got {info!r:.200}")
    fmt, shape, dtype, parts = info["format"], info["shape"], info["dtype"], info["parts"]
    transposed = info.get(TRANSPOSED, False)
    if type(transposed) is not bool:  # 1, "true", null, [...] are not a flag
        raise UserValueError(f"metadata {TRANSPOSED} of {name!r} must be true or false, got {transposed!r:.100}")
    if not isinstance(fmt, str) or (fmt != DENSE and fmt not in FORMATS):  # a list would be unhashable
        raise UserValueError(f"metadata format of {name!r} is {fmt!r}; known: {DENSE}, {', '.join(FORMATS)}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise UserValueError(f"metadata shape of {name!r} must be a list of non-negative ints, got {shape!r:.100}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserValueError(f"metadata dtype of {name!r} must be one of {', '.join(DTYPES)}; got {dtype!r:.100}")
    expected = set(_part_names(fmt))
    if (not isinstance(parts, dict) or set(parts) != expected
            or not all(isinstance(v, str) and v in stored for v in parts.values())):
        raise UserValueError(f"metadata parts of {name!r} must map {sorted(expected)} to stored tensors, "
                         f"got {parts!r:.200}")
    if fmt != DENSE and (len(shape) != 2 or DTYPES[dtype] not in VALUE_DTYPES):
        raise UserValueError(f"{fmt} tensor {name!r} must be 2-D with float32/float16/bfloat16 values, "
                         f"got shape {shape} dtype {dtype}")
    if transposed and fmt == DENSE:
        raise UserValueError(f"metadata of {name!r} says {TRANSPOSED} for a {DENSE} tensor; only a sparse format "
                         f"is stored transposed")
    return Entry(name, fmt, tuple(shape), DTYPES[dtype], dict(parts), transposed)


def read_entries(src: RawSource) -> list[Entry]:
    """The logical tensors of a source: from sparse_ops metadata when present, else every tensor dense."""
    return [e for _, entries in shard_entries(src) for e in entries]


def shard_entries(src: RawSource) -> list[tuple[RawSource, list[Entry]]]:
    """(shard, its logical tensors) per file of a source; a sharded sparse checkpoint's index must name
    exactly the tensors each shard's metadata describes."""
    shards = src.shards()
    if len(shards) == 1 and src.index is None:
        return [(src, _file_entries(src))]
    result = [(shard, _file_entries(shard)) for shard in shards]
    if src.index is not None:
        for shard, entries in result:
            named = {k for k, v in src.index.items() if v == shard.path.name}
            if named != {e.name for e in entries}:
                odd = sorted(named ^ {e.name for e in entries})[0]
                raise BadFileError(f"cannot read {src.path}: the index and {shard.path.name} disagree about "
                                   f"tensor {odd!r}")
    return result


def _file_entries(src: RawSource) -> list[Entry]:
    """The logical tensors of one file (or of a plain multi-file source, all dense)."""
    meta = src.metadata or {}
    stored = set(src.keys())
    if VERSION_KEY not in meta:
        return [Entry(k, DENSE, None, None, {"tensor": k}) for k in src.keys()]
    if meta[VERSION_KEY] != FORMAT_VERSION:
        raise BadFileError(f"cannot read {src.path}: sparse_ops format version {meta[VERSION_KEY]!r:.40}, "
                           f"this version reads {FORMAT_VERSION!r}")
    try:
        records = json.loads(meta.get(TENSORS_KEY, ""))
        if not isinstance(records, dict):
            raise UserValueError(f"{TENSORS_KEY} must be a JSON object")
        entries = [_parse_entry(name, info, stored) for name, info in records.items()]
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BadFileError(f"cannot read {src.path}: bad metadata: {e}") from None
    used = [p for e in entries for p in e.parts.values()]
    if len(used) != len(set(used)) or set(used) != stored:
        raise BadFileError(f"cannot read {src.path}: metadata and stored tensors disagree "
                           f"({len(set(used))} described, {len(stored)} stored, {len(used)} references)")
    return entries


def load_entry(src: RawSource, entry: Entry) -> torch.Tensor | SparseFormat | Transposed:
    """Load one logical tensor, checked against its metadata (a format object validates all its invariants);
    a tensor stored transposed as a ``Transposed`` of its stored (shape[1], shape[0]) format object."""
    parts = {part: src.get(stored) for part, stored in entry.parts.items()}
    if entry.format == DENSE:
        t = parts["tensor"]
        if entry.shape is not None and (tuple(t.shape) != entry.shape or t.dtype != entry.dtype):
            raise BadFileError(f"cannot read {src.path}: {entry.name!r} is {t.dtype} {tuple(t.shape)}, "
                               f"metadata says {entry.dtype} {entry.shape}")
        return t
    stored_shape = entry.shape[::-1] if entry.transposed else entry.shape
    try:
        fmt = format_class(entry.format).from_parts(parts, stored_shape)
    except ValueError as e:
        raise BadFileError(f"cannot read {src.path}: {entry.name!r}: {e}") from None
    if fmt.dtype != entry.dtype:
        raise BadFileError(f"cannot read {src.path}: {entry.name!r} has {fmt.dtype} values, metadata says {entry.dtype}")
    return Transposed(fmt) if entry.transposed else fmt


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor | SparseFormat | Transposed]]:
    """(name, dense tensor, format object or ``Transposed``) for each logical tensor of a checkpoint, one at a
    time."""
    with open_raw(path) as src:
        for entry in read_entries(src):
            yield entry.name, load_entry(src, entry)


def load_sparse_state_dict(path: str | os.PathLike, dense: bool = False
                           ) -> dict[str, torch.Tensor | SparseFormat | Transposed]:
    """A checkpoint's tensors: sparse ones as format objects, those stored transposed as ``Transposed`` (or
    every one as its dense tensor, the shape it was converted from, with ``dense=True``)."""
    return {name: (t.to_dense() if dense and not isinstance(t, torch.Tensor) else t)
            for name, t in iter_tensors(path)}

