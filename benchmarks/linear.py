"""Sparse linear layers against dense ``F.linear`` and torch / scipy CSR, with the memory-bound limit.

For each shape, sparsity and batch (tokens), one weight is built that is 2:4 *and* exactly that sparse (2:4
pruning, then further random zeros), so every candidate multiplies the same matrix. Candidates, interleaved
in one ``time_interleaved`` run per point:
  dense           F.linear(x, W)                                  (the baseline)
  torch_csr_i64   W.to_sparse_csr() + torch.sparse.mm             (torch's CSR as a user calls it naively)
  torch_csr_i32   the same with int32 indices                      (tuned)
  torch_csr_flin  F.linear(x, W_csr_int32)                         (the other way to call it)
  scipy_csr       scipy.sparse.csr_matrix @ x^T
  sparse_csr / sparse_2:4 / sparse_auto   SparseLinear (auto measured at this batch, its choice recorded)
Memory-bound limit (batch 1 reads each weight byte once): dense bytes / stored bytes of the candidate's format.

Run: ``python -m benchmarks.linear --out benchmarks/results/linear [--quick] [--shapes square-4096 ...]``.
Writes linear.csv, linear.json (environment + rows) and one PNG per shape.
"""
from __future__ import annotations

import argparse
import csv
import json
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from benchmarks.shapes import BATCHES, SHAPE_SETS, SPARSITIES, LinearShape, shapes
from benchmarks.timing import environment, time_interleaved
from sparse_ops.formats import csr_nbytes, two_four_nbytes
from sparse_ops.linear import SparseLinear

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def two_four_weight(out: int, inp: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """(out, in) fp32 weight with 2 zeros in each group of 4, then exactly round(sparsity * numel) zeros."""
    w = torch.randn(out, inp // 4, 4, generator=gen)
    drop = torch.rand(out, inp // 4, 4, generator=gen).argsort(-1)[..., :2]
    w = w.scatter(-1, drop, 0.0).reshape(out, inp)
    extra = round(sparsity * w.numel()) - w.numel() // 2  # zeros still to add among the nonzeros
    if extra > 0:
        nz = w.view(-1).nonzero().squeeze(1)
        w.view(-1)[nz[torch.randperm(nz.numel(), generator=gen)[:extra]]] = 0.0
    return w


def memory_limits(shape: tuple[int, int], nnz: int) -> dict[str, float]:
    """Best batch-1 speedup per storage: dense bytes / bytes read (fp32 values)."""
    dense = shape[0] * shape[1] * 4
    return {"csr_i64": dense / ((shape[0] + 1) * 8 + nnz * 12), "csr_i32": dense / ((shape[0] + 1) * 4 + nnz * 8),
            "csr_i16": dense / csr_nbytes(shape, nnz, torch.float32),
            "2:4": dense / two_four_nbytes(shape, torch.float32)}


# candidate -> the storage its kernel reads (for the fraction of the memory-bound limit)
LIMIT_OF = {"dense": None, "torch_csr_i64": "csr_i64", "torch_csr_i32": "csr_i32", "torch_csr_flin": "csr_i32",
            "scipy_csr": "csr_i32", "sparse_csr": "csr_i32", "sparse_2:4": "2:4", "sparse_auto": "csr_i32"}


def _flinear_csr(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False):  # F.linear on a CSR weight fails inside inference mode (torch 2.14)
        return F.linear(x, w)


def candidates(w: torch.Tensor, x: torch.Tensor, batch: int) -> tuple[dict[str, object], str]:
    """name -> zero-argument callable computing x @ w^T, and the format auto chose."""
    csr64 = w.to_sparse_csr()
    csr32 = torch.sparse_csr_tensor(csr64.crow_indices().int(), csr64.col_indices().int(), csr64.values(),
                                    w.shape, check_invariants=False)
    sp, xn = scipy.sparse.csr_matrix(w.numpy()), x.numpy()
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    auto = SparseLinear.from_dense(lin, "auto", batch=batch)
    chose = auto.format if isinstance(auto, SparseLinear) else "dense"
    layers = {f: SparseLinear.from_dense(lin, f) for f in ("csr", "2:4")}
    return {
        "dense": lambda: F.linear(x, w),
        "torch_csr_i64": lambda: torch.sparse.mm(csr64, x.t()).t(),
        "torch_csr_i32": lambda: torch.sparse.mm(csr32, x.t()).t(),
        "torch_csr_flin": lambda: _flinear_csr(x, csr32),
        "scipy_csr": lambda: np.asarray(sp @ xn.T).T,
        "sparse_csr": lambda: layers["csr"](x),
        "sparse_2:4": lambda: layers["2:4"](x),
        "sparse_auto": lambda: auto(x),
    }, chose


def measure_point(shape: LinearShape, sparsity: float, batch: int, repeats: int, min_sample_s: float,
                  gen: torch.Generator) -> list[dict[str, object]]:
    """Rows for one (shape, sparsity, batch): every candidate timed interleaved in the same run."""
    w = two_four_weight(shape.out_features, shape.in_features, sparsity, gen)
    x = torch.randn(batch, shape.in_features, generator=gen)
    fns, chose = candidates(w, x, batch)
    times = time_interleaved(fns, warmup=2, repeats=repeats, min_sample_s=min_sample_s)
    limits = memory_limits((shape.out_features, shape.in_features), int(torch.count_nonzero(w)))
    rows = []
    for name, t in times.items():
        speedup = t.ratio_to(times["dense"])
        limit = limits[LIMIT_OF[name]] if LIMIT_OF[name] else 1.0
        rows.append(dict(shape=shape.label, out_features=shape.out_features, in_features=shape.in_features,
                         dtype="float32", sparsity=sparsity, batch=batch, candidate=name,
                         median_s=t.median_s, p10_s=t.p10_s, p90_s=t.p90_s, speedup=round(speedup, 4),
                         limit=round(limit, 3), fraction_of_limit=round(speedup / limit, 4),
                         auto_chose=chose if name == "sparse_auto" else ""))
    return rows


def plot(rows: list[dict[str, object]], shape_label: str, path: Path) -> None:
    """Speedup over dense against sparsity, one panel per batch; break-even at 1.0, memory-bound limit dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["shape"] == shape_label]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.8), squeeze=False, sharey=True)
    for ax, batch in zip(axes[0], batches):
        for name in LIMIT_OF:
            pts = sorted((r["sparsity"], r["speedup"]) for r in rows if r["batch"] == batch and r["candidate"] == name)
            if pts and name != "dense":
                ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        lim = sorted((r["sparsity"], r["limit"]) for r in rows if r["batch"] == batch and r["candidate"] == "sparse_csr")
        ax.plot(*zip(*lim), "k--", lw=1, label="memory-bound limit (csr int32)")
        ax.axhline(1.0, color="grey", lw=1, label="break-even (dense)")
        ax.set(title=f"batch {batch}", xlabel="sparsity", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup over dense F.linear")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{shape_label}, fp32, {environment()['cpu']}, {torch.get_num_threads()} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(rows: list[dict[str, object]], out: Path, args: dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "linear.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "linear.json").write_text(json.dumps({"environment": environment(), "args": args, "rows": rows}, indent=1))
    for label in dict.fromkeys(r["shape"] for r in rows):
        plot(rows, label, out / f"linear_{label.replace(' ', '_').replace('>', '')}.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/linear"))
    p.add_argument("--shapes", nargs="+", default=["square-4096"], help=f"sets ({', '.join(SHAPE_SETS)}) or OUTxIN")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="batches 1 64, sparsities 0.5 0.9, 3 repeats")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)  # on a shared machine, 1 thread avoids waiting on a descheduled one
    if a.quick:
        a.batches, a.sparsities, a.repeats = [1, 64], [0.5, 0.9], 3
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes(a.shapes):
        for sparsity in a.sparsities:
            for batch in a.batches:
                point = measure_point(shape, sparsity, batch, a.repeats, 0.01 if a.quick else 0.02, gen)
                rows += point
                ratio = {r["candidate"]: r["speedup"] for r in point}
                print(f"{shape.label:<28} s={sparsity:<5} b={batch:<4} " +
                      " ".join(f"{k}={v:.2f}" for k, v in ratio.items() if k != "dense"), flush=True)
    write_results(rows, a.out, {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()})


if __name__ == "__main__":
    main()
