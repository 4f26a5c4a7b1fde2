"""Build and load our C++ CPU kernels (``sparse_ops/csrc/sparse_cpu.cpp``): compiled at first use, cached.

The source has no torch headers, so ``g++ -O3`` builds it in a few seconds; the shared library is loaded with
ctypes (which releases the GIL during calls). It links ``libgomp.so.1``, which the loader resolves to the copy
torch already loaded: our parallel loops (``csrc/work_pool.h``) run on torch's OpenMP threads while the machine
is quiet, and on our own work pool, which never waits for a thread that has not started, while joins show a
competing process (``threading()``); a call uses ``torch.get_num_threads()`` threads, the caller among them.

Targets (``ISAS``): the kernels are built for one named instruction set, not ``-march=native``, so a figure
measured for "avx2" means the same binary on every x86 CPU: ``avx512`` (x86-64-v4), ``avx2`` (x86-64-v3:
AVX2 + FMA), ``x86-64`` (SSE2 baseline) and ``neon`` (aarch64). The default is the best one this CPU runs;
``SPARSE_OPS_ISA=avx2`` chooses another (refused, with the reason logged, when the CPU lacks it). The vector
width and register blocking follow the target (``sparse_cpu.cpp``: ``VW``); the cache sizes the tiling depends
on are read from this machine (``caches()``) and compiled in as constants.

Cache: ``$SPARSE_OPS_CACHE`` or ``~/.cache/sparse_ops``, one file per hash of (source, flags, compiler, target,
cache sizes), written to a temporary name and renamed, so concurrent processes never load half a file. The only
process state is ``_load``'s ``functools.cache`` of the loaded library (or of the reason it is unavailable).
``SPARSE_OPS_NATIVE=0`` disables the native kernels (the torch kernels are used instead).

Example:
    >>> lib = library()
    >>> lib is None or lib.sparse_cpu_abi_version() == ABI_VERSION
    True
    >>> isa() in ISAS
    True
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_ops.errors import UnavailableError, UserValueError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "sparse_cpu.cpp"
HEADERS = tuple(sorted(SOURCE.parent.glob("*.h")))  # included by SOURCE: part of the build key
ABI_VERSION = 17
# -fno-trapping-math lets the epilogue's floor and float -> int conversions vectorise (no FP exception flags);
# the target's -march and the cache constants are added by build_flags
FLAGS = ("-O3", "-fopenmp", "-pthread", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno", "-fno-trapping-math")


@dataclass(frozen=True)
class Isa:
    """A target the kernels are built for: ``-march=<march>``, run on ``machine`` CPUs having ``cpu_flags``."""

    name: str
    machine: str  # platform.machine()
    march: str
    cpu_flags: frozenset[str] = frozenset()  # /proc/cpuinfo flags the build's instructions need


# Best first: isa() takes the first this CPU runs. x86-64-v3 / v4 as the psABI defines them.
ISAS: dict[str, Isa] = {i.name: i for i in (
    Isa("avx512", "x86_64", "x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                                                     "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"})),
    Isa("avx2", "x86_64", "x86-64-v3", frozenset({"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"})),
    Isa("x86-64", "x86_64", "x86-64"),
    Isa("neon", "aarch64", "armv8-a"),
)}

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# Every entry point ends with the post-op's arguments (sparse_cpu.cpp, Post): kind, residual, gamma, beta, eps
_POST = (_INT, _P, _P, _P, ctypes.c_float)
POST_KINDS = {"none": 0, "add": 1, "add_norm": 2}  # sparse_cpu.cpp's PostKind
NO_POST = (POST_KINDS["none"], None, None, None, 0.0)  # y is the product (and activation) alone
STATUS = {"ok": 0, "out_of_memory": 1, "bad_argument": 2}  # what the entry points return (ENTRY_OK, ENTRY_OUT_OF_MEMORY)
MASK_KINDS = {"none": 0, "additive": 1, "keep": 2}
# the int8 layouts' flags (sparse_cpu.cpp, LinearRef::extra): expand bitmap words at one token; int8 inputs
LINEAR_FLAGS = {"bitmap_expand": 1, "int8_input": 2}  # attention_f32's mask: fp32 added, or bytes (1: attend)
# entry point -> argument types (pointers as integers from Tensor.data_ptr(); NULL bias as None)
SIGNATURES: dict[str, tuple[type, ...]] = {
    # rowptr, col, val, out, in, x, n, bias, y, threads, activation code
    **{f"csr_{v}_{i}": (_P, _P, _P, _I64, _I64, _P, _I64, _P, _P, _INT, _INT, *_POST)
       for v in ("f32", "bf16") for i in ("i16", "i32")},
    # int8 panels and FFN: as the entries above, each weight's scales after its values
    "csr_panels_i8": (_P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, _P, _INT, _INT, *_POST),
    "csr_ffn_i8": (*(_P,) * 12, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _P, _INT, _INT, *_POST),
    # int8 weights (sparse_ops.quantized): the CSR entry's arguments with the scales after the values and the
    # flags (LINEAR_FLAGS) after the sizes
    **{f"csr_i8_{i}": (_P, _P, _P, _P, _I64, _I64, _INT, _P, _I64, _P, _P, _INT, _INT, *_POST)
       for i in ("i16", "i32")},
    # tile_ptr, tile_cols, value_offsets, bitmaps, val, scales, out, in, flags, x, n, bias, y, threads, act
    "bitmap_i8": (*(_P,) * 6, _I64, _I64, _INT, _P, _I64, _P, _P, _INT, _INT, *_POST),
    # val, scales, out, in, flags, x, n, bias, y, threads, activation code
    "dense_i8": (_P, _P, _I64, _I64, _INT, _P, _I64, _P, _P, _INT, _INT, *_POST),
    # val, out, in, x, n, bias, y, threads, activation code
    **{f"dense_{v}": (_P, _I64, _I64, _P, _I64, _P, _P, _INT, _INT, *_POST) for v in ("f32", "bf16")},
    # rowptr, column mask, val, out, in, x, n, bias, y, threads, activation code
    **{f"csr_mask_{v}": (_P, _P, _P, _I64, _I64, _P, _I64, _P, _P, _INT, _INT, *_POST) for v in ("f32", "bf16")},
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
    # logits, x, T, K, capacity (-1: none), w_in, b_in, w_gate, b_gate, w_out, b_out, E, D, H, y, routed,
    # threads, activation code
    "moe_forward_f32": (_P, _P, _I64, _I64, _I64, *(_P,) * 6, _I64, _I64, _I64, _P, _P, _INT, _INT),
    # q, k, v, strides (12 int64: q, k, v, mask by batch, head, position), mask, mask kind, B, H, Hk, S, L, D,
    # scale, causal, out, threads
    "attention_f32": (_P, _P, _P, _P, _P, _INT, *(_I64,) * 6, ctypes.c_float, _INT, _P, _INT),
    # the decoder step (csrc/decode_step.h; sparse_ops.decode): handle, layer, slot, layout name, parts (6
    # pointers), out, in, extra, nnz, bias
    "decoder_linear": (_P, _I64, _I64, ctypes.c_char_p, _P, _I64, _I64, _I64, _I64, _P),
    "decoder_norms": (_P, _I64, _P, _P),  # handle, layer, attention norm, MLP norm
    # handle, tokens, n, sequence and position of each, logits, all logits, threads
    "decoder_step": (_P, _P, _I64, _P, _P, _P, _INT, _INT),
}


def expected_constants() -> dict[str, int]:
    """The codes this side passes to and reads from the C++ code, named as ``sparse_cpu_constants()`` names them.

    >>> expected_constants()["act.gelu"], expected_constants()["post.add_norm"]
    (2, 2)
    """
    from sparse_ops.activations import CODES

    return {**{f"act.{'none' if name is None else name}": code for name, code in CODES.items()},
            **{f"post.{k}": v for k, v in POST_KINDS.items()}, **{f"status.{k}": v for k, v in STATUS.items()},
            **{f"mask.{k}": v for k, v in MASK_KINDS.items()}, **{f"linear.{k}": v for k, v in LINEAR_FLAGS.items()}}


def constants_mismatch(lib: ctypes.CDLL) -> str | None:
    """Why a build's constants (its C++ enums, ``sparse_cpu_constants()``) disagree with ours, or None."""
    got = {k: int(v) for k, _, v in (item.partition("=") for item in lib.sparse_cpu_constants().decode().split())}
    want = expected_constants()
    diff = sorted(f"{k}: C++ {got.get(k)}, Python {want.get(k)}" for k in set(got) | set(want)
                  if got.get(k) != want.get(k))
    return f"the C++ and Python constants differ ({'; '.join(diff)})" if diff else None


def _check_status(status: int, fn: object, _args: tuple) -> int:
    """ctypes errcheck of the kernel entry points: 0 is success (returned), 1 means the packed-x buffer was not
    allocated (MemoryError), 2 arguments the C++ code refused (ValueError; the Python side checks first, so this
    is a bug)."""
    name = getattr(fn, "__name__", fn)
    if status == STATUS["bad_argument"]:
        raise UserValueError(f"{name}: the C++ code refused its arguments ({status=})")
    if status:
        raise MemoryError(f"{name}: out of memory for the packed input ({status=})")
    return status


def open_library(path: str | os.PathLike, strict: bool = True) -> ctypes.CDLL:
    """Load a build of ``sparse_cpu.cpp`` with the entry points' signatures and status check bound (also used
    for other builds: ``benchmarks/kernel_ab.py``, the -march tests). ``strict=False`` binds only the entry
    points the build has (an older source, for A/B timing)."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        if not strict and not hasattr(lib, name):
            continue
        fn = getattr(lib, name)
        fn.argtypes, fn.restype, fn.errcheck = argtypes, ctypes.c_int, _check_status
    if strict or hasattr(lib, "sparse_cpu_constants"):
        lib.sparse_cpu_constants.argtypes, lib.sparse_cpu_constants.restype = (), ctypes.c_char_p
    if strict or hasattr(lib, "sparse_cpu_threading"):
        lib.sparse_cpu_set_backend.argtypes, lib.sparse_cpu_set_backend.restype = (ctypes.c_int,), ctypes.c_int
        lib.sparse_cpu_threading.argtypes, lib.sparse_cpu_threading.restype = (_P,), None
        lib.sparse_cpu_waited.argtypes, lib.sparse_cpu_waited.restype = (_INT, _I64, _I64), ctypes.c_int
    if strict or hasattr(lib, "decoder_new"):
        lib.decoder_new.argtypes = (_P, ctypes.c_float, ctypes.c_float, _INT, _P, *(_P,) * 6)
        lib.decoder_new.restype = ctypes.c_void_p
        lib.decoder_free.argtypes, lib.decoder_free.restype = (ctypes.c_void_p,), None
        lib.decoder_time.argtypes, lib.decoder_time.restype = (ctypes.c_void_p, _P), None
    return lib


def cache_dir() -> Path:
    """``$SPARSE_OPS_CACHE`` or ``~/.cache/sparse_ops``; where that cannot be written (a read-only home), a
    private folder under the system's temporary directory instead, said once."""
    return _usable_cache_dir(os.environ.get("SPARSE_OPS_CACHE") or str(Path.home() / ".cache" / "sparse_ops"))


@functools.cache
def _usable_cache_dir(wanted: str) -> Path:
    path = Path(wanted)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK | os.X_OK):
            return path
        reason = "not writable"
    except OSError as e:
        reason = e.strerror or str(e)
    # a library is loaded from here: only a folder this user owns and nobody else may write
    uid = os.getuid() if hasattr(os, "getuid") else None
    fallback = Path(tempfile.gettempdir()) / f"sparse_ops-{uid}"
    try:
        fallback.mkdir(mode=0o700, exist_ok=True)
        st = fallback.lstat()
        private = fallback.is_dir() and not fallback.is_symlink() and (uid is None or st.st_uid == uid) \
            and not st.st_mode & 0o022
    except OSError:
        private = False
    if not private:
        fallback = Path(tempfile.mkdtemp(prefix="sparse_ops-"))
    log.warning("sparse_ops: the cache folder %s cannot be written (%s); using %s instead, so the kernels are "
                "built and the plans measured again once it is cleared (set SPARSE_OPS_CACHE to keep them)",
                path, reason, fallback)
    return fallback


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    """The first processor's ``/proc/cpuinfo`` lines (none where the file is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            return tuple(f.read().partition("\n\n")[0].splitlines())
    except OSError:
        return ()


def _cpuinfo_field(*names: str) -> str:
    return next((line.partition(":")[2].strip() for line in _cpuinfo() if line.startswith(names)), "")


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where it says none)."""
    return frozenset(_cpuinfo_field("flags", "Features").split())


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    return _cpuinfo_field("model name", "Model name") or platform.processor() or platform.machine()


def machine() -> str:
    """'x86_64', 'aarch64', ... (Windows' 'AMD64' and macOS's 'arm64' spelled the Linux way)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def runs_here(target: Isa) -> bool:
    """Whether this CPU runs code built for ``target``."""
    return target.machine == machine() and target.cpu_flags <= cpu_flags()


def isa() -> str:
    """The target the kernels are built for: ``$SPARSE_OPS_ISA`` if set, else the best this CPU runs (the
    name of an ``ISAS`` entry; ValueError for an unknown name)."""
    name = os.environ.get("SPARSE_OPS_ISA", "").strip().lower()
    if name:
        if name not in ISAS:
            raise UserValueError(f"SPARSE_OPS_ISA={name!r} is not a target; allowed: {', '.join(ISAS)}")
        return name
    return next((i.name for i in ISAS.values() if runs_here(i)), "native")


# Cache sizes in bytes the kernels' tiling is sized from when the machine does not say (a Zen 4 core's)
DEFAULT_CACHES = {"L1D": 32 << 10, "L2": 1 << 20, "L3": 32 << 20}


@functools.cache
def caches() -> dict[str, int]:
    """{"L1D", "L2", "L3"}: this machine's data cache sizes per core (L3: the whole, shared), from sysfs.

    >>> sorted(caches())
    ['L1D', 'L2', 'L3']
    """
    found = dict(DEFAULT_CACHES)
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in root.glob("index*") if root.is_dir() else ():
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            size = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        name = "L1D" if level == "1" and kind == "Data" else f"L{level}" if level in ("2", "3") else ""
        if name and size.rstrip("KMG").isdigit():
            found[name] = int(size.rstrip("KMG")) * scale
    return found


def build_flags(target: str | None = None) -> list[str]:
    """The compiler flags of a build for ``target`` (default ``isa()``): FLAGS, -march and this machine's
    cache sizes as the constants ``SPARSE_L1D_BYTES``, ``SPARSE_L2_BYTES``, ``SPARSE_L3_BYTES``."""
    target = target or isa()
    march = ISAS[target].march if target in ISAS else "native"
    return [*FLAGS, f"-march={march}", *(f"-DSPARSE_{k}_BYTES={v}" for k, v in caches().items())]


def build_key(compiler: str, flags: list[str]) -> str:
    """Hash of everything the binary depends on: source, flags (target, cache sizes), compiler version."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    h = hashlib.sha256(SOURCE.read_bytes())
    for header in HEADERS:
        h.update(header.read_bytes())
    for part in (" ".join(flags), version, str(ABI_VERSION)):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build(compiler: str | None = None, target: str | None = None) -> Path:
    """Compile the library for ``target`` (default ``isa()``) unless the cache holds it; return its path.
    Raise RuntimeError on failure."""
    compiler = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise UnavailableError("no C++ compiler found (set CXX or install g++)")
    target = target or isa()
    flags = build_flags(target)
    path = cache_dir() / f"sparse_cpu_{target}_{build_key(compiler, flags)}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed building {SOURCE.name} for {target}:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent process sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path



@functools.cache
def _load() -> ctypes.CDLL | str:
    """The loaded library, or why it is unavailable (a string). Cached for the process: build once."""
    try:
        import torch.nn.functional  # noqa: F401  (torch, hence its libgomp.so.1, is loaded before our library)

        target = isa()
        if target in ISAS and not runs_here(ISAS[target]):
            missing = sorted(ISAS[target].cpu_flags - cpu_flags())
            lacks = ", ".join(missing) or machine()
            return f"this CPU cannot run the {target} build (SPARSE_OPS_ISA; it lacks {lacks})"
        lib = open_library(build())
        if lib.sparse_cpu_abi_version() != ABI_VERSION:
            return f"ABI version {lib.sparse_cpu_abi_version()} != {ABI_VERSION}"
        return constants_mismatch(lib) or lib
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
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
    """Threads for our parallel loops: torch's intra-op count (``torch.set_num_threads``), the caller included."""
    return max(1, torch.get_num_threads())


BACKENDS = {"auto": 0, "openmp": 1, "pool": 2, "solo": 3}  # csrc/work_pool.h's Backend


@dataclass(frozen=True)
class ThreadStats:
    """What the kernels' parallel loops did in this process (``csrc/work_pool.h``): jobs on torch's OpenMP
    threads, on our work pool and on the caller alone; waits for a descheduled thread (a competing process) on
    OpenMP and on the pool; the backend ``"auto"`` picks now."""

    openmp_jobs: int
    pool_jobs: int
    solo_jobs: int
    slow_openmp: int
    slow_pool: int
    backend: str

    @property
    def slow_waits(self) -> int:
        return self.slow_openmp + self.slow_pool

    def since(self, before: ThreadStats) -> ThreadStats:
        """The counts between ``before`` and this reading.

        >>> ThreadStats(10, 5, 0, 3, 0, "pool").since(ThreadStats(4, 0, 0, 1, 0, "openmp"))
        ThreadStats(openmp_jobs=6, pool_jobs=5, solo_jobs=0, slow_openmp=2, slow_pool=0, backend='pool')
        """
        return ThreadStats(self.openmp_jobs - before.openmp_jobs, self.pool_jobs - before.pool_jobs,
                           self.solo_jobs - before.solo_jobs, self.slow_openmp - before.slow_openmp,
                           self.slow_pool - before.slow_pool, self.backend)


def thread_stats() -> ThreadStats:
    """The counts so far (all zero without the native kernels).

    >>> thread_stats().slow_waits >= 0
    True
    """
    lib = library()
    if lib is None:
        return ThreadStats(0, 0, 0, 0, 0, "openmp")
    stats = (ctypes.c_int64 * 6)()
    lib.sparse_cpu_threading(stats)
    names = {v: k for k, v in BACKENDS.items()}
    return ThreadStats(*(int(v) for v in stats[:5]), names[int(stats[5])])


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Pin the parallel loops' backend ("auto", "openmp", "pool" or "solo") inside the block (tests,
    benchmarks).

    >>> with backend("pool"):
    ...     pass
    """
    if name not in BACKENDS:
        raise UserValueError(f"unknown threading backend {name!r}; allowed: {', '.join(BACKENDS)}")
    lib = library()
    previous = lib.sparse_cpu_set_backend(BACKENDS[name]) if lib is not None else 0
    try:
        yield
    finally:
        if lib is not None:
            lib.sparse_cpu_set_backend(previous)
