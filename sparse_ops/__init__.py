"""sparse_ops: sparse formats, kernels, sparse layers and checkpoint I/O (the lower layer; never imports prune)."""
