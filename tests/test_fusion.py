"""Fusions: the fused FFN kernel and the residual + LayerNorm post-op against kernels/reference.py over grids
(every kernel path and schedule, tile widths, odd sizes, empty rows, activations, bias, dtypes), the modules'
fallbacks, and the fx proofs of fuse_ffn and fuse_add_norm (what they must fuse, what they must leave alone, a
tiny BERT and RoBERTa end to end)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_ops.activations import ACTIVATIONS
from sparse_ops.formats import CSR, TwoFour
from sparse_ops.fusion import fuse, fuse_activations, fuse_add_norm, fuse_ffn, fuse_gated_ffn
from sparse_ops.fusion.modules import SparseAddNorm, SparseFFN, SparseGatedFFN
from sparse_ops.kernels import cpp, ours_cpu
from sparse_ops.kernels import reference as ref_kernels
from sparse_ops.linear import SparseLinear
from sparse_ops.loading import sparsify
from sparse_ops.post import AddNorm
from tests.test_formats import two_four, unstructured

needs_native = pytest.mark.skipif(not cpp.available(), reason="needs our CPU kernels")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def pair(inp, hidden, out, sparsity, dtype=torch.float32, bias=True, activation="gelu"):
    """(up, down) SparseLinear layers with weights scaled so the outputs are O(1), and their dense weights."""
    wu = unstructured((hidden, inp), sparsity) / inp ** 0.5
    wd = unstructured((out, hidden), sparsity) / hidden ** 0.5
    bu, bd = (torch.randn(hidden), torch.randn(out)) if bias else (None, None)
    up = SparseLinear(CSR.from_dense(wu.to(dtype)), None if bu is None else bu.to(dtype), activation=activation)
    down = SparseLinear(CSR.from_dense(wd.to(dtype)), None if bd is None else bd.to(dtype))
    return up, down


def linear_reference(layer, h):
    """fp32 kernels/reference.py product from the layer's stored parts, plus its bias, as fp64."""
    y = ref_kernels.REFERENCE[layer.format](layer.weight, h.float().reshape(-1, h.shape[-1]))
    y = y.reshape(*h.shape[:-1], y.shape[-1])
    return (y if layer.bias is None else y + layer.bias.float()).double()


def reference(up, down, x):
    """act(x U^T + bu) D^T + bd by the reference kernels, the layers' stored (rounded) weights."""
    h = linear_reference(up, x)
    return linear_reference(down, h if up.activation is None else ACTIVATIONS[up.activation](h))


def fused_call(up, down, x):
    y = ours_cpu.ffn_matmul(up.router.state, down.router.state, x, up.bias, down.bias, up.activation)
    assert y is not None, "the fused kernel declined a case it should take"
    return y


# (in, hidden, out) x tokens (16/32/64-token tiles, both schedules) x sparsity; the BERT shape's dense 1030-token
# case is left out: its fp32 reference alone took 20 s, and the smaller shapes cover dense weights at 1030
FFN_GRID = [(shape, n, sparsity) for shape in [(384, 1536, 384), (37, 300, 45), (130, 64, 200)]
            for n in [16, 17, 33, 64, 128, 129, 257, 1030] for sparsity in [0.0, 0.5, 0.9, 0.98]
            if not (shape[1] == 1536 and n == 1030 and sparsity == 0.0)]


@needs_native
@pytest.mark.parametrize("shape,n,sparsity", FFN_GRID)
def test_fused_ffn_matches_reference(shape, n, sparsity):
    up, down = pair(*shape, sparsity)
    x = torch.randn(n, shape[0])
    with torch.inference_mode():
        y = fused_call(up, down, x)
    assert y.shape == (n, shape[2]) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(up, down, x), rtol=TOL[torch.float32], atol=TOL[torch.float32])


@needs_native
@pytest.mark.parametrize("activation", [*ACTIVATIONS, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # fp16: widened to fp32
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_ffn_activations_dtypes_bias_threads(activation, dtype, bias, threads):
    up, down = pair(70, 300, 45, 0.8, dtype, bias, activation)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (20, 129):  # one thread: by tile at 129 (3 tiles), two phases at 20 (one tile)
            x = torch.randn(n, 70, dtype=dtype)
            with torch.inference_mode():
                y = fused_call(up, down, x)
            assert y.dtype == dtype
            torch.testing.assert_close(y.double(), reference(up, down, x.float()), rtol=TOL[dtype], atol=TOL[dtype])
    finally:
        torch.set_num_threads(before)


@needs_native
def test_empty_rows_and_columns():
    # whole hidden units pruned away (their value is act(bias)), an input column unused, empty output rows
    up, down = pair(40, 96, 24, 0.7)
    wu, wd = up.weight.to_dense(), down.weight.to_dense()
    wu[10:30], wu[:, 5], wd[3:9] = 0.0, 0.0, 0.0
    up = SparseLinear(CSR.from_dense(wu), up.bias, activation="silu")
    down = SparseLinear(CSR.from_dense(wd), down.bias)
    x = torch.randn(70, 40)
    with torch.inference_mode():
        torch.testing.assert_close(fused_call(up, down, x).double(), reference(up, down, x), rtol=1e-4, atol=1e-4)


@needs_native
def test_the_kernel_declines_what_it_does_not_cover():
    up, down = pair(32, 64, 32, 0.5)
    x = torch.randn(ours_cpu.FFN_MIN_TOKENS, 32)
    ffn = ours_cpu.ffn_matmul
    with torch.inference_mode():
        assert ffn(up.router.state, down.router.state, x[:-1], up.bias, down.bias) is None  # too few tokens
    assert ffn(up.router.state, down.router.state, x.requires_grad_(), up.bias, down.bias) is None  # a gradient is needed
    sparse_up, _ = pair(32, 64, 32, 0.999)
    with torch.inference_mode():
        assert ffn(sparse_up.router.state, down.router.state, x.detach(), None, None) is None  # too sparse for panels
        bf16_down = SparseLinear(CSR.from_dense(down.weight.to_dense().bfloat16()))
        assert ffn(up.router.state, bf16_down.router.state, x.detach(), None, None) is None  # value types differ
        with pytest.raises(ValueError, match="down weight takes 32 inputs, the up weight gives 64"):
            ffn(up.router.state, pair(32, 16, 8, 0.5)[0].router.state, x.detach(), None, None)


@pytest.mark.parametrize("n", [1, 5, 40])
@pytest.mark.parametrize("torch_kernel", [False, True])
def test_sparse_ffn_equals_its_two_layers(n, torch_kernel):
    up, down = pair(24, 48, 16, 0.6)
    if torch_kernel:  # no ffn path: the two layers run in turn
        up = SparseLinear(up.weight, up.bias, activation="gelu", torch_kernel=True)
        down = SparseLinear(down.weight, down.bias, torch_kernel=True)
    block = SparseFFN(up, down)
    x = torch.randn(2, n, 24)
    with torch.inference_mode():
        y = block(x)
        assert y.shape == (2, n, 16)
        torch.testing.assert_close(y, down(up(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), reference(up, down, x), rtol=1e-4, atol=1e-4)


def test_sparse_ffn_trains_through_the_fallback():
    up, down = pair(12, 20, 6, 0.5)
    x = torch.randn(32, 12, requires_grad=True)
    SparseFFN(up, down)(x).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    reference(up, down, ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)


def test_sparse_ffn_errors_name_the_bad_value():
    up, down = pair(8, 16, 4, 0.5)
    with pytest.raises(ValueError, match="up gives 16 features, down takes 8"):
        SparseFFN(up, pair(8, 8, 4, 0.5)[1])
    with pytest.raises(TypeError, match="two SparseLinear layers, got SparseLinear and Linear"):
        SparseFFN(up, nn.Linear(16, 4))
    with pytest.raises(ValueError, match="in_features=8"):
        SparseFFN(up, down)(torch.randn(20, 9))


def mlp(activation=nn.GELU):
    up, down = pair(16, 32, 8, 0.5, activation=None)
    return nn.Sequential(up, activation(), down)


class Twice(nn.Module):  # up's output has a second use
    def __init__(self):
        super().__init__()
        self.up, self.down = pair(16, 32, 16, 0.5, activation=None)

    def forward(self, x):
        h = self.up(x)
        return self.down(h) + h[..., :16]


class Scaled(nn.Module):  # an op between the layers
    def __init__(self):
        super().__init__()
        self.up, self.down = pair(16, 32, 8, 0.5, activation=None)

    def forward(self, x):
        return self.down(self.up(x) * 2)


class Branchy(nn.Module):  # data-dependent control flow: fx cannot trace it, nothing is proven
    def __init__(self):
        super().__init__()
        self.up, self.down = pair(16, 32, 8, 0.5, activation=None)

    def forward(self, x):
        return self.down(self.up(x)) if x.sum() > 0 else x[..., :8]


class FakeLayer(Branchy):  # has the transformers method name, but is not a transformers module
    def feed_forward_chunk(self, x):
        return self.down(self.up(x))


@needs_native
def test_fuse_ffn_fuses_proven_pairs():
    model = mlp()
    x = torch.randn(40, 16)
    before = model(x)
    assert fuse_activations(model) == ["0"] and fuse_ffn(model) == ["2"]
    assert isinstance(model[0], nn.Identity) and isinstance(model[2], SparseFFN)
    assert model[2].up.activation == "gelu"
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    plain = nn.Sequential(*pair(16, 32, 8, 0.5, activation=None))
    assert fuse_ffn(plain) == ["1"]


@needs_native
@pytest.mark.parametrize("model", [Twice, Scaled, Branchy, FakeLayer, lambda: mlp(nn.Tanh)],
                         ids=["used twice", "op between", "untraceable", "not transformers", "unfused tanh"])
def test_fuse_ffn_leaves_unproven_pairs_alone(model):
    m = model()
    before = copy.deepcopy(m)
    fuse_activations(m)
    assert fuse_ffn(m) == []
    assert not any(isinstance(c, SparseFFN) for c in m.modules())
    x = torch.randn(40, 16)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), before(x), rtol=1e-5, atol=1e-5)


def test_fuse_ffn_skips_shared_layers_and_kernels_without_a_path():
    up, down = pair(16, 32, 16, 0.5, activation=None)
    shared = nn.Sequential(nn.Sequential(up, down), nn.Sequential(up, down))
    assert fuse_ffn(shared) == []
    on_torch = nn.Sequential(SparseLinear(up.weight, torch_kernel=True), SparseLinear(down.weight, torch_kernel=True))
    assert fuse_ffn(on_torch) == []


def tiny(kind):
    import transformers

    from prune import Pruner
    config = getattr(transformers, f"{kind}Config")(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50,
        max_position_embeddings=40, attn_implementation="sdpa")
    model = getattr(transformers, f"{kind}Model")(config, add_pooling_layer=False).eval()
    dense = Pruner(model, sparsity=0.8, include=["encoder.*"]).finalize()
    linears = {f"{n}.weight" for n, m in dense.named_modules() if isinstance(m, nn.Linear) and "encoder" in n}
    return dense, {k: CSR.from_dense(v) if k in linears else v for k, v in dense.state_dict().items()}


@needs_native
@pytest.mark.parametrize("kind", ["Bert", "Roberta"])
def test_sparsify_fuses_transformers_ffns(kind):
    dense, state = tiny(kind)
    fused = sparsify(copy.deepcopy(dense), state, fuse=True)
    blocks = {n: m for n, m in fused.named_modules() if isinstance(m, SparseFFN)}
    assert list(blocks) == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    add_norms = [n for n, m in fused.named_modules() if isinstance(m, SparseAddNorm)]
    assert add_norms == [f"encoder.layer.{i}.{m}" for i in (0, 1) for m in ("attention.output", "output")]
    assert all(m.up.activation == "gelu" for m in blocks.values())
    assert all(isinstance(layer.intermediate.dense, nn.Identity) for layer in fused.encoder.layer)
    assert not any(fuse(fused).values())  # a second pass finds nothing new
    ids = torch.randint(3, 50, (3, 30))  # 90 tokens: the fused kernel runs
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=ids).last_hidden_state, dense(input_ids=ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


@needs_native
def test_new_weights_and_copies_rebind_the_fused_call():
    # The fused call binds both weights' pointers once per pair: loading other weights (buffers copied in
    # place, kernel states prepared again) or deep-copying the block must not leave it reading the old ones.
    block = SparseFFN(*pair(40, 96, 24, 0.6))
    other = SparseFFN(*(SparseLinear(CSR.from_dense(-2 * m.weight.to_dense()), m.bias + 1, activation=m.activation)
                        for m in (block.up, block.down)))  # same nonzero counts: load_state_dict copies in place
    x = torch.randn(70, 40)
    with torch.inference_mode():
        block(x)  # binds the pair
        twin = copy.deepcopy(block)
        block.load_state_dict(other.state_dict())
        torch.testing.assert_close(block(x).double(), reference(other.up, other.down, x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(twin(x).double(), reference(twin.up, twin.down, x), rtol=1e-4, atol=1e-4)
        assert not torch.equal(twin(x), block(x))


def post_reference(y, post):
    y = y + post.residual.double()
    if not post.norm:
        return y
    w, b = (None if t is None else t.double() for t in (post.weight, post.bias))
    return F.layer_norm(y, y.shape[-1:], w, b, post.eps)


def random_post(n, out, norm=True, affine=True):
    return AddNorm(torch.randn(n, out), torch.randn(out) if affine else None, torch.randn(out) if affine else None,
                   1e-5, norm)


@needs_native
@pytest.mark.parametrize("format", ["csr", "2:4"])
@pytest.mark.parametrize("n", [1, 8, 40, 130, 1030])  # gemv, plain kernel, panelled by row block and by tile
@pytest.mark.parametrize("kind", ["add_norm", "add", "norm_without_affine"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_post_op_matches_reference(format, n, kind, activation):
    w = two_four((48, 64)) if format == "2:4" else unstructured((48, 64), 0.6)
    layer = SparseLinear((CSR if format == "csr" else TwoFour).from_dense(w), torch.randn(48), activation=activation)
    post = random_post(n, 48, norm=kind != "add", affine=kind != "norm_without_affine")
    x = torch.randn(n, 64)
    with torch.inference_mode():
        y = layer.kernel.matmul(layer.router.state, x, layer.bias, activation, post=post)
    h = linear_reference(layer, x)
    ref = post_reference(h if activation is None else ACTIVATIONS[activation](h), post)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("n", [16, 33, 128, 1030])  # both FFN schedules
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ffn_post_op_matches_reference(n, dtype):
    up, down = pair(37, 300, 45, 0.8, dtype)
    post = random_post(n, 45)
    x = torch.randn(n, 37, dtype=dtype)
    with torch.inference_mode():
        y = ours_cpu.ffn_matmul(up.router.state, down.router.state, x, up.bias, down.bias, "gelu", post=post)
    torch.testing.assert_close(y.double(), post_reference(reference(up, down, x.float()), post), rtol=TOL[dtype],
                               atol=TOL[dtype] * 10)


def test_post_op_rejects_mismatched_shapes():
    layer = SparseLinear(CSR.from_dense(unstructured((8, 16), 0.5)))
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 8\), got \(4, 9\)"):
        layer.kernel.matmul(layer.router.state, torch.randn(4, 16), None, None, post=AddNorm(torch.randn(4, 9)))


class PostLN(nn.Module):  # BERT's BertOutput / BertSelfOutput
    def __init__(self, layer, out, dropout=0.1):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = layer, nn.LayerNorm(out), nn.Dropout(dropout)
        with torch.no_grad():
            self.LayerNorm.weight.normal_()
            self.LayerNorm.bias.normal_()

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class Scaled2(PostLN):  # an op between the add and the layer
    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) * 2 + input_tensor)


class PreLN(PostLN):  # x + layer(norm(x)): not the post-LN pattern
    def forward(self, hidden_states, input_tensor):
        return input_tensor + self.dense(self.LayerNorm(hidden_states))


class ResidualTwice(PostLN):
    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) + input_tensor) + input_tensor


@needs_native
@pytest.mark.parametrize("n", [1, 20, 200])
@pytest.mark.parametrize("ffn", [False, True])
def test_sparse_add_norm_matches_its_ops(n, ffn):
    layer = SparseFFN(*pair(32, 64, 32, 0.7)) if ffn else SparseLinear(CSR.from_dense(unstructured((32, 32), 0.7)),
                                                                        torch.randn(32))
    model = nn.Sequential(PostLN(layer, 32)).eval()
    x, r = torch.randn(2, n, 32), torch.randn(2, n, 32)
    with torch.inference_mode():
        before = model[0](x, r)
        assert fuse_add_norm(model) == ["0"] and isinstance(model[0], SparseAddNorm)
        torch.testing.assert_close(model[0](x, r), before, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model[0](hidden_states=x, input_tensor=r), before, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model[0](x, input_tensor=r), before, rtol=1e-4, atol=1e-4)
    assert set(model.state_dict()) == {f"0.{k}" for k in PostLN(layer, 32).state_dict()}  # the keys stay
    with pytest.raises(TypeError, match=r"takes \(hidden_states, input_tensor\)"):
        model[0](x, r, r)


def test_sparse_add_norm_runs_the_ops_when_training_or_for_gradients():
    model = nn.Sequential(PostLN(SparseLinear(CSR.from_dense(unstructured((16, 16), 0.5))), 16, dropout=0.5))
    model.eval()
    fuse_add_norm(model)
    block = model[0]
    x, r = torch.randn(40, 16), torch.randn(40, 16)
    block.train()  # an active dropout: the ops in turn, the same random mask as the unfused module
    torch.manual_seed(3)
    y = block(x, r)
    torch.manual_seed(3)
    ref = block.LayerNorm(block.dropout(block.dense(x)) + r)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    block.eval()
    r.requires_grad_()
    block(x, r).sum().backward()  # a gradient: the ops in turn, and it flows
    assert r.grad is not None and block.LayerNorm.weight.grad is not None


@pytest.mark.parametrize("module", [Scaled2, PreLN, ResidualTwice], ids=["op between", "pre-LN", "residual twice"])
def test_fuse_add_norm_leaves_other_patterns_alone(module):
    model = nn.Sequential(module(SparseLinear(CSR.from_dense(unstructured((16, 16), 0.5))), 16))
    assert fuse_add_norm(model) == [] and type(model[0]) is module


def test_fuse_add_norm_needs_a_kernel_with_the_post_op():
    on_torch = SparseLinear(CSR.from_dense(unstructured((16, 16), 0.5)), torch_kernel=True)
    assert fuse_add_norm(nn.Sequential(PostLN(on_torch, 16))) == []
    dense = nn.Sequential(PostLN(nn.Linear(16, 16), 16))
    assert fuse_add_norm(dense) == []
    with pytest.raises(ValueError, match="LayerNorm over the layer's 16 output features"):
        SparseAddNorm(on_torch, nn.LayerNorm(8))


@needs_native
def test_fuse_reports_every_fusion():
    model = nn.Sequential(nn.Linear(1, 1))
    model[0] = PostLN(SparseFFN(*pair(16, 32, 16, 0.5)), 16)
    assert fuse(model) == {"activations": [], "ffn": [], "gated_ffn": [], "add_norm": ["0"]}


@needs_native
def test_sparse_add_norm_keeps_torch_broadcasting():
    block = SparseAddNorm(SparseLinear(CSR.from_dense(unstructured((16, 16), 0.5))), nn.LayerNorm(16))
    x, r = torch.randn(40, 16), torch.randn(40, 1)  # a residual the ops broadcast: no fused path, same result
    with torch.inference_mode():
        torch.testing.assert_close(block(x, r), block.LayerNorm(block.dense(x) + r), rtol=0, atol=0)


def gated(inp, hidden, out, sparsity, dtype=torch.float32, bias=False, activation="silu"):
    """(gate, up, down) SparseLinear layers of a LLaMA-style MLP (outputs O(1))."""
    ws = [unstructured(s, sparsity) / s[1] ** 0.5 for s in ((hidden, inp), (hidden, inp), (out, hidden))]
    bs = [torch.randn(w.shape[0]) if bias else None for w in ws]
    return tuple(SparseLinear(CSR.from_dense(w.to(dtype)), None if b is None else b.to(dtype), activation=a)
                 for w, b, a in zip(ws, bs, (activation, None, None)))


def gated_reference(gate, up, down, x):
    g = linear_reference(gate, x)
    h = (g if gate.activation is None else ACTIVATIONS[gate.activation](g)) * linear_reference(up, x)
    return linear_reference(down, h)


@needs_native
@pytest.mark.parametrize("shape", [(64, 172, 64), (37, 300, 45)])  # (in, hidden, out)
@pytest.mark.parametrize("n", [16, 33, 129, 1030])  # both schedules
@pytest.mark.parametrize("activation", ["silu", "gelu", None])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_ffn_kernel_matches_reference(shape, n, activation, bias, dtype):
    gate, up, down = gated(*shape, 0.7, dtype, bias, activation)
    x = torch.randn(n, shape[0], dtype=dtype)
    with torch.inference_mode():
        y = ours_cpu.ffn_matmul(up.router.state, down.router.state, x, up.bias, down.bias, activation, gate=gate.router.state,
                                  gate_bias=gate.bias)
    assert y is not None and y.dtype == dtype
    torch.testing.assert_close(y.double(), gated_reference(gate, up, down, x.float()), rtol=TOL[dtype],
                               atol=TOL[dtype])


class LlamaLikeMLP(nn.Module):  # transformers' LlamaMLP
    def __init__(self, layers, extra=False):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = layers
        self.act_fn, self.extra = nn.SiLU(), extra

    def forward(self, x):
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h * 2 if self.extra else h)


@needs_native
@pytest.mark.parametrize("n", [4, 40, 300])  # the layers in turn below FFN_MIN_TOKENS, fused from there
def test_fuse_gated_ffn_swaps_a_llama_mlp(n):
    model = nn.Sequential(LlamaLikeMLP(gated(32, 80, 32, 0.6, activation=None)))
    x = torch.randn(2, n, 32)
    with torch.inference_mode():
        before = model(x)
        keys = set(model.state_dict())
        assert fuse(model) == {"activations": ["0.gate_proj"], "ffn": [], "gated_ffn": ["0"], "add_norm": []}
        assert isinstance(model[0], SparseGatedFFN) and model[0].gate_proj.activation == "silu"
        assert set(model.state_dict()) == keys
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


def test_fuse_gated_ffn_leaves_other_patterns_alone():
    assert fuse_gated_ffn(nn.Sequential(LlamaLikeMLP(gated(16, 32, 16, 0.5), extra=True))) == []
    on_torch = [SparseLinear(m.weight, activation=m.activation, torch_kernel=True) for m in gated(16, 32, 16, 0.5)]
    assert fuse_gated_ffn(nn.Sequential(LlamaLikeMLP(on_torch))) == []


def test_sparse_gated_ffn_errors_name_the_bad_value():
    gate, up, down = gated(8, 16, 8, 0.5)
    with pytest.raises(ValueError, match="must have one shape"):
        SparseGatedFFN(gate, gated(8, 12, 8, 0.5)[1], down)
    with pytest.raises(ValueError, match="the up layer must have no activation"):
        SparseGatedFFN(gate, gate, down)
    with pytest.raises(TypeError, match="three SparseLinear layers, got SparseLinear, Linear, SparseLinear"):
        SparseGatedFFN(gate, nn.Linear(8, 16), down)


@needs_native
def test_sparsify_fuses_a_tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    from prune import Pruner
    config = LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, attn_implementation="sdpa")
    dense = Pruner(LlamaModel(config).eval(), sparsity=0.7, include=["layers.*"]).finalize()
    linears = {f"{n}.weight" for n, m in dense.named_modules() if isinstance(m, nn.Linear) and "layers" in n}
    state = {k: CSR.from_dense(v) if k in linears else v for k, v in dense.state_dict().items()}
    fused = sparsify(copy.deepcopy(dense), state, fuse=True)
    assert [n for n, m in fused.named_modules() if isinstance(m, SparseGatedFFN)] == ["layers.0.mlp", "layers.1.mlp"]
    ids = torch.randint(0, 50, (2, 30))
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=ids).last_hidden_state, dense(input_ids=ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
