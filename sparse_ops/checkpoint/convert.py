"""Conversion: a dense (or sparse) checkpoint written as a sparse one, tensor by tensor.

``convert_checkpoint`` reads every source ``tensorio.open_raw`` opens, chooses each tensor's storage
(``layout.choose_layout``), encodes it, and streams it into a temporary file beside the output, renamed onto it
at the end (``tensorio.SafetensorsWriter``); a folder output gets one shard per source shard, built in a hidden
sibling folder and moved in whole (``output.replace_folder``). Memory holds about one tensor at a time (the
one being converted and its encoding), never the whole checkpoint. A checkpoint with nothing sparse in it is
refused unless ``allow_dense=True``.

Example: the package docstring (``sparse_ops.checkpoint``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sparse_ops.checkpoint.layout import EMBEDDING, INT8_TWINS, choose_layout, sparsity_of
from sparse_ops.checkpoint.output import check_output_path, is_dir_output, is_weight_file, replace_folder
from sparse_ops.checkpoint.schema import (
    DENSE,
    FORMAT_VERSION,
    TENSORS_KEY,
    VERSION_KEY,
    Entry,
    load_entry,
    read_entries,
    shard_entries,
)
from sparse_ops.errors import UserValueError
from sparse_ops.formats import VALUE_DTYPES, SparseFormat
from sparse_ops.quantized import CLIPS, QMAX
from sparse_ops.registry import AUTO, FORMATS, QUANTIZED, format_class
from sparse_ops.tensorio import SPARSE_INDEX, RawSource, SafetensorsWriter, open_raw

CONVERT_FORMATS = (*FORMATS, AUTO)  # "auto": per tensor, whichever stores it smaller
QUANTIZE = ("int8",)  # convert_checkpoint(quantize=...): values as symmetric int8 with per-row scales
PRE_FINALIZE_KEY = ".parametrizations."  # in the keys of a model saved with its Pruner still attached


def extra_files(src: str | os.PathLike) -> list[Path]:
    """The files a folder-to-folder conversion copies: every file of a model folder ``src`` (links followed;
    subfolders not) but weights and weight indexes (``output.WEIGHT_SUFFIXES``, ``*.index.json``); none for a file.

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
    return sorted(p for p in src.iterdir() if p.is_file() and not is_weight_file(p.name))


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
        if is_dir_output(dst):
            copied = extra_files(src)
            t = _convert_sharded(source, dst, opts, copied)
        else:
            t = _convert_file(source, read_entries(source), dst, opts, final=True)
    return ConvertSummary(str(src), str(dst), format, t.tensors, t.converted, t.before, t.after,
                          tuple(p.name for p in copied))


def _check_convert_args(src: Path, dst: Path, format: str, min_sparsity: float | None, overwrite: bool,
                        quantize: str | None = None, clip: str = "absmax") -> None:
    """Refuse, before anything is read, an unknown format, quantize, clip or min_sparsity (a ValueError naming
    what is allowed) and an output path conversion may not write (``output.check_output_path``)."""
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
    check_output_path(src, dst, overwrite)


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
