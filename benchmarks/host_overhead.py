"""Our Python per GPU product, before Triton's own launcher: what a decode step pays on the host for each sparse
matmul, measured without a GPU.

The registry's CUDA kernels (``cuda.csr``: the tiled-bitmap kernel; ``cuda.2:4``) are called as a layer calls
them, ``kernel.matmul(state, x, None, variant=v)``, on CPU tensors with ``TRITON_INTERPRET=1`` (which lets the
checks accept CPU tensors) and each kernel launch replaced by a counter (Triton's ``InterpretedFunction.run``,
where a GPU would enter ``JITFunction.run``): the time is everything before the launcher: our checks, the split
choice, the output's allocation, the split-K scratch, the arguments, and the autotuner's per-call work where a
call goes through it (with the interpreter's single config: its cheapest path). ``launches`` counts kernel
launches per call. Not included, so these are lower bounds of a GPU call's host time: Triton's launcher, the
CUDA stream and device queries a GPU adds (``workspace``'s stream lookup, ``on_device``), and ``SparseLinear``'s
own forward (flatten, route).

Paired A/B: each round runs ``python benchmarks/host_overhead.py --worker`` with checkout A on ``PYTHONPATH``,
then B (the order alternating), one thread each; the figure is the median over rounds of each worker's median
microseconds per call (7 samples of 2,000 calls, after 200 warm-up calls).

Run: ``python -m benchmarks.host_overhead --a /path/to/old-checkout --b . [--rounds 5]
[--out benchmarks/results/host_overhead]`` (``git worktree add /tmp/old REV`` makes the old checkout); without
``--a`` it measures this checkout alone. ``--quick``: fewer calls, one round.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

OUT = "benchmarks/results/host_overhead"
SHAPE = (4096, 4096)  # Llama-7B's attention projections (out, in)


def worker(quick: bool) -> dict[str, float]:
    """Median microseconds per call of this process's checkout, per ``format/tokens/variant``."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from triton.runtime import interpreter

    from sparse_ops.dispatch import kernel_for
    from sparse_ops.formats import CSR, TwoFour

    launches = []
    interpreter.InterpretedFunction.run = lambda self, *a, **k: launches.append(1)  # counted, not run
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = torch.randn(*SHAPE, dtype=torch.float16)
    weights = {"csr": CSR.from_dense(dense * (torch.rand(*SHAPE) > 0.9)),
               "2:4": TwoFour.from_dense(dense.reshape(-1, 4).mul(torch.tensor([1.0, 1.0, 0.0, 0.0]).half())
                                         .reshape(SHAPE))}
    calls, samples = (200, 3) if quick else (2000, 7)
    found = {}
    for fmt, weight in weights.items():
        kernel = kernel_for(fmt, "cuda")
        state = kernel.prepare(weight)
        for tokens in (1, 16):
            x = torch.randn(tokens, SHAPE[1], dtype=torch.float16)
            for variant in kernel.variants(tokens):
                call = lambda: kernel.matmul(state, x, None, variant=variant)  # noqa: E731
                for _ in range(200):
                    call()
                launches.clear()
                times = []
                for _ in range(samples):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        call()
                    times.append((time.perf_counter() - t0) / calls * 1e6)
                found[f"{fmt}/{tokens}/{variant}"] = statistics.median(times)
                found[f"{fmt}/{tokens}/{variant} launches"] = len(launches) / (calls * samples)
    return found


def _git(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _plot(out: Path, result: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in result["b"] if not n.endswith("launches")]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.4 if result.get("a") else 0.8
    xs = range(len(names))
    if result.get("a"):
        ax.bar([i - 0.2 for i in xs], [result["a"][n] for n in names], width, label=f"A {result['a_commit']}")
    ax.bar([i + (0.2 if result.get("a") else 0) for i in xs], [result["b"][n] for n in names], width,
           label=f"B {result['b_commit']}")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("us per call (our Python)")
    env = result["environment"]
    ax.set_title(f"Host time per GPU sparse matmul before Triton's launcher (launch stubbed)\n"
                 f"{env['cpu']} ({env['kernel_isa']} build), 1 thread, triton {env['triton']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "host_overhead.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    import triton

    from benchmarks.code_ab import ab_parser, paired_rounds
    from sparse_ops.timing import environment

    a = ab_parser(__doc__, OUT).parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.quick)))
        return
    rounds = 1 if a.quick else a.rounds
    found = paired_rounds(__file__, a.a, a.b.resolve(), rounds, a.quick, OMP_NUM_THREADS="1")
    runs = {side: [got[side] for got in found if side in got] for side in ("a", "b")}
    median = {side: {k: round(statistics.median(run[k] for run in rs), 2) for k in rs[0]} for side, rs in runs.items()
              if rs}
    result = {"environment": {**environment(), "threads": 1, "triton": triton.__version__}, "rounds": rounds,
              "shape": list(SHAPE), "unit": "us per call", "a_commit": _git(a.a) if a.a else None,
              "b_commit": _git(a.b), **median, "rounds_data": runs}
    if "a" in median:
        result["b_over_a"] = {k: round(median["b"][k] / median["a"][k], 3) for k in median["b"] if k in median["a"]}
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = a.out / "host_overhead.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(a.out / "host_overhead.json")
    png = _plot(a.out, result)
    print(json.dumps({k: result[k] for k in ("b", "b_over_a") if k in result}, indent=1))
    print(f"wrote {a.out / 'host_overhead.json'}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
