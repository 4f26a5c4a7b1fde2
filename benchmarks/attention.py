"""Our attention kernel (``ours_cpu.attention``) against torch's SDPA, same inputs, interleaved in one run.

Shapes (batch, heads, sequence, head size) of encoders and short prefill: BERT-small (12 heads of 32), BERT-base
(12 of 64), a 7B-class decoder's 32 heads of 128 (causal), at sequences 64 to 1024 (beyond
``ours_cpu.ATTENTION_MAX_KEYS`` the library runs SDPA: those rows show why). q, k and v are the head split of
one fused projection (non-contiguous views, as in a model); SDPA's output is made contiguous in (B, S, H, D), the
layout both hand to the output projection. ``ATEN_CPU_CAPABILITY`` sets torch's ISA and ``SPARSE_OPS_ISA`` ours:
compare builds at the same ISA.

Run: ``python -m benchmarks.attention --out benchmarks/results/attention/avx512 [--threads 2] [--quick]``.
Writes attention.csv, attention.json (environment, rows) and attention.png (speedup over SDPA by sequence).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_ops.bench.output import RunFiles
from sparse_ops.kernels import cpp, ours_cpu
from sparse_ops.timing import environment, time_interleaved

# name -> (heads, head size, causal)
MODELS = {"bert-small": (12, 32, False), "bert-base": (12, 64, False), "llama-7b": (32, 128, True)}
SEQS = (64, 128, 256, 512, 1024)
BATCHES = (1, 8)
COLUMNS = ("model", "batch", "seq", "heads", "head_dim", "causal", "sdpa_s", "ours_s", "speedup", "speedup_p10",
           "speedup_p90")


def measure(model: str, batch: int, seq: int, repeats: int) -> dict[str, object]:
    H, D, causal = MODELS[model]
    qkv = torch.randn(batch, seq, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    ours = ours_cpu.ATTENTION_MAX_KEYS
    ours_cpu.ATTENTION_MAX_KEYS = 1 << 20  # time ours past the limit too
    try:
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)
        torch.testing.assert_close(ours_cpu.attention(q, k, v, causal=causal), ref, rtol=1e-4, atol=1e-4)
        t = time_interleaved({
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).contiguous(),
            "ours": lambda: ours_cpu.attention(q, k, v, causal=causal)}, repeats=repeats, min_sample_s=0.02)
    finally:
        ours_cpu.ATTENTION_MAX_KEYS = ours
    s, o = t["sdpa"], t["ours"]
    return dict(model=model, batch=batch, seq=seq, heads=H, head_dim=D, causal=causal, sdpa_s=s.median_s,
                ours_s=o.median_s, speedup=round(o.ratio_to(s), 3), speedup_p10=round(s.p10_s / o.p90_s, 3),
                speedup_p90=round(s.p90_s / o.p10_s, 3))


def plot(rows: list[dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (model, batch) in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        pts = [(r["seq"], r["speedup"]) for r in rows if r["model"] == model and r["batch"] == batch]
        ax.plot(*zip(*pts), "-o", ms=3, label=f"{model}, batch {batch}")
    ax.axhline(1.0, color="grey", lw=1.5, label="break-even (SDPA)")
    ax.axvline(ours_cpu.ATTENTION_MAX_KEYS, color="k", ls=":", lw=1, label="ATTENTION_MAX_KEYS")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence (keys)")
    ax.set_ylabel("speed over torch SDPA")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/attention"))
    p.add_argument("--threads", type=int, default=0, help="torch (and our) threads; default: torch's choice")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--quick", action="store_true", help="bert-small, batch 1, sequences 128 and 512")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if cpp.library() is None:
        raise SystemExit("error: our native kernels are unavailable (see the warning above): nothing to compare")
    grid = [(m, b, s) for m in MODELS for b in BATCHES for s in SEQS if not (m == "llama-7b" and b > 1)]
    if a.quick:
        grid, a.repeats = [("bert-small", 1, 128), ("bert-small", 1, 512)], 5
    env = environment()
    title = f"attention, {env.get('cpu')}, {cpp.isa()} build, {torch.get_num_threads()} threads"
    with RunFiles(a.out, "attention", COLUMNS, {"environment": env, "args": vars(a) | {"out": str(a.out)}}) as run:
        rows = []
        for model, batch, seq in grid:
            rows.append(measure(model, batch, seq, a.repeats))
            run.add(rows[-1])
            r = rows[-1]
            print(f"{model:10s} batch {batch} seq {seq:4d}: ours {r['speedup']:.2f}x SDPA "
                  f"({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}), {r['ours_s'] * 1e6:.0f} us", flush=True)
        plot(rows, run.path(".png"), title)


if __name__ == "__main__":
    main()
