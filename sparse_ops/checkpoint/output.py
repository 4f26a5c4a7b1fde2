"""Where conversion may write, and how an output folder is put in place.

An output is a ``.safetensors`` file, or a folder (an existing one, or a new path that does not name a weight
file: ``s0.5`` is a folder, ``x.pt`` is not). It is never the source, never inside the source folder, never a
folder holding the source, and never an existing file or a non-empty folder unless ``overwrite`` (even then only
a file or a sparse checkpoint folder, one holding ``SPARSE_INDEX``, is replaced). Files are written and
claimed atomically by ``tensorio.SafetensorsWriter``; folders are built beside the output and moved in whole
by ``replace_folder``.

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> is_dir_output(d / "s0.5"), is_dir_output(d / "model.pt"), is_weight_file("model.safetensors.index.json")
    (True, False, True)
    >>> check_output_path(d / "model.pt", d / "sparse.safetensors", overwrite=False)  # a new file: fine
    >>> try:  # the output would land in the folder being read
    ...     check_output_path(d, d / "sparse.safetensors", overwrite=False)
    ... except ValueError as e:
    ...     print("lies inside the source folder" in str(e))
    True
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from sparse_ops.errors import MissingPathError, OutputExistsError, UserValueError
from sparse_ops.tensorio import SPARSE_INDEX

# Files of a model folder that hold weights (of any framework) or an index of them: converted, or left out, when
# a folder converts to a folder; every other file (config, tokenizer, ...) is copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
INDEX_SUFFIX = ".index.json"


def is_weight_file(name: str) -> bool:
    """A file name of weights or of an index of them (``WEIGHT_SUFFIXES``, ``*.index.json``)."""
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(INDEX_SUFFIX)


def check_output_path(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse, before anything is read, an output ``dst`` of ``src`` that is neither a .safetensors file nor a
    folder, could replace what ``src`` reads, exists (unless ``overwrite``), or lies in a missing folder."""
    if dst.suffix != ".safetensors" and not is_dir_output(dst):
        raise UserValueError(f"output must be a .safetensors file or a folder (for sharded output), "
                             f"got {dst.name!r}")
    _check_not_source(src, dst)
    _check_existing_output(dst, overwrite)
    if not dst.parent.is_dir():
        raise MissingPathError(f"output folder does not exist: {dst.parent}")


def is_dir_output(dst: Path) -> bool:
    """An existing folder, or a new path that does not name a weight file (``s0.5`` is a folder; ``x.pt`` is
    not), asks for a sharded output folder."""
    return dst.is_dir() or (not dst.exists() and not is_weight_file(dst.name))


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
    if is_dir_output(dst) and s.is_relative_to(d):
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
