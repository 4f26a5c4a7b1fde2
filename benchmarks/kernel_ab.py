"""Paired A/B timing of two versions of ``sparse_ops/csrc/sparse_cpu.cpp`` on the CSR path the library would take.

On a shared or noisy machine two separate benchmark runs of the same code can differ by 20-30%, so kernel
constants are decided here: both sources are compiled with the library's flags, each shape's weight is prepared
once, and the two builds are timed in alternating order (A B, B A, ...) for ``--rounds`` rounds; the reported
figure is the median of the per-round ratios time(A) / time(B) (> 1: B is faster), with its 20th and 80th
percentiles. Outputs of A and B are checked against each other first.

Run: ``python -m benchmarks.kernel_ab A.cpp B.cpp [--shapes 384x384x1024 4096x4096x1] [--sparsity 0.9]
[--threads 2] [--rounds 15] [--bias] [--activation gelu] [--no-check] [--isa avx512 avx2]``; shapes are
OUTxINxTOKENS; ``--isa`` names the targets of A and B (``cpp.ISAS``, or "native" for -march=native;
default: the library's). The same source twice with two targets compares the builds. Example:
compare the committed source with an edit (``git show HEAD:sparse_ops/csrc/sparse_cpu.cpp > /tmp/A.cpp``);
``--no-check`` times ablations whose outputs differ (e.g. a step skipped to measure its share).
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sparse_ops.activations import ACTIVATIONS, CODES
from sparse_ops.formats import CSR
from sparse_ops.kernels import cpp, ours_cpu


def build(source: Path, out_dir: Path, tag: str, target: str | None = None,
          same_as: Path | None = None) -> ctypes.CDLL:
    """Compile ``source`` with the library's flags for ``target`` and load it with the library's signatures;
    ``same_as``: an earlier build of the same source and target, copied instead (a separate library to load)."""
    so = out_dir / f"sparse_cpu_{tag}.so"
    if same_as is not None:
        shutil.copyfile(same_as, so)
    else:
        subprocess.run(["g++", *cpp.build_flags(target), "-o", str(so), str(source)], check=True,
                       capture_output=True, text=True)
    return cpp.open_library(so, strict=False)


def csr_call(lib: ctypes.CDLL, w: ours_cpu.NativeWeight, x: torch.Tensor, y: torch.Tensor, threads: int,
             bias: torch.Tensor | None = None, activation: str | None = None) -> Callable[[], int]:
    """The call the library makes for x (n, in): gemv / plain kernel, or the panelled kernel."""
    (out, inp), n = w.source.shape, x.shape[0]
    bp, act = None if bias is None else bias.data_ptr(), CODES[activation]
    if ours_cpu.use_panels(n, w.density, inp):
        ours_cpu.panelled(w)
        seg, lcol, vals = w.panels
        return lambda: lib.csr_panels_f32(seg.data_ptr(), lcol.data_ptr(), vals.data_ptr(), out, inp,
                                          ours_cpu.PANEL_ROWS, ours_cpu.PANEL_WIDTH, x.data_ptr(),
                                          ours_cpu.panel_tile(n), n, bp, y.data_ptr(), threads, act,
                                          *cpp.NO_POST)
    crow, col, vals = w.tensors
    entry = getattr(lib, f"csr_f32_{ours_cpu.INDEX_CODE[col.dtype]}")
    return lambda: entry(crow.data_ptr(), col.data_ptr(), vals.data_ptr(), out, inp, x.data_ptr(), n, bp,
                         y.data_ptr(), threads, act, *cpp.NO_POST)


def paired_ratio(fa: Callable[[], object], fb: Callable[[], object], rounds: int,
                 sample_s: float = 0.02) -> tuple[float, float, float]:
    """(median, p20, p80) of time(A) / time(B) over ``rounds`` rounds run in alternating order."""
    def per_call(f: Callable[[], object], calls: int) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        return (time.perf_counter() - t0) / calls

    fa(), fb()
    calls = max(1, int(sample_s / max(per_call(fa, 3), 1e-7)))
    ratios = []
    for r in range(rounds):
        if r % 2 == 0:
            ta, tb = per_call(fa, calls), per_call(fb, calls)
        else:
            tb, ta = per_call(fb, calls), per_call(fa, calls)
        ratios.append(ta / tb)
    q = statistics.quantiles(ratios, n=5)
    return statistics.median(ratios), q[0], q[-1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--shapes", nargs="+", default=["384x384x1024", "1536x384x128", "4096x4096x1", "4096x4096x256"])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=0, help="default: torch's thread count")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--bias", action="store_true", help="with a bias (the epilogue adds it)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), help="fused into the epilogue")
    p.add_argument("--no-check", action="store_true", help="skip comparing A's and B's outputs (ablations)")
    p.add_argument("--isa", nargs="+", default=[], help="targets of A and B (one: both); default: the library's")
    a = p.parse_args(argv)
    threads = a.threads or torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        targets = (a.isa * 2)[:2] if a.isa else [None, None]
        same = targets[0] == targets[1] and Path(a.a).read_bytes() == Path(a.b).read_bytes()
        libs = [build(Path(a.a), Path(tmp), "a", targets[0]),
                build(Path(a.b), Path(tmp), "b", targets[1], same_as=Path(tmp) / "sparse_cpu_a.so" if same else None)]
        for spec in a.shapes:
            out, inp, n = (int(v) for v in spec.split("x"))
            w = torch.randn(out, inp, generator=gen)
            w[torch.rand(out, inp, generator=gen) < a.sparsity] = 0.0
            state = ours_cpu.prepare_csr(CSR.from_dense(w))
            x = torch.randn(n, inp, generator=gen)
            ys = [torch.empty(n, out), torch.empty(n, out)]
            bias = torch.randn(out, generator=gen) if a.bias else None
            fa, fb = (csr_call(lib, state, x, y, threads, bias, a.activation) for lib, y in zip(libs, ys))
            fa(), fb()
            if not a.no_check:
                torch.testing.assert_close(ys[1], ys[0], rtol=1e-4, atol=1e-4)
            med, p20, p80 = paired_ratio(fa, fb, a.rounds)
            print(f"{spec:>18} sparsity {a.sparsity}: B/A speed {med:.3f} (p20 {p20:.3f}, p80 {p80:.3f})", flush=True)


if __name__ == "__main__":
    main()
