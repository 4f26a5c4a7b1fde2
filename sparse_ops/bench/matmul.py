"""The matmul engine of ``prune bench matmul``: sparse linear layers against dense ``F.linear`` and the anchors.

For each shape and sparsity one weight is built that is 2:4 *and* exactly that sparse (2:4 pruning, then more
random zeros; below 50% sparsity plain random zeros), so every candidate multiplies the same matrix. At each
(dtype, batch) every candidate is timed interleaved with dense in one ``time_interleaved`` run:
  dense            F.linear(x, W)                                  the baseline every user has (cuBLAS, MKL)
  csr / 2:4        SparseLinear in that format (our kernels, through sparse_ops.dispatch)
  dense-int8, ...  the int8 formats (sparse_ops.quantized): W quantized per row, their error measured against
                   the dequantized weight (the kernel's error; quantization's own is a quality question)
  dense-int8+in8, ...  the same with int8 inputs (``input_bits=8``: x quantized per block of 32; one token
                   int8 x int8), their error against the dequantized weight times the quantized input
  auto             what sparsify() gives by default: the weight stored as `prune convert --format auto` would
                   (the smallest of dense/csr/2:4), planned at this batch (sparse_ops.plan: dense, each of
                   our kernels, torch's, measured here); its choice is recorded
  torch_csr_i64    W.to_sparse_csr() + torch.sparse.mm             torch's CSR as a user calls it naively
  torch_csr_i32    the same with int32 indices                      (tuned; cuSPARSE on CUDA)
  scipy_csr        scipy.sparse.csr_matrix @ x^T                   (CPU, fp32 only)
  torch_2:4        F.linear(x, to_sparse_semi_structured(W))       (CUDA, fp16/bf16: cuSPARSELt / CUTLASS)
A candidate that cannot run here (a dtype or device its library lacks) is skipped with the reason.

Memory-bound limit (batch 1 reads each weight byte once): dense weight bytes / the bytes of the weight as
the candidate stores it (``weight_bytes``); ``fraction_of_limit`` = speedup / limit. A kernel that does not
read its own format (2:4 on CPU runs as CSR or dense) can exceed its format's limit.

Run: ``prune bench matmul --help``.

Example:
    >>> import torch
    >>> w = two_four_weight(8, 16, 0.75, torch.Generator().manual_seed(0))
    >>> int((w == 0).sum()), limit_of("csr_i32", (8, 16), nnz=32, dtype=torch.float32)
    (96, 1.753)
"""
from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_ops.bench.shapes import LinearShape
from sparse_ops.checkpoint.layout import choose_storage
from sparse_ops.errors import UnsupportedError
from sparse_ops.linear import SparseLinear
from sparse_ops.plan import Planner
from sparse_ops.plan_cache import PlanCache
from sparse_ops.quantized import quantize_input
from sparse_ops.registry import FORMATS as SPARSE_FORMATS
from sparse_ops.registry import QUANTIZED, format_class
from sparse_ops.timing import Deadline, Timing, time_interleaved

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IN8 = "+in8"  # an int8 format's candidate with int8 inputs
FORMATS = ("dense", *SPARSE_FORMATS, *(f + IN8 for f in QUANTIZED), "auto")  # what --formats accepts: our layers
ANCHOR_DEVICES: dict[str, tuple[str, ...]] = {  # anchor -> device types it runs on
    "torch_csr_i64": ("cpu", "cuda"), "torch_csr_i32": ("cpu", "cuda"), "scipy_csr": ("cpu",),
    "torch_2:4": ("cuda",)}
# candidate -> the storage its kernel reads (for weight_bytes and the memory-bound limit); auto: its choice
STORAGE = {"dense": "dense", **{f: f for f in SPARSE_FORMATS}, **{f + IN8: f for f in QUANTIZED}, "csr:torch": "csr_i32", "torch_csr_i64": "csr_i64",
           "torch_csr_i32": "csr_i32", "scipy_csr": "csr_i32", "torch_2:4": "2:4"}
# largest relative error (max |y - ref| / max |ref|) a candidate may show against the fp32 reference
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def two_four_weight(out: int, inp: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """(out, in) fp32 weight with exactly round(sparsity * numel) zeros; 2:4 too when sparsity >= 0.5, in % 4 == 0."""
    dev = gen.device
    if sparsity < 0.5 or inp % 4:
        w = torch.randn(out, inp, generator=gen, device=dev)
        w.view(-1)[torch.randperm(w.numel(), generator=gen, device=dev)[:round(sparsity * w.numel())]] = 0.0
        return w
    w = torch.randn(out, inp // 4, 4, generator=gen, device=dev)
    drop = torch.rand(out, inp // 4, 4, generator=gen, device=dev).argsort(-1)[..., :2]  # 2 of every 4
    w = w.scatter(-1, drop, 0.0).reshape(out, inp)
    extra = round(sparsity * w.numel()) - w.numel() // 2  # zeros still to add among the nonzeros
    if extra > 0:
        nz = w.view(-1).nonzero().squeeze(1)
        w.view(-1)[nz[torch.randperm(nz.numel(), generator=gen, device=dev)[:extra]]] = 0.0
    return w


def weight_bytes(storage: str, shape: tuple[int, int], nnz: int, dtype: torch.dtype) -> int:
    """Bytes of an (out, in) weight with ``nnz`` nonzeros stored as ``storage``."""
    out, inp = shape
    es = torch.empty((), dtype=dtype).element_size()
    table = {"dense": lambda: out * inp * es,
             "csr_i64": lambda: (out + 1) * 8 + nnz * (8 + es),  # int64 row pointers and column indices
             "csr_i32": lambda: (out + 1) * 4 + nnz * (4 + es),
             **{f: functools.partial(cls.estimate_nbytes, shape, nnz, dtype) for f, cls in SPARSE_FORMATS.items()}}
    return table[storage]()


def limit_of(storage: str, shape: tuple[int, int], nnz: int, dtype: torch.dtype) -> float:
    """Memory-bound limit of a storage: dense weight bytes / its bytes (the best batch-1 speedup)."""
    return round(weight_bytes("dense", shape, nnz, dtype) / weight_bytes(storage, shape, nnz, dtype), 3)


@dataclass(frozen=True)
class Candidate:
    """One way to compute x @ W^T: a zero-argument call, the storage it reads, and what auto chose."""

    name: str
    fn: Callable[[], object]
    storage: str
    auto_chose: str = ""
    reference: torch.Tensor | None = None  # the weight its output should match (int8: dequantized); None: W
    quantized_input: bool = False  # the output should match the reference weight times quantize_input(x)


def _torch_csr(w: torch.Tensor, x: torch.Tensor, index_dtype: torch.dtype) -> Callable[[], object]:
    """torch.sparse.mm on W as a torch CSR tensor with ``index_dtype`` indices: (out, in) @ (in, N) -> (N, out)."""
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", once per process
        warnings.simplefilter("ignore", UserWarning)
        c = w.to_sparse_csr()
    c = torch.sparse_csr_tensor(c.crow_indices().to(index_dtype), c.col_indices().to(index_dtype), c.values(),
                                w.shape, check_invariants=False)
    return lambda: torch.sparse.mm(c, x.t()).t()


def _scipy(w: torch.Tensor, x: torch.Tensor) -> Callable[[], object]:
    import numpy as np
    import scipy.sparse

    if w.dtype != torch.float32:
        raise UnsupportedError(f"scipy has no {w.dtype} sparse product here (fp32 only)")
    sp, xt = scipy.sparse.csr_matrix(w.numpy()), x.numpy().T
    return lambda: np.asarray(sp @ xt).T


def _semi_structured(w: torch.Tensor, x: torch.Tensor) -> Callable[[], object]:
    ws = torch.sparse.to_sparse_semi_structured(w)
    return lambda: F.linear(x, ws)


def anchors(w: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], Callable[[], object]]]:
    """anchor -> builder of its call (a builder may raise: the anchor cannot run for this dtype/device)."""
    builders = {
        "torch_csr_i64": lambda: _torch_csr(w, x, torch.int64),
        "torch_csr_i32": lambda: _torch_csr(w, x, torch.int32),
        "scipy_csr": lambda: _scipy(w, x),
        "torch_2:4": lambda: _semi_structured(w, x),
    }
    return {k: b for k, b in builders.items() if w.device.type in ANCHOR_DEVICES[k]}


def planned(w: torch.Tensor, x: torch.Tensor) -> Candidate:
    """The layer ``sparsify`` makes by default for this weight, with its plan for x's batch measured here."""
    stored = choose_storage("weight", w, "auto", None)
    if stored == "dense":
        return Candidate("auto", lambda: F.linear(x, w), "dense", auto_chose="dense")
    layer = SparseLinear(format_class(stored).from_dense(w), planner=Planner(cache=PlanCache(None)))
    with torch.inference_mode():
        chose = str(layer.route(x.shape[0]).path)
    storage = STORAGE.get(chose) or STORAGE[chose.partition(".")[0]]  # csr.panels: csr
    return Candidate("auto", lambda: layer(x), storage, auto_chose=chose)


def ours(w: torch.Tensor, x: torch.Tensor, fmt: str) -> Candidate:
    """Our layer in ``fmt`` (csr, 2:4, an int8 format with or without ``IN8``, auto); NotImplementedError /
    ValueError where this weight cannot use it."""
    if fmt == "auto":
        return planned(w, x)
    bits = 8 if fmt.endswith(IN8) else None
    name, fmt = fmt, fmt.removesuffix(IN8)
    if fmt in SPARSE_FORMATS and not SPARSE_FORMATS[fmt].eligible(w):
        format_class(fmt).from_dense(w)  # raises, naming what breaks the format's pattern
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = SparseLinear.from_dense(lin, fmt)
    layer.input_bits = bits
    reference = layer.weight.to_dense() if layer.weight.QUANTIZED else None  # the kernel's error, not int8's
    return Candidate(name, lambda: layer(x), STORAGE[layer.choice], reference=reference, quantized_input=bool(bits))


def rel_error(y: object, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| for an output (tensor or numpy array) against the fp32 reference."""
    y = torch.as_tensor(y).to(ref.device, torch.float32)
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@dataclass(frozen=True)
class Measured:
    """One candidate's result at one point: its timing, the storage it read, its error, auto's choice."""

    candidate: str
    timing: Timing
    storage: str
    max_rel_err: float
    auto_chose: str


def collect(w: torch.Tensor, x: torch.Tensor, formats: tuple[str, ...],
            with_anchors: bool) -> tuple[list[Candidate], dict[str, str]]:
    """Every candidate that can run for this weight and input; skipped ones -> reason."""
    cands, skipped = [Candidate("dense", lambda: F.linear(x, w), "dense")], {}
    for f in formats:
        if f == "dense":
            continue
        try:
            cands.append(ours(w, x, f))
        except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
            skipped[f] = str(e).splitlines()[0]
    for name, build in (anchors(w, x) if with_anchors else {}).items():
        try:
            cands.append(Candidate(name, build(), STORAGE[name]))
        except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
            skipped[name] = str(e).splitlines()[0]
    return cands, skipped


def measure_weight(w: torch.Tensor, x: torch.Tensor, formats: tuple[str, ...], *, with_anchors: bool,
                   repeats: int, min_sample_s: float) -> tuple[list[Measured], dict[str, str]]:
    """Time dense and every other candidate on (w (out, in), x (batch, in)), interleaved in one run.

    Each candidate's output is first compared with an fp32 reference (``max_rel_err``); one that raises on
    its first call is skipped with the reason instead of being timed.
    """
    with warnings.catch_warnings():  # torch's beta / prototype notices, for this measurement only
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message=".*semi-structured sparsity support is in prototype.*")
        return _measure(w, x, formats, with_anchors, repeats, min_sample_s)


def _measure(w: torch.Tensor, x: torch.Tensor, formats: tuple[str, ...], with_anchors: bool, repeats: int,
             min_sample_s: float) -> tuple[list[Measured], dict[str, str]]:
    ref = x.float() @ w.float().t()  # (batch, out)
    cands, skipped = collect(w, x, formats, with_anchors)
    errors = {}
    with torch.inference_mode():
        for c in list(cands):
            try:
                xr = quantize_input(x.float()) if c.quantized_input else x.float()
                errors[c.name] = rel_error(c.fn(), ref if c.reference is None else xr @ c.reference.float().t())
            except (NotImplementedError, RuntimeError, ValueError, TypeError) as e:
                if c.name == "dense":
                    raise
                skipped[c.name] = str(e).splitlines()[0]
                cands.remove(c)
    times = time_interleaved({c.name: c.fn for c in cands}, warmup=2, repeats=repeats, min_sample_s=min_sample_s,
                             device=str(w.device))
    return [Measured(c.name, times[c.name], c.storage, errors[c.name], c.auto_chose) for c in cands], skipped


@dataclass(frozen=True)
class MatmulPlan:
    """One sweep: every shape x sparsity x dtype x batch, each point timing all candidates interleaved."""

    shapes: tuple[LinearShape, ...]
    sparsities: tuple[float, ...]
    batches: tuple[int, ...]
    dtypes: tuple[str, ...] = ("fp32",)
    formats: tuple[str, ...] = FORMATS
    device: str = "cpu"
    anchors: bool = True
    repeats: int = 7
    min_sample_s: float = 0.02
    seed: int = 0

    @property
    def points(self) -> int:
        return len(self.shapes) * len(self.sparsities) * len(self.dtypes) * len(self.batches)


@dataclass(frozen=True)
class MatmulRow:
    """One candidate at one point. Times in seconds per call; speedup = dense median / this median."""

    shape: str
    out_features: int
    in_features: int
    dtype: str
    device: str
    sparsity: float
    nnz: int
    batch: int
    candidate: str
    median_s: float
    p10_s: float
    p90_s: float
    speedup: float
    weight_bytes: int
    gbps: float  # (weight bytes + input + output bytes) / median, 1e9 bytes per second
    limit: float  # memory-bound limit of the storage this candidate reads
    fraction_of_limit: float
    max_rel_err: float
    auto_chose: str


MATMUL_COLUMNS = tuple(f.name for f in dataclasses.fields(MatmulRow))


def timed_columns(m: Measured, dense: Timing, shape: tuple[int, int], nnz: int,
                  dtype: torch.dtype) -> dict[str, object]:
    """The columns every result row shares, from one measurement and the dense timing of the same run."""
    speedup, limit = m.timing.ratio_to(dense), limit_of(m.storage, shape, nnz, dtype)
    return {"candidate": m.candidate, "median_s": m.timing.median_s, "p10_s": m.timing.p10_s,
            "p90_s": m.timing.p90_s, "speedup": round(speedup, 4),
            "weight_bytes": weight_bytes(m.storage, shape, nnz, dtype), "limit": limit,
            "fraction_of_limit": round(speedup / limit, 4), "max_rel_err": float(f"{m.max_rel_err:.3g}")}


def point_rows(shape: LinearShape, sparsity: float, dtype: str, batch: int, device: str, nnz: int,
               measured: list[Measured]) -> list[MatmulRow]:
    """Rows of one point from its measurements (dense among them, the baseline of the speedups)."""
    wshape, dt = (shape.out_features, shape.in_features), DTYPES[dtype]
    dense = next(m.timing for m in measured if m.candidate == "dense")
    io_bytes = batch * (shape.in_features + shape.out_features) * torch.empty((), dtype=dt).element_size()
    rows = []
    for m in measured:
        cols = timed_columns(m, dense, wshape, nnz, dt)
        gbps = round((cols["weight_bytes"] + io_bytes) / m.timing.median_s / 1e9, 3)
        rows.append(MatmulRow(shape=shape.label, out_features=shape.out_features, in_features=shape.in_features,
                              dtype=dtype, device=device, sparsity=sparsity, nnz=nnz, batch=batch, gbps=gbps,
                              auto_chose=m.auto_chose, **cols))
    return rows


def sweep(plan: MatmulPlan, deadline: Deadline,
          clock: Callable[[], float] = time.perf_counter) -> Iterator[tuple[list[MatmulRow], dict[str, str]]]:
    """Rows and skipped candidates (name -> reason) of each point, in order, until done or out of time.

    One weight per (shape, sparsity), built on the device from a generator seeded by ``plan.seed``.
    """
    start, last, done = clock(), 0.0, 0
    for shape in plan.shapes:
        for sparsity in plan.sparsities:
            gen = torch.Generator(plan.device).manual_seed(plan.seed)
            w32 = two_four_weight(shape.out_features, shape.in_features, sparsity, gen)
            for dtype in plan.dtypes:
                w = w32.to(DTYPES[dtype])
                nnz = int(torch.count_nonzero(w))
                for batch in plan.batches:
                    if not deadline.allows(done, clock() - start, last):
                        return
                    t0 = clock()
                    x = torch.randn(batch, shape.in_features, generator=gen, device=plan.device).to(w.dtype)
                    measured, skipped = measure_weight(w, x, plan.formats, with_anchors=plan.anchors,
                                                       repeats=plan.repeats, min_sample_s=plan.min_sample_s)
                    yield point_rows(shape, sparsity, dtype, batch, plan.device, nnz, measured), skipped
                    done, last = done + 1, clock() - t0
