"""End to end: a one-shot-pruned LLaMA-style model, prefill and greedy decode on the CPU, sparse vs dense.

The way to speed a user takes: prune -> ``save_pretrained`` -> ``sparse_ops.convert_checkpoint`` ->
``sparse_ops.from_pretrained(folder, fuse=True)`` -> ``generate()``.

Model: transformers ``LlamaForCausalLM`` built from a config (no download), random init with ``--seed``,
fp32: by default hidden 768, intermediate 2048, 12 layers, 12 heads, 4 KV heads (grouped-query attention),
vocab 32000, untied ``lm_head`` (125M parameters, 75M of them in the decoder linears; ``--hidden``,
``--intermediate``, ``--layers``, ``--heads``, ``--kv-heads``, ``--vocab`` change it). ``--quick``: a smoke
configuration (2 layers, hidden 128, vocab 1000, short prompts, a few tokens) that runs every stage in
seconds; its numbers are not results.

Variants (``--variants``): ``unstructured-50`` and ``unstructured-70`` (stored as CSR), ``2:4`` (stored 2:4);
``int8``, ``unstructured-50+int8``, ``unstructured-70+int8``: the same (0% for ``int8``) converted with
``quantize="int8"`` (int8 values, a scale per row; ``lm_head`` too; each layer in its smallest int8 layout,
planned among them), whose reference (``pruned-dense``) is the same model with its int8 weights dequantized.
Each prunes every decoder linear (q/k/v/o, gate/up/down of every block; not ``lm_head``, not the embeddings)
with ``prune.Pruner(model, s, pattern=..., scope="layer").finalize()`` (magnitude; the speed does not depend
on which one-shot method chose the mask), is saved with ``save_pretrained``, converted with
``convert_checkpoint(..., format="csr" | "2:4")`` and loaded with ``from_pretrained(..., fuse=True)``
(``--kernel``, default ``auto``: each layer's path planned on this machine at load, for 1 token, the decode
prompt and the prefill prompt, into a fresh in-process plan cache: this run's measurements, not an earlier
plan, and nothing written to the user's plan file; ``load_s`` includes that planning).

Candidates, all timed in one interleaved run (``sparse_ops.timing.time_interleaved``, inference mode):
  dense                   the unpruned model in plain PyTorch (SDPA attention): every ratio is against it
  dense_fast_attention    the same with our attention kernel (``use_fast_attention``), which ``fuse=True``
                          also switches on: the part of the sparse models' speedup that is not sparsity
  <variant>/pruned-dense  the pruned model as plain PyTorch runs it (the same zeros, dense kernels)
  <variant>/sparse        the converted folder loaded by ``from_pretrained(..., fuse=True)``

Correctness first: greedy ``generate()`` of ``--check-tokens`` new tokens from a fixed prompt must give the
same tokens from ``<variant>/sparse`` as from ``<variant>/pruned-dense`` (``same_tokens`` per variant, with
the largest logit difference and the reference's smallest top-1/top-2 logit margin, which says whether a
difference is a near-tie). If any differ, results.json is written with ``"status": "failed: ..."``, nothing
is timed, and the script exits non-zero.

What is measured, per candidate (medians over ``--repeats`` interleaved repeats; p10/p90 in the rows):
  prefill   one forward of a ``--prompt-len``-token prompt (default 128), batch 1, ``use_cache=True`` (a
            fresh KV cache), ``logits_to_keep=1``, an all-ones attention mask: what ``generate()`` runs as
            its first step. ``prefill_tok_s`` = prompt tokens / that time.
  decode    ``--new-tokens`` greedy decode steps (default 64) timed directly, with the KV cache, after a
            ``--decode-prompt-len``-token prompt (default 16) prefilled once beforehand: each timed call
            copies that prefilled cache (a few small tensors) and runs the steps generate() runs after its
            first one (one token in, its logits, argmax, the cache and mask one longer), so the keys grow
            from 16 to 80. ``decode_tok_s`` = new tokens / that time. Before anything is timed, the loop is
            checked to give generate()'s greedy tokens for every candidate. Timed directly rather than as
            generate() minus its prefill: no difference of two noisy medians (which can even go negative),
            and no generate() bookkeeping in the figure of the kernels.
  generate  (``--no-generate`` skips it) the whole ``generate()`` call a user makes: the short prompt, then
            ``--new-tokens`` tokens (greedy, ``do_sample=False``; the model has no EOS, so every call makes
            all of them), its per-step Python overhead included; ``generate_tok_s`` = new tokens / that time.
Ratios (``*_speedup``) are dense median / candidate median in the same run; ``*_vs_pruned_dense`` compares a
sparse model with the pruned dense model it was converted from.

Run: ``python benchmarks/llm_eager.py [--threads 2] [--repeats 5] [--out DIR]`` on a quiet machine (a few
minutes on 2 cores at the defaults, 4-5 GB of memory for the eight models), or
``python benchmarks/llm_eager.py --quick`` for a smoke run; ``python -m benchmarks.llm_eager`` works too.
Writes ``results.json`` (environment: CPU, cores, torch threads, torch and transformers versions, the ISA of
our kernel build; arguments; model config; per-variant summary; rows), ``results.csv`` (one row per
candidate) and ``plot.png`` (prefill and decode speedup over dense, per candidate) into ``--out``, by default
``benchmarks/results/llm_eager/<kernel isa>/``, and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import csv
import functools
import inspect
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prune import Pruner
from sparse_ops import convert_checkpoint, from_pretrained
from sparse_ops.attention import use_fast_attention
from sparse_ops.bench.output import table, write_json
from sparse_ops.kernels import cpp
from sparse_ops.linear import SparseLinear
from sparse_ops.plan import plan_rows
from sparse_ops.plan_cache import PlanCache
from sparse_ops.quantized import quantize_rows
from sparse_ops.timing import Timing, environment, time_interleaved

# variant -> (Pruner pattern, sparsity, convert_checkpoint format, quantize)
VARIANTS = {"unstructured-50": ("unstructured", 0.5, "csr", None),
            "unstructured-70": ("unstructured", 0.7, "csr", None),
            "2:4": ("2:4", 0.5, "2:4", None),
            "int8": ("unstructured", 0.0, "auto", "int8"),
            "unstructured-50+int8": ("unstructured", 0.5, "auto", "int8"),
            "unstructured-70+int8": ("unstructured", 0.7, "auto", "int8")}
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down
# model shape and run lengths: the default and --quick (an option given on the command line wins over both)
DEFAULTS = {"hidden": 768, "intermediate": 2048, "layers": 12, "heads": 12, "kv_heads": 4, "vocab": 32000,
            "prompt_len": 128, "decode_prompt_len": 16, "new_tokens": 64, "check_tokens": 16, "repeats": 5,
            "min_sample_s": 0.05}
QUICK = {"hidden": 128, "intermediate": 256, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 1000,
         "prompt_len": 32, "decode_prompt_len": 8, "new_tokens": 8, "check_tokens": 8, "repeats": 3,
         "min_sample_s": 0.005}
PAD = 0  # never in a prompt (prompts draw from 1..vocab-1): generate() wants a pad id; masks are all ones
COLUMNS = ("candidate", "variant", "runtime", "format", "decoder_sparsity", "same_tokens",
           "prefill_ms", "prefill_p10_ms", "prefill_p90_ms", "prefill_tok_s", "prefill_speedup",
           "prefill_speedup_vs_pruned_dense",
           "decode_ms_per_token", "decode_p10_ms_per_token", "decode_p90_ms_per_token", "decode_tok_s",
           "decode_speedup", "decode_speedup_vs_pruned_dense",
           "generate_ms", "generate_p10_ms", "generate_p90_ms", "generate_tok_s", "generate_speedup",
           "weights_mb", "load_s")
MIB = 2**20


def llama(a: argparse.Namespace) -> LlamaForCausalLM:
    """The dense model: LLaMA-style, random init with ``a.seed``, fp32, eval mode; no EOS, so generate()
    makes every token asked for."""
    torch.manual_seed(a.seed)
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads,
                         num_key_value_heads=a.kv_heads,
                         max_position_embeddings=max(2048, a.prompt_len, a.decode_prompt_len + a.new_tokens),
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=PAD,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(torch.float32).eval()


def decoder_linears(model: nn.Module) -> list[nn.Module]:
    """The linears of the decoder blocks (not lm_head), dense or loaded sparse."""
    return [m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, SparseLinear)) and ".layers." in n]


def decoder_sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in decoder_linears(model)]
    return 1.0 - sum(int((w != 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def pruned(dense: LlamaForCausalLM, pattern: str, sparsity: float) -> LlamaForCausalLM:
    """A copy of ``dense``, every decoder linear one-shot magnitude-pruned per layer; lm_head kept dense."""
    model = copy.deepcopy(dense)
    pruner = Pruner(model, sparsity, pattern=pattern, scope="layer", exclude=["lm_head"])
    expected = LINEARS_PER_BLOCK * model.config.num_hidden_layers
    if len(pruner.targets) != expected:
        raise RuntimeError(f"the pruner found {len(pruner.targets)} linears, expected {expected}")
    return pruner.finalize().eval()


def dequantized(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A copy whose decoder linears and lm_head hold their int8 weights dequantized (scales * q, as ``prune
    convert --quantize int8`` stores them): the int8 model run densely, the reference of its tokens."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for lin in (*decoder_linears(m), m.lm_head):
            q, s = quantize_rows(lin.weight)
            lin.weight.copy_(q.float() * s[:, None])
    return m


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def plan_choices(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per batch bucket (tokens per call), how many sparse layers chose each path (``sparse_ops.plan``)."""
    out: dict[str, dict[str, int]] = {}
    for row in plan_rows(model):
        for b, entry in row["routes"].items():
            if entry is not None:
                counts = out.setdefault(str(b), {})
                counts[entry["choice"]] = counts.get(entry["choice"], 0) + 1
    return out


def deploy(model: LlamaForCausalLM, name: str, fmt: str, quantize: str | None, tmp: Path, a: argparse.Namespace,
           cache: PlanCache) -> dict[str, object]:
    """save_pretrained -> convert_checkpoint -> from_pretrained(fuse=True): the sparse model and what it
    took (``load_s`` includes planning each layer shape into ``cache``, the first time it is seen)."""
    stem = name.replace(":", "of")
    src, dst = tmp / f"{stem}-pruned", tmp / f"{stem}-sparse"
    model.save_pretrained(src)
    summary = convert_checkpoint(src, dst, format=fmt, quantize=quantize, allow_dense=True)
    expected = LINEARS_PER_BLOCK * a.layers + (quantize is not None)  # int8: lm_head too
    if summary.converted != expected:
        raise RuntimeError(f"{name}: convert_checkpoint converted {summary.converted} tensors, "
                           f"expected {expected}")
    batches = (1, a.decode_prompt_len, a.prompt_len) if a.kernel == "auto" else ()
    t0 = time.perf_counter()
    sparse = from_pretrained(dst, fuse=True, kernel=a.kernel, batches=batches, cache=cache)
    load_s = time.perf_counter() - t0
    layers = sum(isinstance(m, SparseLinear) for m in sparse.modules())
    if layers != expected:
        raise RuntimeError(f"{name}: from_pretrained made {layers} SparseLinear layers, expected {expected}")
    return {"model": sparse, "load_s": round(load_s, 3), "converted_tensors": summary.converted,
            "sparse_layers": layers, "weights_bytes_dense": weight_bytes(src),
            "weights_bytes_sparse": weight_bytes(dst), "plan_choices": plan_choices(sparse)}


def generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, **kw) -> object:
    """Greedy generate() of ``new_tokens`` tokens (all of them: the model has no EOS)."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=PAD, **kw)


def prefill(model: nn.Module, ids: torch.Tensor) -> object:
    """generate()'s first step: the prompt into a fresh KV cache, the logits of its last token."""
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)


def same_tokens(sparse: nn.Module, reference: nn.Module, prompt: torch.Tensor, n: int) -> dict[str, object]:
    """Whether greedy decoding of ``n`` tokens gives the reference's tokens; the largest logit difference and
    the reference's smallest top-1 - top-2 logit margin over the steps (a near-tie explains a flip)."""
    with torch.inference_mode():
        ref = generate(reference, prompt, n, output_scores=True, return_dict_in_generate=True)
        got = generate(sparse, prompt, n, output_scores=True, return_dict_in_generate=True)
    made = ref.sequences.shape[1] - prompt.shape[1]
    if made != n:
        raise RuntimeError(f"generate() made {made} tokens, asked for {n}")
    ref_scores, got_scores = torch.cat(ref.scores), torch.cat(got.scores)
    top2 = ref_scores.topk(2, dim=-1).values
    same = torch.equal(ref.sequences, got.sequences)
    return {"same_tokens": same, "check_tokens": n, "tokens": got.sequences[0, prompt.shape[1]:].tolist(),
            "reference_tokens": ref.sequences[0, prompt.shape[1]:].tolist(),
            "max_logit_diff": float((ref_scores - got_scores).abs().max()) if same else None,
            "min_top2_margin": float((top2[:, 0] - top2[:, 1]).min())}


class Decode:
    """``steps`` greedy decode steps with the KV cache, after a prompt prefilled once at construction.

    Each call starts from a copy of that prefilled cache (its prompt-length keys and values: a few small
    tensors) and runs the steps generate() runs after its first one: one token in, the cache and an all-ones
    mask one longer, ``logits_to_keep=1``, argmax. Returns the tokens, the prefill's first."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, steps: int):
        with torch.inference_mode():
            out = prefill(model, ids)
        cache = getattr(out, "cache", None)  # transformers >= 5.24; "past_key_values" before
        self.cache = out.past_key_values if cache is None else cache
        # the forward's name for the cache argument, as for the output
        self.key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.model, self.steps, self.length = model, steps, ids.shape[1]
        self.first = out.logits[:, -1].argmax(-1, keepdim=True)

    def __call__(self) -> torch.Tensor:
        cache, token = copy.deepcopy(self.cache), self.first
        tokens = [token]
        for i in range(self.steps):
            mask = torch.ones(1, self.length + i + 1, dtype=torch.long)
            out = self.model(input_ids=token, attention_mask=mask, use_cache=True, logits_to_keep=1,
                             **{self.key: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, dim=1)


def check_decode_loop(model: nn.Module, ids: torch.Tensor, n: int, name: str) -> None:
    """The timed decode loop makes generate()'s greedy tokens (else it would time something else)."""
    with torch.inference_mode():
        loop = Decode(model, ids, n - 1)()
        ref = generate(model, ids, n)[:, ids.shape[1]:]
    if not torch.equal(loop, ref):
        raise RuntimeError(f"{name}: the decode loop's tokens {loop.tolist()} differ from generate()'s "
                           f"{ref.tolist()}")


def measure(models: dict[str, nn.Module], prompt: torch.Tensor, short: torch.Tensor,
            a: argparse.Namespace) -> dict[str, dict[str, Timing]]:
    """Every candidate's prefill, decode steps and (``--generate``) whole generate() call, interleaved in
    one ``time_interleaved`` run."""
    fns = {}
    for name, m in models.items():
        fns[(name, "prefill")] = functools.partial(prefill, m, prompt)
        fns[(name, "decode")] = Decode(m, short, a.new_tokens)
        if a.generate:
            fns[(name, "generate")] = functools.partial(generate, m, short, a.new_tokens)
    t = time_interleaved(fns, warmup=1, repeats=a.repeats, min_sample_s=a.min_sample_s)
    return {name: {kind: t[(name, kind)] for kind in ("prefill", "decode", "generate") if (name, kind) in t}
            for name in models}


def _ms(prefix: str, t: Timing | None, per: int = 1, suffix: str = "") -> dict[str, float | None]:
    """``<prefix>ms``, ``<prefix>p10_ms``, ``<prefix>p90_ms`` (with ``suffix``): milliseconds per ``per``."""
    return {f"{prefix}{k}ms{suffix}": None if t is None else round(v / per * 1e3, 3)
            for k, v in (("", t and t.median_s), ("p10_", t and t.p10_s), ("p90_", t and t.p90_s))}


def _ratio(t: Timing | None, base: Timing | None) -> float | None:
    return None if t is None or base is None else round(t.ratio_to(base), 3)


def rows_of(times: dict[str, dict[str, Timing]], meta: dict[str, dict[str, object]],
            a: argparse.Namespace) -> list[dict[str, object]]:
    """One row per candidate (``COLUMNS``): its times, its ratios to dense and to its pruned dense model."""
    base = times["dense"]
    rows = []
    for name, t in times.items():
        m = meta[name]
        ref = times.get(m.get("pruned_dense"), {})
        p, d, g = t["prefill"], t["decode"], t.get("generate")
        row = {"candidate": name, "variant": m["variant"], "runtime": m["runtime"], "format": m["format"],
               "decoder_sparsity": m["decoder_sparsity"], "same_tokens": m.get("same_tokens"),
               **_ms("prefill_", p), "prefill_tok_s": round(a.prompt_len / p.median_s, 1),
               "prefill_speedup": _ratio(p, base["prefill"]),
               "prefill_speedup_vs_pruned_dense": _ratio(p, ref.get("prefill")),
               **_ms("decode_", d, a.new_tokens, "_per_token"),
               "decode_tok_s": round(a.new_tokens / d.median_s, 2),
               "decode_speedup": _ratio(d, base["decode"]),
               "decode_speedup_vs_pruned_dense": _ratio(d, ref.get("decode")),
               **_ms("generate_", g), "generate_tok_s": round(a.new_tokens / g.median_s, 2) if g else None,
               "generate_speedup": _ratio(g, base.get("generate")),
               "weights_mb": m["weights_mb"], "load_s": m.get("load_s")}
        rows.append(row)
    return rows


def plot(rows: list[dict[str, object]], path: Path, title: str, prompt_len: int) -> None:
    """Two panels (prefill, decode): per variant a bar for its pruned dense model and one for its sparse
    model, and one for the dense model with our attention; each its speedup over dense; break-even at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = list(dict.fromkeys(r["variant"] for r in rows))  # "dense" first: its control candidate
    styles = {"dense": ("C1", "dense + our attention"), "pruned-dense": ("C7", "pruned, dense kernels"),
              "sparse": ("C0", "sparse (from_pretrained, fuse=True)")}
    shown = [r for r in rows if r["candidate"] != "dense"]
    fig, axes = plt.subplots(1, 2, figsize=(4.0 + 1.5 * len(groups), 4.4), sharey=True)
    for ax, key, name in zip(axes, ("prefill_speedup", "decode_speedup"),
                             (f"prefill ({prompt_len} tokens, batch 1)", "greedy decode (tokens/s)")):
        for g, group in enumerate(groups):
            bars = [r for r in shown if r["variant"] == group]
            width = 0.8 / max(len(bars), 2)  # a lone bar as wide as a pair's
            for i, r in enumerate(bars):
                x = g + width * (i - (len(bars) - 1) / 2)
                ax.bar(x, r[key], width * 0.92, color=styles[r["runtime"]][0])
                ax.annotate(f"{r[key]:.2f}x", (x, r[key]), xytext=(0, 2), textcoords="offset points",
                            ha="center", fontsize=7)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_xticks(range(len(groups)), [g if g != "dense" else "dense +\nour attention" for g in groups],
                      fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("speedup over dense (same run; dashed: break-even)", fontsize=8)
    runtimes = dict.fromkeys(r["runtime"] for r in shown)
    fig.legend(handles=[Patch(color=styles[k][0], label=styles[k][1]) for k in runtimes],
               loc="lower center", ncol=len(runtimes), fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path,
                   help="output folder (default: benchmarks/results/llm_eager/<kernel isa>)")
    p.add_argument("--quick", action="store_true",
                   help="smoke configuration: 2 layers, hidden 128, vocab 1000, a few tokens")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--kernel", choices=("auto", "ours", "torch"), default="auto",
                   help="from_pretrained(kernel=); auto: planned per layer at load (default)")
    p.add_argument("--threads", type=int, default=0, help="torch (and our) threads; default: torch's choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True,
                   help="also time whole generate() calls (default: yes)")
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=None,
                       help=f"default {value} ({QUICK[name]} with --quick)")
    a = p.parse_args(argv)
    for name, value in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.new_tokens < 1 or a.check_tokens < 2 or a.repeats < 1:
        p.error("need --new-tokens >= 1, --check-tokens >= 2 (generate's first token comes from its prefill) "
                "and --repeats >= 1")
    if a.heads % a.kv_heads or a.hidden % a.heads:
        p.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    return a


def print_table(rows: list[dict[str, object]]) -> None:
    def vs(r: dict[str, object]) -> str:
        p, d = r["prefill_speedup_vs_pruned_dense"], r["decode_speedup_vs_pruned_dense"]
        return "-" if p is None else f"{p:.2f} / {d:.2f}"

    head = ["candidate", "prefill ms", "prefill x", "decode tok/s", "decode x", "generate tok/s",
            "vs pruned dense (prefill / decode)", "same tokens", "MiB"]
    print(table(head, [[r["candidate"], f"{r['prefill_ms']:.2f}", f"{r['prefill_speedup']:.2f}",
                        f"{r['decode_tok_s']:.1f}", f"{r['decode_speedup']:.2f}",
                        "-" if r["generate_tok_s"] is None else f"{r['generate_tok_s']:.1f}", vs(r),
                        "-" if r["same_tokens"] is None else str(r["same_tokens"]).lower(),
                        f"{r['weights_mb']:.1f}"] for r in rows]), flush=True)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Build, prune, convert, load, check the tokens, time; write results.json, results.csv and plot.png
    into the output folder and return what results.json holds (SystemExit when the tokens differ)."""
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cpp.library()  # built (a few seconds the first time) before anything is measured
    isa = cpp.isa() if cpp.available() else "torch-kernels"
    out = a.out or Path("benchmarks/results/llm_eager") / isa
    env = dict(environment(), transformers=transformers.__version__)
    print(f"{env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads, torch {env['torch']}, "
          f"our kernels: {env['kernel_isa'] or 'unavailable (torch kernels)'}", flush=True)

    dense = llama(a)
    params = sum(p.numel() for p in dense.parameters())
    dense_mb = round(sum(p.numel() * p.element_size() for p in dense.parameters()) / MIB, 1)
    print(f"model: {params / 1e6:.1f}M parameters ({a.layers} layers, hidden {a.hidden}, intermediate "
          f"{a.intermediate}, {a.heads} heads / {a.kv_heads} KV heads, vocab {a.vocab})", flush=True)
    gen = torch.Generator().manual_seed(a.seed + 1)
    prompt = torch.randint(1, a.vocab, (1, a.prompt_len), generator=gen)
    short = torch.randint(1, a.vocab, (1, a.decode_prompt_len), generator=gen)
    fast_attention = copy.deepcopy(dense)
    if not use_fast_attention(fast_attention):
        raise RuntimeError("use_fast_attention did not switch the dense model's attention")
    models = {"dense": dense, "dense_fast_attention": fast_attention}
    dense_meta = {"variant": "dense", "runtime": "dense", "format": "dense", "decoder_sparsity": 0.0,
                  "weights_mb": dense_mb}
    meta = {"dense": dense_meta, "dense_fast_attention": dense_meta}
    variants: dict[str, dict[str, object]] = {}
    cache = PlanCache(None)  # plans measured in this run, kept in this process: no earlier plan, none written
    with tempfile.TemporaryDirectory(prefix="llm_eager-") as tmp:
        for name in a.variants:
            pattern, sparsity, fmt, quantize = VARIANTS[name]
            t0 = time.perf_counter()
            pruned_model = pruned(dense, pattern, sparsity)
            prune_s = time.perf_counter() - t0
            d = deploy(pruned_model, name, fmt, quantize, Path(tmp), a, cache)
            sparse = d.pop("model")
            if quantize:  # the reference: the same int8 weights run densely
                pruned_model = dequantized(pruned_model)
            check = same_tokens(sparse, pruned_model, short, a.check_tokens)
            s = round(decoder_sparsity(pruned_model), 4)
            variants[name] = {"pattern": pattern, "sparsity": sparsity, "format": fmt, "quantize": quantize,
                              "decoder_sparsity": s, "prune_s": round(prune_s, 2), **d, **check}
            models[f"{name}/pruned-dense"], models[f"{name}/sparse"] = pruned_model, sparse
            common = {"variant": name, "decoder_sparsity": s}
            meta[f"{name}/pruned-dense"] = {**common, "runtime": "pruned-dense", "format": "dense",
                                            "weights_mb": round(d["weights_bytes_dense"] / MIB, 1)}
            meta[f"{name}/sparse"] = {**common, "runtime": "sparse", "format": fmt,
                                      "same_tokens": check["same_tokens"],
                                      "pruned_dense": f"{name}/pruned-dense",
                                      "weights_mb": round(d["weights_bytes_sparse"] / MIB, 1),
                                      "load_s": d["load_s"]}
            print(f"{name}: decoder sparsity {s:.3f}, {d['converted_tensors']} tensors as {fmt}, weights "
                  f"{d['weights_bytes_dense'] / MIB:.1f} -> {d['weights_bytes_sparse'] / MIB:.1f} MiB, "
                  f"loaded in {d['load_s']:.2f} s; greedy {a.check_tokens} tokens same as pruned dense: "
                  f"{check['same_tokens']} (min top-2 margin {check['min_top2_margin']:.3g})", flush=True)

    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()} | {"out": str(out)}
    header = {"environment": env, "args": args, "config": dense.config.to_diff_dict(), "parameters": params,
              "measure": {
                  "prefill": f"forward of {a.prompt_len} tokens, batch 1, use_cache=True, logits_to_keep=1",
                  "decode": f"{a.new_tokens} greedy steps with the KV cache after a prefilled "
                            f"{a.decode_prompt_len}-token prompt, timed directly; tokens/s = steps / time",
                  "generate": (f"whole generate() of {a.new_tokens} tokens from {a.decode_prompt_len}"
                               if a.generate else "not timed (--no-generate)"),
                  "timer": "sparse_ops.timing.time_interleaved, every candidate interleaved, medians",
                  "ratios": "dense median / candidate median, same run"}}
    out.mkdir(parents=True, exist_ok=True)
    bad = [n for n, v in variants.items() if not v["same_tokens"]]
    if bad:
        status = f"failed: greedy tokens differ from the pruned dense model: {', '.join(bad)}"
        write_json(out / "results.json", {**header, "variants": variants, "status": status})
        raise SystemExit(f"error: greedy generate() of the sparse model differs from the pruned dense model "
                         f"for {', '.join(bad)} (details in {out / 'results.json'}); nothing was timed")
    for name, m in models.items():
        check_decode_loop(m, short, a.check_tokens, name)

    kinds = "prefill, decode" + (", generate" if a.generate else "")
    print(f"timing {len(models)} candidates x ({kinds}), interleaved, {a.repeats} repeats ...", flush=True)
    t0 = time.perf_counter()
    rows = rows_of(measure(models, prompt, short, a), meta, a)
    timing_s = round(time.perf_counter() - t0, 1)
    by = {r["candidate"]: r for r in rows}
    for name, v in variants.items():
        v.update({k: by[f"{name}/sparse"][k] for k in (
            "prefill_ms", "prefill_speedup", "prefill_speedup_vs_pruned_dense", "decode_tok_s",
            "decode_ms_per_token", "decode_speedup", "decode_speedup_vs_pruned_dense", "generate_tok_s",
            "generate_speedup")})
    dense_row = {k: by["dense"][k] for k in ("prefill_ms", "decode_tok_s", "decode_ms_per_token",
                                             "generate_tok_s")}
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    result = {**header, "variants": variants, "dense": dense_row, "timing_s": timing_s, "rows": rows}
    write_json(out / "results.json", {**result, "status": "complete"})
    title = (f"LLaMA-style {params / 1e6:.3g}M fp32, prefill {a.prompt_len} tokens, decode {a.new_tokens} "
             f"tokens; {env['cpu']}, {isa} build, {env['torch_threads']} threads, torch {env['torch']}")
    plot(rows, out / "plot.png", title, a.prompt_len)
    print_table(rows)
    print(f"wrote {out / 'results.json'}, results.csv, plot.png (timing {timing_s} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
