"""How the Triton kernels launch (issue 32.3), for the tiled-bitmap and 2:4 kernels alike: split-K reduced within
the one launch (the last program of each output tile sums the partials in split order and zeroes its counter),
the scratch kept per device and stream, the activation applied in the epilogue, int64 offsets where sizes need
them (``WIDE``), and the autotuner's choice launched directly after the first call of a key.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, whose programs run one after another:
these tests check the arithmetic and the bookkeeping; the memory ordering the reduction relies on is checked
in the compiled code (``tests/test_triton_compiled.py``) and on a GPU by the cuda-marked tests here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from _optional import import_or_skip  # noqa: E402

import_or_skip("triton", reason="the Triton kernels need triton (pip install prune-sparse[gpu])")

from sparse_ops import activations  # noqa: E402
from sparse_ops.formats import CSR, INT32_MAX, TwoFour  # noqa: E402
from sparse_ops.kernels import triton_moe  # noqa: E402
from sparse_ops.kernels import triton_sparse as ts  # noqa: E402
from sparse_ops.kernels import triton_two_four as t24  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU tensors run only under TRITON_INTERPRET=1")
DEVICE = "cpu" if INTERPRETED else "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
KERNELS = ("tiled", "two_four")


def _weight(kernel: str, out: int, inp: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A random weight in the kernel's pattern: 70% unstructured zeros, or two of every four kept."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    if kernel == "tiled":
        return (w * (torch.rand(out, inp, generator=g) >= 0.7)).to(dtype)
    keys = torch.rand(out, inp // 4, 4, generator=g)
    keep = torch.zeros_like(keys, dtype=torch.bool).scatter_(2, keys.topk(2, dim=2).indices, True)
    return (w.reshape(out, inp // 4, 4) * keep).reshape(out, inp).to(dtype)


def _product(kernel: str, w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None, *, splits: int,
             activation: str | None = None) -> torch.Tensor:
    if kernel == "tiled":
        return ts.tiled_matmul(ts.prepare(CSR.from_dense(w).to(x.device)), x, b, splits=splits,
                               activation=activation)
    return t24.two_four_matmul(t24.prepare(TwoFour.from_dense(w).to(x.device)), x, b, splits=splits,
                               activation=activation)


def _expected(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """fp32: act(x W^T + b) by torch, from the dense weight."""
    y = x.float().cpu() @ w.float().t() + (0.0 if b is None else b.float().cpu())
    return activations.apply(y, activation)


def _assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype
    scale = ref.abs().max().item() + 1.0
    torch.testing.assert_close(y.float().cpu(), ref, atol=TOL[dtype] * scale, rtol=TOL[dtype])


def _scratch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K scratch (partials, arrival counters) of x's device and the current stream."""
    return ts.workspace(x.device, 0, 0)


@needs_interpreter
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_split_k_in_one_launch(kernel, dtype):
    """Split-K is one launch whose last program per tile sums the splits: the product is the reference's, the
    counters are back at zero, a rerun gives the same bits, and the scratch is reused, not reallocated."""
    w = _weight(kernel, 70, 320, dtype)  # 3 tile rows x 5 k-tiles: 3 splits of 2, 2 and 1 tiles
    x, b = torch.randn(17, 320).to(dtype), torch.randn(70).to(dtype)  # 2 token blocks
    y = _product(kernel, w, x, b, splits=3)
    _assert_close(y, _expected(w, x, b, None), dtype)
    partials, counters = _scratch(x)
    assert int(counters.abs().sum()) == 0 and counters.numel() >= 3 * 2  # 3 tile rows x 2 token blocks
    assert torch.equal(_product(kernel, w, x, b, splits=3), y)  # deterministic
    assert _scratch(x)[0].data_ptr() == partials.data_ptr()  # no new scratch


@needs_interpreter
def test_workspace_grows_and_keeps_counters_zero():
    device = torch.device(DEVICE)
    small = ts.workspace(device, 10, 4)
    big = ts.workspace(device, small[0].numel() + 100, small[1].numel() + 8)
    assert big[0].numel() >= small[0].numel() + 100 and big[1].numel() >= small[1].numel() + 8
    assert int(big[1].abs().sum()) == 0
    assert ts.workspace(device, 1, 1)[0] is big[0]  # kept: smaller requests take the same scratch


@needs_interpreter
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("activation", sorted(activations.ACTIVATIONS))
@pytest.mark.parametrize("splits", (1, 2))
def test_activation_in_the_epilogue(kernel, activation, splits):
    """Every activation, applied to the fp32 sum before the one rounding to x's dtype: torch's numbers."""
    w = _weight(kernel, 45, 128, torch.float16, seed=1)
    x, b = torch.randn(3, 128).half(), torch.randn(45).half()
    _assert_close(_product(kernel, w, x, b, splits=splits, activation=activation), _expected(w, x, b, activation),
                  torch.float16)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        _product(kernel, w, x, b, splits=splits, activation="tanh")


def test_wide_offsets_threshold():
    assert not ts.wide_offsets(INT32_MAX, 0) and ts.wide_offsets(1, INT32_MAX + 1) and not ts.wide_offsets()


@needs_interpreter
@pytest.mark.parametrize("kernel, splits", [("tiled", 1), ("tiled", 3), ("two_four", 1), ("two_four", 3),
                                            ("moe", 1)])
def test_int64_offsets_give_the_same_bits(kernel, splits, monkeypatch):
    """The int64-offset build (``WIDE``: taken past INT32_MAX elements) computes the same addresses: the same
    bits as the int32 build on a small product (a product that large does not fit the interpreter)."""
    torch.manual_seed(0)
    if kernel == "moe":
        x, w, b = torch.randn(9, 64).half(), torch.randn(3, 40, 64).half(), torch.randn(3, 40).half()
        offsets = torch.tensor([0, 4, 4, 9])
        run = lambda: triton_moe.grouped_linear(x, offsets, w, b)  # noqa: E731
    else:
        w = _weight(kernel, 70, 320, torch.float16)
        x, b = torch.randn(17, 320).half(), torch.randn(70).half()
        run = lambda: _product(kernel, w, x, b, splits=splits)  # noqa: E731
    narrow = run()
    monkeypatch.setattr(ts, "wide_offsets", lambda *sizes: True)
    built = []  # the WIDE constexpr each launch was built with
    launch = ts.Launcher.__call__
    monkeypatch.setattr(ts.Launcher, "__call__", lambda self, key, grid, args, constexprs: (
        built.append(constexprs["WIDE"]), launch(self, key, grid, args, constexprs)))
    moe_kernel, interpret = triton_moe._build()  # the MoE kernel launches without a Launcher

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: (built.append(kw["WIDE"]), moe_kernel[grid](*args, **kw))

    monkeypatch.setattr(triton_moe, "_build", lambda: (Spy(), interpret))
    assert torch.equal(run(), narrow)
    assert built == [True]
    if kernel == "tiled":  # the aligned layout keeps int64 starts past INT32_MAX
        assert ts.prepare(CSR.from_dense(w)).starts.dtype == torch.int64


class _Refuse:
    """Stands in for the autotuner: launching through it fails; its ``fn`` is the kernel itself."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        raise AssertionError("went through the autotuner")


@needs_interpreter
@pytest.mark.parametrize("kernel", KERNELS)
def test_chosen_config_launched_directly(kernel, monkeypatch):
    """After a key's first call the config autotune chose is launched on the kernel itself; a new key (another
    token bucket) goes through the autotuner again."""
    launch = ts._build().tiled if kernel == "tiled" else t24._build()
    w = _weight(kernel, 41, 136, torch.float16, seed=2)  # a shape no other test uses: a key not yet seen
    x = torch.randn(5, 136).half()
    first = _product(kernel, w, x, None, splits=1)
    monkeypatch.setattr(launch, "autotuned", _Refuse(launch.autotuned.fn))
    assert torch.equal(_product(kernel, w, x, None, splits=1), first)
    with pytest.raises(AssertionError, match="autotuner"):
        _product(kernel, w, torch.randn(40, 136).half(), None, splits=1)


# --- on a GPU ------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs compiled Triton on CUDA")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_split_k_deterministic_and_graph_safe(kernel):
    """Programs really race on a GPU: 50 split-K launches give the same bits, the counters end at zero, and a
    captured CUDA graph replays the same product (its own scratch, zeroed by the captured fill)."""
    w = _weight(kernel, 256, 4096, torch.float16).cuda()
    x, b = torch.randn(4, 4096, device="cuda").half(), torch.randn(256, device="cuda").half()
    state = ts.prepare(CSR.from_dense(w)) if kernel == "tiled" else t24.prepare(TwoFour.from_dense(w))
    run = (lambda: ts.tiled_matmul(state, x, b, splits=8)) if kernel == "tiled" else (
        lambda: t24.two_four_matmul(state, x, b, splits=8))
    first = run()
    assert all(torch.equal(run(), first) for _ in range(50))
    torch.cuda.synchronize()
    assert int(_scratch(x)[1].abs().sum()) == 0
    _assert_close(first, _expected(w, x, b, None), torch.float16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)


@pytest.mark.cuda
@needs_cuda
def test_cuda_offsets_past_int32():
    """x of 131,088 x 16,384 fp16 (2^31 + 2^18 elements): the tokens past INT32_MAX must read and write their
    own rows (an int32 offset would wrap to the first ones)."""
    n, inp = 131088, 16384
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs 16 GiB of GPU memory")
    w = _weight("tiled", 64, inp, torch.float16).cuda()
    x = torch.randn(n, inp, device="cuda", dtype=torch.float16)
    assert ts.wide_offsets(x.numel())
    y = ts.tiled_matmul(ts.prepare(CSR.from_dense(w)), x)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    _assert_close(y[rows], _expected(w, x[rows], None, None), torch.float16)


@needs_interpreter
@pytest.mark.parametrize("kernel", KERNELS)
def test_launch_remembered_per_signature(kernel, monkeypatch):
    """A call's launch is worked out once per signature and kept in the layer's state; a call that differs in
    what was checked (the bias's shape, x's features) is checked again, and the memo stays bounded."""
    w = _weight(kernel, 40, 128, torch.float16, seed=3)
    state = ts.prepare(CSR.from_dense(w)) if kernel == "tiled" else t24.prepare(TwoFour.from_dense(w))
    run = ts.tiled_matmul if kernel == "tiled" else t24.two_four_matmul
    x, b = torch.randn(3, 128).half(), torch.randn(40).half()
    run(state, x, b)
    run(state, x, b)
    assert len(state.launches) == 1
    with pytest.raises(ValueError, match="bias must have shape"):
        run(state, x, torch.randn(41).half())
    with pytest.raises(ValueError, match="x must have shape"):
        run(state, torch.randn(3, 127).half(), b)
    monkeypatch.setattr(ts, "MAX_LAUNCHES", 2)
    for n in (1, 2, 4, 5):  # each a new signature; the memo is cleared when full, the products still right
        xn = torch.randn(n, 128).half()
        _assert_close(run(state, xn, b), _expected(w, xn, b, None), torch.float16)
    assert len(state.launches) <= 2


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_graphs_through_torch_compile(kernel):
    """Decode on the GPU should not pay the host per product: ``torch.compile(mode="reduce-overhead")``
    captures our layers (the custom operator ``sparse_ops::linear``) in CUDA graphs, split-K scratch included,
    and its replays give the eager numbers."""
    from torch import nn

    from sparse_ops.linear import SparseLinear

    fmt = CSR if kernel == "tiled" else TwoFour
    up, down = _weight(kernel, 1024, 512, torch.float16, 4), _weight(kernel, 512, 1024, torch.float16, 5)
    model = nn.Sequential(SparseLinear(fmt.from_dense(up), torch.randn(1024).half(), activation="silu"),
                          SparseLinear(fmt.from_dense(down))).cuda()
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)  # one token: split-K by default
    assert model[0].route(1).variant == "splitk"
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(4):  # warm-up, record, then replays
            out = compiled(x).clone()
    _assert_close(out, _expected(down, _expected(up, x, model[0].bias, "silu").half(), None, None), torch.float16)
    torch.testing.assert_close(out, eager, atol=2e-3, rtol=2e-3)
