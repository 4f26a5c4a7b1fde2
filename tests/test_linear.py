"""SparseLinear equals nn.Linear; format="auto" picks by injected timings (never real ones) and caches."""
import pytest
import torch
from torch import nn

from sparse_ops.autotune import auto_key, pick_format
from sparse_ops.kernels import native
from sparse_ops.linear import SparseLinear, candidate_formats, choose_format
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
        assert twin._state.tensors[0].data_ptr() != layer._state.tensors[0].data_ptr()
        torch.testing.assert_close(twin(x), x @ w.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
        torch.testing.assert_close(layer(x), x @ w.t() + layer.bias, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem():
    layer = SparseLinear.from_dense(pruned_linear(6, 8, torch.float32, unstructured((6, 8), 0.5)))
    with pytest.raises(ValueError, match=r"in_features=8, got \(2, 7\)"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match="float64 does not match the weight's torch.float32"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"unknown format 'bsr'; allowed: csr, 2:4, csr:torch, auto"):
        SparseLinear.from_dense(nn.Linear(8, 6), format="bsr")
    with pytest.raises(ValueError, match="not 2:4"):
        SparseLinear.from_dense(nn.Linear(8, 6), format="2:4")


def fixed_timer(times, calls):
    """A Timer returning ``times`` for the candidates it is offered (and recording what it was offered)."""
    def timer(fns, device):
        calls.append(sorted(fns))
        for fn in fns.values():
            fn()  # the candidates must run
        return {k: times.get(k, 10.0) for k in fns}  # a candidate not named is slow
    return timer


@pytest.mark.parametrize("times,expected", [
    ({"dense": 1.0, "csr": 0.2}, "csr"),
    ({"dense": 1.0, "csr": 1.2}, "dense"),
    ({"dense": 1.0, "csr": 0.97}, "dense"),  # within the 5% noise margin: dense
    ({"dense": 1.0, "csr": 0.5, "2:4": 0.4}, "2:4"),
    ({"dense": 1.0}, "dense"),
])
def test_pick_format_rule(times, expected):
    assert pick_format(times) == expected


@pytest.mark.parametrize("csr_time,expected_type", [(0.1, SparseLinear), (10.0, nn.Linear)])
def test_auto_builds_the_fastest_and_keeps_dense_when_sparse_is_slower(csr_time, expected_type):
    w = unstructured((16, 32), 0.9)
    lin = pruned_linear(16, 32, torch.float32, w)
    calls, cache = [], {}
    layer = SparseLinear.from_dense(lin, format="auto", timer=fixed_timer({"dense": 1.0, "csr": csr_time}, calls),
                                    cache=cache)
    assert type(layer) is expected_type and calls == [sorted(["dense", *candidate_formats(w)])]
    if expected_type is nn.Linear:
        assert layer is lin
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), lin(x))


def exact(shape, sparsity):
    """Random weight with exactly round(sparsity * numel) zeros."""
    w = torch.randn(shape)
    w.view(-1)[torch.randperm(w.numel())[: round(sparsity * w.numel())]] = 0.0
    return w


def test_auto_measures_once_per_key():
    calls, cache = [], {}
    timer = fixed_timer({"dense": 1.0, "csr": 0.5}, calls)
    for sparsity in (0.9, 0.91, 0.92):  # same shape, sparsity bucket, dtype, device, batch
        choose_format(exact((16, 32), sparsity), None, timer=timer, cache=cache)
    assert len(calls) == 1
    choose_format(exact((16, 32), 0.9), None, batch=8, timer=timer, cache=cache)
    choose_format(exact((16, 32), 0.5), None, timer=timer, cache=cache)
    choose_format(exact((16, 28), 0.9), None, timer=timer, cache=cache)
    assert len(calls) == 4 and len(cache) == 4


def test_auto_key_buckets_sparsity():
    w = torch.ones(10, 10)
    w.view(-1)[:93] = 0
    key = auto_key(w, "cpu", 4)
    assert (key.shape, key.sparsity_bucket, key.dtype, key.device, key.batch) == ((10, 10), 0.9, "float32", "cpu", 4)


def test_cpu_candidates_time_two_four_only_with_our_kernel(monkeypatch):
    # Our C++ 2:4 kernel exploits the pattern, so auto times it; torch's fallback only emulates 2:4 (dense or
    # CSR), so without the native kernels auto never times 2:4 on CPU. Unstructured weights never get 2:4.
    # With our kernels, torch's CSR kernel is a candidate too ("csr:torch"); without them "csr" already is it.
    expected = ["csr", "2:4", "csr:torch"] if native.available() else ["csr"]
    assert candidate_formats(two_four((8, 16))) == expected
    assert candidate_formats(torch.ones(8, 16)) == (["csr", "csr:torch"] if native.available() else ["csr"])
    monkeypatch.setenv("SPARSE_OPS_NATIVE", "0")
    assert candidate_formats(two_four((8, 16))) == ["csr"]


@pytest.mark.skipif(not native.available(), reason="needs our CPU kernels: else csr is torch's kernel already")
def test_auto_keeps_torchs_kernel_where_it_is_faster():
    w = unstructured((16, 32), 0.9)
    lin = pruned_linear(16, 32, torch.float32, w)
    calls = []
    layer = SparseLinear.from_dense(lin, format="auto", cache={},
                                    timer=fixed_timer({"dense": 1.0, "csr": 0.5, "csr:torch": 0.3}, calls))
    assert calls == [["csr", "csr:torch", "dense"]]
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
