"""The demo's model: a small transformer classifier over 8x8 digit images, one token per image row.

Every sparse family applies to it: its linears can be pruned (unstructured or 2:4), its FFNs can be
Mixture-of-Experts layers, and its attention heads can be gated and pruned.

Example:
    >>> import torch
    >>> model = DigitsTransformer(ModelConfig(d_model=32, num_heads=4, d_ffn=64))
    >>> model(torch.rand(5, 64)).shape
    torch.Size([5, 10])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_ops.layers.head_gating import GatedMultiheadAttention
from sparse_ops.layers.moe import MoE

ROWS, COLS, CLASSES = 8, 8, 10  # an image is 8 tokens of 8 pixels


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the classifier; ``num_experts > 0`` makes every FFN an MoE, ``gated_heads`` gates heads."""

    d_model: int = 128
    num_heads: int = 8
    d_ffn: int = 512
    num_layers: int = 2
    num_experts: int = 0  # 0: dense FFN
    top_k: int = 2  # experts per token; each expert has d_ffn // top_k hidden units (matched active size)
    gated_heads: bool = False


class SelfAttention(nn.Module):
    """Plain multi-head self-attention (SDPA) with the same layout as ``GatedMultiheadAttention``.

    The projections are called as modules, so ``sparsify`` can swap them for sparse layers.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = nn.Linear(d_model, 3 * d_model)  # Q, K, V blocks, head-major inside each
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:  # (B, S, D) -> (B, S, D)
        B, S, D = x.shape
        qkv = self.in_proj(x).view(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, S, hd)
        return self.out_proj(a.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.d_model)
        self.norm2 = nn.LayerNorm(c.d_model)
        attn = GatedMultiheadAttention if c.gated_heads else SelfAttention
        self.attn = attn(c.d_model, c.num_heads)
        if c.num_experts:
            self.ffn = MoE(c.d_model, c.d_ffn // c.top_k, c.num_experts, c.top_k)
        else:
            self.ffn = nn.Sequential(nn.Linear(c.d_model, c.d_ffn), nn.GELU(), nn.Linear(c.d_ffn, c.d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class DigitsTransformer(nn.Module):
    """(B, 64) pixels in [0, 1] -> (B, 10) class logits."""

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(COLS, config.d_model)
        self.pos = nn.Parameter(torch.zeros(ROWS, config.d_model))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.classifier = nn.Linear(config.d_model, CLASSES)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embed(pixels.reshape(-1, ROWS, COLS)) + self.pos  # (B, 8, D)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.norm(x).mean(dim=1))  # mean over rows -> (B, 10)

    def aux_loss(self, l0_coef: float) -> Tensor:
        """Losses the layers ask for: MoE load balancing and z-loss (last forward), L0 of the head gates."""
        total = self.pos.new_zeros(())
        for block in self.blocks:
            if isinstance(block.ffn, MoE) and block.ffn.last_aux is not None:
                total = total + block.ffn.last_aux.aux_loss + block.ffn.last_aux.z_loss
            if isinstance(block.attn, GatedMultiheadAttention):
                total = total + l0_coef * block.attn.l0_penalty()
        return total
