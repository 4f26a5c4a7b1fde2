"""The one timer: interleaved, warmed up, median with spread, hardware stated (the benchmarks, the demo and the
per-layer plan all time with it).

Machines here are noisy, so candidates are timed A B C A B C ... in one run and compared by ratio.
``time_interleaved`` gives the statistics benchmarks report; ``time_candidates`` the medians the plan
(``sparse_ops.plan``) chooses by, calibrated from a single call so that planning a model stays cheap. Tests
inject their own ``Timer`` so that the plan's choices are checked without measuring anything.

Example:
    >>> import torch
    >>> x, w = torch.randn(8, 64), torch.randn(64, 64)
    >>> t = time_interleaved({"mm": lambda: x @ w, "mm2": lambda: x @ w.t()}, repeats=3, min_sample_s=1e-4)
    >>> sorted(t) == ["mm", "mm2"] and t["mm"].median_s > 0
    True
    >>> summarize([5.0, 1.0, 3.0, 2.0, 4.0])  # seconds per call of each sample
    Timing(median_s=3.0, p10_s=1.4, p90_s=4.6, repeats=5)
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparse_ops.errors import UserValueError
from sparse_ops.kernels import cpp

Clock = Callable[[], float]  # seconds from a monotonic origin, like time.perf_counter


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate: median and the 10th/90th percentiles over repeats."""

    median_s: float
    p10_s: float
    p90_s: float
    repeats: int

    def ratio_to(self, other: Timing) -> float:
        """How many times faster this is than ``other`` (>1 means faster)."""
        return other.median_s / self.median_s


def _quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default "linear" method)."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: list[float]) -> Timing:
    """Median and 10th/90th percentiles of per-call seconds, one value per timed sample."""
    if not samples:
        raise UserValueError("summarize needs at least one sample")
    return Timing(statistics.median(samples), _quantile(samples, 0.1), _quantile(samples, 0.9), len(samples))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], n: int, device: str, clock: Clock) -> float:
    """Seconds for ``n`` calls of ``fn``, device work included (synchronized before and after on CUDA)."""
    _sync(device)
    t0 = clock()
    for _ in range(n):
        fn()
    _sync(device)
    return clock() - t0


def _calls_per_sample(fn: Callable[[], object], min_sample_s: float, device: str, clock: Clock) -> int:
    """Calls per timed sample so that one sample lasts at least ``min_sample_s`` (timer resolution, noise)."""
    n = 1
    while True:
        dt = _timed(fn, n, device, clock)
        if dt >= min_sample_s or n >= 1 << 20:
            return n
        n = max(n * 2, int(n * min_sample_s / max(dt, 1e-9) * 1.2))


# seconds per call for each named candidate (a median, or its Timing): time_candidates, or a test's stand-in
Timer = Callable[[dict[str, Callable[[], object]], torch.device], "dict[str, float] | dict[str, Timing]"]


def time_candidates(fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 5,
                    calls: int = 0, min_sample_s: float = 2e-3,
                    before: Callable[[], object] | None = None) -> dict[str, Timing]:
    """Seconds per call of each candidate (median and spread), timed interleaved (A B C A B C ...) after one
    warm-up call; ``calls`` per sample, or (0) as many as last about ``min_sample_s`` judging by the warm-up call.
    ``before``: each sample is one call, with ``before()`` run (untimed) ahead of it (``plan.flush_caches``: a
    call that finds nothing in the caches).

    >>> t = time_candidates({"a": lambda: None, "b": lambda: sum(range(100))}, torch.device("cpu"), repeats=2)
    >>> sorted(t), t["b"].p90_s >= t["b"].median_s
    (['a', 'b'], True)
    """
    dev = device.type
    n = {}
    for k, fn in fns.items():
        _timed(fn, 1, dev, time.perf_counter)  # warm-up
        dt = _timed(fn, 1, dev, time.perf_counter)
        n[k] = 1 if before else calls or max(1, min(1000, int(min_sample_s / max(dt, 1e-7))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if before:
                before()
            samples[k].append(_timed(fn, n[k], dev, time.perf_counter) / n[k])
    return {k: summarize(v) for k, v in samples.items()}


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 11,
    min_sample_s: float = 0.02,
    device: str = "cpu",
    clock: Clock = time.perf_counter,
) -> dict[str, Timing]:
    """Time each callable, interleaving candidates within every repeat; returns seconds per call.

    Each repeat times one sample of every candidate in turn, each repeat starting one candidate later (A B C,
    B C A, C A B, ...: no candidate always runs first, or always after the same neighbour); a sample is a loop
    of calls lasting at least ``min_sample_s``. CUDA work is bracketed by ``torch.cuda.synchronize`` around each sample,
    after warm-up. ``clock`` (seconds, monotonic) is injectable so tests can check the statistics.
    """
    if not fns:
        raise UserValueError("time_interleaved needs at least one callable")
    if repeats < 1:
        raise UserValueError(f"repeats must be >= 1, got {repeats}")
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        calls = {k: _calls_per_sample(fn, min_sample_s, device, clock) for k, fn in fns.items()}
        samples: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(repeats):
            for k in names[r % len(names):] + names[:r % len(names)]:
                samples[k].append(_timed(fns[k], calls[k], device, clock) / calls[k])
    return {k: summarize(v) for k, v in samples.items()}


def _blas() -> str:
    cfg = torch.__config__.show()
    for name in ("MKL", "OpenBLAS", "BLIS", "Accelerate"):
        if name.lower() in cfg.lower():
            return name
    return "unknown"


def environment(device: str = "cpu") -> dict[str, object]:
    """Hardware and software facts to write beside every result (CPU, threads, torch, BLAS, GPU, date)."""
    env: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpp.cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "blas": _blas(),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "git": _git_head(),
        "load_avg_1_5_15min": _load_avg(),  # other work on the machine when the run started
        **kernel_build(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, driver=nvidia_driver())
    return env


def kernel_build() -> dict[str, object]:
    """Which build of our CPU kernels this process runs: its ISA (``cpp.isa()``, or None where torch's
    kernels stand in), and the cache sizes its tiling was built for."""
    on = cpp.available()
    return {"kernel_isa": cpp.isa() if on else None, "native_kernels": on,
            "kernel_caches_bytes": cpp.caches() if on else None}


def _load_avg() -> list[float] | None:
    try:
        return [float(v) for v in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def _git_head() -> str:
    """The commit the code was run from (``+dirty`` with uncommitted changes), or "unknown" outside git."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:  # the result file says so instead of failing
        return "unknown"


@dataclass(frozen=True)
class Deadline:
    """A sweep's time budget: ``allows(done, elapsed, next_cost)`` says whether one more point fits.

    The first point always runs (a sweep returns at least one row); after that a point runs only if its
    expected cost (the last point's duration) still fits in ``max_seconds``. ``None`` means no limit.

    Example:
        >>> d = Deadline(10.0)
        >>> d.allows(done=0, elapsed=12.0, next_cost=1.0), d.allows(3, 8.0, 1.5), d.allows(3, 8.0, 3.0)
        (True, True, False)
    """

    max_seconds: float | None

    def allows(self, done: int, elapsed: float, next_cost: float) -> bool:
        return self.max_seconds is None or done == 0 or elapsed + next_cost <= self.max_seconds


def nvidia_driver() -> str:
    """The NVIDIA driver version nvidia-smi reports, or "unknown"."""
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
