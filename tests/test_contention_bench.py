"""Smoke test of ``benchmarks/contention.py``: ``--quick`` (kernels, quiet) into a tmp folder, and its competing
process starting and stopping; never checks a timing value beyond its being positive."""
import csv
import json

import pytest

pytest.importorskip("matplotlib")

from benchmarks import contention


def test_quick_run_writes_every_kernel_with_its_ratio_to_dense(tmp_path):
    rows = contention.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    with open(tmp_path / "contention.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    data = json.loads((tmp_path / "contention.json").read_text())
    assert data["environment"]["cpu"] and data["conditions"][0]["loads"] == 0
    assert {"other_share", "slow_waits", "busy", "kernel_jobs_pool"} <= set(data["conditions"][0])
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"csr", "2:4", "ffn", "attention"}
    for kernel in kernels:
        for tokens in {r["tokens"] for r in rows if r["kernel"] == kernel}:
            point = {r["candidate"]: r for r in rows if r["kernel"] == kernel and r["tokens"] == tokens}
            assert {"dense", "ours", "ours_1t"} <= set(point)
            for r in point.values():
                assert r["median_s"] > 0 and r["own_quiet"] == 1.0  # quiet only: each is its own quiet run
                assert r["vs_dense"] == pytest.approx(point["dense"]["median_s"] / r["median_s"], rel=1e-2)
    assert (tmp_path / "contention.png").stat().st_size > 0


def test_competitors_run_while_the_block_does_and_stop_after():
    with contention.Competitors(1, 32) as busy:
        (proc,) = busy.procs
        assert proc.poll() is None
    assert proc.poll() is not None


def test_an_unknown_section_is_refused_with_the_allowed_ones(capsys):
    with pytest.raises(SystemExit):
        contention.parse(["--sections", "kernels,gpu"])
    assert "unknown sections ['gpu']; allowed: kernels, minilm, smollm2" in capsys.readouterr().err
