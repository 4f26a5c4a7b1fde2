"""`prune demo --quick` end to end: the files, their fields, and the table matching results.json."""
import json
import re

import pytest
import torch

from prune.cli import main
from prune.demo import RUNS, DemoConfig
from prune.demo.report import TABLE_COLUMNS


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # exactly what a user runs
    assert torch.get_num_threads() == threads  # the quick run's single thread does not leak out
    return out


def test_files_exist_and_parse(report_dir):
    names = sorted(p.name for p in report_dir.iterdir())
    assert names == ["deployment.png", "report.md", "results.json", "training.png"]
    for png in ("deployment.png", "training.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_fields(report_dir):
    res = json.loads((report_dir / "results.json").read_text())
    quick_steps = DemoConfig(quick=True).budget.steps
    assert res["environment"]["cpu"] and res["config"]["steps"] == quick_steps and res["config"]["quick"]
    assert res["environment"]["torch_threads"] == res["config"]["torch_threads"] == 1
    runs = {r["run"]: r for r in res["runs"]}
    assert list(runs) == ["dense", "magnitude", "movement", "2:4", "moe", "heads"]
    for r in runs.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["params_active"] <= r["params_total"]
        assert set(r["latency"]) == {"1", "16"} and all(c["deployed_ms"] > 0 for c in r["latency"].values())
        assert r["curve"][-1][0] == quick_steps
    for name in ("magnitude", "movement"):
        assert runs[name]["sparsity"] == pytest.approx(0.9, abs=1e-3) and runs[name]["deployed_as"] == "csr"
        assert runs[name]["file_deployed_bytes"] <= 0.25 * runs[name]["file_dense_bytes"]
        assert runs[name]["accuracy"] == pytest.approx(runs[name]["accuracy_before_deploy"], abs=1e-9)
    assert runs["2:4"]["sparsity"] == pytest.approx(0.5) and runs["2:4"]["deployed_as"] == "2:4"
    for name in ("magnitude", "movement", "2:4"):  # which layers run sparse is measured: only its bounds are fixed
        cells = runs[name]["latency"].values()
        assert all(c["planned_layers"] == 8 and 0 <= c["sparse_layers"] <= 8 for c in cells), name
    assert all("planned_layers" not in c for name in ("dense", "moe", "heads") for c in runs[name]["latency"].values())
    assert all(c["again_ms"] > 0 for c in runs["dense"]["latency"].values())  # the noise gauge
    report = (report_dir / "report.md").read_text()
    assert "Timing noise: the same dense computation timed several times in this run" in report
    assert "Layers on a sparse kernel at batch 1/16" in report and "2:4 " + "/".join(
        str(c["sparse_layers"]) for c in runs["2:4"]["latency"].values()) + " of 8" in report
    assert runs["moe"]["params_total"] > 2 * runs["moe"]["params_active"]
    assert runs["dense"]["latency"]["1"]["speedup_vs_dense"] == 1.0


def test_table_matches_results(report_dir):
    res = json.loads((report_dir / "results.json").read_text())
    lines = [l for l in (report_dir / "report.md").read_text().splitlines() if l.startswith("| ")]
    header, rows = lines[0], lines[1:]
    assert header.startswith("| " + " | ".join(TABLE_COLUMNS))
    assert len(rows) == len(res["runs"])
    for line, r in zip(rows, res["runs"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["run"] and cells[1] == r["deployed_as"]
        assert float(cells[2]) == pytest.approx(100 * r["accuracy"], abs=0.005)
        assert int(cells[5].replace(",", "")) == r["params_active"]
        assert float(cells[7]) == pytest.approx(r["file_deployed_bytes"] / 1024, abs=0.05)
        ms, speedup = re.fullmatch(r"([\d.]+) \(([\d.]+)x\)", cells[8]).groups()
        assert float(ms) == pytest.approx(r["latency"]["1"]["deployed_ms"], abs=5e-4)
        assert float(speedup) == pytest.approx(r["latency"]["1"]["speedup_vs_dense"], abs=5e-3)


def test_bad_runs_and_steps(capsys):
    assert main(["demo", "--runs", "dense,lottery"]) == 2
    assert "unknown run(s) ['lottery']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps must be >= 1"):
        DemoConfig(steps=0)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        DemoConfig(threads=0)


def test_quick_is_a_seconds_long_smoke_budget():
    """`--quick` must stay seconds-long on a loaded 2-core machine: one torch thread (two spin against each
    other when another job holds a core: 3-15x slower), few steps and evaluations, few timed repeats.
    Checked on the budget, not on a clock."""
    quick, full = DemoConfig(quick=True), DemoConfig()
    assert quick.torch_threads == 1 and full.torch_threads is None
    assert DemoConfig(quick=True, threads=2).torch_threads == 2
    assert quick.budget.steps * len(RUNS) <= 150  # training steps over all runs (60 per run took ~90 s loaded)
    assert quick.budget.steps // quick.budget.eval_every <= 2  # each evaluation runs the whole test set
    assert quick.repeats <= 3 and quick.batches == (1, 16)
    assert DemoConfig(quick=True, steps=30).budget.steps == 30 and full.budget.steps == 500


def test_findings_mark_slowdowns_within_the_noise_floor():
    from prune.demo.report import findings

    def row(run, ms, **extra):
        return {"run": run, "deployed_as": "dense", "accuracy": 0.9, "sparsity": 0.0, "file_deployed_bytes": 1,
                "file_dense_bytes": 1, "latency": {"1": {"deployed_ms": ms, "speedup_vs_dense": 1.0 / ms, **extra}}}
    dense = row("dense", 1.0, again_ms=1.04)
    out = findings([dense, row("a", 1.0 / 0.97), row("b", 1.0 / 0.90)])
    assert "spread 4.0% at batch 1" in out[-2]
    assert "a at batch 1 (0.97x, within noise), b at batch 1 (0.90x)" in out[-1]
    out = findings([dense, row("a", 1.0 / 0.97), row("b", 1.0 / 0.90, dense_exec_ms=1.12)])  # b's weights, dense
    assert "spread 12.0% at batch 1" in out[-2] and "b at batch 1 (0.90x, within noise)" in out[-1]
    out = findings([dense, row("a", 1.0 / 1.03)])  # "fastest", but by less than the 4% noise
    assert out[0] == ("At batch 1, no model was faster than the dense baseline beyond the timing noise (4.0%, "
                      "below): the quickest measured, a, ran 1.03x.")
    out = findings([dense, row("a", 1.0 / 1.30)])
    assert out[0].startswith("At batch 1, the fastest model was **a** (0.769 ms, 1.30x")


def test_findings_say_when_the_machine_was_busy():
    from prune.demo.report import findings

    def row(run, ms, busy=None):
        cell = {"deployed_ms": ms, "speedup_vs_dense": 1.0 / ms, **({"busy": busy} if busy else {})}
        return {"run": run, "deployed_as": "dense", "accuracy": 0.9, "sparsity": 0.0, "file_deployed_bytes": 1,
                "file_dense_bytes": 1, "latency": {"1": cell}}
    assert not any("busy" in line for line in findings([row("dense", 1.0), row("a", 0.5)]))
    why = "other processes used 50% of the cores"
    out = findings([row("dense", 1.0, why), row("a", 0.5, why)])
    assert any(f"busy while batch 1 was timed ({why})" in line and "set_num_threads(1)" in line for line in out)
