"""Fusions for sparse transformer inference: the passes (``passes``: each proven from ``torch.fx`` graphs before
a module is swapped) and the fused modules they swap in (``modules``).

``fuse(model)`` runs every pass; ``sparse_ops.loading.sparsify(..., fuse=True)`` and ``from_pretrained`` call it.
"""
from sparse_ops.fusion.modules import SparseAddNorm, SparseFFN, SparseGatedFFN
from sparse_ops.fusion.passes import fuse, fuse_activations, fuse_add_norm, fuse_ffn, fuse_gated_ffn

__all__ = ["SparseAddNorm", "SparseFFN", "SparseGatedFFN", "fuse", "fuse_activations", "fuse_add_norm", "fuse_ffn",
           "fuse_gated_ffn"]
