"""The one place a sparse layer's matmul route is decided: per layer and batch, the fastest way to run it on
this machine, measured, never slower than dense.

A sparse kernel's speed against dense depends on the CPU (AVX2 or AVX-512, cache sizes), the thread count, the
layer's shape and sparsity, and above all the batch: a kernel 8x faster than dense at 1 token can be slower at
256. Each ``SparseLinear`` owns a ``Router``, which answers "how does a call of n tokens run?" with a ``Route``:
a typed ``Path`` (kind ``dense`` / ``ours`` / ``torch``, the format, the kernel's variant) bound to the kernel
and its prepared weight. Kernels never decide again; the router reads what they declare in the registry
(``sparse_ops.dispatch``):

- a call that needs a gradient takes the first candidate with a backward (``Kernel.grad``), prepared once;
- a layer without a ``Planner`` runs its kernel, in the variant the kernel declares as its default
  (``Kernel.pick``);
- a layer with a ``Planner`` (``sparsify``'s default) takes the path chosen for its batch *bucket*:
  ``bucket(n)``: 1 (n == 1, the gemv), 8, 64 or 256 tokens (``BUCKETS``, the nearest in log scale; larger
  batches behave as 256: both sides are compute-bound there).

The paths (``Router.paths``): ``"dense"`` (``F.linear`` on the decompressed weight, built the first time a
bucket chooses it: the layer then also holds its dense weight), our kernel for the stored format and each of
its variants (``"csr.plain"``: gemv / plain CSR, ``"csr.panels"``: the panelled kernel), torch's kernel
(``"csr:torch"``, MKL's CSR), and for an int8 weight its other int8 layouts (``"dense-int8"``, ...). The first
call in a bucket times every path at the bucket's batch on the layer's own weight (``Timer``: interleaved,
medians and 90th percentiles) and takes the fastest, our kernel where it is within 3% of it (``choose``): no
layer runs slower than dense beyond that noise margin; of paths within 10% of each other, one whose slow calls
are far slower than another's (its 90th percentile) is passed over.

- One token of a model whose weights exceed the L3 (``Planner.cold``, which ``sparsify`` sets) is timed a call at
  a time with the caches flushed before each (``flush_caches``), on layers of 1 MiB or more: such a model
  streams every layer from memory, and a weight timed in the cache would hide what a path that reads fewer bytes
  saves.
- A timing taken while the machine was busy (``sparse_ops.busy``: other processes' CPU time, or kernel calls
  that waited for a descheduled thread) is taken once more; if still busy, the choice is kept with a ``busy``
  mark (``plan_report`` shows it) and measured again by the next process.
- The choice is stored in the planner's ``PlanCache`` (``sparse_ops.plan_cache``): the same model on the same
  machine makes the same choices in every later process, with no measuring.

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
    >>> Path.parse("csr.panels"), str(Path(TORCH, "2:4"))
    (Path(kind='ours', format='csr', variant='panels'), '2:4:torch')
"""
from __future__ import annotations

import functools
import math
import sys
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sparse_ops import busy
from sparse_ops.dispatch import (
    DENSE_KERNEL,
    KERNELS,
    OURS,
    TORCH,
    Kernel,
    candidates,
    kernel_for,
    ours_for,
    torch_path_kernel,
)
from sparse_ops.errors import UserValueError
from sparse_ops.formats import SparseFormat
from sparse_ops.kernels import cpp
from sparse_ops.plan_cache import PlanCache, default_cache, layer_key, machine_key
from sparse_ops.registry import QUANTIZED, format_class
from sparse_ops.tables import text_table
from sparse_ops.timing import Timer, Timing, time_candidates

BUCKETS = (1, 8, 64, 256)  # tokens per call at which paths are measured
PREFER_WITHIN = 1.03  # our kernel this close to the fastest path is chosen (the first variant listed so close)
# Paths whose medians are within CLOSE of the fastest are compared by their slow calls too: one whose 90th
# percentile is over WORST_WITHIN times the best of theirs is passed over (a kernel that stalls now and then on a
# shared machine loses to one nearly as fast that does not)
CLOSE, WORST_WITHIN = 1.10, 1.5
DENSE = "dense"  # a path kind beside dispatch's OURS and TORCH
TORCH_SUFFIX = ":torch"  # "csr:torch": the format on torch's kernel (dispatch.torch_path_kernel)
_PLAN_LOCK = threading.Lock()  # one measurement at a time in the process: concurrent timings would be wrong


@dataclass(frozen=True)
class Path:
    """One way to run a layer's product: ``kind`` ``"dense"`` (``F.linear`` on the decompressed weight), ``"ours"``
    (our kernel for ``format``, in its ``variant``; "" for the kernel's default) or ``"torch"`` (torch's kernel
    for ``format``). ``str`` writes it as plan entries and reports do: "dense", "csr.panels", "csr-int8",
    "csr:torch"; ``parse`` reads that back."""

    kind: str
    format: str = ""
    variant: str = ""

    def __str__(self) -> str:
        if self.kind == DENSE:
            return DENSE
        if self.kind == TORCH:
            return self.format + TORCH_SUFFIX
        return f"{self.format}.{self.variant}" if self.variant else self.format

    @classmethod
    def parse(cls, text: str) -> Path:
        if text == DENSE:
            return cls(DENSE)
        if text.endswith(TORCH_SUFFIX):
            return cls(TORCH, text.removesuffix(TORCH_SUFFIX))
        fmt, _, variant = text.partition(".")
        return cls(OURS, fmt, variant)

    def base(self) -> Path:
        """The path without its variant: what one prepared weight serves."""
        return Path(self.kind, self.format) if self.variant else self


class Route(NamedTuple):
    """A path bound to the kernel that runs it and the weight as that kernel prepared it: ``route(x2, bias,
    activation, post)`` is the product, x2 (N, in) -> (N, out); ``variant`` is explicit (never decided again)."""

    path: Path
    kernel: Kernel
    state: object
    variant: str

    def __call__(self, x2: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None,
                 post: object = None) -> torch.Tensor:
        return self.kernel.matmul(self.state, x2, bias, activation, post=post, variant=self.variant)


def torch_path_formats() -> list[str]:
    """Every ``"<format>:torch"`` a layer can be asked for (torch's native kernel listed after ours)."""
    return sorted({f + TORCH_SUFFIX for (f, _), ks in KERNELS.items()
                   if ks[0].backend == OURS and any(k.backend == TORCH and k.native for k in ks)})


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
    ours = [k for k, t in times.items() if Path.parse(k).kind == OURS and t <= prefer_within * fastest]
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


class Router:
    """Decides how each call of one layer runs and binds that path to its kernel (the module docstring): the one
    place a matmul's route is decided. Built by its ``SparseLinear`` whenever the layer's weight is (re)bound
    (moves, loads), so everything prepared here follows the weight.

    ``route(n, grad)`` is the call's ``Route``; ``paths(n)`` what a plan chooses among; ``planned(bucket)`` a
    bucket's plan entry. Weights for paths other than the layer's kernel (the dense copy, torch's kernel, an
    int8 twin) are prepared at their first use and kept only while a bucket chooses them.

    >>> from sparse_ops.formats import CSR
    >>> router = Router(CSR.from_dense(torch.eye(4)), None)
    >>> str(router.route(1).path), str(router.route(1, grad=True).path)
    ('csr', 'csr:torch')
    """

    def __init__(self, weight: SparseFormat, bias: torch.Tensor | None, *, torch_kernel: bool = False,
                 planner: Planner | None = None, name: str = "", sparsity: float = 0.0):
        self.weight, self.bias, self.planner, self.name, self.sparsity = weight, bias, planner, name, sparsity
        self.format, self.shape, self.dtype, self.device = weight.format, weight.shape, weight.dtype, weight.device
        self.kernel = kernel_for(weight.format, weight.device, torch_kernel=torch_kernel, weight=weight)
        self.state = self.kernel.prepare(weight)
        self.own = Path(self.kernel.backend, weight.format)  # the layer's kernel: ours, or torch's
        # an int8 weight's other int8 layouts (same numbers, other kernels): paths of its plan
        self.twins = tuple(Path(OURS, f) for f in QUANTIZED
                           if weight.QUANTIZED and f != weight.format and candidates(f, weight.device)[0].native)
        self._states: dict[Path, tuple[Kernel, object]] = {}  # other paths' (kernel, prepared weight)
        self._grad: Route | None = None
        self._routes: dict[int, dict] = {}  # bucket -> plan entry
        self._last: tuple[int, Route | None] = (-1, None)  # (tokens, route) of the latest call

    def set_planner(self, planner: Planner | None) -> None:
        self.planner, self._routes, self._last = planner, {}, (-1, None)

    def route(self, n: int, grad: bool = False) -> Route:
        """How a call of n tokens runs: with ``grad``, on the first kernel with a backward; unplanned, on the
        layer's kernel in its default variant; planned, on the path chosen for n's bucket (``bucket``), measured
        at the bucket's first call or read from the planner's cache."""
        if grad:
            return self._grad_route()
        last = self._last
        if last[0] == n:  # the usual case: the same batch as the call before (a few us per layer else)
            return last[1]
        path = self.own if self.planner is None else Path.parse(self._entry(bucket(n))["choice"])
        route = self.bind(path, n)
        self._last = (n, route)
        return route

    def bind(self, path: Path, n: int) -> Route:
        """``path`` bound to its kernel and prepared weight, with the kernel's default variant for n tokens where
        the path names none."""
        kernel, state = self.kernel_state(path)
        return Route(path, kernel, state, path.variant or kernel.default_variant(state, n))

    def kernel_state(self, path: Path) -> tuple[Kernel, object]:
        """(kernel, prepared weight) of a path (its variant aside), prepared at its first use."""
        key = path.base()
        if key == self.own:
            return self.kernel, self.state
        held = self._states.get(key)
        if held is None:
            weight, kernel = self.weight, None
            if key.kind == DENSE:
                kernel = DENSE_KERNEL
            elif key.format != self.format:  # an int8 twin: the same numbers in another layout
                weight = format_class(key.format).from_quantized(*weight.quantized(), weight.input_bits)
                kernel = kernel_for(key.format, self.device, weight=weight)
            elif key.kind == TORCH:
                kernel = torch_path_kernel(self.format, self.device, weight)
            elif key.kind == OURS:
                kernel = ours_for(self.format, self.device)
            if kernel is None:
                raise UserValueError(f"no kernel runs the path {str(key)!r} for a {self.format} weight on "
                                     f"{self.device}; this layer's paths: {', '.join(map(str, self.paths(1)))}")
            held = self._states[key] = (kernel, kernel.prepare(weight))
        return held

    def _grad_route(self) -> Route:
        if self._grad is None:
            kernel = kernel_for(self.format, self.device, weight=self.weight, grad=True)
            if kernel is self.kernel:
                path, state = self.own, self.state
            elif kernel is DENSE_KERNEL:
                path = Path(DENSE)
                state = self.kernel_state(path)[1]
            else:
                path, state = Path(kernel.backend, self.format), kernel.prepare(self.weight)
            self._grad = Route(path, kernel, state, "")
        return self._grad

    def paths(self, n: int) -> list[Path]:
        """The paths a plan chooses among for n tokens: dense, the layer's kernel (each variant), torch's kernel
        where ours is the layer's, and an int8 weight's other int8 layouts (``dense-int8`` among them: never
        slower than dense int8)."""
        variants = self.kernel.variants(n) if self.kernel.variants else ()
        own = [Path(self.own.kind, self.format, v) for v in variants] or [self.own]
        theirs = [Path(TORCH, self.format)] if self.kernel.backend == OURS \
            and torch_path_kernel(self.format, self.device, self.weight) is not None else []
        return [Path(DENSE), *own, *theirs, *self.twins]

    def planned(self, batch: int) -> dict | None:
        """The plan entry ``{"choice": path, "speedup": {path: x}}`` of a bucket, if a call has reached it."""
        return self._routes.get(batch)

    def _entry(self, b: int) -> dict:
        """Bucket b's plan entry: read from the planner's cache, else measured (and stored there)."""
        with _PLAN_LOCK:
            if b in self._routes:
                return self._routes[b]
            planner, device = self.planner, self.device
            store, machine = planner.store(), machine_key(device)
            cold = planner.cold_at(b, device, self.weight.nbytes)
            bits = self.weight.input_bits if self.weight.QUANTIZED else None
            fmt = self.format + (f" in{bits}" if bits else "") + (" cold" if cold else "")
            key = layer_key(fmt, self.shape, self.dtype, self.sparsity, device, b)
            paths = self.paths(b)
            entry = store.get(machine, key)
            if entry is None or entry["choice"] not in map(str, paths) or "busy" in entry:  # busy: measured again
                entry = self._measure(paths, b, cold)
                store.put(machine, key, entry)
                measured = "measured" + (f" while busy ({entry['busy']})" if "busy" in entry else "")
            else:
                measured = "cached"
            if planner.verbose:
                x = entry["speedup"].get(entry["choice"])
                print(f"sparse_ops: {self.name or key}: {b} token{'s' * (b > 1)} -> {entry['choice']}"
                      + ("" if x is None else f" ({x:.2f}x of dense)") + f", {measured}", file=sys.stderr)
            self._routes[b] = entry
            chosen = {Path.parse(e["choice"]).base() for e in self._routes.values()}
            # the weights prepared for the timing: kept only for the paths a bucket runs
            self._states = {p: v for p, v in self._states.items() if p in chosen}
            return entry

    def _measure(self, paths: list[Path], b: int, cold: bool) -> dict:
        """A plan entry for bucket b: the choice and each path's speedup over dense, timed once more when the
        machine was busy (``sparse_ops.busy``) and marked ``busy`` if it still was."""
        for _ in range(2):
            with busy.Watch() as watch:
                times = self._time_paths(paths, b, cold)
            if not watch.load.busy:
                break
        medians = {p: t.median_s if isinstance(t, Timing) else t for p, t in times.items()}
        worst = {p: t.p90_s for p, t in times.items()} if all(isinstance(t, Timing) for t in times.values()) \
            else None
        entry = {"choice": choose(medians, self.planner.prefer_within, worst),
                 "speedup": {p: round(medians[DENSE] / max(t, 1e-12), 3) for p, t in medians.items()}}
        if watch.load.busy:
            entry["busy"] = watch.load.describe()
        return entry

    def _time_paths(self, paths: list[Path], b: int, cold: bool) -> dict[str, float] | dict[str, Timing]:
        """Seconds per call of each path at b tokens on this layer's weight (no activation); ``cold``: each call
        after ``flush_caches``."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(b, self.shape[1], generator=gen, device=self.device).to(self.dtype)
        fns = {str(p): functools.partial(self.bind(p, b), x, self.bias) for p in paths}
        timer = self.planner.timer
        with torch.inference_mode():
            if timer is not None:
                return timer(fns, self.device)
            if cold:
                return time_candidates(fns, self.device, repeats=COLD_REPEATS, before=flush_caches)
            return time_candidates(fns, self.device, repeats=PLAN_REPEATS, min_sample_s=PLAN_SAMPLE_S)


def plan_rows(model: torch.nn.Module) -> list[dict]:
    """One row per planned layer (a module whose ``router`` has a planner: ``SparseLinear``): name (the one it was
    loaded under, which a fusion that moves the layer does not change; else its place in ``model``), shape,
    format, sparsity and, per bucket, the chosen path with its speedup over dense (None where no call has
    reached that bucket yet)."""
    rows = []
    for name, m in model.named_modules():
        r = getattr(m, "router", None)
        if isinstance(r, Router) and r.planner is not None:
            rows.append({"name": r.name or name, "shape": r.shape, "format": r.format, "sparsity": r.sparsity,
                         "routes": {b: r.planned(b) for b in BUCKETS}})
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
