"""Fused activations: every kernel path against fp64 torch, the C++ epilogue's accuracy over a range, and
fuse_activations' pattern proof (what it must fuse, and what it must leave alone)."""
import pytest
import torch
from torch import nn

from sparse_ops.activations import ACTIVATIONS, activation_of
from sparse_ops.formats import CSR, TwoFour
from sparse_ops.fusion import fuse_activations
from sparse_ops.kernels import cpp
from sparse_ops.linear import SparseLinear
from tests.test_formats import two_four, unstructured

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
needs_native = pytest.mark.skipif(not cpp.available(), reason="needs our CPU kernels")


@pytest.mark.parametrize("activation", [*ACTIVATIONS, None])
@pytest.mark.parametrize("format", ["csr", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 8, 17, 40, 64, 130])  # gemv, plain kernel, panelled kernel (csr)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_activation_equals_torch(activation, format, dtype, n, bias):
    w = (two_four((48, 64)) if format == "2:4" else unstructured((48, 64), 0.6)).to(dtype)
    b = torch.randn(48, dtype=dtype) if bias else None
    layer = SparseLinear((TwoFour if format == "2:4" else CSR).from_dense(w), b, activation=activation)
    x = torch.randn(n, 64, dtype=dtype)
    with torch.inference_mode():
        y = layer(x)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    ref = ref if activation is None else ACTIVATIONS[activation](ref)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=TOL[dtype], atol=TOL[dtype] * 8)


@needs_native
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("n", [1, 8, 64])
def test_epilogue_accuracy_over_a_wide_range(activation, n):
    # An identity weight puts x itself through the epilogue: fp64 torch is the reference. Ours is A&S 7.1.26
    # erf and a polynomial e^x: within 1e-6 absolute (torch's own fp32 GELU is 1.2e-6 off at |x| ~ 12).
    xs = torch.linspace(-12, 12, 64 * 97)
    layer = SparseLinear(CSR.from_dense(torch.eye(64)), activation=activation)
    with torch.inference_mode():
        y = layer(xs.view(-1, 64)[:n] if n < 64 else xs.view(-1, 64)).flatten()
    ref = ACTIVATIONS[activation](xs[: y.numel()].double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_nan_and_infinity_propagate(activation):
    layer = SparseLinear(CSR.from_dense(torch.eye(4)), activation=activation)
    x = torch.tensor([[float("nan"), 200.0, -200.0, 0.0]] * 8)
    with torch.inference_mode():
        y = layer(x)
    ref = ACTIVATIONS[activation](x)
    assert torch.isnan(y[:, 0]).all()
    torch.testing.assert_close(y[:, 1:], ref[:, 1:], rtol=1e-6, atol=1e-6)


def test_unfused_kernels_apply_it_after(monkeypatch):
    w = unstructured((12, 16), 0.7)
    x = torch.randn(5, 16, requires_grad=True)  # a gradient: the torch CSR path, then F.gelu
    layer = SparseLinear(CSR.from_dense(w), torch.randn(12), activation="gelu")
    y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.gelu(x @ w.t() + layer.bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    on_torch = SparseLinear(CSR.from_dense(w), activation="relu", torch_kernel=True)
    assert not on_torch.kernel.fuses and on_torch.kernel.backend == "torch"
    with torch.no_grad():
        torch.testing.assert_close(on_torch(x), torch.relu(x @ w.t()), rtol=1e-5, atol=1e-5)


def test_bad_activation_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'; allowed: None, relu, gelu"):
        SparseLinear(CSR.from_dense(torch.eye(2)), activation="tanh")
    layer = SparseLinear(CSR.from_dense(torch.eye(2)))
    with pytest.raises(ValueError, match="unknown activation"):
        layer.activation = "swish"
    assert layer.activation is None and "activation" not in repr(layer)
    layer.activation = "silu"
    assert "activation='silu'" in repr(layer)


@pytest.mark.parametrize("module,kind", [
    (nn.ReLU(), "relu"), (nn.ReLU(inplace=True), "relu"), (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"),
    (nn.Tanh(), None), (nn.LeakyReLU(), None), (nn.Identity(), None), (nn.Linear(2, 2), None),
])
def test_activation_of_recognises_only_exact_functions(module, kind):
    assert activation_of(module) == kind


def test_activation_of_transformers_gelu():
    from transformers.activations import ACT2FN
    assert activation_of(ACT2FN["gelu"]) == "gelu" and activation_of(ACT2FN["relu"]) == "relu"
    assert activation_of(ACT2FN["gelu_new"]) is None  # its own tanh formula: left to torch


def sparse(out, inp):
    return SparseLinear(CSR.from_dense(unstructured((out, inp), 0.7)), torch.randn(out))


class UsesOutputTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = sparse(8, 8), nn.GELU()

    def forward(self, x):
        h = self.fc(x)
        return self.act(h) + h


class CallsActivationTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = sparse(8, 8), nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x)) + self.act(x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = sparse(8, 8), nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x)) if x.sum() > 0 else x


class Fusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = sparse(8, 8), nn.SiLU(), sparse(4, 8)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


def test_fuse_activations_fuses_only_proven_patterns():
    model = nn.ModuleDict({"a": UsesOutputTwice(), "b": CallsActivationTwice(), "c": DataDependent(),
                           "d": Fusable(), "e": nn.Sequential(sparse(8, 8), nn.ReLU(), sparse(8, 8), nn.Tanh())})
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = {k: m(x) for k, m in model.items()}
        assert fuse_activations(model) == ["d.fc", "e.0"]
        after = {k: m(x) for k, m in model.items()}
    assert model["d"].fc.activation == "silu" and isinstance(model["d"].act, nn.Identity)
    assert model["e"][2].activation is None and isinstance(model["e"][3], nn.Tanh)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=1e-5)
    assert fuse_activations(model) == []  # idempotent


def test_a_shared_layer_is_not_fused():
    shared = sparse(8, 8)
    model = nn.ModuleList([nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared, nn.Tanh())])
    assert fuse_activations(model) == [] and shared.activation is None


def test_sparsify_fuses_a_bert_ffn_gelu():
    from transformers import BertConfig, BertModel

    from prune import Pruner
    from sparse_ops.loading import sparsify
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=50, max_position_embeddings=16, attn_implementation="sdpa")
    dense = Pruner(BertModel(config, add_pooling_layer=False).eval(), sparsity=0.8, include=["encoder.*"]).finalize()
    linears = {f"{n}.weight" for n, m in dense.named_modules() if isinstance(m, nn.Linear) and "encoder" in n}
    state = {k: CSR.from_dense(v) if k in linears else v for k, v in dense.state_dict().items()}
    import copy
    fused = sparsify(copy.deepcopy(dense), state, fuse_activations=True)
    assert [n for n, m in fused.named_modules() if getattr(m, "activation", None) == "gelu"] == \
        ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    assert set(fused.state_dict()) == set(sparsify(copy.deepcopy(dense), state).state_dict())
    ids = torch.randint(0, 50, (2, 16))
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=ids).last_hidden_state, dense(input_ids=ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_layers_apply_the_activation():
    w = unstructured((16, 32), 0.6)
    layer = SparseLinear(CSR.from_dense(w), activation="gelu").cuda()
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x.cuda()).cpu(), torch.nn.functional.gelu(x @ w.t()), rtol=1e-4, atol=1e-4)
