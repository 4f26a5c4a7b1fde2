"""Mixture-of-Experts feed-forward layer: a router sends each token to ``top_k`` of ``num_experts`` FFNs.

Legend for shape comments: T = tokens (all leading dims flattened), D = d_model, H = d_hidden,
E = num_experts, K = top_k, A = kept (token, expert) assignments (A <= T*K).

Routing follows Mixtral: router linear -> softmax over E -> top-K -> weights renormalised over the chosen
experts. Dispatch does work proportional to K: the T*K assignments are sorted by expert (stable, so token
order is kept within an expert), each expert runs once on its contiguous slice, and the weighted results
are index-added back. At inference the experts run without a Python loop: on the CPU routing to combine is
one C++ call (``kernels.ours_cpu.moe_forward``), on CUDA each expert matrix is one Triton grouped matmul over
the sorted slices (``kernels.triton_moe``). Load-balancing terms (Switch aux loss, ST-MoE router z-loss) are pure functions below.

Example:
    >>> import torch
    >>> moe = MoE(d_model=16, d_hidden=32, num_experts=4, top_k=2)
    >>> y = moe(torch.randn(2, 5, 16))
    >>> y.shape, int(moe.last_aux.tokens_per_expert.sum())
    (torch.Size([2, 5, 16]), 20)
    >>> loss = y.square().mean() + moe.last_aux.aux_loss + moe.last_aux.z_loss
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_ops.errors import UserValueError
from sparse_ops.kernels import triton_moe
from sparse_ops.kernels.ours_cpu import moe_forward
from sparse_ops.layers.params import ParamCounts

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass(frozen=True)
class MoEConfig:
    """Hyperparameters of one MoE layer; validated on construction."""

    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int
    activation: str = "gelu"
    gated: bool = False  # SwiGLU-style: act(x W_gate) * (x W_in), then W_out
    bias: bool = True
    capacity_factor: float | None = None  # None = dropless
    router_jitter: float = 0.0  # multiplicative U(1-eps, 1+eps) noise on the router input, training only
    aux_loss_coef: float = 0.01  # alpha of the Switch load-balancing loss
    z_loss_coef: float = 1e-3  # coefficient of the ST-MoE router z-loss

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "num_experts", "top_k"):
            if getattr(self, name) < 1:
                raise UserValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise UserValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.activation not in ACTIVATIONS:
            raise UserValueError(f"activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise UserValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")
        if not 0.0 <= self.router_jitter < 1.0:
            raise UserValueError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise UserValueError(f"loss coefficients must be >= 0, got {self.aux_loss_coef}, {self.z_loss_coef}")


@dataclass(frozen=True)
class Routing:
    """The router's decision for T tokens."""

    probs: Tensor  # (T, E) fp32 softmax over all experts
    weights: Tensor  # (T, K) fp32, renormalised over the chosen experts (rows sum to 1)
    experts: Tensor  # (T, K) int64 chosen expert ids, by decreasing probability


@dataclass(frozen=True)
class DispatchPlan:
    """Kept assignments grouped by expert; token order is kept within each expert's slice."""

    token: Tensor  # (A,) token index of each kept assignment
    slot: Tensor  # (A,) its flat index into the (T, K) routing, to pick its weight
    counts: Tensor  # (E,) kept assignments per expert, on the routing's device (no host sync to plan)
    routed: Tensor  # (E,) assignments the router sent to each expert, before capacity
    dropped: Tensor  # () assignments dropped for capacity


@dataclass(frozen=True)
class MoEAux:
    """What the last forward pass reports: losses to add to the training loss, and load statistics."""

    aux_loss: Tensor  # () alpha * E * sum_i f_i * P_i
    z_loss: Tensor  # () coef * mean_t logsumexp(logits_t)^2
    tokens_per_expert: Tensor  # (E,) assignments routed to each expert (before capacity)
    dropped_tokens: Tensor  # () (token, expert) assignments dropped for capacity; 0 when dropless


def route(logits: Tensor, top_k: int) -> Routing:
    """Softmax over experts, keep the ``top_k`` largest, renormalise them to sum to one (Mixtral).

    >>> r = route(torch.tensor([[2.0, 1.0, 0.0]]), top_k=2)
    >>> r.experts.tolist(), round(float(r.weights.sum()), 6)
    ([[0, 1]], 1.0)
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
    top_p, experts = probs.topk(top_k, dim=-1)  # (T, K), (T, K)
    return Routing(probs, top_p / top_p.sum(dim=-1, keepdim=True), experts)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(capacity_factor * T * K / E) (Switch Transformer).

    >>> expert_capacity(num_tokens=10, top_k=2, num_experts=4, capacity_factor=1.0)
    5
    """
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def plan_dispatch(experts: Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Group the (T, K) assignments by expert; beyond ``capacity`` per expert, later tokens are dropped.

    >>> p = plan_dispatch(torch.tensor([[0], [1], [0], [0]]), num_experts=2, capacity=2)
    >>> p.token.tolist(), p.counts.tolist(), int(p.dropped)
    ([0, 2, 1], [2, 1], 1)
    """
    top_k = experts.shape[-1]
    flat = experts.reshape(-1)  # (T*K,) token-major
    order = torch.argsort(flat, stable=True)  # (T*K,) grouped by expert, token order within an expert
    # (E,) per expert; not bincount, which reads the largest index back to the host on CUDA
    routed = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    kept = routed
    if capacity is not None:
        starts = torch.cumsum(routed, 0) - routed  # (E,) first sorted position of each expert
        rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # (T*K,) rank in expert
        order = order[rank < capacity]
        kept = routed.clamp(max=capacity)
    return DispatchPlan(order // top_k, order, kept, routed, routed.sum() - kept.sum())


def switch_aux_loss(probs: Tensor, tokens_per_expert: Tensor, alpha: float) -> Tensor:
    """Switch Transformer load-balancing loss ``alpha * E * sum_i f_i * P_i``.

    f_i = tokens_per_expert_i / sum(tokens_per_expert), the fraction of the T*K assignments sent to expert i
    (so sum_i f_i = 1 for any K); P_i the mean router probability of expert i over the T tokens. Perfect
    balance gives ``alpha``; everything on one expert gives ``alpha * E`` when it also has all the
    probability.

    >>> probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    >>> float(switch_aux_loss(probs, torch.tensor([1, 1]), alpha=1.0))
    1.0
    """
    f = tokens_per_expert.to(probs.dtype) / tokens_per_expert.sum()  # (E,)
    return alpha * probs.shape[-1] * torch.dot(f, probs.mean(dim=0))


def router_z_loss(logits: Tensor, coef: float) -> Tensor:
    """ST-MoE router z-loss ``coef * mean_t (logsumexp_i logits_ti)^2``: keeps router logits small.

    >>> round(float(router_z_loss(torch.zeros(3, 4), coef=1.0)), 5), round(math.log(4) ** 2, 5)
    (1.92181, 1.92181)
    """
    return coef * torch.logsumexp(logits.float(), dim=-1).square().mean()


def jitter(x: Tensor, eps: float) -> Tensor:
    """Multiply by noise uniform in [1 - eps, 1 + eps] (Switch Transformer router jitter)."""
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def expert_ffn(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None,
               act: Callable[[Tensor], Tensor], w_gate: Tensor | None = None,
               b_gate: Tensor | None = None) -> Tensor:
    """One expert: ``act(x W_in^T + b) W_out^T + b``, or gated ``act(x W_gate^T) * (x W_in^T)`` inside."""
    h = F.linear(x, w_in, b_in)  # (A_e, H)
    h = act(F.linear(x, w_gate, b_gate)) * h if w_gate is not None else act(h)
    return F.linear(h, w_out, b_out)  # (A_e, D)


def _uniform_(t: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default init bound 1/sqrt(fan_in), applied to a batched (E, ...) tensor."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class MoE(nn.Module):
    """Drop-in for a transformer FFN: each token runs through ``top_k`` of ``num_experts`` expert FFNs.

    Experts are stored batched: ``w_in`` (E, H, D), ``w_out`` (E, D, H), ``w_gate`` (E, H, D) when
    ``gated``, biases (E, H) / (E, D). The forward pass returns only the output, so the layer drops into any
    model; it also sets ``self.last_aux`` (an immutable :class:`MoEAux`) holding the aux loss, z-loss,
    per-expert counts and drops *of that call*. A training loop adds
    ``moe.last_aux.aux_loss + moe.last_aux.z_loss`` to its loss after the forward pass. Dropped assignments
    contribute zero (the residual connection around the layer carries the token).

    Example:
        >>> moe = MoE(8, 16, num_experts=4, top_k=1, gated=True, capacity_factor=1.0)
        >>> moe(torch.randn(3, 7, 8)).shape
        torch.Size([3, 7, 8])
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, top_k: int, *,
                 activation: str | None = None, gated: bool = False, bias: bool = True,
                 capacity_factor: float | None = None, router_jitter: float = 0.0,
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 1e-3) -> None:
        super().__init__()
        activation = activation or ("silu" if gated else "gelu")
        self.config = c = MoEConfig(d_model, d_hidden, num_experts, top_k, activation, gated, bias,
                                    capacity_factor, router_jitter, aux_loss_coef, z_loss_coef)
        E, D, H = num_experts, d_model, d_hidden
        self.router = nn.Linear(D, E, bias=False)
        self.w_in = nn.Parameter(_uniform_(torch.empty(E, H, D), D))
        self.w_out = nn.Parameter(_uniform_(torch.empty(E, D, H), H))
        self.w_gate = nn.Parameter(_uniform_(torch.empty(E, H, D), D)) if gated else None
        self.b_in = nn.Parameter(_uniform_(torch.empty(E, H), D)) if bias else None
        self.b_out = nn.Parameter(_uniform_(torch.empty(E, D), H)) if bias else None
        self.b_gate = nn.Parameter(_uniform_(torch.empty(E, H), D)) if bias and gated else None
        self._act = ACTIVATIONS[c.activation]
        self._aux: MoEAux | tuple | None = None

    def _expert(self, e: int, x: Tensor) -> Tensor:
        pick = lambda t: None if t is None else t[e]
        return expert_ffn(x, self.w_in[e], pick(self.b_in), self.w_out[e], pick(self.b_out), self._act,
                          pick(self.w_gate), pick(self.b_gate))

    def _grouped(self, xs: Tensor) -> bool:
        """Whether the experts run as Triton grouped matmuls (``kernels.triton_moe``): on CUDA, where no
        gradient is asked for (the kernel has no backward; training runs the per-expert loop)."""
        needs_grad = torch.is_grad_enabled() and (xs.requires_grad or self.w_in.requires_grad)
        return xs.is_cuda and not needs_grad and triton_moe.available()

    def _experts_grouped(self, xs: Tensor, counts: Tensor) -> Tensor:
        """Every expert on its slice of ``xs`` (A, D), sorted by expert with ``counts`` (E,) rows each: (A, D).
        The offsets stay on the device: the host never waits for the routing (dropless routing: none of this
        path syncs)."""
        offsets = F.pad(counts.to(device=xs.device, dtype=torch.int64).cumsum(0), (1, 0))
        h = triton_moe.grouped_linear(xs, offsets, self.w_in, self.b_in)  # (A, H)
        if self.w_gate is not None:
            h = self._act(triton_moe.grouped_linear(xs, offsets, self.w_gate, self.b_gate)) * h
        else:
            h = self._act(h)
        return triton_moe.grouped_linear(h, offsets, self.w_out, self.b_out)  # (A, D)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if x.shape[-1] != c.d_model:
            raise UserValueError(f"input's last dim must be d_model={c.d_model}, got shape {tuple(x.shape)}")
        x2 = x.reshape(-1, c.d_model)  # (T, D)
        router_in = jitter(x2, c.router_jitter) if self.training and c.router_jitter > 0 else x2
        logits = self.router(router_in)  # (T, E)
        cap = None if c.capacity_factor is None else expert_capacity(
            x2.shape[0], c.top_k, c.num_experts, c.capacity_factor)
        fast = None if self.training else moe_forward(logits, x2, c.top_k, cap, self.w_in, self.b_in, self.w_out,
                                                      self.b_out, c.activation, self.w_gate, self.b_gate)
        if fast is not None:  # inference on the CPU, few tokens per expert: routing to combine in one C++ call
            y, routed = fast
            self._aux = (logits, routed, cap)  # last_aux is computed from these if it is read
            return y.reshape(x.shape)
        r = route(logits, c.top_k)
        plan = plan_dispatch(r.experts, c.num_experts, cap)
        xs = x2[plan.token]  # (A, D) tokens grouped by expert
        if self._grouped(xs):  # inference on the GPU: every expert in one launch per matrix
            y = self._experts_grouped(xs, plan.counts)
        else:
            slices = xs.split(plan.counts.tolist())  # (A_e, D) each
            ys = [self._expert(e, xe) for e, xe in enumerate(slices) if xe.shape[0]]
            y = torch.cat(ys) if ys else xs  # (A, D)
        w = r.weights.reshape(-1)[plan.slot].to(y.dtype)  # (A,)
        out = torch.zeros_like(x2).index_add(0, plan.token, y * w[:, None])  # (T, D)
        self._aux = MoEAux(switch_aux_loss(r.probs, plan.routed, c.aux_loss_coef),
                           router_z_loss(logits, c.z_loss_coef), plan.routed, plan.dropped)
        return out.reshape(x.shape)

    @property
    def last_aux(self) -> MoEAux | None:
        """The losses and load statistics of the last forward pass (None before the first)."""
        if isinstance(self._aux, tuple):  # the C++ path: the same terms, computed when asked for
            logits, routed, cap = self._aux
            c = self.config
            kept = routed if cap is None else routed.clamp(max=cap)
            probs = torch.softmax(logits.float(), dim=-1)
            self._aux = MoEAux(switch_aux_loss(probs, routed, c.aux_loss_coef), router_z_loss(logits, c.z_loss_coef),
                               routed, routed.sum() - kept.sum())
        return self._aux

    def param_counts(self) -> ParamCounts:
        """Total parameters, and those one token reads: the router plus ``top_k`` experts."""
        router = self.router.weight.numel()
        experts = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("router"))
        per_expert = experts // self.config.num_experts
        return ParamCounts(total=router + experts, active=router + self.config.top_k * per_expert)

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={c.d_model}, d_hidden={c.d_hidden}, num_experts={c.num_experts}, top_k={c.top_k}, "
                f"activation={c.activation}, gated={c.gated}, capacity_factor={c.capacity_factor}")
