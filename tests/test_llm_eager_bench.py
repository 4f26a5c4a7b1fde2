"""Smoke test of ``benchmarks/llm_eager.py``: ``--quick``, one repeat, into a tmp folder.

Checks that every stage ran (prune, convert, sparse load, the greedy-token check, timing) and wrote its files;
never checks a timing value beyond its being positive (the conftest stands in for the plan's timer).
"""
import csv
import json

import pytest

from sparse_ops.kernels import cpp

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from benchmarks import llm_eager  # noqa: E402  (needs transformers)

CANDIDATES = ["dense", "dense_fast_attention",
              *(f"{v}/{kind}" for v in llm_eager.VARIANTS for kind in ("pruned-dense", "sparse"))]


def test_quick_run_writes_every_variant_with_the_same_tokens(tmp_path, capsys):
    result = llm_eager.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "complete" and data["variants"] == result["variants"]
    assert data["environment"]["kernel_isa"] == (cpp.isa() if cpp.available() else None)
    assert data["environment"]["torch_threads"] >= 1 and data["environment"]["cpu"]
    assert set(data["variants"]) == set(llm_eager.VARIANTS)
    for name, v in data["variants"].items():
        assert v["same_tokens"] is True, name
        int8_head = v["quantize"] is not None  # int8 variants store lm_head as int8 too
        assert v["converted_tensors"] == v["sparse_layers"] == 2 * llm_eager.LINEARS_PER_BLOCK + int8_head
        assert v["decoder_sparsity"] == pytest.approx(v["sparsity"], abs=0.02)  # int8: small weights round to 0
        assert v["weights_bytes_sparse"] < v["weights_bytes_dense"]
        assert all(v[k] > 0 for k in ("prefill_ms", "prefill_speedup", "decode_tok_s", "decode_speedup",
                                      "generate_tok_s"))
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    assert [r["candidate"] for r in rows] == CANDIDATES
    assert all(float(r[k]) > 0 for r in rows for k in ("prefill_ms", "decode_ms_per_token", "generate_ms"))
    assert {r["same_tokens"] for r in rows if r["runtime"] == "sparse"} == {"True"}
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert all(c in out for c in CANDIDATES) and "decode tok/s" in out


def test_different_tokens_fail_loudly_before_timing(tmp_path, monkeypatch):
    real = llm_eager.same_tokens
    monkeypatch.setattr(llm_eager, "same_tokens", lambda *a: {**real(*a), "same_tokens": False})
    monkeypatch.setattr(llm_eager, "measure", lambda *a: pytest.fail("timed a model whose tokens differ"))
    with pytest.raises(SystemExit, match="differs from the pruned dense model for 2:4"):
        llm_eager.main(["--quick", "--variants", "2:4", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"].startswith("failed") and data["variants"]["2:4"]["same_tokens"] is False
    assert not (tmp_path / "results.csv").exists()
