"""Recovery after one-shot pruning on a real LM: perplexity of SmolLM2-135M dense, pruned in one shot, and recovered.

The pruned model: SparseGPT at ``--sparsity`` from 32 calibration windows of 512 tokens (the folder
``benchmarks/llm_decode.py`` caches, made here when missing). Recovery: ``prune.recover.recover`` for ``--steps``
AdamW steps of ``--batch-size`` windows of ``--seq-len`` tokens from ``lee_background`` (``--samples`` windows,
cycled), towards the dense model's logits (KL at temperature 2) plus the language-modelling loss, every zero
held. Perplexity on the disjoint ``lee`` articles in windows of ``--eval-len`` tokens, before and after.

Run: ``python -m benchmarks.recovery [--steps 100] [--lr 5e-5]``. Writes ``benchmarks/results/recovery/
smollm2-<sparsity>/``: results.json (environment, arguments, rows, the loss of every step), results.csv and
plot.png (the loss per step; perplexity of each row).
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.pretrained_lm import cache_dir, smollm2_folder, texts
from prune import perplexity
from prune.one_shot.data import calibration_batches, read_texts, token_stream
from prune.recover import recover
from sparse_ops.timing import environment


def pruned_folder(sparsity: float) -> Path:
    """SparseGPT at ``sparsity`` (32 x 512 calibration tokens): the folder ``benchmarks/llm_decode.py`` caches,
    made by its ``save_pruned`` when missing."""
    from benchmarks.llm_decode import save_pruned

    folder = cache_dir() / "llm_decode" / f"smollm2-sparsegpt-{round(100 * sparsity)}"
    if not (folder / "config.json").is_file():
        dense = AutoModelForCausalLM.from_pretrained(smollm2_folder(), local_files_only=True, dtype=torch.float32)
        part = folder.with_name(folder.name + ".part")
        save_pruned(dense, sparsity, "unstructured", argparse.Namespace(method="sparsegpt", samples=32), part)
        part.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--samples", type=int, default=256, help="training windows (cycled)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/recovery/smollm2-<sparsity>")
    a = p.parse_args(argv)
    out = a.out or Path(__file__).parent / "results" / "recovery" / f"smollm2-{round(100 * a.sparsity)}"
    torch.set_num_threads(a.threads)
    calib_file, eval_file = texts()
    tok = AutoTokenizer.from_pretrained(smollm2_folder(), local_files_only=True)
    eval_ids = token_stream(read_texts(eval_file), tok)

    def ppl(model) -> float:
        return round(perplexity(model, eval_ids, seq_len=a.eval_len, batch_size=4).perplexity, 3)

    teacher = AutoModelForCausalLM.from_pretrained(smollm2_folder(), local_files_only=True, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(pruned_folder(a.sparsity), local_files_only=True,
                                                   dtype=torch.float32)
    dense_ppl, oneshot_ppl = ppl(teacher.eval()), ppl(student.eval())
    batches = calibration_batches(read_texts(calib_file), tok, samples=a.samples, seq_len=a.seq_len, seed=0,
                                  batch_size=a.batch_size)
    t0 = time.perf_counter()
    report = recover(student, teacher, batches, steps=a.steps, lr=a.lr)
    seconds = round(time.perf_counter() - t0, 1)
    recovered_ppl = ppl(student)
    rows = [{"model": "dense", "perplexity": dense_ppl, "vs_dense": 1.0, "steps": 0, "seconds": 0.0},
            {"model": f"sparsegpt {a.sparsity:.0%}, one shot", "perplexity": oneshot_ppl,
             "vs_dense": round(oneshot_ppl / dense_ppl, 3), "steps": 0, "seconds": 0.0},
            {"model": f"sparsegpt {a.sparsity:.0%} + recovery", "perplexity": recovered_ppl,
             "vs_dense": round(recovered_ppl / dense_ppl, 3), "steps": a.steps, "seconds": seconds}]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"environment": environment(), "args": {k: str(v) for k, v in
                                                  vars(a).items()}, "rows": rows, "losses": report.losses,
                                                  "parts": report.parts}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(out / "plot.png", rows, report)
    for r in rows:
        print(f"{r['model']:<32} perplexity {r['perplexity']:8.3f}  {r['vs_dense']:.2f}x dense")
    return rows


def plot(path: Path, rows: list[dict], report) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, values in report.parts.items():
        left.plot(range(1, len(values) + 1), values, label=name)
    left.set(xlabel="step", ylabel="loss term", title="recovery: the loss terms per step")
    left.legend()
    right.bar([r["model"].replace(", ", "\n").replace(" + ", "\n+ ") for r in rows], [r["perplexity"] for r in rows])
    right.set(ylabel="perplexity (lee, lower is better)", title="SmolLM2-135M")
    for i, r in enumerate(rows):
        right.text(i, r["perplexity"], f"{r['perplexity']:.1f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
