"""benchmarks/quality.py's quick path: a tiny BERT from a config, every kind of method, files written."""
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from benchmarks import quality  # noqa: E402


def test_quick_run_writes_rows_for_every_kind_of_method(tmp_path):
    methods = [*quality.FLOORS, "ours-magnitude", "ours-movement+hidden", "sparsegpt+hidden", quality.TORCH_AO]
    quality.main(["--quick", "--sparsities", "0.5", "--methods", ",".join(methods), "--out", str(tmp_path),
                  "--keep", str(tmp_path / "models")])
    data = json.loads((tmp_path / "quality.json").read_text())
    assert {"cpu", "torch", "cores"} <= set(data["environment"])
    rows = {r["method"]: r for r in data["rows"]}
    assert sorted(rows) == sorted(methods)
    for name, row in rows.items():
        assert row["measured_sparsity"] == pytest.approx(0.5, abs=0.01), name
        assert 0.0 < row["cosine"] <= 1.0
    assert (tmp_path / "quality.csv").read_text().startswith("method,")
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert {row["cpu"] for row in rows.values()} == {data["environment"]["cpu"]}  # every row names its machine
    lines = quality.table(data["rows"]).splitlines()
    assert lines[0] == "| 20 steps | 0.5 |" and len(lines) == 4 + len(methods)
    assert {line.split(" | ")[0][2:] for line in lines[2:2 + len(methods)]} == set(methods)
    kernel_isa = data["environment"]["kernel_isa"]
    assert lines[-1] == f"measured on: {data['environment']['cpu']} ({kernel_isa})"
    assert lines[2].split(" | ")[1] == f"{max(r['cosine'] for r in rows.values()):.4f} |"
    from safetensors.torch import load_file

    for method in methods:  # --keep: the pruned weights, their zeros exactly the row's measured sparsity
        setup = quality.Setup(0.5, 0 if method in quality.FLOORS else 20)
        weights = load_file(tmp_path / "models" / quality.kept_name(method, setup))
        linear = [w for k, w in weights.items() if k.startswith("encoder.") and k.endswith("weight") and w.ndim == 2]
        zeros = sum(int((w == 0).sum()) for w in linear) / sum(w.numel() for w in linear)
        assert zeros == pytest.approx(rows[method]["measured_sparsity"], abs=1e-4), method


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown methods \\['ours-nope'\\]"):
        quality.main(["--quick", "--methods", "ours-nope", "--out", str(tmp_path)])


def test_scratch_quality_quick_run_and_table(tmp_path):
    from benchmarks import scratch_quality

    scratch_quality.main(["--quick", "--sparsities", "0.9", "--criteria", "magnitude,movement",
                          "--out", str(tmp_path)])
    data = json.loads((tmp_path / "scratch_quality.json").read_text())
    rows = {r["criterion"]: r for r in data["rows"]}
    assert sorted(rows) == ["dense", "magnitude", "movement"]
    assert rows["dense"]["sparsity"] == 0.0 and rows["dense"]["measured_sparsity"] == 0.0
    for name in ("magnitude", "movement"):
        assert rows[name]["measured_sparsity"] == pytest.approx(0.9, abs=0.01), name
        assert 0.0 <= rows[name]["accuracy"] <= 100.0 and rows[name]["cpu"] == data["environment"]["cpu"]
    assert (tmp_path / "scratch_quality.png").stat().st_size > 0
    lines = scratch_quality.table(data["rows"]).splitlines()
    assert lines[0] == "| accuracy % (mean ± sd over seeds) | 0.9 |"
    best = max(rows["magnitude"]["accuracy"], rows["movement"]["accuracy"])
    assert lines[2].split(" | ")[1] == f"{best:.2f} ± 0.00 |" and lines[4].startswith("| dense (0%) |")
    with pytest.raises(SystemExit, match="unknown criteria \\['nope'\\]"):
        scratch_quality.main(["--quick", "--criteria", "nope", "--out", str(tmp_path)])
