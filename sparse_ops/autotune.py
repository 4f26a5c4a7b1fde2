"""The small interleaved timer of ``sparse_ops.plan`` (sparse_ops does not import benchmarks/); tests inject
their own ``Timer`` so that the plan's choices are checked without measuring anything.

Example:
    >>> times = time_candidates({"a": lambda: None, "b": lambda: sum(range(100))}, torch.device("cpu"), repeats=2)
    >>> sorted(times)
    ['a', 'b']
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# seconds per call for each named candidate
Timer = Callable[[dict[str, Callable[[], object]], torch.device], dict[str, float]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidates(fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 5,
                    calls: int = 0, min_sample_s: float = 2e-3) -> dict[str, float]:
    """Median seconds per call of each candidate, timed interleaved (A B C A B C ...) after one warm-up call."""
    for fn in fns.values():
        fn()
    _sync(device)
    n = {k: calls or _calls_for(fn, device, min_sample_s) for k, fn in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(n[k]):
                fn()
            _sync(device)
            samples[k].append((time.perf_counter() - t0) / n[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def _calls_for(fn: Callable[[], object], device: torch.device, min_sample_s: float) -> int:
    """Calls per sample so that one sample lasts about ``min_sample_s`` (at least 1)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    dt = time.perf_counter() - t0
    return max(1, min(1000, int(min_sample_s / max(dt, 1e-7))))
