"""Our C++ CPU kernels (kernels/ours_cpu.py) against the fp32 reference; their build, cache and fallback.

The reference grids run on every build this CPU can execute (``cpp.ISAS``: an AVX-512 machine runs the
avx512, avx2 and x86-64 builds), through the library's own Python path with that build loaded (``isa``).
"""
import functools
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_ops.activations import ACTIVATIONS, CODES
from sparse_ops.dispatch import kernel_for
from sparse_ops.formats import CSR, TwoFour
from sparse_ops.kernels import cpp, ours_cpu, reference
from sparse_ops.linear import SparseLinear
from sparse_ops.post import AddNorm
from tests.test_formats import two_four, unstructured
from tests.test_kernels import close_to_reference

needs_native = pytest.mark.skipif(not cpp.available(), reason="native CPU kernels unavailable (no compiler)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd sizes, a single row/column, in > tile panel (several token tiles), out not a multiple of the row block
SHAPES = [(1, 4), (7, 12), (33, 64), (70, 40), (5, 2000), (0, 8), (3, 0)]
# 1 (gemv), <= 8 (one 8-wide vector), then 16-wide tiles with every remainder width, several tiles
BATCHES = [1, 2, 8, 9, 17, 100, 256]
SPARSITIES = [0.0, 0.5, 0.9, 0.999, 1.0]
# Every target this CPU runs; float16 (widened to float32 at prepare: the float32 kernels) on the default only
RUNNABLE_ISAS = [name for name, target in cpp.ISAS.items() if cpp.runs_here(target)] or ["native"]
ISA_DTYPES = [(i, d) for i in RUNNABLE_ISAS for d in DTYPES if d != torch.float16 or i == RUNNABLE_ISAS[0]]


@functools.cache
def _build_for(target):
    return cpp.open_library(cpp.build(target=target))


@pytest.fixture
def isa(request, monkeypatch):
    """The kernels of this test are the build for request.param (loaded in place of the default one)."""
    if cpp.available() and request.param != cpp.isa():
        lib = _build_for(request.param)
        monkeypatch.setattr(cpp, "_load", lambda: lib)
    return request.param


def run_native(fmt, x, bias):
    prepare, matmul = {CSR: (ours_cpu.prepare_csr, ours_cpu.csr_matmul),
                       TwoFour: (ours_cpu.prepare_two_four, ours_cpu.two_four_matmul)}[type(fmt)]
    with torch.inference_mode():
        return matmul(prepare(fmt), x, bias)


def check(fmt, batch, dtype, bias=True):
    out, inp = fmt.shape
    x = torch.randn(batch, inp, dtype=dtype)
    b = torch.randn(out, dtype=dtype) if bias else None
    y = run_native(fmt, x, b)
    assert y.shape == (batch, out) and y.dtype == dtype
    ref = reference.REFERENCE[fmt.format](fmt, x) + (b.float() if bias else 0.0)
    close_to_reference(y, ref, dtype, inp)


@needs_native
@pytest.mark.parametrize("isa,dtype", ISA_DTYPES, indirect=["isa"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
def test_csr_matches_reference(shape, batch, sparsity, isa, dtype):
    check(CSR.from_dense(unstructured(shape, sparsity, dtype)), batch, dtype, bias=batch % 2 == 1)


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("panels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.999])
@pytest.mark.parametrize("batch", [2, 9, 16, 33, 64, 200])
def test_both_csr_kernels_match_reference(batch, sparsity, dtype, panels, isa, monkeypatch):
    # The plain and the panelled kernel on the same weights whatever use_panels would pick: 2-256 tokens,
    # partial tiles, empty rows, several row blocks and column panels.
    monkeypatch.setattr(ours_cpu, "use_panels", lambda *args: panels)
    w = unstructured((70, 300), sparsity, dtype)
    w[5:9] = 0.0
    check(CSR.from_dense(w), batch, dtype)


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("batch", [1, 2, 9, 40])
@pytest.mark.parametrize("shape", [(1, 1), (7, 12), (33, 64), (70, 130), (5, 2000), (3, 0)])
def test_the_column_mask_copy_matches_reference(shape, batch, sparsity, dtype, isa):
    # the one-token variant "mask" (values placed by a permute per 8 columns: odd widths, empty rows, the last row
    # ending at the last value) and, for the decoder's prompts, the same copy at more tokens (its bits walked)
    w = unstructured(shape, sparsity, dtype)
    w[:2] = 0.0
    fmt = CSR.from_dense(w)
    m = ours_cpu.masked(ours_cpu.prepare_csr(fmt))
    assert m.layout == f"csr_mask_{ours_cpu.VALUE_CODE[dtype]}"
    assert m.tensors[1].shape == (shape[0], (shape[1] + 7) // 8)
    x, b = torch.randn(batch, shape[1], dtype=dtype), torch.randn(shape[0], dtype=dtype)
    with torch.inference_mode():
        y = ours_cpu._matmul(m, x, b, False, CODES["gelu"], None)
    ref = F.gelu(reference.REFERENCE["csr"](fmt, x) + b.float())
    close_to_reference(y, ref, dtype, shape[1])


@needs_native
def test_the_mask_variant_is_a_one_token_choice_of_the_csr_kernel():
    fmt = CSR.from_dense(unstructured((64, 96), 0.6))
    state = ours_cpu.prepare_csr(fmt)
    assert ours_cpu.csr_variants(1) == ("plain", "mask") and "mask" not in ours_cpu.csr_variants(2)
    assert state.masked is None  # built at its first use, then kept
    x = torch.randn(1, 96)
    with torch.inference_mode():
        y = ours_cpu.csr_matmul(state, x, None, variant="mask")
        assert state.masked is not None and ours_cpu.masked(state) is state.masked
        torch.testing.assert_close(y, ours_cpu.csr_matmul(state, x, None, variant="plain"), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="unknown kernel variant 'mask' for 3 tokens"):
            ours_cpu.csr_matmul(state, torch.randn(3, 96), None, variant="mask")


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("batch", [1, 8, 40, 100])
def test_epilogue_and_post_op_on_every_build(batch, activation, isa):
    # The fused activation (vectorised for the build's ISA or not) with a bias, then the residual + LayerNorm
    # post-op, on the gemv, plain and panelled paths.
    w = unstructured((37, 300), 0.8)
    state = ours_cpu.prepare_csr(CSR.from_dense(w))
    x, b, r, g, beta = torch.randn(batch, 300), torch.randn(37), torch.randn(batch, 37), torch.randn(37), \
        torch.randn(37)
    with torch.inference_mode():
        y = ours_cpu.csr_matmul(state, x, b, activation)
        torch.testing.assert_close(y, ACTIVATIONS[activation](x @ w.t() + b), rtol=1e-5, atol=1e-5)
        y = ours_cpu.csr_matmul(state, x, b, None, AddNorm(r, g, beta))
    ref = torch.nn.functional.layer_norm(x @ w.t() + b + r, (37,), g, beta, 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("gated,tokens", [(False, 1), (False, 40), (True, 9), (True, 100)])
def test_moe_kernel_on_every_build(tokens, gated, isa, monkeypatch):
    # MoE inference in one C++ call (routing, dispatch, the experts' dense tiles, combine) equals the torch path
    import sparse_ops.layers.moe as moe_module

    moe = moe_module.MoE(24, 40, num_experts=6, top_k=2, gated=gated).eval()
    x = torch.randn(tokens, 24)
    with torch.inference_mode():
        y = moe(x)
        monkeypatch.setattr(moe_module, "moe_forward", lambda *a, **k: None)
        torch.testing.assert_close(y, moe(x), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("isa,dtype", ISA_DTYPES, indirect=["isa"])
@pytest.mark.parametrize("extra", [0.0, 0.9, 1.0])  # exactly 2:4, sparser, all zero
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", [(1, 4), (7, 12), (33, 64), (5, 2000), (9, 36), (3, 0)])
def test_two_four_matches_reference(shape, batch, extra, isa, dtype):
    # in/4 = 3, 16, 500, 9 groups: odd group counts (a padding nibble) and tails after 8-group steps
    check(TwoFour.from_dense(two_four(shape, dtype, extra)), batch, dtype, bias=batch % 2 == 0)


@needs_native
@pytest.mark.parametrize("batch", [1, 8, 33])
def test_csr_with_int32_columns(batch):
    w = unstructured((3, 40000), 0.99)  # in > 32767: int32 column indices
    fmt = CSR.from_dense(w)
    assert fmt.col_indices.dtype == torch.int32
    check(fmt, batch, torch.float32)


@needs_native
def test_empty_rows_and_noncontiguous_input():
    w = unstructured((20, 48), 0.6)
    w[::3] = 0.0  # every third row empty
    fmt = CSR.from_dense(w)
    x = torch.randn(48, 11).t()  # (11, 48), transposed view
    torch.testing.assert_close(run_native(fmt, x, None), x @ w.t(), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("format", ["csr", "2:4"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (4, 0), (2, 64)])
def test_sparse_linear_takes_our_kernel_with_leading_dims(format, lead):
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(two_four((24, 64), extra_sparsity=0.5))
    layer = SparseLinear.from_dense(lin, format)
    assert layer.kernel.name == f"cpu.{format}"
    x = torch.randn(*lead, 64)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)


@needs_native
def test_gradient_falls_back_to_torch():
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight.copy_(unstructured((8, 16), 0.7))
    layer = SparseLinear.from_dense(lin)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(4, 16))


@pytest.mark.parametrize("shape", [(1, 4), (70, 300), (129, 257), (3, 0)])
@pytest.mark.parametrize("rows, width", [(64, 128), (2, 4), (5, 256)])
def test_panel_parts_hold_the_same_matrix(shape, rows, width):
    # Rebuild the dense weight from (seg, lcol, values) by the layout's own arithmetic: q = (b * npanels + p)
    # * rows + i holds row b * rows + i's nonzeros in columns p * width + lcol.
    w = unstructured(shape, 0.8)
    w[1::4] = 0.0  # empty rows
    csr = CSR.from_dense(w)
    seg, lcol, vals = ours_cpu.panel_parts(csr.crow_indices, csr.col_indices, csr.values, shape, rows, width)
    out, inp = shape
    npanels = -(-inp // width)
    rebuilt = torch.zeros(shape)
    for q in range(len(seg) - 1):
        b, rem = divmod(q, npanels * rows)
        p, i = divmod(rem, rows)
        k0, k1 = int(seg[q]), int(seg[q + 1])
        if k1 > k0:
            cols = p * width + lcol[k0:k1].long()
            assert b * rows + i < out and bool((cols < min(inp, (p + 1) * width)).all())
            rebuilt[b * rows + i, cols] = vals[k0:k1]
    assert lcol.dtype == torch.uint8 and int(seg[-1]) == csr.values.numel()
    assert torch.equal(rebuilt, w)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [16, 40, 300])
def test_large_batch_kernel_same_with_any_thread_count(threads, batch):
    # work items (row block, run of tiles) depend on the thread count; every count gives the same sums
    fmt = CSR.from_dense(unstructured((200, 300), 0.9))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(fmt, batch, torch.float32)
    finally:
        torch.set_num_threads(old)


def test_prepare_rejects_bad_indices_before_native_code():
    good = CSR.from_dense(unstructured((4, 8), 0.5))
    bad = CSR(good.crow_indices, torch.full_like(good.col_indices, 8), good.values, (4, 8))
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 8\)"):
        ours_cpu.prepare_csr(bad)
    t = TwoFour.from_dense(two_four((2, 8)))
    with pytest.raises(ValueError, match="invalid position codes"):
        ours_cpu.prepare_two_four(TwoFour(t.values, torch.full_like(t.metadata, 0xFF), (2, 8)))


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++: the build path cannot run here")
def test_build_compiles_into_a_fresh_cache_and_loads(tmp_path, monkeypatch):
    # What CI does on a fresh machine: nothing cached, compile once, then reuse the cached file.
    monkeypatch.setenv("SPARSE_OPS_CACHE", str(tmp_path))
    path = cpp.build()
    assert path.parent == tmp_path and path.stat().st_size > 0 and list(tmp_path.iterdir()) == [path]
    assert cpp.build() == path  # cached: same file, no second copy
    import ctypes
    assert ctypes.CDLL(str(path)).sparse_cpu_abi_version() == cpp.ABI_VERSION


def test_build_failure_names_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_OPS_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="false failed building sparse_cpu.cpp"):
        cpp.build(compiler=shutil.which("false") or "false")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


@pytest.mark.parametrize("how", ["disabled", "unbuildable"])
def test_falls_back_to_torch_kernels(how, monkeypatch):
    if how == "disabled":
        monkeypatch.setenv("SPARSE_OPS_NATIVE", "0")
    else:  # what a machine without a compiler sees
        monkeypatch.setattr(cpp, "_load", lambda: "RuntimeError: no C++ compiler found")
    assert not cpp.available()
    assert kernel_for("csr", "cpu").name == "torch.cpu.csr"
    assert kernel_for("2:4", "cpu").name == "torch.cpu.2:4"
    w = two_four((12, 32), extra_sparsity=0.3)
    lin = nn.Linear(32, 12)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(5, 32)
    for format in ("csr", "2:4"):
        layer = SparseLinear.from_dense(lin, format)
        assert layer.kernel.name == f"torch.cpu.{format}"
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)


def test_out_of_memory_in_the_kernel_raises_memory_error():
    # The entry points return 1 when the packed-x scratch buffer cannot be allocated (nothing is computed).
    cpp._check_status(0, None, ())
    with pytest.raises(MemoryError, match="out of memory"):
        cpp._check_status(1, None, ())


@needs_native
def test_panelled_copy_is_built_at_the_first_batch_that_needs_it():
    w = unstructured((64, 300), 0.9)
    state = ours_cpu.prepare_csr(CSR.from_dense(w))
    assert state.panel_call is None and state.panels == ()  # batch-1 servers hold the weight once
    with torch.inference_mode():
        for n in (1, 8):  # gemv, plain-CSR kernel: no panels
            assert ours_cpu.csr_matmul(state, torch.randn(n, 300), None).shape == (n, 64)
        assert state.panel_call is None
        x = torch.randn(64, 300)
        assert ours_cpu.pick_csr(state, 64) == "panels"
        torch.testing.assert_close(ours_cpu.csr_matmul(state, x, None, variant="panels"), x @ w.t(), rtol=1e-5,
                                   atol=1e-5)
    _seg, lcol, vals = state.panels
    assert state.panel_call is not None and lcol.numel() == vals.numel() == int((w != 0).sum())


@needs_native
@pytest.mark.parametrize("isa", RUNNABLE_ISAS, indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,batch", [((40, 300), 300), ((64, 64), 257), ((300, 40), 300), ((33, 600), 1100),
                                         ((64, 200), 120), ((300, 40), 1030)])
def test_panelled_schedules_match_reference(shape, batch, dtype, threads, isa):
    # Both schedules of the panelled kernel: by tile (in >= out, several 64-token tiles per thread, a partial
    # last tile; 120 tokens on 2 threads: 32-token tiles; out > in with 16 tiles or more) and by row block
    # (out > in, fewer tiles), on one and two threads.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(CSR.from_dense(unstructured(shape, 0.9, dtype)), batch, dtype)
    finally:
        torch.set_num_threads(old)


@needs_native
def test_panelled_copy_is_built_once_under_concurrent_calls():
    from concurrent.futures import ThreadPoolExecutor
    w = unstructured((96, 200), 0.8)
    state = ours_cpu.prepare_csr(CSR.from_dense(w))
    xs = [torch.randn(64, 200) for _ in range(8)]
    with torch.inference_mode(), ThreadPoolExecutor(4) as pool:
        ys = list(pool.map(lambda x: ours_cpu.csr_matmul(state, x, None, variant="panels"), xs))
    first = state.panels
    for x, y in zip(xs, ys):
        torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)
    ours_cpu.panelled(state)
    assert state.panels is first  # built once


@needs_native
def test_gemv_of_a_weight_too_big_for_cache_matches_reference():
    # Above 16 MiB of nonzeros (int16 columns + fp32 values) the gemv gathers x instead of loading it lane by
    # lane: a dense 1800x1800 weight as CSR is 19 MB.
    w = torch.randn(1800, 1800)
    w[0, :] = 0.0  # an empty row
    check(CSR.from_dense(w), 1, torch.float32)


def test_an_isa_this_cpu_cannot_run_or_an_unknown_one_is_refused_with_the_reason(monkeypatch):
    # SPARSE_OPS_ISA is checked before anything is built or loaded: the library is then unavailable (torch's
    # kernels run) and the logged reason names the value and what is allowed, or what the CPU lacks.
    monkeypatch.setenv("SPARSE_OPS_ISA", "avx9")
    assert cpp._load.__wrapped__() == \
        "UserValueError: SPARSE_OPS_ISA='avx9' is not a target; allowed: avx512, avx2, x86-64, neon"
    foreign = "avx2" if cpp.machine() == "aarch64" else "neon"
    monkeypatch.setenv("SPARSE_OPS_ISA", foreign)
    assert cpp._load.__wrapped__().startswith(f"this CPU cannot run the {foreign} build (SPARSE_OPS_ISA")


@needs_native
def test_the_cpp_and_python_constants_are_checked_against_each_other(monkeypatch):
    lib = cpp.library()
    assert cpp.constants_mismatch(lib) is None
    from sparse_ops import activations

    monkeypatch.setitem(activations.CODES, "silu", 7)  # a Python table edited without the C++ enum
    assert cpp.constants_mismatch(lib) == "the C++ and Python constants differ (act.silu: C++ 4, Python 7)"


def test_unwritable_cache_folder_falls_back_to_a_private_one_said_once(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a folder cannot be made under a file (whoever runs the test, root included)
    monkeypatch.setenv("SPARSE_OPS_CACHE", str(blocked / "cache"))
    cpp._usable_cache_dir.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=cpp.log.name):
            first, again = cpp.cache_dir(), cpp.cache_dir()
        assert first == again and first.is_dir() and os.access(first, os.W_OK)
        assert not first.is_relative_to(blocked) and not first.stat().st_mode & 0o022
        said = [r for r in caplog.records if "cannot be written" in r.getMessage()]
        assert len(said) == 1 and str(blocked / "cache") in said[0].getMessage()
    finally:
        cpp._usable_cache_dir.cache_clear()
