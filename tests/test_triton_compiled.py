"""The GPU kernels' compiled code, checked without a GPU (issue 32): every Triton kernel (``triton_sparse``'s
tiled-bitmap kernel, ``triton_two_four``, ``triton_moe``) is compiled for sm_80 and sm_90
(``sparse_ops.kernels.triton_compiled``: PTX and cubin, no device) and its code must show what the design needs:

- no spills: no local memory in the cubin (Triton's ``n_spills`` == 0) and no ``.local`` in the PTX;
- registers per thread within ``MAX_REGISTERS_DECODE`` for the configs that run at 1-16 tokens (token block
  16, MoE) and within ``MAX_REGISTERS`` for the 64-token block;
- tensor-core instructions (``mma.sync`` / ``wgmma``) in every kernel that calls ``tl.dot``;
- the weight's values loaded as vectors (``ld.global.v2`` / ``.v4``) or by ``cp.async``, at least
  ``MIN_WEIGHT_LOAD_BYTES`` per instruction, never as scalar 2-byte gathers;
- split-K reduced in the one launch: each program's arrival on its output tile's counter is one ``acq_rel``
  atomic at GPU scope behind a CTA barrier that follows the partial stores, and the last program reads the
  partials from L2 (``ld.global.cg``), as vectors.

The last check is what the issue 32.1 redesign bought: the tiled-bitmap kernel loads each tile's values as one
16-byte-aligned block (``triton_sparse.AlignedTiles``) and the 2:4 kernel its rows' values and codes as blocks,
both through ``cp.async``; before it, both gathered 2-byte values one by one. A change that falls back to
scalar gathers fails here.

The compiles run in two subprocesses (one per target, in parallel; TRITON_INTERPRET unset, a private cache):
this session's other tests run the kernels in Triton's interpreter, which breaks an in-process compile.
"""
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _optional import import_or_skip, required

import_or_skip("triton", reason="the Triton kernels need triton (pip install prune-sparse[gpu])")

from sparse_ops.kernels import triton_compiled as tc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# target_programs launches 4 programs per SM at 1-16 tokens; 4 blocks of 128 threads fit the 64K-register
# file only at <= 128 registers per thread (65536 / (4 x 128)) (each case's count: python -m
# sparse_ops.kernels.triton_compiled)
MAX_REGISTERS_DECODE = tc.REGISTERS_PER_SM // (4 * tc.THREADS_PER_BLOCK)
# the 64-token block (more than 32 tokens) does 4x the MMA work per weight byte: 2 resident blocks per SM
# (<= 256, ptxas's own limit is 255) keep one loading while the other computes; 192 (65536 / (192 x 128) = 2.7
# blocks) leaves a margin
MAX_REGISTERS = 192
# a pair of 2-byte values (ld.global.v2.b16) is still a gather; the redesign loads 16-byte blocks
MIN_WEIGHT_LOAD_BYTES = 8



def _decode(case: tc.Case) -> bool:
    """The config runs at 1-16 tokens (autotune keeps only 16-token blocks there)."""
    return case.constexprs.get("BLOCK_N", 16) == 16


@functools.cache
def _facts() -> dict[tuple[str, int], dict]:
    """Every case's compiled facts per target, from one subprocess per target (run in parallel)."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        if required("triton"):
            pytest.fail("triton has no NVIDIA backend (PRUNE_SPARSE_REQUIRE=triton)")
        pytest.skip("triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        procs = []
        for arch in tc.TARGETS:
            env_arch = dict(env, TRITON_CACHE_DIR=str(Path(cache) / str(arch)))  # a fresh compile
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sparse_ops.kernels.triton_compiled", "--arch", str(arch)], env=env_arch,
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        found = {}
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            found.update({(f["case"], f["arch"]): f for f in json.loads(out.strip().splitlines()[-1])})
    return found


def _params(cases):
    return [pytest.param(case, arch, id=f"{case.name}-sm{arch}") for case in cases for arch in tc.TARGETS]


def test_every_case_compiled():
    assert set(_facts()) == {(c.name, arch) for c in tc.CASES for arch in tc.TARGETS}


@pytest.mark.parametrize("case, arch", _params(tc.CASES))
def test_no_spills(case, arch):
    """No local memory: nothing spilled (cubin) and nothing placed there by the PTX."""
    f = _facts()[case.name, arch]
    assert f["n_spills"] == 0 and f["local_bytes"] == 0 and f["stack_bytes"] == 0, f
    assert f["ptx_local"] == 0, f


@pytest.mark.parametrize("case, arch", _params(tc.CASES))
def test_registers_bounded(case, arch):
    """Registers per thread leave the blocks per SM the launch counts on."""
    f = _facts()[case.name, arch]
    bound = MAX_REGISTERS_DECODE if _decode(case) else MAX_REGISTERS
    assert 0 < f["regs"] <= bound, f"{f['regs']} registers > {bound} ({tc.blocks_per_sm(f['regs'])} blocks/SM)"


@pytest.mark.parametrize("case, arch", _params([c for c in tc.CASES if c.dot]))
def test_tensor_cores(case, arch):
    """``tl.dot`` on fp16 / bf16 lowers to tensor-core MMAs (mma.sync on sm_80, mma.sync or wgmma on sm_90)."""
    assert _facts()[case.name, arch]["mma"] > 0


@pytest.mark.parametrize("case, arch", _params([c for c in tc.CASES if c.weight]))
def test_weight_values_loaded_as_vectors(case, arch):
    """Every load of the weight's values (attributed by PTX line info to its ``tl.load``) is a vector load or
    a cp.async of >= MIN_WEIGHT_LOAD_BYTES per thread: no ``ld.global.b16`` / ``.u16`` gathers."""
    loads = _facts()[case.name, arch]["weight_loads"]
    assert loads, "no load of the weight's values found in the PTX (line info missing?)"
    least = _least_load_bytes(case)
    scalar = {k: n for k, n in loads.items() if not tc.wide_load(k, least)}
    assert not scalar, f"weight loads under {least} bytes per thread: {scalar} (all: {loads})"


def _least_load_bytes(case: tc.Case) -> int:
    """MIN_WEIGHT_LOAD_BYTES, or a sparse layer's whole value block spread over the block's threads where that
    is less (a 256-value fp16 block is 4 bytes per thread: loaded whole, coalesced, as wide as it can be)."""
    block_v = case.constexprs.get("BLOCK_V")
    if block_v is None:
        return MIN_WEIGHT_LOAD_BYTES
    size = 1 if case.types["values"] == "*i8" else 2
    return min(MIN_WEIGHT_LOAD_BYTES, block_v * size // tc.THREADS_PER_BLOCK)


@pytest.mark.parametrize("case, arch", _params([c for c in tc.CASES if c.constexprs.get("PARTIAL")]))
def test_split_k_reduced_in_one_launch(case, arch):
    """The ordering the last-program reduction relies on, as compiled: stores, barrier, one release-acquire
    arrival at GPU scope; the partials read back through L2 (a stale L1 line would be a wrong sum)."""
    f = _facts()[case.name, arch]
    assert len(f["arrivals"]) == 1, f["arrivals"]
    arrival = f["arrivals"][0]
    assert {".acq_rel", ".gpu"} <= set(arrival["instruction"].replace(".", " .").split()), arrival
    assert arrival["fenced"], "no CTA barrier between the partial stores and the arrival"
    loads = f["partial_loads"]
    assert loads and all(k.startswith("ld.global.cg") and tc.wide_load(k) for k in loads), loads


def test_load_classification():
    """The helpers that read the PTX, on hand-written lines."""
    ptx = "\n".join([
        '.file 1 "/k.py"',
        ".loc 1 10 5",
        "@%p1 ld.global.b16 { %rs1 }, [ %rd1 + 0 ];",
        ".loc 1 11 5",
        "ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];",
        "cp.async.cg.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 0x10, %r6;",
    ])
    assert tc.ptx_global_loads(ptx) == {"ld.global.b16/2": 1, "ld.global.v4.b32/16": 1,
                                        "cp.async.cg.shared.global/16": 1}
    assert tc.ptx_global_loads(ptx, {("/k.py", 10, 5)}) == {"ld.global.b16/2": 1}
    # a masked vector load: an inline-asm block whose .loc lines count up; the block's first is the load's
    asm = "\n".join(['.file 1 "/k.py"', "// begin inline asm", ".loc 1 20 7", "mov.u32 %r1, %r9;", ".loc 1 21 7",
                     "mov.u32 %r2, %r9;", "@%p1 ld.global.cg.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ];", "// end inline asm"])
    assert tc.ptx_global_loads(asm, {("/k.py", 20, 7)}) == {"ld.global.cg.v2.b32/8": 1}
    arrival = "\n".join(["st.global.cg.v4.b32 [ %rd1 + 0 ], { %r1, %r2, %r3, %r4 };", "bar.sync 0;",
                         "@%p1 atom.global.gpu.acq_rel.add.u32 %r5, [ %rd2 + 0 ], %r6;",
                         "st.global.b32 [ %rd3 + 0 ], { %r7 };", "atom.global.gpu.relaxed.add.u32 %r8, [ %rd2 + 0 ], 1;"])
    assert tc.arrivals(arrival) == [{"instruction": "atom.global.gpu.acq_rel.add.u32", "fenced": True},
                                    {"instruction": "atom.global.gpu.relaxed.add.u32", "fenced": False}]
    assert not tc.wide_load("ld.global.b16/2") and not tc.wide_load("ld.global.v2.b16/4")
    assert tc.wide_load("ld.global.nc.v4.b32/16") and tc.wide_load("cp.async.cg.shared.global/16")
    assert tc.wide_load("ld.global.b32/4", 4) and not tc.wide_load("ld.global.b16/2", 4)
    assert tc.blocks_per_sm(128) == 4 and tc.blocks_per_sm(152) == 3
