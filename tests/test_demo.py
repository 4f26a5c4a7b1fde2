"""`prune demo --quick` end to end: the files, their fields, and the table matching results.json."""
import json
import re

import pytest

from prune.cli import main
from prune.demo import DemoConfig
from prune.demo.report import TABLE_COLUMNS


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--steps", "30"]) == 0
    return out


def test_files_exist_and_parse(report_dir):
    names = sorted(p.name for p in report_dir.iterdir())
    assert names == ["deployment.png", "report.md", "results.json", "training.png"]
    for png in ("deployment.png", "training.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_fields(report_dir):
    res = json.loads((report_dir / "results.json").read_text())
    assert res["environment"]["cpu"] and res["config"]["steps"] == 30 and res["config"]["quick"]
    runs = {r["run"]: r for r in res["runs"]}
    assert list(runs) == ["dense", "magnitude", "movement", "2:4", "moe", "heads"]
    for r in runs.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["params_active"] <= r["params_total"]
        assert set(r["latency"]) == {"1", "16"} and all(c["deployed_ms"] > 0 for c in r["latency"].values())
        assert r["curve"][-1][0] == 30
    for name in ("magnitude", "movement"):
        assert runs[name]["sparsity"] == pytest.approx(0.9, abs=1e-3) and runs[name]["deployed_as"] == "csr"
        assert runs[name]["file_deployed_bytes"] <= 0.25 * runs[name]["file_dense_bytes"]
        assert runs[name]["accuracy"] == pytest.approx(runs[name]["accuracy_before_deploy"], abs=1e-9)
    assert runs["2:4"]["sparsity"] == pytest.approx(0.5) and runs["2:4"]["deployed_as"] == "2:4"
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
