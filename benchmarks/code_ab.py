"""Paired A/B of two checkouts of this library on the paths a refactor must not slow: a ``SparseLinear`` forward
(planned as users run it) and a one-shot SparseGPT run, timed in fresh processes, A and B in turn.

Each round runs ``python benchmarks/code_ab.py --worker`` once with the first checkout on ``PYTHONPATH`` and once
with the second (order alternating), so machine drift falls on both; the worker prints its medians as JSON. The
result holds every round's figures, the median ratio B / A per figure, and the machine.

Run: ``python -m benchmarks.code_ab --a /path/to/old-checkout --b . [--rounds 5] [--out benchmarks/results/code_ab]``
(``git worktree add /tmp/old REV`` makes the old checkout). ``--quick``: tiny shapes, one round (a smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = "benchmarks/results/code_ab"


def worker(quick: bool) -> dict[str, float]:
    """Medians (seconds) of this process's checkout: forward at 1 and 64 tokens, and one oneshot call."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)
    from prune import oneshot
    from sparse_ops.linear import SparseLinear

    out_f, in_f = (64, 32) if quick else (1536, 384)
    dense = nn.Linear(in_f, out_f)
    with torch.no_grad():
        dense.weight.mul_(torch.rand(out_f, in_f) > 0.9)
    layer = SparseLinear.from_dense(dense, format="csr")
    figures = {}
    for tokens in (1, 64):
        x = torch.randn(tokens, in_f)
        with torch.no_grad():
            for _ in range(20):
                layer(x)
            samples = []
            for _ in range(5 if quick else 15):
                t0 = time.perf_counter()
                for _ in range(10 if quick else 200):
                    layer(x)
                samples.append((time.perf_counter() - t0) / (10 if quick else 200))
        figures[f"sparse_linear_{tokens}_tokens_s"] = statistics.median(samples)
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32 if quick else 256, intermediate_size=64 if quick
                                   else 704, num_hidden_layers=2 if quick else 4, num_attention_heads=4,
                                   num_key_value_heads=2)
    ids = torch.randint(0, 256, (8 if quick else 32, 32 if quick else 128), generator=torch.Generator().manual_seed(1))
    samples = []
    for _ in range(1 if quick else 3):
        model = transformers.LlamaForCausalLM(cfg).eval()
        t0 = time.perf_counter()
        oneshot(model, ids, method="sparsegpt", sparsity=0.5, progress=False)
        samples.append(time.perf_counter() - t0)
    figures["oneshot_sparsegpt_s"] = statistics.median(samples)
    return figures


def run_worker(script: str, checkout: Path, quick: bool, **env: str) -> dict[str, float]:
    """One measurement of a paired A/B: ``python script --worker [--quick]`` in a fresh process with
    ``checkout`` first on ``PYTHONPATH`` (and ``env`` set), its last line of output read as JSON."""
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve()), **env}
    done = subprocess.run([sys.executable, str(Path(script).resolve()), "--worker", *(["--quick"] if quick else [])],
                          capture_output=True, text=True, env=env, cwd=checkout, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ab_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The command line of a paired A/B script: ``--a`` / ``--b`` checkouts, ``--rounds``, ``--out``,
    ``--quick`` and the hidden ``--worker`` (one measurement, in a fresh process)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--a", type=Path, help="the checkout before (A)")
    p.add_argument("--b", type=Path, default=Path("."), help="the checkout after (B)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def paired_rounds(script: str, a: Path | None, b: Path, rounds: int, quick: bool,
                  **env: str) -> list[dict[str, dict[str, float]]]:
    """Per round, ``{"a": figures, "b": figures}`` from ``run_worker``, A and B in turn, the order alternating
    round by round (so machine drift falls on both); without ``a``, B alone."""
    found = []
    for r in range(rounds):
        sides = [("a", a), ("b", b)] if r % 2 == 0 else [("b", b), ("a", a)]
        got = {name: run_worker(script, path, quick, **env) for name, path in sides if path is not None}
        found.append(got)
        print(f"round {r + 1}/{rounds}: " + "; ".join(f"{name} " + ", ".join(f"{k} {v:.4g}" for k, v in figs.items())
                                                    for name, figs in got.items()), flush=True)
    return found


def main(argv: list[str] | None = None) -> None:
    args = ab_parser(__doc__, OUT).parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.quick)))
        return
    from sparse_ops.timing import environment

    rounds = paired_rounds(__file__, args.a, args.b, 1 if args.quick else args.rounds, args.quick)
    ratios = {k: statistics.median(x["b"][k] / x["a"][k] for x in rounds) for k in rounds[0]["a"]}
    spread = {k: [min(x["b"][k] / x["a"][k] for x in rounds), max(x["b"][k] / x["a"][k] for x in rounds)]
              for k in ratios}
    result = {"environment": {**environment(), "threads": 1}, "a": str(args.a), "b": str(args.b),
              "rounds": rounds, "median_ratio_b_over_a": ratios, "ratio_range": spread}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "code_ab.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"median_ratio_b_over_a": ratios, "ratio_range": spread}, indent=1))


if __name__ == "__main__":
    main()
