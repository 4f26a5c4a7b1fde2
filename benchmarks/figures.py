"""Render the results tables of benchmarks/results/ into README.md and docs/, and check every quoted figure.

    python -m benchmarks.figures            # rewrite every generated region in place
    python -m benchmarks.figures --check    # exit 1 on a stale region, an unsourced figure or a source
                                            # that does not name its hardware (tests/test_docs.py runs this)

Three markers, HTML comments that neither GitHub nor MkDocs shows:

    <!-- figures:begin NAME -->          a region this script writes: the table TABLES[NAME] renders from its
    ...                                  sources, with a line naming each source and its hardware; edit the
    <!-- figures:end NAME -->            renderer, never the region

    <!-- source: PATH [PATH ...] -->     anywhere in a block (the lines between two blank lines): every figure
                                         of that block must be a number in one of those files; PATH#TEXT
                                         narrows a file to its rows holding TEXT (a CSV's rows, a JSON's
                                         "rows"), so that a figure must come from the rows it speaks of

    <!-- not-measured: WHY -->           anywhere in a block: its figures are arithmetic or published
                                         elsewhere, not measurements of ours (say which in WHY)

A figure is a number outside code spans: a decimal, a percentage, a ratio (``2.87x``) or an integer from 10
up (bare integers under 10 are counts: batch 1, 8 experts). It is "in" a file when one of the file's numbers
rounds to it at the figure's precision (``76.94`` matches 76.936; ``90%`` matches 0.9; ``89.6 ms`` matches
0.0896 s). Outside sourced and not-measured blocks a ratio, a decimal with two places or more, or a time in ms
is an error.

A source names its hardware when its environment (the JSON's ``environment``, or for a CSV, text or Markdown
file the JSON beside it) has ``cpu``, ``kernel_isa`` and ``threads`` or ``torch_threads``. Only the standard
library is used.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
NOT_DOCS = ("docs/demo-report/",)  # results written by `prune demo`, kept under docs/: a source, not a page

BEGIN = re.compile(r"<!--\s*figures:begin\s+(\S+)\s*-->")
END = re.compile(r"<!--\s*figures:end\s+(\S+)\s*-->")
SOURCE = re.compile(r"<!--\s*source:\s*(.+?)\s*-->")
NOT_MEASURED = re.compile(r"<!--\s*not-measured:.*?-->")
COMMENT = re.compile(r"<!--.*?-->")
# a number not glued to a word or another number: 76.94, 1,193,610, 90%, 2.87x; not L6, x86, 4096x4096, 2.14.1
NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(%|x)?(?![\w]|\.\d)")
FENCE = re.compile(r"^\s*(```|~~~)")


# ---------------------------------------------------------------------------------------------- sources
@cache
def load(path: str) -> object:
    """A results file: JSON as parsed, CSV as a list of dicts (every value a string), other files as text."""
    p = ROOT / path
    if p.suffix == ".json":
        return json.loads(p.read_text())
    if p.suffix == ".csv":
        with p.open(newline="") as f:
            return list(csv.DictReader(f))
    return p.read_text()


def _numbers_in_text(text: str) -> Iterator[float]:
    for m in NUMBER.finditer(text):
        yield float(m.group(1).replace(",", "") + (m.group(2) or ""))
    for m in re.finditer(r"-?\d+\.?\d*(?:[eE][-+]?\d+)?", text):  # also every plain float, 1e-4 included
        try:
            yield float(m.group(0))
        except ValueError:
            pass


def _walk(obj: object) -> Iterator[float]:
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        if math.isfinite(obj):
            yield float(obj)
    elif isinstance(obj, str):
        yield from _numbers_in_text(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _numbers_in_text(str(key))
            yield from _walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk(value)


@cache
def source_numbers(source: str) -> tuple[float, ...]:
    """Every number in a source: `PATH`, or `PATH#TEXT` for only the rows (CSV rows, or the dicts of a JSON's
    `rows`) with a value containing TEXT, so that a figure must come from the rows it speaks of."""
    path, _, text = source.partition("#")
    data = load(path)
    if text:
        rows = data if isinstance(data, list) else data.get("rows", []) if isinstance(data, dict) else []
        data = [row for row in rows if isinstance(row, dict) and any(text in str(v) for v in row.values())]
    return tuple(sorted(set(_walk(data))))


def _environment_file(path: str) -> str | None:
    """The JSON that states the hardware of `path`: itself, or the JSON beside a CSV / text file."""
    p = ROOT / path
    if p.suffix == ".json":
        return path
    for name in (p.stem + ".json", "results.json", "environment.json"):
        if (p.parent / name).is_file():
            return str((p.parent / name).relative_to(ROOT))
    found = sorted(p.parent.glob("*.json"))
    return str(found[0].relative_to(ROOT)) if len(found) == 1 else None


def environment(path: str) -> dict:
    """The `environment` block stating where `path` was measured ({} when there is none)."""
    env_path = _environment_file(path)
    if env_path is None:
        return {}
    data = load(env_path)
    if isinstance(data, dict) and isinstance(data.get("environment"), dict):
        return data["environment"]
    return data if isinstance(data, dict) and "cpu" in data else {}


def missing_hardware(path: str) -> list[str]:
    """Which of cpu, kernel_isa, threads the source's environment does not name."""
    env = environment(path)
    missing = [key for key in ("cpu", "kernel_isa") if not env.get(key)]
    if env.get("threads") is None and env.get("torch_threads") is None:
        missing.append("threads")
    return missing


def hardware(path: str) -> str:
    """One line naming a source and where it was measured, as the file states it."""
    env = environment(path)
    threads = env.get("threads", env.get("torch_threads"))
    l2 = (env.get("kernel_caches_bytes") or {}).get("L2")
    parts = [f"{env.get('cpu', '?')}" + (f" (`L2 {l2 // 1024} KiB`)" if l2 else ""),
             f"{env.get('cores', '?')} cores", f"`{env.get('kernel_isa')}` build", f"{threads} threads",
             f"torch `{env.get('torch', '?')}`", f"`{str(env.get('date', '?'))[:10]}`"]
    return f"`{path}`: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------- rendering
def table(header: list[str], rows: Iterable[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def sources_line(*paths: str) -> list[str]:
    return ["", *(f"{'Source:' if i == 0 else 'and'} {hardware(p)}." for i, p in enumerate(paths))]


def f(value: object, digits: int = 2, suffix: str = "") -> str:
    """A number as the tables show it; '-' for missing."""
    if value in (None, ""):
        return "-"
    return f"{float(value):.{digits}f}{suffix}"


def rows_of(path: str) -> list[dict]:
    data = load(path)
    return data["rows"] if isinstance(data, dict) else data


@dataclass(frozen=True)
class Table:
    sources: tuple[str, ...]
    render: Callable[[], list[str]]


TABLES: dict[str, Table] = {}


def renders(name: str, *sources: str) -> Callable:
    def register(fn: Callable[[], list[str]]) -> Callable[[], list[str]]:
        TABLES[name] = Table(tuple(sources), lambda: fn() + sources_line(*sources))
        return fn
    return register


# -- the quality-versus-speed frontier (README headline and docs/quality.md)
FRONTIER = f"{RESULTS}/frontier/frontier.json"
FRONTIER_NAMES = {"dense fp32": "dense fp32, PyTorch", "dense fp32 ours": "dense fp32, ours",
                  "dense bf16": "dense bf16, PyTorch", "dense int8": "dense int8, ours",
                  "ort int8": "ONNX Runtime int8", "ort int8 rr": "ONNX Runtime int8, `reduce_range`"}
FRONTIER_HEADER = ["all-MiniLM-L6-v2, sequence 128", "cosine to dense", "batch 1 ms (vs ORT int8)",
                   "batch 8 ms (vs ORT int8)", "on the front at batch"]


def _frontier_rows(front_only: bool) -> list[list[object]]:
    by_variant: dict[str, dict[int, dict]] = {}
    for row in rows_of(FRONTIER):
        by_variant.setdefault(row["variant"], {})[row["batch"]] = row
    out = []
    for variant, batches in sorted(by_variant.items(), key=lambda kv: -kv[1][1]["cosine"]):
        one, eight = batches[1], batches[8]
        if front_only and not (one["on_front"] or eight["on_front"]) and variant != "dense fp32":
            continue
        front = "/".join(name for name, r in (("1", one), ("8", eight)) if r["on_front"]) or "-"
        out.append([FRONTIER_NAMES.get(variant, variant), f(one["cosine"], 4), *(f"{r['seconds'] * 1e3:.1f} ({r['vs_ort_int8']:.2f}x)"
                                                     for r in (one, eight)), front])
    return out


@renders("frontier-headline", FRONTIER)
def _frontier_headline() -> list[str]:
    return table(FRONTIER_HEADER, _frontier_rows(front_only=True))


@renders("frontier", FRONTIER)
def _frontier() -> list[str]:
    answers = [f"- {a}" for a in load(FRONTIER)["answers"]]
    rows = _frontier_rows(front_only=False)
    return [*table(FRONTIER_HEADER, rows), "", "The run's own answers:", "", *answers]


# -- pruning while training: which criterion (docs/quality.md)
QUALITY = f"{RESULTS}/quality/quality.json"


def _quality(budget: int) -> list[str]:
    cells: dict[str, dict[float, dict]] = {}  # method -> sparsity -> row
    for row in rows_of(QUALITY):
        if row["budget"] == budget:
            label = row["method"] + (f" lr={row['lr']:g}" if row["lr"] != 1e-4 and row["steps"] else "")
            cells.setdefault(label, {})[row["sparsity"]] = row
    sparsities = sorted({s for by in cells.values() for s in by})
    order = sorted(cells, key=lambda m: (-cells[m].get(sparsities[0], {}).get("cosine", -1.0), m))
    rows = []
    for method in order:
        by = cells[method]
        machines = ", ".join(sorted({f"{r['cpu']} ({r['kernel_isa']})" for r in by.values()}))
        rows.append([method, *(f(by[s]["cosine"], 4) if s in by else "-" for s in sparsities), machines])
    return table([f"{budget} steps: cosine at sparsity", *map(str, sparsities), "measured on"], rows)


@renders("quality-300", QUALITY)
def _quality_300() -> list[str]:
    return _quality(300)


@renders("quality-1000", QUALITY)
def _quality_1000() -> list[str]:
    return _quality(1000)


SCRATCH = f"{RESULTS}/scratch_quality/scratch_quality.json"


@renders("scratch-quality", SCRATCH)
def _scratch() -> list[str]:
    acc: dict[str, dict[float, list[float]]] = {}  # criterion -> sparsity -> accuracy per seed
    for row in rows_of(SCRATCH):
        acc.setdefault(row["criterion"], {}).setdefault(row["sparsity"], []).append(row["accuracy"])
    sparsities = sorted({s for by in acc.values() for s in by if s > 0})

    def cell(v: list[float] | None) -> str:
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} ({len(v)} seeds)" if v else ""

    rows = [[crit, *(cell(acc[crit].get(s)) for s in sparsities)] for crit in sorted(acc) if crit != "dense"]
    if "dense" in acc:
        rows.append(["dense (0%)", cell(acc["dense"][0.0]), *[""] * (len(sparsities) - 1)])
    return table(["accuracy % (mean ± sd over seeds)", *map(str, sparsities)], rows)


DOWNSTREAM = f"{RESULTS}/downstream/downstream.json"


@renders("downstream", DOWNSTREAM)
def _downstream() -> list[str]:
    acc: dict[tuple[float, str], list[float]] = {}  # (sparsity, mode) -> accuracy % per seed
    teacher = set()
    for row in rows_of(DOWNSTREAM):
        acc.setdefault((row["sparsity"], row["mode"]), []).append(row["accuracy"] * 100)
        teacher.add(row["teacher_accuracy"] * 100)

    def cell(values: list[float] | None) -> str:
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.2f} (1 seed)"
        return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f}, {len(values)} seeds)"

    rows = [["0 (dense teacher)", " / ".join(f"{t:.2f}" for t in sorted(teacher)), ""]]
    for s in sorted({s for s, _ in acc}):
        rows.append([s, cell(acc.get((s, "task"))), cell(acc.get((s, "distill")))])
    return table(["sparsity", "task loss: test accuracy %", "with distillation"], rows)


# -- one-shot pruning of an LLM (docs/quality.md)
ONESHOT = f"{RESULTS}/oneshot_quality/calib-32x512/results.json"
ONESHOT_128 = f"{RESULTS}/oneshot_quality/results.json"


def _by_name(path: str) -> dict[str, dict]:
    return {row["name"]: row for row in rows_of(path)}


def _time(row: dict) -> str:
    """Seconds with the threads the row records (the oneshot rows do not all record them)."""
    threads = row.get("threads")
    return f"{row['seconds']:.0f} s ({threads if threads not in (None, '') else 'not recorded'})"


@renders("oneshot-vs-llmcompressor", ONESHOT)
def _oneshot_vs() -> list[str]:
    rows = _by_name(ONESHOT)
    pairs = [("SparseGPT 50%", "sparsegpt-50", "llmcompressor-sparsegpt-unstructured"),
             ("Wanda 50%", "wanda-50", "llmcompressor-wanda-unstructured"),
             ("SparseGPT 2:4", "sparsegpt-2:4", "llmcompressor-sparsegpt-2:4"),
             ("Wanda 2:4", "wanda-2:4", "llmcompressor-wanda-2:4")]
    out = [["dense", f(rows["dense"]["perplexity"]), "", "", ""]]
    for label, ours, theirs in pairs:
        a, b = rows[ours], rows[theirs]
        out.append([label, f(a["perplexity"]), _time(a), f(b["perplexity"]), _time(b)])
    return table(["32 x 512 calibration tokens", "ours: perplexity", "ours: time (threads)",
                  "llm-compressor: perplexity", "llm-compressor: time (threads)"], out)


@renders("oneshot-more", ONESHOT)
def _oneshot_more() -> list[str]:
    rows = _by_name(ONESHOT)
    names = [("magnitude 50%, per layer", "magnitude-layer-50"),
             ("magnitude 50%, per row", "magnitude-row-50"), ("magnitude 2:4", "magnitude-2:4"),
             ("Wanda 70%", "wanda-70"),
             ("Wanda 70%, OWL", "wanda-70-owl"), ("SparseGPT 70%", "sparsegpt-70"),
             ("SparseGPT 70%, OWL", "sparsegpt-70-owl")]
    return table(["32 x 512 calibration tokens", "perplexity", "mean relative error", "time (threads)"],
                 [[label, f(rows[n]["perplexity"]), f(rows[n]["mean_error"], 4), _time(rows[n])]
                  for label, n in names])


@renders("oneshot-int8", ONESHOT)
def _oneshot_int8() -> list[str]:
    p = {name: f(row["perplexity"]) for name, row in _by_name(ONESHOT).items()}
    return table(["model", "fp32", "int8"], [
        ["dense (int8: round to nearest / GPTQ, i.e. SparseGPT at 0%)", p["dense"],
         f"{p['int8-rtn']} / {p['int8-gptq']}"],
        ["SparseGPT 50% (int8: joint / pruned then rounded)", p["sparsegpt-50"],
         f"{p['sparsegpt-50-int8']} / {p['sparsegpt-50+rtn8']}"],
        ["Wanda 50% (int8: rounded after)", p["wanda-50"], p["wanda-50-int8"]]])


@renders("oneshot-128", ONESHOT_128)
def _oneshot_128() -> list[str]:
    return table(["128 x 512 calibration tokens", "perplexity", "time (threads)", "peak RSS MB"],
                 [[r["name"], f(r["perplexity"]), _time(r) if r.get("seconds") else "-", r["peak_rss_mb"]]
                  for r in rows_of(ONESHOT_128)])


RECOVERY = f"{RESULTS}/recovery/smollm2-50/results.json"


@renders("recovery", RECOVERY)
def _recovery() -> list[str]:
    return table(["SmolLM2-135M", "perplexity", "vs dense", "recovery steps", "seconds"],
                 [[r["model"], f(r["perplexity"]), f(r["vs_dense"], 2, "x"), r["steps"], f(r["seconds"], 0)]
                  for r in rows_of(RECOVERY)])


# -- the demo (docs/getting-started.md)
DEMO = "docs/demo-report/results.json"


@renders("demo", DEMO)
def _demo() -> list[str]:
    data = load(DEMO)
    batches = data["config"]["batches"]
    rows = []
    for run in data["runs"]:
        lat = {int(b): v for b, v in run["latency"].items()}
        rows.append([run["run"], run["deployed_as"], f(run["accuracy"] * 100), f(run["sparsity"] * 100, 1),
                     f"{run['params_active']:,}", f(run["file_deployed_bytes"] / 1024, 1),
                     *(f"{lat[b]['deployed_ms']:.3f} ({lat[b]['speedup_vs_dense']:.2f}x)" for b in batches)])
    return table(["run", "deployed as", "accuracy %", "sparsity %", "active params", "shipped KB",
                  *(f"ms @ batch {b} (vs dense)" for b in batches)], rows)


# -- speed (docs/results/speed.md, docs/results/decode.md, docs/guides/families.md)
TOKENS = (1, 8, 64, 256)


def _tokens(t: int) -> str:
    return f"{t} token{'s' * (t > 1)}"


def _x(value: object) -> str:
    return f"{float(value):.2f}x"


def _matmul(path: str) -> dict[tuple[str, float, str, int], dict]:
    return {(r["shape"], float(r["sparsity"]), r["candidate"], int(r["batch"])): r for r in rows_of(path)}


MATMUL_512, MATMUL_2 = f"{RESULTS}/matmul-avx512/matmul.csv", f"{RESULTS}/matmul-avx2/matmul.csv"
MATMUL_LAYERS = {"csr": "our `csr` (pinned)", "auto": "default (`auto`, the plan)",
                 "torch_csr_i32": "torch CSR int32", "2:4": "our `2:4`"}


@renders("matmul-builds", MATMUL_512, MATMUL_2)
def _matmul_builds() -> list[str]:
    a, b = _matmul(MATMUL_512), _matmul(MATMUL_2)
    rows = []
    for shape in ("4096->4096", "4096->11008"):
        n_in, n_out = shape.split("->")
        for sparsity in (0.9, 0.7, 0.5):
            for cand in ("csr", "2:4") if sparsity == 0.5 else ("csr", "auto", "torch_csr_i32"):
                cells = (f"{_x(a[shape, sparsity, cand, t]['speedup'])} / "
                         f"{_x(b[shape, sparsity, cand, t]['speedup'])}" for t in TOKENS)
                rows.append([f"{n_out}x{n_in}", sparsity, MATMUL_LAYERS[cand], *cells])
    return table(["weight", "sparsity", "layer", *(f"{_tokens(t)}: avx512 / avx2" for t in TOKENS)], rows)


MATMUL_INT8, MATMUL_IN8 = f"{RESULTS}/matmul-int8/matmul.csv", f"{RESULTS}/matmul-int8-in8/matmul.csv"


def _matmul_pivot(path: str, candidates: list[str]) -> list[str]:
    m = _matmul(path)
    keys = sorted({(s, t) for (_, s, _, t) in m})
    return table(["sparsity", "tokens", *candidates],
                 [[s, t, *(_x(m["4096->4096", s, c, t]["speedup"]) for c in candidates)] for s, t in keys])


@renders("matmul-int8", MATMUL_INT8)
def _matmul_int8() -> list[str]:
    return _matmul_pivot(MATMUL_INT8, ["csr", "dense-int8", "csr-int8", "bitmap-int8"])


@renders("matmul-int8-in8", MATMUL_IN8)
def _matmul_in8() -> list[str]:
    return _matmul_pivot(MATMUL_IN8, ["dense-int8", "dense-int8+in8", "csr-int8", "csr-int8+in8",
                                      "bitmap-int8", "bitmap-int8+in8"])


BERT = {b: f"{RESULTS}/bert_e2e/{b}/bert_e2e.csv" for b in ("avx512", "avx2", "minilm-avx512")}
BERT_MODELS = {"sparse": "default (`fuse=True`)", "sparse_ours": "pinned to ours",
               "sparse_torch": "torch's CSR", "dense_fast_attention": "dense + our attention"}


@renders("bert-e2e", *BERT.values())
def _bert() -> list[str]:
    def cell(runs: list[float]) -> str:  # the median of the runs, their range
        return f"{statistics.median(runs):.2f}x ({min(runs):.2f}-{max(runs):.2f})"

    rows = []
    for build, path in BERT.items():
        runs: dict[tuple[str, int], list[float]] = {}
        for r in rows_of(path):
            runs.setdefault((r["candidate"], int(r["batch"])), []).append(float(r["speedup"]))
        rows += [[build, label, cell(runs[cand, 1]), cell(runs[cand, 8])]
                 for cand, label in BERT_MODELS.items()]
    return table(["folder", "model as run", "batch 1 vs dense (range over runs)", "batch 8 vs dense"], rows)


ATTN = {b: f"{RESULTS}/attention/{b}/attention.csv" for b in ("avx512", "avx2")}


@renders("attention", *ATTN.values())
def _attention() -> list[str]:
    def key(r: dict) -> tuple[str, ...]:
        return r["model"], r["batch"], r["seq"], f"{r['heads']} x {r['head_dim']}", r["causal"]

    def cell(r: dict) -> str:
        return f"{_x(r['speedup'])} ({float(r['speedup_p10']):.2f}-{float(r['speedup_p90']):.2f})"

    by = {build: {key(r): r for r in rows_of(path)} for build, path in ATTN.items()}
    keys = [k for k in by["avx512"] if k in by["avx2"]]
    header = ["model", "batch", "keys", "heads x dim", "causal", "avx512 vs SDPA (p10-p90)", "avx2 vs SDPA"]
    return table(header, [[*k, *(cell(by[build][k]) for build in ATTN)] for k in keys])


CONTENTION = f"{RESULTS}/contention/contention.csv"
CONTENTION_OMP = f"{RESULTS}/contention/openmp-only/contention.csv"


@renders("contention", CONTENTION, CONTENTION_OMP)
def _contention() -> list[str]:
    def cells(path: str, loads: str, cand: str) -> list[str]:  # 4096x4096 CSR at 90%, per token count
        got = {int(r["tokens"]): r for r in rows_of(path)
               if (r["section"], r["kernel"], r["shape"], r["sparsity"], r["loads"], r["candidate"])
               == ("kernels", "csr", "4096x4096", "0.9", loads, cand)}
        return [f"{float(got[t]['median_s']) * 1e3:.2f} ({_x(got[t]['vs_dense'])})" if t in got else "-"
                for t in TOKENS]

    rows = [["quiet", "ours (default)", *cells(CONTENTION, "0", "ours")],
            ["one competitor", "ours, OpenMP only (`openmp-only/`, its own run)",
             *cells(CONTENTION_OMP, "1", "ours")],
            ["one competitor", "ours (default)", *cells(CONTENTION, "1", "ours")],
            ["one competitor", "ours, one thread", *cells(CONTENTION, "1", "ours_1t")],
            ["one competitor", "dense `F.linear`", *cells(CONTENTION, "1", "dense")],
            ["one competitor", "scipy CSR", *cells(CONTENTION, "1", "scipy")],
            ["one competitor", "torch CSR", *cells(CONTENTION, "1", "torch_csr")],
            ["two competitors", "ours (default)", *cells(CONTENTION, "2", "ours")],
            ["two competitors", "ours, one thread", *cells(CONTENTION, "2", "ours_1t")]]
    return table(["machine", "4096x4096 CSR at 90%", *(f"{_tokens(t)}: ms (vs dense)" for t in TOKENS)], rows)


@renders("contention-models", CONTENTION)
def _contention_models() -> list[str]:
    by = {(r["candidate"], r["section"], r["loads"]): r
          for r in rows_of(CONTENTION) if r["section"] != "kernels"}
    models = [("dense", "minilm", "all-MiniLM-L6-v2, dense"),
              ("sparse_90", "minilm", "all-MiniLM-L6-v2 at 90%, `fuse=True`"),
              ("sparse_90_1t", "minilm", "the same, one thread"),
              ("dense", "smollm2", "SmolLM2-135M, dense"),
              ("sparse_50", "smollm2", "SmolLM2-135M at 50%, 16 greedy tokens"),
              ("sparse_50_1t", "smollm2", "the same, one thread")]
    def cell(r: dict) -> str:
        return f"{float(r['median_s']) * 1e3:.1f} ms ({_x(r['vs_dense'])})"

    rows = [[label, *(cell(by[cand, section, n]) for n in "012")] for cand, section, label in models]
    return table(["model (sequence 128 / decode)", "quiet: time (vs dense)", "one competitor",
                  "two competitors"], rows)


INT8_E2E = f"{RESULTS}/int8_e2e/int8_e2e.csv"
INT8_MODELS = {"ort_int8": "ONNX Runtime int8 (dense)", "ort_int8_rr": "ONNX Runtime int8, `reduce_range`",
               "s0_int8": "ours, dense int8", "s0.5": "ours, 50% fp32", "s0.5_int8": "ours, 50% int8",
               "s0.7": "ours, 70% fp32", "s0.7_int8": "ours, 70% int8", "s0.9": "ours, 90% fp32",
               "s0.9_int8": "ours, 90% int8"}


@renders("int8-e2e", INT8_E2E)
def _int8_e2e() -> list[str]:
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in rows_of(INT8_E2E):
        runs.setdefault((r["candidate"], int(r["batch"])), []).append(r)
    rows = []
    for cand, label in INT8_MODELS.items():
        vs_ort = [statistics.median(float(r["ratio_to_ort_int8"]) for r in runs[cand, b]) for b in (1, 8)]
        first = runs[cand, 1][0]
        rows.append([label, *map(_x, vs_ort), f(first["cosine_to_dense"], 4),
                     f(first["cosine_to_fp32_twin"], 4)])
    return table(["all-MiniLM-L6-v2, sequence 128", "batch 1 vs ORT int8 (median of runs)",
                  "batch 8 vs ORT int8", "cosine to dense fp32", "cosine to its fp32 twin"], rows)


EAGER = {b: f"{RESULTS}/llm_eager/{b}/results.csv" for b in ("avx512", "avx2-int8")}


@renders("llm-eager", *EAGER.values())
def _eager() -> list[str]:
    rows = [[folder, r["candidate"], r["decode_tok_s"], f(r["decode_speedup"], 2, "x"),
             f(r["prefill_speedup"], 2, "x"), r["weights_mb"], r["same_tokens"] or "-"]
            for folder, path in EAGER.items() for r in rows_of(path)]
    return table(["folder", "model / runtime", "decode tokens/s", "decode vs dense", "prefill vs dense",
                  "weights MB", "same tokens"], rows)


DECODE = f"{RESULTS}/llm_decode/avx2"
DECODE_1B = ("1b-dense", "1b-2of4", "1b-50", "1b-int8", "1b-int8-a8", "1b")
VS_LLAMA = "vs llama.cpp F32 / Q8_0 / Q4_0"


def _vs_llama(r: dict) -> str:
    return " / ".join(_x(r[k]) for k in ("vs_llama_f32", "vs_llama_q8_0", "vs_llama_q4_0"))


@renders("llm-decode-smollm2", f"{DECODE}/smollm2/results.csv")
def _decode_smollm2() -> list[str]:
    return table(["SmolLM2-135M", "tokens/s (p10-p90)", VS_LLAMA, "perplexity", "layouts"],
                 [[r["candidate"], f"{r['decode_tok_s']} ({r['p10_tok_s']}-{r['p90_tok_s']})", _vs_llama(r),
                   f(r["perplexity"]), r["layouts"].replace("'", "") or "-"]
                  for r in rows_of(f"{DECODE}/smollm2/results.csv")])


@renders("llm-decode-1b", *(f"{DECODE}/{run}/results.csv" for run in DECODE_1B))
def _decode_1b() -> list[str]:
    return table(["run (one process each)", "model / runtime", "tokens/s", VS_LLAMA,
                  "same tokens as transformers"],
                 [[f"`{run}/`", r["candidate"], r["decode_tok_s"], _vs_llama(r), r["same_tokens"] or "-"]
                  for run in DECODE_1B for r in rows_of(f"{DECODE}/{run}/results.csv")])


FAMILIES = f"{RESULTS}/families/families.csv"


@renders("families", FAMILIES)
def _families() -> list[str]:
    by: dict[str, dict[int, dict]] = {}  # layer -> tokens -> row
    for r in rows_of(FAMILIES):
        by.setdefault(r["name"], {})[int(r["batch"])] = r
    tokens = sorted({t for v in by.values() for t in v})
    return table(["layer", "what runs", "active params", *(f"{_tokens(t)} vs dense" for t in tokens)],
                 [[f"`{name}`", v[tokens[0]]["note"], f"{int(v[tokens[0]]['active_params']):,}",
                   *(_x(v[t]["speedup"]) for t in tokens)] for name, v in by.items()])


# ---------------------------------------------------------------------------------------------- documents
def documents() -> list[Path]:
    """README.md and every Markdown page under docs/ (the demo's own report is a results file, not a page)."""
    docs = sorted((ROOT / "docs").rglob("*.md"))
    return [ROOT / "README.md", *(d for d in docs if not str(d.relative_to(ROOT)).startswith(NOT_DOCS))]


def regenerate(text: str, where: str = "") -> str:
    """The text with every generated region rendered again from its sources."""
    out, lines, i, fenced = [], text.split("\n"), 0, False
    while i < len(lines):
        out.append(lines[i])
        fenced ^= bool(FENCE.match(lines[i]))  # a marker shown in a code block is not one
        begin = None if fenced else BEGIN.search(lines[i])
        if begin:
            name = begin.group(1)
            if name not in TABLES:
                raise ValueError(f"{where}: unknown table {name!r}; known: {', '.join(sorted(TABLES))}")
            j = i + 1
            while j < len(lines) and not END.search(lines[j]):
                j += 1
            if j == len(lines) or END.search(lines[j]).group(1) != name:
                raise ValueError(f"{where}: <!-- figures:begin {name} --> has no matching figures:end")
            out += ["", *TABLES[name].render(), "", lines[j]]
            i = j
        i += 1
    return "\n".join(out)


def _without_fences(text: str) -> str:
    return re.sub(r"^\s*(```|~~~).*?^\s*\1", "", text, flags=re.MULTILINE | re.DOTALL)


def blocks(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each block outside code fences and generated regions."""
    current: list[str] = []
    start, fenced, generated = 0, False, False
    for n, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            fenced = not fenced
            line = ""
        elif BEGIN.search(line):
            generated = True
        elif END.search(line):
            generated, line = False, ""
        if fenced or generated or not line.strip():
            if current:
                yield start, "\n".join(current)
            current = []
            continue
        if not current:
            start = n
        current.append(line)
    if current:
        yield start, "\n".join(current)


def figures(block: str) -> Iterator[tuple[str, float, int, str]]:
    """(token, value, decimals, suffix) of each figure in a block's prose (code, comments, URLs removed)."""
    prose = COMMENT.sub(" ", block)
    prose = re.sub(r"`[^`]*`", " ", prose)
    prose = re.sub(r"\]\([^)]*\)", "]", prose)
    for m in NUMBER.finditer(prose):
        digits, fraction, suffix = m.group(1), m.group(2) or "", m.group(3) or ""
        value = float(digits.replace(",", "") + fraction)
        if not fraction and not suffix and value < 10:
            continue  # a count: batch 1, 8 experts, 2 threads
        tail = prose[m.end():m.end() + 4]
        yield m.group(0), value, max(len(fraction) - 1, 0), "ms" if tail.startswith(" ms") else suffix


def in_source(value: float, decimals: int, suffix: str, numbers: tuple[float, ...]) -> bool:
    """Whether one of `numbers` rounds to `value` at its precision (a percentage or ms scaled)."""
    tol = 0.5 * 10 ** -decimals + 1e-9
    scales = [1.0] + ([100.0] if suffix == "%" else []) + ([1000.0] if suffix == "ms" else [])
    return any(abs(v * scale - value) <= tol for scale in scales for v in numbers)


def unsourced(block: str) -> list[str]:
    """Figures that need a source: ratios, decimals of two places or more, times in ms."""
    return [tok for tok, _, decimals, suffix in figures(block) if suffix in ("x", "ms") or decimals >= 2]


def check_document(where: str, text: str) -> list[str]:
    """Problems in one document: a stale region, a figure not in its source, a source that does not exist or
    does not name its hardware, a figure with no source."""
    found: list[str] = []
    try:
        if regenerate(text, where) != text:
            found.append(f"{where}: generated tables are stale: run `python -m benchmarks.figures`")
    except ValueError as e:
        found.append(str(e))

    def usable(source: str, at: str) -> bool:
        path, _, text = source.partition("#")
        if not (ROOT / path).is_file():
            found.append(f"{at}: source {path} does not exist")
            return False
        if text and not source_numbers(source):
            found.append(f"{at}: no row of {path} holds {text!r}")
            return False
        missing = missing_hardware(path)
        if missing:
            found.append(f"{at}: source {path} does not name {', '.join(missing)} (its environment)")
        return True

    for name in BEGIN.findall(_without_fences(text)):
        for path in TABLES[name].sources if name in TABLES else ():
            usable(path, f"{where} (table {name})")
    for line, block in blocks(text):
        at = f"{where}:{line}"
        prose = re.sub(r"`[^`]*`", " ", block)  # a marker quoted in code is not one
        if NOT_MEASURED.search(prose):
            continue
        paths = [p for m in SOURCE.finditer(prose) for p in re.split(r"[\s,]+", m.group(1)) if p]
        if not paths:
            found += [f"{at}: figure {tok!r} has no <!-- source: ... --> in its block"
                      for tok in unsourced(block)]
            continue
        paths = [p for p in paths if usable(p, at)]
        numbers = tuple(sorted(set().union(*(source_numbers(p) for p in paths)))) if paths else ()
        for tok, value, decimals, suffix in figures(block):
            if not in_source(value, decimals, suffix, numbers):
                found.append(f"{at}: {tok!r} is in none of {', '.join(paths)}")
    return found


def problems() -> list[str]:
    """Everything `--check` reports, over README.md and docs/ (a source's problems once per document)."""
    found: list[str] = []
    for doc in documents():
        for problem in check_document(str(doc.relative_to(ROOT)), doc.read_text()):
            if problem not in found:
                found.append(problem)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="report problems and exit 1; change nothing")
    args = parser.parse_args(argv)
    if not args.check:
        for doc in documents():
            text = doc.read_text()
            new = regenerate(text, str(doc.relative_to(ROOT)))
            if new != text:
                doc.write_text(new)
                print(f"rendered {doc.relative_to(ROOT)}")
    found = problems()
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
