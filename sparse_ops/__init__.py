"""sparse_ops: sparse formats, kernels, sparse layers and checkpoint I/O (the lower layer; never imports prune).

The public API (``__all__``), loaded on first use so that ``import sparse_ops`` stays light:
- load and run: :func:`from_pretrained` (a converted Hugging Face folder, architecture from its config.json),
  :func:`sparsify` (load a sparse checkpoint into a model, swapping its linears for
  :class:`SparseLinear` layers on a per-layer, per-batch plan), :func:`plan_report` (what each layer chose),
  :func:`use_fast_attention` (our attention kernel for a ``transformers`` model);
- decode a LLaMA-family model (Llama, Mistral, Qwen2) in one native call per token: :func:`generate`,
  :class:`Decoder` (``sparse_ops.decode``);
- checkpoints: :func:`convert_checkpoint` (dense -> CSR / 2:4 safetensors), :func:`load_sparse_state_dict`,
  :func:`inspect_checkpoint`;
- formats: :class:`CSR`, :class:`TwoFour`, and int8 with a scale per row (:class:`DenseInt8`, :class:`CSRInt8`,
  :class:`BitmapInt8`; ``convert_checkpoint(..., quantize="int8")``);
- the other sparse families: :class:`MoE`, :class:`GatedMultiheadAttention`.

Example:
    >>> import torch, sparse_ops
    >>> w = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    >>> layer = sparse_ops.SparseLinear(sparse_ops.CSR.from_dense(w), None)
    >>> layer(torch.tensor([[1.0, 10.0]])).tolist()
    [[20.0, 1.0]]
"""
from __future__ import annotations

from sparse_ops.lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "sparsify": "sparse_ops.loading", "convert_checkpoint": "sparse_ops.checkpoint",
    "load_sparse_state_dict": "sparse_ops.checkpoint", "inspect_checkpoint": "sparse_ops.checkpoint",
    "from_pretrained": "sparse_ops.pretrained", "SparseLinear": "sparse_ops.linear", "plan_report": "sparse_ops.plan", "use_fast_attention": "sparse_ops.attention",
    "CSR": "sparse_ops.formats", "TwoFour": "sparse_ops.formats", "BitmapInt8": "sparse_ops.quantized",
    "CSRInt8": "sparse_ops.quantized", "DenseInt8": "sparse_ops.quantized",
    "MoE": "sparse_ops.layers", "GatedMultiheadAttention": "sparse_ops.layers",
    "generate": "sparse_ops.decode", "Decoder": "sparse_ops.decode",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
