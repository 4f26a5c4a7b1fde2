"""Three sparse families side by side at matched *active* parameters per token.

FFN families (active parameters ~ 2 * D * H each): a dense FFN (D -> H -> D); unstructured-sparse FFNs whose
hidden width is H / density, pruned to that density (SparseLinear CSR when available, run as one fused
``SparseFFN`` call where the kernel has that path, else dense-with-zeros);
the least sparse one also stored dense with zeros; an MoE with E experts of width H / K, top-K routing.
Attention family: head-gated attention with 25/50/75/100% of heads open, gathered per call (gates) and
physically pruned, against full ``nn.MultiheadAttention``. All candidates of one batch are timed interleaved
in one run; ratios are to the dense FFN (FFN rows) or full attention (attention rows) of the same run.

Run: ``prune bench families --out benchmarks/results/families [--quick] [--tokens 1,64] [--device cuda]
[--threads 1] [--repeats 21] [--max-seconds S]`` writes
families.csv, families.json (environment, config) and families.png. The committed results used
``--threads 1``: on a 2-core machine shared with other jobs, two torch threads spin against each other and
times jump by 10x or more.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparse_ops.errors import UserValueError
from sparse_ops.fusion import fuse_activations, fuse_ffn
from sparse_ops.layers import GatedMultiheadAttention, MoE, ParamCounts
from sparse_ops.timing import Deadline, time_interleaved


@dataclass(frozen=True)
class FamiliesConfig:
    """Shapes and timing settings of one run (D = d_model, H = dense FFN hidden width)."""

    d_model: int = 768
    d_hidden: int = 3072
    num_heads: int = 12
    num_experts: int = 8
    top_k: int = 2
    sparsities: tuple[float, ...] = (0.75, 0.9)
    head_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    seq_len: int = 128  # attention: tokens are split into sequences of at most this length
    batches: tuple[int, ...] = (1, 8, 64, 256)  # tokens per forward pass
    repeats: int = 11
    min_sample_s: float = 0.02


QUICK = FamiliesConfig(d_model=256, d_hidden=1024, num_heads=8, batches=(1, 64), repeats=5, min_sample_s=0.01)


@dataclass(frozen=True)
class Candidate:
    """One module to time: its family, what it is, and how many parameters it holds and reads per token."""

    name: str
    family: str  # "ffn" or "attention"
    module: nn.Module
    counts: ParamCounts
    note: str = ""
    twin: str | None = None  # a candidate that must give the same output (checked before timing)


def module_bytes(m: nn.Module) -> int:
    """Bytes of every parameter and buffer (a SparseLinear keeps its CSR parts as buffers)."""
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))


def prune_smallest_(w: torch.Tensor, sparsity: float) -> int:
    """Zero exactly round(sparsity * numel) smallest-magnitude entries in place; returns the nonzeros left."""
    n_zero = round(sparsity * w.numel())
    with torch.no_grad():
        w.view(-1)[w.abs().flatten().argsort()[:n_zero]] = 0.0
    return w.numel() - n_zero


def dense_ffn(d: int, h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))


def _csr_or_none(linear: nn.Linear) -> nn.Module | None:
    """``SparseLinear`` in CSR if sparse_ops.linear imports and agrees with the dense layer, else None."""
    try:
        from sparse_ops.linear import SparseLinear

        sparse = SparseLinear.from_dense(linear, format="csr")
        x = torch.randn(3, linear.in_features, device=linear.weight.device)
        ok = torch.allclose(sparse(x), linear(x), rtol=1e-4, atol=1e-4)
    except (ImportError, NotImplementedError, RuntimeError, ValueError, TypeError):
        return None
    return sparse if ok else None


def sparse_ffns(cfg: FamiliesConfig, sparsity: float, device: str, with_zeros: bool) -> list[Candidate]:
    """An FFN of hidden width H / density pruned to ``sparsity``: as CSR (if available) and/or with zeros."""
    hidden = round(cfg.d_hidden / (1.0 - sparsity))
    ffn = dense_ffn(cfg.d_model, hidden).to(device)
    nnz = sum(prune_smallest_(ffn[i].weight, sparsity) for i in (0, 2))
    counts = ParamCounts(total=sum(p.numel() for p in ffn.parameters()), active=nnz + hidden + cfg.d_model)
    name = f"ffn_s{sparsity:g}_h{hidden}"
    csr = [_csr_or_none(ffn[i]) for i in (0, 2)]
    if any(c is None for c in csr):
        return [Candidate(f"{name}_zeros", "ffn", ffn, counts, "dense with zeros (SparseLinear unavailable)")]
    sparse = nn.Sequential(csr[0], nn.GELU(), csr[1])
    fused = fuse_activations(sparse) and fuse_ffn(sparse)  # the GELU into the first layer, then one call
    cands = [Candidate(f"{name}_csr", "ffn", sparse, counts, "SparseLinear csr" + (", fused FFN" if fused else ""),
                       twin=f"{name}_zeros" if with_zeros else None)]
    zeros = Candidate(f"{name}_zeros", "ffn", ffn, counts, "dense with zeros")
    return cands + ([zeros] if with_zeros else [])


def ffn_candidates(cfg: FamiliesConfig, device: str) -> list[Candidate]:
    """Dense FFN, sparse FFNs (CSR; the least sparse also with zeros), MoE: all ~2 * D * H active."""
    dense = dense_ffn(cfg.d_model, cfg.d_hidden).to(device)
    n = sum(p.numel() for p in dense.parameters())
    cands = [Candidate("ffn_dense", "ffn", dense, ParamCounts(n, n), "nn.Linear")]
    for s in cfg.sparsities:
        cands += sparse_ffns(cfg, s, device, with_zeros=s == min(cfg.sparsities))
    expert_hidden = cfg.d_hidden // cfg.top_k  # top_k experts of this width = one dense FFN of width H
    moe = MoE(cfg.d_model, expert_hidden, cfg.num_experts, cfg.top_k).to(device).eval()
    cands.append(Candidate(f"moe_e{cfg.num_experts}_k{cfg.top_k}_h{expert_hidden}", "ffn", moe,
                           moe.param_counts(), "dropless, sorted dispatch"))
    return cands


class TorchSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` called as self-attention, the baseline every user has."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def gated_with_open(mha: nn.MultiheadAttention, num_open: int) -> GatedMultiheadAttention:
    """A copy of ``mha`` with gates open on ``num_open`` heads spread evenly, closed elsewhere (eval)."""
    gated = GatedMultiheadAttention.from_multihead_attention(mha).eval()
    heads = torch.linspace(0, mha.num_heads - 1, num_open).round().long()
    with torch.no_grad():
        gated.log_alpha.fill_(-10.0)
        gated.log_alpha[heads] = 10.0
    return gated


def attention_candidates(cfg: FamiliesConfig, device: str) -> list[Candidate]:
    """Full ``nn.MultiheadAttention``; gated copies with a fraction of heads open, gathered and pruned."""
    mha = nn.MultiheadAttention(cfg.d_model, cfg.num_heads, batch_first=True).to(device).eval()
    n = sum(p.numel() for p in mha.parameters())
    cands = [Candidate("attn_full_mha", "attention", TorchSelfAttention(mha), ParamCounts(n, n),
                       "nn.MultiheadAttention")]
    for frac in cfg.head_fractions:
        num_open = max(1, round(frac * cfg.num_heads))
        gated = gated_with_open(mha, num_open)
        tag, note = f"{round(100 * frac)}pct", f"{num_open}/{cfg.num_heads} heads open"
        cands.append(Candidate(f"attn_gated_{tag}", "attention", gated, gated.param_counts(),
                               note + ", slices gathered per call",
                               twin="attn_full_mha" if num_open == cfg.num_heads else None))
        if num_open < cfg.num_heads:
            pruned = gated_with_open(mha, num_open)
            pruned.prune_closed_heads()
            cands.append(Candidate(f"attn_pruned_{tag}", "attention", pruned, pruned.param_counts(),
                                   note + ", pruned", twin=f"attn_gated_{tag}"))
    return cands


def inputs(batch: int, cfg: FamiliesConfig, device: str) -> dict[str, torch.Tensor]:
    """``batch`` tokens: (batch, D) for FFNs, (batch / S, S, D) sequences for attention."""
    seq = min(batch, cfg.seq_len)
    if batch % seq:
        raise UserValueError(f"batch={batch} must be a multiple of seq_len={cfg.seq_len} when larger than it")
    x = torch.randn(batch, cfg.d_model, device=device)
    return {"ffn": x, "attention": x.view(batch // seq, seq, cfg.d_model)}


def check_equivalences(cands: list[Candidate], x: dict[str, torch.Tensor]) -> None:
    """Guard the comparison: every candidate with a twin gives the twin's output."""
    by_name = {c.name: c for c in cands}
    with torch.inference_mode():
        for c in cands:
            if c.twin is None:
                continue
            y, ref = c.module(x[c.family]), by_name[c.twin].module(x[c.family])
            if not torch.allclose(y, ref, rtol=1e-3, atol=1e-4):
                raise AssertionError(f"{c.name} and {c.twin} disagree: max diff {(y - ref).abs().max():.3g}")


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak memory allocated by one call beyond what was already held (CUDA only; None elsewhere)."""
    if not device.startswith("cuda"):
        return None
    with torch.inference_mode():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


def measure(cands: list[Candidate], batch: int, cfg: FamiliesConfig, device: str) -> list[dict[str, object]]:
    """Time every candidate at ``batch`` tokens, interleaved in one run; one row per candidate."""
    x = inputs(batch, cfg, device)
    check_equivalences(cands, x)
    fns = {c.name: (lambda c=c: c.module(x[c.family])) for c in cands}
    times = time_interleaved(fns, repeats=cfg.repeats, min_sample_s=cfg.min_sample_s, device=device)
    baseline = {"ffn": "ffn_dense", "attention": "attn_full_mha"}
    rows = []
    for c in cands:
        t, base = times[c.name], times[baseline[c.family]]
        rows.append({
            "batch": batch, "name": c.name, "family": c.family, "note": c.note,
            "total_params": c.counts.total, "active_params": c.counts.active,
            "param_bytes": module_bytes(c.module),
            "peak_extra_bytes": peak_extra_bytes(fns[c.name], device),
            "median_ms": 1e3 * t.median_s, "p10_ms": 1e3 * t.p10_s, "p90_ms": 1e3 * t.p90_s,
            "tokens_per_s": batch / t.median_s, "baseline": baseline[c.family], "speedup": t.ratio_to(base)})
    return rows


FAMILIES_COLUMNS = ("batch", "name", "family", "note", "total_params", "active_params", "param_bytes",
                    "peak_extra_bytes", "median_ms", "p10_ms", "p90_ms", "tokens_per_s", "baseline", "speedup")
UNITS = {"median_ms": "ms per forward of `batch` tokens", "speedup": "baseline median / median",
         "peak_extra_bytes": "CUDA only: peak allocation of one call beyond the held memory"}


def sweep(cfg: FamiliesConfig, device: str, deadline: Deadline,
          clock: Callable[[], float] = time.perf_counter) -> Iterator[list[dict[str, object]]]:
    """Rows of each batch in ``cfg.batches`` (all candidates timed interleaved) until done or out of time."""
    torch.manual_seed(0)
    cands = ffn_candidates(cfg, device) + attention_candidates(cfg, device)
    start, last = clock(), 0.0
    for done, batch in enumerate(cfg.batches):
        if not deadline.allows(done, clock() - start, last):
            return
        t0 = clock()
        yield measure(cands, batch, cfg, device)
        last = clock() - t0


def plot(rows: list[dict[str, object]], env: dict[str, object], path: Path) -> None:
    """Latency (median, p10-p90 bars) against active parameters, one panel per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    cols = min(2, len(batches))
    nrows = math.ceil(len(batches) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 4.6 * nrows), squeeze=False)
    style = {"ffn_dense": ("k", "o"), "csr": ("tab:blue", "^"), "zeros": ("tab:gray", "v"),
             "moe": ("tab:red", "D"), "attn_full": ("k", "s"), "attn_gated": ("tab:green", "s"),
             "attn_pruned": ("tab:purple", "P")}
    for ax, batch in zip(axes.flat, batches):
        for r in (r for r in rows if r["batch"] == batch):
            color, marker = next(v for k, v in style.items() if k in r["name"])
            y, err = r["median_ms"], [[r["median_ms"] - r["p10_ms"]], [r["p90_ms"] - r["median_ms"]]]
            ax.errorbar(r["active_params"], y, yerr=err, color=color, marker=marker, capsize=2)
            ax.annotate(r["name"].replace("attn_", ""), (r["active_params"], y), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        ax.set(xscale="log", yscale="log", title=f"batch {batch} tokens",
               xlabel="active parameters per token", ylabel="median latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(batches):]:
        ax.axis("off")
    fig.suptitle(f"{env['cpu'] if env['device'] == 'cpu' else env.get('gpu', env['device'])}, "
                 f"{env['torch_threads']} threads, torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
