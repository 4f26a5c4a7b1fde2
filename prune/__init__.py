"""prune: prune PyTorch models while they train (the upper layer; see sparse_ops for formats and kernels)."""
__version__ = "0.1.0"
