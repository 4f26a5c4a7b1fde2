"""End to end: a BERT encoder with its encoder linears pruned to 90%, sparse (ours) vs the same dense model.

Model: transformers ``BertModel`` from a config (no download; ``--size small``: 6 layers, hidden 384, FFN 1536,
12 heads; ``--size base``: BERT-base's 12 layers, 768, 3072), SDPA attention, sequence 128, or a local Hugging
Face folder (``--model DIR``, read with ``local_files_only``). ``prune.Pruner(model, sparsity=0.9,
include=["encoder.*"]).finalize()`` zeroes 90% of each encoder linear; the pruned weights are stored as CSR and
loaded with ``sparse_ops.loading.sparsify``.
Candidates, interleaved in one ``time_interleaved`` run per batch, under ``eval()`` + ``inference_mode``:
  dense        the pruned model as plain PyTorch runs it (dense weights with zeros)
  dense_fast_attention  the dense model with our attention kernel instead of SDPA (use_fast_attention): the
               part of the sparse models' speedup that is not sparsity
  sparse       sparsify(..., fuse=True), the default: each layer's path per batch planned on this machine
               (dense, our kernels, torch's: sparse_ops.plan), with every proven fusion (the FFN's GELU in its
               first layer, each FFN in one call, residual add + LayerNorm in the kernels) where ours run, and
               our attention kernel
  sparse_ours  the same pinned to our kernels (kernel="ours": nothing measured, every layer sparse)
  sparse_torch pinned to torch's CSR kernel (kernel="torch": only the GELU is fused, after torch's product)
The plan is measured once before timing (``batches=`` at load) into a fresh cache file, then loaded again from
that file as a new process would: both costs are reported (``plan_seconds``), with every layer's choice and the
slowest chosen path (``plan``).

Run: ``python -m benchmarks.bert_e2e --out benchmarks/results/bert_e2e [--threads 2] [--quick] [--malloc keep]
[--size base] [--model DIR]``.
``--malloc keep`` (glibc only) tells malloc to keep freed memory (``mallopt``: no trimming, no mmap below
32 MiB) before anything runs. By default glibc hands large freed blocks back to the OS, and the next
activation of that size is page-faulted in again: on the 2-core VM that cost the sparse model, whose other
work is small, up to ~20,000 faults per batch-8 forward. Both models run under the same setting.
Each batch is measured ``--runs`` times (default 3): on the shared 2-core VM whole runs move by about 10%, so the
summary printed and saved (``speedup_summary`` in the JSON) is the median speedup over the runs with its range.
Writes bert_e2e.csv and bert_e2e.json (environment, args, rows). Each row also carries the Amdahl bound: the
fraction of the dense model's time spent in its encoder linears (forward hooks) and the whole-model speedup if
those took no time at all, or were 10x faster (the FLOP ratio at 90% sparsity); attention, layer norms, GELU,
embeddings and the allocations of their outputs are not made faster by sparse linears.
"""
from __future__ import annotations

import argparse
import copy
import csv
import ctypes
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, BertConfig, BertModel

from prune import Pruner
from sparse_ops.attention import use_fast_attention
from sparse_ops.formats import CSR
from sparse_ops.kernels import cpp
from sparse_ops.loading import sparsify
from sparse_ops.plan import plan_rows
from sparse_ops.plan_cache import PlanCache
from sparse_ops.timing import environment, time_interleaved

SIZES = {"small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
         "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)}
CONFIG = dict(SIZES["small"], max_position_embeddings=512, vocab_size=30522)
SEQ = 128
SPARSITY = 0.9
KERNELS = {"sparse": "auto", "sparse_ours": "ours", "sparse_torch": "torch"}  # candidate -> sparsify(kernel=)


def pruned_bert(seed: int = 0, size: str = "small", path: Path | None = None) -> torch.nn.Module:
    """The dense model with 90% of every encoder linear weight exactly zero (magnitude, per layer)."""
    torch.manual_seed(seed)
    if path is not None:
        model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa").eval()
    else:
        config = BertConfig(**dict(CONFIG, **SIZES[size]), attn_implementation="sdpa")
        model = BertModel(config, add_pooling_layer=False).eval()
    return Pruner(model, sparsity=SPARSITY, include=["encoder.*"]).finalize()


def sparse_state(model: BertModel) -> dict[str, torch.Tensor | CSR]:
    """The state dict with every encoder linear weight as CSR, the rest dense."""
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n}
    return {k: CSR.from_dense(v) if k in linears else v for k, v in model.state_dict().items()}


def sparse_model(dense: torch.nn.Module, kernel: str, tokens: tuple[int, ...] = (),
                 cache: PlanCache | None = None) -> torch.nn.Module:
    """A copy of ``dense`` with its CSR encoder linears loaded by ``sparsify(..., kernel=kernel, fuse=True)``,
    planned at load for each count in ``tokens`` (kernel="auto")."""
    return sparsify(copy.deepcopy(dense), sparse_state(dense), kernel=kernel, fuse=True,
                    batches=tokens if kernel == "auto" else (), cache=cache).eval()


def planned_models(dense: torch.nn.Module, tokens: tuple[int, ...]) -> tuple[dict, dict, list[dict]]:
    """The sparse candidates; the seconds of sparsify() planning (an empty cache file), reading the plan back (a
    new cache object on that file, as in a new process) and pinned (nothing planned); every planned layer's
    row."""
    def timed(kernel: str, cache: PlanCache | None) -> tuple[torch.nn.Module, float]:
        t0 = time.perf_counter()
        model = sparse_model(dense, kernel, tokens, cache)
        return model, time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "plans.json"
        _, first = timed("auto", PlanCache(file))
        planned, cached = timed("auto", PlanCache(file))
    models = {"sparse": planned}
    for name, kernel in KERNELS.items():
        if kernel != "auto":
            models[name], load = timed(kernel, None)
    # whole sparsify() calls: planning measured, planning read from the file, and a pinned load (no plan)
    cost = {"first_s": round(first, 3), "cached_s": round(cached, 3), "load_s": round(load, 3)}
    rows = [dict(r, routes={b: e for b, e in r["routes"].items() if e is not None}) for r in plan_rows(planned)]
    return models, cost, rows


def slowest_chosen(rows: list[dict]) -> dict[str, object] | None:
    """The planned layer and bucket whose chosen path has the lowest measured speedup over dense."""
    points = [(e["speedup"].get(e["choice"], 1.0), r["name"], b, e["choice"]) for r in rows
              for b, e in r["routes"].items()]
    if not points:
        return None
    x, name, b, choice = min(points)
    return {"layer": name, "bucket": b, "choice": choice, "speedup": x}


def encoder_sparsity(model: BertModel) -> float:
    ws = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n]
    return 1.0 - sum(int((w != 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def amdahl_bound(linear_fraction: float, linear_speedup: float = float("inf")) -> float:
    """Whole-model speedup when only the encoder linears (``linear_fraction`` of the time) get faster.

    >>> round(amdahl_bound(0.8), 2), round(amdahl_bound(0.8, 10.0), 2)
    (5.0, 3.57)
    """
    return 1.0 / ((1.0 - linear_fraction) + linear_fraction / linear_speedup)


def linear_fraction(model: BertModel, ids: torch.Tensor, calls: int = 3) -> float:
    """Fraction of the model's forward time spent inside its encoder ``nn.Linear`` modules (hooks, CPU clock)."""
    spent, starts = [0.0], {}
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n]
    handles = [h for m in linears for h in (
        m.register_forward_pre_hook(lambda mod, _: starts.__setitem__(mod, time.perf_counter())),
        m.register_forward_hook(lambda mod, _i, _o: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[mod])))]
    try:
        with torch.inference_mode():
            model(input_ids=ids)  # warm-up
            spent[0], t0 = 0.0, time.perf_counter()
            for _ in range(calls):
                model(input_ids=ids)
            return spent[0] / (time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()


def measure(batch: int, models: dict[str, BertModel], repeats: int) -> list[dict[str, object]]:
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, SEQ), generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        ref = models["dense"](input_ids=ids).last_hidden_state
        for name, m in models.items():  # same outputs within fp32 tolerance (summation order differs)
            torch.testing.assert_close(m(input_ids=ids).last_hidden_state, ref, rtol=1e-4, atol=1e-4)
    fns = {name: (lambda m=m: m(input_ids=ids)) for name, m in models.items()}
    times = time_interleaved(fns, warmup=2, repeats=repeats, min_sample_s=0.05)
    base = times["dense"]
    f = linear_fraction(models["dense"], ids)  # Amdahl: the rest of the model runs as fast as before
    return [dict(batch=batch, seq=SEQ, tokens=batch * SEQ, candidate=name, median_s=t.median_s, p10_s=t.p10_s,
                 p90_s=t.p90_s, speedup=round(t.ratio_to(base), 3), speedup_p10=round(base.p10_s / t.p90_s, 3),
                 speedup_p90=round(base.p90_s / t.p10_s, 3), dense_linear_fraction=round(f, 3),
                 bound_free_linears=round(amdahl_bound(f), 2),
                 bound_linears_10x=round(amdahl_bound(f, 1.0 / (1.0 - SPARSITY)), 2),
                 load_avg_1min=float(Path("/proc/loadavg").read_text().split()[0]))
            for name, t in times.items()]


def speedup_summary(rows: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    """Per candidate: median, min and max of its speedup over the runs.

    >>> speedup_summary([dict(candidate="sparse", speedup=s) for s in (2.9, 3.2, 3.1)])
    {'sparse': {'median': 3.1, 'min': 2.9, 'max': 3.2}}
    """
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["candidate"], []).append(r["speedup"])
    return {c: {"median": statistics.median(v), "min": min(v), "max": max(v)} for c, v in by.items()}


def keep_freed_memory() -> None:
    """glibc: keep freed blocks in the heap (no trim, no mmap below 32 MiB) instead of returning them to the OS."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
    if not (libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)):
        raise RuntimeError("mallopt refused the settings")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bert_e2e"))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=0, help="torch (and our) threads; default: torch's choice")
    p.add_argument("--runs", type=int, default=3,
                   help="independent interleaved measurements per batch; the summary is their median speedup")
    p.add_argument("--quick", action="store_true", help="batch 1 only, 3 repeats, 1 run")
    p.add_argument("--malloc", choices=("default", "keep"), default="default",
                   help="keep: glibc keeps freed memory instead of returning it to the OS (see the module doc)")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="the BERT built from a config")
    p.add_argument("--model", type=Path, help="a local Hugging Face folder instead (BERT-family encoder)")
    a = p.parse_args(argv)
    if a.malloc == "keep":
        keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.batches, a.repeats, a.runs = [1], 3, 1
    cpp.library()  # built (a few seconds the first time) before anything is timed
    dense = pruned_bert(size=a.size, path=a.model)
    sparse, plan_cost, plan = planned_models(dense, tuple(SEQ * b for b in a.batches))
    dense_attention = copy.deepcopy(dense)  # how much of the speedup is attention alone
    use_fast_attention(dense_attention)
    models = {"dense": dense, "dense_fast_attention": dense_attention, **sparse}
    worst = slowest_chosen(plan)
    print(f"sparsify: {plan_cost['first_s']:.2f} s planning, {plan_cost['cached_s']:.2f} s with the plan cached, "
          f"{plan_cost['load_s']:.2f} s pinned; slowest chosen path: {worst}", flush=True)
    rows, summary = [], {}
    for batch in a.batches:
        for run in range(a.runs):
            rows += [dict(r, run=run) for r in measure(batch, models, a.repeats)]
        summary[batch] = speedup_summary([r for r in rows if r["batch"] == batch])
        last = rows[-1]
        print(" ".join(f"{c}={v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f})" for c, v in summary[batch].items()),
              f"batch={batch} (median of {a.runs} runs) linears {last['dense_linear_fraction']:.0%} of dense time: "
              f"bound {last['bound_free_linears']}x (free linears), {last['bound_linears_10x']}x (linears 10x)",
              f"load={last['load_avg_1min']}", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "bert_e2e.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    info = {"config": str(a.model) if a.model else dict(CONFIG, **SIZES[a.size]), "seq": SEQ,
            "encoder_linear_sparsity": round(encoder_sparsity(dense), 4),
            "kernels": sorted({m.kernel.name for n, m in models["sparse"].named_modules() if hasattr(m, "kernel")}),
            "plan_seconds": plan_cost, "slowest_chosen_path": worst, "plan": plan}
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    (a.out / "bert_e2e.json").write_text(json.dumps({"environment": environment(), "args": args, **info,
                                                     "speedup_summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
