"""The engines of ``prune bench`` (installed with the package; ``benchmarks/`` keeps study scripts and results).

``command`` parses ``prune bench matmul | families | checkpoint`` and runs one of: ``matmul`` (sparse against dense
over shapes, sparsities, token counts and dtypes, with torch's and scipy's kernels as anchors), ``families``
(unstructured sparsity, MoE and head gating at matched active parameters), ``checkpoint`` (every linear layer of
a user's checkpoint, and the whole model); ``output`` writes the CSV / JSON / PNG files, ``plots`` draws them,
``shapes`` names the shape sets. The timer is ``sparse_ops.timing``.
"""
