"""Per layer and batch, the fastest way to run a sparse layer on this machine, measured: never slower than dense.

A sparse kernel's speed against dense depends on the CPU (AVX2 or AVX-512, cache sizes), the thread count, the
layer's shape and sparsity, and above all the batch: a kernel 8x faster than dense at 1 token can be slower at
256. So a ``SparseLinear`` with a ``Planner`` (``sparsify``'s default) picks its path per batch *bucket*:

- ``bucket(n)``: a call with n tokens is planned as 1 (n == 1, the gemv), 8, 64 or 256 tokens (``BUCKETS``,
  the nearest in log scale; larger batches behave as 256: both sides are compute-bound there);
- the paths (``SparseLinear.paths``): ``"dense"`` (``F.linear`` on the decompressed weight, built the first
  time a bucket chooses it: the layer then also holds its dense weight), our kernel for the stored format and
  each of its variants (``"csr.plain"``: gemv / plain CSR, ``"csr.panels"``: the panelled kernel), and torch's kernel
  (``"csr:torch"``, MKL's CSR);
- the first call in a bucket times every path at the bucket's batch on the layer's own weight (``Timer``:
  interleaved, medians and 90th percentiles) and takes the fastest, our kernel where it is within 3% of it
  (``choose``): no layer runs slower than dense beyond that noise margin; of paths within 10% of each other, one
  whose slow calls are far slower than another's (its 90th percentile) is passed over;
- one token of a model whose weights exceed the L3 (``Planner.cold``, which ``sparsify`` sets) is timed a call at
  a time with the caches flushed before each (``flush_caches``), on layers of 1 MiB or more: such a model
  streams every layer from memory, and a weight timed in the cache would hide what a path that reads fewer bytes
  saves;
- a timing taken while the machine was busy (``sparse_ops.busy``: other processes' CPU time, or kernel calls
  that waited for a descheduled thread) is taken once more; if still busy, the choice is kept with a ``busy``
  mark (``plan_report`` shows it) and measured again by the next process;
- the choice is stored in ``PlanCache``, a JSON file in the kernels' cache directory keyed by this machine
  (CPU model, kernel ISA, threads, torch version) and by the layer (format, shape, dtype, sparsity to 1%,
  device, bucket): the same model on the same machine makes the same choices in every later process, with no
  measuring (``$SPARSE_OPS_PLANS`` names another file).

``plan_report(model)`` shows each layer's choice and speedup per bucket.

Example:
    >>> [bucket(n) for n in (1, 2, 22, 23, 127, 128, 4096)]
    [1, 8, 8, 64, 64, 256, 256]
    >>> choose({"dense": 1.0, "csr.plain": 0.5, "csr:torch": 0.6})
    'csr.plain'
    >>> choose({"dense": 1.0, "csr.plain": 1.02})  # 2% slower is noise: our kernel (it fuses, dense cannot)
    'csr.plain'
    >>> choose({"dense": 1.0, "csr.plain": 1.05}), choose({"dense": 1.0, "csr.plain": 1.2, "csr:torch": 0.8})
    ('dense', 'csr:torch')
    >>> choose({"dense": 1.0, "csr.plain": 0.95}, worst={"dense": 1.1, "csr.plain": 4.0})  # close, unbounded
    'dense'
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_ops.kernels import cpp
from sparse_ops.tables import text_table
from sparse_ops.timing import Timer

log = logging.getLogger(__name__)

BUCKETS = (1, 8, 64, 256)  # tokens per call at which paths are measured
PLAN_VERSION = 5  # of the choice rule and paths (5: worst cases, busy marks): older cached choices are measured again
PREFER_WITHIN = 1.03  # our kernel this close to the fastest path is chosen (the first variant listed so close)
# Paths whose medians are within CLOSE of the fastest are compared by their slow calls too: one whose 90th
# percentile is over WORST_WITHIN times the best of theirs is passed over (a kernel that stalls now and then on a
# shared machine loses to one nearly as fast that does not)
CLOSE, WORST_WITHIN = 1.10, 1.5
DENSE = "dense"
TORCH_SUFFIX = ":torch"  # "csr:torch": the format on torch's kernel (dispatch.torch_path_kernel)


def bucket(n: int) -> int:
    """The measured batch that stands for n tokens: 1 for n == 1, else the nearest of 8, 64, 256 in log scale."""
    if n <= 1:
        return 1
    for lo, hi in zip(BUCKETS[1:], BUCKETS[2:]):
        if n < math.sqrt(lo * hi):  # the geometric midpoint (a tie goes to the larger)
            return lo
    return BUCKETS[-1]


def choose(times: dict[str, float], prefer_within: float = PREFER_WITHIN,
           worst: dict[str, float] | None = None) -> str:
    """The fastest path by median seconds ``times``, except that our kernel (the first of its variants listed)
    is taken when it is within ``prefer_within`` of the fastest; with ``worst`` (each path's 90th percentile),
    paths close to the fastest whose worst case is unbounded (``CLOSE``, ``WORST_WITHIN``) are left out first.

    Near-ties go to our kernel because a layer timed alone cannot show what it gains inside the model: our
    kernels fuse the activation, the FFN pair and the residual + LayerNorm, and dense needs its own
    decompressed copy of the weight. Beyond 3% the measurement decides: a layer a few percent slower than
    dense, kept sparse, adds up over a model's layers to a model slower than dense."""
    if worst:
        close = [k for k, t in times.items() if t <= CLOSE * min(times.values())]
        bound = WORST_WITHIN * min(worst[k] for k in close)
        times = {k: t for k, t in times.items() if k not in close or worst[k] <= bound}
    fastest = min(times.values())
    ours = [k for k, t in times.items() if k != DENSE and not k.endswith(TORCH_SUFFIX)
            and t <= prefer_within * fastest]
    return ours[0] if ours else min(times, key=times.__getitem__)


# The plan's timing: a choice is cached and kept, so it gets more samples than time_candidates' default (a
# 20-30% error between close paths was seen with 5 samples of 2 ms on a shared VM)
PLAN_REPEATS, PLAN_SAMPLE_S = 9, 4e-3
COLD_REPEATS = 15  # samples of one call each (Planner.cold): noisier than PLAN_SAMPLE_S's loops of calls
# A smaller weight is timed warm even in a cold plan: a single call on it is bound by its fixed costs (waking the
# threads, the first lines' latency), not by its bytes, and cold single calls of such layers (SmolLM2's int8
# layers) ranked paths by noise, choosing layouts with more bytes than dense int8.
COLD_MIN_BYTES = 1 << 20


@functools.cache
def _flush_buffer() -> torch.Tensor:
    return torch.ones(2 * cpp.caches()["L3"] // 4)


def flush_caches() -> None:
    """Read a buffer twice the size of the L3, so that the next call finds none of its data in the caches.

    >>> flush_caches()
    """
    _flush_buffer().sum()


def machine_key(device: torch.device) -> str:
    """What a measurement depends on besides the layer: the processor, the kernels' ISA and the threads."""
    rule = f"plan {PLAN_VERSION}|torch {torch.__version__}"
    if device.type == "cuda":
        from sparse_ops.kernels import triton_sparse  # our CUDA kernels are Triton's: its version matters

        triton_version = getattr(triton_sparse.triton, "__version__", "none")
        return f"{torch.cuda.get_device_name(device)}|cuda {torch.version.cuda}|triton {triton_version}|{rule}"
    isa = cpp.isa() if cpp.available() else "torch-only"
    return f"{cpp.cpu_model()}|{isa}|abi {cpp.ABI_VERSION}|threads {torch.get_num_threads()}|{rule}"


def layer_key(fmt: str, shape: tuple[int, int], dtype: torch.dtype, sparsity: float, device: torch.device,
              batch: int) -> str:
    """The layer half of a cache key (sparsity to 1%: layers that close share a measurement).

    >>> layer_key("csr", (8, 4), torch.float32, 0.904, torch.device("cpu"), 64)
    'csr 8x4 float32 s0.90 cpu n64'
    """
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{fmt} {shape[0]}x{shape[1]} {dtype_name} s{sparsity:.2f} {device.type} n{batch}"


class PlanCache:
    """Measured choices, ``{machine key: {layer key: {"choice": path, "speedup": {path: dense time / time}}}}``,
    in a JSON file (``path=None``: in this process only). Written to a temporary file and renamed; entries other
    processes added meanwhile are kept."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self._entries: dict[str, dict[str, dict]] = {}
        self._lock = threading.Lock()
        self._read = False
        self._warned = False  # a cache that cannot be written is said once

    def __deepcopy__(self, memo: dict) -> PlanCache:  # a copied model shares its cache (and the file)
        return self

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _load_file(self) -> dict[str, dict[str, dict]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # a damaged cache is only a cache: measure again
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, machine: str, layer: str) -> dict | None:
        with self._lock:
            if not self._read:
                self._entries, self._read = self._load_file(), True
            entry = self._entries.get(machine, {}).get(layer)
        return entry if isinstance(entry, dict) and isinstance(entry.get("choice"), str) else None

    def put(self, machine: str, layer: str, entry: dict) -> None:
        with self._lock:
            self._entries.setdefault(machine, {})[layer] = entry
            if self.path is None:
                return
            merged = self._load_file()
            for m, layers in self._entries.items():
                merged.setdefault(m, {}).update(layers)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".json", dir=self.path.parent)
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError as e:  # a read-only $SPARSE_OPS_PLANS: the choices hold for this process only
                if not self._warned:
                    log.warning("sparse_ops: could not write the plan cache %s (%s); choices are not kept",
                                self.path, e)
                self._warned = True


_DEFAULT_CACHES: dict[Path, PlanCache] = {}


def default_cache() -> PlanCache:
    """The on-disk cache of this user's plans, one object per path: ``$SPARSE_OPS_PLANS`` if set, else
    ``<kernel cache dir>/plans.json``."""
    path = Path(os.environ.get("SPARSE_OPS_PLANS") or cpp.cache_dir() / "plans.json")
    return _DEFAULT_CACHES.setdefault(path, PlanCache(path))


@dataclass
class Planner:
    """How a layer plans its paths: the timer (None: ``timing.time_candidates``), the cache (None: the
    on-disk ``default_cache()``), ``verbose`` (print each choice as it is made), ``prefer_within``
    (``choose``) and ``cold``: time one token with the caches flushed before each call (``flush_caches``), as
    a model whose weights exceed the L3 runs it (``sparsify`` sets it so): each layer's weight then comes from
    memory, and a path that reads fewer bytes gains what a timing on a weight left in the caches hides."""

    timer: Timer | None = None  # None: time_candidates with PLAN_REPEATS samples of PLAN_SAMPLE_S each
    cache: PlanCache | None = None
    verbose: bool = False
    prefer_within: float = PREFER_WITHIN
    cold: bool = False

    def cold_at(self, batch: int, device: torch.device, nbytes: int) -> bool:
        """Whether ``batch`` tokens on a weight of ``nbytes`` are timed cold: one token on the CPU of a ``cold``
        planner, a weight of COLD_MIN_BYTES or more."""
        return self.cold and batch == 1 and device.type == "cpu" and nbytes >= COLD_MIN_BYTES

    def store(self) -> PlanCache:
        return self.cache if self.cache is not None else default_cache()


def plan_rows(model: torch.nn.Module) -> list[dict]:
    """One row per planned ``SparseLinear``: name (the one it was loaded under, which a fusion that moves the
    layer does not change; else its place in ``model``), shape, format, sparsity and, per bucket, the chosen path with
    its speedup over dense (None where no call has reached that bucket yet). A planned layer is any module with
    a ``planner`` and ``planned(bucket)`` (``SparseLinear``; this module sits below it and does not import it)."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "planner", None), Planner) and callable(getattr(m, "planned", None)):
            rows.append({"name": getattr(m, "name", None) or name, "shape": (m.out_features, m.in_features), "format": m.format,
                         "sparsity": m.sparsity, "routes": {b: m.planned(b) for b in BUCKETS}})
    return rows


def plan_report(model: torch.nn.Module) -> str:
    """A table of ``plan_rows``: each layer's path per bucket, as ``path (speedup x)``.

    >>> print(plan_report(torch.nn.Linear(2, 2)))
    no planned sparse layers
    """
    rows = plan_rows(model)
    if not rows:
        return "no planned sparse layers"
    def cell(entry: dict | None) -> str:
        if entry is None:
            return "-"
        x = entry.get("speedup", {}).get(entry["choice"])
        return entry["choice"] + ("" if x is None else f" ({x:.2f}x)") + ("*" if "busy" in entry else "")
    head = ["layer", "shape", "format", "sparsity", *(f"{b} token{'s' * (b > 1)}" for b in BUCKETS)]
    body = [[r["name"], f"{r['shape'][0]}x{r['shape'][1]}", r["format"], f"{r['sparsity']:.3f}",
             *(cell(r["routes"][b]) for b in BUCKETS)] for r in rows]
    lines = text_table(head, body).splitlines()
    worst = [r["routes"][b] for r in rows for b in BUCKETS if r["routes"][b] is not None]
    if worst:
        low = min(e["speedup"].get(e["choice"], 1.0) for e in worst)
        lines.append(f"slowest chosen path: {low:.2f}x of dense (1.00x: dense itself)")
    busy = [e["busy"] for e in worst if "busy" in e]
    if busy:
        lines.append(f"* {len(busy)} of {len(worst)} choices were measured while the machine was busy ({busy[0]}): "
                     "they are measured again by the next process; on a shared machine compare "
                     "torch.set_num_threads(1)")
    return "\n".join(lines)
