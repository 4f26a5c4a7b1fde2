"""``benchmarks/gpu_model.py`` (the bytes model of the GPU kernels) runs on tiny shapes and writes its files."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_runs_tiny(tmp_path):
    # a fresh process with TRITON_INTERPRET unset: the model compiles the kernels for their registers
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_model", "--tiny", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "model.json").read_text())
    md = (tmp_path / "model.md").read_text()
    assert "predicted, not measured" in data["note"] and "predicted, not measured" in md
    by = {(r["kernel"], r["sparsity"], r["tokens"]): r for r in data["rows"]}
    assert by["dense", None, 1]["predicted_speedup_vs_dense"] == 1.0
    assert by["dense", None, 1]["bytes_per_weight"] == 2.0  # fp16
    # sparser stores fewer bytes; 2:4 is 9/16 of dense's weight bytes (values + 4-bit codes)
    speedups = [by["tiled bitmap", s, 1]["predicted_speedup_vs_dense"] for s in (0.5, 0.7, 0.9)]
    assert 1.0 < speedups[0] < speedups[1] < speedups[2]
    assert by["2:4", 0.5, 1]["bytes_per_weight"] == 1.125
    for r in data["rows"]:
        assert r["predicted_us_h200"] < r["predicted_us_h100"]
    assert "registers" in data and data["falsifiers"]
    # loads in flight: one row per sparsity; more tiles per iteration never fewer bytes in flight
    assert [r["sparsity"] for r in data["in_flight"]] == [0.5, 0.7, 0.9]
    for r in data["in_flight"]:
        assert 0 < r["fraction_of_bandwidth_step1"] <= 1 and 0 < r["fraction_of_bandwidth"] <= 1
        assert r["step"] == 1 or r["in_flight_per_sm_bytes"] > r["in_flight_per_sm_bytes_step1"]
    assert "Loads in flight" in md
