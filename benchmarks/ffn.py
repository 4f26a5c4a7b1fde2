"""Feed-forward blocks: one fused kernel call against the same sparse layers run in turn, and dense.

Two kinds of block, every weight pruned to the same sparsity (magnitude, per weight):
  BERT's  ``down(gelu(up(x)))``, hidden -> 4 hidden -> hidden, with biases (``SparseFFN``)
  LLaMA's ``down(silu(gate(x)) * up(x))``, hidden -> 8/3 hidden -> hidden, no biases (``SparseGatedFFN``)
Candidates, interleaved in one ``time_interleaved`` run per point, fp32, under ``inference_mode``:
  dense   the same products with F.linear (and F.gelu / F.silu) on the pruned dense weights: the baseline
  layers  the SparseLinear layers in turn on our CPU kernels, the activation fused into its layer
  fused   the block in one kernel call (the hidden activations stay packed, in cache)
Below ``ours_cpu.FFN_MIN_TOKENS`` tokens ``fused`` runs the layers, so it is measured from there on.
Every candidate's output is checked against dense first.

Run: ``python -m benchmarks.ffn --out benchmarks/results/ffn [--threads 2] [--quick]``.
Writes ffn.csv, ffn.json (environment, arguments, status) and ffn.png (speedup over dense).
"""
from __future__ import annotations

import argparse
import functools
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_ops.bench.output import RunFiles, table
from sparse_ops.bench.plots import plot_speedup
from sparse_ops.formats import CSR
from sparse_ops.fusion.modules import SparseFFN, SparseGatedFFN
from sparse_ops.linear import SparseLinear
from sparse_ops.timing import environment, time_interleaved

HIDDEN = (384, 768)  # BERT-small-like (MiniLM: 384 -> 1536) and BERT-base (768 -> 3072)
TOKENS = (16, 128, 1024)
SPARSITIES = (0.7, 0.9, 0.95)
KINDS = ("bert", "llama")
COLUMNS = ("group", "tokens", "batch", "sparsity", "candidate", "median_s", "p10_s", "p90_s", "speedup",
           "fused_over_layers", "load_avg_1min")


def pruned(out: int, inp: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """A (out, inp) weight with the ``sparsity`` fraction of smallest magnitudes exactly zero."""
    w = torch.randn(out, inp, generator=gen) / inp ** 0.5
    k = round(sparsity * w.numel())
    if k:
        w.view(-1)[w.abs().flatten().argsort()[:k]] = 0.0
    return w


def candidates(kind: str, hidden: int, sparsity: float, tokens: int, gen: torch.Generator
               ) -> tuple[str, dict[str, object]]:
    """(group name, candidate -> callable) for one block."""
    x = torch.randn(tokens, hidden, generator=gen)
    if kind == "bert":
        wu, wd = pruned(4 * hidden, hidden, sparsity, gen), pruned(hidden, 4 * hidden, sparsity, gen)
        bu, bd = torch.randn(4 * hidden, generator=gen), torch.randn(hidden, generator=gen)
        up, down = SparseLinear(CSR.from_dense(wu), bu, activation="gelu"), SparseLinear(CSR.from_dense(wd), bd)
        block, group = SparseFFN(up, down), f"{hidden}->{4 * hidden}->{hidden}"
        fns = {"dense": lambda: F.linear(F.gelu(F.linear(x, wu, bu)), wd, bd), "layers": lambda: down(up(x))}
    else:
        inner = round(8 * hidden / 3 / 64) * 64
        wg, wu, wd = (pruned(o, i, sparsity, gen) for o, i in ((inner, hidden), (inner, hidden), (hidden, inner)))
        gate, up, down = (SparseLinear(CSR.from_dense(w), activation=a) for w, a in ((wg, "silu"), (wu, None),
                                                                                  (wd, None)))
        block, group = SparseGatedFFN(gate, up, down), f"{hidden}->{inner}->{hidden} gated"
        fns = {"dense": lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd),
               "layers": lambda: down(gate(x) * up(x))}
    if not up.kernel.ffn:
        raise RuntimeError(f"our native kernel is unavailable (got {up.kernel.name}); nothing to measure")
    return group, {**fns, "fused": functools.partial(block, x)}


def measure(kind: str, hidden: int, sparsity: float, tokens: int, repeats: int, min_sample_s: float,
            gen: torch.Generator) -> list[dict[str, object]]:
    group, fns = candidates(kind, hidden, sparsity, tokens, gen)
    with torch.inference_mode():
        ref = fns["dense"]()
        for name, fn in fns.items():
            torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    times = time_interleaved(fns, warmup=2, repeats=repeats, min_sample_s=min_sample_s)
    base = times["dense"]
    load = float(Path("/proc/loadavg").read_text().split()[0])
    return [dict(group=group, tokens=tokens, batch=tokens, sparsity=sparsity, candidate=name, median_s=t.median_s,
                 p10_s=t.p10_s, p90_s=t.p90_s, speedup=round(t.ratio_to(base), 3),
                 fused_over_layers=round(times["fused"].ratio_to(times["layers"]), 3), load_avg_1min=load)
            for name, t in times.items()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ffn"))
    p.add_argument("--hidden", nargs="+", type=int, default=list(HIDDEN))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch (and our) threads; default: torch's choice")
    p.add_argument("--quick", action="store_true", help="hidden 384, 128 tokens, sparsity 0.9, 3 repeats")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.hidden, a.tokens, a.sparsities, a.repeats = [384], [128], [0.9], 3
    gen = torch.Generator().manual_seed(0)
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    rows = []
    with RunFiles(a.out, "ffn", COLUMNS, {"environment": environment(), "args": args}) as files:
        for kind, hidden, sparsity, tokens in itertools.product(a.kinds, a.hidden, a.sparsities, a.tokens):
            point = measure(kind, hidden, sparsity, tokens, a.repeats, 0.01 if a.quick else 0.03, gen)
            for r in point:
                files.add(r)
            rows += point
            print(f"{point[0]['group']} s={sparsity} tokens={tokens}: "
                  + " ".join(f"{r['candidate']}={r['speedup']:.2f}x" for r in point[1:])
                  + f" fused/layers={point[0]['fused_over_layers']:.2f}x load={point[0]['load_avg_1min']}",
                  flush=True)
        env = files.header["environment"]
        plot_speedup(rows, files.path(".png"), title=f"FFN blocks, fp32: speedup over dense; {env['cpu']}, "
                                                     f"{env['torch_threads']} threads, torch {env['torch']}")
    print(table(["block", "sparsity", "tokens", "layers", "fused", "fused / layers"],
                [[r["group"], str(r["sparsity"]), str(r["tokens"]), f"{lay['speedup']:.2f}x", f"{r['speedup']:.2f}x",
                  f"{r['fused_over_layers']:.2f}x"]
                 for r, lay in zip(rows[2::3], rows[1::3])]))


if __name__ == "__main__":
    main()
