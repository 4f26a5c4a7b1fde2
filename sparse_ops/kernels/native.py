"""Build and load our C++ CPU kernels (``sparse_ops/csrc/sparse_cpu.cpp``): compiled at first use, cached.

The source has no torch headers, so ``g++ -O3 -march=native -fopenmp`` builds it in about 2 s; the shared
library is loaded with ctypes (which releases the GIL during calls). It links ``libgomp.so.1``, which the
loader resolves to the copy torch already loaded, so our parallel loops use torch's OpenMP thread pool and
we pass ``torch.get_num_threads()``: the two never oversubscribe the cores.

Cache: ``$SPARSE_OPS_CACHE`` or ``~/.cache/sparse_ops``, one file per hash of (source, flags, compiler, CPU
flags), written to a temporary name and renamed, so concurrent processes never load half a file. The only
process state is ``_load``'s ``functools.cache`` of the loaded library (or of the reason it is unavailable).
``SPARSE_OPS_NATIVE=0`` disables the native kernels (the torch kernels are used instead).

Example:
    >>> lib = library()
    >>> lib is None or lib.sparse_cpu_abi_version() == ABI_VERSION
    True
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "sparse_cpu.cpp"
ABI_VERSION = 10
# -fno-trapping-math lets the epilogue's floor and float -> int conversions vectorise (no FP exception flags)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno",
         "-fno-trapping-math")

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# Every entry point ends with the post-op's arguments (sparse_cpu.cpp, Post): kind, residual, gamma, beta, eps
_POST = (_INT, _P, _P, _P, ctypes.c_float)
NO_POST = (0, None, None, None, 0.0)  # kind POST_NONE: y is the product (and activation) alone
# entry point -> argument types (pointers as integers from Tensor.data_ptr(); NULL bias as None)
SIGNATURES: dict[str, tuple[type, ...]] = {
    # rowptr, col, val, out, in, x, n, bias, y, threads, activation code
    **{f"csr_{v}_{i}": (_P, _P, _P, _I64, _I64, _P, _I64, _P, _P, _INT, _INT, *_POST)
       for v in ("f32", "bf16") for i in ("i16", "i32")},
    # val, meta, out, in, x, n, bias, y, threads, activation code
    **{f"two_four_{v}": (_P, _P, _I64, _I64, _P, _I64, _P, _P, _INT, _INT, *_POST) for v in ("f32", "bf16")},
    # seg, lcol, val, out, in, rows per block, panel width, x, tile, n, bias, y, threads, activation code
    **{f"csr_panels_{v}": (_P, _P, _P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, _P, _INT, _INT, *_POST)
       for v in ("f32", "bf16")},
    # gate seg, lcol, val (NULL: no gate), up seg, lcol, val, down seg, lcol, val, in, hidden, out, rows per
    # block, panel width, x, tile, n, gate bias, up bias, down bias, y, threads, activation code (of the gate,
    # else of the up layer)
    **{f"csr_ffn_{v}": (*(_P,) * 9, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _P, _INT, _INT,
                        *_POST) for v in ("f32", "bf16")},
}


def _check_status(status: int, fn: object, _args: tuple) -> int:
    """ctypes errcheck of the kernel entry points: 0 is success (returned), 1 means the packed-x buffer was not
    allocated (MemoryError)."""
    if status:
        raise MemoryError(f"{getattr(fn, '__name__', fn)}: out of memory for the packed input ({status=})")
    return status


def open_library(path: str | os.PathLike) -> ctypes.CDLL:
    """Load a build of ``sparse_cpu.cpp`` with the entry points' signatures and status check bound (also used
    for other builds: ``benchmarks/kernel_ab.py``, the -march tests)."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype, fn.errcheck = argtypes, ctypes.c_int, _check_status
    return lib


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_OPS_CACHE") or Path.home() / ".cache" / "sparse_ops")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build_key(compiler: str) -> str:
    """Hash of everything the binary depends on: source, flags, compiler version, this CPU's features."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (" ".join(FLAGS), version, _cpu_flags(), str(ABI_VERSION)):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build(compiler: str | None = None) -> Path:
    """Compile the library unless the cache holds it; return its path. Raise RuntimeError on failure."""
    compiler = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    target = cache_dir() / f"sparse_cpu_{build_key(compiler)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed building {SOURCE.name}:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent process sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _load() -> ctypes.CDLL | str:
    """The loaded library, or why it is unavailable (a string). Cached for the process: build once."""
    try:
        import torch.nn.functional  # noqa: F401  (torch, hence its libgomp.so.1, is loaded before our library)

        lib = open_library(build())
        if lib.sparse_cpu_abi_version() != ABI_VERSION:
            return f"ABI version {lib.sparse_cpu_abi_version()} != {ABI_VERSION}"
        return lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"


def library() -> ctypes.CDLL | None:
    """The native kernels, or None when disabled (``SPARSE_OPS_NATIVE=0``) or unbuildable (logged once)."""
    if os.environ.get("SPARSE_OPS_NATIVE", "1") == "0":
        return None
    lib = _load()
    if isinstance(lib, str):
        _warn_unavailable(lib)
        return None
    return lib


@functools.cache
def _warn_unavailable(reason: str) -> None:
    log.warning("sparse_ops native CPU kernels unavailable, using torch's: %s", reason)


def available() -> bool:
    return library() is not None


def num_threads() -> int:
    """Threads for our parallel loops: torch's intra-op count, so the shared OpenMP pool is not exceeded."""
    return max(1, torch.get_num_threads())
