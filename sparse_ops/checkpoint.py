"""Read, convert and write sparse checkpoints; load them into a model.

Sources: a ``.safetensors`` file (dense, or sparse as written here), a ``.pt`` / ``.bin`` state dict (read with
``torch.load(weights_only=True)``, never a full unpickle), or a Hugging Face model directory
(``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``); a sharded
sparse checkpoint as written here (its folder or its ``model.sparse.safetensors.index.json``).

Output: one safetensors file, or a folder of shards with an index (one shard per source shard). Each logical tensor is stored dense under its own name or as its format's parts
under ``<name>/<part>``; which one, and the format, shape and dtype of every tensor, live only in the file's
metadata (``sparse_ops.tensors``, JSON) beside ``sparse_ops.format_version``. Conversion streams tensor by
tensor (peak memory ~ 2x the largest tensor beyond the interpreter) into a temporary file in the destination folder, renamed at the end.

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
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from sparse_ops import activations
from sparse_ops.formats import (
    FORMATS,
    VALUE_DTYPES,
    SparseFormat,
    csr_nbytes,
    format_class,
    is_two_four,
    two_four_nbytes,
)
from sparse_ops.tensorio import DTYPES, SPARSE_INDEX, BadFileError, RawSource, SafetensorsWriter, open_raw

FORMAT_VERSION = "1"
VERSION_KEY = "sparse_ops.format_version"
TENSORS_KEY = "sparse_ops.tensors"
CONVERT_FORMATS = ("csr", "2:4", "auto")
DENSE = "dense"
TWO_FOUR_MIN_SPARSITY = 0.5  # a 2:4 tensor is at least 50% sparse; below that a tensor stays dense
EMBEDDING = re.compile(r"embed|(^|\.)(wte|wpe)(\.|$)")  # names of embedding tables (stay dense by default)


@dataclass(frozen=True)
class Entry:
    """One logical tensor of a file: format, shape, dtype, and the stored tensor name of each part."""

    name: str
    format: str
    shape: tuple[int, ...] | None  # None: a plain (dense) file, nothing declared beyond the tensor itself
    dtype: torch.dtype | None
    parts: dict[str, str]

    def to_json(self) -> dict[str, object]:
        dtype = str(self.dtype).removeprefix("torch.")
        return {"format": self.format, "shape": list(self.shape), "dtype": dtype, "parts": self.parts}


def _part_names(fmt: str) -> tuple[str, ...]:
    return ("tensor",) if fmt == DENSE else format_class(fmt).PARTS


def _parse_entry(name: str, info: object, stored: set[str]) -> Entry:
    """Validate one metadata record against the file's stored tensor names; ValueError naming the problem."""
    if not isinstance(info, dict) or set(info) != {"format", "shape", "dtype", "parts"}:
        raise ValueError(f"metadata of {name!r} must have keys format, shape, dtype, parts; got {info!r:.200}")
    fmt, shape, dtype, parts = info["format"], info["shape"], info["dtype"], info["parts"]
    if not isinstance(fmt, str) or (fmt != DENSE and fmt not in FORMATS):  # a list would be unhashable
        raise ValueError(f"metadata format of {name!r} is {fmt!r}; known: {DENSE}, {', '.join(FORMATS)}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"metadata shape of {name!r} must be a list of non-negative ints, got {shape!r:.100}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"metadata dtype of {name!r} must be one of {', '.join(DTYPES)}; got {dtype!r:.100}")
    expected = set(_part_names(fmt))
    if (not isinstance(parts, dict) or set(parts) != expected
            or not all(isinstance(v, str) and v in stored for v in parts.values())):
        raise ValueError(f"metadata parts of {name!r} must map {sorted(expected)} to stored tensors, "
                         f"got {parts!r:.200}")
    if fmt != DENSE and (len(shape) != 2 or DTYPES[dtype] not in VALUE_DTYPES):
        raise ValueError(f"{fmt} tensor {name!r} must be 2-D with float32/float16/bfloat16 values, "
                         f"got shape {shape} dtype {dtype}")
    return Entry(name, fmt, tuple(shape), DTYPES[dtype], dict(parts))


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
            raise ValueError(f"{TENSORS_KEY} must be a JSON object")
        entries = [_parse_entry(name, info, stored) for name, info in records.items()]
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BadFileError(f"cannot read {src.path}: bad metadata: {e}") from None
    used = [p for e in entries for p in e.parts.values()]
    if len(used) != len(set(used)) or set(used) != stored:
        raise BadFileError(f"cannot read {src.path}: metadata and stored tensors disagree "
                           f"({len(set(used))} described, {len(stored)} stored, {len(used)} references)")
    return entries


def load_entry(src: RawSource, entry: Entry) -> torch.Tensor | SparseFormat:
    """Load one logical tensor, checked against its metadata (a format object validates all its invariants)."""
    parts = {part: src.get(stored) for part, stored in entry.parts.items()}
    if entry.format == DENSE:
        t = parts["tensor"]
        if entry.shape is not None and (tuple(t.shape) != entry.shape or t.dtype != entry.dtype):
            raise BadFileError(f"cannot read {src.path}: {entry.name!r} is {t.dtype} {tuple(t.shape)}, "
                               f"metadata says {entry.dtype} {entry.shape}")
        return t
    try:
        fmt = format_class(entry.format).from_parts(parts, entry.shape)
    except ValueError as e:
        raise BadFileError(f"cannot read {src.path}: {entry.name!r}: {e}") from None
    if fmt.dtype != entry.dtype:
        raise BadFileError(f"cannot read {src.path}: {entry.name!r} has {fmt.dtype} values, metadata says {entry.dtype}")
    return fmt


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor | SparseFormat]]:
    """(name, dense tensor or format object) for each logical tensor of a checkpoint, one at a time."""
    with open_raw(path) as src:
        for entry in read_entries(src):
            yield entry.name, load_entry(src, entry)


def load_sparse_state_dict(path: str | os.PathLike, dense: bool = False) -> dict[str, torch.Tensor | SparseFormat]:
    """A checkpoint's tensors: sparse ones as format objects (or dense tensors with ``dense=True``)."""
    return {name: (t.to_dense() if dense and not isinstance(t, torch.Tensor) else t)
            for name, t in iter_tensors(path)}


# --- conversion ---

@dataclass(frozen=True)
class ConvertSummary:
    """What ``convert_checkpoint`` did: tensor counts and data bytes before/after (headers aside)."""

    src: str
    dst: str
    format: str
    tensors: int
    converted: int
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_after / max(self.bytes_before, 1)


def sparsity_of(t: torch.Tensor) -> float:
    """Fraction of exact zeros (0.0 for an empty tensor)."""
    return 1.0 - int(torch.count_nonzero(t)) / t.numel() if t.numel() else 0.0


def choose_storage(name: str, t: torch.Tensor, format: str, min_sparsity: float | None,
                   embeddings: bool = False) -> str:
    """"dense", "csr" or "2:4" for one tensor (see ``convert_checkpoint``); ValueError on a non-2:4 tensor
    when 2:4 is asked for."""
    if t.dim() != 2 or t.dtype not in VALUE_DTYPES or (EMBEDDING.search(name) and not embeddings):
        return DENSE
    shape, nnz, dense_bytes = tuple(t.shape), int(torch.count_nonzero(t)), t.numel() * t.element_size()
    sparsity = 1.0 - nnz / max(t.numel(), 1)
    if format == "2:4":
        if sparsity < (TWO_FOUR_MIN_SPARSITY if min_sparsity is None else min_sparsity):
            return DENSE
        if not is_two_four(t):
            format_class("2:4").from_dense(t)  # raises, naming the shape or the count of bad groups
        return "2:4"
    csr_ok = csr_nbytes(shape, nnz, t.dtype) < dense_bytes if min_sparsity is None else sparsity >= min_sparsity
    if format == "csr":
        return "csr" if csr_ok else DENSE
    # auto: the smallest of what applies; a 2:4 tensor is ~53% (fp32) of dense whatever its sparsity
    sizes = {DENSE: dense_bytes}
    if csr_ok:
        sizes["csr"] = csr_nbytes(shape, nnz, t.dtype)
    if is_two_four(t) and (min_sparsity is None or sparsity >= min_sparsity):
        sizes["2:4"] = two_four_nbytes(shape, t.dtype)
    return min(sizes, key=sizes.__getitem__)


@dataclass(frozen=True)
class _Options:
    format: str
    min_sparsity: float | None
    embeddings: bool
    progress: bool


@dataclass(frozen=True)
class _Totals:
    tensors: int = 0
    converted: int = 0
    before: int = 0
    after: int = 0

    def __add__(self, other: _Totals) -> _Totals:
        return _Totals(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def _is_dir_output(dst: Path) -> bool:
    """A path without a suffix (or an existing folder) asks for a sharded output folder."""
    return dst.is_dir() or (dst.suffix == "" and not dst.exists())


def _check_convert_args(src: Path, dst: Path, format: str, min_sparsity: float | None) -> None:
    if format not in CONVERT_FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: {', '.join(CONVERT_FORMATS)}")
    if min_sparsity is not None and not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if dst.suffix != ".safetensors" and not _is_dir_output(dst):
        raise ValueError(f"output must be a .safetensors file or a folder (for sharded output), "
                         f"got {dst.name!r}")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"output {dst} is the input; choose another path")
    if dst.is_dir() and any(dst.iterdir()):
        raise ValueError(f"output folder {dst} is not empty; choose a new or empty folder")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {dst.parent}")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, format: str = "csr",
                       min_sparsity: float | None = None, *, embeddings: bool = False,
                       progress: bool = False) -> ConvertSummary:
    """Write ``src`` as a sparse safetensors file ``dst``, one tensor at a time; returns a summary.

    Converted: 2-D fp32/fp16/bf16 tensors (embeddings only with ``embeddings=True``) whose sparsity is at least
    ``min_sparsity``; by default, csr where its storage is smaller than dense, 2:4 from 50% sparsity (a tensor
    that is that sparse but not 2:4 is an error), "auto" the smallest of dense/csr/2:4 per tensor. Speed is
    chosen where the model runs: ``sparsify``'s per-batch plan (``sparse_ops.plan``).

    ``dst`` a folder (a new or empty one, or a path without a suffix): one sparse shard per source shard,
    ``model-0000k-of-0000n.sparse.safetensors``, and ``model.sparse.safetensors.index.json`` mapping each
    tensor name to its shard; the folder appears complete or not at all.
    """
    src, dst = Path(src), Path(dst)
    _check_convert_args(src, dst, format, min_sparsity)
    opts = _Options(format, min_sparsity, embeddings, progress)
    with open_raw(src) as source:
        if _is_dir_output(dst):
            t = _convert_sharded(source, dst, opts)
        else:
            t = _convert_file(source, read_entries(source), dst, opts)
    return ConvertSummary(str(src), str(dst), format, t.tensors, t.converted, t.before, t.after)


def _convert_file(source: RawSource, entries: list[Entry], dst: Path, opts: _Options) -> _Totals:
    """Convert ``entries`` of ``source`` into one safetensors file ``dst`` (atomically)."""
    records, totals = {}, _Totals()
    with SafetensorsWriter(dst) as writer:
        bar = None if opts.progress else True  # tqdm's disable=None: a bar on a terminal only
        for entry in tqdm(entries, desc="convert", unit="tensor", disable=bar):
            records[entry.name], t = _convert_entry(source, entry, writer, opts)
            totals += t
        writer.commit({VERSION_KEY: FORMAT_VERSION, TENSORS_KEY: json.dumps(records)})
    return totals


def _convert_entry(source: RawSource, entry: Entry, writer: SafetensorsWriter, opts: _Options
                   ) -> tuple[dict[str, object], _Totals]:
    """Load, choose, encode and write one tensor; its buffers are freed on return (peak ~ one tensor)."""
    t = load_entry(source, entry)
    t = t if isinstance(t, torch.Tensor) else t.to_dense()
    try:
        fmt = choose_storage(entry.name, t, opts.format, opts.min_sparsity, opts.embeddings)
    except ValueError as e:
        raise ValueError(f"{entry.name}: {e}") from None
    parts = {"tensor": t} if fmt == DENSE else format_class(fmt).from_dense(t).parts()
    names = {p: entry.name if fmt == DENSE else f"{entry.name}/{p}" for p in parts}
    after = sum(writer.add(names[p], v) for p, v in parts.items())
    record = Entry(entry.name, fmt, tuple(t.shape), t.dtype, names).to_json()
    return record, _Totals(1, int(fmt != DENSE), t.numel() * t.element_size(), after)


def _convert_sharded(source: RawSource, out: Path, opts: _Options) -> _Totals:
    """One output shard per source shard, built in a hidden sibling folder renamed onto ``out`` at the end."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        shards = shard_entries(source)
        weight_map, totals = {}, _Totals()
        for k, (shard, entries) in enumerate(shards, 1):
            name = f"model-{k:05d}-of-{len(shards):05d}.sparse.safetensors"
            totals += _convert_file(shard, entries, tmp / name, opts)
            weight_map.update({e.name: name for e in entries})
        index = {"metadata": {VERSION_KEY: FORMAT_VERSION, "total_size": totals.after},
                 "weight_map": weight_map}
        (tmp / SPARSE_INDEX).write_text(json.dumps(index, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result gets the usual mode
        os.replace(tmp, out)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return totals


# --- loading into a model ---

def _split_state(state: Mapping[str, torch.Tensor | SparseFormat], model: nn.Module
                 ) -> tuple[dict[str, torch.Tensor], dict[str, SparseFormat]]:
    """(dense tensors to load_state_dict, sparse weights of nn.Linear modules to swap); sparse weights of
    other modules are densified and loaded as ordinary parameters."""
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    dense, swap = {}, {}
    for key, value in state.items():
        module = key.rpartition(".")[0]
        if isinstance(value, torch.Tensor):
            dense[key] = value
        elif key.endswith(".weight") and module in linears:
            swap[module] = value
        else:
            dense[key] = value.to_dense()
    return dense, swap


KERNEL_CHOICES = ("auto", "ours", "torch")  # sparsify(kernel=...)


def sparsify(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor | SparseFormat],
             device: torch.device | str = "cpu", *, kernel: str = "auto", batches: tuple[int, ...] = (),
             timer=None, cache=None, verbose: bool = False, fuse_activations: bool = False,
             fuse: bool = False) -> nn.Module:
    """Load a checkpoint into ``model`` (in place) and swap each ``nn.Linear`` whose weight is stored sparse
    for a ``SparseLinear`` on ``device``; returns the model.

    ``kernel="auto"`` (the default): each layer picks, per batch bucket, the fastest of dense, our kernels and
    torch's, measured on this machine at the first call in the bucket (or at load for ``batches``) and cached
    on disk, so that no layer runs slower than dense (``sparse_ops.plan``; ``plan.plan_report(model)`` shows
    the choices, ``verbose=True`` prints them as they are made; ``timer`` and ``cache`` replace the timer and
    the on-disk cache). ``kernel="ours"`` pins our kernels, ``"torch"`` torch's (where it has one) for every
    sparse layer at every batch, measuring nothing.
    ``fuse_activations=True`` then moves each activation module that only consumes a sparse layer's output into
    that layer's kernel (``sparse_ops.activations.fuse_activations``: e.g. the GELU of a BERT FFN).
    ``fuse=True`` runs every proven fusion (``sparse_ops.fusion.fuse``): the activations, each feed-forward
    block of two sparse layers as one kernel call (the pair's state dict keys move under the second), and the
    residual add and LayerNorm after a sparse layer in its kernel; and a ``transformers`` model's attention goes
    to our kernel where it is faster than SDPA (``sparse_ops.attention.use_fast_attention``).
    """
    from sparse_ops.linear import SparseLinear
    from sparse_ops.plan import Planner

    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNEL_CHOICES)}")
    if any(not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batches must be positive token counts, got {batches!r}")
    planner = Planner(timer=timer, cache=cache, verbose=verbose) if kernel == "auto" else None
    state = source if isinstance(source, Mapping) else load_sparse_state_dict(source)
    dense, swap = _split_state(state, model)
    result = model.load_state_dict(dense, strict=False)
    missing = _untied(model, set(result.missing_keys) - {f"{m}.weight" for m in swap}, set(dense))
    if result.unexpected_keys or missing:
        bad = sorted(result.unexpected_keys)[:1] or sorted(missing)[:1]
        raise ValueError(f"checkpoint does not fit the model: {len(result.unexpected_keys)} unexpected and "
                         f"{len(missing)} missing tensors, e.g. {bad[0]!r}")
    model.to(device)
    for name, weight in swap.items():
        linear = model.get_submodule(name)
        if tuple(linear.weight.shape) != weight.shape:
            raise ValueError(f"{name}.weight is {weight.shape} in the checkpoint, {tuple(linear.weight.shape)} "
                             f"in the model")
        weight = dataclasses.replace(weight, values=weight.values.to(linear.weight.dtype)).to(device)
        layer = SparseLinear(weight, linear.bias.detach() if linear.bias is not None else None,
                             torch_kernel=kernel == "torch", planner=planner, name=name)
        for b in batches:
            layer.route(b)  # measured (or read from the cache) now rather than at the first call
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    if fuse:
        from sparse_ops.attention import use_fast_attention
        from sparse_ops.fusion import fuse as fuse_all

        fuse_all(model)
        use_fast_attention(model)
    elif fuse_activations:
        activations.fuse_activations(model)
    return model


def _untied(model: nn.Module, missing: set[str], loaded: set[str]) -> set[str]:
    """Missing keys that are not tied to (the same tensor as) a loaded one; HF files omit tied copies."""
    tensors = model.state_dict(keep_vars=True)
    names_of: dict[int, set[str]] = {}
    for name, t in tensors.items():
        names_of.setdefault(id(t), set()).add(name)
    return {k for k in missing if not names_of[id(tensors[k])] & loaded}


# --- inspection ---

@dataclass(frozen=True)
class TensorInfo:
    """One row of ``prune inspect``: a logical tensor, its storage format and bytes."""

    name: str
    shape: tuple[int, ...]
    format: str
    dtype: torch.dtype
    sparsity: float
    nbytes: int  # bytes stored in the file for this tensor (all its parts)

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
            yield TensorInfo(name, t.shape, t.format, t.dtype, sparsity, t.nbytes)
