"""benchmarks/gpu_check.sh and benchmarks/gpu_decision.py without a GPU: both stop at once with exit 3 and one
clear line, writing nothing; the decision benchmark's case list, row arithmetic and files (from fake timings,
``--quick``) are well formed; the sweep line of the script is a valid `prune bench matmul` command.

CUDA_VISIBLE_DEVICES is emptied for the subprocesses, so these check the no-GPU path on any machine. No
assertion depends on how fast a kernel ran.
"""
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_decision as gd
from prune.cli import build_parser
from sparse_ops.bench.command import matmul_plan

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
NO_GPU_ENV = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}


def test_the_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_gpu_check_without_a_gpu_exits_3_at_once_writing_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False,
                          env={**NO_GPU_ENV, "OUT": str(out)})
    elapsed = time.monotonic() - t0
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU here") and "nothing measured" in lines[0]
    assert proc.stdout == ""
    assert list(out.iterdir()) == []
    assert elapsed < 20


def test_gpu_check_without_torch_says_so_too(tmp_path):
    """A python without torch (the machine's bare python3, say) is no GPU either: exit 3, not a traceback."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False,
                          env={**NO_GPU_ENV, "OUT": str(tmp_path / "out"), "PYTHON": str(fake)})
    assert proc.returncode == 3 and "no CUDA GPU here" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [[], ["--dry-run"]])
def test_gpu_decision_without_a_gpu_exits_3(tmp_path, flags):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_decision.py"), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=60, check=False, env=NO_GPU_ENV, cwd=ROOT)
    assert proc.returncode == gd.NO_GPU == 3
    assert proc.stderr.strip() == gd.NO_GPU_MESSAGE
    assert not out.exists()
    if flags:  # the dry run lists the cases first
        assert len(proc.stdout.splitlines()) == len(gd.cases())


def test_the_cases_put_the_decisive_ones_first():
    cases = gd.cases()
    assert len(cases) == len(set(cases)) == 3 * 4 * 2 * 2
    first = cases[0]
    assert (first.out, first.inp, first.dtype, first.tokens, first.pattern) == (4096, 4096, "fp16", 1, "50%")
    assert [c.dtype for c in cases[:24]] == ["fp16"] * 24 and [c.tokens for c in cases[:12]] == [1] * 12
    assert {(c.out, c.inp) for c in cases} == {(4096, 4096), (11008, 4096), (4096, 11008)}
    assert {c.format for c in cases if c.pattern == "2:4"} == {"2:4"}
    assert {c.format for c in cases if c.pattern != "2:4"} == {"csr"}
    assert sorted({c.sparsity for c in cases}) == [0.5, 0.7, 0.9]


def test_copies_exceed_twice_the_l2():
    l2 = 50 << 20
    for nbytes in (1 << 20, 5_452_595, 18 << 20, 32 << 20, 90 << 20):
        n = gd.copies_for(nbytes, l2)
        assert 2 <= n <= gd.MAX_COPIES
        assert n * nbytes >= 2 * l2 or n == gd.MAX_COPIES


def test_a_row_is_consistent_with_its_timings():
    case = gd.Case("llama-7b attn 4096x4096", 4096, 4096, "90%", "fp16", 1)
    dense = gd.Stats(20.0, 19.0, 22.0, 30.0, 4096 * 4096 * 2, 4, "graph")
    ours = gd.Stats(5.0, 4.5, 6.0, 25.0, 5_000_000, 20, "graph", 1e-3, "cuda.csr", "splitk")
    others = {"plain": dataclasses.replace(ours, us=8.0, variant="plain"),
              "gemv": dataclasses.replace(ours, us=4.0, variant="gemv")}
    row = gd.make_row(case, dense, ours, None, 3000.0, io_bytes=(4096 + 4096) * 2, variants=others)
    assert set(row) == set(gd.COLUMNS)
    assert row["variants_us"] == "gemv=4.00 plain=8.00 splitk=5.00"
    assert row["best_variant"] == "gemv" and row["best_variant_speedup"] == 5.0
    assert row["speedup"] == 4.0 and row["eager_speedup"] == 1.2
    assert row["anchor_us"] is None and row["anchor_speedup"] is None and row["anchor"] == "cusparse_csr_i32"
    assert row["limit"] == round(4096 * 4096 * 2 / 5_000_000, 3)
    assert row["ours_gbps"] == round((5_000_000 + 16384) / 5.0 / 1e3, 1)
    assert row["ours_of_copy"] == round(row["ours_gbps"] / 3000.0, 3)
    assert row["ours_kernel"] == "cuda.csr" and row["ours_variant"] == "splitk"


def test_quick_writes_well_formed_files(tmp_path):
    paths = gd.quick(tmp_path)
    names = sorted(p.name for p in paths)
    assert names[:2] == ["decision.csv", "decision.json"]
    assert len(list(tmp_path.iterdir())) == len(paths) <= 3  # nothing else: the device tool brings back 8 files
    doc = json.loads((tmp_path / "decision.json").read_text())
    assert {"gpu", "driver", "torch", "triton", "status", "copy_gbps"} <= set(doc["header"])
    assert doc["columns"] == list(gd.COLUMNS)
    rows = doc["rows"]
    assert len(rows) == len(gd.cases())
    header, csv_rows = gd.read_csv(tmp_path / "decision.csv")
    assert header["gpu"] == doc["header"]["gpu"] and header["status"] == "quick"
    assert len(csv_rows) == len(rows) and list(csv_rows[0]) == list(gd.COLUMNS)
    for row, text in zip(rows, csv_rows):
        assert text["shape"] == row["shape"] and float(text["speedup"]) == row["speedup"]
        assert math.isclose(row["speedup"], row["dense_us"] / row["ours_us"], rel_tol=2e-3)
        assert row["dense_p10_us"] <= row["dense_us"] <= row["dense_p90_us"]
        assert 0 < row["ours_gbps"] and row["copy_gbps"] == 3000.0
        assert row["anchor"] == ("torch_semi_structured" if row["pattern"] == "2:4" else "cusparse_csr_i32")
    if "decision.png" in names:
        assert (tmp_path / "decision.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_runs_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_decision.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
                          env=NO_GPU_ENV)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "decision.json").is_file() and (tmp_path / "decision.csv").is_file()


def test_the_steps_run_in_order_each_under_a_timeout():
    text = SCRIPT.read_text()
    steps = re.findall(r"^\s*step (\S+) (\S+) ", text, flags=re.MULTILINE)
    names = [name for name, _ in steps]
    assert names == ["facts.gpu", "facts.versions", "decision", "tests", "ncu", "matmul"]
    fixed = sum(int(limit) for _, limit in steps if limit.isdigit())
    assert fixed <= 540 - 45  # the sweep keeps some of the 9 minutes
    assert "SPARSE_OPS_NATIVE=0" in text and "SPARSE_OPS_TRITON_AUTOTUNE=0" in text
    assert "--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy" in text


def test_the_sweep_line_is_a_valid_matmul_command():
    line = next(ln for ln in SCRIPT.read_text().splitlines() if ln.lstrip().startswith("step matmul "))
    line = line.replace('"$OUT"', "/tmp/gpu-out").replace("$((left - 25))", "100")
    argv = shlex.split(line)
    args = build_parser().parse_args(argv[argv.index("prune") + 1:])
    assert args.device == "cuda" and args.max_seconds == 100
    args.device = "cpu"
    plan = matmul_plan(args)
    assert plan.dtypes == ("fp16", "bf16") and plan.batches == (1, 16, 128, 2048)
    assert [s.name.split()[0] for s in plan.shapes][0] == "llama-7b"
    assert {s.name.split()[0] for s in plan.shapes} == {"bert-base", "llama-7b", "llama-70b"}
    assert plan.sparsities == (0.5, 0.7, 0.9, 0.98)
