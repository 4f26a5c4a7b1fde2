"""One-shot pruning of pretrained models from calibration data (SparseGPT, Wanda, magnitude; OWL profiles)."""
