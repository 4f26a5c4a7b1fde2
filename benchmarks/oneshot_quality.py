"""One-shot pruning quality on a real pretrained LM: perplexity after SparseGPT, Wanda and magnitude, side by side.

Model SmolLM2-135M-Instruct and texts from PyPI packages (``benchmarks/pretrained_lm.py``): calibration windows
from ``lee_background`` (``--samples`` x ``--seq-len`` tokens, seed 0, non-overlapping), perplexity on the
disjoint ``lee`` articles (non-overlapping windows of ``--eval-len``). Each configuration runs in its own
process (so its peak RSS is its own) from the saved dense folder: ``prune.oneshot`` then ``prune.perplexity``;
the report's seconds are the one-shot call's. The calibration windows are saved as ``calibration_ids.npy`` so
that a reference implementation (``benchmarks/llmcompressor_reference.py``) prunes on exactly the same tokens;
``--eval-folder DIR --name NAME`` adds the perplexity of a folder it wrote to the same table, and ``--ids FILE``
calibrates on the first ``--samples`` windows of such a saved array (a comparison at fewer windows).

Run: ``python -m benchmarks.oneshot_quality [--configs sparsegpt-50,wanda-2:4,...] [--samples 128]
[--seq-len 512] [--out benchmarks/results/oneshot_quality]``. Results: ``results.json`` / ``results.csv``
(one row per configuration, rows merged across runs by name) and ``perplexity.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# name -> oneshot options
CONFIGS: dict[str, dict] = {
    "dense": {},
    "magnitude-layer-50": dict(method="magnitude", sparsity=0.5, scope="layer"),
    "magnitude-row-50": dict(method="magnitude", sparsity=0.5, scope="row"),
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "sparsegpt-50": dict(method="sparsegpt", sparsity=0.5),
    "magnitude-2:4": dict(method="magnitude", pattern="2:4"),
    "wanda-2:4": dict(method="wanda", pattern="2:4"),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    # within each block, each stage of linears pruned from the inputs its pruned predecessors give
    "wanda-50-seq": dict(method="wanda", sparsity=0.5, sequential=True),
    "sparsegpt-50-seq": dict(method="sparsegpt", sparsity=0.5, sequential=True),
    "wanda-2:4-seq": dict(method="wanda", pattern="2:4", sequential=True),
    "sparsegpt-2:4-seq": dict(method="sparsegpt", pattern="2:4", sequential=True),
    # how much of a 2:4 result is the dampening's (llm-compressor and we use 0.01): the method's own spread
    "sparsegpt-2:4-damp0.001": dict(method="sparsegpt", pattern="2:4", damp=0.001),
    "sparsegpt-2:4-damp0.1": dict(method="sparsegpt", pattern="2:4", damp=0.1),
    "sparsegpt-50-damp0.001": dict(method="sparsegpt", sparsity=0.5, damp=0.001),
    "wanda-70": dict(method="wanda", sparsity=0.7),
    "wanda-70-owl": dict(method="wanda", sparsity=0.7, profile="owl"),
    "sparsegpt-70": dict(method="sparsegpt", sparsity=0.7),
    "sparsegpt-70-owl": dict(method="sparsegpt", sparsity=0.7, profile="owl"),
    # int8 weights (a scale per row, what `prune convert --quantize int8` stores): round to nearest, GPTQ (SparseGPT
    # at 0% with bits=8), SparseGPT's joint mode, and SparseGPT at fp32 then rounded (round_after)
    "int8-rtn": dict(method="magnitude", sparsity=0.0, bits=8),
    "int8-gptq": dict(method="sparsegpt", sparsity=0.0, bits=8),
    "sparsegpt-50-int8": dict(method="sparsegpt", sparsity=0.5, bits=8),
    "sparsegpt-50+rtn8": dict(method="sparsegpt", sparsity=0.5, round_after=True),
    "wanda-50-int8": dict(method="wanda", sparsity=0.5, bits=8),
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(name: str, args: argparse.Namespace) -> dict:
    """One configuration in this process: load, prune, evaluate."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.pretrained_lm import smollm2_folder, texts
    from prune import oneshot, perplexity
    from prune.one_shot.data import calibration_batches, read_texts, token_stream

    torch.set_num_threads(args.threads)
    folder = Path(args.eval_folder) if args.eval_folder else smollm2_folder()
    calib_file, eval_file = texts()
    tok = AutoTokenizer.from_pretrained(smollm2_folder(), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    row: dict = {"name": name, **CONFIGS.get(name, {"method": "reference"}), "samples": args.samples,
                 "seq_len": args.seq_len, "threads": args.threads}
    if name in CONFIGS and CONFIGS[name]:
        if args.ids:  # the first --samples windows of a saved array (what the reference run also read)
            ids = torch.from_numpy(np.load(args.ids, allow_pickle=False)[:args.samples])
            row["seq_len"] = ids.shape[1]
        else:
            ids = torch.cat(calibration_batches(read_texts(calib_file), tok, samples=args.samples,
                                                seq_len=args.seq_len, batch_size=8))
            np.save(Path(args.out) / "calibration_ids.npy", ids.numpy())
        rss0, t0 = _peak_rss_mb(), time.perf_counter()
        options = {k: v for k, v in CONFIGS[name].items() if k != "round_after"}
        _, report = oneshot(model, ids, progress=not args.quiet, **options)
        if CONFIGS[name].get("round_after"):  # int8 after the fp32 pruning, each row's absmax grid
            from sparse_ops.quantized import on_grid, row_scales

            with torch.no_grad():
                for r in report.layers:
                    w = model.get_submodule(r.name).weight
                    w.copy_(on_grid(w, row_scales(w)))
        row.update(seconds=round(time.perf_counter() - t0, 1), sparsity=round(report.sparsity, 4),
                   rss_before_mb=round(rss0), mean_error=round(sum(r.error for r in report.layers)
                                                              / len(report.layers), 4))
    ids = token_stream(read_texts(eval_file), tok)
    ppl = perplexity(model, ids, seq_len=args.eval_len, batch_size=4)
    row.update(perplexity=round(ppl.perplexity, 3), eval_tokens=ppl.tokens, peak_rss_mb=round(_peak_rss_mb()))
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names (default: all)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/oneshot_quality")
    p.add_argument("--eval-folder", default=None, help="evaluate this pruned folder instead (with --name)")
    p.add_argument("--name", default=None, help="the row name of --eval-folder (or of one config in-process)")
    p.add_argument("--ids", default=None, help="calibrate on the first --samples rows of this .npy of token ids")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.name:  # one row, in this process (a subprocess of the loop below, or a reference folder's row)
        row = run_one(args.name, args)
        if args.eval_folder:
            run = Path(args.eval_folder) / "llmcompressor_run.json"
            if run.exists():  # the reference's own record: its seconds and peak memory
                ref = json.loads(run.read_text())
                calib = ref.get("calibration", {})
                row.update(samples=calib.get("windows"), seq_len=calib.get("seq_len"), seconds=ref.get("seconds"),
                           prune_peak_rss_mb=ref.get("peak_rss_mb"), sparsity=ref.get("overall_sparsity"),
                           threads=ref.get("threads"), modifier=ref.get("modifier_args"), tool=ref.get("versions"))
            write(out, {args.name: row})
        print(json.dumps(row))
        return
    rows = {}
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
        cmd = [sys.executable, "-m", "benchmarks.oneshot_quality", "--name", name, *_passed(args)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: perplexity {rows[name]['perplexity']}  {rows[name].get('seconds', '-')} s  "
              f"peak {rows[name]['peak_rss_mb']} MB", flush=True)
        write(out, rows)


def _passed(args: argparse.Namespace) -> list[str]:
    return ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--eval-len", str(args.eval_len),
            "--threads", str(args.threads), "--out", args.out, *(["--quiet"] if args.quiet else []),
            *(["--ids", args.ids] if args.ids else [])]


def write(out: Path, new_rows: dict[str, dict]) -> None:
    """Merge rows by name into results.json / results.csv and redraw the plot."""
    from sparse_ops.timing import environment

    path = out / "results.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = {r["name"]: r for r in old} | new_rows
    path.write_text(json.dumps({"environment": environment(), "rows": list(rows.values())}, indent=1))
    keys = sorted({k for r in rows.values() for k in r})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows.values())
    plot(out, list(rows.values()))


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [r["name"] for r in rows]
    colors = ["tab:gray" if r["name"] == "dense" else "tab:orange" if r.get("method") == "reference"
              else "tab:blue" for r in rows]
    ax.bar(names, [r["perplexity"] for r in rows], color=colors)
    dense = next((r["perplexity"] for r in rows if r["name"] == "dense"), None)
    if dense:
        ax.axhline(dense, color="k", lw=0.8, ls="--", label=f"dense {dense:.1f}")
        ax.legend()
    ax.set_yscale("log")
    ax.set_ylabel("perplexity on lee.cor (log)")
    ax.set_title("SmolLM2-135M one-shot pruning (blue: ours, orange: llm-compressor)")
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
