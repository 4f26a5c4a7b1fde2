"""Read, convert, write and inspect sparse checkpoints (loading one into a model: ``sparse_ops.loading``).

Sources: a ``.safetensors`` file (dense, or sparse as written here), a ``.pt`` / ``.bin`` state dict (read with
``torch.load(weights_only=True)``, never a full unpickle), or a Hugging Face model directory
(``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``); a sharded
sparse checkpoint as written here (its folder or its ``model.sparse.safetensors.index.json``).

Output: one safetensors file, or a folder of shards with an index (one shard per source shard). A folder
converted to a folder keeps its other files (config, tokenizer, ...), so ``sparse_ops.pretrained.
from_pretrained`` can rebuild the model from it. The output is never the source, inside the source folder, or
an existing file (unless ``overwrite=True``); a checkpoint with nothing sparse in it is refused (unless
``allow_dense=True``).

One module per job, data flowing one way (schema < layout < convert, output < convert, inspect):
``schema`` (the on-disk records and reading them back), ``layout`` (how each tensor is stored), ``output``
(where conversion may write, and putting a folder in place), ``convert`` (the conversion), ``inspect`` (what a
checkpoint holds). This package exports the API users call; code in this repository imports from the module
that owns a name.

Example:
    >>> import os, tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> w = torch.randn(64, 64).masked_fill(torch.rand(64, 64) < 0.9, 0.0)
    >>> torch.save({"fc.weight": w, "fc.bias": torch.zeros(64)}, os.path.join(d, "model.pt"))
    >>> s = convert_checkpoint(os.path.join(d, "model.pt"), os.path.join(d, "sparse.safetensors"), format="csr")
    >>> s.converted, s.tensors, s.ratio < 0.3
    (1, 2, True)
    >>> sd = load_sparse_state_dict(os.path.join(d, "sparse.safetensors"))
    >>> sd["fc.weight"].format, torch.equal(sd["fc.weight"].to_dense(), w)
    ('csr', True)
"""
from __future__ import annotations

from sparse_ops.checkpoint.convert import CONVERT_FORMATS, ConvertSummary, convert_checkpoint
from sparse_ops.checkpoint.inspect import TensorInfo, inspect_checkpoint
from sparse_ops.checkpoint.schema import iter_tensors, load_sparse_state_dict

__all__ = ["CONVERT_FORMATS", "ConvertSummary", "TensorInfo", "convert_checkpoint", "inspect_checkpoint",
           "iter_tensors", "load_sparse_state_dict"]
