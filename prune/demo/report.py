"""The demo's report: one results dict, written as results.json, a Markdown table with a few sentences the
program writes from the numbers, and PNG plots. The table is made from the same dict as the JSON.

Example:
    >>> row = {"run": "dense", "description": "dense baseline", "accuracy": 0.97, "sparsity": 0.0,
    ...        "params_total": 1000, "params_active": 1000, "file_dense_bytes": 4096,
    ...        "file_deployed_bytes": 4096, "deployed_as": "dense",
    ...        "latency": {"1": {"deployed_ms": 0.5, "speedup_vs_dense": 1.0}}}
    >>> print(table([row]).splitlines()[2])
    | dense | dense | 97.00 | 0.0 | 1,000 | 1,000 | 4.0 | 4.0 | 0.500 (1.00x) |
"""
from __future__ import annotations

import json
import os

from sparse_ops.registry import FORMATS

TABLE_COLUMNS = ["run", "deployed as", "accuracy %", "sparsity %", "params", "active params", "file KB",
                 "shipped KB"]


def _fmt_latency(cell: dict[str, float]) -> str:
    return f"{cell['deployed_ms']:.3f} ({cell['speedup_vs_dense']:.2f}x)"


def table(rows: list[dict]) -> str:
    """Markdown table of the runs: accuracy, sizes, and latency per batch (ms, and speedup over dense)."""
    batches = list(rows[0]["latency"]) if rows else []
    head = TABLE_COLUMNS + [f"ms @ batch {b} (vs dense)" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["deployed_as"], f"{100 * r['accuracy']:.2f}", f"{100 * r['sparsity']:.1f}",
                 f"{r['params_total']:,}", f"{r['params_active']:,}", f"{r['file_dense_bytes'] / 1024:.1f}",
                 f"{r['file_deployed_bytes'] / 1024:.1f}"]
        cells += [_fmt_latency(r["latency"][b]) for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(rows: list[dict]) -> list[str]:
    """A few sentences drawn from the numbers: fastest at batch 1, accuracy cost and size of pruning, which
    layers ran sparse, the timing noise (``_noise``), and where a sparse model did not pay."""
    by = {r["run"]: r for r in rows}
    out = []
    batches = list(rows[0]["latency"])
    b1 = batches[0]
    noise = _noise(rows, by)
    fastest = min(rows, key=lambda r: r["latency"][b1]["deployed_ms"])
    cell = fastest["latency"][b1]
    if fastest["run"] != "dense" and cell["speedup_vs_dense"] - 1 <= noise.get(b1, 0.0):
        out.append(f"At batch {b1}, no model was faster than the dense baseline beyond the timing noise "
                   f"({100 * noise[b1]:.1f}%, below): the quickest measured, {fastest['run']}, ran "
                   f"{cell['speedup_vs_dense']:.2f}x.")
    else:
        out.append(f"At batch {b1}, the fastest model was **{fastest['run']}** ({cell['deployed_ms']:.3f} ms, "
                   f"{cell['speedup_vs_dense']:.2f}x the dense baseline).")
    if "dense" in by:
        pruned = [r for r in rows if r["deployed_as"] in FORMATS]
        if pruned:
            parts = [f"{r['run']} {100 * (r['accuracy'] - by['dense']['accuracy']):+.2f} points at "
                     f"{100 * r['sparsity']:.0f}% sparsity, file {r['file_deployed_bytes'] / r['file_dense_bytes']:.0%} "
                     f"of dense" for r in pruned]
            out.append("Against the dense baseline's accuracy: " + "; ".join(parts) + ".")
    planned = [r for r in rows if "planned_layers" in r["latency"][b1]]
    if planned:
        def on_sparse(r: dict) -> str:
            counts = "/".join(str(r["latency"][b]["sparse_layers"]) for b in batches)
            return f"{r['run']} {counts} of {r['latency'][b1]['planned_layers']}"
        out.append(f"Layers on a sparse kernel at batch {'/'.join(batches)} (the planner measured each layer and "
                   "ran the rest dense, where dense was faster on this CPU): "
                   + ", ".join(on_sparse(r) for r in planned) + ".")
    if noise:
        out.append("Timing noise: the same dense computation timed several times in this run (the dense model "
                   "twice, each pruned run's weights run densely) spread "
                   + " / ".join(f"{100 * noise[b]:.1f}%" for b in noise) + f" at batch {'/'.join(noise)}; "
                   "a ratio that close to 1.00x is noise.")
    busy = {b: rows[0]["latency"][b]["busy"] for b in batches if "busy" in rows[0]["latency"][b]}
    if busy:
        out.append("The machine was busy while batch " + "/".join(busy) + " was timed ("
                   + next(iter(busy.values())) + "): those ratios are that moment's; rerun on an idle machine, or "
                   "compare `torch.set_num_threads(1)`.")
    slower = [f"{r['run']} at batch {b} ({r['latency'][b]['speedup_vs_dense']:.2f}x"
              + (", within noise" if 1 - r["latency"][b]["speedup_vs_dense"] <= noise.get(b, 0.0) else "") + ")"
              for r in rows if r["run"] != "dense" for b in batches if r["latency"][b]["speedup_vs_dense"] < 1.0]
    if slower:
        out.append("Sparsity did not pay here for: " + ", ".join(slower) + ". Small layers are dominated by "
                   "per-call overhead; measure your own shapes with `prune bench`.")
    else:
        out.append("Every sparse variant was at least as fast as the dense baseline at every batch measured.")
    return out


def _noise(rows: list[dict], by: dict[str, dict]) -> dict[str, float]:
    """Per batch, max / min - 1 over the timings of one dense computation: the dense model (twice) and every
    pruned run executed densely (the same architecture and multiply-adds; only the weights' values differ)."""
    if "dense" not in by or "again_ms" not in next(iter(by["dense"]["latency"].values())):
        return {}
    out = {}
    for b, cell in by["dense"]["latency"].items():
        times = [cell["deployed_ms"], cell["again_ms"]] + [r["latency"][b]["dense_exec_ms"] for r in rows
                                                          if "dense_exec_ms" in r["latency"][b]]
        out[b] = max(times) / min(times) - 1
    return out


def write_report(out_dir: str, results: dict, plots: list[str]) -> None:
    """Write results.json and report.md (table, findings, plots) into ``out_dir``."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    env = results["environment"]
    lines = ["# prune demo report", "",
             f"Digits (scikit-learn, 8x8), a {results['config']['model']} trained "
             f"{results['config']['steps']} steps per run with seed {results['config']['seed']}. "
             f"Latency: median of interleaved repeats on {env['cpu']} ({env['torch_threads']} threads, "
             f"kernels built for {env.get('kernel_isa') or 'none: torch kernels'}, torch {env['torch']}); "
             f"speedup against the dense baseline in the same run.", "",
             table(results["runs"]), "", *[f"- {s}" for s in findings(results["runs"])], ""]
    lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_training(out_dir: str, runs: list[dict]) -> str:
    """Accuracy over training for every run, with the pruning runs' sparsity schedules on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax2 = ax.twinx()
    for i, r in enumerate(runs):
        steps, acc, sparsity = zip(*r["curve"])
        line, = ax.plot(steps, [100 * a for a in acc], label=r["run"], color=f"C{i}")
        if r["deployed_as"] in FORMATS:
            ax2.plot(steps, [100 * s for s in sparsity], "--", color=line.get_color(), alpha=0.6)
    ax.set(xlabel="step", ylabel="test accuracy % (solid)", ylim=(0, 100))
    ax2.set(ylabel="target sparsity % (dashed)", ylim=(0, 100))
    ax.legend(loc="lower right")
    ax.set_title("Accuracy while training; pruning schedules dashed")
    name = "training.png"
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def plot_deployment(out_dir: str, runs: list[dict]) -> str:
    """Speedup over dense per run and batch, and shipped file size per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["run"] for r in runs]
    batches = list(runs[0]["latency"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(batches)
    for j, b in enumerate(batches):
        a1.bar([i + j * width for i in range(len(runs))], [r["latency"][b]["speedup_vs_dense"] for r in runs],
               width, label=f"batch {b}")
    a1.axhline(1.0, color="k", lw=1, ls=":")
    a1.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))], names)
    a1.set(ylabel="speedup over dense (same run)", title="CPU inference latency")
    a1.legend()
    a2.bar(names, [r["file_deployed_bytes"] / 1024 for r in runs], color="C2", label="shipped file")
    a2.bar(names, [r["file_dense_bytes"] / 1024 for r in runs], fill=False, edgecolor="k", label="dense file")
    a2.set(ylabel="KB", title="Checkpoint size")
    a2.legend()
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=25)
    name = "deployment.png"
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name
