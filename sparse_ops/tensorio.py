"""Raw tensor files: open a checkpoint of any supported kind as named tensors, and stream-write safetensors.

Everything that can go wrong reading a file (missing, truncated, not the type its name says, a pickle that
``weights_only`` refuses) becomes a ``ValueError`` / ``FileNotFoundError`` naming the path and the reason.

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
import json
import os
import pickle
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

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
HF_INDEX, HF_SINGLE, HF_PICKLE = "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# A parser fed a corrupted file may raise anything (the weights_only unpickler raises IndexError on garbage),
# so every Exception while reading a file becomes one ValueError naming the file.
_READ_ERRORS = (Exception,)


class BadFileError(ValueError):
    """A file that cannot be used as a checkpoint; the message names the path and the reason."""


@dataclass
class RawSource:
    """Named tensors of one checkpoint, loaded one at a time by ``get``; ``metadata`` of a single file."""

    path: Path
    key_files: dict[str, Path]  # tensor name -> safetensors file holding it (empty for a pickle)
    metadata: dict[str, str] | None
    state: Mapping[str, torch.Tensor] | None = None  # a weights_only-loaded (mmapped) state dict
    _handles: dict[Path, object] = field(default_factory=dict)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def keys(self) -> list[str]:
        return list(self.state) if self.state is not None else list(self.key_files)

    def get(self, key: str) -> torch.Tensor:
        if self.state is not None:
            return self.state[key]
        file = self.key_files[key]
        with _reading(file):
            if file not in self._handles:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
            return self._handles[file].get_tensor(key)


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
    """Open a .safetensors file, a .pt/.bin state dict, or a Hugging Face model directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    source = _open_dir(path) if path.is_dir() else _open_file(path)
    with source._stack:
        yield source


def _open_file(path: Path) -> RawSource:
    if path.suffix == ".safetensors":
        return _open_safetensors({path: None})
    if path.suffix in PICKLE_SUFFIXES:
        return RawSource(path, {}, None, state=_load_pickle(path))
    raise ValueError(f"unsupported file type {path.name!r}: expected .safetensors, "
                     f"{', '.join(PICKLE_SUFFIXES)} or a Hugging Face model directory")


def _open_dir(path: Path) -> RawSource:
    if (path / HF_INDEX).is_file():
        with _reading(path / HF_INDEX):
            weight_map = json.loads((path / HF_INDEX).read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map must map tensor names to shard file names")
        shards = {}
        for key, shard in weight_map.items():
            if Path(shard).name != shard:  # no paths outside the model directory
                raise BadFileError(f"cannot read {path / HF_INDEX}: shard name {shard!r} is not a plain file name")
            shards.setdefault(path / shard, []).append(key)
        return _open_safetensors(shards, path)
    for name, opener in ((HF_SINGLE, lambda p: _open_safetensors({p: None})),
                         (HF_PICKLE, lambda p: RawSource(p, {}, None, state=_load_pickle(p)))):
        if (path / name).is_file():
            return opener(path / name)
    raise ValueError(f"{path} is not a Hugging Face model directory: no {HF_INDEX}, {HF_SINGLE} or {HF_PICKLE}")


def _open_safetensors(files: dict[Path, list[str] | None], root: Path | None = None) -> RawSource:
    """Read each file's header (all keys, metadata); ``files`` maps a file to the keys an index expects in it."""
    key_files, metadata = {}, None
    for file, expected in files.items():
        if not file.is_file():
            raise FileNotFoundError(f"no such file: {file}")
        with _reading(file), safe_open(str(file), framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata()
        missing = set(expected or ()) - set(keys)
        if missing:
            raise BadFileError(f"cannot read {file}: the index names tensors it lacks, e.g. {sorted(missing)[0]!r}")
        key_files.update({k: file for k in (expected if expected is not None else keys)})
    return RawSource(root or next(iter(files)), key_files, metadata if len(files) == 1 else None)


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
    removes every temporary file and leaves ``path`` untouched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"output folder does not exist: {self.path.parent}")
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
            raise ValueError(f"tensor name {name!r} written twice")
        if t.dtype not in _ST_CODES:
            raise ValueError(f"cannot store {name!r} of dtype {t.dtype}; storable: {', '.join(DTYPES)}")
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
            os.replace(final.name, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final.name)
            raise
