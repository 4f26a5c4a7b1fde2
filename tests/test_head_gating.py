"""Head-gated attention: equals explicit softmax(QK^T/sqrt(d))V and nn.MultiheadAttention when all gates are
open; closed heads have no effect; pruning keeps outputs (ours and transformers BERT); gate maths."""
import math

import pytest
import torch
from torch import nn

from sparse_ops.layers.head_gating import (
    GatedMultiheadAttention,
    HardConcrete,
    expected_l0,
    hard_concrete_eval,
    hard_concrete_sample,
    head_rows,
    prune_bert_heads,
    prune_bert_model_heads,
)

TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
OPEN, CLOSED = 30.0, -30.0  # log_alpha values whose sampled gates are 1 and 0 with probability ~1 - 1e-13


def reference_attention(x, w_qkv, b_qkv, w_out, b_out, num_heads, mask=None, causal=False, head_scale=None):
    """Slow, explicit multi-head attention: softmax(Q K^T / sqrt(hd) + mask) V, heads scaled by head_scale."""
    B, S, _ = x.shape
    hd = w_qkv.shape[0] // 3 // num_heads
    q, k, v = (x @ w_qkv.T + b_qkv).split(num_heads * hd, dim=-1)
    q, k, v = (t.reshape(B, S, num_heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, S, S)
    if causal:
        mask = torch.ones(S, S, dtype=torch.bool).tril()
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    a = torch.softmax(scores, dim=-1) @ v  # (B, H, S, hd)
    if head_scale is not None:
        a = a * head_scale[:, None, None]
    return a.transpose(1, 2).reshape(B, S, -1) @ w_out.T + b_out


def _layer(d=16, h=4, dtype=torch.float64, log_alpha=OPEN, train=False):
    layer = GatedMultiheadAttention(d, h).to(dtype).train(train)
    with torch.no_grad():
        layer.log_alpha.fill_(log_alpha)
    return layer


def _ref(layer, x, **kw):
    return reference_attention(x, layer.in_proj.weight, layer.in_proj.bias, layer.out_proj.weight,
                               layer.out_proj.bias, layer.num_heads, **kw)


def _masks(B, S):
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keep[0, ..., max(S - 1, 1):] = False  # pad the last key of the first sequence (never its only key)
    return {"none": None, "causal": "causal", "bool_padding": keep.expand(B, 1, S, S),
            "float_2d": torch.randn(S, S, dtype=torch.float64)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("num_heads,B,S", [(1, 1, 1), (4, 2, 5), (8, 3, 4)])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool_padding", "float_2d"])
def test_all_open_equals_explicit_reference_outputs_and_grads(dtype, train, num_heads, B, S, mask_kind):
    layer = _layer(16, num_heads, dtype, train=train)
    mask = _masks(B, S)[mask_kind]
    causal = isinstance(mask, str)
    mask = None if causal or mask is None else mask.to(dtype) if mask.is_floating_point() else mask
    x = torch.randn(B, S, 16, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x1, attn_mask=mask, is_causal=causal)
    ref = _ref(layer, x2, mask=mask, causal=causal)
    torch.testing.assert_close(y, ref, **TOL[dtype])
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x1, layer.in_proj.weight, layer.out_proj.weight])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x2, layer.in_proj.weight, layer.out_proj.weight])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_all_open_equals_torch_multihead_attention(train, use_mask):
    mha = nn.MultiheadAttention(16, 4, batch_first=True).double().train(train)
    layer = GatedMultiheadAttention.from_multihead_attention(mha).train(train)
    with torch.no_grad():
        layer.log_alpha.fill_(OPEN)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril() if use_mask else None
    y = layer(x, attn_mask=allowed)
    y_mha, _ = mha(x, x, x, attn_mask=None if allowed is None else ~allowed, need_weights=False)  # True=block
    torch.testing.assert_close(y, y_mha, **TOL[torch.float64])
    (y.square().sum() + y_mha.square().sum()).backward()
    torch.testing.assert_close(layer.in_proj.weight.grad, mha.in_proj_weight.grad, **TOL[torch.float64])
    torch.testing.assert_close(layer.out_proj.weight.grad, mha.out_proj.weight.grad, **TOL[torch.float64])


def test_training_output_scales_each_head_by_its_sampled_gate():
    layer = _layer(train=True)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.manual_seed(7)
    z = hard_concrete_sample(layer.log_alpha.detach())
    torch.manual_seed(7)
    torch.testing.assert_close(layer(x), _ref(layer, x, head_scale=z), **TOL[torch.float64])


def _perturb_head(layer, head):
    rows = head_rows([head], layer.head_dim)
    with torch.no_grad():
        for i in range(3):
            layer.in_proj.weight[rows + i * layer.num_heads * layer.head_dim] += 5.0
            layer.in_proj.bias[rows + i * layer.num_heads * layer.head_dim] -= 3.0
        layer.out_proj.weight[:, rows] *= -7.0


@pytest.mark.parametrize("train", [False, True])
def test_closed_heads_parameters_have_no_effect(train):
    layer = _layer(train=train)
    with torch.no_grad():
        layer.log_alpha[1] = CLOSED
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x, is_causal=True)
    _perturb_head(layer, 1)
    y2 = layer(x, is_causal=True)
    assert torch.equal(y, y2)
    open_only = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(y2, _ref(layer, x, causal=True, head_scale=open_only), **TOL[torch.float64])
    y2.sum().backward()
    assert torch.all(layer.out_proj.weight.grad[:, head_rows([1], layer.head_dim)] == 0)


def test_every_head_closed_leaves_the_output_bias():
    layer = _layer(log_alpha=CLOSED)
    y = layer(torch.randn(2, 3, 16, dtype=torch.float64))
    assert torch.equal(y, layer.out_proj.bias.detach().expand(2, 3, 16))
    assert layer.param_counts().active == 16


def test_prune_closed_heads_keeps_outputs_and_shrinks_parameters_exactly():
    d, h = 16, 4
    hd = d // h
    layer = _layer(d, h)
    with torch.no_grad():
        layer.log_alpha[[0, 2]] = CLOSED
    x = torch.randn(3, 5, d, dtype=torch.float64)
    before, n_before = layer(x), sum(p.numel() for p in layer.parameters())
    assert layer.param_counts().active == 2 * (3 * hd * d + 3 * hd + d * hd) + d
    assert layer.prune_closed_heads() == [0, 2]
    after, n_after = layer(x), sum(p.numel() for p in layer.parameters())
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    assert n_before - n_after == 2 * (3 * (hd * d + hd) + d * hd + 1)  # Q/K/V rows + biases, out cols, gate
    assert (layer.num_heads, layer.param_counts().total) == (2, n_after)
    assert layer.open_heads() == [0, 1]


def test_open_heads_follow_every_change_of_the_gates():
    # open_heads is remembered between forwards: an in-place update, a new tensor and loading a state dict
    # must each be seen
    layer = _layer(8, 4).eval()
    assert layer.open_heads() == [0, 1, 2, 3]
    with torch.no_grad():
        layer.log_alpha[1] = CLOSED
    assert layer.open_heads() == [0, 2, 3]
    layer.log_alpha = torch.nn.Parameter(torch.full((4,), CLOSED))
    assert layer.open_heads() == []
    layer.load_state_dict({**layer.state_dict(), "log_alpha": torch.tensor([CLOSED, 3.0, 3.0, CLOSED])})
    assert layer.open_heads() == [1, 2]


def test_prune_open_heads_equals_reference_without_them():
    layer = _layer()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = _ref(layer, x, head_scale=torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    layer.prune_heads([3, 1])
    torch.testing.assert_close(layer(x), expected, **TOL[torch.float64])
    layer.prune_heads([0])  # indices refer to the current heads: removes original head 0
    expected = _ref(layer, x)
    torch.testing.assert_close(layer(x), expected, **TOL[torch.float64])


def test_unbatched_input_equals_batch_of_one():
    layer = _layer()
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x, is_causal=True), layer(x[None], is_causal=True)[0], rtol=0, atol=0)


@pytest.mark.parametrize("hc", [HardConcrete(), HardConcrete(beta=0.5, gamma=-0.2, zeta=1.05)])
def test_l0_penalty_matches_its_formula_and_sampling(hc):
    log_alpha = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64, requires_grad=True)
    shift = hc.beta * math.log(-hc.gamma / hc.zeta)
    expected = [1 / (1 + math.exp(-(a - shift))) for a in log_alpha.tolist()]
    penalty = expected_l0(log_alpha, hc)
    assert penalty.item() == pytest.approx(sum(expected), rel=1e-12)
    penalty.backward()
    sigmoid_grad = torch.tensor([p * (1 - p) for p in expected], dtype=torch.float64)
    torch.testing.assert_close(log_alpha.grad, sigmoid_grad)
    samples = hard_concrete_sample(log_alpha.detach().expand(40000, 5), hc)  # P(gate != 0) = the penalty term
    assert samples.min() == 0.0 and samples.max() == 1.0
    torch.testing.assert_close((samples > 0).double().mean(0), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=0.015)


def test_layer_l0_penalty_is_the_sum_over_its_heads():
    layer = GatedMultiheadAttention(16, 4)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    assert layer.l0_penalty().item() == pytest.approx(expected_l0(layer.log_alpha.detach()).item())
    assert layer.l0_penalty().item() == pytest.approx(
        sum(1 / (1 + math.exp(-(a + 2 / 3 * math.log(11)))) for a in (-1.0, 0.0, 1.0, 2.0)))


def test_eval_gates_are_exactly_zero_or_one():
    log_alpha = torch.randn(1000) * 3
    gates = hard_concrete_eval(log_alpha)
    assert set(gates.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(gates, (log_alpha >= 0).float())
    layer = GatedMultiheadAttention(32, 8).eval()
    with torch.no_grad():
        layer.log_alpha.copy_(torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0, -2.0, 1.0, -0.1]))
    assert layer.gates().tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]  # open where log_alpha >= 0
    train_gates = layer.train().gates()
    assert torch.all((train_gates >= 0) & (train_gates <= 1))


def test_gates_learn_to_close_the_heads_a_teacher_does_not_use():
    teacher = _layer(log_alpha=OPEN)
    with torch.no_grad():
        teacher.log_alpha[[2, 3]] = CLOSED
    student = _layer(train=True)
    student.load_state_dict({**teacher.state_dict(), "log_alpha": torch.full((4,), 3.0, dtype=torch.float64)})
    for p in (*student.in_proj.parameters(), *student.out_proj.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.Adam([student.log_alpha], lr=0.1)
    x = torch.randn(4, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        target = teacher(x)
    for _ in range(150):
        loss = (student(x) - target).square().mean() / target.square().mean() + 0.05 * student.l0_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert student.open_heads() == [0, 1]


@pytest.mark.parametrize("call,message", [
    (lambda: GatedMultiheadAttention(10, 4), "d_model=10 must be divisible by num_heads=4"),
    (lambda: GatedMultiheadAttention(8, 2).prune_heads([2]), r"head indices \[2\] are out of range"),
    (lambda: GatedMultiheadAttention(8, 2).prune_heads([0, 1]), "cannot remove all 2 heads"),
    (lambda: GatedMultiheadAttention(8, 2)(torch.randn(1, 3, 8), attn_mask=torch.ones(1, 2, 3, 3).bool()),
     r"attn_mask must be .* got shape \(1, 2, 3, 3\)"),
    (lambda: GatedMultiheadAttention(8, 2)(torch.randn(1, 3, 6)), r"got shape \(1, 3, 6\)"),
    (lambda: HardConcrete(gamma=0.1), "gamma < 0"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- transformers BERT ------------------------------------------------------------------------------------

def _tiny_bert(attn_implementation):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100,
                                  attn_implementation=attn_implementation)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_prune_bert_heads_keeps_outputs_when_heads_were_zeroed(attn_implementation):
    model = _tiny_bert(attn_implementation)
    to_prune = {0: [1, 3], 1: [0]}
    hd, d = 8, 32
    with torch.no_grad():  # silence the heads first: zero their columns of the output projection
        for layer, heads in to_prune.items():
            model.encoder.layer[layer].attention.output.dense.weight[:, head_rows(heads, hd)] = 0.0
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    n_before = sum(p.numel() for p in model.parameters())
    prune_bert_model_heads(model, to_prune)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert n_before - sum(p.numel() for p in model.parameters()) == 3 * (3 * (hd * d + hd) + d * hd)
    sa = model.encoder.layer[0].attention.self
    assert (sa.num_attention_heads, sa.all_head_size, sa.query.out_features) == (2, 16, 16)


def test_prune_bert_heads_changes_outputs_when_heads_were_live():
    model = _tiny_bert("eager")
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        prune_bert_heads(model.encoder.layer[0].attention, [2])
        after = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(after, before, atol=1e-3)


def test_prune_bert_heads_rejects_other_modules():
    with pytest.raises(TypeError, match="BERT-style attention block"):
        prune_bert_heads(nn.Linear(4, 4), [0])
    with pytest.raises(ValueError, match="layer index 5 is out of range"):
        prune_bert_model_heads(_tiny_bert("eager"), {5: [0]})


@pytest.mark.cuda
def test_cuda_gated_and_pruned_match_cpu():
    layer = _layer(16, 4, torch.float32)
    with torch.no_grad():
        layer.log_alpha[1] = CLOSED
    x = torch.randn(2, 5, 16)
    y_cpu = layer(x, is_causal=True)
    layer = layer.cuda()
    torch.testing.assert_close(layer(x.cuda(), is_causal=True).cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    layer.prune_closed_heads()
    torch.testing.assert_close(layer(x.cuda(), is_causal=True).cpu(), y_cpu, rtol=1e-4, atol=1e-5)
