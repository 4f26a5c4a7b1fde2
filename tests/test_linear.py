"""SparseLinear equals nn.Linear in every format and dtype; its candidates per device (the plan: test_plan.py)."""
import pytest
import torch
from torch import nn

from sparse_ops.kernels import cpp
from sparse_ops.linear import SparseLinear, candidate_formats
from tests.test_formats import two_four, unstructured

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def pruned_linear(out, inp, dtype, weight, bias=True):
    lin = nn.Linear(inp, out, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("format", ["csr", "2:4"])
@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3), (2, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_dense_linear(dtype, format, lead, bias):
    w = two_four((24, 32), dtype, extra_sparsity=0.5)
    dense = pruned_linear(24, 32, dtype, w, bias)
    sparse = SparseLinear.from_dense(dense, format=format)
    x = torch.randn(*lead, 32, dtype=dtype)
    with torch.no_grad():
        y, ref = sparse(x), dense(x)
    assert y.shape == ref.shape == (*lead, 24) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * 32 ** 0.5)


def test_weight_round_trips_and_module_moves():
    w = unstructured((6, 8), 0.7)
    layer = SparseLinear.from_dense(pruned_linear(6, 8, torch.float32, w))
    assert torch.equal(layer.weight.to_dense(), w)
    half = layer.to(torch.float16)  # buffers cast, kernel prepared again
    x = torch.randn(3, 8, dtype=torch.float16)
    torch.testing.assert_close(half(x).float(), x.float() @ w.t() + layer.bias.float(), rtol=2e-3, atol=5e-3)


@pytest.mark.parametrize("batch", [1, 8, 64])  # every CPU kernel path: gemv, plain CSR, panelled CSR
def test_load_state_dict_prepares_the_kernel_again(batch):
    # Same nonzero count, other values and positions: the buffers are overwritten in place, and the kernel's
    # prepared copies (the panelled layout) must follow them.
    w1, w2 = unstructured((40, 48), 0.5), unstructured((40, 48), 0.5)
    w2[w2 != 0] = 0.0
    w2.view(-1)[torch.randperm(w2.numel(), generator=torch.Generator().manual_seed(1))[:int((w1 != 0).sum())]] = 2.0
    layer = SparseLinear.from_dense(pruned_linear(40, 48, torch.float32, w1))
    layer.load_state_dict(SparseLinear.from_dense(pruned_linear(40, 48, torch.float32, w2)).state_dict())
    x = torch.randn(batch, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w2.t() + layer.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_deepcopy_and_pickle_rebuild_the_kernel_state(batch):
    import copy
    import io
    w = unstructured((40, 48), 0.6)
    layer = SparseLinear.from_dense(pruned_linear(40, 48, torch.float32, w))
    x = torch.randn(batch, 48)
    with torch.no_grad():
        layer(x)  # a prepared state (and at 64 tokens its panelled copy) exists before the copy
        twin = copy.deepcopy(layer)
        buf = io.BytesIO()
        torch.save(layer, buf)  # a whole-module pickle: our own object, loaded only by trusting code
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        twin.bias.zero_()  # the copy's buffers are its own
        assert twin.router.state.tensors[0].data_ptr() != layer.router.state.tensors[0].data_ptr()
        torch.testing.assert_close(twin(x), x @ w.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
        torch.testing.assert_close(layer(x), x @ w.t() + layer.bias, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem():
    layer = SparseLinear.from_dense(pruned_linear(6, 8, torch.float32, unstructured((6, 8), 0.5)))
    with pytest.raises(ValueError, match=r"in_features=8, got \(2, 7\)"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match="float64 does not match the weight's torch.float32"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"unknown format 'bsr'; allowed: csr, 2:4, dense-int8, csr-int8, bitmap-int8, 2:4:torch, csr:torch"):
        SparseLinear.from_dense(nn.Linear(8, 6), format="bsr")
    with pytest.raises(ValueError, match="not 2:4"):
        SparseLinear.from_dense(nn.Linear(8, 6), format="2:4")


def test_cpu_candidates_time_two_four_only_with_our_kernel(monkeypatch):
    # Our C++ 2:4 kernel exploits the pattern, so it is a candidate; torch's fallback only emulates 2:4 (dense or
    # CSR), so without the native kernels 2:4 is never timed on CPU. Unstructured weights never get 2:4.
    # With our kernels, torch's CSR kernel is a candidate too ("csr:torch"); without them "csr" already is it.
    expected = ["csr", "2:4", "csr:torch"] if cpp.available() else ["csr"]
    assert candidate_formats(two_four((8, 16))) == expected
    assert candidate_formats(torch.ones(8, 16)) == (["csr", "csr:torch"] if cpp.available() else ["csr"])
    monkeypatch.setenv("SPARSE_OPS_NATIVE", "0")
    assert candidate_formats(two_four((8, 16))) == ["csr"]


@pytest.mark.skipif(not cpp.available(), reason="needs our CPU kernels: else csr is torch's kernel already")
def test_csr_on_torchs_kernel_stays_there_when_moved():
    w = unstructured((16, 32), 0.9)
    lin = pruned_linear(16, 32, torch.float32, w)
    layer = SparseLinear.from_dense(lin, format="csr:torch")
    assert layer.choice == "csr:torch" and layer.kernel.name == "torch.cpu.csr" and layer.torch_kernel
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
        moved = layer.to(torch.bfloat16)  # prepared again: still torch's kernel
        assert moved.choice == "csr:torch" and moved.kernel.name == "torch.cpu.csr"
        xb = x.bfloat16()
        torch.testing.assert_close(moved(xb).float(), xb.float() @ moved.weight.to_dense().float().t()
                                   + moved.bias.float(), rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16] * 6)
    assert SparseLinear.from_dense(lin, format="csr").choice == "csr"


def test_from_dense_auto_picks_the_smallest_lossless_format_that_fits():
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) > 0.9)  # ~90%, no 2:4
    auto = SparseLinear.from_dense(layer, format="auto")
    assert auto.format == "csr"
    x = torch.randn(3, 64)
    torch.testing.assert_close(auto(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown format 'cs'; allowed: .*auto"):
        SparseLinear.from_dense(layer, format="cs")
