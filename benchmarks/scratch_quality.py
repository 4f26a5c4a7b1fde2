"""Which criterion when training from scratch, far from any optimum (Sanh et al.'s regime for movement).

``benchmarks/quality.py`` starts from a pretrained model at its optimum; this is the other end: the demo's
classifier (``prune.demo``: a 2-layer transformer over scikit-learn's bundled 8x8 digits, 500 AdamW steps, batch
64) trained from random weights while every criterion in ``prune.criteria`` prunes its encoder linears under one
schedule, ``CubicRamp(0, s, begin_step=100, end_step=400, every=5)`` (the demo's movement schedule), at layer
scope. Metric: test accuracy (360 images: one image is 0.28 points), mean and standard deviation over seeds
(each seed changes the split, the initialisation and the batches). Dense runs with the same seeds are the
reference.

Run: ``python -m benchmarks.scratch_quality [--sparsities 0.9,0.95,0.98] [--seeds 0,1,2] [--jobs 2]
[--out benchmarks/results/scratch_quality]``; ``--quick`` is a smoke configuration (20 steps, one seed).
Writes ``scratch_quality.json`` (rows, each with the machine it ran on) and ``.csv``, and ``scratch_quality.png``;
``--table`` prints the Markdown table of ``--out``'s results.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

OUT = "benchmarks/results/scratch_quality"
DENSE = "dense"


def run(criterion: str, sparsity: float, seed: int, steps: int = 500) -> dict:
    """Train the demo's classifier from scratch with ``criterion`` pruning to ``sparsity``; one result row."""
    from prune.demo.runs import Budget, RunSpec, _cubic, load_data, train_run

    pruning = None if criterion == DENSE else (
        lambda s: {"sparsity": _cubic(sparsity, 0.2, 0.8, updates=100)(s), "criterion": criterion})
    spec = RunSpec(criterion, criterion, pruning=pruning)
    trained = train_run(spec, load_data(seed), Budget(steps=steps), seed=seed, progress=False)
    return {"criterion": criterion, "sparsity": sparsity if pruning else 0.0, "seed": seed, "steps": steps,
            "accuracy": round(100 * trained.accuracy, 2), "measured_sparsity": round(trained.pruned_sparsity, 4),
            "train_seconds": round(trained.train_seconds, 1)}


def _job(criterion: str, sparsity: float, seed: int, steps: int) -> dict:
    torch.set_num_threads(1)
    return run(criterion, sparsity, seed, steps)


def summary(rows: list[dict]) -> dict[tuple[str, float], tuple[float, float, int]]:
    """(criterion, sparsity) -> (mean accuracy, standard deviation over seeds, seeds)."""
    groups: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        groups.setdefault((r["criterion"], r["sparsity"]), []).append(r["accuracy"])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def table(rows: list[dict]) -> str:
    """Markdown: a row per criterion (best mean at the highest sparsity first), a column per sparsity."""
    from benchmarks.quality import machines

    stats = summary(rows)
    sparsities = sorted({s for c, s in stats if c != DENSE})
    names = sorted({c for c, _ in stats if c != DENSE}, key=lambda c: -stats.get((c, sparsities[-1]), (0,))[0])
    cell = lambda c, s: f"{stats[(c, s)][0]:.2f} ± {stats[(c, s)][1]:.2f}" if (c, s) in stats else "-"
    lines = ["| accuracy % (mean ± sd over seeds) | " + " | ".join(f"{s:g}" for s in sparsities) + " |",
             "|" + "---|" * (len(sparsities) + 1)]
    lines += [f"| {c} | " + " | ".join(cell(c, s) for s in sparsities) + " |" for c in names]
    if (DENSE, 0.0) in stats:
        lines.append(f"| dense (0%) | {cell(DENSE, 0.0)} |" + " |" * (len(sparsities) - 1))
    seeds = sorted({r["seed"] for r in rows})
    return "\n".join(lines) + f"\n\nseeds {seeds}; measured on: {machines(rows)}"


def write(out: Path, new_rows: list[dict]) -> None:
    """Merge rows by (criterion, sparsity, seed, steps) into the JSON / CSV and redraw the plot."""
    from benchmarks.quality import machine_of
    from sparse_ops.timing import environment

    path = out / "scratch_quality.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    env = environment()
    key = lambda r: (r["criterion"], r["sparsity"], r["seed"], r["steps"])
    merged = {key(r): r for r in old} | {key(r): {**r, **machine_of(env)} for r in new_rows}
    rows = sorted(merged.values(), key=lambda r: (r["steps"], r["sparsity"], r["criterion"], r["seed"]))
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    with open(out / "scratch_quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    plot(out, rows)


def plot(out: Path, rows: list[dict]) -> None:
    """Accuracy against sparsity, one line per criterion with the seeds' standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.quality import finish_axes, machines, save_figure

    stats = summary(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for c in sorted({c for c, _ in stats if c != DENSE}):
        pts = sorted((s, *stats[(c, s)][:2]) for cc, s in stats if cc == c)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=c)
    if (DENSE, 0.0) in stats:
        ax.axhline(stats[(DENSE, 0.0)][0], color="k", ls="--", label="dense")
    finish_axes(ax, "test accuracy % (digits)")
    ax.set_title(f"trained from scratch while pruned - {machines(rows)}", fontsize=9)
    save_figure(fig, out / "scratch_quality.png")


def main(argv: list[str] | None = None) -> None:
    from prune.criteria import CRITERIA

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0.9,0.95,0.98")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--criteria", default=None, help=f"comma-separated (default: all: {', '.join(sorted(CRITERIA))})")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument("--out", default=OUT)
    p.add_argument("--quick", action="store_true", help="smoke run: 20 steps, seed 0")
    p.add_argument("--table", action="store_true", help="print --out's results as a Markdown table and exit")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(table(json.loads((out / "scratch_quality.json").read_text())["rows"]))
        return
    chosen = args.criteria.split(",") if args.criteria else sorted(CRITERIA)
    bad = [c for c in chosen if c not in CRITERIA]
    if bad:
        raise SystemExit(f"unknown criteria {bad}; known: {', '.join(sorted(CRITERIA))}")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = 20 if args.quick else 500
    todo = [(DENSE, 0.0, seed) for seed in seeds]
    todo += [(c, float(s), seed) for s in args.sparsities.split(",") for c in chosen for seed in seeds]
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(_job, c, s, seed, steps) for c, s, seed in todo]
        for f in futures:
            row = f.result()
            write(out, [row])
            print(f"{row['criterion']:14s} s={row['sparsity']:.2f} seed={row['seed']}  accuracy {row['accuracy']:.2f}",
                  flush=True)
    print(table(json.loads((out / "scratch_quality.json").read_text())["rows"]))


if __name__ == "__main__":
    main()
