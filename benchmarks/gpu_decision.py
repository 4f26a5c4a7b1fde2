"""The decision micro-benchmark for a lent GPU (step 2 of ``benchmarks/gpu_check.sh``): does our sparse layer
beat dense cuBLAS at decode batches on the Llama-7B shapes, kernel for kernel and call for call?

Cases (``cases()``, 48, the most decisive first so that a run cut short still answers): dtype fp16 then bf16 x
1 then 16 tokens x the Llama-7B linears 4096x4096, 11008x4096, 4096x11008 (out x in) x sparsity 50 / 70 / 90%
(unstructured random zeros: our tiled-bitmap CSR layer, ``sparse_ops.kernels.triton_sparse``, anchored by
cuSPARSE CSR through ``torch.sparse.mm`` with int32 indices) and 2:4 (our ``triton_two_four``, anchored by
``torch.sparse.to_sparse_semi_structured``: cuSPARSELt / CUTLASS). Our layer is ``SparseLinear`` without a
planner: the registry's first CUDA kernel for the format (``sparse_ops.dispatch``) in its default variant.

Every candidate (dense ``F.linear``, ours, the anchor) is timed two ways, interleaved round by round (dense,
ours, anchor, dense, ...), medians and p10 / p90 over ``--rounds``:
  kernel-only, cold L2   a CUDA graph of many calls rotating over enough copies of the weight that their bytes
                         exceed twice the L2 (``torch.cuda.get_device_properties(0).L2_cache_size``, else 64
                         MiB assumed), so every call streams its weight from HBM; host overhead is gone (the
                         graph replays the launches), the time is graph time / calls (CUDA events). Where a
                         call cannot be captured in a graph (a library that synchronises), each call is timed
                         with events after writing a buffer of max(2 x L2, 256 MiB) (the L2 flushed; the long
                         write also keeps the host ahead of the GPU); the row's ``*_method`` says which.
  eager                  the Python call a user makes, ``layer(x)`` (``nn.Linear`` for dense, ``SparseLinear``
                         for ours, the torch call for the anchors), many calls rotating over the same copies,
                         wall clock between two synchronisations / calls: host overhead included.
Our kernel's other variants at the case's token count (the tiled kernel's "plain" / "splitk" / at one token
"gemv", 2:4's "plain" / "splitk") are timed kernel-only beside the default: ``variants_us``, ``best_variant``
and ``best_variant_speedup`` say which should be the default (``pick``) on this GPU. Where the tiled kernel
takes several tiles per iteration (70% and 90%: ``AlignedTiles.step``), "<variant>-step1" times it one tile
at a time: whether the loads in flight ``model.md`` predicts are what bounds it.
Bandwidth: (weight bytes as the kernel reads them + x + y) / kernel-only time, against a measured copy ceiling
(a device-to-device ``copy_`` of a 512 MiB buffer, read + written, event-timed).

Output in ``--out``: ``decision.json`` (a header: GPU, driver, CUDA, torch, triton, L2, copy ceiling, status;
and the rows), ``decision.csv`` (the same rows; the header as ``# key: value`` lines first), ``decision.png``
(speedup over dense against tokens, per shape and dtype, one line per sparsity; solid kernel-only, dashed
eager) where matplotlib is importable. The files are rewritten after every case, so a run killed by its
timeout leaves what it measured.

Without a CUDA GPU it exits 3 at once with a one-line message (``--dry-run`` too, after listing the cases).
``--quick`` measures nothing: it writes the three files from fake timings (a smoke check of everything but the
measurement, on any machine). ``--profile-launch``: one tiled-bitmap launch (4096x4096, 90%, 1 token, fp16) for
``ncu`` (step 4 of gpu_check.sh).

    python benchmarks/gpu_decision.py --out benchmarks/results/gpu [--max-seconds 200] [--rounds 11]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

NO_GPU = 3  # exit code without a CUDA GPU (gpu_check.sh's too)
NO_GPU_MESSAGE = "gpu_decision: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured"
SHAPES: tuple[tuple[str, int, int], ...] = (  # Llama-7B linears: (name, out, in)
    ("llama-7b attn 4096x4096", 4096, 4096),
    ("llama-7b up/gate 11008x4096", 11008, 4096),
    ("llama-7b down 4096x11008", 4096, 11008),
)
PATTERNS = ("50%", "70%", "90%", "2:4")
TOKENS = (1, 16)
DTYPES = ("fp16", "bf16")
ASSUMED_L2 = 64 << 20  # bytes, where the device does not say
MAX_COPIES = 64
COPY_BYTES = 512 << 20  # the copy ceiling's buffer
FLUSH_MIN = 256 << 20  # the fallback's L2 flush buffer, at least
MIN_GRAPH_CALLS = 32  # calls per graph replay (and per eager sample), at least
ANCHORS = {"csr": "cusparse_csr_i32", "2:4": "torch_semi_structured"}
VARIANT = "variant:"  # candidates named VARIANT + v: our kernel in its variant v, where v is not the default
COLUMNS = (
    "shape", "out", "in", "pattern", "format", "sparsity", "dtype", "tokens",
    "dense_us", "dense_p10_us", "dense_p90_us", "dense_eager_us",
    "ours_us", "ours_p10_us", "ours_p90_us", "ours_eager_us", "ours_kernel", "ours_variant",
    "anchor", "anchor_us", "anchor_eager_us",
    "speedup", "eager_speedup", "anchor_speedup", "anchor_eager_speedup", "ours_vs_anchor",
    "dense_bytes", "ours_bytes", "anchor_bytes", "limit", "fraction_of_limit",
    "dense_gbps", "ours_gbps", "anchor_gbps", "copy_gbps", "ours_of_copy",
    "copies_dense", "copies_ours", "copies_anchor", "dense_method", "ours_method", "anchor_method",
    "ours_rel_err", "anchor_rel_err", "variants_us", "best_variant", "best_variant_speedup", "error")


@dataclass(frozen=True)
class Case:
    """One point: a Llama-7B shape, a sparsity pattern ("50%" ... or "2:4"), a dtype and a token count."""

    shape: str
    out: int
    inp: int
    pattern: str
    dtype: str
    tokens: int

    @property
    def format(self) -> str:
        """Our layer's format: "2:4", else "csr" (run by the tiled-bitmap kernel)."""
        return "2:4" if self.pattern == "2:4" else "csr"

    @property
    def sparsity(self) -> float:
        """The fraction of zeros asked for."""
        return 0.5 if self.pattern == "2:4" else int(self.pattern.rstrip("%")) / 100


@dataclass(frozen=True)
class Stats:
    """One candidate's result at one case: kernel-only (cold L2) and eager microseconds per call."""

    us: float
    p10_us: float
    p90_us: float
    eager_us: float
    bytes: int  # the weight as its kernel reads it
    copies: int
    method: str  # "graph" or "flush" (kernel-only timing)
    rel_err: float = float("nan")
    kernel: str = ""
    variant: str = ""


def cases(dtypes: Sequence[str] = DTYPES, tokens: Sequence[int] = TOKENS,
          patterns: Sequence[str] = PATTERNS) -> list[Case]:
    """Every case, the most decisive first: dtype, then tokens, then shape, then pattern."""
    return [Case(name, out, inp, p, d, n) for d in dtypes for n in tokens for name, out, inp in SHAPES
            for p in patterns]


def copies_for(nbytes: int, l2_bytes: int) -> int:
    """Copies of a weight whose bytes together exceed twice the L2 (2 at least, ``MAX_COPIES`` at most).

    >>> copies_for(32 << 20, 50 << 20), copies_for(100 << 20, 50 << 20), copies_for(1, 50 << 20)
    (4, 2, 64)
    """
    return max(2, min(MAX_COPIES, math.ceil(2 * l2_bytes / max(nbytes, 1))))


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b and math.isfinite(a) and math.isfinite(b) else None


def _gbps(nbytes: int, us: float | None) -> float | None:
    return round(nbytes / us / 1e3, 1) if us and math.isfinite(us) else None


def _r(v: float | None, digits: int = 2) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, digits)


def make_row(case: Case, dense: Stats | None, ours: Stats | None, anchor: Stats | None, copy_gbps: float | None,
             io_bytes: int, sparsity: float | None = None, error: str = "",
             variants: dict[str, Stats] | None = None) -> dict[str, object]:
    """The result row of one case (keys ``COLUMNS``); a missing candidate leaves its cells empty (None).
    ``io_bytes``: x and y bytes, added to each weight's for GB/s. ``variants``: our kernel's other variants
    (kernel-only), beside the default's ``ours``: which one should be the default is what they decide."""
    kernel_us = {**({ours.variant: ours.us} if ours and ours.variant else {}),
                 **{v: st.us for v, st in (variants or {}).items()}}
    best = min(kernel_us, key=kernel_us.get) if kernel_us else ""
    es = 2  # fp16 / bf16
    dense_bytes = case.out * case.inp * es
    speedup = _ratio(dense and dense.us, ours and ours.us)
    limit = _ratio(dense_bytes, ours.bytes) if ours else None
    ours_gbps = _gbps(ours.bytes + io_bytes, ours.us) if ours else None
    return {
        "shape": case.shape, "out": case.out, "in": case.inp, "pattern": case.pattern, "format": case.format,
        "sparsity": round(case.sparsity if sparsity is None else sparsity, 4), "dtype": case.dtype,
        "tokens": case.tokens,
        "dense_us": _r(dense and dense.us), "dense_p10_us": _r(dense and dense.p10_us),
        "dense_p90_us": _r(dense and dense.p90_us), "dense_eager_us": _r(dense and dense.eager_us),
        "ours_us": _r(ours and ours.us), "ours_p10_us": _r(ours and ours.p10_us),
        "ours_p90_us": _r(ours and ours.p90_us), "ours_eager_us": _r(ours and ours.eager_us),
        "ours_kernel": ours.kernel if ours else "", "ours_variant": ours.variant if ours else "",
        "anchor": ANCHORS[case.format], "anchor_us": _r(anchor and anchor.us),
        "anchor_eager_us": _r(anchor and anchor.eager_us),
        "speedup": speedup, "eager_speedup": _ratio(dense and dense.eager_us, ours and ours.eager_us),
        "anchor_speedup": _ratio(dense and dense.us, anchor and anchor.us),
        "anchor_eager_speedup": _ratio(dense and dense.eager_us, anchor and anchor.eager_us),
        "ours_vs_anchor": _ratio(anchor and anchor.us, ours and ours.us),
        "dense_bytes": dense_bytes, "ours_bytes": ours.bytes if ours else None,
        "anchor_bytes": anchor.bytes if anchor else None, "limit": limit,
        "fraction_of_limit": _ratio(speedup, limit),
        "dense_gbps": _gbps(dense_bytes + io_bytes, dense and dense.us), "ours_gbps": ours_gbps,
        "anchor_gbps": _gbps(anchor.bytes + io_bytes, anchor.us) if anchor else None,
        "copy_gbps": _r(copy_gbps, 1), "ours_of_copy": _ratio(ours_gbps, copy_gbps),
        "copies_dense": dense.copies if dense else None, "copies_ours": ours.copies if ours else None,
        "copies_anchor": anchor.copies if anchor else None,
        "dense_method": dense.method if dense else "", "ours_method": ours.method if ours else "",
        "anchor_method": anchor.method if anchor else "",
        "ours_rel_err": _r(ours and ours.rel_err, 5), "anchor_rel_err": _r(anchor and anchor.rel_err, 5),
        "variants_us": " ".join(f"{v}={us:.2f}" for v, us in sorted(kernel_us.items())),
        "best_variant": best, "best_variant_speedup": _ratio(dense and dense.us, kernel_us.get(best)),
        "error": error,
    }


def write_results(out: Path, header: dict[str, object], rows: list[dict[str, object]]) -> list[Path]:
    """Write ``decision.json`` (header + rows) and ``decision.csv`` (``# key: value`` header lines, then the
    columns); each through a temporary file and a rename, so a kill never leaves half a file."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "decision.json", out / "decision.csv"]
    tmp = [p.with_name(f".{p.name}.tmp") for p in paths]
    tmp[0].write_text(json.dumps({"header": header, "columns": list(COLUMNS), "rows": rows}, indent=1,
                                 default=str) + "\n")
    with open(tmp[1], "w", newline="") as f:
        for key, value in header.items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            f.write(f"# {key}: {' '.join(str(text).split())}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    for t, p in zip(tmp, paths):
        os.replace(t, p)
    return paths


def read_csv(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(header, rows) of a ``decision.csv``: the inverse of ``write_results`` (every cell a string)."""
    header, body = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            key, _, value = line[2:].partition(": ")
            header[key] = value
        else:
            body.append(line)
    return header, list(csv.DictReader(body))


def plot(out: Path, header: dict[str, object], rows: list[dict[str, object]]) -> Path | None:
    """``decision.png``: speedup over dense against tokens, a panel per (dtype, shape), a line per pattern
    (solid kernel-only, dashed eager); None where matplotlib is missing or nothing was measured."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    if not dtypes:
        return None
    fig, axes = plt.subplots(len(dtypes), len(SHAPES), figsize=(5 * len(SHAPES), 3.8 * len(dtypes)),
                             squeeze=False, sharex=True)
    for i, dtype in enumerate(dtypes):
        for j, (shape, _, _) in enumerate(SHAPES):
            ax = axes[i][j]
            for k, pattern in enumerate(PATTERNS):
                pts = sorted((r["tokens"], r["speedup"], r["eager_speedup"]) for r in rows
                             if r["dtype"] == dtype and r["shape"] == shape and r["pattern"] == pattern)
                color = f"C{k}"
                kern = [(n, s) for n, s, _ in pts if s]
                eager = [(n, e) for n, _, e in pts if e]
                if kern:
                    ax.plot(*zip(*kern), "o-", color=color, label=f"{pattern} kernel")
                if eager:
                    ax.plot(*zip(*eager), "s--", color=color, alpha=0.6, label=f"{pattern} eager")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{shape} {dtype}", fontsize=9)
            ax.set_xlabel("tokens")
            ax.set_ylabel("speedup over cuBLAS dense")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{header.get('gpu', '?')} (driver {header.get('driver', '?')}), torch {header.get('torch', '?')}, "
                 f"triton {header.get('triton', '?')}: cold-L2 kernel (solid), eager (dashed)", fontsize=10)
    fig.tight_layout()
    path = out / "decision.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fake_stats(case: Case, name: str) -> Stats:
    """Deterministic made-up timings for ``--quick`` (shaped like a memory-bound GPU, never measured)."""
    dense_bytes = case.out * case.inp * 2
    kept = 0.5 if case.format == "2:4" else 1 - case.sparsity
    nbytes = {"dense": dense_bytes, "ours": int(dense_bytes * (kept + 1 / 16)),
              "anchor": int(dense_bytes * kept * 3)}[name]
    us = 2.0 + nbytes / 2.5e6 * (1 + 0.02 * case.tokens)  # about 2.5 TB/s
    return Stats(us, us * 0.95, us * 1.1, us + 12.0, nbytes, copies_for(nbytes, 50 << 20), "fake", 1e-3,
                 "fake" if name == "ours" else "", "plain" if name == "ours" else "")


def quick(out: Path) -> list[Path]:
    """``--quick``: the files from fake timings, nothing measured (no GPU needed)."""
    header = {"gpu": "none (--quick: fake timings, nothing measured)", "driver": "-", "torch": "-",
              "triton": "-", "status": "quick", "l2_bytes": 50 << 20, "copy_gbps": 3000.0}
    rows = [make_row(c, fake_stats(c, "dense"), fake_stats(c, "ours"), fake_stats(c, "anchor"), 3000.0,
                     (c.tokens * (c.inp + c.out)) * 2) for c in cases()]
    paths = write_results(out, header, rows)
    png = plot(out, header, rows)
    return paths + ([png] if png else [])


# --- measuring on a GPU --------------------------------------------------------------------------------------

def _torch():
    import torch
    return torch


def cuda_present() -> bool:
    """Whether torch is importable and sees a CUDA device."""
    try:
        return _torch().cuda.is_available()
    except ImportError:
        return False


def l2_bytes() -> tuple[int, str]:
    """(the L2 in bytes, "device" or "assumed")."""
    size = int(getattr(_torch().cuda.get_device_properties(0), "L2_cache_size", 0) or 0)
    return (size, "device") if size > 0 else (ASSUMED_L2, "assumed")


def gpu_header() -> dict[str, object]:
    """The facts every result carries: GPU, driver, CUDA, torch, triton, python, L2, autotuning."""
    torch = _torch()
    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    from sparse_ops.timing import nvidia_driver

    l2, l2_source = l2_bytes()
    return {"gpu": props.name, "driver": nvidia_driver(), "cuda": torch.version.cuda, "torch": torch.__version__,
            "triton": triton_version, "python": platform.python_version(),
            "compute_capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "l2_bytes": l2, "l2_source": l2_source,
            "autotune": os.environ.get("SPARSE_OPS_TRITON_AUTOTUNE", "1") != "0",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timing": "kernel-only: CUDA graph of calls rotating over weight copies > 2x L2 (cold L2), events, "
                      "median of rounds; eager: wall clock of the Python calls; dense/ours/anchor interleaved"}


def copy_ceiling_gbps(rounds: int = 15) -> float:
    """GB/s of a device-to-device ``copy_`` of ``COPY_BYTES`` (read + write counted), median over rounds."""
    torch = _torch()
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    times = []
    for i in range(rounds + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    return 2 * COPY_BYTES / statistics.median(times) / 1e9


class Timer:
    """Kernel-only (cold L2) and eager samples of one candidate: ``calls`` rotate over its weight copies."""

    def __init__(self, kernel_calls: list[Callable[[], object]], eager_calls: list[Callable[[], object]],
                 flush_bytes: int):
        torch = _torch()
        self.kernel_calls, self.eager_calls = kernel_calls, eager_calls
        n = len(kernel_calls)
        self.calls = n * math.ceil(MIN_GRAPH_CALLS / n)
        self.graph, self.method, self.why = None, "graph", ""
        self.flush_bytes = flush_bytes
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
            for f in kernel_calls:
                f()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(self.calls):
                    kernel_calls[i % n]()
            graph.replay()
            torch.cuda.synchronize()
            self.graph = graph
        except Exception as e:  # noqa: BLE001 (a library that cannot be captured: time it with a flush instead)
            torch.cuda.synchronize()
            self.method, self.why = "flush", _why(e)
            self.flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device="cuda")

    def kernel_us(self) -> float:
        """One sample: microseconds per call, cold L2, host overhead excluded."""
        torch = _torch()
        if self.graph is not None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / self.calls
        pairs = []
        for i in range(len(self.kernel_calls) * 2):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.kernel_calls[i % len(self.kernel_calls)]()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3

    def eager_us(self) -> float:
        """One sample: microseconds per Python-level call (wall clock), rotating over the copies."""
        torch = _torch()
        n = len(self.eager_calls)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(self.calls):
            self.eager_calls[i % n]()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e6 / self.calls


def _summary(kernel: list[float], eager: list[float]) -> tuple[float, float, float, float]:
    qs = statistics.quantiles(kernel, n=10) if len(kernel) > 1 else [kernel[0]] * 9
    return statistics.median(kernel), qs[0], qs[-1], statistics.median(eager) if eager else float("nan")


def make_weight(case: Case, seed: int = 0, device: str = "cuda"):
    """The case's (out, in) weight in its dtype: exactly 2:4, or about ``sparsity`` random zeros."""
    torch = _torch()
    from sparse_ops.bench.matmul import two_four_weight

    gen = torch.Generator(device=device).manual_seed(seed)
    if case.format == "2:4":
        w = two_four_weight(case.out, case.inp, 0.5, gen)
    else:
        w = torch.randn(case.out, case.inp, generator=gen, device=device)
        w[torch.rand(case.out, case.inp, generator=gen, device=device) < case.sparsity] = 0.0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[case.dtype]
    return (w * 0.02).to(dtype)


def _rel_err(y, ref) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _state_bytes(state) -> int:
    """Bytes of a kernel's prepared weight: its ``nbytes`` (our formats), a torch CSR tensor's three parts, or
    the tensors it holds (a wrapper's attributes)."""
    torch = _torch()
    if isinstance(state, torch.Tensor):
        if state.layout == torch.sparse_csr:
            return sum(_state_bytes(t) for t in (state.crow_indices(), state.col_indices(), state.values()))
        return state.numel() * state.element_size()
    if isinstance(getattr(state, "nbytes", None), int):
        return state.nbytes
    held = list(vars(state).values()) if hasattr(state, "__dict__") else list(state) if isinstance(state, tuple) else []
    return sum(_state_bytes(v) for v in held if isinstance(v, torch.Tensor | tuple) or hasattr(v, "__dict__"))


def build(case: Case, w, x, l2: int) -> tuple[dict[str, tuple[list, list, int, str, str]], str]:
    """(name -> (kernel calls, eager calls, weight bytes, kernel, variant), the anchor's error or "") for dense,
    ours and the anchor, each over enough copies of the weight to exceed twice the L2. The anchor is left out
    (its error returned) where torch cannot run it for this dtype or shape."""
    torch = _torch()
    import torch.nn.functional as F

    from sparse_ops.formats import CSR, TwoFour, two_four_nbytes
    from sparse_ops.kernels import torch_cuda
    from sparse_ops.linear import SparseLinear

    n_dense = copies_for(w.numel() * w.element_size(), l2)
    dense = [w] + [w.clone() for _ in range(n_dense - 1)]
    modules = []
    for wc in dense:  # what a user's dense layer is: nn.Linear (built on meta: no init of a weight replaced)
        lin = torch.nn.Linear(case.inp, case.out, bias=False, device="meta", dtype=w.dtype)
        lin.weight = torch.nn.Parameter(wc, requires_grad=False)
        modules.append(lin)
    built = {"dense": ([lambda wc=wc: F.linear(x, wc) for wc in dense], [lambda m=m: m(x) for m in modules],
                       w.numel() * w.element_size(), "cublas", "")}
    fmt = TwoFour if case.format == "2:4" else CSR
    layers = [SparseLinear(fmt.from_dense(w))]
    route = layers[0].route(case.tokens)
    nbytes = _state_bytes(route.state)
    layers += [SparseLinear(fmt.from_dense(w)) for _ in range(copies_for(nbytes, l2) - 1)]
    routes = [layer.route(case.tokens) for layer in layers]
    built["ours"] = ([lambda r=r: r(x, None) for r in routes], [lambda m=m: m(x) for m in layers], nbytes,
                     layers[0].kernel.name, route.variant)
    kernel = layers[0].kernel
    for v in kernel.variants(case.tokens) if kernel.variants else ():  # the others: kernel-only, no eager
        if v != route.variant:
            path = dataclasses.replace(route.path, variant=v)
            others = [layer.router.bind(path, case.tokens) for layer in layers]
            built[VARIANT + v] = ([lambda r=r: r(x, None) for r in others], [], nbytes, kernel.name, v)
    if getattr(route.state, "step", 1) > 1:  # the tiled kernel, several tiles per iteration: also one at a time
        from sparse_ops.kernels import triton_sparse as ts

        ones = [dataclasses.replace(r.state, step=1) for r in routes]
        name = f"{route.variant}-step1"
        built[VARIANT + name] = ([lambda s=s: ts.matmul(s, x, None, variant=route.variant) for s in ones], [],
                                 nbytes, kernel.name, name)
    if case.format == "2:4":  # torch's semi-structured (cuSPARSELt / CUTLASS), as sparse_ops' "2:4:torch" path
        prepare, call = (lambda: torch_cuda.prepare_two_four(TwoFour.from_dense(w))), torch_cuda.two_four_matmul
    else:  # cuSPARSE through torch.sparse.mm, int32 indices, as sparse_ops' "csr:torch" path
        prepare, call = (lambda: torch_cuda.prepare_csr(CSR.from_dense(w))), torch_cuda.csr_matmul
    try:
        states = [prepare()]
        call(states[0], x, None)
        nbytes = (two_four_nbytes((case.out, case.inp), w.dtype) if case.format == "2:4"
                  else _state_bytes(states[0]))
        states += [prepare() for _ in range(copies_for(nbytes, l2) - 1)]
    except Exception as e:  # noqa: BLE001 (torch lacks this dtype or shape here: the row says so)
        return built, _why(e)
    calls = [lambda s=s: call(s, x, None) for s in states]
    built["anchor"] = (calls, calls, nbytes, ANCHORS[case.format], "")
    return built, ""


def _why(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def measure(case: Case, l2: int, rounds: int) -> tuple[dict[str, Stats], float, int, str]:
    """(candidate -> Stats, the weight's actual sparsity, x + y bytes, errors) of one case, candidates
    interleaved round by round."""
    torch = _torch()
    w = make_weight(case)
    sparsity = float((w == 0).float().mean())
    x = torch.randn(case.tokens, case.inp, device="cuda").to(w.dtype)
    ref = x.float() @ w.float().t()
    errors = []
    with torch.inference_mode():
        built, anchor_error = build(case, w, x, l2)
        if anchor_error:
            errors.append(f"anchor: {anchor_error}")
        timers, info = {}, {}
        for name, (kcalls, ecalls, nbytes, kernel, variant) in built.items():
            try:
                err = _rel_err(kcalls[0](), ref)
                timers[name] = Timer(kcalls, ecalls, max(2 * l2, FLUSH_MIN))
                info[name] = (nbytes, len(kcalls), err, kernel, variant)
                if timers[name].why:
                    errors.append(f"{name}: no graph ({timers[name].why}), flush timing")
            except Exception as e:  # noqa: BLE001 (one candidate failing leaves the others measured)
                errors.append(f"{name}: {_why(e)}")
        samples = {name: ([], []) for name in timers}
        for _ in range(rounds):
            for name, timer in timers.items():
                samples[name][0].append(timer.kernel_us())
                if timer.eager_calls:
                    samples[name][1].append(timer.eager_us())
    stats = {}
    for name, (kernel, eager) in samples.items():
        us, p10, p90, eager_us = _summary(kernel, eager)
        nbytes, copies, err, kname, variant = info[name]
        stats[name] = Stats(us, p10, p90, eager_us, nbytes, copies, timers[name].method, err, kname, variant)
    io = (case.tokens * (case.inp + case.out)) * x.element_size()
    return stats, sparsity, io, "; ".join(errors)


def run(out: Path, max_seconds: float, rounds: int, selected: list[Case]) -> int:
    """Measure ``selected`` within ``max_seconds`` (a case starts only if the last one's time still fits),
    rewriting the files after each; 0 when every case was measured without error, else 1."""
    torch = _torch()
    t0 = time.perf_counter()
    header = {**gpu_header(), "rounds": rounds, "max_seconds": max_seconds, "cases": len(selected)}
    l2 = int(header["l2_bytes"])
    header["copy_gbps"] = round(copy_ceiling_gbps(), 1)
    print(f"gpu_decision: {header['gpu']}, driver {header['driver']}, CUDA {header['cuda']}, torch "
          f"{header['torch']}, triton {header['triton']}, L2 {l2 >> 20} MiB ({header['l2_source']}), "
          f"copy ceiling {header['copy_gbps']} GB/s", flush=True)
    rows: list[dict[str, object]] = []
    last, failed = 0.0, 0
    for i, case in enumerate(selected):
        elapsed = time.perf_counter() - t0
        if i and elapsed + last > max_seconds:
            header["status"] = f"stopped by --max-seconds {max_seconds:g} after {i} of {len(selected)} cases"
            break
        header["status"] = f"running: {i} of {len(selected)} cases"
        c0 = time.perf_counter()
        try:
            stats, sparsity, io, error = measure(case, l2, rounds)
        except Exception as e:  # noqa: BLE001 (the row records it; the next case still runs)
            stats, sparsity, io, error = {}, None, 0, _why(e)
        torch.cuda.empty_cache()
        last = time.perf_counter() - c0
        failed += "ours" not in stats or "dense" not in stats
        variants = {k.removeprefix(VARIANT): st for k, st in stats.items() if k.startswith(VARIANT)}
        row = make_row(case, stats.get("dense"), stats.get("ours"), stats.get("anchor"), header["copy_gbps"],
                       io, sparsity, error, variants)
        rows.append(row)
        print(f"[{i + 1}/{len(selected)} {last:5.1f}s] {case.shape} {case.pattern} {case.dtype} {case.tokens} tok: "
              f"dense {row['dense_us']} us, ours {row['ours_us']} us ({row['speedup']}x kernel, "
              f"{row['eager_speedup']}x eager), {row['anchor']} {row['anchor_us']} us, variants "
              f"{row['variants_us']}" + (f"  [{error}]" if error else ""), flush=True)
        write_results(out, header, rows)
    else:
        header["status"] = f"complete: {len(selected)} cases"
    header["seconds"] = round(time.perf_counter() - t0, 1)
    paths = write_results(out, header, rows)
    png = plot(out, header, rows)
    print(f"gpu_decision: {header['status']}; wrote {', '.join(p.name for p in paths + ([png] if png else []))}")
    return 0 if rows and not failed else 1


def profile_launch() -> int:
    """One tiled-bitmap product (4096x4096, 90%, 1 token, fp16) for ncu: the first ``_tiled_kernel`` launch."""
    torch = _torch()
    from sparse_ops.formats import CSR
    from sparse_ops.linear import SparseLinear

    case = Case("llama-7b attn 4096x4096", 4096, 4096, "90%", "fp16", 1)
    layer = SparseLinear(CSR.from_dense(make_weight(case)))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        for _ in range(3):
            layer(x)
    torch.cuda.synchronize()
    print(f"profile-launch: {layer.kernel.name}, variant {layer.route(1).variant}, 3 calls done")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    p.add_argument("--max-seconds", type=float, default=200.0, help="start no case past this (default 200)")
    p.add_argument("--rounds", type=int, default=11, help="interleaved rounds per case (default 11)")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list the cases; exit 3 without a CUDA GPU")
    mode.add_argument("--quick", action="store_true", help="write the files from fake timings (no GPU)")
    mode.add_argument("--profile-launch", action="store_true", help="one tiled-bitmap launch, for ncu")
    args = p.parse_args(argv)
    os.environ.setdefault("SPARSE_OPS_NATIVE", "0")  # no C++ build on a GPU machine
    if args.quick:
        paths = quick(args.out)
        print(f"gpu_decision --quick: fake timings, wrote {', '.join(str(p) for p in paths)}")
        return 0
    selected = cases(args.dtype, args.tokens, args.patterns)
    if args.dry_run:
        for c in selected:
            print(f"{c.dtype} {c.tokens:>3} tok  {c.shape:<28} {c.pattern:>4}  {c.format}")
    if not cuda_present():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return NO_GPU
    if args.dry_run:
        return 0
    if args.profile_launch:
        return profile_launch()
    return run(args.out, args.max_seconds, args.rounds, selected)


if __name__ == "__main__":
    sys.exit(main())
