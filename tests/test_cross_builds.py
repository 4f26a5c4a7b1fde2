"""The C++ kernels built for another CPU and run there against ``kernels/reference.py``: aarch64 (NEON)
cross-compiled with Debian's ``g++-aarch64-linux-gnu`` and run under ``qemu-aarch64`` (``qemu-user``), which
``.ci/run`` installs. A small C++ driver (``tests/native_driver.cpp``) calls every entry point on cases this
file writes (weights in each stored layout, inputs, the reference's outputs). The same driver built for this
machine checks the driver itself wherever the cross tools are missing.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

import sparse_ops.layers.moe as moe_module
from sparse_ops.activations import ACTIVATIONS, CODES
from sparse_ops.formats import CSR, TwoFour
from sparse_ops.kernels import cpp, ours_cpu, reference
from sparse_ops.layers.moe import MoE, expert_capacity
from sparse_ops.quantized import BitmapInt8, CSRInt8, DenseInt8
from tests.test_attention import reference as reference_attention
from tests.test_formats import two_four, unstructured

DRIVER = Path(__file__).with_name("native_driver.cpp")
CROSS_CXX, QEMU = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
ON_ARM = cpp.machine() == "aarch64"
TOL_E6 = 100  # |y - ref| <= 1e-4 (1 + |ref|): fp32 sums in another order, the fitted erf / exp


def _write_case(f, name: str, scalars: list[int], arrays: list[torch.Tensor | None]) -> None:
    f.write(struct.pack("<I", len(name)) + name.encode())
    sc = [*scalars, TOL_E6]
    f.write(struct.pack(f"<I{len(sc)}q", len(sc), *sc))
    f.write(struct.pack("<I", len(arrays)))
    for a in arrays:
        if a is None:
            raw = b""
        else:
            a = a.detach().contiguous()
            raw = a.numpy().tobytes()
        f.write(struct.pack("<Q", len(raw)) + raw)


def _expected(y: torch.Tensor, bias: torch.Tensor | None, act: str | None) -> torch.Tensor:
    y = y if bias is None else y + bias
    return y if act is None else ACTIVATIONS[act](y)


def write_cases(path: Path) -> int:
    """Every entry point over odd shapes, 1-256 tokens, sparsity 0-0.999, fp32 and bf16, with and without a
    bias and an activation; returns the number of cases."""
    gen = torch.Generator().manual_seed(0)
    count = 0
    with open(path, "wb") as f:
        for (out, inp), sparsity, dtype in [((37, 300), 0.9, torch.float32), ((70, 40), 0.0, torch.bfloat16),
                                            ((5, 2000), 0.999, torch.float32), ((64, 256), 0.5, torch.bfloat16),
                                            ((1, 4), 0.5, torch.float32)]:
            w = unstructured((out, inp), sparsity, dtype)
            if out > 3:
                w[:3] = 0.0  # empty rows
            csr = CSR.from_dense(w)
            code, vals = ours_cpu._value_code(csr.values), ours_cpu._values(csr.values)
            crow, col = csr.crow_indices.to(torch.int32), csr.col_indices
            seg, lcol, pvals = ours_cpu.panel_parts(crow, col, vals, (out, inp), ours_cpu.PANEL_ROWS,
                                                      ours_cpu.PANEL_WIDTH)
            for n, act in [(1, None), (2, "relu"), (8, "gelu"), (9, None), (40, "silu"), (100, "gelu_tanh"),
                           (256, None)]:
                x = torch.randn(n, inp, generator=gen)
                bias = torch.randn(out, generator=gen) if n % 2 else None
                want = _expected(reference.csr_matmul(csr, x), bias, act)
                for icode, c in (("i16", col.to(torch.int16)), ("i32", col.to(torch.int32))):
                    _write_case(f, f"csr_{code}_{icode}", [out, inp, n, 2, CODES[act]],
                                [crow, c, vals, x, bias, want])
                    count += 1
                if n > 1:
                    _write_case(f, f"csr_panels_{code}", [out, inp, ours_cpu.PANEL_ROWS, ours_cpu.PANEL_WIDTH,
                                                          ours_cpu.panel_tile(n), n, 2, CODES[act]],
                                [seg, lcol, pvals, x, bias, want])
                    count += 1
                if inp % 4 == 0:
                    tf = TwoFour.from_dense(two_four((out, inp), dtype, sparsity / 2))
                    tcode, tvals = ours_cpu._value_code(tf.values), ours_cpu._values(tf.values)
                    want24 = _expected(reference.two_four_matmul(tf, x), bias, act)
                    _write_case(f, f"two_four_{tcode}", [out, inp, n, 2, CODES[act]],
                                [tvals, tf.metadata, x, bias, want24])
                    count += 1
        for (out, inp), sparsity in [((37, 300), 0.9), ((70, 130), 0.0), ((64, 256), 0.5), ((33, 64), 0.999)]:
            count += _write_int8_cases(f, unstructured((out, inp), sparsity, torch.float32), gen)
        for hidden, (inp, out), n, dtype in [(96, (40, 24), 40, torch.float32),
                                             (300, (64, 70), 130, torch.bfloat16)]:
            up, down = (CSR.from_dense(unstructured(s, 0.7, dtype)) for s in ((hidden, inp), (out, hidden)))
            parts = []
            for m, shape in ((up, (hidden, inp)), (down, (out, hidden))):
                code, vals = ours_cpu._value_code(m.values), ours_cpu._values(m.values)
                parts += ours_cpu.panel_parts(m.crow_indices.to(torch.int32), m.col_indices, vals, shape,
                                                ours_cpu.PANEL_ROWS, ours_cpu.PANEL_WIDTH)
            x, bu, bd = torch.randn(n, inp, generator=gen), torch.randn(hidden, generator=gen), torch.randn(out)
            want = reference.csr_matmul(down, ACTIVATIONS["gelu"](reference.csr_matmul(up, x) + bu)) + bd
            _write_case(f, f"csr_ffn_{code}", [inp, hidden, out, ours_cpu.PANEL_ROWS, ours_cpu.PANEL_WIDTH,
                                               ours_cpu.panel_tile(n), n, 2, CODES["gelu"]],
                        [None, None, None, *parts, x, None, bu, bd, want])
            count += 1
        for tokens, gated, capacity_factor in [(9, False, None), (40, True, 0.6)]:  # routing to combine
            moe = MoE(24, 40, num_experts=5, top_k=2, gated=gated, capacity_factor=capacity_factor).eval()
            x = torch.randn(tokens, 24, generator=gen)
            with torch.inference_mode():
                logits = moe.router(x)
                cap = -1 if capacity_factor is None else expert_capacity(tokens, 2, 5, capacity_factor)
                with patch.object(moe_module, "moe_forward", lambda *a, **k: None):  # the torch path
                    want = moe(x)
            _write_case(f, "moe_forward_f32", [tokens, 2, cap, 5, 24, 40, 2, CODES[moe.config.activation]],
                        [logits, x, moe.w_in, moe.b_in, moe.w_gate, moe.b_gate, moe.w_out, moe.b_out, want])
            count += 1
        for (B, H, Hk, S, L, D), causal, masked in [((2, 4, 2, 37, 45, 20), True, False),
                                                    ((1, 3, 3, 33, 70, 32), False, True)]:
            q, k, v = (torch.randn(B, h, n, D, generator=gen) for h, n in ((H, S), (Hk, L), (Hk, L)))
            mask = torch.randn(B, H, S, L, generator=gen) if masked else None
            want = reference_attention(q, k, v, mask, 0.25, causal)
            _write_case(f, "attention_f32", [B, H, Hk, S, L, D, 250000, int(causal), 2], [q, k, v, mask, want])
            count += 1
    return count


def _write_int8_cases(f, w: torch.Tensor, gen: torch.Generator) -> int:
    """The three int8 entry points (the bitmap's both one-token paths), with float and with int8 inputs
    (``cpp.LINEAR_FLAGS``), on one weight at 1-100 tokens."""
    out, inp = w.shape
    w[:3] = 0.0  # empty rows
    count = 0
    for bits in (None, 8):
        dense, csr, bitmap = (cls.from_dense(w).with_input_bits(bits) for cls in (DenseInt8, CSRInt8, BitmapInt8))
        flags = cpp.LINEAR_FLAGS["int8_input"] if bits else 0
        for n, act in [(1, None), (3, "gelu"), (8, None), (40, "silu"), (100, None)]:
            x = torch.randn(n, inp, generator=gen)
            bias = torch.randn(out, generator=gen) if n % 2 else None
            want = _expected(reference.dense_int8_matmul(dense, x), bias, act)
            _write_case(f, "dense_i8", [out, inp, flags, n, 2, CODES[act]], [dense.values, dense.scales, x, bias, want])
            q = csr.q
            for icode, c in (("i16", q.col_indices.to(torch.int16)), ("i32", q.col_indices.to(torch.int32))):
                _write_case(f, f"csr_i8_{icode}", [out, inp, flags, n, 2, CODES[act]],
                            [q.crow_indices, c, q.values, csr.scales, x, bias, want])
            t = bitmap.q
            for expand in (0, cpp.LINEAR_FLAGS["bitmap_expand"]):
                _write_case(f, "bitmap_i8", [out, inp, flags | expand, n, 2, CODES[act]],
                            [t.tile_ptr, t.tile_cols, t.value_offsets, t.bitmaps, t.values, bitmap.scales, x, bias,
                             want])
            count += 5
            if n > 1 and not bits:  # the panelled kernel takes float inputs (int8 ones are quantized in Python)
                R, P = ours_cpu.PANEL_ROWS, ours_cpu.PANEL_WIDTH
                seg, lcol, vals = ours_cpu.panel_parts(q.crow_indices, q.col_indices, q.values, (out, inp), R, P)
                _write_case(f, "csr_panels_i8", [out, inp, R, P, ours_cpu.panel_tile(n), n, 2, CODES[act]],
                            [seg, lcol, vals, csr.scales, x, bias, want])
                count += 1
    return count


def _build_and_run(tmp_path: Path, target: str) -> subprocess.CompletedProcess:
    """Compile the driver for ``target`` (``cpp.ISAS``) and run it on the cases (qemu for aarch64 here)."""
    cases = tmp_path / "cases.bin"
    n = write_cases(cases)
    exe = tmp_path / f"driver_{target}"
    flags = [f for f in cpp.build_flags(target) if f not in ("-shared", "-fPIC")]
    cross = target in cpp.ISAS and cpp.ISAS[target].machine == "aarch64" and not ON_ARM
    cxx = CROSS_CXX if cross else shutil.which("g++")
    build = subprocess.run([cxx, *flags, "-o", str(exe), str(DRIVER)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    cmd = [QEMU, "-L", "/usr/aarch64-linux-gnu", str(exe)] if cross else [str(exe)]
    done = subprocess.run([*cmd, str(cases)], capture_output=True, text=True, timeout=600)
    assert done.stdout.strip().endswith(f"0 of {n} cases off"), done.stdout[-3000:] + done.stderr[-2000:]
    return done


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_driver_built_for_this_machine_matches_reference(tmp_path):
    _build_and_run(tmp_path, cpp.isa())  # a machine outside ISAS builds with -march=native


@pytest.mark.skipif(not ON_ARM and not (CROSS_CXX and QEMU),
                    reason="needs g++-aarch64-linux-gnu and qemu-user (Debian; .ci/run installs them)")
def test_aarch64_neon_build_matches_reference_under_qemu(tmp_path):
    out = _build_and_run(tmp_path, "neon")
    assert all(e in out.stdout for e in ("csr_ffn_bf16", "two_four_bf16", "moe_forward_f32", "attention_f32"))
