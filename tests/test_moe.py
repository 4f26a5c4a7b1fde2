"""MoE: equals a dense FFN with one expert, the mean of experts with a uniform router, a slow per-token
reference in general; losses and capacity drops on hand-computed routings; a small model trains."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_ops.kernels import cpp
from sparse_ops.layers.moe import MoE, expert_ffn, plan_dispatch, route

TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-5, "atol": 1e-5},
       torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def _expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of ``moe`` applied to every row of ``x`` (no routing)."""
    pick = lambda t: None if t is None else t[e]
    return expert_ffn(x, moe.w_in[e], pick(moe.b_in), moe.w_out[e], pick(moe.b_out), moe._act,
                      pick(moe.w_gate), pick(moe.b_gate))


def _reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Slow, obviously correct MoE: a Python loop over tokens and their chosen experts (dropless)."""
    x2 = x.reshape(-1, x.shape[-1])
    r = route(moe.router(x2), moe.config.top_k)
    rows = [sum(r.weights[t, k].to(x.dtype) * _expert(moe, int(r.experts[t, k]), x2[t:t + 1])[0]
                for k in range(moe.config.top_k)) for t in range(x2.shape[0])]
    return torch.stack(rows).reshape(x.shape)


class DenseFFN(nn.Module):
    def __init__(self, d: int, h: int, gated: bool, bias: bool, act):
        super().__init__()
        self.lin_in, self.lin_out = nn.Linear(d, h, bias=bias), nn.Linear(h, d, bias=bias)
        self.lin_gate = nn.Linear(d, h, bias=bias) if gated else None
        self.act = act

    def forward(self, x):
        h = self.lin_in(x)
        h = self.act(self.lin_gate(x)) * h if self.lin_gate is not None else self.act(h)
        return self.lin_out(h)


def _copy_dense_into_expert0(moe: MoE, dense: DenseFFN) -> None:
    with torch.no_grad():
        pairs = [(moe.w_in, dense.lin_in.weight), (moe.w_out, dense.lin_out.weight),
                 (moe.b_in, dense.lin_in.bias), (moe.b_out, dense.lin_out.bias)]
        if dense.lin_gate is not None:
            pairs += [(moe.w_gate, dense.lin_gate.weight), (moe.b_gate, dense.lin_gate.bias)]
        for dst, src in pairs:
            if src is not None:
                dst[0].copy_(src)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,bias", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("lead", [(), (7,), (2, 3)])
def test_one_expert_top1_equals_dense_ffn_outputs_and_grads(dtype, gated, bias, lead):
    d, h = 12, 20
    moe = MoE(d, h, num_experts=1, top_k=1, gated=gated, bias=bias).to(dtype)
    dense = DenseFFN(d, h, gated, bias, moe._act).to(dtype)
    _copy_dense_into_expert0(moe, dense)
    x = torch.randn(*lead, d, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_moe, y_dense = moe(x1), dense(x2)
    torch.testing.assert_close(y_moe, y_dense, **TOL[dtype])
    g = torch.randn_like(y_dense)
    (y_moe * g).sum().backward()
    (y_dense * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[dtype])
    torch.testing.assert_close(moe.w_in.grad[0], dense.lin_in.weight.grad, **TOL[dtype])
    torch.testing.assert_close(moe.w_out.grad[0], dense.lin_out.weight.grad, **TOL[dtype])
    if bias:
        torch.testing.assert_close(moe.b_in.grad[0], dense.lin_in.bias.grad, **TOL[dtype])
        torch.testing.assert_close(moe.b_out.grad[0], dense.lin_out.bias.grad, **TOL[dtype])
    if gated:
        torch.testing.assert_close(moe.w_gate.grad[0], dense.lin_gate.weight.grad, **TOL[dtype])
    assert int(moe.last_aux.dropped_tokens) == 0


@pytest.mark.parametrize("num_experts", [2, 4])
@pytest.mark.parametrize("gated", [False, True])
def test_all_experts_with_uniform_router_equals_mean_of_experts(num_experts, gated):
    moe = MoE(8, 16, num_experts=num_experts, top_k=num_experts, gated=gated).double()
    with torch.no_grad():
        moe.router.weight.zero_()  # equal logits: every expert gets weight 1 / E
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mean = torch.stack([_expert(moe, e, x) for e in range(num_experts)]).mean(dim=0)
    torch.testing.assert_close(moe(x), mean, rtol=1e-12, atol=1e-12)
    assert moe.last_aux.tokens_per_expert.tolist() == [10] * num_experts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts,top_k,gated", [(4, 1, False), (4, 2, True), (8, 3, False)])
def test_matches_slow_per_token_reference(dtype, num_experts, top_k, gated):
    moe = MoE(10, 14, num_experts=num_experts, top_k=top_k, gated=gated).to(dtype)
    x = torch.randn(3, 6, 10, dtype=dtype)
    torch.testing.assert_close(moe(x), _reference(moe, x), **TOL[dtype])
    assert int(moe.last_aux.tokens_per_expert.sum()) == 18 * top_k


def test_leading_shapes_are_flattened_consistently():
    moe = MoE(6, 9, num_experts=3, top_k=2)
    x = torch.randn(2, 3, 4, 6)
    y = moe(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, 6), moe(x.reshape(-1, 6)), rtol=0, atol=0)
    assert moe(x[0, 0, 0]).shape == (6,)


def _router_identity_moe(num_experts: int, top_k: int, **kwargs) -> MoE:
    """d_model == E and router weight = I, so router logits equal the input."""
    moe = MoE(num_experts, 4, num_experts=num_experts, top_k=top_k, **kwargs).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(num_experts))
    return moe


def test_aux_and_z_loss_on_hand_computed_top1_routing():
    moe = _router_identity_moe(2, 1, aux_loss_coef=0.1, z_loss_coef=0.01)
    l3 = math.log(3.0)
    x = torch.tensor([[l3, 0.0], [l3, 0.0], [0.0, l3], [l3, 0.0]], dtype=torch.float64)
    moe(x)  # probs [.75 .25] x3 on expert 0, [.25 .75] on expert 1
    f, p = [3 / 4, 1 / 4], [(3 * 0.75 + 0.25) / 4, (3 * 0.25 + 0.75) / 4]
    aux = moe.last_aux
    assert aux.aux_loss.item() == pytest.approx(0.1 * 2 * (f[0] * p[0] + f[1] * p[1]))  # = 0.1125
    assert aux.aux_loss.item() == pytest.approx(0.1125)
    assert aux.z_loss.item() == pytest.approx(0.01 * math.log(4.0) ** 2)  # logsumexp = log 4 for every token
    assert aux.tokens_per_expert.tolist() == [3, 1]


def test_aux_loss_and_combine_weights_on_hand_computed_top2_routing():
    moe = _router_identity_moe(3, 2, aux_loss_coef=1.0)
    l2, l4 = math.log(2.0), math.log(4.0)
    x = torch.tensor([[l4, l2, 0.0], [0.0, l2, l4]], dtype=torch.float64)  # probs (4,2,1)/7 and (1,2,4)/7
    y = moe(x)
    # f = assignment fractions (1, 2, 1) / 4; P = mean probs (5, 4, 5) / 14
    assert moe.last_aux.aux_loss.item() == pytest.approx(3 * (0.25 * 5 + 0.5 * 4 + 0.25 * 5) / 14)
    assert moe.last_aux.tokens_per_expert.tolist() == [1, 2, 1]
    e = lambda i, t: _expert(moe, i, x[t:t + 1])[0]
    torch.testing.assert_close(y[0], 2 / 3 * e(0, 0) + 1 / 3 * e(1, 0))  # renormalised over the chosen two
    torch.testing.assert_close(y[1], 2 / 3 * e(2, 1) + 1 / 3 * e(1, 1))


def test_capacity_drops_later_tokens_and_counts_them_exactly():
    moe = _router_identity_moe(2, 1, capacity_factor=1.0)  # capacity = ceil(1.0 * 6 * 1 / 2) = 3
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]], dtype=torch.float64)  # 5 tokens want expert 0
    y = moe(x)
    assert int(moe.last_aux.dropped_tokens) == 2
    assert moe.last_aux.tokens_per_expert.tolist() == [5, 1]
    torch.testing.assert_close(y[:3], _expert(moe, 0, x[:3]))  # the first three fit
    assert torch.equal(y[3:5], torch.zeros(2, 2, dtype=torch.float64))  # tokens 3 and 4 are dropped
    torch.testing.assert_close(y[5], _expert(moe, 1, x[5:])[0])


def test_capacity_with_top2_drops_assignments_per_expert():
    moe = _router_identity_moe(2, 2, capacity_factor=0.5)  # capacity = ceil(0.5 * 3 * 2 / 2) = 2
    x = torch.tensor([[0.3, 0.0], [0.0, 0.2], [0.1, 0.4]], dtype=torch.float64)
    y = moe(x)
    assert int(moe.last_aux.dropped_tokens) == 2  # token 2 loses both its assignments
    assert torch.equal(y[2], torch.zeros(2, dtype=torch.float64))
    assert torch.all(y[:2] != 0)


def test_plan_dispatch_groups_by_expert_in_token_order():
    plan = plan_dispatch(torch.tensor([[2, 0], [0, 1], [2, 1]]), num_experts=4)
    assert plan.counts.tolist() == [2, 2, 2, 0]
    assert plan.token.tolist() == [0, 1, 1, 2, 0, 2]
    assert plan.slot.tolist() == [1, 2, 3, 5, 0, 4]
    assert int(plan.dropped) == 0


def test_param_counts():
    d, h, e, k = 8, 16, 4, 2
    per_expert = 2 * d * h + h + d
    counts = MoE(d, h, num_experts=e, top_k=k).param_counts()
    assert (counts.total, counts.active) == (d * e + e * per_expert, d * e + k * per_expert)
    gated = MoE(d, h, num_experts=e, top_k=k, gated=True, bias=False).param_counts()
    assert gated.active == d * e + k * 3 * d * h


@pytest.mark.parametrize("kwargs,message", [
    ({"num_experts": 2, "top_k": 3}, "top_k=3 must be <= num_experts=2"),
    ({"num_experts": 2, "top_k": 1, "activation": "tanh"}, "activation='tanh' is not one of"),
    ({"num_experts": 2, "top_k": 1, "capacity_factor": 0.0}, "capacity_factor must be > 0"),
    ({"num_experts": 0, "top_k": 1}, "num_experts must be >= 1, got 0"),
])
def test_bad_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoE(4, 8, **kwargs)


def test_wrong_input_width_is_rejected():
    with pytest.raises(ValueError, match="d_model=4"):
        MoE(4, 8, num_experts=2, top_k=1)(torch.randn(3, 5))


def _train(steps: int = 60) -> list[float]:
    torch.manual_seed(1)
    teacher = [nn.Linear(8, 8) for _ in range(3)]
    x = torch.randn(256, 8)
    region = torch.bucketize(x[:, 0].contiguous(), torch.tensor([-0.5, 0.5]))  # target depends on x[:, 0]
    with torch.no_grad():
        target = torch.stack([teacher[int(r)](xi) for r, xi in zip(region, x)]).tanh()
    moe = MoE(8, 32, num_experts=4, top_k=2, router_jitter=0.01)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(moe(x), target)
        losses.append(loss.item())
        opt.zero_grad()
        (loss + moe.last_aux.aux_loss + moe.last_aux.z_loss).backward()
        opt.step()
    return losses


def test_small_model_trains_deterministically():
    losses = _train()
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    assert losses == _train()  # seeded: the same run gives the same losses bit for bit


@pytest.mark.cuda
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_cuda_matches_cpu(capacity_factor):
    moe = MoE(16, 32, num_experts=4, top_k=2, gated=True, capacity_factor=capacity_factor)
    x = torch.randn(3, 9, 16)
    y_cpu, aux_cpu = moe(x), moe.last_aux
    y_gpu = moe.cuda()(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    assert moe.last_aux.tokens_per_expert.tolist() == aux_cpu.tokens_per_expert.tolist()
    assert int(moe.last_aux.dropped_tokens) == int(aux_cpu.dropped_tokens)


@pytest.mark.cuda
def test_cuda_decode_never_waits_for_the_routing():
    # dropless inference on the GPU: routing, dispatch, the grouped experts and the combine without a host sync
    moe = MoE(16, 32, num_experts=8, top_k=2, gated=True).cuda().eval()
    x = torch.randn(1, 2, 16, device="cuda")
    with torch.no_grad():
        moe(x)  # the first call compiles the kernel
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not cpp.available(), reason="native CPU kernels unavailable (no compiler)")
@pytest.mark.parametrize("gated,activation", [(False, "gelu"), (False, "relu"), (True, "silu")])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (5, 3)])
@pytest.mark.parametrize("tokens", [1, 3, 9, 40, 100])
def test_inference_kernel_equals_the_torch_path(tokens, num_experts, top_k, capacity_factor, gated, activation,
                                                monkeypatch):
    # At inference on the CPU the whole layer after the router runs in one C++ call (routing, capacity,
    # dispatch, every expert, combine): outputs and last_aux equal the torch path's within fp32 tolerance.
    import sparse_ops.layers.moe as moe_module

    moe = MoE(24, 40, num_experts, top_k, gated=gated, activation=activation, bias=tokens % 2 == 1,
              capacity_factor=capacity_factor).eval()
    x = torch.randn(tokens, 24)
    calls = []
    real = moe_module.moe_forward
    monkeypatch.setattr(moe_module, "moe_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        y = moe(x)
    fast = moe.last_aux
    assert calls
    monkeypatch.setattr(moe_module, "moe_forward", lambda *a, **k: None)
    with torch.inference_mode():
        ref = moe(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    slow = moe.last_aux
    assert torch.equal(fast.tokens_per_expert, slow.tokens_per_expert) and int(fast.dropped_tokens) == int(slow.dropped_tokens)
    torch.testing.assert_close(fast.aux_loss, slow.aux_loss)
    torch.testing.assert_close(fast.z_loss, slow.z_loss)


@pytest.mark.skipif(not cpp.available(), reason="native CPU kernels unavailable (no compiler)")
def test_inference_kernel_takes_many_tokens_only_for_small_experts():
    # Above MOE_MAX_TOKENS_PER_EXPERT pairs per expert MKL's GEMMs beat our loops, unless experts are small
    from sparse_ops.kernels.ours_cpu import MOE_MAX_TOKENS_PER_EXPERT, MOE_SMALL_EXPERT, moe_forward

    for d, h, expected_none in [(24, 40, False), (512, 512, True)]:
        moe = MoE(d, h, num_experts=2, top_k=1).eval()
        assert (d * h > MOE_SMALL_EXPERT) == expected_none
        x = torch.randn(2 * MOE_MAX_TOKENS_PER_EXPERT + 2, d)
        with torch.inference_mode():
            out = moe_forward(moe.router(x), x, 1, None, moe.w_in, moe.b_in, moe.w_out, moe.b_out, "gelu")
        assert (out is None) == expected_none
