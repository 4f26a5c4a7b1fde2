"""`prune bench` and its timer: statistics on a fake clock, the three commands on tiny inputs writing CSV /
JSON / PNG, bad input (one line, exit 2, nothing written), and gpu_check.sh on a machine without a GPU.

No assertion here depends on how fast anything ran: only on what was measured, counted and written.
"""
import csv
import dataclasses
import doctest
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prune.cli import build_parser, main
from sparse_ops import timing
from sparse_ops.bench import plots
from sparse_ops.bench.checkpoint import LAYER_COLUMNS, LayerRow
from sparse_ops.bench.matmul import MATMUL_COLUMNS
from sparse_ops.bench.output import RunFiles
from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.kernels import cpp
from sparse_ops.timing import Deadline, _quantile, summarize, time_interleaved

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODULES = ["sparse_ops.timing", "sparse_ops.bench.shapes", "sparse_ops.bench.matmul", "sparse_ops.bench.checkpoint",
                 "sparse_ops.bench.output", "sparse_ops.bench.plots", "sparse_ops.bench.command"]


# --- the timer, on a fake clock ---

class FakeClock:
    """A clock that only moves when a fake workload says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def scripted(clock, durations, log, name):
    """A callable whose k-th call takes durations[k] seconds of fake time (the last one repeats)."""
    calls = []

    def fn():
        clock.now += durations[min(len(calls), len(durations) - 1)]
        calls.append(1)
        log.append(name)
    return fn


def test_timer_statistics_on_a_fake_clock():
    clock, log = FakeClock(), []
    # 2 warm-up calls and 1 calibration call take 100 s each (ignored), then samples 11, 10, ..., 1 s
    a = scripted(clock, [100.0] * 3 + [float(v) for v in range(11, 0, -1)], log, "a")
    b = scripted(clock, [100.0] * 3 + [2.0] * 11, log, "b")
    t = time_interleaved({"a": a, "b": b}, warmup=2, repeats=11, min_sample_s=0.5, clock=clock)
    assert (t["a"].median_s, t["a"].p10_s, t["a"].p90_s, t["a"].repeats) == (6.0, 2.0, 10.0, 11)
    assert (t["b"].median_s, t["b"].p10_s, t["b"].p90_s) == (2.0, 2.0, 2.0)
    assert t["b"].ratio_to(t["a"]) == 3.0  # b is 3x faster than a
    assert log[-22:] == ["a", "b", "b", "a"] * 5 + ["a", "b"]  # samples interleave, each repeat rotated by one


def test_timer_loops_fast_calls_into_one_sample():
    clock, log = FakeClock(), []
    fn = scripted(clock, [0.001], log, "f")  # 1 ms per call, samples must last >= 20 ms
    t = time_interleaved({"f": fn}, warmup=0, repeats=3, min_sample_s=0.02, clock=clock)
    assert t["f"].median_s == pytest.approx(0.001)
    assert len(log) >= 3 * 20  # each of the 3 samples looped at least 20 calls (calibration calls besides)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 11, 31])
def test_quantiles_match_numpy_linear(n):
    xs = list(np.random.default_rng(n).random(n))
    for q in (0.1, 0.5, 0.9):
        assert _quantile(xs, q) == pytest.approx(np.percentile(xs, 100 * q))
    assert summarize(xs).median_s == pytest.approx(np.median(xs))


def test_timer_rejects_empty_input():
    with pytest.raises(ValueError, match="at least one"):
        time_interleaved({})
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_deadline():
    assert Deadline(None).allows(100, 1e9, 1e9)
    assert Deadline(1.0).allows(0, 5.0, 5.0)  # the first point always runs
    assert Deadline(10.0).allows(1, 4.0, 6.0) and not Deadline(10.0).allows(1, 4.0, 6.5)


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_benchmark_docstring_examples(name):
    assert doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS).failed == 0


# --- result files ---

def test_run_files_removed_when_the_run_fails_before_a_row(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ValueError), RunFiles(out, "x", ("a",), {}) as files:
        files.path(".png").write_bytes(b"")
        raise ValueError("bad file")
    assert not out.exists()


def test_run_files_keep_measured_rows_when_the_run_fails_later(tmp_path):
    with pytest.raises(RuntimeError), RunFiles(tmp_path, "x", ("a",), {}) as files:
        files.add({"a": 1})
        raise RuntimeError("CUDA out of memory\nmore")
    assert (tmp_path / "x.csv").read_text().split() == ["a", "1"]
    assert json.loads((tmp_path / "x.json").read_text())["status"] == "failed: RuntimeError: CUDA out of memory"


def test_run_files_kept_and_marked_when_interrupted(tmp_path):
    with pytest.raises(KeyboardInterrupt), RunFiles(tmp_path, "x", ("a",), {}) as files:
        files.add({"a": 1})
        raise KeyboardInterrupt
    assert (tmp_path / "x.csv").read_text().split() == ["a", "1"]
    assert json.loads((tmp_path / "x.json").read_text())["status"] == "interrupted"


# --- the commands on tiny inputs ---

def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def assert_png(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


TINY = ["--threads", "1", "--repeats", "2"]


def test_matmul_stops_on_max_seconds_with_what_it_measured(tmp_path, capsys):
    rc = main(["bench", "matmul", "--shapes", "32x64", "--sparsity", "0.5,0.9", "--tokens", "1", "4",
               "--out", str(tmp_path), "--max-seconds", "0.001", *TINY])
    assert rc == 0
    cols, rows = read_csv(tmp_path / "matmul.csv")
    assert tuple(cols) == MATMUL_COLUMNS
    assert {(r["sparsity"], r["batch"]) for r in rows} == {("0.5", "1")}  # the first point only
    cands = {r["candidate"] for r in rows}
    assert {"dense", "csr", "2:4", "auto", "torch_csr_i64", "torch_csr_i32", "scipy_csr"} <= cands
    header = json.loads((tmp_path / "matmul.json").read_text())
    assert header["status"] == "stopped by --max-seconds 0.001 after 1 of 4 points"
    assert header["rows"] == len(rows) and header["environment"]["torch_threads"] == 1
    assert {"cpu", "cores", "torch", "blas", "date"} <= set(header["environment"])
    assert_png(tmp_path / "matmul.png")
    out = capsys.readouterr().out
    assert "x csr" in out and "32->" not in out and "64->32" in out


def test_matmul_rows_are_consistent(tmp_path):
    assert main(["bench", "matmul", "--shapes", "16x64", "--sparsity", "0.75", "--tokens", "1,3", "--dtype",
                 "fp32,bf16", "--formats", "csr,2:4", "--out", str(tmp_path), *TINY]) == 0
    _, rows = read_csv(tmp_path / "matmul.csv")
    header = json.loads((tmp_path / "matmul.json").read_text())
    assert header["status"] == "complete" and "scipy_csr" in header["skipped"]  # scipy has no bf16
    assert {(r["dtype"], r["batch"]) for r in rows} == {("fp32", "1"), ("fp32", "3"), ("bf16", "1"), ("bf16", "3")}
    for r in rows:
        assert int(r["nnz"]) == 16 * 64 // 4  # 75% of the weight is zero, in every dtype
        speedup, limit = float(r["speedup"]), float(r["limit"])
        assert speedup > 0 and float(r["fraction_of_limit"]) == pytest.approx(speedup / limit, rel=1e-3, abs=1e-4)
        dense = next(d for d in rows if d["candidate"] == "dense" and (d["dtype"], d["batch"]) == (r["dtype"], r["batch"]))
        assert speedup == pytest.approx(float(dense["median_s"]) / float(r["median_s"]), rel=1e-3)
        assert float(r["max_rel_err"]) < (1e-4 if r["dtype"] == "fp32" else 3e-2)
    by = {(r["dtype"], r["candidate"]): r for r in rows if r["batch"] == "1"}
    assert float(by["fp32", "dense"]["limit"]) == 1.0
    assert float(by["fp32", "2:4"]["limit"]) == pytest.approx(16 * 64 * 4 / (16 * 32 * 4 + 16 * 8), abs=1e-3)
    assert int(by["bf16", "dense"]["weight_bytes"]) == 16 * 64 * 2


@pytest.mark.parametrize("busy", [False, True])
def test_matmul_says_when_the_machine_was_busy_and_suggests_one_thread(tmp_path, capsys, monkeypatch, busy):
    from sparse_ops import busy as busy_module

    load = busy_module.Load(wall_s=3.0, other_share=0.55 if busy else 0.01, slow_waits=0)

    class Watch:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.load = load
    monkeypatch.setattr(busy_module, "Watch", Watch)
    assert main(["bench", "matmul", "--shapes", "16x32", "--sparsity", "0.5", "--tokens", "1", "--formats", "csr",
                 "--out", str(tmp_path), *TINY]) == 0
    err = capsys.readouterr().err
    assert ("other processes used 55% of the cores" in err and "--threads 1" in err) == busy
    assert json.loads((tmp_path / "matmul.json").read_text())["load"] == load.to_dict()


def make_checkpoint(directory):
    """A tiny 'model': two pruned linears (one 2:4), a bias, an embedding; dense .pt and converted CSR."""
    g = torch.Generator().manual_seed(0)
    up = torch.randn(48, 32, generator=g)
    up[torch.rand(48, 32, generator=g) < 0.9] = 0.0
    down = torch.randn(32, 48, generator=g)
    down[:, 0::4] = 0.0
    down[:, 1::4] = 0.0  # 2:4 and 50% sparse
    state = {"ffn.up.weight": up, "ffn.down.weight": down, "ffn.up.bias": torch.zeros(48),
             "embed_tokens.weight": torch.randn(10, 32, generator=g)}
    dense = directory / "model.pt"
    torch.save(state, dense)
    sparse = directory / "model.safetensors"
    convert_checkpoint(dense, sparse, format="csr", min_sparsity=0.3)
    return dense, sparse, state


def test_checkpoint_per_layer_and_whole_model(tmp_path, capsys):
    _, sparse, state = make_checkpoint(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", "checkpoint", str(sparse), "--tokens", "1,8", "--out", str(out), *TINY]) == 0
    cols, rows = read_csv(out / "checkpoint.csv")
    assert tuple(cols) == LAYER_COLUMNS
    got = {(r["layer"], r["batch"], r["candidate"]) for r in rows}
    torch_csr = ("csr:torch",) if cpp.available() else ()  # torch's kernel, timed where ours is the default
    assert got == {(layer, b, c) for layer in ("ffn.up.weight", "ffn.down.weight") for b in ("1", "8")
                   for c in ("dense", "csr", *torch_csr, "auto")} | {("ffn.down.weight", b, "2:4") for b in ("1", "8")}
    for r in rows:
        w = state[r["layer"]]
        assert r["stored_format"] == "csr"
        assert r["auto_chose"] in ("dense", "csr", "csr.plain", "csr.panels", "2:4", *torch_csr)
        assert float(r["sparsity"]) == pytest.approx(float((w == 0).float().mean()), abs=1e-4)
        assert (int(r["out_features"]), int(r["in_features"])) == tuple(w.shape)
    header = json.loads((out / "checkpoint.json").read_text())
    assert [s["batch"] for s in header["whole_model"]] == [1, 8]
    s = header["whole_model"][0]
    assert s["layers"] == 2 and s["dense_bytes"] == (48 * 32 + 32 * 48) * 4 and s["stored_bytes"] < s["dense_bytes"]
    assert s["speedup_best"] >= max(s["speedup_csr"], s["speedup_2:4"], s["speedup_auto"]) - 1e-9
    assert set(header["skipped"]) == {"ffn.up.bias", "embed_tokens.weight"}
    assert header["status"] == "complete" and header["coverage"]["note"] == "all 2 linear layers measured"
    assert_png(out / "checkpoint.png")
    printed = capsys.readouterr().out
    assert "whole model (2 linear layers)" in printed and "note:" not in printed


def test_checkpoint_dense_file_gives_the_same_layers(tmp_path):
    from sparse_ops.bench.checkpoint import sweep_checkpoint

    dense, sparse, _ = make_checkpoint(tmp_path)
    seen = []
    for path in (dense, sparse):
        rows = [r for point in sweep_checkpoint(path, (2,), repeats=1, min_sample_s=1e-4, deadline=Deadline(None),
                                                skipped={}) for r in point]
        seen.append(sorted((r.layer, r.candidate, r.sparsity, r.weight_bytes) for r in rows))
    assert seen[0] == seen[1]


def test_checkpoint_twin_layers_are_measured_once(tmp_path, monkeypatch):
    """The same projection in two blocks (shape, storage, sparsity to 1%) is timed once; the second layer's rows
    name the first in ``measured_as``; a layer of another sparsity is timed itself."""
    from sparse_ops.bench import checkpoint as bench_checkpoint

    g = torch.Generator().manual_seed(0)

    def pruned(zeros):  # exactly `zeros` of the 1536 weights zeroed, at random places
        w = torch.randn(48 * 32, generator=g)
        w[torch.randperm(48 * 32, generator=g)[:zeros]] = 0.0
        return w.view(48, 32)
    state = {"0.q.weight": pruned(1380), "1.q.weight": pruned(1390), "2.q.weight": pruned(768)}  # 89.8, 90.5, 50%
    torch.save(state, tmp_path / "m.pt")
    calls = []
    measure = bench_checkpoint.measure_weight
    monkeypatch.setattr(bench_checkpoint, "measure_weight", lambda w, *a, **k: calls.append(w) or measure(w, *a, **k))
    rows = [r for point in bench_checkpoint.sweep_checkpoint(tmp_path / "m.pt", (2,), repeats=1, min_sample_s=1e-4,
                                                             deadline=Deadline(None), skipped={}) for r in point]
    assert len(calls) == 2  # layers 0 and 2
    by_layer = {r.layer: r for r in rows if r.candidate == "dense"}
    assert [by_layer[n].measured_as for n in ("0.q.weight", "1.q.weight", "2.q.weight")] == \
        ["0.q.weight", "0.q.weight", "2.q.weight"]
    assert by_layer["1.q.weight"].median_s == by_layer["0.q.weight"].median_s
    assert by_layer["1.q.weight"].sparsity != by_layer["0.q.weight"].sparsity  # its own, not the twin's


def test_families_quick(tmp_path, capsys):
    assert main(["bench", "families", "--quick", "--tokens", "4", "--out", str(tmp_path), *TINY]) == 0
    cols, rows = read_csv(tmp_path / "families.csv")
    assert {"ffn_dense", "attn_full_mha"} <= {r["name"] for r in rows} and "active_params" in cols
    assert all(r["batch"] == "4" and float(r["speedup"]) > 0 for r in rows)
    assert json.loads((tmp_path / "families.json").read_text())["status"] == "complete"
    assert_png(tmp_path / "families.png")


# --- a sweep cut short says so, and how far it got; the checkpoint plot answers "faster or not?" ---

@dataclasses.dataclass(frozen=True)
class StopAfter(Deadline):
    """A deadline that allows ``points`` points (layers, for a checkpoint) whatever the clock says."""

    points: int = 1

    def allows(self, done, elapsed, next_cost):
        return done < self.points


def stop_after(monkeypatch, points):
    """Make `prune bench` run under ``StopAfter(points)`` instead of its real ``Deadline(--max-seconds)``."""
    monkeypatch.setattr(timing, "Deadline", lambda max_seconds: StopAfter(max_seconds, points))


def spy_plot_bars(monkeypatch):
    """Record each ``plot_bars`` call (panels, title) and still draw it."""
    calls, real = [], getattr(plots, "plot_bars", None)

    def spy(panels, path, **kw):
        calls.append((panels, kw["title"]))
        real(panels, path, **kw)
    monkeypatch.setattr(plots, "plot_bars", spy, raising=False)  # raising=False: fail on the output, not here
    return calls


def test_checkpoint_cut_short_says_which_layers_the_whole_model_covers(tmp_path, capsys, monkeypatch):
    _, sparse, _ = make_checkpoint(tmp_path)
    stop_after(monkeypatch, 1)  # the first of the two linear layers, at both token counts
    calls = spy_plot_bars(monkeypatch)
    out = tmp_path / "out"
    assert main(["bench", "checkpoint", str(sparse), "--tokens", "1,8", "--max-seconds", "60", "--out", str(out),
                 *TINY]) == 0
    note = ("1 of 2 linear layers measured (stopped by --max-seconds 60): "
            "the whole-model figure covers this one only")
    printed = capsys.readouterr().out
    assert "whole model (" not in printed and printed.count("whole model: 1 of 2 linear layers") == 2
    assert f"note: {note}" in printed and "linear weights of the 1 measured layer (of 2):" in printed
    _, rows = read_csv(out / "checkpoint.csv")
    assert len({r["layer"] for r in rows}) == 1 and {r["batch"] for r in rows} == {"1", "8"}
    header = json.loads((out / "checkpoint.json").read_text())
    assert header["status"] == "stopped by --max-seconds 60 after 2 of 4 points"
    assert header["coverage"] == {"layers_measured": 1, "layers_total": 2, "note": note}
    assert [(s["layers"], s["layers_total"]) for s in header["whole_model"]] == [(1, 2), (1, 2)]
    (panels, title), = calls
    assert note in title
    assert [bars[0].label for bars in panels.values()] == ["whole model: 1 of 2 layers measured"] * 2
    assert_png(out / "checkpoint.png")


def test_checkpoint_that_finished_under_max_seconds_is_complete(tmp_path, monkeypatch):
    _, sparse, _ = make_checkpoint(tmp_path)
    stop_after(monkeypatch, 10**6)  # --max-seconds given, never reached
    out = tmp_path / "out"
    assert main(["bench", "checkpoint", str(sparse), "--tokens", "1,8", "--max-seconds", "60", "--out", str(out),
                 *TINY]) == 0
    header = json.loads((out / "checkpoint.json").read_text())
    assert header["status"] == "complete" and header["coverage"]["layers_measured"] == 2


@pytest.mark.parametrize("points,status", [(1, "stopped by --max-seconds 60 after 1 of 4 points"),
                                           (4, "complete")])
def test_matmul_status_counts_the_real_total(tmp_path, monkeypatch, points, status):
    stop_after(monkeypatch, points)
    assert main(["bench", "matmul", "--shapes", "16x32", "--sparsity", "0.5,0.9", "--tokens", "1,2", "--formats",
                 "csr", "--no-anchors", "--max-seconds", "60", "--out", str(tmp_path), *TINY]) == 0
    assert json.loads((tmp_path / "matmul.json").read_text())["status"] == status


def test_count_linear_reads_headers_like_the_sweep(tmp_path):
    from sparse_ops.bench.checkpoint import count_linear

    dense, sparse, _ = make_checkpoint(tmp_path)
    for path in (dense, sparse):
        skipped = {}
        assert count_linear(path, skipped) == 2 and set(skipped) == {"ffn.up.bias", "embed_tokens.weight"}


def test_checkpoint_plot_answers_per_layer_and_whole_model(tmp_path, monkeypatch):
    _, sparse, _ = make_checkpoint(tmp_path)
    calls = spy_plot_bars(monkeypatch)
    out = tmp_path / "out"
    assert main(["bench", "checkpoint", str(sparse), "--tokens", "1,8", "--out", str(out), *TINY]) == 0
    (panels, title), = calls
    assert list(panels) == ["1 token per call", "8 tokens per call"] and "all 2 linear layers measured" in title
    _, rows = read_csv(out / "checkpoint.csv")
    whole = {s["batch"]: s for s in json.loads((out / "checkpoint.json").read_text())["whole_model"]}
    for tokens, bars in zip((1, 8), panels.values()):
        assert bars[0].whole and bars[0].label == "whole model (2 linear layers)"
        assert bars[0].speedup == pytest.approx(whole[tokens]["speedup_auto"], rel=1e-3)
        assert dict(bars[0].marks) == pytest.approx({"csr": whole[tokens]["speedup_csr"],
                                                     "2:4": whole[tokens]["speedup_2:4"]}, rel=1e-3)
        assert [b.label for b in bars[1:]] == ["ffn.up.weight (48x32, 91%)", "ffn.down.weight (32x48, 50%)"]
        for bar, layer in zip(bars[1:], ("ffn.up.weight", "ffn.down.weight")):
            by = {r["candidate"]: float(r["median_s"]) for r in rows
                  if r["layer"] == layer and r["batch"] == str(tokens)}
            assert bar.speedup == pytest.approx(by["dense"] / by["auto"])
            assert {m for m, _ in bar.marks} == ({"csr", "2:4"} if "2:4" in by else {"csr"})


def fake_layer(i, shape, sparsity, dense_s, auto_s, batch=1):
    common = {"layer": f"model.layers.{i}.w", "out_features": shape[0], "in_features": shape[1],
              "dtype": "fp32", "stored_format": "csr", "sparsity": sparsity, "batch": batch, "p10_s": 0.0,
              "p90_s": 0.0, "weight_bytes": 0, "limit": 1.0, "fraction_of_limit": 1.0, "max_rel_err": 0.0,
              "auto_chose": "csr"}
    return [LayerRow(candidate="dense", median_s=dense_s, speedup=1.0, **common),
            LayerRow(candidate="csr", median_s=auto_s, speedup=dense_s / auto_s, **common),
            LayerRow(candidate="auto", median_s=auto_s, speedup=dense_s / auto_s, **common)]


def test_speedup_bars_stay_readable_for_a_hundred_layers(tmp_path):
    from sparse_ops.bench.checkpoint import MAX_BARS, speedup_bars

    shapes = [(768, 768), (3072, 768), (768, 3072), (768, 2304)]  # a uniformly pruned 24-block encoder: 96 layers
    rows = [r for i in range(96) for r in fake_layer(i, shapes[i % 4], 0.9, 2.0, 1.0 + (i % 4 == 3) * 3.0)]
    bars = speedup_bars(rows, 1)
    assert [b.label for b in bars] == [f"{o}x{n}, 90% (24 layers)" for o, n in shapes]
    assert [b.speedup for b in bars] == [2.0, 2.0, 2.0, 0.5] and [b.layers for b in bars] == [24] * 4
    # few layers: one bar each; many shapes: at most MAX_BARS bars, the smallest weights lumped together
    assert len(speedup_bars(rows[:3 * 12], 1)) == 12
    many = [r for i in range(100) for r in fake_layer(i, (64 + i, 64), 0.5 + i / 250, 1.0, 0.5)]
    bars = speedup_bars(many, 1)
    assert len(bars) == MAX_BARS and bars[-1].label == f"other shapes ({100 - MAX_BARS + 1} layers)"
    assert sum(b.layers for b in bars) == 100 and bars[0].label == "model.layers.61.w (125x64, 74%)"  # file order
    assert all(b.speedup == pytest.approx(2.0) for b in bars)
    panels = {f"{t} tokens per call": [plots.SpeedupBar("whole model (100 linear layers)", 2.0, whole=True), *bars]
              for t in (1, 64)}
    plots.plot_bars(panels, tmp_path / "many.png", title="100 layers")
    assert_png(tmp_path / "many.png")


# --- --tokens (rows of x per call); --batch is its hidden, deprecated old name ---

@pytest.mark.parametrize("what", ["matmul", "families", "checkpoint"])
def test_tokens_option_and_its_deprecated_alias(capsys, what):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", what, "--help"])
    help_text = capsys.readouterr().out
    assert "--tokens" in help_text and "--batch" not in help_text and "tokens" in help_text
    file = ["m.safetensors"] if what == "checkpoint" else []
    args = build_parser().parse_args(["bench", what, *file, "--tokens", "1,8"])
    assert args.tokens == ["1,8"] and capsys.readouterr().err == ""
    args = build_parser().parse_args(["bench", what, *file, "--batch", "1,8"])
    err = capsys.readouterr().err
    assert args.tokens == ["1,8"] and err.count("\n") == 1 and "--batch is deprecated, use --tokens" in err


def test_deprecated_batch_still_runs_and_errors_name_it(tmp_path, capsys):
    assert main(["bench", "matmul", "--shapes", "16x32", "--sparsity", "0.5", "--batch", "2", "--formats", "csr",
                 "--no-anchors", *TINY]) == 0
    captured = capsys.readouterr()
    assert "deprecated" in captured.err and captured.out.splitlines()[0].split()[3] == "tokens"
    assert main(["bench", "matmul", "--batch", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--batch: '0' is not an integer >= 1" in capsys.readouterr().err and not (tmp_path / "out").exists()


# --- bad input: one line on stderr, exit 2, nothing written ---

BAD = [
    (["matmul", "--shapes", "bert"], "unknown shape 'bert'"),
    (["matmul", "--shapes", "64x"], "unknown shape '64x'"),
    (["matmul", "--shapes", "0x64"], "positive sizes"),
    (["matmul", "--formats", "csr,bsr"], "unknown value 'bsr'"),
    (["matmul", "--dtype", "fp8"], "unknown value 'fp8'"),
    (["matmul", "--sparsity", "1.0"], "--sparsity: 1.0 is not in [0.0, 1.0)"),
    (["matmul", "--tokens", "0"], "--tokens: '0' is not an integer >= 1"),
    (["matmul", "--max-seconds", "0"], "--max-seconds must be > 0"),
    (["matmul", "--device", "tpu"], "unknown device 'tpu'"),
    (["families", "--tokens", "200"], "--tokens: 200 is above seq_len=128 and not a multiple of it (allowed: "),
    (["checkpoint", "missing.safetensors"], "no such file"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["bench", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "matmul", "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_checkpoint_without_linear_weights_leaves_nothing(tmp_path, capsys):
    torch.save({"bias": torch.zeros(4)}, tmp_path / "b.pt")
    out = tmp_path / "out"
    assert main(["bench", "checkpoint", str(tmp_path / "b.pt"), "--out", str(out), *TINY]) == 2
    assert "no linear" in capsys.readouterr().err and not out.exists()


# --- the GPU script ---

GPU_SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_says_there_is_no_gpu(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(GPU_SCRIPT)], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})
    assert proc.returncode == 3 and "no CUDA GPU here" in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(not cpp.available(), reason="needs g++ and the native kernels")
def test_kernel_ab_compares_two_builds(capsys):
    from benchmarks import kernel_ab
    src = str(cpp.SOURCE)
    kernel_ab.main([src, src, "--shapes", "40x300x1", "40x300x64", "--rounds", "3", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["40x300x1", "40x300x64"]
    assert all("B/A speed" in line and "p20" in line for line in lines)


@pytest.mark.skipif(not cpp.available(), reason="needs g++ and the native kernels")
def test_ffn_benchmark_writes_consistent_rows(tmp_path, capsys):
    import csv
    import json

    from benchmarks import ffn
    ffn.main(["--out", str(tmp_path), "--hidden", "48", "--tokens", "8", "40", "--sparsities", "0.8",
              "--repeats", "1"])
    rows = list(csv.DictReader((tmp_path / "ffn.csv").read_text().splitlines()))
    assert [(r["group"], r["tokens"], r["candidate"]) for r in rows] == [
        (g, t, c) for g in ("48->192->48", "48->128->48 gated") for t in ("8", "40") for c in ("dense", "layers", "fused")]
    for point in (rows[i:i + 3] for i in range(0, len(rows), 3)):
        by = {r["candidate"]: float(r["median_s"]) for r in point}
        assert float(point[0]["fused_over_layers"]) == pytest.approx(by["layers"] / by["fused"], abs=6e-4)  # 3 decimals
        assert float(point[1]["speedup"]) == pytest.approx(by["dense"] / by["layers"], abs=6e-4)
    assert json.loads((tmp_path / "ffn.json").read_text())["status"] == "complete"
    assert (tmp_path / "ffn.png").read_bytes()[:4] == b"\x89PNG"
    assert "fused / layers" in capsys.readouterr().out


def test_the_bench_format_choices_are_the_registry_and_dense_and_auto():
    from sparse_ops.bench.command import FORMAT_CHOICES
    from sparse_ops.bench.matmul import FORMATS as BENCH_FORMATS
    from sparse_ops.checkpoint.convert import CONVERT_FORMATS
    from sparse_ops.registry import FORMATS, QUANTIZED

    assert FORMAT_CHOICES == BENCH_FORMATS == ("dense", *FORMATS, *(f + "+in8" for f in QUANTIZED), "auto")
    assert CONVERT_FORMATS == (*FORMATS, "auto")
