"""The other sparse-model families: Mixture-of-Experts FFNs and head-gated attention."""
from sparse_ops.layers.head_gating import (
    GatedMultiheadAttention,
    HardConcrete,
    expected_l0,
    hard_concrete_eval,
    hard_concrete_sample,
    prune_bert_heads,
    prune_bert_model_heads,
)
from sparse_ops.layers.moe import MoE, MoEAux, MoEConfig, route, router_z_loss, switch_aux_loss
from sparse_ops.layers.params import ParamCounts

__all__ = [
    "GatedMultiheadAttention", "HardConcrete", "MoE", "MoEAux", "MoEConfig", "ParamCounts", "expected_l0",
    "hard_concrete_eval", "hard_concrete_sample", "prune_bert_heads", "prune_bert_model_heads", "route",
    "router_z_loss", "switch_aux_loss",
]
