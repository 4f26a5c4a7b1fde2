"""Pieces of ``format="auto"``: the cache key, a tiny interleaved timer, and the pure choice rule.

sparse_ops does not import benchmarks/, so it carries this small timer; tests inject their own ``Timer`` so the
choice logic is checked without measuring anything.

Example:
    >>> pick_format({"dense": 1.0, "csr": 0.5, "2:4": 0.8})
    'csr'
    >>> pick_format({"dense": 1.0, "csr": 0.99})  # 1% faster is noise: stay dense
    'dense'
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# seconds per call for each named candidate
Timer = Callable[[dict[str, Callable[[], object]], torch.device], dict[str, float]]

# A sparse format must be this many times faster than dense to be chosen: measurement noise must not pick
# a kernel that is really slower.
MIN_SPEEDUP = 1.05
SPARSITY_BUCKET = 0.05  # layers whose sparsity falls in the same 5% bucket share a measurement


@dataclass(frozen=True)
class AutoKey:
    """What a measurement depends on: weight shape (out, in), sparsity bucket, dtype, device, batch (tokens)."""

    shape: tuple[int, int]
    sparsity_bucket: float
    dtype: str
    device: str
    batch: int


def auto_key(w: torch.Tensor, device: torch.device | str, batch: int) -> AutoKey:
    sparsity = 1.0 - int((w != 0).sum()) / max(w.numel(), 1)
    bucket = round(int(sparsity / SPARSITY_BUCKET + 1e-9) * SPARSITY_BUCKET, 4)  # floor to 0.05 steps
    return AutoKey(tuple(w.shape), bucket, str(w.dtype).removeprefix("torch."), str(torch.device(device)), batch)


def pick_format(times: dict[str, float], min_speedup: float = MIN_SPEEDUP) -> str:
    """The fastest sparse candidate if it beats ``times["dense"]`` by ``min_speedup``, else ``"dense"``."""
    sparse = {k: t for k, t in times.items() if k != "dense"}
    if not sparse:
        return "dense"
    best = min(sparse, key=sparse.__getitem__)
    return best if times["dense"] >= min_speedup * sparse[best] else "dense"


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
