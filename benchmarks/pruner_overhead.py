"""Cost of `Pruner.step()` on an update step, on a BERT-base-shaped model (about 110M parameters).

For each (criterion, scope): seconds per mask update (median and spread over several updates), persistent
extra memory per parameter (masks, scores), and the peak extra resident memory during an update.

    python -m benchmarks.pruner_overhead --out benchmarks/results/pruner_overhead [--quick]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import threading
import time

import torch

from prune import LinearRamp, Pruner
from sparse_ops.timing import environment


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_during(fn) -> tuple[float, int]:
    """Run ``fn``; return its wall time and the peak resident memory above the level before it started."""
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    done.set()
    th.join()
    return dt, max(peak[0], _rss_bytes()) - base


def bert_base(layers: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(num_hidden_layers=layers))  # hidden 768, FFN 3072, 12 heads: BERT-base


def measure(criterion: str, scope: str, layers: int, updates: int) -> dict[str, object]:
    model = bert_base(layers)
    n_params = sum(p.numel() for p in model.parameters())
    schedule = LinearRamp(0.0, 0.9, begin_step=1, end_step=10_000, every=1)  # every step is an update
    pruner = Pruner(model, sparsity=schedule, criterion=criterion, scope=scope)
    pruned = sum(t.module.weight.numel() for t in pruner.targets)
    if criterion == "movement":  # one backward fills the scores through the pruner's own hook
        model(input_ids=torch.randint(0, 1000, (1, 16))).last_hidden_state.sum().backward()
        model.zero_grad(set_to_none=True)
    state = pruner.state_dict()
    extra = sum(t.nbytes for group in ("masks", "scores") for t in state.get(group, {}).values())
    times, peaks = [], []
    for _ in range(updates):
        dt, peak = peak_rss_during(pruner.step)
        times.append(dt)
        peaks.append(peak)
    return {
        "criterion": criterion, "scope": scope, "model_params": n_params, "pruned_params": pruned,
        "target_sparsity": round(pruner.target_sparsity, 4), "update_s_median": statistics.median(times),
        "update_s_min": min(times), "update_s_max": max(times),
        "extra_bytes_per_param": extra / pruned, "peak_update_bytes_per_param": max(peaks) / pruned,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/pruner_overhead")
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 12, 2 updates")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers, updates = (2, 2) if args.quick else (12, 5)
    rows = []
    for criterion in ("magnitude", "movement"):
        for scope in ("layer", "global"):
            rows.append(measure(criterion, scope, layers, updates))
            r = rows[-1]
            print(f"{criterion:9s} {scope:6s} update {r['update_s_median']:.3f} s "
                  f"(min {r['update_s_min']:.3f}, max {r['update_s_max']:.3f}); "
                  f"extra {r['extra_bytes_per_param']:.2f} B/param, peak during update "
                  f"{r['peak_update_bytes_per_param']:.2f} B/param", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pruner_overhead.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "environment.json"), "w") as f:
        json.dump({**environment(), "bert_layers": layers, "updates_per_row": updates}, f, indent=2)
    print(f"wrote {args.out}/pruner_overhead.csv and environment.json")


if __name__ == "__main__":
    main()
