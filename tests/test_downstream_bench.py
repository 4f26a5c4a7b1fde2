"""benchmarks/downstream.py's quick path: a tiny BERT classifier from a config, both losses, rows and files."""
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from benchmarks import downstream  # noqa: E402


def test_quick_run_writes_rows_for_both_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_SPARSE_CACHE", str(tmp_path / "cache"))
    downstream.main(["--quick", "--sparsities", "0.8", "--seeds", "0", "--steps", "20", "--teacher-epochs", "1",
                     "--out", str(tmp_path)])
    data = json.loads((tmp_path / "downstream.json").read_text())
    rows = {(r["mode"], r["sparsity"]): r for r in data["rows"]}
    assert sorted(rows) == [("distill", 0.8), ("task", 0.8)]
    for (mode, s), row in rows.items():
        assert row["measured_sparsity"] == pytest.approx(s, abs=0.01)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["cpu"] == data["environment"]["cpu"]
        assert (row["recipe"] != "") == (mode == "distill")
    assert len({r["teacher_accuracy"] for r in rows.values()}) == 1  # one cached teacher for every run
    assert (tmp_path / "cache" / "downstream" / "teacher-quick-e1.safetensors").is_file()
    assert (tmp_path / "downstream.png").stat().st_size > 0
    lines = downstream.table(data["rows"]).splitlines()
    assert lines[0] == "| sparsity | task loss | distill loss |" and lines[2].startswith("| 0.8 | ")


def test_batches_pad_group_and_keep_every_sentence():
    ids = [[1, 5, 2], [1, 2], [1, 7, 8, 9, 2]]
    out = downstream.batches(ids, [0, 1, 1], 2, seed=None)
    assert [x.shape for x, _ in out] == [(2, 2, 3), (2, 1, 5)]
    assert out[0][0][0].tolist() == [[1, 5, 2], [1, 2, 0]] and out[0][0][1].tolist() == [[1, 1, 1], [1, 1, 0]]
    shuffled = downstream.batches(ids, [0, 1, 1], 2, seed=3)
    assert sorted(x[0, r, :int(x[1, r].sum())].tolist() for x, _ in shuffled for r in range(x.shape[1])) == sorted(ids)
    assert sum(int(y.sum()) for _, y in shuffled) == 2
