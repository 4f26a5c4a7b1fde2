"""Raw tensor files: open a checkpoint of any supported kind as named tensors, and stream-write safetensors.

Everything that can go wrong reading a file (missing, truncated, not the type its name says, a pickle that
``weights_only`` refuses) becomes a ``ValueError`` / ``FileNotFoundError`` naming the path and the reason.

Safetensors files are read by this module, not memory-mapped: the header is checked against the file size
(length, dtypes, shapes, offsets) before anything is allocated, and each tensor is read with one ``readinto``
into its own buffer, so a hostile header cannot make us allocate more than the file holds, and converting a
file larger than memory keeps one tensor resident at a time (a mapping would keep every page read so far).

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> with SafetensorsWriter(path) as w:
    ...     nbytes = w.add("a", torch.arange(3, dtype=torch.int16))
    ...     w.commit({"note": "hi"})
    >>> with open_raw(path) as src:
    ...     src.keys(), src.get("a").tolist(), src.metadata
    (['a'], [0, 1, 2], {'note': 'hi'})
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_ops.errors import MissingPathError, OutputExistsError, UserValueError

# dtype name (as in metadata) -> torch dtype, and torch dtype -> safetensors code.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}
_ST_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_FROM_CODES: dict[str, torch.dtype] = {code: dtype for dtype, code in _ST_CODES.items()}
HF_INDEX, HF_SINGLE, HF_PICKLE = "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"
SPARSE_INDEX = "model.sparse.safetensors.index.json"  # sharded sparse checkpoint: logical name -> shard
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit on a header (and ours on an index file)
# A parser fed a corrupted file may raise anything (the weights_only unpickler raises IndexError on garbage),
# so every Exception while reading a file becomes one ValueError naming the file.
_READ_ERRORS = (Exception,)


class BadFileError(UserValueError):
    """A file that cannot be used as a checkpoint; the message names the path and the reason."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a safetensors file lies: dtype, shape, absolute byte offset and length."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's checked header: ``__metadata__`` and every tensor's place in the file."""

    path: Path
    metadata: dict[str, str] | None
    tensors: dict[str, StoredTensor]


def read_header(path: Path) -> SafetensorsHeader:
    """Read and check a safetensors header; nothing beyond the header is read or allocated."""
    with _reading(path), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)  # little-endian u64: header length
        if len(head) < 8:
            raise BadFileError(f"cannot read {path}: {size} bytes is too short for a safetensors file")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise BadFileError(f"cannot read {path}: header length {n} exceeds the file ({size} bytes) "
                               f"or the limit ({MAX_HEADER_BYTES} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise BadFileError(f"cannot read {path}: header is not JSON ({type(e).__name__})") from None
        try:
            metadata, tensors = parse_header(header, size - 8 - n)
        except ValueError as e:
            raise BadFileError(f"cannot read {path}: {e}") from None
    return SafetensorsHeader(path, metadata, {k: dataclasses.replace(t, start=t.start + 8 + n)
                                              for k, t in tensors.items()})


def parse_header(header: object, data_bytes: int) -> tuple[dict[str, str] | None, dict[str, StoredTensor]]:
    """(metadata, tensors) of a decoded header whose data section holds ``data_bytes``; ValueError naming
    the first bad field. Offsets stay relative to the data section.

    Example:
        >>> parse_header({"a": {"dtype": "I16", "shape": [3], "data_offsets": [0, 6]}}, 6)[1]["a"].shape
        (3,)
        >>> parse_header({"a": {"dtype": "I16", "shape": [2**40], "data_offsets": [0, 6]}}, 6)
        Traceback (most recent call last):
        ...
        sparse_ops.errors.UserValueError: tensor 'a': shape [1099511627776] of I16 needs 2199023255552 bytes, data_offsets hold 6
    """
    if not isinstance(header, dict):
        raise UserValueError(f"header must be a JSON object, got {type(header).__name__}")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise UserValueError("__metadata__ must map strings to strings")
    return meta, {k: _stored(k, v, data_bytes) for k, v in header.items() if k != "__metadata__"}


def _stored(name: str, info: object, data_bytes: int) -> StoredTensor:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise UserValueError(f"tensor {name!r:.100} needs dtype, shape and data_offsets, got {info!r:.100}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in _FROM_CODES:
        raise UserValueError(f"tensor {name!r:.100}: unknown dtype {code!r:.40}; known: {', '.join(_FROM_CODES)}")
    if not isinstance(shape, list) or not all(type(s) is int and 0 <= s < 2**63 for s in shape):
        raise UserValueError(f"tensor {name!r:.100}: shape must be a list of non-negative ints, "
                         f"got {shape!r:.100}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise UserValueError(f"tensor {name!r:.100}: data_offsets must be two ints 0 <= begin <= end, "
                         f"got {offsets!r:.100}")
    if offsets[1] > data_bytes:
        raise UserValueError(f"tensor {name!r:.100}: data_offsets {offsets} lie beyond the {data_bytes} data "
                         f"bytes (a truncated file?)")
    nbytes = math.prod(shape) * _FROM_CODES[code].itemsize  # Python ints: no overflow
    if nbytes != offsets[1] - offsets[0]:
        raise UserValueError(f"tensor {name!r:.100}: shape {shape!r:.100} of {code} needs {nbytes} bytes, "
                         f"data_offsets hold {offsets[1] - offsets[0]}")
    return StoredTensor(_FROM_CODES[code], tuple(shape), offsets[0], nbytes)


def read_tensor(path: Path, t: StoredTensor) -> torch.Tensor:
    """One tensor's bytes read straight into a new CPU tensor (checked bytes only: see ``read_header``)."""
    with _reading(path), open(path, "rb", buffering=0) as f:  # torch.empty too: e.g. "Stride ... overflowed"
        out = torch.empty(t.shape, dtype=t.dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # (nbytes,) view of out's storage
        f.seek(t.start)
        done = 0
        while done < t.nbytes:  # one read(2) returns at most ~2 GiB
            got = f.readinto(buf[done:])
            if not got:
                raise BadFileError(f"cannot read {path}: file ends {t.nbytes - done} bytes early")
            done += got
    if t.dtype == torch.bool and t.nbytes and int(buf.obj.max()) > 1:
        raise BadFileError(f"cannot read {path}: a bool tensor holds bytes other than 0 and 1")
    return out


@dataclass
class RawSource:
    """Named tensors of one checkpoint, loaded one at a time by ``get``.

    ``files``: each safetensors file (one per shard) with its checked header; empty for a pickle, whose
    tensors are in ``state``. ``index``: a sharded sparse checkpoint's weight map (logical name -> shard).
    """

    path: Path
    key_files: dict[str, Path]  # stored tensor name -> safetensors file holding it
    files: dict[Path, SafetensorsHeader]
    state: Mapping[str, torch.Tensor] | None = None  # a weights_only-loaded (mmapped) state dict
    index: dict[str, str] | None = None

    @property
    def metadata(self) -> dict[str, str] | None:
        """The header metadata of a single-file source (None for several files or a pickle)."""
        return next(iter(self.files.values())).metadata if len(self.files) == 1 else None

    def keys(self) -> list[str]:
        return list(self.state) if self.state is not None else list(self.key_files)

    def get(self, key: str) -> torch.Tensor:
        if self.state is not None:
            return self.state[key]
        file = self.key_files[key]
        return read_tensor(file, self.files[file].tensors[key])

    def shards(self) -> list[RawSource]:
        """One source per safetensors file, in file-name order (a pickle: itself)."""
        if self.state is not None:
            return [self]
        return [RawSource(file, {k: f for k, f in self.key_files.items() if f == file},
                          {file: self.files[file]}) for file in sorted(self.files)]


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure while reading ``path`` into ValueError('cannot read PATH: reason')."""
    try:
        yield
    except (FileNotFoundError, BadFileError):
        raise
    except _READ_ERRORS as e:
        text = str(e).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        if isinstance(e, (KeyError, EOFError, pickle.UnpicklingError)):
            reason = f"not a valid checkpoint ({type(e).__name__}: {reason})"
        raise BadFileError(f"cannot read {path}: {reason}") from e


@contextlib.contextmanager
def open_raw(path: str | os.PathLike) -> Iterator[RawSource]:
    """Open a .safetensors file, a .pt/.bin state dict, a Hugging Face model directory, or an index file
    (``model.safetensors.index.json``, ``model.sparse.safetensors.index.json``)."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"no such file or directory: {path}")
    yield _open_dir(path) if path.is_dir() else _open_file(path)


def _open_file(path: Path) -> RawSource:
    if path.suffix == ".safetensors":
        return _open_safetensors({path: None})
    if path.suffix in PICKLE_SUFFIXES:
        return RawSource(path, {}, {}, state=_load_pickle(path))
    if path.name.endswith(".index.json"):
        return _open_index(path)
    raise UserValueError(f"unsupported file type {path.name!r}: expected .safetensors, "
                     f"{', '.join(PICKLE_SUFFIXES)}, an .index.json or a Hugging Face model directory")


def _open_dir(path: Path) -> RawSource:
    for name in (SPARSE_INDEX, HF_INDEX):
        if (path / name).is_file():
            return _open_index(path / name)
    if (path / HF_SINGLE).is_file():
        return _open_safetensors({path / HF_SINGLE: None})
    if (path / HF_PICKLE).is_file():
        return RawSource(path / HF_PICKLE, {}, {}, state=_load_pickle(path / HF_PICKLE))
    raise UserValueError(f"{path} is not a Hugging Face model directory: no {HF_INDEX}, {HF_SINGLE} or "
                     f"{HF_PICKLE} (nor a sparse {SPARSE_INDEX})")


def _open_index(index: Path) -> RawSource:
    """A sharded checkpoint from its index. HF's weight map names stored tensors (checked against each shard);
    a sparse index names logical tensors (checked by ``sparse_ops.checkpoint.schema``), kept in ``index``."""
    with _reading(index):
        if index.stat().st_size > MAX_HEADER_BYTES:
            raise UserValueError(f"index is larger than {MAX_HEADER_BYTES} bytes")
        obj = json.loads(index.read_text())
        weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserValueError("weight_map must map tensor names to shard file names")
    shards: dict[Path, list[str]] = {}
    for key, shard in weight_map.items():
        if Path(shard).name != shard or shard in ("", ".", ".."):  # no paths outside the model directory
            raise BadFileError(f"cannot read {index}: shard name {shard!r:.100} is not a plain file name")
        shards.setdefault(index.parent / shard, []).append(key)
    sparse = index.name.endswith(".sparse.safetensors.index.json")
    source = _open_safetensors({f: None for f in shards} if sparse else shards, index.parent)
    return dataclasses.replace(source, index=weight_map) if sparse else source


def _open_safetensors(files: dict[Path, list[str] | None], root: Path | None = None) -> RawSource:
    """Read each file's header; ``files`` maps a file to the keys an index expects in it (None: all)."""
    key_files: dict[str, Path] = {}
    headers: dict[Path, SafetensorsHeader] = {}
    for file, expected in files.items():
        if not file.is_file():
            raise MissingPathError(f"no such file: {file}")
        headers[file] = header = read_header(file)
        missing = set(expected or ()) - set(header.tensors)
        if missing:
            raise BadFileError(f"cannot read {file}: the index names tensors it lacks, e.g. {sorted(missing)[0]!r}")
        for k in expected if expected is not None else header.tensors:
            if k in key_files:
                raise BadFileError(f"cannot read {file}: tensor {k!r} is stored in {key_files[k].name} too")
            key_files[k] = file
    return RawSource(root or next(iter(files)), key_files, headers)


def _load_pickle(path: Path) -> Mapping[str, torch.Tensor]:
    """torch.load(weights_only=True) (mmapped when the file allows), then check it is a flat state dict."""
    with _reading(path):
        try:
            obj = _torch_load(path, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = _torch_load(path, mmap=False)  # legacy (non-zip) format
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise BadFileError(f"cannot read {path}: it holds a {type(obj).__name__}, not a state dict of tensors")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor) or v.layout != torch.strided:
            raise BadFileError(f"cannot read {path}: entry {k!r} is a {type(v).__name__} "
                             f"({getattr(v, 'layout', '-')}), expected a dense tensor")
    return obj


def _torch_load(path: Path, mmap: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if "unsupported" in ln.lower() or "global" in ln.lower()]
        detail = f" ({lines[0]})" if lines else ""
        raise BadFileError(f"refusing to load {path}: torch.load(weights_only=True) rejects this pickle{detail}; "
                         f"only state dicts of plain tensors are read") from None


class SafetensorsWriter:
    """Stream tensors into a safetensors file: data to a temporary file as they come, header written at
    ``commit``, then one ``os.replace`` onto ``path``. Leaving the ``with`` block without ``commit`` (an error)
    removes every temporary file and leaves ``path`` untouched. ``overwrite=False``: ``commit`` claims ``path``
    only if no file is there, at the moment of the rename (``OutputExistsError`` otherwise).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = True):
        self.path = Path(path)
        self.overwrite = overwrite
        if not self.path.parent.is_dir():
            raise MissingPathError(f"output folder does not exist: {self.path.parent}")
        self._header: dict[str, dict[str, object]] = {}
        self._offset = 0
        self._data = tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.",
                                                 suffix=".data.tmp", delete=False)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._data.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._data.name)

    def add(self, name: str, t: torch.Tensor) -> int:
        """Append one tensor; returns its bytes."""
        if name in self._header:
            raise UserValueError(f"tensor name {name!r} written twice")
        if t.dtype not in _ST_CODES:
            raise UserValueError(f"cannot store {name!r} of dtype {t.dtype}; storable: {', '.join(DTYPES)}")
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()  # (nbytes,) little-endian
        self._data.write(raw.data)
        self._header[name] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + raw.nbytes]}
        self._offset += raw.nbytes
        return raw.nbytes

    def commit(self, metadata: dict[str, str]) -> None:
        """Write header + data to a second temporary file and rename it onto ``path``."""
        header = json.dumps({"__metadata__": metadata, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
        self._data.flush()
        final = tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp",
                                            delete=False)
        try:
            with final, open(self._data.name, "rb") as data:
                final.write(struct.pack("<Q", len(header)) + header)
                while chunk := data.read(1 << 24):
                    final.write(chunk)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(final.name, 0o666 & ~umask)  # a temporary file is 0600; the result gets the usual mode
            if self.overwrite:
                os.replace(final.name, self.path)
            else:
                _claim(final.name, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final.name)
            raise


def _claim(tmp: str, path: Path) -> None:
    """Move the complete file ``tmp`` to ``path`` only if nothing is there (a hard link fails on an existing name,
    atomically; where links are not supported, a check just before the rename)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"output {path} was written by another process while this one worked; nothing was "
                                "replaced (pass overwrite=True, CLI: --overwrite, to replace it)") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise OutputExistsError(f"output {path} appeared while this process worked; nothing was replaced") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)
