"""Our C++ CPU kernels against dense ``F.linear``, torch CSR (int32 / int64), scipy and the memory-bound limit.

For each shape, sparsity and batch (tokens) one weight is built that is 2:4 *and* exactly that sparse
(``sparse_ops.bench.matmul.two_four_weight``), so every candidate multiplies the same matrix. Candidates, interleaved
in one ``time_interleaved`` run per point (fp32 unless named):
  dense            F.linear(x, W)                          the baseline (and dense_bf16 for bf16 rows)
  torch_csr_i64    W.to_sparse_csr() + torch.sparse.mm     torch's CSR as a user calls it naively
  torch_csr_i32    the same with int32 indices (torch.mv at batch 1): torch's best CPU CSR path
  scipy_csr        scipy.sparse.csr_matrix @ x^T
  ours_csr         SparseLinear "csr" on our kernel (int16 columns when in <= 32767)
  ours_2:4         SparseLinear "2:4" on our kernel (values + 2-bit codes)
bf16 rows: dense_bf16, ours_csr_bf16, ours_2:4_bf16 against dense_bf16.
Memory-bound limit (batch 1 reads each weight byte once): dense bytes / stored bytes, per candidate's storage.

Run: ``python -m benchmarks.cpu_kernels --out benchmarks/results/cpu_kernels [--quick] [--threads 2]``.
Writes cpu_kernels.csv, cpu_kernels.json (environment + args + rows) and cpu_kernels.png.
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

from sparse_ops.bench.matmul import two_four_weight
from sparse_ops.formats import csr_nbytes, two_four_nbytes
from sparse_ops.kernels import cpp
from sparse_ops.linear import SparseLinear
from sparse_ops.timing import environment, time_interleaved

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

SHAPES = ((4096, 4096), (11008, 4096))  # (out, in): Llama-7B attention and FFN-down-like (11008 outputs)
BATCHES = (1, 8, 64, 256)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
BF16_SPARSITIES = (0.7, 0.9)


def limits(shape: tuple[int, int], nnz: int, dtype: torch.dtype) -> dict[str, float]:
    """Best batch-1 speedup of each storage over the dense weight of the same dtype: dense bytes / bytes read."""
    out, inp = shape
    dense = out * inp * torch.empty((), dtype=dtype).element_size()
    return {"csr_i64": out * inp * 4 / ((out + 1) * 8 + nnz * 12), "csr_i32": out * inp * 4 / ((out + 1) * 4 + nnz * 8),
            "csr": dense / csr_nbytes(shape, nnz, dtype), "2:4": dense / two_four_nbytes(shape, dtype)}


# candidate -> (the storage its kernel reads, the dense candidate it is compared to)
LIMIT_OF = {"dense": (None, "dense"), "torch_csr_i64": ("csr_i64", "dense"), "torch_csr_i32": ("csr_i32", "dense"),
            "scipy_csr": ("csr_i32", "dense"), "ours_csr": ("csr", "dense"), "ours_2:4": ("2:4", "dense"),
            "dense_bf16": (None, "dense_bf16"), "ours_csr_bf16": ("csr", "dense_bf16"),
            "ours_2:4_bf16": ("2:4", "dense_bf16")}


def _layer(w: torch.Tensor, format: str) -> SparseLinear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = SparseLinear.from_dense(lin, format)
    if not layer.kernel.name.startswith("cpu."):
        raise RuntimeError(f"our native kernel is unavailable (got {layer.kernel.name}); nothing to measure")
    return layer


def fp32_candidates(w: torch.Tensor, x: torch.Tensor) -> dict[str, object]:
    """name -> zero-argument callable computing x @ w^T (fp32 weight and input)."""
    csr64 = w.to_sparse_csr()
    csr32 = torch.sparse_csr_tensor(csr64.crow_indices().int(), csr64.col_indices().int(), csr64.values(),
                                    w.shape, check_invariants=False)
    sp, xn = scipy.sparse.csr_matrix(w.numpy()), x.numpy()
    ours = {f: _layer(w, f) for f in ("csr", "2:4")}
    best32 = (lambda: torch.mv(csr32, x[0])) if x.shape[0] == 1 else (lambda: torch.sparse.mm(csr32, x.t()).t())
    return {"dense": lambda: F.linear(x, w), "torch_csr_i64": lambda: torch.sparse.mm(csr64, x.t()).t(),
            "torch_csr_i32": best32, "scipy_csr": lambda: np.asarray(sp @ xn.T).T,
            "ours_csr": lambda: ours["csr"](x), "ours_2:4": lambda: ours["2:4"](x)}


def bf16_candidates(w: torch.Tensor, x: torch.Tensor) -> dict[str, object]:
    wb, xb = w.bfloat16(), x.bfloat16()
    ours = {f: _layer(wb, f) for f in ("csr", "2:4")}
    return {"dense_bf16": lambda: F.linear(xb, wb), "ours_csr_bf16": lambda: ours["csr"](xb),
            "ours_2:4_bf16": lambda: ours["2:4"](xb)}


def measure_point(shape: tuple[int, int], sparsity: float, batch: int, dtype: torch.dtype, repeats: int,
                  min_sample_s: float, gen: torch.Generator) -> list[dict[str, object]]:
    """Rows for one (shape, sparsity, batch, dtype): every candidate timed interleaved in the same run."""
    w = two_four_weight(shape[0], shape[1], sparsity, gen)
    x = torch.randn(batch, shape[1], generator=gen)
    fns = (fp32_candidates if dtype == torch.float32 else bf16_candidates)(w, x)
    times = time_interleaved(fns, warmup=2, repeats=repeats, min_sample_s=min_sample_s)
    lim = limits(shape, int(torch.count_nonzero(w)), dtype)
    load = float(Path("/proc/loadavg").read_text().split()[0])  # other processes' load while this point ran
    rows = []
    for name, t in times.items():
        storage, base = LIMIT_OF[name]
        speedup = t.ratio_to(times[base])
        limit = lim[storage] if storage else 1.0
        rows.append(dict(out_features=shape[0], in_features=shape[1], dtype=str(dtype).removeprefix("torch."),
                         sparsity=sparsity, batch=batch, candidate=name, median_s=t.median_s, p10_s=t.p10_s,
                         p90_s=t.p90_s, speedup=round(speedup, 4), speedup_p10=round(times[base].p10_s / t.p90_s, 4),
                         speedup_p90=round(times[base].p90_s / t.p10_s, 4), limit=round(limit, 3),
                         fraction_of_limit=round(speedup / limit, 4), load_avg_1min=load))
    return rows


def plot(rows: list[dict[str, object]], path: Path, env: dict[str, object]) -> None:
    """Speedup over dense against sparsity: one row of panels per (shape, dtype), one column per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["out_features"], r["in_features"], r["dtype"]) for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(groups), len(batches), figsize=(3.8 * len(batches), 3.3 * len(groups)),
                             squeeze=False, sharey=True)
    for axrow, (out, inp, dtype) in zip(axes, groups):
        sel = [r for r in rows if (r["out_features"], r["in_features"], r["dtype"]) == (out, inp, dtype)]
        for ax, batch in zip(axrow, batches):
            pts = [r for r in sel if r["batch"] == batch]
            for name in LIMIT_OF:
                xy = sorted((r["sparsity"], r["speedup"]) for r in pts if r["candidate"] == name)
                if xy and LIMIT_OF[name][0]:
                    ax.plot(*zip(*xy), marker="o", ms=3, label=name, lw=2 if name.startswith("ours") else 1)
            ours = "ours_csr" if dtype == "float32" else "ours_csr_bf16"
            lim = sorted((r["sparsity"], r["limit"]) for r in pts if r["candidate"] == ours)
            if lim:
                ax.plot(*zip(*lim), "k--", lw=1, label="memory-bound limit (our csr)")
            ax.axhline(1.0, color="grey", lw=1)
            ax.set(title=f"{out}x{inp} {dtype}, batch {batch}", xlabel="sparsity", yscale="log")
            ax.grid(alpha=0.3)
        axrow[0].set_ylabel(f"speedup over dense {dtype}")
        axrow[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, load average "
                 f"{env['load_avg_1_5_15min'][0]:.1f} at the end", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(rows: list[dict[str, object]], out: Path, args: dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cpu_kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = {"environment": environment(), "args": args, "native_library": str(cpp.build())}
    (out / "cpu_kernels.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
    plot(rows, out / "cpu_kernels.png", header["environment"])


def points(a: argparse.Namespace) -> list[tuple[tuple[int, int], float, int, torch.dtype]]:
    pts = [(s, sp, b, torch.float32) for s in a.shapes for sp in a.sparsities for b in a.batches]
    pts += [(s, sp, b, torch.bfloat16) for s in a.shapes for sp in a.bf16_sparsities for b in a.batches]
    return pts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_kernels"))
    p.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES], help="OUTxIN")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--bf16-sparsities", nargs="*", type=float, default=list(BF16_SPARSITIES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch (and our) threads; default: torch's choice")
    p.add_argument("--quick", action="store_true", help="4096x4096, batches 1 64, sparsities 0.7 0.9, 3 repeats")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.shapes, a.batches, a.sparsities, a.bf16_sparsities, a.repeats = ["4096x4096"], [1, 64], [0.7, 0.9], [0.9], 3
    a.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape, sparsity, batch, dtype in points(a):
        point = measure_point(shape, sparsity, batch, dtype, a.repeats, 0.01 if a.quick else 0.03, gen)
        rows += point
        print(f"{shape[0]}x{shape[1]} {str(dtype)[6:]:<8} s={sparsity:<5} b={batch:<4} "
              + " ".join(f"{r['candidate']}={r['speedup']:.2f}" for r in point if r["speedup"] != 1.0)
              + f"  load={point[0]['load_avg_1min']}", flush=True)
    write_results(rows, a.out, {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()})


if __name__ == "__main__":
    main()
