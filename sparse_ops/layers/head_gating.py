"""Multi-head self-attention with one learned hard-concrete gate per head, and physical head pruning.

Legend for shape comments: B = batch, S = sequence length, D = d_model, H = heads (current), h = open heads,
hd = head_dim.

Gates follow the hard-concrete / L0 relaxation of Louizos et al. 2018 as used for heads by Voita et al. 2019:
each head h has a learned ``log_alpha_h``; training samples a gate in [0, 1] (exactly 0 or 1 with positive
probability) and the loss adds the expected number of open heads, :func:`expected_l0`. At eval the gate is
deterministic and exactly 0 or 1, and only open heads' slices of the Q/K/V/output projections are computed.
:func:`prune_bert_heads` removes heads from a ``transformers`` BERT-style attention block.

Example:
    >>> import torch
    >>> attn = GatedMultiheadAttention(d_model=16, num_heads=4).eval()
    >>> attn(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    >>> attn.prune_heads([1, 3]); attn.num_heads
    2
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_ops.errors import UserTypeError, UserValueError
from sparse_ops.kernels import ours_cpu
from sparse_ops.layers.params import ParamCounts


@dataclass(frozen=True)
class HardConcrete:
    """Hard-concrete distribution constants: temperature ``beta``, stretch interval (``gamma``, ``zeta``)."""

    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1

    def __post_init__(self) -> None:
        if not (self.beta > 0 and self.gamma < 0 and self.zeta > 1):
            raise UserValueError(f"need beta > 0, gamma < 0, zeta > 1; got beta={self.beta}, "
                             f"gamma={self.gamma}, zeta={self.zeta}")


def hard_concrete_sample(log_alpha: Tensor, hc: HardConcrete = HardConcrete(),
                         generator: torch.Generator | None = None) -> Tensor:
    """One training-time gate per entry: ``clamp(sigmoid((logit(u) + log_alpha) / beta) * (zeta - gamma)
    + gamma, 0, 1)`` with u ~ U(0, 1). Differentiable in ``log_alpha`` wherever the clamp is inactive.

    >>> g = hard_concrete_sample(torch.tensor([-30.0, 30.0]))
    >>> g.tolist()
    [0.0, 1.0]
    """
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    u = u.clamp(1e-6, 1.0 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / hc.beta)
    return (s * (hc.zeta - hc.gamma) + hc.gamma).clamp(0.0, 1.0)


def hard_concrete_eval(log_alpha: Tensor, hc: HardConcrete = HardConcrete()) -> Tensor:
    """Deterministic gates, exactly 0.0 or 1.0: open where the expected stretched gate
    ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)`` is at least 0.5 (for the default,
    symmetric stretch: where ``log_alpha >= 0``).

    >>> hard_concrete_eval(torch.tensor([-1.0, 0.5, 4.0])).tolist()
    [0.0, 1.0, 1.0]
    """
    soft = (torch.sigmoid(log_alpha) * (hc.zeta - hc.gamma) + hc.gamma).clamp(0.0, 1.0)
    return (soft >= 0.5).to(log_alpha.dtype)


def expected_l0(log_alpha: Tensor, hc: HardConcrete = HardConcrete()) -> Tensor:
    """Expected number of nonzero gates: ``sum_h sigmoid(log_alpha_h - beta * log(-gamma / zeta))``.

    >>> round(float(expected_l0(torch.zeros(4))), 4)
    3.3273
    """
    return torch.sigmoid(log_alpha - hc.beta * math.log(-hc.gamma / hc.zeta)).sum()


def head_rows(heads: Tensor | list[int], head_dim: int) -> Tensor:
    """Rows of a (H * hd, D) projection that belong to ``heads``, in the order given.

    >>> head_rows([0, 2], head_dim=2).tolist()
    [0, 1, 4, 5]
    """
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)  # (h * hd,)


def shrink_linear(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` keeping ``index`` along ``dim`` of the weight (0 = outputs, 1 = inputs)."""
    index = index.to(linear.weight.device)
    w = linear.weight.detach().index_select(dim, index)
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.index_select(0, index) if dim == 0 else linear.bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def kept_heads(heads: Iterable[int], num_heads: int) -> list[int]:
    """The heads left after removing ``heads`` from ``range(num_heads)``; errors name the bad head.

    >>> kept_heads([1, 3], 4)
    [0, 2]
    """
    drop = {int(h) for h in heads}
    bad = sorted(h for h in drop if not 0 <= h < num_heads)
    if bad:
        raise UserValueError(f"head indices {bad} are out of range; allowed 0..{num_heads - 1}")
    if len(drop) == num_heads:
        raise UserValueError(f"cannot remove all {num_heads} heads; at least one must remain")
    return [h for h in range(num_heads) if h not in drop]


def qkv_rows(heads: Tensor | list[int], head_dim: int, num_heads: int) -> Tensor:
    """Rows of a fused (3 * H * hd, D) Q/K/V projection that belong to ``heads`` (Q block, K block, V block).

    >>> qkv_rows([1], head_dim=2, num_heads=2).tolist()
    [2, 3, 6, 7, 10, 11]
    """
    rows = head_rows(heads, head_dim)  # (h * hd,)
    return torch.cat([rows + i * num_heads * head_dim for i in range(3)])  # (3 * h * hd,)


def multihead_attention(x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, head_dim: int,
                        attn_mask: Tensor | None = None, is_causal: bool = False,
                        dropout_p: float = 0.0) -> Tensor:
    """Scaled dot-product self-attention of every head in ``w_qkv`` (3 * h * hd, D); returns the heads'
    outputs concatenated, (B, S, h * hd), before the output projection. Our CPU kernel where it applies
    (``ours_cpu.attention``: inference, fp32, no dropout, short sequences), else SDPA."""
    B, S, _ = x.shape
    qkv = F.linear(x, w_qkv, b_qkv).view(B, S, 3, -1, head_dim)  # (B, S, 3, h, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, S, hd)
    if not dropout_p:
        a = ours_cpu.attention(q, k, v, attn_mask, causal=is_causal)  # (B, S, h, hd): S == L, one alignment
        if a is not None:
            return a.view(B, S, -1)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                       is_causal=is_causal)  # (B, h, S, hd)
    return a.transpose(1, 2).reshape(B, S, -1)  # (B, S, h * hd)


def _heads_shared_mask(mask: Tensor | None) -> Tensor | None:
    """Bring a mask to a shape that broadcasts over heads: (S, S), (B, S, S) -> (B, 1, S, S), (B, 1, S, S)."""
    if mask is None or mask.dim() == 2 or (mask.dim() == 4 and mask.shape[1] == 1):
        return mask
    if mask.dim() == 3:
        return mask[:, None]
    raise UserValueError(f"attn_mask must be (S, S), (B, S, S) or (B, 1, S, S) (one mask shared by all heads), "
                     f"got shape {tuple(mask.shape)}")


@dataclass(frozen=True)
class GatedAttentionConfig:
    """Hyperparameters of :class:`GatedMultiheadAttention` (``num_heads`` shrinks with ``prune_heads``)."""

    d_model: int
    num_heads: int
    head_dim: int
    dropout: float = 0.0  # on attention probabilities, training only
    bias: bool = True
    init_log_alpha: float = 3.0  # gates start open: eval gate 1, a training sample is exactly 1 w.p. ~0.8
    gate: HardConcrete = HardConcrete()

    def __post_init__(self) -> None:
        if min(self.d_model, self.num_heads, self.head_dim) < 1:
            raise UserValueError(f"d_model, num_heads, head_dim must be >= 1, got {self.d_model}, "
                             f"{self.num_heads}, {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserValueError(f"dropout must be in [0, 1), got {self.dropout}")


class GatedMultiheadAttention(nn.Module):
    """Self-attention with a hard-concrete gate on each head's output (batch-first, like SDPA).

    Projections use ``nn.MultiheadAttention``'s layout: ``in_proj`` (3 * H * hd, D) = Q, K, V blocks and
    ``out_proj`` (D, H * hd); ``log_alpha`` (H,) are the gate parameters. Training computes every head and
    scales head h by a sampled gate z_h; add ``lambda * layer.l0_penalty()`` to the loss. Eval gates are
    exactly 0 or 1 and only open heads' projection slices are gathered and computed; ``prune_heads`` /
    ``prune_closed_heads`` remove heads physically, which also saves the per-call gather.

    ``attn_mask`` follows ``F.scaled_dot_product_attention``: bool ``True`` = may attend (the opposite of
    ``nn.MultiheadAttention``), float = added to the scores; shape (S, S), (B, S, S) or (B, 1, S, S).

    Example:
        >>> attn = GatedMultiheadAttention(16, num_heads=4)
        >>> y = attn(torch.randn(2, 5, 16), is_causal=True)
        >>> loss = y.square().mean() + 0.01 * attn.l0_penalty()
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True, *,
                 init_log_alpha: float = 3.0, gate: HardConcrete = HardConcrete()) -> None:
        super().__init__()
        if num_heads < 1 or d_model % num_heads:
            raise UserValueError(f"d_model={d_model} must be divisible by num_heads={num_heads} (num_heads >= 1)")
        self.config = GatedAttentionConfig(d_model, num_heads, d_model // num_heads, dropout, bias,
                                           init_log_alpha, gate)
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.log_alpha = nn.Parameter(torch.full((num_heads,), float(init_log_alpha)))
        self._open: tuple[tuple[int, int, int], list[int]] | None = None  # (log_alpha's identity, open heads)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention,
                                 **kwargs: object) -> GatedMultiheadAttention:
        """Copy the weights of a self-attention ``nn.MultiheadAttention`` (same Q/K/V/out layout)."""
        if not mha._qkv_same_embed_dim:
            raise UserValueError("only nn.MultiheadAttention with kdim == vdim == embed_dim is supported")
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, **kwargs)
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj.weight.copy_(mha.in_proj_weight)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.in_proj.bias.copy_(mha.in_proj_bias)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def gates(self) -> Tensor:
        """(H,) gates for the next forward pass: sampled in training, exactly 0/1 at eval."""
        sample = hard_concrete_sample if self.training else hard_concrete_eval
        return sample(self.log_alpha, self.config.gate)

    def open_heads(self) -> list[int]:
        """Heads whose eval gate is 1 (recomputed only when ``log_alpha`` changes: an eval forward at batch 1
        costs a few tens of microseconds, and the gates' ops were a tenth of it)."""
        p = self.log_alpha
        key = (p.data_ptr(), p._version, p.numel())  # a new tensor, an in-place update, a pruning
        if self._open is None or self._open[0] != key:
            heads = torch.nonzero(hard_concrete_eval(p.detach(), self.config.gate)).flatten().tolist()
            self._open = (key, heads)
        return list(self._open[1])

    def l0_penalty(self) -> Tensor:
        """Expected number of open heads (differentiable in ``log_alpha``); see :func:`expected_l0`."""
        return expected_l0(self.log_alpha, self.config.gate)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.config.d_model:
            raise UserValueError(f"input must be (B, S, {self.config.d_model}) or (S, {self.config.d_model}), "
                             f"got shape {tuple(x.shape)}")
        if attn_mask is not None and is_causal:
            raise UserValueError("pass either attn_mask or is_causal=True, not both")
        if x.dim() == 2:
            return self.forward(x[None], attn_mask, is_causal)[0]
        mask = _heads_shared_mask(attn_mask)
        if self.training:
            return self._forward_gated(x, mask, is_causal)
        return self._forward_open(x, mask, is_causal)

    def _forward_gated(self, x: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        B, S, _ = x.shape
        z = self.gates().to(x.dtype)  # (H,)
        a = multihead_attention(x, self.in_proj.weight, self.in_proj.bias, self.head_dim, mask, is_causal,
                                self.config.dropout)  # (B, S, H * hd)
        a = (a.view(B, S, self.num_heads, self.head_dim) * z[:, None]).view(B, S, -1)  # gate each head
        return self.out_proj(a)

    def _forward_open(self, x: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        heads = self.open_heads()
        w_qkv, b_qkv, w_out = self.in_proj.weight, self.in_proj.bias, self.out_proj.weight
        if not heads:  # every head closed: only the output bias is left
            return torch.zeros_like(x) + (0.0 if self.out_proj.bias is None else self.out_proj.bias)
        if len(heads) < self.num_heads:  # gather the open heads' slices: compute scales with len(heads)
            rows = qkv_rows(heads, self.head_dim, self.num_heads).to(x.device)  # (3 * h * hd,)
            w_qkv = w_qkv.index_select(0, rows)  # index_select: ~5x faster than w[rows] on CPU
            b_qkv = None if b_qkv is None else b_qkv.index_select(0, rows)
            w_out = w_out.index_select(1, head_rows(heads, self.head_dim).to(x.device))  # (D, h * hd)
        a = multihead_attention(x, w_qkv, b_qkv, self.head_dim, mask, is_causal)  # (B, S, h * hd)
        return F.linear(a, w_out, self.out_proj.bias)

    def prune_heads(self, heads: Iterable[int]) -> None:
        """Physically remove ``heads`` (indices into the current heads) and their gates."""
        keep = kept_heads(heads, self.num_heads)
        self.in_proj = shrink_linear(self.in_proj, qkv_rows(keep, self.head_dim, self.num_heads), dim=0)
        self.out_proj = shrink_linear(self.out_proj, head_rows(keep, self.head_dim), dim=1)
        self.log_alpha = nn.Parameter(self.log_alpha.detach()[keep].clone())
        self.config = dataclasses.replace(self.config, num_heads=len(keep))

    def prune_closed_heads(self) -> list[int]:
        """Remove every head whose eval gate is 0; returns the removed (pre-pruning) indices."""
        closed = sorted(set(range(self.num_heads)) - set(self.open_heads()))
        if closed:
            self.prune_heads(closed)
        return closed

    def param_counts(self) -> ParamCounts:
        """Total parameters, and those one token reads at eval (open heads' slices plus the output bias)."""
        total = sum(p.numel() for p in self.parameters())
        sliced = (*self.in_proj.parameters(), self.out_proj.weight)  # the tensors split by head
        per_head = sum(p.numel() for p in sliced) // self.num_heads
        out_bias = 0 if self.out_proj.bias is None else self.out_proj.bias.numel()
        return ParamCounts(total=total, active=len(self.open_heads()) * per_head + out_bias)

    def extra_repr(self) -> str:
        return f"d_model={self.config.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}"


def prune_bert_heads(attention: nn.Module, heads: Iterable[int]) -> None:
    """Remove ``heads`` from a ``transformers`` BERT-style attention block, in place.

    ``attention`` is a ``BertAttention``-like module: ``.self`` has ``query``/``key``/``value`` linears and
    ``num_attention_heads``, ``attention_head_size``, ``all_head_size``; ``.output.dense`` is the output
    projection, whose matching input columns are removed. Head indices refer to the current heads. The
    model's config is not changed, so reload a pruned model from its state dict, not ``from_pretrained``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...                  intermediate_size=64, vocab_size=100)
        >>> layer = BertModel(cfg).encoder.layer[0]
        >>> prune_bert_heads(layer.attention, [0, 2]); layer.attention.self.all_head_size
        16
    """
    sa, out = getattr(attention, "self", None), getattr(getattr(attention, "output", None), "dense", None)
    needed = ("query", "key", "value", "num_attention_heads", "attention_head_size", "all_head_size")
    if sa is None or out is None or not all(hasattr(sa, n) for n in needed):
        raise UserTypeError(f"expected a BERT-style attention block with .self ({', '.join(needed)}) and "
                        f".output.dense, got {type(attention).__name__}")
    keep = kept_heads(heads, sa.num_attention_heads)
    rows = head_rows(keep, sa.attention_head_size)
    for name in ("query", "key", "value"):
        setattr(sa, name, shrink_linear(getattr(sa, name), rows, dim=0))
    attention.output.dense = shrink_linear(out, rows, dim=1)
    sa.num_attention_heads = len(keep)
    sa.all_head_size = len(keep) * sa.attention_head_size


def prune_bert_model_heads(model: nn.Module, heads_to_prune: dict[int, Iterable[int]]) -> None:
    """``{layer index: heads}`` for a ``transformers`` BERT-family model (what ``model.prune_heads`` did).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=64, vocab_size=100))
        >>> prune_bert_model_heads(model, {1: [3]})
        >>> model.encoder.layer[1].attention.self.num_attention_heads
        3
    """
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise UserTypeError(f"expected a BERT-family model with .encoder.layer, got {type(model).__name__}")
    for i, heads in heads_to_prune.items():
        if not 0 <= i < len(layers):
            raise UserValueError(f"layer index {i} is out of range; allowed 0..{len(layers) - 1}")
        prune_bert_heads(layers[i].attention, heads)
