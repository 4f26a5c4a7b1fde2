"""Read, convert, write and inspect sparse checkpoints (loading one into a model: ``sparse_ops.loading``).

Sources: a ``.safetensors`` file (dense, or sparse as written here), a ``.pt`` / ``.bin`` state dict (read with
``torch.load(weights_only=True)``, never a full unpickle), or a Hugging Face model directory
(``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``); a sharded
sparse checkpoint as written here (its folder or its ``model.sparse.safetensors.index.json``).

Output: one safetensors file, or a folder of shards with an index (one shard per source shard). Each logical tensor is stored dense under its own name or as its format's parts
under ``<name>/<part>``; which one, and the format, shape and dtype of every tensor, live only in the file's
metadata (``sparse_ops.tensors``, JSON) beside ``sparse_ops.format_version``. A 2-D tensor whose pattern holds
along dim 0 only (a 2:4-pruned GPT-2 ``Conv1D`` weight, stored (in, out)) is stored as its transpose in the
format, its record saying ``"transposed": true`` (``shape`` stays the tensor's own; files without the flag
read as before); it loads as a ``Transposed`` (``to_dense`` gives the tensor back).
Conversion streams tensor by tensor (peak memory ~ 2x the largest tensor beyond the interpreter) into a temporary file in the destination folder, renamed at the end.
A folder converted to a folder keeps its other files (config, tokenizer, ...), so ``sparse_ops.pretrained.
from_pretrained`` can rebuild the model from it. The output is never the source, inside the source folder, or
an existing file (unless ``overwrite=True``); a checkpoint with nothing sparse in it is refused (unless
``allow_dense=True``).

Example:
    >>> import os, tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> w = torch.randn(64, 64).masked_fill(torch.rand(64, 64) < 0.9, 0.0)
    >>> torch.save({"fc.weight": w, "fc.bias": torch.zeros(64)}, os.path.join(d, "model.pt"))
    >>> s = convert_checkpoint(os.path.join(d, "model.pt"), os.path.join(d, "sparse.safetensors"), format="csr")
    >>> s.converted, s.tensors, s.ratio < 0.3
    (1, 2, True)
    >>> sd = load_sparse_state_dict(os.path.join(d, "sparse.safetensors"))
    >>> sd["fc.weight"].format, torch.equal(sd["fc.weight"].to_dense(), w)
    ('csr', True)
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from sparse_ops.errors import MissingPathError, OutputExistsError, UserValueError
from sparse_ops.formats import VALUE_DTYPES, SparseFormat, ValuesMixin
from sparse_ops.quantized import CLIPS, QMAX, CSRInt8, DenseInt8
from sparse_ops.registry import AUTO, FORMATS, LOSSLESS, QUANTIZED, format_class
from sparse_ops.tensorio import DTYPES, SPARSE_INDEX, BadFileError, RawSource, SafetensorsWriter, open_raw

FORMAT_VERSION = "1"
VERSION_KEY = "sparse_ops.format_version"
TENSORS_KEY = "sparse_ops.tensors"
CONVERT_FORMATS = (*FORMATS, AUTO)  # "auto": per tensor, whichever stores it smaller
QUANTIZE = ("int8",)  # convert_checkpoint(quantize=...): values as symmetric int8 with per-row scales
INT8_TWINS = {"csr": CSRInt8.format}  # a lossless format -> its int8 layout under quantize="int8"
DENSE = "dense"
TRANSPOSED_MARK = "^T"  # after the format's name where a tensor is stored transposed (``TensorInfo.label``)
EMBEDDING = re.compile(r"embed|(^|\.)(wte|wpe)(\.|$)")  # names of embedding tables (stay dense by default)
# Files of a model folder that hold weights (of any framework) or an index of them: converted, or left out, when
# a folder converts to a folder; every other file (config, tokenizer, ...) is copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
INDEX_SUFFIX = ".index.json"
PRE_FINALIZE_KEY = ".parametrizations."  # in the keys of a model saved with its Pruner still attached


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


# --- conversion ---

def sparsity_of(t: torch.Tensor) -> float:
    """Fraction of exact zeros (0.0 for an empty tensor)."""
    return 1.0 - int(torch.count_nonzero(t)) / t.numel() if t.numel() else 0.0


class Storage(NamedTuple):
    """How one tensor is stored: "dense" or a format name, and whether as its transpose."""

    format: str
    transposed: bool = False


def choose_layout(name: str, t: torch.Tensor, format: str, min_sparsity: float | None,
                  embeddings: bool = False, *, transpose: bool = True, quantize: str | None = None) -> Storage:
    """The ``Storage`` of one tensor (see ``convert_checkpoint``): as ``choose_storage``, and where a format's
    pattern fails along the last dim but holds for the transpose (groups along dim 0: the (in, out) weight of
    transformers' ``Conv1D`` pruned along its input), that format of the transpose (``transpose=False``:
    never). The transpose is tried only where the tensor as it is breaks the pattern.

    Example:
        >>> w = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 5.0],
        ...                   [0.0, 6.0, 0.0, 7.0], [0.0, 0.0, 8.0, 0.0]])  # 2:4 down each column, not row 0
        >>> choose_layout("h.0.attn.c_attn.weight", w, "2:4", None)
        Storage(format='2:4', transposed=True)
        >>> choose_storage("fc.weight", w.t(), "2:4", None)
        '2:4'
        >>> choose_layout("fc.weight", w, "auto", None, quantize="int8")  # the smallest int8 layout
        Storage(format='dense-int8', transposed=False)
    """
    if t.dim() != 2 or t.dtype not in VALUE_DTYPES or (EMBEDDING.search(name) and not embeddings):
        return Storage(DENSE)
    if quantize is not None:
        return Storage(_int8_layout(t, format, min_sparsity))
    shape, nnz, dense_bytes = tuple(t.shape), int(torch.count_nonzero(t)), t.numel() * t.element_size()
    sparsity = 1.0 - nnz / max(t.numel(), 1)

    def worth(cls: type, shape: tuple[int, int]) -> bool:
        need = cls.MIN_SPARSITY if min_sparsity is None else min_sparsity
        return cls.estimate_nbytes(shape, nnz, t.dtype) < dense_bytes if need is None else sparsity >= need

    def fit(cls: type) -> Storage | None:
        """The orientation ``cls`` stores ``t`` in, if any: as is where that fits the pattern (and is worth
        it), else the transpose where it fits (and is worth it). Worth is asked before any pattern scan."""
        worth_as_is = worth(cls, shape)
        if worth_as_is and cls.eligible(t):
            return Storage(cls.format)
        if not transpose or not worth(cls, shape[::-1]):
            return None
        if not worth_as_is and cls.eligible(t):
            return None  # fits as is, only not worth it there: no reason to turn it round
        return Storage(cls.format, True) if cls.eligible(t.t()) else None

    if format != AUTO:
        cls = format_class(format)
        found = fit(cls)
        if found is not None:
            return found
        if not worth(cls, shape):
            return Storage(DENSE)
        try:
            cls.from_dense(t)  # raises, naming the shape or the count of groups that break the pattern
        except ValueError as e:
            tried = transpose and worth(cls, shape[::-1])
            raise UserValueError(f"{e} (nor along dim 0: its transpose is not {format} either)" if tried
                             else str(e)) from None
        return Storage(format)
    sizes = {Storage(DENSE): dense_bytes}
    for cls in (FORMATS[f] for f in LOSSLESS):  # int8 only where asked for (quantize, or by name)
        found = fit(cls)
        if found is not None:
            sizes[found] = cls.estimate_nbytes(shape[::-1] if found.transposed else shape, nnz, t.dtype)
    return min(sizes, key=sizes.__getitem__)


def _int8_layout(t: torch.Tensor, format: str, min_sparsity: float | None) -> str:
    """The int8 format of a 2-D float tensor under ``quantize="int8"``: "auto", the smallest int8 layout; an int8
    format, itself; "csr", csr-int8 where the tensor is ``min_sparsity`` sparse (None: where smaller than
    dense-int8), else dense-int8. Formats with no int8 layout (2:4) raise ValueError."""
    shape, nnz = (t.shape[0], t.shape[1]), int(torch.count_nonzero(t))
    size = {f: FORMATS[f].estimate_nbytes(shape, nnz, t.dtype) for f in QUANTIZED}
    if format in size:
        return format
    if format == AUTO:
        return min(size, key=size.__getitem__)
    twin = INT8_TWINS.get(format)
    if twin is None:
        raise UserValueError(f"{format} has no int8 layout; with quantize='int8' allowed: {AUTO}, "
                         f"{', '.join(INT8_TWINS)}, {', '.join(QUANTIZED)}")
    worth = (size[twin] < size[DenseInt8.format]) if min_sparsity is None else sparsity_of(t) >= min_sparsity
    return twin if worth else DenseInt8.format


def choose_storage(name: str, t: torch.Tensor, format: str, min_sparsity: float | None,
                   embeddings: bool = False) -> str:
    """"dense" or a format name (``formats.FORMATS``) for one tensor as it is, never transposed (see
    ``convert_checkpoint``; ``choose_layout`` also considers the transpose, as conversion does).

    A format is worth storing when the tensor is at least ``min_sparsity`` sparse (None: the format's own
    ``MIN_SPARSITY``, or, where it has none, when it stores the tensor smaller than dense). A format asked for
    by name whose pattern the tensor breaks raises ValueError naming what breaks it; "auto" takes the smallest
    of dense and the formats that are worth it and fit."""
    return choose_layout(name, t, format, min_sparsity, embeddings, transpose=False).format


@dataclass(frozen=True)
class _Options:
    format: str
    min_sparsity: float | None
    embeddings: bool
    progress: bool
    allow_dense: bool = False
    quantize: str | None = None
    clip: str = "absmax"
    scales: Mapping[str, torch.Tensor] | None = None  # tensor name -> the scales of its rows' int8 grids
    overwrite: bool = False  # may the output replace one that exists (or appears while converting)


@dataclass(frozen=True)
class _Totals:
    tensors: int = 0
    converted: int = 0
    before: int = 0
    after: int = 0
    sparsest: float | None = None  # the highest sparsity of a tensor that could be converted (None: no such one)

    def __add__(self, other: _Totals) -> _Totals:
        sparsest = max((s for s in (self.sparsest, other.sparsest) if s is not None), default=None)
        return _Totals(self.tensors + other.tensors, self.converted + other.converted, self.before + other.before,
                       self.after + other.after, sparsest)


def _is_dir_output(dst: Path) -> bool:
    """An existing folder, or a new path that does not name a weight file (``s0.5`` is a folder; ``x.pt`` is
    not), asks for a sharded output folder."""
    return dst.is_dir() or (not dst.exists() and not _is_weight_file(dst.name))


def _check_convert_args(src: Path, dst: Path, format: str, min_sparsity: float | None, overwrite: bool,
                        quantize: str | None = None, clip: str = "absmax") -> None:
    if format not in CONVERT_FORMATS:
        raise UserValueError(f"unknown format {format!r}; allowed: {', '.join(CONVERT_FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UserValueError(f"unknown quantize {quantize!r}; allowed: {', '.join(QUANTIZE)} (or None)")
    if quantize is not None and format not in (AUTO, *INT8_TWINS, *QUANTIZED):
        raise UserValueError(f"{format} has no int8 layout; with quantize={quantize!r} allowed: {AUTO}, "
                         f"{', '.join(INT8_TWINS)}, {', '.join(QUANTIZED)}")
    if clip not in CLIPS:
        raise UserValueError(f"unknown clip {clip!r}; allowed: {', '.join(CLIPS)}")
    if min_sparsity is not None and not 0.0 <= min_sparsity <= 1.0:
        raise UserValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if dst.suffix != ".safetensors" and not _is_dir_output(dst):
        raise UserValueError(f"output must be a .safetensors file or a folder (for sharded output), "
                             f"got {dst.name!r}")
    _check_not_source(src, dst)
    _check_existing_output(dst, overwrite)
    if not dst.parent.is_dir():
        raise MissingPathError(f"output folder does not exist: {dst.parent}")


def _source_folder(src: Path) -> Path | None:
    """The folder a source reads from as a whole: a model folder, or the folder of an index file's shards."""
    if src.is_dir():
        return src
    return src.parent if src.name.endswith(INDEX_SUFFIX) else None


def _check_not_source(src: Path, dst: Path) -> None:
    """ValueError, naming both paths, when writing ``dst`` could replace what ``src`` reads (links resolved)."""
    s, d = src.resolve(), dst.resolve()
    if d == s or (src.exists() and dst.exists() and os.path.samefile(src, dst)):
        raise UserValueError(f"output {dst} is the source {src}; choose another output path")
    folder = _source_folder(src)
    if folder is not None and d.is_relative_to(folder.resolve()):
        raise UserValueError(f"output {dst} lies inside the source folder {folder}, which conversion reads (it would "
                         f"write into, or replace, the checkpoint); choose an output outside {folder}")
    if _is_dir_output(dst) and s.is_relative_to(d):
        raise UserValueError(f"source {src} lies inside the output folder {dst}, which conversion fills (or with "
                         f"overwrite replaces); choose an output folder that does not hold the source")


def _check_existing_output(dst: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; even then only a file or a sparse checkpoint folder
    (one holding our index) is replaced, never an arbitrary folder. An existing empty folder is filled."""
    if dst.is_dir():
        if not any(dst.iterdir()):
            return
        if not overwrite:
            raise OutputExistsError(f"output folder {dst} is not empty; choose a new or empty folder, or pass "
                                    f"overwrite=True (CLI: --overwrite) to replace the sparse checkpoint in it")
        if not (dst / SPARSE_INDEX).is_file():
            raise UserValueError(f"output folder {dst} is not empty and holds no {SPARSE_INDEX}: it is not a sparse "
                             f"checkpoint, so it is not replaced even with overwrite; choose a new or empty folder")
    elif dst.exists() and not overwrite:
        raise OutputExistsError(f"output {dst} exists; pass overwrite=True (CLI: --overwrite) to replace it, "
                                f"or choose another path")


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(INDEX_SUFFIX)


def extra_files(src: str | os.PathLike) -> list[Path]:
    """The files a folder-to-folder conversion copies: every file of a model folder ``src`` (links followed;
    subfolders not) but weights and weight indexes (``WEIGHT_SUFFIXES``, ``*.index.json``); none for a file.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> for name in ("config.json", "vocab.txt", "model.safetensors", "model.safetensors.index.json"):
        ...     _ = (d / name).write_text("{}")
        >>> [p.name for p in extra_files(d)]
        ['config.json', 'vocab.txt']
    """
    src = Path(src)
    if not src.is_dir():
        return []
    return sorted(p for p in src.iterdir() if p.is_file() and not _is_weight_file(p.name))


@dataclass(frozen=True)
class ConvertSummary:
    """What ``convert_checkpoint`` did: tensor counts and data bytes before/after (headers aside), and the
    other files of a model folder copied beside the weights."""

    src: str
    dst: str
    format: str
    tensors: int
    converted: int
    bytes_before: int
    bytes_after: int
    copied: tuple[str, ...] = ()  # file names (config.json, tokenizer.json, ...)

    @property
    def ratio(self) -> float:
        return self.bytes_after / max(self.bytes_before, 1)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, format: str = "csr",
                       min_sparsity: float | None = None, *, embeddings: bool = False,
                       progress: bool = False, overwrite: bool = False, allow_dense: bool = False,
                       quantize: str | None = None, clip: str = "absmax",
                       scales: Mapping[str, torch.Tensor] | None = None) -> ConvertSummary:
    """Write ``src`` as a sparse safetensors file ``dst``, one tensor at a time; returns a summary.

    Converted: 2-D fp32/fp16/bf16 tensors (embeddings only with ``embeddings=True``) whose sparsity is at least
    ``min_sparsity``; by default, csr where its storage is smaller than dense, 2:4 from 50% sparsity (a tensor
    that is that sparse but not 2:4 is an error), "auto" the smallest of dense/csr/2:4 per tensor. A tensor
    that breaks a format's pattern as it is but whose transpose fits it (2:4 groups along dim 0: a GPT-2
    ``Conv1D`` weight pruned along its input) is stored as that transpose, marked ``"transposed": true``
    (``choose_layout``). Speed is chosen where the model runs: ``sparsify``'s per-batch plan
    (``sparse_ops.plan``).

    ``quantize="int8"``: every such tensor is stored with symmetric int8 values and one fp32 scale per row
    (``sparse_ops.quantized``; scales from each row's largest magnitude, ``clip="absmax"``, or the clipping
    ratio with the least squared error, ``"mse"``), in its smallest int8 layout ("auto"), csr-int8 where csr
    would be chosen else dense-int8 ("csr"), or the int8 format named. Without it, int8 formats are written
    only when named. ``scales`` (with ``quantize``): tensor name -> (rows,) scales of weights already on their
    rows' int8 grids (``prune.oneshot(..., bits=8)``), stored with exactly those scales instead of ``clip``'s.

    ``dst`` a folder (a new or empty one, or a path without a suffix): one sparse shard per source shard,
    ``model-0000k-of-0000n.sparse.safetensors``, and ``model.sparse.safetensors.index.json`` mapping each
    tensor name to its shard; the folder appears complete or not at all. A model folder converted to a folder
    keeps its other files (``extra_files``: config.json, tokenizer files, ...), copied unchanged.

    Refused with a ValueError naming the paths, before anything is read: ``dst`` is ``src``, lies inside the
    source folder, or is a folder holding ``src``; ``dst`` exists (``OutputExistsError``) unless
    ``overwrite=True``, which replaces a file or a sparse checkpoint folder (never another folder) only once
    the new output is complete. Refused at the end, leaving nothing on disk: no tensor converted (an unpruned
    model, one saved before ``Pruner.finalize()``, or ``min_sparsity`` too high), unless ``allow_dense=True``,
    which writes the file and warns.
    """
    src, dst = Path(src), Path(dst)
    _check_convert_args(src, dst, format, min_sparsity, overwrite, quantize, clip)
    if scales and quantize is None:
        raise UserValueError("scales (int8 grids) apply only with quantize='int8'")
    opts = _Options(format, min_sparsity, embeddings, progress, allow_dense, quantize, clip, scales, overwrite)
    copied: list[Path] = []
    with open_raw(src) as source:
        if _is_dir_output(dst):
            copied = extra_files(src)
            t = _convert_sharded(source, dst, opts, copied)
        else:
            t = _convert_file(source, read_entries(source), dst, opts, final=True)
    return ConvertSummary(str(src), str(dst), format, t.tensors, t.converted, t.before, t.after,
                          tuple(p.name for p in copied))


def _check_sparse(totals: _Totals, names: list[str], opts: _Options) -> None:
    """Refuse (ValueError) or, with ``allow_dense``, warn when no tensor was converted; one line naming the
    likely cause."""
    if totals.converted:
        return
    causes = ["the model is unpruned", "it was saved before Pruner.finalize() (masks not yet in the weights)"]
    if any(PRE_FINALIZE_KEY in n for n in names):
        causes = [(f"it was saved before Pruner.finalize(): its keys hold {PRE_FINALIZE_KEY.strip('.')} "
                   f"(save pruner.masked_state_dict(), or the model after finalize())")]
    if opts.min_sparsity is not None:
        causes.append(f"min_sparsity={opts.min_sparsity} is too high")
    sparsest = ("no 2-D float weight to consider" if totals.sparsest is None
                else f"the sparsest 2-D weight is {totals.sparsest:.1%} zeros")
    msg = (f"nothing to convert: none of the {totals.tensors} tensors is sparse enough for {opts.format} storage "
           f"({sparsest}); likely {', or '.join(causes)}")
    if not opts.allow_dense:
        raise UserValueError(f"{msg}; pass allow_dense=True (CLI: --allow-dense) to write it anyway")
    warnings.warn(f"{msg}; written anyway (allow_dense)", UserWarning, stacklevel=4)


def _convert_file(source: RawSource, entries: list[Entry], dst: Path, opts: _Options, final: bool) -> _Totals:
    """Convert ``entries`` of ``source`` into one safetensors file ``dst`` (atomically); ``final``: the whole
    output, checked for having anything sparse before it is committed."""
    records, totals = {}, _Totals()
    with SafetensorsWriter(dst, overwrite=opts.overwrite) as writer:
        bar = None if opts.progress else True  # tqdm's disable=None: a bar on a terminal only
        for entry in tqdm(entries, desc="convert", unit="tensor", disable=bar):
            records[entry.name], t = _convert_entry(source, entry, writer, opts)
            totals += t
        if final:
            _check_sparse(totals, list(records), opts)
        writer.commit({VERSION_KEY: FORMAT_VERSION, TENSORS_KEY: json.dumps(records)})
    return totals


def _convert_entry(source: RawSource, entry: Entry, writer: SafetensorsWriter, opts: _Options
                   ) -> tuple[dict[str, object], _Totals]:
    """Load, choose, encode and write one tensor; its buffers are freed on return (peak ~ one tensor)."""
    t = load_entry(source, entry)
    t = t if isinstance(t, torch.Tensor) else t.to_dense()
    try:
        fmt, transposed = choose_layout(entry.name, t, opts.format, opts.min_sparsity, opts.embeddings,
                                        quantize=opts.quantize)
        # a transposed view: the encoders work on blocks of its rows, so no full transposed copy is made
        stored = t.t() if transposed else t
        grid = (opts.scales or {}).get(entry.name)
        obj = t if fmt == DENSE else _encode(format_class(fmt), stored, opts.clip, grid)
    except ValueError as e:
        raise UserValueError(f"{entry.name}: {e}") from None
    parts = {"tensor": t} if fmt == DENSE else obj.parts()
    names = {p: entry.name if fmt == DENSE else f"{entry.name}/{p}" for p in parts}
    after = sum(writer.add(names[p], v) for p, v in parts.items())
    record = Entry(entry.name, fmt, tuple(t.shape), obj.dtype, names, transposed).to_json()
    candidate = t.dim() == 2 and t.dtype in VALUE_DTYPES and (opts.embeddings or not EMBEDDING.search(entry.name))
    return record, _Totals(1, int(fmt != DENSE), t.numel() * t.element_size(), after,
                           sparsity_of(t) if candidate else None)


def _encode(cls: type, t: torch.Tensor, clip: str, grid: torch.Tensor | None = None) -> SparseFormat:
    """``t`` in format ``cls``: int8 formats quantize it with ``clip``, or onto the given row scales ``grid``."""
    if not cls.QUANTIZED:
        return cls.from_dense(t)
    if grid is None:
        return cls.from_dense(t, clip=clip)
    if tuple(grid.shape) != (t.shape[0],):
        raise UserValueError(f"its int8 scales have shape {tuple(grid.shape)}, expected ({t.shape[0]},)")
    grid = grid.to(torch.float32)
    return cls.from_quantized(torch.clamp(torch.round(t.float() / grid[:, None]), -QMAX, QMAX).to(torch.int8), grid)


def _convert_sharded(source: RawSource, out: Path, opts: _Options, extras: list[Path]) -> _Totals:
    """One output shard per source shard, plus copies of ``extras``, built in a hidden sibling folder renamed
    onto ``out`` at the end."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        shards = shard_entries(source)
        weight_map, totals = {}, _Totals()
        for k, (shard, entries) in enumerate(shards, 1):
            name = f"model-{k:05d}-of-{len(shards):05d}.sparse.safetensors"
            totals += _convert_file(shard, entries, tmp / name, opts, final=False)
            weight_map.update({e.name: name for e in entries})
        _check_sparse(totals, list(weight_map), opts)
        for file in extras:
            shutil.copyfile(file, tmp / file.name)  # the content (an HF cache's links followed), usual mode
        index = {"metadata": {VERSION_KEY: FORMAT_VERSION, "total_size": totals.after},
                 "weight_map": weight_map}
        (tmp / SPARSE_INDEX).write_text(json.dumps(index, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result gets the usual mode
        replace_folder(tmp, out, opts.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return totals


def replace_folder(new: Path, out: Path, overwrite: bool) -> None:
    """Move the complete folder ``new`` onto ``out``: a missing or empty folder is claimed in one rename; a full
    one is moved aside first and deleted once ``new`` is in, with ``overwrite`` only. An output that another
    writer filled since the caller checked it is refused (``OutputExistsError``), never silently replaced."""
    taken = OutputExistsError(f"output {out} was written by another process while this one worked; nothing was "
                              "replaced (pass overwrite=True, CLI: --overwrite, to replace it)")
    if not out.is_dir() or not any(out.iterdir()):
        try:
            os.rename(new, out)  # fails on a folder that is no longer empty (or a file that appeared)
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as e:
            raise taken from e
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            raise taken from e
        return
    if not overwrite:
        raise taken
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.replace(out, old)  # onto the empty folder just made
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)  # the previous output stays
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class TensorInfo:
    """One row of ``prune inspect``: a logical tensor (its own shape), its storage format and bytes;
    ``transposed``: stored as its transpose in ``format`` (``label`` shows it as e.g. "2:4^T")."""

    name: str
    shape: tuple[int, ...]
    format: str
    dtype: torch.dtype
    sparsity: float
    nbytes: int  # bytes stored in the file for this tensor (all its parts)
    transposed: bool = False
    bits: int = 0  # bits per stored value (8 for the int8 formats; 0: those of dtype)
    scales: tuple[float, float] | None = None  # the int8 formats' smallest and largest row scale

    @property
    def value_bits(self) -> int:
        """Bits per stored value: 32 / 16 as its dtype, 8 for int8 formats."""
        return self.bits or 8 * torch.empty((), dtype=self.dtype).element_size()

    @property
    def label(self) -> str:
        """The format, with ``TRANSPOSED_MARK`` when stored transposed: "dense", "csr", "2:4", "2:4^T"."""
        return self.format + (TRANSPOSED_MARK if self.transposed else "")

    @property
    def dense_nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * torch.empty((), dtype=self.dtype).element_size()


def inspect_checkpoint(path: str | os.PathLike) -> Iterator[TensorInfo]:
    """Yield a TensorInfo per logical tensor of a dense or sparse checkpoint, loading one at a time."""
    for name, t in iter_tensors(path):
        if isinstance(t, torch.Tensor):
            yield TensorInfo(name, tuple(t.shape), DENSE, t.dtype, sparsity_of(t), t.numel() * t.element_size())
        else:
            numel = t.shape[0] * t.shape[1]
            sparsity = 1.0 - int(torch.count_nonzero(t.values)) / numel if numel else 0.0
            scales = getattr(t, "scales", None)
            span = None if scales is None or not scales.numel() else (float(scales.min()), float(scales.max()))
            yield TensorInfo(name, t.shape, t.format, t.dtype, sparsity, t.nbytes, isinstance(t, Transposed),
                             8 * t.values.element_size(), span)
